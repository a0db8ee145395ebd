//! The host CPU as an [`Engine`]: a 32-bit child process driven with `ptrace`.
//!
//! The child is the executable from [`super::elf`], stopped at `execve`. Code and data go
//! in through `/proc/PID/mem` (which may write the read/execute code pages), registers
//! through `PTRACE_SETREGS` (the 64-bit `user_regs_struct`, 32-bit values; the segment
//! selectors are left as the kernel set them) and the x87/SSE state through
//! `PTRACE_SETFPREGS` (FXSAVE layout). Each step is one `PTRACE_SYSEMU_SINGLESTEP`
//! (several for a REP string instruction, which traps after each iteration); SYSEMU
//! means a system call reached by accident (self-modified code) stops without running. A sequence that does
//! not come back within [`TIMEOUT_SECS`] (SIGALRM interrupts the wait) kills the child,
//! and the next `load` starts a new one.

use super::{
    elf, Engine, Fault, Fx, Outcome, State, CODE_BASE, CODE_SIZE, DATA_BASE, DATA_SIZE, MEM_BASE,
    MEM_SIZE,
};
use std::ffi::CString;
use std::fs::File;
use std::os::unix::fs::FileExt;

/// Seconds a sequence may take on the host before the child is declared hung.
pub const TIMEOUT_SECS: i64 = 10;
/// Single steps allowed for one instruction (REP iterations).
const MAX_ITERATIONS: u32 = 200_000;
/// EFLAGS.TF.
const EFLAGS_TF: u32 = 1 << 8;
/// `si_code` of SIGSEGV for a page fault on an unmapped page (SEGV_MAPERR).
const SEGV_MAPERR: i32 = 1;
/// `si_code` of SIGSEGV for a page-protection fault (SEGV_ACCERR).
const SEGV_ACCERR: i32 = 2;
/// `si_code` of SIGBUS for an alignment-check fault (BUS_ADRALN).
const BUS_ADRALN: i32 = 1;
/// `si_code` of SIGFPE for #DE (FPE_INTDIV).
const FPE_INTDIV: i32 = 1;

extern "C" fn on_alarm(_: libc::c_int) {}

/// A traced 32-bit child process.
pub struct Native {
    child: Option<Child>,
    code: Vec<u8>,
    /// Children started so far (1 unless one hung or died).
    pub spawned: u32,
}

struct Child {
    pid: libc::pid_t,
    mem: File,
    regs: libc::user_regs_struct,
}

impl Drop for Child {
    fn drop(&mut self) {
        // SAFETY: kill and waitpid on our own child's pid; no memory is shared.
        unsafe {
            libc::kill(self.pid, libc::SIGKILL);
            let mut st = 0;
            libc::waitpid(self.pid, &mut st, 0);
        }
    }
}

fn os_err(what: &str) -> String {
    format!("{what}: {}", std::io::Error::last_os_error())
}

fn ptrace(req: libc::c_uint, pid: libc::pid_t, data: *mut libc::c_void) -> Result<(), String> {
    // SAFETY: every request used here either ignores `data` or is given a pointer to a
    // live buffer of the size the kernel writes or reads for it.
    let r = unsafe { libc::ptrace(req, pid, std::ptr::null_mut::<libc::c_void>(), data) };
    if r == -1 {
        Err(os_err("ptrace"))
    } else {
        Ok(())
    }
}

/// Waits for the child to stop. Returns the stop signal, or an error if it exited, was
/// killed or the alarm fired.
fn wait_stop(pid: libc::pid_t) -> Result<i32, String> {
    let mut status = 0;
    // SAFETY: waitpid writes one int.
    let r = unsafe { libc::waitpid(pid, &mut status, libc::__WALL) };
    if r != pid {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EINTR) {
            return Err("host child timed out".into());
        }
        return Err(format!("waitpid: {e}"));
    }
    if libc::WIFSTOPPED(status) {
        Ok(libc::WSTOPSIG(status))
    } else {
        Err(format!("host child ended (status {status:#x})"))
    }
}

