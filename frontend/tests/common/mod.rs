//! Helpers shared by the tests that run the `morph86` binary on real guests: find the
//! guest files, spawn the emulator, collect its serial output as timestamped lines, wait
//! for a marker with a timeout, type on its stdin, and kill it when the test ends (also
//! when it fails), so a hung guest never outlives its test.
//!
//! Guests live in `$MORPH86_GUESTS`, else `~/.cache/morph86/guests` (built by
//! `../shared/guests/make-guests.sh`). A test whose guest files are absent says
//! `SKIPPED` and passes.
//!
//! ```ignore
//! let Some(g) = common::guest_files(&["vmlinuz-686", "boot-i386.cpio.gz"]) else { return };
//! let mut vm = Morph86::spawn(common::linux(&g, "vmlinuz-686", "boot-i386.cpio.gz", "shell=1"));
//! vm.expect("GUEST-DONE", Duration::from_secs(600)).unwrap();
//! ```
#![allow(dead_code)]

use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, ChildStdin, Command, ExitStatus, Stdio};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// Where the guest files are.
pub fn guests_dir() -> PathBuf {
    if let Some(d) = std::env::var_os("MORPH86_GUESTS") {
        return PathBuf::from(d);
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
    PathBuf::from(home).join(".cache/morph86/guests")
}

/// The guest directory if every file in `names` is there; otherwise prints why the test
/// is skipped and returns `None`.
pub fn guest_files(names: &[&str]) -> Option<PathBuf> {
    let dir = guests_dir();
    let missing: Vec<&str> = names
        .iter()
        .copied()
        .filter(|n| !dir.join(n).exists())
        .collect();
    if missing.is_empty() {
        Some(dir)
    } else {
        eprintln!(
            "SKIPPED: {} not found in {} (build them with ../shared/guests/make-guests.sh)",
            missing.join(", "),
            dir.display()
        );
        None
    }
}

/// `morph86` as built for this test run, with no display (SDL and X variables removed).
pub fn morph86() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_morph86"));
    c.env_remove("DISPLAY");
    c.env_remove("WAYLAND_DISPLAY");
    c.env_remove("SDL_VIDEODRIVER");
    c
}

/// `morph86 -m 256 -kernel K -initrd I -append "console=ttyS0 cryptomgr.notests APPEND"
/// -nographic -no-reboot`: a Linux boot with the console on the serial port (stdio).
/// `cryptomgr.notests` skips ~3.5 G instructions of kernel crypto self-tests. Add
/// `-accel` and the like with `.args(..)`.
pub fn linux(dir: &Path, kernel: &str, initrd: &str, append: &str) -> Command {
    let mut c = morph86();
    c.args(["-m", "256", "-kernel"])
        .arg(dir.join(kernel))
        .arg("-initrd")
        .arg(dir.join(initrd))
        .arg("-append")
        .arg(format!("console=ttyS0 cryptomgr.notests {append}"))
        .args(["-nographic", "-no-reboot"]);
    c
}

/// One line of the emulator's stdout (the guest's serial console).
#[derive(Debug, Clone)]
pub struct Line {
    /// When its newline arrived.
    pub at: Instant,
    /// The text, without the line end (`\r\n` or `\n`).
    pub text: String,
    /// Offset in the output just past this line.
    end: usize,
}

#[derive(Default)]
struct Output {
    bytes: Vec<u8>,
    lines: Vec<Line>,
    /// Start of the line being received.
    line_start: usize,
    eof: bool,
}

#[derive(Default)]
struct Shared {
    out: Mutex<Output>,
    more: Condvar,
}

fn lock(m: &Mutex<Output>) -> MutexGuard<'_, Output> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// A running `morph86`. Dropping it kills the process.
pub struct Morph86 {
    child: Child,
    stdin: Option<ChildStdin>,
    stdout: Arc<Shared>,
    stderr: Arc<Mutex<Vec<u8>>>,
    /// When the process was started.
    pub started: Instant,
    /// Output offset where the next `expect` starts looking.
    cursor: usize,
    status: Option<ExitStatus>,
}

