//! morph86-jit: guest x86 blocks translated to host x86-64.
//!
//! The pipeline, one module per stage (ARCHITECTURE.md section 4):
//! 1. look up ([`cache::BlockTable`], keyed by physical EIP and [`mode_bits`]);
//! 2. decode a block ([`translate::plan_block`]: iced-x86, up to a branch, an
//!    untranslated instruction, the page end or 64 instructions);
//! 3. emit ([`emit`]): integer instructions are re-encoded for the host with guest
//!    registers renamed to the host registers that hold them (host and guest are both
//!    x86, so the host computes the guest's results and flags exactly); memory operands
//!    become `[r13]` after an inline probe of the MMU's TLB; the block framework, exits,
//!    chaining stubs and slow paths are assembled with dynasmrt's `VecAssembler` for the
//!    final address;
//! 4. place in the code cache ([`cache::CodeRegion`], W^X by two views of one memory
//!    object, flushed whole when full);
//! 5. execute through the entry trampoline. Direct branches within a page are chained by
//!    patching their exit stubs into jumps; RET and JMP reg look their target up inline
//!    in a small table keyed by the target's *physical* address (found through the
//!    TLB's fetch tag), so a remapped page never reaches a stale block.
//!
//! Anything not translated runs in the interpreter, so every guest runs. Inside a
//! translatable mode an untranslated instruction does not end its block: the block
//! calls the interpreter for that one instruction (`emit::jit_interp`, with the
//! instruction decoded at translation time; `Cpu::exec_decoded`) and goes on unless it
//! faulted, branched, or changed the mode, the interrupt flag or code; an untranslated
//! branch (CALL through memory, LOOP, IRETD...) ends the block through the inline indirect
//! lookup. Only a few system instructions (STI, HLT, port I/O, segment and control
//! register loads...) and other modes go through the dispatcher one instruction at a
//! time (`Cpu::step`). A memory access that misses the TLB (first touch,
//! MMIO, ROM, a write to a page holding code, a page fault) runs that one instruction in
//! the interpreter from the middle of the block (`emit::jit_slow`), with the guest state
//! spilled first: a fault leaves the block with the state exactly at the faulting
//! instruction (block-entry instruction count corrected), and a write to code leaves it
//! right after the writing instruction; the dispatcher then invalidates the blocks of
//! the written pages (notified through `Cpu::take_dirty_code`) before it looks up the
//! next block. Every block entry checks a budget (no flag clobber: `loop`/`lea`),
//! so chained execution returns to the dispatcher regularly to poll interrupts and the
//! stop flag.
//!
//! Only flat 32-bit protected-mode code is translated (CS base 0, limit 4 GiB; no TF,
//! RF, interrupt shadow or DR7 breakpoints); memory operands only when DS, ES and SS are
//! flat too ([`MODE_FLAT_DATA`]). Everything else is interpreted.
//!
//! All execution of a CPU that has a `Jit` must go through [`Jit::run`] (or
//! [`Jit::run_lockstep`]): the interpreter's own decode step consumes code-write notices.
#![deny(missing_docs)]

pub mod cache;
pub mod emit;
pub mod lockstep;
pub mod translate;
pub mod x87;

use cache::{BlockKey, BlockTable, CodeRegion, Entry, FxMap};
use emit::{EnterFn, JitCtx, IND_MISS, IND_SIZE, NO_CHAIN};
use iced_x86::{Decoder, DecoderOptions, Formatter, Instruction, IntelFormatter, Mnemonic};
use morph86_cpu::state::{
    SegReg, AC, ATTR_CODE, ATTR_DB, ATTR_EC, ATTR_P, ATTR_RW, ATTR_S, ATTR_UNUSABLE, CR0_AM,
    CR0_PG, IF, RF, TF,
};
use morph86_cpu::{Cpu, CpuState, StepEvent};
use morph86_mmu::{Access, PhysKind, PAGE_SIZE};
use std::fmt::Write as _;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use translate::{plan_block, Term};

pub use lockstep::{Divergence, LockstepStats};

/// Default code cache size.
pub const DEFAULT_CACHE_SIZE: usize = 32 << 20;
/// Free space below which the cache is flushed before translating (larger than any block).
const BLOCK_RESERVE: usize = 16384;
/// Most lookup-table entries (blocks and interpreter markers) before a flush, so a
/// guest cannot grow host memory without bound.
const MAX_TABLE: usize = 1 << 20;
/// Most blocks run per entry from the dispatcher (bounds interrupt latency).
const MAX_CHAIN: u64 = 4096;
/// Instructions per block assumed when turning an instruction budget into a block
/// budget (see [`Jit::run`]).
pub const BUDGET_INSNS_PER_BLOCK: u64 = 8;

