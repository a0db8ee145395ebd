//! Intel 8254 programmable interval timer, plus port 0x61 (system control port B).
//!
//! Ports 0x40-0x42 are the counters, 0x43 the control word register; the device is
//! registered with absolute port numbers (origin 0) at 0x40-0x43 and 0x61. Section
//! references are to the Intel 8254 datasheet (order 231164).
//!
//! Time: the counters are not stepped. Each channel remembers the input-clock tick at
//! which its count was loaded, and its count and OUT level are computed from the
//! [`Clock`](crate::clock::Clock) (1.193182 MHz input). Channel 0's OUT drives IRQ0:
//! [`Pit::update`] raises the edges that have happened since the last call and
//! [`Pit::next_deadline`] says when the next one is due, so an idle guest costs the host
//! one wake-up per timer interrupt and nothing in between.
//!
//! Simplifications: in modes 2 and 3 a new count written while counting takes effect at
//! the end of the current period (for mode 3 the datasheet says at the end of the
//! current half-cycle); mode 3 count reads with an odd count are approximate.

use morph86_mmu::BusDevice;

use crate::clock::SharedClock;
use crate::irq::IrqLine;

/// The counters' input clock in Hz.
pub const PIT_HZ: u64 = 1_193_182;
/// Counter 0 data port.
pub const PORT_COUNTER0: u16 = 0x40;
/// Control word register.
pub const PORT_CONTROL: u16 = 0x43;
/// System control port B (NMI status and control).
pub const PORT_61: u16 = 0x61;

/// Control word SC1-SC0: counter select (section "Control Word Format"); 0b11 = read-back.
pub const CW_SC: u8 = 0b1100_0000;
/// Control word RW1-RW0: 00 latch, 01 LSB, 10 MSB, 11 LSB then MSB.
pub const CW_RW: u8 = 0b0011_0000;
/// Control word M2-M0: mode.
pub const CW_MODE: u8 = 0b0000_1110;
/// Control word BCD: count in BCD.
pub const CW_BCD: u8 = 0b0000_0001;
/// Read-back: COUNT bit (active low: 0 latches the count).
pub const RB_NOT_COUNT: u8 = 0b0010_0000;
/// Read-back: STATUS bit (active low: 0 latches the status).
pub const RB_NOT_STATUS: u8 = 0b0001_0000;
/// Status byte: OUT pin.
pub const STATUS_OUT: u8 = 0b1000_0000;
/// Status byte: NULL COUNT (count written but not yet loaded into the counting element).
pub const STATUS_NULL: u8 = 0b0100_0000;
/// Port 0x61 bit 0: timer 2 gate.
pub const P61_GATE2: u8 = 0b0000_0001;
/// Port 0x61 bit 1: speaker data enable.
pub const P61_SPKR: u8 = 0b0000_0010;
/// Port 0x61 bits 0-3 that a write sets (bits 2-3 are the parity/IOCHK check disables).
pub const P61_WRITABLE: u8 = 0b0000_1111;
/// Port 0x61 bit 4: refresh request toggle (flips every 15.085 us).
pub const P61_REFRESH: u8 = 0b0001_0000;
/// Port 0x61 bit 5: timer 2 OUT.
pub const P61_OUT2: u8 = 0b0010_0000;
/// The refresh toggle half period in ns.
pub const REFRESH_NS: u64 = 15_085;

fn bcd_to_bin(v: u16) -> u32 {
    (0..4)
        .map(|k| ((v >> (4 * k)) & 15) as u32 * 10u32.pow(k))
        .sum()
}

fn bin_to_bcd(v: u32) -> u16 {
    let v = v % 10_000;
    (0..4)
        .map(|k| (((v / 10u32.pow(k)) % 10) as u16) << (4 * k))
        .sum()
}

#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
struct Channel {
    mode: u8,
    rw: u8,
    bcd: bool,
    /// The counting period N (1..=65536, or 1..=10000 in BCD); meaningful when `loaded`.
    n: u32,
    /// A count has been written since the control word (and not disabled by a mode-0 LSB).
    loaded: bool,
    /// Tick at which the count entered the counting element (count = N at this tick).
    start: i64,
    /// Modes 2/3: a new count waiting for the end of the period (tick, N).
    pending: Option<(i64, u32)>,
    gate: bool,
    /// Modes 1/5: a gate trigger has started the count.
    triggered: bool,
    /// Gate low stopped counting: (frozen count, frozen OUT).
    paused: Option<(u32, bool)>,
    write_msb_next: bool,
    lsb: u8,
    read_msb_next: bool,
    latch: Option<u16>,
    latch_msb_next: bool,
    status: Option<u8>,
    /// NULL COUNT is set until this tick.
    null_until: i64,
}

