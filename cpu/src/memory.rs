//! Segmented memory access: segment checks (limit, rights, null selectors) turn a
//! `seg:offset` into a linear address, then the MMU does paging.
//!
//! Faults: a bad data segment gives #GP(0), a bad SS access #SS(0), a page fault
//! #PF with CR2 set here, alignment #AC(0) when CR0.AM, EFLAGS.AC and CPL 3.

use crate::exception::{vec, Exception, Res};
use crate::state::*;
use crate::Cpu;
use morph86_mmu::{Access, PageFault};

impl Cpu {
    /// Converts an MMU page fault into #PF, recording CR2.
    #[cold]
    #[inline(never)]
    pub(crate) fn page_fault(&mut self, pf: PageFault) -> Exception {
        self.s.cr2 = pf.linear;
        Exception::pf(pf.error_code)
    }

    /// Whether data accesses are made with user privilege (CPL 3).
    #[inline(always)]
    pub(crate) fn user(&self) -> bool {
        self.s.cpl == 3
    }

    /// The linear address of `size` bytes at `seg:off`, after the checks a
    /// data access of that kind needs. `off` must already be truncated to the
    /// address size.
    #[inline(always)]
    pub fn seg_linear(&self, seg: SegReg, off: u32, size: u32, write: bool) -> Res<u64> {
        let sc = &self.s.seg[seg as usize];
        let fault = || {
            if seg == SegReg::Ss {
                Exception::ss(0)
            } else {
                Exception::gp(0)
            }
        };
        let a = sc.attrs;
        if self.s.protected() && !self.s.v86() {
            if a & ATTR_UNUSABLE != 0 {
                return Err(fault());
            }
            if write {
                if a & ATTR_CODE != 0 || a & ATTR_RW == 0 {
                    return Err(fault());
                }
            } else if a & ATTR_CODE != 0 && a & ATTR_RW == 0 {
                return Err(fault());
            }
        }
        let last = off as u64 + size as u64 - 1;
        if a & (ATTR_CODE | ATTR_EC) == ATTR_EC {
            // Expand-down data segment: valid offsets are limit+1 ..= 0xffff or 0xffffffff.
            let upper: u64 = if a & ATTR_DB != 0 {
                0xffff_ffff
            } else {
                0xffff
            };
            if (off as u64) <= sc.limit as u64 || last > upper {
                return Err(fault());
            }
        } else if last > sc.limit as u64 {
            return Err(fault());
        }
        if size > 1
            && off & (size - 1).min(7) != 0
            && self.s.cpl == 3
            && self.s.cr0 & CR0_AM != 0
            && self.s.eflags_raw & AC != 0
        {
            return Err(Exception::with_code(vec::AC, 0));
        }
        Ok(sc.base.wrapping_add(off as u64) & 0xffff_ffff)
    }

    /// Reads `size` (1, 2, 4, 8) bytes at `seg:off`.
    #[inline(always)]
    pub fn read_mem(&mut self, seg: SegReg, off: u32, size: u32) -> Res<u64> {
        let lin = self.seg_linear(seg, off, size, false)?;
        self.read_lin(lin, size, self.user())
    }

    /// Writes `size` (1, 2, 4, 8) bytes at `seg:off`.
    #[inline(always)]
    pub fn write_mem(&mut self, seg: SegReg, off: u32, size: u32, v: u64) -> Res<()> {
        let lin = self.seg_linear(seg, off, size, true)?;
        self.write_lin(lin, size, v, self.user())
    }

    /// Checks that `size` bytes at `seg:off` could be written (segment and paging),
    /// without writing: for instructions that must not fault halfway.
    pub fn probe_write_mem(&mut self, seg: SegReg, off: u32, size: u32) -> Res<()> {
        let lin = self.seg_linear(seg, off, size, true)?;
        let user = self.user();
        self.mmu
            .probe_write(lin, size as u64, user)
            .map_err(|pf| self.page_fault(pf))
    }

