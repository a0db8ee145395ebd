//! Intel 8259A programmable interrupt controller, master/slave pair as in the PC/AT.
//!
//! Master at 0x20/0x21, slave at 0xa0/0xa1 cascaded on master IR2, the edge/level control
//! registers (ELCR, PIIX3 datasheet section 4.1.21) at 0x4d0/0x4d1. Section numbers below
//! refer to the Intel 8259A datasheet (order 231468).
//!
//! [`PicPair`] is plain state: it does no locking. It is registered on the bus with
//! absolute port numbers (origin 0) through [`crate::irq::InterruptController`], which
//! owns it behind a mutex and drives its inputs from [`crate::irq::IrqLine`]s.

use morph86_mmu::BusDevice;

/// Master command port (ICW1, OCW2, OCW3 writes; IRR/ISR/poll reads).
pub const MASTER_CMD: u16 = 0x20;
/// Master data port (ICW2-4, OCW1 = IMR).
pub const MASTER_DATA: u16 = 0x21;
/// Slave command port.
pub const SLAVE_CMD: u16 = 0xa0;
/// Slave data port.
pub const SLAVE_DATA: u16 = 0xa1;
/// ELCR for IRQ0-7 (PIIX3 4.1.21).
pub const ELCR1: u16 = 0x4d0;
/// ELCR for IRQ8-15.
pub const ELCR2: u16 = 0x4d1;

/// ICW1 marker: A0=0 with D4=1 starts initialisation (datasheet "Initialization Command Words").
pub const ICW1_INIT: u8 = 0b0001_0000;
/// ICW1 LTIM: level triggered mode for all inputs.
pub const ICW1_LTIM: u8 = 0b0000_1000;
/// ICW1 SNGL: single PIC, no ICW3.
pub const ICW1_SNGL: u8 = 0b0000_0010;
/// ICW1 IC4: ICW4 follows.
pub const ICW1_IC4: u8 = 0b0000_0001;
/// ICW4 uPM: 8086/8088 mode (vector = ICW2 T7-T3 + IR number).
pub const ICW4_UPM: u8 = 0b0000_0001;
/// ICW4 AEOI: automatic end of interrupt.
pub const ICW4_AEOI: u8 = 0b0000_0010;
/// ICW4 SFNM: special fully nested mode.
pub const ICW4_SFNM: u8 = 0b0001_0000;
/// OCW3 marker bits D4-D3 = 01.
pub const OCW3_MARK: u8 = 0b0000_1000;
/// OCW3 ESMM: the SMM bit is valid.
pub const OCW3_ESMM: u8 = 0b0100_0000;
/// OCW3 SMM: set special mask mode.
pub const OCW3_SMM: u8 = 0b0010_0000;
/// OCW3 P: poll command.
pub const OCW3_POLL: u8 = 0b0000_0100;
/// OCW3 RR: read register command.
pub const OCW3_RR: u8 = 0b0000_0010;
/// OCW3 RIS: read ISR (1) or IRR (0).
pub const OCW3_RIS: u8 = 0b0000_0001;
/// OCW2 R SL EOI field (D7-D5).
pub const OCW2_CMD: u8 = 0b1110_0000;
/// OCW2 level field L2-L0.
pub const OCW2_LEVEL: u8 = 0b0000_0111;
/// ELCR bits that exist on the master: IRQ0-2 are always edge (PIIX3 4.1.21).
pub const ELCR1_MASK: u8 = 0b1111_1000;
/// ELCR bits that exist on the slave: IRQ8 and IRQ13 are always edge.
pub const ELCR2_MASK: u8 = 0b1101_1110;
/// The master input the slave's INT output is wired to.
pub const CASCADE_IRQ: u8 = 2;

#[derive(Debug, Clone, Copy, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
enum InitStep {
    Ready,
    Icw2,
    Icw3,
    Icw4,
}

/// One 8259A.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct Pic {
    irr: u8,
    isr: u8,
    imr: u8,
    /// Input levels as last seen (edge detection).
    lines: u8,
    elcr: u8,
    elcr_mask: u8,
    icw1: u8,
    icw4: u8,
    vector_base: u8,
    icw3: u8,
    step: InitStep,
    /// The IR with the highest priority (0 after init: IR0 highest, IR7 lowest).
    top: u8,
    rotate_on_aeoi: bool,
    special_mask: bool,
    read_isr: bool,
    poll: bool,
    is_master: bool,
}

