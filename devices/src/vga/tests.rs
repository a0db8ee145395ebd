//! Known screens, built through the guest interface (ports and the 0xA0000 window), with
//! expectations from the VGA reference: register tables of the standard BIOS modes, the
//! 6-to-8-bit DAC scale (0x2a -> 0xaa, 0x15 -> 0x55, 0x3f -> 0xff), the glyph a test
//! itself writes into plane 2.

use super::*;

fn out(v: &mut Vga, port: u16, val: u8) {
    v.port_write(port, val);
}

fn set_seq(v: &mut Vga, regs: &[u8]) {
    for (i, r) in regs.iter().enumerate() {
        out(v, PORT_SEQ_INDEX, i as u8);
        out(v, PORT_SEQ_DATA, *r);
    }
}

fn set_crtc(v: &mut Vga, regs: &[u8]) {
    // Unprotect CR0-7 first.
    out(v, PORT_CRTC_INDEX_COLOR, 0x11);
    out(v, 0x3d5, 0);
    for (i, r) in regs.iter().enumerate() {
        out(v, PORT_CRTC_INDEX_COLOR, i as u8);
        out(v, 0x3d5, *r);
    }
}

fn set_gc(v: &mut Vga, regs: &[u8]) {
    for (i, r) in regs.iter().enumerate() {
        out(v, PORT_GC_INDEX, i as u8);
        out(v, PORT_GC_DATA, *r);
    }
}

fn set_ac(v: &mut Vga, regs: &[u8]) {
    v.port_read(PORT_ISR1_COLOR); // reset the flip-flop to "index"
    for (i, r) in regs.iter().enumerate() {
        out(v, PORT_AC_WRITE, i as u8);
        out(v, PORT_AC_WRITE, *r);
    }
    out(v, PORT_AC_WRITE, 0x20); // PAS: hand the palette to the display
}

/// Loads a BIOS mode's register table: Misc Output, then sequencer, CRTC, graphics
/// controller and attribute controller registers from index 0.
fn set_mode(v: &mut Vga, misc: u8, seq: &[u8], crtc: &[u8], gc: &[u8], ac: &[u8]) {
    out(v, PORT_MISC_WRITE, misc);
    set_seq(v, seq);
    set_crtc(v, crtc);
    set_gc(v, gc);
    set_ac(v, ac);
}

fn set_dac(v: &mut Vga, index: u8, rgb: [u8; 3]) {
    out(v, PORT_DAC_WRITE_INDEX, index);
    for c in rgb {
        out(v, PORT_DAC_DATA, c);
    }
}

/// Mode 03h: 80x25 text, 9x16 cells (IBM VGA BIOS parameter table).
fn mode3(v: &mut Vga) {
    set_mode(
        v,
        0x67,
        &[0x03, 0x00, 0x03, 0x00, 0x02],
        &[
            0x5f, 0x4f, 0x50, 0x82, 0x55, 0x81, 0xbf, 0x1f, 0x00, 0x4f, 0x0d, 0x0e, 0x00, 0x00,
            0x00, 0x00, 0x9c, 0x8e, 0x8f, 0x28, 0x1f, 0x96, 0xb9, 0xa3, 0xff,
        ],
        &[0x00, 0x00, 0x00, 0x00, 0x00, 0x10, 0x0e, 0x00, 0xff],
        &[
            0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0x14, 0x07, 0x38, 0x39, 0x3a, 0x3b, 0x3c, 0x3d,
            0x3e, 0x3f, 0x0c, 0x00, 0x0f, 0x08, 0x00,
        ],
    );
}

/// The test's own glyph for a character: a diagonal, dot `r % 8` lit on row `r`.
fn diagonal(row: usize) -> u8 {
    0x80 >> (row % 8)
}

/// Loads `glyph(row)` for character `ch` into font block 0 the way a BIOS does: planar
/// access to plane 2 at 0xA0000, then back to odd/even text addressing.
fn load_glyph(v: &mut Vga, ch: u8, glyph: impl Fn(usize) -> u8) {
    set_seq(v, &[0x03, 0x00, 0x04, 0x00, 0x06]);
    set_gc(v, &[0, 0, 0, 0, 0x02, 0x00, 0x04]);
    for row in 0..32 {
        v.mem_write(ch as u64 * 32 + row as u64, glyph(row));
    }
    set_seq(v, &[0x03, 0x00, 0x03, 0x00, 0x02]);
    set_gc(v, &[0, 0, 0, 0, 0x00, 0x10, 0x0e]);
}

