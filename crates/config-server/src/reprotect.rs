//! Reprotect a failed-over machine, as a job: its machine at the recovery site (`MACHINE.SITE`,
//! whose agent tracked every write since the failover) replicates back to a master target of the
//! primary site, which adopts the old primary's own disks (original-location recovery, ST-9), so
//! only what differs travels: the extents the recovery site held after the failover point (the
//! master target's failover seed), what the machine wrote at the recovery site since it booted
//! (its agent's tracking), and what the old primary wrote that never reached the recovery site
//! (its agent's state, read offline while it is off). The failback policy is selected (POL-2,
//! ST-6); the reverse protection is a protection record of `MACHINE.SITE` with `reprotect` set.
//!
//! Every precondition is checked before anything changes (`checks`): the dry run lists them
//! all with pass/fail, code, message and remedy; a real run refuses with the first failed one's
//! code (9038 when the reference has no number) and changes nothing. Each job step states what it
//! wants in a component's settings (named by the job's ID) and waits for the component's status
//! to say it was done, so every step may run again after a restart.

use std::collections::BTreeMap;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::Json;
use ferry_api::agent::{Mode, VerifyState};
use ferry_api::config_server::{
    FailoverStage, ProtectedDisk, Protection, ProtectionReprotect, ReprotectCheck, ReprotectPlan, ReprotectRequest,
};
use ferry_api::control::{AdoptedDisk, AdoptionOrder, ComponentKind, ResyncSeed, SeedCompare, VerifyOrder};
use ferry_api::master_target::DiskExtent;
use ferry_api::process_server::MasterTargetRoute;
use ferry_store::Store;

use crate::discovery::Inventory;
use crate::errors::{self, ApiError, ErrorCode};
use crate::http::Body;
use crate::jobs::{now_ms, Job, JobControl, Outcome};
use crate::ops::{JobWork, Ops};
use crate::protection::{component, effective_state, fail, update_settings, wait_status, PROTECTION};
use crate::AppState;

/// A heartbeat younger than this counts as "reporting" (three default heartbeat intervals).
const FRESH_MS: u64 = 90_000;
/// How long a running component may take to take its order.
const ORDER_LIMIT: Duration = Duration::from_secs(120);
/// At most this many disks attached to one master target at once (MT-10).
const MAX_ATTACHED_DISKS: usize = 60;

/// The steps of a reprotect job, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ReprotectStep {
    /// The old primary is powered off and stays off (ST-10).
    PowerOffPrimary,
    /// Its own snapshots are merged into its disks (RP-6).
    MergeSnapshots,
    /// What its agent never shipped becomes a resync seed of the recovery machine's agent.
    PrimaryChanges,
    /// What an earlier cycle left of the recovery machine's replica and spool goes.
    PurgeEarlierCycle,
    /// The master target adopts the primary's disks for the reverse replica.
    AssignMasterTarget,
    /// The process server routes the recovery machine to the master target.
    RouteProcessServer,
    /// The recovery machine's agent gets its process server: it resyncs what differs.
    ConfigureAgent,
    /// The resync runs to its end (progress, bytes, stall detection).
    Resync,
    /// Every block of both sides compared by hash at one point of the change stream; what
    /// differs is repaired and compared again. Protected is declared from this, not from flags.
    VerifyReplica,
    /// The records say Protected (reverse).
    MarkProtected,
}

impl ReprotectStep {
    pub const ALL: [ReprotectStep; 10] = [
        ReprotectStep::PowerOffPrimary,
        ReprotectStep::MergeSnapshots,
        ReprotectStep::PrimaryChanges,
        ReprotectStep::PurgeEarlierCycle,
        ReprotectStep::AssignMasterTarget,
        ReprotectStep::RouteProcessServer,
        ReprotectStep::ConfigureAgent,
        ReprotectStep::Resync,
        ReprotectStep::VerifyReplica,
        ReprotectStep::MarkProtected,
    ];

    pub(crate) fn name(self, forward: &Protection, reverse: &Protection) -> String {
        let (m, rm) = (&forward.machine, &reverse.machine);
        let alternate = reverse.reprotect.as_ref().is_some_and(|r| r.location == "alternate");
        match self {
            ReprotectStep::PowerOffPrimary => {
                format!("power the old primary {m} off at site {} (it stays off, ST-10)", forward.site)
            }
            ReprotectStep::MergeSnapshots => format!("merge the snapshots of {m} into its disks (RP-6)"),
            ReprotectStep::PrimaryChanges => {
                format!("read what {m} wrote that never reached the recovery site (its agent's state, read offline)")
            }
            ReprotectStep::PurgeEarlierCycle => format!(
                "remove what an earlier cycle left of {rm} at {} and {} (its disks are kept)",
                reverse.master_target, reverse.process_server
            ),
            ReprotectStep::AssignMasterTarget if alternate => format!(
                "master target {} makes new disks for the replica of {rm} in datastore {} (alternate location)",
                reverse.master_target, reverse.datastore
            ),
            ReprotectStep::AssignMasterTarget => {
                format!("master target {} adopts the disks of {m} for the replica of {rm}", reverse.master_target)
            }
            ReprotectStep::RouteProcessServer => {
                format!("route {rm} through process server {} to {}", reverse.process_server, reverse.master_target)
            }
            ReprotectStep::ConfigureAgent => {
                format!("configure the agent of {rm} (failback policy {}): it resyncs what differs", reverse.policy)
            }
            ReprotectStep::Resync if alternate => format!("copy every allocated block of {rm} to the new disks"),
            ReprotectStep::Resync => format!("resync {rm} → the disks of {m} (only what differs)"),
            ReprotectStep::VerifyReplica => {
                format!("compare every block of {rm} with the disks of {m} by hash (repair what differs)")
            }
            ReprotectStep::MarkProtected => {
                format!("mark {rm} Protected (reverse direction, towards {})", forward.site)
            }
        }
    }

    fn code(self) -> ErrorCode {
        match self {
            ReprotectStep::PowerOffPrimary | ReprotectStep::MergeSnapshots => errors::CONFLICT,
            ReprotectStep::PrimaryChanges => errors::STORAGE,
            ReprotectStep::PurgeEarlierCycle | ReprotectStep::AssignMasterTarget => errors::MT_HEARTBEAT_LOST,
            ReprotectStep::RouteProcessServer => errors::PS_HEARTBEAT_LOST,
            ReprotectStep::ConfigureAgent => errors::REPROTECT_NO_SERVER_PATH,
            ReprotectStep::Resync => errors::PROTECTION_NOT_COMPLETED,
            ReprotectStep::VerifyReplica => errors::REPLICA_NOT_VERIFIED,
            ReprotectStep::MarkProtected => errors::STORE,
        }
    }
}

/// The job's steps (all idempotent).
pub fn steps(forward: &Protection, reverse: &Protection) -> Vec<(String, bool)> {
    ReprotectStep::ALL.iter().map(|s| (s.name(forward, reverse), true)).collect()
}

/// The failback policy of a forward policy (POL-2).
pub fn failback_policy_name(policy: &str) -> String {
    format!("{policy}-failback")
}

/// The checks' findings: what they looked at, for the reverse protection a real run records.
pub(crate) struct Findings {
    pub(crate) checks: Vec<ReprotectCheck>,
    /// The recovery machine's own record from the cycle before (the protection this machine's
    /// reverse came from, now failed back): a real run replaces it.
    earlier_cycle: Option<ferry_store::Doc<Protection>>,
    /// The copies do not link (or tracking was lost): whole disks are compared by hash.
    hash_fallback: bool,
    forward: Option<Protection>,
    reverse: Option<Protection>,
    recovery_machine: Option<String>,
    direction: String,
    policy: Option<String>,
    location: String,
}

impl Findings {
    fn pass(&mut self, id: &str, message: String) {
        self.checks.push(ReprotectCheck { id: id.into(), passed: true, message, code: None, remedy: None });
    }

    fn fail(&mut self, id: &str, code: ErrorCode, message: String, remedy: impl Into<String>) {
        self.checks.push(ReprotectCheck {
            id: id.into(),
            passed: false,
            message,
            code: Some(code.code),
            remedy: Some(remedy.into()),
        });
    }

    fn check(&mut self, id: &str, ok: bool, code: ErrorCode, pass: String, fail: String, remedy: &str) {
        if ok {
            self.pass(id, pass);
        } else {
            self.fail(id, code, fail, remedy);
        }
    }

    pub(crate) fn ready(&self) -> bool {
        self.checks.iter().all(|c| c.passed)
    }

    pub(crate) fn plan(&self, machine: &str) -> ReprotectPlan {
        ReprotectPlan {
            machine: machine.to_owned(),
            recovery_machine: self.recovery_machine.clone(),
            direction: self.direction.clone(),
            policy: self.policy.clone(),
            location: self.location.clone(),
            checks: self.checks.clone(),
            ready: self.ready(),
        }
    }
}

fn fresh(c: Option<&ferry_api::control::Component>) -> bool {
    c.and_then(|c| c.last_seen_ms).is_some_and(|t| now_ms().saturating_sub(t) < FRESH_MS)
}