fn set_alarm(secs: i64) {
    let t = libc::itimerval {
        it_interval: libc::timeval {
            tv_sec: 0,
            tv_usec: 0,
        },
        it_value: libc::timeval {
            tv_sec: secs,
            tv_usec: 0,
        },
    };
    // SAFETY: setitimer reads the struct we pass and writes nothing (old value null).
    unsafe { libc::setitimer(libc::ITIMER_REAL, &t, std::ptr::null_mut()) };
}

impl Child {
    fn spawn() -> Result<Child, String> {
        static INSTALL: std::sync::Once = std::sync::Once::new();
        INSTALL.call_once(|| {
            // SAFETY: installs a handler that does nothing, without SA_RESTART, so a
            // blocked waitpid returns EINTR when the alarm fires.
            unsafe {
                let mut sa: libc::sigaction = std::mem::zeroed();
                sa.sa_sigaction = on_alarm as extern "C" fn(libc::c_int) as usize;
                libc::sigemptyset(&mut sa.sa_mask);
                sa.sa_flags = 0;
                libc::sigaction(libc::SIGALRM, &sa, std::ptr::null_mut());
            }
        });
        let path = std::env::temp_dir().join(format!(
            "morph86-hostdiff-{}-{}.elf",
            std::process::id(),
            std::time::SystemTime::now()
                .duration_since(std::time::UNIX_EPOCH)
                .map(|d| d.as_nanos())
                .unwrap_or(0)
        ));
        {
            use std::io::Write;
            use std::os::unix::fs::OpenOptionsExt;
            let mut f = std::fs::OpenOptions::new()
                .write(true)
                .create_new(true)
                .mode(0o700)
                .open(&path)
                .map_err(|e| format!("{}: {e}", path.display()))?;
            f.write_all(&elf::image()).map_err(|e| e.to_string())?;
        }
        let cpath = CString::new(path.to_string_lossy().as_bytes()).map_err(|e| e.to_string())?;
        let argv = [cpath.as_ptr(), std::ptr::null()];
        let envp = [std::ptr::null::<libc::c_char>()];
        // SAFETY: the child only calls async-signal-safe functions (ptrace, execve,
        // _exit) on data prepared before the fork.
        let pid = unsafe { libc::fork() };
        if pid == 0 {
            // SAFETY: see above.
            unsafe {
                libc::ptrace(libc::PTRACE_TRACEME, 0, 0, 0);
                libc::execve(cpath.as_ptr(), argv.as_ptr(), envp.as_ptr());
                libc::_exit(127);
            }
        }
        if pid < 0 {
            let _ = std::fs::remove_file(&path);
            return Err(os_err("fork"));
        }
        let sig = wait_stop(pid);
        let _ = std::fs::remove_file(&path);
        let sig = sig?;
        if sig != libc::SIGTRAP {
            return Err(format!("host child stopped with signal {sig} at exec"));
        }
        ptrace(
            libc::PTRACE_SETOPTIONS,
            pid,
            (libc::PTRACE_O_EXITKILL | libc::PTRACE_O_TRACESYSGOOD) as usize as *mut libc::c_void,
        )?;
        let mem = std::fs::OpenOptions::new()
            .read(true)
            .write(true)
            .open(format!("/proc/{pid}/mem"))
            .map_err(|e| format!("/proc/{pid}/mem: {e}"))?;
        // SAFETY: user_regs_struct is plain integers; zero is a valid value.
        let mut regs: libc::user_regs_struct = unsafe { std::mem::zeroed() };
        ptrace(
            libc::PTRACE_GETREGS,
            pid,
            &mut regs as *mut _ as *mut libc::c_void,
        )?;
        let mut c = Child { pid, mem, regs };
        c.unmap_others()?;
        Ok(c)
    }

