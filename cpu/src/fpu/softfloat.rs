//! 80-bit extended-precision arithmetic in software, with the x87's rounding control,
//! precision control, exception flags and special-operand rules.
//!
//! Values are [`F80`]. Finite nonzero operands are unpacked to `(sign, exp, sig)` with
//! `sig` normalised (bit 63 set) and the value `sig / 2^63 * 2^exp`. Intermediate
//! results are `u128` significands normalised to bit 127 (value `sig / 2^127 * 2^exp`)
//! with the bits below the rounding point "jammed" into bit 0, and [`Ctx::round`] turns
//! them into the destination format.

use super::F80;

/// Status word bit 0: invalid operation.
pub const IE: u16 = 1 << 0;
/// Status word bit 1: denormal operand.
pub const DE: u16 = 1 << 1;
/// Status word bit 2: zero divide.
pub const ZE: u16 = 1 << 2;
/// Status word bit 3: overflow.
pub const OE: u16 = 1 << 3;
/// Status word bit 4: underflow.
pub const UE: u16 = 1 << 4;
/// Status word bit 5: precision (inexact result).
pub const PE: u16 = 1 << 5;
/// Status word bit 6: stack fault (with IE).
pub const SF: u16 = 1 << 6;
/// Status word bit 9: condition code C1 (here: "rounded up" / stack overflow).
pub const C1: u16 = 1 << 9;

/// Exponent bias of the extended format.
pub const BIAS: i32 = 16383;
/// Exponent adjustment applied to results of unmasked overflow/underflow (register
/// destinations), Intel SDM vol. 1, 8.5.4 / 8.5.5.
const WRAP: i32 = 24576;

/// Rounding control (control word bits 10-11).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rc {
    /// Round to nearest, ties to even.
    Nearest,
    /// Round toward minus infinity.
    Down,
    /// Round toward plus infinity.
    Up,
    /// Round toward zero.
    Zero,
}

/// What kind of value an [`F80`] holds (387+ interpretation).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Kind {
    /// +0 or -0.
    Zero,
    /// Normal, denormal or pseudo-denormal.
    Finite,
    /// Infinity.
    Inf,
    /// Quiet NaN.
    QNan,
    /// Signalling NaN.
    SNan,
    /// Unnormal, pseudo-NaN, pseudo-infinity: an invalid operand on a 387 and later.
    Unsupported,
}

const INT_BIT: u64 = 1 << 63;
const QUIET_BIT: u64 = 1 << 62;

impl F80 {
    /// The "real indefinite" QNaN.
    pub const INDEFINITE: F80 = F80 {
        mant: 0xc000_0000_0000_0000,
        se: 0xffff,
    };
    /// +0.
    pub const ZERO: F80 = F80 { mant: 0, se: 0 };

    /// Builds a value from sign, biased exponent and significand.
    pub const fn new(sign: bool, exp: u16, mant: u64) -> F80 {
        F80 {
            mant,
            se: ((sign as u16) << 15) | (exp & 0x7fff),
        }
    }
    /// Sign bit.
    pub fn sign(&self) -> bool {
        self.se & 0x8000 != 0
    }
    /// Biased exponent field.
    pub fn exp(&self) -> u16 {
        self.se & 0x7fff
    }
    /// Signed infinity.
    pub const fn inf(sign: bool) -> F80 {
        F80::new(sign, 0x7fff, INT_BIT)
    }
    /// Signed zero.
    pub const fn zero(sign: bool) -> F80 {
        F80::new(sign, 0, 0)
    }
    /// The value with its sign replaced.
    pub fn with_sign(self, sign: bool) -> F80 {
        F80::new(sign, self.exp(), self.mant)
    }
    /// Classifies the value.
    pub fn kind(&self) -> Kind {
        let e = self.exp();
        let m = self.mant;
        if e == 0x7fff {
            if m & INT_BIT == 0 {
                Kind::Unsupported
            } else if m << 1 == 0 {
                Kind::Inf
            } else if m & QUIET_BIT != 0 {
                Kind::QNan
            } else {
                Kind::SNan
            }
        } else if e == 0 {
            if m == 0 {
                Kind::Zero
            } else {
                Kind::Finite
            }
        } else if m & INT_BIT == 0 {
            Kind::Unsupported
        } else {
            Kind::Finite
        }
    }
    /// Whether the value is a NaN (quiet or signalling).
    pub fn is_nan(&self) -> bool {
        matches!(self.kind(), Kind::QNan | Kind::SNan)
    }
    /// Denormal or pseudo-denormal (exponent field 0, significand nonzero).
    pub fn is_denormal(&self) -> bool {
        self.exp() == 0 && self.mant != 0
    }
    /// The value with the quiet bit set.
    pub fn quiet(self) -> F80 {
        F80 {
            mant: self.mant | QUIET_BIT,
            se: self.se,
        }
    }
    /// Unpacks a finite nonzero value to (sign, exponent, normalised significand).
    pub fn unpack(&self) -> (bool, i32, u64) {
        let e = self.exp() as i32;
        let m = self.mant;
        if e == 0 {
            let lz = m.leading_zeros() as i32;
            (self.sign(), 1 - BIAS - lz, m << lz)
        } else {
            (self.sign(), e - BIAS, m)
        }
    }
}

