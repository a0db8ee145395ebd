//! The software TLB: the shadow of the guest page tables (ARCHITECTURE.md section 3).
//!
//! Two direct-mapped sets of [`TLB_SIZE`] entries, indexed by `(linear >> 12) &
//! (TLB_SIZE - 1)`: set 0 for supervisor accesses, set 1 for user accesses, so a ring
//! switch needs no flush. Each [`TlbEntry`] holds one tag per access kind (read, write,
//! fetch) and an addend with `host = linear + addend` for plain RAM pages.
//!
//! # Tags
//! A tag is the 4 KiB-aligned linear page address when the access may go straight to
//! host memory. Anything else keeps low bits set so the fast compare fails:
//! - [`TAG_INVALID`] (all ones): no translation cached for this kind of access (not
//!   present, not allowed, or, for writes, the dirty bit not yet set);
//! - page | [`TAG_SLOW`]: the translation is valid but the access must take the slow
//!   path: MMIO, ROM, unassigned memory, a write to a page holding code, a write to a
//!   clean page of watched memory, or any fetch from watched memory (see the dirty
//!   module).
//!
//! # Inline probe (for the JIT)
//! `base = Tlb::entries_ptr()`; the supervisor set is `base[0..TLB_SIZE]`, the user set
//! `base[TLB_SIZE..2 * TLB_SIZE]`. For an access of `size` bytes at 32-bit `linear`:
//! ```text
//! e = base + ((user << TLB_BITS) | ((linear >> 12) & (TLB_SIZE - 1))) * size_of::<TlbEntry>()
//! if *(e + TlbEntry::OFFSET_READ) == (linear + size - 1) & !0xfff { host = linear + *(e + OFFSET_ADDEND) }
//! ```
//! Comparing against the page of the *last* byte makes page-crossing accesses miss (the
//! next page never lives in this slot), so an unaligned access needs no extra test.
//! Entries are only meaningful while [`crate::Mmu::sync_tlb`] has been called since the
//! last change to the physical map (generated code must be entered after it).

use crate::paging::Translation;
use crate::Access;

/// log2 of the number of entries per set.
pub const TLB_BITS: u32 = 10;
/// Entries per privilege set.
pub const TLB_SIZE: usize = 1 << TLB_BITS;
/// Tag of an entry that caches nothing for that access kind (never equals a page).
pub const TAG_INVALID: u64 = u64::MAX;
/// Tag bit: the translation is valid but the access must take the slow path.
pub const TAG_SLOW: u64 = 1;
/// Mask of the page bits of a linear address.
pub const PAGE_MASK: u64 = !0xfff;

/// One TLB entry, as generated code reads it.
#[repr(C, align(32))]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct TlbEntry {
    /// Tag for data reads.
    pub read: u64,
    /// Tag for data writes.
    pub write: u64,
    /// Tag for instruction fetches.
    pub fetch: u64,
    /// `host address - linear address` (wrapping) for the page; meaningful only when a
    /// tag matches without [`TAG_SLOW`].
    pub addend: u64,
}

impl TlbEntry {
    /// Byte offset of [`TlbEntry::read`].
    pub const OFFSET_READ: usize = std::mem::offset_of!(TlbEntry, read);
    /// Byte offset of [`TlbEntry::write`].
    pub const OFFSET_WRITE: usize = std::mem::offset_of!(TlbEntry, write);
    /// Byte offset of [`TlbEntry::fetch`].
    pub const OFFSET_FETCH: usize = std::mem::offset_of!(TlbEntry, fetch);
    /// Byte offset of [`TlbEntry::addend`].
    pub const OFFSET_ADDEND: usize = std::mem::offset_of!(TlbEntry, addend);

    const EMPTY: TlbEntry = TlbEntry {
        read: TAG_INVALID,
        write: TAG_INVALID,
        fetch: TAG_INVALID,
        addend: 0,
    };

    /// The tag for `acc`.
    #[inline(always)]
    pub fn tag(&self, acc: Access) -> u64 {
        match acc {
            Access::Read => self.read,
            Access::Write => self.write,
            Access::Fetch => self.fetch,
        }
    }
}

/// What the slow path needs besides the hot entry.
#[derive(Debug, Clone, Copy)]
struct Meta {
    /// Linear page the entry maps, or `TAG_INVALID`.
    page: u64,
    /// META_* bits.
    flags: u8,
}

/// Frame of an empty slot (never a 4 KiB-aligned address).
const NO_FRAME: u64 = u64::MAX;

/// Longest `used` list before falling back to whole-array scans.
const USED_MAX: usize = 2 * TLB_SIZE;

const META_GLOBAL: u8 = 1 << 0;
const META_LARGE: u8 = 1 << 1;

