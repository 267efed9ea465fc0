//! One authoritative configuration server at a time, by an epoch stored with its data.
//!
//! A **standby** (`[standby]` in its configuration, at the recovery site) copies the active
//! server's whole database at an interval (`GET /api/v1/replication/snapshot`, one consistent
//! read, admin token) and takes no changes. `ferry config-server promote` (an explicit operator
//! command, `POST /api/v1/authority/promote`) makes it active: it takes the next epoch, stops
//! copying, resumes the jobs it copied and takes changes. A server that learns from one of its
//! `peers` that another holds a higher epoch — checked before it resumes anything at start, and
//! at an interval — becomes **stale**: it refuses every change, runs no job and serves no
//! component settings, naming the promoted server.

use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Request, State};
use axum::http::{Method, StatusCode};
use axum::response::Response;
use ferry_api::config_server::{Authority, AuthorityStatus, ReplicationSnapshot, ServerRole, StandbyStatus};
use ferry_store::Store;
use tokio_util::sync::CancellationToken;

use crate::errors::{self, ApiError};
use crate::http::{ok, ApiResult};
use crate::jobs::now_ms;
use crate::AppState;

/// The settings key holding the authority of this server's data.
pub const AUTHORITY: &str = "authority";
/// The settings key holding the higher authority a stale server learned of.
pub const SUPERSEDED: &str = "authority_superseded";
/// The largest snapshot a standby takes (a configuration database is far smaller).
const MAX_SNAPSHOT_BYTES: usize = 512 << 20;

/// A standby's link to the active server.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct StandbyConfig {
    /// HOST:PORT of the active server's API (its certificate is checked against this server's
    /// CA, which the standby shares: see `certs`).
    pub primary: String,
    /// A file holding an admin token of the active server.
    pub token_file: std::path::PathBuf,
    /// How often the copy is taken, seconds.
    #[serde(default = "default_copy_interval", deserialize_with = "ferry_types::bounds::secs")]
    pub interval_secs: f64,
}

fn default_copy_interval() -> f64 {
    5.0
}

/// What this server is now, shared by the API and its background tasks.
pub struct AuthorityState {
    role: std::sync::RwLock<ServerRole>,
    superseded: std::sync::RwLock<Option<Authority>>,
    standby: std::sync::Mutex<Option<StandbyStatus>>,
    /// Held while a copy is imported or a promotion is decided: never both at once.
    pub(crate) switch: tokio::sync::Mutex<()>,
    /// The server's shutdown (background tasks started at promotion end with it).
    pub(crate) shutdown: CancellationToken,
    /// What only an active server runs (health, discovery, backups) ends with this: cancelled
    /// when the server turns stale.
    active_tasks: CancellationToken,
    activated: std::sync::atomic::AtomicBool,
}

impl AuthorityState {
    pub fn role(&self) -> ServerRole {
        *self.role.read().unwrap_or_else(|p| p.into_inner())
    }
    fn set_role(&self, r: ServerRole) {
        *self.role.write().unwrap_or_else(|p| p.into_inner()) = r;
    }
    fn superseded(&self) -> Option<Authority> {
        self.superseded.read().unwrap_or_else(|p| p.into_inner()).clone()
    }
}

pub async fn load(store: &Store, key: &str) -> Result<Option<Authority>, ferry_store::StoreError> {
    Ok(store.setting(key).await?.and_then(|v| serde_json::from_str(&v).ok()))
}

async fn save(store: &Store, key: &str, a: &Authority) -> Result<(), ferry_store::StoreError> {
    let v = serde_json::to_string(a).map_err(|e| ferry_store::StoreError::Corrupt { what: key.into(), source: e })?;
    store.set_setting(key, &v).await
}