/// Shifts right, OR-ing every bit shifted out into bit 0.
pub fn shr_jam(x: u128, n: u32) -> u128 {
    if n == 0 {
        x
    } else if n >= 128 {
        (x != 0) as u128
    } else {
        (x >> n) | ((x & ((1u128 << n) - 1)) != 0) as u128
    }
}

/// Result of rounding a value to a destination format.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rounded {
    /// A finite value: `mant` has the integer bit in bit 63 (clear for a denormal, whose
    /// `exp` is then the format's minimum exponent); `mant == 0` is zero.
    Finite {
        /// Sign.
        sign: bool,
        /// Unbiased exponent.
        exp: i32,
        /// Significand.
        mant: u64,
    },
    /// Infinity.
    Inf(bool),
    /// Nothing may be stored (unmasked overflow/underflow to a memory format).
    None,
}

/// Precision and exponent range of a destination format.
#[derive(Debug, Clone, Copy)]
pub struct Fmt {
    /// Significand bits including the integer bit.
    pub prec: u32,
    /// Smallest normal unbiased exponent.
    pub emin: i32,
    /// Largest unbiased exponent.
    pub emax: i32,
    /// Whether unmasked OE/UE deliver a wrapped result (register destinations).
    pub wrap: bool,
}

/// Single precision (m32fp).
pub const F32_FMT: Fmt = Fmt {
    prec: 24,
    emin: -126,
    emax: 127,
    wrap: false,
};
/// Double precision (m64fp).
pub const F64_FMT: Fmt = Fmt {
    prec: 53,
    emin: -1022,
    emax: 1023,
    wrap: false,
};

/// Whether tininess is detected before rounding (false: the x87 detects it after
/// rounding, as measured against the host).
const TINY_BEFORE_ROUNDING: bool = false;

/// The arithmetic context of one instruction: the control word in, the exception
/// flags (and C1) raised out.
#[derive(Debug, Clone, Copy)]
pub struct Ctx {
    /// Control word.
    pub cw: u16,
    /// Flags raised: IE DE ZE OE UE PE SF bits as in the status word, plus C1.
    pub flags: u16,
    /// A memory operand of the operation was a single/double denormal (exact in
    /// extended, but it still signals DE at the point the operation checks operands).
    pub mem_denormal: bool,
}

impl Ctx {
    /// A context for control word `cw` with no flags raised.
    pub fn new(cw: u16) -> Ctx {
        Ctx {
            cw,
            flags: 0,
            mem_denormal: false,
        }
    }
    /// Rounding control.
    pub fn rc(&self) -> Rc {
        match (self.cw >> 10) & 3 {
            0 => Rc::Nearest,
            1 => Rc::Down,
            2 => Rc::Up,
            _ => Rc::Zero,
        }
    }
    /// Whether exception `bit` is masked.
    pub fn masked(&self, bit: u16) -> bool {
        self.cw & bit != 0
    }
    /// Extended format with the precision control of the control word.
    pub fn ext_fmt(&self) -> Fmt {
        let prec = match (self.cw >> 8) & 3 {
            0 => 24,
            2 => 53,
            _ => 64,
        };
        Fmt {
            prec,
            emin: 1 - BIAS,
            emax: BIAS,
            wrap: true,
        }
    }
    /// Full 64-bit extended format (no precision control).
    pub fn ext64(&self) -> Fmt {
        Fmt {
            prec: 64,
            emin: 1 - BIAS,
            emax: BIAS,
            wrap: true,
        }
    }
    /// Raises IE; returns the masked response (real indefinite) or None.
    pub fn invalid(&mut self) -> Option<F80> {
        self.flags |= IE;
        if self.masked(IE) {
            Some(F80::INDEFINITE)
        } else {
            None
        }
    }
    /// An unmasked invalid, denormal or zero-divide exception was raised: the
    /// destination must not be written.
    pub fn pre_fault(&self) -> bool {
        self.flags & (IE | DE | ZE) & !self.cw != 0
    }

