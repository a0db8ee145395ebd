//! Segment register loads and descriptor handling (Intel SDM vol. 3, chapter 3 and
//! section 5.5-5.7; the checks follow the MOV / POP / LDS pseudocode of vol. 2).
//!
//! Loads are split into *check* (read the descriptor, apply every rule, return what
//! would be loaded) and *commit* (set the accessed bit, fill the cache), so that control
//! transfers can check everything they load before changing any register.

use crate::descriptor::{seg_contains, Descriptor};
use crate::exception::{Exception, Res};
use crate::state::*;
use crate::Cpu;

/// A stack being built or read by a transfer that may switch stacks: pushes and pops go
/// through it and nothing reaches SS:ESP until the caller commits `sp`.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Stk {
    /// The stack segment (possibly not yet loaded).
    pub seg: Segment,
    /// The full ESP; only SP moves when `big` is false.
    pub sp: u32,
    /// 32-bit stack pointer (SS.B).
    pub big: bool,
    /// Accesses are made with user privilege.
    pub user: bool,
    /// The exception a limit violation raises.
    pub err: Exception,
}

impl Stk {
    /// The stack pointer moved by `delta` bytes (SP only on a 16-bit stack).
    pub(crate) fn moved_by(&self, delta: u32) -> u32 {
        if self.big {
            self.sp.wrapping_add(delta)
        } else {
            (self.sp & 0xffff_0000) | (self.sp as u16).wrapping_add(delta as u16) as u32
        }
    }
    fn offset(&self, v: u32) -> u32 {
        if self.big {
            v
        } else {
            v & 0xffff
        }
    }
}

impl Cpu {
    /// The current stack as a [`Stk`] (limit faults are #SS(0)).
    pub(crate) fn cur_stack(&self) -> Stk {
        Stk {
            seg: self.s.seg[SegReg::Ss as usize],
            sp: self.s.gpr[reg::RSP] as u32,
            big: self.s.stack32(),
            user: self.s.cpl == 3,
            err: Exception::ss(0),
        }
    }

    /// Pushes `size` bytes on `st` (checks the limit, writes memory, moves `st.sp`).
    pub(crate) fn stk_push(&mut self, st: &mut Stk, size: u32, v: u64) -> Res<()> {
        let nsp = st.moved_by(size.wrapping_neg());
        let off = st.offset(nsp);
        if !seg_contains(&st.seg, off, size) {
            return Err(st.err);
        }
        let lin = st.seg.base.wrapping_add(off as u64) & 0xffff_ffff;
        self.write_lin(lin, size, v, st.user)?;
        st.sp = nsp;
        Ok(())
    }

    /// Pops `size` bytes from `st`.
    pub(crate) fn stk_pop(&mut self, st: &mut Stk, size: u32) -> Res<u64> {
        let off = st.offset(st.sp);
        if !seg_contains(&st.seg, off, size) {
            return Err(st.err);
        }
        let lin = st.seg.base.wrapping_add(off as u64) & 0xffff_ffff;
        let v = self.read_lin(lin, size, st.user)?;
        st.sp = st.moved_by(size);
        Ok(v)
    }

    /// Writes a finished stack pointer back to ESP (SP only for a 16-bit stack).
    pub(crate) fn commit_sp(&mut self, st: &Stk) {
        if st.big {
            self.s.set_r32(reg::RSP, st.sp);
        } else {
            self.s.set_r16(reg::RSP, st.sp as u16);
        }
    }

    /// Loads a data or stack segment register (MOV Sreg, POP Sreg, LDS and friends) in
    /// the current mode. CS is loaded by control transfers, not here.
    pub fn load_seg(&mut self, s: SegReg, sel: u16) -> Res<()> {
        if self.s.real() {
            // Real mode changes selector and base only: limit and attributes stay
            // (which is what makes "unreal mode" work).
            let sc = &mut self.s.seg[s as usize];
            sc.selector = sel;
            sc.base = (sel as u64) << 4;
            if sc.attrs & ATTR_UNUSABLE != 0 {
                // A register nulled in protected mode becomes usable again (its limit,
                // kept by the null load, stays).
                sc.attrs = ATTR_P | ATTR_S | ATTR_RW | ATTR_ACCESSED;
            }
            return Ok(());
        }
        if self.s.v86() {
            self.s.seg[s as usize] = Segment::v86(sel);
            return Ok(());
        }
        self.load_seg_protected(s, sel)
    }

    /// Loads CS in real mode (far JMP/CALL/RET, interrupts): selector and base.
    pub fn load_cs_real(&mut self, sel: u16) {
        let sc = &mut self.s.seg[SegReg::Cs as usize];
        sc.selector = sel;
        sc.base = (sel as u64) << 4;
    }

