//! Protected-mode, V86, interrupt and task-switch tests. Each test boots from real mode
//! through a small stub (LGDT, CR0.PE, far JMP, segment loads, LIDT, LTR), with GDT,
//! IDT and TSSs built in guest memory by the helpers below. Expected values come from
//! the Intel SDM vol. 3 (frame layouts of figures 6-4 and 20-2, the TSS of figure 7-2,
//! the error-code format of 6.13), not from the emulator.

use iced_x86::code_asm::*;
use morph86_cpu::descriptor::Descriptor;
use morph86_cpu::state::*;
use morph86_cpu::{Cpu, InterruptSource, StepEvent};
use morph86_mmu::{Mmu, PhysMem};

const GDT: u64 = 0x1000;
const IDT: u64 = 0x2000;
const TSS_A: u64 = 0x3000;
const TSS_B: u64 = 0x5400;
const HANDLERS: u64 = 0x6_0000;
const STACK0: u32 = 0x9_f000;
const STACK3: u32 = 0x7_f000;
const GATE_TARGET: u64 = 0x1_2000;
const GATE_TARGET2: u64 = 0x1_3000;
const TASK_B_CODE: u64 = 0x1_4000;

const CODE0: u16 = 0x08;
const DATA0: u16 = 0x10;
const CODE3: u16 = 0x18;
const DATA3: u16 = 0x20;
const TSS_A_SEL: u16 = 0x28;
const TSS_B_SEL: u16 = 0x30;
const CALLGATE3: u16 = 0x38;
const CODE16: u16 = 0x40;
const DATA16: u16 = 0x48;
const CALLGATE0: u16 = 0x50;
const TASKGATE: u16 = 0x58;
const NOTPRESENT: u16 = 0x60;

/// Port the I/O bitmap of TSS A allows; every other port is denied.
const ALLOWED_PORT: u16 = 0x60;

fn wr(c: &mut Cpu, addr: u64, b: &[u8]) {
    c.mmu.phys.write(addr, b);
}
fn rd32(c: &mut Cpu, addr: u64) -> u32 {
    let mut b = [0u8; 4];
    c.mmu.phys.read(addr, &mut b);
    u32::from_le_bytes(b)
}
fn rd8(c: &mut Cpu, addr: u64) -> u8 {
    let mut b = [0u8; 1];
    c.mmu.phys.read(addr, &mut b);
    b[0]
}
fn wr32(c: &mut Cpu, addr: u64, v: u32) {
    wr(c, addr, &v.to_le_bytes());
}
fn set_gdt(c: &mut Cpu, sel: u16, d: Descriptor) {
    wr(c, GDT + (sel & !7) as u64, &d.0.to_le_bytes());
}
fn set_idt(c: &mut Cpu, v: u8, d: Descriptor) {
    wr(c, IDT + v as u64 * 8, &d.0.to_le_bytes());
}
fn handler(v: u8) -> u64 {
    HANDLERS + v as u64 * 16
}

/// Assembles `f` for `bitness` at `ip` and stores it there.
fn code(c: &mut Cpu, bitness: u32, ip: u64, f: impl FnOnce(&mut CodeAssembler)) {
    let mut a = CodeAssembler::new(bitness).unwrap();
    f(&mut a);
    let bytes = a.assemble(ip).unwrap();
    wr(c, ip, &bytes);
}

/// Far JMP/CALL ptr16:32 bytes (32-bit code).
fn far32(op: u8, sel: u16, off: u32) -> Vec<u8> {
    let mut v = vec![op];
    v.extend_from_slice(&off.to_le_bytes());
    v.extend_from_slice(&sel.to_le_bytes());
    v
}

/// Steps until the CPU halts or shuts down.
fn run(c: &mut Cpu) -> StepEvent {
    for _ in 0..100_000 {
        match c.step() {
            StepEvent::Ok => {}
            ev => return ev,
        }
    }
    panic!("did not halt; EIP {:#x}", c.s.rip);
}

/// Continues after a HLT at `eip` (same CS).
fn resume(c: &mut Cpu) -> StepEvent {
    c.s.halted = false;
    run(c)
}

/// Runs `f` as 32-bit ring-0 code at `ip` and returns when it halts.
fn exec0(c: &mut Cpu, ip: u64, f: impl FnOnce(&mut CodeAssembler)) -> StepEvent {
    code(c, 32, ip, f);
    c.s.rip = ip;
    c.s.halted = false;
    run(c)
}

