//! Failover of a recovery plan: planned or unplanned, group by group. One job: first every
//! machine's point is chosen — a replication group's members all get their point of one
//! multi-machine tag, chosen before any member is fenced — then, in plan order, each group's
//! pre-actions, its machines failed over in parallel (each through the steps of a machine's
//! failover, its progress kept in the plan's run record so a restarted server resumes every
//! machine at its own step), and its post-actions. Group N+1 starts only when every machine of
//! group N runs at the recovery site; a machine that fails stops the job at its group, naming
//! it (the group's other machines stand at their common point).

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::Json;
use ferry_api::config_server::{
    Action, FailoverKind, FailoverStage, PlanFailoverRequest, ProtectionFailover, RecoveryPlan, ReplicationGroup,
};
use ferry_api::master_target::PointList;
use serde::{Deserialize, Serialize};

use crate::errors::{self, ApiError};
use crate::failover::{failover_state_error, FailoverJob, FailoverStep};
use crate::http::Body;
use crate::jobs::{now_ms, Job, JobControl, Outcome};
use crate::ops::{JobWork, Ops};
use crate::protection::{effective_state, fail, update_settings, Protection, PROTECTION};
use crate::AppState;

/// Each plan failover's run record (`plan-run/<job>`): the chosen points, each machine's next step.
pub const PLAN_RUN: &str = "plan-run";

/// The selectors a plan fails over to (a point ID names one machine's point, not a plan's).
pub(crate) const PLAN_SELECTORS: [&str; 5] =
    ["latest", "latest-processed", "latest-app", "latest-multi", "latest-multi-app"];

/// One step of a plan failover job.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(tag = "step", rename_all = "kebab-case")]
pub enum PlanStep {
    ChoosePoints,
    Action { action: Action },
    Group { n: usize, machines: Vec<String> },
}

/// Every machine of a plan failover's groups, in order.
pub(crate) fn machines_of(steps: &[PlanStep]) -> Vec<String> {
    let mut out = Vec::new();
    for s in steps {
        if let PlanStep::Group { machines, .. } = s {
            out.extend(machines.iter().cloned());
        }
    }
    out
}

#[derive(Debug, Clone, Default, Serialize, Deserialize)]
pub struct PlanRun {
    /// Machine → the point reference its failover goes to.
    pub points: BTreeMap<String, String>,
    /// Machine → the index of its failover's next step.
    pub progress: BTreeMap<String, usize>,
}

/// The machines of each group of a plan, and each one's protection record: every machine must
/// be Protected and free (no failover, no drill) before any is claimed, for a plan failover and a
/// plan test failover alike.
pub(crate) async fn free_plan_machines(
    s: &AppState,
    plan: &RecoveryPlan,
) -> Result<(Vec<Vec<String>>, Vec<ferry_store::Doc<Protection>>), ApiError> {
    let groups = plan_machines(s, plan).await?;
    let docs = free_machines(s, &plan.name, &groups).await?;
    Ok((groups, docs))
}

/// Each machine's protection record, when every one is Protected and free (no failover, no
/// drill).
pub(crate) async fn free_machines(
    s: &AppState,
    name: &str,
    groups: &[Vec<String>],
) -> Result<Vec<ferry_store::Doc<Protection>>, ApiError> {
    if groups.iter().all(|g| g.is_empty()) {
        return Err(ApiError::bad(format!("recovery plan {name} has no machines")));
    }
    let mut docs = Vec::new();
    for m in groups.iter().flatten() {
        let doc = crate::failover::protection_of(s, m).await?;
        let state = effective_state(&s.store, &doc.body).await?;
        if state != "protected" {
            return Err(failover_state_error(format!(
                "machine {m} of plan {name} is {state}, not protected: every machine of the plan must be Protected"
            )));
        }
        if let Some(f) = &doc.body.failover {
            return Err(failover_state_error(format!(
                "machine {m} of plan {name} has a failover already (job {}): see `ferry machines`",
                f.job
            )));
        }
        if let Some(t) = &doc.body.test_failover {
            return Err(failover_state_error(format!(
                "machine {m} of plan {name} is in test failover {}: clean it up first (`ferry test-failover cleanup {m}`)",
                t.drill
            )));
        }
        docs.push(doc);
    }
    Ok(docs)
}

