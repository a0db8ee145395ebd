//! morph86-mmu: the guest-physical memory map, page walks and the software TLB.
//!
//! The CPU reaches memory only through [`Mmu`]: it hands over a *linear* address, the
//! kind of access and whether the access is made with user privilege, and gets bytes
//! back or a [`PageFault`] carrying the exact error code and faulting address. Paging
//! state (CR0, CR3, CR4, EFER) is pushed in with [`Mmu::set_paging_regs`], which also
//! performs the TLB flushes the architecture requires for each change.
//!
//! The typed accessors ([`Mmu::read_u32`], [`Mmu::write_u16`], ...) are the fast path:
//! a TLB hit is a tag compare, an add and an unaligned host load or store. Everything
//! else (TLB miss, page walk, MMIO, ROM, code pages, page-crossing accesses) goes to
//! the slow path, which has the same result.
#![deny(missing_docs)]

pub mod bus;
pub mod dirty;
pub mod paging;
pub mod phys;
pub mod tlb;
pub mod writelog;

pub use bus::{BusDevice, IoBus, NullIo};
pub use dirty::{DirtySink, WatchedMem};
pub use paging::{PageFault, PagingRegs, Translation};
pub use phys::{PhysError, PhysKind, PhysMem, PAGE_SIZE};
pub use tlb::{Tlb, TlbEntry};
pub use writelog::{LoggedWrite, WriteLog};

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

/// Linear addresses are 32 bits wide (no long mode yet).
const LIN_MASK: u64 = 0xffff_ffff;

/// The guest's memory as the CPU sees it: physical map plus paging and TLB.
///
/// Soundness of the fast path: TLB entries hold host addresses inside the RAM mapping
/// of `phys`. They are used only while the TLB's recorded epoch equals
/// [`PhysMem::epoch`], which is unique to one live map and changes whenever the map
/// changes meaning; so even replacing `phys` wholesale cannot make the TLB point into
/// freed or foreign memory.
pub struct Mmu {
    /// The physical memory map.
    pub phys: PhysMem,
    /// The software TLB.
    pub tlb: Tlb,
    regs: PagingRegs,
    /// PAE PDPTEs loaded at the last CR3 write (see the paging module).
    pdptes: [u64; 4],
    /// Write log of the JIT's lock-step checker (see the writelog module).
    wlog: Option<Box<WriteLog>>,
}

macro_rules! typed_access {
    ($read:ident, $write:ident, $t:ty, $n:literal, $what:literal) => {
        #[doc = concat!("Reads ", $what, " (little-endian) at `linear`.")]
        #[inline]
        pub fn $read(&mut self, linear: u64, user: bool) -> Result<$t, PageFault> {
            if let Some(p) = self.host_ptr(linear, $n, false, user) {
                // SAFETY: `host_ptr` returned a pointer to as many bytes as the value
                // has, inside one RAM page of the live mapping (see `host_ptr`); the
                // read is unaligned-safe.
                return Ok(unsafe { p.cast::<$t>().read_unaligned() });
            }
            let mut b = [0u8; $n];
            self.read_slow(linear, &mut b, Access::Read, user)?;
            Ok(<$t>::from_le_bytes(b))
        }

        #[doc = concat!("Writes ", $what, " (little-endian) at `linear`.")]
        #[inline]
        pub fn $write(&mut self, linear: u64, v: $t, user: bool) -> Result<(), PageFault> {
            if let Some(p) = self.host_ptr(linear, $n, true, user) {
                // SAFETY: as for reads; a write tag without TAG_SLOW exists only for
                // RAM pages not holding code, so no code tracking is bypassed.
                unsafe { p.cast::<$t>().write_unaligned(v) };
                return Ok(());
            }
            self.write_slow(linear, &v.to_le_bytes(), user)
        }
    };
}

impl Mmu {
    /// An MMU over `phys`, paging off.
    pub fn new(phys: PhysMem) -> Self {
        Mmu {
            phys,
            tlb: Tlb::new(),
            regs: PagingRegs::default(),
            pdptes: [0; 4],
            wlog: None,
        }
    }

    /// Starts recording every write (and noting device accesses) in `log`, which is
    /// cleared first. While a log is installed all writes take the slow path.
    pub fn start_write_log(&mut self, mut log: Box<WriteLog>) {
        log.clear();
        self.wlog = Some(log);
    }

    /// Stops recording and returns the log, if one was installed.
    pub fn stop_write_log(&mut self) -> Option<Box<WriteLog>> {
        self.wlog.take()
    }

    /// The write log being recorded, if any.
    pub fn write_log(&self) -> Option<&WriteLog> {
        self.wlog.as_deref()
    }

    /// The paging registers in force.
    pub fn paging_regs(&self) -> PagingRegs {
        self.regs
    }

    /// The PAE PDPTEs loaded at the last CR3 write.
    pub fn pdptes(&self) -> [u64; 4] {
        self.pdptes
    }

    /// Installs new paging registers after a write to CR0, CR3, CR4 or EFER (call it
    /// once per such write), flushing the TLB as the architecture requires:
    /// - a change of CR0.PG/PE/WP, CR4.PGE/PSE/PAE or EFER.NXE drops everything;
    /// - a new CR3 value drops the non-global entries; so does a call that changes
    ///   nothing at all, which is how a MOV to CR3 of the same value looks (guests flush
    ///   their TLB that way);
    /// - other changes (CR0.TS, ...) keep the TLB.
    ///
    /// With PAE paging on afterwards, the PDPTEs are (re)loaded from the table at CR3 in
    /// the same cases. Before committing such a write the CPU should call
    /// [`Mmu::pdptes_valid`] and raise #GP(0) if it returns false.
    pub fn set_paging_regs(&mut self, new: PagingRegs) {
        let old = self.regs;
        self.regs = new;
        let mode_changed = old.paging_mode_bits() != new.paging_mode_bits();
        let cr3_write = old.cr3 != new.cr3 || old == new;
        if mode_changed {
            self.tlb.flush_all();
        } else if cr3_write {
            self.tlb.flush_nonglobal();
        }
        if new.pae() && (mode_changed || cr3_write) {
            self.pdptes = paging::load_pdptes(&mut self.phys, new.cr3);
        }
    }

