//! The SDL2 window: a streaming texture updated with the VGA's changed rectangles, scaled
//! to the window (resizable, aspect kept), host keys as PS/2 set 1 codes, the mouse on
//! the PS/2 aux port while grabbed (click to grab, Ctrl-Alt-G to release, as in QEMU).

use super::{DisplayOptions, Input, Screen, SEND_KEYS_DELAY, SEND_KEYS_GAP};
use sdl2::event::Event;
use sdl2::keyboard::{Keycode, Mod, Scancode};
use sdl2::mouse::MouseButton;
use sdl2::pixels::PixelFormatEnum;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::{Duration, Instant};

/// Set 1 make code of a host key (`0xE0xx` for the extended keys of the AT keyboard).
pub fn set1_code(sc: Scancode) -> Option<u16> {
    use Scancode::*;
    Some(match sc {
        Escape => 0x01,
        Num1 => 0x02,
        Num2 => 0x03,
        Num3 => 0x04,
        Num4 => 0x05,
        Num5 => 0x06,
        Num6 => 0x07,
        Num7 => 0x08,
        Num8 => 0x09,
        Num9 => 0x0a,
        Num0 => 0x0b,
        Minus => 0x0c,
        Equals => 0x0d,
        Backspace => 0x0e,
        Tab => 0x0f,
        Q => 0x10,
        W => 0x11,
        E => 0x12,
        R => 0x13,
        T => 0x14,
        Y => 0x15,
        U => 0x16,
        I => 0x17,
        O => 0x18,
        P => 0x19,
        LeftBracket => 0x1a,
        RightBracket => 0x1b,
        Return => 0x1c,
        LCtrl => 0x1d,
        A => 0x1e,
        S => 0x1f,
        D => 0x20,
        F => 0x21,
        G => 0x22,
        H => 0x23,
        J => 0x24,
        K => 0x25,
        L => 0x26,
        Semicolon => 0x27,
        Apostrophe => 0x28,
        Grave => 0x29,
        LShift => 0x2a,
        Backslash => 0x2b,
        Z => 0x2c,
        X => 0x2d,
        C => 0x2e,
        V => 0x2f,
        B => 0x30,
        N => 0x31,
        M => 0x32,
        Comma => 0x33,
        Period => 0x34,
        Slash => 0x35,
        RShift => 0x36,
        KpMultiply => 0x37,
        LAlt => 0x38,
        Space => 0x39,
        CapsLock => 0x3a,
        F1 => 0x3b,
        F2 => 0x3c,
        F3 => 0x3d,
        F4 => 0x3e,
        F5 => 0x3f,
        F6 => 0x40,
        F7 => 0x41,
        F8 => 0x42,
        F9 => 0x43,
        F10 => 0x44,
        NumLockClear => 0x45,
        ScrollLock => 0x46,
        Kp7 => 0x47,
        Kp8 => 0x48,
        Kp9 => 0x49,
        KpMinus => 0x4a,
        Kp4 => 0x4b,
        Kp5 => 0x4c,
        Kp6 => 0x4d,
        KpPlus => 0x4e,
        Kp1 => 0x4f,
        Kp2 => 0x50,
        Kp3 => 0x51,
        Kp0 => 0x52,
        KpPeriod => 0x53,
        NonUsBackslash => 0x56,
        F11 => 0x57,
        F12 => 0x58,
        KpEnter => 0xe01c,
        RCtrl => 0xe01d,
        KpDivide => 0xe035,
        PrintScreen => 0xe037,
        RAlt => 0xe038,
        Home => 0xe047,
        Up => 0xe048,
        PageUp => 0xe049,
        Left => 0xe04b,
        Right => 0xe04d,
        End => 0xe04f,
        Down => 0xe050,
        PageDown => 0xe051,
        Insert => 0xe052,
        Delete => 0xe053,
        LGui => 0xe05b,
        RGui => 0xe05c,
        Application => 0xe05d,
        _ => return None,
    })
}

fn scancode_for_char(c: char) -> Option<Scancode> {
    match c {
        ' ' => Some(Scancode::Space),
        '\n' => Some(Scancode::Return),
        _ => Keycode::from_name(&c.to_string()).and_then(Scancode::from_keycode),
    }
}

