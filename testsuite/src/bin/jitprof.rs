//! jitprof: where host time goes inside the JIT's generated code.
//!
//! `perf` cannot name code that morph86 writes at run time: its samples in the code
//! cache show up as bare offsets into the `memfd:morph86-jit` mapping. The
//! `--dump-blocks` listing prints every translated block with the code-cache offset of
//! each host instruction, under the guest instruction it came from. This tool joins the
//! two: it charges each sample to the block that occupied its offset last (the cache is
//! reused after a flush) and, inside the hottest blocks, to the guest instruction.
//!
//! ```text
//! perf record -o perf.data -- morph86 ... -accel jit --dump-blocks 2> blocks.txt
//! jitprof --perf perf.data --dump blocks.txt [--top 10] [--annotate 3]
//! ```

use std::collections::HashMap;
use std::process::{Command, ExitCode};

const USAGE: &str = "\
usage: jitprof --perf PERF_DATA --dump BLOCKS [--top N] [--annotate N]
Charges perf samples in morph86's code cache to the translated guest blocks and guest
instructions of a --dump-blocks listing taken in the same run.
  --perf PATH     perf.data of the run (perf record -o PATH -- morph86 ... -accel jit
                  --dump-blocks 2> BLOCKS)
  --dump PATH     the stderr of that run (the block listings)
  --top N         blocks to list, hottest first (default 15)
  --annotate N    of those, how many to print with a share per guest instruction
                  (default 3)";

/// One translated block of the listing.
struct Block {
    eip: u32,
    guest_insns: usize,
    host_bytes: u64,
    start: u64,
    /// Line range of its listing in the dump.
    lines: (usize, usize),
}

/// `block phys 0x.. mode N eip 0x..: G guest instructions, H host bytes at +0xOFF`
fn parse_header(line: &str) -> Option<(u32, usize, u64, u64)> {
    let rest = line.strip_prefix("block phys ")?;
    let eip = rest.split(" eip 0x").nth(1)?.split(':').next()?;
    let eip = u32::from_str_radix(eip, 16).ok()?;
    let (_, tail) = rest.split_once(": ")?;
    let mut w = tail.split_whitespace();
    let guest = w.next()?.parse().ok()?;
    let host_bytes = tail
        .split(", ")
        .nth(1)?
        .split_whitespace()
        .next()?
        .parse()
        .ok()?;
    let start = tail.rsplit("at +0x").next()?;
    let start = u64::from_str_radix(start.trim(), 16).ok()?;
    Some((eip, guest, host_bytes, start))
}

/// A host-code line of a listing: `        d543f2  mov esi,ecx` gives 0xd543f2.
fn host_offset(line: &str) -> Option<u64> {
    let t = line.strip_prefix("        ")?;
    let hex = t.split_whitespace().next()?;
    u64::from_str_radix(hex, 16).ok()
}

/// A guest line of a listing: `  081c2481  mov esi,ecx`.
fn is_guest_line(line: &str) -> bool {
    let Some(t) = line.strip_prefix("  ") else {
        return false;
    };
    !t.starts_with(' ')
}

struct Profile {
    /// (share in %, code-cache offset) of each sampled address in generated code.
    jit: Vec<(f64, u64)>,
    /// Share per mapping (code cache, morph86, kernel, libc ...).
    dsos: Vec<(String, f64)>,
    /// Hottest named functions outside the code cache.
    syms: Vec<(f64, String)>,
}

