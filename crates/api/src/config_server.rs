//! The configuration server's API (`/api/v1`): the objects operators manage and the views the
//! server computes.

use std::collections::{BTreeMap, HashSet};
use std::path::PathBuf;

use ferry_types::{codes, ErrorCode};
use schemars::JsonSchema;
use serde::{Deserialize, Serialize};

use crate::agent::{PointStats, ResyncProgress};
use crate::control::{ComponentKind, Health, HealthReason};
use crate::master_target::PointList;

/// `GET /api/v1/machines`: a discovered machine with its protection, health and RPO.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct MachineView {
    pub machine: String,
    pub site: String,
    pub os_family: String,
    pub power: String,
    /// `unprotected`, `enabling`, `failed`, `protected`, `protected (<agent mode>)`, `protected
    /// (test failover running)`, `protected (failover cancelled)`, `failover in progress`,
    /// `failover failed`, `failover cancelling`, `failover cancel failed`, `failed over
    /// (uncommitted)`, `failed over (committed)`, `disabling`, `disable failed`, `protection
    /// disabled`, `removed`, or `test machine of M (drill D)`.
    pub replication: String,
    pub policy: Option<String>,
    pub process_server: Option<String>,
    pub master_target: Option<String>,
    pub datastore: Option<String>,
    pub group: Option<String>,
    /// The protect job.
    pub job: Option<String>,
    /// None: its mobility service has not registered.
    pub health: Option<Health>,
    pub reasons: Vec<HealthReason>,
    /// The agent's replication lag now, seconds.
    pub rpo_secs: Option<f64>,
    pub caught_up: Option<bool>,
    /// The initial sync or resync running now.
    pub initial_sync: Option<ResyncProgress>,
    pub points: Option<PointStats>,
    pub last_heartbeat_ms: Option<u64>,
    /// The failover of the machine, once one was asked for.
    #[serde(default)]
    pub failover: Option<ProtectionFailover>,
    /// The drill running now, if any (replication goes on meanwhile).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub test_failover: Option<ProtectionTestFailover>,
    /// The last cancelled failover (what the recovery site wrote and the cancel discarded).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cancelled_failover: Option<ProtectionCancelledFailover>,
    /// Protection disabled or removed: what was cleaned up.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub disabled: Option<ProtectionDisabled>,
    /// A reverse protection (reprotect): the machine it replicates back and what it sent.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reprotect: Option<ProtectionReprotect>,
    /// This failed-over machine is replicated back by that (reverse) protection.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reprotected_by: Option<String>,
}

/// `GET /api/v1/machines/{name}/recovery-points`: the points the machine's master target holds.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct MachineRecoveryPoints {
    pub master_target: String,
    #[serde(flatten)]
    pub points: PointList,
}

/// A body that breaks a rule of the model: the registry code and what was wrong.
#[derive(Debug, Clone, PartialEq)]
pub struct Invalid {
    pub code: ErrorCode,
    pub message: String,
}

impl Invalid {
    pub fn bad(message: impl Into<String>) -> Invalid {
        Invalid { code: codes::BAD_REQUEST, message: message.into() }
    }
}

/// Names travel in URLs and become file names elsewhere: the data path's rule applies.
pub fn check_name(what: &str, name: &str) -> Result<(), Invalid> {
    ferry_types::validate_name(what, name).map_err(Invalid::bad)
}

/// A replication policy (POL-1).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Policy {
    pub name: String,
    /// RPO threshold: exceeding it raises an event only; it never changes replication.
    #[serde(default = "default_rpo")]
    pub rpo_threshold_secs: u64,
    #[serde(default = "default_retention")]
    pub retention_secs: u64,
    #[serde(default = "default_app")]
    pub app_consistent_secs: u64,
    #[serde(default = "default_crash")]
    pub crash_consistent_secs: u64,
    /// Set on the failback policy made with a forward policy (POL-2); read-only.
    #[serde(default)]
    pub failback_of: Option<String>,
    #[serde(default)]
    pub read_only: bool,
    /// Associated with the configuration server (failback policies always are).
    #[serde(default = "yes")]
    pub associated: bool,
}

fn default_rpo() -> u64 {
    3600
}
fn default_retention() -> u64 {
    86_400
}
fn default_app() -> u64 {
    3600
}
fn default_crash() -> u64 {
    300
}
fn yes() -> bool {
    true
}

impl Policy {
    pub fn validate(&self) -> Result<(), Invalid> {
        check_name("policy", &self.name)?;
        if self.name.ends_with("-failback") && self.failback_of.is_none() {
            return Err(Invalid::bad(format!(
                "policy names ending in -failback are reserved for the failback policies Ferry creates (POL-2): rename {:?}",
                self.name
            )));
        }
        for (field, v, min) in [
            ("rpo_threshold_secs", self.rpo_threshold_secs, 1),
            ("retention_secs", self.retention_secs, 60),
            ("crash_consistent_secs", self.crash_consistent_secs, 1),
        ] {
            if v < min {
                return Err(Invalid::bad(format!("{field} = {v} is below the minimum of {min} s")));
            }
        }
        let max = ferry_types::bounds::MAX_SECS as u64;
        for (field, v) in [
            ("rpo_threshold_secs", self.rpo_threshold_secs),
            ("retention_secs", self.retention_secs),
            ("crash_consistent_secs", self.crash_consistent_secs),
            ("app_consistent_secs", self.app_consistent_secs),
        ] {
            if v > max {
                return Err(Invalid::bad(format!("{field} = {v} is above the maximum of {max} s (ten years)")));
            }
        }
        Ok(())
    }

    /// The failback policy of a forward policy (POL-2): 15 min / 24 h / 60 min, read-only.
    pub fn failback_for(forward: &Policy) -> Policy {
        Policy {
            name: format!("{}-failback", forward.name),
            rpo_threshold_secs: 15 * 60,
            retention_secs: 24 * 3600,
            app_consistent_secs: 60 * 60,
            crash_consistent_secs: 300,
            failback_of: Some(forward.name.clone()),
            read_only: true,
            associated: true,
        }
    }
}

/// A replication group: machines that share multi-machine recovery points (RG-1, RG-2).
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ReplicationGroup {
    pub name: String,
    pub machines: Vec<String>,
    #[serde(default)]
    pub policy: Option<String>,
}

impl ReplicationGroup {
    pub fn validate(&self) -> Result<(), Invalid> {
        check_name("replication group", &self.name)?;
        if self.machines.is_empty() {
            return Err(Invalid::bad(format!("replication group {} names no machines", self.name)));
        }
        let mut seen = HashSet::new();
        for m in &self.machines {
            check_name("machine", m)?;
            if !seen.insert(m) {
                return Err(Invalid::bad(format!("machine {m} is listed twice in replication group {}", self.name)));
            }
        }
        Ok(())
    }
}

/// A pre- or post-action of a recovery-plan group.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, JsonSchema)]
#[serde(tag = "kind", rename_all = "kebab-case", deny_unknown_fields)]
pub enum Action {
    /// A command run by the configuration server (`sh -c`); a non-zero exit fails the job.
    Script {
        name: String,
        command: String,
        #[serde(default = "default_script_timeout")]
        timeout_secs: u64,
    },
    /// An instruction for a person: the job waits in "waiting for input" until confirmed.
    Manual { name: String, instruction: String },
}

