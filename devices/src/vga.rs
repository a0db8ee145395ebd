//! VGA (IBM VGA register model) with the Bochs VBE "dispi" extension, as QEMU's `-vga std`
//! (PCI 1234:1111) presents it.
//!
//! What is modelled:
//! - the registers: sequencer (0x3c4/5), graphics controller (0x3ce/f), attribute
//!   controller (0x3c0/1, with its index/data flip-flop), CRT controller (0x3b4/5 or
//!   0x3d4/5 by Misc Output bit 0, write-protect bit CR11.7), DAC (0x3c6-0x3c9),
//!   Misc Output (0x3c2 write, 0x3cc read), Input Status 0/1 (0x3c2, 0x3ba/0x3da) with the
//!   retrace bits toggling on every read so polling loops always progress;
//! - 256 KiB of planar video memory behind the legacy window 0xA0000-0xBFFFF
//!   ([`VgaWindow`]): chain-4, odd/even, planar write modes 0-3 (set/reset, rotate,
//!   logical function, bit mask, map mask), read modes 0/1 (colour compare), latches;
//! - the Bochs VBE dispi registers (0x1ce index, 0x1cf data) and a 16 MiB linear
//!   framebuffer, reached through BAR0 of the PCI function ([`VgaPci`]) or, when VBE is on
//!   without the LFB bit, through 64 KiB banks at 0xA0000;
//! - a renderer ([`Vga::update`]) for text modes (any size the CRTC describes: 80x25,
//!   80x50, ...; font from plane 2, cursor, blink, attributes, 8/9-dot cells), 256-colour
//!   modes (13h and unchained "mode X"), 16-colour planar modes (12h, 0Dh, 10h) and VBE
//!   8/15/16/24/32 bpp, into a [`Frame`] of `0x00RRGGBB` pixels. It redraws only what
//!   changed: text cells whose character or attribute changed, and scanlines whose video
//!   memory pages were written since the last update.
//!
//! The framebuffer memory ([`Vga::framebuffer_memory`]) is MMU watched memory
//! (`morph86_mmu::dirty`): the machine maps it at BAR0's address with
//! `PhysMem::add_watched`, so guest stores reach it at RAM speed through the TLB and
//! the MMU logs the written pages; at each harvest an [`LfbSink`] copies those pages into
//! [`Vga::lfb`], the copy the renderer reads, and marks their scanlines for redrawing.
//! Accesses that still come through the device (the banked window at 0xA0000, BAR0 moved
//! by the guest away from the watched mapping) update both.
//!
//! Snapshot: [`Vga::save`] gives a [`VgaState`] (serde): registers, palette, planar
//! memory, dispi registers and the framebuffer up to its last non-zero byte;
//! [`Vga::restore`] puts it back into the same framebuffer memory.
//!
//! There is no VGA BIOS: [`Vga::bios_text_mode`] does what its power-on code would
//! (registers for mode 03h, the EGA palette in the DAC, an 8x16 font in plane 2).

pub mod font;
mod render;

pub use render::{Frame, Rect};

use crate::bus::lock;
use crate::pci::{BarKind, PciConfig, PciFunction};
use morph86_mmu::{BusDevice, DirtySink, WatchedMem};
use serde::{Deserialize, Serialize};
use std::sync::{Arc, Mutex};

/// Size of the planar video memory: 4 planes of 64 KiB.
pub const VRAM_SIZE: usize = 256 << 10;
/// Size of the linear framebuffer (the VBE memory, PCI BAR0).
pub const LFB_SIZE: usize = 16 << 20;
/// Where the legacy window starts in the physical address space.
pub const LEGACY_BASE: u64 = 0xa_0000;
/// Length of the legacy window (0xA0000-0xBFFFF).
pub const LEGACY_LEN: u64 = 0x2_0000;
/// PCI vendor of QEMU's standard VGA.
pub const PCI_VENDOR: u16 = 0x1234;
/// PCI device of QEMU's standard VGA.
pub const PCI_DEVICE: u16 = 0x1111;
/// PCI class: display controller, VGA compatible.
pub const PCI_CLASS_VGA: u32 = 0x03_00_00;
/// Where the framebuffer BAR is placed at power-on (firmware's job; the guest may move it).
pub const DEFAULT_LFB_ADDR: u32 = 0xe000_0000;
/// Page size used for dirty tracking of video memory.
pub const DIRTY_PAGE: usize = 4096;

// ---- I/O ports (IBM VGA technical reference; Bochs vbe.h for dispi) ----
/// Attribute controller address/data (write), address (read).
pub const PORT_AC_WRITE: u16 = 0x3c0;
/// Attribute controller data read.
pub const PORT_AC_READ: u16 = 0x3c1;
/// Misc Output write / Input Status 0 read.
pub const PORT_MISC_WRITE: u16 = 0x3c2;
/// Sequencer index.
pub const PORT_SEQ_INDEX: u16 = 0x3c4;
/// Sequencer data.
pub const PORT_SEQ_DATA: u16 = 0x3c5;
/// DAC pixel mask.
pub const PORT_DAC_MASK: u16 = 0x3c6;
/// DAC read index (write) / DAC state (read).
pub const PORT_DAC_READ_INDEX: u16 = 0x3c7;
/// DAC write index.
pub const PORT_DAC_WRITE_INDEX: u16 = 0x3c8;
/// DAC data (three 6-bit components per entry).
pub const PORT_DAC_DATA: u16 = 0x3c9;
/// Feature control read.
pub const PORT_FEATURE_READ: u16 = 0x3ca;
/// Misc Output read.
pub const PORT_MISC_READ: u16 = 0x3cc;
/// Graphics controller index.
pub const PORT_GC_INDEX: u16 = 0x3ce;
/// Graphics controller data.
pub const PORT_GC_DATA: u16 = 0x3cf;
/// CRTC index (monochrome addressing).
pub const PORT_CRTC_INDEX_MONO: u16 = 0x3b4;
/// CRTC index (colour addressing).
pub const PORT_CRTC_INDEX_COLOR: u16 = 0x3d4;
/// Input Status 1 (monochrome addressing); reading it resets the AC flip-flop.
pub const PORT_ISR1_MONO: u16 = 0x3ba;
/// Input Status 1 (colour addressing).
pub const PORT_ISR1_COLOR: u16 = 0x3da;
/// Bochs VBE dispi index port.
pub const PORT_VBE_INDEX: u16 = 0x1ce;
/// Bochs VBE dispi data port.
pub const PORT_VBE_DATA: u16 = 0x1cf;

