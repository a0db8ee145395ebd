//! Differential tests against the host's own x87 (the oracle): random and edge-case
//! operands, every rounding and precision control, results and status bits compared
//! bit for bit.

use super::softfloat::*;
use super::F80;

/// Small xorshift generator (deterministic).
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        let mut x = self.0;
        x ^= x << 13;
        x ^= x >> 7;
        x ^= x << 17;
        self.0 = x;
        x
    }
    fn below(&mut self, n: u64) -> u64 {
        self.next() % n
    }
}

/// An operand drawn from edge-heavy distributions.
fn operand(r: &mut Rng) -> F80 {
    let sign = r.next() & 1 == 1;
    let exp: u16 = match r.below(12) {
        0 => 0,
        1 => 0x7fff,
        2 => r.below(70) as u16,
        3 => 0x7fff - r.below(70) as u16,
        4 => 16383 + r.below(130) as u16 - 65,
        5 => (16383 - 16382 + r.below(200)) as u16,
        6 => (16383 + 1023 + r.below(60) - 30) as u16,
        7 => (16383 - 1022 + r.below(120) - 60) as u16,
        8 => (16383 - 126 + r.below(60) - 30) as u16,
        9 => (16383 + 127 + r.below(20) - 10) as u16,
        _ => r.below(0x7fff) as u16,
    };
    let mut mant = match r.below(8) {
        0 => 0x8000_0000_0000_0000,
        1 => u64::MAX,
        2 => 0x8000_0000_0000_0000 | (r.next() >> r.below(64)),
        3 => 0x8000_0000_0000_0000 | (1u64 << r.below(63)),
        4 => 0xc000_0000_0000_0000 | r.next() & 0xffff_ff00_0000_0000,
        5 => 0x8000_0000_0000_0000 | (r.next() << r.below(64)),
        _ => r.next() | 0x8000_0000_0000_0000,
    };
    if r.below(25) == 0 {
        mant &= !0x8000_0000_0000_0000; // unnormal / pseudo-NaN / denormal
    }
    if exp == 0 && r.below(3) != 0 {
        mant &= !0x8000_0000_0000_0000;
    }
    if r.below(30) == 0 {
        mant = 0;
    }
    F80::new(sign, exp, mant)
}

/// A second operand, often close to the first (cancellation, ties).
fn operand2(r: &mut Rng, a: F80) -> F80 {
    match r.below(4) {
        0 => {
            let d = r.below(80) as i32 - 40;
            let e = (a.exp() as i32 + d).clamp(0, 0x7ffe) as u16;
            let m = if r.below(2) == 0 {
                a.mant ^ (1 << r.below(64))
            } else {
                r.next() | 0x8000_0000_0000_0000
            };
            F80::new(r.next() & 1 == 1, e, m)
        }
        _ => operand(r),
    }
}

const CW_NEAR: u16 = 0x037f;

fn cw_of(rc: u16, pc: u16, masks: u16) -> u16 {
    (rc << 10) | (pc << 8) | masks | 0x40
}

macro_rules! host_binop {
    ($name:ident, $insn:literal) => {
        /// ST(0) = ST(0) op ST(1) on the host x87, with ST(0)=a, ST(1)=b.
        fn $name(a: F80, b: F80, cw: u16) -> (F80, u16) {
            let ab = f80b(a);
            let bb = f80b(b);
            let mut rb = [0u8; 10];
            let mut sw: u16 = 0;
            // SAFETY: the asm reads/writes only the buffers passed in (10-byte operands
            // and a 2-byte status word), leaves the x87 stack empty (fninit) and clears
            // pending exceptions before any waiting instruction, so no trap happens.
            unsafe {
                core::arch::asm!(
                    "fninit",
                    "fldcw ({cw})",
                    "fldt ({b})",
                    "fldt ({a})",
                    $insn,
                    "fnstsw ({sw})",
                    "fnclex",
                    "fstpt ({r})",
                    "fninit",
                    cw = in(reg) &cw,
                    a = in(reg) ab.as_ptr(),
                    b = in(reg) bb.as_ptr(),
                    r = in(reg) rb.as_mut_ptr(),
                    sw = in(reg) &mut sw,
                    out("st(0)") _, out("st(1)") _, out("st(2)") _, out("st(3)") _,
                    out("st(4)") _, out("st(5)") _, out("st(6)") _, out("st(7)") _,
                    options(att_syntax, nostack),
                );
            }
            (bf80(&rb), sw)
        }
    };
}

fn f80b(v: F80) -> [u8; 10] {
    let mut b = [0u8; 10];
    b[..8].copy_from_slice(&v.mant.to_le_bytes());
    b[8..].copy_from_slice(&v.se.to_le_bytes());
    b
}
fn bf80(b: &[u8; 10]) -> F80 {
    F80 {
        mant: u64::from_le_bytes(b[..8].try_into().unwrap()),
        se: u16::from_le_bytes([b[8], b[9]]),
    }
}

host_binop!(h_add, "fadd %st(1), %st");
host_binop!(h_sub, "fsub %st(1), %st");
host_binop!(h_mul, "fmul %st(1), %st");
host_binop!(h_div, "fdiv %st(1), %st");
host_binop!(h_sqrt, "fsqrt");
host_binop!(h_rndint, "frndint");
host_binop!(h_scale, "fscale");
host_binop!(h_prem, "fprem");
host_binop!(h_prem1, "fprem1");
host_binop!(h_com, "fcom %st(1)");
host_binop!(h_ucom, "fucom %st(1)");
host_binop!(h_xam, "fxam");

