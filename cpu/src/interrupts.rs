//! Delivery of interrupts and exceptions: real mode (IVT), protected mode (IDT gates,
//! privilege changes, task gates) and virtual-8086 mode, and the double/triple fault rules.

use crate::descriptor::*;
use crate::exception::{makes_double_fault, vec, Exception, FaultClass, Res};
use crate::segmentation::Stk;
use crate::state::*;
use crate::tasks::TaskSource;
use crate::{Cpu, StepEvent};

/// Event bookkeeping between instructions that is not architectural register state.
#[derive(Debug, Clone, Copy, Default)]
pub struct EventState {
    /// The last instruction loaded SS (MOV SS / POP SS): no single-step trap after it.
    pub(crate) inhibit_trap: bool,
    /// The last instruction entered a handler (INT n, INT3, INTO, INT1) or switched
    /// tasks: its single-step trap is not taken.
    pub(crate) suppress_trap: bool,
    /// The last instruction loaded EFLAGS from memory (IRET): RF keeps the loaded value.
    pub(crate) flags_loaded: bool,
    /// An NMI is waiting to be delivered (see [`Cpu::nmi`]).
    pub nmi_pending: bool,
}

/// Vectors that are faults (the saved EIP points at the faulting instruction): their
/// EFLAGS image is pushed with RF set (SDM vol. 3, 17.3.1.1).
fn is_fault_vector(v: u8) -> bool {
    matches!(
        v,
        vec::DE
            | vec::BR
            | vec::UD
            | vec::NM
            | vec::TS
            | vec::NP
            | vec::SS
            | vec::GP
            | vec::PF
            | vec::MF
            | vec::AC
            | vec::XM
    )
}

/// Sets the EXT bit (bit 0) in the error code of a fault raised while delivering an
/// event external to the program (SDM vol. 3, 6.13). Page faults have no EXT bit.
fn with_ext(e: Exception, ext: u32) -> Exception {
    match e.error_code() {
        Some(c) if e.vector != vec::PF => Exception::with_code(e.vector, c | ext),
        _ => e,
    }
}

/// What caused an interrupt: this decides privilege checks, the EXT bit of error codes
/// and which EIP is pushed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IntKind {
    /// A fault or trap raised by the CPU (EIP already set to what must be pushed).
    Exception,
    /// INT n: gate DPL checked against CPL; in V86 subject to IOPL.
    Software,
    /// INT3 and INTO: software, gate DPL checked, not IOPL-sensitive in V86.
    SoftException,
    /// INT1 (ICEBP, opcode F1): delivered like an external event, no DPL check.
    Icebp,
    /// A hardware interrupt from the interrupt controller.
    External,
    /// Non-maskable interrupt.
    Nmi,
}

impl Cpu {
    /// Delivers an event and applies the double- and triple-fault rules to any fault
    /// raised while doing so.
    pub(crate) fn deliver_event(
        &mut self,
        vector: u8,
        kind: IntKind,
        code: Option<u32>,
    ) -> StepEvent {
        log::debug!(
            "{kind:?} vector {vector:#04x} code {code:?} at {:04x}:{:08x} cr2={:08x} cpl={}",
            self.s.seg[crate::SegReg::Cs as usize].selector,
            self.s.rip,
            self.s.cr2,
            self.s.cpl
        );
        let mut cur = (vector, kind, code);
        // Delivery is atomic: a failed attempt changed nothing (except after a task
        // switch committed, whose faults belong to the new task).
        for _ in 0..8 {
            match self.deliver(cur.0, cur.1, cur.2) {
                Ok(()) => return StepEvent::Ok,
                Err(e2) => {
                    let first = if cur.1 == IntKind::Exception {
                        Exception::new(cur.0).class()
                    } else {
                        FaultClass::Benign
                    };
                    if first == FaultClass::DoubleFault {
                        log::warn!("triple fault (fault {:?} while delivering #DF)", e2);
                        return StepEvent::TripleFault;
                    }
                    if makes_double_fault(first, e2.class()) {
                        cur = (vec::DF, IntKind::Exception, Some(0));
                    } else {
                        cur = (e2.vector, IntKind::Exception, e2.error_code());
                    }
                }
            }
        }
        log::warn!("event delivery keeps faulting: treated as a triple fault");
        StepEvent::TripleFault
    }

