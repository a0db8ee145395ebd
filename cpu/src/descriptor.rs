//! Segment and gate descriptors (Intel SDM vol. 3, sections 3.4.5 and 5.8-5.12, 7.2).
//!
//! A descriptor is kept as its raw 8 bytes; the accessors decode the fields. Tables are
//! read with supervisor privilege through `Cpu::read_desc` in `segmentation.rs`.

use crate::state::*;

// System descriptor types (the 4-bit type field with S = 0).
/// Available 16-bit TSS.
pub const SYS_TSS16_AVAIL: u8 = 0x1;
/// LDT.
pub const SYS_LDT: u8 = 0x2;
/// Busy 16-bit TSS.
pub const SYS_TSS16_BUSY: u8 = 0x3;
/// 16-bit call gate.
pub const SYS_CALL16: u8 = 0x4;
/// Task gate.
pub const SYS_TASK: u8 = 0x5;
/// 16-bit interrupt gate.
pub const SYS_INT16: u8 = 0x6;
/// 16-bit trap gate.
pub const SYS_TRAP16: u8 = 0x7;
/// Available 32-bit TSS.
pub const SYS_TSS32_AVAIL: u8 = 0x9;
/// Busy 32-bit TSS.
pub const SYS_TSS32_BUSY: u8 = 0xb;
/// 32-bit call gate.
pub const SYS_CALL32: u8 = 0xc;
/// 32-bit interrupt gate.
pub const SYS_INT32: u8 = 0xe;
/// 32-bit trap gate.
pub const SYS_TRAP32: u8 = 0xf;
/// TSS type bit 1: busy.
pub const TSS_BUSY_BIT: u8 = 0x2;
/// System type bit 3: a 32-bit TSS or gate (clear: the 80286 16-bit form).
pub const SYS_32BIT: u8 = 0x8;

/// A raw 8-byte descriptor.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Default)]
pub struct Descriptor(pub u64);