    /// Unmaps everything but the code and data areas (the kernel's stack, vDSO and
    /// vvar pages), so the host faults exactly where the interpreter's page tables do.
    /// Each `munmap` runs in the child: `int 0x80; int3` placed in the code area.
    fn unmap_others(&mut self) -> Result<(), String> {
        /// i386 system call number of munmap.
        const NR_MUNMAP_32: u64 = 91;
        let maps = std::fs::read_to_string(format!("/proc/{}/maps", self.pid))
            .map_err(|e| format!("maps: {e}"))?;
        let mut ranges = Vec::new();
        for line in maps.lines() {
            let Some((a, b)) = line
                .split_whitespace()
                .next()
                .and_then(|r| r.split_once('-'))
            else {
                continue;
            };
            let (Ok(a), Ok(b)) = (u64::from_str_radix(a, 16), u64::from_str_radix(b, 16)) else {
                continue;
            };
            let ours = a >= CODE_BASE as u64 && b <= (DATA_BASE + DATA_SIZE) as u64;
            if !ours && b <= 1 << 32 {
                ranges.push((a, b));
            }
        }
        let saved = self.regs;
        self.write(CODE_BASE, &[0xcd, 0x80, 0xcc])?;
        for (a, b) in ranges {
            let mut r = saved;
            r.rax = NR_MUNMAP_32;
            r.rbx = a;
            r.rcx = b - a;
            r.rip = CODE_BASE as u64;
            r.orig_rax = u64::MAX;
            ptrace(
                libc::PTRACE_SETREGS,
                self.pid,
                &mut r as *mut _ as *mut libc::c_void,
            )?;
            ptrace(libc::PTRACE_CONT, self.pid, std::ptr::null_mut())?;
            let sig = wait_stop(self.pid)?;
            self.getregs()?;
            if sig != libc::SIGTRAP || self.regs.rax != 0 {
                return Err(format!(
                    "munmap {a:#x}-{b:#x} in the host child: signal {sig}, result {:#x}",
                    self.regs.rax
                ));
            }
        }
        self.regs = saved;
        Ok(())
    }

    fn getregs(&mut self) -> Result<(), String> {
        ptrace(
            libc::PTRACE_GETREGS,
            self.pid,
            &mut self.regs as *mut _ as *mut libc::c_void,
        )
    }

    fn fx(&mut self) -> Result<Fx, String> {
        let mut b = FxBuf([0; 512]);
        ptrace(
            libc::PTRACE_GETFPREGS,
            self.pid,
            b.0.as_mut_ptr() as *mut libc::c_void,
        )?;
        Ok(Fx::from_fxsave(&b.0))
    }

    fn read(&self, addr: u32, buf: &mut [u8]) -> Result<(), String> {
        self.mem
            .read_exact_at(buf, addr as u64)
            .map_err(|e| format!("read {addr:#x}: {e}"))
    }

    fn write(&self, addr: u32, buf: &[u8]) -> Result<(), String> {
        self.mem
            .write_all_at(buf, addr as u64)
            .map_err(|e| format!("write {addr:#x}: {e}"))
    }

    fn state(&mut self) -> Result<State, String> {
        self.getregs()?;
        let r = &self.regs;
        let mut st = State {
            gpr: [
                r.rax as u32,
                r.rcx as u32,
                r.rdx as u32,
                r.rbx as u32,
                r.rsp as u32,
                r.rbp as u32,
                r.rsi as u32,
                r.rdi as u32,
            ],
            eip: r.rip as u32,
            eflags: r.eflags as u32 & !EFLAGS_TF,
            fx: self.fx()?,
            mem: vec![0; MEM_SIZE as usize],
        };
        self.read(MEM_BASE, &mut st.mem)?;
        Ok(st)
    }
}

#[repr(C, align(16))]
struct FxBuf([u8; 512]);

impl Default for Native {
    fn default() -> Self {
        Self::new()
    }
}

