//! The screen: wiring the VGA into the machine, and showing it (an SDL window with the
//! `sdl` cargo feature, on by default) or not (`-display none`), with `--screenshot
//! FILE.png` written when the machine stops.
//!
//! Threads: the vCPU runs on its own thread; the display loop runs on the main thread
//! (SDL wants its events there), renders the VGA about 60 times a second, and turns host
//! keys and mouse motion into PS/2 input through the i8042.
//!
//! Building: the window needs SDL2, which the `sdl2` crate compiles from source and links
//! statically (features `bundled`, `static-link`): that takes cmake and a C compiler, and
//! X11/Wayland development headers for SDL to open windows there. `scripts/setup.sh`
//! installs cmake. Where that is not possible, `cargo build --release
//! --no-default-features` builds a morph86 without the window (`-display none` only; the
//! demo then always runs headless).

#[cfg(feature = "sdl")]
mod sdl;

use morph86_devices::i8042::I8042;
use morph86_devices::pci::{PCI_MMIO_BASE, PCI_MMIO_LEN};
use morph86_devices::vga::{self, Frame, SharedVga, Vga, VgaPci, VgaWindow};
use morph86_devices::{PcPlatform, Wakeup};
use morph86_mmu::PhysMem;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};
use std::time::{Duration, Instant};

/// What the window title tells about the guest; the vCPU thread updates it.
pub struct GuestStats {
    executed: std::sync::atomic::AtomicU64,
    halted: AtomicBool,
}

/// The guest's counters, shared by the vCPU thread and the display.
pub static GUEST_STATS: GuestStats = GuestStats {
    executed: std::sync::atomic::AtomicU64::new(0),
    halted: AtomicBool::new(false),
};

impl GuestStats {
    /// vCPU thread: `n` more instructions ran; the CPU is (not) halted now.
    pub fn note(&self, n: u64, halted: bool) {
        self.executed.fetch_add(n, Ordering::Relaxed);
        self.halted.store(halted, Ordering::Relaxed);
    }

    /// Instructions run so far, and whether the CPU sits in HLT.
    pub fn get(&self) -> (u64, bool) {
        (
            self.executed.load(Ordering::Relaxed),
            self.halted.load(Ordering::Relaxed),
        )
    }
}

/// PCI slot of the VGA (00:02.0, where QEMU puts it).
pub const VGA_PCI_SLOT: u8 = 2;

fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Adds the VGA to the machine: its ports, the 0xA0000 window, the PCI function with the
/// framebuffer BAR, and the PCI memory hole through which BARs are reached. The card
/// starts in 80x25 text mode with a font, as a VGA BIOS would leave it.
pub fn install(pc: &mut PcPlatform, phys: &mut PhysMem) -> Result<SharedVga, String> {
    let vga = Vga::try_new().map_err(|e| format!("cannot map the VGA framebuffer: {e}"))?;
    let vga: SharedVga = Arc::new(Mutex::new(vga));
    lock(&vga).bios_text_mode();
    let mut installed = lock(&INSTALLED);
    installed.retain(|w| w.strong_count() > 0);
    installed.push(Arc::downgrade(&vga));
    drop(installed);
    let bus = pc.io_bus_mut().ok_or("the I/O bus is already taken")?;
    vga::install_ports(bus, &vga).map_err(|e| e.to_string())?;
    phys.add_mmio(
        vga::LEGACY_BASE,
        vga::LEGACY_LEN,
        Box::new(VgaWindow(vga.clone())),
    );
    lock(&pc.pci)
        .add(
            VGA_PCI_SLOT,
            0,
            Arc::new(Mutex::new(VgaPci::new(vga.clone()))),
        )
        .map_err(|e| e.to_string())?;
    phys.add_mmio(PCI_MMIO_BASE, PCI_MMIO_LEN, pc.pci_mmio_window());
    // The framebuffer at BAR0's address as watched memory: guest stores go at RAM speed
    // and the MMU logs the pages they write (the run loop harvests them into the VGA).
    let fb = lock(&vga).framebuffer_memory();
    phys.add_watched(
        vga::DEFAULT_LFB_ADDR as u64,
        fb,
        Box::new(vga::LfbSink(vga.clone())),
    );
    Ok(vga)
}