impl Channel {
    fn modulus(&self) -> u32 {
        if self.bcd {
            10_000
        } else {
            65_536
        }
    }

    fn seg(&self, t: i64) -> (i64, u32) {
        match self.pending {
            Some((t0, n)) if t >= t0 => (t0, n),
            _ => (self.start, self.n),
        }
    }

    fn waits_for_trigger(&self) -> bool {
        matches!(self.mode, 1 | 5) && !self.triggered
    }

    /// (count, OUT) at tick `t`.
    fn state(&self, t: i64) -> (u32, bool) {
        if self.rw == 0 {
            // Never programmed: OUT is undefined at power-on; high avoids a phantom
            // IRQ0 edge when the BIOS first selects a mode that starts with OUT high.
            return (0, true);
        }
        if !self.loaded {
            return (0, self.mode != 0);
        }
        if let Some(p) = self.paused {
            return p;
        }
        let (start, n) = self.seg(t);
        if self.waits_for_trigger() || t < start {
            return (n % self.modulus(), self.mode != 0);
        }
        let d = (t - start) as u64;
        let n64 = n as u64;
        let m = self.modulus() as u64;
        let down = ((n64 + m - d % m) % m) as u32;
        match self.mode {
            0 | 1 => (down, d >= n64),
            2 => ((n64 - d % n64) as u32, n == 1 || d % n64 != n64 - 1),
            3 => {
                let p = d % n64;
                let high_len = n64.div_ceil(2);
                let (q, high) = if p < high_len {
                    (p, true)
                } else {
                    (p - high_len, false)
                };
                (((n64.saturating_sub(2 * q)) & !1) as u32, high)
            }
            _ => (down, d != n64),
        }
    }

    /// The first tick after `t` at which OUT rises, if OUT will rise.
    fn next_rise(&self, t: i64) -> Option<i64> {
        if !self.loaded || self.paused.is_some() || self.waits_for_trigger() {
            return None;
        }
        let (start, n) = self.seg(t);
        let n = n as i64;
        let r = match self.mode {
            0 | 1 => start + n,
            2 | 3 => {
                if n == 1 {
                    // A count of 1 never lets OUT fall (mode 2) or stay low (mode 3).
                    return None;
                }
                // Rising edges at start + k*N, k >= 1.
                let k = if t < start { 1 } else { (t - start) / n + 1 };
                let r = start + k * n;
                if let Some((t0, _)) = self.pending {
                    if t < t0 && r >= t0 {
                        return Some(t0);
                    }
                }
                r
            }
            _ => start + n + 1,
        };
        (r > t).then_some(r)
    }

    /// Moves every tick stamp by `d`.
    fn shift(&mut self, d: i64) {
        self.start = self.start.saturating_add(d);
        self.null_until = self.null_until.saturating_add(d);
        if let Some((t, _)) = &mut self.pending {
            *t = t.saturating_add(d);
        }
    }

    /// Makes a due pending reload current.
    fn commit(&mut self, t: i64) {
        if let Some((t0, n)) = self.pending {
            if t >= t0 {
                self.start = t0;
                self.n = n;
                self.pending = None;
            }
        }
    }

    fn control(&mut self, cw: u8) {
        let mode = (cw & CW_MODE) >> 1;
        self.mode = if mode >= 6 { mode - 4 } else { mode };
        self.rw = (cw & CW_RW) >> 4;
        self.bcd = cw & CW_BCD != 0;
        self.loaded = false;
        self.pending = None;
        self.paused = None;
        self.triggered = false;
        self.write_msb_next = false;
        self.read_msb_next = false;
        self.latch = None;
        self.status = None;
        self.null_until = i64::MAX;
    }

    fn latch_count(&mut self, t: i64) {
        if self.latch.is_none() {
            let (c, _) = self.state(t);
            self.latch = Some(self.encode(c));
            self.latch_msb_next = false;
        }
    }

    fn latch_status(&mut self, t: i64) {
        if self.status.is_none() {
            let (_, out) = self.state(t);
            let mut s = (self.rw << 4) | (self.mode << 1) | self.bcd as u8;
            if out {
                s |= STATUS_OUT;
            }
            if t < self.null_until {
                s |= STATUS_NULL;
            }
            self.status = Some(s);
        }
    }

