//! The terminal side of the PC platform, as a user meets it:
//!
//! - `shell=1`: Debian's i386 kernel with the busybox initramfs ends in an interactive
//!   shell on the serial console; commands typed on morph86's stdin run in the guest, and
//!   `reboot -f` under `-no-reboot` ends the run with status 0. An idle guest at the
//!   prompt costs the host little CPU (HLT sleeps until the next timer).
//! - Guest time follows the host clock: `/proc/uptime` across a `sleep 5` advances as
//!   much as the host's wall clock does for the same interval (within 10%).
//! - `-serial file:PATH -display none` writes the whole boot log to the file.
//! - Ctrl-A x ends the run at once with status 0, from a terminal (which gets its mode
//!   back) and, as with QEMU's `-nographic`, from a pipe. The end of input on a pipe does
//!   not end the run (QEMU's stdio back end behaves the same).
//!
//! The Linux tests use `-accel jit` (a boot to the prompt takes seconds) and need the
//! guests in `$MORPH86_GUESTS` or `~/.cache/morph86/guests` (else they say SKIPPED and
//! pass); a debug build skips them. The Ctrl-A tests use a tiny firmware and always run.

mod common;

use common::{guest_files, halting_firmware, linux, morph86, temp_path, Morph86};
use std::time::{Duration, Instant};

/// Boot to the shell prompt under the JIT: seconds normally, minutes on a loaded host.
const BOOT: Duration = Duration::from_secs(600);
/// A command's answer.
const ANSWER: Duration = Duration::from_secs(60);

const KERNEL: &str = "vmlinuz-686";
const INITRD: &str = "boot-i386.cpio.gz";

/// Boots to the busybox prompt (`/ # `) with `shell=1`.
fn boot_to_shell() -> Option<Morph86> {
    let dir = guest_files(&[KERNEL, INITRD])?;
    let mut c = linux(&dir, KERNEL, INITRD, "shell=1");
    c.args(["-accel", "jit"]);
    let mut vm = Morph86::spawn(c);
    vm.expect_prefix("GUEST-DONE", BOOT).unwrap();
    vm.expect("/ # ", ANSWER).unwrap();
    Some(vm)
}

/// Types `cmd` and a newline, and returns the first output line for which `pred` holds.
fn run(vm: &mut Morph86, cmd: &str, what: &str, pred: impl Fn(&str) -> bool) -> common::Line {
    vm.send(format!("{cmd}\n").as_bytes());
    vm.expect_line(what, ANSWER, pred).unwrap()
}

#[test]
#[cfg_attr(
    debug_assertions,
    ignore = "boots Linux: run with cargo test --release"
)]
fn shell_runs_typed_commands_idles_cheaply_and_reboot_ends_the_run() {
    let Some(mut vm) = boot_to_shell() else {
        return;
    };
    run(&mut vm, "echo $((6*7))", "42", |l| l == "42");
    run(&mut vm, "uname -m", "i686", |l| l == "i686");

    // At the prompt the guest idles in HLT; the vCPU thread sleeps until the next timer
    // interrupt. Linux (NO_HZ) then wakes rarely: the process should use a few percent.
    std::thread::sleep(Duration::from_secs(1));
    let (c0, t0) = (vm.cpu_time().unwrap(), Instant::now());
    std::thread::sleep(Duration::from_secs(5));
    let (c1, t1) = (vm.cpu_time().unwrap(), Instant::now());
    let share = (c1 - c0).as_secs_f64() / (t1 - t0).as_secs_f64();
    eprintln!(
        "idle guest at the prompt: {:.1}% of one host core",
        share * 100.0
    );
    assert!(
        share < 0.5,
        "an idle guest used {:.0}% of a host core",
        share * 100.0
    );

    vm.send(b"reboot -f\n");
    vm.expect_success(ANSWER).unwrap();
    assert!(vm.text().contains("reboot: Restarting system"));
}

/// Seconds since boot from a `/proc/uptime` line ("12.34 5.67").
fn uptime(l: &str) -> Option<f64> {
    let mut f = l.split(' ');
    let (a, b) = (f.next()?, f.next()?);
    if f.next().is_some() || b.parse::<f64>().is_err() {
        return None;
    }
    a.parse().ok()
}

#[test]
fn uptime_lines_parse() {
    assert_eq!(uptime("12.34 5.67"), Some(12.34));
    assert_eq!(uptime("/ # cat /proc/uptime"), None);
    assert_eq!(uptime("42"), None);
}