impl Descriptor {
    /// Segment base (bits 16-39 and 56-63).
    #[inline]
    pub fn base(&self) -> u32 {
        (((self.0 >> 16) & 0xff_ffff) | (((self.0 >> 56) & 0xff) << 24)) as u32
    }
    /// The 20-bit limit field as written.
    #[inline]
    pub fn raw_limit(&self) -> u32 {
        ((self.0 & 0xffff) | (((self.0 >> 48) & 0xf) << 16)) as u32
    }
    /// Byte-granular limit (scaled by G).
    #[inline]
    pub fn limit(&self) -> u32 {
        let l = self.raw_limit();
        if self.0 & (1 << 55) != 0 {
            (l << 12) | 0xfff
        } else {
            l
        }
    }
    /// Attributes in the `ATTR_*` layout (descriptor bits 40-47 and 52-55).
    #[inline]
    pub fn attrs(&self) -> u32 {
        (((self.0 >> 40) & 0xff) | (((self.0 >> 52) & 0xf) << 8)) as u32
    }
    /// The 4-bit type field.
    #[inline]
    pub fn typ(&self) -> u8 {
        ((self.0 >> 40) & 0xf) as u8
    }
    /// S: code or data segment (not a system descriptor).
    #[inline]
    pub fn is_seg(&self) -> bool {
        self.attrs() & ATTR_S != 0
    }
    /// Code segment.
    #[inline]
    pub fn is_code(&self) -> bool {
        self.is_seg() && self.attrs() & ATTR_CODE != 0
    }
    /// Data segment.
    #[inline]
    pub fn is_data(&self) -> bool {
        self.is_seg() && self.attrs() & ATTR_CODE == 0
    }
    /// Conforming code segment.
    #[inline]
    pub fn conforming(&self) -> bool {
        self.is_code() && self.attrs() & ATTR_EC != 0
    }
    /// Readable code or any data segment.
    #[inline]
    pub fn readable(&self) -> bool {
        self.is_data() || (self.is_code() && self.attrs() & ATTR_RW != 0)
    }
    /// Writable data segment.
    #[inline]
    pub fn writable_data(&self) -> bool {
        self.is_data() && self.attrs() & ATTR_RW != 0
    }
    /// Descriptor privilege level.
    #[inline]
    pub fn dpl(&self) -> u8 {
        ((self.0 >> 45) & 3) as u8
    }
    /// P: present.
    #[inline]
    pub fn present(&self) -> bool {
        self.0 & (1 << 47) != 0
    }
    /// D/B bit.
    #[inline]
    pub fn big(&self) -> bool {
        self.0 & (1 << 54) != 0
    }
    /// Accessed bit (type bit 0) of a code or data segment.
    #[inline]
    pub fn accessed(&self) -> bool {
        self.0 & (1 << 40) != 0
    }
    /// The segment cache this descriptor loads for `selector`.
    pub fn to_segment(&self, selector: u16) -> Segment {
        Segment {
            base: self.base() as u64,
            limit: self.limit(),
            attrs: self.attrs(),
            selector,
        }
    }
    /// System type, when this is a system descriptor.
    #[inline]
    pub fn sys_type(&self) -> Option<u8> {
        if self.is_seg() {
            None
        } else {
            Some(self.typ())
        }
    }
    /// A TSS descriptor (available or busy, 16 or 32 bit).
    #[inline]
    pub fn is_tss(&self) -> bool {
        matches!(
            self.sys_type(),
            Some(SYS_TSS16_AVAIL | SYS_TSS16_BUSY | SYS_TSS32_AVAIL | SYS_TSS32_BUSY)
        )
    }
    /// A busy TSS.
    #[inline]
    pub fn tss_busy(&self) -> bool {
        matches!(self.sys_type(), Some(SYS_TSS16_BUSY | SYS_TSS32_BUSY))
    }
    /// A 32-bit TSS or gate (type bit 3).
    #[inline]
    pub fn sys32(&self) -> bool {
        self.typ() & SYS_32BIT != 0
    }
    /// Gates: the target selector (bits 16-31).
    #[inline]
    pub fn gate_selector(&self) -> u16 {
        (self.0 >> 16) as u16
    }
    /// Gates: the target offset (bits 0-15 and, for 32-bit gates, 48-63).
    #[inline]
    pub fn gate_offset(&self) -> u32 {
        let lo = (self.0 & 0xffff) as u32;
        if self.sys32() {
            lo | (((self.0 >> 48) & 0xffff) as u32) << 16
        } else {
            lo
        }
    }
    /// Call gates: the parameter count (bits 32-36).
    #[inline]
    pub fn gate_params(&self) -> u32 {
        ((self.0 >> 32) & 0x1f) as u32
    }
    /// Builds a code/data descriptor (for tests and firmware set-up): `access` is byte 5
    /// (P, DPL, S, type), `flags` the high nibble of byte 6 (G, D/B, L, AVL).
    pub fn segment(base: u32, limit: u32, access: u8, flags: u8) -> Descriptor {
        let b = base as u64;
        let l = limit as u64;
        Descriptor(
            (l & 0xffff)
                | ((b & 0xff_ffff) << 16)
                | ((access as u64) << 40)
                | (((l >> 16) & 0xf) << 48)
                | (((flags & 0xf) as u64) << 52)
                | (((b >> 24) & 0xff) << 56),
        )
    }
    /// Builds a gate descriptor: `access` is byte 5 (P, DPL, type), `params` the call
    /// gate parameter count.
    pub fn gate(selector: u16, offset: u32, access: u8, params: u8) -> Descriptor {
        let o = offset as u64;
        Descriptor(
            (o & 0xffff)
                | ((selector as u64) << 16)
                | (((params & 0x1f) as u64) << 32)
                | ((access as u64) << 40)
                | (((o >> 16) & 0xffff) << 48),
        )
    }
}

