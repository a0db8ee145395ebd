//! Linux's console on the emulated screen down to the shell prompt: Debian's i386 kernel
//! booted directly (no BIOS), with the busybox initramfs ending in a shell on the console
//! (`shell=1`, `console=tty0` last so /dev/console is the screen):
//!
//! - `vga=0x312`: `boot_params.screen_info` describes the VBE linear framebuffer
//!   (640x480x32 at BAR0), the kernel's vesafb driver takes it and fbcon draws 80x30
//!   cells of 8x16 on it;
//! - no `vga=`: screen_info describes 80x25 VGA text and vgacon draws in text mode;
//! - no `vga=` and `modules=bochs`: the bochs DRM driver takes the card over from vgacon
//!   before the shell starts, and fbcon shows the console on its 1024x768 framebuffer.
//!
//! Either way the screenshot must show, from top to bottom: kernel log lines (printk
//! timestamps), the init script's `GUEST-READY` line (user space writing to the
//! console), busybox's banner and help line, and its `/ # ` prompt on the last line
//! written. In text mode the characters are morph86's own font (vgacon keeps the font
//! the "BIOS" loaded), light grey on black; on the framebuffer fbcon draws with the
//! kernel's font, so the expected pixels come from QEMU's screen showing the same lines
//! (`tests/golden/linux_fbcon_rows_qemu.png`, see [`fbcon_golden`]).
//!
//! The machine is stopped the way a user stops it, with Ctrl-A x on the serial console,
//! a few seconds after the kernel has started /init. The guests live in
//! `$MORPH86_GUESTS`, else `~/.cache/morph86/guests` (helpers in `common`); when absent
//! the test says so and passes. A debug build skips the boots.

mod common;

use common::{guest_files, linux, read_png, temp_path, Morph86};
use morph86_devices::vga::font::FONT_8X16;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// A text screen in a screenshot: cells of `cw` x 16 pixels, glyphs 8 wide.
struct Screen {
    w: usize,
    h: usize,
    px: Vec<u32>,
    cw: usize,
    shot: PathBuf,
}

impl Screen {
    fn rows(&self) -> usize {
        self.h / 16
    }

    fn shows_at(&self, row: usize, c0: usize, text: &[u8]) -> bool {
        text.iter().enumerate().all(|(i, &ch)| {
            (0..16).all(|y| {
                let bits = FONT_8X16[ch as usize * 16 + y];
                (0..8).all(|x| {
                    let p = self.px[(row * 16 + y) * self.w + (c0 + i) * self.cw + x];
                    p == if bits & (0x80 >> x) != 0 { 0xaaaaaa } else { 0 }
                })
            })
        })
    }

    /// The last row with anything but black on it.
    fn last_used_row(&self) -> Option<usize> {
        (0..self.rows()).rev().find(|&r| {
            self.px[r * 16 * self.w..(r + 1) * 16 * self.w]
                .iter()
                .any(|&p| p != 0)
        })
    }
}

