//! Paging through the CPU: guest instructions run with CR0.PG=1 and the page faults
//! they raise are checked as the guest sees them (error code pushed by the IDT
//! delivery, CR2, saved EIP, registers and memory untouched).
//!
//! Expected values come from the Intel SDM (vol. 3, 4.7 "Page-fault exceptions", 4.8
//! "Accessed and dirty flags", 6.15 "#PF") and from the page tables each test builds.

use morph86_cpu::state::*;
use morph86_cpu::{Cpu, StepEvent};
use morph86_mmu::paging::{
    PF_I, PF_P, PF_RSVD, PF_U, PF_W, PTE_A, PTE_D, PTE_P, PTE_RW, PTE_US, PTE_XD,
};
use morph86_mmu::{Mmu, PhysMem};

const GDT: u64 = 0x1000;
const TSS: u64 = 0x1800;
const IDT: u64 = 0x2000;
const PF_HANDLER: u64 = 0x3000;
const OTHER_HANDLER: u64 = 0x3100;
const CODE: u64 = 0x4000;
const STACK0: u64 = 0x9000;
const PD: u64 = 0x10000;
const PT0: u64 = 0x11000;
/// A second page table, for linear 0x0040_0000-0x007f_ffff.
const PT1: u64 = 0x12000;
const URW: u64 = PTE_P | PTE_RW | PTE_US;

const SEL_CODE0: u16 = 0x08;
const SEL_DATA0: u16 = 0x10;
const SEL_CODE3: u16 = 0x1b;
const SEL_DATA3: u16 = 0x23;
const SEL_TSS: u16 = 0x28;

struct Guest {
    cpu: Cpu,
}

fn seg(selector: u16, attrs: u32) -> Segment {
    Segment {
        base: 0,
        limit: 0xffff_ffff,
        attrs: attrs | ATTR_P | ATTR_S | ATTR_DB | ATTR_G | ATTR_ACCESSED,
        selector,
    }
}

impl Guest {
    /// Flat 32-bit protected mode, paging on, the first 4 MiB identity-mapped with
    /// user read/write pages, ring 0 with ESP = 0x8000.
    fn new(cr0_extra: u64, cr4: u64) -> Guest {
        let mut cpu = Cpu::new(Mmu::new(PhysMem::new(16 << 20).unwrap()));
        let gdt: [u64; 6] = [
            0,
            0x00cf_9b00_0000_ffff, // ring-0 code (accessed)
            0x00cf_9300_0000_ffff, // ring-0 data (accessed)
            0x00cf_fb00_0000_ffff, // ring-3 code (accessed)
            0x00cf_f200_0000_ffff, // ring-3 data (not yet accessed)
            0x0000_8b00_1800_0067, // busy 32-bit TSS at 0x1800
        ];
        for (k, d) in gdt.iter().enumerate() {
            cpu.mmu.phys.write(GDT + 8 * k as u64, &d.to_le_bytes());
        }
        // TSS: ESP0 and SS0.
        cpu.mmu.phys.write(TSS + 4, &(STACK0 as u32).to_le_bytes());
        cpu.mmu
            .phys
            .write(TSS + 8, &(SEL_DATA0 as u32).to_le_bytes());
        // IDT: every vector to OTHER_HANDLER, #PF to PF_HANDLER (32-bit interrupt gates).
        for v in 0..32u64 {
            let off = if v == 14 { PF_HANDLER } else { OTHER_HANDLER };
            let gate =
                (off & 0xffff) | (SEL_CODE0 as u64) << 16 | 0x8e00u64 << 32 | (off >> 16) << 48;
            cpu.mmu.phys.write(IDT + 8 * v, &gate.to_le_bytes());
        }
        cpu.mmu.phys.write(PF_HANDLER, &[0xf4]);
        cpu.mmu.phys.write(OTHER_HANDLER, &[0xf4]);
        // Paging structures.
        cpu.mmu.phys.write(PD, &((PT0 | URW) as u32).to_le_bytes());
        cpu.mmu
            .phys
            .write(PD + 4, &((PT1 | URW) as u32).to_le_bytes());
        for n in 0..1024u64 {
            let pte = (n << 12) | URW;
            cpu.mmu.phys.write(PT0 + 4 * n, &(pte as u32).to_le_bytes());
        }
        let s = &mut cpu.s;
        s.gdtr = TableReg {
            base: GDT,
            limit: 6 * 8 - 1,
        };
        s.idtr = TableReg {
            base: IDT,
            limit: 32 * 8 - 1,
        };
        s.tr = Segment {
            base: TSS,
            limit: 0x67,
            attrs: ATTR_P | 0xb,
            selector: SEL_TSS,
        };
        s.seg[SegReg::Cs as usize] = seg(SEL_CODE0, ATTR_CODE | ATTR_RW);
        for r in [SegReg::Ds, SegReg::Es, SegReg::Ss, SegReg::Fs, SegReg::Gs] {
            s.seg[r as usize] = seg(SEL_DATA0, ATTR_RW);
        }
        s.cpl = 0;
        s.cr0 = CR0_PE | CR0_ET | CR0_PG | cr0_extra;
        s.cr3 = PD;
        s.cr4 = cr4;
        s.gpr[reg::RSP] = 0x8000;
        s.rip = CODE;
        cpu.sync_paging();
        Guest { cpu }
    }

