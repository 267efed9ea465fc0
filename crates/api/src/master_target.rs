//! The master target's status and recovery-point API (its status listener).

use std::collections::BTreeMap;
use std::path::PathBuf;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::route::{get, Method, Role, Route};
use crate::Event;

/// `GET /status` of a master target (inside [`crate::control::ComponentStatus`]).
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct MasterTargetStatus {
    pub name: String,
    /// Its configuration server link: settings age, unreachable since, revocations held.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub config_server_link: Option<crate::control::ServerLinkStatus>,
    pub listen: String,
    /// The address process servers should use.
    pub advertise: String,
    pub status_listen: Option<String>,
    /// The file holding the control token the point API's changing routes need (readable only
    /// by the master target's user).
    #[serde(default)]
    pub control_token_file: Option<String>,
    /// What the configuration server set while running.
    pub settings: MasterTargetSettings,
    pub machines: Vec<ReplicaStatus>,
    /// Replicas deleted for a disabled protection, per machine (for the orders it was given).
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub removed_machines: BTreeMap<String, crate::control::RemovedMachine>,
}

/// The per-machine settings a running master target takes from the configuration server.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct MasterTargetSettings {
    /// Retention window per machine, seconds.
    #[serde(default)]
    pub machine_retention_secs: BTreeMap<String, f64>,
    /// Datastore folder per machine (where its target disks live).
    #[serde(default)]
    pub machine_datastores: BTreeMap<String, PathBuf>,
    /// The identity (`process-server/NAME@site`) of the only process server that may stream each
    /// machine here: the one its protection routes it through.
    #[serde(default)]
    pub machine_process_servers: BTreeMap<String, String>,
    /// Reprotects to the original location: the existing files each new replica adopts.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub machine_adoptions: BTreeMap<String, crate::control::AdoptionOrder>,
}

/// One replicated machine on a master target.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct ReplicaStatus {
    pub machine: String,
    pub disks: Vec<ReplicaDisk>,
    /// Highest seq durable in the journal (acknowledged to the process server).
    pub journaled_seq: u64,
    /// Highest seq applied to the target disks.
    pub applied_seq: u64,
    pub consistent: bool,
    /// In words: `replicating`, `waiting for initial sync`, `resync`, `resync (holding consistent
    /// state)` (resync data journaled while the replica keeps its last consistent state), or
    /// `resync (target not consistent)`.
    pub mode: String,
    pub journal_bytes: u64,
    pub lag_seconds: f64,
    pub apply_bytes_per_sec: f64,
    pub error: Option<String>,
    pub retention: RetentionStatus,
    /// Recovery points of this machine alone (multi-machine ones: see the points API).
    pub points: usize,
    pub newest_point: Option<Point>,
    /// Recent events (pruning, space, materializations), newest last.
    pub events: Vec<Event>,
    /// Set once the replica is closed to its source (failover).
    #[serde(default)]
    pub fence: Option<Fence>,
    /// Set once the target disks were put at a recovery point for the failed-over machine.
    #[serde(default)]
    pub failover: Option<Failover>,
    /// The last failover order from the configuration server that could not be carried out.
    #[serde(default)]
    pub failover_order_error: Option<FailoverOrderError>,
    /// The last failover of this replica that was cancelled (the fence lifted).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub failover_cancelled: Option<CancelledFailover>,
    /// The test failover (drill) the configuration server ordered for this machine: a writable
    /// export of its point, held while the order stands.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub test_failover: Option<TestFailoverExport>,
    /// The last test-failover order that could not be carried out.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub test_failover_error: Option<FailoverOrderError>,
    /// Adopted disks (an original-location reprotect): the old primary's blocks kept.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub primary_overwritten: Option<PrimaryOverwritten>,
}

/// The old primary's blocks a reprotect's first resync wrote over on adopted disks, kept (see
/// `ferry_master_target::overwritten`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct PrimaryOverwritten {
    pub dir: PathBuf,
    /// Per disk, the sparse copy holding each kept block at its own offset.
    pub disks: Vec<PathBuf>,
    pub blocks: u64,
    pub bytes: u64,
    /// The first resync ended: the set is final.
    pub complete: bool,
}

/// Beside a failed-over machine's disks (its folder in the datastore): the extents its agent
/// counts as changed (`agent::FailoverSeed`), written by the master target at each point.
pub const FAILOVER_SEED_FILE: &str = "failover-seed.json";
/// Beside a failed-over machine's disks: what its agent wrote there (`agent::RecoveryWrites`).
pub const RECOVERY_WRITES_FILE: &str = "recovery-writes.json";

