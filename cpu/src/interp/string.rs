//! Instruction group: string instructions — MOVS CMPS SCAS LODS STOS INS OUTS, with
//! REP/REPE/REPNE.
//!
//! The address size picks SI/DI/CX or ESI/EDI/ECX; DF picks the direction; the source
//! segment is DS unless overridden, the destination is always ES. REP runs in chunks of
//! [`REP_CHUNK`] iterations: when the count is not exhausted after a chunk, EIP is set
//! back to the instruction so the step loop can take interrupts in between. Every
//! finished iteration is committed, so a fault leaves the registers at the faulting one.

use crate::exception::Res;
use crate::flags::{size_mask, FlagOp};
use crate::state::*;
use crate::Cpu;
use iced_x86::{Code, Instruction, Mnemonic, OpKind};

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
        let mut n = 0;
        while count != 0 {
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
            if n >= REP_CHUNK && count != 0 {
                self.s.rip = self.start_rip;
                break;
            }
        }
        Ok(())
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
                let v = self.read_mem(src, si, size)?;
                self.write_mem(SegReg::Es, di, size, v)?;
                self.str_advance(reg::RSI, size, a32);
                self.str_advance(reg::RDI, size, a32);
            }
            Kind::Cmps => {
                let a = self.read_mem(src, si, size)?;
                let b = self.read_mem(SegReg::Es, di, size)?;
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
                self.str_advance(reg::RSI, size, a32);
            }
        }
        Ok(())
    }
}