impl Native {
    /// An engine; the child process is started by the first `load`.
    pub fn new() -> Native {
        Native {
            child: None,
            code: Vec::new(),
            spawned: 0,
        }
    }

    fn child(&mut self) -> Result<&mut Child, String> {
        self.child
            .as_mut()
            .ok_or_else(|| "no host child".to_string())
    }

    fn fault(&mut self, sig: i32) -> Result<Fault, String> {
        let c = self.child()?;
        // SAFETY: siginfo_t is plain data; zero is a valid value.
        let mut si: libc::siginfo_t = unsafe { std::mem::zeroed() };
        ptrace(
            libc::PTRACE_GETSIGINFO,
            c.pid,
            &mut si as *mut _ as *mut libc::c_void,
        )?;
        let code = si.si_code;
        // SAFETY: si_addr is valid to read for SIGSEGV/SIGBUS/SIGFPE/SIGILL infos.
        let addr = unsafe { si.si_addr() } as u64 as u32;
        Ok(match sig {
            libc::SIGSEGV if code == SEGV_MAPERR || code == SEGV_ACCERR => Fault {
                vector: 14,
                addr: Some(addr),
            },
            libc::SIGSEGV => Fault {
                vector: 13,
                addr: None,
            },
            libc::SIGILL => Fault {
                vector: 6,
                addr: None,
            },
            libc::SIGFPE if code == FPE_INTDIV => Fault {
                vector: 0,
                addr: None,
            },
            libc::SIGFPE => Fault {
                vector: 16,
                addr: None,
            },
            libc::SIGBUS if code == BUS_ADRALN => Fault {
                vector: 17,
                addr: None,
            },
            libc::SIGBUS => Fault {
                vector: 12,
                addr: None,
            },
            s => return Err(format!("unexpected signal {s} (si_code {code})")),
        })
    }

    fn step_inner(&mut self) -> Result<Outcome, String> {
        let c = self.child()?;
        let start = c.regs.rip as u32;
        // The instruction's bytes, to notice a REP string instruction overwriting itself:
        // single-stepping re-fetches it after every iteration, which an uninterrupted
        // REP does not, so such a case cannot be reproduced and is given up.
        let mut first = [0u8; 16];
        let _ = c.mem.read_at(&mut first, start as u64);
        let mut n = 0;
        loop {
            let c = self.child()?;
            ptrace(libc::PTRACE_SYSEMU_SINGLESTEP, c.pid, std::ptr::null_mut())?;
            let sig = wait_stop(c.pid)?;
            if sig == libc::SIGTRAP | 0x80 {
                return Err("the code made a system call (stopped, not run)".into());
            }
            if sig != libc::SIGTRAP {
                let f = self.fault(sig)?;
                self.child()?.getregs()?;
                return Ok(Outcome::Fault(f));
            }
            c.getregs()?;
            n += 1;
            if c.regs.rip as u32 != start || n >= MAX_ITERATIONS {
                break;
            }
            let mut now = [0u8; 16];
            let _ = c.mem.read_at(&mut now, start as u64);
            if now != first {
                return Err("a REP string instruction overwrote itself".into());
            }
        }
        // PUSHF under single-step pushes the TF the tracer set: clear it in the image.
        let off = start.wrapping_sub(CODE_BASE) as usize;
        let (size, at) = match self.code.get(off..off + 2) {
            Some([0x9c, _]) => (4, true),
            Some([0x66, 0x9c]) => (2, true),
            _ => (0, false),
        };
        if at {
            let c = self.child()?;
            let esp = c.regs.rsp as u32;
            let mut b = [0u8; 4];
            c.read(esp, &mut b[..size])?;
            b[1] &= !((EFLAGS_TF >> 8) as u8);
            c.write(esp, &b[..size])?;
        }
        Ok(Outcome::Done)
    }
}

