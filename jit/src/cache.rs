//! The code cache: one host region we map ourselves, filled by bump allocation and
//! flushed whole when full, plus the tables that find blocks again.
//!
//! W^X discipline without system calls: the region is one shared-memory object
//! (`memfd_create`) mapped twice, once read/write (where blocks are copied and jumps
//! patched) and once read/execute (where they run). No view is ever writable and
//! executable, and nothing is re-protected while the guest runs: the old scheme
//! (mprotect before each entry and after each patch) cost more host time in the kernel
//! than the guest code itself. Every address handed out ([`CodeRegion::next_addr`],
//! [`CodeRegion::push`], the argument of [`CodeRegion::patch`]) is an address in the
//! executable view; blocks are assembled for those addresses.

use std::collections::HashMap;
use std::hash::{BuildHasherDefault, Hasher};
use std::io;

/// A block's identity: the physical address of its first guest byte, the mode bits
/// that change its translation (see `mode_bits`), and its linear EIP: branch targets
/// and pushed return addresses are linear, so the same physical code reached at two
/// linear addresses (Linux runs early code at both) needs two translations.
pub type BlockKey = (u64, u8, u32);

/// The mapped region (two views of the same memory).
pub struct CodeRegion {
    /// Executable view (read/execute).
    base: *mut u8,
    /// Writable view (read/write) of the same bytes.
    rw: *mut u8,
    size: usize,
    used: usize,
    /// Bytes at the start that survive a flush (the entry/exit trampoline).
    reserved: usize,
}

/// Maps `size` bytes of `fd` at an address of the kernel's choosing with `prot`.
fn map_view(fd: libc::c_int, size: usize, prot: libc::c_int) -> io::Result<*mut u8> {
    // SAFETY: a shared mapping of our own memfd at an address of the kernel's choosing
    // aliases no Rust object; the result is checked against MAP_FAILED.
    let p = unsafe { libc::mmap(std::ptr::null_mut(), size, prot, libc::MAP_SHARED, fd, 0) };
    if p == libc::MAP_FAILED {
        return Err(io::Error::last_os_error());
    }
    Ok(p.cast())
}

impl CodeRegion {
    /// Maps `size` bytes (rounded up to whole pages) twice: writable and executable.
    pub fn new(size: usize) -> io::Result<Self> {
        let size = size.max(4096).div_ceil(4096) * 4096;
        // SAFETY: the name is a NUL-terminated string literal; the result is checked.
        let fd = unsafe { libc::memfd_create(c"morph86-jit".as_ptr(), libc::MFD_CLOEXEC) };
        if fd < 0 {
            return Err(io::Error::last_os_error());
        }
        let close = |fd| {
            // SAFETY: `fd` is the descriptor made above, closed exactly once; the
            // mappings keep the memory alive without it.
            unsafe { libc::close(fd) };
        };
        // SAFETY: `fd` is our memfd; the result is checked.
        if unsafe { libc::ftruncate(fd, size as libc::off_t) } != 0 {
            let e = io::Error::last_os_error();
            close(fd);
            return Err(e);
        }
        let rw = match map_view(fd, size, libc::PROT_READ | libc::PROT_WRITE) {
            Ok(p) => p,
            Err(e) => {
                close(fd);
                return Err(e);
            }
        };
        let base = match map_view(fd, size, libc::PROT_READ | libc::PROT_EXEC) {
            Ok(p) => p,
            Err(e) => {
                // SAFETY: unmaps exactly the view mapped just above.
                unsafe { libc::munmap(rw.cast(), size) };
                close(fd);
                return Err(e);
            }
        };
        close(fd);
        Ok(CodeRegion {
            base,
            rw,
            size,
            used: 0,
            reserved: 0,
        })
    }

    /// Host address of the first byte (executable view).
    pub fn base(&self) -> usize {
        self.base as usize
    }

    /// Host address where the next block will be placed.
    pub fn next_addr(&self) -> usize {
        self.base as usize + self.used
    }

    /// Bytes still free.
    pub fn free(&self) -> usize {
        self.size - self.used
    }

