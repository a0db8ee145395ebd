//! The device bus traits (ARCHITECTURE.md section 5), in the rust-vmm tradition.
//!
//! Devices live in `morph86-devices`; this crate only defines how the CPU and the
//! physical memory map reach them, so that `cpu` and `devices` never depend on each other.

/// A device reachable through a range of guest-physical addresses or I/O ports.
///
/// `offset` is relative to the start of the range the device was registered at.
/// A device must accept any offset and any length the guest produces: it logs and
/// ignores what it does not understand, and never panics.
pub trait BusDevice: Send {
    /// Reads `data.len()` bytes (1, 2, 4 or 8) at `offset`; unwritten bytes read as the
    /// device chooses (open bus reads 0xff).
    fn read(&mut self, offset: u64, data: &mut [u8]);
    /// Writes `data.len()` bytes (1, 2, 4 or 8) at `offset`.
    fn write(&mut self, offset: u64, data: &[u8]);
}

/// The port-I/O side of the machine, as the CPU sees it (IN, OUT, INS, OUTS).
pub trait IoBus: Send {
    /// Reads `size` bytes (1, 2 or 4) from `port`; an unclaimed port reads all ones.
    fn io_read(&mut self, port: u16, size: u8) -> u32;
    /// Writes the low `size` bytes (1, 2 or 4) of `value` to `port`.
    fn io_write(&mut self, port: u16, size: u8, value: u32);
}

/// An I/O bus with nothing on it: reads return all ones, writes vanish.
#[derive(Debug, Default, Clone, Copy)]
pub struct NullIo;

impl IoBus for NullIo {
    fn io_read(&mut self, _port: u16, size: u8) -> u32 {
        match size {
            1 => 0xff,
            2 => 0xffff,
            _ => 0xffff_ffff,
        }
    }
    fn io_write(&mut self, _port: u16, _size: u8, _value: u32) {}
}
