//! Bounds across connections: a connection cap, a negotiation time limit, and one in-flight
//! budget shared by all connections, so clients that open many connections or ask for data they
//! never read cannot grow the server without limit.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::Read;
use std::sync::Arc;
use std::time::{Duration, Instant};

use common::*;
use ferry_nbd::proto::*;
use ferry_nbd::{Exports, Limits, MemBackend, ServerConfig};

fn exports(size: u64) -> Exports {
    let e = Exports::new();
    e.insert(export("d", Arc::new(MemBackend::new(size))));
    e
}

/// Whether the server closes a fresh connection at once (before or instead of its greeting).
fn refused_at_accept(port: u16) -> bool {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).unwrap();
    s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
    let mut g = [0u8; 18];
    !matches!(s.read_exact(&mut g), Ok(()))
}

#[test]
fn connections_beyond_the_cap_are_closed_and_a_silent_client_is_timed_out() {
    let limits = Limits {
        connections: Arc::new(tokio::sync::Semaphore::new(3)),
        negotiation_timeout: Duration::from_secs(3),
        ..Limits::default()
    };
    let srv = start_tcp_with(ServerConfig { limits, ..ServerConfig::new(exports(1 << 20), None, false) });
    let mut held: Vec<RawClient> = (0..3).map(|_| RawClient::connect(srv.port)).collect();
    assert!(refused_at_accept(srv.port), "a fourth connection is served beyond the cap of 3");
    // The three say nothing after the greeting: each is closed once the time limit passes
    // (is_closed waits up to 10 s for the close)...
    for c in &mut held {
        assert!(c.is_closed(), "a client that never negotiates keeps its connection");
    }
    // ...and its slot serves a new client.
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let mut s = std::net::TcpStream::connect(("127.0.0.1", srv.port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut g = [0u8; 18];
        if s.read_exact(&mut g).is_ok() {
            break;
        }
        assert!(Instant::now() < deadline, "the freed slots serve no new client");
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn rss_bytes() -> u64 {
    let statm = std::fs::read_to_string("/proc/self/statm").unwrap();
    let pages: u64 = statm.split_whitespace().nth(1).unwrap().parse().unwrap();
    pages * 4096
}

/// 40 connections each asking for 4 x 32 MiB and reading nothing once held 64 MiB each (2.6 GiB
/// for the agent); now all of them together hold at most the server's in-flight budget.
#[test]
fn clients_that_never_read_their_replies_hold_at_most_the_shared_budget() {
    let limits = Limits::default();
    let budget = limits.inflight_bytes.clone();
    let srv = start_tcp_with(ServerConfig { limits, ..ServerConfig::new(exports(128 << 20), None, false) });
    let mut clients = Vec::new();
    let base = rss_bytes();
    for i in 0..40u64 {
        let mut c = RawClient::connect(srv.port);
        assert_eq!(c.go("d").last().unwrap().1, REP_ACK);
        for k in 0..4u64 {
            c.request(0, CMD_READ, i * 4 + k, k * (32 << 20), 32 << 20, &[]);
        }
        clients.push(c);
    }
    // Wait until the server holds all it may (the shared budget is used up), then measure.
    let deadline = Instant::now() + Duration::from_secs(60);
    while budget.available_permits() > 0 {
        assert!(Instant::now() < deadline, "the clients' reads never filled the shared budget");
        std::thread::sleep(Duration::from_millis(20));
    }
    let grown = rss_bytes().saturating_sub(base);
    // The budget (96 MiB) plus room for buffers and the test itself; without a shared budget it
    // grows by about a gigabyte.
    let bound: u64 = (96 + 64) << 20;
    assert!(grown <= bound, "memory grew by {} MiB (bound {} MiB)", grown >> 20, bound >> 20);
    drop(clients);
}
