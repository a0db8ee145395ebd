//! Random instruction sequences and starting states.
//!
//! The instruction pool is every legacy-encoded iced-x86 `Code` valid in 32-bit mode
//! whose mnemonic belongs to one of the [`Class`]es (so 16-bit operand-size forms come
//! with their 32-bit ones), minus undocumented aliases. Operands are filled per operand
//! kind. A "group" is one chosen instruction plus the set-up instructions it needs:
//! pointers for memory operands (`mov reg, addr`, skipped when the generator knows the
//! register already points into the data area), small REP counts, dividends and
//! divisors that mostly do not fault, return addresses for RET, EBP inside the stack for
//! LEAVE/ENTER, clean flags images for POPF, a saved environment before FLDENV/FRSTOR/
//! FXRSTOR. Branches go forward to the start of a later group (or the end). Prefixes:
//! LOCK (mostly where allowed, rarely elsewhere for #UD) and segment overrides (FS/GS
//! are null: #GP). A quarter of the sequences start just before the end of the first
//! code page and run into the writable second one, which memory operands sometimes
//! target: instruction fetch across pages and self-modifying code.

use super::compare::is_shift;
use super::{Fx, Rng, State, CODE_BASE, CODE_RW, DATA_BASE, DATA_SIZE, MEM_BASE, STACK_INIT};
use iced_x86::{
    Code, Encoder, EncodingKind, Instruction, InstructionInfoFactory, MemoryOperand, Mnemonic,
    OpAccess, OpCodeOperandKind as K, Register, RepPrefixKind,
};

/// Instruction classes (for `--classes`).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord)]
pub enum Class {
    /// ADD OR ADC SBB AND SUB XOR CMP INC DEC NEG NOT TEST.
    Alu,
    /// ROL ROR RCL RCR SHL SHR SAR SHLD SHRD.
    Shift,
    /// MUL IMUL DIV IDIV.
    MulDiv,
    /// DAA DAS AAA AAS AAM AAD.
    Bcd,
    /// BT BTS BTR BTC BSF BSR.
    Bit,
    /// SETcc CMOVcc.
    Cond,
    /// BSWAP XADD CMPXCHG CMPXCHG8B XCHG.
    Xchg,
    /// MOVS CMPS STOS LODS SCAS, with and without REP.
    String,
    /// MOV LEA MOVZX MOVSX XLAT NOP.
    Mov,
    /// PUSH POP PUSHA POPA PUSHF POPF ENTER LEAVE.
    Stack,
    /// LAHF SAHF CLC STC CMC CLD STD.
    Flags,
    /// CBW CWDE CWD CDQ.
    Convert,
    /// Jcc JMP CALL RET LOOP JECXZ.
    Branch,
    /// x87 loads, stores, constants, FXCH, FCMOVcc.
    X87Load,
    /// x87 arithmetic, FSQRT FPREM FRNDINT FSCALE FXTRACT FABS FCHS.
    X87Arith,
    /// x87 compares, FTST, FXAM.
    X87Cmp,
    /// x87 control: FLDCW FSTCW FSTSW FCLEX FINIT FFREE FINCSTP FDECSTP FNOP WAIT.
    X87Misc,
    /// FSTENV FLDENV FSAVE FRSTOR FXSAVE FXRSTOR.
    X87Env,
    /// FSIN FCOS FSINCOS FPTAN FPATAN F2XM1 FYL2X FYL2XP1.
    X87Trans,
}

/// Class names as `--classes` takes them.
pub const CLASS_NAMES: &[(&str, Class)] = &[
    ("alu", Class::Alu),
    ("shift", Class::Shift),
    ("muldiv", Class::MulDiv),
    ("bcd", Class::Bcd),
    ("bit", Class::Bit),
    ("cond", Class::Cond),
    ("xchg", Class::Xchg),
    ("string", Class::String),
    ("mov", Class::Mov),
    ("stack", Class::Stack),
    ("flags", Class::Flags),
    ("convert", Class::Convert),
    ("branch", Class::Branch),
    ("x87-load", Class::X87Load),
    ("x87-arith", Class::X87Arith),
    ("x87-cmp", Class::X87Cmp),
    ("x87-misc", Class::X87Misc),
    ("x87-env", Class::X87Env),
    ("x87-trans", Class::X87Trans),
];

/// Parses a comma-separated class list; `int` and `x87` name the two halves.
pub fn parse_classes(s: &str) -> Result<Vec<Class>, String> {
    let mut v = Vec::new();
    for w in s.split(',').map(str::trim).filter(|w| !w.is_empty()) {
        match w {
            "all" => v.extend(CLASS_NAMES.iter().map(|c| c.1)),
            "int" => v.extend(CLASS_NAMES.iter().map(|c| c.1).filter(|c| !is_x87(*c))),
            "x87" => v.extend(CLASS_NAMES.iter().map(|c| c.1).filter(|c| is_x87(*c))),
            _ => match CLASS_NAMES.iter().find(|c| c.0 == w) {
                Some(c) => v.push(c.1),
                None => return Err(format!("unknown class {w:?}")),
            },
        }
    }
    v.sort();
    v.dedup();
    Ok(v)
}

/// Whether a class is an x87 one.
pub fn is_x87(c: Class) -> bool {
    matches!(
        c,
        Class::X87Load
            | Class::X87Arith
            | Class::X87Cmp
            | Class::X87Misc
            | Class::X87Env
            | Class::X87Trans
    )
}

/// Name of a class.
pub fn class_name(c: Class) -> &'static str {
    CLASS_NAMES
        .iter()
        .find(|x| x.1 == c)
        .map(|x| x.0)
        .unwrap_or("?")
}

