//! Decode stage: guest bytes → a block description (native body + how it ends).
//!
//! A block runs from a guest EIP to the first branch, the first instruction we do not
//! translate, the end of the page, or [`MAX_BLOCK_INSNS`] instructions. Register-only
//! integer instructions are translated *natively*: host and guest are both x86, so the
//! guest instruction is re-encoded for x86-64 with the guest registers renamed to the
//! host registers that hold them (see `emit.rs`), and the host computes exactly the
//! guest's result and arithmetic flags in its own EFLAGS.

use iced_x86::{
    Code, ConditionCode, Decoder, DecoderError, DecoderOptions, Encoder, FlowControl, Instruction,
    Mnemonic, OpKind, Register, RflagsBits,
};
use morph86_cpu::{CpuState, SegReg, Segment};

/// `fs_gs` bit: FS overrides are translated.
pub const SEG_FS_OK: u8 = 1 << 0;
/// `fs_gs` bit: GS overrides are translated.
pub const SEG_GS_OK: u8 = 1 << 1;

/// Most guest instructions in one block.
pub const MAX_BLOCK_INSNS: usize = 64;

/// How a block ends.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Term {
    /// Falls through to `next` (the next instruction is not translated, or the block hit
    /// its size or page limit).
    Fall {
        /// Guest EIP after the block.
        next: u32,
        /// Whether the next instruction is in the same page and may be translated
        /// (a candidate for chaining).
        chainable: bool,
    },
    /// JMP rel: continue at `target`.
    Jmp {
        /// Branch target.
        target: u32,
    },
    /// Jcc rel: `cc` (0-15, the x86 encoding) taken → `target`, else `next`.
    Jcc {
        /// Condition (x86 encoding).
        cc: u8,
        /// Branch target.
        target: u32,
        /// Fall-through EIP.
        next: u32,
    },
    /// JMP r32: continue at the guest register `reg` (0-7).
    JmpReg {
        /// Guest register number.
        reg: u8,
    },
    /// CALL rel32: push `ret`, continue at `target`.
    Call {
        /// Branch target.
        target: u32,
        /// Return address pushed.
        ret: u32,
    },
    /// CALL r32: push `ret`, continue at the guest register `reg` (read before the push).
    CallReg {
        /// Guest register number.
        reg: u8,
        /// Return address pushed.
        ret: u32,
    },
    /// JMP m32 (through memory): continue at the doubleword loaded by the block's last instruction
    /// (a [`Kind::Mem`] whose host code loads it into r11d).
    JmpMem,
    /// CALL m32: the block's last instruction ([`Kind::CallMem`]) loaded the target into
    /// r11d and pushed the return address; continue at the target.
    CallMem,
    /// RET / RET imm16: pop EIP, then release `imm` more bytes of stack.
    Ret {
        /// Extra bytes released.
        imm: u16,
    },
    /// A branch the block's last instruction ([`Kind::Interp`]) made in the
    /// interpreter (CALL through memory, LOOP, JECXZ, IRETD, far branches...): continue at the EIP
    /// it left, through the inline indirect lookup.
    InterpBranch,
}

/// How a guest instruction is carried out on the host.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum Kind {
    /// Register-only: `GuestInsn::host` runs as is.
    Reg,
    /// One memory operand: `ea` computes the linear address into r13d, the inline TLB
    /// probe turns r13 into a host pointer, then `GuestInsn::host` (the instruction
    /// re-encoded with its memory operand as `[r13]`) runs.
    Mem {
        /// Host code computing the linear address into r13d.
        ea: Vec<u8>,
        /// Access size in bytes.
        size: u32,
        /// Whether the access writes (then the write tag is probed).
        write: bool,
    },
    /// PUSH r32 (guest register number).
    Push(u8),
    /// PUSH imm32 (value pushed).
    PushImm(u32),
    /// PUSH m32: `ea` computes the source's linear address into r13d (as for
    /// [`Kind::Mem`]); the doubleword is loaded, then pushed (two probes).
    PushMem {
        /// Host code computing the source address into r13d.
        ea: Vec<u8>,
    },
    /// CALL m32: `ea` computes the pointer's linear address into r13d; the target is
    /// loaded, then `ret` pushed (two probes, as for [`Kind::PushMem`]), and the block
    /// ends with [`Term::CallMem`].
    CallMem {
        /// Host code computing the pointer's address into r13d.
        ea: Vec<u8>,
        /// Return address pushed.
        ret: u32,
    },
    /// POP r32 (guest register number).
    Pop(u8),
    /// LEAVE (32-bit): ESP = EBP + 4, EBP = the doubleword at EBP.
    Leave,
    /// DIV r32 (guest register number): run natively unless it would raise #DE
    /// (divisor 0 or quotient overflow), which the slow path leaves to the interpreter.
    Div(u8),
    /// A terminating branch (CALL's push and RET's pop are emitted with it).
    Branch,
    /// Not translated: the block calls the interpreter for this one instruction
    /// (`emit::jit_interp`, with the instruction decoded here), and leaves if it
    /// faulted, branched or changed anything the block depends on.
    Interp,
    /// An instruction cut by the page end: the block's last, run by the interpreter
    /// from its own fetch (`emit::jit_interp` without a decoded instruction); the block
    /// then ends as [`Term::InterpBranch`].
    Step,
    /// REP STOS / REP MOVS with 32-bit addressing through flat segments: run with the
    /// host's own REP STOS/MOVS one page at a time through the TLB (DF = 0 only);
    /// anything else (DF = 1, a miss, an element across a page end, a long run) goes
    /// to the interpreter through the block's held copy of the instruction, as for
    /// [`Kind::Interp`].
    Rep {
        /// MOVS (else STOS).
        movs: bool,
        /// Element size in bytes (1, 2 or 4).
        size: u32,
    },
}

