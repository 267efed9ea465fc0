//! The process server: receives change streams from agents, spools them durably (fsync before
//! acknowledging, batched), forwards them in order to the master target compressed (lz4), and
//! throttles agents when its cache runs low (NET-2).
//!
//! Architecture Invariant: an agent's records are acknowledged only after they are fsync'd in the
//! spool; spool segments are released only after the master target acknowledged them durable.
//! Architecture Invariant: the process server never reorders: one forwarder per machine reads the
//! spool in seq order.

mod spool;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use ferry_api::control::{ComponentKind, ComponentStatus};
use ferry_api::process_server::{ProcessServerEndpoint, ROUTES};
use ferry_protocol::{codes, FrameCodec, Hello, HelloAck, MachineName, Message, Role};
use ferry_tls::TlsFiles;
use futures::{FutureExt, SinkExt, StreamExt};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio_util::codec::Framed;
use tokio_util::sync::CancellationToken;

pub use spool::{MachineSpool, SpoolStatus};

#[derive(Debug, thiserror::Error)]
pub enum ProcessServerError {
    #[error("journal error: {0}")]
    Journal(#[from] ferry_journal::JournalError),
    #[error("TLS setup failed: {0}")]
    Tls(#[from] ferry_tls::TlsError),
    #[error("i/o error on {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("invalid configuration: {0}")]
    Config(String),
}

/// Map an I/O error on `path` to [`ProcessServerError::Io`].
pub(crate) fn io_at(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> ProcessServerError + '_ {
    move |source| ProcessServerError::Io { path: path.to_owned(), source }
}

/// Configuration of `ferry process-server`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ProcessServerConfig {
    /// The cache folder holding the spool, `<cache_dir>/<machine>/`.
    pub cache_dir: PathBuf,
    /// Configured cache capacity in bytes; free % = (capacity − spool bytes) / capacity.
    pub cache_capacity_bytes: u64,
    /// Address for agents (TLS).
    pub listen: String,
    #[serde(default)]
    pub status_listen: Option<String>,
    /// The master target's replication address.
    pub master_target: String,
    /// Name in the master target's certificate (default: `master-target`).
    #[serde(default = "default_mt_name")]
    pub master_target_name: String,
    pub tls: TlsFiles,
    /// Throttle agents below this free percentage of the cache (NET-2: 20).
    #[serde(default = "default_throttle", deserialize_with = "ferry_types::bounds::percent_u8")]
    pub throttle_free_percent: u8,
    /// Seconds between reconnection attempts to the master target.
    #[serde(default = "default_reconnect", deserialize_with = "ferry_types::bounds::secs")]
    pub reconnect_interval_secs: f64,
    #[serde(default = "default_segment_bytes")]
    pub segment_bytes: u64,
    /// Bytes forwarded per frame to the master target.
    #[serde(default = "default_batch")]
    pub forward_batch_bytes: usize,
    /// Heartbeats to a configuration server (from `ferry register`); standalone without it.
    #[serde(default)]
    pub config_server: Option<ferry_status::ConfigServerLink>,
    /// Per-machine master targets (set when protection is enabled); others go to `master_target`.
    #[serde(default)]
    pub machine_master_targets: HashMap<String, MasterTargetRoute>,
    /// The address agents should use (a proxy or NAT address; default: `listen`).
    #[serde(default)]
    pub advertise: Option<String>,
}

/// Per-machine routes remembered in the cache folder.
/// (A leading dot: no machine name can take it, so it never meets a spool folder.)
const ROUTES_FILE: &str = ".master-target-routes.json";

/// What the process server did with the configuration server's removal orders (disabled
/// protections), kept in the cache folder.
const REMOVED_FILE: &str = ".removed-machines.json";

pub use ferry_api::process_server::MasterTargetRoute;
/// The per-machine routes a running process server takes from the configuration server.
use ferry_api::process_server::ProcessServerSettings as LiveSettings;

fn default_mt_name() -> String {
    "master-target".into()
}
fn default_throttle() -> u8 {
    20
}
fn default_reconnect() -> f64 {
    1.0
}
fn default_segment_bytes() -> u64 {
    16 << 20
}
fn default_batch() -> usize {
    4 << 20
}

pub struct ProcessServer {
    config: ProcessServerConfig,
    spools: Mutex<HashMap<MachineName, Arc<MachineSpool>>>,
    live: std::sync::RwLock<LiveSettings>,
    connector: ferry_tls::tokio_rustls::TlsConnector,
    /// Certificates the configuration server revoked (kept in the cache folder).
    revoked: Arc<ferry_tls::Revoked>,
    /// The link to the configuration server, for the status (set once its watch runs).
    server_link: std::sync::OnceLock<ferry_status::SettingsLink>,
    /// Removal orders done (or failing), per machine.
    removed: Mutex<std::collections::BTreeMap<String, ferry_api::control::RemovedMachine>>,
    /// The removal orders of the latest settings, and the thread that carries them out.
    removal_orders: Mutex<std::collections::BTreeMap<String, ferry_api::control::RemovalOrder>>,
    removals_busy: std::sync::atomic::AtomicBool,
    removals_again: std::sync::atomic::AtomicBool,
    shutdown: CancellationToken,
}

/// Where a linked process server keeps the revoked certificate serials.
pub const REVOKED_FILE: &str = "revoked-certificates.json";

impl ProcessServer {
    pub fn new(config: ProcessServerConfig, shutdown: CancellationToken) -> Result<Arc<Self>, ProcessServerError> {
        {
            use ferry_types::bounds::check_range;
            let (min_batch, max_batch) = ferry_types::bounds::BATCH_BYTES;
            [
                check_range("cache_capacity_bytes", config.cache_capacity_bytes, 1 << 20, 1 << 50),
                check_range("segment_bytes", config.segment_bytes, 64 << 10, 1 << 30),
                check_range("forward_batch_bytes", config.forward_batch_bytes as u64, min_batch, max_batch),
            ]
            .into_iter()
            .collect::<Result<(), String>>()
            .map_err(ProcessServerError::Config)?;
        }
        if config.throttle_free_percent >= 100 {
            return Err(ProcessServerError::Config("throttle_free_percent must be below 100".into()));
        }
        ferry_sys::fs::private_dir(&config.cache_dir)
            .map_err(|source| ProcessServerError::Io { path: config.cache_dir.clone(), source })?;
        let connector = ferry_tls::connector(&config.tls)?;
        // Routes from the configuration server, remembered in the cache folder: after a restart
        // with the server unreachable, spooled changes still go to each machine's own master target.
        let mut routes: std::collections::BTreeMap<String, MasterTargetRoute> =
            std::fs::read(config.cache_dir.join(ROUTES_FILE))
                .ok()
                .and_then(|d| serde_json::from_slice(&d).ok())
                .unwrap_or_default();
        routes.extend(config.machine_master_targets.clone());
        let live = std::sync::RwLock::new(LiveSettings { machine_master_targets: routes });
        let revoked = match config.config_server {
            Some(_) => {
                ferry_tls::Revoked::load(&config.cache_dir.join(REVOKED_FILE)).map_err(ProcessServerError::Config)?
            }
            None => ferry_tls::Revoked::none(),
        };
        let revoked = Arc::new(revoked);
        let config_cache_dir = config.cache_dir.clone();
        let ps = Arc::new(ProcessServer {
            config,
            spools: Mutex::new(HashMap::new()),
            live,
            connector,
            revoked,
            server_link: std::sync::OnceLock::new(),
            removed: Mutex::new(
                std::fs::read(config_cache_dir.join(REMOVED_FILE))
                    .ok()
                    .and_then(|d| serde_json::from_slice(&d).ok())
                    .unwrap_or_default(),
            ),
            removal_orders: Mutex::new(Default::default()),
            removals_busy: std::sync::atomic::AtomicBool::new(false),
            removals_again: std::sync::atomic::AtomicBool::new(false),
            shutdown,
        });
        // Resume forwarding whatever the spool still holds, agent connected or not.
        if let Ok(entries) = std::fs::read_dir(&ps.config.cache_dir) {
            for e in entries.flatten() {
                let Ok(name) = MachineName::new(e.file_name().to_string_lossy()) else { continue };
                if e.path().join("machine.json").exists() {
                    if let Err(err) = ps.spool_for(None, &name) {
                        tracing::error!(machine = %name, error = %err, "cannot reopen spool");
                    }
                }
            }
        }
        Ok(ps)
    }