    /// Rounds `sig / 2^127 * 2^exp` (`sig` normalised, bit 127 set) to `fmt`.
    pub fn round(&mut self, sign: bool, exp: i32, sig: u128, fmt: Fmt) -> Rounded {
        let rc = self.rc();
        let mut e = exp;
        let mut s = sig;
        let drop = 128 - fmt.prec;
        let round_bits = |s: u128, sign: bool| -> (u128, bool, bool) {
            let kept = s >> drop;
            let rem = s & ((1u128 << drop) - 1);
            let half = 1u128 << (drop - 1);
            let inc = match rc {
                Rc::Nearest => rem > half || (rem == half && kept & 1 == 1),
                Rc::Down => sign && rem != 0,
                Rc::Up => !sign && rem != 0,
                Rc::Zero => false,
            };
            (kept + inc as u128, inc, rem != 0)
        };
        let mut tiny = false;
        if e < fmt.emin {
            tiny = if TINY_BEFORE_ROUNDING {
                true
            } else {
                let (k, _, _) = round_bits(s, sign);
                !(k >> fmt.prec != 0 && e + 1 >= fmt.emin)
            };
            // Unmasked underflow to a register biases the exponent up by 24576, unless
            // even that does not bring it into range (FSCALE): then the masked response.
            if fmt.wrap && !self.masked(UE) {
                if e + WRAP < fmt.emin {
                    // Beyond the bias adjustment (FSCALE): a signed zero whatever the
                    // rounding control (measured on the host).
                    self.flags |= UE | PE;
                    return Rounded::Finite {
                        sign,
                        exp: fmt.emin,
                        mant: 0,
                    };
                }
                e += WRAP;
            } else {
                s = shr_jam(s, (fmt.emin - e) as u32);
                e = fmt.emin;
            }
        }
        let (mut kept, inc, inexact) = round_bits(s, sign);
        if kept >> fmt.prec != 0 {
            kept >>= 1;
            e += 1;
        }
        if tiny {
            if !self.masked(UE) {
                self.flags |= UE;
                if !fmt.wrap {
                    return Rounded::None;
                }
            } else if inexact {
                self.flags |= UE;
            }
        }
        if e > fmt.emax {
            self.flags |= OE;
            if !self.masked(OE) {
                if !fmt.wrap {
                    return Rounded::None;
                }
                if e - WRAP > fmt.emax {
                    // Beyond the bias adjustment (FSCALE): infinity whatever the rounding
                    // control, C1 set (measured on the host).
                    self.flags |= PE | C1;
                    return Rounded::Inf(sign);
                }
                e -= WRAP;
            } else {
                self.flags |= PE;
                let to_inf = match rc {
                    Rc::Nearest => true,
                    Rc::Down => sign,
                    Rc::Up => !sign,
                    Rc::Zero => false,
                };
                if to_inf {
                    self.flags |= C1;
                    return Rounded::Inf(sign);
                }
                let mant = (u64::MAX >> (64 - fmt.prec)) << (64 - fmt.prec);
                return Rounded::Finite {
                    sign,
                    exp: fmt.emax,
                    mant,
                };
            }
        }
        if inexact {
            self.flags |= PE;
            if inc {
                self.flags |= C1;
            }
        }
        Rounded::Finite {
            sign,
            exp: e,
            mant: (kept as u64) << (64 - fmt.prec),
        }
    }

    /// Rounds to the extended format (precision control applied if `pc`).
    pub fn round_ext(&mut self, sign: bool, exp: i32, sig: u128, pc: bool) -> F80 {
        let fmt = if pc { self.ext_fmt() } else { self.ext64() };
        pack_ext(self.round(sign, exp, sig, fmt))
    }

    /// NaN propagation for two operands (at least one NaN): the QNaN of the larger
    /// significand, signalling NaNs quieted, IE if any is signalling.
    pub fn propagate(&mut self, a: F80, b: F80) -> Option<F80> {
        let (ka, kb) = (a.kind(), b.kind());
        if ka == Kind::SNan || kb == Kind::SNan {
            self.flags |= IE;
            if !self.masked(IE) {
                return None;
            }
        }
        let an = matches!(ka, Kind::QNan | Kind::SNan);
        let bn = matches!(kb, Kind::QNan | Kind::SNan);
        let r = if an && bn {
            let (qa, qb) = (a.quiet(), b.quiet());
            if ka == Kind::QNan && kb == Kind::SNan {
                a
            } else if kb == Kind::QNan && ka == Kind::SNan {
                b
            } else if qa.mant > qb.mant {
                qa
            } else if qb.mant > qa.mant {
                qb
            } else if !qa.sign() {
                qa
            } else {
                qb
            }
        } else if an {
            a
        } else {
            b
        };
        Some(r.quiet())
    }