/// Counters for `--stats`.
#[derive(Debug, Clone, Default)]
pub struct JitStats {
    /// Blocks translated.
    pub translated: u64,
    /// Block executions (entries, chained or not).
    pub executed: u64,
    /// Guest instructions retired in translated code.
    pub native_insns: u64,
    /// Entries into host code from the dispatcher.
    pub dispatches: u64,
    /// Exit stubs patched into direct jumps.
    pub chained: u64,
    /// Blocks invalidated by writes to their code.
    pub invalidated: u64,
    /// Whole-cache flushes.
    pub flushes: u64,
    /// Memory accesses that missed the inline TLB probe (run by the interpreter).
    pub slow_paths: u64,
    /// Exceptions raised by translated code (through its slow path).
    pub faults: u64,
    /// Instructions run in the interpreter, by mnemonic.
    pub fallbacks: FxMap<Mnemonic, u64>,
    /// Interpreter steps outside translatable modes (real mode, TF, interrupt delivery...).
    pub interp_mode_steps: u64,
    /// Lock-step checker counters ([`Jit::run_lockstep`]).
    pub lockstep: LockstepStats,
    /// Instructions run by the interpreter from inside a block, by mnemonic (filled in by
    /// [`Jit::stats`]).
    pub in_block: FxMap<Mnemonic, u64>,
    /// In-block interpreter calls that left their block (fault, branch, mode change,
    /// unfinished REP).
    pub in_block_exits: u64,
    /// Block lookups answered by the direct-mapped array.
    pub lookup_hits: u64,
    /// Block lookups that went to the hash map.
    pub lookup_misses: u64,
    /// Why host code returned to the dispatcher: a chainable stub not yet patched, an
    /// indirect branch whose inline lookup missed, an exit that cannot be chained
    /// (fault, in-block interpreter call that left, untranslated next instruction), the
    /// block budget.
    pub exits: [u64; 4],
}

impl std::fmt::Display for JitStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(
            f,
            "jit: {} blocks translated, {} executed ({} dispatches), {} chained, {} invalidated, {} flushes",
            self.translated, self.executed, self.dispatches, self.chained, self.invalidated, self.flushes
        )?;
        let fb: u64 = self.fallbacks.values().sum();
        writeln!(
            f,
            "jit: {} instructions native, {} interpreted in translatable mode, {} in other modes",
            self.native_insns, fb, self.interp_mode_steps
        )?;
        writeln!(
            f,
            "jit: {} memory slow paths, {} faults in translated code",
            self.slow_paths, self.faults
        )?;
        let ib: u64 = self.in_block.values().sum();
        writeln!(
            f,
            "jit: {} in-block interpreter calls ({} left their block); lookups: {} direct-mapped hits, {} misses",
            ib, self.in_block_exits, self.lookup_hits, self.lookup_misses
        )?;
        writeln!(
            f,
            "jit: exits to the dispatcher: {} chainable stubs, {} indirect misses, {} unchainable, {} budget",
            self.exits[0], self.exits[1], self.exits[2], self.exits[3]
        )?;
        let sorted = |m: &FxMap<Mnemonic, u64>| {
            let mut v: Vec<(Mnemonic, u64)> = m.iter().map(|(a, b)| (*a, *b)).collect();
            v.sort_by(|a, b| {
                b.1.cmp(&a.1)
                    .then(format!("{:?}", a.0).cmp(&format!("{:?}", b.0)))
            });
            v
        };
        for (m, n) in sorted(&self.fallbacks).iter().take(20) {
            writeln!(f, "jit:   fallback {:<12} {}", format!("{m:?}"), n)?;
        }
        for (m, n) in sorted(&self.in_block).iter().take(20) {
            writeln!(f, "jit:   in-block {:<12} {}", format!("{m:?}"), n)?;
        }
        if self.lockstep.blocks + self.lockstep.interp_only > 0 {
            writeln!(f, "jit: {}", self.lockstep)?;
        }
        Ok(())
    }
}