    /// Whether `new` may be installed as far as PAE is concerned: false when `new`
    /// enables PAE paging and a present PDPTE of the table at `new.cr3` has reserved
    /// bits set (MOV to CR0/CR3/CR4 then raises #GP(0), SDM 4.4.1).
    pub fn pdptes_valid(&mut self, new: &PagingRegs) -> bool {
        !new.pae() || paging::pdptes_ok(&paging::load_pdptes(&mut self.phys, new.cr3))
    }

    /// Like a MOV to CR3 with the same value: drops the non-global entries (and
    /// reloads the PAE PDPTEs).
    pub fn flush_nonglobal(&mut self) {
        self.tlb.flush_nonglobal();
        if self.regs.pae() {
            self.pdptes = paging::load_pdptes(&mut self.phys, self.regs.cr3);
        }
    }

    /// Drops every TLB entry.
    pub fn flush_all(&mut self) {
        self.tlb.flush_all();
    }

    /// INVLPG: drops the entries for the page holding `linear`, global or not.
    pub fn invlpg(&mut self, linear: u64) {
        self.tlb.invlpg(linear & LIN_MASK);
    }

    /// Opens or closes the A20 gate (the TLB is flushed before its next use, since the
    /// gate changes translations).
    pub fn set_a20(&mut self, enabled: bool) {
        self.phys.set_a20(enabled);
        self.sync_tlb();
    }

    /// Marks the RAM page holding physical `addr` as holding code and, if the mark is
    /// new, makes every write to it take the slow path (so the write is reported by
    /// [`PhysMem::take_dirty_code`]). Returns whether the mark is new.
    pub fn mark_code(&mut self, addr: u64) -> bool {
        let new = self.phys.mark_code(addr);
        if new {
            self.protect_code_page(addr);
        }
        new
    }

    /// Drops the write permission the TLB caches for the physical page holding `addr`
    /// (call after [`PhysMem::mark_code`] returned true).
    pub fn protect_code_page(&mut self, addr: u64) {
        let frame = addr & self.phys.a20_mask() & !(PAGE_SIZE - 1);
        self.tlb.drop_write_phys(frame);
    }

    /// Brings the TLB in line with the physical map: if the map changed since the TLB
    /// was filled (A20 moved, ROM/MMIO added, map replaced), flushes it. Generated code
    /// that probes the TLB inline must be entered only after this.
    #[inline]
    pub fn sync_tlb(&mut self) {
        let epoch = self.phys.epoch();
        if self.tlb.epoch != epoch {
            // The entries belong to another map (or an older state of this one).
            self.tlb.flush_all();
            self.tlb.epoch = epoch;
        }
    }

    /// The host address for `size` bytes at `linear` if the TLB holds a fast entry for
    /// it (read or write tag per `write`) and the access stays within the page.
    ///
    /// The returned pointer is valid for `size` bytes: the tag matched the page of the
    /// last byte in the slot of the first byte's page, so both bytes are on the cached
    /// page; a fast tag exists only for plain RAM pages, whose host address was taken
    /// from `phys` under the epoch the TLB carries, which equals `phys`'s current epoch
    /// (so it is the same live mapping, which never moves).
    #[inline(always)]
    fn host_ptr(&self, linear: u64, size: u64, write: bool, user: bool) -> Option<*mut u8> {
        if write && self.wlog.is_some() {
            return None;
        }
        let e = self.tlb.entry(linear, user);
        let tag = if write { e.write } else { e.read };
        if tag == (linear.wrapping_add(size - 1) & tlb::PAGE_MASK)
            && self.tlb.epoch == self.phys.epoch()
        {
            Some(linear.wrapping_add(e.addend) as usize as *mut u8)
        } else {
            None
        }
    }

    /// Translates `linear` to a physical address for `acc` with user privilege `user`,
    /// walking the guest page tables (and setting A/D bits) on a TLB miss. The result
    /// has the A20 gate applied.
    #[inline]
    pub fn translate(&mut self, linear: u64, acc: Access, user: bool) -> Result<u64, PageFault> {
        let linear = linear & LIN_MASK;
        self.sync_tlb();
        if let Some(p) = self.tlb.lookup(linear, acc, user) {
            return Ok(p);
        }
        self.fill(linear, acc, user)
    }

    /// TLB miss: walk (or identity-map with paging off) and record the translation.
    #[cold]
    #[inline(never)]
    fn fill(&mut self, linear: u64, acc: Access, user: bool) -> Result<u64, PageFault> {
        self.tlb.stats.fills += 1;
        let mut t = if self.regs.paging() {
            paging::walk(&mut self.phys, &self.regs, &self.pdptes, linear, acc, user)?
        } else {
            Translation {
                frame: linear & 0xffff_f000,
                user: true,
                writable: true,
                executable: true,
                global: false,
                dirty: true,
                large: false,
            }
        };
        t.frame &= self.phys.a20_mask();
        let host = self.phys.ram_page_ptr(t.frame).map(|p| p as usize as u64);
        if host.is_none() && self.phys.has_watched() {
            if let Some((h, dirty)) = self.phys.watched_page(t.frame) {
                self.tlb.insert_watched(linear, user, &t, h, dirty);
                return Ok(t.phys_addr(linear));
            }
        }
        let code = self.phys.is_code(t.frame);
        self.tlb.insert(linear, user, &t, host, code);
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
        self.read_slow(linear, buf, acc, user)
    }

