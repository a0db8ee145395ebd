//! Lazy arithmetic flags.
//!
//! The interpreter does not compute CF/PF/AF/ZF/SF/OF after every instruction: it
//! records the operation, operand size, operands and result, and works the flags out
//! only when something reads them (a Jcc, PUSHF, an interrupt, ...). Most flag results
//! are overwritten before anyone looks (the idea QEMU's TCG states for its CC_OP).
//! Instructions with unusual flag rules (shifts, rotates, multiply, BCD) set the flags
//! eagerly with [`CpuState::set_arith_flags`].

use crate::state::*;

/// The operation whose flags are pending.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
#[repr(u8)]
pub enum FlagOp {
    /// Nothing pending: `eflags_raw` is exact.
    #[default]
    None = 0,
    /// `res = src1 + src2 + carry_in`.
    Add,
    /// `res = src1 - src2 - carry_in` (also CMP, NEG with src1 = 0).
    Sub,
    /// AND/OR/XOR/TEST: CF = OF = AF = 0.
    Logic,
    /// INC: like Add with src2 = 1, CF untouched (taken from `eflags_raw`).
    Inc,
    /// DEC: like Sub with src2 = 1, CF untouched.
    Dec,
}

/// The pending flag computation.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct LazyFlags {
    /// Operation.
    pub op: FlagOp,
    /// Operand size in bytes (1, 2, 4, 8).
    pub size: u8,
    /// Carry in (ADC, SBB).
    pub carry_in: bool,
    /// Result (masked to size).
    pub res: u64,
    /// First operand.
    pub src1: u64,
    /// Second operand.
    pub src2: u64,
}

/// Sign-bit mask for an operand size in bytes.
#[inline]
pub fn sign_bit(size: u32) -> u64 {
    1u64 << (size * 8 - 1)
}

/// All-ones mask for an operand size in bytes.
#[inline]
pub fn size_mask(size: u32) -> u64 {
    if size >= 8 {
        u64::MAX
    } else {
        (1u64 << (size * 8)) - 1
    }
}

/// PF: set when the low byte has an even number of one bits.
#[inline]
pub fn parity(v: u64) -> u32 {
    if (v as u8).count_ones() & 1 == 0 {
        PF
    } else {
        0
    }
}

/// SF, ZF and PF of a result of `size` bytes.
#[inline]
pub fn szp(size: u32, res: u64) -> u32 {
    let r = res & size_mask(size);
    let mut f = parity(r);
    if r == 0 {
        f |= ZF;
    }
    if r & sign_bit(size) != 0 {
        f |= SF;
    }
    f
}

impl LazyFlags {
    /// The six arithmetic flags of the pending operation.
    pub fn compute(&self, raw: u32) -> u32 {
        let size = self.size as u32;
        let m = size_mask(size);
        let sb = sign_bit(size);
        let (a, b, r) = (self.src1 & m, self.src2 & m, self.res & m);
        let mut f = szp(size, r);
        match self.op {
            FlagOp::None => return raw & ARITH_FLAGS,
            FlagOp::Add | FlagOp::Inc => {
                if self.op == FlagOp::Add {
                    if r < a || (self.carry_in && r == a) {
                        f |= CF;
                    }
                } else {
                    f |= raw & CF;
                }
                if (a ^ r) & (b ^ r) & sb != 0 {
                    f |= OF;
                }
                f |= ((a ^ b ^ r) & 0x10) as u32; // AF is bit 4 in both
            }
            FlagOp::Sub | FlagOp::Dec => {
                if self.op == FlagOp::Sub {
                    if a < b || (self.carry_in && a == b) {
                        f |= CF;
                    }
                } else {
                    f |= raw & CF;
                }
                if (a ^ b) & (a ^ r) & sb != 0 {
                    f |= OF;
                }
                f |= ((a ^ b ^ r) & 0x10) as u32;
            }
            FlagOp::Logic => {}
        }
        f
    }
}