/// Every precondition of reprotecting `machine`, checked against the store, the inventories and
/// the components' latest reports. Reads only.
pub(crate) async fn checks(
    store: &Store,
    machine: &str,
    req: &ReprotectRequest,
    in_plan: bool,
) -> Result<Findings, ApiError> {
    let mut f = Findings {
        checks: Vec::new(),
        earlier_cycle: None,
        hash_fallback: false,
        forward: None,
        reverse: None,
        recovery_machine: None,
        direction: String::new(),
        policy: None,
        location: "original".into(),
    };
    crate::model::check_name("machine", machine)?;
    if !(1..=86_400).contains(&req.stall_secs) || req.clock_skew_secs > 3600 {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            errors::BAD_REQUEST,
            format!(
                "stall_secs {} must be 1 … 86400 and clock_skew_secs {} at most 3600",
                req.stall_secs, req.clock_skew_secs
            ),
        ));
    }
    let invs: Vec<Inventory> =
        store.list::<Inventory>(crate::ops::INVENTORY).await?.into_iter().map(|d| d.body).collect();
    // RP-1: protected from its primary site and failed over from it.
    let Some(p) = store.get::<Protection>(PROTECTION, machine).await?.map(|d| d.body) else {
        f.fail(
            "RP-1",
            errors::REPROTECT_REFUSED,
            format!("{machine} was never protected from a primary site and failed over: a machine created at the recovery site cannot be reprotected"),
            "protect it instead (`ferry protect`)",
        );
        return Ok(f);
    };
    let Some(fo) = p.failover.clone() else {
        f.fail(
            "RP-1",
            errors::REPROTECT_REFUSED,
            format!("{machine} is protected but was never failed over: there is nothing to replicate back"),
            "fail it over first (`ferry failover`), or leave it protected",
        );
        return Ok(f);
    };
    let rsite = fo.recovery_site.clone().unwrap_or_default();
    f.direction = format!("{rsite} → {}", p.site);
    f.pass("RP-1", format!("{machine} was protected from site {} and failed over to site {rsite}", p.site));
    // RG-3: a replication group's members only together, through a recovery plan.
    if let Some(g) = &p.group {
        f.check(
            "RG-3",
            in_plan,
            errors::REPROTECT_REFUSED,
            format!("{machine} is in replication group {g}: reprotected with it through a recovery plan"),
            format!("{machine} is in replication group {g}: a replication group is reprotected only through a recovery plan (RG-3)"),
            "reprotect the recovery plan that holds the group (`ferry plans reprotect PLAN …`), with values for every machine",
        );
    }
    // The failover is committed (its point cannot change under the resync).
    f.check(
        "failover-committed",
        fo.stage == FailoverStage::Committed,
        errors::FAILOVER_STATE,
        format!("the failover of {machine} is committed (job {})", fo.job),
        format!("the failover of {machine} is not committed (it is {:?}): its point may still change", fo.stage),
        "commit it first (`ferry failover commit MACHINE`), then reprotect",
    );
    // RP-2: disabled, deleted at the recovery site, already reprotected.
    let rm = fo.recovery_machine.clone();
    f.recovery_machine = rm.clone();
    let rinv = invs.iter().find(|i| i.site == rsite);
    let rmach = rm.as_ref().and_then(|rm| rinv.and_then(|i| i.content.machines.iter().find(|x| &x.name == rm)));
    if let Some(d) = &p.disabled {
        f.fail(
            "RP-2",
            errors::PROTECTION_STATE,
            format!("protection of {machine} was disabled (job {}): its recovery points are gone", d.job),
            "protect the machine at the recovery site as a new machine instead",
        );
    } else if rmach.is_none() {
        f.fail(
            "RP-2",
            errors::REPROTECT_REFUSED,
            format!(
                "the failed-over machine {} is not in the inventory of site {rsite}: it was deleted (or never started)",
                rm.as_deref().unwrap_or("(none)")
            ),
            "reprotect needs the machine that runs at the recovery site; rediscover the site if it exists",
        );
    } else if let Some(by) = &p.reprotected_by {
        let busy = match store.get::<Protection>(PROTECTION, by).await? {
            Some(d) => {
                let st = effective_state(store, &d.body).await?;
                (st != "failed").then_some(st)
            }
            None => None,
        };
        match busy {
            Some(st) => f.fail(
                "RP-2",
                errors::PROTECTION_STATE,
                format!("{machine} is already reprotected: {by} is {st}"),
                "fail it back (`ferry failback`) or wait for the reprotect job",
            ),
            None => f.pass("RP-2", format!("an earlier reprotect through {by} failed: it may run again")),
        }
    } else {
        f.pass("RP-2", format!("protection of {machine} is in force and its failed-over machine exists"));
    }
    let Some(rm) = rm else { return Ok(f) };
    // A failback's reprotect (the machine's protection is itself a reprotect of `rm`, failed
    // back): `rm`'s record is the earlier cycle's, replaced by this one, and what that cycle
    // left at the chosen master target and process server is removed first.
    if p.reprotect.as_ref().is_some_and(|r| r.of == rm) {
        if let Some(d) = store.get::<Protection>(PROTECTION, &rm).await? {
            // The earlier cycle's record itself, or this reprotect's own failed one that
            // replaced it (a retry: that cycle's leftovers may still be there).
            let retry = d.body.reprotect.as_ref().is_some_and(|r| r.of == machine && r.replaces_earlier_cycle)
                && effective_state(store, &d.body).await? == "failed";
            if d.body.reprotected_by.as_deref() == Some(machine) || retry {
                f.earlier_cycle = Some(d);
            }
        }
    }
    let agent = component(store, ComponentKind::Agent, &rm).await;
    // RP-7: its agent registered; RP-3/NET-1: it reaches this server; RP-8: it runs.
    f.check(
        "RP-7",
        agent.is_some(),
        errors::AGENT_NOT_INSTALLED,
        format!("the mobility service of {rm} is registered"),
        format!("agent not installed: the mobility service of {rm} has not registered yet"),
        errors::AGENT_NOT_INSTALLED.remedy,
    );
    f.check(
        "RP-3",
        agent.is_none() || fresh(agent.as_ref()),
        errors::REPROTECT_NO_SERVER_PATH,
        format!("{rm} reaches the configuration server (heartbeat within {} s)", FRESH_MS / 1000),
        format!("{rm} has not reached the configuration server for {} s or more (95226)", FRESH_MS / 1000),
        errors::REPROTECT_NO_SERVER_PATH.remedy,
    );
    let ast = agent.as_ref().and_then(|c| c.status.as_ref()).and_then(|s| s.agent()).cloned();
    let running = rmach.is_some_and(|m| m.power == "on") && ast.is_some();
    f.check(
        "RP-8",
        running,
        errors::MACHINE_NOT_ACCESSIBLE,
        format!("{rm} is running at site {rsite}"),
        format!(
            "{rm} is not running or not accessible (power {}, agent {}) (78093)",
            rmach.map(|m| m.power.as_str()).unwrap_or("unknown"),
            if ast.is_some() { "reporting" } else { "not reporting" }
        ),
        errors::MACHINE_NOT_ACCESSIBLE.remedy,
    );
    // The primary site: its inventory, the primary machine (original location), the chosen
    // master target, process server and datastore.
    let pinv = invs.iter().find(|i| i.site == p.site);
    let pmach = pinv.and_then(|i| i.content.machines.iter().find(|x| x.name == p.machine));
    // ST-8/MT-11: the primary machine deleted → alternate-location recovery (new disks in the
    // chosen datastore, a full copy; the machine is made on them at failback).
    if pmach.is_none() {
        f.location = "alternate".into();
    }
    let mt =
        invs.iter().find_map(|i| i.content.master_targets.iter().find(|m| m.name == req.master_target).map(|m| (i, m)));
    let Some((mt_inv, mtm)) = mt else {
        f.fail(
            "ST-3",
            errors::NOT_FOUND,
            format!("master target {} is in no discovered site's inventory", req.master_target),
            "discover the primary site (`ferry sites discover`) or name one of its master targets",
        );
        return Ok(f);
    };
    f.check(
        "ST-2",
        mt_inv.site == p.site,
        errors::REPROTECT_REFUSED,
        format!(
            "master target {} is at the primary site {}: direction {rsite} → {}",
            req.master_target, p.site, p.site
        ),
        format!(
            "master target {} is at site {}, not at the primary site {} of {machine}",
            req.master_target, mt_inv.site, p.site
        ),
        "name a master target of the primary site",
    );
    f.check(
        "MT-2",
        mtm.os_family == p.os_family,
        errors::REPROTECT_REFUSED,
        format!("master target {} is {} like {machine}", mtm.name, mtm.os_family),
        format!(
            "master target {} is {}, {machine} is {}: its disks need a {} master target",
            mtm.name, mtm.os_family, p.os_family, p.os_family
        ),
        "name a master target of the machine's OS family",
    );
    f.check(
        "MT-3",
        mtm.enable_uuid,
        errors::REPROTECT_REFUSED,
        format!("master target {} has disk.EnableUUID", mtm.name),
        format!("master target {} lacks disk.EnableUUID=true: its disks cannot be matched by UUID", mtm.name),
        "set disk.EnableUUID=true on the master target's machine (enable_uuid in the site description) and rediscover",
    );
    f.check(
        "MT-9",
        mtm.controller != "pvscsi",
        errors::REPROTECT_REFUSED,
        format!("master target {} has a {} controller", mtm.name, mtm.controller),
        format!("master target {} has a paravirtual SCSI controller: it must be LSI Logic", mtm.name),
        "change the master target's SCSI controller to LSI Logic and rediscover",
    );
    let adding = p.disks.len();
    f.check(
        "MT-10",
        mtm.attached_disks as usize + adding <= MAX_ATTACHED_DISKS,
        errors::REPROTECT_REFUSED,
        format!(
            "master target {} would have {} of at most {MAX_ATTACHED_DISKS} disks attached",
            mtm.name,
            mtm.attached_disks as usize + adding
        ),
        format!(
            "master target {} has {} disks attached: {adding} more exceed {MAX_ATTACHED_DISKS}",
            mtm.name, mtm.attached_disks
        ),
        "add a master target and reprotect some machines to it",
    );
    // MT-7: a VMFS datastore attached to the master target's host; ST-4: the chosen datastore.
    let vmfs = mt_inv.content.datastores.iter().any(|d| d.kind == "vmfs" && d.hosts.contains(&mtm.host));
    f.check(
        "MT-7",
        vmfs,
        errors::REPROTECT_REFUSED,
        format!("host {} of master target {} has a VMFS datastore", mtm.host, mtm.name),
        format!(
            "no VMFS datastore is attached to host {} of master target {}: no datastore can be chosen",
            mtm.host, mtm.name
        ),
        "attach a VMFS datastore to the master target's host and rediscover",
    );
    match mt_inv.content.datastores.iter().find(|d| d.name == req.datastore) {
        None => f.fail(
            "ST-4",
            errors::NOT_FOUND,
            format!("site {} has no datastore {}", mt_inv.site, req.datastore),
            "name a datastore of the primary site",
        ),
        Some(d) if d.accessible == Some(false) || !d.hosts.contains(&mtm.host) => f.fail(
            "ST-4",
            errors::DATASTORE_INACCESSIBLE,
            format!(
                "datastore {} is not accessible from host {} of master target {} (8061)",
                d.name, mtm.host, mtm.name
            ),
            errors::DATASTORE_INACCESSIBLE.remedy,
        ),
        Some(d) if f.location == "alternate" && (d.kind == "nfs" || d.access != "read-write") => f.fail(
            "ST-8",
            errors::REPROTECT_REFUSED,
            format!(
                "the primary machine {machine} was deleted: alternate-location recovery writes new disks to datastore {}, which is {} {} (failback supports writable VMFS and vSAN datastores, DS-1)",
                d.name, d.access, d.kind
            ),
            "choose a writable VMFS or vSAN datastore of the master target's host",
        ),
        Some(d) if f.location == "alternate" => {
            f.pass(
                "ST-4",
                format!("datastore {} ({}) is reachable from host {}: the new disks go there", d.name, d.kind, mtm.host),
            );
            f.pass(
                "ST-8",
                format!(
                    "the primary machine {machine} no longer exists at site {}: alternate-location recovery — new disks in datastore {}, a full copy, and a new machine {machine} on host {} at failback",
                    p.site, d.name, mtm.host
                ),
            );
        }
        Some(d) => f.pass(
            "ST-4",
            format!(
                "datastore {} ({}) is reachable from host {}; with the primary's disks in place it is not used",
                d.name, d.kind, mtm.host
            ),
        ),
    }
    // RP-5/CP-2: the primary site's inventory credentials may list datastores.
    let read_only: Vec<&str> =
        mt_inv.content.credentials.iter().filter(|c| c.read_only).map(|c| c.name.as_str()).collect();
    f.check(
        "RP-5",
        read_only.is_empty(),
        errors::REPROTECT_REFUSED,
        format!("the inventory credentials of site {} may list datastores", mt_inv.site),
        format!("the inventory credentials {read_only:?} of site {} are read-only: its datastores cannot be listed for the reprotect", mt_inv.site),
        "give the credentials read-write rights (update the site's credentials), rediscover, and retry",
    );
    // DS-1 and MT-11: the primary's disks, on a datastore failback supports, mounted on the
    // master target's host.
    let mut primary_disks = Vec::new();
    if let (Some(pinv), Some(pm)) = (pinv, pmach) {
        for d in &pm.disks {
            let abs = pinv.folder.join(&d.path);
            let ds = pinv.content.datastores.iter().find(|x| d.path.starts_with(&x.path));
            match ds {
                Some(ds) if ds.kind == "nfs" => f.fail(
                    "DS-1",
                    errors::REPROTECT_REFUSED,
                    format!("disk {} of {machine} is on NFS datastore {}: failback supports VMFS and vSAN only", d.name, ds.name),
                    "move the primary machine's disks to a VMFS or vSAN datastore (a whole-disk copy), or keep the machine at the recovery site",
                ),
                Some(ds) if ds.accessible == Some(false) || !ds.hosts.contains(&mtm.host) => f.fail(
                    "MT-11",
                    errors::DATASTORE_INACCESSIBLE,
                    format!("datastore {} holding disk {} of {machine} is not mounted read/write on host {} of master target {} (8061)", ds.name, d.name, mtm.host, mtm.name),
                    "mount the primary machine's datastore on the master target's host, or choose a master target on a host that has it",
                ),
                Some(ds) => {
                    f.pass("DS-1", format!("disk {} of {machine} is on {} datastore {}", d.name, ds.kind, ds.name));
                    f.pass("MT-11", format!("datastore {} is mounted on host {} of master target {}", ds.name, mtm.host, mtm.name));
                }
                None => f.fail(
                    "MT-11",
                    errors::DATASTORE_INACCESSIBLE,
                    format!("disk {} of {machine} ({}) is on no datastore of site {}", d.name, d.path.display(), pinv.site),
                    "rediscover the primary site",
                ),
            }
            primary_disks.push(ProtectedDisk { name: d.name.clone(), path: abs, uuid: d.uuid.clone(), size: d.size });
        }
        // The primary's disks must match the failed-over ones, disk by disk.
        let same = pm.disks.len() == p.disks.len() && pm.disks.iter().zip(&p.disks).all(|(a, b)| a.name == b.name);
        f.check(
            "ST-9",
            same,
            errors::REPROTECT_REFUSED,
            format!("the primary's disks ({}) match the failed-over ones: only differences travel", pm.disks.len()),
            format!("the primary machine {machine} has other disks than the failed-over one: original-location recovery is impossible"),
            "restore the primary machine's disks, or delete it for an alternate-location recovery",
        );
        let snaps = pm.snapshots.len();
        f.pass("RP-6", format!("the primary machine has {snaps} snapshot(s); they are merged into its disks first"));
        let host = pinv.content.hosts.iter().find(|h| h.name == pm.host);
        let free = host.is_some_and(|h| {
            let e = format!("{} {}", h.edition, h.licence).to_lowercase();
            e.contains("free")
        });
        f.check(
            "CP-5",
            !free,
            errors::REPROTECT_REFUSED,
            format!("host {} of {machine} is a licensed edition", pm.host),
            format!("host {} of {machine} runs a free hypervisor edition: failback fails its licence check", pm.host),
            "license the host (or move the machine to a licensed one) before reprotecting",
        );
        let unsupported = pm.os.contains("Windows Server 2016");
        f.check(
            "78052",
            !unsupported,
            errors::PROTECTION_NOT_COMPLETED,
            format!("{} is supported for failback", if pm.os.is_empty() { "the OS" } else { &pm.os }),
            format!("{machine} runs {}, which failback does not support (78052)", pm.os),
            errors::PROTECTION_NOT_COMPLETED.remedy,
        );
        f.check(
            "CP-8",
            !pm.os.contains("2008 R2"),
            errors::REPROTECT_REFUSED,
            "the machine is not a Windows Server 2008 R2 physical server".into(),
            format!("{machine} runs {}: protected as a physical server it cannot fail back", pm.os),
            "keep the machine at the recovery site, or upgrade it",
        );
    }
    // POL-2/ST-6: the failback policy.
    let fb = failback_policy_name(&p.policy);
    let policy = store.get::<crate::model::Policy>(crate::model::POLICY, &fb).await?.map(|d| d.body);
    // A failback policy's own reprotect (after a failback) returns to the forward policy.
    let own = store.get::<crate::model::Policy>(crate::model::POLICY, &p.policy).await?.map(|d| d.body);
    let forward_again = match own.and_then(|x| x.failback_of) {
        Some(orig) => store.get::<crate::model::Policy>(crate::model::POLICY, &orig).await?.map(|_| orig),
        None => None,
    };
    match (forward_again, policy.filter(|x| x.failback_of.as_deref() == Some(p.policy.as_str()))) {
        (Some(orig), _) => {
            f.policy = Some(orig.clone());
            f.pass("POL-2", format!("{} is a failback policy: the forward policy {orig} is selected again", p.policy));
        }
        (None, Some(_)) => {
            f.policy = Some(fb.clone());
            f.pass("POL-2", format!("failback policy {fb} is selected"));
        }
        (None, None) => f.fail(
            "POL-2",
            errors::POLICY_NOT_ASSOCIATED,
            format!("policy {} has no failback policy {fb}", p.policy),
            "edit the forward policy once (`ferry policies update`): its failback policy is created with it",
        ),
    }
    // 806, 78022, PS-1/PS-2, MT-1: the process server and master target report.
    let psc = component(store, ComponentKind::ProcessServer, &req.process_server).await;
    f.check(
        "806",
        fresh(psc.as_ref()),
        errors::PS_HEARTBEAT_LOST,
        format!("process server {} heartbeats", req.process_server),
        format!("process server {} has no recent heartbeat (806)", req.process_server),
        errors::PS_HEARTBEAT_LOST.remedy,
    );
    let mtc = component(store, ComponentKind::MasterTarget, &req.master_target).await;
    f.check(
        "78022",
        fresh(mtc.as_ref()),
        errors::MT_HEARTBEAT_LOST,
        format!("master target {} heartbeats", req.master_target),
        format!("master target {} has no recent heartbeat (78022)", req.master_target),
        errors::MT_HEARTBEAT_LOST.remedy,
    );
    // No leftover of an earlier cycle under the reverse machine's name. What a failed reprotect
    // of this machine left (its replica, spool, the agent resyncing) is taken up again: every
    // step is idempotent and the replica is the same copy's.
    let mts = mtc.as_ref().and_then(|c| c.status.as_ref()).and_then(|s| s.master_target());
    let resuming = match store.get::<Protection>(PROTECTION, &rm).await? {
        Some(d) if f.earlier_cycle.is_none() => {
            d.body.reprotect.as_ref().is_some_and(|r| r.of == machine && r.location == f.location)
                && d.body.failover.is_none()
                && effective_state(store, &d.body).await? == "failed"
                && d.body.master_target == req.master_target
                && d.body.process_server == req.process_server
        }
        _ => false,
    };
    let earlier = f.earlier_cycle.is_some() || resuming;
    let leftover_replica = mts.is_some_and(|s| s.machines.iter().any(|r| r.machine == rm))
        && p.reprotected_by.as_deref() != Some(rm.as_str());
    f.check(
        "leftover-replica",
        !leftover_replica || earlier,
        errors::REPROTECT_REFUSED,
        if leftover_replica && resuming {
            format!("master target {} holds the replica of {rm} a failed reprotect made: this one takes it up again", req.master_target)
        } else if leftover_replica {
            format!("master target {} holds the replica of {rm} from the earlier cycle: it is removed first (its target disks, which {machine} ran from, are kept and adopted)", req.master_target)
        } else {
            format!("master target {} holds no replica of {rm} from an earlier cycle", req.master_target)
        },
        format!("master target {} already holds a replica of {rm} (an earlier cycle's)", req.master_target),
        "disable that protection (`ferry disable-protection`) so the leftover is removed, then retry",
    );
    let pss = psc.as_ref().and_then(|c| c.status.as_ref()).and_then(|s| s.process_server());
    let leftover_spool = pss.is_some_and(|s| s.machines.iter().any(|m| m.machine == rm && m.spool_bytes > 0))
        && p.reprotected_by.as_deref() != Some(rm.as_str());
    f.check(
        "leftover-spool",
        !leftover_spool || earlier,
        errors::REPROTECT_REFUSED,
        if leftover_spool && resuming {
            format!(
                "process server {} holds the spool of {rm} a failed reprotect made: it is shipped on",
                req.process_server
            )
        } else if leftover_spool {
            format!(
                "process server {} holds a spool of {rm} from the earlier cycle: it is deleted first",
                req.process_server
            )
        } else {
            format!("process server {} holds no spool of {rm}", req.process_server)
        },
        format!("process server {} holds a spool of {rm} from an earlier cycle", req.process_server),
        "disable that protection so the spool is deleted, then retry",
    );
    // Lineage: the failed-over copy must link to the primary's (else only a hash comparison or
    // a full copy could bring the disks together).
    let lineage = ast.as_ref().and_then(|a| a.lineage.clone());
    let allocated: u64 = rmach.map(|m| m.disks.iter().map(|d| d.allocated.or(d.size).unwrap_or(0)).sum()).unwrap_or(0);
    let fallback = |why: String| {
        format!(
            "{why}: what differs is found by comparing both copies by 4 KiB block hash instead (each side reads its allocated data, about {allocated} byte(s) here, never its holes; only differing blocks travel)"
        )
    };
    match (lineage.as_ref().and_then(|l| l.parent_id.zip(l.parent_seq)), ast.as_ref().and_then(|a| a.tracking_lost.clone())) {
        _ if ast.is_none() => {}
        _ if f.location == "alternate" => f.pass(
            "lineage",
            format!("alternate location: every allocated block of {rm} is copied to the new disks (a full copy, ST-8)"),
        ),
        (Some((pid, pseq)), None) => f.pass(
            "lineage",
            format!("{rm}'s copy forked from {pid:016x} at seq {pseq}: a differential resync (its tracked writes plus the primary's unshipped ones)"),
        ),
        (_, Some(lost)) => {
            f.hash_fallback = true;
            f.pass("lineage", fallback(format!("{rm}'s tracking is lost ({lost})")));
        }
        (None, None) => {
            f.hash_fallback = true;
            f.pass("lineage", fallback(format!("{rm}'s copy does not link to the primary's (no parent lineage)")));
        }
    }
    if let Some(a) = &ast {
        f.check(
            "tracking",
            a.mode == Mode::Tracking || p.reprotected_by.as_deref() == Some(rm.as_str()) || resuming,
            errors::REPROTECT_REFUSED,
            format!("{rm}'s agent tracks every write ({} byte(s) to send so far)", a.resync_pending_bytes),
            format!("{rm}'s agent is {} rather than tracking", a.mode.as_str()),
            "see `ferry machines`; a machine replicating elsewhere cannot be reprotected",
        );
        // Retention free space for the resync (held whole when the replica preserves a state).
        let need = a.resync_pending_bytes;
        let free: Option<u64> = mtm.retention_free_bytes.iter().flatten().copied().max();
        f.check(
            "retention-space",
            free.is_none_or(|fr| fr >= need),
            errors::REPROTECT_REFUSED,
            format!(
                "retention volume of {} has {} free for about {need} byte(s) of resync",
                mtm.name,
                free.map(|x| format!("{x} bytes")).unwrap_or_else(|| "unknown space".into())
            ),
            format!(
                "retention volume of {} has {} bytes free, the resync needs about {need}",
                mtm.name,
                free.unwrap_or(0)
            ),
            "free space on the master target's retention volume, or choose another master target",
        );
    }
    if f.ready() {
        let Some(rinv) = rinv else { return Ok(f) };
        let Some(rmach) = rmach else { return Ok(f) };
        let ds = mt_inv.content.datastores.iter().find(|d| d.name == req.datastore);
        let reverse = Protection {
            machine: rm.clone(),
            site: rsite.clone(),
            os_family: p.os_family.clone(),
            policy: f.policy.clone().unwrap_or(fb),
            process_server: req.process_server.clone(),
            master_target: req.master_target.clone(),
            datastore: req.datastore.clone(),
            datastore_path: ds.map(|d| mt_inv.folder.join(&d.path)).unwrap_or_default(),
            // The group goes on in the reverse direction (only through a plan: RG-3).
            group: p.group.clone(),
            state: "enabling".into(),
            job: String::new(),
            disks: rmach
                .disks
                .iter()
                .map(|d| ProtectedDisk {
                    name: d.name.clone(),
                    path: rinv.folder.join(&d.path),
                    uuid: d.uuid.clone(),
                    size: d.size,
                })
                .collect(),
            since_ms: now_ms(),
            failover: None,
            test_failover: None,
            cancelled_failover: None,
            disabled: None,
            reprotect: Some(ProtectionReprotect {
                of: machine.to_owned(),
                location: f.location.clone(),
                primary_disks,
                primary_unshipped_bytes: 0,
                tracked_bytes: ast.as_ref().map(|a| a.resync_pending_bytes),
                resynced_bytes: None,
                requested_ms: now_ms(),
                protected_ms: None,
                discard_primary_changes: req.discard_primary_changes,
                clock_skew_secs: req.clock_skew_secs,
                primary_last_write_ms: None,
                primary_writes: None,
                primary_overwritten: None,
                hash_fallback: f.hash_fallback,
                replaces_earlier_cycle: f.earlier_cycle.is_some(),
            }),
            reprotected_by: None,
        };
        f.reverse = Some(reverse);
    }
    f.forward = Some(p);
    Ok(f)
}

