//! Linux x86 boot protocol 2.x (the kernel's Documentation/arch/x86/boot.rst): load a
//! bzImage's protected-mode part at 1 MiB, fill `boot_params` (the "zero page") with the
//! setup header, an e820 map, the command line and the initrd, and enter at
//! `code32_start` with ESI pointing at `boot_params`.

use super::{memory_map, Entry32, LoadError};
use morph86_mmu::PhysMem;

/// Where `boot_params` goes.
pub const BOOT_PARAMS: u64 = 0x7000;
/// Where the command line goes.
pub const CMDLINE: u64 = 0x20000;
/// Largest command line we place (the area up to 0x30000 is free).
const CMDLINE_MAX: usize = 0xffff;

// Offsets in the setup header / boot_params (boot.rst, "The real-mode kernel header").
const OFF_SETUP_SECTS: usize = 0x1f1;
const OFF_HEADER_MAGIC: usize = 0x202;
const OFF_VERSION: usize = 0x206;
const OFF_TYPE_OF_LOADER: usize = 0x210;
const OFF_LOADFLAGS: usize = 0x211;
const OFF_CODE32_START: usize = 0x214;
const OFF_RAMDISK_IMAGE: usize = 0x218;
const OFF_RAMDISK_SIZE: usize = 0x21c;
const OFF_CMD_LINE_PTR: usize = 0x228;
const OFF_INITRD_ADDR_MAX: usize = 0x22c;
const OFF_CMDLINE_SIZE: usize = 0x238;
const OFF_VID_MODE: usize = 0x1fa;
// boot_params proper (arch/x86/include/uapi/asm/bootparam.h).
const BP_ALT_MEM_K: usize = 0x1e0;
const BP_E820_ENTRIES: usize = 0x1e8;
const BP_E820_TABLE: usize = 0x2d0;
/// loadflags bit 0: the protected-mode code is loaded at 0x100000.
const LOADED_HIGH: u8 = 0b0000_0001;

fn u16_at(b: &[u8], o: usize) -> u16 {
    u16::from_le_bytes([b[o], b[o + 1]])
}
fn u32_at(b: &[u8], o: usize) -> u32 {
    u32::from_le_bytes([b[o], b[o + 1], b[o + 2], b[o + 3]])
}

/// Whether `image` carries the bzImage setup header.
pub fn is_bzimage(image: &[u8]) -> bool {
    image.len() > OFF_HEADER_MAGIC + 4 && &image[OFF_HEADER_MAGIC..OFF_HEADER_MAGIC + 4] == b"HdrS"
}

