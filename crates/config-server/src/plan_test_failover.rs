//! Test failover of a recovery plan: a drill of every machine, group by group with the plan's
//! actions between (as a plan failover runs them), the machines of a group in parallel, every
//! replication group at one multi-machine point. Replication goes on throughout; nothing is
//! fenced. The plan's test machines share one test network (`plan-test-PLAN`). Each machine's drill
//! is an ordinary drill record (`plan` names the plan), listed by `ferry drills`; the cleanup
//! of the plan ends every drill of it, recording the result on each.
//!
//! A machine whose drill fails stops its group (the plan goes no further); the drills already
//! started stay up until the plan's cleanup (or each machine's) removes them.

use std::collections::BTreeMap;
use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::Json;
use ferry_api::config_server::{
    CleanupTestFailoverRequest, Drill, DrillState, FailoverKind, PlanTestFailoverRequest, ProtectionTestFailover,
    RecoveryPlan,
};

use crate::errors::{self, ApiError};
use crate::failover::{check_point, failover_state_error, running};
use crate::http::{Body, Caller};
use crate::jobs::{now_ms, Job, JobControl, Outcome};
use crate::ops::{JobWork, Ops};
use crate::plan_failover::{run_record, update_run, PlanJob, PlanRun, PlanStep, PLAN_RUN};
use crate::protection::{fail, Protection, PROTECTION};
use crate::test_failover::{test_machine_name, DRILL};
use crate::AppState;

/// The steps of one machine's drill (see `test_failover`): check, export, start, record.
const DRILL_STEPS: usize = 4;

/// The test network of a plan's drills.
pub fn plan_test_network(plan: &str) -> String {
    // Never a machine drill's `test-MACHINE`, whatever the names.
    format!("plan-test-{plan}")
}

/// `POST /api/v1/recovery-plans/{name}/test-failover`.
pub async fn start(
    State(s): State<Arc<AppState>>,
    caller: Caller,
    Path(name): Path<String>,
    Body(req): Body<PlanTestFailoverRequest>,
) -> crate::http::ApiResult {
    let job = tokio::spawn(async move { claim(&s, &caller, &name, req).await })
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, errors::JOB_STATE, e.to_string()))??;
    Ok((StatusCode::ACCEPTED, Json(job)).into_response())
}

async fn claim(s: &Arc<AppState>, caller: &Caller, name: &str, req: PlanTestFailoverRequest) -> Result<Job, ApiError> {
    crate::model::check_name("recovery plan", name)?;
    let plan = s
        .store
        .get::<RecoveryPlan>(crate::model::PLAN, name)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no recovery plan {name}")))?
        .body;
    let point = req.point.clone().unwrap_or_else(|| "latest-processed".to_owned());
    check_point(&point)?;
    if !crate::plan_failover::PLAN_SELECTORS.contains(&point.as_str()) {
        return Err(ApiError::bad(format!(
            "point {point:?}: a recovery plan's test failover goes to a selector ({}); a point ID names one machine's point (drill that machine on its own)",
            crate::plan_failover::PLAN_SELECTORS.join(", ")
        )));
    }
    let (groups, docs) = crate::plan_failover::free_plan_machines(s, &plan).await?;
    let id = crate::jobs::Jobs::new_id();
    let started_ms = now_ms();
    let mut drills = BTreeMap::new();
    let mut claimed: Vec<Protection> = Vec::new();
    for doc in docs {
        let mut p = doc.body;
        let drill = format!("{id}.{}", p.machine);
        p.test_failover = Some(ProtectionTestFailover { drill: drill.clone(), job: id.clone(), started_ms });
        if let Err(e) = s.store.put(PROTECTION, &p.machine, &p, Some(doc.revision)).await {
            release(s, &claimed, &id).await;
            return Err(match e {
                ferry_store::StoreError::Conflict { .. } => {
                    failover_state_error(format!("machine {} changed under this request: retry", p.machine))
                }
                e => e.into(),
            });
        }
        let record = Drill {
            id: drill.clone(),
            machine: p.machine.clone(),
            state: DrillState::Starting,
            point_requested: point.clone(),
            point: None,
            master_target: p.master_target.clone(),
            site: None,
            network: plan_test_network(name),
            test_machine: None,
            nbd_urls: Vec::new(),
            started_ms,
            started_by: caller.token_name.clone(),
            start_job: id.clone(),
            cleanup_job: None,
            cleaned_up_ms: None,
            cleaned_up_by: None,
            result: None,
            notes: None,
            error: None,
            plan: Some(name.to_owned()),
        };
        claimed.push(p.clone());
        if let Err(e) = s.store.put(DRILL, &drill, &record, None).await {
            release(s, &claimed, &id).await;
            return Err(e.into());
        }
        drills.insert(p.machine.clone(), drill);
    }
    let mut steps =
        vec![(format!("choose every machine's point ({point}; one multi-machine point per replication group)"), true)];
    let mut work_steps = vec![PlanStep::ChoosePoints];
    for (i, (g, machines)) in plan.groups.iter().zip(&groups).enumerate() {
        let n = i + 1;
        for a in &g.pre_actions {
            steps.push(crate::ops::action_step(n, "pre", a));
            work_steps.push(PlanStep::Action { action: a.clone() });
        }
        steps.push((
            format!(
                "group {n}: test failover of {} (in parallel, in test network {}{})",
                if machines.is_empty() { "no machine".to_owned() } else { machines.join(", ") },
                plan_test_network(name),
                if req.no_start { ", test machines left off" } else { "" }
            ),
            true,
        ));
        work_steps.push(PlanStep::Group { n, machines: machines.clone() });
        for a in &g.post_actions {
            steps.push(crate::ops::action_step(n, "post", a));
            work_steps.push(PlanStep::Action { action: a.clone() });
        }
    }
    if let Err(e) = s.store.put(PLAN_RUN, &id, &PlanRun::default(), None).await {
        release(s, &claimed, &id).await;
        return Err(e.into());
    }
    let work =
        JobWork::PlanTestFailover { plan: name.to_owned(), point, no_start: req.no_start, steps: work_steps, drills };
    let started = match work.split() {
        Ok((kind, params)) => {
            s.jobs.start_with_id(id.clone(), s.ops.clone(), kind, name, steps, params).await.map_err(Into::into)
        }
        Err(e) => Err(e),
    };
    if started.is_err() {
        release(s, &claimed, &id).await;
    }
    started
}

