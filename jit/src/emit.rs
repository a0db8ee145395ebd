//! Emit stage: the host calling convention, the entry/exit trampoline and block code.
//!
//! Host register use while guest code runs (chained blocks included):
//!
//! | host | holds |
//! |---|---|
//! | rax, rcx, rdx, rbx, rbp, rsi, rdi | guest EAX, ECX, EDX, EBX, EBP, ESI, EDI |
//! | r8 | guest ESP (the host keeps rsp) |
//! | r15 | `*mut CpuState` |
//! | r12 | `*mut JitCtx` |
//! | r13, r14 | scratch |
//! | EFLAGS (arithmetic bits) | guest CF PF AF ZF SF OF |
//!
//! The trampoline loads all of that from `CpuState` once, jumps to the block, and the
//! shared exit path stores it back: guest registers are in host registers for as long
//! as execution stays in chained blocks, and guest flags are spilled only at that exit
//! (nothing inside a block clobbers host flags: the block-entry budget check uses
//! `jrcxz`/`lea`, which leave EFLAGS alone).
//!
//! Block layout:
//! ```text
//! out:    mov rcx, r14 ; jmp reentry          (budget exhausted)
//! entry:  mov r14, rcx ; mov ecx, [r12+budget] ; jrcxz out
//!         lea ecx, [rcx-1] ; mov [r12+budget], ecx ; mov rcx, r14
//!         mov r14, [r12+icount] ; lea r14, [r14+n] ; mov [r12+icount], r14
//!         <native guest instructions>
//!         <terminator: jcc taken ; stub(next) ; taken: stub(target)>
//! stub:   mov dword [r15+rip], eip ; mov qword [r12+exit], id ; jmp exit   (patchable)
//! reentry: stub(block eip) with id = NO_CHAIN
//! ```
//! Chaining overwrites a stub's first 5 bytes with `jmp rel32` to the target's entry;
//! invalidation overwrites a block's entry with `jmp rel32` to its own reentry stub.

use crate::translate::{BlockPlan, Term};
use dynasmrt::x64::X64Relocation;
use dynasmrt::{dynasm, DynamicLabel, DynasmApi, DynasmLabelApi, VecAssembler};
use morph86_cpu::state::ARITH_FLAGS;
use morph86_cpu::CpuState;
use std::mem::offset_of;

/// Exit id meaning "no stub to chain": the dispatcher just looks the next block up.
pub const NO_CHAIN: u64 = u64::MAX;

/// Dispatcher ↔ host code communication block (pointed to by r12).
#[repr(C)]
#[derive(Debug, Default)]
pub struct JitCtx {
    /// Blocks that may still be entered before returning to the dispatcher; 0 stops at
    /// the next block entry (stop requests store 0).
    pub budget: u32,
    /// Padding.
    pub _pad: u32,
    /// Guest instructions retired by host code since the dispatcher last cleared it.
    pub icount: u64,
    /// Id of the stub that left host code ([`NO_CHAIN`] if none).
    pub exit: u64,
}

const OFF_BUDGET: i32 = offset_of!(JitCtx, budget) as i32;
const OFF_ICOUNT: i32 = offset_of!(JitCtx, icount) as i32;
const OFF_EXIT: i32 = offset_of!(JitCtx, exit) as i32;
const OFF_GPR: i32 = offset_of!(CpuState, gpr) as i32;
const OFF_RIP: i32 = offset_of!(CpuState, rip) as i32;
const OFF_EFLAGS: i32 = offset_of!(CpuState, eflags_raw) as i32;
/// EFLAGS bit 1, always set.
const FLAGS_FIXED: i32 = 0b10;

/// Host register number holding guest register `g` (0-7).
pub fn host_of(g: u8) -> u8 {
    if g == 4 {
        8
    } else {
        g
    }
}

/// Signature of the entry trampoline.
pub type EnterFn = unsafe extern "sysv64" fn(*mut CpuState, *mut JitCtx, usize);

