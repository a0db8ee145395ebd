//! MUL/IMUL (one, two and three operands), DIV/IDIV, and the BCD adjustments
//! DAA DAS AAA AAS AAM AAD.
//!
//! Flags left undefined by the manual are defined here as follows: after MUL/IMUL,
//! SF/ZF/PF follow the low half of the product and AF is cleared; DIV/IDIV leave all
//! flags unchanged; AAM sets SF/ZF/PF from AL and clears OF/AF/CF; AAD sets all six as
//! the 8-bit ADD of AL and AH*imm that it performs; AAA/AAS leave OF/SF/ZF/PF; DAA/DAS
//! clear OF.

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

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use crate::exception::vec;
    use crate::state::*;

    #[test]
    fn multiply_forms() {
        // mul ebx: 0x80000000 * 4 = 2:00000000, CF=OF=1.
        let mut c = flat32(&[0xf7, 0xe3]);
        c.s.gpr[reg::RAX] = 0x8000_0000;
        c.s.gpr[reg::RBX] = 4;
        run(&mut c, 1);
        assert_eq!((c.s.gpr[reg::RDX], c.s.gpr[reg::RAX]), (2, 0));
        assert!(c.s.get_cf() && c.s.get_of());

        // imul bl: -2 * 3 = -6 fits AL: CF=OF=0; 0x40 * 4 = 0x100 does not.
        let mut c = real(&[0xf6, 0xeb, 0xf6, 0xeb]);
        c.s.gpr[reg::RAX] = 0xfe;
        c.s.gpr[reg::RBX] = 3;
        run(&mut c, 1);
        assert_eq!(c.s.gpr[reg::RAX], 0xfffa);
        assert!(!c.s.get_cf() && !c.s.get_of());
        c.s.gpr[reg::RAX] = 0x40;
        c.s.gpr[reg::RBX] = 4;
        run(&mut c, 1);
        assert_eq!(c.s.gpr[reg::RAX], 0x0100);
        assert!(c.s.get_cf() && c.s.get_of());

        // imul eax, ebx, -1 of 0x80000000 overflows; imul ecx, ebx of 3 * -2.
        let mut c = flat32(&[0x6b, 0xc3, 0xff, 0x0f, 0xaf, 0xcb]);
        c.s.gpr[reg::RBX] = 0x8000_0000;
        run(&mut c, 1);
        assert_eq!(c.s.gpr[reg::RAX], 0x8000_0000);
        assert!(c.s.get_cf() && c.s.get_of());
        c.s.gpr[reg::RBX] = (-2i32) as u32 as u64;
        c.s.gpr[reg::RCX] = 3;
        run(&mut c, 1);
        assert_eq!(c.s.gpr[reg::RCX], (-6i32) as u32 as u64);
        assert!(!c.s.get_cf() && !c.s.get_of());
    }

    #[test]
    fn divide_and_divide_errors() {
        // div ebx: 0x1_00000005 / 2 = 0x80000002 rem 1.
        let mut c = flat32(&[0xf7, 0xf3]);
        c.s.gpr[reg::RDX] = 1;
        c.s.gpr[reg::RAX] = 5;
        c.s.gpr[reg::RBX] = 2;
        run(&mut c, 1);
        assert_eq!((c.s.gpr[reg::RAX], c.s.gpr[reg::RDX]), (0x8000_0002, 1));
        // Quotient overflow and zero divisor: #DE, registers untouched.
        for (edx, ebx) in [(2u64, 2u64), (0, 0)] {
            let mut c = flat32(&[0xf7, 0xf3]);
            c.s.gpr[reg::RDX] = edx;
            c.s.gpr[reg::RAX] = 9;
            c.s.gpr[reg::RBX] = ebx;
            assert_eq!(exec(&mut c).unwrap_err().vector, vec::DE);
            assert_eq!((c.s.gpr[reg::RAX], c.s.gpr[reg::RDX]), (9, edx));
        }
        // idiv ebx: -7 / 2 = -3 rem -1 (truncation toward zero).
        let mut c = flat32(&[0xf7, 0xfb]);
        c.s.gpr[reg::RDX] = 0xffff_ffff;
        c.s.gpr[reg::RAX] = 0xffff_fff9;
        c.s.gpr[reg::RBX] = 2;
        run(&mut c, 1);
        assert_eq!(c.s.gpr[reg::RAX], 0xffff_fffd);
        assert_eq!(c.s.gpr[reg::RDX], 0xffff_ffff);
        // idiv bx: -32768 / 1 fits; +32768 / 1 does not.
        let mut c = real(&[0xf7, 0xfb, 0xf7, 0xfb]);
        c.s.gpr[reg::RDX] = 0xffff;
        c.s.gpr[reg::RAX] = 0x8000;
        c.s.gpr[reg::RBX] = 1;
        run(&mut c, 1);
        assert_eq!((c.s.gpr[reg::RAX], c.s.gpr[reg::RDX]), (0x8000, 0));
        c.s.gpr[reg::RAX] = 0x8000;
        assert_eq!(exec(&mut c).unwrap_err().vector, vec::DE);
        // idiv bl: 0x8000 (-32768) / -1 overflows.
        let mut c = real(&[0xf6, 0xfb]);
        c.s.gpr[reg::RAX] = 0x8000;
        c.s.gpr[reg::RBX] = 0xff;
        assert_eq!(exec(&mut c).unwrap_err().vector, vec::DE);
    }

    #[test]
    fn decimal_adjust() {
        // 0x79 + 0x35 = 0xae; DAA -> 0x14 with CF (79 + 35 = 114).
        let mut c = real(&[0x04, 0x35, 0x27]);
        c.s.gpr[reg::RAX] = 0x79;
        run(&mut c, 2);
        assert_eq!(c.s.gpr[reg::RAX], 0x14);
        assert!(c.s.get_cf() && c.s.get_af());
        // 0x35 - 0x47; DAS -> 0x88 with CF (35 - 47 = -12).
        let mut c = real(&[0x2c, 0x47, 0x2f]);
        c.s.gpr[reg::RAX] = 0x35;
        run(&mut c, 2);
        assert_eq!(c.s.gpr[reg::RAX], 0x88);
        assert!(c.s.get_cf() && c.s.get_af() && c.s.get_sf());
        // AAA: 9 + 3 -> AX 0x0102, AF=CF=1. AAS: 0x0102 - 3 -> 0x0009.
        let mut c = real(&[0x04, 0x03, 0x37, 0x2c, 0x03, 0x3f]);
        c.s.gpr[reg::RAX] = 0x0009;
        run(&mut c, 2);
        assert_eq!(c.s.gpr[reg::RAX], 0x0102);
        assert!(c.s.get_cf() && c.s.get_af());
        run(&mut c, 2);
        assert_eq!(c.s.gpr[reg::RAX], 0x0009);
        assert!(c.s.get_cf() && c.s.get_af());
    }

    #[test]
    fn aam_aad() {
        // aam: 79 -> AH 7, AL 9; aad: back to 79; aad 16 on 0x0203 -> 0x23.
        let mut c = real(&[0xd4, 0x0a, 0xd5, 0x0a, 0xd5, 0x10, 0xd4, 0x00]);
        c.s.gpr[reg::RAX] = 0x4f;
        run(&mut c, 1);
        assert_eq!(c.s.gpr[reg::RAX], 0x0709);
        run(&mut c, 1);
        assert_eq!(c.s.gpr[reg::RAX], 0x004f);
        assert!(!c.s.get_zf() && !c.s.get_sf());
        c.s.gpr[reg::RAX] = 0x0203;
        run(&mut c, 1);
        assert_eq!(c.s.gpr[reg::RAX], 0x0023);
        // aam 0: #DE.
        assert_eq!(exec(&mut c).unwrap_err().vector, vec::DE);
        assert_eq!(c.s.gpr[reg::RAX], 0x0023);
    }
}