/// What a configuration server's failover job asks of a master target for one machine (its
/// settings, `machine_failovers`): fence the replica and put the disks at `point`, or commit.
/// `order` names the job step that asked; the outcome is reported in the replica's status
/// (`failover.order`, or `failover_order_error`), so a job knows its own order was carried out.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FailoverOrder {
    pub order: String,
    /// A point reference: an RC-1 selector, a point ID or a seq.
    pub point: String,
    pub reason: String,
    /// Commit the failover at the point it is at (the point must be `point`'s resolution).
    #[serde(default)]
    pub commit: bool,
    /// Cancel the failover (before commit): put the disks back at the seq they were handed over
    /// at (undoing the recovery site's writes and the writes after the point) and lift the
    /// fence, so replication from the primary resumes where it stopped. `point` is unused.
    #[serde(default)]
    pub cancel: bool,
}

/// A failover cancelled before commit (`failover-cancelled.json` beside the journal): the disks
/// were put back at the seq they were handed over at and the fence lifted.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct CancelledFailover {
    /// The configuration server's order that cancelled it.
    #[serde(default)]
    pub order: Option<String>,
    /// The fence that was lifted (none: the replica was never fenced, nothing was undone).
    #[serde(default)]
    pub fence: Option<Fence>,
    /// The point the failed-over disks were at, if they were put at one.
    #[serde(default)]
    pub point: Option<Point>,
    /// The seq the disks hold again (the journal's head at the fence: the primary's state).
    pub restored_seq: u64,
    /// What the machine wrote at the recovery site, now discarded (from its agent's report).
    pub recovery_writes: Vec<DiskExtent>,
    /// Bytes of those writes (merged extents).
    pub recovery_write_bytes: u64,
    /// Bytes put back on the disks (the recovery writes and the writes after the point).
    pub restored_bytes: u64,
    pub at_ms: u64,
}

/// What a configuration server's test-failover job asks of a master target for one machine (its
/// settings, `machine_test_failovers`): a writable NBD export of `point` (a throwaway
/// copy-on-write overlay over the point; the replica and its journal are never written), held
/// while the order stands and discarded — pin released — once it is withdrawn. Replication of
/// the machine goes on meanwhile.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TestFailoverOrder {
    /// The drill's ID.
    pub order: String,
    /// A point reference: an RC-1 selector, a point ID or a seq.
    pub point: String,
}

/// A test failover's export as the master target holds it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct TestFailoverExport {
    pub order: String,
    /// The materialization that pins the point (`ferry master-target materializations`).
    pub materialization: String,
    pub point: Point,
    /// Per disk, for Ferry's own NBD client: `unix:SOCKET:EXPORT`.
    pub nbd_disks: Vec<String>,
    /// Per disk, for qemu: `nbd+unix:///EXPORT?socket=SOCKET`.
    pub nbd_urls: Vec<String>,
    /// Set when the export was lost (a restart of the master target drops the overlay).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
}

/// A failover order that failed, with the error's code.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct FailoverOrderError {
    pub order: String,
    pub code: u32,
    pub message: String,
    pub at_ms: u64,
}

/// A replica closed to its source — the machine failed over, or an operator fenced it: the
/// master target takes no stream, record or initial-sync data for it any more (9018), from any
/// process server, also after restarts; the journal is applied up to `at_seq`, then the target
/// disks are never written by the master target again and pruning stops (the recovery point
/// and everything after it stay for the reprotect).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Fence {
    /// The journal's head when the fence was set: nothing after it was taken.
    pub at_seq: u64,
    pub time_ms: u64,
    pub reason: String,
    /// The journal is applied up to `at_seq` and that is durable: from now on the target disks
    /// belong to whoever runs the failed-over machine.
    pub handed_over: bool,
    /// Once handed over: the seq the target disks hold — `at_seq`, or the consistent state
    /// before a resync run the fence cut off (its records after that stay in the journal).
    #[serde(default)]
    pub applied_seq: u64,
}

/// `POST /machines/{m}/fence`.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FenceRequest {
    /// Why (kept with the fence, shown in the status); one line, at most 200 characters.
    pub reason: String,
}

