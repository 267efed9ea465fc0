//! Disable protection of a machine, as a job: its agent stops shipping (the machine keeps
//! running: the agent still serves its disks, in `disabled` mode), the process server deletes its
//! spool, the master target deletes its replica with every recovery point (and its target disks,
//! unless a failed-over machine runs from them), and the protection record says `protection
//! disabled` with what was deleted. **Remove** is the same without waiting for the source side
//! (its agent and process server, unreachable with the primary site): they get the same orders and
//! carry them out when they are back.
//!
//! Like the failover jobs, each step states what it wants in a component's settings (the agent's
//! `protection_disabled`, the process server's and master target's `machine_removals`, named by
//! the job's ID) and waits for the component's status to say it was done; every step may run
//! again after a restart.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::Json;
use ferry_api::agent::Mode;
use ferry_api::config_server::{DisableProtectionRequest, FailoverStage, Protection, ProtectionDisabled};
use ferry_api::control::{ComponentKind, ComponentSettings, RemovalOrder, RemovedMachine};
use ferry_store::Store;

use crate::errors::{self, ApiError};
use crate::http::{Body, Caller};
use crate::jobs::{now_ms, Job, JobControl, Outcome};
use crate::ops::{JobWork, Ops};
use crate::protection::{component, effective_state, fail, update_settings, PROTECTION};
use crate::AppState;

/// How long a running component may take to take its order.
const ORDER_LIMIT: Duration = Duration::from_secs(120);

/// A running agent's heartbeat younger than this (three default heartbeat intervals) is waited
/// for; an older one (the machine is off, or its site is lost) takes its settings when it starts.
const FRESH_MS: u64 = 90_000;

/// The steps of a disable job, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum DisableStep {
    /// The agent (of the machine that runs: the primary, or the failed-over machine) ships nothing.
    StopAgent,
    /// The process server deletes the machine's spool.
    RemoveSpool,
    /// The master target deletes the replica and its recovery points.
    RemoveReplica,
    /// The protection record says disabled (or removed).
    Record,
}

impl DisableStep {
    pub const ALL: [DisableStep; 4] =
        [DisableStep::StopAgent, DisableStep::RemoveSpool, DisableStep::RemoveReplica, DisableStep::Record];
}

/// The job's steps for `p`.
pub fn steps(p: &Protection, remove: bool) -> Vec<(String, bool)> {
    let m = &p.machine;
    let unwaited = if remove { " (not waited for: the source side is unreachable)" } else { "" };
    vec![
        (format!("stop replication at the agent of {m} (it keeps serving the disks){unwaited}"), true),
        (format!("delete the spool of {m} at process server {}{unwaited}", p.process_server), true),
        (format!("delete the replica and recovery points of {m} at master target {}", p.master_target), true),
        (format!("record {m} as {}", if remove { "removed" } else { "protection disabled" }), true),
    ]
}

/// The state names of a record the disable job works on.
pub const DISABLING: &str = "disabling";
pub const DISABLED: &str = "protection disabled";
pub const REMOVED: &str = "removed";

/// `POST /api/v1/machines/{name}/disable-protection`.
pub async fn disable(
    State(s): State<Arc<AppState>>,
    caller: Caller,
    Path(machine): Path<String>,
    Body(req): Body<DisableProtectionRequest>,
) -> crate::http::ApiResult {
    let job = tokio::spawn(async move { claim(&s, &machine, &req, &caller.token_name).await })
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, errors::JOB_STATE, e.to_string()))??;
    Ok((StatusCode::ACCEPTED, Json(job)).into_response())
}

fn state_error(msg: String) -> ApiError {
    ApiError::new(StatusCode::CONFLICT, errors::PROTECTION_STATE, msg)
}

/// Refuse a failover operation (cancel, change point, commit) on a machine whose protection is
/// being disabled or was: its replica is (being) deleted.
pub(crate) fn refuse_if_disabled(p: &Protection) -> Result<(), ApiError> {
    match &p.disabled {
        Some(d) => Err(state_error(format!(
            "protection of {} was {} (job {}): its replica and recovery points are deleted; protect it again for a new one",
            p.machine,
            if d.removed { "removed" } else { "disabled" },
            d.job
        ))),
        None => Ok(()),
    }
}

