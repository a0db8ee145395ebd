//! The morph86 interpreter as an [`Engine`].
//!
//! A `Cpu` at CPL 3 in 32-bit protected mode with flat 4 GiB segments (descriptor caches
//! set directly, selectors copied from the host child), CR0 as Linux runs user code
//! (PE, MP, ET, NE, WP, AM, PG) and page tables that map exactly the host child's pages:
//! the first code page user read-only, the second code page and the data area user
//! read/write, nothing else (32-bit paging has no NX, so data is executable here while
//! the host faults; generated code never jumps there). The page
//! tables live in physical memory no linear address reaches.
//!
//! With [`Interp::with_jit`] each instruction runs through the JIT instead, translated
//! as a block of its own ([`Jit::one_insn_blocks`]); what the JIT does not translate
//! runs in the interpreter as before. [`Interp::jit_stats`] tells how many ran native.
//!
//! If the MMU cannot walk page tables yet (a probe of an unmapped page does not fault),
//! the interpreter runs with paging off and every physical address outside the two
//! areas is an MMIO window that records being touched: an instruction that touches it
//! counts as a #PF without a known CR2, and its other effects are not compared.

use super::{
    Engine, Fault, Fx, Outcome, State, CODE_BASE, CODE_RW, CODE_SIZE, DATA_BASE, DATA_SIZE,
    MEM_BASE, MEM_SIZE,
};
use morph86_cpu::fpu::F80;
use morph86_cpu::state::*;
use morph86_cpu::{Cpu, SegReg, Segment};
use morph86_jit::lockstep::BlockStep;
use morph86_jit::{Jit, JitStats};
use morph86_mmu::{Access, BusDevice, Mmu, PhysMem};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;

/// Guest RAM size.
const RAM_SIZE: u64 = 4 << 20;
/// Physical address of the page directory.
const PAGE_DIR: u64 = 0x1000;
/// Physical address of the page table for linear 0-4 MiB.
const PAGE_TABLE: u64 = 0x2000;
/// Page-table entry bit: present.
const PTE_P: u32 = 1 << 0;
/// Page-table entry bit: writable.
const PTE_RW: u32 = 1 << 1;
/// Page-table entry bit: user.
const PTE_US: u32 = 1 << 2;
/// Iterations allowed for one instruction that leaves EIP unchanged (a REP string
/// instruction the interpreter runs in chunks).
const MAX_ITERATIONS: u32 = 200_000;

/// An MMIO window over unmapped memory that records any access.
struct Tripwire(Arc<AtomicBool>);

impl BusDevice for Tripwire {
    fn read(&mut self, _offset: u64, data: &mut [u8]) {
        self.0.store(true, Ordering::Relaxed);
        data.fill(0xff);
    }
    fn write(&mut self, _offset: u64, _data: &[u8]) {
        self.0.store(true, Ordering::Relaxed);
    }
}

/// The interpreter engine.
pub struct Interp {
    /// The CPU (public so a caller can look at statistics).
    pub cpu: Cpu,
    touched: Arc<AtomicBool>,
    /// Whether the guest runs with paging on (else the tripwire scheme, see module doc).
    pub paging: bool,
    /// The JIT, when instructions run through it (see module doc).
    jit: Option<Box<Jit>>,
    /// With the JIT: steps run as translated code alone, steps whose translated code
    /// called the interpreter (an in-block call or a memory slow path), and steps run
    /// by the interpreter alone (not translated).
    split: (u64, u64, u64),
}

/// The full x87 tag of a register from its contents (as FXRSTOR derives it): 00 valid,
/// 01 zero, 10 special (NaN, infinity, denormal, unnormal).
pub fn tag_of(r: &F80) -> u16 {
    let exp = r.se & 0x7fff;
    if exp == 0 {
        if r.mant == 0 {
            1
        } else {
            2
        }
    } else if exp == 0x7fff || r.mant >> 63 == 0 {
        2
    } else {
        0
    }
}

