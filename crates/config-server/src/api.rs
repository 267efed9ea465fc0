//! The REST API under `/api/v1`. Every route is listed once in [`ROUTES`], which also generates the
//! OpenAPI document (`openapi.json`, committed; a test fails when it drifts). Every error is
//! `{code, name, message, remedy}` from the error table. Tokens are stored hashed (BLAKE3);
//! roles: reader (sees everything, changes nothing) < operator < admin; `component` tokens (given
//! at registration) may only send heartbeats.
//!
//! Size: the route table and the handlers of the small objects; moving each object's handlers beside its model is planned (docs/limitations.md).

use std::sync::Arc;

use axum::extract::{Path, Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, post};
use axum::{Json, Router};
use serde::Deserialize;

use crate::errors::{self, ApiError};
pub(crate) use crate::http::{created, ok, ApiResult};
pub use crate::http::{hash_token, new_token, Body, Caller, Role};
use crate::jobs::Job;
use crate::model::{self, Policy, RecoveryPlan, ReplicationGroup};
use crate::ops::{self, Ops, Site};
use crate::settings::{get_settings, put_settings};
use crate::AppState;

/// A documented route (one place for the router and the OpenAPI document).
pub struct RouteDoc {
    pub method: &'static str,
    pub path: &'static str,
    pub summary: &'static str,
    /// Minimum role, or "none".
    pub role: &'static str,
}

macro_rules! routes {
    ($($method:ident $path:literal $role:literal $summary:literal;)*) => {
        pub const ROUTES: &[RouteDoc] = &[$(RouteDoc { method: stringify!($method), path: $path, summary: $summary, role: $role }),*];
    };
}

routes! {
    get "/api/v1/openapi.json" "none" "This OpenAPI document";
    get "/api/v1/errors" "none" "The error-code table (code, name, meaning, remedy)";
    get "/api/v1/server" "none" "Server identity: version, database backend, CA fingerprint";
    get "/api/v1/ca" "none" "The CA certificate (PEM); check its fingerprint before trusting it";
    post "/api/v1/register" "none" "Register a component: passphrase + certificate request (CSR) -> certificate and component token";
    get "/api/v1/tokens" "admin" "List API tokens (never their secrets)";
    post "/api/v1/tokens" "admin" "Create an API token {name, role}: the secret is shown once";
    delete "/api/v1/tokens/{id}" "admin" "Revoke a token";
    post "/api/v1/registration/passphrase" "admin" "Rotate the registration passphrase (shown once)";
    get "/api/v1/policies" "reader" "List replication policies";
    post "/api/v1/policies" "operator" "Create a replication policy (its read-only -failback policy is created with it, POL-2)";
    get "/api/v1/policies/{name}" "reader" "Show a policy";
    put "/api/v1/policies/{name}" "operator" "Replace a policy (failback policies are read-only)";
    delete "/api/v1/policies/{name}" "operator" "Delete a forward policy and its failback policy";
    get "/api/v1/replication-groups" "reader" "List replication groups";
    post "/api/v1/replication-groups" "operator" "Create a replication group (one OS family, RG-1)";
    get "/api/v1/replication-groups/{name}" "reader" "Show a replication group";
    put "/api/v1/replication-groups/{name}" "operator" "Replace a replication group";
    delete "/api/v1/replication-groups/{name}" "operator" "Delete a replication group";
    get "/api/v1/recovery-plans" "reader" "List recovery plans";
    post "/api/v1/recovery-plans" "operator" "Create a recovery plan (<= 7 groups, <= 100 machines)";
    get "/api/v1/recovery-plans/{name}" "reader" "Show a recovery plan";
    put "/api/v1/recovery-plans/{name}" "operator" "Replace a recovery plan";
    delete "/api/v1/recovery-plans/{name}" "operator" "Delete a recovery plan";
    post "/api/v1/recovery-plans/{name}/drill" "operator" "Start a drill job: the plan's pre/post actions in order (manual ones wait for input)";
    get "/api/v1/sites" "reader" "List sites";
    post "/api/v1/sites" "operator" "Add a site {name, provider: local, path} and discover it";
    get "/api/v1/sites/{name}" "reader" "Show a site";
    delete "/api/v1/sites/{name}" "operator" "Remove a site and its inventory";
    post "/api/v1/sites/{name}/discover" "operator" "Rediscover a site now (a job)";
    post "/api/v1/sites/{name}/operations" "operator" "A provider operation (power-on/off, create/delete-machine, attach/detach-disk, create/merge-snapshots) as a job";
    get "/api/v1/inventory" "reader" "The discovered inventory of every site";
    get "/api/v1/jobs" "reader" "List jobs, newest first";
    get "/api/v1/jobs/{id}" "reader" "Show a job: steps, progress, bytes, ETA, state, error";
    post "/api/v1/jobs/{id}/confirm" "operator" "Confirm the manual action a job waits for";
    post "/api/v1/jobs/{id}/cancel" "operator" "Cancel a job";
    get "/api/v1/events" "reader" "Recent events (health transitions, discovery warnings, restores)";
    post "/api/v1/heartbeats" "component" "A component's heartbeat with its status";
    get "/api/v1/components" "reader" "Components with health (Healthy / Warning / Critical) and reasons";
    get "/api/v1/components/{kind}/{name}/settings" "component" "A component's effective settings (its configuration keys, plus what its policy implies)";
    put "/api/v1/components/{kind}/{name}/settings" "operator" "Set a component's configuration keys (peers, disks, policy...)";
    post "/api/v1/backups" "admin" "Start a backup job (encrypted file in the backup folder)";
    post "/api/v1/protections" "operator" "Enable replication {machine | machines | group, policy, process_server, master_target, datastore}: a protect job (initial sync with progress)";
    get "/api/v1/machines" "reader" "Every discovered machine: protection state, health, RPO, points";
    get "/api/v1/machines/{name}/recovery-points" "reader" "The recovery points a protected machine's master target holds";
}