#[test]
#[cfg_attr(
    debug_assertions,
    ignore = "boots Linux: run with cargo test --release"
)]
fn guest_time_follows_the_host_clock() {
    let Some(mut vm) = boot_to_shell() else {
        return;
    };
    // Linux is told the TSC frequency (CPUID 15h) and trusts it: no PIT calibration,
    // which goes wrong whenever the host deschedules the vCPU during it.
    let log = vm.text();
    assert!(
        log.contains("tsc: Detected 1000.000 MHz processor"),
        "TSC frequency"
    );
    assert!(log.contains("clocksource: Switched to clocksource tsc"));
    assert!(
        !log.contains("Marking TSC unstable"),
        "TSC unstable:\n{log}"
    );
    // Soft lockups and hung tasks say the guest's clock ran on while its CPU did not:
    // on a host too loaded to give the vCPU a share that happens with a right clock
    // too, so they are reported here, not failed on.
    for warn in ["soft lockup", "blocked for more than"] {
        if log.contains(warn) {
            eprintln!("note: '{warn}' in the boot log (a loaded host?)");
        }
    }

    vm.send(b"cat /proc/uptime; sleep 5; cat /proc/uptime\n");
    let a = vm
        .expect_line("uptime", ANSWER, |l| uptime(l).is_some())
        .unwrap();
    let b = vm
        .expect_line("uptime", ANSWER, |l| uptime(l).is_some())
        .unwrap();
    let guest = uptime(&b.text).unwrap() - uptime(&a.text).unwrap();
    let host = (b.at - a.at).as_secs_f64();
    eprintln!("sleep 5: guest uptime advanced {guest:.2} s, host wall clock {host:.2} s");
    assert!(host >= 4.5, "sleep 5 took {host:.2} s of host time");
    assert!(
        (guest - host).abs() <= 0.1 * host,
        "guest {guest:.2} s vs host {host:.2} s"
    );
    vm.send(b"reboot -f\n");
    vm.expect_success(ANSWER).unwrap();
}

#[test]
#[cfg_attr(
    debug_assertions,
    ignore = "boots Linux: run with cargo test --release"
)]
fn serial_file_holds_the_whole_boot_log() {
    let Some(dir) = guest_files(&[KERNEL, INITRD]) else {
        return;
    };
    let path = temp_path("serial.txt");
    let mut c = morph86();
    c.args(["-m", "256", "-kernel"])
        .arg(dir.join(KERNEL))
        .arg("-initrd")
        .arg(dir.join(INITRD))
        .args(["-append", "console=ttyS0 cryptomgr.notests"])
        .args(["-display", "none", "-no-reboot", "-accel", "jit", "-serial"])
        .arg(format!("file:{}", path.display()));
    let mut vm = Morph86::spawn(c);
    vm.expect_success(BOOT).unwrap();
    let log = std::fs::read_to_string(&path).expect("the serial log file");
    std::fs::remove_file(&path).ok();
    assert_eq!(vm.text(), "", "nothing from the guest on stdout");
    let first = log.lines().next().unwrap_or("");
    assert!(
        first.contains("] Linux version 6.1.0"),
        "the kernel's first line comes first: {first}"
    );
    let pos = |s: &str| {
        log.find(s)
            .unwrap_or_else(|| panic!("'{s}' missing:\n{log}"))
    };
    let order = [
        pos("Linux version"),
        pos("Run /init as init process"),
        pos("GUEST-READY uptime="),
        pos("GUEST-DONE uptime="),
        pos("reboot: Restarting system"),
    ];
    assert!(order.windows(2).all(|w| w[0] < w[1]), "order {order:?}");
}

/// Starts the halting firmware (prints READY, halts with interrupts off) with `stdin`.
fn firmware_guest(stdin: std::process::Stdio, tag: &str) -> (Morph86, std::path::PathBuf) {
    let bios = temp_path(&format!("{tag}-halt.bin"));
    std::fs::write(&bios, halting_firmware(b"READY\n")).unwrap();
    let mut c = morph86();
    c.arg("-bios").arg(&bios).arg("-nographic").stdin(stdin);
    (Morph86::spawn_keep_stdin(c), bios)
}

#[test]
fn ctrl_a_x_on_a_pipe_ends_the_run_and_end_of_input_does_not() {
    let (mut vm, bios) = firmware_guest(std::process::Stdio::piped(), "pipe");
    vm.expect("READY", ANSWER).unwrap();
    // Bytes that are not escapes reach the guest (which ignores them); the run goes on.
    vm.send(b"abc\n");
    assert!(vm.wait_exit(Duration::from_millis(500)).is_none());
    let t = Instant::now();
    vm.send(b"\x01x");
    vm.expect_success(Duration::from_secs(10)).unwrap();
    eprintln!("Ctrl-A x on a pipe: exit after {:?}", t.elapsed());
    assert!(t.elapsed() < Duration::from_secs(5));

    // End of input: the guest keeps running, as under QEMU.
    let (mut vm, bios2) = firmware_guest(std::process::Stdio::piped(), "eof");
    vm.expect("READY", ANSWER).unwrap();
    vm.close_stdin();
    assert!(
        vm.wait_exit(Duration::from_secs(1)).is_none(),
        "the end of input ended the run"
    );
    drop(vm);
    std::fs::remove_file(bios).ok();
    std::fs::remove_file(bios2).ok();
}

