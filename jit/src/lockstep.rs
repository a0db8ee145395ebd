//! Lock-step checking: every translated block runs in both engines and the results are
//! compared (ARCHITECTURE.md section 7: the JIT's oracle is the interpreter).
//!
//! For one block, from state S0:
//! 1. the interpreter runs the block's instructions (`Cpu::try_step`, one per guest
//!    instruction of the block) with the MMU's [`WriteLog`] on, which records every
//!    guest RAM write (physical address, old and new bytes) and notes any access to a
//!    device window. It stops early at a fault (not delivered) and right after a write
//!    to a page holding code (where translated code leaves its block too);
//! 2. if a device was touched (MMIO) or the paging registers changed, the side effects
//!    cannot be replayed: the interpreter's result stands and the block is counted in
//!    [`LockstepStats::interp_only`];
//! 3. otherwise the pages the interpreter wrote are copied, its writes are undone
//!    (newest first), the code-page marks its writes cleared are set again, and the
//!    state goes back to S0;
//! 4. the translated block runs (budget of one block) with the write log on again (so
//!    writes made by its slow paths are seen too);
//! 5. compared: instructions retired, the fault raised (vector, error code, CR2), GPRs,
//!    EIP, EFLAGS except the flags architecturally undefined at that point (worked out
//!    here from iced-x86's per-instruction flag info, not from the translator's), the
//!    segment registers, control registers, x87 and SSE state, and every byte of every
//!    page the interpreter wrote. A slow-path write of the translated block to a page
//!    the interpreter did not write is a divergence as well.
//!
//! On success the translated block's state is kept (so the machine runs as under
//! `-accel jit`, checked block by block).
//!
//! Not seen: a store made by translated code through its inline TLB fast path to a page
//! the interpreter did not write at all (an address computed wrongly *and* landing on
//! another page); the interpreter's write to the right address is then missing, which is
//! seen unless the value written equals the old one. Accessed and dirty bits set by page
//! walks are not undone (both engines use the same walker, and setting them again
//! changes nothing); TLB entries the interpreter filled stay, so the translated block
//! finds them and takes its fast paths more often than it otherwise would.

use crate::translate::count_dependent;
use crate::Jit;
use iced_x86::{Decoder, DecoderOptions, Instruction, OpKind, RflagsBits};
use morph86_cpu::exception::Exception;
use morph86_cpu::state::{AC, AF, CF, DF, IF, OF, PF, SF, ZF};
use morph86_cpu::{Cpu, CpuState};
use morph86_mmu::{WriteLog, PAGE_SIZE};

/// Counters of the lock-step checker (part of [`crate::JitStats`]).
#[derive(Debug, Clone, Default)]
pub struct LockstepStats {
    /// Blocks run in both engines and found equal.
    pub blocks: u64,
    /// Guest instructions compared (retired by both engines).
    pub insns: u64,
    /// Blocks whose comparison included a fault raised in the block.
    pub faults: u64,
    /// Bytes of guest memory written by the interpreter and found equal.
    pub bytes: u64,
    /// Blocks that wrote to a page holding code (left early by both engines).
    pub code_writes: u64,
    /// Blocks run by the interpreter only (device access or paging change: not replayable).
    pub interp_only: u64,
}

impl std::fmt::Display for LockstepStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "lockstep: {} blocks / {} instructions compared clean ({} with a fault, {} writing code), {} bytes written compared, {} blocks interpreter-only (device access)",
            self.blocks, self.insns, self.faults, self.code_writes, self.bytes, self.interp_only
        )
    }
}

/// One byte of guest memory that differs after the two runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct MemDiff {
    /// Physical address.
    pub addr: u64,
    /// The byte after the translated block.
    pub jit: u8,
    /// The byte after the interpreter.
    pub interp: u8,
}