/// Builds GDT, IDT and TSSs, then boots from real mode into 32-bit ring 0 with TR = TSS A.
fn boot() -> Cpu {
    let mut c = Cpu::new(Mmu::new(PhysMem::new(4 << 20).unwrap()));
    set_gdt(&mut c, CODE0, Descriptor::segment(0, 0xfffff, 0x9a, 0xc));
    set_gdt(&mut c, DATA0, Descriptor::segment(0, 0xfffff, 0x92, 0xc));
    set_gdt(&mut c, CODE3, Descriptor::segment(0, 0xfffff, 0xfa, 0xc));
    set_gdt(&mut c, DATA3, Descriptor::segment(0, 0xfffff, 0xf2, 0xc));
    // TSS A: the VME interrupt redirection bitmap at 0x68 (32 bytes), then a full I/O
    // bitmap at 0x88 (0x2000 bytes + the terminating 0xff byte).
    set_gdt(
        &mut c,
        TSS_A_SEL,
        Descriptor::segment(TSS_A as u32, 0x88 + 0x2000, 0x89, 0),
    );
    set_gdt(
        &mut c,
        TSS_B_SEL,
        Descriptor::segment(TSS_B as u32, 0x67, 0x89, 0),
    );
    set_gdt(
        &mut c,
        CALLGATE3,
        Descriptor::gate(CODE0, GATE_TARGET as u32, 0xec, 2),
    );
    set_gdt(&mut c, CODE16, Descriptor::segment(0, 0xffff, 0x9a, 0));
    set_gdt(&mut c, DATA16, Descriptor::segment(0, 0xffff, 0x92, 0));
    set_gdt(
        &mut c,
        CALLGATE0,
        Descriptor::gate(CODE0, GATE_TARGET2 as u32, 0x8c, 0),
    );
    set_gdt(&mut c, TASKGATE, Descriptor::gate(TSS_B_SEL, 0, 0xe5, 0));
    // A data segment with P = 0.
    set_gdt(
        &mut c,
        NOTPRESENT,
        Descriptor::segment(0, 0xfffff, 0x12, 0xc),
    );
    for v in 0..=255u8 {
        set_idt(
            &mut c,
            v,
            Descriptor::gate(CODE0, handler(v) as u32, 0x8e, 0),
        );
        wr(&mut c, handler(v), &[0xf4]);
    }
    // TSS A: ring-0 stack and the I/O bitmap.
    wr32(&mut c, TSS_A + 4, STACK0);
    wr32(&mut c, TSS_A + 8, DATA0 as u32);
    wr(&mut c, TSS_A + 0x66, &0x88u16.to_le_bytes());
    let mut bitmap = vec![0xffu8; 0x2001];
    bitmap[ALLOWED_PORT as usize / 8] &= !(1 << (ALLOWED_PORT % 8));
    wr(&mut c, TSS_A + 0x88, &bitmap);
    // Redirection bitmap: every vector redirected except 0x22.
    let mut redir = [0u8; 32];
    redir[0x22 / 8] |= 1 << (0x22 % 8);
    wr(&mut c, TSS_A + 0x68, &redir);
    // TSS B: a ring-0 task at TASK_B_CODE.
    wr32(&mut c, TSS_B + 0x20, TASK_B_CODE as u32);
    wr32(&mut c, TSS_B + 0x24, 0x2);
    wr32(&mut c, TSS_B + 0x28, 0xb0b0_b0b0); // EAX
    wr32(&mut c, TSS_B + 0x38, 0x8_f000); // ESP
    for (k, s) in [DATA0, CODE0, DATA0, DATA0, DATA0, DATA0]
        .iter()
        .enumerate()
    {
        wr32(&mut c, TSS_B + 0x48 + 4 * k as u64, *s as u32);
    }
    // Pseudo-descriptors for LGDT / LIDT.
    wr(&mut c, 0x7b00, &(16u16 * 8 - 1).to_le_bytes());
    wr32(&mut c, 0x7b02, GDT as u32);
    wr(&mut c, 0x7b10, &0x7ffu16.to_le_bytes());
    wr32(&mut c, 0x7b12, IDT as u32);
    code(&mut c, 16, 0x7c00, |a| {
        a.lgdt(ptr(0x7b00)).unwrap();
        a.mov(eax, cr0).unwrap();
        a.or(eax, 1).unwrap();
        a.mov(cr0, eax).unwrap();
        let mut j = vec![0x66];
        j.extend(far32(0xea, CODE0, 0x7d00));
        a.db(&j).unwrap();
    });
    code(&mut c, 32, 0x7d00, |a| {
        a.mov(ax, DATA0 as u32).unwrap();
        a.mov(ds, ax).unwrap();
        a.mov(es, ax).unwrap();
        a.mov(fs, ax).unwrap();
        a.mov(gs, ax).unwrap();
        a.mov(ss, ax).unwrap();
        a.mov(esp, STACK0).unwrap();
        a.lidt(ptr(0x7b10)).unwrap();
        a.mov(ax, TSS_A_SEL as u32).unwrap();
        a.ltr(ax).unwrap();
        a.hlt().unwrap();
    });
    c.load_cs_real(0);
    c.s.rip = 0x7c00;
    assert_eq!(run(&mut c), StepEvent::Halted);
    assert!(c.s.protected(), "CR0.PE set");
    c
}