struct Block {
    key: BlockKey,
    eip: u32,
    /// Host address of the first code byte.
    start: usize,
    /// Host code length.
    len: usize,
    entry: usize,
    reentry: usize,
    /// Guest bytes of the block (decoded again for listings).
    guest: Vec<u8>,
    /// Instructions the block runs through the interpreter (its code points at them;
    /// a boxed slice never moves, so the pointers stay valid while the block exists).
    #[allow(dead_code)]
    held: Box<[Instruction]>,
    ranges: Vec<(usize, usize)>,
    undefined: u32,
    valid: bool,
}

struct Stub {
    block: u32,
    addr: usize,
    target: u32,
    chained: bool,
}

/// The translator and its code cache.
pub struct Jit {
    region: CodeRegion,
    enter_fn: EnterFn,
    exit_addr: usize,
    slow_addr: usize,
    interp_addr: usize,
    table: BlockTable,
    blocks: Vec<Block>,
    stubs: Vec<Stub>,
    ctx: Box<JitCtx>,
    /// Indirect-branch table (see `JitCtx::ind`), pointed to by the context.
    ind: Box<[[u64; 4]]>,
    /// Counters.
    pub stats: JitStats,
    /// Print each block (guest and host code) to stderr when it is translated.
    pub dump_blocks: bool,
    /// Lock-step mode (`-accel check`): once the machine has run this many guest
    /// instructions, its run loop calls [`Jit::run_lockstep`] instead of [`Jit::run`].
    pub check: Option<u64>,
    /// Translate blocks of one guest instruction each (for per-instruction differential
    /// testing through [`Jit::step_block`]).
    pub one_insn_blocks: bool,
    /// Memory accesses use the TLB probe that leaves EFLAGS alone (needs BMI2) instead
    /// of saving the flags with LAHF/SETO first. Off by default: on the Zen 4 host it
    /// measured 1.35-1.45x slower than the saving probe on a load/ALU loop
    /// (`bench_probe` in tests.rs). Changing it affects blocks translated afterwards.
    pub flag_free_probe: bool,
    stop: Arc<AtomicBool>,
    /// `PhysMem::epoch` the cached blocks were made under.
    epoch: u64,
}

// SAFETY: a `Jit` owns everything its raw pointers reach: the code region (its own
// mapping), the context (whose `cpu` pointer is set only for the duration of one `enter`
// call, on the calling thread, and cleared afterwards) and the tables. Nothing is shared
// with another thread except the stop flag, an `Arc<AtomicBool>`. Moving a `Jit` to
// another thread (the vCPU thread) is therefore sound.
unsafe impl Send for Jit {}

/// The mode bits of the block key, or `None` if the current mode is not translated.
pub fn mode_bits(s: &CpuState) -> Option<u8> {
    let cs = s.seg[SegReg::Cs as usize];
    if !s.protected()
        || s.v86()
        || !s.code32()
        || cs.base != 0
        || cs.limit != 0xffff_ffff
        || s.eflags_raw & (TF | RF) != 0
        || s.inhibit_irq
        || s.halted
        || s.dr[7] & 0xff != 0
    {
        return None;
    }
    let mut m = (s.cpl & 3) | if s.cr0 & CR0_PG != 0 { MODE_PAGING } else { 0 };
    if flat_data(s) {
        m |= MODE_FLAT_DATA;
        if wide_data(s, SegReg::Fs) {
            m |= MODE_FS;
        }
        if wide_data(s, SegReg::Gs) {
            m |= MODE_GS;
        }
        m |= x87::mode_bit(s);
    }
    Some(m)
}

/// Mode bit: FS is a usable read/write data segment with a 4 GiB limit (any base, added
/// at run time), so FS overrides are translated.
pub const MODE_FS: u8 = 1 << 4;
/// Mode bit: as [`MODE_FS`] for GS.
pub const MODE_GS: u8 = 1 << 5;

fn wide_data(s: &CpuState, r: SegReg) -> bool {
    let want = ATTR_P | ATTR_S | ATTR_RW;
    let mask = want | ATTR_CODE | ATTR_EC | ATTR_UNUSABLE;
    let g = s.seg[r as usize];
    g.limit == 0xffff_ffff && g.attrs & mask == want
}

/// Mode bit: paging on.
pub const MODE_PAGING: u8 = 1 << 2;
/// Mode bit: DS, ES and SS are flat 4 GiB writable data segments (SS 32-bit) and no
/// alignment checks apply, so memory operands through them need no segment checks.
pub const MODE_FLAT_DATA: u8 = 1 << 3;

