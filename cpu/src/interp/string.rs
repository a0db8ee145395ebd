//! Instruction group: string instructions — MOVS CMPS SCAS LODS STOS INS OUTS, with
//! REP/REPE/REPNE.
//!
//! The address size picks SI/DI/CX or ESI/EDI/ECX; DF picks the direction; the source
//! segment is DS unless overridden, the destination is always ES. REP runs in chunks of
//! [`REP_CHUNK`] iterations: when the count is not exhausted after a chunk, EIP is set
//! back to the instruction so the step loop can take interrupts in between. Every
//! finished iteration is committed, so a fault leaves the registers at the faulting one.
//! With EFLAGS.TF set, REP runs one iteration per step (the single-step trap comes after
//! each iteration).

use crate::exception::Res;
use crate::flags::{size_mask, FlagOp};
use crate::state::*;
use crate::Cpu;
use iced_x86::{Code, Instruction, Mnemonic, OpKind};
use morph86_mmu::{Access, PhysKind, PAGE_SIZE};

/// REP iterations per step before giving interrupts a chance.
pub(crate) const REP_CHUNK: u32 = 4096;

/// The string operation.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
enum Kind {
    Movs,
    Cmps,
    Scas,
    Lods,
    Stos,
    Ins,
    Outs,
}

impl Cpu {
    /// Executes the instruction if it belongs to this group.
    #[inline(never)]
    pub(crate) fn exec_string(&mut self, i: &Instruction) -> Option<Res<()>> {
        use Mnemonic as M;
        let (kind, size) = match i.mnemonic() {
            M::Movsb => (Kind::Movs, 1),
            M::Movsw => (Kind::Movs, 2),
            M::Movsd if i.code() == Code::Movsd_m32_m32 => (Kind::Movs, 4),
            M::Cmpsb => (Kind::Cmps, 1),
            M::Cmpsw => (Kind::Cmps, 2),
            M::Cmpsd if i.code() == Code::Cmpsd_m32_m32 => (Kind::Cmps, 4),
            M::Scasb => (Kind::Scas, 1),
            M::Scasw => (Kind::Scas, 2),
            M::Scasd => (Kind::Scas, 4),
            M::Lodsb => (Kind::Lods, 1),
            M::Lodsw => (Kind::Lods, 2),
            M::Lodsd => (Kind::Lods, 4),
            M::Stosb => (Kind::Stos, 1),
            M::Stosw => (Kind::Stos, 2),
            M::Stosd => (Kind::Stos, 4),
            M::Insb => (Kind::Ins, 1),
            M::Insw => (Kind::Ins, 2),
            M::Insd => (Kind::Ins, 4),
            M::Outsb => (Kind::Outs, 1),
            M::Outsw => (Kind::Outs, 2),
            M::Outsd => (Kind::Outs, 4),
            _ => return None,
        };
        Some(self.string_op(i, kind, size))
    }

    fn string_op(&mut self, i: &Instruction, kind: Kind, size: u32) -> Res<()> {
        let a32 = (0..i.op_count()).any(|n| {
            matches!(
                i.op_kind(n),
                OpKind::MemorySegESI | OpKind::MemoryESEDI | OpKind::MemorySegEDI
            )
        });
        let src = self.mem_seg(i);
        if !(i.has_rep_prefix() || i.has_repne_prefix()) {
            return self.string_once(kind, size, a32, src);
        }
        let cmask = if a32 { 0xffff_ffff } else { 0xffff };
        let mut count = self.s.gpr[reg::RCX] & cmask;
        let repne = i.has_repne_prefix();
        // With TF set the CPU traps after every iteration, so run one at a time.
        let chunk = if self.s.eflags_raw & TF != 0 {
            1
        } else {
            REP_CHUNK
        };
        let mut n = 0;
        while count != 0 {
            if matches!(kind, Kind::Movs | Kind::Stos) && count > 1 && chunk > 1 {
                let max = count.min((chunk - n) as u64);
                let k = self.rep_bulk(kind, size, a32, src, max)?;
                if k > 0 {
                    count -= k;
                    if a32 {
                        self.s.set_r32(reg::RCX, count as u32);
                    } else {
                        self.s.set_r16(reg::RCX, count as u16);
                    }
                    n += k as u32;
                    if n >= chunk && count != 0 {
                        self.s.rip = self.start_rip;
                        break;
                    }
                    continue;
                }
            }
            self.string_once(kind, size, a32, src)?;
            count -= 1;
            if a32 {
                self.s.set_r32(reg::RCX, count as u32);
            } else {
                self.s.set_r16(reg::RCX, count as u16);
            }
            if matches!(kind, Kind::Cmps | Kind::Scas) && self.s.get_zf() == repne {
                break;
            }
            n += 1;
            if n >= chunk && count != 0 {
                self.s.rip = self.start_rip;
                break;
            }
        }
        Ok(())
    }

