use std::path::PathBuf;

use ferry_protocol::{DiskName, MachineName};
use ferry_tls::TlsFiles;
use serde::{Deserialize, Serialize};

impl AgentConfig {
    /// The unix socket of the NBD export: `nbd_socket`, or `<state_dir>/nbd.sock` when no
    /// export is configured at all.
    pub fn nbd_socket_path(&self) -> Option<PathBuf> {
        match (&self.nbd_socket, &self.nbd_listen) {
            (Some(p), _) => Some(p.clone()),
            (None, Some(_)) => None,
            (None, None) => Some(self.state_dir.join("nbd.sock")),
        }
    }

    /// Where the control token is kept.
    pub fn control_token_path(&self) -> PathBuf {
        self.control_token_file.clone().unwrap_or_else(|| self.state_dir.join("control-token"))
    }
}

/// Configuration of `ferry agent` (the mobility service of one machine).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct AgentConfig {
    /// The protected machine's name.
    pub machine: MachineName,
    /// Where the agent keeps its activity log, change bitmap and state.
    pub state_dir: PathBuf,
    /// The process server's address for agents. None: tracking only (a failed-over machine
    /// before its reprotect): writes are tracked in the change bitmap, nothing is shipped.
    #[serde(default)]
    pub process_server: Option<String>,
    /// Name in the process server's certificate.
    #[serde(default = "default_ps_name")]
    pub process_server_name: String,
    /// NBD export over TCP (the machine's disk interface). Only with `nbd_tls`: a plain TCP
    /// export, loopback included, would let every local user write the protected disks.
    #[serde(default)]
    pub nbd_listen: Option<String>,
    /// NBD export on a unix socket, owner-only (0600). The default when neither is set:
    /// `<state_dir>/nbd.sock`.
    #[serde(default)]
    pub nbd_socket: Option<PathBuf>,
    /// Require NBD clients on `nbd_listen` to use TLS (STARTTLS) with the certificate issued to
    /// this machine's NBD client (`nbd-client/MACHINE`). Mandatory for `nbd_listen`.
    #[serde(default)]
    pub nbd_tls: bool,
    /// Status endpoint (plain HTTP, loopback).
    #[serde(default)]
    pub status_listen: Option<String>,
    /// The control token's file (default `<state_dir>/control-token`): created owner-only at
    /// first start; points, group points and verify need it (`ferry agent …` reads it).
    #[serde(default)]
    pub control_token_file: Option<PathBuf>,
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
    #[serde(default = "default_maintenance", deserialize_with = "ferry_types::bounds::secs")]
    pub maintenance_interval_secs: f64,
    /// Retiring activity-log extents needs a flush of the disks, which stalls writers on a busy
    /// disk; it runs at this interval, or earlier once half the activity log is in use.
    #[serde(default = "default_retire", deserialize_with = "ferry_types::bounds::secs")]
    pub al_retire_interval_secs: f64,
    #[serde(default = "default_reconnect", deserialize_with = "ferry_types::bounds::secs")]
    pub reconnect_interval_secs: f64,
    /// Bytes of records per frame to the process server.
    #[serde(default = "default_batch")]
    pub batch_bytes: usize,
    /// Bytes read per resync step.
    #[serde(default = "default_resync_chunk")]
    pub resync_chunk_bytes: u64,
    /// On shutdown, wait this long for the master target to confirm what it lacks (not merely
    /// the process server) before converting the rest into the change bitmap.
    #[serde(default = "default_drain", deserialize_with = "ferry_types::bounds::secs")]
    pub shutdown_drain_secs: f64,
    /// Hold shipping (writes are still logged and tracked): for maintenance and benchmarks.
    #[serde(default)]
    pub shipping_paused: bool,
    /// Crash-consistent recovery point (a tag in the stream) every this many seconds (POL-1:
    /// 5 minutes). 0 turns the timer off (points can still be requested).
    #[serde(default = "default_crash_interval", deserialize_with = "ferry_types::bounds::secs")]
    pub crash_point_interval_secs: f64,
    /// App-consistent recovery point every this many seconds (policy default 60 min); 0 = off.
    #[serde(default = "default_app_interval", deserialize_with = "ferry_types::bounds::secs")]
    pub app_point_interval_secs: f64,
    /// Run before an app-consistent tag (`sh -c`): quiesce applications and flush (e.g.
    /// `fsfreeze -f /data`; on Windows the VSS requestor). Non-zero exit = no app-consistent point.
    #[serde(default)]
    pub freeze_command: Option<String>,
    /// Run after the tag (always, also when the freeze failed): e.g. `fsfreeze -u /data`.
    #[serde(default)]
    pub thaw_command: Option<String>,
    /// A hook running longer than this is killed and the point abandoned.
    #[serde(default = "default_hook_timeout", deserialize_with = "ferry_types::bounds::secs")]
    pub hook_timeout_secs: f64,
    /// Multi-machine consistency: this machine's replication group.
    #[serde(default)]
    pub group: Option<GroupConfig>,
    /// DIAGNOSTIC/TEST: append every local write (seq, disk, offset, data) and tag seq to this
    /// file, so recovery points can be checked against what the source really wrote.
    #[serde(default)]
    pub source_write_log: Option<PathBuf>,
    /// A failed-over machine: the master target's seed file (the extents after the failover
    /// point), counted as changed when first seen (and again when the point changes).
    #[serde(default)]
    pub failover_seed: Option<PathBuf>,
    /// A failed-over machine: where the agent says what it wrote at the recovery site (marked
    /// unclean while it runs, complete after a clean stop), for a change of recovery point.
    #[serde(default)]
    pub recovery_writes_file: Option<PathBuf>,
    /// Regions to resync once on top of what this agent tracked (a reprotect: what the old
    /// primary wrote that never reached the recovery site). Counted once per order.
    #[serde(default)]
    pub resync_seed: Option<ferry_api::control::ResyncSeed>,
    /// Protection was disabled (the configuration server's disable job sets it): the disks are
    /// served, nothing ships, and the replication state (`state.json`, `activity.log`,
    /// `dirty.map`) is deleted at each start, so a later protection copies the disks again in
    /// full — the replica it had was deleted with it. Needs no `process_server`.
    #[serde(default)]
    pub protection_disabled: bool,
    /// Heartbeats to a configuration server (from `ferry register`); standalone without it.
    #[serde(default)]
    pub config_server: Option<ferry_status::ConfigServerLink>,
}