fn read_perf(path: &str) -> Result<Profile, String> {
    let out = Command::new("perf")
        .args(["report", "-i", path, "--no-children", "--sort", "dso,sym"])
        .args(["-F", "sample,dso,sym", "-g", "none", "--stdio"])
        .output()
        .map_err(|e| format!("cannot run perf (apt-get install linux-perf): {e}"))?;
    if !out.status.success() {
        return Err(format!(
            "perf report failed: {}",
            String::from_utf8_lossy(&out.stderr).trim()
        ));
    }
    let text = String::from_utf8_lossy(&out.stdout);
    let mut p = Profile {
        jit: Vec::new(),
        dsos: Vec::new(),
        syms: Vec::new(),
    };
    // Sample counts, not perf's percentages: those are rounded to 0.01%, and most of
    // the generated code's thousands of sampled addresses have a handful of samples.
    let mut counted: Vec<(u64, &str)> = Vec::new();
    for line in text.lines() {
        let line = line.trim();
        if line.starts_with('#') || line.is_empty() {
            continue;
        }
        let Some((n, rest)) = line.split_once(' ') else {
            continue;
        };
        if let Ok(n) = n.parse::<u64>() {
            counted.push((n, rest));
        }
    }
    let total = counted.iter().map(|c| c.0).sum::<u64>().max(1) as f64;
    let mut dsos: HashMap<String, f64> = HashMap::new();
    for (n, rest) in counted {
        let pct = n as f64 * 100.0 / total;
        // `dso  [.] symbol` (user) or `dso  [k] symbol` (kernel); the kernel's dso is
        // itself bracketed (`[kernel.kallsyms]`).
        let Some((dso, sym)) = rest
            .split_once(" [.] ")
            .or_else(|| rest.split_once(" [k] "))
        else {
            continue;
        };
        let dso = dso.trim().to_string();
        let sym = sym.trim().to_string();
        *dsos.entry(dso.clone()).or_default() += pct;
        if dso.contains("morph86-jit") {
            if let Some(off) = sym
                .strip_prefix("0x")
                .and_then(|h| u64::from_str_radix(h, 16).ok())
            {
                p.jit.push((pct, off));
            }
        } else {
            p.syms.push((pct, format!("{sym}  ({dso})")));
        }
    }
    p.dsos = dsos.into_iter().collect();
    p.dsos.sort_by(|a, b| b.1.total_cmp(&a.1));
    Ok(p)
}

fn main() -> ExitCode {
    match run() {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            eprintln!("jitprof: {e}");
            ExitCode::from(2)
        }
    }
}

