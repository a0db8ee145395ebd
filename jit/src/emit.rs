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
//! | r13 | linear, then host address of the current memory operand |
//! | r9 | copy of the guest flags (LAHF image in AH, OF in AL) around TLB probes |
//! | r10, r11 | scratch (probe, loaded branch target, instruction count) |
//! | r14 | block budget + 1 (`JitCtx::budget` is loaded at entry, stored at exit) |
//! | EFLAGS (arithmetic bits) | guest CF PF AF ZF SF OF |
//!
//! Flag discipline inside a block: the emitter tracks whether host EFLAGS and/or r9
//! hold the guest flags. A memory access (or DIV guard) saves them to r9 first unless
//! r9 is current, because its probe clobbers EFLAGS and its slow path needs the exact
//! flags for a precise fault. An instruction that reads flags, or writes only some,
//! gets them restored from r9 first; one that writes all six does not. Exits restore.
//!
//! The trampoline loads all of that from `CpuState` once, jumps to the block, and the
//! shared exit path stores it back: guest registers are in host registers for as long
//! as execution stays in chained blocks, and guest flags are spilled only at that exit
//! or a slow path (the block-entry budget check uses `xchg`/`loop`/`lea`, which leave
//! EFLAGS alone).
//!
//! Block layout:
//! ```text
//! out:    xchg rcx, r14 ; mov r14d, 1 ; jmp reentry     (budget exhausted)
//! entry:  xchg rcx, r14 ; loop cont ; jmp out
//! cont:   xchg rcx, r14
//!         mov r11, [r12+icount] ; lea r11, [r11+n] ; mov [r12+icount], r11
//!         <native guest instructions>
//!         <terminator: jcc taken ; stub(next) ; taken: stub(target)>
//! stub:   mov dword [r15+rip], eip ; mov qword [r12+exit], id ; jmp exit   (patchable)
//! reentry: stub(block eip) with id = NO_CHAIN
//! ```
//! Chaining overwrites a stub's first 5 bytes with `jmp rel32` to the target's entry;
//! invalidation overwrites a block's entry with `jmp rel32` to its own reentry stub.

use crate::translate::{count_dependent, rflags_to_eflags, BlockPlan, Kind, Term};
use dynasmrt::x64::X64Relocation;
use dynasmrt::{dynasm, DynamicLabel, DynasmApi, DynasmLabelApi, VecAssembler};
use iced_x86::{Instruction, OpKind};
use morph86_cpu::state::{ARITH_FLAGS, IF};
use morph86_cpu::{Cpu, CpuState, Exception};
use morph86_mmu::tlb::TLB_SIZE;
use morph86_mmu::TlbEntry;
use std::mem::offset_of;

/// Exit id meaning "no stub to chain": the dispatcher just looks the next block up.
pub const NO_CHAIN: u64 = u64::MAX;
/// Exit id of an indirect branch (RET, JMP reg) that missed the inline lookup: the
/// dispatcher records the target it finds in the indirect-branch table.
pub const IND_MISS: u64 = u64::MAX - 1;
/// Stub id asking for an exit through the inline lookup (a direct branch to another
/// page: it cannot be chained by patching, since the page's mapping may change).
pub const IND_LOOKUP: u64 = u64::MAX - 2;
/// Entries of the indirect-branch table (direct-mapped by physical address).
pub const IND_SIZE: usize = 8192;

/// Slot of the indirect-branch table for physical address `phys` (the host code's
/// inline lookup computes the same: page offset mixed with the page number).
pub fn ind_index(phys: u64) -> usize {
    ((phys ^ (phys >> 12)) as usize) & (IND_SIZE - 1)
}

/// Dispatcher ↔ host code communication block (pointed to by r12).
#[repr(C)]
#[derive(Debug)]
pub struct JitCtx {
    /// Blocks that may still be entered before returning to the dispatcher; 0 stops at
    /// the next block entry (stop requests store 0).
    pub budget: u32,
    /// Argument of the slow path and the in-block interpreter call: the number of block
    /// instructions not retired if this one leaves (set by block code before the call).
    pub arg: u32,
    /// Guest instructions retired by host code since the dispatcher last cleared it.
    pub icount: u64,
    /// Id of the stub that left host code ([`NO_CHAIN`] if none).
    pub exit: u64,
    /// Base of the TLB entry array (`Tlb::entries_ptr`).
    pub tlb: u64,
    /// PDEP mask of the flag-free probe: deposits a page number's TLB index bits
    /// where they select a [`TlbEntry`] (index times the entry size).
    pub idx_mask: u64,
    /// PDEP mask of the flag-free probe: deposits a page number as a page address.
    pub page_mask: u64,
    /// The CPU, for the slow path.
    pub cpu: *mut Cpu,
    /// An exception raised in a slow path (delivered by the dispatcher).
    pub exception: Option<Exception>,
    /// Code pages written by slow-path instructions (invalidated by the dispatcher).
    pub dirty: Vec<u64>,
    /// Host address of guest physical address 0 (guest RAM base).
    pub ram_base: u64,
    /// Slow-path calls since the dispatcher last took the count.
    pub slow_calls: u64,
    /// The indirect-branch table: `IND_SIZE` entries (key, linear EIP, host entry,
    /// padding), key = `phys | mode << 56`, indexed by [`ind_index`].
    pub ind: u64,
    /// Mode bits of the blocks being run (all chained blocks share them).
    pub mode: u8,
    /// `PhysMem::epoch` when host code was entered.
    pub epoch: u64,
    /// In-block interpreter calls ([`jit_interp`]) by mnemonic (indexed by
    /// `Mnemonic as usize`).
    pub interp_calls: Vec<u64>,
    /// In-block interpreter calls that left the block (fault, branch, mode change).
    pub interp_exits: u64,
    /// Scratch word of block code (PUSH m32 keeps the loaded value here across the
    /// push's probe).
    pub scratch: u64,
    /// Native REP STOS/MOVS: iterations left in this execution (pass 2).
    pub rep_left: u32,
    /// Native REP STOS/MOVS: iterations not yet covered by pass 1's page probes.
    pub rep_todo: u32,
    /// Native REP STOS/MOVS: EDI of the page being probed or copied.
    pub rep_dcur: u32,
    /// Native REP MOVS: ESI of the page being probed or copied.
    pub rep_scur: u32,
    /// Native REP MOVS: ECX after the current chunk.
    pub rep_ecx: u32,
    /// Native REP MOVS: ESI after the current chunk.
    pub rep_esi: u32,
    /// Native REP MOVS: host address of the current chunk's source.
    pub rep_src: u64,
}

impl Default for JitCtx {
    fn default() -> Self {
        JitCtx {
            budget: 0,
            arg: 0,
            icount: 0,
            exit: NO_CHAIN,
            tlb: 0,
            cpu: std::ptr::null_mut(),
            exception: None,
            dirty: Vec::new(),
            ram_base: 0,
            slow_calls: 0,
            ind: 0,
            mode: 0,
            epoch: 0,
            interp_calls: vec![0; iced_x86::Mnemonic::values().count()],
            interp_exits: 0,
            scratch: 0,
            idx_mask: ((TLB_SIZE - 1) << TLB_ENTRY_SHIFT) as u64,
            page_mask: morph86_mmu::tlb::PAGE_MASK,
            rep_left: 0,
            rep_todo: 0,
            rep_dcur: 0,
            rep_scur: 0,
            rep_ecx: 0,
            rep_esi: 0,
            rep_src: 0,
        }
    }
}

