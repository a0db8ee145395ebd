//! Guest x87 code on the host's x87 (issue #4).
//!
//! Host and guest are both x86, so the host's FPU computes the guest's results, status
//! flags and condition codes bit for bit: a guest `fmul qword [ebx]` becomes
//! `fmul qword [r13]` after the usual inline TLB probe. What makes that sound:
//!
//! - **State.** [`morph86_cpu::fpu::FpuState`] begins with the 32-bit FNSAVE image (CW,
//!   SW, TW, ST(0)-ST(7) in stack order), so one `FRSTOR` loads the guest's x87 state into
//!   the host and one `FNSAVE` stores it back (and reinitialises the host's x87, which the
//!   host ABI wants empty). The image's pointer bytes are scratch; the guest's FIP, FCS,
//!   FOP, FDP and FDS are separate fields that translated code stores with plain moves
//!   (immediates from translation time, selectors from the segment registers).
//!   Why FNSAVE and not FXSAVE: on the host (AMD Zen 4 under KVM) FRSTOR + FNSAVE cost
//!   ~82 ns, FXRSTOR + FXSAVE + the FNINIT the host ABI then needs ~101 ns, XRSTOR +
//!   XSAVE of the x87 component ~160 ns; FXRSTOR would also load MXCSR and the XMM
//!   registers, and the FNSAVE image keeps the full tag word the interpreter uses.
//! - **Lazily.** The state stays in the host's x87 across chained blocks: `host_live` in
//!   the FPU state says it is there. The first x87 instruction of a block loads it if it
//!   is not live yet ([`emit_ensure`]); the trampoline's exit, slow-path and in-block
//!   interpreter paths store it before any Rust code runs ([`emit_spill`],
//!   [`emit_spill_for_call`]) and load it again when the block goes on
//!   ([`emit_reload_after_call`]). Rust code therefore always sees the state in memory.
//! - **Only when nothing can differ.** Native x87 code runs only in blocks of mode
//!   [`MODE_X87`] ([`native_ok`]: CR0.EM and CR0.TS clear, all six exceptions masked, no
//!   error summary pending). An unmasked exception would trap the *host*, and EM/TS must
//!   raise #NM: the interpreter does those. The state is only ever loaded into the host
//!   after checking the same condition at run time; a native FLDCW that would unmask an
//!   exception goes to the slow path instead ([`emit_fldcw_guard`]), and a slow path or
//!   in-block interpreter call that leaves the state outside the mode leaves the block.
//! - **Only what the host computes like the interpreter.** Loads, stores, arithmetic,
//!   compares, FXCH, FCMOV, FPREM, FSCALE, FXTRACT, FSQRT, FRNDINT, the constants and the
//!   control-word and status-word instructions. The transcendentals (FSIN, FPATAN, F2XM1,
//!   ...) differ between CPU generations in the last bit, BCD and environment loads and
//!   stores are rare: those stay in the interpreter, as does FISTTP (an SSE3 instruction
//!   the emulated P6 does not have, #UD).

use crate::emit::{jmp_rel32, restore_flags, JitCtx, NO_CHAIN};
use crate::translate::{mem_ea, BlockPlan, Kind};
use dynasmrt::x64::X64Relocation;
use dynasmrt::{dynasm, DynamicLabel, DynasmApi, DynasmLabelApi, VecAssembler};
use iced_x86::{Code, Encoder, Instruction, Mnemonic, OpKind, Register};
use morph86_cpu::fpu::{FpuState, CW_MASKS, SW_ES};
use morph86_cpu::state::{CR0_EM, CR0_TS};
use morph86_cpu::{CpuState, SegReg, Segment};
use std::mem::offset_of;

type Asm = VecAssembler<X64Relocation>;

/// Mode bit (block key): x87 instructions may run on the host's x87 ([`native_ok`]).
pub const MODE_X87: u8 = 1 << 6;
/// `plan_block`'s `fs_gs` bit: translate x87 instructions natively (the block is
/// made for [`MODE_X87`]).
pub const PLAN_X87: u8 = 1 << 2;

const OFF_FPU: i32 = offset_of!(CpuState, fpu) as i32;
const OFF_CW: i32 = OFF_FPU + offset_of!(FpuState, cw) as i32;
const OFF_SW: i32 = OFF_FPU + offset_of!(FpuState, sw) as i32;
const OFF_FOP: i32 = OFF_FPU + offset_of!(FpuState, fop) as i32;
const OFF_FCS: i32 = OFF_FPU + offset_of!(FpuState, fcs) as i32;
const OFF_FIP: i32 = OFF_FPU + offset_of!(FpuState, fip) as i32;
const OFF_FDP: i32 = OFF_FPU + offset_of!(FpuState, fdp) as i32;
const OFF_FDS: i32 = OFF_FPU + offset_of!(FpuState, fds) as i32;
const OFF_LIVE: i32 = OFF_FPU + offset_of!(FpuState, host_live) as i32;
const OFF_WAS_LIVE: i32 = OFF_FPU + offset_of!(FpuState, host_was_live) as i32;
const OFF_CALL_KEEPS: i32 = OFF_FPU + offset_of!(FpuState, host_call_keeps) as i32;
const OFF_FDP_PENDING: i32 = OFF_FPU + offset_of!(FpuState, fdp_pending) as i32;
const OFF_CR0: i32 = offset_of!(CpuState, cr0) as i32;
const OFF_RIP: i32 = offset_of!(CpuState, rip) as i32;
const OFF_ICOUNT: i32 = offset_of!(JitCtx, icount) as i32;
const OFF_ARG: i32 = offset_of!(JitCtx, arg) as i32;
const OFF_EXIT: i32 = offset_of!(JitCtx, exit) as i32;
const _: () = assert!(morph86_cpu::fpu::FSAVE_IMAGE_OFFSET == 0);
/// CR0.EM | CR0.TS (both in the low byte).
const CR0_EM_TS: i8 = (CR0_EM | CR0_TS) as i8;

/// Offset of segment register `s`'s selector in `CpuState`.
fn off_selector(s: SegReg) -> i32 {
    (offset_of!(CpuState, seg)
        + s as usize * std::mem::size_of::<Segment>()
        + offset_of!(Segment, selector)) as i32
}

/// Whether x87 instructions may run on the host now: CR0.EM and CR0.TS clear (else
/// they raise #NM), every exception masked in the control word and no error summary in
/// the status word (else the host could trap).
pub fn native_ok(s: &CpuState) -> bool {
    s.cr0 & (CR0_EM | CR0_TS) == 0 && s.fpu.cw & CW_MASKS == CW_MASKS && s.fpu.sw & SW_ES == 0
}

