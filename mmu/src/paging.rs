//! Guest page-table walks: 2-level 32-bit paging (with PSE 4 MiB pages, PSE-36 and PGE
//! global pages) and PAE paging (3 levels, 2 MiB pages, NX when EFER.NXE), setting
//! accessed and dirty bits as a P6 does.
//!
//! Rules followed (Intel SDM vol. 3, chapter 4):
//! - Rights are combined across levels: a user access needs U/S=1 at every level, a
//!   user write also R/W=1 at every level; a supervisor write needs R/W=1 at every level
//!   only when CR0.WP=1; a fetch (PAE with EFER.NXE) needs XD=0 at every level.
//! - Reserved bits are checked in present entries only, level by level while walking;
//!   a hit gives #PF with P=1 and RSVD=1. morph86 reports MAXPHYADDR = 36
//!   ([`MAXPHYADDR`]): 4 MiB PDEs carry physical bits 35:32 in bits 16:13 (PSE-36).
//! - Accessed and dirty bits are written only when the walk succeeds (no A/D write for
//!   a walk that faults, as Bochs does; the SDM leaves it open). A is set in every entry
//!   used (PDE and PTE, or the large-page PDE), D only on a write and only in the final
//!   entry. Each update is one locked OR on the guest entry, made only if a bit is
//!   missing ([`PhysMem::atomic_or_entry`]).
//! - #PF error code: P (protection or reserved bit; clear for a not-present entry), W,
//!   U (CPL 3 access; implicit supervisor accesses such as descriptor-table reads pass
//!   `user = false`), RSVD, and I/D for an instruction fetch only when CR4.PAE=1 and
//!   EFER.NXE=1 (SDM 4.7: without SMEP the I/D bit is reported only in that case).
//!
//! PAE PDPTEs are loaded into the MMU when CR3 is written, as on real CPUs (SDM 4.4.1):
//! later writes to the PDPT in memory take effect at the next CR3 write. The CPU checks
//! the four entries before it commits a MOV to CR0/CR3/CR4 that leaves PAE paging on,
//! with [`crate::Mmu::pdptes_valid`], and raises #GP(0) when a present entry has
//! reserved bits set. Should an invalid PDPTE be loaded anyway, accesses through it
//! fault with #PF(RSVD).

use crate::phys::PhysMem;
use crate::Access;

/// CR0.PE (bit 0): protected mode.
pub const CR0_PE: u64 = 1 << 0;
/// CR0.WP (bit 16): supervisor writes honour read-only pages.
pub const CR0_WP: u64 = 1 << 16;
/// CR0.PG (bit 31): paging enabled.
pub const CR0_PG: u64 = 1 << 31;
/// CR4.PSE (bit 4): 4 MiB pages in 2-level paging.
pub const CR4_PSE: u64 = 1 << 4;
/// CR4.PAE (bit 5): physical address extension (3-level paging).
pub const CR4_PAE: u64 = 1 << 5;
/// CR4.PGE (bit 7): global pages.
pub const CR4_PGE: u64 = 1 << 7;
/// EFER.NXE (bit 11): the execute-disable bit of PAE entries is honoured.
pub const EFER_NXE: u64 = 1 << 11;

/// #PF error code bit 0 (P): the fault was a protection violation or a reserved bit
/// (clear: the page was not present).
pub const PF_P: u32 = 1 << 0;
/// #PF error code bit 1 (W/R): the access was a write.
pub const PF_W: u32 = 1 << 1;
/// #PF error code bit 2 (U/S): the access was made in user mode.
pub const PF_U: u32 = 1 << 2;
/// #PF error code bit 3 (RSVD): a reserved bit was set in a paging entry.
pub const PF_RSVD: u32 = 1 << 3;
/// #PF error code bit 4 (I/D): the access was an instruction fetch (only reported with
/// CR4.PAE=1 and EFER.NXE=1).
pub const PF_I: u32 = 1 << 4;

