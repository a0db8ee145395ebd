//! Multiboot v1 (the GNU Multiboot Specification 0.6.96): for test kernels. Supports ELF32
//! images and the "a.out kludge" (header flag bit 16), modules, the memory map, the
//! command line and the boot-loader name.

use super::{memory_map, Entry32, LoadError};
use morph86_mmu::PhysMem;

/// Multiboot header magic.
pub const HEADER_MAGIC: u32 = 0x1bad_b002;
/// Value in EAX at entry.
pub const BOOT_MAGIC: u32 = 0x2bad_b002;
/// Where the multiboot_info structure goes.
pub const INFO: u64 = 0x9000;
/// Header flag bit 16: the address fields of the header are valid (a.out kludge).
const FLAG_AOUT_KLUDGE: u32 = 1 << 16;
// multiboot_info.flags bits.
const MI_MEM: u32 = 1 << 0;
const MI_CMDLINE: u32 = 1 << 2;
const MI_MODS: u32 = 1 << 3;
const MI_MMAP: u32 = 1 << 6;
const MI_LOADER_NAME: u32 = 1 << 9;

fn u32_at(b: &[u8], o: usize) -> Option<u32> {
    b.get(o..o + 4)
        .map(|s| u32::from_le_bytes([s[0], s[1], s[2], s[3]]))
}
fn u16_at(b: &[u8], o: usize) -> Option<u16> {
    b.get(o..o + 2).map(|s| u16::from_le_bytes([s[0], s[1]]))
}

/// Finds the Multiboot header: offset and flags.
pub fn find_header(image: &[u8]) -> Option<(usize, u32)> {
    let end = image.len().min(8192);
    (0..end.saturating_sub(11)).step_by(4).find_map(|o| {
        let magic = u32_at(image, o)?;
        let flags = u32_at(image, o + 4)?;
        let sum = u32_at(image, o + 8)?;
        (magic == HEADER_MAGIC && magic.wrapping_add(flags).wrapping_add(sum) == 0)
            .then_some((o, flags))
    })
}