    /// Drops to ring 3 (flat user segments, ESP = 0x7000).
    fn user(&mut self) {
        let s = &mut self.cpu.s;
        s.seg[SegReg::Cs as usize] = seg(SEL_CODE3, ATTR_CODE | ATTR_RW | 3 << ATTR_DPL_SHIFT);
        for r in [SegReg::Ds, SegReg::Es, SegReg::Ss, SegReg::Fs, SegReg::Gs] {
            s.seg[r as usize] = seg(SEL_DATA3, ATTR_RW | 3 << ATTR_DPL_SHIFT);
        }
        s.cpl = 3;
        s.gpr[reg::RSP] = 0x7000;
    }

    fn code(&mut self, at: u64, bytes: &[u8]) {
        self.cpu.mmu.phys.write(at, bytes);
    }

    /// Sets the PTE for linear page `lin` (below 8 MiB).
    fn pte(&mut self, lin: u64, v: u64) {
        let pt = if lin < 0x40_0000 { PT0 } else { PT1 };
        let a = pt + ((lin >> 12) & 0x3ff) * 4;
        self.cpu.mmu.phys.write(a, &(v as u32).to_le_bytes());
    }

    fn pte_of(&mut self, lin: u64) -> u64 {
        let pt = if lin < 0x40_0000 { PT0 } else { PT1 };
        self.rd32(pt + ((lin >> 12) & 0x3ff) * 4)
    }

    fn rd32(&mut self, phys: u64) -> u64 {
        let mut b = [0u8; 4];
        self.cpu.mmu.phys.read(phys, &mut b);
        u32::from_le_bytes(b) as u64
    }

    fn step(&mut self) {
        assert_eq!(self.cpu.step(), StepEvent::Ok);
    }

    /// Asserts a #PF was just delivered for the instruction at `eip` with `code` and
    /// CR2 = `cr2`; returns nothing. Works for ring-0 (same stack) and ring-3 (stack
    /// switched to STACK0) faults.
    fn assert_pf(&mut self, eip: u64, code: u32, cr2: u64) {
        assert_eq!(
            self.cpu.s.rip, PF_HANDLER,
            "#PF handler not reached (EIP {:#x})",
            self.cpu.s.rip
        );
        assert_eq!(self.cpu.s.cr2, cr2, "CR2");
        let esp = self.cpu.s.gpr[reg::RSP] & 0xffff_ffff;
        assert_eq!(self.rd32(esp), code as u64, "error code");
        assert_eq!(self.rd32(esp + 4), eip, "saved EIP");
        assert_eq!(self.cpu.s.cpl, 0);
    }
}

#[test]
fn supervisor_read_of_not_present_page() {
    let mut g = Guest::new(0, 0);
    g.pte(0x20000, 0);
    g.cpu.s.gpr[reg::RAX] = 0x1111_2222;
    // mov eax, [0x00020010]
    g.code(CODE, &[0xa1, 0x10, 0x00, 0x02, 0x00]);
    g.step();
    g.assert_pf(CODE, 0, 0x20010);
    assert_eq!(g.cpu.s.gpr[reg::RAX], 0x1111_2222, "EAX untouched");
    // The whole directory entry missing: same code.
    g.cpu.s.rip = CODE;
    g.cpu.s.gpr[reg::RSP] = 0x8000;
    // mov eax, [0x00812345] (PD[2] is not present)
    g.code(CODE, &[0xa1, 0x45, 0x23, 0x81, 0x00]);
    g.step();
    g.assert_pf(CODE, 0, 0x81_2345);
}

