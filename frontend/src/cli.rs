//! Command line in QEMU's vocabulary (ARCHITECTURE.md section 6), so existing command
//! lines work: `-m 256 -kernel bzImage -append "console=ttyS0" -nographic`.
//!
//! QEMU spells long options with one dash; clap wants two. [`normalize`] rewrites the
//! single-dash spellings of the options we know before clap sees them, so both
//! `-kernel` and `--kernel` work.

use clap::{Parser, ValueEnum};
use std::path::PathBuf;

/// Execution engine.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Accel {
    /// The block translator (the default).
    Jit,
    /// The reference interpreter.
    Interp,
    /// Lock-step checking: every translated block runs in both engines and the first
    /// difference stops the machine with both states printed (slow).
    Check,
}

/// Display back end.
#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum Display {
    /// An SDL window.
    Sdl,
    /// No display.
    None,
}

/// morph86: a full-system x86 PC emulator.
#[derive(Debug, Parser)]
#[command(name = "morph86", version, about, long_about = None)]
pub struct Args {
    /// Guest RAM: a size in MiB, or with a suffix (512M, 1G), or size=N as in QEMU.
    #[arg(short = 'm', long = "m", value_name = "SIZE", default_value = "128")]
    pub memory: String,
    /// Linux bzImage or Multiboot kernel to boot directly.
    #[arg(long, value_name = "FILE")]
    pub kernel: Option<PathBuf>,
    /// Initial ramdisk (Linux) or comma-separated modules (Multiboot).
    #[arg(long, value_name = "FILE")]
    pub initrd: Option<String>,
    /// Kernel command line. For a direct Linux boot, `vga=0x312` (640x480), 0x315
    /// (800x600), 0x318 (1024x768) or 0x31b (1280x1024), 32 bpp, or 0x311/0x314/0x317/0x31a
    /// (16 bpp) start the screen in that VBE mode for vesafb; without `vga=` the kernel
    /// gets 80x25 VGA text (vgacon).
    #[arg(
        long,
        value_name = "CMDLINE",
        default_value = "",
        allow_hyphen_values = true
    )]
    pub append: String,
    /// Raw firmware image, mapped at the top of 4 GiB and aliased below 1 MiB, e.g.
    /// SeaBIOS (/usr/share/seabios/bios.bin): the machine then offers what it expects of
    /// QEMU (i440FX shadow RAM, fw_cfg, the VGA BIOS as the card's ROM), and -kernel goes
    /// to it through fw_cfg.
    #[arg(long, value_name = "FILE")]
    pub bios: Option<PathBuf>,
    /// Primary IDE master disk image.
    #[arg(long, value_name = "FILE")]
    pub hda: Option<PathBuf>,
    /// CD-ROM image.
    #[arg(long, value_name = "FILE")]
    pub cdrom: Option<PathBuf>,
    /// Drive specification (QEMU syntax).
    #[arg(long, value_name = "SPEC")]
    pub drive: Vec<String>,
    /// Boot order (QEMU syntax).
    #[arg(long, value_name = "ORDER")]
    pub boot: Option<String>,
    /// No display; serial port on the terminal.
    #[arg(long)]
    pub nographic: bool,
    /// Display back end.
    #[arg(long, value_enum)]
    pub display: Option<Display>,
    /// Write the screen to this PNG file when the machine stops.
    #[arg(long, value_name = "FILE.png")]
    pub screenshot: Option<PathBuf>,
    /// Type these characters on the emulated keyboard, starting after a short delay
    /// (for tests: lower-case letters, digits, space, newline).
    #[arg(long, value_name = "TEXT")]
    pub send_keys: Option<String>,
    /// Serial port back end: stdio, file:PATH or none (repeat for COM2..COM4).
    #[arg(long, value_name = "DEV")]
    pub serial: Vec<String>,
    /// Network back end (QEMU syntax).
    #[arg(long, value_name = "SPEC")]
    pub netdev: Vec<String>,
    /// Add a device, e.g. isa-debug-exit.
    #[arg(long, value_name = "DEV")]
    pub device: Vec<String>,
    /// Wait for a gdb connection on tcp::PORT.
    #[arg(long, value_name = "DEV")]
    pub gdb: Option<String>,
    /// Do not start the CPU until gdb says so.
    #[arg(short = 'S')]
    pub freeze: bool,
    /// Write disk changes to a temporary overlay, not the image.
    #[arg(long)]
    pub snapshot: bool,
    /// Exit instead of rebooting when the guest resets.
    #[arg(long = "no-reboot")]
    pub no_reboot: bool,
    /// Execution engine: jit (default), interp (the reference interpreter) or check
    /// (lock-step of the two).
    #[arg(long, value_enum, default_value = "jit")]
    pub accel: Accel,
    /// Log items, comma separated: post (POST codes at port 0x80), firmware (the firmware's
    /// debug port 0x402), int (interrupts), cpu_reset, unimp, guest_errors.
    #[arg(short = 'd', value_name = "ITEMS")]
    pub debug: Option<String>,
    /// Log file for -d output (default stderr).
    #[arg(short = 'D', value_name = "FILE")]
    pub logfile: Option<PathBuf>,
    /// Print execution counters on exit.
    #[arg(long)]
    pub stats: bool,
    /// Print each block the JIT translates: guest instructions beside the host code.
    #[arg(long = "dump-blocks")]
    pub dump_blocks: bool,
    /// Stop after this many guest instructions (for tests and benchmarks).
    #[arg(long, value_name = "N")]
    pub max_instructions: Option<u64>,
    /// With `-accel check`: run the first N guest instructions under the JIT unchecked
    /// (to reach a workload quickly), lock-step after that.
    #[arg(long = "check-from", value_name = "N", default_value_t = 0)]
    pub check_from: u64,
}

