//! The port-I/O bus: devices registered by port range, dispatch of `IN`/`OUT`.
//!
//! Each registration maps a range of ports to a shared device (`Arc<Mutex<dyn BusDevice>>`,
//! see [`SharedDevice`]). One device may be registered at several ranges (the PIC pair at
//! 0x20, 0xa0 and 0x4d0); the `origin` given at registration says which port is offset 0
//! for the device, so such devices see absolute port numbers if registered with origin 0.
//!
//! Width: a range registered with [`Width::Bytes`] only ever sees 1-byte accesses; a wider
//! `IN`/`OUT` is split into bytes at consecutive ports (low byte first), as an 8-bit ISA
//! device sees it, and each byte may land on a different device. A range registered with
//! [`Width::Any`] receives 1, 2 and 4-byte accesses whole, when they fit in the range.
//! Bytes no device claims read as 0xff; writes to them are dropped.
//!
//! Locking: the bus locks one device at a time, for the duration of one access.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use morph86_mmu::{BusDevice, IoBus};

/// A device that can be registered on the bus (and kept by the machine for other uses).
pub type SharedDevice = Arc<Mutex<dyn BusDevice>>;

/// Locks a mutex, ignoring poisoning: a panic elsewhere must not take the bus down.
pub(crate) fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// The access widths a registered range accepts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Width {
    /// Only single bytes: wider accesses are split into byte accesses.
    Bytes,
    /// 1, 2 and 4-byte accesses are passed whole when they fit in the range.
    Any,
}

/// Why a registration was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum BusError {
    /// The new range overlaps a range already registered.
    #[error("I/O ports {new_base:#x}..={new_last:#x} ({new_name}) overlap ports {old_base:#x}..={old_last:#x} ({old_name})")]
    Overlap {
        /// First port of the refused range.
        new_base: u16,
        /// Last port of the refused range.
        new_last: u16,
        /// Name given to the refused range.
        new_name: String,
        /// First port of the range already registered.
        old_base: u16,
        /// Last port of the range already registered.
        old_last: u16,
        /// Name of the range already registered.
        old_name: String,
    },
    /// The range is empty or runs past port 0xffff.
    #[error("I/O port range at {base:#x} with length {len} is empty or runs past 0xffff")]
    BadRange {
        /// First port.
        base: u16,
        /// Length asked for.
        len: u32,
    },
}

struct Range {
    base: u16,
    last: u16,
    origin: u16,
    width: Width,
    name: String,
    dev: SharedDevice,
}

/// A port-I/O bus implementing [`IoBus`].
#[derive(Default)]
pub struct PortBus {
    /// Sorted by `base`, non-overlapping.
    ranges: Vec<Range>,
    written: Option<Arc<AtomicBool>>,
    fallback: Option<SharedDevice>,
}

impl PortBus {
    /// An empty bus.
    pub fn new() -> Self {
        Self::default()
    }

    /// Registers `dev` at ports `base..base+len`; the device sees offsets relative to
    /// `origin` (use `origin == base` for relative offsets, 0 for absolute port numbers).
    pub fn register(
        &mut self,
        name: &str,
        base: u16,
        len: u32,
        origin: u16,
        width: Width,
        dev: SharedDevice,
    ) -> Result<(), BusError> {
        if len == 0 || base as u32 + len > 0x1_0000 || origin > base {
            return Err(BusError::BadRange { base, len });
        }
        let last = (base as u32 + len - 1) as u16;
        if let Some(r) = self
            .ranges
            .iter()
            .find(|r| base <= r.last && r.base <= last)
        {
            return Err(BusError::Overlap {
                new_base: base,
                new_last: last,
                new_name: name.to_string(),
                old_base: r.base,
                old_last: r.last,
                old_name: r.name.clone(),
            });
        }
        let at = self.ranges.partition_point(|r| r.base < base);
        self.ranges.insert(
            at,
            Range {
                base,
                last,
                origin,
                width,
                name: name.to_string(),
                dev,
            },
        );
        Ok(())
    }

    /// Sets `flag` on every write to a claimed port (the run loop uses it to recompute
    /// timer deadlines after the guest reprograms a device).
    pub fn set_write_flag(&mut self, flag: Arc<AtomicBool>) {
        self.written = Some(flag);
    }

    /// Sends accesses no registered range claims to `dev` (with the absolute port as
    /// offset), whole when no registered range touches them: the subtractive decode of
    /// a PCI bus, whose devices' I/O BARs move at run time. The fallback answers 0xff
    /// for ports nothing decodes.
    pub fn set_fallback(&mut self, dev: SharedDevice) {
        self.fallback = Some(dev);
    }

