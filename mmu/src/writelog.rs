//! A log of guest memory writes, for the JIT's lock-step checker.
//!
//! While a [`WriteLog`] is installed in the [`crate::Mmu`] (see
//! [`crate::Mmu::start_write_log`]), every data write the MMU performs is recorded with
//! its physical address, the bytes it replaced and the bytes it wrote, so the writes can
//! be compared with another engine's and undone (newest first) to replay the same code
//! from the same memory. The typed fast path is bypassed while a log is installed, so no
//! write escapes it. Accesses that reach a device window (MMIO) cannot be undone; the
//! log only notes that one happened ([`WriteLog::touched_device`]).
//!
//! Not logged: accessed/dirty bits set by page walks (they only ever set bits, are made
//! by the same walker in every engine, and setting them twice changes nothing) and
//! writes that bypass the MMU (DMA, loaders).

use crate::phys::{PhysKind, PhysMem, PAGE_SIZE};

/// One logged write: `len` bytes at physical `addr`; old and new bytes live in the
/// log's byte buffer at `at` and `at + len`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Rec {
    addr: u64,
    at: usize,
    len: usize,
}

/// Guest memory writes recorded by the MMU (see the module documentation).
#[derive(Debug, Clone, Default)]
pub struct WriteLog {
    recs: Vec<Rec>,
    bytes: Vec<u8>,
    device: bool,
    code_pages: Vec<u64>,
}

/// One write, as [`WriteLog::writes`] yields it.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LoggedWrite<'a> {
    /// Physical address of the first byte (A20 applied).
    pub addr: u64,
    /// The bytes before the write.
    pub old: &'a [u8],
    /// The bytes written.
    pub new: &'a [u8],
}

impl WriteLog {
    /// An empty log.
    pub fn new() -> Self {
        Self::default()
    }

    /// Forgets everything recorded.
    pub fn clear(&mut self) {
        self.recs.clear();
        self.bytes.clear();
        self.device = false;
        self.code_pages.clear();
    }

    /// Number of writes recorded.
    pub fn len(&self) -> usize {
        self.recs.len()
    }

    /// Whether no write was recorded.
    pub fn is_empty(&self) -> bool {
        self.recs.is_empty()
    }

    /// Whether a read or write reached a device window (MMIO) since the log was
    /// started or cleared: such side effects cannot be undone or replayed.
    pub fn touched_device(&self) -> bool {
        self.device
    }

    /// Physical page addresses that were marked as holding code when a logged write
    /// hit them (in order of the first such write, without repeats).
    pub fn code_pages(&self) -> &[u64] {
        &self.code_pages
    }

    /// The recorded writes, oldest first.
    pub fn writes(&self) -> impl Iterator<Item = LoggedWrite<'_>> + '_ {
        self.recs.iter().map(|r| LoggedWrite {
            addr: r.addr,
            old: &self.bytes[r.at..r.at + r.len],
            new: &self.bytes[r.at + r.len..r.at + 2 * r.len],
        })
    }

    /// The physical pages written, sorted, without repeats.
    pub fn pages(&self) -> Vec<u64> {
        let mut v = Vec::new();
        self.pages_into(&mut v);
        v
    }

    /// [`WriteLog::pages`] into `v` (cleared first), so a caller can reuse one buffer.
    pub fn pages_into(&self, v: &mut Vec<u64>) {
        v.clear();
        for r in &self.recs {
            let first = r.addr & !(PAGE_SIZE - 1);
            let last = (r.addr + r.len as u64 - 1) & !(PAGE_SIZE - 1);
            // Writes come in runs on one page (the stack, one buffer): skip repeats of
            // the last page before sorting.
            if v.last() != Some(&first) {
                v.push(first);
            }
            if last != first {
                v.push(last);
            }
        }
        if v.len() > 1 {
            v.sort_unstable();
            v.dedup();
        }
    }

    /// Total bytes written (the sum of the recorded writes' sizes).
    pub fn bytes_written(&self) -> u64 {
        (self.bytes.len() / 2) as u64
    }

    /// Notes an access to a device window.
    pub(crate) fn note_device(&mut self) {
        self.device = true;
    }

    /// Records a write of `new` at physical `addr` (within one page) that is about to
    /// be made: keeps the bytes it will replace. Writes to ROM or to nothing change no
    /// memory and are not recorded; a write to MMIO only sets the device mark.
    pub(crate) fn record(&mut self, phys: &mut PhysMem, addr: u64, new: &[u8]) {
        if new.is_empty() {
            return;
        }
        let addr = addr & phys.a20_mask();
        match phys.kind(addr) {
            PhysKind::Ram => {}
            PhysKind::Mmio => {
                self.device = true;
                return;
            }
            _ => return,
        }
        if phys.is_code(addr) {
            let page = addr & !(PAGE_SIZE - 1);
            if !self.code_pages.contains(&page) {
                self.code_pages.push(page);
            }
        }
        let at = self.bytes.len();
        self.bytes.extend_from_slice(new);
        self.bytes.extend_from_slice(new);
        phys.read(addr, &mut self.bytes[at..at + new.len()]);
        self.recs.push(Rec {
            addr,
            at,
            len: new.len(),
        });
    }