/// The class of a mnemonic, if the fuzzer covers it.
pub fn class_of(m: Mnemonic) -> Option<Class> {
    use Mnemonic::*;
    let n = format!("{m:?}");
    Some(match m {
        Add | Or | Adc | Sbb | And | Sub | Xor | Cmp | Inc | Dec | Neg | Not | Test => Class::Alu,
        Rol | Ror | Rcl | Rcr | Shl | Shr | Sar | Shld | Shrd => Class::Shift,
        Mul | Imul | Div | Idiv => Class::MulDiv,
        Daa | Das | Aaa | Aas | Aam | Aad => Class::Bcd,
        Bt | Bts | Btr | Btc | Bsf | Bsr => Class::Bit,
        Bswap | Xadd | Cmpxchg | Cmpxchg8b | Xchg => Class::Xchg,
        Movsb | Movsw | Movsd | Cmpsb | Cmpsw | Cmpsd | Stosb | Stosw | Stosd | Lodsb | Lodsw
        | Lodsd | Scasb | Scasw | Scasd => Class::String,
        Mov | Lea | Movzx | Movsx | Xlatb | Nop => Class::Mov,
        Push | Pop | Pusha | Pushad | Popa | Popad | Pushf | Pushfd | Popf | Popfd | Enter
        | Leave => Class::Stack,
        Lahf | Sahf | Clc | Stc | Cmc | Cld | Std => Class::Flags,
        Cbw | Cwde | Cwd | Cdq => Class::Convert,
        Jmp | Call | Ret | Loop | Loope | Loopne | Jecxz => Class::Branch,
        Fld | Fild | Fbld | Fst | Fstp | Fist | Fistp | Fbstp | Fld1 | Fldz | Fldpi | Fldl2e
        | Fldl2t | Fldlg2 | Fldln2 | Fxch | Fcmovb | Fcmove | Fcmovbe | Fcmovu | Fcmovnb
        | Fcmovne | Fcmovnbe | Fcmovnu => Class::X87Load,
        Fadd | Faddp | Fiadd | Fsub | Fsubp | Fsubr | Fsubrp | Fisub | Fisubr | Fmul | Fmulp
        | Fimul | Fdiv | Fdivp | Fdivr | Fdivrp | Fidiv | Fidivr | Fabs | Fchs | Fsqrt | Fprem
        | Fprem1 | Frndint | Fscale | Fxtract => Class::X87Arith,
        Fcom | Fcomp | Fcompp | Fucom | Fucomp | Fucompp | Ficom | Ficomp | Fcomi | Fcomip
        | Fucomi | Fucomip | Ftst | Fxam => Class::X87Cmp,
        Fldcw | Fnstcw | Fstcw | Fnstsw | Fstsw | Fnclex | Fclex | Fninit | Finit | Ffree
        | Fincstp | Fdecstp | Fnop | Wait => Class::X87Misc,
        Fnstenv | Fstenv | Fldenv | Fnsave | Fsave | Frstor | Fxsave | Fxrstor => Class::X87Env,
        Fsin | Fcos | Fsincos | Fptan | Fpatan | F2xm1 | Fyl2x | Fyl2xp1 => Class::X87Trans,
        _ if n.starts_with("Set") && n.len() <= 6 => Class::Cond,
        _ if n.starts_with("Cmov") => Class::Cond,
        _ if n.starts_with('J') && n.len() <= 3 => Class::Branch,
        _ => return None,
    })
}

/// Whether the generator can fill an operand kind.
fn fillable(k: K) -> bool {
    matches!(
        k,
        K::r8_or_mem
            | K::r16_or_mem
            | K::r32_or_mem
            | K::r8_reg
            | K::r8_opcode
            | K::r16_reg
            | K::r16_opcode
            | K::r32_reg
            | K::r32_opcode
            | K::mem
            | K::mem_offs
            | K::imm8
            | K::imm8_const_1
            | K::imm8sex16
            | K::imm8sex32
            | K::imm16
            | K::imm32
            | K::al
            | K::cl
            | K::ax
            | K::eax
            | K::st0
            | K::sti_opcode
            | K::seg_rSI
            | K::es_rDI
            | K::seg_rBX_al
            | K::br32_1
            | K::br32_4
    )
}

/// One instruction form in the pool.
#[derive(Debug, Clone, Copy)]
pub struct Form {
    /// The iced-x86 code.
    pub code: Code,
    /// Its class.
    pub class: Class,
}

/// The instruction pool for the given classes.
pub fn pool(classes: &[Class]) -> Vec<Form> {
    let mut v = Vec::new();
    for code in Code::values() {
        let oc = code.op_code();
        if !oc.is_instruction() || !oc.mode32() || oc.encoding() != EncodingKind::Legacy {
            continue;
        }
        let Some(class) = class_of(code.mnemonic()) else {
            continue;
        };
        if !classes.contains(&class) {
            continue;
        }
        let name = format!("{code:?}");
        // Undocumented aliases and forms outside the fuzzer's scope: 0x82 group, F6/F7 /1
        // TEST, SAL /6, the reserved x87 aliases, 16-bit near branches (they truncate
        // EIP), 64-bit and far forms, segment registers, control/debug registers,
        // 16-bit addressing (JCXZ), FISTTP (SSE3), the SSE MOVSD, BSWAP r16 (undefined).
        let bad = [
            "_82",
            "F6r1",
            "F7r1",
            "Sal_",
            "nce",
            "Reserved",
            "m1632",
            "m1616",
            "Jcxz",
            "rel16",
            "rel8_16",
            "Retnw",
            "Bswap_r16",
            "Callw",
            "Jmpw",
            "Call_rm16",
            "Jmp_rm16",
            "Sreg",
            "_cr",
            "_dr",
            "_tr",
            "xmm",
            "_mm",
            "486",
            "_DC",
            "_DD",
            "_DE",
            "_DF",
            "_ES",
            "_CS",
            "_SS",
            "_DS",
            "_FS",
            "_GS",
        ];
        if bad.iter().any(|b| name.contains(b)) {
            continue;
        }
        if !oc.op_kinds().iter().all(|k| fillable(*k)) {
            continue;
        }
        if code == Code::Nopw || code == Code::Nopd {
            continue;
        }
        v.push(Form { code, class });
    }
    v
}

/// Whether `code` is a form the generator produces (any class), or XLAT (emitted as a
/// raw byte). The runner stops a sequence that reaches anything else, which only
/// self-modified code can do (it would run instructions the fuzzer excludes: CPUID,
/// RDTSC, INT, I/O...).
pub fn is_known_form(code: Code) -> bool {
    static ALL: std::sync::OnceLock<std::collections::HashSet<Code>> = std::sync::OnceLock::new();
    ALL.get_or_init(|| {
        let all: Vec<Class> = CLASS_NAMES.iter().map(|c| c.1).collect();
        pool(&all).iter().map(|f| f.code).collect()
    })
    .contains(&code)
        || code == Code::Xlat_m8
}

/// A generated test case.
#[derive(Debug, Clone)]
pub struct Case {
    /// Machine code, placed at `CODE_BASE`.
    pub code: Vec<u8>,
    /// The starting state.
    pub init: State,
    /// Addresses where generated instructions start (self-modified code may be entered
    /// elsewhere; see `run_case`).
    pub starts: Vec<u32>,
}

#[derive(Clone, Copy)]
enum Op {
    R(Register),
    M(MemoryOperand),
    I(i64),
}

#[derive(Clone, Copy)]
enum Target {
    /// Near branch to the start of group n.
    Branch(usize),
    /// 32-bit immediate = address of group n (PUSH imm32 / MOV r32, imm32 / MOV m32, imm32).
    Imm(usize),
}

struct Item {
    ins: Instruction,
    target: Option<Target>,
}

const GPR32: [Register; 8] = [
    Register::EAX,
    Register::ECX,
    Register::EDX,
    Register::EBX,
    Register::ESP,
    Register::EBP,
    Register::ESI,
    Register::EDI,
];
const GPR16: [Register; 8] = [
    Register::AX,
    Register::CX,
    Register::DX,
    Register::BX,
    Register::SP,
    Register::BP,
    Register::SI,
    Register::DI,
];
const GPR8: [Register; 8] = [
    Register::AL,
    Register::CL,
    Register::DL,
    Register::BL,
    Register::AH,
    Register::CH,
    Register::DH,
    Register::BH,
];

fn gpr_index(r: Register) -> Option<usize> {
    let f = r.full_register32();
    GPR32.iter().position(|x| *x == f)
}

