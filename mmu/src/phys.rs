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
//!
//! Chipset routing below 1 MiB (off until [`PhysMem::set_shadow`] is first called):
//! - shadow RAM: each 16 KiB granule of 0xC0000-0xFFFFF sends reads to RAM or to the
//!   ROM/PCI side and writes to RAM or nowhere ([`SHADOW_READ_RAM`], [`SHADOW_WRITE_RAM`];
//!   the i440FX PAM registers are turned into these by the PCI host bridge);
//! - SMRAM: [`PhysMem::set_smram_open`] shows the RAM under the VGA window
//!   0xA0000-0xBFFFF (i440FX SMRAM register D_OPEN with G_SMRAME).
//!
//! A change renews the epoch (the TLB and the JIT drop what they cached) and queues every
//! page whose reads now see other bytes on [`PhysMem::take_dirty_code`] (the decode cache
//! drops it too). Devices ask for such changes, and for DMA, through [`PhysJobs`]: the
//! CPU runs queued jobs right after the OUT instruction that queued them
//! ([`PhysMem::run_jobs`]), so the next instruction already sees the new map.

use crate::bus::BusDevice;
use crate::dirty::{DirtySink, WatchedMem, WatchedRegion};
use memmap2::MmapMut;
use std::sync::atomic::{AtomicBool, AtomicU32, AtomicU64, Ordering};
use std::sync::{Arc, Mutex};

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

/// Start of the shadowable BIOS area (option ROMs, then the system BIOS).
pub const SHADOW_BASE: u64 = 0xc_0000;
/// End (exclusive) of the shadowable area.
pub const SHADOW_END: u64 = 0x10_0000;
/// Size of one shadow granule (the i440FX PAM registers control 16 KiB ranges).
pub const SHADOW_GRANULE: u64 = 0x4000;
/// Number of granules in 0xC0000-0xFFFFF.
pub const SHADOW_GRANULES: usize = ((SHADOW_END - SHADOW_BASE) / SHADOW_GRANULE) as usize;
/// Shadow attribute bit 0 (PAM RE, "read enable"): reads go to RAM, not to the ROM/PCI side.
pub const SHADOW_READ_RAM: u8 = 0b01;
/// Shadow attribute bit 1 (PAM WE, "write enable"): writes go to RAM, not to the ROM/PCI side.
pub const SHADOW_WRITE_RAM: u8 = 0b10;
/// The VGA window that SMRAM can show RAM under.
const SMRAM_BASE: u64 = 0xa_0000;
/// End (exclusive) of that window.
const SMRAM_END: u64 = 0xc_0000;

/// Work a device asks of the physical map (a shadow-RAM switch, a DMA transfer). It runs
/// on the vCPU thread with the map to itself, before the guest's next instruction.
pub type PhysJob = Box<dyn FnOnce(&mut PhysMem) + Send>;

#[derive(Default)]
struct JobQueue {
    pending: AtomicBool,
    jobs: Mutex<Vec<PhysJob>>,
}

/// The queue of [`PhysJob`]s of one map ([`PhysMem::jobs`]); cheap to clone, usable from
/// any thread. Devices push; the CPU runs the queue after each OUT ([`PhysMem::run_jobs`]).
#[derive(Clone, Default)]
pub struct PhysJobs(Arc<JobQueue>);

impl PhysJobs {
    /// Queues `job` for the map.
    pub fn push(&self, job: PhysJob) {
        let mut q = self.0.jobs.lock().unwrap_or_else(|e| e.into_inner());
        q.push(job);
        self.0.pending.store(true, Ordering::Release);
    }

    fn take(&self) -> Vec<PhysJob> {
        let mut q = self.0.jobs.lock().unwrap_or_else(|e| e.into_inner());
        self.0.pending.store(false, Ordering::Release);
        std::mem::take(&mut *q)
    }
}

