//! Hardware task switches (JMP/CALL to a TSS or task gate, INT through a task gate, IRET
//! with NT set), following Intel SDM vol. 3, section 7.3, in its order:
//!
//! 1. the caller has found the new TSS descriptor and made the privilege, type (busy /
//!    available) and presence checks for its kind of switch;
//! 2. here: the new TSS limit (>= 0x67 for a 32-bit TSS, 0x2B for a 16-bit one), then
//!    every byte of the new TSS is read and both TSSs are probed for writing, so that
//!    nothing changes if a page fault is due;
//! 3. JMP and IRET clear the old TSS's busy bit; IRET clears NT in the saved image;
//! 4. the current state is saved in the old TSS; CALL and INT write the back link and
//!    set NT; all but IRET set the new TSS's busy bit;
//! 5. TR, CR0.TS, CR3 (32-bit TSS, paging on), EFLAGS, general registers and selectors
//!    are loaded: from here on faults belong to the new task;
//! 6. LDTR, CS, SS, DS, ES, FS, GS are checked and their descriptors loaded (#TS, #NP,
//!    #SS with the selector as error code), an error code is pushed for an exception
//!    delivered through a task gate, and EIP is checked against the CS limit.
//!
//! The TSS debug-trap bit (T) is not implemented.

use crate::descriptor::*;
use crate::exception::{Exception, Res};
use crate::state::*;
use crate::Cpu;

/// What started a task switch.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum TaskSource {
    /// Far JMP to a TSS or task gate.
    Jmp,
    /// Far CALL to a TSS or task gate (nests: back link and NT).
    Call,
    /// Interrupt or exception through an IDT task gate (nests).
    Int,
    /// IRET with NT set (returns to the back-linked task).
    Iret,
}

// 32-bit TSS field offsets (SDM vol. 3, figure 7-2).
const T32_CR3: u64 = 0x1c;
const T32_EIP: u64 = 0x20;
const T32_EFLAGS: u64 = 0x24;
const T32_GPR: u64 = 0x28;
const T32_SEG: u64 = 0x48;
const T32_LDT: u64 = 0x60;
// 16-bit TSS field offsets (SDM vol. 3, figure 7-11).
const T16_IP: u64 = 0x0e;
const T16_FLAGS: u64 = 0x10;
const T16_GPR: u64 = 0x12;
const T16_SEG: u64 = 0x22;
const T16_LDT: u64 = 0x2a;

/// The register image of a TSS.
#[derive(Debug, Default, Clone, Copy)]
struct TssImage {
    cr3: u32,
    eip: u32,
    eflags: u32,
    gpr: [u32; 8],
    /// ES, CS, SS, DS, FS, GS.
    seg: [u16; 6],
    ldt: u16,
}

impl Cpu {
    /// Reads the whole register image of the TSS at `base`.
    fn read_tss(&mut self, base: u64, is32: bool) -> Res<TssImage> {
        let mut t = TssImage::default();
        if is32 {
            let mut b = [0u8; 0x68];
            self.read_lin_bytes(base, &mut b, false)?;
            let d = |o: u64| u32::from_le_bytes(b[o as usize..o as usize + 4].try_into().unwrap());
            t.cr3 = d(T32_CR3);
            t.eip = d(T32_EIP);
            t.eflags = d(T32_EFLAGS);
            for (k, g) in t.gpr.iter_mut().enumerate() {
                *g = d(T32_GPR + 4 * k as u64);
            }
            for (k, s) in t.seg.iter_mut().enumerate() {
                *s = d(T32_SEG + 4 * k as u64) as u16;
            }
            t.ldt = d(T32_LDT) as u16;
        } else {
            let mut b = [0u8; 0x2c];
            self.read_lin_bytes(base, &mut b, false)?;
            let w = |o: u64| u16::from_le_bytes([b[o as usize], b[o as usize + 1]]);
            t.eip = w(T16_IP) as u32;
            t.eflags = w(T16_FLAGS) as u32;
            for (k, g) in t.gpr.iter_mut().enumerate() {
                *g = w(T16_GPR + 2 * k as u64) as u32;
            }
            for (k, s) in t.seg.iter_mut().take(4).enumerate() {
                *s = w(T16_SEG + 2 * k as u64);
            }
            t.ldt = w(T16_LDT);
        }
        Ok(t)
    }

