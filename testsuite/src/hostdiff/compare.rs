//! Comparing the two engines after one instruction, masking only what the manuals
//! leave undefined for that instruction (see the module doc of `hostdiff`).

use super::{vector_name, Fault, Outcome, State, MEM_BASE, MEM_SIZE};
use iced_x86::{Instruction, Mnemonic, OpKind, Register, RflagsBits};

/// EFLAGS.CF.
const CF: u32 = 1 << 0;
/// EFLAGS.PF.
const PF: u32 = 1 << 2;
/// EFLAGS.AF.
const AF: u32 = 1 << 4;
/// EFLAGS.ZF.
const ZF: u32 = 1 << 6;
/// EFLAGS.SF.
const SF: u32 = 1 << 7;
/// EFLAGS.TF (set by the tracer while single-stepping; not compared).
const TF: u32 = 1 << 8;
/// EFLAGS.DF.
const DF: u32 = 1 << 10;
/// EFLAGS.OF.
const OF: u32 = 1 << 11;
/// EFLAGS.RF (the kernel's business on the host; not compared).
const RF: u32 = 1 << 16;
/// EFLAGS.AC.
const AC: u32 = 1 << 18;
/// The six arithmetic flags.
const ARITH: u32 = CF | PF | AF | ZF | SF | OF;

/// x87 status word C0.
const C0: u16 = 1 << 8;
/// x87 status word C1.
const C1: u16 = 1 << 9;
/// x87 status word C2.
const C2: u16 = 1 << 10;
/// x87 status word C3.
const C3: u16 = 1 << 14;

/// Comparison settings.
#[derive(Debug, Clone, Copy)]
pub struct Config {
    /// Tolerance for x87 transcendental results, in units in the last place of the
    /// 64-bit significand.
    pub fp_ulps: u64,
}

impl Default for Config {
    fn default() -> Self {
        Config { fp_ulps: 1 }
    }
}

/// One difference between the engines.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Diff {
    /// What differs (register, flag, memory address...).
    pub what: String,
    /// The host's value.
    pub native: String,
    /// The interpreter's value.
    pub interp: String,
}

/// EFLAGS bits from an iced-x86 `RflagsBits` set.
pub fn eflags_of_rflags(r: u32) -> u32 {
    let mut f = 0;
    for (rb, fl) in [
        (RflagsBits::OF, OF),
        (RflagsBits::SF, SF),
        (RflagsBits::ZF, ZF),
        (RflagsBits::AF, AF),
        (RflagsBits::CF, CF),
        (RflagsBits::PF, PF),
        (RflagsBits::DF, DF),
        (RflagsBits::AC, AC),
    ] {
        if r & rb != 0 {
            f |= fl;
        }
    }
    f
}

/// Shifts and rotates (their count is masked to 5 bits).
pub(super) fn is_shift(m: Mnemonic) -> bool {
    matches!(
        m,
        Mnemonic::Rol
            | Mnemonic::Ror
            | Mnemonic::Rcl
            | Mnemonic::Rcr
            | Mnemonic::Shl
            | Mnemonic::Shr
            | Mnemonic::Sar
            | Mnemonic::Shld
            | Mnemonic::Shrd
    )
}

/// Whether the mnemonic is an x87 transcendental (compared with a tolerance).
pub fn is_transcendental(m: Mnemonic) -> bool {
    matches!(
        m,
        Mnemonic::Fsin
            | Mnemonic::Fcos
            | Mnemonic::Fsincos
            | Mnemonic::Fptan
            | Mnemonic::Fpatan
            | Mnemonic::F2xm1
            | Mnemonic::Fyl2x
            | Mnemonic::Fyl2xp1
    )
}

fn reg_value(pre: &State, r: Register) -> Option<u64> {
    use Register::*;
    let idx = |r: Register| -> Option<usize> {
        [EAX, ECX, EDX, EBX, ESP, EBP, ESI, EDI]
            .iter()
            .position(|x| *x == r.full_register32())
    };
    match r {
        ES | CS | SS | DS => Some(0),
        AH | CH | DH | BH => idx(r).map(|i| ((pre.gpr[i] >> 8) & 0xff) as u64),
        _ if r.is_gpr8() => idx(r).map(|i| (pre.gpr[i] & 0xff) as u64),
        _ if r.is_gpr16() => idx(r).map(|i| (pre.gpr[i] & 0xffff) as u64),
        _ if r.is_gpr32() => idx(r).map(|i| pre.gpr[i] as u64),
        _ => Option::None,
    }
}

