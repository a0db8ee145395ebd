//! `bench`: the benchmark runner. Boots `bench-i386.cpio.gz` under morph86 (JIT and
//! interpreter) and qemu-system-i386 (TCG), runs the same busybox workloads natively and
//! under qemu-i386 (user mode), repeats everything N times and prints medians and ratios,
//! with every sample in a JSON file. `bench --help` says how.
//!
//! How a figure is taken:
//! - Inside a guest, a workload's time is the host's wall time between the arrival of the
//!   `BENCH-BEGIN name i` and `BENCH-END name i ...` lines on the serial console (read line
//!   by line, each stamped when its newline arrives). Guest clocks in emulators can be
//!   wrong, so the guest's own figures (busybox `time` "real", the uptime delta) are kept
//!   beside it but never used for the table.
//! - The boot is the host's wall time from spawning the emulator to the `GUEST-READY` line.
//! - Natively and under qemu-i386, the runner times `busybox-i386 <applet args>` (spawn to
//!   exit) in a scratch directory holding `corpus.bin` and `primes.awk`, stdout to /dev/null.
//! - Every repetition is a separate boot (`bench=<list> reps=1`): the N samples of a
//!   workload are independent, and every boot gives a boot sample. Repetitions are the
//!   outer loop and engines the inner one, so a burst of host load spreads over engines
//!   instead of hitting all samples of one.

use serde_json::{json, Value};
use std::collections::BTreeMap;
use std::io::{BufRead, BufReader, Read};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, ExitCode, Stdio};
use std::sync::mpsc;
use std::time::{Duration, Instant, SystemTime, UNIX_EPOCH};

const USAGE: &str = "usage: bench [--engines LIST] [--workloads LIST] [--reps N] [--kernel NAME]
             [--initrd NAME] [--guests DIR] [--json PATH] [--timeout SECS] [--check]
             [--interp-workloads] [--append-extra STR] [--morph86 PATH] [--no-build]
             [--verbose]
Boots the benchmark guest under morph86 and qemu-system-i386, runs the workloads of
workloads.list natively and under qemu-i386, and prints the medians (seconds, host wall
clock) and the ratios morph86/native and morph86/QEMU, per workload and for the boot to
GUEST-READY. Every repetition is a fresh boot running each workload once. Exits non-zero
if any engine failed (missing program, timeout, no marker, CHECK mismatch).
  --engines LIST      comma-separated of: native, qemu-user, qemu (= qemu-system), jit,
                      interp, all (default: native,qemu-user,qemu,jit,interp)
  --workloads LIST    comma-separated names from workloads.list (default: all of them)
  --reps N            repetitions, the median is over them (default 3)
  --kernel NAME       kernel file in the guest directory (default vmlinuz-686)
  --initrd NAME       initramfs in the guest directory (default bench-i386.cpio.gz)
  --guests DIR        guest directory (default $MORPH86_GUESTS, else ~/.cache/morph86/guests)
  --json PATH         where to write every sample as JSON
                      (default target/bench/bench-<UTC time>.json)
  --timeout SECS      limit for one boot or one native run; the engine is marked failed
                      (default 1800)
  --check             also run check=1 in the first boot (and hash the output natively and
                      under qemu-i386) and compare with expected-i386.txt
  --interp-workloads  run the workloads under the interpreter too; without it the
                      interpreter only boots (bench=none), since it is ~30-100x slower
                      than native and a full run takes hours
  --append-extra STR  added to both emulators' kernel command line
                      (default \"cryptomgr.notests\": skips the kernel's crypto self-tests)
  --morph86 PATH      the morph86 binary (default: beside this program, built first with
                      cargo build -p morph86 in the same profile)
  --no-build          do not run cargo build for morph86
  --verbose           echo the guests' serial output with host timestamps on stderr";

/// One way of running the workloads.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord)]
enum Engine {
    /// busybox-i386 on the host.
    Native,
    /// busybox-i386 under qemu-i386-static.
    QemuUser,
    /// The guest under qemu-system-i386 -accel tcg.
    QemuSystem,
    /// The guest under morph86 -accel jit.
    Jit,
    /// The guest under morph86 -accel interp.
    Interp,
}

/// Every engine, in the order of the table's columns and of a repetition.
const ALL_ENGINES: [Engine; 5] = [
    Engine::Native,
    Engine::QemuUser,
    Engine::QemuSystem,
    Engine::Jit,
    Engine::Interp,
];

impl Engine {
    /// The engine's name in flags, JSON and messages.
    fn name(self) -> &'static str {
        match self {
            Engine::Native => "native",
            Engine::QemuUser => "qemu-user",
            Engine::QemuSystem => "qemu-system",
            Engine::Jit => "morph86-jit",
            Engine::Interp => "morph86-interp",
        }
    }

    /// Parses one name of `--engines`.
    fn parse(s: &str) -> Option<Engine> {
        Some(match s {
            "native" => Engine::Native,
            "qemu-user" | "qemu-i386" => Engine::QemuUser,
            "qemu" | "qemu-system" | "qemu-system-i386" => Engine::QemuSystem,
            "jit" | "morph86-jit" => Engine::Jit,
            "interp" | "morph86-interp" => Engine::Interp,
            _ => return None,
        })
    }

    /// True for the engines that boot the guest.
    fn boots(self) -> bool {
        matches!(self, Engine::QemuSystem | Engine::Jit | Engine::Interp)
    }
}

/// Parses `--engines`: names separated by commas, `all` for every engine.
fn parse_engines(s: &str) -> Result<Vec<Engine>, String> {
    let mut v = Vec::new();
    for part in s.split(',').map(str::trim).filter(|p| !p.is_empty()) {
        if part == "all" {
            v.extend(ALL_ENGINES);
        } else {
            v.push(Engine::parse(part).ok_or_else(|| format!("unknown engine `{part}`"))?);
        }
    }
    v.sort();
    v.dedup();
    if v.is_empty() {
        return Err("no engine selected".into());
    }
    Ok(v)
}

/// One line of workloads.list: a name and the busybox applet with its arguments.
#[derive(Clone, Debug, PartialEq)]
struct Workload {
    name: String,
    argv: Vec<String>,
}

/// Parses workloads.list: `name applet args...` per line, `#` comments and blank lines
/// skipped (as the guest's /init does).
fn parse_workloads(text: &str) -> Vec<Workload> {
    text.lines()
        .filter_map(|l| {
            let mut f = l.split_whitespace();
            let name = f.next()?;
            if name.starts_with('#') {
                return None;
            }
            let argv: Vec<String> = f.map(str::to_string).collect();
            if argv.is_empty() {
                return None;
            }
            Some(Workload {
                name: name.to_string(),
                argv,
            })
        })
        .collect()
}

/// The `CHECK name hash` lines of a text (expected-i386.txt or a serial log) as a map.
fn parse_checks(text: &str) -> BTreeMap<String, String> {
    let mut m = BTreeMap::new();
    for l in text.lines() {
        if let Some(p) = l.find("CHECK ") {
            let mut f = l[p + 6..].split_whitespace();
            if let (Some(n), Some(h)) = (f.next(), f.next()) {
                // 64 hex digits; the kernel may print a message of its own straight
                // after them on the same console line (a watchdog warning, say).
                let hex = h.bytes().take_while(u8::is_ascii_hexdigit).count();
                if hex == 64 {
                    m.insert(n.to_string(), h[..64].to_ascii_lowercase());
                }
            }
        }
    }
    m
}

/// A duration as busybox `time` prints it ("0m 1.23s", "1h 2m 3.00s"), or the shells'
/// "0m1.234s", or plain seconds ("1.23"). None if it is none of these.
fn parse_duration(s: &str) -> Option<f64> {
    let s: String = s.chars().filter(|c| !c.is_whitespace()).collect();
    if s.is_empty() {
        return None;
    }
    let mut total = 0.0;
    let mut num = String::new();
    for c in s.chars() {
        match c {
            '0'..='9' | '.' => num.push(c),
            'h' | 'm' | 's' => {
                let v: f64 = num.parse().ok()?;
                total += v * match c {
                    'h' => 3600.0,
                    'm' => 60.0,
                    _ => 1.0,
                };
                num.clear();
            }
            _ => return None,
        }
    }
    if !num.is_empty() {
        total += num.parse::<f64>().ok()?;
    }
    Some(total)
}

