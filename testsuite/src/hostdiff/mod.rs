//! Differential fuzzing against the host CPU (`hostdiff`).
//!
//! Random sequences of 32-bit user-mode instructions run on two engines from the same
//! starting state, one instruction at a time, and the complete architectural state is
//! compared after every instruction:
//!
//! - [`native::Native`]: the host CPU. A tiny static ELF32 executable ([`elf`]) with a
//!   code area at [`CODE_BASE`] (first page read/execute, second page [`CODE_RW`]
//!   read/write/execute, for self-modifying code) and scratch data at [`DATA_BASE`]
//!   (read/write, the top part is the stack) is started under `ptrace`; everything else
//!   the kernel mapped (stack, vDSO) is unmapped. The 64-bit parent writes code and data
//!   through `/proc/PID/mem`, sets the registers (`PTRACE_SETREGS`) and the x87/SSE state
//!   (`PTRACE_SETFPREGS`, FXSAVE layout) and single-steps with
//!   `PTRACE_SYSEMU_SINGLESTEP` (so a system call reached by accident is never run). A
//!   REP string instruction traps after each iteration, so a "step" repeats until EIP
//!   leaves the instruction. Signals map back to vectors: SIGSEGV with
//!   SEGV_MAPERR/ACCERR = #PF (fault address = CR2), other SIGSEGV = #GP, SIGILL = #UD,
//!   SIGFPE FPE_INTDIV = #DE, other SIGFPE = #MF, SIGBUS BUS_ADRALN = #AC. One child
//!   serves every sequence.
//! - [`interp::Interp`]: the morph86 interpreter, a `Cpu` at CPL 3 in 32-bit protected
//!   mode with flat segments, the same pages mapped at the same linear addresses (page
//!   tables with only those pages present, so stray accesses fault as on the host) and
//!   `Cpu::try_step`, which returns a fault instead of delivering it.
//!
//! Both implement [`Engine`], so the JIT can be put in the interpreter's place later.
//!
//! The generator ([`generate`]) draws instructions from every integer and x87 class
//! (iced-x86 `Code`s filtered by mnemonic; 16-bit operand-size forms included), biases
//! operands towards boundary values and special floats, and adds the set-up
//! instructions a class needs (pointers for memory operands, small REP counts,
//! non-faulting divisors, branch targets inside the sequence). Each sequence is seeded
//! from `(seed, sequence index)`, so `--replay SEED:INDEX` reruns exactly one.
//!
//! Comparison ([`compare`]) masks only what the manuals leave undefined, per
//! instruction: the flags iced-x86's `rflags_undefined()` names, OF of shifts and
//! rotates by counts other than 1, CF of SHL/SHR by counts >= the operand width, the
//! destination of BSF/BSR when the source is zero, SHLD/SHRD 16-bit with counts > 16,
//! x87 condition codes the SDM calls undefined for that instruction, and the x87
//! last-instruction/operand pointer fields (FCS/FDS are deprecated and FIP/FDP/FOP are
//! saved differently by Intel and AMD, and ptrace cannot set them). Results of x87
//! transcendentals (FSIN FCOS FSINCOS FPTAN FPATAN F2XM1 FYL2X FYL2XP1), for which
//! Intel documents an error bound rather than exact results, are compared within a
//! tolerance in units in the last place of the 64-bit significand (`--fp-ulps`, default
//! 1), and C1 (the rounding direction) is not compared for them. Further per-input
//! cases (FPREM without a quotient, C1 of FCMOVcc/FCOMI without a stack fault, FCOMI
//! flags after an unmasked invalid operation, F2XM1/FYL2XP1 outside their documented
//! domains, FBLD of invalid BCD, FXSAVE's MXCSR_MASK) and the few host behaviours the
//! SDM leaves to the implementation (which CMPS operand or x87 image field faults first,
//! #AC versus #GP for a misaligned FXSAVE, no #AC for x87 environment images on AMD) are
//! documented where they are coded, in `compare.rs`, and listed in
//! `testsuite/hostdiff-findings.md`.
//!
//! After a mismatch the interpreter is resynchronised to the host state, so every
//! instruction is judged on its own; a fault ends the sequence, and so does reaching
//! the INT3 padding or self-modified bytes that decode to something the generator never
//! emits (CPUID, RDTSC, INT... would compare the host with itself, or worse).
//! `N passed, M failed` counts instructions: N + M is the number executed.

