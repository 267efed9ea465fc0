//! The REST API under `/api/v1`. Every route is listed once in `ferry_api::config_server::ROUTES`,
//! which drives the router, the role check and the OpenAPI document
//! (`docs/openapi/config-server.json`, committed; a ferry-api test fails when it drifts). Every
//! error is `{code, name, message, remedy}` from the error table. Tokens are stored hashed
//! (BLAKE3); roles: reader (sees everything, changes nothing) < operator < admin; `component`
//! tokens (given at registration) may only send their own heartbeats and read their own settings.
//!
//! Size: the route table and the handlers of the small objects; moving each object's handlers beside its model is planned (docs/limitations.md).

use std::sync::Arc;

use axum::extract::{Path, Request, State};
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{on, MethodRouter};
use axum::{Json, Router};
use ferry_api::config_server::{
    Cancelling, ConfigServerEndpoint as C, Confirm, Confirmed, Deleted, EventInfo, NewToken, Passphrase, PolicyCreated,
    ServerInfo, SiteAdded, TokenCreated, TokenInfo, ROUTES,
};
use ferry_api::Role as ApiRole;
use ferry_status::method_filter;

use crate::errors::{self, ApiError};
pub(crate) use crate::http::{created, ok, ApiResult};
pub use crate::http::{hash_token, new_token, Body, Caller, Role};
use crate::jobs::Job;
use crate::model::{self, Policy, RecoveryPlan, ReplicationGroup};
use crate::ops::{self, Ops, Site};
use crate::settings::{get_settings, put_settings};
use crate::AppState;

/// The OpenAPI 3.1 document, generated from the route table (`docs/openapi/config-server.json`).
pub fn openapi() -> serde_json::Value {
    ferry_api::route::openapi(
        &ferry_api::route::DocInfo { title: "Ferry configuration server", bearer_tokens: true },
        ROUTES,
    )
}