    /// Bytes in use (including the reserved trampoline).
    pub fn used(&self) -> usize {
        self.used
    }

    /// Total size.
    pub fn size(&self) -> usize {
        self.size
    }

    /// Copies `code` to [`CodeRegion::next_addr`] and bumps the pointer (16-byte aligned
    /// afterwards). Returns the address, or `None` if it does not fit.
    pub fn push(&mut self, code: &[u8]) -> Option<usize> {
        let end = self.used.checked_add(code.len())?.div_ceil(16) * 16;
        if end > self.size {
            return None;
        }
        let at = self.next_addr();
        // SAFETY: `used + code.len() <= size`, so the destination lies inside the
        // writable view; source and destination cannot overlap (the source is a Rust
        // slice, the destination our own mapping). No host code runs meanwhile (the
        // dispatcher translates between runs, on the one thread that runs code).
        unsafe { std::ptr::copy_nonoverlapping(code.as_ptr(), self.rw.add(self.used), code.len()) };
        self.used = end;
        Some(at)
    }

    /// Marks everything pushed so far as reserved (kept across [`CodeRegion::flush`]).
    pub fn reserve_current(&mut self) {
        self.reserved = self.used;
    }

    /// Forgets every block (keeps the reserved prefix).
    pub fn flush(&mut self) {
        self.used = self.reserved;
    }

    /// Overwrites `bytes.len()` bytes at (executable-view) host address `addr` (a jump
    /// patch). Out-of-range requests are refused (logged) rather than performed.
    pub fn patch(&mut self, addr: usize, bytes: &[u8]) {
        let start = self.base as usize + self.reserved;
        let end = self.base as usize + self.used;
        if addr < start || addr.saturating_add(bytes.len()) > end {
            log::error!("jit: refused patch at {addr:#x} outside the block area");
            return;
        }
        let off = addr - self.base as usize;
        // SAFETY: the range was checked to lie inside the used part of the region, so
        // `rw + off` is inside the writable view; no host code runs while the
        // dispatcher patches (x86 keeps instruction fetch coherent with stores through
        // another mapping of the same physical page).
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), self.rw.add(off), bytes.len()) };
    }

    /// The bytes at (executable-view) `[addr, addr + len)` if they lie inside the used
    /// part (for dumps).
    pub fn bytes(&self, addr: usize, len: usize) -> Option<&[u8]> {
        let start = self.base as usize;
        if addr < start || addr.checked_add(len)? > start + self.used {
            return None;
        }
        // SAFETY: the range is inside the region, whose writable view is readable;
        // `&self` keeps it alive and unmodified (writes need `&mut self`) for the
        // slice's life.
        Some(unsafe { std::slice::from_raw_parts(self.rw.add(addr - start), len) })
    }
}

impl Drop for CodeRegion {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the two views made in `new`; no host code runs from
        // them any more (the dispatcher owns the only reference).
        unsafe {
            libc::munmap(self.base.cast(), self.size);
            libc::munmap(self.rw.cast(), self.size);
        }
    }
}

/// What the lookup table knows about a guest address.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Entry {
    /// A translated block (index into the block list).
    Native(u32),
    /// The first instruction there is not translated: run it in the interpreter.
    Interp(iced_x86::Mnemonic),
}

/// A multiply-rotate hasher for the small integer keys of the tables (SipHash, the
/// standard map's default, showed up at 9% of host time in the dispatcher).
#[derive(Default, Clone, Copy)]
pub struct FxHasher {
    h: u64,
}

impl FxHasher {
    const K: u64 = 0x51_7c_c1_b7_27_22_0a_95;
    #[inline]
    fn add(&mut self, v: u64) {
        self.h = (self.h.rotate_left(5) ^ v).wrapping_mul(Self::K);
    }
}