/// `POST /api/v1/machines/{name}/reprotect/dry-run`.
pub async fn dry_run(
    State(s): State<Arc<AppState>>,
    Path(machine): Path<String>,
    Body(req): Body<ReprotectRequest>,
) -> crate::http::ApiResult {
    let f = checks(&s.store, &machine, &req, false).await?;
    crate::http::ok(f.plan(&machine))
}

/// `POST /api/v1/machines/{name}/reprotect`: the same checks; the first failed one refuses the
/// request (nothing changed), else the job starts.
pub async fn reprotect(
    State(s): State<Arc<AppState>>,
    Path(machine): Path<String>,
    Body(req): Body<ReprotectRequest>,
) -> crate::http::ApiResult {
    let job = tokio::spawn(async move { claim(&s, &machine, &req).await })
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, errors::JOB_STATE, e.to_string()))??;
    Ok((StatusCode::ACCEPTED, Json(job)).into_response())
}

async fn claim(s: &Arc<AppState>, machine: &str, req: &ReprotectRequest) -> Result<Job, ApiError> {
    let f = checks(&s.store, machine, req, false).await?;
    refuse_failed(machine, &f)?;
    let id = crate::jobs::Jobs::new_id();
    let claimed = claim_reverse(s, f, &id).await?;
    let steps = steps(&claimed.forward, &claimed.reverse);
    let rm = claimed.reverse.machine.clone();
    let work =
        JobWork::Reprotect { machine: machine.to_owned(), recovery_machine: rm.clone(), stall_secs: req.stall_secs };
    let started = match work.split() {
        Ok((kind, params)) => {
            s.jobs.start_with_id(id, s.ops.clone(), kind, machine, steps, params).await.map_err(ApiError::from)
        }
        Err(e) => Err(e),
    };
    if started.is_err() {
        claimed.release(s).await;
    }
    started
}