    /// Fast path of REP MOVS/STOS (either direction): up to `max` iterations that stay in
    /// one RAM page (source and destination), inside the segment limits and without
    /// offset wrap-around, done as one block copy or fill. Returns how many iterations
    /// it did (and updates SI/DI); 0 means "take the one-iteration path" (an
    /// expand-down segment, possible alignment checks, MMIO or ROM, a destination that
    /// overlaps the source ahead of it in the direction of travel, fewer than 2
    /// iterations). Within one page every element translates alike, so a fault can
    /// only be the first element's, and it is raised before anything changes.
    fn rep_bulk(&mut self, kind: Kind, size: u32, a32: bool, src: SegReg, max: u64) -> Res<u64> {
        const PAGE: u64 = PAGE_SIZE;
        let ac = self.s.cr0 & CR0_AM != 0 && self.s.eflags_raw & AC != 0 && self.s.cpl == 3;
        if ac {
            return Ok(0);
        }
        let back = self.s.eflags_raw & DF != 0;
        let amask: u64 = if a32 { 0xffff_ffff } else { 0xffff };
        let sz = size as u64;
        // Iterations that fit before the offset wraps, the limit, and the page edge
        // (going up, or going down with DF).
        let room = |cpu: &Cpu, seg: SegReg, off: u64| -> u64 {
            let sc = &cpu.s.seg[seg as usize];
            if sc.attrs & (ATTR_CODE | ATTR_EC) == ATTR_EC
                || off + sz - 1 > (sc.limit as u64).min(amask)
            {
                return 0;
            }
            let in_page = sc.base.wrapping_add(off) & (PAGE - 1);
            if back {
                if in_page + sz > PAGE {
                    return 0;
                }
                (off / sz + 1).min(in_page / sz + 1)
            } else {
                let by_limit = ((sc.limit as u64).min(amask) - off + 1) / sz;
                by_limit.min((PAGE - in_page) / sz)
            }
        };
        let di = self.s.gpr[reg::RDI] & amask;
        let si = self.s.gpr[reg::RSI] & amask;
        let mut n = max.min(room(self, SegReg::Es, di));
        if kind == Kind::Movs {
            n = n.min(room(self, src, si));
        }
        if n < 2 {
            return Ok(0);
        }
        let bytes = (n * sz) as usize;
        // The block's lowest offsets.
        let (si, di) = if back {
            (si.wrapping_sub((n - 1) * sz), di - (n - 1) * sz)
        } else {
            (si, di)
        };
        let user = self.user();
        let step = if back {
            (bytes as u64).wrapping_neg()
        } else {
            bytes as u64
        };
        // The first element's linear address (the block's top when going down): it
        // is the one whose page fault (and CR2) the element steps would report.
        let first = |lo: u64| if back { lo + bytes as u64 - sz } else { lo };
        let mut buf = [0u8; PAGE_SIZE as usize];
        if kind == Kind::Movs {
            // Same order as one iteration: the source's checks and paging, then the
            // destination's.
            let ls = self.seg_linear(src, si as u32, bytes as u32, false)?;
            let ps = self
                .mmu
                .translate(first(ls), Access::Read, user)
                .map_err(|pf| self.page_fault(pf))?;
            let ld = self.seg_linear(SegReg::Es, di as u32, bytes as u32, true)?;
            let pd = self
                .mmu
                .translate(first(ld), Access::Write, user)
                .map_err(|pf| self.page_fault(pf))?;
            let ram = |cpu: &Cpu, p: u64| cpu.mmu.phys.kind(p) == PhysKind::Ram;
            // Element steps read source bytes that earlier steps wrote when the
            // destination lies ahead of the source in the direction of travel.
            let clash = if back {
                ps > pd && ps < pd + bytes as u64
            } else {
                pd > ps && pd < ps + bytes as u64
            };
            if !ram(self, ps) || !ram(self, pd) || clash {
                return Ok(0);
            }
            self.read_lin_bytes(ls, &mut buf[..bytes], user)?;
            self.write_lin_bytes(ld, &buf[..bytes], user)?;
            self.str_advance_by(reg::RSI, step, a32);
        } else {
            let ld = self.seg_linear(SegReg::Es, di as u32, bytes as u32, true)?;
            let pd = self
                .mmu
                .translate(first(ld), Access::Write, user)
                .map_err(|pf| self.page_fault(pf))?;
            if self.mmu.phys.kind(pd) != PhysKind::Ram {
                return Ok(0);
            }
            // The element repeated over 8 bytes (the size divides 8).
            let v = self.s.gpr[reg::RAX] & size_mask(size);
            let pat = match size {
                1 => v * 0x0101_0101_0101_0101,
                2 => v * 0x0001_0001_0001_0001,
                _ => v | (v << 32),
            }
            .to_le_bytes();
            let mut chunks = buf[..bytes].chunks_exact_mut(8);
            for e in &mut chunks {
                e.copy_from_slice(&pat);
            }
            let rest = chunks.into_remainder();
            let r = rest.len();
            rest.copy_from_slice(&pat[..r]);
            self.write_lin_bytes(ld, &buf[..bytes], user)?;
        }
        self.str_advance_by(reg::RDI, step, a32);
        Ok(n)
    }

