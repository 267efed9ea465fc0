//! Reprotect and failback of a recovery plan. A replication group is reprotected only this way
//! (RG-3), with values for every machine; the plan's own checks (RG-1 one OS family, RG-2 one
//! master target per group, RG-3 whole groups) and every machine's reprotect checks run first,
//! and nothing changes when one fails. One job then takes every machine through the steps of a
//! machine's reprotect together (step N for all, in parallel, before step N+1): a group's
//! members start replicating back at the same step and end Protected together, with the group
//! going on in the reverse direction (its multi-machine points). The failback of a plan is the
//! failover of its machines' reverse protections, group by group with the plan's actions.

use std::sync::Arc;

use axum::extract::{Path, State};
use axum::http::StatusCode;
use axum::response::IntoResponse;
use axum::Json;
use ferry_api::config_server::{
    FailoverKind, PlanFailbackRequest, PlanFailoverRequest, PlanReprotectPlan, PlanReprotectRequest, RecoveryPlan,
    ReplicationGroup, ReprotectCheck, ReprotectRequest,
};

use crate::errors::{self, ApiError};
use crate::http::Body;
use crate::jobs::{Job, JobControl, Outcome};
use crate::ops::{JobWork, Ops};
use crate::protection::{fail, Protection, PROTECTION};
use crate::reprotect::{Findings, ReprotectStep};
use crate::AppState;

/// The plan's checks and each machine's findings, in plan order.
struct PlanFindings {
    checks: Vec<ReprotectCheck>,
    machines: Vec<(String, Findings)>,
}

impl PlanFindings {
    fn ready(&self) -> bool {
        self.checks.iter().all(|c| c.passed) && self.machines.iter().all(|(_, f)| f.ready())
    }

    fn check(&mut self, id: &str, ok: bool, code: ferry_types::ErrorCode, pass: String, fail: String, remedy: &str) {
        self.checks.push(ReprotectCheck {
            id: id.into(),
            passed: ok,
            message: if ok { pass } else { fail },
            code: (!ok).then_some(code.code),
            remedy: (!ok).then(|| remedy.to_owned()),
        });
    }
}

async fn load_plan(s: &AppState, name: &str) -> Result<RecoveryPlan, ApiError> {
    crate::model::check_name("recovery plan", name)?;
    Ok(s.store
        .get::<RecoveryPlan>(crate::model::PLAN, name)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no recovery plan {name}")))?
        .body)
}

