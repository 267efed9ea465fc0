//! The master target's recovery-point API (JSON over HTTP, on the status listener):
//!
//! - `GET  /machines/{m}/points` — points, the RC-1 selectors resolved, problems (RG-2)
//! - `POST /machines/{m}/points` `{"selector": "latest"}` — resolve a selector ("latest" takes a
//!   point at everything received)
//! - `GET  /groups/{g}/points` — multi-machine points of a replication group
//! - `POST /machines/{m}/materializations` — image files or NBD exports of a point
//! - `GET  /materializations`, `DELETE /materializations/{id}`
//! - `GET  /machines/{m}/changes?from=P[&to=Q]` — extents changed between two points (or the head)
//!
//! Errors are `{"code", "message", "remedy"}` with an HTTP status that says who must act.

use std::collections::{BTreeMap, HashMap, HashSet};
use std::sync::Arc;

use axum::extract::{Path as UrlPath, Query, State};
use axum::http::StatusCode;
use axum::routing::{delete, get};
use axum::{Json, Router};
use ferry_protocol::codes;

use crate::history::{GroupCommitted, Point};
use crate::recovery::{MaterializeRequest, MaterializedAs, PointError};
use crate::MasterTarget;

type Reply = (StatusCode, Json<serde_json::Value>);

fn error(status: StatusCode, code: u32, message: impl Into<String>, remedy: &str) -> Reply {
    (status, Json(serde_json::json!({ "code": code, "message": message.into(), "remedy": remedy })))
}

fn point_error(e: PointError) -> Reply {
    let (status, code) = match &e {
        PointError::NotFound(_) => (StatusCode::NOT_FOUND, codes::POINT_NOT_FOUND.code),
        PointError::Conflict(_) => (StatusCode::CONFLICT, codes::CONFLICT.code),
        PointError::Invalid(_) => (StatusCode::BAD_REQUEST, codes::BAD_REQUEST.code),
        PointError::Failed(_) => (StatusCode::INTERNAL_SERVER_ERROR, codes::MATERIALIZE_FAILED.code),
    };
    error(status, code, e.to_string(), e.remedy())
}

fn no_machine(m: &str) -> Reply {
    error(
        StatusCode::NOT_FOUND,
        codes::NOT_FOUND.code,
        format!("machine {m:?} is not replicated to this master target"),
        "check the machine name (`ferry master-target status`) and which master target protects it",
    )
}

/// The selectors of RC-1, in the order an operator reads them.
pub const SELECTORS: [&str; 5] = ["latest-processed", "latest-app", "latest-multi", "latest-multi-app", "latest"];

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
    pub fn group_points(&self, group: &str) -> serde_json::Value {
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
                points.push(serde_json::json!({
                    "id": tag, "group": group, "time_ms": g.prepare_time_ms,
                    "kind": if g.app { "app" } else { "crash" }, "scope": "multi", "members": seqs,
                }));
            } else {
                let absent: Vec<_> = missing.iter().filter(|m| !committed.contains_key(m.as_str())).cloned().collect();
                if !absent.is_empty() {
                    let p = rg2_problem(group, &absent);
                    if !problems.contains(&p) {
                        problems.push(p);
                    }
                }
                incomplete.push(serde_json::json!({ "tag": tag, "committed_by": seqs.keys().collect::<Vec<_>>(), "missing": missing }));
            }
        }
        points.sort_by_key(|p| p["time_ms"].as_u64().unwrap_or(0));
        serde_json::json!({ "group": group, "points": points, "incomplete_tags": incomplete, "problems": problems })
    }

    pub fn materializations(&self) -> Vec<crate::Materialization> {
        let replicas: Vec<_> = self.lock_replicas().values().cloned().collect();
        let mut all: Vec<_> = replicas.iter().flat_map(|r| r.materializations()).collect();
        all.sort_by(|a, b| a.id.cmp(&b.id));
        all
    }

    fn describe(&self, m: &crate::Materialization) -> serde_json::Value {
        let mut v = serde_json::to_value(m).unwrap_or_default();
        if let MaterializedAs::Export { exports, .. } = &m.what {
            let sock = self.config.nbd_socket();
            let urls: Vec<_> = exports
                .iter()
                .map(|e| {
                    let mut u = vec![format!("nbd+unix:///{e}?socket={}", sock.display())];
                    if let Some(l) = &self.config.nbd_listen {
                        u.push(format!("nbd://{l}/{e}"));
                    }
                    u
                })
                .collect();
            v["nbd_urls"] = serde_json::json!(urls);
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
        kind: if g.app { "app" } else { "crash" }.into(),
        scope: "multi".into(),
        group: Some(g.group.clone()),
        group_tag: Some(g.tag.clone()),
        generation,
        origin: "group".into(),
    }
}

