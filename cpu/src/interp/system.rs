//! Instruction group: system (privileged and mode-sensitive instructions): PUSHF/POPF,
//! CLI/STI, HLT, descriptor-table registers, LLDT/LTR, LMSW/SMSW/CLTS, ARPL, VERR/VERW,
//! LAR/LSL, MOV CRn/DRn, INVLPG, INVD/WBINVD, CPUID, RDTSC, RDMSR/WRMSR, RDPMC,
//! SYSENTER/SYSEXIT, and the I/O permission check of IN/OUT/INS/OUTS.

use crate::descriptor::*;
use crate::exception::{vec, Exception, Res};
use crate::state::*;
use crate::Cpu;
use iced_x86::{Code, Instruction, Mnemonic, OpKind, Register};
use morph86_mmu::PagingRegs;

/// CPUID.1:EDX feature bits morph86 implements (SDM vol. 2, CPUID, table 3-11). This is
/// the one place the reported feature set is defined.
pub mod features {
    /// Bit 0: x87 FPU on chip.
    pub const FPU: u32 = 1 << 0;
    /// Bit 1: virtual-8086 mode extensions (CR4.VME, CR4.PVI).
    pub const VME: u32 = 1 << 1;
    /// Bit 2: debugging extensions (CR4.DE, I/O breakpoints).
    pub const DE: u32 = 1 << 2;
    /// Bit 3: page size extension (4 MiB pages).
    pub const PSE: u32 = 1 << 3;
    /// Bit 4: time-stamp counter (RDTSC, CR4.TSD).
    pub const TSC: u32 = 1 << 4;
    /// Bit 5: RDMSR/WRMSR.
    pub const MSR: u32 = 1 << 5;
    /// Bit 6: physical address extension.
    pub const PAE: u32 = 1 << 6;
    /// Bit 8: CMPXCHG8B.
    pub const CX8: u32 = 1 << 8;
    /// Bit 11: SYSENTER/SYSEXIT.
    pub const SEP: u32 = 1 << 11;
    /// Bit 13: global pages (CR4.PGE).
    pub const PGE: u32 = 1 << 13;
    /// Bit 15: CMOVcc (and FCMOVcc/FCOMI with the FPU).
    pub const CMOV: u32 = 1 << 15;
    /// Bit 17: 36-bit physical addresses in 4 MiB PSE pages (the MMU's PSE-36).
    pub const PSE36: u32 = 1 << 17;
    /// Bit 24: FXSAVE/FXRSTOR (CR4.OSFXSR).
    pub const FXSR: u32 = 1 << 24;
    /// CPUID.1:EDX as reported.
    pub const LEAF1_EDX: u32 =
        FPU | VME | DE | PSE | TSC | MSR | PAE | CX8 | SEP | PGE | CMOV | PSE36 | FXSR;
    /// CPUID.80000001h:EDX bit 20: execute-disable (EFER.NXE).
    pub const EXT_NX: u32 = 1 << 20;
    /// CPUID.80000007h:EDX bit 8: invariant TSC (constant rate, runs in every C-state).
    /// The host-clock TSC is exactly that, and saying so lets Linux trust it without a
    /// watchdog (it has no HPET or ACPI PM timer to check it against here).
    pub const EXT_INVARIANT_TSC: u32 = 1 << 8;
    /// CPUID.(EAX=7,ECX=0):EBX bit 1: the IA32_TSC_ADJUST MSR.
    pub const LEAF7_TSC_ADJUST: u32 = 1 << 1;
    /// CPUID.15h: TSC/crystal ratio 40/1 on a 25 MHz crystal, i.e. the 1 GHz of
    /// [`crate::TscSource::HOST_HZ`]. A guest told the frequency need not measure it
    /// against the PIT, which fails or goes wrong when the host deschedules the vCPU.
    pub const TSC_CRYSTAL_HZ: u32 = 25_000_000;
    /// CPUID.15h:EBX, the TSC/crystal ratio numerator (EAX, the denominator, is 1).
    pub const TSC_RATIO: u32 = (crate::TscSource::HOST_HZ / TSC_CRYSTAL_HZ as u64) as u32;
    /// CPUID.1:EAX: family 6, model 3, stepping 3 (a Pentium II, as DX holds at reset).
    pub const SIGNATURE: u32 = 0x0000_0633;
}

/// CR4 bits a guest may set: those of the features above; the rest are reserved and
/// setting them raises #GP(0).
const CR4_WRITABLE: u64 = CR4_VME
    | CR4_PVI
    | CR4_TSD
    | CR4_DE
    | CR4_PSE
    | CR4_PAE
    | CR4_MCE
    | CR4_PGE
    | CR4_PCE
    | CR4_OSFXSR
    | CR4_OSXMMEXCPT;

/// DR6 bits that read as 1 (P6: bits 4-11 and 16-31).
const DR6_ONES: u64 = 0xffff_0ff0;
/// DR6.BD: the debug exception was a general-detect (DR7.GD) one.
const DR6_BD: u64 = 1 << 13;
/// DR7.GD: general detect enable.
const DR7_GD: u64 = 1 << 13;
/// DR7 bits that read as 0 (bits 11, 12, 14, 15) and 1 (bit 10).
const DR7_ZEROS: u64 = (1 << 11) | (1 << 12) | (1 << 14) | (1 << 15);
/// DR7 bit 10, reads as 1.
const DR7_ONE: u64 = 1 << 10;

// MSR numbers (SDM vol. 4).
/// IA32_TIME_STAMP_COUNTER.
pub const MSR_TSC: u32 = 0x10;
/// IA32_TSC_ADJUST.
pub const MSR_TSC_ADJUST: u32 = 0x3b;
/// IA32_APIC_BASE.
pub const MSR_APIC_BASE: u32 = 0x1b;
/// IA32_BIOS_SIGN_ID (microcode revision).
pub const MSR_BIOS_SIGN_ID: u32 = 0x8b;
/// IA32_MTRRCAP (read-only).
pub const MSR_MTRRCAP: u32 = 0xfe;
/// IA32_SYSENTER_CS.
pub const MSR_SYSENTER_CS: u32 = 0x174;
/// IA32_SYSENTER_ESP.
pub const MSR_SYSENTER_ESP: u32 = 0x175;
/// IA32_SYSENTER_EIP.
pub const MSR_SYSENTER_EIP: u32 = 0x176;
/// IA32_MISC_ENABLE.
pub const MSR_MISC_ENABLE: u32 = 0x1a0;
/// First variable-range MTRR (PHYSBASE0); 8 base/mask pairs up to 0x20f.
pub const MSR_MTRR_PHYSBASE0: u32 = 0x200;
/// IA32_MTRR_FIX64K_00000.
pub const MSR_MTRR_FIX64K: u32 = 0x250;
/// IA32_MTRR_FIX16K_80000 and _A0000.
pub const MSR_MTRR_FIX16K: u32 = 0x258;
/// IA32_MTRR_FIX4K_C0000 .. _F8000 (8 registers).
pub const MSR_MTRR_FIX4K: u32 = 0x268;
/// IA32_PAT.
pub const MSR_PAT: u32 = 0x277;
/// IA32_MTRR_DEF_TYPE.
pub const MSR_MTRR_DEF_TYPE: u32 = 0x2ff;
/// IA32_EFER.
pub const MSR_EFER: u32 = 0xc000_0080;

/// MTRRCAP: 8 variable ranges (bits 7:0), fixed ranges (bit 8), write-combining (bit 10).
const MTRRCAP_VALUE: u64 = 8 | (1 << 8) | (1 << 10);
/// APIC base bits a guest may write: BSP (8), global enable (11), base (12-35).
const APIC_BASE_WRITABLE: u64 = 0x0000_000f_ffff_f900;
/// A memory type valid in PAT and MTRRs: UC, WC, WT, WP, WB (and UC- for PAT).
fn valid_mem_type(t: u64, pat: bool) -> bool {
    matches!(t, 0 | 1 | 4 | 5 | 6) || (pat && t == 7)
}

