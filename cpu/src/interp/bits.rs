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
        let v = if m == Mnemonic::Bt {
            self.loc_read(l, size)?
        } else {
            self.loc_read_rmw(l, size)?
        };
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
        let a = self.loc_read_rmw(l, size)?;
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
        let d = self.loc_read_rmw(l, size)?;
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
        let v = self.loc_read_rmw(Loc::Mem(seg, off), 8)?;
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

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use crate::exception::vec;
    use crate::state::*;

    #[test]
    fn bit_test_register_and_immediate() {
        // bt eax, ebx with EBX = 36 tests bit 4; bts ecx, 31; btr/btc by immediate.
        let mut c = flat32(&[
            0x0f, 0xa3, 0xd8, // bt eax, ebx
            0x0f, 0xba, 0xe9, 0x1f, // bts ecx, 31
            0x0f, 0xba, 0x33, 0x25, // btr dword [ebx], 37 -> bit 5 of the same dword
            0x0f, 0xba, 0xfa, 0x00, // btc edx, 0
        ]);
        c.s.gpr[reg::RAX] = 0x10;
        c.s.gpr[reg::RBX] = 36;
        c.s.set_eflags(FLAG_1 | ZF);
        run(&mut c, 1);
        assert!(c.s.get_cf() && c.s.get_zf()); // ZF kept
        run(&mut c, 1);
        assert_eq!(c.s.gpr[reg::RCX], 0x8000_0000);
        assert!(!c.s.get_cf());
        c.s.gpr[reg::RBX] = 0x3000;
        poke(&mut c, 0x3000, 4, 0xff);
        run(&mut c, 1);
        assert_eq!(peek(&mut c, 0x3000, 4), 0xdf);
        assert!(c.s.get_cf());
        c.s.gpr[reg::RDX] = 0;
        run(&mut c, 1);
        assert_eq!(c.s.gpr[reg::RDX], 1);
        assert!(!c.s.get_cf());
    }

    #[test]
    fn bit_string_in_memory() {
        // bts [ebx], eax with EAX = 100: dword at EBX + 12, bit 4.
        let mut c = flat32(&[0x0f, 0xab, 0x03, 0x0f, 0xab, 0x03]);
        c.s.gpr[reg::RBX] = 0x3000;
        c.s.gpr[reg::RAX] = 100;
        run(&mut c, 1);
        assert_eq!(peek(&mut c, 0x300c, 4), 0x10);
        // EAX = -1: dword at EBX - 4, bit 31.
        c.s.gpr[reg::RAX] = 0xffff_ffff;
        run(&mut c, 1);
        assert_eq!(peek(&mut c, 0x2ffc, 4), 0x8000_0000);
        assert!(!c.s.get_cf());
        // 16-bit: bts [bx], ax with AX = -16: word at BX - 2, bit 0.
        let mut c = real(&[0x0f, 0xab, 0x07]);
        c.s.gpr[reg::RBX] = 0x100;
        c.s.gpr[reg::RAX] = 0xfff0;
        run(&mut c, 1);
        assert_eq!(peek(&mut c, REAL_DS + 0xfe, 2), 1);
    }

    #[test]
    fn bit_scans() {
        let mut c = flat32(&[0x0f, 0xbc, 0xc3, 0x0f, 0xbd, 0xcb, 0x0f, 0xbc, 0xd6]);
        c.s.gpr[reg::RBX] = 0x0001_0100;
        c.s.gpr[reg::RDX] = 0x5555;
        run(&mut c, 2);
        assert_eq!((c.s.gpr[reg::RAX], c.s.gpr[reg::RCX]), (8, 16));
        assert!(!c.s.get_zf());
        // A zero source sets ZF and leaves the destination.
        run(&mut c, 1);
        assert_eq!(c.s.gpr[reg::RDX], 0x5555);
        assert!(c.s.get_zf());
    }

    #[test]
    fn xadd_cmpxchg() {
        // xadd [ebx], eax.
        let mut c = flat32(&[0x0f, 0xc1, 0x03, 0x0f, 0xb1, 0x0b, 0x0f, 0xb1, 0x0b]);
        c.s.gpr[reg::RBX] = 0x3000;
        c.s.gpr[reg::RAX] = 5;
        poke(&mut c, 0x3000, 4, 0xffff_ffff);
        run(&mut c, 1);
        assert_eq!(
            (peek(&mut c, 0x3000, 4), c.s.gpr[reg::RAX]),
            (4, 0xffff_ffff)
        );
        assert!(c.s.get_cf());
        // cmpxchg [ebx], ecx: EAX (0xffffffff) != 4 -> EAX = 4, ZF = 0.
        c.s.gpr[reg::RCX] = 77;
        run(&mut c, 1);
        assert_eq!((c.s.gpr[reg::RAX], peek(&mut c, 0x3000, 4)), (4, 4));
        assert!(!c.s.get_zf());
        // Again: equal now -> [ebx] = ECX, ZF = 1.
        run(&mut c, 1);
        assert_eq!(peek(&mut c, 0x3000, 4), 77);
        assert!(c.s.get_zf());
    }

    #[test]
    fn cmpxchg8b_forms() {
        let mut c = flat32(&[0x0f, 0xc7, 0x0f, 0x0f, 0xc7, 0x0f, 0x0f, 0xc7, 0xc8]);
        c.s.gpr[reg::RDI] = 0x3000;
        poke(&mut c, 0x3000, 8, 0x1111_2222_3333_4444);
        c.s.gpr[reg::RCX] = 0xaaaa;
        c.s.gpr[reg::RBX] = 0xbbbb;
        // Mismatch: EDX:EAX loaded from memory, ZF = 0.
        run(&mut c, 1);
        assert_eq!(
            (c.s.gpr[reg::RDX], c.s.gpr[reg::RAX]),
            (0x1111_2222, 0x3333_4444)
        );
        assert!(!c.s.get_zf());
        // Match: memory = ECX:EBX, ZF = 1.
        run(&mut c, 1);
        assert_eq!(peek(&mut c, 0x3000, 8), 0xaaaa_0000_bbbb);
        assert!(c.s.get_zf());
        // Register operand: #UD.
        assert_eq!(exec(&mut c).unwrap_err().vector, vec::UD);
    }
}