/// Writes a character cell through the B8000 window (odd/even).
fn put_cell(v: &mut Vga, cols: usize, row: usize, col: usize, ch: u8, attr: u8) {
    let off = 0x1_8000 + ((row * cols + col) * 2) as u64;
    v.mem_write(off, ch);
    v.mem_write(off + 1, attr);
}

const BLUE: u32 = 0x0000aa;
const GREY: u32 = 0xaaaaaa;
const YELLOW: u32 = 0xffff55;

fn text_setup() -> Vga {
    let mut v = Vga::new();
    mode3(&mut v);
    // DAC entries the mode-3 attribute palette points at: 1 (blue), 7 (grey), 0x3e (yellow).
    set_dac(&mut v, 0x01, [0x00, 0x00, 0x2a]);
    set_dac(&mut v, 0x07, [0x2a, 0x2a, 0x2a]);
    set_dac(&mut v, 0x3e, [0x3f, 0x3f, 0x15]);
    load_glyph(&mut v, b'A', diagonal);
    load_glyph(&mut v, b' ', |_| 0);
    for r in 0..25 {
        for c in 0..80 {
            put_cell(&mut v, 80, r, c, b' ', 0x07);
        }
    }
    v
}

#[test]
fn text_80x25_glyph_colours_and_ninth_column() {
    let mut v = text_setup();
    put_cell(&mut v, 80, 1, 2, b'A', 0x1e); // yellow on blue
    let mut f = Frame::default();
    v.update(&mut f, 0);
    assert_eq!((f.width, f.height), (720, 400));
    let (x0, y0) = (2 * 9, 16);
    for row in 0..16 {
        for x in 0..9 {
            let want = if x < 8 && diagonal(row) & (0x80 >> x) != 0 {
                YELLOW
            } else {
                BLUE
            };
            assert_eq!(f.pixel(x0 + x, y0 + row), want, "cell pixel ({x},{row})");
        }
    }
    // Neighbouring blank cell: grey-on-black space is all black.
    assert_eq!(f.pixel(x0 + 9, y0), 0);
}

#[test]
fn text_cursor_and_blink() {
    let mut v = text_setup();
    // Cursor on scanlines 14-15 of cell (1, 3).
    for (i, val) in [(0x0a, 14), (0x0b, 15), (0x0e, 0), (0x0f, 83)] {
        out(&mut v, PORT_CRTC_INDEX_COLOR, i);
        out(&mut v, 0x3d5, val);
    }
    put_cell(&mut v, 80, 2, 0, b'A', 0x9e); // blinking yellow on blue
    let mut f = Frame::default();
    v.update(&mut f, 0);
    let (cx, cy) = (3 * 9, 16);
    for x in 0..9 {
        assert_eq!(f.pixel(cx + x, cy + 14), GREY, "cursor line");
        assert_eq!(f.pixel(cx + x, cy + 15), GREY);
        assert_eq!(f.pixel(cx + x, cy + 13), 0, "above the cursor");
    }
    // Row 0 of the blinking 'A' shows its leftmost dot while visible.
    assert_eq!(f.pixel(0, 32), YELLOW);
    // 300 ms: cursor off phase (16 frames at 60 Hz = 266 ms), characters still on.
    let r = v.update(&mut f, 300).expect("cursor cell changed");
    assert_eq!(f.pixel(cx, cy + 14), 0);
    assert_eq!(
        (r.x, r.y, r.w, r.h),
        (cx, cy, 9, 16),
        "only the cursor cell"
    );
    // 600 ms: blink off phase: the blinking cell is all background.
    v.update(&mut f, 600);
    assert_eq!(f.pixel(0, 32), BLUE);
    // With blink disabled (AR10 bit 3 = 0) bit 7 is a bright background: colour 9.
    set_dac(&mut v, 0x39, [0x15, 0x15, 0x3f]);
    v.port_read(PORT_ISR1_COLOR);
    out(&mut v, PORT_AC_WRITE, 0x30);
    out(&mut v, PORT_AC_WRITE, 0x04);
    v.update(&mut f, 600);
    assert_eq!(f.pixel(8, 32), 0x5555ff);
}