// ---- register bits ----
/// Misc Output bit 0: I/O address select (1 = CRTC at 0x3d4, colour).
pub const MISC_IOAS: u8 = 0b0000_0001;
/// Sequencer 01h (Clocking Mode) bit 0: 8-dot character clocks (else 9).
pub const SR1_DOT8: u8 = 0b0000_0001;
/// Sequencer 01h bit 5: screen off.
pub const SR1_SCREEN_OFF: u8 = 0b0010_0000;
/// Sequencer 04h (Memory Mode) bit 2: odd/even disable (1 = sequential planar).
pub const SR4_ODD_EVEN_DIS: u8 = 0b0000_0100;
/// Sequencer 04h bit 3: chain 4.
pub const SR4_CHAIN4: u8 = 0b0000_1000;
/// Graphics 05h (Mode) bits 1:0: write mode.
pub const GR5_WRITE_MODE: u8 = 0b0000_0011;
/// Graphics 05h bit 3: read mode 1 (colour compare).
pub const GR5_READ_MODE1: u8 = 0b0000_1000;
/// Graphics 05h bit 6: 256-colour shift mode.
pub const GR5_SHIFT256: u8 = 0b0100_0000;
/// Graphics 06h (Misc) bit 0: graphics mode (else alphanumeric).
pub const GR6_GRAPHICS: u8 = 0b0000_0001;
/// Graphics 06h bits 3:2: memory map select.
pub const GR6_MEMORY_MAP: u8 = 0b0000_1100;
/// Attribute index bit 5: palette address source (0 = the CPU owns the palette, screen blank).
pub const AR_INDEX_PAS: u8 = 0b0010_0000;
/// Attribute 10h (Mode Control) bit 2: line graphics (9th dot of 0xC0-0xDF repeats the 8th).
pub const AR10_LINE_GRAPHICS: u8 = 0b0000_0100;
/// Attribute 10h bit 3: blink enable (attribute bit 7 blinks instead of bright background).
pub const AR10_BLINK: u8 = 0b0000_1000;
/// Attribute 10h bit 7: palette bits 5-4 select (take P5:P4 from AR14).
pub const AR10_P54S: u8 = 0b1000_0000;
/// CRTC 0Ah (Cursor Start) bit 5: cursor off.
pub const CR0A_CURSOR_OFF: u8 = 0b0010_0000;
/// CRTC 09h (Max Scan Line) bit 7: double scan.
pub const CR09_DOUBLE_SCAN: u8 = 0b1000_0000;
/// CRTC 11h bit 7: protect CR00-CR07.
pub const CR11_PROTECT: u8 = 0b1000_0000;
/// CRTC 14h (Underline Location) bit 6: double-word addressing.
pub const CR14_DWORD: u8 = 0b0100_0000;
/// CRTC 17h (Mode Control) bit 6: byte mode (else word mode).
pub const CR17_BYTE_MODE: u8 = 0b0100_0000;
/// Input Status 1 bit 0: display disabled (in a blanking interval).
pub const ISR1_DISPLAY_DISABLED: u8 = 0b0000_0001;
/// Input Status 1 bit 3: vertical retrace.
pub const ISR1_VRETRACE: u8 = 0b0000_1000;

// ---- Bochs VBE dispi registers (vbe.h) ----
/// Dispi register: interface ID.
pub const VBE_INDEX_ID: u16 = 0;
/// Dispi register: horizontal resolution.
pub const VBE_INDEX_XRES: u16 = 1;
/// Dispi register: vertical resolution.
pub const VBE_INDEX_YRES: u16 = 2;
/// Dispi register: bits per pixel.
pub const VBE_INDEX_BPP: u16 = 3;
/// Dispi register: enable bits.
pub const VBE_INDEX_ENABLE: u16 = 4;
/// Dispi register: 64 KiB bank at 0xA0000.
pub const VBE_INDEX_BANK: u16 = 5;
/// Dispi register: virtual width (pixels per scanline).
pub const VBE_INDEX_VIRT_WIDTH: u16 = 6;
/// Dispi register: virtual height.
pub const VBE_INDEX_VIRT_HEIGHT: u16 = 7;
/// Dispi register: display start X.
pub const VBE_INDEX_X_OFFSET: u16 = 8;
/// Dispi register: display start Y.
pub const VBE_INDEX_Y_OFFSET: u16 = 9;
/// Dispi register: video memory in 64 KiB units (read only).
pub const VBE_INDEX_VIDEO_MEMORY_64K: u16 = 10;
/// Number of dispi registers.
pub const VBE_REGS: usize = 11;
/// Oldest dispi interface ID.
pub const VBE_ID0: u16 = 0xb0c0;
/// Newest dispi interface ID we implement (adds VIDEO_MEMORY_64K).
pub const VBE_ID5: u16 = 0xb0c5;
/// ENABLE bit 0: VBE mode on.
pub const VBE_ENABLED: u16 = 0x01;
/// ENABLE bit 1: reads of XRES/YRES/BPP give the maxima.
pub const VBE_GETCAPS: u16 = 0x02;
/// ENABLE bit 5: 8-bit DAC.
pub const VBE_8BIT_DAC: u16 = 0x20;
/// ENABLE bit 6: linear framebuffer (else banked at 0xA0000).
pub const VBE_LFB_ENABLED: u16 = 0x40;
/// ENABLE bit 7: keep video memory when enabling.
pub const VBE_NOCLEARMEM: u16 = 0x80;
/// Largest horizontal resolution.
pub const VBE_MAX_XRES: u16 = 1920;
/// Largest vertical resolution.
pub const VBE_MAX_YRES: u16 = 1200;
/// Largest depth.
pub const VBE_MAX_BPP: u16 = 32;