/// Assembles the entry/exit trampoline for base address `base`. Returns the code and the
/// offset of the shared exit path.
pub fn trampoline(base: usize) -> (Vec<u8>, usize) {
    let mut ops: VecAssembler<X64Relocation> = VecAssembler::new(base);
    let exit = ops.new_dynamic_label();
    let g = |r: i32| OFF_GPR + 8 * r;
    dynasm!(ops
        ; .arch x64
        ; push rbx
        ; push rbp
        ; push r12
        ; push r13
        ; push r14
        ; push r15
        ; sub rsp, 8
        ; mov r15, rdi
        ; mov r12, rsi
        ; mov r13, rdx
        // Guest arithmetic flags into host EFLAGS (DF, TF, AC stay 0 on the host).
        ; mov eax, DWORD [r15 + OFF_EFLAGS]
        ; and eax, ARITH_FLAGS as i32
        ; or eax, FLAGS_FIXED
        ; push rax
        ; popfq
        ; mov rax, QWORD [r15 + g(0)]
        ; mov rcx, QWORD [r15 + g(1)]
        ; mov rdx, QWORD [r15 + g(2)]
        ; mov rbx, QWORD [r15 + g(3)]
        ; mov r8, QWORD [r15 + g(4)]
        ; mov rbp, QWORD [r15 + g(5)]
        ; mov rsi, QWORD [r15 + g(6)]
        ; mov rdi, QWORD [r15 + g(7)]
        ; jmp r13
        ; =>exit
        ; mov QWORD [r15 + g(0)], rax
        ; mov QWORD [r15 + g(1)], rcx
        ; mov QWORD [r15 + g(2)], rdx
        ; mov QWORD [r15 + g(3)], rbx
        ; mov QWORD [r15 + g(4)], r8
        ; mov QWORD [r15 + g(5)], rbp
        ; mov QWORD [r15 + g(6)], rsi
        ; mov QWORD [r15 + g(7)], rdi
        ; mov DWORD [r15 + OFF_RIP + 4], 0
        ; pushfq
        ; pop rax
        ; and eax, ARITH_FLAGS as i32
        ; mov ecx, DWORD [r15 + OFF_EFLAGS]
        ; and ecx, !ARITH_FLAGS as i32
        ; or ecx, eax
        ; mov DWORD [r15 + OFF_EFLAGS], ecx
        ; add rsp, 8
        ; pop r15
        ; pop r14
        ; pop r13
        ; pop r12
        ; pop rbp
        ; pop rbx
        ; ret
    );
    let exit_off = ops.labels().resolve_dynamic(exit).map(|o| o.0).unwrap_or(0);
    let code = ops.finalize().unwrap_or_default();
    (code, exit_off)
}

/// Where an exit stub goes.
#[derive(Debug, Clone, Copy)]
pub struct StubReq {
    /// Guest EIP it continues at.
    pub target: u32,
    /// Stub id stored into `JitCtx::exit` ([`NO_CHAIN`] for an unchainable exit).
    pub id: u64,
}

/// An assembled block, not yet placed.
pub struct Emitted {
    /// Machine code, assembled for the address it was given.
    pub code: Vec<u8>,
    /// Offset of the entry point.
    pub entry: usize,
    /// Offset of the reentry stub (target of the invalidation patch).
    pub reentry: usize,
    /// Offsets of the exit stubs, in the order of the requests.
    pub stubs: Vec<usize>,
    /// Per guest instruction: host code range `[start, end)` (offsets).
    pub ranges: Vec<(usize, usize)>,
}

fn emit_stub(
    ops: &mut VecAssembler<X64Relocation>,
    base: usize,
    target: u32,
    id: u64,
    exit_addr: usize,
) {
    dynasm!(ops
        ; .arch x64
        ; mov DWORD [r15 + OFF_RIP], target as i32
        ; mov QWORD [r12 + OFF_EXIT], id as i32
    );
    jmp_abs(ops, base, exit_addr);
}

/// `jmp rel32` to an absolute host address outside the assembler's buffer (the buffer's
/// base address is final, so the displacement is known now).
fn jmp_abs(ops: &mut VecAssembler<X64Relocation>, base: usize, to: usize) {
    let at = base + ops.offset().0;
    let b = jmp_rel32(at, to).unwrap_or([0xcc; 5]);
    ops.extend(b.iter());
}

fn emit_jcc(ops: &mut VecAssembler<X64Relocation>, cc: u8, l: DynamicLabel) {
    match cc & 15 {
        0 => dynasm!(ops ; .arch x64 ; jo =>l),
        1 => dynasm!(ops ; .arch x64 ; jno =>l),
        2 => dynasm!(ops ; .arch x64 ; jb =>l),
        3 => dynasm!(ops ; .arch x64 ; jae =>l),
        4 => dynasm!(ops ; .arch x64 ; je =>l),
        5 => dynasm!(ops ; .arch x64 ; jne =>l),
        6 => dynasm!(ops ; .arch x64 ; jbe =>l),
        7 => dynasm!(ops ; .arch x64 ; ja =>l),
        8 => dynasm!(ops ; .arch x64 ; js =>l),
        9 => dynasm!(ops ; .arch x64 ; jns =>l),
        10 => dynasm!(ops ; .arch x64 ; jp =>l),
        11 => dynasm!(ops ; .arch x64 ; jnp =>l),
        12 => dynasm!(ops ; .arch x64 ; jl =>l),
        13 => dynasm!(ops ; .arch x64 ; jge =>l),
        14 => dynasm!(ops ; .arch x64 ; jle =>l),
        _ => dynasm!(ops ; .arch x64 ; jg =>l),
    }
}