/// Membership in a replication group. Every member answers prepare/commit on its status listener;
/// the coordinator (one member) drives the group tags.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GroupConfig {
    pub name: String,
    /// This agent takes the group's tags (exactly one member should).
    #[serde(default)]
    pub coordinator: bool,
    /// Coordinator only: the group's Ed25519 private key (hex PKCS#8) that signs every
    /// prepare/commit/abort.
    #[serde(default)]
    pub coordinator_key: Option<String>,
    /// Members: the coordinator key's public half (hex). Without it this member refuses every
    /// group request (nobody else may hold its writes).
    #[serde(default)]
    pub coordinator_public_key: Option<String>,
    /// Coordinator only: the status addresses (host:port) of the other members' agents.
    #[serde(default)]
    pub members: Vec<String>,
    /// Coordinator only: a multi-machine crash-consistent tag every this many seconds (0 = off).
    #[serde(default = "default_crash_interval", deserialize_with = "ferry_types::bounds::secs")]
    pub crash_interval_secs: f64,
    /// Coordinator only: a multi-machine app-consistent tag every this many seconds (0 = off).
    #[serde(default, deserialize_with = "ferry_types::bounds::secs")]
    pub app_interval_secs: f64,
    /// How long members hold writes waiting for every member to prepare; past it the tag is
    /// abandoned (no partial multi-machine point).
    #[serde(default = "default_prepare_timeout", deserialize_with = "ferry_types::bounds::secs")]
    pub prepare_timeout_secs: f64,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct DiskConfig {
    /// Stable disk name; the export name and the target file name.
    pub name: DiskName,
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

fn default_crash_interval() -> f64 {
    300.0
}
fn default_app_interval() -> f64 {
    3600.0
}
fn default_hook_timeout() -> f64 {
    60.0
}
fn default_prepare_timeout() -> f64 {
    10.0
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