    fn encode(&self, c: u32) -> u16 {
        if self.bcd {
            bin_to_bcd(c)
        } else {
            c as u16
        }
    }

    fn read(&mut self, t: i64) -> u8 {
        if let Some(s) = self.status.take() {
            return s;
        }
        if let Some(l) = self.latch {
            let msb = match self.rw {
                1 => false,
                2 => true,
                _ => self.latch_msb_next,
            };
            if self.rw == 3 && !self.latch_msb_next {
                self.latch_msb_next = true;
            } else {
                self.latch = None;
            }
            return if msb { (l >> 8) as u8 } else { l as u8 };
        }
        let (c, _) = self.state(t);
        let v = self.encode(c);
        match self.rw {
            1 => v as u8,
            2 => (v >> 8) as u8,
            3 => {
                self.read_msb_next = !self.read_msb_next;
                if self.read_msb_next {
                    v as u8
                } else {
                    (v >> 8) as u8
                }
            }
            _ => 0xff, // no control word yet
        }
    }

    fn write(&mut self, t: i64, v: u8) {
        let raw = match self.rw {
            1 => v as u16,
            2 => (v as u16) << 8,
            3 => {
                if !self.write_msb_next {
                    self.write_msb_next = true;
                    self.lsb = v;
                    if self.mode == 0 {
                        // Mode 0: writing the first byte stops the count, OUT goes low.
                        self.loaded = false;
                        self.pending = None;
                    }
                    return;
                }
                self.write_msb_next = false;
                ((v as u16) << 8) | self.lsb as u16
            }
            _ => {
                log::debug!("pit: count written before a control word");
                return;
            }
        };
        let n = if self.bcd {
            match bcd_to_bin(raw) {
                0 => 10_000,
                x => x.min(10_000),
            }
        } else if raw == 0 {
            65_536
        } else {
            raw as u32
        };
        self.null_until = t + 1;
        let running = self.loaded && self.paused.is_none() && !self.waits_for_trigger();
        if matches!(self.mode, 2 | 3) && running {
            self.commit(t);
            let (start, old) = (self.start, self.n as i64);
            let end = if t < start {
                start
            } else {
                start + ((t - start) / old + 1) * old
            };
            self.pending = Some((end, n));
            return;
        }
        self.n = n;
        self.loaded = true;
        self.pending = None;
        self.start = t + 1;
        self.paused = None;
        if matches!(self.mode, 1 | 5) {
            // The count waits for a gate trigger (an earlier trigger does not count).
            self.triggered = false;
        } else if !self.gate {
            self.paused = Some((n % self.modulus(), self.mode != 0));
        }
    }

    fn set_gate(&mut self, t: i64, gate: bool) {
        if gate == self.gate {
            return;
        }
        self.commit(t);
        self.gate = gate;
        if !self.loaded {
            return;
        }
        match (self.mode, gate) {
            (0 | 4, false) => self.paused = Some(self.state(t)),
            (0 | 4, true) => {
                if let Some((c, _)) = self.paused.take() {
                    // Resume so that the count continues from the frozen value.
                    let done = (self.n + self.modulus() - c) % self.modulus();
                    self.start = t + 1 - done as i64;
                }
            }
            (2 | 3, false) => {
                let (c, _) = self.state(t);
                self.pending = None;
                self.paused = Some((c, true));
            }
            (2 | 3, true) | (1 | 5, true) => {
                // Rising gate: reload (modes 2/3) or trigger (modes 1/5).
                self.paused = None;
                self.triggered = true;
                self.start = t + 1;
            }
            _ => {} // modes 1/5: a falling gate has no effect
        }
    }
}

/// Saved state of the timer (opaque; tick stamps relative to the save).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct PitState {
    channels: Vec<Channel>,
    port61: u8,
    irq_tick: i64,
}

/// The 8254 with its three channels and port 0x61.
pub struct Pit {
    ch: [Channel; 3],
    clock: SharedClock,
    irq0: Option<IrqLine>,
    /// Last tick IRQ0 edges were evaluated up to.
    irq_tick: i64,
    port61: u8,
}

