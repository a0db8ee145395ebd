//! Architectural state, laid out for x86-64 from the start (ARCHITECTURE.md section 2).
//!
//! `CpuState` is `#[repr(C)]`: the JIT addresses its fields at fixed offsets. 32-bit
//! guests use the low halves of the 64-bit registers.

use crate::flags::LazyFlags;
use crate::fpu::FpuState;

/// Segment registers in encoding order (the `sreg` field of ModRM).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
#[repr(u8)]
pub enum SegReg {
    /// ES.
    Es = 0,
    /// CS.
    Cs = 1,
    /// SS.
    Ss = 2,
    /// DS.
    Ds = 3,
    /// FS.
    Fs = 4,
    /// GS.
    Gs = 5,
}

impl SegReg {
    /// All six, in encoding order.
    pub const ALL: [SegReg; 6] = [
        SegReg::Es,
        SegReg::Cs,
        SegReg::Ss,
        SegReg::Ds,
        SegReg::Fs,
        SegReg::Gs,
    ];
    /// From the 3-bit encoding (values 6 and 7 are not segment registers).
    pub fn from_index(i: u8) -> Option<SegReg> {
        SegReg::ALL.get(i as usize).copied()
    }
}

/// General-purpose register numbers (encoding order).
pub mod reg {
    /// RAX/EAX/AX/AL.
    pub const RAX: usize = 0;
    /// RCX.
    pub const RCX: usize = 1;
    /// RDX.
    pub const RDX: usize = 2;
    /// RBX.
    pub const RBX: usize = 3;
    /// RSP.
    pub const RSP: usize = 4;
    /// RBP.
    pub const RBP: usize = 5;
    /// RSI.
    pub const RSI: usize = 6;
    /// RDI.
    pub const RDI: usize = 7;
}

// Segment attribute bits, packed as in the descriptor's bits 40-47 and 52-55
// (the VMX "access rights" layout), plus an "unusable" bit for null selectors.
/// Descriptor type (4 bits).
pub const ATTR_TYPE: u32 = 0x0f;
/// Type bit 0: accessed.
pub const ATTR_ACCESSED: u32 = 0x01;
/// Type bit 1: writable (data) / readable (code).
pub const ATTR_RW: u32 = 0x02;
/// Type bit 2: expand-down (data) / conforming (code).
pub const ATTR_EC: u32 = 0x04;
/// Type bit 3: code segment.
pub const ATTR_CODE: u32 = 0x08;
/// S: code or data (not system) descriptor.
pub const ATTR_S: u32 = 0x10;
/// DPL shift.
pub const ATTR_DPL_SHIFT: u32 = 5;
/// DPL mask (after shifting).
pub const ATTR_DPL: u32 = 0x60;
/// P: present.
pub const ATTR_P: u32 = 0x80;
/// AVL.
pub const ATTR_AVL: u32 = 0x100;
/// L: 64-bit code segment.
pub const ATTR_L: u32 = 0x200;
/// D/B: 32-bit default operand size / big stack.
pub const ATTR_DB: u32 = 0x400;
/// G: 4 KiB limit granularity.
pub const ATTR_G: u32 = 0x800;
/// Unusable: a null selector was loaded (protected mode).
pub const ATTR_UNUSABLE: u32 = 0x1_0000;

/// A segment register with its hidden descriptor cache.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Segment {
    /// Base address.
    pub base: u64,
    /// Byte-granular limit (already scaled by G).
    pub limit: u32,
    /// Attributes (`ATTR_*`).
    pub attrs: u32,
    /// Visible selector.
    pub selector: u16,
}

impl Segment {
    /// A real-mode segment for `selector`: base = selector * 16, limit kept, attributes
    /// those of a present, accessed, writable data segment (code for CS).
    pub fn real(selector: u16) -> Segment {
        Segment {
            base: (selector as u64) << 4,
            limit: 0xffff,
            attrs: ATTR_P | ATTR_S | ATTR_RW | ATTR_ACCESSED,
            selector,
        }
    }
    /// DPL of the cached descriptor.
    #[inline]
    pub fn dpl(&self) -> u8 {
        ((self.attrs & ATTR_DPL) >> ATTR_DPL_SHIFT) as u8
    }
    /// D/B bit: 32-bit segment.
    #[inline]
    pub fn big(&self) -> bool {
        self.attrs & ATTR_DB != 0
    }
}

/// A descriptor-table register (GDTR, IDTR).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct TableReg {
    /// Linear base.
    pub base: u64,
    /// Limit (bytes - 1).
    pub limit: u32,
}