/// Give back the machines a failed claim took (their drill records say the start failed).
async fn release(s: &AppState, claimed: &[Protection], job: &str) {
    for p in claimed {
        if let Ok(Some(d)) = s.store.get::<Protection>(PROTECTION, &p.machine).await {
            let mut back = d.body;
            if back.test_failover.as_ref().is_some_and(|t| t.job == job) {
                back.test_failover = None;
                let _ = s.store.put(PROTECTION, &p.machine, &back, Some(d.revision)).await;
            }
        }
        let drill = format!("{job}.{}", p.machine);
        let _ = crate::test_failover::update_drill(&s.store, &drill, |d| {
            d.state = DrillState::StartFailed;
            d.error = Some("the plan's test failover could not start".into());
        })
        .await;
    }
}

/// `POST /api/v1/recovery-plans/{name}/test-failover/cleanup`: every running drill of the plan.
pub async fn cleanup(
    State(s): State<Arc<AppState>>,
    caller: Caller,
    Path(name): Path<String>,
    Body(req): Body<CleanupTestFailoverRequest>,
) -> crate::http::ApiResult {
    crate::test_failover::check_notes(req.notes.as_deref())?;
    let job = tokio::spawn(async move {
        crate::model::check_name("recovery plan", &name)?;
        let mut drills = BTreeMap::new();
        let mut docs = Vec::new();
        for d in s.store.list::<Protection>(PROTECTION).await? {
            let Some(t) = d.body.test_failover.clone() else { continue };
            let Some(rec) = s.store.get::<Drill>(DRILL, &t.drill).await?.map(|r| r.body) else { continue };
            if rec.plan.as_deref() != Some(name.as_str()) {
                continue;
            }
            if running(&s.store, &t.job).await? {
                return Err(failover_state_error(format!(
                    "job {} is working on the test failover of {} (plan {name}): wait for it, or cancel it (`ferry jobs cancel {}`), then clean up",
                    t.job, d.body.machine, t.job
                )));
            }
            drills.insert(d.body.machine.clone(), t.drill.clone());
            docs.push(d);
        }
        if drills.is_empty() {
            return Err(failover_state_error(format!(
                "recovery plan {name} has no test failover running: there is nothing to clean up (`ferry drills` lists past drills)"
            )));
        }
        let id = crate::jobs::Jobs::new_id();
        for d in docs {
            let mut p = d.body;
            if let Some(t) = p.test_failover.as_mut() {
                t.job = id.clone();
            }
            s.store.put(PROTECTION, &p.machine, &p, Some(d.revision)).await.map_err(|e| match e {
                ferry_store::StoreError::Conflict { .. } => {
                    failover_state_error(format!("machine {} changed under this request: retry", p.machine))
                }
                e => e.into(),
            })?;
        }
        let steps: Vec<(String, bool)> = drills
            .iter()
            .map(|(m, d)| {
                (format!("end drill {d} of {m}: remove {}, withdraw the export, record it", test_machine_name(m)), true)
            })
            .collect();
        let work = JobWork::PlanTestFailoverCleanup {
            plan: name.clone(),
            drills: drills.into_iter().collect(),
            result: req.result,
            notes: req.notes.clone(),
            by: caller.token_name.clone(),
        };
        let (kind, params) = work.split()?;
        Ok::<Job, ApiError>(s.jobs.start_with_id(id, s.ops.clone(), kind, &name, steps, params).await?)
    })
    .await
    .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, errors::JOB_STATE, e.to_string()))??;
    Ok((StatusCode::ACCEPTED, Json(job)).into_response())
}