/// The slow path of a memory access: runs the instruction at `cpu.s.rip` in the
/// interpreter. `not_retired` is the number of block instructions (counted at block
/// entry) from this one to the block end. Returns 0 to continue in the block, 1 to leave
/// it (an exception, stored in `ctx.exception`, with EIP at the instruction; or a write
/// to a code page, with EIP after it).
///
/// # Safety
/// `ctx` must point to a live `JitCtx` whose `cpu` points to a live `Cpu`, neither
/// otherwise accessed during the call (the host code that calls this holds no reference
/// into them across the call: it spilled the guest state to `CpuState` first).
pub unsafe extern "sysv64" fn jit_slow(ctx: *mut JitCtx, not_retired: u32) -> u32 {
    // SAFETY: per the function contract.
    let ctx = unsafe { &mut *ctx };
    // SAFETY: per the function contract.
    let cpu = unsafe { &mut *ctx.cpu };
    ctx.slow_calls += 1;
    // The interpreter's fetch would consume pending code-write notices: keep them.
    if cpu.mmu.phys.has_dirty_code() {
        ctx.dirty.extend(cpu.take_dirty_code());
    }
    let counted = cpu.stats.instructions;
    let r = cpu.try_step();
    cpu.s.materialize_flags();
    match r {
        Ok(()) => {
            // The block counted this instruction at entry.
            cpu.stats.instructions = counted;
            if cpu.mmu.phys.has_dirty_code() {
                ctx.dirty.extend(cpu.take_dirty_code());
                ctx.icount = ctx.icount.saturating_sub(not_retired as u64 - 1);
                return 1;
            }
            0
        }
        Err(e) => {
            ctx.exception = Some(e);
            ctx.icount = ctx.icount.saturating_sub(not_retired as u64);
            1
        }
    }
}

/// Runs one untranslated instruction of a block in the interpreter: `insn`, decoded at
/// translation time from the bytes at `cpu.s.rip` (stored by the caller). Returns 0 to
/// continue in the block (it retired, fell through to the next instruction and changed
/// nothing the block depends on: mode bits, interrupt flag off→on, the physical map,
/// code pages), 1 to leave it: an exception (stored in `ctx.exception`, EIP at the
/// instruction) or any of those changes (EIP wherever the instruction left it, a REP
/// instruction that is not finished included). `not_retired` is as for [`jit_slow`],
/// with `INTERP_BRANCH` set when the instruction is the block's terminating branch.
///
/// With a null `insn` the interpreter fetches and decodes the instruction itself (one
/// cut by the end of its page, see [`Kind::Step`]).
///
/// # Safety
/// As [`jit_slow`]; `insn` must be null or point to a live `Instruction` (the block
/// keeps it).
pub unsafe extern "sysv64" fn jit_interp(
    ctx: *mut JitCtx,
    not_retired: u32,
    insn: *const Instruction,
) -> u32 {
    // SAFETY: per the function contract.
    let ctx = unsafe { &mut *ctx };
    // SAFETY: per the function contract.
    let cpu = unsafe { &mut *ctx.cpu };
    // SAFETY: per the function contract (null: fetch and decode at EIP).
    let decoded = unsafe { insn.as_ref() };
    let mnemonic = decoded.map_or(iced_x86::Mnemonic::INVALID, |i| i.mnemonic());
    if let Some(c) = ctx.interp_calls.get_mut(mnemonic as usize) {
        *c += 1;
    }
    if cpu.mmu.phys.has_dirty_code() {
        ctx.dirty.extend(cpu.take_dirty_code());
    }
    let branch = not_retired & INTERP_BRANCH != 0;
    let not_retired = not_retired & !INTERP_BRANCH;
    let counted = cpu.stats.instructions;
    let if_before = cpu.s.eflags_raw & IF;
    let r = match decoded {
        Some(i) => cpu.exec_decoded(i),
        None => cpu.try_step(),
    };
    cpu.s.materialize_flags();
    match r {
        Ok(()) => {
            // The block counted this instruction at entry.
            cpu.stats.instructions = counted;
            let stay = (branch || decoded.is_some_and(|i| cpu.s.rip == i.next_ip32() as u64))
                && !cpu.mmu.phys.has_dirty_code()
                && cpu.s.eflags_raw & IF <= if_before
                && cpu.mmu.phys.epoch() == ctx.epoch
                && (decoded.is_some_and(crate::translate::keeps_mode)
                    || crate::mode_bits(&cpu.s) == Some(ctx.mode));
            if stay {
                return 0;
            }
            if cpu.mmu.phys.has_dirty_code() {
                ctx.dirty.extend(cpu.take_dirty_code());
            }
            ctx.interp_exits += 1;
            ctx.icount = ctx.icount.saturating_sub(not_retired as u64 - 1);
            1
        }
        Err(e) => {
            ctx.exception = Some(e);
            ctx.interp_exits += 1;
            ctx.icount = ctx.icount.saturating_sub(not_retired as u64);
            1
        }
    }
}

/// Flag in `jit_interp`'s `not_retired` argument: the instruction ends its block
/// ([`Term::InterpBranch`]), so a change of EIP is expected, not a reason to leave.
const INTERP_BRANCH: u32 = 1 << 31;

const OFF_BUDGET: i32 = offset_of!(JitCtx, budget) as i32;
const OFF_ARG: i32 = offset_of!(JitCtx, arg) as i32;
const OFF_SCRATCH: i32 = offset_of!(JitCtx, scratch) as i32;
const OFF_ICOUNT: i32 = offset_of!(JitCtx, icount) as i32;
const OFF_EXIT: i32 = offset_of!(JitCtx, exit) as i32;
const OFF_TLB: i32 = offset_of!(JitCtx, tlb) as i32;
const OFF_RAM: i32 = offset_of!(JitCtx, ram_base) as i32;
const OFF_IND: i32 = offset_of!(JitCtx, ind) as i32;
const OFF_IDX_MASK: i32 = offset_of!(JitCtx, idx_mask) as i32;
const OFF_PAGE_MASK: i32 = offset_of!(JitCtx, page_mask) as i32;
const OFF_REP_LEFT: i32 = offset_of!(JitCtx, rep_left) as i32;
const OFF_REP_TODO: i32 = offset_of!(JitCtx, rep_todo) as i32;
const OFF_REP_DCUR: i32 = offset_of!(JitCtx, rep_dcur) as i32;
const OFF_REP_SCUR: i32 = offset_of!(JitCtx, rep_scur) as i32;
const OFF_REP_ECX: i32 = offset_of!(JitCtx, rep_ecx) as i32;
const OFF_REP_ESI: i32 = offset_of!(JitCtx, rep_esi) as i32;
const OFF_REP_SRC: i32 = offset_of!(JitCtx, rep_src) as i32;
/// Iterations of one native REP STOS/MOVS execution before it leaves the block with
/// EIP at the instruction: the interpreter's `REP_CHUNK` (cpu/src/interp/string.rs),
/// so both engines stop at the same point (lock-step compares them).
const REP_CHUNK: i32 = 4096;
/// EFLAGS.DF (bit 10) within the second byte of `eflags_raw`.
const DF_IN_BYTE1: i8 = 1 << 2;
const TLB_TAG_FETCH: i32 = TlbEntry::OFFSET_FETCH as i32;
const TLB_TAG_READ: i32 = TlbEntry::OFFSET_READ as i32;
const TLB_TAG_WRITE: i32 = TlbEntry::OFFSET_WRITE as i32;
const TLB_ADDEND: i32 = TlbEntry::OFFSET_ADDEND as i32;
/// log2 of the TLB entry size (the probe scales the index with a shift).
const TLB_ENTRY_SHIFT: i8 = 5;
const _: () = assert!(std::mem::size_of::<TlbEntry>() == 1 << TLB_ENTRY_SHIFT);
/// Byte offset of the user set in the TLB array.
pub const TLB_USER_SET: i32 = (TLB_SIZE * std::mem::size_of::<TlbEntry>()) as i32;
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