/// A value biased towards the boundaries of an operand `width` (8, 16, 32 bits).
pub fn biased(rng: &mut Rng, width: u32) -> u32 {
    let mask = if width == 32 {
        u32::MAX
    } else {
        (1u32 << width) - 1
    };
    let sign = 1u32 << (width - 1);
    let v = match rng.below(12) {
        0 => 0,
        1 => 1,
        2 => mask,
        3 => sign,
        4 => sign - 1,
        5 => rng.below(33) as u32,
        6 => sign + 1,
        7 => mask - rng.below(4) as u32,
        _ => rng.next_u64() as u32,
    } & mask;
    if width < 32 && rng.chance(1, 2) {
        v | (rng.next_u64() as u32 & !mask)
    } else {
        v
    }
}

fn biased_any(rng: &mut Rng) -> u32 {
    let w = *rng.pick(&[8, 16, 32, 32]);
    biased(rng, w)
}

/// An 80-bit value biased towards special and boundary cases: 8 bytes of significand,
/// then sign and exponent.
pub fn f80_value(rng: &mut Rng) -> [u8; 10] {
    let sign: u16 = if rng.chance(1, 2) { 0x8000 } else { 0 };
    let j = 1u64 << 63;
    let (mant, exp): (u64, u16) = match rng.below(20) {
        0 => (0, 0),
        1 => (j, 0x7fff),                                       // infinity
        2 => (j | 1 << 62 | (rng.next_u64() & 0xffff), 0x7fff), // QNaN
        3 => (j | 1 | (rng.next_u64() & 0xffff_ffff), 0x7fff),  // SNaN
        4 => (j | 1 << 62, 0x7fff),                             // indefinite (with sign)
        5 => (rng.next_u64() >> 1 | 1, 0),                      // denormal
        6 => (j, 0x3fff),                                       // 1.0
        7 => (j | rng.next_u64() >> 1, 0x7ffe),                 // huge
        8 => (j | rng.next_u64() >> 1, 1),                      // tiny normal
        9 => (0xc90f_daa2_2168_c235, 0x4000),                   // pi
        10 => {
            // A small integer.
            let n = rng.below(100_000) + 1;
            let lz = n.leading_zeros();
            (n << lz, 0x3fff + 63 - lz as u16)
        }
        11 if rng.chance(1, 4) => (rng.next_u64() >> 1, 0x3fff), // unnormal
        11 => (j | rng.next_u64(), 0),                           // pseudo-denormal
        12 => (
            j | rng.next_u64() >> 1,
            0x3fff + rng.below(200) as u16 - 100,
        ),
        13 => (j | rng.next_u64() >> 1, 0x3fff + rng.below(130) as u16), // large (> 2^63 for some)
        _ => (j | rng.next_u64() >> 1, 0x3fff + rng.below(40) as u16 - 20),
    };
    let mut b = [0u8; 10];
    b[..8].copy_from_slice(&mant.to_le_bytes());
    b[8..].copy_from_slice(&(sign | exp).to_le_bytes());
    b
}

/// A random IEEE binary value (`fbits` fraction and `ebits` exponent bits): zeros,
/// infinities, quiet NaNs (payload within `payload`), signalling NaNs, denormals, one,
/// the largest exponent, the smallest normal exponent, or a value within 2^±`spread`.
fn ieee_value(rng: &mut Rng, fbits: u32, ebits: u32, payload: u64, spread: u64) -> u64 {
    let sign = rng.below(2) << (fbits + ebits);
    let m = rng.next_u64() & ((1 << fbits) - 1);
    let emax = (1u64 << ebits) - 1;
    let bias = emax >> 1;
    let inf = emax << fbits;
    let quiet = 1u64 << (fbits - 1);
    sign | match rng.below(12) {
        0 => 0,
        1 => inf,
        2 => inf | quiet | (m & payload),
        3 => inf | 1 | (m & (quiet - 1)),
        4 => m | 1,
        5 => bias << fbits,
        6 => ((emax - 1) << fbits) | m,
        7 => (1 << fbits) | m,
        _ => ((bias + rng.below(2 * spread) - spread) << fbits) | m,
    }
}

fn f64_value(rng: &mut Rng) -> u64 {
    ieee_value(rng, 52, 11, 0xffff, 40)
}

fn f32_value(rng: &mut Rng) -> u32 {
    ieee_value(rng, 23, 8, 0xff, 30) as u32
}

/// A random starting state.
pub fn initial_state(rng: &mut Rng) -> State {
    let mut st = State::default();
    for (i, r) in st.gpr.iter_mut().enumerate() {
        *r = if i == 4 { STACK_INIT } else { biased_any(rng) };
    }
    if rng.chance(1, 3) {
        st.gpr[5] = STACK_INIT + 0x100;
    }
    st.eip = CODE_BASE;
    // CF PF AF ZF SF OF random, DF sometimes, AC rarely; IF and bit 1 as in user mode.
    let mut fl = 0x202 | (rng.next_u64() as u32 & 0x8d5);
    if rng.chance(1, 5) {
        fl |= 0x400;
    }
    if rng.chance(1, 20) {
        fl |= 0x4_0000;
    }
    st.eflags = fl;
    st.fx = initial_fx(rng);
    fill_memory(rng, &mut st.mem);
    st
}

/// A random x87/SSE state: mostly masked exceptions with random precision and rounding.
pub fn initial_fx(rng: &mut Rng) -> Fx {
    let mut fx = Fx {
        fcw: random_cw(rng),
        mxcsr: 0x1f80,
        ..Default::default()
    };
    let top = rng.below(8) as u16;
    let mut sw = (top << 11) | (rng.next_u64() as u16 & 0x4700);
    if rng.chance(1, 10) {
        sw |= rng.next_u64() as u16 & 0x3f & fx.fcw;
    }
    fx.fsw = sw;
    for i in 0..8 {
        fx.st[i] = f80_value(rng);
        if rng.chance(3, 5) {
            fx.ftw |= 1 << ((top as usize + i) & 7);
        }
    }
    for x in fx.xmm.iter_mut() {
        for b in x.iter_mut() {
            *b = rng.next_u64() as u8;
        }
    }
    fx
}

/// A random control word: exceptions mostly all masked, precision and rounding random.
pub fn random_cw(rng: &mut Rng) -> u16 {
    let masks = if rng.chance(4, 5) {
        0x3f
    } else {
        rng.next_u64() as u16 & 0x3f
    };
    0x0040 | masks | ((rng.below(4) as u16) << 8) | ((rng.below(4) as u16) << 10)
}