/// The status bits we compare: exceptions, SF, C0-C3 (TOP, ES, B excluded).
const CMP_MASK: u16 = 0x477f;

fn soft_sw(ctx: &Ctx) -> u16 {
    ctx.flags & (0x7f | C1 | 0x4500)
}

fn run_binop(
    name: &str,
    host: fn(F80, F80, u16) -> (F80, u16),
    soft: fn(&mut Ctx, F80, F80) -> Option<F80>,
    n: usize,
    seed: u64,
    masks: u16,
) -> (usize, usize) {
    let mut r = Rng(seed);
    let mut bad = 0;
    let mut total = 0;
    for rc in 0..4 {
        for pc in [0u16, 2, 3] {
            let cw = cw_of(rc, pc, masks);
            for _ in 0..n {
                let a = operand(&mut r);
                let b = operand2(&mut r, a);
                let (hr, hsw) = host(a, b, cw);
                let mut ctx = Ctx::new(cw);
                let sr = soft(&mut ctx, a, b)
                    .filter(|_| !ctx.pre_fault())
                    .unwrap_or(a);
                let ssw = soft_sw(&ctx);
                total += 1;
                if hr != sr || (hsw & CMP_MASK) != ssw {
                    if bad < 12 {
                        eprintln!(
                            "{name} cw={cw:04x} a={:04x}:{:016x} b={:04x}:{:016x} host={:04x}:{:016x} sw={:04x} soft={:04x}:{:016x} sw={:04x}",
                            a.se, a.mant, b.se, b.mant, hr.se, hr.mant, hsw & CMP_MASK, sr.se, sr.mant, ssw
                        );
                    }
                    bad += 1;
                }
            }
        }
    }
    eprintln!("{name}: {} / {total} bit-exact", total - bad);
    (bad, total)
}

#[test]
fn add_matches_host() {
    let (bad, _) = run_binop("fadd", h_add, |c, a, b| c.add(a, b, false), 3000, 1, 0x3f);
    assert_eq!(bad, 0);
}
#[test]
fn sub_matches_host() {
    let (bad, _) = run_binop("fsub", h_sub, |c, a, b| c.add(a, b, true), 3000, 2, 0x3f);
    assert_eq!(bad, 0);
}
#[test]
fn mul_matches_host() {
    let (bad, _) = run_binop("fmul", h_mul, |c, a, b| c.mul(a, b), 3000, 3, 0x3f);
    assert_eq!(bad, 0);
}
#[test]
fn div_matches_host() {
    let (bad, _) = run_binop("fdiv", h_div, |c, a, b| c.div(a, b), 3000, 4, 0x3f);
    assert_eq!(bad, 0);
}
#[test]
fn sqrt_matches_host() {
    let (bad, _) = run_binop("fsqrt", h_sqrt, |c, a, _| c.sqrt(a), 3000, 5, 0x3f);
    assert_eq!(bad, 0);
}
#[test]
fn unmasked_arith_matches_host() {
    let mut bad = 0;
    bad += run_binop("fadd/u", h_add, |c, a, b| c.add(a, b, false), 1000, 11, 0).0;
    bad += run_binop("fmul/u", h_mul, |c, a, b| c.mul(a, b), 1000, 12, 0).0;
    bad += run_binop("fdiv/u", h_div, |c, a, b| c.div(a, b), 1000, 13, 0).0;
    bad += run_binop("fsqrt/u", h_sqrt, |c, a, _| c.sqrt(a), 1000, 14, 0).0;
    assert_eq!(bad, 0);
}
#[test]
fn frndint_matches_host() {
    let (bad, _) = run_binop("frndint", h_rndint, |c, a, _| c.round_int(a), 3000, 6, 0x3f);
    assert_eq!(bad, 0);
}
#[test]
fn fscale_matches_host() {
    let (bad, _) = run_binop("fscale", h_scale, |c, a, b| c.scale(a, b), 3000, 7, 0x3f);
    assert_eq!(bad, 0);
}
fn soft_prem(c: &mut Ctx, a: F80, b: F80, ieee: bool) -> Option<F80> {
    let r = c.prem(a, b, ieee);
    if let Some((_, q, partial)) = r {
        if !c.pre_fault() {
            c.flags &= !C1;
            if partial {
                c.flags |= 0x400;
            } else {
                if q & 1 != 0 {
                    c.flags |= C1;
                }
                if q & 2 != 0 {
                    c.flags |= 0x4000;
                }
                if q & 4 != 0 {
                    c.flags |= 0x100;
                }
            }
        }
    }
    r.map(|x| x.0)
}
#[test]
fn fprem_matches_host() {
    let f: fn(&mut Ctx, F80, F80) -> Option<F80> = |c, a, b| soft_prem(c, a, b, false);
    let g: fn(&mut Ctx, F80, F80) -> Option<F80> = |c, a, b| soft_prem(c, a, b, true);
    let (bad1, _) = run_binop("fprem", h_prem, f, 2000, 8, 0x3f);
    let (bad2, _) = run_binop("fprem1", h_prem1, g, 2000, 9, 0x3f);
    assert_eq!(bad1 + bad2, 0);
}
