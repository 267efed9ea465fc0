//! Failover of a protected machine, as jobs: **planned** (the primary is healthy: quiesce it,
//! wait until the master target holds its last write, shut it down, fence the replica and put
//! the disks at that write: nothing acknowledged is lost), **unplanned** (the primary is lost:
//! try to shut it down, fence, put the disks at the chosen point and report what the recovery
//! site held after it), then **change point** and **commit**.
//!
//! The server never reaches into a component: each step states what it wants in the
//! component's settings (the agent's `quiesce`, the master target's `machine_failovers`), named
//! by an order ID (`JOB/STEP`), and waits until the component's status says that order was
//! carried out — or failed, with the component's code. Every step is idempotent (an order
//! already carried out is not repeated), so a restarted server resumes the job at the step it
//! was in.
//!
//! The protection record's `failover` says where the machine stands (in progress, failed
//! over, committed); `ferry machines` shows it. A failed failover job leaves everything as it
//! was at the failing step (a quiesced primary stays quiesced: lifting it after the fence would
//! let the primary take writes the recovery site will never hold); running the failover again
//! resumes it.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::Json;
use ferry_api::agent::{AgentStatus, QuiesceOrder};
use ferry_api::config_server::{
    ChangePointRequest, FailoverKind, FailoverRequest, FailoverStage, Protection, ProtectionFailover,
};
use ferry_api::control::ComponentKind;
use ferry_api::master_target::{FailoverOrder, FailoverPhase, ReplicaStatus};
use ferry_store::Store;

use crate::errors::{self, ApiError};
use crate::http::Body;
use crate::jobs::{now_ms, Job, JobControl, Outcome};
use crate::ops::{JobWork, Ops};
use crate::protection::{component, effective_state, fail, update_settings, PROTECTION};
use crate::AppState;

/// How long a master target may take to fence and restore (O(writes after the point)).
const AT_POINT_LIMIT: Duration = Duration::from_secs(900);
/// How long the freeze hook and the quiesce may take.
const QUIESCE_LIMIT: Duration = Duration::from_secs(120);

/// The steps of each failover job kind, in order.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum FailoverStep {
    Check,
    Quiesce,
    Drain,
    ShutDownPrimary,
    AtPoint,
    StartAtRecovery,
    MarkFailedOver,
    Commit,
}

impl FailoverStep {
    pub fn of(kind: FailoverKind) -> &'static [FailoverStep] {
        use FailoverStep::*;
        match kind {
            FailoverKind::Planned => {
                &[Check, Quiesce, Drain, ShutDownPrimary, AtPoint, StartAtRecovery, MarkFailedOver]
            }
            FailoverKind::Unplanned => &[Check, ShutDownPrimary, AtPoint, StartAtRecovery, MarkFailedOver],
        }
    }

    fn name(self, p: &Protection, kind: FailoverKind, point: &str) -> String {
        let m = &p.machine;
        match (self, kind) {
            (FailoverStep::Check, _) => {
                format!("check that master target {} holds a replica of {m} to fail over", p.master_target)
            }
            (FailoverStep::Quiesce, _) => {
                format!("quiesce {m}: its applications pause and its agent takes no more writes")
            }
            (FailoverStep::Drain, _) => {
                format!("drain {m} until master target {} holds its last write", p.master_target)
            }
            (FailoverStep::ShutDownPrimary, FailoverKind::Planned) => format!("shut {m} down at site {}", p.site),
            (FailoverStep::ShutDownPrimary, FailoverKind::Unplanned) => {
                format!("try to shut {m} down at site {} (the failover continues if it cannot be)", p.site)
            }
            (FailoverStep::AtPoint, FailoverKind::Planned) => {
                format!("fence {m} at {} and put its disks at its last write", p.master_target)
            }
            (FailoverStep::AtPoint, FailoverKind::Unplanned) => {
                format!("fence {m} at {} and put its disks at point {point}", p.master_target)
            }
            (FailoverStep::StartAtRecovery, _) => match p.reprotect.as_ref() {
                Some(r) if r.location == "alternate" => format!(
                    "fail back: make {} anew at its own site on the reverse replica's new disks and start it (its agent tracks every write)",
                    r.of
                ),
                Some(r) => format!(
                    "fail back: start {} at its own site on its own disks, which hold {m}'s point (its agent tracks every write)",
                    r.of
                ),
                None => format!("start {m} at the recovery site on its failed-over disks (its agent tracks every write)"),
            },
            (FailoverStep::MarkFailedOver, _) => format!("mark {m} failed over (uncommitted)"),
            (FailoverStep::Commit, _) => format!("commit the failover of {m}"),
        }
    }
}

/// A job's steps: (name, idempotent). Every failover step is idempotent (orders by ID).
pub fn failover_steps(p: &Protection, kind: FailoverKind, point: &str) -> Vec<(String, bool)> {
    FailoverStep::of(kind).iter().map(|s| (s.name(p, kind, point), true)).collect()
}

fn change_point_steps(p: &Protection, point: &str) -> Vec<(String, bool)> {
    vec![
        (format!("check that {} is failed over and not committed", p.machine), true),
        ("shut the machine at the recovery site down (its writes are undone with the change)".to_owned(), true),
        (format!("put the disks of {} at point {point}", p.machine), true),
        (format!("start {} at the recovery site again", p.machine), true),
    ]
}

fn commit_steps(p: &Protection) -> Vec<(String, bool)> {
    vec![
        (format!("check that {} is failed over and not committed", p.machine), true),
        (FailoverStep::Commit.name(p, FailoverKind::Unplanned, ""), true),
    ]
}

pub(crate) fn check_reason(reason: Option<&str>, default: String) -> Result<String, ApiError> {
    let r = reason.map(str::trim).unwrap_or_default();
    if r.is_empty() {
        return Ok(default);
    }
    if r.chars().count() > 200 || r.chars().any(char::is_control) {
        return Err(ApiError::bad("reason: one line of at most 200 characters"));
    }
    Ok(r.to_owned())
}

pub(crate) fn check_point(point: &str) -> Result<(), ApiError> {
    let ok = !point.is_empty()
        && point.len() <= 200
        && point.chars().all(|c| c.is_ascii_alphanumeric() || "-_.@".contains(c));
    if ok {
        Ok(())
    } else {
        Err(ApiError::bad(format!(
            "point {point:?}: name an RC-1 selector (latest, latest-processed, latest-app, latest-multi, latest-multi-app), a point ID (MACHINE@SEQ) or a seq"
        )))
    }
}

pub(crate) fn failover_state_error(msg: String) -> ApiError {
    ApiError::new(StatusCode::CONFLICT, errors::FAILOVER_STATE, msg)
}

/// Whether a job is still running (or may still run: queued, waiting).
pub(crate) async fn running(store: &Store, job: &str) -> Result<bool, ApiError> {
    Ok(store.job::<Job>(job).await?.is_some_and(|j| !j.state.finished()))
}

/// `POST /api/v1/failovers`.
pub async fn start_failover(
    State(s): State<Arc<AppState>>,
    Body(req): Body<FailoverRequest>,
) -> crate::http::ApiResult {
    let job = tokio::spawn(async move { claim_failover(&s, req).await })
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, errors::JOB_STATE, e.to_string()))??;
    Ok((StatusCode::ACCEPTED, Json(job)).into_response())
}

pub(crate) async fn protection_of(s: &AppState, machine: &str) -> Result<ferry_store::Doc<Protection>, ApiError> {
    crate::model::check_name("machine", machine)?;
    s.store.get::<Protection>(PROTECTION, machine).await?.ok_or_else(|| {
        ApiError::new(
            StatusCode::NOT_FOUND,
            errors::NOT_FOUND,
            format!("machine {machine} is not protected: only a protected machine fails over (`ferry protect {machine} ...`)"),
        )
    })
}