fn default_script_timeout() -> u64 {
    600
}

#[derive(Debug, Clone, Default, Serialize, Deserialize, PartialEq, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PlanGroup {
    #[serde(default)]
    pub machines: Vec<String>,
    #[serde(default)]
    pub replication_groups: Vec<String>,
    #[serde(default)]
    pub pre_actions: Vec<Action>,
    #[serde(default)]
    pub post_actions: Vec<Action>,
}

/// A recovery plan: up to 7 ordered groups, up to 100 machines.
#[derive(Debug, Clone, Serialize, Deserialize, PartialEq, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RecoveryPlan {
    pub name: String,
    pub groups: Vec<PlanGroup>,
}

pub const MAX_PLAN_GROUPS: usize = 7;
pub const MAX_PLAN_MACHINES: usize = 100;

impl RecoveryPlan {
    /// `group_machines` resolves a replication group's machines.
    pub fn validate(&self, group_machines: impl Fn(&str) -> Option<Vec<String>>) -> Result<(), Invalid> {
        check_name("recovery plan", &self.name)?;
        let limit = |m: String| Invalid { code: codes::LIMIT_EXCEEDED, message: m };
        if self.groups.is_empty() {
            return Err(Invalid::bad(format!("recovery plan {} has no groups", self.name)));
        }
        if self.groups.len() > MAX_PLAN_GROUPS {
            return Err(limit(format!(
                "recovery plan {} has {} groups; at most {MAX_PLAN_GROUPS}",
                self.name,
                self.groups.len()
            )));
        }
        let mut machines = HashSet::new();
        let mut rgs = HashSet::new();
        for (i, g) in self.groups.iter().enumerate() {
            for a in g.pre_actions.iter().chain(&g.post_actions) {
                let (Action::Script { name, .. } | Action::Manual { name, .. }) = a;
                if name.trim().is_empty() {
                    return Err(Invalid::bad(format!("an action of group {} has no name", i + 1)));
                }
            }
            for rg in &g.replication_groups {
                check_name("replication group", rg)?;
                if !rgs.insert(rg.clone()) {
                    return Err(limit(format!(
                        "replication group {rg} appears in more than one group of plan {}",
                        self.name
                    )));
                }
                let members = group_machines(rg).ok_or_else(|| {
                    Invalid::bad(format!(
                        "replication group {rg} (group {} of plan {}) does not exist",
                        i + 1,
                        self.name
                    ))
                })?;
                for m in members {
                    if !machines.insert(m.clone()) {
                        return Err(limit(format!("machine {m} appears more than once in plan {}", self.name)));
                    }
                }
            }
            for m in &g.machines {
                check_name("machine", m)?;
                if !machines.insert(m.clone()) {
                    return Err(limit(format!("machine {m} appears more than once in plan {}", self.name)));
                }
            }
        }
        if machines.len() > MAX_PLAN_MACHINES {
            return Err(limit(format!(
                "recovery plan {} has {} machines; at most {MAX_PLAN_MACHINES}",
                self.name,
                machines.len()
            )));
        }
        Ok(())
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum JobState {
    Queued,
    InProgress,
    WaitingForInput,
    Succeeded,
    Failed,
    Cancelled,
}

impl JobState {
    pub fn as_str(self) -> &'static str {
        match self {
            JobState::Queued => "queued",
            JobState::InProgress => "in-progress",
            JobState::WaitingForInput => "waiting-for-input",
            JobState::Succeeded => "succeeded",
            JobState::Failed => "failed",
            JobState::Cancelled => "cancelled",
        }
    }
    pub fn finished(self) -> bool {
        matches!(self, JobState::Succeeded | JobState::Failed | JobState::Cancelled)
    }
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum StepState {
    Pending,
    Running,
    WaitingForInput,
    Done,
    Failed,
    Cancelled,
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct Step {
    pub name: String,
    pub state: StepState,
    /// Safe to run again after a restart interrupted it.
    pub idempotent: bool,
    #[serde(default)]
    pub message: Option<String>,
    /// When it last started running, and when it ended (done, failed, confirmed).
    #[serde(default)]
    pub started_ms: Option<u64>,
    #[serde(default)]
    pub finished_ms: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct JobError {
    pub code: u32,
    pub message: String,
    pub remedy: String,
}

impl JobError {
    pub fn new(code: ErrorCode, message: impl Into<String>) -> JobError {
        JobError { code: code.code, message: message.into(), remedy: code.remedy.into() }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct Job {
    pub id: String,
    pub kind: String,
    /// What the job works on (a site, a plan, the database).
    pub target: String,
    pub state: JobState,
    pub steps: Vec<Step>,
    pub current_step: usize,
    pub progress_percent: f64,
    pub bytes_done: u64,
    pub bytes_total: u64,
    pub eta_secs: Option<f64>,
    pub error: Option<JobError>,
    /// What a person must do before the job goes on (a manual action).
    pub input_prompt: Option<String>,
    pub params: serde_json::Value,
    pub created_ms: u64,
    pub updated_ms: u64,
    pub finished_ms: Option<u64>,
    /// How often a restart resumed it.
    pub resumes: u32,
}

/// A registered site (local provider: a folder with `site.toml`).
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Site {
    pub name: String,
    /// `local` (the only provider so far).
    #[serde(default = "local")]
    pub provider: String,
    pub path: PathBuf,
}

fn local() -> String {
    "local".into()
}

/// A provider operation on a local site (real files; the site file is rewritten atomically).
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(tag = "op", rename_all = "kebab-case", deny_unknown_fields)]
pub enum SiteOperation {
    PowerOn {
        machine: String,
        /// Power on a machine that failed over from this site (two copies of it then run; the
        /// old one's writes never reach the failed-over disks).
        #[serde(default, skip_serializing_if = "std::ops::Not::not")]
        allow_failed_over: bool,
    },
    PowerOff {
        machine: String,
    },
    /// Kill the machine at once (SIGKILL to its process group), like pulling the plug.
    Crash {
        machine: String,
    },
    /// A new machine on `host`, its disks as sparse files in `datastore`.
    CreateMachine {
        machine: String,
        host: String,
        datastore: String,
        os_family: String,
        disks: Vec<NewDisk>,
    },
    /// Remove a powered-off machine and its disk files.
    DeleteMachine {
        machine: String,
    },
    AttachDisk {
        master_target: String,
        disk: PathBuf,
    },
    DetachDisk {
        master_target: String,
        disk: PathBuf,
    },
    /// A qcow2 overlay on each disk (the machine then writes to the overlay).
    CreateSnapshot {
        machine: String,
    },
    /// Commit every snapshot back into the disks (`qemu-img commit`, newest first) and delete them.
    MergeSnapshots {
        machine: String,
    },
    /// Add a machine on disk files the site already holds (a failed-over machine on its
    /// replica disks: the files and their UUIDs are kept), powered off. Adopting the same
    /// machine on the same disks again changes nothing.
    AdoptMachine {
        machine: String,
        host: String,
        os_family: String,
        disks: Vec<crate::inventory::Disk>,
        /// Settings for the program that runs it (the site's `[power]`), as a machine's `extra`.
        #[serde(default)]
        #[schemars(with = "serde_json::Map<String, serde_json::Value>")]
        extra: toml::Table,
    },
    /// Remove a powered-off machine from the site, keeping its disk files (a failed-over
    /// machine whose disks go back to their replica when the failover is cancelled).
    ReleaseMachine {
        machine: String,
    },
    /// A test failover's machine, in the isolated test area: on the test network only, its
    /// disks network-attached exports of a recovery point (`nbd_disks`: `(disk, NBD address)`),
    /// no disk files of its own, powered off. Made by test-failover jobs only (the operations
    /// API refuses it: the addresses would let a token holder attach any export).
    CreateTestMachine {
        machine: String,
        host: String,
        os_family: String,
        network: String,
        nbd_disks: Vec<(String, String)>,
        #[serde(default)]
        #[schemars(with = "serde_json::Map<String, serde_json::Value>")]
        extra: toml::Table,
    },
}

impl SiteOperation {
    /// The operation's name (`power-on`, `create-machine`, …).
    pub fn name(&self) -> &'static str {
        match self {
            SiteOperation::PowerOn { .. } => "power-on",
            SiteOperation::PowerOff { .. } => "power-off",
            SiteOperation::Crash { .. } => "crash",
            SiteOperation::CreateMachine { .. } => "create-machine",
            SiteOperation::DeleteMachine { .. } => "delete-machine",
            SiteOperation::AttachDisk { .. } => "attach-disk",
            SiteOperation::DetachDisk { .. } => "detach-disk",
            SiteOperation::CreateSnapshot { .. } => "create-snapshot",
            SiteOperation::MergeSnapshots { .. } => "merge-snapshots",
            SiteOperation::AdoptMachine { .. } => "adopt-machine",
            SiteOperation::CreateTestMachine { .. } => "create-test-machine",
            SiteOperation::ReleaseMachine { .. } => "release-machine",
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct NewDisk {
    pub name: String,
    pub size: u64,
}

/// `POST /api/v1/protections`.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ProtectRequest {
    #[serde(default)]
    pub machine: Option<String>,
    /// Several machines (with `group`: every machine of the replication group, protected together).
    #[serde(default)]
    pub machines: Vec<String>,
    #[serde(default)]
    pub group: Option<String>,
    pub policy: String,
    pub process_server: String,
    pub master_target: String,
    /// A datastore of the master target's site, where the replica disks are created.
    pub datastore: String,
    /// How long to wait for the machines' mobility services to register (RP-7: up to 15 min).
    #[serde(default = "default_wait")]
    pub wait_secs: u64,
    /// The initial sync fails when it makes no progress for this long.
    #[serde(default = "default_stall")]
    pub stall_secs: u64,
}

fn default_stall() -> u64 {
    600
}

fn default_wait() -> u64 {
    900
}

/// One machine's protection, as stored (`protection/<machine>`).
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct Protection {
    pub machine: String,
    pub site: String,
    pub os_family: String,
    pub policy: String,
    pub process_server: String,
    pub master_target: String,
    pub datastore: String,
    /// The datastore's folder (where `<machine>/<disk>.img` replicas go).
    pub datastore_path: PathBuf,
    #[serde(default)]
    pub group: Option<String>,
    /// `enabling`, `protected` or `failed`.
    pub state: String,
    pub job: String,
    pub disks: Vec<ProtectedDisk>,
    pub since_ms: u64,
    /// The machine's failover, once one was asked for (its jobs keep it current).
    #[serde(default)]
    pub failover: Option<ProtectionFailover>,
    /// The test failover (drill) running now, from its start until its cleanup ends.
    #[serde(default)]
    pub test_failover: Option<ProtectionTestFailover>,
    /// The last failover that was cancelled (the machine runs at its primary site again).
    #[serde(default)]
    pub cancelled_failover: Option<ProtectionCancelledFailover>,
    /// Protection was disabled or removed (kept for the reprotect check, RP-2).
    #[serde(default)]
    pub disabled: Option<ProtectionDisabled>,
    /// A reverse protection (made by reprotect): which machine it replicates back, and how.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reprotect: Option<ProtectionReprotect>,
    /// The reverse protection that replicates this (failed-over) machine back, once reprotected.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub reprotected_by: Option<String>,
}

/// `POST /api/v1/machines/{name}/reprotect`: replicate a failed-over machine back to the site it
/// came from (direction recovery → primary, preselected; ST-2), with the failback policy (ST-6).
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ReprotectRequest {
    /// A master target of the primary site (ST-3); its retention volume holds the reverse
    /// recovery points (ST-5: each master target owns one retention volume).
    pub master_target: String,
    /// The process server the failed-over machine streams through (ST-3, PS-1).
    pub process_server: String,
    /// A datastore of the primary site (ST-4): where new disks would go; with the primary's
    /// disks still there (original location) it is required but not used.
    pub datastore: String,
    /// The resync fails when it makes no progress for this long (1 s … 1 day).
    #[serde(default = "default_stall")]
    pub stall_secs: u64,
    /// The operator's choice for a split brain: the old primary wrote after the failover, and
    /// those writes are overwritten by the recovery site's version. Without it such a reprotect
    /// stops and names what would be discarded.
    #[serde(default)]
    pub discard_primary_changes: bool,
    /// How far the old primary's clock may be off (0 … 3600 s): its last write later than the
    /// failover's start minus this counts as a split brain; a clock measured further off than
    /// this decides nothing (split brain too).
    #[serde(default = "default_clock_skew")]
    pub clock_skew_secs: u64,
}

fn default_clock_skew() -> u64 {
    5
}

/// One precondition of a reprotect, checked before anything changes.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ReprotectCheck {
    /// The requirement it enforces (`RP-8`, `DS-1`, …) or Ferry's own name (`leftover-replica`).
    pub id: String,
    pub passed: bool,
    /// What was checked, and what was found.
    pub message: String,
    /// The code a failed check refuses with.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub code: Option<u32>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub remedy: Option<String>,
}

/// The answer to a reprotect's dry run: every check, and what a real run would do.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct ReprotectPlan {
    pub machine: String,
    /// The failed-over machine that replicates back (`MACHINE.SITE`).
    pub recovery_machine: Option<String>,
    /// `recovery → primary` site names.
    pub direction: String,
    /// The failback policy the reprotect selects (POL-2, ST-6).
    pub policy: Option<String>,
    /// `original` (the primary's disks, only differences travel) or `alternate` (new disks).
    pub location: String,
    pub checks: Vec<ReprotectCheck>,
    /// Every check passed: a real run would start.
    pub ready: bool,
}

/// Where one machine of a plan reprotects to (ST-3, ST-4).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ReprotectTargets {
    pub master_target: String,
    pub process_server: String,
    pub datastore: String,
}

/// `POST /api/v1/recovery-plans/{name}/reprotect[/dry-run]`: reprotect every machine of a plan
/// in one job (the only way for a replication group, RG-3). Every machine needs values: its
/// own entry in `machines`, else `defaults`; one named by neither refuses the request.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PlanReprotectRequest {
    #[serde(default)]
    pub defaults: Option<ReprotectTargets>,
    /// Machine, as the plan names it → its values. After a failback the machine's failed-over
    /// record is its reverse protection (`web1.recovery`): reprotecting the plan then goes
    /// forward again, with these values.
    #[serde(default)]
    pub machines: BTreeMap<String, ReprotectTargets>,
    #[serde(default = "default_stall")]
    pub stall_secs: u64,
    #[serde(default)]
    pub discard_primary_changes: bool,
    #[serde(default = "default_clock_skew")]
    pub clock_skew_secs: u64,
}

/// The answer to a plan reprotect's dry run: the plan's own checks (RG-1, RG-2, RG-3) and every
/// machine's.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct PlanReprotectPlan {
    pub plan: String,
    pub checks: Vec<ReprotectCheck>,
    pub machines: Vec<ReprotectPlan>,
    /// Every check of the plan and of every machine passed.
    pub ready: bool,
}

/// `POST /api/v1/recovery-plans/{name}/failback`: fail every reprotected machine of a plan back
/// (FB-1), group by group: the failover of their reverse protections.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PlanFailbackRequest {
    /// Planned: zero data loss (every recovery-site machine quiesced, drained, shut down).
    #[serde(default)]
    pub planned: bool,
    /// Otherwise `latest` (default) or `latest-app` (RC-1); a replication group's members go to
    /// one multi-machine point of that kind.
    #[serde(default)]
    pub point: Option<String>,
    #[serde(default)]
    pub reason: Option<String>,
    #[serde(default = "default_drain_secs")]
    pub drain_secs: u64,
    #[serde(default)]
    pub no_start: bool,
}

