//! The operating system, written once. Every crate that replaces a file durably, asks for free
//! space or a filesystem's type, identifies a process by its start time, takes a listening socket
//! from its parent, reads the clock or marks a durability boundary for fault tests does it through
//! this crate, so each of those subtle details has exactly one implementation to get right.
//!
//! Leaf crate: it depends on `libc` only and knows nothing of Ferry's components.

pub mod fail;
pub mod fs;
pub mod listen;
pub mod proc;
pub mod time;
