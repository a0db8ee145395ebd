//! The demo in a real window: `morph86 -display sdl` under an X server (Xvfb), checked
//! from outside the emulator, with X's own tools and X's own copy of the screen:
//!
//! - `xwininfo -root -tree` lists a top-level window titled "morph86 ..." whose size is
//!   the guest's mode (640x480 once the demo has switched to VBE);
//! - the X screen itself (Xvfb's `-fbdir` file, the screen in XWD format) shows, inside
//!   that window, what the demo draws there: its title in yellow (0xFFFF80) near the top
//!   and its "Keys:" label in light grey (0xC0C0C0) at y = 400 (`roms/demo/demo.asm`).
//!
//! Skipped, with a message, when Xvfb or xwininfo is not installed (Debian packages
//! `xvfb` and `x11-utils`) or morph86 was built without the `sdl` feature.

#![cfg(feature = "sdl")]

use std::path::{Path, PathBuf};
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};

/// Kills and reaps a child we started when dropped (also on a failed assertion).
struct Reaped(Child);

impl Drop for Reaped {
    fn drop(&mut self) {
        let _ = self.0.kill();
        let _ = self.0.wait();
    }
}

fn installed(tool: &str) -> bool {
    Command::new(tool)
        .arg("-version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok()
}

/// A display number nobody uses (no socket, no lock file).
fn free_display() -> Option<u32> {
    let pid = std::process::id();
    (0..200).map(|k| 100 + (pid + k) % 400).find(|n| {
        !Path::new(&format!("/tmp/.X11-unix/X{n}")).exists()
            && !Path::new(&format!("/tmp/.X{n}-lock")).exists()
    })
}

/// The X screen as Xvfb keeps it in `-fbdir` (XWD format): (width, height, pixels
/// 0xRRGGBB).
fn read_xwd(path: &Path) -> Option<(usize, usize, Vec<u32>)> {
    let b = std::fs::read(path).ok()?;
    let word = |i: usize| -> Option<u32> {
        Some(u32::from_be_bytes(
            b.get(i * 4..i * 4 + 4)?.try_into().ok()?,
        ))
    };
    // XWD header (X11 XWDFile.h): 25 CARD32 fields, then the window name.
    let header_size = word(0)? as usize;
    let (w, h) = (word(4)? as usize, word(5)? as usize);
    let byte_order = word(7)?; // 0 = LSBFirst
    let bpp = word(11)?;
    let line = word(12)? as usize;
    let (rm, gm, bm) = (word(14)?, word(15)?, word(16)?);
    let ncolors = word(19)? as usize;
    if bpp != 32 {
        return None;
    }
    let data = b.get(header_size + ncolors * 12..)?;
    let shift = |m: u32| m.trailing_zeros();
    let mut px = Vec::with_capacity(w * h);
    for y in 0..h {
        for x in 0..w {
            let o = y * line + x * 4;
            let raw: [u8; 4] = data.get(o..o + 4)?.try_into().ok()?;
            let v = if byte_order == 0 {
                u32::from_le_bytes(raw)
            } else {
                u32::from_be_bytes(raw)
            };
            let c = |m: u32| (v & m) >> shift(m);
            px.push(c(rm) << 16 | c(gm) << 8 | c(bm));
        }
    }
    Some((w, h, px))
}

/// Geometry (w, h, x, y) of the top-level window whose title starts with "morph86".
fn morph86_window(display: &str) -> Option<(usize, usize, usize, usize)> {
    let out = Command::new("xwininfo")
        .args(["-root", "-tree", "-display", display])
        .output()
        .ok()?;
    let text = String::from_utf8_lossy(&out.stdout);
    let line = text.lines().find(|l| l.contains("\"morph86"))?;
    // ... "morph86 - running - ...": ("morph86" "morph86")  640x480+192+144  +192+144
    let geo = line.split_whitespace().find(|t| {
        t.contains('x') && t.contains('+') && t.starts_with(|c: char| c.is_ascii_digit())
    })?;
    let abs = line.split_whitespace().last()?;
    let (size, _) = geo.split_once('+')?;
    let (w, h) = size.split_once('x')?;
    let mut xy = abs.trim_start_matches('+').split('+');
    let x = xy.next()?.parse().ok()?;
    let y = xy.next()?.parse().ok()?;
    Some((w.parse().ok()?, h.parse().ok()?, x, y))
}

/// Pixels of colour `c` in rows `rows` of the window at (wx, wy) of width `ww`.
fn count_in_window(
    screen: &(usize, usize, Vec<u32>),
    (ww, wx, wy): (usize, usize, usize),
    rows: std::ops::Range<usize>,
    c: u32,
) -> usize {
    let (sw, sh, px) = screen;
    rows.filter(|r| wy + r < *sh)
        .map(|r| {
            (0..ww)
                .filter(|x| wx + x < *sw && px[(wy + r) * sw + wx + x] == c)
                .count()
        })
        .sum()
}

#[test]
fn demo_window_appears_on_an_x_server_and_shows_the_demo() {
    if !installed("Xvfb") || !installed("xwininfo") {
        eprintln!("SKIPPED: Xvfb or xwininfo not installed (Debian packages xvfb, x11-utils)");
        return;
    }
    let Some(n) = free_display() else {
        eprintln!("SKIPPED: no free X display number");
        return;
    };
    let display = format!(":{n}");
    let fbdir: PathBuf = std::env::temp_dir().join(format!("morph86-xvfb-{}", std::process::id()));
    std::fs::create_dir_all(&fbdir).unwrap();
    let _xvfb = Reaped(
        Command::new("Xvfb")
            .arg(&display)
            .args(["-screen", "0", "1024x768x24", "-nolisten", "tcp", "-fbdir"])
            .arg(&fbdir)
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .expect("start Xvfb"),
    );
    let socket = PathBuf::from(format!("/tmp/.X11-unix/X{n}"));
    let t0 = Instant::now();
    while !socket.exists() {
        assert!(t0.elapsed() < Duration::from_secs(20), "Xvfb did not start");
        std::thread::sleep(Duration::from_millis(100));
    }
    let morph86 = Reaped(
        Command::new(env!("CARGO_BIN_EXE_morph86"))
            .env("DISPLAY", &display)
            .env_remove("WAYLAND_DISPLAY")
            .env_remove("SDL_VIDEODRIVER")
            .args(["-display", "sdl", "-serial", "none"])
            .stdin(Stdio::null())
            .stdout(Stdio::null())
            .stderr(Stdio::piped())
            .spawn()
            .expect("start morph86"),
    );
    let xwd = fbdir.join("Xvfb_screen0");
    let mut last = String::from("no morph86 window listed by xwininfo");
    let t0 = Instant::now();
    let found = loop {
        if t0.elapsed() > Duration::from_secs(60) {
            break false;
        }
        std::thread::sleep(Duration::from_millis(500));
        let Some((w, h, x, y)) = morph86_window(&display) else {
            continue;
        };
        last = format!("window {w}x{h}+{x}+{y}");
        if (w, h) != (640, 480) {
            continue; // still the text screen
        }
        let Some(screen) = read_xwd(&xwd) else {
            last.push_str(", X screen unreadable");
            continue;
        };
        let title = count_in_window(&screen, (w, x, y), 16..32, 0xffff80);
        let help = count_in_window(&screen, (w, x, y), 400..416, 0xc0c0c0);
        last = format!("window {w}x{h}+{x}+{y}: {title} title pixels, {help} help pixels");
        if title > 500 && help > 50 {
            break true;
        }
    };
    drop(morph86);
    std::fs::remove_dir_all(&fbdir).ok();
    assert!(
        found,
        "the X screen never showed the demo in a morph86 window ({last})"
    );
}
