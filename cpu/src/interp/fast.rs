//! Fast paths for the most frequent instruction forms, dispatched on the exact iced
//! `Code` (one jump) before the group dispatch by mnemonic.
//!
//! Each form here knows its operand sizes and kinds from its `Code`, so it skips the
//! generic operand matches. The semantics are those of the group handlers (int.rs,
//! branch.rs) step for step: the same reads in the same order, the same segment checks
//! (a read-modify-write destination is checked for writing before it is read), the
//! memory write last and the flags after it. Anything not listed returns `None` and
//! goes the generic way.

use crate::exception::Res;
use crate::flags::{size_mask, FlagOp};
use crate::Cpu;
use iced_x86::{Code, Instruction, Mnemonic, OpKind};

/// The two-operand ALU operations with a fast path.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Alu {
    Add,
    Or,
    Adc,
    Sbb,
    And,
    Sub,
    Xor,
    Cmp,
    Test,
}

/// Where the second operand of a fast ALU form comes from.
#[derive(Clone, Copy, PartialEq, Eq)]
enum Src {
    /// Operand 1 is a register or memory (the r/m or reg field).
    RegMem,
    /// A sign-extended 8-bit immediate.
    Imm8s,
    /// An immediate of the operand size.
    Imm,
}

impl Cpu {
    /// Executes `i` if its form has a fast path.
    #[inline(always)]
    pub(super) fn exec_fast(&mut self, i: &Instruction) -> Option<Res<()>> {
        use Code as C;
        Some(match i.code() {
            C::Mov_r32_rm32 | C::Mov_rm32_r32 => self.fast_mov(i, 4),
            C::Mov_r8_rm8 | C::Mov_rm8_r8 => self.fast_mov(i, 1),
            C::Mov_r16_rm16 | C::Mov_rm16_r16 => self.fast_mov(i, 2),
            C::Mov_r32_imm32 => {
                self.reg_write(i.op0_register(), i.immediate32() as u64);
                Ok(())
            }
            C::Mov_r8_imm8 => {
                self.reg_write(i.op0_register(), i.immediate8() as u64);
                Ok(())
            }
            C::Mov_rm32_imm32 => self.fast_store(i, 4, i.immediate32() as u64),
            C::Mov_rm8_imm8 => self.fast_store(i, 1, i.immediate8() as u64),
            C::Movzx_r32_rm8 => self.fast_movzx(i, 1),
            C::Movzx_r32_rm16 => self.fast_movzx(i, 2),
            C::Lea_r32_m => {
                let v = self.ea(i) as u64;
                self.reg_write(i.op0_register(), v);
                Ok(())
            }

            C::Add_rm32_r32 | C::Add_r32_rm32 | C::Add_EAX_imm32 | C::Add_rm32_imm32 => {
                self.fast_alu(i, Alu::Add, 4, src_of(i))
            }
            C::Add_rm32_imm8 => self.fast_alu(i, Alu::Add, 4, Src::Imm8s),
            C::Add_rm8_r8 | C::Add_r8_rm8 | C::Add_AL_imm8 | C::Add_rm8_imm8 => {
                self.fast_alu(i, Alu::Add, 1, src_of(i))
            }
            C::Or_rm32_r32 | C::Or_r32_rm32 | C::Or_EAX_imm32 | C::Or_rm32_imm32 => {
                self.fast_alu(i, Alu::Or, 4, src_of(i))
            }
            C::Or_rm32_imm8 => self.fast_alu(i, Alu::Or, 4, Src::Imm8s),
            C::Or_rm8_r8 | C::Or_r8_rm8 | C::Or_AL_imm8 | C::Or_rm8_imm8 => {
                self.fast_alu(i, Alu::Or, 1, src_of(i))
            }
            C::Adc_rm32_r32 | C::Adc_r32_rm32 | C::Adc_EAX_imm32 | C::Adc_rm32_imm32 => {
                self.fast_alu(i, Alu::Adc, 4, src_of(i))
            }
            C::Adc_rm32_imm8 => self.fast_alu(i, Alu::Adc, 4, Src::Imm8s),
            C::Sbb_rm32_r32 | C::Sbb_r32_rm32 | C::Sbb_EAX_imm32 | C::Sbb_rm32_imm32 => {
                self.fast_alu(i, Alu::Sbb, 4, src_of(i))
            }
            C::Sbb_rm32_imm8 => self.fast_alu(i, Alu::Sbb, 4, Src::Imm8s),
            C::And_rm32_r32 | C::And_r32_rm32 | C::And_EAX_imm32 | C::And_rm32_imm32 => {
                self.fast_alu(i, Alu::And, 4, src_of(i))
            }
            C::And_rm32_imm8 => self.fast_alu(i, Alu::And, 4, Src::Imm8s),
            C::And_rm8_r8 | C::And_r8_rm8 | C::And_AL_imm8 | C::And_rm8_imm8 => {
                self.fast_alu(i, Alu::And, 1, src_of(i))
            }
            C::Sub_rm32_r32 | C::Sub_r32_rm32 | C::Sub_EAX_imm32 | C::Sub_rm32_imm32 => {
                self.fast_alu(i, Alu::Sub, 4, src_of(i))
            }
            C::Sub_rm32_imm8 => self.fast_alu(i, Alu::Sub, 4, Src::Imm8s),
            C::Sub_rm8_r8 | C::Sub_r8_rm8 | C::Sub_AL_imm8 | C::Sub_rm8_imm8 => {
                self.fast_alu(i, Alu::Sub, 1, src_of(i))
            }
            C::Xor_rm32_r32 | C::Xor_r32_rm32 | C::Xor_EAX_imm32 | C::Xor_rm32_imm32 => {
                self.fast_alu(i, Alu::Xor, 4, src_of(i))
            }
            C::Xor_rm32_imm8 => self.fast_alu(i, Alu::Xor, 4, Src::Imm8s),
            C::Xor_rm8_r8 | C::Xor_r8_rm8 | C::Xor_AL_imm8 | C::Xor_rm8_imm8 => {
                self.fast_alu(i, Alu::Xor, 1, src_of(i))
            }
            C::Cmp_rm32_r32 | C::Cmp_r32_rm32 | C::Cmp_EAX_imm32 | C::Cmp_rm32_imm32 => {
                self.fast_alu(i, Alu::Cmp, 4, src_of(i))
            }
            C::Cmp_rm32_imm8 => self.fast_alu(i, Alu::Cmp, 4, Src::Imm8s),
            C::Cmp_rm8_r8 | C::Cmp_r8_rm8 | C::Cmp_AL_imm8 | C::Cmp_rm8_imm8 => {
                self.fast_alu(i, Alu::Cmp, 1, src_of(i))
            }
            C::Test_rm32_r32 | C::Test_EAX_imm32 | C::Test_rm32_imm32 => {
                self.fast_alu(i, Alu::Test, 4, src_of(i))
            }
            C::Test_rm8_r8 | C::Test_AL_imm8 | C::Test_rm8_imm8 => {
                self.fast_alu(i, Alu::Test, 1, src_of(i))
            }

            C::Inc_r32 | C::Inc_rm32 => self.alu1(i, Mnemonic::Inc),
            C::Dec_r32 | C::Dec_rm32 => self.alu1(i, Mnemonic::Dec),
            C::Push_r32 => {
                let v = self.reg_read(i.op0_register());
                self.push(4, v)
            }
            C::Pop_r32 => {
                // As pop_op: read at the old ESP, move ESP, then write the register
                // (so POP ESP leaves the popped value).
                let v = match self.peek_stack(0, 4) {
                    Ok(v) => v,
                    Err(e) => return Some(Err(e)),
                };
                self.adjust_sp(4);
                self.reg_write(i.op0_register(), v);
                Ok(())
            }
            C::Call_rel32_32 => self.call_near(i),
            C::Retnd => {
                // As exec_branch's RET: target read and checked before ESP moves.
                let t = match self.peek_stack(0, 4) {
                    Ok(t) => t,
                    Err(e) => return Some(Err(e)),
                };
                let r = self.near_jump(t);
                if r.is_ok() {
                    self.adjust_sp(4);
                }
                r
            }
            C::Shl_rm32_imm8 | C::Shl_rm32_1 | C::Shl_rm32_CL => self.shift(i, Mnemonic::Shl),
            C::Shr_rm32_imm8 | C::Shr_rm32_1 | C::Shr_rm32_CL => self.shift(i, Mnemonic::Shr),
            C::Sar_rm32_imm8 | C::Sar_rm32_1 | C::Sar_rm32_CL => self.shift(i, Mnemonic::Sar),
            C::Jmp_rel8_32 | C::Jmp_rel32_32 => self.near_jump(i.near_branch_target()),
            _ => {
                if i.is_jcc_short_or_near() {
                    if self.s.cond(i.condition_code() as u8 - 1) {
                        self.near_jump(i.near_branch_target())
                    } else {
                        Ok(())
                    }
                } else {
                    return None;
                }
            }
        })
    }

