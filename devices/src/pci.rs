//! PCI: configuration mechanism 1 at 0xcf8 (address) / 0xcfc-0xcff (data), the i440FX
//! host bridge (8086:1237) at 00:00.0, the PIIX3 PCI-to-ISA bridge (8086:7000) at
//! 00:01.0 with its PIRQ routing registers, and the PIIX3 reset control register at 0xcf9.
//!
//! References: PCI Local Bus Specification 3.0 (section 3.2.2.3.2 "Configuration
//! Mechanism #1", 6.1 "Configuration Space Organization", 6.2.5 "Base Addresses"), the
//! 82441FX/82437FX (i440FX) datasheet and the 82371SB (PIIX3) datasheet (4.1.10 PIRQRC,
//! 4.7.1 "Reset Control Register").
//!
//! The i440FX's PAM registers (0x59-0x5f, shadow RAM of 0xC0000-0xFFFFF) and SMRAM
//! register (0x72) act on the physical memory map once the machine connects the bridge
//! to it ([`PciHost::connect_memory`]): each change is queued as a
//! [`morph86_mmu::phys::PhysJob`] that the CPU runs right after the OUT that wrote it.
//! Expansion ROMs (config 0x30) are served from images the machine attaches with
//! [`PciHost::set_option_rom`].
//!
//! Adding a device: implement [`PciFunction`] (usually by embedding a [`PciConfig`] and
//! declaring BARs with [`PciConfig::set_bar`]), then [`PciHost::add`] it at a device /
//! function number. To follow BAR moves and command-register changes, override
//! [`PciFunction::config_write`], call the default behaviour
//! ([`PciConfig::write`]) and look at [`PciConfig::bar_address`] afterwards. Interrupt
//! routing of INTA#-INTD# goes through [`PciHost::pirq_route`].

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use morph86_mmu::phys::{PhysJobs, SHADOW_GRANULES, SHADOW_READ_RAM, SHADOW_WRITE_RAM};
use morph86_mmu::{BusDevice, PhysMem};

use crate::bus::lock;
use crate::control::{PlatformControl, ResetSource};
use crate::irq::{InterruptController, IrqLine};

/// Configuration address port.
pub const PORT_CONFIG_ADDRESS: u16 = 0xcf8;
/// Reset control register port (PIIX3).
pub const PORT_RESET_CONTROL: u16 = 0xcf9;
/// Configuration data window.
pub const PORT_CONFIG_DATA: u16 = 0xcfc;

/// CONFIG_ADDRESS bit 31: enable.
pub const CA_ENABLE: u32 = 0x8000_0000;
/// CONFIG_ADDRESS bits 23-16: bus.
pub const CA_BUS: u32 = 0x00ff_0000;
/// CONFIG_ADDRESS bits 15-8: device (15-11) and function (10-8).
pub const CA_DEVFN: u32 = 0x0000_ff00;
/// CONFIG_ADDRESS bits 7-2: register.
pub const CA_REG: u32 = 0x0000_00fc;

/// Reset control bit 1: system reset (SRST) - selects a hard reset.
pub const RC_SRST: u8 = 0b0000_0010;
/// Reset control bit 2: reset CPU (RCPU), acts on a 0->1 transition.
pub const RC_RCPU: u8 = 0b0000_0100;
/// Reset control bit 3: full reset.
pub const RC_FULL: u8 = 0b0000_1000;

/// Header offsets (PCI 3.0 figure 6-1).
pub const CFG_VENDOR: u8 = 0x00;
/// Device ID.
pub const CFG_DEVICE: u8 = 0x02;
/// Command register.
pub const CFG_COMMAND: u8 = 0x04;
/// Status register.
pub const CFG_STATUS: u8 = 0x06;
/// Revision ID; class code in 0x09-0x0b.
pub const CFG_REVISION: u8 = 0x08;
/// Cache line size.
pub const CFG_CACHE_LINE: u8 = 0x0c;
/// Latency timer.
pub const CFG_LATENCY: u8 = 0x0d;
/// Header type (bit 7: multi-function).
pub const CFG_HEADER_TYPE: u8 = 0x0e;
/// First base address register.
pub const CFG_BAR0: u8 = 0x10;
/// Expansion ROM base address register (type 0 header).
pub const CFG_ROM_ADDRESS: u8 = 0x30;
/// Subsystem vendor ID.
pub const CFG_SUBSYS_VENDOR: u8 = 0x2c;
/// Interrupt line.
pub const CFG_INTERRUPT_LINE: u8 = 0x3c;
/// Interrupt pin (1 = INTA#).
pub const CFG_INTERRUPT_PIN: u8 = 0x3d;

/// Command bit 0: I/O space enable.
pub const CMD_IO: u16 = 0b0000_0000_0000_0001;
/// Command bit 1: memory space enable.
pub const CMD_MEM: u16 = 0b0000_0000_0000_0010;
/// Command bit 2: bus master enable.
pub const CMD_MASTER: u16 = 0b0000_0000_0000_0100;
/// Command bit 6: parity error response.
pub const CMD_PARITY: u16 = 0b0000_0000_0100_0000;
/// Command bit 8: SERR# enable.
pub const CMD_SERR: u16 = 0b0000_0001_0000_0000;
/// Command bit 10: interrupt disable.
pub const CMD_INTX_DISABLE: u16 = 0b0000_0100_0000_0000;
/// Status bits cleared by writing 1 (15-11 error bits, 8 master data parity error).
pub const STATUS_W1C: u16 = 0b1111_1001_0000_0000;
/// Header type bit 7: multi-function device.
pub const HEADER_MULTIFUNCTION: u8 = 0b1000_0000;
/// BAR bit 0: I/O space.
pub const BAR_IO: u32 = 0b0001;
/// Memory BAR bit 3: prefetchable.
pub const BAR_PREFETCH: u32 = 0b1000;
/// Expansion ROM BAR bit 0: address decode enable (PCI 3.0 6.2.5.2).
pub const ROM_ENABLE: u32 = 0b1;
/// Expansion ROM BAR bits 31-11: the base address.
pub const ROM_ADDRESS_MASK: u32 = 0xffff_f800;

/// i440FX PAM0, the first Programmable Attribute Map register (datasheet 3.2.18).
pub const I440FX_PAM0: u8 = 0x59;
/// Number of PAM registers (PAM0-PAM6).
pub const I440FX_PAM_COUNT: usize = 7;
/// PAM nibble bit 0: RE, reads of the range go to DRAM.
pub const PAM_RE: u8 = 0b0001;
/// PAM nibble bit 1: WE, writes of the range go to DRAM.
pub const PAM_WE: u8 = 0b0010;
/// i440FX SMRAM control register (datasheet 3.2.23).
pub const I440FX_SMRAM: u8 = 0x72;
/// SMRAM bit 6: D_OPEN, SMRAM visible outside SMM.
pub const SMRAM_D_OPEN: u8 = 0b0100_0000;
/// SMRAM bit 5: D_CLS, SMM data accesses go to the PCI side.
pub const SMRAM_D_CLS: u8 = 0b0010_0000;
/// SMRAM bit 4: D_LCK, locks D_OPEN clear and G_SMRAME / D_LCK until reset.
pub const SMRAM_D_LCK: u8 = 0b0001_0000;
/// SMRAM bit 3: G_SMRAME, SMRAM enable.
pub const SMRAM_G_SMRAME: u8 = 0b0000_1000;
/// SMRAM bits 2-0: C_BASE_SEG, hard-wired to 010 (SMRAM at 0xA0000).
pub const SMRAM_C_BASE_SEG: u8 = 0b0000_0010;
/// Subsystem vendor QEMU gives its devices (Red Hat, Inc.); SeaBIOS recognises QEMU's
/// i440FX by it.
pub const QEMU_SUBSYS_VENDOR: u16 = 0x1af4;
/// Subsystem ID QEMU gives its devices ("QEMU virtual machine").
pub const QEMU_SUBSYS_ID: u16 = 0x1100;