/// The VGA + VBE device state.
#[derive(Clone, Serialize, Deserialize)]
pub struct Vga {
    /// Misc Output register.
    pub misc: u8,
    seq_index: u8,
    /// Sequencer registers SR00-SR04.
    pub sr: [u8; 8],
    gc_index: u8,
    /// Graphics controller registers GR00-GR08.
    pub gr: [u8; 16],
    ac_index: u8,
    ac_flip: bool,
    /// Attribute controller registers AR00-AR14.
    pub ar: [u8; 32],
    crtc_index: u8,
    /// CRT controller registers CR00-CR18.
    pub cr: [u8; 32],
    dac_mask: u8,
    dac_read_index: u8,
    dac_write_index: u8,
    dac_comp: u8,
    dac_reading: bool,
    dac_latch: [u8; 3],
    /// DAC palette: 256 entries of (R, G, B), 6 bits each (8 with VBE_8BIT_DAC).
    #[serde(with = "serde_palette")]
    pub dac: [[u8; 3]; 256],
    feature: u8,
    status_reads: u32,
    latch: [u8; 4],
    /// Planar video memory, planes interleaved: byte `offset * 4 + plane`.
    pub vram: Vec<u8>,
    vbe_index: u16,
    /// Dispi registers.
    pub vbe: [u16; VBE_REGS],
    /// The display's copy of the VBE memory (the linear framebuffer), as of the last
    /// harvest of [`Vga::framebuffer_memory`] (plus the writes made through the device).
    #[serde(skip, default = "new_lfb")]
    pub lfb: Vec<u8>,
    /// The VBE memory itself (guest's side; see the module documentation). Clones of a
    /// `Vga` share it.
    #[serde(skip, default = "new_fb")]
    fb: Arc<WatchedMem>,
    #[serde(skip, default = "new_vram_dirty")]
    vram_dirty: Vec<bool>,
    #[serde(skip, default = "new_lfb_dirty")]
    lfb_dirty: Vec<bool>,
    /// Something other than memory changed (registers, palette): redraw everything.
    #[serde(skip)]
    full_redraw: bool,
    /// Plane 2 or 3 was written (the font may have changed).
    #[serde(skip)]
    font_dirty: bool,
    #[serde(skip)]
    render: render::RenderCache,
}

fn new_lfb() -> Vec<u8> {
    vec![0; LFB_SIZE]
}
fn try_new_fb() -> std::io::Result<Arc<WatchedMem>> {
    // 16 MiB of address space, committed only as the guest draws.
    WatchedMem::new(LFB_SIZE)
}
fn new_fb() -> Arc<WatchedMem> {
    try_new_fb().expect("cannot reserve host memory for the VGA framebuffer")
}
fn new_vram_dirty() -> Vec<bool> {
    vec![true; VRAM_SIZE / DIRTY_PAGE]
}
fn new_lfb_dirty() -> Vec<bool> {
    vec![true; LFB_SIZE / DIRTY_PAGE]
}

mod serde_palette {
    use serde::{Deserialize, Deserializer, Serialize, Serializer};
    pub fn serialize<S: Serializer>(p: &[[u8; 3]; 256], s: S) -> Result<S::Ok, S::Error> {
        p.iter()
            .flatten()
            .copied()
            .collect::<Vec<u8>>()
            .serialize(s)
    }
    pub fn deserialize<'de, D: Deserializer<'de>>(d: D) -> Result<[[u8; 3]; 256], D::Error> {
        let v = Vec::<u8>::deserialize(d)?;
        let mut p = [[0u8; 3]; 256];
        for (i, c) in v.chunks(3).take(256).enumerate() {
            for (k, b) in c.iter().enumerate() {
                p[i][k] = *b;
            }
        }
        Ok(p)
    }
}

impl Default for Vga {
    fn default() -> Self {
        Self::new()
    }
}

impl Vga {
    /// A VGA at power-on: all registers zero, memory clear, VBE off. Panics if the host
    /// cannot map the framebuffer; the machine uses [`Vga::try_new`].
    pub fn new() -> Self {
        Self::with_framebuffer(new_fb())
    }

    /// As [`Vga::new`], with a failure to map the framebuffer's host memory returned.
    pub fn try_new() -> std::io::Result<Self> {
        Ok(Self::with_framebuffer(try_new_fb()?))
    }

    /// A VGA at power-on using `fb` (at least [`LFB_SIZE`] bytes, cleared by the caller)
    /// as its framebuffer memory.
    fn with_framebuffer(fb: Arc<WatchedMem>) -> Self {
        let mut vbe = [0u16; VBE_REGS];
        vbe[VBE_INDEX_ID as usize] = VBE_ID5;
        vbe[VBE_INDEX_VIDEO_MEMORY_64K as usize] = (LFB_SIZE >> 16) as u16;
        Vga {
            misc: 0,
            seq_index: 0,
            sr: [0; 8],
            gc_index: 0,
            gr: [0; 16],
            ac_index: 0,
            ac_flip: false,
            ar: [0; 32],
            crtc_index: 0,
            cr: [0; 32],
            dac_mask: 0xff,
            dac_read_index: 0,
            dac_write_index: 0,
            dac_comp: 0,
            dac_reading: false,
            dac_latch: [0; 3],
            dac: [[0; 3]; 256],
            feature: 0,
            status_reads: 0,
            latch: [0; 4],
            vram: vec![0; VRAM_SIZE],
            vbe_index: 0,
            vbe,
            lfb: new_lfb(),
            fb,
            vram_dirty: new_vram_dirty(),
            lfb_dirty: new_lfb_dirty(),
            full_redraw: true,
            font_dirty: true,
            render: render::RenderCache::default(),
        }
    }

    /// Back to power-on state (keeps nothing but the framebuffer memory's identity, which
    /// the machine has mapped; its contents are cleared).
    ///
    /// Call it from the thread that runs the guest (as the machine's reset does), or
    /// before that thread starts: it writes the framebuffer memory.
    pub fn reset(&mut self) {
        let fb = self.fb.clone();
        fb_fill(&fb, 0, LFB_SIZE, 0);
        *self = Vga::with_framebuffer(fb);
    }

    /// The framebuffer memory, to be mapped at BAR0's address as watched memory with an
    /// [`LfbSink`] (see the module documentation).
    pub fn framebuffer_memory(&self) -> Arc<WatchedMem> {
        self.fb.clone()
    }

