//! # ferry-nbd — Ferry's asynchronous NBD server
//!
//! An implementation of the server side of the
//! [NBD protocol](https://github.com/NetworkBlockDevice/nbd/blob/master/doc/proto.md)
//! on top of tokio, tested against unmodified `qemu-io`/`qemu-img`/`qemu-nbd
//! --list` and libnbd's `nbdinfo`/`nbdcopy`.
//!
//! ## Supported protocol
//!
//! * Fixed newstyle handshake (`NBD_FLAG_FIXED_NEWSTYLE`, `NBD_FLAG_NO_ZEROES`).
//! * Options: `EXPORT_NAME`, `GO`, `INFO` (`NBD_INFO_EXPORT`, `NAME`,
//!   `DESCRIPTION`, `BLOCK_SIZE` = min 1 / preferred 4096 / max 32 MiB), `LIST`,
//!   `ABORT`, `STRUCTURED_REPLY`, `LIST_META_CONTEXT`/`SET_META_CONTEXT`
//!   (`base:allocation` only), `STARTTLS` (when a TLS acceptor is configured;
//!   with `require_tls` every option other than `STARTTLS`/`ABORT` is answered
//!   `NBD_REP_ERR_TLS_REQD`, and `EXPORT_NAME` closes the connection). Any
//!   other option (e.g. `EXTENDED_HEADERS`) gets `NBD_REP_ERR_UNSUP`.
//! * Commands: `READ`, `WRITE` (+`FUA`), `DISC`, `FLUSH`, `TRIM`,
//!   `WRITE_ZEROES` (+`NO_HOLE`, `FUA`), `BLOCK_STATUS` (`base:allocation`),
//!   `CACHE` (accepted as a no-op, not advertised). Simple replies unless
//!   structured replies were negotiated; then reads use a single
//!   `OFFSET_DATA` chunk (so `SEND_DF` is advertised), errors use
//!   `NBD_REPLY_TYPE_ERROR` chunks.
//! * Transmission flags: `HAS_FLAGS`, `SEND_FLUSH`, `SEND_FUA`, `SEND_TRIM`,
//!   `SEND_WRITE_ZEROES` (the last three not for read-only exports),
//!   `READ_ONLY`, `SEND_DF` (with structured replies), `CAN_MULTI_CONN` (only if
//!   [`Backend::can_multi_conn`]).
//!
//! ## Concurrency and ordering
//!
//! Each connection has a reader task that parses requests, a single writer
//! task that sends replies (batched, possibly out of request order), and one
//! dedicated blocking worker thread. Write-type requests (`WRITE`,
//! `WRITE_ZEROES`, `TRIM`) and `FLUSH` are queued to that worker in the order
//! they were received, so backend write calls of one connection *start* (and
//! complete) in request order and never overlap — the backend may assign
//! sequence numbers. Reads and block-status queries run concurrently on
//! tokio's blocking pool. In-flight data per connection is bounded
//! (64 MiB budget), so a client pipelining many requests cannot exhaust memory.
//!
//! ## Hostile clients
//!
//! Wire parsing is done by pure functions in [`proto`] (fuzzed by the
//! `nbd_request` target in `fuzz/`). Invalid requests that leave the stream in
//! sync get an error reply (`EINVAL` for unknown commands/flags or reads past
//! the end, `ENOSPC` for writes past the end, `EOVERFLOW` for reads above
//! 32 MiB, `EPERM` for writes to read-only exports). Requests that desync the
//! stream or would need attacker-sized buffers (bad magic, WRITE payload above
//! 32 MiB, option data above 64 KiB, too many options) close only that
//! connection with a `tracing` warning. No buffer is ever sized from an
//! unchecked client value, and nothing on the network path panics.

#![deny(clippy::unwrap_used, clippy::expect_used)]
#![cfg_attr(test, allow(clippy::unwrap_used, clippy::expect_used))]

mod backend;
pub mod backends;
pub mod client;
pub mod proto;
mod server;

use std::collections::BTreeMap;
use std::sync::{Arc, RwLock};

pub use backend::{Backend, BackendError, Extent, BLOCK};
#[cfg(feature = "testing")]
pub use backends::VolatileCacheFileBackend;
pub use backends::{CowBackend, FileBackend, MemBackend};
pub use client::{AnyStream, ClientError, NbdClient};
pub use proto::ProtocolError;
pub use server::{handle_connection, serve_tcp, serve_unix, CONNECTION_BUDGET};

/// A named export.
pub struct Export {
    pub name: String,
    pub description: String,
    pub backend: Arc<dyn Backend>,
}

impl std::fmt::Debug for Export {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("Export")
            .field("name", &self.name)
            .field("description", &self.description)
            .field("size", &self.backend.size())
            .finish()
    }
}

/// Runtime-mutable set of exports, shared by all connections. Changes affect
/// new negotiations only; connected clients keep their backend.
#[derive(Clone, Default)]
pub struct Exports {
    inner: Arc<RwLock<BTreeMap<String, Arc<Export>>>>,
}