/// Offsets inside the trampoline.
pub struct TrampolineOffsets {
    /// The shared exit path.
    pub exit: usize,
    /// The shared slow path (spill, call [`jit_slow`], reload).
    pub slow: usize,
    /// The in-block interpreter call (spill, call [`jit_interp`] with the instruction
    /// pointer from r11, reload).
    pub interp: usize,
}

/// Byte offset of guest register `r` in `CpuState`.
const fn off_gpr(r: i32) -> i32 {
    OFF_GPR + 8 * r
}

/// Stores the guest state held in host registers into `CpuState`: the eight GPRs and
/// the arithmetic flags from host EFLAGS (merged into `eflags_raw`). Clobbers r10, r13
/// and host flags. The one spill sequence of the exit path, the slow path and the
/// in-block interpreter call.
fn store_guest(ops: &mut Asm) {
    dynasm!(ops
        ; .arch x64
        ; mov QWORD [r15 + off_gpr(0)], rax
        ; mov QWORD [r15 + off_gpr(1)], rcx
        ; mov QWORD [r15 + off_gpr(2)], rdx
        ; mov QWORD [r15 + off_gpr(3)], rbx
        ; mov QWORD [r15 + off_gpr(4)], r8
        ; mov QWORD [r15 + off_gpr(5)], rbp
        ; mov QWORD [r15 + off_gpr(6)], rsi
        ; mov QWORD [r15 + off_gpr(7)], rdi
        ; pushfq
        ; pop r13
        ; and r13d, ARITH_FLAGS as i32
        ; mov r10d, DWORD [r15 + OFF_EFLAGS]
        ; and r10d, !ARITH_FLAGS as i32
        ; or r10d, r13d
        ; mov DWORD [r15 + OFF_EFLAGS], r10d
    );
}

/// Loads the guest state into host registers: the arithmetic flags into host EFLAGS
/// (DF, TF, AC stay 0 on the host) and the eight GPRs. The one reload sequence of the
/// entry, the return from a slow path or interpreter call, and the leave path.
fn load_guest(ops: &mut Asm) {
    dynasm!(ops
        ; .arch x64
        ; mov eax, DWORD [r15 + OFF_EFLAGS]
        ; and eax, ARITH_FLAGS as i32
        ; or eax, FLAGS_FIXED
        ; push rax
        ; popfq
        ; mov rax, QWORD [r15 + off_gpr(0)]
        ; mov rcx, QWORD [r15 + off_gpr(1)]
        ; mov rdx, QWORD [r15 + off_gpr(2)]
        ; mov rbx, QWORD [r15 + off_gpr(3)]
        ; mov r8, QWORD [r15 + off_gpr(4)]
        ; mov rbp, QWORD [r15 + off_gpr(5)]
        ; mov rsi, QWORD [r15 + off_gpr(6)]
        ; mov rdi, QWORD [r15 + off_gpr(7)]
    );
}

/// Assembles the entry/exit trampoline for base address `base`.
pub fn trampoline(base: usize) -> (Vec<u8>, TrampolineOffsets) {
    let mut ops: VecAssembler<X64Relocation> = VecAssembler::new(base);
    let exit = ops.new_dynamic_label();
    let slow = ops.new_dynamic_label();
    let interp = ops.new_dynamic_label();
    let called = ops.new_dynamic_label();
    let leave = ops.new_dynamic_label();
    let helper = jit_slow as *const () as usize as i64;
    let interp_helper = jit_interp as *const () as usize as i64;
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
        // r14 = block budget + 1 for as long as host code runs (see `emit_block`).
        ; mov r14d, DWORD [r12 + OFF_BUDGET]
        ; lea r14d, [r14 + 1]
    );
    load_guest(&mut ops);
    dynasm!(ops
        ; .arch x64
        ; jmp r13
        ; =>exit
        ; lea r14d, [r14 - 1]
        ; mov DWORD [r12 + OFF_BUDGET], r14d
    );
    store_guest(&mut ops);
    dynasm!(ops
        ; .arch x64
        ; mov DWORD [r15 + OFF_RIP + 4], 0
    );
    crate::x87::emit_spill(&mut ops);
    dynasm!(ops
        ; .arch x64
        ; add rsp, 8
        ; pop r15
        ; pop r14
        ; pop r13
        ; pop r12
        ; pop rbp
        ; pop rbx
        ; ret
        // Slow path: called from block code with guest state in host registers and
        // host flags, EIP stored, `JitCtx::arg` = instructions not retired if this one
        // leaves.
        ; =>slow
    );
    store_guest(&mut ops);
    dynasm!(ops
        ; .arch x64
        ; mov rdi, r12
        ; mov esi, DWORD [r12 + OFF_ARG]
    );
    crate::x87::emit_spill_for_call(&mut ops);
    dynasm!(ops
        ; .arch x64
        ; sub rsp, 8
        ; mov rax, QWORD helper
        ; call rax
        ; add rsp, 8
        ; jmp =>called
        // In-block interpreter call: as the slow path, r11 = the `Instruction`.
        ; =>interp
    );
    store_guest(&mut ops);
    dynasm!(ops
        ; .arch x64
        ; mov rdi, r12
        ; mov esi, DWORD [r12 + OFF_ARG]
        ; mov rdx, r11
    );
    crate::x87::emit_spill_for_call(&mut ops);
    dynasm!(ops
        ; .arch x64
        ; sub rsp, 8
        ; mov rax, QWORD interp_helper
        ; call rax
        ; add rsp, 8
        ; =>called
        ; test eax, eax
        ; jnz =>leave
    );
    crate::x87::emit_reload_after_call(&mut ops, leave);
    load_guest(&mut ops);
    dynasm!(ops
        ; .arch x64
        ; ret
        ; =>leave
    );
    load_guest(&mut ops);
    dynasm!(ops
        ; .arch x64
        ; lea rsp, [rsp + 8] // drop the return address; LEA keeps the flags
        ; mov QWORD [r12 + OFF_EXIT], NO_CHAIN as i32
        ; jmp =>exit
    );
    let off = |l| ops.labels().resolve_dynamic(l).map(|o| o.0).unwrap_or(0);
    let offs = TrampolineOffsets {
        exit: off(exit),
        slow: off(slow),
        interp: off(interp),
    };
    let code = ops.finalize().unwrap_or_default();
    (code, offs)
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