#[test]
fn text_80x50_uses_8_line_cells() {
    let mut v = text_setup();
    // 8-scanline cells: CR09 = 7, cursor 6-7; the same 400 lines hold 50 rows.
    out(&mut v, PORT_CRTC_INDEX_COLOR, 0x09);
    out(&mut v, 0x3d5, 0x47);
    for r in 0..50 {
        for c in 0..80 {
            put_cell(&mut v, 80, r, c, b' ', 0x07);
        }
    }
    put_cell(&mut v, 80, 49, 79, b'A', 0x1e);
    let mut f = Frame::default();
    v.update(&mut f, 400);
    assert_eq!((f.width, f.height), (720, 400));
    for row in 0..8 {
        for x in 0..8 {
            let want = if diagonal(row) & (0x80 >> x) != 0 {
                YELLOW
            } else {
                BLUE
            };
            assert_eq!(f.pixel(79 * 9 + x, 49 * 8 + row), want);
        }
    }
}

#[test]
fn one_cell_change_redraws_one_cell() {
    let mut v = text_setup();
    let mut f = Frame::default();
    assert!(v.update(&mut f, 300).is_some());
    assert_eq!(v.update(&mut f, 300), None, "nothing changed");
    put_cell(&mut v, 80, 10, 40, b'A', 0x1e);
    let r = v.update(&mut f, 300).unwrap();
    assert_eq!((r.x, r.y, r.w, r.h), (360, 160, 9, 16));
}

/// Mode 13h registers (IBM VGA BIOS parameter table).
fn mode13(v: &mut Vga) {
    let mut ac: Vec<u8> = (0..16).collect();
    ac.extend([0x41, 0x00, 0x0f, 0x00, 0x00]);
    set_mode(
        v,
        0x63,
        &[0x03, 0x01, 0x0f, 0x00, 0x0e],
        &[
            0x5f, 0x4f, 0x50, 0x82, 0x54, 0x80, 0xbf, 0x1f, 0x00, 0x41, 0x00, 0x00, 0x00, 0x00,
            0x00, 0x00, 0x9c, 0x0e, 0x8f, 0x28, 0x40, 0x96, 0xb9, 0xa3, 0xff,
        ],
        &[0x00, 0x00, 0x00, 0x00, 0x00, 0x40, 0x05, 0x0f, 0xff],
        &ac,
    );
}

#[test]
fn mode_13h_pixels_go_through_the_dac() {
    let mut v = Vga::new();
    mode13(&mut v);
    set_dac(&mut v, 0x42, [0x3f, 0x00, 0x20]);
    v.mem_write(20 * 320 + 10, 0x42);
    let mut f = Frame::default();
    v.update(&mut f, 0);
    assert_eq!((f.width, f.height), (320, 200));
    assert_eq!(f.pixel(10, 20), 0xff0082);
    assert_eq!(f.pixel(11, 20), 0);
    // Chain-4 reads back what was written.
    assert_eq!(v.mem_read(20 * 320 + 10), 0x42);
    // One pixel change redraws only the lines sharing its 4 KiB page: 61440..65535
    // holds lines 192-199.
    v.mem_write(199 * 320 + 319, 0x42);
    let r = v.update(&mut f, 0).unwrap();
    assert_eq!((r.y, r.h), (192, 8));
    assert_eq!(f.pixel(319, 199), 0xff0082);
}

/// Mode 12h registers (IBM VGA BIOS parameter table).
fn mode12(v: &mut Vga) {
    set_mode(
        v,
        0xe3,
        &[0x03, 0x01, 0x0f, 0x00, 0x06],
        &[
            0x5f, 0x4f, 0x50, 0x82, 0x54, 0x80, 0x0b, 0x3e, 0x00, 0x40, 0x00, 0x00, 0x00, 0x00,
            0x00, 0x00, 0xea, 0x8c, 0xdf, 0x28, 0x00, 0xe7, 0x04, 0xe3, 0xff,
        ],
        &[0x00, 0x00, 0x00, 0x00, 0x00, 0x00, 0x05, 0x0f, 0xff],
        &[
            0x00, 0x01, 0x02, 0x03, 0x04, 0x05, 0x14, 0x07, 0x38, 0x39, 0x3a, 0x3b, 0x3c, 0x3d,
            0x3e, 0x3f, 0x01, 0x00, 0x0f, 0x00, 0x00,
        ],
    );
}

