//! Test failover (RC-2): a drill of a protected machine at a recovery point while replication
//! goes on. The start job orders a writable export of the point from the machine's master
//! target (settings `machine_test_failovers`: a copy-on-write overlay over the point — the
//! replica, its journal and its disks are never written; the point stays pinned while the
//! order stands), then makes the test machine in an isolated test area at the recovery site: its
//! own inventory object `MACHINE.test` on the test network `test-MACHINE`, its disks the export
//! (network-attached, no disk files), no agent, never registered (it could not reach the
//! configuration server from the test network, and must never pass for the machine itself).
//! The cleanup job powers it off and removes it, withdraws the order (the export and its overlay
//! are discarded, the pin released) and records the drill: when, which point, result, who.
//!
//! One drill per machine at a time; a machine in a drill does not fail over (clean the drill up
//! first), and a failed-over machine has no drill. Every step is idempotent: a restarted
//! server resumes the job at its step.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::Json;
use ferry_api::config_server::{
    CleanupTestFailoverRequest, Drill, DrillResult, DrillState, ProtectionTestFailover, TestFailoverRequest,
};
use ferry_api::master_target::TestFailoverExport;
use ferry_store::Store;

use crate::errors::{self, ApiError};
use crate::failover::{check_point, failover_state_error, pause, protection, protection_of, replica_status, running};
use crate::http::{Body, Caller};
use crate::jobs::{now_ms, Job, JobControl, Outcome};
use crate::ops::{JobWork, Ops};
use crate::protection::{fail, update_settings, Protection, PROTECTION};
use crate::AppState;

/// Drill records (`drill/<id>`), kept after the cleanup.
pub const DRILL: &str = "drill";
/// How long the master target may take to export the point (it builds the point's index).
const EXPORT_LIMIT: Duration = Duration::from_secs(600);
/// How long the master target may take to discard the export after the order is withdrawn.
const RELEASE_LIMIT: Duration = Duration::from_secs(300);

/// The test machine of a drill of `machine`: its own inventory object, never the machine.
pub fn test_machine_name(machine: &str) -> String {
    format!("{machine}.test")
}

/// The isolated test network of a drill of `machine`.
pub fn test_network_name(machine: &str) -> String {
    format!("test-{machine}")
}

/// `GET /api/v1/drills`: every drill, running and past, oldest first.
pub async fn list(State(s): State<Arc<AppState>>) -> Result<Json<Vec<Drill>>, ApiError> {
    let mut v: Vec<Drill> = s.store.list::<Drill>(DRILL).await?.into_iter().map(|d| d.body).collect();
    v.sort_by(|a, b| a.started_ms.cmp(&b.started_ms).then(a.id.cmp(&b.id)));
    Ok(Json(v))
}

/// `POST /api/v1/test-failovers`.
pub async fn start(
    State(s): State<Arc<AppState>>,
    caller: Caller,
    Body(req): Body<TestFailoverRequest>,
) -> crate::http::ApiResult {
    let job = tokio::spawn(async move { claim_start(&s, &caller, req).await })
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, errors::JOB_STATE, e.to_string()))??;
    Ok((StatusCode::ACCEPTED, Json(job)).into_response())
}

