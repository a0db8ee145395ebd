//! morph86-mmu: the guest-physical memory map, page walks and the software TLB.
//!
//! The CPU reaches memory only through [`Mmu`]: it hands over a *linear* address, the
//! kind of access and whether the access is made with user privilege, and gets bytes
//! back or a [`PageFault`] carrying the exact error code and faulting address. Paging
//! state (CR0, CR3, CR4, EFER) is pushed in with [`Mmu::set_paging_regs`], which also
//! performs the TLB flushes the architecture requires for each change.
#![deny(missing_docs)]

pub mod bus;
pub mod paging;
pub mod phys;
pub mod tlb;

pub use bus::{BusDevice, IoBus, NullIo};
pub use paging::{PageFault, PagingRegs};
pub use phys::{PhysError, PhysKind, PhysMem, PAGE_SIZE};
pub use tlb::Tlb;

/// The kind of a memory access, as far as paging cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Access {
    /// A data read.
    Read,
    /// A data write (also the read half of a read-modify-write).
    Write,
    /// An instruction fetch.
    Fetch,
}

/// The guest's memory as the CPU sees it: physical map plus paging and TLB.
pub struct Mmu {
    /// The physical memory map.
    pub phys: PhysMem,
    /// The software TLB.
    pub tlb: Tlb,
    regs: PagingRegs,
}

impl Mmu {
    /// An MMU over `phys`, paging off.
    pub fn new(phys: PhysMem) -> Self {
        Mmu {
            phys,
            tlb: Tlb::new(),
            regs: PagingRegs::default(),
        }
    }

    /// The paging registers in force.
    pub fn paging_regs(&self) -> PagingRegs {
        self.regs
    }

    /// Installs new paging registers, flushing the TLB as the architecture requires:
    /// a CR3 write drops non-global entries; a change of CR0.PG/WP or CR4.PGE/PSE/PAE,
    /// or of EFER.NXE, drops everything.
    pub fn set_paging_regs(&mut self, new: PagingRegs) {
        let old = self.regs;
        self.regs = new;
        if old.paging_mode_bits() != new.paging_mode_bits() {
            self.tlb.flush_all();
        } else if old.cr3 != new.cr3 {
            self.tlb.flush_nonglobal();
        }
    }

    /// Like a MOV to CR3 with the same value: drops the non-global entries.
    pub fn flush_nonglobal(&mut self) {
        self.tlb.flush_nonglobal();
    }

    /// Drops every TLB entry.
    pub fn flush_all(&mut self) {
        self.tlb.flush_all();
    }

    /// INVLPG: drops the entries for the page holding `linear`, global or not.
    pub fn invlpg(&mut self, linear: u64) {
        self.tlb.invlpg(linear);
    }

    /// Translates `linear` to a physical address for `acc` with user privilege `user`,
    /// walking the guest page tables (and setting A/D bits) on a TLB miss.
    pub fn translate(&mut self, linear: u64, acc: Access, user: bool) -> Result<u64, PageFault> {
        if !self.regs.paging() {
            return Ok(linear & 0xffff_ffff);
        }
        if let Some(p) = self.tlb.lookup(linear, acc, user) {
            return Ok(p);
        }
        let t = paging::walk(&mut self.phys, &self.regs, linear, acc, user)?;
        self.tlb.insert(linear, acc, user, &t);
        Ok(t.phys_addr(linear))
    }

    /// Reads `buf.len()` bytes at `linear`. A range that crosses a page is translated
    /// page by page, every page before any byte is read.
    pub fn read(
        &mut self,
        linear: u64,
        buf: &mut [u8],
        acc: Access,
        user: bool,
    ) -> Result<(), PageFault> {
        let len = buf.len() as u64;
        let first = self.translate(linear, acc, user)?;
        let in_page = PAGE_SIZE - (linear & (PAGE_SIZE - 1));
        if len <= in_page {
            self.phys.read(first, buf);
            return Ok(());
        }
        let second = self.translate(linear.wrapping_add(in_page) & self.lin_mask(), acc, user)?;
        let (a, b) = buf.split_at_mut(in_page as usize);
        self.phys.read(first, a);
        self.phys.read(second, b);
        Ok(())
    }

