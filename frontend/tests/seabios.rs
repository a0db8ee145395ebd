//! Real PC firmware: Debian's SeaBIOS (`/usr/share/seabios/bios.bin`, package `seabios`)
//! runs on morph86 as on QEMU. It needs the i440FX PAM registers to shadow itself into
//! RAM, QEMU's fw_cfg device (RAM size, "nographic" for its serial console, the
//! "etc/boot-fail-wait" and "etc/e820" files) and the VGA BIOS behind the VGA card's
//! PCI ROM BAR. There are no disks, so it ends at "No bootable device." and waits.
//!
//! The oracle is QEMU itself: when `qemu-system-i386` is installed, the same firmware is
//! run there (`-nographic -nodefaults -serial stdio`, without the kvmvapic ROM) and the
//! serial console must show the same lines. The screen (`--screenshot`) must show the banner too, drawn in the
//! VGA font by SeaVGABIOS's text mode.
//!
//! Without the firmware file the tests say so and pass.

mod common;

use common::{morph86, read_png, temp_path, Morph86};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::Duration;

const BIOS: &str = "/usr/share/seabios/bios.bin";
const BANNER: &str = "SeaBIOS (version ";
const END: &str = "No bootable device.";
/// SeaBIOS reaches its end in about 6 M instructions (a second or two even in a debug
/// build); generous for a loaded machine.
const BOOT: Duration = Duration::from_secs(300);

fn bios() -> Option<&'static Path> {
    let p = Path::new(BIOS);
    if p.is_file() {
        Some(p)
    } else {
        eprintln!("skipped: {BIOS} is missing (apt-get install seabios)");
        None
    }
}

/// The serial output as lines of text: ANSI escape sequences (SeaBIOS's sercon clears the
/// terminal first) and carriage returns removed, blank lines kept.
fn text_lines(raw: &str) -> Vec<String> {
    let mut out = String::new();
    let mut chars = raw.chars().peekable();
    while let Some(c) = chars.next() {
        if c == '\x1b' {
            // ESC c, or ESC [ params final-byte.
            if chars.peek() == Some(&'[') {
                chars.next();
                for d in chars.by_ref() {
                    if d.is_ascii_alphabetic() {
                        break;
                    }
                }
            } else {
                chars.next();
            }
        } else if c != '\r' {
            out.push(c);
        }
    }
    out.lines().map(str::to_string).collect()
}

/// The firmware's console lines from the banner to "No bootable device.".
fn console_lines(raw: &str) -> Vec<String> {
    let lines = text_lines(raw);
    let first = lines.iter().position(|l| l.starts_with(BANNER));
    let last = lines.iter().position(|l| l == END);
    match (first, last) {
        (Some(a), Some(b)) if a <= b => lines[a..=b].to_vec(),
        _ => lines,
    }
}

/// Whether QEMU, the oracle, is there.
fn qemu_installed() -> bool {
    Command::new("qemu-system-i386")
        .arg("--version")
        .stdout(Stdio::null())
        .stderr(Stdio::null())
        .status()
        .is_ok_and(|s| s.success())
}

/// Runs QEMU with the same firmware until it prints "No bootable device." (at most 60 s).
fn qemu_lines(bios: &Path) -> Option<Vec<String>> {
    if !qemu_installed() {
        eprintln!("qemu-system-i386 is not installed: no comparison with QEMU");
        return None;
    }
    let mut c = Command::new("qemu-system-i386");
    // `vapic=off`: without it QEMU adds its kvmvapic.bin option ROM (a KVM TPR-patching
    // aid morph86 has no use for), which SeaBIOS, finding no PnP header, registers as a
    // boot (BCV) entry: QEMU then tries the hard disk before the floppy.
    c.args([
        "-nographic",
        "-nodefaults",
        "-serial",
        "stdio",
        "-no-reboot",
    ])
    .args(["-global", "apic-common.vapic=off"])
    .arg("-bios")
    .arg(bios);
    // The common harness collects stdout and kills the process when dropped.
    let mut q = Morph86::spawn(c);
    q.expect(END, Duration::from_secs(60)).ok()?;
    Some(console_lines(&q.text()))
}

/// Whether the 9x16 text cell at (`row`, `col`) of a `w`-pixel-wide screen has any
/// non-black pixel.
fn cell_inked(px: &[u32], w: usize, row: usize, col: usize) -> bool {
    (0..16).any(|y| (0..9).any(|x| px[(row * 16 + y) * w + col * 9 + x] != 0))
}

