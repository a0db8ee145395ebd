//! MUL/IMUL (one, two and three operands), DIV/IDIV, and the BCD adjustments
//! DAA DAS AAA AAS AAM AAD.
//!
//! Flags left undefined by the manual are defined here as follows: after MUL/IMUL,
//! SF/ZF/PF follow the low half of the product and AF is cleared; DIV/IDIV leave all
//! flags unchanged; AAM and AAD set SF/ZF/PF from AL and clear OF/AF/CF (AAD: as an
//! 8-bit ADD of AL and AH*imm, which is what it performs); AAA/AAS leave OF/SF/ZF/PF.

use crate::exception::{Exception, Res};
use crate::flags::{size_mask, szp, FlagOp};
use crate::state::*;
use crate::Cpu;
use iced_x86::{Instruction, Mnemonic};

use super::int::sext;

impl Cpu {
    /// MUL and IMUL in all their forms.
    pub(crate) fn mul(&mut self, i: &Instruction, m: Mnemonic) -> Res<()> {
        let size = self.op_size(i, 0);
        let mask = size_mask(size);
        let bits = size * 8;
        if m == Mnemonic::Imul && i.op_count() > 1 {
            let (a, b) = if i.op_count() == 3 {
                (self.read_op(i, 1)?, self.read_op(i, 2)?)
            } else {
                (self.read_op(i, 0)?, self.read_op(i, 1)?)
            };
            let p = sext(a, size) as i128 * sext(b, size) as i128;
            let r = p as u64 & mask;
            let over = sext(r, size) as i128 != p;
            self.write_op(i, 0, r)?;
            self.mul_flags(size, r, over);
            return Ok(());
        }
        let src = self.read_op(i, 0)? & mask;
        let acc = self.s.gpr[reg::RAX] & mask;
        let (lo, hi, over) = if m == Mnemonic::Mul {
            let p = acc as u128 * src as u128;
            let hi = (p >> bits) as u64 & mask;
            (p as u64 & mask, hi, hi != 0)
        } else {
            let p = sext(acc, size) as i128 * sext(src, size) as i128;
            let lo = p as u64 & mask;
            ((lo), (p >> bits) as u64 & mask, sext(lo, size) as i128 != p)
        };
        if size == 1 {
            self.s.set_reg_sized(reg::RAX, 2, lo | (hi << 8));
        } else {
            self.s.set_reg_sized(reg::RAX, size, lo);
            self.s.set_reg_sized(reg::RDX, size, hi);
        }
        self.mul_flags(size, lo, over);
        Ok(())
    }

    /// Flags after a multiply: CF = OF = `over`; SF/ZF/PF from the low half; AF = 0.
    fn mul_flags(&mut self, size: u32, lo: u64, over: bool) {
        let mut f = szp(size, lo);
        if over {
            f |= CF | OF;
        }
        self.s.set_arith_flags(ARITH_FLAGS, f);
    }

    /// DIV and IDIV: #DE on a zero divisor or a quotient that does not fit.
    pub(crate) fn div(&mut self, i: &Instruction, m: Mnemonic) -> Res<()> {
        let size = self.op_size(i, 0);
        let mask = size_mask(size);
        let bits = size * 8;
        let src = self.read_op(i, 0)? & mask;
        if src == 0 {
            return Err(Exception::de());
        }
        let dividend: u64 = if size == 1 {
            self.s.gpr[reg::RAX] & 0xffff
        } else {
            ((self.s.gpr[reg::RDX] & mask) << bits) | (self.s.gpr[reg::RAX] & mask)
        };
        let (q, r) = if m == Mnemonic::Div {
            let q = dividend / src;
            if q > mask {
                return Err(Exception::de());
            }
            (q, dividend % src)
        } else {
            let n = sext(dividend, size * 2) as i128;
            let d = sext(src, size) as i128;
            let q = n / d;
            let lim = 1i128 << (bits - 1);
            if q >= lim || q < -lim {
                return Err(Exception::de());
            }
            (q as u64 & mask, (n % d) as u64 & mask)
        };
        if size == 1 {
            self.s.set_reg_sized(reg::RAX, 2, q | (r << 8));
        } else {
            self.s.set_reg_sized(reg::RAX, size, q);
            self.s.set_reg_sized(reg::RDX, size, r);
        }
        Ok(())
    }

    /// DAA DAS AAA AAS AAM AAD.
    pub(crate) fn bcd(&mut self, i: &Instruction, m: Mnemonic) -> Res<()> {
        let al = self.s.gpr[reg::RAX] & 0xff;
        let cf = self.s.get_cf();
        let af = self.s.get_af();
        match m {
            Mnemonic::Daa | Mnemonic::Das => {
                let mut a = al;
                let mut ncf = false;
                let mut naf = false;
                if (al & 0xf) > 9 || af {
                    naf = true;
                    if m == Mnemonic::Daa {
                        ncf = cf || a + 6 > 0xff;
                        a = (a + 6) & 0xff;
                    } else {
                        ncf = cf || a < 6;
                        a = a.wrapping_sub(6) & 0xff;
                    }
                }
                if al > 0x99 || cf {
                    a = if m == Mnemonic::Daa {
                        (a + 0x60) & 0xff
                    } else {
                        a.wrapping_sub(0x60) & 0xff
                    };
                    ncf = true;
                }
                self.s.set_r8(0, a as u8);
                let mut f = szp(1, a);
                if ncf {
                    f |= CF;
                }
                if naf {
                    f |= AF;
                }
                // OF is undefined: cleared.
                self.s.set_arith_flags(ARITH_FLAGS, f);
            }
            Mnemonic::Aaa | Mnemonic::Aas => {
                let ax = self.s.gpr[reg::RAX] & 0xffff;
                if (al & 0xf) > 9 || af {
                    let nax = if m == Mnemonic::Aaa {
                        ax.wrapping_add(0x106)
                    } else {
                        ax.wrapping_sub(6).wrapping_sub(0x100)
                    };
                    self.s.set_reg_sized(reg::RAX, 2, nax & 0xff0f);
                    self.s.set_arith_flags(AF | CF, AF | CF);
                } else {
                    self.s.set_reg_sized(reg::RAX, 2, ax & 0xff0f);
                    self.s.set_arith_flags(AF | CF, 0);
                }
            }
            Mnemonic::Aam => {
                let base = i.immediate8() as u64;
                if base == 0 {
                    return Err(Exception::de());
                }
                let (ah, nal) = (al / base, al % base);
                self.s.set_reg_sized(reg::RAX, 2, (ah << 8) | nal);
                self.s
                    .set_lazy_flags(FlagOp::Logic, 1, nal, nal, nal, false);
            }
            _ => {
                // AAD
                let base = i.immediate8() as u64;
                let ah = (self.s.gpr[reg::RAX] >> 8) & 0xff;
                let t = (ah * base) & 0xff;
                let r = (al + t) & 0xff;
                self.s.set_reg_sized(reg::RAX, 2, r);
                self.s.set_lazy_flags(FlagOp::Add, 1, r, al, t, false);
            }
        }
        Ok(())
    }
}
