//! Regressions found while booting Debian's i386 Linux kernel on morph86. Each test
//! states the architectural rule it checks (Intel SDM) and the boot symptom it caused.

use morph86_cpu::state::*;
use morph86_cpu::{Cpu, StepEvent};
use morph86_mmu::{Mmu, PhysMem};

fn real_mode_cpu() -> Cpu {
    Cpu::new(Mmu::new(PhysMem::new(1 << 20).unwrap()))
}

/// A relative CALL's target is EIP-relative (SDM vol. 2, CALL: "the target is the
/// instruction pointer plus the displacement"), so the same bytes reached through a
/// different CS:EIP (same physical address) must branch relative to the new EIP.
///
/// Linux runs `load_ucode_bsp` before paging (EIP = physical address) and the same
/// functions again at their virtual address; the decoded-instruction cache, keyed by
/// physical address, replayed the first branch target and `call __fentry__` went to
/// the physical address with paging on: an early #PF and a silent panic.
#[test]
fn cached_relative_branch_follows_the_new_eip() {
    let mut cpu = real_mode_cpu();
    // call near +0x0ffd (E8 FD 0F): target = IP + 3 + 0x0ffd = IP + 0x1000.
    cpu.mmu.phys.write(0x5000, &[0xe8, 0xfd, 0x0f]);
    cpu.s.gpr[4] = 0x8000;
    cpu.s.seg[SegReg::Ss as usize] = Segment::real(0);

    cpu.s.seg[SegReg::Cs as usize] = Segment::real(0);
    cpu.s.rip = 0x5000;
    assert_eq!(cpu.step(), StepEvent::Ok);
    assert_eq!(cpu.s.rip, 0x6000);

    // The same physical bytes as 0100:4000.
    cpu.s.seg[SegReg::Cs as usize] = Segment::real(0x100);
    cpu.s.rip = 0x4000;
    assert_eq!(cpu.step(), StepEvent::Ok);
    assert_eq!(cpu.s.rip, 0x5000);
    // The pushed return address is the new IP past the CALL.
    let mut ret = [0u8; 2];
    cpu.mmu.phys.read(0x7ffc, &mut ret);
    assert_eq!(u16::from_le_bytes(ret), 0x4003);
}
