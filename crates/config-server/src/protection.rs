//! Enable replication: the `protect` job. It checks the machines, their policy, the process
//! server, the master target and the recovery datastore at once (so a wrong name fails the
//! request, not a job an hour later), then, as job steps: waits for the machines' mobility
//! services to report (boot delay and registration, RP-7), assigns each machine a datastore on the
//! master target, routes it through the process server, configures the agents (process server,
//! disks, policy, replication group) and follows the initial sync (bytes, %, ETA) until each
//! machine is Protected. Components take the settings while running (settings watch), so nothing
//! restarts except the guest's agent, which its supervisor starts once it has a process server.
//!
//! Size: the protect job (request checks and steps) in one place; its steps become an enum when failover and reprotect add jobs of the same shape.

use std::collections::{BTreeMap, HashMap};
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::Json;
use ferry_store::Store;

use crate::discovery::Inventory;
use crate::errors::{self, ApiError};
use crate::http::Body;
use crate::inventory::INVENTORY;
use crate::jobs::{now_ms, Job, JobControl, JobError, Outcome};
use crate::model::{self, Policy, ReplicationGroup};
use crate::registration::{Component, COMPONENT};
use crate::settings::SETTINGS;
use crate::AppState;
use ferry_api::agent::Mode;
use ferry_api::config_server::{MachineRecoveryPoints, MachineView};
use ferry_api::control::{ComponentKind, ComponentSettings, ComponentStatus, DiskSetting, GroupSetting, Health};
use ferry_api::master_target::PointList;
use ferry_api::process_server::MasterTargetRoute;

pub const PROTECTION: &str = "protection";

pub use ferry_api::config_server::{ProtectRequest, ProtectedDisk, Protection};

async fn inventories(s: &AppState) -> Result<Vec<Inventory>, ApiError> {
    Ok(s.store.list::<Inventory>(INVENTORY).await?.into_iter().map(|d| d.body).collect())
}

