//! Motorola MC146818 real-time clock with 128 bytes of CMOS RAM, at ports 0x70 (index,
//! bit 7 = NMI mask) and 0x71 (data), interrupting on IRQ 8. Register names and bit
//! positions follow the MC146818A datasheet ("Register A" ... "Register D", "Address Map").
//!
//! The guest's time is the host wall-clock time given at construction moved along by the
//! monotonic [`Clock`](crate::clock::Clock) plus whatever offset the guest set. Nothing
//! ticks: the time registers are computed when read, and the update-ended, alarm and
//! periodic flags are worked out from elapsed time on each access and in
//! [`Rtc::update`], which the run loop calls at [`Rtc::next_deadline`].
//!
//! The update cycle is instantaneous at each second boundary; UIP reads 1 from 244 us
//! before the boundary to 1984 us after it (the datasheet's tBUC and update time).

use morph86_mmu::BusDevice;

use crate::clock::SharedClock;
use crate::irq::IrqLine;

/// Index port (bit 7: NMI disable).
pub const PORT_INDEX: u16 = 0x70;
/// Data port.
pub const PORT_DATA: u16 = 0x71;

/// Register indices of the clock (datasheet "Address Map").
pub const REG_SECONDS: u8 = 0x00;
/// Seconds alarm.
pub const REG_SECONDS_ALARM: u8 = 0x01;
/// Minutes.
pub const REG_MINUTES: u8 = 0x02;
/// Minutes alarm.
pub const REG_MINUTES_ALARM: u8 = 0x03;
/// Hours.
pub const REG_HOURS: u8 = 0x04;
/// Hours alarm.
pub const REG_HOURS_ALARM: u8 = 0x05;
/// Day of week (1 = Sunday).
pub const REG_DAY_OF_WEEK: u8 = 0x06;
/// Day of month.
pub const REG_DAY: u8 = 0x07;
/// Month.
pub const REG_MONTH: u8 = 0x08;
/// Year (two digits).
pub const REG_YEAR: u8 = 0x09;
/// Register A.
pub const REG_A: u8 = 0x0a;
/// Register B.
pub const REG_B: u8 = 0x0b;
/// Register C.
pub const REG_C: u8 = 0x0c;
/// Register D.
pub const REG_D: u8 = 0x0d;
/// PC convention: shutdown status byte.
pub const CMOS_SHUTDOWN: u8 = 0x0f;
/// PC convention: equipment byte.
pub const CMOS_EQUIPMENT: u8 = 0x14;
/// Base memory in KiB, low byte (high at 0x16).
pub const CMOS_BASE_MEM_LO: u8 = 0x15;
/// Extended memory above 1 MiB in KiB, low byte (high at 0x18).
pub const CMOS_EXT_MEM_LO: u8 = 0x17;
/// Checksum of 0x10-0x2d, high byte (low at 0x2f).
pub const CMOS_CHECKSUM_HI: u8 = 0x2e;
/// Extended memory copy (POST), low byte (high at 0x31).
pub const CMOS_EXT_MEM2_LO: u8 = 0x30;
/// Century, BCD.
pub const CMOS_CENTURY: u8 = 0x32;
/// Memory between 16 MiB and 4 GiB in 64 KiB units, low byte (high at 0x35).
pub const CMOS_MEM_16M_LO: u8 = 0x34;
/// Memory above 4 GiB in 64 KiB units, bytes 0x5b (low) - 0x5d (high).
pub const CMOS_MEM_4G_LO: u8 = 0x5b;
/// CPU count minus one (SeaBIOS convention).
pub const CMOS_CPU_COUNT: u8 = 0x5f;

