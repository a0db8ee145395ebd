//! Turning the VGA's state into pixels, redrawing only what changed.

use super::*;

/// An RGB picture of the screen: `pixels[y * width + x]` is `0x00RRGGBB`.
#[derive(Debug, Clone, Default, PartialEq, Eq)]
pub struct Frame {
    /// Width in pixels.
    pub width: usize,
    /// Height in pixels.
    pub height: usize,
    /// Row-major pixels.
    pub pixels: Vec<u32>,
}

impl Frame {
    /// The pixel at (x, y); black outside the frame.
    pub fn pixel(&self, x: usize, y: usize) -> u32 {
        if x < self.width && y < self.height {
            self.pixels[y * self.width + x]
        } else {
            0
        }
    }

    fn resize(&mut self, w: usize, h: usize) {
        self.width = w;
        self.height = h;
        self.pixels.clear();
        self.pixels.resize(w * h, 0);
    }
}

/// A rectangle of the frame that changed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Rect {
    /// Left edge.
    pub x: usize,
    /// Top edge.
    pub y: usize,
    /// Width.
    pub w: usize,
    /// Height.
    pub h: usize,
}

impl Rect {
    fn union(a: Option<Rect>, b: Rect) -> Option<Rect> {
        Some(match a {
            None => b,
            Some(a) => {
                let x0 = a.x.min(b.x);
                let y0 = a.y.min(b.y);
                let x1 = (a.x + a.w).max(b.x + b.w);
                let y1 = (a.y + a.h).max(b.y + b.h);
                Rect {
                    x: x0,
                    y: y0,
                    w: x1 - x0,
                    h: y1 - y0,
                }
            }
        })
    }
}

/// What the screen shows, as far as the renderer cares.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub(super) enum Mode {
    /// Nothing (screen off or palette owned by the CPU).
    #[default]
    Blank,
    /// Alphanumeric.
    Text {
        cols: usize,
        rows: usize,
        cw: usize,
        ch: usize,
    },
    /// 16-colour planar graphics.
    Planar { w: usize, h: usize },
    /// 256-colour graphics (chain-4 or unchained).
    Colour256 { w: usize, h: usize },
    /// Bochs VBE.
    Vbe { w: usize, h: usize, bpp: u16 },
}

/// What the last update drew, to find what changed.
#[derive(Debug, Clone, Default)]
pub(super) struct RenderCache {
    mode: Mode,
    /// Per text cell: character | attribute << 8 | drawn-with-cursor << 16 | blink-off << 17.
    cells: Vec<u32>,
    frames: u64,
}

/// Cursor toggles every 16 frames, blinking characters every 32 (at 60 Hz).
const CURSOR_BLINK_MS: u64 = 16 * 1000 / 60;
const CHAR_BLINK_MS: u64 = 32 * 1000 / 60;

impl Vga {
    fn geometry(&self) -> (usize, usize, usize, bool) {
        let hde = self.cr[1] as usize + 1;
        let vde = self.cr[0x12] as usize
            | ((self.cr[7] as usize >> 1) & 1) << 8
            | ((self.cr[7] as usize >> 6) & 1) << 9;
        let msl = (self.cr[9] & 0x1f) as usize + 1;
        (hde, vde + 1, msl, self.cr[9] & CR09_DOUBLE_SCAN != 0)
    }

    pub(super) fn current_mode(&self) -> Mode {
        if self.vbe_enabled() {
            let (w, h, bpp) = (self.vbe[1] as usize, self.vbe[2] as usize, self.vbe[3]);
            if w == 0 || h == 0 {
                return Mode::Blank;
            }
            return Mode::Vbe { w, h, bpp };
        }
        if self.sr[1] & SR1_SCREEN_OFF != 0 || self.ac_index & AR_INDEX_PAS == 0 {
            return Mode::Blank;
        }
        let (hde, lines, msl, dscan) = self.geometry();
        if self.gr[6] & GR6_GRAPHICS == 0 {
            let cw = if self.sr[1] & SR1_DOT8 != 0 { 8 } else { 9 };
            let rows = lines.div_ceil(msl);
            return Mode::Text {
                cols: hde,
                rows,
                cw,
                ch: msl,
            };
        }
        let mut h = lines / msl;
        if dscan {
            h /= 2;
        }
        let h = h.max(1);
        if self.gr[5] & GR5_SHIFT256 != 0 {
            Mode::Colour256 { w: hde * 4, h }
        } else {
            let mut w = hde * 8;
            if self.sr[1] & 0b0000_1000 != 0 {
                // SR1 bit 3: dot clock divided by 2 (320-wide modes).
                w /= 2;
            }
            Mode::Planar { w, h }
        }
    }