/// The [`Kind::Rep`] plan of `i`, if it is a REP STOS or REP MOVS the emitter runs
/// natively: REP (not REPNE) prefix, 32-bit addressing, a MOVS source through DS, ES or
/// SS (flat in blocks that translate memory accesses).
pub fn rep_string(i: &Instruction) -> Option<Kind> {
    if !i.has_rep_prefix() || i.has_repne_prefix() || i.op0_kind() != OpKind::MemoryESEDI {
        return None;
    }
    let (movs, size) = match i.code() {
        Code::Stosb_m8_AL => (false, 1),
        Code::Stosw_m16_AX => (false, 2),
        Code::Stosd_m32_EAX => (false, 4),
        Code::Movsb_m8_m8 => (true, 1),
        Code::Movsw_m16_m16 => (true, 2),
        Code::Movsd_m32_m32 => (true, 4),
        _ => return None,
    };
    if movs
        && (i.op1_kind() != OpKind::MemorySegESI
            || !matches!(
                i.memory_segment(),
                Register::DS | Register::ES | Register::SS
            ))
    {
        return None;
    }
    Some(Kind::Rep { movs, size })
}

/// One translated guest instruction.
#[derive(Debug, Clone)]
pub struct GuestInsn {
    /// The decoded guest instruction.
    pub instr: Instruction,
    /// How it runs.
    pub kind: Kind,
    /// Host bytes (empty for a terminator and the stack forms).
    pub host: Vec<u8>,
}

/// A decoded block, ready for emission.
#[derive(Debug, Clone)]
pub struct BlockPlan {
    /// Guest EIP of the first instruction.
    pub eip: u32,
    /// The instructions (the last one may be the terminating branch).
    pub insns: Vec<GuestInsn>,
    /// How it ends.
    pub term: Term,
    /// Guest bytes covered (including a terminating branch).
    pub guest_len: u32,
    /// Mnemonic of the instruction that stopped the block, when that was an
    /// untranslated instruction.
    pub stopped_by: Option<Mnemonic>,
    /// Arithmetic flags (EFLAGS bits) that may be architecturally undefined at block
    /// exit (for lock-step comparison).
    pub undefined_at_exit: u32,
}

impl BlockPlan {
    /// Guest instructions the block retires when it runs (all of them: a block has no
    /// early exits).
    pub fn insn_count(&self) -> u32 {
        self.insns.len() as u32
    }
}

/// Converts iced `RflagsBits` to EFLAGS bits (arithmetic flags only).
pub fn rflags_to_eflags(r: u32) -> u32 {
    use morph86_cpu::state::{AF, CF, OF, PF, SF, ZF};
    let mut f = 0;
    for (bit, ef) in [
        (RflagsBits::OF, OF),
        (RflagsBits::SF, SF),
        (RflagsBits::ZF, ZF),
        (RflagsBits::AF, AF),
        (RflagsBits::CF, CF),
        (RflagsBits::PF, PF),
    ] {
        if r & bit != 0 {
            f |= ef;
        }
    }
    f
}

/// Whether a register is one a 32-bit guest may name in a native instruction
/// (8/16/32-bit general-purpose registers).
fn guest_gpr(r: Register) -> bool {
    (r.is_gpr8() && r.number() < 8 && !matches!(r, Register::SPL | Register::BPL))
        || (r.is_gpr16() && r.number() < 8)
        || (r.is_gpr32() && r.number() < 8)
}

/// Host register for a guest register: identical except ESP → R8 (the host stack
/// pointer stays the host's).
fn host_reg(r: Register) -> Register {
    match r {
        Register::ESP => Register::R8D,
        Register::SP => Register::R8W,
        other => other,
    }
}

/// Guest register number (0-7) of a 32-bit register.
pub fn gpr32_index(r: Register) -> Option<u8> {
    if r.is_gpr32() && r.number() < 8 {
        Some(r.number() as u8)
    } else {
        None
    }
}