/// The router: every route of `ferry_api::config_server::ROUTES` with its handler and the role
/// its table entry names (checked before the handler runs, see `require_role`).
pub fn router(state: Arc<AppState>) -> Router {
    let routes = ROUTES.iter().fold(Router::new(), |router, r| {
        let m = method_filter(r.method);
        let h: MethodRouter<Arc<AppState>> = match r.id {
            C::OpenApi => on(m, || async { Json(openapi()) }),
            C::Errors => on(m, || async {
                Json(errors::ALL.iter().copied().map(ferry_api::config_server::ErrorEntry::from).collect::<Vec<_>>())
            }),
            C::Server => on(m, server_info),
            C::Authority => on(m, crate::authority::status),
            C::Promote => on(m, crate::authority::promote),
            C::ReplicationSnapshot => on(m, crate::authority::snapshot),
            C::Ca => on(m, ca_pem),
            C::Register => on(m, crate::registration::register),
            C::ListTokens => on(m, list_tokens),
            C::CreateToken => on(m, create_token),
            C::DeleteToken => on(m, delete_token),
            C::RotatePassphrase => on(m, rotate_passphrase),
            C::ListPolicies => on(m, list_policies),
            C::CreatePolicy => on(m, create_policy),
            C::GetPolicy => on(m, get_policy),
            C::PutPolicy => on(m, put_policy),
            C::DeletePolicy => on(m, delete_policy),
            C::ListGroups => on(m, list_groups),
            C::CreateGroup => on(m, create_group),
            C::GetGroup => on(m, get_group),
            C::PutGroup => on(m, put_group),
            C::DeleteGroup => on(m, delete_group),
            C::ListPlans => on(m, list_plans),
            C::CreatePlan => on(m, create_plan),
            C::GetPlan => on(m, get_plan),
            C::PutPlan => on(m, put_plan),
            C::DeletePlan => on(m, delete_plan),
            C::DrillPlan => on(m, drill_plan),
            C::FailoverPlan => on(m, crate::plan_failover::start),
            C::ListSites => on(m, list_sites),
            C::CreateSite => on(m, create_site),
            C::GetSite => on(m, get_site),
            C::DeleteSite => on(m, delete_site),
            C::DiscoverSite => on(m, discover_site),
            C::SiteOperation => on(m, site_operation),
            C::Inventory => on(m, inventory),
            C::ListJobs => on(m, list_jobs),
            C::GetJob => on(m, get_job),
            C::ConfirmJob => on(m, confirm_job),
            C::CancelJob => on(m, cancel_job),
            C::Events => on(m, events),
            C::Heartbeat => on(m, crate::health::heartbeat),
            C::Components => on(m, crate::health::components),
            C::GetSettings => on(m, get_settings),
            C::PutSettings => on(m, put_settings),
            C::Backup => on(m, start_backup),
            C::Protect => on(m, crate::protection::protect),
            C::Failover => on(m, crate::failover::start_failover),
            C::ChangeFailoverPoint => on(m, crate::failover::change_point),
            C::CommitFailover => on(m, crate::failover::commit),
            C::CancelFailover => on(m, crate::failover::cancel),
            C::DisableProtection => on(m, crate::disable::disable),
            C::Reprotect => on(m, crate::reprotect::reprotect),
            C::ReprotectDryRun => on(m, crate::reprotect::dry_run),
            C::ReprotectPlan => on(m, crate::plan_reprotect::reprotect),
            C::ReprotectPlanDryRun => on(m, crate::plan_reprotect::dry_run),
            C::FailbackPlan => on(m, crate::plan_reprotect::failback),
            C::TestFailoverPlan => on(m, crate::plan_test_failover::start),
            C::CleanupTestFailoverPlan => on(m, crate::plan_test_failover::cleanup),
            C::TestFailover => on(m, crate::test_failover::start),
            C::CleanupTestFailover => on(m, crate::test_failover::cleanup),
            C::Drills => on(m, crate::test_failover::list),
            C::Machines => on(m, crate::protection::list_machines),
            C::RecoveryPoints => on(m, crate::protection::recovery_points),
            C::RevokedCertificates => on(m, crate::revocation::list),
            C::RevokeCertificate => on(m, crate::revocation::revoke_route),
        };
        let need = r.role;
        let h = if need == ApiRole::Anyone {
            h
        } else {
            h.route_layer(axum::middleware::from_fn_with_state(state.clone(), move |st, req, next| {
                require_role(st, need, req, next)
            }))
        };
        router.route(r.path, h)
    });
    routes
        .fallback(|| async { ApiError::not_found("no such API route: see /api/v1/openapi.json") })
        .layer(axum::extract::DefaultBodyLimit::max(state.config.max_body_bytes))
        .layer(axum::middleware::from_fn_with_state(state.clone(), limit_body))
        // Outermost: a standby or stale server refuses changes before anything else runs.
        .layer(axum::middleware::from_fn_with_state(state.clone(), crate::authority::gate))
        .with_state(state)
}

/// The role check of the route table: the caller's token must grant the route's role; the
/// [`Caller`] is then handed to the handler (as a request extension) for checks that depend on
/// the object (a component may read only its own settings; script actions need an admin).
async fn require_role(
    State(s): State<Arc<AppState>>,
    need: ApiRole,
    req: Request,
    next: axum::middleware::Next,
) -> Result<Response, ApiError> {
    let (mut parts, body) = req.into_parts();
    let caller = Caller::from_token(&mut parts, &s).await?;
    if !caller.role.allows(need) {
        return Err(ApiError::new(
            StatusCode::FORBIDDEN,
            errors::FORBIDDEN,
            format!(
                "token {:?} has the {} role; this needs {}",
                caller.token_name,
                caller.role.as_str(),
                need.as_str()
            ),
        ));
    }
    parts.extensions.insert(caller);
    Ok(next.run(Request::from_parts(parts, body)).await)
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
    ok(ServerInfo {
        version: env!("CARGO_PKG_VERSION").into(),
        database: match s.store.backend() {
            ferry_store::Backend::Sqlite => "sqlite".into(),
            ferry_store::Backend::Postgres => "postgres".into(),
        },
        ca_fingerprint: s.ca_fingerprint.clone(),
        listen: s.config.listen.clone(),
    })
}

async fn ca_pem(State(s): State<Arc<AppState>>) -> Response {
    ([(axum::http::header::CONTENT_TYPE, "application/x-pem-file")], s.ca_pem.clone()).into_response()
}

// ---- tokens -------------------------------------------------------------------------------

async fn list_tokens(State(s): State<Arc<AppState>>) -> ApiResult {
    let tokens: Vec<TokenInfo> = s
        .store
        .tokens()
        .await?
        .into_iter()
        .map(|t| TokenInfo { id: t.id, name: t.name, role: t.role, created_ms: t.created_ms })
        .collect();
    ok(tokens)
}