/// Register A: update in progress.
pub const A_UIP: u8 = 0b1000_0000;
/// Register A: divider chain select DV2-DV0.
pub const A_DV: u8 = 0b0111_0000;
/// Register A: DV = 010, 32.768 kHz time base, running.
pub const A_DV_NORMAL: u8 = 0b0010_0000;
/// Register A: rate select RS3-RS0.
pub const A_RS: u8 = 0b0000_1111;
/// Register B: SET, updates inhibited.
pub const B_SET: u8 = 0b1000_0000;
/// Register B: periodic interrupt enable.
pub const B_PIE: u8 = 0b0100_0000;
/// Register B: alarm interrupt enable.
pub const B_AIE: u8 = 0b0010_0000;
/// Register B: update-ended interrupt enable.
pub const B_UIE: u8 = 0b0001_0000;
/// Register B: square wave enable.
pub const B_SQWE: u8 = 0b0000_1000;
/// Register B: data mode, 1 = binary, 0 = BCD.
pub const B_DM: u8 = 0b0000_0100;
/// Register B: 1 = 24-hour mode.
pub const B_24H: u8 = 0b0000_0010;
/// Register B: daylight saving enable (not modelled).
pub const B_DSE: u8 = 0b0000_0001;
/// Register C: interrupt request flag.
pub const C_IRQF: u8 = 0b1000_0000;
/// Register C: periodic interrupt flag.
pub const C_PF: u8 = 0b0100_0000;
/// Register C: alarm interrupt flag.
pub const C_AF: u8 = 0b0010_0000;
/// Register C: update-ended interrupt flag.
pub const C_UF: u8 = 0b0001_0000;
/// Register D: valid RAM and time.
pub const D_VRT: u8 = 0b1000_0000;
/// Hours register bit 7 in 12-hour mode: PM.
pub const HOUR_PM: u8 = 0b1000_0000;
/// Alarm "don't care" values have bits 7-6 set.
pub const ALARM_DONT_CARE: u8 = 0b1100_0000;
/// Index port bit 7: NMI disable.
pub const INDEX_NMI_DISABLE: u8 = 0b1000_0000;

/// RAM above this address is placed above 4 GiB (the PCI hole starts here).
pub const LOW_RAM_MAX: u64 = crate::pci::PCI_MMIO_BASE;

const NS: i128 = 1_000_000_000;
/// UIP rises this long before the second boundary (tBUC).
const UIP_BEFORE_NS: i128 = 244_000;
/// ... and stays up this long after it (update cycle time).
const UIP_AFTER_NS: i128 = 1_984_000;

/// Days since 1970-01-01 of a proleptic Gregorian date.
fn days_from_civil(y: i64, m: u32, d: u32) -> i64 {
    let y = if m <= 2 { y - 1 } else { y };
    let era = y.div_euclid(400);
    let yoe = y - era * 400;
    let mp = (m as i64 + 9) % 12;
    let doy = (153 * mp + 2) / 5 + d as i64 - 1;
    let doe = yoe * 365 + yoe / 4 - yoe / 100 + doy;
    era * 146_097 + doe - 719_468
}

/// (year, month, day) of a day count since 1970-01-01.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z - era * 146_097;
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + (m <= 2) as i64, m, d)
}

/// Broken-down time.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Tm {
    year: i64,
    month: u32,
    day: u32,
    hour: u32,
    min: u32,
    sec: u32,
}

impl Tm {
    fn from_unix(secs: i64) -> Tm {
        let days = secs.div_euclid(86_400);
        let rem = secs.rem_euclid(86_400) as u32;
        let (year, month, day) = civil_from_days(days);
        Tm {
            year,
            month,
            day,
            hour: rem / 3600,
            min: rem / 60 % 60,
            sec: rem % 60,
        }
    }

    fn to_unix(self) -> i64 {
        let m = self.month.clamp(1, 12);
        let d = self.day.clamp(1, 31);
        days_from_civil(self.year, m, d) * 86_400
            + (self.hour.min(23) * 3600 + self.min.min(59) * 60 + self.sec.min(59)) as i64
    }

    /// Day of week, 1 = Sunday.
    fn weekday(self) -> u8 {
        ((self.to_unix().div_euclid(86_400) + 4).rem_euclid(7) + 1) as u8
    }
}

fn to_bcd(v: u32) -> u8 {
    (((v / 10 % 10) << 4) | (v % 10)) as u8
}

fn from_bcd(v: u8) -> u32 {
    (v >> 4) as u32 * 10 + (v & 15) as u32
}

/// Saved state of the RTC and CMOS.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct RtcState {
    /// The 128 CMOS bytes (clock registers included).
    pub cmos: Vec<u8>,
    /// The index register.
    pub index: u8,
    /// NMI mask bit of the index port.
    pub nmi_disabled: bool,
    /// The guest's time at the save, ns since the Unix epoch.
    pub guest_ns: i64,
}

/// The RTC and CMOS RAM.
pub struct Rtc {
    cmos: [u8; 128],
    index: u8,
    nmi_disabled: bool,
    clock: SharedClock,
    irq: Option<IrqLine>,
    /// Guest Unix time in ns = `base_ns + clock.now_ns()` while running.
    base_ns: i128,
    /// Clock time flags were last worked out at.
    last_ns: u64,
}