/// Paging entry bit 0 (P): present.
pub const PTE_P: u64 = 1 << 0;
/// Paging entry bit 1 (R/W): writes allowed.
pub const PTE_RW: u64 = 1 << 1;
/// Paging entry bit 2 (U/S): user accesses allowed.
pub const PTE_US: u64 = 1 << 2;
/// Paging entry bit 5 (A): accessed.
pub const PTE_A: u64 = 1 << 5;
/// Paging entry bit 6 (D): dirty (final entries only).
pub const PTE_D: u64 = 1 << 6;
/// PDE bit 7 (PS): the entry maps a large page (4 MiB, or 2 MiB under PAE).
pub const PTE_PS: u64 = 1 << 7;
/// Paging entry bit 8 (G): global (final entries only, with CR4.PGE).
pub const PTE_G: u64 = 1 << 8;
/// PAE entry bit 63 (XD): execute disable (with EFER.NXE; reserved without).
pub const PTE_XD: u64 = 1 << 63;

/// The physical address width morph86 reports (CPUID 0x80000008 / PSE-36 / PAE).
pub const MAXPHYADDR: u32 = 36;
/// Bits (MAXPHYADDR-1):12 of a PAE entry: the physical frame.
const PAE_ADDR: u64 = ((1u64 << MAXPHYADDR) - 1) & !0xfff;
/// Bits 62:MAXPHYADDR of a PAE entry: reserved.
const PAE_HIGH_RSVD: u64 = !((1u64 << MAXPHYADDR) - 1) & !PTE_XD;
/// PAE PDPTE reserved bits: 2:1, 8:5 and 63:MAXPHYADDR (SDM table 4-8).
pub const PDPTE_RSVD: u64 = 0b1_1110_0110 | PAE_HIGH_RSVD | PTE_XD;
/// PAE 2 MiB PDE: bits 20:13 are reserved (bit 12 is PAT).
const PAE_LARGE_RSVD: u64 = 0x1f_e000;
/// 32-bit 4 MiB PDE: bit 21 and bits 20:(MAXPHYADDR-19) are reserved (bit 12 is PAT,
/// bits 16:13 carry physical address bits 35:32).
const PSE_LARGE_RSVD: u64 = ((1 << 22) - 1) & !((1 << (MAXPHYADDR - 19)) - 1);

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

    /// Whether PAE paging is on.
    #[inline]
    pub fn pae(&self) -> bool {
        self.paging() && self.cr4 & CR4_PAE != 0
    }

    /// Whether the XD bit is in force (PAE paging and EFER.NXE).
    #[inline]
    pub fn nx(&self) -> bool {
        self.pae() && self.efer & EFER_NXE != 0
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
    /// The access may be a user-mode access (U/S=1 at every level).
    pub user: bool,
    /// Writes allowed (combined R/W of all levels, as the access privilege sees it).
    pub writable: bool,
    /// Instruction fetch allowed (no XD at any level).
    pub executable: bool,
    /// The mapping is global (CR4.PGE and G bit).
    pub global: bool,
    /// The dirty bit is set in the final entry (so a later write needs no walk).
    pub dirty: bool,
    /// The mapping comes from a large page (4 MiB or 2 MiB): INVLPG of any address in
    /// it must drop every 4 KiB piece the TLB holds.
    pub large: bool,
}

impl Translation {
    /// The physical address of `linear` under this translation.
    #[inline]
    pub fn phys_addr(&self, linear: u64) -> u64 {
        self.frame | (linear & 0xfff)
    }
}

/// Reads the four PAE PDPTEs from the 32-byte aligned table CR3 points at.
pub fn load_pdptes(phys: &mut PhysMem, cr3: u64) -> [u64; 4] {
    let base = cr3 & 0xffff_ffe0;
    let mut out = [0u64; 4];
    for (i, e) in out.iter_mut().enumerate() {
        let mut b = [0u8; 8];
        phys.read(base + i as u64 * 8, &mut b);
        *e = u64::from_le_bytes(b);
    }
    out
}

/// Whether every present PDPTE is free of reserved bits (else MOV to CR3 / CR0 / CR4
/// raises #GP(0)).
pub fn pdptes_ok(pdptes: &[u64; 4]) -> bool {
    pdptes
        .iter()
        .all(|&e| e & PTE_P == 0 || e & PDPTE_RSVD == 0)
}

fn read_entry(phys: &mut PhysMem, addr: u64, wide: bool) -> u64 {
    let mut b = [0u8; 8];
    phys.read(addr, &mut b[..if wide { 8 } else { 4 }]);
    u64::from_le_bytes(b)
}