/// Model-specific registers we implement.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct Msrs {
    /// IA32_SYSENTER_CS (0x174).
    pub sysenter_cs: u64,
    /// IA32_SYSENTER_ESP (0x175).
    pub sysenter_esp: u64,
    /// IA32_SYSENTER_EIP (0x176).
    pub sysenter_eip: u64,
    /// IA32_APIC_BASE (0x1b).
    pub apic_base: u64,
    /// IA32_PAT (0x277).
    pub pat: u64,
    /// IA32_MISC_ENABLE (0x1a0).
    pub misc_enable: u64,
    /// IA32_MTRR_DEF_TYPE (0x2ff).
    pub mtrr_def_type: u64,
    /// Fixed and variable MTRRs (0x200-0x20f variable pairs, then the fixed ones).
    pub mtrr: [u64; 27],
    /// STAR, LSTAR, CSTAR, SFMASK, KERNEL_GS_BASE (long mode, kept for later).
    pub syscall: [u64; 5],
    /// FS.base and GS.base are in the segment caches; TSC_AUX here.
    pub tsc_aux: u64,
}

/// SSE state (kept for FXSAVE/FXRSTOR; SSE instructions come later).
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct SseState {
    /// XMM0-15.
    pub xmm: [[u64; 2]; 16],
    /// MXCSR.
    pub mxcsr: u32,
}

// EFLAGS bits.
/// Carry.
pub const CF: u32 = 1 << 0;
/// Reserved, always 1.
pub const FLAG_1: u32 = 1 << 1;
/// Parity.
pub const PF: u32 = 1 << 2;
/// Auxiliary carry.
pub const AF: u32 = 1 << 4;
/// Zero.
pub const ZF: u32 = 1 << 6;
/// Sign.
pub const SF: u32 = 1 << 7;
/// Trap.
pub const TF: u32 = 1 << 8;
/// Interrupt enable.
pub const IF: u32 = 1 << 9;
/// Direction.
pub const DF: u32 = 1 << 10;
/// Overflow.
pub const OF: u32 = 1 << 11;
/// I/O privilege level (2 bits).
pub const IOPL: u32 = 3 << 12;
/// Nested task.
pub const NT: u32 = 1 << 14;
/// Resume.
pub const RF: u32 = 1 << 16;
/// Virtual-8086 mode.
pub const VM: u32 = 1 << 17;
/// Alignment check.
pub const AC: u32 = 1 << 18;
/// Virtual interrupt flag.
pub const VIF: u32 = 1 << 19;
/// Virtual interrupt pending.
pub const VIP: u32 = 1 << 20;
/// CPUID available.
pub const ID: u32 = 1 << 21;
/// The six arithmetic flags.
pub const ARITH_FLAGS: u32 = CF | PF | AF | ZF | SF | OF;

// CR0 bits.
/// Protection enable.
pub const CR0_PE: u64 = 1 << 0;
/// Monitor coprocessor.
pub const CR0_MP: u64 = 1 << 1;
/// FPU emulation.
pub const CR0_EM: u64 = 1 << 2;
/// Task switched.
pub const CR0_TS: u64 = 1 << 3;
/// Extension type (always 1 on a P6).
pub const CR0_ET: u64 = 1 << 4;
/// Numeric error: report x87 errors as #MF rather than IRQ13.
pub const CR0_NE: u64 = 1 << 5;
/// Write protect.
pub const CR0_WP: u64 = 1 << 16;
/// Alignment mask.
pub const CR0_AM: u64 = 1 << 18;
/// Not write-through.
pub const CR0_NW: u64 = 1 << 29;
/// Cache disable.
pub const CR0_CD: u64 = 1 << 30;
/// Paging.
pub const CR0_PG: u64 = 1 << 31;

// CR4 bits.
/// Virtual-8086 mode extensions.
pub const CR4_VME: u64 = 1 << 0;
/// Protected-mode virtual interrupts.
pub const CR4_PVI: u64 = 1 << 1;
/// Time stamp disable (RDTSC privileged).
pub const CR4_TSD: u64 = 1 << 2;
/// Debugging extensions.
pub const CR4_DE: u64 = 1 << 3;
/// Page size extensions.
pub const CR4_PSE: u64 = 1 << 4;
/// Physical address extension.
pub const CR4_PAE: u64 = 1 << 5;
/// Machine check enable.
pub const CR4_MCE: u64 = 1 << 6;
/// Page global enable.
pub const CR4_PGE: u64 = 1 << 7;
/// Performance counter enable.
pub const CR4_PCE: u64 = 1 << 8;
/// OS supports FXSAVE/FXRSTOR.
pub const CR4_OSFXSR: u64 = 1 << 9;
/// OS supports unmasked SIMD exceptions.
pub const CR4_OSXMMEXCPT: u64 = 1 << 10;

/// EFER.NXE.
pub const EFER_NXE: u64 = 1 << 11;

