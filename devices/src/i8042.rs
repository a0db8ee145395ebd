//! Intel 8042 keyboard controller (ports 0x60 data, 0x64 status/command) with a PS/2
//! keyboard on its first port and a PS/2 mouse on its auxiliary port.
//!
//! References: the IBM PC/AT Technical Reference ("Keyboard Controller"), the IBM PS/2
//! Hardware Interface Technical Reference ("Keyboard and Auxiliary Device Controller",
//! "Keyboard", "Pointing Device"). Register bits are named below with those sections.
//!
//! Key presses are injected by the frontend as **set 1 (XT) make codes**, extended keys as
//! `0xE0xx` ([`I8042::key_event`]). When the controller translates (command byte bit 6,
//! as BIOSes and Linux leave it) the guest receives set 1, which is what a set-2 keyboard
//! behind a translating 8042 produces; with translation off and the keyboard in set 2 the
//! codes are converted to set 2. Pause/Break (a make-only sequence) is not modelled.
//!
//! Reset and A20 from the output port go to the machine through [`PlatformControl`].

use std::collections::VecDeque;

use morph86_mmu::BusDevice;

use crate::control::{PlatformControl, ResetSource};
use crate::irq::IrqLine;

/// Data port.
pub const PORT_DATA: u16 = 0x60;
/// Status (read) / command (write) port.
pub const PORT_CMD: u16 = 0x64;

/// Status bit 0: output buffer full.
pub const ST_OBF: u8 = 0b0000_0001;
/// Status bit 1: input buffer full (never: input is processed at once).
pub const ST_IBF: u8 = 0b0000_0010;
/// Status bit 2: system flag (command byte bit 2).
pub const ST_SYS: u8 = 0b0000_0100;
/// Status bit 3: last write was to the command port.
pub const ST_CMD: u8 = 0b0000_1000;
/// Status bit 4: keyboard not inhibited (keylock switch).
pub const ST_UNLOCKED: u8 = 0b0001_0000;
/// Status bit 5: the output buffer holds auxiliary-device data.
pub const ST_AUX_OBF: u8 = 0b0010_0000;

/// Command byte bit 0: IRQ1 on keyboard data.
pub const CB_KBD_INT: u8 = 0b0000_0001;
/// Command byte bit 1: IRQ12 on auxiliary data.
pub const CB_AUX_INT: u8 = 0b0000_0010;
/// Command byte bit 2: system flag.
pub const CB_SYS: u8 = 0b0000_0100;
/// Command byte bit 4: keyboard interface disabled.
pub const CB_KBD_DISABLE: u8 = 0b0001_0000;
/// Command byte bit 5: auxiliary interface disabled.
pub const CB_AUX_DISABLE: u8 = 0b0010_0000;
/// Command byte bit 6: translate keyboard codes to set 1.
pub const CB_XLATE: u8 = 0b0100_0000;

/// Output port bit 0: system reset line (0 resets the CPU).
pub const OUT_RESET: u8 = 0b0000_0001;
/// Output port bit 1: A20 gate.
pub const OUT_A20: u8 = 0b0000_0010;
/// Output port bit 4: output buffer full (keyboard IRQ line).
pub const OUT_OBF: u8 = 0b0001_0000;
/// Output port bit 5: auxiliary output buffer full (IRQ12 line).
pub const OUT_AUX_OBF: u8 = 0b0010_0000;

/// Controller command: read command byte (0x20-0x3f read internal RAM).
pub const CMD_READ_RAM: u8 = 0x20;
/// Controller command: write command byte (0x60-0x7f write internal RAM).
pub const CMD_WRITE_RAM: u8 = 0x60;
/// Controller command: disable auxiliary interface.
pub const CMD_AUX_DISABLE: u8 = 0xa7;
/// Controller command: enable auxiliary interface.
pub const CMD_AUX_ENABLE: u8 = 0xa8;
/// Controller command: auxiliary interface test (0x00 = ok).
pub const CMD_AUX_TEST: u8 = 0xa9;
/// Controller command: self test (0x55 = ok).
pub const CMD_SELF_TEST: u8 = 0xaa;
/// Controller command: keyboard interface test (0x00 = ok).
pub const CMD_KBD_TEST: u8 = 0xab;
/// Controller command: disable keyboard interface.
pub const CMD_KBD_DISABLE: u8 = 0xad;
/// Controller command: enable keyboard interface.
pub const CMD_KBD_ENABLE: u8 = 0xae;
/// Controller command: read input port.
pub const CMD_READ_INPUT: u8 = 0xc0;
/// Controller command: read output port.
pub const CMD_READ_OUTPUT: u8 = 0xd0;
/// Controller command: write output port (next data byte).
pub const CMD_WRITE_OUTPUT: u8 = 0xd1;
/// Controller command: write keyboard output buffer (next data byte).
pub const CMD_WRITE_KBD_OBUF: u8 = 0xd2;
/// Controller command: write auxiliary output buffer (next data byte).
pub const CMD_WRITE_AUX_OBUF: u8 = 0xd3;
/// Controller command: write to auxiliary device (next data byte).
pub const CMD_WRITE_AUX: u8 = 0xd4;
/// Controller command: disable A20 (HP Vectra extension).
pub const CMD_A20_DISABLE: u8 = 0xdd;
/// Controller command: enable A20.
pub const CMD_A20_ENABLE: u8 = 0xdf;
/// Controller command: read test inputs.
pub const CMD_READ_TEST: u8 = 0xe0;
/// Controller commands 0xf0-0xff pulse output port bits 3-0 low where the command bit is 0.
pub const CMD_PULSE: u8 = 0xf0;

