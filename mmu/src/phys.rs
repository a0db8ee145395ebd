//! The guest-physical address space: RAM, ROM and MMIO regions, and the A20 gate.
//!
//! RAM is one anonymous mapping (`MAP_NORESERVE` via memmap2) so that a large `-m`
//! costs nothing until the guest touches it. ROM and MMIO regions sit on top of RAM
//! (an MMIO region hides the RAM below it, as the VGA window hides 0xA0000-0xBFFFF).
//! Reads from nothing return all ones (open bus), writes to nothing or to ROM vanish.
//!
//! Every RAM page also carries a "holds decoded or translated code" mark; a write to
//! a marked page clears the mark and queues the page on [`PhysMem::take_dirty_code`]
//! so the decode cache and the JIT can drop what they built from it.

use crate::bus::BusDevice;
use crate::dirty::{DirtySink, WatchedMem, WatchedRegion};
use memmap2::MmapMut;
use std::sync::atomic::{AtomicU32, AtomicU64, Ordering};
use std::sync::Arc;

/// Source of [`PhysMem::epoch`] values: unique across every map in the process, so a
/// TLB filled from one map can never mistake another map (or a changed one) for it.
static NEXT_EPOCH: AtomicU64 = AtomicU64::new(1);

fn next_epoch() -> u64 {
    NEXT_EPOCH.fetch_add(1, Ordering::Relaxed)
}

/// Size of a guest page.
pub const PAGE_SIZE: u64 = 4096;
/// Largest guest RAM we accept (the 32-bit physical space below the PCI hole, plus PAE headroom).
pub const MAX_RAM: u64 = 3584 << 20;

/// Why a physical memory map could not be built.
#[derive(Debug, thiserror::Error)]
pub enum PhysError {
    /// The requested RAM size is zero or larger than morph86 supports.
    #[error("guest RAM size {0} bytes is out of range (1 MiB to 3584 MiB)")]
    BadRamSize(u64),
    /// The host refused to reserve the guest RAM.
    #[error("cannot reserve {size} bytes of guest RAM: {source}")]
    Map {
        /// Requested size.
        size: u64,
        /// Host error.
        source: std::io::Error,
    },
}

struct RomRegion {
    base: u64,
    data: Vec<u8>,
}

struct MmioRegion {
    base: u64,
    len: u64,
    dev: Box<dyn BusDevice>,
}

/// Where a physical address lands.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum PhysKind {
    /// Ordinary RAM: direct host access allowed.
    Ram,
    /// Read-only memory: reads direct, writes ignored.
    Rom,
    /// A device register window: every access goes to the device.
    Mmio,
    /// Nothing: reads all ones, writes ignored.
    Unassigned,
}

/// The guest-physical memory map.
pub struct PhysMem {
    ram: MmapMut,
    ram_size: u64,
    roms: Vec<RomRegion>,
    mmio: Vec<MmioRegion>,
    /// Watched memory (see the dirty module); looked at before `mmio`.
    watched: Vec<WatchedRegion>,
    a20_mask: u64,
    code_pages: Vec<u8>,
    dirty_code: Vec<u64>,
    /// Number of MMIO / ROM / unassigned pages in the map below 4 GiB, precomputed per
    /// page for speed: `special[page] != 0` when the page is not plain RAM.
    special: Vec<u8>,
    /// Changes whenever a physical address may start to mean something else (new map,
    /// ROM or MMIO added, A20 gate moved); see [`PhysMem::epoch`].
    epoch: u64,
}

impl PhysMem {
    /// Builds a map with `ram_size` bytes of RAM at physical address 0.
    pub fn new(ram_size: u64) -> Result<Self, PhysError> {
        if !((1 << 20)..=MAX_RAM).contains(&ram_size) || ram_size & (PAGE_SIZE - 1) != 0 {
            return Err(PhysError::BadRamSize(ram_size));
        }
        let ram = memmap2::MmapOptions::new()
            .len(ram_size as usize)
            .map_anon()
            .map_err(|source| PhysError::Map {
                size: ram_size,
                source,
            })?;
        let pages = (ram_size / PAGE_SIZE) as usize;
        Ok(PhysMem {
            ram,
            ram_size,
            roms: Vec::new(),
            mmio: Vec::new(),
            watched: Vec::new(),
            a20_mask: !0,
            code_pages: vec![0; pages],
            dirty_code: Vec::new(),
            special: vec![0; pages],
            epoch: next_epoch(),
        })
    }