async fn claim_start(s: &Arc<AppState>, caller: &Caller, req: TestFailoverRequest) -> Result<Job, ApiError> {
    let doc = protection_of(s, &req.machine).await?;
    let mut p = doc.body;
    let m = p.machine.clone();
    let state = crate::protection::effective_state(&s.store, &p).await?;
    if state != "protected" {
        return Err(failover_state_error(format!(
            "machine {m} is {state}, not protected: only a Protected machine has a test failover"
        )));
    }
    if let Some(f) = &p.failover {
        return Err(failover_state_error(format!(
            "machine {m} has a failover (job {}): a test failover drills a protected machine, not a failed-over one",
            f.job
        )));
    }
    if let Some(t) = &p.test_failover {
        return Err(failover_state_error(format!(
            "machine {m} is in test failover {} already: clean it up first (`ferry test-failover cleanup {m}`)",
            t.drill
        )));
    }
    let point = req.point.clone().unwrap_or_else(|| "latest-processed".to_owned());
    check_point(&point)?;
    let id = crate::jobs::Jobs::new_id();
    let drill = Drill {
        id: id.clone(),
        machine: m.clone(),
        state: DrillState::Starting,
        point_requested: point.clone(),
        point: None,
        master_target: p.master_target.clone(),
        site: None,
        network: test_network_name(&m),
        test_machine: None,
        nbd_urls: Vec::new(),
        started_ms: now_ms(),
        started_by: caller.token_name.clone(),
        start_job: id.clone(),
        cleanup_job: None,
        cleaned_up_ms: None,
        cleaned_up_by: None,
        result: None,
        notes: None,
        error: None,
        plan: None,
    };
    p.test_failover = Some(ProtectionTestFailover { drill: id.clone(), job: id.clone(), started_ms: drill.started_ms });
    let rev = put_claim(s, &p, doc.revision).await?;
    s.store.put(DRILL, &id, &drill, None).await?;
    let steps = vec![
        (format!("check that {m} is protected and its master target {} holds its replica", p.master_target), true),
        (
            format!(
                "export point {point} of {m} writable at master target {} (the replica is not written; replication goes on)",
                p.master_target
            ),
            true,
        ),
        if req.no_start {
            ("leave the test machine off (asked): attach the export yourself".to_owned(), true)
        } else {
            (
                format!(
                    "start test machine {} in test network {} on the export (no agent, never registered as {m})",
                    test_machine_name(&m),
                    test_network_name(&m)
                ),
                true,
            )
        },
        ("record the drill as running".to_owned(), true),
    ];
    let work = JobWork::TestFailover { machine: m.clone(), drill: id.clone(), point, no_start: req.no_start };
    start_claimed(s, id, &p, rev, work, steps).await
}

async fn put_claim(s: &AppState, p: &Protection, rev: i64) -> Result<i64, ApiError> {
    s.store.put(PROTECTION, &p.machine, p, Some(rev)).await.map_err(|e| match e {
        ferry_store::StoreError::Conflict { .. } => {
            failover_state_error(format!("machine {} changed under this request: retry", p.machine))
        }
        e => e.into(),
    })
}

/// Start a job claimed on the protection record; a failed start gives the claim back.
async fn start_claimed(
    s: &Arc<AppState>,
    id: String,
    p: &Protection,
    rev: i64,
    work: JobWork,
    steps: Vec<(String, bool)>,
) -> Result<Job, ApiError> {
    let (kind, params) = work.split()?;
    match s.jobs.start_with_id(id, s.ops.clone(), kind, &p.machine, steps, params).await {
        Ok(j) => Ok(j),
        Err(e) => {
            let mut back = p.clone();
            if let Some(t) = back.test_failover.as_mut() {
                t.job = format!("{} (not started)", t.job);
            }
            let _ = s.store.put(PROTECTION, &p.machine, &back, Some(rev)).await;
            Err(e.into())
        }
    }
}

/// A drill's notes: at most 2000 characters, no control characters but newlines.
pub(crate) fn check_notes(notes: Option<&str>) -> Result<(), ApiError> {
    match notes {
        Some(n) if n.chars().count() > 2000 || n.chars().any(|c| c.is_control() && c != '\n') => {
            Err(ApiError::bad("notes: at most 2000 characters, no control characters but newlines"))
        }
        _ => Ok(()),
    }
}