    #[inline(never)]
    fn read_slow(
        &mut self,
        linear: u64,
        buf: &mut [u8],
        acc: Access,
        user: bool,
    ) -> Result<(), PageFault> {
        let linear = linear & LIN_MASK;
        let in_page = (PAGE_SIZE - (linear & (PAGE_SIZE - 1))) as usize;
        if buf.len() <= in_page {
            let p = self.translate(linear, acc, user)?;
            self.log_read(p);
            self.phys.read(p, buf);
            return Ok(());
        }
        // Every page first: a fault must come before any (MMIO) read.
        self.check_span(linear, buf.len() as u64, acc, user)?;
        let mut done = 0;
        while done < buf.len() {
            let lin = linear.wrapping_add(done as u64) & LIN_MASK;
            let n = ((PAGE_SIZE - (lin & (PAGE_SIZE - 1))) as usize).min(buf.len() - done);
            let p = self.translate(lin, acc, user)?;
            self.log_read(p);
            self.phys.read(p, &mut buf[done..done + n]);
            done += n;
        }
        Ok(())
    }

    /// Writes `data` at `linear`; every page of a page-crossing write is checked first,
    /// so a fault leaves memory untouched.
    pub fn write(&mut self, linear: u64, data: &[u8], user: bool) -> Result<(), PageFault> {
        self.write_slow(linear, data, user)
    }

    #[inline(never)]
    fn write_slow(&mut self, linear: u64, data: &[u8], user: bool) -> Result<(), PageFault> {
        let linear = linear & LIN_MASK;
        let in_page = (PAGE_SIZE - (linear & (PAGE_SIZE - 1))) as usize;
        if data.len() <= in_page {
            let p = self.translate(linear, Access::Write, user)?;
            if let Some(log) = self.wlog.as_mut() {
                log.record(&mut self.phys, p, data);
            }
            self.phys.write(p, data);
            if self.phys.has_watched() {
                self.note_watched_write(linear, p, user);
            }
            return Ok(());
        }
        self.check_span(linear, data.len() as u64, Access::Write, user)?;
        let mut done = 0;
        while done < data.len() {
            let lin = linear.wrapping_add(done as u64) & LIN_MASK;
            let n = ((PAGE_SIZE - (lin & (PAGE_SIZE - 1))) as usize).min(data.len() - done);
            let p = self.translate(lin, Access::Write, user)?;
            if let Some(log) = self.wlog.as_mut() {
                log.record(&mut self.phys, p, &data[done..done + n]);
            }
            self.phys.write(p, &data[done..done + n]);
            done += n;
        }
        Ok(())
    }

    /// With a write log installed, notes a read that reaches a device window.
    #[inline]
    fn log_read(&mut self, p: u64) {
        if let Some(log) = self.wlog.as_mut() {
            if self.phys.kind(p) == PhysKind::Mmio {
                log.note_device();
            }
        }
    }

    /// After a slow-path write to physical `p` (from `linear`): if `p` is watched memory,
    /// now dirty, later writes to its page may take the fast path.
    #[cold]
    fn note_watched_write(&mut self, linear: u64, p: u64, user: bool) {
        if let Some((_, true)) = self.phys.watched_page(p) {
            self.tlb
                .unslow_write(linear & LIN_MASK, user, p & !(PAGE_SIZE - 1));
        }
    }

    /// Hands the pages of watched memory written since the last harvest to their sinks
    /// (see the dirty module), for every region whose consumer asked
    /// ([`WatchedMem::request`]) or for all when `force`, and makes the next write to
    /// each such page take the slow path again. Call it from the thread that runs the
    /// guest, between instructions (the run loop does after each batch, and with `force`
    /// before the CPU idles or stops).
    pub fn harvest_watched(&mut self, force: bool) {
        if !self.phys.has_watched() {
            return;
        }
        for (lo, hi) in self.phys.harvest_watched(force) {
            self.tlb.drop_write_range(lo, hi);
        }
    }

    /// Translates every page of `len` bytes at `linear`, in address order, for `acc`.
    fn check_span(
        &mut self,
        linear: u64,
        len: u64,
        acc: Access,
        user: bool,
    ) -> Result<(), PageFault> {
        if len == 0 {
            return Ok(());
        }
        let first = linear & !(PAGE_SIZE - 1);
        let last = (linear + len - 1) & !(PAGE_SIZE - 1);
        let mut page = first;
        loop {
            let lin = if page == first { linear } else { page };
            self.translate(lin & LIN_MASK, acc, user)?;
            if page == last {
                return Ok(());
            }
            page += PAGE_SIZE;
        }
    }

    /// Checks that `len` bytes at `linear` may be written, without writing (for
    /// instructions that must fault before changing anything).
    pub fn probe_write(&mut self, linear: u64, len: u64, user: bool) -> Result<(), PageFault> {
        self.check_span(linear & LIN_MASK, len, Access::Write, user)
    }

    typed_access!(read_u8, write_u8, u8, 1, "a byte");
    typed_access!(read_u16, write_u16, u16, 2, "a word");
    typed_access!(read_u32, write_u32, u32, 4, "a doubleword");
    typed_access!(read_u64, write_u64, u64, 8, "a quadword");
}

#[cfg(test)]
mod tests {
    //! TLB behaviour through the `Mmu` API. Expected values follow the SDM (TLB
    //! invalidation rules, vol. 3 section 4.10) and the page tables each test builds.
    use super::paging::*;
    use super::*;

    const PD: u64 = 0x1000;
    const PT: u64 = 0x2000;
    const URW: u64 = PTE_P | PTE_RW | PTE_US;

    fn mmu() -> Mmu {
        Mmu::new(PhysMem::new(16 << 20).unwrap())
    }
    fn w32(m: &mut Mmu, a: u64, v: u64) {
        m.phys.write(a, &(v as u32).to_le_bytes());
    }
    fn r32(m: &mut Mmu, a: u64) -> u64 {
        let mut b = [0u8; 4];
        m.phys.read(a, &mut b);
        u32::from_le_bytes(b) as u64
    }
    /// 32-bit paging with PD at 0x1000 and one page table at 0x2000 covering linear
    /// 0x0040_0000-0x007f_ffff. `map(m, n, frame, bits)` sets PTE n.
    fn paged(m: &mut Mmu, cr0_extra: u64, cr4: u64) {
        w32(m, PD + 4, PT | URW);
        m.set_paging_regs(PagingRegs {
            cr0: CR0_PE | CR0_PG | cr0_extra,
            cr3: PD,
            cr4,
            efer: 0,
        });
    }
    fn map(m: &mut Mmu, n: u64, frame: u64, bits: u64) {
        w32(m, PT + n * 4, frame | bits);
    }
    fn lin(n: u64) -> u64 {
        0x0040_0000 + n * 0x1000
    }

