//! morph86-devices: the PC platform devices, one file each, behind the port-I/O bus.
//!
//! # For the frontend: building and running a PC
//!
//! ```no_run
//! use morph86_devices::{PcPlatform, PlatformConfig, serial::WriterBackend};
//!
//! let mut cfg = PlatformConfig::new(256 << 20);
//! cfg.serial[0] = Some(Box::new(WriterBackend(std::io::stdout())));
//! let mut pc = PcPlatform::new(cfg).expect("port map");
//! let io_bus = pc.take_io_bus().unwrap();   // -> cpu.io = Box::new(io_bus)
//! let intr = pc.interrupts.clone();         // adapt to morph86_cpu::InterruptSource:
//!                                            //   pending() -> intr.pending()
//!                                            //   acknowledge() -> intr.acknowledge()
//! let stdin_feed = pc.serial_input(0);      // give to the stdin thread: .push(bytes)
//! let mut deadline = pc.poll();
//! loop {
//!     // ... run a block of guest code (cpu.step / jit) ...
//!     if pc.needs_poll(deadline) {
//!         deadline = pc.poll();             // timers, serial input, IRQs
//!     }
//!     if pc.control.pending() {
//!         if let Some(code) = pc.control.take_exit() { std::process::exit(code as i32) }
//!         if pc.control.take_reset() { pc.reset(); /* + cpu reset */ }
//!         if let Some(a20) = pc.control.take_a20_change() { /* mmu.phys.set_a20(a20) */ }
//!     }
//!     // When the CPU is halted and cannot take an interrupt (none pending, or IF=0:
//!     // then only a reset or NMI ends HLT): sleep until the next deadline or until
//!     // another thread raises something (0% host CPU while idle).
//!     # let (halted, eflags_if) = (false, true);
//!     if halted && !(eflags_if && intr.pending()) {
//!         pc.wait_for_event(deadline);
//!         deadline = pc.poll();
//!     }
//!     # break;
//! }
//! ```
//!
//! What is where (ports, IRQ):
//! | device | file | ports | IRQ |
//! |---|---|---|---|
//! | 8259A pair + ELCR | [`pic`], [`irq`] | 0x20-0x21, 0xa0-0xa1, 0x4d0-0x4d1 | - |
//! | 8254 PIT + port B | [`pit`] | 0x40-0x43, 0x61 | 0 |
//! | i8042 + PS/2 kbd/mouse | [`i8042`] | 0x60, 0x64 | 1, 12 |
//! | MC146818 RTC/CMOS | [`rtc`] | 0x70-0x71 | 8 |
//! | POST codes | [`debug`] | 0x80 | - |
//! | system control port A | [`port92`] | 0x92 | - |
//! | debug console | [`debug`] | 0xe9 | - |
//! | isa-debug-exit | [`debug`] | 0xf4-0xf7 (acts on 0xf4) | - |
//! | 16550A COM1-COM4 | [`serial`] | 0x3f8, 0x2f8, 0x3e8, 0x2e8 (+8) | 4, 3, 4, 3 |
//! | PCI host (i440FX, PIIX3) | [`pci`] | 0xcf8-0xcff (0xcf9 reset control) | - |
//! | PCI I/O BARs | [`pci`] | any port nothing else claims | PIRQA-D routing |
//! | VGA + Bochs VBE (PCI 1234:1111) | [`vga`] | 0x3b0-0x3df, 0x1ce-0x1d0; memory 0xA0000-0xBFFFF, BAR0 | - |
//!
//! PCI devices: implement [`pci::PciFunction`], `pc.pci.lock().add(slot, 0, dev)`, give
//! the device [`PcPlatform::pci_intx`] for its interrupt, and map
//! [`PcPlatform::pci_mmio_window`] at [`pci::PCI_MMIO_BASE`] in the physical memory map
//! (`phys.add_mmio(PCI_MMIO_BASE, PCI_MMIO_LEN, pc.pci_mmio_window())`) so memory
//! BARs are reachable. I/O BARs are reached through the port bus fallback.
//!
//! Direct kernel boots (no BIOS) should call [`PcPlatform::setup_pci_irqs_for_direct_boot`]
//! after adding PCI devices. Snapshots: [`PcPlatform::save`] / [`PcPlatform::restore`]
//! (serde; the frontend picks the format).
//!
//! Threads and locks: every device sits in its own `Arc<Mutex<..>>`; the bus locks one
//! device per access. A device may drive its [`irq::IrqLine`] while holding its own lock
//! (that takes the interrupt controller's lock); nothing takes locks in the other order.
//! Other threads may call [`PcPlatform::key_event`], [`PcPlatform::mouse_event`] and
//! [`serial::SerialInput::push`]; they wake a sleeping run loop through
//! [`PcPlatform::wakeup`]. POST codes are logged under [`debug::POST_LOG_TARGET`]
//! (enable that log target for `-d post`).
#![deny(missing_docs)]