    /// Adds `d` to (E)SI or (E)DI at the address size.
    #[inline]
    fn str_advance_by(&mut self, r: usize, d: u64, a32: bool) {
        let v = self.s.gpr[r].wrapping_add(d);
        if a32 {
            self.s.set_r32(r, v as u32);
        } else {
            self.s.set_r16(r, v as u16);
        }
    }

    /// Moves (E)SI or (E)DI by one element in the direction DF says.
    #[inline]
    fn str_advance(&mut self, r: usize, size: u32, a32: bool) {
        let d = if self.s.eflags_raw & DF != 0 {
            (size as u64).wrapping_neg()
        } else {
            size as u64
        };
        let v = self.s.gpr[r].wrapping_add(d);
        if a32 {
            self.s.set_r32(r, v as u32);
        } else {
            self.s.set_r16(r, v as u16);
        }
    }

    /// One iteration; registers are updated only when it completes.
    fn string_once(&mut self, kind: Kind, size: u32, a32: bool, src: SegReg) -> Res<()> {
        let amask = if a32 { 0xffff_ffff } else { 0xffff };
        let si = (self.s.gpr[reg::RSI] & amask) as u32;
        let di = (self.s.gpr[reg::RDI] & amask) as u32;
        match kind {
            Kind::Movs => {
                // The source read (checks and paging) comes before any check of the
                // destination, as on the hardware.
                let v = self.read_mem(src, si, size)?;
                self.write_mem(SegReg::Es, di, size, v)?;
                self.str_advance(reg::RSI, size, a32);
                self.str_advance(reg::RDI, size, a32);
            }
            Kind::Cmps => {
                // Both operands' segment and alignment checks come before either read
                // (a misaligned ES:EDI gives #AC before a page fault of DS:ESI, as on
                // the host CPU); the reads then go source first.
                let ls = self.seg_linear(src, si, size, false)?;
                let ld = self.seg_linear(SegReg::Es, di, size, false)?;
                let user = self.user();
                let a = self.read_lin(ls, size, user)?;
                let b = self.read_lin(ld, size, user)?;
                let r = a.wrapping_sub(b) & size_mask(size);
                self.s.set_lazy_flags(FlagOp::Sub, size, r, a, b, false);
                self.str_advance(reg::RSI, size, a32);
                self.str_advance(reg::RDI, size, a32);
            }
            Kind::Scas => {
                let a = self.s.reg_sized(reg::RAX, size);
                let b = self.read_mem(SegReg::Es, di, size)?;
                let r = a.wrapping_sub(b) & size_mask(size);
                self.s.set_lazy_flags(FlagOp::Sub, size, r, a, b, false);
                self.str_advance(reg::RDI, size, a32);
            }
            Kind::Lods => {
                let v = self.read_mem(src, si, size)?;
                self.s.set_reg_sized(reg::RAX, size, v);
                self.str_advance(reg::RSI, size, a32);
            }
            Kind::Stos => {
                let v = self.s.reg_sized(reg::RAX, size);
                self.write_mem(SegReg::Es, di, size, v)?;
                self.str_advance(reg::RDI, size, a32);
            }
            Kind::Ins => {
                let port = self.s.gpr[reg::RDX] as u16;
                self.io_permission(port, size)?;
                self.probe_write_mem(SegReg::Es, di, size)?;
                let v = self.io.io_read(port, size as u8);
                self.write_mem(SegReg::Es, di, size, v as u64)?;
                self.str_advance(reg::RDI, size, a32);
            }
            Kind::Outs => {
                let port = self.s.gpr[reg::RDX] as u16;
                self.io_permission(port, size)?;
                let v = self.read_mem(src, si, size)?;
                self.io.io_write(port, size as u8, v as u32);
                self.mmu.phys.run_jobs();
                self.str_advance(reg::RSI, size, a32);
            }
        }
        Ok(())
    }
}