impl Pic {
    fn new(is_master: bool, vector_base: u8) -> Self {
        Pic {
            irr: 0,
            isr: 0,
            imr: 0xff,
            lines: 0,
            elcr: 0,
            elcr_mask: if is_master { ELCR1_MASK } else { ELCR2_MASK },
            icw1: ICW1_INIT | ICW1_IC4,
            icw4: ICW4_UPM,
            vector_base,
            icw3: if is_master {
                1 << CASCADE_IRQ
            } else {
                CASCADE_IRQ
            },
            step: InitStep::Ready,
            top: 0,
            rotate_on_aeoi: false,
            special_mask: false,
            read_isr: false,
            poll: false,
            is_master,
        }
    }

    fn level_mode(&self, bit: u8) -> bool {
        self.icw1 & ICW1_LTIM != 0 || self.elcr & bit != 0
    }

    /// Drives input `ir` (0-7) to `level`.
    fn set_input(&mut self, ir: u8, level: bool) {
        let bit = 1u8 << ir;
        if self.level_mode(bit) {
            if level {
                self.irr |= bit;
            } else {
                self.irr &= !bit;
            }
        } else if level && self.lines & bit == 0 {
            // Edge mode: a rising edge sets IRR; IRR stays set until acknowledged.
            self.irr |= bit;
        }
        if level {
            self.lines |= bit;
        } else {
            self.lines &= !bit;
        }
    }

    /// Relative priority (0 = highest) of the best bit in `mask`, or 8 if none.
    fn priority(&self, mask: u8) -> u8 {
        (0..8)
            .find(|p| mask & (1 << ((p + self.top) & 7)) != 0)
            .unwrap_or(8)
    }

    /// The IR that would be acknowledged now, if any.
    fn best(&self) -> Option<u8> {
        let p = self.priority(self.irr & !self.imr);
        if p == 8 {
            return None;
        }
        let mut in_service = self.isr;
        if self.special_mask {
            // Special mask mode (OCW3): masked levels do not inhibit lower ones.
            in_service &= !self.imr;
        }
        if self.is_master && self.icw4 & ICW4_SFNM != 0 {
            // Special fully nested: the slave may interrupt while its cascade IR is in service.
            in_service &= !self.icw3;
        }
        (p < self.priority(in_service)).then_some((p + self.top) & 7)
    }

    /// The INTA sequence for `ir`: ISR/IRR bookkeeping.
    fn ack(&mut self, ir: u8) {
        let bit = 1u8 << ir;
        if self.icw4 & ICW4_AEOI != 0 {
            if self.rotate_on_aeoi {
                self.top = (ir + 1) & 7;
            }
        } else {
            self.isr |= bit;
        }
        if !self.level_mode(bit) {
            self.irr &= !bit;
        }
    }

    fn vector(&self, ir: u8) -> u8 {
        (self.vector_base & 0b1111_1000) | ir
    }

    fn write_cmd(&mut self, v: u8) {
        if v & ICW1_INIT != 0 {
            // ICW1: "Initialization Command Word 1" - resets the edge sense, IMR, priorities.
            self.icw1 = v;
            if v & ICW1_IC4 == 0 {
                self.icw4 = 0;
            }
            self.step = InitStep::Icw2;
            self.imr = 0;
            self.isr = 0;
            // The edge sense is reset: an input must go low and high again to request.
            // `lines` keeps the physical input levels, so a line held high stays quiet.
            self.irr = 0;
            self.top = 0;
            self.special_mask = false;
            self.read_isr = false;
            self.poll = false;
            self.rotate_on_aeoi = false;
            if v & 0b1110_0000 != 0 {
                log::debug!("pic: ICW1 {v:#x} has 8080 address bits set (ignored)");
            }
        } else if v & OCW3_MARK != 0 {
            if v & 0x80 != 0 {
                log::debug!("pic: OCW3 {v:#x} with D7 set");
            }
            if v & OCW3_ESMM != 0 {
                self.special_mask = v & OCW3_SMM != 0;
            }
            if v & OCW3_POLL != 0 {
                self.poll = true;
            }
            if v & OCW3_RR != 0 {
                self.read_isr = v & OCW3_RIS != 0;
            }
        } else {
            // OCW2: rotation and EOI commands.
            let level = v & OCW2_LEVEL;
            match (v & OCW2_CMD) >> 5 {
                0b001 | 0b101 => {
                    let p = self.priority(self.isr);
                    if p < 8 {
                        let ir = (p + self.top) & 7;
                        self.isr &= !(1 << ir);
                        if v & 0x80 != 0 {
                            self.top = (ir + 1) & 7;
                        }
                    }
                }
                0b011 => self.isr &= !(1 << level),
                0b111 => {
                    self.isr &= !(1 << level);
                    self.top = (level + 1) & 7;
                }
                0b100 => self.rotate_on_aeoi = true,
                0b000 => self.rotate_on_aeoi = false,
                0b110 => self.top = (level + 1) & 7,
                _ => {} // 010: no operation
            }
        }
    }

