//! Instruction group: integer instructions (data movement, ALU, shifts, multiply and
//! divide, BCD, bit operations, port I/O).
//!
//! `exec_int` dispatches by mnemonic; the larger families live in `shift.rs`,
//! `muldiv.rs` and `bits.rs`. Read-modify-write instructions resolve their
//! destination once into a [`Loc`], read it, compute, write it, and only then set the
//! flags, so a faulting write leaves every register and flag as it was.

use crate::exception::{vec, Exception, Res};
use crate::flags::{size_mask, FlagOp};
use crate::state::*;
use crate::Cpu;
use iced_x86::{Code, Instruction, Mnemonic, OpKind, Register};

/// A resolved register-or-memory operand.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Loc {
    /// A general-purpose register (at its own size).
    Reg(Register),
    /// A memory location: segment and offset (already truncated to the address size).
    Mem(SegReg, u32),
}

/// Sign-extends the low `size` bytes of `v` to 64 bits.
#[inline]
pub(crate) fn sext(v: u64, size: u32) -> i64 {
    let sh = 64 - size * 8;
    ((v << sh) as i64) >> sh
}

impl Cpu {
    /// Resolves operand `n` (a register or memory operand) into a [`Loc`].
    #[inline(always)]
    pub(crate) fn loc(&self, i: &Instruction, n: u32) -> Loc {
        match i.op_kind(n) {
            OpKind::Register => Loc::Reg(i.op_register(n)),
            _ => Loc::Mem(self.mem_seg(i), self.ea(i)),
        }
    }

    /// Reads `size` bytes from a [`Loc`].
    #[inline(always)]
    pub(crate) fn loc_read(&mut self, l: Loc, size: u32) -> Res<u64> {
        match l {
            Loc::Reg(r) => Ok(self.reg_read(r)),
            Loc::Mem(s, off) => self.read_mem(s, off, size),
        }
    }

    /// Reads the destination of a read-modify-write: a memory operand gets the
    /// segment checks of a write (so a write to a read-only segment is #GP before any
    /// page fault of the read), then is read.
    #[inline(always)]
    pub(crate) fn loc_read_rmw(&mut self, l: Loc, size: u32) -> Res<u64> {
        match l {
            Loc::Reg(r) => Ok(self.reg_read(r)),
            Loc::Mem(s, off) => {
                let lin = self.seg_linear(s, off, size, true)?;
                self.read_lin(lin, size, self.user())
            }
        }
    }

    /// Writes `size` bytes to a [`Loc`].
    #[inline(always)]
    pub(crate) fn loc_write(&mut self, l: Loc, size: u32, v: u64) -> Res<()> {
        match l {
            Loc::Reg(r) => {
                self.reg_write(r, v);
                Ok(())
            }
            Loc::Mem(s, off) => self.write_mem(s, off, size, v),
        }
    }