/// The screen as QEMU draws it for the same firmware (`-vga std`, no serial console
/// needed: SeaBIOS prints the same text on the VGA), taken with the monitor's
/// `screendump` once SeaBIOS's debug port says it is done: (width, height, 0xRRGGBB).
fn qemu_screen(bios: &Path) -> Option<(usize, usize, Vec<u32>)> {
    let log = temp_path("qemu-debugcon.txt");
    let ppm = temp_path("qemu-screen.ppm");
    let mut c = Command::new("qemu-system-i386");
    c.args([
        "-nodefaults",
        "-display",
        "none",
        "-vga",
        "std",
        "-no-reboot",
    ])
    .args(["-monitor", "stdio", "-global", "apic-common.vapic=off"])
    .arg("-chardev")
    .arg(format!("file,id=dbg,path={}", log.display()))
    .args(["-device", "isa-debugcon,iobase=0x402,chardev=dbg"])
    .arg("-bios")
    .arg(bios);
    let mut q = Morph86::spawn(c);
    let until = std::time::Instant::now() + Duration::from_secs(60);
    while !std::fs::read(&log).is_ok_and(|t| t.windows(END.len()).any(|w| w == END.as_bytes())) {
        if std::time::Instant::now() > until {
            return None;
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    q.send(format!("screendump {}\n", ppm.display()).as_bytes());
    let until = std::time::Instant::now() + Duration::from_secs(20);
    let data = loop {
        // P6, width, height, 255, then RGB triples.
        if let Ok(d) = std::fs::read(&ppm) {
            let mut fields = d.splitn(5, |b| b.is_ascii_whitespace());
            let (_, w, h) = (fields.next(), fields.next(), fields.next());
            let w: usize = std::str::from_utf8(w?).ok()?.parse().ok()?;
            let h: usize = std::str::from_utf8(h?).ok()?.parse().ok()?;
            let rgb = fields.nth(1)?;
            if rgb.len() >= w * h * 3 {
                let px = rgb
                    .chunks(3)
                    .take(w * h)
                    .map(|c| (c[0] as u32) << 16 | (c[1] as u32) << 8 | c[2] as u32)
                    .collect();
                break (w, h, px);
            }
        }
        if std::time::Instant::now() > until {
            return None;
        }
        std::thread::sleep(Duration::from_millis(100));
    };
    q.send(b"quit\n");
    std::fs::remove_file(&log).ok();
    std::fs::remove_file(&ppm).ok();
    Some(data)
}

/// Boots the firmware under `accel` to "No bootable device.", stops morph86 as Ctrl-C
/// would (which writes the screenshot) and returns (serial output, screenshot pixels).
fn boot(bios: &Path, accel: &str) -> (String, (usize, usize, Vec<u32>)) {
    let shot = temp_path(&format!("seabios-{accel}.png"));
    let mut c = morph86();
    c.arg("-bios")
        .arg(bios)
        .args(["-nographic", "-no-reboot", "-accel", accel])
        .arg("--screenshot")
        .arg(&shot);
    let mut vm = Morph86::spawn(c);
    if let Err(e) = vm.expect(END, BOOT) {
        panic!(
            "-accel {accel}: {e}\nserial:\n{}\nstderr:\n{}",
            vm.tail(40),
            vm.stderr_text()
        );
    }
    // SAFETY: kill only sends a signal to the child we started.
    assert_eq!(unsafe { libc::kill(vm.pid() as i32, libc::SIGINT) }, 0);
    vm.expect_success(Duration::from_secs(60)).unwrap();
    let png = read_png(&shot);
    std::fs::remove_file(&shot).ok();
    (vm.text(), png)
}

fn check_engine(accel: &str) {
    let Some(bios) = bios() else { return };
    let (serial, (w, h, px)) = boot(bios, accel);
    let ours = console_lines(&serial);
    assert!(
        ours.first().is_some_and(|l| l.starts_with(BANNER))
            && ours.last().is_some_and(|l| l == END),
        "-accel {accel}: no banner or no end on the serial console:\n{serial}"
    );
    if qemu_installed() {
        let theirs = qemu_lines(bios).expect("QEMU's serial console");
        assert_eq!(
            ours, theirs,
            "-accel {accel}: the serial console differs from QEMU's"
        );
    }
    // The screen: 80x25 text, the console lines from the top, each non-blank character
    // cell inked and each blank one black (independent of the font's glyphs).
    assert_eq!(
        (w, h),
        (720, 400),
        "-accel {accel}: 80x25 text with 9x16 cells"
    );
    for (row, line) in ours.iter().enumerate() {
        let line = line.as_bytes();
        for col in 0..80 {
            let ink = line.get(col).is_some_and(|c| *c != b' ');
            assert_eq!(
                cell_inked(&px, w, row, col),
                ink,
                "-accel {accel}: screen cell row {row} column {col} vs '{}'",
                String::from_utf8_lossy(line)
            );
        }
    }
    // And pixel for pixel as QEMU draws it (ink or not: QEMU scales the DAC's 6-bit
    // grey 2Ah to A8h, morph86 to AAh), down to the "No bootable device." row (the
    // blinking cursor below it may be in either phase).
    if qemu_installed() {
        let (qw, qh, qpx) = qemu_screen(bios).expect("QEMU's screendump");
        assert_eq!(
            (qw, qh),
            (w, h),
            "-accel {accel}: screen size differs from QEMU's"
        );
        let rows = ours.len() * 16 * w;
        let differ = (0..rows).filter(|&i| (px[i] != 0) != (qpx[i] != 0)).count();
        assert_eq!(
            differ, 0,
            "-accel {accel}: pixels differing from QEMU's screen"
        );
    }
}

#[test]
fn seabios_reaches_no_bootable_device_in_the_interpreter() {
    check_engine("interp");
}

#[test]
fn seabios_reaches_no_bootable_device_in_the_jit() {
    check_engine("jit");
}

/// A firmware file of a size no flash chip has: one error line, no guest.
#[test]
fn a_firmware_file_of_a_bad_size_is_refused_with_one_line() {
    let path = temp_path("bad-size.bin");
    std::fs::write(&path, vec![0x90u8; 1000]).unwrap();
    let out = morph86()
        .arg("-bios")
        .arg(&path)
        .args(["-nographic", "-no-reboot"])
        .stdin(Stdio::null())
        .output()
        .unwrap();
    std::fs::remove_file(&path).ok();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(err.trim_end().lines().count(), 1, "stderr:\n{err}");
    assert!(!err.contains("panicked"), "{err}");
}

/// A firmware-sized file of random bytes: the guest does whatever the bytes say (most
/// likely faults until it triple-faults), but morph86 neither panics nor hangs: with
/// -no-reboot a reset ends it, otherwise SIGINT does.
#[test]
fn garbage_firmware_is_the_guests_problem() {
    let path = temp_path("garbage.bin");
    let mut x = 0x2545_f491_4f6c_dd1du64;
    let img: Vec<u8> = (0..0x2_0000)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect();
    std::fs::write(&path, &img).unwrap();
    for accel in ["interp", "jit"] {
        let mut c = morph86();
        c.arg("-bios")
            .arg(&path)
            .args(["-nographic", "-no-reboot", "-accel", accel]);
        let mut vm = Morph86::spawn(c);
        if vm.wait_exit(Duration::from_secs(3)).is_none() {
            // SAFETY: kill only sends a signal to the child we started.
            assert_eq!(unsafe { libc::kill(vm.pid() as i32, libc::SIGINT) }, 0);
        }
        let st = vm.wait_exit(Duration::from_secs(30));
        let err = vm.stderr_text();
        assert!(st.is_some(), "-accel {accel}: morph86 did not stop");
        assert!(!err.contains("panicked"), "-accel {accel}: {err}");
        assert!(
            st.unwrap().code().is_some(),
            "-accel {accel}: killed by a signal"
        );
    }
    std::fs::remove_file(&path).ok();
}

/// QEMU's Linux loader ROM, which SeaBIOS runs from fw_cfg ("genroms/").
const LINUXBOOT: &str = "/usr/share/qemu/linuxboot_dma.bin";

/// `-bios` with `-kernel`: as on QEMU, the kernel, initrd and command line go to
/// SeaBIOS through fw_cfg and QEMU's linuxboot_dma.bin option ROM loads and starts them
/// (by fw_cfg DMA). Debian's kernel boots on SeaBIOS's E820 map and MP table, and the
/// sha256 workload's CHECK line equals the one the host computed (`expected-i386.txt`).
#[test]
#[cfg_attr(
    debug_assertions,
    ignore = "boots Linux: run with cargo test --release"
)]
fn linux_boots_through_seabios_and_fw_cfg() {
    let Some(bios) = bios() else { return };
    if !Path::new(LINUXBOOT).is_file() {
        eprintln!("skipped: {LINUXBOOT} is missing (apt-get install qemu-system-data)");
        return;
    }
    let Some(dir) =
        common::guest_files(&["vmlinuz-686", "bench-i386.cpio.gz", "expected-i386.txt"])
    else {
        return;
    };
    let want = common::checks(
        &std::fs::read_to_string(dir.join("expected-i386.txt")).unwrap(),
        &["sha256"],
    );
    assert_eq!(
        want.len(),
        1,
        "expected-i386.txt lacks the sha256 CHECK line"
    );
    let mut c = common::linux(
        &dir,
        "vmlinuz-686",
        "bench-i386.cpio.gz",
        "bench=sha256 check=1 reps=0",
    );
    c.arg("-bios").arg(bios);
    let mut vm = Morph86::spawn(c);
    vm.expect_success(Duration::from_secs(1800)).unwrap();
    let text = vm.text();
    let lines = text_lines(&text);
    assert!(lines.iter().any(|l| l.starts_with(BANNER)), "{text}");
    assert!(lines.iter().any(|l| l == "Booting from ROM..."), "{text}");
    assert!(
        text.contains("BIOS-e820: [mem 0x0000000000000000-0x000000000009fbff] usable"),
        "Linux did not take SeaBIOS's E820 map:\n{text}"
    );
    assert_eq!(common::checks(&text, &["sha256"]), want, "{text}");
    assert!(text.contains("GUEST-DONE"), "{text}");
}
