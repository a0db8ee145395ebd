//! The x87 floating-point unit: register file, control/status/tag words and the
//! software extended-precision arithmetic ([`softfloat`]) the interpreter uses. No host
//! floating-point instruction is used, so results are the same on any host.
//!
//! The interpreter side (decoding of D8-DF and WAIT, memory operands, #NM/#MF) is in
//! `interp/fpu.rs`.
//!
//! Oracle: the host's own x87. The tests in `fpu/host_tests.rs` and `interp/fpu.rs`
//! (x86-64 hosts only) run the same operations natively through `asm!` and compare
//! results and status words bit for bit, under every rounding and precision control,
//! masked and unmasked. Behaviours found that way, beyond what the SDM spells out:
//! - tininess (UE) is detected after rounding;
//! - stores (FST, FIST, FBSTP) never signal DE; a single/double denormal memory
//!   operand of an arithmetic instruction signals DE only after the NaN checks, and a
//!   signalling NaN from memory takes part in NaN selection as signalling;
//! - x / 0 with a denormal x signals ZE alone; FLD m32/m64 still pushes under an
//!   unmasked DE;
//! - compares write C0-C3 (FCOMI: ZF/PF/CF) even under unmasked IE/DE, but do not pop;
//! - FSCALE beyond the ±24576 bias adjustment gives a signed zero (UE, PE) or an
//!   infinity (OE, PE, C1) whatever the rounding control;
//! - FSIN/FCOS/FSINCOS/FPTAN reduce modulo π/2 with the 66-bit π;
//! - F2XM1 with |x| > 1 and FYL2XP1 with x <= -1 leave the operand as result, with PE.
//!
//! FERR#: [`FpuState::ferr`] (also `Cpu::ferr`) is the FPU's error output; with CR0.NE
//! clear a PC routes it to IRQ 13, and the waiting instruction proceeds (as if IGNNE#
//! were asserted) instead of freezing.

pub mod softfloat;
pub mod transcendental;

pub use softfloat::{Ctx, Kind};

/// An 80-bit extended-precision value as stored in an x87 register.
#[repr(C)]
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct F80 {
    /// Significand with the explicit integer bit in bit 63.
    pub mant: u64,
    /// Sign (bit 15) and biased exponent (bits 0-14).
    pub se: u16,
}

// Status word bits (Intel SDM vol. 1, figure 8-4).
/// SW bit 0: invalid operation.
pub const SW_IE: u16 = 1 << 0;
/// SW bit 1: denormal operand.
pub const SW_DE: u16 = 1 << 1;
/// SW bit 2: zero divide.
pub const SW_ZE: u16 = 1 << 2;
/// SW bit 3: overflow.
pub const SW_OE: u16 = 1 << 3;
/// SW bit 4: underflow.
pub const SW_UE: u16 = 1 << 4;
/// SW bit 5: precision.
pub const SW_PE: u16 = 1 << 5;
/// SW bit 6: stack fault.
pub const SW_SF: u16 = 1 << 6;
/// SW bit 7: error summary status.
pub const SW_ES: u16 = 1 << 7;
/// SW bit 8: condition code C0.
pub const SW_C0: u16 = 1 << 8;
/// SW bit 9: condition code C1.
pub const SW_C1: u16 = 1 << 9;
/// SW bit 10: condition code C2.
pub const SW_C2: u16 = 1 << 10;
/// SW bits 11-13: TOP.
pub const SW_TOP: u16 = 7 << 11;
/// SW bit 14: condition code C3.
pub const SW_C3: u16 = 1 << 14;
/// SW bit 15: FPU busy (mirrors ES on 387 and later).
pub const SW_B: u16 = 1 << 15;
/// The six exception flags.
pub const SW_EXC: u16 = 0x3f;
/// All four condition codes.
pub const SW_CC: u16 = SW_C0 | SW_C1 | SW_C2 | SW_C3;