impl Rtc {
    /// An RTC showing `wall_unix_secs` (host Unix time) at clock time now, with the
    /// memory-size bytes describing `ram_size` bytes of RAM.
    pub fn new(
        clock: SharedClock,
        irq: Option<IrqLine>,
        wall_unix_secs: i64,
        ram_size: u64,
    ) -> Self {
        let now = clock.now_ns();
        let mut r = Rtc {
            cmos: [0; 128],
            index: 0,
            nmi_disabled: false,
            clock,
            irq,
            base_ns: wall_unix_secs as i128 * NS - now as i128,
            last_ns: now,
        };
        r.cmos[REG_A as usize] = A_DV_NORMAL | 0b0110;
        r.cmos[REG_B as usize] = B_24H;
        r.cmos[REG_D as usize] = D_VRT;
        r.set_memory_size(ram_size);
        r.cmos[CMOS_EQUIPMENT as usize] = 0b0000_0010; // FPU present, EGA/VGA, no floppy
        r.cmos[CMOS_CPU_COUNT as usize] = 0;
        r.fix_checksum();
        r.materialize(now);
        r
    }

    /// Snapshot.
    pub fn save(&self) -> RtcState {
        let now = self.clock.now_ns();
        RtcState {
            cmos: self.cmos.to_vec(),
            index: self.index,
            nmi_disabled: self.nmi_disabled,
            guest_ns: self.guest_ns(now) as i64,
        }
    }

    /// Restores a snapshot: the guest's clock continues from the saved time.
    pub fn restore(&mut self, s: &RtcState) {
        let now = self.clock.now_ns();
        for (d, v) in self.cmos.iter_mut().zip(&s.cmos) {
            *d = *v;
        }
        self.index = s.index & 0x7f;
        self.nmi_disabled = s.nmi_disabled;
        self.base_ns = s.guest_ns as i128 - now as i128;
        self.last_ns = now;
        self.update_irq();
    }

    /// The current host wall clock as Unix seconds (for [`Rtc::new`]).
    pub fn host_unix_secs() -> i64 {
        std::time::SystemTime::now()
            .duration_since(std::time::UNIX_EPOCH)
            .map(|d| d.as_secs() as i64)
            .unwrap_or(0)
    }

    fn set_memory_size(&mut self, ram: u64) {
        let below = ram.min(LOW_RAM_MAX);
        let above = ram - below;
        let put16 = |c: &mut [u8; 128], at: u8, v: u64| {
            let v = v.min(0xffff) as u16;
            c[at as usize] = v as u8;
            c[at as usize + 1] = (v >> 8) as u8;
        };
        put16(&mut self.cmos, CMOS_BASE_MEM_LO, 640);
        let ext_kb = below.saturating_sub(1 << 20) / 1024;
        put16(&mut self.cmos, CMOS_EXT_MEM_LO, ext_kb);
        put16(&mut self.cmos, CMOS_EXT_MEM2_LO, ext_kb);
        put16(
            &mut self.cmos,
            CMOS_MEM_16M_LO,
            below.saturating_sub(16 << 20) >> 16,
        );
        let hi = (above >> 16).min(0xff_ffff);
        for k in 0..3 {
            self.cmos[CMOS_MEM_4G_LO as usize + k] = (hi >> (8 * k)) as u8;
        }
    }

    fn fix_checksum(&mut self) {
        let sum: u16 = self.cmos[0x10..=0x2d].iter().map(|&b| b as u16).sum();
        self.cmos[CMOS_CHECKSUM_HI as usize] = (sum >> 8) as u8;
        self.cmos[CMOS_CHECKSUM_HI as usize + 1] = sum as u8;
    }

    /// Machine side: sets a CMOS byte (disk types, boot order...) and, for bytes
    /// 0x10-0x2d, the checksum at 0x2e/0x2f. The clock registers 0x00-0x0d are refused.
    pub fn set_cmos(&mut self, index: u8, value: u8) {
        let i = index & 0x7f;
        if i <= REG_D {
            log::warn!("rtc: set_cmos({i:#x}) on a clock register refused");
            return;
        }
        self.cmos[i as usize] = value;
        if (0x10..=0x2d).contains(&i) {
            self.fix_checksum();
        }
    }

    /// Machine side: reads a CMOS byte as stored.
    pub fn cmos(&self, index: u8) -> u8 {
        self.cmos[(index & 0x7f) as usize]
    }

    /// Whether the guest has NMIs masked (port 0x70 bit 7).
    pub fn nmi_disabled(&self) -> bool {
        self.nmi_disabled
    }

    fn reg(&self, r: u8) -> u8 {
        self.cmos[r as usize]
    }

    fn running(&self) -> bool {
        self.reg(REG_B) & B_SET == 0 && self.reg(REG_A) & A_DV == A_DV_NORMAL
    }

    fn guest_ns(&self, now: u64) -> i128 {
        self.base_ns + now as i128
    }

    fn binary(&self) -> bool {
        self.reg(REG_B) & B_DM != 0
    }

    fn enc(&self, v: u32) -> u8 {
        if self.binary() {
            v as u8
        } else {
            to_bcd(v)
        }
    }