    fn write_data(&mut self, v: u8) {
        match self.step {
            InitStep::Ready => self.imr = v,
            InitStep::Icw2 => {
                self.vector_base = v & 0b1111_1000;
                self.step = if self.icw1 & ICW1_SNGL == 0 {
                    InitStep::Icw3
                } else if self.icw1 & ICW1_IC4 != 0 {
                    InitStep::Icw4
                } else {
                    InitStep::Ready
                };
            }
            InitStep::Icw3 => {
                self.icw3 = v;
                self.step = if self.icw1 & ICW1_IC4 != 0 {
                    InitStep::Icw4
                } else {
                    InitStep::Ready
                };
            }
            InitStep::Icw4 => {
                self.icw4 = v;
                if v & ICW4_UPM == 0 {
                    log::warn!("pic: ICW4 {v:#x} selects 8080 mode; vectors stay 8086-style");
                }
                self.step = InitStep::Ready;
            }
        }
    }
}

/// The cascaded master/slave pair of a PC, with the ELCR.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct PicPair {
    /// IRQ0-7.
    pub master: Pic,
    /// IRQ8-15.
    pub slave: Pic,
}

impl Default for PicPair {
    fn default() -> Self {
        Self::new()
    }
}

impl PicPair {
    /// Both chips at power-on: everything masked, vectors 0x08/0x70 until the BIOS programs them.
    pub fn new() -> Self {
        PicPair {
            master: Pic::new(true, 0x08),
            slave: Pic::new(false, 0x70),
        }
    }

    /// Drives IRQ `irq` (0-15) to `level`. IRQ2 is the cascade and cannot be driven.
    pub fn set_irq(&mut self, irq: u8, level: bool) {
        match irq {
            0..=7 if irq != CASCADE_IRQ => self.master.set_input(irq, level),
            8..=15 => self.slave.set_input(irq - 8, level),
            _ => {
                log::warn!("pic: IRQ {irq} cannot be driven");
                return;
            }
        }
        self.cascade();
    }

    /// Propagates the slave's INT output to master IR2.
    fn cascade(&mut self) {
        let out = self.slave.best().is_some();
        self.master.set_input(CASCADE_IRQ, out);
    }

    /// Whether the master's INT output (the CPU's INTR) is asserted.
    pub fn intr(&self) -> bool {
        self.master.best().is_some()
    }

    /// The INTA cycle: the vector to deliver. With nothing pending it yields the
    /// spurious IRQ7 (or IRQ15) vector, as the chip does when the request went away.
    pub fn acknowledge(&mut self) -> u8 {
        let v = match self.master.best() {
            Some(CASCADE_IRQ) => {
                self.master.ack(CASCADE_IRQ);
                match self.slave.best() {
                    Some(ir) => {
                        self.slave.ack(ir);
                        self.slave.vector(ir)
                    }
                    None => self.slave.vector(7),
                }
            }
            Some(ir) => {
                self.master.ack(ir);
                self.master.vector(ir)
            }
            None => self.master.vector(7),
        };
        self.cascade();
        v
    }

    /// The poll command (OCW3 P): acknowledges like INTA and returns `I000_0WWW`.
    fn poll_read(&mut self, slave: bool) -> u8 {
        let r = if slave {
            self.slave.poll = false;
            match self.slave.best() {
                Some(ir) => {
                    self.slave.ack(ir);
                    0x80 | ir
                }
                None => 0,
            }
        } else {
            self.master.poll = false;
            match self.master.best() {
                Some(ir) => {
                    self.master.ack(ir);
                    0x80 | ir
                }
                None => 0,
            }
        };
        self.cascade();
        r
    }