impl Pit {
    /// A timer on `clock`, channel 0 driving `irq0`. Gates 0 and 1 are tied high; gate 2
    /// follows port 0x61 bit 0.
    pub fn new(clock: SharedClock, irq0: Option<IrqLine>) -> Self {
        let mut ch: [Channel; 3] = Default::default();
        ch[0].gate = true;
        ch[1].gate = true;
        // OUT of an unprogrammed counter reads high; drive IRQ0 to match from the start.
        if let Some(l) = &irq0 {
            l.raise();
        }
        Pit {
            ch,
            clock,
            irq0,
            irq_tick: 0,
            port61: 0,
        }
    }

    /// Snapshot. Tick stamps are saved relative to now, so a restore on another clock
    /// continues where the save left off.
    pub fn save(&self) -> PitState {
        let now = self.tick();
        let mut ch = self.ch.clone();
        for c in &mut ch {
            c.shift(-now);
        }
        PitState {
            channels: ch.to_vec(),
            port61: self.port61,
            irq_tick: self.irq_tick - now,
        }
    }

    /// Restores a snapshot taken by [`Pit::save`].
    pub fn restore(&mut self, s: &PitState) {
        let now = self.tick();
        for (k, c) in s.channels.iter().take(3).enumerate() {
            self.ch[k] = c.clone();
            self.ch[k].shift(now);
        }
        self.port61 = s.port61;
        self.irq_tick = s.irq_tick + now;
        self.sync(now);
    }

    /// Power-on state (machine reset): channels unprogrammed, port 0x61 cleared.
    pub fn reset(&mut self) {
        let t = self.tick();
        let mut ch: [Channel; 3] = Default::default();
        ch[0].gate = true;
        ch[1].gate = true;
        self.ch = ch;
        self.port61 = 0;
        self.irq_tick = t;
        if let Some(l) = &self.irq0 {
            l.raise(); // unprogrammed OUT reads high
        }
    }

    fn tick(&self) -> i64 {
        (self.clock.now_ns() as u128 * PIT_HZ as u128 / 1_000_000_000) as i64
    }

    fn ns_of_tick(t: i64) -> u64 {
        (t.max(0) as u128 * 1_000_000_000).div_ceil(PIT_HZ as u128) as u64
    }

    /// Raises the IRQ0 edges due by now and sets the line to channel 0's OUT.
    pub fn update(&mut self) {
        let t = self.tick();
        self.sync(t);
    }

    fn sync(&mut self, t: i64) {
        let rose = matches!(self.ch[0].next_rise(self.irq_tick), Some(r) if r <= t);
        for c in &mut self.ch {
            c.commit(t);
        }
        self.irq_tick = self.irq_tick.max(t);
        let (_, out) = self.ch[0].state(t);
        if let Some(l) = &self.irq0 {
            if rose {
                l.lower();
                l.raise();
            }
            l.set(out);
        }
    }

    /// Clock time (ns) of the next IRQ0 edge not yet raised, if one is coming: the first
    /// rise after the last [`Pit::update`] (or port access), which may already be in the
    /// past. Measured from a fresh clock read instead, an edge that fell between the
    /// update and this call would be neither raised nor scheduled: a one-shot (mode 0/4,
    /// Linux's tick without a local APIC) would then never interrupt again until the guest
    /// touched a port, as happened when the host descheduled the vCPU thread there.
    pub fn next_deadline(&self) -> Option<u64> {
        self.ch[0].next_rise(self.irq_tick).map(Self::ns_of_tick)
    }

    /// The OUT level of channel `n` (0-2) now.
    pub fn out(&self, n: usize) -> bool {
        self.ch[n.min(2)].state(self.tick()).1
    }

    /// The PC speaker tone in Hz, when channel 2 drives it with a square wave.
    pub fn speaker_hz(&self) -> Option<u32> {
        let c = &self.ch[2];
        let on = self.port61 & (P61_GATE2 | P61_SPKR) == (P61_GATE2 | P61_SPKR);
        (on && c.loaded && c.mode == 3).then(|| (PIT_HZ / c.n as u64) as u32)
    }

    fn read_port(&mut self, port: u16) -> u8 {
        let t = self.tick();
        self.sync(t);
        match port {
            0x40..=0x42 => self.ch[(port - 0x40) as usize].read(t),
            PORT_61 => {
                let mut v = self.port61 & P61_WRITABLE;
                if (self.clock.now_ns() / REFRESH_NS) & 1 == 1 {
                    v |= P61_REFRESH;
                }
                if self.ch[2].state(t).1 {
                    v |= P61_OUT2;
                }
                v
            }
            _ => 0xff, // the control word register cannot be read
        }
    }