#[cfg(test)]
mod tests {
    use super::super::testutil::*;
    use super::REP_CHUNK;
    use crate::exception::vec;
    use crate::state::*;

    #[test]
    fn rep_movs_forward_and_backward() {
        // rep movsb, 5 bytes DS:SI -> ES:DI.
        let mut c = real(&[0xf3, 0xa4]);
        c.mmu.phys.write(REAL_DS + 0x10, b"hello");
        c.s.gpr[reg::RSI] = 0x10;
        c.s.gpr[reg::RDI] = 0x20;
        c.s.gpr[reg::RCX] = 5;
        run(&mut c, 1);
        let mut b = [0u8; 5];
        c.mmu.phys.read(REAL_ES + 0x20, &mut b);
        assert_eq!(&b, b"hello");
        assert_eq!(
            (c.s.gpr[reg::RSI], c.s.gpr[reg::RDI], c.s.gpr[reg::RCX]),
            (0x15, 0x25, 0)
        );
        assert_eq!(c.s.rip, 2);
        // std; rep movsw backwards, 2 words.
        let mut c = real(&[0xfd, 0xf3, 0xa5]);
        poke(&mut c, REAL_DS + 0x10, 4, 0x4444_3333);
        c.s.gpr[reg::RSI] = 0x12;
        c.s.gpr[reg::RDI] = 0x32;
        c.s.gpr[reg::RCX] = 2;
        run(&mut c, 2);
        assert_eq!(peek(&mut c, REAL_ES + 0x30, 4), 0x4444_3333);
        assert_eq!((c.s.gpr[reg::RSI], c.s.gpr[reg::RDI]), (0x0e, 0x2e));
    }

    #[test]
    fn repe_cmps_and_repne_scas() {
        let mut c = real(&[0xf3, 0xa6, 0xf2, 0xae]);
        c.mmu.phys.write(REAL_DS, b"abcX");
        c.mmu.phys.write(REAL_ES, b"abcY");
        c.s.gpr[reg::RCX] = 10;
        run(&mut c, 1);
        // Stops after the mismatch (4th compare): X (0x58) < Y (0x59) -> CF.
        assert_eq!((c.s.gpr[reg::RCX], c.s.gpr[reg::RSI]), (6, 4));
        assert!(!c.s.get_zf() && c.s.get_cf());
        // repne scasb for 'c' from ES:0.
        c.s.gpr[reg::RDI] = 0;
        c.s.gpr[reg::RAX] = b'c' as u64;
        c.s.gpr[reg::RCX] = 10;
        run(&mut c, 1);
        assert_eq!((c.s.gpr[reg::RCX], c.s.gpr[reg::RDI]), (7, 3));
        assert!(c.s.get_zf());
    }