// Control word bits (Intel SDM vol. 1, figure 8-6).
/// CW bits 0-5: exception masks (same positions as the SW flags).
pub const CW_MASKS: u16 = 0x3f;
/// CW bits 8-9: precision control.
pub const CW_PC: u16 = 3 << 8;
/// CW bits 10-11: rounding control.
pub const CW_RC: u16 = 3 << 10;
/// CW bit 12: infinity control (no effect on a 387+, but kept).
pub const CW_X: u16 = 1 << 12;
/// CW bit 6 always reads as 1 on a 387+.
pub const CW_BIT6: u16 = 1 << 6;

/// Tag value: valid.
pub const TAG_VALID: u16 = 0;
/// Tag value: zero.
pub const TAG_ZERO: u16 = 1;
/// Tag value: special (NaN, infinity, denormal, unsupported).
pub const TAG_SPECIAL: u16 = 2;
/// Tag value: empty.
pub const TAG_EMPTY: u16 = 3;

/// Byte offset of the FNSAVE image in [`FpuState`] (the state starts with it).
pub const FSAVE_IMAGE_OFFSET: usize = 0;
/// Length of the 32-bit protected-mode FNSAVE/FRSTOR image (Intel SDM vol. 1, figure 8-9).
pub const FSAVE_IMAGE_LEN: usize = 108;

/// x87 registers and environment.
///
/// The first [`FSAVE_IMAGE_LEN`] bytes are laid out as the 32-bit protected-mode
/// FNSAVE/FRSTOR image, so the JIT can load the state into the host's x87 with one
/// `FRSTOR` and store it back with one `FNSAVE` (ARCHITECTURE.md section 2): control,
/// status and tag word each in the low half of a doubleword, then 16 bytes of
/// instruction/data pointers, then ST(0)-ST(7) *in stack order* (10 bytes each). The
/// pointer bytes of the image are scratch (a host `FNSAVE` writes host addresses there):
/// the guest's FIP/FCS/FOP/FDP/FDS are the separate fields after the image.
///
/// The full tag word is kept as FNSAVE stores it: a register's tag is empty or else
/// what its contents say ([`tag_of`]); only the empty bits matter to FRSTOR.
///
/// TOP (in `sw`) must change only through [`FpuState::set_top`] / [`FpuState::set_sw`]
/// (and push/pop), which rotate the stack-ordered registers so that the physical
/// registers keep their values.
#[repr(C, align(16))]
#[derive(Debug, Clone, Copy)]
pub struct FpuState {
    /// Control word.
    pub cw: u16,
    /// Image padding (reserved half of the CW doubleword).
    pub cw_hi: u16,
    /// Status word, with TOP in bits 11-13 (see the note on TOP above).
    pub sw: u16,
    /// Image padding.
    pub sw_hi: u16,
    /// Full tag word, two bits per *physical* register (00 valid, 01 zero, 10 special,
    /// 11 empty).
    pub tw: u16,
    /// Image padding.
    pub tw_hi: u16,
    /// The image's pointer doublewords (FIP, FCS|FOP, FDP, FDS): scratch.
    pub image_ptrs: [u8; 16],
    /// ST(0)-ST(7) in stack order: `st_img[i]` is physical register (TOP + i) % 8, as
    /// 64-bit significand then sign/exponent, little-endian.
    pub st_img: [[u8; 10]; 8],
    /// Last instruction opcode (11 bits).
    pub fop: u16,
    /// Last instruction CS selector.
    pub fcs: u16,
    /// Last instruction pointer offset.
    pub fip: u32,
    /// Last data pointer offset.
    pub fdp: u32,
    /// Last data pointer segment selector.
    pub fds: u16,
    /// JIT only: nonzero while the host's x87 holds this state (between a translated
    /// block's `FRSTOR` and the `FNSAVE` on the way out). Always 0 when Rust code runs.
    pub host_live: u8,
    /// JIT only: `host_live` as it was when a slow path saved the state.
    pub host_was_live: u8,
    /// JIT only: set by translated code before a slow-path or interpreter call for an
    /// instruction that leaves the x87 state alone, so the call need not store it.
    pub host_call_keeps: u8,
    /// JIT only: the linear address of the current memory operand, kept until the
    /// instruction completes and it becomes FDP.
    pub fdp_pending: u32,
}