    #[test]
    fn unpaged_accesses_are_identity_and_hit_the_tlb() {
        let mut m = mmu();
        m.write_u32(0x1234, 0xdead_beef, false).unwrap();
        assert_eq!(r32(&mut m, 0x1234), 0xdead_beef);
        let fills = m.tlb.stats.fills;
        assert_eq!(m.read_u32(0x1234, false).unwrap(), 0xdead_beef);
        assert_eq!(m.read_u16(0x1ffe, false).unwrap(), 0);
        m.write_u64(0x1ff0, 0x0102_0304_0506_0708, false).unwrap();
        assert_eq!(m.read_u8(0x1ff7, false).unwrap(), 1);
        assert_eq!(m.tlb.stats.fills, fills, "same page: no new fill");
        // A page-crossing access is split and still right.
        m.write_u32(0x2ffe, 0xaabb_ccdd, false).unwrap();
        assert_eq!(r32(&mut m, 0x2ffe), 0xaabb_ccdd);
        assert_eq!(m.read_u32(0x2ffe, false).unwrap(), 0xaabb_ccdd);
        // 32-bit wrap of the linear address.
        m.write_u8(0, 0x5a, false).unwrap();
        m.write_u8(0xffff_ffff, 0xff, false).unwrap();
        assert_eq!(m.read_u16(0xffff_ffff, false).unwrap(), 0x5aff);
    }

    #[test]
    fn paged_reads_and_writes_reach_the_mapped_frames() {
        let mut m = mmu();
        paged(&mut m, CR0_WP, 0);
        // Two adjacent linear pages mapped to frames in the other order.
        map(&mut m, 0, 0x9000, URW);
        map(&mut m, 1, 0x8000, URW);
        m.write_u32(lin(0) + 0xffe, 0x4433_2211, true).unwrap();
        assert_eq!(r32(&mut m, 0x9ffc) >> 16, 0x2211);
        assert_eq!(r32(&mut m, 0x8000) & 0xffff, 0x4433);
        assert_eq!(m.read_u32(lin(0) + 0xffe, false).unwrap(), 0x4433_2211);
        assert_eq!(m.translate(lin(1) + 5, Access::Read, true), Ok(0x8005));
        assert_eq!(r32(&mut m, PT) & (PTE_A | PTE_D), PTE_A | PTE_D);
    }

    #[test]
    fn write_after_cached_read_sets_dirty() {
        let mut m = mmu();
        paged(&mut m, 0, 0);
        map(&mut m, 0, 0x9000, URW);
        m.read_u32(lin(0), false).unwrap();
        assert_eq!(r32(&mut m, PT) & (PTE_A | PTE_D), PTE_A);
        m.write_u32(lin(0), 7, false).unwrap();
        assert_eq!(r32(&mut m, PT) & (PTE_A | PTE_D), PTE_A | PTE_D);
        // Once dirty, a read walk may cache write permission: the write needs no walk.
        map(&mut m, 2, 0xa000, URW | PTE_A | PTE_D);
        m.read_u8(lin(2), false).unwrap();
        let fills = m.tlb.stats.fills;
        m.write_u8(lin(2), 1, false).unwrap();
        assert_eq!(m.tlb.stats.fills, fills);
    }

    #[test]
    fn faults_carry_cr2_and_codes_through_the_tlb() {
        let mut m = mmu();
        paged(&mut m, CR0_WP, 0);
        map(&mut m, 0, 0x9000, PTE_P | PTE_RW); // supervisor only
        map(&mut m, 1, 0xa000, PTE_P | PTE_US); // read-only
                                                // The supervisor set caches page 0; the user set must still fault.
        m.write_u32(lin(0) + 8, 1, false).unwrap();
        let f = m.read_u32(lin(0) + 8, true).unwrap_err();
        assert_eq!((f.linear, f.error_code), (lin(0) + 8, PF_P | PF_U));
        m.read_u8(lin(1), true).unwrap();
        let f = m.write_u8(lin(1) + 3, 9, true).unwrap_err();
        assert_eq!((f.linear, f.error_code), (lin(1) + 3, PF_P | PF_W | PF_U));
        let f = m.write_u16(lin(1) + 3, 9, false).unwrap_err();
        assert_eq!(f.error_code, PF_P | PF_W, "WP=1");
        let f = m.read_u8(lin(5), false).unwrap_err();
        assert_eq!((f.linear, f.error_code), (lin(5), 0));
    }

    #[test]
    fn page_crossing_write_faults_on_second_page_without_writing_first() {
        let mut m = mmu();
        paged(&mut m, 0, 0);
        map(&mut m, 0, 0x9000, URW);
        m.phys.write(0x9ffc, &[1, 2, 3, 4]);
        let f = m.write_u32(lin(0) + 0xffe, 0xffff_ffff, false).unwrap_err();
        assert_eq!((f.linear, f.error_code), (lin(1), PF_W));
        assert_eq!(r32(&mut m, 0x9ffc), 0x0403_0201);
        let f = m.read_u64(lin(0) + 0xffc, true).unwrap_err();
        assert_eq!((f.linear, f.error_code), (lin(1), PF_U));
        let f = m.probe_write(lin(0) + 0xfff, 2, false).unwrap_err();
        assert_eq!(f.linear, lin(1));
    }