/// `POST /machines/{m}/failover`: fence the replica (if it is not yet), wait until its disks are
/// handed over, and put them at a recovery point — in time proportional to the writes after the
/// point. Again before commit: change the recovery point.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FailoverRequest {
    /// The recovery point: an RC-1 selector (`latest` — everything the recovery site holds —,
    /// `latest-processed`, `latest-app`, `latest-multi`, `latest-multi-app`), a point ID
    /// (`MACHINE@SEQ`) or a seq from the points list.
    pub point: String,
    /// Why (kept with the fence when this call sets it); one line, 1 to 200 characters.
    pub reason: String,
    /// When the point changes after the machine ran at the recovery site: the extents it wrote
    /// since (its agent's change set). They are put back to the new point too; extents given
    /// earlier are remembered.
    #[serde(default)]
    pub recovery_writes: Vec<DiskExtent>,
}

/// An extent of one disk, named.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DiskExtent {
    pub disk: String,
    pub offset: u64,
    pub length: u64,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum FailoverPhase {
    /// The target disks are being put at the point: the machine must not start yet.
    Restoring,
    /// The disks hold the point: the machine may run; the point can still change.
    AtPoint,
    /// Committed: the point cannot change any more.
    Committed,
}

/// The failover of a replica's machine (`failover.json` beside its journal).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Failover {
    pub phase: FailoverPhase,
    pub point: Point,
    /// The seq the target disks held when they were handed over: the newest write the recovery
    /// site holds.
    pub handed_over_seq: u64,
    /// What the recovery site holds after the point and the failed-over disks no longer have.
    pub discarded: DiscardedWrites,
    /// Bytes the last restore put back to the point.
    pub restored_bytes: u64,
    /// Every extent written after this seq was put back (the lowest point chosen so far).
    pub restored_after_seq: u64,
    pub started_ms: u64,
    #[serde(default)]
    pub at_point_ms: Option<u64>,
    #[serde(default)]
    pub committed_ms: Option<u64>,
    /// Points chosen earlier (change recovery point), oldest first.
    #[serde(default)]
    pub earlier_points: Vec<Point>,
    /// Extents the machine wrote at the recovery site, as given with point changes.
    #[serde(default)]
    pub recovery_writes: Vec<DiskExtent>,
    /// The configuration server's order this state carries out (None: asked through this API).
    #[serde(default)]
    pub order: Option<String>,
}

/// Writes after the failover point that the recovery site holds, discarded from the failed-over
/// disks (the journal keeps them for the reprotect). Writes the primary acknowledged but never
/// shipped are not among them: they are known only from the primary's agent, at reprotect.
#[derive(Debug, Clone, PartialEq, Eq, Default, Serialize, Deserialize, JsonSchema)]
pub struct DiscardedWrites {
    /// Bytes of the extents written after the point (overlapping writes counted once).
    pub bytes: u64,
    /// Write and zero records after the point.
    pub records: u64,
    #[serde(default)]
    pub first_seq: Option<u64>,
    #[serde(default)]
    pub last_seq: Option<u64>,
    #[serde(default)]
    pub first_time_ms: Option<u64>,
    #[serde(default)]
    pub last_time_ms: Option<u64>,
    /// In words, for the job and the operator.
    pub note: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ReplicaDisk {
    pub name: String,
    pub size: u64,
    /// The target disk file.
    pub target: PathBuf,
}

/// History of one machine: base, journal, volume space, pruning.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct RetentionStatus {
    pub window_secs: f64,
    pub base_seq: Option<u64>,
    pub base_time_ms: Option<u64>,
    pub base_bytes: u64,
    pub journal_bytes: u64,
    pub journal_payload_bytes: u64,
    /// Journal bytes per GiB written (record framing and indexes on top of the data).
    pub journal_bytes_per_gib_written: f64,
    pub volume_free_bytes: u64,
    pub volume_total_bytes: u64,
    /// Why pruning is paused, if it is.
    pub pruning_paused: Option<String>,
    /// Materializations pinning points and the base.
    pub pinned_by: Vec<String>,
}

/// Crash- or application-consistent.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum PointKind {
    Crash,
    App,
}

/// One machine's point, or common to every machine of a replication group.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum PointScope {
    Single,
    Multi,
}

/// What made a point.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum PointOrigin {
    /// A consistency tag from the agent (timer or hooks).
    Tag,
    /// Taken on request at everything received.
    Latest,
    /// A multi-machine group tag.
    Group,
    /// The replica became consistent again at the end of a resync.
    ResyncEnd,
    /// The last consistent state before a resync started.
    BeforeResync,
}