/// A pseudo-terminal pair (master, slave).
fn openpty() -> (std::os::fd::OwnedFd, std::os::fd::OwnedFd) {
    use std::os::fd::FromRawFd;
    let (mut m, mut s) = (-1, -1);
    // SAFETY: openpty writes two descriptors into the ints we pass; the name, termios
    // and window size pointers may be null.
    let r = unsafe {
        libc::openpty(
            &mut m,
            &mut s,
            std::ptr::null_mut(),
            std::ptr::null(),
            std::ptr::null(),
        )
    };
    assert_eq!(r, 0, "openpty: {}", std::io::Error::last_os_error());
    // SAFETY: both descriptors were just opened by openpty and are owned by nobody else.
    unsafe {
        (
            std::os::fd::OwnedFd::from_raw_fd(m),
            std::os::fd::OwnedFd::from_raw_fd(s),
        )
    }
}

fn termios(fd: &std::os::fd::OwnedFd) -> libc::termios {
    use std::os::fd::AsRawFd;
    // SAFETY: termios is plain data; tcgetattr fills it for a valid descriptor.
    let mut t: libc::termios = unsafe { std::mem::zeroed() };
    // SAFETY: valid descriptor and pointer.
    assert_eq!(unsafe { libc::tcgetattr(fd.as_raw_fd(), &mut t) }, 0);
    t
}

#[test]
fn ctrl_a_x_on_a_terminal_ends_the_run_and_restores_the_terminal() {
    let (master, slave) = openpty();
    let before = termios(&slave);
    assert_ne!(
        before.c_lflag & libc::ICANON,
        0,
        "a new terminal is canonical"
    );
    let (mut vm, bios) = firmware_guest(slave.try_clone().unwrap().into(), "tty");
    vm.expect("READY", ANSWER).unwrap();
    let running = termios(&slave);
    assert_eq!(
        running.c_lflag & (libc::ICANON | libc::ECHO | libc::ISIG),
        0,
        "raw mode while the guest runs"
    );
    let mut m = std::fs::File::from(master);
    let t = Instant::now();
    // Ctrl-A x with no newline: only a raw-mode terminal passes it on at once.
    std::io::Write::write_all(&mut m, b"\x01x").unwrap();
    vm.expect_success(Duration::from_secs(10)).unwrap();
    eprintln!("Ctrl-A x on a terminal: exit after {:?}", t.elapsed());
    assert!(t.elapsed() < Duration::from_secs(5));
    let after = termios(&slave);
    assert_eq!(
        (after.c_iflag, after.c_oflag, after.c_cflag, after.c_lflag),
        (
            before.c_iflag,
            before.c_oflag,
            before.c_cflag,
            before.c_lflag
        ),
        "terminal mode restored"
    );
    assert_eq!(after.c_cc, before.c_cc);
    std::fs::remove_file(bios).ok();
}

#[test]
fn sigterm_ends_the_run_cleanly_and_restores_the_terminal() {
    let (_master, slave) = openpty();
    let before = termios(&slave);
    let shot = temp_path("sigterm.png");
    let bios = temp_path("sigterm-halt.bin");
    std::fs::write(&bios, halting_firmware(b"READY\n")).unwrap();
    let mut c = morph86();
    c.arg("-bios")
        .arg(&bios)
        .arg("-nographic")
        .arg("--screenshot")
        .arg(&shot)
        .stdin(std::process::Stdio::from(slave.try_clone().unwrap()));
    let mut vm = Morph86::spawn_keep_stdin(c);
    vm.expect("READY", ANSWER).unwrap();
    assert_eq!(termios(&slave).c_lflag & libc::ICANON, 0, "raw mode");
    // SAFETY: kill only sends a signal to the child we started.
    assert_eq!(unsafe { libc::kill(vm.pid() as i32, libc::SIGTERM) }, 0);
    vm.expect_success(Duration::from_secs(10)).unwrap();
    assert!(vm.stderr_text().contains("terminating on signal 15"));
    let after = termios(&slave);
    assert_eq!(after.c_lflag, before.c_lflag, "terminal mode restored");
    assert!(shot.exists(), "the screenshot is written on the way out");
    std::fs::remove_file(shot).ok();
    std::fs::remove_file(bios).ok();
}