/// Walks the guest page tables for `linear` (a 32-bit linear address) for an access
/// of kind `acc` with privilege `user`. `pdptes` are the PDPTEs loaded at the last CR3
/// write (used under PAE only). On success the accessed bits (and, for a write, the
/// dirty bit) are set in guest memory.
pub fn walk(
    phys: &mut PhysMem,
    regs: &PagingRegs,
    pdptes: &[u64; 4],
    linear: u64,
    acc: Access,
    user: bool,
) -> Result<Translation, PageFault> {
    let linear = linear & 0xffff_ffff;
    let pae = regs.cr4 & CR4_PAE != 0;
    let nx = pae && regs.efer & EFER_NXE != 0;
    let mut code = 0;
    if acc == Access::Write {
        code |= PF_W;
    }
    if user {
        code |= PF_U;
    }
    if acc == Access::Fetch && nx {
        code |= PF_I;
    }
    let not_present = PageFault {
        linear,
        error_code: code,
    };
    let reserved = PageFault {
        linear,
        error_code: code | PF_P | PF_RSVD,
    };

    // (entry address, entry value) of the non-final levels and of the final one.
    let upper: (u64, u64);
    let leaf_addr: u64;
    let leaf: u64;
    let frame: u64;
    let large: bool;
    if pae {
        let pdpte = pdptes[((linear >> 30) & 3) as usize];
        if pdpte & PTE_P == 0 {
            return Err(not_present);
        }
        if pdpte & PDPTE_RSVD != 0 {
            return Err(reserved);
        }
        let rsvd = PAE_HIGH_RSVD | if nx { 0 } else { PTE_XD };
        let pde_addr = (pdpte & PAE_ADDR) + ((linear >> 21) & 0x1ff) * 8;
        let pde = read_entry(phys, pde_addr, true);
        if pde & PTE_P == 0 {
            return Err(not_present);
        }
        if pde & rsvd != 0 {
            return Err(reserved);
        }
        if pde & PTE_PS != 0 {
            if pde & PAE_LARGE_RSVD != 0 {
                return Err(reserved);
            }
            upper = (u64::MAX, 0);
            leaf_addr = pde_addr;
            leaf = pde;
            frame = (pde & PAE_ADDR & !0x1f_ffff) + (linear & 0x1f_f000);
            large = true;
        } else {
            let pte_addr = (pde & PAE_ADDR) + ((linear >> 12) & 0x1ff) * 8;
            let pte = read_entry(phys, pte_addr, true);
            if pte & PTE_P == 0 {
                return Err(not_present);
            }
            if pte & rsvd != 0 {
                return Err(reserved);
            }
            upper = (pde_addr, pde);
            leaf_addr = pte_addr;
            leaf = pte;
            frame = pte & PAE_ADDR;
            large = false;
        }
    } else {
        let pde_addr = (regs.cr3 & 0xffff_f000) + ((linear >> 22) & 0x3ff) * 4;
        let pde = read_entry(phys, pde_addr, false);
        if pde & PTE_P == 0 {
            return Err(not_present);
        }
        if pde & PTE_PS != 0 && regs.cr4 & CR4_PSE != 0 {
            if pde & PSE_LARGE_RSVD != 0 {
                return Err(reserved);
            }
            upper = (u64::MAX, 0);
            leaf_addr = pde_addr;
            leaf = pde;
            frame = (pde & 0xffc0_0000) | ((pde >> 13) & 0xf) << 32 | (linear & 0x3f_f000);
            large = true;
        } else {
            let pte_addr = (pde & 0xffff_f000) + ((linear >> 12) & 0x3ff) * 4;
            let pte = read_entry(phys, pte_addr, false);
            if pte & PTE_P == 0 {
                return Err(not_present);
            }
            upper = (pde_addr, pde);
            leaf_addr = pte_addr;
            leaf = pte;
            frame = pte & 0xffff_f000;
            large = false;
        }
    }

    // Rights combined over the levels (a large page has only its PDE).
    let has_upper = upper.0 != u64::MAX;
    let both = if has_upper { upper.1 & leaf } else { leaf };
    let any = if has_upper { upper.1 | leaf } else { leaf };
    let u_ok = both & PTE_US != 0;
    let w_ok = both & PTE_RW != 0;
    let x_ok = !nx || any & PTE_XD == 0;
    let wp = regs.cr0 & CR0_WP != 0;
    let writable = if user { u_ok && w_ok } else { w_ok || !wp };
    let allowed = match acc {
        Access::Read => !user || u_ok,
        Access::Write => writable,
        Access::Fetch => (!user || u_ok) && x_ok,
    };
    if !allowed {
        return Err(PageFault {
            linear,
            error_code: code | PF_P,
        });
    }

    // Accessed bits on every level used, dirty in the final entry on a write.
    if has_upper && upper.1 & PTE_A == 0 {
        phys.atomic_or_entry(upper.0, PTE_A, pae);
    }
    let want = if acc == Access::Write {
        PTE_A | PTE_D
    } else {
        PTE_A
    };
    let leaf = if leaf & want != want {
        phys.atomic_or_entry(leaf_addr, want, pae)
    } else {
        leaf
    };
    Ok(Translation {
        frame,
        user: u_ok,
        writable,
        executable: x_ok,
        global: regs.cr4 & CR4_PGE != 0 && leaf & PTE_G != 0,
        dirty: leaf & PTE_D != 0,
        large,
    })
}