/// One timed workload run seen on a guest's serial console.
#[derive(Clone, Debug, PartialEq)]
struct GuestRun {
    name: String,
    rep: u32,
    /// Host seconds between the BENCH-BEGIN and BENCH-END lines.
    host_secs: f64,
    /// The guest's busybox `time` "real" figure.
    guest_real: Option<f64>,
    /// The guest's uptime delta from the BENCH-END line.
    guest_uptime: Option<f64>,
}

/// What a guest's serial log says.
#[derive(Clone, Debug, Default, PartialEq)]
struct GuestLog {
    /// Host seconds from spawn to the GUEST-READY line.
    ready: Option<f64>,
    /// The GUEST-DONE line arrived.
    done: bool,
    /// Completed workload runs, in order.
    runs: Vec<GuestRun>,
    /// CHECK lines.
    checks: BTreeMap<String, String>,
}

/// The text from `marker` on, if the line holds it (a kernel message may precede it on
/// the same line when the console interleaves).
fn after<'a>(line: &'a str, marker: &str) -> Option<&'a str> {
    line.find(marker).map(|p| &line[p + marker.len()..])
}

/// Reads the markers of a serial log given as (host seconds since spawn, line).
fn parse_guest_log(lines: &[(f64, String)]) -> GuestLog {
    let mut log = GuestLog::default();
    // The open run: name, rep, begin time, `time` real seen so far.
    let mut open: Option<(String, u32, f64, Option<f64>)> = None;
    for (t, raw) in lines {
        let line = raw.trim_end_matches(['\r', '\n']);
        if log.ready.is_none() && line.contains("GUEST-READY") {
            log.ready = Some(*t);
        }
        if line.contains("GUEST-DONE") {
            log.done = true;
        }
        if let Some(rest) = after(line, "BENCH-BEGIN ") {
            let mut f = rest.split_whitespace();
            if let (Some(n), Some(Ok(r))) = (f.next(), f.next().map(str::parse::<u32>)) {
                open = Some((n.to_string(), r, *t, None));
            }
            continue;
        }
        if let Some(rest) = after(line, "BENCH-END ") {
            let mut f = rest.split_whitespace();
            let n = f.next();
            let r = f.next().and_then(|r| r.parse::<u32>().ok());
            let up = f
                .find_map(|w| w.strip_prefix("uptime_delta="))
                .and_then(|v| v.parse::<f64>().ok());
            if let Some((on, or, t0, real)) = open.take() {
                if Some(on.as_str()) == n && Some(or) == r {
                    log.runs.push(GuestRun {
                        name: on,
                        rep: or,
                        host_secs: t - t0,
                        guest_real: real,
                        guest_uptime: up,
                    });
                }
            }
            continue;
        }
        if let Some((_, _, _, real)) = open.as_mut() {
            // "real\t0m 1.23s", possibly behind a kernel message on the same line.
            if real.is_none() {
                if let Some(rest) = line
                    .trim_start()
                    .strip_prefix("real ")
                    .or_else(|| after(line, "real\t"))
                {
                    *real = parse_duration(rest);
                }
            }
        }
    }
    log.checks = parse_checks(
        &lines
            .iter()
            .map(|(_, l)| l.as_str())
            .collect::<Vec<_>>()
            .join("\n"),
    );
    log
}

/// The median of some samples (the mean of the middle two for an even count).
fn median(v: &[f64]) -> Option<f64> {
    if v.is_empty() {
        return None;
    }
    let mut s = v.to_vec();
    s.sort_by(f64::total_cmp);
    let n = s.len();
    Some(if n % 2 == 1 {
        s[n / 2]
    } else {
        (s[n / 2 - 1] + s[n / 2]) / 2.0
    })
}

/// Seconds for the table: two decimals, three significant digits below 0.1 s.
fn fmt_secs(s: f64) -> String {
    if s < 0.1 {
        format!("{s:.3}")
    } else {
        format!("{s:.2}")
    }
}

/// A ratio a/b for the table ("6.40x"), "—" when either side is missing or b is 0.
fn fmt_ratio(a: Option<f64>, b: Option<f64>) -> String {
    match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => {
            let r = a / b;
            if r < 0.1 {
                format!("{r:.3}x")
            } else {
                format!("{r:.2}x")
            }
        }
        _ => "—".into(),
    }
}

/// One measured sample.
#[derive(Clone, Debug, PartialEq)]
struct Sample {
    rep: u32,
    /// Host wall seconds (the figure the table uses).
    secs: f64,
    /// The guest's `time` real figure, inside a guest.
    guest_real: Option<f64>,
    /// The guest's uptime delta, inside a guest.
    guest_uptime: Option<f64>,
    /// The host's 1-minute load average when the sample ended.
    load1: Option<f64>,
}

/// The samples and failures of one engine for one row ("boot" or a workload).
#[derive(Clone, Debug, Default)]
struct Series {
    samples: Vec<Sample>,
    failures: Vec<String>,
}

/// The name of the boot row.
const BOOT: &str = "boot";

/// Every measurement of a run, keyed by (engine, row).
#[derive(Default)]
struct Results {
    series: BTreeMap<(Engine, String), Series>,
}

impl Results {
    fn entry(&mut self, e: Engine, row: &str) -> &mut Series {
        self.series.entry((e, row.to_string())).or_default()
    }
    fn add(&mut self, e: Engine, row: &str, s: Sample) {
        self.entry(e, row).samples.push(s);
    }
    fn fail(&mut self, e: Engine, row: &str, why: String) {
        eprintln!("FAILED {} {row}: {why}", e.name());
        self.entry(e, row).failures.push(why);
    }
    fn get(&self, e: Engine, row: &str) -> Option<&Series> {
        self.series.get(&(e, row.to_string()))
    }
    fn median(&self, e: Engine, row: &str) -> Option<f64> {
        self.get(e, row)
            .and_then(|s| median(&s.samples.iter().map(|x| x.secs).collect::<Vec<_>>()))
    }
    fn any_failed(&self) -> bool {
        self.series.values().any(|s| !s.failures.is_empty())
    }
}

/// A table cell: the median, "FAIL" (or "FAIL/median" when some samples exist), "—" when
/// not measured, and the sample count when it is short of `reps`.
fn cell(r: &Results, e: Engine, row: &str, reps: u32) -> String {
    let Some(s) = r.get(e, row) else {
        return "—".into();
    };
    let m = median(&s.samples.iter().map(|x| x.secs).collect::<Vec<_>>());
    let mut out = match m {
        Some(m) => fmt_secs(m),
        None => String::new(),
    };
    if m.is_some() && (s.samples.len() as u32) < reps {
        out.push_str(&format!(" (n={})", s.samples.len()));
    }
    if !s.failures.is_empty() {
        out = if out.is_empty() {
            "FAIL".into()
        } else {
            format!("FAIL {out}")
        };
    }
    if out.is_empty() {
        "—".into()
    } else {
        out
    }
}

/// The table of medians as Markdown (pastes into the README).
fn table(r: &Results, rows: &[String], reps: u32) -> String {
    let mut t = String::from(
        "| workload | native | qemu-user | qemu-system | morph86 jit | morph86 interp | jit/native | jit/qemu | interp/qemu |\n\
         |---|---:|---:|---:|---:|---:|---:|---:|---:|\n",
    );
    for row in rows {
        let label = if row == BOOT {
            "boot to GUEST-READY"
        } else {
            row.as_str()
        };
        let jit = r.median(Engine::Jit, row);
        let interp = r.median(Engine::Interp, row);
        let qemu = r.median(Engine::QemuSystem, row);
        let native = r.median(Engine::Native, row);
        t.push_str(&format!(
            "| {label} | {} | {} | {} | {} | {} | {} | {} | {} |\n",
            cell(r, Engine::Native, row, reps),
            cell(r, Engine::QemuUser, row, reps),
            cell(r, Engine::QemuSystem, row, reps),
            cell(r, Engine::Jit, row, reps),
            cell(r, Engine::Interp, row, reps),
            fmt_ratio(jit, native),
            fmt_ratio(jit, qemu),
            fmt_ratio(interp, qemu),
        ));
    }
    t
}