    /// What a VGA BIOS does at power-on: mode 03h (80x25 text, 9x16 cells, colour
    /// addressing), the 16 EGA colours in the DAC, an 8x16 font in plane 2 and a clear
    /// screen (light grey on black).
    pub fn bios_text_mode(&mut self) {
        // Register values for mode 03h, as the IBM VGA reference tabulates them.
        self.misc = 0x67;
        self.sr[..5].copy_from_slice(&[0x03, 0x00, 0x03, 0x00, 0x02]);
        const CRTC: [u8; 25] = [
            0x5f, 0x4f, 0x50, 0x82, 0x55, 0x81, 0xbf, 0x1f, 0x00, 0x4f, 0x0d, 0x0e, 0x00, 0x00,
            0x00, 0x00, 0x9c, 0x8e, 0x8f, 0x28, 0x1f, 0x96, 0xb9, 0xa3, 0xff,
        ];
        self.cr[..25].copy_from_slice(&CRTC);
        self.gr[..9].copy_from_slice(&[0x00, 0x00, 0x00, 0x00, 0x00, 0x10, 0x0e, 0x00, 0xff]);
        const AC: [u8; 21] = [
            0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0x14, 0x07, 0x38, 0x39, 0x3a, 0x3b, 0x3c, 0x3d,
            0x3e, 0x3f, 0x0c, 0x00, 0x0f, 0x08, 0x00,
        ];
        self.ar[..21].copy_from_slice(&AC);
        self.ac_index = AR_INDEX_PAS;
        self.dac = [[0; 3]; 256];
        for (i, e) in self.dac.iter_mut().enumerate().take(64) {
            *e = ega_colour(i as u8);
        }
        self.load_font(&font::FONT_8X16[..], 16, 0);
        // Blank cells: space, attribute 07h.
        for cell in 0..(80 * 50) {
            self.vram[cell * 2 * 4] = b' ';
            self.vram[cell * 2 * 4 + 1] = 0x07;
        }
        self.full_redraw = true;
        self.vram_dirty.fill(true);
    }

    /// Writes `glyphs` (one row byte per scanline, `height` rows per glyph, most
    /// significant bit leftmost) into font block `block` (0-7) of plane 2.
    pub fn load_font(&mut self, glyphs: &[u8], height: usize, block: usize) {
        let base = font_block_offset(block & 7);
        for (ch, g) in glyphs.chunks(height).take(256).enumerate() {
            for (row, bits) in g.iter().enumerate().take(32) {
                self.vram[(base + ch * 32 + row) * 4 + 2] = *bits;
            }
        }
        self.vram_dirty.fill(true);
        self.full_redraw = true;
    }

    fn crtc_color(&self) -> bool {
        self.misc & MISC_IOAS != 0
    }

    /// A byte read from a VGA or dispi port.
    pub fn port_read(&mut self, port: u16) -> u8 {
        match port {
            0x3b0..=0x3bf if self.crtc_color() => 0xff,
            0x3d0..=0x3df if !self.crtc_color() => 0xff,
            PORT_AC_WRITE => self.ac_index,
            PORT_AC_READ => self.ar[(self.ac_index & 0x1f) as usize],
            PORT_MISC_WRITE => 0x10, // Input Status 0: switch sense reads 1 (colour monitor).
            PORT_SEQ_INDEX => self.seq_index,
            PORT_SEQ_DATA => self.sr[(self.seq_index & 7) as usize],
            PORT_DAC_MASK => self.dac_mask,
            PORT_DAC_READ_INDEX => {
                if self.dac_reading {
                    0x03
                } else {
                    0x00
                }
            }
            PORT_DAC_WRITE_INDEX => self.dac_write_index,
            PORT_DAC_DATA => {
                let i = self.dac_read_index as usize;
                let v = self.dac[i][self.dac_comp as usize];
                self.dac_comp += 1;
                if self.dac_comp == 3 {
                    self.dac_comp = 0;
                    self.dac_read_index = self.dac_read_index.wrapping_add(1);
                }
                v
            }
            PORT_FEATURE_READ => self.feature,
            PORT_MISC_READ => self.misc,
            PORT_GC_INDEX => self.gc_index,
            PORT_GC_DATA => self.gr[(self.gc_index & 0xf) as usize],
            PORT_CRTC_INDEX_MONO | PORT_CRTC_INDEX_COLOR => self.crtc_index,
            0x3b5 | 0x3d5 => self
                .cr
                .get(self.crtc_index as usize)
                .copied()
                .unwrap_or(0xff),
            PORT_ISR1_MONO | PORT_ISR1_COLOR => {
                self.ac_flip = false;
                // No real beam: every read advances a fake one, so that a loop waiting
                // for retrace start (or end) always sees it after a few reads.
                self.status_reads = self.status_reads.wrapping_add(1);
                let mut v = 0;
                if self.status_reads & 1 != 0 {
                    v |= ISR1_DISPLAY_DISABLED;
                }
                if self.status_reads & 0xf >= 12 {
                    v |= ISR1_VRETRACE | ISR1_DISPLAY_DISABLED;
                }
                v
            }
            _ => 0xff,
        }
    }