    fn lock_spools(&self) -> std::sync::MutexGuard<'_, HashMap<MachineName, Arc<MachineSpool>>> {
        self.spools.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Open (and start forwarding) the spool of a machine; `hello` updates its descriptor.
    fn spool_for(
        self: &Arc<Self>,
        hello: Option<&Hello>,
        name: &MachineName,
    ) -> Result<Arc<MachineSpool>, ProcessServerError> {
        let mut map = self.lock_spools();
        if let Some(s) = map.get(name) {
            if let Some(h) = hello {
                s.set_descriptor(h)?;
            }
            return Ok(s.clone());
        }
        let s = MachineSpool::open(&self.config, name, hello)?;
        map.insert(name.clone(), s.clone());
        let ps = self.clone();
        let s2 = s.clone();
        tokio::spawn(async move { ps.forward_loop(s2).await });
        Ok(s)
    }

    /// Whether `peer` may stream `machine`: an agent certificate naming that machine, and when the
    /// configuration server routed the machine, exactly the identity it issued to its agent.
    fn check_agent(&self, peer: &ferry_tls::Identity, machine: &MachineName) -> Result<(), String> {
        if peer.role != ferry_tls::CertRole::Agent || peer.name != machine.as_str() {
            return Err(format!("certificate {peer} may not stream machine {machine}"));
        }
        let live = self.live.read().unwrap_or_else(|p| p.into_inner());
        match live.machine_master_targets.get(machine.as_str()).and_then(|r| r.agent.as_ref()) {
            Some(expected) if *expected != peer.to_string() => {
                Err(format!("machine {machine} is protected from another agent than {peer}"))
            }
            _ => Ok(()),
        }
    }