/// Whether `size` bytes at offset `off` lie inside the segment `sc` (expand-down aware).
#[inline]
pub fn seg_contains(sc: &Segment, off: u32, size: u32) -> bool {
    let last = off as u64 + size as u64 - 1;
    if sc.attrs & (ATTR_CODE | ATTR_EC | ATTR_S) == (ATTR_EC | ATTR_S) {
        let upper: u64 = if sc.attrs & ATTR_DB != 0 {
            0xffff_ffff
        } else {
            0xffff
        };
        (off as u64) > sc.limit as u64 && last <= upper
    } else {
        last <= sc.limit as u64
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn flat_code_segment_fields() {
        // 0x00CF9A000000FFFF: the classic flat 4 GiB ring-0 code segment.
        let d = Descriptor(0x00cf_9a00_0000_ffff);
        assert_eq!(d.base(), 0);
        assert_eq!(d.limit(), 0xffff_ffff);
        assert!(d.is_code() && d.present() && d.big() && d.readable());
        assert!(!d.conforming());
        assert_eq!(d.dpl(), 0);
        assert_eq!(Descriptor::segment(0, 0xfffff, 0x9a, 0xc), d);
    }

    #[test]
    fn gate_fields() {
        let g = Descriptor::gate(0x0008, 0x1234_5678, 0xec, 3);
        assert_eq!(g.sys_type(), Some(SYS_CALL32));
        assert_eq!(g.gate_selector(), 8);
        assert_eq!(g.gate_offset(), 0x1234_5678);
        assert_eq!(g.gate_params(), 3);
        assert_eq!(g.dpl(), 3);
        let g16 = Descriptor::gate(0x10, 0x1234_5678, 0x84, 0);
        assert_eq!(g16.gate_offset(), 0x5678);
    }

    #[test]
    fn expand_down_limits() {
        let d = Descriptor::segment(0, 0x0fff, 0x96, 0x0).to_segment(0x10);
        assert!(!seg_contains(&d, 0x0fff, 1));
        assert!(seg_contains(&d, 0x1000, 2));
        assert!(!seg_contains(&d, 0xffff, 2));
        let e = Descriptor::segment(0, 0x0fff, 0x92, 0x0).to_segment(0x10);
        assert!(seg_contains(&e, 0x0ffe, 2));
        assert!(!seg_contains(&e, 0x0fff, 2));
    }
}

/// Helpers for the in-crate unit tests: a CPU in 32-bit protected mode at CPL 0 with a
/// GDT at [`testing::GDT`].
#[cfg(test)]
pub(crate) mod testing {
    use super::Descriptor;
    use crate::state::*;
    use crate::Cpu;
    use morph86_mmu::{Mmu, PhysMem};

    /// GDT base.
    pub(crate) const GDT: u64 = 0x1000;
    /// Flat ring-0 code.
    pub(crate) const CODE0: u16 = 0x08;
    /// Flat ring-0 data.
    pub(crate) const DATA0: u16 = 0x10;

    /// Writes a GDT entry.
    pub(crate) fn set_gdt(c: &mut Cpu, sel: u16, d: Descriptor) {
        c.mmu
            .phys
            .write(GDT + (sel & !7) as u64, &d.0.to_le_bytes());
    }

    /// Protected mode, CPL 0, flat 32-bit CS/SS/DS/ES, GDT with `extra` entries.
    pub(crate) fn pm_cpu(extra: &[(u16, Descriptor)]) -> Cpu {
        let mut c = Cpu::new(Mmu::new(PhysMem::new(2 << 20).unwrap()));
        let code = Descriptor::segment(0, 0xfffff, 0x9b, 0xc);
        let data = Descriptor::segment(0, 0xfffff, 0x93, 0xc);
        set_gdt(&mut c, CODE0, code);
        set_gdt(&mut c, DATA0, data);
        for (s, d) in extra {
            set_gdt(&mut c, *s, *d);
        }
        c.s.gdtr = TableReg {
            base: GDT,
            limit: 0x1ff,
        };
        c.s.cr0 |= CR0_PE;
        c.s.seg[SegReg::Cs as usize] = code.to_segment(CODE0);
        for s in [SegReg::Ss, SegReg::Ds, SegReg::Es] {
            c.s.seg[s as usize] = data.to_segment(DATA0);
        }
        c.s.cpl = 0;
        c.s.gpr[reg::RSP] = 0x8000;
        c.sync_paging();
        c
    }

    /// Runs the 32-bit code `bytes` placed at 0x10000 for one instruction.
    pub(crate) fn exec(c: &mut Cpu, bytes: &[u8]) -> crate::Res<()> {
        c.mmu.phys.write(0x10000, bytes);
        c.s.rip = 0x10000;
        c.start_rip = 0x10000;
        let r = c.fetch_decode().and_then(|i| c.execute(&i));
        if r.is_err() {
            c.s.rip = c.start_rip;
        }
        r
    }
}