/// The shadow attributes of 0xC0000-0xFFFFF (16 KiB granules, see
/// [`morph86_mmu::phys::SHADOW_GRANULE`]) that PAM0-PAM6 select: PAM1-PAM6 hold two
/// granules each (low nibble first) from 0xC0000 to 0xEFFFF; the high nibble of PAM0
/// covers all of 0xF0000-0xFFFFF.
pub fn pam_to_shadow(pam: [u8; I440FX_PAM_COUNT]) -> [u8; SHADOW_GRANULES] {
    let attr = |nibble: u8| {
        let mut a = 0;
        if nibble & PAM_RE != 0 {
            a |= SHADOW_READ_RAM;
        }
        if nibble & PAM_WE != 0 {
            a |= SHADOW_WRITE_RAM;
        }
        a
    };
    std::array::from_fn(|g| {
        if g >= 12 {
            attr(pam[0] >> 4)
        } else {
            let r = pam[1 + g / 2];
            attr(if g % 2 == 0 { r } else { r >> 4 })
        }
    })
}

/// PIIX3 PIRQ route control registers PIRQRCA-PIRQRCD (0x60-0x63).
pub const PIIX3_PIRQRC: u8 = 0x60;
/// PIRQRC bit 7: routing disabled.
pub const PIRQ_DISABLE: u8 = 0b1000_0000;
/// PIRQRC bits 3-0: the ISA IRQ.
pub const PIRQ_IRQ: u8 = 0b0000_1111;

/// The kind of a base address register.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum BarKind {
    /// I/O space.
    Io,
    /// 32-bit memory space.
    Mem32 {
        /// Prefetchable.
        prefetchable: bool,
    },
}

#[derive(Debug, Clone, Copy)]
struct Bar {
    kind: BarKind,
    size: u32,
}

impl PciConfig {
    /// Declares an expansion ROM of `size` bytes (a power of two, at least 2 KiB): the
    /// guest sizes it through [`CFG_ROM_ADDRESS`] and enables it with bit 0.
    pub fn set_rom_bar(&mut self, size: u32) {
        let size = size
            .max(0x800)
            .checked_next_power_of_two()
            .unwrap_or(1 << 31);
        let mask = !(size - 1) & ROM_ADDRESS_MASK | ROM_ENABLE;
        for k in 0..4 {
            self.wmask[CFG_ROM_ADDRESS as usize + k] = (mask >> (8 * k)) as u8;
        }
        self.set32(CFG_ROM_ADDRESS, 0);
        self.rom_size = size;
    }

    /// Where the expansion ROM decodes, if declared, enabled (bit 0) and memory space
    /// is on: (base, size).
    pub fn rom_window(&self) -> Option<(u32, u32)> {
        if self.rom_size == 0 || self.get16(CFG_COMMAND) & CMD_MEM == 0 {
            return None;
        }
        let raw = self.get32(CFG_ROM_ADDRESS);
        let base = raw & ROM_ADDRESS_MASK;
        (raw & ROM_ENABLE != 0 && base != 0).then_some((base, self.rom_size))
    }
}

/// A type 0 configuration space with write masks.
#[derive(Clone)]
pub struct PciConfig {
    data: [u8; 256],
    wmask: [u8; 256],
    w1c: [u8; 256],
    bars: [Option<Bar>; 6],
    /// Expansion ROM size (0: none).
    rom_size: u32,
}

impl std::fmt::Debug for PciConfig {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "PciConfig({:04x}:{:04x})", self.get16(0), self.get16(2))
    }
}

impl PciConfig {
    /// A header type 0 function: `class` is base class << 16 | subclass << 8 | prog-if.
    /// Command, cache line size, latency timer and interrupt line are writable; status
    /// error bits are write-one-to-clear; everything else is read-only until declared.
    pub fn new(vendor: u16, device: u16, class: u32, revision: u8, header_type: u8) -> Self {
        let mut c = PciConfig {
            data: [0; 256],
            wmask: [0; 256],
            w1c: [0; 256],
            bars: [None; 6],
            rom_size: 0,
        };
        c.set16(CFG_VENDOR, vendor);
        c.set16(CFG_DEVICE, device);
        c.set8(CFG_REVISION, revision);
        c.set8(0x09, class as u8);
        c.set8(0x0a, (class >> 8) as u8);
        c.set8(0x0b, (class >> 16) as u8);
        c.set8(CFG_HEADER_TYPE, header_type);
        let cmd = CMD_IO | CMD_MEM | CMD_MASTER | CMD_PARITY | CMD_SERR | CMD_INTX_DISABLE;
        c.wmask[CFG_COMMAND as usize] = cmd as u8;
        c.wmask[CFG_COMMAND as usize + 1] = (cmd >> 8) as u8;
        c.w1c[CFG_STATUS as usize] = STATUS_W1C as u8;
        c.w1c[CFG_STATUS as usize + 1] = (STATUS_W1C >> 8) as u8;
        c.wmask[CFG_CACHE_LINE as usize] = 0xff;
        c.wmask[CFG_LATENCY as usize] = 0xff;
        c.wmask[CFG_INTERRUPT_LINE as usize] = 0xff;
        c
    }

    /// Raw byte at `off` (device side).
    pub fn get8(&self, off: u8) -> u8 {
        self.data[off as usize]
    }
    /// Raw little-endian word at `off` (device side).
    pub fn get16(&self, off: u8) -> u16 {
        u16::from_le_bytes([self.get8(off), self.get8(off.wrapping_add(1))])
    }
    /// Raw little-endian dword at `off` (device side).
    pub fn get32(&self, off: u8) -> u32 {
        (0..4).fold(0, |v, k| {
            v | (self.get8(off.wrapping_add(k)) as u32) << (8 * k)
        })
    }
    /// Sets a byte regardless of write masks (device side).
    pub fn set8(&mut self, off: u8, v: u8) {
        self.data[off as usize] = v;
    }
    /// Sets a word regardless of write masks.
    pub fn set16(&mut self, off: u8, v: u16) {
        self.set8(off, v as u8);
        self.set8(off.wrapping_add(1), (v >> 8) as u8);
    }
    /// Sets a dword regardless of write masks.
    pub fn set32(&mut self, off: u8, v: u32) {
        for k in 0..4 {
            self.set8(off.wrapping_add(k), (v >> (8 * k)) as u8);
        }
    }
    /// Makes bytes `off..off+len` guest-writable with `mask` per byte.
    pub fn set_writable(&mut self, off: u8, len: usize, mask: u8) {
        for k in 0..len {
            if let Some(m) = self.wmask.get_mut(off as usize + k) {
                *m = mask;
            }
        }
    }

    /// Declares BAR `n` (0-5) of `size` bytes (a power of two; at least 4 for I/O and 16
    /// for memory). Sizing by writing all ones then reads back `!(size - 1)` plus type bits.
    pub fn set_bar(&mut self, n: usize, kind: BarKind, size: u32) {
        if n >= 6 || !size.is_power_of_two() {
            log::error!("pci: bad BAR {n} of size {size:#x} refused");
            return;
        }
        let (low, min) = match kind {
            BarKind::Io => (BAR_IO, 4),
            BarKind::Mem32 { prefetchable } => (if prefetchable { BAR_PREFETCH } else { 0 }, 16),
        };
        let size = size.max(min);
        let off = CFG_BAR0 + 4 * n as u8;
        self.set32(off, low);
        let mask = !(size - 1) & !(min - 1);
        for k in 0..4 {
            self.wmask[off as usize + k] = (mask >> (8 * k)) as u8;
        }
        self.bars[n] = Some(Bar { kind, size });
    }

    /// The base address BAR `n` decodes at, if declared and its space is enabled in the
    /// command register.
    pub fn bar_address(&self, n: usize) -> Option<u32> {
        let bar = (*self.bars.get(n)?)?;
        let raw = self.get32(CFG_BAR0 + 4 * n as u8);
        let cmd = self.get16(CFG_COMMAND);
        match bar.kind {
            BarKind::Io => (cmd & CMD_IO != 0).then_some(raw & !3),
            BarKind::Mem32 { .. } => (cmd & CMD_MEM != 0).then_some(raw & !15),
        }
    }

