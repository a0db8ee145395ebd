//! Differential tests against the host's own x87 (the oracle): random and edge-case
//! operands, every rounding and precision control, results and status bits compared
//! bit for bit.

use super::softfloat::*;
use super::F80;

/// Runs `insns` on the host x87 between `fninit; fldcw ({cw})` and a closing `fninit`
/// (the x87 is left empty). The instructions may name `{a}` and `{b}` (inputs), `{r}`
/// (the output buffer) and `{sw}` (a status-word slot): pointers the caller passes
/// (null when unused). RAX and the x87 stack are clobbered. The shared harness of the
/// host-x87 comparison tests here and in `interp/fpu.rs`.
macro_rules! host_x87 {
    (cw: $cw:expr, a: $a:expr, b: $b:expr, r: $r:expr, sw: $sw:expr; $($insn:expr),+ $(,)?) => {
        // SAFETY: each caller passes pointers to live buffers at least as large as
        // what its instructions read ({a}, {b}) or write ({r}, {sw}); no exception is
        // pending at a waiting instruction (the sequences run FNCLEX first wherever an
        // earlier one may have flagged one), so nothing traps; the clobbers declare
        // every register touched.
        unsafe {
            core::arch::asm!(
                "fninit",
                "fldcw ({cw})",
                $($insn,)+
                "fninit",
                "# operands: {a} {b} {r} {sw}",
                cw = in(reg) $cw,
                a = in(reg) $a,
                b = in(reg) $b,
                r = in(reg) $r,
                sw = in(reg) $sw,
                out("rax") _,
                out("st(0)") _, out("st(1)") _, out("st(2)") _, out("st(3)") _,
                out("st(4)") _, out("st(5)") _, out("st(6)") _, out("st(7)") _,
                options(att_syntax, nostack),
            );
        }
    };
}
pub(crate) use host_x87;

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
            host_x87!(
                cw: &cw, a: ab.as_ptr(), b: bb.as_ptr(), r: rb.as_mut_ptr(), sw: &mut sw;
                "fldt ({b})",
                "fldt ({a})",
                $insn,
                "fnstsw ({sw})",
                "fnclex",
                "fstpt ({r})",
            );
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

macro_rules! host_unop {
    ($name:ident, $($insn:literal),+) => {
        /// Runs the instructions on the host with `a` (32-byte buffer) as input and
        /// `r` (32 bytes, prefilled) as output; returns (output, status word).
        fn $name(a: [u8; 32], r0: [u8; 32], cw: u16) -> ([u8; 32], u16) {
            let mut rb = r0;
            let mut sw: u16 = 0;
            host_x87!(
                cw: &cw, a: a.as_ptr(), b: core::ptr::null::<u8>(), r: rb.as_mut_ptr(), sw: &mut sw;
                $($insn,)+
            );
            (rb, sw)
        }
    };
}

host_unop!(
    h_flds,
    "flds ({a})",
    "fnstsw ({sw})",
    "fnclex",
    "fstpt ({r})"
);
host_unop!(
    h_fldl,
    "fldl ({a})",
    "fnstsw ({sw})",
    "fnclex",
    "fstpt ({r})"
);
host_unop!(
    h_fstps,
    "fldt ({a})",
    "fstps ({r})",
    "fnstsw ({sw})",
    "fnclex"
);
host_unop!(
    h_fstpl,
    "fldt ({a})",
    "fstpl ({r})",
    "fnstsw ({sw})",
    "fnclex"
);
host_unop!(
    h_fistps,
    "fldt ({a})",
    "fistps ({r})",
    "fnstsw ({sw})",
    "fnclex"
);
host_unop!(
    h_fistpl,
    "fldt ({a})",
    "fistpl ({r})",
    "fnstsw ({sw})",
    "fnclex"
);
host_unop!(
    h_fistpll,
    "fldt ({a})",
    "fistpll ({r})",
    "fnstsw ({sw})",
    "fnclex"
);
host_unop!(
    h_fbstp,
    "fldt ({a})",
    "fbstp ({r})",
    "fnstsw ({sw})",
    "fnclex"
);
host_unop!(
    h_fxtract,
    "fldt ({a})",
    "fxtract",
    "fnstsw ({sw})",
    "fnclex",
    "fstpt ({r})",
    "fstpt 16({r})"
);

fn buf16(v: F80) -> [u8; 32] {
    let mut b = [0u8; 32];
    b[..10].copy_from_slice(&f80b(v));
    b
}