fn native_mnemonic(m: Mnemonic) -> bool {
    use Mnemonic::*;
    matches!(
        m,
        Mov | Add
            | Or
            | Adc
            | Sbb
            | And
            | Sub
            | Xor
            | Cmp
            | Test
            | Inc
            | Dec
            | Neg
            | Not
            | Lea
            | Shl
            | Sal
            | Shr
            | Sar
            | Rol
            | Ror
            | Rcl
            | Rcr
            | Shld
            | Shrd
            | Movzx
            | Movsx
            | Xchg
            | Xadd
            | Cmpxchg
            | Bswap
            | Imul
            | Mul
            | Bt
            | Bts
            | Btr
            | Btc
            | Bsf
            | Bsr
            | Cbw
            | Cwde
            | Cwd
            | Cdq
            | Clc
            | Stc
            | Cmc
            | Sahf
            | Lahf
            | Nop
            | Seto
            | Setno
            | Setb
            | Setae
            | Sete
            | Setne
            | Setbe
            | Seta
            | Sets
            | Setns
            | Setp
            | Setnp
            | Setl
            | Setge
            | Setle
            | Setg
            | Cmovo
            | Cmovno
            | Cmovb
            | Cmovae
            | Cmove
            | Cmovne
            | Cmovbe
            | Cmova
            | Cmovs
            | Cmovns
            | Cmovp
            | Cmovnp
            | Cmovl
            | Cmovge
            | Cmovle
            | Cmovg
    )
}

/// The host bytes for a guest instruction if it is translated natively, else `None`.
///
/// `i` must come from a 32-bit decoder. The result is position independent.
pub fn native_bytes(i: &Instruction) -> Option<Vec<u8>> {
    if !native_mnemonic(i.mnemonic()) || i.has_lock_prefix() {
        return None;
    }
    // 16-bit BSWAP is undefined; keep it in the interpreter.
    if i.code() == Code::Bswap_r16 {
        return None;
    }
    let mut h = *i;
    for n in 0..i.op_count() {
        match i.op_kind(n) {
            OpKind::Register => {
                let r = i.op_register(n);
                if !guest_gpr(r) {
                    return None;
                }
                h.set_op_register(n, host_reg(r));
            }
            OpKind::Immediate8
            | OpKind::Immediate16
            | OpKind::Immediate32
            | OpKind::Immediate8to16
            | OpKind::Immediate8to32 => {}
            OpKind::Memory if i.mnemonic() == Mnemonic::Lea => {
                // Address arithmetic only; 32-bit addressing (the host encodes it with
                // an address-size prefix).
                let (b, x) = (i.memory_base(), i.memory_index());
                let ok = |r: Register| r == Register::None || gpr32_index(r).is_some();
                if !ok(b) || !ok(x) || i.memory_displ_size() > 4 {
                    return None;
                }
                if b == Register::None && x == Register::None {
                    // LEA r, [disp32]: just a constant. Emit MOV r, imm.
                    let d = i.memory_displacement32();
                    let dst = i.op0_register();
                    let mov = if dst.is_gpr32() {
                        Instruction::with2(Code::Mov_r32_imm32, host_reg(dst), d).ok()?
                    } else {
                        Instruction::with2(Code::Mov_r16_imm16, host_reg(dst), d & 0xffff).ok()?
                    };
                    return encode64(&mov);
                }
                h.set_memory_base(host_reg(b));
                h.set_memory_index(host_reg(x));
                h.set_segment_prefix(Register::None);
            }
            _ => return None,
        }
    }
    // Short INC/DEC (0x40-0x4f) are REX prefixes in 64-bit mode: use the ModRM forms.
    match i.code() {
        Code::Inc_r32 => h.set_code(Code::Inc_rm32),
        Code::Dec_r32 => h.set_code(Code::Dec_rm32),
        Code::Inc_r16 => h.set_code(Code::Inc_rm16),
        Code::Dec_r16 => h.set_code(Code::Dec_rm16),
        _ => {}
    }
    // Segment prefixes mean nothing for register operands; drop them.
    if i.mnemonic() != Mnemonic::Lea {
        h.set_segment_prefix(Register::None);
    }
    h.set_has_repe_prefix(false);
    h.set_has_repne_prefix(false);
    encode64(&h)
}