impl Interp {
    /// A CPU with the code and data areas mapped.
    pub fn new() -> Result<Interp, String> {
        let phys = PhysMem::new(RAM_SIZE).map_err(|e| e.to_string())?;
        let mut cpu = Cpu::new(Mmu::new(phys));
        let touched = Arc::new(AtomicBool::new(false));
        // Page tables: identity-map the two areas.
        let pde = PAGE_TABLE as u32 | PTE_P | PTE_RW | PTE_US;
        cpu.mmu.phys.write(PAGE_DIR, &pde.to_le_bytes());
        for a in (CODE_BASE..CODE_BASE + CODE_SIZE).step_by(4096) {
            let pte = a | PTE_P | PTE_US | if a >= CODE_RW { PTE_RW } else { 0 };
            cpu.mmu
                .phys
                .write(PAGE_TABLE + (a as u64 >> 12) * 4, &pte.to_le_bytes());
        }
        for a in (DATA_BASE..DATA_BASE + DATA_SIZE).step_by(4096) {
            let pte = a | PTE_P | PTE_RW | PTE_US;
            cpu.mmu
                .phys
                .write(PAGE_TABLE + (a as u64 >> 12) * 4, &pte.to_le_bytes());
        }
        let s = &mut cpu.s;
        s.cr0 = CR0_PE | CR0_MP | CR0_ET | CR0_NE | CR0_WP | CR0_AM | CR0_PG;
        s.cr3 = PAGE_DIR;
        s.cr4 = CR4_OSFXSR | CR4_OSXMMEXCPT;
        cpu.sync_paging();
        let paging = cpu.mmu.translate(0x1000, Access::Read, true).is_err()
            && cpu
                .mmu
                .translate(DATA_BASE as u64, Access::Read, true)
                .is_ok();
        if !paging {
            cpu.s.cr0 &= !CR0_PG;
            cpu.sync_paging();
            cpu.mmu.phys.add_mmio(
                0,
                CODE_BASE as u64,
                Box::new(Tripwire(Arc::clone(&touched))),
            );
            let end = (DATA_BASE + DATA_SIZE) as u64;
            cpu.mmu.phys.add_mmio(
                end,
                (1u64 << 32) - end,
                Box::new(Tripwire(Arc::clone(&touched))),
            );
        }
        let code = Segment {
            base: 0,
            limit: 0xffff_ffff,
            attrs: ATTR_P
                | ATTR_S
                | ATTR_CODE
                | ATTR_RW
                | ATTR_ACCESSED
                | ATTR_DB
                | ATTR_G
                | (3 << ATTR_DPL_SHIFT),
            selector: 0x23,
        };
        let data = Segment {
            attrs: ATTR_P
                | ATTR_S
                | ATTR_RW
                | ATTR_ACCESSED
                | ATTR_DB
                | ATTR_G
                | (3 << ATTR_DPL_SHIFT),
            selector: 0x2b,
            ..code
        };
        let null = Segment {
            base: 0,
            limit: 0,
            attrs: ATTR_UNUSABLE,
            selector: 0,
        };
        for r in SegReg::ALL {
            cpu.s.seg[r as usize] = match r {
                SegReg::Cs => code,
                SegReg::Fs | SegReg::Gs => null,
                _ => data,
            };
        }
        cpu.s.cpl = 3;
        Ok(Interp {
            cpu,
            touched,
            paging,
            jit: None,
            split: (0, 0, 0),
        })
    }

    /// Like [`Interp::new`], but every instruction the JIT translates runs as translated
    /// code (a one-instruction block).
    pub fn with_jit() -> Result<Interp, String> {
        let mut e = Interp::new()?;
        let mut jit = Jit::new(8 << 20).map_err(|err| format!("JIT code cache: {err}"))?;
        jit.one_insn_blocks = true;
        e.jit = Some(Box::new(jit));
        Ok(e)
    }

    /// The JIT's counters, when it runs the instructions.
    pub fn jit_stats(&self) -> Option<&JitStats> {
        self.jit.as_deref().map(|j| &j.stats)
    }