/// Boots the kernel and `initrd` with `append` (plus the shell arguments), stops it with
/// Ctrl-A x once the serial console has been quiet a while after /init started, and
/// returns the serial output and the screenshot. `None` when the guest files are missing.
fn boot_to_shell(initrd: &str, append: &str) -> Option<(String, Screen)> {
    let dir = guest_files(&["vmlinuz-686", initrd])?;
    let shot = temp_path(&format!("shell-{}-{}.png", initrd.len(), append.len()));
    // console=tty0 last: /dev/console, where the shell runs, is the screen.
    let mut c = linux(
        &dir,
        "vmlinuz-686",
        initrd,
        &format!("{append} console=tty0 shell=1"),
    );
    c.args(["-accel", "jit", "--screenshot"]).arg(&shot);
    let mut m = Morph86::spawn(c);
    if let Err(e) = m.expect("Run /init as init process", Duration::from_secs(600)) {
        panic!("the kernel never started /init: {e}");
    }
    // The init script (and the drivers it loads) and the shell need a moment: wait at
    // least 8 s, and until the kernel has been quiet on the serial port for 3 s (at most
    // two minutes), so a loaded machine gets more time.
    let t = Instant::now();
    let (mut len, mut since) = (0, Instant::now());
    while t.elapsed() < Duration::from_secs(120) {
        let n = m.text().len();
        if n != len {
            (len, since) = (n, Instant::now());
        } else if t.elapsed() >= Duration::from_secs(8) && since.elapsed() >= Duration::from_secs(3)
        {
            break;
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    m.send(b"\x01x");
    if let Err(e) = m.expect_success(Duration::from_secs(60)) {
        panic!("Ctrl-A x did not end the run cleanly: {e}");
    }
    let serial = m.text();
    let (w, h, px) = read_png(&shot);
    // Kept for a look when a check fails; removed when they pass.
    eprintln!("screenshot: {}", shot.display());
    let cw = if (w, h) == (720, 400) { 9 } else { 8 };
    Some((serial, Screen { w, h, px, cw, shot }))
}

/// What the console must show, in order from top to bottom.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Line {
    /// A kernel log line: its printk timestamp opens with "[   ".
    Kernel,
    /// The init script's "GUEST-READY ..." line.
    GuestReady,
    /// Busybox's banner, "BusyBox v1.35.0 (Debian 1:1.35.0-4+deb12u1+b1) built-in shell (ash)".
    BusyBox,
    /// "Enter 'help' for a list of built-in commands."
    Help,
    /// The prompt, "/ # ".
    Prompt,
}

const LINES: [Line; 5] = [
    Line::Kernel,
    Line::GuestReady,
    Line::BusyBox,
    Line::Help,
    Line::Prompt,
];

/// The same lines as QEMU's screen showed them, as a strip of 16-pixel rows in the order
/// of [`LINES`], each kept for the cells that do not change from boot to boot (see
/// [`fbcon_golden`]).
struct Golden {
    w: usize,
    px: Vec<u32>,
    cells: [usize; 5],
}

/// The fbcon lines from QEMU 7.2 (`qemu-system-i386 -vga std`, same kernel, initramfs
/// and arguments, `screendump` in the monitor once the prompt was up): rows 0, 22, 26,
/// 27 and 29 of its 80x30 console, cut to their first 4, 12, 80, 80 and 4 cells (the
/// rest, timestamps and the blinking cursor, blanked). fbcon draws with the kernel's own
/// font, so equal text gives equal pixels on any correct framebuffer.
fn fbcon_golden() -> Golden {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/linux_fbcon_rows_qemu.png");
    let (w, h, px) = read_png(&path);
    assert_eq!((w, h), (640, 80), "{}", path.display());
    Golden {
        w,
        px,
        cells: [4, 12, 80, 80, 4],
    }
}

impl Screen {
    /// Whether row `row` holds `line`: with `golden`, the golden's cells for it pixel
    /// for pixel; else (VGA text) the text in morph86's font.
    fn is(&self, row: usize, line: Line, golden: Option<&Golden>) -> bool {
        let k = LINES.iter().position(|l| *l == line).unwrap();
        match golden {
            Some(g) => (0..16).all(|y| {
                let n = g.cells[k] * 8;
                let ours = &self.px[(row * 16 + y) * self.w..][..n];
                let theirs = &g.px[(k * 16 + y) * g.w..][..n];
                ours == theirs
            }),
            None => {
                let text: &[u8] = match line {
                    Line::Kernel => b"[   ",
                    Line::GuestReady => b"GUEST-READY ",
                    Line::BusyBox => {
                        b"BusyBox v1.35.0 (Debian 1:1.35.0-4+deb12u1+b1) built-in shell (ash)"
                    }
                    Line::Help => b"Enter 'help' for a list of built-in commands.",
                    Line::Prompt => b"/ # ",
                };
                self.shows_at(row, 0, text)
            }
        }
    }
}

/// The checks common to both consoles: kernel log, then user space's output, then the
/// shell's banner and its prompt on the last line written.
fn check_console(serial: &str, s: &Screen, golden: Option<&Golden>) {
    let find = |line: Line| (0..s.rows()).find(|&r| s.is(r, line, golden));
    let ready = find(Line::GuestReady)
        .unwrap_or_else(|| panic!("no GUEST-READY line on the screen {}", s.shot.display()));
    // The kernel's log above it (which lines depends on how far the console scrolled).
    let log_rows = (0..ready)
        .filter(|&r| s.is(r, Line::Kernel, golden))
        .count();
    assert!(
        log_rows >= 5,
        "only {log_rows} kernel log lines above GUEST-READY on the screen {}:\n{serial}",
        s.shot.display()
    );
    let banner = find(Line::BusyBox)
        .unwrap_or_else(|| panic!("no busybox banner on the screen {}", s.shot.display()));
    assert!(
        banner > ready,
        "the shell's banner must follow the init script's output"
    );
    assert!(
        s.is(banner + 1, Line::Help, golden),
        "no help line under the banner"
    );
    let last = s.last_used_row().unwrap();
    assert!(
        last > banner + 1 && s.is(last, Line::Prompt, golden),
        "the last line written (row {last}) is not busybox's '/ # ' prompt (screen {})",
        s.shot.display()
    );
    std::fs::remove_file(&s.shot).ok();
}

#[test]
#[cfg_attr(
    debug_assertions,
    ignore = "boots Linux: run with cargo test --release"
)]
fn debian_686_vesafb_console_shows_the_boot_log_and_a_shell_prompt() {
    let Some((serial, s)) = boot_to_shell("boot-i386.cpio.gz", "vga=0x312") else {
        return;
    };
    for line in [
        "vesafb: mode is 640x480x32, linelength=2560",
        "vesafb: framebuffer at 0xe0000000",
        "fb0: VESA VGA frame buffer device",
        "Console: switching to colour frame buffer device 80x30",
    ] {
        assert!(serial.contains(line), "'{line}' missing:\n{serial}");
    }
    assert_eq!((s.w, s.h), (640, 480), "the vga=0x312 framebuffer");
    check_console(&serial, &s, Some(&fbcon_golden()));
}