/// The OpenAPI 3.1 document, generated from [`ROUTES`].
pub fn openapi() -> serde_json::Value {
    let mut paths = serde_json::Map::new();
    for r in ROUTES {
        let entry = paths.entry(r.path.to_owned()).or_insert_with(|| serde_json::json!({}));
        let params: Vec<serde_json::Value> = r
            .path
            .split('/')
            .filter_map(|s| s.strip_prefix('{').and_then(|s| s.strip_suffix('}')))
            .map(|p| serde_json::json!({"name": p, "in": "path", "required": true, "schema": {"type": "string"}}))
            .collect();
        let mut op = serde_json::json!({
            "summary": r.summary,
            "x-ferry-role": r.role,
            "responses": {
                "200": {"description": "OK", "content": {"application/json": {}}},
                "default": {"description": "Error", "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}},
            },
        });
        if !params.is_empty() {
            op["parameters"] = serde_json::Value::Array(params);
        }
        if r.role != "none" {
            op["security"] = serde_json::json!([{"token": []}]);
        }
        if matches!(r.method, "post" | "put") {
            op["requestBody"] = serde_json::json!({"content": {"application/json": {"schema": {"type": "object"}}}});
        }
        entry[r.method] = op;
    }
    serde_json::json!({
        "openapi": "3.1.0",
        "info": {"title": "Ferry configuration server", "version": "1"},
        "paths": paths,
        "components": {
            "securitySchemes": {"token": {"type": "http", "scheme": "bearer"}},
            "schemas": {"Error": {"type": "object", "required": ["code", "message", "remedy"], "properties": {
                "code": {"type": "integer"}, "name": {"type": "string"}, "message": {"type": "string"}, "remedy": {"type": "string"}}}},
        },
    })
}

pub fn router(state: Arc<AppState>) -> Router {
    Router::new()
        .route("/api/v1/openapi.json", get(|| async { Json(openapi()) }))
        .route("/api/v1/errors", get(|| async { Json(errors::ALL) }))
        .route("/api/v1/server", get(server_info))
        .route("/api/v1/ca", get(ca_pem))
        .route("/api/v1/register", post(crate::registration::register))
        .route("/api/v1/tokens", get(list_tokens).post(create_token))
        .route("/api/v1/tokens/{id}", axum::routing::delete(delete_token))
        .route("/api/v1/registration/passphrase", post(rotate_passphrase))
        .route("/api/v1/policies", get(list_policies).post(create_policy))
        .route("/api/v1/policies/{name}", get(get_policy).put(put_policy).delete(delete_policy))
        .route("/api/v1/replication-groups", get(list_groups).post(create_group))
        .route("/api/v1/replication-groups/{name}", get(get_group).put(put_group).delete(delete_group))
        .route("/api/v1/recovery-plans", get(list_plans).post(create_plan))
        .route("/api/v1/recovery-plans/{name}", get(get_plan).put(put_plan).delete(delete_plan))
        .route("/api/v1/recovery-plans/{name}/drill", post(drill_plan))
        .route("/api/v1/sites", get(list_sites).post(create_site))
        .route("/api/v1/sites/{name}", get(get_site).delete(delete_site))
        .route("/api/v1/sites/{name}/discover", post(discover_site))
        .route("/api/v1/sites/{name}/operations", post(site_operation))
        .route("/api/v1/inventory", get(inventory))
        .route("/api/v1/jobs", get(list_jobs))
        .route("/api/v1/jobs/{id}", get(get_job))
        .route("/api/v1/jobs/{id}/confirm", post(confirm_job))
        .route("/api/v1/jobs/{id}/cancel", post(cancel_job))
        .route("/api/v1/events", get(events))
        .route("/api/v1/heartbeats", post(crate::health::heartbeat))
        .route("/api/v1/components", get(crate::health::components))
        .route("/api/v1/components/{kind}/{name}/settings", get(get_settings).put(put_settings))
        .route("/api/v1/backups", post(start_backup))
        .route("/api/v1/protections", post(crate::protection::protect))
        .route("/api/v1/machines", get(crate::protection::list_machines))
        .route("/api/v1/machines/{name}/recovery-points", get(crate::protection::recovery_points))
        .fallback(|| async { ApiError::not_found("no such API route: see /api/v1/openapi.json") })
        .layer(axum::extract::DefaultBodyLimit::max(state.config.max_body_bytes))
        .layer(axum::middleware::from_fn_with_state(state.clone(), limit_body))
        .with_state(state)
}

/// The most of an oversized body without `Content-Length` (chunked) read and thrown away before
/// the 413 is sent, so that a client still sending gets the answer rather than a reset; beyond
/// it the connection is closed.
const DRAIN_LIMIT: usize = 8 << 20;

/// Refuse oversized bodies with the 413 JSON error *before* anything reads them: a declared
/// `Content-Length` above `max_body_bytes` is answered at once, so hyper never sends
/// `100 Continue` and the client never starts sending what would be thrown away. A body without
/// a length is read up to the limit; if it is larger, up to [`DRAIN_LIMIT`] more is drained
/// before the answer. Either way the connection closes after the 413.
async fn limit_body(
    State(s): State<Arc<AppState>>,
    req: Request,
    next: axum::middleware::Next,
) -> Result<Response, ApiError> {
    let limit = s.config.max_body_bytes;
    let too_large = || {
        let mut r = ApiError::new(
            StatusCode::PAYLOAD_TOO_LARGE,
            errors::BODY_TOO_LARGE,
            format!("the request body is larger than {limit} bytes"),
        )
        .into_response();
        r.headers_mut().insert(axum::http::header::CONNECTION, axum::http::HeaderValue::from_static("close"));
        r
    };
    let declared = req.headers().get(axum::http::header::CONTENT_LENGTH);
    // A client that asked `Expect: 100-continue` waits for us: nothing to drain.
    let expects = req.headers().get(axum::http::header::EXPECT).is_some();
    if let Some(v) = declared {
        return match v.to_str().ok().and_then(|v| v.trim().parse::<u64>().ok()) {
            Some(n) if n > limit as u64 && expects => Ok(too_large()),
            Some(n) if n > limit as u64 => {
                // The client is sending: read (a bounded amount of) it, so the answer is not lost
                // to a reset when we close with unread data.
                use futures::StreamExt;
                let mut stream = req.into_body().into_data_stream();
                let mut seen = 0usize;
                while let Some(Ok(chunk)) = stream.next().await {
                    seen = seen.saturating_add(chunk.len());
                    if seen > limit.saturating_add(DRAIN_LIMIT) {
                        break;
                    }
                }
                Ok(too_large())
            }
            Some(_) => Ok(next.run(req).await),
            None => Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                errors::BAD_REQUEST,
                "the Content-Length header is not a number".to_owned(),
            )),
        };
    }
    let chunked = req.headers().get(axum::http::header::TRANSFER_ENCODING).is_some();
    if !chunked {
        return Ok(next.run(req).await);
    }
    let (parts, body) = req.into_parts();
    let mut stream = body.into_data_stream();
    let mut buf = Vec::new();
    let mut seen = 0usize;
    use futures::StreamExt;
    while let Some(chunk) = stream.next().await {
        // A body that breaks off is not a shorter body: never hand a part of it to a handler.
        let Ok(chunk) = chunk else {
            return Err(ApiError::new(
                StatusCode::BAD_REQUEST,
                errors::BAD_REQUEST,
                "the request body ended before it was complete".to_owned(),
            ));
        };
        seen = seen.saturating_add(chunk.len());
        if seen > limit {
            if seen > limit.saturating_add(DRAIN_LIMIT) {
                break;
            }
            continue;
        }
        buf.extend_from_slice(&chunk);
    }
    if seen > limit {
        return Ok(too_large());
    }
    Ok(next.run(Request::from_parts(parts, axum::body::Body::from(buf))).await)
}

