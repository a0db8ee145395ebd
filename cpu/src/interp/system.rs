//! Instruction group: system (privileged and mode-sensitive instructions).

use crate::exception::{Exception, Res};
use crate::Cpu;
use iced_x86::{Instruction, Mnemonic};

impl Cpu {
    /// Checks that the current privilege may access `size` bytes of I/O ports at `port`
    /// (IN, OUT, INS, OUTS): CPL <= IOPL, else the TSS I/O permission bitmap; always
    /// allowed in real mode. Raises #GP(0) when not allowed.
    ///
    /// TODO(protected-mode helper): the bitmap.
    pub(crate) fn io_permission(&mut self, port: u16, size: u32) -> Res<()> {
        let _ = (port, size);
        if self.s.real() || (!self.s.v86() && self.s.cpl <= self.s.iopl()) {
            Ok(())
        } else {
            Err(Exception::gp(0))
        }
    }

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