/// Decide what this server is at start (before anything is resumed): stale if it was told so
/// before or a peer holds a higher epoch now; a standby while its data names another server;
/// else active (a first start takes epoch 1).
pub async fn initial(
    config: &crate::ConfigServerConfig,
    store: &Store,
    shutdown: CancellationToken,
) -> Result<AuthorityState, crate::ConfigServerError> {
    let setup = |e: ferry_store::StoreError| crate::ConfigServerError::Setup(format!("authority: {e}"));
    // The authority record names its server: two servers of one installation under one name
    // would each take the other's record for its own.
    if (config.standby.is_some() || !config.peers.is_empty()) && config.name == crate::default_server_name() {
        return Err(crate::ConfigServerError::Setup(format!(
            "a configuration server with a standby or peers needs a name of its own: set `name` (not {:?}) on each server of the installation",
            config.name
        )));
    }
    let mut own = load(store, AUTHORITY).await.map_err(setup)?;
    let mut superseded = load(store, SUPERSEDED).await.map_err(setup)?;
    let role = if superseded.is_some() {
        ServerRole::Stale
    } else if config.standby.is_some() && own.as_ref().is_none_or(|a| a.server != config.name) {
        ServerRole::Standby
    } else {
        if own.is_none() {
            let a = Authority { epoch: 1, server: config.name.clone(), since_ms: now_ms() };
            save(store, AUTHORITY, &a).await.map_err(setup)?;
            own = Some(a);
        }
        // A returning server asks its peers before it resumes a single job.
        match higher_peer(config, own.as_ref()).await {
            Some(h) => {
                save(store, SUPERSEDED, &h).await.map_err(setup)?;
                superseded = Some(h);
                ServerRole::Stale
            }
            None => ServerRole::Active,
        }
    };
    if let Some(h) = &superseded {
        tracing::warn!(epoch = h.epoch, server = %h.server, "this configuration server is stale: {} was promoted", h.server);
    }
    let standby = config
        .standby
        .as_ref()
        .filter(|_| role == ServerRole::Standby)
        .map(|c| StandbyStatus { primary: c.primary.clone(), ..Default::default() });
    Ok(AuthorityState {
        role: std::sync::RwLock::new(role),
        superseded: std::sync::RwLock::new(superseded),
        standby: std::sync::Mutex::new(standby),
        switch: tokio::sync::Mutex::new(()),
        active_tasks: shutdown.child_token(),
        shutdown,
        activated: std::sync::atomic::AtomicBool::new(false),
    })
}

/// Whether authority `a` outranks `b`: a higher epoch, or (two standbys promoted from one copy)
/// the same epoch and the greater server name — so exactly one of any two ranks first.
pub fn outranks(a: &Authority, b: Option<&Authority>) -> bool {
    match b {
        None => true,
        Some(b) => (a.epoch, a.server.as_str()) > (b.epoch, b.server.as_str()),
    }
}

/// The first peer that reports itself active with an authority outranking `own`, if any.
async fn higher_peer(config: &crate::ConfigServerConfig, own: Option<&Authority>) -> Option<Authority> {
    active_peer(config, |a| outranks(a, own) && a.server != config.name).await
}

/// The first peer that reports itself active with an authority `wanted` accepts.
async fn active_peer(config: &crate::ConfigServerConfig, wanted: impl Fn(&Authority) -> bool) -> Option<Authority> {
    let ca = config.tls_dir().join("ca.pem");
    for peer in &config.peers {
        let r = ferry_tls::https_request(peer, ferry_tls::Trust::CaFile(&ca), "GET", "/api/v1/authority", &[], None);
        let st = match tokio::time::timeout(Duration::from_secs(10), r).await {
            Ok(Ok((200, body))) => serde_json::from_slice::<AuthorityStatus>(&body).ok(),
            Ok(Ok((code, _))) => {
                tracing::debug!(peer = %peer, code, "peer answered its authority with an error");
                None
            }
            Ok(Err(e)) => {
                tracing::debug!(peer = %peer, error = %e, "peer unreachable");
                None
            }
            Err(_) => None,
        };
        if let Some(a) = st.filter(|s| s.role == ServerRole::Active).and_then(|s| s.authority) {
            if wanted(&a) {
                return Some(a);
            }
        }
    }
    None
}

/// Start what only an active server runs: the jobs it holds (resumed), health and discovery.
/// Once per process.
pub async fn activate(s: &Arc<AppState>) -> Result<(), ferry_store::StoreError> {
    if s.authority.activated.swap(true, std::sync::atomic::Ordering::SeqCst) {
        return Ok(());
    }
    if let Err(e) = s.jobs.recover(s.ops.clone(), crate::ops::JOB_KINDS).await {
        // Not activated: a retry (a restart, or the promotion again) starts it.
        s.authority.activated.store(false, std::sync::atomic::Ordering::SeqCst);
        return Err(e);
    }
    let sd = s.authority.active_tasks.clone();
    tokio::spawn(crate::health::watch(s.clone(), sd.clone()));
    tokio::spawn(crate::periodic(s.clone(), sd));
    Ok(())
}