async fn server_info(State(s): State<Arc<AppState>>) -> ApiResult {
    ok(serde_json::json!({
        "version": env!("CARGO_PKG_VERSION"),
        "database": s.store.backend(),
        "ca_fingerprint": s.ca_fingerprint,
        "listen": s.config.listen,
    }))
}

async fn ca_pem(State(s): State<Arc<AppState>>) -> Response {
    ([(axum::http::header::CONTENT_TYPE, "application/x-pem-file")], s.ca_pem.clone()).into_response()
}

// ---- tokens -------------------------------------------------------------------------------

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct NewToken {
    name: String,
    role: String,
}

async fn list_tokens(State(s): State<Arc<AppState>>, c: Caller) -> ApiResult {
    c.need(Role::Admin)?;
    ok(s.store.tokens().await?)
}

async fn create_token(State(s): State<Arc<AppState>>, c: Caller, Body(t): Body<NewToken>) -> ApiResult {
    c.need(Role::Admin)?;
    model::check_name("token", &t.name)?;
    if !matches!(t.role.as_str(), "reader" | "operator" | "admin") {
        return Err(ApiError::bad(format!("role {:?} is not reader, operator or admin", t.role)));
    }
    let token = new_token();
    let id = format!("tok-{:08x}", rand::random::<u32>());
    s.store.add_token(&id, &hash_token(&token), &t.name, &t.role).await?;
    created(
        serde_json::json!({ "id": id, "name": t.name, "role": t.role, "token": token, "note": "the token is shown once" }),
    )
}

