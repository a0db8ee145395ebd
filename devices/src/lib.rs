//! morph86-devices: the PC platform devices (work in progress).
#![deny(missing_docs)]

pub mod bus;
pub mod clock;
pub mod control;
pub mod debug;
pub mod i8042;
pub mod irq;
pub mod pci;
pub mod pic;
pub mod pit;
pub mod port92;
pub mod rtc;
pub mod serial;
pub mod wake;
