use std::path::PathBuf;

use ferry_tls::TlsFiles;
use serde::{Deserialize, Serialize};

/// Configuration of `ferry agent` (the mobility service of one machine).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// The protected machine's name.
    pub machine: String,
    /// Where the agent keeps its activity log, change bitmap and state.
    pub state_dir: PathBuf,
    /// The process server's address for agents.
    pub process_server: String,
    /// Name in the process server's certificate.
    #[serde(default = "default_ps_name")]
    pub process_server_name: String,
    /// NBD export address (the machine's disk interface). Loopback only unless `nbd_tls` is set.
    #[serde(default)]
    pub nbd_listen: Option<String>,
    /// NBD export on a unix socket.
    #[serde(default)]
    pub nbd_socket: Option<PathBuf>,
    /// Require NBD clients to use TLS (STARTTLS) with this agent's certificate. Mandatory when
    /// `nbd_listen` is not a loopback address.
    #[serde(default)]
    pub nbd_tls: bool,
    /// Status endpoint (plain HTTP, loopback).
    #[serde(default)]
    pub status_listen: Option<String>,
    pub tls: TlsFiles,
    pub disks: Vec<DiskConfig>,
    /// Bound of the in-order log held in memory while the process server has not acknowledged it.
    /// When it overflows, the agent falls back to its change bitmap and resyncs later.
    #[serde(default = "default_log_limit")]
    pub log_limit_bytes: u64,
    /// Activity-log slots (each covers `al_extent_bytes` of one disk).
    #[serde(default = "default_al_extents")]
    pub al_extents: usize,
    #[serde(default = "default_al_extent_bytes")]
    pub al_extent_bytes: u64,
    /// How often the agent persists its change bitmap and checks the activity log, seconds.
    #[serde(default = "default_maintenance")]
    pub maintenance_interval_secs: f64,
    /// Retiring activity-log extents needs a flush of the disks, which stalls writers on a busy
    /// disk; it runs at this interval, or earlier once half the activity log is in use.
    #[serde(default = "default_retire")]
    pub al_retire_interval_secs: f64,
    #[serde(default = "default_reconnect")]
    pub reconnect_interval_secs: f64,
    /// Bytes of records per frame to the process server.
    #[serde(default = "default_batch")]
    pub batch_bytes: usize,
    /// Bytes read per resync step.
    #[serde(default = "default_resync_chunk")]
    pub resync_chunk_bytes: u64,
    /// On shutdown, wait this long for the process server to acknowledge the log before
    /// converting the rest into the change bitmap.
    #[serde(default = "default_drain")]
    pub shutdown_drain_secs: f64,
    /// Hold shipping (writes are still logged and tracked): for maintenance and benchmarks.
    #[serde(default)]
    pub shipping_paused: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskConfig {
    /// Stable disk name; the export name and the target file name.
    pub name: String,
    /// The raw image file.
    pub path: PathBuf,
    /// Disk UUID; generated on first start when absent.
    #[serde(default)]
    pub uuid: Option<String>,
    /// TEST ONLY: `volatile` keeps unflushed writes in process memory, so SIGKILL loses them like
    /// a power cut loses the page cache.
    #[serde(default)]
    pub cache: DiskCache,
}

#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum DiskCache {
    #[default]
    PageCache,
    Volatile,
}

fn default_ps_name() -> String {
    "process-server".into()
}
fn default_log_limit() -> u64 {
    256 << 20
}
fn default_al_extents() -> usize {
    1024
}
fn default_al_extent_bytes() -> u64 {
    4 << 20
}
fn default_maintenance() -> f64 {
    1.0
}
fn default_retire() -> f64 {
    30.0
}
fn default_reconnect() -> f64 {
    1.0
}
fn default_batch() -> usize {
    1 << 20
}
fn default_resync_chunk() -> u64 {
    1 << 20
}
fn default_drain() -> f64 {
    5.0
}
