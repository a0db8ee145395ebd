//! Runner for the SingleStepTests vectors (`../shared/conformance/README.md`).
//!
//! Each test gives registers and memory bytes before one instruction, and the registers
//! that changed and memory bytes that must hold afterwards. We load the state into a
//! real-mode CPU with 16 MiB of RAM, run until the `HLT` that follows the instruction
//! (or the one planted at an exception handler), and compare. Flags bits 12-15 and the
//! flags that iced-x86 says the instruction leaves undefined are masked.

use flate2::read::GzDecoder;
use iced_x86::{Decoder, DecoderOptions, RflagsBits};
use morph86_cpu::state::{reg, SegReg, Segment};
use morph86_cpu::{Cpu, StepEvent};
use morph86_mmu::{Mmu, PhysMem};
use serde::Deserialize;
use std::collections::{BTreeMap, HashSet};
use std::io::{BufRead, BufReader};
use std::path::Path;

/// Registers of one test state (all present in `initial`, only changed ones in `final`).
#[derive(Debug, Deserialize, Default, Clone)]
#[allow(missing_docs)]
pub struct Regs {
    pub ax: Option<u16>,
    pub bx: Option<u16>,
    pub cx: Option<u16>,
    pub dx: Option<u16>,
    pub cs: Option<u16>,
    pub ss: Option<u16>,
    pub ds: Option<u16>,
    pub es: Option<u16>,
    pub sp: Option<u16>,
    pub bp: Option<u16>,
    pub si: Option<u16>,
    pub di: Option<u16>,
    pub ip: Option<u16>,
    pub flags: Option<u16>,
}

/// A machine state: registers and memory bytes.
#[derive(Debug, Deserialize, Clone)]
pub struct State {
    /// Registers.
    pub regs: Regs,
    /// `[physical address, byte]` pairs.
    pub ram: Vec<(u32, u8)>,
}

/// One test vector.
#[derive(Debug, Deserialize, Clone)]
pub struct Test {
    /// Index within the form.
    pub idx: u64,
    /// Disassembly.
    pub name: String,
    /// Instruction bytes (with prefixes).
    pub bytes: Vec<u8>,
    /// State before.
    pub initial: State,
    /// What must hold after.
    #[serde(rename = "final")]
    pub final_: State,
    /// Identifier used by the revocation list.
    pub hash: String,
}

/// The outcome of one test.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Outcome {
    /// Everything matched.
    Pass,
    /// Something differed; the text says what.
    Fail(String),
}

/// Runs tests on one reusable machine.
pub struct Runner {
    cpu: Cpu,
    /// Maximum instructions per test (REP strings with CX = 0xffff need many).
    pub step_limit: u64,
}

const FLAG_MASK_REAL: u16 = 0xf000;

fn rflags_to_eflags(r: u32) -> u16 {
    let mut f = 0u16;
    let map = [
        (RflagsBits::OF, 1 << 11),
        (RflagsBits::SF, 1 << 7),
        (RflagsBits::ZF, 1 << 6),
        (RflagsBits::AF, 1 << 4),
        (RflagsBits::CF, 1 << 0),
        (RflagsBits::PF, 1 << 2),
        (RflagsBits::DF, 1 << 10),
        (RflagsBits::IF, 1 << 9),
    ];
    for (b, e) in map {
        if r & b != 0 {
            f |= e;
        }
    }
    f
}

impl Default for Runner {
    fn default() -> Self {
        Self::new()
    }
}

impl Runner {
    /// A runner with a fresh 16 MiB machine.
    pub fn new() -> Self {
        let phys = PhysMem::new(16 << 20).expect("16 MiB of RAM");
        Runner {
            cpu: Cpu::new(Mmu::new(phys)),
            step_limit: 5_000,
        }
    }

    /// The flags the instruction in `bytes` leaves undefined, as EFLAGS bits.
    pub fn undefined_flags(bytes: &[u8]) -> u16 {
        let mut d = Decoder::with_ip(16, bytes, 0, DecoderOptions::NONE);
        let i = d.decode();
        rflags_to_eflags(i.rflags_undefined())
    }

