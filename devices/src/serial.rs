//! National Semiconductor 16550A UART (COM1-COM4). Register layout and bits follow the
//! PC16550D datasheet, section 8 "Registers" (tables I-III).
//!
//! Transmission is instantaneous: a byte written to THR goes straight to the
//! [`SerialBackend`], so THR and the transmitter are always empty. Reception takes bytes
//! from a [`SerialInput`] queue that another thread fills; they move into the receive
//! FIFO only as room frees up (the host queue is the flow control, so host input never
//! overruns). The character timeout uses the [`Clock`](crate::clock::Clock) and the
//! programmed baud rate; [`Uart::next_deadline`] tells the run loop when it falls due.
//!
//! Interrupts reach the PIC only while MCR OUT2 is set, as on PC boards, and not in
//! loopback mode (the datasheet forces the modem outputs inactive then).
//!
//! Locking: the input queue has its own mutex, held only to push or pop bytes.

use std::collections::VecDeque;
use std::io::Write;
use std::sync::{Arc, Mutex};

use morph86_mmu::BusDevice;

use crate::bus::lock;
use crate::clock::SharedClock;
use crate::irq::IrqLine;
use crate::wake::Wakeup;

/// Base ports of COM1-COM4.
pub const COM_PORTS: [u16; 4] = [0x3f8, 0x2f8, 0x3e8, 0x2e8];
/// IRQs of COM1-COM4.
pub const COM_IRQS: [u8; 4] = [4, 3, 4, 3];
/// The UART's input clock (1.8432 MHz crystal), in Hz.
pub const UART_CLOCK_HZ: u64 = 1_843_200;
/// Receive/transmit FIFO depth.
pub const FIFO_SIZE: usize = 16;

/// Register offsets (DLAB=0 / DLAB=1 meaning noted).
pub const REG_DATA: u64 = 0;
/// IER (DLAB=0) / DLM (DLAB=1).
pub const REG_IER: u64 = 1;
/// IIR (read) / FCR (write).
pub const REG_IIR_FCR: u64 = 2;
/// Line control register.
pub const REG_LCR: u64 = 3;
/// Modem control register.
pub const REG_MCR: u64 = 4;
/// Line status register.
pub const REG_LSR: u64 = 5;
/// Modem status register.
pub const REG_MSR: u64 = 6;
/// Scratch register.
pub const REG_SCR: u64 = 7;

