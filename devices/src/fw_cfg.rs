//! QEMU's firmware configuration device (fw_cfg) at I/O ports 0x510-0x51b, as QEMU's x86
//! machines present it to SeaBIOS and Linux.
//!
//! Reference: QEMU's `docs/specs/fw_cfg.rst` (behaviour only):
//! - a 16-bit write to the selector port 0x510 selects an item by key and rewinds it; each
//!   byte read from the data port 0x511 returns the next byte of the item, zero past its
//!   end or for a key that names nothing (byte writes there are obsolete and ignored);
//! - key 0x0000 holds the signature "QEMU", key 0x0001 a feature bitmap (bit 0 the port
//!   interface, bit 1 DMA), key 0x0019 the file directory: a big-endian u32 count, then
//!   per file a big-endian u32 size, u16 key, u16 reserved and a 56-byte NUL-padded name;
//!   files get keys from 0x0020 up. Key bit 14 (write channel) is ignored for reads; bit
//!   15 selects the architecture-specific items (0x8002 "irq0_override" on x86);
//! - DMA: the guest writes the physical address of a 16-byte descriptor (big-endian:
//!   u32 control, u32 length, u64 address) to the big-endian address register at 0x514
//!   (the high half at 0x514, the low half at 0x518, whose write starts the transfer).
//!   Control bits: SELECT (with the key in bits 31-16), READ, SKIP, WRITE; when done the
//!   device writes the control word back as 0, or with ERROR set. Reading 0x514-0x51b
//!   gives the DMA signature "QEMU CFG".
//!
//! The device reaches guest memory only through a [`PhysJobs`] queue (the DMA runs on the
//! vCPU thread right after the OUT that started it). Bad keys, descriptors outside memory
//! and writes to items (none here is writable) are logged and refused with ERROR.

use std::collections::BTreeMap;
use std::sync::{Arc, Mutex};

use morph86_mmu::phys::PhysJobs;
use morph86_mmu::{BusDevice, PhysMem};

use crate::bus::lock;

/// Selector port (16-bit writes).
pub const PORT_SELECTOR: u16 = 0x510;
/// Data port (8-bit reads).
pub const PORT_DATA: u16 = 0x511;
/// DMA address register: 8 bytes, big-endian (high half here, low half at +4).
pub const PORT_DMA: u16 = 0x514;

/// Key: signature "QEMU".
pub const KEY_SIGNATURE: u16 = 0x0000;
/// Key: feature bitmap (u32 LE).
pub const KEY_ID: u16 = 0x0001;
/// Key: machine UUID (16 bytes).
pub const KEY_UUID: u16 = 0x0002;
/// Key: RAM size (u64 LE).
pub const KEY_RAM_SIZE: u16 = 0x0003;
/// Key: no graphics (u16 LE): SeaBIOS then puts its console on COM1 ("sercon").
pub const KEY_NOGRAPHIC: u16 = 0x0004;
/// Key: number of boot CPUs (u16 LE).
pub const KEY_NB_CPUS: u16 = 0x0005;
/// Key: kernel load address (u32 LE).
pub const KEY_KERNEL_ADDR: u16 = 0x0007;
/// Key: kernel size without the setup part (u32 LE).
pub const KEY_KERNEL_SIZE: u16 = 0x0008;
/// Key: initrd load address (u32 LE).
pub const KEY_INITRD_ADDR: u16 = 0x000a;
/// Key: initrd size (u32 LE).
pub const KEY_INITRD_SIZE: u16 = 0x000b;
/// Key: NUMA data (u64 node count, then per-CPU and per-node u64s).
pub const KEY_NUMA: u16 = 0x000d;
/// Key: show the boot menu (u16 LE).
pub const KEY_BOOT_MENU: u16 = 0x000e;
/// Key: maximum CPUs (u16 LE).
pub const KEY_MAX_CPUS: u16 = 0x000f;
/// Key: kernel image after the setup part.
pub const KEY_KERNEL_DATA: u16 = 0x0011;
/// Key: initrd image.
pub const KEY_INITRD_DATA: u16 = 0x0012;
/// Key: command line load address (u32 LE).
pub const KEY_CMDLINE_ADDR: u16 = 0x0013;
/// Key: command line size including the NUL (u32 LE).
pub const KEY_CMDLINE_SIZE: u16 = 0x0014;
/// Key: command line bytes.
pub const KEY_CMDLINE_DATA: u16 = 0x0015;
/// Key: setup (real-mode part) load address (u32 LE).
pub const KEY_SETUP_ADDR: u16 = 0x0016;
/// Key: setup size (u32 LE).
pub const KEY_SETUP_SIZE: u16 = 0x0017;
/// Key: setup bytes.
pub const KEY_SETUP_DATA: u16 = 0x0018;
/// Key: the file directory.
pub const KEY_FILE_DIR: u16 = 0x0019;
/// First key given to a file.
pub const KEY_FILE_FIRST: u16 = 0x0020;
/// Key bit 14: write channel (ignored for reads).
pub const KEY_WRITE_CHANNEL: u16 = 0x4000;
/// Key bit 15: architecture-specific item.
pub const KEY_ARCH_LOCAL: u16 = 0x8000;
/// Key (x86): IRQ0 is routed to I/O APIC pin 2 (u32 LE).
pub const KEY_IRQ0_OVERRIDE: u16 = KEY_ARCH_LOCAL | 0x0002;