#[test]
fn mode_12h_write_modes_and_read_mode_1() {
    let mut v = Vga::new();
    mode12(&mut v);
    set_dac(&mut v, 0x3c, [0x3f, 0x15, 0x15]); // colour 12 -> AR 0x3c
    set_dac(&mut v, 0x01, [0x00, 0x00, 0x2a]); // colour 1
    let off = 50 * 80 + 100 / 8;
    // Write mode 2, bit mask selecting pixel 100 (bit 3): the classic putpixel.
    set_gc(&mut v, &[0, 0, 0, 0, 0, 0x02, 0x05, 0x0f, 0x80 >> 4]);
    v.mem_read(off); // load latches
    v.mem_write(off, 12);
    let mut f = Frame::default();
    v.update(&mut f, 0);
    assert_eq!((f.width, f.height), (640, 480));
    assert_eq!(f.pixel(100, 50), 0xff5555);
    assert_eq!(f.pixel(101, 50), 0);
    // Read mode 1: which pixels of the byte have colour 12?
    set_gc(&mut v, &[0, 0, 12, 0, 0, 0x08, 0x05, 0x0f, 0xff]);
    assert_eq!(v.mem_read(off), 0x08);
    // Colour don't-care on every plane: all pixels match.
    set_gc(&mut v, &[0, 0, 12, 0, 0, 0x08, 0x05, 0x00, 0xff]);
    assert_eq!(v.mem_read(off), 0xff);
    // Write mode 0 with set/reset for all planes: 8 pixels of colour 1.
    set_gc(&mut v, &[0x01, 0x0f, 0, 0, 0, 0x00, 0x05, 0x0f, 0xff]);
    v.mem_write(0, 0x00);
    v.update(&mut f, 0);
    for x in 0..8 {
        assert_eq!(f.pixel(x, 0), BLUE);
    }
    // Write mode 1 copies the latches: copy byte 0 (colour 1) to byte 1.
    set_gc(&mut v, &[0, 0, 0, 0, 0, 0x01, 0x05, 0x0f, 0xff]);
    v.mem_read(0);
    v.mem_write(1, 0);
    // Write mode 0, XOR with latches, data 0xff on plane 0 only via map mask: colour 1 ^ 1 = 0
    set_gc(&mut v, &[0, 0, 0, 0x18, 0, 0x00, 0x05, 0x0f, 0xff]);
    set_seq(&mut v, &[0x03, 0x01, 0x01, 0x00, 0x06]);
    v.mem_read(1);
    v.mem_write(1, 0xf0);
    v.update(&mut f, 0);
    for x in 8..12 {
        assert_eq!(f.pixel(x, 0), 0, "xor cleared plane 0");
    }
    for x in 12..16 {
        assert_eq!(f.pixel(x, 0), BLUE, "outside the xor data");
    }
    // Write mode 3: rotated data ANDed with the bit mask picks pixels, set/reset the colour.
    set_seq(&mut v, &[0x03, 0x01, 0x0f, 0x00, 0x06]);
    set_gc(&mut v, &[0x0c, 0, 0, 0, 0, 0x03, 0x05, 0x0f, 0xff]);
    v.mem_read(2);
    v.mem_write(2, 0x81);
    v.update(&mut f, 0);
    assert_eq!(f.pixel(16, 0), 0xff5555);
    assert_eq!(f.pixel(17, 0), 0);
    assert_eq!(f.pixel(23, 0), 0xff5555);
}

fn vbe_out(p: &mut VgaPorts, index: u16, val: u16) {
    p.write(PORT_VBE_INDEX as u64, &index.to_le_bytes());
    p.write(PORT_VBE_DATA as u64, &val.to_le_bytes());
}