/// Whether the machine may be disabled now, and why not (the per-machine lock: no other job of
/// the machine may be running).
pub(crate) async fn check(store: &Store, p: &Protection, req: &DisableProtectionRequest) -> Result<(), ApiError> {
    let m = &p.machine;
    let state = effective_state(store, p).await?;
    match state.as_str() {
        "protected" | "failed" | "disable failed" => {}
        DISABLED | REMOVED => {
            return Err(state_error(format!(
                "protection of {m} is already {state} (job {}): nothing is left to clean up",
                p.job
            )))
        }
        _ => {
            return Err(state_error(format!(
                "machine {m} is {state} (job {}): wait for that job or cancel it (`ferry jobs cancel {}`), then disable protection",
                p.job, p.job
            )))
        }
    }
    if let Some(t) = &p.test_failover {
        return Err(state_error(format!(
            "machine {m} is in test failover {} (job {}): clean the drill up first (`ferry test-failover cleanup {m}`)",
            t.drill, t.job
        )));
    }
    // A reprotect uses this machine's disks as the reverse replica: disabling it would stop the
    // agents the reverse protection runs on.
    if let Some(rm) = &p.reprotected_by {
        return Err(state_error(format!(
            "machine {m} is reprotected by {rm} (its disks are {rm}'s replica): disable the protection of {rm} first"
        )));
    }
    if let Some(rm) = p.failover.as_ref().and_then(|f| f.recovery_machine.clone()) {
        if let Some(d) = store.get::<Protection>(crate::protection::PROTECTION, &rm).await? {
            let rs = effective_state(store, &d.body).await?;
            if d.body.reprotect.as_ref().is_some_and(|r| r.of == *m)
                && rs != "failed"
                && rs != DISABLED
                && rs != REMOVED
            {
                return Err(state_error(format!(
                    "{rm} is being reprotected onto the disks of {m} ({rs}, job {}): wait for that job or cancel it first",
                    d.body.job
                )));
            }
        }
    }
    if let Some(g) = &p.group {
        return Err(state_error(format!(
            "machine {m} is a member of replication group {g}: its members are protected together and a member cannot be disabled alone yet; see docs/limitations.md"
        )));
    }
    if let Some(f) = &p.failover {
        if crate::failover::running(store, &f.job).await? {
            return Err(state_error(format!(
                "job {} is working on the failover of {m}: wait for it or cancel it first",
                f.job
            )));
        }
        if !req.force {
            let stage = match f.stage {
                FailoverStage::InProgress => "has a failover in progress (failed: run it again or cancel it)",
                FailoverStage::FailedOver => "is failed over (not committed)",
                FailoverStage::Committed => "is failed over (committed)",
            };
            return Err(state_error(format!(
                "machine {m} {stage}: disabling protection deletes its recovery points and makes reprotect and failback impossible (RP-2); the machine at the recovery site keeps running on its disks. Say --force to do it anyway"
            )));
        }
    }
    Ok(())
}

async fn claim(s: &Arc<AppState>, machine: &str, req: &DisableProtectionRequest, by: &str) -> Result<Job, ApiError> {
    let doc = crate::failover::protection_of(s, machine).await?;
    let mut p = doc.body;
    check(&s.store, &p, req).await?;
    let id = crate::jobs::Jobs::new_id();
    let before = p.clone();
    p.state = DISABLING.into();
    p.job = id.clone();
    p.disabled = Some(ProtectionDisabled {
        job: id.clone(),
        removed: req.remove,
        failed_over: p.failover.is_some(),
        requested_ms: now_ms(),
        done_ms: None,
        by: by.to_owned(),
        agent: None,
        deleted_spool_bytes: None,
        deleted_replica_bytes: None,
        kept_target_disks: false,
    });
    let rev = s.store.put(PROTECTION, machine, &p, Some(doc.revision)).await.map_err(|e| match e {
        ferry_store::StoreError::Conflict { .. } => {
            state_error(format!("machine {machine} changed under this request: retry"))
        }
        e => e.into(),
    })?;
    let steps = steps(&p, req.remove);
    let work = JobWork::DisableProtection { machine: machine.to_owned(), remove: req.remove };
    let started = match work.split() {
        Ok((kind, params)) => {
            s.jobs.start_with_id(id, s.ops.clone(), kind, machine, steps, params).await.map_err(ApiError::from)
        }
        Err(e) => Err(e),
    };
    if started.is_err() {
        // Not started: the record goes back to what it was.
        let _ = s.store.put(PROTECTION, machine, &before, Some(rev)).await;
    }
    started
}