    /// A byte written to a VGA port.
    pub fn port_write(&mut self, port: u16, v: u8) {
        match port {
            0x3b0..=0x3bf if self.crtc_color() => {}
            0x3d0..=0x3df if !self.crtc_color() => {}
            PORT_AC_WRITE => {
                if !self.ac_flip {
                    if (self.ac_index ^ v) & AR_INDEX_PAS != 0 {
                        self.full_redraw = true;
                    }
                    self.ac_index = v & 0x3f;
                } else {
                    let i = (self.ac_index & 0x1f) as usize;
                    if i <= 0x14 {
                        self.ar[i] = if i < 16 { v & 0x3f } else { v };
                        self.full_redraw = true;
                    }
                }
                self.ac_flip = !self.ac_flip;
            }
            PORT_MISC_WRITE => {
                self.misc = v;
                self.full_redraw = true;
            }
            PORT_SEQ_INDEX => self.seq_index = v,
            PORT_SEQ_DATA => {
                let i = self.seq_index as usize;
                if i < 5 {
                    self.sr[i] = v;
                    self.full_redraw = true;
                }
            }
            PORT_DAC_MASK => {
                self.dac_mask = v;
                self.full_redraw = true;
            }
            PORT_DAC_READ_INDEX => {
                self.dac_read_index = v;
                self.dac_comp = 0;
                self.dac_reading = true;
            }
            PORT_DAC_WRITE_INDEX => {
                self.dac_write_index = v;
                self.dac_comp = 0;
                self.dac_reading = false;
            }
            PORT_DAC_DATA => {
                let mask = if self.vbe[VBE_INDEX_ENABLE as usize] & VBE_8BIT_DAC != 0 {
                    0xff
                } else {
                    0x3f
                };
                self.dac_latch[self.dac_comp as usize] = v & mask;
                self.dac_comp += 1;
                if self.dac_comp == 3 {
                    self.dac_comp = 0;
                    self.dac[self.dac_write_index as usize] = self.dac_latch;
                    self.dac_write_index = self.dac_write_index.wrapping_add(1);
                    self.full_redraw = true;
                }
            }
            PORT_GC_INDEX => self.gc_index = v,
            PORT_GC_DATA => {
                let i = self.gc_index as usize;
                if i < 9 {
                    self.gr[i] = v;
                    self.full_redraw = true;
                }
            }
            PORT_CRTC_INDEX_MONO | PORT_CRTC_INDEX_COLOR => self.crtc_index = v,
            0x3b5 | 0x3d5 => {
                let i = self.crtc_index as usize;
                if i > 0x18 {
                    return;
                }
                if self.cr[0x11] & CR11_PROTECT != 0 && i <= 7 {
                    if i == 7 {
                        // Only the line-compare bit 8 (bit 4) stays writable.
                        self.cr[7] = (self.cr[7] & !0x10) | (v & 0x10);
                    }
                    return;
                }
                self.cr[i] = v;
                // Cursor moves and start-address changes are seen by the text cache
                // itself; everything else may change the geometry.
                if !matches!(i, 0x0e | 0x0f) {
                    self.full_redraw = true;
                }
            }
            PORT_ISR1_MONO | PORT_ISR1_COLOR => self.feature = v,
            _ => log::debug!("vga: write {v:#04x} to unhandled port {port:#06x}"),
        }
    }

    /// Selects dispi register `index` (a write of the 0x1ce index port).
    pub fn vbe_select(&mut self, index: u16) {
        self.vbe_index = index;
    }

    /// A 16-bit read of the dispi data register (index selected at 0x1ce).
    pub fn vbe_read(&mut self) -> u16 {
        let i = self.vbe_index as usize;
        if i >= VBE_REGS {
            return 0;
        }
        if self.vbe[VBE_INDEX_ENABLE as usize] & VBE_GETCAPS != 0 {
            match i as u16 {
                VBE_INDEX_XRES => return VBE_MAX_XRES,
                VBE_INDEX_YRES => return VBE_MAX_YRES,
                VBE_INDEX_BPP => return VBE_MAX_BPP,
                _ => {}
            }
        }
        self.vbe[i]
    }

    /// A 16-bit write of the dispi data register.
    pub fn vbe_write(&mut self, v: u16) {
        let i = self.vbe_index;
        let enabled = self.vbe[VBE_INDEX_ENABLE as usize] & VBE_ENABLED != 0;
        match i {
            VBE_INDEX_ID => {
                if (VBE_ID0..=VBE_ID5).contains(&v) {
                    self.vbe[0] = v;
                }
            }
            // Geometry cannot change while VBE is on (as in Bochs).
            VBE_INDEX_XRES | VBE_INDEX_YRES | VBE_INDEX_BPP if enabled => {}
            VBE_INDEX_XRES => self.vbe[1] = v.min(VBE_MAX_XRES) & !7,
            VBE_INDEX_YRES => self.vbe[2] = v.min(VBE_MAX_YRES),
            VBE_INDEX_BPP => {
                let bpp = if v == 0 { 8 } else { v };
                if matches!(bpp, 4 | 8 | 15 | 16 | 24 | 32) {
                    self.vbe[3] = bpp;
                } else {
                    log::debug!("vga: VBE depth {v} refused");
                }
            }
            VBE_INDEX_BANK => {
                let banks = (LFB_SIZE >> 16) as u16;
                self.vbe[5] = if v < banks { v } else { 0 };
            }
            VBE_INDEX_ENABLE => {
                if v & VBE_ENABLED != 0 && !enabled {
                    let (x, y) = (self.vbe[1].max(8), self.vbe[2].max(1));
                    if self.vbe[3] == 0 {
                        self.vbe[3] = 8;
                    }
                    self.vbe[1] = x;
                    self.vbe[2] = y;
                    self.vbe[VBE_INDEX_VIRT_WIDTH as usize] = x;
                    self.vbe[VBE_INDEX_VIRT_HEIGHT as usize] = y;
                    self.vbe[VBE_INDEX_X_OFFSET as usize] = 0;
                    self.vbe[VBE_INDEX_Y_OFFSET as usize] = 0;
                    self.fix_virtual_height();
                    if v & VBE_NOCLEARMEM == 0 {
                        let used = (self.vbe_stride() * self.vbe[2] as usize).min(LFB_SIZE);
                        self.lfb[..used].fill(0);
                        fb_fill(&self.fb, 0, used, 0);
                    }
                }
                self.vbe[4] = v & (VBE_ENABLED | VBE_GETCAPS | VBE_8BIT_DAC | VBE_LFB_ENABLED);
                self.full_redraw = true;
            }
            VBE_INDEX_VIRT_WIDTH => {
                let w = v.max(self.vbe[1]);
                let bytes = bpp_bytes(self.vbe[3]);
                if (w as usize) * bytes * (self.vbe[2] as usize) <= LFB_SIZE {
                    self.vbe[6] = w;
                    self.fix_virtual_height();
                }
                self.full_redraw = true;
            }
            VBE_INDEX_X_OFFSET | VBE_INDEX_Y_OFFSET => {
                self.vbe[i as usize] = v;
                self.full_redraw = true;
            }
            VBE_INDEX_VIRT_HEIGHT | VBE_INDEX_VIDEO_MEMORY_64K => {}
            _ => log::debug!("vga: write to dispi register {i} ignored"),
        }
    }