/// A fresh VGA switched by the guest to a VBE mode with the LFB on (`bpp` None: the
/// default depth).
fn vbe_vga(w: u16, h: u16, bpp: Option<u16>) -> (SharedVga, VgaPorts) {
    let vga: SharedVga = Arc::new(Mutex::new(Vga::new()));
    let mut p = VgaPorts(vga.clone());
    vbe_out(&mut p, VBE_INDEX_XRES, w);
    vbe_out(&mut p, VBE_INDEX_YRES, h);
    if let Some(bpp) = bpp {
        vbe_out(&mut p, VBE_INDEX_BPP, bpp);
    }
    vbe_out(&mut p, VBE_INDEX_ENABLE, VBE_ENABLED | VBE_LFB_ENABLED);
    (vga, p)
}

/// Restores a saved state (JSON) into `vga` and draws it.
fn restore_and_draw(vga: &SharedVga, json: &str) -> Frame {
    let mut v = vga.lock().unwrap();
    v.restore(&serde_json::from_str(json).unwrap());
    let mut f = Frame::default();
    v.update(&mut f, 0);
    f
}

fn vbe_in(p: &mut VgaPorts, index: u16) -> u16 {
    p.write(PORT_VBE_INDEX as u64, &index.to_le_bytes());
    let mut b = [0u8; 2];
    p.read(PORT_VBE_DATA as u64, &mut b);
    u16::from_le_bytes(b)
}

#[test]
fn vbe_dispi_and_lfb() {
    let vga: SharedVga = Arc::new(Mutex::new(Vga::new()));
    let mut p = VgaPorts(vga.clone());
    assert_eq!(vbe_in(&mut p, VBE_INDEX_ID), 0xb0c5);
    assert_eq!(vbe_in(&mut p, VBE_INDEX_VIDEO_MEMORY_64K), 256);
    vbe_out(&mut p, VBE_INDEX_ENABLE, VBE_GETCAPS);
    assert_eq!(vbe_in(&mut p, VBE_INDEX_XRES), 1920);
    assert_eq!(vbe_in(&mut p, VBE_INDEX_YRES), 1200);
    assert_eq!(vbe_in(&mut p, VBE_INDEX_BPP), 32);
    vbe_out(&mut p, VBE_INDEX_ENABLE, 0);
    vbe_out(&mut p, VBE_INDEX_XRES, 640);
    vbe_out(&mut p, VBE_INDEX_YRES, 480);
    vbe_out(&mut p, VBE_INDEX_BPP, 32);
    vbe_out(&mut p, VBE_INDEX_ENABLE, VBE_ENABLED | VBE_LFB_ENABLED);
    assert_eq!(vbe_in(&mut p, VBE_INDEX_VIRT_WIDTH), 640);
    // Through the PCI BAR: pixel (5, 7) = 0x123456 (little-endian B, G, R, X).
    let mut pci = VgaPci::new(vga.clone());
    assert_eq!(pci.config().get16(0), 0x1234);
    assert_eq!(pci.config().get16(2), 0x1111);
    assert_eq!(pci.config().bar_address(0), Some(DEFAULT_LFB_ADDR));
    pci.bar_write(0, (7 * 640 + 5) * 4, &0x0012_3456u32.to_le_bytes());
    let mut f = Frame::default();
    let r = vga.lock().unwrap().update(&mut f, 0).unwrap();
    assert_eq!((f.width, f.height), (640, 480));
    assert_eq!((r.w, r.h), (640, 480));
    assert_eq!(f.pixel(5, 7), 0x123456);
    assert_eq!(vga.lock().unwrap().update(&mut f, 0), None);
    pci.bar_write(0, (100 * 640 + 1) * 4, &0x00ff_ffffu32.to_le_bytes());
    let r = vga.lock().unwrap().update(&mut f, 0).unwrap();
    // Its page, 253952..258047, holds parts of lines 99 and 100.
    assert_eq!((r.y, r.h), (99, 2));
    // 16 bpp 5:6:5: pure red and pure green.
    vbe_out(&mut p, VBE_INDEX_ENABLE, 0);
    vbe_out(&mut p, VBE_INDEX_BPP, 16);
    vbe_out(&mut p, VBE_INDEX_ENABLE, VBE_ENABLED | VBE_LFB_ENABLED);
    pci.bar_write(0, 0, &[0x00, 0xf8, 0xe0, 0x07]);
    vga.lock().unwrap().update(&mut f, 0);
    assert_eq!(f.pixel(0, 0), 0xff0000);
    assert_eq!(f.pixel(1, 0), 0x00ff00);
    // Banked access at 0xA0000 (no LFB bit): bank 1 is LFB offset 64 KiB.
    vbe_out(&mut p, VBE_INDEX_ENABLE, VBE_ENABLED | VBE_NOCLEARMEM);
    vbe_out(&mut p, VBE_INDEX_BANK, 1);
    let mut w = VgaWindow(vga.clone());
    w.write(2, &[0xab]);
    assert_eq!(vga.lock().unwrap().lfb[0x1_0002], 0xab);
}