async fn claim_failover(s: &Arc<AppState>, req: FailoverRequest) -> Result<Job, ApiError> {
    let doc = protection_of(s, &req.machine).await?;
    let mut p = doc.body;
    let state = effective_state(&s.store, &p).await?;
    if state != "protected" {
        return Err(failover_state_error(format!(
            "machine {} is {state}, not protected: only a Protected machine fails over (wait for its protect job {})",
            p.machine, p.job
        )));
    }
    if let Some(t) = &p.test_failover {
        return Err(failover_state_error(format!(
            "machine {} is in test failover {} (job {}): clean the drill up first (`ferry test-failover cleanup {}`), then fail it over",
            p.machine, t.drill, t.job, p.machine
        )));
    }
    if let Some(f) = &p.failover {
        match f.stage {
            FailoverStage::InProgress if running(&s.store, &f.job).await? => {
                return Err(failover_state_error(format!(
                    "a failover of {} is already running (job {}): watch it with `ferry jobs watch {}`",
                    p.machine, f.job, f.job
                )))
            }
            // A failover job that failed after the fence: run it again (planned or unplanned;
            // its steps resume where they stopped).
            FailoverStage::InProgress => {}
            FailoverStage::FailedOver | FailoverStage::Committed => {
                return Err(failover_state_error(format!(
                    "machine {} is already failed over (to {}, job {}): change its point or commit it (`ferry failover change-point|commit {}`)",
                    p.machine,
                    f.point.as_ref().map(|p| p.id.as_str()).unwrap_or("?"),
                    f.job,
                    p.machine
                )))
            }
        }
    }
    let point = match (req.kind, req.point.as_deref()) {
        (FailoverKind::Planned, Some(_)) => {
            return Err(ApiError::bad(
                "a planned failover goes to the primary's last write: it takes no point (an unplanned one does)",
            ))
        }
        (FailoverKind::Planned, None) => "latest".to_owned(),
        (FailoverKind::Unplanned, Some(pt)) => {
            check_point(pt)?;
            pt.to_owned()
        }
        (FailoverKind::Unplanned, None) => "latest".to_owned(),
    };
    if let Some(g) = &p.group {
        // A replication group fails over as one, to one multi-machine point (a recovery plan).
        if req.kind == FailoverKind::Unplanned && !point.starts_with("latest-multi") {
            return Err(ApiError::bad(format!(
                "machine {} is a member of replication group {g}: fail it over to a multi-machine point (latest-multi, latest-multi-app) so the group stays consistent",
                p.machine
            )));
        }
    }
    if !(1..=86_400).contains(&req.drain_secs) {
        return Err(ApiError::bad(format!("drain_secs {}: 1 to 86400", req.drain_secs)));
    }
    let reason = check_reason(req.reason.as_deref(), format!("{} failover of {}", kind_name(req.kind), p.machine))?;
    let id = crate::jobs::Jobs::new_id();
    let previous = p.failover.clone();
    p.failover = Some(ProtectionFailover {
        kind: req.kind,
        stage: FailoverStage::InProgress,
        job: id.clone(),
        reason: reason.clone(),
        started_ms: previous.as_ref().map_or(now_ms(), |f| f.started_ms),
        point: None,
        handed_over_seq: None,
        discarded: None,
        primary_last_seq: previous.as_ref().and_then(|f| f.primary_last_seq),
        primary: None,
        committed_ms: None,
        recovery_machine: None,
        recovery_site: None,
        restart_recovery_machine: false,
        restart_decided_by: None,
    });
    let rev = s.store.put(PROTECTION, &p.machine, &p, Some(doc.revision)).await.map_err(|e| match e {
        ferry_store::StoreError::Conflict { .. } => {
            failover_state_error(format!("machine {} changed under this request: retry", p.machine))
        }
        e => e.into(),
    })?;
    let steps = failover_steps(&p, req.kind, &point);
    let work = JobWork::Failover {
        machine: p.machine.clone(),
        kind: req.kind,
        point,
        reason,
        drain_secs: req.drain_secs,
        no_start: req.no_start,
    };
    start(s, id, &p, rev, work, steps).await
}

/// Start a job claimed on the protection record (`rev`); a failed start puts the record back.
async fn start(
    s: &Arc<AppState>,
    id: String,
    p: &Protection,
    rev: i64,
    work: JobWork,
    steps: Vec<(String, bool)>,
) -> Result<Job, ApiError> {
    let started = match work.split() {
        Ok((kind, params)) => s.jobs.start_with_id(id, s.ops.clone(), kind, &p.machine, steps, params).await,
        Err(e) => return Err(e),
    };
    match started {
        Ok(j) => Ok(j),
        Err(e) => {
            let mut back = p.clone();
            if let Some(f) = back.failover.as_mut() {
                f.job = format!("{} (not started)", f.job);
            }
            let _ = s.store.put(PROTECTION, &p.machine, &back, Some(rev)).await;
            Err(e.into())
        }
    }
}

fn kind_name(k: FailoverKind) -> &'static str {
    match k {
        FailoverKind::Planned => "planned",
        FailoverKind::Unplanned => "unplanned",
    }
}

/// Claim a failed-over machine for a change-point or commit job.
async fn claim_failed_over(
    s: &Arc<AppState>,
    machine: &str,
    what: &str,
) -> Result<(Protection, i64, String), ApiError> {
    let doc = protection_of(s, machine).await?;
    let mut p = doc.body;
    crate::disable::refuse_if_disabled(&p)?;
    let Some(f) = p.failover.as_mut() else {
        return Err(failover_state_error(format!("machine {machine} is not failed over: there is nothing to {what}")));
    };
    if running(&s.store, &f.job).await? {
        return Err(failover_state_error(format!(
            "job {} is working on the failover of {machine}: wait for it (`ferry jobs watch {}`)",
            f.job, f.job
        )));
    }
    match f.stage {
        FailoverStage::InProgress => {
            return Err(failover_state_error(format!(
                "the failover of {machine} did not finish (job {}): run the failover again first",
                f.job
            )))
        }
        FailoverStage::Committed => {
            return Err(failover_state_error(format!(
                "the failover of {machine} to {} is already committed: its point cannot change, and there is nothing more to commit (reprotect it to replicate back)",
                f.point.as_ref().map(|p| p.id.as_str()).unwrap_or("?")
            )))
        }
        FailoverStage::FailedOver => {}
    }
    let id = crate::jobs::Jobs::new_id();
    f.job = id.clone();
    let rev = s.store.put(PROTECTION, machine, &p, Some(doc.revision)).await.map_err(|e| match e {
        ferry_store::StoreError::Conflict { .. } => {
            failover_state_error(format!("machine {machine} changed under this request: retry"))
        }
        e => e.into(),
    })?;
    Ok((p, rev, id))
}

/// `POST /api/v1/machines/{name}/failover/change-point`.
pub async fn change_point(
    State(s): State<Arc<AppState>>,
    Path(machine): Path<String>,
    Body(req): Body<ChangePointRequest>,
) -> crate::http::ApiResult {
    check_point(&req.point)?;
    let job = tokio::spawn(async move {
        let (p, rev, id) = claim_failed_over(&s, &machine, "change").await?;
        let steps = change_point_steps(&p, &req.point);
        start(&s, id, &p, rev, JobWork::FailoverChangePoint { machine, point: req.point }, steps).await
    })
    .await
    .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, errors::JOB_STATE, e.to_string()))??;
    Ok((StatusCode::ACCEPTED, Json(job)).into_response())
}

/// `POST /api/v1/machines/{name}/failover/commit`.
pub async fn commit(State(s): State<Arc<AppState>>, Path(machine): Path<String>) -> crate::http::ApiResult {
    let job = tokio::spawn(async move {
        let (p, rev, id) = claim_failed_over(&s, &machine, "commit").await?;
        let steps = commit_steps(&p);
        start(&s, id, &p, rev, JobWork::FailoverCommit { machine }, steps).await
    })
    .await
    .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, errors::JOB_STATE, e.to_string()))??;
    Ok((StatusCode::ACCEPTED, Json(job)).into_response())
}

fn cancel_steps(p: &Protection, site: &str) -> Vec<(String, bool)> {
    let m = &p.machine;
    let rm = recovery_machine_name(m, site);
    vec![
        (format!("check that the failover of {m} can be cancelled"), true),
        (format!("shut {rm} down at site {site} (its agent says what it wrote)"), true),
        (format!("remove {rm} from site {site} and retire its agent identity"), true),
        (
            format!(
                "put the replica of {m} back at the primary's last write on master target {} and lift the fence",
                p.master_target
            ),
            true,
        ),
        (format!("release {m} at site {}: lift its quiesce, start it, wait until it replicates", p.site), true),
        (format!("mark {m} protected again (failover cancelled)"), true),
    ]
}