const _: () = assert!(std::mem::offset_of!(FpuState, st_img) == 28);
const _: () = assert!(std::mem::offset_of!(FpuState, fop) == FSAVE_IMAGE_LEN);

impl PartialEq for FpuState {
    /// Architectural state only (the image's scratch bytes and the JIT's bookkeeping
    /// are left out).
    fn eq(&self, o: &Self) -> bool {
        self.cw == o.cw
            && self.sw == o.sw
            && self.tw == o.tw
            && self.st_img == o.st_img
            && self.fop == o.fop
            && self.fcs == o.fcs
            && self.fip == o.fip
            && self.fdp == o.fdp
            && self.fds == o.fds
    }
}

impl Eq for FpuState {}

impl Default for FpuState {
    /// The state after FNINIT (and after RESET, as far as software can tell).
    fn default() -> Self {
        FpuState {
            cw: 0x037f,
            cw_hi: 0,
            sw: 0,
            sw_hi: 0,
            tw: 0xffff,
            tw_hi: 0,
            image_ptrs: [0; 16],
            st_img: [[0; 10]; 8],
            fop: 0,
            fcs: 0,
            fip: 0,
            fdp: 0,
            fds: 0,
            host_live: 0,
            host_was_live: 0,
            host_call_keeps: 0,
            fdp_pending: 0,
        }
    }
}

/// The 10 little-endian bytes of an 80-bit value (significand, then sign/exponent).
pub fn f80_to_bytes(v: F80) -> [u8; 10] {
    let mut b = [0u8; 10];
    b[..8].copy_from_slice(&v.mant.to_le_bytes());
    b[8..].copy_from_slice(&v.se.to_le_bytes());
    b
}

/// An 80-bit value from its 10 little-endian bytes.
pub fn f80_from_bytes(b: &[u8; 10]) -> F80 {
    let mut m = [0u8; 8];
    m.copy_from_slice(&b[..8]);
    F80 {
        mant: u64::from_le_bytes(m),
        se: u16::from_le_bytes([b[8], b[9]]),
    }
}

/// The tag a value gets when written to a register.
pub fn tag_of(v: F80) -> u16 {
    match v.kind() {
        Kind::Zero => TAG_ZERO,
        Kind::Finite if !v.is_denormal() => TAG_VALID,
        _ => TAG_SPECIAL,
    }
}

/// The constant of FLDPI (0), FLDL2T (1), FLDL2E (2), FLDLG2 (3), FLDLN2 (4), FLD1 (5),
/// FLDZ (6), rounded to 64 bits by the rounding control of `cw` (as a P6 does; no PE,
/// precision control ignored).
pub fn constant(k: usize, cw: u16) -> F80 {
    // 128-bit significands of the constants and their exponents.
    const TABLE: [(u128, i32); 6] = [
        (0xc90f_daa2_2168_c234_c4c6_628b_80dc_1cd1, 1),
        (0xd49a_784b_cd1b_8afe_492b_f6ff_4daf_db4d, 1),
        (0xb8aa_3b29_5c17_f0bb_be87_fed0_691d_3e89, 0),
        (0x9a20_9a84_fbcf_f798_8f89_59ac_0b7c_9178, -2),
        (0xb172_17f7_d1cf_79ab_c9e3_b398_03f2_f6af, -1),
        (1 << 127, 0),
    ];
    if k >= 6 {
        return F80::ZERO;
    }
    let (sig, exp) = TABLE[k];
    let mut c = Ctx::new(cw | CW_MASKS);
    c.round_ext(false, exp, sig, false)
}