/// The first failed check refuses the request (nothing changed), naming every failed one.
pub(crate) fn refuse_failed(machine: &str, f: &Findings) -> Result<(), ApiError> {
    let failed: Vec<&ReprotectCheck> = f.checks.iter().filter(|c| !c.passed).collect();
    let Some(first) = failed.first() else { return Ok(()) };
    let code = first.code.and_then(ferry_types::codes::by_code).unwrap_or(errors::REPROTECT_REFUSED);
    let all = failed.iter().map(|c| format!("{}: {}", c.id, c.message)).collect::<Vec<_>>().join("; ");
    Err(ApiError::new(
        StatusCode::CONFLICT,
        code,
        format!(
            "reprotect of {machine} refused, nothing was changed — {all} (remedy: {})",
            first.remedy.as_deref().unwrap_or("")
        ),
    ))
}

/// A reverse record this request put in place, and what was there before it.
pub(crate) struct Claimed {
    pub(crate) forward: Protection,
    pub(crate) reverse: Protection,
    existing: Option<ferry_store::Doc<Protection>>,
    revision: i64,
}

impl Claimed {
    /// Put back what was there (the job did not start).
    pub(crate) async fn release(&self, s: &AppState) {
        let rm = &self.reverse.machine;
        let _ = match &self.existing {
            Some(d) => s.store.put(PROTECTION, rm, &d.body, Some(self.revision)).await.map(|_| true),
            None => s.store.delete_if(PROTECTION, rm, self.revision).await,
        };
    }
}

/// Claim the reverse record for job `id` (compare-and-set: a concurrent request loses here).
pub(crate) async fn claim_reverse(s: &AppState, f: Findings, id: &str) -> Result<Claimed, ApiError> {
    let (Some(forward), Some(mut reverse)) = (f.forward, f.reverse) else {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            errors::REPROTECT_REFUSED,
            "reprotect: the checks found nothing to reprotect".to_owned(),
        ));
    };
    reverse.job = id.to_owned();
    let rm = reverse.machine.clone();
    let existing = s.store.get::<Protection>(PROTECTION, &rm).await?;
    let expected = match &existing {
        // The earlier cycle's record, as the checks saw it: replaced (compare-and-set).
        Some(d) if f.earlier_cycle.as_ref().is_some_and(|e| e.revision == d.revision) => d.revision,
        Some(d) => {
            let st = effective_state(&s.store, &d.body).await?;
            if st != "failed" {
                return Err(ApiError::new(
                    StatusCode::CONFLICT,
                    errors::PROTECTION_STATE,
                    format!("{rm} is {st} (job {}): wait for that job", d.body.job),
                ));
            }
            d.revision
        }
        None => 0,
    };
    let revision = s.store.put(PROTECTION, &rm, &reverse, Some(expected)).await.map_err(|e| match e {
        ferry_store::StoreError::Conflict { .. } => ApiError::new(
            StatusCode::CONFLICT,
            errors::PROTECTION_STATE,
            format!("{rm} is being reprotected by another request"),
        ),
        e => e.into(),
    })?;
    Ok(Claimed { forward, reverse, existing, revision })
}