    /// Writes `data` at `linear`; both pages of a page-crossing write are checked first,
    /// so a fault leaves memory untouched.
    pub fn write(&mut self, linear: u64, data: &[u8], user: bool) -> Result<(), PageFault> {
        let len = data.len() as u64;
        let first = self.translate(linear, Access::Write, user)?;
        let in_page = PAGE_SIZE - (linear & (PAGE_SIZE - 1));
        if len <= in_page {
            self.phys.write(first, data);
            return Ok(());
        }
        let second = self.translate(
            linear.wrapping_add(in_page) & self.lin_mask(),
            Access::Write,
            user,
        )?;
        let (a, b) = data.split_at(in_page as usize);
        self.phys.write(first, a);
        self.phys.write(second, b);
        Ok(())
    }

    /// Checks that `len` bytes at `linear` may be written, without writing (for
    /// instructions that must fault before changing anything).
    pub fn probe_write(&mut self, linear: u64, len: u64, user: bool) -> Result<(), PageFault> {
        self.translate(linear, Access::Write, user)?;
        let in_page = PAGE_SIZE - (linear & (PAGE_SIZE - 1));
        if len > in_page {
            self.translate(
                linear.wrapping_add(in_page) & self.lin_mask(),
                Access::Write,
                user,
            )?;
        }
        Ok(())
    }

    #[inline]
    fn lin_mask(&self) -> u64 {
        0xffff_ffff
    }

    /// Reads a byte.
    #[inline]
    pub fn read_u8(&mut self, linear: u64, user: bool) -> Result<u8, PageFault> {
        let mut b = [0u8; 1];
        self.read(linear, &mut b, Access::Read, user)?;
        Ok(b[0])
    }
    /// Reads a little-endian word.
    #[inline]
    pub fn read_u16(&mut self, linear: u64, user: bool) -> Result<u16, PageFault> {
        let mut b = [0u8; 2];
        self.read(linear, &mut b, Access::Read, user)?;
        Ok(u16::from_le_bytes(b))
    }
    /// Reads a little-endian doubleword.
    #[inline]
    pub fn read_u32(&mut self, linear: u64, user: bool) -> Result<u32, PageFault> {
        let mut b = [0u8; 4];
        self.read(linear, &mut b, Access::Read, user)?;
        Ok(u32::from_le_bytes(b))
    }
    /// Reads a little-endian quadword.
    #[inline]
    pub fn read_u64(&mut self, linear: u64, user: bool) -> Result<u64, PageFault> {
        let mut b = [0u8; 8];
        self.read(linear, &mut b, Access::Read, user)?;
        Ok(u64::from_le_bytes(b))
    }
    /// Writes a byte.
    #[inline]
    pub fn write_u8(&mut self, linear: u64, v: u8, user: bool) -> Result<(), PageFault> {
        self.write(linear, &[v], user)
    }
    /// Writes a little-endian word.
    #[inline]
    pub fn write_u16(&mut self, linear: u64, v: u16, user: bool) -> Result<(), PageFault> {
        self.write(linear, &v.to_le_bytes(), user)
    }
    /// Writes a little-endian doubleword.
    #[inline]
    pub fn write_u32(&mut self, linear: u64, v: u32, user: bool) -> Result<(), PageFault> {
        self.write(linear, &v.to_le_bytes(), user)
    }
    /// Writes a little-endian quadword.
    #[inline]
    pub fn write_u64(&mut self, linear: u64, v: u64, user: bool) -> Result<(), PageFault> {
        self.write(linear, &v.to_le_bytes(), user)
    }
}
