//! Linux on the emulated VGA: Debian's i386 kernel booted directly with
//! `boot_params.screen_info` describing 80x25 VGA text, so its console driver vgacon
//! takes the screen. At the end the screen must show, in the VGA's own font, the last
//! line the kernel printed on the serial port (an expectation independent of the VGA
//! path: the serial log says what the text is, the font says what its pixels are).
//!
//! A second boot loads the kernel's bochs DRM driver (`modules=bochs`), which finds the
//! VGA as PCI 1234:1111, programs the Bochs VBE registers and puts the fbcon console on
//! the linear framebuffer: the screen must then be that framebuffer (1024x768) with the
//! console's light grey text on black.
//!
//! The guests live in `$MORPH86_GUESTS`, else `~/.cache/morph86/guests`; when absent the
//! test says so and passes. The boot takes minutes in the interpreter, so a debug build
//! skips it.

mod common;

use common::{guest_files, morph86, read_png, temp_path, Morph86};
use morph86_devices::vga::font::FONT_8X16;
use std::path::Path;
use std::time::Duration;

/// A boot with a screenshot at the end: minutes in the interpreter on a loaded host.
const BOOT: Duration = Duration::from_secs(3600);

/// Boots `kernel` + `initrd` with `append` and `extra` options (e.g. `-accel jit`), no
/// window, the serial console on stdout and a screenshot to `shot` when the machine
/// stops; returns the serial output.
fn boot_with_screenshot(
    dir: &Path,
    kernel: &str,
    initrd: &str,
    append: &str,
    shot: &Path,
    extra: &[&str],
) -> String {
    let mut c = morph86();
    c.args([
        "-m",
        "256",
        "-display",
        "none",
        "-serial",
        "stdio",
        "-no-reboot",
    ])
    .arg("-kernel")
    .arg(dir.join(kernel))
    .arg("-initrd")
    .arg(dir.join(initrd))
    .arg("-append")
    .arg(append)
    .arg("--screenshot")
    .arg(shot)
    .args(extra);
    let mut vm = Morph86::spawn(c);
    vm.expect_success(BOOT).unwrap();
    vm.text()
}

/// Whether `text` appears on text row `row` of a 9x16-cell screen, drawn in light grey
/// (0xAAAAAA) on black with the glyphs of `FONT_8X16`.
fn row_shows(px: &[u32], w: usize, row: usize, text: &[u8]) -> bool {
    let cols = w / 9;
    (0..=cols.saturating_sub(text.len())).any(|c0| {
        text.iter().enumerate().all(|(i, &ch)| {
            (0..16).all(|y| {
                let bits = FONT_8X16[ch as usize * 16 + y];
                (0..8).all(|x| {
                    let p = px[(row * 16 + y) * w + (c0 + i) * 9 + x];
                    let on = bits & (0x80 >> x) != 0;
                    p == if on { 0xaaaaaa } else { 0 }
                })
            })
        })
    })
}

#[test]
#[cfg_attr(
    debug_assertions,
    ignore = "boots Linux in the interpreter: run with cargo test --release"
)]
fn debian_686_vgacon_draws_the_kernel_log_on_the_vga() {
    let Some(dir) = guest_files(&["vmlinuz-686", "boot-i386.cpio.gz"]) else {
        return;
    };
    let shot = temp_path("vgacon.png");
    let serial = boot_with_screenshot(
        &dir,
        "vmlinuz-686",
        "boot-i386.cpio.gz",
        "console=tty0 console=ttyS0 cryptomgr.notests",
        &shot,
        &[],
    );
    assert!(
        serial.contains("Console: colour VGA+ 80x25"),
        "vgacon did not take the screen:\n{serial}"
    );
    assert!(
        serial.contains("GUEST-DONE"),
        "the guest did not finish:\n{serial}"
    );
    let (w, h, px) = read_png(&shot);
    std::fs::remove_file(&shot).ok();
    assert_eq!((w, h), (720, 400), "80x25 text with 9x16 cells");
    // The kernel's last words, as the serial port saw them, are on the screen too.
    let last = b"reboot: machine restart";
    assert!(
        (0..25).any(|row| row_shows(&px, w, row, last)),
        "the screen does not show '{}'",
        String::from_utf8_lossy(last)
    );
    // And the line before it.
    assert!((0..25).any(|row| row_shows(&px, w, row, b"reboot: Restarting system")));
}

#[test]
#[cfg_attr(
    debug_assertions,
    ignore = "boots Linux in the interpreter: run with cargo test --release"
)]
fn debian_686_bochs_drm_puts_fbcon_on_the_vbe_framebuffer() {
    let Some(dir) = guest_files(&["vmlinuz-686", "mods-i386.cpio.gz"]) else {
        return;
    };
    let shot = temp_path("bochs.png");
    let serial = boot_with_screenshot(
        &dir,
        "vmlinuz-686",
        "mods-i386.cpio.gz",
        "console=tty0 console=ttyS0 cryptomgr.notests modules=bochs",
        &shot,
        &[],
    );
    for line in [
        "[drm] Found bochs VGA, ID 0xb0c5",
        "Console: switching to colour frame buffer device 128x48",
        "MODULE-LOADED bochs",
    ] {
        assert!(serial.contains(line), "'{line}' missing:\n{serial}");
    }
    let (w, h, px) = read_png(&shot);
    std::fs::remove_file(&shot).ok();
    assert_eq!(
        (w, h),
        (1024, 768),
        "the bochs DRM mode, 128x48 cells of 8x16"
    );
    // fbcon's text: light grey on black, and plenty of it.
    let grey = px.iter().filter(|&&p| p == 0xaaaaaa).count();
    let black = px.iter().filter(|&&p| p == 0).count();
    assert_eq!(grey + black, px.len(), "only console colours");
    assert!(
        grey > 10_000,
        "too little text on the framebuffer: {grey} pixels"
    );
}
