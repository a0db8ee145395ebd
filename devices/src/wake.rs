//! A wake-up signal for the run loop: devices fed from other threads (serial input,
//! key injection) notify it, and an idle vCPU sleeps on it until its next timer deadline.

use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex};
use std::time::Duration;

use crate::bus::lock;

/// A sticky "something happened" flag with a condition variable. Cheap to clone.
#[derive(Clone, Default)]
pub struct Wakeup {
    inner: Arc<(Mutex<bool>, Condvar)>,
    poked: Arc<AtomicBool>,
}

impl std::fmt::Debug for Wakeup {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Wakeup")
    }
}

impl Wakeup {
    /// A signal that has not fired.
    pub fn new() -> Self {
        Self::default()
    }

    /// Fires the signal (from any thread).
    pub fn notify(&self) {
        self.poked.store(true, Ordering::SeqCst);
        let (m, cv) = &*self.inner;
        *lock(m) = true;
        cv.notify_all();
    }

    /// Lock-free: whether [`Wakeup::notify`] ran since the last [`Wakeup::take_poke`].
    pub fn poked(&self) -> bool {
        self.poked.load(Ordering::SeqCst)
    }

    /// Clears the flag [`Wakeup::poked`] reads; returns its value.
    pub fn take_poke(&self) -> bool {
        self.poked.swap(false, Ordering::SeqCst)
    }

    /// Sleeps until the signal fires or `timeout` passes (`None`: no timeout); returns
    /// whether it fired, and re-arms it.
    pub fn wait(&self, timeout: Option<Duration>) -> bool {
        let (m, cv) = &*self.inner;
        let mut g = lock(m);
        if !*g {
            g = match timeout {
                Some(t) => {
                    cv.wait_timeout_while(g, t, |fired| !*fired)
                        .unwrap_or_else(|e| e.into_inner())
                        .0
                }
                None => cv
                    .wait_while(g, |fired| !*fired)
                    .unwrap_or_else(|e| e.into_inner()),
            };
        }
        std::mem::replace(&mut *g, false)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn notify_wakes_a_sleeper_and_timeout_expires() {
        let w = Wakeup::new();
        assert!(!w.wait(Some(Duration::from_millis(1))));
        let w2 = w.clone();
        let t = std::thread::spawn(move || w2.notify());
        assert!(w.wait(Some(Duration::from_secs(10))));
        t.join().unwrap();
        w.notify();
        assert!(w.wait(None), "sticky: a notify before the wait counts");
        assert!(w.take_poke());
        assert!(!w.poked());
    }
}