    /// Guest RAM size in bytes.
    pub fn ram_size(&self) -> u64 {
        self.ram_size
    }

    /// Maps a ROM image at `base` (page aligned). Writes to it are ignored.
    pub fn add_rom(&mut self, base: u64, data: Vec<u8>) {
        self.mark_special(base, data.len() as u64);
        self.roms.push(RomRegion { base, data });
    }

    /// Registers an MMIO device over `[base, base + len)`.
    pub fn add_mmio(&mut self, base: u64, len: u64, dev: Box<dyn BusDevice>) {
        self.mark_special(base, len);
        self.mmio.push(MmioRegion { base, len, dev });
    }

    /// Maps watched memory `mem` at `base` (page aligned), over whatever else is there:
    /// it reads and writes like RAM, and its written pages are handed to `sink` at each
    /// [`crate::Mmu::harvest_watched`] (see the dirty module).
    pub fn add_watched(&mut self, base: u64, mem: Arc<WatchedMem>, sink: Box<dyn DirtySink>) {
        let base = base & !(PAGE_SIZE - 1);
        self.mark_special(base, mem.len() as u64);
        self.watched.push(WatchedRegion::new(base, mem, sink));
    }

    /// Whether any watched memory is mapped.
    #[inline]
    pub fn has_watched(&self) -> bool {
        !self.watched.is_empty()
    }

    /// For the TLB: the host address of the watched page holding `addr` (after A20) and
    /// whether writes to it may go fast (the page is dirty and holds no code).
    pub(crate) fn watched_page(&self, addr: u64) -> Option<(u64, bool)> {
        let addr = addr & self.a20_mask & !(PAGE_SIZE - 1);
        let r = self.watched.iter().find(|r| r.contains(addr))?;
        let off = addr - r.base;
        Some((
            r.mem.as_ptr() as u64 + off,
            r.is_dirty(off) && !r.is_code(off),
        ))
    }

    /// Runs the harvest of every watched region (see [`crate::Mmu::harvest_watched`]);
    /// returns the physical ranges whose TLB write tags must be re-armed.
    pub(crate) fn harvest_watched(&mut self, force: bool) -> Vec<(u64, u64)> {
        let mut out = Vec::new();
        for r in self.watched.iter_mut() {
            if r.harvest(force) {
                out.push((r.base, r.base + r.len()));
            }
        }
        out
    }

    fn mark_special(&mut self, base: u64, len: u64) {
        self.epoch = next_epoch();
        let first = base / PAGE_SIZE;
        let last = (base.saturating_add(len).saturating_sub(1)) / PAGE_SIZE;
        for p in first..=last {
            if let Some(s) = self.special.get_mut(p as usize) {
                *s = 1;
            }
        }
    }

    /// Opens or closes the A20 gate. Closed, address bit 20 reads as zero (the 8086 wrap).
    /// Moving the gate changes the epoch, so every TLB over this map is flushed before
    /// its next use (translations and host pointers depend on the gate).
    pub fn set_a20(&mut self, enabled: bool) {
        let mask = if enabled { !0 } else { !(1 << 20) };
        if mask != self.a20_mask {
            self.a20_mask = mask;
            self.epoch = next_epoch();
        }
    }

    /// A number that changes whenever a physical address may change meaning: it is
    /// unique to this map and renewed when ROM or MMIO is added or the A20 gate moves.
    /// The TLB records the epoch it was filled under and uses no entry (in particular no
    /// host pointer) from another epoch, which keeps its host pointers sound even if the
    /// map is replaced wholesale.
    #[inline]
    pub fn epoch(&self) -> u64 {
        self.epoch
    }

    /// Whether the A20 gate is open.
    pub fn a20(&self) -> bool {
        self.a20_mask == !0
    }