pub mod compare;
pub mod elf;
pub mod generate;
pub mod interp;
pub mod native;

use iced_x86::{Decoder, DecoderOptions, Formatter, Instruction, IntelFormatter, Mnemonic};

/// Linear address of the code area (both engines).
pub const CODE_BASE: u32 = 0x0010_0000;
/// Size of the code area.
pub const CODE_SIZE: u32 = 0x2000;
/// Linear address of the scratch data area (both engines).
pub const DATA_BASE: u32 = 0x0010_2000;
/// Size of the scratch data area (the top page is the stack).
pub const DATA_SIZE: u32 = 0x4000;
/// The second code page is writable on both engines, so self-modifying code is
/// exercised when a sequence runs into it.
pub const CODE_RW: u32 = CODE_BASE + 0x1000;
/// Start of the memory compared after every instruction: the writable code page and
/// the data area.
pub const MEM_BASE: u32 = CODE_RW;
/// Size of the compared memory.
pub const MEM_SIZE: u32 = DATA_BASE + DATA_SIZE - MEM_BASE;
/// Initial ESP of each sequence.
pub const STACK_INIT: u32 = DATA_BASE + DATA_SIZE - 0x800;

/// The x87/SSE state in FXSAVE form (what ptrace gives and takes).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Fx {
    /// Control word.
    pub fcw: u16,
    /// Status word (TOP in bits 11-13).
    pub fsw: u16,
    /// Abridged tag byte: bit i set when physical register R*i* is not empty.
    pub ftw: u8,
    /// Last opcode.
    pub fop: u16,
    /// ST(0)..ST(7) (stack order, as FXSAVE stores them): 64-bit significand, then
    /// sign and exponent.
    pub st: [[u8; 10]; 8],
    /// MXCSR.
    pub mxcsr: u32,
    /// XMM0-XMM7.
    pub xmm: [[u8; 16]; 8],
}

impl Fx {
    /// TOP field of the status word.
    pub fn top(&self) -> usize {
        ((self.fsw >> 11) & 7) as usize
    }
    /// Parses the first 416 bytes of an FXSAVE image.
    pub fn from_fxsave(b: &[u8]) -> Fx {
        let mut f = Fx {
            fcw: u16::from_le_bytes([b[0], b[1]]),
            fsw: u16::from_le_bytes([b[2], b[3]]),
            ftw: b[4],
            fop: u16::from_le_bytes([b[6], b[7]]),
            mxcsr: u32::from_le_bytes([b[24], b[25], b[26], b[27]]),
            ..Default::default()
        };
        for i in 0..8 {
            f.st[i].copy_from_slice(&b[32 + 16 * i..32 + 16 * i + 10]);
            f.xmm[i].copy_from_slice(&b[160 + 16 * i..176 + 16 * i]);
        }
        f
    }
    /// Fills an FXSAVE image (instruction and data pointers zero).
    pub fn to_fxsave(&self, b: &mut [u8]) {
        b[..416].fill(0);
        b[0..2].copy_from_slice(&self.fcw.to_le_bytes());
        b[2..4].copy_from_slice(&self.fsw.to_le_bytes());
        b[4] = self.ftw;
        b[6..8].copy_from_slice(&self.fop.to_le_bytes());
        b[24..28].copy_from_slice(&self.mxcsr.to_le_bytes());
        b[28..32].copy_from_slice(&0xffffu32.to_le_bytes());
        for i in 0..8 {
            b[32 + 16 * i..32 + 16 * i + 10].copy_from_slice(&self.st[i]);
            b[160 + 16 * i..176 + 16 * i].copy_from_slice(&self.xmm[i]);
        }
    }
}

/// The state both engines are compared on.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct State {
    /// EAX, ECX, EDX, EBX, ESP, EBP, ESI, EDI.
    pub gpr: [u32; 8],
    /// EIP.
    pub eip: u32,
    /// EFLAGS.
    pub eflags: u32,
    /// x87 and SSE registers.
    pub fx: Fx,
    /// The writable code page and the data area, `MEM_SIZE` bytes from `MEM_BASE`.
    pub mem: Vec<u8>,
}

