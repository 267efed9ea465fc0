//! The agent (mobility service): serves each protected disk of a machine as an NBD export,
//! sequences every write with one per-machine counter, and ships the changes in order to a
//! process server. See [`machine`] for the ordering and crash-recovery invariants.

pub mod block_hash;
#[cfg(test)]
mod chain_tests;
mod config;
pub mod machine;
pub mod offline;
pub mod points;
mod sender;
#[cfg(feature = "testing")]
mod testing;
mod verify;

use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

use axum::extract::{Path as UrlPath, State};
use axum::http::StatusCode;
use axum::routing::{on, MethodRouter};
use axum::{Json, Router};
use ferry_api::agent::{AgentEndpoint, VerifyRequest, VerifyStarted, ROUTES};
use ferry_api::control::{ComponentKind, ComponentStatus};
use ferry_nbd::{Backend, BackendError, Export, Exports, Extent, ServerConfig};
use ferry_protocol::codes;
use ferry_status::{method_filter, ok, Failure, JsonBody, Reply};
use tokio::net::{TcpListener, UnixListener};
use tokio_util::sync::CancellationToken;

pub use config::{AgentConfig, DiskCache, DiskConfig, GroupConfig};
pub use machine::{Machine, Mode};
pub use verify::{VerifySession, VERIFY_BLOCK};

#[derive(Debug, thiserror::Error)]
pub enum AgentError {
    #[error("invalid configuration: {0}")]
    Config(String),
    #[error("disk {path}: {error}")]
    Disk { path: PathBuf, error: String },
    #[error("i/o error on {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("agent state: {0}")]
    Journal(#[from] ferry_journal::JournalError),
    #[error("TLS setup failed: {0}")]
    Tls(#[from] ferry_tls::TlsError),
    #[error("the machine is in {0} mode, not replicating: wait until it is caught up and retry")]
    NotReplicating(String),
}

/// A setting that asks for test-only behaviour, in a build without the `testing` feature.
#[cfg(not(feature = "testing"))]
pub(crate) fn testing_only(setting: &str) -> AgentError {
    AgentError::Config(format!(
        "{setting} is test-only behaviour and this ferry was built without the `testing` feature: remove it from the configuration"
    ))
}

/// Map an I/O error on `path` to [`AgentError::Io`].
pub(crate) fn io_at(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> AgentError + '_ {
    move |source| AgentError::Io { path: path.to_owned(), source }
}

/// The NBD backend of one protected disk: reads go straight to the disk, every modification goes
/// through the machine's sequencer.
struct ReplicatedDisk {
    machine: Arc<Machine>,
    index: u16,
}

impl ReplicatedDisk {
    /// Zeroing requests can span gigabytes: split them so each piece fits in the activity log.
    fn zero(&self, offset: u64, len: u64, may_trim: bool, fua: bool) -> Result<(), BackendError> {
        let piece = self.machine.max_zero_piece();
        let mut done = 0;
        while done < len {
            let n = (len - done).min(piece);
            self.machine.submit(self.index, offset + done, n, None, may_trim, fua)?;
            done += n;
        }
        Ok(())
    }
}

impl Backend for ReplicatedDisk {
    fn size(&self) -> u64 {
        self.machine.disks[self.index as usize].size
    }
    fn can_multi_conn(&self) -> bool {
        true
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), BackendError> {
        self.machine.disks[self.index as usize].backend.read(offset, buf)
    }
    fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), BackendError> {
        self.machine.submit(self.index, offset, data.len() as u64, Some(data), false, fua)
    }
    fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool, fua: bool) -> Result<(), BackendError> {
        self.zero(offset, len, may_trim, fua)
    }
    fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<(), BackendError> {
        // TRIM is replicated as zeroing so source and target stay byte-identical.
        self.zero(offset, len, true, fua)
    }
    fn flush(&self) -> Result<(), BackendError> {
        self.machine.disks[self.index as usize].backend.flush()
    }
    fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>, BackendError> {
        self.machine.disks[self.index as usize].backend.block_status(offset, len)
    }
}

/// Listeners an agent serves on (bound by the caller, so tests run real servers cheaply).
#[derive(Default)]
pub struct AgentListeners {
    pub nbd_tcp: Option<TcpListener>,
    pub nbd_unix: Option<UnixListener>,
    pub status: Option<TcpListener>,
}

/// Where a linked agent keeps the revoked certificate serials (in its state folder).
pub const REVOKED_FILE: &str = "revoked-certificates.json";