/// A divergence found in lock-step mode: both engines' results for one block.
#[derive(Debug, Clone)]
pub struct Divergence {
    /// Guest EIP of the block.
    pub eip: u32,
    /// What differs, in words.
    pub reason: String,
    /// Listing of the block (guest instructions and host code, as `--dump-blocks`).
    pub listing: String,
    /// State after the translated block.
    pub jit: Box<CpuState>,
    /// State after the interpreter ran the same instructions.
    pub interp: Box<CpuState>,
    /// Guest instructions retired by the translated block.
    pub jit_insns: u64,
    /// Guest instructions retired by the interpreter.
    pub interp_insns: u64,
    /// Fault raised by the translated block, if any.
    pub jit_fault: Option<Exception>,
    /// Fault raised by the interpreter, if any.
    pub interp_fault: Option<Exception>,
    /// EFLAGS bits undefined at the compared point (not compared).
    pub undefined: u32,
    /// The translator's own idea of the flags undefined at the block's end (shown for
    /// comparison; the check uses `undefined`).
    pub translator_undefined: u32,
    /// Differing memory bytes (at most [`MAX_MEM_DIFFS`]).
    pub memory: Vec<MemDiff>,
}

/// Most differing memory bytes a [`Divergence`] lists.
pub const MAX_MEM_DIFFS: usize = 64;

const GPR_NAMES: [&str; 8] = ["eax", "ecx", "edx", "ebx", "esp", "ebp", "esi", "edi"];
const SEG_NAMES: [&str; 6] = ["es", "cs", "ss", "ds", "fs", "gs"];

impl std::fmt::Display for Divergence {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        writeln!(f, "lock-step divergence in block at {:#010x}:", self.eip)?;
        writeln!(f, "  {}", self.reason)?;
        writeln!(
            f,
            "  instructions: jit {} interp {}{}",
            self.jit_insns,
            self.interp_insns,
            mark(self.jit_insns != self.interp_insns)
        )?;
        writeln!(
            f,
            "  fault: jit {:?} interp {:?}{}",
            self.jit_fault,
            self.interp_fault,
            mark(self.jit_fault != self.interp_fault)
        )?;
        let (j, i) = (&self.jit, &self.interp);
        for (r, n) in GPR_NAMES.iter().enumerate() {
            let (a, b) = (j.gpr[r] as u32, i.gpr[r] as u32);
            writeln!(f, "  {n}: jit {a:08x} interp {b:08x}{}", mark(a != b))?;
        }
        writeln!(
            f,
            "  eip: jit {:08x} interp {:08x}{}",
            j.rip as u32,
            i.rip as u32,
            mark(j.rip as u32 != i.rip as u32)
        )?;
        let (fa, fb) = (j.eflags(), i.eflags());
        writeln!(
            f,
            "  eflags: jit {fa:08x} interp {fb:08x} (undefined {:08x}, translator says {:08x}){}",
            self.undefined,
            self.translator_undefined,
            mark((fa ^ fb) & !self.undefined != 0)
        )?;
        for (r, n) in SEG_NAMES.iter().enumerate() {
            let (a, b) = (j.seg[r], i.seg[r]);
            if a != b {
                writeln!(f, "  {n}: jit {a:x?}\n      interp {b:x?}  <--")?;
            }
        }
        for (n, a, b) in [
            ("cr0", j.cr0, i.cr0),
            ("cr2", j.cr2, i.cr2),
            ("cr3", j.cr3, i.cr3),
            ("cr4", j.cr4, i.cr4),
        ] {
            if a != b {
                writeln!(f, "  {n}: jit {a:08x} interp {b:08x}  <--")?;
            }
        }
        if j.fpu != i.fpu {
            writeln!(f, "  x87 state differs  <--")?;
        }
        if j.sse != i.sse {
            writeln!(f, "  SSE state differs  <--")?;
        }
        if j.cpl != i.cpl || j.inhibit_irq != i.inhibit_irq || j.halted != i.halted {
            writeln!(
                f,
                "  cpl/inhibit/halted: jit {}/{}/{} interp {}/{}/{}  <--",
                j.cpl, j.inhibit_irq, j.halted, i.cpl, i.inhibit_irq, i.halted
            )?;
        }
        for d in &self.memory {
            writeln!(
                f,
                "  mem {:#010x}: jit {:02x} interp {:02x}  <--",
                d.addr, d.jit, d.interp
            )?;
        }
        write!(f, "{}", self.listing)
    }
}

fn mark(differs: bool) -> &'static str {
    if differs {
        "  <--"
    } else {
        ""
    }
}