fn sreg(c: &Cpu, s: SegReg) -> u16 {
    c.s.seg[s as usize].selector
}

#[test]
fn real_to_protected_and_back() {
    let mut c = boot();
    assert_eq!(sreg(&c, SegReg::Cs), CODE0);
    assert_eq!(sreg(&c, SegReg::Ss), DATA0);
    assert_eq!(c.s.cpl, 0);
    assert!(c.s.code32() && c.s.stack32());
    assert_eq!(c.s.tr.selector, TSS_A_SEL);
    // LTR marks the TSS busy (type 9 -> 0xB): access byte 0x8B.
    assert_eq!(rd8(&mut c, GDT + TSS_A_SEL as u64 + 5), 0x8b);
    // Segment loads set the accessed bit: 0x92 -> 0x93.
    assert_eq!(rd8(&mut c, GDT + DATA0 as u64 + 5), 0x93);
    assert_eq!(c.s.idtr.base, IDT);

    // Back to real mode: through a 16-bit segment, clear PE, far jump to real CS.
    code(&mut c, 16, 0x7f00, |a| {
        a.mov(ax, DATA16 as u32).unwrap();
        a.mov(ds, ax).unwrap();
        a.mov(ss, ax).unwrap();
        a.mov(eax, cr0).unwrap();
        a.and(eax, 0xffff_fffeu32 as i32).unwrap();
        a.mov(cr0, eax).unwrap();
        a.db(&[0xea, 0x80, 0x7f, 0x00, 0x00]).unwrap(); // jmp 0000:7F80
    });
    code(&mut c, 16, 0x7f80, |a| {
        a.xor(ax, ax).unwrap();
        a.mov(ds, ax).unwrap();
        a.mov(ss, ax).unwrap();
        a.hlt().unwrap();
    });
    let ev = exec0(&mut c, 0x7e00, |a| {
        a.db(&far32(0xea, CODE16, 0x7f00)).unwrap()
    });
    assert_eq!(ev, StepEvent::Halted);
    assert!(c.s.real());
    assert_eq!(sreg(&c, SegReg::Cs), 0);
    assert_eq!(c.s.seg[SegReg::Cs as usize].base, 0);
    assert_eq!(c.s.seg[SegReg::Ds as usize].base, 0);
    assert_eq!(c.s.cpl, 0);
    assert!(!c.s.code32());
}

/// Drops to ring 3 with IRETD (to outer privilege) at `ip3`, IF = 1.
fn to_ring3(c: &mut Cpu, ip3: u64, f: impl FnOnce(&mut CodeAssembler)) -> StepEvent {
    code(c, 32, ip3, f);
    exec0(c, 0x1_0000, |a| {
        a.push(DATA3 as u32 | 3).unwrap();
        a.push(STACK3).unwrap();
        a.push(0x202).unwrap();
        a.push(CODE3 as u32 | 3).unwrap();
        a.push(ip3 as u32).unwrap();
        a.iretd().unwrap();
    })
}