/// For an instruction with one memory operand (flat DS/ES/SS, 32-bit addressing),
/// the host code computing its linear address into r13d, and the instruction itself
/// re-encoded with `[r13]` as its memory operand. `None` if not translated.
///
/// `fs_gs`: bit 0 allows FS overrides, bit 1 GS overrides (segments with a 4 GiB limit
/// whose base is added at run time; see [`SEG_FS_OK`]).
pub fn native_mem(i: &Instruction, fs_gs: u8) -> Option<(Kind, Vec<u8>)> {
    let m = i.mnemonic();
    if !native_mnemonic(m) || m == Mnemonic::Lea {
        return None;
    }
    // LOCK is legal only on these read-modify-write forms with a memory destination
    // (else #UD, raised by the interpreter); the host keeps the prefix.
    if i.has_lock_prefix()
        && !(i.op0_kind() == OpKind::Memory
            && matches!(
                m,
                Mnemonic::Add
                    | Mnemonic::Adc
                    | Mnemonic::And
                    | Mnemonic::Btc
                    | Mnemonic::Btr
                    | Mnemonic::Bts
                    | Mnemonic::Cmpxchg
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
            ))
    {
        return None;
    }
    let mut mem_op = None;
    let mut h = *i;
    for n in 0..i.op_count() {
        match i.op_kind(n) {
            OpKind::Register => {
                let r = i.op_register(n);
                if !guest_gpr(r) {
                    return None;
                }
                h.set_op_register(n, host_reg(r));
            }
            OpKind::Immediate8
            | OpKind::Immediate16
            | OpKind::Immediate32
            | OpKind::Immediate8to16
            | OpKind::Immediate8to32 => {}
            OpKind::Memory if mem_op.is_none() => mem_op = Some(n),
            _ => return None,
        }
    }
    let n = mem_op?;
    // BT* with a register bit offset address memory beyond the operand.
    if matches!(
        m,
        Mnemonic::Bt | Mnemonic::Bts | Mnemonic::Btr | Mnemonic::Btc
    ) && i.op1_kind() == OpKind::Register
    {
        return None;
    }
    let size = i.memory_size().size() as u32;
    if !matches!(size, 1 | 2 | 4) {
        return None;
    }
    let ea = mem_ea(i, fs_gs)?;
    let mut info = iced_x86::InstructionInfoFactory::new();
    let write = match info.info(i).op_access(n) {
        iced_x86::OpAccess::Read | iced_x86::OpAccess::CondRead => false,
        iced_x86::OpAccess::NoMemAccess => return None,
        _ => true,
    };
    // The moffs forms (A0-A3) have no ModRM byte, so no base register: use the ModRM
    // forms of the same move.
    match i.code() {
        Code::Mov_AL_moffs8 => h.set_code(Code::Mov_r8_rm8),
        Code::Mov_AX_moffs16 => h.set_code(Code::Mov_r16_rm16),
        Code::Mov_EAX_moffs32 => h.set_code(Code::Mov_r32_rm32),
        Code::Mov_moffs8_AL => h.set_code(Code::Mov_rm8_r8),
        Code::Mov_moffs16_AX => h.set_code(Code::Mov_rm16_r16),
        Code::Mov_moffs32_EAX => h.set_code(Code::Mov_rm32_r32),
        _ => {}
    }
    h.set_memory_base(Register::R13);
    h.set_memory_index(Register::None);
    h.set_memory_index_scale(1);
    h.set_memory_displacement64(0);
    h.set_memory_displ_size(0);
    h.set_segment_prefix(Register::None);
    h.set_has_repe_prefix(false);
    h.set_has_repne_prefix(false);
    let host = encode64(&h)?;
    Some((Kind::Mem { ea, size, write }, host))
}

/// Host code computing the linear address of `i`'s memory operand into r13d (flat
/// DS/ES/SS, or FS/GS as `fs_gs` allows; 32-bit addressing), or `None`.
pub fn mem_ea(i: &Instruction, fs_gs: u8) -> Option<Vec<u8>> {
    let seg_add = match i.memory_segment() {
        Register::DS | Register::ES | Register::SS => None,
        Register::FS if fs_gs & SEG_FS_OK != 0 => Some(SegReg::Fs),
        Register::GS if fs_gs & SEG_GS_OK != 0 => Some(SegReg::Gs),
        _ => return None,
    };
    let (b, x) = (i.memory_base(), i.memory_index());
    let ok = |r: Register| r == Register::None || gpr32_index(r).is_some();
    if !ok(b) || !ok(x) || i.memory_displ_size() > 4 {
        return None;
    }
    let mut ea = ea_bytes(b, x, i.memory_index_scale(), i.memory_displacement32())?;
    if let Some(sr) = seg_add {
        // mov r11d, [r15 + seg[sr].base] ; lea r13d, [r13 + r11]: the 32-bit linear
        // address wraps like the CPU's, and EFLAGS stay untouched (the flag-free probe
        // relies on that).
        let disp = std::mem::offset_of!(CpuState, seg)
            + sr as usize * std::mem::size_of::<Segment>()
            + std::mem::offset_of!(Segment, base);
        let m = iced_x86::MemoryOperand::with_base_displ(Register::R15, disp as i64);
        ea.extend(encode64(
            &Instruction::with2(Code::Mov_r32_rm32, Register::R11D, m).ok()?,
        )?);
        let sum = iced_x86::MemoryOperand::with_base_index(Register::R13, Register::R11);
        ea.extend(encode64(
            &Instruction::with2(Code::Lea_r32_m, Register::R13D, sum).ok()?,
        )?);
    }
    Some(ea)
}