    /// Whether the machine has a spool here or a route from the configuration server.
    fn knows(&self, machine: &MachineName) -> bool {
        self.lock_spools().contains_key(machine)
            || self.live.read().unwrap_or_else(|p| p.into_inner()).machine_master_targets.contains_key(machine.as_str())
    }

    /// Bytes held by all spools.
    pub fn spool_bytes(&self) -> u64 {
        self.lock_spools().values().map(|s| s.bytes()).sum()
    }

    /// Free percentage of the cache: configured capacity first, the filesystem's space second.
    pub fn free_percent(&self) -> u8 {
        let cap = self.config.cache_capacity_bytes as f64;
        let used = self.spool_bytes() as f64;
        let by_capacity = ((cap - used).max(0.0) / cap * 100.0).floor() as u8;
        let fs_free = fs_available(&self.config.cache_dir);
        // Hard limit: the filesystem must hold at least another batch or two (less for a small cache).
        let floor = (2 * ferry_protocol::MAX_FRAME_LEN as u64).min(self.config.cache_capacity_bytes / 5);
        if fs_free < floor {
            return 0;
        }
        by_capacity
    }

    /// The master target a machine's changes go to (read at each connection).
    fn route_for(&self, machine: &str) -> MasterTargetRoute {
        let live = self.live.read().unwrap_or_else(|p| p.into_inner());
        live.machine_master_targets.get(machine).cloned().unwrap_or_else(|| MasterTargetRoute {
            address: self.config.master_target.clone(),
            name: self.config.master_target_name.clone(),
            agent: None,
        })
    }

    /// Take new per-machine routes from the configuration server (they apply from the
    /// machine's next connection to a master target).
    pub fn apply_settings(self: &Arc<Self>, v: &ferry_api::control::ComponentSettings) {
        if let Err(e) = self.revoked.extend(v.revoked_certificates.as_deref().unwrap_or_default()) {
            tracing::error!(error = %e, "cannot keep the revoked certificates");
        }
        let mut s = LiveSettings { machine_master_targets: v.machine_master_targets.clone().unwrap_or_default() };
        {
            {
                for (k, r) in &self.config.machine_master_targets {
                    s.machine_master_targets.entry(k.clone()).or_insert(r.clone());
                }
                let path = self.config.cache_dir.join(ROUTES_FILE);
                let saved = serde_json::to_vec_pretty(&s.machine_master_targets)
                    .map_err(std::io::Error::other)
                    .and_then(|d| ferry_sys::fs::write_atomic(&path, &d));
                if let Err(e) = saved {
                    tracing::error!(error = %e, file = %path.display(), "cannot remember the master-target routes");
                }
                *self.live.write().unwrap_or_else(|p| p.into_inner()) = s;
            }
        }
        self.set_removal_orders(v.machine_removals.as_ref());
    }

    /// Take the removal orders of the latest settings and carry them out on a thread of their
    /// own (heartbeats go on meanwhile), trying a failed one again every few seconds.
    fn set_removal_orders(
        self: &Arc<Self>,
        orders: Option<&std::collections::BTreeMap<String, ferry_api::control::RemovalOrder>>,
    ) {
        *self.removal_orders.lock().unwrap_or_else(|p| p.into_inner()) = orders.cloned().unwrap_or_default();
        if self.removals_busy.swap(true, std::sync::atomic::Ordering::SeqCst) {
            self.removals_again.store(true, std::sync::atomic::Ordering::SeqCst);
            return;
        }
        let ps = self.clone();
        let spawned = std::thread::Builder::new().name("removals".into()).spawn(move || {
            use std::sync::atomic::Ordering::SeqCst;
            loop {
                ps.removals_again.store(false, SeqCst);
                let pending = ps.follow_removals();
                if ps.shutdown.is_cancelled() {
                    break;
                }
                if pending {
                    std::thread::sleep(Duration::from_secs(3));
                    continue;
                }
                ps.removals_busy.store(false, SeqCst);
                if !ps.removals_again.load(SeqCst) || ps.removals_busy.swap(true, SeqCst) {
                    return;
                }
            }
            ps.removals_busy.store(false, SeqCst);
        });
        if let Err(e) = spawned {
            self.removals_busy.store(false, std::sync::atomic::Ordering::SeqCst);
            tracing::error!(error = %e, "cannot start the removal thread");
        }
    }