    /// Applies the A20 gate to a physical address.
    #[inline]
    pub fn a20_mask(&self) -> u64 {
        self.a20_mask
    }

    /// What lives at physical address `addr` (after the A20 gate).
    pub fn kind(&self, addr: u64) -> PhysKind {
        let addr = addr & self.a20_mask;
        let page = (addr / PAGE_SIZE) as usize;
        if page < self.special.len() && self.special[page] == 0 {
            return PhysKind::Ram;
        }
        // Watched memory reads and writes like RAM (no side effects).
        if self.watched.iter().any(|r| r.contains(addr)) {
            return PhysKind::Ram;
        }
        if self
            .mmio
            .iter()
            .any(|r| addr >= r.base && addr - r.base < r.len)
        {
            return PhysKind::Mmio;
        }
        if self
            .roms
            .iter()
            .any(|r| addr >= r.base && addr - r.base < r.data.len() as u64)
        {
            return PhysKind::Rom;
        }
        if addr < self.ram_size {
            PhysKind::Ram
        } else {
            PhysKind::Unassigned
        }
    }

    /// Host pointer to the start of the RAM page holding `addr`, if that page is plain
    /// RAM (no ROM or MMIO over any part of it). The pointer stays valid for the life
    /// of this `PhysMem`: the mapping never moves.
    pub fn ram_page_ptr(&mut self, addr: u64) -> Option<*mut u8> {
        let addr = addr & self.a20_mask;
        let page = (addr / PAGE_SIZE) as usize;
        if page < self.special.len() && self.special[page] == 0 {
            // SAFETY: page < ram_size / PAGE_SIZE, so the offset is inside the mapping.
            Some(unsafe { self.ram.as_mut_ptr().add(page * PAGE_SIZE as usize) })
        } else {
            None
        }
    }

    /// Sets `bits` in the naturally aligned 4-byte (`wide == false`) or 8-byte paging
    /// entry at `addr` with a locked read-modify-write, as the CPU sets accessed and
    /// dirty bits, and returns the entry's new value. An entry outside plain RAM (ROM,
    /// MMIO, nothing) is read and written through the ordinary paths.
    pub fn atomic_or_entry(&mut self, addr: u64, bits: u64, wide: bool) -> u64 {
        let addr = addr & self.a20_mask;
        let size = if wide { 8 } else { 4 };
        let aligned = addr & (size - 1) == 0;
        match self.ram_page_ptr(addr) {
            Some(page) if aligned => {
                self.note_write(addr);
                let off = (addr % PAGE_SIZE) as usize;
                // SAFETY: `page` points to a whole 4 KiB RAM page inside the mapping,
                // `off + size <= PAGE_SIZE` because `off` is a multiple of `size`, and
                // the mapping is page aligned, so the pointer is aligned for the atomic
                // type. Nothing else accesses guest RAM non-atomically at the same time:
                // all RAM access goes through `&mut self` (or `&mut Mmu`).
                unsafe {
                    let p = page.add(off);
                    if wide {
                        AtomicU64::from_ptr(p.cast::<u64>()).fetch_or(bits, Ordering::SeqCst) | bits
                    } else {
                        (AtomicU32::from_ptr(p.cast::<u32>())
                            .fetch_or(bits as u32, Ordering::SeqCst)
                            | bits as u32) as u64
                    }
                }
            }
            _ => {
                let mut b = [0u8; 8];
                self.read(addr, &mut b[..size as usize]);
                let v = u64::from_le_bytes(b) | bits;
                self.write(addr, &v.to_le_bytes()[..size as usize]);
                v
            }
        }
    }

    /// The whole of RAM as a byte slice (for DMA, loaders and snapshots).
    pub fn ram(&self) -> &[u8] {
        &self.ram
    }

    /// The whole of RAM, writable. Writing through this bypasses code tracking:
    /// callers that may overwrite code (loaders before boot are fine) use [`PhysMem::write`].
    pub fn ram_mut(&mut self) -> &mut [u8] {
        &mut self.ram
    }