pub mod bus;
pub mod clock;
pub mod control;
pub mod debug;
pub mod fw_cfg;
pub mod i8042;
pub mod irq;
pub mod pci;
pub mod pic;
pub mod pit;
pub mod port92;
pub mod rtc;
pub mod serial;
pub mod vga;
pub mod wake;

use std::io::Write;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex};
use std::time::Duration;

pub use bus::{BusError, PortBus, SharedDevice, Width};
pub use clock::{Clock, HostClock, ManualClock, SharedClock};
pub use control::PlatformControl;
pub use irq::{InterruptController, IrqLine};
pub use wake::Wakeup;

use bus::lock;

/// What to build.
pub struct PlatformConfig {
    /// Guest RAM in bytes (for the CMOS memory-size registers).
    pub ram_size: u64,
    /// Time source of the timers.
    pub clock: SharedClock,
    /// The RTC's starting time as Unix seconds (default: the host's wall clock).
    pub wall_clock_unix: i64,
    /// COM1-COM4 back ends; `None` leaves the port out (its ports read all ones).
    pub serial: [Option<Box<dyn serial::SerialBackend>>; 4],
    /// Where the 0xe9 debug console writes; `None` leaves the port out.
    pub debugcon: Option<Box<dyn Write + Send>>,
    /// Whether isa-debug-exit sits at 0xf4.
    pub debug_exit: bool,
}

impl PlatformConfig {
    /// A PC with `ram_size` bytes of RAM, the host clocks, COM1 present with no back end
    /// yet (output dropped), no debug console, isa-debug-exit present.
    pub fn new(ram_size: u64) -> Self {
        PlatformConfig {
            ram_size,
            clock: Arc::new(HostClock::new()),
            wall_clock_unix: rtc::Rtc::host_unix_secs(),
            serial: [Some(Box::new(serial::NullBackend)), None, None, None],
            debugcon: None,
            debug_exit: true,
        }
    }
}

/// Saved state of every platform device (serde: the frontend picks the format).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct PlatformState {
    /// PIC pair and IRQ input levels.
    pub irq: irq::IrqState,
    /// Timer.
    pub pit: pit::PitState,
    /// RTC and CMOS.
    pub rtc: rtc::RtcState,
    /// COM1-COM4 (`None` where absent).
    pub uarts: Vec<Option<serial::UartState>>,
    /// Keyboard controller, keyboard and mouse.
    pub kbc: i8042::I8042State,
    /// PCI host and configuration spaces.
    pub pci: pci::PciState,
    /// Port 0x92.
    pub port92: u8,
    /// The A20 gate.
    pub a20: bool,
}