    /// The removal order given for `machine`, if its protection was disabled: nothing of it is
    /// taken, whatever earlier routes say, until the order is withdrawn.
    fn removal_ordered(&self, machine: &str) -> Option<String> {
        self.removal_orders.lock().unwrap_or_else(|p| p.into_inner()).get(machine).map(|o| o.order.clone())
    }

    /// Delete the spool of each machine whose order is not done yet (records of withdrawn
    /// orders are dropped). Returns whether one failed (to be tried again).
    fn follow_removals(&self) -> bool {
        let orders = self.removal_orders.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let todo: Vec<(String, ferry_api::control::RemovalOrder)> = {
            let mut removed = self.removed.lock().unwrap_or_else(|p| p.into_inner());
            let before = removed.len();
            removed.retain(|m, _| orders.contains_key(m));
            if removed.len() != before {
                self.save_removed(&removed);
            }
            orders
                .iter()
                .filter(|(m, o)| !removed.get(*m).is_some_and(|r| r.order == o.order && r.error.is_none()))
                .map(|(m, o)| (m.clone(), o.clone()))
                .collect()
        };
        let mut failed = false;
        for (m, o) in todo {
            let r = match MachineName::new(&m) {
                // A name that is not a machine's never names a folder here.
                Err(_) => Err(format!("{m:?} is not a machine name")),
                Ok(name) => {
                    // Out of the map first (a new hello is refused by the order), then ended.
                    let spool = self.lock_spools().remove(&name);
                    let dir = match &spool {
                        Some(s) => {
                            s.closed.cancel();
                            s.dir().to_owned()
                        }
                        None => self.config.cache_dir.join(name.as_str()),
                    };
                    ferry_sys::fs::remove_tree(&dir, "machine.json").map_err(|e| e.to_string())
                }
            };
            let done = match r {
                Ok(bytes) => {
                    tracing::warn!(machine = %m, order = %o.order, deleted_bytes = bytes, "protection disabled: spool deleted");
                    ferry_api::control::RemovedMachine {
                        order: o.order.clone(),
                        at_ms: ferry_protocol::now_ms(),
                        deleted_bytes: bytes,
                        kept_target_disks: false,
                        error: None,
                    }
                }
                Err(e) => {
                    failed = true;
                    tracing::error!(machine = %m, error = %e, "cannot delete the spool of a disabled protection (tried again)");
                    ferry_api::control::RemovedMachine {
                        order: o.order.clone(),
                        at_ms: 0,
                        deleted_bytes: 0,
                        kept_target_disks: false,
                        error: Some(e),
                    }
                }
            };
            let mut removed = self.removed.lock().unwrap_or_else(|p| p.into_inner());
            if self.removal_ordered(&m).as_deref() == Some(o.order.as_str()) {
                removed.insert(m.clone(), done);
                self.save_removed(&removed);
            }
        }
        failed
    }

    fn save_removed(&self, removed: &std::collections::BTreeMap<String, ferry_api::control::RemovedMachine>) {
        let path = self.config.cache_dir.join(REMOVED_FILE);
        let saved = serde_json::to_vec_pretty(removed)
            .map_err(std::io::Error::other)
            .and_then(|d| ferry_sys::fs::write_atomic(&path, &d));
        if let Err(e) = saved {
            tracing::error!(error = %e, file = %path.display(), "cannot keep the removal records");
        }
    }

    pub fn status(&self) -> ferry_api::process_server::ProcessServerStatus {
        let spools: Vec<_> = self.lock_spools().values().cloned().collect();
        let mut machines: Vec<_> = spools.iter().map(|s| s.status()).collect();
        machines.sort_by(|a, b| a.machine.cmp(&b.machine));
        let live = self.live.read().unwrap_or_else(|p| p.into_inner()).clone();
        let free_percent = self.free_percent();
        ferry_api::process_server::ProcessServerStatus {
            config_server_link: self.server_link.get().map(|l| l.snapshot(self.revoked.len())),
            listen: self.config.listen.clone(),
            advertise: self.config.advertise.clone().unwrap_or_else(|| self.config.listen.clone()),
            settings: live,
            cache_capacity_bytes: self.config.cache_capacity_bytes,
            spool_bytes: self.spool_bytes(),
            free_percent,
            throttling: free_percent < self.config.throttle_free_percent,
            filesystem_available_bytes: fs_available(&self.config.cache_dir),
            machines,
            removed_machines: self.removed.lock().unwrap_or_else(|p| p.into_inner()).clone(),
        }
    }