/// The machines of each group of a plan, replication groups expanded.
pub(crate) async fn plan_machines(s: &AppState, plan: &RecoveryPlan) -> Result<Vec<Vec<String>>, ApiError> {
    let mut out = Vec::new();
    for g in &plan.groups {
        let mut ms = g.machines.clone();
        for rg in &g.replication_groups {
            let doc = s.store.get::<ReplicationGroup>(crate::model::GROUP, rg).await?;
            let Some(doc) = doc else {
                return Err(ApiError::not_found(format!(
                    "plan {} names replication group {rg}, which is gone",
                    plan.name
                )));
            };
            ms.extend(doc.body.machines);
        }
        out.push(ms);
    }
    // A machine added to a replication group since the plan was saved may now be in it twice.
    let mut seen = std::collections::HashSet::new();
    for ms in &out {
        for m in ms {
            if !seen.insert(m.clone()) {
                return Err(ApiError::bad(format!(
                    "machine {m} is in plan {} more than once (a replication group changed since the plan was saved): fix the plan",
                    plan.name
                )));
            }
        }
    }
    Ok(out)
}

/// `POST /api/v1/recovery-plans/{name}/failover`.
pub async fn start(
    State(s): State<Arc<AppState>>,
    Path(name): Path<String>,
    Body(req): Body<PlanFailoverRequest>,
) -> crate::http::ApiResult {
    let job = tokio::spawn(async move { claim(&s, &name, req).await })
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, errors::JOB_STATE, e.to_string()))??;
    Ok((StatusCode::ACCEPTED, Json(job)).into_response())
}

async fn claim(s: &Arc<AppState>, name: &str, req: PlanFailoverRequest) -> Result<Job, ApiError> {
    crate::model::check_name("recovery plan", name)?;
    let plan = s
        .store
        .get::<RecoveryPlan>(crate::model::PLAN, name)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no recovery plan {name}")))?
        .body;
    let point = match (req.kind, req.point.as_deref()) {
        (FailoverKind::Planned, Some(_)) => {
            return Err(ApiError::bad(
                "a planned failover goes to each machine's last write: it takes no point (an unplanned one does)",
            ))
        }
        (FailoverKind::Planned, None) => "latest".to_owned(),
        (FailoverKind::Unplanned, None) => "latest".to_owned(),
        (FailoverKind::Unplanned, Some(p)) if PLAN_SELECTORS.contains(&p) => p.to_owned(),
        (FailoverKind::Unplanned, Some(p)) => {
            return Err(ApiError::bad(format!(
                "point {p:?}: a recovery plan fails over to a selector ({}); a point ID names one machine's point (fail that machine over on its own)",
                PLAN_SELECTORS.join(", ")
            )))
        }
    };
    if !(1..=86_400).contains(&req.drain_secs) {
        return Err(ApiError::bad(format!("drain_secs {}: 1 to 86400", req.drain_secs)));
    }
    let reason = crate::failover::check_reason(req.reason.as_deref(), format!("failover of recovery plan {name}"))?;
    let (groups, docs) = free_plan_machines(s, &plan).await?;
    claim_groups(s, &plan, groups, docs, &req, point, reason).await
}