/// The guests' own clocks beside the host's, per booting engine and workload: medians of
/// host wall / `time` real / uptime delta.
fn guest_clock_table(r: &Results, rows: &[String]) -> String {
    let mut t = String::from(
        "| workload | engine | host wall | guest `time` real | guest uptime delta |\n|---|---|---:|---:|---:|\n",
    );
    let opt = |v: Option<f64>| v.map(fmt_secs).unwrap_or_else(|| "—".into());
    for row in rows.iter().filter(|r| *r != BOOT) {
        for e in ALL_ENGINES.into_iter().filter(|e| e.boots()) {
            let Some(s) = r.get(e, row) else { continue };
            if s.samples.is_empty() {
                continue;
            }
            let pick = |f: fn(&Sample) -> Option<f64>| {
                median(&s.samples.iter().filter_map(f).collect::<Vec<_>>())
            };
            t.push_str(&format!(
                "| {row} | {} | {} | {} | {} |\n",
                e.name(),
                opt(pick(|x| Some(x.secs))),
                opt(pick(|x| x.guest_real)),
                opt(pick(|x| x.guest_uptime)),
            ));
        }
    }
    t
}

/// The JSON document: options, host, versions, every sample, medians and ratios.
fn to_json(r: &Results, rows: &[String], meta: Value) -> Value {
    let results: Vec<Value> = r
        .series
        .iter()
        .map(|((e, row), s)| {
            let secs: Vec<f64> = s.samples.iter().map(|x| x.secs).collect();
            json!({
                "engine": e.name(),
                "row": row,
                "median_s": median(&secs),
                "min_s": secs.iter().copied().reduce(f64::min),
                "max_s": secs.iter().copied().reduce(f64::max),
                "samples": s.samples.iter().map(|x| json!({
                    "rep": x.rep,
                    "host_wall_s": x.secs,
                    "guest_time_real_s": x.guest_real,
                    "guest_uptime_delta_s": x.guest_uptime,
                    "host_load1": x.load1,
                })).collect::<Vec<_>>(),
                "failures": s.failures,
            })
        })
        .collect();
    let ratio = |a: Option<f64>, b: Option<f64>| match (a, b) {
        (Some(a), Some(b)) if b > 0.0 => Some(a / b),
        _ => None,
    };
    let ratios: Vec<Value> = rows
        .iter()
        .map(|row| {
            let m = |e| r.median(e, row);
            json!({
                "row": row,
                "jit_over_native": ratio(m(Engine::Jit), m(Engine::Native)),
                "jit_over_qemu_system": ratio(m(Engine::Jit), m(Engine::QemuSystem)),
                "interp_over_native": ratio(m(Engine::Interp), m(Engine::Native)),
                "interp_over_qemu_system": ratio(m(Engine::Interp), m(Engine::QemuSystem)),
            })
        })
        .collect();
    json!({
        "schema": "morph86-bench/1",
        "meta": meta,
        "rows": rows,
        "results": results,
        "ratios": ratios,
        "failed": r.any_failed(),
    })
}

// ---------------------------------------------------------------------------------------
// Host facts.

/// The 1-minute load average, from /proc/loadavg.
fn load1() -> Option<f64> {
    std::fs::read_to_string("/proc/loadavg")
        .ok()?
        .split_whitespace()
        .next()?
        .parse()
        .ok()
}