fn flat_data(s: &CpuState) -> bool {
    let want = ATTR_P | ATTR_S | ATTR_RW | ATTR_DB;
    let mask = want | ATTR_CODE | ATTR_EC | ATTR_UNUSABLE;
    let flat = |r: SegReg| {
        let g = s.seg[r as usize];
        g.base == 0 && g.limit == 0xffff_ffff && g.attrs & mask == want
    };
    flat(SegReg::Ds)
        && flat(SegReg::Es)
        && flat(SegReg::Ss)
        && !(s.cr0 & CR0_AM != 0 && s.eflags_raw & AC != 0 && s.cpl == 3)
}

impl Jit {
    /// A translator with a code cache of `cache_size` bytes.
    pub fn new(cache_size: usize) -> std::io::Result<Jit> {
        let mut region = CodeRegion::new(cache_size.max(2 * BLOCK_RESERVE))?;
        let base = region.next_addr();
        let (code, offs) = emit::trampoline(base);
        let at = region
            .push(&code)
            .ok_or_else(|| std::io::Error::other("code cache too small"))?;
        region.reserve_current();
        // SAFETY: `at` holds the trampoline just assembled for this address; it follows
        // the sysv64 calling convention (saves and restores every callee-saved register
        // it uses, keeps the stack balanced) and returns to its caller. It is only
        // called once the region is executable (see `enter`).
        let enter_fn: EnterFn = unsafe { std::mem::transmute::<usize, EnterFn>(at) };
        Ok(Jit {
            region,
            enter_fn,
            exit_addr: at + offs.exit,
            slow_addr: at + offs.slow,
            interp_addr: at + offs.interp,
            table: BlockTable::default(),
            blocks: Vec::new(),
            stubs: Vec::new(),
            ctx: Box::default(),
            ind: vec![[u64::MAX, 0, 0, 0]; IND_SIZE].into_boxed_slice(),
            stats: JitStats::default(),
            dump_blocks: false,
            check: None,
            one_insn_blocks: false,
            flag_free_probe: false,
            stop: Arc::new(AtomicBool::new(false)),
            epoch: 0,
        })
    }

    /// A flag another thread may set to make [`Jit::run`] return early (with
    /// `StepEvent::Ok`) within one dispatch: at most a few thousand blocks. `run` clears
    /// it when it returns because of it.
    pub fn stop_handle(&self) -> Arc<AtomicBool> {
        self.stop.clone()
    }

    /// The counters, with those kept elsewhere (in-block calls, lookups) filled in.
    pub fn stats(&self) -> JitStats {
        let mut st = self.stats.clone();
        for (m, &n) in Mnemonic::values().zip(self.ctx.interp_calls.iter()) {
            if n != 0 {
                st.in_block.insert(m, n);
            }
        }
        st.in_block_exits = self.ctx.interp_exits;
        st.lookup_hits = self.table.front_hits;
        st.lookup_misses = self.table.front_misses;
        st
    }

    /// Bytes of code cache in use.
    pub fn cache_used(&self) -> usize {
        self.region.used()
    }

    /// Number of live lookup-table entries.
    pub fn table_len(&self) -> usize {
        self.table.len()
    }

    /// Runs about `max_instructions` guest instructions (interpreted steps, including
    /// interrupt deliveries, count as one each). Translated code runs a whole number of
    /// blocks, budgeted at [`BUDGET_INSNS_PER_BLOCK`] instructions each, so a run may
    /// overrun the count (at most by a factor of [`translate::MAX_BLOCK_INSNS`] /
    /// [`BUDGET_INSNS_PER_BLOCK`]); stops early on HLT or a triple fault.
    pub fn run(&mut self, cpu: &mut Cpu, max_instructions: u64) -> StepEvent {
        match self.run_inner(cpu, max_instructions, false) {
            Ok(ev) => ev,
            Err(_) => StepEvent::Ok,
        }
    }

    /// Like [`Jit::run`], but runs every translated block in both engines (the
    /// interpreter with its memory writes logged and then undone, then the translated
    /// code from the same state) and stops at the first difference in instructions
    /// retired, faults, registers, defined flags or memory written (see the [`lockstep`]
    /// module). On success the translated block's state is kept. Blocks are not
    /// chained, so every block entry is checked.
    pub fn run_lockstep(
        &mut self,
        cpu: &mut Cpu,
        max_instructions: u64,
    ) -> Result<StepEvent, Box<Divergence>> {
        self.run_inner(cpu, max_instructions, true)
    }

