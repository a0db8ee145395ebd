//! Exceptions as values: every instruction returns `Res<T>`, and the step loop turns
//! an `Err` into the architectural delivery (or a double / triple fault).

/// Exception vectors.
pub mod vec {
    /// Divide error.
    pub const DE: u8 = 0;
    /// Debug.
    pub const DB: u8 = 1;
    /// Non-maskable interrupt.
    pub const NMI: u8 = 2;
    /// Breakpoint (INT3).
    pub const BP: u8 = 3;
    /// Overflow (INTO).
    pub const OF: u8 = 4;
    /// BOUND range exceeded.
    pub const BR: u8 = 5;
    /// Invalid opcode.
    pub const UD: u8 = 6;
    /// Device not available.
    pub const NM: u8 = 7;
    /// Double fault.
    pub const DF: u8 = 8;
    /// Invalid TSS.
    pub const TS: u8 = 10;
    /// Segment not present.
    pub const NP: u8 = 11;
    /// Stack fault.
    pub const SS: u8 = 12;
    /// General protection.
    pub const GP: u8 = 13;
    /// Page fault.
    pub const PF: u8 = 14;
    /// x87 floating-point error.
    pub const MF: u8 = 16;
    /// Alignment check.
    pub const AC: u8 = 17;
    /// Machine check.
    pub const MC: u8 = 18;
    /// SIMD floating-point exception.
    pub const XM: u8 = 19;
}

/// A fault or trap raised by an instruction, with its error code if the vector has one.
///
/// Packed into 8 bytes (vector, has-code flag, code) rather than `u8` plus
/// `Option<u32>` (12 bytes): then `Res<()>` (and `Option<Res<()>>`) fit one register,
/// which every instruction handler returns; a 12-byte result goes through memory and
/// costs a store-forwarding stall per return.
#[derive(Clone, Copy, PartialEq, Eq)]
pub struct Exception {
    /// Vector number.
    pub vector: u8,
    /// Whether the exception pushes an error code.
    has_code: bool,
    /// The error code (0 when `has_code` is false).
    code: u32,
}

impl std::fmt::Debug for Exception {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Exception")
            .field("vector", &self.vector)
            .field("error_code", &self.error_code())
            .finish()
    }
}

/// Result of anything that may raise an exception.
pub type Res<T> = Result<T, Exception>;

impl Exception {
    /// An exception without error code.
    pub const fn new(vector: u8) -> Self {
        Exception {
            vector,
            has_code: false,
            code: 0,
        }
    }
    /// An exception with an error code.
    pub const fn with_code(vector: u8, code: u32) -> Self {
        Exception {
            vector,
            has_code: true,
            code,
        }
    }
    /// Error code pushed on delivery (vectors 8, 10-14, 17), if any.
    #[inline]
    pub const fn error_code(&self) -> Option<u32> {
        if self.has_code {
            Some(self.code)
        } else {
            None
        }
    }
    /// #UD.
    pub const fn ud() -> Self {
        Self::new(vec::UD)
    }
    /// #DE.
    pub const fn de() -> Self {
        Self::new(vec::DE)
    }
    /// #NM.
    pub const fn nm() -> Self {
        Self::new(vec::NM)
    }
    /// #GP(code).
    pub const fn gp(code: u32) -> Self {
        Self::with_code(vec::GP, code)
    }
    /// #SS(code).
    pub const fn ss(code: u32) -> Self {
        Self::with_code(vec::SS, code)
    }
    /// #NP(code).
    pub const fn np(code: u32) -> Self {
        Self::with_code(vec::NP, code)
    }
    /// #TS(code).
    pub const fn ts(code: u32) -> Self {
        Self::with_code(vec::TS, code)
    }
    /// #PF(code); CR2 is set where the fault is detected.
    pub const fn pf(code: u32) -> Self {
        Self::with_code(vec::PF, code)
    }

    /// Benign, contributory or page-fault class, for the double-fault rules
    /// (Intel SDM vol. 3, table 6-5).
    pub fn class(&self) -> FaultClass {
        match self.vector {
            vec::DE | vec::TS | vec::NP | vec::SS | vec::GP => FaultClass::Contributory,
            vec::PF => FaultClass::PageFault,
            vec::DF => FaultClass::DoubleFault,
            _ => FaultClass::Benign,
        }
    }
}

/// Exception classes for the double-fault rules.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FaultClass {
    /// Benign: delivered normally whatever came before.
    Benign,
    /// Contributory: a second contributory fault makes #DF.
    Contributory,
    /// Page fault.
    PageFault,
    /// The double fault itself: any fault while delivering it is a triple fault.
    DoubleFault,
}

/// Whether a fault of class `second` raised while delivering a fault of class `first`
/// becomes a double fault (Intel SDM vol. 3, table 6-5).
pub fn makes_double_fault(first: FaultClass, second: FaultClass) -> bool {
    use FaultClass::*;
    matches!(
        (first, second),
        (Contributory, Contributory) | (PageFault, Contributory) | (PageFault, PageFault)
    )
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The layout the hot path relies on: a handler's `Res<()>` and a group's
    /// `Option<Res<()>>` are one 8-byte register.
    #[test]
    fn results_fit_one_register() {
        assert_eq!(std::mem::size_of::<Exception>(), 8);
        assert_eq!(std::mem::size_of::<Res<()>>(), 8);
        assert_eq!(std::mem::size_of::<Option<Res<()>>>(), 8);
    }

    #[test]
    fn error_codes_round_trip() {
        assert_eq!(Exception::gp(0x1234).error_code(), Some(0x1234));
        assert_eq!(Exception::ud().error_code(), None);
        assert_ne!(Exception::gp(0), Exception::new(vec::GP));
        assert_eq!(
            format!("{:?}", Exception::gp(8)),
            "Exception { vector: 13, error_code: Some(8) }"
        );
    }
}