/// Loads a bzImage and its initrd into `mem`; returns the 32-bit entry state.
pub fn load(
    mem: &mut PhysMem,
    name: &str,
    image: &[u8],
    initrd: Option<(&str, &[u8])>,
    cmdline: &str,
) -> Result<Entry32, LoadError> {
    if !is_bzimage(image) {
        return Err(LoadError::UnknownFormat(name.into()));
    }
    let version = u16_at(image, OFF_VERSION);
    if version < 0x0204 {
        return Err(LoadError::OldProtocol(
            name.into(),
            version >> 8,
            version & 0xff,
        ));
    }
    let mut setup_sects = image[OFF_SETUP_SECTS] as usize;
    if setup_sects == 0 {
        setup_sects = 4;
    }
    let setup_len = (setup_sects + 1) * 512;
    if image.len() <= setup_len {
        return Err(LoadError::Truncated(
            name.into(),
            "no protected-mode kernel after the setup code",
        ));
    }
    if image[OFF_LOADFLAGS] & LOADED_HIGH == 0 {
        return Err(LoadError::UnknownFormat(name.into()));
    }
    let ram = mem.ram_size();
    let kernel = &image[setup_len..];
    let kbase = 0x10_0000u64;
    if kbase + kernel.len() as u64 > ram {
        return Err(LoadError::DoesNotFit {
            what: format!("kernel {name}"),
            size: kernel.len() as u64,
            ram: ram >> 20,
        });
    }
    let cmdline_max = if version >= 0x0206 {
        (u32_at(image, OFF_CMDLINE_SIZE) as usize).min(CMDLINE_MAX)
    } else {
        255
    };
    if cmdline.len() > cmdline_max {
        return Err(LoadError::CmdlineTooLong(cmdline.len(), cmdline_max));
    }

    // boot_params: zeroed, then the setup header copied from the image.
    let mut bp = vec![0u8; 4096];
    let hdr_end = (0x202 + image[0x201] as usize).min(image.len()).min(4096);
    bp[OFF_SETUP_SECTS..hdr_end].copy_from_slice(&image[OFF_SETUP_SECTS..hdr_end]);
    bp[OFF_TYPE_OF_LOADER] = 0xff;
    bp[OFF_VID_MODE..OFF_VID_MODE + 2].copy_from_slice(&0xffffu16.to_le_bytes());
    bp[OFF_CMD_LINE_PTR..OFF_CMD_LINE_PTR + 4].copy_from_slice(&(CMDLINE as u32).to_le_bytes());
    let alt_k = ((ram - 0x10_0000) >> 10) as u32;
    bp[BP_ALT_MEM_K..BP_ALT_MEM_K + 4].copy_from_slice(&alt_k.to_le_bytes());
    // screen_info: VGA text (vgacon) or the framebuffer `vga=` asks for (display.rs).
    bp[..0x40].copy_from_slice(&crate::display::linux_screen_info(cmdline));
    let map = memory_map(ram);
    bp[BP_E820_ENTRIES] = map.len() as u8;
    for (i, (base, len, ty)) in map.iter().enumerate() {
        let o = BP_E820_TABLE + i * 20;
        bp[o..o + 8].copy_from_slice(&base.to_le_bytes());
        bp[o + 8..o + 16].copy_from_slice(&len.to_le_bytes());
        bp[o + 16..o + 20].copy_from_slice(&ty.to_le_bytes());
    }

    if let Some((iname, rd)) = initrd {
        let max = u32_at(image, OFF_INITRD_ADDR_MAX) as u64;
        let top = (max + 1).min(ram).min(0xffff_f000);
        let kend = (kbase + kernel.len() as u64 + 0xfff) & !0xfff;
        let size = rd.len() as u64;
        let addr = top.checked_sub(size).map(|a| a & !0xfff);
        match addr {
            Some(a) if a >= kend && !rd.is_empty() => {
                mem.write(a, rd);
                bp[OFF_RAMDISK_IMAGE..OFF_RAMDISK_IMAGE + 4]
                    .copy_from_slice(&(a as u32).to_le_bytes());
                bp[OFF_RAMDISK_SIZE..OFF_RAMDISK_SIZE + 4]
                    .copy_from_slice(&(size as u32).to_le_bytes());
            }
            _ if rd.is_empty() => {}
            _ => {
                return Err(LoadError::DoesNotFit {
                    what: format!("initrd {iname}"),
                    size,
                    ram: ram >> 20,
                })
            }
        }
    }

    mem.write(kbase, kernel);
    mem.write(BOOT_PARAMS, &bp);
    let mut cl = cmdline.as_bytes().to_vec();
    cl.push(0);
    mem.write(CMDLINE, &cl);
    Ok(Entry32 {
        eip: u32_at(image, OFF_CODE32_START),
        esi: BOOT_PARAMS as u32,
        cs: 0x10,
        ds: 0x18,
        ..Default::default()
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    fn fake_bzimage(kernel_len: usize) -> Vec<u8> {
        let mut img = vec![0u8; 5 * 512 + kernel_len];
        img[OFF_SETUP_SECTS] = 4;
        img[0x201] = 0x60;
        img[OFF_HEADER_MAGIC..OFF_HEADER_MAGIC + 4].copy_from_slice(b"HdrS");
        img[OFF_VERSION..OFF_VERSION + 2].copy_from_slice(&0x020fu16.to_le_bytes());
        img[OFF_LOADFLAGS] = LOADED_HIGH;
        img[OFF_CODE32_START..OFF_CODE32_START + 4].copy_from_slice(&0x10_0000u32.to_le_bytes());
        img[OFF_INITRD_ADDR_MAX..OFF_INITRD_ADDR_MAX + 4]
            .copy_from_slice(&0x7fff_ffffu32.to_le_bytes());
        img[OFF_CMDLINE_SIZE..OFF_CMDLINE_SIZE + 4].copy_from_slice(&2047u32.to_le_bytes());
        for (i, b) in img[5 * 512..].iter_mut().enumerate() {
            *b = i as u8;
        }
        img
    }

    #[test]
    fn loads_kernel_boot_params_and_initrd() {
        let mut mem = PhysMem::new(32 << 20).unwrap();
        let img = fake_bzimage(10000);
        let rd = vec![0x5a; 5000];
        let e = load(&mut mem, "k", &img, Some(("rd", &rd)), "console=ttyS0").unwrap();
        assert_eq!(
            (e.eip, e.esi, e.cs, e.ds),
            (0x10_0000, BOOT_PARAMS as u32, 0x10, 0x18)
        );
        let mut b = [0u8; 4];
        mem.read(0x10_0000 + 300, &mut b[..1]);
        assert_eq!(b[0], 300u32 as u8);
        mem.read(BOOT_PARAMS + OFF_RAMDISK_IMAGE as u64, &mut b);
        let rd_at = u32::from_le_bytes(b) as u64;
        assert_eq!(rd_at % 4096, 0);
        assert!(rd_at + 5000 <= 32 << 20);
        let mut x = [0u8; 1];
        mem.read(rd_at + 4999, &mut x);
        assert_eq!(x[0], 0x5a);
        let mut cl = [0u8; 14];
        mem.read(CMDLINE, &mut cl);
        assert_eq!(&cl, b"console=ttyS0\0");
        let mut n = [0u8; 1];
        mem.read(BOOT_PARAMS + BP_E820_ENTRIES as u64, &mut n);
        assert_eq!(n[0], 4);
    }

    #[test]
    fn rejects_bad_images() {
        let mut mem = PhysMem::new(8 << 20).unwrap();
        assert!(matches!(
            load(&mut mem, "k", b"hello", None, ""),
            Err(LoadError::UnknownFormat(_))
        ));
        let mut img = fake_bzimage(100);
        img.truncate(5 * 512);
        assert!(matches!(
            load(&mut mem, "k", &img, None, ""),
            Err(LoadError::Truncated(..))
        ));
        let img = fake_bzimage(100);
        let rd = vec![1u8; 8 << 20];
        assert!(matches!(
            load(&mut mem, "k", &img, Some(("rd", &rd)), ""),
            Err(LoadError::DoesNotFit { .. })
        ));
        let big = fake_bzimage(9 << 20);
        assert!(matches!(
            load(&mut mem, "k", &big, None, ""),
            Err(LoadError::DoesNotFit { .. })
        ));
        assert!(matches!(
            load(&mut mem, "k", &img, None, &"x".repeat(5000)),
            Err(LoadError::CmdlineTooLong(..))
        ));
        let mut old = fake_bzimage(100);
        old[OFF_VERSION..OFF_VERSION + 2].copy_from_slice(&0x0201u16.to_le_bytes());
        assert!(matches!(
            load(&mut mem, "k", &old, None, ""),
            Err(LoadError::OldProtocol(..))
        ));
    }
}