/// `lea r13d, [base + index * scale + disp]` (32-bit wrap-around), guest registers
/// renamed; `mov r13d, disp` when there are no registers.
pub fn ea_bytes(base: Register, index: Register, scale: u32, disp: u32) -> Option<Vec<u8>> {
    if base == Register::None && index == Register::None {
        return encode64(&Instruction::with2(Code::Mov_r32_imm32, Register::R13D, disp).ok()?);
    }
    let mem = iced_x86::MemoryOperand::new(
        host_reg(base),
        host_reg(index),
        scale,
        disp as i32 as i64,
        if disp == 0 { 0 } else { 4 },
        false,
        Register::None,
    );
    encode64(&Instruction::with2(Code::Lea_r32_m, Register::R13D, mem).ok()?)
}

fn encode64(i: &Instruction) -> Option<Vec<u8>> {
    let mut e = Encoder::new(64);
    e.encode(i, 0).ok()?;
    Some(e.take_buffer())
}

fn cc_of(c: ConditionCode) -> Option<u8> {
    use ConditionCode as C;
    Some(match c {
        C::o => 0,
        C::no => 1,
        C::b => 2,
        C::ae => 3,
        C::e => 4,
        C::ne => 5,
        C::be => 6,
        C::a => 7,
        C::s => 8,
        C::ns => 9,
        C::p => 10,
        C::np => 11,
        C::l => 12,
        C::ge => 13,
        C::le => 14,
        C::g => 15,
        _ => return None,
    })
}

/// Whether the instruction's flag effect depends on a run-time count (shifts and
/// rotates leave the flags alone when the masked count is zero).
pub(crate) fn count_dependent(i: &Instruction) -> bool {
    use Mnemonic::*;
    matches!(
        i.mnemonic(),
        Shl | Sal | Shr | Sar | Rol | Ror | Rcl | Rcr | Shld | Shrd
    )
}

/// Whether an untranslated instruction may run in the interpreter from the middle of a
/// block ([`Kind::Interp`]). Excluded: branches of every kind, and instructions that
/// change what a block assumes or that should reach the dispatcher soon: segment, control
/// and debug register loads, descriptor-table and task loads, TLB and cache control,
/// STI and HLT (interrupt shadow, halt), port I/O (a device may raise an interrupt or
/// need polling), MSR writes. Anything else that turns out to change the mode (POPFD
/// setting TF or IF, say) is caught after the fact by the helper, which then leaves.
pub fn interp_in_block(i: &Instruction) -> bool {
    i.flow_control() == FlowControl::Next && interp_ok(i)
}

/// Whether a branch the emitter does not translate may end a block as
/// [`Term::InterpBranch`]: any near or far jump, call, return, loop or software
/// interrupt, except those excluded as in [`interp_in_block`] (SYSENTER, SYSEXIT...).
/// The helper leaves the block anyway when the branch changed the mode.
pub fn interp_branch(i: &Instruction) -> bool {
    matches!(
        i.flow_control(),
        FlowControl::UnconditionalBranch
            | FlowControl::IndirectBranch
            | FlowControl::ConditionalBranch
            | FlowControl::Return
            | FlowControl::Call
            | FlowControl::IndirectCall
            | FlowControl::Interrupt
    ) && interp_ok(i)
}

/// Whether an instruction allowed in a block ([`interp_in_block`]) certainly leaves the
/// block's mode bits alone (no EFLAGS.TF/RF/AC/VM, CPL, segment, CR0 or x87 control
/// change), so the in-block interpreter call need not recompute them: integer, string
/// and stack instructions (segment register forms are not allowed in blocks at all).
pub fn keeps_mode(i: &Instruction) -> bool {
    use Mnemonic::*;
    i.is_string_instruction()
        || matches!(
            i.mnemonic(),
            Mov | Movzx
                | Movsx
                | Push
                | Pushf
                | Pushfd
                | Pusha
                | Pushad
                | Pop
                | Popa
                | Popad
                | Enter
                | Leave
                | Rdtsc
                | Pause
                | Nop
                | Cpuid
                | Cmpxchg8b
                | Cmpxchg
                | Xadd
                | Xchg
                | Bt
                | Bts
                | Btr
                | Btc
                | Bsf
                | Bsr
                | Tzcnt
                | Lzcnt
                | Popcnt
                | Mul
                | Imul
                | Div
                | Idiv
                | Cld
                | Std
                | Cli
                | Verr
                | Verw
                | Lar
                | Lsl
                | Xlatb
                | Sgdt
                | Sidt
                | Sldt
                | Str
                | Smsw
                | Bound
        )
}