/// ID bit 0: the port interface.
pub const ID_TRADITIONAL: u32 = 0b01;
/// ID bit 1: the DMA interface.
pub const ID_DMA: u32 = 0b10;

/// DMA control bit 0: error.
pub const DMA_ERROR: u32 = 0b0_0001;
/// DMA control bit 1: read the item into guest memory.
pub const DMA_READ: u32 = 0b0_0010;
/// DMA control bit 2: skip bytes of the item.
pub const DMA_SKIP: u32 = 0b0_0100;
/// DMA control bit 3: select the item in bits 31-16 first.
pub const DMA_SELECT: u32 = 0b0_1000;
/// DMA control bit 4: write guest memory into the item.
pub const DMA_WRITE: u32 = 0b1_0000;
/// What reading the DMA register returns: "QEMU CFG".
pub const DMA_SIGNATURE: [u8; 8] = *b"QEMU CFG";

/// Longest file name (the directory entry holds 56 bytes with the NUL).
pub const FILE_NAME_MAX: usize = 55;
/// Most files (keys 0x0020-0x3fff).
pub const MAX_FILES: usize = (KEY_WRITE_CHANNEL - KEY_FILE_FIRST) as usize;
/// Largest item accepted.
pub const MAX_ITEM: usize = 1 << 30;
/// An E820 RAM entry type.
pub const E820_RAM: u32 = 1;
/// An E820 reserved entry type.
pub const E820_RESERVED: u32 = 2;

/// Why an item or file was refused.
#[derive(Debug, thiserror::Error, PartialEq, Eq)]
pub enum FwCfgError {
    /// The file name is empty, too long or has a NUL.
    #[error("fw_cfg file name '{0}' is not 1 to 55 bytes without NUL")]
    BadName(String),
    /// Two files with one name.
    #[error("fw_cfg file '{0}' is already present")]
    Duplicate(String),
    /// The directory is full.
    #[error("fw_cfg file directory is full")]
    Full,
    /// An item larger than [`MAX_ITEM`].
    #[error("fw_cfg item of {0} bytes is too large")]
    TooLarge(usize),
    /// The kernel is not a Linux bzImage ("HdrS" header, boot protocol 2.02 or later).
    #[error("the kernel is not a Linux bzImage with boot protocol 2.02 or later")]
    NotBzImage,
    /// Kernel and initrd do not fit in guest RAM.
    #[error("the initrd ({0} bytes) does not fit in guest RAM above the kernel")]
    InitrdTooLarge(usize),
}

/// Where the Linux setup (real-mode) part goes, as QEMU's x86 loader places it.
pub const LINUX_SETUP_ADDR: u32 = 0x1_0000;
/// Where the command line goes.
pub const LINUX_CMDLINE_ADDR: u32 = 0x2_0000;
/// Where the protected-mode kernel goes.
pub const LINUX_KERNEL_ADDR: u32 = 0x10_0000;
/// RAM kept free at its top below the initrd (QEMU keeps room for ACPI tables there).
pub const LINUX_INITRD_GAP: u64 = 0x2_8000;
// Boot protocol header fields (Documentation/arch/x86/boot.rst).
const HDR_SETUP_SECTS: usize = 0x1f1;
const HDR_VID_MODE: usize = 0x1fa;
const HDR_MAGIC: usize = 0x202;
const HDR_VERSION: usize = 0x206;
const HDR_TYPE_OF_LOADER: usize = 0x210;
const HDR_LOADFLAGS: usize = 0x211;
const HDR_RAMDISK_IMAGE: usize = 0x218;
const HDR_RAMDISK_SIZE: usize = 0x21c;
const HDR_HEAP_END_PTR: usize = 0x224;
const HDR_CMD_LINE_PTR: usize = 0x228;
const HDR_INITRD_ADDR_MAX: usize = 0x22c;
/// loadflags bit 7: CAN_USE_HEAP (heap_end_ptr is valid).
const LOADFLAGS_CAN_USE_HEAP: u8 = 0b1000_0000;
/// type_of_loader: "undefined" boot loader 0xB (as QEMU), version 0.
const LOADER_QEMU: u8 = 0xb0;