fn fill_memory(rng: &mut Rng, mem: &mut [u8]) {
    for chunk in mem.chunks_mut(16) {
        match rng.below(8) {
            0 | 1 => {
                for b in chunk.iter_mut() {
                    *b = rng.next_u64() as u8;
                }
            }
            2 => {
                for c in chunk.chunks_mut(4) {
                    let v = biased_any(rng).to_le_bytes();
                    c.copy_from_slice(&v[..c.len()]);
                }
            }
            3 => {
                for c in chunk.chunks_mut(8) {
                    let v = f64_value(rng).to_le_bytes();
                    c.copy_from_slice(&v[..c.len()]);
                }
            }
            4 => {
                for c in chunk.chunks_mut(4) {
                    let v = f32_value(rng).to_le_bytes();
                    c.copy_from_slice(&v[..c.len()]);
                }
            }
            5 => {
                let v = f80_value(rng);
                chunk[..10].copy_from_slice(&v);
                for b in chunk[10..].iter_mut() {
                    *b = rng.next_u64() as u8;
                }
            }
            6 => {
                // Packed BCD (valid digits), sign byte 0x00 or 0x80.
                for b in chunk[..9].iter_mut() {
                    *b = (rng.below(10) as u8) << 4 | rng.below(10) as u8;
                }
                chunk[9] = if rng.chance(1, 2) { 0x80 } else { 0 };
                for b in chunk[10..].iter_mut() {
                    *b = rng.next_u64() as u8;
                }
            }
            _ => {
                for c in chunk.chunks_mut(2) {
                    let v = (biased(rng, 16) as u16).to_le_bytes();
                    c.copy_from_slice(&v[..c.len()]);
                }
            }
        }
    }
}

/// Sequence generator.
pub struct Generator {
    pool: Vec<Form>,
    info: InstructionInfoFactory,
}

struct Gen<'a> {
    rng: &'a mut Rng,
    items: Vec<Item>,
    /// Index of the first item of each group.
    group_start: Vec<usize>,
    /// Registers whose value the generator knows (set by its own MOV).
    known: [Option<u32>; 8],
    /// Groups some branch targets.
    targets: Vec<usize>,
    info: &'a mut InstructionInfoFactory,
}