impl CpuState {
    /// The whole EFLAGS register, with pending arithmetic flags worked out.
    #[inline]
    pub fn eflags(&self) -> u32 {
        if self.lazy.op == FlagOp::None {
            self.eflags_raw
        } else {
            (self.eflags_raw & !ARITH_FLAGS) | self.lazy.compute(self.eflags_raw)
        }
    }

    /// Works out pending flags into `eflags_raw`.
    #[inline]
    pub fn materialize_flags(&mut self) {
        if self.lazy.op != FlagOp::None {
            self.eflags_raw = self.eflags();
            self.lazy.op = FlagOp::None;
        }
    }

    /// Replaces EFLAGS wholesale (no privilege checks: callers apply those). Bit 1 is
    /// forced to 1 and bits 3, 5, 15 and 22-31 to 0.
    #[inline]
    pub fn set_eflags(&mut self, v: u32) {
        self.lazy.op = FlagOp::None;
        self.eflags_raw = (v & 0x003f_7fd5) | FLAG_1;
    }

    /// Records a lazily evaluated flag result. For `Inc`/`Dec`, CF is preserved.
    #[inline]
    pub fn set_lazy_flags(
        &mut self,
        op: FlagOp,
        size: u32,
        res: u64,
        src1: u64,
        src2: u64,
        carry_in: bool,
    ) {
        if matches!(op, FlagOp::Inc | FlagOp::Dec) && self.lazy.op != FlagOp::None {
            let cf = self.get_cf();
            self.eflags_raw = (self.eflags_raw & !CF) | cf as u32;
        }
        self.lazy = LazyFlags {
            op,
            size: size as u8,
            carry_in,
            res,
            src1,
            src2,
        };
    }

    /// Sets the arithmetic flags selected by `mask` to the bits of `values`.
    #[inline]
    pub fn set_arith_flags(&mut self, mask: u32, values: u32) {
        self.materialize_flags();
        self.eflags_raw = (self.eflags_raw & !mask) | (values & mask);
    }

    /// Sets or clears one flag (any flag bit).
    #[inline]
    pub fn set_flag(&mut self, bit: u32, on: bool) {
        self.set_arith_flags(bit, if on { bit } else { 0 });
    }

    /// Reads one flag (any flag bit).
    #[inline]
    pub fn flag(&self, bit: u32) -> bool {
        if bit & ARITH_FLAGS == 0 || self.lazy.op == FlagOp::None {
            self.eflags_raw & bit != 0
        } else {
            self.lazy.compute(self.eflags_raw) & bit != 0
        }
    }

    /// CF.
    #[inline]
    pub fn get_cf(&self) -> bool {
        let l = &self.lazy;
        match l.op {
            FlagOp::None | FlagOp::Inc | FlagOp::Dec => self.eflags_raw & CF != 0,
            FlagOp::Logic => false,
            // As `LazyFlags::compute`, without the other five flags.
            FlagOp::Add => {
                let m = size_mask(l.size as u32);
                let (a, r) = (l.src1 & m, l.res & m);
                r < a || (l.carry_in && r == a)
            }
            FlagOp::Sub => {
                let m = size_mask(l.size as u32);
                let (a, b) = (l.src1 & m, l.src2 & m);
                a < b || (l.carry_in && a == b)
            }
        }
    }
    /// ZF.
    #[inline]
    pub fn get_zf(&self) -> bool {
        match self.lazy.op {
            FlagOp::None => self.eflags_raw & ZF != 0,
            _ => self.lazy.res & size_mask(self.lazy.size as u32) == 0,
        }
    }
    /// SF.
    #[inline]
    pub fn get_sf(&self) -> bool {
        match self.lazy.op {
            FlagOp::None => self.eflags_raw & SF != 0,
            _ => self.lazy.res & sign_bit(self.lazy.size as u32) != 0,
        }
    }
    /// OF.
    #[inline]
    pub fn get_of(&self) -> bool {
        let l = &self.lazy;
        match l.op {
            FlagOp::None => self.eflags_raw & OF != 0,
            FlagOp::Logic => false,
            // As `LazyFlags::compute`, without the other five flags.
            FlagOp::Add | FlagOp::Inc => {
                (l.src1 ^ l.res) & (l.src2 ^ l.res) & sign_bit(l.size as u32) != 0
            }
            FlagOp::Sub | FlagOp::Dec => {
                (l.src1 ^ l.src2) & (l.src1 ^ l.res) & sign_bit(l.size as u32) != 0
            }
        }
    }
    /// PF.
    #[inline]
    pub fn get_pf(&self) -> bool {
        self.flag(PF)
    }
    /// AF.
    #[inline]
    pub fn get_af(&self) -> bool {
        self.flag(AF)
    }