/// The record, if this job still owns it.
async fn owned(store: &Store, job: &Job, machine: &str) -> Result<(Protection, i64), Outcome> {
    let (p, rev) = crate::failover::protection(store, machine).await?;
    if p.job != job.id || p.state != DISABLING {
        return Err(fail(
            errors::PROTECTION_STATE,
            format!("the protection record of {machine} no longer belongs to job {}: see `ferry machines`", job.id),
        ));
    }
    Ok((p, rev))
}

/// Change the record's `disabled`, if this job still owns it.
async fn update_disabled(store: &Store, job: &Job, machine: &str, f: impl Fn(&mut Protection)) -> Result<(), Outcome> {
    for _ in 0..20 {
        let (mut p, rev) = owned(store, job, machine).await?;
        f(&mut p);
        match store.put(PROTECTION, machine, &p, Some(rev)).await {
            Ok(_) => return Ok(()),
            Err(ferry_store::StoreError::Conflict { .. }) => continue,
            Err(e) => return Err(fail(errors::STORE, e.to_string())),
        }
    }
    Err(fail(errors::STORE, format!("the protection of {machine} kept changing under job {}", job.id)))
}

/// An agent's settings once protection is disabled: its disks and local keys stay, everything
/// that made it ship or track for a failover goes.
fn disable_agent(b: &mut ComponentSettings) {
    b.process_server = None;
    b.process_server_name = None;
    b.group = None;
    // A quiesce stays: it keeps a failed-over machine's old primary from taking writes.
    b.protection_disabled = Some(true);
    b.other.remove("failover_seed");
    b.other.remove("recovery_writes_file");
    b.resync_seed = None;
    b.verify_order = None;
}

/// What a component reported for this job's removal order, if it did.
fn removal_done<'a>(
    removed: Option<&'a std::collections::BTreeMap<String, RemovedMachine>>,
    machine: &str,
    order: &str,
) -> Option<&'a RemovedMachine> {
    removed?.get(machine).filter(|r| r.order == order)
}