    fn write_port(&mut self, port: u16, v: u8) {
        let t = self.tick();
        self.sync(t);
        match port {
            0x40..=0x42 => self.ch[(port - 0x40) as usize].write(t, v),
            PORT_CONTROL => {
                let sc = (v & CW_SC) >> 6;
                if sc == 3 {
                    // Read-back command.
                    for (k, c) in self.ch.iter_mut().enumerate() {
                        if v & (0b10 << k) != 0 {
                            if v & RB_NOT_COUNT == 0 {
                                c.latch_count(t);
                            }
                            if v & RB_NOT_STATUS == 0 {
                                c.latch_status(t);
                            }
                        }
                    }
                } else if v & CW_RW == 0 {
                    self.ch[sc as usize].latch_count(t);
                } else {
                    self.ch[sc as usize].control(v);
                }
            }
            PORT_61 => {
                self.port61 = v & P61_WRITABLE;
                self.ch[2].set_gate(t, v & P61_GATE2 != 0);
            }
            _ => log::debug!("pit: write to port {port:#x} ignored"),
        }
        self.sync(t);
    }
}

impl BusDevice for Pit {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        for (k, b) in data.iter_mut().enumerate() {
            *b = self.read_port((offset as u16).wrapping_add(k as u16));
        }
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        for (k, b) in data.iter().enumerate() {
            self.write_port((offset as u16).wrapping_add(k as u16), *b);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use crate::irq::InterruptController;
    use std::sync::Arc;

    /// ns for `t` input-clock ticks, landing just after tick `t` starts.
    fn ns(t: u64) -> u64 {
        (t as u128 * 1_000_000_000).div_ceil(PIT_HZ as u128) as u64
    }

    struct Rig {
        clock: ManualClock,
        pit: Pit,
        ic: InterruptController,
    }

    impl Rig {
        fn new() -> Self {
            let clock = ManualClock::new();
            let ic = InterruptController::new();
            // As on a PC: the timer exists before the BIOS programs the PIC.
            let pit = Pit::new(Arc::new(clock.clone()), Some(ic.line(0)));
            let ports = ic.ports();
            let mut p = ports.lock().unwrap();
            for (port, v) in [(0x20, 0x11), (0x21, 0x08), (0x21, 4), (0x21, 1), (0x21, 0)] {
                p.write(port, &[v]);
            }
            drop(p);
            Rig { clock, pit, ic }
        }
        fn out(&mut self, port: u16, v: u8) {
            self.pit.write(port as u64, &[v]);
        }
        fn inb(&mut self, port: u16) -> u8 {
            let mut b = [0];
            self.pit.read(port as u64, &mut b);
            b[0]
        }
        fn eoi(&mut self) {
            self.ic.ports().lock().unwrap().write(0x20, &[0x20]);
        }
        fn at(&mut self, tick: u64) {
            self.clock.set(ns(tick));
        }
        fn latch_read(&mut self, ch: u8) -> u16 {
            self.out(0x43, ch << 6);
            let lo = self.inb(0x40 + ch as u16);
            let hi = self.inb(0x40 + ch as u16);
            u16::from_le_bytes([lo, hi])
        }
        fn status(&mut self, ch: u8) -> u8 {
            self.out(0x43, 0b1110_0000 | (2 << ch));
            self.inb(0x40 + ch as u16)
        }
    }

    #[test]
    fn bcd_helpers() {
        assert_eq!(bcd_to_bin(0x1234), 1234);
        assert_eq!(bin_to_bcd(9999), 0x9999);
        assert_eq!(bin_to_bcd(10_000), 0);
    }

    #[test]
    fn mode0_interrupt_on_terminal_count() {
        let mut r = Rig::new();
        r.at(100);
        r.out(0x43, 0b0011_0000); // ch0, lo/hi, mode 0
        assert_eq!(
            r.status(0) & STATUS_OUT,
            0,
            "mode 0: OUT low after control word"
        );
        r.out(0x40, 100);
        r.out(0x40, 0);
        // Count loads on the next clock: N+1 clocks after the write OUT goes high.
        assert_ne!(r.status(0) & STATUS_NULL, 0, "null count before the load");
        r.at(101);
        assert_eq!(r.status(0) & STATUS_NULL, 0);
        assert_eq!(r.latch_read(0), 100);
        r.at(151);
        assert_eq!(r.latch_read(0), 50);
        r.pit.update();
        assert!(!r.ic.pending());
        assert_eq!(r.pit.next_deadline(), Some(ns(201)));
        r.at(200);
        assert_eq!(r.status(0) & STATUS_OUT, 0);
        r.at(201);
        assert_ne!(r.status(0) & STATUS_OUT, 0);
        r.pit.update();
        assert!(r.ic.pending());
        assert_eq!(r.ic.acknowledge(), 0x08);
        // The counter keeps counting down past zero; OUT stays high, no more edges.
        r.at(202);
        assert_eq!(r.latch_read(0), 0xffff);
        assert_eq!(r.pit.next_deadline(), None);
    }

    #[test]
    fn mode2_rate_generator_periodic_irq() {
        let mut r = Rig::new();
        r.out(0x43, 0b0011_0100); // ch0 lo/hi mode 2
        r.out(0x40, 0x10);
        r.out(0x40, 0x00); // N = 16, loaded at tick 1
        assert_eq!(r.pit.next_deadline(), Some(ns(17)));
        r.at(16); // count 1: OUT low for one clock
        assert_eq!(r.latch_read(0), 1);
        assert_eq!(r.status(0) & STATUS_OUT, 0);
        r.at(17);
        assert_eq!(r.latch_read(0), 16);
        r.pit.update();
        assert_eq!(r.ic.acknowledge(), 0x08);
        r.eoi();
        // Many periods without polling: one edge (the PIC latches one).
        r.at(17 + 16 * 10 + 3);
        r.pit.update();
        assert_eq!(r.ic.acknowledge(), 0x08);
        r.eoi();
        assert!(!r.ic.pending());
        assert_eq!(r.pit.next_deadline(), Some(ns(17 + 16 * 11)));
    }

    #[test]
    fn mode3_square_wave_and_count_by_two() {
        let mut r = Rig::new();
        r.out(0x43, 0b0011_0110); // ch0 mode 3
        r.out(0x40, 10);
        r.out(0x40, 0); // start tick 1, N = 10: high 5, low 5
        r.at(1);
        assert_eq!(r.latch_read(0), 10);
        r.at(3);
        assert_eq!(r.latch_read(0), 6);
        assert_ne!(r.status(0) & STATUS_OUT, 0);
        r.at(6);
        assert_eq!(r.status(0) & STATUS_OUT, 0);
        assert_eq!(r.latch_read(0), 10);
        r.at(11);
        assert_ne!(r.status(0) & STATUS_OUT, 0);
        assert_eq!(r.pit.next_deadline(), Some(ns(21)));
    }

    #[test]
    fn mode4_software_strobe() {
        let mut r = Rig::new();
        r.out(0x43, 0b0001_1000); // ch0, LSB only, mode 4
        r.out(0x40, 5); // loaded at 1, strobe (OUT low) at tick 6, rises at 7
        r.at(6);
        assert_eq!(r.status(0) & STATUS_OUT, 0);
        assert_eq!(r.pit.next_deadline(), Some(ns(7)));
        r.at(7);
        assert_ne!(r.status(0) & STATUS_OUT, 0);
    }

    #[test]
    fn a_one_shot_edge_after_the_update_is_still_scheduled() {
        // Linux's tick without a local APIC: mode 4, a short count written in the
        // handler. The clock passes the strobe between the poll's update and its
        // deadline query (the vCPU thread was descheduled there).
        let mut r = Rig::new();
        r.at(1000);
        r.out(0x43, 0b0011_1000); // ch0, lo/hi, mode 4
        r.out(0x40, 15);
        r.out(0x40, 0); // loaded at 1001, OUT low at 1016, rises at 1017
        r.pit.update();
        r.at(2000);
        let d = r
            .pit
            .next_deadline()
            .expect("the strobe's edge is still due");
        assert_eq!(d, ns(1017));
        assert!(d <= ns(2000), "due at once: the poll must come now");
        r.pit.update();
        assert!(r.ic.pending(), "IRQ0 raised by the late poll");
        assert_eq!(r.pit.next_deadline(), None, "one edge per strobe");
    }

    #[test]
    fn modes_1_and_5_wait_for_gate_trigger_on_channel2() {
        let mut r = Rig::new();
        r.out(0x43, 0b1011_0010); // ch2 mode 1
        r.out(0x42, 4);
        r.out(0x42, 0);
        r.at(50);
        assert_ne!(
            r.inb(0x61) & P61_OUT2,
            0,
            "mode 1: OUT high until triggered"
        );
        r.out(0x61, P61_GATE2); // trigger at tick 50: starts at 51
        r.at(51);
        assert_eq!(r.inb(0x61) & P61_OUT2, 0, "one-shot low");
        r.at(55);
        assert_ne!(r.inb(0x61) & P61_OUT2, 0);
        // Retrigger.
        r.out(0x61, 0);
        r.out(0x61, P61_GATE2);
        r.at(57);
        assert_eq!(r.inb(0x61) & P61_OUT2, 0);
        // Mode 5: strobe 1 clock after N from the trigger.
        r.out(0x43, 0b1001_1010); // ch2 LSB mode 5
        r.out(0x42, 3);
        r.at(100);
        r.out(0x61, 0);
        r.out(0x61, P61_GATE2); // start at 101, strobe at 104
        r.at(104);
        assert_eq!(r.inb(0x61) & P61_OUT2, 0);
        r.at(105);
        assert_ne!(r.inb(0x61) & P61_OUT2, 0);
    }

    #[test]
    fn gate_low_pauses_mode0_and_reloads_mode2() {
        let mut r = Rig::new();
        r.out(0x61, P61_GATE2);
        r.out(0x43, 0b1011_0000); // ch2 mode 0
        r.out(0x42, 100);
        r.out(0x42, 0); // loaded at 1
        r.at(11);
        r.out(0x61, 0); // pause at count 90
        r.at(500);
        assert_eq!(r.latch_read(2), 90);
        r.out(0x61, P61_GATE2);
        r.at(510);
        assert_eq!(r.latch_read(2), 81);
        // Mode 2 with the gate low: OUT high, reload on the rising gate.
        r.out(0x43, 0b1011_0100);
        r.out(0x42, 20);
        r.out(0x42, 0); // start 511
        r.at(520);
        r.out(0x61, 0);
        r.at(600);
        assert_eq!(r.latch_read(2), 11);
        r.out(0x61, P61_GATE2); // reload at 601
        r.at(602);
        assert_eq!(r.latch_read(2), 19);
    }

    #[test]
    fn lsb_msb_access_orders_and_latch() {
        let mut r = Rig::new();
        r.out(0x43, 0b0111_0100); // ch1 lo/hi mode 2
        r.out(0x41, 0x34);
        r.out(0x41, 0x12);
        r.at(1);
        assert_eq!(r.latch_read(1), 0x1234);
        // The latch holds across time until read.
        r.out(0x43, 0b0100_0000);
        r.at(0x100);
        assert_eq!(r.inb(0x41), 0x34);
        r.at(0x200);
        assert_eq!(r.inb(0x41), 0x12);
        // MSB-only access.
        r.out(0x43, 0b0110_0100);
        r.out(0x41, 0x20); // N = 0x2000
        r.at(0x201);
        assert_eq!(r.inb(0x41), 0x20);
        // Unlatched lo/hi reads alternate.
        r.out(0x43, 0b0111_0000);
        r.out(0x41, 0xff);
        r.out(0x41, 0xff);
        r.at(0x202);
        assert_eq!(r.inb(0x41), 0xff);
        assert_eq!(r.inb(0x41), 0xff);
    }

    #[test]
    fn read_back_status_and_count() {
        let mut r = Rig::new();
        r.out(0x43, 0b1011_0111); // ch2 lo/hi mode 3 BCD
        r.out(0x42, 0x00);
        r.out(0x42, 0x10); // 1000 decimal
                           // Read-back both for ch2: status first, then the count.
        r.out(0x61, P61_GATE2);
        r.at(1);
        r.out(0x43, 0b1100_1000);
        let s = r.inb(0x42);
        assert_eq!(s & 0x3f, 0b0011_0111);
        assert_ne!(s & STATUS_OUT, 0);
        assert_eq!(r.inb(0x42), 0x00);
        assert_eq!(r.inb(0x42), 0x10);
        // A second count latch while one is pending is ignored.
        r.at(3);
        r.out(0x43, 0b1101_1000);
        r.at(5);
        r.out(0x43, 0b1101_1000);
        assert_eq!(u16::from_le_bytes([r.inb(0x42), r.inb(0x42)]), 0x0996);
    }

    #[test]
    fn rate_change_in_mode2_waits_for_period_end() {
        let mut r = Rig::new();
        r.out(0x43, 0b0011_0100);
        r.out(0x40, 100);
        r.out(0x40, 0); // start 1, edges at 101, 201...
        r.at(50);
        r.out(0x40, 10);
        r.out(0x40, 0);
        assert_eq!(r.pit.next_deadline(), Some(ns(101)));
        r.at(101);
        r.pit.update();
        assert_eq!(r.pit.next_deadline(), Some(ns(111)));
    }

    #[test]
    fn port61_refresh_toggle_and_speaker() {
        let mut r = Rig::new();
        let a = r.inb(0x61) & P61_REFRESH;
        r.clock.advance(REFRESH_NS);
        let b = r.inb(0x61) & P61_REFRESH;
        assert_ne!(a, b, "refresh bit toggles every 15 us");
        r.out(0x61, 0xff);
        assert_eq!(r.inb(0x61) & 0x0f, 0x0f);
        r.out(0x43, 0b1011_0110);
        r.out(0x42, 0xa9);
        r.out(0x42, 0x04); // 1193 -> ~1000 Hz
        assert_eq!(r.pit.speaker_hz(), Some(1000));
        r.out(0x61, 0);
        assert_eq!(r.pit.speaker_hz(), None);
    }

    #[test]
    fn bcd_countdown_and_odd_square_wave() {
        let mut r = Rig::new();
        r.out(0x43, 0b0011_0001); // ch0 lo/hi mode 0 BCD
        r.out(0x40, 0x00);
        r.out(0x40, 0x10); // 1000 decimal, loaded at tick 1
        r.at(1 + 1);
        assert_eq!(r.latch_read(0), 0x0999);
        r.at(1 + 1000);
        assert_eq!(r.latch_read(0), 0x0000);
        r.at(1 + 1001);
        assert_eq!(r.latch_read(0), 0x9999, "BCD wraps to 9999");
        // Mode 3, N = 5: OUT high for 3 clocks, low for 2 (datasheet: (N+1)/2 and (N-1)/2).
        r.out(0x43, 0b0001_0110);
        r.out(0x40, 5); // written at tick 1002, loaded at 1003
        let base = 1003;
        let outs: Vec<bool> = (0..10)
            .map(|k| {
                r.at(base + k);
                r.status(0) & STATUS_OUT != 0
            })
            .collect();
        assert_eq!(
            outs,
            [true, true, true, false, false, true, true, true, false, false]
        );
    }

    #[test]
    fn mode0_lsb_write_stops_the_count() {
        let mut r = Rig::new();
        r.out(0x43, 0b0011_0000);
        r.out(0x40, 10);
        r.out(0x40, 0); // loaded at 1, OUT high at 11
        r.at(20);
        assert_ne!(r.status(0) & STATUS_OUT, 0);
        r.out(0x40, 50); // first byte of a new count: OUT low, counting stops
        assert_eq!(r.status(0) & STATUS_OUT, 0);
        r.at(100);
        assert_eq!(r.status(0) & STATUS_OUT, 0);
        r.out(0x40, 0); // N = 50 from tick 101
        r.at(150);
        assert_eq!(r.status(0) & STATUS_OUT, 0);
        r.at(151);
        assert_ne!(r.status(0) & STATUS_OUT, 0);
    }

    #[test]
    fn save_restore_continues_counting_on_another_clock() {
        let mut r = Rig::new();
        r.out(0x43, 0b0011_0100);
        r.out(0x40, 100);
        r.out(0x40, 0); // start 1
        r.at(31);
        let json = serde_json::to_string(&r.pit.save()).unwrap();
        let mut s = Rig::new();
        s.at(5000);
        s.pit.restore(&serde_json::from_str(&json).unwrap());
        assert_eq!(s.latch_read(0), 70);
        assert_eq!(s.pit.next_deadline(), Some(ns(5000 + 70)));
    }

    #[test]
    fn random_writes_never_panic() {
        let mut r = Rig::new();
        let mut x = 0x9e37_79b9u32;
        for _ in 0..100_000 {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            let port = [0x40, 0x41, 0x42, 0x43, 0x61][(x % 5) as usize];
            if x & 0x100 != 0 {
                r.out(port, (x >> 16) as u8);
            } else {
                r.inb(port);
            }
            r.clock.advance((x >> 20) as u64 % 5000);
            r.pit.update();
            let _ = r.pit.next_deadline();
            if r.ic.pending() {
                r.ic.acknowledge();
                r.eoi();
            }
        }
    }
}