#[test]
fn iret_to_ring3_call_gate_with_params_and_retf_back() {
    let mut c = boot();
    code(&mut c, 32, GATE_TARGET, |a| {
        a.hlt().unwrap();
        a.mov(ax, DATA0 as u32).unwrap();
        a.mov(ds, ax).unwrap();
        a.retf_1(8).unwrap();
    });
    set_idt(
        &mut c,
        0x80,
        Descriptor::gate(CODE0, handler(0x80) as u32, 0xee, 0),
    );
    // Ring 3: push two parameters (5 bytes each), call through the DPL-3 call gate
    // (7 bytes), then NOP and INT 0x80.
    let ret_ip: u32 = 0x1_1000 + 5 + 5 + 7;
    let ev = to_ring3(&mut c, 0x1_1000, |a| {
        a.push(0x1111).unwrap();
        a.push(0x2222).unwrap();
        a.db(&far32(0x9a, CALLGATE3 | 3, 0)).unwrap();
        a.nop().unwrap();
        a.int(0x80).unwrap();
    });
    assert_eq!(ev, StepEvent::Halted);
    assert_eq!(c.s.cpl, 0);
    assert_eq!(sreg(&c, SegReg::Cs), CODE0);
    assert_eq!(sreg(&c, SegReg::Ss), DATA0);
    // Inner stack from TSS A (ESP0): SS, ESP, param1, param0, CS, EIP (SDM figure 5-13).
    let top = c.s.gpr[reg::RSP] as u32;
    assert_eq!(top, STACK0 - 24);
    let f: Vec<u32> = (0..6).map(|k| rd32(&mut c, top as u64 + 4 * k)).collect();
    assert_eq!(f[0], ret_ip, "return EIP");
    assert_eq!(f[1], (CODE3 | 3) as u32);
    assert_eq!(f[2], 0x2222, "parameter copied from the outer stack");
    assert_eq!(f[3], 0x1111);
    assert_eq!(f[4], STACK3 - 8, "outer ESP");
    assert_eq!(f[5], (DATA3 | 3) as u32);

    // RETF 8 to ring 3: DS (DPL 0) is nulled, stack back to the outer one with the
    // parameters released; then INT 0x80 from ring 3 enters ring 0 on ESP0.
    let ev = resume(&mut c);
    assert_eq!(ev, StepEvent::Halted);
    assert_eq!(c.s.rip, handler(0x80) + 1);
    let top = c.s.gpr[reg::RSP] as u32;
    assert_eq!(top, STACK0 - 20);
    let f: Vec<u32> = (0..5).map(|k| rd32(&mut c, top as u64 + 4 * k)).collect();
    assert_eq!(f[0], ret_ip + 1 + 2, "EIP after INT 0x80");
    assert_eq!(f[1], (CODE3 | 3) as u32);
    assert_eq!(f[2] & IF, IF, "pushed EFLAGS has IF");
    assert_eq!(f[3], STACK3, "ESP after RETF 8 released the parameters");
    assert_eq!(f[4], (DATA3 | 3) as u32);
    assert_eq!(c.s.eflags() & IF, 0, "interrupt gate clears IF");
    // DS was nulled by the return to ring 3 (its DPL 0 < CPL 3).
    assert_eq!(sreg(&c, SegReg::Ds), 0);
}

#[test]
fn same_privilege_call_gate_and_int_dpl_check() {
    let mut c = boot();
    code(&mut c, 32, GATE_TARGET2, |a| a.hlt().unwrap());
    let ev = exec0(&mut c, 0x1_0000, |a| {
        a.db(&far32(0x9a, CALLGATE0, 0xdead)).unwrap();
    });
    assert_eq!(ev, StepEvent::Halted);
    assert_eq!(c.s.rip, GATE_TARGET2 + 1);
    let top = c.s.gpr[reg::RSP] as u32;
    assert_eq!(top, STACK0 - 8, "no stack switch");
    assert_eq!(rd32(&mut c, top as u64), 0x1_0007);
    assert_eq!(rd32(&mut c, top as u64 + 4), CODE0 as u32);

    // From ring 3, INT 0x81 through a DPL-0 gate: #GP(0x81*8 + 2), EXT clear.
    c.s.set_r32(reg::RSP, STACK0);
    let ev = to_ring3(&mut c, 0x1_1000, |a| a.int(0x81).unwrap());
    assert_eq!(ev, StepEvent::Halted);
    assert_eq!(c.s.rip, handler(13) + 1);
    let top = c.s.gpr[reg::RSP];
    assert_eq!(rd32(&mut c, top), 0x81 * 8 + 2);
    assert_eq!(
        rd32(&mut c, top + 4),
        0x1_1000,
        "fault EIP is the INT itself"
    );
}

#[test]
fn trap_gate_from_ring0_keeps_if() {
    let mut c = boot();
    set_idt(
        &mut c,
        0x82,
        Descriptor::gate(CODE0, handler(0x82) as u32, 0x8f, 0),
    );
    let ev = exec0(&mut c, 0x1_0000, |a| {
        a.sti().unwrap();
        a.int(0x82).unwrap();
    });
    assert_eq!(ev, StepEvent::Halted);
    assert_eq!(c.s.rip, handler(0x82) + 1);
    assert_ne!(c.s.eflags() & IF, 0, "trap gate leaves IF set");
    let top = c.s.gpr[reg::RSP];
    assert_eq!(top as u32, STACK0 - 12);
    assert_eq!(rd32(&mut c, top), 0x1_0003);
    assert_eq!(rd32(&mut c, top + 4), CODE0 as u32);
    assert_ne!(rd32(&mut c, top + 8) & IF, 0);
}

/// Enters V86 mode at 2000:0000 with IOPL 0 via IRETD and returns the event.
fn enter_v86(c: &mut Cpu, f: impl FnOnce(&mut CodeAssembler)) -> StepEvent {
    code(c, 16, 0x2_0000, f);
    exec0(c, 0x1_0000, |a| {
        a.push(0).unwrap(); // GS
        a.push(0).unwrap(); // FS
        a.push(0x2000).unwrap(); // DS
        a.push(0x2000).unwrap(); // ES
        a.push(0x3000).unwrap(); // SS
        a.push(0x100).unwrap(); // ESP
        a.push((VM | FLAG_1) as i32).unwrap();
        a.push(0x2000).unwrap(); // CS
        a.push(0).unwrap(); // EIP
        a.iretd().unwrap();
    })
}