/// A reverse protection's origin, on its record (the failed-over machine's protection).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ProtectionReprotect {
    /// The machine that failed over (whose primary disks this protection replicates to).
    pub of: String,
    /// `original` or `alternate`.
    pub location: String,
    /// The primary machine's disk files the master target adopted (original location).
    pub primary_disks: Vec<ProtectedDisk>,
    /// Bytes of the regions the old primary's agent could not confirm at the recovery site (its
    /// activity-log extents and change bitmap): compared block by block, and where they differ
    /// the recovery site's version is sent — the primary's own is the expected loss of an
    /// unplanned failover.
    pub primary_unshipped_bytes: u64,
    /// Bytes the failed-over machine's agent tracked (after the point, and since its boot).
    #[serde(default)]
    pub tracked_bytes: Option<u64>,
    /// Bytes the resync sent (the agent's count), once it ended.
    #[serde(default)]
    pub resynced_bytes: Option<u64>,
    pub requested_ms: u64,
    #[serde(default)]
    pub protected_ms: Option<u64>,
    /// The request's split-brain choice and clock margin (see `ReprotectRequest`).
    #[serde(default)]
    pub discard_primary_changes: bool,
    #[serde(default)]
    pub clock_skew_secs: u64,
    /// The old primary's last write (the server's clock: its agent's lease corrected by the
    /// clock offset measured from its heartbeats), when known.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub primary_last_write_ms: Option<u64>,
    /// What the reprotect decided about the old primary's unshipped writes: `expected-loss`
    /// (before the failover) or `split-brain-discarded` (the operator chose to discard).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub primary_writes: Option<String>,
    /// Where the master target keeps the old primary's blocks the resync wrote over (until the
    /// operator discards them: disabling this protection removes them).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub primary_overwritten: Option<crate::master_target::PrimaryOverwritten>,
    /// What differs is found by comparing whole disks by block hash (the recovery machine's
    /// tracking was lost, or its copy does not link to the primary's), not from tracking.
    #[serde(default)]
    pub hash_fallback: bool,
    /// It replaced the recovery machine's record of the cycle before (a reprotect after a
    /// failback), whose replica and spool it removes first; a retry after a failure keeps that.
    #[serde(default)]
    pub replaces_earlier_cycle: bool,
}