/// `POST /api/v1/machines/{name}/failover/cancel`: undo a failover that is not committed.
pub async fn cancel(
    State(s): State<Arc<AppState>>,
    caller: crate::http::Caller,
    Path(machine): Path<String>,
    Body(req): Body<ferry_api::config_server::CancelFailoverRequest>,
) -> crate::http::ApiResult {
    let job = tokio::spawn(async move {
        let doc = protection_of(&s, &machine).await?;
        let mut p = doc.body;
        crate::disable::refuse_if_disabled(&p)?;
        if p.failover.is_none() {
            return Err(failover_state_error(format!("machine {machine} is not failed over: there is nothing to cancel")));
        }
        if let Some(r) = &p.reprotect {
            return Err(failover_state_error(format!(
                "the failover of {machine} is a failback ({} runs on its own disks): cancelling a failback is not supported yet — commit it, then reprotect {} to replicate back",
                r.of, r.of
            )));
        }
        let site = match recovery_site(&s.store, &p).await {
            Ok((rsite, _, _)) => rsite.site,
            Err(Outcome::Failed(e)) => {
                let code = ferry_types::codes::by_code(e.code).unwrap_or(errors::FAILOVER_STATE);
                return Err(ApiError::new(StatusCode::CONFLICT, code, e.message));
            }
            Err(_) => return Err(failover_state_error(format!("the recovery site of {machine} is not known"))),
        };
        let Some(f) = p.failover.as_mut() else {
            return Err(failover_state_error(format!("machine {machine} is not failed over: there is nothing to cancel")));
        };
        if running(&s.store, &f.job).await? {
            return Err(failover_state_error(format!(
                "job {} is working on the failover of {machine}: wait for it, or cancel that job first (`ferry jobs cancel {}`), then cancel the failover",
                f.job, f.job
            )));
        }
        if f.stage == FailoverStage::Committed {
            return Err(failover_state_error(format!(
                "the failover of {machine} to {} is committed: it cannot be cancelled; reprotect {machine} to replicate back, then fail it back",
                f.point.as_ref().map(|p| p.id.as_str()).unwrap_or("?")
            )));
        }
        let id = crate::jobs::Jobs::new_id();
        f.job = id.clone();
        let rev = s.store.put(PROTECTION, &machine, &p, Some(doc.revision)).await.map_err(|e| match e {
            ferry_store::StoreError::Conflict { .. } => {
                failover_state_error(format!("machine {machine} changed under this request: retry"))
            }
            e => e.into(),
        })?;
        let steps = cancel_steps(&p, &site);
        let work = JobWork::FailoverCancel { machine, no_start: req.no_start, by: caller.token_name.clone() };
        start(&s, id, &p, rev, work, steps).await
    })
    .await
    .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, errors::JOB_STATE, e.to_string()))??;
    Ok((StatusCode::ACCEPTED, Json(job)).into_response())
}

// ---- the steps ---------------------------------------------------------------------------------

/// What a failover job's steps need.
pub struct FailoverJob<'a> {
    pub job: &'a Job,
    pub machine: &'a str,
    pub kind: FailoverKind,
    pub point: &'a str,
    pub reason: &'a str,
    pub drain_secs: u64,
    pub no_start: bool,
}

pub(crate) async fn protection(store: &Store, machine: &str) -> Result<(Protection, i64), Outcome> {
    match store.get::<Protection>(PROTECTION, machine).await {
        Ok(Some(d)) => Ok((d.body, d.revision)),
        Ok(None) => Err(fail(errors::NOT_FOUND, format!("the protection of {machine} was removed"))),
        Err(e) => Err(fail(errors::STORE, e.to_string())),
    }
}

/// Change the record's failover, if this job still owns it.
async fn update_failover(store: &Store, job: &Job, machine: &str, f: impl Fn(&mut ProtectionFailover)) -> Outcome {
    for _ in 0..20 {
        let (mut p, rev) = match protection(store, machine).await {
            Ok(x) => x,
            Err(o) => return o,
        };
        let Some(pf) = p.failover.as_mut().filter(|pf| pf.job == job.id) else {
            return fail(
                errors::FAILOVER_STATE,
                format!("the failover record of {machine} no longer belongs to job {}: see `ferry machines`", job.id),
            );
        };
        f(pf);
        match store.put(PROTECTION, machine, &p, Some(rev)).await {
            Ok(_) => return Outcome::Done(None),
            Err(ferry_store::StoreError::Conflict { .. }) => continue,
            Err(e) => return fail(errors::STORE, e.to_string()),
        }
    }
    fail(errors::STORE, format!("the protection of {machine} kept changing under job {}", job.id))
}

pub(crate) async fn replica_status(store: &Store, mt: &str, machine: &str) -> Option<ReplicaStatus> {
    let c = component(store, ComponentKind::MasterTarget, mt).await?;
    let st = c.status?;
    st.master_target()?.machines.iter().find(|r| r.machine == machine).cloned()
}

async fn agent_status(store: &Store, machine: &str, fresh_ms: u64) -> Option<AgentStatus> {
    let c = component(store, ComponentKind::Agent, machine).await?;
    if now_ms().saturating_sub(c.last_seen_ms.unwrap_or(0)) > fresh_ms {
        return None;
    }
    c.status?.agent().cloned()
}

pub(crate) async fn pause(ctl: &JobControl, d: Duration) -> bool {
    tokio::select! {
        _ = ctl.cancel.cancelled() => false,
        _ = tokio::time::sleep(d) => true,
    }
}

/// Ask the master target to fence the machine and put its disks at `point` (or commit), and
/// wait for its status to say it did.
async fn order_master_target(
    store: &Store,
    ctl: &JobControl,
    p: &Protection,
    order: FailoverOrder,
) -> Result<ferry_api::master_target::Failover, Outcome> {
    let want = if order.commit { FailoverPhase::Committed } else { FailoverPhase::AtPoint };
    let id = order.order.clone();
    order_and_wait(store, ctl, p, order, move |r| {
        r.failover.clone().filter(|f| f.order.as_deref() == Some(id.as_str()) && f.phase == want)
    })
    .await
}

/// Give the master target `order` and wait until `done` finds it carried out in the replica's
/// status (or the master target reports it failed); the order is withdrawn either way.
async fn order_and_wait<T>(
    store: &Store,
    ctl: &JobControl,
    p: &Protection,
    order: FailoverOrder,
    done: impl Fn(&ReplicaStatus) -> Option<T>,
) -> Result<T, Outcome> {
    let key = format!("master-target/{}", p.master_target);
    let machine = p.machine.clone();
    let o = order.clone();
    update_settings(store, &key, move |b| {
        b.machine_failovers.get_or_insert_with(Default::default).insert(machine.clone(), o.clone());
    })
    .await
    .map_err(|e| fail(errors::STORE, e))?;
    let result = wait_for_order(store, ctl, p, &order, done).await;
    // Done or given up: the order goes, so no restart of the master target ever carries out a
    // job's order after that job ended.
    let (machine, id) = (p.machine.clone(), order.order.clone());
    let withdrawn = update_settings(store, &key, move |b| {
        if let Some(map) = b.machine_failovers.as_mut() {
            if map.get(&machine).is_some_and(|o| o.order == id) {
                map.remove(&machine);
            }
        }
    })
    .await;
    if let Err(e) = withdrawn {
        tracing::warn!(machine = %p.machine, order = %order.order, error = %e, "cannot withdraw a failover order");
    }
    result
}

async fn wait_for_order<T>(
    store: &Store,
    ctl: &JobControl,
    p: &Protection,
    order: &FailoverOrder,
    done: impl Fn(&ReplicaStatus) -> Option<T>,
) -> Result<T, Outcome> {
    let mut deadline = tokio::time::Instant::now() + AT_POINT_LIMIT;
    loop {
        if let Some(r) = replica_status(store, &p.master_target, &p.machine).await {
            if let Some(t) = done(&r) {
                return Ok(t);
            }
            if let Some(f) = r.failover.as_ref().filter(|f| f.order.as_deref() == Some(order.order.as_str())) {
                if f.phase == FailoverPhase::Restoring {
                    // Restoring, reported by a live master target: it works (its time follows
                    // the writes after the point), so the limit counts from its last report.
                    deadline = tokio::time::Instant::now() + AT_POINT_LIMIT;
                }
            }
            if let Some(e) = r.failover_order_error.as_ref().filter(|e| e.order == order.order) {
                let code = ferry_types::codes::by_code(e.code).unwrap_or(errors::FAILOVER_STATE);
                return Err(fail(code, format!("master target {}: {}", p.master_target, e.message)));
            }
        }
        if tokio::time::Instant::now() >= deadline {
            return Err(fail(
                errors::MT_HEARTBEAT_LOST,
                format!(
                    "master target {} did not report order {} carried out within {AT_POINT_LIMIT:?}: check that it runs and is linked (`ferry components`), then run the job again",
                    p.master_target, order.order
                ),
            ));
        }
        if !pause(ctl, Duration::from_millis(300)).await {
            return Err(fail(
                errors::JOB_STATE,
                "the job was cancelled (the master target may still carry out its order)",
            ));
        }
    }
}

fn describe_discarded(f: &ferry_api::master_target::Failover) -> String {
    let d = &f.discarded;
    if d.records == 0 {
        return format!("disks at {} (seq {}): the recovery site held nothing after it", f.point.id, f.point.seq);
    }
    format!(
        "disks at {} (seq {}); discarded from the failed-over disks: {} byte(s) in {} write(s), seq {}..{}, written {} to {}; writes the primary never shipped are known only at reprotect",
        f.point.id,
        f.point.seq,
        d.bytes,
        d.records,
        d.first_seq.unwrap_or(0),
        d.last_seq.unwrap_or(0),
        ferry_sys::time::utc(d.first_time_ms.unwrap_or(0)),
        ferry_sys::time::utc(d.last_time_ms.unwrap_or(0))
    )
}

