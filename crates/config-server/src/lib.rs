//! The configuration server (control plane): inventory through site providers, registration of
//! components, heartbeats and health, replication policies, replication groups, recovery plans,
//! jobs, backup and restore; a REST API under `/api/v1` over TLS. The data plane never passes
//! through it: it configures and observes.

pub mod api;
pub mod authority;
pub mod backup;
pub mod disable;
pub mod discovery;
pub mod errors;
pub mod failover;
pub mod health;
pub mod http;
pub mod inventory;
pub mod jobs;
pub mod model;
pub mod ops;
pub mod plan_failover;
pub mod plan_reprotect;
pub mod plan_test_failover;
pub mod protection;
pub mod provider;
pub mod registration;
pub mod reprotect;
pub mod revocation;
pub mod settings;
pub mod test_failover;

use std::path::PathBuf;
use std::sync::Arc;

use ferry_store::Store;
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio_util::sync::CancellationToken;

#[derive(Debug, thiserror::Error)]
pub enum ConfigServerError {
    #[error(transparent)]
    Store(#[from] ferry_store::StoreError),
    #[error("TLS setup failed: {0}")]
    Tls(#[from] ferry_tls::TlsError),
    #[error("{0}")]
    Setup(String),
}

/// Configuration of `ferry config-server` (TOML; flags override).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigServerConfig {
    /// API address (HTTPS).
    pub listen: String,
    /// The server's own files: `tls/` (CA, server certificate), `backup.key`, the SQLite file.
    pub state_dir: PathBuf,
    /// A file path (SQLite, default `<state_dir>/ferry.db`) or a `postgres://` URL.
    #[serde(default)]
    pub database: Option<String>,
    /// Adopt the CA made by `ferry certs` in this folder on first start (else one is created).
    #[serde(default)]
    pub certs: Option<PathBuf>,
    /// Extra names/addresses in the server certificate (localhost and 127.0.0.1 always).
    #[serde(default)]
    pub hosts: Vec<String>,
    /// Missing heartbeats become critical after this long (806, 78174, 78022).
    #[serde(default = "default_heartbeat_timeout", deserialize_with = "ferry_types::bounds::secs")]
    pub heartbeat_timeout_secs: f64,
    #[serde(default = "default_health_interval", deserialize_with = "ferry_types::bounds::secs")]
    pub health_interval_secs: f64,
    /// Sites are rediscovered this often (a new retention volume shows within it, MT-5).
    #[serde(default = "default_discovery_interval", deserialize_with = "ferry_types::bounds::secs")]
    pub discovery_interval_secs: f64,
    /// RPO threshold for agents without a policy.
    #[serde(default = "default_rpo", deserialize_with = "ferry_types::bounds::secs")]
    pub default_rpo_threshold_secs: f64,
    /// Sites may be added only from folders below this one (set by the admin who runs the
    /// server; unset: no site can be added). A site folder holds the description whose power
    /// commands the server runs, so who may write it decides what runs.
    #[serde(default)]
    pub site_root: Option<PathBuf>,
    /// The commands a site's `[power] on` may run: each an argument-list prefix (the program and
    /// its leading arguments, e.g. `[["/usr/local/bin/start-vm"]]`) that the command, after its
    /// placeholders are filled in, must start with; any other command is refused at power-on.
    #[serde(default)]
    pub power_programs: Vec<Vec<String>>,
    /// Scheduled backups (0 = off) and how many are kept.
    #[serde(default = "default_backup_interval", deserialize_with = "ferry_types::bounds::secs")]
    pub backup_interval_secs: f64,
    #[serde(default = "default_backup_keep")]
    pub backup_keep: usize,
    /// Backup folder (default `<state_dir>/backups`).
    #[serde(default)]
    pub backup_dir: Option<PathBuf>,
    /// Largest request body accepted.
    #[serde(default = "default_max_body")]
    pub max_body_bytes: usize,
    /// Connections open at once (more are closed at accept), 1..=65536.
    #[serde(default = "default_max_connections")]
    pub max_connections: usize,
    /// Connections open at once from one source address (IPv6: one /64), 1..=max_connections.
    #[serde(default = "default_max_connections_per_source")]
    pub max_connections_per_source: usize,
    /// Time a client has for its TLS handshake and for each request's header; also the longest
    /// a kept-alive connection stays idle. Seconds, above 0.
    #[serde(default = "default_header_read_timeout", deserialize_with = "ferry_types::bounds::secs")]
    pub header_read_timeout_secs: f64,
    /// This server's name in the authority record (which server holds the epoch).
    #[serde(default = "default_server_name")]
    pub name: String,
    /// Run as the standby of another configuration server (see `authority`): copy its data,
    /// take no changes until promoted.
    #[serde(default)]
    pub standby: Option<authority::StandbyConfig>,
    /// Other configuration servers (HOST:PORT) asked for their authority, at start before any
    /// job resumes and then at `peer_check_interval_secs`: one holding a higher epoch makes this
    /// server stale.
    #[serde(default)]
    pub peers: Vec<String>,
    #[serde(default = "default_peer_check", deserialize_with = "ferry_types::bounds::secs")]
    pub peer_check_interval_secs: f64,
}

pub(crate) fn default_server_name() -> String {
    "config-server".into()
}
fn default_peer_check() -> f64 {
    10.0
}

fn default_max_connections() -> usize {
    1024
}
fn default_max_connections_per_source() -> usize {
    128
}
fn default_header_read_timeout() -> f64 {
    10.0
}

fn default_heartbeat_timeout() -> f64 {
    900.0
}
fn default_health_interval() -> f64 {
    30.0
}
fn default_discovery_interval() -> f64 {
    900.0
}
fn default_rpo() -> f64 {
    3600.0
}
fn default_backup_interval() -> f64 {
    86_400.0
}
fn default_backup_keep() -> usize {
    7
}
fn default_max_body() -> usize {
    1 << 20
}

impl ConfigServerConfig {
    /// The API listener's limits, range-checked.
    pub fn http_limits(&self) -> Result<ferry_status::http::HttpLimits, ConfigServerError> {
        let bad = |m: String| Err(ConfigServerError::Setup(m));
        if !(1..=65536).contains(&self.max_connections) {
            return bad(format!("max_connections = {} must be between 1 and 65536", self.max_connections));
        }
        if !(1..=self.max_connections).contains(&self.max_connections_per_source) {
            return bad(format!(
                "max_connections_per_source = {} must be between 1 and max_connections ({})",
                self.max_connections_per_source, self.max_connections
            ));
        }
        if self.header_read_timeout_secs < 0.1 || self.header_read_timeout_secs > 3600.0 {
            return bad(format!(
                "header_read_timeout_secs = {} must be between 0.1 and 3600",
                self.header_read_timeout_secs
            ));
        }
        Ok(ferry_status::http::HttpLimits {
            max_connections: self.max_connections,
            max_per_source: self.max_connections_per_source,
            header_read_timeout: std::time::Duration::from_secs_f64(self.header_read_timeout_secs),
        })
    }
    pub fn database_location(&self) -> String {
        self.database.clone().unwrap_or_else(|| self.state_dir.join("ferry.db").to_string_lossy().into_owned())
    }
    pub fn tls_dir(&self) -> PathBuf {
        self.state_dir.join("tls")
    }
    pub fn backup_config(&self) -> backup::BackupConfig {
        backup::BackupConfig {
            dir: self.backup_dir.clone().unwrap_or_else(|| self.state_dir.join("backups")),
            key_file: self.state_dir.join("backup.key"),
            tls_dir: self.tls_dir(),
            keep: self.backup_keep,
        }
    }
}

pub struct AppState {
    pub config: ConfigServerConfig,
    pub store: Store,
    pub jobs: jobs::Jobs,
    pub ops: Arc<ops::Ops>,
    pub tls_dir: PathBuf,
    pub ca_pem: String,
    pub ca_fingerprint: String,
    /// Recent failed registrations per source (guessing is throttled per source).
    pub registration_failures: std::sync::Mutex<registration::RegistrationFailures>,
    /// Held while the server runs: a restore refuses to run under it.
    pub _lock: Option<std::fs::File>,
    /// Active, standby or stale (see `authority`).
    pub authority: authority::AuthorityState,
}

/// Take the state folder's lock (`<state_dir>/.lock`): one server, or one restore, at a time.
pub fn lock_state(state_dir: &std::path::Path) -> Result<std::fs::File, ConfigServerError> {
    use std::os::unix::io::AsRawFd;
    let path = state_dir.join(".lock");
    let f = std::fs::OpenOptions::new()
        .create(true)
        .truncate(false)
        .write(true)
        .open(&path)
        .map_err(|e| ConfigServerError::Setup(format!("cannot open {}: {e}", path.display())))?;
    // SAFETY: flock on a descriptor we own.
    if unsafe { libc::flock(f.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        return Err(ConfigServerError::Setup(format!(
            "{} is in use by a running configuration server (or a restore): stop it first",
            state_dir.display()
        )));
    }
    Ok(f)
}

/// A registration passphrase: 128 random bits, in groups of four hex digits.
pub fn new_passphrase() -> String {
    let b: [u8; 16] = rand::random();
    let hex: String = b.iter().map(|x| format!("{x:02x}")).collect();
    hex.as_bytes().chunks(4).map(|c| String::from_utf8_lossy(c).into_owned()).collect::<Vec<_>>().join("-")
}

/// What a first start created and must show once.
#[derive(Debug, Default, Serialize)]
pub struct FirstStart {
    pub admin_token: Option<String>,
    pub registration_passphrase: Option<String>,
    #[serde(skip)]
    pub lock: Option<std::fs::File>,
}

/// Open the database, the CA and the server certificate; create the first admin token and the
/// registration passphrase when they do not exist yet.
pub async fn prepare(config: &ConfigServerConfig) -> Result<(Store, FirstStart, String), ConfigServerError> {
    ferry_sys::fs::private_dir(&config.state_dir)
        .map_err(|e| ConfigServerError::Setup(format!("cannot create {}: {e}", config.state_dir.display())))?;
    let lock = lock_state(&config.state_dir)?;
    let tls = config.tls_dir();
    ferry_sys::fs::private_dir(&tls)
        .map_err(|e| ConfigServerError::Setup(format!("cannot create {}: {e}", tls.display())))?;
    if !tls.join("ca.key").exists() {
        if let Some(certs) = &config.certs {
            for f in ["ca.pem", "ca.key"] {
                std::fs::copy(certs.join(f), tls.join(f)).map_err(|e| {
                    ConfigServerError::Setup(format!("cannot adopt the CA from {}: {e} (run `ferry certs --dir {}` first, or leave `certs` out to create a CA)", certs.display(), certs.display()))
                })?;
            }
        }
    }
    // (Re)issue the server certificate from the CA for the configured names.
    let mut hosts = config.hosts.clone();
    if let Some(h) = config.listen.rsplit_once(':').map(|(h, _)| h.trim_matches(['[', ']']).to_owned()) {
        if !h.is_empty() && h != "0.0.0.0" && h != "::" {
            hosts.push(h);
        }
    }
    ferry_tls::generate(&tls, &["config-server".to_owned()], &hosts)?;
    let store = Store::open(&config.database_location()).await?;
    let mut first = FirstStart::default();
    if store.tokens().await?.iter().all(|t| t.role != "admin") {
        let token = api::new_token();
        store.add_token("tok-admin-1", &api::hash_token(&token), "first-admin", "admin").await?;
        first.admin_token = Some(token);
    }
    if store.setting("registration_passphrase_hash").await?.is_none() {
        let p = new_passphrase();
        store.set_setting("registration_passphrase_hash", &api::hash_token(&p)).await?;
        first.registration_passphrase = Some(p);
    }
    backup::load_or_create_key(&config.backup_config().key_file).map_err(ConfigServerError::Setup)?;
    let ca_pem = std::fs::read_to_string(tls.join("ca.pem"))
        .map_err(|e| ConfigServerError::Setup(format!("cannot read {}: {e}", tls.join("ca.pem").display())))?;
    first.lock = Some(lock);
    Ok((store, first, ca_pem))
}

/// The address a request came from, for handlers that need it (per-source throttling).
#[derive(Debug, Clone, Copy)]
pub struct PeerAddr(pub std::net::SocketAddr);

/// Accept loop: each connection is admitted under the HTTP limits (in total and per source)
/// before its TLS handshake, which runs concurrently with a time limit (a slow client never
/// blocks others), then served with the header timeout (`ferry_status::http`).
async fn serve_tls(
    listener: TcpListener,
    acceptor: ferry_tls::tokio_rustls::TlsAcceptor,
    app: axum::Router,
    limits: ferry_status::http::HttpLimits,
    shutdown: CancellationToken,
) {
    let gate = ferry_status::http::Gate::new(limits);
    loop {
        let (tcp, peer) = tokio::select! {
            _ = shutdown.cancelled() => {
                // Requests in flight finish before the store closes.
                gate.drained(std::time::Duration::from_secs(5)).await;
                return;
            }
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Some(admitted) = gate.admit(peer.ip()) else {
            tracing::debug!(%peer, "connection refused: too many open");
            continue;
        };
        let (acceptor, app, sd) = (acceptor.clone(), app.clone(), shutdown.clone());
        tokio::spawn(async move {
            match tokio::time::timeout(limits.header_read_timeout, acceptor.accept(tcp)).await {
                Ok(Ok(tls)) => ferry_status::http::spawn_connection(tls, PeerAddr(peer), app, limits, admitted, sd),
                Ok(Err(e)) => tracing::debug!(%peer, error = %e, "TLS handshake failed"),
                Err(_) => tracing::debug!(%peer, "TLS handshake timed out"),
            }
        });
    }
}

/// Run the configuration server on a pre-bound listener until `shutdown`.
pub async fn serve(
    config: ConfigServerConfig,
    listener: TcpListener,
    prepared: (Store, FirstStart, String),
    shutdown: CancellationToken,
) -> Result<(), ConfigServerError> {
    let (store, mut first, ca_pem) = prepared;
    let limits = config.http_limits()?;
    let tls_dir = config.tls_dir();
    let acceptor = ferry_tls::token_api_acceptor(&ferry_tls::TlsFiles::in_dir(&tls_dir, "config-server"))?;
    let ops = ops::arc(store.clone(), config.backup_config(), config.power_programs.clone());
    let jobs = jobs::Jobs::new(store.clone());
    // Decided before any job resumes: a returning server that was superseded resumes nothing.
    let authority = authority::initial(&config, &store, shutdown.clone()).await?;
    let state = Arc::new(AppState {
        authority,
        ca_fingerprint: ferry_tls::fingerprint(&ca_pem)?,
        ca_pem,
        tls_dir,
        store,
        jobs,
        ops,
        config: config.clone(),
        registration_failures: std::sync::Mutex::new(registration::RegistrationFailures::default()),
        _lock: first.lock.take(),
    });
    if state.authority.role() == ferry_api::config_server::ServerRole::Active {
        authority::activate(&state).await?;
    }
    authority::spawn(&state);
    let app = api::router(state.clone());
    // The peer address reaches handlers (registration is throttled per source).
    serve_tls(listener, acceptor, app, limits, shutdown.clone()).await;
    state.store.close().await;
    Ok(())
}

/// Rediscovery of every site and scheduled backups.
pub(crate) async fn periodic(s: Arc<AppState>, shutdown: CancellationToken) {
    let discovery = std::time::Duration::from_secs_f64(s.config.discovery_interval_secs.max(1.0));
    let backup = (s.config.backup_interval_secs > 0.0)
        .then(|| std::time::Duration::from_secs_f64(s.config.backup_interval_secs.max(1.0)));
    let mut next_discovery = tokio::time::Instant::now() + discovery;
    let mut next_backup = backup.map(|b| tokio::time::Instant::now() + b);
    loop {
        let wake = next_backup.map(|b| b.min(next_discovery)).unwrap_or(next_discovery);
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep_until(wake) => {}
        }
        let now = tokio::time::Instant::now();
        if now >= next_discovery {
            next_discovery = now + discovery;
            if let Ok(sites) = s.store.list::<ops::Site>(ops::SITE).await {
                let open: Vec<jobs::Job> =
                    s.store.jobs(Some(&["queued", "in-progress", "waiting-for-input"])).await.unwrap_or_default();
                for site in sites {
                    // One discovery per site at a time: a slow one is not piled upon.
                    if open.iter().any(|j| (j.kind == "discovery" || j.kind == "site-operation") && j.target == site.id)
                    {
                        continue;
                    }
                    if let Err(e) = api::start_discovery(&s, &site.id).await {
                        tracing::warn!(site = %site.id, error = %e.message, "scheduled discovery failed to start");
                    }
                }
            }
        }
        if let (Some(b), Some(at)) = (backup, next_backup) {
            if now >= at {
                next_backup = Some(now + b);
                let steps = vec![("write an encrypted backup".to_owned(), true)];
                let work = crate::ops::JobWork::Backup {};
                let started = match work.split() {
                    Ok((kind, params)) => s
                        .jobs
                        .start(s.ops.clone(), kind, "configuration database (scheduled)", steps, params)
                        .await
                        .map_err(|e| e.to_string()),
                    Err(e) => Err(e.message),
                };
                if let Err(e) = started {
                    tracing::warn!(error = %e, "scheduled backup failed to start");
                }
            }
        }
    }
}