/// Loads a Multiboot kernel and its modules (`(name, data, command line)`).
pub fn load(
    mem: &mut PhysMem,
    name: &str,
    image: &[u8],
    modules: &[(String, Vec<u8>, String)],
    cmdline: &str,
) -> Result<Entry32, LoadError> {
    let bad = |why: &str| LoadError::BadMultiboot(name.into(), why.into());
    let (hoff, flags) = find_header(image).ok_or_else(|| LoadError::UnknownFormat(name.into()))?;
    let ram = mem.ram_size();
    let fits = |a: u64, len: u64| a >= 0x1000 && a.checked_add(len).is_some_and(|e| e <= ram);
    let (entry, kend) = if flags & FLAG_AOUT_KLUDGE != 0 {
        let f = |i: usize| u32_at(image, hoff + 12 + i * 4).ok_or_else(|| bad("header truncated"));
        let (header_addr, load_addr, load_end, bss_end, entry) =
            (f(0)?, f(1)?, f(2)?, f(3)?, f(4)?);
        if header_addr < load_addr || (header_addr - load_addr) as usize > hoff {
            return Err(bad("header_addr below load_addr or beyond the file"));
        }
        let file_off = hoff - (header_addr - load_addr) as usize;
        let len = if load_end == 0 {
            image.len() - file_off
        } else {
            load_end
                .checked_sub(load_addr)
                .ok_or_else(|| bad("load_end_addr < load_addr"))? as usize
        };
        let data = image
            .get(file_off..file_off + len)
            .ok_or(LoadError::Truncated(
                name.into(),
                "load_end_addr past the end of the file",
            ))?;
        let end = if bss_end > load_addr + len as u32 {
            bss_end
        } else {
            load_addr + len as u32
        };
        if !fits(load_addr as u64, (end - load_addr) as u64) {
            return Err(LoadError::DoesNotFit {
                what: format!("kernel {name}"),
                size: (end - load_addr) as u64,
                ram: ram >> 20,
            });
        }
        mem.write(load_addr as u64, data);
        let zeros = vec![0u8; (end - load_addr) as usize - len];
        mem.write(load_addr as u64 + len as u64, &zeros);
        (entry, end as u64)
    } else {
        load_elf(mem, name, image)?
    };

    // Modules after the kernel, page aligned, then the info structure's strings.
    let mut next = (kend + 0xfff) & !0xfff;
    let mut mods = Vec::new();
    for (mname, data, args) in modules {
        if !fits(next, data.len() as u64) {
            return Err(LoadError::DoesNotFit {
                what: format!("module {mname}"),
                size: data.len() as u64,
                ram: ram >> 20,
            });
        }
        mem.write(next, data);
        mods.push((next, next + data.len() as u64, args.clone()));
        next = (next + data.len() as u64 + 0xfff) & !0xfff;
    }
    let mut strings = INFO + 0x400;
    let mut put_str = |mem: &mut PhysMem, s: &str| -> u32 {
        let at = strings;
        mem.write(at, s.as_bytes());
        mem.write(at + s.len() as u64, &[0]);
        strings += s.len() as u64 + 1;
        at as u32
    };
    if cmdline.len() > 2048 || modules.iter().map(|m| m.2.len() + 1).sum::<usize>() > 2048 {
        return Err(LoadError::CmdlineTooLong(cmdline.len(), 2048));
    }
    let mut info = [0u8; 88];
    let mut set = |o: usize, v: u32| info[o..o + 4].copy_from_slice(&v.to_le_bytes());
    let mut mi_flags = MI_MEM | MI_CMDLINE | MI_MMAP | MI_LOADER_NAME;
    set(4, 640);
    set(8, ((ram - 0x10_0000) >> 10) as u32);
    let cl = put_str(mem, cmdline);
    set(16, cl);
    if !mods.is_empty() {
        mi_flags |= MI_MODS;
        let mods_at = INFO + 0x200;
        for (i, (s, e, args)) in mods.iter().enumerate() {
            let sp = put_str(mem, args);
            let mut m = [0u8; 16];
            m[0..4].copy_from_slice(&(*s as u32).to_le_bytes());
            m[4..8].copy_from_slice(&(*e as u32).to_le_bytes());
            m[8..12].copy_from_slice(&sp.to_le_bytes());
            mem.write(mods_at + i as u64 * 16, &m);
        }
        set(20, mods.len() as u32);
        set(24, mods_at as u32);
    }
    let mmap_at = INFO + 0x100;
    let map = memory_map(ram);
    for (i, (base, len, ty)) in map.iter().enumerate() {
        let mut e = [0u8; 24];
        e[0..4].copy_from_slice(&20u32.to_le_bytes());
        e[4..12].copy_from_slice(&base.to_le_bytes());
        e[12..20].copy_from_slice(&len.to_le_bytes());
        e[20..24].copy_from_slice(&ty.to_le_bytes());
        mem.write(mmap_at + i as u64 * 24, &e);
    }
    set(44, (map.len() * 24) as u32);
    set(48, mmap_at as u32);
    let ln = put_str(mem, "morph86");
    set(64, ln);
    set(0, mi_flags);
    mem.write(INFO, &info);
    Ok(Entry32 {
        eip: entry,
        eax: BOOT_MAGIC,
        ebx: INFO as u32,
        cs: 0x08,
        ds: 0x18,
        ..Default::default()
    })
}