/// The linear address of the instruction's memory operand, from the state before it.
pub fn mem_addr(ins: &Instruction, pre: &State) -> Option<u32> {
    for n in 0..ins.op_count() {
        if ins.op_kind(n) == OpKind::Memory {
            return ins
                .virtual_address(n, 0, |r, _, _| reg_value(pre, r))
                .map(|a| a as u32);
        }
    }
    None
}

/// The shift/rotate count an instruction uses (masked to 5 bits), from the state before it.
fn shift_count(ins: &Instruction, pre: &State) -> Option<u32> {
    let n = ins.op_count();
    let last = n.checked_sub(1)?;
    let c = match ins.op_kind(last) {
        OpKind::Register if ins.op_register(last) == Register::CL => pre.gpr[1] & 0xff,
        OpKind::Immediate8 => ins.immediate8() as u32,
        _ => return None,
    };
    Some(c & 0x1f)
}

/// Operand width in bits of operand 0 (8/16/32), for integer instructions.
fn width(ins: &Instruction) -> u32 {
    match ins.op_kind(0) {
        OpKind::Register => ins.op0_register().size() as u32 * 8,
        _ => ins.memory_size().size() as u32 * 8,
    }
}

/// Flags the SDM leaves undefined for this instruction with these inputs.
pub fn undefined_flags(ins: &Instruction, pre: &State) -> u32 {
    let mut u = eflags_of_rflags(ins.rflags_undefined());
    let m = ins.mnemonic();
    if is_shift(m) {
        if let Some(c) = shift_count(ins, pre) {
            let w = width(ins);
            if c != 1 && c != 0 {
                u |= OF;
            }
            if c != 0
                && !matches!(
                    m,
                    Mnemonic::Rol | Mnemonic::Ror | Mnemonic::Rcl | Mnemonic::Rcr
                )
            {
                u |= AF;
            }
            if matches!(m, Mnemonic::Shl | Mnemonic::Shr) && c >= w {
                u |= CF;
            }
            if matches!(m, Mnemonic::Shld | Mnemonic::Shrd) && c > w {
                u |= ARITH;
            }
        }
    }
    u
}

/// Status-word condition bits the SDM leaves undefined after this x87 instruction.
pub fn undefined_cc(m: Mnemonic) -> u16 {
    use Mnemonic::*;
    match m {
        Fprem | Fprem1 | Fcom | Fcomp | Fcompp | Fucom | Fucomp | Fucompp | Ficom | Ficomp
        | Ftst | Fxam | Fcomi | Fcomip | Fucomi | Fucomip | Fninit | Finit | Fldenv | Frstor
        | Fxrstor | Fnsave | Fsave | Fxsave | Wait => 0,
        // C2 reports an out-of-range operand; C1 is the rounding direction of a result
        // accepted within a tolerance.
        Fsin | Fcos | Fsincos | Fptan => C0 | C1 | C3,
        Fpatan | F2xm1 | Fyl2x | Fyl2xp1 => C0 | C1 | C2 | C3,
        Fldcw | Fnstcw | Fstcw | Fnstsw | Fstsw | Fnstenv | Fstenv | Fnclex | Fclex | Ffree
        | Fnop => C0 | C1 | C2 | C3,
        _ => C0 | C2 | C3,
    }
}

/// Status-word invalid-operation flag.
const FSW_IE: u16 = 1 << 0;
/// Status-word stack-fault flag.
const FSW_SF: u16 = 1 << 6;