    /// Bytes per scanline of the VBE mode.
    fn vbe_stride(&self) -> usize {
        let w = self.vbe[VBE_INDEX_VIRT_WIDTH as usize].max(self.vbe[1]) as usize;
        if self.vbe[3] == 4 {
            w / 2
        } else {
            w * bpp_bytes(self.vbe[3])
        }
    }

    fn fix_virtual_height(&mut self) {
        let stride = self.vbe_stride().max(1);
        self.vbe[VBE_INDEX_VIRT_HEIGHT as usize] = (LFB_SIZE / stride).min(0xffff) as u16;
    }

    /// Whether a VBE mode is on.
    pub fn vbe_enabled(&self) -> bool {
        self.vbe[VBE_INDEX_ENABLE as usize] & VBE_ENABLED != 0
    }

    // ---- the legacy window ----

    /// Maps an offset in the 128 KiB window to an offset in the decoded range, per GR6.
    fn window_offset(&self, off: u64) -> Option<usize> {
        let (start, len) = match (self.gr[6] & GR6_MEMORY_MAP) >> 2 {
            0 => (0, 0x2_0000),
            1 => (0, 0x1_0000),
            2 => (0x1_0000, 0x8000),
            _ => (0x1_8000, 0x8000),
        };
        (off >= start && off < start + len).then(|| (off - start) as usize)
    }

    fn mark_vram(&mut self, idx: usize) {
        if idx & 2 != 0 {
            self.font_dirty = true;
        }
        if let Some(d) = self.vram_dirty.get_mut(idx / DIRTY_PAGE) {
            *d = true;
        }
    }

    fn mark_lfb(&mut self, off: usize, len: usize) {
        let first = off / DIRTY_PAGE;
        let last = (off + len.max(1) - 1) / DIRTY_PAGE;
        for p in first..=last {
            if let Some(d) = self.lfb_dirty.get_mut(p) {
                *d = true;
            }
        }
    }

    /// A byte read at `off` in the 0xA0000-0xBFFFF window.
    pub fn mem_read(&mut self, off: u64) -> u8 {
        if self.vbe_enabled() && off < 0x1_0000 {
            let a = ((self.vbe[VBE_INDEX_BANK as usize] as usize) << 16) + off as usize;
            let mut b = [0xff];
            self.lfb_read(a as u64, &mut b);
            return b[0];
        }
        let Some(a) = self.window_offset(off) else {
            return 0xff;
        };
        if self.sr[4] & SR4_CHAIN4 != 0 {
            return self.vram.get(a).copied().unwrap_or(0xff);
        }
        if self.sr[4] & SR4_ODD_EVEN_DIS == 0 {
            // Odd/even: A0 picks the plane of the pair GR4 bit 1 selects.
            let plane = (self.gr[4] as usize & 2) | (a & 1);
            let o = a & !1;
            return self.vram.get(o * 4 + plane).copied().unwrap_or(0xff);
        }
        if a >= 0x1_0000 {
            return 0xff;
        }
        for p in 0..4 {
            self.latch[p] = self.vram[a * 4 + p];
        }
        if self.gr[5] & GR5_READ_MODE1 == 0 {
            self.latch[(self.gr[4] & 3) as usize]
        } else {
            // Colour compare: bit set where every "care" plane matches GR2.
            let mut diff = 0u8;
            for p in 0..4 {
                if self.gr[7] & (1 << p) != 0 {
                    let want = if self.gr[2] & (1 << p) != 0 { 0xff } else { 0 };
                    diff |= self.latch[p] ^ want;
                }
            }
            !diff
        }
    }

    /// A byte written at `off` in the 0xA0000-0xBFFFF window.
    pub fn mem_write(&mut self, off: u64, v: u8) {
        if self.vbe_enabled() && off < 0x1_0000 {
            let a = ((self.vbe[VBE_INDEX_BANK as usize] as usize) << 16) + off as usize;
            self.lfb_write(a as u64, &[v]);
            return;
        }
        let Some(a) = self.window_offset(off) else {
            return;
        };
        if self.sr[4] & SR4_CHAIN4 != 0 {
            if self.sr[2] & (1 << (a & 3)) != 0 && a < VRAM_SIZE {
                self.vram[a] = v;
                self.mark_vram(a);
            }
            return;
        }
        if self.sr[4] & SR4_ODD_EVEN_DIS == 0 {
            let plane = (self.gr[4] as usize & 2) | (a & 1);
            let idx = (a & !1) * 4 + plane;
            if self.sr[2] & (1 << plane) != 0 && idx < VRAM_SIZE {
                self.vram[idx] = v;
                self.mark_vram(idx);
            }
            return;
        }
        if a >= 0x1_0000 {
            return;
        }
        let planes = self.planar_write_data(v);
        for (p, byte) in planes.iter().enumerate() {
            if self.sr[2] & (1 << p) != 0 {
                self.vram[a * 4 + p] = *byte;
            }
        }
        self.mark_vram(a * 4);
        if self.sr[2] & 0b1100 != 0 {
            self.font_dirty = true;
        }
    }

    /// The four plane bytes a planar write produces (write modes 0-3, GR0-GR8).
    fn planar_write_data(&self, v: u8) -> [u8; 4] {
        let rotate = self.gr[3] & 7;
        let func = (self.gr[3] >> 3) & 3;
        let mut mask = self.gr[8];
        let mut out = [0u8; 4];
        let mode = self.gr[5] & GR5_WRITE_MODE;
        if mode == 1 {
            return self.latch;
        }
        let rotated = v.rotate_right(rotate as u32);
        for (p, o) in out.iter_mut().enumerate() {
            let expand = |bit: bool| if bit { 0xffu8 } else { 0 };
            *o = match mode {
                0 => {
                    if self.gr[1] & (1 << p) != 0 {
                        expand(self.gr[0] & (1 << p) != 0)
                    } else {
                        rotated
                    }
                }
                2 => expand(v & (1 << p) != 0),
                _ => expand(self.gr[0] & (1 << p) != 0),
            };
        }
        if mode == 3 {
            mask &= rotated;
        }
        for (p, o) in out.iter_mut().enumerate() {
            let l = self.latch[p];
            let r = match func {
                0 => *o,
                1 => *o & l,
                2 => *o | l,
                _ => *o ^ l,
            };
            *o = (r & mask) | (l & !mask);
        }
        out
    }