impl Gen<'_> {
    /// Emits `i` (no branch target) if iced could build it.
    fn emit_built(&mut self, i: Result<Instruction, iced_x86::IcedError>) {
        if let Ok(i) = i {
            self.emit(i, None);
        }
    }

    fn emit(&mut self, ins: Instruction, target: Option<Target>) {
        let info = self.info.info(&ins);
        for u in info.used_registers() {
            if matches!(
                u.access(),
                OpAccess::Write
                    | OpAccess::CondWrite
                    | OpAccess::ReadWrite
                    | OpAccess::ReadCondWrite
            ) {
                if let Some(i) = gpr_index(u.register()) {
                    self.known[i] = None;
                }
            }
        }
        if ins.code() == Code::Mov_r32_imm32 && target.is_none() {
            if let Some(i) = gpr_index(ins.op0_register()) {
                self.known[i] = Some(ins.immediate32());
            }
        }
        self.items.push(Item { ins, target });
    }

    fn mov_imm(&mut self, r: Register, v: u32) {
        self.emit_built(Instruction::with2(Code::Mov_r32_imm32, r, v));
    }

    /// Makes `r` hold `v` (a MOV unless it already does).
    fn set_reg(&mut self, r: Register, v: u32) {
        if gpr_index(r).and_then(|i| self.known[i]) != Some(v) {
            self.mov_imm(r, v);
        }
    }

    /// A data address for an access of `size` bytes, mostly aligned and inside the data
    /// area, sometimes at its edges.
    fn data_addr(&mut self, size: u32) -> u32 {
        let size = size.max(1);
        match self.rng.below(50) {
            0 => DATA_BASE + DATA_SIZE - 1 - self.rng.below(size as u64) as u32,
            1 => DATA_BASE - 1 - self.rng.below(size as u64) as u32,
            // The writable code page: self-modifying code when the sequence runs there.
            2 => CODE_RW + self.rng.below(0x100) as u32,
            _ => {
                let room = (DATA_SIZE - 0x1000).saturating_sub(size).max(16);
                let mut a = self.rng.below(room as u64) as u32;
                if self.rng.chance(3, 4) {
                    a &= !(size.next_power_of_two().min(16) - 1);
                }
                DATA_BASE + a
            }
        }
    }

    /// A memory operand addressing `addr`, with the set-up its registers need.
    fn mem_at(&mut self, addr: u32, avoid: &[Register]) -> MemoryOperand {
        let choice = self.rng.below(10);
        if choice == 0 {
            return MemoryOperand::new(
                Register::None,
                Register::None,
                1,
                addr as i64,
                4,
                false,
                Register::None,
            );
        }
        let cands: Vec<Register> = [0usize, 1, 2, 3, 5, 6, 7]
            .iter()
            .map(|&i| GPR32[i])
            .filter(|r| !avoid.contains(r))
            .collect();
        // Prefer a register that already points near the address.
        let near: Vec<Register> = cands
            .iter()
            .copied()
            .filter(|r| {
                gpr_index(*r)
                    .and_then(|i| self.known[i])
                    .is_some_and(|v| (v as i64 - addr as i64).abs() < 0x1000)
            })
            .collect();
        let base = if !near.is_empty() && self.rng.chance(2, 3) {
            *self.rng.pick(&near)
        } else {
            *self.rng.pick(&cands)
        };
        let mut index = Register::None;
        let mut scale = 1;
        let mut ival = 0u32;
        if choice >= 7 {
            let ic: Vec<Register> = cands.iter().copied().filter(|r| *r != base).collect();
            if !ic.is_empty() {
                index = *self.rng.pick(&ic);
                scale = *self.rng.pick(&[1u32, 2, 4, 8]);
                ival = match gpr_index(index).and_then(|i| self.known[i]) {
                    Some(v) if v < 64 => v,
                    _ => self.rng.below(16) as u32,
                };
                self.set_reg(index, ival);
            }
        }
        let want = addr.wrapping_sub(ival.wrapping_mul(scale));
        let bval = match gpr_index(base).and_then(|i| self.known[i]) {
            Some(v) if (v as i64 - want as i64).abs() < 0x1000 => v,
            _ => {
                let v = want.wrapping_sub(match self.rng.below(3) {
                    0 => 0,
                    1 => (self.rng.below(256) as u32).wrapping_sub(128),
                    _ => self.rng.below(0x200) as u32,
                });
                self.set_reg(base, v);
                v
            }
        };
        let disp = want.wrapping_sub(bval) as i32 as i64;
        MemoryOperand::new(
            base,
            index,
            scale,
            disp,
            if disp == 0 && self.rng.chance(1, 2) {
                0
            } else {
                1
            },
            false,
            Register::None,
        )
    }

    fn reg(&mut self, k: K) -> Register {
        match k {
            K::r8_reg | K::r8_opcode | K::r8_or_mem => *self.rng.pick(&GPR8),
            K::r16_reg | K::r16_opcode | K::r16_or_mem => {
                GPR16[*self.rng.pick(&[0usize, 1, 2, 3, 5, 6, 7])]
            }
            _ => GPR32[*self.rng.pick(&[0usize, 1, 2, 3, 5, 6, 7])],
        }
    }

    fn imm(&mut self, k: K, m: Mnemonic) -> i64 {
        let shift = is_shift(m);
        match k {
            K::imm8_const_1 => 1,
            K::imm8 if shift => self.shift_count() as i64,
            K::imm8 if m == Mnemonic::Aam || m == Mnemonic::Aad => {
                if self.rng.chance(1, 30) {
                    0
                } else if self.rng.chance(1, 2) {
                    10
                } else {
                    self.rng.below(256) as i64
                }
            }
            K::imm8
                if matches!(
                    m,
                    Mnemonic::Bt | Mnemonic::Bts | Mnemonic::Btr | Mnemonic::Btc
                ) =>
            {
                self.rng.below(256) as i64
            }
            K::imm8 => biased(self.rng, 8) as u8 as i64,
            K::imm8sex16 | K::imm8sex32 => biased(self.rng, 8) as u8 as i8 as i64,
            K::imm16 => biased(self.rng, 16) as u16 as i64,
            _ => biased(self.rng, 32) as i64,
        }
    }

    fn shift_count(&mut self) -> u32 {
        match self.rng.below(8) {
            0 => 0,
            1 | 2 => 1,
            3 => *self.rng.pick(&[7, 8, 9, 15, 16, 17, 31, 32, 33]),
            4 => self.rng.below(256) as u32,
            _ => self.rng.below(32) as u32,
        }
    }

    fn build(code: Code, ops: &[Op]) -> Option<Instruction> {
        use Op::*;
        let r = match *ops {
            [] => Ok(Instruction::with(code)),
            [R(a)] => Instruction::with1(code, a),
            [M(a)] => Instruction::with1(code, a),
            [I(a)] => Instruction::with1(code, a as i32),
            [R(a), R(b)] => Instruction::with2(code, a, b),
            [R(a), M(b)] => Instruction::with2(code, a, b),
            [M(a), R(b)] => Instruction::with2(code, a, b),
            [R(a), I(b)] => Instruction::with2(code, a, b as i32),
            [M(a), I(b)] => Instruction::with2(code, a, b as i32),
            [I(a), I(b)] => Instruction::with2(code, a as i32, b as i32),
            [R(a), R(b), I(c)] => Instruction::with3(code, a, b, c as i32),
            [R(a), M(b), I(c)] => Instruction::with3(code, a, b, c as i32),
            [M(a), R(b), I(c)] => Instruction::with3(code, a, b, c as i32),
            [R(a), R(b), R(c)] => Instruction::with3(code, a, b, c),
            [M(a), R(b), R(c)] => Instruction::with3(code, a, b, c),
            _ => return None,
        };
        r.ok()
    }

    fn mem_size(code: Code) -> u32 {
        let s = code.op_code().memory_size().size() as u32;
        if s == 0 {
            4
        } else {
            s
        }
    }

    /// Emits one group: set-up instructions and the instruction of form `f`.
    fn group(&mut self, f: Form, n_groups: usize) {
        let g = self.group_start.len();
        self.group_start.push(self.items.len());
        if self.targets.contains(&g) {
            self.known = [None; 8];
        }
        let code = f.code;
        let m = code.mnemonic();
        let oc = code.op_code();
        let kinds: Vec<K> = oc.op_kinds().to_vec();
        let fwd = |s: &mut Self| {
            let t = g + 1 + s.rng.below(3) as usize;
            if !s.targets.contains(&t) {
                s.targets.push(t);
            }
            t.min(n_groups)
        };
        // Special forms first.
        match m {
            Mnemonic::Movsb
            | Mnemonic::Movsw
            | Mnemonic::Movsd
            | Mnemonic::Cmpsb
            | Mnemonic::Cmpsw
            | Mnemonic::Cmpsd
            | Mnemonic::Stosb
            | Mnemonic::Stosw
            | Mnemonic::Stosd
            | Mnemonic::Lodsb
            | Mnemonic::Lodsw
            | Mnemonic::Lodsd
            | Mnemonic::Scasb
            | Mnemonic::Scasw
            | Mnemonic::Scasd => {
                let cmp = matches!(
                    m,
                    Mnemonic::Cmpsb
                        | Mnemonic::Cmpsw
                        | Mnemonic::Cmpsd
                        | Mnemonic::Scasb
                        | Mnemonic::Scasw
                        | Mnemonic::Scasd
                );
                let rep = match self.rng.below(3) {
                    0 => RepPrefixKind::None,
                    1 => RepPrefixKind::Repe,
                    _ if cmp => RepPrefixKind::Repne,
                    _ => RepPrefixKind::Repe,
                };
                if rep != RepPrefixKind::None && self.rng.chance(9, 10) {
                    let n = if self.rng.chance(1, 4) {
                        self.rng.below(4)
                    } else {
                        self.rng.below(48)
                    };
                    self.mov_imm(Register::ECX, n as u32);
                }
                if self.rng.chance(1, 6) {
                    let c = if self.rng.chance(1, 2) {
                        Code::Std
                    } else {
                        Code::Cld
                    };
                    self.emit(Instruction::with(c), None);
                }
                for r in [Register::ESI, Register::EDI] {
                    let known = gpr_index(r).and_then(|i| self.known[i]).is_some();
                    if !known || self.rng.chance(1, 3) {
                        let a =
                            DATA_BASE + 0x200 + self.rng.below((DATA_SIZE - 0x1400) as u64) as u32;
                        self.mov_imm(r, a);
                    }
                }
                let ins = match code {
                    Code::Movsb_m8_m8 => Instruction::with_movsb(32, Register::None, rep),
                    Code::Movsw_m16_m16 => Instruction::with_movsw(32, Register::None, rep),
                    Code::Movsd_m32_m32 => Instruction::with_movsd(32, Register::None, rep),
                    Code::Cmpsb_m8_m8 => Instruction::with_cmpsb(32, Register::None, rep),
                    Code::Cmpsw_m16_m16 => Instruction::with_cmpsw(32, Register::None, rep),
                    Code::Cmpsd_m32_m32 => Instruction::with_cmpsd(32, Register::None, rep),
                    Code::Stosb_m8_AL => Instruction::with_stosb(32, rep),
                    Code::Stosw_m16_AX => Instruction::with_stosw(32, rep),
                    Code::Stosd_m32_EAX => Instruction::with_stosd(32, rep),
                    Code::Lodsb_AL_m8 => Instruction::with_lodsb(32, Register::None, rep),
                    Code::Lodsw_AX_m16 => Instruction::with_lodsw(32, Register::None, rep),
                    Code::Lodsd_EAX_m32 => Instruction::with_lodsd(32, Register::None, rep),
                    Code::Scasb_AL_m8 => Instruction::with_scasb(32, rep),
                    Code::Scasw_AX_m16 => Instruction::with_scasw(32, rep),
                    Code::Scasd_EAX_m32 => Instruction::with_scasd(32, rep),
                    _ => return,
                };
                if let Ok(i) = ins {
                    self.emit(i, None);
                }
                return;
            }
            Mnemonic::Xlatb => {
                let a = self.data_addr(256);
                self.set_reg(Register::EBX, a);
                self.emit(Instruction::with_declare_byte_1(0xd7), None);
                return;
            }
            Mnemonic::Ret => {
                let t = fwd(self);
                if let Ok(i) = Instruction::with1(Code::Pushd_imm32, 0i32) {
                    self.emit(i, Some(Target::Imm(t)));
                }
                let ins = if kinds.is_empty() {
                    Instruction::with(code)
                } else {
                    match Instruction::with1(code, self.rng.below(64) as i32 * 2) {
                        Ok(i) => i,
                        Err(_) => return,
                    }
                };
                self.emit(ins, None);
                return;
            }
            Mnemonic::Popf | Mnemonic::Popfd => {
                // A flags image without TF (a TF trap would end single-stepping).
                let v = (rng_u32(self.rng) & !0x100 & 0x003f_7fd5) | 0x2;
                let push = if m == Mnemonic::Popf {
                    Code::Push_imm16
                } else {
                    Code::Pushd_imm32
                };
                let v = if m == Mnemonic::Popf {
                    (v & 0xffff) as i32
                } else {
                    v as i32
                };
                self.emit_built(Instruction::with1(push, v));
                self.emit(Instruction::with(code), None);
                return;
            }
            Mnemonic::Leave => {
                let v = STACK_INIT - 0x200 + self.rng.below(0x400) as u32 * 2;
                self.set_reg(Register::EBP, v);
                self.emit(Instruction::with(code), None);
                return;
            }
            Mnemonic::Enter => {
                let size = if self.rng.chance(1, 10) {
                    self.rng.below(0x800)
                } else {
                    self.rng.below(64)
                };
                let level = match self.rng.below(10) {
                    0..=4 => 0,
                    5..=7 => 1,
                    8 => self.rng.below(4),
                    _ => self.rng.below(32),
                };
                if level > 1 {
                    let v = STACK_INIT - 0x100 + self.rng.below(0x200) as u32 * 4;
                    self.set_reg(Register::EBP, v);
                }
                self.emit_built(Instruction::with2(code, size as i32, level as i32));
                return;
            }
            Mnemonic::Div | Mnemonic::Idiv => {
                self.divide(code, &kinds);
                return;
            }
            Mnemonic::Fldenv | Mnemonic::Frstor | Mnemonic::Fxrstor => {
                let size = Self::mem_size(code).max(if m == Mnemonic::Fxrstor { 512 } else { 108 });
                let mut a = self.data_addr(size);
                if m == Mnemonic::Fxrstor && self.rng.chance(9, 10) {
                    a &= !15;
                }
                let mo = self.mem_at(a, &[]);
                if self.rng.chance(4, 5) {
                    let save = match code {
                        Code::Fldenv_m14byte => Code::Fnstenv_m14byte,
                        Code::Fldenv_m28byte => Code::Fnstenv_m28byte,
                        Code::Frstor_m94byte => Code::Fnsave_m94byte,
                        Code::Frstor_m108byte => Code::Fnsave_m108byte,
                        _ => Code::Fxsave_m512byte,
                    };
                    self.emit_built(Instruction::with1(save, mo));
                    if self.rng.chance(1, 3) {
                        let cw = random_cw(self.rng) as i32;
                        self.emit_built(Instruction::with2(Code::Mov_rm16_imm16, mo, cw));
                    }
                }
                self.emit_built(Instruction::with1(code, mo));
                return;
            }
            Mnemonic::Fldcw if self.rng.chance(2, 3) => {
                let a = self.data_addr(2);
                let mo = self.mem_at(a, &[]);
                let cw = random_cw(self.rng) as i32;
                self.emit_built(Instruction::with2(Code::Mov_rm16_imm16, mo, cw));
                self.emit_built(Instruction::with1(code, mo));
                return;
            }
            _ => {}
        }
        // Branches.
        if kinds.iter().any(|k| matches!(k, K::br32_1 | K::br32_4)) {
            if matches!(
                m,
                Mnemonic::Loop | Mnemonic::Loope | Mnemonic::Loopne | Mnemonic::Jecxz
            ) && self.rng.chance(1, 2)
            {
                let n = self.rng.below(3) as u32;
                self.mov_imm(Register::ECX, n);
            }
            let t = fwd(self);
            if let Ok(i) = Instruction::with_branch(code, CODE_BASE as u64) {
                self.emit(i, Some(Target::Branch(t)));
            }
            return;
        }
        if matches!(m, Mnemonic::Jmp | Mnemonic::Call) {
            // Indirect near: through a register or a memory slot holding a later group.
            let t = fwd(self);
            if kinds[0] == K::r32_or_mem {
                if self.rng.chance(1, 2) {
                    let r = self.reg(K::r32_reg);
                    if let Ok(i) = Instruction::with2(Code::Mov_r32_imm32, r, 0u32) {
                        self.emit(i, Some(Target::Imm(t)));
                    }
                    self.emit_built(Instruction::with1(code, r));
                } else {
                    let a = self.data_addr(4);
                    let mo = self.mem_at(a, &[]);
                    if let Ok(i) = Instruction::with2(Code::Mov_rm32_imm32, mo, 0u32) {
                        self.emit(i, Some(Target::Imm(t)));
                    }
                    self.emit_built(Instruction::with1(code, mo));
                }
            }
            return;
        }
        // Generic operands.
        let msize = Self::mem_size(code);
        let mut ops: Vec<Op> = Vec::new();
        let mut regs_used: Vec<Register> = Vec::new();
        let mut mem_op: Option<MemoryOperand> = None;
        // Decide register operands first so the memory base can avoid them when useful.
        let mut use_mem = vec![false; kinds.len()];
        for (n, k) in kinds.iter().enumerate() {
            use_mem[n] = match k {
                K::mem | K::mem_offs => true,
                K::r8_or_mem | K::r16_or_mem | K::r32_or_mem => self.rng.chance(1, 2),
                _ => false,
            };
        }
        for (n, k) in kinds.iter().enumerate() {
            let op = match k {
                _ if use_mem[n] => {
                    let mut a = self.data_addr(msize);
                    if m == Mnemonic::Fxsave && self.rng.chance(9, 10) {
                        a &= !15;
                    }
                    let mo = if *k == K::mem_offs {
                        MemoryOperand::new(
                            Register::None,
                            Register::None,
                            1,
                            a as i64,
                            4,
                            false,
                            Register::None,
                        )
                    } else {
                        self.mem_at(a, &regs_used)
                    };
                    mem_op = Some(mo);
                    Op::M(mo)
                }
                K::r8_or_mem
                | K::r16_or_mem
                | K::r32_or_mem
                | K::r8_reg
                | K::r8_opcode
                | K::r16_reg
                | K::r16_opcode
                | K::r32_reg
                | K::r32_opcode => {
                    let r = self.reg(*k);
                    regs_used.push(r.full_register32());
                    Op::R(r)
                }
                K::al => Op::R(Register::AL),
                K::cl => Op::R(Register::CL),
                K::ax => Op::R(Register::AX),
                K::eax => Op::R(Register::EAX),
                K::st0 => Op::R(Register::ST0),
                K::sti_opcode => Op::R(*self.rng.pick(&[
                    Register::ST0,
                    Register::ST1,
                    Register::ST1,
                    Register::ST2,
                    Register::ST3,
                    Register::ST4,
                    Register::ST5,
                    Register::ST6,
                    Register::ST7,
                ])),
                _ => Op::I(self.imm(*k, m)),
            };
            ops.push(op);
        }
        // Class-specific set-up.
        let shift = is_shift(m);
        if shift && kinds.contains(&K::cl) && self.rng.chance(3, 4) {
            let c = self.shift_count();
            if !regs_used.contains(&Register::ECX) {
                self.mov_imm(Register::ECX, c);
            }
        }
        if matches!(m, Mnemonic::Bsf | Mnemonic::Bsr) && self.rng.chance(1, 6) {
            match ops.get(1) {
                Some(Op::R(r)) => {
                    let r32 = r.full_register32();
                    self.emit_built(Instruction::with2(Code::Mov_r32_imm32, r32, 0u32));
                }
                Some(Op::M(mo)) => {
                    self.emit_built(Instruction::with2(Code::Mov_rm32_imm32, *mo, 0u32));
                }
                _ => {}
            }
        }
        if matches!(m, Mnemonic::Cmpxchg | Mnemonic::Cmpxchg8b) && self.rng.chance(1, 2) {
            // Make the comparison succeed.
            match (ops.first(), m) {
                (Some(Op::R(r)), Mnemonic::Cmpxchg) if r.full_register32() != Register::EAX => {
                    let r32 = r.full_register32();
                    self.emit_built(Instruction::with2(Code::Mov_r32_rm32, Register::EAX, r32));
                }
                (Some(Op::M(mo)), Mnemonic::Cmpxchg) => {
                    self.emit_built(Instruction::with2(Code::Mov_r32_rm32, Register::EAX, *mo));
                }
                (Some(Op::M(mo)), _) => {
                    let mut hi = *mo;
                    hi.displacement += 4;
                    hi.displ_size = 1;
                    if mo.base != Register::EAX
                        && mo.index != Register::EAX
                        && mo.base != Register::EDX
                        && mo.index != Register::EDX
                    {
                        if let (Ok(a), Ok(b)) = (
                            Instruction::with2(Code::Mov_r32_rm32, Register::EAX, *mo),
                            Instruction::with2(Code::Mov_r32_rm32, Register::EDX, hi),
                        ) {
                            self.emit(a, None);
                            self.emit(b, None);
                        }
                    }
                }
                _ => {}
            }
        }
        // Occasionally a segment override (FS and GS hold null selectors: #GP; a write
        // through CS: #GP).
        if mem_op.is_some() && self.rng.chance(1, 16) {
            let seg = *self.rng.pick(&[
                Register::ES,
                Register::CS,
                Register::SS,
                Register::DS,
                Register::FS,
                Register::GS,
            ]);
            for op in ops.iter_mut() {
                if let Op::M(mo) = op {
                    mo.segment_prefix = seg;
                }
            }
        }
        if let Some(mut i) = Self::build(code, &ops) {
            // LOCK: mostly on the read-modify-write forms that allow it, rarely anywhere
            // (#UD).
            let lockable = matches!(
                m,
                Mnemonic::Add
                    | Mnemonic::Adc
                    | Mnemonic::And
                    | Mnemonic::Btc
                    | Mnemonic::Btr
                    | Mnemonic::Bts
                    | Mnemonic::Cmpxchg
                    | Mnemonic::Cmpxchg8b
                    | Mnemonic::Dec
                    | Mnemonic::Inc
                    | Mnemonic::Neg
                    | Mnemonic::Not
                    | Mnemonic::Or
                    | Mnemonic::Sbb
                    | Mnemonic::Sub
                    | Mnemonic::Xor
                    | Mnemonic::Xadd
                    | Mnemonic::Xchg
            ) && matches!(ops.first(), Some(Op::M(_)));
            if (lockable && self.rng.chance(1, 8)) || self.rng.chance(1, 300) {
                i.set_has_lock_prefix(true);
            }
            self.emit(i, None);
        }
    }

    /// DIV/IDIV with a dividend and divisor that mostly do not fault.
    fn divide(&mut self, code: Code, kinds: &[K]) {
        let signed = code.mnemonic() == Mnemonic::Idiv;
        let w: u32 = match kinds[0] {
            K::r8_or_mem => 8,
            K::r16_or_mem => 16,
            _ => 32,
        };
        let mask: u64 = (1u64 << w) - 1;
        let (dividend, divisor): (u64, u64) = if self.rng.chance(1, 8) {
            (
                self.rng.next_u64() & ((1u128 << (2 * w)) - 1) as u64,
                biased(self.rng, w) as u64 & mask,
            )
        } else if !signed {
            let d = (biased(self.rng, w) as u64 & mask).max(1);
            let q = biased(self.rng, w) as u64 & mask;
            let r = self.rng.below(d);
            (q * d + r, d)
        } else {
            let sx = |v: u64| ((v << (64 - w)) as i64) >> (64 - w);
            let mut d = sx(biased(self.rng, w) as u64 & mask);
            if d == 0 {
                d = 1;
            }
            let q = sx(biased(self.rng, w) as u64 & mask);
            let mut r = self.rng.below(d.unsigned_abs()) as i64;
            let prod = q as i128 * d as i128;
            if prod < 0 {
                r = -r;
            }
            let n = prod + r as i128;
            (
                (n as u64) & ((1u128 << (2 * w)) - 1) as u64,
                d as u64 & mask,
            )
        };
        let lo = dividend & mask;
        let hi = dividend >> w;
        match w {
            8 => {
                let v = (rng_u32(self.rng) & !0xffff) | dividend as u32 & 0xffff;
                self.mov_imm(Register::EAX, v);
            }
            16 => {
                let v = (rng_u32(self.rng) & !0xffff) | lo as u32;
                self.mov_imm(Register::EAX, v);
                let v = (rng_u32(self.rng) & !0xffff) | hi as u32;
                self.mov_imm(Register::EDX, v);
            }
            _ => {
                self.mov_imm(Register::EAX, lo as u32);
                self.mov_imm(Register::EDX, hi as u32);
            }
        }
        if self.rng.chance(1, 2) {
            let a = self.data_addr(w / 8);
            let mo = self.mem_at(a, &[Register::EAX, Register::EDX]);
            let st = match w {
                8 => Code::Mov_rm8_imm8,
                16 => Code::Mov_rm16_imm16,
                _ => Code::Mov_rm32_imm32,
            };
            self.emit_built(Instruction::with2(st, mo, divisor as u32));
            self.emit_built(Instruction::with1(code, mo));
        } else {
            // A register other than the dividend's.
            let r = match w {
                8 => *self.rng.pick(&[
                    Register::CL,
                    Register::DL,
                    Register::BL,
                    Register::CH,
                    Register::DH,
                    Register::BH,
                ]),
                16 => *self.rng.pick(&[
                    Register::CX,
                    Register::BX,
                    Register::SI,
                    Register::DI,
                    Register::BP,
                ]),
                _ => *self.rng.pick(&[
                    Register::ECX,
                    Register::EBX,
                    Register::ESI,
                    Register::EDI,
                    Register::EBP,
                ]),
            };
            let full = r.full_register32();
            let v = if matches!(r, Register::CH | Register::DH | Register::BH) {
                (rng_u32(self.rng) & !0xff00) | (divisor as u32) << 8
            } else if w == 32 {
                divisor as u32
            } else {
                (rng_u32(self.rng) & !(mask as u32)) | divisor as u32
            };
            self.mov_imm(full, v);
            self.emit_built(Instruction::with1(code, r));
        }
    }
}