/// Linux `vga=` values (VESA mode + 0x200) that morph86 turns into a linear framebuffer
/// for a direct kernel boot: (value, width, height, bits per pixel). The "24-bit" VESA
/// modes are given 32 bits per pixel, as QEMU's VGA BIOS does.
pub const LINUX_VESA_MODES: [(u16, u16, u16, u8); 8] = [
    (0x311, 640, 480, 16),
    (0x312, 640, 480, 32),
    (0x314, 800, 600, 16),
    (0x315, 800, 600, 32),
    (0x317, 1024, 768, 16),
    (0x318, 1024, 768, 32),
    (0x31a, 1280, 1024, 16),
    (0x31b, 1280, 1024, 32),
];

/// The framebuffer a kernel command line asks for with `vga=N` (decimal or 0x hex), if
/// any; no `vga=`, `vga=normal` or an unknown mode mean 80x25 text (vgacon).
pub fn linux_framebuffer(cmdline: &str) -> Option<(u16, u16, u8)> {
    let v = cmdline
        .split_whitespace()
        .filter_map(|a| a.strip_prefix("vga="))
        .next_back()?;
    let n = match v.strip_prefix("0x").or_else(|| v.strip_prefix("0X")) {
        Some(h) => u16::from_str_radix(h, 16).ok()?,
        None => v.parse().ok()?,
    };
    let m = LINUX_VESA_MODES.iter().find(|m| m.0 == n);
    if m.is_none() {
        log::warn!("vga={v}: not a mode morph86 offers; booting in text mode");
    }
    m.map(|&(_, w, h, b)| (w, h, b))
}

// boot_params.screen_info (arch/x86/include/uapi/linux/screen_info.h), offsets.
const SI_ORIG_VIDEO_MODE: usize = 0x06;
const SI_ORIG_VIDEO_COLS: usize = 0x07;
const SI_ORIG_VIDEO_EGA_BX: usize = 0x0a;
const SI_ORIG_VIDEO_LINES: usize = 0x0e;
const SI_ORIG_VIDEO_IS_VGA: usize = 0x0f;
const SI_ORIG_VIDEO_POINTS: usize = 0x10;
const SI_LFB_WIDTH: usize = 0x12;
const SI_LFB_HEIGHT: usize = 0x14;
const SI_LFB_DEPTH: usize = 0x16;
const SI_LFB_BASE: usize = 0x18;
const SI_LFB_SIZE: usize = 0x1c;
const SI_LFB_LINELENGTH: usize = 0x24;
const SI_RED_SIZE: usize = 0x26;
const SI_PAGES: usize = 0x32;
/// `orig_video_isVGA` for a VGA text console.
const VIDEO_TYPE_VGA: u8 = 0x01;
/// `orig_video_isVGA` for a VESA linear framebuffer (vesafb, simplefb/simpledrm).
const VIDEO_TYPE_VLFB: u8 = 0x23;