    /// The size declared for BAR `n`.
    pub fn bar_size(&self, n: usize) -> Option<u32> {
        self.bars.get(n).copied().flatten().map(|b| b.size)
    }

    /// A guest read of `size` bytes at `off` (bytes past 0xff read as ones).
    pub fn read(&self, off: u8, size: usize) -> u32 {
        let mut v = 0u32;
        for k in 0..size.min(4) {
            let b = self.data.get(off as usize + k).copied().unwrap_or(0xff);
            v |= (b as u32) << (8 * k);
        }
        v
    }

    /// A guest write of `size` bytes at `off`, through the write and W1C masks.
    pub fn write(&mut self, off: u8, size: usize, value: u32) {
        for k in 0..size.min(4) {
            let i = off as usize + k;
            if i >= 256 {
                break;
            }
            let b = (value >> (8 * k)) as u8;
            let m = self.wmask[i];
            self.data[i] = (self.data[i] & !m) | (b & m);
            self.data[i] &= !(b & self.w1c[i]);
        }
    }
}

/// A PCI function as the host bridge sees it.
pub trait PciFunction: Send {
    /// Its configuration space.
    fn config(&self) -> &PciConfig;
    /// Its configuration space, mutable.
    fn config_mut(&mut self) -> &mut PciConfig;
    /// A guest configuration read (override to compute registers on the fly).
    fn config_read(&mut self, off: u8, size: usize) -> u32 {
        self.config().read(off, size)
    }
    /// A guest configuration write (override to react to BAR or command changes).
    fn config_write(&mut self, off: u8, size: usize, value: u32) {
        self.config_mut().write(off, size, value);
    }
    /// The machine lets the function act on the memory map through `jobs` (see
    /// [`PciHost::connect_memory`]); e.g. to map memory it owns where the guest puts a
    /// BAR. The default ignores it.
    fn connect_memory(&mut self, jobs: PhysJobs) {
        let _ = jobs;
    }
    /// A guest read inside BAR `bar` (I/O or memory) at `offset` from its base.
    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        log::debug!("pci: read of BAR {bar} +{offset:#x} not handled");
        data.fill(0xff);
    }
    /// A guest write inside BAR `bar` at `offset` from its base.
    fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]) {
        log::debug!(
            "pci: write of {} bytes to BAR {bar} +{offset:#x} not handled",
            data.len()
        );
    }
}

/// A PCI function with nothing but its configuration space (host bridge, ISA bridge).
#[derive(Debug, Clone)]
pub struct PlainFunction {
    /// The configuration space.
    pub cfg: PciConfig,
}

impl PciFunction for PlainFunction {
    fn config(&self) -> &PciConfig {
        &self.cfg
    }
    fn config_mut(&mut self) -> &mut PciConfig {
        &mut self.cfg
    }
}

/// The i440FX host bridge's configuration space (00:00.0).
pub fn i440fx() -> PlainFunction {
    let mut cfg = PciConfig::new(0x8086, 0x1237, 0x06_00_00, 0x02, 0x00);
    cfg.set16(CFG_COMMAND, CMD_MEM | CMD_MASTER);
    cfg.set16(CFG_STATUS, 0x0280); // fast back-to-back capable, medium DEVSEL
    cfg.set16(CFG_SUBSYS_VENDOR, QEMU_SUBSYS_VENDOR);
    cfg.set16(CFG_SUBSYS_VENDOR + 2, QEMU_SUBSYS_ID);
    // PMCCFG, DRAM control, PAM0-6 (0x59-0x5f), DRB (0x60-0x67) and friends.
    cfg.set_writable(0x50, 0x30, 0xff);
    // SMRAM: C_BASE_SEG is hard-wired; the other bits go through I440fx::config_write.
    cfg.set_writable(I440FX_SMRAM, 1, 0);
    cfg.set8(I440FX_SMRAM, SMRAM_C_BASE_SEG);
    PlainFunction { cfg }
}

/// The i440FX host bridge as a PCI function: its configuration space, and the memory
/// map it routes once connected ([`PciHost::connect_memory`]).
pub struct I440fx {
    /// The configuration space.
    pub cfg: PciConfig,
    jobs: Option<PhysJobs>,
}

impl I440fx {
    fn new() -> Self {
        I440fx {
            cfg: i440fx().cfg,
            jobs: None,
        }
    }

    /// Queues the memory routing the PAM and SMRAM registers select.
    fn push_routing(&self) {
        let Some(jobs) = &self.jobs else { return };
        let pam: [u8; I440FX_PAM_COUNT] =
            std::array::from_fn(|k| self.cfg.get8(I440FX_PAM0 + k as u8));
        let smram = self.cfg.get8(I440FX_SMRAM);
        let open = smram & (SMRAM_D_OPEN | SMRAM_G_SMRAME) == SMRAM_D_OPEN | SMRAM_G_SMRAME;
        let shadow = pam_to_shadow(pam);
        jobs.push(Box::new(move |m: &mut PhysMem| {
            m.set_shadow(shadow);
            m.set_smram_open(open);
        }));
    }

    fn write_smram(&mut self, v: u8) {
        let old = self.cfg.get8(I440FX_SMRAM);
        let new = if old & SMRAM_D_LCK != 0 {
            // Locked: D_OPEN reads 0 and only D_CLS may change until reset.
            (old & !(SMRAM_D_CLS | SMRAM_D_OPEN)) | (v & SMRAM_D_CLS)
        } else {
            let mut n = (v & (SMRAM_D_OPEN | SMRAM_D_CLS | SMRAM_D_LCK | SMRAM_G_SMRAME))
                | SMRAM_C_BASE_SEG;
            if n & SMRAM_D_LCK != 0 {
                n &= !SMRAM_D_OPEN;
            }
            n
        };
        self.cfg.set8(I440FX_SMRAM, new);
    }
}

impl PciFunction for I440fx {
    fn config(&self) -> &PciConfig {
        &self.cfg
    }
    fn config_mut(&mut self) -> &mut PciConfig {
        &mut self.cfg
    }
    fn config_write(&mut self, off: u8, size: usize, value: u32) {
        let end = off as usize + size.min(4);
        let pam_end = I440FX_PAM0 as usize + I440FX_PAM_COUNT;
        let smram = (off as usize..end).contains(&(I440FX_SMRAM as usize));
        self.cfg.write(off, size, value);
        if smram {
            let shift = 8 * (I440FX_SMRAM - off) as u32;
            self.write_smram((value >> shift) as u8);
        }
        if smram || (off as usize) < pam_end && end > I440FX_PAM0 as usize {
            self.push_routing();
        }
    }
}

/// The PIIX3 PCI-to-ISA bridge's configuration space (00:01.0, function 0).
pub fn piix3_isa() -> PlainFunction {
    let mut cfg = PciConfig::new(0x8086, 0x7000, 0x06_01_00, 0x00, HEADER_MULTIFUNCTION);
    cfg.set16(CFG_COMMAND, CMD_IO | CMD_MEM | CMD_MASTER);
    cfg.set16(CFG_STATUS, 0x0200); // medium DEVSEL
                                   // ISA I/O recovery, X-bus chip select, PIRQ routing, SERIRQ, TOM, APIC base and the
                                   // rest of the chipset registers: kept, not acted upon (except PIRQRC).
    cfg.set_writable(0x4c, 0xb4, 0xff);
    cfg.set_writable(PIIX3_PIRQRC, 4, PIRQ_DISABLE | PIRQ_IRQ);
    for k in 0..4 {
        cfg.set8(PIIX3_PIRQRC + k, PIRQ_DISABLE);
    }
    cfg.set8(0x4c, 0x4d); // IORT default
    cfg.set16(0x4e, 0x0003); // XBCS default
    cfg.set8(0x69, 0x02); // TOM default
    PlainFunction { cfg }
}