    /// Loads CS for real or V86 mode, whichever is current.
    pub(crate) fn load_cs_realish(&mut self, sel: u16) {
        if self.s.v86() {
            let mut sc = Segment::v86(sel);
            sc.attrs |= ATTR_CODE;
            self.s.seg[SegReg::Cs as usize] = sc;
            self.s.cpl = 3;
        } else {
            self.load_cs_real(sel);
        }
    }

    /// Linear address of the descriptor `sel` names, or `None` when the selector lies
    /// beyond the GDT / LDT limit (or names the LDT while LDTR is null).
    pub(crate) fn desc_addr(&self, sel: u16) -> Option<u64> {
        let idx = (sel & !7) as u64;
        let (base, limit) = if sel & 4 != 0 {
            if self.s.ldtr.attrs & ATTR_UNUSABLE != 0 || self.s.ldtr.selector & !3 == 0 {
                return None;
            }
            (self.s.ldtr.base, self.s.ldtr.limit as u64)
        } else {
            (self.s.gdtr.base, self.s.gdtr.limit as u64)
        };
        if idx + 7 > limit {
            return None;
        }
        Some(base.wrapping_add(idx) & 0xffff_ffff)
    }

    /// Reads the descriptor `sel` names; `fault(sel & 0xfffc)` when it lies beyond the
    /// table limit.
    pub(crate) fn read_desc(
        &mut self,
        sel: u16,
        fault: fn(u32) -> Exception,
    ) -> Res<(u64, Descriptor)> {
        let addr = self.desc_addr(sel).ok_or(fault(sel as u32 & 0xfffc))?;
        let raw = self.read_sys(addr, 8)?;
        Ok((addr, Descriptor(raw)))
    }

    /// Sets the accessed bit of a code or data descriptor in memory, if clear.
    pub(crate) fn mark_accessed(&mut self, addr: u64, d: &Descriptor) -> Res<()> {
        if d.is_seg() && !d.accessed() {
            let b = (d.0 >> 40) as u8 | 1;
            self.write_sys(addr + 5, 1, b as u64)?;
        }
        Ok(())
    }

    /// Checks `sel` as a stack segment for privilege level `cpl`: writable data, RPL =
    /// DPL = `cpl`, present. `fault` is raised for the rule violations (with `null_code`
    /// for a null selector), #SS(sel) when not present.
    pub(crate) fn check_ss(
        &mut self,
        sel: u16,
        cpl: u8,
        fault: fn(u32) -> Exception,
        null_code: u32,
    ) -> Res<(u64, Descriptor)> {
        if sel & !3 == 0 {
            return Err(fault(null_code));
        }
        let code = sel as u32 & 0xfffc;
        if (sel & 3) as u8 != cpl {
            return Err(fault(code));
        }
        let (addr, d) = self.read_desc(sel, fault)?;
        if !d.writable_data() || d.dpl() != cpl {
            return Err(fault(code));
        }
        if !d.present() {
            return Err(Exception::ss(code));
        }
        Ok((addr, d))
    }

    /// Checks `sel` as a data segment (DS, ES, FS, GS) at privilege `cpl`: data or
    /// readable code; for data and non-conforming code, DPL >= max(CPL, RPL); present
    /// (else #NP). `Ok(None)` for a null selector.
    pub(crate) fn check_data_seg(
        &mut self,
        sel: u16,
        cpl: u8,
        fault: fn(u32) -> Exception,
    ) -> Res<Option<(u64, Descriptor)>> {
        if sel & !3 == 0 {
            return Ok(None);
        }
        let code = sel as u32 & 0xfffc;
        let (addr, d) = self.read_desc(sel, fault)?;
        if !d.readable() {
            return Err(fault(code));
        }
        if !d.conforming() && ((sel & 3) as u8 > d.dpl() || cpl > d.dpl()) {
            return Err(fault(code));
        }
        if !d.present() {
            return Err(Exception::np(code));
        }
        Ok(Some((addr, d)))
    }

    /// Commits a checked segment load: accessed bit, then the cache.
    pub(crate) fn commit_seg(&mut self, s: SegReg, sel: u16, addr: u64, d: &Descriptor) -> Res<()> {
        self.mark_accessed(addr, d)?;
        let mut sc = d.to_segment(sel);
        sc.attrs |= ATTR_ACCESSED;
        self.s.seg[s as usize] = sc;
        Ok(())
    }