/// The background tasks of this role: a standby's copy loop; everyone's check of its peers.
pub fn spawn(s: &Arc<AppState>) {
    if let (Some(cfg), ServerRole::Standby) = (s.config.standby.clone(), s.authority.role()) {
        tokio::spawn(copy_loop(s.clone(), cfg));
    }
    if !s.config.peers.is_empty() {
        tokio::spawn(peer_loop(s.clone()));
    }
}

async fn copy_loop(s: Arc<AppState>, cfg: StandbyConfig) {
    let every = Duration::from_secs_f64(cfg.interval_secs.max(0.2));
    loop {
        if s.authority.role() != ServerRole::Standby {
            return;
        }
        let r = copy_once(&s, &cfg).await;
        if let Some(st) = s.authority.standby.lock().unwrap_or_else(|p| p.into_inner()).as_mut() {
            match r {
                Ok(()) => {
                    st.last_copy_ms = Some(now_ms());
                    st.copies += 1;
                    st.error = None;
                }
                Err(e) => {
                    if st.error.as_deref() != Some(e.as_str()) {
                        tracing::warn!(primary = %cfg.primary, error = %e, "the standby copy failed (the last copy stays)");
                    }
                    st.error = Some(e);
                }
            }
        }
        tokio::select! {
            _ = s.authority.shutdown.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
    }
}

/// Take one copy of the active server's data (all of it, in one transaction here).
async fn copy_once(s: &Arc<AppState>, cfg: &StandbyConfig) -> Result<(), String> {
    let token = std::fs::read_to_string(&cfg.token_file)
        .map_err(|e| format!("cannot read the token file {}: {e}", cfg.token_file.display()))?;
    let auth = format!("Bearer {}", token.trim());
    let ca = s.config.tls_dir().join("ca.pem");
    let (code, body) = ferry_tls::https_request(
        &cfg.primary,
        ferry_tls::Trust::CaFile(&ca),
        "GET",
        "/api/v1/replication/snapshot",
        &[("Authorization", auth.as_str())],
        None,
    )
    .await
    .map_err(|e| format!("{}: {e}", cfg.primary))?;
    if code != 200 {
        return Err(format!("{} answered {code}: {}", cfg.primary, String::from_utf8_lossy(&body)));
    }
    if body.len() > MAX_SNAPSHOT_BYTES {
        return Err(format!("the snapshot is {} bytes, above the {MAX_SNAPSHOT_BYTES} a standby takes", body.len()));
    }
    let snap: ReplicationSnapshot =
        serde_json::from_slice(&body).map_err(|e| format!("{} sent an unreadable snapshot: {e}", cfg.primary))?;
    if snap.authority.server == s.config.name {
        return Err(format!(
            "{} holds the authority of a server named {:?}, this standby's own name: give each server its own `name`",
            cfg.primary, s.config.name
        ));
    }
    let own_schema = s.store.schema_version().await.map_err(|e| e.to_string())?;
    if snap.data["schema_version"].as_i64() != Some(own_schema) {
        return Err(format!(
            "the active server's database is schema version {}, this standby's {own_schema}: run the same Ferry version on both",
            snap.data["schema_version"]
        ));
    }
    let _g = s.authority.switch.lock().await;
    if s.authority.role() != ServerRole::Standby {
        return Err("promoted meanwhile: the copy is not taken".into());
    }
    // Never backwards: a copy from a server below the epoch this one holds is refused.
    let held = load(&s.store, AUTHORITY).await.map_err(|e| e.to_string())?;
    if let Some(h) = held.filter(|h| h.epoch > snap.authority.epoch) {
        return Err(format!(
            "{} holds epoch {}, below the {} this copy holds (from {}): refusing to go back",
            cfg.primary, snap.authority.epoch, h.epoch, h.server
        ));
    }
    s.store.import_all(&snap.data).await.map_err(|e| format!("cannot store the copy: {e}"))?;
    Ok(())
}

async fn peer_loop(s: Arc<AppState>) {
    let every = Duration::from_secs_f64(s.config.peer_check_interval_secs.max(0.2));
    loop {
        tokio::select! {
            _ = s.authority.shutdown.cancelled() => return,
            _ = tokio::time::sleep(every) => {}
        }
        if s.authority.role() != ServerRole::Active {
            continue;
        }
        let own = load(&s.store, AUTHORITY).await.ok().flatten();
        if let Some(h) = higher_peer(&s.config, own.as_ref()).await {
            // A change in flight when the role flips is refused by the gate of its next request;
            // the jobs it started are cancelled below.
            become_stale(&s, h).await;
        }
    }
}

/// Another server holds a higher epoch: stop changing anything, now and after a restart.
async fn become_stale(s: &Arc<AppState>, higher: Authority) {
    let _g = s.authority.switch.lock().await;
    if let Err(e) = save(&s.store, SUPERSEDED, &higher).await {
        tracing::error!(error = %e, "cannot record that this server is stale (it is, until restarted)");
    }
    *s.authority.superseded.write().unwrap_or_else(|p| p.into_inner()) = Some(higher.clone());
    s.authority.set_role(ServerRole::Stale);
    s.authority.active_tasks.cancel();
    tracing::warn!(epoch = higher.epoch, server = %higher.server, "another configuration server was promoted: this one is stale and stops its jobs");
    let _ = s
        .store
        .add_event(
            errors::STALE_SERVER.code as i64,
            "critical",
            "config-server",
            &format!("{} was promoted (epoch {}): this server is stale", higher.server, higher.epoch),
        )
        .await;
    // Its running jobs stop here: the promoted server resumes them from its own copy.
    if let Ok(open) = s.store.jobs::<crate::jobs::Job>(Some(&["queued", "in-progress", "waiting-for-input"])).await {
        for j in open {
            let _ = s.jobs.cancel(&j.id).await;
        }
    }
}

/// `GET /api/v1/authority`.
pub async fn status(State(s): State<Arc<AppState>>) -> ApiResult {
    ok(view(&s).await?)
}

async fn view(s: &AppState) -> Result<AuthorityStatus, ApiError> {
    Ok(AuthorityStatus {
        server: s.config.name.clone(),
        role: s.authority.role(),
        authority: load(&s.store, AUTHORITY).await?,
        superseded_by: s.authority.superseded(),
        standby: s.authority.standby.lock().unwrap_or_else(|p| p.into_inner()).clone(),
    })
}

/// `POST /api/v1/authority/promote`: this standby becomes the active server.
pub async fn promote(
    State(s): State<Arc<AppState>>,
    crate::http::Body(req): crate::http::Body<ferry_api::config_server::PromoteRequest>,
) -> ApiResult {
    // The server it copies from, and its peers, are asked first: one still active means two
    // actives until its next peer check (and both would run the same jobs).
    if !req.force {
        let mut cfg = s.config.clone();
        cfg.peers.extend(s.config.standby.as_ref().map(|c| c.primary.clone()));
        if let Some(a) = active_peer(&cfg, |a| a.server != s.config.name).await {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                errors::CONFLICT,
                format!(
                    "{} (epoch {}) still answers as the active server: promoting now would make two; stop it (or cut it off) first, or promote with force if it cannot be reached by its components either",
                    a.server, a.epoch
                ),
            ));
        }
    }
    let s2 = s.clone();
    // In its own task: a client that disconnects cannot cut a promotion in half.
    let r = tokio::spawn(async move {
        let s = s2;
        let g = s.authority.switch.lock().await;
        match s.authority.role() {
            ServerRole::Standby => {}
            ServerRole::Active => {
                return Err(ApiError::new(
                    StatusCode::CONFLICT,
                    errors::CONFLICT,
                    format!("{} is already the active configuration server", s.config.name),
                ))
            }
            ServerRole::Stale => return Err(stale_error(&s)),
        }
        let held = load(&s.store, AUTHORITY).await?;
        let Some(held) = held else {
            return Err(ApiError::new(
                StatusCode::CONFLICT,
                errors::STANDBY_SERVER,
                "this standby holds no copy of the active server's data yet: it cannot be promoted (check its `standby` status for the copy's error)",
            ));
        };
        let new = Authority { epoch: held.epoch + 1, server: s.config.name.clone(), since_ms: now_ms() };
        save(&s.store, AUTHORITY, &new).await?;
        s.authority.set_role(ServerRole::Active);
        if let Some(st) = s.authority.standby.lock().unwrap_or_else(|p| p.into_inner()).as_mut() {
            st.error = None;
        }
        drop(g);
        let copied = s.authority.standby.lock().unwrap_or_else(|p| p.into_inner()).as_ref().and_then(|st| st.last_copy_ms);
        let msg = format!(
            "{} promoted: epoch {} (was {} at {}); its copy is of {}",
            s.config.name,
            new.epoch,
            held.epoch,
            held.server,
            copied.map(|ms| format!("{} ms ago", now_ms().saturating_sub(ms))).unwrap_or_else(|| "an earlier run".into())
        );
        tracing::warn!("{msg}");
        let _ = s.store.add_event(0, "warning", "config-server", &msg).await;
        activate(&s).await?;
        view(&s).await
    })
    .await
    .map_err(|e| ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, errors::INTERNAL, e.to_string()))??;
    ok(r)
}

