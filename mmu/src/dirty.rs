//! Watched memory: host memory mapped into the guest-physical space at RAM speed whose
//! writes are logged per 4 KiB page (ARCHITECTURE.md section 3, "a watched framebuffer
//! page, not yet dirty"). It backs the VGA's linear framebuffer.
//!
//! # How a write is seen
//! Every page of a [`WatchedMem`] is *clean* or *dirty* in the MMU's bitmap. The TLB
//! gives a clean page a write tag with [`crate::tlb::TAG_SLOW`] set, so the first write
//! to it misses the fast path (the interpreter's typed accessors and the JIT's inline
//! probe alike), and the slow path stores the bytes, marks the page dirty and lifts the
//! slow bit from that TLB entry: later writes to the page go at RAM speed. Reads are
//! always fast; instruction fetches always take the slow path (the JIT translates no code
//! from watched memory). Code the interpreter decodes from a watched page marks it as
//! RAM pages are marked ([`crate::PhysMem::mark_code`]): its writes then stay slow and
//! are reported by [`crate::PhysMem::take_dirty_code`].
//!
//! # Harvest
//! The consumer (the display) asks for the dirty pages with [`WatchedMem::request`] from
//! any thread. The thread that runs the guest calls [`crate::Mmu::harvest_watched`]
//! between instruction batches: if asked (or forced), it hands the dirty pages and the
//! memory to the region's [`DirtySink`] (which copies them where the consumer can read
//! them under its own lock), marks them clean again and puts the slow bit back on every
//! TLB write tag of the region. A write made after the harvest therefore dirties its page
//! anew, and one made before it is in the copy: nothing is lost.
//!
//! # Threads
//! The bytes of a [`WatchedMem`] are touched only by the thread that runs the guest:
//! host pointers from the TLB, [`crate::PhysMem`] reads and writes, the harvest, and
//! device code called from inside those (a device's own window onto the same memory).
//! Other threads never read them; they read the sink's copy. That is the contract of
//! [`WatchedMem::bytes`] and [`WatchedMem::bytes_mut`].

use crate::phys::PAGE_SIZE;
use memmap2::MmapMut;
use std::cell::UnsafeCell;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Receives the pages of a watched region written since the last harvest.
pub trait DirtySink: Send {
    /// `pages` (indices of 4 KiB pages, ascending) of `mem` were written.
    fn pages_written(&mut self, mem: &[u8], pages: &[usize]);
}

/// Host memory that can be mapped with [`crate::PhysMem::add_watched`].
pub struct WatchedMem {
    map: UnsafeCell<MmapMut>,
    len: usize,
    want: AtomicBool,
}

// SAFETY: the mapping is owned memory with no thread affinity. Its bytes are reached
// only through the `unsafe` accessors (and host pointers derived from `as_ptr`), whose
// contract confines them to the one thread that runs the guest; the only state other
// threads touch is the atomic `want` flag.
unsafe impl Send for WatchedMem {}
// SAFETY: as for Send: shared references let other threads only call `request`,
// `len` and `as_ptr` (which reads nothing), never reach the bytes.
unsafe impl Sync for WatchedMem {}

impl std::fmt::Debug for WatchedMem {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("WatchedMem")
            .field("len", &self.len)
            .finish_non_exhaustive()
    }
}

impl WatchedMem {
    /// `len` bytes (rounded up to whole pages) of zeroed memory, committed by the host
    /// only as the guest touches it.
    pub fn new(len: usize) -> std::io::Result<Arc<Self>> {
        let len = len.div_ceil(PAGE_SIZE as usize).max(1) * PAGE_SIZE as usize;
        let map = memmap2::MmapOptions::new().len(len).map_anon()?;
        Ok(Arc::new(WatchedMem {
            map: UnsafeCell::new(map),
            len,
            want: AtomicBool::new(false),
        }))
    }

    /// Size in bytes (a whole number of pages).
    pub fn len(&self) -> usize {
        self.len
    }

    /// Always false (a region has at least one page); for clippy's `len` rule.
    pub fn is_empty(&self) -> bool {
        false
    }