    fn unclaimed(&self, port: u16, size: u8) -> bool {
        (0..size as u16).all(|k| self.find(port.wrapping_add(k)).is_none())
    }

    /// The name of the range holding `port`, if any.
    pub fn owner(&self, port: u16) -> Option<&str> {
        self.find(port).map(|i| self.ranges[i].name.as_str())
    }

    fn find(&self, port: u16) -> Option<usize> {
        let i = self.ranges.partition_point(|r| r.base <= port);
        if i == 0 {
            return None;
        }
        (port <= self.ranges[i - 1].last).then_some(i - 1)
    }

    /// The range that takes the whole access at `port` of `size` bytes, if one does.
    fn whole(&self, port: u16, size: u8) -> Option<usize> {
        let i = self.find(port)?;
        let r = &self.ranges[i];
        let fits = port as u32 + size as u32 - 1 <= r.last as u32;
        (size == 1 || (r.width == Width::Any && fits)).then_some(i)
    }
}

fn mask(v: u32, size: u8) -> u32 {
    if size >= 4 {
        v
    } else {
        v & ((1 << (8 * size)) - 1)
    }
}

fn norm_size(size: u8) -> u8 {
    match size {
        1 | 2 => size,
        _ => 4,
    }
}

impl IoBus for PortBus {
    fn io_read(&mut self, port: u16, size: u8) -> u32 {
        let size = norm_size(size);
        if let Some(i) = self.whole(port, size) {
            let r = &self.ranges[i];
            let mut buf = [0xffu8; 4];
            lock(&r.dev).read((port - r.origin) as u64, &mut buf[..size as usize]);
            let v = u32::from_le_bytes(buf);
            return mask(v, size);
        }
        if let Some(f) = &self.fallback {
            if self.unclaimed(port, size) {
                let mut buf = [0xffu8; 4];
                lock(f).read(port as u64, &mut buf[..size as usize]);
                return mask(u32::from_le_bytes(buf), size);
            }
        }
        if size == 1 {
            return 0xff;
        }
        let mut v = 0u32;
        for k in 0..size {
            // Ports wrap at 0xffff like the address lines do.
            let b = self.io_read(port.wrapping_add(k as u16), 1) & 0xff;
            v |= b << (8 * k);
        }
        v
    }