    /// MOV r, r/m and MOV r/m, r of `size` bytes.
    #[inline(always)]
    fn fast_mov(&mut self, i: &Instruction, size: u32) -> Res<()> {
        let v = if i.op1_kind() == OpKind::Register {
            self.reg_read(i.op1_register())
        } else {
            let off = self.ea(i);
            self.read_mem(self.mem_seg(i), off, size)?
        };
        if i.op0_kind() == OpKind::Register {
            self.reg_write(i.op0_register(), v);
            Ok(())
        } else {
            let off = self.ea(i);
            self.write_mem(self.mem_seg(i), off, size, v)
        }
    }

    /// Stores `v` to operand 0 (register or memory) at `size` bytes.
    #[inline(always)]
    fn fast_store(&mut self, i: &Instruction, size: u32, v: u64) -> Res<()> {
        if i.op0_kind() == OpKind::Register {
            self.reg_write(i.op0_register(), v);
            Ok(())
        } else {
            let off = self.ea(i);
            self.write_mem(self.mem_seg(i), off, size, v)
        }
    }

    /// MOVZX r32, r/m8 or r/m16.
    #[inline(always)]
    fn fast_movzx(&mut self, i: &Instruction, src_size: u32) -> Res<()> {
        let v = if i.op1_kind() == OpKind::Register {
            self.reg_read(i.op1_register())
        } else {
            let off = self.ea(i);
            self.read_mem(self.mem_seg(i), off, src_size)?
        };
        self.reg_write(i.op0_register(), v);
        Ok(())
    }

