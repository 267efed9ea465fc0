//! The agent's status listener: status, points on request, online verify, and the group
//! prepare/commit/abort protocol its coordinator runs with the other members' agents.

use std::path::PathBuf;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::route::{get, Method, Role, Route};
use crate::Event;

/// How the agent is shipping a machine's changes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Mode {
    /// Every write is shipped in order.
    Replicating,
    /// Copying the disks for the first time (where every agent starts).
    #[default]
    InitialSync,
    /// Copying changed regions (after a crash, a log overflow or a verify repair).
    Resync,
    /// No process server: every write is tracked (change bitmap), nothing is shipped — a
    /// failed-over machine at its recovery site until it is reprotected.
    Tracking,
    /// Protection was disabled: the disks are served, nothing is shipped, and a later
    /// protection copies them again from the start.
    Disabled,
}

impl Mode {
    pub fn as_str(self) -> &'static str {
        match self {
            Mode::Replicating => "replicating",
            Mode::InitialSync => "initial-sync",
            Mode::Resync => "resync",
            Mode::Tracking => "tracking",
            Mode::Disabled => "disabled",
        }
    }
}

/// `GET /status` of an agent (inside [`crate::control::ComponentStatus`]). `Default` is an agent
/// that has done nothing yet (tests build statuses from it).
#[derive(Debug, Clone, Default, Serialize, Deserialize, JsonSchema)]
pub struct AgentStatus {
    pub machine: String,
    /// Its configuration server link: settings age, unreachable since, revocations held.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_server_link: Option<crate::control::ServerLinkStatus>,
    pub status_listen: Option<String>,
    /// The file holding the control token the point, group and verify routes need (readable
    /// only by the agent's user).
    #[serde(default)]
    pub control_token_file: Option<String>,
    /// The process server this agent ships to.
    pub process_server: String,
    /// The NBD export over TCP (TLS only).
    pub nbd_listen: Option<String>,
    /// The NBD export's owner-only unix socket (`nbd+unix:///DISK?socket=PATH`).
    #[serde(default)]
    pub nbd_socket: Option<String>,
    pub mode: Mode,
    pub generation: u64,
    pub initial_sync_complete: bool,
    /// Replicating, nothing pending, and everything sent applied at the master target.
    pub caught_up: bool,
    pub connected: bool,
    /// The process server asked the agent to slow down (its cache is filling).
    pub throttled: bool,
    pub link_error: Option<String>,
    pub last_seq: u64,
    pub sent_seq: u64,
    pub process_server_durable_seq: u64,
    pub master_target_durable_seq: u64,
    pub applied_seq: u64,
    pub pending_log_bytes: u64,
    pub pending_log_records: usize,
    pub initial_sync_in_flight_bytes: u64,
    pub resync_pending_bytes: u64,
    pub resync: Option<ResyncProgress>,
    pub lag_seconds: f64,
    pub write_bytes_per_sec: f64,
    pub ship_bytes_per_sec: f64,
    pub shipped_bytes: u64,
    pub activity_log_extents: usize,
    /// The last resyncs (initial sync included), newest last.
    pub completed_resyncs: Vec<CompletedResync>,
    pub disks: Vec<AgentDisk>,
    pub points: PointStats,
    /// Writes held for a group tag (between prepare and commit).
    pub write_hold: Option<WriteHold>,
    /// Set while the agent takes no writes for a planned failover.
    #[serde(default)]
    pub quiesced: Option<Quiesced>,
    /// Which copy of the disks this agent tracks: its ID, and the copy and seq it forked from.
    #[serde(default)]
    pub lineage: Option<AgentLineage>,
    /// The last verify order of the settings and how far it got (absent when none was given
    /// since the agent started: an order is started again after a restart).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verify_order: Option<VerifyOrderStatus>,
    /// The agent's clock when it made this status (the server compares it with its own).
    #[serde(default)]
    pub clock_ms: u64,
    /// Why what changed on these disks is not known any more (its state was lost after the
    /// machine ran): a reprotect compares whole disks by block hash instead.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tracking_lost: Option<String>,
    pub events: Vec<Event>,
}

/// What a failed-over machine's agent starts from (`failover_seed`, a file the master target
/// writes beside the failed-over disks): the extents the disks were put back on — every one
/// the recovery site held after the point — which the agent counts as changed, since the
/// primary has them otherwise (a reprotect sends them back).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FailoverSeed {
    pub machine: String,
    /// The lineage ID of the copy the replica holds (the primary's): the parent of the copy
    /// that starts from this seed.
    #[serde(default)]
    pub lineage: u64,
    /// That copy's own ancestors, newest first: `(lineage, seq)` of each fork.
    #[serde(default)]
    pub lineage_ancestors: Vec<(u64, u64)>,
    /// The point the disks hold (`MACHINE@SEQ`); a new one (change point) is taken again.
    pub point: String,
    pub point_seq: u64,
    pub extents: Vec<crate::master_target::DiskExtent>,
}