/// The PC platform: all devices, wired, and the handles the machine needs.
pub struct PcPlatform {
    io: Option<PortBus>,
    /// The PIC pair as the CPU sees it (INTR and INTA).
    pub interrupts: InterruptController,
    /// Reset, A20 and exit requests.
    pub control: PlatformControl,
    /// Notified when input arrives or INTR rises; an idle run loop sleeps on it.
    pub wakeup: Wakeup,
    /// The timer.
    pub pit: Arc<Mutex<pit::Pit>>,
    /// The real-time clock and CMOS (e.g. [`rtc::Rtc::set_cmos`] for disk types).
    pub rtc: Arc<Mutex<rtc::Rtc>>,
    /// COM1-COM4 where present.
    pub uarts: [Option<Arc<Mutex<serial::Uart>>>; 4],
    /// The keyboard controller.
    pub kbc: Arc<Mutex<i8042::I8042>>,
    /// The PCI host bridge (add PCI devices here).
    pub pci: Arc<Mutex<pci::PciHost>>,
    /// Port 0x92.
    pub port92: Arc<Mutex<port92::Port92>>,
    /// Port 0x80.
    pub post: Arc<Mutex<debug::PostPort>>,
    clock: SharedClock,
    io_written: Arc<AtomicBool>,
}

impl PcPlatform {
    /// Creates and wires every device. Fails only if the port map has an overlap, which
    /// would be a bug in this function.
    pub fn new(cfg: PlatformConfig) -> Result<Self, BusError> {
        let clock = cfg.clock.clone();
        let interrupts = InterruptController::new();
        let control = PlatformControl::new();
        let wakeup = Wakeup::new();
        interrupts.set_wakeup(wakeup.clone());
        let mut io = PortBus::new();
        let io_written = Arc::new(AtomicBool::new(false));
        io.set_write_flag(io_written.clone());

        let pic = interrupts.ports();
        io.register("pic1", 0x20, 2, 0, Width::Bytes, pic.clone())?;
        io.register("pic2", 0xa0, 2, 0, Width::Bytes, pic.clone())?;
        io.register("elcr", 0x4d0, 2, 0, Width::Bytes, pic)?;

        let pit = Arc::new(Mutex::new(pit::Pit::new(
            clock.clone(),
            Some(interrupts.line(0)),
        )));
        io.register("pit", 0x40, 4, 0, Width::Bytes, pit.clone())?;
        io.register("port61", 0x61, 1, 0, Width::Bytes, pit.clone())?;

        let kbc = Arc::new(Mutex::new(i8042::I8042::new(
            Some(interrupts.line(1)),
            Some(interrupts.line(12)),
            control.clone(),
        )));
        io.register("i8042-data", 0x60, 1, 0x60, Width::Bytes, kbc.clone())?;
        io.register("i8042-cmd", 0x64, 1, 0x60, Width::Bytes, kbc.clone())?;

        let rtc = Arc::new(Mutex::new(rtc::Rtc::new(
            clock.clone(),
            Some(interrupts.line(8)),
            cfg.wall_clock_unix,
            cfg.ram_size,
        )));
        io.register("rtc", 0x70, 2, 0x70, Width::Bytes, rtc.clone())?;

        let post = Arc::new(Mutex::new(debug::PostPort::new()));
        io.register("post", 0x80, 1, 0x80, Width::Bytes, post.clone())?;

        let port92 = Arc::new(Mutex::new(port92::Port92::new(control.clone())));
        io.register("port92", 0x92, 1, 0x92, Width::Bytes, port92.clone())?;

        if let Some(out) = cfg.debugcon {
            let d = Arc::new(Mutex::new(debug::DebugCon::new(out)));
            io.register("debugcon", 0xe9, 1, 0xe9, Width::Bytes, d)?;
        }
        if cfg.debug_exit {
            let d = Arc::new(Mutex::new(debug::DebugExit::new(control.clone())));
            io.register("isa-debug-exit", 0xf4, 4, 0xf4, Width::Any, d)?;
        }

        let mut uarts: [Option<Arc<Mutex<serial::Uart>>>; 4] = Default::default();
        for (n, backend) in cfg.serial.into_iter().enumerate() {
            let Some(backend) = backend else { continue };
            let u = Arc::new(Mutex::new(serial::Uart::new(
                clock.clone(),
                Some(interrupts.line(serial::COM_IRQS[n])),
                backend,
                Some(wakeup.clone()),
            )));
            let base = serial::COM_PORTS[n];
            io.register(
                &format!("com{}", n + 1),
                base,
                8,
                base,
                Width::Bytes,
                u.clone(),
            )?;
            uarts[n] = Some(u);
        }

        let pci = Arc::new(Mutex::new(pci::PciHost::new(control.clone())));
        io.register("pci", 0xcf8, 8, 0xcf8, Width::Any, pci.clone())?;
        // Ports nobody claims are decoded by the PCI devices' I/O BARs.
        io.set_fallback(Arc::new(Mutex::new(pci::PciIoWindow(pci.clone()))));

        Ok(PcPlatform {
            io: Some(io),
            interrupts,
            control,
            wakeup,
            pit,
            rtc,
            uarts,
            kbc,
            pci,
            port92,
            post,
            clock,
            io_written,
        })
    }