async fn delete_token(State(s): State<Arc<AppState>>, c: Caller, Path(id): Path<String>) -> ApiResult {
    c.need(Role::Admin)?;
    if !s.store.delete_token(&id).await? {
        return Err(ApiError::not_found(format!("no token {id}")));
    }
    ok(serde_json::json!({ "deleted": id }))
}

async fn rotate_passphrase(State(s): State<Arc<AppState>>, c: Caller) -> ApiResult {
    c.need(Role::Admin)?;
    let p = crate::new_passphrase();
    s.store.set_setting("registration_passphrase_hash", &hash_token(&p)).await?;
    ok(serde_json::json!({ "passphrase": p, "note": "shown once; components registering from now on need it" }))
}

// ---- policies -----------------------------------------------------------------------------

async fn list_policies(State(s): State<Arc<AppState>>, c: Caller) -> ApiResult {
    c.need(Role::Reader)?;
    ok(s.store.list::<Policy>(model::POLICY).await?.into_iter().map(|d| d.body).collect::<Vec<_>>())
}

async fn get_policy(State(s): State<Arc<AppState>>, c: Caller, Path(name): Path<String>) -> ApiResult {
    c.need(Role::Reader)?;
    let d = s
        .store
        .get::<Policy>(model::POLICY, &name)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no policy {name}")))?;
    ok(d.body)
}

