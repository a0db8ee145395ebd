//! Instruction group: control — segment register loads (MOV Sreg, POP Sreg, LDS and
//! friends), far JMP/CALL/RET, INT n / INT3 / INTO / INT1 and IRET, in real, V86 and
//! protected mode (Intel SDM vol. 2 pseudocode; vol. 3 chapters 5 and 7).

use crate::descriptor::*;
use crate::exception::{Exception, Res};
use crate::interrupts::IntKind;
use crate::state::*;
use crate::tasks::TaskSource;
use crate::Cpu;
use iced_x86::{Code, Instruction, Mnemonic, OpKind};

/// EFLAGS bits IRET loads in real mode (SDM IRET pseudocode: `tempEFLAGS AND 257FD5H`).
const IRET_REAL_MASK: u32 = 0x0025_7fd5;

impl Cpu {
    /// Executes the instruction if it belongs to this group.
    #[inline(never)]
    pub(crate) fn exec_control(&mut self, i: &Instruction) -> Option<Res<()>> {
        Some(match i.code() {
            Code::Mov_Sreg_rm16 | Code::Mov_Sreg_r32m16 => self.mov_sreg(i),
            Code::Popw_ES
            | Code::Popd_ES
            | Code::Popw_SS
            | Code::Popd_SS
            | Code::Popw_DS
            | Code::Popd_DS
            | Code::Popw_FS
            | Code::Popd_FS
            | Code::Popw_GS
            | Code::Popd_GS => self.pop_sreg(i),
            Code::Les_r16_m1616
            | Code::Les_r32_m1632
            | Code::Lds_r16_m1616
            | Code::Lds_r32_m1632
            | Code::Lss_r16_m1616
            | Code::Lss_r32_m1632
            | Code::Lfs_r16_m1616
            | Code::Lfs_r32_m1632
            | Code::Lgs_r16_m1616
            | Code::Lgs_r32_m1632 => self.load_far_ptr(i),
            Code::Call_ptr1616 | Code::Call_ptr1632 | Code::Jmp_ptr1616 | Code::Jmp_ptr1632 => {
                let osize = if matches!(i.code(), Code::Call_ptr1616 | Code::Jmp_ptr1616) {
                    2
                } else {
                    4
                };
                let off = if i.op0_kind() == OpKind::FarBranch16 {
                    i.far_branch16() as u32
                } else {
                    i.far_branch32()
                };
                let call = i.mnemonic() == Mnemonic::Call;
                self.far_jmp_call(i.far_branch_selector(), off, osize, call)
            }
            Code::Call_m1616 | Code::Call_m1632 | Code::Jmp_m1616 | Code::Jmp_m1632 => {
                let osize = if matches!(i.code(), Code::Call_m1616 | Code::Jmp_m1616) {
                    2
                } else {
                    4
                };
                match self.read_far_ptr(i, osize) {
                    Ok((off, sel)) => {
                        self.far_jmp_call(sel, off, osize, i.mnemonic() == Mnemonic::Call)
                    }
                    Err(e) => Err(e),
                }
            }
            Code::Retfw | Code::Retfd => {
                self.far_ret(if i.code() == Code::Retfw { 2 } else { 4 }, 0)
            }
            Code::Retfw_imm16 | Code::Retfd_imm16 => self.far_ret(
                if i.code() == Code::Retfw_imm16 { 2 } else { 4 },
                i.immediate16() as u32,
            ),
            Code::Int_imm8 => self.soft_int(i.immediate8(), IntKind::Software),
            Code::Int3 => self.soft_int(3, IntKind::SoftException),
            Code::Into => {
                if self.s.get_of() {
                    self.soft_int(4, IntKind::SoftException)
                } else {
                    Ok(())
                }
            }
            Code::Int1 => self.soft_int(1, IntKind::Icebp),
            Code::Iretw => self.iret(2),
            Code::Iretd => self.iret(4),
            _ => return None,
        })
    }

