//! `-d ITEMS` and `-D FILE`: a small `log` back end. Warnings and errors always go to
//! the log; `-d` items turn on debug output for the parts of morph86 they name.

use log::{Level, LevelFilter, Metadata, Record};
use std::io::Write;
use std::sync::Mutex;

/// The `-d` items we understand, with the log targets (module prefixes) they enable.
pub const ITEMS: &[(&str, &[&str], &str)] = &[
    (
        "post",
        &["morph86_devices::debug"],
        "POST codes written to port 0x80",
    ),
    (
        "int",
        &["morph86_cpu::interrupts"],
        "interrupts and exceptions",
    ),
    (
        "firmware",
        &["morph86::firmware"],
        "the firmware's debug port 0x402 (SeaBIOS's log)",
    ),
    ("cpu_reset", &["morph86::machine"], "CPU resets"),
    ("io", &["morph86::io"], "every port I/O access (slow)"),
    (
        "exec",
        &["morph86::exec"],
        "CS:EIP every 1M instructions (where the guest spends its time)",
    ),
    (
        "unimp",
        &["morph86_cpu::interp", "morph86_devices"],
        "unimplemented features",
    ),
    (
        "guest_errors",
        &["morph86_devices", "morph86_cpu"],
        "guest errors",
    ),
    ("all", &["morph86"], "everything"),
];

struct Logger {
    out: Mutex<Box<dyn Write + Send>>,
    targets: Vec<&'static str>,
}

impl log::Log for Logger {
    fn enabled(&self, m: &Metadata) -> bool {
        m.level() <= Level::Warn || self.targets.iter().any(|t| m.target().starts_with(t))
    }
    fn log(&self, r: &Record) {
        if self.enabled(r.metadata()) {
            if let Ok(mut o) = self.out.lock() {
                let _ = writeln!(o, "[{} {}] {}\r", r.level(), r.target(), r.args());
            }
        }
    }
    fn flush(&self) {
        if let Ok(mut o) = self.out.lock() {
            let _ = o.flush();
        }
    }
}

/// Installs the logger. Returns an error line for unknown items or an unwritable file.
pub fn init(items: Option<&str>, file: Option<&std::path::Path>) -> Result<(), String> {
    let mut targets = Vec::new();
    for it in items.unwrap_or("").split(',').filter(|s| !s.is_empty()) {
        if it == "help" {
            let mut s = String::from("-d items:");
            for (n, _, d) in ITEMS {
                s.push_str(&format!("\n  {n:<13} {d}"));
            }
            return Err(s);
        }
        match ITEMS.iter().find(|(n, _, _)| *n == it) {
            Some((_, t, _)) => targets.extend_from_slice(t),
            None => return Err(format!("unknown -d item '{it}' (try -d help)")),
        }
    }
    let out: Box<dyn Write + Send> = match file {
        Some(p) => Box::new(
            std::fs::File::create(p)
                .map_err(|e| format!("cannot create log file {}: {e}", p.display()))?,
        ),
        None => Box::new(std::io::stderr()),
    };
    let level = if targets.is_empty() {
        LevelFilter::Warn
    } else {
        LevelFilter::Debug
    };
    let logger = Logger {
        out: Mutex::new(out),
        targets,
    };
    log::set_boxed_logger(Box::new(logger)).map_err(|e| e.to_string())?;
    log::set_max_level(level);
    Ok(())
}