    /// Common screening of two operands: unsupported → IE, NaN → propagation,
    /// denormal → DE. Returns `Err(result)` when the result is decided.
    fn screen2(&mut self, a: F80, b: F80) -> Result<(Kind, Kind), Option<F80>> {
        let k = self.screen2_nan(a, b)?;
        self.screen_de(a, b)?;
        Ok(k)
    }

    /// Unsupported and NaN operands only.
    fn screen2_nan(&mut self, a: F80, b: F80) -> Result<(Kind, Kind), Option<F80>> {
        let (ka, kb) = (a.kind(), b.kind());
        if ka == Kind::Unsupported || kb == Kind::Unsupported {
            return Err(self.invalid());
        }
        if matches!(ka, Kind::QNan | Kind::SNan) || matches!(kb, Kind::QNan | Kind::SNan) {
            return Err(self.propagate(a, b));
        }
        Ok((ka, kb))
    }

    /// DE for denormal operands.
    fn screen_de(&mut self, a: F80, b: F80) -> Result<(), Option<F80>> {
        if a.is_denormal() || b.is_denormal() || self.mem_denormal {
            self.flags |= DE;
            if !self.masked(DE) {
                return Err(None);
            }
        }
        Ok(())
    }

    /// a + b (or a - b when `sub`).
    pub fn add(&mut self, a: F80, b: F80, sub: bool) -> Option<F80> {
        let (ka, kb) = match self.screen2(a, b) {
            Ok(k) => k,
            Err(r) => return r,
        };
        let bs = b.sign() ^ sub;
        match (ka, kb) {
            (Kind::Inf, Kind::Inf) => {
                if a.sign() != bs {
                    return self.invalid();
                }
                return Some(a);
            }
            (Kind::Inf, _) => return Some(a),
            (_, Kind::Inf) => return Some(F80::inf(bs)),
            (Kind::Zero, Kind::Zero) => {
                let s = if a.sign() == bs {
                    bs
                } else {
                    self.rc() == Rc::Down
                };
                return Some(F80::zero(s));
            }
            (Kind::Zero, _) => {
                let (s, e, m) = b.unpack();
                let _ = s;
                return Some(self.round_ext(bs, e, (m as u128) << 64, true));
            }
            (_, Kind::Zero) => {
                let (s, e, m) = a.unpack();
                return Some(self.round_ext(s, e, (m as u128) << 64, true));
            }
            _ => {}
        }
        let (sa, ea, ma) = a.unpack();
        let (_, eb, mb) = b.unpack();
        let (mut sa, mut ea, mut ma, mut sb, mut eb, mut mb) = (sa, ea, ma, bs, eb, mb);
        if eb > ea || (eb == ea && mb > ma) {
            std::mem::swap(&mut sa, &mut sb);
            std::mem::swap(&mut ea, &mut eb);
            std::mem::swap(&mut ma, &mut mb);
        }
        let x = (ma as u128) << 63;
        let y = shr_jam((mb as u128) << 63, (ea - eb) as u32);
        let r = if sa == sb { x + y } else { x - y };
        if r == 0 {
            return Some(F80::zero(self.rc() == Rc::Down));
        }
        let lz = r.leading_zeros() as i32;
        Some(self.round_ext(sa, ea + 1 - lz, r << lz, true))
    }

    /// a * b.
    pub fn mul(&mut self, a: F80, b: F80) -> Option<F80> {
        let (ka, kb) = match self.screen2(a, b) {
            Ok(k) => k,
            Err(r) => return r,
        };
        let s = a.sign() ^ b.sign();
        match (ka, kb) {
            (Kind::Inf, Kind::Zero) | (Kind::Zero, Kind::Inf) => return self.invalid(),
            (Kind::Inf, _) | (_, Kind::Inf) => return Some(F80::inf(s)),
            (Kind::Zero, _) | (_, Kind::Zero) => return Some(F80::zero(s)),
            _ => {}
        }
        let (_, ea, ma) = a.unpack();
        let (_, eb, mb) = b.unpack();
        let p = ma as u128 * mb as u128;
        let lz = p.leading_zeros() as i32;
        Some(self.round_ext(s, ea + eb + 1 - lz, p << lz, true))
    }

    /// a / b.
    pub fn div(&mut self, a: F80, b: F80) -> Option<F80> {
        let (ka, kb) = match self.screen2_nan(a, b) {
            Ok(k) => k,
            Err(r) => return r,
        };
        // x / 0 with x finite: ZE alone, even for a denormal dividend.
        if !(kb == Kind::Zero && ka == Kind::Finite) {
            if let Err(r) = self.screen_de(a, b) {
                return r;
            }
        }
        let s = a.sign() ^ b.sign();
        match (ka, kb) {
            (Kind::Inf, Kind::Inf) | (Kind::Zero, Kind::Zero) => return self.invalid(),
            (Kind::Inf, _) => return Some(F80::inf(s)),
            (_, Kind::Inf) => return Some(F80::zero(s)),
            (Kind::Zero, _) => return Some(F80::zero(s)),
            (_, Kind::Zero) => {
                self.flags |= ZE;
                if !self.masked(ZE) {
                    return None;
                }
                return Some(F80::inf(s));
            }
            _ => {}
        }
        let (_, ea, ma) = a.unpack();
        let (_, eb, mb) = b.unpack();
        let (sig, e) = div_sig(ma, mb);
        Some(self.round_ext(s, ea - eb + e, sig, true))
    }

