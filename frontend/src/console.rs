//! The terminal as the guest's serial console: raw mode while the guest runs (restored
//! on exit, also after a panic), and QEMU's escape keys: Ctrl-A x quits, Ctrl-A Ctrl-A
//! sends a Ctrl-A to the guest, Ctrl-A h prints help.
//!
//! As with QEMU's `-nographic` (its multiplexed `mon:stdio`), the escapes work whatever
//! stdin is: a terminal or a pipe (`printf '\001x' | morph86 ...` ends the run). The end
//! of input differs: on a terminal it means the terminal went away, and the run ends;
//! on a pipe or file the guest keeps running with no more input, as under QEMU.

use std::io::{Read, Write};

/// Puts the terminal into raw mode for as long as it lives.
pub struct RawMode {
    saved: Option<libc::termios>,
}

impl RawMode {
    /// Raw mode on stdin if it is a terminal; a no-op otherwise.
    pub fn enable() -> RawMode {
        // SAFETY: isatty only inspects the descriptor.
        if unsafe { libc::isatty(0) } != 1 {
            return RawMode { saved: None };
        }
        // SAFETY: termios is plain old data; tcgetattr fills it and reports failure.
        let mut t: libc::termios = unsafe { std::mem::zeroed() };
        // SAFETY: valid pointer to a termios we own.
        if unsafe { libc::tcgetattr(0, &mut t) } != 0 {
            return RawMode { saved: None };
        }
        let saved = t;
        // SAFETY: cfmakeraw only edits the struct we pass.
        unsafe { libc::cfmakeraw(&mut t) };
        // Keep output post-processing so the host's newlines still work for our own messages.
        t.c_oflag |= libc::OPOST;
        // SAFETY: valid termios for fd 0.
        unsafe { libc::tcsetattr(0, libc::TCSANOW, &t) };
        RawMode { saved: Some(saved) }
    }
}

impl Drop for RawMode {
    fn drop(&mut self) {
        if let Some(t) = self.saved {
            // SAFETY: restores the attributes read in `enable` on the same descriptor.
            unsafe { libc::tcsetattr(0, libc::TCSANOW, &t) };
        }
    }
}

/// The escape character (Ctrl-A), as in QEMU.
pub const ESCAPE: u8 = 0x01;

/// What one chunk of input means once the escapes are taken out.
#[derive(Debug, Default, PartialEq, Eq)]
pub struct Decoded {
    /// Bytes for the guest, in order.
    pub guest: Vec<u8>,
    /// Ctrl-A x was typed: the bytes after it are dropped.
    pub quit: bool,
    /// Ctrl-A h was typed: print the help.
    pub help: bool,
}

/// The escape-key state machine: remembers a Ctrl-A that ended the previous chunk.
#[derive(Debug, Default)]
pub struct Escapes {
    after_escape: bool,
}

impl Escapes {
    /// Splits `input` into guest bytes and escape commands. An unknown key after Ctrl-A
    /// is dropped with the Ctrl-A, as QEMU does.
    pub fn decode(&mut self, input: &[u8]) -> Decoded {
        let mut d = Decoded::default();
        for &b in input {
            if self.after_escape {
                self.after_escape = false;
                match b {
                    b'x' | b'X' => {
                        d.quit = true;
                        return d;
                    }
                    ESCAPE => d.guest.push(ESCAPE),
                    b'h' | b'H' | b'?' => d.help = true,
                    _ => {}
                }
            } else if b == ESCAPE {
                self.after_escape = true;
            } else {
                d.guest.push(b);
            }
        }
        d
    }
}

