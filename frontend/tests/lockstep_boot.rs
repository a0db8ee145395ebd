//! `-accel check` on a real guest: the start of a Debian i386 kernel boot runs in
//! lock-step (every translated block in both engines, compared block by block) and no
//! divergence is found. Whole boots and workloads take minutes to hours in lock-step;
//! they are run by hand (see docs/architecture-notes.md); this test keeps the machine
//! path of the checker (`--check-from`, the progress and statistics lines, exit status)
//! working.

mod common;

use common::{guest_files, linux, Morph86};
use std::time::Duration;

/// Guest instructions the lock-step part of the test runs (the kernel's decompressor
/// and early setup).
const CHECKED: u64 = 40_000_000;

/// The number before `what` in `text` (e.g. `"12 blocks"` → 12).
fn count_before(text: &str, what: &str) -> Option<u64> {
    let at = text.find(what)?;
    text[..at].split_whitespace().last()?.parse().ok()
}

#[test]
fn count_before_reads_the_number() {
    let t = "jit: lockstep: 12 blocks / 345 instructions compared clean (0 with";
    assert_eq!(count_before(t, " blocks /"), Some(12));
    assert_eq!(count_before(t, " instructions compared"), Some(345));
    assert_eq!(count_before(t, " nothing"), None);
}

#[test]
#[cfg_attr(
    debug_assertions,
    ignore = "boots Linux: run with cargo test --release"
)]
fn linux_boot_runs_clean_in_lockstep() {
    let (kernel, initrd) = ("vmlinuz-686", "boot-i386.cpio.gz");
    let Some(dir) = guest_files(&[kernel, initrd]) else {
        return;
    };
    let mut c = linux(&dir, kernel, initrd, "");
    // Unchecked under the JIT for the first million instructions, then lock-step.
    c.args(["-accel", "check", "--check-from", "1000000", "--stats"])
        .arg("--max-instructions")
        .arg((CHECKED + 1_000_000).to_string());
    let mut vm = Morph86::spawn(c);
    // Exit status 3 and a "lock-step divergence" report would mean the engines differ.
    vm.expect_success(Duration::from_secs(1800)).unwrap();
    let err = vm.stderr_text();
    assert!(!err.contains("divergence"), "{err}");
    assert!(err.contains("lock-step from instruction"), "{err}");
    let line = err
        .lines()
        .find(|l| l.contains("jit: lockstep:"))
        .unwrap_or_else(|| panic!("no lock-step statistics:\n{err}"));
    let blocks = count_before(line, " blocks /").unwrap();
    let insns = count_before(line, " instructions compared").unwrap();
    // Most of the run is compared (the rest: interpreter-only blocks, interrupts).
    assert!(
        blocks > 100_000 && insns > CHECKED / 2,
        "too little compared: {line}"
    );
}
