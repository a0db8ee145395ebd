//! Interrupt wiring: [`IrqLine`] handles that devices drive, and the
//! [`InterruptController`] the machine asks for INTR and the INTA vector.
//!
//! The PIC pair lives behind one mutex inside the controller. Several devices may share
//! one IRQ line (wired-OR, as PCI INTx lines do): each [`IrqLine`] made by
//! [`InterruptController::line`] is a separate source, and the PIC input is high while
//! any source drives it high.
//!
//! Lock order: a device holding its own lock may raise/lower its IRQ line (which takes
//! the controller lock); the controller never calls out to devices while holding it.
//! INTR is mirrored in an atomic so the run loop can test it without locking, and a
//! [`Wakeup`] can be notified when it rises (the wake-up lock is taken last, briefly).

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};

use morph86_mmu::BusDevice;

use crate::bus::{lock, SharedDevice};
use crate::pic::PicPair;
use crate::wake::Wakeup;

/// Number of IRQ inputs on the PIC pair.
pub const NUM_IRQS: usize = 16;

struct Inner {
    pic: PicPair,
    /// Per IRQ, one bit per source currently driving the line high.
    sources: [u32; NUM_IRQS],
    /// Per IRQ, sources handed out so far.
    next_source: [u8; NUM_IRQS],
}

struct Shared {
    inner: Mutex<Inner>,
    intr: AtomicBool,
    wake: Mutex<Option<Wakeup>>,
}

impl Shared {
    fn publish(&self, inner: &Inner) {
        let on = inner.pic.intr();
        let was = self.intr.swap(on, Ordering::SeqCst);
        if on && !was {
            if let Some(w) = &*lock(&self.wake) {
                w.notify();
            }
        }
    }
}

/// Saved state of the interrupt controller.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct IrqState {
    /// The PIC pair.
    pub pic: PicPair,
    /// Per IRQ, the sources driving it high.
    pub sources: [u32; NUM_IRQS],
}

/// The machine-facing side of the PIC pair (cheap to clone).
#[derive(Clone)]
pub struct InterruptController {
    shared: Arc<Shared>,
}

impl Default for InterruptController {
    fn default() -> Self {
        Self::new()
    }
}

impl InterruptController {
    /// A controller with a PIC pair in its power-on state.
    pub fn new() -> Self {
        InterruptController {
            shared: Arc::new(Shared {
                inner: Mutex::new(Inner {
                    pic: PicPair::new(),
                    sources: [0; NUM_IRQS],
                    next_source: [0; NUM_IRQS],
                }),
                intr: AtomicBool::new(false),
                wake: Mutex::new(None),
            }),
        }
    }

    /// A new source driving IRQ `irq` (0-15), initially low.
    pub fn line(&self, irq: u8) -> IrqLine {
        let irq = irq & 15;
        let mut g = lock(&self.shared.inner);
        let n = g.next_source[irq as usize];
        if n >= 32 {
            log::warn!("irq: more than 32 sources on IRQ {irq}; sharing the last one");
        } else {
            g.next_source[irq as usize] = n + 1;
        }
        IrqLine {
            shared: self.shared.clone(),
            irq,
            bit: 1 << n.min(31),
        }
    }

    /// Notifies `wake` each time INTR becomes asserted, so a halted vCPU sleeping on it
    /// wakes for interrupts raised from other threads.
    pub fn set_wakeup(&self, wake: Wakeup) {
        *lock(&self.shared.wake) = Some(wake);
    }

    /// Whether INTR is asserted (lock-free).
    pub fn pending(&self) -> bool {
        self.shared.intr.load(Ordering::SeqCst)
    }

    /// The INTA cycle: the vector of the highest-priority request (spurious IRQ7/15 if
    /// the request went away).
    pub fn acknowledge(&self) -> u8 {
        let mut g = lock(&self.shared.inner);
        let v = g.pic.acknowledge();
        self.shared.publish(&g);
        v
    }

    /// The PIC ports as a bus device; register it with origin 0 at 0x20-0x21,
    /// 0xa0-0xa1 and 0x4d0-0x4d1.
    pub fn ports(&self) -> SharedDevice {
        Arc::new(Mutex::new(PicPorts {
            shared: self.shared.clone(),
        }))
    }

    /// Power-on state of the PIC pair (machine reset); input levels are re-applied.
    pub fn reset(&self) {
        let mut g = lock(&self.shared.inner);
        g.pic = PicPair::new();
        for irq in 0..NUM_IRQS {
            if g.sources[irq] != 0 {
                g.pic.set_irq(irq as u8, true);
            }
        }
        self.shared.publish(&g);
    }

    /// Snapshot: the PIC pair and the input levels.
    pub fn save(&self) -> IrqState {
        let g = lock(&self.shared.inner);
        IrqState {
            pic: g.pic.clone(),
            sources: g.sources,
        }
    }

    /// Restores a snapshot taken by [`InterruptController::save`] on an identically
    /// built machine.
    pub fn restore(&self, s: &IrqState) {
        let mut g = lock(&self.shared.inner);
        g.pic = s.pic.clone();
        g.sources = s.sources;
        self.shared.publish(&g);
    }

