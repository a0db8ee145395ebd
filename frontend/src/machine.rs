//! Machine assembly and the run loop.
//!
//! The vCPU runs on its own thread. It executes guest code in batches, polls the
//! platform's timers when a deadline passes or the guest touched a device, applies
//! reset/A20/exit requests from the devices, and when the guest halts with nothing
//! pending it sleeps until the next timer deadline or until another thread (stdin)
//! wakes it, so an idle guest costs close to no host CPU.

use crate::cli::{parse_mem, Accel, Args, Display};
use crate::console;
use crate::loader::{self, Entry32, LoadError};
use morph86_cpu::{Cpu, InterruptSource, StepEvent};
use morph86_devices::serial::{SerialBackend, WriterBackend};
use morph86_devices::{InterruptController, PcPlatform, PlatformConfig};
use morph86_jit::Jit;
use morph86_mmu::{IoBus, Mmu, PhysError, PhysMem};
use std::path::{Path, PathBuf};
use std::process::ExitCode;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Why the machine could not start. Each variant's text is the user's error line.
#[derive(Debug, thiserror::Error)]
pub enum MachineError {
    /// Bad command-line value.
    #[error("{0}")]
    Usage(String),
    /// A file named on the command line cannot be read.
    #[error("cannot read {path}: {source}")]
    Read {
        /// The path.
        path: String,
        /// The host error.
        source: std::io::Error,
    },
    /// A file named on the command line cannot be created.
    #[error("cannot create {path}: {source}")]
    Create {
        /// The path.
        path: String,
        /// The host error.
        source: std::io::Error,
    },
    /// Guest RAM cannot be set up.
    #[error(transparent)]
    Phys(#[from] PhysError),
    /// A kernel, initrd or firmware image is unusable.
    #[error(transparent)]
    Load(#[from] LoadError),
    /// The host refused something the machine needs (threads, the port map).
    #[error("host error: {0}")]
    Host(String),
}

fn read(path: &Path) -> Result<Vec<u8>, MachineError> {
    std::fs::read(path).map_err(|source| MachineError::Read {
        path: path.display().to_string(),
        source,
    })
}

/// What to load into RAM at every (re)start.
struct BootImages {
    bios: Option<(String, Vec<u8>)>,
    kernel: Option<(String, Vec<u8>)>,
    initrd: Vec<(String, Vec<u8>, String)>,
    append: String,
}

impl BootImages {
    fn from_args(args: &Args, window: bool) -> Result<Self, MachineError> {
        let mut bios = match &args.bios {
            Some(p) => Some((p.display().to_string(), read(p)?)),
            None => None,
        };
        let kernel = match &args.kernel {
            Some(p) => Some((p.display().to_string(), read(p)?)),
            None => None,
        };
        let mut initrd = Vec::new();
        if let Some(list) = &args.initrd {
            let linux = kernel
                .as_ref()
                .is_some_and(|(_, k)| loader::linux::is_bzimage(k));
            if linux {
                initrd.push((list.clone(), read(Path::new(list))?, String::new()));
            } else {
                for m in list.split(',') {
                    let file = m.split_whitespace().next().unwrap_or("");
                    initrd.push((file.to_string(), read(Path::new(file))?, m.to_string()));
                }
            }
        }
        if kernel.is_none() && bios.is_none() {
            // Nothing named: boot the built-in demo (roms/demo), which ends by itself
            // when there is no window.
            bios = Some((crate::demo::NAME.into(), crate::demo::image(!window)));
        }
        Ok(BootImages {
            bios,
            kernel,
            initrd,
            append: args.append.clone(),
        })
    }

    /// Writes the images into `phys`; returns the entry state for a direct kernel boot.
    fn load(&self, phys: &mut PhysMem, firmware_too: bool) -> Result<Option<Entry32>, LoadError> {
        if firmware_too {
            if let Some((name, img)) = &self.bios {
                loader::firmware::load(phys, name, img)?;
            }
        }
        let Some((name, img)) = &self.kernel else {
            return Ok(None);
        };
        if loader::linux::is_bzimage(img) {
            let rd = self
                .initrd
                .first()
                .map(|(n, d, _)| (n.as_str(), d.as_slice()));
            Ok(Some(loader::linux::load(
                phys,
                name,
                img,
                rd,
                &self.append,
            )?))
        } else if loader::multiboot::find_header(img).is_some() {
            Ok(Some(loader::multiboot::load(
                phys,
                name,
                img,
                &self.initrd,
                &self.append,
            )?))
        } else {
            Err(LoadError::UnknownFormat(name.clone()))
        }
    }
}

/// `-d io`: logs every port access on its way to the real bus.
struct TracedIo(Box<dyn IoBus>);

impl IoBus for TracedIo {
    fn io_read(&mut self, port: u16, size: u8) -> u32 {
        let v = self.0.io_read(port, size);
        log::debug!(target: "morph86::io", "in  {port:#06x}/{size} -> {v:#x}");
        v
    }
    fn io_write(&mut self, port: u16, size: u8, value: u32) {
        log::debug!(target: "morph86::io", "out {port:#06x}/{size} <- {value:#x}");
        self.0.io_write(port, size, value)
    }
}

/// The PIC pair as the CPU's INTR line.
struct Intr(InterruptController);

impl InterruptSource for Intr {
    fn pending(&mut self) -> bool {
        self.0.pending()
    }
    fn acknowledge(&mut self) -> u8 {
        self.0.acknowledge()
    }
}

enum SerialSpec {
    Stdio,
    File(PathBuf),
    None,
}

fn parse_serial(s: &str) -> Result<SerialSpec, MachineError> {
    match s {
        "stdio" | "mon:stdio" => Ok(SerialSpec::Stdio),
        "none" | "null" => Ok(SerialSpec::None),
        _ => match s.strip_prefix("file:") {
            Some(p) if !p.is_empty() => Ok(SerialSpec::File(PathBuf::from(p))),
            _ => Err(MachineError::Usage(format!(
                "unsupported -serial '{s}' (use stdio, file:PATH or none)"
            ))),
        },
    }
}

/// QEMU's VGA BIOS for its standard VGA, which SeaBIOS runs from the card's ROM BAR.
const VGA_ROM_NAME: &str = "vgabios-stdvga.bin";
/// Where Debian's `seabios` package installs it.
const VGA_ROM_DIR: &str = "/usr/share/seabios";
/// QEMU's option ROM that loads a Linux kernel from fw_cfg (DMA) and starts it.
const LINUX_ROM_NAME: &str = "linuxboot_dma.bin";
/// Where Debian's `qemu-system-data` package installs it.
const LINUX_ROM_DIR: &str = "/usr/share/qemu";
/// SeaBIOS's debug output port (QEMU's isa-debugcon at 0x402 in Debian's build).
const FIRMWARE_DEBUG_PORT: u16 = 0x402;

/// CMOS byte with the first (bits 3-0) and second (bits 7-4) boot device, as QEMU's PC
/// sets it for its BIOS (1 floppy, 2 hard disk, 3 CD-ROM, 4 network).
const CMOS_BOOT_ORDER_12: u8 = 0x3d;
/// CMOS byte with the third boot device in bits 7-4 (bit 0 set: skip the floppy
/// boot-signature check; left clear, as QEMU's default).
const CMOS_BOOT_ORDER_3: u8 = 0x38;

/// The first three boot devices of a QEMU `-boot` value (`cad`, `order=dc,menu=on`):
/// a/b floppy, c hard disk, d CD-ROM, n network; unnamed places are 0 (none).
fn boot_order(spec: &str) -> Result<[u8; 3], MachineError> {
    let order = spec
        .split(',')
        .find_map(|p| p.strip_prefix("order="))
        .or_else(|| (!spec.contains('=')).then_some(spec))
        .unwrap_or("cad");
    let mut out = [0u8; 3];
    for (k, c) in order.chars().enumerate() {
        let dev = match c {
            'a' | 'b' => 1,
            'c' => 2,
            'd' => 3,
            'n' => 4,
            _ => {
                return Err(MachineError::Usage(format!(
                    "-boot '{spec}': boot device '{c}' is not one of a, b, c, d, n"
                )))
            }
        };
        if let Some(slot) = out.get_mut(k) {
            *slot = dev;
        }
    }
    Ok(out)
}

/// A Linux boot handed to the firmware: bzImage, initrd, command line.
type LinuxImages<'a> = (&'a [u8], Option<&'a [u8]>, &'a str);

/// What a PC firmware (SeaBIOS) expects of the machine beyond the devices every boot
/// has: the i440FX PAM/SMRAM registers driving the memory map, QEMU's fw_cfg device,
/// the VGA BIOS as the VGA card's expansion ROM (taken from beside the firmware file or
/// from /usr/share/seabios; without it the card still works, SeaBIOS just finds no
/// VGA BIOS), and the debug port 0x402 logged under `-d firmware`.
fn firmware_devices(
    pc: &mut PcPlatform,
    phys: &mut PhysMem,
    bios: &Path,
    ram: u64,
    nographic: bool,
    linux: Option<LinuxImages<'_>>,
) -> Result<(), MachineError> {
    use morph86_devices::fw_cfg::{FwCfg, FwCfgPorts, PORT_SELECTOR};
    use morph86_devices::{SharedDevice, Width};
    use std::sync::Mutex;

    fn lock<T: ?Sized>(m: &Mutex<T>) -> std::sync::MutexGuard<'_, T> {
        m.lock().unwrap_or_else(|e| e.into_inner())
    }
    lock(&pc.pci).connect_memory(phys.jobs());
    let beside = bios.parent().map(|d| d.join(VGA_ROM_NAME));
    let rom_path = beside
        .filter(|p| p.is_file())
        .unwrap_or_else(|| Path::new(VGA_ROM_DIR).join(VGA_ROM_NAME));
    match std::fs::read(&rom_path) {
        Ok(rom) => {
            if let Err(e) = lock(&pc.pci).set_option_rom(crate::display::VGA_PCI_SLOT, 0, &rom) {
                log::warn!("VGA BIOS {}: {e}", rom_path.display());
            }
        }
        Err(e) => log::warn!(
            "no VGA BIOS ({}: {e}): the firmware will find no video BIOS",
            rom_path.display()
        ),
    }
    let mut fw = FwCfg::pc(ram, nographic, true);
    if let Some((kernel, initrd, cmdline)) = linux {
        fw.add_linux(kernel, initrd, cmdline, ram)
            .map_err(|e| MachineError::Usage(e.to_string()))?;
        let rom = bios
            .parent()
            .map(|d| d.join(LINUX_ROM_NAME))
            .filter(|p| p.is_file())
            .unwrap_or_else(|| Path::new(LINUX_ROM_DIR).join(LINUX_ROM_NAME));
        let image = std::fs::read(&rom).map_err(|source| MachineError::Read {
            path: format!(
                "{} (QEMU's Linux loader ROM, package qemu-system-data; -kernel with -bios needs it)",
                rom.display()
            ),
            source,
        })?;
        let name = format!("genroms/{LINUX_ROM_NAME}");
        let order = format!("/rom@{name}\n\0").into_bytes();
        for (file, data) in [(name.as_str(), image), ("bootorder", order)] {
            fw.add_file(file, data)
                .map_err(|e| MachineError::Usage(e.to_string()))?;
        }
    }
    let fw = Arc::new(Mutex::new(fw));
    let bus = pc
        .io_bus_mut()
        .ok_or_else(|| MachineError::Host("the I/O bus is already taken".into()))?;
    let ports: SharedDevice = Arc::new(Mutex::new(FwCfgPorts::new(fw, Some(phys.jobs()))));
    bus.register(
        "fw_cfg",
        PORT_SELECTOR,
        12,
        PORT_SELECTOR,
        Width::Any,
        ports,
    )
    .map_err(|e| MachineError::Host(e.to_string()))?;
    let log_port: SharedDevice = Arc::new(Mutex::new(FirmwareLog::default()));
    bus.register(
        "firmware-debug",
        FIRMWARE_DEBUG_PORT,
        1,
        FIRMWARE_DEBUG_PORT,
        Width::Bytes,
        log_port,
    )
    .map_err(|e| MachineError::Host(e.to_string()))?;
    // The power-on routing (0xC0000-0xFFFFF reads ROM) before the first instruction.
    phys.run_jobs();
    Ok(())
}