    fn run_inner(
        &mut self,
        cpu: &mut Cpu,
        max: u64,
        lockstep: bool,
    ) -> Result<StepEvent, Box<Divergence>> {
        let mut left = max;
        let mut chain_from: Option<u64> = None;
        let mut ind_from = false;
        while left > 0 {
            if self.stop.load(Ordering::Relaxed) {
                self.stop.store(false, Ordering::Relaxed);
                break;
            }
            self.drain_dirty(cpu);
            self.sync_epoch(cpu);
            // A block may overrun the budget by up to MAX_BLOCK_INSNS - 1 instructions:
            // interpreting the tail of every batch instead cost more than the overrun.
            let mut mode = mode_bits(&cpu.s);
            // A pending interrupt is delivered by the interpreter's step (which polls the
            // controller itself), so poll here only before entering host code.
            if mode.is_some()
                && (cpu.ev.nmi_pending
                    || (cpu.s.eflags_raw & IF != 0
                        && cpu.intr.as_mut().is_some_and(|i| i.pending())))
            {
                mode = None;
            }
            let Some(mode) = mode else {
                chain_from = None;
                self.stats.interp_mode_steps += 1;
                left -= 1;
                match self.interp_step(cpu) {
                    StepEvent::Ok => continue,
                    ev => return Ok(ev),
                }
            };
            let eip = cpu.s.rip as u32;
            let user = cpu.s.cpl == 3;
            let Ok(phys) = cpu.mmu.translate(eip as u64, Access::Fetch, user) else {
                // The interpreter raises the #PF.
                chain_from = None;
                left -= 1;
                self.stats.interp_mode_steps += 1;
                match self.interp_step(cpu) {
                    StepEvent::Ok => continue,
                    ev => return Ok(ev),
                }
            };
            let key = (phys, mode, eip);
            let entry = match self.table.lookup(key) {
                Some(e) => e,
                None => self.translate(cpu, key, eip),
            };
            match entry {
                Entry::Interp(m) => {
                    chain_from = None;
                    ind_from = false;
                    *self.stats.fallbacks.entry(m).or_default() += 1;
                    left -= 1;
                    match self.interp_step(cpu) {
                        StepEvent::Ok => {}
                        ev => return Ok(ev),
                    }
                }
                Entry::Native(b) => {
                    if let Some(id) = chain_from.take() {
                        if !lockstep {
                            self.try_chain(id, b, eip);
                        }
                    }
                    if std::mem::take(&mut ind_from)
                        && !lockstep
                        && matches!(cpu.mmu.phys.kind(phys), PhysKind::Ram)
                    {
                        // Later RETs / JMP regs to here find the block inline.
                        let slot = emit::ind_index(phys);
                        self.ind[slot] = [
                            phys | (mode as u64) << 56,
                            eip as u64,
                            self.blocks[b as usize].entry as u64,
                            0,
                        ];
                    }
                    if lockstep {
                        let n = self.lockstep_block(cpu, b)?;
                        left = left.saturating_sub(n.max(1));
                    } else {
                        let (n, exit) = self.enter(cpu, b, left);
                        let why = if self.ctx.budget == 0 {
                            3
                        } else if exit == IND_MISS {
                            1
                        } else if exit == NO_CHAIN {
                            2
                        } else {
                            0
                        };
                        self.stats.exits[why] += 1;
                        left = left.saturating_sub(n.max(1));
                        ind_from = exit == IND_MISS;
                        chain_from = (exit != NO_CHAIN && exit != IND_MISS).then_some(exit);
                    }
                    self.stats.slow_paths += std::mem::take(&mut self.ctx.slow_calls);
                    if let Some(e) = self.ctx.exception.take() {
                        // A slow-path access faulted: state is at the instruction.
                        self.stats.faults += 1;
                        chain_from = None;
                        ind_from = false;
                        match cpu.raise(e) {
                            StepEvent::Ok => {}
                            ev => return Ok(ev),
                        }
                    }
                    for p in std::mem::take(&mut self.ctx.dirty) {
                        self.invalidate_page(p);
                    }
                }
            }
        }
        Ok(StepEvent::Ok)
    }

    fn interp_step(&mut self, cpu: &mut Cpu) -> StepEvent {
        let ev = cpu.step();
        self.drain_dirty(cpu);
        ev
    }

    /// Runs host code from block `b`; returns (guest instructions retired, exit id).
    fn enter(&mut self, cpu: &mut Cpu, b: u32, left: u64) -> (u64, u64) {
        // Blocks average about ten instructions; budgeting for the longest possible
        // ones made most dispatches end on the budget, in ever smaller steps.
        let budget = (left / BUDGET_INSNS_PER_BLOCK).clamp(1, MAX_CHAIN) as u32;
        self.enter_with_budget(cpu, b, budget)
    }

