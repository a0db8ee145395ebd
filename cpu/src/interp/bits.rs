//! Bit instructions and the atomic read-modify-writes: BT BTS BTR BTC, BSF BSR,
//! XADD, CMPXCHG, CMPXCHG8B.
//!
//! BT* with a register bit offset and a memory operand address a bit string: the
//! signed offset selects an operand-sized word at `ea + (offset >> log2(bits)) * size`
//! (wrapping at the address size). With an immediate the offset is taken modulo the
//! operand width. Only CF is changed; OF/SF/AF/PF (undefined) and ZF are kept.
//! BSF/BSR of zero set ZF and leave the destination unchanged (as Intel and AMD parts do).

use crate::exception::{Exception, Res};
use crate::flags::{size_mask, FlagOp};
use crate::state::*;
use crate::Cpu;
use iced_x86::{Instruction, Mnemonic, OpKind};

use super::int::{sext, Loc};

impl Cpu {
    /// BT BTS BTR BTC.
    pub(crate) fn bit_test(&mut self, i: &Instruction, m: Mnemonic) -> Res<()> {
        let size = self.op_size(i, 0);
        let bits = size * 8;
        let off = self.read_op(i, 1)?;
        let (l, b) = if i.op0_kind() == OpKind::Register {
            (Loc::Reg(i.op0_register()), off as u32 & (bits - 1))
        } else if i.op1_kind() != OpKind::Register {
            (
                Loc::Mem(self.mem_seg(i), self.ea(i)),
                off as u32 & (bits - 1),
            )
        } else {
            let s = sext(off, size);
            let disp = (s >> bits.trailing_zeros()).wrapping_mul(size as i64);
            let a = (self.ea(i) as i64).wrapping_add(disp) as u32;
            let a = if self.addr_size(i) == 2 {
                a & 0xffff
            } else {
                a
            };
            (Loc::Mem(self.mem_seg(i), a), s as u32 & (bits - 1))
        };
        let v = self.loc_read(l, size)?;
        let cf = (v >> b) & 1 != 0;
        let nv = match m {
            Mnemonic::Bts => v | (1 << b),
            Mnemonic::Btr => v & !(1 << b),
            Mnemonic::Btc => v ^ (1 << b),
            _ => v,
        };
        if m != Mnemonic::Bt {
            self.loc_write(l, size, nv)?;
        }
        self.s.set_flag(CF, cf);
        Ok(())
    }

    /// BSF and BSR.
    pub(crate) fn bit_scan(&mut self, i: &Instruction, m: Mnemonic) -> Res<()> {
        let size = self.op_size(i, 0);
        let v = self.read_op(i, 1)? & size_mask(size);
        if v == 0 {
            self.s.set_flag(ZF, true);
            return Ok(());
        }
        let n = if m == Mnemonic::Bsf {
            v.trailing_zeros()
        } else {
            63 - v.leading_zeros()
        };
        self.write_op(i, 0, n as u64)?;
        self.s.set_flag(ZF, false);
        Ok(())
    }

    /// XADD r/m, reg: TEMP = dst + src; src = dst; dst = TEMP.
    pub(crate) fn xadd(&mut self, i: &Instruction) -> Res<()> {
        let size = self.op_size(i, 0);
        let mask = size_mask(size);
        let l = self.loc(i, 0);
        let a = self.loc_read(l, size)?;
        let b = self.reg_read(i.op1_register());
        let r = a.wrapping_add(b) & mask;
        if let Loc::Mem(..) = l {
            self.loc_write(l, size, r)?;
            self.reg_write(i.op1_register(), a);
        } else {
            self.reg_write(i.op1_register(), a);
            self.loc_write(l, size, r)?;
        }
        self.s.set_lazy_flags(FlagOp::Add, size, r, a, b, false);
        Ok(())
    }

    /// CMPXCHG r/m, reg: compares the accumulator with the destination. The
    /// destination is written in both cases (with its own value when they differ).
    pub(crate) fn cmpxchg(&mut self, i: &Instruction) -> Res<()> {
        let size = self.op_size(i, 0);
        let mask = size_mask(size);
        let l = self.loc(i, 0);
        let d = self.loc_read(l, size)?;
        let acc = self.s.gpr[reg::RAX] & mask;
        let src = self.reg_read(i.op1_register());
        if acc == d {
            self.loc_write(l, size, src)?;
        } else {
            if let Loc::Mem(..) = l {
                self.loc_write(l, size, d)?;
            }
            self.s.set_reg_sized(reg::RAX, size, d);
        }
        self.s
            .set_lazy_flags(FlagOp::Sub, size, acc.wrapping_sub(d) & mask, acc, d, false);
        Ok(())
    }

    /// CMPXCHG8B m64 (a register operand is #UD).
    pub(crate) fn cmpxchg8b(&mut self, i: &Instruction) -> Res<()> {
        if i.op0_kind() != OpKind::Memory {
            return Err(Exception::ud());
        }
        let seg = self.mem_seg(i);
        let off = self.ea(i);
        let v = self.read_mem(seg, off, 8)?;
        let cmp = (self.s.gpr[reg::RDX] & 0xffff_ffff) << 32 | (self.s.gpr[reg::RAX] & 0xffff_ffff);
        if v == cmp {
            let n =
                (self.s.gpr[reg::RCX] & 0xffff_ffff) << 32 | (self.s.gpr[reg::RBX] & 0xffff_ffff);
            self.write_mem(seg, off, 8, n)?;
            self.s.set_flag(ZF, true);
        } else {
            self.write_mem(seg, off, 8, v)?;
            self.s.set_r32(reg::RAX, v as u32);
            self.s.set_r32(reg::RDX, (v >> 32) as u32);
            self.s.set_flag(ZF, false);
        }
        Ok(())
    }
}