    /// Executes the instruction if it belongs to this group.
    #[inline(never)]
    pub(crate) fn exec_int(&mut self, i: &Instruction) -> Option<Res<()>> {
        use Mnemonic as M;
        let m = i.mnemonic();
        Some(match m {
            M::Mov => return self.mov(i),
            M::Add | M::Or | M::Adc | M::Sbb | M::And | M::Sub | M::Xor | M::Cmp | M::Test => {
                self.alu2(i, m)
            }
            M::Inc | M::Dec | M::Neg | M::Not => self.alu1(i, m),
            M::Push => return self.push_op(i),
            M::Pop => return self.pop_op(i),
            M::Lea => {
                let v = self.ea(i) as u64;
                self.write_op(i, 0, v)
            }
            M::Movzx | M::Movsx => {
                let ss = self.op_size(i, 1);
                let v = self.read_op(i, 1);
                v.and_then(|v| {
                    let v = if m == M::Movsx { sext(v, ss) as u64 } else { v };
                    self.write_op(i, 0, v)
                })
            }
            M::Xchg => self.xchg(i),
            M::Pusha | M::Pushad => self.pusha(if m == M::Pushad { 4 } else { 2 }),
            M::Popa | M::Popad => self.popa(if m == M::Popad { 4 } else { 2 }),
            // Hint NOPs (0F 18-1F) never touch their memory operand.
            M::Nop
            | M::Pause
            | M::Reservednop
            | M::Prefetchnta
            | M::Prefetcht0
            | M::Prefetcht1
            | M::Prefetcht2 => Ok(()),
            M::Rol | M::Ror | M::Rcl | M::Rcr | M::Shl | M::Sal | M::Shr | M::Sar => {
                self.shift(i, m)
            }
            M::Shld | M::Shrd => self.shift_double(i, m),
            M::Mul | M::Imul => self.mul(i, m),
            M::Div | M::Idiv => self.div(i, m),
            M::Daa | M::Das | M::Aaa | M::Aas | M::Aam | M::Aad => self.bcd(i, m),
            M::Bt | M::Bts | M::Btr | M::Btc => self.bit_test(i, m),
            M::Bsf | M::Bsr => self.bit_scan(i, m),
            // F3 0F BC/BD are TZCNT/LZCNT on newer CPUs; a P6 ignores the REP prefix
            // and runs BSF/BSR (compilers emit `rep bsf` on purpose).
            M::Tzcnt => self.bit_scan(i, M::Bsf),
            M::Lzcnt => self.bit_scan(i, M::Bsr),
            M::Seto
            | M::Setno
            | M::Setb
            | M::Setae
            | M::Sete
            | M::Setne
            | M::Setbe
            | M::Seta
            | M::Sets
            | M::Setns
            | M::Setp
            | M::Setnp
            | M::Setl
            | M::Setge
            | M::Setle
            | M::Setg => {
                let c = self.s.cond(i.condition_code() as u8 - 1);
                self.write_op(i, 0, c as u64)
            }
            M::Cmovo
            | M::Cmovno
            | M::Cmovb
            | M::Cmovae
            | M::Cmove
            | M::Cmovne
            | M::Cmovbe
            | M::Cmova
            | M::Cmovs
            | M::Cmovns
            | M::Cmovp
            | M::Cmovnp
            | M::Cmovl
            | M::Cmovge
            | M::Cmovle
            | M::Cmovg => {
                // The source is read (and may fault) whatever the condition.
                self.read_op(i, 1).and_then(|v| {
                    if self.s.cond(i.condition_code() as u8 - 1) {
                        self.write_op(i, 0, v)
                    } else {
                        Ok(())
                    }
                })
            }
            M::Xadd => self.xadd(i),
            M::Cmpxchg => self.cmpxchg(i),
            M::Cmpxchg8b => self.cmpxchg8b(i),
            M::Cbw => {
                let v = sext(self.s.gpr[reg::RAX], 1) as u64;
                self.s.set_reg_sized(reg::RAX, 2, v);
                Ok(())
            }
            M::Cwde => {
                let v = sext(self.s.gpr[reg::RAX], 2) as u64;
                self.s.set_reg_sized(reg::RAX, 4, v);
                Ok(())
            }
            M::Cwd => {
                let v = if self.s.gpr[reg::RAX] & 0x8000 != 0 {
                    0xffff
                } else {
                    0
                };
                self.s.set_reg_sized(reg::RDX, 2, v);
                Ok(())
            }
            M::Cdq => {
                let v = if self.s.gpr[reg::RAX] & 0x8000_0000 != 0 {
                    0xffff_ffff
                } else {
                    0
                };
                self.s.set_reg_sized(reg::RDX, 4, v);
                Ok(())
            }
            M::Lahf => {
                // AH <- SF:ZF:0:AF:0:PF:1:CF.
                let f = self.s.eflags() & (SF | ZF | AF | PF | CF) | FLAG_1;
                self.s.set_r8(4, f as u8);
                Ok(())
            }
            M::Sahf => {
                let ah = self.s.r8(4) as u32;
                self.s.set_arith_flags(SF | ZF | AF | PF | CF, ah);
                Ok(())
            }
            M::Clc => {
                self.s.set_flag(CF, false);
                Ok(())
            }
            M::Stc => {
                self.s.set_flag(CF, true);
                Ok(())
            }
            M::Cmc => {
                let c = self.s.get_cf();
                self.s.set_flag(CF, !c);
                Ok(())
            }
            M::Cld => {
                self.s.set_flag(DF, false);
                Ok(())
            }
            M::Std => {
                self.s.set_flag(DF, true);
                Ok(())
            }
            M::Salc => {
                let v = if self.s.get_cf() { 0xff } else { 0 };
                self.s.set_r8(0, v);
                Ok(())
            }
            M::Xlatb => {
                let base = i.memory_base();
                let (b, amask) = if base.size() == 4 {
                    (self.s.gpr[reg::RBX], 0xffff_ffffu64)
                } else {
                    (self.s.gpr[reg::RBX], 0xffff)
                };
                let off = (b.wrapping_add(self.s.gpr[reg::RAX] & 0xff) & amask) as u32;
                let seg = self.mem_seg(i);
                self.read_mem(seg, off, 1)
                    .map(|v| self.s.set_r8(0, v as u8))
            }
            M::Bswap => {
                let r = i.op0_register();
                let v = if r.size() == 4 {
                    (self.reg_read(r) as u32).swap_bytes() as u64
                } else {
                    // BSWAP of a 16-bit register is undefined; P6-family parts clear it.
                    0
                };
                self.reg_write(r, v);
                Ok(())
            }
            M::Enter => self.enter(i),
            M::Leave => self.leave(i),
            M::Bound => self.bound(i),
            M::Ud0 | M::Ud1 | M::Ud2 => Err(Exception::ud()),
            M::In => self.in_op(i),
            M::Out => self.out_op(i),
            _ => return None,
        })
    }