    #[test]
    fn long_spans_translate_every_page() {
        let mut m = mmu();
        paged(&mut m, 0, 0);
        // Three linear pages on scattered frames; the third not present at first.
        map(&mut m, 0, 0x9000, URW);
        map(&mut m, 1, 0xc000, URW);
        let data: Vec<u8> = (0..8000u32).map(|i| (i % 251) as u8).collect();
        let f = m.write(lin(0) + 0xc00, &data, false).unwrap_err();
        assert_eq!((f.linear, f.error_code), (lin(2), PF_W));
        assert_eq!(r32(&mut m, 0x9c00), 0, "nothing written");
        map(&mut m, 2, 0xa000, URW);
        m.write(lin(0) + 0xc00, &data, false).unwrap();
        let mut back = vec![0u8; 8000];
        m.read(lin(0) + 0xc00, &mut back, Access::Read, false)
            .unwrap();
        assert_eq!(back, data);
        let mut b = [0u8; 1];
        m.phys.read(0xc000, &mut b);
        assert_eq!(b[0], data[0x400], "second page at frame 0xc000");
        m.phys.read(0xa000, &mut b);
        assert_eq!(b[0], data[0x1400], "third page at frame 0xa000");
    }

    #[test]
    fn global_entries_survive_cr3_writes_but_not_pge_changes() {
        let mut m = mmu();
        paged(&mut m, 0, CR4_PGE);
        map(&mut m, 0, 0x9000, URW | PTE_G);
        map(&mut m, 1, 0xa000, URW);
        m.phys.write(0x9000, &[0x11]);
        m.phys.write(0xa000, &[0x22]);
        m.phys.write(0xb000, &[0x33]);
        assert_eq!(m.read_u8(lin(0), false).unwrap(), 0x11);
        assert_eq!(m.read_u8(lin(1), false).unwrap(), 0x22);
        // Repoint both PTEs without telling the TLB: stale until flushed.
        map(&mut m, 0, 0xb000, URW | PTE_G);
        map(&mut m, 1, 0xb000, URW);
        assert_eq!(m.read_u8(lin(1), false).unwrap(), 0x22);
        // MOV CR3 (same value): the non-global entry goes, the global one stays.
        let r = m.paging_regs();
        m.set_paging_regs(r);
        assert_eq!(m.read_u8(lin(1), false).unwrap(), 0x33);
        assert_eq!(m.read_u8(lin(0), false).unwrap(), 0x11);
        // A new CR3 (same tables copied elsewhere) keeps the global entry too.
        let mut pd = [0u8; 8];
        m.phys.read(PD, &mut pd);
        m.phys.write(0x7000, &pd);
        m.set_paging_regs(PagingRegs { cr3: 0x7000, ..r });
        assert_eq!(m.read_u8(lin(0), false).unwrap(), 0x11);
        // Clearing CR4.PGE flushes everything.
        m.set_paging_regs(PagingRegs {
            cr3: 0x7000,
            cr4: 0,
            ..r
        });
        assert_eq!(m.read_u8(lin(0), false).unwrap(), 0x33);
        // A change outside the mode bits (CR0.TS) keeps the TLB.
        assert_eq!(m.read_u8(lin(1), false).unwrap(), 0x33);
        map(&mut m, 1, 0x9000, URW);
        let r = m.paging_regs();
        m.set_paging_regs(PagingRegs {
            cr0: r.cr0 | 8,
            ..r
        });
        assert_eq!(m.read_u8(lin(1), false).unwrap(), 0x33);
    }

    #[test]
    fn invlpg_drops_one_page_or_a_whole_large_page() {
        let mut m = mmu();
        paged(&mut m, 0, CR4_PSE | CR4_PGE);
        map(&mut m, 0, 0x9000, URW | PTE_G);
        map(&mut m, 1, 0xa000, URW);
        m.phys.write(0x9000, &[0x11]);
        m.phys.write(0xa000, &[0x22]);
        m.phys.write(0xb000, &[0x33]);
        m.read_u8(lin(0), true).unwrap();
        m.read_u8(lin(1), false).unwrap();
        map(&mut m, 0, 0xb000, URW | PTE_G);
        map(&mut m, 1, 0xb000, URW);
        m.invlpg(lin(0) + 0x123);
        assert_eq!(
            m.read_u8(lin(0), true).unwrap(),
            0x33,
            "global entry dropped"
        );
        assert_eq!(m.read_u8(lin(1), false).unwrap(), 0x22, "other page kept");
        // 4 MiB page at linear 0x0080_0000 -> physical 0x0040_0000.
        w32(&mut m, PD + 8, 0x0040_0000 | URW | PTE_PS);
        m.phys.write(0x0040_0000, &[0x44]);
        m.phys.write(0x0041_0000, &[0x55]);
        m.phys.write(0x0081_0000, &[0x66]);
        assert_eq!(m.read_u8(0x0080_0000, false).unwrap(), 0x44);
        assert_eq!(m.read_u8(0x0081_0000, false).unwrap(), 0x55);
        w32(&mut m, PD + 8, 0x0080_0000 | URW | PTE_PS);
        m.invlpg(0x0080_0000);
        assert_eq!(
            m.read_u8(0x0081_0000, false).unwrap(),
            0x66,
            "every 4 KiB piece of the large page is dropped"
        );
    }

    #[test]
    fn wp_change_flushes() {
        let mut m = mmu();
        paged(&mut m, 0, 0);
        map(&mut m, 0, 0x9000, PTE_P | PTE_US | PTE_D | PTE_A);
        m.write_u8(lin(0), 1, false).unwrap();
        let r = m.paging_regs();
        m.set_paging_regs(PagingRegs {
            cr0: r.cr0 | CR0_WP,
            ..r
        });
        assert_eq!(
            m.write_u8(lin(0), 1, false).unwrap_err().error_code,
            PF_P | PF_W
        );
    }

    /// PAE: PDPT at 0x3000 -> PD at 0x4000 -> PT at 0x6000; linear 0x0040_0000 + n pages.
    fn pae(m: &mut Mmu, efer: u64) {
        m.phys.write(0x3000, &(0x4000 | PTE_P).to_le_bytes());
        m.phys.write(0x4000 + 16, &(0x6000 | URW).to_le_bytes());
        m.set_paging_regs(PagingRegs {
            cr0: CR0_PE | CR0_PG,
            cr3: 0x3000,
            cr4: CR4_PAE,
            efer,
        });
    }
    fn map_pae(m: &mut Mmu, n: u64, v: u64) {
        m.phys.write(0x6000 + n * 8, &v.to_le_bytes());
    }