#[cfg(test)]
mod tests {
    //! Expected values come from the SDM's entry formats and fault rules (vol. 3 ch. 4),
    //! not from running the walker.
    use super::*;

    const PD: u64 = 0x1000;
    const PT: u64 = 0x2000;
    const PAGE: u64 = 0x5000;
    /// Linear 0x0040_3000: directory index 1, table index 3.
    const LIN: u64 = 0x0040_3000;
    const URW: u64 = PTE_P | PTE_RW | PTE_US;

    fn mem() -> PhysMem {
        PhysMem::new(16 << 20).unwrap()
    }
    fn w32(m: &mut PhysMem, a: u64, v: u64) {
        m.write(a, &(v as u32).to_le_bytes());
    }
    fn r32(m: &mut PhysMem, a: u64) -> u64 {
        let mut b = [0u8; 4];
        m.read(a, &mut b);
        u32::from_le_bytes(b) as u64
    }
    fn w64(m: &mut PhysMem, a: u64, v: u64) {
        m.write(a, &v.to_le_bytes());
    }
    fn r64(m: &mut PhysMem, a: u64) -> u64 {
        let mut b = [0u8; 8];
        m.read(a, &mut b);
        u64::from_le_bytes(b)
    }
    fn regs32(cr0_extra: u64, cr4: u64) -> PagingRegs {
        PagingRegs {
            cr0: CR0_PE | CR0_PG | cr0_extra,
            cr3: PD,
            cr4,
            efer: 0,
        }
    }
    /// PD[1] -> PT, PT[3] -> PAGE, with the given rights.
    fn map32(m: &mut PhysMem, pde_bits: u64, pte_bits: u64) {
        w32(m, PD + 4, PT | pde_bits);
        w32(m, PT + 3 * 4, PAGE | pte_bits);
    }
    fn code(r: Result<Translation, PageFault>) -> u32 {
        let f = r.expect_err("expected a page fault");
        assert_eq!(f.linear, LIN | 0x123, "CR2 is the faulting linear address");
        f.error_code
    }

    #[test]
    fn two_level_walk_and_accessed_dirty_bits() {
        let mut m = mem();
        map32(&mut m, URW, URW);
        let r = regs32(0, 0);
        let t = walk(&mut m, &r, &[0; 4], LIN | 0x123, Access::Read, false).unwrap();
        assert_eq!(t.phys_addr(LIN | 0x123), PAGE | 0x123);
        assert!(t.user && t.writable && t.executable && !t.global && !t.large);
        assert!(!t.dirty);
        // A set in both levels, D in neither (a read).
        assert_eq!(r32(&mut m, PD + 4), PT | URW | PTE_A);
        assert_eq!(r32(&mut m, PT + 12), PAGE | URW | PTE_A);
        let t = walk(&mut m, &r, &[0; 4], LIN, Access::Write, true).unwrap();
        assert!(t.dirty);
        // D only in the final entry.
        assert_eq!(r32(&mut m, PD + 4), PT | URW | PTE_A);
        assert_eq!(r32(&mut m, PT + 12), PAGE | URW | PTE_A | PTE_D);
    }