    /// Square root.
    pub fn sqrt(&mut self, a: F80) -> Option<F80> {
        match a.kind() {
            Kind::Unsupported => return self.invalid(),
            Kind::SNan | Kind::QNan => return self.propagate(a, a),
            Kind::Zero => return Some(a),
            Kind::Inf => {
                if a.sign() {
                    return self.invalid();
                }
                return Some(a);
            }
            Kind::Finite => {}
        }
        if a.sign() {
            return self.invalid();
        }
        if a.is_denormal() {
            self.flags |= DE;
            if !self.masked(DE) {
                return None;
            }
        }
        let (_, e, m) = a.unpack();
        let r = if e & 1 == 0 {
            (m as u128) << 63
        } else {
            (m as u128) << 64
        };
        let q = isqrt128(r);
        let rem = r - q as u128 * q as u128;
        let sig = ((q as u128) << 64) | (((rem > q as u128) as u128) << 63) | (rem != 0) as u128;
        Some(self.round_ext(false, e.div_euclid(2), sig, true))
    }

    /// Compares a with b: `None` if unordered. `quiet` (FUCOM*) raises IE only for
    /// signalling NaNs; otherwise any NaN raises IE. Unsupported operands always do.
    pub fn compare(&mut self, a: F80, b: F80, quiet: bool) -> Option<std::cmp::Ordering> {
        use std::cmp::Ordering;
        let (ka, kb) = (a.kind(), b.kind());
        if ka == Kind::Unsupported || kb == Kind::Unsupported {
            self.flags |= IE;
            return None;
        }
        let nan = |k| matches!(k, Kind::QNan | Kind::SNan);
        if nan(ka) || nan(kb) {
            if !quiet || ka == Kind::SNan || kb == Kind::SNan {
                self.flags |= IE;
            }
            return None;
        }
        if a.is_denormal() || b.is_denormal() || self.mem_denormal {
            self.flags |= DE;
        }
        let key = |x: F80, k: Kind| -> (i32, i32, u64) {
            // (sign-adjusted class, exponent, significand) for magnitude ordering.
            match k {
                Kind::Zero => (0, 0, 0),
                Kind::Inf => (2, 0, 0),
                _ => {
                    let (_, e, m) = x.unpack();
                    (1, e, m)
                }
            }
        };
        let (ma, mb) = (key(a, ka), key(b, kb));
        let za = ka == Kind::Zero;
        let zb = kb == Kind::Zero;
        if za && zb {
            return Some(Ordering::Equal);
        }
        let sa = if za { false } else { a.sign() };
        let sb = if zb { false } else { b.sign() };
        if sa != sb {
            return Some(if sa {
                Ordering::Less
            } else {
                Ordering::Greater
            });
        }
        let o = ma.cmp(&mb);
        Some(if sa { o.reverse() } else { o })
    }

    /// Converts a single-precision operand of an arithmetic instruction: exact, a
    /// signalling NaN stays signalling, a denormal sets `mem_denormal` (DE is raised by
    /// the operation after its NaN checks).
    pub fn operand_f32(&mut self, v: u32) -> F80 {
        let mut c = Ctx::new(self.cw);
        let r = c.from_f32(v);
        self.mem_denormal |= c.flags & DE != 0;
        if c.flags & IE != 0 {
            F80 {
                mant: r.mant & !QUIET_BIT,
                se: r.se,
            }
        } else {
            r
        }
    }

    /// Double-precision counterpart of [`Ctx::operand_f32`].
    pub fn operand_f64(&mut self, v: u64) -> F80 {
        let mut c = Ctx::new(self.cw);
        let r = c.from_f64(v);
        self.mem_denormal |= c.flags & DE != 0;
        if c.flags & IE != 0 {
            F80 {
                mant: r.mant & !QUIET_BIT,
                se: r.se,
            }
        } else {
            r
        }
    }

    /// Loads a single-precision value (exact; SNaN → IE and quieted; denormal → DE).
    pub fn from_f32(&mut self, v: u32) -> F80 {
        let sign = v >> 31 != 0;
        let e = ((v >> 23) & 0xff) as i32;
        let f = (v & 0x7f_ffff) as u64;
        self.load_ieee(sign, e, f, 23, 0xff, 127)
    }