    fn dec(&self, v: u8) -> u32 {
        if self.binary() {
            v as u32
        } else {
            from_bcd(v)
        }
    }

    fn enc_hour(&self, h: u32) -> u8 {
        if self.reg(REG_B) & B_24H != 0 {
            self.enc(h)
        } else {
            let h12 = if h.is_multiple_of(12) { 12 } else { h % 12 };
            self.enc(h12) | if h >= 12 { HOUR_PM } else { 0 }
        }
    }

    fn dec_hour(&self, v: u8) -> u32 {
        if self.reg(REG_B) & B_24H != 0 {
            self.dec(v)
        } else {
            self.dec(v & !HOUR_PM) % 12 + if v & HOUR_PM != 0 { 12 } else { 0 }
        }
    }

    /// Writes the current time into the time registers (when running).
    fn materialize(&mut self, now: u64) {
        if !self.running() {
            return;
        }
        let secs = self.guest_ns(now).div_euclid(NS) as i64;
        let tm = Tm::from_unix(secs);
        self.cmos[REG_SECONDS as usize] = self.enc(tm.sec);
        self.cmos[REG_MINUTES as usize] = self.enc(tm.min);
        self.cmos[REG_HOURS as usize] = self.enc_hour(tm.hour);
        self.cmos[REG_DAY_OF_WEEK as usize] = self.enc(tm.weekday() as u32);
        self.cmos[REG_DAY as usize] = self.enc(tm.day);
        self.cmos[REG_MONTH as usize] = self.enc(tm.month);
        self.cmos[REG_YEAR as usize] = self.enc((tm.year.rem_euclid(100)) as u32);
        self.cmos[CMOS_CENTURY as usize] = to_bcd((tm.year.div_euclid(100)).rem_euclid(100) as u32);
    }

    /// The time the registers hold, as Unix seconds.
    fn registers_time(&self) -> i64 {
        let year = from_bcd(self.cmos[CMOS_CENTURY as usize]) as i64 * 100
            + self.dec(self.reg(REG_YEAR)) as i64 % 100;
        Tm {
            year,
            month: self.dec(self.reg(REG_MONTH)),
            day: self.dec(self.reg(REG_DAY)),
            hour: self.dec_hour(self.reg(REG_HOURS)),
            min: self.dec(self.reg(REG_MINUTES)),
            sec: self.dec(self.reg(REG_SECONDS)),
        }
        .to_unix()
    }

    /// Restarts the time base from the registers, `phase_ns` into the second.
    fn restart_from_registers(&mut self, now: u64, phase_ns: i128) {
        self.base_ns = self.registers_time() as i128 * NS + phase_ns - now as i128;
    }

    fn periodic_units(&self) -> Option<u64> {
        match self.reg(REG_A) & A_RS {
            0 => None,
            1 => Some(128),
            2 => Some(256),
            rs => Some(1 << (rs - 1)),
        }
    }

    /// Index of the periodic period holding clock time `ns`.
    fn period_index(ns: u64, units: u64) -> u128 {
        ns as u128 * 32_768 / 1_000_000_000 / units as u128
    }

    fn alarm_matches(&self, secs: i64) -> bool {
        let tm = Tm::from_unix(secs);
        let check = |alarm: u8, v: u32, hour: bool| {
            let a = self.reg(alarm);
            if a & ALARM_DONT_CARE == ALARM_DONT_CARE {
                return true;
            }
            let want = if hour { self.dec_hour(a) } else { self.dec(a) };
            want == v
        };
        check(REG_SECONDS_ALARM, tm.sec, false)
            && check(REG_MINUTES_ALARM, tm.min, false)
            && check(REG_HOURS_ALARM, tm.hour, true)
    }

    /// Works out the flags from the time elapsed since the last evaluation and drives IRQ 8.
    fn evaluate(&mut self, now: u64) {
        let last = self.last_ns;
        if now <= last {
            return;
        }
        self.last_ns = now;
        if !self.running() {
            return;
        }
        let mut flags = 0;
        let s0 = self.guest_ns(last).div_euclid(NS) as i64;
        let s1 = self.guest_ns(now).div_euclid(NS) as i64;
        if s1 > s0 {
            flags |= C_UF;
            // An alarm pattern repeats at least daily: checking the last day is enough.
            let from = (s0 + 1).max(s1 - 86_400);
            if (from..=s1).any(|s| self.alarm_matches(s)) {
                flags |= C_AF;
            }
        }
        if let Some(u) = self.periodic_units() {
            if Self::period_index(now, u) != Self::period_index(last, u) {
                flags |= C_PF;
            }
        }
        self.cmos[REG_C as usize] |= flags;
        self.update_irq();
    }