    fn dac_rgb(&self, i: u8) -> u32 {
        let [r, g, b] = self.dac[(i & self.dac_mask) as usize];
        if self.vbe[VBE_INDEX_ENABLE as usize] & VBE_8BIT_DAC != 0 {
            (r as u32) << 16 | (g as u32) << 8 | b as u32
        } else {
            let e = |c: u8| ((c & 0x3f) << 2 | (c & 0x3f) >> 4) as u32;
            e(r) << 16 | e(g) << 8 | e(b)
        }
    }

    /// Colour of a 4-bit attribute-controller input (text and planar modes).
    fn ac_rgb(&self, i: u8) -> u32 {
        let mut v = self.ar[(i & self.ar[0x12] & 0xf) as usize] & 0x3f;
        if self.ar[0x10] & AR10_P54S != 0 {
            v = (v & 0x0f) | (self.ar[0x14] & 3) << 4;
        }
        v |= (self.ar[0x14] & 0x0c) << 4;
        self.dac_rgb(v)
    }

    fn addr_shift(&self) -> u32 {
        if self.cr[0x14] & CR14_DWORD != 0 {
            2
        } else if self.cr[0x17] & CR17_BYTE_MODE == 0 {
            1
        } else {
            0
        }
    }

    fn start_address(&self) -> usize {
        (self.cr[0x0c] as usize) << 8 | self.cr[0x0d] as usize
    }

    /// Brings `frame` up to date with video memory and registers. `now_ms` drives cursor
    /// and character blinking. Returns the area that changed, if any.
    pub fn update(&mut self, frame: &mut Frame, now_ms: u64) -> Option<Rect> {
        // Ask for the framebuffer pages the guest wrote through the MMU; the guest's
        // thread hands them over at its next harvest, for the next update.
        self.fb.request();
        let mode = self.current_mode();
        let (w, h) = match mode {
            Mode::Blank => (frame.width.max(640), frame.height.max(400)),
            Mode::Text { cols, rows, cw, ch } => (cols * cw, rows * ch),
            Mode::Planar { w, h } | Mode::Colour256 { w, h } | Mode::Vbe { w, h, .. } => (w, h),
        };
        let (w, h) = (w.clamp(1, 4096), h.clamp(1, 4096));
        let mut full = self.full_redraw || mode != self.render.mode;
        if frame.width != w || frame.height != h || frame.pixels.len() != w * h {
            frame.resize(w, h);
            full = true;
        }
        if full {
            self.render.cells.clear();
        }
        self.render.mode = mode;
        self.render.frames += 1;
        let changed = match mode {
            Mode::Blank => {
                if full {
                    frame.pixels.fill(0);
                    Some(Rect { x: 0, y: 0, w, h })
                } else {
                    None
                }
            }
            Mode::Text { cols, rows, cw, ch } => {
                if self.font_dirty {
                    self.render.cells.clear();
                }
                self.draw_text(frame, cols, rows, cw, ch, now_ms)
            }
            Mode::Planar { w, h } => self.draw_lines(frame, w, h, full, false),
            Mode::Colour256 { w, h } => self.draw_lines(frame, w, h, full, true),
            Mode::Vbe { w, h, bpp } => self.draw_vbe(frame, w, h, bpp, full),
        };
        self.full_redraw = false;
        self.font_dirty = false;
        self.vram_dirty.fill(false);
        changed
    }