impl FpuState {
    /// FNINIT: control word 0x37f, status 0, all registers empty, pointers cleared
    /// (the physical registers keep their contents; TOP becomes 0).
    pub fn init(&mut self) {
        self.set_top(0);
        let (st, live, was, keeps) = (
            self.st_img,
            self.host_live,
            self.host_was_live,
            self.host_call_keeps,
        );
        *self = FpuState::default();
        self.st_img = st;
        self.host_live = live;
        self.host_was_live = was;
        self.host_call_keeps = keeps;
    }
    /// TOP field of the status word.
    pub fn top(&self) -> usize {
        ((self.sw >> 11) & 7) as usize
    }
    /// Sets TOP; the stack-ordered image is rotated so the physical registers keep
    /// their values.
    pub fn set_top(&mut self, t: usize) {
        let old = self.top();
        self.st_img.rotate_left((t.wrapping_sub(old)) & 7);
        self.sw = (self.sw & !SW_TOP) | (((t & 7) as u16) << 11);
    }
    /// Replaces the whole status word (TOP included, through [`FpuState::set_top`]).
    pub fn set_sw(&mut self, v: u16) {
        self.set_top(((v & SW_TOP) >> 11) as usize);
        self.sw = v;
    }
    /// Value of physical register R`r`.
    pub fn reg(&self, r: usize) -> F80 {
        f80_from_bytes(&self.st_img[r.wrapping_sub(self.top()) & 7])
    }
    /// Writes physical register R`r` (the tag is left alone).
    pub fn set_reg(&mut self, r: usize, v: F80) {
        let i = r.wrapping_sub(self.top()) & 7;
        self.st_img[i] = f80_to_bytes(v);
    }
    /// Physical register number of ST(i).
    pub fn phys(&self, i: usize) -> usize {
        (self.top() + i) & 7
    }
    /// Tag of physical register `r`.
    pub fn tag(&self, r: usize) -> u16 {
        (self.tw >> (2 * r)) & 3
    }
    /// Sets the tag of physical register `r`.
    pub fn set_tag(&mut self, r: usize, t: u16) {
        self.tw = (self.tw & !(3 << (2 * r))) | ((t & 3) << (2 * r));
    }
    /// Whether ST(i) is empty.
    pub fn empty(&self, i: usize) -> bool {
        self.tag(self.phys(i)) == TAG_EMPTY
    }
    /// Value of ST(i) (whatever the tag).
    pub fn st(&self, i: usize) -> F80 {
        f80_from_bytes(&self.st_img[i & 7])
    }
    /// Writes ST(i) and its tag.
    pub fn set_st(&mut self, i: usize, v: F80) {
        let r = self.phys(i);
        self.st_img[i & 7] = f80_to_bytes(v);
        self.set_tag(r, tag_of(v));
    }
    /// Pushes a value (TOP decremented, then ST(0) written).
    pub fn push(&mut self, v: F80) {
        let t = self.top().wrapping_sub(1) & 7;
        self.set_top(t);
        self.set_st(0, v);
    }
    /// Pops: ST(0) tagged empty, TOP incremented.
    pub fn pop(&mut self) {
        let r = self.phys(0);
        self.set_tag(r, TAG_EMPTY);
        self.set_top(self.top() + 1);
    }
    /// Recomputes ES and B from the exception flags and masks.
    pub fn update_es(&mut self) {
        if self.sw & SW_EXC & !self.cw != 0 {
            self.sw |= SW_ES | SW_B;
        } else {
            self.sw &= !(SW_ES | SW_B);
        }
    }
    /// Whether an unmasked exception is pending: the FERR# output of the FPU. A PC
    /// routes it to IRQ 13 when CR0.NE is clear; the platform polls this after each
    /// instruction (or on a change) and raises IRQ 13 while it is true.
    pub fn ferr(&self) -> bool {
        self.sw & SW_ES != 0
    }
    /// The abridged (FXSAVE) tag byte: bit r set when register r is not empty.
    pub fn abridged_tag(&self) -> u8 {
        let mut t = 0u8;
        for r in 0..8 {
            if self.tag(r) != TAG_EMPTY {
                t |= 1 << r;
            }
        }
        t
    }
    /// Rebuilds the full tag word from an abridged tag byte and the register contents.
    pub fn set_abridged_tag(&mut self, t: u8) {
        for r in 0..8 {
            let tag = if t & (1 << r) != 0 {
                tag_of(self.reg(r))
            } else {
                TAG_EMPTY
            };
            self.set_tag(r, tag);
        }
    }
    /// The tag word as FSTENV/FSAVE store it: non-empty tags recomputed from contents.
    pub fn full_tag(&self) -> u16 {
        let mut tw = 0u16;
        for r in 0..8 {
            let t = if self.tag(r) == TAG_EMPTY {
                TAG_EMPTY
            } else {
                tag_of(self.reg(r))
            };
            tw |= t << (2 * r);
        }
        tw
    }
}