async fn create_policy(State(s): State<Arc<AppState>>, c: Caller, Body(p): Body<Policy>) -> ApiResult {
    c.need(Role::Operator)?;
    if p.read_only || p.failback_of.is_some() {
        return Err(ApiError::bad("read_only and failback_of are set by Ferry for failback policies; leave them out"));
    }
    p.validate()?;
    let failback = Policy::failback_for(&p);
    if s.store.get::<Policy>(model::POLICY, &failback.name).await?.is_some() {
        return Err(ApiError::conflict(format!("policy {} already exists", failback.name)));
    }
    // Both or neither: a failback policy never exists without its forward policy.
    let body = serde_json::to_value(&p).map_err(|e| ApiError::bad(e.to_string()))?;
    let fb = serde_json::to_value(&failback).map_err(|e| ApiError::bad(e.to_string()))?;
    s.store
        .write_many(
            &[(model::POLICY, p.name.as_str(), body, Some(0)), (model::POLICY, failback.name.as_str(), fb, Some(0))],
            &[],
        )
        .await
        .map_err(|e| match e {
            ferry_store::StoreError::Conflict { .. } => ApiError::conflict(format!("policy {} already exists", p.name)),
            e => e.into(),
        })?;
    created(serde_json::json!({ "policy": p, "failback_policy": failback }))
}

async fn put_policy(
    State(s): State<Arc<AppState>>,
    c: Caller,
    Path(name): Path<String>,
    Body(p): Body<Policy>,
) -> ApiResult {
    c.need(Role::Operator)?;
    let old = s
        .store
        .get::<Policy>(model::POLICY, &name)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no policy {name}")))?;
    if old.body.read_only {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            errors::READ_ONLY_POLICY,
            format!(
                "{name} is the failback policy of {} and is read-only (POL-2)",
                old.body.failback_of.unwrap_or_default()
            ),
        ));
    }
    if p.name != name {
        return Err(ApiError::bad(format!("the body names policy {:?} but the URL names {name:?}", p.name)));
    }
    if p.read_only || p.failback_of.is_some() {
        return Err(ApiError::bad("read_only and failback_of cannot be set on a forward policy"));
    }
    p.validate()?;
    s.store.put(model::POLICY, &name, &p, Some(old.revision)).await?;
    ok(p)
}

async fn delete_policy(State(s): State<Arc<AppState>>, c: Caller, Path(name): Path<String>) -> ApiResult {
    c.need(Role::Operator)?;
    let old = s
        .store
        .get::<Policy>(model::POLICY, &name)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no policy {name}")))?;
    if old.body.read_only {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            errors::READ_ONLY_POLICY,
            format!("{name} is a failback policy: it goes when its forward policy is deleted"),
        ));
    }
    let failback = format!("{name}-failback");
    s.store.write_many(&[], &[(model::POLICY, name.as_str()), (model::POLICY, failback.as_str())]).await?;
    ok(serde_json::json!({ "deleted": [name.clone(), format!("{name}-failback")] }))
}

// ---- replication groups -------------------------------------------------------------------

/// OS family of each machine the inventory knows.
async fn os_families(s: &AppState) -> Result<std::collections::HashMap<String, String>, ApiError> {
    let mut out = std::collections::HashMap::new();
    for inv in s.store.list::<crate::discovery::Inventory>(ops::INVENTORY).await? {
        for m in inv.body.content.machines {
            out.insert(m.name, m.os_family);
        }
    }
    Ok(out)
}

async fn check_group(s: &AppState, g: &ReplicationGroup, replacing: Option<&str>) -> Result<(), ApiError> {
    g.validate()?;
    let os = os_families(s).await?;
    let families: std::collections::BTreeSet<_> = g.machines.iter().filter_map(|m| os.get(m)).collect();
    if families.len() > 1 {
        return Err(ApiError::new(
            StatusCode::BAD_REQUEST,
            errors::MIXED_OS_FAMILY,
            format!("replication group {} mixes OS families {families:?} (RG-1)", g.name),
        ));
    }
    for other in s.store.list::<ReplicationGroup>(model::GROUP).await? {
        if Some(other.id.as_str()) == replacing || other.id == g.name {
            continue;
        }
        if let Some(m) = g.machines.iter().find(|m| other.body.machines.contains(m)) {
            return Err(ApiError::conflict(format!("machine {m} is already in replication group {}", other.id)));
        }
    }
    if let Some(p) = &g.policy {
        if s.store.get::<Policy>(model::POLICY, p).await?.is_none() {
            return Err(ApiError::bad(format!("policy {p} does not exist")));
        }
    }
    Ok(())
}

