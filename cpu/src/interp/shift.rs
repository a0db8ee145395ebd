//! Shifts and rotates: ROL ROR RCL RCR SHL/SAL SHR SAR, SHLD SHRD.
//!
//! Rules (Intel SDM vol. 2, "SAL/SAR/SHL/SHR", "RCL/RCR/ROL/ROR", "SHLD", "SHRD"):
//! the count is masked to 5 bits (286 and later); a masked count of 0 changes nothing,
//! flags included. RCL/RCR of 8 and 16 bits rotate through CF modulo 9 and 17. OF is
//! defined for a count of 1; for other counts we compute it with the same formula
//! (what Intel P6-family parts do). AF, undefined after a shift, is cleared.

use crate::exception::Res;
use crate::flags::{sign_bit, size_mask, szp};
use crate::state::*;
use crate::Cpu;
use iced_x86::{Instruction, Mnemonic};

use super::int::Loc;

/// Bit `n` of `v` as 0 or 1.
#[inline]
fn bit(v: u64, n: u32) -> u64 {
    (v >> n) & 1
}

impl Cpu {
    /// Checks that a memory destination could be written (a shift by 0 still does the
    /// write access check, so a read-only page faults).
    fn probe_loc_write(&mut self, l: Loc, size: u32) -> Res<()> {
        match l {
            Loc::Reg(_) => Ok(()),
            Loc::Mem(s, off) => self.probe_write_mem(s, off, size),
        }
    }

    /// ROL ROR RCL RCR SHL SAL SHR SAR by 1, CL or imm8.
    pub(crate) fn shift(&mut self, i: &Instruction, m: Mnemonic) -> Res<()> {
        let size = self.op_size(i, 0);
        let bits = size * 8;
        let mask = size_mask(size);
        let dst = self.loc(i, 0);
        let v = self.loc_read_rmw(dst, size)?;
        let cnt = (self.read_op(i, 1)? & 0x1f) as u32;
        if cnt == 0 {
            // Nothing changes, but a memory destination is still checked for writing.
            return self.probe_loc_write(dst, size);
        }
        let cf_flag = |c: u64| if c != 0 { CF } else { 0 };
        let of_flag = |o: u64| if o != 0 { OF } else { 0 };
        let (res, fmask, fl) = match m {
            Mnemonic::Rol => {
                let c = cnt % bits;
                let r = if c == 0 {
                    v
                } else {
                    ((v << c) | (v >> (bits - c))) & mask
                };
                let cf = r & 1;
                (r, CF | OF, cf_flag(cf) | of_flag(bit(r, bits - 1) ^ cf))
            }
            Mnemonic::Ror => {
                let c = cnt % bits;
                let r = if c == 0 {
                    v
                } else {
                    ((v >> c) | (v << (bits - c))) & mask
                };
                let cf = bit(r, bits - 1);
                (r, CF | OF, cf_flag(cf) | of_flag(cf ^ bit(r, bits - 2)))
            }
            Mnemonic::Rcl | Mnemonic::Rcr => {
                let c = if size == 4 { cnt } else { cnt % (bits + 1) };
                if c == 0 {
                    // A whole number of turns through CF: value and CF stay, but OF is
                    // still recomputed from them (as a real 80286 does).
                    let cf = self.s.get_cf() as u64;
                    let of = if m == Mnemonic::Rcl {
                        bit(v, bits - 1) ^ cf
                    } else {
                        bit(v, bits - 1) ^ bit(v, bits - 2)
                    };
                    self.loc_write(dst, size, v)?;
                    self.s.set_flag(OF, of != 0);
                    return Ok(());
                }
                let w = bits + 1;
                let wmask = (1u64 << w) - 1;
                let x = v | ((self.s.get_cf() as u64) << bits);
                let rot = if m == Mnemonic::Rcl {
                    ((x << c) | (x >> (w - c))) & wmask
                } else {
                    ((x >> c) | (x << (w - c))) & wmask
                };
                let r = rot & mask;
                let cf = bit(rot, bits);
                let of = if m == Mnemonic::Rcl {
                    bit(r, bits - 1) ^ cf
                } else {
                    bit(r, bits - 1) ^ bit(r, bits - 2)
                };
                (r, CF | OF, cf_flag(cf) | of_flag(of))
            }
            Mnemonic::Shl | Mnemonic::Sal => {
                let full = v << cnt;
                let r = full & mask;
                let cf = bit(full, bits);
                (
                    r,
                    ARITH_FLAGS,
                    szp(size, r) | cf_flag(cf) | of_flag(bit(r, bits - 1) ^ cf),
                )
            }
            Mnemonic::Shr => {
                let r = v >> cnt;
                let cf = bit(v, cnt - 1);
                let of = bit(r ^ (r << 1), bits - 1);
                (r, ARITH_FLAGS, szp(size, r) | cf_flag(cf) | of_flag(of))
            }
            _ => {
                // SAR
                let sv = super::int::sext(v, size);
                let r = (sv >> cnt) as u64 & mask;
                let cf = ((sv >> (cnt - 1)) & 1) as u64;
                (r, ARITH_FLAGS, szp(size, r) | cf_flag(cf))
            }
        };
        self.loc_write(dst, size, res)?;
        self.s.set_arith_flags(fmask, fl);
        Ok(())
    }