/// `POST /api/v1/machines/{name}/test-failover/cleanup`.
pub async fn cleanup(
    State(s): State<Arc<AppState>>,
    caller: Caller,
    Path(machine): Path<String>,
    Body(req): Body<CleanupTestFailoverRequest>,
) -> crate::http::ApiResult {
    check_notes(req.notes.as_deref())?;
    let job = tokio::spawn(async move {
        let doc = protection_of(&s, &machine).await?;
        let mut p = doc.body;
        let Some(t) = p.test_failover.as_mut() else {
            return Err(failover_state_error(format!(
                "machine {machine} is in no test failover: there is nothing to clean up (`ferry drills` lists past drills)"
            )));
        };
        if running(&s.store, &t.job).await? {
            return Err(failover_state_error(format!(
                "job {} is working on the test failover of {machine}: wait for it, or cancel it (`ferry jobs cancel {}`), then clean up",
                t.job, t.job
            )));
        }
        let id = crate::jobs::Jobs::new_id();
        t.job = id.clone();
        let drill = t.drill.clone();
        let rev = put_claim(&s, &p, doc.revision).await?;
        let tm = test_machine_name(&machine);
        let steps = vec![
            (format!("power test machine {tm} off and remove it"), true),
            (
                format!("withdraw the export of {machine} at master target {}: the point is released", p.master_target),
                true,
            ),
            ("record the drill (result, notes) and end the test failover".to_owned(), true),
        ];
        let work = JobWork::TestFailoverCleanup {
            machine: machine.clone(),
            drill,
            result: req.result,
            notes: req.notes.clone(),
            by: caller.token_name.clone(),
        };
        start_claimed(&s, id, &p, rev, work, steps).await
    })
    .await
    .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, errors::JOB_STATE, e.to_string()))??;
    Ok((StatusCode::ACCEPTED, Json(job)).into_response())
}

/// What is wrong with a running drill's export, as its master target reports it: lost (a
/// restart of the master target drops the writable overlay and what the test machine wrote), or
/// gone. None while the drill starts or cleans up, or when all is well.
pub(crate) async fn drill_problem(store: &Store, p: &Protection, t: &ProtectionTestFailover) -> Option<String> {
    let d = store.get::<Drill>(DRILL, &t.drill).await.ok().flatten()?.body;
    if d.state != DrillState::Running {
        return None;
    }
    let r = replica_status(store, &p.master_target, &p.machine).await?;
    match r.test_failover.filter(|x| x.order == t.drill) {
        Some(x) => x.problem.map(|problem| format!("drill {}: {problem}; clean the drill up", t.drill)),
        None => Some(format!(
            "master target {} no longer holds the export of drill {} (restarted?): what the test machine wrote is lost; clean the drill up",
            p.master_target, t.drill
        )),
    }
}

/// Change a drill's record.
pub(crate) async fn update_drill(store: &Store, id: &str, f: impl Fn(&mut Drill)) -> Outcome {
    for _ in 0..20 {
        let d = match store.get::<Drill>(DRILL, id).await {
            Ok(Some(d)) => d,
            Ok(None) => return fail(errors::NOT_FOUND, format!("drill {id} has no record any more")),
            Err(e) => return fail(errors::STORE, e.to_string()),
        };
        let mut body = d.body;
        f(&mut body);
        match store.put(DRILL, id, &body, Some(d.revision)).await {
            Ok(_) => return Outcome::Done(None),
            Err(ferry_store::StoreError::Conflict { .. }) => continue,
            Err(e) => return fail(errors::STORE, e.to_string()),
        }
    }
    fail(errors::STORE, format!("drill {id} kept changing"))
}

/// Order (or withdraw, with `None`) the drill's export at the machine's master target.
async fn order_export(store: &Store, p: &Protection, order: Option<(String, String)>) -> Result<(), String> {
    let machine = p.machine.clone();
    update_settings(store, &format!("master-target/{}", p.master_target), move |b| {
        let map = b.machine_test_failovers.get_or_insert_with(Default::default);
        match &order {
            Some((id, point)) => {
                map.insert(
                    machine.clone(),
                    ferry_api::master_target::TestFailoverOrder { order: id.clone(), point: point.clone() },
                );
            }
            None => {
                map.remove(&machine);
            }
        }
    })
    .await
}