impl Meta {
    const EMPTY: Meta = Meta {
        page: TAG_INVALID,
        flags: 0,
    };
}

/// Counters for `--stats`.
#[derive(Debug, Clone, Copy, Default)]
pub struct TlbStats {
    /// Slow-path fills (page walks, or identity fills with paging off).
    pub fills: u64,
    /// Full flushes that had something to drop.
    pub flushes: u64,
}

/// The software TLB.
pub struct Tlb {
    entries: Box<[TlbEntry; 2 * TLB_SIZE]>,
    meta: Box<[Meta; 2 * TLB_SIZE]>,
    /// Physical frame of each slot (after the A20 gate), `NO_FRAME` when empty; kept
    /// apart so [`Tlb::drop_write_phys`] scans a dense array.
    frames: Box<[u64; 2 * TLB_SIZE]>,
    /// The [`crate::PhysMem::epoch`] the entries were filled under.
    pub(crate) epoch: u64,
    /// Some entry was filled since the last full flush.
    any: bool,
    /// Some non-global entry was filled since the last flush of non-global entries.
    nonglobal: bool,
    /// Some large-page entry was filled since the last full flush.
    large: bool,
    /// Slots filled since the last full flush (duplicates possible), so flushes and
    /// scans touch only those; past [`USED_MAX`] entries `used_all` is set instead and
    /// every slot is scanned.
    used: Vec<u16>,
    /// `used` overflowed: treat every slot as used.
    used_all: bool,
    /// Counters.
    pub stats: TlbStats,
}

impl Default for Tlb {
    fn default() -> Self {
        Self::new()
    }
}

impl std::fmt::Debug for Tlb {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Tlb")
            .field("epoch", &self.epoch)
            .field("stats", &self.stats)
            .finish_non_exhaustive()
    }
}

impl Tlb {
    /// An empty TLB.
    pub fn new() -> Self {
        let entries: Box<[TlbEntry; 2 * TLB_SIZE]> = vec![TlbEntry::EMPTY; 2 * TLB_SIZE]
            .into_boxed_slice()
            .try_into()
            .expect("length is 2 * TLB_SIZE");
        let meta: Box<[Meta; 2 * TLB_SIZE]> = vec![Meta::EMPTY; 2 * TLB_SIZE]
            .into_boxed_slice()
            .try_into()
            .expect("length is 2 * TLB_SIZE");
        let frames: Box<[u64; 2 * TLB_SIZE]> = vec![NO_FRAME; 2 * TLB_SIZE]
            .into_boxed_slice()
            .try_into()
            .expect("length is 2 * TLB_SIZE");
        Tlb {
            entries,
            meta,
            frames,
            epoch: 0,
            any: false,
            nonglobal: false,
            large: false,
            used: Vec::with_capacity(USED_MAX),
            used_all: false,
            stats: TlbStats::default(),
        }
    }

    #[inline(always)]
    fn index(linear: u64, user: bool) -> usize {
        ((user as usize) << TLB_BITS) | ((linear >> 12) as usize & (TLB_SIZE - 1))
    }

    /// The entry slot for `linear` in the set for privilege `user`.
    #[inline(always)]
    pub fn entry(&self, linear: u64, user: bool) -> &TlbEntry {
        &self.entries[Self::index(linear, user)]
    }

    /// Base of the entry arrays (supervisor set, then user set), for generated code.
    /// The arrays never move while this `Tlb` lives.
    pub fn entries_ptr(&self) -> *const TlbEntry {
        self.entries.as_ptr()
    }

    /// Looks up the physical address of `linear` for `acc` with privilege `user`
    /// (slow-path entries included).
    #[inline]
    pub fn lookup(&self, linear: u64, acc: Access, user: bool) -> Option<u64> {
        let i = Self::index(linear, user);
        let page = linear & PAGE_MASK;
        if self.entries[i].tag(acc) & !TAG_SLOW == page {
            Some(self.frames[i] | (linear & 0xfff))
        } else {
            None
        }
    }