impl Default for State {
    fn default() -> Self {
        State {
            gpr: [0; 8],
            eip: CODE_BASE,
            eflags: 0x202,
            fx: Fx::default(),
            mem: vec![0; MEM_SIZE as usize],
        }
    }
}

/// A fault raised by an instruction (the instruction did not complete).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Fault {
    /// Exception vector.
    pub vector: u8,
    /// For #PF, the faulting linear address (CR2) when the engine knows it.
    pub addr: Option<u32>,
}

/// What one instruction step did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Outcome {
    /// The instruction completed.
    Done,
    /// The instruction faulted.
    Fault(Fault),
}

/// Something that runs x86 code from a given state, one instruction at a time.
pub trait Engine {
    /// Installs the code (at `CODE_BASE`, padded with INT3) and the state; returns the
    /// state as the engine actually holds it (the host may normalise some bits).
    fn load(&mut self, code: &[u8], st: &State) -> Result<State, String>;
    /// Runs the instruction at EIP to completion (all iterations of a REP string
    /// instruction) or to its fault.
    fn step(&mut self) -> Result<Outcome, String>;
    /// The current state.
    fn state(&mut self) -> Result<State, String>;
    /// The sequence is over (the host engine stops its watchdog).
    fn finish(&mut self) {}
}

/// One instruction on which the engines disagreed.
#[derive(Debug, Clone)]
pub struct Mismatch {
    /// Sequence index (replay with `--replay SEED:INDEX`).
    pub seq: u64,
    /// Instruction index within the sequence (counting executed instructions).
    pub step: usize,
    /// The instruction's bytes.
    pub bytes: Vec<u8>,
    /// The instruction (decoded; `INVALID` outside the code).
    pub ins: Instruction,
    /// Intel-syntax disassembly.
    pub disasm: String,
    /// The differences.
    pub diffs: Vec<compare::Diff>,
    /// State before the instruction.
    pub pre: State,
    /// Host state after.
    pub native: State,
    /// Interpreter state after.
    pub interp: State,
}

/// What one sequence gave.
#[derive(Debug, Clone, Default)]
pub struct CaseResult {
    /// Instructions on which the engines agreed.
    pub passed: u64,
    /// Instructions on which they did not.
    pub failed: u64,
    /// The disagreements.
    pub mismatches: Vec<Mismatch>,
    /// Faults both engines raised alike, by vector.
    pub faults: [u64; 32],
    /// Per executed instruction, its mnemonic (for coverage counts).
    pub executed: Vec<Mnemonic>,
}

/// Disassembles one instruction (Intel syntax).
pub fn disasm(ins: &Instruction) -> String {
    let mut f = IntelFormatter::new();
    let mut s = String::new();
    f.format(ins, &mut s);
    s
}

/// Runs one generated case on both engines, comparing after every instruction. After a
/// mismatch the second engine is reloaded from the first one's state. Returns an error
/// only when the host engine itself fails (the case is then skipped).
pub fn run_case(
    native: &mut dyn Engine,
    other: &mut dyn Engine,
    case: &generate::Case,
    seq: u64,
    cfg: &compare::Config,
    mut trace: Option<&mut dyn FnMut(&str)>,
) -> Result<CaseResult, String> {
    let r = run_case_inner(native, other, case, seq, cfg, &mut trace);
    native.finish();
    other.finish();
    r
}