impl Cpu {
    /// Checks that the current privilege may access `size` bytes of I/O ports at `port`
    /// (IN, OUT, INS, OUTS): always in real mode; in protected mode when CPL <= IOPL;
    /// otherwise (and always in V86 mode) every port's bit in the TSS I/O permission
    /// bitmap must be clear (SDM vol. 1, 18.5.2). Raises #GP(0) when not allowed.
    pub(crate) fn io_permission(&mut self, port: u16, size: u32) -> Res<()> {
        if self.s.real() || (!self.s.v86() && self.s.cpl <= self.s.iopl()) {
            return Ok(());
        }
        let tr = self.s.tr;
        let t = (tr.attrs & ATTR_TYPE) as u8;
        if !(t == SYS_TSS32_AVAIL || t == SYS_TSS32_BUSY) || tr.limit < 0x67 {
            return Err(Exception::gp(0));
        }
        let map = self.read_sys(tr.base + 0x66, 2)? as u32;
        let byte = map + port as u32 / 8;
        if byte + 1 > tr.limit {
            return Err(Exception::gp(0));
        }
        let bits = self.read_sys(tr.base + byte as u64, 2)? as u32;
        let mask = ((1u32 << size) - 1) << (port & 7);
        if bits & mask != 0 {
            return Err(Exception::gp(0));
        }
        Ok(())
    }

    /// #GP(0) unless at privilege level 0 (real mode counts as 0, V86 as 3).
    fn require_cpl0(&self) -> Res<()> {
        if self.s.protected() && (self.s.v86() || self.s.cpl != 0) {
            Err(Exception::gp(0))
        } else {
            Ok(())
        }
    }

    /// #UD outside protected mode (LLDT, LTR, ARPL, VERR, LAR... in real and V86 mode).
    fn require_pm(&self) -> Res<()> {
        if self.s.protected() && !self.s.v86() {
            Ok(())
        } else {
            Err(Exception::ud())
        }
    }

    /// Executes the instruction if it belongs to this group.
    #[inline(never)]
    pub(crate) fn exec_system(&mut self, i: &Instruction) -> Option<Res<()>> {
        Some(match i.mnemonic() {
            Mnemonic::Hlt => {
                if self.s.protected() && self.s.cpl != 0 {
                    Err(Exception::gp(0))
                } else {
                    self.s.halted = true;
                    Ok(())
                }
            }
            Mnemonic::Pushf | Mnemonic::Pushfd => {
                self.pushf(if i.code() == Code::Pushfw { 2 } else { 4 })
            }
            Mnemonic::Popf | Mnemonic::Popfd => {
                self.popf(if i.code() == Code::Popfw { 2 } else { 4 })
            }
            Mnemonic::Cli => self.cli_sti(false),
            Mnemonic::Sti => self.cli_sti(true),
            Mnemonic::Lgdt | Mnemonic::Lidt => self.load_dtr(i),
            Mnemonic::Sgdt | Mnemonic::Sidt => self.store_dtr(i),
            Mnemonic::Lldt => self.lldt(i),
            Mnemonic::Ltr => self.ltr(i),
            Mnemonic::Sldt | Mnemonic::Str => self.store_sys_sel(i),
            Mnemonic::Lmsw => self.lmsw(i),
            Mnemonic::Smsw => {
                let v = self.s.cr0 & 0xffff_ffff;
                self.write_op(i, 0, v)
            }
            Mnemonic::Clts => self.require_cpl0().map(|()| {
                if self.s.cr0 & CR0_TS != 0 {
                    // Keep the MMU's copy of CR0 exact (it compares whole registers).
                    self.s.cr0 &= !CR0_TS;
                    self.sync_paging();
                }
            }),
            Mnemonic::Arpl => self.arpl(i),
            Mnemonic::Verr | Mnemonic::Verw => self.verr_verw(i),
            Mnemonic::Lar | Mnemonic::Lsl => self.lar_lsl(i),
            Mnemonic::Mov if matches!(i.code(), Code::Mov_cr_r32 | Code::Mov_r32_cr) => {
                self.mov_cr(i)
            }
            Mnemonic::Mov if matches!(i.code(), Code::Mov_dr_r32 | Code::Mov_r32_dr) => {
                self.mov_dr(i)
            }
            Mnemonic::Invlpg => self.invlpg(i),
            Mnemonic::Invd | Mnemonic::Wbinvd => self.require_cpl0(),
            Mnemonic::Cpuid => {
                self.cpuid();
                Ok(())
            }
            Mnemonic::Rdtsc => self.rdtsc(),
            Mnemonic::Rdmsr => self.rdmsr(),
            Mnemonic::Wrmsr => self.wrmsr(),
            Mnemonic::Rdpmc => self.rdpmc(),
            Mnemonic::Sysenter => self.sysenter(),
            Mnemonic::Sysexit => self.sysexit(),
            _ => return None,
        })
    }

    /// PUSHF/PUSHFD: VM and RF read as 0 in the image; IOPL-sensitive in V86 mode.
    fn pushf(&mut self, size: u32) -> Res<()> {
        if self.s.v86() && self.s.iopl() < 3 {
            if size == 2 && self.s.cr4 & CR4_VME != 0 {
                let f = self.vme_flags_image();
                return self.push(2, f as u64);
            }
            return Err(Exception::gp(0));
        }
        let f = self.s.eflags() & !(VM | RF);
        self.push(size, f as u64)
    }

    /// The EFLAGS bits POPF/POPFD may change at the current privilege (SDM vol. 2,
    /// POPF): IOPL only at CPL 0, IF only when CPL <= IOPL; VM, VIF and VIP never; RF is
    /// cleared.
    fn popf_mask(&self, size: u32) -> u32 {
        let mut m = CF | PF | AF | ZF | SF | TF | DF | OF | NT;
        if size == 4 {
            m |= AC | ID | RF;
        }
        if self.s.real() || (!self.s.v86() && self.s.cpl == 0) {
            m |= IOPL | IF;
        } else if self.s.cpl <= self.s.iopl() {
            m |= IF;
        }
        m
    }

    /// POPF/POPFD.
    fn popf(&mut self, size: u32) -> Res<()> {
        if self.s.v86() && self.s.iopl() < 3 {
            if size == 2 && self.s.cr4 & CR4_VME != 0 {
                let v = self.peek_stack(0, 2)? as u32;
                self.vme_load_flags(v)?;
                self.adjust_sp(2);
                return Ok(());
            }
            return Err(Exception::gp(0));
        }
        let v = self.peek_stack(0, size)? as u32 & !RF;
        self.adjust_sp(size as i64);
        let m = self.popf_mask(size);
        let old = self.s.eflags();
        self.s.set_eflags((old & !m) | (v & m));
        Ok(())
    }

    /// CLI/STI (IOPL-sensitive outside real mode). STI that sets IF holds interrupts off
    /// until the next instruction has completed.
    fn cli_sti(&mut self, set: bool) -> Res<()> {
        if self.s.protected() && self.s.cpl > self.s.iopl() {
            // VME (V86) and PVI (CPL 3): act on VIF instead (SDM vol. 3, 20.4).
            let virt = (self.s.v86() && self.s.cr4 & CR4_VME != 0)
                || (!self.s.v86() && self.s.cpl == 3 && self.s.cr4 & CR4_PVI != 0);
            if !virt {
                return Err(Exception::gp(0));
            }
            if set {
                if self.s.eflags_raw & VIP != 0 {
                    return Err(Exception::gp(0));
                }
                self.s.eflags_raw |= VIF;
            } else {
                self.s.eflags_raw &= !VIF;
            }
            return Ok(());
        }
        let was = self.s.eflags_raw & IF != 0;
        if set {
            self.s.eflags_raw |= IF;
            if !was {
                self.s.inhibit_irq = true;
            }
        } else {
            self.s.eflags_raw &= !IF;
        }
        Ok(())
    }