fn ieee_operand(r: &mut Rng, bits: u32) -> u64 {
    let (ebits, fbits) = if bits == 32 { (8, 23) } else { (11, 52) };
    let emax = (1u64 << ebits) - 1;
    let e = match r.below(5) {
        0 => 0,
        1 => emax,
        2 => r.below(3),
        _ => r.below(emax + 1),
    };
    let f = match r.below(4) {
        0 => 0,
        1 => 1 << r.below(fbits),
        _ => r.next() & ((1 << fbits) - 1),
    };
    ((r.next() & 1) << (bits - 1)) | (e << fbits) | f
}

#[test]
fn loads_match_host() {
    let mut r = Rng(21);
    let mut bad = 0;
    let mut total = 0;
    for masks in [0x3f, 0] {
        let cw = cw_of(0, 3, masks);
        for _ in 0..20000 {
            let v32 = ieee_operand(&mut r, 32) as u32;
            let v64 = ieee_operand(&mut r, 64);
            // With an unmasked exception the load does not happen: FSTP stores the
            // empty register's stale content, which we do not model; skip the value.
            let mut check = |name: &str, bits: &[u8], host: HostUnop, c: &mut Ctx, s: F80| {
                let mut a = [0u8; 32];
                a[..bits.len()].copy_from_slice(bits);
                let (h, hsw) = host(a, [0; 32], cw);
                let hv = bf80(h[..10].try_into().unwrap());
                total += 1;
                if (hsw & CMP_MASK) != soft_sw(c) || (!c.pre_fault() && hv != s) {
                    bad += 1;
                    eprintln!(
                        "{name} {bits:02x?} cw={cw:04x} host {hv:?} {hsw:04x} soft {s:?} {:04x}",
                        c.flags
                    );
                }
            };
            let mut c = Ctx::new(cw);
            let s = c.from_f32(v32);
            check("flds", &v32.to_le_bytes(), h_flds, &mut c, s);
            let mut c = Ctx::new(cw);
            let s = c.from_f64(v64);
            check("fldl", &v64.to_le_bytes(), h_fldl, &mut c, s);
        }
    }
    eprintln!("loads: {} / {total} bit-exact", total - bad);
    assert_eq!(bad, 0);
}

/// A host instruction sequence over 32-byte in/out buffers.
type HostUnop = fn([u8; 32], [u8; 32], u16) -> ([u8; 32], u16);

type Store = fn(&mut Ctx, F80) -> Option<Vec<u8>>;

fn run_store(name: &str, host: HostUnop, soft: Store, seed: u64) -> usize {
    let mut r = Rng(seed);
    let mut bad = 0;
    let mut total = 0;
    for masks in [0x3f, 0x00] {
        for rc in 0..4 {
            let cw = cw_of(rc, 3, masks);
            for _ in 0..3000 {
                let a = operand(&mut r);
                let fill = [0x5a; 32];
                let (h, hsw) = host(buf16(a), fill, cw);
                let mut c = Ctx::new(cw);
                let mut sv = fill;
                if let Some(bytes) = soft(&mut c, a) {
                    sv[..bytes.len()].copy_from_slice(&bytes);
                }
                total += 1;
                if (hsw & CMP_MASK) != soft_sw(&c) || h != sv {
                    if bad < 10 {
                        eprintln!(
                            "{name} cw={cw:04x} a={:04x}:{:016x} host={:02x?} {:04x} soft={:02x?} {:04x}",
                            a.se,
                            a.mant,
                            &h[..10],
                            hsw & CMP_MASK,
                            &sv[..10],
                            soft_sw(&c)
                        );
                    }
                    bad += 1;
                }
            }
        }
    }
    eprintln!("{name}: {} / {total} bit-exact", total - bad);
    bad
}

#[test]
fn stores_match_host() {
    let mut bad = 0;
    bad += run_store(
        "fstp m32",
        h_fstps,
        |c, a| c.to_f32(a).map(|v| v.to_le_bytes().to_vec()),
        31,
    );
    bad += run_store(
        "fstp m64",
        h_fstpl,
        |c, a| c.to_f64(a).map(|v| v.to_le_bytes().to_vec()),
        32,
    );
    bad += run_store(
        "fistp m16",
        h_fistps,
        |c, a| c.to_int(a, 16).map(|v| (v as i16).to_le_bytes().to_vec()),
        33,
    );
    bad += run_store(
        "fistp m32",
        h_fistpl,
        |c, a| c.to_int(a, 32).map(|v| (v as i32).to_le_bytes().to_vec()),
        34,
    );
    bad += run_store(
        "fistp m64",
        h_fistpll,
        |c, a| c.to_int(a, 64).map(|v| v.to_le_bytes().to_vec()),
        35,
    );
    bad += run_store("fbstp", h_fbstp, |c, a| c.to_bcd(a).map(|v| v.to_vec()), 36);
    bad += run_store(
        "fxtract",
        h_fxtract,
        |c, a| {
            c.xtract(a)
                .map(|(e, s)| {
                    let mut v = f80b(s).to_vec();
                    v.extend_from_slice(&[0x5a; 6]);
                    v.extend_from_slice(&f80b(e));
                    v
                })
                // Unmasked fault: ST(0) is left alone and the harness stores it.
                .or_else(|| Some(f80b(a).to_vec()))
        },
        37,
    );
    assert_eq!(bad, 0);
}