/// IER bit 0: received data available (and character timeout) interrupt.
pub const IER_ERBFI: u8 = 0b0000_0001;
/// IER bit 1: THR empty interrupt.
pub const IER_ETBEI: u8 = 0b0000_0010;
/// IER bit 2: receiver line status interrupt.
pub const IER_ELSI: u8 = 0b0000_0100;
/// IER bit 3: modem status interrupt.
pub const IER_EDSSI: u8 = 0b0000_1000;
/// IER bits that exist.
pub const IER_MASK: u8 = 0b0000_1111;
/// IIR bit 0: 0 = interrupt pending.
pub const IIR_NONE: u8 = 0b0000_0001;
/// IIR: receiver line status (priority 1).
pub const IIR_RLS: u8 = 0b0000_0110;
/// IIR: received data available (priority 2).
pub const IIR_RDA: u8 = 0b0000_0100;
/// IIR: character timeout (priority 2).
pub const IIR_CTI: u8 = 0b0000_1100;
/// IIR: THR empty (priority 3).
pub const IIR_THRE: u8 = 0b0000_0010;
/// IIR: modem status (priority 4).
pub const IIR_MS: u8 = 0b0000_0000;
/// IIR bits 7-6: FIFOs enabled.
pub const IIR_FIFO: u8 = 0b1100_0000;
/// FCR bit 0: FIFO enable.
pub const FCR_ENABLE: u8 = 0b0000_0001;
/// FCR bit 1: clear receive FIFO.
pub const FCR_CLEAR_RX: u8 = 0b0000_0010;
/// FCR bit 2: clear transmit FIFO.
pub const FCR_CLEAR_TX: u8 = 0b0000_0100;
/// FCR bits 7-6: receive trigger level.
pub const FCR_TRIGGER: u8 = 0b1100_0000;
/// LCR bits 1-0: word length - 5.
pub const LCR_WLS: u8 = 0b0000_0011;
/// LCR bit 2: stop bits.
pub const LCR_STB: u8 = 0b0000_0100;
/// LCR bit 3: parity enable.
pub const LCR_PEN: u8 = 0b0000_1000;
/// LCR bit 6: set break.
pub const LCR_BREAK: u8 = 0b0100_0000;
/// LCR bit 7: divisor latch access.
pub const LCR_DLAB: u8 = 0b1000_0000;
/// MCR bit 0: DTR.
pub const MCR_DTR: u8 = 0b0000_0001;
/// MCR bit 1: RTS.
pub const MCR_RTS: u8 = 0b0000_0010;
/// MCR bit 2: OUT1.
pub const MCR_OUT1: u8 = 0b0000_0100;
/// MCR bit 3: OUT2 (gates the IRQ on PCs).
pub const MCR_OUT2: u8 = 0b0000_1000;
/// MCR bit 4: loopback.
pub const MCR_LOOP: u8 = 0b0001_0000;
/// MCR bits that exist.
pub const MCR_MASK: u8 = 0b0001_1111;
/// LSR bit 0: data ready.
pub const LSR_DR: u8 = 0b0000_0001;
/// LSR bit 1: overrun error.
pub const LSR_OE: u8 = 0b0000_0010;
/// LSR bit 2: parity error.
pub const LSR_PE: u8 = 0b0000_0100;
/// LSR bit 3: framing error.
pub const LSR_FE: u8 = 0b0000_1000;
/// LSR bit 4: break interrupt.
pub const LSR_BI: u8 = 0b0001_0000;
/// LSR bit 5: THR empty.
pub const LSR_THRE: u8 = 0b0010_0000;
/// LSR bit 6: transmitter empty.
pub const LSR_TEMT: u8 = 0b0100_0000;
/// LSR bit 7: error in receiver FIFO.
pub const LSR_FIFO_ERR: u8 = 0b1000_0000;
/// LSR error bits that cause a line status interrupt.
pub const LSR_ERRORS: u8 = LSR_OE | LSR_PE | LSR_FE | LSR_BI;
/// MSR bit 0: delta CTS.
pub const MSR_DCTS: u8 = 0b0000_0001;
/// MSR bit 1: delta DSR.
pub const MSR_DDSR: u8 = 0b0000_0010;
/// MSR bit 2: trailing edge ring indicator.
pub const MSR_TERI: u8 = 0b0000_0100;
/// MSR bit 3: delta DCD.
pub const MSR_DDCD: u8 = 0b0000_1000;
/// MSR bit 4: CTS.
pub const MSR_CTS: u8 = 0b0001_0000;
/// MSR bit 5: DSR.
pub const MSR_DSR: u8 = 0b0010_0000;
/// MSR bit 6: RI.
pub const MSR_RI: u8 = 0b0100_0000;
/// MSR bit 7: DCD.
pub const MSR_DCD: u8 = 0b1000_0000;

/// Where transmitted bytes go.
pub trait SerialBackend: Send {
    /// One byte sent by the guest.
    fn transmit(&mut self, byte: u8);
}

/// Drops everything.
#[derive(Debug, Default)]
pub struct NullBackend;

impl SerialBackend for NullBackend {
    fn transmit(&mut self, _byte: u8) {}
}

/// Writes bytes to any `Write` (stdout, a file), flushing after each byte so that
/// interactive output appears at once.
pub struct WriterBackend<W: Write + Send>(pub W);

/// Set once a back-end write failed and was reported: a closed pipe (`morph86 | head`)
/// fails every byte after it, and one message says all there is to say.
static WRITE_FAILURE_REPORTED: std::sync::atomic::AtomicBool =
    std::sync::atomic::AtomicBool::new(false);

impl<W: Write + Send> SerialBackend for WriterBackend<W> {
    fn transmit(&mut self, byte: u8) {
        if let Err(e) = self.0.write_all(&[byte]).and_then(|_| self.0.flush()) {
            if !WRITE_FAILURE_REPORTED.swap(true, std::sync::atomic::Ordering::Relaxed) {
                log::warn!("serial: back end write failed: {e} (output dropped from now on)");
            }
        }
    }
}

/// The most bytes the input queue holds; more are dropped (and logged).
pub const INPUT_QUEUE_MAX: usize = 1 << 20;

/// The receive side's queue: any thread pushes, the UART takes. Cheap to clone.
#[derive(Clone, Default)]
pub struct SerialInput {
    q: Arc<Mutex<VecDeque<u8>>>,
    wake: Option<Wakeup>,
}

impl SerialInput {
    /// Queues bytes for the guest and wakes the run loop.
    pub fn push(&self, bytes: &[u8]) {
        {
            let mut q = lock(&self.q);
            let room = INPUT_QUEUE_MAX.saturating_sub(q.len());
            if bytes.len() > room {
                log::warn!(
                    "serial: input queue full, {} bytes dropped",
                    bytes.len() - room
                );
            }
            q.extend(&bytes[..bytes.len().min(room)]);
        }
        if let Some(w) = &self.wake {
            w.notify();
        }
    }

    /// Bytes waiting.
    pub fn len(&self) -> usize {
        lock(&self.q).len()
    }