async fn create_token(State(s): State<Arc<AppState>>, Body(t): Body<NewToken>) -> ApiResult {
    model::check_name("token", &t.name)?;
    if !matches!(t.role.as_str(), "reader" | "operator" | "admin") {
        return Err(ApiError::bad(format!("role {:?} is not reader, operator or admin", t.role)));
    }
    let token = new_token();
    let id = format!("tok-{:08x}", rand::random::<u32>());
    s.store.add_token(&id, &hash_token(&token), &t.name, &t.role).await?;
    created(TokenCreated { id, name: t.name, role: t.role, token, note: "the token is shown once".into() })
}

async fn delete_token(State(s): State<Arc<AppState>>, Path(id): Path<String>) -> ApiResult {
    if !s.store.delete_token(&id).await? {
        return Err(ApiError::not_found(format!("no token {id}")));
    }
    ok(Deleted { deleted: vec![id] })
}

async fn rotate_passphrase(State(s): State<Arc<AppState>>) -> ApiResult {
    let p = crate::new_passphrase();
    s.store.set_setting("registration_passphrase_hash", &hash_token(&p)).await?;
    ok(Passphrase { passphrase: p, note: "shown once; components registering from now on need it".into() })
}

// ---- policies -----------------------------------------------------------------------------

async fn list_policies(State(s): State<Arc<AppState>>) -> ApiResult {
    ok(s.store.list::<Policy>(model::POLICY).await?.into_iter().map(|d| d.body).collect::<Vec<_>>())
}

async fn get_policy(State(s): State<Arc<AppState>>, Path(name): Path<String>) -> ApiResult {
    let d = s
        .store
        .get::<Policy>(model::POLICY, &name)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no policy {name}")))?;
    ok(d.body)
}

async fn create_policy(State(s): State<Arc<AppState>>, Body(p): Body<Policy>) -> ApiResult {
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
    created(PolicyCreated { policy: p, failback_policy: failback })
}