/// Host keyboard and mouse as the guest gets them: keys always; the mouse, as PS/2 aux
/// motion and button reports, only while grabbed (click in the window to grab,
/// Ctrl-Alt-G to release, as in QEMU).
#[derive(Debug, Default)]
struct Pointer {
    grabbed: bool,
    /// Buttons held: bit 0 left, bit 1 right, bit 2 middle (the PS/2 packet's order).
    buttons: u8,
}

impl Pointer {
    /// Sends what `ev` means to the guest through `input`; returns `Some(grab)` when the
    /// window must take (true) or give back (false) the host mouse.
    fn event(&mut self, ev: &Event, input: &Input) -> Option<bool> {
        match *ev {
            Event::KeyDown {
                scancode: Some(Scancode::G),
                keymod,
                ..
            } if keymod.intersects(Mod::LCTRLMOD | Mod::RCTRLMOD)
                && keymod.intersects(Mod::LALTMOD | Mod::RALTMOD) =>
            {
                self.grabbed = false;
                return Some(false);
            }
            Event::KeyDown {
                scancode: Some(sc), ..
            } => {
                if let Some(code) = set1_code(sc) {
                    input.key(code, true);
                }
            }
            Event::KeyUp {
                scancode: Some(sc), ..
            } => {
                if let Some(code) = set1_code(sc) {
                    input.key(code, false);
                }
            }
            Event::MouseButtonDown { .. } if !self.grabbed => {
                // This click grabs the mouse; the guest does not see it.
                self.grabbed = true;
                return Some(true);
            }
            Event::MouseButtonDown { mouse_btn, .. } | Event::MouseButtonUp { mouse_btn, .. }
                if self.grabbed =>
            {
                let bit = match mouse_btn {
                    MouseButton::Left => 1,
                    MouseButton::Right => 2,
                    MouseButton::Middle => 4,
                    _ => 0,
                };
                if matches!(ev, Event::MouseButtonDown { .. }) {
                    self.buttons |= bit;
                } else {
                    self.buttons &= !bit;
                }
                input.mouse(0, 0, 0, self.buttons);
            }
            // SDL's y grows downwards, the PS/2 mouse's upwards.
            Event::MouseMotion { xrel, yrel, .. } if self.grabbed => {
                input.mouse(xrel, -yrel, 0, self.buttons)
            }
            // Wheel away from the user: SDL y > 0; IntelliMouse Z < 0.
            Event::MouseWheel { y, .. } if self.grabbed => input.mouse(0, 0, -y, self.buttons),
            _ => {}
        }
        None
    }
}