    /// Loads a double-precision value (exact; SNaN → IE and quieted; denormal → DE).
    pub fn from_f64(&mut self, v: u64) -> F80 {
        let sign = v >> 63 != 0;
        let e = ((v >> 52) & 0x7ff) as i32;
        let f = v & ((1 << 52) - 1);
        self.load_ieee(sign, e, f, 52, 0x7ff, 1023)
    }

    fn load_ieee(&mut self, sign: bool, e: i32, f: u64, fbits: u32, emaxf: i32, bias: i32) -> F80 {
        if e == emaxf {
            if f == 0 {
                return F80::inf(sign);
            }
            let m = INT_BIT | (f << (63 - fbits));
            if m & QUIET_BIT == 0 {
                self.flags |= IE;
            }
            return F80::new(sign, 0x7fff, m | QUIET_BIT);
        }
        if e == 0 {
            if f == 0 {
                return F80::zero(sign);
            }
            self.flags |= DE;
            let lz = f.leading_zeros() as i32;
            let m = f << lz;
            // value = f * 2^(1 - bias - fbits) = m/2^63 * 2^(1 - bias - fbits + 63 - lz)
            let ex = 1 - bias - fbits as i32 + 63 - lz;
            return F80::new(sign, (ex + BIAS) as u16, m);
        }
        F80::new(
            sign,
            (e - bias + BIAS) as u16,
            INT_BIT | (f << (63 - fbits)),
        )
    }

    /// Rounds to single precision. `None`: nothing stored (unmasked exception).
    pub fn to_f32(&mut self, a: F80) -> Option<u32> {
        self.store_ieee(a, F32_FMT, 23, 127).map(|v| v as u32)
    }

    /// Rounds to double precision. `None`: nothing stored (unmasked exception).
    pub fn to_f64(&mut self, a: F80) -> Option<u64> {
        self.store_ieee(a, F64_FMT, 52, 1023)
    }

    fn store_ieee(&mut self, a: F80, fmt: Fmt, fbits: u32, bias: i32) -> Option<u64> {
        let total = fbits + 1 + (if fbits == 23 { 8 } else { 11 });
        let sign_bit = (a.sign() as u64) << (total - 1);
        let emaxf: u64 = (bias as u64) * 2 + 1;
        let inf = sign_bit | (emaxf << fbits);
        match a.kind() {
            Kind::Unsupported => {
                self.invalid()?;
                return Some((1u64 << (total - 1)) | (emaxf << fbits) | (1 << (fbits - 1)));
            }
            Kind::SNan | Kind::QNan => {
                if a.kind() == Kind::SNan {
                    self.flags |= IE;
                    if !self.masked(IE) {
                        return None;
                    }
                }
                let f = ((a.mant | QUIET_BIT) << 1) >> (64 - fbits);
                return Some(inf | f);
            }
            Kind::Inf => return Some(inf),
            Kind::Zero => return Some(sign_bit),
            Kind::Finite => {}
        }
        // Stores do not signal DE for denormal sources (measured on the host).
        let (s, e, m) = a.unpack();
        match self.round(s, e, (m as u128) << 64, fmt) {
            Rounded::None => None,
            Rounded::Inf(_) => Some(inf),
            Rounded::Finite { exp, mant, .. } => {
                if mant == 0 {
                    return Some(sign_bit);
                }
                let f = (mant << 1) >> (64 - fbits);
                let ef = if mant & INT_BIT == 0 {
                    0
                } else {
                    (exp + bias) as u64
                };
                Some(sign_bit | (ef << fbits) | f)
            }
        }
    }

    /// Converts a signed integer exactly.
    pub fn from_int(&mut self, v: i64) -> F80 {
        if v == 0 {
            return F80::ZERO;
        }
        let m = v.unsigned_abs();
        let lz = m.leading_zeros();
        F80::new(v < 0, (BIAS + 63 - lz as i32) as u16, m << lz)
    }

    /// Rounds a finite nonzero value to an integer magnitude according to RC:
    /// (magnitude, inexact, rounded up). `None` if the magnitude is 2^64 or more.
    fn round_to_int(&self, sign: bool, e: i32, m: u64) -> Option<(u64, bool, bool)> {
        if e >= 64 {
            return None;
        }
        if e >= 63 {
            return Some((m, false, false));
        }
        let sh = (63 - e) as u32;
        let x = (m as u128) << 64;
        let x = shr_jam(x, sh.min(127));
        let kept = (x >> 64) as u64;
        let rem = x as u64;
        let half = 1u64 << 63;
        let inc = match self.rc() {
            Rc::Nearest => rem > half || (rem == half && kept & 1 == 1),
            Rc::Down => sign && rem != 0,
            Rc::Up => !sign && rem != 0,
            Rc::Zero => false,
        };
        let (v, ovf) = kept.overflowing_add(inc as u64);
        if ovf {
            return None;
        }
        Some((v, rem != 0, inc))
    }