/// Every check of a plan reprotect. Reads only.
async fn plan_checks(s: &AppState, plan: &RecoveryPlan, req: &PlanReprotectRequest) -> Result<PlanFindings, ApiError> {
    let name = &plan.name;
    // Checked here too: a plan whose machines all lack values runs no machine's checks.
    if !(1..=86_400).contains(&req.stall_secs) || req.clock_skew_secs > 3600 {
        return Err(ApiError::bad(format!(
            "stall_secs {} must be 1 … 86400 and clock_skew_secs {} at most 3600",
            req.stall_secs, req.clock_skew_secs
        )));
    }
    let groups = crate::plan_failover::plan_machines(s, plan).await?;
    let machines: Vec<String> = groups.iter().flatten().cloned().collect();
    if machines.is_empty() {
        return Err(ApiError::bad(format!("recovery plan {name} has no machines")));
    }
    if let Some(m) = req.machines.keys().find(|m| !machines.contains(m)) {
        return Err(ApiError::bad(format!(
            "machine {m} is not in recovery plan {name} (its machines: {}): values are given only for the plan's machines",
            machines.join(", ")
        )));
    }
    let mut pf = PlanFindings { checks: Vec::new(), machines: Vec::new() };
    // RG-3: values for every machine.
    let missing: Vec<&String> =
        machines.iter().filter(|m| req.defaults.is_none() && !req.machines.contains_key(*m)).collect();
    pf.check(
        "RG-3",
        missing.is_empty(),
        errors::REPROTECT_REFUSED,
        format!("every machine of plan {name} has its master target, process server and datastore"),
        format!(
            "a plan reprotect needs values for every machine (RG-3): none for {}",
            missing.iter().map(|m| m.as_str()).collect::<Vec<_>>().join(", ")
        ),
        "give each machine its values (`--machine M=MASTER_TARGET,PROCESS_SERVER,DATASTORE`) or defaults for the others",
    );
    // Each plan machine's failed-over record: its own, or — after a failback — its reverse
    // protection's (that one was failed over; reprotecting it goes forward again).
    let mut records = std::collections::BTreeMap::new();
    let mut resolved = std::collections::BTreeMap::new();
    for m in &machines {
        let Some(mut p) = s.store.get::<Protection>(PROTECTION, m).await?.map(|d| d.body) else { continue };
        if let Some(rm) = p.reprotected_by.clone() {
            if let Some(r) = s.store.get::<Protection>(PROTECTION, &rm).await?.map(|d| d.body) {
                if r.failover.is_some() {
                    p = r;
                }
            }
        } else if let Some(of) = p.reprotect.as_ref().map(|r| r.of.clone()) {
            // A failed reprotect forward replaced the machine's record with its own (failed)
            // reverse one: the failed-over record is still the one it came from.
            if crate::protection::effective_state(&s.store, &p).await? == "failed" {
                if let Some(r) = s.store.get::<Protection>(PROTECTION, &of).await?.map(|d| d.body) {
                    if r.failover.is_some() {
                        p = r;
                    }
                }
            }
        }
        resolved.insert(m.clone(), p.machine.clone());
        records.insert(m.clone(), p);
    }
    // RG-1, RG-2 and whole groups, per replication group of the plan's machines.
    let mut by_group: std::collections::BTreeMap<String, Vec<String>> = Default::default();
    for (m, p) in &records {
        if let Some(g) = &p.group {
            by_group.entry(g.clone()).or_default().push(m.clone());
        }
    }
    for (g, members) in &by_group {
        let all = s.store.get::<ReplicationGroup>(crate::model::GROUP, g).await?.map(|d| d.body.machines);
        let outside: Vec<String> =
            all.clone().unwrap_or_default().into_iter().filter(|m| !machines.contains(m)).collect();
        pf.check(
            "RG-3",
            all.is_some(),
            errors::REPROTECT_REFUSED,
            format!("replication group {g} exists"),
            format!("the machines {} are in replication group {g}, which no longer exists", members.join(", ")),
            "create the replication group again with its machines (`ferry groups create`), then retry",
        );
        pf.check(
            "RG-3",
            outside.is_empty(),
            errors::REPROTECT_REFUSED,
            format!("replication group {g} is whole in plan {name} ({})", members.join(", ")),
            format!("plan {name} holds only part of replication group {g}: {} not in it", outside.join(", ")),
            "add the group's other machines to the plan (name the replication group in it), then retry",
        );
        let families: std::collections::BTreeSet<&str> =
            members.iter().filter_map(|m| records.get(m)).map(|p| p.os_family.as_str()).collect();
        pf.check(
            "RG-1",
            families.len() <= 1,
            errors::MIXED_OS_FAMILY,
            format!(
                "replication group {g} is of one OS family ({})",
                families.iter().copied().collect::<Vec<_>>().join("")
            ),
            format!("replication group {g} mixes OS families {families:?}: it cannot be reprotected"),
            errors::MIXED_OS_FAMILY.remedy,
        );
        let mts: std::collections::BTreeSet<&str> = members
            .iter()
            .filter_map(|m| req.machines.get(m).or(req.defaults.as_ref()))
            .map(|t| t.master_target.as_str())
            .collect();
        pf.check(
            "RG-2",
            mts.len() <= 1,
            errors::REPROTECT_REFUSED,
            format!(
                "replication group {g} reprotects to one master target ({})",
                mts.iter().copied().collect::<Vec<_>>().join("")
            ),
            format!("replication group {g} would reprotect to master targets {mts:?}: without one master target no common point in time exists (RG-2)"),
            "give every member of the group the same master target",
        );
    }
    for m in &machines {
        let Some(t) = req.machines.get(m).or(req.defaults.as_ref()) else { continue };
        let r = ReprotectRequest {
            master_target: t.master_target.clone(),
            process_server: t.process_server.clone(),
            datastore: t.datastore.clone(),
            stall_secs: req.stall_secs,
            discard_primary_changes: req.discard_primary_changes,
            clock_skew_secs: req.clock_skew_secs,
        };
        let name = resolved.get(m).unwrap_or(m);
        let f = crate::reprotect::checks(&s.store, name, &r, true).await?;
        pf.machines.push((name.clone(), f));
    }
    Ok(pf)
}