    /// The port bus, to register more devices before handing it to the CPU.
    pub fn io_bus_mut(&mut self) -> Option<&mut PortBus> {
        self.io.as_mut()
    }

    /// Hands the port bus over (once) for `cpu.io`.
    pub fn take_io_bus(&mut self) -> Option<PortBus> {
        self.io.take()
    }

    /// The PCI memory hole as an MMIO device, to map in the physical memory map at
    /// [`pci::PCI_MMIO_BASE`] for [`pci::PCI_MMIO_LEN`] bytes (memory BARs live there).
    pub fn pci_mmio_window(&self) -> Box<dyn morph86_mmu::BusDevice> {
        Box::new(pci::PciMmioWindow(self.pci.clone()))
    }

    /// The INTx# `pin` (1 = INTA#) of a PCI device at slot `dev`, routed by the PIIX3.
    pub fn pci_intx(&self, dev: u8, pin: u8) -> pci::PciIntx {
        lock(&self.pci).intx(&self.interrupts, dev, pin)
    }

    /// For direct kernel boots (no BIOS): routes PCI interrupts as SeaBIOS does
    /// (PIRQA/B -> IRQ10, PIRQC/D -> IRQ11), fills in the interrupt line registers and
    /// marks those IRQs level-triggered in the ELCR. Call after adding PCI devices.
    pub fn setup_pci_irqs_for_direct_boot(&self) {
        let used = lock(&self.pci).route_irqs([10, 10, 11, 11]);
        self.interrupts.with_pic(|p| {
            for irq in used {
                let port = if irq < 8 { pic::ELCR1 } else { pic::ELCR2 };
                let v = p.read_port(port) | 1 << (irq % 8);
                p.write_port(port, v);
            }
        });
    }

    /// Whether the guest masked NMIs through bit 7 of port 0x70.
    pub fn nmi_masked(&self) -> bool {
        lock(&self.rtc).nmi_disabled()
    }

    /// The input queue of COM`n+1`, if present.
    pub fn serial_input(&self, n: usize) -> Option<serial::SerialInput> {
        self.uarts.get(n)?.as_ref().map(|u| lock(u).input())
    }

    /// The platform clock's time in ns.
    pub fn now_ns(&self) -> u64 {
        self.clock.now_ns()
    }

    /// Brings timers, serial input and interrupt lines up to date; returns the clock
    /// time of the next device deadline (`None`: nothing scheduled).
    pub fn poll(&self) -> Option<u64> {
        self.io_written.store(false, Ordering::Relaxed);
        self.wakeup.take_poke();
        let mut next: Option<u64> = None;
        let mut take = |d: Option<u64>| {
            if let Some(d) = d {
                next = Some(next.map_or(d, |n| n.min(d)));
            }
        };
        {
            let mut p = lock(&self.pit);
            p.update();
            take(p.next_deadline());
        }
        {
            let mut r = lock(&self.rtc);
            r.update();
            take(r.next_deadline());
        }
        for u in self.uarts.iter().flatten() {
            let mut u = lock(u);
            u.update();
            take(u.next_deadline());
        }
        next
    }

