//! The code cache: one host region we map ourselves, filled by bump allocation and
//! flushed whole when full, plus the tables that find blocks again.
//!
//! W^X discipline: the region is never writable and executable at once. It is mapped
//! read/write; before host code runs the dispatcher calls [`CodeRegion::make_executable`]
//! (mprotect to read/execute), and before it writes a new block or patches a jump it calls
//! [`CodeRegion::make_writable`] (mprotect back to read/write). Each switch is one
//! `mprotect` system call; the dispatcher batches translation and chaining so that a hot
//! loop, once translated and chained, runs without switching at all.

use std::collections::HashMap;
use std::io;

/// A block's identity: the physical address of its first guest byte, the mode bits
/// that change its translation (see `mode_bits`), and its linear EIP: branch targets
/// and pushed return addresses are linear, so the same physical code reached at two
/// linear addresses (Linux runs early code at both) needs two translations.
pub type BlockKey = (u64, u8, u32);

/// The mapped region.
pub struct CodeRegion {
    base: *mut u8,
    size: usize,
    used: usize,
    /// Bytes at the start that survive a flush (the entry/exit trampoline).
    reserved: usize,
    writable: bool,
}

impl CodeRegion {
    /// Maps `size` bytes (rounded up to whole pages), read/write.
    pub fn new(size: usize) -> io::Result<Self> {
        let size = size.max(4096).div_ceil(4096) * 4096;
        // SAFETY: an anonymous private mapping at an address of the kernel's choosing
        // aliases no Rust object; the result is checked against MAP_FAILED.
        let p = unsafe {
            libc::mmap(
                std::ptr::null_mut(),
                size,
                libc::PROT_READ | libc::PROT_WRITE,
                libc::MAP_PRIVATE | libc::MAP_ANONYMOUS,
                -1,
                0,
            )
        };
        if p == libc::MAP_FAILED {
            return Err(io::Error::last_os_error());
        }
        Ok(CodeRegion {
            base: p.cast(),
            size,
            used: 0,
            reserved: 0,
            writable: true,
        })
    }

    /// Host address of the first byte.
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

    fn protect(&mut self, prot: libc::c_int) {
        // SAFETY: `base..base + size` is exactly the mapping made in `new`, still owned
        // by `self`. Changing its protection affects no Rust object; while it is not
        // executable no host code of ours runs from it (the dispatcher calls this only
        // between runs).
        let r = unsafe { libc::mprotect(self.base.cast(), self.size, prot) };
        if r != 0 {
            // Without the protection change the next write or run would crash the host.
            panic!(
                "mprotect of the JIT code cache failed: {}",
                io::Error::last_os_error()
            );
        }
    }

    /// Makes the region writable (and not executable).
    pub fn make_writable(&mut self) {
        if !self.writable {
            self.protect(libc::PROT_READ | libc::PROT_WRITE);
            self.writable = true;
        }
    }

    /// Makes the region executable (and not writable).
    pub fn make_executable(&mut self) {
        if self.writable {
            self.protect(libc::PROT_READ | libc::PROT_EXEC);
            self.writable = false;
        }
    }

    /// Copies `code` to [`CodeRegion::next_addr`] and bumps the pointer (16-byte aligned
    /// afterwards). Returns the address, or `None` if it does not fit.
    pub fn push(&mut self, code: &[u8]) -> Option<usize> {
        let end = self.used.checked_add(code.len())?.div_ceil(16) * 16;
        if end > self.size {
            return None;
        }
        self.make_writable();
        let at = self.next_addr();
        // SAFETY: `used + code.len() <= size`, so the destination lies inside the
        // mapping, which is writable now; source and destination cannot overlap (the
        // source is a Rust slice, the destination our private mapping).
        unsafe {
            std::ptr::copy_nonoverlapping(code.as_ptr(), self.base.add(self.used), code.len())
        };
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

    /// Overwrites `bytes.len()` bytes at host address `addr` (a jump patch).
    /// Out-of-range requests are refused (logged) rather than performed.
    pub fn patch(&mut self, addr: usize, bytes: &[u8]) {
        let start = self.base as usize + self.reserved;
        let end = self.base as usize + self.used;
        if addr < start || addr.saturating_add(bytes.len()) > end {
            log::error!("jit: refused patch at {addr:#x} outside the block area");
            return;
        }
        self.make_writable();
        // SAFETY: the range was checked to lie inside the used part of the mapping, which
        // is writable now, and no host code runs while the dispatcher patches.
        unsafe { std::ptr::copy_nonoverlapping(bytes.as_ptr(), addr as *mut u8, bytes.len()) };
    }

    /// The bytes at `[addr, addr + len)` if they lie inside the used part (for dumps).
    pub fn bytes(&self, addr: usize, len: usize) -> Option<&[u8]> {
        let start = self.base as usize;
        if addr < start || addr.checked_add(len)? > start + self.used {
            return None;
        }
        // SAFETY: the range is inside the mapping, which is always readable; `&self`
        // keeps it alive and unmodified (writes need `&mut self`) for the slice's life.
        Some(unsafe { std::slice::from_raw_parts(addr as *const u8, len) })
    }
}

impl Drop for CodeRegion {
    fn drop(&mut self) {
        // SAFETY: unmaps exactly the mapping made in `new`; no host code runs from it
        // any more (the dispatcher owns the only reference).
        unsafe {
            libc::munmap(self.base.cast(), self.size);
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

/// Lookup table (key → entry) and the per-physical-page lists used to invalidate.
#[derive(Default)]
pub struct BlockTable {
    map: HashMap<BlockKey, Entry>,
    pages: HashMap<u64, Vec<BlockKey>>,
}

impl BlockTable {
    /// The entry for `key`.
    #[inline]
    pub fn get(&self, key: BlockKey) -> Option<Entry> {
        self.map.get(&key).copied()
    }

    /// Records `entry` for `key`, on the page list of every physical page in `pages`.
    pub fn insert(&mut self, key: BlockKey, entry: Entry, pages: &[u64]) {
        self.map.insert(key, entry);
        for &p in pages {
            self.pages.entry(p).or_default().push(key);
        }
    }

    /// Removes and returns every entry recorded on page `page` (physical, page aligned).
    pub fn take_page(&mut self, page: u64) -> Vec<Entry> {
        let keys = self.pages.remove(&page).unwrap_or_default();
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
        r.make_executable();
        r.make_writable();
        assert!(r.push(&[0x90; 8000]).is_some());
    }

    #[test]
    fn table_invalidates_by_page() {
        let mut t = BlockTable::default();
        t.insert((0x1000, 0, 0x1000), Entry::Native(0), &[0x1000]);
        t.insert((0x1800, 0, 0x1800), Entry::Native(1), &[0x1000]);
        t.insert((0x2000, 0, 0x2000), Entry::Native(2), &[0x2000]);
        let gone = t.take_page(0x1000);
        assert_eq!(gone.len(), 2);
        assert!(t.get((0x1000, 0, 0x1000)).is_none());
        assert_eq!(t.get((0x2000, 0, 0x2000)), Some(Entry::Native(2)));
        assert!(!t.page_has_blocks(0x1000));
    }
}