/// A recovery point of one machine: a sequence position at which every disk of the machine is
/// write-order consistent.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Point {
    /// Stable ID: `<machine>@<seq>` (seqs are never reused by a machine).
    pub id: String,
    pub machine: String,
    pub seq: u64,
    pub time_ms: u64,
    pub kind: PointKind,
    pub scope: PointScope,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group_tag: Option<String>,
    /// Disk generation in effect at the point.
    pub generation: u64,
    pub origin: PointOrigin,
}

impl Point {
    pub fn is_app(&self) -> bool {
        self.kind == PointKind::App
    }
    pub fn is_multi(&self) -> bool {
        self.scope == PointScope::Multi
    }
}

/// The selectors of RC-1, in the order an operator reads them.
pub const SELECTORS: [&str; 5] = ["latest-processed", "latest-app", "latest-multi", "latest-multi-app", "latest"];

/// `GET /machines/{m}/points`.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct PointList {
    pub machine: String,
    /// Oldest first.
    pub points: Vec<Point>,
    pub selectors: Selectors,
    /// Why points an operator may expect are missing (e.g. RG-2).
    pub problems: Vec<String>,
}

/// What each selector resolves to now (point IDs).
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct Selectors {
    /// How to take one: `latest` is taken on request.
    pub latest: String,
    #[serde(rename = "latest-processed")]
    pub latest_processed: Option<String>,
    #[serde(rename = "latest-app")]
    pub latest_app: Option<String>,
    #[serde(rename = "latest-multi")]
    pub latest_multi: Option<String>,
    #[serde(rename = "latest-multi-app")]
    pub latest_multi_app: Option<String>,
}

/// `POST /machines/{m}/points`: resolve a selector (`latest` takes a point at everything received).
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SelectPoint {
    pub selector: String,
}

/// `GET /groups/{g}/points`.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct GroupPoints {
    pub group: String,
    pub points: Vec<GroupPoint>,
    pub incomplete_tags: Vec<IncompleteTag>,
    pub problems: Vec<String>,
}

/// A multi-machine point: each member's seq for one group tag.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct GroupPoint {
    /// The group tag.
    pub id: String,
    pub group: String,
    pub time_ms: u64,
    pub kind: PointKind,
    pub scope: PointScope,
    pub members: BTreeMap<String, u64>,
}

/// A group tag not committed by every member (no multi-machine point).
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct IncompleteTag {
    pub tag: String,
    pub committed_by: Vec<String>,
    pub missing: Vec<String>,
}

/// Image files or NBD exports.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum MaterializationKind {
    Image,
    Export,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum ImageFormat {
    /// Self-contained raw image (allocated regions of the base copied, then the changes).
    Raw,
    /// qcow2 overlay whose backing file is the frozen base: only the changes are written.
    Qcow2,
    /// Through `qemu-img convert` from the point's export.
    Vmdk,
    /// Fixed VHD (`qemu-img convert -O vpc -o subformat=fixed`).
    Vhd,
}

impl ImageFormat {
    /// The file extension of images in this format.
    pub fn ext(self) -> &'static str {
        match self {
            ImageFormat::Raw => "img",
            ImageFormat::Qcow2 => "qcow2",
            ImageFormat::Vmdk => "vmdk",
            ImageFormat::Vhd => "vhd",
        }
    }
}

/// `POST /machines/{m}/materializations`.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct MaterializeRequest {
    /// A point ID (`vm1@1234`), a seq, or a selector.
    pub point: String,
    pub kind: MaterializationKind,
    #[serde(default)]
    pub format: Option<ImageFormat>,
    /// Folder for image files (default `<datastore>/<machine>/images/<id>`).
    #[serde(default)]
    pub dir: Option<PathBuf>,
    /// Exports only: writable through a throwaway copy-on-write overlay (test failover).
    #[serde(default)]
    pub writable: bool,
    /// The test-failover order that asked for it (never from the HTTP API).
    #[serde(skip)]
    #[schemars(skip)]
    pub order: Option<String>,
}

