//! `singlestep DIR [--form F] [--verbose N]`: runs every SingleStepTests vector in DIR
//! and ends with `N passed, M failed`.

use morph86_testsuite::singlestep::{
    known_286_difference, load_file, revoked, Outcome, Runner, Summary,
};
use std::path::PathBuf;
use std::process::ExitCode;

fn main() -> ExitCode {
    let mut args = std::env::args().skip(1);
    let mut dir: Option<PathBuf> = None;
    let mut only: Option<String> = None;
    let mut verbose = 3usize;
    let mut min_pass: Option<f64> = None;
    let mut strict = false;
    let mut list = true;
    while let Some(a) = args.next() {
        match a.as_str() {
            "--form" => only = args.next(),
            "--verbose" => verbose = args.next().and_then(|v| v.parse().ok()).unwrap_or(3),
            "--min-pass" => min_pass = args.next().and_then(|v| v.parse().ok()),
            "--no-unexplained" => strict = true,
            "--no-list" => list = false,
            "-h" | "--help" => {
                println!(
                    "usage: singlestep DIR [--form FORM] [--verbose N] [--min-pass PERCENT] [--no-unexplained] [--no-list]\n\
                     Runs the SingleStepTests vectors in DIR (*.jsonl.gz) and prints `N passed, M failed`.\n\
                     --form FORM     only FORM.jsonl.gz (e.g. F7.6)\n\
                     --verbose N     print the first N failures of each form (default 3)\n\
                     --min-pass P    exit non-zero if fewer than P percent pass\n\
                     --no-unexplained  exit non-zero if a failure is not a documented 80286-vs-386 difference\n\
                     --no-list       count the 80286-vs-386 differences by reason instead of listing each"
                );
                return ExitCode::SUCCESS;
            }
            _ if dir.is_none() => dir = Some(PathBuf::from(a)),
            _ => {
                eprintln!("singlestep: unexpected argument {a:?} (see --help)");
                return ExitCode::from(2);
            }
        }
    }
    let Some(dir) = dir else {
        eprintln!("singlestep: give the folder of vectors (see --help)");
        return ExitCode::from(2);
    };
    let mut files: Vec<PathBuf> = match std::fs::read_dir(&dir) {
        Ok(rd) => rd
            .filter_map(|e| e.ok().map(|e| e.path()))
            .filter(|p| {
                let n = p.file_name().and_then(|n| n.to_str()).unwrap_or("");
                n.ends_with(".jsonl.gz") || n.ends_with(".jsonl")
            })
            .collect(),
        Err(e) => {
            eprintln!("singlestep: cannot read {}: {e}", dir.display());
            return ExitCode::from(2);
        }
    };
    files.sort();
    let revoked = revoked(&dir);
    let mut runner = Runner::new();
    let mut sum = Summary::default();
    let (mut pass, mut fail, mut skipped) = (0u64, 0u64, 0u64);
    for f in &files {
        let name = f.file_name().unwrap().to_string_lossy().to_string();
        let form = name
            .trim_end_matches(".gz")
            .trim_end_matches(".jsonl")
            .to_string();
        if only.as_ref().is_some_and(|o| *o != form) {
            continue;
        }
        let tests = match load_file(f) {
            Ok(t) => t,
            Err(e) => {
                eprintln!("singlestep: {e}");
                return ExitCode::from(2);
            }
        };
        let (mut fp, mut ff, mut shown) = (0u64, 0u64, 0usize);
        for t in &tests {
            if revoked.contains(&t.hash) {
                skipped += 1;
                continue;
            }
            match runner.run(t) {
                Outcome::Pass => fp += 1,
                Outcome::Fail(why) => {
                    ff += 1;
                    if let Some(reason) = known_286_difference(&form, t, &why) {
                        sum.differences
                            .push((form.clone(), t.idx, t.name.clone(), reason));
                    } else if shown < verbose {
                        shown += 1;
                        println!(
                            "FAIL {form} #{} {:?} bytes={:02x?}\n     {why}",
                            t.idx, t.name, t.bytes
                        );
                    }
                }
            }
        }
        if ff > 0 {
            println!("form {form}: {fp} passed, {ff} failed");
        }
        sum.per_form.insert(form, (fp, ff));
        pass += fp;
        fail += ff;
    }
    if !sum.differences.is_empty() {
        println!("\nFailures where the 80286 differs from the 386 and later (counted as failed):");
        if list {
            for (form, idx, name, reason) in &sum.differences {
                println!("  {form} #{idx} {name:?}: {reason}");
            }
        }
        let mut by_reason: std::collections::BTreeMap<&str, u64> = Default::default();
        for d in &sum.differences {
            *by_reason.entry(d.3).or_default() += 1;
        }
        println!("By reason:");
        for (reason, n) in by_reason {
            println!("  {n:6}  {reason}");
        }
    }
    let unexplained = fail - sum.differences.len() as u64;
    let total = pass + fail;
    let pct = if total > 0 {
        pass as f64 * 100.0 / total as f64
    } else {
        0.0
    };
    println!(
        "\n{} forms, {total} tests ({skipped} revoked skipped), {pct:.3}% pass",
        sum.per_form.len()
    );
    println!(
        "{} of the failures are documented 80286-vs-386 differences, {unexplained} are not",
        sum.differences.len()
    );
    println!("{pass} passed, {fail} failed");
    if total == 0 || min_pass.is_some_and(|m| pct < m) || (strict && unexplained > 0) {
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}