    /// FRNDINT: rounds to an integral value per RC.
    pub fn round_int(&mut self, a: F80) -> Option<F80> {
        match a.kind() {
            Kind::Unsupported => return self.invalid(),
            Kind::SNan | Kind::QNan => return self.propagate(a, a),
            Kind::Zero | Kind::Inf => return Some(a),
            Kind::Finite => {}
        }
        if a.is_denormal() {
            self.flags |= DE;
            if !self.masked(DE) {
                return None;
            }
        }
        let (s, e, m) = a.unpack();
        if e >= 63 {
            return Some(a);
        }
        let (v, inexact, inc) = self.round_to_int(s, e, m).unwrap_or((0, false, false));
        if inexact {
            self.flags |= PE;
            if inc {
                self.flags |= C1;
            }
        }
        if v == 0 {
            return Some(F80::zero(s));
        }
        let lz = v.leading_zeros();
        Some(F80::new(s, (BIAS + 63 - lz as i32) as u16, v << lz))
    }

    /// Converts to a signed integer of `bits` (16, 32, 64) per RC. Out of range, NaN,
    /// infinity → IE and the integer indefinite (masked) or `None`.
    pub fn to_int(&mut self, a: F80, bits: u32) -> Option<i64> {
        let indefinite = i64::MIN >> (64 - bits);
        let bad = |c: &mut Ctx| {
            c.flags |= IE;
            if c.masked(IE) {
                Some(indefinite)
            } else {
                None
            }
        };
        match a.kind() {
            Kind::Zero => return Some(0),
            Kind::Finite => {}
            _ => return bad(self),
        }
        let (s, e, m) = a.unpack();
        let Some((v, inexact, inc)) = self.round_to_int(s, e, m) else {
            return bad(self);
        };
        let lim = 1u64 << (bits - 1);
        if (s && v > lim) || (!s && v >= lim) {
            return bad(self);
        }
        if inexact {
            self.flags |= PE;
            if inc {
                self.flags |= C1;
            }
        }
        Some(if s {
            (v as i64).wrapping_neg()
        } else {
            v as i64
        })
    }
}

impl Ctx {
    /// FSCALE: a * 2^trunc(b).
    pub fn scale(&mut self, a: F80, b: F80) -> Option<F80> {
        let (ka, kb) = match self.screen2(a, b) {
            Ok(k) => k,
            Err(r) => return r,
        };
        match (ka, kb) {
            (Kind::Zero, Kind::Inf) if !b.sign() => return self.invalid(),
            (Kind::Inf, Kind::Inf) if b.sign() => return self.invalid(),
            (Kind::Zero | Kind::Inf, _) => return Some(a),
            (_, Kind::Inf) => {
                return Some(if b.sign() {
                    F80::zero(a.sign())
                } else {
                    F80::inf(a.sign())
                })
            }
            _ => {}
        }
        let n: i32 = if kb == Kind::Zero {
            0
        } else {
            let (sb, eb, mb) = b.unpack();
            let mag = if eb < 0 {
                0
            } else if eb >= 20 {
                1 << 20
            } else {
                (mb >> (63 - eb)) as i32
            };
            if sb {
                -mag
            } else {
                mag
            }
        };
        let (s, e, m) = a.unpack();
        Some(self.round_ext(s, e + n, (m as u128) << 64, false))
    }

    /// FXTRACT: (exponent, significand).
    pub fn xtract(&mut self, a: F80) -> Option<(F80, F80)> {
        match a.kind() {
            Kind::Unsupported => {
                let v = self.invalid()?;
                return Some((v, v));
            }
            Kind::QNan | Kind::SNan => {
                let v = self.propagate(a, a)?;
                return Some((v, v));
            }
            Kind::Zero => {
                self.flags |= ZE;
                if !self.masked(ZE) {
                    return None;
                }
                return Some((F80::inf(true), a));
            }
            Kind::Inf => return Some((F80::inf(false), a)),
            Kind::Finite => {}
        }
        if a.is_denormal() {
            self.flags |= DE;
            if !self.masked(DE) {
                return None;
            }
        }
        let (s, e, m) = a.unpack();
        Some((self.from_int(e as i64), F80::new(s, BIAS as u16, m)))
    }