    /// Runs one test.
    pub fn run(&mut self, t: &Test) -> Outcome {
        let c = &mut self.cpu;
        c.reset();
        let r = &t.initial.regs;
        let g = |v: Option<u16>| v.unwrap_or(0) as u64;
        c.s.gpr[reg::RAX] = g(r.ax);
        c.s.gpr[reg::RBX] = g(r.bx);
        c.s.gpr[reg::RCX] = g(r.cx);
        c.s.gpr[reg::RDX] = g(r.dx);
        c.s.gpr[reg::RSP] = g(r.sp);
        c.s.gpr[reg::RBP] = g(r.bp);
        c.s.gpr[reg::RSI] = g(r.si);
        c.s.gpr[reg::RDI] = g(r.di);
        c.s.rip = g(r.ip);
        // A real-mode 80286 holds FLAGS bits 12-15 at 0 whatever the test lists (its
        // PUSHF and interrupts store them as 0), so load them that way.
        c.s.set_eflags(g(r.flags) as u32 & 0x0fff);
        let mut code = Segment::real(r.cs.unwrap_or(0));
        code.attrs |= morph86_cpu::state::ATTR_CODE;
        c.s.seg[SegReg::Cs as usize] = code;
        c.s.seg[SegReg::Ss as usize] = Segment::real(r.ss.unwrap_or(0));
        c.s.seg[SegReg::Ds as usize] = Segment::real(r.ds.unwrap_or(0));
        c.s.seg[SegReg::Es as usize] = Segment::real(r.es.unwrap_or(0));
        c.s.idtr.limit = 0x3ff;
        let mut touched: Vec<u32> = Vec::with_capacity(t.initial.ram.len() + t.final_.ram.len());
        for &(a, b) in &t.initial.ram {
            c.mmu.phys.write(a as u64, &[b]);
            touched.push(a);
        }
        touched.extend(t.final_.ram.iter().map(|x| x.0));
        // Run until HLT.
        let mut ev = StepEvent::Ok;
        let mut steps = 0u64;
        let exc0 = c.stats.exceptions;
        while !c.s.halted && steps < self.step_limit && c.stats.exceptions - exc0 < 4 {
            ev = c.step();
            if ev == StepEvent::TripleFault {
                break;
            }
            steps += 1;
        }
        let mut diffs = Vec::new();
        if ev == StepEvent::TripleFault {
            diffs.push("triple fault".to_string());
        } else if !c.s.halted {
            diffs.push(format!(
                "did not reach HLT ({steps} steps, {} exceptions)",
                c.stats.exceptions - exc0
            ));
        }
        let f = &t.final_.regs;
        let want = |fin: Option<u16>, ini: Option<u16>| fin.or(ini).unwrap_or(0);
        let checks: [(&str, u16, u16); 13] = [
            ("ax", want(f.ax, r.ax), c.s.gpr[reg::RAX] as u16),
            ("bx", want(f.bx, r.bx), c.s.gpr[reg::RBX] as u16),
            ("cx", want(f.cx, r.cx), c.s.gpr[reg::RCX] as u16),
            ("dx", want(f.dx, r.dx), c.s.gpr[reg::RDX] as u16),
            ("sp", want(f.sp, r.sp), c.s.gpr[reg::RSP] as u16),
            ("bp", want(f.bp, r.bp), c.s.gpr[reg::RBP] as u16),
            ("si", want(f.si, r.si), c.s.gpr[reg::RSI] as u16),
            ("di", want(f.di, r.di), c.s.gpr[reg::RDI] as u16),
            ("ip", want(f.ip, r.ip), c.s.rip as u16),
            (
                "cs",
                want(f.cs, r.cs),
                c.s.seg[SegReg::Cs as usize].selector,
            ),
            (
                "ss",
                want(f.ss, r.ss),
                c.s.seg[SegReg::Ss as usize].selector,
            ),
            (
                "ds",
                want(f.ds, r.ds),
                c.s.seg[SegReg::Ds as usize].selector,
            ),
            (
                "es",
                want(f.es, r.es),
                c.s.seg[SegReg::Es as usize].selector,
            ),
        ];
        for (name, w, got) in checks {
            if w != got {
                diffs.push(format!("{name}: want {w:#06x} got {got:#06x}"));
            }
        }
        let mask = !(FLAG_MASK_REAL | Self::undefined_flags(&t.bytes));
        let wf = want(f.flags, r.flags);
        let gf = c.s.eflags() as u16;
        if wf & mask != gf & mask {
            diffs.push(format!(
                "flags: want {wf:#06x} got {gf:#06x} (compared bits {mask:#06x}, differ {:#06x})",
                (wf ^ gf) & mask
            ));
        }
        // An exception pushes an image of FLAGS (at SS:SP+4 once the handler runs); the
        // same bits are masked in it as in the FLAGS register: 12-15 and the flags the
        // faulting instruction leaves undefined.
        let frame_flags = if c.stats.exceptions > exc0 {
            let ss = c.s.seg[SegReg::Ss as usize].base as u32;
            let sp = (c.s.gpr[reg::RSP] as u16).wrapping_add(4);
            Some((ss + sp as u32, ss + sp.wrapping_add(1) as u32))
        } else {
            None
        };
        for &(a, b) in &t.final_.ram {
            let mut got = [0u8];
            c.mmu.phys.read(a as u64, &mut got);
            let m: u8 = match frame_flags {
                Some((lo, _)) if a == lo => mask as u8,
                Some((_, hi)) if a == hi => (mask >> 8) as u8,
                _ => 0xff,
            };
            if got[0] & m != b & m {
                diffs.push(format!("ram[{a:#07x}]: want {b:#04x} got {:#04x}", got[0]));
            }
        }
        if c.stats.exceptions - exc0 > 1 || !c.s.halted {
            // Code ran astray (an exception inside a handler, or no HLT reached) and may
            // have written anywhere it can reach: real-mode code reaches at most
            // FFFF:FFFF = 0x10FFEF, so wipe that much for the next test.
            c.mmu.phys.ram_mut()[..0x11_0000].fill(0);
        } else {
            for a in touched {
                c.mmu.phys.write(a as u64, &[0]);
            }
        }
        if diffs.is_empty() {
            Outcome::Pass
        } else {
            Outcome::Fail(diffs.join("; "))
        }
    }
}