/// The firmware's debug port: bytes collected into lines, logged under `-d firmware`.
#[derive(Default)]
struct FirmwareLog {
    line: Vec<u8>,
}

/// Longest line kept (a guest that never writes a newline cannot grow it further).
const FIRMWARE_LOG_LINE: usize = 512;

impl morph86_mmu::BusDevice for FirmwareLog {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        // QEMU's debugcon reads back its port number's low byte (0xe9 convention).
        data.fill(0xe9);
    }
    fn write(&mut self, _offset: u64, data: &[u8]) {
        for &b in data {
            if b == b'\n' || self.line.len() >= FIRMWARE_LOG_LINE {
                log::debug!(target: "morph86::firmware", "{}", String::from_utf8_lossy(&self.line));
                self.line.clear();
            } else if b != b'\r' {
                self.line.push(b);
            }
        }
    }
}

/// Builds the machine described by `args` and runs it to the end.
pub fn run(args: Args) -> Result<ExitCode, MachineError> {
    crate::logging::init(args.debug.as_deref(), args.logfile.as_deref())
        .map_err(MachineError::Usage)?;
    let ram = parse_mem(&args.memory).map_err(MachineError::Usage)?;
    if ram < (1 << 20) {
        return Err(MachineError::Usage(format!(
            "memory size '{}' is too small: morph86 needs at least 1 MiB (-m)",
            args.memory
        )));
    }
    for (what, given) in [
        ("-hda", args.hda.is_some()),
        ("-cdrom", args.cdrom.is_some()),
        ("-drive", !args.drive.is_empty()),
        ("-netdev", !args.netdev.is_empty()),
        ("-gdb", args.gdb.is_some()),
        ("-S", args.freeze),
    ] {
        if given {
            return Err(MachineError::Usage(format!("{what} is not supported yet")));
        }
    }
    let mut debug_exit = false;
    for d in &args.device {
        match d.split(',').next().unwrap_or("") {
            "isa-debug-exit" => debug_exit = true,
            other => return Err(MachineError::Usage(format!("unsupported device '{other}'"))),
        }
    }
    let window =
        crate::display::wants_window(args.display, args.nographic).map_err(MachineError::Usage)?;
    let jit = match args.accel {
        Accel::Jit | Accel::Check => {
            let mut j = Jit::new(morph86_jit::DEFAULT_CACHE_SIZE)
                .map_err(|e| MachineError::Host(format!("cannot map the JIT code cache: {e}")))?;
            j.dump_blocks = args.dump_blocks;
            j.check = (args.accel == Accel::Check).then_some(args.check_from);
            Some(j)
        }
        Accel::Interp => None,
    };
    let mut images = BootImages::from_args(&args, window)?;
    // With a firmware, a kernel goes to the firmware through fw_cfg (as on QEMU): no
    // direct boot.
    let fw_linux = match (&args.bios, images.kernel.take()) {
        (Some(_), Some((name, k))) => {
            if !loader::linux::is_bzimage(&k) {
                return Err(MachineError::Usage(format!(
                    "{name}: with -bios, -kernel must be a Linux bzImage (handed over by fw_cfg)"
                )));
            }
            let rd = std::mem::take(&mut images.initrd).into_iter().next();
            Some((k, rd.map(|(_, d, _)| d)))
        }
        (_, k) => {
            images.kernel = k;
            None
        }
    };
    let demo = args.kernel.is_none() && args.bios.is_none();
    let mut phys = PhysMem::new(ram)?;
    let entry = images.load(&mut phys, true)?;

    // Serial ports: COM1 defaults to the terminal unless -display none leaves it out.
    let mut specs: Vec<SerialSpec> = args
        .serial
        .iter()
        .map(|s| parse_serial(s))
        .collect::<Result<_, _>>()?;
    if specs.is_empty() {
        specs.push(if args.display == Some(Display::None) && !args.nographic {
            SerialSpec::None
        } else {
            SerialSpec::Stdio
        });
    }
    if specs.len() > 4 {
        return Err(MachineError::Usage("at most 4 -serial ports".into()));
    }
    let mut cfg = PlatformConfig::new(ram);
    cfg.debug_exit = debug_exit;
    let mut stdio_port = None;
    for (i, spec) in specs.iter().enumerate() {
        cfg.serial[i] = match spec {
            SerialSpec::Stdio => {
                if stdio_port.is_some() {
                    return Err(MachineError::Usage("only one -serial stdio".into()));
                }
                stdio_port = Some(i);
                Some(Box::new(WriterBackend(std::io::stdout())) as Box<dyn SerialBackend>)
            }
            SerialSpec::File(p) => {
                let f = std::fs::File::create(p).map_err(|source| MachineError::Create {
                    path: p.display().to_string(),
                    source,
                })?;
                Some(Box::new(WriterBackend(f)) as Box<dyn SerialBackend>)
            }
            SerialSpec::None => None,
        };
    }
    let mut pc = PcPlatform::new(cfg).map_err(|e| MachineError::Host(e.to_string()))?;
    let vga = crate::display::install(&mut pc, &mut phys).map_err(MachineError::Host)?;
    if let Some(bios) = &args.bios {
        let linux = fw_linux
            .as_ref()
            .map(|(k, rd)| (k.as_slice(), rd.as_deref(), args.append.as_str()));
        firmware_devices(&mut pc, &mut phys, bios, ram, args.nographic, linux)?;
        let order = boot_order(args.boot.as_deref().unwrap_or("cad"))?;
        let mut rtc = pc.rtc.lock().unwrap_or_else(|e| e.into_inner());
        rtc.set_cmos(CMOS_BOOT_ORDER_12, order[1] << 4 | order[0]);
        rtc.set_cmos(CMOS_BOOT_ORDER_3, order[2] << 4);
    }
    if args.kernel.is_some() && args.bios.is_none() {
        crate::display::linux_video_setup(&vga, &args.append);
    }
    let input = crate::display::Input::new(&pc);
    let mut cpu = Cpu::new(Mmu::new(phys));
    // Guest time follows the host clock: the PIT and RTC do, so the TSC must too, or
    // Linux's TSC clocksource (calibrated against the PIT) runs at emulation speed.
    cpu.tsc_source = morph86_cpu::TscSource::host_clock();
    cpu.io = Box::new(
        pc.take_io_bus()
            .ok_or_else(|| MachineError::Host("no I/O bus".into()))?,
    );
    if log::log_enabled!(target: "morph86::io", log::Level::Debug) {
        let bus = std::mem::replace(&mut cpu.io, Box::new(morph86_mmu::NullIo));
        cpu.io = Box::new(TracedIo(bus));
    }
    cpu.intr = Some(Box::new(Intr(pc.interrupts.clone())));
    if let Some(e) = entry {
        e.apply(&mut cpu);
    }

    let quit = Arc::new(AtomicBool::new(false));
    // SIGINT/SIGTERM/SIGHUP stop the machine as Ctrl-A x does (before any thread starts).
    let (q, wake) = (quit.clone(), pc.wakeup.clone());
    console::catch_termination(move || {
        q.store(true, Ordering::SeqCst);
        wake.notify();
    })
    .map_err(|e| MachineError::Host(e.to_string()))?;
    let _raw = if let Some(port) = stdio_port {
        let input = pc.serial_input(port);
        // SAFETY: isatty only inspects the descriptor.
        let tty = unsafe { libc::isatty(0) } == 1;
        let q = quit.clone();
        let wake = pc.wakeup.clone();
        console::spawn_reader(
            move |b| {
                if let Some(i) = &input {
                    i.push(b)
                }
            },
            move || {
                q.store(true, Ordering::SeqCst);
                wake.notify();
            },
            tty,
        )
        .map_err(|e| MachineError::Host(e.to_string()))?;
        Some(console::RawMode::enable())
    } else {
        None
    };

    let stats = args.stats;
    // The headless demo ends by resetting the machine: that reset is its exit.
    let no_reboot = args.no_reboot || (demo && !window);
    let display_opts = crate::display::DisplayOptions {
        sdl: window,
        screenshot: args.screenshot.clone(),
        send_keys: args.send_keys.clone(),
    };
    let quit_display = quit.clone();
    let limit = args.max_instructions.unwrap_or(u64::MAX);
    let vcpu = std::thread::Builder::new()
        .name("vcpu".into())
        .spawn(move || vcpu_loop(cpu, jit, pc, images, quit, no_reboot, limit, stats))
        .map_err(|e| MachineError::Host(e.to_string()))?;
    let shown = crate::display::run(&display_opts, vga, input, quit_display, || {
        vcpu.is_finished()
    });
    let code = vcpu
        .join()
        .map_err(|_| MachineError::Host("the vCPU thread panicked".into()))?;
    shown.map_err(MachineError::Host)?;
    Ok(code)
}