/// The recovery site of a protection (the discovered site holding its master target), the host
/// there to run the machine on (the master target's, else the first), and the primary machine's
/// inventory entry.
pub(crate) async fn recovery_site(
    store: &Store,
    p: &Protection,
) -> Result<(crate::discovery::Inventory, String, Option<crate::discovery::Machine>), Outcome> {
    let invs: Vec<crate::discovery::Inventory> = match store.list(crate::ops::INVENTORY).await {
        Ok(v) => v.into_iter().map(|d| d.body).collect(),
        Err(e) => return Err(fail(errors::STORE, e.to_string())),
    };
    let Some(rsite) = invs.iter().find(|i| i.content.master_targets.iter().any(|m| m.name == p.master_target)) else {
        return Err(fail(
            errors::NOT_FOUND,
            format!("master target {} is in no discovered site: discover the recovery site", p.master_target),
        ));
    };
    let host = rsite
        .content
        .master_targets
        .iter()
        .find(|m| m.name == p.master_target)
        .map(|m| m.host.clone())
        .filter(|h| rsite.content.hosts.iter().any(|x| &x.name == h))
        .or_else(|| rsite.content.hosts.first().map(|h| h.name.clone()));
    let Some(host) = host else {
        return Err(fail(errors::NOT_FOUND, format!("site {} has no host to run {}", rsite.site, p.machine)));
    };
    let primary = invs
        .iter()
        .find(|i| i.site == p.site)
        .and_then(|i| i.content.machines.iter().find(|m| m.name == p.machine))
        .cloned();
    Ok((rsite.clone(), host, primary))
}

/// A failed-over machine's name at its recovery site: its own inventory object and agent
/// identity, never the primary's.
pub fn recovery_machine_name(machine: &str, site: &str) -> String {
    format!("{machine}.{site}")
}

/// How long the machine at the recovery site may take to boot and report (RP-7).
const BOOT_LIMIT: Duration = Duration::from_secs(900);

impl Ops {
    /// A failover job failed at `step`. Before the fence nothing has failed over: the
    /// primary is released (its quiesce lifted: it takes writes and keeps replicating) and the
    /// machine is Protected again. From the fence on it stays as it is (a released primary would
    /// take writes the recovery site never holds): running the failover again resumes it.
    pub async fn failover_failed(
        &self,
        fj: &FailoverJob<'_>,
        step: usize,
        mut e: crate::jobs::JobError,
    ) -> crate::jobs::JobError {
        let before_fence =
            FailoverStep::of(fj.kind).iter().position(|s| *s == FailoverStep::AtPoint).is_some_and(|at| step < at);
        let fenced = match protection(&self.store, fj.machine).await {
            Ok((p, _)) => {
                replica_status(&self.store, &p.master_target, fj.machine).await.is_none_or(|r| r.fence.is_some())
            }
            Err(_) => true,
        };
        if !before_fence || fenced {
            e.message.push_str(" (the failover stands where it stopped: run it again to resume)");
            return e;
        }
        let m = fj.machine.to_owned();
        if let Err(err) = update_settings(&self.store, &format!("agent/{m}"), |b| b.quiesce = None).await {
            e.message.push_str(&format!(" (the primary's quiesce could not be lifted: {err})"));
            return e;
        }
        for _ in 0..20 {
            let Ok(Some(d)) = self.store.get::<Protection>(PROTECTION, &m).await else { break };
            let mut p = d.body;
            if p.failover.as_ref().is_none_or(|f| f.job != fj.job.id) {
                break;
            }
            p.failover = None;
            match self.store.put(PROTECTION, &m, &p, Some(d.revision)).await {
                Err(ferry_store::StoreError::Conflict { .. }) => continue,
                _ => break,
            }
        }
        e.message.push_str(&format!(
            " — nothing was fenced: {m} was released (it takes writes again and keeps replicating) and is Protected"
        ));
        e
    }

    /// Put the machine at the recovery site on its failed-over disks (the files and their
    /// UUIDs kept), give its agent those disks and the master target's seed (no process
    /// server: it tracks every write from its first), power it on and wait until it reports.
    async fn start_recovery_machine(&self, job: &Job, p: &Protection, power_on: bool, ctl: &JobControl) -> Outcome {
        let store = &self.store;
        let (rsite, host, primary) = match recovery_site(store, p).await {
            Ok(x) => x,
            Err(o) => return o,
        };
        // A failback (the failover of a reprotect's reverse protection): the original machine
        // boots from its own disks, which the reverse replica wrote (adopted at reprotect).
        let failback = p.reprotect.as_ref().filter(|r| r.location == "original");
        // An alternate-location failback makes the deleted machine anew, under its own name,
        // on the reverse replica's new disks.
        let alternate = p.reprotect.as_ref().filter(|r| r.location == "alternate");
        let rm = match failback.or(alternate) {
            Some(r) => r.of.clone(),
            None => recovery_machine_name(&p.machine, &rsite.site),
        };
        let folder = match failback.and_then(|r| r.primary_disks.first()).and_then(|d| d.path.parent()) {
            Some(f) => f.to_owned(),
            None => p.datastore_path.join(&p.machine),
        };
        let mut disks = Vec::new();
        let mut settings = Vec::new();
        for d in &p.disks {
            let path = match failback.and_then(|r| r.primary_disks.iter().find(|x| x.name == d.name)) {
                Some(x) => x.path.clone(),
                None => folder.join(format!("{}.img", d.name)),
            };
            let Ok(rel) = path.strip_prefix(&rsite.folder) else {
                return fail(
                    errors::NOT_FOUND,
                    format!("the failed-over disk {} lies outside site {}", path.display(), rsite.site),
                );
            };
            disks.push(crate::discovery::Disk {
                name: d.name.clone(),
                path: rel.to_owned(),
                uuid: d.uuid.clone(),
                size: None,
                allocated: None,
            });
            settings.push(ferry_api::control::DiskSetting {
                name: d.name.clone(),
                path,
                uuid: d.uuid.clone(),
                cache: None,
            });
        }
        let seed = folder.join(ferry_api::master_target::FAILOVER_SEED_FILE);
        let writes = folder.join(ferry_api::master_target::RECOVERY_WRITES_FILE);
        let r = update_settings(store, &format!("agent/{rm}"), move |b| {
            b.disks = Some(settings.clone());
            b.process_server = None;
            b.process_server_name = None;
            b.other.insert("failover_seed".into(), serde_json::json!(seed));
            b.other.insert("recovery_writes_file".into(), serde_json::json!(writes));
        })
        .await;
        if let Err(e) = r {
            return fail(errors::STORE, e);
        }
        let doc: Option<ferry_store::Doc<crate::ops::Site>> = match store.get(crate::ops::SITE, &rsite.site).await {
            Ok(d) => d,
            Err(e) => return fail(errors::STORE, e.to_string()),
        };
        let Some(site) = doc.map(|d| d.body) else {
            return fail(errors::NOT_FOUND, format!("site {} is not defined any more", rsite.site));
        };
        let provider = crate::provider::for_site(&site.name, &site.path, &self.power_programs);
        // A failback's machine exists (it stayed off since the reprotect); any other is adopted
        // on the failed-over disks.
        if failback.is_none() {
            let adopt = crate::discovery::SiteOperation::AdoptMachine {
                machine: rm.clone(),
                host,
                os_family: primary.as_ref().map(|m| m.os_family.clone()).unwrap_or_else(|| p.os_family.clone()),
                disks,
                extra: primary.map(|m| m.extra).unwrap_or_default(),
            };
            if let Err(e) = provider.operate(adopt).await {
                return fail(ferry_types::HasErrorCode::error_code(&e), e.to_string());
            }
        }
        // The original machine failed over from this site once: booting it is the failback.
        let on = crate::discovery::SiteOperation::PowerOn {
            machine: rm.clone(),
            allow_failed_over: failback.is_some() || alternate.is_some(),
        };
        // A report from before this power-on (the machine ran until a change of point shut it
        // down) is not a boot.
        let powered_ms = now_ms();
        if power_on {
            if let Err(e) = provider.operate(on).await {
                // Resumed after a restart: it may be running already.
                if !e.to_string().contains("already running") && !self.powered_on(&rsite.site, &rm).await {
                    return fail(ferry_types::HasErrorCode::error_code(&e), e.to_string());
                }
            }
        }
        if let Ok(inv) = provider.discover().await {
            let _ = store.put(crate::ops::INVENTORY, &inv.site, &inv, None).await;
        }
        let (rm2, site_name) = (rm.clone(), rsite.site.clone());
        if let o @ Outcome::Failed(_) = update_failover(store, job, &p.machine, move |f| {
            f.recovery_machine = Some(rm2.clone());
            f.recovery_site = Some(site_name.clone());
        })
        .await
        {
            return o;
        }
        if !power_on {
            return Outcome::Done(Some(format!(
                "{rm} is on site {} on the failed-over disks, powered off as asked (power it on with the site operation)",
                rsite.site
            )));
        }
        let deadline = tokio::time::Instant::now() + BOOT_LIMIT;
        loop {
            let booted = component(store, ComponentKind::Agent, &rm)
                .await
                .filter(|c| c.last_seen_ms.is_some_and(|t| t >= powered_ms))
                .and_then(|c| c.status)
                .and_then(|st| st.agent().cloned());
            if let Some(a) = booted.filter(|a| a.mode == ferry_api::agent::Mode::Tracking) {
                let tracked: u64 = a.disks.iter().map(|d| d.resync_pending_bytes).sum();
                return Outcome::Done(Some(format!(
                    "{rm} runs at site {} on the failed-over disks; its agent tracks every write ({tracked} byte(s) changed since the point, counted from the master target's seed)",
                    rsite.site
                )));
            }
            if tokio::time::Instant::now() >= deadline {
                return fail(
                    errors::MACHINE_NOT_ACCESSIBLE,
                    format!("{rm} did not report from site {} within {BOOT_LIMIT:?}: see its guest's log", rsite.site),
                );
            }
            if !pause(ctl, Duration::from_millis(300)).await {
                return fail(errors::JOB_STATE, format!("the job was cancelled while {rm} boots"));
            }
        }
    }