    /// Writes the dynamic fields (EIP, EFLAGS, general and segment registers) of the
    /// current state into the TSS at `base`.
    fn save_tss(&mut self, base: u64, is32: bool, eflags: u32) -> Res<()> {
        if is32 {
            let mut b = [0u8; 0x60 - 0x20];
            b[0..4].copy_from_slice(&(self.s.rip as u32).to_le_bytes());
            b[4..8].copy_from_slice(&eflags.to_le_bytes());
            for k in 0..8 {
                b[8 + 4 * k..12 + 4 * k].copy_from_slice(&(self.s.gpr[k] as u32).to_le_bytes());
            }
            for k in 0..6 {
                let o = 0x28 + 4 * k;
                b[o..o + 2].copy_from_slice(&self.s.seg[k].selector.to_le_bytes());
            }
            // Keep the reserved upper halves of the selector slots as they were.
            let mut old = [0u8; 0x60 - 0x20];
            self.read_lin_bytes(base + T32_EIP, &mut old, false)?;
            for k in 0..6 {
                let o = 0x28 + 4 * k + 2;
                b[o..o + 2].copy_from_slice(&old[o..o + 2]);
            }
            self.write_lin_bytes(base + T32_EIP, &b, false)
        } else {
            let mut b = [0u8; 0x2a - 0x0e];
            b[0..2].copy_from_slice(&(self.s.rip as u16).to_le_bytes());
            b[2..4].copy_from_slice(&(eflags as u16).to_le_bytes());
            for k in 0..8 {
                b[4 + 2 * k..6 + 2 * k].copy_from_slice(&(self.s.gpr[k] as u16).to_le_bytes());
            }
            for k in 0..4 {
                let o = 0x14 + 2 * k;
                b[o..o + 2].copy_from_slice(&self.s.seg[k].selector.to_le_bytes());
            }
            self.write_lin_bytes(base + T16_IP, &b, false)
        }
    }

    /// Switches to the task whose (checked) TSS descriptor `d` is at `addr` for
    /// selector `sel`. `code` is the error code of an exception delivered through a
    /// task gate, pushed on the new task's stack.
    pub(crate) fn task_switch(
        &mut self,
        sel: u16,
        addr: u64,
        d: Descriptor,
        src: TaskSource,
        code: Option<u32>,
    ) -> Res<()> {
        let ncode = sel as u32 & 0xfffc;
        let new32 = d.sys32();
        if d.limit() < if new32 { 0x67 } else { 0x2b } {
            return Err(Exception::ts(ncode));
        }
        let nbase = d.base() as u64;
        let img = self.read_tss(nbase, new32)?;
        let otr = self.s.tr;
        let old32 = otr.attrs & 0x8 != 0;
        let (save_off, save_len) = if old32 {
            (T32_EIP, 0x40)
        } else {
            (T16_IP, 0x1c)
        };
        if otr.limit < if old32 { 0x5f } else { 0x29 } {
            return Err(Exception::ts(otr.selector as u32 & 0xfffc));
        }
        let oaddr = self.desc_addr(otr.selector);
        // Probe every write before the first one.
        self.mmu
            .probe_write(otr.base + save_off, save_len, false)
            .map_err(|pf| self.page_fault(pf))?;
        self.mmu
            .probe_write(nbase, 2, false)
            .map_err(|pf| self.page_fault(pf))?;
        self.mmu
            .probe_write(addr + 5, 1, false)
            .map_err(|pf| self.page_fault(pf))?;
        if let Some(oa) = oaddr {
            self.mmu
                .probe_write(oa + 5, 1, false)
                .map_err(|pf| self.page_fault(pf))?;
        }

        let mut fl = self.s.eflags();
        if src == TaskSource::Iret {
            fl &= !NT;
        }
        if matches!(src, TaskSource::Jmp | TaskSource::Iret) {
            if let Some(oa) = oaddr {
                let b = self.read_sys(oa + 5, 1)? as u8;
                self.write_sys(oa + 5, 1, (b & !TSS_BUSY_BIT) as u64)?;
            }
        }
        self.save_tss(otr.base, old32, fl)?;
        let mut nfl = img.eflags;
        if matches!(src, TaskSource::Call | TaskSource::Int) {
            self.write_sys(nbase, 2, otr.selector as u64)?;
            nfl |= NT;
        }
        if src != TaskSource::Iret {
            let b = self.read_sys(addr + 5, 1)? as u8;
            self.write_sys(addr + 5, 1, (b | TSS_BUSY_BIT) as u64)?;
        }

        // Commit: from here the state is the new task's.
        let mut tr = d.to_segment(sel);
        tr.attrs |= TSS_BUSY_BIT as u32;
        self.s.tr = tr;
        self.s.cr0 |= CR0_TS;
        if new32 && self.s.cr0 & CR0_PG != 0 {
            self.s.cr3 = img.cr3 as u64;
        }
        self.sync_paging();
        if new32 {
            self.s.set_eflags(nfl);
            for k in 0..8 {
                self.s.set_r32(k, img.gpr[k]);
            }
            self.s.rip = img.eip as u64;
        } else {
            self.s.set_eflags(nfl & 0xffff);
            for k in 0..8 {
                self.s.set_r16(k, img.gpr[k] as u16);
            }
            self.s.rip = (img.eip & 0xffff) as u64;
        }
        self.start_rip = self.s.rip;
        self.ev.suppress_trap = true;
        for (k, s) in SegReg::ALL.iter().enumerate() {
            self.null_seg(*s, img.seg[k]);
        }
        self.s.ldtr = Segment {
            attrs: ATTR_UNUSABLE,
            selector: img.ldt,
            ..Default::default()
        };
        self.task_load_segments(&img, new32, code)
    }