/// `-d exec`: the last few CS:EIP executed, logged with registers and the top of the
/// stack when an instruction raises an exception (the first `EXEC_DUMPS` of them).
#[derive(Default)]
struct ExecRing {
    at: [(u16, u32); 32],
    next: usize,
    dumps: u32,
}

/// `-d exec`: reads a dword at a linear address for a debug dump, as a supervisor
/// access. A failed read must not leave its address in CR2 (the guest may not have read
/// CR2 yet for a fault being delivered), so CR2 is put back.
fn peek(cpu: &mut Cpu, lin: u64) -> Option<u32> {
    let cr2 = cpu.s.cr2;
    let v = cpu.read_lin(lin & 0xffff_ffff, 4, false).ok();
    cpu.s.cr2 = cr2;
    v.map(|v| v as u32)
}

/// `-d exec`: return addresses found by following the EBP frame chain (32-bit code
/// built with frame pointers, as Linux is), at most 8, stopping at an unreadable frame.
fn frame_chain(cpu: &mut Cpu) -> String {
    let ss = cpu.s.seg[morph86_cpu::SegReg::Ss as usize].base;
    let mut ebp = cpu.s.gpr[5] as u32;
    let mut out = String::new();
    for _ in 0..8 {
        let lin = ss.wrapping_add(ebp as u64) & 0xffff_ffff;
        let (Some(next), Some(ret)) = (peek(cpu, lin), peek(cpu, lin + 4)) else {
            break;
        };
        out.push_str(&format!(" {ret:08x}"));
        if next <= ebp {
            break;
        }
        ebp = next;
    }
    out
}