/// Whether native x87 translation is switched off (`MORPH86_NO_X87` set in the
/// environment: every x87 instruction then runs in the interpreter, for comparisons).
fn disabled() -> bool {
    static OFF: std::sync::OnceLock<bool> = std::sync::OnceLock::new();
    *OFF.get_or_init(|| std::env::var_os("MORPH86_NO_X87").is_some())
}

/// [`MODE_X87`] when [`native_ok`] (and not [`disabled`]), else 0 (for `mode_bits`).
pub fn mode_bit(s: &CpuState) -> u8 {
    if native_ok(s) && !disabled() {
        MODE_X87
    } else {
        0
    }
}

/// How a natively translated x87 instruction relates to the FPU pointers.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Class {
    /// Updates FIP/FCS/FOP (and FDP/FDS with a memory operand).
    Numeric,
    /// Control instruction: leaves the pointers alone.
    Control,
}

fn class_of(m: Mnemonic) -> Option<Class> {
    use Mnemonic::*;
    Some(match m {
        Fninit | Finit | Fnclex | Fclex | Fnstsw | Fstsw | Fnstcw | Fstcw | Fldcw => Class::Control,
        Fld | Fst | Fstp | Fstpnce | Fild | Fist | Fistp | Fxch | Fadd | Faddp | Fiadd | Fsub
        | Fsubp | Fisub | Fsubr | Fsubrp | Fisubr | Fmul | Fmulp | Fimul | Fdiv | Fdivp | Fidiv
        | Fdivr | Fdivrp | Fidivr | Fcom | Fcomp | Fcompp | Fucom | Fucomp | Fucompp | Ficom
        | Ficomp | Fcomi | Fcomip | Fucomi | Fucomip | Ftst | Fxam | Fchs | Fabs | Fsqrt
        | Frndint | Fprem | Fprem1 | Fscale | Fxtract | Fld1 | Fldz | Fldpi | Fldl2e | Fldl2t
        | Fldlg2 | Fldln2 | Fcmovb | Fcmove | Fcmovbe | Fcmovu | Fcmovnb | Fcmovne | Fcmovnbe
        | Fcmovnu | Ffree | Ffreep | Fincstp | Fdecstp | Fnop => Class::Numeric,
        _ => return None,
    })
}

/// Whether `i` (an instruction of a block) runs on the host's x87, so the guest state
/// must be loaded before it ([`emit_ensure`]).
pub fn needs_host_fpu(i: &Instruction) -> bool {
    class_of(i.mnemonic()).is_some()
}

/// The 11-bit FOP of the instruction whose bytes start `bytes`: the low 3 bits of the
/// escape opcode and the ModR/M byte (prefixes skipped, as the interpreter does).
fn fop_of(bytes: &[u8]) -> u16 {
    let mut k = 0;
    while k + 1 < bytes.len() && k < 14 {
        match bytes[k] {
            0x26 | 0x2e | 0x36 | 0x3e | 0x64 | 0x65 | 0x66 | 0x67 | 0xf0 | 0xf2 | 0xf3 | 0x9b => {
                k += 1
            }
            _ => break,
        }
    }
    match (bytes.get(k), bytes.get(k + 1)) {
        (Some(&op @ 0xd8..=0xdf), Some(&modrm)) => (((op & 7) as u16) << 8) | modrm as u16,
        _ => 0,
    }
}

fn encode64(i: &Instruction) -> Option<Vec<u8>> {
    let mut e = Encoder::new(64);
    e.encode(i, 0).ok()?;
    Some(e.take_buffer())
}

/// For an x87 instruction of a block made for [`MODE_X87`] (`fs_gs` has [`PLAN_X87`]):
/// how it runs natively, or `None` to leave it to the interpreter. `bytes` are the
/// guest bytes from the instruction on (for FOP).
///
/// Register forms become [`Kind::Reg`], memory forms (flat DS/ES/SS, 32-bit
/// addressing) [`Kind::Mem`] with `[r13]` as the operand; both followed by the stores of
/// FIP/FCS/FOP (and FDP/FDS), which use r11 and leave host flags alone (FCOMI's flags
/// are the guest's).
pub fn plan(i: &Instruction, bytes: &[u8], fs_gs: u8) -> Option<(Kind, Vec<u8>)> {
    if fs_gs & PLAN_X87 == 0 {
        return None;
    }
    let m = i.mnemonic();
    if m == Mnemonic::Wait {
        // With CR0.TS clear and nothing unmasked pending, WAIT does nothing.
        return Some((Kind::Reg, Vec::new()));
    }
    let class = class_of(m)?;
    if i.has_lock_prefix() {
        return None;
    }
    let mut h = *i;
    // The waiting forms wait for nothing here (no unmasked exception can be pending).
    match i.code() {
        Code::Fstsw_AX => h.set_code(Code::Fnstsw_AX),
        Code::Fstsw_m2byte => h.set_code(Code::Fnstsw_m2byte),
        Code::Fstcw_m2byte => h.set_code(Code::Fnstcw_m2byte),
        Code::Finit => h.set_code(Code::Fninit),
        Code::Fclex => h.set_code(Code::Fnclex),
        _ => {}
    }
    let mut mem = None;
    for n in 0..i.op_count() {
        match i.op_kind(n) {
            OpKind::Register => {
                let r = i.op_register(n);
                let st = (Register::ST0 as u32..=Register::ST7 as u32).contains(&(r as u32));
                if !st && r != Register::AX {
                    return None;
                }
            }
            OpKind::Memory if mem.is_none() => mem = Some(()),
            _ => return None,
        }
    }
    let fop = fop_of(bytes);
    let mut ops: Asm = VecAssembler::new(0);
    let kind = match mem {
        None => {
            ops.extend(encode64(&h)?);
            Kind::Reg
        }
        Some(()) => {
            let seg = match i.memory_segment() {
                Register::DS => SegReg::Ds,
                Register::ES => SegReg::Es,
                Register::SS => SegReg::Ss,
                _ => return None,
            };
            let size = i.memory_size().size() as u32;
            if !matches!(size, 2 | 4 | 8 | 10) {
                return None;
            }
            let write = matches!(
                m,
                Mnemonic::Fst
                    | Mnemonic::Fstp
                    | Mnemonic::Fist
                    | Mnemonic::Fistp
                    | Mnemonic::Fnstcw
                    | Mnemonic::Fstcw
                    | Mnemonic::Fnstsw
                    | Mnemonic::Fstsw
            );
            let mut ea = mem_ea(i, 0)?;
            // The offset becomes FDP once the instruction completes.
            let mut e: Asm = VecAssembler::new(0);
            dynasm!(e ; .arch x64 ; mov DWORD [r15 + OFF_FDP_PENDING], r13d);
            ea.extend(e.finalize().ok()?);
            h.set_memory_base(Register::R13);
            h.set_memory_index(Register::None);
            h.set_memory_index_scale(1);
            h.set_memory_displacement64(0);
            h.set_memory_displ_size(0);
            h.set_segment_prefix(Register::None);
            ops.extend(encode64(&h)?);
            if class == Class::Numeric {
                let sel = off_selector(seg);
                dynasm!(ops
                    ; .arch x64
                    ; mov r11d, DWORD [r15 + OFF_FDP_PENDING]
                    ; mov DWORD [r15 + OFF_FDP], r11d
                    ; movzx r11d, WORD [r15 + sel]
                    ; mov WORD [r15 + OFF_FDS], r11w
                );
            }
            Kind::Mem { ea, size, write }
        }
    };
    if class == Class::Numeric {
        let cs_sel = off_selector(SegReg::Cs);
        dynasm!(ops
            ; .arch x64
            ; mov DWORD [r15 + OFF_FIP], i.ip32() as i32
            ; mov WORD [r15 + OFF_FOP], fop as i16
            ; movzx r11d, WORD [r15 + cs_sel]
            ; mov WORD [r15 + OFF_FCS], r11w
        );
    }
    if matches!(m, Mnemonic::Fninit | Mnemonic::Finit) {
        // FNINIT clears the pointers too (FpuState::init).
        dynasm!(ops
            ; .arch x64
            ; mov DWORD [r15 + OFF_FIP], 0
            ; mov DWORD [r15 + OFF_FOP], 0
            ; mov DWORD [r15 + OFF_FDP], 0
            ; mov WORD [r15 + OFF_FDS], 0
        );
    }
    Some((kind, ops.finalize().ok()?))
}