#[test]
fn v86_entry_iopl_fault_and_exit_frame() {
    let mut c = boot();
    let ev = enter_v86(&mut c, |a| {
        a.mov(ax, 5).unwrap();
        a.cli().unwrap();
    });
    assert_eq!(ev, StepEvent::Halted);
    assert_eq!(c.s.rip, handler(13) + 1, "CLI with IOPL 0 in V86: #GP");
    assert!(!c.s.v86());
    assert_eq!(c.s.cpl, 0);
    assert_eq!(c.s.gpr[reg::RAX] as u16, 5, "V86 code ran");
    let top = c.s.gpr[reg::RSP] as u32;
    assert_eq!(top, STACK0 - 40);
    let f: Vec<u32> = (0..10).map(|k| rd32(&mut c, top as u64 + 4 * k)).collect();
    // Error code, EIP, CS, EFLAGS, ESP, SS, ES, DS, FS, GS (SDM figure 20-2).
    assert_eq!(f[0], 0);
    assert_eq!(f[1], 3, "EIP of the CLI");
    assert_eq!(f[2], 0x2000);
    assert_ne!(f[3] & VM, 0);
    assert_eq!(f[4], 0x100);
    assert_eq!(f[5], 0x3000);
    assert_eq!(f[6], 0x2000);
    assert_eq!(f[7], 0x2000);
    assert_eq!(f[8], 0);
    assert_eq!(f[9], 0);
    for s in [SegReg::Ds, SegReg::Es, SegReg::Fs, SegReg::Gs] {
        assert_eq!(sreg(&c, s), 0, "{s:?} zeroed on exit from V86");
    }
}

#[test]
fn v86_pushf_and_int_are_iopl_sensitive() {
    for op in [0x9c_u8, 0xcd] {
        let mut c = boot();
        let ev = enter_v86(&mut c, |a| {
            a.db(&[op, 0x21]).unwrap();
        });
        assert_eq!(ev, StepEvent::Halted);
        assert_eq!(c.s.rip, handler(13) + 1, "opcode {op:#x}: #GP(0)");
        let top = c.s.gpr[reg::RSP];
        assert_eq!(rd32(&mut c, top), 0);
    }
}

#[test]
fn v86_io_bitmap() {
    let mut c = boot();
    let ev = enter_v86(&mut c, |a| {
        a.in_(al, ALLOWED_PORT as i32).unwrap();
        a.mov(bx, 7).unwrap();
        a.in_(al, ALLOWED_PORT as i32 + 1).unwrap();
    });
    assert_eq!(ev, StepEvent::Halted);
    assert_eq!(c.s.gpr[reg::RBX] as u16, 7, "IN from an allowed port ran");
    assert_eq!(c.s.rip, handler(13) + 1, "denied port: #GP");
    let top = c.s.gpr[reg::RSP];
    assert_eq!(rd32(&mut c, top), 0);
    assert_eq!(rd32(&mut c, top + 4), 5, "EIP of the second IN");
}

#[test]
fn task_switch_by_jmp() {
    let mut c = boot();
    code(&mut c, 32, TASK_B_CODE, |a| a.hlt().unwrap());
    let ev = exec0(&mut c, 0x1_0000, |a| {
        a.mov(eax, 0xaaaa_aaaau32).unwrap();
        a.db(&far32(0xea, TSS_B_SEL, 0)).unwrap();
    });
    assert_eq!(ev, StepEvent::Halted);
    assert_eq!(c.s.tr.selector, TSS_B_SEL);
    assert_eq!(c.s.rip, TASK_B_CODE + 1);
    assert_eq!(c.s.gpr[reg::RAX] as u32, 0xb0b0_b0b0);
    assert_eq!(c.s.gpr[reg::RSP] as u32, 0x8_f000);
    assert_ne!(c.s.cr0 & CR0_TS, 0, "task switch sets CR0.TS");
    assert_eq!(c.s.eflags() & NT, 0, "JMP does not nest");
    // Busy bits: old cleared (0x89), new set (0x8B).
    assert_eq!(rd8(&mut c, GDT + TSS_A_SEL as u64 + 5), 0x89);
    assert_eq!(rd8(&mut c, GDT + TSS_B_SEL as u64 + 5), 0x8b);
    // Old state saved in TSS A: EIP after the JMP, EAX.
    assert_eq!(rd32(&mut c, TSS_A + 0x20), 0x1_0000 + 5 + 7);
    assert_eq!(rd32(&mut c, TSS_A + 0x28), 0xaaaa_aaaa);
    assert_eq!(rd32(&mut c, TSS_B) & 0xffff, 0, "no back link");
}