    /// The 16-bit FLAGS image V86 code sees under VME with IOPL < 3: IF replaced by
    /// VIF, IOPL read as 3 (SDM vol. 2, PUSHF).
    pub(crate) fn vme_flags_image(&self) -> u32 {
        let f = self.s.eflags() & 0xffff;
        let vif = if self.s.eflags_raw & VIF != 0 { IF } else { 0 };
        (f & !IF) | vif | IOPL
    }

    /// Loads a 16-bit FLAGS image as POPF / IRET do under VME with IOPL < 3: #GP(0)
    /// when it sets TF, or sets IF while VIP is pending; IF goes to VIF, IOPL stays.
    pub(crate) fn vme_load_flags(&mut self, v: u32) -> Res<()> {
        if v & TF != 0 || (v & IF != 0 && self.s.eflags_raw & VIP != 0) {
            return Err(Exception::gp(0));
        }
        let old = self.s.eflags();
        let m = 0xffff & !(IF | IOPL);
        let mut nf = (old & !m) | (v & m);
        nf = (nf & !VIF) | if v & IF != 0 { VIF } else { 0 };
        self.s.set_eflags(nf);
        Ok(())
    }

    /// Offset of the second part of a pseudo-descriptor or far pointer.
    fn ea_plus(&self, i: &Instruction, d: u32) -> u32 {
        let ea = self.ea(i);
        if self.addr_size(i) == 2 {
            (ea + d) & 0xffff
        } else {
            ea.wrapping_add(d)
        }
    }

    /// LGDT / LIDT: 16-bit operand size takes a 24-bit base.
    fn load_dtr(&mut self, i: &Instruction) -> Res<()> {
        if i.op0_kind() != OpKind::Memory {
            return Err(Exception::ud());
        }
        self.require_cpl0()?;
        let seg = self.mem_seg(i);
        let limit = self.read_mem(seg, self.ea(i), 2)? as u32;
        let mut base = self.read_mem(seg, self.ea_plus(i, 2), 4)?;
        if matches!(i.code(), Code::Lgdt_m1632_16 | Code::Lidt_m1632_16) {
            base &= 0x00ff_ffff;
        }
        let t = TableReg { base, limit };
        if i.mnemonic() == Mnemonic::Lgdt {
            self.s.gdtr = t;
        } else {
            self.s.idtr = t;
        }
        Ok(())
    }

    /// SGDT / SIDT: limit then base; with a 16-bit operand size the fourth base byte is
    /// stored as 0 (P6 behaviour).
    fn store_dtr(&mut self, i: &Instruction) -> Res<()> {
        if i.op0_kind() != OpKind::Memory {
            return Err(Exception::ud());
        }
        let t = if i.mnemonic() == Mnemonic::Sgdt {
            self.s.gdtr
        } else {
            self.s.idtr
        };
        let mut base = t.base as u32;
        if matches!(i.code(), Code::Sgdt_m1632_16 | Code::Sidt_m1632_16) {
            base &= 0x00ff_ffff;
        }
        let seg = self.mem_seg(i);
        let (a, b) = (self.ea(i), self.ea_plus(i, 2));
        self.probe_write_mem(seg, a, 2)?;
        self.probe_write_mem(seg, b, 4)?;
        self.write_mem(seg, a, 2, t.limit as u64 & 0xffff)?;
        self.write_mem(seg, b, 4, base as u64)
    }

    /// Reads a 16-bit selector operand (register or memory).
    fn read_sel(&mut self, i: &Instruction, n: u32) -> Res<u16> {
        if i.op_kind(n) == OpKind::Memory {
            let seg = self.mem_seg(i);
            Ok(self.read_mem(seg, self.ea(i), 2)? as u16)
        } else {
            Ok(self.reg_read(i.op_register(n)) as u16)
        }
    }

    /// LLDT.
    fn lldt(&mut self, i: &Instruction) -> Res<()> {
        self.require_pm()?;
        self.require_cpl0()?;
        let sel = self.read_sel(i, 0)?;
        if sel & !3 == 0 {
            self.s.ldtr = Segment {
                attrs: ATTR_UNUSABLE,
                selector: sel,
                ..Default::default()
            };
            return Ok(());
        }
        let code = sel as u32 & 0xfffc;
        if sel & 4 != 0 {
            return Err(Exception::gp(code));
        }
        let (_, d) = self.read_desc(sel, Exception::gp)?;
        if d.sys_type() != Some(SYS_LDT) {
            return Err(Exception::gp(code));
        }
        if !d.present() {
            return Err(Exception::np(code));
        }
        self.s.ldtr = d.to_segment(sel);
        Ok(())
    }

    /// LTR: loads TR and marks the TSS busy.
    fn ltr(&mut self, i: &Instruction) -> Res<()> {
        self.require_pm()?;
        self.require_cpl0()?;
        let sel = self.read_sel(i, 0)?;
        if sel & !3 == 0 {
            return Err(Exception::gp(0));
        }
        let code = sel as u32 & 0xfffc;
        if sel & 4 != 0 {
            return Err(Exception::gp(code));
        }
        let (addr, d) = self.read_desc(sel, Exception::gp)?;
        if !matches!(d.sys_type(), Some(SYS_TSS16_AVAIL | SYS_TSS32_AVAIL)) {
            return Err(Exception::gp(code));
        }
        if !d.present() {
            return Err(Exception::np(code));
        }
        let b = (d.0 >> 40) as u8 | TSS_BUSY_BIT;
        self.write_sys(addr + 5, 1, b as u64)?;
        let mut tr = d.to_segment(sel);
        tr.attrs |= TSS_BUSY_BIT as u32;
        self.s.tr = tr;
        Ok(())
    }

    /// SLDT / STR: a register destination gets the selector zero-extended.
    fn store_sys_sel(&mut self, i: &Instruction) -> Res<()> {
        self.require_pm()?;
        let v = if i.mnemonic() == Mnemonic::Sldt {
            self.s.ldtr.selector
        } else {
            self.s.tr.selector
        };
        if i.op0_kind() == OpKind::Memory {
            let seg = self.mem_seg(i);
            self.write_mem(seg, self.ea(i), 2, v as u64)
        } else {
            self.reg_write(i.op0_register(), v as u64);
            Ok(())
        }
    }

    /// LMSW: loads PE, MP, EM and TS; cannot clear PE.
    fn lmsw(&mut self, i: &Instruction) -> Res<()> {
        self.require_cpl0()?;
        let v = self.read_sel(i, 0)? as u64;
        let keep_pe = self.s.cr0 & CR0_PE;
        let cr0 = (self.s.cr0 & !0xf) | (v & 0xf) | keep_pe;
        if cr0 != self.s.cr0 {
            self.s.cr0 = cr0;
            self.sync_paging();
        }
        Ok(())
    }

    /// ARPL r/m16, r16.
    fn arpl(&mut self, i: &Instruction) -> Res<()> {
        self.require_pm()?;
        let dst = self.read_op(i, 0)? as u16;
        let src = self.reg_read(i.op1_register()) as u16;
        if dst & 3 < src & 3 {
            let v = (dst & !3) | (src & 3);
            if i.op0_kind() == OpKind::Register {
                let r = i.op0_register();
                let (n, _, _) = super::operands::gpr_of(r);
                self.s.set_r16(n, v);
            } else {
                self.write_mem(self.mem_seg(i), self.ea(i), 2, v as u64)?;
            }
            self.s.set_flag(ZF, true);
        } else {
            self.s.set_flag(ZF, false);
        }
        Ok(())
    }

