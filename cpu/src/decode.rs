//! Instruction fetch and decode (iced-x86), with a decoded-instruction cache.
//!
//! The cache is direct-mapped and keyed by the *physical* address of the instruction
//! and the code size (16/32). Each entry remembers the generation of its page; a write
//! to a page that holds decoded code (the MMU's code mark) bumps the page's generation,
//! which invalidates every entry from that page at once.
//!
//! iced stores near branch targets as absolute addresses computed from the decode IP,
//! so an entry also remembers the EIP it was decoded at and only hits for that EIP:
//! the same physical bytes reached through another CS:EIP (code run before paging and
//! again at its virtual address, as Linux does) are decoded afresh.

use crate::exception::{Exception, Res};
use crate::state::SegReg;
use crate::Cpu;
use iced_x86::{Decoder, DecoderError, DecoderOptions, Instruction};
use morph86_mmu::{Access, PhysKind, PAGE_SIZE};

const CACHE_BITS: u32 = 13;

#[derive(Clone)]
struct Entry {
    phys: u64,
    generation: u32,
    bitness: u32,
    /// EIP at decode time (branch targets in `instr` are relative to it).
    eip: u32,
    instr: Instruction,
}

/// The decoded-instruction cache.
pub struct DecodeCache {
    entries: Vec<Entry>,
    generation: Vec<u32>,
}

impl Default for DecodeCache {
    fn default() -> Self {
        Self::new()
    }
}

impl DecodeCache {
    /// An empty cache.
    pub fn new() -> Self {
        DecodeCache {
            entries: vec![
                Entry {
                    phys: u64::MAX,
                    generation: 0,
                    bitness: 0,
                    eip: 0,
                    instr: Instruction::default(),
                };
                1 << CACHE_BITS
            ],
            generation: Vec::new(),
        }
    }

    #[inline]
    fn index(phys: u64) -> usize {
        ((phys ^ (phys >> CACHE_BITS)) & ((1 << CACHE_BITS) - 1)) as usize
    }

    #[inline]
    fn page_gen(&self, phys: u64) -> u32 {
        self.generation
            .get((phys / PAGE_SIZE) as usize)
            .copied()
            .unwrap_or(0)
    }

    /// Invalidates everything decoded from the page at `phys`.
    pub fn invalidate_page(&mut self, phys: u64) {
        let p = (phys / PAGE_SIZE) as usize;
        if p >= self.generation.len() {
            self.generation.resize(p + 1, 0);
        }
        self.generation[p] = self.generation[p].wrapping_add(1);
    }

    /// Drops everything.
    pub fn clear(&mut self) {
        for e in self.entries.iter_mut() {
            e.phys = u64::MAX;
        }
    }
}

impl Cpu {
    /// Fetches and decodes the instruction at CS:EIP, leaving EIP pointing past it.
    #[cfg(test)]
    pub(crate) fn fetch_decode(&mut self) -> Res<Instruction> {
        let mut i = Instruction::default();
        self.fetch_into(&mut i)?;
        Ok(i)
    }

    /// Drops the decoded instructions of pages whose code was overwritten.
    #[cold]
    #[inline(never)]
    fn drain_dirty_code(&mut self) {
        for p in self.mmu.phys.take_dirty_code() {
            self.dcache.invalidate_page(p);
        }
    }

    /// [`Cpu::fetch_decode`] into `out` (the hot path of the step loop: the 40-byte
    /// instruction is copied once, from the cache entry into the caller's slot, rather
    /// than moved through a `Result`). `out` is unspecified on `Err`.
    #[inline(always)]
    pub(crate) fn fetch_into(&mut self, out: &mut Instruction) -> Res<()> {
        if self.mmu.phys.has_dirty_code() {
            self.drain_dirty_code();
        }
        let code32 = self.s.code32();
        let bitness = if code32 { 32 } else { 16 };
        let (cs_base, cs_limit) = {
            let cs = &self.s.seg[SegReg::Cs as usize];
            (cs.base, cs.limit)
        };
        let eip = if code32 {
            self.s.rip as u32
        } else {
            self.s.rip as u16 as u32
        };
        if eip > cs_limit {
            return Err(Exception::gp(0));
        }
        let lin = cs_base.wrapping_add(eip as u64) & 0xffff_ffff;
        let user = self.s.cpl == 3;
        let phys = match self.mmu.translate(lin, Access::Fetch, user) {
            Ok(p) => p,
            Err(pf) => return Err(self.page_fault(pf)),
        };
        let idx = DecodeCache::index(phys);
        let e = &self.dcache.entries[idx];
        if e.phys == phys
            && e.eip == eip
            && e.bitness == bitness
            && e.generation == self.dcache.page_gen(phys)
        {
            self.stats.decode_hits += 1;
            *out = e.instr;
        } else {
            self.stats.decode_misses += 1;
            *out = self.decode_miss(lin, phys, eip, bitness, user)?;
        }
        let len = out.len() as u32;
        let last = eip as u64 + len as u64 - 1;
        if last > cs_limit as u64 {
            return Err(Exception::gp(0));
        }
        let next = eip.wrapping_add(len);
        self.s.rip = if code32 {
            next as u64
        } else {
            (next & 0xffff) as u64
        };
        Ok(())
    }

    #[cold]
    #[inline(never)]
    fn decode_miss(
        &mut self,
        lin: u64,
        phys: u64,
        eip: u32,
        bitness: u32,
        user: bool,
    ) -> Res<Instruction> {
        let mut bytes = [0u8; 15];
        let in_page = (PAGE_SIZE - (lin & (PAGE_SIZE - 1))).min(15) as usize;
        self.mmu.phys.read(phys, &mut bytes[..in_page]);
        let (mut instr, mut err) = decode_bytes(&bytes[..in_page], bitness, eip);
        let mut crossed = None;
        if err == DecoderError::NoMoreBytes && in_page < 15 {
            // The instruction runs into the next page: fetch that too (this may fault).
            let lin2 = (lin + in_page as u64) & 0xffff_ffff;
            let phys2 = self
                .mmu
                .translate(lin2, Access::Fetch, user)
                .map_err(|pf| self.page_fault(pf))?;
            self.mmu.phys.read(phys2, &mut bytes[in_page..]);
            (instr, err) = decode_bytes(&bytes, bitness, eip);
            crossed = Some(phys2);
        }
        match err {
            DecoderError::None => {}
            // More than 15 bytes of prefixes and opcode: #GP(0) on a 386 and later.
            DecoderError::NoMoreBytes => return Err(Exception::gp(0)),
            _ => return Err(Exception::ud()),
        }
        if self.mmu.phys.mark_code(phys) {
            self.mmu.protect_code_page(phys);
        }
        if let Some(p2) = crossed {
            if self.mmu.phys.mark_code(p2) {
                self.mmu.protect_code_page(p2);
            }
        } else if self.mmu.phys.kind(phys) != PhysKind::Mmio {
            let idx = DecodeCache::index(phys);
            let generation = self.dcache.page_gen(phys);
            self.dcache.entries[idx] = Entry {
                phys,
                generation,
                bitness,
                eip,
                instr,
            };
        }
        Ok(instr)
    }
}

/// Decodes one instruction, returning it with the decoder's verdict.
fn decode_bytes(bytes: &[u8], bitness: u32, eip: u32) -> (Instruction, DecoderError) {
    let mut d = Decoder::with_ip(bitness, bytes, eip as u64, DecoderOptions::NONE);
    let i = d.decode();
    (i, d.last_error())
}