    fn draw_text(
        &mut self,
        frame: &mut Frame,
        cols: usize,
        rows: usize,
        cw: usize,
        ch: usize,
        now_ms: u64,
    ) -> Option<Rect> {
        let n = cols * rows;
        if self.render.cells.len() != n {
            self.render.cells = vec![u32::MAX; n];
        }
        let shift = self.addr_shift();
        let start = self.start_address();
        let stride = self.cr[0x13] as usize * 2;
        let cursor_on = (now_ms / CURSOR_BLINK_MS) & 1 == 0;
        let blink_off = (now_ms / CHAR_BLINK_MS) & 1 == 1;
        let blink = self.ar[0x10] & AR10_BLINK != 0;
        let cur_loc = (self.cr[0x0e] as usize) << 8 | self.cr[0x0f] as usize;
        let cs = (self.cr[0x0a] & 0x1f) as usize;
        let ce = (self.cr[0x0b] & 0x1f) as usize;
        let cursor_enabled = self.cr[0x0a] & CR0A_CURSOR_OFF == 0 && cs <= ce && cursor_on;
        let sr3 = self.sr[3] as usize;
        let map_a = font_block_offset(((sr3 >> 2) & 3) | ((sr3 >> 3) & 4));
        let map_b = font_block_offset((sr3 & 3) | ((sr3 >> 2) & 4));
        let line_gfx = self.ar[0x10] & AR10_LINE_GRAPHICS != 0;
        let mut pal = [0u32; 16];
        for (i, p) in pal.iter_mut().enumerate() {
            *p = self.ac_rgb(i as u8);
        }
        let mut changed = None;
        for row in 0..rows {
            for col in 0..cols {
                let counter = start + row * stride + col;
                let off = (counter << shift) & 0xffff;
                let c = self.vram[off * 4];
                let a = self.vram[off * 4 + 1];
                let has_cursor = cursor_enabled && counter == cur_loc;
                let off_phase = blink && a & 0x80 != 0 && blink_off;
                let key = c as u32
                    | (a as u32) << 8
                    | (has_cursor as u32) << 16
                    | (off_phase as u32) << 17;
                let cell = row * cols + col;
                if self.render.cells[cell] == key {
                    continue;
                }
                self.render.cells[cell] = key;
                let fg_i = a & 0x0f;
                let bg_i = if blink { (a >> 4) & 7 } else { a >> 4 };
                let fg = pal[if off_phase { bg_i } else { fg_i } as usize];
                let bg = pal[bg_i as usize];
                let font = if a & 0x08 != 0 { map_a } else { map_b };
                let x0 = col * cw;
                for y in 0..ch {
                    let py = row * ch + y;
                    if py >= frame.height {
                        break;
                    }
                    let glyph = self.vram[((font + c as usize * 32 + y.min(31)) & 0xffff) * 4 + 2];
                    let mut bits = glyph as u32;
                    if has_cursor && y >= cs && y <= ce {
                        bits = 0x1ff;
                    }
                    let ninth = if cw == 9 {
                        if has_cursor && y >= cs && y <= ce {
                            true
                        } else {
                            line_gfx && (0xc0..=0xdf).contains(&c) && glyph & 1 != 0
                        }
                    } else {
                        false
                    };
                    let line = &mut frame.pixels[py * frame.width + x0..py * frame.width + x0 + cw];
                    for (x, px) in line.iter_mut().enumerate() {
                        let on = if x < 8 {
                            bits & (0x80 >> x) != 0
                        } else {
                            ninth
                        };
                        *px = if on { fg } else { bg };
                    }
                }
                changed = Rect::union(
                    changed,
                    Rect {
                        x: x0,
                        y: row * ch,
                        w: cw,
                        h: ch.min(frame.height.saturating_sub(row * ch)),
                    },
                );
            }
        }
        changed
    }

    /// Planar 16-colour and 256-colour modes, line by line; only lines whose memory was
    /// written are redrawn unless `full`.
    fn draw_lines(
        &mut self,
        frame: &mut Frame,
        w: usize,
        h: usize,
        full: bool,
        c256: bool,
    ) -> Option<Rect> {
        let shift = self.addr_shift();
        let start = self.start_address();
        let stride = self.cr[0x13] as usize * 2;
        let chain4 = self.sr[4] & SR4_CHAIN4 != 0;
        let palette: Vec<u32> = if c256 {
            (0..=255u8).map(|i| self.dac_rgb(i)).collect()
        } else {
            (0..16u8).map(|i| self.ac_rgb(i)).collect()
        };
        let mut y0 = None;
        let mut y1 = 0;
        for y in 0..h {
            let counter = start + y * stride;
            // Interleaved vram range this line reads.
            let (lo, len) = if c256 && chain4 {
                ((counter * 4) % VRAM_SIZE, w)
            } else if c256 {
                (((counter << shift) * 4) % VRAM_SIZE, w)
            } else {
                (((counter << shift) * 4) % VRAM_SIZE, w / 2)
            };
            if !full && !self.range_dirty(&self.vram_dirty, lo, len, VRAM_SIZE) {
                continue;
            }
            let row = &mut frame.pixels[y * frame.width..y * frame.width + w];
            for (x, px) in row.iter_mut().enumerate() {
                let idx = if c256 && chain4 {
                    (counter * 4 + x) % VRAM_SIZE
                } else if c256 {
                    ((((counter << shift) + x / 4) & 0xffff) * 4) | (x & 3)
                } else {
                    (((counter << shift) + x / 8) & 0xffff) * 4
                };
                *px = if c256 {
                    palette[self.vram[idx] as usize]
                } else {
                    let bit = 0x80 >> (x & 7);
                    let mut c = 0;
                    for p in 0..4 {
                        if self.vram[idx + p] & bit != 0 {
                            c |= 1 << p;
                        }
                    }
                    palette[c]
                };
            }
            y0.get_or_insert(y);
            y1 = y + 1;
        }
        y0.map(|y0| Rect {
            x: 0,
            y: y0,
            w,
            h: y1 - y0,
        })
    }

