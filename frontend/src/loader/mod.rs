//! Boot loaders: Linux bzImage (boot protocol 2.x, 32-bit entry), Multiboot v1, and raw
//! firmware images. Each writes the guest's memory and returns the register state the
//! guest must start with; nothing here trusts the image: every header field is checked
//! before use and a bad image is a [`LoadError`], never a panic.

pub mod firmware;
pub mod linux;
pub mod multiboot;

use morph86_cpu::state::*;
use morph86_cpu::Cpu;
use morph86_mmu::PhysMem;

/// Why a kernel, initrd or firmware image cannot be loaded. The text is the user's error line.
#[derive(Debug, thiserror::Error)]
pub enum LoadError {
    /// The file is not a bzImage nor a Multiboot kernel.
    #[error("{0}: not a Linux bzImage (no 'HdrS' header) nor a Multiboot kernel")]
    UnknownFormat(String),
    /// The file ends before the data its header describes.
    #[error("{0}: file is truncated ({1})")]
    Truncated(String, &'static str),
    /// Boot protocol older than we support.
    #[error("{0}: Linux boot protocol {1}.{2:02} is too old (2.04 or later needed)")]
    OldProtocol(String, u16, u16),
    /// The kernel does not fit in guest RAM.
    #[error("{what} ({size} bytes) does not fit in guest RAM of {ram} MiB")]
    DoesNotFit {
        /// What did not fit.
        what: String,
        /// Its size.
        size: u64,
        /// RAM in MiB.
        ram: u64,
    },
    /// The kernel command line is longer than the kernel accepts.
    #[error("kernel command line is {0} bytes; this kernel accepts at most {1}")]
    CmdlineTooLong(usize, usize),
    /// A Multiboot header or ELF image is malformed.
    #[error("{0}: bad Multiboot image: {1}")]
    BadMultiboot(String, String),
    /// A firmware image of an impossible size.
    #[error(
        "{0}: firmware image must be 64 KiB to 16 MiB and a multiple of 64 KiB (got {1} bytes)"
    )]
    BadFirmware(String, u64),
}

/// Where the boot GDT goes (flat code at 0x10 and flat data at 0x18, as Linux's
/// `__BOOT_CS`/`__BOOT_DS`; flat code at 0x08 too for Multiboot kernels that assume it).
pub const BOOT_GDT: u64 = 0x6000;

/// Register state for a 32-bit protected-mode entry with paging off and flat segments.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Entry32 {
    /// EIP.
    pub eip: u32,
    /// EAX.
    pub eax: u32,
    /// EBX.
    pub ebx: u32,
    /// ESI.
    pub esi: u32,
    /// ESP.
    pub esp: u32,
    /// Code selector.
    pub cs: u16,
    /// Data selector (DS, ES, SS, FS, GS).
    pub ds: u16,
}

/// Writes the boot GDT: null, flat 32-bit code at 0x08 and 0x10, flat data at 0x18.
pub fn write_boot_gdt(mem: &mut PhysMem) {
    let code: u64 = 0x00cf_9a00_0000_ffff;
    let data: u64 = 0x00cf_9200_0000_ffff;
    for (i, d) in [0u64, code, code, data].iter().enumerate() {
        mem.write(BOOT_GDT + i as u64 * 8, &d.to_le_bytes());
    }
}

impl Entry32 {
    /// Puts the CPU in the entry state: protected mode, paging off, interrupts off,
    /// flat 4 GiB segments whose descriptors live in the boot GDT.
    pub fn apply(&self, cpu: &mut Cpu) {
        write_boot_gdt(&mut cpu.mmu.phys);
        let s = &mut cpu.s;
        s.cr0 = (s.cr0 | CR0_PE) & !(CR0_PG | CR0_CD | CR0_NW);
        s.gdtr = TableReg {
            base: BOOT_GDT,
            limit: 4 * 8 - 1,
        };
        s.idtr = TableReg { base: 0, limit: 0 };
        s.load_flat32(self.cs, self.ds);
        s.set_eflags(FLAG_1);
        s.gpr = [0; 16];
        s.gpr[reg::RAX] = self.eax as u64;
        s.gpr[reg::RBX] = self.ebx as u64;
        s.gpr[reg::RSI] = self.esi as u64;
        s.gpr[reg::RSP] = self.esp as u64;
        s.rip = self.eip as u64;
        cpu.sync_paging();
    }
}

/// The PC memory map reported to guests (e820 / Multiboot): usable low memory up to
/// the EBDA, the legacy video and BIOS areas reserved, usable RAM from 1 MiB on.
pub fn memory_map(ram: u64) -> Vec<(u64, u64, u32)> {
    vec![
        (0, 0x9fc00, 1),
        (0x9fc00, 0x400, 2),
        (0xf0000, 0x10000, 2),
        (0x10_0000, ram - 0x10_0000, 1),
    ]
}
