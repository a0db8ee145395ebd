//! The screen: wiring the VGA into the machine, and showing it (an SDL window with the
//! `sdl` cargo feature, on by default) or not (`-display none`), with `--screenshot
//! FILE.png` written when the machine stops.
//!
//! Threads: the vCPU runs on its own thread; the display loop runs on the main thread
//! (SDL wants its events there), renders the VGA about 60 times a second, and turns host
//! keys and mouse motion into PS/2 input through the i8042.

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

/// PCI slot of the VGA (00:02.0, where QEMU puts it).
pub const VGA_PCI_SLOT: u8 = 2;

fn lock<T: ?Sized>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|e| e.into_inner())
}

/// Adds the VGA to the machine: its ports, the 0xA0000 window, the PCI function with the
/// framebuffer BAR, and the PCI memory hole through which BARs are reached. The card
/// starts in 80x25 text mode with a font, as a VGA BIOS would leave it.
pub fn install(pc: &mut PcPlatform, phys: &mut PhysMem) -> Result<SharedVga, String> {
    let vga: SharedVga = Arc::new(Mutex::new(Vga::new()));
    lock(&vga).bios_text_mode();
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
    Ok(vga)
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
        sdl::run(opts, &mut screen, &input, &quit, &finished)?;
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