/// A disabled (or removed) protection, on its record: what was cleaned up, and where.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ProtectionDisabled {
    /// The disable job.
    pub job: String,
    /// `remove`: the source side was not waited for (unreachable); it cleans up when it is back.
    pub removed: bool,
    /// The machine was failed over (`force`): its reprotect and failback are no longer possible.
    pub failed_over: bool,
    pub requested_ms: u64,
    /// When the last step ended (none while it runs or after it failed).
    #[serde(default)]
    pub done_ms: Option<u64>,
    /// Who asked (the token's name).
    pub by: String,
    /// What the agent did (or why it was not waited for).
    #[serde(default)]
    pub agent: Option<String>,
    /// Bytes of the process server's spool deleted (none: not confirmed, e.g. with `remove`).
    #[serde(default)]
    pub deleted_spool_bytes: Option<u64>,
    /// Bytes of the replica (journal, recovery points, target disks) deleted at the master target.
    #[serde(default)]
    pub deleted_replica_bytes: Option<u64>,
    /// The target disks were kept: a failed-over machine runs from them.
    #[serde(default)]
    pub kept_target_disks: bool,
}

/// `POST /api/v1/machines/{name}/disable-protection`: stop protecting a machine and delete what
/// protection made (spool, replica, recovery points); the machine itself keeps running.
#[derive(Debug, Clone, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct DisableProtectionRequest {
    /// The source (primary site) is unreachable: do not wait for its agent and process server
    /// (they clean up when they are back); the recovery side is cleaned up all the same.
    #[serde(default)]
    pub remove: bool,
    /// Also for a failed-over machine: its recovery points go, and reprotect and failback are
    /// then impossible (RP-2); the machine at the recovery site keeps running on its disks.
    #[serde(default)]
    pub force: bool,
}

/// A failover cancelled before commit, on the protection record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ProtectionCancelledFailover {
    /// The cancel job.
    pub job: String,
    pub kind: FailoverKind,
    /// The point the failed-over disks were at, if they reached one.
    #[serde(default)]
    pub point: Option<crate::master_target::Point>,
    /// The seq the replica holds again (the primary's last write the recovery site held).
    pub restored_seq: u64,
    /// What the machine wrote at the recovery site and the cancel discarded.
    pub recovery_write_bytes: u64,
    pub recovery_write_extents: u64,
    pub cancelled_ms: u64,
    /// Who asked (the token's name).
    pub by: String,
}

/// `POST /api/v1/machines/{name}/failover/cancel`: undo a failover before commit.
#[derive(Debug, Clone, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CancelFailoverRequest {
    /// Leave the primary machine powered off (its quiesce is lifted all the same).
    #[serde(default)]
    pub no_start: bool,
}

/// A machine's running test failover on its protection record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ProtectionTestFailover {
    pub drill: String,
    /// The job working on it now (start or cleanup).
    pub job: String,
    pub started_ms: u64,
}

/// `POST /api/v1/test-failovers`: a drill of a protected machine at a point, replication going on.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct TestFailoverRequest {
    pub machine: String,
    /// An RC-1 selector, a point ID or a seq; default `latest-processed` (the newest point the
    /// master target holds).
    #[serde(default)]
    pub point: Option<String>,
    /// Make the writable export of the point but start no test machine (attach it yourself:
    /// the job shows the NBD URLs).
    #[serde(default)]
    pub no_start: bool,
}

/// `POST /api/v1/machines/{name}/test-failover/cleanup`: end the drill, recording its result.
#[derive(Debug, Clone, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct CleanupTestFailoverRequest {
    /// What the drill showed (the operator's verdict); none: not recorded.
    #[serde(default)]
    pub result: Option<DrillResult>,
    /// Observations for the drill record (at most 2000 characters).
    #[serde(default)]
    pub notes: Option<String>,
}

/// The operator's verdict on a drill.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum DrillResult {
    Passed,
    Failed,
}