    /// A read of the linear framebuffer at `off` (BAR0 relative), made by the guest
    /// through the device (call it on the thread that runs the guest).
    pub fn lfb_read(&self, off: u64, data: &mut [u8]) {
        data.fill(0xff);
        let o = off as usize;
        if o >= LFB_SIZE {
            return;
        }
        let n = data.len().min(LFB_SIZE - o);
        // SAFETY: device accesses run on the guest's thread (dirty module contract), and
        // this view ends before the function returns.
        let fb = unsafe { self.fb.bytes() };
        data[..n].copy_from_slice(&fb[o..o + n]);
    }

    /// A write to the linear framebuffer at `off`, made by the guest through the device
    /// (call it on the thread that runs the guest): it reaches the memory and the
    /// display's copy.
    pub fn lfb_write(&mut self, off: u64, data: &[u8]) {
        let o = off as usize;
        if o >= LFB_SIZE {
            return;
        }
        let n = data.len().min(LFB_SIZE - o);
        // SAFETY: as in `lfb_read`.
        let fb = unsafe { self.fb.bytes_mut() };
        fb[o..o + n].copy_from_slice(&data[..n]);
        self.lfb[o..o + n].copy_from_slice(&data[..n]);
        self.mark_lfb(o, n);
    }

    /// Copies framebuffer pages `pages` of `mem` into the display's copy and marks them
    /// for redrawing (what [`LfbSink`] does at a harvest).
    pub fn lfb_pages_written(&mut self, mem: &[u8], pages: &[usize]) {
        for &p in pages {
            let lo = p * DIRTY_PAGE;
            if lo >= LFB_SIZE.min(mem.len()) {
                continue;
            }
            let hi = (lo + DIRTY_PAGE).min(LFB_SIZE).min(mem.len());
            self.lfb[lo..hi].copy_from_slice(&mem[lo..hi]);
            self.mark_lfb(lo, hi - lo);
        }
    }

    /// Snapshot of the device (take it between guest instructions, on the guest's
    /// thread: it reads the framebuffer memory).
    pub fn save(&self) -> VgaState {
        // SAFETY: called on the guest's thread between instructions (dirty module
        // contract); the view ends in this function.
        let fb = unsafe { self.fb.bytes() };
        let used = fb.iter().rposition(|&b| b != 0).map_or(0, |i| i + 1);
        let mut regs = self.clone();
        regs.lfb = Vec::new();
        VgaState {
            regs,
            framebuffer: fb[..used.min(LFB_SIZE)].to_vec(),
        }
    }

    /// Restores a snapshot (on the guest's thread, between instructions): the
    /// framebuffer memory keeps its identity (the machine has it mapped) and gets the
    /// saved contents; the next [`Vga::update`] redraws everything.
    pub fn restore(&mut self, s: &VgaState) {
        let fb = self.fb.clone();
        let mut v = s.regs.clone();
        v.fb = fb;
        v.vram.resize(VRAM_SIZE, 0);
        let n = s.framebuffer.len().min(LFB_SIZE);
        v.lfb = new_lfb();
        v.lfb[..n].copy_from_slice(&s.framebuffer[..n]);
        // SAFETY: as in `save`.
        let mem = unsafe { v.fb.bytes_mut() };
        mem[..LFB_SIZE].fill(0);
        mem[..n].copy_from_slice(&s.framebuffer[..n]);
        v.vram_dirty = new_vram_dirty();
        v.lfb_dirty = new_lfb_dirty();
        v.render = render::RenderCache::default();
        v.full_redraw = true;
        v.font_dirty = true;
        *self = v;
    }

    /// Forces the next [`Vga::update`] to redraw the whole frame.
    pub fn invalidate(&mut self) {
        self.full_redraw = true;
    }
}

/// Saved state of the VGA (see [`Vga::save`]).
#[derive(Clone, Serialize, Deserialize)]
pub struct VgaState {
    /// Registers, palette, planar memory and dispi registers.
    regs: Vga,
    /// The framebuffer up to its last non-zero byte.
    framebuffer: Vec<u8>,
}

/// The 64 EGA colours as 6-bit DAC values: colour bits `rgbRGB` (bit 5 = secondary red,
/// bit 2 = primary red), primary worth 2/3 and secondary 1/3 of full intensity.
pub fn ega_colour(i: u8) -> [u8; 3] {
    let c =
        |primary: u8, secondary: u8| ((i >> primary) & 1) * 0x2a + ((i >> secondary) & 1) * 0x15;
    [c(2, 5), c(1, 4), c(0, 3)]
}

/// Fills `len` bytes of framebuffer memory at `off` with `v` (on the guest's thread).
fn fb_fill(fb: &WatchedMem, off: usize, len: usize, v: u8) {
    // SAFETY: the callers (VBE enable, reset) run on the guest's thread or before it
    // starts (dirty module contract); the view ends here.
    let mem = unsafe { fb.bytes_mut() };
    let end = off.saturating_add(len).min(mem.len());
    if off < end {
        mem[off..end].fill(v);
    }
}

/// Bytes per pixel of a VBE depth.
fn bpp_bytes(bpp: u16) -> usize {
    match bpp {
        15 | 16 => 2,
        24 => 3,
        32 => 4,
        _ => 1,
    }
}

/// Plane-2 offset of character map `block` (SR3 encoding: 0-3 at 16 KiB steps, 4-7 at
/// 8 KiB past them).
pub fn font_block_offset(block: usize) -> usize {
    (block & 3) * 0x4000 + (block >> 2) * 0x2000
}

/// The VGA as a shared device: register it on the port bus ([`install_ports`]), map
/// [`VgaWindow`] at 0xA0000 and add [`VgaPci`] to the PCI bus.
pub type SharedVga = Arc<Mutex<Vga>>;

/// Port-bus adapter: 0x3b0-0x3df byte ports and the 16-bit dispi pair.
pub struct VgaPorts(pub SharedVga);