/// Both records, the reverse one only while this job owns it.
async fn records(store: &Store, job: &Job, machine: &str, rm: &str) -> Result<(Protection, Protection, i64), Outcome> {
    let (forward, _) = crate::failover::protection(store, machine).await?;
    match store.get::<Protection>(PROTECTION, rm).await {
        Ok(Some(d)) if d.body.job == job.id => Ok((forward, d.body, d.revision)),
        Ok(_) => Err(fail(
            errors::PROTECTION_STATE,
            format!("the protection record of {rm} no longer belongs to job {}", job.id),
        )),
        Err(e) => Err(fail(errors::STORE, e.to_string())),
    }
}

/// Change the reverse record (compare-and-set, retried).
async fn update_reverse(store: &Store, job: &Job, rm: &str, f: impl Fn(&mut Protection)) -> Result<(), Outcome> {
    for _ in 0..20 {
        let d = match store.get::<Protection>(PROTECTION, rm).await {
            Ok(Some(d)) if d.body.job == job.id => d,
            Ok(_) => {
                return Err(fail(
                    errors::PROTECTION_STATE,
                    format!("the protection record of {rm} no longer belongs to job {}", job.id),
                ))
            }
            Err(e) => return Err(fail(errors::STORE, e.to_string())),
        };
        let mut b = d.body;
        f(&mut b);
        match store.put(PROTECTION, rm, &b, Some(d.revision)).await {
            Ok(_) => return Ok(()),
            Err(ferry_store::StoreError::Conflict { .. }) => continue,
            Err(e) => return Err(fail(errors::STORE, e.to_string())),
        }
    }
    Err(fail(errors::STORE, format!("the protection record of {rm} kept changing")))
}