/// Check a request against the inventory and registrations; returns the protections to enable.
async fn plan(s: &AppState, req: &ProtectRequest) -> Result<Vec<Protection>, ApiError> {
    let mut names: Vec<String> = req.machine.iter().cloned().chain(req.machines.iter().cloned()).collect();
    let group = match &req.group {
        Some(g) => {
            let g = s
                .store
                .get::<ReplicationGroup>(model::GROUP, g)
                .await?
                .ok_or_else(|| {
                    ApiError::not_found(format!("no replication group {g} (create it with `ferry groups create`)"))
                })?
                .body;
            if names.is_empty() {
                names = g.machines.clone();
            }
            let mut want = g.machines.clone();
            want.sort();
            let mut got = names.clone();
            got.sort();
            if want != got {
                return Err(ApiError::bad(format!(
                    "replication group {} holds {:?}: protect all of its machines together (they share multi-machine points), or change the group first",
                    g.name, g.machines
                )));
            }
            Some(g)
        }
        None => None,
    };
    if names.is_empty() {
        return Err(ApiError::bad("name a machine (machine / machines) or a replication group (group)"));
    }
    let mut seen = std::collections::HashSet::new();
    for m in &names {
        model::check_name("machine", m)?;
        if !seen.insert(m.clone()) {
            return Err(ApiError::bad(format!("machine {m} is named twice")));
        }
    }
    let policy = s
        .store
        .get::<Policy>(model::POLICY, &req.policy)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no policy {} (list them with `ferry policies list`)", req.policy)))?
        .body;
    if !policy.associated {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            errors::POLICY_NOT_ASSOCIATED,
            format!("policy {} is not associated with this configuration server (78253)", policy.name),
        ));
    }
    if policy.failback_of.is_some() {
        return Err(ApiError::bad(format!(
            "policy {} is a failback policy (POL-2): it is used by reprotect, not for forward protection",
            policy.name
        )));
    }
    for (kind, name) in [("process-server", &req.process_server), ("master-target", &req.master_target)] {
        model::check_name(kind, name)?;
        if s.store.get::<Component>(COMPONENT, &format!("{kind}/{name}")).await?.is_none() {
            return Err(ApiError::not_found(format!(
                "no {kind} {name} has registered with this configuration server (list them with `ferry components`)"
            )));
        }
    }
    let invs = inventories(s).await?;
    let mt_site = invs
        .iter()
        .find(|i| i.content.master_targets.iter().any(|m| m.name == req.master_target))
        .ok_or_else(|| {
            ApiError::not_found(format!(
                "master target {} is not in any discovered site's inventory (discover its site first)",
                req.master_target
            ))
        })?;
    for m in &names {
        failover_names_fit(m, &mt_site.site).map_err(ApiError::bad)?;
        if s.store.get::<Protection>(PROTECTION, m).await?.is_some() {
            // Protected already (its own names may be in use): refused below, saying so.
            continue;
        }
        let taken =
            [crate::failover::recovery_machine_name(m, &mt_site.site), crate::test_failover::test_machine_name(m)];
        if let Some(t) = taken.iter().find(|t| mt_site.content.machines.iter().any(|x| &x.name == *t)) {
            return Err(ApiError::conflict(format!(
                "site {} already has a machine named {t}: {m}'s failover or test failover would need that name there; rename one of them",
                mt_site.site
            )));
        }
    }
    let ds = mt_site.content.datastores.iter().find(|d| d.name == req.datastore).ok_or_else(|| {
        ApiError::not_found(format!(
            "site {} (master target {}'s) has no datastore {}",
            mt_site.site, req.master_target, req.datastore
        ))
    })?;
    if ds.accessible == Some(false) {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            errors::DATASTORE_INACCESSIBLE,
            format!("datastore {} of site {} is not accessible (8061)", ds.name, mt_site.site),
        ));
    }
    if ds.access != "read-write" {
        return Err(ApiError::bad(format!("datastore {} is read-only: choose a writable one", ds.name)));
    }
    let datastore_path = mt_site.folder.join(&ds.path);
    let mut out = Vec::new();
    for m in &names {
        let (inv, machine) = invs
            .iter()
            .find_map(|i| i.content.machines.iter().find(|x| &x.name == m).map(|x| (i, x)))
            .ok_or_else(|| {
                ApiError::not_found(format!(
                    "machine {m} is not in any discovered site's inventory (discover its site)"
                ))
            })?;
        if inv.site == mt_site.site {
            return Err(ApiError::bad(format!(
                "machine {m} and master target {} are on the same site ({}): protect to a master target of the recovery site",
                req.master_target, inv.site
            )));
        }
        if !machine.snapshots.is_empty() {
            return Err(ApiError::conflict(format!(
                "machine {m} has {} snapshot(s): merge them first (site operation merge-snapshots), then protect it",
                machine.snapshots.len()
            )));
        }
        if machine.disks.is_empty() {
            return Err(ApiError::bad(format!("machine {m} has no disks to protect")));
        }
        if let Some(p) = s.store.get::<Protection>(PROTECTION, m).await? {
            let state = effective_state(&s.store, &p.body).await?;
            may_protect_again(&p.body, &state, &req.master_target, &req.datastore)?;
            // Removed with its process server unreachable: through that process server only once
            // it deleted the old spool (else it would forward the old records into the new replica).
            let unconfirmed = p.body.disabled.as_ref().filter(|d| d.deleted_spool_bytes.is_none());
            if let Some(d) = unconfirmed.filter(|_| p.body.process_server == req.process_server) {
                let ps = component(&s.store, ComponentKind::ProcessServer, &req.process_server).await;
                let done = ps
                    .as_ref()
                    .and_then(|c| c.status.as_ref())
                    .and_then(|st| st.process_server())
                    .and_then(|st| st.removed_machines.get(m))
                    .is_some_and(|r| r.order == d.job && r.error.is_none());
                if !done {
                    return Err(ApiError::conflict(format!(
                        "process server {} has not confirmed deleting the old spool of {m} (its protection was removed while it was unreachable): bring it back — it deletes the spool at its first settings fetch — or protect {m} through another process server",
                        req.process_server
                    )));
                }
            }
        }
        let mt_os = mt_site
            .content
            .master_targets
            .iter()
            .find(|x| x.name == req.master_target)
            .map(|x| x.os_family.clone())
            .unwrap_or_default();
        if machine.os_family == "windows" && mt_os == "linux" {
            tracing::info!(machine = %m, "a Windows machine protected to a Linux master target (failback will need a Windows one)");
        }
        out.push(Protection {
            machine: m.clone(),
            site: inv.site.clone(),
            os_family: machine.os_family.clone(),
            policy: req.policy.clone(),
            process_server: req.process_server.clone(),
            master_target: req.master_target.clone(),
            datastore: req.datastore.clone(),
            datastore_path: datastore_path.clone(),
            group: group.as_ref().map(|g| g.name.clone()),
            state: "enabling".into(),
            job: String::new(),
            disks: machine
                .disks
                .iter()
                .map(|d| ProtectedDisk {
                    name: d.name.clone(),
                    path: inv.folder.join(&d.path),
                    uuid: d.uuid.clone(),
                    size: d.size,
                })
                .collect(),
            since_ms: now_ms(),
            failover: None,
            test_failover: None,
            disabled: None,
            cancelled_failover: None,
            reprotect: None,
            reprotected_by: None,
        });
    }
    Ok(out)
}

/// The steps of a protect job, in order; each names what it does and, beside it, the code it
/// fails with when its component does not do its part.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum ProtectStep {
    /// The machines' mobility services register and report (RP-7: up to 15 min).
    AwaitMobilityService,
    /// The master target takes each machine's datastore and retention window.
    AssignMasterTarget,
    /// The process server routes each machine to the master target.
    RouteProcessServer,
    /// The agents get their process server, disks, policy and group.
    ConfigureAgents,
    /// The initial sync runs to completion (progress, bytes, stall detection).
    InitialSync,
    /// The protection records say Protected.
    MarkProtected,
}

impl ProtectStep {
    pub const ALL: [ProtectStep; 6] = [
        ProtectStep::AwaitMobilityService,
        ProtectStep::AssignMasterTarget,
        ProtectStep::RouteProcessServer,
        ProtectStep::ConfigureAgents,
        ProtectStep::InitialSync,
        ProtectStep::MarkProtected,
    ];

    /// The step's name in the job, for these machines.
    pub fn name(self, ps: &[Protection]) -> String {
        let names = ps.iter().map(|p| p.machine.as_str()).collect::<Vec<_>>().join(", ");
        let Some(p) = ps.first() else { return String::new() };
        match self {
            ProtectStep::AwaitMobilityService => {
                format!("wait for the mobility service of {names} to register and report")
            }
            ProtectStep::AssignMasterTarget => {
                format!("assign {names} to master target {} (datastore {})", p.master_target, p.datastore)
            }
            ProtectStep::RouteProcessServer => {
                format!("route {names} through process server {} to {}", p.process_server, p.master_target)
            }
            ProtectStep::ConfigureAgents => format!("configure the mobility service of {names} (policy {})", p.policy),
            ProtectStep::InitialSync => format!("initial sync of {names}"),
            ProtectStep::MarkProtected => format!("mark {names} Protected"),
        }
    }