impl Ops {
    #[allow(clippy::too_many_arguments)]
    pub async fn plan_test_failover_step(
        &self,
        job: &Job,
        point: &str,
        no_start: bool,
        steps: &[PlanStep],
        drills: &BTreeMap<String, String>,
        step: usize,
        ctl: &JobControl,
    ) -> Outcome {
        match steps.get(step) {
            Some(PlanStep::ChoosePoints) => {
                let pj = PlanJob { job, kind: FailoverKind::Unplanned, point, reason: "", drain_secs: 1, no_start };
                self.choose_plan_points(&pj, steps).await
            }
            Some(PlanStep::Action { action }) => self.run_action(job, action, ctl).await,
            Some(PlanStep::Group { n, machines }) => {
                let runs = machines.iter().map(|m| self.plan_machine_drill(job, m, drills, no_start, ctl));
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
                    let detail: Vec<String> = failed.iter().map(|(m, e)| format!("{m}: {}", e.message)).collect();
                    return fail(
                        ferry_types::codes::by_code(first.code).unwrap_or(errors::FAILOVER_STATE),
                        format!(
                            "group {n} stopped: the drill of {} failed ({}); the plan goes no further; clean its drills up (`ferry plans test-failover-cleanup PLAN`)",
                            failed.iter().map(|(m, _)| m.as_str()).collect::<Vec<_>>().join(", "),
                            detail.join("; ")
                        ),
                    );
                }
                Outcome::Done(Some(format!("group {n}: {}", done.join("; "))))
            }
            None => fail(errors::JOB_STATE, format!("plan test-failover job has no step {step}")),
        }
    }

    /// One machine's drill through its steps, from where it stopped.
    async fn plan_machine_drill(
        &self,
        job: &Job,
        m: &str,
        drills: &BTreeMap<String, String>,
        no_start: bool,
        ctl: &JobControl,
    ) -> Result<String, crate::jobs::JobError> {
        let outcome_err = |o: Outcome| match o {
            Outcome::Failed(e) => e,
            _ => crate::jobs::JobError::new(errors::JOB_STATE, "unexpected outcome".to_owned()),
        };
        let (run, _) = run_record(&self.store, &job.id).await.map_err(outcome_err)?;
        let (Some(drill), Some(point)) = (drills.get(m), run.points.get(m)) else {
            return Err(crate::jobs::JobError::new(errors::JOB_STATE, format!("no drill or point for {m}")));
        };
        let mut last = String::new();
        for step in run.progress.get(m).copied().unwrap_or(0)..DRILL_STEPS {
            match self.test_failover_step(m, drill, point, no_start, step, ctl).await {
                Outcome::Done(msg) => {
                    last = msg.unwrap_or_default();
                    let key = m.to_owned();
                    update_run(&self.store, &job.id, move |r| {
                        r.progress.insert(key.clone(), step + 1);
                    })
                    .await
                    .map_err(outcome_err)?;
                }
                Outcome::Failed(e) => return Err(self.test_failover_failed(drill, e).await),
                Outcome::WaitForInput(p) => {
                    return Err(crate::jobs::JobError::new(errors::JOB_STATE, format!("{m} waits for input: {p}")))
                }
            }
        }
        Ok(last)
    }

    /// One step of a plan's cleanup: one machine's drill ended (the machine drill's cleanup
    /// steps, each idempotent).
    #[allow(clippy::too_many_arguments)]
    pub async fn plan_test_failover_cleanup_step(
        &self,
        job: &Job,
        drills: &[(String, String)],
        result: Option<ferry_api::config_server::DrillResult>,
        notes: Option<String>,
        by: &str,
        step: usize,
        ctl: &JobControl,
    ) -> Outcome {
        let Some((m, drill)) = drills.get(step) else {
            return fail(errors::JOB_STATE, format!("plan cleanup job has no step {step}"));
        };
        let mut last = None;
        for k in 0..3 {
            match self.test_failover_cleanup_step(job, m, drill, (result, notes.clone(), by), k, ctl).await {
                Outcome::Done(msg) => last = msg,
                o => return o,
            }
        }
        Outcome::Done(last)
    }
}