/// Device response: acknowledge.
pub const ACK: u8 = 0xfa;
/// Device response: resend / not understood.
pub const RESEND: u8 = 0xfe;
/// Device response: basic assurance test passed.
pub const BAT_OK: u8 = 0xaa;

/// Most bytes a device buffers before dropping input.
pub const DEVICE_QUEUE_MAX: usize = 64;

/// (set 1, set 2) make codes of the keys; extended keys use the same table after 0xE0,
/// plus the three Windows keys.
const SET1_TO_SET2: &[(u8, u8)] = &[
    (0x01, 0x76),
    (0x02, 0x16),
    (0x03, 0x1e),
    (0x04, 0x26),
    (0x05, 0x25),
    (0x06, 0x2e),
    (0x07, 0x36),
    (0x08, 0x3d),
    (0x09, 0x3e),
    (0x0a, 0x46),
    (0x0b, 0x45),
    (0x0c, 0x4e),
    (0x0d, 0x55),
    (0x0e, 0x66),
    (0x0f, 0x0d),
    (0x10, 0x15),
    (0x11, 0x1d),
    (0x12, 0x24),
    (0x13, 0x2d),
    (0x14, 0x2c),
    (0x15, 0x35),
    (0x16, 0x3c),
    (0x17, 0x43),
    (0x18, 0x44),
    (0x19, 0x4d),
    (0x1a, 0x54),
    (0x1b, 0x5b),
    (0x1c, 0x5a),
    (0x1d, 0x14),
    (0x1e, 0x1c),
    (0x1f, 0x1b),
    (0x20, 0x23),
    (0x21, 0x2b),
    (0x22, 0x34),
    (0x23, 0x33),
    (0x24, 0x3b),
    (0x25, 0x42),
    (0x26, 0x4b),
    (0x27, 0x4c),
    (0x28, 0x52),
    (0x29, 0x0e),
    (0x2a, 0x12),
    (0x2b, 0x5d),
    (0x2c, 0x1a),
    (0x2d, 0x22),
    (0x2e, 0x21),
    (0x2f, 0x2a),
    (0x30, 0x32),
    (0x31, 0x31),
    (0x32, 0x3a),
    (0x33, 0x41),
    (0x34, 0x49),
    (0x35, 0x4a),
    (0x36, 0x59),
    (0x37, 0x7c),
    (0x38, 0x11),
    (0x39, 0x29),
    (0x3a, 0x58),
    (0x3b, 0x05),
    (0x3c, 0x06),
    (0x3d, 0x04),
    (0x3e, 0x0c),
    (0x3f, 0x03),
    (0x40, 0x0b),
    (0x41, 0x83),
    (0x42, 0x0a),
    (0x43, 0x01),
    (0x44, 0x09),
    (0x45, 0x77),
    (0x46, 0x7e),
    (0x47, 0x6c),
    (0x48, 0x75),
    (0x49, 0x7d),
    (0x4a, 0x7b),
    (0x4b, 0x6b),
    (0x4c, 0x73),
    (0x4d, 0x74),
    (0x4e, 0x79),
    (0x4f, 0x69),
    (0x50, 0x72),
    (0x51, 0x7a),
    (0x52, 0x70),
    (0x53, 0x71),
    (0x54, 0x84),
    (0x56, 0x61),
    (0x57, 0x78),
    (0x58, 0x07),
    (0x5b, 0x1f),
    (0x5c, 0x27),
    (0x5d, 0x2f),
    (0x5e, 0x37),
    (0x5f, 0x3f),
    (0x63, 0x5e),
];

fn set2_of(set1: u8) -> Option<u8> {
    SET1_TO_SET2
        .iter()
        .find(|&&(a, _)| a == set1)
        .map(|&(_, b)| b)
}

fn push_capped(q: &mut VecDeque<u8>, bytes: &[u8], who: &str) -> bool {
    if q.len() + bytes.len() > DEVICE_QUEUE_MAX {
        log::debug!("i8042: {who} buffer full, {} bytes dropped", bytes.len());
        return false;
    }
    q.extend(bytes);
    true
}

/// The PS/2 keyboard.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct Keyboard {
    out: VecDeque<u8>,
    scanning: bool,
    set: u8,
    pending: Option<u8>,
    last: u8,
    leds: u8,
    typematic: u8,
}

impl Keyboard {
    fn new() -> Self {
        Keyboard {
            out: VecDeque::new(),
            scanning: true,
            set: 2,
            pending: None,
            last: 0,
            leds: 0,
            typematic: 0b0010_1011, // 10.9 cps, 500 ms
        }
    }

    fn defaults(&mut self) {
        self.set = 2;
        self.typematic = 0b0010_1011;
    }

    fn send(&mut self, bytes: &[u8]) {
        if let Some(&b) = bytes.last() {
            self.last = b;
        }
        push_capped(&mut self.out, bytes, "keyboard");
    }