fn rng_u32(r: &mut Rng) -> u32 {
    r.next_u64() as u32
}

impl Generator {
    /// A generator over the given classes.
    pub fn new(classes: &[Class]) -> Generator {
        Generator {
            pool: pool(classes),
            info: InstructionInfoFactory::new(),
        }
    }

    /// The instruction forms in the pool.
    pub fn forms(&self) -> &[Form] {
        &self.pool
    }

    /// One test case: a starting state and about `len` groups of code.
    pub fn case(&mut self, rng: &mut Rng, len: usize) -> Result<Case, String> {
        if self.pool.is_empty() {
            return Err("no instruction forms selected".into());
        }
        let mut init = initial_state(rng);
        // A quarter of the sequences start near the end of the first code page, so they
        // run across the page boundary into the writable page.
        let start: u32 = if rng.chance(1, 4) {
            0xfff - rng.below(160) as u32
        } else {
            0
        };
        init.eip = CODE_BASE + start;
        let mut g = Gen {
            rng,
            items: Vec::new(),
            group_start: Vec::new(),
            known: [None; 8],
            targets: Vec::new(),
            info: &mut self.info,
        };
        for _ in 0..len {
            let f = *g.rng.pick(&self.pool);
            g.group(f, len);
        }
        let items = g.items;
        let group_start = g.group_start;
        // Lay out: lengths do not depend on targets (fixed branch forms).
        let mut enc = Encoder::new(32);
        let mut addrs = Vec::with_capacity(items.len() + 1);
        let mut ip = (CODE_BASE + start) as u64;
        for it in &items {
            addrs.push(ip);
            let mut ins = it.ins;
            if let Some(Target::Branch(_)) = it.target {
                ins.set_near_branch32(ip as u32);
            }
            let n = enc
                .encode(&ins, ip)
                .map_err(|e| format!("encode {:?}: {e}", ins.code()))?;
            ip += n as u64;
        }
        let end = ip;
        addrs.push(end);
        let target_addr =
            |grp: usize| -> u64 { group_start.get(grp).map(|&i| addrs[i]).unwrap_or(end) };
        let mut code = vec![0xcc; start as usize];
        for (n, it) in items.iter().enumerate() {
            let mut ins = it.ins;
            match it.target {
                Some(Target::Branch(t)) => ins.set_near_branch32(target_addr(t) as u32),
                Some(Target::Imm(t)) => ins.set_immediate32(target_addr(t) as u32),
                None => {}
            }
            let _ = enc.take_buffer();
            let len = enc
                .encode(&ins, addrs[n])
                .map_err(|e| format!("encode {:?}: {e}", ins.code()))?;
            if addrs[n] + len as u64 != addrs[n + 1] {
                return Err(format!("{:?} changed length", ins.code()));
            }
            code.extend_from_slice(&enc.take_buffer());
        }
        if code.len() + 16 > super::CODE_SIZE as usize {
            return Err("sequence too long for the code area".into());
        }
        // The writable code page is part of the compared memory: it holds the code that
        // runs into it and INT3 after that.
        let page2 = (CODE_RW - MEM_BASE) as usize..(DATA_BASE - MEM_BASE) as usize;
        init.mem[page2].fill(0xcc);
        for (k, b) in code.iter().enumerate() {
            let a = CODE_BASE + k as u32;
            if a >= MEM_BASE {
                init.mem[(a - MEM_BASE) as usize] = *b;
            }
        }
        let starts = addrs.iter().map(|&a| a as u32).collect();
        Ok(Case { code, init, starts })
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use iced_x86::{Decoder, DecoderOptions};

    #[test]
    fn pool_covers_every_class_and_16_bit_forms() {
        let all = parse_classes("all").unwrap();
        let p = pool(&all);
        for c in &all {
            assert!(p.iter().any(|f| f.class == *c), "class {c:?} empty");
        }
        for code in [
            Code::Add_rm16_r16,
            Code::Imul_r16_rm16_imm8,
            Code::Shld_rm16_r16_CL,
            Code::Fldenv_m14byte,
            Code::Cmpxchg8b_m64,
            Code::Fsincos,
        ] {
            assert!(p.iter().any(|f| f.code == code), "{code:?} missing");
        }
        for code in [
            Code::Sal_rm8_1,
            Code::Fisttp_m32int,
            Code::Bswap_r16,
            Code::Pushw_ES,
        ] {
            assert!(!p.iter().any(|f| f.code == code), "{code:?} present");
        }
    }

    /// Every form in the pool is actually produced (no silent construction failures).
    #[test]
    fn every_form_is_generated() {
        let all = parse_classes("all").unwrap();
        let g = Generator::new(&all);
        let forms: Vec<Form> = g.forms().to_vec();
        let mut missing = Vec::new();
        for f in forms {
            let mut one = Generator {
                pool: vec![f],
                info: InstructionInfoFactory::new(),
            };
            let mut seen = false;
            for s in 0..20 {
                let mut rng = Rng::for_sequence(3, s);
                let c = one.case(&mut rng, 4).unwrap();
                let mut d = Decoder::with_ip(32, &c.code, CODE_BASE as u64, DecoderOptions::NONE);
                while d.can_decode() {
                    if d.decode().code() == f.code {
                        seen = true;
                    }
                }
                if seen {
                    break;
                }
            }
            // FWAIT forms (FSTENV, FSTSW...) decode as WAIT plus the no-wait form, in the
            // interpreter as on the host.
            if !seen && !f.code.op_code().fwait() {
                missing.push(f.code);
            }
        }
        assert!(missing.is_empty(), "never generated: {missing:?}");
    }

    #[test]
    fn sequences_decode_and_branch_forward() {
        let all = parse_classes("all").unwrap();
        let mut g = Generator::new(&all);
        for s in 0..200 {
            let mut rng = Rng::for_sequence(1, s);
            let c = g.case(&mut rng, 24).unwrap();
            let mut d = Decoder::with_ip(32, &c.code, CODE_BASE as u64, DecoderOptions::NONE);
            let end = CODE_BASE as u64 + c.code.len() as u64;
            while d.can_decode() {
                let i = d.decode();
                let off = (i.ip() - CODE_BASE as u64) as usize;
                let locked = c.code[off..off + i.len()].contains(&0xf0);
                assert!(
                    !i.is_invalid() || locked,
                    "seq {s}: invalid at {:#x}",
                    i.ip()
                );
                if i.is_jcc_short_or_near() || i.is_jmp_short_or_near() || i.is_call_near() {
                    let t = i.near_branch_target();
                    assert!(
                        t > i.ip() && t <= end,
                        "seq {s}: branch {:#x} -> {t:#x}",
                        i.ip()
                    );
                }
            }
        }
    }
}