/// An image or export of a point: it pins the point and its base until it is discarded.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct Materialization {
    pub id: String,
    pub machine: String,
    pub point: Point,
    pub base_epoch: u64,
    pub base_seq: u64,
    pub created_ms: u64,
    #[serde(flatten)]
    pub what: MaterializedAs,
    /// Set when something went wrong with it (e.g. a writable export lost at a restart).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub problem: Option<String>,
    /// The configuration server's test-failover order it serves (None: asked through the API).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub order: Option<String>,
    /// Exports: the NBD URLs of each disk (unix socket first, then TCP when served).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub nbd_urls: Vec<Vec<String>>,
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "kind", rename_all = "kebab-case")]
pub enum MaterializedAs {
    /// Image files, one per disk.
    Image { format: ImageFormat, files: Vec<PathBuf> },
    /// NBD exports, one per disk (`<id>/<disk>`), optionally writable through throwaway overlays.
    Export { writable: bool, exports: Vec<String>, overlays: Vec<PathBuf> },
}

/// `GET /materializations`.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct MaterializationList {
    pub materializations: Vec<Materialization>,
}

/// `DELETE /materializations/{id}`.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct Discarded {
    pub discarded: String,
    pub point: String,
}

/// Query of `GET /machines/{m}/changes`: two point references (`to` defaults to the head).
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct ChangesQuery {
    pub from: String,
    #[serde(default)]
    pub to: Option<String>,
}

/// Extents changed between two points (what a reprotect must send).
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct Changes {
    pub machine: String,
    pub from_seq: u64,
    pub to_seq: Option<u64>,
    /// The history does not reach back to `from`: everything must be sent.
    pub full_resync: bool,
    pub disks: Vec<DiskChanges>,
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct DiskChanges {
    pub disk: String,
    pub bytes: u64,
    pub extents: Vec<Extent>,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Extent {
    pub offset: u64,
    pub length: u64,
}

/// The master target's routes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum MasterTargetEndpoint {
    Status,
    ListPoints,
    SelectPoint,
    GroupPoints,
    Materialize,
    ListMaterializations,
    Discard,
    Changes,
    Fence,
    Failover,
    CommitFailover,
}

use MasterTargetEndpoint as R;

/// Every route of the master target's status listener.
pub const ROUTES: &[Route<MasterTargetEndpoint>] = &[
    get::<_, crate::control::ComponentStatus>(
        R::Status,
        "/status",
        Role::Local,
        "The master target's status: replicas, journals, retention, events",
    ),
    get::<_, PointList>(
        R::ListPoints,
        "/machines/{m}/points",
        Role::Local,
        "A machine's recovery points (oldest first), the RC-1 selectors resolved, and problems (RG-2)",
    ),
    Route::new::<SelectPoint, Point>(
        R::SelectPoint,
        Method::Post,
        "/machines/{m}/points",
        Role::Control,
        "Resolve a selector to a point (`latest` takes a point at everything received)",
    ),
    get::<_, GroupPoints>(
        R::GroupPoints,
        "/groups/{g}/points",
        Role::Local,
        "Multi-machine points of a replication group and its incomplete tags",
    ),
    Route::new::<MaterializeRequest, Materialization>(
        R::Materialize,
        Method::Post,
        "/machines/{m}/materializations",
        Role::Control,
        "Materialize a point as image files or NBD exports (pins the point)",
    )
    .answers(201),
    get::<_, MaterializationList>(
        R::ListMaterializations,
        "/materializations",
        Role::Local,
        "Every image and export of a point",
    ),
    Route::new::<(), Discarded>(
        R::Discard,
        Method::Delete,
        "/materializations/{id}",
        Role::Control,
        "Discard an image or export (unpins its point)",
    )
    .no_body(),
    get::<_, Changes>(
        R::Changes,
        "/machines/{m}/changes",
        Role::Local,
        "Extents changed between two points, or from a point to the head",
    )
    .with_query::<ChangesQuery>(),
    Route::new::<FenceRequest, Fence>(
        R::Fence,
        Method::Post,
        "/machines/{m}/fence",
        Role::Control,
        "Close a replica to its source for good (failover): no stream is taken, the journal is applied to its head, then the target disks are left alone",
    ),
    Route::new::<FailoverRequest, Failover>(
        R::Failover,
        Method::Post,
        "/machines/{m}/failover",
        Role::Control,
        "Fail a machine over: fence its replica, then put the target disks at a recovery point (O(writes after it)); again before commit to change the point",
    ),
    Route::new::<(), Failover>(
        R::CommitFailover,
        Method::Post,
        "/machines/{m}/failover/commit",
        Role::Control,
        "Commit a failover: its recovery point cannot change any more",
    )
    .no_body(),
];