/// A 640x480x32 VGA whose framebuffer is mapped, as the machine maps it, as watched
/// memory at BAR0's address in front of an MMU.
fn vbe_behind_mmu() -> (SharedVga, morph86_mmu::Mmu) {
    let (vga, _) = vbe_vga(640, 480, Some(32));
    let mut phys = morph86_mmu::PhysMem::new(2 << 20).unwrap();
    let fb = vga.lock().unwrap().framebuffer_memory();
    phys.add_watched(DEFAULT_LFB_ADDR as u64, fb, Box::new(LfbSink(vga.clone())));
    (vga, morph86_mmu::Mmu::new(phys))
}

#[test]
fn guest_stores_reach_the_screen_through_the_harvest() {
    let (vga, mut mmu) = vbe_behind_mmu();
    let lfb = DEFAULT_LFB_ADDR as u64;
    let mut f = Frame::default();
    vga.lock().unwrap().update(&mut f, 0);
    // Pixel (3, 200) and a whole scanline 300, stored as a guest does (through the TLB).
    mmu.write_u32(lfb + (200 * 640 + 3) * 4, 0x00ab_cdef, false)
        .unwrap();
    for x in 0..640 {
        mmu.write_u32(lfb + (300 * 640 + x) * 4, 0x0000_ff00, false)
            .unwrap();
    }
    // The guest reads its own stores back at once.
    assert_eq!(
        mmu.read_u32(lfb + (200 * 640 + 3) * 4, false),
        Ok(0xab_cdef)
    );
    // Before a harvest the display has not seen them (its copy is separate).
    assert_eq!(vga.lock().unwrap().update(&mut f, 0), None);
    assert_eq!(f.pixel(3, 200), 0);
    // The update just made asked for the pages; the guest's thread hands them over.
    mmu.harvest_watched(false);
    let r = vga.lock().unwrap().update(&mut f, 0).unwrap();
    assert_eq!(f.pixel(3, 200), 0xabcdef);
    assert!((0..640).all(|x| f.pixel(x, 300) == 0x00ff00));
    // Only the scanlines of the written pages were redrawn (2560 bytes a line): the
    // page of (3, 200), bytes 512,000..516,095, holds lines 200-201; line 300 (bytes
    // 768,000..770,559) lies in pages 187 and 188, bytes 765,952..774,143, lines
    // 299-302. So rows 200..=302 changed, nothing outside.
    assert_eq!((r.y, r.y + r.h), (200, 303));
    assert_eq!(vga.lock().unwrap().update(&mut f, 0), None);
    // A second round after the harvest re-armed the pages.
    mmu.write_u8(lfb + (200 * 640 + 3) * 4, 0x01, false)
        .unwrap();
    mmu.harvest_watched(false);
    vga.lock().unwrap().update(&mut f, 0).unwrap();
    assert_eq!(f.pixel(3, 200), 0xabcd01);
}