    /// Reads the descriptor for VERR/VERW/LAR/LSL: `None` when the selector is null or
    /// beyond the table limit (these instructions then clear ZF instead of faulting).
    fn probe_desc(&mut self, sel: u16) -> Res<Option<Descriptor>> {
        if sel & !3 == 0 {
            return Ok(None);
        }
        match self.desc_addr(sel) {
            None => Ok(None),
            Some(a) => Ok(Some(Descriptor(self.read_sys(a, 8)?))),
        }
    }

    /// Privilege test of VERR/VERW/LAR/LSL: conforming code passes, everything else needs
    /// DPL >= CPL and DPL >= RPL.
    fn desc_visible(&self, d: &Descriptor, sel: u16) -> bool {
        d.conforming() || (d.dpl() >= self.s.cpl && d.dpl() >= (sel & 3) as u8)
    }

    /// VERR / VERW: ZF = segment readable / writable at the current privilege.
    fn verr_verw(&mut self, i: &Instruction) -> Res<()> {
        self.require_pm()?;
        let sel = self.read_sel(i, 0)?;
        let ok = match self.probe_desc(sel)? {
            Some(d) if d.is_seg() && self.desc_visible(&d, sel) => {
                if i.mnemonic() == Mnemonic::Verr {
                    d.readable()
                } else {
                    d.writable_data()
                }
            }
            _ => false,
        };
        self.s.set_flag(ZF, ok);
        Ok(())
    }

    /// LAR / LSL.
    fn lar_lsl(&mut self, i: &Instruction) -> Res<()> {
        self.require_pm()?;
        let sel = self.read_sel(i, 1)?;
        let lar = i.mnemonic() == Mnemonic::Lar;
        let d = match self.probe_desc(sel)? {
            Some(d) if self.desc_visible(&d, sel) => d,
            _ => {
                self.s.set_flag(ZF, false);
                return Ok(());
            }
        };
        let valid = match d.sys_type() {
            None => true,
            Some(t) => {
                if lar {
                    matches!(t, 1 | 2 | 3 | 4 | 5 | 9 | 0xb | 0xc)
                } else {
                    matches!(t, 1 | 2 | 3 | 9 | 0xb)
                }
            }
        };
        if !valid {
            self.s.set_flag(ZF, false);
            return Ok(());
        }
        let v = if lar {
            (d.0 >> 32) & 0x00ff_ff00
        } else {
            d.limit() as u64
        };
        self.reg_write(i.op0_register(), v);
        self.s.set_flag(ZF, true);
        Ok(())
    }

    /// MOV to or from CR0, CR2, CR3, CR4.
    fn mov_cr(&mut self, i: &Instruction) -> Res<()> {
        self.require_cpl0()?;
        let to_cr = i.code() == Code::Mov_cr_r32;
        let (crr, gr) = if to_cr {
            (i.op0_register(), i.op1_register())
        } else {
            (i.op1_register(), i.op0_register())
        };
        let n = (crr as u32).wrapping_sub(Register::CR0 as u32);
        if !to_cr {
            let v = match n {
                0 => self.s.cr0,
                2 => self.s.cr2,
                3 => self.s.cr3,
                4 => self.s.cr4,
                _ => return Err(Exception::ud()),
            };
            self.reg_write(gr, v & 0xffff_ffff);
            return Ok(());
        }
        let v = self.reg_read(gr) & 0xffff_ffff;
        match n {
            0 => {
                let v = v | CR0_ET;
                if v & CR0_PG != 0 && v & CR0_PE == 0 {
                    return Err(Exception::gp(0));
                }
                if v & CR0_NW != 0 && v & CR0_CD == 0 {
                    return Err(Exception::gp(0));
                }
                // Bits that exist on a P6; the rest are ignored.
                let known = CR0_PE
                    | CR0_MP
                    | CR0_EM
                    | CR0_TS
                    | CR0_ET
                    | CR0_NE
                    | CR0_WP
                    | CR0_AM
                    | CR0_NW
                    | CR0_CD
                    | CR0_PG;
                let new = PagingRegs {
                    cr0: v & known,
                    ..self.cur_paging_regs()
                };
                self.install_paging(new)?;
                if self.s.real() {
                    self.s.cpl = 0;
                }
            }
            2 => self.s.cr2 = v,
            3 => {
                let new = PagingRegs {
                    cr3: v,
                    ..self.cur_paging_regs()
                };
                self.install_paging(new)?;
            }
            4 => {
                if v & !CR4_WRITABLE != 0 {
                    return Err(Exception::gp(0));
                }
                let new = PagingRegs {
                    cr4: v,
                    ..self.cur_paging_regs()
                };
                self.install_paging(new)?;
            }
            _ => return Err(Exception::ud()),
        }
        Ok(())
    }

    /// The paging registers as the architectural state holds them.
    pub(crate) fn cur_paging_regs(&self) -> PagingRegs {
        PagingRegs {
            cr0: self.s.cr0,
            cr3: self.s.cr3,
            cr4: self.s.cr4,
            efer: self.s.efer,
        }
    }

    /// Commits a MOV to CR0/CR3/CR4: #GP(0) when it would enable PAE paging over
    /// PDPTEs with reserved bits set (SDM vol. 3, 4.4.1); otherwise the registers and
    /// the MMU are updated together (one `sync_paging` per write, as the MMU expects).
    fn install_paging(&mut self, new: PagingRegs) -> Res<()> {
        if !self.mmu.pdptes_valid(&new) {
            return Err(Exception::gp(0));
        }
        self.s.cr0 = new.cr0;
        self.s.cr3 = new.cr3;
        self.s.cr4 = new.cr4;
        self.sync_paging();
        Ok(())
    }

    /// MOV to or from DR0-DR7 (DR4/DR5 alias DR6/DR7 unless CR4.DE; DR7.GD traps).
    fn mov_dr(&mut self, i: &Instruction) -> Res<()> {
        self.require_cpl0()?;
        let to_dr = i.code() == Code::Mov_dr_r32;
        let (drr, gr) = if to_dr {
            (i.op0_register(), i.op1_register())
        } else {
            (i.op1_register(), i.op0_register())
        };
        let mut n = (drr as u32).wrapping_sub(Register::DR0 as u32) as usize;
        if n == 4 || n == 5 {
            if self.s.cr4 & CR4_DE != 0 {
                return Err(Exception::ud());
            }
            n += 2;
        }
        if n > 7 {
            return Err(Exception::ud());
        }
        if self.s.dr[7] & DR7_GD != 0 {
            // General detect: #DB before the access, with DR6.BD; GD is cleared so the
            // handler can use the debug registers.
            self.s.dr[6] |= DR6_BD;
            self.s.dr[7] &= !DR7_GD;
            return Err(Exception::new(vec::DB));
        }
        if to_dr {
            let v = self.reg_read(gr) & 0xffff_ffff;
            self.s.dr[n] = match n {
                6 => (v | DR6_ONES) & !(1 << 12),
                7 => (v | DR7_ONE) & !DR7_ZEROS,
                _ => v,
            };
        } else {
            self.reg_write(gr, self.s.dr[n] & 0xffff_ffff);
        }
        Ok(())
    }

    /// INVLPG m.
    fn invlpg(&mut self, i: &Instruction) -> Res<()> {
        if i.op0_kind() != OpKind::Memory {
            return Err(Exception::ud());
        }
        self.require_cpl0()?;
        let sc = self.s.seg[self.mem_seg(i) as usize];
        let lin = sc.base.wrapping_add(self.ea(i) as u64) & 0xffff_ffff;
        self.mmu.invlpg(lin);
        Ok(())
    }