    #[test]
    fn not_present_codes_and_no_ad_writes_on_fault() {
        let mut m = mem();
        let r = regs32(0, 0);
        // PDE not present.
        let l = LIN | 0x123;
        assert_eq!(code(walk(&mut m, &r, &[0; 4], l, Access::Read, false)), 0);
        assert_eq!(
            code(walk(&mut m, &r, &[0; 4], l, Access::Write, true)),
            PF_W | PF_U
        );
        // PTE not present; the PDE's A bit stays clear (morph86's documented choice:
        // no A/D writes for a walk that faults; the SDM leaves this open).
        w32(&mut m, PD + 4, PT | URW);
        assert_eq!(
            code(walk(&mut m, &r, &[0; 4], l, Access::Write, false)),
            PF_W
        );
        assert_eq!(r32(&mut m, PD + 4), PT | URW);
        // No I bit without PAE + NXE, even with EFER.NXE set.
        let mut r2 = r;
        r2.efer = EFER_NXE;
        assert_eq!(
            code(walk(&mut m, &r2, &[0; 4], l, Access::Fetch, true)),
            PF_U
        );
    }

    #[test]
    fn protection_codes_user_and_write() {
        let mut m = mem();
        let l = LIN | 0x123;
        let r = regs32(0, 0);
        // Supervisor-only PTE under a user PDE: a user read is a protection fault.
        map32(&mut m, URW, PTE_P | PTE_RW);
        assert_eq!(
            code(walk(&mut m, &r, &[0; 4], l, Access::Read, true)),
            PF_P | PF_U
        );
        assert_eq!(
            code(walk(&mut m, &r, &[0; 4], l, Access::Fetch, true)),
            PF_P | PF_U
        );
        // The PDE restricts too (rights are combined).
        map32(&mut m, PTE_P | PTE_RW, URW);
        assert_eq!(
            code(walk(&mut m, &r, &[0; 4], l, Access::Read, true)),
            PF_P | PF_U
        );
        // Read-only at the PDE level: user write faults, user read works.
        map32(&mut m, PTE_P | PTE_US, URW);
        assert_eq!(
            code(walk(&mut m, &r, &[0; 4], l, Access::Write, true)),
            PF_P | PF_W | PF_U
        );
        assert!(walk(&mut m, &r, &[0; 4], l, Access::Read, true).is_ok());
        // No A/D written by the faulting write (the read above set A only).
        assert_eq!(r32(&mut m, PT + 12) & PTE_D, 0);
    }

    #[test]
    fn cr0_wp_controls_supervisor_writes() {
        let mut m = mem();
        let l = LIN | 0x123;
        map32(&mut m, URW, PTE_P | PTE_US);
        let t = walk(&mut m, &regs32(0, 0), &[0; 4], l, Access::Write, false).unwrap();
        assert!(t.writable && t.dirty, "WP=0: supervisor writes ignore R/W");
        assert_ne!(r32(&mut m, PT + 12) & PTE_D, 0);
        assert_eq!(
            code(walk(
                &mut m,
                &regs32(CR0_WP, 0),
                &[0; 4],
                l,
                Access::Write,
                false
            )),
            PF_P | PF_W
        );
        // WP never lets a user write a read-only page.
        assert_eq!(
            code(walk(&mut m, &regs32(0, 0), &[0; 4], l, Access::Write, true)),
            PF_P | PF_W | PF_U
        );
    }