/// `POST /api/v1/recovery-plans/{name}/reprotect/dry-run`.
pub async fn dry_run(
    State(s): State<Arc<AppState>>,
    Path(name): Path<String>,
    Body(req): Body<PlanReprotectRequest>,
) -> crate::http::ApiResult {
    let plan = load_plan(&s, &name).await?;
    let pf = plan_checks(&s, &plan, &req).await?;
    crate::http::ok(PlanReprotectPlan {
        plan: name,
        ready: pf.ready(),
        checks: pf.checks.clone(),
        machines: pf.machines.iter().map(|(m, f)| f.plan(m)).collect(),
    })
}

/// `POST /api/v1/recovery-plans/{name}/reprotect`: the same checks; any failed one refuses the
/// request (nothing changed), else every reverse record is claimed and the job starts.
pub async fn reprotect(
    State(s): State<Arc<AppState>>,
    Path(name): Path<String>,
    Body(req): Body<PlanReprotectRequest>,
) -> crate::http::ApiResult {
    let job = tokio::spawn(async move { claim(&s, &name, &req).await })
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, errors::JOB_STATE, e.to_string()))??;
    Ok((StatusCode::ACCEPTED, Json(job)).into_response())
}

async fn claim(s: &Arc<AppState>, name: &str, req: &PlanReprotectRequest) -> Result<Job, ApiError> {
    let plan = load_plan(s, name).await?;
    let pf = plan_checks(s, &plan, req).await?;
    let failed: Vec<&ReprotectCheck> = pf.checks.iter().filter(|c| !c.passed).collect();
    if let Some(first) = failed.first() {
        let code = first.code.and_then(ferry_types::codes::by_code).unwrap_or(errors::REPROTECT_REFUSED);
        let all = failed.iter().map(|c| format!("{}: {}", c.id, c.message)).collect::<Vec<_>>().join("; ");
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            code,
            format!(
                "reprotect of recovery plan {name} refused, nothing was changed — {all} (remedy: {})",
                first.remedy.as_deref().unwrap_or("")
            ),
        ));
    }
    for (m, f) in &pf.machines {
        crate::reprotect::refuse_failed(m, f).map_err(|mut e| {
            e.message = format!("recovery plan {name}: {}", e.message);
            e
        })?;
    }
    let id = crate::jobs::Jobs::new_id();
    let mut claimed = Vec::new();
    for (_, f) in pf.machines {
        match crate::reprotect::claim_reverse(s, f, &id).await {
            Ok(c) => claimed.push(c),
            Err(mut e) => {
                for c in &claimed {
                    c.release(s).await;
                }
                e.message = format!("recovery plan {name} (nothing was changed): {}", e.message);
                return Err(e);
            }
        }
    }
    let pairs: Vec<(String, String)> =
        claimed.iter().map(|c| (c.forward.machine.clone(), c.reverse.machine.clone())).collect();
    let steps: Vec<(String, bool)> = ReprotectStep::ALL
        .iter()
        .map(|st| (claimed.iter().map(|c| st.name(&c.forward, &c.reverse)).collect::<Vec<_>>().join("; "), true))
        .collect();
    let work = JobWork::PlanReprotect { plan: name.to_owned(), machines: pairs, stall_secs: req.stall_secs };
    let started = match work.split() {
        Ok((kind, params)) => {
            s.jobs.start_with_id(id, s.ops.clone(), kind, name, steps, params).await.map_err(ApiError::from)
        }
        Err(e) => Err(e),
    };
    if started.is_err() {
        for c in &claimed {
            c.release(s).await;
        }
    }
    started
}