/// Condition bits undefined for this x87 instruction given the host's resulting status
/// word:
/// - FPREM/FPREM1 after an invalid operation or with a NaN operand: there is no
///   quotient, so C0/C3 (and C1 unless it reports a stack underflow) carry nothing the
///   SDM defines;
/// - FCMOVcc and FCOMI/FCOMIP/FUCOMI/FUCOMIP: the SDM defines C1 only as the stack-fault
///   indicator (vol. 1 table 8-3 "#IS"; the FCMOVcc page: "set to 0 if stack underflow
///   occurred"), so C1 is compared only after a stack fault.
pub fn undefined_cc_dynamic(m: Mnemonic, pre: &State, host_fsw: u16) -> u16 {
    use Mnemonic::*;
    let pre_fsw = pre.fx.fsw;
    let nan = |i: usize| {
        let b = &pre.fx.st[i];
        let mant = u64::from_le_bytes(b[..8].try_into().unwrap_or([0; 8]));
        u16::from_le_bytes([b[8], b[9]]) & 0x7fff == 0x7fff && mant << 1 != 0
    };
    // A stack fault by this instruction (SF is sticky: if it was already set, whether
    // this instruction faulted is unknown, so C1 is not compared).
    let sf = host_fsw & FSW_SF != 0 && pre_fsw & FSW_SF == 0;
    match m {
        Fprem | Fprem1 if host_fsw & FSW_IE != 0 || nan(0) || nan(1) => {
            C0 | C3 | if sf { 0 } else { C1 }
        }
        Fcmovb | Fcmove | Fcmovbe | Fcmovu | Fcmovnb | Fcmovne | Fcmovnbe | Fcmovnu | Fcomi
        | Fcomip | Fucomi | Fucomip
            if !sf =>
        {
            C1
        }
        _ => 0,
    }
}

/// Whether the CPU may touch the parts of this instruction's memory operand in any
/// order, so a page fault may name any address inside the operand: the x87
/// environment and state images (the SDM does not order their field accesses; the
/// host's AMD part writes FNSTENV's last bytes first).
fn multipart_operand(m: Mnemonic) -> bool {
    use Mnemonic::*;
    matches!(
        m,
        Fnstenv | Fstenv | Fldenv | Fnsave | Fsave | Frstor | Fxsave | Fxrstor
    )
}

/// Whether the SDM leaves this x87 instruction's result undefined for its inputs:
/// F2XM1 with a finite or infinite ST(0) outside [-1, +1], FYL2XP1 with ST(0) outside
/// +-(1 - sqrt(2)/2). The stack registers, the status word (exceptions, and with them
/// whether the instruction completes and pops) and the tags are then not compared.
pub fn undefined_x87_result(m: Mnemonic, pre: &State) -> bool {
    let top = pre.fx.top();
    if pre.fx.ftw & (1 << top) == 0 {
        return false; // stack underflow: defined
    }
    let b = &pre.fx.st[0];
    let mant = u64::from_le_bytes(b[..8].try_into().unwrap_or([0; 8]));
    let exp = u16::from_le_bytes([b[8], b[9]]) & 0x7fff;
    let nan = exp == 0x7fff && mant << 1 != 0;
    if nan {
        return false;
    }
    let mag = if exp == 0x7fff {
        f64::INFINITY
    } else {
        mant as f64 * 2f64.powi(exp as i32 - 16383 - 63)
    };
    match m {
        Mnemonic::F2xm1 => mag > 1.0,
        Mnemonic::Fyl2xp1 => mag > 1.0 - std::f64::consts::SQRT_2 / 2.0,
        _ => false,
    }
}

/// The one host deviation from the SDM accepted: Intel requires 2- or 4-byte alignment
/// (by operand size) of the FSTENV/FLDENV and FSAVE/FRSTOR areas under alignment
/// checking (SDM vol. 3, table "Alignment Requirements by Data Type"); the AMD host
/// does not check them. An interpreter #AC there where the host completes, or faults
/// later in the same instruction with #PF, is accepted.
fn host_lacks_alignment_check(m: Mnemonic, no: &Outcome, io: &Outcome) -> bool {
    use Mnemonic::*;
    matches!(m, Fnstenv | Fstenv | Fldenv | Fnsave | Fsave | Frstor)
        && matches!(no, Outcome::Done | Outcome::Fault(Fault { vector: 14, .. }))
        && matches!(io, Outcome::Fault(Fault { vector: 17, .. }))
}

/// Byte ranges (offsets from the operand address) of a stored x87 environment that
/// hold the instruction/operand pointers and opcode.
fn env_pointer_ranges(ins: &Instruction) -> &'static [(u32, u32)] {
    use iced_x86::Code::*;
    match ins.code() {
        Fnstenv_m28byte | Fstenv_m28byte | Fnsave_m108byte | Fsave_m108byte => &[(12, 28)],
        Fnstenv_m14byte | Fstenv_m14byte | Fnsave_m94byte | Fsave_m94byte => &[(6, 14)],
        // FOP, FIP/FCS, FDP/FDS, and MXCSR_MASK (28..32): the MXCSR bits the model
        // supports, a property of the CPU (the host's AMD part reports its MM bit).
        Fxsave_m512byte => &[(6, 24), (28, 32)],
        _ => &[],
    }
}