    /// The code the step fails with when the component it waits for does not answer.
    pub fn code(self) -> errors::ErrorCode {
        match self {
            ProtectStep::AwaitMobilityService => errors::MACHINE_NOT_ACCESSIBLE,
            ProtectStep::AssignMasterTarget => errors::MT_HEARTBEAT_LOST,
            ProtectStep::RouteProcessServer => errors::PS_HEARTBEAT_LOST,
            ProtectStep::ConfigureAgents => errors::PS_UNREACHABLE,
            ProtectStep::InitialSync => errors::PROTECTION_NOT_COMPLETED,
            ProtectStep::MarkProtected => errors::STORE,
        }
    }
}

/// The job's steps (all idempotent: a restarted server runs the interrupted one again).
pub fn steps(ps: &[Protection]) -> Vec<(String, bool)> {
    ProtectStep::ALL.iter().map(|s| (s.name(ps), true)).collect()
}

/// `POST /api/v1/protections`: check, record, and start the job. The work runs in its own task,
/// so a client that disconnects cannot leave a claim without its job.
pub async fn protect(State(s): State<Arc<AppState>>, Body(req): Body<ProtectRequest>) -> crate::http::ApiResult {
    let job = tokio::spawn(async move { claim_and_start(&s, &req).await })
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, errors::JOB_STATE, e.to_string()))??;
    Ok((StatusCode::ACCEPTED, Json(job)).into_response())
}

async fn claim_and_start(s: &Arc<AppState>, req: &ProtectRequest) -> Result<Job, ApiError> {
    let mut ps = plan(s, req).await?;
    let id = crate::jobs::Jobs::new_id();
    for p in &mut ps {
        p.job = id.clone();
    }
    // Claim each machine (compare-and-set) with the job's ID before the job exists: a concurrent
    // request for it loses here. A failed start puts back what was there.
    let mut claimed: Vec<(String, i64, Option<Protection>)> = Vec::new();
    let undo = |claimed: Vec<(String, i64, Option<Protection>)>| async move {
        for (m, rev, previous) in claimed {
            let _ = match previous {
                Some(body) => s.store.put(PROTECTION, &m, &body, Some(rev)).await.map(|_| true),
                None => s.store.delete_if(PROTECTION, &m, rev).await,
            };
        }
    };
    for p in &ps {
        let existing = s.store.get::<Protection>(PROTECTION, &p.machine).await?;
        let (expected, previous) = match existing {
            Some(d) => {
                let state = effective_state(&s.store, &d.body).await?;
                if let Err(e) = may_protect_again(&d.body, &state, &p.master_target, &p.datastore) {
                    undo(claimed).await;
                    return Err(e);
                }
                (d.revision, Some(d.body))
            }
            None => (0, None),
        };
        match s.store.put(PROTECTION, &p.machine, p, Some(expected)).await {
            Ok(rev) => claimed.push((p.machine.clone(), rev, previous)),
            Err(e) => {
                undo(claimed).await;
                return Err(match e {
                    ferry_store::StoreError::Conflict { .. } => {
                        ApiError::conflict(format!("machine {} is being protected by another request", p.machine))
                    }
                    e => e.into(),
                });
            }
        }
    }
    let target = req.group.clone().unwrap_or_else(|| ps[0].machine.clone());
    let steps = steps(&ps);
    let work = crate::ops::JobWork::Protect { protections: ps, wait_secs: req.wait_secs, stall_secs: req.stall_secs };
    let (kind, params) = match work.split() {
        Ok(kp) => kp,
        Err(e) => {
            undo(claimed).await;
            return Err(e);
        }
    };
    match s.jobs.start_with_id(id, s.ops.clone(), kind, &target, steps, params).await {
        Ok(j) => Ok(j),
        Err(e) => {
            undo(claimed).await;
            Err(e.into())
        }
    }
}

/// Whether a machine with protection record `p` (in `state`) may be protected anew to that
/// master target and datastore: after a failed protect, or once its protection was disabled —
/// but never into the folder whose kept target disks its failed-over machine runs from.
fn may_protect_again(p: &Protection, state: &str, master_target: &str, datastore: &str) -> Result<(), ApiError> {
    if !["failed", crate::disable::DISABLED, crate::disable::REMOVED].contains(&state) {
        return Err(ApiError::conflict(format!(
            "machine {} is already {state} (job {}) to master target {}",
            p.machine, p.job, p.master_target
        )));
    }
    let kept = p.disabled.as_ref().is_some_and(|x| x.kept_target_disks);
    if kept && p.master_target == master_target && p.datastore == datastore {
        return Err(ApiError::conflict(format!(
            "the failed-over machine {} runs from the target disks the disabled protection of {} kept in datastore {datastore} of master target {master_target}: protect {} to another datastore",
            p.failover.as_ref().and_then(|f| f.recovery_machine.clone()).unwrap_or_default(),
            p.machine,
            p.machine
        )));
    }
    Ok(())
}