    /// MOV between GPRs, memory and immediates, and MOV r/m,Sreg. MOV Sreg,r/m and
    /// MOV to/from control, debug and test registers belong to other groups.
    #[inline]
    fn mov(&mut self, i: &Instruction) -> Option<Res<()>> {
        let special = |r: Register| r.is_segment_register() || r.is_cr() || r.is_dr() || r.is_tr();
        if i.op0_kind() == OpKind::Register && special(i.op0_register()) {
            return None;
        }
        let v = if i.op1_kind() == OpKind::Register {
            let r = i.op1_register();
            if r.is_segment_register() {
                // A 32-bit register destination gets the selector zero-extended (P6).
                self.s.seg[super::operands::sreg_of(r) as usize].selector as u64
            } else if special(r) {
                return None;
            } else {
                self.reg_read(r)
            }
        } else {
            match self.read_op(i, 1) {
                Ok(v) => v,
                Err(e) => return Some(Err(e)),
            }
        };
        Some(self.write_op(i, 0, v))
    }

    /// Two-operand ALU instructions: ADD OR ADC SBB AND SUB XOR CMP TEST.
    #[inline]
    fn alu2(&mut self, i: &Instruction, m: Mnemonic) -> Res<()> {
        let size = self.osize(i);
        let mask = size_mask(size);
        let dst = self.loc(i, 0);
        let a = if matches!(m, Mnemonic::Cmp | Mnemonic::Test) {
            self.loc_read(dst, size)?
        } else {
            self.loc_read_rmw(dst, size)?
        };
        let b = self.read_op(i, 1)? & mask;
        let (op, res, cin, write) = match m {
            Mnemonic::Add => (FlagOp::Add, a.wrapping_add(b), false, true),
            Mnemonic::Adc => {
                let c = self.s.get_cf();
                (
                    FlagOp::Add,
                    a.wrapping_add(b).wrapping_add(c as u64),
                    c,
                    true,
                )
            }
            Mnemonic::Sub => (FlagOp::Sub, a.wrapping_sub(b), false, true),
            Mnemonic::Sbb => {
                let c = self.s.get_cf();
                (
                    FlagOp::Sub,
                    a.wrapping_sub(b).wrapping_sub(c as u64),
                    c,
                    true,
                )
            }
            Mnemonic::Cmp => (FlagOp::Sub, a.wrapping_sub(b), false, false),
            Mnemonic::And => (FlagOp::Logic, a & b, false, true),
            Mnemonic::Or => (FlagOp::Logic, a | b, false, true),
            Mnemonic::Xor => (FlagOp::Logic, a ^ b, false, true),
            _ => (FlagOp::Logic, a & b, false, false), // TEST
        };
        let res = res & mask;
        if write {
            self.loc_write(dst, size, res)?;
        }
        self.s.set_lazy_flags(op, size, res, a, b, cin);
        Ok(())
    }

    /// One-operand ALU instructions: INC DEC NEG NOT.
    #[inline]
    pub(super) fn alu1(&mut self, i: &Instruction, m: Mnemonic) -> Res<()> {
        let size = self.op_size(i, 0);
        let mask = size_mask(size);
        let dst = self.loc(i, 0);
        let a = self.loc_read_rmw(dst, size)?;
        match m {
            Mnemonic::Inc => {
                let r = a.wrapping_add(1) & mask;
                self.loc_write(dst, size, r)?;
                self.s.set_lazy_flags(FlagOp::Inc, size, r, a, 1, false);
            }
            Mnemonic::Dec => {
                let r = a.wrapping_sub(1) & mask;
                self.loc_write(dst, size, r)?;
                self.s.set_lazy_flags(FlagOp::Dec, size, r, a, 1, false);
            }
            Mnemonic::Neg => {
                let r = 0u64.wrapping_sub(a) & mask;
                self.loc_write(dst, size, r)?;
                self.s.set_lazy_flags(FlagOp::Sub, size, r, 0, a, false);
            }
            _ => self.loc_write(dst, size, !a & mask)?,
        }
        Ok(())
    }

    /// XCHG: the memory operand (if any) is written first.
    fn xchg(&mut self, i: &Instruction) -> Res<()> {
        let size = self.op_size(i, 0);
        let l0 = self.loc(i, 0);
        let l1 = self.loc(i, 1);
        let a = self.loc_read_rmw(l0, size)?;
        let b = self.loc_read_rmw(l1, size)?;
        if matches!(l1, Loc::Mem(..)) {
            self.loc_write(l1, size, a)?;
            self.loc_write(l0, size, b)
        } else {
            self.loc_write(l0, size, b)?;
            self.loc_write(l1, size, a)
        }
    }

    /// PUSH of a GPR, immediate, memory operand or segment register.
    pub(super) fn push_op(&mut self, i: &Instruction) -> Option<Res<()>> {
        let size = (-i.stack_pointer_increment()) as u32;
        Some(match i.op0_kind() {
            OpKind::Register => {
                let r = i.op0_register();
                if r.is_segment_register() {
                    let sel = self.s.seg[super::operands::sreg_of(r) as usize].selector;
                    self.push_sreg(size, sel)
                } else {
                    // PUSH SP/ESP pushes the value before the decrement (286 and later).
                    let v = self.reg_read(r);
                    self.push(size, v)
                }
            }
            _ => match self.read_op(i, 0) {
                Ok(v) => self.push(size, v),
                Err(e) => Err(e),
            },
        })
    }