    fn range_dirty(&self, pages: &[bool], lo: usize, len: usize, size: usize) -> bool {
        let first = lo / DIRTY_PAGE;
        let last = (lo + len.max(1) - 1).min(size - 1) / DIRTY_PAGE;
        pages[first..=last].iter().any(|d| *d) || lo + len > size && pages[0]
    }

    fn draw_vbe(
        &mut self,
        frame: &mut Frame,
        w: usize,
        h: usize,
        bpp: u16,
        full: bool,
    ) -> Option<Rect> {
        let stride = self.vbe_stride();
        let bytes = bpp_bytes(bpp);
        let start = self.vbe[VBE_INDEX_Y_OFFSET as usize] as usize * stride
            + self.vbe[VBE_INDEX_X_OFFSET as usize] as usize * bytes;
        let palette: Vec<u32> = (0..=255u8).map(|i| self.dac_rgb(i)).collect();
        let mut y0 = None;
        let mut y1 = 0;
        let line_len = if bpp == 4 { w / 2 } else { w * bytes };
        for y in 0..h {
            let lo = start + y * stride;
            if lo + line_len > LFB_SIZE {
                break;
            }
            if !full && !self.range_dirty(&self.lfb_dirty, lo, line_len, LFB_SIZE) {
                continue;
            }
            let src = &self.lfb[lo..lo + line_len];
            let row = &mut frame.pixels[y * frame.width..y * frame.width + w];
            match bpp {
                32 => {
                    for (px, s) in row.iter_mut().zip(src.chunks_exact(4)) {
                        *px = u32::from_le_bytes([s[0], s[1], s[2], 0]);
                    }
                }
                24 => {
                    for (px, s) in row.iter_mut().zip(src.chunks_exact(3)) {
                        *px = u32::from_le_bytes([s[0], s[1], s[2], 0]);
                    }
                }
                16 => {
                    for (px, s) in row.iter_mut().zip(src.chunks_exact(2)) {
                        let v = u16::from_le_bytes([s[0], s[1]]) as u32;
                        let (r, g, b) = ((v >> 11) & 0x1f, (v >> 5) & 0x3f, v & 0x1f);
                        *px = (r << 3 | r >> 2) << 16 | (g << 2 | g >> 4) << 8 | (b << 3 | b >> 2);
                    }
                }
                15 => {
                    for (px, s) in row.iter_mut().zip(src.chunks_exact(2)) {
                        let v = u16::from_le_bytes([s[0], s[1]]) as u32;
                        let (r, g, b) = ((v >> 10) & 0x1f, (v >> 5) & 0x1f, v & 0x1f);
                        *px = (r << 3 | r >> 2) << 16 | (g << 3 | g >> 2) << 8 | (b << 3 | b >> 2);
                    }
                }
                8 => {
                    for (px, s) in row.iter_mut().zip(src.iter()) {
                        *px = palette[*s as usize];
                    }
                }
                _ => {
                    for (x, px) in row.iter_mut().enumerate() {
                        let b = src[x / 2];
                        let nib = if x & 1 == 0 { b >> 4 } else { b & 0xf };
                        *px = palette[nib as usize];
                    }
                }
            }
            y0.get_or_insert(y);
            y1 = y + 1;
        }
        self.lfb_dirty.fill(false);
        y0.map(|y0| Rect {
            x: 0,
            y: y0,
            w,
            h: y1 - y0,
        })
    }
}