/// The fw_cfg items and the guest's position in the selected one.
pub struct FwCfg {
    items: BTreeMap<u16, Arc<[u8]>>,
    files: Vec<(String, u16)>,
    selected: u16,
    offset: usize,
    /// High half of the DMA address, latched until the low half is written.
    dma_high: u32,
    dma: bool,
}

impl Default for FwCfg {
    fn default() -> Self {
        Self::new(false)
    }
}

/// Masks the write-channel bit off a key (it does not change what is read).
fn item_key(key: u16) -> u16 {
    key & !KEY_WRITE_CHANNEL
}

impl FwCfg {
    /// The signature, the ID (with the DMA bit when `dma`) and an empty file directory.
    pub fn new(dma: bool) -> Self {
        let mut f = FwCfg {
            items: BTreeMap::new(),
            files: Vec::new(),
            selected: KEY_SIGNATURE,
            offset: 0,
            dma_high: 0,
            dma,
        };
        f.items.insert(KEY_SIGNATURE, Arc::from(&b"QEMU"[..]));
        let id = ID_TRADITIONAL | if dma { ID_DMA } else { 0 };
        f.items.insert(KEY_ID, Arc::from(&id.to_le_bytes()[..]));
        f.rebuild_dir();
        f
    }

    /// What QEMU's i440FX PC gives SeaBIOS: RAM size, CPU counts, no boot menu, the
    /// "nographic" flag (SeaBIOS's serial console), "irq0_override", and the files
    /// "etc/boot-fail-wait" (-1: never retry, print "No bootable device.") and
    /// "etc/e820" (one RAM entry for the memory below 4 GiB). No ACPI tables: SeaBIOS
    /// then builds its own MP table, PIR and SMBIOS (and ACPI only if it finds a PIIX4 PM).
    pub fn pc(ram_size: u64, nographic: bool, dma: bool) -> Self {
        let mut f = FwCfg::new(dma);
        f.add_item(KEY_UUID, vec![0; 16]);
        f.add_item(KEY_RAM_SIZE, ram_size.to_le_bytes().to_vec());
        f.add_item(KEY_NOGRAPHIC, u16::from(nographic).to_le_bytes().to_vec());
        f.add_item(KEY_NB_CPUS, 1u16.to_le_bytes().to_vec());
        f.add_item(KEY_MAX_CPUS, 1u16.to_le_bytes().to_vec());
        f.add_item(KEY_BOOT_MENU, 0u16.to_le_bytes().to_vec());
        // No NUMA nodes: a zero node count and one zero per-CPU entry.
        f.add_item(KEY_NUMA, vec![0; 16]);
        f.add_item(KEY_IRQ0_OVERRIDE, 1u32.to_le_bytes().to_vec());
        // Both fit (short unique names, an empty directory).
        let _ = f.add_file("etc/boot-fail-wait", u32::MAX.to_le_bytes().to_vec());
        let _ = f.add_file("etc/e820", e820_entry(0, ram_size, E820_RAM).to_vec());
        f
    }

    /// Sets the item at `key` (a fixed key below [`KEY_FILE_FIRST`], or an
    /// architecture-local one); items that are too large are logged and dropped.
    pub fn add_item(&mut self, key: u16, data: Vec<u8>) {
        if data.len() > MAX_ITEM {
            log::error!("fw_cfg: item {key:#06x} of {} bytes refused", data.len());
            return;
        }
        self.items.insert(item_key(key), data.into());
    }

    /// Adds a named file; returns its key.
    pub fn add_file(&mut self, name: &str, data: Vec<u8>) -> Result<u16, FwCfgError> {
        if name.is_empty() || name.len() > FILE_NAME_MAX || name.contains('\0') {
            return Err(FwCfgError::BadName(name.into()));
        }
        if self.files.iter().any(|(n, _)| n == name) {
            return Err(FwCfgError::Duplicate(name.into()));
        }
        if self.files.len() >= MAX_FILES {
            return Err(FwCfgError::Full);
        }
        if data.len() > MAX_ITEM {
            return Err(FwCfgError::TooLarge(data.len()));
        }
        let key = KEY_FILE_FIRST + self.files.len() as u16;
        self.items.insert(key, data.into());
        self.files.push((name.into(), key));
        self.rebuild_dir();
        Ok(key)
    }