/// Loads the guest state into the host (FRSTOR, then marks it live) and jumps to
/// `done` if [`emit_mode_check`] allows it; else goes on at `bad`, bound right after.
fn emit_checked_load(ops: &mut Asm, bad: DynamicLabel, done: DynamicLabel) {
    emit_mode_check(ops, bad);
    dynasm!(ops
        ; .arch x64
        ; frstor [r15 + OFF_FPU]
        ; mov BYTE [r15 + OFF_LIVE], 1
        ; jmp =>done
        ; =>bad
    );
}

/// Jumps to `bad` unless the guest state may be loaded into the host ([`native_ok`],
/// evaluated on `CpuState` at run time). Clobbers r11 and flags.
fn emit_mode_check(ops: &mut Asm, bad: DynamicLabel) {
    dynasm!(ops
        ; .arch x64
        ; test BYTE [r15 + OFF_CR0], CR0_EM_TS
        ; jnz =>bad
        ; test WORD [r15 + OFF_SW], SW_ES as i16
        ; jnz =>bad
        ; movzx r11d, WORD [r15 + OFF_CW]
        ; not r11d
        ; test r11b, CW_MASKS as i8
        ; jnz =>bad
    );
}

/// Before the first host x87 instruction of a block (and after nothing that could
/// have stored the state without loading it again): loads the guest state into the
/// host unless it is live. Should the state be outside [`MODE_X87`] after all (an
/// interpreter call earlier in the chain changed it), leaves the block at this
/// instruction instead: the dispatcher then finds the mode changed.
///
/// The guest flags must be in r9 (saved); host flags and r11 are clobbered.
/// `eip`/`not_retired` are those of the instruction, `exit_addr` the trampoline exit,
/// `base` the assembler's base address.
pub fn emit_ensure(ops: &mut Asm, base: usize, exit_addr: usize, eip: u32, not_retired: u32) {
    let done = ops.new_dynamic_label();
    let bad = ops.new_dynamic_label();
    dynasm!(ops
        ; .arch x64
        ; cmp BYTE [r15 + OFF_LIVE], 0
        ; jne =>done
    );
    emit_checked_load(ops, bad, done);
    dynasm!(ops
        ; .arch x64
        ; sub QWORD [r12 + OFF_ICOUNT], not_retired as i32
    );
    restore_flags(ops);
    dynasm!(ops
        ; .arch x64
        ; mov DWORD [r15 + OFF_RIP], eip as i32
        ; mov QWORD [r12 + OFF_EXIT], NO_CHAIN as i32
    );
    let at = base + ops.offset().0;
    ops.extend(jmp_rel32(at, exit_addr).unwrap_or([0xcc; 5]).iter());
    dynasm!(ops ; .arch x64 ; =>done);
}

/// Trampoline exit path: stores the guest state if the host holds it (FNSAVE also
/// leaves the host's x87 initialised, as the host ABI expects). Clobbers flags; guest
/// flags must already be stored.
pub fn emit_spill(ops: &mut Asm) {
    let done = ops.new_dynamic_label();
    dynasm!(ops
        ; .arch x64
        ; cmp BYTE [r15 + OFF_LIVE], 0
        ; je =>done
        ; fnsave [r15 + OFF_FPU]
        ; mov BYTE [r15 + OFF_LIVE], 0
        ; =>done
    );
}

/// Whether the interpreter may read or write the x87 state when it runs `i`: x87,
/// MMX (the MMX registers are the x87 ones), FXSAVE/XSAVE and WAIT. Anything else runs
/// with the state left in the host ([`emit_call_hint`]).
pub fn touches_fpu(i: &Instruction) -> bool {
    use iced_x86::CpuidFeature as F;
    i.mnemonic() == Mnemonic::Wait
        || i.cpuid_features().iter().any(|f| {
            matches!(
                f,
                F::FPU
                    | F::FPU287
                    | F::FPU287XL_ONLY
                    | F::FPU387
                    | F::FPU387SL_ONLY
                    | F::MMX
                    | F::D3NOW
                    | F::D3NOWEXT
                    | F::FXSR
                    | F::XSAVE
                    | F::XSAVEC
                    | F::XSAVEOPT
                    | F::XSAVES
            )
        })
}

/// Before a block's call of the slow path or the interpreter for its instruction at
/// `eip`: when that instruction leaves the x87 state alone, tells the trampoline
/// (through `host_call_keeps`, which the trampoline clears) to leave the state in the
/// host instead of storing and reloading it (~80 ns on the host measured). Only in
/// [`MODE_X87`] blocks; flags are left alone.
///
/// The Rust code then runs with the guest's x87 state in the host's x87: it uses no
/// x87 instructions (x86-64 code does floating point in SSE registers), the state has
/// every exception masked, and the host's MXCSR is untouched.
pub fn emit_call_hint(ops: &mut Asm, plan: &BlockPlan, mode: u8, eip: u32) {
    if mode & MODE_X87 == 0 {
        return;
    }
    let Some(g) = plan.insns.iter().find(|g| g.instr.ip32() == eip) else {
        return;
    };
    if !touches_fpu(&g.instr) {
        dynasm!(ops ; .arch x64 ; mov BYTE [r15 + OFF_CALL_KEEPS], 1);
    }
}

