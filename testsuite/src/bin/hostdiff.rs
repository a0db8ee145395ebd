//! `hostdiff`: differential fuzzing of the interpreter against the host CPU.
//! See `morph86_testsuite::hostdiff` for how it works; `--help` for the options.

use morph86_testsuite::hostdiff::compare::{self, dump};
use morph86_testsuite::hostdiff::generate::{class_name, parse_classes, Generator, CLASS_NAMES};
use morph86_testsuite::hostdiff::interp::Interp;
use morph86_testsuite::hostdiff::native::Native;
use morph86_testsuite::hostdiff::{run_case, vector_name, Mismatch, Rng};
use std::collections::BTreeMap;
use std::process::ExitCode;

const USAGE: &str = "usage: hostdiff [--count N] [--seed S] [--seq-len L] [--classes LIST]
               [--verbose] [--max-print N] [--fp-ulps U] [--replay SEED:INDEX] [--list]
Runs random 32-bit user-mode instruction sequences natively (ptrace) and in the
interpreter from the same state, compares everything after every instruction and ends
with `N passed, M failed`; exits non-zero on any mismatch.
  --count N          instructions to execute (default 100000)
  --seed S           run seed (default 1)
  --seq-len L        instructions chosen per sequence, set-up not counted (default 16)
  --classes LIST     comma-separated: all, int, x87, or of: CLASSES
  --verbose          print every mismatch with bytes, disassembly and both states
  --max-print N      without --verbose, one-line reports for the first N (default 20)
  --fp-ulps U        tolerance for x87 transcendentals in ulps of the 64-bit significand (default 1)
  --replay SEED:IDX  run only sequence IDX of run SEED (same --classes/--seq-len), traced
  --list             print the instruction forms in the pool and exit
  --engine E         interp (default) or jit: run the emulated side through the JIT,
                     each instruction translated as a block of its own";

fn print_mismatch(m: &Mismatch, seed: u64, full: bool) {
    let bytes: Vec<String> = m.bytes.iter().map(|b| format!("{b:02x}")).collect();
    println!(
        "MISMATCH {seed}:{} step {} at {:08x}: {:<30} [{}]",
        m.seq,
        m.step,
        m.pre.eip,
        m.disasm,
        bytes.join(" ")
    );
    for d in &m.diffs {
        println!(
            "    {:<12} host {}  |  interp {}",
            d.what, d.native, d.interp
        );
    }
    if full {
        println!("  before:\n    {}", dump(&m.pre));
        println!("  host after:\n    {}", dump(&m.native));
        println!("  interp after:\n    {}", dump(&m.interp));
    }
}

