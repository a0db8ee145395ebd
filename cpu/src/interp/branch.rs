//! Instruction group: near control flow — Jcc, JMP rel/indirect, CALL rel/indirect,
//! RET/RET imm16, LOOP/LOOPE/LOOPNE, JCXZ/JECXZ.
//!
//! The operand size decides the width of EIP (iced-x86 already truncates relative
//! targets to 16 bits for a 16-bit operand size; indirect targets are read at the
//! operand size). A target beyond the CS limit raises #GP(0) before anything changes.
//! Far transfers belong to the control group.

use crate::exception::{Exception, Res};
use crate::state::*;
use crate::Cpu;
use iced_x86::{Code, Instruction, Mnemonic};

impl Cpu {
    /// Sets EIP to a near target after the CS limit check.
    #[inline]
    fn near_jump(&mut self, target: u64) -> Res<()> {
        if target > self.s.seg[SegReg::Cs as usize].limit as u64 {
            return Err(Exception::gp(0));
        }
        self.s.rip = target;
        Ok(())
    }

    /// Executes the instruction if it belongs to this group.
    pub(crate) fn exec_branch(&mut self, i: &Instruction) -> Option<Res<()>> {
        use Mnemonic as M;
        Some(match i.mnemonic() {
            M::Jo
            | M::Jno
            | M::Jb
            | M::Jae
            | M::Je
            | M::Jne
            | M::Jbe
            | M::Ja
            | M::Js
            | M::Jns
            | M::Jp
            | M::Jnp
            | M::Jl
            | M::Jge
            | M::Jle
            | M::Jg => {
                if self.s.cond(i.condition_code() as u8 - 1) {
                    self.near_jump(i.near_branch_target())
                } else {
                    Ok(())
                }
            }
            M::Jmp => {
                if i.is_jmp_far() || i.is_jmp_far_indirect() {
                    return None;
                }
                match i.op0_kind() {
                    iced_x86::OpKind::NearBranch16
                    | iced_x86::OpKind::NearBranch32
                    | iced_x86::OpKind::NearBranch64 => self.near_jump(i.near_branch_target()),
                    _ => match self.read_op(i, 0) {
                        Ok(t) => self.near_jump(t),
                        Err(e) => Err(e),
                    },
                }
            }
            M::Call => {
                if i.is_call_far() || i.is_call_far_indirect() {
                    return None;
                }
                self.call_near(i)
            }
            M::Ret => {
                let size: u32 = match i.code() {
                    Code::Retnd | Code::Retnd_imm16 => 4,
                    _ => 2,
                };
                let imm = if i.op_count() > 0 {
                    i.immediate16() as i64
                } else {
                    0
                };
                match self.peek_stack(0, size) {
                    Ok(t) => {
                        let r = self.near_jump(t);
                        if r.is_ok() {
                            self.adjust_sp(size as i64 + imm);
                        }
                        r
                    }
                    Err(e) => Err(e),
                }
            }
            M::Loop | M::Loope | M::Loopne => {
                let ecx = matches!(
                    i.code(),
                    Code::Loop_rel8_16_ECX
                        | Code::Loop_rel8_32_ECX
                        | Code::Loope_rel8_16_ECX
                        | Code::Loope_rel8_32_ECX
                        | Code::Loopne_rel8_16_ECX
                        | Code::Loopne_rel8_32_ECX
                );
                let size = if ecx { 4 } else { 2 };
                let c = self.s.reg_sized(reg::RCX, size).wrapping_sub(1)
                    & crate::flags::size_mask(size);
                let take = c != 0
                    && match i.mnemonic() {
                        M::Loope => self.s.get_zf(),
                        M::Loopne => !self.s.get_zf(),
                        _ => true,
                    };
                if take {
                    if let Err(e) = self.near_jump(i.near_branch_target()) {
                        return Some(Err(e));
                    }
                }
                self.s.set_reg_sized(reg::RCX, size, c);
                Ok(())
            }
            M::Jcxz | M::Jecxz => {
                let size = if i.mnemonic() == M::Jecxz { 4 } else { 2 };
                if self.s.reg_sized(reg::RCX, size) == 0 {
                    self.near_jump(i.near_branch_target())
                } else {
                    Ok(())
                }
            }
            _ => return None,
        })
    }

    /// CALL rel16/rel32 and CALL r/m16/r/m32: pushes the next IP at the operand size.
    fn call_near(&mut self, i: &Instruction) -> Res<()> {
        let size = (-i.stack_pointer_increment()) as u32;
        let target = match i.op0_kind() {
            iced_x86::OpKind::NearBranch16
            | iced_x86::OpKind::NearBranch32
            | iced_x86::OpKind::NearBranch64 => i.near_branch_target(),
            _ => self.read_op(i, 0)?,
        };
        if target > self.s.seg[SegReg::Cs as usize].limit as u64 {
            return Err(Exception::gp(0));
        }
        let ret = self.s.rip & crate::flags::size_mask(size);
        self.push(size, ret)?;
        self.s.rip = target;
        Ok(())
    }
}