/// Where a drill stands.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum DrillState {
    /// Its start job runs.
    Starting,
    /// The test machine runs (or the export is ready, with `no_start`).
    Running,
    /// Its start job failed: clean it up (whatever it made is removed).
    StartFailed,
    /// Its cleanup job runs.
    CleaningUp,
    /// Cleaned up: nothing of it is left but this record.
    CleanedUp,
}

/// A test failover's record (`GET /api/v1/drills`): kept after the cleanup.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct Drill {
    pub id: String,
    pub machine: String,
    pub state: DrillState,
    /// The point asked for, and the point it resolved to.
    pub point_requested: String,
    #[serde(default)]
    pub point: Option<crate::master_target::Point>,
    pub master_target: String,
    /// The isolated test area: the site, the test network, and the test machine (its own
    /// inventory object, no agent, never registered as the machine).
    #[serde(default)]
    pub site: Option<String>,
    pub network: String,
    #[serde(default)]
    pub test_machine: Option<String>,
    /// The writable export's disks (`nbd+unix://` URLs), while the drill runs.
    #[serde(default)]
    pub nbd_urls: Vec<String>,
    pub started_ms: u64,
    /// The token that started it.
    pub started_by: String,
    pub start_job: String,
    #[serde(default)]
    pub cleanup_job: Option<String>,
    #[serde(default)]
    pub cleaned_up_ms: Option<u64>,
    #[serde(default)]
    pub cleaned_up_by: Option<String>,
    #[serde(default)]
    pub result: Option<DrillResult>,
    #[serde(default)]
    pub notes: Option<String>,
    /// Why the start failed, if it did.
    #[serde(default)]
    pub error: Option<String>,
    /// The recovery plan whose test failover started this drill (its machines share one test
    /// network, `plan-test-PLAN`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub plan: Option<String>,
}

/// Planned (primary healthy: no acknowledged write is lost) or unplanned (primary lost: the
/// writes after the chosen point are).
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum FailoverKind {
    Planned,
    Unplanned,
}

/// Where a machine's failover stands, as the configuration server knows it.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum FailoverStage {
    /// A failover job runs (or ran and failed: see its job).
    InProgress,
    /// The disks at the recovery site hold the point; it may still change.
    FailedOver,
    /// Committed: the point cannot change any more.
    Committed,
}

/// A machine's failover on its protection record.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ProtectionFailover {
    pub kind: FailoverKind,
    pub stage: FailoverStage,
    /// The job working on it now, or the last one (failover, change point, commit).
    pub job: String,
    pub reason: String,
    pub started_ms: u64,
    /// The point the failed-over disks hold.
    #[serde(default)]
    pub point: Option<crate::master_target::Point>,
    /// The newest write the recovery site held when the disks were handed over.
    #[serde(default)]
    pub handed_over_seq: Option<u64>,
    /// Writes after the point the recovery site held and the failed-over disks do not have.
    #[serde(default)]
    pub discarded: Option<crate::master_target::DiscardedWrites>,
    /// Planned: the seq of the primary's last write (its agent quiesced there).
    #[serde(default)]
    pub primary_last_seq: Option<u64>,
    /// What became of the primary machine (shut down, or why it could not be).
    #[serde(default)]
    pub primary: Option<String>,
    #[serde(default)]
    pub committed_ms: Option<u64>,
    /// The machine at the recovery site (`MACHINE.SITE`, its own inventory object and agent
    /// identity, on the failed-over disks), once started.
    #[serde(default)]
    pub recovery_machine: Option<String>,
    #[serde(default)]
    pub recovery_site: Option<String>,
    /// Whether the machine at the recovery site was running when a change of point shut it
    /// down (it is started again after).
    #[serde(default)]
    pub restart_recovery_machine: bool,
    /// The change-point job that decided `restart_recovery_machine` (decided once per job).
    #[serde(default)]
    pub restart_decided_by: Option<String>,
}

/// `POST /api/v1/failovers`: fail a protected machine over to its recovery site.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct FailoverRequest {
    pub machine: String,
    pub kind: FailoverKind,
    /// Unplanned only: an RC-1 selector (`latest`, `latest-processed`, `latest-app`,
    /// `latest-multi`, `latest-multi-app`), a point ID or a seq; default `latest` (everything
    /// the recovery site holds). A planned failover's point is the primary's last write.
    #[serde(default)]
    pub point: Option<String>,
    /// Why (kept in the replica's fence and the job); default names the kind.
    #[serde(default)]
    pub reason: Option<String>,
    /// Planned: how long to wait for the recovery site to hold every write of the primary.
    #[serde(default = "default_drain_secs")]
    pub drain_secs: u64,
    /// Put the machine at the recovery site on its disks but leave it off (power it on with
    /// the site operation when ready); default: start it.
    #[serde(default)]
    pub no_start: bool,
}

fn default_drain_secs() -> u64 {
    300
}

/// `POST /api/v1/recovery-plans/{name}/failover`: fail every machine of a plan over, group by
/// group.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PlanFailoverRequest {
    pub kind: FailoverKind,
    /// Unplanned only: an RC-1 selector (`latest`, `latest-processed`, `latest-app`,
    /// `latest-multi`, `latest-multi-app`; a point ID is one machine's and is refused). The
    /// members of a replication group all go to one multi-machine point (app-consistent for
    /// the `-app` selectors), chosen before any is fenced.
    #[serde(default)]
    pub point: Option<String>,
    #[serde(default)]
    pub reason: Option<String>,
    #[serde(default = "default_drain_secs")]
    pub drain_secs: u64,
    #[serde(default)]
    pub no_start: bool,
}

/// `POST /api/v1/recovery-plans/{name}/test-failover`: a drill of every machine of the plan,
/// group by group, with its actions; replication goes on.
#[derive(Debug, Clone, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PlanTestFailoverRequest {
    /// An RC-1 selector (default `latest-processed`); a replication group's members all go to
    /// one multi-machine point.
    #[serde(default)]
    pub point: Option<String>,
    /// Export the points but start no test machine.
    #[serde(default)]
    pub no_start: bool,
}

/// `POST /api/v1/machines/{name}/failover/change-point`: another point, before commit.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct ChangePointRequest {
    pub point: String,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, JsonSchema)]
pub struct ProtectedDisk {
    pub name: String,
    pub path: PathBuf,
    #[serde(default)]
    pub uuid: Option<String>,
    #[serde(default)]
    pub size: Option<u64>,
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RegisterRequest {
    pub kind: ComponentKind,
    pub name: String,
    pub passphrase: String,
    /// PEM certificate request (only its public key is used).
    pub csr: String,
    /// Host names / addresses the component is reached at (put in its certificate).
    #[serde(default)]
    pub hosts: Vec<String>,
    /// The site the component runs at, for its identity (`kind/name@site`). An agent's site is
    /// the one whose inventory holds its machine; a component a discovered site lists must name
    /// that site (or none).
    #[serde(default)]
    pub site: Option<String>,
}

/// `POST /api/v1/register` answer: the signed certificate and the component's token.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct Registered {
    pub certificate: String,
    pub ca: String,
    pub token: String,
    pub token_id: String,
    /// The identity the certificate carries (`agent/db1@primary`).
    pub identity: String,
}