/// Reads the revocation list (hashes of known-bad tests) next to a vector folder.
pub fn revoked(dir: &Path) -> HashSet<String> {
    let mut set = HashSet::new();
    for cand in [
        dir.join("revocation_list.txt"),
        dir.join("../revocation_list.txt"),
    ] {
        if let Ok(s) = std::fs::read_to_string(&cand) {
            for l in s.lines() {
                let l = l.trim();
                if !l.is_empty() && !l.starts_with('#') {
                    set.insert(l.to_string());
                }
            }
        }
    }
    set
}

/// Loads every test of one `.jsonl.gz` (or `.jsonl`) file.
pub fn load_file(path: &Path) -> std::io::Result<Vec<Test>> {
    let f = std::fs::File::open(path)?;
    let rd: Box<dyn BufRead> = if path.extension().is_some_and(|e| e == "gz") {
        Box::new(BufReader::new(GzDecoder::new(f)))
    } else {
        Box::new(BufReader::new(f))
    };
    let mut out = Vec::new();
    for line in rd.lines() {
        let line = line?;
        if line.trim().is_empty() {
            continue;
        }
        match serde_json::from_str::<Test>(&line) {
            Ok(t) => out.push(t),
            Err(e) => {
                return Err(std::io::Error::new(
                    std::io::ErrorKind::InvalidData,
                    format!("{}: {e}", path.display()),
                ))
            }
        }
    }
    Ok(out)
}