    #[test]
    fn pse_large_pages_pse36_and_reserved_bits() {
        let mut m = mem();
        // PD[1] is a 4 MiB page at physical 0x00c0_0000 (bits 31:22 = 3).
        let pde = 0x00c0_0000 | URW | PTE_PS;
        w32(&mut m, PD + 4, pde);
        let l = LIN | 0x123;
        let t = walk(
            &mut m,
            &regs32(0, CR4_PSE),
            &[0; 4],
            l,
            Access::Write,
            false,
        )
        .unwrap();
        assert_eq!(t.phys_addr(l), 0x00c0_0000 + 0x3123);
        assert!(t.large && t.dirty);
        assert_eq!(r32(&mut m, PD + 4), pde | PTE_A | PTE_D);
        // Without CR4.PSE the PS bit is ignored: the PDE points at a page table.
        w32(&mut m, 0x00c0_0000 + 3 * 4, PAGE | URW);
        let t = walk(&mut m, &regs32(0, 0), &[0; 4], l, Access::Read, false).unwrap();
        assert_eq!(t.phys_addr(l), PAGE | 0x123);
        // PSE-36: bits 16:13 give physical bits 35:32.
        w32(&mut m, PD + 4, 0x00c0_0000 | URW | PTE_PS | (0x5 << 13));
        let t = walk(&mut m, &regs32(0, CR4_PSE), &[0; 4], l, Access::Read, false).unwrap();
        assert_eq!(t.phys_addr(l), 0x5_00c0_3123);
        // Bit 21 and bits 20:17 are reserved with MAXPHYADDR 36.
        for bit in [17, 20, 21] {
            w32(&mut m, PD + 4, 0x00c0_0000 | URW | PTE_PS | (1 << bit));
            assert_eq!(
                code(walk(
                    &mut m,
                    &regs32(0, CR4_PSE),
                    &[0; 4],
                    l,
                    Access::Write,
                    true
                )),
                PF_P | PF_RSVD | PF_W | PF_U,
                "bit {bit}"
            );
        }
        // Bit 12 (PAT) is not reserved.
        w32(&mut m, PD + 4, 0x00c0_0000 | URW | PTE_PS | (1 << 12));
        assert!(walk(&mut m, &regs32(0, CR4_PSE), &[0; 4], l, Access::Read, false).is_ok());
    }

    #[test]
    fn global_bit_needs_pge_and_final_entry() {
        let mut m = mem();
        map32(&mut m, URW | PTE_G, URW);
        let l = LIN;
        assert!(
            !walk(&mut m, &regs32(0, CR4_PGE), &[0; 4], l, Access::Read, false)
                .unwrap()
                .global,
            "G in a PDE that points to a table is ignored"
        );
        map32(&mut m, URW, URW | PTE_G);
        assert!(
            walk(&mut m, &regs32(0, CR4_PGE), &[0; 4], l, Access::Read, false)
                .unwrap()
                .global
        );
        assert!(
            !walk(&mut m, &regs32(0, 0), &[0; 4], l, Access::Read, false)
                .unwrap()
                .global
        );
    }

    /// PAE: PDPT at 0x3000, PD at 0x4000, PT at 0x6000; linear 0x0040_3123 uses
    /// PDPTE 0, PDE 2, PTE 3.
    fn pae_setup(m: &mut PhysMem, pte: u64) -> (PagingRegs, [u64; 4]) {
        w64(m, 0x3000, 0x4000 | PTE_P);
        w64(m, 0x4000 + 2 * 8, 0x6000 | URW);
        w64(m, 0x6000 + 3 * 8, pte);
        let r = PagingRegs {
            cr0: CR0_PE | CR0_PG,
            cr3: 0x3000,
            cr4: CR4_PAE,
            efer: EFER_NXE,
        };
        let p = load_pdptes(m, r.cr3);
        (r, p)
    }

