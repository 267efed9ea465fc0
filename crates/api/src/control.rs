//! What data-path components and the configuration server exchange: status (served on each
//! component's status listener and carried by heartbeats), heartbeats, component health, and the
//! settings the server holds for a component.

use std::collections::BTreeMap;
use std::path::PathBuf;

use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::agent::AgentStatus;
use crate::master_target::MasterTargetStatus;
use crate::process_server::{MasterTargetRoute, ProcessServerStatus};

/// The three data-path component roles.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Hash, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum ComponentKind {
    Agent,
    ProcessServer,
    MasterTarget,
}

impl ComponentKind {
    pub fn as_str(self) -> &'static str {
        match self {
            ComponentKind::Agent => "agent",
            ComponentKind::ProcessServer => "process-server",
            ComponentKind::MasterTarget => "master-target",
        }
    }
    pub fn parse(s: &str) -> Option<ComponentKind> {
        match s {
            "agent" => Some(ComponentKind::Agent),
            "process-server" => Some(ComponentKind::ProcessServer),
            "master-target" => Some(ComponentKind::MasterTarget),
            _ => None,
        }
    }
}

impl std::fmt::Display for ComponentKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// A component's status, tagged with its role (`"component": "agent"`, …).
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "component", rename_all = "kebab-case")]
#[allow(clippy::large_enum_variant)] // built once per status request, never stored in bulk
pub enum ComponentStatus {
    Agent(AgentStatus),
    /// A machine's mobility service while its agent does not run (not protected yet, or powered
    /// on before protection): it reports in and says where it serves.
    MobilityService(MobilityServiceStatus),
    ProcessServer(ProcessServerStatus),
    MasterTarget(MasterTargetStatus),
}

/// What a mobility service without a running agent reports (heartbeats of kind `agent`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct MobilityServiceStatus {
    pub machine: String,
    pub status_listen: Option<String>,
    pub nbd_listen: Option<String>,
}

impl ComponentStatus {
    pub fn kind(&self) -> ComponentKind {
        match self {
            ComponentStatus::Agent(_) | ComponentStatus::MobilityService(_) => ComponentKind::Agent,
            ComponentStatus::ProcessServer(_) => ComponentKind::ProcessServer,
            ComponentStatus::MasterTarget(_) => ComponentKind::MasterTarget,
        }
    }
    pub fn agent(&self) -> Option<&AgentStatus> {
        match self {
            ComponentStatus::Agent(a) => Some(a),
            _ => None,
        }
    }
    pub fn process_server(&self) -> Option<&ProcessServerStatus> {
        match self {
            ComponentStatus::ProcessServer(p) => Some(p),
            _ => None,
        }
    }
    pub fn master_target(&self) -> Option<&MasterTargetStatus> {
        match self {
            ComponentStatus::MasterTarget(m) => Some(m),
            _ => None,
        }
    }
    /// The status listener it reports (agents and master targets).
    pub fn status_listen(&self) -> Option<&str> {
        match self {
            ComponentStatus::Agent(a) => a.status_listen.as_deref(),
            ComponentStatus::MobilityService(m) => m.status_listen.as_deref(),
            ComponentStatus::MasterTarget(m) => m.status_listen.as_deref(),
            ComponentStatus::ProcessServer(_) => None,
        }
    }
    /// The file holding the daemon's control token (agents and master targets).
    pub fn control_token_file(&self) -> Option<&str> {
        match self {
            ComponentStatus::Agent(a) => a.control_token_file.as_deref(),
            ComponentStatus::MasterTarget(m) => m.control_token_file.as_deref(),
            ComponentStatus::MobilityService(_) | ComponentStatus::ProcessServer(_) => None,
        }
    }
    /// The replication address peers should use (process servers and master targets).
    pub fn advertise(&self) -> Option<&str> {
        match self {
            ComponentStatus::ProcessServer(p) => Some(&p.advertise),
            ComponentStatus::MasterTarget(m) => Some(&m.advertise),
            ComponentStatus::Agent(_) | ComponentStatus::MobilityService(_) => None,
        }
    }
}

/// `POST /api/v1/heartbeats`.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Heartbeat {
    pub kind: ComponentKind,
    pub name: String,
    #[serde(default)]
    pub status: Option<ComponentStatus>,
    /// Replication policy the component runs with (agents), for RPO alerts.
    #[serde(default)]
    pub policy: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct HeartbeatAck {
    pub ok: bool,
    /// The epoch of the server that took it (components skip a server below the highest seen).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authority_epoch: Option<u64>,
}