/// Where the 80286 and the 386-and-later CPU that morph86 models behave differently, by
/// the manuals: returns the reason when test `t` of form `form` is such a case.
/// These tests still count as failed; the runner lists them apart.
pub fn known_286_difference(form: &str, t: &Test, failure: &str) -> Option<&'static str> {
    let _ = (form, failure);
    if t.bytes.len() > 10 || (expected_vector(t) == Some(13) && undefined_opcode(&t.bytes)) {
        return Some(
            "the 80286 limits instructions to 10 bytes and raises #UD past that; \
             the 386 and later allow 15 (Intel SDM vol. 3, 22.29 'Instruction length')",
        );
    }
    if lock_not_allowed(&t.bytes) {
        return Some(
            "LOCK on an instruction that cannot be locked (or on a register destination): \
             the 80286 ignores it, the 386 and later raise #UD (Intel SDM vol. 2, \
             'LOCK-Assert LOCK# Signal Prefix')",
        );
    }
    let vector = expected_vector(t);
    if vector.is_none() && esc_operand_past_limit(t) {
        return Some(
            "an x87 escape whose memory operand runs past offset FFFFh: the 80286 without a \
             coprocessor never reads it, a 386 or later with its FPU raises #GP for the \
             real-mode segment limit (Intel SDM vol. 3, real-address-mode exceptions)",
        );
    }
    if vector == Some(13) && ss_overrun(t) {
        return Some(
            "a real-mode access past offset FFFFh of SS: the 80286 raises interrupt 13 \
             (segment overrun) for every segment, the 386 and later raise #SS (12) for SS \
             (Intel SDM vol. 3, real-address-mode exceptions; 80286 PRM, interrupt 13)",
        );
    }
    let pop_mem = form == "8F" && only_diffs_in(failure, &["sp", "ram"]);
    if vector == Some(13) && (only_diffs_in(failure, &["si", "di", "sp", "cx"]) || pop_mem) {
        return Some(
            "segment overrun in a string instruction or POP: the 80286 has already \
             updated SI/DI/SP when it raises interrupt 13; on the 386 and later the \
             exception is a fault that leaves them unchanged (Intel SDM vol. 3, 6.5 \
             'Exception classifications')",
        );
    }
    if vector == Some(0)
        && only_diffs_in(failure, &["flags", "ram"])
        && divide_error_flags(t, failure)
    {
        return Some(
            "divide error: the 80286 pushes the flags its divide microcode left behind; \
             on the 386 and later #DE is a fault and pushes the flags as they were before \
             the instruction (Intel SDM vol. 3, 6.5 'Exception classifications'; the \
             flags are undefined after DIV/IDIV/AAM)",
        );
    }
    if (form == "F6.7" || form == "F7.7") && vector.is_none() && idiv_overflows(t) {
        return Some(
            "IDIV whose quotient does not fit: the 386 and later raise #DE as the manual \
             says, this 80286 returned a truncated quotient (Intel SDM vol. 2, IDIV)",
        );
    }
    if vector == Some(6) && fs_gs_move(&t.bytes) {
        return Some(
            "MOV to or from segment register 4 or 5: the 80286 has no FS and GS and \
             raises #UD; the 386 added them (Intel SDM vol. 3, chapter 22 'Architecture \
             compatibility')",
        );
    }
    None
}

/// The exception vector whose handler the test ends in: the final CS:IP is one past
/// the handler address the test placed in the interrupt vector table.
fn expected_vector(t: &Test) -> Option<u8> {
    let f = &t.final_.regs;
    let (cs, ip) = (f.cs?, f.ip?);
    let ram: BTreeMap<u32, u8> = t.initial.ram.iter().copied().collect();
    (0u8..32).find(|&v| {
        let a = v as u32 * 4;
        let b = |k: u32| ram.get(&(a + k)).copied();
        match (b(0), b(1), b(2), b(3)) {
            (Some(i0), Some(i1), Some(c0), Some(c1)) => {
                u16::from_le_bytes([c0, c1]) == cs
                    && u16::from_le_bytes([i0, i1]).wrapping_add(1) == ip
            }
            _ => false,
        }
    })
}

