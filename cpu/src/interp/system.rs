//! Instruction group: system (privileged and mode-sensitive instructions).

use crate::exception::{Exception, Res};
use crate::Cpu;
use iced_x86::{Instruction, Mnemonic};

impl Cpu {
    /// Executes the instruction if it belongs to this group.
    pub(crate) fn exec_system(&mut self, i: &Instruction) -> Option<Res<()>> {
        Some(match i.mnemonic() {
            Mnemonic::Hlt => {
                if self.s.protected() && self.s.cpl != 0 {
                    Err(Exception::gp(0))
                } else {
                    self.s.halted = true;
                    Ok(())
                }
            }
            _ => return None,
        })
    }
}