    /// Reads an m16:16 / m16:32 far pointer: (offset, selector).
    fn read_far_ptr(&mut self, i: &Instruction, osize: u32) -> Res<(u32, u16)> {
        let seg = self.mem_seg(i);
        let ea = self.ea(i);
        let off = self.read_mem(seg, ea, osize)? as u32;
        let ea2 = if self.addr_size(i) == 2 {
            (ea + osize) & 0xffff
        } else {
            ea.wrapping_add(osize)
        };
        let sel = self.read_mem(seg, ea2, 2)? as u16;
        Ok((off, sel))
    }

    /// MOV Sreg, r/m16. Loading SS inhibits interrupts and traps for one instruction.
    fn mov_sreg(&mut self, i: &Instruction) -> Res<()> {
        let sr = super::operands::sreg_of(i.op0_register());
        if sr == SegReg::Cs {
            return Err(Exception::ud());
        }
        let v = match i.op1_kind() {
            OpKind::Memory => {
                let seg = self.mem_seg(i);
                let ea = self.ea(i);
                self.read_mem(seg, ea, 2)? as u16
            }
            _ => self.reg_read(i.op1_register()) as u16,
        };
        self.load_seg(sr, v)?;
        if sr == SegReg::Ss {
            self.inhibit_after_ss();
        }
        Ok(())
    }

    /// POP Sreg (the stack pointer moves by the operand size of the old stack).
    fn pop_sreg(&mut self, i: &Instruction) -> Res<()> {
        let sr = super::operands::sreg_of(i.op0_register());
        let osize = match i.code() {
            Code::Popw_ES | Code::Popw_SS | Code::Popw_DS | Code::Popw_FS | Code::Popw_GS => 2,
            _ => 4,
        };
        let mut st = self.cur_stack();
        let v = self.stk_pop(&mut st, osize)? as u16;
        self.load_seg(sr, v)?;
        self.commit_sp(&st);
        if sr == SegReg::Ss {
            self.inhibit_after_ss();
        }
        Ok(())
    }

    /// LDS, LES, LFS, LGS, LSS r, m16:16/m16:32.
    fn load_far_ptr(&mut self, i: &Instruction) -> Res<()> {
        if i.op1_kind() != OpKind::Memory {
            return Err(Exception::ud());
        }
        let osize = i.op0_register().size() as u32;
        let (off, sel) = self.read_far_ptr(i, osize)?;
        let sr = match i.mnemonic() {
            Mnemonic::Les => SegReg::Es,
            Mnemonic::Lds => SegReg::Ds,
            Mnemonic::Lss => SegReg::Ss,
            Mnemonic::Lfs => SegReg::Fs,
            _ => SegReg::Gs,
        };
        self.load_seg(sr, sel)?;
        self.reg_write(i.op0_register(), off as u64);
        Ok(())
    }

    /// MOV SS / POP SS: no interrupt, NMI or single-step trap before the next
    /// instruction completes (SDM vol. 3, 6.8.3).
    fn inhibit_after_ss(&mut self) {
        self.s.inhibit_irq = true;
        self.ev.inhibit_trap = true;
    }