impl Ops {
    pub async fn test_failover_step(
        &self,
        machine: &str,
        drill: &str,
        point: &str,
        no_start: bool,
        step: usize,
        ctl: &JobControl,
    ) -> Outcome {
        let store = &self.store;
        let (p, _) = match protection(store, machine).await {
            Ok(x) => x,
            Err(o) => return o,
        };
        if p.test_failover.as_ref().is_none_or(|t| t.drill != drill) {
            return fail(errors::FAILOVER_STATE, format!("the test failover {drill} of {machine} was cleaned up"));
        }
        match step {
            0 => match replica_status(store, &p.master_target, machine).await {
                Some(r) if r.fence.is_none() => Outcome::Done(Some(format!(
                    "{machine} replicates to {} ({}); the drill does not stop it",
                    p.master_target, r.mode
                ))),
                Some(_) => fail(errors::FAILOVER_STATE, format!("the replica of {machine} is fenced (failed over)")),
                None => fail(
                    errors::MT_HEARTBEAT_LOST,
                    format!(
                        "master target {} reports no replica of {machine}: check that it runs and is linked (`ferry components`)",
                        p.master_target
                    ),
                ),
            },
            1 => {
                if let Err(e) = order_export(store, &p, Some((drill.to_owned(), point.to_owned()))).await {
                    return fail(errors::STORE, e);
                }
                let export = match self.wait_export(&p, drill, ctl).await {
                    Ok(x) => x,
                    Err(o) => return o,
                };
                let (pt, urls) = (export.point.clone(), export.nbd_urls.clone());
                if let o @ Outcome::Failed(_) = update_drill(store, drill, move |d| {
                    d.point = Some(pt.clone());
                    d.nbd_urls = urls.clone();
                })
                .await
                {
                    return o;
                }
                Outcome::Done(Some(format!(
                    "point {} ({}) of {machine} exported writable: {}",
                    export.point.id,
                    ferry_sys::time::utc(export.point.time_ms),
                    export.nbd_urls.join(" ")
                )))
            }
            2 if no_start => Outcome::Done(Some("no test machine started (asked)".into())),
            2 => self.start_test_machine(&p, drill, ctl).await,
            3 => {
                let o = update_drill(store, drill, |d| d.state = DrillState::Running).await;
                if let Outcome::Failed(_) = o {
                    return o;
                }
                let _ = store
                    .add_event(0, "info", &format!("agent/{machine}"), &format!("test failover {drill} of {machine} runs"))
                    .await;
                Outcome::Done(Some(format!(
                    "drill {drill} runs: verify the test machine, then `ferry test-failover cleanup {machine} --result passed|failed`"
                )))
            }
            _ => fail(errors::JOB_STATE, format!("test-failover job has no step {step}")),
        }
    }

    /// Wait until the master target reports the drill's export (or its order's error).
    async fn wait_export(&self, p: &Protection, drill: &str, ctl: &JobControl) -> Result<TestFailoverExport, Outcome> {
        let deadline = tokio::time::Instant::now() + EXPORT_LIMIT;
        loop {
            if let Some(r) = replica_status(&self.store, &p.master_target, &p.machine).await {
                if let Some(x) = r.test_failover.filter(|x| x.order == drill) {
                    if let Some(problem) = &x.problem {
                        return Err(fail(
                            errors::MATERIALIZE_FAILED,
                            format!("master target {}: {problem}", p.master_target),
                        ));
                    }
                    return Ok(x);
                }
                if let Some(e) = r.test_failover_error.filter(|e| e.order == drill) {
                    let code = ferry_types::codes::by_code(e.code).unwrap_or(errors::MATERIALIZE_FAILED);
                    return Err(fail(code, format!("master target {}: {}", p.master_target, e.message)));
                }
            }
            if tokio::time::Instant::now() >= deadline {
                return Err(fail(
                    errors::MT_HEARTBEAT_LOST,
                    format!(
                        "master target {} did not report the export of drill {drill} within {EXPORT_LIMIT:?}: check that it runs and is linked (`ferry components`), then clean the drill up",
                        p.master_target
                    ),
                ));
            }
            if !pause(ctl, Duration::from_millis(300)).await {
                return Err(fail(errors::JOB_STATE, "the job was cancelled: clean the drill up"));
            }
        }
    }