pub(crate) fn routes(mt: Arc<MasterTarget>) -> Router {
    Router::new()
        .route("/machines/{m}/points", get(list_points).post(select_point))
        .route("/groups/{g}/points", get(list_group_points))
        .route("/machines/{m}/materializations", axum::routing::post(materialize))
        .route("/materializations", get(list_materializations))
        .route("/materializations/{id}", delete(discard))
        .route("/machines/{m}/changes", get(changes))
        .with_state(mt)
}

async fn list_points(State(mt): State<Arc<MasterTarget>>, UrlPath(m): UrlPath<String>) -> Reply {
    let mt2 = mt.clone();
    let m2 = m.clone();
    let Ok(Some((points, problems))) = tokio::task::spawn_blocking(move || mt2.points_of(&m2)).await else {
        return no_machine(&m);
    };
    let pick = |f: &dyn Fn(&Point) -> bool| points.iter().rev().find(|p| f(p)).map(|p| p.id.clone());
    let selectors = serde_json::json!({
        "latest": "taken on request: POST {\"selector\": \"latest\"} (everything received)",
        "latest-processed": pick(&|_| true),
        "latest-app": pick(&|p| p.is_app()),
        "latest-multi": pick(&|p| p.is_multi()),
        "latest-multi-app": pick(&|p| p.is_multi() && p.is_app()),
    });
    (
        StatusCode::OK,
        Json(serde_json::json!({ "machine": m, "points": points, "selectors": selectors, "problems": problems })),
    )
}

#[derive(serde::Deserialize)]
#[serde(deny_unknown_fields)]
struct SelectRequest {
    selector: String,
}

async fn select_point(
    State(mt): State<Arc<MasterTarget>>,
    UrlPath(m): UrlPath<String>,
    body: Result<Json<SelectRequest>, axum::extract::rejection::JsonRejection>,
) -> Reply {
    let Json(req) = match body {
        Ok(b) => b,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                codes::BAD_REQUEST.code,
                format!("bad request: {e}"),
                "send JSON {\"selector\": \"latest\"} (or latest-processed, latest-app, latest-multi, latest-multi-app, a point ID)",
            )
        }
    };
    if mt.replica(&m).is_none() {
        return no_machine(&m);
    }
    match tokio::task::spawn_blocking(move || mt.resolve_point(&m, &req.selector)).await {
        Ok(Ok(p)) => (StatusCode::OK, Json(serde_json::to_value(p).unwrap_or_default())),
        Ok(Err(e)) => point_error(e),
        Err(e) => {
            error(StatusCode::INTERNAL_SERVER_ERROR, codes::MATERIALIZE_FAILED.code, e.to_string(), "see the log")
        }
    }
}

async fn list_group_points(State(mt): State<Arc<MasterTarget>>, UrlPath(g): UrlPath<String>) -> Reply {
    match tokio::task::spawn_blocking(move || mt.group_points(&g)).await {
        Ok(v) => (StatusCode::OK, Json(v)),
        Err(e) => {
            error(StatusCode::INTERNAL_SERVER_ERROR, codes::MATERIALIZE_FAILED.code, e.to_string(), "see the log")
        }
    }
}