impl Ops {
    /// Step `step` of a plan reprotect: that reprotect step for every machine, in parallel.
    /// One machine failing fails the job: every reverse record still enabling is marked failed.
    /// A restarted server resumes the job at its step (every step is idempotent); a new plan
    /// reprotect after a failure is checked afresh (see docs/limitations.md for what that
    /// refuses).
    pub async fn plan_reprotect_step(
        &self,
        job: &Job,
        machines: &[(String, String)],
        stall_secs: u64,
        step: usize,
        ctl: &JobControl,
    ) -> Outcome {
        let runs = machines.iter().map(|(m, rm)| self.reprotect_step(job, m, rm, stall_secs, step, ctl));
        let results = futures::future::join_all(runs).await;
        let mut done = Vec::new();
        let mut failed = Vec::new();
        for ((m, _), r) in machines.iter().zip(results) {
            match r {
                Outcome::Done(msg) => done.push(format!("{m}: {}", msg.unwrap_or_else(|| "done".into()))),
                Outcome::Failed(e) => failed.push((m.clone(), e)),
                Outcome::WaitForInput(p) => failed
                    .push((m.clone(), crate::jobs::JobError::new(errors::JOB_STATE, format!("waits for input: {p}")))),
            }
        }
        if let Some((_, first)) = failed.first() {
            let detail: Vec<String> = failed.iter().map(|(m, e)| format!("{m}: {}", e.message)).collect();
            return fail(
                ferry_types::codes::by_code(first.code).unwrap_or(errors::PROTECTION_NOT_COMPLETED),
                format!(
                    "{} failed ({}){}",
                    failed.iter().map(|(m, _)| m.as_str()).collect::<Vec<_>>().join(", "),
                    detail.join("; "),
                    if done.is_empty() { String::new() } else { format!("; done: {}", done.join("; ")) }
                ),
            );
        }
        Outcome::Done(Some(done.join("; ")))
    }
}

/// `POST /api/v1/recovery-plans/{name}/failback`: the failover of every plan machine's reverse
/// protection (each must be Protected in the reverse direction), group by group.
pub async fn failback(
    State(s): State<Arc<AppState>>,
    Path(name): Path<String>,
    Body(req): Body<PlanFailbackRequest>,
) -> crate::http::ApiResult {
    let job = tokio::spawn(async move { claim_failback(&s, &name, req).await })
        .await
        .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, errors::JOB_STATE, e.to_string()))??;
    Ok((StatusCode::ACCEPTED, Json(job)).into_response())
}

async fn claim_failback(s: &Arc<AppState>, name: &str, req: PlanFailbackRequest) -> Result<Job, ApiError> {
    let plan = load_plan(s, name).await?;
    // RC-1: failback offers latest and latest app-consistent.
    let point = match (req.planned, req.point.as_deref()) {
        (true, Some(_)) => {
            return Err(ApiError::bad(
                "a planned failback goes to each machine's last write: it takes no point (an unplanned one does)",
            ))
        }
        (true, None) | (false, None) => "latest".to_owned(),
        (false, Some(p @ ("latest" | "latest-app"))) => p.to_owned(),
        (false, Some(p)) => {
            return Err(ApiError::bad(format!(
                "point {p:?}: a plan fails back to latest or latest-app (RC-1); a replication group's members go to one multi-machine point of that kind"
            )))
        }
    };
    if !(1..=86_400).contains(&req.drain_secs) {
        return Err(ApiError::bad(format!("drain_secs {}: 1 to 86400", req.drain_secs)));
    }
    let reason = crate::failover::check_reason(req.reason.as_deref(), format!("failback of recovery plan {name}"))?;
    let groups = crate::plan_failover::plan_machines(s, &plan).await?;
    let mut reverse_groups = Vec::new();
    for ms in &groups {
        let mut rs = Vec::new();
        for m in ms {
            let p = s
                .store
                .get::<Protection>(PROTECTION, m)
                .await?
                .ok_or_else(|| ApiError::not_found(format!("machine {m} of plan {name} is not protected")))?
                .body;
            let Some(rm) = p.reprotected_by else {
                return Err(crate::failover::failover_state_error(format!(
                    "machine {m} of plan {name} is not reprotected (it is failed back already, or was never failed over): reprotect the plan first (`ferry plans reprotect {name} …`) after a failover, then fail it back"
                )));
            };
            let reverse = s.store.get::<Protection>(PROTECTION, &rm).await?.map(|d| d.body);
            if reverse.as_ref().and_then(|r| r.reprotect.as_ref()).is_none_or(|r| r.of != *m) {
                return Err(crate::failover::failover_state_error(format!(
                    "machine {m} of plan {name} names {rm} as its reverse protection, which does not replicate it back: see `ferry machines`"
                )));
            }
            rs.push(rm);
        }
        reverse_groups.push(rs);
    }
    let docs = crate::plan_failover::free_machines(s, name, &reverse_groups).await?;
    let kind = if req.planned { FailoverKind::Planned } else { FailoverKind::Unplanned };
    let preq = PlanFailoverRequest {
        kind,
        point: None,
        reason: Some(reason.clone()),
        drain_secs: req.drain_secs,
        no_start: req.no_start,
    };
    crate::plan_failover::claim_groups(s, &plan, reverse_groups, docs, &preq, point, reason).await
}