    /// Hands a Linux bzImage to the firmware as QEMU does for `-kernel` with a BIOS: the
    /// setup part (its header filled in: loader type, command line pointer, heap end,
    /// initrd place and size, `vga=` mode), the protected-mode kernel, the initrd at the
    /// top of RAM and the command line, each with its load address, for an option ROM
    /// (QEMU's linuxboot_dma.bin) to copy into place and start.
    pub fn add_linux(
        &mut self,
        kernel: &[u8],
        initrd: Option<&[u8]>,
        cmdline: &str,
        ram_size: u64,
    ) -> Result<(), FwCfgError> {
        let rd16 = |o: usize| u16::from_le_bytes([kernel[o], kernel[o + 1]]);
        let rd32 =
            |o: usize| u32::from_le_bytes([kernel[o], kernel[o + 1], kernel[o + 2], kernel[o + 3]]);
        if kernel.len() < 0x1000
            || &kernel[HDR_MAGIC..HDR_MAGIC + 4] != b"HdrS"
            || rd16(HDR_VERSION) < 0x202
        {
            return Err(FwCfgError::NotBzImage);
        }
        let sects = match kernel[HDR_SETUP_SECTS] {
            0 => 4,
            n => n as usize,
        };
        let setup_size = (sects + 1) * 512;
        if setup_size >= kernel.len() {
            return Err(FwCfgError::NotBzImage);
        }
        let mut setup = kernel[..setup_size].to_vec();
        let body = &kernel[setup_size..];
        setup[HDR_TYPE_OF_LOADER] = LOADER_QEMU;
        setup[HDR_LOADFLAGS] |= LOADFLAGS_CAN_USE_HEAP;
        let heap_end = (LINUX_CMDLINE_ADDR - LINUX_SETUP_ADDR - 0x200) as u16;
        setup[HDR_HEAP_END_PTR..HDR_HEAP_END_PTR + 2].copy_from_slice(&heap_end.to_le_bytes());
        setup[HDR_CMD_LINE_PTR..HDR_CMD_LINE_PTR + 4]
            .copy_from_slice(&LINUX_CMDLINE_ADDR.to_le_bytes());
        if let Some(mode) = linux_vga_mode(cmdline) {
            setup[HDR_VID_MODE..HDR_VID_MODE + 2].copy_from_slice(&mode.to_le_bytes());
        }
        if let Some(rd) = initrd {
            let mut max = if rd16(HDR_VERSION) >= 0x203 {
                rd32(HDR_INITRD_ADDR_MAX) as u64
            } else {
                0x37ff_ffff
            };
            max = max.min(ram_size.saturating_sub(LINUX_INITRD_GAP + 1));
            let low = LINUX_KERNEL_ADDR as u64 + body.len() as u64;
            let at = (max + 1).checked_sub(rd.len() as u64).map(|a| a & !0xfff);
            let at = at
                .filter(|&a| a >= low)
                .ok_or(FwCfgError::InitrdTooLarge(rd.len()))?;
            setup[HDR_RAMDISK_IMAGE..HDR_RAMDISK_IMAGE + 4]
                .copy_from_slice(&(at as u32).to_le_bytes());
            setup[HDR_RAMDISK_SIZE..HDR_RAMDISK_SIZE + 4]
                .copy_from_slice(&(rd.len() as u32).to_le_bytes());
            self.add_item(KEY_INITRD_ADDR, (at as u32).to_le_bytes().to_vec());
            self.add_item(KEY_INITRD_SIZE, (rd.len() as u32).to_le_bytes().to_vec());
            self.add_item(KEY_INITRD_DATA, rd.to_vec());
        }
        let mut cl = cmdline.as_bytes().to_vec();
        cl.push(0);
        self.add_item(KEY_CMDLINE_ADDR, LINUX_CMDLINE_ADDR.to_le_bytes().to_vec());
        self.add_item(KEY_CMDLINE_SIZE, (cl.len() as u32).to_le_bytes().to_vec());
        self.add_item(KEY_CMDLINE_DATA, cl);
        self.add_item(KEY_SETUP_ADDR, LINUX_SETUP_ADDR.to_le_bytes().to_vec());
        self.add_item(KEY_SETUP_SIZE, (setup.len() as u32).to_le_bytes().to_vec());
        self.add_item(KEY_SETUP_DATA, setup);
        self.add_item(KEY_KERNEL_ADDR, LINUX_KERNEL_ADDR.to_le_bytes().to_vec());
        self.add_item(KEY_KERNEL_SIZE, (body.len() as u32).to_le_bytes().to_vec());
        self.add_item(KEY_KERNEL_DATA, body.to_vec());
        Ok(())
    }

    /// The item at `key`, if any.
    pub fn item(&self, key: u16) -> Option<&[u8]> {
        self.items.get(&item_key(key)).map(|d| &d[..])
    }

    fn rebuild_dir(&mut self) {
        let mut d = (self.files.len() as u32).to_be_bytes().to_vec();
        for (name, key) in &self.files {
            let size = self.items.get(key).map_or(0, |x| x.len()) as u32;
            d.extend_from_slice(&size.to_be_bytes());
            d.extend_from_slice(&key.to_be_bytes());
            d.extend_from_slice(&[0, 0]);
            let mut n = [0u8; 56];
            n[..name.len()].copy_from_slice(name.as_bytes());
            d.extend_from_slice(&n);
        }
        self.items.insert(KEY_FILE_DIR, d.into());
    }

