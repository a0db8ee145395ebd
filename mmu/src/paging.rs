//! Guest page-table walks: 2-level 32-bit paging (with PSE 4 MiB pages and PGE global
//! pages) and PAE (with NX), setting accessed and dirty bits as a P6 does.
//!
//! TODO(mmu helper): the full walk. This first version handles paging off only.

use crate::phys::PhysMem;
use crate::Access;

/// CR0.WP: supervisor writes honour read-only pages.
pub const CR0_WP: u64 = 1 << 16;
/// CR0.PG: paging enabled.
pub const CR0_PG: u64 = 1 << 31;
/// CR0.PE: protected mode.
pub const CR0_PE: u64 = 1 << 0;
/// CR4.PSE: 4 MiB pages in 2-level paging.
pub const CR4_PSE: u64 = 1 << 4;
/// CR4.PAE: physical address extension.
pub const CR4_PAE: u64 = 1 << 5;
/// CR4.PGE: global pages.
pub const CR4_PGE: u64 = 1 << 7;
/// EFER.NXE: no-execute bit enabled in PAE entries.
pub const EFER_NXE: u64 = 1 << 11;

/// #PF error code: the fault was a protection violation (page present).
pub const PF_P: u32 = 1 << 0;
/// #PF error code: the access was a write.
pub const PF_W: u32 = 1 << 1;
/// #PF error code: the access was made in user mode.
pub const PF_U: u32 = 1 << 2;
/// #PF error code: a reserved bit was set in a paging entry.
pub const PF_RSVD: u32 = 1 << 3;
/// #PF error code: the access was an instruction fetch (only reported with NX enabled).
pub const PF_I: u32 = 1 << 4;

/// The control registers that shape paging.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct PagingRegs {
    /// CR0.
    pub cr0: u64,
    /// CR3.
    pub cr3: u64,
    /// CR4.
    pub cr4: u64,
    /// EFER.
    pub efer: u64,
}

impl PagingRegs {
    /// Whether paging is on (CR0.PG and CR0.PE).
    #[inline]
    pub fn paging(&self) -> bool {
        self.cr0 & (CR0_PG | CR0_PE) == (CR0_PG | CR0_PE)
    }

    /// The bits whose change requires a full TLB flush.
    pub fn paging_mode_bits(&self) -> (u64, u64, u64) {
        (
            self.cr0 & (CR0_PG | CR0_PE | CR0_WP),
            self.cr4 & (CR4_PSE | CR4_PAE | CR4_PGE),
            self.efer & EFER_NXE,
        )
    }
}

/// A page fault: CR2 and the error code the CPU pushes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct PageFault {
    /// The faulting linear address (goes to CR2).
    pub linear: u64,
    /// The error code (PF_* bits).
    pub error_code: u32,
}

/// The result of a successful walk.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Translation {
    /// Physical address of the start of the page (4 KiB aligned even for large pages:
    /// the 4 KiB frame holding the address).
    pub frame: u64,
    /// The access may be a user-mode access.
    pub user: bool,
    /// Writes allowed (combined R/W of all levels, as the access privilege sees it).
    pub writable: bool,
    /// Instruction fetch allowed (no NX at any level).
    pub executable: bool,
    /// The mapping is global (CR4.PGE and G bit).
    pub global: bool,
    /// The dirty bit is set in the final entry (so a later write needs no walk).
    pub dirty: bool,
}

impl Translation {
    /// The physical address of `linear` under this translation.
    #[inline]
    pub fn phys_addr(&self, linear: u64) -> u64 {
        self.frame | (linear & 0xfff)
    }
}

/// Walks the guest page tables for `linear`.
pub fn walk(
    _phys: &mut PhysMem,
    regs: &PagingRegs,
    linear: u64,
    acc: Access,
    user: bool,
) -> Result<Translation, PageFault> {
    let _ = (regs, acc, user);
    Ok(Translation {
        frame: linear & 0xffff_f000,
        user: true,
        writable: true,
        executable: true,
        global: false,
        dirty: true,
    })
}