#[cfg(all(test, target_arch = "x86_64"))]
pub(crate) mod host_tests;

#[cfg(test)]
mod layout_tests {
    use super::*;

    fn val(k: u64) -> F80 {
        F80 {
            mant: 0x8000_0000_0000_0000 | k,
            se: 0x3fff + k as u16,
        }
    }

    #[test]
    fn top_changes_keep_the_physical_registers() {
        let mut f = FpuState::default();
        for r in 0..8 {
            f.set_reg(r, val(r as u64));
        }
        for t in [3, 0, 7, 5, 1] {
            f.set_top(t);
            for r in 0..8 {
                assert_eq!(f.reg(r), val(r as u64), "R{r} after TOP = {t}");
            }
            for i in 0..8 {
                assert_eq!(f.st(i), val(((t + i) & 7) as u64), "ST({i}) with TOP = {t}");
            }
        }
        // push/pop: ST(1) is the old ST(0); FNINIT keeps R0-R7 and sets TOP to 0.
        let st0 = f.st(0);
        f.push(val(99));
        assert_eq!((f.st(0), f.st(1)), (val(99), st0));
        f.pop();
        assert_eq!(f.st(0), st0);
        let regs: Vec<F80> = (0..8).map(|r| f.reg(r)).collect();
        f.init();
        assert_eq!(f.top(), 0);
        assert_eq!((0..8).map(|r| f.reg(r)).collect::<Vec<_>>(), regs);
        // set_sw moves TOP the same way.
        f.set_sw(6 << 11 | SW_C3);
        assert_eq!(f.st(0), regs[6]);
        assert_eq!(f.sw, 6 << 11 | SW_C3);
    }

    /// The layout is the host's FNSAVE image: FRSTOR of a state and FNSAVE back give
    /// the same control, status and tag words and registers (x86-64 hosts).
    #[cfg(target_arch = "x86_64")]
    #[test]
    fn host_frstor_fnsave_round_trip() {
        let mut f = FpuState {
            cw: 0x0b7f,
            ..Default::default()
        };
        f.set_sw(5 << 11 | SW_C1 | SW_C3);
        f.push(val(1));
        f.push(F80::ZERO);
        f.push(F80::INDEFINITE);
        f.push(val(7));
        let mut g = FpuState::default();
        // SAFETY: FRSTOR reads and FNSAVE writes FSAVE_IMAGE_LEN bytes at the start of
        // an `FpuState` (repr(C), larger than the image); FNSAVE leaves the host's x87
        // initialised, as it was. Nothing else is touched.
        unsafe {
            std::arch::asm!(
                "frstor [{a}]",
                "fnsave [{b}]",
                a = in(reg) &f as *const FpuState,
                b = in(reg) &mut g as *mut FpuState,
            );
        }
        assert_eq!((g.cw, g.sw, g.tw), (f.cw, f.sw, f.full_tag()));
        assert_eq!(g.st_img, f.st_img);
    }
}