    /// Records a translation for the page of `linear` after a walk made with privilege
    /// `user`. `t.frame` must already have the A20 gate applied. `host` is the host
    /// address of the start of the frame if it is plain RAM (then it must point into
    /// the RAM mapping of the map whose epoch this TLB carries), `code` whether the
    /// frame holds code (writes must then go the slow way).
    pub(crate) fn insert(
        &mut self,
        linear: u64,
        user: bool,
        t: &Translation,
        host: Option<u64>,
        code: bool,
    ) {
        let i = Self::index(linear, user);
        let page = linear & PAGE_MASK;
        let fast = if host.is_some() {
            page
        } else {
            page | TAG_SLOW
        };
        let e = &mut self.entries[i];
        e.read = fast;
        e.fetch = if t.executable && (!user || t.user) {
            fast
        } else {
            TAG_INVALID
        };
        e.write = if t.writable && t.dirty {
            if code {
                page | TAG_SLOW
            } else {
                fast
            }
        } else {
            TAG_INVALID
        };
        e.addend = host.map_or(0, |h| h.wrapping_sub(page));
        let mut flags = 0;
        if t.global {
            flags |= META_GLOBAL;
        } else {
            self.nonglobal = true;
        }
        if t.large {
            flags |= META_LARGE;
            self.large = true;
        }
        self.meta[i] = Meta { page, flags };
        self.frames[i] = t.frame;
        self.any = true;
        if !self.used_all {
            if self.used.len() < USED_MAX {
                self.used.push(i as u16);
            } else {
                self.used_all = true;
            }
        }
    }

    /// Records a translation to a page of watched memory (see the dirty module): like
    /// [`Tlb::insert`] with host address `host`, but fetches always take the slow path,
    /// and writes too while the page is clean (`dirty == false`).
    pub(crate) fn insert_watched(
        &mut self,
        linear: u64,
        user: bool,
        t: &Translation,
        host: u64,
        dirty: bool,
    ) {
        self.insert(linear, user, t, Some(host), !dirty);
        let e = &mut self.entries[Self::index(linear, user)];
        if e.fetch != TAG_INVALID {
            e.fetch |= TAG_SLOW;
        }
    }

    /// Lets writes to the page of `linear` go fast again if the slot caches it with a
    /// write permission made slow only by [`Tlb::insert_watched`] or
    /// [`Tlb::drop_write_range`] (the caller knows the page is dirty watched memory).
    pub(crate) fn unslow_write(&mut self, linear: u64, user: bool, frame: u64) {
        let i = Self::index(linear, user);
        let page = linear & PAGE_MASK;
        if self.entries[i].write == page | TAG_SLOW && self.frames[i] == frame {
            self.entries[i].write = page;
        }
    }

    /// Makes every write to a physical frame in `[lo, hi)` take the slow path (watched
    /// pages just handed over as clean).
    pub fn drop_write_range(&mut self, lo: u64, hi: u64) {
        if !self.any {
            return;
        }
        let cand = self.candidates();
        for &i in &cand {
            let i = i as usize;
            if (lo..hi).contains(&self.frames[i]) {
                self.entries[i].write |= TAG_SLOW;
            }
        }
        self.restore(cand);
    }

    /// The slots that may be non-empty: the `used` list, or all of them.
    fn candidates(&mut self) -> Vec<u16> {
        if self.used_all {
            (0..2 * TLB_SIZE as u16).collect()
        } else {
            std::mem::take(&mut self.used)
        }
    }

    #[inline]
    fn drop_slot(&mut self, i: usize) {
        self.entries[i] = TlbEntry::EMPTY;
        self.meta[i] = Meta::EMPTY;
        self.frames[i] = NO_FRAME;
    }

    /// Drops every entry.
    pub fn flush_all(&mut self) {
        if !self.any {
            return;
        }
        self.stats.flushes += 1;
        if self.used_all {
            self.entries.fill(TlbEntry::EMPTY);
            self.meta.fill(Meta::EMPTY);
            self.frames.fill(NO_FRAME);
        } else {
            for k in 0..self.used.len() {
                let i = self.used[k] as usize;
                self.drop_slot(i);
            }
        }
        self.used.clear();
        self.used_all = false;
        self.any = false;
        self.nonglobal = false;
        self.large = false;
    }

    /// Drops every non-global entry.
    pub fn flush_nonglobal(&mut self) {
        if !self.nonglobal {
            return;
        }
        let cand = self.candidates();
        let mut kept = Vec::with_capacity(USED_MAX);
        for &i in &cand {
            let i = i as usize;
            let m = self.meta[i];
            if m.page == TAG_INVALID {
                continue;
            }
            if m.flags & META_GLOBAL == 0 {
                self.drop_slot(i);
            } else {
                kept.push(i as u16);
            }
        }
        self.used = kept;
        self.used_all = false;
        self.nonglobal = false;
        self.any = !self.used.is_empty();
    }

    /// Drops the entries for the page holding `linear`, global or not; when the TLB
    /// holds pieces of large pages, every piece of a large page holding `linear` too.
    pub fn invlpg(&mut self, linear: u64) {
        let page = linear & 0xffff_f000;
        for user in [false, true] {
            let i = Self::index(page, user);
            if self.meta[i].page == page {
                self.drop_slot(i);
            }
        }
        if self.large {
            // Pieces of a 4 MiB (or 2 MiB) page are cached per 4 KiB: drop every piece
            // of a large page in the same 4 MiB region (over-dropping is harmless).
            let cand = self.candidates();
            for &i in &cand {
                let m = self.meta[i as usize];
                if m.flags & META_LARGE != 0 && (m.page ^ page) >> 22 == 0 {
                    self.drop_slot(i as usize);
                }
            }
            self.restore(cand);
        }
    }

