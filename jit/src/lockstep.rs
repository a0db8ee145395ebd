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
//!    segment registers, control registers, descriptor-table registers (GDTR, IDTR,
//!    LDTR, TR), CR8, EFER, the MSRs, debug registers, CPL, the interrupt shadow, HLT
//!    and NMI blocking, x87 and SSE state, and every byte of every page the interpreter
//!    wrote. A slow-path write of the translated block to a page the interpreter did
//!    not write is a divergence as well.
//!
//! On success the translated block's state is kept (so the machine runs as under
//! `-accel jit`, checked block by block).
//!
//! Cost: the interpreter's run is most of it. Per block the checker copies the state
//! once (and swaps it with the interpreter's), keeps per instruction only the GPRs,
//! EIP, lazy flags and a few bits (segment and control registers only for blocks with
//! an instruction that may change them), copies and compares each written page once,
//! and reuses every buffer and the decoded block (by block number, dropped at a cache
//! flush).
//!
//! Not seen: a store made by translated code through its inline TLB fast path to a page
//! the interpreter did not write at all (an address computed wrongly *and* landing on
//! another page); the interpreter's write to the right address is then missing, which is
//! seen unless the value written equals the old one. Accessed and dirty bits set by page
//! walks are not undone (both engines use the same walker, and setting them again
//! changes nothing); TLB entries the interpreter filled stay, so the translated block
//! finds them and takes its fast paths more often than it otherwise would.

use crate::cache::Entry;
use crate::translate::count_dependent;
use crate::{mode_bits, Jit};
use iced_x86::{
    Decoder, DecoderOptions, FlowControl, Instruction, Mnemonic, OpKind, Register, RflagsBits,
};
use morph86_cpu::exception::Exception;
use morph86_cpu::flags::LazyFlags;
use morph86_cpu::state::{AC, AF, CF, DF, IF, OF, PF, SF, ZF};
use morph86_cpu::{Cpu, CpuState, Segment};
use morph86_mmu::{Access, PhysMem, WriteLog, PAGE_SIZE};
use std::cell::RefCell;

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
    /// Blocks run by the interpreter only (port I/O, time stamp, device access or
    /// paging change: not replayable).
    pub interp_only: u64,
    /// Blocks whose translated code left before the interpreter's run ended (compared
    /// at the point it left).
    pub early_exits: u64,
    /// Blocks whose engines differed only in undefined flags copied as data (see
    /// [`leaked_undefined`]).
    pub undefined_leaks: u64,
}