/// An exit to guest `target`: a patchable stub, or for [`IND_LOOKUP`] the inline lookup.
/// Needs the guest flags in host EFLAGS.
fn emit_exit(ops: &mut Asm, base: usize, target: u32, id: u64, t: &Targets) {
    if id == IND_LOOKUP {
        dynasm!(ops ; .arch x64 ; mov r11d, target as i32);
        save_flags(ops);
        emit_indirect(ops, base, t);
    } else {
        emit_stub(ops, base, target, id, t.exit);
    }
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

/// Host addresses a block jumps or calls to.
#[derive(Debug, Clone, Copy)]
pub struct Targets {
    /// The trampoline's exit path.
    pub exit: usize,
    /// The trampoline's slow path.
    pub slow: usize,
    /// The trampoline's in-block interpreter call.
    pub interp: usize,
    /// Host address of the block's held instructions (one `Instruction` per
    /// [`Kind::Interp`], in order), which outlive its code.
    pub held: usize,
    /// Offset of the TLB set for this block's privilege (0 or [`TLB_USER_SET`]).
    pub tlb_set: i32,
    /// The block's mode bits (part of the indirect-branch key).
    pub mode: u8,
    /// Use [`probe_flag_free`] (the host has BMI2) where the flags are in host EFLAGS.
    pub flag_free: bool,
}

/// Indirect branch to the guest EIP in r11d: store it as EIP, find the target's
/// physical address through the fetch tag of the TLB, look (physical address, mode,
/// EIP) up in the indirect-branch table and jump there; on any miss leave with
/// [`IND_MISS`]. Needs the guest flags in
/// r9 (restored before leaving either way).
fn emit_indirect(ops: &mut Asm, base: usize, t: &Targets) {
    let miss = ops.new_dynamic_label();
    let tag = t.tlb_set + TLB_TAG_FETCH;
    let addend = t.tlb_set + TLB_ADDEND;
    let key_hi = (t.mode as i64) << 56;
    dynasm!(ops
        ; .arch x64
        ; mov DWORD [r15 + OFF_RIP], r11d
        ; mov r13d, r11d
        ; mov r10d, r13d
        ; shr r10d, 12
        ; and r10d, (TLB_SIZE - 1) as i32
        ; shl r10d, TLB_ENTRY_SHIFT
        ; add r10, QWORD [r12 + OFF_TLB]
        ; mov r11, r13
        ; and r11, -4096
        ; cmp r11, QWORD [r10 + tag]
        ; jne =>miss
        ; add r13, QWORD [r10 + addend]
        ; sub r13, QWORD [r12 + OFF_RAM]
        ; mov r10, r13
        ; shr r10, 12
        ; xor r10d, r13d
        ; and r10d, (IND_SIZE - 1) as i32
        ; shl r10d, 5
        ; add r10, QWORD [r12 + OFF_IND]
        ; mov r11, QWORD key_hi
        ; or r11, r13
        ; cmp r11, QWORD [r10]
        ; jne =>miss
        // The same physical code reached at another linear address is another block.
        ; mov r11d, DWORD [r15 + OFF_RIP]
        ; cmp r11, QWORD [r10 + 8]
        ; jne =>miss
        ; mov r13, QWORD [r10 + 16]
    );
    restore_flags(ops);
    dynasm!(ops
        ; .arch x64
        ; jmp r13
        ; =>miss
    );
    restore_flags(ops);
    dynasm!(ops
        ; .arch x64
        ; mov QWORD [r12 + OFF_EXIT], IND_MISS as i32
    );
    jmp_abs(ops, base, t.exit);
}

/// Where guest flags are during emission (see `emit_block`).
struct FlagState {
    /// Host EFLAGS hold the guest flags.
    host: bool,
    /// r9 holds the guest flags in LAHF/SETO form.
    saved: bool,
}

type Asm = VecAssembler<X64Relocation>;

/// Saves host flags into r9 (AH image from LAHF, AL = OF), without touching guest EAX.
fn save_flags(ops: &mut Asm) {
    dynasm!(ops
        ; .arch x64
        ; mov r9, rax
        ; lahf
        ; seto al
        ; xchg rax, r9
    );
}

/// Loads host flags from r9 (keeps r9): CMP AL, -127 sets OF exactly when AL = 1,
/// then SAHF sets SF ZF AF PF CF from AH.
pub(crate) fn restore_flags(ops: &mut Asm) {
    dynasm!(ops
        ; .arch x64
        ; xchg rax, r9
        ; cmp al, -127
        ; sahf
        ; xchg rax, r9
    );
}

/// The arithmetic flags an instruction reads, the ones it always writes (defined or
/// not) and whether it modifies any. A shift or rotate whose masked count is an
/// immediate other than 0 writes what iced lists; one counted by CL may write nothing
/// (count 0), so it is taken to write no flag for sure.
fn flag_effect(i: &Instruction) -> (u32, u32, bool) {
    let read = rflags_to_eflags(i.rflags_read());
    let modified = rflags_to_eflags(i.rflags_modified()) != 0;
    let mut def = rflags_to_eflags(
        i.rflags_written() | i.rflags_cleared() | i.rflags_set() | i.rflags_undefined(),
    );
    if count_dependent(i) {
        let last = i.op_count().saturating_sub(1);
        let imm_count = match i.op_kind(last) {
            OpKind::Immediate8 => Some(i.immediate8() & 0x1f),
            _ => None,
        };
        if imm_count.unwrap_or(0) == 0 {
            def = 0;
        }
    }
    (read, def, modified)
}

/// Whether an instruction needs the guest flags in host EFLAGS before it runs (it
/// reads some, or writes only some while a flag it leaves alone is live afterwards),
/// and whether it writes any.
fn flag_use(i: &Instruction, live_after: u32) -> (bool, bool) {
    let (read, def, modified) = flag_effect(i);
    let needs = read != 0 || (modified && ARITH_FLAGS & !def & live_after != 0);
    (needs, modified)
}

/// For each instruction of `plan`, the guest flags live after it: read by a later
/// instruction before being written, or visible at a later exit. Every point that may
/// leave the block (a memory access, whose fault must push exact flags; a helper call;
/// the end) counts as reading all of them, so a flag is dead only until the next
/// instruction that overwrites it on the straight register-only path.
fn live_flags(plan: &BlockPlan) -> Vec<u32> {
    let mut live = ARITH_FLAGS;
    let mut out = vec![0; plan.insns.len()];
    for (k, g) in plan.insns.iter().enumerate().rev() {
        out[k] = live;
        live = match g.kind {
            Kind::Reg => {
                let (read, def, _) = flag_effect(&g.instr);
                (live & !def) | read
            }
            _ => ARITH_FLAGS,
        };
    }
    out
}

/// One out-of-line slow path.
struct Slow {
    label: DynamicLabel,
    resume: DynamicLabel,
    eip: u32,
    not_retired: u32,
    /// Reached from [`probe_flag_free`]: guest flags in host EFLAGS, guest RCX in r9.
    /// Otherwise the guest flags are in r9 and host EFLAGS are clobbered.
    flag_free: bool,
    /// The held `Instruction` to run through the in-block interpreter call instead of
    /// the slow path (native REP STOS/MOVS, which the interpreter may leave unfinished).
    held: Option<usize>,
}

/// The second access of PUSH m32 and CALL m32, after the load: keeps the loaded dword
/// in the scratch slot and probes the new stack slot [ESP-4] for a write, leaving its
/// host address in r13. A miss runs the whole instruction in the interpreter, as the
/// load's does, and resumes at `at.0` (`at` = resume label, EIP, instructions not yet
/// retired).
fn probe_push_slot(
    ops: &mut Asm,
    t: &Targets,
    flag_free: bool,
    slows: &mut Vec<Slow>,
    at: (DynamicLabel, u32, u32),
) {
    dynasm!(ops
        ; .arch x64
        ; mov r11d, DWORD [r13]
        ; mov DWORD [r12 + OFF_SCRATCH], r11d
        ; lea r13d, [r8 - 4]
    );
    let label = ops.new_dynamic_label();
    if flag_free {
        probe_flag_free(ops, 4, true, t.tlb_set, label);
    } else {
        probe(ops, 4, true, t.tlb_set, label);
    }
    let (resume, eip, not_retired) = at;
    slows.push(Slow {
        label,
        resume,
        eip,
        not_retired,
        flag_free,
        held: None,
    });
}

/// The inline TLB probe: r13 = linear address in, host address out; misses go to
/// `slow`. Clobbers r10, r11 and host flags.
fn probe(ops: &mut Asm, size: u32, write: bool, tlb_set: i32, slow: DynamicLabel) {
    let tag = tlb_set + if write { TLB_TAG_WRITE } else { TLB_TAG_READ };
    let addend = tlb_set + TLB_ADDEND;
    let last = size as i32 - 1;
    dynasm!(ops
        ; .arch x64
        ; mov r10d, r13d
        ; shr r10d, 12 - TLB_ENTRY_SHIFT
        ; and r10d, ((TLB_SIZE - 1) << TLB_ENTRY_SHIFT) as i32
        ; add r10, QWORD [r12 + OFF_TLB]
        ; lea r11, [r13 + last]
        ; and r11, -4096
        ; cmp r11, QWORD [r10 + tag]
        ; jne =>slow
        ; add r13, QWORD [r10 + addend]
    );
}

/// The inline TLB probe without touching EFLAGS (BMI2): r13 = linear address in, host
/// address out; misses go to `slow` with the guest RCX in r9 (the slow stub puts it
/// back). Clobbers r9, r10, r11; the guest flags stay in host EFLAGS throughout, so
/// nothing needs saving before it and a fault on the slow path sees them exact.
///
/// Only MOV, LEA, RORX, PDEP, NOT, JRCXZ and JMP, none of which writes EFLAGS:
/// ```text
/// r11 = rorx(r13, 12)                    ; low 32 bits: page number of the first byte
/// r10 = tlb + pdep(r11d, idx_mask)       ; its entry (index << TLB_ENTRY_SHIFT)
/// r11 = ~pdep(rorx(r13 + last, 12), page_mask)   ; NOT of the last byte's page address
/// rcx = tag + r11 + 1                    ; tag - page: 0 exactly on a hit
/// jrcxz hit ; jmp slow                   ; (JRCXZ reaches only 127 bytes)
/// ```
fn probe_flag_free(ops: &mut Asm, size: u32, write: bool, tlb_set: i32, slow: DynamicLabel) {
    let tag = tlb_set + if write { TLB_TAG_WRITE } else { TLB_TAG_READ };
    let addend = tlb_set + TLB_ADDEND;
    let last = size as i32 - 1;
    dynasm!(ops
        ; .arch x64
        ; rorx r11, r13, 12
        ; pdep r10d, r11d, DWORD [r12 + OFF_IDX_MASK]
    );
    if last != 0 {
        dynasm!(ops
            ; .arch x64
            ; lea r11, [r13 + last]
            ; rorx r11, r11, 12
        );
    }
    dynasm!(ops
        ; .arch x64
        ; pdep r11, r11, QWORD [r12 + OFF_PAGE_MASK]
        ; not r11
        ; mov r9, rcx
        ; mov rcx, QWORD [r12 + OFF_TLB]
        ; lea r10, [rcx + r10]
        ; mov rcx, QWORD [r10 + tag]
        ; lea rcx, [rcx + r11 + 1]
        ; jrcxz >hit
        ; jmp =>slow
        ; hit:
        ; mov rcx, r9
        ; mov r11, QWORD [r10 + addend]
        ; lea r13, [r13 + r11]
    );
}

/// `lea dst, [base + rcx * size]`: where EDI/ESI stand after a host REP of ECX
/// elements of `size` bytes (dynasm needs the scale as a literal).
macro_rules! lea_after_rep {
    ($ops:ident, $size:expr, $dst:tt, $base:tt) => {
        match $size {
            1 => dynasm!($ops ; .arch x64 ; lea $dst, [$base + rcx]),
            2 => dynasm!($ops ; .arch x64 ; lea $dst, [$base + rcx * 2]),
            _ => dynasm!($ops ; .arch x64 ; lea $dst, [$base + rcx * 4]),
        }
    };
}

/// Native REP STOS/MOVS (see [`Kind::Rep`]); `slow` runs the instruction in the
/// interpreter, `done` follows it. One execution does exactly what one interpreter step
/// does: min(ECX, [`REP_CHUNK`]) iterations, then, unless ECX is 0, leaves the block
/// with EIP at the instruction (counted as retired, as the interpreter counts it), so
/// the lock-step checker sees the same state. A first pass probes every page those
/// iterations touch (no page-crossing element, every TLB tag fast) and goes to `slow`
/// before anything changes otherwise; then the pages are done as chunks with the host's
/// REP STOS/MOVS on the host addresses, guest EDI, ESI and ECX updated after each.
/// The guest flags go to r9 first (nothing here changes them).
#[allow(clippy::too_many_arguments)]
fn emit_rep(
    ops: &mut Asm,
    fs: &mut FlagState,
    movs: bool,
    size: u32,
    t: &Targets,
    base: usize,
    eip: u32,
    not_retired: u32,
    slow: DynamicLabel,
    done: DynamicLabel,
) {
    if !fs.saved {
        save_flags(ops);
        fs.saved = true;
    }
    fs.host = false;
    let tlb_set = t.tlb_set;
    let shift = size.trailing_zeros() as i8;
    let pre = ops.new_dynamic_label();
    let planned = ops.new_dynamic_label();
    let top = ops.new_dynamic_label();
    let chunk_end = ops.new_dynamic_label();
    // r10d = elements from the address in `cur` (and `cur2`) to the nearer page end.
    let to_page_end = |ops: &mut Asm, d: i32, s: Option<i32>| {
        dynasm!(ops
            ; .arch x64
            ; mov r10d, DWORD [r12 + d]
            ; and r10d, 0xfff
        );
        if let Some(s) = s {
            dynasm!(ops
                ; .arch x64
                ; mov r11d, DWORD [r12 + s]
                ; and r11d, 0xfff
                ; cmp r10d, r11d
                ; cmovb r10d, r11d
            );
        }
        dynasm!(ops
            ; .arch x64
            ; neg r10d
            ; add r10d, 0x1000
        );
        if shift != 0 {
            dynasm!(ops
                ; .arch x64
                ; shr r10d, shift
                ; jz =>slow
            );
        }
    };
    dynasm!(ops
        ; .arch x64
        ; test BYTE [r15 + OFF_EFLAGS + 1], DF_IN_BYTE1
        ; jnz =>slow
        ; test ecx, ecx
        ; jz =>done
        ; mov r10d, REP_CHUNK
        ; cmp ecx, r10d
        ; cmovb r10d, ecx
        ; mov DWORD [r12 + OFF_REP_LEFT], r10d
        ; mov DWORD [r12 + OFF_REP_TODO], r10d
        ; mov DWORD [r12 + OFF_REP_DCUR], edi
        ; mov DWORD [r12 + OFF_REP_SCUR], esi
        // Pass 1: probe each page of the planned iterations.
        ; =>pre
        ; mov r13d, DWORD [r12 + OFF_REP_DCUR]
    );
    probe(ops, size, true, tlb_set, slow);
    if movs {
        dynasm!(ops ; .arch x64 ; mov r13d, DWORD [r12 + OFF_REP_SCUR]);
        probe(ops, size, false, tlb_set, slow);
    }
    to_page_end(
        ops,
        OFF_REP_DCUR,
        if movs { Some(OFF_REP_SCUR) } else { None },
    );
    dynasm!(ops
        ; .arch x64
        ; sub DWORD [r12 + OFF_REP_TODO], r10d
        ; jbe =>planned
        ; shl r10d, shift
        ; add DWORD [r12 + OFF_REP_DCUR], r10d
        ; add DWORD [r12 + OFF_REP_SCUR], r10d
        ; jmp =>pre
        // Pass 2: the chunks (every probe hits now).
        ; =>planned
        ; =>top
        ; cmp DWORD [r12 + OFF_REP_LEFT], 0
        ; je =>chunk_end
        ; mov DWORD [r12 + OFF_REP_DCUR], edi
        ; mov DWORD [r12 + OFF_REP_SCUR], esi
    );
    if movs {
        dynasm!(ops ; .arch x64 ; mov r13d, esi);
        probe(ops, size, false, tlb_set, slow);
        dynasm!(ops ; .arch x64 ; mov QWORD [r12 + OFF_REP_SRC], r13);
    }
    dynasm!(ops ; .arch x64 ; mov r13d, edi);
    probe(ops, size, true, tlb_set, slow);
    to_page_end(
        ops,
        OFF_REP_DCUR,
        if movs { Some(OFF_REP_SCUR) } else { None },
    );
    dynasm!(ops
        ; .arch x64
        ; cmp r10d, DWORD [r12 + OFF_REP_LEFT]
        ; cmova r10d, DWORD [r12 + OFF_REP_LEFT]
        ; sub DWORD [r12 + OFF_REP_LEFT], r10d
        ; mov r11d, ecx
        ; sub r11d, r10d
        ; mov ecx, r10d
    );
    if movs {
        dynasm!(ops
            ; .arch x64
            ; mov DWORD [r12 + OFF_REP_ECX], r11d
        );
        lea_after_rep!(ops, size, r11d, rsi);
        dynasm!(ops
            ; .arch x64
            ; mov DWORD [r12 + OFF_REP_ESI], r11d
            ; mov rsi, QWORD [r12 + OFF_REP_SRC]
        );
        lea_after_rep!(ops, size, r11d, rdi);
        dynasm!(ops ; .arch x64 ; mov rdi, r13);
        match size {
            1 => dynasm!(ops ; .arch x64 ; rep movsb),
            2 => dynasm!(ops ; .arch x64 ; rep movsw),
            _ => dynasm!(ops ; .arch x64 ; rep movsd),
        }
        dynasm!(ops
            ; .arch x64
            ; mov edi, r11d
            ; mov esi, DWORD [r12 + OFF_REP_ESI]
            ; mov ecx, DWORD [r12 + OFF_REP_ECX]
            ; jmp =>top
        );
    } else {
        lea_after_rep!(ops, size, r10d, rdi);
        dynasm!(ops ; .arch x64 ; mov rdi, r13);
        match size {
            1 => dynasm!(ops ; .arch x64 ; rep stosb),
            2 => dynasm!(ops ; .arch x64 ; rep stosw),
            _ => dynasm!(ops ; .arch x64 ; rep stosd),
        }
        dynasm!(ops
            ; .arch x64
            ; mov edi, r10d
            ; mov ecx, r11d
            ; jmp =>top
        );
    }
    // A chunk's worth done: finished, or leave at the instruction as the interpreter
    // does (it counts the unfinished instruction as retired).
    dynasm!(ops
        ; .arch x64
        ; =>chunk_end
        ; test ecx, ecx
        ; jz =>done
        ; sub QWORD [r12 + OFF_ICOUNT], (not_retired - 1) as i32
    );
    restore_flags(ops);
    dynasm!(ops
        ; .arch x64
        ; mov DWORD [r15 + OFF_RIP], eip as i32
        ; mov QWORD [r12 + OFF_EXIT], NO_CHAIN as i32
    );
    jmp_abs(ops, base, t.exit);
}

fn call_abs(ops: &mut Asm, base: usize, to: usize) {
    let at = base + ops.offset().0;
    let mut b = jmp_rel32(at, to).unwrap_or([0xcc; 5]);
    b[0] = 0xe8;
    ops.extend(b.iter());
}

/// Assembles `plan` for host address `base`. `stub_ids` gives, for the terminator's
/// exits in order (fall-through or taken for JMP/CALL; not-taken then taken for Jcc;
/// none for JMP reg and RET), the stub ids.
pub fn emit_block(plan: &BlockPlan, base: usize, stub_ids: &[u64], t: &Targets) -> Option<Emitted> {
    let exit_addr = t.exit;
    let mut ops: Asm = VecAssembler::new(base);
    let out = ops.new_dynamic_label();
    let reentry = ops.new_dynamic_label();
    let n = plan.insn_count() as i32;
    let cont = ops.new_dynamic_label();
    // r14 holds the budget + 1: LOOP decrements it (as RCX) without touching EFLAGS and
    // falls through when it reaches 0, i.e. when the budget was 0 on entry.
    dynasm!(ops
        ; .arch x64
        ; =>out
        ; xchg rcx, r14
        ; mov r14d, 1
        ; jmp =>reentry
    );
    let entry = ops.offset().0;
    dynasm!(ops
        ; .arch x64
        ; xchg rcx, r14
        ; loop =>cont
        ; jmp =>out
        ; =>cont
        ; xchg rcx, r14
        ; mov r11, QWORD [r12 + OFF_ICOUNT]
        ; lea r11, [r11 + n]
        ; mov QWORD [r12 + OFF_ICOUNT], r11
    );
    let mut fs = FlagState {
        host: true,
        saved: false,
    };
    let mut slows: Vec<Slow> = Vec::new();
    let mut ranges = Vec::with_capacity(plan.insns.len());
    let mut ret_exit = None;
    let mut held_k = 0usize;
    let live = live_flags(plan);
    let mut fpu_ready = false;
    for (k, g) in plan.insns.iter().enumerate() {
        let start = ops.offset().0;
        let eip = g.instr.ip32();
        let not_retired = (plan.insns.len() - k) as u32;
        // The first host x87 instruction loads the guest x87 state (see x87.rs).
        if !fpu_ready
            && t.mode & crate::x87::MODE_X87 != 0
            && matches!(g.kind, Kind::Reg | Kind::Mem { .. })
            && crate::x87::needs_host_fpu(&g.instr)
        {
            if !fs.saved {
                save_flags(&mut ops);
                fs.saved = true;
            }
            crate::x87::emit_ensure(&mut ops, base, t.exit, eip, not_retired);
            fs.host = false;
            fpu_ready = true;
        }
        // Memory forms: save flags, compute the address, probe.
        let mem = match &g.kind {
            Kind::Mem { ea, size, write } => Some((ea.clone(), *size, *write)),
            Kind::Push(_) | Kind::PushImm(_) => Some((lea_esp(-4), 4, true)),
            Kind::PushMem { ea } | Kind::CallMem { ea, .. } => Some((ea.clone(), 4, false)),
            Kind::Pop(_) => Some((lea_esp(0), 4, false)),
            Kind::Leave => Some((lea_ebp(), 4, false)),
            Kind::Branch => match plan.term {
                Term::Call { .. } | Term::CallReg { .. } => Some((lea_esp(-4), 4, true)),
                Term::Ret { .. } => Some((lea_esp(0), 4, false)),
                _ => None,
            },
            Kind::Reg | Kind::Div(_) | Kind::Interp | Kind::Step | Kind::Rep { .. } => None,
        };
        let mut resume = None;
        if let Kind::Div(r) = g.kind {
            // #DE unless divisor != 0 and EDX < divisor (the quotient fits).
            if !fs.saved {
                save_flags(&mut ops);
                fs.saved = true;
            }
            let h = host_of(r);
            let label = ops.new_dynamic_label();
            let res = ops.new_dynamic_label();
            dynasm!(ops
                ; .arch x64
                ; mov r10d, Rd(h)
                ; test r10d, r10d
                ; jz =>label
                ; cmp edx, r10d
                ; jae =>label
                ; div r10d
            );
            // DIV leaves every arithmetic flag undefined: the host's values stand.
            fs.host = true;
            fs.saved = false;
            slows.push(Slow {
                label,
                resume: res,
                eip,
                not_retired,
                flag_free: false,
                held: None,
            });
            resume = Some(res);
        }
        // The flag-free probe needs the guest flags in host EFLAGS (its slow path
        // spills them from there); FLDCW's guard jumps to the slow path after a TEST.
        let flag_free = t.flag_free && fs.host && !crate::x87::needs_fldcw_guard(&g.instr);
        if let Some((ea, size, write)) = mem {
            if !flag_free && !fs.saved {
                save_flags(&mut ops);
                fs.saved = true;
            }
            ops.extend(ea.iter());
            let label = ops.new_dynamic_label();
            let r = ops.new_dynamic_label();
            if flag_free {
                probe_flag_free(&mut ops, size, write, t.tlb_set, label);
                // r9 now holds guest RCX's copy, no longer the flags.
                fs.saved = false;
            } else {
                probe(&mut ops, size, write, t.tlb_set, label);
                fs.host = false;
            }
            slows.push(Slow {
                label,
                resume: r,
                eip,
                not_retired,
                flag_free,
                held: None,
            });
            resume = Some(r);
        }
        match &g.kind {
            Kind::Reg | Kind::Mem { .. } => {
                let (needs, writes) = flag_use(&g.instr, live[k]);
                if crate::x87::needs_fldcw_guard(&g.instr) {
                    if let Some(sl) = slows.last() {
                        crate::x87::emit_fldcw_guard(&mut ops, sl.label);
                    }
                }
                if needs && !fs.host {
                    restore_flags(&mut ops);
                    fs.host = true;
                }
                ops.extend(g.host.iter());
                if writes {
                    fs.host = true;
                    fs.saved = false;
                }
            }
            Kind::Push(r) => {
                let h = host_of(*r);
                dynasm!(ops
                    ; .arch x64
                    ; mov DWORD [r13], Rd(h)
                    ; lea r8d, [r8 - 4]
                );
            }
            Kind::PushMem { .. } => {
                // Loaded; now the push (its slow path, like the load's, runs the whole
                // instruction in the interpreter and resumes after it).
                if let Some(r) = resume {
                    probe_push_slot(&mut ops, t, flag_free, &mut slows, (r, eip, not_retired));
                    dynasm!(ops
                        ; .arch x64
                        ; mov r11d, DWORD [r12 + OFF_SCRATCH]
                        ; mov DWORD [r13], r11d
                        ; lea r8d, [r8 - 4]
                    );
                }
            }
            Kind::CallMem { ret, .. } => {
                // Target loaded; push the return address (its slow path, like the
                // load's, runs the whole CALL in the interpreter and leaves), then the
                // terminator jumps to the target in r11d.
                if let Some(r) = resume {
                    probe_push_slot(&mut ops, t, flag_free, &mut slows, (r, eip, not_retired));
                    dynasm!(ops
                        ; .arch x64
                        ; mov DWORD [r13], *ret as i32
                        ; lea r8d, [r8 - 4]
                        ; mov r11d, DWORD [r12 + OFF_SCRATCH]
                    );
                }
            }
            Kind::PushImm(v) => {
                dynasm!(ops
                    ; .arch x64
                    ; mov DWORD [r13], *v as i32
                    ; lea r8d, [r8 - 4]
                );
            }
            Kind::Pop(r) => {
                let h = host_of(*r);
                dynasm!(ops
                    ; .arch x64
                    ; mov r11d, DWORD [r13]
                    ; lea r8d, [r8 + 4]
                    ; mov Rd(h), r11d
                );
            }
            Kind::Div(_) => {}
            Kind::Rep { movs, size } => {
                held_k += 1;
                let ptr = t.held + (held_k - 1) * std::mem::size_of::<Instruction>();
                let label = ops.new_dynamic_label();
                let r = ops.new_dynamic_label();
                emit_rep(
                    &mut ops,
                    &mut fs,
                    *movs,
                    *size,
                    t,
                    base,
                    eip,
                    not_retired,
                    label,
                    r,
                );
                slows.push(Slow {
                    label,
                    resume: r,
                    eip,
                    not_retired,
                    flag_free: false,
                    held: Some(ptr),
                });
                resume = Some(r);
            }
            Kind::Interp | Kind::Step => {
                if !fs.host {
                    restore_flags(&mut ops);
                }
                let ptr = if g.kind == Kind::Step {
                    0
                } else {
                    held_k += 1;
                    t.held + (held_k - 1) * std::mem::size_of::<Instruction>()
                };
                let branch = k + 1 == plan.insns.len() && plan.term == Term::InterpBranch;
                let arg = not_retired | if branch { INTERP_BRANCH } else { 0 };
                dynasm!(ops
                    ; .arch x64
                    ; mov DWORD [r15 + OFF_RIP], eip as i32
                    ; mov DWORD [r12 + OFF_ARG], arg as i32
                    ; mov r11, QWORD ptr as i64
                );
                crate::x87::emit_call_hint(&mut ops, plan, t.mode, eip);
                call_abs(&mut ops, base, t.interp);
                // The interpreter's flags are back in host EFLAGS.
                fs.host = true;
                fs.saved = false;
            }
            Kind::Leave => {
                dynasm!(ops
                    ; .arch x64
                    ; mov r11d, DWORD [r13]
                    ; lea r8d, [rbp + 4]
                    ; mov ebp, r11d
                );
            }
            Kind::Branch => match plan.term {
                Term::Call { ret, .. } => {
                    dynasm!(ops
                        ; .arch x64
                        ; mov DWORD [r13], ret as i32
                        ; lea r8d, [r8 - 4]
                    );
                }
                Term::CallReg { reg, ret } => {
                    let h = host_of(reg);
                    dynasm!(ops
                        ; .arch x64
                        ; mov DWORD [r13], ret as i32
                        ; lea r8d, [r8 - 4]
                    );
                    if h == 8 {
                        // CALL ESP jumps to ESP's value before the push.
                        dynasm!(ops ; .arch x64 ; lea r11d, [r8 + 4]);
                    } else {
                        dynasm!(ops ; .arch x64 ; mov r11d, Rd(h));
                    }
                }
                Term::Ret { imm } => {
                    let rel = 4 + imm as i32;
                    dynasm!(ops
                        ; .arch x64
                        ; mov r11d, DWORD [r13]
                        ; lea r8d, [r8 + rel]
                    );
                }
                _ => {}
            },
        }
        let last = k + 1 == plan.insns.len();
        if let Some(r) = resume {
            if last
                && matches!(
                    plan.term,
                    Term::Ret { .. } | Term::CallReg { .. } | Term::JmpMem | Term::CallMem
                )
            {
                // The slow path of RET leaves with EIP set by the interpreter.
                ret_exit = Some(r);
            } else {
                dynasm!(ops ; .arch x64 ; =>r);
            }
        }
        ranges.push((start, ops.offset().0));
    }
    // Exits need the guest flags in host EFLAGS.
    if !fs.host {
        restore_flags(&mut ops);
    }
    let mut stubs = Vec::new();
    let term_start = ops.offset().0;
    match plan.term {
        Term::Fall { next, .. } => {
            stubs.push(ops.offset().0);
            emit_exit(&mut ops, base, next, *stub_ids.first()?, t);
        }
        Term::Jmp { target } | Term::Call { target, .. } => {
            stubs.push(ops.offset().0);
            emit_exit(&mut ops, base, target, *stub_ids.first()?, t);
        }
        Term::Jcc { cc, target, next } => {
            let taken = ops.new_dynamic_label();
            emit_jcc(&mut ops, cc, taken);
            stubs.push(ops.offset().0);
            emit_exit(&mut ops, base, next, *stub_ids.first()?, t);
            dynasm!(ops ; .arch x64 ; =>taken);
            stubs.push(ops.offset().0);
            emit_exit(&mut ops, base, target, *stub_ids.get(1)?, t);
        }
        Term::JmpReg { reg } => {
            let h = host_of(reg);
            dynasm!(ops ; .arch x64 ; mov r11d, Rd(h));
            save_flags(&mut ops);
            emit_indirect(&mut ops, base, t);
        }
        Term::Ret { .. } | Term::CallReg { .. } | Term::JmpMem | Term::CallMem => {
            save_flags(&mut ops);
            emit_indirect(&mut ops, base, t);
        }
        Term::InterpBranch => {
            dynasm!(ops ; .arch x64 ; mov r11d, DWORD [r15 + OFF_RIP]);
            save_flags(&mut ops);
            emit_indirect(&mut ops, base, t);
        }
    }
    if !matches!(plan.term, Term::Fall { .. }) {
        if let Some(last) = ranges.last_mut() {
            *last = (last.0, ops.offset().0);
        }
    }
    let _ = term_start;
    if let Some(r) = ret_exit {
        dynasm!(ops
            ; .arch x64
            ; =>r
            ; mov QWORD [r12 + OFF_EXIT], IND_MISS as i32
        );
        jmp_abs(&mut ops, base, exit_addr);
    }
    // Out-of-line slow paths. After a flag-free probe the guest flags are in host
    // EFLAGS and guest RCX in r9, and the code at the resume point expects the flags in
    // host EFLAGS (the trampoline's reload puts them there); otherwise they are in r9
    // (saved before the probe) and expected there.
    for sl in &slows {
        dynasm!(ops ; .arch x64 ; =>sl.label);
        if sl.flag_free {
            dynasm!(ops ; .arch x64 ; mov rcx, r9);
        } else {
            restore_flags(&mut ops);
        }
        dynasm!(ops
            ; .arch x64
            ; mov DWORD [r15 + OFF_RIP], sl.eip as i32
            ; mov DWORD [r12 + OFF_ARG], sl.not_retired as i32
        );
        crate::x87::emit_call_hint(&mut ops, plan, t.mode, sl.eip);
        if let Some(ptr) = sl.held {
            dynasm!(ops ; .arch x64 ; mov r11, QWORD ptr as i64);
            call_abs(&mut ops, base, t.interp);
        } else {
            call_abs(&mut ops, base, t.slow);
        }
        if !sl.flag_free {
            save_flags(&mut ops);
        }
        dynasm!(ops ; .arch x64 ; jmp =>sl.resume);
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

/// `mov r13d, ebp` (guest EBP: LEAVE's stack address).
fn lea_ebp() -> Vec<u8> {
    let mut ops: Asm = VecAssembler::new(0);
    dynasm!(ops ; .arch x64 ; mov r13d, ebp);
    ops.finalize().unwrap_or_default()
}

/// `lea r13d, [r8 + d]` (guest ESP + d, 32-bit wrap).
fn lea_esp(d: i32) -> Vec<u8> {
    let mut ops: Asm = VecAssembler::new(0);
    dynasm!(ops ; .arch x64 ; lea r13d, [r8 + d]);
    ops.finalize().unwrap_or_default()
}

/// `jmp rel32` from host address `at` to `to` (5 bytes), or `None` if out of range.
pub fn jmp_rel32(at: usize, to: usize) -> Option<[u8; 5]> {
    let rel = (to as i64).wrapping_sub(at as i64 + 5);
    let rel = i32::try_from(rel).ok()?;
    let b = rel.to_le_bytes();
    Some([0xe9, b[0], b[1], b[2], b[3]])
}