impl Hasher for FxHasher {
    #[inline]
    fn write(&mut self, bytes: &[u8]) {
        for c in bytes.chunks(8) {
            let mut b = [0u8; 8];
            b[..c.len()].copy_from_slice(c);
            self.add(u64::from_le_bytes(b));
        }
    }
    #[inline]
    fn write_u8(&mut self, v: u8) {
        self.add(v as u64);
    }
    #[inline]
    fn write_u32(&mut self, v: u32) {
        self.add(v as u64);
    }
    #[inline]
    fn write_u64(&mut self, v: u64) {
        self.add(v);
    }
    #[inline]
    fn write_usize(&mut self, v: usize) {
        self.add(v as u64);
    }
    #[inline]
    fn finish(&self) -> u64 {
        self.h
    }
}

/// `HashMap` with [`FxHasher`].
pub type FxMap<K, V> = HashMap<K, V, BuildHasherDefault<FxHasher>>;

/// log2 of the number of slots of the direct-mapped lookup in front of the map.
const FRONT_BITS: u32 = 12;

/// Lookup table (key → entry) and the per-physical-page lists used to invalidate.
///
/// A direct-mapped array indexed by the low bits of the physical address (and the mode)
/// answers most lookups with one compare of the full key; the hash map behind it holds
/// every entry.
pub struct BlockTable {
    front: Box<[(BlockKey, Entry)]>,
    map: FxMap<BlockKey, Entry>,
    pages: FxMap<u64, Vec<BlockKey>>,
    /// Lookups answered by the direct-mapped array.
    pub front_hits: u64,
    /// Lookups that went to the hash map (found or not).
    pub front_misses: u64,
}

const FRONT_EMPTY: (BlockKey, Entry) =
    ((u64::MAX, 0, 0), Entry::Interp(iced_x86::Mnemonic::INVALID));

impl Default for BlockTable {
    fn default() -> Self {
        BlockTable {
            front: vec![FRONT_EMPTY; 1 << FRONT_BITS].into_boxed_slice(),
            map: FxMap::default(),
            pages: FxMap::default(),
            front_hits: 0,
            front_misses: 0,
        }
    }
}

#[inline]
fn front_index(key: BlockKey) -> usize {
    ((key.0 ^ ((key.1 as u64) << 7) ^ (key.0 >> FRONT_BITS)) & ((1 << FRONT_BITS) - 1)) as usize
}

impl BlockTable {
    /// The entry for `key` (no side effects).
    #[inline]
    pub fn get(&self, key: BlockKey) -> Option<Entry> {
        self.map.get(&key).copied()
    }

    /// The entry for `key`, through the direct-mapped array (filled on a map hit).
    #[inline]
    pub fn lookup(&mut self, key: BlockKey) -> Option<Entry> {
        let i = front_index(key);
        let slot = self.front[i];
        if slot.0 == key {
            self.front_hits += 1;
            return Some(slot.1);
        }
        self.front_misses += 1;
        let e = self.map.get(&key).copied()?;
        self.front[i] = (key, e);
        Some(e)
    }

    /// Records `entry` for `key`, on the page list of every physical page in `pages`.
    pub fn insert(&mut self, key: BlockKey, entry: Entry, pages: &[u64]) {
        self.map.insert(key, entry);
        self.front[front_index(key)] = (key, entry);
        for &p in pages {
            self.pages.entry(p).or_default().push(key);
        }
    }

    /// Removes and returns every entry recorded on page `page` (physical, page aligned).
    pub fn take_page(&mut self, page: u64) -> Vec<Entry> {
        let keys = self.pages.remove(&page).unwrap_or_default();
        for k in &keys {
            let slot = &mut self.front[front_index(*k)];
            if slot.0 == *k {
                *slot = FRONT_EMPTY;
            }
        }
        keys.iter().filter_map(|k| self.map.remove(k)).collect()
    }

    /// Whether any entry lives on `page`.
    pub fn page_has_blocks(&self, page: u64) -> bool {
        self.pages.get(&page).is_some_and(|v| !v.is_empty())
    }

    /// Number of entries.
    pub fn len(&self) -> usize {
        self.map.len()
    }