/// The window loop (see [`super::run`]).
pub(super) fn run(
    opts: &DisplayOptions,
    screen: &mut Screen,
    input: &Input,
    quit: &Arc<AtomicBool>,
    finished: &dyn Fn() -> bool,
) -> Result<(), String> {
    let ctx = sdl2::init()?;
    let video = ctx.video()?;
    let driver = video.current_video_driver();
    log::info!("SDL video driver: {driver}");
    // SDL falls back to its invisible drivers when no display server answers; a window
    // nobody can see is no window (unless the user asked for it, as tests do).
    if matches!(driver, "offscreen" | "dummy") && std::env::var_os("SDL_VIDEODRIVER").is_none() {
        return Err(format!(
            "no display server reachable (SDL fell back to '{driver}')"
        ));
    }
    let events = ctx.event()?;
    screen.refresh();
    let (mut w, mut h) = (screen.frame.width as u32, screen.frame.height as u32);
    let window = video
        .window("morph86", w, h)
        .position_centered()
        .resizable()
        .build()
        .map_err(|e| e.to_string())?;
    let mut canvas = window.into_canvas().build().map_err(|e| e.to_string())?;
    let tc = canvas.texture_creator();
    let mut texture = tc
        .create_texture_streaming(PixelFormatEnum::RGB888, w, h)
        .map_err(|e| e.to_string())?;
    upload(&mut texture, screen, None)?;
    let mut pump = ctx.event_pump()?;
    let mouse = ctx.mouse();
    let mut pointer = Pointer::default();
    let mut frames = 0u32;
    let mut last_title = Instant::now();
    let mut last_executed = super::GUEST_STATS.get().0;
    let mut keys: Vec<char> = opts
        .send_keys
        .clone()
        .unwrap_or_default()
        .chars()
        .rev()
        .collect();
    let mut next_key = Instant::now() + SEND_KEYS_DELAY;
    while !finished() {
        for ev in pump.poll_iter() {
            if let Event::Quit { .. } = ev {
                quit.store(true, Ordering::SeqCst);
                input.wakeup.notify();
            }
            if let Some(grab) = pointer.event(&ev, input) {
                mouse.set_relative_mouse_mode(grab);
            }
        }
        if let Some(c) = keys.last().copied() {
            if Instant::now() >= next_key {
                keys.pop();
                if let Some(sc) = scancode_for_char(c) {
                    for down in [true, false] {
                        let ev = if down {
                            Event::KeyDown {
                                timestamp: 0,
                                window_id: 0,
                                keycode: None,
                                scancode: Some(sc),
                                keymod: Mod::NOMOD,
                                repeat: false,
                            }
                        } else {
                            Event::KeyUp {
                                timestamp: 0,
                                window_id: 0,
                                keycode: None,
                                scancode: Some(sc),
                                keymod: Mod::NOMOD,
                                repeat: false,
                            }
                        };
                        events.push_event(ev)?;
                    }
                }
                next_key = Instant::now() + SEND_KEYS_GAP;
            }
        }
        let changed = screen.refresh();
        let (fw, fh) = (screen.frame.width as u32, screen.frame.height as u32);
        if (fw, fh) != (w, h) {
            (w, h) = (fw, fh);
            texture = tc
                .create_texture_streaming(PixelFormatEnum::RGB888, w, h)
                .map_err(|e| e.to_string())?;
            let _ = canvas.window_mut().set_size(w, h);
            upload(&mut texture, screen, None)?;
        } else if let Some(r) = changed {
            upload(&mut texture, screen, Some(r))?;
        }
        canvas.clear();
        let (ww, wh) = canvas.output_size()?;
        let (x, y, dw, dh) = super::fit(w, h, ww, wh);
        canvas.copy(
            &texture,
            None,
            Some(sdl2::rect::Rect::new(x as i32, y as i32, dw, dh)),
        )?;
        canvas.present();
        frames += 1;
        if last_title.elapsed() >= Duration::from_secs(1) {
            let (executed, halted) = super::GUEST_STATS.get();
            let mips = (executed - last_executed) as f64 / last_title.elapsed().as_secs_f64() / 1e6;
            last_executed = executed;
            let state = if quit.load(Ordering::Relaxed) {
                "stopping"
            } else if halted {
                "idle (HLT)"
            } else {
                "running"
            };
            let grab = if pointer.grabbed {
                " - Ctrl-Alt-G releases the mouse"
            } else {
                ""
            };
            let title =
                format!("morph86 - {state} - {mips:.1} MIPS - {w}x{h} - {frames} fps{grab}");
            let _ = canvas.window_mut().set_title(&title);
            frames = 0;
            last_title = Instant::now();
        }
        std::thread::sleep(Duration::from_millis(16));
    }
    Ok(())
}