    /// CPUID (see [`features`]).
    fn cpuid(&mut self) {
        const MAX_BASIC: u32 = 0x16;
        const MAX_EXT: u32 = 0x8000_0007;
        let mut leaf = self.s.gpr[reg::RAX] as u32;
        if (leaf > MAX_BASIC && leaf < 0x8000_0000) || leaf > MAX_EXT {
            // Intel: an unknown leaf returns the highest basic leaf.
            leaf = MAX_BASIC;
        }
        let (a, b, c, d) = match leaf {
            // "GenuineIntel" in EBX, EDX, ECX.
            0 => (MAX_BASIC, 0x756e_6547, 0x6c65_746e, 0x4965_6e69),
            1 => (features::SIGNATURE, 0, 0, features::LEAF1_EDX),
            // One iteration, no cache or TLB descriptors (0x00 = null descriptor).
            2 => (1, 0, 0, 0),
            7 if self.s.gpr[reg::RCX] as u32 == 0 => (0, features::LEAF7_TSC_ADJUST, 0, 0),
            // TSC frequency = ECX * EBX / EAX; leaf 16h: base/max/bus MHz.
            0x15 => (1, features::TSC_RATIO, features::TSC_CRYSTAL_HZ, 0),
            0x16 => {
                let mhz = (crate::TscSource::HOST_HZ / 1_000_000) as u32;
                (mhz, mhz, 100, 0)
            }
            0x8000_0000 => (MAX_EXT, 0, 0, 0),
            0x8000_0001 => (0, 0, 0, features::EXT_NX),
            0x8000_0007 => (0, 0, 0, features::EXT_INVARIANT_TSC),
            _ => (0, 0, 0, 0),
        };
        self.s.set_r32(reg::RAX, a);
        self.s.set_r32(reg::RBX, b);
        self.s.set_r32(reg::RCX, c);
        self.s.set_r32(reg::RDX, d);
    }

    /// The raw count of the TSC's source (before `tsc_offset`).
    pub(crate) fn tsc_count(&self) -> u64 {
        match self.tsc_source {
            crate::TscSource::Instructions => self.stats.instructions,
            crate::TscSource::HostClock { start, hz } => {
                let ns = start.elapsed().as_nanos();
                if hz == 1_000_000_000 {
                    ns as u64
                } else {
                    (ns * hz as u128 / 1_000_000_000) as u64
                }
            }
        }
    }

    /// The time-stamp counter: the count of `tsc_source` (instructions retired, or the
    /// host clock) plus `tsc_offset`; WRMSR to IA32_TSC moves the offset.
    pub fn tsc(&self) -> u64 {
        self.tsc_count().wrapping_add(self.tsc_offset)
    }

    /// RDTSC (#GP(0) at CPL > 0 when CR4.TSD).
    fn rdtsc(&mut self) -> Res<()> {
        if self.s.cr4 & CR4_TSD != 0 && self.s.protected() && (self.s.cpl != 0 || self.s.v86()) {
            return Err(Exception::gp(0));
        }
        let t = self.tsc();
        self.s.set_r32(reg::RAX, t as u32);
        self.s.set_r32(reg::RDX, (t >> 32) as u32);
        Ok(())
    }

    /// RDPMC: #GP(0) unless CR4.PCE or CPL 0, and for counters other than 0 and 1.
    /// The counters read as 0 (no events are counted).
    fn rdpmc(&mut self) -> Res<()> {
        let allowed =
            self.s.cr4 & CR4_PCE != 0 || !self.s.protected() || (self.s.cpl == 0 && !self.s.v86());
        if !allowed || self.s.gpr[reg::RCX] as u32 > 1 {
            return Err(Exception::gp(0));
        }
        self.s.set_r32(reg::RAX, 0);
        self.s.set_r32(reg::RDX, 0);
        Ok(())
    }

    /// Reads an MSR; `None` for one morph86 does not have (#GP(0)).
    pub fn read_msr(&self, n: u32) -> Option<u64> {
        let m = &self.s.msr;
        Some(match n {
            MSR_TSC => self.tsc(),
            // TSC_ADJUST moves with every TSC write, as the offset does (SDM vol. 3 17.17.3).
            MSR_TSC_ADJUST => self.tsc_offset,
            MSR_APIC_BASE => m.apic_base,
            MSR_BIOS_SIGN_ID => 0,
            MSR_MTRRCAP => MTRRCAP_VALUE,
            MSR_SYSENTER_CS => m.sysenter_cs,
            MSR_SYSENTER_ESP => m.sysenter_esp,
            MSR_SYSENTER_EIP => m.sysenter_eip,
            MSR_MISC_ENABLE => m.misc_enable,
            MSR_PAT => m.pat,
            MSR_MTRR_DEF_TYPE => m.mtrr_def_type,
            MSR_EFER => self.s.efer,
            _ => m.mtrr[mtrr_index(n)?],
        })
    }

    /// Writes an MSR; `Err` (#GP(0)) for an unknown MSR or a value with reserved bits.
    pub fn write_msr(&mut self, n: u32, v: u64) -> Res<()> {
        let gp = Err(Exception::gp(0));
        match n {
            MSR_TSC => self.tsc_offset = v.wrapping_sub(self.tsc_count()),
            MSR_TSC_ADJUST => self.tsc_offset = v,
            MSR_APIC_BASE => {
                if v & !APIC_BASE_WRITABLE != 0 {
                    return gp;
                }
                self.s.msr.apic_base = v;
            }
            MSR_BIOS_SIGN_ID => {}
            MSR_SYSENTER_CS => self.s.msr.sysenter_cs = v & 0xffff_ffff,
            MSR_SYSENTER_ESP => self.s.msr.sysenter_esp = v & 0xffff_ffff,
            MSR_SYSENTER_EIP => self.s.msr.sysenter_eip = v & 0xffff_ffff,
            MSR_MISC_ENABLE => self.s.msr.misc_enable = v,
            MSR_PAT => {
                if (0..8).any(|k| !valid_mem_type((v >> (8 * k)) & 0xff, true)) {
                    return gp;
                }
                self.s.msr.pat = v;
            }
            MSR_MTRR_DEF_TYPE => {
                // Type (7:0), FE (10), E (11).
                if v & !0xcff != 0 || !valid_mem_type(v & 0xff, false) {
                    return gp;
                }
                self.s.msr.mtrr_def_type = v;
            }
            MSR_EFER => {
                // Only NXE exists on this (32-bit, PAE-capable) CPU.
                if v & !EFER_NXE != 0 {
                    return gp;
                }
                if v != self.s.efer {
                    self.s.efer = v;
                    self.sync_paging();
                }
            }
            MSR_MTRRCAP => return gp,
            _ => {
                let Some(k) = mtrr_index(n) else {
                    return gp;
                };
                if k < 16 {
                    // Variable ranges: PHYSBASE (type 7:0, base 35:12), PHYSMASK
                    // (valid 11, mask 35:12), 36-bit physical addresses.
                    let ok = if k % 2 == 0 {
                        v & !0xf_ffff_f0ff == 0 && valid_mem_type(v & 0xff, false)
                    } else {
                        v & !0xf_ffff_f800 == 0
                    };
                    if !ok {
                        return gp;
                    }
                } else if (0..8).any(|b| !valid_mem_type((v >> (8 * b)) & 0xff, false)) {
                    return gp;
                }
                self.s.msr.mtrr[k] = v;
            }
        }
        Ok(())
    }

    /// RDMSR.
    fn rdmsr(&mut self) -> Res<()> {
        self.require_cpl0()?;
        let v = self
            .read_msr(self.s.gpr[reg::RCX] as u32)
            .ok_or(Exception::gp(0))?;
        self.s.set_r32(reg::RAX, v as u32);
        self.s.set_r32(reg::RDX, (v >> 32) as u32);
        Ok(())
    }