/// Trampoline slow path / in-block interpreter call, before calling Rust: as
/// [`emit_spill`], remembering whether the state was live; nothing when the call site
/// said the instruction leaves the state alone ([`emit_call_hint`]). Clobbers r10 and
/// flags (guest flags must already be stored); the argument registers are left alone.
pub fn emit_spill_for_call(ops: &mut Asm) {
    let done = ops.new_dynamic_label();
    let keep = ops.new_dynamic_label();
    dynasm!(ops
        ; .arch x64
        ; movzx r10d, BYTE [r15 + OFF_CALL_KEEPS]
        ; mov BYTE [r15 + OFF_CALL_KEEPS], 0
        ; test r10d, r10d
        ; jnz =>keep
        ; movzx r10d, BYTE [r15 + OFF_LIVE]
        ; mov BYTE [r15 + OFF_WAS_LIVE], r10b
        ; test r10d, r10d
        ; jz =>done
        ; fnsave [r15 + OFF_FPU]
        ; mov BYTE [r15 + OFF_LIVE], 0
        ; jmp =>done
        ; =>keep
        ; mov BYTE [r15 + OFF_WAS_LIVE], 0
        ; =>done
    );
}

/// Trampoline slow path / in-block interpreter call, after Rust returned "continue"
/// (with `JitCtx::arg` still the count of block instructions not retired, this one
/// included):
/// loads the state again if it was live before the call. If the call left it outside
/// [`MODE_X87`] (FLDCW unmasking an exception, say) the block cannot go on natively:
/// jumps to `leave` (which exits with EIP as the interpreter left it) after taking the
/// block's later instructions off the instruction count. Clobbers r11 and flags.
pub fn emit_reload_after_call(ops: &mut Asm, leave: DynamicLabel) {
    let done = ops.new_dynamic_label();
    let bad = ops.new_dynamic_label();
    dynasm!(ops
        ; .arch x64
        ; cmp BYTE [r15 + OFF_WAS_LIVE], 0
        ; je =>done
    );
    emit_checked_load(ops, bad, done);
    dynasm!(ops
        ; .arch x64
        ; mov r11d, DWORD [r12 + OFF_ARG]
        ; and r11d, 0x7fff_ffff // without emit.rs's INTERP_BRANCH bit
        ; lea r11d, [r11 - 1]
        ; sub QWORD [r12 + OFF_ICOUNT], r11
        ; jmp =>leave
        ; =>done
    );
}

/// Native FLDCW, after the probe (r13 = host address of the new control word): an
/// operand that unmasks any exception goes to `slow` (the interpreter loads it and the
/// block is left, see [`emit_reload_after_call`]). Clobbers r11 and flags (the guest
/// flags are in r9 after a probe).
pub fn emit_fldcw_guard(ops: &mut Asm, slow: DynamicLabel) {
    dynasm!(ops
        ; .arch x64
        ; movzx r11d, WORD [r13]
        ; not r11d
        ; test r11b, CW_MASKS as i8
        ; jnz =>slow
    );
}