    async fn forward_loop(self: Arc<Self>, spool: Arc<MachineSpool>) {
        let interval = Duration::from_secs_f64(self.config.reconnect_interval_secs.max(0.01));
        let Some(mut bulk_rx) = spool.take_bulk_rx() else { return };
        loop {
            if self.shutdown.is_cancelled() {
                return;
            }
            let once = tokio::select! {
                r = self.forward_once(&spool, &mut bulk_rx) => r,
                // Protection disabled: the spool is being deleted.
                _ = spool.closed.cancelled() => return,
            };
            match once {
                Ok(()) => return,
                Err(e) => {
                    // Bulk chunks in flight on the lost link may be gone: the agent resends them.
                    // (Only when the link was up: queued chunks wait for the next connection.)
                    if spool.downstream_connected() {
                        while bulk_rx.try_recv().is_ok() {}
                        spool.relay_upstream(Message::BulkReset);
                    }
                    spool.set_downstream(false, Some(e.clone()));
                    tracing::warn!(machine = %spool.name(), error = %e, "master target link down; retrying");
                }
            }
            tokio::select! {
                _ = self.shutdown.cancelled() => return,
                _ = tokio::time::sleep(interval) => {}
            }
        }
    }

    /// One connection to the master target: hello, then stream the spool in order.
    async fn forward_once(
        &self,
        spool: &Arc<MachineSpool>,
        bulk_rx: &mut tokio::sync::mpsc::Receiver<(u64, Message)>,
    ) -> Result<(), String> {
        let Some(hello) = spool.descriptor() else {
            // No agent has described this machine yet; nothing to forward.
            spool.wait_data().await;
            return Err("waiting for the agent's first hello".into());
        };
        let route = self.route_for(spool.name());
        let addr = &route.address;
        let limit = Duration::from_secs(10);
        let tcp = tokio::time::timeout(limit, tokio::net::TcpStream::connect(addr))
            .await
            .map_err(|_| format!("cannot connect to master target {addr}: no answer within {limit:?}"))?
            .map_err(|e| format!("cannot connect to master target {addr}: {e}"))?;
        let _ = tcp.set_nodelay(true);
        let name = ferry_tls::server_name(&route.name).map_err(|e| e.to_string())?;
        let tls = tokio::time::timeout(limit, self.connector.connect(name, tcp))
            .await
            .map_err(|_| format!("TLS with master target {addr} did not complete within {limit:?}"))?
            .map_err(|e| format!("TLS with master target {addr} failed: {e}"))?;
        self.revoked
            .check_server(tls.get_ref().1, ferry_tls::CertRole::MasterTarget)
            .map_err(|e| format!("master target {addr} refused: {e}"))?;
        let mut framed = Framed::new(tls, FrameCodec::compressed());
        framed
            .send(Message::Hello(Hello {
                role: Role::ProcessServer,
                machine: hello.machine.clone(),
                generation: hello.generation,
                lineage: hello.lineage.clone(),
            }))
            .await
            .map_err(|e| e.to_string())?;
        let ack = match framed.next().await {
            Some(Ok(Message::HelloAck(a))) => a,
            Some(Ok(Message::Error { code, message, remedy })) => {
                return Err(format!("master target refused (code {code}): {message}; {remedy}"))
            }
            Some(Ok(_)) => return Err("master target answered with an unexpected message".into()),
            Some(Err(e)) => return Err(e.to_string()),
            None => return Err("master target closed the connection".into()),
        };
        let released = spool.released_seq();
        if ack.durable_seq < released {
            let detail = format!(
                "master target {} holds machine {} only up to seq {}, but this process server already released up to {released} after the master target acknowledged it: the master target lost state (journal or retention volume)",
                route.address,
                spool.name(),
                ack.durable_seq
            );
            tracing::error!("{detail}");
            spool.mark_downstream_lost(&detail).map_err(|e| e.to_string())?;
        }
        spool
            .downstream_acked(ack.durable_seq.get(), ack.durable_seq.get(), ack.applied_seq.get())
            .map_err(|e| e.to_string())?;
        spool.set_downstream(true, None);
        let mut cursor = ferry_journal::Cursor::after(ack.durable_seq.get());
        let (mut sink, mut stream) = framed.split();
        let batch_bytes = self.config.forward_batch_bytes;
        // A bulk chunk waits until the records the spool held when it arrived are sent: it must
        // not overtake its ResyncBegin (the master target takes bulk only inside an initial
        // sync); records spooled after it do not hold it back, so a busy workload cannot starve
        // an initial sync.
        let mut pending_bulk: Option<(Message, u64)> = None;
        loop {
            let behind = pending_bulk.as_ref().is_none_or(|(_, upto)| cursor.after_seq < *upto);
            let batch =
                if behind { spool.read(&mut cursor, batch_bytes).map_err(|e| e.to_string())? } else { Vec::new() };
            if !batch.is_empty() {
                let bytes: u64 = batch.iter().map(|r| r.body.data_len()).sum();
                let last = batch.last().map(|r| r.seq.get()).unwrap_or(0);
                // Keep reading acks while a large frame is being written.
                let send = sink.send(Message::Records(batch));
                tokio::pin!(send);
                loop {
                    tokio::select! {
                        r = &mut send => { r.map_err(|e| format!("send to master target failed: {e}"))?; break; }
                        m = stream.next() => self.handle_downstream(spool, m)?,
                    }
                }
                spool.forwarded(last, bytes);
                continue;
            }
            if let Some((b, _)) = pending_bulk.take() {
                let bytes = if let Message::Bulk(c) = &b { c.len } else { 0 };
                let send = sink.send(b);
                tokio::pin!(send);
                loop {
                    tokio::select! {
                        r = &mut send => { r.map_err(|e| format!("send to master target failed: {e}"))?; break; }
                        m = stream.next() => self.handle_downstream(spool, m)?,
                    }
                }
                spool.forwarded(0, bytes);
                continue;
            }
            tokio::select! {
                _ = self.shutdown.cancelled() => return Ok(()),
                _ = spool.wait_data() => {}
                m = stream.next() => self.handle_downstream(spool, m)?,
                b = bulk_rx.recv() => {
                    let Some((epoch, b)) = b else { return Ok(()) };
                    if !spool.is_current_agent(epoch) {
                        continue; // from a superseded agent connection: it was resent
                    }
                    pending_bulk = Some((b, spool.positions().0));
                }
            }
        }
    }