impl Ops {
    pub async fn reprotect_step(
        &self,
        job: &Job,
        machine: &str,
        rm: &str,
        stall_secs: u64,
        step: usize,
        ctl: &JobControl,
    ) -> Outcome {
        let store = &self.store;
        let (forward, reverse, _) = match records(store, job, machine, rm).await {
            Ok(x) => x,
            Err(o) => return o,
        };
        let Some(rp) = reverse.reprotect.clone() else {
            return fail(errors::PROTECTION_STATE, format!("{rm}'s record is not a reverse protection"));
        };
        let Some(step_kind) = ReprotectStep::ALL.get(step).copied() else {
            return fail(errors::JOB_STATE, format!("reprotect job has no step {step}"));
        };
        let code = step_kind.code();
        match step_kind {
            ReprotectStep::PowerOffPrimary if rp.location == "alternate" => Outcome::Done(Some(format!(
                "{machine} no longer exists at site {} (alternate-location recovery)",
                forward.site
            ))),
            ReprotectStep::PowerOffPrimary => {
                if !self.powered_on(&forward.site, machine).await {
                    return Outcome::Done(Some(format!(
                        "{machine} is off at site {} (it stays off: its disks are the reverse replica's)",
                        forward.site
                    )));
                }
                match self.shut_down(&forward.site, machine).await {
                    Ok(msg) => Outcome::Done(Some(format!("{msg}; it stays off while reprotected"))),
                    Err(e) => fail(code, format!("cannot power {machine} off at site {}: {e}", forward.site)),
                }
            }
            ReprotectStep::MergeSnapshots => {
                let inv: Option<ferry_store::Doc<Inventory>> =
                    store.get(crate::ops::INVENTORY, &forward.site).await.ok().flatten();
                let snaps = inv
                    .and_then(|i| i.body.content.machines.iter().find(|m| m.name == machine).map(|m| m.snapshots.len()))
                    .unwrap_or(0);
                if snaps == 0 {
                    return Outcome::Done(Some(format!("{machine} has no snapshots")));
                }
                let provider = match self.provider_of(&forward.site).await {
                    Ok(p) => p,
                    Err(e) => return fail(errors::NOT_FOUND, e),
                };
                let op = crate::discovery::SiteOperation::MergeSnapshots { machine: machine.to_owned() };
                match provider.operate(op).await {
                    Ok(msg) => {
                        if let Ok(inv) = provider.discover().await {
                            let _ = store.put(crate::ops::INVENTORY, &inv.site, &inv, None).await;
                        }
                        Outcome::Done(Some(format!("{snaps} snapshot(s) merged: {msg}")))
                    }
                    Err(e) => fail(
                        ferry_types::HasErrorCode::error_code(&e),
                        format!("merging the snapshots of {machine}: {e}"),
                    ),
                }
            }
            ReprotectStep::PrimaryChanges if rp.location == "alternate" => {
                // No primary disks: every block of every disk goes to the new ones.
                let lineage = component(store, ComponentKind::Agent, rm)
                    .await
                    .and_then(|c| c.status)
                    .and_then(|s| s.agent().and_then(|a| a.lineage.as_ref().map(|l| format!("{:016x}", l.id))));
                let mut extents = Vec::new();
                for d in &reverse.disks {
                    let Some(size) = d.size else {
                        return fail(
                            errors::STORAGE,
                            format!("the size of {rm}'s disk {} is unknown: rediscover site {}", d.name, reverse.site),
                        );
                    };
                    extents.push(DiskExtent { disk: d.name.clone(), offset: 0, length: size });
                }
                let seed = ResyncSeed {
                    order: job.id.clone(),
                    lineage,
                    reason: format!("reprotect to an alternate location: {machine} was deleted, every disk is copied"),
                    extents,
                    compare: Vec::new(),
                    replace_tracking: false,
                };
                if let Err(e) =
                    update_settings(store, &format!("agent/{rm}"), |b| b.resync_seed = Some(seed.clone())).await
                {
                    return fail(errors::STORE, e);
                }
                Outcome::Done(Some(format!(
                    "{machine} was deleted: nothing of it to keep; {rm}'s agent copies its whole disks"
                )))
            }
            ReprotectStep::PrimaryChanges => {
                let provider = match self.provider_of(&forward.site).await {
                    Ok(p) => p,
                    Err(e) => return fail(errors::NOT_FOUND, e),
                };
                let changes = match provider.agent_changes(machine, rp.hash_fallback).await {
                    Ok(c) => c,
                    Err(e) => {
                        return fail(
                            ferry_types::HasErrorCode::error_code(&e),
                            format!("cannot read what {machine} never shipped ({e}): without it the primary's unshipped writes would stay on its disks"),
                        )
                    }
                };
                // Regions with their block hashes are compared by the agent (only differing
                // blocks travel); any without are resynced whole.
                let (mut extents, mut compare) = (Vec::new(), Vec::new());
                for d in changes.disks.iter().filter(|_| rp.hash_fallback) {
                    let Some(h) = d.whole_hashes.clone() else {
                        return fail(
                            errors::STORAGE,
                            format!(
                                "the hashes of {machine}'s disk {} were not read: the hash fallback cannot run",
                                d.name
                            ),
                        );
                    };
                    compare.push(SeedCompare { disk: d.name.clone(), offset: 0, length: d.size, hashes: h });
                }
                for d in changes.disks.iter().filter(|_| !rp.hash_fallback) {
                    for (i, (offset, length)) in d.extents.iter().enumerate() {
                        match d.hashes.get(i) {
                            Some(h) => compare.push(SeedCompare {
                                disk: d.name.clone(),
                                offset: *offset,
                                length: *length,
                                hashes: h.clone(),
                            }),
                            None => extents.push(DiskExtent { disk: d.name.clone(), offset: *offset, length: *length }),
                        }
                    }
                }
                let bytes = changes.bytes;
                let decision = split_brain(
                    &changes,
                    forward.failover.as_ref().map(|f| f.started_ms),
                    component(store, ComponentKind::Agent, machine).await.and_then(|c| c.clock_offset_ms),
                    rp.clock_skew_secs,
                );
                let (last_write, verdict) = match decision {
                    Ok(w) => (w, "expected-loss"),
                    Err(why) if rp.discard_primary_changes => {
                        tracing::warn!(machine, "split brain: the operator chose to discard: {why}");
                        let _ = store
                            .add_event(
                                0,
                                "warning",
                                &format!("agent/{machine}"),
                                &format!("split brain discarded by the operator's choice: {why}"),
                            )
                            .await;
                        (None, "split-brain-discarded")
                    }
                    Err(why) => {
                        let regions = changes
                            .disks
                            .iter()
                            .filter(|d| d.bytes > 0)
                            .map(|d| format!("{}: {} byte(s) in {} region(s)", d.name, d.bytes, d.extents.len()))
                            .collect::<Vec<_>>()
                            .join(", ");
                        return fail(
                            errors::SPLIT_BRAIN,
                            format!("split brain: {why}. The reprotect would overwrite what {machine} holds that the recovery site does not ({regions}); it stays off and nothing was changed. Run it again with --discard-primary-changes to discard that"),
                        );
                    }
                };
                // For the copy that runs now (its lineage): a later cycle's copy, or this one
                // after its state was lost, ignores it.
                let lineage = component(store, ComponentKind::Agent, rm)
                    .await
                    .and_then(|c| c.status)
                    .and_then(|s| s.agent().and_then(|a| a.lineage.as_ref().map(|l| format!("{:016x}", l.id))));
                let seed = ResyncSeed {
                    order: job.id.clone(),
                    lineage,
                    reason: if rp.hash_fallback {
                        format!("reprotect (hash fallback): every block compared with {machine}'s disks")
                    } else {
                        format!("reprotect: regions {machine} wrote that never reached the recovery site")
                    },
                    extents,
                    compare,
                    replace_tracking: rp.hash_fallback,
                };
                if let Err(e) =
                    update_settings(store, &format!("agent/{rm}"), |b| b.resync_seed = Some(seed.clone())).await
                {
                    return fail(errors::STORE, e);
                }
                if let Err(o) = update_reverse(store, job, rm, |b| {
                    if let Some(r) = b.reprotect.as_mut() {
                        r.primary_unshipped_bytes = bytes;
                        r.primary_last_write_ms = last_write;
                        r.primary_writes = Some(verdict.into());
                    }
                })
                .await
                {
                    return o;
                }
                let whole = changes.whole_disks.map(|w| format!(" (whole disks: {w})")).unwrap_or_default();
                Outcome::Done(Some(format!(
                    "{machine} holds {bytes} byte(s) the recovery site never got{whole}: the expected loss of the unplanned failover — the resync sends the recovery site's version of them"
                )))
            }
            ReprotectStep::PurgeEarlierCycle => self.purge_earlier_cycle(job, &reverse, ctl).await,
            ReprotectStep::AssignMasterTarget => {
                let agent = component(store, ComponentKind::Agent, rm).await;
                let Some(lineage) = agent
                    .as_ref()
                    .and_then(|c| c.status.as_ref())
                    .and_then(|s| s.agent())
                    .and_then(|a| a.lineage.clone())
                else {
                    return fail(errors::AGENT_NOT_INSTALLED, format!("{rm}'s agent does not report its lineage"));
                };
                let Some(ps_identity) = component(store, ComponentKind::ProcessServer, &reverse.process_server)
                    .await
                    .and_then(|c| c.identity)
                else {
                    return fail(
                        errors::NOT_FOUND,
                        format!(
                            "process server {} registered without an identity: register it again",
                            reverse.process_server
                        ),
                    );
                };
                if let Err(e) =
                    update_settings(store, &format!("agent/{rm}"), |b| b.policy = Some(reverse.policy.clone())).await
                {
                    return fail(errors::STORE, e);
                }
                if rp.location == "alternate" {
                    return self.assign_new_disks(&reverse, &ps_identity, ctl).await;
                }
                let order = AdoptionOrder {
                    order: job.id.clone(),
                    disks: rp
                        .primary_disks
                        .iter()
                        .map(|d| AdoptedDisk { name: d.name.clone(), path: d.path.clone() })
                        .collect(),
                    lineage: format!("{:016x}", lineage.id),
                };
                let key = format!("master-target/{}", reverse.master_target);
                let r = update_settings(store, &key, |b| {
                    b.machine_adoptions.get_or_insert_with(BTreeMap::new).insert(rm.to_owned(), order.clone());
                    b.machine_process_servers
                        .get_or_insert_with(Default::default)
                        .insert(rm.to_owned(), ps_identity.clone());
                    if let Some(m) = b.machine_removals.as_mut() {
                        m.remove(rm);
                    }
                })
                .await;
                if let Err(e) = r {
                    return fail(errors::STORE, e);
                }
                let r =
                    wait_status(store, ctl, ComponentKind::MasterTarget, &reverse.master_target, ORDER_LIMIT, |st| {
                        st.master_target().is_some_and(|mt| {
                            mt.settings.machine_adoptions.get(rm) == Some(&order)
                                && mt.settings.machine_process_servers.get(rm) == Some(&ps_identity)
                                && mt.settings.machine_retention_secs.contains_key(rm)
                        })
                    })
                    .await;
                match r {
                    Ok(()) => Outcome::Done(Some(format!(
                        "{} adopts {} (retention volume of {}; failback policy {})",
                        reverse.master_target,
                        rp.primary_disks.iter().map(|d| d.path.display().to_string()).collect::<Vec<_>>().join(", "),
                        reverse.master_target,
                        reverse.policy
                    ))),
                    Err(e) => {
                        let st = component(store, ComponentKind::MasterTarget, &reverse.master_target)
                            .await
                            .and_then(|c| c.status)
                            .and_then(|s| s.master_target().cloned());
                        let seen = st.map(|mt| {
                            format!(
                                "it reports adoption {:?}, process server {:?}, retention {:?}",
                                mt.settings.machine_adoptions.get(rm).map(|a| &a.order),
                                mt.settings.machine_process_servers.get(rm),
                                mt.settings.machine_retention_secs.get(rm)
                            )
                        });
                        fail(
                            code,
                            format!(
                                "{e} ({}): is it running and linked to this server?",
                                seen.unwrap_or_else(|| "no status".into())
                            ),
                        )
                    }
                }
            }
            ReprotectStep::RouteProcessServer => {
                let Some(mt) = component(store, ComponentKind::MasterTarget, &reverse.master_target).await else {
                    return fail(
                        errors::MT_HEARTBEAT_LOST,
                        format!("master target {} is not registered", reverse.master_target),
                    );
                };
                let Some(address) = mt.status.as_ref().and_then(|s| s.advertise()).map(str::to_owned) else {
                    return fail(
                        errors::MT_HEARTBEAT_LOST,
                        format!("master target {} has not reported its replication address", reverse.master_target),
                    );
                };
                let agent = component(store, ComponentKind::Agent, rm).await.and_then(|c| c.identity);
                if agent.is_none() {
                    return fail(
                        errors::NOT_FOUND,
                        format!("agent {rm} registered without an identity: register it again"),
                    );
                }
                let route = MasterTargetRoute { address: address.clone(), name: reverse.master_target.clone(), agent };
                let key = format!("process-server/{}", reverse.process_server);
                let r = update_settings(store, &key, |b| {
                    b.machine_master_targets.get_or_insert_with(Default::default).insert(rm.to_owned(), route.clone());
                    if let Some(m) = b.machine_removals.as_mut() {
                        m.remove(rm);
                    }
                })
                .await;
                if let Err(e) = r {
                    return fail(errors::STORE, e);
                }
                let r =
                    wait_status(store, ctl, ComponentKind::ProcessServer, &reverse.process_server, ORDER_LIMIT, |st| {
                        st.process_server().is_some_and(|ps| ps.settings.machine_master_targets.get(rm) == Some(&route))
                    })
                    .await;
                match r {
                    Ok(()) => Outcome::Done(Some(format!("{} → {address}", reverse.process_server))),
                    Err(e) => fail(code, format!("{e}: is it running and linked to this server?")),
                }
            }
            ReprotectStep::ConfigureAgent => {
                let Some(psc) = component(store, ComponentKind::ProcessServer, &reverse.process_server).await else {
                    return fail(
                        errors::PS_HEARTBEAT_LOST,
                        format!("process server {} is not registered", reverse.process_server),
                    );
                };
                let Some(ps_addr) = psc.status.as_ref().and_then(|s| s.advertise()).map(str::to_owned) else {
                    return fail(
                        errors::PS_UNREACHABLE,
                        format!("process server {} has not reported its address", reverse.process_server),
                    );
                };
                // A replication group's members (a plan reprotect: every reverse record of this
                // job in the group) take multi-machine points together in this direction too.
                let group = match &reverse.group {
                    Some(g) => {
                        let mut members: Vec<Protection> = match store.list::<Protection>(PROTECTION).await {
                            Ok(l) => l
                                .into_iter()
                                .map(|d| d.body)
                                .filter(|p| p.job == job.id && p.group.as_ref() == Some(g))
                                .collect(),
                            Err(e) => return fail(errors::STORE, e.to_string()),
                        };
                        members.sort_by(|a, b| a.machine.cmp(&b.machine));
                        // Every member must be reachable by the coordinator: one left out
                        // would make multi-machine points without it.
                        for m in &members {
                            let addr = component(store, ComponentKind::Agent, &m.machine)
                                .await
                                .and_then(|c| c.status.and_then(|s| s.status_listen().map(str::to_owned)));
                            if addr.is_none() {
                                return fail(
                                    errors::REPROTECT_NO_SERVER_PATH,
                                    format!(
                                        "{}, a member of replication group {g}, has not reported its status address: the group's coordinator could not reach it",
                                        m.machine
                                    ),
                                );
                            }
                        }
                        match crate::protection::group_settings(store, &members).await {
                            Ok(mut all) => all.remove(rm),
                            Err(e) => return fail(errors::STORE, e),
                        }
                    }
                    None => None,
                };
                let r = update_settings(store, &format!("agent/{rm}"), |b| {
                    b.process_server = Some(ps_addr.clone());
                    b.process_server_name = Some(reverse.process_server.clone());
                    b.group = group.clone();
                })
                .await;
                match r {
                    Ok(()) => Outcome::Done(Some(format!(
                        "{rm}'s agent replicates to {ps_addr}{}",
                        group
                            .as_ref()
                            .map(|g| format!(
                                " (replication group {}{})",
                                g.name,
                                if g.coordinator { ", its coordinator" } else { "" }
                            ))
                            .unwrap_or_default()
                    ))),
                    Err(e) => fail(errors::STORE, e),
                }
            }
            ReprotectStep::Resync => self.follow_resync(job, &reverse, stall_secs, ctl, true).await,
            ReprotectStep::VerifyReplica => self.verify_replica(job, &reverse, stall_secs, ctl).await,
            ReprotectStep::MarkProtected => {
                // Declared from the comparison the step before made (every block equal). The
                // order is withdrawn: a restart of the agent must not compare all again.
                if let Err(e) = update_settings(store, &format!("agent/{rm}"), |b| b.verify_order = None).await {
                    return fail(errors::STORE, e);
                }
                let sent = rp.resynced_bytes;
                let kept = crate::failover::replica_status(store, &reverse.master_target, rm)
                    .await
                    .and_then(|r| r.primary_overwritten);
                if let Err(o) = update_reverse(store, job, rm, |b| {
                    b.state = "protected".into();
                    if let Some(r) = b.reprotect.as_mut() {
                        r.protected_ms = Some(now_ms());
                        r.primary_overwritten.clone_from(&kept);
                    }
                })
                .await
                {
                    return o;
                }
                // The forward record names its reverse protection (RP-2 and failback read it).
                let mut named = false;
                for _ in 0..20 {
                    let d = match store.get::<Protection>(PROTECTION, machine).await {
                        Ok(Some(d)) => d,
                        Ok(None) => {
                            return fail(errors::NOT_FOUND, format!("the protection record of {machine} is gone"))
                        }
                        Err(e) => return fail(errors::STORE, e.to_string()),
                    };
                    let mut b = d.body;
                    b.reprotected_by = Some(rm.to_owned());
                    match store.put(PROTECTION, machine, &b, Some(d.revision)).await {
                        Ok(_) => {
                            named = true;
                            break;
                        }
                        Err(ferry_store::StoreError::Conflict { .. }) => continue,
                        Err(e) => return fail(errors::STORE, e.to_string()),
                    }
                }
                if !named {
                    return fail(errors::STORE, format!("the protection record of {machine} kept changing"));
                }
                let _ = store
                    .add_event(
                        0,
                        "info",
                        &format!("agent/{rm}"),
                        &format!(
                            "{rm} is Protected towards site {} (reprotect of {machine}, policy {})",
                            forward.site, reverse.policy
                        ),
                    )
                    .await;
                Outcome::Done(Some(format!(
                    "{rm} is Protected towards site {}{}{}",
                    forward.site,
                    sent.map(|b| format!(" ({b} byte(s) resynced)")).unwrap_or_default(),
                    kept.map(|k| format!(
                        "; the {} byte(s) of {machine} written over are kept in {}",
                        k.bytes,
                        k.dir.display()
                    ))
                    .unwrap_or_default()
                )))
            }
        }
    }