    /// A guest read of an absolute port.
    pub fn read_port(&mut self, port: u16) -> u8 {
        match port {
            MASTER_CMD | MASTER_DATA | SLAVE_CMD | SLAVE_DATA => {
                let slave = port & 0x80 != 0;
                let chip = if slave { &self.slave } else { &self.master };
                if chip.poll {
                    return self.poll_read(slave);
                }
                if port & 1 == 1 {
                    chip.imr
                } else if chip.read_isr {
                    chip.isr
                } else {
                    chip.irr
                }
            }
            ELCR1 => self.master.elcr,
            ELCR2 => self.slave.elcr,
            _ => 0xff,
        }
    }

    /// A guest write of an absolute port.
    pub fn write_port(&mut self, port: u16, v: u8) {
        match port {
            MASTER_CMD => self.master.write_cmd(v),
            MASTER_DATA => self.master.write_data(v),
            SLAVE_CMD => self.slave.write_cmd(v),
            SLAVE_DATA => self.slave.write_data(v),
            ELCR1 => self.master.elcr = v & self.master.elcr_mask,
            ELCR2 => self.slave.elcr = v & self.slave.elcr_mask,
            _ => log::debug!("pic: write to port {port:#x} ignored"),
        }
        // The slave's output may have changed (mask, EOI, mode).
        self.cascade();
    }
}

impl BusDevice for PicPair {
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

    fn out(p: &mut PicPair, port: u16, v: u8) {
        p.write(port as u64, &[v]);
    }
    fn inb(p: &mut PicPair, port: u16) -> u8 {
        let mut b = [0];
        p.read(port as u64, &mut b);
        b[0]
    }

    /// The BIOS/Linux initialisation: ICW1 0x11, ICW2 0x20/0x28, ICW3 4/2, ICW4 `icw4`.
    fn init(p: &mut PicPair, icw4: u8) {
        out(p, 0x20, 0x11);
        out(p, 0x21, 0x20);
        out(p, 0x21, 0x04);
        out(p, 0x21, icw4);
        out(p, 0xa0, 0x11);
        out(p, 0xa1, 0x28);
        out(p, 0xa1, 0x02);
        out(p, 0xa1, icw4);
        out(p, 0x21, 0x00);
        out(p, 0xa1, 0x00);
    }

    fn pic() -> PicPair {
        let mut p = PicPair::new();
        init(&mut p, 0x01);
        p
    }

    #[test]
    fn edge_interrupt_vector_and_eoi() {
        let mut p = pic();
        assert!(!p.intr());
        p.set_irq(0, true);
        assert!(p.intr());
        assert_eq!(inb(&mut p, 0x20), 0b1); // IRR after init
        assert_eq!(p.acknowledge(), 0x20);
        assert!(!p.intr());
        out(&mut p, 0x20, 0x0b); // OCW3: read ISR
        assert_eq!(inb(&mut p, 0x20), 0b1);
        // A level still high does not retrigger in edge mode.
        p.set_irq(0, false);
        p.set_irq(0, true);
        assert!(!p.intr(), "IR0 in service blocks itself");
        out(&mut p, 0x20, 0x20); // non-specific EOI
        assert_eq!(inb(&mut p, 0x20), 0);
        assert!(p.intr(), "second edge latched in IRR");
        assert_eq!(p.acknowledge(), 0x20);
    }

    #[test]
    fn priority_and_nesting() {
        let mut p = pic();
        p.set_irq(3, true);
        p.set_irq(1, true);
        assert_eq!(p.acknowledge(), 0x21, "IR1 beats IR3");
        assert!(!p.intr(), "IR3 is lower than IR1 in service");
        p.set_irq(0, true);
        assert!(p.intr(), "IR0 nests over IR1");
        assert_eq!(p.acknowledge(), 0x20);
        out(&mut p, 0x20, 0x20); // EOI clears IR0 (highest in service)
        out(&mut p, 0x20, 0x0b);
        assert_eq!(inb(&mut p, 0x20), 0b10);
        out(&mut p, 0x20, 0x61); // specific EOI for IR1
        assert_eq!(inb(&mut p, 0x20), 0);
        assert_eq!(p.acknowledge(), 0x23);
    }