/// Copies the frame (or just rectangle `r` of it) into the texture.
fn upload(
    texture: &mut sdl2::render::Texture,
    screen: &Screen,
    r: Option<morph86_devices::vga::Rect>,
) -> Result<(), String> {
    let f = &screen.frame;
    let r = r.unwrap_or(morph86_devices::vga::Rect {
        x: 0,
        y: 0,
        w: f.width,
        h: f.height,
    });
    if r.w == 0 || r.h == 0 {
        return Ok(());
    }
    if r.x + r.w > f.width || r.y + r.h > f.height || f.pixels.len() < f.width * f.height {
        return Err(format!(
            "changed area {r:?} outside the {}x{} frame",
            f.width, f.height
        ));
    }
    // The rectangle's rows inside the frame, read by SDL with a stride of one frame row:
    // from its first pixel to its last.
    let first = r.y * f.width + r.x;
    let last = (r.y + r.h - 1) * f.width + r.x + r.w;
    let px = &f.pixels[first..last];
    // SAFETY: u32 has no padding and every byte pattern is a valid u8; u8 needs no
    // alignment; the byte slice covers exactly the memory of `px` and borrows it.
    let bytes = unsafe { std::slice::from_raw_parts(px.as_ptr() as *const u8, px.len() * 4) };
    let rect = sdl2::rect::Rect::new(r.x as i32, r.y as i32, r.w as u32, r.h as u32);
    // SDL reads r.h rows of r.w pixels, `pitch` bytes apart, all inside `bytes` (checked
    // above); RGB888 is a native-endian 0x00RRGGBB word, the frame's own format.
    texture
        .update(rect, bytes, f.width * 4)
        .map_err(|e| e.to_string())
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Host cost of getting a full 640x480 frame and a one-scanline change into the SDL
    /// texture and onto the (offscreen) window. Run with
    /// `cargo test --release -p morph86 upload_costs -- --ignored --nocapture`.
    #[test]
    #[ignore]
    fn upload_costs() {
        std::env::set_var("SDL_VIDEODRIVER", "offscreen");
        let ctx = sdl2::init().unwrap();
        let video = ctx.video().unwrap();
        let window = video.window("t", 640, 480).build().unwrap();
        let mut canvas = window.into_canvas().build().unwrap();
        let tc = canvas.texture_creator();
        let mut tex = tc
            .create_texture_streaming(PixelFormatEnum::RGB888, 640, 480)
            .unwrap();
        let vga: morph86_devices::vga::SharedVga =
            std::sync::Arc::new(std::sync::Mutex::new(morph86_devices::vga::Vga::new()));
        let mut screen = Screen::new(vga);
        screen.frame = morph86_devices::vga::Frame {
            width: 640,
            height: 480,
            pixels: vec![0x123456; 640 * 480],
        };
        let n = 200;
        let mut time = |r: Option<morph86_devices::vga::Rect>| {
            let t = Instant::now();
            for _ in 0..n {
                upload(&mut tex, &screen, r).unwrap();
            }
            t.elapsed().as_secs_f64() * 1e6 / n as f64
        };
        let full = time(None);
        let line = time(Some(morph86_devices::vga::Rect {
            x: 0,
            y: 100,
            w: 640,
            h: 1,
        }));
        let t = Instant::now();
        for _ in 0..n {
            canvas.copy(&tex, None, None).unwrap();
            canvas.present();
        }
        let present = t.elapsed().as_secs_f64() * 1e6 / n as f64;
        println!(
            "SDL (offscreen) 640x480: texture upload full {full:.1} us, one scanline {line:.1} us; copy+present {present:.1} us"
        );
    }

    /// The guest's side of the PS/2 controller: enables the aux port and the mouse's
    /// data reporting, then reads aux bytes.
    struct Guest(morph86_devices::PortBus);
    impl Guest {
        fn new(pc: &mut morph86_devices::PcPlatform) -> Self {
            use morph86_mmu::IoBus;
            let mut g = Guest(pc.take_io_bus().unwrap());
            // 8042 command A8h: enable the aux interface; D4h: next data byte to the
            // mouse; F4h: Enable Data Reporting, answered with ACK FAh.
            g.0.io_write(0x64, 1, 0xa8);
            g.0.io_write(0x64, 1, 0xd4);
            g.0.io_write(0x60, 1, 0xf4);
            assert_eq!(g.aux_bytes(), vec![0xfa]);
            g
        }
        /// Every byte waiting in the output buffer that comes from the aux port.
        fn aux_bytes(&mut self) -> Vec<u8> {
            use morph86_mmu::IoBus;
            let mut v = Vec::new();
            // Status bit 0: output buffer full; bit 5: the byte is from the aux port.
            while self.0.io_read(0x64, 1) & 0x21 == 0x21 {
                v.push(self.0.io_read(0x60, 1) as u8);
            }
            v
        }
    }

    fn button(down: bool, b: MouseButton) -> Event {
        if down {
            Event::MouseButtonDown {
                timestamp: 0,
                window_id: 0,
                which: 0,
                mouse_btn: b,
                clicks: 1,
                x: 10,
                y: 10,
            }
        } else {
            Event::MouseButtonUp {
                timestamp: 0,
                window_id: 0,
                which: 0,
                mouse_btn: b,
                clicks: 1,
                x: 10,
                y: 10,
            }
        }
    }

    fn motion(xrel: i32, yrel: i32) -> Event {
        Event::MouseMotion {
            timestamp: 0,
            window_id: 0,
            which: 0,
            mousestate: sdl2::mouse::MouseState::from_sdl_state(0),
            x: 0,
            y: 0,
            xrel,
            yrel,
        }
    }

    /// SDL mouse events become PS/2 mouse packets (3 bytes: buttons with bit 3 always
    /// set and the X/Y sign bits 4/5, then X and Y as two's complement, Y up) on the
    /// 8042's aux port, only while the window has grabbed the mouse.
    #[test]
    fn sdl_mouse_events_become_ps2_aux_packets() {
        let mut pc =
            morph86_devices::PcPlatform::new(morph86_devices::PlatformConfig::new(16 << 20))
                .unwrap();
        let input = Input::new(&pc);
        let mut guest = Guest::new(&mut pc);
        let mut p = Pointer::default();
        // Not grabbed: motion is the host's; the first click grabs and is not sent.
        assert_eq!(p.event(&motion(5, 5), &input), None);
        assert_eq!(
            p.event(&button(true, MouseButton::Left), &input),
            Some(true)
        );
        assert_eq!(guest.aux_bytes(), Vec::<u8>::new());
        // Right 5, up 3 (SDL yrel -3).
        assert_eq!(p.event(&motion(5, -3), &input), None);
        assert_eq!(guest.aux_bytes(), vec![0x08, 5, 3]);
        // Left 2, down 7: both sign bits.
        p.event(&motion(-2, 7), &input);
        assert_eq!(guest.aux_bytes(), vec![0x38, 0xfe, 0xf9]);
        // Left button down, right button down, left up.
        p.event(&button(true, MouseButton::Left), &input);
        assert_eq!(guest.aux_bytes(), vec![0x09, 0, 0]);
        p.event(&button(true, MouseButton::Right), &input);
        assert_eq!(guest.aux_bytes(), vec![0x0b, 0, 0]);
        p.event(&button(false, MouseButton::Left), &input);
        assert_eq!(guest.aux_bytes(), vec![0x0a, 0, 0]);
        // Moving with the right button held.
        p.event(&motion(1, 0), &input);
        assert_eq!(guest.aux_bytes(), vec![0x0a, 1, 0]);
        // Ctrl-Alt-G releases the mouse: no more packets.
        let ctrl_alt_g = Event::KeyDown {
            timestamp: 0,
            window_id: 0,
            keycode: None,
            scancode: Some(Scancode::G),
            keymod: Mod::LCTRLMOD | Mod::LALTMOD,
            repeat: false,
        };
        assert_eq!(p.event(&ctrl_alt_g, &input), Some(false));
        p.event(&motion(4, 4), &input);
        assert_eq!(guest.aux_bytes(), Vec::<u8>::new());
    }

    #[test]
    fn extended_keys_get_the_e0_prefix() {
        // Set 1: cursor keys and the right-hand Ctrl/Alt are E0-prefixed (IBM AT tables).
        assert_eq!(set1_code(Scancode::Up), Some(0xe048));
        assert_eq!(set1_code(Scancode::Left), Some(0xe04b));
        assert_eq!(set1_code(Scancode::RCtrl), Some(0xe01d));
        assert_eq!(set1_code(Scancode::KpEnter), Some(0xe01c));
        assert_eq!(set1_code(Scancode::A), Some(0x1e));
        assert_eq!(set1_code(Scancode::F12), Some(0x58));
        assert_eq!(set1_code(Scancode::Kp8), Some(0x48));
    }
}