    #[test]
    fn lods_with_override_and_stos32() {
        // es lodsw reads ES:SI.
        let mut c = real(&[0x26, 0xad]);
        poke(&mut c, REAL_ES + 0x40, 2, 0xbeef);
        c.s.gpr[reg::RSI] = 0x40;
        run(&mut c, 1);
        assert_eq!((c.s.gpr[reg::RAX], c.s.gpr[reg::RSI]), (0xbeef, 0x42));
        // rep stosd with 32-bit addressing.
        let mut c = flat32(&[0xf3, 0xab]);
        c.s.gpr[reg::RAX] = 0x1234_5678;
        c.s.gpr[reg::RDI] = 0x3000;
        c.s.gpr[reg::RCX] = 3;
        run(&mut c, 1);
        assert_eq!(peek(&mut c, 0x3008, 4), 0x1234_5678);
        assert_eq!((c.s.gpr[reg::RDI], c.s.gpr[reg::RCX]), (0x300c, 0));
        // 16-bit code with an address-size prefix uses ESI/EDI/ECX.
        let mut c = real(&[0x67, 0xf3, 0xa4]);
        c.s.gpr[reg::RSI] = 0x1_0000;
        c.s.gpr[reg::RCX] = 0x1_0001;
        assert_eq!(exec(&mut c).unwrap_err().vector, vec::GP);
        assert_eq!(c.s.gpr[reg::RCX], 0x1_0001);
    }

    #[test]
    fn fault_mid_rep_commits_done_iterations() {
        // ES limit 0x2001: rep stosb from 0x2000, 4 bytes -> #GP at the third.
        let mut c = flat32(&[0xf3, 0xaa]);
        c.s.seg[SegReg::Es as usize].limit = 0x2001;
        c.s.gpr[reg::RDI] = 0x2000;
        c.s.gpr[reg::RCX] = 4;
        c.s.gpr[reg::RAX] = 0x77;
        let e = exec(&mut c).unwrap_err();
        assert_eq!((e.vector, e.error_code()), (vec::GP, Some(0)));
        assert_eq!((c.s.gpr[reg::RDI], c.s.gpr[reg::RCX]), (0x2002, 2));
        assert_eq!(peek(&mut c, 0x2000, 2), 0x7777);
        assert_eq!(c.s.rip, FLAT_CODE);
    }

    #[test]
    fn long_rep_runs_in_chunks() {
        let n = REP_CHUNK as u64 * 2 + 5;
        let mut c = flat32(&[0xf3, 0xaa]);
        c.s.gpr[reg::RDI] = 0x10000;
        c.s.gpr[reg::RCX] = n;
        c.s.gpr[reg::RAX] = 1;
        run(&mut c, 1);
        assert_eq!(c.s.gpr[reg::RCX], n - REP_CHUNK as u64);
        assert_eq!(c.s.rip, FLAT_CODE);
        run(&mut c, 2);
        assert_eq!(c.s.gpr[reg::RCX], 0);
        assert_eq!(c.s.rip, FLAT_CODE + 2);
        assert_eq!(peek(&mut c, 0x10000 + n - 1, 1), 1);
        assert_eq!(peek(&mut c, 0x10000 + n, 1), 0);
    }