/// The whole architectural state of one CPU.
#[repr(C)]
#[derive(Debug, Clone)]
pub struct CpuState {
    /// RAX, RCX, RDX, RBX, RSP, RBP, RSI, RDI, R8-R15.
    pub gpr: [u64; 16],
    /// Instruction pointer (EIP in the low half).
    pub rip: u64,
    /// EFLAGS, except that while `lazy` holds an operation the six arithmetic flags
    /// here are stale: read flags through [`CpuState::eflags`] and the `get_*` helpers.
    pub eflags_raw: u32,
    /// Current privilege level (CS.RPL in protected mode, 3 in V86, 0 in real mode).
    pub cpl: u8,
    /// Lazily evaluated arithmetic flags (see `flags.rs`).
    pub lazy: LazyFlags,
    /// ES, CS, SS, DS, FS, GS.
    pub seg: [Segment; 6],
    /// LDTR.
    pub ldtr: Segment,
    /// TR.
    pub tr: Segment,
    /// GDTR.
    pub gdtr: TableReg,
    /// IDTR.
    pub idtr: TableReg,
    /// CR0.
    pub cr0: u64,
    /// CR2 (last page-fault address).
    pub cr2: u64,
    /// CR3.
    pub cr3: u64,
    /// CR4.
    pub cr4: u64,
    /// CR8 (TPR, long mode).
    pub cr8: u64,
    /// EFER.
    pub efer: u64,
    /// DR0-DR7 (DR4/5 alias DR6/7 when CR4.DE is clear).
    pub dr: [u64; 8],
    /// Model-specific registers.
    pub msr: Msrs,
    /// x87 state.
    pub fpu: FpuState,
    /// SSE state.
    pub sse: SseState,
    /// Interrupts are inhibited for one instruction (after MOV SS / POP SS / STI).
    pub inhibit_irq: bool,
    /// HLT executed; waiting for an interrupt.
    pub halted: bool,
    /// An NMI is being handled (blocks further NMIs until IRET).
    pub nmi_blocked: bool,
}

impl Default for CpuState {
    fn default() -> Self {
        let mut s = CpuState {
            gpr: [0; 16],
            rip: 0,
            eflags_raw: FLAG_1,
            cpl: 0,
            lazy: LazyFlags::default(),
            seg: [Segment::real(0); 6],
            ldtr: Segment::default(),
            tr: Segment::default(),
            gdtr: TableReg::default(),
            idtr: TableReg {
                base: 0,
                limit: 0x3ff,
            },
            cr0: CR0_ET | CR0_CD | CR0_NW,
            cr2: 0,
            cr3: 0,
            cr4: 0,
            cr8: 0,
            efer: 0,
            dr: [0, 0, 0, 0, 0, 0, 0xffff_0ff0, 0x400],
            msr: Msrs::default(),
            fpu: FpuState::default(),
            sse: SseState {
                mxcsr: 0x1f80,
                ..Default::default()
            },
            inhibit_irq: false,
            halted: false,
            nmi_blocked: false,
        };
        s.reset();
        s
    }
}

impl CpuState {
    /// The state after RESET: real mode, CS:IP = F000:FFF0 with CS.base = 0xFFFF0000.
    pub fn reset(&mut self) {
        self.gpr = [0; 16];
        self.gpr[reg::RDX] = 0x0000_0633; // family 6, model 3, stepping 3 (a Pentium II)
        self.rip = 0xfff0;
        self.set_eflags(FLAG_1);
        self.cpl = 0;
        for s in self.seg.iter_mut() {
            *s = Segment::real(0);
        }
        self.seg[SegReg::Cs as usize] = Segment {
            base: 0xffff_0000,
            limit: 0xffff,
            attrs: ATTR_P | ATTR_S | ATTR_CODE | ATTR_RW | ATTR_ACCESSED,
            selector: 0xf000,
        };
        self.ldtr = Segment {
            attrs: ATTR_P | 2,
            limit: 0xffff,
            ..Default::default()
        };
        self.tr = Segment {
            attrs: ATTR_P | 3,
            limit: 0xffff,
            ..Default::default()
        };
        self.gdtr = TableReg {
            base: 0,
            limit: 0xffff,
        };
        self.idtr = TableReg {
            base: 0,
            limit: 0xffff,
        };
        self.cr0 = CR0_ET | CR0_CD | CR0_NW;
        self.cr2 = 0;
        self.cr3 = 0;
        self.cr4 = 0;
        self.efer = 0;
        self.dr = [0, 0, 0, 0, 0, 0, 0xffff_0ff0, 0x400];
        self.fpu = FpuState::default();
        self.inhibit_irq = false;
        self.halted = false;
        self.nmi_blocked = false;
    }