/// How many exceptions `-d exec` explains with a full dump.
const EXEC_DUMPS: u32 = 50;

impl ExecRing {
    fn push(&mut self, cpu: &Cpu) {
        self.at[self.next % self.at.len()] = (
            cpu.s.seg[morph86_cpu::SegReg::Cs as usize].selector,
            cpu.s.rip as u32,
        );
        self.next += 1;
    }

    fn dump(&mut self, cpu: &mut Cpu) {
        if self.dumps >= EXEC_DUMPS {
            return;
        }
        self.dumps += 1;
        let n = self.at.len().min(self.next);
        let mut trail = String::new();
        for k in (1..=n).rev() {
            let (cs, ip) = self.at[(self.next - k) % self.at.len()];
            trail.push_str(&format!(" {cs:04x}:{ip:08x}"));
        }
        let g = cpu.s.gpr;
        log::debug!(
            target: "morph86::exec",
            "exception #{}: last EIPs{trail}\n  eax={:08x} ecx={:08x} edx={:08x} ebx={:08x} esp={:08x} ebp={:08x} esi={:08x} edi={:08x} cr0={:08x} cr2={:08x} cr3={:08x} cr4={:08x}",
            cpu.stats.exceptions,
            g[0], g[1], g[2], g[3], g[4], g[5], g[6], g[7],
            cpu.s.cr0, cpu.s.cr2, cpu.s.cr3, cpu.s.cr4
        );
        let ss = cpu.s.seg[morph86_cpu::SegReg::Ss as usize].base;
        let mut words = String::new();
        for k in 0..12u64 {
            let lin = ss.wrapping_add((g[4] as u32 as u64).wrapping_add(4 * k)) & 0xffff_ffff;
            match peek(cpu, lin) {
                Some(v) => words.push_str(&format!(" {v:08x}")),
                None => words.push_str(" ????????"),
            }
        }
        log::debug!(target: "morph86::exec", "  stack (after delivery):{words}");
    }
}