    fn handle_downstream(
        &self,
        spool: &Arc<MachineSpool>,
        m: Option<Result<Message, ferry_protocol::ProtocolError>>,
    ) -> Result<(), String> {
        match m {
            None => Err("master target closed the connection".into()),
            Some(Err(e)) => Err(format!("bad frame from master target: {e}")),
            Some(Ok(Message::Ack(a))) => spool
                .downstream_acked(a.durable_seq.get(), a.target_durable_seq.get(), a.applied_seq.get())
                .map_err(|e| e.to_string()),
            Some(Ok(m @ (Message::Event(_) | Message::BulkAck { .. }))) => {
                spool.relay_upstream(m);
                Ok(())
            }
            Some(Ok(Message::Error { code, message, remedy })) => {
                Err(format!("master target error {code}: {message}; {remedy}"))
            }
            Some(Ok(_)) => Err("unexpected message from master target".into()),
        }
    }
}

fn fs_available(path: &std::path::Path) -> u64 {
    ferry_sys::fs::space(path).map(|s| s.available).unwrap_or(0)
}

/// Run the process server on pre-bound listeners until `shutdown` is cancelled.
pub async fn serve(
    config: ProcessServerConfig,
    listener: TcpListener,
    status_listener: Option<TcpListener>,
    shutdown: CancellationToken,
) -> Result<(), ProcessServerError> {
    let acceptor = ferry_tls::acceptor(&config.tls)?;
    let ps = ProcessServer::new(config, shutdown.clone())?;
    let ps2 = ps.clone();
    let routes = ferry_status::router_from(ROUTES, &ferry_status::Access::default(), |r| match r.id {
        ProcessServerEndpoint::Status => {
            let ps2 = ps2.clone();
            ferry_status::status_route(move || ComponentStatus::ProcessServer(ps2.status()))
        }
    });
    ferry_status::spawn(status_listener, routes, shutdown.clone());
    if let Some(link) = ps.config.config_server.clone() {
        let ps2 = ps.clone();
        ferry_status::spawn_heartbeats(
            link.clone(),
            ComponentKind::ProcessServer,
            "process-server".into(),
            move || ComponentStatus::ProcessServer(ps2.status()),
            shutdown.clone(),
        );
        let ps2 = ps.clone();
        let watch = ferry_status::spawn_settings_watch(
            link,
            ComponentKind::ProcessServer,
            "process-server".into(),
            move |v| ps2.apply_settings(&v),
            shutdown.clone(),
        );
        let _ = ps.server_link.set(watch);
    }
    let ps2 = ps.clone();
    let revoked = ps.revoked.clone();
    ferry_tls::serve_tls(listener, acceptor, revoked, shutdown, "agent", move |tls, peer| {
        handle_agent(ps2.clone(), tls, peer)
    })
    .await;
    Ok(())
}

async fn handle_agent<S>(
    ps: Arc<ProcessServer>,
    stream: S,
    peer: Result<ferry_tls::Identity, ferry_tls::PeerError>,
) -> Result<(), String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut framed = Framed::new(stream, FrameCodec::default());
    let peer = match peer {
        Ok(p) => p,
        Err(e) => return Err(ferry_protocol::refuse(&mut framed, e.code().code, e.to_string(), e.code().remedy).await),
    };
    let Some(hello) = ferry_protocol::read_hello(&mut framed, Role::Agent).await? else { return Ok(()) };
    let machine = match hello.machine.checked_names() {
        Ok((machine, _)) => machine,
        Err(m) => {
            return Err(ferry_protocol::refuse(&mut framed, codes::BAD_NAME.code, m, "rename the machine or disk").await)
        }
    };
    if let Err(m) = ps.check_agent(&peer, &machine) {
        let remedy = codes::WRONG_IDENTITY.remedy;
        return Err(ferry_protocol::refuse(&mut framed, codes::WRONG_IDENTITY.code, m, remedy).await);
    }
    // Linked to a configuration server, the process server spools only machines the server
    // routed to it (the protect job routes before it configures the agent): a certificate holder
    // cannot make it open spools and forwarding tasks for names it invents.
    if let Some(order) = ps.removal_ordered(machine.as_str()) {
        let message = format!(
            "protection of {machine} was disabled (job {order}): its spool is deleted and nothing of it is taken; protect it again"
        );
        return Err(ferry_protocol::refuse(
            &mut framed,
            codes::NOT_PROTECTED.code,
            message,
            codes::NOT_PROTECTED.remedy,
        )
        .await);
    }
    if ps.config.config_server.is_some() && !ps.knows(&machine) {
        let message = format!("machine {machine} is not protected through this process server");
        return Err(ferry_protocol::refuse(
            &mut framed,
            codes::NOT_PROTECTED.code,
            message,
            codes::NOT_PROTECTED.remedy,
        )
        .await);
    }
    let spool = match ps.spool_for(Some(&hello), &machine) {
        Ok(s) => s,
        Err(e) => {
            let remedy = "check the process server's cache folder";
            return Err(ferry_protocol::refuse(&mut framed, codes::STORAGE.code, e.to_string(), remedy).await);
        }
    };
    tracing::info!(%machine, "agent connected");
    let mut upstream = spool.subscribe_upstream();
    let epoch = spool.new_agent_epoch();
    let (durable, applied) = spool.positions();
    framed
        .send(Message::HelloAck(HelloAck {
            durable_seq: ferry_protocol::Seq(durable),
            applied_seq: ferry_protocol::Seq(applied),
        }))
        .await
        .map_err(|e| e.to_string())?;
    if let Some(detail) = spool.downstream_lost() {
        framed.send(Message::PeerStateLost { detail }).await.map_err(|e| e.to_string())?;
        spool.clear_downstream_lost();
    }
    // The hello's answer carries no master-target confirmation: say it now, so an idle
    // machine's agent can retire what the master target already holds.
    framed.send(Message::Ack(spool.current_ack())).await.map_err(|e| e.to_string())?;
    // Reset on drop: a connection cut mid-loop (revoked certificate, shutdown) never returns here.
    struct Connected<'a>(&'a Arc<MachineSpool>, u64);
    impl Drop for Connected<'_> {
        fn drop(&mut self) {
            if self.0.is_current_agent(self.1) {
                self.0.set_agent_connected(false);
            }
        }
    }
    spool.set_agent_connected(true);
    let _connected = Connected(&spool, epoch);
    let ended = tokio::select! {
        r = agent_loop(&ps, &spool, &mut framed, &mut upstream, epoch, &hello.machine) => Some(r),
        _ = spool.closed.cancelled() => None,
    };
    match ended {
        Some(r) => r,
        None => {
            let message = format!("protection of {machine} was disabled: its spool is deleted");
            Err(ferry_protocol::refuse(&mut framed, codes::NOT_PROTECTED.code, message, codes::NOT_PROTECTED.remedy)
                .await)
        }
    }
}

