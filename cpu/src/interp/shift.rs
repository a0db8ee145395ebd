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

/// Bit `n` of `v` as 0 or 1.
#[inline]
fn bit(v: u64, n: u32) -> u64 {
    (v >> n) & 1
}

impl Cpu {
    /// ROL ROR RCL RCR SHL SAL SHR SAR by 1, CL or imm8.
    pub(crate) fn shift(&mut self, i: &Instruction, m: Mnemonic) -> Res<()> {
        let size = self.op_size(i, 0);
        let bits = size * 8;
        let mask = size_mask(size);
        let dst = self.loc(i, 0);
        let v = self.loc_read(dst, size)?;
        let cnt = (self.read_op(i, 1)? & 0x1f) as u32;
        if cnt == 0 {
            return Ok(());
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
        let v = self.loc_read(dst, size)?;
        let src = self.read_op(i, 1)? & mask;
        let cnt = (self.read_op(i, 2)? & 0x1f) as u32;
        if cnt == 0 {
            return Ok(());
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