/// Reads stdin on its own thread: bytes for the guest go to `on_byte`, Ctrl-A x calls
/// `on_quit` (see [`Escapes`]). The end of input calls `on_quit` only when
/// `quit_at_eof` (stdin is a terminal); otherwise the reader just stops.
pub fn spawn_reader<B, Q>(on_byte: B, on_quit: Q, quit_at_eof: bool) -> std::io::Result<()>
where
    B: Fn(&[u8]) + Send + 'static,
    Q: Fn() + Send + 'static,
{
    std::thread::Builder::new()
        .name("stdin".into())
        .spawn(move || {
            let mut stdin = std::io::stdin();
            let mut buf = [0u8; 256];
            let mut esc = Escapes::default();
            loop {
                let n = match stdin.read(&mut buf) {
                    Ok(0) => {
                        if quit_at_eof {
                            on_quit();
                        }
                        return;
                    }
                    Err(e) if e.kind() == std::io::ErrorKind::Interrupted => continue,
                    Err(e) => {
                        log::warn!("console: reading stdin failed: {e}");
                        if quit_at_eof {
                            on_quit();
                        }
                        return;
                    }
                    Ok(n) => n,
                };
                let d = esc.decode(&buf[..n]);
                if !d.guest.is_empty() {
                    on_byte(&d.guest);
                }
                if d.help {
                    let mut e = std::io::stderr();
                    let _ = write!(
                        e,
                        "\r\nC-a h    print this help\r\nC-a x    exit morph86\r\nC-a C-a  send C-a\r\n"
                    );
                }
                if d.quit {
                    on_quit();
                    return;
                }
            }
        })?;
    Ok(())
}

/// The signals that end a run cleanly (terminal mode restored, `--screenshot` written,
/// `--stats` printed), as QEMU ends on them: SIGINT, SIGTERM, SIGHUP.
const TERMINATION: [libc::c_int; 3] = [libc::SIGINT, libc::SIGTERM, libc::SIGHUP];

/// Blocks the termination signals in the calling thread and every thread it starts
/// afterwards (call it before starting any), and starts a thread that takes them with
/// `sigwait` and calls `on_signal`, so the machine stops the way Ctrl-A x stops it. A
/// second signal ends the process at once (status 128 + signal), for a run that does
/// not stop.
pub fn catch_termination<F>(on_signal: F) -> std::io::Result<()>
where
    F: Fn() + Send + 'static,
{
    // SAFETY: sigset_t is plain data; sigemptyset initialises it before any other use.
    let mut set: libc::sigset_t = unsafe { std::mem::zeroed() };
    // SAFETY: `set` is a valid sigset_t we own; the signal numbers are valid.
    unsafe {
        libc::sigemptyset(&mut set);
        for s in TERMINATION {
            libc::sigaddset(&mut set, s);
        }
    }
    // SAFETY: changes only this thread's signal mask, from a valid set.
    let r = unsafe { libc::pthread_sigmask(libc::SIG_BLOCK, &set, std::ptr::null_mut()) };
    if r != 0 {
        return Err(std::io::Error::from_raw_os_error(r));
    }
    std::thread::Builder::new()
        .name("signals".into())
        .spawn(move || {
            let mut first = true;
            loop {
                let mut sig: libc::c_int = 0;
                // SAFETY: `set` stays valid for the thread's life; sigwait writes `sig`.
                if unsafe { libc::sigwait(&set, &mut sig) } != 0 {
                    return;
                }
                if first {
                    eprintln!("\r\nmorph86: terminating on signal {sig}\r");
                    first = false;
                    on_signal();
                } else {
                    std::process::exit(128 + sig);
                }
            }
        })?;
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn plain_bytes_pass_through() {
        let mut e = Escapes::default();
        let d = e.decode(b"ls -l\r");
        assert_eq!(d.guest, b"ls -l\r");
        assert!(!d.quit && !d.help);
    }

    #[test]
    fn ctrl_a_x_quits_and_drops_the_rest() {
        let mut e = Escapes::default();
        let d = e.decode(b"ab\x01xcd");
        assert_eq!(d.guest, b"ab");
        assert!(d.quit);
        let d = e.decode(b"\x01X");
        assert!(d.quit, "upper case X too");
    }

    #[test]
    fn escape_split_across_reads() {
        let mut e = Escapes::default();
        let d = e.decode(b"a\x01");
        assert_eq!(d.guest, b"a");
        assert!(!d.quit);
        let d = e.decode(b"x");
        assert!(d.quit && d.guest.is_empty());
    }

    #[test]
    fn double_ctrl_a_sends_one_and_unknown_keys_vanish() {
        let mut e = Escapes::default();
        let d = e.decode(b"\x01\x01\x01zq\x01h");
        assert_eq!(d.guest, b"\x01q");
        assert!(d.help && !d.quit);
    }
}