/// Whether the emitter must put [`emit_fldcw_guard`] before this instruction's host
/// code.
pub fn needs_fldcw_guard(i: &Instruction) -> bool {
    i.mnemonic() == Mnemonic::Fldcw
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::Jit;
    use iced_x86::{Decoder, DecoderOptions};
    use morph86_cpu::fpu::{f80_to_bytes, F80, TAG_EMPTY};
    use morph86_cpu::state::*;
    use morph86_cpu::Cpu;
    use morph86_mmu::{Mmu, PhysMem};

    const CODE: u64 = 0x10000;
    const DATA: u64 = 0x8000;
    /// Slot (8 bytes each, from DATA) holding the control word FLDCW loads.
    const CW_SLOT: u8 = 15;
    /// FNSTENV target (28 bytes) behind the slots (a disp32).
    const ENV_AT: u32 = 0x80;

    /// A flat 32-bit protected-mode machine at CPL 0, paging off, CR0.NE clear (an
    /// unmasked x87 exception raises FERR# and the program goes on).
    fn machine() -> Cpu {
        let mut cpu = Cpu::new(Mmu::new(PhysMem::new(4 << 20).unwrap()));
        cpu.s.load_flat32(0x08, 0x10);
        cpu.s.cr0 &= !CR0_NE;
        cpu.s.seg[SegReg::Ss as usize].selector = 0x18;
        cpu.s.gpr[3] = DATA;
        cpu.s.gpr[4] = 0x7000;
        cpu.sync_paging();
        cpu
    }

    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 >> 12;
            self.0 ^= self.0 << 25;
            self.0 ^= self.0 >> 27;
            self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    /// An 80-bit value worth testing: zeros, infinities, NaNs (quiet and signalling),
    /// denormals, pseudo-denormals, unnormals, integers, extremes and random ones.
    fn f80_value(r: &mut Rng) -> F80 {
        let sign = (r.next() & 1) << 15;
        let (se, mant) = match r.below(12) {
            0 => (0, 0),
            1 => (0x7fff, 1 << 63),
            2 => (0x7fff, 0xc000_0000_0000_0000 | (r.next() >> 2)),
            3 => (0x7fff, 0x8000_0000_0000_0000 | (r.next() >> 2 | 1)),
            4 => (0, r.next() >> 1),
            5 => (0, r.next() | 1 << 63),
            6 => (1 + r.below(0x7ffe) as u16, r.next() >> 1),
            7 => (0x3fff + r.below(64) as u16, (r.next() | 1 << 63) & !0xfff),
            8 => (0x7ffe, r.next() | 1 << 63),
            9 => (1 + r.below(3) as u16, r.next() | 1 << 63),
            _ => (0x3f00 + r.below(0x200) as u16, r.next() | 1 << 63),
        };
        F80 {
            mant,
            se: se | sign as u16,
        }
    }

    /// Bytes of a memory operand: float, double, extended or integer patterns.
    fn mem_value(r: &mut Rng) -> [u8; 10] {
        let mut b = [0u8; 10];
        match r.below(6) {
            0 => {
                let f: f32 = match r.below(6) {
                    0 => 0.0,
                    1 => f32::INFINITY,
                    2 => f32::from_bits(0x0000_0001 + r.below(0x7f_ffff) as u32),
                    3 => f32::from_bits(0x7f80_0001 + r.below(0x3f_ffff) as u32),
                    _ => (r.next() as i32 as f32) / (1 + r.below(1000)) as f32,
                };
                b[..4].copy_from_slice(&f.to_le_bytes());
            }
            1 => {
                let f: f64 = match r.below(6) {
                    0 => -0.0,
                    1 => f64::NEG_INFINITY,
                    2 => f64::from_bits(1 + r.below(1 << 52)),
                    3 => f64::from_bits(0x7ff8_0000_0000_0000 | r.below(1 << 51)),
                    4 => f64::from_bits(0x7ff0_0000_0000_0001 + r.below(1 << 50)),
                    _ => (r.next() as i64 as f64) / (1 + r.below(100_000)) as f64,
                };
                b[..8].copy_from_slice(&f.to_le_bytes());
            }
            2 => b = f80_to_bytes(f80_value(r)),
            3 => b[..2].copy_from_slice(&(r.next() as i16 >> r.below(16)).to_le_bytes()),
            4 => b[..4].copy_from_slice(&(r.next() as i32 >> r.below(32)).to_le_bytes()),
            _ => b[..8].copy_from_slice(&(r.next() as i64 >> r.below(64)).to_le_bytes()),
        }
        b
    }

    /// A control word: all exceptions masked (mostly) and a random rounding and
    /// precision control.
    fn control_word(r: &mut Rng, unmask_sometimes: bool) -> u16 {
        let mut cw = 0x0040 | CW_MASKS | (r.below(16) as u16) << 8;
        if unmask_sometimes && r.below(4) == 0 {
            cw &= !(1 << r.below(6));
        }
        if unmask_sometimes && r.below(4) == 0 {
            // Reserved bits (6, 7, 12-15) as a guest may write them.
            cw ^= r.next() as u16 & 0xf0c0;
        }
        cw
    }

    /// One random x87 instruction (or a few non-x87 ones that interact with it),
    /// encoded for 32-bit code with EBX pointing at the data slots.
    fn random_x87(r: &mut Rng, out: &mut Vec<u8>) {
        let sti = r.below(8) as u8;
        let slot = |r: &mut Rng, len: u64| (r.below(15 - len.div_ceil(8)) * 8) as u8;
        // ModRM [ebx + disp8] with reg field `n`.
        let mem = |out: &mut Vec<u8>, op: u8, n: u8, disp: u8| {
            out.extend_from_slice(&[op, 0x43 | n << 3, disp]);
        };
        // One of `forms` (opcode, reg field, operand length) on a random slot.
        let pick_mem = |r: &mut Rng, out: &mut Vec<u8>, forms: &[(u8, u8, u64)]| {
            let (op, n, len) = forms[r.below(forms.len() as u64) as usize];
            let d = slot(r, len);
            mem(out, op, n, d);
        };
        match r.below(40) {
            // Register arithmetic: D8 (st0, sti), DC (sti, st0), DE (popping).
            0..=5 => {
                let op = [0xd8, 0xdc, 0xde][r.below(3) as usize];
                let n = r.below(8) as u8;
                out.extend_from_slice(&[op, 0xc0 | n << 3 | sti]);
            }
            // Memory arithmetic: m32fp, m64fp, m32int, m16int.
            6..=10 => {
                let (op, len) = [(0xd8, 4), (0xdc, 8), (0xda, 4), (0xde, 2)][r.below(4) as usize];
                let n = r.below(8) as u8;
                let d = slot(r, len);
                mem(out, op, n, d);
            }
            // Loads.
            11..=14 => {
                let forms = [
                    (0xd9, 0, 4),
                    (0xdd, 0, 8),
                    (0xdb, 5, 10),
                    (0xdf, 0, 2),
                    (0xdb, 0, 4),
                    (0xdf, 5, 8),
                ];
                pick_mem(r, out, &forms);
            }
            // Stores (popping or not).
            15..=18 => {
                let forms = [
                    (0xd9, 2, 4),
                    (0xd9, 3, 4),
                    (0xdd, 2, 8),
                    (0xdd, 3, 8),
                    (0xdb, 7, 10),
                    (0xdf, 2, 2),
                    (0xdf, 3, 2),
                    (0xdb, 2, 4),
                    (0xdb, 3, 4),
                    (0xdf, 7, 8),
                ];
                pick_mem(r, out, &forms);
            }
            // FLD st(i), FXCH, FST/FSTP st(i), FFREE, FFREEP.
            19..=21 => {
                let (op, base) = [
                    (0xd9, 0xc0),
                    (0xd9, 0xc8),
                    (0xdd, 0xd0),
                    (0xdd, 0xd8),
                    (0xdd, 0xc0),
                    (0xdf, 0xc0),
                ][r.below(6) as usize];
                out.extend_from_slice(&[op, base | sti]);
            }
            // Compares, then the status word to AX and the flags (FNSTSW AX; SAHF).
            22..=24 => {
                let c: &[u8] = match r.below(8) {
                    0 => &[0xd8, 0xd0 | sti],
                    1 => &[0xd8, 0xd8 | sti],
                    2 => &[0xde, 0xd9],
                    3 => &[0xdd, 0xe0 | sti],
                    4 => &[0xdd, 0xe8 | sti],
                    5 => &[0xda, 0xe9],
                    6 => &[0xd9, 0xe4],
                    _ => &[0xd9, 0xe5],
                };
                out.extend_from_slice(c);
                out.extend_from_slice(&[0xdf, 0xe0, 0x9e]);
            }
            // FCOMI / FUCOMI (popping or not), then an FCMOVcc reading the flags.
            25..=26 => {
                let op = [0xdb, 0xdf][r.below(2) as usize];
                let base = [0xe8, 0xf0][r.below(2) as usize];
                out.extend_from_slice(&[op, base | sti]);
                let op = [0xda, 0xdb][r.below(2) as usize];
                out.extend_from_slice(&[op, 0xc0 | (r.below(32) as u8)]);
            }
            // One-operand and misc (D9 E0-FF minus the transcendentals).
            27..=30 => {
                let b = [
                    0xe0, 0xe1, 0xe8, 0xe9, 0xea, 0xeb, 0xec, 0xed, 0xee, 0xf4, 0xf5, 0xf6, 0xf7,
                    0xf8, 0xfa, 0xfc, 0xfd, 0xd0,
                ][r.below(18) as usize];
                out.extend_from_slice(&[0xd9, b]);
            }
            // Control: FLDCW from its slot, FNSTCW, FNSTSW m16, FNCLEX, FNINIT, WAIT.
            31..=33 => match r.below(7) {
                0 | 1 => mem(out, 0xd9, 5, CW_SLOT * 8),
                2 => {
                    let d = slot(r, 2);
                    mem(out, 0xd9, 7, d)
                }
                3 => {
                    let d = slot(r, 2);
                    mem(out, 0xdd, 7, d)
                }
                4 => out.extend_from_slice(&[0xdb, 0xe2]),
                5 if r.below(4) == 0 => out.extend_from_slice(&[0xdb, 0xe3]),
                _ => out.push(0x9b),
            },
            // Interpreted in the middle of a block: a transcendental, or FNSTENV.
            34 => {
                if r.below(3) == 0 {
                    out.extend_from_slice(&[0xd9, 0xb3]);
                    out.extend_from_slice(&ENV_AT.to_le_bytes());
                } else {
                    let b = [0xf0, 0xf1, 0xf2, 0xf3, 0xfe, 0xff][r.below(6) as usize];
                    out.extend_from_slice(&[0xd9, b]);
                }
            }
            // Integer memory instructions on the same slots (slow paths, TLB fills).
            35..=36 => {
                let d = slot(r, 4);
                let op = [0x8b, 0x01, 0x89][r.below(3) as usize];
                out.extend_from_slice(&[op, 0x43, d]);
            }
            // FISTP with the rounding control set to truncation around it.
            _ => {
                let d = slot(r, 4);
                mem(out, 0xd9, 7, 0x70);
                out.extend_from_slice(&[0xdb, 0x5b, d]);
                mem(out, 0xd9, 5, 0x70);
            }
        }
    }

    /// A random initial x87 state (tags, TOP, condition codes, sticky flags).
    fn random_fpu(cpu: &mut Cpu, r: &mut Rng, unmasked: bool) {
        let f = &mut cpu.s.fpu;
        // As FLDCW leaves it: reserved bits 7 and 13-15 clear, bit 6 set.
        f.cw = (control_word(r, unmasked) & 0x1f3f) | 0x40;
        f.set_sw((r.below(8) as u16) << 11 | (r.next() as u16 & (SW_CC_BITS | 0x3f)));
        for k in 0..8 {
            f.set_reg(k, f80_value(r));
        }
        f.tw = 0;
        for k in 0..8 {
            let t = if r.below(3) == 0 {
                TAG_EMPTY
            } else {
                morph86_cpu::fpu::tag_of(f.reg(k))
            };
            f.set_tag(k, t);
        }
        f.update_es();
        f.fip = r.next() as u32;
        f.fdp = r.next() as u32;
        f.fop = r.next() as u16 & 0x7ff;
    }

    const SW_CC_BITS: u16 = 0x4700;

    fn data_image(r: &mut Rng) -> Vec<u8> {
        let mut d = Vec::with_capacity(0x100);
        for _ in 0..15 {
            d.extend_from_slice(&mem_value(r)[..8]);
        }
        d.extend_from_slice(&0x037fu64.to_le_bytes());
        d.resize(0x100, 0);
        d
    }

    fn compare(j: &mut Cpu, i: &mut Cpu, code: &[u8]) -> Result<(), String> {
        let mut diffs = Vec::new();
        if j.s.fpu != i.s.fpu {
            diffs.push(format!(
                "fpu:\n  jit    {:x?}\n  interp {:x?}",
                j.s.fpu, i.s.fpu
            ));
        }
        for k in 0..8 {
            if j.s.gpr[k] as u32 != i.s.gpr[k] as u32 {
                diffs.push(format!("gpr{k}: {:x} vs {:x}", j.s.gpr[k], i.s.gpr[k]));
            }
        }
        if j.s.rip != i.s.rip {
            diffs.push(format!("eip: {:x} vs {:x}", j.s.rip, i.s.rip));
        }
        if (j.s.eflags() ^ i.s.eflags()) & ARITH_FLAGS != 0 {
            diffs.push(format!("eflags: {:x} vs {:x}", j.s.eflags(), i.s.eflags()));
        }
        let (mut a, mut b) = ([0u8; 0x100], [0u8; 0x100]);
        j.mmu.phys.read(DATA, &mut a);
        i.mmu.phys.read(DATA, &mut b);
        if a != b {
            diffs.push(format!("memory:\n  jit    {a:02x?}\n  interp {b:02x?}"));
        }
        if diffs.is_empty() {
            return Ok(());
        }
        let mut s = String::new();
        let mut d = Decoder::with_ip(32, code, CODE, DecoderOptions::NONE);
        let mut fmt = iced_x86::IntelFormatter::new();
        for ins in d.iter() {
            use iced_x86::Formatter;
            let mut t = String::new();
            fmt.format(&ins, &mut t);
            s.push_str(&format!("  {:08x} {t}\n", ins.ip32()));
        }
        Err(format!("{}\n{s}", diffs.join("\n")))
    }

    /// Runs `code` (HLT appended) from the same state under the JIT and under the
    /// interpreter and compares everything.
    fn run_case(
        code: &[u8],
        setup: &dyn Fn(&mut Cpu),
        jit: &mut Jit,
    ) -> Result<(Cpu, Cpu), String> {
        let mut code = code.to_vec();
        code.push(0xf4);
        let mut jcpu = machine();
        let mut icpu = machine();
        for cpu in [&mut jcpu, &mut icpu] {
            cpu.mmu.phys.write(CODE, &code);
            cpu.s.rip = CODE;
            setup(cpu);
        }
        jit.flush();
        let ej = jit.run(&mut jcpu, 100_000);
        let ei = icpu.run(100_000);
        if ej != ei {
            return Err(format!("events {ej:?} vs {ei:?}"));
        }
        compare(&mut jcpu, &mut icpu, &code)?;
        Ok((jcpu, icpu))
    }

    fn random_programs(seed: u64, cases: usize) {
        let mut r = Rng(seed);
        let mut jit = Jit::new(4 << 20).unwrap();
        for case in 0..cases {
            let mut code = Vec::new();
            let n = 1 + r.below(40);
            for _ in 0..n {
                random_x87(&mut r, &mut code);
            }
            let unmasked = r.below(10) == 0;
            let fpu_seed = r.next();
            let data = {
                let mut d = data_image(&mut r);
                let cw = control_word(&mut r, true);
                d[CW_SLOT as usize * 8..CW_SLOT as usize * 8 + 2]
                    .copy_from_slice(&cw.to_le_bytes());
                let tc = control_word(&mut r, false) | 0x0c00;
                d[0x70..0x72].copy_from_slice(&tc.to_le_bytes());
                d
            };
            let eflags = r.next() as u32 & ARITH_FLAGS;
            let setup = |cpu: &mut Cpu| {
                random_fpu(cpu, &mut Rng(fpu_seed | 1), unmasked);
                cpu.mmu.phys.write(DATA, &data);
                cpu.s.set_eflags(FLAG_1 | eflags);
            };
            if let Err(e) = run_case(&code, &setup, &mut jit) {
                // Report the shortest failing prefix (by instruction).
                let ends: Vec<usize> = Decoder::with_ip(32, &code, CODE, DecoderOptions::NONE)
                    .iter()
                    .map(|i| (i.next_ip() - CODE) as usize)
                    .collect();
                let short = ends
                    .iter()
                    .find_map(|&n| run_case(&code[..n], &setup, &mut jit).err());
                panic!(
                    "case {case} (seed {seed}): {e}\nshortest failing prefix: {}",
                    short.unwrap_or_default()
                );
            }
        }
        let st = jit.stats();
        assert!(
            st.native_insns > cases as u64,
            "the JIT ran x87 code natively: {st}"
        );
    }

    #[test]
    fn random_x87_programs_match_the_interpreter() {
        let n = std::env::var("JIT_FUZZ_CASES")
            .ok()
            .and_then(|v| v.parse().ok())
            .unwrap_or(3000);
        random_programs(0x87_0001, n);
    }

    /// The host's x87 never runs guest code while an exception is unmasked: a division
    /// by zero with ZE unmasked would trap the host (SIGFPE) if it did.
    #[test]
    fn unmasked_exceptions_stay_in_the_interpreter() {
        let mut jit = Jit::new(1 << 20).unwrap();
        // fld1; fldz; fdivp st1, st0; fnstsw ax; fstp st0
        let code = [0xd9, 0xe8, 0xd9, 0xee, 0xde, 0xf9, 0xdf, 0xe0, 0xdd, 0xd8];
        let setup = |cpu: &mut Cpu| cpu.s.fpu.cw = 0x037b; // ZE unmasked
        let (j, _) = run_case(&code, &setup, &mut jit).unwrap();
        assert_ne!(j.s.fpu.sw & SW_ES, 0, "the zero divide is pending");
        assert_eq!(j.s.gpr[0] as u16 & 0x04, 0x04, "ZE seen by FNSTSW");
        let st = jit.stats();
        assert!(st.in_block.contains_key(&Mnemonic::Fdivp), "{st}");
        // The same after a native FLDCW unmasks ZE in the middle of a block, with the
        // control word's page already in the TLB (the guard, not a TLB miss, sends the
        // FLDCW to the interpreter) and without (the slow path's check).
        for warm in [true, false] {
            let mut code = Vec::new();
            if warm {
                code.extend_from_slice(&[0x8b, 0x43, 0x00]); // mov eax, [ebx]
            }
            // fld1; fldz; fldcw [ebx+0x78]; fdivp st1, st0; fnstsw ax
            code.extend_from_slice(&[0xd9, 0xe8, 0xd9, 0xee, 0xd9, 0x6b, 0x78]);
            code.extend_from_slice(&[0xde, 0xf9, 0xdf, 0xe0]);
            let setup = |cpu: &mut Cpu| cpu.mmu.phys.write(DATA + 0x78, &0x037bu16.to_le_bytes());
            let (j, _) = run_case(&code, &setup, &mut jit).unwrap();
            assert_eq!(j.s.fpu.cw, 0x037b);
            assert_ne!(j.s.fpu.sw & SW_ES, 0);
        }
    }

    /// Paging on, with the page after the data slots (0x9000) not present, a GDT and an
    /// IDT whose every vector goes to a HLT at 0x30000.
    fn page_it(cpu: &mut Cpu) {
        const HANDLER: u32 = 0x30000;
        let gdt: [u64; 3] = [0, 0x00cf_9a00_0000_ffff, 0x00cf_9200_0000_ffff];
        for (k, d) in gdt.iter().enumerate() {
            cpu.mmu.phys.write(0x500 + 8 * k as u64, &d.to_le_bytes());
        }
        for v in 0..32u64 {
            let lo = (HANDLER & 0xffff) as u64 | (0x08 << 16);
            let hi = (HANDLER & 0xffff_0000) as u64 | 0x8e00;
            let gate = lo | hi << 32;
            cpu.mmu.phys.write(0x600 + 8 * v, &gate.to_le_bytes());
        }
        cpu.mmu.phys.write(HANDLER as u64, &[0xf4]);
        cpu.s.gdtr.base = 0x500;
        cpu.s.gdtr.limit = 23;
        cpu.s.idtr.base = 0x600;
        cpu.s.idtr.limit = 32 * 8 - 1;
        cpu.mmu.phys.write(0x1000, &(0x2000u32 | 3).to_le_bytes());
        for p in 0..1024u32 {
            let pte = if p == 9 { 0 } else { (p << 12) | 3 };
            cpu.mmu
                .phys
                .write(0x2000 + 4 * p as u64, &pte.to_le_bytes());
        }
        cpu.s.cr3 = 0x1000;
        cpu.s.cr0 |= CR0_PG;
        cpu.sync_paging();
    }

    /// Page faults in the middle of a block with the x87 state in the host: by an x87
    /// load, by an integer load (the state stays in the host across the slow path), by
    /// an x87 store across the page end. Each ends in the handler's HLT with the state
    /// the interpreter has.
    #[test]
    fn page_faults_with_live_x87_state_are_precise() {
        let mut jit = Jit::new(1 << 20).unwrap();
        // fld1; fld qword [ebx+0x10]; fmul st0, st1; fst dword [ebx+0x20]; <faulting>
        let head = [0xd9, 0xe8, 0xdd, 0x43, 0x10, 0xd8, 0xc9, 0xd9, 0x53, 0x20];
        let faulting: [&[u8]; 3] = [
            &[0xdd, 0x83, 0x00, 0x10, 0x00, 0x00], // fld qword [ebx+0x1000]
            &[0x8b, 0x83, 0x08, 0x10, 0x00, 0x00], // mov eax, [ebx+0x1008]
            &[0xdd, 0x93, 0xfc, 0x0f, 0x00, 0x00], // fst qword [ebx+0xffc]
        ];
        for f in faulting {
            let mut code = head.to_vec();
            code.extend_from_slice(f);
            code.extend_from_slice(&[0xd9, 0xe8]); // fld1 (not reached)
            let setup = |cpu: &mut Cpu| {
                page_it(cpu);
                cpu.mmu.phys.write(DATA + 0x10, &3.0f64.to_le_bytes());
            };
            let (j, _) = run_case(&code, &setup, &mut jit).unwrap();
            assert_eq!(j.s.rip, 0x30001, "in the #PF handler");
            assert_eq!(
                j.s.fpu.st(0),
                F80::new(false, 0x4000, 0xc000_0000_0000_0000)
            );
            assert_eq!(j.s.fpu.fip, 0x10007, "FIP: the FST before the fault");
            assert_eq!(j.s.fpu.fdp, DATA as u32 + 0x20, "FDP: the FST's operand");
        }
    }

    /// FNSTENV after native code stores the guest's FIP, FOP and FDP, not the host's.
    #[test]
    fn fnstenv_after_native_code_sees_guest_pointers() {
        let mut jit = Jit::new(1 << 20).unwrap();
        // 10000: fld qword [ebx+8]     (DD 43 08)
        // 10003: fmul dword [ebx+0x10] (D8 4B 10)
        // 10006: fxch st1              (D9 C9)  last numeric instruction, no operand
        // 10008: fnstenv [ebx+0x80]    (D9 B3 80 00 00 00)
        let code = [
            0xdd, 0x43, 0x08, 0xd8, 0x4b, 0x10, 0xd9, 0xc9, 0xd9, 0xb3, 0x80, 0, 0, 0,
        ];
        let setup = |cpu: &mut Cpu| {
            cpu.mmu.phys.write(DATA + 8, &2.5f64.to_le_bytes());
            cpu.mmu.phys.write(DATA + 0x10, &4.0f32.to_le_bytes());
        };
        let (mut j, _) = run_case(&code, &setup, &mut jit).unwrap();
        let mut env = [0u8; 28];
        j.mmu.phys.read(DATA + 0x80, &mut env);
        let dw = |k: usize| u32::from_le_bytes(env[4 * k..4 * k + 4].try_into().unwrap());
        assert_eq!(dw(3), 0x10006, "FIP: the FXCH");
        assert_eq!(dw(4) & 0xffff, 0x08, "FCS");
        assert_eq!(dw(4) >> 16, 0x1c9, "FOP of FXCH (D9 C9)");
        assert_eq!(dw(5), DATA as u32 + 0x10, "FDP: the FMUL's operand");
        assert_eq!(dw(6) & 0xffff, 0x10, "FDS");
        assert_eq!(
            j.s.fpu.st(1),
            F80::new(false, 0x3fff + 3, 0xa000_0000_0000_0000)
        );
        assert!(jit.stats().native_insns >= 3);
    }

    fn dec(bytes: &[u8]) -> Instruction {
        Decoder::with_ip(32, bytes, 0x1000, DecoderOptions::NONE).decode()
    }

    #[test]
    fn fop_skips_prefixes() {
        // fadd st0, st1 = D8 C1 → FOP 0x0C1
        assert_eq!(fop_of(&[0xd8, 0xc1]), 0x0c1);
        // fld qword [ebx] with a DS prefix: 3E DD 03 → 0x503
        assert_eq!(fop_of(&[0x3e, 0xdd, 0x03]), 0x503);
        assert_eq!(fop_of(&[0x90, 0x90]), 0);
    }

    #[test]
    fn planning_needs_the_mode_and_keeps_the_unsafe_ones_out() {
        let fsin = [0xd9, 0xfe];
        let fadd = [0xd8, 0xc1];
        assert!(
            plan(&dec(&fadd), &fadd, 0).is_none(),
            "not without PLAN_X87"
        );
        assert!(matches!(
            plan(&dec(&fadd), &fadd, PLAN_X87),
            Some((Kind::Reg, _))
        ));
        assert!(
            plan(&dec(&fsin), &fsin, PLAN_X87).is_none(),
            "transcendental"
        );
        // fisttp dword [eax] (DB /1) is #UD on the emulated CPU.
        let fisttp = [0xdb, 0x08];
        assert!(plan(&dec(&fisttp), &fisttp, PLAN_X87).is_none());
        // fldenv [eax], fnstenv [eax], fnsave [eax]: interpreter.
        for b in [[0xd9, 0x20], [0xd9, 0x30], [0xdd, 0x30]] {
            assert!(plan(&dec(&b), &b, PLAN_X87).is_none(), "{b:x?}");
        }
        // fld qword fs:[eax]: FS overrides stay interpreted.
        let fs = [0x64, 0xdd, 0x00];
        assert!(plan(&dec(&fs), &fs, PLAN_X87).is_none());
        // fld tbyte [ebx+ecx*8+4]: 10-byte read.
        let b = [0xdb, 0x6c, 0xcb, 0x04];
        match plan(&dec(&b), &b, PLAN_X87) {
            Some((Kind::Mem { size, write, .. }, _)) => {
                assert_eq!((size, write), (10, false));
            }
            _ => panic!("fld m80 not planned"),
        }
        // fistp qword [esp]: 8-byte write.
        let b = [0xdf, 0x3c, 0x24];
        match plan(&dec(&b), &b, PLAN_X87) {
            Some((Kind::Mem { size, write, .. }, _)) => {
                assert_eq!((size, write), (8, true));
            }
            _ => panic!("fistp m64 not planned"),
        }
    }

    #[test]
    fn host_code_is_the_instruction_then_the_pointer_stores() {
        // fmul qword [ebx] (DC 0B) → fmul qword [r13] (41 DC 4D 00) first.
        let b = [0xdc, 0x0b];
        let (_, host) = plan(&dec(&b), &b, PLAN_X87).unwrap();
        assert_eq!(&host[..4], &[0x41, 0xdc, 0x4d, 0x00]);
        // fnstsw ax: just DF E0 (a control instruction: no pointer stores).
        let b = [0xdf, 0xe0];
        let (_, host) = plan(&dec(&b), &b, PLAN_X87).unwrap();
        assert_eq!(host, vec![0xdf, 0xe0]);
        // fstsw ax (9B DF E0) decodes as WAIT, then FNSTSW AX: the WAIT is no code.
        let b = [0x9b, 0xdf, 0xe0];
        assert_eq!(dec(&b).mnemonic(), Mnemonic::Wait);
        let (kind, host) = plan(&dec(&b), &b, PLAN_X87).unwrap();
        assert!(kind == Kind::Reg && host.is_empty());
    }

    #[test]
    fn calls_keep_the_host_state_only_for_instructions_without_x87_state() {
        for (b, t) in [
            (&[0xd8, 0xc1][..], true),              // fadd st0, st1
            (&[0xd9, 0xfe][..], true),              // fsin
            (&[0x9b][..], true),                    // wait
            (&[0x0f, 0xae, 0x00][..], true),        // fxsave [eax]
            (&[0x0f, 0x77][..], true),              // emms
            (&[0x0f, 0x6f, 0xc1][..], true),        // movq mm0, mm1
            (&[0x8b, 0x03][..], false),             // mov eax, [ebx]
            (&[0xff, 0x33][..], false),             // push dword [ebx]
            (&[0xf3, 0xa4][..], false),             // rep movsb
            (&[0x66, 0x0f, 0x6f, 0xc1][..], false), // movdqa xmm0, xmm1
        ] {
            assert_eq!(touches_fpu(&dec(b)), t, "{b:x?}");
        }
    }

    #[test]
    fn mode_requires_masked_exceptions_and_no_em_ts() {
        let mut s = CpuState::default();
        assert!(native_ok(&s));
        s.fpu.cw = 0x037e; // IM unmasked
        assert!(!native_ok(&s));
        s.fpu.cw = 0x037f;
        s.cr0 |= CR0_TS;
        assert!(!native_ok(&s));
        s.cr0 &= !CR0_TS;
        s.fpu.sw |= SW_ES;
        assert!(!native_ok(&s));
    }
}