    /// Reads `data.len()` bytes at `addr`; the range may span regions.
    pub fn read(&mut self, addr: u64, data: &mut [u8]) {
        let mut done = 0;
        while done < data.len() {
            let a = (addr + done as u64) & self.a20_mask;
            let in_page = (PAGE_SIZE - (a % PAGE_SIZE)) as usize;
            let n = in_page.min(data.len() - done);
            self.read_in_page(a, &mut data[done..done + n]);
            done += n;
        }
    }

    /// Writes `data` at `addr`; the range may span regions.
    pub fn write(&mut self, addr: u64, data: &[u8]) {
        let mut done = 0;
        while done < data.len() {
            let a = (addr + done as u64) & self.a20_mask;
            let in_page = (PAGE_SIZE - (a % PAGE_SIZE)) as usize;
            let n = in_page.min(data.len() - done);
            self.write_in_page(a, &data[done..done + n]);
            done += n;
        }
    }

    fn read_in_page(&mut self, a: u64, data: &mut [u8]) {
        let page = (a / PAGE_SIZE) as usize;
        if page < self.special.len() && self.special[page] == 0 {
            let off = a as usize;
            data.copy_from_slice(&self.ram[off..off + data.len()]);
            return;
        }
        if let Some(r) = self.watched.iter().find(|r| r.contains(a)) {
            let off = (a - r.base) as usize;
            let n = (r.mem.len() - off).min(data.len());
            // SAFETY: `&mut self` on the guest's thread (the dirty module's contract);
            // no other view of the bytes is alive.
            let mem = unsafe { r.mem.bytes() };
            data[..n].copy_from_slice(&mem[off..off + n]);
            data[n..].fill(0xff);
            return;
        }
        for r in self.mmio.iter_mut() {
            if a >= r.base && a - r.base < r.len {
                // Split accesses that run off the end of the device window.
                let n = ((r.len - (a - r.base)) as usize).min(data.len());
                r.dev.read(a - r.base, &mut data[..n]);
                data[n..].fill(0xff);
                return;
            }
        }
        for r in self.roms.iter() {
            if a >= r.base && a - r.base < r.data.len() as u64 {
                for (i, b) in data.iter_mut().enumerate() {
                    let o = (a - r.base) as usize + i;
                    *b = r.data.get(o).copied().unwrap_or(0xff);
                }
                return;
            }
        }
        if a + data.len() as u64 <= self.ram_size {
            let off = a as usize;
            data.copy_from_slice(&self.ram[off..off + data.len()]);
        } else {
            data.fill(0xff);
        }
    }

    fn write_in_page(&mut self, a: u64, data: &[u8]) {
        let page = (a / PAGE_SIZE) as usize;
        if page < self.special.len() && self.special[page] == 0 {
            self.note_code_write(page);
            let off = a as usize;
            self.ram[off..off + data.len()].copy_from_slice(data);
            return;
        }
        if let Some(r) = self.watched.iter_mut().find(|r| r.contains(a)) {
            let off = (a - r.base) as usize;
            let n = (r.mem.len() - off).min(data.len());
            // SAFETY: as in `read_in_page`.
            let mem = unsafe { r.mem.bytes_mut() };
            mem[off..off + n].copy_from_slice(&data[..n]);
            r.mark(off as u64, n as u64);
            let base = r.base;
            for p in r.take_code(off as u64, n as u64) {
                self.dirty_code.push(base + p);
            }
            return;
        }
        for r in self.mmio.iter_mut() {
            if a >= r.base && a - r.base < r.len {
                let n = ((r.len - (a - r.base)) as usize).min(data.len());
                r.dev.write(a - r.base, &data[..n]);
                return;
            }
        }
        if self
            .roms
            .iter()
            .any(|r| a >= r.base && a - r.base < r.data.len() as u64)
        {
            return;
        }
        if a + data.len() as u64 <= self.ram_size {
            self.note_code_write(page);
            let off = a as usize;
            self.ram[off..off + data.len()].copy_from_slice(data);
        }
    }