    /// A retried planned failover whose earlier run got past the drain (the primary may be off
    /// now): the replica is fenced and its journal holds the primary's last write.
    async fn drained_before(&self, p: &Protection) -> bool {
        let Some(last) = p.failover.as_ref().and_then(|f| f.primary_last_seq) else { return false };
        let r = replica_status(&self.store, &p.master_target, &p.machine).await;
        r.is_some_and(|r| r.fence.is_some() && r.journaled_seq >= last)
    }

    /// Whether the site's inventory (refreshed after every provider operation) shows the
    /// machine powered on.
    pub(crate) async fn powered_on(&self, site: &str, machine: &str) -> bool {
        let inv: Option<ferry_store::Doc<crate::discovery::Inventory>> =
            self.store.get(crate::ops::INVENTORY, site).await.ok().flatten();
        inv.is_some_and(|i| i.body.content.machines.iter().any(|m| m.name == machine && m.power == "on"))
    }

    /// The provider of a defined site.
    pub(crate) async fn provider_of(&self, site: &str) -> Result<Box<dyn crate::provider::SiteProvider>, String> {
        let doc: Option<ferry_store::Doc<crate::ops::Site>> =
            self.store.get(crate::ops::SITE, site).await.map_err(|e| e.to_string())?;
        let site = doc.ok_or_else(|| format!("site {site} is not defined any more"))?.body;
        Ok(crate::provider::for_site(&site.name, &site.path, &self.power_programs))
    }

    /// Power a machine off through its site's provider, then refresh the site's inventory.
    pub(crate) async fn shut_down(&self, site: &str, machine: &str) -> Result<String, String> {
        let provider = self.provider_of(site).await?;
        let op = crate::discovery::SiteOperation::PowerOff { machine: machine.to_owned() };
        let msg = provider.operate(op).await.map_err(|e| e.to_string())?;
        if let Ok(inv) = provider.discover().await {
            let _ = self.store.put(crate::ops::INVENTORY, &inv.site, &inv, None).await;
        }
        Ok(msg)
    }