/// Orders 80-bit values of one sign monotonically (normals, denormals and pseudo forms
/// alike), so nearby values differ by their distance in ulps.
fn f80_ordinal(b: &[u8; 10]) -> (bool, i128) {
    let mant = u64::from_le_bytes(b[..8].try_into().unwrap_or([0; 8]));
    let se = u16::from_le_bytes([b[8], b[9]]);
    let exp = (se & 0x7fff) as i128;
    let neg = se & 0x8000 != 0;
    let v = if exp == 0 {
        mant as i128
    } else {
        (exp << 63) + (mant & !(1 << 63)) as i128
    };
    (neg, v)
}

fn f80_close(a: &[u8; 10], b: &[u8; 10], ulps: u64) -> bool {
    if a == b {
        return true;
    }
    let ea = u16::from_le_bytes([a[8], a[9]]) & 0x7fff;
    let eb = u16::from_le_bytes([b[8], b[9]]) & 0x7fff;
    if ea == 0x7fff || eb == 0x7fff {
        return false;
    }
    let (na, va) = f80_ordinal(a);
    let (nb, vb) = f80_ordinal(b);
    if na != nb {
        return va + vb <= ulps as i128;
    }
    (va - vb).abs() <= ulps as i128
}

/// Formats an 80-bit register.
pub fn fmt_f80(b: &[u8; 10]) -> String {
    let mant = u64::from_le_bytes(b[..8].try_into().unwrap_or([0; 8]));
    let se = u16::from_le_bytes([b[8], b[9]]);
    let exp = (se & 0x7fff) as i32;
    let approx = if exp == 0x7fff {
        if mant << 1 == 0 {
            "inf".to_string()
        } else {
            "nan".to_string()
        }
    } else {
        let v = (mant as f64) * 2f64.powi(exp - 16383 - 63);
        format!("{v:e}")
    };
    format!(
        "{}{:04x}:{:016x} ({}{})",
        "",
        se,
        mant,
        if se & 0x8000 != 0 { "-" } else { "" },
        approx
    )
}

fn outcome_str(o: &Outcome) -> String {
    match o {
        Outcome::Done => "completed".into(),
        Outcome::Fault(Fault { vector, addr }) => match addr {
            Some(a) => format!("{} at {a:#010x}", vector_name(*vector)),
            None => vector_name(*vector).to_string(),
        },
    }
}

const GPR_NAMES: [&str; 8] = ["eax", "ecx", "edx", "ebx", "esp", "ebp", "esi", "edi"];

