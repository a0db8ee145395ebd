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
//! 7. a 32-bit TSS with its debug-trap bit (T) set raises #DB (DR6.BT) before the new
//!    task's first instruction.

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
const T32_TRAP: u64 = 0x64;
/// DR6.BT: the debug exception came from a TSS T bit.
const DR6_BT: u64 = 1 << 15;
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
    /// Debug trap bit (32-bit TSS offset 0x64, bit 0).
    trap: bool,
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
            t.trap = d(T32_TRAP) & 1 != 0;
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
        let old32 = otr.attrs & SYS_32BIT as u32 != 0;
        let (save_off, save_len) = if old32 {
            (T32_EIP, 0x40)
        } else {
            (T16_IP, 0x1c)
        };
        if otr.limit < if old32 { 0x5f } else { 0x29 } {
            return Err(Exception::ts(otr.selector as u32 & 0xfffc));
        }
        let oaddr = self.desc_addr(otr.selector);
        // A 32-bit TSS loads CR3 when paging is on; with PAE its PDPTEs must be valid.
        let load_cr3 = new32 && self.s.cr0 & CR0_PG != 0;
        if load_cr3 {
            let new = morph86_mmu::PagingRegs {
                cr3: img.cr3 as u64,
                ..self.cur_paging_regs()
            };
            if !self.mmu.pdptes_valid(&new) {
                return Err(Exception::gp(0));
            }
        }
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
        let old_cr0 = self.s.cr0;
        self.s.cr0 |= CR0_TS;
        if load_cr3 {
            self.s.cr3 = img.cr3 as u64;
            self.sync_paging();
        } else if self.s.cr0 != old_cr0 {
            self.sync_paging();
        }
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
        if img.trap {
            // A trap in the new task, reported at its first instruction.
            self.s.dr[6] |= DR6_BT;
            return Err(Exception::new(crate::exception::vec::DB));
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use crate::descriptor::testing::*;
    use crate::descriptor::Descriptor;
    use crate::exception::Exception;
    use crate::state::*;

    const TSS_A: u16 = 0x18;
    const TSS_B16: u16 = 0x20;
    const CODE16: u16 = 0x28;
    const SHORT_TSS: u16 = 0x30;
    const TSS_C: u16 = 0x38;
    const A_BASE: u64 = 0x3000;
    const B_BASE: u64 = 0x3100;
    const C_BASE: u64 = 0x3200;

    fn cpu() -> crate::Cpu {
        let mut c = pm_cpu(&[
            (TSS_A, Descriptor::segment(A_BASE as u32, 0x67, 0x8b, 0)),
            (TSS_B16, Descriptor::segment(B_BASE as u32, 0x2b, 0x81, 0)),
            (CODE16, Descriptor::segment(0, 0xffff, 0x9b, 0)),
            (SHORT_TSS, Descriptor::segment(C_BASE as u32, 0x60, 0x89, 0)),
            (TSS_C, Descriptor::segment(C_BASE as u32, 0x67, 0x89, 0)),
        ]);
        c.s.tr = Descriptor::segment(A_BASE as u32, 0x67, 0x8b, 0).to_segment(TSS_A);
        // 16-bit TSS B (SDM figure 7-11): IP 0x1234, FLAGS 0x0002, AX 0x4141, SP 0x0800,
        // ES CS SS DS.
        let w = |c: &mut crate::Cpu, o: u64, v: u16| c.mmu.phys.write(B_BASE + o, &v.to_le_bytes());
        w(&mut c, 0x0e, 0x1234);
        w(&mut c, 0x10, 0x0002);
        w(&mut c, 0x12, 0x4141);
        w(&mut c, 0x1a, 0x0800);
        w(&mut c, 0x22, DATA0);
        w(&mut c, 0x24, CODE16);
        w(&mut c, 0x26, DATA0);
        w(&mut c, 0x28, DATA0);
        c
    }

    fn access_byte(c: &mut crate::Cpu, sel: u16) -> u8 {
        let mut b = [0u8; 1];
        c.mmu.phys.read(GDT + sel as u64 + 5, &mut b);
        b[0]
    }

    #[test]
    fn jmp_to_16bit_tss() {
        let mut c = cpu();
        c.s.gpr[reg::RAX] = 0xdead_beef;
        // jmp far TSS_B16:0 (EA ptr16:32).
        let r = exec(&mut c, &[0xea, 0, 0, 0, 0, TSS_B16 as u8, 0]);
        assert_eq!(r, Ok(()));
        assert_eq!(c.s.tr.selector, TSS_B16);
        assert_eq!(c.s.rip, 0x1234);
        // 16-bit TSS: only the low halves of the registers are loaded.
        assert_eq!(c.s.gpr[reg::RAX], 0xdead_4141);
        assert_eq!(c.s.gpr[reg::RSP] as u16, 0x0800);
        assert!(!c.s.code32());
        assert_eq!(c.s.seg[SegReg::Cs as usize].selector, CODE16);
        assert_eq!(access_byte(&mut c, TSS_B16), 0x83, "16-bit TSS now busy");
        assert_eq!(access_byte(&mut c, TSS_A), 0x89, "old TSS free");
        let mut b = [0u8; 4];
        c.mmu.phys.read(A_BASE + 0x28, &mut b);
        assert_eq!(
            u32::from_le_bytes(b),
            0xdead_beef,
            "EAX saved in the 32-bit TSS"
        );
        c.mmu.phys.read(A_BASE + 0x20, &mut b);
        assert_eq!(u32::from_le_bytes(b), 0x10007, "EIP after the JMP saved");
    }

    #[test]
    fn short_tss_is_ts_and_changes_nothing() {
        let mut c = cpu();
        let r = exec(&mut c, &[0xea, 0, 0, 0, 0, SHORT_TSS as u8, 0]);
        assert_eq!(r, Err(Exception::ts(SHORT_TSS as u32)));
        assert_eq!(c.s.tr.selector, TSS_A);
        assert_eq!(access_byte(&mut c, TSS_A), 0x8b);
        assert_eq!(c.s.rip, 0x10000);
    }

    #[test]
    fn busy_tss_target_is_gp() {
        let mut c = cpu();
        // JMP to the current (busy) TSS: #GP(sel).
        let r = exec(&mut c, &[0xea, 0, 0, 0, 0, TSS_A as u8, 0]);
        assert_eq!(r, Err(Exception::gp(TSS_A as u32)));
    }

    #[test]
    fn iret_nt_to_free_tss_is_ts() {
        let mut c = cpu();
        c.mmu.phys.write(A_BASE, &TSS_C.to_le_bytes());
        c.s.set_eflags(FLAG_1 | NT);
        assert_eq!(exec(&mut c, &[0xcf]), Err(Exception::ts(TSS_C as u32)));
    }

    #[test]
    fn tss_trap_bit_raises_db_in_new_task() {
        let mut c = cpu();
        let w = |c: &mut crate::Cpu, o: u64, v: u32| c.mmu.phys.write(C_BASE + o, &v.to_le_bytes());
        w(&mut c, 0x20, 0x5000);
        w(&mut c, 0x24, 2);
        for k in 0..6 {
            w(&mut c, 0x48 + 4 * k, DATA0 as u32);
        }
        w(&mut c, 0x4c, CODE0 as u32);
        w(&mut c, 0x64, 1);
        let r = exec(&mut c, &[0xea, 0, 0, 0, 0, TSS_C as u8, 0]);
        assert_eq!(r, Err(Exception::new(crate::exception::vec::DB)));
        assert_eq!(c.s.tr.selector, TSS_C);
        assert_eq!(c.s.rip, 0x5000);
        assert_ne!(c.s.dr[6] & (1 << 15), 0, "DR6.BT");
    }

    #[test]
    fn task_switch_loads_cr3_with_paging() {
        let mut c = cpu();
        // Two page directories (0x40000, 0x41000) sharing one identity page table
        // (0x42000) for the first 4 MiB; P | RW.
        for k in 0..1024u64 {
            c.mmu
                .phys
                .write(0x42000 + 4 * k, &((k << 12) as u32 | 3).to_le_bytes());
        }
        c.mmu.phys.write(0x40000, &(0x42000u32 | 3).to_le_bytes());
        c.mmu.phys.write(0x41000, &(0x42000u32 | 3).to_le_bytes());
        c.s.cr3 = 0x40000;
        c.s.cr0 |= CR0_PG;
        c.sync_paging();
        let w = |c: &mut crate::Cpu, o: u64, v: u32| c.mmu.phys.write(C_BASE + o, &v.to_le_bytes());
        w(&mut c, 0x1c, 0x41000);
        w(&mut c, 0x20, 0x5000);
        w(&mut c, 0x24, 2);
        for k in 0..6 {
            w(&mut c, 0x48 + 4 * k, DATA0 as u32);
        }
        w(&mut c, 0x4c, CODE0 as u32);
        let r = exec(&mut c, &[0xea, 0, 0, 0, 0, TSS_C as u8, 0]);
        assert_eq!(r, Ok(()));
        assert_eq!(c.s.cr3, 0x41000);
        assert_eq!(c.mmu.paging_regs().cr3, 0x41000, "MMU told");
        // CR3 is not saved in the old TSS (SDM 7.3): A's CR3 slot stays 0.
        let mut b = [0u8; 4];
        c.mmu.phys.read(A_BASE + 0x1c, &mut b);
        assert_eq!(u32::from_le_bytes(b), 0);
    }

    #[test]
    fn bad_cs_in_new_task_faults_in_new_task() {
        let mut c = cpu();
        // TSS C: CS = a data segment -> #TS(CS) after the switch has committed.
        let w = |c: &mut crate::Cpu, o: u64, v: u32| c.mmu.phys.write(C_BASE + o, &v.to_le_bytes());
        w(&mut c, 0x20, 0x5000);
        w(&mut c, 0x24, 2);
        for k in 0..6 {
            w(&mut c, 0x48 + 4 * k, DATA0 as u32);
        }
        let r = exec(&mut c, &[0x9a, 0, 0, 0, 0, TSS_C as u8, 0]);
        assert_eq!(r, Err(Exception::ts(DATA0 as u32)));
        assert_eq!(c.s.tr.selector, TSS_C, "TR already switched");
        assert_eq!(c.start_rip, 0x5000, "fault reported at the new task's EIP");
        assert_ne!(c.s.eflags() & NT, 0);
        assert_ne!(c.s.cr0 & CR0_TS, 0);
    }
}
