//! The terminal as the guest's serial console: raw mode while the guest runs (restored
//! on exit, also after a panic), and QEMU's escape keys: Ctrl-A x quits, Ctrl-A Ctrl-A
//! sends a Ctrl-A to the guest, Ctrl-A h prints help.

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

/// Reads stdin on its own thread, handling the Ctrl-A escapes: bytes for the guest go
/// to `on_byte`, Ctrl-A x (or, with escapes on, the end of input) calls `on_quit`. With
/// `escapes` off (stdin not a terminal) bytes pass through untouched.
pub fn spawn_reader<B, Q>(on_byte: B, on_quit: Q, escapes: bool) -> std::io::Result<()>
where
    B: Fn(&[u8]) + Send + 'static,
    Q: Fn() + Send + 'static,
{
    std::thread::Builder::new()
        .name("stdin".into())
        .spawn(move || {
            let mut stdin = std::io::stdin();
            let mut buf = [0u8; 256];
            let mut out = Vec::with_capacity(256);
            let mut ctrl_a = false;
            loop {
                let n = match stdin.read(&mut buf) {
                    Ok(0) | Err(_) => {
                        if escapes {
                            on_quit();
                        }
                        return;
                    }
                    Ok(n) => n,
                };
                out.clear();
                for &b in &buf[..n] {
                    if escapes && ctrl_a {
                        ctrl_a = false;
                        match b {
                            b'x' | b'X' => {
                                on_byte(&out);
                                on_quit();
                                return;
                            }
                            0x01 => out.push(0x01),
                            b'h' | b'H' => {
                                let mut e = std::io::stderr();
                                let _ =
                                    write!(e, "\r\nC-a x    exit morph86\r\nC-a C-a  send C-a\r\n");
                            }
                            _ => {}
                        }
                    } else if escapes && b == 0x01 {
                        ctrl_a = true;
                    } else {
                        out.push(b);
                    }
                }
                if !out.is_empty() {
                    on_byte(&out);
                }
            }
        })?;
    Ok(())
}