/// Compares the engines after `ins` ran from `pre`.
pub fn compare(
    ins: &Instruction,
    pre: &State,
    (no, ns): (&Outcome, &State),
    (io, is): (&Outcome, &State),
    cfg: &Config,
) -> Vec<Diff> {
    let mut d = Vec::new();
    let mut diff = |what: String, n: String, i: String| {
        d.push(Diff {
            what,
            native: n,
            interp: i,
        })
    };
    let in_operand = |x: u32| {
        let size = ins.memory_size().size() as u32;
        mem_addr(ins, pre).is_some_and(|a| x.wrapping_sub(a) < size.max(1))
    };
    // CMPS reads two operands; the SDM does not order the reads, so a page fault may
    // name either (the host reads ES:EDI first), and one engine may take a #PF on one
    // operand where the other takes an #AC on the other.
    let size = ins.memory_size().size() as u32;
    let in_cmps_operand = |x: u32| {
        matches!(
            ins.mnemonic(),
            Mnemonic::Cmpsb | Mnemonic::Cmpsw | Mnemonic::Cmpsd
        ) && [ns.gpr[6], ns.gpr[7]]
            .iter()
            .any(|&a| x.wrapping_sub(a) < size.max(1))
    };
    let cmps = matches!(
        ins.mnemonic(),
        Mnemonic::Cmpsb | Mnemonic::Cmpsw | Mnemonic::Cmpsd
    );
    let same_outcome = match (no, io) {
        (Outcome::Done, Outcome::Done) => true,
        // Each engine faulted on a different CMPS operand (#PF on one, #AC on the other).
        (Outcome::Fault(a), Outcome::Fault(b))
            if cmps
                && a.vector != b.vector
                && [a.vector, b.vector].iter().all(|v| *v == 14 || *v == 17) =>
        {
            true
        }
        // A misaligned FXSAVE/FXRSTOR area with alignment checking on: the SDM lets
        // the implementation signal #AC or #GP.
        (Outcome::Fault(a), Outcome::Fault(b))
            if matches!(ins.mnemonic(), Mnemonic::Fxsave | Mnemonic::Fxrstor)
                && a.vector != b.vector
                && [a.vector, b.vector].iter().all(|v| *v == 13 || *v == 17)
                && mem_addr(ins, pre).is_some_and(|x| x & 15 != 0) =>
        {
            true
        }
        (Outcome::Fault(a), Outcome::Fault(b)) => {
            a.vector == b.vector
                && match (a.addr, b.addr) {
                    (Some(x), Some(y)) if x != y => {
                        (multipart_operand(ins.mnemonic()) && in_operand(x) && in_operand(y))
                            || (in_cmps_operand(x) && in_cmps_operand(y))
                    }
                    _ => true,
                }
        }
        _ => false,
    };
    if !same_outcome && host_lacks_alignment_check(ins.mnemonic(), no, io) {
        return d;
    }
    if !same_outcome {
        diff("outcome".into(), outcome_str(no), outcome_str(io));
        return d;
    }
    // A tripwire fault (no CR2) leaves the interpreter's state meaningless.
    if let (
        Outcome::Fault(_),
        Outcome::Fault(Fault {
            addr: None,
            vector: 14,
        }),
    ) = (no, io)
    {
        return d;
    }
    let m = ins.mnemonic();
    let done = *no == Outcome::Done;
    // General registers.
    let mut gpr_mask = [u32::MAX; 8];
    let mut mem_mask: Vec<(u32, u32)> = Vec::new();
    if done && matches!(m, Mnemonic::Bsf | Mnemonic::Bsr) && ns.eflags & ZF != 0 {
        if let Some(i) = reg_index(ins.op0_register()) {
            gpr_mask[i] = if ins.op0_register().is_gpr16() {
                !0xffff
            } else {
                0
            };
        }
    }
    if done && matches!(m, Mnemonic::Shld | Mnemonic::Shrd) {
        if let Some(c) = shift_count(ins, pre) {
            if c > width(ins) {
                match ins.op_kind(0) {
                    OpKind::Register => {
                        if let Some(i) = reg_index(ins.op0_register()) {
                            gpr_mask[i] = !0xffff;
                        }
                    }
                    _ => {
                        if let Some(a) = mem_addr(ins, pre) {
                            mem_mask.push((a, a + 2));
                        }
                    }
                }
            }
        }
    }
    for i in 0..8 {
        if (ns.gpr[i] ^ is.gpr[i]) & gpr_mask[i] != 0 {
            diff(
                GPR_NAMES[i].into(),
                format!("{:08x}", ns.gpr[i]),
                format!("{:08x}", is.gpr[i]),
            );
        }
    }
    if ns.eip != is.eip {
        diff(
            "eip".into(),
            format!("{:08x}", ns.eip),
            format!("{:08x}", is.eip),
        );
    }
    let mut fmask = !(TF | RF | if done { undefined_flags(ins, pre) } else { 0 });
    // FCOMI family with an unmasked invalid operation: the SDM sets ZF PF CF to 111
    // only when IM is set and gives no value otherwise.
    if done
        && matches!(
            m,
            Mnemonic::Fcomi | Mnemonic::Fcomip | Mnemonic::Fucomi | Mnemonic::Fucomip
        )
        && pre.fx.fcw & 1 == 0
        && ns.fx.fsw & FSW_IE != 0
    {
        fmask &= !(ZF | PF | CF);
    }
    if (ns.eflags ^ is.eflags) & fmask != 0 {
        diff(
            "eflags".into(),
            format!("{:08x} ({})", ns.eflags, flag_names(ns.eflags)),
            format!(
                "{:08x} ({}); differing {:08x}",
                is.eflags,
                flag_names(is.eflags),
                (ns.eflags ^ is.eflags) & fmask
            ),
        );
    }
    // x87 and SSE.
    let (nf, inf) = (&ns.fx, &is.fx);
    if nf.fcw != inf.fcw {
        diff(
            "fcw".into(),
            format!("{:04x}", nf.fcw),
            format!("{:04x}", inf.fcw),
        );
    }
    let undefined_result = done && undefined_x87_result(m, pre);
    let ccmask = if undefined_result {
        0xffff // nothing: which exceptions occur, and so whether it pops, is undefined too
    } else if done {
        undefined_cc(m) | undefined_cc_dynamic(m, pre, nf.fsw)
    } else {
        0
    };
    if (nf.fsw ^ inf.fsw) & !ccmask != 0 {
        diff(
            "fsw".into(),
            format!("{:04x}", nf.fsw),
            format!("{:04x} (compared bits {:04x})", inf.fsw, !ccmask),
        );
    }
    if nf.ftw != inf.ftw && !undefined_result {
        diff(
            "ftw (abridged)".into(),
            format!("{:08b}", nf.ftw),
            format!("{:08b}", inf.ftw),
        );
    }
    let fbld_undefined = done && m == Mnemonic::Fbld && {
        let a = mem_addr(ins, pre).unwrap_or(0).wrapping_sub(MEM_BASE) as usize;
        pre.mem
            .get(a..a + 9)
            .is_some_and(|b| b.iter().any(|x| x & 0xf > 9 || x >> 4 > 9))
    };
    let tol = if done && is_transcendental(m) {
        cfg.fp_ulps
    } else {
        0
    };
    // Compare physical registers (ST(i) moves with TOP, which is compared above).
    for i in 0..8 {
        if (fbld_undefined && i == 0) || undefined_result {
            continue;
        }
        let (a, b) = (&nf.st[i], &inf.st[i]);
        if a != b && !(tol > 0 && f80_close(a, b, tol)) {
            diff(
                format!("st({i})"),
                fmt_f80(a),
                fmt_f80(b)
                    + &if tol > 0 {
                        format!(" (beyond {tol} ulp)")
                    } else {
                        String::new()
                    },
            );
        }
    }
    if nf.mxcsr != inf.mxcsr {
        diff(
            "mxcsr".into(),
            format!("{:08x}", nf.mxcsr),
            format!("{:08x}", inf.mxcsr),
        );
    }
    for i in 0..8 {
        if nf.xmm[i] != inf.xmm[i] {
            diff(format!("xmm{i}"), hex(&nf.xmm[i]), hex(&inf.xmm[i]));
        }
    }
    // Memory.
    if done {
        if let Some(a) = mem_addr(ins, pre) {
            for &(s, e) in env_pointer_ranges(ins) {
                mem_mask.push((a + s, a + e));
            }
        }
    }
    let masked = |addr: u32| mem_mask.iter().any(|&(s, e)| addr >= s && addr < e);
    let mut first: Option<usize> = None;
    let mut count = 0;
    for k in 0..MEM_SIZE as usize {
        if ns.mem[k] != is.mem[k] && !masked(MEM_BASE + k as u32) {
            count += 1;
            first.get_or_insert(k);
        }
    }
    if let Some(k) = first {
        let end = (k + 16).min(MEM_SIZE as usize);
        let at = MEM_BASE + k as u32;
        let rel = match mem_addr(ins, pre) {
            Some(a) if at.wrapping_sub(a) < 0x1000 => format!(" = operand+{:#x}", at - a),
            _ => String::new(),
        };
        diff(
            format!(
                "memory {at:08x}{rel} ({count} byte{} differ)",
                if count == 1 { "" } else { "s" }
            ),
            hex(&ns.mem[k..end]),
            hex(&is.mem[k..end]),
        );
    }
    d
}