    /// Whether [`PcPlatform::poll`] is due: the deadline passed, the guest wrote to a
    /// device port since the last poll, or input arrived.
    pub fn needs_poll(&self, deadline: Option<u64>) -> bool {
        self.io_written.load(Ordering::Relaxed)
            || self.wakeup.poked()
            || deadline.is_some_and(|d| self.clock.now_ns() >= d)
    }

    /// Sleeps until `deadline` (clock ns) or until another thread signals (input, INTR).
    pub fn wait_for_event(&self, deadline: Option<u64>) {
        let timeout = deadline.map(|d| Duration::from_nanos(d.saturating_sub(self.now_ns())));
        if timeout != Some(Duration::ZERO) {
            self.wakeup.wait(timeout);
        }
    }

    /// A key went down or up; `code` is a set 1 make code (`0xE0xx` for extended keys).
    pub fn key_event(&self, code: u16, down: bool) {
        lock(&self.kbc).key_event(code, down);
        self.wakeup.notify();
    }

    /// The mouse moved (y up is positive) / buttons changed (bit 0 left, 1 right, 2 middle).
    pub fn mouse_event(&self, dx: i32, dy: i32, dz: i32, buttons: u8) {
        lock(&self.kbc).mouse_event(dx, dy, dz, buttons);
        self.wakeup.notify();
    }

    /// Snapshot of every device (take it between guest instructions).
    pub fn save(&self) -> PlatformState {
        PlatformState {
            irq: self.interrupts.save(),
            pit: lock(&self.pit).save(),
            rtc: lock(&self.rtc).save(),
            uarts: self
                .uarts
                .iter()
                .map(|u| u.as_ref().map(|u| lock(u).save()))
                .collect(),
            kbc: lock(&self.kbc).save(),
            pci: lock(&self.pci).save(),
            port92: lock(&self.port92).save(),
            a20: self.control.a20(),
        }
    }

    /// Restores a snapshot onto a platform built with the same configuration. The
    /// A20 state is handed to the machine as an A20 change request.
    pub fn restore(&self, s: &PlatformState) {
        lock(&self.pit).restore(&s.pit);
        lock(&self.rtc).restore(&s.rtc);
        for (u, st) in self.uarts.iter().zip(&s.uarts) {
            match (u, st) {
                (Some(u), Some(st)) => lock(u).restore(st),
                (None, None) => {}
                _ => log::warn!("snapshot: serial port presence differs; skipped"),
            }
        }
        lock(&self.kbc).restore(&s.kbc);
        lock(&self.pci).restore(&s.pci);
        lock(&self.port92).restore(s.port92);
        // Last: the devices above re-drove their lines; the saved PIC state wins.
        self.interrupts.restore(&s.irq);
        self.control.set_a20(!s.a20);
        self.control.set_a20(s.a20);
    }