    /// Whether the table is empty.
    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Forgets everything.
    pub fn clear(&mut self) {
        self.map.clear();
        self.pages.clear();
        self.front.fill(FRONT_EMPTY);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn push_patch_flush_and_bounds() {
        let mut r = CodeRegion::new(8192).unwrap();
        let a = r.push(&[0xc3]).unwrap();
        assert_eq!(a, r.base());
        r.reserve_current();
        assert_eq!(r.used(), 16, "pushes are 16-byte aligned");
        let b = r.push(&[0x90; 100]).unwrap();
        assert_eq!(b, r.base() + 16);
        r.patch(b, &[0xcc]);
        assert_eq!(r.bytes(b, 2).unwrap(), &[0xcc, 0x90]);
        // A patch into the reserved prefix or past the end is refused.
        r.patch(a, &[0xcc]);
        assert_eq!(r.bytes(a, 1).unwrap(), &[0xc3]);
        r.patch(r.base() + 4000, &[0xcc]);
        assert!(r.push(&[0; 9000]).is_none(), "too big for the region");
        r.flush();
        assert_eq!(r.next_addr(), r.base() + 16);
        assert!(r.push(&[0x90; 8000]).is_some());
    }

    #[test]
    fn executable_view_runs_what_the_writable_view_wrote() {
        let mut r = CodeRegion::new(4096).unwrap();
        // mov eax, 7 ; ret
        let at = r.push(&[0xb8, 7, 0, 0, 0, 0xc3]).unwrap();
        // SAFETY: `at` holds a complete sysv64 function (mov eax, imm; ret) in the
        // executable view.
        let f: extern "sysv64" fn() -> u32 = unsafe { std::mem::transmute(at) };
        assert_eq!(f(), 7);
        r.reserve_current();
        let at2 = r.push(&[0xb8, 1, 0, 0, 0, 0xc3]).unwrap();
        // Patch the immediate through the writable view; the executable view sees it.
        r.patch(at2 + 1, &[42]);
        // SAFETY: as above.
        let g: extern "sysv64" fn() -> u32 = unsafe { std::mem::transmute(at2) };
        assert_eq!(g(), 42);
    }

    #[test]
    fn table_invalidates_by_page() {
        let mut t = BlockTable::default();
        t.insert((0x1000, 0, 0x1000), Entry::Native(0), &[0x1000]);
        t.insert((0x1800, 0, 0x1800), Entry::Native(1), &[0x1000]);
        t.insert((0x2000, 0, 0x2000), Entry::Native(2), &[0x2000]);
        assert_eq!(t.lookup((0x1000, 0, 0x1000)), Some(Entry::Native(0)));
        let gone = t.take_page(0x1000);
        assert_eq!(gone.len(), 2);
        assert!(t.get((0x1000, 0, 0x1000)).is_none());
        assert!(
            t.lookup((0x1000, 0, 0x1000)).is_none(),
            "front slot cleared"
        );
        assert_eq!(t.get((0x2000, 0, 0x2000)), Some(Entry::Native(2)));
        assert_eq!(t.lookup((0x2000, 0, 0x2000)), Some(Entry::Native(2)));
        assert!(!t.page_has_blocks(0x1000));
    }

    #[test]
    fn front_collisions_fall_back_to_the_map() {
        let mut t = BlockTable::default();
        // Same low bits, different keys (other mode, other linear EIP, other page).
        let keys = [
            (0x1234, 0, 0x1234),
            (0x1234, 3, 0x1234),
            (0x1234, 0, 0xc000_1234),
            (0x1234 + (1 << 24), 0, 0x1234),
        ];
        for (n, &k) in keys.iter().enumerate() {
            t.insert(k, Entry::Native(n as u32), &[k.0 & !0xfff]);
        }
        for _ in 0..2 {
            for (n, &k) in keys.iter().enumerate() {
                assert_eq!(t.lookup(k), Some(Entry::Native(n as u32)));
            }
        }
        assert!(t.lookup((0x1234, 1, 0x1234)).is_none());
        t.clear();
        assert!(t.lookup(keys[0]).is_none());
    }
}
