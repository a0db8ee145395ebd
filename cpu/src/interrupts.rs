//! Delivery of interrupts and exceptions: real mode (IVT), protected mode (IDT gates,
//! privilege changes, task gates) and virtual-8086 mode, and the double/triple fault rules.

use crate::exception::{makes_double_fault, vec, Exception, FaultClass, Res};
use crate::state::*;
use crate::{Cpu, StepEvent};

/// What caused an interrupt: this decides privilege checks, the EXT bit of error codes
/// and which EIP is pushed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum IntKind {
    /// A fault or trap raised by the CPU (EIP already set to what must be pushed).
    Exception,
    /// INT n: gate DPL checked against CPL; in V86 subject to IOPL.
    Software,
    /// INT3 and INTO: software, gate DPL checked, not IOPL-sensitive in V86.
    SoftException,
    /// INT1 (ICEBP, opcode F1): delivered like an external event, no DPL check.
    Icebp,
    /// A hardware interrupt from the interrupt controller.
    External,
    /// Non-maskable interrupt.
    Nmi,
}

impl Cpu {
    /// Delivers an event and applies the double- and triple-fault rules to any fault
    /// raised while doing so.
    pub(crate) fn deliver_event(
        &mut self,
        vector: u8,
        kind: IntKind,
        code: Option<u32>,
    ) -> StepEvent {
        let mut cur = (vector, kind, code);
        loop {
            let rip = self.s.rip;
            match self.deliver(cur.0, cur.1, cur.2) {
                Ok(()) => return StepEvent::Ok,
                Err(e2) => {
                    self.s.rip = rip;
                    let first = if cur.1 == IntKind::Exception {
                        Exception::new(cur.0).class()
                    } else {
                        FaultClass::Benign
                    };
                    if first == FaultClass::DoubleFault {
                        log::warn!("triple fault (fault {:?} while delivering #DF)", e2);
                        return StepEvent::TripleFault;
                    }
                    if makes_double_fault(first, e2.class()) {
                        cur = (vec::DF, IntKind::Exception, Some(0));
                    } else {
                        cur = (e2.vector, IntKind::Exception, e2.error_code);
                    }
                }
            }
        }
    }

    /// Delivers one interrupt or exception through the IVT or IDT. On `Err` the caller
    /// applies the double-fault rules; state changes made before the error are undone
    /// by the delivery code itself.
    pub fn deliver(&mut self, vector: u8, kind: IntKind, code: Option<u32>) -> Res<()> {
        self.s.halted = false;
        if self.s.real() {
            self.deliver_real(vector)
        } else {
            self.deliver_protected(vector, kind, code)
        }
    }

    /// Real-mode delivery: push FLAGS, CS, IP; clear IF, TF and AC; jump through the IVT.
    fn deliver_real(&mut self, vector: u8) -> Res<()> {
        let off = vector as u32 * 4;
        if off + 3 > self.s.idtr.limit {
            return Err(Exception::gp(vector as u32 * 8 + 2));
        }
        let base = self.s.idtr.base;
        let ip = self.read_sys(base + off as u64, 2)? as u16;
        let cs = self.read_sys(base + off as u64 + 2, 2)? as u16;
        let flags = self.s.eflags();
        let sp = self.s.gpr[reg::RSP];
        let r = (|| {
            self.push(2, flags as u64)?;
            self.push(2, self.s.seg[SegReg::Cs as usize].selector as u64)?;
            self.push(2, self.s.rip & 0xffff)
        })();
        if let Err(e) = r {
            self.s.gpr[reg::RSP] = sp;
            return Err(e);
        }
        self.s.set_eflags(flags & !(IF | TF | AC | RF));
        self.load_cs_real(cs);
        self.s.rip = ip as u64;
        Ok(())
    }

    /// Protected-mode and V86 delivery through the IDT.
    ///
    /// TODO(protected-mode helper): gates, privilege changes, V86 exit, task gates.
    fn deliver_protected(&mut self, vector: u8, kind: IntKind, code: Option<u32>) -> Res<()> {
        let _ = (kind, code);
        Err(Exception::gp(vector as u32 * 8 + 2))
    }
}