fn reg_index(r: Register) -> Option<usize> {
    use Register::*;
    [EAX, ECX, EDX, EBX, ESP, EBP, ESI, EDI]
        .iter()
        .position(|x| *x == r.full_register32())
}

fn hex(b: &[u8]) -> String {
    b.iter()
        .map(|x| format!("{x:02x}"))
        .collect::<Vec<_>>()
        .join(" ")
}

/// Names of the set flags among CF PF AF ZF SF DF OF AC.
pub fn flag_names(f: u32) -> String {
    let mut s = Vec::new();
    for (b, n) in [
        (CF, "CF"),
        (PF, "PF"),
        (AF, "AF"),
        (ZF, "ZF"),
        (SF, "SF"),
        (DF, "DF"),
        (OF, "OF"),
        (AC, "AC"),
    ] {
        if f & b != 0 {
            s.push(n);
        }
    }
    s.join(" ")
}

/// A compact dump of a state (registers, flags, x87).
pub fn dump(st: &State) -> String {
    let mut s = String::new();
    for (i, n) in GPR_NAMES.iter().enumerate() {
        s += &format!("{n}={:08x} ", st.gpr[i]);
    }
    s += &format!(
        "eip={:08x} eflags={:08x} [{}]\n    fcw={:04x} fsw={:04x} ftw={:08b} top={}",
        st.eip,
        st.eflags,
        flag_names(st.eflags),
        st.fx.fcw,
        st.fx.fsw,
        st.fx.ftw,
        st.fx.top()
    );
    for i in 0..8 {
        let phys = (st.fx.top() + i) & 7;
        let tag = if st.fx.ftw & (1 << phys) != 0 {
            ""
        } else {
            " empty"
        };
        s += &format!("\n    st({i})={}{tag}", fmt_f80(&st.fx.st[i]));
    }
    s
}