/// Instructions between checks of the platform's deadline (a clock read).
const POLL_EVERY: u32 = 256;

/// `-d exec` logs CS:EIP once per this many batched instructions (a multiple of POLL_EVERY).
const EXEC_SAMPLE: u64 = 1 << 20;

/// Instructions per batch under the JIT (translated code is fast, so batches are longer).
const JIT_BATCH: u64 = 65536;

/// `-accel check` prints a progress line each time this many more instructions were
/// compared.
const CHECK_REPORT: u64 = 1 << 30;

#[allow(clippy::too_many_arguments)]
fn vcpu_loop(
    mut cpu: Cpu,
    mut jit: Option<Jit>,
    pc: PcPlatform,
    images: BootImages,
    quit: Arc<AtomicBool>,
    no_reboot: bool,
    limit: u64,
    stats: bool,
) -> ExitCode {
    let mut deadline = pc.poll();
    let mut executed = 0u64;
    let mut checking = false;
    // `-d exec`: sample CS:EIP every EXEC_SAMPLE instructions (a test per batch).
    let exec_trace = log::log_enabled!(target: "morph86::exec", log::Level::Debug);
    let mut ring = ExecRing::default();
    let code = 'outer: loop {
        // A batch of guest instructions.
        let mut reset = false;
        let mut halted = false;
        let mut batch = POLL_EVERY as u64;
        if let (Some(j), false) = (jit.as_mut(), exec_trace) {
            // The JIT runs translated blocks and falls back to the interpreter itself.
            batch = JIT_BATCH;
            // `--check-from` counts retired guest instructions (`executed` counts
            // batches, halted ones included).
            let ev = if j.check.is_some_and(|from| cpu.stats.instructions >= from) {
                if !checking {
                    checking = true;
                    eprintln!(
                        "morph86: -accel check: lock-step from instruction {}",
                        cpu.stats.instructions
                    );
                }
                let before = j.stats.lockstep.insns;
                let r = j.run_lockstep(&mut cpu, JIT_BATCH);
                if j.stats.lockstep.insns / CHECK_REPORT != before / CHECK_REPORT {
                    // A sign of life on long checked runs.
                    eprintln!(
                        "morph86: -accel check: {} instructions compared clean, at instruction {}",
                        j.stats.lockstep.insns, cpu.stats.instructions
                    );
                }
                match r {
                    Ok(ev) => ev,
                    Err(d) => {
                        eprintln!("morph86: -accel check: {d}");
                        break 'outer ExitCode::from(3);
                    }
                }
            } else {
                j.run(&mut cpu, JIT_BATCH)
            };
            match ev {
                StepEvent::Ok => {}
                StepEvent::Halted => halted = true,
                StepEvent::TripleFault => {
                    log::info!("triple fault: resetting");
                    reset = true;
                }
            }
        } else {
            for _ in 0..POLL_EVERY {
                if exec_trace {
                    ring.push(&cpu);
                }
                let excs = cpu.stats.exceptions;
                match cpu.step() {
                    StepEvent::Ok if exec_trace && cpu.stats.exceptions != excs => {
                        ring.dump(&mut cpu)
                    }
                    StepEvent::Ok => {}
                    StepEvent::Halted => {
                        halted = true;
                        break;
                    }
                    StepEvent::TripleFault => {
                        log::info!("triple fault: resetting");
                        reset = true;
                        break;
                    }
                }
            }
        }
        executed += batch;
        crate::display::GUEST_STATS.note(batch, halted);
        cpu.mmu.harvest_watched(halted);
        if exec_trace && executed.is_multiple_of(EXEC_SAMPLE) {
            let frames = frame_chain(&mut cpu);
            log::debug!(
                target: "morph86::exec",
                "{executed} {:04x}:{:08x} cpl={} if={} ints={} excs={} frames:{frames}",
                cpu.s.seg[morph86_cpu::SegReg::Cs as usize].selector,
                cpu.s.rip,
                cpu.s.cpl,
                u8::from(cpu.s.eflags_raw & morph86_cpu::state::IF != 0),
                cpu.stats.interrupts,
                cpu.stats.exceptions
            );
        }
        if executed >= limit {
            break ExitCode::SUCCESS;
        }
        if quit.load(Ordering::Relaxed) {
            break ExitCode::SUCCESS;
        }
        if pc.needs_poll(deadline) {
            deadline = pc.poll();
        }
        if pc.control.pending() {
            if let Some(c) = pc.control.take_exit() {
                break ExitCode::from((c & 0xff) as u8);
            }
            if pc.control.take_reset() {
                reset = true;
            }
            if let Some(a20) = pc.control.take_a20_change() {
                cpu.mmu.phys.set_a20(a20);
                cpu.mmu.flush_all();
            }
        }
        if reset {
            if no_reboot {
                break ExitCode::SUCCESS;
            }
            pc.reset();
            // The chipset's power-on memory routing (queued by the PCI host's reset).
            cpu.mmu.phys.run_jobs();
            crate::display::machine_reset();
            cpu.reset();
            cpu.mmu.phys.ram_mut().fill(0);
            match images.load(&mut cpu.mmu.phys, false) {
                Ok(Some(e)) => e.apply(&mut cpu),
                Ok(None) => {}
                Err(e) => {
                    eprintln!("morph86: reloading after reset: {e}");
                    break 'outer ExitCode::FAILURE;
                }
            }
            deadline = pc.poll();
            continue;
        }
        let if_set = cpu.s.eflags_raw & morph86_cpu::state::IF != 0;
        if halted && !(if_set && pc.interrupts.pending()) {
            if cpu.s.eflags_raw & morph86_cpu::state::IF == 0 && deadline.is_none() {
                log::warn!("guest halted with interrupts disabled and no timer running (only Ctrl-A x or a reset ends this)");
            }
            pc.wait_for_event(deadline);
            deadline = pc.poll();
        }
    };
    cpu.mmu.harvest_watched(true);
    if stats {
        if let Some(j) = &jit {
            eprintln!("morph86: jit: {}", j.stats());
        }
        let st = &cpu.stats;
        eprintln!(
            "morph86: {} instructions, {} exceptions, {} interrupts, decode cache {} hits / {} misses",
            st.instructions, st.exceptions, st.interrupts, st.decode_hits, st.decode_misses
        );
        eprintln!(
            "morph86: stopped at {:04x}:{:08x} cr0={:08x} cr3={:08x} cr4={:08x} eflags={:08x} cpl={}",
            cpu.s.seg[morph86_cpu::SegReg::Cs as usize].selector,
            cpu.s.rip,
            cpu.s.cr0,
            cpu.s.cr3,
            cpu.s.cr4,
            cpu.s.eflags(),
            cpu.s.cpl
        );
    }
    code
}
