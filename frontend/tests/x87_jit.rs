//! The x87 workload under the JIT: busybox awk computes with doubles, so on i386 it is
//! x87 code, which the JIT runs on the host's x87 (`jit/src/x87.rs`). The `CHECK
//! awk-primes` line must equal that of `expected-i386.txt` (busybox run natively).
//!
//! Guests as in `linux_boot.rs` (absent guests: the test says so and passes). A debug
//! build skips the boot.

mod common;

use common::{checks, guest_files, linux, Morph86};
use std::time::Duration;

/// awk-primes under the JIT (native x87) prints what the host's busybox prints.
#[test]
#[cfg_attr(
    debug_assertions,
    ignore = "boots Linux: run with cargo test --release"
)]
fn debian_686_awk_primes_is_correct_under_the_jit() {
    let (kernel, initrd) = ("vmlinuz-686", "bench-i386.cpio.gz");
    let Some(dir) = guest_files(&[kernel, initrd, "expected-i386.txt"]) else {
        return;
    };
    let names = ["awk-primes"];
    let want = checks(
        &std::fs::read_to_string(dir.join("expected-i386.txt")).unwrap(),
        &names,
    );
    assert_eq!(want.len(), 1, "expected-i386.txt lacks the awk-primes line");
    let mut c = linux(
        &dir,
        kernel,
        initrd,
        "nokaslr bench=awk-primes check=1 reps=0",
    );
    c.args(["-accel", "jit"]);
    let mut vm = Morph86::spawn(c);
    let timeout = Duration::from_secs(3600);
    vm.expect_prefix("GUEST-READY", timeout).unwrap();
    let done = vm.expect_prefix("GUEST-DONE", timeout).unwrap();
    eprintln!(
        "awk-primes under the JIT: GUEST-DONE after {:.1} s",
        (done.at - vm.started).as_secs_f64()
    );
    vm.expect_success(Duration::from_secs(120)).unwrap();
    let text = vm.text();
    assert_eq!(checks(&text, &names), want, "serial output:\n{text}");
}