    /// With the JIT: steps run as translated code alone, steps whose translated code
    /// called the interpreter (an in-block call or a memory slow path), and steps run
    /// by the interpreter alone (not translated).
    pub fn jit_split(&self) -> (u64, u64, u64) {
        self.split
    }

    fn set_fx(&mut self, fx: &Fx) {
        let f = &mut self.cpu.s.fpu;
        f.cw = fx.fcw;
        f.set_sw(fx.fsw);
        f.fop = fx.fop & 0x7ff;
        let mut tw = 0u16;
        for i in 0..8 {
            // ST(i), stack order as in the FXSAVE image.
            f.st_img[i].copy_from_slice(&fx.st[i][..10]);
        }
        for p in 0..8 {
            let t = if fx.ftw & (1 << p) == 0 {
                3
            } else {
                tag_of(&f.reg(p))
            };
            tw |= t << (2 * p);
        }
        f.tw = tw;
        self.cpu.s.sse.mxcsr = fx.mxcsr;
        for i in 0..8 {
            self.cpu.s.sse.xmm[i] = [
                u64::from_le_bytes(fx.xmm[i][..8].try_into().unwrap_or([0; 8])),
                u64::from_le_bytes(fx.xmm[i][8..].try_into().unwrap_or([0; 8])),
            ];
        }
    }

    fn fx(&self) -> Fx {
        let f = &self.cpu.s.fpu;
        let mut fx = Fx {
            fcw: f.cw,
            fsw: f.sw,
            fop: f.fop,
            mxcsr: self.cpu.s.sse.mxcsr,
            ..Default::default()
        };
        for p in 0..8 {
            if (f.tw >> (2 * p)) & 3 != 3 {
                fx.ftw |= 1 << p;
            }
        }
        for i in 0..8 {
            fx.st[i][..10].copy_from_slice(&f.st_img[i]);
        }
        for i in 0..8 {
            fx.xmm[i][..8].copy_from_slice(&self.cpu.s.sse.xmm[i][0].to_le_bytes());
            fx.xmm[i][8..].copy_from_slice(&self.cpu.s.sse.xmm[i][1].to_le_bytes());
        }
        fx
    }
}

impl Engine for Interp {
    fn load(&mut self, code: &[u8], st: &State) -> Result<State, String> {
        let mut img = vec![0xccu8; CODE_SIZE as usize];
        img[..code.len()].copy_from_slice(code);
        self.cpu.mmu.phys.write(CODE_BASE as u64, &img);
        self.cpu.mmu.phys.write(MEM_BASE as u64, &st.mem);
        let s = &mut self.cpu.s;
        for (i, v) in st.gpr.iter().enumerate() {
            s.gpr[i] = *v as u64;
        }
        s.rip = st.eip as u64;
        s.set_eflags(st.eflags);
        s.halted = false;
        s.inhibit_irq = false;
        self.set_fx(&st.fx);
        self.touched.store(false, Ordering::Relaxed);
        self.state()
    }