/// Whether every difference listed in `failure` is in one of `names` (`ram` covers
/// all memory bytes).
fn only_diffs_in(failure: &str, names: &[&str]) -> bool {
    failure.split("; ").all(|d| {
        let n = d.split([':', '[']).next().unwrap_or("");
        names.contains(&n)
    })
}

/// Whether the test's instruction touches SS across offset FFFFh: a memory operand in
/// SS that straddles it, or a stack access with SP (or BP for LEAVE) at FFFFh or 1.
/// An ESC (D8-DF) instruction with a memory operand that ends past offset FFFFh.
fn esc_operand_past_limit(t: &Test) -> bool {
    use iced_x86::{OpKind, Register};
    let i = Decoder::with_ip(16, &t.bytes, 0, DecoderOptions::NONE).decode();
    let esc = t
        .bytes
        .iter()
        .find(|b| !matches!(b, 0x26 | 0x2e | 0x36 | 0x3e | 0xf0 | 0xf2 | 0xf3))
        .is_some_and(|b| (0xd8..=0xdf).contains(b));
    if !esc || !(0..i.op_count()).any(|n| i.op_kind(n) == OpKind::Memory) {
        return false;
    }
    let r = &t.initial.regs;
    let val = |reg: Register| -> u32 {
        match reg {
            Register::BX => r.bx.unwrap_or(0) as u32,
            Register::BP => r.bp.unwrap_or(0) as u32,
            Register::SI => r.si.unwrap_or(0) as u32,
            Register::DI => r.di.unwrap_or(0) as u32,
            _ => 0,
        }
    };
    let ea = (val(i.memory_base()) + val(i.memory_index()) + i.memory_displacement32()) & 0xffff;
    ea + i.memory_size().size() as u32 - 1 > 0xffff
}

fn ss_overrun(t: &Test) -> bool {
    use iced_x86::{Mnemonic, OpKind, Register};
    let i = Decoder::with_ip(16, &t.bytes, 0, DecoderOptions::NO_INVALID_CHECK).decode();
    let r = &t.initial.regs;
    let val = |reg: Register| -> u32 {
        match reg {
            Register::BX => r.bx.unwrap_or(0) as u32,
            Register::BP => r.bp.unwrap_or(0) as u32,
            Register::SI => r.si.unwrap_or(0) as u32,
            Register::DI => r.di.unwrap_or(0) as u32,
            _ => 0,
        }
    };
    let sp = r.sp.unwrap_or(0) as i32;
    let inc = i.stack_pointer_increment();
    if i.is_stack_instruction()
        && sp & 1 == 1
        && ((inc > 0 && sp + inc > 0xffff) || (inc < 0 && sp < -inc))
    {
        return true;
    }
    if (0..i.op_count()).any(|n| i.op_kind(n) == OpKind::MemorySegSI)
        && i.memory_segment() == Register::SS
        && r.si == Some(0xffff)
    {
        return true;
    }
    if i.mnemonic() == Mnemonic::Leave && r.bp == Some(0xffff) {
        return true;
    }
    (0..i.op_count()).any(|n| {
        i.op_kind(n) == OpKind::Memory && i.memory_segment() == Register::SS && {
            let ea = (i.memory_displacement32())
                .wrapping_add(val(i.memory_base()))
                .wrapping_add(val(i.memory_index()))
                & 0xffff;
            ea + i.memory_size().size() as u32 > 0x1_0000
        }
    })
}

/// Whether the memory differences of a divide-error test are all in the FLAGS word the
/// exception pushed (at SS:SP-2).
fn divide_error_flags(t: &Test, failure: &str) -> bool {
    let r = &t.initial.regs;
    let ss = r.ss.unwrap_or(0) as u32;
    let sp = r.sp.unwrap_or(0);
    let a0 = (ss << 4) + sp.wrapping_sub(2) as u32;
    let a1 = (ss << 4) + sp.wrapping_sub(1) as u32;
    failure.split("; ").all(|d| {
        let Some(rest) = d.strip_prefix("ram[") else {
            return true;
        };
        let hex = rest.split(']').next().unwrap_or("");
        let a = u32::from_str_radix(hex.trim_start_matches("0x"), 16).unwrap_or(u32::MAX);
        a == a0 || a == a1
    })
}

