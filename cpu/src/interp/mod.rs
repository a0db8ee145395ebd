//! Instruction semantics. One file per group; each group's `exec_*` returns `None`
//! for mnemonics it does not handle, and `execute` tries them in turn (hot groups first),
//! after the fast paths of fast.rs for the most frequent instruction forms.
//!
//! Rules every instruction follows:
//! - On `Err`, architectural state must be as it was before the instruction (the step
//!   loop restores EIP only): read and check everything that can fault before writing
//!   registers, and write memory last. REP string instructions commit each iteration.
//! - When an instruction is entered, EIP already points past it (`self.s.rip`); the
//!   instruction's own address is `self.start_rip`.

mod bits;
mod branch;
mod control;
mod fast;
mod fpu;
mod int;
mod muldiv;
mod operands;
mod shift;
mod string;
mod system;
#[cfg(test)]
mod testutil;

use crate::exception::{Exception, Res};
use crate::Cpu;
use iced_x86::Instruction;

impl Cpu {
    /// Executes one decoded instruction.
    pub(crate) fn execute(&mut self, i: &Instruction) -> Res<()> {
        if let Some(r) = self.exec_fast(i) {
            return r;
        }
        if let Some(r) = self.exec_int(i) {
            return r;
        }
        if let Some(r) = self.exec_branch(i) {
            return r;
        }
        if let Some(r) = self.exec_string(i) {
            return r;
        }
        if let Some(r) = self.exec_fpu(i) {
            return r;
        }
        if let Some(r) = self.exec_control(i) {
            return r;
        }
        if let Some(r) = self.exec_system(i) {
            return r;
        }
        log::debug!(
            "unimplemented instruction {:?} at {:#x}",
            i.code(),
            self.start_rip
        );
        Err(Exception::ud())
    }
}