/// `GET /api/v1/replication/snapshot` (only the active server gives one).
pub async fn snapshot(State(s): State<Arc<AppState>>) -> ApiResult {
    if s.authority.role() != ServerRole::Active {
        return Err(ApiError::new(
            StatusCode::CONFLICT,
            errors::STANDBY_SERVER,
            format!("{} is not the active configuration server: copy from the active one", s.config.name),
        ));
    }
    let authority = load(&s.store, AUTHORITY).await?.ok_or_else(|| {
        ApiError::new(StatusCode::INTERNAL_SERVER_ERROR, errors::STORE, "this server's data holds no authority")
    })?;
    let data = s.store.export_all().await?;
    ok(ReplicationSnapshot { authority, taken_ms: now_ms(), data })
}

fn stale_error(s: &AppState) -> ApiError {
    let h = s.authority.superseded();
    ApiError::new(
        StatusCode::CONFLICT,
        errors::STALE_SERVER,
        format!(
            "{} is stale: {} was promoted (epoch {}); send this to the promoted server",
            s.config.name,
            h.as_ref().map(|h| h.server.as_str()).unwrap_or("another server"),
            h.as_ref().map(|h| h.epoch).unwrap_or(0)
        ),
    )
}

/// Whether a server in `role` serves a request (`read`: GET or HEAD) for `path`.
fn allowed(role: ServerRole, read: bool, path: &str) -> bool {
    let settings = path.starts_with("/api/v1/components/") && path.ends_with("/settings");
    match role {
        ServerRole::Active => true,
        ServerRole::Standby => (read && !settings) || path == "/api/v1/authority/promote",
        ServerRole::Stale => read && !settings && path != "/api/v1/replication/snapshot",
    }
}