    /// Follow the reverse resync until the agent replicates in order and the master target's
    /// replica is consistent; fail when it makes no progress for `stall_secs`. `record`: the
    /// resync's bytes are the reprotect's `resynced_bytes` (not a verify's repair).
    async fn follow_resync(
        &self,
        job: &Job,
        reverse: &Protection,
        stall_secs: u64,
        ctl: &JobControl,
        record: bool,
    ) -> Outcome {
        let store = &self.store;
        let rm = &reverse.machine;
        let ps_addr = component(store, ComponentKind::ProcessServer, &reverse.process_server)
            .await
            .and_then(|c| c.status.as_ref().and_then(|s| s.advertise()).map(str::to_owned))
            .unwrap_or_default();
        let stall = Duration::from_secs(stall_secs.max(1));
        let mut last = u64::MAX;
        let mut moved = tokio::time::Instant::now();
        loop {
            let st = component(store, ComponentKind::Agent, rm)
                .await
                .and_then(|c| c.status)
                .and_then(|s| s.agent().cloned());
            let configured = st.filter(|a| a.process_server == ps_addr);
            let replica = crate::failover::replica_status(store, &reverse.master_target, rm).await;
            if let Some(a) = &configured {
                if let Some(r) = &a.resync {
                    ctl.bytes(r.bytes_done, r.bytes_total);
                }
                let consistent = replica
                    .as_ref()
                    .is_some_and(|r| r.consistent && r.applied_seq >= a.master_target_durable_seq.min(a.last_seq));
                if a.mode == Mode::Replicating && a.resync_pending_bytes == 0 && a.resync.is_none() && consistent {
                    let sent = a.completed_resyncs.last().map(|r| r.bytes_copied + r.hole_bytes_zeroed).unwrap_or(0);
                    if record {
                        if let Err(o) = update_reverse(store, job, rm, |b| {
                            if let Some(r) = b.reprotect.as_mut() {
                                r.resynced_bytes = Some(sent);
                            }
                        })
                        .await
                        {
                            return o;
                        }
                    }
                    return Outcome::Done(Some(format!(
                        "{rm} resynced: {sent} byte(s) sent; it replicates in order to {}",
                        reverse.master_target
                    )));
                }
            }
            let progress = configured
                .as_ref()
                .map(|a| a.resync.as_ref().map_or(0, |r| r.bytes_done) + a.master_target_durable_seq)
                .unwrap_or(0);
            if progress != last {
                last = progress;
                moved = tokio::time::Instant::now();
            } else if moved.elapsed() >= stall {
                let why = configured
                    .as_ref()
                    .and_then(|a| a.link_error.clone())
                    .or_else(|| replica.as_ref().and_then(|r| r.error.clone()))
                    .unwrap_or_else(|| {
                        if configured.is_none() {
                            format!("{rm}'s agent does not report with process server {ps_addr}")
                        } else {
                            "no hop reports an error".into()
                        }
                    });
                return fail(ReprotectStep::Resync.code(), format!("the resync of {rm} made no progress for {stall:?} ({why}): fix the cause and run the reprotect again"));
            }
            if !crate::failover::pause(ctl, Duration::from_millis(500)).await {
                return fail(
                    errors::JOB_STATE,
                    "the job was cancelled during the resync (run the reprotect again to finish)",
                );
            }
        }
    }
}

/// Whether the old primary's unshipped writes are the expected loss of the failover (`Ok`, with
/// its last write on the server's clock when known) or a split brain (`Err`, saying why): it
/// wrote after the failover started minus the clock margin, or its clock cannot tell (the
/// offset measured from its heartbeats exceeds the margin, or was never measured).
pub(crate) fn split_brain(
    changes: &ferry_api::agent::UnconfirmedChanges,
    failover_started_ms: Option<u64>,
    clock_offset_ms: Option<i64>,
    clock_skew_secs: u64,
) -> Result<Option<u64>, String> {
    let margin = clock_skew_secs.saturating_mul(1000);
    if changes.bytes == 0 {
        return Ok(None);
    }
    let Some(until) = changes.writes_until_ms else {
        // Unshipped writes without a lease file: when they were made is unknown.
        return Err("it holds unshipped writes but no write lease (its state folder lost the file): when it last wrote is unknown".into());
    };
    let Some(started) = failover_started_ms else {
        return Err("the failover's start is not recorded: which writes came after it cannot be told".into());
    };
    let offset = match clock_offset_ms {
        Some(o) if o.unsigned_abs() <= margin => o,
        Some(o) => {
            return Err(format!(
                "its clock was {:.1} s off at its last heartbeat, more than the {clock_skew_secs} s margin: its last write time decides nothing",
                o as f64 / 1000.0
            ))
        }
        None => return Err("its clock offset was never measured (no heartbeat with a clock): its last write time decides nothing".into()),
    };
    let last = until.saturating_add_signed(-offset);
    if last + margin > started {
        return Err(format!(
            "it wrote until {} (its agent's write lease, corrected by its clock offset {offset} ms), after the failover started at {} minus the {clock_skew_secs} s margin",
            ferry_sys::time::utc(last),
            ferry_sys::time::utc(started)
        ));
    }
    Ok(Some(last))
}

impl Ops {
    /// Remove the replica (keeping its target disks: the machine ran from them, and they are
    /// adopted next) and the spool an earlier cycle left of the recovery machine. The checks let
    /// the job start only when what is there is that cycle's; nothing there, nothing to do.
    async fn purge_earlier_cycle(&self, job: &Job, reverse: &Protection, ctl: &JobControl) -> Outcome {
        let store = &self.store;
        let rm = reverse.machine.as_str();
        let order = ferry_api::control::RemovalOrder { order: job.id.clone(), keep_target_disks: true };
        let mut done = Vec::new();
        let holds = crate::failover::replica_status(store, &reverse.master_target, rm).await.is_some();
        if holds {
            let key = format!("master-target/{}", reverse.master_target);
            let r = update_settings(store, &key, |b| {
                // Nothing of the earlier cycle's orders may reach the new replica (an old
                // failover order would fence it).
                let _ = b.machine_datastores.as_mut().map(|m| m.remove(rm));
                let _ = b.machine_process_servers.as_mut().map(|m| m.remove(rm));
                let _ = b.machine_failovers.as_mut().map(|m| m.remove(rm));
                let _ = b.machine_test_failovers.as_mut().map(|m| m.remove(rm));
                let _ = b.machine_adoptions.as_mut().map(|m| m.remove(rm));
                b.machine_removals.get_or_insert_with(Default::default).insert(rm.to_owned(), order.clone());
            })
            .await;
            if let Err(e) = r {
                return fail(errors::STORE, e);
            }
            // Done, or refused with a reason (e.g. a materialized point still pins it).
            let r = wait_status(store, ctl, ComponentKind::MasterTarget, &reverse.master_target, ORDER_LIMIT, |st| {
                st.master_target().and_then(|mt| mt.removed_machines.get(rm)).is_some_and(|r| r.order == job.id)
            })
            .await;
            let said = component(store, ComponentKind::MasterTarget, &reverse.master_target)
                .await
                .and_then(|c| c.status)
                .and_then(|s| s.master_target().and_then(|mt| mt.removed_machines.get(rm).cloned()))
                .filter(|r| r.order == job.id);
            match (r, said) {
                (Ok(()), Some(d)) if d.error.is_none() => {}
                (_, Some(d)) => {
                    return fail(
                        errors::STORAGE,
                        format!(
                            "master target {} cannot remove the earlier replica of {rm}: {}: fix that, then run the reprotect again",
                            reverse.master_target,
                            d.error.unwrap_or_default()
                        ),
                    )
                }
                (r, None) => {
                    return fail(
                        errors::MT_HEARTBEAT_LOST,
                        format!(
                            "master target {} did not confirm removing the earlier replica of {rm}: {}",
                            reverse.master_target,
                            r.err().unwrap_or_else(|| "no report".into())
                        ),
                    )
                }
            }
            done.push(format!("the earlier replica of {rm} at {} (its disks kept)", reverse.master_target));
        }
        let psc = component(store, ComponentKind::ProcessServer, &reverse.process_server).await;
        let spooled = psc
            .as_ref()
            .and_then(|c| c.status.as_ref())
            .and_then(|s| s.process_server())
            .is_some_and(|s| s.machines.iter().any(|m| m.machine == rm));
        if spooled {
            let key = format!("process-server/{}", reverse.process_server);
            let r = update_settings(store, &key, |b| {
                let _ = b.machine_master_targets.as_mut().map(|m| m.remove(rm));
                b.machine_removals.get_or_insert_with(Default::default).insert(rm.to_owned(), order.clone());
            })
            .await;
            if let Err(e) = r {
                return fail(errors::STORE, e);
            }
            let r = wait_status(store, ctl, ComponentKind::ProcessServer, &reverse.process_server, ORDER_LIMIT, |st| {
                st.process_server()
                    .and_then(|ps| ps.removed_machines.get(rm))
                    .is_some_and(|r| r.order == job.id && r.error.is_none())
            })
            .await;
            if let Err(e) = r {
                return fail(
                    errors::PS_HEARTBEAT_LOST,
                    format!(
                        "process server {} did not confirm deleting the earlier spool of {rm}: {e}",
                        reverse.process_server
                    ),
                );
            }
            done.push(format!("the earlier spool of {rm} at {}", reverse.process_server));
        }
        Outcome::Done(Some(if done.is_empty() {
            format!(
                "nothing of an earlier cycle of {rm} is left at {} or {}",
                reverse.master_target, reverse.process_server
            )
        } else {
            format!("removed {}", done.join(" and "))
        }))
    }
}

