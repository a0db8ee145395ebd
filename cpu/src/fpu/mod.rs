//! The x87 floating-point unit.
//!
//! TODO(fpu helper): arithmetic, conversions, transcendentals, exceptions.

/// An 80-bit extended-precision value as stored in an x87 register.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct F80 {
    /// Significand with the explicit integer bit in bit 63.
    pub mant: u64,
    /// Sign (bit 15) and biased exponent (bits 0-14).
    pub se: u16,
}

/// x87 registers and environment.
#[repr(C)]
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct FpuState {
    /// Physical registers R0-R7 (ST(i) is R[(TOP + i) % 8]).
    pub regs: [F80; 8],
    /// Control word.
    pub cw: u16,
    /// Status word, with TOP in bits 11-13.
    pub sw: u16,
    /// Full tag word, two bits a register (00 valid, 01 zero, 10 special, 11 empty).
    pub tw: u16,
    /// Last instruction opcode (11 bits).
    pub fop: u16,
    /// Last instruction pointer offset.
    pub fip: u32,
    /// Last instruction CS selector.
    pub fcs: u16,
    /// Last data pointer offset.
    pub fdp: u32,
    /// Last data pointer segment selector.
    pub fds: u16,
}

impl Default for FpuState {
    /// The state after FNINIT (and after RESET, as far as software can tell).
    fn default() -> Self {
        FpuState {
            regs: [F80::default(); 8],
            cw: 0x037f,
            sw: 0,
            tw: 0xffff,
            fop: 0,
            fip: 0,
            fcs: 0,
            fdp: 0,
            fds: 0,
        }
    }
}