fn run_case_inner(
    native: &mut dyn Engine,
    other: &mut dyn Engine,
    case: &generate::Case,
    seq: u64,
    cfg: &compare::Config,
    trace: &mut Option<&mut dyn FnMut(&str)>,
) -> Result<CaseResult, String> {
    let mut res = CaseResult::default();
    let code = &case.code;
    let end = CODE_BASE + code.len() as u32;
    let mut pre = native.load(code, &case.init)?;
    let loaded = other.load(code, &pre)?;
    if loaded != pre {
        return Err("the interpreter does not hold the starting state as given".into());
    }
    // Forward branches only: each instruction runs at most once, REP aside.
    let limit = code.len() + 1;
    for step in 0..limit {
        if pre.eip == end {
            break;
        }
        // The instruction as it is now in memory (the writable code page may have been
        // rewritten by the sequence itself).
        let mut window = Vec::with_capacity(15);
        for k in 0..15u32 {
            let a = pre.eip.wrapping_add(k);
            let b = if a >= MEM_BASE && a - MEM_BASE < MEM_SIZE {
                pre.mem[(a - MEM_BASE) as usize]
            } else if a >= CODE_BASE && ((a - CODE_BASE) as usize) < code.len() {
                code[(a - CODE_BASE) as usize]
            } else if a >= CODE_BASE && a - CODE_BASE < CODE_SIZE {
                0xcc
            } else {
                break;
            };
            window.push(b);
        }
        let ins = if window.is_empty() {
            Instruction::default()
        } else {
            Decoder::with_ip(32, &window, pre.eip as u64, DecoderOptions::NONE).decode()
        };
        let bytes = window[..ins.len().min(window.len())].to_vec();
        // Stop at INT3 (the padding), and at anything but the generated bytes or a form
        // the generator knows (self-modified code can produce CPUID, RDTSC, INT...).
        let off = pre.eip.wrapping_sub(CODE_BASE) as usize;
        let original = case.starts.contains(&pre.eip)
            && code.get(off..off + bytes.len()) == Some(&bytes[..])
            && !bytes.is_empty();
        if ins.mnemonic() == Mnemonic::Int3 || !(original || generate::is_known_form(ins.code())) {
            break;
        }
        let no = native.step()?;
        let ns = native.state()?;
        let (io, is) = match other.step().and_then(|o| Ok((o, other.state()?))) {
            Ok(x) => x,
            Err(e) => {
                // The interpreter failed (panicked): a mismatch.
                let diffs = vec![compare::Diff {
                    what: "engine error".into(),
                    native: "-".into(),
                    interp: e,
                }];
                res.failed += 1;
                res.executed.push(ins.mnemonic());
                res.mismatches.push(Mismatch {
                    seq,
                    step,
                    bytes,
                    ins,
                    disasm: disasm(&ins),
                    diffs,
                    pre: pre.clone(),
                    native: ns.clone(),
                    interp: ns.clone(),
                });
                if matches!(no, Outcome::Fault(_)) {
                    break;
                }
                other.load(code, &ns)?;
                pre = ns;
                continue;
            }
        };
        if let Some(t) = trace.as_mut() {
            t(&format!(
                "  {:08x} {:<28} host: {:?}",
                pre.eip,
                disasm(&ins),
                no
            ));
        }
        let diffs = compare::compare(&ins, &pre, (&no, &ns), (&io, &is), cfg);
        res.executed.push(ins.mnemonic());
        if diffs.is_empty() {
            res.passed += 1;
            if let Outcome::Fault(f) = no {
                res.faults[f.vector as usize & 31] += 1;
            } else if ns != is {
                // Only masked (undefined) bits differ: carry the host's values forward
                // so they are not blamed on a later instruction.
                other.load(code, &ns)?;
            }
        } else {
            res.failed += 1;
            res.mismatches.push(Mismatch {
                seq,
                step,
                bytes,
                ins,
                disasm: disasm(&ins),
                diffs,
                pre: pre.clone(),
                native: ns.clone(),
                interp: is,
            });
            if no == Outcome::Done {
                other.load(code, &ns)?;
            }
        }
        if matches!(no, Outcome::Fault(_)) {
            break;
        }
        pre = ns;
    }
    Ok(res)
}

/// Human-readable name of an exception vector.
pub fn vector_name(v: u8) -> &'static str {
    match v {
        0 => "#DE",
        1 => "#DB",
        3 => "#BP",
        4 => "#OF",
        5 => "#BR",
        6 => "#UD",
        7 => "#NM",
        8 => "#DF",
        10 => "#TS",
        11 => "#NP",
        12 => "#SS",
        13 => "#GP",
        14 => "#PF",
        16 => "#MF",
        17 => "#AC",
        19 => "#XM",
        _ => "#??",
    }
}