    fn update_irq(&mut self) {
        let b = self.reg(REG_B);
        let c = self.reg(REG_C);
        let on = (c & C_PF != 0 && b & B_PIE != 0)
            || (c & C_AF != 0 && b & B_AIE != 0)
            || (c & C_UF != 0 && b & B_UIE != 0);
        if on {
            self.cmos[REG_C as usize] |= C_IRQF;
        }
        if let Some(l) = &self.irq {
            l.set(self.cmos[REG_C as usize] & C_IRQF != 0);
        }
    }

    /// Works out the flags due by now and drives IRQ 8 (call at [`Rtc::next_deadline`]).
    pub fn update(&mut self) {
        let now = self.clock.now_ns();
        self.evaluate(now);
    }

    /// Clock time (ns) at which the next interrupt could arise, if one is enabled.
    pub fn next_deadline(&self) -> Option<u64> {
        // From the last evaluation, not a fresh clock read: a period or second boundary
        // between the two would otherwise be signalled only one period late.
        let now = self.last_ns;
        let b = self.reg(REG_B);
        if !self.running() || self.reg(REG_C) & C_IRQF != 0 {
            return None;
        }
        let mut best: Option<u64> = None;
        if b & B_PIE != 0 {
            if let Some(u) = self.periodic_units() {
                let k = Self::period_index(now, u) + 1;
                let t = (k * u as u128 * 1_000_000_000).div_ceil(32_768) as u64;
                best = Some(t);
            }
        }
        if b & (B_UIE | B_AIE) != 0 {
            let g = self.guest_ns(now);
            let next = (g.div_euclid(NS) + 1) * NS;
            let t = (next - self.base_ns).max(0) as u64;
            best = Some(best.map_or(t, |x| x.min(t)));
        }
        best
    }

    fn uip(&self, now: u64) -> bool {
        if !self.running() {
            return false;
        }
        let phase = self.guest_ns(now).rem_euclid(NS);
        !(UIP_AFTER_NS..NS - UIP_BEFORE_NS).contains(&phase)
    }

    fn read_data(&mut self) -> u8 {
        let now = self.clock.now_ns();
        self.evaluate(now);
        let i = self.index;
        match i {
            REG_A => {
                let a = self.reg(REG_A) & !A_UIP;
                if self.uip(now) {
                    a | A_UIP
                } else {
                    a
                }
            }
            REG_C => {
                let c = self.reg(REG_C);
                self.cmos[REG_C as usize] = 0;
                self.update_irq();
                c
            }
            REG_D => D_VRT,
            REG_SECONDS..=REG_YEAR | CMOS_CENTURY => {
                self.materialize(now);
                self.cmos[i as usize]
            }
            _ => self.cmos[i as usize],
        }
    }

    fn write_data(&mut self, v: u8) {
        let now = self.clock.now_ns();
        self.evaluate(now);
        let i = self.index;
        let was_running = self.running();
        match i {
            REG_A => {
                self.materialize(now);
                self.cmos[REG_A as usize] = v & !A_UIP;
                if !was_running && self.running() {
                    // Leaving divider reset: the first update comes 500 ms later.
                    self.restart_from_registers(now, NS / 2);
                }
            }
            REG_B => {
                self.materialize(now);
                let mut v = v;
                if v & B_SET != 0 {
                    v &= !B_UIE; // "UIE is cleared when SET is written to one"
                }
                self.cmos[REG_B as usize] = v;
                if !was_running && self.running() {
                    self.restart_from_registers(now, 0);
                }
                self.update_irq();
            }
            REG_C | REG_D => log::debug!("rtc: write to read-only register {i:#x} ignored"),
            REG_SECONDS | REG_MINUTES | REG_HOURS | REG_DAY | REG_MONTH | REG_YEAR
            | CMOS_CENTURY => {
                self.materialize(now);
                self.cmos[i as usize] = v;
                if was_running {
                    let phase = self.guest_ns(now).rem_euclid(NS);
                    self.restart_from_registers(now, phase);
                }
            }
            _ => self.cmos[i as usize] = v,
        }
    }
}