fn main() -> ExitCode {
    let mut count: u64 = 100_000;
    let mut seed: u64 = 1;
    let mut seq_len: usize = 16;
    let mut classes = parse_classes("all").unwrap_or_default();
    let mut verbose = false;
    let mut max_print = 20usize;
    let mut cfg = compare::Config::default();
    let mut replay: Option<(u64, u64)> = None;
    let mut list = false;
    let mut engine_jit = false;
    let mut args = std::env::args().skip(1);
    let num = |v: Option<String>, what: &str| -> Result<u64, String> {
        v.as_deref()
            .and_then(|s| s.replace('_', "").parse().ok())
            .ok_or_else(|| format!("{what} needs a number"))
    };
    while let Some(a) = args.next() {
        let r: Result<(), String> = (|| {
            match a.as_str() {
                "--count" => count = num(args.next(), "--count")?,
                "--seed" => seed = num(args.next(), "--seed")?,
                "--seq-len" => seq_len = num(args.next(), "--seq-len")?.max(1) as usize,
                "--classes" => {
                    classes = parse_classes(&args.next().ok_or("--classes needs a list")?)?
                }
                "--verbose" | "-v" => verbose = true,
                "--max-print" => max_print = num(args.next(), "--max-print")? as usize,
                "--fp-ulps" => cfg.fp_ulps = num(args.next(), "--fp-ulps")?,
                "--replay" => {
                    let v = args.next().ok_or("--replay needs SEED:INDEX")?;
                    let (s, i) = v.split_once(':').ok_or("--replay needs SEED:INDEX")?;
                    replay = Some((
                        s.parse().map_err(|_| "bad replay seed")?,
                        i.parse().map_err(|_| "bad replay index")?,
                    ));
                }
                "--list" => list = true,
                "--engine" => {
                    engine_jit = match args.next().as_deref() {
                        Some("jit") => true,
                        Some("interp") => false,
                        _ => return Err("--engine takes interp or jit".into()),
                    }
                }
                "-h" | "--help" => {
                    let names: Vec<&str> = CLASS_NAMES.iter().map(|c| c.0).collect();
                    println!("{}", USAGE.replace("CLASSES", &names.join(",")));
                    std::process::exit(0);
                }
                _ => return Err(format!("unexpected argument {a:?} (see --help)")),
            }
            Ok(())
        })();
        if let Err(e) = r {
            eprintln!("hostdiff: {e}");
            return ExitCode::from(2);
        }
    }
    let mut generator = Generator::new(&classes);
    if list {
        for f in generator.forms() {
            println!("{:<10} {:?}", class_name(f.class), f.code);
        }
        return ExitCode::SUCCESS;
    }
    if generator.forms().is_empty() {
        eprintln!("hostdiff: no instruction forms selected");
        return ExitCode::from(2);
    }
    let mut native = Native::new();
    let made = if engine_jit {
        Interp::with_jit()
    } else {
        Interp::new()
    };
    let mut interp = match made {
        Ok(i) => i,
        Err(e) => {
            eprintln!("hostdiff: interpreter: {e}");
            return ExitCode::from(2);
        }
    };
    // Interpreter panics are reported as mismatches; keep the default hook quiet.
    std::panic::set_hook(Box::new(|_| {}));
    if let Some((s, _)) = replay {
        seed = s;
        verbose = true;
    }
    let names: Vec<&str> = classes.iter().map(|c| class_name(*c)).collect();
    println!(
        "hostdiff: seed {seed}, {} forms from classes {}, sequences of {seq_len}; interpreter {}",
        generator.forms().len(),
        names.join(","),
        if interp.paging {
            "with page tables"
        } else {
            "without paging (MMU walk missing): stray accesses caught by tripwires, #PF compared without CR2"
        }
    );
    println!(
        "x87 transcendentals (FSIN FCOS FSINCOS FPTAN FPATAN F2XM1 FYL2X FYL2XP1) compared within {} ulp of the 64-bit significand (Intel documents error bounds, not exact results); their C1 is not compared",
        cfg.fp_ulps
    );
    let start = std::time::Instant::now();
    let (mut passed, mut failed, mut skipped) = (0u64, 0u64, 0u64);
    let mut by_mnemonic: BTreeMap<String, (u64, u64)> = BTreeMap::new();
    let mut faults = [0u64; 32];
    let mut printed = 0usize;
    let mut seqs = 0u64;
    let seq_range: Box<dyn Iterator<Item = u64>> = match replay {
        Some((_, i)) => Box::new(std::iter::once(i)),
        None => Box::new(0..),
    };
    for seq in seq_range {
        if replay.is_none() && passed + failed >= count {
            break;
        }
        let mut rng = Rng::for_sequence(seed, seq);
        let case = match generator.case(&mut rng, seq_len) {
            Ok(c) => c,
            Err(e) => {
                eprintln!("hostdiff: sequence {seq}: generator: {e}");
                skipped += 1;
                continue;
            }
        };
        seqs += 1;
        let mut tr = |s: &str| println!("{s}");
        let trace: Option<&mut dyn FnMut(&str)> = if replay.is_some() {
            Some(&mut tr)
        } else {
            None
        };
        if replay.is_some() {
            println!(
                "sequence {seed}:{seq}, {} bytes of code; start state:\n    {}",
                case.code.len(),
                dump(&case.init)
            );
        }
        let t0 = std::time::Instant::now();
        let result = run_case(&mut native, &mut interp, &case, seq, &cfg, trace);
        if t0.elapsed().as_secs_f64() > 2.0 {
            eprintln!(
                "hostdiff: note: sequence {seed}:{seq} took {:.1} s",
                t0.elapsed().as_secs_f64()
            );
        }
        match result {
            Ok(r) => {
                passed += r.passed;
                failed += r.failed;
                for (i, f) in r.faults.iter().enumerate() {
                    faults[i] += f;
                }
                for m in &r.executed {
                    by_mnemonic.entry(format!("{m:?}")).or_default().0 += 1;
                }
                for m in &r.mismatches {
                    by_mnemonic
                        .entry(format!("{:?}", m.ins.mnemonic()))
                        .or_default()
                        .1 += 1;
                    if verbose || printed < max_print {
                        print_mismatch(m, seed, verbose);
                        printed += 1;
                    }
                }
            }
            Err(e) => {
                eprintln!("hostdiff: sequence {seed}:{seq} skipped: {e}");
                skipped += 1;
            }
        }
    }
    let secs = start.elapsed().as_secs_f64();
    let mut fails: Vec<(&String, &(u64, u64))> =
        by_mnemonic.iter().filter(|e| e.1 .1 > 0).collect();
    fails.sort_by_key(|e| std::cmp::Reverse(e.1 .1));
    if !fails.is_empty() {
        println!("failures by instruction (failed/executed):");
        let line: Vec<String> = fails
            .iter()
            .map(|(m, (e, f))| format!("{m} {f}/{e}"))
            .collect();
        for chunk in line.chunks(8) {
            println!("    {}", chunk.join(", "));
        }
    }
    let fl: Vec<String> = faults
        .iter()
        .enumerate()
        .filter(|(_, n)| **n > 0)
        .map(|(v, n)| format!("{} {n}", vector_name(v as u8)))
        .collect();
    println!(
        "{seqs} sequences, {} distinct mnemonics executed, faults matched: {}; {skipped} sequences skipped (host errors); {:.1} s, host children started: {}",
        by_mnemonic.len(),
        if fl.is_empty() { "none".to_string() } else { fl.join(", ") },
        secs,
        native.spawned
    );
    if let Some(st) = interp.jit_stats() {
        let (native, called, interp_steps) = interp.jit_split();
        println!(
            "engine jit: {native} instructions ran as translated code alone ({:.1}%), {called} as translated code that called the interpreter (in-block call or memory slow path), {interp_steps} in the interpreter alone (not translated); {} blocks translated, {} memory slow paths, {} faults raised by translated code",
            100.0 * native as f64 / (native + called + interp_steps).max(1) as f64,
            st.translated,
            st.slow_paths,
            st.faults
        );
    }
    println!("{passed} passed, {failed} failed");
    if failed > 0 || (passed == 0 && skipped > 0) {
        ExitCode::FAILURE
    } else {
        ExitCode::SUCCESS
    }
}