    /// Far JMP or CALL to `sel:off` with operand size `osize` (2 or 4).
    pub(crate) fn far_jmp_call(&mut self, sel: u16, off: u32, osize: u32, call: bool) -> Res<()> {
        let off = if osize == 2 { off & 0xffff } else { off };
        if !self.s.protected() || self.s.v86() {
            let mut st = self.cur_stack();
            if call {
                let cs = self.s.seg[SegReg::Cs as usize].selector;
                self.stk_push(&mut st, osize, cs as u64)?;
                self.stk_push(&mut st, osize, self.s.rip & 0xffff_ffff)?;
            }
            // The new CS keeps the current limit in real mode (64 KiB in V86).
            if off > self.s.seg[SegReg::Cs as usize].limit {
                return Err(Exception::gp(0));
            }
            self.commit_sp(&st);
            self.load_cs_realish(sel);
            self.s.rip = off as u64;
            return Ok(());
        }
        if sel & !3 == 0 {
            return Err(Exception::gp(0));
        }
        let code = sel as u32 & 0xfffc;
        let (addr, d) = self.read_desc(sel, Exception::gp)?;
        let cpl = self.s.cpl;
        let rpl = (sel & 3) as u8;
        if d.is_code() {
            if d.conforming() {
                if d.dpl() > cpl {
                    return Err(Exception::gp(code));
                }
            } else if rpl > cpl || d.dpl() != cpl {
                return Err(Exception::gp(code));
            }
            if !d.present() {
                return Err(Exception::np(code));
            }
            return self.far_same_priv(sel, addr, &d, off, osize, call);
        }
        match d.sys_type() {
            Some(SYS_CALL16 | SYS_CALL32) => {
                if d.dpl() < cpl || d.dpl() < rpl {
                    return Err(Exception::gp(code));
                }
                if !d.present() {
                    return Err(Exception::np(code));
                }
                self.through_call_gate(&d, call)
            }
            Some(SYS_TASK) => {
                if d.dpl() < cpl || d.dpl() < rpl {
                    return Err(Exception::gp(code));
                }
                if !d.present() {
                    return Err(Exception::np(code));
                }
                let tsel = d.gate_selector();
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
                let src = if call {
                    TaskSource::Call
                } else {
                    TaskSource::Jmp
                };
                self.task_switch(tsel, taddr, td, src, None)
            }
            Some(SYS_TSS16_AVAIL | SYS_TSS32_AVAIL) => {
                if d.dpl() < cpl || d.dpl() < rpl {
                    return Err(Exception::gp(code));
                }
                if !d.present() {
                    return Err(Exception::np(code));
                }
                let src = if call {
                    TaskSource::Call
                } else {
                    TaskSource::Jmp
                };
                self.task_switch(sel, addr, d, src, None)
            }
            _ => Err(Exception::gp(code)),
        }
    }

    /// Same-privilege far JMP/CALL to a checked code segment.
    fn far_same_priv(
        &mut self,
        sel: u16,
        addr: u64,
        d: &Descriptor,
        off: u32,
        psize: u32,
        call: bool,
    ) -> Res<()> {
        let mut st = self.cur_stack();
        if call {
            let cs = self.s.seg[SegReg::Cs as usize].selector;
            self.stk_push(&mut st, psize, cs as u64)?;
            self.stk_push(&mut st, psize, self.s.rip & 0xffff_ffff)?;
        }
        if off > d.limit() {
            return Err(Exception::gp(0));
        }
        let cpl = self.s.cpl;
        self.commit_cs(sel, addr, d, cpl)?;
        self.commit_sp(&st);
        self.s.rip = off as u64;
        Ok(())
    }

