//! The built-in demo, run as a user runs it: the `morph86` binary with no kernel.
//!
//! - headless, it walks through every stage and ends by itself with status 0;
//! - keys typed on the emulated keyboard (`--send-keys`) arrive in the guest, which echoes
//!   them on its serial port;
//! - its first frame (the text screen, once paging is on) matches a golden PNG and, checked
//!   independently, shows the colours its attributes name (standard VGA/EGA palette);
//! - the SDL window (SDL_VIDEODRIVER=offscreen) shows the same frame; under Xvfb, a run
//!   with no display arguments opens the window by itself.
//!
//! `MORPH86_BLESS=1 cargo test -p morph86 --test demo` rewrites the golden after a
//! deliberate change to the demo (look at the new PNG before committing it).

use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};

fn morph86() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_morph86"));
    c.stdin(Stdio::null());
    c.env_remove("DISPLAY");
    c.env_remove("WAYLAND_DISPLAY");
    c.env_remove("SDL_VIDEODRIVER");
    c
}

fn run(mut c: Command) -> Output {
    let out = c.output().expect("run morph86");
    if !out.status.success() {
        panic!(
            "morph86 failed: {:?}\nstdout:\n{}\nstderr:\n{}",
            out.status,
            String::from_utf8_lossy(&out.stdout),
            String::from_utf8_lossy(&out.stderr)
        );
    }
    out
}

fn tmp(name: &str) -> PathBuf {
    std::env::temp_dir().join(format!("morph86-{}-{name}", std::process::id()))
}

/// (width, height, 0xRRGGBB pixels)
fn read_png(path: &Path) -> (usize, usize, Vec<u32>) {
    let dec = png::Decoder::new(std::fs::File::open(path).expect("open png"));
    let mut r = dec.read_info().expect("png header");
    let mut buf = vec![0; r.output_buffer_size()];
    let info = r.next_frame(&mut buf).expect("png data");
    assert_eq!(info.color_type, png::ColorType::Rgb);
    let px = buf[..info.buffer_size()]
        .chunks(3)
        .map(|c| (c[0] as u32) << 16 | (c[1] as u32) << 8 | c[2] as u32)
        .collect();
    (info.width as usize, info.height as usize, px)
}

/// Instructions after which the demo's text screen is complete (it then waits in HLT).
const FIRST_FRAME_AT: &str = "30000";

fn golden() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR")).join("tests/golden/demo_first_frame.png")
}

fn check_first_frame(shot: &Path) {
    if std::env::var_os("MORPH86_BLESS").is_some() {
        std::fs::copy(shot, golden()).expect("bless golden");
    }
    let (w, h, px) = read_png(shot);
    // Mode 03h: 80x25 cells of 9x16 dots.
    assert_eq!((w, h), (720, 400));
    let at = |x: usize, y: usize| px[y * w + x];
    // Title line: attribute 0x1F, white on blue. Its first cell is a space: all blue.
    for y in 0..16 {
        for x in 0..9 {
            assert_eq!(at(x, y), 0x0000aa, "title background at ({x},{y})");
        }
    }
    let colours_in_row = |row: usize| {
        let mut c: Vec<u32> = (row * 16..row * 16 + 16)
            .flat_map(|y| (0..w).map(move |x| (x, y)))
            .map(|(x, y)| at(x, y))
            .collect();
        c.sort_unstable();
        c.dedup();
        c
    };
    assert_eq!(
        colours_in_row(0),
        vec![0x0000aa, 0xffffff],
        "title: white on blue"
    );
    // Text row 2 (attribute 0x0A): light green on black; row 4, written through the
    // paging alias 0xC00B8000 (attribute 0x0B): light cyan on black.
    assert_eq!(colours_in_row(2), vec![0, 0x55ff55]);
    assert_eq!(colours_in_row(3), vec![0, 0xffff55]);
    assert_eq!(colours_in_row(4), vec![0, 0x55ffff]);
    assert_eq!(colours_in_row(6), vec![0, 0xaaaaaa]);
    // And pixel for pixel the golden image.
    let (gw, gh, gpx) = read_png(&golden());
    assert_eq!((gw, gh), (w, h), "golden size");
    let diff = px.iter().zip(&gpx).filter(|(a, b)| a != b).count();
    assert_eq!(diff, 0, "{diff} pixels differ from {}", golden().display());
}

#[test]
fn headless_demo_runs_every_stage_and_exits_0() {
    let mut c = morph86();
    c.args(["-display", "none", "-serial", "stdio"]);
    let out = run(c);
    let s = String::from_utf8_lossy(&out.stdout);
    let mut at = 0;
    for marker in [
        "reset vector F000:FFF0, real mode",
        "demo: protected mode",
        "demo: paging on",
        "demo: VBE 640x480x32",
        "demo: done",
    ] {
        let p = s[at..]
            .find(marker)
            .unwrap_or_else(|| panic!("'{marker}' missing or out of order in:\n{s}"));
        at += p + marker.len();
    }
}

#[test]
fn keys_typed_on_the_emulated_keyboard_reach_the_guest() {
    let mut c = morph86();
    c.args([
        "-display",
        "none",
        "-serial",
        "stdio",
        "--send-keys",
        "morph 86",
    ]);
    let out = run(c);
    let s = String::from_utf8_lossy(&out.stdout);
    let keys: String = s
        .lines()
        .filter_map(|l| l.strip_prefix("demo: key "))
        .map(|k| k.chars().next().unwrap_or('?'))
        .collect();
    assert_eq!(keys, "morph 86", "serial output:\n{s}");
}

#[test]
fn first_frame_matches_the_golden_image() {
    let shot = tmp("first.png");
    let mut c = morph86();
    c.args(["-display", "none", "-serial", "none"]);
    c.args(["--max-instructions", FIRST_FRAME_AT, "--screenshot"]);
    c.arg(&shot);
    run(c);
    check_first_frame(&shot);
    std::fs::remove_file(&shot).ok();
}

#[cfg(feature = "sdl")]
#[test]
fn sdl_window_offscreen_shows_the_same_first_frame() {
    let shot = tmp("sdl.png");
    let mut c = morph86();
    c.env("SDL_VIDEODRIVER", "offscreen");
    c.args(["-display", "sdl", "-serial", "none"]);
    c.args(["--max-instructions", FIRST_FRAME_AT, "--screenshot"]);
    c.arg(&shot);
    run(c);
    check_first_frame(&shot);
    std::fs::remove_file(&shot).ok();
}

/// A fresh `cargo run --release` under an X server: no display arguments at all, so the
/// window opens because $DISPLAY is set. Skipped when Xvfb is not installed.
#[cfg(feature = "sdl")]
#[test]
fn under_xvfb_the_demo_opens_a_window_by_default() {
    let Ok(mut xvfb) = Command::new("Xvfb")
        .args([":97", "-screen", "0", "1024x768x24", "-nolisten", "tcp"])
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .spawn()
    else {
        eprintln!("Xvfb not installed: skipped");
        return;
    };
    std::thread::sleep(std::time::Duration::from_millis(1500));
    let shot = tmp("xvfb.png");
    let mut c = morph86();
    c.env("DISPLAY", ":97");
    c.args([
        "-serial",
        "none",
        "--max-instructions",
        FIRST_FRAME_AT,
        "--screenshot",
    ]);
    c.arg(&shot);
    let out = c.output().expect("run morph86");
    let _ = xvfb.kill();
    let _ = xvfb.wait();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    check_first_frame(&shot);
    std::fs::remove_file(&shot).ok();
}