    /// WRMSR.
    fn wrmsr(&mut self) -> Res<()> {
        self.require_cpl0()?;
        let v = (self.s.gpr[reg::RDX] & 0xffff_ffff) << 32 | (self.s.gpr[reg::RAX] & 0xffff_ffff);
        self.write_msr(self.s.gpr[reg::RCX] as u32, v)
    }

    /// A flat 4 GiB segment cache as SYSENTER/SYSEXIT load it.
    fn flat_seg(sel: u16, code: bool, dpl: u8) -> Segment {
        let t = if code {
            ATTR_CODE | ATTR_RW | ATTR_ACCESSED
        } else {
            ATTR_RW | ATTR_ACCESSED
        };
        Segment {
            base: 0,
            limit: 0xffff_ffff,
            attrs: ATTR_P | ATTR_S | ATTR_DB | ATTR_G | t | ((dpl as u32) << ATTR_DPL_SHIFT),
            selector: sel,
        }
    }

    /// SYSENTER: to ring 0 at SYSENTER_CS:SYSENTER_EIP with a flat stack.
    fn sysenter(&mut self) -> Res<()> {
        let cs = self.s.msr.sysenter_cs as u16;
        if !self.s.protected() || cs & 0xfffc == 0 {
            return Err(Exception::gp(0));
        }
        let f = self.s.eflags();
        self.s.set_eflags(f & !(VM | IF | RF));
        self.s.seg[SegReg::Cs as usize] = Self::flat_seg(cs & 0xfffc, true, 0);
        self.s.seg[SegReg::Ss as usize] = Self::flat_seg((cs & 0xfffc) + 8, false, 0);
        self.s.cpl = 0;
        self.s.set_r32(reg::RSP, self.s.msr.sysenter_esp as u32);
        self.s.rip = self.s.msr.sysenter_eip & 0xffff_ffff;
        Ok(())
    }

    /// SYSEXIT: to ring 3 at (SYSENTER_CS+16):EDX with stack (SYSENTER_CS+24):ECX.
    fn sysexit(&mut self) -> Res<()> {
        let cs = self.s.msr.sysenter_cs as u16;
        if !self.s.protected() || self.s.v86() || self.s.cpl != 0 || cs & 0xfffc == 0 {
            return Err(Exception::gp(0));
        }
        self.s.seg[SegReg::Cs as usize] = Self::flat_seg(((cs & 0xfffc) + 16) | 3, true, 3);
        self.s.seg[SegReg::Ss as usize] = Self::flat_seg(((cs & 0xfffc) + 24) | 3, false, 3);
        self.s.cpl = 3;
        self.s.set_r32(reg::RSP, self.s.gpr[reg::RCX] as u32);
        self.s.rip = self.s.gpr[reg::RDX] & 0xffff_ffff;
        Ok(())
    }
}

