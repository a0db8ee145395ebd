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
    pub(super) fn near_jump(&mut self, target: u64) -> Res<()> {
        if target > self.s.seg[SegReg::Cs as usize].limit as u64 {
            return Err(Exception::gp(0));
        }
        self.s.rip = target;
        Ok(())
    }

    /// Executes the instruction if it belongs to this group.
    #[inline(never)]
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
    pub(super) fn call_near(&mut self, i: &Instruction) -> Res<()> {
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

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use crate::exception::vec;
    use crate::state::*;

    #[test]
    fn conditional_jumps() {
        // je +5 taken with ZF; jl not taken when SF == OF.
        let mut c = real(&[0x74, 0x05]);
        c.s.set_flag(ZF, true);
        run(&mut c, 1);
        assert_eq!(c.s.rip, 7);
        let mut c = real(&[0x7c, 0x05]);
        c.s.set_eflags(FLAG_1 | SF | OF);
        run(&mut c, 1);
        assert_eq!(c.s.rip, 2);
        // jg rel32 in 32-bit code, taken.
        let mut c = flat32(&[0x0f, 0x8f, 0x00, 0x01, 0x00, 0x00]);
        run(&mut c, 1);
        assert_eq!(c.s.rip, FLAT_CODE + 6 + 0x100);
    }

    #[test]
    fn target_past_cs_limit_is_gp() {
        let mut c = flat32(&[0xe9, 0x00, 0x10, 0x00, 0x00]);
        c.s.seg[SegReg::Cs as usize].limit = 0x1fff;
        let e = exec(&mut c).unwrap_err();
        assert_eq!((e.vector, e.error_code()), (vec::GP, Some(0)));
        assert_eq!(c.s.rip, FLAT_CODE);
        // jmp rel16 with an operand-size prefix in 32-bit code truncates EIP to 16 bits.
        let mut c = flat32(&[0x66, 0xe9, 0x00, 0x00]);
        run(&mut c, 1);
        assert_eq!(c.s.rip, (FLAT_CODE + 4) & 0xffff);
    }

    #[test]
    fn calls_and_returns() {
        // call +3 (16-bit): pushes 3, IP = 6; ret 4 pops it and 4 more bytes.
        let mut code = vec![0xe8, 0x03, 0x00, 0x90, 0x90, 0x90];
        code.extend_from_slice(&[0xc2, 0x04, 0x00]);
        let mut c = real(&code);
        run(&mut c, 1);
        assert_eq!((c.s.rip, c.s.gpr[reg::RSP]), (6, 0x0ffe));
        assert_eq!(peek(&mut c, REAL_SS + 0xffe, 2), 3);
        run(&mut c, 1);
        assert_eq!((c.s.rip, c.s.gpr[reg::RSP]), (3, 0x1004));

        // call eax (32-bit) and ret.
        let mut c = flat32(&[0xff, 0xd0]);
        c.mmu.phys.write(0x2000, &[0xc3]);
        c.s.gpr[reg::RAX] = 0x2000;
        run(&mut c, 1);
        assert_eq!(c.s.rip, 0x2000);
        assert_eq!(peek(&mut c, 0x7ffc, 4), FLAT_CODE + 2);
        run(&mut c, 1);
        assert_eq!((c.s.rip, c.s.gpr[reg::RSP]), (FLAT_CODE + 2, 0x8000));

        // jmp word [bx].
        let mut c = real(&[0xff, 0x27]);
        c.s.gpr[reg::RBX] = 0x10;
        poke(&mut c, REAL_DS + 0x10, 2, 0x1234);
        run(&mut c, 1);
        assert_eq!(c.s.rip, 0x1234);
    }

    #[test]
    fn loops_and_jcxz() {
        // loop $ with CX = 0 runs 0x10000 times: the first pass leaves CX = 0xffff.
        let mut c = real(&[0xe2, 0xfe]);
        c.s.gpr[reg::RCX] = 0x5_0000;
        run(&mut c, 1);
        assert_eq!((c.s.gpr[reg::RCX], c.s.rip), (0x5_ffff, 0));
        // With an address-size prefix LOOP counts in ECX.
        let mut c = real(&[0x67, 0xe2, 0xfd]);
        c.s.gpr[reg::RCX] = 0x1_0000;
        run(&mut c, 1);
        assert_eq!((c.s.gpr[reg::RCX], c.s.rip), (0xffff, 0));
        c.s.gpr[reg::RCX] = 1;
        run(&mut c, 1);
        assert_eq!((c.s.gpr[reg::RCX], c.s.rip), (0, 3));
        // loopne stops on ZF; loope continues on ZF.
        let mut c = real(&[0xe0, 0x10, 0xe1, 0x10]);
        c.s.gpr[reg::RCX] = 5;
        c.s.set_flag(ZF, true);
        run(&mut c, 1);
        assert_eq!((c.s.gpr[reg::RCX], c.s.rip), (4, 2));
        run(&mut c, 1);
        assert_eq!((c.s.gpr[reg::RCX], c.s.rip), (3, 0x14));
        // jcxz looks at CX only; jecxz at ECX.
        let mut c = real(&[0xe3, 0x10]);
        c.s.gpr[reg::RCX] = 0x1_0000;
        run(&mut c, 1);
        assert_eq!(c.s.rip, 0x12);
        let mut c = flat32(&[0xe3, 0x10]);
        c.s.gpr[reg::RCX] = 0x1_0000;
        run(&mut c, 1);
        assert_eq!(c.s.rip, FLAT_CODE + 2);
    }
}