/// What a tracking agent wrote at the recovery site (`recovery_writes_file`, beside its disks):
/// `clean` once it stopped cleanly with `extents` complete; false while it runs (or after a
/// crash), when its writes are known only from its own state.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RecoveryWrites {
    pub machine: String,
    pub clean: bool,
    pub extents: Vec<crate::master_target::DiskExtent>,
}

/// An agent's lineage (see `ferry_protocol::Lineage`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct AgentLineage {
    pub id: u64,
    #[serde(default)]
    pub parent_id: Option<u64>,
    #[serde(default)]
    pub parent_seq: Option<u64>,
    /// The parent's ancestors, newest first: `(lineage, seq)` of each earlier fork.
    #[serde(default)]
    pub ancestors: Vec<(u64, u64)>,
}

/// A planned failover's order to stop taking writes (the agent's settings, `quiesce`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct QuiesceOrder {
    pub order: String,
}

/// The agent took its last write for a planned failover: the machine's freeze hook ran (its
/// applications flushed and paused), then every later write is refused (EPERM). Nothing after
/// `last_seq` exists, so a recovery site holding `last_seq` holds every acknowledged write.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Quiesced {
    pub order: String,
    pub last_seq: u64,
    pub at_ms: u64,
    /// Whether the freeze hook ran and succeeded (false: none is configured, or it failed, and
    /// the applications' writes since are refused rather than paused).
    pub frozen: bool,
    #[serde(default)]
    pub message: Option<String>,
}

/// The resync running now.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ResyncProgress {
    /// Why it runs (`InitialSync`, `AgentRecovery`, `LogOverflow`, `VerifyRepair`, …).
    pub reason: String,
    pub generation: u64,
    pub bytes_total: u64,
    pub bytes_done: u64,
    pub percent: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct CompletedResync {
    pub reason: String,
    pub bytes_copied: u64,
    pub hole_bytes_zeroed: u64,
    pub bytes_planned: u64,
    pub time_ms: u64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct AgentDisk {
    pub name: String,
    pub path: PathBuf,
    pub size: u64,
    pub uuid: String,
    pub resync_pending_bytes: u64,
}

/// Consistency tags the agent inserted.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct PointStats {
    pub crash_tags: u64,
    pub app_tags: u64,
    pub app_failures: u64,
    pub group_commits: u64,
    pub group_aborts: u64,
    pub last_crash_tag_seq: Option<u64>,
    pub last_app_tag_seq: Option<u64>,
    pub last_group_tag: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct WriteHold {
    pub group: String,
    pub tag: String,
}

/// `POST /points/crash` and `/points/app`: the tag inserted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct TagTaken {
    pub seq: u64,
    /// `crash` or `app`.
    pub kind: String,
}

/// `POST /group/point` (coordinator only).
#[derive(Debug, Clone, Default, Serialize, Deserialize, JsonSchema)]
pub struct GroupPointRequest {
    #[serde(default)]
    pub app: bool,
}

/// What a group round did.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct GroupReport {
    pub group: String,
    pub tag: String,
    pub app: bool,
    pub committed: bool,
    /// The machines that prepared.
    pub members: Vec<String>,
    pub failures: Vec<String>,
    pub commit_failures: Vec<String>,
}

/// A group prepare/commit/abort request between agents.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct GroupRequest {
    pub group: String,
    pub tag: String,
    #[serde(default)]
    pub app: bool,
    #[serde(default = "default_timeout_ms")]
    pub timeout_ms: u64,
    /// Commit only: the machines that prepared.
    #[serde(default)]
    pub members: Vec<String>,
    /// Unix ms after which a prepare is refused (the coordinator has given up); 0 = none.
    #[serde(default)]
    pub deadline_ms: u64,
}

fn default_timeout_ms() -> u64 {
    10_000
}

/// A member's answer to prepare, commit or abort.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct GroupAnswer {
    pub machine: String,
    /// The marker's seq (none when there was nothing to commit or abort here).
    pub seq: Option<u64>,
}

/// `POST /verify`.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct VerifyRequest {
    pub disk: String,
    /// Resync the differing blocks once the comparison ends.
    #[serde(default)]
    pub repair: bool,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct VerifyStarted {
    pub verify_id: u64,
}

/// State of an online verify.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum VerifyState {
    Running,
    Complete,
    Failed,
}