    /// Delivers one interrupt or exception through the IVT or IDT. On `Err` the caller
    /// applies the double-fault rules; state changes made before the error are undone
    /// by the delivery code itself.
    pub fn deliver(&mut self, vector: u8, kind: IntKind, code: Option<u32>) -> Res<()> {
        self.s.halted = false;
        if self.s.real() {
            self.deliver_real(vector)
        } else {
            self.deliver_protected(vector, kind, code)
        }
    }

    /// Real-mode delivery: push FLAGS, CS, IP; clear IF, TF and AC; jump through the IVT.
    fn deliver_real(&mut self, vector: u8) -> Res<()> {
        let off = vector as u32 * 4;
        if off + 3 > self.s.idtr.limit {
            return Err(Exception::gp(vector as u32 * 8 + 2));
        }
        let base = self.s.idtr.base;
        let ip = self.read_sys(base + off as u64, 2)? as u16;
        let cs = self.read_sys(base + off as u64 + 2, 2)? as u16;
        let flags = self.s.eflags();
        let sp = self.s.gpr[reg::RSP];
        let r = (|| {
            self.push(2, flags as u64)?;
            self.push(2, self.s.seg[SegReg::Cs as usize].selector as u64)?;
            self.push(2, self.s.rip & 0xffff)
        })();
        if let Err(e) = r {
            self.s.gpr[reg::RSP] = sp;
            return Err(e);
        }
        self.s.set_eflags(flags & !(IF | TF | AC | RF));
        self.load_cs_real(cs);
        self.s.rip = ip as u64;
        Ok(())
    }

    /// Protected-mode and V86 delivery through the IDT (SDM vol. 3, 6.12 and the INT n
    /// pseudocode of vol. 2). Atomic: on `Err` nothing has changed, except when a task
    /// gate's task switch has committed (its later faults belong to the new task).
    fn deliver_protected(&mut self, vector: u8, kind: IntKind, code: Option<u32>) -> Res<()> {
        let ext = match kind {
            IntKind::Software | IntKind::SoftException => 0,
            _ => 1,
        };
        self.deliver_protected_inner(vector, kind, code)
            .map_err(|e| with_ext(e, ext))
    }