    /// Puts back a list taken by [`Tlb::candidates`] (dropped slots may stay listed).
    fn restore(&mut self, cand: Vec<u16>) {
        if !self.used_all {
            self.used = cand;
        }
    }

    /// Makes every write to physical frame `frame` (4 KiB aligned, after A20) take the
    /// slow path: the frame was just marked as holding code.
    pub fn drop_write_phys(&mut self, frame: u64) {
        if !self.any {
            return;
        }
        // A hit on a read-only slot is harmless: TAG_INVALID | TAG_SLOW is still
        // TAG_INVALID.
        let cand = self.candidates();
        for &i in &cand {
            let i = i as usize;
            if self.frames[i] == frame {
                self.entries[i].write |= TAG_SLOW;
            }
        }
        self.restore(cand);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(frame: u64, global: bool, large: bool) -> Translation {
        Translation {
            frame,
            user: true,
            writable: true,
            executable: true,
            global,
            dirty: true,
            large,
        }
    }

    /// Every flush and scan must work both from the `used` list and, once that has
    /// overflowed, from a scan of every slot.
    #[test]
    fn flushes_and_scans_with_and_without_the_used_list() {
        for overflow in [false, true] {
            let mut tlb = Tlb::new();
            if overflow {
                for _ in 0..=USED_MAX {
                    tlb.insert(0x7000, false, &t(0x7000, false, false), Some(0x1000), false);
                }
                assert!(tlb.used_all);
            }
            tlb.insert(
                0x1000,
                false,
                &t(0x9000, false, false),
                Some(0x10_0000),
                false,
            );
            tlb.insert(
                0x2000,
                true,
                &t(0xa000, true, false),
                Some(0x20_0000),
                false,
            );
            tlb.insert(0x40_3000, false, &t(0xb000, false, true), None, false);
            assert_eq!(tlb.lookup(0x1234, Access::Write, false), Some(0x9234));
            assert_eq!(tlb.entry(0x1000, false).write, 0x1000);
            // A new code page: its write tag goes slow, the translation stays.
            tlb.drop_write_phys(0x9000);
            assert_eq!(tlb.entry(0x1000, false).write, 0x1000 | TAG_SLOW);
            assert_eq!(tlb.lookup(0x1234, Access::Write, false), Some(0x9234));
            assert_eq!(tlb.entry(0x2000, true).write, 0x2000);
            // INVLPG anywhere in the large page's 4 MiB region drops it.
            tlb.invlpg(0x40_0000);
            assert_eq!(tlb.lookup(0x40_3000, Access::Read, false), None);
            tlb.flush_nonglobal();
            assert_eq!(tlb.lookup(0x1234, Access::Read, false), None);
            assert_eq!(tlb.lookup(0x7000, Access::Read, false), None);
            assert_eq!(tlb.lookup(0x2000, Access::Fetch, true), Some(0xa000));
            tlb.flush_all();
            assert_eq!(tlb.lookup(0x2000, Access::Fetch, true), None);
            assert!(tlb.entries.iter().all(|e| *e == TlbEntry::EMPTY));
            assert!(tlb.frames.iter().all(|f| *f == NO_FRAME));
        }
    }

    #[test]
    fn tags_encode_permissions() {
        let mut tlb = Tlb::new();
        // Not dirty: no write tag; not executable: no fetch tag; MMIO: slow tags.
        let mut tr = t(0x5000, false, false);
        tr.dirty = false;
        tr.executable = false;
        tlb.insert(0x3000, false, &tr, None, false);
        let e = *tlb.entry(0x3000, false);
        assert_eq!(e.read, 0x3000 | TAG_SLOW);
        assert_eq!(e.write, TAG_INVALID);
        assert_eq!(e.fetch, TAG_INVALID);
        // A supervisor-only page cached by a supervisor walk gives the user set nothing,
        // and a user fill of such a translation caches no fetch right.
        assert_eq!(tlb.lookup(0x3000, Access::Read, true), None);
        let mut tr = t(0x6000, false, false);
        tr.user = false;
        tlb.insert(0x4000, true, &tr, Some(0x1000), true);
        let e = *tlb.entry(0x4000, true);
        assert_eq!(e.fetch, TAG_INVALID);
        assert_eq!(e.write, 0x4000 | TAG_SLOW, "code page: writes slow");
        assert_eq!(e.read, 0x4000);
        assert_eq!(e.addend, 0x1000u64.wrapping_sub(0x4000));
    }
}
