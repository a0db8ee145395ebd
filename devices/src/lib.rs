//! morph86-devices: the PC platform devices (work in progress).
#![deny(missing_docs)]

pub mod bus;
pub mod clock;
pub mod irq;
pub mod pic;
pub mod pit;
