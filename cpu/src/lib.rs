//! morph86-cpu: x86 architectural state and the reference interpreter.
//!
//! The interpreter is the reference semantics of morph86: every instruction works here
//! first, the JIT falls back to it, and the test suite checks it against the
//! SingleStepTests vectors and against the host CPU.
//!
//! Layout:
//! - [`state`]: the architectural registers (`CpuState`, `#[repr(C)]` for the JIT);
//! - [`flags`]: lazy arithmetic flags;
//! - [`exception`]: exceptions as values (`Res<T>`);
//! - `memory`: segment checks and paging-aware loads and stores;
//! - `decode`: iced-x86 decoding and the decoded-instruction cache;
//! - `interp`: instruction semantics, one file per group;
//! - `interrupts`, `segmentation`, `tasks`: delivery of interrupts and exceptions,
//!   descriptor loads, task switches;
//! - [`fpu`]: the x87.
#![deny(missing_docs)]

pub mod decode;
pub mod descriptor;
pub mod exception;
pub mod flags;
pub mod fpu;
mod interp;
pub mod interrupts;
mod memory;
pub mod segmentation;
pub mod state;
pub mod tasks;

pub use exception::{Exception, Res};
pub use state::{CpuState, SegReg, Segment};

use morph86_mmu::{IoBus, Mmu, NullIo, PagingRegs};

/// The interrupt controller as the CPU sees it: the INTR line and the acknowledge cycle.
pub trait InterruptSource: Send {
    /// Whether INTR is asserted.
    fn pending(&mut self) -> bool;
    /// The INTA cycle: returns the vector of the highest-priority pending interrupt.
    fn acknowledge(&mut self) -> u8;
}

/// What happened in one call of [`Cpu::step`].
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum StepEvent {
    /// An instruction (or an interrupt delivery) completed.
    Ok,
    /// The CPU is halted (HLT) and nothing woke it.
    Halted,
    /// A fault happened while delivering a double fault: the CPU shuts down, which a PC
    /// turns into a reset.
    TripleFault,
}

/// Counters for `--stats` and the benchmark notes.
#[derive(Debug, Clone, Copy, Default)]
pub struct CpuStats {
    /// Instructions retired.
    pub instructions: u64,
    /// Decoded-instruction cache hits.
    pub decode_hits: u64,
    /// Decoded-instruction cache misses.
    pub decode_misses: u64,
    /// Exceptions delivered.
    pub exceptions: u64,
    /// External interrupts delivered.
    pub interrupts: u64,
}

/// What the time-stamp counter counts.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TscSource {
    /// Instructions retired: deterministic, so runs are reproducible, but a guest that
    /// calibrates its clock against the PIT (which follows the host clock) sees time run
    /// at the speed of emulation, and stop while it halts.
    Instructions,
    /// The host's monotonic clock at a fixed nominal frequency: guest time follows the
    /// host clock whatever the emulation speed, also across HLT.
    HostClock {
        /// Host time at which the count was 0.
        start: std::time::Instant,
        /// Ticks per second.
        hz: u64,
    },
}

impl TscSource {
    /// The host clock at [`TscSource::HOST_HZ`], counting from now.
    pub fn host_clock() -> Self {
        TscSource::HostClock {
            start: std::time::Instant::now(),
            hz: Self::HOST_HZ,
        }
    }

    /// Nominal frequency of the host-clock TSC (1 GHz: one tick per nanosecond).
    pub const HOST_HZ: u64 = 1_000_000_000;
}

/// One x86 CPU with its memory and I/O buses.
pub struct Cpu {
    /// Architectural state.
    pub s: CpuState,
    /// Memory (physical map, paging, TLB).
    pub mmu: Mmu,
    /// Port I/O.
    pub io: Box<dyn IoBus>,
    /// The interrupt controller, if any.
    pub intr: Option<Box<dyn InterruptSource>>,
    /// Counters.
    pub stats: CpuStats,
    pub(crate) dcache: decode::DecodeCache,
    /// EIP of the instruction being executed (faults restart here).
    pub(crate) start_rip: u64,
    /// Time-stamp counter base: the TSC reads as `tsc_offset` plus the count of
    /// [`Cpu::tsc_source`].
    pub tsc_offset: u64,
    /// What the time-stamp counter counts.
    pub tsc_source: TscSource,
    /// Pending NMI and trap bookkeeping (interrupts.rs).
    pub ev: interrupts::EventState,
}

impl Cpu {
    /// A CPU in its RESET state over the given memory, with an empty I/O bus.
    pub fn new(mmu: Mmu) -> Self {
        let mut c = Cpu {
            s: CpuState::default(),
            mmu,
            io: Box::new(NullIo),
            intr: None,
            stats: CpuStats::default(),
            dcache: decode::DecodeCache::new(),
            start_rip: 0,
            tsc_offset: 0,
            tsc_source: TscSource::Instructions,
            ev: interrupts::EventState::default(),
        };
        c.sync_paging();
        c
    }

    /// RESET: architectural state back to power-on values (memory untouched).
    pub fn reset(&mut self) {
        self.s.reset();
        self.ev = interrupts::EventState::default();
        // RESET clears the time-stamp counter.
        self.tsc_offset = 0u64.wrapping_sub(self.tsc_count());
        self.sync_paging();
    }

    /// Pushes CR0/CR3/CR4/EFER to the MMU (which flushes its TLB as needed). Call after
    /// changing any of them directly in `s`.
    pub fn sync_paging(&mut self) {
        self.mmu.set_paging_regs(PagingRegs {
            cr0: self.s.cr0,
            cr3: self.s.cr3,
            cr4: self.s.cr4,
            efer: self.s.efer,
        });
    }

