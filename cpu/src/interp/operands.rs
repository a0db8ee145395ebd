//! Operand access shared by all instruction groups: registers by iced `Register`,
//! effective addresses, and generic read/write of an instruction's operand `n`.

use crate::exception::Res;
use crate::state::SegReg;
use crate::Cpu;
use iced_x86::{Instruction, OpKind, Register};

/// Where an iced general-purpose register lives: (GPR index, size in bytes, high byte).
#[inline]
pub(crate) fn gpr_of(r: Register) -> (usize, u32, bool) {
    let n = r.number();
    match r.size() {
        1 => {
            if (4..8).contains(&n) && r.is_gpr8() {
                (n - 4, 1, true)
            } else if n >= 8 {
                (n - 4, 1, false)
            } else {
                (n, 1, false)
            }
        }
        s => (n, s as u32, false),
    }
}

/// The segment register an iced segment `Register` names.
#[inline]
pub(crate) fn sreg_of(r: Register) -> SegReg {
    match r {
        Register::ES => SegReg::Es,
        Register::CS => SegReg::Cs,
        Register::SS => SegReg::Ss,
        Register::FS => SegReg::Fs,
        Register::GS => SegReg::Gs,
        _ => SegReg::Ds,
    }
}

impl Cpu {
    /// Reads a general-purpose register (zero-extended).
    #[inline]
    pub(crate) fn reg_read(&self, r: Register) -> u64 {
        let (n, size, high) = gpr_of(r);
        if high {
            (self.s.gpr[n] >> 8) & 0xff
        } else {
            self.s.reg_sized(n, size)
        }
    }

    /// Writes a general-purpose register at its own size (32-bit writes clear bits 32-63).
    #[inline]
    pub(crate) fn reg_write(&mut self, r: Register, v: u64) {
        let (n, size, high) = gpr_of(r);
        if high {
            self.s.gpr[n] = (self.s.gpr[n] & !0xff00) | ((v & 0xff) << 8);
        } else {
            self.s.set_reg_sized(n, size, v);
        }
    }

    /// Address size of the instruction's memory operand, in bytes (2 or 4).
    #[inline]
    pub(crate) fn addr_size(&self, i: &Instruction) -> u32 {
        let b = i.memory_base();
        if b != Register::None {
            return b.size() as u32;
        }
        let x = i.memory_index();
        if x != Register::None {
            return x.size() as u32;
        }
        match i.memory_displ_size() {
            2 => 2,
            4 | 8 => 4,
            _ => {
                if self.s.code32() {
                    4
                } else {
                    2
                }
            }
        }
    }

    /// The offset (effective address) of the instruction's memory operand, truncated to
    /// the address size.
    #[inline]
    pub(crate) fn ea(&self, i: &Instruction) -> u32 {
        let mut a = i.memory_displacement64();
        let b = i.memory_base();
        if b != Register::None {
            a = a.wrapping_add(self.reg_read(b));
        }
        let x = i.memory_index();
        if x != Register::None {
            a = a.wrapping_add(self.reg_read(x).wrapping_mul(i.memory_index_scale() as u64));
        }
        if self.addr_size(i) == 2 {
            (a & 0xffff) as u32
        } else {
            a as u32
        }
    }

    /// The segment of the instruction's memory operand (override or default).
    #[inline]
    pub(crate) fn mem_seg(&self, i: &Instruction) -> SegReg {
        sreg_of(i.memory_segment())
    }

    /// Size in bytes of operand `n`.
    #[inline]
    pub(crate) fn op_size(&self, i: &Instruction, n: u32) -> u32 {
        match i.op_kind(n) {
            OpKind::Register => i.op_register(n).size() as u32,
            OpKind::Memory => i.memory_size().size() as u32,
            OpKind::Immediate8 | OpKind::Immediate8_2nd => 1,
            OpKind::Immediate16 | OpKind::Immediate8to16 => 2,
            OpKind::Immediate32 | OpKind::Immediate8to32 => 4,
            _ => 8,
        }
    }

    /// Reads operand `n` (register, immediate or memory), zero-extended to 64 bits.
    #[inline]
    pub(crate) fn read_op(&mut self, i: &Instruction, n: u32) -> Res<u64> {
        match i.op_kind(n) {
            OpKind::Register => Ok(self.reg_read(i.op_register(n))),
            OpKind::Memory => {
                let size = i.memory_size().size() as u32;
                let off = self.ea(i);
                self.read_mem(self.mem_seg(i), off, size)
            }
            OpKind::Immediate8 => Ok(i.immediate8() as u64),
            OpKind::Immediate8_2nd => Ok(i.immediate8_2nd() as u64),
            OpKind::Immediate16 => Ok(i.immediate16() as u64),
            OpKind::Immediate32 => Ok(i.immediate32() as u64),
            OpKind::Immediate8to16 => Ok(i.immediate8to16() as u16 as u64),
            OpKind::Immediate8to32 => Ok(i.immediate8to32() as u32 as u64),
            k => {
                log::warn!("read_op: unexpected operand kind {k:?} in {:?}", i.code());
                Err(crate::Exception::ud())
            }
        }
    }

    /// Writes operand `n` (register or memory) at its size.
    #[inline]
    pub(crate) fn write_op(&mut self, i: &Instruction, n: u32, v: u64) -> Res<()> {
        match i.op_kind(n) {
            OpKind::Register => {
                self.reg_write(i.op_register(n), v);
                Ok(())
            }
            OpKind::Memory => {
                let size = i.memory_size().size() as u32;
                let off = self.ea(i);
                self.write_mem(self.mem_seg(i), off, size, v)
            }
            k => {
                log::warn!("write_op: unexpected operand kind {k:?} in {:?}", i.code());
                Err(crate::Exception::ud())
            }
        }
    }

    /// Operand size of the instruction in bytes, taken from operand 0 (2 or 4 for most).
    #[inline]
    pub(crate) fn osize(&self, i: &Instruction) -> u32 {
        self.op_size(i, 0)
    }
}