    pub async fn failover_step(&self, fj: &FailoverJob<'_>, step: usize, ctl: &JobControl) -> Outcome {
        let store = &self.store;
        let (job, m) = (fj.job, fj.machine);
        let (p, _) = match protection(store, m).await {
            Ok(x) => x,
            Err(o) => return o,
        };
        let fresh_ms = 30_000;
        match FailoverStep::of(fj.kind).get(step).copied() {
            Some(FailoverStep::Check) => {
                let Some(r) = replica_status(store, &p.master_target, m).await else {
                    return fail(
                        errors::MT_HEARTBEAT_LOST,
                        format!(
                            "master target {} reports no replica of {m}: check that it runs and is linked (`ferry components`)",
                            p.master_target
                        ),
                    );
                };
                if r.fence.is_none() && !r.consistent {
                    return fail(
                        errors::FAILOVER_STATE,
                        format!(
                            "the replica of {m} is not consistent ({}): it cannot fail over until its resync ends",
                            r.mode
                        ),
                    );
                }
                if fj.kind == FailoverKind::Planned {
                    let quiesced = p.failover.as_ref().and_then(|f| f.primary_last_seq).is_some() || r.fence.is_some();
                    match agent_status(store, m, fresh_ms).await {
                        Some(a) if a.mode == ferry_api::agent::Mode::Replicating && a.initial_sync_complete => {}
                        _ if quiesced => {}
                        Some(a) => {
                            return fail(
                                errors::FAILOVER_STATE,
                                format!(
                                    "a planned failover needs {m} replicating; its agent is in {} mode: wait until it is caught up, or fail over unplanned",
                                    a.mode.as_str()
                                ),
                            )
                        }
                        None => {
                            return fail(
                                errors::MACHINE_NOT_ACCESSIBLE,
                                format!(
                                    "the agent of {m} has not reported for {} s: a planned failover needs the primary running; fail over unplanned if it is lost",
                                    fresh_ms / 1000
                                ),
                            )
                        }
                    }
                }
                Outcome::Done(Some(format!(
                    "{} holds {m} up to seq {} (applied {})",
                    p.master_target, r.journaled_seq, r.applied_seq
                )))
            }
            Some(FailoverStep::Quiesce) | Some(FailoverStep::Drain) if self.drained_before(&p).await => {
                Outcome::Done(Some(format!(
                    "an earlier run of this failover quiesced {m} and drained it: {} holds its last write (seq {})",
                    p.master_target,
                    p.failover.as_ref().and_then(|f| f.primary_last_seq).unwrap_or(0)
                )))
            }
            Some(FailoverStep::Quiesce) => {
                let order = format!("{}/quiesce", job.id);
                let o = order.clone();
                if let Err(e) = update_settings(store, &format!("agent/{m}"), move |b| {
                    b.quiesce = Some(QuiesceOrder { order: o.clone() });
                })
                .await
                {
                    return fail(errors::STORE, e);
                }
                let deadline = tokio::time::Instant::now() + QUIESCE_LIMIT;
                let q = loop {
                    if let Some(q) =
                        agent_status(store, m, fresh_ms).await.and_then(|a| a.quiesced).filter(|q| q.order == order)
                    {
                        break q;
                    }
                    if tokio::time::Instant::now() >= deadline {
                        return fail(
                            errors::MACHINE_NOT_ACCESSIBLE,
                            format!(
                                "the agent of {m} did not report quiesced within {QUIESCE_LIMIT:?}: check it runs (`ferry machines`), then run the failover again"
                            ),
                        );
                    }
                    if !pause(ctl, Duration::from_millis(300)).await {
                        return fail(errors::JOB_STATE, "the job was cancelled (the agent stays quiesced)");
                    }
                };
                let last = q.last_seq;
                if let o @ Outcome::Failed(_) =
                    update_failover(store, job, m, |f| f.primary_last_seq = f.primary_last_seq.max(Some(last))).await
                {
                    return o;
                }
                Outcome::Done(Some(match &q.message {
                    None => format!("{m} took its last write at seq {last} (its applications are frozen)"),
                    Some(msg) => format!("{m} took its last write at seq {last} ({msg})"),
                }))
            }
            Some(FailoverStep::Drain) => {
                let deadline = tokio::time::Instant::now() + Duration::from_secs(fj.drain_secs);
                let mut total = 0u64;
                loop {
                    let a = agent_status(store, m, fresh_ms).await;
                    let r = replica_status(store, &p.master_target, m).await;
                    if let (Some(a), Some(r)) = (&a, &r) {
                        if let Some(q) = a.quiesced.as_ref().filter(|q| q.order == format!("{}/quiesce", job.id)) {
                            let pending = a.pending_log_bytes + a.resync_pending_bytes + a.initial_sync_in_flight_bytes;
                            total = total.max(pending);
                            ctl.bytes(total - pending, total);
                            // The agent's newest record now (a resync after a restart adds
                            // some), not only the one it quiesced at.
                            let last = q.last_seq.max(a.last_seq);
                            let held = a.master_target_durable_seq >= last
                                && r.journaled_seq >= last
                                && a.pending_log_records == 0
                                && a.resync_pending_bytes == 0
                                && a.initial_sync_in_flight_bytes == 0
                                && a.resync.is_none()
                                && a.mode == ferry_api::agent::Mode::Replicating;
                            if held {
                                if let o @ Outcome::Failed(_) = update_failover(store, job, m, |f| {
                                    f.primary_last_seq = f.primary_last_seq.max(Some(last))
                                })
                                .await
                                {
                                    return o;
                                }
                                return Outcome::Done(Some(format!(
                                    "master target {} holds every write of {m} (seq {last}); nothing is pending at the agent",
                                    p.master_target
                                )));
                            }
                        }
                    }
                    if tokio::time::Instant::now() >= deadline {
                        let why = match (&a, &r) {
                            (None, _) => format!("the agent of {m} does not report"),
                            (_, None) => format!("master target {} does not report {m}", p.master_target),
                            (Some(a), Some(r)) => format!(
                                "the agent's last write is seq {}, the master target holds seq {} (the agent has {} byte(s) pending, mode {}{})",
                                a.quiesced.as_ref().map_or(a.last_seq, |q| q.last_seq),
                                r.journaled_seq,
                                a.pending_log_bytes + a.resync_pending_bytes,
                                a.mode.as_str(),
                                a.link_error.as_deref().map(|e| format!(", link: {e}")).unwrap_or_default()
                            ),
                        };
                        return fail(
                            errors::DRAIN_INCOMPLETE,
                            format!(
                                "the recovery site did not receive every write of {m} within {} s: {why}",
                                fj.drain_secs
                            ),
                        );
                    }
                    if !pause(ctl, Duration::from_millis(300)).await {
                        return fail(
                            errors::JOB_STATE,
                            "the job was cancelled while draining (the agent stays quiesced)",
                        );
                    }
                }
            }
            Some(FailoverStep::ShutDownPrimary) => {
                let r = self.shut_down(&p.site, m).await;
                let said = match (&r, fj.kind) {
                    (Ok(msg), _) => msg.clone(),
                    (Err(e), FailoverKind::Planned) => {
                        return fail(
                            errors::MACHINE_NOT_ACCESSIBLE,
                            format!("{m} could not be shut down at site {}: {e}; shut it down, then run the failover again", p.site),
                        )
                    }
                    (Err(e), FailoverKind::Unplanned) => format!(
                        "{m} could not be shut down at site {} ({e}): continuing; keep it off — its replica is fenced, so nothing it writes reaches the failed-over disks",
                        p.site
                    ),
                };
                let s2 = said.clone();
                if let o @ Outcome::Failed(_) = update_failover(store, job, m, |f| f.primary = Some(s2.clone())).await {
                    return o;
                }
                Outcome::Done(Some(said))
            }
            Some(FailoverStep::AtPoint) => {
                // An earlier run of this failover put the disks at a point already: taking it
                // again would be a change of point (undoing what the machine wrote since).
                let earlier = replica_status(store, &p.master_target, m)
                    .await
                    .and_then(|r| r.failover)
                    .filter(|f| f.phase != FailoverPhase::Restoring);
                let f = match earlier {
                    Some(f) => f,
                    None => {
                        let order = FailoverOrder {
                            order: format!("{}/at-point", job.id),
                            point: fj.point.to_owned(),
                            reason: fj.reason.to_owned(),
                            commit: false,
                            cancel: false,
                        };
                        match order_master_target(store, ctl, &p, order).await {
                            Ok(f) => f,
                            Err(o) => return o,
                        }
                    }
                };
                let last = p.failover.as_ref().and_then(|f| f.primary_last_seq);
                if fj.kind == FailoverKind::Planned {
                    if let Some(last) = last.filter(|l| f.point.seq < *l) {
                        return fail(
                            errors::DRAIN_INCOMPLETE,
                            format!(
                                "the failed-over disks of {m} hold seq {}, before the primary's last write (seq {last}): run the failover again",
                                f.point.seq
                            ),
                        );
                    }
                }
                let said = describe_discarded(&f);
                let o = update_failover(store, job, m, |pf| {
                    pf.point = Some(f.point.clone());
                    pf.handed_over_seq = Some(f.handed_over_seq);
                    pf.discarded = Some(f.discarded.clone());
                })
                .await;
                if let Outcome::Failed(_) = o {
                    return o;
                }
                Outcome::Done(Some(said))
            }
            Some(FailoverStep::StartAtRecovery) => self.start_recovery_machine(job, &p, !fj.no_start, ctl).await,
            Some(FailoverStep::MarkFailedOver) => {
                if fj.kind == FailoverKind::Planned {
                    // The fence keeps the old primary out now; should the operator power it on
                    // (explicitly), it runs as an independent copy rather than a frozen one.
                    if let Err(e) = update_settings(store, &format!("agent/{m}"), |b| b.quiesce = None).await {
                        return fail(errors::STORE, e);
                    }
                }
                let o = update_failover(store, job, m, |pf| pf.stage = FailoverStage::FailedOver).await;
                if let Outcome::Failed(_) = o {
                    return o;
                }
                let point =
                    p.failover.as_ref().and_then(|f| f.point.as_ref()).map(|p| p.id.clone()).unwrap_or_default();
                let _ = store
                    .add_event(
                        0,
                        "info",
                        &format!("agent/{m}"),
                        &format!("{m} failed over ({}) to {point}: commit it, or change its point", kind_name(fj.kind)),
                    )
                    .await;
                Outcome::Done(Some(format!("{m} failed over to {point} (uncommitted)")))
            }
            Some(FailoverStep::Commit) | None => fail(errors::JOB_STATE, format!("failover job has no step {step}")),
        }
    }

    pub async fn change_point_step(
        &self,
        job: &Job,
        machine: &str,
        point: &str,
        step: usize,
        ctl: &JobControl,
    ) -> Outcome {
        let (p, _) = match protection(&self.store, machine).await {
            Ok(x) => x,
            Err(o) => return o,
        };
        let Some(pf) = p.failover.clone() else {
            return fail(errors::FAILOVER_STATE, format!("{machine} is not failed over"));
        };
        match step {
            0 => match pf.stage {
                FailoverStage::FailedOver => Outcome::Done(Some(format!(
                    "{machine} is at {}",
                    pf.point.as_ref().map(|p| p.id.as_str()).unwrap_or("?")
                ))),
                FailoverStage::Committed => {
                    fail(errors::FAILOVER_STATE, format!("the failover of {machine} is committed"))
                }
                FailoverStage::InProgress => {
                    fail(errors::FAILOVER_STATE, format!("the failover of {machine} did not finish"))
                }
            },
            1 => match (&pf.recovery_machine, &pf.recovery_site) {
                (Some(rm), Some(site)) => {
                    // Decided once per job, before the shutdown: a resumed step must not see the
                    // machine off (its own doing) and leave it off.
                    if pf.restart_decided_by.as_deref() != Some(job.id.as_str()) {
                        let running = self.powered_on(site, rm).await;
                        let id = job.id.clone();
                        let o = update_failover(&self.store, job, machine, move |f| {
                            f.restart_recovery_machine = running;
                            f.restart_decided_by = Some(id.clone());
                        })
                        .await;
                        if let Outcome::Failed(_) = o {
                            return o;
                        }
                    }
                    match self.shut_down(site, rm).await {
                    Ok(msg) => Outcome::Done(Some(msg)),
                    Err(e) => fail(
                        errors::MACHINE_NOT_ACCESSIBLE,
                        format!("{rm} could not be shut down at site {site}: {e}; shut it down, then change the point again"),
                    ),
                }
                }
                _ => Outcome::Done(Some(format!("{machine} was not started at the recovery site"))),
            },
            3 => match pf.recovery_machine {
                Some(_) => self.start_recovery_machine(job, &p, pf.restart_recovery_machine, ctl).await,
                None => Outcome::Done(Some(format!("{machine} was not started at the recovery site"))),
            },
            2 => {
                let order = FailoverOrder {
                    order: format!("{}/at-point", job.id),
                    point: point.to_owned(),
                    reason: pf.reason.clone(),
                    commit: false,
                    cancel: false,
                };
                let f = match order_master_target(&self.store, ctl, &p, order).await {
                    Ok(f) => f,
                    Err(o) => return o,
                };
                let said = describe_discarded(&f);
                let o = update_failover(&self.store, job, machine, |pf| {
                    pf.point = Some(f.point.clone());
                    pf.discarded = Some(f.discarded.clone());
                })
                .await;
                if let Outcome::Failed(_) = o {
                    return o;
                }
                Outcome::Done(Some(said))
            }
            _ => fail(errors::JOB_STATE, format!("change-point job has no step {step}")),
        }
    }