/// Index into `Msrs::mtrr` for an MTRR MSR: 0-15 the variable pairs, 16 FIX64K,
/// 17-18 FIX16K, 19-26 FIX4K.
fn mtrr_index(n: u32) -> Option<usize> {
    match n {
        0x200..=0x20f => Some((n - MSR_MTRR_PHYSBASE0) as usize),
        MSR_MTRR_FIX64K => Some(16),
        0x258..=0x259 => Some(17 + (n - MSR_MTRR_FIX16K) as usize),
        0x268..=0x26f => Some(19 + (n - MSR_MTRR_FIX4K) as usize),
        _ => None,
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::descriptor::testing::*;

    const TSS: u16 = 0x18;
    const TSS_BASE: u64 = 0x3000;

    /// CPL 3, IOPL 0, TR = a 32-bit TSS whose bitmap (at 0x68) allows ports 0x60-0x67
    /// and 0x3f8 only; the bitmap covers ports 0-0x3ff (0x80 bytes), limit 0x68+0x80.
    fn io_cpu() -> Cpu {
        let mut c = pm_cpu(&[(
            TSS,
            Descriptor::segment(TSS_BASE as u32, 0x68 + 0x80, 0x8b, 0),
        )]);
        c.s.tr = Descriptor::segment(TSS_BASE as u32, 0x68 + 0x80, 0x8b, 0).to_segment(TSS);
        c.mmu.phys.write(TSS_BASE + 0x66, &0x68u16.to_le_bytes());
        let mut map = vec![0xffu8; 0x81];
        map[0x60 / 8] = 0x00;
        map[0x3f8 / 8] = 0xfe;
        c.mmu.phys.write(TSS_BASE + 0x68, &map);
        c.s.cpl = 3;
        c
    }

    #[test]
    fn io_bitmap_rules() {
        let mut c = io_cpu();
        assert_eq!(c.io_permission(0x60, 1), Ok(()));
        assert_eq!(c.io_permission(0x64, 4), Ok(()));
        assert_eq!(c.io_permission(0x3f8, 1), Ok(()));
        assert_eq!(
            c.io_permission(0x3f8, 2),
            Err(Exception::gp(0)),
            "0x3f9 denied"
        );
        // A word at 0x67 needs the bits of 0x67 and 0x68 (next byte): denied.
        assert_eq!(c.io_permission(0x67, 2), Err(Exception::gp(0)));
        assert_eq!(c.io_permission(0x70, 1), Err(Exception::gp(0)));
        // Beyond the TSS limit: denied.
        assert_eq!(c.io_permission(0x400, 1), Err(Exception::gp(0)));
        // CPL <= IOPL: no bitmap check in protected mode ...
        c.s.eflags_raw |= IOPL;
        assert_eq!(c.io_permission(0x70, 1), Ok(()));
        // ... but V86 always uses the bitmap.
        c.s.eflags_raw |= VM;
        assert_eq!(c.io_permission(0x70, 1), Err(Exception::gp(0)));
        assert_eq!(c.io_permission(0x61, 1), Ok(()));
        // Real mode: always allowed.
        c.s.eflags_raw &= !VM;
        c.s.cr0 &= !CR0_PE;
        c.s.cpl = 0;
        assert_eq!(c.io_permission(0x70, 1), Ok(()));
    }

    #[test]
    fn io_needs_a_32bit_tss() {
        let mut c = io_cpu();
        c.s.tr.attrs = (c.s.tr.attrs & !ATTR_TYPE) | SYS_TSS16_BUSY as u32;
        assert_eq!(c.io_permission(0x60, 1), Err(Exception::gp(0)));
    }

    #[test]
    fn cpuid_leaves() {
        let mut c = pm_cpu(&[]);
        c.s.gpr[reg::RAX] = 0;
        c.cpuid();
        let mut v = Vec::new();
        for r in [reg::RBX, reg::RDX, reg::RCX] {
            v.extend_from_slice(&(c.s.gpr[r] as u32).to_le_bytes());
        }
        assert_eq!(&v, b"GenuineIntel");
        c.s.gpr[reg::RAX] = 1;
        c.cpuid();
        let edx = c.s.gpr[reg::RDX] as u32;
        // SDM table 3-11 bit numbers.
        for bit in [0, 1, 2, 3, 4, 5, 6, 8, 11, 13, 15, 24] {
            assert_ne!(edx & (1 << bit), 0, "feature bit {bit}");
        }
        for bit in [9, 23, 25, 26] {
            assert_eq!(
                edx & (1 << bit),
                0,
                "APIC/MMX/SSE/SSE2 bit {bit} not reported"
            );
        }
        assert_eq!(c.s.gpr[reg::RAX] as u32 >> 8 & 0xf, 6, "family 6");
        c.s.gpr[reg::RAX] = 0x8000_0001;
        c.cpuid();
        assert_ne!(c.s.gpr[reg::RDX] & (1 << 20), 0, "NX");
        // Unknown leaf: highest basic leaf's data (16h: base frequency in MHz).
        c.s.gpr[reg::RAX] = 0x55;
        c.cpuid();
        assert_eq!(c.s.gpr[reg::RAX], 1000);
        // 15h: the TSC runs at crystal * EBX / EAX = 1 GHz, as RDTSC counts host ns.
        c.s.gpr[reg::RAX] = 0x15;
        c.cpuid();
        let (a, b, cx) = (c.s.gpr[reg::RAX], c.s.gpr[reg::RBX], c.s.gpr[reg::RCX]);
        assert_eq!(cx * b / a, 1_000_000_000);
        // Invariant TSC (80000007h:EDX bit 8) and TSC_ADJUST (7:EBX bit 1).
        c.s.gpr[reg::RAX] = 0x8000_0007;
        c.cpuid();
        assert_ne!(c.s.gpr[reg::RDX] & (1 << 8), 0);
        c.s.gpr[reg::RAX] = 7;
        c.s.gpr[reg::RCX] = 0;
        c.cpuid();
        assert_ne!(c.s.gpr[reg::RBX] & (1 << 1), 0);
    }

    #[test]
    fn tsc_adjust_follows_tsc_writes() {
        let mut c = pm_cpu(&[]);
        assert_eq!(c.read_msr(MSR_TSC_ADJUST), Some(0));
        let t0 = c.tsc();
        c.write_msr(MSR_TSC_ADJUST, 500).unwrap();
        assert_eq!(c.tsc(), t0 + 500, "TSC moves by the change of TSC_ADJUST");
        c.write_msr(MSR_TSC, t0 + 1500).unwrap();
        assert_eq!(
            c.read_msr(MSR_TSC_ADJUST),
            Some(1500),
            "and TSC writes move it"
        );
    }

    #[test]
    fn msr_rules() {
        let mut c = pm_cpu(&[]);
        assert_eq!(c.read_msr(0x1234), None);
        assert_eq!(c.write_msr(0x1234, 0), Err(Exception::gp(0)));
        // PAT entry type 2 is reserved.
        assert_eq!(
            c.write_msr(MSR_PAT, 0x0007_0406_0007_0402),
            Err(Exception::gp(0))
        );
        assert_eq!(c.write_msr(MSR_PAT, 0x0007_0406_0007_0406), Ok(()));
        assert_eq!(c.read_msr(MSR_PAT), Some(0x0007_0406_0007_0406));
        // EFER: only NXE (bit 11) on this CPU.
        assert_eq!(c.write_msr(MSR_EFER, 1 << 8), Err(Exception::gp(0)));
        assert_eq!(c.write_msr(MSR_EFER, EFER_NXE), Ok(()));
        assert_eq!(c.s.efer, EFER_NXE);
        assert_eq!(
            c.write_msr(MSR_MTRRCAP, 0),
            Err(Exception::gp(0)),
            "read-only"
        );
        assert_eq!(
            c.write_msr(0x201, 1),
            Err(Exception::gp(0)),
            "PHYSMASK reserved bits"
        );
        assert_eq!(c.write_msr(MSR_TSC, 1000), Ok(()));
        assert_eq!(c.read_msr(MSR_TSC), Some(1000));
        // RDMSR / WRMSR at CPL 3: #GP(0).
        c.s.cpl = 3;
        c.s.gpr[reg::RCX] = MSR_SYSENTER_CS as u64;
        assert_eq!(exec(&mut c, &[0x0f, 0x32]), Err(Exception::gp(0)));
    }

    #[test]
    fn popf_privilege_masks() {
        let mut c = pm_cpu(&[]);
        c.s.cpl = 3;
        c.s.set_eflags(FLAG_1);
        // POPFD at CPL 3, IOPL 0: IF and IOPL keep their values, CF changes.
        c.mmu.phys.write(0x8000, &(IF | IOPL | CF).to_le_bytes());
        c.s.seg[SegReg::Ss as usize].attrs |= 3 << ATTR_DPL_SHIFT;
        assert_eq!(exec(&mut c, &[0x9d]), Ok(()));
        assert_eq!(c.s.eflags() & (IF | IOPL | CF), CF);
        // At CPL 0 both change.
        c.s.cpl = 0;
        c.s.gpr[reg::RSP] = 0x8000;
        assert_eq!(exec(&mut c, &[0x9d]), Ok(()));
        assert_eq!(c.s.eflags() & (IF | IOPL | CF), IF | IOPL | CF);
        // CLI at CPL 3 with IOPL 0: #GP(0); with IOPL 3 fine.
        c.s.cpl = 3;
        c.s.set_eflags(FLAG_1 | IF);
        assert_eq!(exec(&mut c, &[0xfa]), Err(Exception::gp(0)));
        c.s.set_eflags(FLAG_1 | IF | IOPL);
        assert_eq!(exec(&mut c, &[0xfa]), Ok(()));
        assert_eq!(c.s.eflags() & IF, 0);
    }

    #[test]
    fn control_register_rules() {
        let mut c = pm_cpu(&[]);
        // mov cr0, eax (0F 22 C0) with PG and no PE: #GP(0).
        c.s.gpr[reg::RAX] = CR0_PG | CR0_ET;
        assert_eq!(exec(&mut c, &[0x0f, 0x22, 0xc0]), Err(Exception::gp(0)));
        // NW without CD: #GP(0).
        c.s.gpr[reg::RAX] = CR0_PE | CR0_NW;
        assert_eq!(exec(&mut c, &[0x0f, 0x22, 0xc0]), Err(Exception::gp(0)));
        // mov cr4, eax (0F 22 E0): bit 13 (VMXE, no VMX here) is reserved.
        c.s.gpr[reg::RAX] = 1 << 13;
        assert_eq!(exec(&mut c, &[0x0f, 0x22, 0xe0]), Err(Exception::gp(0)));
        c.s.gpr[reg::RAX] = CR4_PSE | CR4_PGE;
        assert_eq!(exec(&mut c, &[0x0f, 0x22, 0xe0]), Ok(()));
        assert_eq!(c.s.cr4, CR4_PSE | CR4_PGE);
        // mov eax, cr1 (0F 20 C8): #UD.
        assert_eq!(exec(&mut c, &[0x0f, 0x20, 0xc8]), Err(Exception::ud()));
        // CPL 3: #GP(0).
        c.s.cpl = 3;
        assert_eq!(exec(&mut c, &[0x0f, 0x20, 0xc0]), Err(Exception::gp(0)));
    }

    #[test]
    fn pae_paging_needs_valid_pdptes() {
        let mut c = pm_cpu(&[]);
        // PDPT at 0x5000: entry 0 present with reserved bit 1 set.
        c.mmu.phys.write(0x5000, &0x0000_6003u64.to_le_bytes());
        c.s.cr3 = 0x5000;
        c.s.cr4 = CR4_PAE;
        c.sync_paging();
        c.s.gpr[reg::RAX] = c.s.cr0 | CR0_PG;
        assert_eq!(exec(&mut c, &[0x0f, 0x22, 0xc0]), Err(Exception::gp(0)));
        assert_eq!(c.s.cr0 & CR0_PG, 0, "CR0 unchanged");
        assert_eq!(c.mmu.paging_regs().cr0 & CR0_PG, 0);
    }

    #[test]
    fn debug_register_rules() {
        let mut c = pm_cpu(&[]);
        // mov dr7, eax (0F 23 F8): reserved bits forced.
        c.s.gpr[reg::RAX] = DR7_GD | 0xffff_0000;
        assert_eq!(exec(&mut c, &[0x0f, 0x23, 0xf8]), Ok(()));
        assert_eq!(c.s.dr[7], 0xffff_0000 | DR7_GD | DR7_ONE);
        // GD set: the next DR access raises #DB with DR6.BD and clears GD.
        assert_eq!(
            exec(&mut c, &[0x0f, 0x21, 0xc0]),
            Err(Exception::new(vec::DB))
        );
        assert_ne!(c.s.dr[6] & DR6_BD, 0);
        assert_eq!(c.s.dr[7] & DR7_GD, 0);
        // DR4 aliases DR6 unless CR4.DE; with DE it is #UD.
        assert_eq!(exec(&mut c, &[0x0f, 0x21, 0xe0]), Ok(()));
        assert_eq!(c.s.gpr[reg::RAX], c.s.dr[6]);
        c.s.cr4 |= CR4_DE;
        assert_eq!(exec(&mut c, &[0x0f, 0x21, 0xe0]), Err(Exception::ud()));
    }

    #[test]
    fn descriptor_table_instructions() {
        let mut c = pm_cpu(&[]);
        // o16 lgdt [0x9000]: 24-bit base.
        c.mmu
            .phys
            .write(0x9000, &[0xff, 0x00, 0x00, 0x20, 0x01, 0xaa]);
        assert_eq!(
            exec(&mut c, &[0x66, 0x0f, 0x01, 0x15, 0, 0x90, 0, 0]),
            Ok(())
        );
        assert_eq!(c.s.gdtr.base, 0x01_2000);
        assert_eq!(c.s.gdtr.limit, 0xff);
        // sgdt [0x9100] (32-bit): limit and the full base.
        c.s.gdtr.base = 0xaa01_2000;
        assert_eq!(exec(&mut c, &[0x0f, 0x01, 0x05, 0, 0x91, 0, 0]), Ok(()));
        let mut b = [0u8; 6];
        c.mmu.phys.read(0x9100, &mut b);
        assert_eq!(b, [0xff, 0, 0x00, 0x20, 0x01, 0xaa]);
        // LTR of an available TSS marks it busy; loading it again is #GP(sel).
        let mut c = pm_cpu(&[(TSS, Descriptor::segment(TSS_BASE as u32, 0x67, 0x89, 0))]);
        c.s.gpr[reg::RAX] = TSS as u64;
        assert_eq!(exec(&mut c, &[0x0f, 0x00, 0xd8]), Ok(())); // ltr ax
        assert_eq!(c.s.tr.selector, TSS);
        assert_eq!(
            exec(&mut c, &[0x0f, 0x00, 0xd8]),
            Err(Exception::gp(TSS as u32))
        );
        // LAR/LSL of the TSS: type 0xB, limit 0x67; of a null selector: ZF = 0.
        c.s.gpr[reg::RCX] = TSS as u64;
        assert_eq!(exec(&mut c, &[0x0f, 0x02, 0xc1]), Ok(())); // lar eax, ecx
        assert!(c.s.get_zf());
        assert_eq!(c.s.gpr[reg::RAX], 0x8b00);
        assert_eq!(exec(&mut c, &[0x0f, 0x03, 0xc1]), Ok(())); // lsl eax, ecx
        assert_eq!(c.s.gpr[reg::RAX], 0x67);
        c.s.gpr[reg::RCX] = 0;
        assert_eq!(exec(&mut c, &[0x0f, 0x03, 0xc1]), Ok(()));
        assert!(!c.s.get_zf());
        // VERW of the read-only CS: ZF = 0; of DS: ZF = 1.
        c.s.gpr[reg::RCX] = CODE0 as u64;
        assert_eq!(exec(&mut c, &[0x0f, 0x00, 0xe9]), Ok(())); // verw cx
        assert!(!c.s.get_zf());
        c.s.gpr[reg::RCX] = DATA0 as u64;
        assert_eq!(exec(&mut c, &[0x0f, 0x00, 0xe9]), Ok(()));
        assert!(c.s.get_zf());
        // ARPL in real mode: #UD.
        c.s.cr0 &= !CR0_PE;
        assert_eq!(exec(&mut c, &[0x63, 0xc8]), Err(Exception::ud()));
    }

    #[test]
    fn sysenter_sysexit() {
        let mut c = pm_cpu(&[]);
        assert_eq!(
            exec(&mut c, &[0x0f, 0x34]),
            Err(Exception::gp(0)),
            "CS MSR null"
        );
        c.s.msr.sysenter_cs = 0x60;
        c.s.msr.sysenter_esp = 0x7000;
        c.s.msr.sysenter_eip = 0x2_0000;
        c.s.cpl = 3;
        c.s.set_eflags(FLAG_1 | IF);
        assert_eq!(exec(&mut c, &[0x0f, 0x34]), Ok(()));
        assert_eq!(c.s.cpl, 0);
        assert_eq!(c.s.seg[SegReg::Cs as usize].selector, 0x60);
        assert_eq!(c.s.seg[SegReg::Ss as usize].selector, 0x68);
        assert_eq!((c.s.rip, c.s.gpr[reg::RSP]), (0x2_0000, 0x7000));
        assert_eq!(c.s.eflags() & IF, 0);
        c.s.gpr[reg::RCX] = 0x5000;
        c.s.gpr[reg::RDX] = 0x3_0000;
        assert_eq!(exec(&mut c, &[0x0f, 0x35]), Ok(()));
        assert_eq!(c.s.cpl, 3);
        assert_eq!(c.s.seg[SegReg::Cs as usize].selector, 0x73);
        assert_eq!(c.s.seg[SegReg::Ss as usize].selector, 0x7b);
        assert_eq!((c.s.rip, c.s.gpr[reg::RSP]), (0x3_0000, 0x5000));
        assert_eq!(exec(&mut c, &[0x0f, 0x35]), Err(Exception::gp(0)), "CPL 3");
    }

    #[test]
    fn host_clock_tsc_follows_wall_time_and_wrmsr() {
        let mut c = pm_cpu(&[]);
        c.tsc_source = crate::TscSource::host_clock();
        let read = |c: &mut Cpu| {
            assert_eq!(exec(c, &[0x0f, 0x31]), Ok(()));
            (c.s.gpr[reg::RDX] << 32) | (c.s.gpr[reg::RAX] & 0xffff_ffff)
        };
        let t0 = read(&mut c);
        std::thread::sleep(std::time::Duration::from_millis(20));
        let t1 = read(&mut c);
        // 1 GHz nominal: 20 ms of host time is at least 20 M ticks, however few
        // instructions ran in between.
        assert!(t1 - t0 >= 20_000_000, "{t0} -> {t1}");
        assert!(t1 - t0 < 5_000_000_000, "{t0} -> {t1}");
        assert_eq!(c.write_msr(MSR_TSC, 1 << 40), Ok(()));
        let t2 = read(&mut c);
        assert!(
            (1u64 << 40..(1 << 40) + 5_000_000_000).contains(&t2),
            "{t2}"
        );
        c.reset();
        assert!(c.tsc() < 5_000_000_000, "RESET clears the TSC");
    }

    #[test]
    fn rdtsc_and_rdpmc() {
        let mut c = pm_cpu(&[]);
        c.tsc_offset = 0x1_0000_0005;
        assert_eq!(exec(&mut c, &[0x0f, 0x31]), Ok(()));
        assert_eq!((c.s.gpr[reg::RDX], c.s.gpr[reg::RAX]), (1, 5));
        c.s.cpl = 3;
        c.s.cr4 |= CR4_TSD;
        assert_eq!(exec(&mut c, &[0x0f, 0x31]), Err(Exception::gp(0)));
        assert_eq!(exec(&mut c, &[0x0f, 0x33]), Err(Exception::gp(0)));
        c.s.cr4 |= CR4_PCE;
        c.s.gpr[reg::RCX] = 0;
        assert_eq!(exec(&mut c, &[0x0f, 0x33]), Ok(()));
        c.s.gpr[reg::RCX] = 2;
        assert_eq!(exec(&mut c, &[0x0f, 0x33]), Err(Exception::gp(0)));
    }
}