impl Ops {
    pub async fn disable_step(&self, job: &Job, machine: &str, remove: bool, step: usize, ctl: &JobControl) -> Outcome {
        let store = &self.store;
        // Recorded already (a restart between the record and the step's end): nothing is left.
        if let Ok((p, _)) = crate::failover::protection(store, machine).await {
            let ours = p.disabled.as_ref().is_some_and(|d| d.job == job.id) && p.job == job.id;
            if ours && (p.state == DISABLED || p.state == REMOVED) {
                return Outcome::Done(Some(format!("{machine}: {} (recorded)", p.state)));
            }
        }
        let (p, _) = match owned(store, job, machine).await {
            Ok(x) => x,
            Err(o) => return o,
        };
        match DisableStep::ALL.get(step).copied() {
            Some(DisableStep::StopAgent) => {
                // Both agents of a failed-over machine: the recovery machine's (it tracked for a
                // reprotect that will not come) and the old primary's (should it ever boot).
                let recovery = p.failover.as_ref().and_then(|f| f.recovery_machine.clone());
                let mut agents = vec![machine.to_owned()];
                agents.extend(recovery.clone());
                for a in &agents {
                    let key = format!("agent/{a}");
                    if component(store, ComponentKind::Agent, a).await.is_none() && Some(a) == recovery.as_ref() {
                        continue;
                    }
                    if let Err(e) = update_settings(store, &key, disable_agent).await {
                        return fail(errors::STORE, e);
                    }
                }
                // The agent that runs now is waited for; one that is off takes it when it starts.
                let running = recovery.unwrap_or_else(|| machine.to_owned());
                let said = if remove {
                    format!("agent {running} told to stop replicating (not waited for)")
                } else {
                    let fresh = component(store, ComponentKind::Agent, &running)
                        .await
                        .is_some_and(|c| now_ms().saturating_sub(c.last_seen_ms.unwrap_or(0)) <= FRESH_MS);
                    if fresh {
                        let r = crate::protection::wait_status(
                            store,
                            ctl,
                            ComponentKind::Agent,
                            &running,
                            ORDER_LIMIT,
                            |st| st.agent().is_some_and(|a| a.mode == Mode::Disabled),
                        )
                        .await;
                        if let Err(e) = r {
                            return fail(
                                errors::MACHINE_NOT_ACCESSIBLE,
                                format!(
                                    "the agent of {running} did not stop replicating: {e}; check that its mobility service runs, or disable with --remove if its site is lost"
                                ),
                            );
                        }
                        format!("agent {running} stopped replicating; it keeps serving the disks")
                    } else {
                        format!("agent {running} is not running: it stops replicating when it starts")
                    }
                };
                if let Err(o) = update_disabled(store, job, machine, |p| {
                    if let Some(d) = p.disabled.as_mut() {
                        d.agent = Some(said.clone());
                    }
                })
                .await
                {
                    return o;
                }
                Outcome::Done(Some(said))
            }
            Some(DisableStep::RemoveSpool) => {
                let key = format!("process-server/{}", p.process_server);
                let order = RemovalOrder { order: job.id.clone(), keep_target_disks: false };
                let r = update_settings(store, &key, |b| {
                    if let Some(routes) = b.machine_master_targets.as_mut() {
                        routes.remove(machine);
                    }
                    b.machine_removals.get_or_insert_with(Default::default).insert(machine.to_owned(), order.clone());
                })
                .await;
                if let Err(e) = r {
                    return fail(errors::STORE, e);
                }
                if remove {
                    return Outcome::Done(Some(format!(
                        "process server {} told to delete the spool (it does when it is back)",
                        p.process_server
                    )));
                }
                let mut found = None;
                let r = crate::protection::wait_status(
                    store,
                    ctl,
                    ComponentKind::ProcessServer,
                    &p.process_server,
                    ORDER_LIMIT,
                    |st| {
                        st.process_server()
                            .and_then(|ps| removal_done(Some(&ps.removed_machines), machine, &job.id))
                            .is_some_and(|r| r.error.is_none())
                    },
                )
                .await;
                if let Some(ps) = component(store, ComponentKind::ProcessServer, &p.process_server)
                    .await
                    .and_then(|c| c.status)
                    .and_then(|s| s.process_server().cloned())
                {
                    found = removal_done(Some(&ps.removed_machines), machine, &job.id).cloned();
                }
                match (r, found) {
                    (Ok(()), Some(done)) if done.error.is_none() => {
                        let bytes = done.deleted_bytes;
                        if let Err(o) = update_disabled(store, job, machine, |p| {
                            if let Some(d) = p.disabled.as_mut() {
                                d.deleted_spool_bytes = Some(bytes);
                            }
                        })
                        .await
                        {
                            return o;
                        }
                        Outcome::Done(Some(format!("spool deleted ({bytes} byte(s))")))
                    }
                    (_, Some(RemovedMachine { error: Some(e), .. })) => fail(
                        errors::STORAGE,
                        format!("process server {} cannot delete the spool of {machine}: {e}", p.process_server),
                    ),
                    (r, _) => fail(
                        errors::PS_HEARTBEAT_LOST,
                        format!(
                            "process server {} did not confirm the spool's deletion ({}): check that it runs and is linked, or disable with --remove if the primary site is lost",
                            p.process_server,
                            r.err().unwrap_or_else(|| "no report".into())
                        ),
                    ),
                }
            }
            Some(DisableStep::RemoveReplica) => {
                let key = format!("master-target/{}", p.master_target);
                // Kept once the failed-over machine may run from them (the master target also
                // never deletes disks it handed over).
                let keep = p
                    .failover
                    .as_ref()
                    .is_some_and(|f| f.handed_over_seq.is_some() || f.stage != FailoverStage::InProgress);
                let order = RemovalOrder { order: job.id.clone(), keep_target_disks: keep };
                let r = update_settings(store, &key, |b| {
                    if let Some(m) = b.machine_datastores.as_mut() {
                        m.remove(machine);
                    }
                    // A reprotect's adoption goes too: a later protection of the name must not
                    // take the old primary's files again (the master target keeps them).
                    if let Some(m) = b.machine_adoptions.as_mut() {
                        m.remove(machine);
                    }
                    if let Some(m) = b.machine_process_servers.as_mut() {
                        m.remove(machine);
                    }
                    if let Some(m) = b.machine_retention_secs.as_mut() {
                        m.remove(machine);
                    }
                    if let Some(m) = b.machine_failovers.as_mut() {
                        m.remove(machine);
                    }
                    if let Some(m) = b.machine_test_failovers.as_mut() {
                        m.remove(machine);
                    }
                    b.machine_removals.get_or_insert_with(Default::default).insert(machine.to_owned(), order.clone());
                })
                .await;
                if let Err(e) = r {
                    return fail(errors::STORE, e);
                }
                let r = crate::protection::wait_status(
                    store,
                    ctl,
                    ComponentKind::MasterTarget,
                    &p.master_target,
                    ORDER_LIMIT,
                    |st| {
                        st.master_target()
                            .and_then(|mt| removal_done(Some(&mt.removed_machines), machine, &job.id))
                            .is_some_and(|r| r.error.is_none())
                    },
                )
                .await;
                let found = component(store, ComponentKind::MasterTarget, &p.master_target)
                    .await
                    .and_then(|c| c.status)
                    .and_then(|s| s.master_target().cloned())
                    .and_then(|mt| removal_done(Some(&mt.removed_machines), machine, &job.id).cloned());
                match (r, found) {
                    (Ok(()), Some(done)) if done.error.is_none() => {
                        let (bytes, kept) = (done.deleted_bytes, done.kept_target_disks);
                        if let Err(o) = update_disabled(store, job, machine, |p| {
                            if let Some(d) = p.disabled.as_mut() {
                                d.deleted_replica_bytes = Some(bytes);
                                d.kept_target_disks = kept;
                            }
                        })
                        .await
                        {
                            return o;
                        }
                        let kept = if kept { "; the target disks are kept: the failed-over machine runs from them" } else { "" };
                        Outcome::Done(Some(format!("replica and recovery points deleted ({bytes} byte(s)){kept}")))
                    }
                    (_, Some(RemovedMachine { error: Some(e), .. })) => fail(
                        errors::STORAGE,
                        format!("master target {} cannot delete the replica of {machine}: {e}", p.master_target),
                    ),
                    (r, _) => fail(
                        errors::MT_HEARTBEAT_LOST,
                        format!(
                            "master target {} did not confirm the replica's deletion ({}): check that it runs and is linked to this server, then disable again",
                            p.master_target,
                            r.err().unwrap_or_else(|| "no report".into())
                        ),
                    ),
                }
            }
            Some(DisableStep::Record) => {
                let state = if remove { REMOVED } else { DISABLED };
                let r = update_disabled(store, job, machine, |p| {
                    p.state = state.into();
                    if let Some(d) = p.disabled.as_mut() {
                        d.done_ms = Some(now_ms());
                    }
                })
                .await;
                if let Err(o) = r {
                    return o;
                }
                let _ = store
                    .add_event(
                        0,
                        "info",
                        &format!("agent/{machine}"),
                        &format!("protection of {machine}: {state} (job {})", job.id),
                    )
                    .await;
                Outcome::Done(Some(format!("{machine}: {state}")))
            }
            None => fail(errors::JOB_STATE, format!("disable job has no step {step}")),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_api::config_server::{FailoverKind, ProtectionFailover, ProtectionTestFailover};

    fn protection(state: &str) -> Protection {
        Protection {
            machine: "web1".into(),
            site: "primary".into(),
            os_family: "linux".into(),
            policy: "gold".into(),
            process_server: "ps1".into(),
            master_target: "mt1".into(),
            datastore: "ds1".into(),
            datastore_path: "/ds1".into(),
            group: None,
            state: state.into(),
            job: "job-1".into(),
            disks: Vec::new(),
            since_ms: now_ms(),
            failover: None,
            test_failover: None,
            cancelled_failover: None,
            reprotect: None,
            reprotected_by: None,
            disabled: None,
        }
    }

    fn failover(stage: FailoverStage) -> ProtectionFailover {
        ProtectionFailover {
            kind: FailoverKind::Unplanned,
            stage,
            job: "job-gone".into(),
            reason: String::new(),
            started_ms: 1,
            point: None,
            handed_over_seq: None,
            discarded: None,
            primary_last_seq: None,
            primary: None,
            committed_ms: None,
            recovery_machine: Some("web1.recovery".into()),
            recovery_site: Some("recovery".into()),
            restart_recovery_machine: false,
            restart_decided_by: None,
        }
    }

    #[tokio::test]
    async fn disable_is_refused_where_it_would_lose_or_race_something() {
        let d = tempfile::tempdir().unwrap();
        let store = Store::open(d.path().join("db.sqlite").to_str().unwrap()).await.unwrap();
        let plain = DisableProtectionRequest::default();
        let forced = DisableProtectionRequest { force: true, remove: false };
        let err = |r: Result<(), ApiError>| r.err().map(|e| e.message).unwrap_or_default();

        assert!(check(&store, &protection("protected"), &plain).await.is_ok());
        assert!(check(&store, &protection("failed"), &plain).await.is_ok(), "a failed protect is cleaned up too");
        let e = err(check(&store, &protection(DISABLED), &plain).await);
        assert!(e.contains("already protection disabled"), "{e}");

        let mut drill = protection("protected");
        drill.test_failover = Some(ProtectionTestFailover { drill: "d1".into(), job: "j".into(), started_ms: 1 });
        assert!(err(check(&store, &drill, &forced).await).contains("clean the drill up first"));

        let mut grouped = protection("protected");
        grouped.group = Some("g1".into());
        assert!(err(check(&store, &grouped, &plain).await).contains("replication group g1"));

        // Failed over (committed or not): only with force; RP-2 is named.
        for stage in [FailoverStage::FailedOver, FailoverStage::Committed, FailoverStage::InProgress] {
            let mut p = protection("protected");
            p.failover = Some(failover(stage));
            let e = err(check(&store, &p, &plain).await);
            assert!(e.contains("--force") && e.contains("RP-2"), "{stage:?}: {e}");
            assert!(check(&store, &p, &forced).await.is_ok(), "{stage:?}");
        }
    }

    #[test]
    fn a_disabled_agent_keeps_its_disks_and_loses_what_made_it_ship_or_track() {
        let mut b = ComponentSettings {
            process_server: Some("10.0.0.5:7200".into()),
            process_server_name: Some("ps1".into()),
            disks: Some(vec![ferry_api::control::DiskSetting {
                name: "disk0".into(),
                path: "/vm/disk0.img".into(),
                uuid: None,
                cache: None,
            }]),
            ..Default::default()
        };
        b.other.insert("failover_seed".into(), serde_json::json!("/mt/seed.json"));
        b.other.insert("recovery_writes_file".into(), serde_json::json!("/vm/rw.json"));
        disable_agent(&mut b);
        assert!(b.process_server.is_none() && b.process_server_name.is_none());
        assert_eq!(b.protection_disabled, Some(true));
        assert!(b.disks.as_ref().is_some_and(|d| d.len() == 1), "the machine keeps its disks");
        assert!(b.other.is_empty(), "{:?}", b.other);
    }
}