    #[test]
    fn pae_walk_nx_and_i_bit() {
        let mut m = mem();
        let l = LIN | 0x123;
        let (r, p) = pae_setup(&mut m, PAGE | URW | PTE_XD);
        let t = walk(&mut m, &r, &p, l, Access::Write, true).unwrap();
        assert_eq!(t.phys_addr(l), PAGE | 0x123);
        assert!(!t.executable);
        assert_eq!(
            r64(&mut m, 0x6000 + 24),
            PAGE | URW | PTE_XD | PTE_A | PTE_D
        );
        assert_eq!(r64(&mut m, 0x4000 + 16), 0x6000 | URW | PTE_A);
        // Fetch from an XD page: protection fault with I.
        assert_eq!(
            code(walk(&mut m, &r, &p, l, Access::Fetch, true)),
            PF_P | PF_I | PF_U
        );
        assert_eq!(
            code(walk(&mut m, &r, &p, l, Access::Fetch, false)),
            PF_P | PF_I
        );
        // XD in the PDE forbids fetches too.
        w64(&mut m, 0x6000 + 24, PAGE | URW);
        w64(&mut m, 0x4000 + 16, 0x6000 | URW | PTE_XD);
        assert_eq!(
            code(walk(&mut m, &r, &p, l, Access::Fetch, false)),
            PF_P | PF_I
        );
        // Not-present fetch: I set with NXE ...
        w64(&mut m, 0x6000 + 24, 0);
        assert_eq!(code(walk(&mut m, &r, &p, l, Access::Fetch, false)), PF_I);
        // ... and clear without it; XD is then a reserved bit.
        let mut r2 = r;
        r2.efer = 0;
        assert_eq!(
            code(walk(&mut m, &r2, &p, l, Access::Fetch, false)),
            PF_RSVD | PF_P
        );
        w64(&mut m, 0x4000 + 16, 0x6000 | URW);
        assert_eq!(code(walk(&mut m, &r2, &p, l, Access::Fetch, false)), 0);
        w64(&mut m, 0x6000 + 24, PAGE | URW | PTE_XD);
        assert_eq!(
            code(walk(&mut m, &r2, &p, l, Access::Read, true)),
            PF_P | PF_RSVD | PF_U
        );
    }

    #[test]
    fn pae_reserved_bits_and_2mib_pages() {
        let mut m = mem();
        let l = LIN | 0x123;
        let (r, p) = pae_setup(&mut m, PAGE | URW);
        // Physical bits at or above MAXPHYADDR are reserved in the PTE and the PDE.
        w64(&mut m, 0x6000 + 24, PAGE | URW | (1 << MAXPHYADDR));
        assert_eq!(
            code(walk(&mut m, &r, &p, l, Access::Write, false)),
            PF_P | PF_RSVD | PF_W
        );
        w64(&mut m, 0x6000 + 24, PAGE | URW | (1 << (MAXPHYADDR - 1)));
        let t = walk(&mut m, &r, &p, l, Access::Read, false).unwrap();
        assert_eq!(t.frame, PAGE | (1 << (MAXPHYADDR - 1)));
        w64(&mut m, 0x4000 + 16, 0x6000 | URW | (1 << 62));
        assert_eq!(
            code(walk(&mut m, &r, &p, l, Access::Read, false)),
            PF_P | PF_RSVD
        );
        // A 2 MiB page at 0x0060_0000 for PDE 2 (linear 0x0040_0000-0x005f_ffff).
        let pde = 0x0060_0000 | URW | PTE_PS;
        w64(&mut m, 0x4000 + 16, pde);
        let t = walk(&mut m, &r, &p, l, Access::Write, false).unwrap();
        assert_eq!(t.phys_addr(l), 0x0060_3123);
        assert!(t.large);
        assert_eq!(r64(&mut m, 0x4000 + 16), pde | PTE_A | PTE_D);
        // Bits 20:13 of a 2 MiB PDE are reserved; bit 12 (PAT) is not.
        w64(&mut m, 0x4000 + 16, pde | (1 << 13));
        assert_eq!(
            code(walk(&mut m, &r, &p, l, Access::Read, false)),
            PF_P | PF_RSVD
        );
        w64(&mut m, 0x4000 + 16, pde | (1 << 12));
        assert!(walk(&mut m, &r, &p, l, Access::Read, false).is_ok());
        // PDPTEs: reserved bits 2:1, 8:5, 63:MAXPHYADDR; a not-present one faults.
        for bit in [1, 2, 5, 8, MAXPHYADDR as u64, 63] {
            assert!(
                !pdptes_ok(&[0x4000 | PTE_P | (1 << bit), 0, 0, 0]),
                "bit {bit}"
            );
        }
        assert!(pdptes_ok(&[0x4000 | PTE_P | 0b11000, 1 << 2, 0, 0]));
        let bad = [0x4000 | PTE_P | (1 << 5), 0, 0, 0];
        assert_eq!(
            code(walk(&mut m, &r, &bad, l, Access::Read, false)),
            PF_P | PF_RSVD
        );
        assert_eq!(code(walk(&mut m, &r, &[0; 4], l, Access::Read, false)), 0);
    }
}