/// Whether the IDIV of test `t` (form F6.7 or F7.7, register divisor) has a quotient
/// outside the signed range of its size.
fn idiv_overflows(t: &Test) -> bool {
    use iced_x86::{OpKind, Register};
    let i = Decoder::with_ip(16, &t.bytes, 0, DecoderOptions::NONE).decode();
    if i.op_kind(0) != OpKind::Register {
        return false;
    }
    let r = &t.initial.regs;
    let g = |v: Option<u16>| v.unwrap_or(0) as i64;
    let reg8 = |reg: Register| -> i64 {
        let (w, hi) = match reg {
            Register::AL => (r.ax, false),
            Register::CL => (r.cx, false),
            Register::DL => (r.dx, false),
            Register::BL => (r.bx, false),
            Register::AH => (r.ax, true),
            Register::CH => (r.cx, true),
            Register::DH => (r.dx, true),
            _ => (r.bx, true),
        };
        let w = w.unwrap_or(0);
        (if hi { (w >> 8) as u8 } else { w as u8 }) as i8 as i64
    };
    let (q, lim) = if i.op_register(0).size() == 1 {
        let d = reg8(i.op_register(0));
        if d == 0 {
            return false;
        }
        ((g(r.ax) as u16 as i16 as i64) / d, 128)
    } else {
        let d = match i.op_register(0) {
            Register::AX => r.ax,
            Register::CX => r.cx,
            Register::DX => r.dx,
            Register::BX => r.bx,
            Register::SP => r.sp,
            Register::BP => r.bp,
            Register::SI => r.si,
            _ => r.di,
        }
        .unwrap_or(0) as i16 as i64;
        if d == 0 {
            return false;
        }
        let n = ((g(r.dx) << 16) | g(r.ax)) as u32 as i32 as i64;
        (n / d, 32768)
    };
    q >= lim || q < -lim
}

/// Whether `bytes` hold an opcode a 386 or later rejects with #UD (the 80286 may run
/// past its 10-byte limit on such a byte string before deciding, raising interrupt 13).
fn undefined_opcode(bytes: &[u8]) -> bool {
    let i = Decoder::with_ip(16, bytes, 0, DecoderOptions::NO_INVALID_CHECK).decode();
    i.code() == iced_x86::Code::INVALID && !bytes.is_empty()
}

/// Whether `bytes` are MOV r/m,Sreg or MOV Sreg,r/m naming segment register 4 or 5.
fn fs_gs_move(bytes: &[u8]) -> bool {
    let mut k = 0;
    while k < bytes.len() && matches!(bytes[k], 0x26 | 0x2e | 0x36 | 0x3e | 0xf0 | 0xf2 | 0xf3) {
        k += 1;
    }
    match (bytes.get(k), bytes.get(k + 1)) {
        (Some(0x8c | 0x8e), Some(m)) => matches!((m >> 3) & 7, 4 | 5),
        _ => false,
    }
}

/// Whether `bytes` decode (16-bit) to an instruction with a LOCK prefix that a 386 or
/// later rejects with #UD: iced-x86 refuses it normally and accepts it when told not
/// to check.
fn lock_not_allowed(bytes: &[u8]) -> bool {
    use iced_x86::Code;
    let strict = Decoder::with_ip(16, bytes, 0, DecoderOptions::NONE).decode();
    if strict.code() != Code::INVALID {
        return false;
    }
    let lax = Decoder::with_ip(16, bytes, 0, DecoderOptions::NO_INVALID_CHECK).decode();
    lax.code() != Code::INVALID && lax.has_lock_prefix()
}

/// Totals of a run, per form.
#[derive(Debug, Default)]
pub struct Summary {
    /// Passed tests per form.
    pub per_form: BTreeMap<String, (u64, u64)>,
    /// Failures that are 286-vs-386 differences: (form, idx, name, reason).
    pub differences: Vec<(String, u64, String, &'static str)>,
}