#[test]
fn task_switch_by_call_through_gate_and_iret_back() {
    let mut c = boot();
    code(&mut c, 32, TASK_B_CODE, |a| {
        a.hlt().unwrap();
        a.iretd().unwrap();
    });
    let ev = exec0(&mut c, 0x1_0000, |a| {
        a.db(&far32(0x9a, TASKGATE, 0)).unwrap();
        a.hlt().unwrap();
    });
    assert_eq!(ev, StepEvent::Halted);
    assert_eq!(c.s.tr.selector, TSS_B_SEL);
    assert_ne!(c.s.eflags() & NT, 0, "CALL sets NT in the new task");
    assert_eq!(rd32(&mut c, TSS_B) & 0xffff, TSS_A_SEL as u32, "back link");
    assert_eq!(
        rd8(&mut c, GDT + TSS_A_SEL as u64 + 5),
        0x8b,
        "caller stays busy"
    );
    assert_eq!(rd8(&mut c, GDT + TSS_B_SEL as u64 + 5), 0x8b);
    // IRET with NT: back to task A after the CALL.
    let ev = resume(&mut c);
    assert_eq!(ev, StepEvent::Halted);
    assert_eq!(c.s.tr.selector, TSS_A_SEL);
    assert_eq!(c.s.rip, 0x1_0000 + 7 + 1);
    assert_eq!(
        rd8(&mut c, GDT + TSS_B_SEL as u64 + 5),
        0x89,
        "IRET frees B"
    );
    assert_eq!(rd8(&mut c, GDT + TSS_A_SEL as u64 + 5), 0x8b);
    assert_eq!(c.s.eflags() & NT, 0);
    // B's saved image has NT cleared by the IRET.
    assert_eq!(rd32(&mut c, TSS_B + 0x24) & NT, 0);
    assert_eq!(sreg(&c, SegReg::Cs), CODE0);
    assert_eq!(c.s.gpr[reg::RSP] as u32, STACK0);
}

#[test]
fn task_gate_in_idt() {
    let mut c = boot();
    set_idt(&mut c, 0x90, Descriptor::gate(TSS_B_SEL, 0, 0x85, 0));
    code(&mut c, 32, TASK_B_CODE, |a| {
        a.hlt().unwrap();
        a.iretd().unwrap();
    });
    let ev = exec0(&mut c, 0x1_0000, |a| {
        a.int(0x90).unwrap();
        a.hlt().unwrap();
    });
    assert_eq!(ev, StepEvent::Halted);
    assert_eq!(c.s.tr.selector, TSS_B_SEL);
    assert_eq!(rd32(&mut c, TSS_B) & 0xffff, TSS_A_SEL as u32);
    assert_ne!(c.s.eflags() & NT, 0);
    assert_eq!(resume(&mut c), StepEvent::Halted);
    assert_eq!(c.s.tr.selector, TSS_A_SEL);
    assert_eq!(c.s.rip, 0x1_0000 + 2 + 1);
}

#[test]
fn double_fault_from_gp_while_delivering_np() {
    let mut c = boot();
    // IDT[11] (#NP) has a reserved type: delivering #NP raises #GP(11*8+2+EXT),
    // contributory on contributory -> #DF with error code 0.
    wr(&mut c, IDT + 11 * 8, &[0; 8]);
    let ev = exec0(&mut c, 0x1_0000, |a| {
        a.mov(ax, NOTPRESENT as u32).unwrap();
        a.mov(ds, ax).unwrap();
    });
    assert_eq!(ev, StepEvent::Halted);
    assert_eq!(c.s.rip, handler(8) + 1);
    let top = c.s.gpr[reg::RSP];
    assert_eq!(rd32(&mut c, top), 0, "#DF error code");
    assert_eq!(
        rd32(&mut c, top + 4),
        0x1_0004,
        "EIP of the faulting MOV DS"
    );
}

#[test]
fn not_present_segment_error_code() {
    let mut c = boot();
    let ev = exec0(&mut c, 0x1_0000, |a| {
        a.mov(ax, NOTPRESENT as u32).unwrap();
        a.mov(es, ax).unwrap();
    });
    assert_eq!(ev, StepEvent::Halted);
    assert_eq!(c.s.rip, handler(11) + 1);
    let top = c.s.gpr[reg::RSP];
    assert_eq!(rd32(&mut c, top), NOTPRESENT as u32, "#NP(selector)");
    assert_eq!(sreg(&c, SegReg::Es), DATA0, "ES unchanged");
}

