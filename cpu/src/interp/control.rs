//! Instruction group: control.

use crate::exception::Res;
use crate::Cpu;
use iced_x86::Instruction;

impl Cpu {
    /// Executes the instruction if it belongs to this group.
    pub(crate) fn exec_control(&mut self, i: &Instruction) -> Option<Res<()>> {
        let _ = i;
        None
    }
}