/// Take every machine of `groups` (protection records `docs`, the plan's groups in order) for
/// one plan failover job, then start it; a machine taken by another request meanwhile gives
/// every one back.
pub(crate) async fn claim_groups(
    s: &Arc<AppState>,
    plan: &RecoveryPlan,
    groups: Vec<Vec<String>>,
    docs: Vec<ferry_store::Doc<Protection>>,
    req: &PlanFailoverRequest,
    point: String,
    reason: String,
) -> Result<Job, ApiError> {
    let name = plan.name.as_str();
    let id = crate::jobs::Jobs::new_id();
    let mut claimed: Vec<(Protection, i64)> = Vec::new();
    for doc in docs {
        let mut p = doc.body;
        p.failover = Some(ProtectionFailover {
            kind: req.kind,
            stage: FailoverStage::InProgress,
            job: id.clone(),
            reason: reason.clone(),
            started_ms: now_ms(),
            point: None,
            handed_over_seq: None,
            discarded: None,
            primary_last_seq: None,
            primary: None,
            committed_ms: None,
            recovery_machine: None,
            recovery_site: None,
            restart_recovery_machine: false,
            restart_decided_by: None,
        });
        match s.store.put(PROTECTION, &p.machine, &p, Some(doc.revision)).await {
            Ok(rev) => claimed.push((p, rev)),
            Err(e) => {
                release(s, &claimed).await;
                return Err(match e {
                    ferry_store::StoreError::Conflict { .. } => {
                        failover_state_error(format!("machine {} changed under this request: retry", p.machine))
                    }
                    e => e.into(),
                });
            }
        }
    }
    let mut steps = vec![(
        "choose every machine's point (one multi-machine point per replication group, before any member is fenced)"
            .to_owned(),
        true,
    )];
    let mut work_steps = vec![PlanStep::ChoosePoints];
    for (i, (g, machines)) in plan.groups.iter().zip(&groups).enumerate() {
        let n = i + 1;
        for a in &g.pre_actions {
            steps.push(crate::ops::action_step(n, "pre", a));
            work_steps.push(PlanStep::Action { action: a.clone() });
        }
        steps.push((
            format!(
                "group {n}: fail over {} ({}, in parallel)",
                if machines.is_empty() { "no machine".to_owned() } else { machines.join(", ") },
                kind_name(req.kind)
            ),
            true,
        ));
        work_steps.push(PlanStep::Group { n, machines: machines.clone() });
        for a in &g.post_actions {
            steps.push(crate::ops::action_step(n, "post", a));
            work_steps.push(PlanStep::Action { action: a.clone() });
        }
    }
    s.store.put(PLAN_RUN, &id, &PlanRun::default(), None).await?;
    let work = JobWork::PlanFailover {
        plan: name.to_owned(),
        kind: req.kind,
        point,
        reason,
        drain_secs: req.drain_secs,
        no_start: req.no_start,
        steps: work_steps,
    };
    let started = match work.split() {
        Ok((kind, params)) => {
            s.jobs.start_with_id(id, s.ops.clone(), kind, name, steps, params).await.map_err(Into::into)
        }
        Err(e) => Err(e),
    };
    if started.is_err() {
        release(s, &claimed).await;
    }
    started
}

/// Give back the machines a failed claim took.
async fn release(s: &AppState, claimed: &[(Protection, i64)]) {
    for (p, rev) in claimed {
        let mut back = p.clone();
        back.failover = None;
        let _ = s.store.put(PROTECTION, &p.machine, &back, Some(*rev)).await;
    }
}

fn kind_name(k: FailoverKind) -> &'static str {
    match k {
        FailoverKind::Planned => "planned",
        FailoverKind::Unplanned => "unplanned",
    }
}

/// What a plan failover job's steps need.
pub struct PlanJob<'a> {
    pub job: &'a Job,
    pub kind: FailoverKind,
    pub point: &'a str,
    pub reason: &'a str,
    pub drain_secs: u64,
    pub no_start: bool,
}

pub(crate) async fn run_record(store: &ferry_store::Store, job: &str) -> Result<(PlanRun, i64), Outcome> {
    match store.get::<PlanRun>(PLAN_RUN, job).await {
        Ok(Some(d)) => Ok((d.body, d.revision)),
        Ok(None) => Err(fail(errors::NOT_FOUND, format!("the run record of job {job} is gone"))),
        Err(e) => Err(fail(errors::STORE, e.to_string())),
    }
}

pub(crate) async fn update_run(store: &ferry_store::Store, job: &str, f: impl Fn(&mut PlanRun)) -> Result<(), Outcome> {
    for _ in 0..50 {
        let (mut run, rev) = run_record(store, job).await?;
        f(&mut run);
        match store.put(PLAN_RUN, job, &run, Some(rev)).await {
            Ok(_) => return Ok(()),
            Err(ferry_store::StoreError::Conflict { .. }) => continue,
            Err(e) => return Err(fail(errors::STORE, e.to_string())),
        }
    }
    Err(fail(errors::STORE, format!("the run record of job {job} kept changing")))
}

impl Ops {
    /// A plan failover job failed: its machines that never started their failover are
    /// released (Protected again, nothing was done to them); the others stand as their own
    /// failover left them (released before the fence, fenced after it).
    pub async fn plan_failover_failed(&self, pj: &PlanJob<'_>, steps: &[PlanStep]) {
        let progress = run_record(&self.store, &pj.job.id).await.map(|(r, _)| r.progress).unwrap_or_default();
        for m in machines_of(steps) {
            if progress.get(&m).copied().unwrap_or(0) > 0 {
                continue;
            }
            for _ in 0..20 {
                let Ok(Some(d)) = self.store.get::<Protection>(PROTECTION, &m).await else { break };
                let mut p = d.body;
                if p.failover.as_ref().is_none_or(|f| f.job != pj.job.id) {
                    break;
                }
                p.failover = None;
                match self.store.put(PROTECTION, &m, &p, Some(d.revision)).await {
                    Err(ferry_store::StoreError::Conflict { .. }) => continue,
                    _ => break,
                }
            }
        }
    }