    /// Marks the RAM page holding `addr` as holding code. Returns true if the mark is new
    /// (the caller must then drop any write permission the TLB caches for it).
    pub fn mark_code(&mut self, addr: u64) -> bool {
        let a = addr & self.a20_mask;
        if !self.watched.is_empty() {
            if let Some(r) = self.watched.iter_mut().find(|r| r.contains(a)) {
                return r.mark_code(a - r.base);
            }
        }
        let page = ((addr & self.a20_mask) / PAGE_SIZE) as usize;
        match self.code_pages.get_mut(page) {
            Some(c) if *c == 0 => {
                *c = 1;
                true
            }
            _ => false,
        }
    }

    /// Whether the RAM page holding `addr` is marked as holding code.
    #[inline]
    pub fn is_code(&self, addr: u64) -> bool {
        let a = addr & self.a20_mask;
        if !self.watched.is_empty() {
            if let Some(r) = self.watched.iter().find(|r| r.contains(a)) {
                return r.is_code(a - r.base);
            }
        }
        let page = ((addr & self.a20_mask) / PAGE_SIZE) as usize;
        self.code_pages.get(page).is_some_and(|c| *c != 0)
    }

    #[inline]
    fn note_code_write(&mut self, page: usize) {
        if let Some(c) = self.code_pages.get_mut(page) {
            if *c != 0 {
                *c = 0;
                self.dirty_code.push(page as u64 * PAGE_SIZE);
            }
        }
    }

    /// Records that the page at physical `addr` was written through a direct host pointer
    /// (the TLB fast path never does this for code pages, but DMA might).
    pub fn note_write(&mut self, addr: u64) {
        let page = ((addr & self.a20_mask) / PAGE_SIZE) as usize;
        self.note_code_write(page);
    }

    /// Takes the list of physical page addresses whose code was overwritten since the last call.
    pub fn take_dirty_code(&mut self) -> Vec<u64> {
        std::mem::take(&mut self.dirty_code)
    }

    /// Whether any code page was overwritten since the last [`PhysMem::take_dirty_code`].
    #[inline]
    pub fn has_dirty_code(&self) -> bool {
        !self.dirty_code.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    struct Regs(Vec<u8>);
    impl BusDevice for Regs {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            for (i, b) in data.iter_mut().enumerate() {
                *b = self.0.get(offset as usize + i).copied().unwrap_or(0xff);
            }
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            for (i, b) in data.iter().enumerate() {
                if let Some(x) = self.0.get_mut(offset as usize + i) {
                    *x = *b;
                }
            }
        }
    }

    #[test]
    fn ram_rom_mmio_and_open_bus() {
        let mut m = PhysMem::new(2 << 20).unwrap();
        m.write(0x1000, &[1, 2, 3, 4]);
        let mut b = [0u8; 4];
        m.read(0x1000, &mut b);
        assert_eq!(b, [1, 2, 3, 4]);
        m.add_rom(0xf0000, vec![0xaa; 0x10000]);
        m.write(0xf0000, &[0]);
        m.read(0xf0000, &mut b[..1]);
        assert_eq!(b[0], 0xaa);
        m.add_mmio(0xa0000, 0x10, Box::new(Regs(vec![0; 16])));
        m.write(0xa0004, &[9, 8]);
        m.read(0xa0004, &mut b[..2]);
        assert_eq!(&b[..2], &[9, 8]);
        m.read(0xa000f, &mut b[..2]);
        assert_eq!(b[1], 0xff, "past the end of the device window is open bus");
        m.read(0x30_0000, &mut b);
        assert_eq!(b, [0xff; 4], "above RAM is open bus");
        assert!(PhysMem::new(0).is_err());
    }

    #[test]
    fn a20_wraps_and_code_writes_are_reported() {
        let mut m = PhysMem::new(2 << 20).unwrap();
        m.write(0x10, &[7]);
        m.set_a20(false);
        let mut b = [0u8];
        m.read(0x10_0010, &mut b);
        assert_eq!(b[0], 7);
        m.set_a20(true);
        assert!(m.mark_code(0x2000));
        assert!(!m.mark_code(0x2fff));
        m.write(0x2004, &[1]);
        assert_eq!(m.take_dirty_code(), vec![0x2000]);
        assert!(!m.is_code(0x2000));
    }
}