/// Long options that QEMU spells with a single dash.
const LONG: &[&str] = &[
    "kernel",
    "initrd",
    "append",
    "bios",
    "hda",
    "cdrom",
    "drive",
    "boot",
    "nographic",
    "display",
    "serial",
    "netdev",
    "device",
    "gdb",
    "snapshot",
    "no-reboot",
    "accel",
    "stats",
    "dump-blocks",
    "max-instructions",
    "check-from",
    "help",
    "version",
];

/// Options whose next argument is their value (so it is never taken for an option).
const TAKES_VALUE: &[&str] = &[
    "m",
    "kernel",
    "initrd",
    "append",
    "bios",
    "hda",
    "cdrom",
    "drive",
    "boot",
    "display",
    "serial",
    "netdev",
    "device",
    "gdb",
    "accel",
    "d",
    "D",
    "max-instructions",
    "check-from",
];

/// Rewrites `-kernel` into `--kernel` (`-m`, `-d`, `-D` and `-S` stay short options).
/// An unknown single-dash word such as `-frob` is reported whole, not as `-f`.
pub fn normalize<I: IntoIterator<Item = String>>(args: I) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    let mut value_next = false;
    for (i, a) in args.into_iter().enumerate() {
        if i == 0 || value_next || !a.starts_with('-') || a == "-" {
            value_next = false;
            out.push(a);
            continue;
        }
        let body = a.trim_start_matches('-');
        let (name, inline) = match body.split_once('=') {
            Some((n, _)) => (n, true),
            None => (body, false),
        };
        value_next = !inline && TAKES_VALUE.contains(&name);
        if a.starts_with("--") {
            out.push(a);
        } else if LONG.contains(&name) {
            out.push(format!("-{a}"));
        } else if name.len() == 1 || ["h"].contains(&name) {
            out.push(a);
        } else {
            return Err(format!("unknown option '{a}' (see --help)"));
        }
    }
    Ok(out)
}

/// Parses a QEMU memory size: "256" (MiB), "256M", "1G", "512k", "size=256M".
pub fn parse_mem(s: &str) -> Result<u64, String> {
    let t = s.trim();
    let t = t.strip_prefix("size=").unwrap_or(t);
    let t = t.split(',').next().unwrap_or("");
    let (num, mult) = match t.chars().last() {
        Some('k' | 'K') => (&t[..t.len() - 1], 1u64 << 10),
        Some('m' | 'M') => (&t[..t.len() - 1], 1 << 20),
        Some('g' | 'G') => (&t[..t.len() - 1], 1 << 30),
        Some('t' | 'T') => (&t[..t.len() - 1], 1 << 40),
        Some('b' | 'B') => (&t[..t.len() - 1], 1),
        _ => (t, 1 << 20),
    };
    let n: u64 = num
        .parse()
        .map_err(|_| format!("invalid memory size '{s}' (use e.g. 256, 256M or 1G)"))?;
    n.checked_mul(mult)
        .ok_or_else(|| format!("memory size '{s}' is too large"))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn parse(v: &[&str]) -> Result<Args, clap::Error> {
        let v = normalize(v.iter().map(|s| s.to_string()))
            .map_err(|e| clap::Error::raw(clap::error::ErrorKind::UnknownArgument, e))?;
        Args::try_parse_from(v)
    }

    #[test]
    fn qemu_spellings_parse() {
        let a = parse(&[
            "morph86",
            "-m",
            "256",
            "-kernel",
            "vmlinuz",
            "-initrd",
            "r.cpio.gz",
            "-append",
            "console=ttyS0 quiet",
            "-nographic",
            "-no-reboot",
            "-accel",
            "interp",
            "-serial",
            "file:log.txt",
            "-device",
            "isa-debug-exit",
            "-d",
            "post",
        ])
        .unwrap();
        assert_eq!(a.kernel.unwrap().to_str(), Some("vmlinuz"));
        assert_eq!(a.append, "console=ttyS0 quiet");
        assert!(a.nographic && a.no_reboot);
        assert_eq!(a.accel, Accel::Interp);
        assert_eq!(a.serial, vec!["file:log.txt"]);
        assert_eq!(a.debug.as_deref(), Some("post"));
        let b = parse(&["morph86", "--kernel", "k", "--display", "none"]).unwrap();
        assert_eq!(b.display, Some(Display::None));
        assert_eq!(b.accel, Accel::Jit, "the JIT is the default engine");
    }

    #[test]
    fn unknown_flag_is_an_error() {
        assert!(parse(&["morph86", "-frobnicate"]).is_err());
        assert!(parse(&["morph86", "-append", "-not-an-option", "-kernel", "k"]).is_ok());
        assert!(parse(&["morph86", "--accel", "kvm"]).is_err());
    }

    #[test]
    fn memory_sizes() {
        assert_eq!(parse_mem("256"), Ok(256 << 20));
        assert_eq!(parse_mem("1G"), Ok(1 << 30));
        assert_eq!(parse_mem("size=512M"), Ok(512 << 20));
        assert_eq!(parse_mem("0"), Ok(0));
        assert!(parse_mem("lots").is_err());
        assert!(parse_mem("99999999999999999999").is_err());
    }
}