#[test]
fn triple_fault_is_reported() {
    let mut c = boot();
    wr(&mut c, 0x7b20, &[0, 0, 0, 0, 0, 0]);
    let ev = exec0(&mut c, 0x1_0000, |a| {
        a.lidt(ptr(0x7b20)).unwrap();
        a.int3().unwrap();
    });
    assert_eq!(ev, StepEvent::TripleFault);
}

struct OneIrq(Option<u8>);
impl InterruptSource for OneIrq {
    fn pending(&mut self) -> bool {
        self.0.is_some()
    }
    fn acknowledge(&mut self) -> u8 {
        self.0.take().unwrap_or(0xff)
    }
}

#[test]
fn external_interrupt_error_codes_have_ext() {
    let mut c = boot();
    // IDT[0x30] not present: #NP(0x30*8 + 2 + EXT).
    set_idt(
        &mut c,
        0x30,
        Descriptor::gate(CODE0, handler(0x30) as u32, 0x0e, 0),
    );
    c.intr = Some(Box::new(OneIrq(Some(0x30))));
    let ev = exec0(&mut c, 0x1_0000, |a| {
        a.sti().unwrap();
        a.nop().unwrap();
        a.nop().unwrap();
        a.hlt().unwrap();
    });
    assert_eq!(ev, StepEvent::Halted);
    assert_eq!(c.s.rip, handler(11) + 1);
    let top = c.s.gpr[reg::RSP];
    assert_eq!(rd32(&mut c, top), 0x30 * 8 + 2 + 1);
    // STI's shadow: the interrupt came after the first NOP, not before it.
    assert_eq!(rd32(&mut c, top + 4), 0x1_0002);
}

#[test]
fn idt_limit_and_software_int_codes() {
    let mut c = boot();
    // IDT limit covering vectors 0-31 only: INT 0x40 -> #GP(0x40*8+2), EXT clear.
    wr(&mut c, 0x7b20, &(32u16 * 8 - 1).to_le_bytes());
    wr32(&mut c, 0x7b22, IDT as u32);
    let ev = exec0(&mut c, 0x1_0000, |a| {
        a.lidt(ptr(0x7b20)).unwrap();
        a.int(0x40).unwrap();
    });
    assert_eq!(ev, StepEvent::Halted);
    assert_eq!(c.s.rip, handler(13) + 1);
    let top = c.s.gpr[reg::RSP];
    assert_eq!(rd32(&mut c, top), 0x40 * 8 + 2);
}

#[test]
fn single_step_trap_and_mov_ss_shadow() {
    let mut c = boot();
    let ev = exec0(&mut c, 0x1_0000, |a| {
        a.pushfd().unwrap();
        a.or(dword_ptr(esp), TF as i32).unwrap();
        a.popfd().unwrap();
        a.mov(ax, DATA0 as u32).unwrap(); // traps after this one
    });
    assert_eq!(ev, StepEvent::Halted);
    assert_eq!(c.s.rip, handler(1) + 1);
    let top = c.s.gpr[reg::RSP];
    // POPFD set TF: the first trap is after the instruction following it.
    assert_eq!(rd32(&mut c, top), 0x1_0000 + 1 + 7 + 1 + 4);
    assert_ne!(c.s.dr[6] & (1 << 14), 0, "DR6.BS");

    // MOV SS: no trap between it and the next instruction.
    let mut c = boot();
    let ev = exec0(&mut c, 0x1_0000, |a| {
        a.mov(ax, DATA0 as u32).unwrap();
        a.pushfd().unwrap();
        a.or(dword_ptr(esp), TF as i32).unwrap();
        a.popfd().unwrap();
        a.mov(ss, eax).unwrap(); // 8E D0
        a.nop().unwrap();
    });
    assert_eq!(ev, StepEvent::Halted);
    let top = c.s.gpr[reg::RSP];
    assert_eq!(
        rd32(&mut c, top),
        0x1_0000 + 4 + 1 + 7 + 1 + 2 + 1,
        "trap after the NOP"
    );
}