impl BusDevice for Rtc {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        for (k, b) in data.iter_mut().enumerate() {
            *b = match offset + k as u64 {
                1 => self.read_data(),
                _ => 0xff, // the index register is write-only
            };
        }
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        for (k, &b) in data.iter().enumerate() {
            match offset + k as u64 {
                0 => {
                    self.nmi_disabled = b & INDEX_NMI_DISABLE != 0;
                    self.index = b & 0x7f;
                }
                1 => self.write_data(b),
                _ => {}
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::{Clock, ManualClock};
    use crate::irq::InterruptController;
    use std::sync::Arc;

    /// 2024-02-29 23:59:58 UTC (a Thursday), from `date -u -d ... +%s`.
    const T0: i64 = 1_709_251_198;

    struct Rig {
        clock: ManualClock,
        rtc: Rtc,
        ic: InterruptController,
    }

    impl Rig {
        fn new(ram: u64) -> Self {
            let clock = ManualClock::new();
            clock.set(1_000); // not at zero
            let ic = InterruptController::new();
            {
                let p = ic.ports();
                let mut p = p.lock().unwrap();
                for (port, v) in [
                    (0x20, 0x11),
                    (0x21, 0x08),
                    (0x21, 4),
                    (0x21, 1),
                    (0xa0, 0x11),
                    (0xa1, 0x70),
                    (0xa1, 2),
                    (0xa1, 1),
                    (0x21, 0),
                    (0xa1, 0),
                ] {
                    p.write(port, &[v]);
                }
            }
            let rtc = Rtc::new(Arc::new(clock.clone()), Some(ic.line(8)), T0, ram);
            Rig { clock, rtc, ic }
        }
        fn rd(&mut self, i: u8) -> u8 {
            self.rtc.write(0, &[i]);
            let mut b = [0];
            self.rtc.read(1, &mut b);
            b[0]
        }
        fn wr(&mut self, i: u8, v: u8) {
            self.rtc.write(0, &[i]);
            self.rtc.write(1, &[v]);
        }
        fn ms(&self, ms: u64) {
            self.clock.advance(ms * 1_000_000);
        }
    }

    #[test]
    fn calendar_helpers() {
        assert_eq!(days_from_civil(1970, 1, 1), 0);
        assert_eq!(days_from_civil(2000, 3, 1), 11_017);
        assert_eq!(civil_from_days(11_017), (2000, 3, 1));
        assert_eq!(Tm::from_unix(T0).weekday(), 5, "2024-02-29 was a Thursday");
    }

    #[test]
    fn reads_host_time_in_bcd_24h() {
        let mut r = Rig::new(64 << 20);
        assert_eq!(r.rd(REG_SECONDS), 0x58);
        assert_eq!(r.rd(REG_MINUTES), 0x59);
        assert_eq!(r.rd(REG_HOURS), 0x23);
        assert_eq!(r.rd(REG_DAY), 0x29);
        assert_eq!(r.rd(REG_MONTH), 0x02);
        assert_eq!(r.rd(REG_YEAR), 0x24);
        assert_eq!(r.rd(CMOS_CENTURY), 0x20);
        assert_eq!(r.rd(REG_DAY_OF_WEEK), 5);
        r.ms(2_000);
        assert_eq!(r.rd(REG_SECONDS), 0x00);
        assert_eq!(r.rd(REG_DAY), 0x01, "leap day rolls into March");
        assert_eq!(r.rd(REG_MONTH), 0x03);
        assert_eq!(r.rd(REG_D), D_VRT);
    }

    #[test]
    fn binary_and_12_hour_modes() {
        let mut r = Rig::new(64 << 20);
        r.wr(REG_B, B_DM); // binary, 12-hour
        assert_eq!(r.rd(REG_SECONDS), 58);
        assert_eq!(r.rd(REG_HOURS), HOUR_PM | 11);
        r.wr(REG_B, 0); // BCD, 12-hour
        assert_eq!(r.rd(REG_HOURS), HOUR_PM | 0x11);
        r.ms(2_000); // midnight: 12 AM
        assert_eq!(r.rd(REG_HOURS), 0x12);
    }

    #[test]
    fn set_bit_freezes_and_guest_sets_time() {
        let mut r = Rig::new(64 << 20);
        r.wr(REG_B, B_SET | B_24H);
        r.wr(REG_HOURS, 0x08);
        r.wr(REG_MINUTES, 0x30);
        r.wr(REG_SECONDS, 0x00);
        r.wr(REG_YEAR, 0x99);
        r.wr(CMOS_CENTURY, 0x19);
        r.wr(REG_MONTH, 0x12);
        r.wr(REG_DAY, 0x31);
        r.ms(5_000);
        assert_eq!(r.rd(REG_SECONDS), 0x00, "frozen while SET");
        assert_eq!(r.rd(REG_A) & A_UIP, 0, "no update cycles while SET");
        r.wr(REG_B, B_24H);
        r.ms(1_500);
        assert_eq!(r.rd(REG_SECONDS), 0x01);
        assert_eq!(r.rd(REG_MINUTES), 0x30);
        // Roll over the century.
        r.wr(REG_HOURS, 0x23);
        r.wr(REG_MINUTES, 0x59);
        r.wr(REG_SECONDS, 0x59);
        r.ms(1_000);
        assert_eq!(r.rd(REG_YEAR), 0x00);
        assert_eq!(r.rd(CMOS_CENTURY), 0x20);
        assert_eq!(r.rd(REG_MONTH), 0x01);
    }

    #[test]
    fn uip_window_before_the_second() {
        let mut r = Rig::new(64 << 20);
        // The guest second started at clock 1000 ns; boundary at 1000 + 1e9.
        r.clock.set(1_000 + 999_700_000);
        assert_eq!(r.rd(REG_A) & A_UIP, 0);
        r.clock.set(1_000 + 999_800_000);
        assert_ne!(r.rd(REG_A) & A_UIP, 0);
        r.clock.set(1_000 + 1_001_000_000);
        assert_ne!(r.rd(REG_A) & A_UIP, 0);
        r.clock.set(1_000 + 1_002_000_000);
        assert_eq!(r.rd(REG_A) & A_UIP, 0);
        assert_eq!(r.rd(REG_A), 0x26);
    }

    #[test]
    fn update_ended_interrupt_and_register_c() {
        let mut r = Rig::new(64 << 20);
        r.wr(REG_B, B_24H | B_UIE);
        assert_eq!(r.rtc.next_deadline(), Some(1_000 + 1_000_000_000));
        r.ms(999);
        r.rtc.update();
        assert!(!r.ic.pending());
        r.ms(1);
        r.rtc.update();
        assert!(r.ic.pending());
        assert_eq!(r.ic.acknowledge(), 0x70);
        assert_eq!(r.rtc.next_deadline(), None, "IRQF stays until C is read");
        assert_eq!(
            r.rd(REG_C) & !C_PF,
            C_IRQF | C_UF,
            "PF may be set too: rate 6 runs"
        );
        assert_eq!(r.rd(REG_C), 0, "read clears");
        assert!(r.rtc.next_deadline().is_some());
    }

    #[test]
    fn flags_set_without_enables_but_no_irq() {
        let mut r = Rig::new(64 << 20);
        r.ms(1_000);
        r.rtc.update();
        assert!(!r.ic.pending());
        assert_eq!(r.rd(REG_C) & (C_UF | C_PF), C_UF | C_PF);
    }

    #[test]
    fn periodic_interrupt_at_rate_select() {
        let mut r = Rig::new(64 << 20);
        r.rd(REG_C);
        r.wr(REG_A, A_DV_NORMAL | 0x0f); // 2 Hz: every 500 ms
        r.wr(REG_B, B_24H | B_PIE);
        r.rd(REG_C);
        let d = r.rtc.next_deadline().unwrap();
        assert_eq!(d, 500_000_000);
        r.clock.set(d - 1);
        r.rtc.update();
        assert!(!r.ic.pending());
        r.clock.set(d);
        r.rtc.update();
        assert!(r.ic.pending());
        assert_eq!(r.rd(REG_C), C_IRQF | C_PF);
        // Rate 6 = 1024 Hz.
        r.wr(REG_A, A_DV_NORMAL | 6);
        let now = r.clock.now_ns();
        let d = r.rtc.next_deadline().unwrap();
        assert!(d > now && d - now <= 976_563, "{}", d - now);
    }

    #[test]
    fn alarm_with_dont_care() {
        let mut r = Rig::new(64 << 20);
        r.wr(REG_B, B_24H | B_AIE);
        r.wr(REG_SECONDS_ALARM, 0x05);
        r.wr(REG_MINUTES_ALARM, 0xc0);
        r.wr(REG_HOURS_ALARM, 0xff);
        r.rd(REG_C);
        r.ms(6_000); // 23:59:58 + 6 s = 00:00:04
        r.rtc.update();
        assert!(!r.ic.pending());
        assert_eq!(r.rd(REG_C) & C_AF, 0);
        r.ms(1_000); // 00:00:05
        r.rtc.update();
        assert!(r.ic.pending());
        assert_eq!(r.rd(REG_C) & !C_PF, C_IRQF | C_AF | C_UF);
        // A long idle stretch still catches the alarm.
        r.ms(3_600_000);
        assert_ne!(r.rd(REG_C) & C_AF, 0);
    }

    #[test]
    fn divider_reset_stops_time_and_release_updates_after_half_a_second() {
        let mut r = Rig::new(64 << 20);
        r.wr(REG_A, 0b0111_0110); // DV = 111: divider in reset
        r.ms(10_000);
        assert_eq!(r.rd(REG_SECONDS), 0x58, "stopped");
        r.wr(REG_A, A_DV_NORMAL | 6);
        r.ms(499);
        assert_eq!(r.rd(REG_SECONDS), 0x58);
        r.ms(1);
        assert_eq!(r.rd(REG_SECONDS), 0x59, "first update 500 ms after release");
    }

    #[test]
    fn alarm_in_12_hour_mode() {
        let mut r = Rig::new(64 << 20);
        r.wr(REG_B, B_SET); // 12-hour BCD, frozen
        r.wr(REG_HOURS, HOUR_PM | 0x01);
        r.wr(REG_MINUTES, 0x00);
        r.wr(REG_SECONDS, 0x00);
        r.wr(REG_HOURS_ALARM, HOUR_PM | 0x01);
        r.wr(REG_MINUTES_ALARM, 0x00);
        r.wr(REG_SECONDS_ALARM, 0x02);
        r.wr(REG_B, B_AIE);
        r.rd(REG_C);
        r.ms(1_000);
        r.rtc.update();
        assert!(!r.ic.pending());
        r.ms(1_000); // 1:00:02 PM
        r.rtc.update();
        assert!(r.ic.pending());
        assert_ne!(r.rd(REG_C) & C_AF, 0);
    }

    #[test]
    fn nmi_mask_bit_and_index() {
        let mut r = Rig::new(64 << 20);
        r.rtc.write(0, &[0x80 | 0x40]);
        assert!(r.rtc.nmi_disabled());
        r.rtc.write(1, &[0x5a]);
        r.rtc.write(0, &[0x40]);
        assert!(!r.rtc.nmi_disabled());
        let mut b = [0];
        r.rtc.read(1, &mut b);
        assert_eq!(b[0], 0x5a);
    }

    #[test]
    fn memory_size_registers() {
        let mut r = Rig::new(32 << 20);
        assert_eq!(u16::from_le_bytes([r.rd(0x15), r.rd(0x16)]), 640);
        assert_eq!(u16::from_le_bytes([r.rd(0x17), r.rd(0x18)]), 31 * 1024);
        assert_eq!(u16::from_le_bytes([r.rd(0x30), r.rd(0x31)]), 31 * 1024);
        assert_eq!(u16::from_le_bytes([r.rd(0x34), r.rd(0x35)]), 256);
        assert_eq!([r.rd(0x5b), r.rd(0x5c), r.rd(0x5d)], [0, 0, 0]);
        let sum: u16 = (0x10..=0x2d).map(|i| r.rd(i) as u16).sum();
        assert_eq!(u16::from_be_bytes([r.rd(0x2e), r.rd(0x2f)]), sum);
        let mut big = Rig::new(5 << 30);
        assert_eq!(u16::from_le_bytes([big.rd(0x17), big.rd(0x18)]), 0xffff);
        assert_eq!(
            u16::from_le_bytes([big.rd(0x34), big.rd(0x35)]),
            ((0xe000_0000u64 - (16 << 20)) >> 16) as u16
        );
        let above = ((5u64 << 30) - 0xe000_0000) >> 16;
        assert_eq!(
            [big.rd(0x5b), big.rd(0x5c), big.rd(0x5d)],
            [above as u8, (above >> 8) as u8, (above >> 16) as u8]
        );
        big.rtc.set_cmos(0x12, 0xf0);
        let sum: u16 = (0x10..=0x2d).map(|i| big.rd(i) as u16).sum();
        assert_eq!(u16::from_be_bytes([big.rd(0x2e), big.rd(0x2f)]), sum);
    }

    #[test]
    fn save_restore_keeps_guest_time_and_cmos() {
        let mut r = Rig::new(64 << 20);
        r.wr(0x40, 0x77);
        r.ms(1_000);
        let json = serde_json::to_string(&r.rtc.save()).unwrap();
        let mut s = Rig::new(8 << 20);
        s.ms(123_456);
        s.rtc.restore(&serde_json::from_str(&json).unwrap());
        assert_eq!(s.rd(0x40), 0x77);
        assert_eq!(s.rd(REG_SECONDS), 0x59);
        assert_eq!(
            s.rd(0x17),
            r.rd(0x17),
            "memory size comes from the snapshot"
        );
    }

    #[test]
    fn random_writes_never_panic() {
        let mut r = Rig::new(64 << 20);
        let mut x = 0x2545_f491u32;
        for _ in 0..50_000 {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            let i = (x >> 8) as u8 & 0x7f;
            if x & 1 != 0 {
                r.wr(i, (x >> 16) as u8);
            } else {
                r.rd(i);
            }
            r.clock.advance((x >> 12) as u64 % 50_000_000);
            r.rtc.update();
            let _ = r.rtc.next_deadline();
            r.rtc.read(0, &mut [0, 0]);
        }
    }
}