/// How a verify order went: every disk compared block by block with the replica at the same
/// point of the change stream.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct VerifyOrderStatus {
    pub order: String,
    pub repair: bool,
    /// `running` until every disk's comparison came back, then `complete`; `failed` names why
    /// in `error` (the agent starts the order again once it replicates in order).
    pub state: VerifyState,
    pub error: Option<String>,
    pub block_size: u32,
    pub blocks_compared: u64,
    pub bytes_compared: u64,
    /// Blocks whose hashes differed, per disk (offsets; at most the first 64 of each disk).
    pub differing: Vec<DifferingBlocks>,
    pub differing_blocks: u64,
    /// The repair's resync was requested for the differing blocks.
    pub repair_started: bool,
    /// Comparisons started for this order (one more each time a round is cut short).
    #[serde(default)]
    pub attempts: u32,
    /// Bytes hashed so far in the current attempt (progress).
    #[serde(default)]
    pub bytes_hashed: u64,
}

/// Blocks of one disk that differed in a verify.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct DifferingBlocks {
    pub disk: String,
    pub count: u64,
    pub offsets: Vec<u64>,
}

/// `GET /verify/{id}`.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct VerifySession {
    pub id: u64,
    pub disk: String,
    pub repair: bool,
    pub state: VerifyState,
    pub error: Option<String>,
    pub bytes_hashed: u64,
    pub disk_size: u64,
    pub blocks_compared: u64,
    pub block_size: u32,
    pub differing_offsets: Vec<u64>,
    pub repair_started: bool,
}

/// The agent's routes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum AgentEndpoint {
    Status,
    CrashPoint,
    AppPoint,
    GroupPoint,
    GroupPrepare,
    GroupCommit,
    GroupAbort,
    StartVerify,
    GetVerify,
}

use AgentEndpoint as R;

/// Every route of the agent's status listener.
pub const ROUTES: &[Route<AgentEndpoint>] = &[
    get::<_, crate::control::ComponentStatus>(
        R::Status,
        "/status",
        Role::Local,
        "The agent's status: mode, sequence positions, resync, disks, points, events",
    ),
    Route::new::<(), TagTaken>(
        R::CrashPoint,
        Method::Post,
        "/points/crash",
        Role::Control,
        "Insert a crash-consistent tag now",
    )
    .no_body(),
    Route::new::<(), TagTaken>(
        R::AppPoint,
        Method::Post,
        "/points/app",
        Role::Control,
        "Run the freeze hook, insert an app-consistent tag, thaw",
    )
    .no_body(),
    Route::new::<GroupPointRequest, GroupReport>(
        R::GroupPoint,
        Method::Post,
        "/group/point",
        Role::Control,
        "Coordinator: take a multi-machine tag over every member (prepare everywhere, then commit or abort)",
    ),
    Route::new::<GroupRequest, GroupAnswer>(
        R::GroupPrepare,
        Method::Post,
        "/group/prepare",
        Role::Coordinator,
        "Member: hold writes and insert the group's prepare marker",
    ),
    Route::new::<GroupRequest, GroupAnswer>(
        R::GroupCommit,
        Method::Post,
        "/group/commit",
        Role::Coordinator,
        "Member: insert the commit marker (the tag becomes a multi-machine point) and release writes",
    ),
    Route::new::<GroupRequest, GroupAnswer>(
        R::GroupAbort,
        Method::Post,
        "/group/abort",
        Role::Coordinator,
        "Member: abandon the tag and release writes",
    ),
    Route::new::<VerifyRequest, VerifyStarted>(
        R::StartVerify,
        Method::Post,
        "/verify",
        Role::Control,
        "Compare a disk with its replica block by block (optionally repair)",
    )
    .answers(202),
    get::<_, VerifySession>(R::GetVerify, "/verify/{id}", Role::Local, "An online verify's progress and result"),
];

/// `ferry agent changes`: the regions of each disk that may not be at the master target.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct UnconfirmedChanges {
    pub machine: String,
    pub disks: Vec<UnconfirmedDisk>,
    /// Sum over the disks.
    pub bytes: u64,
    /// A resync run was open (its `ResyncBegin` at this seq, its end not confirmed): the master
    /// target may hold the run's regions only in a journal it keeps apart from the replica's
    /// consistent state, so a failover to that state lacks them too (the list is then the
    /// whole disks).
    pub open_resync_seq: Option<u64>,
    /// Why the list is the whole disks, when it is (the activity log is missing).
    pub whole_disks: Option<String>,
    /// The agent submitted no write after this instant (its own clock, from its write lease;
    /// absent when it never wrote since it kept one).
    #[serde(default)]
    pub writes_until_ms: Option<u64>,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct UnconfirmedDisk {
    pub name: String,
    pub size: u64,
    /// `(offset, len)` runs, ascending, merged.
    pub extents: Vec<(u64, u64)>,
    pub bytes: u64,
    /// With `--hashes`: per extent, the hex of each 4 KiB block's hash (16 bytes each, holes
    /// hashed as zeros without being read), so the other side can tell which blocks differ.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub hashes: Vec<String>,
    /// With `--whole-disks`: the hex of every 4 KiB block's hash of the whole disk (a hash
    /// fallback compares it all).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub whole_hashes: Option<String>,
}