/// `GET /api/v1/server`.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct ServerInfo {
    pub version: String,
    /// `sqlite` or `postgres`.
    pub database: String,
    pub ca_fingerprint: String,
    pub listen: String,
}

/// Which configuration server is authoritative (stored with its data, raised by a promotion):
/// only the server holding the highest epoch changes anything.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct Authority {
    pub epoch: u64,
    /// The authoritative server's `name`.
    pub server: String,
    pub since_ms: u64,
}

/// What a configuration server is now.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
#[serde(rename_all = "kebab-case")]
pub enum ServerRole {
    /// Authoritative: it runs jobs and takes changes.
    Active,
    /// Keeps a copy of the active server's data and takes no changes until promoted.
    Standby,
    /// Another server was promoted above it: it takes no changes, runs no jobs, serves no
    /// settings.
    Stale,
}

/// `GET /api/v1/authority` (anyone: it is what a returning server and the operator ask).
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct AuthorityStatus {
    /// This server's name.
    pub server: String,
    pub role: ServerRole,
    /// The authority this server's data holds (a standby: the active server's, as last copied).
    pub authority: Option<Authority>,
    /// Stale: the higher authority it learned of.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub superseded_by: Option<Authority>,
    /// Standby: how its copy stands.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub standby: Option<StandbyStatus>,
}

/// `POST /api/v1/authority/promote`.
#[derive(Debug, Clone, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct PromoteRequest {
    /// Promote although the server it copies from (or a peer) still answers as active: only
    /// when that server is cut off from its components too (else both would steer them).
    #[serde(default)]
    pub force: bool,
}

/// A standby's copy of the active server's data.
#[derive(Debug, Clone, Default, Serialize, Deserialize, JsonSchema)]
pub struct StandbyStatus {
    /// The active server it copies from (HOST:PORT).
    pub primary: String,
    /// When the last copy was taken in full.
    #[serde(default)]
    pub last_copy_ms: Option<u64>,
    /// Copies taken since start.
    pub copies: u64,
    /// Why the last attempt failed (the copy stays as it was).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// `GET /api/v1/replication/snapshot` (admin): the active server's data in one consistent read,
/// for its standby.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct ReplicationSnapshot {
    pub authority: Authority,
    pub taken_ms: u64,
    /// Every table, as `ferry_store::Store::export_all` reads it.
    pub data: serde_json::Value,
}

/// An entry of the error registry (`GET /api/v1/errors`).
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct ErrorEntry {
    pub code: u32,
    pub name: String,
    pub meaning: String,
    pub remedy: String,
    pub http_status: u16,
}

impl From<ErrorCode> for ErrorEntry {
    fn from(c: ErrorCode) -> ErrorEntry {
        ErrorEntry {
            code: c.code,
            name: c.name.into(),
            meaning: c.meaning.into(),
            remedy: c.remedy.into(),
            http_status: c.http_status,
        }
    }
}

/// An API token (never its secret).
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct TokenInfo {
    pub id: String,
    pub name: String,
    /// `reader`, `operator`, `admin` or `component`.
    pub role: String,
    pub created_ms: i64,
}

/// `POST /api/v1/tokens`.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct NewToken {
    pub name: String,
    /// `reader`, `operator` or `admin`.
    pub role: String,
}

/// A token just created: its secret is shown this once.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct TokenCreated {
    pub id: String,
    pub name: String,
    pub role: String,
    pub token: String,
    pub note: String,
}

/// A new registration passphrase (shown once).
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct Passphrase {
    pub passphrase: String,
    pub note: String,
}

/// What a `DELETE` removed.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct Deleted {
    pub deleted: Vec<String>,
}

/// `POST /api/v1/policies`: the policy and its failback policy (POL-2).
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct PolicyCreated {
    pub policy: Policy,
    pub failback_policy: Policy,
}

/// `POST /api/v1/sites`: the site and its first discovery job.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct SiteAdded {
    pub site: Site,
    pub job: Job,
}

/// A revoked data-path certificate: every component refuses it on every data-path connection
/// (and cuts its established ones) once it fetched its settings.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize, JsonSchema)]
pub struct RevokedCertificate {
    /// The certificate's serial, lowercase hex (as `ferry components` and `openssl x509 -serial` show it).
    pub serial: String,
    pub reason: String,
    pub revoked_ms: u64,
}

/// `POST /api/v1/certificates/{serial}/revoke`: the body is optional.
#[derive(Debug, Clone, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct RevokeCertificate {
    /// Why (kept with the revocation and in the event log); at most 200 characters.
    #[serde(default)]
    pub reason: Option<String>,
}

/// `POST /api/v1/jobs/{id}/confirm`: the step being confirmed (the job's `current_step` when
/// its prompt was read); without it, whatever the job waits for now.
#[derive(Debug, Clone, Default, Serialize, Deserialize, JsonSchema)]
#[serde(deny_unknown_fields)]
pub struct Confirm {
    #[serde(default)]
    pub step: Option<usize>,
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct Confirmed {
    pub confirmed: String,
    pub step: usize,
}

#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct Cancelling {
    pub cancelling: String,
}

/// An event (health transitions, discovery warnings, restores).
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct EventInfo {
    pub seq: i64,
    pub time_ms: i64,
    /// Registry code, 0 for none.
    pub code: i64,
    /// `info`, `warning`, `critical`, `healthy`.
    pub severity: String,
    pub object: String,
    pub message: String,
}

/// The configuration server's routes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ConfigServerEndpoint {
    OpenApi,
    Errors,
    Server,
    Authority,
    Promote,
    ReplicationSnapshot,
    Ca,
    Register,
    ListTokens,
    CreateToken,
    DeleteToken,
    RotatePassphrase,
    ListPolicies,
    CreatePolicy,
    GetPolicy,
    PutPolicy,
    DeletePolicy,
    ListGroups,
    CreateGroup,
    GetGroup,
    PutGroup,
    DeleteGroup,
    ListPlans,
    CreatePlan,
    GetPlan,
    PutPlan,
    DeletePlan,
    DrillPlan,
    FailoverPlan,
    ReprotectPlan,
    ReprotectPlanDryRun,
    FailbackPlan,
    ListSites,
    CreateSite,
    GetSite,
    DeleteSite,
    DiscoverSite,
    SiteOperation,
    Inventory,
    ListJobs,
    GetJob,
    ConfirmJob,
    CancelJob,
    Events,
    Heartbeat,
    Components,
    GetSettings,
    PutSettings,
    Backup,
    Protect,
    Machines,
    RecoveryPoints,
    Failover,
    ChangeFailoverPoint,
    CommitFailover,
    CancelFailover,
    DisableProtection,
    Reprotect,
    ReprotectDryRun,
    TestFailoverPlan,
    CleanupTestFailoverPlan,
    TestFailover,
    CleanupTestFailover,
    Drills,
    RevokedCertificates,
    RevokeCertificate,
}

use crate::control::{ComponentHealth, ComponentSettings, Heartbeat, HeartbeatAck};
use crate::inventory::Inventory;
use crate::route::{get, Method::*, Role, Route};
use ConfigServerEndpoint as C;

/// The OpenAPI document itself and the CA certificate (PEM text) have no JSON schema of their own.
pub type Document = serde_json::Value;