    pub async fn plan_failover_step(
        &self,
        pj: &PlanJob<'_>,
        steps: &[PlanStep],
        step: usize,
        ctl: &JobControl,
    ) -> Outcome {
        match steps.get(step) {
            Some(PlanStep::ChoosePoints) => self.choose_plan_points(pj, steps).await,
            Some(PlanStep::Action { action }) => self.run_action(pj.job, action, ctl).await,
            Some(PlanStep::Group { n, machines }) => {
                // A barrier before the fence: every machine of the group goes through its
                // steps up to the fence first; if one fails there, none is fenced and every one
                // is given back, so no member is ever left at another point (or at none) than
                // its peers.
                let steps = FailoverStep::of(pj.kind);
                let fence_at = steps.iter().position(|s| *s == FailoverStep::AtPoint).unwrap_or(0);
                let runs = machines.iter().map(|m| self.plan_machine_failover(pj, m, ctl, fence_at));
                let before: Vec<_> = futures::future::join_all(runs).await;
                let stopped: Vec<(String, crate::jobs::JobError)> =
                    machines.iter().zip(before).filter_map(|(m, r)| r.err().map(|e| (m.clone(), e))).collect();
                if let Some((_, first)) = stopped.first() {
                    let mut given_back = Vec::new();
                    for m in machines.iter().filter(|m| !stopped.iter().any(|(s, _)| s == *m)) {
                        given_back.push(format!("{m}: {}", self.give_back_before_fence(pj, m).await));
                    }
                    let detail: Vec<String> = stopped.iter().map(|(m, e)| format!("{m}: {}", e.message)).collect();
                    return fail(
                        ferry_types::codes::by_code(first.code).unwrap_or(errors::FAILOVER_STATE),
                        format!(
                            "group {n} stopped before any of its machines was fenced: {} failed ({}); the plan goes no further{}",
                            stopped.iter().map(|(m, _)| m.as_str()).collect::<Vec<_>>().join(", "),
                            detail.join("; "),
                            if given_back.is_empty() {
                                String::new()
                            } else {
                                format!("; given back (Protected, replicating): {}", given_back.join("; "))
                            }
                        ),
                    );
                }
                let runs = machines.iter().map(|m| self.plan_machine_failover(pj, m, ctl, steps.len()));
                let results = futures::future::join_all(runs).await;
                let mut failed = Vec::new();
                let mut done = Vec::new();
                for (m, r) in machines.iter().zip(results) {
                    match r {
                        Ok(msg) => done.push(format!("{m}: {msg}")),
                        Err(e) => failed.push((m.clone(), e)),
                    }
                }
                if let Some((_, first)) = failed.first() {
                    let names: Vec<&str> = failed.iter().map(|(m, _)| m.as_str()).collect();
                    let detail: Vec<String> = failed.iter().map(|(m, e)| format!("{m}: {}", e.message)).collect();
                    return fail(
                        ferry_types::codes::by_code(first.code).unwrap_or(errors::FAILOVER_STATE),
                        format!(
                            "group {n} stopped: {} failed ({}); the plan goes no further{}",
                            names.join(", "),
                            detail.join("; "),
                            if done.is_empty() { String::new() } else { format!(" (done: {})", done.join("; ")) }
                        ),
                    );
                }
                Outcome::Done(Some(format!("group {n}: {}", done.join("; "))))
            }
            None => fail(errors::JOB_STATE, format!("plan failover job has no step {step}")),
        }
    }