    pub async fn commit_step(&self, job: &Job, machine: &str, step: usize, ctl: &JobControl) -> Outcome {
        let (p, _) = match protection(&self.store, machine).await {
            Ok(x) => x,
            Err(o) => return o,
        };
        let Some(pf) = p.failover.clone() else {
            return fail(errors::FAILOVER_STATE, format!("{machine} is not failed over"));
        };
        let Some(point) = pf.point.clone() else {
            return fail(errors::FAILOVER_STATE, format!("the failover of {machine} has no point"));
        };
        match step {
            0 => match pf.stage {
                FailoverStage::FailedOver => Outcome::Done(Some(format!("{machine} is at {}", point.id))),
                FailoverStage::Committed => {
                    fail(errors::FAILOVER_STATE, format!("the failover of {machine} is already committed"))
                }
                FailoverStage::InProgress => {
                    fail(errors::FAILOVER_STATE, format!("the failover of {machine} did not finish"))
                }
            },
            1 => {
                let order = FailoverOrder {
                    order: format!("{}/commit", job.id),
                    point: point.id.clone(),
                    reason: pf.reason.clone(),
                    commit: true,
                    cancel: false,
                };
                let f = match order_master_target(&self.store, ctl, &p, order).await {
                    Ok(f) => f,
                    Err(o) => return o,
                };
                if f.point.seq != point.seq {
                    return fail(
                        errors::FAILOVER_STATE,
                        format!(
                            "master target {} committed {machine} at {}, not at {} as recorded: see its status",
                            p.master_target, f.point.id, point.id
                        ),
                    );
                }
                let at = f.committed_ms;
                let o = update_failover(&self.store, job, machine, |pf| {
                    pf.stage = FailoverStage::Committed;
                    pf.committed_ms = at.or(Some(now_ms()));
                })
                .await;
                if let Outcome::Failed(_) = o {
                    return o;
                }
                let _ = self
                    .store
                    .add_event(
                        0,
                        "info",
                        &format!("agent/{machine}"),
                        &format!("failover of {machine} to {} committed", point.id),
                    )
                    .await;
                Outcome::Done(Some(format!("the failover of {machine} to {} is committed", point.id)))
            }
            _ => fail(errors::JOB_STATE, format!("commit job has no step {step}")),
        }
    }
}

/// How long the primary may take to boot and replicate again after a cancel.
const RELEASE_LIMIT: Duration = Duration::from_secs(900);

impl Ops {
    /// The steps of a cancel (see `cancel_steps`). Each is idempotent: a restarted server
    /// resumes at the step it was in; the master target's order is carried out once.
    pub async fn cancel_step(
        &self,
        job: &Job,
        machine: &str,
        no_start: bool,
        by: &str,
        step: usize,
        ctl: &JobControl,
    ) -> Outcome {
        let store = &self.store;
        let (p, _) = match protection(store, machine).await {
            Ok(x) => x,
            Err(o) => return o,
        };
        let Some(pf) = p.failover.clone().filter(|f| f.job == job.id) else {
            // Only the last step removes the failover: a resumed job past it is done.
            if step == 5 && p.cancelled_failover.as_ref().is_some_and(|c| c.job == job.id) {
                return Outcome::Done(Some(format!("{machine} is protected again")));
            }
            return fail(
                errors::FAILOVER_STATE,
                format!("the failover record of {machine} no longer belongs to job {}: see `ferry machines`", job.id),
            );
        };
        let (rsite, _, _) = match recovery_site(store, &p).await {
            Ok(x) => x,
            Err(o) => return o,
        };
        let site = rsite.site.clone();
        let rm = recovery_machine_name(machine, &site);
        let on_site = rsite.content.machines.iter().any(|m| m.name == rm);
        let refused = if step == 0 {
            cancel_refused(replica_status(store, &p.master_target, machine).await.as_ref())
        } else {
            None
        };
        match step {
            0 => match pf.stage {
                FailoverStage::Committed => fail(
                    errors::FAILOVER_STATE,
                    format!("the failover of {machine} is committed: it cannot be cancelled (reprotect it)"),
                ),
                // Before anything is shut down: what the master target would refuse.
                _ if refused.is_some() => fail(
                    errors::FAILOVER_STATE,
                    format!("{machine} on master target {}: {}", p.master_target, refused.unwrap_or_default()),
                ),
                _ => Outcome::Done(Some(format!(
                    "the {} failover of {machine} is not committed ({}): it can be cancelled",
                    kind_name(pf.kind),
                    match &pf.point {
                        Some(pt) => format!("its disks are at {}", pt.id),
                        None => "its disks never reached a point".to_owned(),
                    }
                ))),
            },
            1 => {
                if !on_site {
                    return Outcome::Done(Some(format!("{rm} was never put on site {site}")));
                }
                if !self.powered_on(&site, &rm).await {
                    return Outcome::Done(Some(format!("{rm} is off")));
                }
                match self.shut_down(&site, &rm).await {
                    Ok(msg) => Outcome::Done(Some(msg)),
                    Err(e) => fail(
                        errors::MACHINE_NOT_ACCESSIBLE,
                        format!("{rm} could not be shut down at site {site}: {e}; shut it down, then cancel again"),
                    ),
                }
            }
            3 => {
                // Always ordered, also when the status shows no fence: it may be older than a
                // fence a cancelled failover's order still brings (the master target carries
                // out one order of a machine at a time, so the cancel comes after it).
                let order_id = format!("{}/cancel", job.id);
                let order = FailoverOrder {
                    order: order_id.clone(),
                    point: String::new(),
                    reason: format!("cancel of the failover of {machine} (job {})", job.id),
                    commit: false,
                    cancel: true,
                };
                let done = move |r: &ReplicaStatus| {
                    r.failover_cancelled
                        .clone()
                        .filter(|c| c.order.as_deref() == Some(order_id.as_str()) && r.fence.is_none())
                };
                let c = match order_and_wait(store, ctl, &p, order, done).await {
                    Ok(c) => c,
                    Err(o) => return o,
                };
                let record = ferry_api::config_server::ProtectionCancelledFailover {
                    job: job.id.clone(),
                    kind: pf.kind,
                    point: c.point.clone(),
                    restored_seq: c.restored_seq,
                    recovery_write_bytes: c.recovery_write_bytes,
                    recovery_write_extents: c.recovery_writes.len() as u64,
                    cancelled_ms: c.at_ms,
                    by: by.to_owned(),
                };
                if let o @ Outcome::Failed(_) = set_cancel_record(store, job, machine, record).await {
                    return o;
                }
                if c.fence.is_none() {
                    return Outcome::Done(Some(format!(
                        "master target {} never fenced {machine}: its replica takes the primary's stream as before",
                        p.master_target
                    )));
                }
                Outcome::Done(Some(format!(
                    "the replica of {machine} holds seq {} again (the primary's last write it received; {} byte(s) put back); discarded: {} byte(s) in {} extent(s) the machine wrote at the recovery site; the fence is lifted",
                    c.restored_seq,
                    c.restored_bytes,
                    c.recovery_write_bytes,
                    c.recovery_writes.len()
                )))
            }
            2 => {
                let mut said = Vec::new();
                if on_site {
                    let provider = match self.provider_of(&site).await {
                        Ok(x) => x,
                        Err(e) => return fail(errors::NOT_FOUND, e),
                    };
                    let op = crate::discovery::SiteOperation::ReleaseMachine { machine: rm.clone() };
                    match provider.operate(op).await {
                        Ok(m) => said.push(m),
                        Err(e) => return fail(ferry_types::HasErrorCode::error_code(&e), e.to_string()),
                    }
                    if let Ok(inv) = provider.discover().await {
                        let _ = store.put(crate::ops::INVENTORY, &inv.site, &inv, None).await;
                    }
                }
                match retire_agent(store, &rm, &format!("the failover of {machine} was cancelled (job {})", job.id))
                    .await
                {
                    Ok(m) => said.push(m),
                    Err(e) => return fail(errors::STORE, e),
                }
                Outcome::Done(Some(said.join("; ")))
            }
            4 => {
                if let Err(e) = update_settings(store, &format!("agent/{machine}"), |b| b.quiesce = None).await {
                    return fail(errors::STORE, e);
                }
                if no_start && !self.powered_on(&p.site, machine).await {
                    return Outcome::Done(Some(format!(
                        "{machine}'s quiesce is lifted; it stays off at site {} as asked (power it on to replicate)",
                        p.site
                    )));
                }
                let since = now_ms();
                if !self.powered_on(&p.site, machine).await {
                    let provider = match self.provider_of(&p.site).await {
                        Ok(x) => x,
                        Err(e) => return fail(errors::NOT_FOUND, e),
                    };
                    let on = crate::discovery::SiteOperation::PowerOn {
                        machine: machine.to_owned(),
                        allow_failed_over: true,
                    };
                    if let Err(e) = provider.operate(on).await {
                        if !e.to_string().contains("already running") {
                            return fail(
                                ferry_types::HasErrorCode::error_code(&e),
                                format!(
                                    "{machine} could not be started at site {}: {e}; start it, then cancel again",
                                    p.site
                                ),
                            );
                        }
                    }
                    if let Ok(inv) = provider.discover().await {
                        let _ = store.put(crate::ops::INVENTORY, &inv.site, &inv, None).await;
                    }
                }
                let deadline = tokio::time::Instant::now() + RELEASE_LIMIT;
                loop {
                    let a = component(store, ComponentKind::Agent, machine)
                        .await
                        .filter(|c| c.last_seen_ms.is_some_and(|t| t >= since))
                        .and_then(|c| c.status)
                        .and_then(|st| st.agent().cloned());
                    let r = replica_status(store, &p.master_target, machine).await;
                    if let (Some(a), Some(r)) = (&a, &r) {
                        if a.quiesced.is_none() && a.mode == ferry_api::agent::Mode::Replicating && r.fence.is_none() {
                            return Outcome::Done(Some(format!(
                                "{machine} runs at site {} and replicates to {} again (the master target holds seq {})",
                                p.site, p.master_target, r.journaled_seq
                            )));
                        }
                    }
                    if tokio::time::Instant::now() >= deadline {
                        return fail(
                            errors::MACHINE_NOT_ACCESSIBLE,
                            format!(
                                "{machine} did not report replicating (unquiesced) within {RELEASE_LIMIT:?}: see `ferry machines` and its agent's log, then cancel again"
                            ),
                        );
                    }
                    if !pause(ctl, Duration::from_millis(300)).await {
                        return fail(errors::JOB_STATE, format!("the job was cancelled while {machine} starts"));
                    }
                }
            }
            5 => {
                for _ in 0..20 {
                    let (mut p, rev) = match protection(store, machine).await {
                        Ok(x) => x,
                        Err(o) => return o,
                    };
                    if p.failover.as_ref().is_none_or(|f| f.job != job.id) {
                        break;
                    }
                    p.failover = None;
                    match store.put(PROTECTION, machine, &p, Some(rev)).await {
                        Ok(_) => break,
                        Err(ferry_store::StoreError::Conflict { .. }) => continue,
                        Err(e) => return fail(errors::STORE, e.to_string()),
                    }
                }
                let _ = store
                    .add_event(
                        0,
                        "info",
                        &format!("agent/{machine}"),
                        &format!("the failover of {machine} was cancelled: it is protected again"),
                    )
                    .await;
                Outcome::Done(Some(format!("{machine} is protected again (its failover cancelled)")))
            }
            _ => fail(errors::JOB_STATE, format!("cancel job has no step {step}")),
        }
    }
}