async fn list_groups(State(s): State<Arc<AppState>>, c: Caller) -> ApiResult {
    c.need(Role::Reader)?;
    ok(s.store.list::<ReplicationGroup>(model::GROUP).await?.into_iter().map(|d| d.body).collect::<Vec<_>>())
}

async fn get_group(State(s): State<Arc<AppState>>, c: Caller, Path(name): Path<String>) -> ApiResult {
    c.need(Role::Reader)?;
    ok(s.store
        .get::<ReplicationGroup>(model::GROUP, &name)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no replication group {name}")))?
        .body)
}

async fn create_group(State(s): State<Arc<AppState>>, c: Caller, Body(g): Body<ReplicationGroup>) -> ApiResult {
    c.need(Role::Operator)?;
    check_group(&s, &g, None).await?;
    s.store.put(model::GROUP, &g.name, &g, Some(0)).await.map_err(|e| match e {
        ferry_store::StoreError::Conflict { .. } => {
            ApiError::conflict(format!("replication group {} already exists", g.name))
        }
        e => e.into(),
    })?;
    created(g)
}

async fn put_group(
    State(s): State<Arc<AppState>>,
    c: Caller,
    Path(name): Path<String>,
    Body(g): Body<ReplicationGroup>,
) -> ApiResult {
    c.need(Role::Operator)?;
    let old = s
        .store
        .get::<ReplicationGroup>(model::GROUP, &name)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no replication group {name}")))?;
    if g.name != name {
        return Err(ApiError::bad(format!("the body names group {:?} but the URL names {name:?}", g.name)));
    }
    check_group(&s, &g, Some(&name)).await?;
    s.store.put(model::GROUP, &name, &g, Some(old.revision)).await?;
    ok(g)
}

async fn delete_group(State(s): State<Arc<AppState>>, c: Caller, Path(name): Path<String>) -> ApiResult {
    c.need(Role::Operator)?;
    for p in s.store.list::<RecoveryPlan>(model::PLAN).await? {
        if p.body.groups.iter().any(|g| g.replication_groups.contains(&name)) {
            return Err(ApiError::conflict(format!(
                "replication group {name} is used by recovery plan {}: change the plan first",
                p.id
            )));
        }
    }
    if !s.store.delete(model::GROUP, &name).await? {
        return Err(ApiError::not_found(format!("no replication group {name}")));
    }
    ok(serde_json::json!({ "deleted": name }))
}

// ---- recovery plans -----------------------------------------------------------------------

async fn check_plan(s: &AppState, p: &RecoveryPlan) -> Result<(), ApiError> {
    let groups: std::collections::HashMap<String, Vec<String>> =
        s.store.list::<ReplicationGroup>(model::GROUP).await?.into_iter().map(|d| (d.id, d.body.machines)).collect();
    p.validate(|rg| groups.get(rg).cloned())
}

async fn list_plans(State(s): State<Arc<AppState>>, c: Caller) -> ApiResult {
    c.need(Role::Reader)?;
    ok(s.store.list::<RecoveryPlan>(model::PLAN).await?.into_iter().map(|d| d.body).collect::<Vec<_>>())
}

async fn get_plan(State(s): State<Arc<AppState>>, c: Caller, Path(name): Path<String>) -> ApiResult {
    c.need(Role::Reader)?;
    ok(s.store
        .get::<RecoveryPlan>(model::PLAN, &name)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no recovery plan {name}")))?
        .body)
}

/// Script actions run commands on the server: only admins may set them.
fn check_scripts(c: &Caller, p: &RecoveryPlan) -> Result<(), ApiError> {
    let scripts = p
        .groups
        .iter()
        .flat_map(|g| g.pre_actions.iter().chain(&g.post_actions))
        .any(|a| matches!(a, model::Action::Script { .. }));
    if scripts {
        c.need(Role::Admin).map_err(|mut e| {
            e.message = format!(
                "script actions run commands on the configuration server, so only an admin may set them ({})",
                e.message
            );
            e
        })?;
    }
    Ok(())
}

