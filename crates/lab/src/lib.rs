//! Ferry's lab: a whole two-site Ferry on one machine, as real processes on loopback. Neon's
//! `neon_local` and Crucible's `dsc` are the same kind of tool.
//!
//! - [`site`]: a lab description → site folders the local provider discovers; the daemons
//!   (configuration server, process servers, master targets, links) started in their own process
//!   groups with listeners handed down, registered, and supervised by pid and start time;
//!   `up`, `status`, `down`, `restart`, power operations, link control.
//! - [`guest`]: what a lab site's power-on runs for a machine: boot delay, registration, the
//!   agent from its settings, the workload, freeze/thaw hooks.
//! - [`link`]: a fault-injecting TCP proxy with a control endpoint.
//! - [`workload`]: verifiable records written through NBD exports, and the consistent-prefix check.
//! - [`demo`]: `ferry demo`, returning a report.
//! - [`launch`] and [`component`]: the one way a Ferry daemon is started (its configuration file,
//!   listeners handed down, ready file), used by the lab and by the end-to-end test harness.
//!
//! Architecture Invariant: the lab drives Ferry's components only as processes and through their
//! APIs; it depends on no agent, process-server or master-target crate. It prints nothing: progress
//! goes to a callback, results are returned, the binary renders them.

pub mod component;
pub mod demo;
pub mod guest;
pub mod launch;
pub mod link;
pub mod site;
pub mod workload;
