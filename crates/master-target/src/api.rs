//! The master target's recovery-point API on its status listener. The routes are listed once,
//! in `ferry_api::master_target::ROUTES` (which also writes `docs/openapi/master-target.json`);
//! [`router`] gives each its handler. Errors are Ferry's `{code, name, message, remedy}` with an
//! HTTP status that says who must act.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use axum::extract::{Path as UrlPath, Query, State};
use axum::http::StatusCode;
use axum::routing::{on, MethodRouter};
use axum::{Json, Router};
use ferry_api::control::ComponentStatus;
pub use ferry_api::master_target::SELECTORS;
use ferry_api::master_target::{
    Changes, ChangesQuery, Discarded, GroupPoint, GroupPoints, IncompleteTag, MasterTargetEndpoint,
    MaterializationList, PointKind, PointList, PointOrigin, PointScope, SelectPoint, Selectors, ROUTES,
};
use ferry_protocol::codes;
use ferry_status::{method_filter, ok, Failure, JsonBody, Reply};

use ferry_api::master_target::{Failover, FailoverRequest};

use crate::failover::FailoverError;
use crate::history::{GroupCommitted, Point};
use crate::recovery::{MaterializeRequest, MaterializedAs, PointError};
use crate::MasterTarget;

fn point_error(e: PointError) -> Failure {
    let (status, code) = match &e {
        PointError::NotFound(_) => (StatusCode::NOT_FOUND, codes::POINT_NOT_FOUND),
        PointError::Conflict(_) => (StatusCode::CONFLICT, codes::CONFLICT),
        PointError::Invalid(_) => (StatusCode::BAD_REQUEST, codes::BAD_REQUEST),
        PointError::Failed(_) => (StatusCode::INTERNAL_SERVER_ERROR, codes::MATERIALIZE_FAILED),
    };
    Failure::with_status(status, code, e.to_string(), e.remedy())
}

fn no_machine(m: &str) -> Failure {
    Failure::with_status(
        StatusCode::NOT_FOUND,
        codes::NOT_FOUND,
        format!("machine {m:?} is not replicated to this master target"),
        "check the machine name (`ferry master-target status`) and which master target protects it",
    )
}

fn joined(e: tokio::task::JoinError) -> Failure {
    Failure::internal(e.to_string())
}

impl MasterTarget {
    /// Every machine's committed group tags (to decide which group tags are complete).
    fn committed_tags(&self) -> HashMap<String, HashSet<(String, String)>> {
        let replicas: Vec<_> = self.lock_replicas().values().cloned().collect();
        replicas
            .into_iter()
            .map(|r| {
                let (_, groups) = r.local_points();
                (r.name.clone(), groups.into_iter().map(|g| (g.group, g.tag)).collect())
            })
            .collect()
    }

    /// A machine's points (single- and multi-machine, oldest first) and problems to report.
    pub fn points_of(&self, machine: &str) -> Option<(Vec<Point>, Vec<String>)> {
        let r = self.replica(machine)?;
        let (mut points, groups) = r.local_points();
        let committed = self.committed_tags();
        let mut problems = Vec::new();
        for g in groups {
            let (complete, missing) = group_complete(&g, &committed);
            if complete {
                points.push(multi_point(machine, &g, r.points_generation(g.prepare_seq, r.base_generation())));
                continue;
            }
            let absent: Vec<_> = missing.iter().filter(|m| !committed.contains_key(m.as_str())).cloned().collect();
            if !absent.is_empty() {
                let p = rg2_problem(&g.group, &absent);
                if !problems.contains(&p) {
                    problems.push(p);
                }
            } else {
                tracing::debug!(group = %g.group, tag = %g.tag, ?missing, "group tag not committed by every member");
            }
        }
        points.sort_by_key(|p| p.seq);
        Some((points, problems))
    }