    /// Step 6 of the switch: descriptor loads and checks in the new task.
    fn task_load_segments(&mut self, img: &TssImage, new32: bool, code: Option<u32>) -> Res<()> {
        // LDT.
        let ldt = img.ldt;
        let lcode = ldt as u32 & 0xfffc;
        if ldt & 4 != 0 {
            return Err(Exception::ts(lcode));
        }
        if ldt & !3 != 0 {
            let (_, ld) = self.read_desc(ldt, Exception::ts)?;
            if ld.sys_type() != Some(SYS_LDT) || !ld.present() {
                return Err(Exception::ts(lcode));
            }
            self.s.ldtr = ld.to_segment(ldt);
        }
        let [es, cs, ss, ds, fs, gs] = img.seg;
        if self.s.eflags_raw & VM != 0 {
            for (s, v) in [
                (SegReg::Es, es),
                (SegReg::Ss, ss),
                (SegReg::Ds, ds),
                (SegReg::Fs, fs),
                (SegReg::Gs, gs),
            ] {
                self.s.seg[s as usize] = Segment::v86(v);
            }
            let mut c = Segment::v86(cs);
            c.attrs |= ATTR_CODE;
            self.s.seg[SegReg::Cs as usize] = c;
            self.s.cpl = 3;
        } else {
            // CS.
            let ccode = cs as u32 & 0xfffc;
            if cs & !3 == 0 {
                return Err(Exception::ts(ccode));
            }
            let (caddr, cd) = self.read_desc(cs, Exception::ts)?;
            let rpl = (cs & 3) as u8;
            if !cd.is_code()
                || (cd.conforming() && cd.dpl() > rpl)
                || (!cd.conforming() && cd.dpl() != rpl)
            {
                return Err(Exception::ts(ccode));
            }
            if !cd.present() {
                return Err(Exception::np(ccode));
            }
            // SS.
            let (saddr, sd) = self.check_ss(ss, rpl, Exception::ts, ss as u32 & 0xfffc)?;
            self.commit_cs(cs, caddr, &cd, rpl)?;
            self.commit_seg(SegReg::Ss, ss, saddr, &sd)?;
            for (s, v) in [
                (SegReg::Es, es),
                (SegReg::Ds, ds),
                (SegReg::Fs, fs),
                (SegReg::Gs, gs),
            ] {
                match self.check_data_seg(v, rpl, Exception::ts)? {
                    None => self.null_seg(s, v),
                    Some((a, dd)) => self.commit_seg(s, v, a, &dd)?,
                }
            }
        }
        if let Some(c) = code {
            let mut st = self.cur_stack();
            let psize = if new32 { 4 } else { 2 };
            self.stk_push(&mut st, psize, c as u64)?;
            self.commit_sp(&st);
        }
        if self.s.rip as u32 > self.s.seg[SegReg::Cs as usize].limit {
            return Err(Exception::gp(0));
        }
        Ok(())
    }
}