/// How a component stands with its configuration server (in its status): when its settings —
/// and with them the revocation list it enforces — last came, and since when no server answers.
/// The list is kept (in a file) and enforced all the same while none does.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct ServerLinkStatus {
    pub last_settings_ms: Option<u64>,
    /// Set while no configuration server answers (the first failed fetch).
    pub unreachable_since_ms: Option<u64>,
    /// Revoked certificate serials the component holds and refuses.
    pub revoked_certificates: u64,
}

/// Healthy, Warning or Critical.
#[derive(Debug, Clone, Copy, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum Health {
    Healthy,
    Warning,
    Critical,
}

impl Health {
    pub fn as_str(self) -> &'static str {
        match self {
            Health::Healthy => "healthy",
            Health::Warning => "warning",
            Health::Critical => "critical",
        }
    }
}

/// Why a component or machine is not healthy: a registry code (0 for an alert without one).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct HealthReason {
    pub code: u32,
    pub message: String,
    #[serde(default)]
    pub remedy: String,
}

/// What the server knows of a component (registration, then heartbeats).
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct Component {
    pub kind: ComponentKind,
    pub name: String,
    pub registered_ms: Option<u64>,
    pub last_seen_ms: Option<u64>,
    /// Its last heartbeat's status. Only a cache of what the component said last: a stored
    /// status this version cannot read (written by another version) reads as none, and the
    /// next heartbeat replaces it, rather than making the record unreadable.
    #[serde(default, deserialize_with = "status_or_none")]
    pub status: Option<ComponentStatus>,
    /// Replication policy the component runs with (agents), for RPO alerts.
    #[serde(default)]
    pub policy: Option<String>,
    /// The restore this component was reconciled against (each restore reconciles once).
    #[serde(default)]
    pub reconciled_restore: Option<String>,
    /// The identity its certificate carries (`agent/db1@primary`), chosen at registration.
    #[serde(default)]
    pub identity: Option<String>,
    /// Serial of its current certificate (registering again revokes the earlier one).
    #[serde(default)]
    pub certificate_serial: Option<String>,
    /// Agents: its clock minus the server's at its last heartbeat (ms; the network delay is in
    /// it), measured from the status's `clock_ms`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub clock_offset_ms: Option<i64>,
}

impl Component {
    /// A component the server has heard nothing from yet.
    pub fn new(kind: ComponentKind, name: &str) -> Component {
        Component {
            kind,
            name: name.to_owned(),
            registered_ms: None,
            last_seen_ms: None,
            status: None,
            policy: None,
            reconciled_restore: None,
            identity: None,
            certificate_serial: None,
            clock_offset_ms: None,
        }
    }
}

fn status_or_none<'de, D: serde::Deserializer<'de>>(d: D) -> Result<Option<ComponentStatus>, D::Error> {
    let v = serde_json::Value::deserialize(d)?;
    Ok(serde_json::from_value(v).ok())
}

/// `GET /api/v1/components`: a component with its health now.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct ComponentHealth {
    #[serde(flatten)]
    pub component: Component,
    pub health: Health,
    pub reasons: Vec<HealthReason>,
}

