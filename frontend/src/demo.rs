//! The built-in demo guest (`roms/demo/demo.asm`): what `morph86` boots when no
//! `-kernel` or `-bios` is given. It is loaded like a raw firmware image (`-bios`), so the
//! CPU starts it from the reset vector. Its binary is committed (`roms/demo/demo.bin`) and
//! compiled into the emulator; `roms/build.sh` rebuilds it, `roms/check.sh` checks it.

/// The demo image as committed: 64 KiB, reset vector in its last 16 bytes.
pub const IMAGE: &[u8] = include_bytes!("../../roms/demo/demo.bin");

/// Marks the demo's configuration block; the byte after it is the "no display" flag.
const SIGNATURE: &[u8] = b"M86DEMO!";

/// The name the loader reports for the demo image.
pub const NAME: &str = "built-in demo";

/// The image to load. With `headless` set the demo ends by itself after a few seconds
/// (it resets the machine, which the frontend runs with `-no-reboot`).
pub fn image(headless: bool) -> Vec<u8> {
    let mut img = IMAGE.to_vec();
    if let Some(p) = img.windows(SIGNATURE.len()).position(|w| w == SIGNATURE) {
        img[p + SIGNATURE.len()] = headless as u8;
    }
    img
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn image_is_a_firmware_with_a_far_jump_at_the_reset_vector() {
        assert_eq!(IMAGE.len(), 0x1_0000);
        // JMP ptr16:16 (EA iw iw) to segment F000, as the reset vector needs.
        let rv = &IMAGE[0xfff0..];
        assert_eq!(rv[0], 0xea);
        assert_eq!(u16::from_le_bytes([rv[3], rv[4]]), 0xf000);
    }

    /// CI's check that roms/demo/demo.bin is what roms/build.sh makes of demo.asm.
    #[test]
    fn committed_binary_is_reproducible() {
        use std::process::Command;
        if Command::new("nasm").arg("-v").output().is_err() {
            eprintln!("nasm not installed: reproducibility check skipped");
            return;
        }
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../roms/check.sh");
        let out = Command::new("sh").arg(script).output().unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
    }

    #[test]
    fn headless_flag_is_patched() {
        let p = IMAGE.windows(8).position(|w| w == SIGNATURE).unwrap();
        assert_eq!(image(true)[p + 8], 1);
        assert_eq!(image(false)[p + 8], 0);
    }
}