/// Run the agent until `shutdown` is cancelled, then stop cleanly.
pub async fn serve(
    config: AgentConfig,
    listeners: AgentListeners,
    shutdown: CancellationToken,
) -> Result<(), AgentError> {
    if let Some(l) = &listeners.nbd_tcp {
        let addr = l.local_addr().map_err(|source| AgentError::Io { path: "nbd listener".into(), source })?;
        if !config.nbd_tls {
            return Err(AgentError::Config(format!(
                "the NBD export would listen on {addr} in plain TCP, where every local user (and, beyond loopback, anyone) could write the protected disks: set nbd_tls = true (clients then need the nbd-client/{} certificate, `ferry certs --component nbd-client/{}`), or drop nbd_listen and use the owner-only unix socket (nbd_socket, default <state_dir>/nbd.sock)",
                config.machine, config.machine
            )));
        }
    }
    let mut config = config;
    // The status names this file to the CLI, which may run from another folder.
    let token_file = config.control_token_path();
    let token_file = std::path::absolute(&token_file).unwrap_or(token_file);
    config.control_token_file = Some(token_file.clone());
    let control = ferry_status::control::load_or_create_control_token(&token_file)
        .map_err(|source| AgentError::Io { path: token_file.clone(), source })?;
    let access = ferry_status::Access::control(&control)
        .with_coordinator_key(config.group.as_ref().and_then(|g| g.coordinator_public_key.as_deref()));
    let connector = ferry_tls::connector(&config.tls)?;
    let nbd_tls = if config.nbd_tls { Some(ferry_tls::acceptor(&config.tls)?) } else { None };
    let machine = {
        let config = config.clone();
        tokio::task::spawn_blocking(move || Machine::open(config))
            .await
            .map_err(|e| AgentError::Config(e.to_string()))??
    };
    tracing::info!(machine = %machine.name, mode = ?machine.lock().mode, "agent started");

    // Before the first write: until a clean stop says otherwise, the writes at the recovery
    // site are known only from this agent's state.
    {
        let m = machine.clone();
        tokio::task::spawn_blocking(move || m.write_recovery_writes(&m.lock(), false))
            .await
            .map_err(|e| AgentError::Config(e.to_string()))??;
    }
    // Tracking only (no process server): nothing resyncs, nothing ships.
    let shipping = config.process_server.is_some();
    let resync = if shipping {
        let m = machine.clone();
        Some(
            std::thread::Builder::new()
                .name("resync".into())
                .spawn(move || m.resync_loop())
                .map_err(|e| AgentError::Config(e.to_string()))?,
        )
    } else {
        None
    };
    // The sender outlives the NBD exports: on shutdown it keeps draining the log while the
    // machine waits for the process server's acknowledgements.
    let sender_stop = CancellationToken::new();
    // A linked agent keeps the certificates the configuration server revoked in its state folder.
    let revoked = Arc::new(match config.config_server {
        Some(_) => ferry_tls::Revoked::load(&config.state_dir.join(REVOKED_FILE)).map_err(AgentError::Config)?,
        None => ferry_tls::Revoked::none(),
    });
    let sender =
        shipping.then(|| tokio::spawn(sender::run(machine.clone(), connector, revoked.clone(), sender_stop.clone())));
    let maintenance = {
        let m = machine.clone();
        let sd = shutdown.clone();
        let every = Duration::from_secs_f64(config.maintenance_interval_secs.max(0.01));
        let retire_every = Duration::from_secs_f64(config.al_retire_interval_secs.max(0.01));
        tokio::spawn(async move {
            let mut last_retire = std::time::Instant::now();
            loop {
                tokio::select! {
                    _ = sd.cancelled() => return,
                    _ = tokio::time::sleep(every) => {}
                }
                m.requeue_stale_bulk(Duration::from_secs(60));
                let m2 = m.clone();
                let due = last_retire.elapsed() >= retire_every;
                if due {
                    last_retire = std::time::Instant::now();
                }
                match tokio::task::spawn_blocking(move || m2.maintenance(due)).await {
                    Ok(Err(e)) => tracing::error!(error = %e, "agent maintenance failed"),
                    Err(e) => tracing::error!(error = %e, "agent maintenance panicked"),
                    Ok(Ok(())) => {}
                }
            }
        })
    };

    let exports = Exports::new();
    for (i, d) in machine.disks.iter().enumerate() {
        exports.insert(Export {
            name: d.name.to_string(),
            description: format!("{} disk {} (protected by Ferry)", machine.name, d.name),
            backend: Arc::new(ReplicatedDisk { machine: machine.clone(), index: i as u16 }),
        });
    }
    let mut nbd_config = ServerConfig::new(exports, nbd_tls.clone(), nbd_tls.is_some());
    // Over TLS only this machine's NBD client (`nbd-client/MACHINE`) attaches its disks: not any
    // certificate of the CA (another machine's hypervisor, a process server's).
    let (rv, name) = (revoked.clone(), machine.name.to_string());
    nbd_config.tls_client_check = Some(Arc::new(move |conn| {
        let id = rv.peer_identity(conn).map_err(|e| e.to_string())?;
        if id.role != ferry_tls::CertRole::NbdClient || id.name != name {
            return Err(format!("certificate {id} may not attach machine {name}'s disks (needs nbd-client/{name})"));
        }
        // Revoked later: the attached client is cut at once, not at its next connection.
        let Some(serial) = ferry_tls::Revoked::peer_serial(conn) else { return Ok(None) };
        let rv = rv.clone();
        let cut: ferry_nbd::CutSignal = Box::pin(async move {
            rv.revoked_now(&serial).await;
            format!("certificate {id} (serial {serial}) was revoked")
        });
        Ok(Some(cut))
    }));
    let nbd_config = Arc::new(nbd_config);
    let mut tasks = Vec::new();
    if let Some(l) = listeners.nbd_tcp {
        tasks.push(tokio::spawn(ferry_nbd::serve_tcp(l, nbd_config.clone(), shutdown.clone())));
    }
    if let Some(l) = listeners.nbd_unix {
        tasks.push(tokio::spawn(ferry_nbd::serve_unix(l, nbd_config.clone(), shutdown.clone())));
    }
    points::spawn_timers(machine.clone(), shutdown.clone());
    ferry_status::spawn(listeners.status, router(machine.clone(), &access), shutdown.clone());
    if let Some(link) = config.config_server.clone() {
        let m = machine.clone();
        let status = move || ComponentStatus::Agent(m.status());
        let name = machine.name.to_string();
        ferry_status::spawn_heartbeats(link.clone(), ComponentKind::Agent, name.clone(), status, shutdown.clone());
        // The agent takes its other settings at start; while running it follows the revocations
        // and a planned failover's quiesce (its hooks may take a while: off the watch's task).
        let m = machine.clone();
        let revoked_for_status = revoked.clone();
        let apply = move |v: ferry_api::control::ComponentSettings| {
            if let Err(e) = revoked.extend(v.revoked_certificates.as_deref().unwrap_or_default()) {
                tracing::error!(error = %e, "cannot keep the revoked certificates");
            }
            m.follow_verify_order(v.verify_order.clone());
            let m = m.clone();
            let order = v.quiesce.map(|q| q.order);
            let spawned = std::thread::Builder::new().name("quiesce".into()).spawn(move || match order {
                Some(order) => m.quiesce(&order),
                None => m.lift_quiesce(),
            });
            if let Err(e) = spawned {
                tracing::error!(error = %e, "cannot start the quiesce thread");
            }
        };
        let watch = ferry_status::spawn_settings_watch(link, ComponentKind::Agent, name, apply, shutdown.clone());
        let _ = machine.server_link.set((watch, revoked_for_status));
    }
    shutdown.cancelled().await;
    for t in tasks {
        let _ = t.await;
    }
    let _ = maintenance.await;
    let m = machine.clone();
    let r = tokio::task::spawn_blocking(move || m.shutdown()).await.map_err(|e| AgentError::Config(e.to_string()))?;
    sender_stop.cancel();
    if let Some(s) = sender {
        let _ = s.await;
    }
    if let Some(t) = resync {
        let _ = t.join();
    }
    r
}