fn interp_ok(i: &Instruction) -> bool {
    use Mnemonic::*;
    if i.code() == Code::INVALID {
        return false;
    }
    for n in 0..i.op_count() {
        if i.op_kind(n) == OpKind::Register {
            let r = i.op_register(n);
            if r.is_segment_register() || r.is_cr() || r.is_dr() || r.is_tr() {
                return false;
            }
        }
    }
    !matches!(
        i.mnemonic(),
        Sti | Hlt
            | In
            | Out
            | Insb
            | Insw
            | Insd
            | Outsb
            | Outsw
            | Outsd
            | Lds
            | Les
            | Lfs
            | Lgs
            | Lss
            | Lgdt
            | Lidt
            | Lldt
            | Ltr
            | Lmsw
            | Clts
            | Invlpg
            | Invd
            | Wbinvd
            | Wrmsr
            | Rsm
            | Sysenter
            | Sysexit
            | Syscall
            | Sysret
            | Monitor
            | Mwait
            | Xsetbv
            | Xrstor
            | Fxrstor
            | Ldmxcsr
    )
}

/// Decodes the block starting at guest `eip` from `bytes` (the guest bytes from `eip` to
/// the end of its page). Returns `None` when the first instruction is not translated
/// (with its mnemonic, if it decoded).
///
/// With `mem_ok` (flat DS/ES/SS, see `Jit`), instructions with one memory operand and
/// the stack forms (PUSH, POP, CALL rel32, RET) are translated too.
pub fn plan_block(
    bytes: &[u8],
    eip: u32,
    mem_ok: bool,
    fs_gs: u8,
) -> Result<BlockPlan, Option<Mnemonic>> {
    let mut d = Decoder::with_ip(32, bytes, eip as u64, DecoderOptions::NONE);
    let mut insns = Vec::new();
    let mut undefined = 0u32;
    let mut stopped_by = None;
    let mut pos = eip;
    let term;
    loop {
        if insns.len() >= MAX_BLOCK_INSNS {
            term = Term::Fall {
                next: pos,
                chainable: true,
            };
            break;
        }
        if !d.can_decode() {
            term = Term::Fall {
                next: pos,
                chainable: false,
            };
            break;
        }
        let i = d.decode();
        if d.last_error() == DecoderError::NoMoreBytes && mem_ok {
            // Runs into the next page: the interpreter fetches it there (through the
            // MMU, so a remapped or rewritten next page is seen) and the block goes on
            // wherever it left EIP.
            let mut cut = Instruction::default();
            cut.set_ip32(pos);
            insns.push(GuestInsn {
                instr: cut,
                kind: Kind::Step,
                host: Vec::new(),
            });
            undefined = 0;
            pos = eip.wrapping_add(bytes.len() as u32);
            term = Term::InterpBranch;
            break;
        }
        if d.last_error() != DecoderError::None {
            // Invalid: the interpreter decides.
            term = Term::Fall {
                next: pos,
                chainable: false,
            };
            break;
        }
        let next = i.next_ip32();
        let flags_und = rflags_to_eflags(i.rflags_undefined());
        let flags_def = rflags_to_eflags(i.rflags_written() | i.rflags_cleared() | i.rflags_set());
        let branch32 = i.op0_kind() == OpKind::NearBranch32;
        if branch32 && (i.is_jcc_short_or_near() || i.is_jmp_short_or_near()) {
            let target = i.near_branch32();
            let t = if i.is_jmp_short_or_near() {
                Term::Jmp { target }
            } else {
                match cc_of(i.condition_code()) {
                    Some(cc) => Term::Jcc { cc, target, next },
                    None => {
                        stopped_by = Some(i.mnemonic());
                        Term::Fall {
                            next: pos,
                            chainable: false,
                        }
                    }
                }
            };
            if !matches!(t, Term::Fall { .. }) {
                insns.push(GuestInsn {
                    instr: i,
                    kind: Kind::Branch,
                    host: Vec::new(),
                });
                pos = next;
            }
            term = t;
            break;
        }
        if i.code() == Code::Jmp_rm32 && i.op0_kind() == OpKind::Register {
            if let Some(reg) = gpr32_index(i.op0_register()) {
                insns.push(GuestInsn {
                    instr: i,
                    kind: Kind::Branch,
                    host: Vec::new(),
                });
                pos = next;
                term = Term::JmpReg { reg };
                break;
            }
        }
        if mem_ok {
            if i.code() == Code::Jmp_rm32 && i.op0_kind() == OpKind::Memory {
                if let Some(ea) = mem_ea(&i, fs_gs) {
                    let load = Instruction::with2(
                        Code::Mov_r32_rm32,
                        Register::R11D,
                        iced_x86::MemoryOperand::with_base(Register::R13),
                    )
                    .ok()
                    .and_then(|l| encode64(&l));
                    if let Some(host) = load {
                        insns.push(GuestInsn {
                            instr: i,
                            kind: Kind::Mem {
                                ea,
                                size: 4,
                                write: false,
                            },
                            host,
                        });
                        pos = next;
                        term = Term::JmpMem;
                        break;
                    }
                }
            }
            if i.code() == Code::Call_rm32 && i.op0_kind() == OpKind::Memory {
                if let Some(ea) = mem_ea(&i, fs_gs) {
                    insns.push(GuestInsn {
                        instr: i,
                        kind: Kind::CallMem { ea, ret: next },
                        host: Vec::new(),
                    });
                    pos = next;
                    term = Term::CallMem;
                    break;
                }
            }
            let t = match i.code() {
                Code::Call_rel32_32 => Some(Term::Call {
                    target: i.near_branch32(),
                    ret: next,
                }),
                Code::Call_rm32 if i.op0_kind() == OpKind::Register => {
                    gpr32_index(i.op0_register()).map(|reg| Term::CallReg { reg, ret: next })
                }
                Code::Retnd => Some(Term::Ret { imm: 0 }),
                Code::Retnd_imm16 => Some(Term::Ret {
                    imm: i.immediate16(),
                }),
                _ => None,
            };
            if let Some(t) = t {
                insns.push(GuestInsn {
                    instr: i,
                    kind: Kind::Branch,
                    host: Vec::new(),
                });
                pos = next;
                term = t;
                break;
            }
        }
        let native = if i.mnemonic() == Mnemonic::Nop {
            // Multi-byte NOPs name a memory operand but access nothing.
            Some((Kind::Reg, Vec::new()))
        } else if let Some(h) = native_bytes(&i) {
            Some((Kind::Reg, h))
        } else if i.code() == Code::Div_rm32 && i.op0_kind() == OpKind::Register {
            gpr32_index(i.op0_register()).map(|g| (Kind::Div(g), Vec::new()))
        } else if !mem_ok {
            None
        } else {
            match i.code() {
                Code::Push_r32 => {
                    gpr32_index(i.op0_register()).map(|g| (Kind::Push(g), Vec::new()))
                }
                Code::Pop_r32 => gpr32_index(i.op0_register()).map(|g| (Kind::Pop(g), Vec::new())),
                Code::Push_rm32 if i.op0_kind() == OpKind::Register => {
                    gpr32_index(i.op0_register()).map(|g| (Kind::Push(g), Vec::new()))
                }
                Code::Push_rm32 => mem_ea(&i, fs_gs).map(|ea| (Kind::PushMem { ea }, Vec::new())),
                Code::Pushd_imm32 | Code::Pushd_imm8 => {
                    Some((Kind::PushImm(i.immediate(0) as u32), Vec::new()))
                }
                Code::Leaved => Some((Kind::Leave, Vec::new())),
                _ if rep_string(&i).is_some() => rep_string(&i).map(|k| (k, Vec::new())),
                _ => native_mem(&i, fs_gs).or_else(|| {
                    crate::x87::plan(&i, &bytes[pos.wrapping_sub(eip) as usize..], fs_gs)
                }),
            }
        };
        match native {
            Some((kind, host)) => {
                if count_dependent(&i) {
                    undefined |= flags_und;
                } else {
                    undefined = (undefined & !flags_def) | flags_und;
                }
                insns.push(GuestInsn {
                    instr: i,
                    kind,
                    host,
                });
                pos = next;
            }
            None if mem_ok && interp_branch(&i) => {
                insns.push(GuestInsn {
                    instr: i,
                    kind: Kind::Interp,
                    host: Vec::new(),
                });
                pos = next;
                // Flags and registers are whatever the interpreter left.
                undefined = 0;
                term = Term::InterpBranch;
                break;
            }
            None if mem_ok && interp_in_block(&i) => {
                undefined = (undefined & !flags_def) | flags_und;
                insns.push(GuestInsn {
                    instr: i,
                    kind: Kind::Interp,
                    host: Vec::new(),
                });
                pos = next;
            }
            None => {
                stopped_by = Some(i.mnemonic());
                term = Term::Fall {
                    next: pos,
                    chainable: false,
                };
                break;
            }
        }
    }
    if insns.is_empty() {
        return Err(stopped_by);
    }
    Ok(BlockPlan {
        eip,
        guest_len: pos.wrapping_sub(eip),
        insns,
        term,
        stopped_by,
        undefined_at_exit: undefined,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn dec(bytes: &[u8]) -> Instruction {
        Decoder::with_ip(32, bytes, 0x1000, DecoderOptions::NONE).decode()
    }

    fn host(bytes: &[u8]) -> Option<Vec<u8>> {
        native_bytes(&dec(bytes))
    }

    #[test]
    fn reencoding_renames_esp_and_fixes_short_inc() {
        // add eax, ecx (01 c8) is the same in 64-bit mode.
        assert_eq!(host(&[0x01, 0xc8]).unwrap(), vec![0x01, 0xc8]);
        // inc eax (40) becomes inc eax (ff c0).
        assert_eq!(host(&[0x40]).unwrap(), vec![0xff, 0xc0]);
        // mov esp, ebx (89 dc) becomes mov r8d, ebx (41 89 d8).
        assert_eq!(host(&[0x89, 0xdc]).unwrap(), vec![0x41, 0x89, 0xd8]);
        // lea eax, [esp+ecx*4+8] (8d 44 8c 08) becomes lea eax, [r8d+ecx*4+8] (67 41 8d 44 88 08).
        assert_eq!(
            host(&[0x8d, 0x44, 0x8c, 0x08]).unwrap(),
            vec![0x67, 0x41, 0x8d, 0x44, 0x88, 0x08]
        );
        // lea eax, [0x12345678] becomes mov eax, 0x12345678.
        assert_eq!(
            host(&[0x8d, 0x05, 0x78, 0x56, 0x34, 0x12]).unwrap(),
            vec![0xb8, 0x78, 0x56, 0x34, 0x12]
        );
        // mov ah, bh stays (no REX).
        assert_eq!(host(&[0x88, 0xfc]).unwrap(), vec![0x88, 0xfc]);
    }

    #[test]
    fn memory_system_and_faulting_instructions_are_not_native() {
        assert!(host(&[0x8b, 0x03]).is_none(), "mov eax, [ebx]");
        assert!(host(&[0xf7, 0xf1]).is_none(), "div ecx can #DE");
        assert!(host(&[0x8e, 0xd8]).is_none(), "mov ds, ax");
        assert!(host(&[0x50]).is_none(), "push eax");
        assert!(
            host(&[0xf0, 0x01, 0xc8]).is_none(),
            "lock add eax, ecx is #UD"
        );
        assert!(host(&[0x67, 0x8d, 0x00]).is_none(), "16-bit addressing LEA");
    }

    #[test]
    fn lock_only_on_memory_read_modify_write() {
        // lock add [eax], ecx
        assert!(native_mem(&dec(&[0xf0, 0x01, 0x08]), 0).is_some());
        // lock mov [eax], ecx is #UD: left to the interpreter.
        assert!(native_mem(&dec(&[0xf0, 0x89, 0x08]), 0).is_none());
        // mov eax, [0x12345678] (A1 moffs32) becomes mov eax, [r13] (41 8b 45 00);
        // mov [0x12345678], al (A2 moffs8) becomes mov [r13], al (41 88 45 00).
        let (k, h) = native_mem(&dec(&[0xa1, 0x78, 0x56, 0x34, 0x12]), 0).unwrap();
        assert_eq!(h, vec![0x41, 0x8b, 0x45, 0x00]);
        assert!(matches!(
            k,
            Kind::Mem {
                size: 4,
                write: false,
                ..
            }
        ));
        let (k, h) = native_mem(&dec(&[0xa2, 0x78, 0x56, 0x34, 0x12]), 0).unwrap();
        assert_eq!(h, vec![0x41, 0x88, 0x45, 0x00]);
        assert!(matches!(
            k,
            Kind::Mem {
                size: 1,
                write: true,
                ..
            }
        ));
        // mov eax, fs:[ebx] only when FS is allowed.
        assert!(native_mem(&dec(&[0x64, 0x8b, 0x03]), 0).is_none());
        assert!(native_mem(&dec(&[0x64, 0x8b, 0x03]), SEG_FS_OK).is_some());
        // CS overrides stay interpreted.
        assert!(native_mem(&dec(&[0x2e, 0x8b, 0x03]), SEG_FS_OK | SEG_GS_OK).is_none());
    }

    #[test]
    fn blocks_end_at_branches_and_untranslated_instructions() {
        // inc eax; add ecx, eax; jnz -5 ; (never reached)
        let b = plan_block(&[0x40, 0x01, 0xc1, 0x75, 0xfb, 0x90], 0x1000, false, 0).unwrap();
        assert_eq!(b.insns.len(), 3);
        assert_eq!(
            b.term,
            Term::Jcc {
                cc: 5,
                target: 0x1000,
                next: 0x1005
            }
        );
        // mov eax, 1; push eax
        let b = plan_block(&[0xb8, 1, 0, 0, 0, 0x50], 0x2000, false, 0).unwrap();
        assert_eq!(
            b.term,
            Term::Fall {
                next: 0x2005,
                chainable: false
            }
        );
        assert_eq!(b.stopped_by, Some(Mnemonic::Push));
        assert_eq!(
            plan_block(&[0x50], 0, false, 0).unwrap_err(),
            Some(Mnemonic::Push)
        );
        // An instruction cut by the page end is left to the interpreter.
        let b = plan_block(&[0x40, 0xb8, 1, 0], 0x2ffc, false, 0).unwrap();
        assert_eq!(b.insns.len(), 1);
        // jmp ebx
        let b = plan_block(&[0xff, 0xe3], 0, false, 0).unwrap();
        assert_eq!(b.term, Term::JmpReg { reg: 3 });
    }
}