#[test]
fn snapshot_round_trip_keeps_text_and_framebuffer() {
    // Text mode with a cell written through the window, then a VBE mode with pixels.
    let mut v = Vga::new();
    v.bios_text_mode();
    let mut w = VgaWindow(Arc::new(Mutex::new(v)));
    w.write(0x1_8000 + 2 * 81, &[b'Q', 0x1e]); // row 1, column 1 of B8000h
    let vga = w.0.clone();
    let mut text = Frame::default();
    vga.lock().unwrap().update(&mut text, 0);
    let json = serde_json::to_string(&vga.lock().unwrap().save()).unwrap();
    // Restored into a VGA in another state: the same picture.
    let (other, _) = vbe_vga(320, 200, None);
    let fb_before = other.lock().unwrap().framebuffer_memory();
    let f = restore_and_draw(&other, &json);
    assert_eq!((f.width, f.height), (720, 400));
    assert_eq!(f.pixels, text.pixels);
    // The framebuffer memory the machine mapped is still the one in use.
    assert!(Arc::ptr_eq(
        &fb_before,
        &other.lock().unwrap().framebuffer_memory()
    ));
    // VBE: pixels survive, in the display's copy and in the memory the guest reads.
    let (vga, _) = vbe_vga(640, 480, Some(32));
    vga.lock()
        .unwrap()
        .lfb_write((479 * 640 + 639) * 4, &0x00c0_ffeeu32.to_le_bytes());
    let state = vga.lock().unwrap().save();
    let json = serde_json::to_string(&state).unwrap();
    assert!(
        json.len() < 4 * LFB_SIZE / 10,
        "only the used framebuffer is saved"
    );
    let restored: SharedVga = Arc::new(Mutex::new(Vga::new()));
    let f = restore_and_draw(&restored, &json);
    assert_eq!((f.width, f.height), (640, 480));
    assert_eq!(f.pixel(639, 479), 0xc0ffee);
    let mut b = [0u8; 4];
    restored
        .lock()
        .unwrap()
        .lfb_read((479 * 640 + 639) * 4, &mut b);
    assert_eq!(u32::from_le_bytes(b), 0x00c0_ffee);
}

#[test]
fn dac_reads_back_and_crtc_protect() {
    let mut v = Vga::new();
    set_dac(&mut v, 5, [1, 2, 3]);
    out(&mut v, PORT_DAC_READ_INDEX, 5);
    let got: Vec<u8> = (0..3).map(|_| v.port_read(PORT_DAC_DATA)).collect();
    assert_eq!(got, [1, 2, 3]);
    out(&mut v, PORT_MISC_WRITE, MISC_IOAS);
    out(&mut v, PORT_CRTC_INDEX_COLOR, 0x11);
    out(&mut v, 0x3d5, 0x80);
    out(&mut v, PORT_CRTC_INDEX_COLOR, 0x01);
    out(&mut v, 0x3d5, 0x55);
    assert_eq!(v.port_read(0x3d5), 0, "CR01 is write-protected");
    // Monochrome ports are off with colour addressing.
    assert_eq!(v.port_read(PORT_CRTC_INDEX_MONO), 0xff);
}

#[test]
fn input_status_retrace_toggles() {
    let mut v = Vga::new();
    out(&mut v, PORT_MISC_WRITE, MISC_IOAS);
    let mut seen_on = false;
    let mut seen_off_after = false;
    for _ in 0..64 {
        let s = v.port_read(PORT_ISR1_COLOR);
        if s & ISR1_VRETRACE != 0 {
            seen_on = true;
        } else if seen_on {
            seen_off_after = true;
        }
    }
    assert!(seen_on && seen_off_after);
}

#[test]
fn bios_text_mode_renders_the_builtin_font() {
    let mut v = Vga::new();
    v.bios_text_mode();
    put_cell(&mut v, 80, 0, 0, 0xdb, 0x0f); // full block, white
    let mut f = Frame::default();
    v.update(&mut f, 300);
    assert_eq!((f.width, f.height), (720, 400));
    // A full block fills its 8x16 cell; the 9th column repeats it (line graphics on).
    for y in 0..16 {
        for x in 0..9 {
            assert_eq!(f.pixel(x, y), 0xffffff, "({x},{y})");
        }
    }
}