fn soft_cmp(c: &mut Ctx, a: F80, b: F80, quiet: bool) -> Option<F80> {
    use std::cmp::Ordering::*;
    let cc = match c.compare(a, b, quiet) {
        Some(Greater) => 0,
        Some(Less) => 0x100,
        Some(Equal) => 0x4000,
        None => 0x4500,
    };
    // The condition codes are set even when IE/DE are unmasked.
    c.flags |= cc;
    Some(a)
}

#[test]
fn compares_match_host() {
    let f: fn(&mut Ctx, F80, F80) -> Option<F80> = |c, a, b| soft_cmp(c, a, b, false);
    let g: fn(&mut Ctx, F80, F80) -> Option<F80> = |c, a, b| soft_cmp(c, a, b, true);
    let mut bad = run_binop("fcom", h_com, f, 1000, 41, 0x3f).0;
    bad += run_binop("fucom", h_ucom, g, 1000, 42, 0x3f).0;
    bad += run_binop("fcom/u", h_com, f, 300, 43, 0).0;
    bad += run_binop("fucom/u", h_ucom, g, 300, 44, 0).0;
    assert_eq!(bad, 0);
}

macro_rules! host_const {
    ($name:ident, $insn:literal) => {
        fn $name(cw: u16) -> (F80, u16) {
            let mut rb = [0u8; 10];
            let mut sw: u16 = 0;
            host_x87!(
                cw: &cw, a: core::ptr::null::<u8>(), b: core::ptr::null::<u8>(), r: rb.as_mut_ptr(), sw: &mut sw;
                $insn,
                "fnstsw ({sw})",
                "fstpt ({r})",
            );
            (bf80(&rb), sw)
        }
    };
}
host_const!(h_fldpi, "fldpi");
host_const!(h_fldl2t, "fldl2t");
host_const!(h_fldl2e, "fldl2e");
host_const!(h_fldlg2, "fldlg2");
host_const!(h_fldln2, "fldln2");
host_const!(h_fld1, "fld1");
host_const!(h_fldz, "fldz");

#[test]
fn constants_match_host() {
    let hosts: [fn(u16) -> (F80, u16); 7] = [
        h_fldpi, h_fldl2t, h_fldl2e, h_fldlg2, h_fldln2, h_fld1, h_fldz,
    ];
    let mut bad = 0;
    for (k, h) in hosts.iter().enumerate() {
        for rc in 0..4 {
            for pc in [0, 2, 3] {
                let cw = cw_of(rc, pc, 0x3f);
                let (hv, hsw) = h(cw);
                let sv = super::constant(k, cw);
                if hv != sv || hsw & CMP_MASK != 0 {
                    eprintln!("const {k} cw={cw:04x} host {hv:x?} {hsw:04x} soft {sv:x?}");
                    bad += 1;
                }
            }
        }
    }
    assert_eq!(bad, 0);
}

host_binop!(h_fsin, "fsin");
host_binop!(h_fcos, "fcos");
host_binop!(h_f2xm1, "f2xm1");
host_binop!(h_fpatan, "fpatan");
host_binop!(h_fyl2x, "fyl2x");
host_binop!(h_fyl2xp1, "fyl2xp1");
host_unop!(
    h_fptan,
    "fldt ({a})",
    "fptan",
    "fnstsw ({sw})",
    "fnclex",
    "fstpt 16({r})",
    "fstpt ({r})"
);
host_unop!(
    h_fsincos,
    "fldt ({a})",
    "fsincos",
    "fnstsw ({sw})",
    "fnclex",
    "fstpt 16({r})",
    "fstpt ({r})"
);

/// Distance in units of the last place between two values of the same sign.
fn ulps(a: F80, b: F80) -> u128 {
    if a == b {
        return 0;
    }
    if a.sign() != b.sign() || a.is_nan() || b.is_nan() {
        return u128::MAX;
    }
    let k = |v: F80| ((v.exp() as u128) << 64) | v.mant as u128;
    k(a).abs_diff(k(b))
}