/// Relay an upstream message (acks, events, bulk acks) to the agent. If this connection fell
/// behind and messages were dropped, tell the agent to resend its in-flight bulk chunks and send
/// the current positions, so nothing waits forever for a lost acknowledgement.
async fn relay<S>(
    spool: &Arc<MachineSpool>,
    framed: &mut Framed<S, FrameCodec>,
    m: Result<Message, tokio::sync::broadcast::error::RecvError>,
) -> Result<(), String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    match m {
        Ok(m) => framed.send(m).await.map_err(|e| e.to_string()),
        Err(tokio::sync::broadcast::error::RecvError::Lagged(n)) => {
            tracing::warn!(machine = %spool.name(), dropped = n, "agent connection fell behind on acknowledgements; asking it to resend bulk chunks");
            framed.send(Message::BulkReset).await.map_err(|e| e.to_string())?;
            framed.send(Message::Ack(spool.current_ack())).await.map_err(|e| e.to_string())
        }
        Err(tokio::sync::broadcast::error::RecvError::Closed) => Err("spool closed".into()),
    }
}

async fn agent_loop<S>(
    ps: &Arc<ProcessServer>,
    spool: &Arc<MachineSpool>,
    framed: &mut Framed<S, FrameCodec>,
    upstream: &mut tokio::sync::broadcast::Receiver<Message>,
    epoch: u64,
    machine: &ferry_protocol::MachineDescriptor,
) -> Result<(), String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let threshold = ps.config.throttle_free_percent;
    let mut throttled = false;
    loop {
        let free = ps.free_percent();
        if free < threshold {
            if !throttled {
                throttled = true;
                spool.set_throttled(true);
                tracing::warn!(machine = %spool.name(), free_percent = free, "cache below threshold: throttling agent (NET-2)");
                framed.send(Message::Throttle { active: true, free_percent: free }).await.map_err(|e| e.to_string())?;
            }
            // Stop reading from the agent (TCP backpressure) but keep relaying acks and events.
            tokio::select! {
                _ = ps.shutdown.cancelled() => return Ok(()),
                _ = tokio::time::sleep(Duration::from_millis(100)) => {}
                m = upstream.recv() => relay(spool, framed, m).await?,
            }
            continue;
        }
        if throttled {
            throttled = false;
            spool.set_throttled(false);
            tracing::info!(machine = %spool.name(), free_percent = free, "cache space returned: resuming agent");
            framed.send(Message::Throttle { active: false, free_percent: free }).await.map_err(|e| e.to_string())?;
        }
        tokio::select! {
            _ = ps.shutdown.cancelled() => return Ok(()),
            m = upstream.recv() => relay(spool, framed, m).await?,
            m = framed.next() => {
                let mut batches = match m {
                    None => return Ok(()),
                    Some(Err(e)) => {
                        let msg = format!("bad frame from agent: {e}");
                        let _ = framed.send(Message::Error { code: codes::PROTOCOL.code, message: msg.clone(), remedy: "upgrade the agent or check the network path".into() }).await;
                        return Err(msg);
                    }
                    Some(Ok(Message::Bulk(c))) => {
                        let bytes = c.len;
                        spool.pass_bulk(epoch, Message::Bulk(c), bytes).await?;
                        continue;
                    }
                    Some(Ok(Message::Records(r))) => vec![r],
                    Some(Ok(_)) => return Err("unexpected message from agent".into()),
                };
                // Group whatever else already arrived under one fsync.
                let mut bulk = Vec::new();
                while batches.len() < 16 {
                    match framed.next().now_or_never() {
                        Some(Some(Ok(Message::Records(r)))) => batches.push(r),
                        Some(Some(Ok(Message::Bulk(c)))) => bulk.push(c),
                        Some(Some(Ok(_))) => return Err("unexpected message from agent".into()),
                        Some(Some(Err(e))) => return Err(format!("bad frame from agent: {e}")),
                        Some(None) | None => break,
                    }
                }
                // Nothing is acknowledged that the master target would refuse: one such record
                // spooled would block this machine's forwarding for good.
                if let Some(e) = batches.iter().flatten().find_map(|r| machine.check_record(r).err()) {
                    let remedy = "the agent sent a record outside the machine's disks: restart the agent; if it persists, re-protect the machine";
                    let _ = framed.send(Message::Error { code: codes::INVALID_RECORD.code, message: e.clone(), remedy: remedy.into() }).await;
                    return Err(e);
                }
                let s2 = spool.clone();
                let ack = tokio::task::spawn_blocking(move || s2.append(batches)).await.map_err(|e| e.to_string())?;
                for c in bulk {
                    let bytes = c.len;
                    spool.pass_bulk(epoch, Message::Bulk(c), bytes).await?;
                }
                match ack {
                    Ok(a) => framed.send(Message::Ack(a)).await.map_err(|e| e.to_string())?,
                    Err(e) => {
                        let _ = framed.send(Message::Error { code: codes::STORAGE.code, message: e.to_string(), remedy: "check the process server's cache volume".into() }).await;
                        return Err(e.to_string());
                    }
                }
            }
        }
    }
}