/// `boot_params.screen_info` (its first 0x40 bytes) for a direct Linux boot: VGA text
/// mode 3, 80x25 with 16-line characters (vgacon), or the VBE framebuffer `vga=` asked for
/// (vesafb / simpledrm); the VGA must have been put in that mode ([`linux_video_setup`]).
pub fn linux_screen_info(cmdline: &str) -> [u8; 0x40] {
    let mut si = [0u8; 0x40];
    let put16 =
        |si: &mut [u8; 0x40], o: usize, v: u16| si[o..o + 2].copy_from_slice(&v.to_le_bytes());
    match linux_framebuffer(cmdline) {
        None => {
            si[SI_ORIG_VIDEO_MODE] = 3;
            si[SI_ORIG_VIDEO_COLS] = 80;
            si[SI_ORIG_VIDEO_LINES] = 25;
            // INT 10h AH=12h BL=10h: BH=0 colour, BL=3 256 KiB: an EGA/VGA, not CGA.
            put16(&mut si, SI_ORIG_VIDEO_EGA_BX, 0x0003);
            si[SI_ORIG_VIDEO_IS_VGA] = VIDEO_TYPE_VGA;
            put16(&mut si, SI_ORIG_VIDEO_POINTS, 16);
        }
        Some((w, h, bpp)) => {
            let line = w as u32 * (bpp as u32 / 8);
            si[SI_ORIG_VIDEO_IS_VGA] = VIDEO_TYPE_VLFB;
            put16(&mut si, SI_LFB_WIDTH, w);
            put16(&mut si, SI_LFB_HEIGHT, h);
            put16(&mut si, SI_LFB_DEPTH, bpp as u16);
            si[SI_LFB_BASE..SI_LFB_BASE + 4].copy_from_slice(&vga::DEFAULT_LFB_ADDR.to_le_bytes());
            // In 64 KiB units for VESA framebuffers.
            let size = (vga::LFB_SIZE >> 16) as u32;
            si[SI_LFB_SIZE..SI_LFB_SIZE + 4].copy_from_slice(&size.to_le_bytes());
            put16(&mut si, SI_LFB_LINELENGTH, line as u16);
            // red size/pos, green size/pos, blue size/pos, reserved size/pos.
            let fields: [u8; 8] = if bpp == 16 {
                [5, 11, 6, 5, 5, 0, 0, 0]
            } else {
                [8, 16, 8, 8, 8, 0, 8, 24]
            };
            si[SI_RED_SIZE..SI_RED_SIZE + 8].copy_from_slice(&fields);
            put16(&mut si, SI_PAGES, 1);
        }
    }
    si
}

/// Before a direct Linux boot: puts the VGA in the VBE mode `vga=` asks for (there is no
/// BIOS to do it); leaves it in text mode otherwise.
pub fn linux_video_setup(vga: &SharedVga, cmdline: &str) {
    let Some((w, h, bpp)) = linux_framebuffer(cmdline) else {
        return;
    };
    let mut v = lock(vga);
    for (reg, val) in [
        (vga::VBE_INDEX_ENABLE, 0),
        (vga::VBE_INDEX_XRES, w),
        (vga::VBE_INDEX_YRES, h),
        (vga::VBE_INDEX_BPP, bpp as u16),
        (
            vga::VBE_INDEX_ENABLE,
            vga::VBE_ENABLED | vga::VBE_LFB_ENABLED,
        ),
    ] {
        v.vbe_select(reg);
        v.vbe_write(val);
    }
}

/// The VGAs [`install`] made, for [`machine_reset`].
static INSTALLED: Mutex<Vec<std::sync::Weak<Mutex<Vga>>>> = Mutex::new(Vec::new());

/// The machine was reset: the VGA goes back to power-on state, then to the text mode a
/// VGA BIOS would set up again.
pub fn machine_reset() {
    for v in lock(&INSTALLED).iter().filter_map(|w| w.upgrade()) {
        let mut v = lock(&v);
        v.reset();
        v.bios_text_mode();
    }
}

/// The VGA's picture as the host sees it.
pub struct Screen {
    vga: SharedVga,
    /// The latest rendered frame.
    pub frame: Frame,
    start: Instant,
}

impl Screen {
    /// A screen showing `vga`.
    pub fn new(vga: SharedVga) -> Self {
        Screen {
            vga,
            frame: Frame::default(),
            start: Instant::now(),
        }
    }

    /// Renders what changed since the last call; returns the changed area.
    pub fn refresh(&mut self) -> Option<vga::Rect> {
        let ms = self.start.elapsed().as_millis() as u64;
        lock(&self.vga).update(&mut self.frame, ms)
    }

    /// Writes the current frame as an RGB PNG.
    pub fn save_png(&self, path: &Path) -> Result<(), String> {
        save_png(&self.frame, path)
    }
}