    /// Whether no bytes are waiting.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
}

/// Saved registers of a UART (the back end and host input queue are not saved).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct UartState {
    dll: u8,
    dlm: u8,
    ier: u8,
    lcr: u8,
    mcr: u8,
    scr: u8,
    fifo: bool,
    trigger: usize,
    rx: Vec<u8>,
    lsr_err: u8,
    thre_pending: bool,
    msr_delta: u8,
    ext_lines: u8,
}

/// One 16550A.
pub struct Uart {
    dll: u8,
    dlm: u8,
    ier: u8,
    lcr: u8,
    mcr: u8,
    scr: u8,
    fifo: bool,
    trigger: usize,
    rx: VecDeque<u8>,
    /// OE/PE/FE/BI until LSR is read.
    lsr_err: u8,
    thre_pending: bool,
    /// MSR delta bits 3-0.
    msr_delta: u8,
    /// External modem inputs as MSR bits 7-4.
    ext_lines: u8,
    /// Clock time of the last receive-FIFO activity (character timeout base).
    rx_activity: u64,
    /// Clock time at which the interrupt line was last evaluated.
    evaluated_ns: u64,
    clock: SharedClock,
    irq: Option<IrqLine>,
    backend: Box<dyn SerialBackend>,
    input: SerialInput,
}

impl Uart {
    /// A UART on `clock`, interrupting on `irq`, sending to `backend`. Input arrives
    /// through [`Uart::input`]; `wake` is notified when input is pushed.
    pub fn new(
        clock: SharedClock,
        irq: Option<IrqLine>,
        backend: Box<dyn SerialBackend>,
        wake: Option<Wakeup>,
    ) -> Self {
        let now = clock.now_ns();
        Uart {
            dll: 0x0c, // 9600 baud, a common BIOS default
            dlm: 0,
            ier: 0,
            lcr: 0, // datasheet table IV: LCR resets to 0
            mcr: 0,
            scr: 0,
            fifo: false,
            trigger: 1,
            rx: VecDeque::with_capacity(FIFO_SIZE),
            lsr_err: 0,
            thre_pending: false,
            msr_delta: 0,
            ext_lines: MSR_CTS | MSR_DSR | MSR_DCD,
            rx_activity: now,
            evaluated_ns: now,
            clock,
            irq,
            backend,
            input: SerialInput {
                q: Arc::default(),
                wake,
            },
        }
    }

    /// Power-on register values (machine reset); the back end and queued input stay.
    pub fn reset(&mut self) {
        self.dll = 0x0c;
        self.dlm = 0;
        self.ier = 0;
        self.lcr = 0;
        self.mcr = 0;
        self.scr = 0;
        self.fifo = false;
        self.trigger = 1;
        self.rx.clear();
        self.lsr_err = 0;
        self.thre_pending = false;
        self.msr_delta = 0;
        self.rx_activity = self.clock.now_ns();
        self.update_irq();
    }

    /// Snapshot of the registers and receive FIFO.
    pub fn save(&self) -> UartState {
        UartState {
            dll: self.dll,
            dlm: self.dlm,
            ier: self.ier,
            lcr: self.lcr,
            mcr: self.mcr,
            scr: self.scr,
            fifo: self.fifo,
            trigger: self.trigger,
            rx: self.rx.iter().copied().collect(),
            lsr_err: self.lsr_err,
            thre_pending: self.thre_pending,
            msr_delta: self.msr_delta,
            ext_lines: self.ext_lines,
        }
    }

    /// Restores a snapshot taken by [`Uart::save`].
    pub fn restore(&mut self, s: &UartState) {
        self.dll = s.dll;
        self.dlm = s.dlm;
        self.ier = s.ier & IER_MASK;
        self.lcr = s.lcr;
        self.mcr = s.mcr & MCR_MASK;
        self.scr = s.scr;
        self.fifo = s.fifo;
        self.trigger = if [1, 4, 8, 14].contains(&s.trigger) {
            s.trigger
        } else {
            1
        };
        self.rx = s.rx.iter().copied().take(FIFO_SIZE).collect();
        self.lsr_err = s.lsr_err & LSR_ERRORS;
        self.thre_pending = s.thre_pending;
        self.msr_delta = s.msr_delta & 0x0f;
        self.ext_lines = s.ext_lines & 0xf0;
        self.rx_activity = self.clock.now_ns();
        self.update_irq();
    }

    /// The handle other threads push received bytes into.
    pub fn input(&self) -> SerialInput {
        self.input.clone()
    }

    /// Replaces the transmit back end.
    pub fn set_backend(&mut self, backend: Box<dyn SerialBackend>) {
        self.backend = backend;
    }