/// `GET /api/v1/machines`: every discovered machine with its protection, health and RPO.
pub async fn list_machines(State(s): State<Arc<AppState>>) -> crate::http::ApiResult {
    let protections: HashMap<String, Protection> =
        s.store.list::<Protection>(PROTECTION).await?.into_iter().map(|d| (d.id, d.body)).collect();
    let mut out = Vec::new();
    for inv in inventories(&s).await? {
        for m in &inv.content.machines {
            let comp = s.store.get::<Component>(COMPONENT, &format!("agent/{}", m.name)).await?.map(|d| d.body);
            let p = protections.get(&m.name);
            let (mut health, mut reasons) = match &comp {
                Some(c) => crate::health::health_of(&s, c).await,
                None => (Health::Critical, Vec::new()),
            };
            let st = comp.as_ref().and_then(|c| c.status.as_ref()).and_then(|s| s.agent()).cloned();
            let state = match p {
                Some(p) => Some(effective_state(&s.store, p).await?),
                None => None,
            };
            let failover = p.and_then(|p| p.failover.clone());
            let disabling = p.is_some_and(|p| p.disabled.is_some());
            if let (Some(p), Some(f), false) = (p, &failover, disabling) {
                // Failed over, the machine's health is its recovery site's: the primary's agent
                // is expected to be silent.
                (health, reasons) = crate::failover::failover_health(&s.store, p, f).await;
            }
            // A running drill's test machine (its own inventory object, never protected).
            let drill_of = protections
                .values()
                .find(|q| q.test_failover.is_some() && crate::test_failover::test_machine_name(&q.machine) == m.name);
            let test_failover = p.and_then(|p| p.test_failover.clone());
            if let (Some(p), Some(t)) = (p, &test_failover) {
                if let Some(problem) = crate::test_failover::drill_problem(&s.store, p, t).await {
                    health = health.max(Health::Warning);
                    reasons.push(ferry_api::control::HealthReason {
                        code: errors::MATERIALIZE_FAILED.code,
                        message: problem,
                        remedy: errors::MATERIALIZE_FAILED.remedy.to_owned(),
                    });
                }
            }
            let disabled_state = state.as_deref().filter(|st| {
                [crate::disable::DISABLING, "disable failed", crate::disable::DISABLED, crate::disable::REMOVED]
                    .contains(st)
            });
            let replication = match (state.as_deref(), st.as_ref().map(|a| a.mode), &failover) {
                (Some(_), _, _) if disabled_state.is_some() => disabled_state.unwrap_or_default().to_owned(),
                (Some(_), _, Some(f)) => crate::failover::failover_view(&s.store, f).await?,
                (None, _, _) if drill_of.is_some() => format!(
                    "test machine of {} (drill {})",
                    drill_of.map(|q| q.machine.as_str()).unwrap_or_default(),
                    drill_of.and_then(|q| q.test_failover.as_ref()).map(|t| t.drill.as_str()).unwrap_or_default()
                ),
                (None, _, _) => "unprotected".to_owned(),
                (Some("protected"), Some(Mode::Replicating), _) if test_failover.is_some() => {
                    "protected (test failover running)".to_owned()
                }
                (Some("protected"), Some(Mode::Replicating), _)
                    if p.is_some_and(|p| p.cancelled_failover.is_some()) =>
                {
                    "protected (failover cancelled)".to_owned()
                }
                (Some("protected"), Some(Mode::Replicating), _) => "protected".to_owned(),
                (Some("protected"), Some(mode), _) => format!("protected ({})", mode.as_str()),
                (Some(state), _, _) => state.to_owned(),
            };
            out.push(MachineView {
                machine: m.name.clone(),
                site: inv.site.clone(),
                os_family: m.os_family.clone(),
                power: m.power.clone(),
                replication,
                policy: p.map(|p| p.policy.clone()),
                process_server: p.map(|p| p.process_server.clone()),
                master_target: p.map(|p| p.master_target.clone()),
                datastore: p.map(|p| p.datastore.clone()),
                group: p.and_then(|p| p.group.clone()),
                job: p.map(|p| p.job.clone()),
                health: if comp.is_some() || failover.is_some() { Some(health) } else { None },
                reasons,
                rpo_secs: st.as_ref().map(|a| a.lag_seconds),
                caught_up: st.as_ref().map(|a| a.caught_up),
                initial_sync: st.as_ref().and_then(|a| a.resync.clone()),
                points: st.as_ref().map(|a| a.points.clone()),
                last_heartbeat_ms: comp.as_ref().and_then(|c| c.last_seen_ms),
                failover,
                test_failover,
                cancelled_failover: p.and_then(|p| p.cancelled_failover.clone()),
                disabled: p.and_then(|p| p.disabled.clone()),
                reprotect: p.and_then(|p| p.reprotect.clone()),
                reprotected_by: p.and_then(|p| p.reprotected_by.clone()),
            });
        }
    }
    crate::http::ok(out)
}

/// `GET /api/v1/machines/{name}/recovery-points`: the points the machine's master target holds.
pub async fn recovery_points(State(s): State<Arc<AppState>>, Path(name): Path<String>) -> crate::http::ApiResult {
    model::check_name("machine", &name)?;
    let p = s
        .store
        .get::<Protection>(PROTECTION, &name)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("machine {name} is not protected (`ferry protect {name} ...`)")))?
        .body;
    let mt = s
        .store
        .get::<Component>(COMPONENT, &format!("master-target/{}", p.master_target))
        .await?
        .ok_or_else(|| ApiError::not_found(format!("master target {} is not registered", p.master_target)))?
        .body;
    let Some(addr) = mt.status.as_ref().and_then(|st| st.status_listen()) else {
        return Err(ApiError::conflict(format!(
            "master target {} has not reported its point API (status_listen): check that it runs and sends heartbeats",
            p.master_target
        )));
    };
    let r = tokio::time::timeout(
        Duration::from_secs(20),
        ferry_status::call::<PointList>(addr, ferry_api::Method::Get, &format!("/machines/{name}/points"), None::<&()>),
    )
    .await;
    match r {
        Ok(Ok(points)) => crate::http::ok(MachineRecoveryPoints { master_target: p.master_target.clone(), points }),
        Ok(Err(ferry_status::StatusError::Refused { status, error, .. })) => Err(ApiError::conflict(format!(
            "master target {} answered {status}: {error} (check its log; `ferry components` shows its health)",
            p.master_target
        ))),
        Ok(Err(e)) => Err(ApiError::new(
            StatusCode::BAD_GATEWAY,
            errors::MT_HEARTBEAT_LOST,
            format!("master target {} is unreachable: {e}", p.master_target),
        )),
        Err(_) => Err(ApiError::new(
            StatusCode::GATEWAY_TIMEOUT,
            errors::MT_HEARTBEAT_LOST,
            format!("master target {} did not answer within 20 s", p.master_target),
        )),
    }
}