    /// Resolve a point reference for a machine: a selector, a point ID or a seq.
    pub fn resolve_point(&self, machine: &str, reference: &str) -> Result<Point, PointError> {
        let r = self
            .replica(machine)
            .ok_or_else(|| PointError::NotFound(format!("machine {machine:?} is not replicated here")))?;
        if reference == "latest" {
            return r.take_latest();
        }
        let (points, problems) = self
            .points_of(machine)
            .ok_or_else(|| PointError::NotFound(format!("machine {machine:?} is not replicated here")))?;
        let reason = r.no_points_reason();
        let newest = |f: &dyn Fn(&Point) -> bool, what: &str| {
            points.iter().rev().find(|p| f(p)).cloned().ok_or_else(|| {
                if let Some(why) = &reason {
                    return PointError::NotFound(why.clone());
                }
                let mut msg = format!("{machine} has no {what} recovery point inside the retention window");
                if let Some(p) = problems.first() {
                    msg.push_str(&format!(" ({p})"));
                }
                PointError::NotFound(msg)
            })
        };
        match reference {
            "latest-processed" => newest(&|_| true, "processed"),
            "latest-app" => newest(&|p| p.is_app(), "app-consistent"),
            "latest-multi" => newest(&|p| p.is_multi(), "multi-machine"),
            "latest-multi-app" => newest(&|p| p.is_multi() && p.is_app(), "multi-machine app-consistent"),
            other => {
                let seq = other.strip_prefix(&format!("{machine}@")).unwrap_or(other).parse::<u64>().map_err(|_| {
                    PointError::Invalid(format!(
                        "{other:?} is neither a point ID ({machine}@SEQ), a seq, nor one of: {}",
                        SELECTORS.join(", ")
                    ))
                })?;
                points.into_iter().find(|p| p.seq == seq).ok_or_else(|| {
                    PointError::NotFound(format!(
                        "{machine} has no recovery point at seq {seq} (pruned, or never a point)"
                    ))
                })
            }
        }
    }

    /// Multi-machine points of a group: complete tags with each member's position.
    pub fn group_points(&self, group: &str) -> GroupPoints {
        let committed = self.committed_tags();
        let replicas: Vec<_> = self.lock_replicas().values().cloned().collect();
        let mut tags: BTreeMap<String, (GroupCommitted, BTreeMap<String, u64>)> = BTreeMap::new();
        for r in &replicas {
            for g in r.local_points().1.into_iter().filter(|g| g.group == group) {
                let e = tags.entry(g.tag.clone()).or_insert_with(|| (g.clone(), BTreeMap::new()));
                e.1.insert(r.name.clone(), g.prepare_seq);
            }
        }
        let mut points = Vec::new();
        let mut incomplete = Vec::new();
        let mut problems = Vec::new();
        for (tag, (g, seqs)) in &tags {
            let (complete, missing) = group_complete(g, &committed);
            if complete {
                points.push(GroupPoint {
                    id: tag.clone(),
                    group: group.to_owned(),
                    time_ms: g.prepare_time_ms,
                    kind: if g.app { PointKind::App } else { PointKind::Crash },
                    scope: PointScope::Multi,
                    members: seqs.clone(),
                });
            } else {
                let absent: Vec<_> = missing.iter().filter(|m| !committed.contains_key(m.as_str())).cloned().collect();
                if !absent.is_empty() {
                    let p = rg2_problem(group, &absent);
                    if !problems.contains(&p) {
                        problems.push(p);
                    }
                }
                incomplete.push(IncompleteTag {
                    tag: tag.clone(),
                    committed_by: seqs.keys().cloned().collect(),
                    missing,
                });
            }
        }
        points.sort_by_key(|p| p.time_ms);
        GroupPoints { group: group.to_owned(), points, incomplete_tags: incomplete, problems }
    }

    pub fn materializations(&self) -> Vec<crate::Materialization> {
        let replicas: Vec<_> = self.lock_replicas().values().cloned().collect();
        let mut all: Vec<_> = replicas.iter().flat_map(|r| r.materializations()).collect();
        all.sort_by(|a, b| a.id.cmp(&b.id));
        all
    }

    /// A materialization as the API shows it (with the NBD URLs of exports).
    fn describe(&self, m: &crate::Materialization) -> crate::Materialization {
        let mut v = m.clone();
        if let MaterializedAs::Export { exports, .. } = &m.what {
            let sock = self.config.nbd_socket();
            let urls: Vec<_> =
                exports.iter().map(|e| vec![format!("nbd+unix:///{e}?socket={}", sock.display())]).collect();
            v.nbd_urls = urls;
        }
        v
    }
}

fn rg2_problem(group: &str, absent: &[String]) -> String {
    format!(
        "group {group} includes {} not replicated to this master target: all machines of a replication group must use the same master target (RG-2), otherwise no common point exists",
        absent.join(", ")
    )
}

fn group_complete(g: &GroupCommitted, committed: &HashMap<String, HashSet<(String, String)>>) -> (bool, Vec<String>) {
    let key = (g.group.clone(), g.tag.clone());
    let missing: Vec<String> =
        g.members.iter().filter(|m| !committed.get(m.as_str()).is_some_and(|s| s.contains(&key))).cloned().collect();
    (missing.is_empty() && !g.members.is_empty(), missing)
}

fn multi_point(machine: &str, g: &GroupCommitted, generation: u64) -> Point {
    Point {
        id: format!("{machine}@{}", g.prepare_seq),
        machine: machine.to_owned(),
        seq: g.prepare_seq,
        time_ms: g.prepare_time_ms,
        kind: if g.app { PointKind::App } else { PointKind::Crash },
        scope: PointScope::Multi,
        group: Some(g.group.clone()),
        group_tag: Some(g.tag.clone()),
        generation,
        origin: PointOrigin::Group,
    }
}