impl Morph86 {
    /// Starts `cmd` with stdin, stdout and stderr as pipes (unless the caller already set
    /// stdin, e.g. to a pseudo-terminal) and starts collecting its output.
    pub fn spawn(mut cmd: Command) -> Morph86 {
        Self::spawn_with(&mut cmd, true)
    }

    /// Like [`Morph86::spawn`], leaving stdin as `cmd` has it.
    pub fn spawn_keep_stdin(mut cmd: Command) -> Morph86 {
        Self::spawn_with(&mut cmd, false)
    }

    fn spawn_with(cmd: &mut Command, pipe_stdin: bool) -> Morph86 {
        if pipe_stdin {
            cmd.stdin(Stdio::piped());
        }
        cmd.stdout(Stdio::piped()).stderr(Stdio::piped());
        let started = Instant::now();
        let mut child = cmd.spawn().expect("spawn morph86");
        let stdin = child.stdin.take();
        let stdout = Arc::new(Shared::default());
        let mut out = child.stdout.take().expect("stdout pipe");
        let s = stdout.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            loop {
                let n = out.read(&mut buf).unwrap_or(0);
                let now = Instant::now();
                let mut o = lock(&s.out);
                if n == 0 {
                    o.eof = true;
                    s.more.notify_all();
                    return;
                }
                for &b in &buf[..n] {
                    o.bytes.push(b);
                    if b == b'\n' {
                        let start = o.line_start;
                        let end = o.bytes.len();
                        let text = String::from_utf8_lossy(&o.bytes[start..end])
                            .trim_end_matches(['\r', '\n'])
                            .to_string();
                        o.lines.push(Line { at: now, text, end });
                        o.line_start = end;
                    }
                }
                s.more.notify_all();
            }
        });
        let stderr = Arc::new(Mutex::new(Vec::new()));
        let mut err = child.stderr.take().expect("stderr pipe");
        let e = stderr.clone();
        std::thread::spawn(move || {
            let mut buf = [0u8; 4096];
            while let Ok(n) = err.read(&mut buf) {
                if n == 0 {
                    break;
                }
                e.lock()
                    .unwrap_or_else(|e| e.into_inner())
                    .extend_from_slice(&buf[..n]);
            }
        });
        Morph86 {
            child,
            stdin,
            stdout,
            stderr,
            started,
            cursor: 0,
            status: None,
        }
    }

    /// The process id.
    pub fn pid(&self) -> u32 {
        self.child.id()
    }

    /// Everything written to stdout so far.
    pub fn text(&self) -> String {
        String::from_utf8_lossy(&lock(&self.stdout.out).bytes).into_owned()
    }

    /// Everything written to stderr so far.
    pub fn stderr_text(&self) -> String {
        String::from_utf8_lossy(&self.stderr.lock().unwrap_or_else(|e| e.into_inner())).into_owned()
    }

    /// The last `n` lines of stdout, for failure messages.
    pub fn tail(&self, n: usize) -> String {
        let o = lock(&self.stdout.out);
        let from = o.lines.len().saturating_sub(n);
        let mut s: Vec<String> = o.lines[from..].iter().map(|l| l.text.clone()).collect();
        let partial = String::from_utf8_lossy(&o.bytes[o.line_start..]).into_owned();
        if !partial.is_empty() {
            s.push(partial);
        }
        s.join("\n")
    }

    /// Every complete line so far.
    pub fn lines(&self) -> Vec<Line> {
        lock(&self.stdout.out).lines.clone()
    }

    /// Waits up to `timeout` for `f` to find something in the output from the cursor on;
    /// `f` gets the output and the cursor and returns `(value, new cursor)`.
    fn wait<T>(
        &mut self,
        timeout: Duration,
        what: &str,
        mut f: impl FnMut(&Output, usize) -> Option<(T, usize)>,
    ) -> Result<T, String> {
        let end = Instant::now() + timeout;
        let mut o = lock(&self.stdout.out);
        loop {
            if let Some((v, c)) = f(&o, self.cursor) {
                self.cursor = c;
                return Ok(v);
            }
            let now = Instant::now();
            if o.eof || now >= end {
                let why = if o.eof {
                    "morph86 closed its output"
                } else {
                    "timed out"
                };
                drop(o);
                return Err(format!(
                    "{why} after {:.1} s waiting for {what}; last output:\n{}\nstderr:\n{}",
                    self.started.elapsed().as_secs_f64(),
                    self.tail(40),
                    self.stderr_text()
                ));
            }
            o = self
                .stdout
                .more
                .wait_timeout(o, end - now)
                .unwrap_or_else(|e| e.into_inner())
                .0;
        }
    }

    /// Waits for `needle` anywhere in the output after the cursor (a prompt needs no line
    /// end); returns when it arrived and moves the cursor past it.
    pub fn expect(&mut self, needle: &str, timeout: Duration) -> Result<Instant, String> {
        let n = needle.as_bytes().to_vec();
        self.wait(timeout, &format!("'{needle}'"), |o, from| {
            let hay = &o.bytes[from.min(o.bytes.len())..];
            let p = hay.windows(n.len()).position(|w| w == n.as_slice())?;
            Some((Instant::now(), from + p + n.len()))
        })
    }

    /// Waits for a complete line after the cursor for which `pred` holds (the line is
    /// given trimmed of its line end); returns it and moves the cursor past it.
    pub fn expect_line(
        &mut self,
        what: &str,
        timeout: Duration,
        pred: impl Fn(&str) -> bool,
    ) -> Result<Line, String> {
        self.wait(timeout, what, |o, from| {
            let l = o.lines.iter().find(|l| l.end > from && pred(&l.text))?;
            Some((l.clone(), l.end))
        })
    }

    /// Waits for a line that starts with `prefix`.
    pub fn expect_prefix(&mut self, prefix: &str, timeout: Duration) -> Result<Line, String> {
        let p = prefix.to_string();
        self.expect_line(&format!("a line starting '{prefix}'"), timeout, move |l| {
            l.starts_with(&p)
        })
    }

    /// Types `text` on stdin (which must be a pipe).
    pub fn send(&mut self, text: &[u8]) {
        let s = self.stdin.as_mut().expect("stdin is a pipe");
        s.write_all(text).expect("write to morph86's stdin");
        s.flush().expect("flush morph86's stdin");
    }

    /// Closes stdin (the end of input).
    pub fn close_stdin(&mut self) {
        self.stdin = None;
    }

    /// Waits up to `timeout` for the process to end; `None` if it still runs.
    pub fn wait_exit(&mut self, timeout: Duration) -> Option<ExitStatus> {
        if self.status.is_some() {
            return self.status;
        }
        let end = Instant::now() + timeout;
        loop {
            if let Ok(Some(st)) = self.child.try_wait() {
                self.status = Some(st);
                // Let the reader threads take the last output.
                let until = Instant::now() + Duration::from_secs(2);
                while !lock(&self.stdout.out).eof && Instant::now() < until {
                    std::thread::sleep(Duration::from_millis(5));
                }
                return Some(st);
            }
            if Instant::now() >= end {
                return None;
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }

    /// Waits for the process to end and requires exit status 0.
    pub fn expect_success(&mut self, timeout: Duration) -> Result<(), String> {
        match self.wait_exit(timeout) {
            Some(st) if st.success() => Ok(()),
            Some(st) => Err(format!(
                "morph86 ended with {st}; last output:\n{}\nstderr:\n{}",
                self.tail(40),
                self.stderr_text()
            )),
            None => Err(format!(
                "morph86 still runs after {:.1} s; last output:\n{}",
                self.started.elapsed().as_secs_f64(),
                self.tail(40)
            )),
        }
    }

    /// Host CPU time (user + system) the process has used so far, from /proc.
    pub fn cpu_time(&self) -> Option<Duration> {
        let stat = std::fs::read_to_string(format!("/proc/{}/stat", self.pid())).ok()?;
        // Fields after the command name (which is in parentheses and may hold spaces).
        let rest = &stat[stat.rfind(')')? + 2..];
        let f: Vec<&str> = rest.split_whitespace().collect();
        let ticks: u64 = f.get(11)?.parse::<u64>().ok()? + f.get(12)?.parse::<u64>().ok()?;
        // SAFETY: sysconf only reads a system constant.
        let hz = unsafe { libc::sysconf(libc::_SC_CLK_TCK) }.max(1) as u64;
        Some(Duration::from_nanos(ticks * 1_000_000_000 / hz))
    }
}

impl Drop for Morph86 {
    fn drop(&mut self) {
        if self.status.is_none() {
            let _ = self.child.kill();
            let _ = self.child.wait();
        }
    }
}

/// The `CHECK name hash` lines of `text` for the workloads in `names`, in that order.
pub fn checks(text: &str, names: &[&str]) -> Vec<String> {
    names
        .iter()
        .filter_map(|n| text.lines().find_map(|l| check_line(l, n)))
        .collect()
}

/// `CHECK name hash` from one serial line, if it is `name`'s CHECK line. The hash is the
/// 64 hex digits after the name: the kernel may print a message of its own (a watchdog
/// warning, say) straight after them on the same console line, and that text is not part
/// of what the workload computed. A 63-digit hash, or a 65th hex digit, is no match.
pub fn check_line(line: &str, name: &str) -> Option<String> {
    let rest = line.trim().strip_prefix("CHECK ")?;
    let rest = rest.strip_prefix(name)?.strip_prefix(' ')?;
    let b = rest.as_bytes();
    let hex = b.iter().take_while(|c| c.is_ascii_hexdigit()).count();
    (hex == 64).then(|| format!("CHECK {name} {}", &rest[..64]))
}

/// A 64 KiB `-bios` image that prints `text` on COM1 (port 0x3f8) and then halts with
/// interrupts off for good: a guest that does nothing until the emulator is told to end.
pub fn halting_firmware(text: &[u8]) -> Vec<u8> {
    let mut img = vec![0xf4u8; 0x1_0000]; // HLT filler
    let mut code = vec![0xfa, 0xba, 0xf8, 0x03]; // cli; mov dx, 0x3f8
    for &b in text {
        code.extend_from_slice(&[0xb0, b, 0xee]); // mov al, b; out dx, al
    }
    code.extend_from_slice(&[0xf4, 0xeb, 0xfd]); // hlt; jmp back to the hlt
    img[..code.len()].copy_from_slice(&code);
    // Reset vector F000:FFF0: jmp far F000:0000.
    img[0xfff0..0xfff5].copy_from_slice(&[0xea, 0x00, 0x00, 0x00, 0xf0]);
    img
}

/// A unique path in the temporary directory for this test process.
pub fn temp_path(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("morph86-{}-{name}", std::process::id()))
}

/// A screenshot as (width, height, 0xRRGGBB pixels).
pub fn read_png(path: &Path) -> (usize, usize, Vec<u32>) {
    let dec = png::Decoder::new(std::fs::File::open(path).expect("open png"));
    let mut r = dec.read_info().expect("png header");
    let mut buf = vec![0; r.output_buffer_size()];
    let info = r.next_frame(&mut buf).expect("png data");
    let px = buf[..info.buffer_size()]
        .chunks(3)
        .map(|c| (c[0] as u32) << 16 | (c[1] as u32) << 8 | c[2] as u32)
        .collect();
    (info.width as usize, info.height as usize, px)
}