/// An operand with exponent drawn from `lo..=hi` (biased), random significand, and
/// now and then a special value.
fn ranged(r: &mut Rng, lo: u16, hi: u16) -> F80 {
    if r.below(40) == 0 {
        return operand(r);
    }
    let e = lo + r.below((hi - lo) as u64 + 1) as u16;
    F80::new(r.next() & 1 == 1, e, r.next() | 1 << 63)
}

struct Tally {
    name: &'static str,
    total: usize,
    exact: usize,
    one_ulp: usize,
    flags_ok: usize,
}

impl Tally {
    fn new(name: &'static str) -> Self {
        Tally {
            name,
            total: 0,
            exact: 0,
            one_ulp: 0,
            flags_ok: 0,
        }
    }
    fn add(&mut self, input: (F80, F80), host: F80, soft: F80, hsw: u16, ssw: u16) {
        self.total += 1;
        let d = ulps(host, soft);
        if d == 0 {
            self.exact += 1;
        }
        if d <= 1 {
            self.one_ulp += 1;
        } else if self.total - self.one_ulp <= 5 {
            eprintln!(
                "{} a={:04x}:{:016x} b={:04x}:{:016x} host={:04x}:{:016x} soft={:04x}:{:016x}",
                self.name,
                input.0.se,
                input.0.mant,
                input.1.se,
                input.1.mant,
                host.se,
                host.mant,
                soft.se,
                soft.mant
            );
        }
        // Compare exception flags (C1 is the rounding direction, checked only when the
        // values agree).
        let mask = if d == 0 { 0x477f } else { 0x457d };
        if hsw & mask == ssw & mask {
            self.flags_ok += 1;
        } else if self.total - self.flags_ok <= 3 {
            eprintln!(
                "{} flags a={:04x}:{:016x} b={:04x}:{:016x} host={hsw:04x} soft={ssw:04x}",
                self.name, input.0.se, input.0.mant, input.1.se, input.1.mant
            );
        }
    }
    fn report(&self) {
        eprintln!(
            "{}: {} samples, {} bit-exact ({:.2}%), {} within 1 ulp, flags agree on {}",
            self.name,
            self.total,
            self.exact,
            100.0 * self.exact as f64 / self.total as f64,
            self.one_ulp,
            self.flags_ok
        );
    }
}

#[test]
fn transcendentals_near_host() {
    let mut r = Rng(77);
    let cw = cw_of(0, 3, 0x3f);
    let mut all = vec![];
    let n = 3000;
    // FSIN / FCOS
    for (name, h, sin) in [
        ("fsin", h_fsin as fn(F80, F80, u16) -> (F80, u16), true),
        ("fcos", h_fcos, false),
    ] {
        let mut t = Tally::new(name);
        for _ in 0..n {
            let a = ranged(&mut r, 0x3fff - 70, 0x3fff + 64);
            let (hv, hsw) = h(a, F80::ZERO, cw);
            let mut c = Ctx::new(cw);
            let (sv, cc) = match c.sin_or_cos(a, sin) {
                None => (a, 0x400),
                Some(v) => (v.unwrap_or(a), 0),
            };
            t.add((a, F80::ZERO), hv, sv, hsw, soft_sw(&c) | cc);
        }
        all.push(t);
    }
    // FPTAN / FSINCOS (two results)
    for (name, h, tan) in [
        ("fptan", h_fptan as HostUnop, true),
        ("fsincos", h_fsincos, false),
    ] {
        let mut t = Tally::new(name);
        for _ in 0..n {
            let a = ranged(&mut r, 0x3fff - 70, 0x3fff + 64);
            let (hb, hsw) = h(buf16(a), [0; 32], cw);
            // C2 (operand out of range): nothing pushed, the operand is at offset 16.
            let at = if hsw & 0x400 != 0 { 16 } else { 0 };
            let h0 = bf80(hb[at..at + 10].try_into().unwrap());
            let mut c = Ctx::new(cw);
            let res = if tan { c.tan(a) } else { c.sin_cos(a) };
            let (s0, cc) = match res {
                None => (a, 0x400),
                Some(Some((x, _))) => (x, 0),
                Some(None) => (a, 0),
            };
            t.add((a, F80::ZERO), h0, s0, hsw, soft_sw(&c) | cc);
        }
        all.push(t);
    }
    // F2XM1
    let mut t = Tally::new("f2xm1");
    for _ in 0..n {
        let a = ranged(&mut r, 0x3fff - 70, 0x3ffe);
        let (hv, hsw) = h_f2xm1(a, F80::ZERO, cw);
        let mut c = Ctx::new(cw);
        let sv = c.f2xm1(a).unwrap_or(a);
        t.add((a, F80::ZERO), hv, sv, hsw, soft_sw(&c));
    }
    all.push(t);
    // FPATAN, FYL2X, FYL2XP1: ST(0) = x (a), ST(1) = y (b).
    for (name, h, k) in [
        ("fpatan", h_fpatan as fn(F80, F80, u16) -> (F80, u16), 0),
        ("fyl2x", h_fyl2x, 1),
        ("fyl2xp1", h_fyl2xp1, 2),
    ] {
        let mut t = Tally::new(name);
        for _ in 0..n {
            let (x, y) = match k {
                0 => (
                    ranged(&mut r, 0x3fff - 80, 0x3fff + 80),
                    ranged(&mut r, 0x3fff - 80, 0x3fff + 80),
                ),
                1 => (
                    ranged(&mut r, 0x3fff - 200, 0x3fff + 200).with_sign(false),
                    ranged(&mut r, 0x3fff - 20, 0x3fff + 20),
                ),
                _ => (
                    ranged(&mut r, 0x3fff - 80, 0x3ffd),
                    ranged(&mut r, 0x3fff - 20, 0x3fff + 20),
                ),
            };
            let (hv, hsw) = h(x, y, cw);
            // The host leaves the result in ST(0) after the pop; an unexecuted op leaves x.
            let mut c = Ctx::new(cw);
            let sv = match k {
                0 => c.atan2(y, x),
                1 => c.yl2x(y, x),
                _ => c.yl2xp1(y, x),
            };
            t.add((x, y), hv, sv.unwrap_or(x), hsw, soft_sw(&c));
        }
        all.push(t);
    }
    let mut worst = 1.0f64;
    for t in &all {
        t.report();
        worst = worst.min(t.one_ulp as f64 / t.total as f64);
    }
    assert!(
        worst > 0.97,
        "too many results more than 1 ulp from the host"
    );
}