    fn enter_with_budget(&mut self, cpu: &mut Cpu, b: u32, budget: u32) -> (u64, u64) {
        let Some(block) = self.blocks.get(b as usize) else {
            return (0, NO_CHAIN);
        };
        let entry = block.entry;
        cpu.s.materialize_flags();
        cpu.mmu.sync_tlb();
        self.ctx.budget = budget;
        self.ctx.icount = 0;
        self.ctx.exit = NO_CHAIN;
        self.ctx.tlb = cpu.mmu.tlb.entries_ptr() as u64;
        self.ctx.ram_base = cpu.mmu.phys.ram().as_ptr() as u64;
        self.ctx.ind = self.ind.as_mut_ptr() as u64;
        self.ctx.mode = block.key.1;
        self.ctx.epoch = cpu.mmu.phys.epoch();
        let cpu_ptr: *mut Cpu = cpu;
        self.ctx.cpu = cpu_ptr;
        // SAFETY: taking the address of a field through a valid pointer.
        let state = unsafe { std::ptr::addr_of_mut!((*cpu_ptr).s) };
        // SAFETY: the region is executable and holds the trampoline and `entry`, a
        // block assembled for its address whose every path ends in the trampoline's
        // exit (directly or through chained blocks, each of which checks the budget on
        // entry, so the run is bounded). The host code reads and writes the `CpuState`
        // (GPRs, RIP, EFLAGS) and the `JitCtx` it is given, guest RAM through host
        // pointers from TLB entries that are valid for the current physical-map epoch
        // (`sync_tlb` above; the TLB array is not reallocated during the call), and
        // calls `jit_slow` with the context, whose `cpu` pointer and `state` both derive
        // from `cpu_ptr`; nothing else accesses the CPU or the context meanwhile.
        unsafe { (self.enter_fn)(state, &mut *self.ctx, entry) };
        self.ctx.cpu = std::ptr::null_mut();
        let n = self.ctx.icount;
        self.stats.dispatches += 1;
        self.stats.executed += (budget - self.ctx.budget) as u64;
        self.stats.native_insns += n;
        cpu.stats.instructions += n;
        (n, self.ctx.exit)
    }

    fn lockstep_block(&mut self, cpu: &mut Cpu, b: u32) -> Result<u64, Box<Divergence>> {
        self.lockstep_check(cpu, b)
    }

    fn try_chain(&mut self, id: u64, b: u32, eip: u32) {
        let Some(stub) = self.stubs.get(id as usize) else {
            return;
        };
        let (Some(from), Some(to)) = (
            self.blocks.get(stub.block as usize),
            self.blocks.get(b as usize),
        ) else {
            return;
        };
        if stub.chained
            || stub.target != eip
            || !from.valid
            || !to.valid
            || from.key.1 != to.key.1
            || from.key.0 / PAGE_SIZE != to.key.0 / PAGE_SIZE
        {
            return;
        }
        if let Some(j) = emit::jmp_rel32(stub.addr, to.entry) {
            let addr = stub.addr;
            self.region.patch(addr, &j);
            self.stubs[id as usize].chained = true;
            self.stats.chained += 1;
        }
    }

    /// Invalidates the blocks of every code page written since the last call.
    fn drain_dirty(&mut self, cpu: &mut Cpu) {
        if cpu.mmu.phys.has_dirty_code() {
            for p in cpu.take_dirty_code() {
                self.invalidate_page(p);
            }
        }
    }

    /// Drops every block (and interpreter marker) of the physical page holding `phys`.
    /// Chained jumps into a dropped block land on its entry, which now jumps to its
    /// reentry stub and so back to the dispatcher.
    pub fn invalidate_page(&mut self, phys: u64) {
        let page = phys & !(PAGE_SIZE - 1);
        for e in self.table.take_page(page) {
            if let Entry::Native(b) = e {
                let Some(bl) = self.blocks.get_mut(b as usize) else {
                    continue;
                };
                if !bl.valid {
                    continue;
                }
                bl.valid = false;
                let (entry, reentry) = (bl.entry, bl.reentry);
                // The only slot of the indirect-branch table that can lead here.
                let slot = &mut self.ind[emit::ind_index(bl.key.0)];
                if slot[2] == entry as u64 {
                    *slot = [u64::MAX, 0, 0, 0];
                }
                if let Some(j) = emit::jmp_rel32(entry, reentry) {
                    self.region.patch(entry, &j);
                }
                self.stats.invalidated += 1;
            }
        }
    }

