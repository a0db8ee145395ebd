//! A minimal static ELF32 (i386) executable, made at run time so the host side needs no
//! 32-bit toolchain: one read/execute `PT_LOAD` for the code area (which also holds the
//! headers; file-backed in full so none of it is writable) and one read/write zero-filled `PT_LOAD` for the scratch data. The entry
//! point is an INT3: under `ptrace` the child stops at `execve` and never runs it.

use super::{CODE_BASE, CODE_RW, CODE_SIZE, DATA_BASE, DATA_SIZE};

/// ELF header size (ELF32).
const EHDR_SIZE: usize = 52;
/// Program header size (ELF32).
const PHDR_SIZE: usize = 32;
/// e_machine: Intel 80386.
const EM_386: u16 = 3;
/// e_type: executable.
const ET_EXEC: u16 = 2;
/// p_type: loadable segment.
const PT_LOAD: u32 = 1;
/// p_flags: execute.
const PF_X: u32 = 1;
/// p_flags: write.
const PF_W: u32 = 2;
/// p_flags: read.
const PF_R: u32 = 4;
/// Offset of the entry point in the file (and in the code area).
pub const ENTRY_OFFSET: u32 = 0x100;
/// File length: the whole code area is file-backed, so all of it is mapped read/execute
/// (the zero-filled tail of a segment, like .bss, would be mapped writable).
const FILE_LEN: usize = CODE_SIZE as usize;

fn put16(b: &mut Vec<u8>, v: u16) {
    b.extend_from_slice(&v.to_le_bytes());
}
fn put32(b: &mut Vec<u8>, v: u32) {
    b.extend_from_slice(&v.to_le_bytes());
}

/// The executable image.
pub fn image() -> Vec<u8> {
    let mut b = Vec::with_capacity(FILE_LEN);
    // e_ident: magic, ELFCLASS32, ELFDATA2LSB, EV_CURRENT, System V ABI.
    b.extend_from_slice(&[0x7f, b'E', b'L', b'F', 1, 1, 1, 0]);
    b.extend_from_slice(&[0; 8]);
    put16(&mut b, ET_EXEC);
    put16(&mut b, EM_386);
    put32(&mut b, 1); // e_version
    put32(&mut b, CODE_BASE + ENTRY_OFFSET); // e_entry
    put32(&mut b, EHDR_SIZE as u32); // e_phoff
    put32(&mut b, 0); // e_shoff
    put32(&mut b, 0); // e_flags
    put16(&mut b, EHDR_SIZE as u16);
    put16(&mut b, PHDR_SIZE as u16);
    put16(&mut b, 3); // e_phnum
    put16(&mut b, 0); // e_shentsize
    put16(&mut b, 0); // e_shnum
    put16(&mut b, 0); // e_shstrndx
                      // Code: file offset 0 mapped at CODE_BASE.
    for (vaddr, filesz, memsz, flags) in [
        (CODE_BASE, 0x1000, 0x1000, PF_R | PF_X),
        (
            CODE_RW,
            CODE_SIZE - 0x1000,
            CODE_SIZE - 0x1000,
            PF_R | PF_W | PF_X,
        ),
        (DATA_BASE, 0, DATA_SIZE, PF_R | PF_W),
    ] {
        put32(&mut b, PT_LOAD);
        put32(&mut b, if filesz == 0 { 0 } else { vaddr - CODE_BASE }); // p_offset
        put32(&mut b, vaddr);
        put32(&mut b, vaddr); // p_paddr
        put32(&mut b, filesz);
        put32(&mut b, memsz);
        put32(&mut b, flags);
        put32(&mut b, 0x1000); // p_align
    }
    b.resize(FILE_LEN, 0xcc);
    b
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn header_fields() {
        let b = image();
        assert_eq!(&b[..4], b"\x7fELF");
        assert_eq!(b[4], 1, "ELFCLASS32");
        assert_eq!(u16::from_le_bytes([b[18], b[19]]), EM_386);
        assert_eq!(
            u32::from_le_bytes([b[24], b[25], b[26], b[27]]),
            CODE_BASE + ENTRY_OFFSET
        );
        assert_eq!(b[ENTRY_OFFSET as usize], 0xcc);
        assert_eq!(b.len(), FILE_LEN);
    }
}