impl std::fmt::Display for LockstepStats {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "lockstep: {} blocks / {} instructions compared clean ({} with a fault, {} writing code, {} left early, {} differing only in undefined flags copied by PUSHF/LAHF), {} bytes written compared, {} blocks interpreter-only (I/O, devices)",
            self.blocks, self.insns, self.faults, self.code_writes, self.early_exits, self.undefined_leaks, self.bytes, self.interp_only
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
        for (n, a, b) in [("ldtr", j.ldtr, i.ldtr), ("tr", j.tr, i.tr)] {
            if a != b {
                writeln!(f, "  {n}: jit {a:x?}\n      interp {b:x?}  <--")?;
            }
        }
        if j.gdtr != i.gdtr || j.idtr != i.idtr {
            writeln!(
                f,
                "  gdtr/idtr: jit {:x?} {:x?}\n      interp {:x?} {:x?}  <--",
                j.gdtr, j.idtr, i.gdtr, i.idtr
            )?;
        }
        if j.cr8 != i.cr8 || j.efer != i.efer || j.dr != i.dr {
            writeln!(
                f,
                "  cr8/efer/dr: jit {:x} {:x} {:x?}\n      interp {:x} {:x} {:x?}  <--",
                j.cr8, j.efer, j.dr, i.cr8, i.efer, i.dr
            )?;
        }
        if j.msr != i.msr {
            writeln!(f, "  msr: jit {:x?}\n      interp {:x?}  <--", j.msr, i.msr)?;
        }
        if j.nmi_blocked != i.nmi_blocked {
            writeln!(
                f,
                "  nmi blocked: jit {} interp {}  <--",
                j.nmi_blocked, i.nmi_blocked
            )?;
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

/// Instructions whose effects cannot be replayed (port I/O, MSR writes such as the
/// time-stamp counter's, which live outside `CpuState`) or differ between two runs
/// (time stamp, MSR reads, hardware random numbers): a block holding one runs in the
/// interpreter only.
fn not_replayable(m: Mnemonic) -> bool {
    use Mnemonic::*;
    matches!(
        m,
        In | Out
            | Insb
            | Insw
            | Insd
            | Outsb
            | Outsw
            | Outsd
            | Rdtsc
            | Rdtscp
            | Rdpmc
            | Rdrand
            | Rdseed
            | Rdmsr
            | Wrmsr
    )
}

/// Whether `i` may change a segment register or a control register when it completes
/// (explicit register operands, segment loads, far transfers, interrupts, CR0 writers).
/// Conservative: a wrong `false` could only make an early-exit comparison use the
/// block's final segment and control registers for an earlier point.
fn may_change_seg_or_cr(i: &Instruction) -> bool {
    use Mnemonic::*;
    let heavy_reg = |r: Register| r.is_segment_register() || r.is_cr();
    (0..i.op_count()).any(|n| i.op_kind(n) == OpKind::Register && heavy_reg(i.op_register(n)))
        || matches!(
            i.mnemonic(),
            Lds | Les | Lfs | Lgs | Lss | Clts | Lmsw | Iret | Iretd | Iretq | Retf | Rsm | Loadall
        )
        || matches!(
            i.flow_control(),
            FlowControl::Interrupt | FlowControl::Exception
        )
        || i.is_jmp_far()
        || i.is_jmp_far_indirect()
        || i.is_call_far()
        || i.is_call_far_indirect()
}

/// The undefined EFLAGS bits that instructions among `insns` copy into registers or
/// memory as data (PUSHF/PUSHFD, LAHF), as a mask over a 32-bit value: the bits
/// themselves, and the low byte again in bits 8-15 (LAHF's AH).
///
/// Where flags are undefined the host CPU (under translated code) and the interpreter
/// may legitimately pick different values (Linux's `local_irq_save` pushes EFLAGS right
/// after a `shl reg, cl` whose AF is undefined); a value copied from them differs in
/// these bits only, and such differences are tolerated.
pub fn leaked_undefined(insns: &[Instruction]) -> u32 {
    let mut leak = 0;
    for (k, i) in insns.iter().enumerate() {
        if matches!(
            i.mnemonic(),
            Mnemonic::Pushf | Mnemonic::Pushfd | Mnemonic::Lahf
        ) {
            leak |= undefined_after(&insns[..k]);
        }
    }
    leak | (leak & 0xff) << 8
}

/// `leak` (see [`leaked_undefined`]) as a mask for one byte of a copied value.
fn leak_byte_mask(leak: u32) -> u8 {
    (leak | leak >> 8 | leak >> 16 | leak >> 24) as u8
}

/// The names of the state parts in which `a` and `b` differ, except the flags in `und`
/// and the bits of `leak` (see [`leaked_undefined`]).
fn state_diffs(a: &CpuState, b: &CpuState, und: u32, leak: u32) -> Vec<&'static str> {
    let mut v = Vec::new();
    let und = und | leak;
    for (r, n) in GPR_NAMES.iter().enumerate() {
        if (a.gpr[r] as u32 ^ b.gpr[r] as u32) & !leak != 0 {
            v.push(*n);
        }
    }
    if a.rip as u32 != b.rip as u32 {
        v.push("eip");
    }
    if (a.eflags() ^ b.eflags()) & !und != 0 {
        v.push("eflags");
    }
    for (r, n) in SEG_NAMES.iter().enumerate() {
        if a.seg[r] != b.seg[r] {
            v.push(*n);
        }
    }
    if a.cr0 != b.cr0 || a.cr2 != b.cr2 || a.cr3 != b.cr3 || a.cr4 != b.cr4 {
        v.push("control registers");
    }
    if a.ldtr != b.ldtr || a.tr != b.tr || a.gdtr != b.gdtr || a.idtr != b.idtr {
        v.push("descriptor table registers");
    }
    if a.cr8 != b.cr8 || a.efer != b.efer || a.msr != b.msr || a.dr != b.dr {
        v.push("cr8/efer/msr/debug registers");
    }
    if a.nmi_blocked != b.nmi_blocked {
        v.push("nmi blocking");
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

/// The registers a lock-step snapshot keeps after each interpreted instruction (the
/// whole state is kept only at the end of the interpreter's run). The flags stay in
/// their lazy form (worked out only if the snapshot is used); the segment and control
/// registers, which few instructions change, are kept once per change in
/// `Scratch::heavy`. Filled in place ([`Snap::fill`]): a snapshot built on the stack
/// and then pushed was copied with wider loads than its stores, a store-forwarding
/// stall that cost a fifth of the checker's own time.
#[derive(Clone, Copy, Default)]
struct Snap {
    gpr: [u64; 8],
    rip: u64,
    eflags_raw: u32,
    lazy: LazyFlags,
    cpl: u8,
    inhibit_irq: bool,
    halted: bool,
    /// Index in `Scratch::heavy` of the segment and control registers at this point.
    heavy: u32,
}

/// Segment and control registers at some point of an interpreted block.
#[derive(Clone, Copy)]
struct Heavy {
    seg: [Segment; 6],
    cr: [u64; 4],
}

impl Heavy {
    fn of(s: &CpuState) -> Heavy {
        Heavy {
            seg: s.seg,
            cr: [s.cr0, s.cr2, s.cr3, s.cr4],
        }
    }

    fn same(&self, s: &CpuState) -> bool {
        self.seg == s.seg && self.cr == [s.cr0, s.cr2, s.cr3, s.cr4]
    }
}

impl Snap {
    /// The registers of `s`; with `track`, its segment and control registers are
    /// compared with the last ones in `heavy` and added there if they changed (blocks
    /// whose instructions cannot change them, see [`may_change_seg_or_cr`], keep none:
    /// their final ones stand for every point).
    #[inline(always)]
    fn fill(&mut self, s: &CpuState, heavy: &mut Vec<Heavy>, track: bool) {
        if track && !heavy.last().is_some_and(|h| h.same(s)) {
            heavy.push(Heavy::of(s));
        }
        self.gpr.copy_from_slice(&s.gpr[..8]);
        self.rip = s.rip;
        self.eflags_raw = s.eflags_raw;
        self.lazy = s.lazy;
        self.cpl = s.cpl;
        self.inhibit_irq = s.inhibit_irq;
        self.halted = s.halted;
        self.heavy = heavy.len().wrapping_sub(1) as u32;
    }

    /// `full` with these registers (its other state, x87 and SSE included, stands for
    /// this point too).
    fn apply(&self, full: &CpuState, heavy: &[Heavy]) -> CpuState {
        let mut s = full.clone();
        s.gpr[..8].copy_from_slice(&self.gpr);
        s.rip = self.rip;
        s.eflags_raw = self.eflags_raw;
        s.lazy = self.lazy;
        s.materialize_flags();
        if let Some(h) = heavy.get(self.heavy as usize) {
            s.seg = h.seg;
            [s.cr0, s.cr2, s.cr3, s.cr4] = h.cr;
        }
        s.cpl = self.cpl;
        s.inhibit_irq = self.inhibit_irq;
        s.halted = self.halted;
        s
    }
}

/// A decoded block, kept between checks of the same block.
struct Decoded {
    eip: u32,
    /// The translator's undefined flags at the block's end (`Block::undefined`).
    undefined: u32,
    insns: Vec<Instruction>,
    io: bool,
    /// Some instruction may change segment or control registers.
    heavy: bool,
    /// [`leaked_undefined`] of the whole block.
    leak: u32,
}

const PAGE: usize = PAGE_SIZE as usize;

/// Buffers reused from block to block (the checker runs once per block executed).
#[derive(Default)]
struct Scratch {
    /// Decoded blocks by block number (numbers are reused only after a flush).
    decoded: Vec<Option<Decoded>>,
    /// `JitStats::flushes` when `decoded` was filled.
    flushes: u64,
    /// The state before the block, then (swapped) the interpreter's state after it.
    saved: Option<Box<CpuState>>,
    ilog: Option<Box<WriteLog>>,
    jlog: Option<Box<WriteLog>>,
    snaps: Vec<Snap>,
    heavy: Vec<Heavy>,
    marks: Vec<usize>,
    /// Pages the interpreter wrote, and their bytes as it left them.
    pages: Vec<u64>,
    page_buf: Vec<u8>,
    /// Pages written by the translated block.
    jpages: Vec<u64>,
    /// One page, for pages that are not plain RAM.
    buf: Vec<u8>,
}

thread_local! {
    static SCRATCH: RefCell<Scratch> = RefCell::new(Scratch::default());
}

/// The bytes of physical page `p`: RAM read in place, anything else through
/// [`PhysMem::read`] into `buf`.
fn page_bytes<'a>(phys: &'a mut PhysMem, p: u64, buf: &'a mut Vec<u8>) -> &'a [u8] {
    let at = p as usize;
    if at.checked_add(PAGE).is_some_and(|e| e <= phys.ram().len()) {
        &phys.ram()[at..at + PAGE]
    } else {
        buf.resize(PAGE, 0);
        phys.read(p, buf);
        buf
    }
}

impl Jit {
    /// Runs block `b` in both engines and compares (see the module documentation).
    /// Returns the guest instructions retired; a fault the block raised is left in
    /// `ctx.exception` for the dispatcher to deliver, as after [`Jit::run`]'s blocks.
    pub(crate) fn lockstep_check(&mut self, cpu: &mut Cpu, b: u32) -> Result<u64, Box<Divergence>> {
        SCRATCH.with(|sc| self.lockstep_check_with(cpu, b, &mut sc.borrow_mut()))
    }

    fn lockstep_check_with(
        &mut self,
        cpu: &mut Cpu,
        b: u32,
        sc: &mut Scratch,
    ) -> Result<u64, Box<Divergence>> {
        // Decoded once per block: a block number names one block until the cache is
        // flushed (blocks are only ever appended, and cleared by a flush).
        if sc.flushes != self.stats.flushes {
            sc.decoded.clear();
            sc.flushes = self.stats.flushes;
        }
        let bi = b as usize;
        if sc.decoded.len() <= bi {
            sc.decoded.resize_with(bi + 1, || None);
        }
        if sc.decoded[bi].is_none() {
            let Some(bl) = self.blocks.get(bi) else {
                return Ok(0);
            };
            let eip = bl.eip;
            let insns: Vec<Instruction> =
                Decoder::with_ip(32, &bl.guest, eip as u64, DecoderOptions::NONE)
                    .iter()
                    .collect();
            let io = insns.iter().any(|i| not_replayable(i.mnemonic()));
            let leak = leaked_undefined(&insns);
            let heavy = insns.iter().any(may_change_seg_or_cr);
            sc.decoded[bi] = Some(Decoded {
                eip,
                undefined: bl.undefined,
                insns,
                io,
                heavy,
                leak,
            });
        }
        let Scratch {
            decoded,
            saved,
            ilog,
            jlog,
            snaps,
            heavy,
            marks,
            pages,
            page_buf,
            jpages,
            buf,
            ..
        } = sc;
        let Some(dec) = decoded[bi].as_ref() else {
            return Ok(0);
        };
        let insns = &dec.insns[..];
        let (eip, translator_undefined) = (dec.eip, dec.undefined);
        cpu.s.materialize_flags();
        let saved = saved.get_or_insert_with(|| Box::new(cpu.s.clone()));
        (**saved).clone_from(&cpu.s);
        let count0 = cpu.stats.instructions;
        let regs0 = cpu.mmu.paging_regs();

        // 1. The interpreter, every write logged. `snaps[k]` / `marks[k]`: the registers
        // and the number of writes after k instructions.
        cpu.mmu.start_write_log(ilog.take().unwrap_or_default());
        if snaps.len() <= insns.len() {
            snaps.resize(insns.len() + 1, Snap::default());
        }
        heavy.clear();
        marks.clear();
        snaps[0].fill(&cpu.s, heavy, dec.heavy);
        marks.push(0);
        let mut ni = 0usize;
        let mut interp_fault = None;
        let mut wrote_code = false;
        for (k, i) in insns.iter().enumerate() {
            match cpu.try_step() {
                Ok(()) => {
                    ni = k + 1;
                    snaps[ni].fill(&cpu.s, heavy, dec.heavy);
                    marks.push(cpu.mmu.write_log().map_or(0, |l| l.len()));
                    if cpu.mmu.phys.has_dirty_code() {
                        // Translated code leaves its block right after such a write.
                        wrote_code = true;
                        break;
                    }
                    if k + 1 < insns.len() && cpu.s.rip != i.next_ip() {
                        // Left the block's straight line (a REP chunk that did not
                        // finish): translated code leaves the block there too.
                        break;
                    }
                }
                Err(e) => {
                    interp_fault = Some(e);
                    break;
                }
            }
        }
        let il: Box<WriteLog> = cpu.mmu.stop_write_log().unwrap_or_default();
        let ni = ni as u64;
        cpu.s.materialize_flags();

        // 2. Side effects that cannot be replayed: the interpreter's run stands.
        if dec.io || il.touched_device() || cpu.mmu.paging_regs() != regs0 {
            self.stats.lockstep.interp_only += 1;
            self.ctx.exception = interp_fault;
            *ilog = Some(il);
            return Ok(ni);
        }

        // 3. Keep what the interpreter left in the pages it wrote, then undo.
        il.pages_into(pages);
        page_buf.clear();
        for &p in pages.iter() {
            page_buf.extend_from_slice(page_bytes(&mut cpu.mmu.phys, p, buf));
        }
        il.undo(&mut cpu.mmu.phys);
        if cpu.mmu.phys.has_dirty_code() {
            // The interpreter's code-write notices (its decode cache drops those pages);
            // the translated block's own write to the page, marked again just below,
            // raises them anew.
            let _ = cpu.take_dirty_code();
        }
        for &p in il.code_pages() {
            cpu.mmu.mark_code(p);
        }
        // The state goes back to S0; `saved` keeps the interpreter's.
        std::mem::swap(&mut cpu.s, &mut **saved);
        let interp_state: &CpuState = saved;
        cpu.stats.instructions = count0;

        // 4. The translated block.
        cpu.mmu.start_write_log(jlog.take().unwrap_or_default());
        let (nj, _) = self.enter_with_budget(cpu, b, 1);
        let jl: Box<WriteLog> = cpu.mmu.stop_write_log().unwrap_or_default();
        let jit_fault = self.ctx.exception;

        // 5. Compare. Translated code may leave its block before the end (and the
        // remaining instructions then run afresh from the dispatcher), so it is
        // compared with the interpreter's state after as many instructions; a fault
        // must be the interpreter's, at the same instruction.
        let mut reasons: Vec<String> = Vec::new();
        if nj > ni || (jit_fault.is_some() && nj != ni) {
            reasons.push(format!("instructions retired: jit {nj} interp {ni}"));
        }
        if jit_fault.is_some() && jit_fault != interp_fault {
            reasons.push("faults differ".into());
        }
        let at = nj.min(ni) as usize;
        let (want_state, writes_kept) = if jit_fault.is_some() {
            (None, il.len())
        } else if at == ni as usize && interp_fault.is_none() {
            (None, marks[at])
        } else {
            (Some(snaps[at].apply(interp_state, heavy)), marks[at])
        };
        let want = want_state.as_ref().unwrap_or(interp_state);
        if at < ni as usize || (interp_fault.is_some() && jit_fault.is_none()) {
            self.stats.lockstep.early_exits += 1;
        }
        cpu.s.materialize_flags();
        let mut undefined = 0;
        if (cpu.s.eflags() ^ want.eflags()) != 0 {
            undefined = undefined_after(&insns[..at.min(insns.len())]);
        }
        let leak = dec.leak;
        let leak_byte = leak_byte_mask(leak);
        let mut leaked = leak != 0 && (0..8).any(|r| cpu.s.gpr[r] as u32 != want.gpr[r] as u32);
        let diffs = state_diffs(&cpu.s, want, undefined, leak);
        if !diffs.is_empty() {
            reasons.push(format!("state differs: {}", diffs.join(", ")));
        }
        // The pages as the interpreter left them after `writes_kept` writes: later
        // writes taken back, newest first.
        if writes_kept < il.len() {
            let later: Vec<_> = il.writes().skip(writes_kept).collect();
            for w in later.into_iter().rev() {
                let page = w.addr & !(PAGE_SIZE - 1);
                if let Ok(k) = pages.binary_search(&page) {
                    let off = k * PAGE + (w.addr - page) as usize;
                    page_buf[off..off + w.old.len()].copy_from_slice(w.old);
                }
            }
        }
        let mut memory = Vec::new();
        let mut mem_diffs = 0usize;
        for (k, &p) in pages.iter().enumerate() {
            let want = &page_buf[k * PAGE..(k + 1) * PAGE];
            let have = page_bytes(&mut cpu.mmu.phys, p, buf);
            if have != want {
                leaked |= leak != 0;
                for (o, (h, w)) in have.iter().zip(want.iter()).enumerate() {
                    if (h ^ w) & !leak_byte != 0 {
                        mem_diffs += 1;
                        if memory.len() < MAX_MEM_DIFFS {
                            memory.push(MemDiff {
                                addr: p + o as u64,
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
        if !jl.is_empty() {
            jl.pages_into(jpages);
            jpages.retain(|p| pages.binary_search(p).is_err());
            if !jpages.is_empty() {
                reasons.push(format!(
                    "translated code wrote pages the interpreter did not: {jpages:#x?}"
                ));
            }
        }
        if jl.touched_device() {
            reasons.push("translated code touched a device the interpreter did not".into());
        }
        let bytes = il.bytes_written();
        *ilog = Some(il);
        *jlog = Some(jl);
        if reasons.is_empty() {
            let st = &mut self.stats.lockstep;
            st.blocks += 1;
            st.insns += nj;
            st.faults += jit_fault.is_some() as u64;
            st.code_writes += wrote_code as u64;
            st.undefined_leaks += leaked as u64;
            st.bytes += bytes;
            return Ok(nj);
        }
        let undefined = undefined_after(&insns[..at.min(insns.len())]);
        let want = want.clone();
        Err(Box::new(Divergence {
            eip,
            reason: reasons.join("; "),
            listing: self.listing(b as usize),
            jit: Box::new(cpu.s.clone()),
            interp: Box::new(want),
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

/// What [`Jit::step_block`] did.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BlockStep {
    /// Nothing ran: the mode, the page or the first instruction is not translated (the
    /// caller runs the interpreter).
    Interpret,
    /// A translated block ran.
    Ran {
        /// Guest instructions retired.
        insns: u64,
        /// The fault raised, not delivered: the state is at the faulting instruction.
        fault: Option<Exception>,
    },
}

/// Shortens `bytes` (guest code from `eip` on) to its first instruction (for
/// [`Jit::one_insn_blocks`]).
pub(crate) fn cut_to_one_instruction(bytes: &mut Vec<u8>, eip: u32) {
    let n = Decoder::with_ip(32, bytes, eip as u64, DecoderOptions::NONE)
        .decode()
        .len();
    bytes.truncate(n.max(1));
}

impl Jit {
    /// Runs one translated block from the current state with a budget of one block, and
    /// returns what happened instead of delivering a fault. Polls no interrupts. For
    /// differential testing (testsuite `hostdiff --engine jit`, with
    /// [`Jit::one_insn_blocks`] so a block is one instruction).
    pub fn step_block(&mut self, cpu: &mut Cpu) -> BlockStep {
        self.drain_dirty(cpu);
        self.sync_epoch(cpu);
        let Some(mode) = mode_bits(&cpu.s) else {
            return BlockStep::Interpret;
        };
        let eip = cpu.s.rip as u32;
        let user = cpu.s.cpl == 3;
        let Ok(phys) = cpu.mmu.translate(eip as u64, Access::Fetch, user) else {
            return BlockStep::Interpret;
        };
        let key = (phys, mode, eip);
        let entry = match self.table.get(key) {
            Some(e) => e,
            None => self.translate(cpu, key, eip),
        };
        let Entry::Native(b) = entry else {
            return BlockStep::Interpret;
        };
        let (insns, _) = self.enter_with_budget(cpu, b, 1);
        self.stats.slow_paths += std::mem::take(&mut self.ctx.slow_calls);
        let fault = self.ctx.exception.take();
        if fault.is_some() {
            self.stats.faults += 1;
        }
        for p in std::mem::take(&mut self.ctx.dirty) {
            self.invalidate_page(p);
        }
        BlockStep::Ran { insns, fault }
    }
}

#[cfg(test)]
mod tests {
    //! Expected guest results are worked out by hand from the programs; the checker's
    //! ability to fail is shown by corrupting translated host code on purpose.
    use super::*;
    use iced_x86::{Encoder, Register};
    use morph86_cpu::flags::FlagOp;
    use morph86_cpu::state::CR0_PG;
    use morph86_cpu::StepEvent;
    use morph86_mmu::{BusDevice, Mmu, PhysMem};
    use std::sync::atomic::{AtomicU32, Ordering};
    use std::sync::Arc;

    const CODE: u64 = 0x10000;
    const DATA: u64 = 0x20000;
    const STACK_TOP: u64 = 0x7800;
    const HANDLER: u64 = 0x30000;
    /// Not present when paging is on.
    const HOLE: u64 = 0x9000;
    /// Linear page mapped (when paging is on) to the physical page of `CODE`.
    const ALIAS: u64 = 0x30_0000;
    const MMIO: u64 = 0xe000_0000;

    /// Flat 32-bit protected mode, ring 0; with `paged`, 0-4 MiB identity-mapped except
    /// `HOLE` (not present) and `ALIAS` (another view of the `CODE` page). Every
    /// exception vector goes to a HLT at `HANDLER`.
    fn machine(paged: bool) -> Cpu {
        let mut cpu = Cpu::new(Mmu::new(PhysMem::new(4 << 20).unwrap()));
        cpu.s.load_flat32(0x08, 0x10);
        let gdt: [u64; 3] = [0, 0x00cf_9a00_0000_ffff, 0x00cf_9200_0000_ffff];
        for (k, d) in gdt.iter().enumerate() {
            cpu.mmu.phys.write(0x500 + 8 * k as u64, &d.to_le_bytes());
        }
        for v in 0..32u64 {
            // 32-bit interrupt gate, selector 8, offset HANDLER.
            let lo = (HANDLER & 0xffff) | (0x08 << 16);
            let hi = (HANDLER & 0xffff_0000) | 0x8e00;
            cpu.mmu
                .phys
                .write(0x600 + 8 * v, &(lo | hi << 32).to_le_bytes());
        }
        cpu.mmu.phys.write(HANDLER, &[0xf4]);
        cpu.s.gdtr.base = 0x500;
        cpu.s.gdtr.limit = 23;
        cpu.s.idtr.base = 0x600;
        cpu.s.idtr.limit = 32 * 8 - 1;
        if paged {
            cpu.mmu.phys.write(0x1000, &(0x2000u32 | 3).to_le_bytes());
            for p in 0..1024u64 {
                let pte = match p * 4096 {
                    HOLE => 0,
                    ALIAS => CODE | 3,
                    a => a | 3,
                };
                cpu.mmu
                    .phys
                    .write(0x2000 + 4 * p, &(pte as u32).to_le_bytes());
            }
            cpu.s.cr3 = 0x1000;
            cpu.s.cr0 |= CR0_PG;
        }
        cpu.s.gpr[4] = STACK_TOP;
        cpu.sync_paging();
        cpu
    }

    struct Rng(u64);
    impl Rng {
        fn next(&mut self) -> u64 {
            self.0 ^= self.0 << 13;
            self.0 ^= self.0 >> 7;
            self.0 ^= self.0 << 17;
            self.0
        }
        fn below(&mut self, n: u64) -> u64 {
            self.next() % n
        }
    }

    fn run(jit: &mut Jit, cpu: &mut Cpu) -> StepEvent {
        match jit.run_lockstep(cpu, 100_000) {
            Ok(ev) => ev,
            Err(d) => panic!("{d}"),
        }
    }

    /// Registers a random instruction may write: EAX ECX EDX EBP ESI EDI (EBX holds
    /// the data pointer, ESP the stack).
    const DST: [u8; 6] = [0, 1, 2, 5, 6, 7];

    /// A random straight-line program of memory instructions on `[ebx+d8]` (EBX points
    /// into DATA) and the stack, ending in HLT.
    fn random_memory_program(r: &mut Rng) -> Vec<u8> {
        let mut c = Vec::new();
        let n = 1 + r.below(80);
        for _ in 0..n {
            let d = DST[r.below(6) as usize];
            let s = r.below(8) as u8;
            let disp = (r.below(64) as u8) & !3 | (r.below(4) == 0) as u8;
            let m = |reg: u8| 0x43 | reg << 3; // [ebx+d8]
            match r.below(16) {
                0 => c.extend_from_slice(&[0x89, m(s), disp]), // mov [m], r
                1 => c.extend_from_slice(&[0x8b, m(d), disp]), // mov r, [m]
                2 => {
                    // add/or/adc/sbb/and/sub/xor/cmp [m], r
                    let op = [0x01, 0x09, 0x11, 0x19, 0x21, 0x29, 0x31, 0x39][r.below(8) as usize];
                    c.extend_from_slice(&[op, m(s), disp]);
                }
                3 => {
                    // the same, r <- r op [m]
                    let op = [0x03, 0x0b, 0x13, 0x1b, 0x23, 0x2b, 0x33, 0x3b][r.below(8) as usize];
                    c.extend_from_slice(&[op, m(d), disp]);
                }
                4 => c.extend_from_slice(&[0xff, m(r.below(2) as u8), disp]), // inc/dec [m]
                5 => c.extend_from_slice(&[0xf7, m(2 + r.below(2) as u8), disp]), // not/neg [m]
                6 => c.extend_from_slice(&[0x88, m(s & 3), disp]),            // mov [m], r8
                7 => c.extend_from_slice(&[0x0f, 0xb6, m(d), disp]),          // movzx r, byte [m]
                8 => c.push(0x50 + s),                                        // push r
                9 => c.push(0x58 + d),                                        // pop r
                10 => c.extend_from_slice(&[0x87, m(d), disp]),               // xchg [m], r
                11 => {
                    // shl/shr/sar/rol [m], imm8
                    let k = [4u8, 5, 7, 0][r.below(4) as usize];
                    c.extend_from_slice(&[0xc1, m(k), disp, r.below(40) as u8]);
                }
                12 => c.extend_from_slice(&[0x0f, 0xaf, m(d), disp]), // imul r, [m]
                13 => {
                    c.extend_from_slice(&[0xc7, m(0), disp]); // mov dword [m], imm32
                    c.extend_from_slice(&(r.next() as u32).to_le_bytes());
                }
                14 => c.extend_from_slice(&[0x01, 0xc0 | s << 3 | d]), // add d, s
                _ => c.extend_from_slice(&[0x0f, 0xc1, m(d), disp]),   // xadd [m], r
            }
        }
        c.push(0xf4);
        c
    }

    #[test]
    fn random_memory_blocks_run_clean_in_lockstep() {
        let mut r = Rng(0x6c6f_636b_7374_6570);
        let mut jit = Jit::new(1 << 20).unwrap();
        for case in 0..300 {
            let mut cpu = machine(case % 2 == 1);
            let code = random_memory_program(&mut r);
            cpu.mmu.phys.write(CODE, &code);
            let data: Vec<u8> = (0..0x100).map(|_| r.next() as u8).collect();
            cpu.mmu.phys.write(DATA, &data);
            for g in [0, 1, 2, 5, 6, 7] {
                cpu.s.gpr[g] = r.next() as u32 as u64;
            }
            cpu.s.gpr[3] = DATA + 0x40;
            cpu.s.rip = CODE;
            let ev = match jit.run_lockstep(&mut cpu, 100_000) {
                Ok(ev) => ev,
                Err(d) => panic!("case {case}: {d}"),
            };
            assert_eq!(ev, StepEvent::Halted, "case {case}");
        }
        let st = &jit.stats.lockstep;
        assert!(st.blocks >= 300 && st.insns > 300 * 20, "{st}");
        assert!(st.bytes > 300 * 20, "memory writes compared: {st}");
    }

    /// Runs `code` at `at` (plus `extra` pieces) from EAX = ECX = 0 in lock-step; returns
    /// the CPU and the JIT after the HLT.
    fn run_smc(paged: bool, pieces: &[(u64, &[u8])], ebx: u64) -> (Cpu, Jit) {
        let mut cpu = machine(paged);
        for (at, code) in pieces {
            cpu.mmu.phys.write(*at, code);
        }
        cpu.s.rip = CODE;
        cpu.s.gpr[3] = ebx;
        let mut jit = Jit::new(1 << 20).unwrap();
        assert_eq!(run(&mut jit, &mut cpu), StepEvent::Halted);
        (cpu, jit)
    }

    #[test]
    fn smc_within_the_same_block() {
        // mov byte [CODE+12], 0x41 ; mov edx, 7 ; X: inc eax (0x40, becomes inc ecx) ; hlt
        let mut c = vec![0xc6, 0x05];
        c.extend_from_slice(&(CODE as u32 + 12).to_le_bytes());
        c.extend_from_slice(&[0x41, 0xba, 7, 0, 0, 0, 0x40, 0xf4]);
        assert_eq!(c[12], 0x40);
        let (cpu, jit) = run_smc(false, &[(CODE, &c)], 0);
        // The store lands before X runs: ECX counts, EAX does not.
        assert_eq!(
            [cpu.s.gpr[0], cpu.s.gpr[1], cpu.s.gpr[2]].map(|v| v as u32),
            [0, 1, 7]
        );
        assert!(
            jit.stats.lockstep.code_writes >= 1,
            "{}",
            jit.stats.lockstep
        );
    }

    /// mov ebx, 2 ; L: call Y ; mov byte [Y+2 (through `via`)], 5 ; dec ebx ; jnz L ; hlt,
    /// with Y: add eax, 1 ; ret. The second call adds 5: EAX = 6.
    fn call_patch_loop(y: u64, via: u64) -> Vec<u8> {
        let mut c = vec![0xbb, 2, 0, 0, 0];
        let l = CODE + c.len() as u64;
        c.push(0xe8);
        c.extend_from_slice(&((y as i64 - (l as i64 + 5)) as i32).to_le_bytes());
        c.extend_from_slice(&[0xc6, 0x05]);
        c.extend_from_slice(&((via + 2) as u32).to_le_bytes());
        c.push(5);
        c.push(0x4b);
        let rel = l as i64 - (CODE as i64 + c.len() as i64 + 2);
        c.extend_from_slice(&[0x75, rel as i8 as u8, 0xf4]);
        c
    }

    const Y_CODE: [u8; 4] = [0x83, 0xc0, 0x01, 0xc3];

    #[test]
    fn smc_same_page_other_block() {
        let y = CODE + 0x100;
        let c = call_patch_loop(y, y);
        let (cpu, jit) = run_smc(false, &[(CODE, &c), (y, &Y_CODE)], 0);
        assert_eq!(cpu.s.gpr[0] as u32, 6);
        assert!(
            jit.stats.lockstep.code_writes >= 2,
            "{}",
            jit.stats.lockstep
        );
        assert!(jit.stats.invalidated >= 1, "{}", jit.stats);
    }

    #[test]
    fn smc_across_pages() {
        let y = CODE + 0x1010;
        let c = call_patch_loop(y, y);
        let (cpu, jit) = run_smc(false, &[(CODE, &c), (y, &Y_CODE)], 0);
        assert_eq!(cpu.s.gpr[0] as u32, 6);
        assert!(
            jit.stats.lockstep.code_writes >= 2,
            "{}",
            jit.stats.lockstep
        );
    }

    #[test]
    fn smc_through_an_alias_mapping() {
        // The store goes through ALIAS, another linear view of the code page.
        let y = CODE + 0x100;
        let c = call_patch_loop(y, ALIAS + 0x100);
        let (cpu, jit) = run_smc(true, &[(CODE, &c), (y, &Y_CODE)], 0);
        assert_eq!(cpu.s.gpr[0] as u32, 6);
        assert!(
            jit.stats.lockstep.code_writes >= 2,
            "{}",
            jit.stats.lockstep
        );
        assert!(jit.stats.lockstep.blocks >= 4, "{}", jit.stats.lockstep);
    }

    #[test]
    fn faults_are_compared() {
        // mov eax, 1 ; mov [ebx], eax ; mov ecx, [HOLE+4] (#PF) ; mov edx, 5 ; hlt
        let mut c = vec![0xb8, 1, 0, 0, 0, 0x89, 0x03, 0x8b, 0x0d];
        c.extend_from_slice(&((HOLE + 4) as u32).to_le_bytes());
        c.extend_from_slice(&[0xba, 5, 0, 0, 0, 0xf4]);
        let (cpu, jit) = run_smc(true, &[(CODE, &c)], DATA);
        assert_eq!(cpu.s.cr2 as u32, HOLE as u32 + 4);
        assert_eq!(
            cpu.s.rip as u32,
            HANDLER as u32 + 1,
            "halted in the handler"
        );
        assert_ne!(cpu.s.gpr[2] as u32, 5, "mov edx, 5 never ran");
        assert_eq!(
            cpu.mmu.phys.ram()[DATA as usize],
            1,
            "the store before the fault"
        );
        assert!(jit.stats.lockstep.faults >= 1, "{}", jit.stats.lockstep);
    }

    struct Counter(Arc<AtomicU32>);
    impl BusDevice for Counter {
        fn read(&mut self, _offset: u64, data: &mut [u8]) {
            self.0.fetch_add(1, Ordering::Relaxed);
            data.fill(0x11);
        }
        fn write(&mut self, _offset: u64, _data: &[u8]) {
            self.0.fetch_add(1, Ordering::Relaxed);
        }
    }

    #[test]
    fn device_accesses_are_not_replayed() {
        // mov eax, [MMIO] ; add eax, 1 ; mov [DATA], eax ; hlt
        let mut c = vec![0xa1];
        c.extend_from_slice(&(MMIO as u32).to_le_bytes());
        c.extend_from_slice(&[0x83, 0xc0, 0x01, 0xa3]);
        c.extend_from_slice(&(DATA as u32).to_le_bytes());
        c.push(0xf4);
        let n = Arc::new(AtomicU32::new(0));
        let mut cpu = machine(false);
        cpu.mmu
            .phys
            .add_mmio(MMIO, 0x1000, Box::new(Counter(n.clone())));
        cpu.mmu.phys.write(CODE, &c);
        cpu.s.rip = CODE;
        let mut jit = Jit::new(1 << 20).unwrap();
        assert_eq!(run(&mut jit, &mut cpu), StepEvent::Halted);
        assert_eq!(n.load(Ordering::Relaxed), 1, "one device read, not two");
        assert_eq!(cpu.s.gpr[0] as u32, 0x1111_1112);
        assert!(
            jit.stats.lockstep.interp_only >= 1,
            "{}",
            jit.stats.lockstep
        );
    }

    /// Translates the block at CODE and returns its number.
    fn translate_at_code(jit: &mut Jit, cpu: &mut Cpu) -> u32 {
        let key = (CODE, mode_bits(&cpu.s).unwrap(), CODE as u32);
        let Entry::Native(b) = jit.translate(cpu, key, CODE as u32) else {
            panic!("not translated")
        };
        b
    }

    /// Rewrites the last `mov [mem], reg` of the host code of the block's first guest
    /// instruction with `f` (which must keep the length).
    fn patch_store(jit: &mut Jit, b: u32, f: impl Fn(&mut Instruction)) {
        let (s, e) = jit.blocks[b as usize].ranges[0];
        let bytes = jit.region.bytes(s, e - s).unwrap().to_vec();
        let store = Decoder::with_ip(64, &bytes, s as u64, DecoderOptions::NONE)
            .iter()
            .filter(|i| {
                i.mnemonic() == Mnemonic::Mov
                    && i.op0_kind() == OpKind::Memory
                    && i.op1_kind() == OpKind::Register
            })
            .last()
            .expect("a store in the host code");
        let mut new = store;
        f(&mut new);
        let mut enc = Encoder::new(64);
        enc.encode(&new, store.ip()).unwrap();
        let code = enc.take_buffer();
        assert_eq!(code.len(), store.len(), "same length");
        jit.region.patch(store.ip() as usize, &code);
    }

    fn broken_store(f: impl Fn(&mut Instruction)) -> Box<Divergence> {
        // mov [ebx+8], eax ; hlt
        let mut cpu = machine(false);
        cpu.mmu.phys.write(CODE, &[0x89, 0x43, 0x08, 0xf4]);
        cpu.s.rip = CODE;
        cpu.s.gpr[0] = 0x1234_5678;
        cpu.s.gpr[1] = 0x9abc_def0;
        cpu.s.gpr[3] = DATA;
        let mut jit = Jit::new(1 << 20).unwrap();
        // Warm the TLB so the store takes the translated fast path.
        cpu.mmu.write_u32(DATA, 0, false).unwrap();
        let b = translate_at_code(&mut jit, &mut cpu);
        patch_store(&mut jit, b, f);
        jit.run_lockstep(&mut cpu, 100).unwrap_err()
    }

    #[test]
    fn a_wrong_stored_value_is_detected() {
        // The host store writes ECX instead of EAX.
        let d = broken_store(|i| {
            let r = i.op1_register();
            let other = if r == Register::EAX {
                Register::ECX
            } else {
                Register::EAX
            };
            i.set_op1_register(other);
        });
        assert!(d.reason.contains("bytes of memory differ"), "{d}");
        assert_eq!(
            d.memory[0],
            MemDiff {
                addr: DATA + 8,
                jit: 0xf0,
                interp: 0x78
            },
            "{d}"
        );
        assert!(d
            .to_string()
            .contains("mem 0x00020008: jit f0 interp 78  <--"));
    }

    #[test]
    fn a_wrong_store_address_is_detected() {
        // The host store lands 0x40 bytes further on.
        let d = broken_store(|i| i.set_memory_displacement64(i.memory_displacement64() + 0x40));
        assert!(d.reason.contains("bytes of memory differ"), "{d}");
        let addrs: Vec<u64> = d.memory.iter().map(|m| m.addr).collect();
        assert!(
            addrs.contains(&(DATA + 8)) && addrs.contains(&(DATA + 0x48)),
            "{d}"
        );
    }

    #[test]
    fn undefined_flags_copied_by_pushfd_are_tolerated() {
        // mov ecx, 4 ; shl eax, cl (AF, OF undefined) ; pushfd ; pop edi ; hlt (the
        // shape of Linux's local_irq_save after a shift; seen diverging in a boot).
        let c = [0xb9, 4, 0, 0, 0, 0xd3, 0xe0, 0x9c, 0x5f, 0xf4];
        let mut cpu = machine(false);
        cpu.mmu.phys.write(CODE, &c);
        cpu.s.rip = CODE;
        cpu.s.gpr[0] = 0x1234_5678;
        let mut jit = Jit::new(1 << 20).unwrap();
        assert_eq!(run(&mut jit, &mut cpu), StepEvent::Halted);
        assert_eq!(cpu.s.gpr[0] as u32, 0x2345_6780);
        let insns: Vec<Instruction> = Decoder::with_ip(32, &c, 0, DecoderOptions::NONE)
            .iter()
            .collect();
        assert_eq!(leaked_undefined(&insns), AF | OF | AF << 8);
        assert_eq!(leaked_undefined(&insns[..2]), 0, "nothing pushed yet");
        // A defined flag copied the same way is still compared.
        assert_eq!(leak_byte_mask(AF | OF | AF << 8), 0x18);
    }

    #[test]
    fn snapshots_give_back_the_registers_of_their_point() {
        // Where translated code leaves a block early, the interpreter's state after as
        // many instructions is rebuilt from a snapshot and the final state.
        let mut s = machine(false).s;
        s.set_eflags(0x202);
        let mut heavy = Vec::new();
        let mut snaps = [Snap::default(); 3];
        snaps[0].fill(&s, &mut heavy, true);
        // A lazy ADD result (1 + 0xffffffff: CF ZF PF AF), another DS, another EAX.
        s.gpr[0] = 7;
        s.seg[3].selector = 0x18;
        s.set_lazy_flags(FlagOp::Add, 4, 0, 1, 0xffff_ffff, false);
        snaps[1].fill(&s, &mut heavy, true);
        s.gpr[0] = 9;
        s.cr2 = 0x1234;
        s.set_eflags(0x2c3);
        snaps[2].fill(&s, &mut heavy, true);
        assert_eq!(heavy.len(), 3, "DS and CR2 changed once each");
        let at0 = snaps[0].apply(&s, &heavy);
        assert_eq!((at0.gpr[0], at0.seg[3].selector, at0.cr2), (0, 0x10, 0));
        assert_eq!(at0.eflags(), 0x202);
        let at1 = snaps[1].apply(&s, &heavy);
        assert_eq!((at1.gpr[0], at1.seg[3].selector, at1.cr2), (7, 0x18, 0));
        assert_eq!(at1.eflags(), 0x202 | CF | ZF | PF | AF);
        let at2 = snaps[2].apply(&s, &heavy);
        assert_eq!((at2.gpr[0], at2.cr2, at2.eflags()), (9, 0x1234, 0x2c3));
        // Untracked: nothing kept, the final segment registers stand.
        let mut none = Vec::new();
        let mut snap = Snap::default();
        snap.fill(&s, &mut none, false);
        assert!(none.is_empty());
        s.seg[3].selector = 0x20;
        assert_eq!(snap.apply(&s, &none).seg[3].selector, 0x20);
    }

    #[test]
    fn segment_and_control_register_writers_are_recognised() {
        let one = |b: &[u8]| -> bool {
            let i = Decoder::with_ip(32, b, 0, DecoderOptions::NONE).decode();
            may_change_seg_or_cr(&i)
        };
        // (SDM vol. 2 encodings) mov ds, ax ; pop es ; lds eax, [ebx] ; mov cr0, eax ;
        // jmp far 8:0 ; call far [ebx] ; retf ; iretd ; int 0x80 ; lmsw ax ; clts
        for b in [
            &[0x8e, 0xd8][..],
            &[0x07],
            &[0xc5, 0x03],
            &[0x0f, 0x22, 0xc0],
            &[0xea, 0, 0, 0, 0, 8, 0],
            &[0xff, 0x1b],
            &[0xcb],
            &[0xcf],
            &[0xcd, 0x80],
            &[0x0f, 0x01, 0xf0],
            &[0x0f, 0x06],
        ] {
            assert!(one(b), "{b:02x?}");
        }
        // add eax, ecx ; push eax ; mov [ebx], eax ; call near ; ret ; jmp [ebx] ;
        // rep movsd ; mov eax, cr0 (reads CR0: conservatively counted)
        for b in [
            &[0x01, 0xc8][..],
            &[0x50],
            &[0x89, 0x03],
            &[0xe8, 0, 0, 0, 0],
            &[0xc3],
            &[0xff, 0x23],
            &[0xf3, 0xa5],
        ] {
            assert!(!one(b), "{b:02x?}");
        }
        assert!(one(&[0x0f, 0x20, 0xc0]));
    }

    #[test]
    fn undefined_flags_follow_the_last_writer() {
        let dec = |b: &[u8]| -> Vec<Instruction> {
            Decoder::with_ip(32, b, 0, DecoderOptions::NONE)
                .iter()
                .collect()
        };
        // mul ecx: SF ZF AF PF undefined; then add eax, 1 defines them all.
        assert_eq!(undefined_after(&dec(&[0xf7, 0xe1])), SF | ZF | AF | PF);
        assert_eq!(undefined_after(&dec(&[0xf7, 0xe1, 0x83, 0xc0, 0x01])), 0);
        // shl eax, cl may change nothing: mul's undefined flags stay undefined.
        let v = undefined_after(&dec(&[0xf7, 0xe1, 0xd3, 0xe0]));
        assert_eq!(v & (SF | ZF | PF | AF), SF | ZF | PF | AF);
        // and eax, ecx: AF undefined only.
        assert_eq!(undefined_after(&dec(&[0x21, 0xc8])), AF);
    }
}