    /// Puts the devices in their power-on state (after a reset request). The RTC and
    /// CMOS keep running, as on a real board; serial back ends and queues stay.
    pub fn reset(&self) {
        self.interrupts.reset();
        lock(&self.pit).reset();
        lock(&self.kbc).reset();
        lock(&self.port92).reset();
        lock(&self.pci).reset();
        for u in self.uarts.iter().flatten() {
            lock(u).reset();
        }
        self.control.set_a20(true);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use morph86_mmu::IoBus;

    #[derive(Clone, Default)]
    struct Capture(Arc<Mutex<Vec<u8>>>);
    impl serial::SerialBackend for Capture {
        fn transmit(&mut self, byte: u8) {
            self.0.lock().unwrap().push(byte);
        }
    }
    impl Write for Capture {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.0.lock().unwrap().extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn pc(clock: &ManualClock) -> (PcPlatform, PortBus, Capture, Capture) {
        let mut cfg = PlatformConfig::new(64 << 20);
        cfg.clock = Arc::new(clock.clone());
        let com1 = Capture::default();
        let con = Capture::default();
        cfg.serial[0] = Some(Box::new(com1.clone()));
        cfg.debugcon = Some(Box::new(con.clone()));
        let mut p = PcPlatform::new(cfg).unwrap();
        let io = p.take_io_bus().unwrap();
        (p, io, com1, con)
    }

    /// The PIC initialisation Linux does (vectors 0x30/0x38 to tell them apart).
    fn init_pics(io: &mut PortBus) {
        for (port, v) in [
            (0x20, 0x11),
            (0x21, 0x30),
            (0x21, 0x04),
            (0x21, 0x01),
            (0xa0, 0x11),
            (0xa1, 0x38),
            (0xa1, 0x02),
            (0xa1, 0x01),
            (0x21, 0x00),
            (0xa1, 0x00),
        ] {
            io.io_write(port, 1, v);
        }
    }

    #[test]
    fn port_map_is_complete_and_unclaimed_ports_float() {
        let clock = ManualClock::new();
        let (_p, io, _, _) = pc(&clock);
        for (port, who) in [
            (0x20, "pic1"),
            (0xa1, "pic2"),
            (0x4d1, "elcr"),
            (0x43, "pit"),
            (0x61, "port61"),
            (0x60, "i8042-data"),
            (0x64, "i8042-cmd"),
            (0x71, "rtc"),
            (0x80, "post"),
            (0x92, "port92"),
            (0xe9, "debugcon"),
            (0xf4, "isa-debug-exit"),
            (0x3ff, "com1"),
            (0xcfc, "pci"),
        ] {
            assert_eq!(io.owner(port), Some(who), "port {port:#x}");
        }
        assert_eq!(io.owner(0x2f8), None, "COM2 left out");
        let mut io = io;
        assert_eq!(io.io_read(0x2f8, 1), 0xff);
    }

    #[test]
    fn timer_interrupt_end_to_end_with_deadlines() {
        let clock = ManualClock::new();
        let (p, mut io, _, _) = pc(&clock);
        init_pics(&mut io);
        // 100 Hz: divisor 11932, mode 2.
        io.io_write(0x43, 1, 0x34);
        io.io_write(0x40, 1, 11932 & 0xff);
        io.io_write(0x40, 1, 11932 >> 8);
        assert!(p.needs_poll(None), "a port write asks for a poll");
        let d = p.poll().expect("timer deadline");
        assert!(!p.needs_poll(Some(d)));
        // 11932 ticks + 1 at 1.193182 MHz = 10.0008 ms.
        assert!((10_000_000..10_002_000).contains(&d), "{d}");
        clock.set(d);
        assert!(p.needs_poll(Some(d)));
        p.poll();
        assert!(p.interrupts.pending());
        assert_eq!(p.interrupts.acknowledge(), 0x30);
        io.io_write(0x20, 1, 0x20);
        assert!(!p.interrupts.pending());
    }

    #[test]
    fn serial_echo_through_the_bus() {
        let clock = ManualClock::new();
        let (p, mut io, com1, _) = pc(&clock);
        init_pics(&mut io);
        for b in b"boot\n" {
            io.io_write(0x3f8, 1, *b as u32);
        }
        assert_eq!(&*com1.0.lock().unwrap(), b"boot\n");
        io.io_write(0x3f9, 1, serial::IER_ERBFI as u32);
        io.io_write(0x3fc, 1, serial::MCR_OUT2 as u32);
        let inp = p.serial_input(0).unwrap();
        std::thread::spawn(move || inp.push(b"k")).join().unwrap();
        assert!(p.needs_poll(None));
        p.poll();
        assert!(p.interrupts.pending());
        assert_eq!(p.interrupts.acknowledge(), 0x34, "COM1 on IRQ4");
        assert_eq!(io.io_read(0x3f8, 1), b'k' as u32);
        assert!(p.serial_input(1).is_none());
    }

    #[test]
    fn keyboard_rtc_and_pci_through_the_bus() {
        let clock = ManualClock::new();
        let (p, mut io, _, _) = pc(&clock);
        init_pics(&mut io);
        p.key_event(0x1c, true);
        assert!(p.interrupts.pending());
        assert_eq!(p.interrupts.acknowledge(), 0x31);
        assert_eq!(io.io_read(0x64, 1) & 1, 1);
        assert_eq!(io.io_read(0x60, 1), 0x1c);
        io.io_write(0x70, 1, 0x15);
        assert_eq!(io.io_read(0x71, 1), 0x80);
        io.io_write(0x70, 1, 0x16);
        assert_eq!(io.io_read(0x71, 1), 0x02);
        io.io_write(0xcf8, 4, 0x8000_0800);
        assert_eq!(io.io_read(0xcfc, 4), 0x7000_8086);
    }

    #[test]
    fn machine_requests_a20_reset_exit_debugcon() {
        let clock = ManualClock::new();
        let (p, mut io, _, con) = pc(&clock);
        io.io_write(0x92, 1, 0);
        assert_eq!(p.control.take_a20_change(), Some(false));
        io.io_write(0x64, 1, 0xd1);
        io.io_write(0x60, 1, 0x03);
        assert_eq!(p.control.take_a20_change(), Some(true));
        io.io_write(0x64, 1, 0xfe);
        assert!(p.control.take_reset());
        io.io_write(0xcf9, 1, 0x06);
        assert!(p.control.take_reset());
        io.io_write(0x92, 1, 1);
        assert!(p.control.take_reset());
        p.reset();
        io.io_write(0xf4, 4, 0x31);
        assert_eq!(p.control.take_exit(), Some(0x63));
        io.io_write(0xf5, 1, 0x31);
        assert_eq!(p.control.take_exit(), None, "only 0xf4 itself acts");
        io.io_write(0xe9, 1, b'x' as u32);
        assert_eq!(&*con.0.lock().unwrap(), b"x");
        assert_eq!(io.io_read(0xe9, 1), 0xe9);
        io.io_write(0x80, 1, 0x42);
        assert_eq!(p.post.lock().unwrap().last(), Some(0x42));
    }

    #[test]
    fn platform_snapshot_round_trip() {
        let clock = ManualClock::new();
        let (p, mut io, _, _) = pc(&clock);
        init_pics(&mut io);
        io.io_write(0x43, 1, 0x34);
        io.io_write(0x40, 1, 0xe8);
        io.io_write(0x40, 1, 0x03); // 1000 ticks
        io.io_write(0x3ff, 1, 0x99);
        io.io_write(0x92, 1, 0);
        p.key_event(0x1e, true);
        let json = serde_json::to_string(&p.save()).unwrap();

        let clock2 = ManualClock::new();
        clock2.set(1_000_000_000);
        let (q, mut io2, _, _) = pc(&clock2);
        q.restore(&serde_json::from_str(&json).unwrap());
        assert_eq!(io2.io_read(0x3ff, 1), 0x99);
        assert!(!q.control.a20());
        assert_eq!(q.control.take_a20_change(), Some(false));
        assert!(q.interrupts.pending(), "the key's IRQ1 is still pending");
        assert_eq!(q.interrupts.acknowledge(), 0x31);
        assert_eq!(io2.io_read(0x60, 1), 0x1e);
        io2.io_write(0x20, 1, 0x20);
        let d = q.poll().unwrap();
        assert!(d > 1_000_000_000 && d <= 1_000_000_000 + 839_000, "{d}");
    }

    #[test]
    fn direct_boot_pci_irq_setup() {
        let clock = ManualClock::new();
        let (p, mut io, _, _) = pc(&clock);
        let mut cfg = pci::PciConfig::new(0x1022, 0x2000, 0x02_00_00, 0x10, 0);
        cfg.set8(pci::CFG_INTERRUPT_PIN, 1);
        let nic = Arc::new(Mutex::new(pci::PlainFunction { cfg }));
        p.pci.lock().unwrap().add(2, 0, nic).unwrap();
        p.setup_pci_irqs_for_direct_boot();
        io.io_write(0xcf8, 4, 0x8000_103c); // 00:02.0, interrupt line/pin
        assert_eq!(io.io_read(0xcfc, 2), 0x010b, "INTA# -> PIRQC -> IRQ11");
        assert_eq!(io.io_read(0x4d1, 1), 0b0000_1000, "IRQ11 level");
    }

    #[test]
    fn random_port_traffic_never_panics_or_hangs() {
        let clock = ManualClock::new();
        let (p, mut io, _, _) = pc(&clock);
        let ports: Vec<u16> = [0x20u16, 0x21, 0xa0, 0xa1, 0x4d0, 0x4d1]
            .into_iter()
            .chain(0x40..=0x43)
            .chain([0x60, 0x61, 0x64, 0x70, 0x71, 0x80, 0x92, 0xe9, 0xf5])
            .chain(0x3f8..=0x3ff)
            .chain(0xcf8..=0xcff)
            .chain([0x2f8, 0xc000, 0xffff])
            .collect();
        let mut x = 0x0bad_cafeu32;
        for i in 0..200_000 {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            let port = ports[(x as usize >> 4) % ports.len()];
            let size = [1, 1, 1, 2, 4][(x % 5) as usize];
            if x & 0x8000 != 0 {
                if port == 0x92 || (port == 0x64 && (x >> 16) as u8 >= 0xf0) {
                    continue; // resets are fine but make the rest of the run dull
                }
                io.io_write(port, size, x.rotate_right(11));
            } else {
                io.io_read(port, size);
            }
            if i % 64 == 0 {
                clock.advance((x >> 8) as u64 % 2_000_000);
                let d = p.poll();
                assert!(d.is_none_or(|d| d > clock.now_ns()), "deadline in the past");
                if p.interrupts.pending() {
                    p.interrupts.acknowledge();
                }
                p.key_event((x >> 3) as u16 & 0x7f, x & 1 != 0);
                p.mouse_event(3, -2, 0, 1);
            }
            p.control.take_reset();
            p.control.take_exit();
        }
        let json = serde_json::to_string(&p.save()).unwrap();
        p.restore(&serde_json::from_str(&json).unwrap());
    }

    /// Cost of one port access through the bus (run with --ignored --nocapture).
    #[test]
    #[ignore]
    fn measure_port_access_cost() {
        let clock = ManualClock::new();
        let (_p, mut io, _, _) = pc(&clock);
        let n = 2_000_000u32;
        for (what, port) in [
            ("PIC IMR", 0x21u16),
            ("RTC data", 0x71),
            ("unclaimed", 0x1234),
        ] {
            let t = std::time::Instant::now();
            for _ in 0..n {
                std::hint::black_box(io.io_read(port, 1));
            }
            println!(
                "{what}: {:.1} ns per IN",
                t.elapsed().as_nanos() as f64 / n as f64
            );
        }
    }

    #[test]
    fn idle_wait_sleeps_until_the_deadline() {
        // Real clock: a 100 Hz timer and an idle loop should wake ~10 times in 100 ms.
        let mut cfg = PlatformConfig::new(64 << 20);
        cfg.serial = [None, None, None, None];
        let mut p = PcPlatform::new(cfg).unwrap();
        let mut io = p.take_io_bus().unwrap();
        init_pics(&mut io);
        io.io_write(0x43, 1, 0x34);
        io.io_write(0x40, 1, 11932 & 0xff);
        io.io_write(0x40, 1, 11932 >> 8);
        let start = std::time::Instant::now();
        let mut deadline = p.poll();
        let mut wakeups = 0;
        let mut irqs = 0;
        while start.elapsed() < Duration::from_millis(100) {
            p.wait_for_event(deadline);
            wakeups += 1;
            deadline = p.poll();
            while p.interrupts.pending() {
                p.interrupts.acknowledge();
                io.io_write(0x20, 1, 0x20);
                irqs += 1;
            }
        }
        assert!(
            (5..=20).contains(&irqs),
            "{irqs} timer interrupts in 100 ms"
        );
        assert!(
            wakeups <= 3 * irqs + 5,
            "{wakeups} wake-ups: the idle loop spins"
        );
    }
}