    /// Selects the item at `key` and rewinds it (a key naming nothing reads zeros).
    pub fn select(&mut self, key: u16) {
        if !self.items.contains_key(&item_key(key)) {
            log::debug!("fw_cfg: select of absent key {key:#06x}");
        }
        self.selected = item_key(key);
        self.offset = 0;
    }

    /// The next byte of the selected item (0 past its end).
    pub fn read_byte(&mut self) -> u8 {
        let b = self
            .items
            .get(&self.selected)
            .and_then(|d| d.get(self.offset).copied());
        match b {
            Some(b) => {
                self.offset += 1;
                b
            }
            None => 0,
        }
    }

    /// Carries out the DMA request whose descriptor is at guest-physical `desc`.
    pub fn dma(&mut self, mem: &mut PhysMem, desc: u64) {
        if desc > (1 << 32) - 16 {
            log::warn!("fw_cfg: DMA descriptor at {desc:#x} is outside memory; ignored");
            return;
        }
        let mut d = [0u8; 16];
        mem.read(desc, &mut d);
        let control = u32::from_be_bytes([d[0], d[1], d[2], d[3]]);
        let length = u32::from_be_bytes([d[4], d[5], d[6], d[7]]) as u64;
        let addr = u64::from_be_bytes([d[8], d[9], d[10], d[11], d[12], d[13], d[14], d[15]]);
        if control & DMA_SELECT != 0 {
            self.select((control >> 16) as u16);
        }
        let status = if control & DMA_READ != 0 {
            self.dma_read(mem, addr, length)
        } else if control & DMA_WRITE != 0 {
            log::warn!(
                "fw_cfg: DMA write to read-only item {:#06x} refused",
                self.selected
            );
            DMA_ERROR
        } else if control & DMA_SKIP != 0 {
            let len = self.items.get(&self.selected).map_or(0, |x| x.len());
            self.offset = (self.offset as u64 + length).min(len as u64) as usize;
            0
        } else {
            0
        };
        mem.write(desc, &status.to_be_bytes());
    }

    /// Copies `length` bytes of the selected item to `addr` (zeros past its end).
    fn dma_read(&mut self, mem: &mut PhysMem, addr: u64, length: u64) -> u32 {
        if addr.checked_add(length).is_none_or(|end| end > 1 << 32) {
            log::warn!("fw_cfg: DMA read of {length:#x} bytes to {addr:#x} leaves memory; refused");
            return DMA_ERROR;
        }
        let data = self.items.get(&self.selected).cloned().unwrap_or_default();
        let start = self.offset.min(data.len());
        let n = (data.len() - start).min(length as usize);
        mem.write(addr, &data[start..start + n]);
        self.offset = start + n;
        // Zeros for the rest, as far as RAM goes (writes past RAM would vanish anyway).
        let rest_start = addr + n as u64;
        let rest_end = (addr + length).min(mem.ram_size());
        if rest_end > rest_start {
            let zeros = vec![0u8; (rest_end - rest_start).min(1 << 20) as usize];
            let mut a = rest_start;
            while a < rest_end {
                let k = (rest_end - a).min(zeros.len() as u64) as usize;
                mem.write(a, &zeros[..k]);
                a += k as u64;
            }
        }
        0
    }
}

/// The boot protocol's vid_mode for a `vga=` on the command line (the last one): a
/// number (decimal or 0x hex), or normal (0xFFFF), ext (0xFFFE), ask (0xFFFD).
pub fn linux_vga_mode(cmdline: &str) -> Option<u16> {
    let v = cmdline
        .split_whitespace()
        .filter_map(|a| a.strip_prefix("vga="))
        .next_back()?;
    match v {
        "normal" => Some(0xffff),
        "ext" => Some(0xfffe),
        "ask" => Some(0xfffd),
        _ => match v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
            Some(h) => u16::from_str_radix(h, 16).ok(),
            None => v.parse().ok(),
        },
    }
}

/// One "etc/e820" entry: u64 address, u64 length, u32 type, little-endian, packed.
pub fn e820_entry(addr: u64, len: u64, kind: u32) -> [u8; 20] {
    let mut e = [0u8; 20];
    e[..8].copy_from_slice(&addr.to_le_bytes());
    e[8..16].copy_from_slice(&len.to_le_bytes());
    e[16..].copy_from_slice(&kind.to_le_bytes());
    e
}

/// The device on the port bus: register it at [`PORT_SELECTOR`] for 12 ports
/// (offsets relative to 0x510) with whole-width accesses.
pub struct FwCfgPorts {
    dev: Arc<Mutex<FwCfg>>,
    jobs: Option<PhysJobs>,
}

impl FwCfgPorts {
    /// Ports for `dev`; DMA requests go to `jobs` (none: the DMA register is inert).
    pub fn new(dev: Arc<Mutex<FwCfg>>, jobs: Option<PhysJobs>) -> Self {
        FwCfgPorts { dev, jobs }
    }
}