    fn step(&mut self) -> Result<Outcome, String> {
        let start = self.cpu.s.rip;
        self.touched.store(false, Ordering::Relaxed);
        for _ in 0..MAX_ITERATIONS {
            let cpu = &mut self.cpu;
            let jit = &mut self.jit;
            let split = &mut self.split;
            let r = std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| {
                if let Some(j) = jit.as_mut() {
                    // The interpreter's decode cache is used only by interpreter runs.
                    let decodes = |c: &Cpu| c.stats.decode_hits + c.stats.decode_misses;
                    let d0 = decodes(cpu);
                    let r = match j.step_block(cpu) {
                        BlockStep::Ran { fault: Some(e), .. } => Some(Err(e)),
                        BlockStep::Ran { insns, .. } if insns > 0 => Some(Ok(())),
                        // Nothing ran (not translated, or the block was dropped).
                        _ => None,
                    };
                    match (&r, decodes(cpu) != d0) {
                        (None, _) => split.2 += 1,
                        (Some(_), false) => split.0 += 1,
                        (Some(_), true) => split.1 += 1,
                    }
                    if let Some(r) = r {
                        return r;
                    }
                }
                cpu.try_step()
            }))
            .map_err(|p| {
                let msg = p
                    .downcast_ref::<String>()
                    .cloned()
                    .or_else(|| p.downcast_ref::<&str>().map(|s| s.to_string()))
                    .unwrap_or_default();
                format!("interpreter panicked: {msg}")
            })?;
            if self.touched.load(Ordering::Relaxed) {
                return Ok(Outcome::Fault(Fault {
                    vector: 14,
                    addr: None,
                }));
            }
            match r {
                Err(e) => {
                    let addr = (e.vector == 14).then_some(self.cpu.s.cr2 as u32);
                    return Ok(Outcome::Fault(Fault {
                        vector: e.vector,
                        addr,
                    }));
                }
                Ok(()) if self.cpu.s.rip != start => return Ok(Outcome::Done),
                Ok(()) => {}
            }
        }
        Ok(Outcome::Done)
    }

    fn state(&mut self) -> Result<State, String> {
        let s = &self.cpu.s;
        let mut st = State {
            gpr: [0; 8],
            eip: s.rip as u32,
            eflags: s.eflags(),
            fx: self.fx(),
            mem: vec![0; MEM_SIZE as usize],
        };
        for i in 0..8 {
            st.gpr[i] = s.gpr[i] as u32;
        }
        self.cpu.mmu.phys.read(MEM_BASE as u64, &mut st.mem);
        Ok(st)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn tags_follow_the_sdm_classes() {
        assert_eq!(tag_of(&F80 { mant: 0, se: 0 }), 1);
        assert_eq!(
            tag_of(&F80 {
                mant: 1 << 63,
                se: 0x3fff
            }),
            0
        );
        assert_eq!(
            tag_of(&F80 {
                mant: 1 << 63,
                se: 0x7fff
            }),
            2
        );
        assert_eq!(tag_of(&F80 { mant: 1, se: 0 }), 2);
        assert_eq!(
            tag_of(&F80 {
                mant: 1,
                se: 0x3fff
            }),
            2,
            "unnormal"
        );
    }

    #[test]
    fn jit_engine_runs_translated_code_and_returns_faults() {
        let mut e = Interp::with_jit().unwrap();
        // add eax, ebx ; mov ecx, [0] (#PF: page 0 is not mapped)
        let code = [0x01, 0xd8, 0x8b, 0x0d, 0, 0, 0, 0];
        let st = State {
            gpr: [5, 0, 0, 7, 0, 0, 0, 0],
            eip: CODE_BASE,
            eflags: 0x202,
            ..Default::default()
        };
        e.load(&code, &st).unwrap();
        assert_eq!(e.step().unwrap(), Outcome::Done);
        assert_eq!(e.state().unwrap().gpr[0], 12);
        assert_eq!(e.jit_split(), (1, 0, 0), "ran as translated code alone");
        assert_eq!(
            e.step().unwrap(),
            Outcome::Fault(Fault {
                vector: 14,
                addr: Some(0)
            })
        );
        assert_eq!(e.state().unwrap().eip, CODE_BASE + 2, "EIP at the fault");
        assert!(e.jit_stats().unwrap().translated >= 2);
    }

    #[test]
    fn state_round_trips() {
        let mut e = Interp::new().unwrap();
        let mut st = State {
            gpr: [1, 2, 3, 4, 5, 6, 7, 8],
            eflags: 0x246,
            ..Default::default()
        };
        st.fx.fcw = 0x37f;
        st.fx.fsw = 0x2800;
        st.fx.ftw = 0b0010_0000;
        st.fx.st[0] = [0, 0, 0, 0, 0, 0, 0, 0x80, 0xff, 0x3f];
        st.mem[5] = 9;
        let got = e.load(&[0x90], &st).unwrap();
        assert_eq!(got, st);
        assert_eq!(e.cpu.s.fpu.tw, 0xf3ff, "R5 valid, the rest empty");
    }
}