    /// A byte from the host (via the controller's data port).
    fn command(&mut self, b: u8, xlate: bool) {
        if let Some(c) = self.pending.take() {
            if b < 0x80 {
                match c {
                    0xed => self.leds = b & 0b111,
                    0xf3 => self.typematic = b,
                    _ => match b {
                        0 => {
                            let id = if xlate {
                                [0x43, 0x41, 0x3f][(self.set - 1) as usize]
                            } else {
                                self.set
                            };
                            self.send(&[ACK, id]);
                            return;
                        }
                        1..=3 => self.set = b,
                        _ => {
                            self.send(&[RESEND]);
                            return;
                        }
                    },
                }
                self.send(&[ACK]);
                return;
            }
            // A command byte where a parameter was expected starts a new command.
        }
        match b {
            0xed | 0xf3 | 0xf0 => {
                self.pending = Some(b);
                self.send(&[ACK]);
            }
            0xee => self.send(&[0xee]),
            0xf2 => self.send(&[ACK, 0xab, if xlate { 0x41 } else { 0x83 }]),
            0xf4 => {
                self.scanning = true;
                self.send(&[ACK]);
            }
            0xf5 => {
                self.scanning = false;
                self.defaults();
                self.send(&[ACK]);
            }
            0xf6 => {
                self.defaults();
                self.send(&[ACK]);
            }
            0xf7..=0xfd => self.send(&[ACK]),
            0xfe => {
                let l = self.last;
                push_capped(&mut self.out, &[l], "keyboard");
            }
            0xff => {
                self.out.clear();
                self.defaults();
                self.scanning = true;
                self.leds = 0;
                self.send(&[ACK, BAT_OK]);
            }
            _ => self.send(&[RESEND]),
        }
    }

    /// A key: `code` is a set 1 make code, `0xE0xx` for extended keys.
    fn key(&mut self, code: u16, down: bool, xlate: bool) {
        if !self.scanning {
            return;
        }
        let ext = code >> 8 == 0xe0;
        let base = code as u8 & 0x7f;
        let mut bytes = Vec::with_capacity(3);
        if xlate || self.set == 1 {
            if ext {
                bytes.push(0xe0);
            }
            bytes.push(base | if down { 0 } else { 0x80 });
        } else {
            let Some(c2) = set2_of(base) else {
                log::debug!("i8042: no set 2 code for key {code:#x}");
                return;
            };
            if ext {
                bytes.push(0xe0);
            }
            if !down {
                bytes.push(0xf0);
            }
            bytes.push(c2);
        }
        push_capped(&mut self.out, &bytes, "keyboard");
    }
}

/// The PS/2 mouse.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
struct Mouse {
    out: VecDeque<u8>,
    reporting: bool,
    remote: bool,
    wrap: bool,
    scaling21: bool,
    rate: u8,
    resolution: u8,
    id: u8,
    rates: [u8; 3],
    pending: Option<u8>,
    last: u8,
    buttons: u8,
    dx: i32,
    dy: i32,
    dz: i32,
}

/// Packet byte 0 bit 3: always 1.
const PKT_ALWAYS1: u8 = 0b0000_1000;
/// Packet byte 0 bit 4: X sign.
const PKT_XSIGN: u8 = 0b0001_0000;
/// Packet byte 0 bit 5: Y sign.
const PKT_YSIGN: u8 = 0b0010_0000;

impl Mouse {
    fn new() -> Self {
        Mouse {
            out: VecDeque::new(),
            reporting: false,
            remote: false,
            wrap: false,
            scaling21: false,
            rate: 100,
            resolution: 2,
            id: 0,
            rates: [0; 3],
            pending: None,
            last: 0,
            buttons: 0,
            dx: 0,
            dy: 0,
            dz: 0,
        }
    }

    fn defaults(&mut self) {
        self.rate = 100;
        self.resolution = 2;
        self.scaling21 = false;
        self.reporting = false;
        self.remote = false;
    }

    fn send(&mut self, bytes: &[u8]) {
        if let Some(&b) = bytes.last() {
            self.last = b;
        }
        push_capped(&mut self.out, bytes, "mouse");
    }

    fn packet(&mut self) -> Vec<u8> {
        let dx = self.dx.clamp(-256, 255);
        let dy = self.dy.clamp(-256, 255);
        let dz = self.dz.clamp(-8, 7);
        self.dx -= dx;
        self.dy -= dy;
        self.dz -= dz;
        let mut b0 = PKT_ALWAYS1 | (self.buttons & 0b111);
        if dx < 0 {
            b0 |= PKT_XSIGN;
        }
        if dy < 0 {
            b0 |= PKT_YSIGN;
        }
        let mut p = vec![b0, dx as u8, dy as u8];
        if self.id == 3 {
            p.push(dz as u8);
        }
        p
    }