    /// SHLD/SHRD r/m, reg, imm8/CL. For a 16-bit operand and a count above 16 (an
    /// undefined result) the operand bits are fed in again after the source, as the
    /// P6 family does: the shifted pattern is `dst:src:dst`.
    pub(crate) fn shift_double(&mut self, i: &Instruction, m: Mnemonic) -> Res<()> {
        let size = self.op_size(i, 0);
        let bits = size * 8;
        let mask = size_mask(size);
        let dst = self.loc(i, 0);
        let v = self.loc_read_rmw(dst, size)?;
        let src = self.read_op(i, 1)? & mask;
        let cnt = (self.read_op(i, 2)? & 0x1f) as u32;
        if cnt == 0 {
            return self.probe_loc_write(dst, size);
        }
        let (r, cf) = if m == Mnemonic::Shld {
            // Pattern, most significant first: dst, src (, dst).
            let (x, w): (u128, u32) = if size == 4 {
                (((v as u128) << 32) | src as u128, 64)
            } else {
                (((v as u128) << 32) | ((src as u128) << 16) | v as u128, 48)
            };
            let r = ((x >> (w - bits - cnt)) as u64) & mask;
            (r, ((x >> (w - cnt)) & 1) as u64)
        } else {
            // Pattern, least significant first: dst, src (, dst).
            let x: u128 = if size == 4 {
                ((src as u128) << 32) | v as u128
            } else {
                ((v as u128) << 32) | ((src as u128) << 16) | v as u128
            };
            (((x >> cnt) as u64) & mask, ((x >> (cnt - 1)) & 1) as u64)
        };
        let sb = sign_bit(size);
        let mut fl = szp(size, r);
        if cf != 0 {
            fl |= CF;
        }
        if (r ^ v) & sb != 0 {
            fl |= OF;
        }
        self.loc_write(dst, size, r)?;
        self.s.set_arith_flags(ARITH_FLAGS, fl);
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use crate::state::*;

    #[test]
    fn shl_shr_sar_flags() {
        // shl al, 1 of 0x80: 0, CF=1, OF = MSB(result) ^ CF = 1.
        let mut c = real(&[0xd0, 0xe0]);
        c.s.gpr[reg::RAX] = 0x80;
        run(&mut c, 1);
        assert_eq!(c.s.gpr[reg::RAX], 0);
        assert_eq!(aflags(&c) & !AF, CF | OF | ZF | PF);

        // shr ax, 1 of 0x8001: 0x4000, CF=1, OF = old MSB = 1.
        let mut c = real(&[0xd1, 0xe8]);
        c.s.gpr[reg::RAX] = 0x8001;
        run(&mut c, 1);
        assert_eq!(c.s.gpr[reg::RAX], 0x4000);
        assert_eq!(aflags(&c) & !AF, CF | OF | PF);

        // sar al, 7 of 0x80: 0xff, CF = bit 6 = 0, OF = 0.
        let mut c = real(&[0xc0, 0xf8, 0x07]);
        c.s.gpr[reg::RAX] = 0x80;
        run(&mut c, 1);
        assert_eq!(c.s.gpr[reg::RAX], 0xff);
        assert_eq!(aflags(&c) & !AF, SF | PF);
    }

    #[test]
    fn count_masking_and_zero_count() {
        // shr ax, cl with CL = 0: nothing changes, flags included.
        let mut c = real(&[0xd3, 0xe8]);
        c.s.gpr[reg::RAX] = 0x1234;
        c.s.set_eflags(FLAG_1 | CF | OF | ZF);
        run(&mut c, 1);
        assert_eq!(c.s.gpr[reg::RAX], 0x1234);
        assert_eq!(c.s.eflags(), FLAG_1 | CF | OF | ZF);

        // shl eax, cl with CL = 33 shifts by 1 (count masked to 5 bits).
        let mut c = flat32(&[0xd3, 0xe0]);
        c.s.gpr[reg::RAX] = 0x4000_0001;
        c.s.gpr[reg::RCX] = 33;
        run(&mut c, 1);
        assert_eq!(c.s.gpr[reg::RAX], 0x8000_0002);
        assert!(!c.s.get_cf() && c.s.get_of());

        // shl al, cl with CL = 9: result 0 and CF 0 (everything shifted out).
        let mut c = real(&[0xd2, 0xe0]);
        c.s.gpr[reg::RAX] = 0xff;
        c.s.gpr[reg::RCX] = 9;
        run(&mut c, 1);
        assert_eq!(c.s.gpr[reg::RAX], 0);
        assert!(!c.s.get_cf() && c.s.get_zf());
    }

    #[test]
    fn zero_count_still_checks_write_access() {
        // shl byte [ebx], 0 in a read-only DS: #GP(0) although nothing would change.
        let mut c = flat32(&[0xc0, 0x23, 0x00]);
        c.s.seg[SegReg::Ds as usize].attrs &= !ATTR_RW;
        c.s.gpr[reg::RBX] = 0x3000;
        let e = c.s.eflags();
        assert_eq!(exec(&mut c).unwrap_err().vector, crate::exception::vec::GP);
        assert_eq!(c.s.eflags(), e);
    }

    #[test]
    fn rotates() {
        // rcl ax, cl with CL = 17: a full turn of the 17-bit ring; AX and CF stay.
        let mut c = real(&[0xd3, 0xd0]);
        c.s.gpr[reg::RAX] = 0x8001;
        c.s.gpr[reg::RCX] = 17;
        run(&mut c, 1);
        assert_eq!(c.s.gpr[reg::RAX], 0x8001);
        assert!(!c.s.get_cf());

        // rcl ax, cl with CL = 16 = one step right in the 17-bit ring.
        let mut c = real(&[0xd3, 0xd0]);
        c.s.gpr[reg::RAX] = 0x8001;
        c.s.gpr[reg::RCX] = 16;
        run(&mut c, 1);
        assert_eq!(c.s.gpr[reg::RAX], 0x4000);
        assert!(c.s.get_cf());

        // rcr al, 1 of 0x01 with CF: 0x80, CF=1, OF = top two bits differ = 1.
        let mut c = real(&[0xd0, 0xd8]);
        c.s.gpr[reg::RAX] = 0x01;
        c.s.set_flag(CF, true);
        run(&mut c, 1);
        assert_eq!(c.s.gpr[reg::RAX], 0x80);
        assert!(c.s.get_cf() && c.s.get_of());

        // rol al, 8: value unchanged, CF = LSB = 1, OF = MSB ^ CF = 0; ZF untouched.
        let mut c = real(&[0xc0, 0xc0, 0x08]);
        c.s.gpr[reg::RAX] = 0x81;
        c.s.set_flag(ZF, true);
        run(&mut c, 1);
        assert_eq!(c.s.gpr[reg::RAX], 0x81);
        assert!(c.s.get_cf() && !c.s.get_of() && c.s.get_zf());

        // ror eax, 4.
        let mut c = flat32(&[0xc1, 0xc8, 0x04]);
        c.s.gpr[reg::RAX] = 0x1234_5678;
        run(&mut c, 1);
        assert_eq!(c.s.gpr[reg::RAX], 0x8123_4567);
        assert!(c.s.get_cf());
    }

    #[test]
    fn double_shifts() {
        // shld eax, ebx, 4 and shrd ecx, ebx, 4.
        let mut c = flat32(&[0x0f, 0xa4, 0xd8, 0x04, 0x0f, 0xac, 0xd9, 0x04]);
        c.s.gpr[reg::RAX] = 0x1234_5678;
        c.s.gpr[reg::RBX] = 0x9abc_def0;
        c.s.gpr[reg::RCX] = 0x1234_5678;
        run(&mut c, 1);
        assert_eq!(c.s.gpr[reg::RAX], 0x2345_6789);
        assert!(c.s.get_cf()); // bit 28 of 0x12345678
        run(&mut c, 1);
        assert_eq!(c.s.gpr[reg::RCX], 0x0123_4567);
        assert!(c.s.get_cf()); // bit 3 of 0x12345678
                               // shld ax, bx, cl with CL = 1 (16-bit): OF when the sign changes.
        let mut c = real(&[0x0f, 0xa5, 0xd8]);
        c.s.gpr[reg::RAX] = 0x4000;
        c.s.gpr[reg::RBX] = 0x8000;
        c.s.gpr[reg::RCX] = 1;
        run(&mut c, 1);
        assert_eq!(c.s.gpr[reg::RAX], 0x8001);
        assert!(c.s.get_of() && !c.s.get_cf());
    }
}