/// Assembles `plan` for host address `base`. `stubs` gives, for the terminator's exits
/// in order (fall-through or taken for JMP; not-taken then taken for Jcc; none for JMP
/// reg), the stub ids; `exit_addr` is the trampoline's exit path.
pub fn emit_block(
    plan: &BlockPlan,
    base: usize,
    stub_ids: &[u64],
    exit_addr: usize,
) -> Option<Emitted> {
    let mut ops: VecAssembler<X64Relocation> = VecAssembler::new(base);
    let out = ops.new_dynamic_label();
    let reentry = ops.new_dynamic_label();
    let n = plan.insn_count() as i32;
    dynasm!(ops
        ; .arch x64
        ; =>out
        ; mov rcx, r14
        ; jmp =>reentry
    );
    let entry = ops.offset().0;
    dynasm!(ops
        ; .arch x64
        ; mov r14, rcx
        ; mov ecx, DWORD [r12 + OFF_BUDGET]
        ; jrcxz =>out
        ; lea ecx, [rcx - 1]
        ; mov DWORD [r12 + OFF_BUDGET], ecx
        ; mov rcx, r14
        ; mov r14, QWORD [r12 + OFF_ICOUNT]
        ; lea r14, [r14 + n]
        ; mov QWORD [r12 + OFF_ICOUNT], r14
    );
    let mut ranges = Vec::with_capacity(plan.insns.len());
    for g in &plan.insns {
        let start = ops.offset().0;
        ops.extend(g.host.iter());
        ranges.push((start, ops.offset().0));
    }
    let mut stubs = Vec::new();
    let term_start = ops.offset().0;
    match plan.term {
        Term::Fall { next, .. } => {
            stubs.push(ops.offset().0);
            emit_stub(&mut ops, base, next, *stub_ids.first()?, exit_addr);
        }
        Term::Jmp { target } => {
            stubs.push(ops.offset().0);
            emit_stub(&mut ops, base, target, *stub_ids.first()?, exit_addr);
        }
        Term::Jcc { cc, target, next } => {
            let taken = ops.new_dynamic_label();
            emit_jcc(&mut ops, cc, taken);
            stubs.push(ops.offset().0);
            emit_stub(&mut ops, base, next, *stub_ids.first()?, exit_addr);
            dynasm!(ops ; .arch x64 ; =>taken);
            stubs.push(ops.offset().0);
            emit_stub(&mut ops, base, target, *stub_ids.get(1)?, exit_addr);
        }
        Term::JmpReg { reg } => {
            let h = host_of(reg);
            dynasm!(ops
                ; .arch x64
                ; mov DWORD [r15 + OFF_RIP], Rd(h)
                ; mov QWORD [r12 + OFF_EXIT], NO_CHAIN as i32
            );
            jmp_abs(&mut ops, base, exit_addr);
        }
    }
    if matches!(
        plan.term,
        Term::Jmp { .. } | Term::Jcc { .. } | Term::JmpReg { .. }
    ) {
        if let Some(last) = ranges.last_mut() {
            *last = (term_start, ops.offset().0);
        }
    }
    dynasm!(ops ; .arch x64 ; =>reentry);
    let reentry_off = ops.offset().0;
    emit_stub(&mut ops, base, plan.eip, NO_CHAIN, exit_addr);
    let code = ops.finalize().ok()?;
    Some(Emitted {
        code,
        entry,
        reentry: reentry_off,
        stubs,
        ranges,
    })
}

/// `jmp rel32` from host address `at` to `to` (5 bytes), or `None` if out of range.
pub fn jmp_rel32(at: usize, to: usize) -> Option<[u8; 5]> {
    let rel = (to as i64).wrapping_sub(at as i64 + 5);
    let rel = i32::try_from(rel).ok()?;
    let b = rel.to_le_bytes();
    Some([0xe9, b[0], b[1], b[2], b[3]])
}
