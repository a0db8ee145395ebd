//! Segment register loads and descriptor handling.

use crate::exception::Res;
use crate::state::*;
use crate::Cpu;

impl Cpu {
    /// Loads a data or stack segment register (MOV Sreg, POP Sreg, LDS and friends) in
    /// the current mode. CS is loaded by control transfers, not here.
    pub fn load_seg(&mut self, s: SegReg, sel: u16) -> Res<()> {
        if self.s.real() {
            // Real mode changes selector and base only: limit and attributes stay
            // (which is what makes "unreal mode" work).
            let sc = &mut self.s.seg[s as usize];
            sc.selector = sel;
            sc.base = (sel as u64) << 4;
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

    /// Protected-mode segment load with all descriptor checks.
    ///
    /// TODO(protected-mode helper).
    fn load_seg_protected(&mut self, s: SegReg, sel: u16) -> Res<()> {
        let _ = (s, sel);
        Err(crate::Exception::gp(sel as u32 & 0xfffc))
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