/// Why the master target would refuse to cancel, from its status (none: it would not).
fn cancel_refused(r: Option<&ReplicaStatus>) -> Option<String> {
    // Nothing to put back without the replica (deleted, or its master target not reporting it):
    // refused before anything is shut down.
    let Some(r) = r else {
        return Some("the master target reports no replica of the machine: a cancel puts the replica back, so it needs it (is the master target running and linked?)".into());
    };
    if r.failover.as_ref().is_some_and(|f| f.phase == FailoverPhase::Committed) {
        return Some("the failover is committed there: it cannot be cancelled (reprotect the machine)".into());
    }
    let f = r.fence.as_ref()?;
    if !f.handed_over {
        return Some(format!("fenced at seq {}, not applied that far yet: cancel again in a moment", f.at_seq));
    }
    (f.applied_seq != f.at_seq).then(|| {
        format!(
            "fenced inside a resync (disks at seq {}, journal at seq {}): the primary's resync cannot resume; commit and reprotect",
            f.applied_seq, f.at_seq
        )
    })
}

/// Keep the cancel's report on the protection record (the failover record stays until the
/// last step: until then the machine counts as failed over).
async fn set_cancel_record(
    store: &Store,
    job: &Job,
    machine: &str,
    record: ferry_api::config_server::ProtectionCancelledFailover,
) -> Outcome {
    for _ in 0..20 {
        let (mut p, rev) = match protection(store, machine).await {
            Ok(x) => x,
            Err(o) => return o,
        };
        if p.failover.as_ref().is_none_or(|f| f.job != job.id) {
            return fail(
                errors::FAILOVER_STATE,
                format!("the failover record of {machine} no longer belongs to job {}", job.id),
            );
        }
        p.cancelled_failover = Some(record.clone());
        match store.put(PROTECTION, machine, &p, Some(rev)).await {
            Ok(_) => return Outcome::Done(None),
            Err(ferry_store::StoreError::Conflict { .. }) => continue,
            Err(e) => return fail(errors::STORE, e.to_string()),
        }
    }
    fail(errors::STORE, format!("the protection of {machine} kept changing under job {}", job.id))
}

/// Retire an agent identity that is gone for good (a recovery-site machine removed): its
/// certificate revoked, its tokens, component record and settings deleted. Idempotent.
pub(crate) async fn retire_agent(store: &Store, name: &str, reason: &str) -> Result<String, String> {
    let key = format!("{}/{name}", ComponentKind::Agent);
    let comp = component(store, ComponentKind::Agent, name).await;
    let mut said = Vec::new();
    if let Some(serial) = comp.as_ref().and_then(|c| c.certificate_serial.clone()) {
        crate::revocation::revoke(store, &serial, reason).await.map_err(|e| e.message)?;
        said.push(format!("certificate {serial} revoked"));
    }
    for t in store.tokens().await.map_err(|e| e.to_string())? {
        if t.role == "component" && t.name == key {
            store.delete_token(&t.id).await.map_err(|e| e.to_string())?;
        }
    }
    store.delete(crate::registration::COMPONENT, &key).await.map_err(|e| e.to_string())?;
    store.delete(crate::settings::SETTINGS, &key).await.map_err(|e| e.to_string())?;
    if said.is_empty() {
        said.push("it never registered".into());
    }
    Ok(format!("agent identity {key} retired ({})", said.join(", ")))
}

/// The state `ferry machines` shows for a machine with a failover./// The state `ferry machines` shows for a machine with a failover.
pub async fn failover_view(store: &Store, f: &ProtectionFailover) -> Result<String, ferry_store::StoreError> {
    let job = store.job::<Job>(&f.job).await?;
    if let Some(j) = job.as_ref().filter(|j| j.kind == "failover-cancel") {
        return Ok(if j.state.finished() { "failover cancel failed" } else { "failover cancelling" }.into());
    }
    Ok(match f.stage {
        FailoverStage::InProgress => match job {
            Some(j) if !j.state.finished() => "failover in progress".into(),
            _ => "failover failed".into(),
        },
        FailoverStage::FailedOver => "failed over (uncommitted)".into(),
        FailoverStage::Committed => "failed over (committed)".into(),
    })
}

/// A failed-over machine's health: whether its master target reports the failover the record
/// holds (the disks at the recorded point, not fenced away by something else).
pub async fn failover_health(
    store: &Store,
    p: &Protection,
    f: &ProtectionFailover,
) -> (ferry_api::control::Health, Vec<ferry_api::control::HealthReason>) {
    use ferry_api::control::{Health, HealthReason};
    let reason = |code: errors::ErrorCode, message: String| HealthReason {
        code: code.code,
        message,
        remedy: code.remedy.to_owned(),
    };
    let r = replica_status(store, &p.master_target, &p.machine).await;
    match (f.stage, r) {
        (_, None) => (
            Health::Critical,
            vec![reason(
                errors::MT_HEARTBEAT_LOST,
                format!("master target {} does not report the failed-over disks of {}", p.master_target, p.machine),
            )],
        ),
        (FailoverStage::InProgress, Some(r)) => match store.job::<Job>(&f.job).await.ok().flatten() {
            Some(j) if j.state == crate::jobs::JobState::Failed => (
                Health::Critical,
                vec![reason(
                    j.error
                        .as_ref()
                        .and_then(|e| ferry_types::codes::by_code(e.code))
                        .unwrap_or(errors::FAILOVER_STATE),
                    format!(
                        "failover job {} failed: {}",
                        f.job,
                        j.error.as_ref().map(|e| e.message.as_str()).unwrap_or("see the job")
                    ),
                )],
            ),
            _ if r.failover_order_error.is_some() => (
                Health::Warning,
                vec![reason(errors::FAILOVER_STATE, r.failover_order_error.map(|e| e.message).unwrap_or_default())],
            ),
            _ => (Health::Healthy, Vec::new()),
        },
        (_, Some(r)) => {
            let at = r.failover.as_ref().map(|x| x.point.seq);
            let want = f.point.as_ref().map(|x| x.seq);
            if at.is_some() && at == want {
                (Health::Healthy, Vec::new())
            } else {
                (
                    Health::Critical,
                    vec![reason(
                        errors::FAILOVER_STATE,
                        format!(
                            "master target {} reports the disks of {} at seq {at:?}, the record says {want:?}",
                            p.master_target, p.machine
                        ),
                    )],
                )
            }
        }
    }
}