    #[test]
    fn block_path_matches_element_semantics() {
        // Overlapping forward copy (DI = SI + 1) replicates the first byte, as
        // element-by-element MOVSB does.
        let mut c = flat32(&[0xf3, 0xa4]);
        c.mmu.phys.write(0x3000, b"abcdefgh");
        c.s.gpr[reg::RSI] = 0x3000;
        c.s.gpr[reg::RDI] = 0x3001;
        c.s.gpr[reg::RCX] = 7;
        run(&mut c, 1);
        let mut b = [0u8; 8];
        c.mmu.phys.read(0x3000, &mut b);
        assert_eq!(&b, b"aaaaaaaa");
        // Copy down onto an overlapping range (DI < SI) is a plain memmove.
        let mut c = flat32(&[0xf3, 0xa4]);
        c.mmu.phys.write(0x3000, b"abcdefgh");
        c.s.gpr[reg::RSI] = 0x3002;
        c.s.gpr[reg::RDI] = 0x3000;
        c.s.gpr[reg::RCX] = 6;
        run(&mut c, 1);
        c.mmu.phys.read(0x3000, &mut b);
        assert_eq!(&b, b"cdefghgh");
        // rep stosw across a page boundary: 3000 words from 0x1ff0.
        let mut c = flat32(&[0xf3, 0x66, 0xab]);
        c.s.gpr[reg::RDI] = 0x1ff0;
        c.s.gpr[reg::RCX] = 3000;
        c.s.gpr[reg::RAX] = 0xbeef;
        run(&mut c, 1);
        assert_eq!((c.s.gpr[reg::RCX], c.s.gpr[reg::RDI]), (0, 0x1ff0 + 6000));
        assert_eq!(peek(&mut c, 0x1ff0, 2), 0xbeef);
        assert_eq!(peek(&mut c, 0x1ff0 + 5998, 2), 0xbeef);
        assert_eq!(peek(&mut c, 0x1ff0 + 6000, 2), 0);
        assert_eq!(peek(&mut c, 0x1fee, 2), 0);
    }

    #[test]
    fn block_path_backwards() {
        // std; rep movsb with the source above the destination: each step reads the
        // byte the previous one wrote, so everything becomes 'h'.
        let mut c = flat32(&[0xfd, 0xf3, 0xa4]);
        c.mmu.phys.write(0x3000, b"abcdefgh");
        c.s.gpr[reg::RSI] = 0x3007;
        c.s.gpr[reg::RDI] = 0x3006;
        c.s.gpr[reg::RCX] = 7;
        run(&mut c, 2);
        let mut b = [0u8; 8];
        c.mmu.phys.read(0x3000, &mut b);
        assert_eq!(&b, b"hhhhhhhh");
        assert_eq!((c.s.gpr[reg::RSI], c.s.gpr[reg::RDI]), (0x3000, 0x2fff));
        // The memmove case (destination above the source): a plain copy.
        let mut c = flat32(&[0xfd, 0xf3, 0xa4]);
        c.mmu.phys.write(0x3000, b"abcdefgh");
        c.s.gpr[reg::RSI] = 0x3005;
        c.s.gpr[reg::RDI] = 0x3007;
        c.s.gpr[reg::RCX] = 6;
        run(&mut c, 2);
        c.mmu.phys.read(0x3000, &mut b);
        assert_eq!(&b, b"ababcdef");
        // std; rep movsd of 3000 dwords down across pages, then std; rep stosw.
        let mut c = flat32(&[0xfd, 0xf3, 0xa5, 0xf3, 0x66, 0xab]);
        for k in 0..3000u64 {
            poke(&mut c, 0x10000 + 4 * k, 4, k);
        }
        c.s.gpr[reg::RSI] = 0x10000 + 4 * 2999;
        c.s.gpr[reg::RDI] = 0x30000 + 4 * 2999;
        c.s.gpr[reg::RCX] = 3000;
        run(&mut c, 2);
        assert_eq!(c.s.gpr[reg::RCX], 0);
        assert_eq!(c.s.gpr[reg::RSI], 0x10000 - 4);
        assert_eq!(c.s.gpr[reg::RDI], 0x30000 - 4);
        for k in [0u64, 1, 1023, 1024, 2999] {
            assert_eq!(peek(&mut c, 0x30000 + 4 * k, 4), k);
        }
        assert_eq!(peek(&mut c, 0x30000 - 4, 4), 0);
        c.s.gpr[reg::RDI] = 0x5001;
        c.s.gpr[reg::RCX] = 2100;
        c.s.gpr[reg::RAX] = 0xa55a;
        run(&mut c, 1);
        assert_eq!(c.s.gpr[reg::RDI], 0x5001 - 4200);
        assert_eq!(peek(&mut c, 0x5001, 2), 0xa55a);
        assert_eq!(peek(&mut c, 0x5001 - 4198, 2), 0xa55a);
        assert_eq!(peek(&mut c, 0x5001 - 4200, 2), 0);
    }