/// The three load averages as /proc/loadavg prints them.
fn loadavg() -> String {
    std::fs::read_to_string("/proc/loadavg")
        .map(|s| s.split_whitespace().take(3).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// The host CPU's model name from /proc/cpuinfo.
fn cpu_model() -> String {
    std::fs::read_to_string("/proc/cpuinfo")
        .ok()
        .and_then(|t| {
            t.lines()
                .find(|l| l.starts_with("model name"))
                .and_then(|l| l.split_once(':'))
                .map(|(_, v)| v.trim().to_string())
        })
        .unwrap_or_default()
}

/// Days since 1970-01-01 to a (year, month, day) of the proleptic Gregorian calendar.
fn civil_from_days(z: i64) -> (i64, u32, u32) {
    let z = z + 719_468;
    let era = z.div_euclid(146_097);
    let doe = z.rem_euclid(146_097);
    let yoe = (doe - doe / 1460 + doe / 36_524 - doe / 146_096) / 365;
    let doy = doe - (365 * yoe + yoe / 4 - yoe / 100);
    let mp = (5 * doy + 2) / 153;
    let d = (doy - (153 * mp + 2) / 5 + 1) as u32;
    let m = if mp < 10 { mp + 3 } else { mp - 9 } as u32;
    (yoe + era * 400 + i64::from(m <= 2), m, d)
}

/// A Unix time as ISO 8601 UTC ("2026-11-21T14:05:09Z").
fn iso_utc(secs: u64) -> String {
    let (y, mo, d) = civil_from_days((secs / 86_400) as i64);
    let s = secs % 86_400;
    format!(
        "{y:04}-{mo:02}-{d:02}T{:02}:{:02}:{:02}Z",
        s / 3600,
        s / 60 % 60,
        s % 60
    )
}

fn now_unix() -> u64 {
    SystemTime::now()
        .duration_since(UNIX_EPOCH)
        .map(|d| d.as_secs())
        .unwrap_or(0)
}

/// A program's path: as given if it has a slash, else the first match in $PATH.
fn which(prog: &str) -> Option<PathBuf> {
    if prog.contains('/') {
        let p = PathBuf::from(prog);
        return p.is_file().then_some(p);
    }
    std::env::var_os("PATH").and_then(|paths| {
        std::env::split_paths(&paths)
            .map(|d| d.join(prog))
            .find(|p| p.is_file())
    })
}

/// The first line of `prog args` output, for the versions record.
fn first_line_of(prog: &Path, args: &[&str]) -> Option<String> {
    let out = Command::new(prog)
        .args(args)
        .stdin(Stdio::null())
        .output()
        .ok()?;
    let text =
        String::from_utf8_lossy(&out.stdout).into_owned() + &String::from_utf8_lossy(&out.stderr);
    text.lines()
        .map(str::trim)
        .find(|l| !l.is_empty())
        .map(str::to_string)
}

/// The workspace root (the testsuite crate's parent directory).
fn workspace() -> PathBuf {
    Path::new(env!("CARGO_MANIFEST_DIR"))
        .parent()
        .map(Path::to_path_buf)
        .unwrap_or_else(|| PathBuf::from("."))
}

/// The workspace's git commit, with "-dirty" when tracked files differ from it.
fn git_version() -> Option<String> {
    let ws = workspace();
    let rev = first_line_of(Path::new("git"), &["-C", ws.to_str()?, "rev-parse", "HEAD"])?;
    let dirty = Command::new("git")
        .args([
            "-C",
            ws.to_str()?,
            "status",
            "--porcelain",
            "--untracked-files=no",
        ])
        .output()
        .ok()
        .map(|o| !o.stdout.is_empty())
        .unwrap_or(false);
    Some(if dirty { format!("{rev}-dirty") } else { rev })
}

// ---------------------------------------------------------------------------------------
// Running things.

/// Waits for `child` at most `timeout`; kills it on expiry. Returns its success and the
/// instant it ended (taken in the waiting thread right after `wait` returns).
fn wait_timeout(child: Child, timeout: Duration) -> Result<(bool, Instant), String> {
    let pid = child.id();
    let (tx, rx) = mpsc::channel();
    let mut child = child;
    std::thread::spawn(move || {
        let st = child.wait();
        let t = Instant::now();
        let _ = tx.send((st, t));
    });
    match rx.recv_timeout(timeout) {
        Ok((Ok(st), t)) => Ok((st.success(), t)),
        Ok((Err(e), _)) => Err(format!("wait failed: {e}")),
        Err(_) => {
            // SAFETY: kill(2) on the pid of a child this process spawned and has not yet
            // reaped (the waiting thread reaps it only after it dies); no memory is touched.
            unsafe {
                libc::kill(pid as libc::pid_t, libc::SIGKILL);
            }
            let _ = rx.recv_timeout(Duration::from_secs(10));
            Err(format!("timed out after {} s, killed", timeout.as_secs()))
        }
    }
}

/// Runs a busybox workload natively or under a user-mode emulator (`prefix`), stdout to
/// /dev/null, and returns the host wall seconds from spawn to exit.
fn time_user(
    prefix: &[PathBuf],
    busybox: &Path,
    w: &Workload,
    dir: &Path,
    timeout: Duration,
) -> Result<f64, String> {
    let mut cmd = match prefix.first() {
        Some(p) => {
            let mut c = Command::new(p);
            c.args(&prefix[1..]).arg(busybox);
            c
        }
        None => Command::new(busybox),
    };
    cmd.args(&w.argv)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::null());
    let t0 = Instant::now();
    let child = cmd
        .spawn()
        .map_err(|e| format!("cannot run {}: {e}", cmd.get_program().to_string_lossy()))?;
    let (ok, t1) = wait_timeout(child, timeout)?;
    if !ok {
        return Err(format!("{} {} failed", busybox.display(), w.argv.join(" ")));
    }
    Ok((t1 - t0).as_secs_f64())
}

/// Runs a workload once with its output in a file and returns the output's sha256 (by the
/// host's `sha256sum`), for `--check` natively and under qemu-i386.
fn hash_user(
    prefix: &[PathBuf],
    busybox: &Path,
    w: &Workload,
    dir: &Path,
    timeout: Duration,
) -> Result<String, String> {
    let out_path = dir.join("check-output.bin");
    let out = std::fs::File::create(&out_path).map_err(|e| format!("{e}"))?;
    let mut cmd = match prefix.first() {
        Some(p) => {
            let mut c = Command::new(p);
            c.args(&prefix[1..]).arg(busybox);
            c
        }
        None => Command::new(busybox),
    };
    cmd.args(&w.argv)
        .current_dir(dir)
        .stdin(Stdio::null())
        .stdout(out)
        .stderr(Stdio::null());
    let child = cmd.spawn().map_err(|e| format!("cannot run: {e}"))?;
    let (ok, _) = wait_timeout(child, timeout)?;
    if !ok {
        return Err("workload failed".into());
    }
    let h = Command::new("sha256sum")
        .arg(&out_path)
        .output()
        .map_err(|e| format!("sha256sum: {e}"))?;
    let _ = std::fs::remove_file(&out_path);
    String::from_utf8_lossy(&h.stdout)
        .split_whitespace()
        .next()
        .map(str::to_string)
        .ok_or_else(|| "sha256sum printed nothing".into())
}

/// The most serial bytes kept per boot (a runaway guest cannot exhaust host memory).
const MAX_LOG_BYTES: usize = 16 << 20;

/// What one boot produced.
struct Boot {
    /// (host seconds since spawn, line) per serial line.
    lines: Vec<(f64, String)>,
    /// The emulator's stderr (its tail).
    stderr: String,
    /// Why the boot failed, if it did (timeout, exit status).
    error: Option<String>,
}

/// Spawns an emulator and collects its serial output (stdout) line by line, each line
/// stamped with the host time since spawn when its newline arrived.
fn run_boot(mut cmd: Command, timeout: Duration, echo: bool) -> Boot {
    cmd.stdin(Stdio::null())
        .stdout(Stdio::piped())
        .stderr(Stdio::piped());
    let t0 = Instant::now();
    let mut child = match cmd.spawn() {
        Ok(c) => c,
        Err(e) => {
            return Boot {
                lines: Vec::new(),
                stderr: String::new(),
                error: Some(format!(
                    "cannot run {}: {e}",
                    cmd.get_program().to_string_lossy()
                )),
            }
        }
    };
    let (tx, rx) = mpsc::channel::<(f64, String)>();
    let stdout = child.stdout.take();
    let reader = std::thread::spawn(move || {
        let Some(out) = stdout else { return };
        let mut r = BufReader::new(out);
        let mut buf = Vec::new();
        let mut total = 0usize;
        loop {
            buf.clear();
            match r.read_until(b'\n', &mut buf) {
                Ok(0) | Err(_) => break,
                Ok(n) => {
                    let t = t0.elapsed().as_secs_f64();
                    total += n;
                    if total > MAX_LOG_BYTES {
                        continue; // keep draining so the emulator never blocks
                    }
                    if tx
                        .send((t, String::from_utf8_lossy(&buf).into_owned()))
                        .is_err()
                    {
                        break;
                    }
                }
            }
        }
    });
    let stderr = child.stderr.take();
    let err_reader = std::thread::spawn(move || {
        let mut s = Vec::new();
        if let Some(mut e) = stderr {
            let mut chunk = [0u8; 8192];
            while let Ok(n) = e.read(&mut chunk) {
                if n == 0 {
                    break;
                }
                s.extend_from_slice(&chunk[..n]);
                if s.len() > 64 << 10 {
                    s.drain(..s.len() - (32 << 10));
                }
            }
        }
        String::from_utf8_lossy(&s).into_owned()
    });
    let deadline = t0 + timeout;
    let mut lines = Vec::new();
    let mut error = None;
    // After GUEST-DONE the guest reboots, which ends the emulator under -no-reboot; give
    // it a short grace period, then stop it (no failure: every figure is in).
    let mut done_at: Option<Instant> = None;
    loop {
        let now = Instant::now();
        let limit = match done_at {
            Some(d) => (d + Duration::from_secs(60)).min(deadline),
            None => deadline,
        };
        if now >= limit {
            let _ = child.kill();
            if done_at.is_none() {
                error = Some(format!("timed out after {} s, killed", timeout.as_secs()));
            }
            break;
        }
        match rx.recv_timeout(limit - now) {
            Ok((t, l)) => {
                if echo {
                    eprint!("[{t:9.3}] {l}");
                    if !l.ends_with('\n') {
                        eprintln!();
                    }
                }
                if done_at.is_none() && l.contains("GUEST-DONE") {
                    done_at = Some(Instant::now());
                }
                lines.push((t, l));
            }
            Err(mpsc::RecvTimeoutError::Timeout) => continue,
            Err(mpsc::RecvTimeoutError::Disconnected) => break,
        }
    }
    // The serial pipe closed, or the guest is done: the emulator is ending. Wait for it
    // until the deadline at most (a process that closed its stdout early but runs on is
    // stopped there).
    let status = loop {
        match child.try_wait() {
            Ok(Some(st)) => break Ok(st),
            Ok(None) if Instant::now() < deadline => std::thread::sleep(Duration::from_millis(20)),
            Ok(None) => {
                let _ = child.kill();
                if error.is_none() && done_at.is_none() {
                    error = Some(format!("timed out after {} s, killed", timeout.as_secs()));
                }
                break child.wait();
            }
            Err(e) => break Err(e),
        }
    };
    let _ = reader.join();
    let stderr = err_reader.join().unwrap_or_default();
    if error.is_none() && done_at.is_none() {
        if let Ok(st) = status {
            if !st.success() {
                error = Some(format!("exited with {st}"));
            }
        }
    }
    Boot {
        lines,
        stderr,
        error,
    }
}

/// Writes the JSON document (pretty), making the directory first.
fn write_json(path: &Path, doc: &Value) -> Result<(), String> {
    if let Some(d) = path.parent() {
        let _ = std::fs::create_dir_all(d);
    }
    let text = serde_json::to_string_pretty(doc).map_err(|e| e.to_string())?;
    std::fs::write(path, text + "\n").map_err(|e| e.to_string())
}

/// Records a failure that ends an engine's part in the run.
fn kill_engine(res: &mut Results, dead: &mut Vec<Engine>, e: Engine, row: &str, why: String) {
    res.fail(e, row, why);
    dead.push(e);
}

/// The last `n` lines of a text, for failure messages.
fn tail(text: &str, n: usize) -> String {
    let v: Vec<&str> = text.lines().collect();
    v[v.len().saturating_sub(n)..].join("\n")
}

/// Options.
struct Opts {
    engines: Vec<Engine>,
    workloads: Option<Vec<String>>,
    reps: u32,
    kernel: String,
    initrd: String,
    guests: PathBuf,
    json: Option<PathBuf>,
    timeout: Duration,
    check: bool,
    interp_workloads: bool,
    append_extra: String,
    morph86: Option<PathBuf>,
    no_build: bool,
    verbose: bool,
}

fn default_guests() -> PathBuf {
    if let Some(d) = std::env::var_os("MORPH86_GUESTS") {
        return PathBuf::from(d);
    }
    let home = std::env::var_os("HOME").unwrap_or_else(|| "/root".into());
    PathBuf::from(home).join(".cache/morph86/guests")
}

fn parse_args(args: &[String]) -> Result<Opts, String> {
    let mut o = Opts {
        engines: ALL_ENGINES.to_vec(),
        workloads: None,
        reps: 3,
        kernel: "vmlinuz-686".into(),
        initrd: "bench-i386.cpio.gz".into(),
        guests: default_guests(),
        json: None,
        timeout: Duration::from_secs(1800),
        check: false,
        interp_workloads: false,
        append_extra: "cryptomgr.notests".into(),
        morph86: None,
        no_build: false,
        verbose: false,
    };
    let mut it = args.iter();
    while let Some(a) = it.next() {
        let mut val = || {
            it.next()
                .cloned()
                .ok_or_else(|| format!("{a} needs a value"))
        };
        match a.as_str() {
            "--engines" => o.engines = parse_engines(&val()?)?,
            "--workloads" => {
                o.workloads = Some(
                    val()?
                        .split(',')
                        .map(|s| s.trim().to_string())
                        .filter(|s| !s.is_empty())
                        .collect(),
                )
            }
            "--reps" => {
                o.reps = val()?
                    .parse()
                    .map_err(|_| "--reps needs a number".to_string())?;
                if o.reps == 0 {
                    return Err("--reps must be at least 1".into());
                }
            }
            "--kernel" => o.kernel = val()?,
            "--initrd" => o.initrd = val()?,
            "--guests" => o.guests = PathBuf::from(val()?),
            "--json" => o.json = Some(PathBuf::from(val()?)),
            "--timeout" => {
                let s: f64 = val()?
                    .parse()
                    .map_err(|_| "--timeout needs seconds".to_string())?;
                if !(s > 0.0 && s < 1e7) {
                    return Err("--timeout out of range".into());
                }
                o.timeout = Duration::from_secs_f64(s);
            }
            "--check" => o.check = true,
            "--interp-workloads" => o.interp_workloads = true,
            "--append-extra" => o.append_extra = val()?,
            "--morph86" => o.morph86 = Some(PathBuf::from(val()?)),
            "--no-build" => o.no_build = true,
            "--verbose" => o.verbose = true,
            "-h" | "--help" => return Err(String::new()),
            _ => return Err(format!("unknown argument `{a}`")),
        }
    }
    Ok(o)
}

/// The guest kernel command line (the same for morph86 and QEMU).
fn guest_append(extra: &str, bench: &str, check: bool) -> String {
    let mut a = String::from("console=ttyS0");
    if !extra.trim().is_empty() {
        a.push(' ');
        a.push_str(extra.trim());
    }
    if bench.is_empty() {
        a.push_str(" bench=none reps=0");
    } else {
        a.push_str(&format!(" bench={bench} reps=1"));
    }
    if check {
        a.push_str(" check=1");
    }
    a
}

/// Builds morph86 with cargo in the profile of this program, so the figures are of the
/// current source.
fn build_morph86() -> Result<(), String> {
    let cargo = std::env::var_os("CARGO").unwrap_or_else(|| "cargo".into());
    let mut cmd = Command::new(cargo);
    cmd.current_dir(workspace())
        .args(["build", "-p", "morph86"]);
    if !cfg!(debug_assertions) {
        cmd.arg("--release");
    }
    eprintln!("building morph86: {cmd:?}");
    let st = cmd.status().map_err(|e| format!("cannot run cargo: {e}"))?;
    if st.success() {
        Ok(())
    } else {
        Err(format!("cargo build -p morph86 failed ({st})"))
    }
}

/// Records one boot's figures: the boot time, each workload's host time and guest
/// figures, CHECK comparisons; failures for whatever is missing.
fn record_boot(
    res: &mut Results,
    e: Engine,
    rep: u32,
    boot: &Boot,
    names: &[String],
    expected: Option<&BTreeMap<String, String>>,
) -> bool {
    let log = parse_guest_log(&boot.lines);
    let load = load1();
    let mut ok = boot.error.is_none();
    let why = |what: &str| {
        let mut s = format!("rep {rep}: {what}");
        if let Some(err) = &boot.error {
            s.push_str(&format!(" ({err})"));
        }
        let serial: String = boot
            .lines
            .iter()
            .map(|(_, l)| l.trim_end_matches(['\r', '\n']).to_string() + "\n")
            .collect();
        s.push_str(&format!(
            "\n  last serial lines:\n{}\n  stderr:\n{}",
            tail(&serial, 8),
            tail(&boot.stderr, 8)
        ));
        s
    };
    match log.ready {
        Some(t) => res.add(
            e,
            BOOT,
            Sample {
                rep,
                secs: t,
                guest_real: None,
                guest_uptime: None,
                load1: load,
            },
        ),
        None => {
            res.fail(e, BOOT, why("no GUEST-READY line"));
            return false;
        }
    }
    for n in names {
        match log.runs.iter().find(|r| &r.name == n) {
            Some(r) => res.add(
                e,
                n,
                Sample {
                    rep,
                    secs: r.host_secs,
                    guest_real: r.guest_real,
                    guest_uptime: r.guest_uptime,
                    load1: load,
                },
            ),
            None => {
                ok = false;
                res.fail(e, n, why("no BENCH-BEGIN/BENCH-END pair"));
            }
        }
        if let Some(exp) = expected {
            match (log.checks.get(n), exp.get(n)) {
                (Some(got), Some(want)) if got == want => {
                    eprintln!("{}: CHECK {n} ok", e.name())
                }
                (got, want) => {
                    ok = false;
                    res.fail(
                        e,
                        n,
                        format!(
                            "rep {rep}: CHECK {n} is {}, expected {}",
                            got.map_or("missing", |s| s.as_str()),
                            want.map_or("missing", |s| s.as_str())
                        ),
                    );
                }
            }
        }
    }
    if ok && !log.done && boot.error.is_none() {
        res.fail(e, BOOT, why("no GUEST-DONE line"));
        ok = false;
    }
    if let Some(err) = &boot.error {
        if log.ready.is_some() && names.iter().all(|n| log.runs.iter().any(|r| &r.name == n)) {
            res.fail(e, BOOT, why(err));
        }
    }
    ok
}

fn main() -> ExitCode {
    let argv: Vec<String> = std::env::args().collect();
    let o = match parse_args(&argv[1..]) {
        Ok(o) => o,
        Err(e) if e.is_empty() => {
            println!("{USAGE}");
            return ExitCode::SUCCESS;
        }
        Err(e) => {
            eprintln!("bench: {e}\n{USAGE}");
            return ExitCode::from(2);
        }
    };
    let started = now_unix();
    let load_start = loadavg();

    // Guest files.
    let g = &o.guests;
    let list_path = g.join("workloads.list");
    let all_workloads = match std::fs::read_to_string(&list_path) {
        Ok(t) => parse_workloads(&t),
        Err(e) => {
            eprintln!(
                "bench: cannot read {} ({e}); build the guests with ../shared/guests/make-guests.sh \
                 or point --guests / $MORPH86_GUESTS at them",
                list_path.display()
            );
            return ExitCode::FAILURE;
        }
    };
    let workloads: Vec<Workload> = match &o.workloads {
        None => all_workloads.clone(),
        Some(names) => {
            let mut v = Vec::new();
            for n in names {
                match all_workloads.iter().find(|w| &w.name == n) {
                    Some(w) => v.push(w.clone()),
                    None => {
                        let known: Vec<&str> =
                            all_workloads.iter().map(|w| w.name.as_str()).collect();
                        eprintln!(
                            "bench: no workload `{n}` in {} (known: {})",
                            list_path.display(),
                            known.join(", ")
                        );
                        return ExitCode::from(2);
                    }
                }
            }
            v
        }
    };
    let names: Vec<String> = workloads.iter().map(|w| w.name.clone()).collect();
    let mut rows = vec![BOOT.to_string()];
    rows.extend(names.iter().cloned());

    let mut res = Results::default();
    let mut dead: Vec<Engine> = Vec::new();

    let expected = if o.check {
        let p = g.join("expected-i386.txt");
        match std::fs::read_to_string(&p) {
            Ok(t) => Some(parse_checks(&t)),
            Err(e) => {
                eprintln!("bench: --check needs {} ({e})", p.display());
                return ExitCode::FAILURE;
            }
        }
    } else {
        None
    };

    // Programs.
    let busybox = g.join("busybox-i386");
    let kernel = g.join(&o.kernel);
    let initrd = g.join(&o.initrd);
    let qemu_user = which("qemu-i386-static").or_else(|| which("qemu-i386"));
    let qemu_system = which("qemu-system-i386");
    let wants_morph86 = o
        .engines
        .iter()
        .any(|e| matches!(e, Engine::Jit | Engine::Interp));
    let morph86 = o.morph86.clone().unwrap_or_else(|| {
        std::env::current_exe()
            .ok()
            .and_then(|p| p.parent().map(|d| d.join("morph86")))
            .unwrap_or_else(|| workspace().join("target/release/morph86"))
    });
    for e in o.engines.clone() {
        let missing = match e {
            Engine::Native | Engine::QemuUser if !busybox.is_file() => {
                Some(format!("{} not found", busybox.display()))
            }
            Engine::QemuUser if qemu_user.is_none() => {
                Some("qemu-i386-static not found in PATH (apt-get install qemu-user-static)".into())
            }
            Engine::QemuSystem if qemu_system.is_none() => {
                Some("qemu-system-i386 not found in PATH (apt-get install qemu-system-x86)".into())
            }
            e if e.boots() && !kernel.is_file() => Some(format!("{} not found", kernel.display())),
            e if e.boots() && !initrd.is_file() => Some(format!("{} not found", initrd.display())),
            _ => None,
        };
        if let Some(m) = missing {
            kill_engine(&mut res, &mut dead, e, BOOT, m);
        }
    }
    if wants_morph86 && o.morph86.is_none() && !o.no_build {
        if let Err(e) = build_morph86() {
            for en in [Engine::Jit, Engine::Interp] {
                if o.engines.contains(&en) && !dead.contains(&en) {
                    kill_engine(&mut res, &mut dead, en, BOOT, e.clone());
                }
            }
        }
    }
    if wants_morph86 && !morph86.is_file() {
        for en in [Engine::Jit, Engine::Interp] {
            if o.engines.contains(&en) && !dead.contains(&en) {
                kill_engine(
                    &mut res,
                    &mut dead,
                    en,
                    BOOT,
                    format!(
                        "{} not found (cargo build --release -p morph86)",
                        morph86.display()
                    ),
                );
            }
        }
    }

    // Run a private copy of morph86: a concurrent `cargo build` replacing the binary must
    // not change the engine between repetitions.
    let morph86_copy =
        std::env::temp_dir().join(format!("morph86-bench-{}-morph86", std::process::id()));
    let mut morph86_run = morph86.clone();
    if wants_morph86 && morph86.is_file() {
        match std::fs::copy(&morph86, &morph86_copy) {
            Ok(_) => morph86_run = morph86_copy.clone(),
            Err(e) => eprintln!(
                "bench: cannot copy {} ({e}); running it in place",
                morph86.display()
            ),
        }
    }

    // Scratch directory for the native and user-mode runs.
    let scratch = std::env::temp_dir().join(format!("morph86-bench-{}", std::process::id()));
    let needs_scratch = o
        .engines
        .iter()
        .any(|e| matches!(e, Engine::Native | Engine::QemuUser));
    if needs_scratch {
        let made = std::fs::create_dir_all(&scratch).and_then(|_| {
            for f in ["corpus.bin", "primes.awk"] {
                let dst = scratch.join(f);
                let _ = std::fs::remove_file(&dst);
                std::os::unix::fs::symlink(g.join(f), &dst)?;
            }
            Ok(())
        });
        if let Err(e) = made {
            for en in [Engine::Native, Engine::QemuUser] {
                if o.engines.contains(&en) && !dead.contains(&en) {
                    kill_engine(
                        &mut res,
                        &mut dead,
                        en,
                        BOOT,
                        format!("scratch directory: {e}"),
                    );
                }
            }
        }
    }

    // Checks of the user-mode engines: once, untimed, before the timed runs.
    if let Some(exp) = &expected {
        for e in [Engine::Native, Engine::QemuUser] {
            if !o.engines.contains(&e) || dead.contains(&e) {
                continue;
            }
            let prefix: Vec<PathBuf> = match e {
                Engine::QemuUser => qemu_user.iter().cloned().collect(),
                _ => Vec::new(),
            };
            for w in &workloads {
                match hash_user(&prefix, &busybox, w, &scratch, o.timeout) {
                    Ok(h) if exp.get(&w.name) == Some(&h) => {
                        eprintln!("{}: CHECK {} ok", e.name(), w.name)
                    }
                    Ok(h) => res.fail(
                        e,
                        &w.name,
                        format!(
                            "CHECK {} is {h}, expected {}",
                            w.name,
                            exp.get(&w.name).map_or("missing", |s| s.as_str())
                        ),
                    ),
                    Err(err) => res.fail(e, &w.name, format!("check run: {err}")),
                }
            }
        }
    }

    let bench_all = names.join(",");
    let json_path = o.json.clone().unwrap_or_else(|| {
        let stamp = iso_utc(started).replace(':', "");
        workspace().join(format!("target/bench/bench-{stamp}.json"))
    });
    let versions = json!({
        "morph86_git": git_version(),
        "morph86_binary": morph86,
        "morph86_binary_mtime_utc": std::fs::metadata(&morph86).and_then(|m| m.modified()).ok()
            .and_then(|t| t.duration_since(UNIX_EPOCH).ok()).map(|d| iso_utc(d.as_secs())),
        "qemu_system": qemu_system.as_ref().and_then(|p| first_line_of(p, &["--version"])),
        "qemu_user": qemu_user.as_ref().and_then(|p| first_line_of(p, &["--version"])),
        "busybox": first_line_of(&busybox, &[]),
        "guest_manifest": std::fs::read_to_string(g.join("MANIFEST.txt")).ok().map(|t| t.lines().filter(|l| !l.starts_with('#')).map(str::to_string).collect::<Vec<_>>()),
    });
    let make_doc = |res: &Results, reps_done: u32| {
        let meta = json!({
            "started_utc": iso_utc(started),
            "finished_utc": iso_utc(now_unix()),
            "reps_done": reps_done,
            "command": argv,
            "options": {
                "engines": o.engines.iter().map(|e| e.name()).collect::<Vec<_>>(),
                "workloads": names,
                "reps": o.reps,
                "kernel": kernel,
                "initrd": initrd,
                "append_example": guest_append(&o.append_extra, &bench_all, false),
                "interp_workloads": o.interp_workloads,
                "check": o.check,
                "timeout_s": o.timeout.as_secs_f64(),
                "method": "host wall clock: guests from the BENCH-BEGIN to the BENCH-END serial line, boot from spawn to GUEST-READY; native and qemu-user from spawn to exit; one boot per rep",
            },
            "host": {
                "cpu_model": cpu_model(),
                "nproc": std::thread::available_parallelism().map(|n| n.get()).unwrap_or(0),
                "loadavg_start": load_start,
                "loadavg_end": loadavg(),
                "os_release": std::fs::read_to_string("/proc/sys/kernel/osrelease").map(|s| s.trim().to_string()).unwrap_or_default(),
            },
            "versions": versions,
        });
        to_json(res, &rows, meta)
    };
    let mut rep_done = 0;
    for rep in 1..=o.reps {
        for e in o.engines.clone() {
            if dead.contains(&e) {
                continue;
            }
            eprintln!("[rep {rep}/{}] {} (load {})", o.reps, e.name(), loadavg());
            match e {
                Engine::Native | Engine::QemuUser => {
                    let prefix: Vec<PathBuf> = match e {
                        Engine::QemuUser => qemu_user.iter().cloned().collect(),
                        _ => Vec::new(),
                    };
                    for w in &workloads {
                        match time_user(&prefix, &busybox, w, &scratch, o.timeout) {
                            Ok(s) => {
                                eprintln!("    {:<12} {:>9} s", w.name, fmt_secs(s));
                                res.add(
                                    e,
                                    &w.name,
                                    Sample {
                                        rep,
                                        secs: s,
                                        guest_real: None,
                                        guest_uptime: None,
                                        load1: load1(),
                                    },
                                );
                            }
                            Err(err) => res.fail(e, &w.name, format!("rep {rep}: {err}")),
                        }
                    }
                }
                Engine::QemuSystem | Engine::Jit | Engine::Interp => {
                    let run_names: Vec<String> = if e == Engine::Interp && !o.interp_workloads {
                        Vec::new()
                    } else {
                        names.clone()
                    };
                    let check = expected.is_some() && rep == 1 && !run_names.is_empty();
                    let append = guest_append(&o.append_extra, &run_names.join(","), check);
                    let mut cmd;
                    if e == Engine::QemuSystem {
                        cmd = Command::new(qemu_system.as_ref().expect("checked above"));
                        cmd.args([
                            "-accel",
                            "tcg",
                            "-display",
                            "none",
                            "-serial",
                            "stdio",
                            "-monitor",
                            "none",
                            "-no-reboot",
                            "-m",
                            "256",
                        ]);
                    } else {
                        cmd = Command::new(&morph86_run);
                        cmd.args(["-nographic", "-no-reboot", "-m", "256", "-accel"]);
                        cmd.arg(if e == Engine::Jit { "jit" } else { "interp" });
                    }
                    cmd.arg("-kernel")
                        .arg(&kernel)
                        .arg("-initrd")
                        .arg(&initrd)
                        .arg("-append")
                        .arg(&append);
                    let boot = run_boot(cmd, o.timeout, o.verbose);
                    let exp = if check { expected.as_ref() } else { None };
                    let ok = record_boot(&mut res, e, rep, &boot, &run_names, exp);
                    let log = parse_guest_log(&boot.lines);
                    if let Some(t) = log.ready {
                        eprintln!("    {:<12} {:>9} s", "boot", fmt_secs(t));
                    }
                    for r in &log.runs {
                        eprintln!(
                            "    {:<12} {:>9} s   (guest: time real {}, uptime delta {})",
                            r.name,
                            fmt_secs(r.host_secs),
                            r.guest_real.map(fmt_secs).unwrap_or_else(|| "?".into()),
                            r.guest_uptime.map(fmt_secs).unwrap_or_else(|| "?".into()),
                        );
                    }
                    if !ok && boot.error.is_some() {
                        // A timeout or a crash would repeat: spend no more time on it.
                        dead.push(e);
                    }
                }
            }
        }
        // Partial results survive an interrupted run.
        rep_done = rep;
        if let Err(e) = write_json(&json_path, &make_doc(&res, rep_done)) {
            eprintln!("bench: cannot write {}: {e}", json_path.display());
        }
    }
    if needs_scratch {
        let _ = std::fs::remove_dir_all(&scratch);
    }
    let _ = std::fs::remove_file(&morph86_copy);

    // Report.
    let load_end = loadavg();
    println!(
        "\nmorph86 benchmarks, {} ({} reps, medians of host wall seconds; load average {} at start, {} at end)\n",
        iso_utc(started),
        o.reps,
        load_start,
        load_end
    );
    println!("{}", table(&res, &rows, o.reps));
    let gt = guest_clock_table(&res, &rows);
    if gt.lines().count() > 2 {
        println!("The guests' own clocks (medians):\n\n{gt}");
    }
    if o.engines.contains(&Engine::Jit) && o.engines.contains(&Engine::QemuSystem) {
        let faster: Vec<&String> = rows
            .iter()
            .filter(|r| {
                matches!((res.median(Engine::Jit, r), res.median(Engine::QemuSystem, r)),
                    (Some(j), Some(q)) if j < q)
            })
            .collect();
        println!(
            "morph86 jit is faster than qemu-system-i386 TCG on {} of {} rows{}",
            faster.len(),
            rows.len(),
            if faster.is_empty() {
                String::new()
            } else {
                format!(
                    " ({})",
                    faster
                        .iter()
                        .map(|s| s.as_str())
                        .collect::<Vec<_>>()
                        .join(", ")
                )
            }
        );
    }

    let doc = make_doc(&res, rep_done);
    match write_json(&json_path, &doc) {
        Ok(()) => println!("JSON: {}", json_path.display()),
        Err(e) => {
            eprintln!("bench: cannot write {}: {e}", json_path.display());
            return ExitCode::FAILURE;
        }
    }
    if res.any_failed() {
        println!("FAILED: see the FAIL cells and the messages above");
        return ExitCode::FAILURE;
    }
    ExitCode::SUCCESS
}

#[cfg(test)]
mod tests {
    use super::*;

    fn lines(v: &[(f64, &str)]) -> Vec<(f64, String)> {
        v.iter().map(|(t, l)| (*t, l.to_string())).collect()
    }

    #[test]
    fn durations_in_busybox_and_shell_forms() {
        assert_eq!(parse_duration("\t0m 1.23s"), Some(1.23));
        assert_eq!(parse_duration("1m 2.76s"), Some(62.76));
        assert_eq!(parse_duration("1h 0m 1.50s"), Some(3601.5));
        assert_eq!(parse_duration("0m1.250s"), Some(1.25));
        assert_eq!(parse_duration("7.5"), Some(7.5));
        assert_eq!(parse_duration(""), None);
        assert_eq!(parse_duration("abc"), None);
        assert_eq!(parse_duration("1.2.3s"), None);
    }

    #[test]
    fn serial_markers_give_host_times_and_guest_figures() {
        let l = lines(&[
            (0.5, "[    0.000000] Linux version 6.1\r\n"),
            (
                10.25,
                "GUEST-READY uptime=9.00 kernel=6.1.0 machine=i686\r\n",
            ),
            (
                10.5,
                "CHECK sha256 3D76A29FFF377D26C5BFE9613A28A6D8EF667942005B65105ADAD9D7A39A76F3\r\n",
            ),
            (11.0, "BENCH-BEGIN sha256 1\r\n"),
            (18.0, "real\t0m 6.80s\r\n"),
            (18.0, "user\t0m 6.00s\r\n"),
            (18.0, "sys\t0m 0.70s\r\n"),
            (18.5, "BENCH-END sha256 1 uptime_delta=6.95\r\n"),
            (19.0, "BENCH-BEGIN gzip9 1\n"),
            (28.0, "[   20.0] e1000: link up real\t0m 9.40s\n"),
            // a kernel message ahead of the marker on the same line
            (
                29.0,
                "[   20.1] random: crng init done BENCH-END gzip9 1 uptime_delta=9.5\n",
            ),
            (30.0, "GUEST-DONE uptime=21.00\n"),
        ]);
        let g = parse_guest_log(&l);
        assert_eq!(g.ready, Some(10.25));
        assert!(g.done);
        assert_eq!(g.runs.len(), 2);
        assert_eq!(g.runs[0].name, "sha256");
        assert_eq!(g.runs[0].rep, 1);
        assert!((g.runs[0].host_secs - 7.5).abs() < 1e-9);
        assert_eq!(g.runs[0].guest_real, Some(6.8));
        assert_eq!(g.runs[0].guest_uptime, Some(6.95));
        assert!((g.runs[1].host_secs - 10.0).abs() < 1e-9);
        assert_eq!(g.runs[1].guest_real, Some(9.4));
        assert_eq!(g.runs[1].guest_uptime, Some(9.5));
        assert_eq!(
            g.checks.get("sha256").map(String::as_str),
            Some("3d76a29fff377d26c5bfe9613a28a6d8ef667942005b65105adad9d7a39a76f3")
        );
    }

    #[test]
    fn unmatched_or_missing_markers_give_no_run() {
        let l = lines(&[
            (1.0, "BENCH-BEGIN sha256 1\n"),
            (2.0, "BENCH-END sha256 2 uptime_delta=1.0\n"),
            (3.0, "BENCH-BEGIN gzip9 1\n"),
        ]);
        let g = parse_guest_log(&l);
        assert!(g.runs.is_empty());
        assert_eq!(g.ready, None);
        assert!(!g.done);
    }

    #[test]
    fn workloads_list_is_parsed_like_init_does() {
        let t = "# comment\n\nsha256      sha256sum corpus.bin corpus.bin\nawk-primes  awk -f primes.awk\nlonely\n";
        let w = parse_workloads(t);
        assert_eq!(w.len(), 2);
        assert_eq!(w[0].name, "sha256");
        assert_eq!(w[0].argv, ["sha256sum", "corpus.bin", "corpus.bin"]);
        assert_eq!(w[1].argv, ["awk", "-f", "primes.awk"]);
    }

    #[test]
    fn check_lines_need_a_full_hash() {
        let c = parse_checks("CHECK a 0778fcf18dec9e4c73e4677ce5f33b385f4028cd179682f3c6471f467f6f6538\nCHECK b 1234\n");
        assert_eq!(c.len(), 1);
        assert!(c.contains_key("a"));
        // A kernel warning glued to the hash on the same console line; 65 digits.
        let h = "3d76a29fff377d26c5bfe9613a28a6d8ef667942005b65105adad9d7a39a76f3";
        let c = parse_checks(&format!(
            "CHECK s {h}[ 3415.194431] watchdog: BUG: soft lockup\nCHECK t {h}0\n"
        ));
        assert_eq!(c.get("s").map(String::as_str), Some(h));
        assert!(!c.contains_key("t"));
    }

    #[test]
    fn median_of_odd_even_and_empty() {
        assert_eq!(median(&[3.0, 1.0, 2.0]), Some(2.0));
        assert_eq!(median(&[4.0, 1.0, 3.0, 2.0]), Some(2.5));
        assert_eq!(median(&[5.0]), Some(5.0));
        assert_eq!(median(&[]), None);
    }

    #[test]
    fn ratio_and_seconds_formatting() {
        assert_eq!(fmt_ratio(Some(7.63), Some(1.19)), "6.41x");
        assert_eq!(fmt_ratio(Some(1.0), Some(4.0)), "0.25x");
        assert_eq!(fmt_ratio(Some(1.0), Some(400.0)), "0.003x");
        assert_eq!(fmt_ratio(None, Some(1.0)), "—");
        assert_eq!(fmt_ratio(Some(1.0), Some(0.0)), "—");
        assert_eq!(fmt_secs(12.345), "12.35");
        assert_eq!(fmt_secs(0.0421), "0.042");
    }

    #[test]
    fn engines_parse_with_aliases_and_all() {
        assert_eq!(
            parse_engines("jit,qemu").unwrap(),
            vec![Engine::QemuSystem, Engine::Jit]
        );
        assert_eq!(parse_engines("all").unwrap(), ALL_ENGINES.to_vec());
        assert!(parse_engines("kvm").is_err());
        assert!(parse_engines("").is_err());
    }

    #[test]
    fn options_defaults_and_errors() {
        let o = parse_args(&[]).unwrap();
        assert_eq!(o.reps, 3);
        assert_eq!(o.engines, ALL_ENGINES.to_vec());
        assert!(!o.interp_workloads);
        let o = parse_args(&[
            "--reps".into(),
            "1".into(),
            "--workloads".into(),
            "sha256".into(),
        ])
        .unwrap();
        assert_eq!(o.reps, 1);
        assert_eq!(o.workloads, Some(vec!["sha256".to_string()]));
        assert!(parse_args(&["--reps".into(), "0".into()]).is_err());
        assert!(parse_args(&["--reps".into()]).is_err());
        assert!(parse_args(&["--bogus".into()]).is_err());
    }

    #[test]
    fn guest_command_line() {
        assert_eq!(
            guest_append("cryptomgr.notests", "sha256,gzip9", true),
            "console=ttyS0 cryptomgr.notests bench=sha256,gzip9 reps=1 check=1"
        );
        assert_eq!(
            guest_append("", "", false),
            "console=ttyS0 bench=none reps=0"
        );
    }

    #[test]
    fn utc_dates() {
        assert_eq!(iso_utc(0), "1970-01-01T00:00:00Z");
        // 2000-02-29 12:34:56 UTC (a leap day)
        assert_eq!(iso_utc(951_827_696), "2000-02-29T12:34:56Z");
        assert_eq!(iso_utc(1_795_272_420), "2026-11-21T14:47:00Z");
    }

    fn sample(rep: u32, secs: f64) -> Sample {
        Sample {
            rep,
            secs,
            guest_real: Some(secs - 0.1),
            guest_uptime: None,
            load1: Some(1.0),
        }
    }

    #[test]
    fn table_and_json_shape() {
        let mut r = Results::default();
        for (i, s) in [3.0, 1.0, 2.0].into_iter().enumerate() {
            r.add(Engine::Native, "sha256", sample(i as u32 + 1, s));
            r.add(Engine::QemuSystem, "sha256", sample(i as u32 + 1, s * 8.0));
            r.add(Engine::Jit, "sha256", sample(i as u32 + 1, s * 4.0));
        }
        r.add(Engine::Jit, BOOT, sample(1, 5.0));
        r.fail(Engine::QemuSystem, BOOT, "no GUEST-READY line".into());
        let rows = vec![BOOT.to_string(), "sha256".to_string()];
        let t = table(&r, &rows, 3);
        let sha = t.lines().find(|l| l.starts_with("| sha256")).unwrap();
        let cells: Vec<&str> = sha.split('|').map(str::trim).collect();
        // | sha256 | native | qemu-user | qemu-system | jit | interp | jit/native | jit/qemu | interp/qemu |
        assert_eq!(
            &cells[1..10],
            ["sha256", "2.00", "—", "16.00", "8.00", "—", "4.00x", "0.50x", "—"]
        );
        let boot = t.lines().find(|l| l.starts_with("| boot")).unwrap();
        assert!(boot.contains("| FAIL |"), "{boot}");
        assert!(boot.contains("5.00 (n=1)"), "{boot}");

        let j = to_json(&r, &rows, json!({"x": 1}));
        assert_eq!(j["schema"], "morph86-bench/1");
        assert_eq!(j["failed"], true);
        let res = j["results"].as_array().unwrap();
        let jit = res
            .iter()
            .find(|x| x["engine"] == "morph86-jit" && x["row"] == "sha256")
            .unwrap();
        assert_eq!(jit["median_s"], 8.0);
        assert_eq!(jit["min_s"], 4.0);
        assert_eq!(jit["max_s"], 12.0);
        assert_eq!(jit["samples"].as_array().unwrap().len(), 3);
        assert_eq!(jit["samples"][0]["rep"], 1);
        assert_eq!(jit["samples"][0]["host_wall_s"], 12.0);
        assert!(jit["samples"][0]["guest_time_real_s"].is_number());
        let ratios = j["ratios"].as_array().unwrap();
        let sr = ratios.iter().find(|x| x["row"] == "sha256").unwrap();
        assert_eq!(sr["jit_over_native"], 4.0);
        assert_eq!(sr["jit_over_qemu_system"], 0.5);
        assert!(sr["interp_over_native"].is_null());
        let gt = guest_clock_table(&r, &rows);
        assert!(
            gt.contains("| sha256 | morph86-jit | 8.00 | 7.90 | — |"),
            "{gt}"
        );
    }
}
