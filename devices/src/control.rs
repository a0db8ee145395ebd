//! The platform control handle: requests devices make of the machine (reset, A20,
//! exit) as flags the run loop reads. Devices never touch the CPU or memory map
//! themselves: port 0x92, the i8042 output port, 0xcf9 and isa-debug-exit all end here.
//!
//! Cheap to clone, lock-free; safe to use from any thread. [`PlatformControl::pending`]
//! is one atomic load, meant for the run loop's "anything to do?" test.

use std::sync::atomic::{AtomicBool, AtomicU32, Ordering};
use std::sync::Arc;

/// What asked for a reset (for logs).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ResetSource {
    /// Port 0x92 bit 0 (fast reset).
    Port92,
    /// The i8042: pulse of output port bit 0 (command 0xFE) or a write clearing it.
    Keyboard,
    /// The reset control register at 0xcf9.
    ResetControl,
}

#[derive(Debug)]
struct Inner {
    /// Bit 0: reset requested; bit 1: A20 changed; bit 2: exit requested.
    pending: AtomicU32,
    a20: AtomicBool,
    exit_code: AtomicU32,
}

const PEND_RESET: u32 = 0b001;
const PEND_A20: u32 = 0b010;
const PEND_EXIT: u32 = 0b100;

/// Shared flags between the devices and the machine's run loop.
#[derive(Debug, Clone)]
pub struct PlatformControl {
    inner: Arc<Inner>,
}

impl Default for PlatformControl {
    fn default() -> Self {
        Self::new()
    }
}

impl PlatformControl {
    /// No requests; A20 enabled (as the i8042 output port's power-on value has it).
    pub fn new() -> Self {
        PlatformControl {
            inner: Arc::new(Inner {
                pending: AtomicU32::new(0),
                a20: AtomicBool::new(true),
                exit_code: AtomicU32::new(0),
            }),
        }
    }

    /// Whether any request awaits the run loop.
    pub fn pending(&self) -> bool {
        self.inner.pending.load(Ordering::SeqCst) != 0
    }

    /// Devices: drive the A20 gate (the last writer wins, as both sources drive one line).
    pub fn set_a20(&self, on: bool) {
        let old = self.inner.a20.swap(on, Ordering::SeqCst);
        if old != on {
            self.inner.pending.fetch_or(PEND_A20, Ordering::SeqCst);
        }
    }

    /// The A20 gate state.
    pub fn a20(&self) -> bool {
        self.inner.a20.load(Ordering::SeqCst)
    }

    /// Run loop: `Some(state)` once after each change of the A20 gate.
    pub fn take_a20_change(&self) -> Option<bool> {
        let p = self.inner.pending.fetch_and(!PEND_A20, Ordering::SeqCst);
        (p & PEND_A20 != 0).then(|| self.a20())
    }

    /// Devices: ask for a system reset.
    pub fn request_reset(&self, from: ResetSource) {
        log::info!("reset requested by {from:?}");
        self.inner.pending.fetch_or(PEND_RESET, Ordering::SeqCst);
    }

    /// Run loop: whether a reset was requested since the last call.
    pub fn take_reset(&self) -> bool {
        self.inner.pending.fetch_and(!PEND_RESET, Ordering::SeqCst) & PEND_RESET != 0
    }

    /// Devices: ask the emulator to exit with host status `code`.
    pub fn request_exit(&self, code: u32) {
        log::info!("exit requested with status {code}");
        self.inner.exit_code.store(code, Ordering::SeqCst);
        self.inner.pending.fetch_or(PEND_EXIT, Ordering::SeqCst);
    }

    /// Run loop: the exit status asked for, if an exit was requested.
    pub fn take_exit(&self) -> Option<u32> {
        let p = self.inner.pending.fetch_and(!PEND_EXIT, Ordering::SeqCst);
        (p & PEND_EXIT != 0).then(|| self.inner.exit_code.load(Ordering::SeqCst))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn requests_are_taken_once() {
        let c = PlatformControl::new();
        assert!(!c.pending());
        assert!(c.a20());
        c.set_a20(true);
        assert!(!c.pending(), "no change, no event");
        c.clone().set_a20(false);
        assert!(c.pending());
        assert_eq!(c.take_a20_change(), Some(false));
        assert_eq!(c.take_a20_change(), None);
        c.request_reset(ResetSource::Port92);
        assert!(c.take_reset());
        assert!(!c.take_reset());
        c.request_exit(7);
        assert_eq!(c.take_exit(), Some(7));
        assert_eq!(c.take_exit(), None);
        assert!(!c.pending());
    }
}