fn run() -> Result<(), String> {
    let (mut perf, mut dump, mut top, mut annotate) = (None, None, 15usize, 3usize);
    let mut args = std::env::args().skip(1);
    while let Some(a) = args.next() {
        let mut val = || {
            args.next()
                .ok_or_else(|| format!("{a} needs a value\n{USAGE}"))
        };
        match a.as_str() {
            "--perf" => perf = Some(val()?),
            "--dump" => dump = Some(val()?),
            "--top" => top = val()?.parse().map_err(|_| "--top: not a number")?,
            "--annotate" => annotate = val()?.parse().map_err(|_| "--annotate: not a number")?,
            "-h" | "--help" => {
                println!("{USAGE}");
                return Ok(());
            }
            _ => return Err(format!("unknown argument {a}\n{USAGE}")),
        }
    }
    let (Some(perf), Some(dump)) = (perf, dump) else {
        return Err(format!("--perf and --dump are required\n{USAGE}"));
    };
    let text = std::fs::read(&dump).map_err(|e| format!("{dump}: {e}"))?;
    let text = String::from_utf8_lossy(&text);
    let lines: Vec<&str> = text.lines().collect();
    let mut blocks: Vec<Block> = Vec::new();
    for (i, l) in lines.iter().enumerate() {
        if let Some((eip, guest_insns, host_bytes, start)) = parse_header(l) {
            if let Some(b) = blocks.last_mut() {
                b.lines.1 = i;
            }
            blocks.push(Block {
                eip,
                guest_insns,
                host_bytes,
                start,
                lines: (i, lines.len()),
            });
        }
    }
    if blocks.is_empty() {
        return Err(format!(
            "{dump}: no block listings (run with --dump-blocks)"
        ));
    }
    let prof = read_perf(&perf)?;

    println!("share of samples by mapping:");
    for (dso, pct) in prof.dsos.iter().take(8) {
        println!("  {pct:6.2}%  {dso}");
    }
    println!("hottest functions outside generated code:");
    let mut syms = prof.syms.clone();
    syms.sort_by(|a, b| b.0.total_cmp(&a.0));
    for (pct, s) in syms.iter().take(10) {
        println!("  {pct:6.2}%  {s}");
    }

    // The block that held an offset last: later translations reuse flushed space.
    let mut per_block: HashMap<usize, f64> = HashMap::new();
    let mut per_offset: HashMap<u64, f64> = HashMap::new();
    let mut unmatched = 0.0;
    for &(pct, off) in &prof.jit {
        let owner = blocks
            .iter()
            .rposition(|b| b.start <= off && off < b.start + b.host_bytes);
        match owner {
            Some(b) => {
                *per_block.entry(b).or_default() += pct;
                *per_offset.entry(off).or_default() += pct;
            }
            None => unmatched += pct,
        }
    }
    let mut ranked: Vec<(usize, f64)> = per_block.into_iter().collect();
    ranked.sort_by(|a, b| b.1.total_cmp(&a.1));
    println!(
        "generated code: {} blocks translated; {unmatched:.2}% of samples outside any block \
         (trampoline, shared exit path)",
        blocks.len()
    );
    println!("hottest blocks (share of all samples, guest EIP, size):");
    for &(b, pct) in ranked.iter().take(top) {
        let bl = &blocks[b];
        println!(
            "  {pct:6.2}%  eip {:08x}  {:3} guest instructions  {:5} host bytes ({:.1} per instruction)",
            bl.eip,
            bl.guest_insns,
            bl.host_bytes,
            bl.host_bytes as f64 / bl.guest_insns.max(1) as f64
        );
    }
    // Every sampled block's listing, split by the kind of code the samples fell in.
    let mut kinds = [0.0f64; 4];
    const KIND: [&str; 4] = [
        "block entry (budget check, instruction count)",
        "guest instructions with a memory operand (TLB probe, flag save, access)",
        "other guest instructions",
        "out of line (exit stubs, slow paths)",
    ];
    for &(b, _) in &ranked {
        let bl = &blocks[b];
        let mut kind = 0;
        for l in &lines[bl.lines.0 + 1..bl.lines.1] {
            if is_guest_line(l) {
                let t = l.trim();
                kind = if t.starts_with("(entry") {
                    0
                } else if t.starts_with("(out of line") {
                    3
                } else if t.contains('[') && !t.contains(" lea ") {
                    1
                } else {
                    2
                };
            } else if let Some(p) = host_offset(l).and_then(|o| per_offset.get(&o)) {
                kinds[kind] += p;
            }
        }
    }
    println!("samples in generated code by kind:");
    for (k, p) in KIND.iter().zip(kinds) {
        println!("  {p:6.2}%  {k}");
    }
    for &(b, pct) in ranked.iter().take(annotate) {
        let bl = &blocks[b];
        println!(
            "\nblock at eip {:08x} ({pct:.2}% of samples), share per guest instruction:",
            bl.eip
        );
        // Sum the samples of each guest instruction's host lines; the entry and
        // out-of-line sections are charged to their own headings.
        let body = &lines[bl.lines.0 + 1..bl.lines.1];
        let mut heads: Vec<(String, f64)> = Vec::new();
        for l in body {
            if is_guest_line(l) {
                heads.push((l.trim().to_string(), 0.0));
            } else if let Some(off) = host_offset(l) {
                if let (Some(h), Some(p)) = (heads.last_mut(), per_offset.get(&off)) {
                    h.1 += p;
                }
            }
        }
        for (h, p) in heads {
            println!("  {p:6.2}%  {h}");
        }
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn reads_a_listing_header() {
        let h = "block phys 0xf069481 mode 111 eip 0x081c2481: 54 guest instructions, \
                 2683 host bytes at +0xd543c0";
        assert_eq!(parse_header(h), Some((0x081c2481, 54, 2683, 0xd543c0)));
        assert_eq!(parse_header("jit: 86537 blocks translated"), None);
    }

    #[test]
    fn tells_guest_lines_from_host_lines() {
        assert_eq!(host_offset("        d543f2  mov esi,ecx"), Some(0xd543f2));
        assert!(is_guest_line("  081c2481  mov esi,ecx"));
        assert!(is_guest_line("  (out of line: exit stubs, slow paths)"));
        assert!(!is_guest_line("        d543f2  mov esi,ecx"));
        assert_eq!(host_offset("  081c2481  mov esi,ecx"), None);
    }
}