/// The settings the configuration server holds for one component: keys of that component's
/// configuration file that override the file (flags still override both). The keys the server
/// itself sets are typed here; any other key of the component's file passes through as given and
/// is checked by the component when it loads its configuration.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ComponentSettings {
    /// Agents: the process server's address for agents.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub process_server: Option<String>,
    /// Agents: the name in the process server's certificate.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub process_server_name: Option<String>,
    /// Agents: the disks to protect.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disks: Option<Vec<DiskSetting>>,
    /// Agents: the replication policy (stored; a component is given the intervals it implies).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub policy: Option<String>,
    /// Agents: the replication group (multi-machine points).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub group: Option<GroupSetting>,
    /// Agents: crash-consistent tag interval, seconds (from the policy unless set).
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "ferry_types::bounds::opt_secs")]
    pub crash_point_interval_secs: Option<f64>,
    /// Agents: app-consistent tag interval, seconds (from the policy unless set).
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "ferry_types::bounds::opt_secs")]
    pub app_point_interval_secs: Option<f64>,
    /// Process servers: where each machine's changes go.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub machine_master_targets: Option<BTreeMap<String, MasterTargetRoute>>,
    /// Master targets: datastore folder per machine.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub machine_datastores: Option<BTreeMap<String, PathBuf>>,
    /// Every linked component: serials of the certificates the configuration server revoked
    /// (computed at each fetch, never stored per component).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub revoked_certificates: Option<Vec<String>>,
    /// Master targets: identity of the process server each machine streams through.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub machine_process_servers: Option<BTreeMap<String, String>>,
    /// Master targets: retention window per machine, seconds (from its agent's policy unless set).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub machine_retention_secs: Option<BTreeMap<String, f64>>,
    /// Agents: stop taking writes for a planned failover (set by the failover job; cleared to
    /// lift it). The running agent follows it; it is never a key of the agent's file.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub quiesce: Option<crate::agent::QuiesceOrder>,
    /// Master targets: per machine, the failover the configuration server's jobs ask for (fence,
    /// put the disks at a point, commit). The running master target follows it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub machine_failovers: Option<BTreeMap<String, crate::master_target::FailoverOrder>>,
    /// Master targets: per machine, the test failover (drill) the configuration server's jobs
    /// hold open: a writable export of a point. The running master target follows it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub machine_test_failovers: Option<BTreeMap<String, crate::master_target::TestFailoverOrder>>,
    /// Process servers and master targets: per machine, a disabled protection whose spool or
    /// replica (journal, recovery points, target disks) is to be deleted. Followed while running
    /// and after a restart; the status says when each one is done.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub machine_removals: Option<BTreeMap<String, RemovalOrder>>,
    /// Every linked component: the epoch of the configuration server that served these settings
    /// (computed at each fetch). A component remembers the highest it saw and ignores settings
    /// from a server below it (a stale one that does not know it yet).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub authority_epoch: Option<u64>,
    /// Agents: protection was disabled — serve the disks, ship nothing, and start over (a later
    /// protection copies the disks again). Set by the disable job only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub protection_disabled: Option<bool>,
    /// Master targets: per machine, the existing disk files a new replica takes as its target
    /// disks (a reprotect to the original location): the old primary's disks, which the resync
    /// brings to the copy named by the order. Set by the reprotect job only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub machine_adoptions: Option<BTreeMap<String, AdoptionOrder>>,
    /// Agents: regions to resync once more than the agent itself tracked (a reprotect: what the
    /// old primary wrote that the recovery site never held). Set by the reprotect job only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub resync_seed: Option<ResyncSeed>,
    /// Agents: compare every block of every disk with the master target's replica at the same
    /// point of the change stream (online verify), repairing what differs; done once per order
    /// and reported in the status's `verify_order`. Set by the reprotect job only.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub verify_order: Option<VerifyOrder>,
    /// Any other key of the component's configuration file.
    #[serde(flatten)]
    pub other: BTreeMap<String, serde_json::Value>,
}

/// Settings a running component follows (its settings watch) that are not keys of its
/// configuration file: left out when the settings are merged into the file's keys at start.
pub const RUNTIME_KEYS: [&str; 8] = [
    "revoked_certificates",
    "verify_order",
    // Master targets keep it with their assigned settings (`assigned.json`), not in the file.
    "machine_adoptions",
    "quiesce",
    "machine_failovers",
    "machine_test_failovers",
    "machine_removals",
    "authority_epoch",
];

/// A disabled protection's removal order to a process server or master target.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RemovalOrder {
    /// The disable job (a removal is done once per order).
    pub order: String,
    /// Master targets: keep the target disks (a failed-over machine runs from them); the journal
    /// and recovery points are deleted all the same.
    #[serde(default)]
    pub keep_target_disks: bool,
}

/// A reprotect's order to a master target: a new replica of `machine` takes these existing files
/// as its target disks (original-location recovery) instead of creating sparse ones.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AdoptionOrder {
    /// The reprotect job.
    pub order: String,
    /// Per disk of the machine, in its order: the file (the old primary's disk).
    pub disks: Vec<AdoptedDisk>,
    /// The lineage ID of the copy that will stream here (the failed-over machine's agent), 16 hex
    /// digits (settings become TOML at a component's start, whose integers stop at 2^63): the
    /// replica takes only that copy, whose resync brings the files to it.
    pub lineage: String,
}