    /// Pushes a selector: with a 32-bit operand size the stack moves by 4 but only the
    /// low 16 bits are written (P6 and later; the upper half keeps its old contents).
    fn push_sreg(&mut self, size: u32, sel: u16) -> Res<()> {
        if size == 2 {
            return self.push(2, sel as u64);
        }
        let sp = self.s.gpr[reg::RSP];
        let nsp = if self.s.stack32() {
            (sp as u32).wrapping_sub(4)
        } else {
            (sp as u16).wrapping_sub(4) as u32
        };
        self.probe_write_mem(SegReg::Ss, nsp, 4)?;
        self.write_mem(SegReg::Ss, nsp, 2, sel as u64)?;
        self.adjust_sp(-4);
        Ok(())
    }

    /// POP to a GPR or memory. POP to memory computes its address after the stack
    /// pointer has been incremented (so `pop [esp]` uses the new ESP).
    pub(super) fn pop_op(&mut self, i: &Instruction) -> Option<Res<()>> {
        let size = i.stack_pointer_increment() as u32;
        let kind = i.op0_kind();
        if kind == OpKind::Register && i.op0_register().is_segment_register() {
            return None;
        }
        let v = match self.peek_stack(0, size) {
            Ok(v) => v,
            Err(e) => return Some(Err(e)),
        };
        let old = self.s.gpr[reg::RSP];
        self.adjust_sp(size as i64);
        if kind == OpKind::Register {
            self.reg_write(i.op0_register(), v);
            return Some(Ok(()));
        }
        let r = self.write_op(i, 0, v);
        if r.is_err() {
            self.s.gpr[reg::RSP] = old;
        }
        Some(r)
    }

    /// PUSHA/PUSHAD: AX CX DX BX, the original SP, BP SI DI. On a fault SP is restored.
    fn pusha(&mut self, size: u32) -> Res<()> {
        let old = self.s.gpr[reg::RSP];
        for r in [
            reg::RAX,
            reg::RCX,
            reg::RDX,
            reg::RBX,
            reg::RSP,
            reg::RBP,
            reg::RSI,
            reg::RDI,
        ] {
            let v = if r == reg::RSP { old } else { self.s.gpr[r] };
            if let Err(e) = self.push(size, v & size_mask(size)) {
                self.s.gpr[reg::RSP] = old;
                return Err(e);
            }
        }
        Ok(())
    }

    /// POPA/POPAD: DI SI BP, (skipped SP), BX DX CX AX; all read before any is written.
    fn popa(&mut self, size: u32) -> Res<()> {
        let mut v = [0u64; 8];
        for (k, slot) in v.iter_mut().enumerate() {
            *slot = self.peek_stack(k as u32 * size, size)?;
        }
        for (k, r) in [
            reg::RDI,
            reg::RSI,
            reg::RBP,
            reg::RSP,
            reg::RBX,
            reg::RDX,
            reg::RCX,
            reg::RAX,
        ]
        .into_iter()
        .enumerate()
        {
            if r != reg::RSP {
                self.s.set_reg_sized(r, size, v[k]);
            }
        }
        self.adjust_sp(8 * size as i64);
        Ok(())
    }

    /// ENTER imm16, imm8 (all nesting levels, taken modulo 32).
    fn enter(&mut self, i: &Instruction) -> Res<()> {
        let size: u32 = if i.code() == Code::Enterd_imm16_imm8 {
            4
        } else {
            2
        };
        let alloc = i.immediate16() as u64;
        let level = (i.immediate8_2nd() & 31) as u32;
        let s32 = self.s.stack32();
        let wrap = |x: u64| if s32 { x & 0xffff_ffff } else { x & 0xffff };
        let vmask = size_mask(size);
        let mut sp = wrap(self.s.gpr[reg::RSP]);
        let mut bp = wrap(self.s.gpr[reg::RBP]);
        sp = wrap(sp.wrapping_sub(size as u64));
        self.write_mem(SegReg::Ss, sp as u32, size, self.s.gpr[reg::RBP] & vmask)?;
        let frame = sp;
        if level > 0 {
            for _ in 1..level {
                bp = wrap(bp.wrapping_sub(size as u64));
                let v = self.read_mem(SegReg::Ss, bp as u32, size)?;
                sp = wrap(sp.wrapping_sub(size as u64));
                self.write_mem(SegReg::Ss, sp as u32, size, v)?;
            }
            sp = wrap(sp.wrapping_sub(size as u64));
            self.write_mem(SegReg::Ss, sp as u32, size, frame & vmask)?;
        }
        sp = wrap(sp.wrapping_sub(alloc));
        // Like the hardware (seen on the host CPU), check a write at the final stack
        // pointer (limit, paging, alignment) after the pushes, before committing.
        self.probe_write_mem(SegReg::Ss, sp as u32, size)?;
        // (E)BP takes the frame at the operand size, (E)SP moves at the stack size.
        self.s.set_reg_sized(reg::RBP, size, frame);
        self.s.set_reg_sized(reg::RSP, if s32 { 4 } else { 2 }, sp);
        Ok(())
    }