    fn command(&mut self, b: u8) {
        if self.wrap && b != 0xec && b != 0xff {
            self.send(&[b]);
            return;
        }
        if let Some(c) = self.pending.take() {
            match c {
                0xf3 => {
                    self.rate = b;
                    self.rates = [self.rates[1], self.rates[2], b];
                    if self.rates == [200, 100, 80] {
                        self.id = 3; // IntelliMouse wheel unlocked
                    }
                }
                _ => self.resolution = b & 3,
            }
            self.send(&[ACK]);
            return;
        }
        match b {
            0xe6 => {
                self.scaling21 = false;
                self.send(&[ACK]);
            }
            0xe7 => {
                self.scaling21 = true;
                self.send(&[ACK]);
            }
            0xe8 | 0xf3 => {
                self.pending = Some(b);
                self.send(&[ACK]);
            }
            0xe9 => {
                let s = ((self.remote as u8) << 6)
                    | ((self.reporting as u8) << 5)
                    | ((self.scaling21 as u8) << 4)
                    | ((self.buttons & 1) << 2)
                    | ((self.buttons & 4) >> 1)
                    | ((self.buttons & 2) >> 1);
                self.send(&[ACK, s, self.resolution, self.rate]);
            }
            0xea => {
                self.remote = false;
                self.send(&[ACK]);
            }
            0xeb => {
                let p = self.packet();
                self.send(&[ACK]);
                self.send(&p);
            }
            0xec => {
                self.wrap = false;
                self.send(&[ACK]);
            }
            0xee => {
                self.wrap = true;
                self.send(&[ACK]);
            }
            0xf0 => {
                self.remote = true;
                self.send(&[ACK]);
            }
            0xf2 => self.send(&[ACK, self.id]),
            0xf4 | 0xf5 => {
                // Enable/disable data reporting; both reset the movement counters.
                self.reporting = b == 0xf4;
                (self.dx, self.dy, self.dz) = (0, 0, 0);
                self.send(&[ACK]);
            }
            0xf6 => {
                self.defaults();
                self.send(&[ACK]);
            }
            0xfe => {
                let l = self.last;
                push_capped(&mut self.out, &[l], "mouse");
            }
            0xff => {
                self.out.clear();
                self.defaults();
                self.wrap = false;
                self.id = 0;
                self.send(&[ACK, BAT_OK, 0x00]);
            }
            _ => self.send(&[RESEND]),
        }
    }

    fn motion(&mut self, dx: i32, dy: i32, dz: i32, buttons: u8) {
        if !self.reporting && !self.remote {
            // Stream mode with reporting off: movement is not kept.
            self.buttons = buttons & 0b111;
            return;
        }
        self.dx = self.dx.saturating_add(dx);
        self.dy = self.dy.saturating_add(dy);
        self.dz = self.dz.saturating_add(dz);
        let changed = buttons & 0b111 != self.buttons;
        self.buttons = buttons & 0b111;
        if !self.reporting || self.remote {
            return;
        }
        let mut first = true;
        while first || self.dx != 0 || self.dy != 0 || (self.id == 3 && self.dz != 0) {
            first = false;
            if !changed && self.dx == 0 && self.dy == 0 && self.dz == 0 {
                break;
            }
            let p = self.packet();
            if !push_capped(&mut self.out, &p, "mouse") {
                self.dx = 0;
                self.dy = 0;
                break;
            }
        }
        self.dz = 0;
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
enum Source {
    Kbd,
    Aux,
}

/// Saved state of the controller and both devices (opaque).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct I8042State {
    ram: [u8; 32],
    outport: u8,
    last_was_cmd: bool,
    pending: Option<u8>,
    obuf: Option<(u8, Source)>,
    ctl_out: VecDeque<(u8, Source)>,
    last_data: u8,
    kbd: Keyboard,
    mouse: Mouse,
}

/// The controller with its two devices.
pub struct I8042 {
    ram: [u8; 32],
    outport: u8,
    last_was_cmd: bool,
    pending: Option<u8>,
    obuf: Option<(u8, Source)>,
    /// Controller responses and 0xD2/0xD3 bytes waiting for the output buffer; they
    /// bypass the interface-disable bits.
    ctl_out: VecDeque<(u8, Source)>,
    /// The last byte read from the output buffer (what an empty buffer reads as).
    last_data: u8,
    kbd: Keyboard,
    mouse: Mouse,
    irq1: Option<IrqLine>,
    irq12: Option<IrqLine>,
    ctl: PlatformControl,
}

impl I8042 {
    /// A controller wired to IRQ1/IRQ12 and the platform control flags.
    pub fn new(irq1: Option<IrqLine>, irq12: Option<IrqLine>, ctl: PlatformControl) -> Self {
        let mut c = I8042 {
            ram: [0; 32],
            outport: OUT_RESET | OUT_A20,
            last_was_cmd: false,
            pending: None,
            obuf: None,
            ctl_out: VecDeque::new(),
            last_data: 0,
            kbd: Keyboard::new(),
            mouse: Mouse::new(),
            irq1,
            irq12,
            ctl,
        };
        c.reset();
        c
    }

    /// Power-on state (machine reset).
    pub fn reset(&mut self) {
        self.ram = [0; 32];
        self.ram[0] = CB_XLATE | CB_SYS | CB_KBD_INT;
        self.outport = OUT_RESET | OUT_A20;
        self.last_was_cmd = false;
        self.pending = None;
        self.obuf = None;
        self.ctl_out.clear();
        self.kbd = Keyboard::new();
        self.mouse = Mouse::new();
        self.update_irq();
    }

    /// Snapshot.
    pub fn save(&self) -> I8042State {
        I8042State {
            ram: self.ram,
            outport: self.outport,
            last_was_cmd: self.last_was_cmd,
            pending: self.pending,
            obuf: self.obuf,
            ctl_out: self.ctl_out.clone(),
            last_data: self.last_data,
            kbd: self.kbd.clone(),
            mouse: self.mouse.clone(),
        }
    }