    /// Runs `f` on the PIC pair (inspection, debugging).
    pub fn with_pic<R>(&self, f: impl FnOnce(&mut PicPair) -> R) -> R {
        let mut g = lock(&self.shared.inner);
        let r = f(&mut g.pic);
        self.shared.publish(&g);
        r
    }
}

struct PicPorts {
    shared: Arc<Shared>,
}

impl BusDevice for PicPorts {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let mut g = lock(&self.shared.inner);
        g.pic.read(offset, data);
        self.shared.publish(&g);
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        let mut g = lock(&self.shared.inner);
        g.pic.write(offset, data);
        self.shared.publish(&g);
    }
}

/// One source driving one IRQ input. Cloning gives another handle to the same source.
#[derive(Clone)]
pub struct IrqLine {
    shared: Arc<Shared>,
    irq: u8,
    bit: u32,
}

impl std::fmt::Debug for IrqLine {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "IrqLine(IRQ{})", self.irq)
    }
}

impl IrqLine {
    /// The IRQ number this line drives.
    pub fn irq(&self) -> u8 {
        self.irq
    }

    /// Drives the line to `level`.
    pub fn set(&self, level: bool) {
        let mut g = lock(&self.shared.inner);
        let s = &mut g.sources[self.irq as usize];
        if level {
            *s |= self.bit;
        } else {
            *s &= !self.bit;
        }
        let wire = *s != 0;
        g.pic.set_irq(self.irq, wire);
        self.shared.publish(&g);
    }

    /// Drives the line high.
    pub fn raise(&self) {
        self.set(true);
    }

    /// Drives the line low.
    pub fn lower(&self) {
        self.set(false);
    }

    /// A low-high-low pulse: one edge for an edge-triggered input.
    pub fn pulse(&self) {
        self.set(false);
        self.set(true);
        self.set(false);
    }
}

#[cfg(test)]
impl InterruptController {
    /// Test helper: programs both PICs as a PC BIOS does (edge triggered, cascaded on
    /// IR2, vectors 0x08-0x0F and 0x70-0x77, 8086 mode) and unmasks every line.
    pub(crate) fn init_pc_pics(&self) {
        use crate::pic::{ICW1_IC4, ICW1_INIT, ICW4_UPM};
        let p = self.ports();
        let mut d = p.lock().unwrap();
        for (port, v) in [
            (0x20, ICW1_INIT | ICW1_IC4),
            (0x21, 0x08),
            (0x21, 1 << 2), // ICW3: the slave sits on IR2
            (0x21, ICW4_UPM),
            (0xa0, ICW1_INIT | ICW1_IC4),
            (0xa1, 0x70),
            (0xa1, 2), // ICW3: slave identity 2
            (0xa1, ICW4_UPM),
            (0x21, 0x00), // OCW1: nothing masked
            (0xa1, 0x00),
        ] {
            d.write(port, &[v]);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn line_pulse_reaches_intr_and_vector() {
        let c = InterruptController::new();
        c.init_pc_pics();
        let l = c.line(1);
        assert!(!c.pending());
        l.pulse();
        assert!(c.pending());
        assert_eq!(c.acknowledge(), 0x09);
        assert!(!c.pending());
        c.ports().lock().unwrap().write(0x20, &[0x20]);
        let k = c.line(8);
        k.raise();
        assert!(c.pending());
        assert_eq!(c.acknowledge(), 0x70);
    }

    #[test]
    fn shared_level_line_is_wired_or() {
        let c = InterruptController::new();
        c.init_pc_pics();
        c.ports().lock().unwrap().write(0x4d0, &[0b0010_0000]); // IRQ5 level
        let a = c.line(5);
        let b = c.line(5);
        a.raise();
        b.raise();
        a.lower();
        assert!(c.pending(), "b still drives IRQ5");
        b.lower();
        assert!(!c.pending());
    }

    #[test]
    fn rising_intr_notifies_the_wakeup() {
        let c = InterruptController::new();
        c.init_pc_pics();
        let w = Wakeup::new();
        c.set_wakeup(w.clone());
        let l = c.line(4);
        let t = std::thread::spawn(move || l.raise());
        assert!(w.wait(Some(std::time::Duration::from_secs(5))));
        t.join().unwrap();
        assert!(c.pending());
    }

    #[test]
    fn save_restore_round_trip() {
        let c = InterruptController::new();
        c.init_pc_pics();
        c.line(3).raise();
        let s = c.save();
        let json = serde_json::to_string(&s).unwrap();
        let d = InterruptController::new();
        d.restore(&serde_json::from_str(&json).unwrap());
        assert!(d.pending());
        assert_eq!(d.acknowledge(), 0x0b);
    }

    #[test]
    fn many_sources_do_not_panic() {
        let c = InterruptController::new();
        let lines: Vec<_> = (0..40).map(|_| c.line(3)).collect();
        for l in &lines {
            l.raise();
        }
        for l in &lines {
            l.lower();
        }
        c.line(200).pulse();
        c.line(2).pulse();
    }
}