/// EFLAGS bits of iced-x86's `RflagsBits` mask.
fn eflags_of(r: u32) -> u32 {
    const MAP: [(u32, u32); 9] = [
        (RflagsBits::OF, OF),
        (RflagsBits::SF, SF),
        (RflagsBits::ZF, ZF),
        (RflagsBits::AF, AF),
        (RflagsBits::CF, CF),
        (RflagsBits::PF, PF),
        (RflagsBits::DF, DF),
        (RflagsBits::IF, IF),
        (RflagsBits::AC, AC),
    ];
    MAP.iter()
        .filter(|(i, _)| r & i != 0)
        .fold(0, |acc, (_, e)| acc | e)
}

/// EFLAGS bits architecturally undefined after `insns` ran in order (from a state
/// whose flags are all defined). A shift or rotate whose count may be zero leaves the
/// flags alone, so it only adds to the set.
pub fn undefined_after(insns: &[Instruction]) -> u32 {
    let mut und = 0u32;
    for i in insns {
        let undefined = eflags_of(i.rflags_undefined());
        let modified = eflags_of(i.rflags_modified());
        let fixed_nonzero_count = i.op_count() >= 2
            && matches!(i.op1_kind(), OpKind::Immediate8)
            && i.immediate8() & 0x1f != 0
            || i.op_count() == 1;
        if count_dependent(i) && !fixed_nonzero_count {
            und |= undefined;
        } else {
            und = (und & !modified) | undefined;
        }
    }
    und
}

/// The names of the state parts (besides undefined flags) in which `a` and `b` differ.
fn state_diffs(a: &CpuState, b: &CpuState, und: u32) -> Vec<&'static str> {
    let mut v = Vec::new();
    for r in 0..8 {
        if a.gpr[r] as u32 != b.gpr[r] as u32 {
            v.push(GPR_NAMES[r]);
        }
    }
    if a.rip as u32 != b.rip as u32 {
        v.push("eip");
    }
    if (a.eflags() ^ b.eflags()) & !und != 0 {
        v.push("eflags");
    }
    for r in 0..6 {
        if a.seg[r] != b.seg[r] {
            v.push(SEG_NAMES[r]);
        }
    }
    if a.cr0 != b.cr0 || a.cr2 != b.cr2 || a.cr3 != b.cr3 || a.cr4 != b.cr4 {
        v.push("control registers");
    }
    if a.fpu != b.fpu {
        v.push("x87");
    }
    if a.sse != b.sse {
        v.push("sse");
    }
    if a.cpl != b.cpl || a.inhibit_irq != b.inhibit_irq || a.halted != b.halted {
        v.push("cpl/inhibit/halted");
    }
    v
}