    /// The two-operand ALU instructions at `size` bytes, as `alu2` computes them.
    #[inline(always)]
    fn fast_alu(&mut self, i: &Instruction, op: Alu, size: u32, src: Src) -> Res<()> {
        let mask = size_mask(size);
        let read_only = matches!(op, Alu::Cmp | Alu::Test);
        let dst_reg = i.op0_kind() == OpKind::Register;
        // Destination first (checked for writing unless CMP/TEST), then the source.
        let (a, lin) = if dst_reg {
            (self.reg_read(i.op0_register()), 0)
        } else {
            let off = self.ea(i);
            let lin = self.seg_linear(self.mem_seg(i), off, size, !read_only)?;
            (self.read_lin(lin, size, self.user())?, lin)
        };
        let b = match src {
            Src::Imm8s => i.immediate8to32() as i64 as u64,
            Src::Imm => {
                if size == 1 {
                    i.immediate8() as u64
                } else {
                    i.immediate32() as u64
                }
            }
            Src::RegMem => {
                if i.op1_kind() == OpKind::Register {
                    self.reg_read(i.op1_register())
                } else {
                    let off = self.ea(i);
                    self.read_mem(self.mem_seg(i), off, size)?
                }
            }
        } & mask;
        let (fop, res, cin) = match op {
            Alu::Add => (FlagOp::Add, a.wrapping_add(b), false),
            Alu::Adc => {
                let c = self.s.get_cf();
                (FlagOp::Add, a.wrapping_add(b).wrapping_add(c as u64), c)
            }
            Alu::Sub | Alu::Cmp => (FlagOp::Sub, a.wrapping_sub(b), false),
            Alu::Sbb => {
                let c = self.s.get_cf();
                (FlagOp::Sub, a.wrapping_sub(b).wrapping_sub(c as u64), c)
            }
            Alu::And | Alu::Test => (FlagOp::Logic, a & b, false),
            Alu::Or => (FlagOp::Logic, a | b, false),
            Alu::Xor => (FlagOp::Logic, a ^ b, false),
        };
        let res = res & mask;
        if !read_only {
            if dst_reg {
                self.reg_write(i.op0_register(), res);
            } else {
                self.write_lin(lin, size, res, self.user())?;
            }
        }
        self.s.set_lazy_flags(fop, size, res, a, b, cin);
        Ok(())
    }
}

/// The source kind of an ALU form whose operand 1 is r/m, reg or a full-size immediate.
#[inline(always)]
fn src_of(i: &Instruction) -> Src {
    match i.op1_kind() {
        OpKind::Register | OpKind::Memory => Src::RegMem,
        _ => Src::Imm,
    }
}