    /// Puts the old bytes of every recorded write back, newest first, through
    /// [`PhysMem::write`] (so code-page marks see the writes). The log keeps its
    /// records.
    pub fn undo(&self, phys: &mut PhysMem) {
        for r in self.recs.iter().rev() {
            phys.write(r.addr, &self.bytes[r.at..r.at + r.len]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::BusDevice;

    struct Dev;
    impl BusDevice for Dev {
        fn read(&mut self, _offset: u64, data: &mut [u8]) {
            data.fill(0x5a);
        }
        fn write(&mut self, _offset: u64, _data: &[u8]) {}
    }

    #[test]
    fn records_old_and_new_bytes_and_undoes_newest_first() {
        let mut m = PhysMem::new(1 << 20).unwrap();
        m.write(0x1000, &[1, 2, 3, 4]);
        let mut log = WriteLog::new();
        log.record(&mut m, 0x1001, &[9, 9]);
        m.write(0x1001, &[9, 9]);
        log.record(&mut m, 0x1002, &[7]);
        m.write(0x1002, &[7]);
        let w: Vec<_> = log.writes().collect();
        assert_eq!(w.len(), 2);
        assert_eq!(
            (w[0].addr, w[0].old, w[0].new),
            (0x1001, &[2, 3][..], &[9, 9][..])
        );
        assert_eq!(
            (w[1].addr, w[1].old, w[1].new),
            (0x1002, &[9][..], &[7][..])
        );
        assert_eq!(log.pages(), vec![0x1000]);
        log.undo(&mut m);
        let mut b = [0u8; 4];
        m.read(0x1000, &mut b);
        assert_eq!(b, [1, 2, 3, 4], "newest first restores the original bytes");
        assert_eq!(log.len(), 2);
        log.clear();
        assert!(log.is_empty());
    }

    #[test]
    fn device_and_rom_writes_are_not_recorded() {
        let mut m = PhysMem::new(1 << 20).unwrap();
        m.add_mmio(0xfee0_0000, 0x1000, Box::new(Dev));
        m.add_rom(0xffff_0000, vec![0; 0x10000]);
        let mut log = WriteLog::new();
        log.record(&mut m, 0xffff_0010, &[1]);
        assert!(log.is_empty() && !log.touched_device());
        log.record(&mut m, 0xfee0_0010, &[1]);
        assert!(log.is_empty() && log.touched_device());
    }

    #[test]
    fn mmu_logs_writes_that_would_hit_the_tlb_fast_path() {
        let mut m = crate::Mmu::new(PhysMem::new(1 << 20).unwrap());
        // Paging off: linear = physical. Fill the TLB's write entry first.
        m.write_u32(0x2000, 0x1111_1111, false).unwrap();
        m.start_write_log(Box::default());
        m.write_u32(0x2000, 0x2222_2222, false).unwrap();
        m.write(0x2ffe, &[1, 2, 3, 4], false).unwrap();
        let log = m.stop_write_log().unwrap();
        let w: Vec<_> = log.writes().collect();
        assert_eq!(
            w.len(),
            3,
            "typed write and a page-crossing write in two pieces"
        );
        assert_eq!(w[0].addr, 0x2000);
        assert_eq!(w[0].old, &0x1111_1111u32.to_le_bytes()[..]);
        assert_eq!(w[0].new, &0x2222_2222u32.to_le_bytes()[..]);
        assert_eq!((w[1].addr, w[1].new), (0x2ffe, &[1, 2][..]));
        assert_eq!((w[2].addr, w[2].new), (0x3000, &[3, 4][..]));
        assert_eq!(log.pages(), vec![0x2000, 0x3000]);
        // Without a log the fast path is used again and nothing is recorded.
        m.write_u32(0x2000, 0, false).unwrap();
        assert_eq!(log.len(), 3);
    }

    #[test]
    fn mmu_notes_device_reads() {
        let mut ph = PhysMem::new(1 << 20).unwrap();
        ph.add_mmio(0xfee0_0000, 0x1000, Box::new(Dev));
        let mut m = crate::Mmu::new(ph);
        m.start_write_log(Box::default());
        assert_eq!(m.read_u8(0x1000, false).unwrap(), 0);
        assert!(!m.stop_write_log().unwrap().touched_device());
        m.start_write_log(Box::default());
        assert_eq!(m.read_u8(0xfee0_0004, false).unwrap(), 0x5a);
        assert!(m.stop_write_log().unwrap().touched_device());
    }

    #[test]
    fn pages_into_sorts_and_dedups_and_counts_bytes() {
        let mut m = PhysMem::new(1 << 20).unwrap();
        let mut log = WriteLog::new();
        for (addr, n) in [
            (0x5008, 4),
            (0x5010, 2),
            (0x3ffe, 4),
            (0x5000, 1),
            (0x4000, 1),
        ] {
            let data = vec![0xab; n];
            log.record(&mut m, addr, &data);
        }
        let mut v = vec![0xdead];
        log.pages_into(&mut v);
        assert_eq!(v, vec![0x3000, 0x4000, 0x5000]);
        assert_eq!(log.bytes_written(), 4 + 2 + 4 + 1 + 1);
    }

    #[test]
    fn code_pages_are_noted_once() {
        let mut m = PhysMem::new(1 << 20).unwrap();
        assert!(m.mark_code(0x3000));
        let mut log = WriteLog::new();
        log.record(&mut m, 0x3004, &[1]);
        log.record(&mut m, 0x3008, &[1]);
        log.record(&mut m, 0x5000, &[1]);
        assert_eq!(log.code_pages(), &[0x3000]);
    }
}
