//! Operand access shared by all instruction groups: registers by iced `Register`,
//! effective addresses, and generic read/write of an instruction's operand `n`.

use crate::exception::Res;
use crate::state::SegReg;
use crate::Cpu;
use iced_x86::{Instruction, OpKind, Register};

/// Where an iced general-purpose register lives: (GPR index, size in bytes, high byte).
#[inline(always)]
pub(crate) fn gpr_of(r: Register) -> (usize, u32, bool) {
    let e = GPR_TABLE[r as usize];
    if e != 0 {
        ((e & 0xf) as usize, ((e >> 4) & 0xf) as u32, e & 0x100 != 0)
    } else {
        gpr_of_slow(r)
    }
}

/// [`gpr_of`] for registers outside the table (not general-purpose registers).
#[cold]
#[inline(never)]
fn gpr_of_slow(r: Register) -> (usize, u32, bool) {
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

/// [`gpr_of`] precomputed for every iced `Register` value: bits 0-3 the GPR index,
/// bits 4-7 the size in bytes, bit 8 "high byte" (AH..BH); 0 for registers that are
/// not general-purpose. Built from iced's register numbering (AL..BL, AH..BH,
/// SPL..R15L, AX..R15W, EAX..R15D, RAX..R15 in that order); a unit test checks it
/// against iced's own `number()`/`size()` for every register.
static GPR_TABLE: [u16; 256] = build_gpr_table();

/// How to read and write one iced GPR without branching on its size.
#[derive(Clone, Copy)]
struct GprAccess {
    /// Bits of the register within its 64-bit GPR, after shifting down by `shift`
    /// (0 for registers that are not general-purpose).
    mask: u64,
    /// Bits of the 64-bit GPR a write keeps: those outside the register, except that a
    /// 32-bit write clears bits 32-63 (so 0 for the 32-bit registers).
    keep: u64,
    /// GPR index.
    index: u8,
    /// 8 for AH..BH, else 0.
    shift: u8,
}

/// [`GprAccess`] for every iced `Register` value, derived from [`GPR_TABLE`].
static GPR_ACCESS: [GprAccess; 256] = build_gpr_access();

const fn build_gpr_access() -> [GprAccess; 256] {
    let mut t = [GprAccess {
        mask: 0,
        keep: 0,
        index: 0,
        shift: 0,
    }; 256];
    let mut r = 0usize;
    while r < 256 {
        let e = GPR_TABLE[r];
        if e != 0 {
            let size = (e >> 4) & 0xf;
            let shift = if e & 0x100 != 0 { 8 } else { 0 };
            let mask = if size == 8 {
                u64::MAX
            } else {
                (1u64 << (size * 8)) - 1
            };
            let keep = if size == 4 { 0 } else { !(mask << shift) };
            t[r] = GprAccess {
                mask,
                keep,
                index: (e & 0xf) as u8,
                shift,
            };
        }
        r += 1;
    }
    t
}

const fn build_gpr_table() -> [u16; 256] {
    let mut t = [0u16; 256];
    let mut k = 0usize;
    while k < 16 {
        // AL, CL, DL, BL then SPL..R15L (AH..BH sit between them).
        if k < 4 {
            t[Register::AL as usize + k] = k as u16 | (1 << 4);
            t[Register::AH as usize + k] = k as u16 | (1 << 4) | 0x100;
        } else {
            t[Register::SPL as usize + k - 4] = k as u16 | (1 << 4);
        }
        t[Register::AX as usize + k] = k as u16 | (2 << 4);
        t[Register::EAX as usize + k] = k as u16 | (4 << 4);
        t[Register::RAX as usize + k] = k as u16 | (8 << 4);
        k += 1;
    }
    t
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
    #[inline(always)]
    pub(crate) fn reg_read(&self, r: Register) -> u64 {
        let a = &GPR_ACCESS[r as usize];
        if a.mask != 0 {
            (self.s.gpr[a.index as usize & 15] >> a.shift) & a.mask
        } else {
            self.reg_read_slow(r)
        }
    }

    /// [`Cpu::reg_read`] for a register outside [`GPR_ACCESS`].
    #[cold]
    #[inline(never)]
    fn reg_read_slow(&self, r: Register) -> u64 {
        let (n, size, high) = gpr_of(r);
        if high {
            (self.s.gpr[n] >> 8) & 0xff
        } else {
            self.s.reg_sized(n, size)
        }
    }

    /// Writes a general-purpose register at its own size (32-bit writes clear bits 32-63).
    #[inline(always)]
    pub(crate) fn reg_write(&mut self, r: Register, v: u64) {
        let a = &GPR_ACCESS[r as usize];
        if a.mask != 0 {
            let g = &mut self.s.gpr[a.index as usize & 15];
            *g = (*g & a.keep) | ((v & a.mask) << a.shift);
        } else {
            self.reg_write_slow(r, v)
        }
    }

    /// [`Cpu::reg_write`] for a register outside [`GPR_ACCESS`].
    #[cold]
    #[inline(never)]
    fn reg_write_slow(&mut self, r: Register, v: u64) {
        let (n, size, high) = gpr_of(r);
        if high {
            self.s.gpr[n] = (self.s.gpr[n] & !0xff00) | ((v & 0xff) << 8);
        } else {
            self.s.set_reg_sized(n, size, v);
        }
    }

    /// Address size of the instruction's memory operand, in bytes (2 or 4).
    #[inline(always)]
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
    #[inline(always)]
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
    #[inline(always)]
    pub(crate) fn mem_seg(&self, i: &Instruction) -> SegReg {
        sreg_of(i.memory_segment())
    }

    /// Size in bytes of operand `n`.
    #[inline(always)]
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
    #[inline(always)]
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
    #[inline(always)]
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
    #[inline(always)]
    pub(crate) fn osize(&self, i: &Instruction) -> u32 {
        self.op_size(i, 0)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The table agrees with iced's own register metadata for every GPR.
    #[test]
    fn gpr_table_matches_iced() {
        let mut seen = 0;
        for r in Register::values() {
            if !r.is_gpr() {
                assert_eq!(GPR_TABLE[r as usize], 0, "{r:?}");
                continue;
            }
            seen += 1;
            let n = r.number();
            let want = if r.size() == 1 && (4..8).contains(&n) && r.is_gpr8() {
                // iced numbers AH..BH 4..7 and SPL..DIL 8..11.
                (n - 4, 1, true)
            } else if r.size() == 1 && n >= 8 {
                (n - 4, 1, false)
            } else {
                (n, r.size() as u32, false)
            };
            assert_eq!(gpr_of(r), want, "{r:?}");
        }
        assert_eq!(seen, 20 + 16 * 3);
        assert_eq!(gpr_of(Register::AH), (0, 1, true));
        assert_eq!(gpr_of(Register::BH), (3, 1, true));
        assert_eq!(gpr_of(Register::SPL), (4, 1, false));
        assert_eq!(gpr_of(Register::R15L), (15, 1, false));
        assert_eq!(gpr_of(Register::DI), (7, 2, false));
        assert_eq!(gpr_of(Register::ESP), (4, 4, false));
    }

    /// The table-driven register reads and writes give what the manuals say: a 32-bit
    /// write clears bits 32-63, 8- and 16-bit writes keep the other bits, AH..BH are
    /// bits 8-15; and agree with the size-matching slow path for every GPR.
    #[test]
    fn table_register_access_matches_slow_path() {
        let mut c = Cpu::new(morph86_mmu::Mmu::new(
            morph86_mmu::PhysMem::new(1 << 20).unwrap(),
        ));
        let pattern = 0x8877_6655_4433_2211u64;
        for r in Register::values().filter(|r| r.is_gpr()) {
            c.s.gpr = [pattern; 16];
            assert_eq!(c.reg_read(r), c.reg_read_slow(r), "{r:?}");
            c.reg_write(r, 0xffff_ffff_ffff_ffff);
            let fast = c.s.gpr;
            c.s.gpr = [pattern; 16];
            c.reg_write_slow(r, 0xffff_ffff_ffff_ffff);
            assert_eq!(fast, c.s.gpr, "{r:?}");
        }
        c.s.gpr[0] = pattern;
        assert_eq!(c.reg_read(Register::AH), 0x22);
        c.reg_write(Register::AH, 0x1ff);
        assert_eq!(c.s.gpr[0], 0x8877_6655_4433_ff11);
        c.reg_write(Register::AX, 0x1_2345);
        assert_eq!(c.s.gpr[0], 0x8877_6655_4433_2345);
        c.reg_write(Register::EAX, 0xdead_beef);
        assert_eq!(c.s.gpr[0], 0xdead_beef);
        c.s.gpr[15] = pattern;
        c.reg_write(Register::R15L, 0);
        assert_eq!(c.s.gpr[15], 0x8877_6655_4433_2200);
    }
}