#[test]
fn reserved_bit_in_a_4mib_pde_reports_rsvd() {
    let mut g = Guest::new(0, CR4_PSE);
    // PD[2]: a 4 MiB page with bit 21 (reserved) set.
    g.cpu.mmu.phys.write(
        PD + 8,
        &(0x0080_0000u32 | URW as u32 | 1 << 7 | 1 << 21).to_le_bytes(),
    );
    g.code(CODE, &[0x89, 0x03]); // mov [ebx], eax
    g.cpu.s.gpr[reg::RBX] = 0x0081_2344;
    g.step();
    g.assert_pf(CODE, PF_P | PF_RSVD | PF_W, 0x0081_2344);
}

/// Descriptor-table accesses are implicit supervisor accesses even at CPL 3 (SDM
/// 4.6.1): no U/S check, and a fault reports U=0.
#[test]
fn implicit_supervisor_accesses_from_ring3() {
    for wp in [false, true] {
        let mut g = Guest::new(if wp { CR0_WP } else { 0 }, 0);
        // The GDT page: supervisor-only and read-only.
        g.pte(GDT, GDT | PTE_P);
        g.user();
        g.code(CODE, &[0x8e, 0xd8]); // mov ds, ax
        g.cpu.s.gpr[reg::RAX] = SEL_DATA3 as u64;
        g.step();
        if wp {
            // Setting the descriptor's accessed bit is a supervisor write.
            g.assert_pf(CODE, PF_P | PF_W, GDT + 0x20 + 5); // access byte of entry 4
        } else {
            assert_eq!(g.cpu.s.rip, CODE + 2);
            assert_eq!(g.cpu.s.seg[SegReg::Ds as usize].selector, SEL_DATA3);
            let mut b = [0u8];
            g.cpu.mmu.phys.read(GDT + 0x20 + 5, &mut b);
            assert_eq!(b[0], 0xf3, "accessed bit set");
        }
    }
}

#[test]
fn write_protect_decides_supervisor_writes_to_read_only_pages() {
    for wp in [false, true] {
        let mut g = Guest::new(if wp { CR0_WP } else { 0 }, 0);
        g.pte(0x20000, 0x20000 | PTE_P | PTE_US);
        // mov dword [ebx], eax ; hlt
        g.code(CODE, &[0x89, 0x03, 0xf4]);
        g.cpu.s.gpr[reg::RBX] = 0x20ff0;
        g.cpu.s.gpr[reg::RAX] = 0xcafe_f00d;
        g.step();
        if wp {
            g.assert_pf(CODE, PF_P | PF_W, 0x20ff0);
            assert_eq!(g.rd32(0x20ff0), 0);
        } else {
            assert_eq!(g.cpu.s.rip, CODE + 2);
            assert_eq!(g.rd32(0x20ff0), 0xcafe_f00d);
            assert_ne!(g.pte_of(0x20000) & PTE_D, 0, "dirty bit set");
        }
    }
}

#[test]
fn user_mode_faults_report_u_and_switch_to_the_ring0_stack() {
    let mut g = Guest::new(CR0_WP, 0);
    g.pte(0x20000, 0x20000 | PTE_P | PTE_RW); // supervisor page
    g.pte(0x21000, 0x21000 | PTE_P | PTE_US); // user read-only page
    g.user();
    // mov eax, [ebx] ; mov [ecx], eax
    g.code(CODE, &[0x8b, 0x03, 0x89, 0x01]);
    g.cpu.s.gpr[reg::RBX] = 0x20004;
    g.cpu.s.gpr[reg::RCX] = 0x21008;
    g.step();
    g.assert_pf(CODE, PF_P | PF_U, 0x20004);
    assert_eq!(
        g.cpu.s.gpr[reg::RSP],
        STACK0 - 24,
        "inner stack with SS:ESP"
    );
    assert_eq!(g.rd32(STACK0 - 4), SEL_DATA3 as u64, "old SS");
    assert_eq!(g.rd32(STACK0 - 8), 0x7000, "old ESP");
    // Back to ring 3 for the write to the read-only page.
    g.user();
    g.cpu.s.rip = CODE + 2;
    g.step();
    g.assert_pf(CODE + 2, PF_P | PF_W | PF_U, 0x21008);
    // Not present, user write.
    g.user();
    g.pte(0x21000, 0);
    g.cpu.mmu.invlpg(0x21000);
    g.cpu.s.rip = CODE + 2;
    g.step();
    g.assert_pf(CODE + 2, PF_W | PF_U, 0x21008);
}