impl std::fmt::Debug for Exports {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_list().entries(self.names()).finish()
    }
}

impl Exports {
    pub fn new() -> Self {
        Self::default()
    }

    /// Add (or replace) an export.
    pub fn insert(&self, export: Export) {
        let mut m = self.inner.write().unwrap_or_else(|e| e.into_inner());
        m.insert(export.name.clone(), Arc::new(export));
    }

    /// Remove an export; returns whether it existed.
    pub fn remove(&self, name: &str) -> bool {
        let mut m = self.inner.write().unwrap_or_else(|e| e.into_inner());
        m.remove(name).is_some()
    }

    /// Names of all exports, sorted.
    pub fn names(&self) -> Vec<String> {
        let m = self.inner.read().unwrap_or_else(|e| e.into_inner());
        m.keys().cloned().collect()
    }

    /// Look an export up by name. `""` maps to the only export if exactly one exists.
    pub fn get(&self, name: &str) -> Option<Arc<Export>> {
        let m = self.inner.read().unwrap_or_else(|e| e.into_inner());
        if let Some(e) = m.get(name) {
            return Some(e.clone());
        }
        if name.is_empty() && m.len() == 1 {
            return m.values().next().cloned();
        }
        None
    }

    pub(crate) fn all(&self) -> Vec<Arc<Export>> {
        let m = self.inner.read().unwrap_or_else(|e| e.into_inner());
        m.values().cloned().collect()
    }
}

/// Server configuration.
pub struct ServerConfig {
    pub exports: Exports,
    /// Enables `NBD_OPT_STARTTLS`.
    pub tls: Option<tokio_rustls::TlsAcceptor>,
    /// Refuse everything but `STARTTLS`/`ABORT` until TLS is up.
    pub require_tls: bool,
    /// What all connections together may hold.
    pub limits: Limits,
    /// Who may attach over TLS: called with the finished handshake; an error closes the
    /// connection before any export is named (the agent allows only its machine's NBD client).
    /// An accepted client may come with a [`CutSignal`]: the connection is closed when it
    /// resolves (the agent's: the client's certificate was revoked).
    pub tls_client_check: Option<TlsClientCheck>,
}

/// See [`ServerConfig::tls_client_check`].
pub type TlsClientCheck =
    Arc<dyn Fn(&tokio_rustls::rustls::CommonState) -> Result<Option<CutSignal>, String> + Send + Sync>;

/// Resolves, with the reason, when an accepted TLS client's connection must be closed.
pub type CutSignal = std::pin::Pin<Box<dyn std::future::Future<Output = String> + Send>>;

impl ServerConfig {
    pub fn new(exports: Exports, tls: Option<tokio_rustls::TlsAcceptor>, require_tls: bool) -> Self {
        ServerConfig { exports, tls, require_tls, limits: Limits::default(), tls_client_check: None }
    }
}

/// Bounds across all connections of one server, so that clients that open many connections, or
/// ask for data they never read, cannot grow the server's memory or threads without limit.
#[derive(Debug, Clone)]
pub struct Limits {
    /// Connections served at once; one more is closed at accept.
    pub connections: Arc<tokio::sync::Semaphore>,
    /// Bytes of requests and replies in flight across all connections (each connection also has
    /// its own budget, [`CONNECTION_BUDGET`]).
    pub inflight_bytes: Arc<tokio::sync::Semaphore>,
    /// Time a client has from connecting to the end of option negotiation.
    pub negotiation_timeout: std::time::Duration,
}

impl Limits {
    pub const MAX_CONNECTIONS: usize = 64;
    pub const TOTAL_INFLIGHT_BYTES: usize = 96 << 20;
}

impl Default for Limits {
    fn default() -> Self {
        Limits {
            connections: Arc::new(tokio::sync::Semaphore::new(Self::MAX_CONNECTIONS)),
            inflight_bytes: Arc::new(tokio::sync::Semaphore::new(Self::TOTAL_INFLIGHT_BYTES)),
            negotiation_timeout: std::time::Duration::from_secs(30),
        }
    }
}

/// Errors ending one connection.
#[derive(Debug, thiserror::Error)]
pub enum NbdError {
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
    #[error("protocol violation: {0}")]
    Protocol(#[from] ProtocolError),
    #[error("client requested unknown export {0:?}")]
    UnknownExport(String),
    #[error("client tried to skip the required TLS negotiation")]
    TlsRequired,
    #[error("TLS handshake failed: {0}")]
    Tls(std::io::Error),
    #[error("TLS client refused: {0}")]
    TlsClientRefused(String),
    #[error("connection cut: {0}")]
    Cut(String),
    #[error("request payload of {0} bytes exceeds the 32 MiB limit")]
    Oversized(u32),
    #[error("too many options during negotiation")]
    TooManyOptions,
}