async fn materialize(
    State(mt): State<Arc<MasterTarget>>,
    UrlPath(m): UrlPath<String>,
    body: Result<Json<MaterializeRequest>, axum::extract::rejection::JsonRejection>,
) -> Reply {
    let Json(req) = match body {
        Ok(b) => b,
        Err(e) => {
            return error(
                StatusCode::BAD_REQUEST,
                codes::BAD_REQUEST.code,
                format!("bad materialization request: {e}"),
                "send JSON {\"point\": \"latest-processed\", \"kind\": \"image\"|\"export\", \"format\": \"raw\"|\"qcow2\"|\"vmdk\"|\"vhd\", \"writable\": false}",
            )
        }
    };
    let Some(r) = mt.replica(&m) else { return no_machine(&m) };
    let result = tokio::task::spawn_blocking(move || {
        let point = mt.resolve_point(&m, &req.point)?;
        let mat = r.materialize(point, &req, &r.datastore.clone(), &mt.config.nbd_socket())?;
        Ok::<_, PointError>(mt.describe(&mat))
    })
    .await;
    match result {
        Ok(Ok(v)) => (StatusCode::CREATED, Json(v)),
        Ok(Err(e)) => point_error(e),
        Err(e) => {
            error(StatusCode::INTERNAL_SERVER_ERROR, codes::MATERIALIZE_FAILED.code, e.to_string(), "see the log")
        }
    }
}

async fn list_materializations(State(mt): State<Arc<MasterTarget>>) -> Reply {
    let all: Vec<_> = mt.materializations().iter().map(|m| mt.describe(m)).collect();
    (StatusCode::OK, Json(serde_json::json!({ "materializations": all })))
}

async fn discard(State(mt): State<Arc<MasterTarget>>, UrlPath(id): UrlPath<String>) -> Reply {
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
    .await;
    match result {
        Ok(Ok(Some(m))) => (StatusCode::OK, Json(serde_json::json!({ "discarded": m.id, "point": m.point.id }))),
        Ok(Ok(None)) => error(
            StatusCode::NOT_FOUND,
            codes::NOT_FOUND.code,
            format!("no materialization {id:?}"),
            "list them with `ferry master-target materializations`",
        ),
        Ok(Err(e)) => {
            error(StatusCode::INTERNAL_SERVER_ERROR, codes::STORAGE.code, e, "check permissions on the image folder")
        }
        Err(e) => error(StatusCode::INTERNAL_SERVER_ERROR, codes::STORAGE.code, e.to_string(), "see the log"),
    }
}

#[derive(serde::Deserialize)]
struct ChangesQuery {
    from: String,
    #[serde(default)]
    to: Option<String>,
}

async fn changes(
    State(mt): State<Arc<MasterTarget>>,
    UrlPath(m): UrlPath<String>,
    q: Result<Query<ChangesQuery>, axum::extract::rejection::QueryRejection>,
) -> Reply {
    let Ok(Query(q)) = q else {
        return error(
            StatusCode::BAD_REQUEST,
            codes::BAD_REQUEST.code,
            "missing `from`",
            "ask GET /machines/M/changes?from=POINT[&to=POINT] (POINT: an ID, a seq or a selector; `to` defaults to the head)",
        );
    };
    let Some(r) = mt.replica(&m) else { return no_machine(&m) };
    let result = tokio::task::spawn_blocking(move || {
        let from = mt.resolve_point(&m, &q.from)?.seq;
        let to = match q.to.as_deref() {
            None | Some("head") => None,
            Some(t) => Some(mt.resolve_point(&m, t)?.seq),
        };
        r.changed_extents(from, to)
    })
    .await;
    match result {
        Ok(Ok(v)) => (StatusCode::OK, Json(v)),
        Ok(Err(e)) => point_error(e),
        Err(e) => {
            error(StatusCode::INTERNAL_SERVER_ERROR, codes::MATERIALIZE_FAILED.code, e.to_string(), "see the log")
        }
    }
}