/// A protection's state, with an `enabling` whose job has ended (failed, cancelled) or never
/// started (a server that stopped between the claim and the start) shown as `failed`: it may be
/// retried. Database errors are errors, never "failed".
pub async fn effective_state(store: &Store, p: &Protection) -> Result<String, ferry_store::StoreError> {
    if p.state == crate::disable::DISABLING {
        // A disable job that ended without finishing may be run again.
        return Ok(match store.job::<Job>(&p.job).await? {
            Some(j) if !j.state.finished() => p.state.clone(),
            None if p.disabled.as_ref().is_some_and(|d| now_ms().saturating_sub(d.requested_ms) < 600_000) => {
                p.state.clone()
            }
            _ => "disable failed".into(),
        });
    }
    if p.state != "enabling" {
        return Ok(p.state.clone());
    }
    Ok(match store.job::<Job>(&p.job).await? {
        Some(j) if !j.state.finished() => "enabling".into(),
        Some(j) if j.state == crate::jobs::JobState::Succeeded => "protected".into(),
        Some(_) => "failed".into(),
        None if now_ms().saturating_sub(p.since_ms) < 600_000 => "enabling".into(),
        None => "failed".into(),
    })
}

// ---- the job's steps ---------------------------------------------------------------------------

pub(crate) fn fail(code: errors::ErrorCode, msg: impl Into<String>) -> Outcome {
    Outcome::Failed(JobError::new(code, msg))
}

/// A machine protected to `site` must fail over and drill under names of its own there:
/// `MACHINE.SITE` (the failed-over machine), `MACHINE.test` and its network `test-MACHINE`. Checked
/// when protection is enabled, not on the day of the failover.
pub fn failover_names_fit(machine: &str, site: &str) -> Result<(), String> {
    let names = [
        crate::failover::recovery_machine_name(machine, site),
        crate::test_failover::test_machine_name(machine),
        crate::test_failover::test_network_name(machine),
    ];
    for n in &names {
        if ferry_types::validate_name("machine", n).is_err() {
            return Err(format!(
                "machine name {machine:?} is too long to fail over to site {site}: its machine there would be {n:?} ({} characters, at most 128); protect it under a shorter name",
                n.len()
            ));
        }
    }
    Ok(())
}

pub(crate) async fn component(store: &Store, kind: ComponentKind, name: &str) -> Option<Component> {
    store.get::<Component>(COMPONENT, &format!("{kind}/{name}")).await.ok().flatten().map(|d| d.body)
}

/// The key pair (private, public; hex) whose private half signs a replication group's
/// prepare/commit/abort: made once per group and kept in the server's settings, so protecting one
/// more member does not change it under the others.
async fn group_coordinator_key(store: &Store, group: &str) -> Result<(String, String), String> {
    let id = format!("group-coordinator-key-pair/{group}");
    if let Some(k) = store.setting(&id).await.map_err(|e| e.to_string())? {
        if let Some((private, public)) = k.split_once(':') {
            return Ok((private.to_owned(), public.to_owned()));
        }
    }
    let (private, public) = ferry_status::control::new_group_key_pair()?;
    store.set_setting(&id, &format!("{private}:{public}")).await.map_err(|e| e.to_string())?;
    Ok((private, public))
}

/// Each group member's `[group]` settings, per replication group among `ps`: its first member
/// (in the order given) coordinates and reaches the others at their agents' status addresses;
/// only the coordinator holds the group's private key, the others verify with the public half.
pub(crate) async fn group_settings(store: &Store, ps: &[Protection]) -> Result<HashMap<String, GroupSetting>, String> {
    let mut out = HashMap::new();
    let groups: std::collections::BTreeSet<&String> = ps.iter().filter_map(|p| p.group.as_ref()).collect();
    let mut addrs = HashMap::new();
    for p in ps.iter().filter(|p| p.group.is_some()) {
        let addr = component(store, ComponentKind::Agent, &p.machine)
            .await
            .and_then(|c| c.status.as_ref().and_then(|s| s.status_listen()).map(str::to_owned));
        addrs.insert(p.machine.clone(), addr);
    }
    for g in groups {
        let (key, public) = group_coordinator_key(store, g).await?;
        let members: Vec<&Protection> = ps.iter().filter(|p| p.group.as_ref() == Some(g)).collect();
        for (i, p) in members.iter().enumerate() {
            let others: Vec<String> = members
                .iter()
                .filter(|o| o.machine != p.machine)
                .filter_map(|o| addrs.get(&o.machine).cloned().flatten())
                .collect();
            out.insert(
                p.machine.clone(),
                GroupSetting {
                    name: g.clone(),
                    coordinator: i == 0,
                    coordinator_public_key: Some(public.clone()),
                    coordinator_key: (i == 0).then(|| key.clone()),
                    members: if i == 0 { others } else { Vec::new() },
                    crash_interval_secs: None,
                    app_interval_secs: None,
                    prepare_timeout_secs: None,
                },
            );
        }
    }
    Ok(out)
}