    /// Restores a snapshot taken by [`I8042::save`].
    pub fn restore(&mut self, s: &I8042State) {
        self.ram = s.ram;
        self.outport = s.outport;
        self.last_was_cmd = s.last_was_cmd;
        self.pending = s.pending;
        self.obuf = s.obuf;
        self.ctl_out = s.ctl_out.iter().copied().take(DEVICE_QUEUE_MAX).collect();
        self.last_data = s.last_data;
        self.kbd = s.kbd.clone();
        self.mouse = s.mouse.clone();
        self.kbd.set = self.kbd.set.clamp(1, 3);
        self.kbd.out.truncate(DEVICE_QUEUE_MAX);
        self.mouse.out.truncate(DEVICE_QUEUE_MAX);
        self.update_irq();
    }

    fn cmd_byte(&self) -> u8 {
        self.ram[0]
    }

    fn xlate(&self) -> bool {
        self.cmd_byte() & CB_XLATE != 0
    }

    /// Frontend: a key went down or up. `code` is a set 1 make code, `0xE0xx` for
    /// extended keys (e.g. 0x1E = A, 0xE048 = cursor up).
    pub fn key_event(&mut self, code: u16, down: bool) {
        let x = self.xlate();
        self.kbd.key(code, down, x);
        self.fill();
    }

    /// Frontend: the mouse moved by (`dx`, `dy`) (y grows upwards), the wheel by `dz`,
    /// with `buttons` held (bit 0 left, bit 1 right, bit 2 middle).
    pub fn mouse_event(&mut self, dx: i32, dy: i32, dz: i32, buttons: u8) {
        self.mouse.motion(dx, dy, dz, buttons);
        self.fill();
    }

    /// Moves the next byte into the empty output buffer.
    fn fill(&mut self) {
        if self.obuf.is_none() {
            let cb = self.cmd_byte();
            if let Some(e) = self.ctl_out.pop_front() {
                self.obuf = Some(e);
            } else if cb & CB_KBD_DISABLE == 0 && !self.kbd.out.is_empty() {
                self.obuf = self.kbd.out.pop_front().map(|b| (b, Source::Kbd));
            } else if cb & CB_AUX_DISABLE == 0 && !self.mouse.out.is_empty() {
                self.obuf = self.mouse.out.pop_front().map(|b| (b, Source::Aux));
            }
        }
        self.update_irq();
    }

    fn update_irq(&mut self) {
        let cb = self.ram[0];
        let (k, a) = match self.obuf {
            Some((_, Source::Kbd)) => (cb & CB_KBD_INT != 0, false),
            Some((_, Source::Aux)) => (false, cb & CB_AUX_INT != 0),
            None => (false, false),
        };
        if let Some(l) = &self.irq1 {
            l.set(k);
        }
        if let Some(l) = &self.irq12 {
            l.set(a);
        }
    }

    fn status(&self) -> u8 {
        let mut s = ST_UNLOCKED | (self.cmd_byte() & CB_SYS);
        if self.last_was_cmd {
            s |= ST_CMD;
        }
        match self.obuf {
            Some((_, Source::Kbd)) => s |= ST_OBF,
            Some((_, Source::Aux)) => s |= ST_OBF | ST_AUX_OBF,
            None => {}
        }
        s
    }

    fn output_port(&self) -> u8 {
        let mut v = self.outport & !(OUT_OBF | OUT_AUX_OBF);
        match self.obuf {
            Some((_, Source::Kbd)) => v |= OUT_OBF,
            Some((_, Source::Aux)) => v |= OUT_AUX_OBF,
            None => {}
        }
        v
    }

    fn write_output_port(&mut self, v: u8) {
        self.outport = v;
        // Every write drives the A20 line.
        self.ctl.set_a20(v & OUT_A20 != 0);
        if v & OUT_RESET == 0 {
            self.ctl.request_reset(ResetSource::Keyboard);
            self.outport |= OUT_RESET; // the reset line comes back up with the machine
        }
    }

    fn respond_from(&mut self, b: u8, src: Source) {
        if self.ctl_out.len() >= DEVICE_QUEUE_MAX {
            log::debug!("i8042: controller buffer full, byte dropped");
            return;
        }
        self.ctl_out.push_back((b, src));
    }

    fn respond(&mut self, b: u8) {
        self.respond_from(b, Source::Kbd);
    }

    fn command(&mut self, c: u8) {
        self.pending = None;
        match c {
            0x20..=0x3f => {
                let v = self.ram[(c & 0x1f) as usize];
                self.respond(v);
            }
            0x60..=0x7f
            | CMD_WRITE_OUTPUT
            | CMD_WRITE_KBD_OBUF
            | CMD_WRITE_AUX_OBUF
            | CMD_WRITE_AUX => self.pending = Some(c),
            CMD_AUX_DISABLE => self.ram[0] |= CB_AUX_DISABLE,
            CMD_AUX_ENABLE => self.ram[0] &= !CB_AUX_DISABLE,
            CMD_AUX_TEST | CMD_KBD_TEST => self.respond(0x00),
            CMD_SELF_TEST => {
                self.ram[0] |= CB_SYS;
                self.respond(0x55);
            }
            0xa4 => self.respond(0xf1), // no password installed
            CMD_KBD_DISABLE => self.ram[0] |= CB_KBD_DISABLE,
            CMD_KBD_ENABLE => self.ram[0] &= !CB_KBD_DISABLE,
            CMD_READ_INPUT => self.respond(0b1000_0000), // keyboard not inhibited
            CMD_READ_OUTPUT => {
                let v = self.output_port();
                self.respond(v);
            }
            CMD_A20_DISABLE => self.write_output_port(self.outport & !OUT_A20),
            CMD_A20_ENABLE => self.write_output_port(self.outport | OUT_A20),
            CMD_READ_TEST => self.respond(0x00),
            CMD_PULSE..=0xff => {
                if c & OUT_RESET == 0 {
                    self.ctl.request_reset(ResetSource::Keyboard);
                }
            }
            _ => log::debug!("i8042: unknown controller command {c:#x}"),
        }
        self.fill();
    }