/// Which precision of π the host's FSIN reduction behaves like (run with --ignored).
#[test]
#[ignore]
fn reduction_pi_experiment() {
    for bits in [64u32, 65, 66, 67, 68, 70, 72, 76, 80, 90, 100, 127] {
        let mut r = Rng(99);
        let cw = cw_of(0, 3, 0x3f);
        let (mut exact, mut one) = (0, 0);
        for _ in 0..3000 {
            let a = ranged(&mut r, 0x3fff, 0x3fff + 40).with_sign(false);
            if a.kind() != Kind::Finite || a.exp() >= 0x3fff + 63 {
                continue;
            }
            let (hv, _) = h_fsin(a, F80::ZERO, cw);
            let mut c = Ctx::new(cw);
            let sv = super::transcendental::sin_with_reduce_bits(&mut c, a, bits);
            let d = ulps(hv, sv);
            exact += (d == 0) as u32;
            one += (d <= 1) as u32;
        }
        eprintln!("pi bits {bits}: exact {exact}, <=1ulp {one} of 3000");
    }
}

#[test]
#[ignore]
fn fptan_c1_stats() {
    let mut r = Rng(5);
    let cw = cw_of(0, 3, 0x3f);
    let mut counts = std::collections::BTreeMap::new();
    for _ in 0..3000 {
        let a = ranged(&mut r, 0x3fff - 70, 0x3fff + 62);
        let (_, hsw) = h_fptan(buf16(a), [0; 32], cw);
        let mut c = Ctx::new(cw);
        let _ = c.tan(a);
        let big = (a.exp() as i32 - 0x3fff) / 8;
        *counts
            .entry((big, a.sign(), hsw & 0x200 != 0, c.flags & C1 != 0))
            .or_insert(0) += 1;
    }
    for (k, v) in &counts {
        eprintln!("(exp/8, sign, host C1, soft C1) {k:?}: {v}");
    }
}

#[test]
fn cos_near_half_pi_uses_pi66() {
    let x = F80::new(false, 0x3fff, 0xc90f_daa2_2168_c234);
    let cw = cw_of(0, 3, 0x3f);
    let (hv, _) = h_fcos(x, F80::ZERO, cw);
    let mut c = Ctx::new(cw);
    let sv = c.sin_or_cos(x, false).flatten().unwrap();
    let mut c2 = Ctx::new(cw);
    let sc = c2.sin_cos(x).flatten().unwrap();
    assert_eq!(hv, sv);
    assert_eq!(hv, sc.1);
}