impl BusDevice for VgaPorts {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let port = offset as u16;
        let mut v = lock(&self.0);
        if port == PORT_VBE_INDEX {
            let x = v.vbe_index.to_le_bytes();
            data.copy_from_slice(&x[..data.len().min(2)]);
        } else if port == PORT_VBE_DATA || port == PORT_VBE_INDEX + 2 {
            let x = v.vbe_read().to_le_bytes();
            for (i, b) in data.iter_mut().enumerate() {
                *b = x.get(i).copied().unwrap_or(0xff);
            }
        } else {
            for (i, b) in data.iter_mut().enumerate() {
                *b = v.port_read(port.wrapping_add(i as u16));
            }
        }
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        let port = offset as u16;
        let mut v = lock(&self.0);
        let word = u16::from_le_bytes([data[0], data.get(1).copied().unwrap_or(0)]);
        if port == PORT_VBE_INDEX {
            v.vbe_index = word;
        } else if port == PORT_VBE_DATA || port == PORT_VBE_INDEX + 2 {
            v.vbe_write(word);
        } else {
            for (i, b) in data.iter().enumerate() {
                v.port_write(port.wrapping_add(i as u16), *b);
            }
        }
    }
}

/// Registers the VGA's ports: 0x3b0-0x3df (bytes) and 0x1ce-0x1cf (dispi: 16-bit index and
/// data; QEMU also accepts the data register at 0x1d0, as here).
pub fn install_ports(bus: &mut crate::PortBus, vga: &SharedVga) -> Result<(), crate::BusError> {
    let dev: crate::SharedDevice = Arc::new(Mutex::new(VgaPorts(vga.clone())));
    bus.register("vga", 0x3b0, 0x30, 0, crate::Width::Bytes, dev.clone())?;
    bus.register(
        "vbe-index",
        PORT_VBE_INDEX,
        1,
        0,
        crate::Width::Any,
        dev.clone(),
    )?;
    bus.register("vbe-data", PORT_VBE_DATA, 2, 0, crate::Width::Any, dev)?;
    Ok(())
}

/// The harvest's receiver for the framebuffer's watched memory: copies written pages
/// into [`Vga::lfb`] (see the module documentation).
pub struct LfbSink(pub SharedVga);

impl DirtySink for LfbSink {
    fn pages_written(&mut self, mem: &[u8], pages: &[usize]) {
        lock(&self.0).lfb_pages_written(mem, pages);
    }
}

/// The legacy memory window: map at [`LEGACY_BASE`] with length [`LEGACY_LEN`].
pub struct VgaWindow(pub SharedVga);

impl BusDevice for VgaWindow {
    fn read(&mut self, offset: u64, data: &mut [u8]) {
        let mut v = lock(&self.0);
        for (i, b) in data.iter_mut().enumerate() {
            *b = v.mem_read(offset + i as u64);
        }
    }
    fn write(&mut self, offset: u64, data: &[u8]) {
        let mut v = lock(&self.0);
        for (i, b) in data.iter().enumerate() {
            v.mem_write(offset + i as u64, *b);
        }
    }
}

/// The PCI face: 1234:1111, class VGA, BAR0 = the 16 MiB framebuffer (prefetchable).
/// Once connected to the memory map ([`PciFunction::connect_memory`]), the framebuffer's
/// watched memory follows BAR0 wherever the guest (its firmware) moves it.
pub struct VgaPci {
    cfg: PciConfig,
    vga: SharedVga,
    /// The memory map's job queue and where the watched framebuffer is mapped now.
    map: Option<(morph86_mmu::phys::PhysJobs, u64)>,
}

impl VgaPci {
    /// The function, with BAR0 placed at [`DEFAULT_LFB_ADDR`] and memory and I/O decoding
    /// on, as firmware leaves it.
    pub fn new(vga: SharedVga) -> Self {
        let mut cfg = PciConfig::new(PCI_VENDOR, PCI_DEVICE, PCI_CLASS_VGA, 2, 0);
        // QEMU's subsystem IDs for its standard VGA (Red Hat / QEMU).
        cfg.set16(crate::pci::CFG_SUBSYS_VENDOR, 0x1af4);
        cfg.set16(crate::pci::CFG_SUBSYS_VENDOR + 2, 0x1100);
        cfg.set_bar(0, BarKind::Mem32 { prefetchable: true }, LFB_SIZE as u32);
        cfg.set32(
            crate::pci::CFG_BAR0,
            DEFAULT_LFB_ADDR | crate::pci::BAR_PREFETCH,
        );
        cfg.set16(
            crate::pci::CFG_COMMAND,
            crate::pci::CMD_IO | crate::pci::CMD_MEM,
        );
        VgaPci {
            cfg,
            vga,
            map: None,
        }
    }
}

impl PciFunction for VgaPci {
    fn config(&self) -> &PciConfig {
        &self.cfg
    }
    fn config_mut(&mut self) -> &mut PciConfig {
        &mut self.cfg
    }
    fn connect_memory(&mut self, jobs: morph86_mmu::phys::PhysJobs) {
        // The machine maps the watched framebuffer at DEFAULT_LFB_ADDR.
        self.map = Some((jobs, DEFAULT_LFB_ADDR as u64));
    }
    fn config_write(&mut self, off: u8, size: usize, value: u32) {
        self.cfg.write(off, size, value);
        let Some((jobs, at)) = self.map.as_mut() else {
            return;
        };
        // A decoding BAR0 at a new place takes the framebuffer memory with it (a BAR
        // being sized, all ones, is not a place).
        if let Some(base) = self.cfg.bar_address(0) {
            let base = base as u64;
            if base != *at && base != 0 && base != u32::MAX as u64 & !(LFB_SIZE as u64 - 1) {
                let from = *at;
                *at = base;
                jobs.push(Box::new(move |m: &mut morph86_mmu::PhysMem| {
                    m.move_watched(from, base);
                }));
            }
        }
    }
    fn bar_read(&mut self, bar: usize, offset: u64, data: &mut [u8]) {
        if bar == 0 {
            lock(&self.vga).lfb_read(offset, data);
        } else {
            data.fill(0xff);
        }
    }
    fn bar_write(&mut self, bar: usize, offset: u64, data: &[u8]) {
        if bar == 0 {
            lock(&self.vga).lfb_write(offset, data);
        }
    }
}

#[cfg(test)]
mod tests;