    #[test]
    fn pae_nx_through_the_tlb_and_pdpte_loading() {
        let mut m = mmu();
        pae(&mut m, EFER_NXE);
        map_pae(&mut m, 0, 0x9000 | URW | PTE_XD);
        map_pae(&mut m, 1, 0xa000 | URW);
        m.write_u32(lin(0), 0x1234_5678, true).unwrap();
        assert_eq!(r32(&mut m, 0x9000), 0x1234_5678);
        let f = m.translate(lin(0) + 1, Access::Fetch, true).unwrap_err();
        assert_eq!((f.linear, f.error_code), (lin(0) + 1, PF_P | PF_I | PF_U));
        assert_eq!(m.translate(lin(1), Access::Fetch, false), Ok(0xa000));
        // Clearing NXE flushes; XD then is a reserved bit.
        let r = m.paging_regs();
        m.set_paging_regs(PagingRegs { efer: 0, ..r });
        let f = m.read_u8(lin(0), false).unwrap_err();
        assert_eq!(f.error_code, PF_P | PF_RSVD);
        // PDPTEs are loaded at the CR3 write: a later memory change is not seen ...
        m.phys.write(0x3000, &0u64.to_le_bytes());
        m.flush_all();
        assert_eq!(m.read_u8(lin(1), false), Ok(0));
        // ... until CR3 is written again.
        let r = m.paging_regs();
        m.set_paging_regs(r);
        assert_eq!(m.read_u8(lin(1), false).unwrap_err().error_code, 0);
        // Reserved PDPTE bits make the CR write invalid.
        m.phys
            .write(0x3008, &(0x4000 | PTE_P | 1 << 6).to_le_bytes());
        assert!(!m.pdptes_valid(&r));
        m.phys.write(0x3008, &(0x4000 | PTE_P).to_le_bytes());
        assert!(m.pdptes_valid(&r));
        assert!(m.pdptes_valid(&PagingRegs { cr4: 0, ..r }));
    }

    #[test]
    fn code_page_writes_are_reported_even_after_tlb_fill() {
        let mut m = mmu();
        paged(&mut m, 0, 0);
        map(&mut m, 0, 0x9000, URW);
        // Fill the write entry first, then mark the frame as code.
        m.write_u32(lin(0), 0, false).unwrap();
        assert!(m.mark_code(0x9000));
        m.write_u32(lin(0) + 8, 0x90, false).unwrap();
        assert_eq!(m.phys.take_dirty_code(), vec![0x9000]);
        // Marked before the fill: the fill itself must keep writes slow. (The PTE is
        // dirty by now, so the read fill also caches the write permission.)
        m.flush_all();
        assert!(m.mark_code(0x9000));
        m.read_u8(lin(0), true).unwrap();
        m.write_u8(lin(0) + 9, 0x90, true).unwrap();
        assert_eq!(m.phys.take_dirty_code(), vec![0x9000]);
        // PhysMem::mark_code + protect_code_page, as the decoder does it.
        assert!(m.phys.mark_code(0x9000));
        m.protect_code_page(0x9000);
        m.write_u16(lin(0) + 10, 0x90, true).unwrap();
        assert_eq!(m.phys.take_dirty_code(), vec![0x9000]);
        assert_eq!(m.read_u32(lin(0) + 8, false).unwrap(), 0x0090_9090);
    }

    struct Reg(u8);
    impl BusDevice for Reg {
        fn read(&mut self, _offset: u64, data: &mut [u8]) {
            data.fill(self.0);
        }
        fn write(&mut self, _offset: u64, data: &[u8]) {
            self.0 = data[0];
        }
    }

    #[test]
    fn map_changes_flush_the_tlb() {
        let mut m = mmu();
        // A20: the TLB entry for 0x10_0010 must not survive closing the gate, even
        // when the gate is moved on PhysMem directly.
        m.write_u8(0x10, 0xaa, false).unwrap();
        m.write_u8(0x10_0010, 0xbb, false).unwrap();
        assert_eq!(m.read_u8(0x10_0010, false).unwrap(), 0xbb);
        m.phys.set_a20(false);
        assert_eq!(m.read_u8(0x10_0010, false).unwrap(), 0xaa);
        assert_eq!(m.translate(0x10_0010, Access::Read, false), Ok(0x10));
        m.set_a20(true);
        assert_eq!(m.read_u8(0x10_0010, false).unwrap(), 0xbb);
        // MMIO added over a page the TLB holds as RAM.
        m.write_u8(0xa_0000, 1, false).unwrap();
        m.phys.add_mmio(0xa_0000, 0x1000, Box::new(Reg(0x77)));
        assert_eq!(m.read_u8(0xa_0000, false).unwrap(), 0x77);
        m.write_u8(0xa_0000, 0x99, false).unwrap();
        assert_eq!(m.read_u32(0xa_0000, false).unwrap(), 0x9999_9999);
        // A whole new map.
        m.phys = PhysMem::new(2 << 20).unwrap();
        assert_eq!(m.read_u8(0x10, false).unwrap(), 0);
    }

    /// Differential test: random page tables, random accesses and random (properly
    /// invalidated) table changes; every access through the TLB must give what a fresh
    /// page walk gives (the reference is `paging::walk`, which the TLB only caches).
    #[test]
    fn tlb_agrees_with_fresh_walks() {
        for seed in 1..=4u64 {
            random_run(seed, seed >= 3);
        }
    }