/// Writes `frame` to `path` as an 8-bit RGB PNG.
pub fn save_png(frame: &Frame, path: &Path) -> Result<(), String> {
    let err =
        |e: &dyn std::fmt::Display| format!("cannot write screenshot {}: {e}", path.display());
    let file = std::fs::File::create(path).map_err(|e| err(&e))?;
    let mut enc = png::Encoder::new(
        std::io::BufWriter::new(file),
        frame.width as u32,
        frame.height as u32,
    );
    enc.set_color(png::ColorType::Rgb);
    enc.set_depth(png::BitDepth::Eight);
    let mut w = enc.write_header().map_err(|e| err(&e))?;
    let mut data = Vec::with_capacity(frame.pixels.len() * 3);
    for p in &frame.pixels {
        data.extend_from_slice(&[(p >> 16) as u8, (p >> 8) as u8, *p as u8]);
    }
    w.write_image_data(&data).map_err(|e| err(&e))?;
    w.finish().map_err(|e| err(&e))
}

/// Where host input goes: the keyboard controller, and the run loop's wake-up.
#[derive(Clone)]
pub struct Input {
    kbc: Arc<Mutex<I8042>>,
    wakeup: Wakeup,
}

impl Input {
    /// Input for `pc`.
    pub fn new(pc: &PcPlatform) -> Self {
        Input {
            kbc: pc.kbc.clone(),
            wakeup: pc.wakeup.clone(),
        }
    }

    /// A key went down or up (`code`: set 1 make code, 0xE0xx for extended keys).
    pub fn key(&self, code: u16, down: bool) {
        lock(&self.kbc).key_event(code, down);
        self.wakeup.notify();
    }

    /// The mouse moved (y up positive) or its buttons changed.
    pub fn mouse(&self, dx: i32, dy: i32, dz: i32, buttons: u8) {
        lock(&self.kbc).mouse_event(dx, dy, dz, buttons);
        self.wakeup.notify();
    }
}

/// Set 1 make code of the key that types `c` on a US keyboard without shift (for
/// `--send-keys`); `None` for characters that need shift or have no key.
pub fn set1_for_char(c: char) -> Option<u16> {
    const ROWS: [(&str, u16); 4] = [
        ("1234567890-=", 0x02),
        ("qwertyuiop[]", 0x10),
        ("asdfghjkl;'`", 0x1e),
        ("zxcvbnm,./", 0x2c),
    ];
    match c {
        '\n' => return Some(0x1c),
        ' ' => return Some(0x39),
        '\\' => return Some(0x2b),
        '\t' => return Some(0x0f),
        _ => {}
    }
    ROWS.iter()
        .find_map(|(row, base)| row.find(c).map(|i| base + i as u16))
}

/// What the user asked for.
pub struct DisplayOptions {
    /// Open an SDL window (else run headless).
    pub sdl: bool,
    /// Write the last frame here when the machine stops.
    pub screenshot: Option<PathBuf>,
    /// Type these characters on the emulated keyboard once the guest has run a while
    /// (`--send-keys`, for tests); with SDL they go through SDL's event queue.
    pub send_keys: Option<String>,
}

/// Whether a window can be opened here: the `sdl` feature is compiled in and there is a
/// display to open it on (X11, Wayland, or an explicit `SDL_VIDEODRIVER`).
pub fn window_available() -> bool {
    cfg!(feature = "sdl")
        && ["DISPLAY", "WAYLAND_DISPLAY", "SDL_VIDEODRIVER"]
            .iter()
            .any(|v| std::env::var_os(v).is_some_and(|s| !s.is_empty()))
}

/// Decides between a window and headless: `-display sdl` insists on a window,
/// `-display none` and `-nographic` refuse one, and by default there is a window when
/// [`window_available`].
pub fn wants_window(display: Option<crate::cli::Display>, nographic: bool) -> Result<bool, String> {
    use crate::cli::Display;
    match display {
        Some(Display::Sdl) if nographic => {
            Err("-display sdl and -nographic contradict each other".into())
        }
        Some(Display::Sdl) if !cfg!(feature = "sdl") => {
            Err("-display sdl: this morph86 was built without the `sdl` cargo feature".into())
        }
        Some(Display::Sdl) => Ok(true),
        Some(Display::None) => Ok(false),
        None => Ok(!nographic && window_available()),
    }
}