    fn deliver_protected_inner(&mut self, vector: u8, kind: IntKind, code: Option<u32>) -> Res<()> {
        let idt_code = vector as u32 * 8 + 2;
        if vector as u32 * 8 + 7 > self.s.idtr.limit {
            return Err(Exception::gp(idt_code));
        }
        let gd = Descriptor(self.read_sys(self.s.idtr.base + vector as u64 * 8, 8)?);
        let gtype = match gd.sys_type() {
            Some(t @ (SYS_INT16 | SYS_INT32 | SYS_TRAP16 | SYS_TRAP32 | SYS_TASK)) => t,
            _ => return Err(Exception::gp(idt_code)),
        };
        let cpl = self.s.cpl;
        if matches!(kind, IntKind::Software | IntKind::SoftException) && gd.dpl() < cpl {
            return Err(Exception::gp(idt_code));
        }
        if !gd.present() {
            return Err(Exception::np(idt_code));
        }
        if gtype == SYS_TASK {
            let tsel = gd.gate_selector();
            let tcode = tsel as u32 & 0xfffc;
            if tsel & 4 != 0 {
                return Err(Exception::gp(tcode));
            }
            let (taddr, td) = self.read_desc(tsel, Exception::gp)?;
            if !matches!(td.sys_type(), Some(SYS_TSS16_AVAIL | SYS_TSS32_AVAIL)) {
                return Err(Exception::gp(tcode));
            }
            if !td.present() {
                return Err(Exception::np(tcode));
            }
            return self.task_switch(tsel, taddr, td, TaskSource::Int, code);
        }
        let csel = gd.gate_selector();
        if csel & !3 == 0 {
            return Err(Exception::gp(0));
        }
        let ccode = csel as u32 & 0xfffc;
        let (caddr, cd) = self.read_desc(csel, Exception::gp)?;
        if !cd.is_code() || cd.dpl() > cpl {
            return Err(Exception::gp(ccode));
        }
        if !cd.present() {
            return Err(Exception::np(ccode));
        }
        let psize = if gd.sys32() { 4 } else { 2 };
        let off = gd.gate_offset();
        let v86 = self.s.v86();
        let mut fl = self.s.eflags();
        if kind == IntKind::Exception && is_fault_vector(vector) {
            fl |= RF;
        }
        let cs_sel = self.s.seg[SegReg::Cs as usize].selector;
        let eip = self.s.rip as u32;
        let inner = !cd.conforming() && cd.dpl() < cpl;
        if v86 && (!inner || cd.dpl() != 0) {
            return Err(Exception::gp(ccode));
        }
        if inner {
            let ndpl = cd.dpl();
            let (nss, nesp) = self.tss_stack(ndpl)?;
            let (ssaddr, ssd) = self.check_ss(nss, ndpl, Exception::ts, nss as u32 & 0xfffc)?;
            let mut st = Stk {
                seg: ssd.to_segment(nss),
                sp: nesp,
                big: ssd.big(),
                user: false,
                err: Exception::ss(nss as u32 & 0xfffc),
            };
            if v86 {
                for s in [SegReg::Gs, SegReg::Fs, SegReg::Ds, SegReg::Es] {
                    let v = self.s.seg[s as usize].selector;
                    self.stk_push(&mut st, psize, v as u64)?;
                }
            }
            let old_ss = self.s.seg[SegReg::Ss as usize].selector;
            let old_esp = self.s.gpr[reg::RSP] as u32;
            self.stk_push(&mut st, psize, old_ss as u64)?;
            self.stk_push(&mut st, psize, old_esp as u64)?;
            self.stk_push(&mut st, psize, fl as u64)?;
            self.stk_push(&mut st, psize, cs_sel as u64)?;
            self.stk_push(&mut st, psize, eip as u64)?;
            if let Some(c) = code {
                self.stk_push(&mut st, psize, c as u64)?;
            }
            let off = if psize == 2 { off & 0xffff } else { off };
            if off > cd.limit() {
                return Err(Exception::gp(0));
            }
            self.mark_accessed(ssaddr, &ssd)?;
            self.mark_accessed(caddr, &cd)?;
            if v86 {
                for s in [SegReg::Gs, SegReg::Fs, SegReg::Ds, SegReg::Es] {
                    self.null_seg(s, 0);
                }
            }
            self.commit_cs(csel, caddr, &cd, ndpl)?;
            self.commit_seg(SegReg::Ss, nss, ssaddr, &ssd)?;
            self.s.set_r32(reg::RSP, st.sp);
            self.s.rip = off as u64;
        } else if cd.conforming() || cd.dpl() == cpl {
            let mut st = self.cur_stack();
            self.stk_push(&mut st, psize, fl as u64)?;
            self.stk_push(&mut st, psize, cs_sel as u64)?;
            self.stk_push(&mut st, psize, eip as u64)?;
            if let Some(c) = code {
                self.stk_push(&mut st, psize, c as u64)?;
            }
            let off = if psize == 2 { off & 0xffff } else { off };
            if off > cd.limit() {
                return Err(Exception::gp(0));
            }
            self.commit_cs(csel, caddr, &cd, cpl)?;
            self.commit_sp(&st);
            self.s.rip = off as u64;
        } else {
            return Err(Exception::gp(ccode));
        }
        let mut clear = TF | NT | RF | VM;
        if matches!(gtype, SYS_INT16 | SYS_INT32) {
            clear |= IF;
        }
        let f = self.s.eflags();
        self.s.set_eflags(f & !clear);
        Ok(())
    }