    fn random_run(seed: u64, pae: bool) {
        let mut rng = seed.wrapping_mul(0x9e37_79b9_7f4a_7c15) | 1;
        let mut next = move || {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            rng
        };
        let mut m = mmu();
        // Linear 0-8 MiB. 32-bit: PD at 0x1000, PTs at 0x2000/0x3000. PAE: PDPT at
        // 0x1000, one PD at 0x4000, PTs at 0x5000-0x8fff (2 MiB each).
        let tables = if pae { 4u64 } else { 2 };
        let entry_size = if pae { 8 } else { 4 };
        let pt_base = if pae { 0x5000 } else { 0x2000 };
        let per_pt = if pae { 512u64 } else { 1024 };
        let pd = if pae { 0x4000 } else { PD };
        let wide = |m: &mut Mmu, a: u64, v: u64| {
            if pae {
                m.phys.write(a, &v.to_le_bytes());
            } else {
                m.phys.write(a, &(v as u32).to_le_bytes());
            }
        };
        let rand_bits = |r: u64| -> u64 {
            let mut b = 0;
            if r & 15 != 0 {
                b |= PTE_P;
            }
            for (k, bit) in [PTE_RW, PTE_US, PTE_A, PTE_D, PTE_G].iter().enumerate() {
                if (r >> (8 + k)) & 1 != 0 {
                    b |= bit;
                }
            }
            if pae && (r >> 20) & 3 == 0 {
                b |= PTE_XD;
            }
            if pae && (r >> 22) & 31 == 0 {
                b |= 1 << 40; // reserved (MAXPHYADDR 36)
            }
            b
        };
        let pde_value = |t: u64, r: u64| -> u64 {
            if r & 7 == 0 {
                // A large page somewhere in 1-16 MiB, aligned to its size.
                let size = if pae { 0x20_0000 } else { 0x40_0000 };
                let frame = (0x10_0000 + (r >> 8) % 0xf0_0000) & !(size - 1);
                let rsvd = if !pae && (r >> 4) & 3 == 0 {
                    1 << 21
                } else {
                    0
                };
                frame.max(size) | PTE_PS | rand_bits(r >> 24) | PTE_P | rsvd
            } else if r % 8 == 1 {
                0
            } else {
                (pt_base + t * 0x1000) | rand_bits(r >> 24) | PTE_P
            }
        };
        for t in 0..tables {
            for n in 0..per_pt {
                let v = (0x10_0000 + (next() % 0x100) * 0x1000) | rand_bits(next());
                wide(&mut m, pt_base + t * 0x1000 + n * entry_size, v);
            }
            let v = pde_value(t, next());
            wide(&mut m, pd + t * entry_size, v);
        }
        let mut regs = PagingRegs {
            cr0: CR0_PE | CR0_PG | CR0_WP,
            cr3: if pae { 0x1000 } else { PD },
            cr4: CR4_PSE | CR4_PGE | if pae { CR4_PAE } else { 0 },
            efer: if pae { EFER_NXE } else { 0 },
        };
        if pae {
            m.phys.write(0x1000, &(0x4000 | PTE_P).to_le_bytes());
        }
        m.set_paging_regs(regs);
        let span = tables * per_pt * 0x1000;
        // Distinct contents in every frame the tables point at, so a stale translation
        // reads something else.
        for (i, b) in m.phys.ram_mut()[0x10_0000..0x100_0000]
            .iter_mut()
            .enumerate()
        {
            *b = (i as u64).wrapping_mul(0x9e37_79b9) as u8 ^ (i >> 12) as u8;
        }
        // The final paging entry for `l`, read without side effects.
        let leaf = |m: &mut Mmu, l: u64, cr4: u64| -> u64 {
            let mut rd = |a: u64| -> u64 {
                let mut b = [0u8; 8];
                m.phys.read(a, &mut b[..entry_size as usize]);
                u64::from_le_bytes(b)
            };
            if pae {
                let pde = rd(pd + ((l >> 21) & 0x1ff) * 8);
                if pde & PTE_PS != 0 {
                    return pde;
                }
                rd((pde & 0xf_ffff_f000) + ((l >> 12) & 0x1ff) * 8)
            } else {
                let pde = rd(pd + ((l >> 22) & 0x3ff) * 4);
                if pde & PTE_PS != 0 && cr4 & CR4_PSE != 0 {
                    return pde;
                }
                rd((pde & 0xffff_f000) + ((l >> 12) & 0x3ff) * 4)
            }
        };
        // Most accesses go to a few hot pages, so stale entries would be hit.
        let hot: Vec<u64> = (0..24).map(|_| (next() % span) & !0xfff).collect();
        for step in 0..30_000 {
            let r = next();
            let user = r & 1 != 0;
            let size = [1u64, 2, 4, 8][((r >> 1) & 3) as usize];
            let base = if (r >> 50) & 7 != 0 {
                hot[((r >> 53) % 24) as usize] | ((r >> 5) & 0xfff)
            } else {
                (r >> 5) % span
            };
            let lin = if (r >> 3) & 3 == 0 {
                // Near a page end, to cross pages often.
                (base | 0xff8) % span
            } else {
                base
            };
            let op = (r >> 40) % 100;
            let ctx =
                format!("seed {seed} step {step} op {op} lin {lin:#x} size {size} user {user}");
            if op < 70 {
                let acc = if op < 40 { Access::Read } else { Access::Write };
                let val = next() & (u64::MAX >> (64 - 8 * size));
                let got = if acc == Access::Read {
                    match size {
                        1 => m.read_u8(lin, user).map(u64::from),
                        2 => m.read_u16(lin, user).map(u64::from),
                        4 => m.read_u32(lin, user).map(u64::from),
                        _ => m.read_u64(lin, user),
                    }
                } else {
                    match size {
                        1 => m.write_u8(lin, val as u8, user),
                        2 => m.write_u16(lin, val as u16, user),
                        4 => m.write_u32(lin, val as u32, user),
                        _ => m.write_u64(lin, val, user),
                    }
                    .map(|()| val)
                };
                // The TLB path must have set A (and D for a write) in the final entry of
                // every page it touched; checked before the reference walk sets them.
                if got.is_ok() {
                    let mut done = 0;
                    while done < size {
                        let l = (lin + done) & LIN_MASK;
                        let e = leaf(&mut m, l, regs.cr4);
                        assert_ne!(e & PTE_A, 0, "{ctx}: A not set for {l:#x}");
                        if acc == Access::Write {
                            assert_ne!(e & PTE_D, 0, "{ctx}: D not set for {l:#x}");
                        }
                        done += (0x1000 - (l & 0xfff)).min(size - done);
                    }
                }
                // Reference: walk every page the access touches, in order.
                let mut expect: Result<Vec<(u64, u64)>, PageFault> = Ok(Vec::new());
                let mut done = 0;
                while done < size {
                    let l = (lin + done) & LIN_MASK;
                    let n = (0x1000 - (l & 0xfff)).min(size - done);
                    let pdptes = m.pdptes();
                    match paging::walk(&mut m.phys, &regs, &pdptes, l, acc, user) {
                        Ok(t) => {
                            if let Ok(v) = expect.as_mut() {
                                v.push((t.phys_addr(l), n));
                            }
                        }
                        Err(pf) => {
                            expect = Err(pf);
                            break;
                        }
                    }
                    done += n;
                }
                match (expect, got) {
                    (Err(e), Err(g)) => assert_eq!(e, g, "{ctx}"),
                    (Ok(pieces), Ok(g)) => {
                        let mut bytes = Vec::new();
                        for (pa, n) in pieces {
                            let mut b = vec![0u8; n as usize];
                            m.phys.read(pa, &mut b);
                            bytes.extend(b);
                        }
                        bytes.resize(8, 0);
                        let want = u64::from_le_bytes(bytes.try_into().unwrap());
                        assert_eq!(want, g, "{ctx}");
                    }
                    (e, g) => panic!("{ctx}: reference {e:?}, TLB path {g:?}"),
                }
            } else if op < 75 {
                let pdptes = m.pdptes();
                let e = paging::walk(&mut m.phys, &regs, &pdptes, lin, Access::Fetch, user)
                    .map(|t| t.phys_addr(lin));
                assert_eq!(m.translate(lin, Access::Fetch, user), e, "{ctx}");
            } else if op < 90 {
                // Change a PTE, then INVLPG its page.
                let v = (0x10_0000 + (next() % 0x100) * 0x1000) | rand_bits(next());
                let page = lin & !0xfff;
                let (t, n) = (page / (per_pt * 0x1000), (page >> 12) % per_pt);
                wide(&mut m, pt_base + t * 0x1000 + n * entry_size, v);
                m.invlpg(page);
            } else if op < 93 {
                // Change a PDE: no single INVLPG covers it, so flush everything.
                let t = (r >> 8) % tables;
                let v = pde_value(t, next());
                wide(&mut m, pd + t * entry_size, v);
                m.flush_all();
            } else if op < 97 {
                // MOV CR3, same value.
                m.set_paging_regs(regs);
            } else {
                // Toggle WP or PGE (or PSE in 32-bit mode).
                let bit = match (r >> 8) % 3 {
                    0 => {
                        regs.cr0 ^= CR0_WP;
                        m.set_paging_regs(regs);
                        continue;
                    }
                    1 => CR4_PGE,
                    _ if !pae => CR4_PSE,
                    _ => CR4_PGE,
                };
                regs.cr4 ^= bit;
                m.set_paging_regs(regs);
            }
        }
        assert!(m.tlb.stats.fills > 100);
    }