    async fn start_test_machine(&self, p: &Protection, drill: &str, ctl: &JobControl) -> Outcome {
        let store = &self.store;
        let (rsite, host, primary) = match crate::failover::recovery_site(store, p).await {
            Ok(x) => x,
            Err(o) => return o,
        };
        let export = match self.wait_export(p, drill, ctl).await {
            Ok(x) => x,
            Err(o) => return o,
        };
        if export.nbd_disks.len() != p.disks.len() {
            return fail(
                errors::MATERIALIZE_FAILED,
                format!(
                    "the export of {} has {} disk(s), the machine {}",
                    p.machine,
                    export.nbd_disks.len(),
                    p.disks.len()
                ),
            );
        }
        let tm = test_machine_name(&p.machine);
        // The drill's own network (a plan's drills share the plan's).
        let network = match store.get::<Drill>(DRILL, drill).await {
            Ok(Some(d)) => d.body.network,
            _ => test_network_name(&p.machine),
        };
        let (site_name, tm2) = (rsite.site.clone(), tm.clone());
        if let o @ Outcome::Failed(_) = update_drill(store, drill, move |d| {
            d.site = Some(site_name.clone());
            d.test_machine = Some(tm2.clone());
        })
        .await
        {
            return o;
        }
        let provider = match self.provider_of(&rsite.site).await {
            Ok(x) => x,
            Err(e) => return fail(errors::NOT_FOUND, e),
        };
        let create = crate::discovery::SiteOperation::CreateTestMachine {
            machine: tm.clone(),
            host,
            os_family: primary.as_ref().map(|m| m.os_family.clone()).unwrap_or_else(|| p.os_family.clone()),
            network: network.clone(),
            nbd_disks: p.disks.iter().map(|d| d.name.clone()).zip(export.nbd_disks.iter().cloned()).collect(),
            extra: primary.map(|m| m.extra).unwrap_or_default(),
        };
        if let Err(e) = provider.operate(create).await {
            return fail(ferry_types::HasErrorCode::error_code(&e), e.to_string());
        }
        let on = crate::discovery::SiteOperation::PowerOn { machine: tm.clone(), allow_failed_over: false };
        if let Err(e) = provider.operate(on).await {
            if !e.to_string().contains("already running") && !self.powered_on(&rsite.site, &tm).await {
                return fail(ferry_types::HasErrorCode::error_code(&e), e.to_string());
            }
        }
        if let Ok(inv) = provider.discover().await {
            let _ = store.put(crate::ops::INVENTORY, &inv.site, &inv, None).await;
        }
        if !self.powered_on(&rsite.site, &tm).await {
            return fail(errors::MACHINE_NOT_ACCESSIBLE, format!("{tm} is not running at site {}", rsite.site));
        }
        Outcome::Done(Some(format!(
            "{tm} runs at site {} in test network {network} on the export of {}",
            rsite.site, export.point.id
        )))
    }