    /// The inner stack SS:ESP for privilege level `dpl` from the current TSS
    /// (#TS(TR selector) when the TSS is too short).
    pub(crate) fn tss_stack(&mut self, dpl: u8) -> Res<(u16, u32)> {
        let tr = self.s.tr;
        let tcode = tr.selector as u32 & 0xfffc;
        if tr.attrs & SYS_32BIT as u32 != 0 {
            let off = 4 + 8 * dpl as u32;
            if off + 7 > tr.limit {
                return Err(Exception::ts(tcode));
            }
            let esp = self.read_sys(tr.base + off as u64, 4)? as u32;
            let ss = self.read_sys(tr.base + off as u64 + 4, 2)? as u16;
            Ok((ss, esp))
        } else {
            let off = 2 + 4 * dpl as u32;
            if off + 3 > tr.limit {
                return Err(Exception::ts(tcode));
            }
            let sp = self.read_sys(tr.base + off as u64, 2)? as u32;
            let ss = self.read_sys(tr.base + off as u64 + 2, 2)? as u16;
            Ok((ss, sp))
        }
    }

    /// Instruction breakpoints (SDM vol. 3, 17.2.4): the DR6 B0-B3 bits of the enabled
    /// execute breakpoints (DR7 R/W = 00) whose address is the linear address of the
    /// next instruction, or 0. Data and I/O breakpoints are not implemented.
    pub(crate) fn code_breakpoints(&self) -> u64 {
        let dr7 = self.s.dr[7];
        let lin = self.s.seg[SegReg::Cs as usize]
            .base
            .wrapping_add(self.s.rip & if self.s.code32() { 0xffff_ffff } else { 0xffff })
            & 0xffff_ffff;
        let mut hit = 0;
        for n in 0..4 {
            let enabled = dr7 & (3 << (2 * n)) != 0;
            let rw = (dr7 >> (16 + 4 * n)) & 3;
            if enabled && rw == 0 && self.s.dr[n] & 0xffff_ffff == lin {
                hit |= 1 << n;
            }
        }
        hit
    }