    #[test]
    fn tlb_entry_layout_is_what_generated_code_expects() {
        assert_eq!(std::mem::size_of::<TlbEntry>(), 32);
        assert_eq!(TlbEntry::OFFSET_READ, 0);
        assert_eq!(TlbEntry::OFFSET_WRITE, 8);
        assert_eq!(TlbEntry::OFFSET_FETCH, 16);
        assert_eq!(TlbEntry::OFFSET_ADDEND, 24);
        let mut m = mmu();
        m.write_u8(0x5003, 0x42, true).unwrap();
        // Probe the user set by hand as the JIT would.
        let base = m.tlb.entries_ptr();
        let idx = tlb::TLB_SIZE + ((0x5003 >> 12) & (tlb::TLB_SIZE - 1));
        // SAFETY: idx < 2 * TLB_SIZE, the length of the entry array.
        let e = unsafe { *base.add(idx) };
        assert_eq!(e.read, 0x5000);
        assert_eq!(e.write, 0x5000);
        let host = 0x5003u64.wrapping_add(e.addend) as usize as *const u8;
        // SAFETY: the tag matched, so host points into guest RAM page 0x5000.
        assert_eq!(unsafe { *host }, 0x42);
    }

    /// Micro-benchmark: ns per TLB-hit `read_u32`. Run with
    /// `cargo test --release -p morph86-mmu -- --ignored --nocapture tlb_hit_read`.
    #[test]
    #[ignore]
    fn tlb_hit_read_u32_bench() {
        let mut m = mmu();
        paged(&mut m, 0, 0);
        for n in 0..16 {
            map(&mut m, n, 0x10_0000 + n * 0x1000, URW);
        }
        let n = 50_000_000u64;
        let mut sum = 0u32;
        let t = std::time::Instant::now();
        for i in 0..n {
            let a = lin(0) + ((i * 0x44) & 0xfffc);
            sum = sum.wrapping_add(m.read_u32(std::hint::black_box(a), false).unwrap());
        }
        let el = t.elapsed();
        std::hint::black_box(sum);
        println!(
            "TLB-hit read_u32: {:.2} ns/read ({} fills)",
            el.as_nanos() as f64 / n as f64,
            m.tlb.stats.fills
        );
        // The scan made when a page is newly marked as code.
        let k = 100_000u64;
        let t = std::time::Instant::now();
        for i in 0..k {
            m.protect_code_page(std::hint::black_box(0x10_0000 + (i & 15) * 0x1000));
        }
        println!(
            "protect_code_page: {:.0} ns/call",
            t.elapsed().as_nanos() as f64 / k as f64
        );
        let t = std::time::Instant::now();
        for _ in 0..k {
            m.flush_nonglobal();
            m.read_u32(lin(0), false).unwrap();
        }
        println!(
            "flush_nonglobal + refill: {:.0} ns",
            t.elapsed().as_nanos() as f64 / k as f64
        );
    }
}