/// A small deterministic random generator (SplitMix64), so runs replay exactly.
#[derive(Debug, Clone)]
pub struct Rng(u64);

impl Rng {
    /// A generator from a seed.
    pub fn new(seed: u64) -> Rng {
        Rng(seed ^ 0x9e37_79b9_7f4a_7c15)
    }
    /// The generator for sequence `index` of a run seeded with `seed`.
    pub fn for_sequence(seed: u64, index: u64) -> Rng {
        let mut r = Rng::new(
            seed.wrapping_mul(0x100_0000_01b3) ^ index.wrapping_mul(0xff51_afd7_ed55_8ccd),
        );
        r.next_u64();
        r
    }
    /// 64 random bits.
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9e37_79b9_7f4a_7c15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xbf58_476d_1ce4_e5b9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94d0_49bb_1331_11eb);
        z ^ (z >> 31)
    }
    /// A value in `0..n` (`n > 0`).
    pub fn below(&mut self, n: u64) -> u64 {
        self.next_u64() % n
    }
    /// True with probability `num / den`.
    pub fn chance(&mut self, num: u64, den: u64) -> bool {
        self.below(den) < num
    }
    /// One element of a non-empty slice.
    pub fn pick<'a, T>(&mut self, xs: &'a [T]) -> &'a T {
        &xs[self.below(xs.len() as u64) as usize]
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn fxsave_round_trip() {
        let mut f = Fx {
            fcw: 0x27f,
            fsw: 0x3800,
            ftw: 0x81,
            fop: 0x5d9,
            mxcsr: 0x1f80,
            ..Default::default()
        };
        f.st[3] = [1, 2, 3, 4, 5, 6, 7, 0x80, 0xff, 0x3f];
        f.xmm[7][15] = 9;
        let mut b = [0u8; 512];
        f.to_fxsave(&mut b);
        assert_eq!(Fx::from_fxsave(&b), f);
        assert_eq!(f.top(), 7);
    }

    #[test]
    fn rng_is_deterministic_per_sequence() {
        let a: Vec<u64> = (0..4).map(|_| Rng::for_sequence(7, 3).next_u64()).collect();
        assert!(a.iter().all(|&x| x == a[0]));
        assert_ne!(
            Rng::for_sequence(7, 3).next_u64(),
            Rng::for_sequence(7, 4).next_u64()
        );
    }
}

#[cfg(test)]
mod smc_tests {
    use super::*;

    /// Code that rewrites an instruction ahead of itself in the writable code page:
    /// both engines must run the new instruction (INC EAX), not the old NOP.
    #[test]
    fn self_modifying_code_agrees() {
        let target = CODE_RW + 0x10;
        let mut code = vec![0xcc; (CODE_RW - CODE_BASE) as usize];
        // mov byte ptr [target], 0x40 (INC EAX)
        code.extend_from_slice(&[0xc6, 0x05]);
        code.extend_from_slice(&target.to_le_bytes());
        code.push(0x40);
        code.resize((target - CODE_BASE) as usize, 0x90);
        code.push(0x90); // rewritten to INC EAX before it runs
        let mut init = State {
            eip: CODE_RW,
            ..Default::default()
        };
        init.gpr[4] = STACK_INIT;
        init.fx.fcw = 0x37f;
        init.fx.mxcsr = 0x1f80;
        init.mem[..0x1000].fill(0xcc);
        for (k, b) in code.iter().enumerate() {
            let a = CODE_BASE + k as u32;
            if a >= MEM_BASE {
                init.mem[(a - MEM_BASE) as usize] = *b;
            }
        }
        let mut starts = vec![CODE_RW];
        starts.extend(CODE_RW + 7..=target);
        let case = generate::Case { code, init, starts };
        let mut n = native::Native::new();
        let mut i = interp::Interp::new().unwrap();
        let r = run_case(&mut n, &mut i, &case, 0, &compare::Config::default(), None).unwrap();
        assert_eq!(r.failed, 0, "{:?}", r.mismatches.first().map(|m| &m.diffs));
        assert_eq!(r.executed.last(), Some(&Mnemonic::Inc));
        assert_eq!(i.state().unwrap().gpr[0], 1);
    }
}