/// Offset of the DMA register from the selector port.
const DMA_OFF: u64 = (PORT_DMA - PORT_SELECTOR) as u64;

impl BusDevice for FwCfgPorts {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        match offset {
            // The selector and data ports both read the next data byte (QEMU).
            0 | 1 => {
                data.fill(0);
                if let Some(b) = data.first_mut() {
                    *b = lock(&self.dev).read_byte();
                }
            }
            DMA_OFF..=11 if lock(&self.dev).dma => {
                for (i, b) in data.iter_mut().enumerate() {
                    let k = (offset - DMA_OFF) as usize + i;
                    *b = DMA_SIGNATURE.get(k).copied().unwrap_or(0);
                }
            }
            _ => data.fill(0xff),
        }
    }

    fn write(&mut self, offset: u64, data: &[u8]) {
        let mut dev = lock(&self.dev);
        match (offset, data.len()) {
            // A dword write is two word writes to QEMU: the first selects.
            (0, 2 | 4) => dev.select(u16::from_le_bytes([data[0], data[1]])),
            (0 | 1, _) => log::debug!("fw_cfg: obsolete data-port write ignored"),
            (DMA_OFF, 4) if dev.dma => {
                dev.dma_high = u32::from_be_bytes([data[0], data[1], data[2], data[3]]);
            }
            (o, 4) if o == DMA_OFF + 4 && dev.dma => {
                let low = u32::from_be_bytes([data[0], data[1], data[2], data[3]]);
                let desc = (dev.dma_high as u64) << 32 | low as u64;
                dev.dma_high = 0;
                drop(dev);
                match &self.jobs {
                    Some(jobs) => {
                        let d = self.dev.clone();
                        jobs.push(Box::new(move |m: &mut PhysMem| lock(&d).dma(m, desc)));
                    }
                    None => log::warn!("fw_cfg: DMA without memory access; ignored"),
                }
            }
            (o, n) => log::debug!("fw_cfg: {n}-byte write at port {:#x} ignored", 0x510 + o),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::bus::{PortBus, Width};
    use morph86_mmu::IoBus;

    fn machine(dma: bool) -> (PortBus, PhysMem, Arc<Mutex<FwCfg>>) {
        let mem = PhysMem::new(4 << 20).unwrap();
        let dev = Arc::new(Mutex::new(FwCfg::pc(4 << 20, true, dma)));
        let mut b = PortBus::new();
        let ports = FwCfgPorts::new(dev.clone(), Some(mem.jobs()));
        b.register(
            "fw_cfg",
            PORT_SELECTOR,
            12,
            PORT_SELECTOR,
            Width::Any,
            Arc::new(Mutex::new(ports)),
        )
        .unwrap();
        (b, mem, dev)
    }

    fn read_item(b: &mut PortBus, key: u16, n: usize) -> Vec<u8> {
        b.io_write(PORT_SELECTOR, 2, key as u32);
        (0..n).map(|_| b.io_read(PORT_DATA, 1) as u8).collect()
    }

    /// The port protocol as SeaBIOS's qemu_cfg_init uses it (fw_cfg.rst "Selector
    /// Register", "Data Register", "Firmware Configuration Items").
    #[test]
    fn signature_id_and_directory_through_the_ports() {
        let (mut b, _m, _d) = machine(false);
        assert_eq!(read_item(&mut b, KEY_SIGNATURE, 5), b"QEMU\0");
        assert_eq!(read_item(&mut b, KEY_ID, 4), [1, 0, 0, 0]);
        assert_eq!(
            read_item(&mut b, KEY_RAM_SIZE, 8),
            (4u64 << 20).to_le_bytes()
        );
        assert_eq!(read_item(&mut b, KEY_NOGRAPHIC, 2), [1, 0]);
        assert_eq!(read_item(&mut b, 0x1234, 3), [0, 0, 0], "absent key");
        // Directory: count 2 (big-endian), then "etc/boot-fail-wait" at key 0x20.
        let dir = read_item(&mut b, KEY_FILE_DIR, 4 + 2 * 64);
        assert_eq!(&dir[..4], &[0, 0, 0, 2]);
        assert_eq!(&dir[4..8], &[0, 0, 0, 4], "size");
        assert_eq!(&dir[8..10], &[0, 0x20], "key");
        assert_eq!(&dir[12..30], b"etc/boot-fail-wait");
        assert_eq!(dir[30], 0);
        assert_eq!(&dir[68..72], &[0, 0, 0, 20]);
        assert_eq!(&dir[76..84], b"etc/e820");
        let e820 = read_item(&mut b, 0x21, 20);
        assert_eq!(&e820[8..16], &(4u64 << 20).to_le_bytes());
        assert_eq!(&e820[16..], &[1, 0, 0, 0]);
        assert_eq!(read_item(&mut b, 0x20, 4), [0xff; 4]);
        // The write-channel bit does not change what is read; the arch bit does.
        assert_eq!(read_item(&mut b, KEY_WRITE_CHANNEL, 4), b"QEMU");
        assert_eq!(read_item(&mut b, KEY_IRQ0_OVERRIDE, 4), [1, 0, 0, 0]);
        // Without DMA the register reads open bus.
        assert_eq!(b.io_read(PORT_DMA, 4), 0xffff_ffff);
    }

    fn desc(m: &mut PhysMem, at: u64, control: u32, len: u32, addr: u64) {
        let mut d = control.to_be_bytes().to_vec();
        d.extend_from_slice(&len.to_be_bytes());
        d.extend_from_slice(&addr.to_be_bytes());
        m.write(at, &d);
    }

    fn start_dma(b: &mut PortBus, m: &mut PhysMem, at: u64) {
        // As SeaBIOS: outl(cpu_to_be32(addr), 0x518); the CPU then runs the jobs.
        b.io_write(PORT_DMA, 4, ((at >> 32) as u32).swap_bytes());
        b.io_write(PORT_DMA + 4, 4, (at as u32).swap_bytes());
        m.run_jobs();
    }

    fn control(m: &mut PhysMem, at: u64) -> u32 {
        let mut c = [0u8; 4];
        m.read(at, &mut c);
        u32::from_be_bytes(c)
    }

    /// fw_cfg.rst "DMA interface": select+read, read past the end (zeros), skip, write
    /// refused with ERROR, and the control word written back.
    #[test]
    fn dma_select_read_skip_and_errors() {
        let (mut b, mut m, _d) = machine(true);
        assert_eq!(read_item(&mut b, KEY_ID, 4), [3, 0, 0, 0]);
        let sig: Vec<u8> = (0..8).map(|k| b.io_read(PORT_DMA + k, 1) as u8).collect();
        assert_eq!(sig, b"QEMU CFG");
        m.write(0x2000, &[0xee; 16]);
        desc(
            &mut m,
            0x1000,
            (KEY_SIGNATURE as u32) << 16 | DMA_SELECT | DMA_READ,
            6,
            0x2000,
        );
        start_dma(&mut b, &mut m, 0x1000);
        assert_eq!(control(&mut m, 0x1000), 0);
        assert_eq!(&m.ram()[0x2000..0x2008], b"QEMU\0\0\xee\xee");
        // Skip 8 bytes of the e820 file, read the length.
        desc(&mut m, 0x1000, 0x21 << 16 | DMA_SELECT | DMA_SKIP, 8, 0);
        start_dma(&mut b, &mut m, 0x1000);
        desc(&mut m, 0x1000, DMA_READ, 8, 0x3000);
        start_dma(&mut b, &mut m, 0x1000);
        assert_eq!(&m.ram()[0x3000..0x3008], &(4u64 << 20).to_le_bytes());
        // Writes: refused.
        desc(&mut m, 0x1000, DMA_SELECT | DMA_WRITE, 4, 0x3000);
        start_dma(&mut b, &mut m, 0x1000);
        assert_eq!(control(&mut m, 0x1000), DMA_ERROR);
        // A target past 4 GiB: refused, nothing written.
        desc(&mut m, 0x1000, DMA_SELECT | DMA_READ, 4, 0xffff_fffe);
        start_dma(&mut b, &mut m, 0x1000);
        assert_eq!(control(&mut m, 0x1000), DMA_ERROR);
        // A descriptor outside memory: ignored (nothing to write the status to).
        start_dma(&mut b, &mut m, 0x1_0000_0000);
        start_dma(&mut b, &mut m, 0xffff_fff8);
        // A huge zero fill stays within RAM.
        desc(&mut m, 0x1000, DMA_SELECT | DMA_READ, u32::MAX, 0x10_0000);
        start_dma(&mut b, &mut m, 0x1000);
        assert_eq!(control(&mut m, 0x1000), DMA_ERROR, "ends past 4 GiB");
        desc(
            &mut m,
            0x1000,
            DMA_SELECT | DMA_READ,
            0x8000_0000,
            0x10_0000,
        );
        m.write(0x20_0000, &[9]);
        start_dma(&mut b, &mut m, 0x1000);
        assert_eq!(control(&mut m, 0x1000), 0);
        assert_eq!(m.ram()[0x10_0000..0x10_0004], *b"QEMU");
        assert_eq!(m.ram()[0x20_0000], 0);
    }

    #[test]
    fn files_are_checked() {
        let mut f = FwCfg::new(false);
        assert_eq!(f.add_file("a", vec![1]), Ok(KEY_FILE_FIRST));
        assert_eq!(
            f.add_file("a", vec![1]),
            Err(FwCfgError::Duplicate("a".into()))
        );
        assert!(f.add_file("", vec![]).is_err());
        assert!(f.add_file(&"x".repeat(56), vec![]).is_err());
        assert!(f.add_file(&"x".repeat(55), vec![]).is_ok());
        assert_eq!(f.item(KEY_FILE_DIR).unwrap()[..4], [0, 0, 0, 2]);
    }

    #[test]
    fn random_port_traffic_never_panics() {
        let (mut b, mut m, _d) = machine(true);
        let mut r = 0x1234_5678_9abc_def1u64;
        for _ in 0..20_000 {
            r ^= r << 13;
            r ^= r >> 7;
            r ^= r << 17;
            let port = PORT_SELECTOR + (r % 12) as u16;
            let size = [1u8, 2, 4][(r >> 8) as usize % 3];
            if r & (1 << 20) != 0 {
                b.io_write(port, size, (r >> 24) as u32);
            } else {
                b.io_read(port, size);
            }
            // Random descriptors too.
            if r.is_multiple_of(97) {
                m.write(0x1000, &(r >> 3).to_le_bytes());
                m.write(0x1008, &r.to_be_bytes());
                start_dma(&mut b, &mut m, 0x1000);
            }
            m.run_jobs();
        }
    }

    /// Documentation/arch/x86/boot.rst: setup_sects (0 means 4), the fields a boot
    /// loader fills in, the initrd below initrd_addr_max and below the top of RAM.
    #[test]
    fn linux_items_follow_the_boot_protocol() {
        let mut k = vec![0u8; 0x3000];
        k[HDR_SETUP_SECTS] = 3; // setup = 4 sectors = 2048 bytes
        k[HDR_MAGIC..HDR_MAGIC + 4].copy_from_slice(b"HdrS");
        k[HDR_VERSION..HDR_VERSION + 2].copy_from_slice(&0x20fu16.to_le_bytes());
        k[HDR_INITRD_ADDR_MAX..HDR_INITRD_ADDR_MAX + 4]
            .copy_from_slice(&0x37ff_ffffu32.to_le_bytes());
        k[2048] = 0xaa;
        let mut f = FwCfg::new(true);
        let rd = vec![7u8; 5000];
        f.add_linux(&k, Some(&rd), "console=ttyS0 vga=0x312", 64 << 20)
            .unwrap();
        let u32_at =
            |f: &FwCfg, key: u16| u32::from_le_bytes(f.item(key).unwrap()[..4].try_into().unwrap());
        assert_eq!(u32_at(&f, KEY_SETUP_SIZE), 2048);
        assert_eq!(u32_at(&f, KEY_KERNEL_SIZE), 0x3000 - 2048);
        assert_eq!(f.item(KEY_KERNEL_DATA).unwrap()[0], 0xaa);
        assert_eq!(
            f.item(KEY_CMDLINE_DATA).unwrap(),
            b"console=ttyS0 vga=0x312\0"
        );
        let setup = f.item(KEY_SETUP_DATA).unwrap();
        assert_eq!(setup[HDR_TYPE_OF_LOADER], 0xb0);
        assert_eq!(setup[HDR_LOADFLAGS] & 0x80, 0x80);
        assert_eq!(
            &setup[HDR_CMD_LINE_PTR..HDR_CMD_LINE_PTR + 4],
            &0x2_0000u32.to_le_bytes()
        );
        assert_eq!(
            &setup[HDR_VID_MODE..HDR_VID_MODE + 2],
            &0x312u16.to_le_bytes()
        );
        let at = u32_at(&f, KEY_INITRD_ADDR) as u64;
        assert_eq!(at % 4096, 0);
        assert!(at + 5000 <= (64 << 20) - LINUX_INITRD_GAP);
        assert!(
            at + 5000 + 4096 > (64 << 20) - LINUX_INITRD_GAP,
            "as high as it fits"
        );
        assert_eq!(
            &setup[HDR_RAMDISK_IMAGE..HDR_RAMDISK_IMAGE + 4],
            &(at as u32).to_le_bytes()
        );
        // Not a bzImage; an old protocol; an initrd too large for RAM.
        assert_eq!(
            FwCfg::new(true).add_linux(&[0; 0x2000], None, "", 64 << 20),
            Err(FwCfgError::NotBzImage)
        );
        let mut old = k.clone();
        old[HDR_VERSION] = 0x01;
        assert!(FwCfg::new(true)
            .add_linux(&old, None, "", 64 << 20)
            .is_err());
        let big = vec![0u8; 70 << 20];
        assert_eq!(
            FwCfg::new(true).add_linux(&k, Some(&big), "", 64 << 20),
            Err(FwCfgError::InitrdTooLarge(70 << 20))
        );
        assert_eq!(linux_vga_mode("vga=normal quiet"), Some(0xffff));
        assert_eq!(linux_vga_mode("vga=791"), Some(791));
        assert_eq!(linux_vga_mode("quiet"), None);
    }
}