    /// Raises a non-maskable interrupt: it is delivered before the next instruction
    /// unless an NMI handler is running (until its IRET) or MOV SS inhibits events.
    pub fn nmi(&mut self) {
        self.ev.nmi_pending = true;
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::descriptor::testing::*;

    const IDT: u64 = 0x2000;
    const TSS: u16 = 0x18;
    const TSS_BASE: u64 = 0x3000;
    const CODE3: u16 = 0x20;
    const DATA3: u16 = 0x28;
    const TINY_SS0: u16 = 0x30;

    /// Protected mode with an IDT whose gate `v` leads to 0x5000 + 16 * v (ring 0).
    fn cpu() -> Cpu {
        let mut c = pm_cpu(&[
            (TSS, Descriptor::segment(TSS_BASE as u32, 0x67, 0x8b, 0)),
            (CODE3, Descriptor::segment(0, 0xfffff, 0xfb, 0xc)),
            (DATA3, Descriptor::segment(0, 0xfffff, 0xf3, 0xc)),
            (TINY_SS0, Descriptor::segment(0x9000, 0x7, 0x93, 0x4)),
        ]);
        for v in 0..=255u64 {
            let g = Descriptor::gate(CODE0, 0x5000 + 16 * v as u32, 0xee, 0);
            c.mmu.phys.write(IDT + 8 * v, &g.0.to_le_bytes());
        }
        c.s.idtr = TableReg {
            base: IDT,
            limit: 0x7ff,
        };
        c.s.tr = Descriptor::segment(TSS_BASE as u32, 0x67, 0x8b, 0).to_segment(TSS);
        c.mmu.phys.write(TSS_BASE + 4, &0x7000u32.to_le_bytes());
        c.mmu
            .phys
            .write(TSS_BASE + 8, &(DATA0 as u32).to_le_bytes());
        c
    }

    fn rd32(c: &mut Cpu, a: u64) -> u32 {
        let mut b = [0u8; 4];
        c.mmu.phys.read(a, &mut b);
        u32::from_le_bytes(b)
    }

    #[test]
    fn nmi_blocked_until_iret() {
        let mut c = cpu();
        c.mmu.phys.write(0x10000, &[0x90, 0x90]);
        c.mmu.phys.write(0x5020, &[0x90, 0xcf]); // NMI handler: nop; iretd
        c.s.rip = 0x10000;
        c.nmi();
        assert_eq!(c.step(), StepEvent::Ok);
        assert_eq!(c.s.rip, 0x5020, "NMI delivered through vector 2");
        c.nmi();
        assert_eq!(c.step(), StepEvent::Ok);
        assert_eq!(c.s.rip, 0x5021, "second NMI held while the handler runs");
        assert_eq!(c.step(), StepEvent::Ok);
        assert_eq!(c.s.rip, 0x10000, "IRET back");
        assert_eq!(c.step(), StepEvent::Ok);
        assert_eq!(c.s.rip, 0x5020, "pending NMI taken after IRET");
    }

    #[test]
    fn fault_frames_have_rf_and_int_frames_do_not() {
        let mut c = cpu();
        // mov ds, ax with AX = 0x200 (beyond the GDT limit): #GP(0x200).
        c.mmu.phys.write(0x10000, &[0x8e, 0xd8, 0xcd, 0x40]);
        c.s.gpr[reg::RAX] = 0x200;
        c.s.rip = 0x10000;
        assert_eq!(c.step(), StepEvent::Ok);
        assert_eq!(c.s.rip, 0x5000 + 16 * 13);
        let sp = c.s.gpr[reg::RSP];
        assert_eq!(rd32(&mut c, sp), 0x200, "error code");
        assert_eq!(rd32(&mut c, sp + 4), 0x10000);
        assert_ne!(
            rd32(&mut c, sp + 12) & RF,
            0,
            "RF in a fault's EFLAGS image"
        );
        // INT 0x40: a trap-like software interrupt, no RF.
        c.s.rip = 0x10002;
        c.s.set_eflags(FLAG_1);
        assert_eq!(c.step(), StepEvent::Ok);
        assert_eq!(c.s.rip, 0x5000 + 16 * 0x40);
        let sp = c.s.gpr[reg::RSP];
        assert_eq!(rd32(&mut c, sp), 0x10004);
        assert_eq!(rd32(&mut c, sp + 8) & RF, 0);
    }

    #[test]
    fn instruction_breakpoint_and_rf() {
        let mut c = cpu();
        c.mmu.phys.write(0x10000, &[0x90, 0x90, 0x90]);
        // #DB handler: set RF in the pushed EFLAGS (or dword [esp+8], 0x10000), IRETD.
        c.mmu
            .phys
            .write(0x5010, &[0x81, 0x4c, 0x24, 0x08, 0, 0, 1, 0, 0xcf]);
        c.s.dr[0] = 0x10001;
        c.s.dr[7] = 0x401; // L0, R/W0 = 00 (execute)
        c.s.rip = 0x10000;
        assert_eq!(c.step(), StepEvent::Ok);
        assert_eq!(c.s.rip, 0x10001);
        assert_eq!(c.step(), StepEvent::Ok);
        assert_eq!(c.s.rip, 0x5010, "breakpoint fault before the second NOP");
        assert_eq!(c.s.dr[6] & 0xf, 1, "DR6.B0");
        let sp = c.s.gpr[reg::RSP];
        assert_eq!(rd32(&mut c, sp), 0x10001);
        assert_eq!(
            rd32(&mut c, sp + 8) & RF,
            0,
            "no RF for an instruction breakpoint"
        );
        assert_eq!(c.step(), StepEvent::Ok);
        assert_eq!(c.step(), StepEvent::Ok);
        assert_eq!(c.s.rip, 0x10001, "back at the breakpoint with RF set");
        assert_ne!(c.s.eflags() & RF, 0);
        assert_eq!(c.step(), StepEvent::Ok);
        assert_eq!(c.s.rip, 0x10002, "RF let the instruction run once");
        assert_eq!(c.s.eflags() & RF, 0, "and is cleared after it");
    }

    #[test]
    fn sixteen_bit_interrupt_gate_from_ring3() {
        let mut c = cpu();
        let g = Descriptor::gate(CODE0, 0xabcd_1234, 0xe6, 0); // 16-bit interrupt gate, DPL 3
        c.mmu.phys.write(IDT + 8 * 0x41, &g.0.to_le_bytes());
        c.s.cpl = 3;
        c.s.seg[SegReg::Cs as usize] =
            Descriptor::segment(0, 0xfffff, 0xfb, 0xc).to_segment(CODE3 | 3);
        c.s.seg[SegReg::Ss as usize] =
            Descriptor::segment(0, 0xfffff, 0xf3, 0xc).to_segment(DATA3 | 3);
        c.s.gpr[reg::RSP] = 0x8888;
        c.s.rip = 0x4567;
        c.s.set_eflags(FLAG_1 | IF | CF);
        assert_eq!(c.deliver(0x41, IntKind::Software, None), Ok(()));
        assert_eq!(c.s.rip, 0x1234, "offset bits 15-0");
        assert_eq!(c.s.cpl, 0);
        assert_eq!(c.s.gpr[reg::RSP], 0x7000 - 10);
        let mut b = [0u8; 10];
        c.mmu.phys.read(0x7000 - 10, &mut b);
        let w: Vec<u16> = b
            .chunks(2)
            .map(|x| u16::from_le_bytes([x[0], x[1]]))
            .collect();
        // IP, CS, FLAGS, SP, SS (16 bits each).
        assert_eq!(
            w,
            vec![
                0x4567,
                CODE3 | 3,
                (FLAG_1 | IF | CF) as u16,
                0x8888,
                DATA3 | 3
            ]
        );
        assert_eq!(c.s.eflags() & IF, 0);
    }

    #[test]
    fn failed_inner_stack_push_rolls_back() {
        let mut c = cpu();
        // Ring 3 with an 8-byte ring-0 stack (SS0 = TINY_SS0): #SS(SS0) from the push.
        c.mmu
            .phys
            .write(TSS_BASE + 8, &(TINY_SS0 as u32).to_le_bytes());
        c.mmu.phys.write(TSS_BASE + 4, &8u32.to_le_bytes());
        c.s.cpl = 3;
        c.s.seg[SegReg::Cs as usize] =
            Descriptor::segment(0, 0xfffff, 0xfb, 0xc).to_segment(CODE3 | 3);
        c.s.seg[SegReg::Ss as usize] =
            Descriptor::segment(0, 0xfffff, 0xf3, 0xc).to_segment(DATA3 | 3);
        c.s.rip = 0x10002;
        c.s.gpr[reg::RSP] = 0x8000;
        let before = c.s.clone();
        let r = c.deliver(0x40, IntKind::Software, None);
        assert_eq!(r, Err(Exception::ss(TINY_SS0 as u32)));
        assert_eq!(c.s.cpl, 3);
        assert_eq!(c.s.seg, before.seg);
        assert_eq!(c.s.gpr, before.gpr);
        assert_eq!(c.s.eflags(), before.eflags());
        // The same failure for an external event carries EXT.
        let r = c.deliver(0x40, IntKind::External, None);
        assert_eq!(r, Err(Exception::ss(TINY_SS0 as u32 | 1)));
    }

    #[test]
    fn real_mode_delivery_through_ivt() {
        let mut c = Cpu::new(morph86_mmu::Mmu::new(
            morph86_mmu::PhysMem::new(1 << 20).unwrap(),
        ));
        c.load_cs_real(0x1000);
        c.s.rip = 0x0010;
        c.s.gpr[reg::RSP] = 0x100;
        c.s.set_eflags(FLAG_1 | IF | TF | CF);
        c.mmu.phys.write(0x21 * 4, &[0x34, 0x12, 0x00, 0x20]);
        assert_eq!(c.deliver(0x21, IntKind::Software, None), Ok(()));
        assert_eq!(c.s.seg[SegReg::Cs as usize].selector, 0x2000);
        assert_eq!(c.s.rip, 0x1234);
        assert_eq!(c.s.eflags() & (IF | TF | CF), CF);
        let mut b = [0u8; 6];
        c.mmu.phys.read(0xfa, &mut b);
        assert_eq!(b, [0x10, 0x00, 0x00, 0x10, 0x03, 0x03], "IP, CS, FLAGS");
    }
}