    fn io_write(&mut self, port: u16, size: u8, value: u32) {
        let size = norm_size(size);
        if let Some(i) = self.whole(port, size) {
            if let Some(f) = &self.written {
                f.store(true, Ordering::Relaxed);
            }
            let r = &self.ranges[i];
            let bytes = value.to_le_bytes();
            lock(&r.dev).write((port - r.origin) as u64, &bytes[..size as usize]);
            return;
        }
        if let Some(f) = &self.fallback {
            if self.unclaimed(port, size) {
                if let Some(w) = &self.written {
                    w.store(true, Ordering::Relaxed);
                }
                let bytes = value.to_le_bytes();
                lock(f).write(port as u64, &bytes[..size as usize]);
                return;
            }
        }
        if size == 1 {
            log::trace!("write to unclaimed port {port:#x}: {value:#x}");
            return;
        }
        for k in 0..size {
            self.io_write(port.wrapping_add(k as u16), 1, (value >> (8 * k)) & 0xff);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Records every access it sees; reads return `offset + 0x10` in each byte.
    #[derive(Default)]
    struct Probe {
        log: Vec<(char, u64, Vec<u8>)>,
    }
    impl BusDevice for Probe {
        fn read(&mut self, offset: u64, data: &mut [u8]) {
            for (k, b) in data.iter_mut().enumerate() {
                *b = (offset as u8).wrapping_add(0x10 + k as u8);
            }
            self.log.push(('r', offset, data.to_vec()));
        }
        fn write(&mut self, offset: u64, data: &[u8]) {
            self.log.push(('w', offset, data.to_vec()));
        }
    }

    fn probe() -> (Arc<Mutex<Probe>>, SharedDevice) {
        let p = Arc::new(Mutex::new(Probe::default()));
        let d: SharedDevice = p.clone();
        (p, d)
    }

    #[test]
    fn unclaimed_ports_read_all_ones() {
        let mut bus = PortBus::new();
        assert_eq!(bus.io_read(0x1234, 1), 0xff);
        assert_eq!(bus.io_read(0x1234, 2), 0xffff);
        assert_eq!(bus.io_read(0x1234, 4), 0xffff_ffff);
        bus.io_write(0x1234, 4, 0); // vanishes
    }

    #[test]
    fn overlap_is_refused_with_both_names() {
        let mut bus = PortBus::new();
        let (_, d) = probe();
        bus.register("pic", 0x20, 2, 0x20, Width::Bytes, d.clone())
            .unwrap();
        let e = bus
            .register("bad", 0x1f, 2, 0x1f, Width::Bytes, d.clone())
            .unwrap_err();
        let msg = e.to_string();
        assert!(msg.contains("pic") && msg.contains("bad"), "{msg}");
        assert!(bus
            .register("ok", 0x22, 1, 0x22, Width::Bytes, d.clone())
            .is_ok());
        assert!(matches!(
            bus.register("x", 0xffff, 2, 0, Width::Bytes, d.clone()),
            Err(BusError::BadRange { .. })
        ));
        assert!(bus.register("x", 0x30, 0, 0, Width::Bytes, d).is_err());
        assert_eq!(bus.owner(0x21), Some("pic"));
        assert_eq!(bus.owner(0x23), None);
    }

    #[test]
    fn byte_devices_see_split_accesses() {
        let mut bus = PortBus::new();
        let (p, d) = probe();
        bus.register("dev", 0x60, 2, 0x60, Width::Bytes, d).unwrap();
        // A word read at 0x60 reads 0x60 and 0x61 separately: 0x10 then 0x11.
        assert_eq!(bus.io_read(0x60, 2), 0x1110);
        // A dword read at 0x61 gets 0x61 from the device and ones above it.
        assert_eq!(bus.io_read(0x61, 4), 0xffff_ff11);
        bus.io_write(0x60, 2, 0xbbaa);
        let log = &p.lock().unwrap().log;
        assert_eq!(log[log.len() - 2], ('w', 0, vec![0xaa]));
        assert_eq!(log[log.len() - 1], ('w', 1, vec![0xbb]));
    }

    #[test]
    fn any_width_devices_see_whole_accesses_and_origin() {
        let mut bus = PortBus::new();
        let (p, d) = probe();
        bus.register("pci", 0xcfc, 4, 0xcf8, Width::Any, d).unwrap();
        assert_eq!(bus.io_read(0xcfc, 4), 0x1716_1514);
        bus.io_write(0xcfe, 2, 0x1234);
        assert_eq!(
            p.lock().unwrap().log.last().unwrap(),
            &('w', 6, vec![0x34, 0x12])
        );
        // Running off the end of the range: split, the outside byte reads 0xff.
        assert_eq!(bus.io_read(0xcfe, 4), 0xffff_1716);
    }

    #[test]
    fn write_flag_set_on_claimed_writes_only() {
        let mut bus = PortBus::new();
        let (_, d) = probe();
        bus.register("dev", 0x40, 4, 0x40, Width::Bytes, d).unwrap();
        let f = Arc::new(AtomicBool::new(false));
        bus.set_write_flag(f.clone());
        bus.io_write(0x1234, 1, 0);
        bus.io_read(0x40, 1);
        assert!(!f.load(Ordering::Relaxed));
        bus.io_write(0x43, 1, 0x34);
        assert!(f.load(Ordering::Relaxed));
    }

    #[test]
    fn fallback_gets_unclaimed_accesses_whole() {
        let mut bus = PortBus::new();
        let (_, d) = probe();
        bus.register("dev", 0x60, 1, 0x60, Width::Bytes, d).unwrap();
        let (fb, f) = probe();
        bus.set_fallback(f);
        assert_eq!(bus.io_read(0xc000, 4), 0x1312_1110);
        assert_eq!(
            fb.lock().unwrap().log.last().unwrap().1,
            0xc000,
            "absolute port"
        );
        bus.io_write(0xc002, 2, 0xbeef);
        assert_eq!(
            fb.lock().unwrap().log.last().unwrap(),
            &('w', 0xc002, vec![0xef, 0xbe])
        );
        // Straddling a registered port: split; the claimed byte goes to its device.
        assert_eq!(
            bus.io_read(0x5f, 2),
            0x106f,
            "0x5f from the fallback, 0x60 from dev"
        );
        assert_eq!(bus.io_read(0x60, 1), 0x10);
    }

    #[test]
    fn access_wrapping_past_ffff_is_harmless() {
        let mut bus = PortBus::new();
        let (_, d) = probe();
        bus.register("top", 0xffff, 1, 0xffff, Width::Bytes, d)
            .unwrap();
        assert_eq!(bus.io_read(0xffff, 4), 0xffff_ff10);
        bus.io_write(0xffff, 4, 0x1234_5678);
    }
}