    #[test]
    fn masking_through_ocw1() {
        let mut p = pic();
        out(&mut p, 0x21, 0b0000_0001);
        assert_eq!(inb(&mut p, 0x21), 1);
        p.set_irq(0, true);
        assert!(!p.intr());
        out(&mut p, 0x21, 0);
        assert!(p.intr());
    }

    #[test]
    fn cascade_on_irq2_and_spurious_vectors() {
        let mut p = pic();
        p.set_irq(14, true);
        assert!(p.intr());
        assert_eq!(inb(&mut p, 0x20), 0b100, "master IRR shows the cascade");
        assert_eq!(p.acknowledge(), 0x2e);
        out(&mut p, 0xa0, 0x0b);
        assert_eq!(inb(&mut p, 0xa0), 0b0100_0000);
        out(&mut p, 0x20, 0x0b);
        assert_eq!(inb(&mut p, 0x20), 0b100);
        out(&mut p, 0xa0, 0x20);
        out(&mut p, 0x20, 0x20);
        assert_eq!(inb(&mut p, 0x20), 0);
        // Nothing pending: INTA yields IRQ7's vector and sets no ISR bit.
        assert_eq!(p.acknowledge(), 0x27);
        assert_eq!(inb(&mut p, 0x20), 0);
        // A slave request that vanishes (level mode) after the master saw it: IRQ15 vector.
        out(&mut p, 0x4d1, 0b0000_1000); // IRQ11 level
        p.set_irq(11, true);
        assert!(p.intr());
        // Mask on the slave after the master latched the cascade edge.
        out(&mut p, 0xa1, 0xff);
        assert!(p.intr(), "master IRR2 stays latched (edge)");
        assert_eq!(p.acknowledge(), 0x2f);
    }

    #[test]
    fn level_mode_via_elcr_and_ltim() {
        let mut p = pic();
        out(&mut p, 0x4d0, 0xff);
        assert_eq!(inb(&mut p, 0x4d0), 0xf8, "IRQ0-2 cannot be level");
        out(&mut p, 0x4d1, 0xff);
        assert_eq!(inb(&mut p, 0x4d1), 0xde, "IRQ8 and IRQ13 cannot be level");
        p.set_irq(5, true);
        assert_eq!(p.acknowledge(), 0x25);
        out(&mut p, 0x20, 0x20);
        assert!(p.intr(), "level still high: requests again after EOI");
        p.set_irq(5, false);
        assert!(!p.intr(), "level low: request withdrawn");
        // LTIM in ICW1 makes every input level triggered.
        let mut q = PicPair::new();
        out(&mut q, 0x20, 0x19);
        out(&mut q, 0x21, 0x40);
        out(&mut q, 0x21, 0x04);
        out(&mut q, 0x21, 0x01);
        out(&mut q, 0x21, 0x00);
        q.set_irq(0, true);
        q.set_irq(0, false);
        assert!(!q.intr());
    }

    #[test]
    fn auto_eoi_and_rotation() {
        let mut p = PicPair::new();
        init(&mut p, 0x03); // AEOI
        p.set_irq(4, true);
        assert_eq!(p.acknowledge(), 0x24);
        out(&mut p, 0x20, 0x0b);
        assert_eq!(inb(&mut p, 0x20), 0, "AEOI leaves ISR clear");
        // Rotate in AEOI: after serving IR4, IR5 is highest, IR4 lowest.
        out(&mut p, 0x20, 0x80);
        p.set_irq(4, false);
        p.set_irq(4, true);
        assert_eq!(p.acknowledge(), 0x24);
        p.set_irq(4, false);
        p.set_irq(4, true);
        p.set_irq(6, true);
        assert_eq!(p.acknowledge(), 0x26, "IR6 beats IR4 after rotation");
    }

    #[test]
    fn set_priority_and_rotate_on_eoi() {
        let mut p = pic();
        out(&mut p, 0x20, 0xc3); // set priority: IR3 lowest, IR4 highest
        p.set_irq(1, true);
        p.set_irq(5, true);
        assert_eq!(p.acknowledge(), 0x25);
        out(&mut p, 0x20, 0xa0); // rotate on non-specific EOI: IR5 becomes lowest
        assert_eq!(p.acknowledge(), 0x21);
        out(&mut p, 0x20, 0xe1); // rotate on specific EOI of IR1
        p.set_irq(0, true);
        p.set_irq(5, false);
        p.set_irq(5, true);
        assert_eq!(p.acknowledge(), 0x25, "IR2 highest now: IR5 before IR0");
    }