#[test]
fn page_crossing_store_faults_on_the_second_page_and_writes_nothing() {
    let mut g = Guest::new(0, 0);
    g.pte(0x21000, 0); // the page after 0x20000
    g.cpu.mmu.phys.write(0x20ffc, &[1, 2, 3, 4]);
    // mov [ebx], eax with EBX = 0x20ffe: bytes 0x20ffe-0x21001.
    g.code(CODE, &[0x89, 0x03]);
    g.cpu.s.gpr[reg::RBX] = 0x20ffe;
    g.cpu.s.gpr[reg::RAX] = 0xffff_ffff;
    g.step();
    g.assert_pf(CODE, PF_W, 0x21000);
    assert_eq!(g.rd32(0x20ffc), 0x0403_0201, "first page unchanged");
    // push eax from ring 3 onto a not-present stack page: the frame on the ring-0
    // stack shows ESP unchanged.
    let mut g = Guest::new(0, 0);
    g.user();
    g.pte(0x6000, 0);
    g.code(CODE, &[0x50]);
    g.step();
    g.assert_pf(CODE, PF_W | PF_U, 0x6ffc);
    assert_eq!(
        g.rd32(STACK0 - 8),
        0x7000,
        "saved ESP: the push did not happen"
    );
}

#[test]
fn instruction_fetch_faults_at_the_page_holding_the_missing_bytes() {
    let mut g = Guest::new(0, 0);
    g.pte(0x5000, 0);
    // mov eax, imm32 starting 2 bytes before the end of page 0x4000.
    let at = 0x4ffe;
    g.code(at, &[0xb8, 0x78]);
    g.cpu.s.rip = at;
    g.step();
    g.assert_pf(at, 0, 0x5000);
    // Jump into a not-present page: the fault is at the target, saved EIP the target.
    let mut g = Guest::new(0, 0);
    g.pte(0x6000, 0);
    g.code(CODE, &[0xff, 0xe0]); // jmp eax
    g.cpu.s.gpr[reg::RAX] = 0x6010;
    g.step();
    assert_eq!(g.cpu.s.rip, 0x6010);
    g.step();
    g.assert_pf(0x6010, 0, 0x6010);
}

#[test]
fn pae_nx_fetch_fault_reports_i() {
    let mut g = Guest::new(0, CR4_PAE);
    // PAE tables: PDPT at 0x13000, PD at 0x14000, PT at 0x15000 identity-mapping 2 MiB.
    let m = &mut g.cpu.mmu.phys;
    m.write(0x13000, &(0x14000 | PTE_P).to_le_bytes());
    m.write(0x14000, &(0x15000 | URW).to_le_bytes());
    for n in 0..512u64 {
        let mut pte = (n << 12) | URW;
        if n == 6 {
            pte |= PTE_XD;
        }
        m.write(0x15000 + 8 * n, &pte.to_le_bytes());
    }
    g.cpu.s.cr3 = 0x13000;
    g.cpu.s.efer = EFER_NXE;
    g.cpu.sync_paging();
    g.code(0x6000, &[0xf4]);
    g.code(CODE, &[0xff, 0xe0]); // jmp eax
    g.cpu.s.gpr[reg::RAX] = 0x6000;
    g.step();
    g.step();
    g.assert_pf(0x6000, PF_P | PF_I, 0x6000);
    // Data reads of the XD page are fine.
    assert_eq!(g.cpu.mmu.read_u8(0x6000, false), Ok(0xf4));
}

#[test]
fn accessed_and_dirty_bits_follow_guest_accesses() {
    let mut g = Guest::new(0, 0);
    g.pte(0x20000, 0x20000 | URW);
    g.pte(0x21000, 0x21000 | URW);
    // mov eax, [ebx] ; mov [ecx], eax ; hlt
    g.code(CODE, &[0x8b, 0x03, 0x89, 0x01, 0xf4]);
    g.cpu.s.gpr[reg::RBX] = 0x20000;
    g.cpu.s.gpr[reg::RCX] = 0x21000;
    g.step();
    assert_eq!(g.pte_of(0x20000) & (PTE_A | PTE_D), PTE_A);
    assert_eq!(g.pte_of(0x21000) & (PTE_A | PTE_D), 0);
    g.step();
    assert_eq!(g.pte_of(0x21000) & (PTE_A | PTE_D), PTE_A | PTE_D);
    assert_eq!(g.rd32(PD) & (PTE_A | PTE_D), PTE_A, "PDE: A, never D");
}