/// Where a `fw` x `fh` frame goes in a `ww` x `wh` window: (x, y, width, height) of the
/// largest rectangle with the frame's aspect ratio that fits, centred (bars on two sides
/// when the window's shape differs). Never empty, never outside the window (a window
/// smaller than a pixel in some direction gets a 1-pixel picture).
pub fn fit(fw: u32, fh: u32, ww: u32, wh: u32) -> (u32, u32, u32, u32) {
    let (fw, fh) = (u64::from(fw.max(1)), u64::from(fh.max(1)));
    let (ww64, wh64) = (u64::from(ww.max(1)), u64::from(wh.max(1)));
    // Compare ww/wh with fw/fh without rounding: the window is wider than the frame's
    // shape when ww * fh > wh * fw; then the height limits the picture.
    let (w, h) = if ww64 * fh > wh64 * fw {
        ((wh64 * fw / fh).max(1), wh64)
    } else {
        (ww64, (ww64 * fh / fw).max(1))
    };
    let (w, h) = (w as u32, h as u32);
    let (ww, wh) = (ww.max(1), wh.max(1));
    ((ww - w) / 2, (wh - h) / 2, w, h)
}

/// Delay before `--send-keys` starts typing, and between key strokes.
const SEND_KEYS_DELAY: Duration = Duration::from_millis(700);
const SEND_KEYS_GAP: Duration = Duration::from_millis(40);

