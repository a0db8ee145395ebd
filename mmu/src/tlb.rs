//! The software TLB: the shadow of the guest page tables (ARCHITECTURE.md section 3).
//!
//! TODO(mmu helper): per-privilege sets, separate read/write/fetch tags, host addends.
//! This first version caches nothing, which is always correct.

use crate::paging::Translation;
use crate::Access;

/// The software TLB.
#[derive(Debug, Default)]
pub struct Tlb {}

impl Tlb {
    /// An empty TLB.
    pub fn new() -> Self {
        Tlb {}
    }
    /// Looks up the physical address of `linear` for `acc` with privilege `user`.
    #[inline]
    pub fn lookup(&mut self, _linear: u64, _acc: Access, _user: bool) -> Option<u64> {
        None
    }
    /// Records a translation after a walk.
    pub fn insert(&mut self, _linear: u64, _acc: Access, _user: bool, _t: &Translation) {}
    /// Drops every entry.
    pub fn flush_all(&mut self) {}
    /// Drops every non-global entry.
    pub fn flush_nonglobal(&mut self) {}
    /// Drops the entries for the page holding `linear`.
    pub fn invlpg(&mut self, _linear: u64) {}
}