    /// Evaluates condition code `cc` (0-15, the low nibble of Jcc/SETcc/CMOVcc).
    #[inline]
    pub fn cond(&self, cc: u8) -> bool {
        let r = match cc >> 1 {
            0 => self.get_of(),
            1 => self.get_cf(),
            2 => self.get_zf(),
            3 => self.get_cf() || self.get_zf(),
            4 => self.get_sf(),
            5 => self.get_pf(),
            6 => self.get_sf() != self.get_of(),
            _ => self.get_zf() || (self.get_sf() != self.get_of()),
        };
        r ^ (cc & 1 != 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn add_sub_flags_match_hand_computed_values() {
        let mut s = CpuState::default();
        // 0x7f + 1 (8-bit): OF, SF, AF; no CF.
        s.set_lazy_flags(FlagOp::Add, 1, 0x80, 0x7f, 1, false);
        assert_eq!(s.eflags() & ARITH_FLAGS, OF | SF | AF);
        // 0 - 1 (16-bit): CF, SF, AF, PF.
        s.set_lazy_flags(FlagOp::Sub, 2, 0xffff, 0, 1, false);
        assert_eq!(s.eflags() & ARITH_FLAGS, CF | SF | AF | PF);
        // INC keeps CF.
        s.set_lazy_flags(FlagOp::Inc, 4, 0, 0xffff_ffff, 1, false);
        assert!(s.get_cf() && s.get_zf());
        // ADC with carry-in: 0xff + 0 + 1 = 0 carry.
        s.set_lazy_flags(FlagOp::Add, 1, 0, 0xff, 0, true);
        assert!(s.get_cf() && s.get_zf());
        assert!(s.cond(0x4) && !s.cond(0x5) && s.cond(0x2));
    }

    /// The single-flag getters agree with the full computation for every operation
    /// and size over edge-case operands.
    #[test]
    fn single_flag_getters_agree_with_compute() {
        let vals = [
            0u64,
            1,
            0x7f,
            0x80,
            0xff,
            0x7fff,
            0x8000,
            0xffff,
            0x7fff_ffff,
            0x8000_0000,
            0xffff_ffff,
            0x1234_5678_9abc_def0,
        ];
        let ops = [
            FlagOp::Add,
            FlagOp::Sub,
            FlagOp::Logic,
            FlagOp::Inc,
            FlagOp::Dec,
        ];
        let mut s = CpuState::default();
        for raw_cf in [false, true] {
            for &op in &ops {
                for size in [1u32, 2, 4] {
                    for &a in &vals {
                        for &b in &vals {
                            for cin in [false, true] {
                                let m = size_mask(size);
                                let res = match op {
                                    FlagOp::Add | FlagOp::Inc => {
                                        a.wrapping_add(b).wrapping_add(cin as u64)
                                    }
                                    _ => a.wrapping_sub(b).wrapping_sub(cin as u64),
                                } & m;
                                s.set_eflags(if raw_cf { CF } else { 0 });
                                s.lazy = LazyFlags {
                                    op,
                                    size: size as u8,
                                    carry_in: cin,
                                    res,
                                    src1: a & m,
                                    src2: b & m,
                                };
                                let f = s.eflags();
                                assert_eq!(s.get_cf(), f & CF != 0, "{op:?} {size} {a:#x} {b:#x}");
                                assert_eq!(s.get_of(), f & OF != 0, "{op:?} {size} {a:#x} {b:#x}");
                                assert_eq!(s.get_zf(), f & ZF != 0);
                                assert_eq!(s.get_sf(), f & SF != 0);
                            }
                        }
                    }
                }
            }
        }
    }
}