    /// Sets the external modem inputs (as seen outside loopback mode).
    pub fn set_modem_lines(&mut self, cts: bool, dsr: bool, dcd: bool, ri: bool) {
        let old = self.msr_lines();
        self.ext_lines = (cts as u8 * MSR_CTS)
            | (dsr as u8 * MSR_DSR)
            | (ri as u8 * MSR_RI)
            | (dcd as u8 * MSR_DCD);
        self.line_change(old);
        self.update_irq();
    }

    fn loopback(&self) -> bool {
        self.mcr & MCR_LOOP != 0
    }

    fn msr_lines(&self) -> u8 {
        if self.loopback() {
            let m = self.mcr;
            ((m & MCR_RTS != 0) as u8 * MSR_CTS)
                | ((m & MCR_DTR != 0) as u8 * MSR_DSR)
                | ((m & MCR_OUT1 != 0) as u8 * MSR_RI)
                | ((m & MCR_OUT2 != 0) as u8 * MSR_DCD)
        } else {
            self.ext_lines
        }
    }

    fn line_change(&mut self, old: u8) {
        let new = self.msr_lines();
        let ch = old ^ new;
        if ch & MSR_CTS != 0 {
            self.msr_delta |= MSR_DCTS;
        }
        if ch & MSR_DSR != 0 {
            self.msr_delta |= MSR_DDSR;
        }
        if ch & MSR_DCD != 0 {
            self.msr_delta |= MSR_DDCD;
        }
        if old & MSR_RI != 0 && new & MSR_RI == 0 {
            self.msr_delta |= MSR_TERI;
        }
    }

    fn capacity(&self) -> usize {
        if self.fifo {
            FIFO_SIZE
        } else {
            1
        }
    }

    /// ns for 4 character times at the programmed format and baud rate.
    fn timeout_ns(&self) -> u64 {
        let divisor = u16::from_le_bytes([self.dll, self.dlm]).max(1) as u64;
        let bits = 1
            + 5
            + (self.lcr & LCR_WLS) as u64
            + (self.lcr & LCR_PEN != 0) as u64
            + if self.lcr & LCR_STB != 0 { 2 } else { 1 };
        4 * bits * divisor * 16 * 1_000_000_000 / UART_CLOCK_HZ
    }

    fn cti(&self, now: u64) -> bool {
        self.fifo && !self.rx.is_empty() && now >= self.rx_activity + self.timeout_ns()
    }

    /// Moves queued input into the receiver as room allows (not in loopback).
    fn pull_input(&mut self, now: u64) {
        if self.loopback() || self.rx.len() >= self.capacity() {
            return;
        }
        let mut q = lock(&self.input.q);
        let mut moved = false;
        while self.rx.len() < self.capacity() {
            match q.pop_front() {
                Some(b) => {
                    self.rx.push_back(b);
                    moved = true;
                }
                None => break,
            }
        }
        if moved {
            self.rx_activity = now;
        }
    }

    fn receive(&mut self, b: u8, now: u64) {
        if self.rx.len() >= self.capacity() {
            self.lsr_err |= LSR_OE;
        } else {
            self.rx.push_back(b);
            self.rx_activity = now;
        }
    }

    /// The interrupt identification (IIR bits 3-0) pending now.
    fn iir_id(&self, now: u64) -> u8 {
        let rda = if self.fifo {
            self.rx.len() >= self.trigger
        } else {
            !self.rx.is_empty()
        };
        if self.ier & IER_ELSI != 0 && self.lsr_err & LSR_ERRORS != 0 {
            IIR_RLS
        } else if self.ier & IER_ERBFI != 0 && rda {
            IIR_RDA
        } else if self.ier & IER_ERBFI != 0 && self.cti(now) {
            IIR_CTI
        } else if self.ier & IER_ETBEI != 0 && self.thre_pending {
            IIR_THRE
        } else if self.ier & IER_EDSSI != 0 && self.msr_delta != 0 {
            IIR_MS
        } else {
            IIR_NONE
        }
    }

    fn update_irq(&mut self) {
        let now = self.clock.now_ns();
        self.evaluated_ns = now;
        let pending = self.iir_id(now) != IIR_NONE;
        let gated = self.mcr & MCR_OUT2 != 0 && !self.loopback();
        if let Some(l) = &self.irq {
            l.set(pending && gated);
        }
    }

    /// Takes queued input and re-evaluates the interrupt (call at [`Uart::next_deadline`]
    /// and when the input handle's wake-up fires).
    pub fn update(&mut self) {
        let now = self.clock.now_ns();
        self.pull_input(now);
        self.update_irq();
    }