/// Read-modify-write a component's settings with compare-and-set (concurrent jobs share them).
pub(crate) async fn update_settings(
    store: &Store,
    key: &str,
    f: impl Fn(&mut ComponentSettings),
) -> Result<(), String> {
    for _ in 0..20 {
        let cur = store.get::<ComponentSettings>(SETTINGS, key).await.map_err(|e| e.to_string())?;
        let (mut body, rev) = cur.map(|d| (d.body, d.revision)).unwrap_or_default();
        f(&mut body);
        match store.put(SETTINGS, key, &body, Some(rev)).await {
            Ok(_) => return Ok(()),
            Err(ferry_store::StoreError::Conflict { .. }) => continue,
            Err(e) => return Err(e.to_string()),
        }
    }
    Err(format!("settings {key} kept changing under this job: retry the protection when other changes to it are done"))
}

/// Poll until `check` passes on the component's latest status, or fail after `limit`.
pub(crate) async fn wait_status(
    store: &Store,
    ctl: &JobControl,
    kind: ComponentKind,
    name: &str,
    limit: Duration,
    check: impl Fn(&ComponentStatus) -> bool,
) -> Result<(), String> {
    let deadline = tokio::time::Instant::now() + limit;
    loop {
        if let Some(st) = component(store, kind, name).await.and_then(|c| c.status) {
            if check(&st) {
                return Ok(());
            }
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(format!("{kind} {name} did not report the change within {limit:?}"));
        }
        tokio::select! {
            _ = ctl.cancel.cancelled() => return Err("the job was cancelled".into()),
            _ = tokio::time::sleep(Duration::from_millis(300)) => {}
        }
    }
}

/// A protect job and its typed parameters.
pub struct ProtectJob<'a> {
    pub job: &'a Job,
    pub protections: &'a [Protection],
    pub wait_secs: u64,
    pub stall_secs: u64,
}

