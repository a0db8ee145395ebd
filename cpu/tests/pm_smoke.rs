//! Hostile-guest smoke test: random bytes executed in protected mode (rings 0 and 3)
//! and V86 mode over random descriptor tables must never panic or hang the host; the
//! CPU may only fault, halt or shut down.

use morph86_cpu::descriptor::Descriptor;
use morph86_cpu::state::*;
use morph86_cpu::{Cpu, StepEvent};
use morph86_mmu::{Mmu, PhysMem};

/// xorshift64*: a small deterministic generator (no dependency).
struct Rng(u64);
impl Rng {
    fn next(&mut self) -> u64 {
        self.0 ^= self.0 >> 12;
        self.0 ^= self.0 << 25;
        self.0 ^= self.0 >> 27;
        self.0.wrapping_mul(0x2545_f491_4f6c_dd1d)
    }
}

const OPS: &[&[u8]] = &[
    &[0x8e, 0xd8],       // mov ds, ax
    &[0x8e, 0xd0],       // mov ss, ax
    &[0x1f],             // pop ds
    &[0x17],             // pop ss
    &[0xcf],             // iretd
    &[0xcb],             // retf
    &[0xca, 0x04, 0x00], // retf 4
    &[0xcd, 0x30],       // int 0x30
    &[0xcc],             // int3
    &[0xce],             // into
    &[0xf1],             // int1
    &[0x9c],             // pushfd
    &[0x9d],             // popfd
    &[0xfa],             // cli
    &[0xfb],             // sti
    &[0xff, 0x18],       // call far [eax]
    &[0xff, 0x28],       // jmp far [eax]
    &[0x0f, 0x00, 0xd8], // ltr ax
    &[0x0f, 0x00, 0xd0], // lldt ax
    &[0x0f, 0x01, 0x18], // lidt [eax]
    &[0x0f, 0x01, 0x10], // lgdt [eax]
    &[0x0f, 0x22, 0xc0], // mov cr0, eax
    &[0x0f, 0x22, 0xe0], // mov cr4, eax
    &[0x0f, 0x22, 0xd8], // mov cr3, eax
    &[0x0f, 0x23, 0xf8], // mov dr7, eax
    &[0x0f, 0x30],       // wrmsr
    &[0x0f, 0x32],       // rdmsr
    &[0x0f, 0x34],       // sysenter
    &[0x0f, 0x35],       // sysexit
    &[0x0f, 0x02, 0xc0], // lar eax, eax
    &[0x0f, 0x03, 0xc0], // lsl eax, eax
    &[0xe4, 0x60],       // in al, 0x60
    &[0xc5, 0x00],       // lds eax, [eax]
    &[0x0f, 0xb2, 0x20], // lss esp, [eax]
];