    /// Far JMP/CALL through a (checked, present) call gate.
    fn through_call_gate(&mut self, gate: &Descriptor, call: bool) -> Res<()> {
        let cpl = self.s.cpl;
        let csel = gate.gate_selector();
        if csel & !3 == 0 {
            return Err(Exception::gp(0));
        }
        let ccode = csel as u32 & 0xfffc;
        let (caddr, cd) = self.read_desc(csel, Exception::gp)?;
        if !cd.is_code() || cd.dpl() > cpl {
            return Err(Exception::gp(ccode));
        }
        if !call && !cd.conforming() && cd.dpl() != cpl {
            return Err(Exception::gp(ccode));
        }
        if !cd.present() {
            return Err(Exception::np(ccode));
        }
        let psize = if gate.sys32() { 4 } else { 2 };
        let off = gate.gate_offset();
        if !call || cd.conforming() || cd.dpl() == cpl {
            return self.far_same_priv(csel, caddr, &cd, off, psize, call);
        }
        // CALL to a more privileged non-conforming segment: switch to the inner stack
        // from the TSS (SDM vol. 3, 5.8.5).
        let ndpl = cd.dpl();
        let (nss, nesp) = self.tss_stack(ndpl)?;
        let (ssaddr, ssd) = self.check_ss(nss, ndpl, Exception::ts, 0)?;
        let mut nst = crate::segmentation::Stk {
            seg: ssd.to_segment(nss),
            sp: nesp,
            big: ssd.big(),
            user: false,
            err: Exception::ss(nss as u32 & 0xfffc),
        };
        let old = self.cur_stack();
        let old_ss = self.s.seg[SegReg::Ss as usize].selector;
        self.stk_push(&mut nst, psize, old_ss as u64)?;
        self.stk_push(&mut nst, psize, old.sp as u64)?;
        let n = gate.gate_params();
        for k in (0..n).rev() {
            let mut src = old;
            src.sp = src.moved_by(k * psize);
            let v = self.stk_pop(&mut src, psize)?;
            self.stk_push(&mut nst, psize, v)?;
        }
        let cs = self.s.seg[SegReg::Cs as usize].selector;
        self.stk_push(&mut nst, psize, cs as u64)?;
        self.stk_push(&mut nst, psize, self.s.rip & 0xffff_ffff)?;
        if off > cd.limit() {
            return Err(Exception::gp(0));
        }
        self.mark_accessed(ssaddr, &ssd)?;
        self.commit_cs(csel, caddr, &cd, ndpl)?;
        self.commit_seg(SegReg::Ss, nss, ssaddr, &ssd)?;
        self.s.set_r32(reg::RSP, nst.sp);
        self.s.rip = off as u64;
        Ok(())
    }

    /// Far RET (RETF, RETF imm16): same privilege or to an outer level.
    fn far_ret(&mut self, osize: u32, imm: u32) -> Res<()> {
        let mut st = self.cur_stack();
        let eip = self.stk_pop(&mut st, osize)? as u32;
        let sel = self.stk_pop(&mut st, osize)? as u16;
        let eip = if osize == 2 { eip & 0xffff } else { eip };
        if !self.s.protected() || self.s.v86() {
            if eip > self.s.seg[SegReg::Cs as usize].limit {
                return Err(Exception::gp(0));
            }
            st.sp = st.moved_by(imm);
            self.commit_sp(&st);
            self.load_cs_realish(sel);
            self.s.rip = eip as u64;
            return Ok(());
        }
        let (addr, d, rpl) = self.check_return_cs(sel)?;
        st.sp = st.moved_by(imm);
        if rpl == self.s.cpl {
            if eip > d.limit() {
                return Err(Exception::gp(0));
            }
            self.commit_cs(sel, addr, &d, rpl)?;
            self.commit_sp(&st);
            self.s.rip = eip as u64;
            return Ok(());
        }
        // Return to an outer privilege level: the caller's SS:ESP follow.
        let nesp = self.stk_pop(&mut st, osize)? as u32;
        let nss = self.stk_pop(&mut st, osize)? as u16;
        let (ssaddr, ssd) = self.check_ss(nss, rpl, Exception::gp, 0)?;
        if eip > d.limit() {
            return Err(Exception::gp(0));
        }
        self.mark_accessed(ssaddr, &ssd)?;
        self.commit_cs(sel, addr, &d, rpl)?;
        self.commit_seg(SegReg::Ss, nss, ssaddr, &ssd)?;
        let mut nst = self.cur_stack();
        nst.sp = if osize == 2 {
            (self.s.gpr[reg::RSP] as u32 & 0xffff_0000) | (nesp & 0xffff)
        } else {
            nesp
        };
        nst.sp = nst.moved_by(imm);
        self.commit_sp(&nst);
        self.s.rip = eip as u64;
        self.null_outer_segments();
        Ok(())
    }