async fn put_policy(State(s): State<Arc<AppState>>, Path(name): Path<String>, Body(p): Body<Policy>) -> ApiResult {
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

async fn delete_policy(State(s): State<Arc<AppState>>, Path(name): Path<String>) -> ApiResult {
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
    ok(Deleted { deleted: vec![name.clone(), format!("{name}-failback")] })
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

async fn list_groups(State(s): State<Arc<AppState>>) -> ApiResult {
    ok(s.store.list::<ReplicationGroup>(model::GROUP).await?.into_iter().map(|d| d.body).collect::<Vec<_>>())
}

async fn get_group(State(s): State<Arc<AppState>>, Path(name): Path<String>) -> ApiResult {
    ok(s.store
        .get::<ReplicationGroup>(model::GROUP, &name)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no replication group {name}")))?
        .body)
}

async fn create_group(State(s): State<Arc<AppState>>, Body(g): Body<ReplicationGroup>) -> ApiResult {
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
    Path(name): Path<String>,
    Body(g): Body<ReplicationGroup>,
) -> ApiResult {
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

async fn delete_group(State(s): State<Arc<AppState>>, Path(name): Path<String>) -> ApiResult {
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
    ok(Deleted { deleted: vec![name] })
}

// ---- recovery plans -----------------------------------------------------------------------

async fn check_plan(s: &AppState, p: &RecoveryPlan) -> Result<(), ApiError> {
    let groups: std::collections::HashMap<String, Vec<String>> =
        s.store.list::<ReplicationGroup>(model::GROUP).await?.into_iter().map(|d| (d.id, d.body.machines)).collect();
    Ok(p.validate(|rg| groups.get(rg).cloned())?)
}

async fn list_plans(State(s): State<Arc<AppState>>) -> ApiResult {
    ok(s.store.list::<RecoveryPlan>(model::PLAN).await?.into_iter().map(|d| d.body).collect::<Vec<_>>())
}

async fn get_plan(State(s): State<Arc<AppState>>, Path(name): Path<String>) -> ApiResult {
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

async fn delete_plan(State(s): State<Arc<AppState>>, Path(name): Path<String>) -> ApiResult {
    if !s.store.delete(model::PLAN, &name).await? {
        return Err(ApiError::not_found(format!("no recovery plan {name}")));
    }
    ok(Deleted { deleted: vec![name] })
}

async fn drill_plan(State(s): State<Arc<AppState>>, Path(name): Path<String>) -> ApiResult {
    let p = s
        .store
        .get::<RecoveryPlan>(model::PLAN, &name)
        .await?
        .ok_or_else(|| ApiError::not_found(format!("no recovery plan {name}")))?;
    let (steps, work) = Ops::drill_steps(&p.body);
    let (kind, params) = work.split()?;
    let job = s.jobs.start(s.ops.clone(), kind, &name, steps, params).await?;
    Ok((StatusCode::ACCEPTED, Json(job)).into_response())
}

// ---- sites and inventory ------------------------------------------------------------------

async fn list_sites(State(s): State<Arc<AppState>>) -> ApiResult {
    ok(s.store.list::<Site>(ops::SITE).await?.into_iter().map(|d| d.body).collect::<Vec<_>>())
}

async fn get_site(State(s): State<Arc<AppState>>, Path(name): Path<String>) -> ApiResult {
    ok(s.store.get::<Site>(ops::SITE, &name).await?.ok_or_else(|| ApiError::not_found(format!("no site {name}")))?.body)
}

pub async fn start_discovery(s: &AppState, name: &str) -> Result<Job, ApiError> {
    let (kind, params) = crate::ops::JobWork::Discovery {}.split()?;
    Ok(s.jobs.start(s.ops.clone(), kind, name, Ops::discovery_steps(name), params).await?)
}

async fn create_site(State(s): State<Arc<AppState>>, Body(site): Body<Site>) -> ApiResult {
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
    // The folder's description decides what the server runs for the site: only folders below the
    // root the admin configured qualify, reached without links.
    let Some(root) = &s.config.site_root else {
        return Err(ApiError::bad(
            "this configuration server accepts no sites: an admin sets site_root in its configuration to the folder that holds the site folders",
        ));
    };
    let resolved = match (root.canonicalize(), site.path.canonicalize()) {
        (Ok(r), Ok(p)) if p.starts_with(&r) && p != r => Some(p),
        _ => None,
    };
    let Some(resolved) = resolved else {
        return Err(ApiError::bad(format!(
            "{} is not a folder below the site root {} (links are not followed): put the site folder there",
            site.path.display(),
            root.display()
        )));
    };
    // Later operations use the resolved folder: a link swapped in afterwards changes nothing.
    let site = Site { path: resolved, ..site };
    s.store.put(ops::SITE, &site.name, &site, Some(0)).await.map_err(|e| match e {
        ferry_store::StoreError::Conflict { .. } => ApiError::conflict(format!("site {} already exists", site.name)),
        e => e.into(),
    })?;
    let job = start_discovery(&s, &site.name).await?;
    created(SiteAdded { site, job })
}

async fn delete_site(State(s): State<Arc<AppState>>, Path(name): Path<String>) -> ApiResult {
    if !s.store.delete(ops::SITE, &name).await? {
        return Err(ApiError::not_found(format!("no site {name}")));
    }
    s.store.delete(ops::INVENTORY, &name).await?;
    ok(Deleted { deleted: vec![name] })
}

async fn discover_site(State(s): State<Arc<AppState>>, Path(name): Path<String>) -> ApiResult {
    if s.store.get::<Site>(ops::SITE, &name).await?.is_none() {
        return Err(ApiError::not_found(format!("no site {name}")));
    }
    let job = start_discovery(&s, &name).await?;
    Ok((StatusCode::ACCEPTED, Json(job)).into_response())
}

async fn site_operation(
    State(s): State<Arc<AppState>>,
    Path(name): Path<String>,
    Body(op): Body<crate::discovery::SiteOperation>,
) -> ApiResult {
    if s.store.get::<Site>(ops::SITE, &name).await?.is_none() {
        return Err(ApiError::not_found(format!("no site {name}")));
    }
    if let crate::discovery::SiteOperation::AdoptMachine { machine, extra, .. } = &op {
        if extra.contains_key("test_failover") {
            return Err(ApiError::bad(format!(
                "machine {machine}: extra.test_failover is set by test failovers only (it attaches a drill's exports)"
            )));
        }
    }
    if let crate::discovery::SiteOperation::CreateTestMachine { machine, .. } = &op {
        return Err(ApiError::bad(format!(
            "test machine {machine}: test machines are made by test failovers only (`ferry test-failover start MACHINE`), which attach them to their drill's export"
        )));
    }
    if let crate::discovery::SiteOperation::PowerOn { machine, allow_failed_over: false } = &op {
        // The old primary of a failed-over machine stays off unless the operator says otherwise.
        let p = s.store.get::<crate::protection::Protection>(crate::protection::PROTECTION, machine).await?;
        // Unless it is what a failback brought back: its reverse protection failed over to it.
        let mut failed_back = false;
        if let Some(r) = p.as_ref().and_then(|d| d.body.reprotected_by.clone()) {
            let rp = s.store.get::<crate::protection::Protection>(crate::protection::PROTECTION, &r).await?;
            failed_back = rp.and_then(|d| d.body.failover).and_then(|f| f.recovery_machine).as_deref() == Some(machine);
        }
        if let Some(f) = p.map(|d| d.body).filter(|p| p.site == name && !failed_back).and_then(|p| p.failover) {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                crate::errors::FAILOVER_STATE,
                format!(
                    "{machine} failed over from site {name} (job {}): powering its old primary on runs a second copy of it; its writes never reach the failed-over disks (the replica is fenced). Power it on with allow_failed_over (`ferry lab power-on {machine} --allow-failed-over`) only if you mean that",
                    f.job
                ),
            ));
        }
    }
    let title = format!("{} on site {name}", op.name());
    let steps = vec![(title, false), (format!("rediscover site {name}"), true)];
    let (kind, params) = crate::ops::JobWork::SiteOperation { operation: op }.split()?;
    let job = s.jobs.start(s.ops.clone(), kind, &name, steps, params).await?;
    Ok((StatusCode::ACCEPTED, Json(job)).into_response())
}

async fn inventory(State(s): State<Arc<AppState>>) -> ApiResult {
    ok(s.store
        .list::<crate::discovery::Inventory>(ops::INVENTORY)
        .await?
        .into_iter()
        .map(|d| d.body)
        .collect::<Vec<_>>())
}

// ---- jobs and events ----------------------------------------------------------------------

async fn list_jobs(State(s): State<Arc<AppState>>) -> ApiResult {
    ok(s.store.jobs::<Job>(None).await?)
}

async fn get_job(State(s): State<Arc<AppState>>, Path(id): Path<String>) -> ApiResult {
    ok(s.store.job::<Job>(&id).await?.ok_or_else(|| ApiError::not_found(format!("no job {id}")))?)
}

async fn confirm_job(State(s): State<Arc<AppState>>, Path(id): Path<String>, body: axum::body::Bytes) -> ApiResult {
    let req: Confirm = if body.is_empty() {
        Confirm::default()
    } else {
        serde_json::from_slice(&body)
            .map_err(|e| ApiError::bad(format!("bad confirmation: {e}; send {{\"step\": N}} or nothing")))?
    };
    let step = s.jobs.confirm(&id, req.step).await.map_err(|e| job_error(&id, e))?;
    ok(Confirmed { confirmed: id, step })
}

async fn cancel_job(State(s): State<Arc<AppState>>, Path(id): Path<String>) -> ApiResult {
    s.jobs.cancel(&id).await.map_err(|e| job_error(&id, e))?;
    ok(Cancelling { cancelling: id })
}

fn job_error(id: &str, e: String) -> ApiError {
    if e.starts_with("no job") {
        ApiError::not_found(e)
    } else {
        ApiError::new(StatusCode::CONFLICT, errors::JOB_STATE, format!("{id}: {e}"))
    }
}

async fn events(State(s): State<Arc<AppState>>) -> ApiResult {
    let events: Vec<EventInfo> = s
        .store
        .events(500)
        .await?
        .into_iter()
        .map(|e| EventInfo {
            seq: e.seq,
            time_ms: e.time_ms,
            code: e.code,
            severity: e.severity,
            object: e.object,
            message: e.message,
        })
        .collect();
    ok(events)
}

async fn start_backup(State(s): State<Arc<AppState>>) -> ApiResult {
    let job = s
        .jobs
        .start(
            s.ops.clone(),
            "backup",
            "configuration database",
            vec![("write an encrypted backup".into(), true)],
            crate::ops::JobWork::Backup {}.split()?.1,
        )
        .await?;
    Ok((StatusCode::ACCEPTED, Json(job)).into_response())
}