#[test]
fn hostile_guest_cannot_panic_the_vga() {
    let vga: SharedVga = Arc::new(Mutex::new(Vga::new()));
    let mut p = VgaPorts(vga.clone());
    let mut w = VgaWindow(vga.clone());
    let mut pci = VgaPci::new(vga.clone());
    let mut seed = 0x1234_5678_9abc_def0u64;
    let mut rnd = || {
        seed ^= seed << 13;
        seed ^= seed >> 7;
        seed ^= seed << 17;
        seed
    };
    let mut f = Frame::default();
    for round in 0..200 {
        for _ in 0..200 {
            let r = rnd();
            let port = 0x3b0 + (r % 0x30) as u16;
            match (r >> 8) % 6 {
                0 => p.write(port as u64, &[(r >> 16) as u8]),
                1 => {
                    let mut b = [0u8];
                    p.read(port as u64, &mut b);
                }
                2 => vbe_out(&mut p, ((r >> 16) % 12) as u16, (r >> 32) as u16),
                3 => w.write((r >> 16) % 0x2_0000, &[(r >> 40) as u8]),
                4 => {
                    let mut b = [0u8; 4];
                    w.read((r >> 16) % 0x2_0000, &mut b);
                }
                _ => pci.bar_write(0, (r >> 16) % (LFB_SIZE as u64 + 64), &[1, 2, 3, 4]),
            }
        }
        vga.lock().unwrap().update(&mut f, round * 100);
        assert!(f.width <= 4096 && f.height <= 4096);
        assert_eq!(f.pixels.len(), f.width * f.height);
    }
}

/// Host cost of a full-screen redraw and of a one-line change (run with
/// `cargo test --release -p morph86-devices redraw_costs -- --ignored --nocapture`).
#[test]
#[ignore]
fn redraw_costs() {
    use std::time::Instant;
    fn time(mut f: impl FnMut()) -> f64 {
        let n = 200;
        f();
        let t = Instant::now();
        for _ in 0..n {
            f();
        }
        t.elapsed().as_secs_f64() * 1e6 / n as f64
    }
    // Text 80x25 (720x400).
    let mut v = Vga::new();
    v.bios_text_mode();
    let mut f = Frame::default();
    v.update(&mut f, 300);
    let full = time(|| {
        v.invalidate();
        v.update(&mut f, 300);
    });
    let mut k = 0u8;
    let line = time(|| {
        k = k.wrapping_add(1);
        for c in 0..80 {
            put_cell(&mut v, 80, 10, c, b'A'.wrapping_add(k % 26), 0x07);
        }
        v.update(&mut f, 300);
    });
    println!("text 80x25 (720x400): full redraw {full:.1} us, one changed text line {line:.1} us");
    for (w, h) in [(640u16, 480u16), (1920, 1200)] {
        let (vga, _) = vbe_vga(w, h, Some(32));
        let mut v = vga.lock().unwrap();
        let mut f = Frame::default();
        v.update(&mut f, 0);
        let full = time(|| {
            v.invalidate();
            v.update(&mut f, 0);
        });
        let row = vec![0x55u8; w as usize * 4];
        let line = time(|| {
            v.lfb_write(100 * w as u64 * 4, &row);
            v.update(&mut f, 0);
        });
        println!("VBE {w}x{h}x32: full redraw {full:.1} us, one changed scanline {line:.1} us");
    }
    // The whole path from guest stores: through the MMU into watched memory, the
    // harvest (copy into the display's copy, TLB re-armed), the redraw.
    let (vga, mut mmu) = vbe_behind_mmu();
    let lfb = DEFAULT_LFB_ADDR as u64;
    let mut f = Frame::default();
    vga.lock().unwrap().update(&mut f, 0);
    let mut k = 0u32;
    let mut store = |mmu: &mut morph86_mmu::Mmu, lines: std::ops::Range<u64>| {
        k = k.wrapping_add(0x010203);
        for a in (lines.start * 2560..lines.end * 2560).step_by(4) {
            mmu.write_u32(lfb + a, k, false).unwrap();
        }
    };
    let stores_full = time(|| store(&mut mmu, 0..480));
    mmu.harvest_watched(true);
    let full = time(|| {
        store(&mut mmu, 0..480);
        mmu.harvest_watched(true);
        vga.lock().unwrap().update(&mut f, 0);
    });
    let harvest_full = time(|| {
        store(&mut mmu, 0..480);
        mmu.harvest_watched(true);
    }) - stores_full;
    let line = time(|| {
        store(&mut mmu, 100..101);
        mmu.harvest_watched(true);
        vga.lock().unwrap().update(&mut f, 0);
    });
    println!(
        "VBE 640x480x32 through the MMU: guest stores + harvest + redraw: full screen {full:.1} us \
         (stores {stores_full:.1} us, harvest {harvest_full:.1} us), one scanline {line:.1} us"
    );
}
