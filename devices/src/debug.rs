//! Debug ports, with QEMU's semantics:
//! - [`DebugExit`]: `isa-debug-exit` at 0xf4: a write of V asks the machine to end the
//!   process with status `(V << 1) | 1` (through [`PlatformControl::request_exit`]).
//! - [`DebugCon`]: the Bochs/QEMU debug console at 0xe9: written bytes go to a writer;
//!   reads return 0xe9 so a guest can detect it.
//! - [`PostPort`]: port 0x80, POST codes: logged at debug level under the log target
//!   [`POST_LOG_TARGET`] (the frontend enables that target for `-d post`), the last code
//!   kept for inspection.

use std::io::Write;

use morph86_mmu::BusDevice;

use crate::control::PlatformControl;

/// isa-debug-exit port.
pub const PORT_DEBUG_EXIT: u16 = 0xf4;
/// Debug console port.
pub const PORT_DEBUGCON: u16 = 0xe9;
/// POST code port.
pub const PORT_POST: u16 = 0x80;
/// Log target of POST codes.
pub const POST_LOG_TARGET: &str = "morph86_devices::debug::post";

/// isa-debug-exit.
pub struct DebugExit {
    ctl: PlatformControl,
}

impl DebugExit {
    /// The device, reporting to `ctl`.
    pub fn new(ctl: PlatformControl) -> Self {
        DebugExit { ctl }
    }
}

impl BusDevice for DebugExit {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0);
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        if offset != 0 {
            return; // a byte of a split access, or a neighbouring port
        }
        let mut b = [0u8; 4];
        let n = data.len().min(4);
        b[..n].copy_from_slice(&data[..n]);
        let v = u32::from_le_bytes(b);
        self.ctl.request_exit(v.wrapping_shl(1) | 1);
    }
}

/// The 0xe9 debug console.
pub struct DebugCon {
    out: Box<dyn Write + Send>,
}

impl DebugCon {
    /// A console writing to `out` (flushed at each newline).
    pub fn new(out: Box<dyn Write + Send>) -> Self {
        DebugCon { out }
    }
}

impl BusDevice for DebugCon {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(PORT_DEBUGCON as u8);
    }
    fn write(&mut self, _offset: u64, data: &[u8]) {
        let Some(&b) = data.first() else { return };
        if let Err(e) = self.out.write_all(&[b]) {
            log::warn!("debugcon: write failed: {e}");
        }
        if b == b'\n' {
            let _ = self.out.flush();
        }
    }
}

/// Port 0x80.
#[derive(Debug, Default)]
pub struct PostPort {
    last: Option<u8>,
}

impl PostPort {
    /// The port, no code written yet.
    pub fn new() -> Self {
        Self::default()
    }
    /// The last POST code written.
    pub fn last(&self) -> Option<u8> {
        self.last
    }
}

impl BusDevice for PostPort {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0xff); // nothing drives the bus on a read, as in QEMU
    }
    fn write(&mut self, _offset: u64, data: &[u8]) {
        let Some(&b) = data.first() else { return };
        if self.last != Some(b) {
            log::debug!(target: POST_LOG_TARGET, "POST {b:#04x}");
        }
        self.last = Some(b);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::sync::{Arc, Mutex};

    #[derive(Clone, Default)]
    struct Sink(Arc<Mutex<Vec<u8>>>);
    impl Write for Sink {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    #[test]
    fn debug_exit_status_is_value_shl1_or1() {
        let ctl = PlatformControl::new();
        let mut d = DebugExit::new(ctl.clone());
        d.write(0, &[0x10]);
        assert_eq!(ctl.take_exit(), Some(0x21));
        d.write(0, &[0]);
        assert_eq!(ctl.take_exit(), Some(1));
        d.write(0, &[0xff, 0xff, 0xff, 0xff]);
        assert_eq!(ctl.take_exit(), Some(0xffff_ffff));
    }

    #[test]
    fn debugcon_writes_bytes_and_reads_e9() {
        let s = Sink::default();
        let mut d = DebugCon::new(Box::new(s.clone()));
        for &b in b"hi\n" {
            d.write(0, &[b]);
        }
        assert_eq!(&*s.0.lock().unwrap(), b"hi\n");
        let mut b = [0];
        d.read(0, &mut b);
        assert_eq!(b[0], 0xe9);
    }

    #[test]
    fn post_code_is_kept() {
        let mut p = PostPort::new();
        assert_eq!(p.last(), None);
        p.write(0, &[0x55]);
        assert_eq!(p.last(), Some(0x55));
        p.write(0, &[]);
    }
}