    /// One machine of a group through a machine failover's steps, from where it stopped.
    async fn plan_machine_failover(
        &self,
        pj: &PlanJob<'_>,
        m: &str,
        ctl: &JobControl,
        upto: usize,
    ) -> Result<String, crate::jobs::JobError> {
        let outcome_err = |o: Outcome| match o {
            Outcome::Failed(e) => e,
            _ => crate::jobs::JobError::new(errors::JOB_STATE, "unexpected outcome".to_owned()),
        };
        let (run, _) = run_record(&self.store, &pj.job.id).await.map_err(outcome_err)?;
        // A machine released by an earlier run of this step (it failed before its fence and
        // was given back: it takes writes again) is never taken up again by a resumed step.
        let (p, _) = crate::failover::protection(&self.store, m).await.map_err(outcome_err)?;
        if p.failover.as_ref().is_none_or(|f| f.job != pj.job.id) {
            return Err(crate::jobs::JobError::new(
                errors::FAILOVER_STATE,
                format!("{m} is no longer this plan's (released after a failure, or taken by another job): see `ferry machines`"),
            ));
        }
        let Some(point) = run.points.get(m).cloned() else {
            return Err(crate::jobs::JobError::new(errors::JOB_STATE, format!("no point was chosen for {m}")));
        };
        let fj = FailoverJob {
            job: pj.job,
            machine: m,
            kind: pj.kind,
            point: &point,
            reason: pj.reason,
            drain_secs: pj.drain_secs,
            no_start: pj.no_start,
        };
        let mut last = String::new();
        for step in run.progress.get(m).copied().unwrap_or(0)..upto {
            match self.failover_step(&fj, step, ctl).await {
                Outcome::Done(msg) => {
                    last = msg.unwrap_or_default();
                    let key = m.to_owned();
                    update_run(&self.store, &pj.job.id, move |r| {
                        r.progress.insert(key.clone(), step + 1);
                    })
                    .await
                    .map_err(outcome_err)?;
                }
                Outcome::Failed(e) => return Err(self.failover_failed(&fj, step, e).await),
                Outcome::WaitForInput(p) => {
                    return Err(crate::jobs::JobError::new(errors::JOB_STATE, format!("{m} waits for input: {p}")))
                }
            }
        }
        Ok(if last.is_empty() { "failed over".to_owned() } else { last })
    }

    /// A machine of a group that stopped at the barrier (another member failed before its
    /// fence): its quiesce lifted, the primary started again if this job shut it down, its
    /// failover record removed. Never once it is fenced (then it stands: run the plan again).
    async fn give_back_before_fence(&self, pj: &PlanJob<'_>, m: &str) -> String {
        let Ok((p, _)) = crate::failover::protection(&self.store, m).await else {
            return "its protection is gone".into();
        };
        if p.failover.as_ref().is_none_or(|f| f.job != pj.job.id) {
            return "no longer this plan's".into();
        }
        let fenced =
            crate::failover::replica_status(&self.store, &p.master_target, m).await.is_none_or(|r| r.fence.is_some());
        if fenced {
            return "fenced already (or its master target does not report): it stays; run the plan again".into();
        }
        if let Err(e) = update_settings(&self.store, &format!("agent/{m}"), |b| b.quiesce = None).await {
            return format!("its quiesce could not be lifted: {e}");
        }
        let progress = run_record(&self.store, &pj.job.id).await.map(|(r, _)| r.progress).unwrap_or_default();
        let shut_at = FailoverStep::of(pj.kind).iter().position(|s| *s == FailoverStep::ShutDownPrimary);
        let was_shut_down = shut_at.is_some_and(|i| progress.get(m).copied().unwrap_or(0) > i);
        for _ in 0..20 {
            let Ok(Some(d)) = self.store.get::<Protection>(PROTECTION, m).await else { break };
            let mut q = d.body;
            if q.failover.as_ref().is_none_or(|f| f.job != pj.job.id) {
                break;
            }
            q.failover = None;
            match self.store.put(PROTECTION, m, &q, Some(d.revision)).await {
                Err(ferry_store::StoreError::Conflict { .. }) => continue,
                _ => break,
            }
        }
        if !was_shut_down {
            return "released (its quiesce lifted)".into();
        }
        let started = match self.provider_of(&p.site).await {
            Ok(provider) => {
                let on = crate::discovery::SiteOperation::PowerOn { machine: m.to_owned(), allow_failed_over: true };
                let r = provider.operate(on).await.map_err(|e| e.to_string());
                if let Ok(inv) = provider.discover().await {
                    let _ = self.store.put(crate::ops::INVENTORY, &inv.site, &inv, None).await;
                }
                r
            }
            Err(e) => Err(e),
        };
        match started {
            Ok(_) => format!("released and started again at site {}", p.site),
            Err(e) => format!("released, but it could not be started again at site {} ({e}): start it", p.site),
        }
    }

