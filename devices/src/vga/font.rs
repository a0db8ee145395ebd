//! The power-on font: 256 glyphs of 8x16 (code page 437 layout), made from the public-domain
//! 8x8 glyphs of the `font8x8` crate by doubling every row. ASCII, the box-drawing and the
//! block characters are drawn; the other code points of CP437 are left blank.

use font8x8::legacy::{BASIC_LEGACY, BLOCK_LEGACY, BOX_LEGACY};
use std::sync::LazyLock;

/// CP437 0xB0-0xDF (shades, box drawing, blocks) as Unicode code points.
const CP437_B0: [u16; 48] = [
    0x2591, 0x2592, 0x2593, 0x2502, 0x2524, 0x2561, 0x2562, 0x2556, 0x2555, 0x2563, 0x2551, 0x2557,
    0x255d, 0x255c, 0x255b, 0x2510, 0x2514, 0x2534, 0x252c, 0x251c, 0x2500, 0x253c, 0x255e, 0x255f,
    0x255a, 0x2554, 0x2569, 0x2566, 0x2560, 0x2550, 0x256c, 0x2567, 0x2568, 0x2564, 0x2565, 0x2559,
    0x2558, 0x2552, 0x2553, 0x256b, 0x256a, 0x2518, 0x250c, 0x2588, 0x2584, 0x258c, 0x2590, 0x2580,
];

fn glyph8(ch: usize) -> [u8; 8] {
    match ch {
        0x00..=0x7f => BASIC_LEGACY[ch],
        0xb0..=0xdf => {
            let u = CP437_B0[ch - 0xb0] as usize;
            match u {
                0x2500..=0x257f => BOX_LEGACY[u - 0x2500],
                0x2580..=0x259f => BLOCK_LEGACY[u - 0x2580],
                _ => [0; 8],
            }
        }
        _ => [0; 8],
    }
}

/// 256 glyphs x 16 rows; in each row byte the most significant bit is the leftmost dot.
pub static FONT_8X16: LazyLock<[u8; 4096]> = LazyLock::new(|| {
    let mut f = [0u8; 4096];
    for ch in 0..256 {
        // font8x8 stores the leftmost dot in bit 0; the VGA wants it in bit 7.
        for (row, bits) in glyph8(ch).iter().enumerate() {
            let b = bits.reverse_bits();
            f[ch * 16 + row * 2] = b;
            f[ch * 16 + row * 2 + 1] = b;
        }
    }
    f
});

/// 256 glyphs x 8 rows (for 80x50 text).
pub static FONT_8X8: LazyLock<[u8; 2048]> = LazyLock::new(|| {
    let mut f = [0u8; 2048];
    for ch in 0..256 {
        for (row, bits) in glyph8(ch).iter().enumerate() {
            f[ch * 8 + row] = bits.reverse_bits();
        }
    }
    f
});