/// Runs the display until `finished()` says the vCPU has stopped, or the user closes the
/// window (which sets `quit` and wakes the vCPU). Then writes the screenshot, if asked.
pub fn run(
    opts: &DisplayOptions,
    vga: SharedVga,
    input: Input,
    quit: Arc<AtomicBool>,
    finished: impl Fn() -> bool,
) -> Result<(), String> {
    let mut screen = Screen::new(vga);
    if opts.sdl {
        #[cfg(feature = "sdl")]
        if let Err(e) = sdl::run(opts, &mut screen, &input, &quit, &finished) {
            // No window after all: stop the guest rather than leave it running unseen.
            quit.store(true, Ordering::SeqCst);
            input.wakeup.notify();
            return Err(format!(
                "cannot open the SDL window: {e} (try -display none)"
            ));
        }
        #[cfg(not(feature = "sdl"))]
        return Err("this morph86 was built without the SDL window (cargo feature `sdl`)".into());
    } else {
        let start = Instant::now();
        let mut keys = opts
            .send_keys
            .clone()
            .unwrap_or_default()
            .chars()
            .collect::<Vec<_>>();
        keys.reverse();
        let mut next = start + SEND_KEYS_DELAY;
        while !finished() {
            if let Some(c) = keys.last().copied() {
                if Instant::now() >= next {
                    keys.pop();
                    if let Some(code) = set1_for_char(c) {
                        input.key(code, true);
                        input.key(code, false);
                    }
                    next = Instant::now() + SEND_KEYS_GAP;
                }
            }
            std::thread::sleep(Duration::from_millis(10));
        }
    }
    let _ = quit.load(Ordering::Relaxed);
    if let Some(path) = &opts.screenshot {
        screen.refresh();
        screen.save_png(path)?;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn set1_codes_for_typed_characters() {
        // IBM PC/AT set 1 make codes (keyboard scan code tables).
        assert_eq!(set1_for_char('a'), Some(0x1e));
        assert_eq!(set1_for_char('q'), Some(0x10));
        assert_eq!(set1_for_char('1'), Some(0x02));
        assert_eq!(set1_for_char('0'), Some(0x0b));
        assert_eq!(set1_for_char('m'), Some(0x32));
        assert_eq!(set1_for_char('/'), Some(0x35));
        assert_eq!(set1_for_char(' '), Some(0x39));
        assert_eq!(set1_for_char('\n'), Some(0x1c));
        assert_eq!(set1_for_char('A'), None);
    }

    #[test]
    fn screen_info_for_vgacon_and_for_a_framebuffer() {
        // Text: mode 3, 80x25, VGA, 16-dot font (what vgacon reads).
        let si = linux_screen_info("console=tty0 root=/dev/ram");
        assert_eq!((si[0x06], si[0x07], si[0x0e], si[0x0f]), (3, 80, 25, 1));
        assert_eq!(u16::from_le_bytes([si[0x10], si[0x11]]), 16);
        // vga=0x318 (VESA 0x118 + 0x200): 1024x768, "24-bit", given as 32 bpp.
        assert_eq!(linux_framebuffer("quiet vga=0x318"), Some((1024, 768, 32)));
        assert_eq!(linux_framebuffer("vga=791"), Some((1024, 768, 16)));
        assert_eq!(linux_framebuffer("vga=normal"), None);
        let si = linux_screen_info("vga=0x312");
        let u16_at = |o: usize| u16::from_le_bytes([si[o], si[o + 1]]);
        let u32_at = |o: usize| u32::from_le_bytes([si[o], si[o + 1], si[o + 2], si[o + 3]]);
        assert_eq!(si[0x0f], 0x23, "VIDEO_TYPE_VLFB");
        assert_eq!((u16_at(0x12), u16_at(0x14), u16_at(0x16)), (640, 480, 32));
        assert_eq!(u32_at(0x18), 0xe000_0000);
        assert_eq!(u16_at(0x24), 640 * 4);
        assert_eq!(&si[0x26..0x2e], &[8, 16, 8, 8, 8, 0, 8, 24]);
        // And the card is put in that mode.
        let vga: SharedVga = Arc::new(Mutex::new(Vga::new()));
        linux_video_setup(&vga, "vga=0x312");
        let mut f = Frame::default();
        lock(&vga).update(&mut f, 0);
        assert_eq!((f.width, f.height), (640, 480));
    }

    #[test]
    fn machine_reset_brings_the_vga_back_to_text_mode() {
        let mut pc = PcPlatform::new(morph86_devices::PlatformConfig::new(16 << 20)).unwrap();
        let mut phys = PhysMem::new(16 << 20).unwrap();
        let vga = install(&mut pc, &mut phys).unwrap();
        linux_video_setup(&vga, "vga=0x312");
        let mut f = Frame::default();
        lock(&vga).update(&mut f, 0);
        assert_eq!((f.width, f.height), (640, 480));
        machine_reset();
        lock(&vga).update(&mut f, 0);
        assert_eq!((f.width, f.height), (720, 400), "80x25 text, 9x16 cells");
        // The PCI function answers as 1234:1111 through configuration space.
        let mut bus = pc.take_io_bus().unwrap();
        use morph86_mmu::IoBus;
        bus.io_write(0xcf8, 4, 0x8000_0000 | (VGA_PCI_SLOT as u32) << 11);
        assert_eq!(bus.io_read(0xcfc, 4), 0x1111_1234);
    }

    #[test]
    fn resized_windows_keep_the_frame_aspect_ratio() {
        // Same size: the whole window.
        assert_eq!(fit(640, 480, 640, 480), (0, 0, 640, 480));
        // Twice as large: scaled by 2.
        assert_eq!(fit(640, 480, 1280, 960), (0, 0, 1280, 960));
        // A wide window: full height, 4:3 width centred, bars left and right.
        assert_eq!(fit(640, 480, 1920, 1080), (240, 0, 1440, 1080));
        // A tall window: full width, bars above and below.
        assert_eq!(fit(640, 480, 800, 1000), (0, 200, 800, 600));
        // 720x400 text (9:5) in a 4:3 window: 800x444, 78 pixels above and below.
        assert_eq!(fit(720, 400, 800, 600), (0, 78, 800, 444));
        // Smaller than the frame: scaled down.
        assert_eq!(fit(1024, 768, 320, 240), (0, 0, 320, 240));
        // Degenerate sizes stay inside the window and non-empty.
        assert_eq!(fit(640, 480, 0, 0), (0, 0, 1, 1));
        assert_eq!(fit(1920, 1, 10, 10), (0, 4, 10, 1));
        for (fw, fh) in [(640, 480), (720, 400), (1920, 1200), (8, 4096)] {
            for (ww, wh) in [(1, 1), (333, 777), (4000, 3), (1280, 1024)] {
                let (x, y, w, h) = fit(fw, fh, ww, wh);
                assert!(x + w <= ww && y + h <= wh && w >= 1 && h >= 1);
                // One side touches the window; the other is the exact scaled length
                // rounded down (or the 1-pixel minimum).
                let (fw, fh) = (fw as f64, fh as f64);
                if h == wh {
                    let exact = wh as f64 * fw / fh;
                    assert!(w == 1 || (exact - w as f64).abs() < 1.0, "{w} vs {exact}");
                } else {
                    assert_eq!(w, ww);
                    let exact = ww as f64 * fh / fw;
                    assert!(h == 1 || (exact - h as f64).abs() < 1.0, "{h} vs {exact}");
                }
            }
        }
    }

    /// A flat 32-bit CPU over `phys` running `code` at 0x10000 (CPL 0, paging off).
    fn flat_cpu(mut phys: PhysMem, code: &[u8]) -> morph86_cpu::Cpu {
        phys.write(0x10000, code);
        let mut cpu = morph86_cpu::Cpu::new(morph86_mmu::Mmu::new(phys));
        cpu.s.load_flat32(0x08, 0x10);
        cpu.s.rip = 0x10000;
        cpu.sync_paging();
        cpu
    }

    /// A flat 32-bit CPU running `code`, with `vga`'s framebuffer mapped at its BAR0
    /// address as watched memory, as the machine maps it.
    fn fb_machine(vga: &SharedVga, code: &[u8]) -> morph86_cpu::Cpu {
        let mut phys = PhysMem::new(4 << 20).unwrap();
        let fb = lock(vga).framebuffer_memory();
        phys.add_watched(
            vga::DEFAULT_LFB_ADDR as u64,
            fb,
            Box::new(vga::LfbSink(vga.clone())),
        );
        flat_cpu(phys, code)
    }

    /// Runs from 0x10000 until HLT under the JIT (`chunk` instructions a call) or the
    /// interpreter; panics after about `limit` instructions.
    fn run_to_hlt(
        cpu: &mut morph86_cpu::Cpu,
        jit: &mut Option<morph86_jit::Jit>,
        chunk: u64,
        limit: u64,
    ) {
        cpu.s.rip = 0x10000;
        cpu.s.halted = false;
        let calls = match jit {
            Some(_) => limit / chunk,
            None => limit,
        };
        for _ in 0..calls {
            let ev = match jit.as_mut() {
                Some(j) => j.run(cpu, chunk),
                None => cpu.step(),
            };
            if ev == morph86_cpu::StepEvent::Halted {
                return;
            }
        }
        panic!("no HLT within {limit} instructions");
    }

    /// Guest code filling framebuffer page 1 (0xE0001000, 1024 dwords) with EAX, then HLT.
    const FILL_PAGE_1: [u8; 24] = [
        0xbf, 0x00, 0x10, 0x00, 0xe0, // mov edi, 0xE0001000
        0xb8, 0x44, 0x33, 0x22, 0x11, // mov eax, 0x11223344
        0xb9, 0x00, 0x04, 0x00, 0x00, // mov ecx, 1024
        0x89, 0x07, // .l: mov [edi], eax
        0x83, 0xc7, 0x04, // add edi, 4
        0x49, // dec ecx
        0x75, 0xf8, // jnz .l
        0xf4, // hlt
    ];

    /// Both engines: stores to the framebuffer are logged (the first store to a clean
    /// page misses the fast path, the JIT's inline probe included), the harvest brings
    /// them to the display, and after a harvest the same stores are logged again.
    #[test]
    fn framebuffer_stores_reach_the_display_under_both_engines() {
        for jit in [false, true] {
            let vga: SharedVga = Arc::new(Mutex::new(Vga::new()));
            linux_video_setup(&vga, "vga=0x312");
            let mut cpu = fb_machine(&vga, &FILL_PAGE_1);
            let mut j = jit.then(|| morph86_jit::Jit::new(1 << 20).unwrap());
            let mut run = |cpu: &mut morph86_cpu::Cpu| run_to_hlt(cpu, &mut j, 100_000, 10_000_000);
            let mut f = Frame::default();
            lock(&vga).update(&mut f, 0);
            run(&mut cpu);
            // Pixels 1024..2047: rows 1 (x 384..639) and 2 (x 0..383) and 3 (0..127).
            assert_eq!(f.pixel(500, 1), 0, "nothing before the harvest");
            cpu.mmu.harvest_watched(false);
            assert!(lock(&vga).update(&mut f, 0).is_some(), "jit {jit}");
            assert_eq!(f.pixel(383, 1), 0, "jit {jit}");
            assert_eq!(f.pixel(384, 1), 0x223344, "jit {jit}");
            assert_eq!(f.pixel(127, 3), 0x223344, "jit {jit}");
            assert_eq!(f.pixel(128, 3), 0, "jit {jit}");
            // Again with another colour, after the harvest re-armed the page.
            let code_colour = 0x0055_6677u32;
            // The loop loads EAX itself: patch its immediate (a code write, which both
            // engines notice).
            cpu.mmu
                .write(0x10006, &code_colour.to_le_bytes(), false)
                .unwrap();
            run(&mut cpu);
            // The display's last update asked; the guest's thread answers. (The page's
            // TLB entry survived the harvest with its write tag made slow again: the
            // JIT's inline probe must miss on it for the page to be logged.)
            cpu.mmu.harvest_watched(false);
            lock(&vga).update(&mut f, 0);
            assert_eq!(f.pixel(384, 1), 0x556677, "jit {jit}: re-armed page logged");
        }
    }

    /// Code run from the framebuffer (odd, but a guest may) and then overwritten there
    /// runs as overwritten, under both engines.
    #[test]
    fn code_in_the_framebuffer_is_not_stale_after_a_store() {
        for jit in [false, true] {
            let vga: SharedVga = Arc::new(Mutex::new(Vga::new()));
            let lfb = vga::DEFAULT_LFB_ADDR as u64;
            // jmp 0xE0002000 (absolute, through EAX), and there: mov ebx, 1; hlt.
            let mut cpu = fb_machine(&vga, &[0xb8, 0x00, 0x20, 0x00, 0xe0, 0xff, 0xe0]);
            let code = [0xbb, 0x01, 0x00, 0x00, 0x00, 0xf4];
            cpu.mmu.write(lfb + 0x2000, &code, false).unwrap();
            let mut j = jit.then(|| morph86_jit::Jit::new(1 << 20).unwrap());
            let mut run = |cpu: &mut morph86_cpu::Cpu| {
                run_to_hlt(cpu, &mut j, 10, 10_000);
                cpu.s.gpr[3]
            };
            assert_eq!(run(&mut cpu), 1, "jit {jit}");
            // The guest overwrites the immediate, as a store (through the TLB).
            cpu.mmu.write_u8(lfb + 0x2001, 2, false).unwrap();
            assert_eq!(run(&mut cpu), 2, "jit {jit}");
            cpu.mmu.write_u8(lfb + 0x2001, 3, false).unwrap();
            assert_eq!(run(&mut cpu), 3, "jit {jit}");
        }
    }

    #[test]
    fn png_round_trip() {
        let frame = Frame {
            width: 3,
            height: 2,
            pixels: vec![0xff0000, 0x00ff00, 0x0000ff, 0x123456, 0, 0xffffff],
        };
        let path = std::env::temp_dir().join(format!("morph86-png-{}.png", std::process::id()));
        save_png(&frame, &path).unwrap();
        let dec = png::Decoder::new(std::fs::File::open(&path).unwrap());
        let mut r = dec.read_info().unwrap();
        let mut buf = vec![0; r.output_buffer_size()];
        let info = r.next_frame(&mut buf).unwrap();
        std::fs::remove_file(&path).ok();
        assert_eq!((info.width, info.height), (3, 2));
        assert_eq!(&buf[..6], &[0xff, 0, 0, 0, 0xff, 0]);
        assert_eq!(&buf[9..12], &[0x12, 0x34, 0x56]);
    }
}
