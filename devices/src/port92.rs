//! System Control Port A at 0x92 (PS/2 "fast A20 and reset", PIIX3 datasheet 4.7.3
//! "Port 92h"). Bit 1 gates A20, a 0→1 transition of bit 0 resets the machine.
//! Both reach the machine through [`PlatformControl`].

use morph86_mmu::BusDevice;

use crate::control::{PlatformControl, ResetSource};

/// The port.
pub const PORT_92: u16 = 0x92;
/// Bit 0: fast reset (INIT pulse on a 0→1 transition).
pub const P92_RESET: u8 = 0b0000_0001;
/// Bit 1: A20 gate (1 = A20 enabled).
pub const P92_A20: u8 = 0b0000_0010;

/// Port 0x92, registered with one port at its own origin.
pub struct Port92 {
    value: u8,
    ctl: PlatformControl,
}

impl Port92 {
    /// The port at power-on (0: A20 left to the keyboard controller's setting).
    pub fn new(ctl: PlatformControl) -> Self {
        Port92 { value: 0, ctl }
    }

    /// Snapshot: the register value.
    pub fn save(&self) -> u8 {
        self.value
    }

    /// Restores the register value (A20 itself is machine state, restored there).
    pub fn restore(&mut self, v: u8) {
        self.value = v;
    }

    /// Back to the power-on value (machine reset).
    pub fn reset(&mut self) {
        self.value = 0;
    }
}

impl BusDevice for Port92 {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        data.fill(0xff);
        if let Some(b) = data.first_mut() {
            // Bit 1 shows the gate as the machine has it, whoever set it.
            *b = (self.value & !P92_A20) | if self.ctl.a20() { P92_A20 } else { 0 };
        }
    }

    fn write(&mut self, _offset: u64, data: &[u8]) {
        let Some(&v) = data.first() else { return };
        let old = self.value;
        self.value = v;
        // Every write drives the A20 line (read-modify-write is the guest's job).
        self.ctl.set_a20(v & P92_A20 != 0);
        if v & P92_RESET != 0 && old & P92_RESET == 0 {
            self.ctl.request_reset(ResetSource::Port92);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a20_and_reset_transitions() {
        let ctl = PlatformControl::new();
        ctl.set_a20(false);
        ctl.take_a20_change();
        let mut p = Port92::new(ctl.clone());
        let mut b = [0];
        p.read(0, &mut b);
        assert_eq!(b[0] & P92_A20, 0);
        p.write(0, &[P92_A20]);
        assert_eq!(ctl.take_a20_change(), Some(true));
        p.read(0, &mut b);
        assert_eq!(b[0], P92_A20);
        assert!(!ctl.take_reset());
        p.write(0, &[P92_A20 | P92_RESET]);
        assert!(ctl.take_reset());
        p.write(0, &[P92_A20 | P92_RESET]);
        assert!(!ctl.take_reset(), "only a 0->1 transition resets");
        p.write(0, &[0]);
        assert_eq!(ctl.take_a20_change(), Some(false));
        p.write(0, &[]);
        p.read(0, &mut []);
    }
}