    #[test]
    fn special_mask_mode_lets_lower_levels_in() {
        let mut p = pic();
        p.set_irq(3, true);
        assert_eq!(p.acknowledge(), 0x23);
        p.set_irq(5, true);
        assert!(!p.intr());
        out(&mut p, 0x21, 0b0000_1000); // mask IR3 (in service)
        out(&mut p, 0x20, 0x68); // OCW3: ESMM|SMM
        assert!(p.intr(), "special mask: IR5 served while IR3 in service");
        assert_eq!(p.acknowledge(), 0x25);
        out(&mut p, 0x20, 0x48); // reset special mask
        p.set_irq(6, true);
        assert!(!p.intr());
    }

    #[test]
    fn poll_mode() {
        let mut p = pic();
        out(&mut p, 0x21, 0xff); // poll ignores INTR, but not the mask
        out(&mut p, 0x21, 0x00);
        out(&mut p, 0x20, 0x0c); // OCW3 poll
        assert_eq!(inb(&mut p, 0x20), 0x00, "nothing pending: I=0");
        p.set_irq(6, true);
        out(&mut p, 0x20, 0x0c);
        assert_eq!(inb(&mut p, 0x20), 0x86);
        assert!(!p.intr(), "poll acknowledged IR6");
        out(&mut p, 0x20, 0x0b);
        assert_eq!(inb(&mut p, 0x20), 0b0100_0000);
        // The read after the poll is an ordinary one again.
        assert_eq!(inb(&mut p, 0x20), 0b0100_0000);
    }

    #[test]
    fn poll_on_the_slave_and_read_register_latch() {
        let mut p = pic();
        p.set_irq(10, true);
        out(&mut p, 0xa0, 0x0c);
        assert_eq!(inb(&mut p, 0xa0), 0x82);
        out(&mut p, 0xa0, 0x0b);
        assert_eq!(inb(&mut p, 0xa0), 0b100, "slave ISR2 after the poll");
        // OCW3 without RR keeps the register selection.
        out(&mut p, 0xa0, 0x08);
        assert_eq!(inb(&mut p, 0xa0), 0b100);
        out(&mut p, 0xa0, 0x0a);
        assert_eq!(inb(&mut p, 0xa0), 0, "IRR");
    }

    #[test]
    fn special_fully_nested_lets_slave_nest() {
        let mut p = PicPair::new();
        init(&mut p, 0x11); // SFNM on both (only matters on the master)
        p.set_irq(12, true);
        assert_eq!(p.acknowledge(), 0x2c);
        p.set_irq(9, true);
        assert!(p.intr(), "higher slave IR nests through IR2 in service");
        assert_eq!(p.acknowledge(), 0x29);
    }

    #[test]
    fn icw_without_icw4_and_single_mode() {
        let mut p = PicPair::new();
        out(&mut p, 0x20, 0x12); // SNGL, no IC4
        out(&mut p, 0x21, 0x50);
        out(&mut p, 0x21, 0x00); // OCW1 (no ICW3/ICW4 expected)
        assert_eq!(inb(&mut p, 0x21), 0x00);
        p.set_irq(7, true);
        assert_eq!(p.acknowledge(), 0x57);
    }

    #[test]
    fn icw1_resets_edge_sense_for_lines_held_high() {
        let mut p = PicPair::new();
        p.set_irq(3, true); // before initialisation: latched, then cleared by ICW1
        init(&mut p, 0x01);
        assert!(!p.intr());
        p.set_irq(3, true); // still high: no edge
        assert!(!p.intr());
        p.set_irq(3, false);
        p.set_irq(3, true);
        assert!(p.intr());
    }

    #[test]
    fn random_writes_never_panic() {
        let mut p = pic();
        let mut x = 0x1234_5678u32;
        for _ in 0..100_000 {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            let port = [0x20, 0x21, 0xa0, 0xa1, 0x4d0, 0x4d1][(x % 6) as usize];
            match (x >> 8) % 4 {
                0 => out(&mut p, port, (x >> 16) as u8),
                1 => {
                    inb(&mut p, port);
                }
                2 => p.set_irq(((x >> 16) % 16) as u8, x & 1 << 30 != 0),
                _ => {
                    if p.intr() {
                        p.acknowledge();
                    }
                }
            }
        }
    }
}