    /// Start of the memory. The mapping never moves while `self` lives.
    pub fn as_ptr(&self) -> *mut u8 {
        // SAFETY: only the mapping's address is taken; no reference to its bytes is
        // made, and the MmapMut itself is never replaced after construction.
        unsafe { (*self.map.get()).as_mut_ptr() }
    }

    /// The bytes.
    ///
    /// # Safety
    /// The caller runs on the thread that runs the guest (or no such thread exists
    /// yet / any more, with a happens-before edge to it), and no mutable view of the
    /// bytes from [`WatchedMem::bytes_mut`] is alive.
    pub unsafe fn bytes(&self) -> &[u8] {
        // SAFETY: per the contract nothing writes the bytes while this view lives; the
        // pointer covers `len` mapped bytes.
        unsafe { std::slice::from_raw_parts(self.as_ptr(), self.len) }
    }

    /// The bytes, writable.
    ///
    /// # Safety
    /// As for [`WatchedMem::bytes`], and no other view of the bytes is alive.
    #[allow(clippy::mut_from_ref)]
    pub unsafe fn bytes_mut(&self) -> &mut [u8] {
        // SAFETY: per the contract this is the only view of the bytes; the pointer
        // covers `len` mapped bytes.
        unsafe { std::slice::from_raw_parts_mut(self.as_ptr(), self.len) }
    }

    /// Asks the guest's thread to hand over the dirty pages at its next harvest (any
    /// thread may call this).
    pub fn request(&self) {
        self.want.store(true, Ordering::Release);
    }

    /// Takes a pending [`WatchedMem::request`].
    fn take_request(&self) -> bool {
        self.want.swap(false, Ordering::AcqRel)
    }
}

/// A watched region in the physical map (owned by [`crate::PhysMem`]).
pub(crate) struct WatchedRegion {
    /// Guest-physical base (page aligned).
    pub(crate) base: u64,
    pub(crate) mem: Arc<WatchedMem>,
    /// One bit per page: written since the last harvest.
    dirty: Vec<u64>,
    /// Some bit of `dirty` is set.
    any: bool,
    /// One bit per page: decoded code was taken from it (as `PhysMem`'s code marks for
    /// RAM), so a write must be reported with the other code writes.
    code: Vec<u64>,
    sink: Box<dyn DirtySink>,
}

impl WatchedRegion {
    pub(crate) fn new(base: u64, mem: Arc<WatchedMem>, sink: Box<dyn DirtySink>) -> Self {
        let pages = mem.len() / PAGE_SIZE as usize;
        WatchedRegion {
            base,
            mem,
            dirty: vec![0; pages.div_ceil(64)],
            any: false,
            code: vec![0; pages.div_ceil(64)],
            sink,
        }
    }

    /// Length in bytes.
    pub(crate) fn len(&self) -> u64 {
        self.mem.len() as u64
    }

    /// Whether physical `addr` lies in the region.
    #[inline]
    pub(crate) fn contains(&self, addr: u64) -> bool {
        addr >= self.base && addr - self.base < self.len()
    }

    /// Whether the page at region offset `off` is dirty.
    #[inline]
    pub(crate) fn is_dirty(&self, off: u64) -> bool {
        let p = (off / PAGE_SIZE) as usize;
        self.dirty[p / 64] & (1 << (p % 64)) != 0
    }

    /// Marks the page at region offset `off` as holding code; returns whether the mark
    /// is new.
    pub(crate) fn mark_code(&mut self, off: u64) -> bool {
        let p = (off / PAGE_SIZE) as usize;
        let (w, b) = (p / 64, 1u64 << (p % 64));
        let new = self.code[w] & b == 0;
        self.code[w] |= b;
        new
    }

    /// Whether the page at region offset `off` holds code.
    #[inline]
    pub(crate) fn is_code(&self, off: u64) -> bool {
        let p = (off / PAGE_SIZE) as usize;
        self.code[p / 64] & (1 << (p % 64)) != 0
    }