/// Comparison rounds before the verify gives up (a round repairs what it found; the next must
/// find nothing that was not written meanwhile).
const VERIFY_ROUNDS: u32 = 3;
/// Times the agent may start one round over (a lost result, a link that dropped).
const VERIFY_ATTEMPTS: u32 = 5;

impl Ops {
    /// Order online verifies of the recovery machine until one finds every block equal; each
    /// round that finds differences repairs them (a resync of those blocks) first.
    async fn verify_replica(&self, job: &Job, reverse: &Protection, stall_secs: u64, ctl: &JobControl) -> Outcome {
        let store = &self.store;
        let rm = &reverse.machine;
        let mut found = Vec::new();
        for round in 1..=VERIFY_ROUNDS {
            let order = VerifyOrder { order: format!("{}/verify-{round}", job.id), repair: true };
            if let Err(e) =
                update_settings(store, &format!("agent/{rm}"), |b| b.verify_order = Some(order.clone())).await
            {
                return fail(errors::STORE, e);
            }
            let stall = Duration::from_secs(stall_secs.max(1));
            let mut last = u64::MAX;
            let mut moved = tokio::time::Instant::now();
            let result = loop {
                let st = component(store, ComponentKind::Agent, rm)
                    .await
                    .and_then(|c| c.status)
                    .and_then(|s| s.agent().cloned());
                let v = st.as_ref().and_then(|a| a.verify_order.clone()).filter(|v| v.order == order.order);
                if let Some(v) = v.as_ref().filter(|v| v.state == VerifyState::Complete) {
                    break v.clone();
                }
                // Progress is the comparison's own (production writes move the seqs anyway); a
                // round the agent keeps starting over is not progress.
                if let Some(v) = v.as_ref().filter(|v| v.attempts > VERIFY_ATTEMPTS) {
                    return fail(
                        errors::REPLICA_NOT_VERIFIED,
                        format!(
                            "the comparison of {rm} with its replica was cut short {} times (last: {}): fix the cause and run the reprotect again",
                            v.attempts - 1,
                            v.error.clone().unwrap_or_else(|| "no reason given".into())
                        ),
                    );
                }
                let progress = v.as_ref().map_or(0, |v| v.bytes_hashed + u64::from(v.attempts) * (1 << 50));
                if progress != last {
                    last = progress;
                    moved = tokio::time::Instant::now();
                } else if moved.elapsed() >= stall {
                    let why = v.and_then(|v| v.error).unwrap_or_else(|| "the agent reports no progress".into());
                    return fail(
                        errors::REPLICA_NOT_VERIFIED,
                        format!("the comparison of {rm} with its replica made no progress for {stall:?} ({why}): fix the cause and run the reprotect again"),
                    );
                }
                if !crate::failover::pause(ctl, Duration::from_millis(500)).await {
                    return fail(
                        errors::JOB_STATE,
                        "the job was cancelled during the comparison (run the reprotect again)",
                    );
                }
            };
            ctl.bytes(result.bytes_compared, result.bytes_compared);
            if result.differing_blocks == 0 {
                let repaired = if found.is_empty() {
                    String::new()
                } else {
                    format!("; earlier round(s) found and repaired {}", found.join(", then "))
                };
                return Outcome::Done(Some(format!(
                    "round {round}: all {} block(s) of {} KiB equal on both sides ({} byte(s) compared){repaired}",
                    result.blocks_compared,
                    result.block_size / 1024,
                    result.bytes_compared
                )));
            }
            let named = result
                .differing
                .iter()
                .map(|d| {
                    format!("{} block(s) of {} at {:?}", d.count, d.disk, d.offsets.iter().take(8).collect::<Vec<_>>())
                })
                .collect::<Vec<_>>()
                .join("; ");
            tracing::warn!(machine = %rm, round, differing = result.differing_blocks, "verify found differing blocks: {named}");
            let _ = store
                .add_event(
                    0,
                    "warning",
                    &format!("agent/{rm}"),
                    &format!("verify round {round} of {rm}: {named}; repairing"),
                )
                .await;
            found.push(format!("{} differing block(s) ({named})", result.differing_blocks));
            if round == VERIFY_ROUNDS {
                break;
            }
            // The repair is a resync of those blocks: wait until it is done before comparing again.
            if let Outcome::Failed(e) = self.follow_resync(job, reverse, stall_secs, ctl, false).await {
                return Outcome::Failed(e);
            }
        }
        fail(
            errors::REPLICA_NOT_VERIFIED,
            format!(
                "{rm} still differs from its replica after {VERIFY_ROUNDS} comparison rounds ({}): it is not declared Protected",
                found.join(", then ")
            ),
        )
    }
}

/// A failed job leaves the reverse record `failed` (a new request may retry).
impl Ops {
    /// Alternate location: the master target makes new, empty disks for the replica in the
    /// chosen datastore (as for a first protection); the whole-disk seed fills them.
    async fn assign_new_disks(&self, reverse: &Protection, ps_identity: &str, ctl: &JobControl) -> Outcome {
        let rm = reverse.machine.as_str();
        let key = format!("master-target/{}", reverse.master_target);
        let r = update_settings(&self.store, &key, |b| {
            b.machine_datastores
                .get_or_insert_with(Default::default)
                .insert(rm.to_owned(), reverse.datastore_path.clone());
            b.machine_process_servers
                .get_or_insert_with(Default::default)
                .insert(rm.to_owned(), ps_identity.to_owned());
            if let Some(m) = b.machine_adoptions.as_mut() {
                m.remove(rm);
            }
            if let Some(m) = b.machine_removals.as_mut() {
                m.remove(rm);
            }
        })
        .await;
        if let Err(e) = r {
            return fail(errors::STORE, e);
        }
        let r = wait_status(&self.store, ctl, ComponentKind::MasterTarget, &reverse.master_target, ORDER_LIMIT, |st| {
            st.master_target().is_some_and(|mt| {
                mt.settings.machine_datastores.get(rm) == Some(&reverse.datastore_path)
                    && mt.settings.machine_process_servers.get(rm).map(String::as_str) == Some(ps_identity)
                    && mt.settings.machine_retention_secs.contains_key(rm)
            })
        })
        .await;
        match r {
            Ok(()) => Outcome::Done(Some(format!(
                "{} makes new disks for {rm} in {} (alternate location; retention volume of {})",
                reverse.master_target,
                reverse.datastore_path.display(),
                reverse.master_target
            ))),
            Err(e) => fail(errors::MT_HEARTBEAT_LOST, format!("{e}: is it running and linked to this server?")),
        }
    }
}

pub async fn mark_failed(store: &Store, job: &Job, rm: &str) {
    if let Ok(Some(d)) = store.get::<Protection>(PROTECTION, rm).await {
        if d.body.job == job.id && d.body.state == "enabling" {
            let mut b = d.body;
            b.state = "failed".into();
            let _ = store.put(PROTECTION, rm, &b, Some(d.revision)).await;
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_failback_policy_is_named_after_the_forward_one() {
        assert_eq!(failback_policy_name("gold"), "gold-failback");
    }

    #[test]
    fn a_write_after_the_failover_or_an_untrusted_clock_is_a_split_brain() {
        let changes = |until: Option<u64>, bytes: u64| ferry_api::agent::UnconfirmedChanges {
            machine: "web1".into(),
            disks: Vec::new(),
            bytes,
            open_resync_seq: None,
            whole_disks: None,
            writes_until_ms: until,
        };
        let f = 1_000_000;
        // Last write well before the failover (clock 200 ms ahead, margin 5 s): expected loss,
        // reported on the server's clock.
        assert_eq!(split_brain(&changes(Some(f - 10_000), 4096), Some(f), Some(200), 5), Ok(Some(f - 10_200)));
        // Within the margin before the failover, or after it: split brain.
        assert!(split_brain(&changes(Some(f - 3_000), 4096), Some(f), Some(0), 5).is_err());
        assert!(split_brain(&changes(Some(f + 60_000), 4096), Some(f), Some(0), 5).is_err());
        // A clock 60 s behind makes a write after the failover look a minute older: the
        // measured offset beyond the margin decides nothing, so it is a split brain.
        let e = split_brain(&changes(Some(f - 30_000), 4096), Some(f), Some(-60_000), 5).unwrap_err();
        assert!(e.contains("60.0 s off"), "{e}");
        // The offset corrects the lease: 4 s ahead, margin 5 s, lease 7 s before → 11 s before.
        assert_eq!(split_brain(&changes(Some(f - 7_000), 4096), Some(f), Some(4_000), 5), Ok(Some(f - 11_000)));
        assert!(split_brain(&changes(Some(f - 30_000), 4096), Some(f), None, 5).is_err(), "never measured");
        assert!(split_brain(&changes(Some(f - 30_000), 4096), None, Some(0), 5).is_err(), "no failover start");
        // Nothing unshipped, or no write since the lease was kept: nothing to lose either way.
        assert_eq!(split_brain(&changes(Some(f + 60_000), 0), Some(f), Some(0), 5), Ok(None));
        assert!(split_brain(&changes(None, 4096), Some(f), Some(0), 5).is_err(), "writes of unknown time");
    }

    #[test]
    fn every_step_names_its_machines() {
        let p: Protection = serde_json::from_value(serde_json::json!({
            "machine": "web1", "site": "primary", "os_family": "linux", "policy": "gold",
            "process_server": "ps-r", "master_target": "mt-r", "datastore": "ds", "datastore_path": "/d",
            "state": "protected", "job": "j", "disks": [], "since_ms": 0
        }))
        .unwrap();
        let mut r = p.clone();
        r.machine = "web1.recovery".into();
        let s = steps(&p, &r);
        assert_eq!(s.len(), ReprotectStep::ALL.len());
        assert!(s.iter().all(|(n, idem)| *idem && (n.contains("web1"))));
    }
}