/// Why [`PciHost::add`] refused a function.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum PciError {
    /// The slot is taken.
    #[error("PCI device {dev:02x}.{func} is already present")]
    Occupied {
        /// Device number.
        dev: u8,
        /// Function number.
        func: u8,
    },
    /// Numbers out of range.
    #[error("PCI device {dev} function {func} is out of range (device 0-31, function 0-7)")]
    OutOfRange {
        /// Device number.
        dev: u8,
        /// Function number.
        func: u8,
    },
    /// No function there.
    #[error("there is no PCI device {dev:02x}.{func}")]
    Absent {
        /// Device number.
        dev: u8,
        /// Function number.
        func: u8,
    },
    /// An option ROM image larger than 16 MiB.
    #[error("option ROM of {0} bytes is too large (at most 16 MiB)")]
    RomTooLarge(usize),
}

fn pirq_route_of(isa: &Mutex<PlainFunction>, n: usize) -> Option<u8> {
    let r = lock(isa).cfg.get8(PIIX3_PIRQRC + (n as u8 & 3));
    let irq = r & PIRQ_IRQ;
    // IRQs 0-2, 8 and 13 are reserved in PIRQRC.
    (r & PIRQ_DISABLE == 0 && !matches!(irq, 0..=2 | 8 | 13)).then_some(irq)
}

/// Start of the PCI memory hole (below it: RAM; see [`crate::rtc::LOW_RAM_MAX`]).
pub const PCI_MMIO_BASE: u64 = 0xe000_0000;
/// Length of the PCI memory window (up to the I/O APIC at 0xfec0_0000).
pub const PCI_MMIO_LEN: u64 = 0xfec0_0000 - PCI_MMIO_BASE;

/// The port bus fallback: I/O accesses nothing else claims go to PCI I/O BARs.
pub struct PciIoWindow(pub Arc<Mutex<PciHost>>);

impl BusDevice for PciIoWindow {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        lock(&self.0).io_read(offset as u16, data);
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        lock(&self.0).io_write(offset as u16, data);
    }
}

/// The PCI memory hole as an MMIO region: map it at [`PCI_MMIO_BASE`] with length
/// [`PCI_MMIO_LEN`] in the physical memory map; accesses go to memory BARs.
pub struct PciMmioWindow(pub Arc<Mutex<PciHost>>);

impl BusDevice for PciMmioWindow {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        lock(&self.0).mem_read(PCI_MMIO_BASE + offset, data);
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        lock(&self.0).mem_write(PCI_MMIO_BASE + offset, data);
    }
}

#[derive(Default)]
struct IntxState {
    /// The IRQ the pin is asserted on, if asserted.
    asserted_on: Option<u8>,
    lines: BTreeMap<u8, IrqLine>,
}

/// A PCI function's INTx# pin, routed through PIRQA-D to whatever ISA IRQ the guest
/// programmed in the PIIX3. Level-triggered and shareable; cheap to clone. A change of
/// routing takes effect at the next [`PciIntx::set`].
#[derive(Clone)]
pub struct PciIntx {
    isa_bridge: Arc<Mutex<PlainFunction>>,
    ic: InterruptController,
    pirq: usize,
    state: Arc<Mutex<IntxState>>,
}

impl PciIntx {
    /// Asserts (`true`) or deasserts the pin.
    pub fn set(&self, level: bool) {
        let route = pirq_route_of(&self.isa_bridge, self.pirq);
        let mut s = lock(&self.state);
        if let Some(old) = s.asserted_on {
            if !level || Some(old) != route {
                if let Some(l) = s.lines.get(&old) {
                    l.lower();
                }
                s.asserted_on = None;
            }
        }
        if level {
            if let Some(irq) = route {
                let ic = &self.ic;
                s.lines.entry(irq).or_insert_with(|| ic.line(irq)).raise();
                s.asserted_on = Some(irq);
            } else {
                log::debug!("pci: INTx on PIRQ{} asserted but not routed", self.pirq);
            }
        }
    }

    /// The PIRQ (0-3) this pin lands on.
    pub fn pirq(&self) -> usize {
        self.pirq
    }
}

/// Saved state of the PCI host.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
pub struct PciState {
    /// CONFIG_ADDRESS.
    pub address: u32,
    /// The reset control register.
    pub reset_control: u8,
    /// Configuration spaces by device/function number.
    pub functions: Vec<(u8, Vec<u8>)>,
}

/// A function as shared between the host bridge and its owner.
pub type SharedFunction = Arc<Mutex<dyn PciFunction>>;

/// The host bridge: CONFIG_ADDRESS, the data window, bus 0 and the reset control register.
pub struct PciHost {
    address: u32,
    reset_control: u8,
    functions: BTreeMap<u8, SharedFunction>,
    host_bridge: Arc<Mutex<I440fx>>,
    isa_bridge: Arc<Mutex<PlainFunction>>,
    ctl: PlatformControl,
    /// Expansion ROM images by device/function number.
    roms: BTreeMap<u8, Arc<[u8]>>,
}

impl PciHost {
    /// Bus 0 with the i440FX at 00:00.0 and the PIIX3 ISA bridge at 00:01.0.
    pub fn new(ctl: PlatformControl) -> Self {
        let isa = Arc::new(Mutex::new(piix3_isa()));
        let host = Arc::new(Mutex::new(I440fx::new()));
        let mut h = PciHost {
            address: 0,
            reset_control: 0,
            functions: BTreeMap::new(),
            host_bridge: host.clone(),
            isa_bridge: isa.clone(),
            ctl,
            roms: BTreeMap::new(),
        };
        // Both slots are free on a new bus.
        let _ = h.add(0, 0, host);
        let _ = h.add(1, 0, isa);
        h
    }

    /// Power-on state of the bridges and CONFIG_ADDRESS (machine reset). Other
    /// functions reset themselves.
    pub fn reset(&mut self) {
        self.address = 0;
        self.reset_control = 0;
        let mut host = lock(&self.host_bridge);
        host.cfg = i440fx().cfg;
        host.push_routing();
        drop(host);
        *lock(&self.isa_bridge) = piix3_isa();
    }

    /// Lets the i440FX route memory: from now on its PAM and SMRAM registers drive the
    /// shadow RAM and SMRAM of the map that owns `jobs` (the power-on routing, reads
    /// from ROM everywhere in 0xC0000-0xFFFFF, is queued at once). Without this call the
    /// registers are kept but act on nothing (direct kernel boots: RAM everywhere).
    /// The other functions on the bus get `jobs` too ([`PciFunction::connect_memory`]).
    pub fn connect_memory(&mut self, jobs: PhysJobs) {
        let mut host = lock(&self.host_bridge);
        host.jobs = Some(jobs.clone());
        host.push_routing();
        drop(host);
        for (&devfn, f) in &self.functions {
            if devfn != 0 {
                lock(f).connect_memory(jobs.clone());
            }
        }
    }

    /// Gives the function at `dev`/`func` an expansion ROM holding `image` (padded to a
    /// power of two); the guest maps it through the ROM BAR (config 0x30).
    pub fn set_option_rom(&mut self, dev: u8, func: u8, image: &[u8]) -> Result<(), PciError> {
        if dev > 31 || func > 7 {
            return Err(PciError::OutOfRange { dev, func });
        }
        let devfn = dev << 3 | func;
        let f = self
            .functions
            .get(&devfn)
            .ok_or(PciError::Absent { dev, func })?;
        let size = (image.len() as u32).max(0x800).checked_next_power_of_two();
        let size = size.ok_or(PciError::RomTooLarge(image.len()))?;
        if size > 16 << 20 || image.len() > 16 << 20 {
            return Err(PciError::RomTooLarge(image.len()));
        }
        lock(f).config_mut().set_rom_bar(size);
        self.roms.insert(devfn, image.into());
        Ok(())
    }

    /// Snapshot: CONFIG_ADDRESS, reset control and the configuration space of every
    /// function (devices with more state than their configuration space save it
    /// themselves).
    pub fn save(&self) -> PciState {
        PciState {
            address: self.address,
            reset_control: self.reset_control,
            functions: self
                .functions
                .iter()
                .map(|(&devfn, f)| (devfn, lock(f).config().data.to_vec()))
                .collect(),
        }
    }