    /// Forgets every block and empties the code cache.
    pub fn flush(&mut self) {
        self.region.flush();
        self.table.clear();
        self.blocks.clear();
        self.stubs.clear();
        self.ind.fill([u64::MAX, 0, 0, 0]);
        self.stats.flushes += 1;
    }

    /// Flushes everything if the physical map changed (another machine, A20 moved, a
    /// ROM or device window added): physical addresses may mean other bytes now.
    fn sync_epoch(&mut self, cpu: &Cpu) {
        if cpu.mmu.phys.epoch() != self.epoch {
            if !self.blocks.is_empty() || !self.table.is_empty() {
                self.flush();
            }
            self.epoch = cpu.mmu.phys.epoch();
        }
    }

    fn translate(&mut self, cpu: &mut Cpu, key: BlockKey, eip: u32) -> Entry {
        self.sync_epoch(cpu);
        let phys = key.0;
        let page = phys & !(PAGE_SIZE - 1);
        // Translate from plain RAM pages and whole ROM pages only: reading the rest of
        // a page that holds a device window would have side effects, and code in MMIO
        // (or nowhere) is fetched anew by the interpreter each time.
        let plain = cpu.mmu.phys.ram_page_ptr(phys).is_some();
        let rom = cpu.mmu.phys.kind(page) == PhysKind::Rom
            && cpu.mmu.phys.kind(page + PAGE_SIZE - 1) == PhysKind::Rom;
        if !plain && !rom {
            return Entry::Interp(Mnemonic::INVALID);
        }
        let mut bytes = vec![0u8; (page + PAGE_SIZE - phys) as usize];
        cpu.mmu.phys.read(phys, &mut bytes);
        if self.one_insn_blocks {
            lockstep::cut_to_one_instruction(&mut bytes, eip);
        }
        // Writes to this page now take the MMU's slow path and are reported.
        cpu.mmu.mark_code(phys);
        let mut fs_gs = 0;
        if key.1 & MODE_FS != 0 {
            fs_gs |= translate::SEG_FS_OK;
        }
        if key.1 & MODE_GS != 0 {
            fs_gs |= translate::SEG_GS_OK;
        }
        if key.1 & x87::MODE_X87 != 0 {
            fs_gs |= x87::PLAN_X87;
        }
        let plan = match plan_block(&bytes, eip, key.1 & MODE_FLAT_DATA != 0, fs_gs) {
            Ok(p) => p,
            Err(m) => {
                if self.table.len() >= MAX_TABLE {
                    self.flush();
                }
                let e = Entry::Interp(m.unwrap_or(Mnemonic::INVALID));
                self.table.insert(key, e, &[page]);
                return e;
            }
        };
        if self.region.free() < BLOCK_RESERVE || self.table.len() >= MAX_TABLE {
            self.flush();
        }
        // Exit stubs: chainable when the target lies in the block's own page.
        let same_page = |t: u32| t as u64 / PAGE_SIZE == eip as u64 / PAGE_SIZE;
        let targets: Vec<(u32, bool)> = match plan.term {
            Term::Fall { next, chainable } => vec![(next, chainable && same_page(next))],
            Term::Jmp { target } => vec![(target, same_page(target))],
            Term::Jcc { target, next, .. } => {
                vec![(next, same_page(next)), (target, same_page(target))]
            }
            Term::Call { target, .. } => vec![(target, same_page(target))],
            Term::JmpReg { .. }
            | Term::Ret { .. }
            | Term::CallReg { .. }
            | Term::JmpMem
            | Term::CallMem
            | Term::InterpBranch => Vec::new(),
        };
        let mut ids = Vec::new();
        let mut next_id = self.stubs.len() as u64;
        for &(target, chain) in &targets {
            if chain {
                ids.push(next_id);
                next_id += 1;
            } else if !same_page(target) {
                ids.push(emit::IND_LOOKUP);
            } else {
                ids.push(NO_CHAIN);
            }
        }
        let base = self.region.next_addr();
        let held: Box<[Instruction]> = plan
            .insns
            .iter()
            .filter(|g| {
                matches!(
                    g.kind,
                    translate::Kind::Interp | translate::Kind::Rep { .. }
                )
            })
            .map(|g| g.instr)
            .collect();
        let tgt = emit::Targets {
            exit: self.exit_addr,
            slow: self.slow_addr,
            interp: self.interp_addr,
            held: held.as_ptr() as usize,
            tlb_set: if key.1 & 3 == 3 {
                emit::TLB_USER_SET
            } else {
                0
            },
            mode: key.1,
            flag_free: self.flag_free_probe,
        };
        let Some(em) = emit::emit_block(&plan, base, &ids, &tgt) else {
            log::error!("jit: cannot assemble block at {eip:#x}; interpreting");
            let e = Entry::Interp(Mnemonic::INVALID);
            return e;
        };
        let Some(at) = self.region.push(&em.code) else {
            // BLOCK_RESERVE exceeds any block, so this only happens for a tiny cache.
            log::error!("jit: block at {eip:#x} does not fit the code cache; interpreting");
            return Entry::Interp(Mnemonic::INVALID);
        };
        debug_assert_eq!(at, base);
        let b = self.blocks.len() as u32;
        for (k, &(target, _)) in targets.iter().enumerate() {
            if ids[k] != NO_CHAIN && ids[k] != emit::IND_LOOKUP {
                self.stubs.push(Stub {
                    block: b,
                    addr: at + em.stubs[k],
                    target,
                    chained: false,
                });
            }
        }
        self.blocks.push(Block {
            key,
            eip,
            start: at,
            len: em.code.len(),
            entry: at + em.entry,
            reentry: at + em.reentry,
            guest: bytes[..plan.guest_len as usize].to_vec(),
            held,
            ranges: em.ranges.iter().map(|&(s, e)| (at + s, at + e)).collect(),
            undefined: plan.undefined_at_exit,
            valid: true,
        });
        self.stats.translated += 1;
        let e = Entry::Native(b);
        self.table.insert(key, e, &[page]);
        if self.dump_blocks {
            eprint!("{}", self.listing(b as usize));
        }
        e
    }