    /// The checks RET and IRET apply to the return CS: not null, RPL >= CPL, code,
    /// conforming DPL <= RPL or non-conforming DPL = RPL, present.
    fn check_return_cs(&mut self, sel: u16) -> Res<(u64, Descriptor, u8)> {
        if sel & !3 == 0 {
            return Err(Exception::gp(0));
        }
        let code = sel as u32 & 0xfffc;
        let rpl = (sel & 3) as u8;
        if rpl < self.s.cpl {
            return Err(Exception::gp(code));
        }
        let (addr, d) = self.read_desc(sel, Exception::gp)?;
        if !d.is_code() {
            return Err(Exception::gp(code));
        }
        if d.conforming() {
            if d.dpl() > rpl {
                return Err(Exception::gp(code));
            }
        } else if d.dpl() != rpl {
            return Err(Exception::gp(code));
        }
        if !d.present() {
            return Err(Exception::np(code));
        }
        Ok((addr, d, rpl))
    }

    /// INT n, INT3, INTO, INT1: software interrupts (V86: INT n is IOPL-sensitive).
    fn soft_int(&mut self, vector: u8, kind: IntKind) -> Res<()> {
        if self.s.v86() && kind == IntKind::Software {
            if self.s.cr4 & CR4_VME != 0 && !self.int_redirection_bit(vector)? {
                self.v86_redirect_int(vector)?;
                self.ev.suppress_trap = true;
                return Ok(());
            }
            if self.s.iopl() < 3 {
                return Err(Exception::gp(0));
            }
        }
        self.deliver(vector, kind, None)?;
        // The handler starts with TF clear: no single-step trap after INT.
        self.ev.suppress_trap = true;
        Ok(())
    }

    /// Loads EFLAGS from a popped image as IRET does in protected mode, for a return
    /// from privilege level `cpl` (SDM IRET pseudocode).
    fn iret_flags(&mut self, v: u32, osize: u32, cpl: u8) {
        let old = self.s.eflags();
        let mut m = CF | PF | AF | ZF | SF | TF | DF | OF | NT;
        if osize == 4 {
            m |= RF | AC | ID;
        }
        if cpl <= self.s.iopl() {
            m |= IF;
        }
        if cpl == 0 {
            m |= IOPL;
            if osize == 4 {
                m |= VIF | VIP;
            }
        }
        self.s.set_eflags((old & !m) | (v & m));
    }