    /// Every machine's point: a replication group's members all at one multi-machine tag (the
    /// newest complete one of the kind asked for); other machines at the plan's selector.
    pub(crate) async fn choose_plan_points(&self, pj: &PlanJob<'_>, steps: &[PlanStep]) -> Outcome {
        let (run, _) = match run_record(&self.store, &pj.job.id).await {
            Ok(x) => x,
            Err(o) => return o,
        };
        let machines = machines_of(steps);
        if !run.points.is_empty() && machines.iter().all(|m| run.points.contains_key(m)) {
            return Outcome::Done(Some("chosen before the restart".into()));
        }
        let mut protections = BTreeMap::new();
        for m in &machines {
            match crate::failover::protection(&self.store, m).await {
                Ok((p, _)) => protections.insert(m.clone(), p),
                Err(o) => return o,
            };
        }
        let mut points = BTreeMap::new();
        let mut said = Vec::new();
        let app = matches!(pj.point, "latest-app" | "latest-multi-app");
        let mut by_group: BTreeMap<String, Vec<String>> = BTreeMap::new();
        for (m, p) in &protections {
            match (&p.group, pj.kind) {
                (Some(g), FailoverKind::Unplanned) => by_group.entry(g.clone()).or_default().push(m.clone()),
                _ => {
                    // A machine of no replication group has no multi-machine points.
                    let own = match pj.point {
                        "latest-multi" => "latest-processed",
                        "latest-multi-app" => "latest-app",
                        p => p,
                    };
                    points.insert(m.clone(), own.to_owned());
                }
            }
        }
        for (g, members) in &by_group {
            let mut lists = Vec::new();
            for m in members {
                match member_points(&self.store, &protections[m]).await {
                    Ok(l) => lists.push((m.clone(), l)),
                    Err(e) => return fail(errors::MT_HEARTBEAT_LOST, e),
                }
            }
            // The newest tag every member holds, of the kind asked for.
            let mut tags: Option<BTreeMap<String, u64>> = None;
            for (_, l) in &lists {
                let mine: BTreeMap<String, u64> = l
                    .points
                    .iter()
                    .filter(|p| p.group.as_deref() == Some(g.as_str()) && (!app || p.is_app()))
                    .filter_map(|p| p.group_tag.clone().map(|t| (t, p.time_ms)))
                    .collect();
                tags = Some(match tags {
                    None => mine,
                    Some(t) => t.into_iter().filter(|(k, _)| mine.contains_key(k)).collect(),
                });
            }
            let Some((tag, time)) = tags.unwrap_or_default().into_iter().max_by_key(|(_, t)| *t) else {
                return fail(
                    errors::POINT_NOT_FOUND,
                    format!(
                        "replication group {g} ({}) has no {}multi-machine point every member holds: wait for one, or fail over planned",
                        members.join(", "),
                        if app { "app-consistent " } else { "" }
                    ),
                );
            };
            for (m, l) in &lists {
                if let Some(p) = l.points.iter().find(|p| p.group_tag.as_deref() == Some(tag.as_str())) {
                    points.insert(m.clone(), p.id.clone());
                }
            }
            said.push(format!("group {g} at tag {tag} ({})", ferry_sys::time::utc(time)));
        }
        let chosen = points.clone();
        if let Err(o) = update_run(&self.store, &pj.job.id, move |r| r.points = chosen.clone()).await {
            return o;
        }
        let each: Vec<String> = points.iter().map(|(m, p)| format!("{m} → {p}")).collect();
        Outcome::Done(Some(format!(
            "{}{}",
            each.join(", "),
            if said.is_empty() { String::new() } else { format!("; {}", said.join("; ")) }
        )))
    }
}

/// The points a machine's master target holds (its point API).
async fn member_points(store: &ferry_store::Store, p: &Protection) -> Result<PointList, String> {
    let mt = crate::protection::component(store, ferry_api::control::ComponentKind::MasterTarget, &p.master_target)
        .await
        .ok_or_else(|| format!("master target {} is not registered", p.master_target))?;
    let addr = mt
        .status
        .as_ref()
        .and_then(|st| st.status_listen())
        .ok_or_else(|| format!("master target {} has not reported its point API", p.master_target))?
        .to_owned();
    let path = format!("/machines/{}/points", p.machine);
    match tokio::time::timeout(
        std::time::Duration::from_secs(20),
        ferry_status::call::<PointList>(&addr, ferry_api::Method::Get, &path, None::<&()>),
    )
    .await
    {
        Ok(Ok(l)) => Ok(l),
        Ok(Err(e)) => Err(format!("master target {}: {e}", p.master_target)),
        Err(_) => Err(format!("master target {} did not answer within 20 s", p.master_target)),
    }
}