    pub async fn test_failover_cleanup_step(
        &self,
        job: &Job,
        machine: &str,
        drill: &str,
        (result, notes, by): (Option<DrillResult>, Option<String>, &str),
        step: usize,
        ctl: &JobControl,
    ) -> Outcome {
        let store = &self.store;
        let (p, _) = match protection(store, machine).await {
            Ok(x) => x,
            Err(o) => return o,
        };
        let ours = p.test_failover.as_ref().is_some_and(|t| t.drill == drill && t.job == job.id);
        if !ours {
            // Resumed after the last step recorded the end.
            return Outcome::Done(Some(format!("the test failover {drill} of {machine} is over")));
        }
        match step {
            0 => {
                let job_id = job.id.clone();
                if let o @ Outcome::Failed(_) = update_drill(store, drill, move |d| {
                    d.state = DrillState::CleaningUp;
                    d.cleanup_job = Some(job_id.clone());
                })
                .await
                {
                    return o;
                }
                let d = match store.get::<Drill>(DRILL, drill).await {
                    Ok(d) => d.map(|d| d.body),
                    Err(e) => return fail(errors::STORE, e.to_string()),
                };
                let (Some(site), Some(tm)) = (d.as_ref().and_then(|d| d.site.clone()), d.and_then(|d| d.test_machine))
                else {
                    return Outcome::Done(Some("no test machine was made".into()));
                };
                let provider = match self.provider_of(&site).await {
                    Ok(x) => x,
                    Err(e) => return fail(errors::NOT_FOUND, e),
                };
                let inv = provider.discover().await.ok();
                let exists = inv.as_ref().is_none_or(|i| i.content.machines.iter().any(|m| m.name == tm));
                if !exists {
                    return Outcome::Done(Some(format!("{tm} is gone from site {site}")));
                }
                if self.powered_on(&site, &tm).await
                    || inv.as_ref().is_some_and(|i| i.content.machines.iter().any(|m| m.name == tm && m.power == "on"))
                {
                    if let Err(e) = self.shut_down(&site, &tm).await {
                        return fail(
                            errors::MACHINE_NOT_ACCESSIBLE,
                            format!("{tm} could not be powered off at site {site}: {e}"),
                        );
                    }
                }
                let del = crate::discovery::SiteOperation::DeleteMachine { machine: tm.clone() };
                if let Err(e) = provider.operate(del).await {
                    return fail(ferry_types::HasErrorCode::error_code(&e), e.to_string());
                }
                if let Ok(inv) = provider.discover().await {
                    let _ = store.put(crate::ops::INVENTORY, &inv.site, &inv, None).await;
                }
                Outcome::Done(Some(format!("{tm} powered off and removed from site {site}")))
            }
            1 => {
                if let Err(e) = order_export(store, &p, None).await {
                    return fail(errors::STORE, e);
                }
                let deadline = tokio::time::Instant::now() + RELEASE_LIMIT;
                loop {
                    let held = match replica_status(store, &p.master_target, machine).await {
                        Some(r) => r.test_failover.is_some_and(|x| x.order == drill),
                        // No replica reported: nothing of the drill is held there.
                        None => false,
                    };
                    if !held {
                        return Outcome::Done(Some(format!(
                            "master target {} discarded the export; the point is released",
                            p.master_target
                        )));
                    }
                    if tokio::time::Instant::now() >= deadline {
                        return fail(
                            errors::MT_HEARTBEAT_LOST,
                            format!(
                                "master target {} still holds the export of drill {drill} after {RELEASE_LIMIT:?}: check that it runs, then clean up again",
                                p.master_target
                            ),
                        );
                    }
                    if !pause(ctl, Duration::from_millis(300)).await {
                        return fail(errors::JOB_STATE, "the job was cancelled: clean up again");
                    }
                }
            }
            2 => {
                let (notes2, by2) = (notes.clone(), by.to_owned());
                if let o @ Outcome::Failed(_) = update_drill(store, drill, move |d| {
                    d.state = DrillState::CleanedUp;
                    d.cleaned_up_ms = Some(now_ms());
                    d.cleaned_up_by = Some(by2.clone());
                    d.result = result;
                    d.notes = notes2.clone();
                    d.nbd_urls.clear();
                })
                .await
                {
                    return o;
                }
                for _ in 0..20 {
                    let Ok(Some(d)) = store.get::<Protection>(PROTECTION, machine).await else { break };
                    let mut body = d.body;
                    if body.test_failover.as_ref().is_none_or(|t| t.drill != drill) {
                        break;
                    }
                    body.test_failover = None;
                    match store.put(PROTECTION, machine, &body, Some(d.revision)).await {
                        Err(ferry_store::StoreError::Conflict { .. }) => continue,
                        Err(e) => return fail(errors::STORE, e.to_string()),
                        Ok(_) => break,
                    }
                }
                let verdict = match result {
                    Some(DrillResult::Passed) => "passed",
                    Some(DrillResult::Failed) => "failed",
                    None => "no result recorded",
                };
                let _ = store
                    .add_event(
                        0,
                        "info",
                        &format!("agent/{machine}"),
                        &format!("test failover {drill} of {machine} cleaned up ({verdict})"),
                    )
                    .await;
                Outcome::Done(Some(format!("drill {drill} recorded ({verdict}); {machine} is Protected")))
            }
            _ => fail(errors::JOB_STATE, format!("test-failover cleanup job has no step {step}")),
        }
    }

    /// A start job failed: the drill says so (its cleanup removes whatever it made).
    pub async fn test_failover_failed(&self, drill: &str, e: crate::jobs::JobError) -> crate::jobs::JobError {
        let msg = e.message.clone();
        let _ = update_drill(&self.store, drill, move |d| {
            d.state = DrillState::StartFailed;
            d.error = Some(msg.clone());
        })
        .await;
        let mut e = e;
        e.message.push_str(" (clean the drill up: `ferry test-failover cleanup MACHINE` removes what it made)");
        e
    }
}