#[test]
#[cfg_attr(
    debug_assertions,
    ignore = "boots Linux: run with cargo test --release"
)]
fn debian_686_vgacon_console_shows_the_boot_log_and_a_shell_prompt() {
    let Some((serial, s)) = boot_to_shell("boot-i386.cpio.gz", "") else {
        return;
    };
    assert!(
        serial.contains("Console: colour VGA+ 80x25"),
        "vgacon did not take the screen:\n{serial}"
    );
    assert_eq!((s.w, s.h), (720, 400), "80x25 text with 9x16 cells");
    check_console(&serial, &s, None);
}

#[test]
#[cfg_attr(
    debug_assertions,
    ignore = "boots Linux: run with cargo test --release"
)]
fn debian_686_bochs_drm_console_shows_the_boot_log_and_a_shell_prompt() {
    // vgacon first; the init script loads the bochs DRM driver before the shell, and
    // fbcon takes the console over onto its 1024x768 framebuffer with what it showed.
    let Some((serial, s)) = boot_to_shell("mods-i386.cpio.gz", "modules=bochs") else {
        return;
    };
    for line in [
        "[drm] Found bochs VGA, ID 0xb0c5",
        "Console: switching to colour frame buffer device 128x48",
    ] {
        assert!(serial.contains(line), "'{line}' missing:\n{serial}");
    }
    assert_eq!((s.w, s.h), (1024, 768), "the bochs DRM mode");
    check_console(&serial, &s, Some(&fbcon_golden()));
}