impl AdoptionOrder {
    /// The lineage ID, or None when `lineage` is not 16 hex digits.
    pub fn lineage_id(&self) -> Option<u64> {
        (self.lineage.len() == 16).then(|| u64::from_str_radix(&self.lineage, 16).ok()).flatten()
    }
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct AdoptedDisk {
    pub name: String,
    pub path: PathBuf,
}

/// An order to verify every disk of a machine against its replica (see
/// `ComponentSettings::verify_order`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct VerifyOrder {
    /// Names the round (a job and its round number): a new name starts a new comparison.
    pub order: String,
    /// Resync the blocks that differ once the comparison is complete.
    pub repair: bool,
}

/// Regions an agent resyncs once, on top of what it tracked itself (counted once per order).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ResyncSeed {
    /// The job that gave it.
    pub order: String,
    /// The copy (the agent's lineage, 16 hex digits: the agent's configuration is TOML, whose
    /// integers stop at 2^63) it was computed for: another copy — a later cycle's, or one whose
    /// state was lost since — ignores it (what it says is about other disks' history).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lineage: Option<String>,
    /// Why, in words (shown in the agent's event).
    pub reason: String,
    /// Regions resynced whole.
    pub extents: Vec<crate::master_target::DiskExtent>,
    /// Regions compared first: only the blocks whose hash on this agent's disk differs from the
    /// given one are resynced (the other side's regions are coarser than what differs).
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub compare: Vec<SeedCompare>,
    /// The compared regions cover every block of every disk (a hash fallback): what the agent
    /// tracked itself is replaced by the comparison's result (its tracking was lost or the
    /// copies do not link).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub replace_tracking: bool,
}

/// A region of a resync seed with the other side's block hashes (see `ferry_agent::block_hash`).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct SeedCompare {
    pub disk: String,
    pub offset: u64,
    pub length: u64,
    /// Hex: 16 bytes per 4 KiB block of the region.
    pub hashes: String,
}

/// What a process server or master target did with a removal order (its status, and a file
/// beside its spools or replicas, so a restart does not forget it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct RemovedMachine {
    pub order: String,
    /// When it finished (0 while it failed).
    pub at_ms: u64,
    /// Bytes of files deleted (spool; journal, history and, unless kept, target disks).
    pub deleted_bytes: u64,
    /// Master targets: the target disks were kept.
    #[serde(default)]
    pub kept_target_disks: bool,
    /// Why it could not be done (it is tried again at each settings fetch).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// Keys that stay in the component's own file (local to its host): the server refuses them.
pub const LOCAL_KEYS: [&str; 6] = ["tls", "config_server", "state_dir", "cache_dir", "datastore", "retention"];

/// Who may set a settings key through the API (`PUT .../settings`).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum SettingAccess {
    /// An operator (or an admin).
    Operator,
    /// Only an admin: the key makes the component run a command.
    Admin,
    /// Nobody: a path, an address, a peer or an identity. The component's own file holds it, or
    /// the configuration server derives it from inventory in its own jobs (protect, failover), so
    /// no token can point a component at other files, ports or peers.
    Never,
}

/// Who may set `key` of a `kind`'s settings, or `None` when the component has no such setting.
/// An allow-list: a key not named here cannot be set through the API at all.
pub fn setting_access(kind: ComponentKind, key: &str) -> Option<SettingAccess> {
    use SettingAccess::*;
    let never = [
        "disks",
        // Group membership names peers (member status addresses): the server's protection of a
        // replication group sets it.
        "group",
        "process_server",
        "process_server_name",
        "machine_master_targets",
        "machine_datastores",
        "machine_process_servers",
        "revoked_certificates",
        // Set by the failover jobs only: a token holder must not fence or freeze a machine.
        "quiesce",
        "machine_failovers",
        "machine_test_failovers",
        "machine_removals",
        "protection_disabled",
        "machine_adoptions",
        "resync_seed",
        "verify_order",
        "authority_epoch",
        "failover_seed",
        "recovery_writes_file",
        "master_target",
        "master_target_name",
        "machine",
        "name",
        "advertise",
        "nbd_listen",
        "nbd_socket",
        "nbd_tls",
        "listen",
        "status_listen",
        "source_write_log",
        "shipping_paused",
    ];
    if never.contains(&key) || LOCAL_KEYS.contains(&key) {
        return Some(Never);
    }
    let access = match (kind, key) {
        (ComponentKind::Agent, "freeze_command" | "thaw_command" | "hook_timeout_secs") => Admin,
        (
            ComponentKind::Agent,
            "policy"
            | "crash_point_interval_secs"
            | "app_point_interval_secs"
            | "reconnect_interval_secs"
            | "maintenance_interval_secs"
            | "al_retire_interval_secs"
            | "shutdown_drain_secs"
            | "batch_bytes",
        ) => Operator,
        (ComponentKind::ProcessServer, "reconnect_interval_secs" | "throttle_free_percent" | "forward_batch_bytes") => {
            Operator
        }
        (
            ComponentKind::MasterTarget,
            "machine_retention_secs"
            | "retention_window_secs"
            | "checkpoint_interval_secs"
            | "retention_min_free_percent",
        ) => Operator,
        _ => return None,
    };
    Some(access)
}