/// The status listener's router: every route of the table with its handler.
pub(crate) fn router(mt: Arc<MasterTarget>, access: &ferry_status::Access) -> Router {
    let status = mt.clone();
    ferry_status::router_from(ROUTES, access, |r| {
        let m = method_filter(r.method);
        let h: MethodRouter<Arc<MasterTarget>> = match r.id {
            MasterTargetEndpoint::Status => {
                let status = status.clone();
                return ferry_status::status_route(move || ComponentStatus::MasterTarget(status.status()))
                    .with_state(());
            }
            MasterTargetEndpoint::ListPoints => on(m, list_points),
            MasterTargetEndpoint::SelectPoint => on(m, select_point),
            MasterTargetEndpoint::GroupPoints => on(m, list_group_points),
            MasterTargetEndpoint::Materialize => on(m, materialize),
            MasterTargetEndpoint::ListMaterializations => on(m, list_materializations),
            MasterTargetEndpoint::Discard => on(m, discard),
            MasterTargetEndpoint::Changes => on(m, changes),
            MasterTargetEndpoint::Fence => on(m, fence),
            MasterTargetEndpoint::Failover => on(m, failover),
            MasterTargetEndpoint::CommitFailover => on(m, commit_failover),
        };
        h.with_state(mt.clone())
    })
}

async fn list_points(State(mt): State<Arc<MasterTarget>>, UrlPath(m): UrlPath<String>) -> Reply<PointList> {
    let mt2 = mt.clone();
    let m2 = m.clone();
    let Some((points, problems)) = tokio::task::spawn_blocking(move || mt2.points_of(&m2)).await.map_err(joined)?
    else {
        return Err(no_machine(&m));
    };
    let pick = |f: &dyn Fn(&Point) -> bool| points.iter().rev().find(|p| f(p)).map(|p| p.id.clone());
    let selectors = Selectors {
        latest: "taken on request: POST {\"selector\": \"latest\"} (everything received)".into(),
        latest_processed: pick(&|_| true),
        latest_app: pick(&|p| p.is_app()),
        latest_multi: pick(&|p| p.is_multi()),
        latest_multi_app: pick(&|p| p.is_multi() && p.is_app()),
    };
    ok(PointList { machine: m, points, selectors, problems })
}

async fn select_point(
    State(mt): State<Arc<MasterTarget>>,
    UrlPath(m): UrlPath<String>,
    JsonBody(req): JsonBody<SelectPoint>,
) -> Reply<Point> {
    if mt.replica(&m).is_none() {
        return Err(no_machine(&m));
    }
    let p = tokio::task::spawn_blocking(move || mt.resolve_point(&m, &req.selector)).await.map_err(joined)?;
    ok(p.map_err(point_error)?)
}

async fn list_group_points(State(mt): State<Arc<MasterTarget>>, UrlPath(g): UrlPath<String>) -> Reply<GroupPoints> {
    ok(tokio::task::spawn_blocking(move || mt.group_points(&g)).await.map_err(joined)?)
}

async fn materialize(
    State(mt): State<Arc<MasterTarget>>,
    UrlPath(m): UrlPath<String>,
    JsonBody(req): JsonBody<MaterializeRequest>,
) -> Reply<crate::Materialization> {
    let Some(r) = mt.replica(&m) else { return Err(no_machine(&m)) };
    let result = tokio::task::spawn_blocking(move || {
        let point = mt.resolve_point(&m, &req.point)?;
        let mat =
            r.materialize(point, &req, &r.datastore.clone(), &mt.config.nbd_socket(), mt.config.image_root.as_deref())?;
        Ok::<_, PointError>(mt.describe(&mat))
    })
    .await
    .map_err(joined)?;
    Ok((StatusCode::CREATED, Json(result.map_err(point_error)?)))
}

async fn list_materializations(State(mt): State<Arc<MasterTarget>>) -> Reply<MaterializationList> {
    ok(MaterializationList { materializations: mt.materializations().iter().map(|m| mt.describe(m)).collect() })
}

async fn discard(State(mt): State<Arc<MasterTarget>>, UrlPath(id): UrlPath<String>) -> Reply<Discarded> {
    let replicas: Vec<_> = mt.lock_replicas().values().cloned().collect();
    let id2 = id.clone();
    let result = tokio::task::spawn_blocking(move || {
        for r in replicas {
            if let Some(m) = r.discard(&id2)? {
                return Ok(Some(m));
            }
        }
        Ok::<_, String>(None)
    })
    .await
    .map_err(joined)?;
    match result {
        Ok(Some(m)) => ok(Discarded { discarded: m.id, point: m.point.id }),
        Ok(None) => Err(Failure::with_status(
            StatusCode::NOT_FOUND,
            codes::NOT_FOUND,
            format!("no materialization {id:?}"),
            "list them with `ferry master-target materializations`",
        )),
        Err(e) => Err(Failure::with_status(
            StatusCode::INTERNAL_SERVER_ERROR,
            codes::STORAGE,
            e,
            "check permissions on the image folder",
        )),
    }
}