    /// FBSTP: rounds per RC to an integer and packs 18 BCD digits. Out of range,
    /// NaN, infinity → IE and the BCD indefinite (masked) or `None`.
    pub fn to_bcd(&mut self, a: F80) -> Option<[u8; 10]> {
        const INDEFINITE: [u8; 10] = [0, 0, 0, 0, 0, 0, 0, 0xc0, 0xff, 0xff];
        let saved = self.flags;
        let n = match a.kind() {
            Kind::Zero => Some(0),
            Kind::Finite => self.to_int(a, 64),
            _ => None,
        };
        let ok = matches!(n, Some(v) if self.flags & IE == saved & IE
            && v.unsigned_abs() < 1_000_000_000_000_000_000);
        if !ok {
            self.flags = saved | IE;
            return self.masked(IE).then_some(INDEFINITE);
        }
        let mut x = n.unwrap_or(0).unsigned_abs();
        let mut b = [0u8; 10];
        for byte in b.iter_mut().take(9) {
            let lo = (x % 10) as u8;
            x /= 10;
            let hi = (x % 10) as u8;
            x /= 10;
            *byte = lo | (hi << 4);
        }
        b[9] = if a.sign() { 0x80 } else { 0 };
        Some(b)
    }

    /// FPREM (truncating quotient) / FPREM1 (round-to-nearest quotient): (remainder,
    /// low quotient bits, incomplete).
    pub fn prem(&mut self, a: F80, b: F80, ieee: bool) -> Option<(F80, u64, bool)> {
        let (ka, kb) = match self.screen2_nan(a, b) {
            Ok(k) => k,
            Err(r) => return r.map(|v| (v, 0, false)),
        };
        if ka == Kind::Inf || kb == Kind::Zero {
            return self.invalid().map(|v| (v, 0, false));
        }
        if let Err(r) = self.screen_de(a, b) {
            return r.map(|v| (v, 0, false));
        }
        if ka == Kind::Zero {
            return Some((a, 0, false));
        }
        if kb == Kind::Inf {
            let (s, e, m) = a.unpack();
            return Some((self.round_ext(s, e, (m as u128) << 64, false), 0, false));
        }
        let (sa, ea, ma) = a.unpack();
        let (_, eb, mb) = b.unpack();
        let d = ea - eb;
        if d < -1 {
            return Some((self.round_ext(sa, ea, (ma as u128) << 64, false), 0, false));
        }
        let (num, den, scale, partial) = if d >= 64 {
            let n = 32 + (d & 31) as u32;
            let n = if n as i32 > d { d as u32 } else { n };
            ((ma as u128) << n, mb as u128, ea - n as i32 - 63, true)
        } else if d >= 0 {
            ((ma as u128) << d, mb as u128, eb - 63, false)
        } else {
            (ma as u128, (mb as u128) << 1, ea - 63, false)
        };
        let mut q = num / den;
        let mut r = num % den;
        let mut sign = sa;
        if ieee && !partial && (2 * r > den || (2 * r == den && q & 1 == 1)) {
            r = den - r;
            q += 1;
            sign = !sign;
        }
        if r == 0 {
            return Some((F80::zero(sa), q as u64, partial));
        }
        let lz = r.leading_zeros() as i32;
        let v = self.round_ext(sign, scale + 127 - lz, r << lz, false);
        Some((v, q as u64, partial))
    }
}

/// Packs a rounded extended result.
pub fn pack_ext(r: Rounded) -> F80 {
    match r {
        Rounded::Inf(s) => F80::inf(s),
        Rounded::None => F80::INDEFINITE,
        Rounded::Finite { sign, exp, mant } => {
            if mant & INT_BIT == 0 {
                F80::new(sign, 0, mant)
            } else {
                F80::new(sign, (exp + BIAS) as u16, mant)
            }
        }
    }
}

/// Quotient significand of `ma / mb` normalised to bit 127 with sticky bit, and the
/// exponent adjustment (0 or -1).
pub fn div_sig(ma: u64, mb: u64) -> (u128, i32) {
    let n = (ma as u128) << 64;
    let q = n / mb as u128;
    let r = n % mb as u128;
    let n2 = r << 64;
    let extra = n2 / mb as u128;
    let r2 = n2 % mb as u128;
    if q >> 64 != 0 {
        let sig = (q << 63) | (extra >> 1) | ((extra & 1 != 0 || r2 != 0) as u128);
        (sig, 0)
    } else {
        let sig = (q << 64) | extra | (r2 != 0) as u128;
        (sig, -1)
    }
}

/// Integer square root of a 128-bit number (floor).
pub fn isqrt128(n: u128) -> u64 {
    let mut x = n;
    let mut res: u128 = 0;
    let mut bit: u128 = 1 << 126;
    while bit > n {
        bit >>= 2;
    }
    while bit != 0 {
        if x >= res + bit {
            x -= res + bit;
            res = (res >> 1) + bit;
        } else {
            res >>= 1;
        }
        bit >>= 2;
    }
    res as u64
}