    /// Enters flat 32-bit protected mode at CPL 0: sets CR0.PE, loads CS with a present,
    /// accessed, readable 32-bit code segment (base 0, 4 GiB limit, G=1, D=1) selected by
    /// `code_sel`, and ES/SS/DS/FS/GS with the matching writable data segment selected by
    /// `data_sel`. Descriptor tables, other CR0 bits, registers and EFLAGS are left as
    /// they are; call `Cpu::sync_paging` afterwards.
    pub fn load_flat32(&mut self, code_sel: u16, data_sel: u16) {
        self.cr0 |= CR0_PE;
        let flat = |attrs: u32, selector: u16| Segment {
            base: 0,
            limit: 0xffff_ffff,
            attrs: attrs | ATTR_P | ATTR_S | ATTR_RW | ATTR_ACCESSED | ATTR_DB | ATTR_G,
            selector,
        };
        for s in self.seg.iter_mut() {
            *s = flat(0, data_sel);
        }
        self.seg[SegReg::Cs as usize] = flat(ATTR_CODE, code_sel);
        self.cpl = 0;
    }

    /// Protected mode (CR0.PE).
    #[inline]
    pub fn protected(&self) -> bool {
        self.cr0 & CR0_PE != 0
    }

    /// Virtual-8086 mode (protected mode with EFLAGS.VM).
    #[inline]
    pub fn v86(&self) -> bool {
        self.eflags_raw & VM != 0 && self.protected()
    }

    /// Real mode (CR0.PE clear).
    #[inline]
    pub fn real(&self) -> bool {
        self.cr0 & CR0_PE == 0
    }

    /// CS is a 32-bit segment (default operand and address size 32).
    #[inline]
    pub fn code32(&self) -> bool {
        self.seg[SegReg::Cs as usize].big() && !self.v86()
    }

    /// SS is a 32-bit ("big") stack.
    #[inline]
    pub fn stack32(&self) -> bool {
        self.seg[SegReg::Ss as usize].big() && !self.v86()
    }

    /// EIP.
    #[inline]
    pub fn eip(&self) -> u32 {
        self.rip as u32
    }

    /// Reads the low 32 bits of a GPR.
    #[inline]
    pub fn r32(&self, r: usize) -> u32 {
        self.gpr[r] as u32
    }
    /// Reads the low 16 bits of a GPR.
    #[inline]
    pub fn r16(&self, r: usize) -> u16 {
        self.gpr[r] as u16
    }
    /// Writes a 32-bit GPR (zeroing the upper half, as in long mode; invisible in 32-bit code).
    #[inline]
    pub fn set_r32(&mut self, r: usize, v: u32) {
        self.gpr[r] = v as u64;
    }
    /// Writes the low 16 bits of a GPR, keeping the rest.
    #[inline]
    pub fn set_r16(&mut self, r: usize, v: u16) {
        self.gpr[r] = (self.gpr[r] & !0xffff) | v as u64;
    }
    /// Reads an 8-bit register by its encoding (0-3 = AL..BL, 4-7 = AH..BH).
    #[inline]
    pub fn r8(&self, r: usize) -> u8 {
        if r < 4 {
            self.gpr[r] as u8
        } else {
            (self.gpr[r - 4] >> 8) as u8
        }
    }
    /// Writes an 8-bit register by its encoding (0-3 = AL..BL, 4-7 = AH..BH).
    #[inline]
    pub fn set_r8(&mut self, r: usize, v: u8) {
        if r < 4 {
            self.gpr[r] = (self.gpr[r] & !0xff) | v as u64;
        } else {
            self.gpr[r - 4] = (self.gpr[r - 4] & !0xff00) | ((v as u64) << 8);
        }
    }

    /// Reads a GPR at an operand size of 1 (low byte), 2, 4 or 8 bytes.
    #[inline(always)]
    pub fn reg_sized(&self, r: usize, size: u32) -> u64 {
        match size {
            1 => self.gpr[r] & 0xff,
            2 => self.gpr[r] & 0xffff,
            4 => self.gpr[r] & 0xffff_ffff,
            _ => self.gpr[r],
        }
    }
    /// Writes a GPR at an operand size of 1 (low byte), 2, 4 or 8 bytes.
    #[inline(always)]
    pub fn set_reg_sized(&mut self, r: usize, size: u32, v: u64) {
        match size {
            1 => self.gpr[r] = (self.gpr[r] & !0xff) | (v & 0xff),
            2 => self.gpr[r] = (self.gpr[r] & !0xffff) | (v & 0xffff),
            4 => self.gpr[r] = v & 0xffff_ffff,
            _ => self.gpr[r] = v,
        }
    }

    /// Segment register cache.
    #[inline]
    pub fn sreg(&self, s: SegReg) -> &Segment {
        &self.seg[s as usize]
    }

    /// IOPL.
    #[inline]
    pub fn iopl(&self) -> u8 {
        ((self.eflags_raw & IOPL) >> 12) as u8
    }
}