    /// Restores a snapshot taken by [`PciHost::save`] on an identically built bus.
    pub fn restore(&mut self, s: &PciState) {
        self.address = s.address & (CA_ENABLE | CA_BUS | CA_DEVFN | CA_REG);
        self.reset_control = s.reset_control & (RC_SRST | RC_FULL);
        for (devfn, data) in &s.functions {
            match self.functions.get(devfn) {
                Some(f) => {
                    let mut f = lock(f);
                    let cfg = f.config_mut();
                    for (d, v) in cfg.data.iter_mut().zip(data) {
                        *d = *v;
                    }
                }
                None => log::warn!("pci: snapshot has a function at {devfn:#x} this bus lacks"),
            }
        }
        // The restored PAM and SMRAM registers route memory again (if connected).
        lock(&self.host_bridge).push_routing();
    }

    /// The i440FX PAM registers 0x59-0x5f (BIOS shadowing attributes), for the machine.
    pub fn pam(&self) -> [u8; I440FX_PAM_COUNT] {
        let h = lock(&self.host_bridge);
        std::array::from_fn(|k| h.cfg.get8(I440FX_PAM0 + k as u8))
    }

    /// Plugs `f` in at bus 0, device `dev`, function `func`.
    pub fn add(&mut self, dev: u8, func: u8, f: SharedFunction) -> Result<(), PciError> {
        if dev > 31 || func > 7 {
            return Err(PciError::OutOfRange { dev, func });
        }
        let devfn = dev << 3 | func;
        if self.functions.contains_key(&devfn) {
            return Err(PciError::Occupied { dev, func });
        }
        self.functions.insert(devfn, f);
        Ok(())
    }

    /// The ISA IRQ that PIRQ `n` (0-3 = PIRQA-D) is routed to, if enabled.
    pub fn pirq_route(&self, n: usize) -> Option<u8> {
        pirq_route_of(&self.isa_bridge, n)
    }

    /// An interrupt pin for the function at `dev` using INTx# `pin` (1 = INTA#): it
    /// follows the PIIX3 routing the guest programs.
    pub fn intx(&self, ic: &InterruptController, dev: u8, pin: u8) -> PciIntx {
        PciIntx {
            isa_bridge: self.isa_bridge.clone(),
            ic: ic.clone(),
            pirq: Self::swizzle(dev, pin),
            state: Arc::new(Mutex::new(IntxState::default())),
        }
    }

    /// Runs `f` on the function whose enabled BAR of the given space holds `addr..addr+len`.
    fn bar_access(
        &self,
        io: bool,
        addr: u64,
        len: usize,
        f: impl FnOnce(&mut dyn PciFunction, usize, u64),
    ) -> bool {
        for func in self.functions.values() {
            let mut g = lock(func);
            let hit = (0..6).find_map(|n| {
                let cfg = g.config();
                let bar = cfg.bars[n]?;
                if (bar.kind == BarKind::Io) != io {
                    return None;
                }
                let base = cfg.bar_address(n)? as u64;
                let inside =
                    base != 0 && addr >= base && addr + len as u64 <= base + bar.size as u64;
                inside.then_some((n, addr - base))
            });
            if let Some((n, off)) = hit {
                f(&mut *g, n, off);
                return true;
            }
        }
        false
    }

    /// A guest I/O read the port bus did not claim (see [`PciIoWindow`]).
    pub fn io_read(&self, port: u16, data: &mut [u8]) {
        if !self.bar_access(true, port as u64, data.len(), |f, n, off| {
            f.bar_read(n, off, data)
        }) {
            data.fill(0xff);
        }
    }

    /// A guest I/O write the port bus did not claim.
    pub fn io_write(&self, port: u16, data: &[u8]) {
        self.bar_access(true, port as u64, data.len(), |f, n, off| {
            f.bar_write(n, off, data)
        });
    }

    /// A guest memory read in the PCI hole (see [`PciMmioWindow`]).
    pub fn mem_read(&self, addr: u64, data: &mut [u8]) {
        if self.rom_read(addr, data) {
            return;
        }
        if !self.bar_access(false, addr, data.len(), |f, n, off| {
            f.bar_read(n, off, data)
        }) {
            data.fill(0xff);
        }
    }

    /// A read inside an enabled expansion ROM window, if `addr` is in one (bytes past
    /// the image read as zero, as the padding of a ROM chip).
    fn rom_read(&self, addr: u64, data: &mut [u8]) -> bool {
        for (devfn, image) in &self.roms {
            let Some(f) = self.functions.get(devfn) else {
                continue;
            };
            let Some((base, size)) = lock(f).config().rom_window() else {
                continue;
            };
            let (base, size) = (base as u64, size as u64);
            if addr >= base && addr + data.len() as u64 <= base + size {
                let off = (addr - base) as usize;
                for (i, b) in data.iter_mut().enumerate() {
                    *b = image.get(off + i).copied().unwrap_or(0);
                }
                return true;
            }
        }
        false
    }

    /// A guest memory write in the PCI hole.
    pub fn mem_write(&self, addr: u64, data: &[u8]) {
        self.bar_access(false, addr, data.len(), |f, n, off| {
            f.bar_write(n, off, data)
        });
    }

    /// What PC firmware does before an OS boots: routes PIRQA-D to `irqs` in the PIIX3
    /// and writes each function's interrupt line register from its interrupt pin.
    /// Returns the ISA IRQs used (for the ELCR). For direct kernel boots, where no BIOS
    /// runs (Linux then takes IRQs from the interrupt line registers).
    pub fn route_irqs(&mut self, irqs: [u8; 4]) -> Vec<u8> {
        {
            let mut isa = lock(&self.isa_bridge);
            for (k, &irq) in irqs.iter().enumerate() {
                isa.cfg.set8(PIIX3_PIRQRC + k as u8, irq & PIRQ_IRQ);
            }
        }
        let mut used = Vec::new();
        for (&devfn, f) in &self.functions {
            let mut g = lock(f);
            let pin = g.config().get8(CFG_INTERRUPT_PIN);
            if !(1..=4).contains(&pin) {
                continue;
            }
            let route = pirq_route_of(&self.isa_bridge, Self::swizzle(devfn >> 3, pin));
            g.config_mut()
                .set8(CFG_INTERRUPT_LINE, route.unwrap_or(0xff));
            if let Some(irq) = route {
                if !used.contains(&irq) {
                    used.push(irq);
                }
            }
        }
        used
    }

    /// The PIRQ a device's INTx# pin lands on with the usual swizzle: (pin - 1 + dev) % 4.
    pub fn swizzle(dev: u8, pin: u8) -> usize {
        ((pin.max(1) - 1 + dev) % 4) as usize
    }

    fn target(&self) -> Option<&SharedFunction> {
        if self.address & CA_ENABLE == 0 || self.address & CA_BUS != 0 {
            return None;
        }
        self.functions
            .get(&(((self.address & CA_DEVFN) >> 8) as u8))
    }

    fn data_read(&self, off: u8, size: usize) -> u32 {
        let reg = (self.address & CA_REG) as u8 + off;
        match self.target() {
            Some(f) => lock(f).config_read(reg, size),
            None => u32::MAX,
        }
    }

    fn data_write(&self, off: u8, size: usize, v: u32) {
        let reg = (self.address & CA_REG) as u8 + off;
        if let Some(f) = self.target() {
            lock(f).config_write(reg, size, v);
        }
    }
}