    /// LEAVE: (E)SP <- (E)BP, then pop (E)BP.
    fn leave(&mut self, i: &Instruction) -> Res<()> {
        let size: u32 = if i.code() == Code::Leaved { 4 } else { 2 };
        let s32 = self.s.stack32();
        let bp = if s32 {
            self.s.r32(reg::RBP)
        } else {
            self.s.r16(reg::RBP) as u32
        };
        let v = self.read_mem(SegReg::Ss, bp, size)?;
        if s32 {
            self.s.set_r32(reg::RSP, bp.wrapping_add(size));
        } else {
            self.s
                .set_r16(reg::RSP, (bp as u16).wrapping_add(size as u16));
        }
        self.s.set_reg_sized(reg::RBP, size, v);
        Ok(())
    }

    /// BOUND r, m: #BR unless lower <= r <= upper (signed).
    fn bound(&mut self, i: &Instruction) -> Res<()> {
        let size = self.op_size(i, 0);
        let seg = self.mem_seg(i);
        let off = self.ea(i);
        let off2 = if self.addr_size(i) == 2 {
            (off + size) & 0xffff
        } else {
            off.wrapping_add(size)
        };
        let lo = sext(self.read_mem(seg, off, size)?, size);
        let hi = sext(self.read_mem(seg, off2, size)?, size);
        let v = sext(self.reg_read(i.op0_register()), size);
        if v < lo || v > hi {
            return Err(Exception::new(vec::BR));
        }
        Ok(())
    }

    /// The port of IN/OUT operand `n`: DX or an 8-bit immediate.
    #[inline]
    fn port_of(&self, i: &Instruction, n: u32) -> u16 {
        if i.op_kind(n) == OpKind::Register {
            self.s.gpr[reg::RDX] as u16
        } else {
            i.immediate8() as u16
        }
    }

    /// IN AL/AX/EAX, imm8/DX.
    fn in_op(&mut self, i: &Instruction) -> Res<()> {
        let size = self.op_size(i, 0);
        let port = self.port_of(i, 1);
        self.io_permission(port, size)?;
        let v = self.io.io_read(port, size as u8);
        self.reg_write(i.op0_register(), v as u64);
        Ok(())
    }