    /// Clears the code marks of the pages of `len` bytes at region offset `off`;
    /// returns the region offsets of the pages that had one.
    pub(crate) fn take_code(&mut self, off: u64, len: u64) -> Vec<u64> {
        let mut out = Vec::new();
        if len == 0 {
            return out;
        }
        let first = (off / PAGE_SIZE) as usize;
        let last = ((off + len - 1) / PAGE_SIZE) as usize;
        for p in first..=last.min(self.code.len() * 64 - 1) {
            let (w, b) = (p / 64, 1u64 << (p % 64));
            if self.code[w] & b != 0 {
                self.code[w] &= !b;
                out.push(p as u64 * PAGE_SIZE);
            }
        }
        out
    }

    /// Marks the pages of `len` bytes at region offset `off` dirty.
    pub(crate) fn mark(&mut self, off: u64, len: u64) {
        if len == 0 {
            return;
        }
        let first = (off / PAGE_SIZE) as usize;
        let last = ((off + len - 1) / PAGE_SIZE) as usize;
        for p in first..=last.min(self.dirty.len() * 64 - 1) {
            self.dirty[p / 64] |= 1 << (p % 64);
        }
        self.any = true;
    }

    /// If asked (or `force`), hands the dirty pages to the sink and marks them clean.
    /// Returns whether any page was handed over (the caller must then re-arm the TLB).
    pub(crate) fn harvest(&mut self, force: bool) -> bool {
        let asked = self.mem.take_request();
        if !(force || asked) || !self.any {
            return false;
        }
        let mut pages = Vec::new();
        for (w, word) in self.dirty.iter_mut().enumerate() {
            let mut bits = std::mem::take(word);
            while bits != 0 {
                pages.push(w * 64 + bits.trailing_zeros() as usize);
                bits &= bits - 1;
            }
        }
        self.any = false;
        // SAFETY: the harvest runs on the guest's thread (it holds `&mut PhysMem`, so no
        // TLB host pointer is being written through meanwhile) and makes no other view.
        let mem = unsafe { self.mem.bytes() };
        self.sink.pages_written(mem, &pages);
        true
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::{tlb::TAG_SLOW, Mmu, PhysMem};
    use std::sync::Mutex;

    /// Records what a harvest delivers, with the first byte of each page.
    #[derive(Clone, Default)]
    struct Seen(Arc<Mutex<Vec<(usize, u8)>>>);
    impl DirtySink for Seen {
        fn pages_written(&mut self, mem: &[u8], pages: &[usize]) {
            let mut s = self.0.lock().unwrap();
            for &p in pages {
                s.push((p, mem[p * 4096]));
            }
        }
    }
    impl Seen {
        fn take(&self) -> Vec<(usize, u8)> {
            std::mem::take(&mut *self.0.lock().unwrap())
        }
    }

    const BASE: u64 = 0xe000_0000;

    fn setup() -> (Mmu, Arc<WatchedMem>, Seen) {
        let mut phys = PhysMem::new(2 << 20).unwrap();
        let mem = WatchedMem::new(64 << 10).unwrap();
        let seen = Seen::default();
        phys.add_watched(BASE, mem.clone(), Box::new(seen.clone()));
        (Mmu::new(phys), mem, seen)
    }

    #[test]
    fn first_write_is_slow_then_fast_until_harvest() {
        let (mut m, mem, seen) = setup();
        // Reads are fast from the start and see the memory.
        // SAFETY: single-threaded test: this thread runs the "guest".
        unsafe { mem.bytes_mut()[0x1008] = 0x5a };
        assert_eq!(m.read_u8(BASE + 0x1008, false).unwrap(), 0x5a);
        assert_eq!(m.tlb.entry(BASE + 0x1000, false).read, BASE + 0x1000);
        assert_eq!(
            m.tlb.entry(BASE + 0x1000, false).write,
            (BASE + 0x1000) | TAG_SLOW,
            "clean page: writes must miss the fast path"
        );
        assert_eq!(
            m.tlb.entry(BASE + 0x1000, false).fetch,
            (BASE + 0x1000) | TAG_SLOW
        );
        // The first write goes the slow way, dirties the page and opens the fast path.
        m.write_u32(BASE + 0x1010, 0x1122_3344, false).unwrap();
        assert_eq!(m.tlb.entry(BASE + 0x1000, false).write, BASE + 0x1000);
        // SAFETY: as above.
        assert_eq!(unsafe { mem.bytes()[0x1010] }, 0x44);
        m.write_u8(BASE + 0x1000, 7, false).unwrap();
        // Nothing is delivered without a request.
        m.harvest_watched(false);
        assert!(seen.take().is_empty());
        mem.request();
        m.harvest_watched(false);
        assert_eq!(seen.take(), vec![(1, 7)]);
        // Harvested: clean again, the TLB entry is slow again.
        assert_eq!(
            m.tlb.entry(BASE + 0x1000, false).write,
            (BASE + 0x1000) | TAG_SLOW
        );
        m.harvest_watched(true);
        assert!(seen.take().is_empty(), "nothing written since");
        // A write after the harvest is seen by the next one.
        m.write_u16(BASE + 0x1000, 0x0909, false).unwrap();
        m.write_u8(BASE + 0x3000, 3, false).unwrap();
        m.harvest_watched(true);
        assert_eq!(seen.take(), vec![(1, 9), (3, 3)]);
    }

    #[test]
    fn page_crossing_and_bulk_writes_dirty_every_page() {
        let (mut m, _mem, seen) = setup();
        m.write_u32(BASE + 0x4ffe, 0xaabb_ccdd, false).unwrap();
        m.write(BASE + 0x8000, &[1u8; 0x2001], false).unwrap();
        m.harvest_watched(true);
        let pages: Vec<usize> = seen.take().into_iter().map(|(p, _)| p).collect();
        assert_eq!(pages, vec![4, 5, 8, 9, 10]);
        // Writes past the end of the region go nowhere and dirty nothing.
        m.write_u8(BASE + (64 << 10), 1, false).unwrap();
        m.harvest_watched(true);
        assert!(seen.take().is_empty());
    }

    #[test]
    fn code_in_watched_memory_is_tracked_like_code_in_ram() {
        let (mut m, _mem, _seen) = setup();
        // Dirty the page first so that only the code mark can keep writes slow.
        m.write_u8(BASE + 0x2000, 0x90, false).unwrap();
        assert_eq!(m.tlb.entry(BASE + 0x2000, false).write, BASE + 0x2000);
        assert!(m.mark_code(BASE + 0x2000));
        assert!(!m.phys.mark_code(BASE + 0x2fff), "one mark per page");
        assert!(m.phys.is_code(BASE + 0x2001));
        assert_eq!(
            m.tlb.entry(BASE + 0x2000, false).write,
            (BASE + 0x2000) | TAG_SLOW,
            "a code page's writes go the slow way"
        );
        m.write_u8(BASE + 0x2010, 0xc3, false).unwrap();
        assert_eq!(m.phys.take_dirty_code(), vec![BASE + 0x2000]);
        assert!(!m.phys.is_code(BASE + 0x2000));
        // The mark is gone: the next write may go fast again.
        assert_eq!(m.tlb.entry(BASE + 0x2000, false).write, BASE + 0x2000);
        // A fill of a code page keeps writes slow even when the page is dirty.
        assert!(m.mark_code(BASE + 0x2000));
        m.flush_all();
        m.read_u8(BASE + 0x2000, false).unwrap();
        assert_eq!(
            m.tlb.entry(BASE + 0x2000, false).write,
            (BASE + 0x2000) | TAG_SLOW
        );
    }

    #[test]
    fn watched_memory_behaves_as_ram_for_the_map() {
        let (mut m, _mem, _seen) = setup();
        assert_eq!(m.phys.kind(BASE + 0x10), crate::PhysKind::Ram);
        let mut b = [0u8; 4];
        m.phys.write(BASE + 0xfffe, &[1, 2]);
        m.phys.read(BASE + 0xfffe, &mut b);
        assert_eq!(b, [1, 2, 0xff, 0xff], "past the end: open bus");
    }
}