impl ComponentSettings {
    /// `self` (a settings request, already checked against [`setting_access`]) as the new stored
    /// settings of a `kind`: the keys nobody may set through the API — those the server's own jobs
    /// wrote (disks, peers, routes, datastores, group) — are kept from `stored`, so an operator
    /// changing a policy never drops what protection set.
    pub fn keeping_server_keys(mut self, kind: ComponentKind, stored: &ComponentSettings) -> Self {
        self.process_server.clone_from(&stored.process_server);
        self.process_server_name.clone_from(&stored.process_server_name);
        self.disks.clone_from(&stored.disks);
        self.group.clone_from(&stored.group);
        self.machine_master_targets.clone_from(&stored.machine_master_targets);
        self.machine_datastores.clone_from(&stored.machine_datastores);
        // The jobs' orders too: an operator's change of a window or an interval must not drop a
        // fence, a quiesce, a drill or a removal.
        self.machine_process_servers.clone_from(&stored.machine_process_servers);
        self.quiesce.clone_from(&stored.quiesce);
        self.machine_failovers.clone_from(&stored.machine_failovers);
        self.machine_test_failovers.clone_from(&stored.machine_test_failovers);
        self.machine_removals.clone_from(&stored.machine_removals);
        self.protection_disabled = stored.protection_disabled;
        self.machine_adoptions.clone_from(&stored.machine_adoptions);
        self.resync_seed.clone_from(&stored.resync_seed);
        self.verify_order.clone_from(&stored.verify_order);
        for (k, v) in &stored.other {
            if setting_access(kind, k) == Some(SettingAccess::Never) {
                self.other.insert(k.clone(), v.clone());
            }
        }
        self
    }

    /// The keys this body sets (typed and passed through).
    pub fn keys(&self) -> Vec<&str> {
        let typed = [
            ("process_server", self.process_server.is_some()),
            ("process_server_name", self.process_server_name.is_some()),
            ("disks", self.disks.is_some()),
            ("policy", self.policy.is_some()),
            ("group", self.group.is_some()),
            ("crash_point_interval_secs", self.crash_point_interval_secs.is_some()),
            ("app_point_interval_secs", self.app_point_interval_secs.is_some()),
            ("machine_master_targets", self.machine_master_targets.is_some()),
            ("machine_datastores", self.machine_datastores.is_some()),
            ("machine_retention_secs", self.machine_retention_secs.is_some()),
        ];
        typed.iter().filter(|(_, set)| *set).map(|(k, _)| *k).chain(self.other.keys().map(String::as_str)).collect()
    }
}

/// A disk an agent protects (the agent's `[[disks]]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DiskSetting {
    pub name: String,
    pub path: PathBuf,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub uuid: Option<String>,
    /// Test builds only (`volatile`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cache: Option<String>,
}

impl ComponentSettings {
    /// These settings as a reader may see them: a group coordinator's key replaced by `"set"`.
    pub fn without_secrets(mut self) -> ComponentSettings {
        if let Some(g) = &mut self.group {
            if g.coordinator_key.is_some() {
                g.coordinator_key = Some("set".into());
            }
        }
        self
    }
}