#[test]
fn guest_invlpg_and_cr3_reload_make_pte_changes_visible() {
    let mut g = Guest::new(0, 0);
    g.cpu.mmu.phys.write(0x30000, &[0x11]);
    g.cpu.mmu.phys.write(0x31000, &[0x22]);
    g.pte(0x20000, 0x30000 | URW);
    // movzx eax, byte [ebx] ; invlpg [ebx] ; movzx eax, byte [ebx] ;
    // mov ecx, cr3 ; mov cr3, ecx ; movzx eax, byte [ebx]
    g.code(
        CODE,
        &[
            0x0f, 0xb6, 0x03, // movzx eax, byte [ebx]
            0x0f, 0x01, 0x3b, // invlpg [ebx]
            0x0f, 0xb6, 0x03, // movzx eax, byte [ebx]
            0x0f, 0x20, 0xd9, // mov ecx, cr3
            0x0f, 0x22, 0xd9, // mov cr3, ecx
            0x0f, 0xb6, 0x03, // movzx eax, byte [ebx]
        ],
    );
    g.cpu.s.gpr[reg::RBX] = 0x20000;
    g.step();
    assert_eq!(g.cpu.s.gpr[reg::RAX], 0x11);
    g.pte(0x20000, 0x31000 | URW);
    g.step(); // invlpg
    g.step();
    assert_eq!(g.cpu.s.gpr[reg::RAX], 0x22);
    g.pte(0x20000, 0x30000 | URW);
    g.step();
    g.step(); // mov cr3 with the same value flushes non-global entries
    g.step();
    assert_eq!(g.cpu.s.gpr[reg::RAX], 0x11);
}

#[test]
fn self_modifying_code_through_another_linear_alias() {
    let mut g = Guest::new(0, 0);
    // Linear 0x0040_5000 (PT1) aliases the code page 0x4000 (and does not share its
    // TLB slot); accessed and dirty already, so the first read through it caches write
    // permission as well.
    g.pte(0x0040_5000, 0x4000 | URW | PTE_A | PTE_D);
    // mov al, [ebx] ; mov byte [ebx], 0x40 ; nop ; hlt
    // The store turns the NOP into INC EAX after the page has been decoded.
    g.code(CODE, &[0x8a, 0x03, 0xc6, 0x03, 0x40, 0x90, 0xf4]);
    g.cpu.s.gpr[reg::RBX] = 0x0040_5005;
    g.cpu.s.gpr[reg::RAX] = 5;
    // Decode the NOP first (it enters the decode cache, the page is marked as code),
    // then fill the alias's TLB entry with a read, then store through it.
    g.cpu.s.rip = CODE + 5;
    g.step();
    g.cpu.s.rip = CODE;
    g.step();
    assert_eq!(
        g.cpu.s.gpr[reg::RAX],
        0x90,
        "read the NOP through the alias"
    );
    g.step();
    g.step();
    assert_eq!(g.cpu.s.gpr[reg::RAX], 0x91, "the modified instruction ran");
}

/// Interpreter throughput with paging on vs off, for the report. Run with
/// `cargo test --release -p morph86-cpu --test paging -- --ignored --nocapture`.
#[test]
#[ignore]
fn interpreter_loop_throughput() {
    for paging in [false, true] {
        let mut g = Guest::new(0, 0);
        if !paging {
            g.cpu.s.cr0 &= !CR0_PG;
            g.cpu.sync_paging();
        }
        // l: add eax, [ebx] ; mov [ebx+4], eax ; dec ecx ; jnz l ; hlt
        g.code(
            CODE,
            &[0x03, 0x03, 0x89, 0x43, 0x04, 0x49, 0x75, 0xf8, 0xf4],
        );
        g.cpu.s.gpr[reg::RBX] = 0x20000;
        let iters = 2_000_000u64;
        g.cpu.s.gpr[reg::RCX] = iters;
        let t = std::time::Instant::now();
        let ev = g.cpu.run(u64::MAX);
        let el = t.elapsed();
        assert_eq!(ev, StepEvent::Halted);
        let n = g.cpu.stats.instructions;
        assert_eq!(n, 4 * iters + 1);
        println!(
            "paging {}: {:.1} ns/instruction ({} instructions, {} TLB fills)",
            if paging { "on " } else { "off" },
            el.as_nanos() as f64 / n as f64,
            n,
            g.cpu.mmu.tlb.stats.fills
        );
    }
}