    /// The listing of the block at (`phys`, `mode`, `eip`): guest instructions, each
    /// followed by the host code made from it.
    pub fn dump_block(&self, phys: u64, mode: u8, eip: u32) -> Option<String> {
        match self.table.get((phys, mode, eip))? {
            Entry::Native(b) => Some(self.listing(b as usize)),
            Entry::Interp(m) => Some(format!("{phys:#x}: interpreted ({m:?})\n")),
        }
    }

    fn listing(&self, b: usize) -> String {
        let bl = &self.blocks[b];
        let mut out = String::new();
        let mut fmt = IntelFormatter::new();
        fmt.options_mut().set_uppercase_hex(false);
        fmt.options_mut().set_hex_prefix("0x");
        fmt.options_mut().set_hex_suffix("");
        let _ = writeln!(
            out,
            "block phys {:#x} mode {} eip {:#010x}: {} guest instructions, {} host bytes at +{:#x}",
            bl.key.0,
            bl.key.1,
            bl.eip,
            bl.ranges.len(),
            bl.len,
            bl.start - self.region.base()
        );
        let host = |out: &mut String, fmt: &mut IntelFormatter, from: usize, to: usize| {
            let Some(bytes) = self.region.bytes(from, to - from) else {
                return;
            };
            // Addresses are shown as offsets from the start of the code cache, so a
            // listing does not depend on where the host mapped the cache.
            let base = self.region.base();
            let mut d = Decoder::with_ip(64, bytes, (from - base) as u64, DecoderOptions::NONE);
            for i in d.iter() {
                let mut t = String::new();
                fmt.format(&i, &mut t);
                let _ = writeln!(out, "        {:6x}  {t}", i.ip());
            }
        };
        let entry_end = bl.ranges.first().map_or(bl.reentry, |r| r.0);
        let _ = writeln!(out, "  (entry: budget check, instruction count)");
        host(&mut out, &mut fmt, bl.entry, entry_end);
        let mut last_end = entry_end;
        let insns: Vec<Instruction> =
            Decoder::with_ip(32, &bl.guest, bl.eip as u64, DecoderOptions::NONE)
                .iter()
                .collect();
        for (i, &(s, e)) in insns.iter().zip(bl.ranges.iter()) {
            let mut t = String::new();
            fmt.format(i, &mut t);
            let _ = writeln!(out, "  {:08x}  {t}", i.ip32());
            host(&mut out, &mut fmt, s, e);
            last_end = e;
        }
        if last_end < bl.reentry {
            let _ = writeln!(out, "  (out of line: exit stubs, slow paths)");
            host(&mut out, &mut fmt, last_end, bl.reentry);
        }
        out
    }
}

#[cfg(test)]
mod tests;