impl Jit {
    /// Runs block `b` in both engines and compares (see the module documentation).
    /// Returns the guest instructions retired; a fault the block raised is left in
    /// `ctx.exception` for the dispatcher to deliver, as after [`Jit::run`]'s blocks.
    pub(crate) fn lockstep_check(&mut self, cpu: &mut Cpu, b: u32) -> Result<u64, Box<Divergence>> {
        let Some(bl) = self.blocks.get(b as usize) else {
            return Ok(0);
        };
        let eip = bl.eip;
        let translator_undefined = bl.undefined;
        let insns: Vec<Instruction> =
            Decoder::with_ip(32, &bl.guest, eip as u64, DecoderOptions::NONE)
                .iter()
                .collect();
        cpu.s.materialize_flags();
        let s0 = cpu.s.clone();
        let count0 = cpu.stats.instructions;
        let regs0 = cpu.mmu.paging_regs();

        // 1. The interpreter, every write logged.
        cpu.mmu.start_write_log(Box::default());
        let mut snaps = vec![s0.clone()];
        let mut interp_fault = None;
        let mut wrote_code = false;
        for _ in 0..insns.len() {
            match cpu.try_step() {
                Ok(()) => {
                    cpu.s.materialize_flags();
                    snaps.push(cpu.s.clone());
                    if cpu.mmu.phys.has_dirty_code() {
                        // Translated code leaves its block right after such a write.
                        wrote_code = true;
                        break;
                    }
                }
                Err(e) => {
                    interp_fault = Some(e);
                    break;
                }
            }
        }
        let ilog: Box<WriteLog> = cpu.mmu.stop_write_log().unwrap_or_default();
        let ni = (snaps.len() - 1) as u64;
        let interp_state = cpu.s.clone();

        // 2. Side effects that cannot be replayed: the interpreter's run stands.
        if ilog.touched_device() || cpu.mmu.paging_regs() != regs0 {
            self.stats.lockstep.interp_only += 1;
            self.ctx.exception = interp_fault;
            return Ok(ni);
        }

        // 3. Keep what the interpreter left in the pages it wrote, then undo.
        let pages = ilog.pages();
        let expected: Vec<(u64, Vec<u8>)> = pages
            .iter()
            .map(|&p| {
                let mut v = vec![0u8; PAGE_SIZE as usize];
                cpu.mmu.phys.read(p, &mut v);
                (p, v)
            })
            .collect();
        ilog.undo(&mut cpu.mmu.phys);
        if cpu.mmu.phys.has_dirty_code() {
            // The interpreter's code-write notices (its decode cache drops those pages);
            // the translated block's own write to the page, marked again just below,
            // raises them anew.
            let _ = cpu.take_dirty_code();
        }
        for &p in ilog.code_pages() {
            cpu.mmu.mark_code(p);
        }
        cpu.s = s0;
        cpu.stats.instructions = count0;

        // 4. The translated block.
        cpu.mmu.start_write_log(Box::default());
        let (nj, _) = self.enter_with_budget(cpu, b, 1);
        let jlog: Box<WriteLog> = cpu.mmu.stop_write_log().unwrap_or_default();
        let jit_fault = self.ctx.exception;

        // 5. Compare.
        let mut reasons: Vec<String> = Vec::new();
        if nj != ni {
            reasons.push(format!("instructions retired: jit {nj} interp {ni}"));
        }
        if jit_fault != interp_fault {
            reasons.push("faults differ".into());
        }
        let at = (nj.min(ni)) as usize;
        let undefined = undefined_after(&insns[..at.min(insns.len())]);
        let diffs = state_diffs(&cpu.s, &interp_state, undefined);
        if !diffs.is_empty() {
            reasons.push(format!("state differs: {}", diffs.join(", ")));
        }
        let mut memory = Vec::new();
        let mut mem_diffs = 0usize;
        for (p, want) in &expected {
            let mut have = vec![0u8; PAGE_SIZE as usize];
            cpu.mmu.phys.read(*p, &mut have);
            if have != *want {
                for (k, (h, w)) in have.iter().zip(want.iter()).enumerate() {
                    if h != w {
                        mem_diffs += 1;
                        if memory.len() < MAX_MEM_DIFFS {
                            memory.push(MemDiff {
                                addr: p + k as u64,
                                jit: *h,
                                interp: *w,
                            });
                        }
                    }
                }
            }
        }
        if mem_diffs > 0 {
            reasons.push(format!("{mem_diffs} bytes of memory differ"));
        }
        let stray: Vec<u64> = jlog
            .pages()
            .into_iter()
            .filter(|p| pages.binary_search(p).is_err())
            .collect();
        if !stray.is_empty() {
            reasons.push(format!(
                "translated code wrote pages the interpreter did not: {stray:#x?}"
            ));
        }
        if jlog.touched_device() {
            reasons.push("translated code touched a device the interpreter did not".into());
        }
        if reasons.is_empty() {
            let st = &mut self.stats.lockstep;
            st.blocks += 1;
            st.insns += nj;
            st.faults += jit_fault.is_some() as u64;
            st.code_writes += wrote_code as u64;
            st.bytes += ilog.writes().map(|w| w.new.len() as u64).sum::<u64>();
            return Ok(nj);
        }
        Err(Box::new(Divergence {
            eip,
            reason: reasons.join("; "),
            listing: self.listing(b as usize),
            jit: Box::new(cpu.s.clone()),
            interp: Box::new(interp_state),
            jit_insns: nj,
            interp_insns: ni,
            jit_fault,
            interp_fault,
            undefined,
            translator_undefined,
            memory,
        }))
    }
}