    fn data(&mut self, v: u8) {
        match self.pending.take() {
            Some(c @ 0x60..=0x7f) => {
                self.ram[(c & 0x1f) as usize] = v;
            }
            Some(CMD_WRITE_OUTPUT) => self.write_output_port(v),
            Some(CMD_WRITE_KBD_OBUF) => self.respond_from(v, Source::Kbd),
            Some(CMD_WRITE_AUX_OBUF) => self.respond_from(v, Source::Aux),
            Some(CMD_WRITE_AUX) => {
                self.mouse.command(v);
            }
            _ => {
                let x = self.xlate();
                self.kbd.command(v, x);
            }
        }
        self.fill();
    }
}

impl BusDevice for I8042 {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        for (k, b) in data.iter_mut().enumerate() {
            *b = match offset + k as u64 {
                0 => {
                    if let Some((v, _)) = self.obuf.take() {
                        self.last_data = v;
                    }
                    let v = self.last_data; // an empty buffer reads its old contents
                    self.update_irq();
                    self.fill();
                    v
                }
                4 => self.status(),
                _ => 0xff,
            };
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        for (k, &b) in data.iter().enumerate() {
            match offset + k as u64 {
                0 => {
                    self.last_was_cmd = false;
                    self.data(b);
                }
                4 => {
                    self.last_was_cmd = true;
                    self.command(b);
                }
                _ => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::irq::InterruptController;

    struct Rig {
        k: I8042,
        ic: InterruptController,
        ctl: PlatformControl,
    }

    impl Rig {
        fn new() -> Self {
            let ic = InterruptController::new();
            ic.init_pc_pics();
            let ctl = PlatformControl::new();
            let k = I8042::new(Some(ic.line(1)), Some(ic.line(12)), ctl.clone());
            Rig { k, ic, ctl }
        }
        fn cmd(&mut self, c: u8) {
            self.k.write(4, &[c]);
        }
        fn data(&mut self, v: u8) {
            self.k.write(0, &[v]);
        }
        fn status(&mut self) -> u8 {
            let mut b = [0];
            self.k.read(4, &mut b);
            b[0]
        }
        fn read(&mut self) -> u8 {
            let mut b = [0];
            self.k.read(0, &mut b);
            b[0]
        }
        /// Everything in the output buffer, as a driver polling OBF reads it.
        fn drain(&mut self) -> Vec<u8> {
            let mut v = vec![];
            while self.status() & ST_OBF != 0 {
                v.push(self.read());
            }
            v
        }
        /// The vector delivered, if an IRQ is pending (EOIs both PICs).
        fn irq(&mut self) -> Option<u8> {
            if !self.ic.pending() {
                return None;
            }
            let v = self.ic.acknowledge();
            let p = self.ic.ports();
            let mut p = p.lock().unwrap();
            p.write(0xa0, &[0x20]);
            p.write(0x20, &[0x20]);
            Some(v)
        }
    }

    #[test]
    fn self_test_interface_tests_and_command_byte() {
        let mut r = Rig::new();
        assert_eq!(r.status() & ST_OBF, 0);
        r.cmd(CMD_SELF_TEST);
        assert_ne!(r.status() & ST_CMD, 0, "A2: last write was a command");
        assert_eq!(r.drain(), vec![0x55]);
        r.cmd(CMD_KBD_TEST);
        assert_eq!(r.drain(), vec![0x00]);
        r.cmd(CMD_AUX_TEST);
        assert_eq!(r.drain(), vec![0x00]);
        r.cmd(CMD_WRITE_RAM);
        r.data(0b0110_0111);
        assert_eq!(r.status() & ST_CMD, 0);
        r.cmd(CMD_READ_RAM);
        assert_eq!(r.drain(), vec![0b0110_0111]);
        assert_ne!(r.status() & ST_SYS, 0);
        // Internal RAM beyond the command byte.
        r.cmd(0x65);
        r.data(0x99);
        r.cmd(0x25);
        assert_eq!(r.drain(), vec![0x99]);
    }

    #[test]
    fn keyboard_reset_echo_identify_and_irq1() {
        let mut r = Rig::new();
        r.data(0xff);
        assert_eq!(r.irq(), Some(0x09), "IRQ1 with the command byte's bit 0");
        assert_eq!(r.read(), ACK);
        assert_eq!(r.irq(), Some(0x09), "the next byte raises IRQ1 again");
        assert_eq!(r.read(), BAT_OK);
        assert_eq!(r.irq(), None);
        r.data(0xee);
        assert_eq!(r.drain(), vec![0xee]);
        r.data(0xf2);
        assert_eq!(r.drain(), vec![ACK, 0xab, 0x41], "translated keyboard ID");
        while r.irq().is_some() {}
        r.cmd(CMD_WRITE_RAM);
        r.data(CB_SYS);
        r.data(0xf2);
        assert_eq!(r.drain(), vec![ACK, 0xab, 0x83]);
        assert_eq!(r.irq(), None, "IRQ1 disabled in the command byte");
        r.data(0x42);
        assert_eq!(r.drain(), vec![RESEND]);
        r.data(0xfe);
        assert_eq!(r.drain(), vec![RESEND], "resend repeats the last byte");
    }

    #[test]
    fn keyboard_leds_typematic_and_scan_sets() {
        let mut r = Rig::new();
        r.data(0xed);
        r.data(0b101);
        assert_eq!(r.drain(), vec![ACK, ACK]);
        r.data(0xf3);
        r.data(0x20);
        assert_eq!(r.drain(), vec![ACK, ACK]);
        r.data(0xf0);
        r.data(0x00);
        assert_eq!(r.drain(), vec![ACK, ACK, 0x41], "set 2, translated");
        r.cmd(CMD_WRITE_RAM);
        r.data(CB_SYS);
        r.data(0xf0);
        r.data(0x01);
        r.data(0xf0);
        r.data(0x00);
        assert_eq!(r.drain(), vec![ACK, ACK, ACK, ACK, 0x01]);
        // Set 1 without translation: raw set 1 codes.
        r.k.key_event(0x1e, true);
        r.k.key_event(0x1e, false);
        assert_eq!(r.drain(), vec![0x1e, 0x9e]);
    }

    #[test]
    fn key_codes_translated_and_set2() {
        let mut r = Rig::new();
        r.k.key_event(0x1e, true); // A
        r.k.key_event(0xe048, true); // cursor up
        r.k.key_event(0xe048, false);
        assert_eq!(r.drain(), vec![0x1e, 0xe0, 0x48, 0xe0, 0xc8]);
        r.cmd(CMD_WRITE_RAM);
        r.data(CB_SYS | CB_KBD_INT); // translation off: set 2 on the wire
        r.k.key_event(0x1e, true);
        r.k.key_event(0x1e, false);
        r.k.key_event(0xe048, false);
        r.k.key_event(0x01, true); // Esc
        r.k.key_event(0x58, true); // F12
        assert_eq!(
            r.drain(),
            vec![0x1c, 0xf0, 0x1c, 0xe0, 0xf0, 0x75, 0x76, 0x07]
        );
        // Disabled scanning drops keys.
        r.data(0xf5);
        r.drain();
        r.k.key_event(0x1e, true);
        assert!(r.drain().is_empty());
    }

    #[test]
    fn interface_disable_holds_keyboard_data() {
        let mut r = Rig::new();
        r.cmd(CMD_KBD_DISABLE);
        r.k.key_event(0x10, true);
        assert_eq!(r.status() & ST_OBF, 0);
        r.cmd(CMD_KBD_ENABLE);
        assert_eq!(r.drain(), vec![0x10]);
    }

    #[test]
    fn output_port_a20_and_reset() {
        let mut r = Rig::new();
        r.cmd(CMD_READ_OUTPUT);
        assert_eq!(r.drain()[0] & (OUT_A20 | OUT_RESET), OUT_A20 | OUT_RESET);
        r.cmd(CMD_WRITE_OUTPUT);
        r.data(OUT_RESET);
        assert_eq!(r.ctl.take_a20_change(), Some(false));
        r.cmd(CMD_WRITE_OUTPUT);
        r.data(OUT_RESET | OUT_A20);
        assert!(r.ctl.a20());
        assert!(!r.ctl.take_reset());
        r.cmd(0xfe); // pulse bit 0: reset
        assert!(r.ctl.take_reset());
        r.cmd(0xff); // no pulse
        assert!(!r.ctl.take_reset());
        r.cmd(CMD_WRITE_OUTPUT);
        r.data(OUT_A20); // reset line low
        assert!(r.ctl.take_reset());
        r.cmd(CMD_A20_DISABLE);
        assert!(!r.ctl.a20());
        r.cmd(CMD_A20_ENABLE);
        assert!(r.ctl.a20());
        // The OBF bit of the output port mirrors the buffer.
        r.cmd(CMD_WRITE_KBD_OBUF);
        r.data(0x12);
        r.cmd(CMD_READ_OUTPUT);
        assert_eq!(r.read(), 0x12);
        assert_ne!(r.read() & OUT_OBF, 0);
    }

    #[test]
    fn write_output_buffers_d2_d3() {
        let mut r = Rig::new();
        r.cmd(CMD_WRITE_RAM);
        r.data(CB_XLATE | CB_SYS | CB_KBD_INT | CB_AUX_INT);
        r.cmd(CMD_WRITE_KBD_OBUF);
        r.data(0x12);
        assert_eq!(r.status() & (ST_OBF | ST_AUX_OBF), ST_OBF);
        assert_eq!(r.irq(), Some(0x09));
        assert_eq!(r.read(), 0x12);
        r.cmd(CMD_WRITE_AUX_OBUF);
        r.data(0x34);
        assert_eq!(r.status() & (ST_OBF | ST_AUX_OBF), ST_OBF | ST_AUX_OBF);
        assert_eq!(r.irq(), Some(0x74), "IRQ12");
        assert_eq!(r.read(), 0x34);
        assert_eq!(r.read(), 0x34, "an empty buffer reads the last byte again");
        // The Linux AUX loop test runs with the aux interface disabled: 0xD3 still
        // answers, flagged as aux data.
        r.cmd(CMD_AUX_DISABLE);
        r.cmd(CMD_WRITE_AUX_OBUF);
        r.data(0x5a);
        assert_eq!(r.status() & (ST_OBF | ST_AUX_OBF), ST_OBF | ST_AUX_OBF);
        assert_eq!(r.read(), 0x5a);
    }

    #[test]
    fn mouse_reset_identify_and_stream_packets() {
        let mut r = Rig::new();
        r.cmd(CMD_WRITE_RAM);
        r.data(CB_XLATE | CB_SYS | CB_KBD_INT | CB_AUX_INT);
        r.cmd(CMD_AUX_ENABLE);
        let aux = |r: &mut Rig, b: u8| {
            r.cmd(CMD_WRITE_AUX);
            r.data(b);
        };
        aux(&mut r, 0xff);
        assert_eq!(r.irq(), Some(0x74));
        assert_eq!(r.drain(), vec![ACK, BAT_OK, 0x00]);
        aux(&mut r, 0xf2);
        assert_eq!(r.drain(), vec![ACK, 0x00]);
        // IntelliMouse knock: rates 200, 100, 80 -> ID 3, 4-byte packets.
        for rate in [200, 100, 80] {
            aux(&mut r, 0xf3);
            aux(&mut r, rate);
        }
        assert_eq!(r.drain(), vec![ACK; 6]);
        aux(&mut r, 0xf2);
        assert_eq!(r.drain(), vec![ACK, 0x03]);
        aux(&mut r, 0xe8);
        aux(&mut r, 0x03);
        aux(&mut r, 0xe9);
        assert_eq!(r.drain(), vec![ACK, ACK, ACK, 0x00, 0x03, 80]);
        r.k.mouse_event(5, -3, 0, 0);
        assert!(r.drain().is_empty(), "no packets before 0xF4");
        aux(&mut r, 0xf4);
        assert_eq!(r.drain(), vec![ACK]);
        r.k.mouse_event(5, -3, 1, 0b001);
        assert_eq!(r.irq(), Some(0x74));
        assert_eq!(r.drain(), vec![0b0010_1001, 5, 0xfd, 1]);
        // Big moves are split into packets of at most 255/-256.
        r.k.mouse_event(300, 0, 0, 0b001);
        assert_eq!(r.drain(), vec![0x09, 255, 0, 0, 0x09, 45, 0, 0]);
        aux(&mut r, 0xe9);
        assert_eq!(r.drain(), vec![ACK, 0b0010_0100, 3, 80]);
    }

    #[test]
    fn mouse_remote_wrap_and_disable() {
        let mut r = Rig::new();
        let aux = |r: &mut Rig, b: u8| {
            r.cmd(CMD_WRITE_AUX);
            r.data(b);
        };
        aux(&mut r, 0xf0); // remote
        aux(&mut r, 0xf4);
        r.k.mouse_event(1, 1, 0, 0);
        assert_eq!(r.drain(), vec![ACK, ACK]);
        aux(&mut r, 0xeb);
        assert_eq!(r.drain(), vec![ACK, 0x08, 1, 1]);
        aux(&mut r, 0xee);
        aux(&mut r, 0x55);
        aux(&mut r, 0xec);
        assert_eq!(r.drain(), vec![ACK, 0x55, ACK]);
        aux(&mut r, 0xea);
        assert_eq!(r.drain(), vec![ACK]);
        r.cmd(CMD_AUX_DISABLE);
        r.k.mouse_event(1, 0, 0, 0);
        assert_eq!(r.status() & ST_OBF, 0, "aux interface disabled");
        r.cmd(CMD_AUX_ENABLE);
        assert_eq!(r.drain(), vec![0x08, 1, 0]);
    }

    #[test]
    fn save_restore_round_trip() {
        let mut r = Rig::new();
        r.cmd(CMD_WRITE_RAM);
        r.data(CB_SYS | CB_KBD_INT);
        r.k.key_event(0x1e, true);
        r.k.key_event(0x1e, false);
        let json = serde_json::to_string(&r.k.save()).unwrap();
        let mut s = Rig::new();
        s.k.restore(&serde_json::from_str(&json).unwrap());
        assert_eq!(s.drain(), vec![0x1c, 0xf0, 0x1c]);
        s.cmd(CMD_READ_RAM);
        assert_eq!(s.drain(), vec![CB_SYS | CB_KBD_INT]);
    }

    #[test]
    fn set1_to_set2_table_has_no_duplicates() {
        for (i, a) in SET1_TO_SET2.iter().enumerate() {
            for b in &SET1_TO_SET2[i + 1..] {
                assert_ne!(a.0, b.0);
                assert_ne!(a.1, b.1);
            }
        }
    }

    #[test]
    fn random_writes_never_panic() {
        let mut r = Rig::new();
        let mut x = 0x1357_9bdfu32;
        for _ in 0..100_000 {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            match x % 6 {
                0 => r.cmd((x >> 8) as u8),
                1 => r.data((x >> 8) as u8),
                2 => {
                    r.read();
                }
                3 => r.k.key_event((x >> 8) as u16, x & 0x100 != 0),
                4 => {
                    r.k.mouse_event((x >> 8) as i8 as i32 * 50, (x >> 16) as i8 as i32, 1, 7)
                }
                _ => {
                    r.irq();
                }
            }
            r.ctl.take_reset();
            assert!(r.k.kbd.out.len() <= DEVICE_QUEUE_MAX);
        }
    }
}