#[test]
fn random_system_instructions_never_panic() {
    let mut rng = Rng(0x9e37_79b9_7f4a_7c15);
    let mut c = Cpu::new(Mmu::new(PhysMem::new(1 << 20).unwrap()));
    let mut triples = 0u64;
    for round in 0..1000 {
        c.reset();
        // Random GDT/IDT/TSS bytes in the first 64 KiB, with a sprinkling of sane
        // descriptors, then protected mode at a random CPL or V86.
        let mut junk = vec![0u8; 0x10000];
        for b in junk.iter_mut() {
            *b = rng.next() as u8;
        }
        c.mmu.phys.write(0, &junk);
        for k in 1..16u64 {
            let access = [0x9a, 0x92, 0xfa, 0xf2, 0x89, 0x8b, 0x82, 0xec, 0xe5, 0x8e]
                [(rng.next() % 10) as usize];
            let d = if access & 0x10 != 0 || access == 0x89 || access == 0x8b || access == 0x82 {
                Descriptor::segment((rng.next() as u32) & 0xf000, 0xfffff, access, 0xc)
            } else {
                Descriptor::gate(
                    (rng.next() % 16 * 8) as u16,
                    rng.next() as u32 & 0xffff,
                    access,
                    3,
                )
            };
            c.mmu.phys.write(0x1000 + 8 * k, &d.0.to_le_bytes());
        }
        // Entries 1, 2 and 5 sane most of the time: ring-0 code and data, the TSS; an
        // IDT of interrupt gates into more random code, and a ring-0 stack in the TSS.
        if round % 3 != 0 {
            let sane = [
                (0x08u64, Descriptor::segment(0, 0xfffff, 0x9a, 0xc)),
                (0x10, Descriptor::segment(0, 0xfffff, 0x92, 0xc)),
                (0x28, Descriptor::segment(0x3000, 0x2067, 0x8b, 0)),
            ];
            for (sel, d) in sane {
                c.mmu.phys.write(0x1000 + sel, &d.0.to_le_bytes());
            }
            for v in 0..256u64 {
                let g = Descriptor::gate(0x08, 0x3_0000 + (v as u32 % 8) * 0x40, 0xee, 0);
                c.mmu.phys.write(0x2000 + 8 * v, &g.0.to_le_bytes());
            }
            c.mmu.phys.write(0x3004, &0x8_0000u32.to_le_bytes());
            c.mmu.phys.write(0x3008, &0x10u32.to_le_bytes());
        }
        c.s.gdtr = TableReg {
            base: 0x1000,
            limit: 0x7f,
        };
        c.s.idtr = TableReg {
            base: 0x2000,
            limit: (rng.next() % 0x800) as u32,
        };
        c.s.cr0 |= CR0_PE;
        c.s.tr = Descriptor::segment(0x3000, 0x67 + (rng.next() % 0x2000) as u32, 0x8b, 0)
            .to_segment(0x28);
        let cpl = (rng.next() % 4) as u8;
        let flat = |a: u8| Descriptor::segment(0, 0xfffff, a, 0xc);
        c.s.seg[SegReg::Cs as usize] = flat(0x9a | (cpl << 5)).to_segment(0x08 | cpl as u16);
        c.s.seg[SegReg::Ss as usize] = flat(0x92 | (cpl << 5)).to_segment(0x10 | cpl as u16);
        c.s.cpl = cpl;
        let mut fl = (rng.next() as u32) & (IF | IOPL | NT | AC | TF | CF);
        if round % 5 == 0 {
            fl |= VM;
            c.s.cpl = 3;
        }
        c.s.set_eflags(fl | FLAG_1);
        if round % 7 == 0 {
            c.s.cr4 = CR4_VME | CR4_PVI;
        }
        c.sync_paging();
        // A program of random system instructions with random register values.
        let mut prog = Vec::new();
        for _ in 0..64 {
            prog.extend_from_slice(OPS[(rng.next() % OPS.len() as u64) as usize]);
        }
        c.mmu.phys.write(0x2_0000, &prog);
        let mut handlers = Vec::new();
        for _ in 0..128 {
            handlers.extend_from_slice(OPS[(rng.next() % OPS.len() as u64) as usize]);
        }
        c.mmu.phys.write(0x3_0000, &handlers);
        c.s.rip = if c.s.v86() { 0 } else { 0x2_0000 };
        if c.s.v86() {
            for s in SegReg::ALL {
                c.s.seg[s as usize] = Segment::v86(0x2000);
            }
        }
        for _ in 0..200 {
            for r in 0..8 {
                if r != reg::RSP {
                    c.s.gpr[r] = rng.next() % 0x1_0000;
                }
            }
            match c.step() {
                StepEvent::TripleFault => {
                    triples += 1;
                    break;
                }
                StepEvent::Halted => c.s.halted = false,
                StepEvent::Ok => {}
            }
        }
    }
    let st = c.stats;
    eprintln!(
        "instructions {} exceptions {} triple faults {triples}",
        st.instructions, st.exceptions
    );
    assert!(st.instructions > 50_000, "the programs mostly ran");
}