/// The gate in front of every route: a standby or stale server answers reads (its authority,
/// identity, inventory, jobs) but takes no change and serves no component settings; a standby
/// takes its promotion.
pub async fn gate(State(s): State<Arc<AppState>>, req: Request, next: axum::middleware::Next) -> Response {
    use axum::response::IntoResponse;
    let role = s.authority.role();
    if role == ServerRole::Active {
        return next.run(req).await;
    }
    let read = matches!(*req.method(), Method::GET | Method::HEAD);
    if allowed(role, read, req.uri().path()) {
        return next.run(req).await;
    }
    match role {
        ServerRole::Stale => stale_error(&s).into_response(),
        _ => ApiError::new(
            StatusCode::SERVICE_UNAVAILABLE,
            errors::STANDBY_SERVER,
            format!(
                "{} is a standby of {}: it takes no changes and serves no settings until promoted (`ferry config-server promote`)",
                s.config.name,
                s.config.standby.as_ref().map(|c| c.primary.as_str()).unwrap_or("the active server")
            ),
        )
        .into_response(),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn only_the_active_server_changes_anything_or_tells_components_what_to_do() {
        let settings = "/api/v1/components/agent/web1/settings";
        for role in [ServerRole::Standby, ServerRole::Stale] {
            assert!(allowed(role, true, "/api/v1/authority"), "{role:?} says what it is");
            assert!(allowed(role, true, "/api/v1/jobs"), "{role:?} answers reads");
            assert!(!allowed(role, false, "/api/v1/policies"), "{role:?} takes no change");
            assert!(!allowed(role, false, "/api/v1/heartbeats"), "{role:?} takes no heartbeat");
            assert!(!allowed(role, false, "/api/v1/register"), "{role:?} registers nobody");
            assert!(!allowed(role, true, settings), "{role:?} serves no settings");
        }
        assert!(allowed(ServerRole::Standby, false, "/api/v1/authority/promote"));
        assert!(!allowed(ServerRole::Stale, false, "/api/v1/authority/promote"), "a stale server is not promoted");
        assert!(!allowed(ServerRole::Stale, true, "/api/v1/replication/snapshot"), "nor copied from");
        assert!(allowed(ServerRole::Active, false, "/api/v1/policies") && allowed(ServerRole::Active, true, settings));
    }
}