/// Every route of the configuration server (`/api/v1`).
#[rustfmt::skip]
pub const ROUTES: &[Route<ConfigServerEndpoint>] = &[
    get::<_, Document>(C::OpenApi, "/api/v1/openapi.json", Role::Anyone, "This OpenAPI document"),
    get::<_, Vec<ErrorEntry>>(C::Errors, "/api/v1/errors", Role::Anyone, "The error-code table (code, name, meaning, remedy)"),
    get::<_, ServerInfo>(C::Server, "/api/v1/server", Role::Anyone, "Server identity: version, database backend, CA fingerprint"),
    get::<_, AuthorityStatus>(C::Authority, "/api/v1/authority", Role::Anyone, "Which server is authoritative (epoch), and what this one is: active, standby (with its copy's age) or stale"),
    Route::new::<PromoteRequest, AuthorityStatus>(C::Promote, Post, "/api/v1/authority/promote", Role::Admin, "Promote this standby {force?}: it takes the next epoch, stops copying, resumes the jobs it copied and takes changes (the old server, back, is stale); refused while the server it copies from still answers as active, unless force"),
    get::<_, ReplicationSnapshot>(C::ReplicationSnapshot, "/api/v1/replication/snapshot", Role::Admin, "The whole configuration database in one consistent read, with the authority, for a standby"),
    get::<_, String>(C::Ca, "/api/v1/ca", Role::Anyone, "The CA certificate (PEM); check its fingerprint before trusting it"),
    Route::new::<RegisterRequest, Registered>(C::Register, Post, "/api/v1/register", Role::Anyone, "Register a component: passphrase + certificate request (CSR) -> certificate and component token").answers(201),
    get::<_, Vec<TokenInfo>>(C::ListTokens, "/api/v1/tokens", Role::Admin, "List API tokens (never their secrets)"),
    Route::new::<NewToken, TokenCreated>(C::CreateToken, Post, "/api/v1/tokens", Role::Admin, "Create an API token {name, role}: the secret is shown once").answers(201),
    Route::new::<(), Deleted>(C::DeleteToken, Delete, "/api/v1/tokens/{id}", Role::Admin, "Revoke a token").no_body(),
    Route::new::<(), Passphrase>(C::RotatePassphrase, Post, "/api/v1/registration/passphrase", Role::Admin, "Rotate the registration passphrase (shown once)").no_body(),
    get::<_, Vec<Policy>>(C::ListPolicies, "/api/v1/policies", Role::Reader, "List replication policies"),
    Route::new::<Policy, PolicyCreated>(C::CreatePolicy, Post, "/api/v1/policies", Role::Operator, "Create a replication policy (its read-only -failback policy is created with it, POL-2)").answers(201),
    get::<_, Policy>(C::GetPolicy, "/api/v1/policies/{name}", Role::Reader, "Show a policy"),
    Route::new::<Policy, Policy>(C::PutPolicy, Put, "/api/v1/policies/{name}", Role::Operator, "Replace a policy (failback policies are read-only)"),
    Route::new::<(), Deleted>(C::DeletePolicy, Delete, "/api/v1/policies/{name}", Role::Operator, "Delete a forward policy and its failback policy").no_body(),
    get::<_, Vec<ReplicationGroup>>(C::ListGroups, "/api/v1/replication-groups", Role::Reader, "List replication groups"),
    Route::new::<ReplicationGroup, ReplicationGroup>(C::CreateGroup, Post, "/api/v1/replication-groups", Role::Operator, "Create a replication group (one OS family, RG-1)").answers(201),
    get::<_, ReplicationGroup>(C::GetGroup, "/api/v1/replication-groups/{name}", Role::Reader, "Show a replication group"),
    Route::new::<ReplicationGroup, ReplicationGroup>(C::PutGroup, Put, "/api/v1/replication-groups/{name}", Role::Operator, "Replace a replication group"),
    Route::new::<(), Deleted>(C::DeleteGroup, Delete, "/api/v1/replication-groups/{name}", Role::Operator, "Delete a replication group").no_body(),
    get::<_, Vec<RecoveryPlan>>(C::ListPlans, "/api/v1/recovery-plans", Role::Reader, "List recovery plans"),
    Route::new::<RecoveryPlan, RecoveryPlan>(C::CreatePlan, Post, "/api/v1/recovery-plans", Role::Operator, "Create a recovery plan (<= 7 groups, <= 100 machines)").answers(201),
    get::<_, RecoveryPlan>(C::GetPlan, "/api/v1/recovery-plans/{name}", Role::Reader, "Show a recovery plan"),
    Route::new::<RecoveryPlan, RecoveryPlan>(C::PutPlan, Put, "/api/v1/recovery-plans/{name}", Role::Operator, "Replace a recovery plan"),
    Route::new::<(), Deleted>(C::DeletePlan, Delete, "/api/v1/recovery-plans/{name}", Role::Operator, "Delete a recovery plan").no_body(),
    Route::new::<(), Job>(C::DrillPlan, Post, "/api/v1/recovery-plans/{name}/drill", Role::Operator, "Start a drill job: the plan's pre/post actions in order (manual ones wait for input; script actions need an admin token)").no_body().answers(202),
    Route::new::<PlanFailoverRequest, Job>(C::FailoverPlan, Post, "/api/v1/recovery-plans/{name}/failover", Role::Operator, "Fail a recovery plan over {kind: planned | unplanned, point?}: group by group (machines of a group in parallel, actions between), a replication group to one multi-machine point (a job)").answers(202),
    Route::new::<PlanReprotectRequest, Job>(C::ReprotectPlan, Post, "/api/v1/recovery-plans/{name}/reprotect", Role::Operator, "Reprotect every machine of a recovery plan {defaults?, machines: {machine: {master_target, process_server, datastore}}}: the only way for a replication group (RG-3); the plan's checks (RG-1, RG-2) and every machine's first, nothing changes when one fails; then one job takes every machine through the reprotect's steps together (a job)").answers(202),
    Route::new::<PlanReprotectRequest, PlanReprotectPlan>(C::ReprotectPlanDryRun, Post, "/api/v1/recovery-plans/{name}/reprotect/dry-run", Role::Operator, "Every precondition of a plan reprotect (the plan's and each machine's) with pass/fail, code, message and remedy; changes nothing"),
    Route::new::<PlanFailbackRequest, Job>(C::FailbackPlan, Post, "/api/v1/recovery-plans/{name}/failback", Role::Operator, "Fail a reprotected recovery plan back {planned?, point?: latest | latest-app}: the failover of every machine's reverse protection, group by group with the plan's actions, a replication group to one point; the original machines boot on their own disks (a job)").answers(202),
    get::<_, Vec<Site>>(C::ListSites, "/api/v1/sites", Role::Reader, "List sites"),
    Route::new::<Site, SiteAdded>(C::CreateSite, Post, "/api/v1/sites", Role::Operator, "Add a site {name, provider: local, path} and discover it").answers(201),
    get::<_, Site>(C::GetSite, "/api/v1/sites/{name}", Role::Reader, "Show a site"),
    Route::new::<(), Deleted>(C::DeleteSite, Delete, "/api/v1/sites/{name}", Role::Operator, "Remove a site and its inventory").no_body(),
    Route::new::<(), Job>(C::DiscoverSite, Post, "/api/v1/sites/{name}/discover", Role::Operator, "Rediscover a site now (a job)").no_body().answers(202),
    Route::new::<SiteOperation, Job>(C::SiteOperation, Post, "/api/v1/sites/{name}/operations", Role::Operator, "A provider operation (power-on/off, crash, create/delete-machine, attach/detach-disk, create/merge-snapshots) as a job").answers(202),
    get::<_, Vec<Inventory>>(C::Inventory, "/api/v1/inventory", Role::Reader, "The discovered inventory of every site"),
    get::<_, Vec<Job>>(C::ListJobs, "/api/v1/jobs", Role::Reader, "List jobs, newest first"),
    get::<_, Job>(C::GetJob, "/api/v1/jobs/{id}", Role::Reader, "Show a job: steps, progress, bytes, ETA, state, error"),
    Route::new::<Confirm, Confirmed>(C::ConfirmJob, Post, "/api/v1/jobs/{id}/confirm", Role::Operator, "Confirm the manual action a job waits for (body optional)"),
    Route::new::<(), Cancelling>(C::CancelJob, Post, "/api/v1/jobs/{id}/cancel", Role::Operator, "Cancel a job").no_body(),
    get::<_, Vec<EventInfo>>(C::Events, "/api/v1/events", Role::Reader, "Recent events (health transitions, discovery warnings, restores)"),
    Route::new::<Heartbeat, HeartbeatAck>(C::Heartbeat, Post, "/api/v1/heartbeats", Role::Component, "A component's heartbeat with its status (a component token may only report itself)"),
    get::<_, Vec<ComponentHealth>>(C::Components, "/api/v1/components", Role::Reader, "Components with health (Healthy / Warning / Critical) and reasons"),
    get::<_, ComponentSettings>(C::GetSettings, "/api/v1/components/{kind}/{name}/settings", Role::Component, "A component's effective settings (its configuration keys, plus what its policy implies; a component token may only read its own)"),
    Route::new::<ComponentSettings, ComponentSettings>(C::PutSettings, Put, "/api/v1/components/{kind}/{name}/settings", Role::Operator, "Set a component's configuration keys (peers, disks, policy...)"),
    Route::new::<(), Job>(C::Backup, Post, "/api/v1/backups", Role::Admin, "Start a backup job (encrypted file in the backup folder)").no_body().answers(202),
    Route::new::<ProtectRequest, Job>(C::Protect, Post, "/api/v1/protections", Role::Operator, "Enable replication {machine | machines | group, policy, process_server, master_target, datastore}: a protect job (initial sync with progress)").answers(202),
    get::<_, Vec<MachineView>>(C::Machines, "/api/v1/machines", Role::Reader, "Every discovered machine: protection state, health, RPO, points"),
    get::<_, MachineRecoveryPoints>(C::RecoveryPoints, "/api/v1/machines/{name}/recovery-points", Role::Reader, "The recovery points a protected machine's master target holds"),
    Route::new::<FailoverRequest, Job>(C::Failover, Post, "/api/v1/failovers", Role::Operator, "Fail a protected machine over {machine, kind: planned | unplanned, point, reason}: a failover job (planned: quiesce, drain, shut down, fence, disks at the last write; unplanned: try to shut down, fence, disks at the point)").answers(202),
    Route::new::<ChangePointRequest, Job>(C::ChangeFailoverPoint, Post, "/api/v1/machines/{name}/failover/change-point", Role::Operator, "Put a failed-over machine's disks at another point {point}, before commit: a job").answers(202),
    Route::new::<(), Job>(C::CommitFailover, Post, "/api/v1/machines/{name}/failover/commit", Role::Operator, "Commit a machine's failover: its point cannot change any more (a job)").no_body().answers(202),
    Route::new::<DisableProtectionRequest, Job>(C::DisableProtection, Post, "/api/v1/machines/{name}/disable-protection", Role::Operator, "Disable protection of a machine {remove?, force?}: its agent stops shipping (the machine keeps running), its spool and replica with every recovery point are deleted; `remove` does not wait for an unreachable primary site; `force` for a failed-over machine (a job)").answers(202),
    Route::new::<ReprotectRequest, Job>(C::Reprotect, Post, "/api/v1/machines/{name}/reprotect", Role::Operator, "Reprotect a failed-over machine {master_target, process_server, datastore, stall_secs?}: every precondition is checked first (nothing changes when one fails, 9038 and the check's code); then its machine at the recovery site replicates back to the primary's own disks, sending only what differs, with the failback policy (a job)").answers(202),
    Route::new::<ReprotectRequest, ReprotectPlan>(C::ReprotectDryRun, Post, "/api/v1/machines/{name}/reprotect/dry-run", Role::Operator, "Every precondition of a reprotect with pass/fail, code, message and remedy; changes nothing"),
    Route::new::<CancelFailoverRequest, Job>(C::CancelFailover, Post, "/api/v1/machines/{name}/failover/cancel", Role::Operator, "Cancel a machine's failover before commit {no_start?}: the machine at the recovery site removed and its writes discarded (reported), the replica put back at the primary's last write and unfenced, the primary started again (a job)").answers(202),
    Route::new::<PlanTestFailoverRequest, Job>(C::TestFailoverPlan, Post, "/api/v1/recovery-plans/{name}/test-failover", Role::Operator, "Test failover of a recovery plan {point?, no_start?}: a drill of every machine, group by group with the plan's actions, in one test network; a replication group at one multi-machine point; replication goes on (a job)").answers(202),
    Route::new::<CleanupTestFailoverRequest, Job>(C::CleanupTestFailoverPlan, Post, "/api/v1/recovery-plans/{name}/test-failover/cleanup", Role::Operator, "End the plan's drills {result?, notes?}: every test machine and export removed, each drill recorded (a job)").answers(202),
    Route::new::<TestFailoverRequest, Job>(C::TestFailover, Post, "/api/v1/test-failovers", Role::Operator, "Test failover (a drill) of a protected machine {machine, point}: a writable export of the point and a test machine on it in an isolated test area; replication goes on (a job)").answers(202),
    Route::new::<CleanupTestFailoverRequest, Job>(C::CleanupTestFailover, Post, "/api/v1/machines/{name}/test-failover/cleanup", Role::Operator, "End a machine's drill {result?, notes?}: the test machine and the export removed, the point released, the drill recorded (a job)").answers(202),
    get::<_, Vec<Drill>>(C::Drills, "/api/v1/drills", Role::Reader, "Test failovers (drills), running and past: when, which point, result, who"),
    get::<_, Vec<RevokedCertificate>>(C::RevokedCertificates, "/api/v1/certificates/revoked", Role::Reader, "Revoked data-path certificates (re-registration revokes the earlier one; an admin may revoke any)"),
    Route::new::<RevokeCertificate, RevokedCertificate>(C::RevokeCertificate, Post, "/api/v1/certificates/{serial}/revoke", Role::Admin, "Revoke a data-path certificate by serial {reason?}: components refuse it and cut its connections once they fetch their settings"),
];

/// What `ferry config-server` prints once it listens (`--output json`: one line). The secrets are
/// there only at the first start.
#[derive(Debug, Clone, Serialize, Deserialize, JsonSchema)]
pub struct Started {
    pub listen: String,
    pub database: String,
    pub ca: PathBuf,
    pub ca_fingerprint: String,
    pub admin_token: Option<String>,
    pub registration_passphrase: Option<String>,
}