async fn create_plan(State(s): State<Arc<AppState>>, c: Caller, Body(p): Body<RecoveryPlan>) -> ApiResult {
    c.need(Role::Operator)?;
    check_scripts(&c, &p)?;
    check_plan(&s, &p).await?;
    s.store.put(model::PLAN, &p.name, &p, Some(0)).await.map_err(|e| match e {
        ferry_store::StoreError::Conflict { .. } => {
            ApiError::conflict(format!("recovery plan {} already exists", p.name))
        }
        e => e.into(),
    })?;
    created(p)
}

async fn put_plan(
    State(s): State<Arc<AppState>>,
    c: Caller,
    Path(name): Path<String>,
    Body(p): Body<RecoveryPlan>,
) -> ApiResult {
    c.need(Role::Operator)?;
    let old = s
        .store
        .get::<RecoveryPlan>(model::PLAN, &name)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no recovery plan {name}")))?;
    if p.name != name {
        return Err(ApiError::bad(format!("the body names plan {:?} but the URL names {name:?}", p.name)));
    }
    check_scripts(&c, &p)?;
    check_plan(&s, &p).await?;
    s.store.put(model::PLAN, &name, &p, Some(old.revision)).await?;
    ok(p)
}

async fn delete_plan(State(s): State<Arc<AppState>>, c: Caller, Path(name): Path<String>) -> ApiResult {
    c.need(Role::Operator)?;
    if !s.store.delete(model::PLAN, &name).await? {
        return Err(ApiError::not_found(format!("no recovery plan {name}")));
    }
    ok(serde_json::json!({ "deleted": name }))
}

async fn drill_plan(State(s): State<Arc<AppState>>, c: Caller, Path(name): Path<String>) -> ApiResult {
    c.need(Role::Operator)?;
    let p = s
        .store
        .get::<RecoveryPlan>(model::PLAN, &name)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no recovery plan {name}")))?;
    let (steps, params) = Ops::drill_steps(&p.body);
    let job = s.jobs.start(s.ops.clone(), "plan-drill", &name, steps, params).await?;
    Ok((StatusCode::ACCEPTED, Json(job)).into_response())
}

// ---- sites and inventory ------------------------------------------------------------------

async fn list_sites(State(s): State<Arc<AppState>>, c: Caller) -> ApiResult {
    c.need(Role::Reader)?;
    ok(s.store.list::<Site>(ops::SITE).await?.into_iter().map(|d| d.body).collect::<Vec<_>>())
}

async fn get_site(State(s): State<Arc<AppState>>, c: Caller, Path(name): Path<String>) -> ApiResult {
    c.need(Role::Reader)?;
    ok(s.store.get::<Site>(ops::SITE, &name).await?.ok_or_else(|| ApiError::not_found(format!("no site {name}")))?.body)
}

pub async fn start_discovery(s: &AppState, name: &str) -> Result<Job, ApiError> {
    Ok(s.jobs.start(s.ops.clone(), "discovery", name, Ops::discovery_steps(name), serde_json::json!({})).await?)
}

async fn create_site(State(s): State<Arc<AppState>>, c: Caller, Body(site): Body<Site>) -> ApiResult {
    c.need(Role::Operator)?;
    model::check_name("site", &site.name)?;
    if site.provider != "local" {
        return Err(ApiError::bad(format!(
            "provider {:?} is not known (the local provider is the only one so far)",
            site.provider
        )));
    }
    if !site.path.is_absolute() || !site.path.join("site.toml").is_file() {
        return Err(ApiError::bad(format!(
            "{} must be an absolute path to a folder holding site.toml",
            site.path.display()
        )));
    }
    s.store.put(ops::SITE, &site.name, &site, Some(0)).await.map_err(|e| match e {
        ferry_store::StoreError::Conflict { .. } => ApiError::conflict(format!("site {} already exists", site.name)),
        e => e.into(),
    })?;
    let job = start_discovery(&s, &site.name).await?;
    created(serde_json::json!({ "site": site, "job": job }))
}

async fn delete_site(State(s): State<Arc<AppState>>, c: Caller, Path(name): Path<String>) -> ApiResult {
    c.need(Role::Operator)?;
    if !s.store.delete(ops::SITE, &name).await? {
        return Err(ApiError::not_found(format!("no site {name}")));
    }
    s.store.delete(ops::INVENTORY, &name).await?;
    ok(serde_json::json!({ "deleted": name }))
}