#[test]
fn vme_virtual_interrupt_flag_and_int_redirection() {
    let mut c = boot();
    c.s.cr4 |= CR4_VME;
    c.sync_paging();
    // The V86 task's IVT at linear 0: INT 0x21 -> 4000:0010, where HLT faults (#GP).
    wr32(&mut c, 0x21 * 4, 0x4000_0010);
    wr(&mut c, 0x4_0010, &[0xf4]);
    let ev = enter_v86(&mut c, |a| {
        a.cli().unwrap();
        a.pushf().unwrap();
        a.sti().unwrap();
        a.pushf().unwrap();
        a.int(0x21).unwrap();
    });
    assert_eq!(ev, StepEvent::Halted);
    assert_eq!(c.s.rip, handler(13) + 1, "HLT in the V86 handler");
    let top = c.s.gpr[reg::RSP];
    assert_eq!(rd32(&mut c, top + 4), 0x10, "faulting IP");
    assert_eq!(
        rd32(&mut c, top + 8),
        0x4000,
        "in the redirected handler's CS"
    );
    assert_eq!(rd32(&mut c, top + 12) & VIF, 0, "INT cleared VIF");
    let rd16 = |c: &mut Cpu, a: u64| rd32(c, a) & 0xffff;
    // V86 stack at 3000:0100 (linear 0x30100).
    let f1 = rd16(&mut c, 0x300fe);
    let f2 = rd16(&mut c, 0x300fc);
    assert_eq!(
        f1 & (IF | IOPL),
        IOPL,
        "PUSHF after CLI: IF = VIF = 0, IOPL reads 3"
    );
    assert_eq!(f2 & (IF | IOPL), IF | IOPL, "PUSHF after STI: IF = VIF = 1");
    assert_eq!(rd16(&mut c, 0x300fa) & IF, IF, "INT pushed VIF as IF");
    assert_eq!(rd16(&mut c, 0x300f8), 0x2000, "INT pushed CS");
    assert_eq!(rd16(&mut c, 0x300f6), 6, "INT pushed IP after it");
}

#[test]
fn vme_unredirected_int_faults_with_iopl0() {
    let mut c = boot();
    c.s.cr4 |= CR4_VME;
    let ev = enter_v86(&mut c, |a| a.int(0x22).unwrap());
    assert_eq!(ev, StepEvent::Halted);
    assert_eq!(c.s.rip, handler(13) + 1);
    let top = c.s.gpr[reg::RSP];
    assert_eq!(rd32(&mut c, top), 0);
    assert_eq!(rd32(&mut c, top + 4), 0, "EIP of the INT");
}

#[test]
fn v86_monitor_skips_cli_and_irets_back() {
    let mut c = boot();
    // #GP handler: drop the error code, step over the 1-byte CLI, IRETD to V86.
    code(&mut c, 32, handler(13), |a| {
        a.add(esp, 4).unwrap();
        a.inc(dword_ptr(esp)).unwrap();
        a.iretd().unwrap();
    });
    // INT3 from V86 goes to the protected-mode handler through a DPL-3 gate.
    set_idt(
        &mut c,
        3,
        Descriptor::gate(CODE0, handler(3) as u32, 0xee, 0),
    );
    let ev = enter_v86(&mut c, |a| {
        a.cli().unwrap();
        a.mov(bx, 9).unwrap();
        a.int3().unwrap();
    });
    assert_eq!(ev, StepEvent::Halted);
    assert_eq!(c.s.rip, handler(3) + 1);
    assert_eq!(
        c.s.gpr[reg::RBX] as u16,
        9,
        "V86 code resumed after the monitor"
    );
    let top = c.s.gpr[reg::RSP];
    assert_eq!(rd32(&mut c, top), 5, "EIP after INT3");
    assert_ne!(rd32(&mut c, top + 8) & VM, 0);
    assert_eq!(top as u32, STACK0 - 36, "V86 frame without error code");
}

#[test]
fn trap_gate_from_ring3_and_iret_back() {
    let mut c = boot();
    // DPL-3 trap gate; the handler halts, then IRETDs back to ring 3.
    set_idt(
        &mut c,
        0x83,
        Descriptor::gate(CODE0, handler(0x83) as u32, 0xef, 0),
    );
    code(&mut c, 32, handler(0x83), |a| {
        a.hlt().unwrap();
        a.iretd().unwrap();
    });
    let ev = to_ring3(&mut c, 0x1_1000, |a| {
        a.int(0x83).unwrap();
        a.mov(ecx, 0x33).unwrap();
        a.int(0x80).unwrap(); // DPL-0 gate from ring 3: #GP, to stop
    });
    assert_eq!(ev, StepEvent::Halted);
    assert_eq!(c.s.rip, handler(0x83) + 1);
    assert_eq!(c.s.cpl, 0);
    assert_ne!(c.s.eflags() & IF, 0, "trap gate keeps IF");
    let top = c.s.gpr[reg::RSP];
    assert_eq!(top as u32, STACK0 - 20, "stack switch to ESP0");
    assert_eq!(rd32(&mut c, top), 0x1_1002);
    assert_eq!(rd32(&mut c, top + 12), STACK3);
    // IRETD to ring 3, which then runs MOV ECX and faults on INT 0x80.
    assert_eq!(resume(&mut c), StepEvent::Halted);
    assert_eq!(c.s.gpr[reg::RCX] as u32, 0x33, "back in ring 3");
    assert_eq!(c.s.rip, handler(13) + 1);
}