async fn changes(
    State(mt): State<Arc<MasterTarget>>,
    UrlPath(m): UrlPath<String>,
    q: Result<Query<ChangesQuery>, axum::extract::rejection::QueryRejection>,
) -> Reply<Changes> {
    let Ok(Query(q)) = q else {
        return Err(Failure::with_status(
            StatusCode::BAD_REQUEST,
            codes::BAD_REQUEST,
            "missing `from`",
            "ask GET /machines/M/changes?from=POINT[&to=POINT] (POINT: an ID, a seq or a selector; `to` defaults to the head)",
        ));
    };
    let Some(r) = mt.replica(&m) else { return Err(no_machine(&m)) };
    let result = tokio::task::spawn_blocking(move || {
        let from = mt.resolve_point(&m, &q.from)?.seq;
        let to = match q.to.as_deref() {
            None | Some("head") => None,
            Some(t) => Some(mt.resolve_point(&m, t)?.seq),
        };
        r.changed_extents(from, to)
    })
    .await
    .map_err(joined)?;
    ok(result.map_err(point_error)?)
}

fn check_reason(reason: &str) -> Result<String, Failure> {
    let reason = reason.trim();
    if reason.is_empty() || reason.chars().count() > 200 || reason.chars().any(char::is_control) {
        return Err(Failure::with_status(
            StatusCode::BAD_REQUEST,
            codes::BAD_REQUEST,
            "the fence needs a reason: one line of 1 to 200 characters",
            "send {\"reason\": \"failover of vm1\"}",
        ));
    }
    Ok(reason.to_owned())
}

fn failover_error(e: FailoverError) -> Failure {
    match e {
        FailoverError::Point(p) => point_error(p),
        FailoverError::State(msg) => {
            Failure::with_status(StatusCode::CONFLICT, codes::FAILOVER_STATE, msg, codes::FAILOVER_STATE.remedy)
        }
        FailoverError::DiskInUse(msg) => {
            Failure::with_status(StatusCode::CONFLICT, codes::DISK_IN_USE, msg, codes::DISK_IN_USE.remedy)
        }
        FailoverError::Storage(msg) => {
            Failure::with_status(StatusCode::INTERNAL_SERVER_ERROR, codes::STORAGE, msg, codes::STORAGE.remedy)
        }
    }
}

async fn failover(
    State(mt): State<Arc<MasterTarget>>,
    UrlPath(m): UrlPath<String>,
    JsonBody(req): JsonBody<FailoverRequest>,
) -> Reply<Failover> {
    let reason = check_reason(&req.reason)?;
    if req.recovery_writes.len() > 1_000_000 {
        return Err(Failure::with_status(
            StatusCode::BAD_REQUEST,
            codes::BAD_REQUEST,
            format!("{} recovery writes: at most 1000000 extents", req.recovery_writes.len()),
            "merge adjacent extents (the agent's change set is already merged)",
        ));
    }
    if mt.replica(&m).is_none() {
        return Err(no_machine(&m));
    }
    let result = tokio::task::spawn_blocking(move || mt.fail_over(&m, &req.point, &reason, req.recovery_writes, None))
        .await
        .map_err(joined)?;
    ok(result.map_err(failover_error)?)
}

async fn commit_failover(State(mt): State<Arc<MasterTarget>>, UrlPath(m): UrlPath<String>) -> Reply<Failover> {
    let Some(r) = mt.replica(&m) else { return Err(no_machine(&m)) };
    let result = tokio::task::spawn_blocking(move || r.commit_failover(None)).await.map_err(joined)?;
    ok(result.map_err(failover_error)?)
}

async fn fence(
    State(mt): State<Arc<MasterTarget>>,
    UrlPath(m): UrlPath<String>,
    JsonBody(req): JsonBody<ferry_api::master_target::FenceRequest>,
) -> Reply<crate::replica::Fence> {
    let reason = check_reason(&req.reason)?;
    let Some(r) = mt.replica(&m) else { return Err(no_machine(&m)) };
    let f = tokio::task::spawn_blocking(move || r.set_fence(&reason)).await.map_err(joined)?;
    ok(f.map_err(|e| {
        Failure::with_status(StatusCode::INTERNAL_SERVER_ERROR, codes::STORAGE, e.to_string(), codes::STORAGE.remedy)
    })?)
}