    /// Loads a null selector: the register becomes unusable (base and limit of the
    /// hidden part stay, as on Intel CPUs).
    pub(crate) fn null_seg(&mut self, s: SegReg, sel: u16) {
        let sc = &mut self.s.seg[s as usize];
        sc.attrs = ATTR_UNUSABLE;
        sc.selector = sel;
    }

    /// Commits CS (selector RPL forced to `cpl`) and CPL.
    pub(crate) fn commit_cs(&mut self, sel: u16, addr: u64, d: &Descriptor, cpl: u8) -> Res<()> {
        self.commit_seg(SegReg::Cs, (sel & !3) | cpl as u16, addr, d)?;
        self.s.cpl = cpl;
        Ok(())
    }

    /// After a return to an outer privilege level: DS, ES, FS and GS that the new CPL
    /// may not use (data or non-conforming code with DPL < CPL) become null.
    pub(crate) fn null_outer_segments(&mut self) {
        for s in [SegReg::Es, SegReg::Ds, SegReg::Fs, SegReg::Gs] {
            let sc = self.s.seg[s as usize];
            let a = sc.attrs;
            let conforming_code = a & (ATTR_CODE | ATTR_EC) == (ATTR_CODE | ATTR_EC);
            if a & ATTR_UNUSABLE == 0 && !conforming_code && sc.dpl() < self.s.cpl {
                self.null_seg(s, 0);
            }
        }
    }

    /// Protected-mode segment load with all descriptor checks (MOV / POP / LxS).
    fn load_seg_protected(&mut self, s: SegReg, sel: u16) -> Res<()> {
        if s == SegReg::Ss {
            let (addr, d) = self.check_ss(sel, self.s.cpl, Exception::gp, 0)?;
            return self.commit_seg(s, sel, addr, &d);
        }
        match self.check_data_seg(sel, self.s.cpl, Exception::gp)? {
            None => {
                self.null_seg(s, sel);
                Ok(())
            }
            Some((addr, d)) => self.commit_seg(s, sel, addr, &d),
        }
    }
}

impl Segment {
    /// A virtual-8086 mode segment: base = selector * 16, 64 KiB limit, DPL 3 data.
    pub fn v86(selector: u16) -> Segment {
        Segment {
            base: (selector as u64) << 4,
            limit: 0xffff,
            attrs: ATTR_P | ATTR_S | ATTR_RW | ATTR_ACCESSED | (3 << ATTR_DPL_SHIFT),
            selector,
        }
    }
}

#[cfg(test)]
mod tests {
    use crate::descriptor::testing::*;
    use crate::descriptor::Descriptor;
    use crate::exception::Exception;
    use crate::state::*;

    const RO_DATA: u16 = 0x18; // read-only data, DPL 0
    const NP_DATA: u16 = 0x20; // writable data, not present
    const DATA3: u16 = 0x28; // writable data, DPL 3
    const XO_CODE: u16 = 0x30; // execute-only code
    const CONF_CODE: u16 = 0x38; // readable conforming code, DPL 0
    const TSS: u16 = 0x40; // a system descriptor

    fn cpu() -> crate::Cpu {
        pm_cpu(&[
            (RO_DATA, Descriptor::segment(0, 0xffff, 0x90, 0)),
            (NP_DATA, Descriptor::segment(0, 0xffff, 0x12, 0)),
            (DATA3, Descriptor::segment(0x1000, 0xffff, 0xf2, 0)),
            (XO_CODE, Descriptor::segment(0, 0xffff, 0x98, 0)),
            (CONF_CODE, Descriptor::segment(0, 0xffff, 0x9e, 0)),
            (TSS, Descriptor::segment(0x3000, 0x67, 0x89, 0)),
        ])
    }

    #[test]
    fn ss_load_rules() {
        let mut c = cpu();
        // SDM MOV: null SS -> #GP(0); RPL != CPL, not writable, DPL != CPL -> #GP(sel);
        // not present -> #SS(sel).
        assert_eq!(c.load_seg(SegReg::Ss, 0), Err(Exception::gp(0)));
        assert_eq!(c.load_seg(SegReg::Ss, DATA0 | 1), Err(Exception::gp(0x10)));
        assert_eq!(c.load_seg(SegReg::Ss, RO_DATA), Err(Exception::gp(0x18)));
        assert_eq!(c.load_seg(SegReg::Ss, DATA3), Err(Exception::gp(0x28)));
        assert_eq!(c.load_seg(SegReg::Ss, NP_DATA), Err(Exception::ss(0x20)));
        assert_eq!(c.load_seg(SegReg::Ss, 0x1f8), Err(Exception::gp(0x1f8)));
        assert_eq!(c.s.seg[SegReg::Ss as usize].selector, DATA0, "unchanged");
        c.s.cpl = 3;
        assert_eq!(c.load_seg(SegReg::Ss, DATA3 | 3), Ok(()));
        assert_eq!(c.s.seg[SegReg::Ss as usize].base, 0x1000);
    }