    /// Executes one instruction, or delivers one pending interrupt.
    pub fn step(&mut self) -> StepEvent {
        if self.s.inhibit_irq {
            self.s.inhibit_irq = false;
        } else if self.ev.nmi_pending && !self.s.nmi_blocked {
            return self.take_nmi();
        } else if self.s.eflags_raw & state::IF != 0 {
            if let Some(intr) = self.intr.as_mut() {
                if intr.pending() {
                    return self.take_external_interrupt();
                }
            }
        }
        if self.s.halted {
            return StepEvent::Halted;
        }
        self.start_rip = self.s.rip;
        if self.s.dr[7] & 0xff != 0 && self.s.eflags_raw & state::RF == 0 {
            if let Some(ev) = self.check_code_breakpoints() {
                return ev;
            }
        }
        let tf = self.s.eflags_raw & state::TF != 0;
        let rf = self.s.eflags_raw & state::RF != 0;
        self.ev.inhibit_trap = false;
        self.ev.suppress_trap = false;
        self.ev.flags_loaded = false;
        let mut i = iced_x86::Instruction::default();
        let r = match self.fetch_into(&mut i) {
            Ok(()) => self.execute(&i),
            Err(e) => Err(e),
        };
        match r {
            Ok(()) => {
                self.stats.instructions += 1;
                if rf && !self.ev.flags_loaded {
                    // RF lasts for one completed instruction (SDM vol. 3, 17.3.1.1).
                    self.s.eflags_raw &= !state::RF;
                }
                if tf && !self.ev.inhibit_trap && !self.ev.suppress_trap {
                    // Single-step trap after the instruction (DR6.BS).
                    self.s.dr[6] |= 1 << 14;
                    return self.deliver_event(
                        exception::vec::DB,
                        interrupts::IntKind::Exception,
                        None,
                    );
                }
                StepEvent::Ok
            }
            Err(e) => {
                self.s.rip = self.start_rip;
                self.raise(e)
            }
        }
    }

    /// Delivers a pending NMI (the step loop's rare path).
    #[cold]
    #[inline(never)]
    fn take_nmi(&mut self) -> StepEvent {
        self.ev.nmi_pending = false;
        self.s.nmi_blocked = true;
        self.s.halted = false;
        self.deliver_event(exception::vec::NMI, interrupts::IntKind::Nmi, None)
    }

    /// Acknowledges and delivers the external interrupt the controller asserts.
    #[cold]
    #[inline(never)]
    fn take_external_interrupt(&mut self) -> StepEvent {
        let v = match self.intr.as_mut() {
            Some(intr) => intr.acknowledge(),
            None => return StepEvent::Ok,
        };
        self.s.halted = false;
        self.stats.interrupts += 1;
        self.deliver_event(v, interrupts::IntKind::External, None)
    }

    /// Instruction breakpoints (DR0-DR3 with DR7 enables): the #DB fault raised before
    /// the instruction runs, if one matches.
    #[cold]
    #[inline(never)]
    fn check_code_breakpoints(&mut self) -> Option<StepEvent> {
        let hit = self.code_breakpoints();
        if hit != 0 {
            // Instruction breakpoint: a fault before the instruction runs.
            self.s.dr[6] = (self.s.dr[6] & !0xf) | hit;
            return Some(self.raise(Exception::new(exception::vec::DB)));
        }
        None
    }

    /// Runs up to `n` instructions; stops early on HLT or a triple fault.
    pub fn run(&mut self, n: u64) -> StepEvent {
        for _ in 0..n {
            match self.step() {
                StepEvent::Ok => {}
                ev => return ev,
            }
        }
        StepEvent::Ok
    }

    /// Executes one instruction but does not deliver a fault it raises: on `Err` EIP is
    /// rolled back to the instruction start and the exception is returned. Interrupts,
    /// HLT and the TF trap are ignored. For differential testing (testsuite `hostdiff`).
    pub fn try_step(&mut self) -> Res<()> {
        self.start_rip = self.s.rip;
        let mut i = iced_x86::Instruction::default();
        let r = match self.fetch_into(&mut i) {
            Ok(()) => self.execute(&i),
            Err(e) => Err(e),
        };
        match r {
            Ok(()) => self.stats.instructions += 1,
            Err(_) => self.s.rip = self.start_rip,
        }
        r
    }

    /// Like [`Cpu::try_step`] for an instruction already decoded (by a JIT, when it
    /// translated the code): `i` must have been decoded from the bytes at the current
    /// EIP, in 32-bit code with a flat CS, whose fetch the caller has checked.
    pub fn exec_decoded(&mut self, i: &iced_x86::Instruction) -> Res<()> {
        self.start_rip = self.s.rip;
        self.s.rip = i.next_ip32() as u64;
        let r = self.execute(i);
        match r {
            Ok(()) => self.stats.instructions += 1,
            Err(_) => self.s.rip = self.start_rip,
        }
        r
    }

    /// Delivers an exception raised by an instruction (whose state has been rolled back
    /// to the instruction start), applying the double- and triple-fault rules.
    #[inline(never)]
    pub fn raise(&mut self, e: Exception) -> StepEvent {
        self.stats.exceptions += 1;
        self.deliver_event(e.vector, interrupts::IntKind::Exception, e.error_code())
    }

    /// Takes the physical pages whose code was overwritten since the last call (as
    /// `PhysMem::take_dirty_code`) after dropping their decoded instructions, so another
    /// code cache (the JIT) can consume the notifications the decode cache also needs.
    pub fn take_dirty_code(&mut self) -> Vec<u64> {
        let pages = self.mmu.phys.take_dirty_code();
        for &p in &pages {
            self.dcache.invalidate_page(p);
        }
        pages
    }
}
