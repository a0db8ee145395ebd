//! Raw firmware images (`-bios`): mapped read-only at the top of the 4 GiB space, with
//! the last 128 KiB (or the whole image if smaller) aliased just below 1 MiB, as a PC's
//! chipset does; the CPU starts at the reset vector F000:FFF0.

use super::LoadError;
use morph86_mmu::PhysMem;

/// Maps `image` as the system firmware.
pub fn load(mem: &mut PhysMem, name: &str, image: &[u8]) -> Result<(), LoadError> {
    let len = image.len() as u64;
    if !(0x1_0000..=16 << 20).contains(&len) || !len.is_multiple_of(0x1_0000) {
        return Err(LoadError::BadFirmware(name.into(), len));
    }
    mem.add_rom((1u64 << 32) - len, image.to_vec());
    let alias = len.min(128 << 10);
    mem.add_rom(0x10_0000 - alias, image[(len - alias) as usize..].to_vec());
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn maps_top_and_alias() {
        let mut mem = PhysMem::new(2 << 20).unwrap();
        let mut img = vec![0u8; 0x2_0000];
        img[0x1_fff0] = 0xea;
        load(&mut mem, "bios", &img).unwrap();
        let mut b = [0u8];
        mem.read(0xffff_fff0, &mut b);
        assert_eq!(b[0], 0xea);
        mem.read(0xf_fff0, &mut b);
        assert_eq!(b[0], 0xea);
        assert!(load(&mut mem, "bios", &[0u8; 1000]).is_err());
    }
}