impl Engine for Native {
    fn load(&mut self, code: &[u8], st: &State) -> Result<State, String> {
        if self.child.is_none() {
            self.child = Some(Child::spawn()?);
            self.spawned += 1;
        }
        let mut img = vec![0xccu8; CODE_SIZE as usize];
        img[..code.len()].copy_from_slice(code);
        self.code = img;
        set_alarm(TIMEOUT_SECS);
        let code = self.code.clone();
        let r = (|| {
            let c = self.child()?;
            c.write(CODE_BASE, &code)?;
            c.write(MEM_BASE, &st.mem)?;
            let g = &st.gpr;
            let r = &mut c.regs;
            r.rax = g[0] as u64;
            r.rcx = g[1] as u64;
            r.rdx = g[2] as u64;
            r.rbx = g[3] as u64;
            r.rsp = g[4] as u64;
            r.rbp = g[5] as u64;
            r.rsi = g[6] as u64;
            r.rdi = g[7] as u64;
            r.rip = st.eip as u64;
            r.eflags = st.eflags as u64;
            r.orig_rax = u64::MAX;
            ptrace(
                libc::PTRACE_SETREGS,
                c.pid,
                &mut c.regs as *mut _ as *mut libc::c_void,
            )?;
            let mut b = FxBuf([0; 512]);
            st.fx.to_fxsave(&mut b.0);
            ptrace(
                libc::PTRACE_SETFPREGS,
                c.pid,
                b.0.as_mut_ptr() as *mut libc::c_void,
            )?;
            c.state()
        })();
        if r.is_err() {
            self.child = None;
        }
        r
    }

    fn step(&mut self) -> Result<Outcome, String> {
        let r = self.step_inner();
        if r.is_err() {
            self.child = None;
        }
        r
    }

    fn state(&mut self) -> Result<State, String> {
        let r = self.child()?.state();
        if r.is_err() {
            self.child = None;
        }
        r
    }

    fn finish(&mut self) {
        set_alarm(0);
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The host runs a known sequence: ADD sets the flags the SDM gives for
    /// 0x7fffffff + 1 (OF, SF, AF, and PF as the low byte 00 has even parity; not CF,
    /// ZF), a store lands in the data area, and
    /// an access to an unmapped page is a #PF with CR2 = that address.
    #[test]
    fn host_runs_known_code() {
        let mut n = Native::new();
        let mut st = State::default();
        st.gpr[0] = 0x7fff_ffff;
        st.gpr[3] = DATA_BASE + 0x10;
        st.gpr[4] = super::super::STACK_INIT;
        st.fx.fcw = 0x37f;
        st.fx.mxcsr = 0x1f80;
        // add eax,1 ; mov [ebx],eax ; mov ecx,[0x1000]
        let code = [
            0x83, 0xc0, 0x01, 0x89, 0x03, 0x8b, 0x0d, 0x00, 0x10, 0x00, 0x00,
        ];
        let s0 = n.load(&code, &st).expect("load");
        assert_eq!(s0.gpr[0], 0x7fff_ffff);
        assert_eq!(n.step().unwrap(), Outcome::Done);
        let s1 = n.state().unwrap();
        assert_eq!(s1.gpr[0], 0x8000_0000);
        assert_eq!(s1.eip, CODE_BASE + 3);
        let (cf, pf, af, zf, sf, of) = (1, 4, 0x10, 0x40, 0x80, 0x800);
        assert_eq!(s1.eflags & (cf | pf | af | zf | sf | of), of | sf | af | pf);
        assert_eq!(n.step().unwrap(), Outcome::Done);
        let s2 = n.state().unwrap();
        let at = (DATA_BASE + 0x10 - MEM_BASE) as usize;
        assert_eq!(&s2.mem[at..at + 4], &0x8000_0000u32.to_le_bytes());
        assert_eq!(
            n.step().unwrap(),
            Outcome::Fault(Fault {
                vector: 14,
                addr: Some(0x1000)
            })
        );
        assert_eq!(n.state().unwrap().eip, CODE_BASE + 5);
        n.finish();
    }
}