#[cfg(test)]
mod tests {
    use super::*;
    use iced_x86::{Decoder, DecoderOptions};

    fn dec(b: &[u8]) -> Instruction {
        Decoder::new(32, b, DecoderOptions::NONE).decode()
    }

    #[test]
    fn undefined_flags_follow_the_sdm() {
        let pre = State::default();
        // MUL: SF ZF AF PF undefined (SDM MUL, "Flags Affected").
        assert_eq!(
            undefined_flags(&dec(&[0xf7, 0xe1]), &pre),
            SF | ZF | AF | PF
        );
        // ADD: nothing undefined.
        assert_eq!(undefined_flags(&dec(&[0x01, 0xc8]), &pre), 0);
        // SHL r8, CL with CL = 9: CF (count >= 8), OF (count != 1), AF undefined.
        let mut p = State::default();
        p.gpr[1] = 9;
        let u = undefined_flags(&dec(&[0xd2, 0xe0]), &p);
        assert_eq!(u & (CF | OF | AF), CF | OF | AF);
        // SHL r32, 1: CF and OF defined.
        let u = undefined_flags(&dec(&[0xd1, 0xe0]), &pre);
        assert_eq!(u & (CF | OF), 0);
    }

    #[test]
    fn x87_condition_codes_follow_the_sdm_table() {
        // SDM vol. 1 table 8-3: arithmetic leaves C0 C2 C3 undefined, C1 = round-up/#IS.
        assert_eq!(undefined_cc(Mnemonic::Fadd), C0 | C2 | C3);
        // Compares define all four.
        assert_eq!(undefined_cc(Mnemonic::Fcom), 0);
        assert_eq!(undefined_cc(Mnemonic::Fxam), 0);
        // FLDCW, FSTSW, FNSTENV, FCLEX, FFREE, FNOP: all undefined.
        assert_eq!(undefined_cc(Mnemonic::Fldcw), C0 | C1 | C2 | C3);
        // FSIN & co.: C2 (out of range) defined.
        assert_eq!(undefined_cc(Mnemonic::Fsin) & C2, 0);
        // FPREM with a NaN dividend: no quotient bits.
        let mut pre = State::default();
        pre.fx.st[0] = [1, 0, 0, 0, 0, 0, 0, 0xc0, 0xff, 0x7f];
        assert_eq!(undefined_cc_dynamic(Mnemonic::Fprem, &pre, 0), C0 | C1 | C3);
        pre.fx.st[0] = [0, 0, 0, 0, 0, 0, 0, 0x80, 0xff, 0x3f];
        pre.fx.st[1] = pre.fx.st[0];
        assert_eq!(undefined_cc_dynamic(Mnemonic::Fprem, &pre, 0), 0);
    }

    #[test]
    fn ulp_distance() {
        let one = [0, 0, 0, 0, 0, 0, 0, 0x80, 0xff, 0x3f];
        let mut next = one;
        next[0] = 1;
        assert!(f80_close(&one, &next, 1));
        let mut far = one;
        far[0] = 2;
        assert!(!f80_close(&one, &far, 1));
        // Across an exponent boundary: the largest value below 1.0 is 1 ulp away.
        let below = [0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xff, 0xfe, 0x3f];
        assert!(f80_close(&one, &below, 1));
    }

    #[test]
    fn env_pointer_fields_are_masked() {
        // fnstenv [eax]
        let i = dec(&[0xd9, 0x30]);
        assert_eq!(env_pointer_ranges(&i), &[(12, 28)]);
        let mut pre = State::default();
        pre.gpr[0] = MEM_BASE + 0x40;
        assert_eq!(mem_addr(&i, &pre), Some(MEM_BASE + 0x40));
    }
}