pub async fn run_step(store: &Store, pj: &ProtectJob<'_>, step: usize, ctl: &JobControl) -> Outcome {
    let (job, ps) = (pj.job, pj.protections.to_vec());
    let Some(first) = ps.first() else { return fail(errors::BAD_REQUEST, "no machines in the job") };
    match ProtectStep::ALL.get(step).copied() {
        Some(ProtectStep::AwaitMobilityService) => {
            let wait = Duration::from_secs(pj.wait_secs);
            for p in &ps {
                // Any heartbeat will do; group members must also say where they coordinate.
                let grouped = p.group.is_some();
                let r = wait_status(store, ctl, ComponentKind::Agent, &p.machine, wait, |st| {
                    st.kind() == ComponentKind::Agent && (!grouped || st.status_listen().is_some())
                })
                .await;
                if let Err(e) = r {
                    return fail(
                        ProtectStep::AwaitMobilityService.code(),
                        format!(
                            "the mobility service of {} has not reported: {e}; power the machine on (its agent registers after its boot delay) and retry",
                            p.machine
                        ),
                    );
                }
            }
            Outcome::Done(Some(format!("{} mobility service(s) reporting", ps.len())))
        }
        Some(ProtectStep::AssignMasterTarget) => {
            let key = format!("master-target/{}", first.master_target);
            // The policy goes to the agents' settings first (their process server comes later, so
            // no agent starts yet): the master target derives each machine's retention window
            // from it, and follows later policy edits.
            match store.get::<Policy>(model::POLICY, &first.policy).await {
                Ok(Some(_)) => {}
                Ok(None) => return fail(errors::NOT_FOUND, format!("policy {} was deleted", first.policy)),
                Err(e) => return fail(errors::STORE, e.to_string()),
            }
            for p in &ps {
                let r = update_settings(store, &format!("agent/{}", p.machine), |b| {
                    b.policy = Some(p.policy.clone());
                })
                .await;
                if let Err(e) = r {
                    return fail(errors::STORE, e);
                }
            }
            // A replica this master target already holds stays where it is: protecting it to
            // another datastore would leave the record and the disks disagreeing.
            let mt = component(store, ComponentKind::MasterTarget, &first.master_target).await;
            if let Some(mt) = mt.as_ref().and_then(|c| c.status.as_ref()).and_then(|s| s.master_target()) {
                for p in &ps {
                    let held = mt.machines.iter().find(|r| r.machine == p.machine);
                    if let Some(target) = held.and_then(|r| r.disks.first()).map(|d| &d.target) {
                        if !target.starts_with(&p.datastore_path) {
                            return fail(
                                errors::CONFLICT,
                                format!(
                                    "master target {} already holds a replica of {} at {}, outside datastore {}: protect it to the datastore that holds it",
                                    first.master_target, p.machine, target.display(), p.datastore
                                ),
                            );
                        }
                    }
                }
            }
            // The master target takes each machine's stream only from the process server its
            // protection routes it through (by the identity that server's certificate carries).
            let Some(ps_identity) =
                component(store, ComponentKind::ProcessServer, &first.process_server).await.and_then(|c| c.identity)
            else {
                return fail(
                    errors::NOT_FOUND,
                    format!(
                        "process server {} registered without an identity: register it again",
                        first.process_server
                    ),
                );
            };
            let r = update_settings(store, &key, |b| {
                let map = b.machine_datastores.get_or_insert_with(Default::default);
                for p in &ps {
                    map.insert(p.machine.clone(), p.datastore_path.clone());
                }
                let map = b.machine_process_servers.get_or_insert_with(Default::default);
                for p in &ps {
                    map.insert(p.machine.clone(), ps_identity.clone());
                }
                // Protected again after a disable: its removal order (done) is withdrawn.
                if let Some(map) = b.machine_removals.as_mut() {
                    for p in &ps {
                        map.remove(&p.machine);
                    }
                }
            })
            .await;
            if let Err(e) = r {
                return fail(errors::STORE, e);
            }
            for p in &ps {
                let r = wait_status(
                    store,
                    ctl,
                    ComponentKind::MasterTarget,
                    &p.master_target,
                    Duration::from_secs(120),
                    |st| {
                        st.master_target().is_some_and(|mt| {
                            mt.settings.machine_datastores.get(&p.machine) == Some(&p.datastore_path)
                                && mt.settings.machine_process_servers.get(&p.machine) == Some(&ps_identity)
                                && mt.settings.machine_retention_secs.contains_key(&p.machine)
                        })
                    },
                )
                .await;
                if let Err(e) = r {
                    return fail(
                        ProtectStep::AssignMasterTarget.code(),
                        format!("{e}: is it running and linked to this server?"),
                    );
                }
            }
            Outcome::Done(Some(format!("replicas go to {}", first.datastore_path.display())))
        }
        Some(ProtectStep::RouteProcessServer) => {
            let Some(mt) = component(store, ComponentKind::MasterTarget, &first.master_target).await else {
                return fail(
                    errors::MT_HEARTBEAT_LOST,
                    format!("master target {} is not registered", first.master_target),
                );
            };
            let Some(address) = mt.status.as_ref().and_then(|s| s.advertise()).map(str::to_owned) else {
                return fail(
                    errors::MT_HEARTBEAT_LOST,
                    format!("master target {} has not reported its replication address", first.master_target),
                );
            };
            // Each machine's route names the identity its agent's certificate carries: the process
            // server takes that machine's stream from that certificate only.
            let mut routes = BTreeMap::new();
            for p in &ps {
                let agent = component(store, ComponentKind::Agent, &p.machine).await.and_then(|c| c.identity);
                if agent.is_none() {
                    return fail(
                        errors::NOT_FOUND,
                        format!("agent {} registered without an identity: register it again", p.machine),
                    );
                }
                let route = MasterTargetRoute { address: address.clone(), name: first.master_target.clone(), agent };
                routes.insert(p.machine.clone(), route);
            }
            let key = format!("process-server/{}", first.process_server);
            let r = update_settings(store, &key, |b| {
                b.machine_master_targets.get_or_insert_with(Default::default).extend(routes.clone());
                if let Some(map) = b.machine_removals.as_mut() {
                    for m in routes.keys() {
                        map.remove(m);
                    }
                }
            })
            .await;
            if let Err(e) = r {
                return fail(errors::STORE, e);
            }
            for p in &ps {
                let r = wait_status(
                    store,
                    ctl,
                    ComponentKind::ProcessServer,
                    &p.process_server,
                    Duration::from_secs(120),
                    |st| {
                        st.process_server().is_some_and(|ps| {
                            ps.settings.machine_master_targets.get(&p.machine) == routes.get(&p.machine)
                        })
                    },
                )
                .await;
                if let Err(e) = r {
                    return fail(
                        ProtectStep::RouteProcessServer.code(),
                        format!("{e}: is it running and linked to this server?"),
                    );
                }
            }
            Outcome::Done(Some(format!("{} → {address}", first.process_server)))
        }
        Some(ProtectStep::ConfigureAgents) => {
            let Some(psc) = component(store, ComponentKind::ProcessServer, &first.process_server).await else {
                return fail(
                    errors::PS_HEARTBEAT_LOST,
                    format!("process server {} is not registered", first.process_server),
                );
            };
            let Some(ps_addr) = psc.status.as_ref().and_then(|s| s.advertise()).map(str::to_owned) else {
                return fail(
                    errors::PS_UNREACHABLE,
                    format!("process server {} has not reported its address", first.process_server),
                );
            };
            let groups = match group_settings(store, &ps).await {
                Ok(g) => g,
                Err(e) => return fail(errors::STORE, e),
            };
            for p in &ps {
                let group = groups.get(&p.machine).cloned();
                let disks: Vec<DiskSetting> = p
                    .disks
                    .iter()
                    .map(|d| DiskSetting {
                        name: d.name.clone(),
                        path: d.path.clone(),
                        uuid: d.uuid.clone(),
                        cache: None,
                    })
                    .collect();
                let r = update_settings(store, &format!("agent/{}", p.machine), |b| {
                    b.process_server = Some(ps_addr.clone());
                    b.process_server_name = Some(p.process_server.clone());
                    b.disks = Some(disks.clone());
                    b.policy = Some(p.policy.clone());
                    b.group = group.clone();
                    b.protection_disabled = None;
                })
                .await;
                if let Err(e) = r {
                    return fail(errors::STORE, e);
                }
            }
            Outcome::Done(Some(format!("agents replicate to {ps_addr}")))
        }
        Some(ProtectStep::InitialSync) => {
            let started = tokio::time::Instant::now();
            let ps_addr = match component(store, ComponentKind::ProcessServer, &first.process_server).await {
                Some(c) => c.status.as_ref().and_then(|s| s.advertise()).unwrap_or_default().to_owned(),
                None => {
                    return fail(
                        errors::PS_HEARTBEAT_LOST,
                        format!("process server {} is not registered", first.process_server),
                    )
                }
            };
            let stall = Duration::from_secs(pj.stall_secs.max(1));
            let mut last = (u64::MAX, usize::MAX);
            let mut moved = tokio::time::Instant::now();
            loop {
                let (mut done, mut total, mut complete) = (0u64, 0u64, 0usize);
                for p in &ps {
                    let st = component(store, ComponentKind::Agent, &p.machine).await.and_then(|c| c.status);
                    let st = st.as_ref().and_then(|s| s.agent());
                    let size: u64 = p.disks.iter().filter_map(|d| d.size).sum();
                    // The status must come from the agent configured in step 3 (not an older one).
                    let configured = st.filter(|a| a.process_server == ps_addr);
                    if configured.is_some_and(|a| a.initial_sync_complete && a.mode == Mode::Replicating) {
                        complete += 1;
                        done += size;
                        total += size;
                    } else if let Some(r) = configured.and_then(|a| a.resync.as_ref()) {
                        done += r.bytes_done;
                        total += r.bytes_total;
                    } else {
                        total += size;
                    }
                }
                ctl.bytes(done, total);
                if complete == ps.len() {
                    return Outcome::Done(Some(format!(
                        "{} byte(s) in sync after {:.0} s",
                        total,
                        started.elapsed().as_secs_f64()
                    )));
                }
                if (done, complete) != last {
                    last = (done, complete);
                    moved = tokio::time::Instant::now();
                } else if moved.elapsed() >= stall {
                    // Say what the hops report, so the operator knows where it is stuck.
                    let mut why = Vec::new();
                    for p in &ps {
                        let st = component(store, ComponentKind::Agent, &p.machine).await.and_then(|c| c.status);
                        let a = st.as_ref().and_then(|s| s.agent());
                        if let Some(e) = a.and_then(|a| a.link_error.as_deref()) {
                            why.push(format!("{} agent: {e}", p.machine));
                        }
                        if a.is_none() {
                            why.push(format!(
                                "{}: the mobility service does not run the agent (powered off?)",
                                p.machine
                            ));
                        }
                    }
                    let psc = component(store, ComponentKind::ProcessServer, &first.process_server).await;
                    if let Some(ps) = psc.as_ref().and_then(|c| c.status.as_ref()).and_then(|s| s.process_server()) {
                        for m in &ps.machines {
                            if let Some(e) = &m.master_target_error {
                                why.push(format!("{} at {}: {e}", m.machine, first.process_server));
                            }
                        }
                    }
                    return fail(
                        ProtectStep::InitialSync.code(),
                        format!(
                            "the initial sync made no progress for {stall:?} ({}): fix the cause and protect again (the agents keep their settings)",
                            if why.is_empty() { "no hop reports an error".to_owned() } else { why.join("; ") }
                        ),
                    );
                }
                tokio::select! {
                    _ = ctl.cancel.cancelled() => return fail(errors::JOB_STATE, "the job was cancelled during the initial sync (the agents keep their settings: protect again to finish)"),
                    _ = tokio::time::sleep(Duration::from_millis(500)) => {}
                }
            }
        }
        Some(ProtectStep::MarkProtected) => {
            for p in &ps {
                let r: Result<(), String> = async {
                    let cur = store.get::<Protection>(PROTECTION, &p.machine).await.map_err(|e| e.to_string())?;
                    let (mut body, rev) = match cur {
                        Some(d) if d.body.job == job.id => (d.body, d.revision),
                        _ => {
                            return Err(format!(
                                "the protection record of {} no longer belongs to this job: check `ferry machines` and protect again if needed",
                                p.machine
                            ))
                        }
                    };
                    body.state = "protected".into();
                    body.job = job.id.clone();
                    store.put(PROTECTION, &p.machine, &body, Some(rev)).await.map_err(|e| e.to_string())?;
                    let _ = store
                        .add_event(
                            0,
                            "info",
                            &format!("agent/{}", p.machine),
                            &format!(
                                "{} is Protected (policy {}, master target {})",
                                p.machine, p.policy, p.master_target
                            ),
                        )
                        .await;
                    Ok(())
                }
                .await;
                if let Err(e) = r {
                    return fail(errors::STORE, e);
                }
            }
            Outcome::Done(Some(format!("{} machine(s) Protected", ps.len())))
        }
        None => fail(errors::JOB_STATE, format!("protect job has no step {step}")),
    }
}

/// A failed job leaves its machines `failed` (a new request may retry them).
pub async fn mark_failed(store: &Store, pj: &ProtectJob<'_>) {
    let job = pj.job;
    for p in pj.protections {
        if let Ok(Some(d)) = store.get::<Protection>(PROTECTION, &p.machine).await {
            if d.body.job == job.id && d.body.state == "enabling" {
                let mut b = d.body;
                b.state = "failed".into();
                let _ = store.put(PROTECTION, &p.machine, &b, Some(d.revision)).await;
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_machine_whose_failover_names_would_not_fit_is_refused_at_protect() {
        assert!(failover_names_fit("web1", "recovery").is_ok());
        let longest = "m".repeat(128 - ".recovery".len());
        assert!(failover_names_fit(&longest, "recovery").is_ok());
        let e = failover_names_fit(&format!("{longest}x"), "recovery").unwrap_err();
        assert!(e.contains("too long") && e.contains("at most 128"), "{e}");
        // The drill's names count too (a short site name does not make a long machine fit).
        assert!(failover_names_fit(&"m".repeat(124), "r").is_err());
    }
}
