//! Tiny machines for the interpreter's unit tests (compiled only with `cfg(test)`).
//!
//! `real()` gives a real-mode CPU with CS=0x1000 (code at physical 0x10000),
//! SS=0x2000 SP=0x1000, DS=0x3000, ES=0x4000. `flat32()` gives a protected-mode CPU
//! with flat 32-bit code, data and stack segments (base 0, 1 MiB limit), code at
//! 0x1000 and ESP=0x8000. `exec` runs one instruction and returns its result without
//! delivering an exception, so tests can check the exception and the untouched state.

use crate::exception::Res;
use crate::state::*;
use crate::Cpu;
use morph86_mmu::{Mmu, PhysMem};

/// Physical address of the code in `real()` machines.
pub(crate) const REAL_CODE: u64 = 0x10000;
/// Physical base of DS in `real()` machines.
pub(crate) const REAL_DS: u64 = 0x30000;
/// Physical base of ES in `real()` machines.
pub(crate) const REAL_ES: u64 = 0x40000;
/// Physical base of SS in `real()` machines.
pub(crate) const REAL_SS: u64 = 0x20000;
/// Linear (= physical) address of the code in `flat32()` machines.
pub(crate) const FLAT_CODE: u64 = 0x1000;

/// A real-mode machine running `code`.
pub(crate) fn real(code: &[u8]) -> Cpu {
    let mut c = Cpu::new(Mmu::new(PhysMem::new(1 << 20).unwrap()));
    c.s.seg[SegReg::Cs as usize] = Segment {
        attrs: ATTR_P | ATTR_S | ATTR_CODE | ATTR_RW | ATTR_ACCESSED,
        ..Segment::real(0x1000)
    };
    c.s.seg[SegReg::Ss as usize] = Segment::real(0x2000);
    c.s.seg[SegReg::Ds as usize] = Segment::real(0x3000);
    c.s.seg[SegReg::Es as usize] = Segment::real(0x4000);
    c.s.gpr[reg::RSP] = 0x1000;
    c.s.rip = 0;
    c.s.set_eflags(FLAG_1);
    c.mmu.phys.write(REAL_CODE, code);
    c
}

/// A protected-mode machine with flat 32-bit segments running `code`.
pub(crate) fn flat32(code: &[u8]) -> Cpu {
    let mut c = Cpu::new(Mmu::new(PhysMem::new(1 << 20).unwrap()));
    c.s.load_flat32(0x08, 0x10);
    c.sync_paging();
    // Limits end with the 1 MiB of RAM, so tests can reach a limit fault cheaply.
    for s in c.s.seg.iter_mut() {
        s.limit = 0xf_ffff;
    }
    c.s.gpr[reg::RSP] = 0x8000;
    c.s.rip = FLAT_CODE;
    c.s.set_eflags(FLAG_1);
    c.mmu.phys.write(FLAT_CODE, code);
    c
}

/// Executes one instruction; on `Err` restores EIP as the step loop does, without
/// delivering the exception.
pub(crate) fn exec(c: &mut Cpu) -> Res<()> {
    c.start_rip = c.s.rip;
    let r = c.fetch_decode().and_then(|i| c.execute(&i));
    if r.is_err() {
        c.s.rip = c.start_rip;
    }
    r
}

/// Executes `n` instructions, panicking on an exception.
pub(crate) fn run(c: &mut Cpu, n: usize) {
    for k in 0..n {
        if let Err(e) = exec(c) {
            panic!("instruction {k} at {:#x} raised {e:?}", c.s.rip);
        }
    }
}

/// Reads `n` bytes of physical memory as a little-endian value.
pub(crate) fn peek(c: &mut Cpu, addr: u64, n: usize) -> u64 {
    let mut b = [0u8; 8];
    c.mmu.phys.read(addr, &mut b[..n]);
    u64::from_le_bytes(b)
}

/// Writes a little-endian value of `n` bytes to physical memory.
pub(crate) fn poke(c: &mut Cpu, addr: u64, n: usize, v: u64) {
    c.mmu.phys.write(addr, &v.to_le_bytes()[..n]);
}

/// The six arithmetic flags.
pub(crate) fn aflags(c: &Cpu) -> u32 {
    c.s.eflags() & ARITH_FLAGS
}

/// `CpuState::load_flat32` gives 32-bit code and 4 GiB data limits at CPL 0.
#[test]
fn load_flat32_runs_32_bit_code_over_4_gib_segments() {
    let mut c = Cpu::new(Mmu::new(PhysMem::new(1 << 20).unwrap()));
    c.s.load_flat32(0x08, 0x10);
    c.sync_paging();
    assert!(c.s.protected() && c.s.code32() && c.s.stack32());
    assert_eq!(c.s.cpl, 0);
    assert_eq!(c.s.seg[SegReg::Cs as usize].selector, 0x08);
    for s in [SegReg::Es, SegReg::Ss, SegReg::Ds, SegReg::Fs, SegReg::Gs] {
        assert_eq!(c.s.seg[s as usize].selector, 0x10);
    }
    // mov eax, 0x11223344 (5 bytes with a 32-bit default operand size), then
    // mov ecx, [0xFFFFFFF0] (inside a 4 GiB limit: no #GP).
    c.mmu.phys.write(
        0x1000,
        &[
            0xb8, 0x44, 0x33, 0x22, 0x11, 0x8b, 0x0d, 0xf0, 0xff, 0xff, 0xff,
        ],
    );
    c.s.rip = 0x1000;
    run(&mut c, 2);
    assert_eq!(c.s.gpr[reg::RAX], 0x1122_3344);
    assert_eq!(c.s.rip, 0x100b);
}