async fn discover_site(State(s): State<Arc<AppState>>, c: Caller, Path(name): Path<String>) -> ApiResult {
    c.need(Role::Operator)?;
    if s.store.get::<Site>(ops::SITE, &name).await?.is_none() {
        return Err(ApiError::not_found(format!("no site {name}")));
    }
    let job = start_discovery(&s, &name).await?;
    Ok((StatusCode::ACCEPTED, Json(job)).into_response())
}

async fn site_operation(
    State(s): State<Arc<AppState>>,
    c: Caller,
    Path(name): Path<String>,
    Body(op): Body<crate::discovery::SiteOperation>,
) -> ApiResult {
    c.need(Role::Operator)?;
    if s.store.get::<Site>(ops::SITE, &name).await?.is_none() {
        return Err(ApiError::not_found(format!("no site {name}")));
    }
    let what = serde_json::to_value(&op).map_err(|e| ApiError::bad(e.to_string()))?;
    let title = format!("{} on site {name}", what["op"].as_str().unwrap_or("operation"));
    let steps = vec![(title, false), (format!("rediscover site {name}"), true)];
    let job =
        s.jobs.start(s.ops.clone(), "site-operation", &name, steps, serde_json::json!({ "operation": what })).await?;
    Ok((StatusCode::ACCEPTED, Json(job)).into_response())
}

async fn inventory(State(s): State<Arc<AppState>>, c: Caller) -> ApiResult {
    c.need(Role::Reader)?;
    ok(s.store
        .list::<crate::discovery::Inventory>(ops::INVENTORY)
        .await?
        .into_iter()
        .map(|d| d.body)
        .collect::<Vec<_>>())
}

// ---- jobs and events ----------------------------------------------------------------------

async fn list_jobs(State(s): State<Arc<AppState>>, c: Caller) -> ApiResult {
    c.need(Role::Reader)?;
    ok(s.store.jobs::<Job>(None).await?)
}

async fn get_job(State(s): State<Arc<AppState>>, c: Caller, Path(id): Path<String>) -> ApiResult {
    c.need(Role::Reader)?;
    ok(s.store.job::<Job>(&id).await?.ok_or_else(|| ApiError::not_found(format!("no job {id}")))?)
}

#[derive(Deserialize, Default)]
#[serde(deny_unknown_fields)]
struct Confirm {
    /// The step being confirmed (`current_step` of the job when its prompt was read).
    step: Option<usize>,
}

async fn confirm_job(
    State(s): State<Arc<AppState>>,
    c: Caller,
    Path(id): Path<String>,
    body: axum::body::Bytes,
) -> ApiResult {
    c.need(Role::Operator)?;
    let req: Confirm = if body.is_empty() {
        Confirm::default()
    } else {
        serde_json::from_slice(&body)
            .map_err(|e| ApiError::bad(format!("bad confirmation: {e}; send {{\"step\": N}} or nothing")))?
    };
    let step = s.jobs.confirm(&id, req.step).await.map_err(|e| job_error(&id, e))?;
    ok(serde_json::json!({ "confirmed": id, "step": step }))
}

async fn cancel_job(State(s): State<Arc<AppState>>, c: Caller, Path(id): Path<String>) -> ApiResult {
    c.need(Role::Operator)?;
    s.jobs.cancel(&id).await.map_err(|e| job_error(&id, e))?;
    ok(serde_json::json!({ "cancelling": id }))
}

fn job_error(id: &str, e: String) -> ApiError {
    if e.starts_with("no job") {
        ApiError::not_found(e)
    } else {
        ApiError::new(StatusCode::CONFLICT, errors::JOB_STATE, format!("{id}: {e}"))
    }
}

async fn events(State(s): State<Arc<AppState>>, c: Caller) -> ApiResult {
    c.need(Role::Reader)?;
    ok(s.store.events(500).await?)
}

async fn start_backup(State(s): State<Arc<AppState>>, c: Caller) -> ApiResult {
    c.need(Role::Admin)?;
    let job = s
        .jobs
        .start(
            s.ops.clone(),
            "backup",
            "configuration database",
            vec![("write an encrypted backup".into(), true)],
            serde_json::json!({}),
        )
        .await?;
    Ok((StatusCode::ACCEPTED, Json(job)).into_response())
}