    #[test]
    fn block_path_wraps_16bit_offsets() {
        // Real mode: rep stosw from DI = 0xfff8, 8 words: 4 up to 0xffff, then DI wraps
        // to 0 (nothing written at ES:0x10000).
        let mut c = real(&[0xf3, 0xab]);
        c.s.gpr[reg::RDI] = 0xfff8;
        c.s.gpr[reg::RCX] = 8;
        c.s.gpr[reg::RAX] = 0x1111;
        run(&mut c, 1);
        assert_eq!((c.s.gpr[reg::RDI], c.s.gpr[reg::RCX]), (0x0008, 0));
        assert_eq!(peek(&mut c, REAL_ES + 0xfff8, 8), 0x1111_1111_1111_1111);
        assert_eq!(peek(&mut c, REAL_ES, 8), 0x1111_1111_1111_1111);
        assert_eq!(peek(&mut c, REAL_ES + 0x10000, 2), 0);
        // And downwards: DI = 6 with DF, 8 words: 6..0, then 0xfffe..0xfff8.
        let mut c = real(&[0xfd, 0xf3, 0xab]);
        c.s.gpr[reg::RDI] = 6;
        c.s.gpr[reg::RCX] = 8;
        c.s.gpr[reg::RAX] = 0x2222;
        run(&mut c, 2);
        assert_eq!((c.s.gpr[reg::RDI], c.s.gpr[reg::RCX]), (0xfff6, 0));
        assert_eq!(peek(&mut c, REAL_ES, 8), 0x2222_2222_2222_2222);
        assert_eq!(peek(&mut c, REAL_ES + 0xfff8, 8), 0x2222_2222_2222_2222);
        assert_eq!(peek(&mut c, REAL_ES + 0xfff6, 2), 0);
    }

    #[test]
    fn single_step_runs_one_iteration() {
        let mut c = real(&[0xf3, 0xaa]);
        c.s.set_eflags(FLAG_1 | TF);
        c.s.gpr[reg::RCX] = 3;
        run(&mut c, 1);
        assert_eq!((c.s.gpr[reg::RCX], c.s.gpr[reg::RDI], c.s.rip), (2, 1, 0));
    }

    #[test]
    fn ins_outs() {
        // rep insb from an empty bus reads 0xff; outsw just advances SI.
        let mut c = real(&[0xf3, 0x6c, 0x6f]);
        c.s.gpr[reg::RCX] = 3;
        c.s.gpr[reg::RDI] = 0x50;
        run(&mut c, 1);
        assert_eq!(peek(&mut c, REAL_ES + 0x50, 4), 0x00ff_ffff);
        c.s.gpr[reg::RSI] = 8;
        run(&mut c, 1);
        assert_eq!(c.s.gpr[reg::RSI], 10);
    }
}

#[cfg(test)]
mod speed {
    use super::super::testutil::*;
    use crate::state::*;

    /// Rough REP STOSD / MOVSD throughput (`cargo test -p morph86-cpu -- --ignored
    /// --nocapture rep_throughput`).
    #[test]
    #[ignore]
    fn rep_throughput() {
        for (name, code) in [
            ("stosd", [0xf3u8, 0xab]),
            ("movsd", [0xf3, 0xa5]),
            ("stosd", [0xf3, 0xab]),
        ] {
            let mut c = flat32(&code);
            let t = std::time::Instant::now();
            let mut bytes = 0u64;
            for _ in 0..200 {
                c.s.rip = FLAT_CODE;
                c.s.gpr[reg::RDI] = 0x20000;
                c.s.gpr[reg::RSI] = 0x60000;
                c.s.gpr[reg::RCX] = 0x10000; // 256 KiB
                while c.s.gpr[reg::RCX] != 0 {
                    c.step();
                }
                bytes += 0x40000;
            }
            let dt = t.elapsed().as_secs_f64();
            println!("rep {name}: {:.0} MB/s", bytes as f64 / dt / 1e6);
        }
    }
}