impl BusDevice for PciHost {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let n = data.len().min(4);
        let v = match (offset, n) {
            (0, 4) => self.address,
            (1, 1) => self.reset_control as u32,
            (4..=7, _) => self.data_read(offset as u8 - 4, n),
            _ => u32::MAX,
        };
        data[..n].copy_from_slice(&v.to_le_bytes()[..n]);
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let n = data.len().min(4);
        let mut b = [0u8; 4];
        b[..n].copy_from_slice(&data[..n]);
        let v = u32::from_le_bytes(b);
        match (offset, n) {
            (0, 4) => self.address = v & (CA_ENABLE | CA_BUS | CA_DEVFN | CA_REG),
            (1, 1) => {
                let v = v as u8;
                if v & RC_RCPU != 0 && self.reset_control & RC_RCPU == 0 {
                    self.ctl.request_reset(ResetSource::ResetControl);
                }
                // RCPU does not stay set across the reset it causes.
                self.reset_control = v & (RC_SRST | RC_FULL);
            }
            (4..=7, _) => self.data_write(offset as u8 - 4, n, v),
            _ => log::debug!("pci: {n}-byte write at {:#x} ignored", 0xcf8 + offset),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::{PortBus, Width};
    use morph86_mmu::IoBus;

    fn bus() -> (PortBus, PlatformControl, Arc<Mutex<PciHost>>) {
        let ctl = PlatformControl::new();
        let host = Arc::new(Mutex::new(PciHost::new(ctl.clone())));
        let mut b = PortBus::new();
        b.register("pci", 0xcf8, 8, 0xcf8, Width::Any, host.clone())
            .unwrap();
        (b, ctl, host)
    }

    fn cfg_addr(dev: u32, func: u32, reg: u32) -> u32 {
        0x8000_0000 | dev << 11 | func << 8 | reg
    }

    fn rd32(b: &mut PortBus, dev: u32, func: u32, reg: u32) -> u32 {
        b.io_write(0xcf8, 4, cfg_addr(dev, func, reg & !3));
        b.io_read(0xcfc, 4)
    }

    #[test]
    fn finds_host_and_isa_bridges() {
        let (mut b, _, _) = bus();
        assert_eq!(rd32(&mut b, 0, 0, 0), 0x1237_8086);
        assert_eq!(rd32(&mut b, 0, 0, 8) >> 8, 0x06_00_00);
        assert_eq!(rd32(&mut b, 1, 0, 0), 0x7000_8086);
        assert_eq!(rd32(&mut b, 1, 0, 8) >> 8, 0x06_01_00);
        assert_eq!(
            (rd32(&mut b, 1, 0, 0x0c) >> 16) as u8 & 0x80,
            0x80,
            "multi-function"
        );
        assert_eq!(rd32(&mut b, 2, 0, 0), 0xffff_ffff, "empty slot");
        assert_eq!(rd32(&mut b, 1, 1, 0), 0xffff_ffff);
        // Bus 1 does not exist.
        b.io_write(0xcf8, 4, 0x8001_0000);
        assert_eq!(b.io_read(0xcfc, 4), 0xffff_ffff);
        // Enable bit clear: nothing.
        b.io_write(0xcf8, 4, 0x0000_0000);
        assert_eq!(b.io_read(0xcfc, 4), 0xffff_ffff);
        // The address register reads back (reserved bits 30-24 and 1-0 are zero).
        b.io_write(0xcf8, 4, 0xffff_ffff);
        assert_eq!(b.io_read(0xcf8, 4), 0x80ff_fffc);
    }

    #[test]
    fn byte_and_word_accesses_anywhere_in_the_window() {
        let (mut b, _, _) = bus();
        b.io_write(0xcf8, 4, cfg_addr(0, 0, 0));
        assert_eq!(b.io_read(0xcfc, 1), 0x86);
        assert_eq!(b.io_read(0xcfd, 1), 0x80);
        assert_eq!(b.io_read(0xcfe, 2), 0x1237);
        assert_eq!(b.io_read(0xcff, 1), 0x12);
        assert_eq!(b.io_read(0xcfd, 2), 0x3780);
        // PIRQRC B via a byte write at 0xcfd.
        b.io_write(0xcf8, 4, cfg_addr(1, 0, 0x60));
        assert_eq!(b.io_read(0xcfc, 4), 0x8080_8080);
        b.io_write(0xcfd, 1, 0x0b);
        assert_eq!(b.io_read(0xcfc, 4), 0x8080_0b80);
    }

    #[test]
    fn read_only_fields_and_status_w1c() {
        let (mut b, _, _) = bus();
        b.io_write(0xcf8, 4, cfg_addr(1, 0, 0));
        b.io_write(0xcfc, 4, 0);
        assert_eq!(b.io_read(0xcfc, 4), 0x7000_8086, "IDs are read-only");
        let (_, _, host) = bus();
        let h = host.lock().unwrap();
        let f = h.functions.get(&8).unwrap().clone();
        drop(h);
        f.lock().unwrap().config_mut().set16(CFG_STATUS, 0x8200);
        let mut g = f.lock().unwrap();
        g.config_write(CFG_STATUS, 2, 0x8000);
        assert_eq!(
            g.config().get16(CFG_STATUS),
            0x0200,
            "error bit cleared by 1, DEVSEL kept"
        );
        g.config_write(CFG_COMMAND, 2, 0xffff);
        assert_eq!(g.config().get16(CFG_COMMAND), 0x0547);
    }

    #[test]
    fn bar_sizing_with_all_ones() {
        let mut cfg = PciConfig::new(0x1022, 0x2000, 0x02_00_00, 0x10, 0);
        cfg.set_bar(0, BarKind::Io, 32);
        cfg.set_bar(
            1,
            BarKind::Mem32 {
                prefetchable: false,
            },
            4096,
        );
        cfg.set_bar(2, BarKind::Mem32 { prefetchable: true }, 1 << 20);
        cfg.write(0x10, 4, 0xffff_ffff);
        assert_eq!(cfg.read(0x10, 4), 0xffff_ffe1);
        cfg.write(0x14, 4, 0xffff_ffff);
        assert_eq!(cfg.read(0x14, 4), 0xffff_f000);
        cfg.write(0x18, 4, 0xffff_ffff);
        assert_eq!(cfg.read(0x18, 4), 0xfff0_0008);
        assert_eq!(
            cfg.read(0x1c, 4),
            0,
            "undeclared BAR reads 0 and ignores writes"
        );
        cfg.write(0x1c, 4, 0xffff_ffff);
        assert_eq!(cfg.read(0x1c, 4), 0);
        cfg.write(0x10, 4, 0xc000);
        cfg.write(0x14, 4, 0xfebf_1000);
        assert_eq!(cfg.bar_address(0), None, "I/O decoding off");
        cfg.write(0x04, 2, (CMD_IO | CMD_MEM) as u32);
        assert_eq!(cfg.bar_address(0), Some(0xc000));
        assert_eq!(cfg.bar_address(1), Some(0xfebf_1000));
        assert_eq!(cfg.bar_size(1), Some(4096));
        assert_eq!(cfg.bar_address(3), None);
        // Bad BARs are refused, not panicked on.
        cfg.set_bar(7, BarKind::Io, 16);
        cfg.set_bar(3, BarKind::Io, 24);
        assert_eq!(cfg.bar_size(3), None);
    }

    #[test]
    fn pirq_routing() {
        let (mut b, _, host) = bus();
        assert_eq!(host.lock().unwrap().pirq_route(0), None);
        b.io_write(0xcf8, 4, cfg_addr(1, 0, 0x60));
        b.io_write(0xcfc, 4, 0x8009_0b0a);
        let h = host.lock().unwrap();
        assert_eq!(h.pirq_route(0), Some(10));
        assert_eq!(h.pirq_route(1), Some(11));
        assert_eq!(h.pirq_route(2), Some(9));
        assert_eq!(h.pirq_route(3), None);
        assert_eq!(PciHost::swizzle(3, 1), 3);
        assert_eq!(PciHost::swizzle(3, 2), 0);
    }

    #[test]
    fn reset_control_register() {
        let (mut b, ctl, _) = bus();
        b.io_write(0xcf9, 1, RC_SRST as u32);
        assert!(!ctl.take_reset());
        assert_eq!(b.io_read(0xcf9, 1), RC_SRST as u32);
        b.io_write(0xcf9, 1, (RC_SRST | RC_RCPU) as u32);
        assert!(ctl.take_reset());
        b.io_write(0xcf9, 1, 0x0e);
        assert!(
            ctl.take_reset(),
            "RCPU self-clears, so a second write resets again"
        );
    }

    #[test]
    fn add_refuses_taken_slots() {
        let mut h = PciHost::new(PlatformControl::new());
        let f: SharedFunction = Arc::new(Mutex::new(PlainFunction {
            cfg: PciConfig::new(1, 2, 0, 0, 0),
        }));
        assert_eq!(
            h.add(1, 0, f.clone()),
            Err(PciError::Occupied { dev: 1, func: 0 })
        );
        assert!(h.add(32, 0, f.clone()).is_err());
        assert!(h.add(3, 0, f).is_ok());
    }

    #[test]
    fn save_restore_round_trip() {
        let (mut b, _, host) = bus();
        b.io_write(0xcf8, 4, cfg_addr(1, 0, 0x60));
        b.io_write(0xcfc, 4, 0x8009_0b0a);
        let json = serde_json::to_string(&host.lock().unwrap().save()).unwrap();
        let (mut c, _, host2) = bus();
        host2
            .lock()
            .unwrap()
            .restore(&serde_json::from_str(&json).unwrap());
        assert_eq!(c.io_read(0xcf8, 4), cfg_addr(1, 0, 0x60));
        assert_eq!(c.io_read(0xcfc, 4), 0x8009_0b0a);
        assert_eq!(host2.lock().unwrap().pirq_route(0), Some(10));
    }

    /// A test device with one I/O BAR (16 bytes) and one memory BAR (4 KiB) of scratch
    /// registers, and an INTx pin driven by writes to I/O offset 15.
    struct Scratch {
        cfg: PciConfig,
        io: [u8; 16],
        mem: Vec<u8>,
        intx: Option<PciIntx>,
    }
    impl PciFunction for Scratch {
        fn config(&self) -> &PciConfig {
            &self.cfg
        }
        fn config_mut(&mut self) -> &mut PciConfig {
            &mut self.cfg
        }
        fn bar_read(&mut self, bar: usize, off: u64, data: &mut [u8]) {
            let src: &[u8] = if bar == 0 { &self.io } else { &self.mem };
            for (k, b) in data.iter_mut().enumerate() {
                *b = src[off as usize + k];
            }
        }
        fn bar_write(&mut self, bar: usize, off: u64, data: &[u8]) {
            let dst: &mut [u8] = if bar == 0 {
                &mut self.io
            } else {
                &mut self.mem
            };
            dst[off as usize..off as usize + data.len()].copy_from_slice(data);
            if bar == 0 && off == 15 {
                if let Some(i) = &self.intx {
                    i.set(data[0] & 1 != 0);
                }
            }
        }
    }

    #[test]
    fn bars_decode_io_and_memory_and_intx_follows_pirq_routing() {
        let ctl = PlatformControl::new();
        let host = Arc::new(Mutex::new(PciHost::new(ctl)));
        let ic = InterruptController::new();
        ic.init_pc_pics();
        // IRQ11 level, as PCI interrupts are
        ic.ports().lock().unwrap().write(0x4d1, &[0b0000_1000]);
        let mut cfg = PciConfig::new(0x1234, 0x5678, 0xff_00_00, 0, 0);
        cfg.set_bar(0, BarKind::Io, 16);
        cfg.set_bar(
            1,
            BarKind::Mem32 {
                prefetchable: false,
            },
            4096,
        );
        cfg.set8(CFG_INTERRUPT_PIN, 1);
        let intx = host.lock().unwrap().intx(&ic, 3, 1);
        assert_eq!(intx.pirq(), 3);
        let dev = Arc::new(Mutex::new(Scratch {
            cfg,
            io: [0; 16],
            mem: vec![0; 4096],
            intx: Some(intx),
        }));
        host.lock().unwrap().add(3, 0, dev).unwrap();
        let mut b = PortBus::new();
        b.register("pci", 0xcf8, 8, 0xcf8, Width::Any, host.clone())
            .unwrap();
        b.set_fallback(Arc::new(Mutex::new(PciIoWindow(host.clone()))));
        let mut mmio = PciMmioWindow(host.clone());
        // Firmware assigns the BARs, then enables decoding.
        b.io_write(0xcf8, 4, cfg_addr(3, 0, 0x10));
        b.io_write(0xcfc, 4, 0xc000);
        b.io_write(0xcf8, 4, cfg_addr(3, 0, 0x14));
        b.io_write(0xcfc, 4, 0xfeb0_0000);
        assert_eq!(b.io_read(0xc004, 4), 0xffff_ffff, "decoding still off");
        b.io_write(0xcf8, 4, cfg_addr(3, 0, 0x04));
        b.io_write(0xcfc, 2, (CMD_IO | CMD_MEM) as u32);
        b.io_write(0xc004, 4, 0xdead_beef);
        assert_eq!(b.io_read(0xc004, 4), 0xdead_beef);
        assert_eq!(b.io_read(0xc010, 1), 0xff, "past the BAR");
        mmio.write(0xfeb0_0010 - PCI_MMIO_BASE, &[1, 2, 3, 4]);
        let mut d = [0u8; 4];
        mmio.read(0xfeb0_0010 - PCI_MMIO_BASE, &mut d);
        assert_eq!(d, [1, 2, 3, 4]);
        mmio.read(0xfeb0_1000 - PCI_MMIO_BASE, &mut d);
        assert_eq!(d, [0xff; 4]);
        // INTA# of device 3 lands on PIRQD; unrouted, nothing happens.
        b.io_write(0xc00f, 1, 1);
        assert!(!ic.pending());
        b.io_write(0xc00f, 1, 0);
        b.io_write(0xcf8, 4, cfg_addr(1, 0, 0x60));
        b.io_write(0xcff, 1, 11); // PIRQRD -> IRQ11
        b.io_write(0xc00f, 1, 1);
        assert!(ic.pending());
        assert_eq!(ic.acknowledge(), 0x73);
        b.io_write(0xc00f, 1, 0);
        let p = ic.ports();
        p.lock().unwrap().write(0xa0, &[0x20]);
        p.lock().unwrap().write(0x20, &[0x20]);
        assert!(!ic.pending(), "level deasserted");
    }

    #[test]
    fn firmware_style_irq_routing() {
        let mut h = PciHost::new(PlatformControl::new());
        let mut cfg = PciConfig::new(1, 2, 0x02_00_00, 0, 0);
        cfg.set8(CFG_INTERRUPT_PIN, 1);
        let f: SharedFunction = Arc::new(Mutex::new(PlainFunction { cfg }));
        h.add(3, 0, f.clone()).unwrap();
        let used = h.route_irqs([10, 10, 11, 11]);
        assert_eq!(used, vec![11], "slot 3 INTA# -> PIRQD -> IRQ11");
        assert_eq!(f.lock().unwrap().config().get8(CFG_INTERRUPT_LINE), 11);
        assert_eq!(h.pirq_route(0), Some(10));
    }

    #[test]
    fn random_accesses_never_panic() {
        let (mut b, ctl, _) = bus();
        let mut x = 0xabcd_ef01u32;
        for _ in 0..100_000 {
            x ^= x << 13;
            x ^= x >> 17;
            x ^= x << 5;
            let port = 0xcf8 + (x % 8) as u16;
            let size = [1, 2, 4][((x >> 3) % 3) as usize];
            if x & 0x1000 != 0 {
                let v = if x & 0x2000 != 0 {
                    0x8000_0000 | (x >> 14) & 0xfffc
                } else {
                    x.rotate_left(7)
                };
                b.io_write(port, size, v);
            } else {
                b.io_read(port, size);
            }
            ctl.take_reset();
        }
    }

    fn wr8(b: &mut PortBus, dev: u32, reg: u32, v: u8) {
        b.io_write(0xcf8, 4, cfg_addr(dev, 0, reg & !3));
        b.io_write(0xcfc + (reg as u16 & 3), 1, v as u32);
    }

    fn rd8(b: &mut PortBus, dev: u32, reg: u32) -> u8 {
        b.io_write(0xcf8, 4, cfg_addr(dev, 0, reg & !3));
        b.io_read(0xcfc + (reg as u16 & 3), 1) as u8
    }

    /// i440FX datasheet 3.2.18: PAM1 low nibble = 0xC0000-0xC3FFF, high = 0xC4000-0xC7FFF,
    /// ..., PAM6 high = 0xEC000-0xEFFFF, PAM0 high nibble = 0xF0000-0xFFFFF.
    #[test]
    fn pam_registers_select_granules() {
        let mut pam = [0u8; I440FX_PAM_COUNT];
        pam[0] = 0x30;
        pam[1] = 0x21; // C0000 read-only, C4000 write-only
        pam[6] = 0x30; // EC000 read/write
        let rw = SHADOW_READ_RAM | SHADOW_WRITE_RAM;
        let mut want = [0u8; SHADOW_GRANULES];
        want[0] = SHADOW_READ_RAM;
        want[1] = SHADOW_WRITE_RAM;
        want[11] = rw;
        want[12..].fill(rw);
        assert_eq!(pam_to_shadow(pam), want);
        // The low nibble of PAM0 is reserved: it selects nothing.
        assert_eq!(
            pam_to_shadow([0x03, 0, 0, 0, 0, 0, 0]),
            [0; SHADOW_GRANULES]
        );
    }

    #[test]
    fn pam_writes_reach_the_memory_map_through_jobs() {
        let (mut b, _ctl, host) = bus();
        let mut m = PhysMem::new(2 << 20).unwrap();
        m.add_rom(0xe_0000, vec![0x5a; 0x2_0000]);
        m.write(0xf_0000, &[1]);
        lock(&host).connect_memory(m.jobs());
        m.run_jobs();
        assert_eq!(m.shadow(), Some([0; SHADOW_GRANULES]), "power-on PAM");
        // SeaBIOS's make_bios_writable: PAM0 = 0x30, then copy and run from RAM.
        wr8(&mut b, 0, I440FX_PAM0 as u32, 0x30);
        assert_eq!(rd8(&mut b, 0, I440FX_PAM0 as u32), 0x30);
        m.run_jobs();
        m.write(0xf_0000, &[0xc3]);
        let mut x = [0u8];
        m.read(0xf_0000, &mut x);
        assert_eq!(x[0], 0xc3);
        // make_bios_readonly: 0x10, writes vanish.
        wr8(&mut b, 0, I440FX_PAM0 as u32, 0x10);
        m.run_jobs();
        m.write(0xf_0000, &[0]);
        m.read(0xf_0000, &mut x);
        assert_eq!(x[0], 0xc3);
        // A machine reset goes back to ROM.
        let snap = lock(&host).save();
        lock(&host).reset();
        m.run_jobs();
        m.read(0xf_0000, &mut x);
        assert_eq!(x[0], 0x5a);
        assert_eq!(rd8(&mut b, 0, I440FX_PAM0 as u32), 0);
        // Restoring a snapshot routes memory as the snapshot's registers say.
        lock(&host).restore(&snap);
        m.run_jobs();
        m.read(0xf_0000, &mut x);
        assert_eq!(x[0], 0xc3);
    }

    /// i440FX 3.2.23: C_BASE_SEG reads 010; D_LCK forces D_OPEN clear and makes
    /// G_SMRAME/D_LCK read-only until reset; D_OPEN with G_SMRAME shows the RAM.
    #[test]
    fn smram_register_and_lock() {
        let (mut b, _ctl, host) = bus();
        let mut m = PhysMem::new(2 << 20).unwrap();
        lock(&host).connect_memory(m.jobs());
        let r = I440FX_SMRAM as u32;
        assert_eq!(rd8(&mut b, 0, r), SMRAM_C_BASE_SEG);
        wr8(&mut b, 0, r, 0xff);
        // 0xff has D_LCK: D_OPEN reads back clear.
        assert_eq!(
            rd8(&mut b, 0, r),
            SMRAM_D_CLS | SMRAM_D_LCK | SMRAM_G_SMRAME | SMRAM_C_BASE_SEG
        );
        wr8(&mut b, 0, r, SMRAM_D_OPEN);
        assert_eq!(
            rd8(&mut b, 0, r),
            SMRAM_D_LCK | SMRAM_G_SMRAME | SMRAM_C_BASE_SEG,
            "locked"
        );
        m.run_jobs();
        assert!(!m.smram_open());
        lock(&host).reset();
        wr8(&mut b, 0, r, SMRAM_D_OPEN | SMRAM_G_SMRAME);
        m.run_jobs();
        assert!(m.smram_open());
    }

    /// PCI 3.0 6.2.5.2: writing all ones to the ROM BAR reads back the size mask (bits
    /// 31-11) with bit 0 clear; with bit 0 and memory space on, the image appears there.
    #[test]
    fn expansion_rom_bar() {
        let (mut b, _ctl, host) = bus();
        let mut cfg = PciConfig::new(0x1234, 0x1111, 0x03_00_00, 0, 0);
        cfg.set16(CFG_COMMAND, CMD_MEM);
        let f = Arc::new(Mutex::new(PlainFunction { cfg }));
        lock(&host).add(2, 0, f).unwrap();
        let image: Vec<u8> = (0..39936u32).map(|i| (i * 7) as u8).collect();
        lock(&host).set_option_rom(2, 0, &image).unwrap();
        assert!(lock(&host).set_option_rom(9, 0, &image).is_err());
        let reg = CFG_ROM_ADDRESS as u32;
        b.io_write(0xcf8, 4, cfg_addr(2, 0, reg));
        b.io_write(0xcfc, 4, !ROM_ENABLE);
        assert_eq!(rd32(&mut b, 2, 0, reg), 0xffff_0000, "64 KiB");
        b.io_write(0xcf8, 4, cfg_addr(2, 0, reg));
        b.io_write(0xcfc, 4, 0xfeb0_0000);
        let mut x = [0u8; 4];
        lock(&host).mem_read(0xfeb0_0000, &mut x);
        assert_eq!(x, [0xff; 4], "not enabled yet");
        b.io_write(0xcf8, 4, cfg_addr(2, 0, reg));
        b.io_write(0xcfc, 4, 0xfeb0_0000 | ROM_ENABLE);
        lock(&host).mem_read(0xfeb0_0004, &mut x);
        assert_eq!(x, [28, 35, 42, 49]);
        lock(&host).mem_read(0xfeb0_0000 + 39936, &mut x);
        assert_eq!(x, [0; 4], "padding past the image");
    }

    /// With the memory map connected, the VGA's framebuffer (watched memory) follows
    /// BAR0 where the firmware puts it; sizing the BAR (all ones) does not move it.
    #[test]
    fn vga_framebuffer_follows_bar0() {
        use crate::vga::{LfbSink, Vga, VgaPci, DEFAULT_LFB_ADDR};
        let (mut b, _ctl, host) = bus();
        let vga = Arc::new(Mutex::new(Vga::try_new().unwrap()));
        let fb = lock(&vga).framebuffer_memory();
        lock(&host)
            .add(2, 0, Arc::new(Mutex::new(VgaPci::new(vga.clone()))))
            .unwrap();
        let mut m = PhysMem::new(4 << 20).unwrap();
        m.add_watched(DEFAULT_LFB_ADDR as u64, fb, Box::new(LfbSink(vga.clone())));
        m.write(DEFAULT_LFB_ADDR as u64 + 8, &[0x42]);
        lock(&host).connect_memory(m.jobs());
        m.run_jobs();
        let bar0 = CFG_BAR0 as u32;
        b.io_write(0xcf8, 4, cfg_addr(2, 0, bar0));
        b.io_write(0xcfc, 4, 0xffff_ffff);
        assert_eq!(
            rd32(&mut b, 2, 0, bar0),
            0xff00_0008,
            "16 MiB, prefetchable"
        );
        m.run_jobs();
        let mut x = [0u8];
        m.read(DEFAULT_LFB_ADDR as u64 + 8, &mut x);
        assert_eq!(x[0], 0x42, "sizing does not move the framebuffer");
        b.io_write(0xcf8, 4, cfg_addr(2, 0, bar0));
        b.io_write(0xcfc, 4, 0xfd00_0000);
        m.run_jobs();
        m.read(0xfd00_0008, &mut x);
        assert_eq!(x[0], 0x42);
        m.read(DEFAULT_LFB_ADDR as u64 + 8, &mut x);
        assert_eq!(x[0], 0xff, "nothing left at the old place");
    }
}