/// Loads the PT_LOAD segments of an ELF32 i386 executable; returns (entry, end of image).
fn load_elf(mem: &mut PhysMem, name: &str, image: &[u8]) -> Result<(u32, u64), LoadError> {
    let bad = |why: &str| LoadError::BadMultiboot(name.into(), why.into());
    if image.len() < 52 || &image[0..4] != b"\x7fELF" {
        return Err(bad("no a.out kludge and not an ELF file"));
    }
    if image[4] != 1 || image[5] != 1 || u16_at(image, 18) != Some(3) {
        return Err(bad("not a little-endian 32-bit i386 ELF"));
    }
    let entry = u32_at(image, 24).unwrap_or(0);
    let phoff = u32_at(image, 28).unwrap_or(0) as usize;
    let phentsize = u16_at(image, 42).unwrap_or(0) as usize;
    let phnum = u16_at(image, 44).unwrap_or(0) as usize;
    if phentsize < 32 || phnum == 0 || phnum > 64 {
        return Err(bad("bad program header table"));
    }
    let ram = mem.ram_size();
    let mut end = 0u64;
    for i in 0..phnum {
        let o = phoff
            .checked_add(i * phentsize)
            .ok_or_else(|| bad("program header offset overflows"))?;
        let f = |k: usize| {
            u32_at(image, o + k * 4).ok_or(LoadError::Truncated(name.into(), "program headers"))
        };
        if f(0)? != 1 {
            continue; // not PT_LOAD
        }
        let (off, paddr, filesz, memsz) =
            (f(1)? as usize, f(3)? as u64, f(4)? as usize, f(5)? as u64);
        if memsz < filesz as u64 {
            return Err(bad("segment memsz < filesz"));
        }
        if paddr < 0x1000 || paddr + memsz > ram {
            return Err(LoadError::DoesNotFit {
                what: format!("segment at {paddr:#x} of {name}"),
                size: memsz,
                ram: ram >> 20,
            });
        }
        let data = image
            .get(off..off.saturating_add(filesz))
            .ok_or(LoadError::Truncated(
                name.into(),
                "segment data past the end of the file",
            ))?;
        mem.write(paddr, data);
        mem.write(
            paddr + filesz as u64,
            &vec![0u8; (memsz - filesz as u64) as usize],
        );
        end = end.max(paddr + memsz);
    }
    if end == 0 {
        return Err(bad("no loadable segment"));
    }
    Ok((entry, end))
}

#[cfg(test)]
mod tests {
    use super::*;

    fn aout_kernel() -> Vec<u8> {
        // Header at offset 0, image loaded at 1 MiB, entry at 1 MiB + 0x40, 4 KiB bss.
        let mut img = vec![0u8; 0x100];
        let flags = FLAG_AOUT_KLUDGE;
        let words = [
            HEADER_MAGIC,
            flags,
            0u32.wrapping_sub(HEADER_MAGIC.wrapping_add(flags)),
            0x10_0000,
            0x10_0000,
            0,
            0x10_2000,
            0x10_0040,
        ];
        for (i, w) in words.iter().enumerate() {
            img[i * 4..i * 4 + 4].copy_from_slice(&w.to_le_bytes());
        }
        img[0x40] = 0xf4;
        img
    }

    #[test]
    fn aout_kludge_with_module() {
        let mut mem = PhysMem::new(4 << 20).unwrap();
        let mods = vec![("m".to_string(), vec![7u8; 100], "m arg".to_string())];
        let e = load(&mut mem, "k", &aout_kernel(), &mods, "hello").unwrap();
        assert_eq!((e.eip, e.eax, e.ebx), (0x10_0040, BOOT_MAGIC, INFO as u32));
        let mut b = [0u8; 88];
        mem.read(INFO, &mut b);
        let w = |o: usize| u32::from_le_bytes(b[o..o + 4].try_into().unwrap());
        assert_eq!(
            w(0) & (MI_MEM | MI_MODS | MI_MMAP),
            MI_MEM | MI_MODS | MI_MMAP
        );
        assert_eq!(w(8), (3 << 20) >> 10);
        assert_eq!(w(20), 1);
        let mut m = [0u8; 16];
        mem.read(w(24) as u64, &mut m);
        let start = u32::from_le_bytes(m[0..4].try_into().unwrap());
        assert_eq!(
            start, 0x10_2000,
            "module placed after the bss, page aligned"
        );
    }

    #[test]
    fn rejects_garbage() {
        let mut mem = PhysMem::new(4 << 20).unwrap();
        assert!(matches!(
            load(&mut mem, "k", &[0u8; 100], &[], ""),
            Err(LoadError::UnknownFormat(_))
        ));
        let mut img = aout_kernel();
        // load_end before load_addr
        img[20..24].copy_from_slice(&0x1000u32.to_le_bytes());
        assert!(load(&mut mem, "k", &img, &[], "").is_err());
    }
}