impl std::fmt::Debug for PhysJobs {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "PhysJobs(pending={})",
            self.0.pending.load(Ordering::Relaxed)
        )
    }
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
    /// Shadow attributes per granule of 0xC0000-0xFFFFF; `None`: no chipset routing
    /// (ROM and MMIO simply cover RAM, as before any [`PhysMem::set_shadow`]).
    shadow: Option<[u8; SHADOW_GRANULES]>,
    /// RAM shown under the VGA window (SMRAM open).
    smram_open: bool,
    /// Device requests (see [`PhysJobs`]).
    jobs: PhysJobs,
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
            shadow: None,
            smram_open: false,
            jobs: PhysJobs::default(),
        })
    }

    /// The job queue of this map, for devices that need it changed or need DMA.
    pub fn jobs(&self) -> PhysJobs {
        self.jobs.clone()
    }

    /// Runs the jobs devices queued (the CPU calls this after each OUT, the run loop
    /// after each batch). One atomic load when there is nothing to do.
    #[inline]
    pub fn run_jobs(&mut self) {
        if self.jobs.0.pending.load(Ordering::Acquire) {
            self.run_jobs_slow();
        }
    }

    #[cold]
    fn run_jobs_slow(&mut self) {
        // A job may queue more (bounded: each round takes what is there).
        for _ in 0..16 {
            let jobs = self.jobs.take();
            if jobs.is_empty() {
                return;
            }
            for j in jobs {
                j(self);
            }
        }
    }

    /// Sets the shadow attributes ([`SHADOW_READ_RAM`] | [`SHADOW_WRITE_RAM`]) of the 16
    /// granules of 0xC0000-0xFFFFF and turns chipset routing on. With neither bit, reads
    /// go to the ROM mapped there (open bus if none) and writes vanish.
    pub fn set_shadow(&mut self, attrs: [u8; SHADOW_GRANULES]) {
        let attrs = attrs.map(|a| a & (SHADOW_READ_RAM | SHADOW_WRITE_RAM));
        let old = self.shadow;
        if old == Some(attrs) {
            return;
        }
        self.shadow = Some(attrs);
        self.epoch = next_epoch();
        for g in 0..SHADOW_GRANULES {
            // Before routing was on, the granule read whatever covered RAM there.
            let read_changed = match old {
                Some(o) => (o[g] ^ attrs[g]) & SHADOW_READ_RAM != 0,
                None => true,
            };
            let base = SHADOW_BASE + g as u64 * SHADOW_GRANULE;
            for p in (base..base + SHADOW_GRANULE).step_by(PAGE_SIZE as usize) {
                let page = (p / PAGE_SIZE) as usize;
                if let Some(s) = self.special.get_mut(page) {
                    *s = u8::from(attrs[g] != SHADOW_READ_RAM | SHADOW_WRITE_RAM);
                }
                if read_changed {
                    self.dirty_code.push(p);
                }
            }
        }
    }

    /// The shadow attributes in force, if chipset routing is on.
    pub fn shadow(&self) -> Option<[u8; SHADOW_GRANULES]> {
        self.shadow
    }

    /// Shows (`true`) or hides the RAM under the VGA window 0xA0000-0xBFFFF.
    pub fn set_smram_open(&mut self, open: bool) {
        if open == self.smram_open {
            return;
        }
        self.smram_open = open;
        self.epoch = next_epoch();
        for p in (SMRAM_BASE..SMRAM_END).step_by(PAGE_SIZE as usize) {
            if let Some(s) = self.special.get_mut((p / PAGE_SIZE) as usize) {
                // The window is a device window when closed; keep it off the fast path
                // either way (RAM there is reached through the slow path).
                *s = 1;
            }
            self.dirty_code.push(p);
        }
    }

    /// Whether the RAM under the VGA window is shown.
    pub fn smram_open(&self) -> bool {
        self.smram_open
    }

    /// How the chipset routes `a` (after A20): `Some(true)` to RAM, `Some(false)` away
    /// from RAM to the ROM side (or nothing), `None` when it does not route `a`.
    #[inline]
    fn route(&self, a: u64, write: bool) -> Option<bool> {
        if (SHADOW_BASE..SHADOW_END).contains(&a) {
            let attrs = self.shadow.as_ref()?;
            let attr = attrs[((a - SHADOW_BASE) / SHADOW_GRANULE) as usize];
            let bit = if write {
                SHADOW_WRITE_RAM
            } else {
                SHADOW_READ_RAM
            };
            return Some(attr & bit != 0);
        }
        if self.smram_open && (SMRAM_BASE..SMRAM_END).contains(&a) {
            return Some(true);
        }
        None
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

    /// Moves the watched memory mapped at `from` to `to` (page aligned), as when the
    /// guest moves the BAR it lives behind. Returns whether a region was at `from`.
    /// The pages it leaves read what is under them again (RAM, a device window).
    pub fn move_watched(&mut self, from: u64, to: u64) -> bool {
        let to = to & !(PAGE_SIZE - 1);
        let Some(i) = self.watched.iter().position(|r| r.base == from) else {
            return false;
        };
        if from == to {
            return true;
        }
        let len = self.watched[i].len();
        // Code decoded from the region is dropped (it moves to other addresses).
        let r = &mut self.watched[i];
        for off in r.take_code(0, len) {
            self.dirty_code.push(from + off);
        }
        self.watched[i].base = to;
        for p in (from..from.saturating_add(len)).step_by(PAGE_SIZE as usize) {
            let page = (p / PAGE_SIZE) as usize;
            if page < self.special.len() {
                let covered = self.rom_at(p)
                    || self.mmio.iter().any(|r| p >= r.base && p - r.base < r.len)
                    || self.watched.iter().any(|r| r.contains(p));
                self.special[page] = u8::from(covered);
                self.dirty_code.push(p);
            }
        }
        // Renews the epoch too.
        self.mark_special(to, len);
        true
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
            if self.shadow.is_some() && (SHADOW_BASE..SHADOW_END).contains(&(p * PAGE_SIZE)) {
                // Shadow routing decides these pages, whatever is mapped under them.
                continue;
            }
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
        if let Some(read_ram) = self.route(addr, false) {
            let write_ram = self.route(addr, true) == Some(true);
            return match (read_ram, write_ram) {
                (true, true) => PhysKind::Ram,
                // Reads see fixed bytes (RAM nobody may write, or ROM): code can be
                // translated from them; writes change nothing visible.
                (true, false) => PhysKind::Rom,
                (false, _) if self.rom_at(addr) => PhysKind::Rom,
                (false, _) => PhysKind::Unassigned,
            };
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

    fn rom_at(&self, a: u64) -> bool {
        self.roms
            .iter()
            .any(|r| a >= r.base && a - r.base < r.data.len() as u64)
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
        if let Some(to_ram) = self.route(a, false) {
            // Below 1 MiB, so inside RAM (the map has at least 1 MiB).
            if to_ram && a + data.len() as u64 <= self.ram_size {
                let off = a as usize;
                data.copy_from_slice(&self.ram[off..off + data.len()]);
                return;
            }
            if !to_ram {
                self.read_rom(a, data);
                return;
            }
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
        if self.rom_at(a) {
            self.read_rom(a, data);
            return;
        }
        if a + data.len() as u64 <= self.ram_size {
            let off = a as usize;
            data.copy_from_slice(&self.ram[off..off + data.len()]);
        } else {
            data.fill(0xff);
        }
    }

    /// Reads the ROM at `a`; open bus (all ones) where none is mapped.
    fn read_rom(&self, a: u64, data: &mut [u8]) {
        match self
            .roms
            .iter()
            .find(|r| a >= r.base && a - r.base < r.data.len() as u64)
        {
            Some(r) => {
                for (i, b) in data.iter_mut().enumerate() {
                    let o = (a - r.base) as usize + i;
                    *b = r.data.get(o).copied().unwrap_or(0xff);
                }
            }
            None => data.fill(0xff),
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
        if let Some(to_ram) = self.route(a, true) {
            if to_ram && a + data.len() as u64 <= self.ram_size {
                // Reads may come from ROM here (write-only shadow): then the bytes
                // written are not the bytes code was decoded from, and the mark stays.
                if self.route(a, false) == Some(true) {
                    self.note_code_write(page);
                }
                let off = a as usize;
                self.ram[off..off + data.len()].copy_from_slice(data);
            }
            // Writes to the ROM side of the shadow area vanish.
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

    fn rd(m: &mut PhysMem, a: u64) -> u8 {
        let mut b = [0u8];
        m.read(a, &mut b);
        b[0]
    }

    /// i440FX datasheet 3.2.18 (PAM0-PAM6): with RE clear reads come from the ROM side,
    /// with WE clear writes do not reach DRAM; each 16 KiB granule on its own.
    #[test]
    fn shadow_ram_routes_reads_and_writes_per_granule() {
        let mut m = PhysMem::new(2 << 20).unwrap();
        // The BIOS alias at 0xE0000-0xFFFFF, as the firmware loader maps it.
        m.add_rom(0xe_0000, vec![0x5a; 0x2_0000]);
        m.write(0xf_0000, &[1]);
        assert_eq!(rd(&mut m, 0xf_0000), 0x5a, "before routing: ROM covers RAM");
        assert_eq!(m.kind(0xf_0000), PhysKind::Rom);
        // Power-on PAM (all zero): ROM side everywhere; nothing mapped at 0xC0000.
        m.set_shadow([0; SHADOW_GRANULES]);
        assert_eq!(
            rd(&mut m, 0xc_0000),
            0xff,
            "open bus under a disabled granule"
        );
        assert_eq!(m.kind(0xc_0000), PhysKind::Unassigned);
        m.write(0xc_0000, &[7]);
        assert_eq!(
            m.ram()[0xc_0000],
            0,
            "a write to the PCI side does not reach RAM"
        );
        // Granule 12 (0xF0000) write-only: read ROM, write RAM (the copy-onto-itself mode).
        let mut a = [0u8; SHADOW_GRANULES];
        a[12] = SHADOW_WRITE_RAM;
        m.set_shadow(a);
        m.write(0xf_0010, &[0x11, 0x22]);
        assert_eq!(rd(&mut m, 0xf_0010), 0x5a);
        assert_eq!(&m.ram()[0xf_0010..0xf_0012], &[0x11, 0x22]);
        assert_eq!(rd(&mut m, 0xf_4010), 0x5a, "granule 13 untouched");
        // Read and write RAM: a plain RAM page (host fast path allowed).
        a[12] = SHADOW_READ_RAM | SHADOW_WRITE_RAM;
        m.set_shadow(a);
        assert_eq!(rd(&mut m, 0xf_0011), 0x22);
        assert_eq!(m.kind(0xf_0000), PhysKind::Ram);
        assert!(m.ram_page_ptr(0xf_0000).is_some());
        assert!(m.ram_page_ptr(0xf_4000).is_none());
        // Read-only shadow: RAM reads, writes vanish.
        a[12] = SHADOW_READ_RAM;
        m.set_shadow(a);
        m.write(0xf_0011, &[0x99]);
        assert_eq!(rd(&mut m, 0xf_0011), 0x22);
        assert_eq!(m.kind(0xf_0000), PhysKind::Rom);
        assert!(m.ram_page_ptr(0xf_0000).is_none());
        // A page-crossing read across granules 11 (ROM side) and 12 (RAM).
        let mut b = [0u8; 2];
        m.read(0xe_ffff, &mut b);
        assert_eq!(b, [0x5a, 0x00]);
    }

    #[test]
    fn shadow_changes_renew_the_epoch_and_report_changed_pages() {
        let mut m = PhysMem::new(2 << 20).unwrap();
        let e0 = m.epoch();
        let mut a = [0u8; SHADOW_GRANULES];
        m.set_shadow(a);
        assert_ne!(m.epoch(), e0);
        assert_eq!(
            m.take_dirty_code().len(),
            64,
            "every page of 0xC0000-0xFFFFF"
        );
        let e1 = m.epoch();
        m.set_shadow(a);
        assert_eq!(m.epoch(), e1, "no change, no new epoch");
        // Only the write bit: reads see the same bytes, so no code is dropped.
        a[3] = SHADOW_WRITE_RAM;
        m.set_shadow(a);
        assert_ne!(m.epoch(), e1);
        assert!(m.take_dirty_code().is_empty());
        a[3] |= SHADOW_READ_RAM;
        m.set_shadow(a);
        assert_eq!(
            m.take_dirty_code(),
            vec![0xc_c000, 0xc_d000, 0xc_e000, 0xc_f000]
        );
        // Code in a RAM-backed shadow page: a write reports it as usual.
        assert!(m.mark_code(0xc_c000));
        m.write(0xc_c004, &[1]);
        assert_eq!(m.take_dirty_code(), vec![0xc_c000]);
    }

    struct Vga;
    impl BusDevice for Vga {
        fn read(&mut self, _offset: u64, data: &mut [u8]) {
            data.fill(0x77);
        }
        fn write(&mut self, _offset: u64, _data: &[u8]) {}
    }

    /// i440FX 3.2.23 (SMRAM): D_OPEN with G_SMRAME shows DRAM at 0xA0000-0xBFFFF.
    #[test]
    fn smram_open_shows_ram_under_the_vga_window() {
        let mut m = PhysMem::new(2 << 20).unwrap();
        m.add_mmio(0xa_0000, 0x2_0000, Box::new(Vga));
        assert_eq!(rd(&mut m, 0xb_8000), 0x77);
        m.set_smram_open(true);
        m.write(0xb_8000, &[3]);
        assert_eq!(rd(&mut m, 0xb_8000), 3);
        m.set_smram_open(false);
        assert_eq!(rd(&mut m, 0xb_8000), 0x77);
        assert_eq!(m.ram()[0xb_8000], 3);
    }

    #[test]
    fn jobs_run_once_on_the_map() {
        let mut m = PhysMem::new(2 << 20).unwrap();
        let q = m.jobs();
        m.run_jobs();
        q.push(Box::new(|m: &mut PhysMem| m.write(0x100, &[0xab])));
        let q2 = q.clone();
        q.push(Box::new(move |_m: &mut PhysMem| {
            q2.push(Box::new(|m: &mut PhysMem| m.write(0x101, &[0xcd])))
        }));
        assert_eq!(m.ram()[0x100], 0, "nothing runs before run_jobs");
        m.run_jobs();
        assert_eq!(&m.ram()[0x100..0x102], &[0xab, 0xcd]);
    }

    /// Through the MMU's TLB: a shadow switch must not leave a cached host pointer that
    /// writes RAM the chipset now protects, or reads ROM bytes that RAM now replaces.
    #[test]
    fn shadow_switches_reach_the_tlb() {
        let mut m = crate::Mmu::new(PhysMem::new(2 << 20).unwrap());
        m.phys.add_rom(0xe_0000, vec![0x5a; 0x2_0000]);
        let mut a = [0u8; SHADOW_GRANULES];
        m.phys.set_shadow(a);
        assert_eq!(m.read_u8(0xf_0000, false).unwrap(), 0x5a);
        a[12] = SHADOW_READ_RAM | SHADOW_WRITE_RAM;
        let q = m.phys.jobs();
        q.push(Box::new(move |p: &mut PhysMem| p.set_shadow(a)));
        m.phys.run_jobs();
        assert_eq!(m.read_u8(0xf_0000, false).unwrap(), 0, "RAM now");
        m.write_u8(0xf_0000, 0x77, false).unwrap();
        m.write_u8(0xf_0001, 0x78, false).unwrap(); // through the TLB's fast path
        assert_eq!(m.read_u16(0xf_0000, false).unwrap(), 0x7877);
        a[12] = SHADOW_READ_RAM;
        q.push(Box::new(move |p: &mut PhysMem| p.set_shadow(a)));
        m.phys.run_jobs();
        m.write_u8(0xf_0000, 0x11, false).unwrap();
        assert_eq!(
            m.read_u8(0xf_0000, false).unwrap(),
            0x77,
            "write-protected shadow"
        );
        a[12] = 0;
        m.phys.set_shadow(a);
        assert_eq!(m.read_u8(0xf_0000, false).unwrap(), 0x5a, "ROM again");
    }

    struct NoSink;
    impl crate::DirtySink for NoSink {
        fn pages_written(&mut self, _mem: &[u8], _pages: &[usize]) {}
    }

    #[test]
    fn watched_memory_follows_its_bar() {
        let mut m = PhysMem::new(4 << 20).unwrap();
        let mem = crate::WatchedMem::new(0x2000).unwrap();
        m.add_watched(0x30_0000, mem, Box::new(NoSink));
        m.write(0x30_0004, &[0xab]);
        let e = m.epoch();
        assert!(!m.move_watched(0x12_3000, 0x10_0000));
        assert!(m.move_watched(0x30_0000, 0x10_0000));
        assert_ne!(m.epoch(), e);
        assert_eq!(
            rd(&mut m, 0x10_0004),
            0xab,
            "the same memory at the new place"
        );
        assert_eq!(rd(&mut m, 0x30_0004), 0, "RAM again where it was");
        assert!(m.ram_page_ptr(0x30_0000).is_some());
        assert!(m.ram_page_ptr(0x10_0000).is_none());
        m.write(0x30_0004, &[1]);
        assert_eq!(rd(&mut m, 0x10_0004), 0xab);
    }
}