/// An agent's replication group (the agent's `[group]`).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct GroupSetting {
    pub name: String,
    /// The member that runs the group's rounds.
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub coordinator: bool,
    /// Coordinator: the Ed25519 private key (hex PKCS#8) that signs its prepare/commit/abort
    /// (the configuration server makes the pair per group at protection).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub coordinator_key: Option<String>,
    /// Members: the public half (hex) of the coordinator's Ed25519 key; a group request is
    /// accepted only signed by that key (the coordinator never sends the private key, so no
    /// member can pose as the coordinator to the others).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub coordinator_public_key: Option<String>,
    /// Coordinator: the other members' status addresses.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub members: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "ferry_types::bounds::opt_secs")]
    pub crash_interval_secs: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "ferry_types::bounds::opt_secs")]
    pub app_interval_secs: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none", deserialize_with = "ferry_types::bounds::opt_secs")]
    pub prepare_timeout_secs: Option<f64>,
}

#[cfg(test)]
mod settings_tests {
    use super::*;

    #[test]
    fn an_operator_request_keeps_what_protection_set() {
        let stored = ComponentSettings {
            process_server: Some("10.0.0.5:7200".into()),
            disks: Some(vec![DiskSetting {
                name: "disk0".into(),
                path: "/ds/vm1/disk0.img".into(),
                uuid: None,
                cache: None,
            }]),
            policy: Some("silver".into()),
            ..Default::default()
        };
        let req = ComponentSettings { policy: Some("gold".into()), ..Default::default() };
        let new = req.keeping_server_keys(ComponentKind::Agent, &stored);
        assert_eq!(new.policy.as_deref(), Some("gold"));
        assert_eq!(new.process_server, stored.process_server);
        assert_eq!(new.disks, stored.disks);
        assert_eq!(setting_access(ComponentKind::Agent, "group"), Some(SettingAccess::Never));
    }

    #[test]
    fn an_operator_request_keeps_the_jobs_orders() {
        let mut removals = BTreeMap::new();
        removals.insert("vm1".to_owned(), RemovalOrder { order: "j1".into(), keep_target_disks: false });
        let mut ps = BTreeMap::new();
        ps.insert("vm2".to_owned(), "process-server/ps1@primary".to_owned());
        let stored = ComponentSettings {
            machine_removals: Some(removals),
            machine_process_servers: Some(ps),
            ..Default::default()
        };
        let mut windows = BTreeMap::new();
        windows.insert("vm2".to_owned(), 60.0);
        let req = ComponentSettings { machine_retention_secs: Some(windows), ..Default::default() };
        let new = req.keeping_server_keys(ComponentKind::MasterTarget, &stored);
        assert_eq!(new.machine_removals, stored.machine_removals);
        assert_eq!(new.machine_process_servers, stored.machine_process_servers);
        assert!(new.machine_retention_secs.is_some());
        assert_eq!(setting_access(ComponentKind::Agent, "protection_disabled"), Some(SettingAccess::Never));
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A record written by an earlier version (a mobility service's `not-protected` status, or
    /// any shape this version does not know) still loads; its status reads as none.
    #[test]
    fn a_stored_component_with_a_status_of_another_version_still_loads() {
        let old = r#"{"kind":"agent","name":"vm1","registered_ms":1,"last_seen_ms":2,
            "status":{"component":"agent","machine":"vm1","mode":"not-protected","status_listen":"127.0.0.1:1"},
            "policy":null,"reconciled_restore":null}"#;
        let c: Component = serde_json::from_str(old).unwrap();
        assert_eq!((c.kind, c.name.as_str(), c.last_seen_ms), (ComponentKind::Agent, "vm1", Some(2)));
        assert!(c.status.is_none());
        let null: Component = serde_json::from_str(
            r#"{"kind":"agent","name":"vm1","registered_ms":null,"last_seen_ms":null,"status":null}"#,
        )
        .unwrap();
        assert!(null.status.is_none());
    }

    /// A heartbeat, unlike the stored record, is strict: a status that is not one is refused.
    #[test]
    fn a_heartbeat_with_a_malformed_status_is_refused() {
        let bad = r#"{"kind":"agent","name":"vm1","status":{"component":"agent","mode":"not-protected"}}"#;
        assert!(serde_json::from_str::<Heartbeat>(bad).is_err());
        let beat = Heartbeat {
            kind: ComponentKind::Agent,
            name: "vm1".into(),
            status: Some(ComponentStatus::Agent(crate::agent::AgentStatus::default())),
            policy: None,
        };
        let back: Heartbeat = serde_json::from_str(&serde_json::to_string(&beat).unwrap()).unwrap();
        assert_eq!(back.status.map(|s| s.kind()), Some(ComponentKind::Agent));
    }
}