    /// Clock time (ns) of the next character timeout, if one is armed and enabled.
    pub fn next_deadline(&self) -> Option<u64> {
        let armed = self.fifo
            && self.ier & IER_ERBFI != 0
            && !self.rx.is_empty()
            && self.rx.len() < self.trigger;
        // Against the time the interrupt was last evaluated, not a fresh clock read: a
        // timeout falling between the two would otherwise be neither signalled nor
        // scheduled, and the guest would wait for more input to see these bytes.
        let t = self.rx_activity + self.timeout_ns();
        (armed && t > self.evaluated_ns).then_some(t)
    }

    fn read_reg(&mut self, off: u64) -> u8 {
        let now = self.clock.now_ns();
        self.pull_input(now);
        let dlab = self.lcr & LCR_DLAB != 0;
        let v = match off {
            REG_DATA if dlab => self.dll,
            REG_DATA => {
                let b = self.rx.pop_front().unwrap_or(0);
                self.rx_activity = now;
                self.pull_input(now);
                b
            }
            REG_IER if dlab => self.dlm,
            REG_IER => self.ier,
            REG_IIR_FCR => {
                let id = self.iir_id(now);
                if id == IIR_THRE {
                    self.thre_pending = false;
                }
                id | if self.fifo { IIR_FIFO } else { 0 }
            }
            REG_LCR => self.lcr,
            REG_MCR => self.mcr,
            REG_LSR => {
                let mut v = self.lsr_err | LSR_THRE | LSR_TEMT;
                if !self.rx.is_empty() {
                    v |= LSR_DR;
                }
                self.lsr_err = 0;
                v
            }
            REG_MSR => {
                let v = self.msr_lines() | self.msr_delta;
                self.msr_delta = 0;
                v
            }
            _ => self.scr,
        };
        self.update_irq();
        v
    }

    fn write_reg(&mut self, off: u64, v: u8) {
        let now = self.clock.now_ns();
        let dlab = self.lcr & LCR_DLAB != 0;
        match off {
            REG_DATA if dlab => self.dll = v,
            REG_DATA => {
                if self.loopback() {
                    self.receive(v, now);
                } else {
                    self.backend.transmit(v);
                }
                // Sent at once: THR is empty again, which re-arms the THRE interrupt.
                self.thre_pending = true;
            }
            REG_IER if dlab => self.dlm = v,
            REG_IER => {
                let old = self.ier;
                self.ier = v & IER_MASK;
                if old & IER_ETBEI == 0 && self.ier & IER_ETBEI != 0 {
                    // Enabling ETBEI with THR empty raises the THRE interrupt.
                    self.thre_pending = true;
                }
            }
            REG_IIR_FCR => {
                let enable = v & FCR_ENABLE != 0;
                if enable != self.fifo {
                    self.rx.clear();
                    self.fifo = enable;
                }
                if enable {
                    if v & FCR_CLEAR_RX != 0 {
                        self.rx.clear();
                        self.rx_activity = now;
                    }
                    self.trigger = [1, 4, 8, 14][(v >> 6) as usize];
                }
                self.pull_input(now);
            }
            REG_LCR => {
                if v & LCR_BREAK != 0 && self.loopback() {
                    // In loopback the break reaches our own receiver.
                    self.lsr_err |= LSR_BI;
                }
                self.lcr = v;
            }
            REG_MCR => {
                let old = self.msr_lines();
                self.mcr = v & MCR_MASK;
                self.line_change(old);
                self.pull_input(now);
            }
            REG_LSR | REG_MSR => log::debug!("serial: write to read-only register {off}"),
            _ => self.scr = v,
        }
        self.update_irq();
    }
}