    /// Reads `size` bytes at a linear address with the given privilege.
    #[inline(always)]
    pub fn read_lin(&mut self, lin: u64, size: u32, user: bool) -> Res<u64> {
        let r = match size {
            1 => self.mmu.read_u8(lin, user).map(u64::from),
            2 => self.mmu.read_u16(lin, user).map(u64::from),
            4 => self.mmu.read_u32(lin, user).map(u64::from),
            8 => self.mmu.read_u64(lin, user),
            _ => {
                let mut b = [0u8; 8];
                let n = (size as usize).min(8);
                self.mmu
                    .read(lin, &mut b[..n], Access::Read, user)
                    .map(|()| u64::from_le_bytes(b))
            }
        };
        r.map_err(|pf| self.page_fault(pf))
    }

    /// Writes `size` bytes at a linear address with the given privilege.
    #[inline(always)]
    pub fn write_lin(&mut self, lin: u64, size: u32, v: u64, user: bool) -> Res<()> {
        let r = match size {
            1 => self.mmu.write_u8(lin, v as u8, user),
            2 => self.mmu.write_u16(lin, v as u16, user),
            4 => self.mmu.write_u32(lin, v as u32, user),
            8 => self.mmu.write_u64(lin, v, user),
            _ => {
                let b = v.to_le_bytes();
                self.mmu.write(lin, &b[..(size as usize).min(8)], user)
            }
        };
        r.map_err(|pf| self.page_fault(pf))
    }

    /// Reads bytes at a linear address into `buf` (FPU environments, FXSAVE areas, TSS).
    pub fn read_lin_bytes(&mut self, lin: u64, buf: &mut [u8], user: bool) -> Res<()> {
        self.mmu
            .read(lin, buf, Access::Read, user)
            .map_err(|pf| self.page_fault(pf))
    }

    /// Writes bytes at a linear address.
    pub fn write_lin_bytes(&mut self, lin: u64, data: &[u8], user: bool) -> Res<()> {
        self.mmu
            .write(lin, data, user)
            .map_err(|pf| self.page_fault(pf))
    }

    /// Supervisor ("implicit") read, as for descriptor tables and the TSS.
    #[inline]
    pub fn read_sys(&mut self, lin: u64, size: u32) -> Res<u64> {
        self.read_lin(lin, size, false)
    }

    /// Supervisor ("implicit") write, as for descriptor accessed bits and the TSS.
    #[inline]
    pub fn write_sys(&mut self, lin: u64, size: u32, v: u64) -> Res<()> {
        self.write_lin(lin, size, v, false)
    }

    /// Pushes `size` (2 or 4) bytes on the stack, honouring SS.B for the stack-pointer width.
    #[inline]
    pub fn push(&mut self, size: u32, v: u64) -> Res<()> {
        let sp = self.s.gpr[reg::RSP];
        if self.s.stack32() {
            let nsp = (sp as u32).wrapping_sub(size);
            self.write_mem(SegReg::Ss, nsp, size, v)?;
            self.s.set_r32(reg::RSP, nsp);
        } else {
            let nsp = (sp as u16).wrapping_sub(size as u16);
            self.write_mem(SegReg::Ss, nsp as u32, size, v)?;
            self.s.set_r16(reg::RSP, nsp);
        }
        Ok(())
    }

    /// Pops `size` (2 or 4) bytes from the stack.
    pub fn pop(&mut self, size: u32) -> Res<u64> {
        let v = self.peek_stack(0, size)?;
        self.adjust_sp(size as i64);
        Ok(v)
    }

    /// Reads `size` bytes at SP + `delta` without moving SP.
    #[inline]
    pub fn peek_stack(&mut self, delta: u32, size: u32) -> Res<u64> {
        let sp = self.s.gpr[reg::RSP];
        let off = if self.s.stack32() {
            (sp as u32).wrapping_add(delta)
        } else {
            (sp as u16).wrapping_add(delta as u16) as u32
        };
        self.read_mem(SegReg::Ss, off, size)
    }

    /// Adds `delta` to SP or ESP according to SS.B.
    #[inline]
    pub fn adjust_sp(&mut self, delta: i64) {
        let sp = self.s.gpr[reg::RSP];
        if self.s.stack32() {
            self.s
                .set_r32(reg::RSP, (sp as u32).wrapping_add(delta as u32));
        } else {
            self.s
                .set_r16(reg::RSP, (sp as u16).wrapping_add(delta as u16));
        }
    }
}