/// The status listener's router: every route of `ferry_api::agent::ROUTES` with its handler.
fn router(machine: Arc<Machine>, access: &ferry_status::Access) -> Router {
    let m = machine.clone();
    ferry_status::router_from(ROUTES, access, |r| {
        let f = method_filter(r.method);
        let h: MethodRouter<Arc<Machine>> = match r.id {
            AgentEndpoint::Status => {
                let m = m.clone();
                return ferry_status::status_route(move || ComponentStatus::Agent(m.status())).with_state(());
            }
            AgentEndpoint::CrashPoint => on(f, points::take_crash),
            AgentEndpoint::AppPoint => on(f, points::take_app),
            AgentEndpoint::GroupPoint => on(f, points::take_group),
            AgentEndpoint::GroupPrepare => on(f, points::prepare),
            AgentEndpoint::GroupCommit => on(f, points::commit),
            AgentEndpoint::GroupAbort => on(f, points::abort),
            AgentEndpoint::StartVerify => on(f, start_verify),
            AgentEndpoint::GetVerify => on(f, get_verify),
        };
        h.with_state(machine.clone())
    })
}

async fn start_verify(State(m): State<Arc<Machine>>, JsonBody(req): JsonBody<VerifyRequest>) -> Reply<VerifyStarted> {
    match m.start_verify(&req.disk, req.repair) {
        Ok(verify_id) => Ok((StatusCode::ACCEPTED, Json(VerifyStarted { verify_id }))),
        Err(e @ AgentError::NotReplicating(_)) => Err(Failure::with_status(
            StatusCode::CONFLICT,
            codes::NOT_REPLICATING,
            e.to_string(),
            "retry once the agent reports caught_up",
        )),
        Err(e) => {
            Err(Failure::with_status(StatusCode::BAD_REQUEST, codes::BAD_NAME, e.to_string(), "name a configured disk"))
        }
    }
}

async fn get_verify(State(m): State<Arc<Machine>>, UrlPath(id): UrlPath<u64>) -> Reply<VerifySession> {
    match m.verify.get(id) {
        Some(s) => ok(s),
        None => Err(Failure::with_status(
            StatusCode::NOT_FOUND,
            codes::NOT_FOUND,
            format!("no verify session {id}"),
            "start one with POST /verify",
        )),
    }
}
