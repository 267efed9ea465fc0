//! Ferry's end-to-end tests: real `ferry` processes on loopback with TLS, real qemu clients, real
//! SIGKILLs. One test binary (it links once); each module is one area of behaviour.

// A test that meets the unexpected should stop right there, loudly.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod harness;

mod bad_input;
mod config_server;
mod control_plane;
mod disable;
mod failover;
mod failover_cancel;
mod failover_jobs;
mod failpoints;
mod faults;
mod group_points;
mod lab;
mod lab_sites;
mod recovery_points;
mod replication;
mod reprotect;
mod security;
mod site_lost;
mod test_failover;