    /// IRET / IRETD.
    fn iret(&mut self, osize: u32) -> Res<()> {
        self.ev.flags_loaded = true;
        if self.s.real() {
            return self.iret_real(osize, false);
        }
        if self.s.v86() {
            if self.s.iopl() < 3 {
                if osize == 2 && self.s.cr4 & CR4_VME != 0 {
                    return self.vme_iret();
                }
                return Err(Exception::gp(0));
            }
            return self.iret_real(osize, true);
        }
        if self.s.eflags_raw & NT != 0 {
            // Return from a nested task through the back link.
            let link = self.read_sys(self.s.tr.base, 2)? as u16;
            let lcode = link as u32 & 0xfffc;
            if link & 4 != 0 {
                return Err(Exception::ts(lcode));
            }
            let (laddr, ld) = self.read_desc(link, Exception::ts)?;
            if !ld.tss_busy() {
                return Err(Exception::ts(lcode));
            }
            if !ld.present() {
                return Err(Exception::np(lcode));
            }
            self.task_switch(link, laddr, ld, TaskSource::Iret, None)?;
            self.s.nmi_blocked = false;
            return Ok(());
        }
        let mut st = self.cur_stack();
        let eip = self.stk_pop(&mut st, osize)? as u32;
        let sel = self.stk_pop(&mut st, osize)? as u16;
        let fl = self.stk_pop(&mut st, osize)? as u32;
        let cpl = self.s.cpl;
        if osize == 4 && fl & VM != 0 && cpl == 0 {
            // Return to virtual-8086 mode (SDM vol. 3, 20.3.3).
            let mut vals = [0u16; 5];
            let esp = self.stk_pop(&mut st, 4)? as u32;
            for v in vals.iter_mut() {
                *v = self.stk_pop(&mut st, 4)? as u16;
            }
            let [ss, es, ds, fs, gs] = vals;
            self.s.set_eflags(fl);
            let mut cs = Segment::v86(sel);
            cs.attrs |= ATTR_CODE;
            self.s.seg[SegReg::Cs as usize] = cs;
            self.s.seg[SegReg::Ss as usize] = Segment::v86(ss);
            self.s.seg[SegReg::Es as usize] = Segment::v86(es);
            self.s.seg[SegReg::Ds as usize] = Segment::v86(ds);
            self.s.seg[SegReg::Fs as usize] = Segment::v86(fs);
            self.s.seg[SegReg::Gs as usize] = Segment::v86(gs);
            self.s.set_r32(reg::RSP, esp);
            self.s.rip = (eip & 0xffff) as u64;
            self.s.cpl = 3;
            self.s.nmi_blocked = false;
            return Ok(());
        }
        let eip = if osize == 2 { eip & 0xffff } else { eip };
        let (addr, d, rpl) = self.check_return_cs(sel)?;
        if rpl == cpl {
            if eip > d.limit() {
                return Err(Exception::gp(0));
            }
            self.commit_cs(sel, addr, &d, rpl)?;
            self.commit_sp(&st);
            self.s.rip = eip as u64;
            self.iret_flags(fl, osize, cpl);
            self.s.nmi_blocked = false;
            return Ok(());
        }
        let nesp = self.stk_pop(&mut st, osize)? as u32;
        let nss = self.stk_pop(&mut st, osize)? as u16;
        let (ssaddr, ssd) = self.check_ss(nss, rpl, Exception::gp, 0)?;
        if eip > d.limit() {
            return Err(Exception::gp(0));
        }
        self.mark_accessed(ssaddr, &ssd)?;
        self.commit_cs(sel, addr, &d, rpl)?;
        self.commit_seg(SegReg::Ss, nss, ssaddr, &ssd)?;
        if osize == 2 {
            self.s.set_r16(reg::RSP, nesp as u16);
        } else {
            self.s.set_r32(reg::RSP, nesp);
        }
        self.s.rip = eip as u64;
        self.iret_flags(fl, osize, cpl);
        self.null_outer_segments();
        self.s.nmi_blocked = false;
        Ok(())
    }

    /// IRET in real mode, or in V86 mode with IOPL 3 (IOPL itself then stays).
    fn iret_real(&mut self, osize: u32, v86: bool) -> Res<()> {
        let mut st = self.cur_stack();
        let eip = self.stk_pop(&mut st, osize)? as u32;
        let sel = self.stk_pop(&mut st, osize)? as u16;
        let fl = self.stk_pop(&mut st, osize)? as u32;
        let eip = if osize == 2 { eip & 0xffff } else { eip };
        if eip > self.s.seg[SegReg::Cs as usize].limit {
            return Err(Exception::gp(0));
        }
        let old = self.s.eflags();
        let mut m = if osize == 4 { IRET_REAL_MASK } else { 0xffff };
        if v86 {
            m &= !IOPL;
        }
        self.commit_sp(&st);
        self.load_cs_realish(sel);
        self.s.rip = eip as u64;
        self.s.set_eflags((old & !m) | (fl & m));
        self.s.nmi_blocked = false;
        Ok(())
    }
}

impl Cpu {
    /// VME: the bit for `vector` in the software interrupt redirection bitmap, the 32
    /// bytes just below the I/O map base of the (32-bit) TSS. Set means "not redirected".
    fn int_redirection_bit(&mut self, vector: u8) -> Res<bool> {
        let tr = self.s.tr;
        let t = (tr.attrs & ATTR_TYPE) as u8;
        if !(t == SYS_TSS32_AVAIL || t == SYS_TSS32_BUSY) || tr.limit < 0x67 {
            return Err(Exception::gp(0));
        }
        let map = self.read_sys(tr.base + 0x66, 2)? as u32;
        let byte = (map + vector as u32 / 8).wrapping_sub(32);
        if map < 32 || byte > tr.limit {
            return Err(Exception::gp(0));
        }
        let b = self.read_sys(tr.base + byte as u64, 1)? as u8;
        Ok(b & (1 << (vector & 7)) != 0)
    }