    #[test]
    fn data_segment_load_rules() {
        let mut c = cpu();
        // Beyond the GDT limit (0x1ff) and LDT with a null LDTR: #GP(sel).
        assert_eq!(c.load_seg(SegReg::Ds, 0x200), Err(Exception::gp(0x200)));
        assert_eq!(c.load_seg(SegReg::Ds, 0x0c), Err(Exception::gp(0x08 | 4)));
        assert_eq!(c.load_seg(SegReg::Ds, XO_CODE), Err(Exception::gp(0x30)));
        assert_eq!(c.load_seg(SegReg::Ds, TSS), Err(Exception::gp(0x40)));
        assert_eq!(c.load_seg(SegReg::Ds, NP_DATA), Err(Exception::np(0x20)));
        // A readable conforming code segment is fine at any CPL.
        c.s.cpl = 3;
        assert_eq!(c.load_seg(SegReg::Es, CONF_CODE | 3), Ok(()));
        // DPL 0 data from CPL 3: #GP(sel).
        assert_eq!(c.load_seg(SegReg::Ds, DATA0 | 3), Err(Exception::gp(0x10)));
        // Accessed bit: set in memory on load (0xf2 -> 0xf3).
        assert_eq!(c.load_seg(SegReg::Fs, DATA3 | 3), Ok(()));
        let mut b = [0u8; 1];
        c.mmu.phys.read(GDT + DATA3 as u64 + 5, &mut b);
        assert_eq!(b[0], 0xf3);
    }

    #[test]
    fn null_selector_makes_segment_unusable() {
        let mut c = cpu();
        assert_eq!(c.load_seg(SegReg::Ds, 3), Ok(()));
        assert_eq!(c.s.seg[SegReg::Ds as usize].selector, 3);
        assert_eq!(c.read_mem(SegReg::Ds, 0, 1), Err(Exception::gp(0)));
    }

    #[test]
    fn outer_return_nulls_inner_segments() {
        let mut c = cpu();
        c.load_seg(SegReg::Es, CONF_CODE).unwrap();
        c.s.cpl = 3;
        c.s.seg[SegReg::Fs as usize] = Descriptor::segment(0, 0xffff, 0xf3, 0).to_segment(DATA3);
        c.null_outer_segments();
        assert_eq!(
            c.s.seg[SegReg::Ds as usize].selector,
            0,
            "DPL 0 data nulled"
        );
        assert_eq!(
            c.s.seg[SegReg::Es as usize].selector,
            CONF_CODE,
            "conforming kept"
        );
        assert_eq!(c.s.seg[SegReg::Fs as usize].selector, DATA3, "DPL 3 kept");
    }

    #[test]
    fn mov_pop_sreg_and_lss() {
        let mut c = cpu();
        // 8E D8: mov ds, eax.
        c.s.gpr[reg::RAX] = NP_DATA as u64;
        assert_eq!(exec(&mut c, &[0x8e, 0xd8]), Err(Exception::np(0x20)));
        // DPL 3 data is usable at CPL 0.
        c.s.gpr[reg::RAX] = DATA3 as u64;
        assert_eq!(exec(&mut c, &[0x8e, 0xd8]), Ok(()));
        assert_eq!(c.s.seg[SegReg::Ds as usize].base, 0x1000);
        // POP SS (17) with a bad selector leaves ESP alone.
        c.mmu.phys.write(0x8000, &(RO_DATA as u32).to_le_bytes());
        assert_eq!(exec(&mut c, &[0x17]), Err(Exception::gp(0x18)));
        assert_eq!(c.s.gpr[reg::RSP], 0x8000);
        c.mmu.phys.write(0x8000, &(DATA0 as u32).to_le_bytes());
        assert_eq!(exec(&mut c, &[0x17]), Ok(()));
        assert_eq!(c.s.gpr[reg::RSP], 0x8004);
        assert!(c.s.inhibit_irq && c.ev.inhibit_trap, "POP SS shadow");
        // LSS esp, [0x9000] (0F B2 25 disp32): offset then selector.
        c.load_seg(SegReg::Ds, DATA0).unwrap();
        c.mmu
            .phys
            .write(0x9000, &[0x78, 0x56, 0x34, 0x12, 0x10, 0x00]);
        assert_eq!(exec(&mut c, &[0x0f, 0xb2, 0x25, 0, 0x90, 0, 0]), Ok(()));
        assert_eq!(c.s.gpr[reg::RSP], 0x1234_5678);
    }
}