    /// OUT imm8/DX, AL/AX/EAX.
    fn out_op(&mut self, i: &Instruction) -> Res<()> {
        let size = self.op_size(i, 1);
        let port = self.port_of(i, 0);
        self.io_permission(port, size)?;
        let v = self.reg_read(i.op1_register());
        self.io.io_write(port, size as u8, v as u32);
        // Devices may have asked for a map change or DMA: done before the next instruction.
        self.mmu.phys.run_jobs();
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use crate::exception::vec;
    use crate::state::*;

    #[test]
    fn add_adc_sbb_flags() {
        // add eax, ebx: 0x7fffffff + 1 = 0x80000000 -> OF SF AF PF (low byte 0 is even).
        let mut c = flat32(&[0x01, 0xd8]);
        c.s.gpr[reg::RAX] = 0x7fff_ffff;
        c.s.gpr[reg::RBX] = 1;
        run(&mut c, 1);
        assert_eq!(c.s.gpr[reg::RAX], 0x8000_0000);
        assert_eq!(aflags(&c), OF | SF | AF | PF);

        // adc ax, bx: 0xffff + 0 + CF = 0 with carry.
        let mut c = real(&[0x11, 0xd8]);
        c.s.gpr[reg::RAX] = 0xffff;
        c.s.set_flag(CF, true);
        run(&mut c, 1);
        assert_eq!(c.s.gpr[reg::RAX], 0);
        assert_eq!(aflags(&c), CF | ZF | AF | PF);

        // sbb al, 1 with CF: 0 - 1 - 1 = 0xfe; 0xfe has seven ones -> PF clear.
        let mut c = real(&[0x1c, 0x01]);
        c.s.set_flag(CF, true);
        run(&mut c, 1);
        assert_eq!(c.s.gpr[reg::RAX] & 0xff, 0xfe);
        assert_eq!(aflags(&c), CF | AF | SF);
    }

    #[test]
    fn logic_cmp_neg_inc() {
        // cmp dword [ebx+ecx*4+8], 5 against 5: ZF PF, memory unchanged.
        let mut c = flat32(&[0x83, 0x7c, 0x8b, 0x08, 0x05]);
        c.s.gpr[reg::RBX] = 0x3000;
        c.s.gpr[reg::RCX] = 2;
        poke(&mut c, 0x3010, 4, 5);
        run(&mut c, 1);
        assert_eq!(aflags(&c), ZF | PF);
        assert_eq!(peek(&mut c, 0x3010, 4), 5);

        // neg eax of 0x80000000: stays, CF OF SF (PF: low byte 0).
        let mut c = flat32(&[0xf7, 0xd8, 0xf7, 0xd8]);
        c.s.gpr[reg::RAX] = 0x8000_0000;
        run(&mut c, 1);
        assert_eq!(c.s.gpr[reg::RAX], 0x8000_0000);
        assert_eq!(aflags(&c), CF | OF | SF | PF);
        c.s.gpr[reg::RAX] = 0;
        run(&mut c, 1);
        assert_eq!(aflags(&c), ZF | PF);

        // stc; inc eax from 0xffffffff: 0, CF kept.
        let mut c = flat32(&[0xf9, 0x40]);
        c.s.gpr[reg::RAX] = 0xffff_ffff;
        run(&mut c, 2);
        assert_eq!(c.s.gpr[reg::RAX], 0);
        assert_eq!(aflags(&c), CF | ZF | AF | PF);

        // xor al, 0x81 with AL=0x80 -> 1, all of CF OF AF clear; PF clear (one bit).
        let mut c = real(&[0x34, 0x81]);
        c.s.gpr[reg::RAX] = 0x1280;
        c.s.set_eflags(FLAG_1 | CF | OF | AF);
        run(&mut c, 1);
        assert_eq!(c.s.gpr[reg::RAX], 0x1201);
        assert_eq!(aflags(&c), 0);
    }

    #[test]
    fn faulting_write_leaves_state() {
        // add [ebx], eax with EBX past the 1 MiB limit: #GP(0), nothing changes.
        let mut c = flat32(&[0x01, 0x03]);
        c.s.gpr[reg::RBX] = 0x10_0000;
        c.s.gpr[reg::RAX] = 7;
        c.s.set_eflags(FLAG_1 | ZF);
        let e = exec(&mut c).unwrap_err();
        assert_eq!((e.vector, e.error_code()), (vec::GP, Some(0)));
        assert_eq!(c.s.eflags(), FLAG_1 | ZF);
        assert_eq!(c.s.rip, FLAT_CODE);
    }

    #[test]
    fn rmw_to_code_segment_is_gp() {
        // add cs:[ebx], eax: CS is readable but never writable -> #GP(0), no change.
        let mut c = flat32(&[0x2e, 0x01, 0x03]);
        c.s.gpr[reg::RBX] = 0x3000;
        poke(&mut c, 0x3000, 4, 1);
        let e = exec(&mut c).unwrap_err();
        assert_eq!((e.vector, e.error_code()), (vec::GP, Some(0)));
        assert_eq!(peek(&mut c, 0x3000, 4), 1);
        // cmp cs:[ebx], eax only reads: fine.
        let mut c = flat32(&[0x2e, 0x39, 0x03]);
        c.s.gpr[reg::RBX] = 0x3000;
        run(&mut c, 1);
    }

    #[test]
    fn lock_rules() {
        // LOCK with a register destination is #UD; with memory it is fine.
        let mut c = flat32(&[0xf0, 0x01, 0xd8]);
        assert_eq!(exec(&mut c).unwrap_err().vector, vec::UD);
        let mut c = flat32(&[0xf0, 0x01, 0x03]);
        c.s.gpr[reg::RBX] = 0x3000;
        c.s.gpr[reg::RAX] = 2;
        poke(&mut c, 0x3000, 4, 40);
        run(&mut c, 1);
        assert_eq!(peek(&mut c, 0x3000, 4), 42);
        // LOCK MOV is #UD as well.
        let mut c = flat32(&[0xf0, 0x89, 0x03]);
        assert_eq!(exec(&mut c).unwrap_err().vector, vec::UD);
    }

    #[test]
    fn moves_and_extensions() {
        // mov eax, ds zero-extends the selector; movzx/movsx; lea with 16-bit address.
        let mut c = flat32(&[
            0x8c, 0xd8, // mov eax, ds
            0x0f, 0xb6, 0xcb, // movzx ecx, bl
            0x0f, 0xbf, 0xd3, // movsx edx, bx
            0x67, 0x8d, 0xb7, 0x90, 0x00, // lea esi, [bx+0x90] (wraps at 64 KiB)
            0x0f, 0xcf, // bswap edi
            0xa1, 0x00, 0x30, 0x00, 0x00, // mov eax, [0x3000]
        ]);
        c.s.gpr[reg::RAX] = 0xffff_ffff;
        c.s.gpr[reg::RBX] = 0x1234_ff80;
        c.s.gpr[reg::RDI] = 0x1122_3344;
        poke(&mut c, 0x3000, 4, 0xdead_beef);
        run(&mut c, 1);
        assert_eq!(c.s.gpr[reg::RAX], 0x10);
        run(&mut c, 5);
        assert_eq!(c.s.gpr[reg::RCX], 0x80);
        assert_eq!(c.s.gpr[reg::RDX], 0xffff_ff80);
        assert_eq!(c.s.gpr[reg::RSI], 0x0010);
        assert_eq!(c.s.gpr[reg::RDI], 0x4433_2211);
        assert_eq!(c.s.gpr[reg::RAX], 0xdead_beef);
    }

    #[test]
    fn xchg_push_pop() {
        let mut c = flat32(&[
            0x87, 0x03, // xchg [ebx], eax
            0x54, // push esp
            0x8f, 0x04, 0x24, // pop dword [esp]
            0x6a, 0xfe, // push -2
            0x06, // push es
        ]);
        c.s.gpr[reg::RBX] = 0x3000;
        c.s.gpr[reg::RAX] = 0x1111;
        poke(&mut c, 0x3000, 4, 0x2222);
        run(&mut c, 1);
        assert_eq!(
            (c.s.gpr[reg::RAX], peek(&mut c, 0x3000, 4)),
            (0x2222, 0x1111)
        );
        run(&mut c, 1);
        assert_eq!(c.s.gpr[reg::RSP], 0x7ffc);
        assert_eq!(peek(&mut c, 0x7ffc, 4), 0x8000);
        // POP [ESP]: ESP is incremented first, so the value lands at the new ESP.
        run(&mut c, 1);
        assert_eq!(c.s.gpr[reg::RSP], 0x8000);
        assert_eq!(peek(&mut c, 0x8000, 4), 0x8000);
        run(&mut c, 1);
        assert_eq!(peek(&mut c, 0x7ffc, 4), 0xffff_fffe);
        // PUSH ES with a 32-bit operand: ESP moves by 4, the low word is written.
        poke(&mut c, 0x7ff8, 4, 0xaaaa_aaaa);
        run(&mut c, 1);
        assert_eq!(c.s.gpr[reg::RSP], 0x7ff8);
        assert_eq!(peek(&mut c, 0x7ff8, 2), 0x10);
    }

    #[test]
    fn pusha_popa_32() {
        let mut c = flat32(&[0x60, 0x61]);
        for (k, r) in c.s.gpr.iter_mut().take(8).enumerate() {
            *r = 0x100 * (k as u64 + 1);
        }
        c.s.gpr[reg::RSP] = 0x8000;
        run(&mut c, 1);
        assert_eq!(c.s.gpr[reg::RSP], 0x8000 - 32);
        // Memory from the top: EAX ECX EDX EBX ESP(orig) EBP ESI EDI.
        assert_eq!(peek(&mut c, 0x7ffc, 4), 0x100);
        assert_eq!(peek(&mut c, 0x7fec, 4), 0x8000);
        assert_eq!(peek(&mut c, 0x7fe0, 4), 0x800);
        poke(&mut c, 0x7fec, 4, 0x5555); // the popped ESP image is ignored
        c.s.gpr[reg::RAX] = 0;
        c.s.gpr[reg::RDI] = 0;
        run(&mut c, 1);
        assert_eq!(c.s.gpr[reg::RSP], 0x8000);
        assert_eq!((c.s.gpr[reg::RAX], c.s.gpr[reg::RDI]), (0x100, 0x800));
    }

    #[test]
    fn enter_leave_nested() {
        // enter 8, 2 then leave, 32-bit stack.
        let mut c = flat32(&[0xc8, 0x08, 0x00, 0x02, 0xc9]);
        c.s.gpr[reg::RBP] = 0x9000;
        poke(&mut c, 0x8ffc, 4, 0xaaaa);
        run(&mut c, 1);
        assert_eq!(peek(&mut c, 0x7ffc, 4), 0x9000); // old EBP
        assert_eq!(peek(&mut c, 0x7ff8, 4), 0xaaaa); // copied frame pointer
        assert_eq!(peek(&mut c, 0x7ff4, 4), 0x7ffc); // this frame
        assert_eq!(c.s.gpr[reg::RBP], 0x7ffc);
        assert_eq!(c.s.gpr[reg::RSP], 0x7fec);
        run(&mut c, 1);
        assert_eq!((c.s.gpr[reg::RSP], c.s.gpr[reg::RBP]), (0x8000, 0x9000));
    }

    #[test]
    fn enter_16bit_operand_and_final_slot_check() {
        // data16 enter 4, 0 on a 32-bit stack: BP gets the 16-bit frame, EBP's top stays.
        let mut c = flat32(&[0x66, 0xc8, 0x04, 0x00, 0x00, 0xc8, 0x03, 0x00, 0x00]);
        c.s.gpr[reg::RBP] = 0xabcd_1234;
        run(&mut c, 1);
        assert_eq!(peek(&mut c, 0x7ffe, 2), 0x1234);
        assert_eq!(c.s.gpr[reg::RBP], 0xabcd_7ffe);
        assert_eq!(c.s.gpr[reg::RSP], 0x7ffa);
        // enter 3, 0 at CPL 3 with alignment checking: the final ESP (0x7ff3) is
        // misaligned -> #AC(0), registers unchanged.
        c.s.cr0 |= CR0_AM;
        c.s.set_eflags(FLAG_1 | AC);
        c.s.cpl = 3;
        let e = exec(&mut c).unwrap_err();
        assert_eq!((e.vector, e.error_code()), (vec::AC, Some(0)));
        assert_eq!(
            (c.s.gpr[reg::RSP], c.s.gpr[reg::RBP]),
            (0x7ffa, 0xabcd_7ffe)
        );
    }

    #[test]
    fn bound_raises_br() {
        // bound ax, [bx] with bounds -5..10.
        let mut c = real(&[0x62, 0x07, 0x62, 0x07]);
        c.s.gpr[reg::RBX] = 0x100;
        poke(&mut c, REAL_DS + 0x100, 2, (-5i16) as u16 as u64);
        poke(&mut c, REAL_DS + 0x102, 2, 10);
        c.s.gpr[reg::RAX] = (-5i16) as u16 as u64;
        run(&mut c, 1);
        c.s.gpr[reg::RAX] = 11;
        assert_eq!(exec(&mut c).unwrap_err().vector, vec::BR);
        assert_eq!(c.s.rip, 2);
    }

    #[test]
    fn conversions_flags_xlat_io() {
        let mut c = real(&[
            0x98, // cbw
            0x99, // cwd
            0x9e, // sahf
            0x9f, // lahf
            0xd7, // xlat
            0xe4, 0x60, // in al, 0x60
            0xd6, // salc
        ]);
        c.s.gpr[reg::RAX] = 0x0080;
        run(&mut c, 2);
        assert_eq!(c.s.gpr[reg::RAX], 0xff80);
        assert_eq!(c.s.gpr[reg::RDX], 0xffff);
        c.s.gpr[reg::RAX] = 0xd500;
        run(&mut c, 1);
        assert_eq!(aflags(&c), SF | ZF | AF | PF | CF);
        c.s.gpr[reg::RAX] = 0;
        run(&mut c, 1);
        assert_eq!(c.s.gpr[reg::RAX], 0xd700);
        c.s.gpr[reg::RAX] = 5;
        c.s.gpr[reg::RBX] = 0x100;
        poke(&mut c, REAL_DS + 0x105, 1, 0x42);
        run(&mut c, 1);
        assert_eq!(c.s.gpr[reg::RAX], 0x42);
        run(&mut c, 1);
        assert_eq!(c.s.gpr[reg::RAX], 0xff);
        c.s.set_flag(CF, false);
        run(&mut c, 1);
        assert_eq!(c.s.gpr[reg::RAX], 0x00);

        // 32-bit: cwde, cdq.
        let mut c = flat32(&[0x98, 0x99]);
        c.s.gpr[reg::RAX] = 0x8000;
        run(&mut c, 2);
        assert_eq!(c.s.gpr[reg::RAX], 0xffff_8000);
        assert_eq!(c.s.gpr[reg::RDX], 0xffff_ffff);
    }

    #[test]
    fn rep_bsf_is_bsf_and_hint_nops() {
        // F3 0F BC: BSF on a P6 (ZF for a zero source, destination kept).
        let mut c = flat32(&[
            0xf3, 0x0f, 0xbc, 0xc3, 0xf3, 0x0f, 0xbc, 0xc1, 0x0f, 0x18, 0x03,
        ]);
        c.s.gpr[reg::RBX] = 0x8;
        c.s.gpr[reg::RCX] = 0;
        run(&mut c, 1);
        assert_eq!(c.s.gpr[reg::RAX], 3);
        run(&mut c, 1);
        assert_eq!(c.s.gpr[reg::RAX], 3);
        assert!(c.s.get_zf());
        // prefetchnta [ebx] far outside the segment does not fault.
        c.s.gpr[reg::RBX] = 0x7000_0000;
        run(&mut c, 1);
    }

    #[test]
    fn setcc_cmov_ud2() {
        let mut c = flat32(&[
            0x0f, 0x94, 0xc0, // sete al
            0x0f, 0x44, 0x03, // cmove eax, [ebx]
            0x0f, 0x0b, // ud2
        ]);
        c.s.gpr[reg::RAX] = 0x1234;
        c.s.set_flag(ZF, true);
        run(&mut c, 1);
        assert_eq!(c.s.gpr[reg::RAX], 0x1201);
        // CMOVcc reads its source even when the condition is false.
        c.s.set_flag(ZF, false);
        c.s.gpr[reg::RBX] = 0x10_0000;
        assert_eq!(exec(&mut c).unwrap_err().vector, vec::GP);
        c.s.gpr[reg::RBX] = 0x3000;
        run(&mut c, 1);
        assert_eq!(c.s.gpr[reg::RAX], 0x1201);
        assert_eq!(exec(&mut c).unwrap_err().vector, vec::UD);
    }
}

#[cfg(test)]
mod speed {
    use super::super::testutil::*;
    use crate::state::*;

    /// Rough interpreter throughput on an ALU/branch loop through `Cpu::step`
    /// (`cargo test -p morph86-cpu --release -- --ignored --nocapture speed`).
    #[test]
    #[ignore]
    fn alu_loop_throughput() {
        // l: add eax, ebx; xor edx, eax; mov [0x3000], eax; dec ecx; jnz l
        let mut c = flat32(&[
            0x01, 0xd8, 0x31, 0xc2, 0xa3, 0x00, 0x30, 0x00, 0x00, 0x49, 0x75, 0xf4,
        ]);
        let n = 2_000_000u64;
        c.s.gpr[reg::RCX] = n;
        c.s.gpr[reg::RBX] = 3;
        let t = std::time::Instant::now();
        for _ in 0..5 * n {
            c.step();
        }
        let dt = t.elapsed().as_secs_f64();
        assert_eq!(c.s.gpr[reg::RCX], 0);
        println!("{:.1} M instructions/s", 5.0 * n as f64 / dt / 1e6);
    }
}