    /// VME: INT n handled by the V86 task itself through its interrupt vector table at
    /// linear 0, as in real mode; with IOPL < 3 the pushed FLAGS carry VIF as IF and VIF
    /// is cleared instead of IF (SDM vol. 3, 20.3.3.5, method 5).
    fn v86_redirect_int(&mut self, vector: u8) -> Res<()> {
        let ent = self.read_lin(vector as u64 * 4, 4, true)? as u32;
        let iopl3 = self.s.iopl() == 3;
        let flags = if iopl3 {
            self.s.eflags() & 0xffff
        } else {
            self.vme_flags_image()
        };
        let mut st = self.cur_stack();
        let cs = self.s.seg[SegReg::Cs as usize].selector;
        self.stk_push(&mut st, 2, flags as u64)?;
        self.stk_push(&mut st, 2, cs as u64)?;
        self.stk_push(&mut st, 2, self.s.rip & 0xffff)?;
        self.commit_sp(&st);
        let clear = if iopl3 { IF | TF | RF } else { VIF | TF | RF };
        let f = self.s.eflags();
        self.s.set_eflags(f & !clear);
        self.load_cs_realish((ent >> 16) as u16);
        self.s.rip = (ent & 0xffff) as u64;
        Ok(())
    }

    /// VME: 16-bit IRET in V86 mode with IOPL < 3 (FLAGS.IF goes to VIF).
    fn vme_iret(&mut self) -> Res<()> {
        let mut st = self.cur_stack();
        let ip = self.stk_pop(&mut st, 2)? as u32;
        let cs = self.stk_pop(&mut st, 2)? as u16;
        let fl = self.stk_pop(&mut st, 2)? as u32;
        if ip > 0xffff {
            return Err(Exception::gp(0));
        }
        self.vme_load_flags(fl)?;
        self.commit_sp(&st);
        self.load_cs_realish(cs);
        self.s.rip = ip as u64;
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::descriptor::testing::*;
    use crate::descriptor::Descriptor;
    use crate::exception::Exception;
    use crate::state::*;

    const CONF0: u16 = 0x18; // conforming code, DPL 0
    const CODE3: u16 = 0x20;
    const DATA3: u16 = 0x28;
    const NP_CODE: u16 = 0x30;
    const GATE16: u16 = 0x38; // 16-bit call gate, DPL 0, to CODE0:0x2345_6789 (offset 0x6789)

    fn cpu() -> crate::Cpu {
        pm_cpu(&[
            (CONF0, Descriptor::segment(0, 0xfffff, 0x9e, 0xc)),
            (CODE3, Descriptor::segment(0, 0xfffff, 0xfa, 0xc)),
            (DATA3, Descriptor::segment(0, 0xfffff, 0xf2, 0xc)),
            (NP_CODE, Descriptor::segment(0, 0xfffff, 0x1a, 0xc)),
            (GATE16, Descriptor::gate(CODE0, 0x2345_6789, 0x84, 0)),
        ])
    }

    fn ring3(c: &mut crate::Cpu) {
        c.s.cpl = 3;
        c.s.seg[SegReg::Cs as usize] =
            Descriptor::segment(0, 0xfffff, 0xfb, 0xc).to_segment(CODE3 | 3);
        c.s.seg[SegReg::Ss as usize] =
            Descriptor::segment(0, 0xfffff, 0xf3, 0xc).to_segment(DATA3 | 3);
    }

    /// `jmp far sel:off` / `call far sel:off` (ptr16:32).
    fn far(op: u8, sel: u16, off: u32) -> Vec<u8> {
        let mut v = vec![op];
        v.extend_from_slice(&off.to_le_bytes());
        v.extend_from_slice(&sel.to_le_bytes());
        v
    }

    #[test]
    fn conforming_code_keeps_cpl() {
        let mut c = cpu();
        ring3(&mut c);
        assert_eq!(exec(&mut c, &far(0xea, CONF0, 0x4000)), Ok(()));
        assert_eq!(c.s.cpl, 3);
        assert_eq!(
            c.s.seg[SegReg::Cs as usize].selector,
            CONF0 | 3,
            "RPL = CPL"
        );
        assert_eq!(c.s.rip, 0x4000);
    }

    #[test]
    fn far_jump_privilege_and_presence() {
        let mut c = cpu();
        ring3(&mut c);
        // Non-conforming DPL 0 from CPL 3: #GP(sel).
        assert_eq!(exec(&mut c, &far(0xea, CODE0, 0)), Err(Exception::gp(8)));
        let mut c = cpu();
        // RPL 3 > CPL 0 to non-conforming code: #GP(sel).
        assert_eq!(
            exec(&mut c, &far(0xea, CODE0 | 3, 0)),
            Err(Exception::gp(8))
        );
        assert_eq!(
            exec(&mut c, &far(0xea, NP_CODE, 0)),
            Err(Exception::np(0x30))
        );
        assert_eq!(exec(&mut c, &far(0xea, 0, 0)), Err(Exception::gp(0)));
        // A data segment is no jump target.
        assert_eq!(exec(&mut c, &far(0xea, DATA0, 0)), Err(Exception::gp(0x10)));
        assert_eq!(c.s.rip, 0x10000);
        assert_eq!(c.s.seg[SegReg::Cs as usize].selector, CODE0);
    }

    #[test]
    fn sixteen_bit_call_gate_pushes_words() {
        let mut c = cpu();
        assert_eq!(exec(&mut c, &far(0x9a, GATE16, 0)), Ok(()));
        assert_eq!(c.s.rip, 0x6789, "16-bit gate: offset bits 15-0 only");
        assert_eq!(c.s.gpr[reg::RSP], 0x8000 - 4);
        let mut b = [0u8; 4];
        c.mmu.phys.read(0x8000 - 4, &mut b);
        assert_eq!(
            b,
            [0x07, 0x00, CODE0 as u8, 0x00],
            "IP then CS, 16 bits each"
        );
    }

    #[test]
    fn retf_checks() {
        let mut c = cpu();
        ring3(&mut c);
        // Return to CPL 0 from CPL 3 (RPL < CPL): #GP(sel).
        c.mmu
            .phys
            .write(0x8000, &[0, 0x40, 0, 0, CODE0 as u8, 0, 0, 0]);
        assert_eq!(exec(&mut c, &[0xcb]), Err(Exception::gp(8)));
        assert_eq!(c.s.gpr[reg::RSP], 0x8000, "ESP unchanged");
        // Same-privilege RETF with imm16.
        c.mmu
            .phys
            .write(0x8000, &[0, 0x40, 0, 0, CODE3 as u8 | 3, 0, 0, 0]);
        assert_eq!(exec(&mut c, &[0xca, 0x10, 0x00]), Ok(()));
        assert_eq!(c.s.rip, 0x4000);
        assert_eq!(c.s.gpr[reg::RSP], 0x8000 + 8 + 0x10);
    }

    #[test]
    fn iret_same_privilege_flag_rules() {
        let mut c = cpu();
        ring3(&mut c);
        c.s.set_eflags(FLAG_1);
        // IRETD at CPL 3, IOPL 0: IF and IOPL in the image are ignored, CF taken.
        let img = [0x4000u32, (CODE3 | 3) as u32, IF | IOPL | CF | FLAG_1];
        for (k, v) in img.iter().enumerate() {
            c.mmu.phys.write(0x8000 + 4 * k as u64, &v.to_le_bytes());
        }
        assert_eq!(exec(&mut c, &[0xcf]), Ok(()));
        assert_eq!(c.s.eflags() & (IF | IOPL | CF), CF);
        assert_eq!(c.s.rip, 0x4000);
        assert_eq!(c.s.gpr[reg::RSP], 0x800c);
    }
}