impl BusDevice for Uart {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        for (k, b) in data.iter_mut().enumerate() {
            *b = self.read_reg((offset + k as u64) & 7);
        }
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        for (k, &b) in data.iter().enumerate() {
            self.write_reg((offset + k as u64) & 7, b);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::clock::ManualClock;
    use crate::irq::InterruptController;

    #[derive(Clone, Default)]
    struct Capture(Arc<Mutex<Vec<u8>>>);
    impl SerialBackend for Capture {
        fn transmit(&mut self, byte: u8) {
            self.0.lock().unwrap().push(byte);
        }
    }

    struct Rig {
        clock: ManualClock,
        u: Uart,
        ic: InterruptController,
        tx: Capture,
    }

    impl Rig {
        fn new() -> Self {
            let clock = ManualClock::new();
            let ic = InterruptController::new();
            {
                let p = ic.ports();
                let mut p = p.lock().unwrap();
                for (port, v) in [(0x20, 0x11), (0x21, 0x08), (0x21, 4), (0x21, 1), (0x21, 0)] {
                    p.write(port, &[v]);
                }
            }
            let tx = Capture::default();
            let u = Uart::new(
                Arc::new(clock.clone()),
                Some(ic.line(4)),
                Box::new(tx.clone()),
                None,
            );
            Rig { clock, u, ic, tx }
        }
        fn out(&mut self, off: u64, v: u8) {
            self.u.write(off, &[v]);
        }
        fn inb(&mut self, off: u64) -> u8 {
            let mut b = [0];
            self.u.read(off, &mut b);
            b[0]
        }
        fn irq(&mut self) -> bool {
            let p = self.ic.pending();
            if p {
                self.ic.acknowledge();
                self.ic.ports().lock().unwrap().write(0x20, &[0x20]);
            }
            p
        }
        /// 115200 8N1 with FIFOs (trigger 8), interrupts wired (OUT2).
        fn setup(&mut self) {
            self.out(REG_LCR, LCR_DLAB | 3);
            self.out(REG_DATA, 1);
            self.out(REG_IER, 0);
            self.out(REG_LCR, 3);
            self.out(REG_IIR_FCR, 0b1000_0111);
            self.out(REG_MCR, MCR_DTR | MCR_RTS | MCR_OUT2);
        }
    }

    #[test]
    fn divisor_latch_and_scratch() {
        let mut r = Rig::new();
        r.out(REG_LCR, LCR_DLAB);
        r.out(REG_DATA, 0x34);
        r.out(REG_IER, 0x12);
        assert_eq!(r.inb(REG_DATA), 0x34);
        assert_eq!(r.inb(REG_IER), 0x12);
        r.out(REG_LCR, 0x03);
        assert_eq!(r.inb(REG_IER), 0, "IER separate from DLM");
        r.out(REG_SCR, 0xa5);
        assert_eq!(r.inb(REG_SCR), 0xa5);
        r.out(REG_IER, 0xff);
        assert_eq!(r.inb(REG_IER), 0x0f, "IER bits 7-4 read 0");
    }

    #[test]
    fn failing_writer_drops_output_and_reports_once() {
        struct Closed;
        impl Write for Closed {
            fn write(&mut self, _: &[u8]) -> std::io::Result<usize> {
                Err(std::io::ErrorKind::BrokenPipe.into())
            }
            fn flush(&mut self) -> std::io::Result<()> {
                Ok(())
            }
        }
        let mut b = WriterBackend(Closed);
        for _ in 0..1000 {
            b.transmit(b'x');
        }
        assert!(WRITE_FAILURE_REPORTED.load(std::sync::atomic::Ordering::Relaxed));
    }

    #[test]
    fn transmit_goes_to_backend_and_thre_interrupt() {
        let mut r = Rig::new();
        r.setup();
        assert_eq!(r.inb(REG_LSR), LSR_THRE | LSR_TEMT);
        assert_eq!(r.inb(REG_IIR_FCR), IIR_FIFO | IIR_NONE);
        r.out(REG_IER, IER_ETBEI);
        assert!(r.irq(), "enabling ETBEI with THR empty interrupts");
        assert_eq!(r.inb(REG_IIR_FCR), IIR_FIFO | IIR_THRE);
        assert_eq!(
            r.inb(REG_IIR_FCR),
            IIR_FIFO | IIR_NONE,
            "IIR read cleared THRE"
        );
        for &b in b"ok" {
            r.out(REG_DATA, b);
        }
        assert_eq!(&*r.tx.0.lock().unwrap(), b"ok");
        assert!(r.irq());
        assert_eq!(r.inb(REG_IIR_FCR), IIR_FIFO | IIR_THRE);
    }

    #[test]
    fn out2_gates_the_irq_pin() {
        let mut r = Rig::new();
        r.setup();
        r.out(REG_MCR, MCR_DTR | MCR_RTS);
        r.out(REG_IER, IER_ETBEI);
        assert!(!r.irq());
        assert_eq!(
            r.inb(REG_IIR_FCR) & 0x0f,
            IIR_THRE,
            "pending inside the UART"
        );
        r.out(REG_IER, 0);
        r.out(REG_IER, IER_ETBEI);
        r.out(REG_MCR, MCR_OUT2);
        assert!(r.irq());
    }

    #[test]
    fn a_character_timeout_after_the_update_is_still_scheduled() {
        // The clock passes the timeout between the poll's update and its deadline query.
        let mut r = Rig::new();
        r.setup();
        r.out(REG_IER, IER_ERBFI);
        r.u.input().push(b"x");
        r.u.update();
        let due = r.u.next_deadline().expect("timeout armed");
        r.clock.set(due + 1_000_000);
        assert_eq!(r.u.next_deadline(), Some(due), "still due, at once");
        r.u.update();
        assert!(r.irq(), "character timeout raised by the late poll");
        assert_eq!(r.u.next_deadline(), None);
    }

    #[test]
    fn receive_trigger_level_and_character_timeout() {
        let mut r = Rig::new();
        r.setup();
        r.out(REG_IER, IER_ERBFI);
        let input = r.u.input();
        input.push(b"abc");
        r.u.update();
        assert_eq!(r.inb(REG_LSR) & LSR_DR, LSR_DR);
        assert!(!r.irq(), "3 bytes < trigger 8");
        // Timeout: 4 chars of 10 bits at 115200 baud = 347 us.
        let t = r.u.next_deadline().unwrap();
        assert_eq!(t, 4 * 10 * 16 * 1_000_000_000 / UART_CLOCK_HZ);
        r.clock.set(t);
        r.u.update();
        assert!(r.irq());
        assert_eq!(r.inb(REG_IIR_FCR), IIR_FIFO | IIR_CTI);
        assert_eq!(r.inb(REG_DATA), b'a');
        assert_eq!(
            r.inb(REG_IIR_FCR),
            IIR_FIFO | IIR_NONE,
            "read restarts the timeout"
        );
        assert_eq!(r.inb(REG_DATA), b'b');
        assert_eq!(r.inb(REG_DATA), b'c');
        assert_eq!(r.inb(REG_LSR) & LSR_DR, 0);
        assert_eq!(r.u.next_deadline(), None);
        // Reaching the trigger level: RDA.
        input.push(&[0x55; 20]);
        r.u.update();
        assert!(r.irq());
        assert_eq!(r.inb(REG_IIR_FCR), IIR_FIFO | IIR_RDA);
        for _ in 0..9 {
            assert_eq!(r.inb(REG_DATA), 0x55);
        }
        // 16 were in the FIFO; as they are read the queue refills it: 11 left now.
        assert_eq!(input.len(), 0);
        assert_eq!(r.inb(REG_IIR_FCR), IIR_FIFO | IIR_RDA);
    }

    #[test]
    fn trigger_levels_4_and_14() {
        for (fcr, level) in [(0b0100_0001u8, 4usize), (0b1100_0001, 14)] {
            let mut r = Rig::new();
            r.out(REG_MCR, MCR_OUT2);
            r.out(REG_IIR_FCR, fcr);
            r.out(REG_IER, IER_ERBFI);
            let inp = r.u.input();
            inp.push(&vec![7; level - 1]);
            r.u.update();
            assert_eq!(r.inb(REG_IIR_FCR) & 0x0f, IIR_NONE, "below trigger {level}");
            inp.push(&[7]);
            r.u.update();
            assert_eq!(r.inb(REG_IIR_FCR) & 0x0f, IIR_RDA, "at trigger {level}");
        }
    }

    #[test]
    fn fifo_enable_toggle_clears_receiver() {
        let mut r = Rig::new();
        r.out(REG_IIR_FCR, FCR_ENABLE);
        r.u.input().push(b"abc");
        r.u.update();
        r.out(REG_IIR_FCR, 0); // FIFOs off: receiver cleared, then refilled (1 byte)
        assert_eq!(r.inb(REG_IIR_FCR) & IIR_FIFO, 0);
        assert_eq!(
            r.inb(REG_DATA),
            0,
            "the three bytes were dropped with the FIFO"
        );
        r.out(REG_IIR_FCR, FCR_ENABLE | FCR_CLEAR_RX);
        assert_eq!(r.inb(REG_LSR) & LSR_DR, 0);
    }

    #[test]
    fn non_fifo_mode_holds_one_byte() {
        let mut r = Rig::new();
        r.out(REG_MCR, MCR_OUT2);
        r.out(REG_IER, IER_ERBFI);
        r.u.input().push(b"xy");
        r.u.update();
        assert!(r.irq());
        assert_eq!(r.inb(REG_IIR_FCR), IIR_RDA, "no FIFO bits in 16450 mode");
        assert_eq!(r.inb(REG_DATA), b'x');
        assert_eq!(r.inb(REG_DATA), b'y');
        assert_eq!(r.inb(REG_IIR_FCR), IIR_NONE);
    }

    #[test]
    fn loopback_echo_overrun_and_line_status_interrupt() {
        let mut r = Rig::new();
        r.out(REG_MCR, MCR_LOOP);
        r.u.input().push(b"ignored in loopback");
        r.out(REG_DATA, 0x41);
        assert!(
            r.tx.0.lock().unwrap().is_empty(),
            "loopback does not transmit"
        );
        assert_eq!(r.inb(REG_LSR) & LSR_DR, LSR_DR);
        r.out(REG_DATA, 0x42); // 16450 mode: one holding register -> overrun
        r.out(REG_IER, IER_ELSI);
        assert_eq!(r.inb(REG_IIR_FCR), IIR_RLS);
        assert_eq!(r.inb(REG_LSR), LSR_DR | LSR_OE | LSR_THRE | LSR_TEMT);
        assert_eq!(r.inb(REG_LSR) & LSR_OE, 0, "LSR read clears OE");
        assert_eq!(r.inb(REG_DATA), 0x41);
        assert!(!r.irq(), "loopback keeps the IRQ pin inactive");
        // Break in loopback.
        r.out(REG_LCR, LCR_BREAK | 3);
        assert_eq!(r.inb(REG_LSR) & LSR_BI, LSR_BI);
    }

    #[test]
    fn modem_status_in_loopback_and_delta_bits() {
        let mut r = Rig::new();
        r.out(REG_MCR, MCR_LOOP | 0x0a); // the Linux 8250 probe
        assert_eq!(r.inb(REG_MSR) & 0xf0, MSR_DCD | MSR_CTS);
        r.out(REG_MCR, MCR_LOOP | MCR_OUT1);
        assert_eq!(r.inb(REG_MSR), MSR_RI | MSR_DCTS | MSR_DDCD);
        r.out(REG_MCR, MCR_LOOP);
        assert_eq!(r.inb(REG_MSR), MSR_TERI, "RI 1->0: trailing edge");
        r.out(REG_MCR, MCR_OUT2);
        r.inb(REG_MSR);
        r.out(REG_IER, IER_EDSSI);
        r.u.set_modem_lines(false, true, true, false);
        assert!(r.irq());
        assert_eq!(r.inb(REG_IIR_FCR), IIR_MS);
        assert_eq!(r.inb(REG_MSR), MSR_DSR | MSR_DCD | MSR_DCTS);
        assert_eq!(r.inb(REG_IIR_FCR), IIR_NONE);
    }

    #[test]
    fn interrupt_priority_order() {
        let mut r = Rig::new();
        r.setup();
        r.out(REG_MCR, MCR_LOOP);
        r.out(REG_IIR_FCR, 0b0000_0001); // FIFO, trigger 1
        r.out(REG_IER, IER_MASK);
        r.out(REG_DATA, 1); // RDA, THRE
        r.out(REG_LCR, LCR_BREAK | 3); // RLS
        r.out(REG_LCR, 3);
        r.out(REG_MCR, MCR_LOOP | MCR_RTS); // MS
        assert_eq!(r.inb(REG_IIR_FCR) & 0x0f, IIR_RLS);
        r.inb(REG_LSR);
        assert_eq!(r.inb(REG_IIR_FCR) & 0x0f, IIR_RDA);
        r.inb(REG_DATA);
        assert_eq!(r.inb(REG_IIR_FCR) & 0x0f, IIR_THRE);
        assert_eq!(r.inb(REG_IIR_FCR) & 0x0f, IIR_MS);
        r.inb(REG_MSR);
        assert_eq!(r.inb(REG_IIR_FCR) & 0x0f, IIR_NONE);
    }

    #[test]
    fn input_from_another_thread_wakes() {
        let clock = ManualClock::new();
        let w = Wakeup::new();
        let u = Uart::new(
            Arc::new(clock),
            None,
            Box::new(NullBackend),
            Some(w.clone()),
        );
        let inp = u.input();
        std::thread::spawn(move || inp.push(b"z")).join().unwrap();
        assert!(w.wait(Some(std::time::Duration::from_secs(5))));
    }

    #[test]
    fn save_restore_round_trip() {
        let mut r = Rig::new();
        r.setup();
        r.out(REG_SCR, 0x5a);
        r.out(REG_IER, IER_ERBFI);
        r.u.input().push(b"xy");
        r.u.update();
        let json = serde_json::to_string(&r.u.save()).unwrap();
        let mut s = Rig::new();
        s.u.restore(&serde_json::from_str(&json).unwrap());
        assert_eq!(s.inb(REG_SCR), 0x5a);
        assert_eq!(s.inb(REG_IIR_FCR) & IIR_FIFO, IIR_FIFO);
        assert_eq!(s.inb(REG_DATA), b'x');
        assert_eq!(s.inb(REG_DATA), b'y');
    }

    #[test]
    fn random_writes_never_panic() {
        let mut r = Rig::new();
        let mut x = 0xdead_beefu32;
        for i in 0..100_000 {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            let off = (x & 7) as u64;
            if x & 8 != 0 {
                r.out(off, (x >> 16) as u8);
            } else {
                r.inb(off);
            }
            if i % 97 == 0 {
                r.u.input().push(&[x as u8; 5]);
            }
            r.clock.advance((x >> 20) as u64 % 100_000);
            r.u.update();
            let _ = r.u.next_deadline();
            r.irq();
        }
    }
}
