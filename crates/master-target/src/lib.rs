//! The master target: receives a machine's ordered change stream from a process server, makes it
//! durable in a redo journal on the retention volume (acknowledging only after fsync), and applies
//! it to the target disks in the datastore.
//!
//! Architecture Invariant: a record is acknowledged only once it is fsync'd in the journal; the
//! journal is released only up to a checkpoint written after the target disks were fsync'd, so
//! replay after a crash starts at the checkpoint and is idempotent (plain positional writes).
//!
//! Architecture Invariant: records between a `ResyncBegin { preserve_consistent: true }` and its
//! `ResyncEnd` are not applied until the `ResyncEnd` is durable in the journal: the replica's last
//! consistent state is never overwritten in place by a resync that might not finish.

mod api;
mod base;
pub mod failover;
pub mod history;
pub mod journal_index;
pub mod overwritten;
pub mod point_image;
mod recovery;
mod removal;
mod replica;
pub mod retention;
mod test_failover;

use std::collections::HashMap;
use std::path::PathBuf;
use std::sync::{Arc, Mutex};

use ferry_api::control::{ComponentKind, ComponentStatus};
use ferry_protocol::{codes, Ack, FrameCodec, Hello, HelloAck, MachineName, Message, Role};
use ferry_tls::TlsFiles;
use futures::{FutureExt, SinkExt, StreamExt};
use serde::{Deserialize, Serialize};
use tokio::net::TcpListener;
use tokio_util::codec::Framed;
use tokio_util::sync::CancellationToken;

pub use history::Point;
pub use recovery::{ImageFormat, Materialization, MaterializeRequest, PointError};
pub use replica::{Replica, ReplicaStatus};

#[derive(Debug, thiserror::Error)]
pub enum MasterTargetError {
    #[error("journal error: {0}")]
    Journal(#[from] ferry_journal::JournalError),
    #[error("TLS setup failed: {0}")]
    Tls(#[from] ferry_tls::TlsError),
    #[error("i/o error on {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{0}")]
    Refused(String),
    #[error("bulk data for {machine} outside an initial sync was refused: the replica is consistent and takes changes only in the ordered log")]
    BulkOutsideInitialSync { machine: String },
    #[error("{0}")]
    InvalidRecord(String),
    #[error("machine {machine} is fenced at seq {at_seq} (it failed over): this master target takes nothing more from its old source")]
    Fenced { machine: String, at_seq: u64 },
    #[error(transparent)]
    Retention(#[from] retention::EligibilityError),
}

/// Map an I/O error on `path` to [`MasterTargetError::Io`].
pub(crate) fn io_at(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> MasterTargetError + '_ {
    move |source| MasterTargetError::Io { path: path.to_owned(), source }
}

/// Configuration of `ferry master-target` (TOML; every field can be overridden by a flag).
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct MasterTargetConfig {
    /// Where target disks live: `<datastore>/<machine>/<disk>.img`.
    pub datastore: PathBuf,
    /// Retention volume: the redo journal and checkpoints, `<retention>/<machine>/`. It must be
    /// used for nothing else (MT-5); default `/mnt/retention` when that folder exists.
    #[serde(default)]
    pub retention: Option<PathBuf>,
    /// This master target's name: recorded on its retention volume and datastore so another
    /// master target cannot take them.
    #[serde(default = "default_name")]
    pub name: String,
    /// Folders of other Ferry components on this host (process-server caches, install folders):
    /// the retention volume may not equal, contain or lie inside them.
    #[serde(default)]
    pub reserved_folders: Vec<PathBuf>,
    /// Address for process servers (TLS).
    pub listen: String,
    /// Status endpoint (plain HTTP; keep it on loopback).
    #[serde(default)]
    pub status_listen: Option<String>,
    /// The control token's file (default `<retention>/.control-token`): created owner-only at
    /// first start; the point API's changing routes need it (`ferry master-target …` reads it).
    #[serde(default)]
    pub control_token_file: Option<PathBuf>,
    pub tls: TlsFiles,
    /// Journal segment size in bytes.
    #[serde(default = "default_segment_bytes")]
    pub segment_bytes: u64,
    /// How often applied changes are checkpointed (target disks fsync'd, journal released), seconds.
    #[serde(default = "default_checkpoint_secs", deserialize_with = "ferry_types::bounds::secs")]
    pub checkpoint_interval_secs: f64,
    /// How long recovery points are kept, seconds (default 24 h). 0 turns history off: the
    /// journal is then released as soon as it is applied and only the replica itself remains.
    #[serde(default = "default_window", deserialize_with = "ferry_types::bounds::secs")]
    pub retention_window_secs: f64,
    /// Per-machine retention windows (the machine's replication policy), seconds.
    #[serde(default)]
    pub machine_retention_secs: HashMap<String, f64>,
    /// Per-machine datastore folders chosen when protection was enabled (default: `datastore`).
    /// Only used when a machine's replica is created; its folder is then recorded with it.
    #[serde(default)]
    pub machine_datastores: HashMap<String, PathBuf>,
    /// Per-machine identity of the only process server that may stream it here
    /// (`process-server/NAME@site`; set by protection). Absent: any process-server certificate,
    /// except on a master target linked to a configuration server (`[config_server]`) whose own
    /// file does not name the machine in `machine_datastores`: refused (9014).
    #[serde(default)]
    pub machine_process_servers: HashMap<String, String>,
    /// The address process servers should use (a proxy or NAT address; default: `listen`).
    #[serde(default)]
    pub advertise: Option<String>,
    /// When the retention volume has less free space than this share (percent), the oldest points
    /// are pruned early, inside the window, with an event.
    #[serde(default = "default_min_free", deserialize_with = "ferry_types::bounds::percent")]
    pub retention_min_free_percent: f64,
    /// The folder below which a materialization may name its own image folder (`dir`); unset:
    /// images go to the default folder under the datastore only. The admin's choice: `qemu-img`
    /// follows links, so a folder another local user may write must never be an image folder.
    #[serde(default)]
    pub image_root: Option<PathBuf>,
    /// Refused when set: materialized points (test failover) are served only on the owner-only
    /// unix socket `<retention>/nbd.sock`. A plain TCP export, loopback included, would let every
    /// local user read any machine's point and write a test-failover disk. The key stays so that
    /// a configuration naming it is refused with that reason, not as an unknown key.
    #[serde(default)]
    pub nbd_listen: Option<String>,
    /// Heartbeats to a configuration server (from `ferry register`); standalone without it.
    #[serde(default)]
    pub config_server: Option<ferry_status::ConfigServerLink>,
}

impl MasterTargetConfig {
    /// The retention folder in use (resolved to its canonical path once the volume was checked).
    pub fn retention_dir(&self) -> PathBuf {
        self.retention.clone().unwrap_or_else(|| PathBuf::from(retention::DEFAULT_RETENTION))
    }

    /// The datastore a new replica of `machine` goes to.
    pub fn datastore_for(&self, machine: &str) -> PathBuf {
        self.machine_datastores.get(machine).cloned().unwrap_or_else(|| self.datastore.clone())
    }

    /// Where the control token is kept.
    pub fn control_token_path(&self) -> PathBuf {
        self.control_token_file.clone().unwrap_or_else(|| self.retention_dir().join(".control-token"))
    }

    /// The unix socket serving materialized points.
    pub fn nbd_socket(&self) -> PathBuf {
        self.retention_dir().join("nbd.sock")
    }
}

fn default_window() -> f64 {
    86_400.0
}
fn default_min_free() -> f64 {
    5.0
}

fn default_name() -> String {
    "master-target".into()
}
fn default_segment_bytes() -> u64 {
    64 << 20
}
fn default_checkpoint_secs() -> f64 {
    1.0
}

/// Where a linked master target keeps the revoked certificate serials (on its retention volume).
pub const REVOKED_FILE: &str = "revoked-certificates.json";

/// Where a linked master target keeps the per-machine settings the configuration server
/// assigned (datastores, process servers, windows): after a restart with the server unreachable
/// it still creates the replicas it was given and takes each machine only from its process server.
pub const ASSIGNED_FILE: &str = "assigned-settings.json";

/// The per-machine settings a running master target takes from the configuration server.
pub use ferry_api::master_target::MasterTargetSettings as LiveSettings;

pub struct MasterTarget {
    config: MasterTargetConfig,
    /// The eligible, locked retention volume (canonical path).
    retention: PathBuf,
    _volume: retention::RetentionVolume,
    replicas: Mutex<HashMap<MachineName, Arc<Replica>>>,
    /// Per-machine settings taken from the configuration server while running.
    live: std::sync::RwLock<LiveSettings>,
    /// Materialized points served over NBD.
    pub exports: ferry_nbd::Exports,
    /// Certificates the configuration server revoked (kept on the retention volume).
    revoked: Arc<ferry_tls::Revoked>,
    /// The link to the configuration server, for the status (set once its watch runs).
    server_link: std::sync::OnceLock<ferry_status::SettingsLink>,
    /// The configuration server's latest failover orders (followed again when one finishes).
    failover_orders: Mutex<std::collections::BTreeMap<String, ferry_api::master_target::FailoverOrder>>,
    /// The configuration server's latest test-failover orders, and whether a thread follows them.
    test_failover_orders:
        Mutex<Option<std::collections::BTreeMap<String, ferry_api::master_target::TestFailoverOrder>>>,
    test_orders_busy: std::sync::atomic::AtomicBool,
    /// What was done with removal orders (disabled protections), per machine.
    removed: Mutex<std::collections::BTreeMap<String, ferry_api::control::RemovedMachine>>,
    /// The removal orders of the latest settings, and the thread that carries them out.
    removal_orders: Mutex<std::collections::BTreeMap<String, ferry_api::control::RemovalOrder>>,
    removals_busy: std::sync::atomic::AtomicBool,
    removals_again: std::sync::atomic::AtomicBool,
    shutdown: CancellationToken,
}

impl MasterTarget {
    pub fn new(mut config: MasterTargetConfig, shutdown: CancellationToken) -> Result<Arc<Self>, MasterTargetError> {
        ferry_types::bounds::check_range("segment_bytes", config.segment_bytes, 64 << 10, 1 << 30)
            .map_err(MasterTargetError::Refused)?;
        let ds = &config.datastore;
        std::fs::create_dir_all(ds).map_err(|source| MasterTargetError::Io { path: ds.clone(), source })?;
        let mut others = vec![("datastore (target disks) of this master target".to_owned(), config.datastore.clone())];
        if let Some(install) = std::env::current_exe().ok().and_then(|p| p.parent().map(|p| p.to_owned())) {
            others.push(("install folder".to_owned(), install));
        }
        for f in &config.reserved_folders {
            others.push(("reserved folder".to_owned(), f.clone()));
        }
        let volume = retention::open_retention_volume(config.retention.as_deref(), &config.name, &others)?;
        retention::claim(&config.datastore, "datastore", &config.name)?;
        config.retention = Some(volume.path.clone());
        // The status names this file to the CLI, which may run from another folder.
        if let Some(f) = config.control_token_file.take() {
            config.control_token_file = Some(std::path::absolute(&f).unwrap_or(f));
        }
        let revoked = match config.config_server {
            Some(_) => ferry_tls::Revoked::load(&volume.path.join(REVOKED_FILE)).map_err(MasterTargetError::Refused)?,
            None => ferry_tls::Revoked::none(),
        };
        // What the server assigned before a restart; the file and the server's answer at start
        // (already in `config`) win over it.
        let mut live = LiveSettings {
            machine_retention_secs: config.machine_retention_secs.clone().into_iter().collect(),
            machine_datastores: config.machine_datastores.clone().into_iter().collect(),
            machine_process_servers: config.machine_process_servers.clone().into_iter().collect(),
            machine_adoptions: Default::default(),
        };
        if config.config_server.is_some() {
            let saved = std::fs::read(volume.path.join(ASSIGNED_FILE))
                .ok()
                .and_then(|d| serde_json::from_slice::<LiveSettings>(&d).ok())
                .unwrap_or_default();
            for (k, v) in saved.machine_retention_secs {
                live.machine_retention_secs.entry(k).or_insert(v);
            }
            for (k, v) in saved.machine_datastores {
                live.machine_datastores.entry(k).or_insert(v);
            }
            for (k, v) in saved.machine_process_servers {
                live.machine_process_servers.entry(k).or_insert(v);
            }
            live.machine_adoptions = saved.machine_adoptions;
        }
        let mt = Arc::new(MasterTarget {
            revoked: Arc::new(revoked),
            server_link: std::sync::OnceLock::new(),
            failover_orders: Mutex::new(Default::default()),
            test_failover_orders: Mutex::new(None),
            test_orders_busy: std::sync::atomic::AtomicBool::new(false),
            removed: Mutex::new(Self::load_removed(&volume.path)),
            removal_orders: Mutex::new(Default::default()),
            removals_busy: std::sync::atomic::AtomicBool::new(false),
            removals_again: std::sync::atomic::AtomicBool::new(false),
            retention: volume.path.clone(),
            _volume: volume,
            live: std::sync::RwLock::new(live),
            config,
            replicas: Mutex::new(HashMap::new()),
            exports: ferry_nbd::Exports::new(),
            shutdown,
        });
        // Reopen every machine found on the retention volume so its journal is replayed at once,
        // without waiting for the process server to reconnect.
        if let Ok(entries) = std::fs::read_dir(&mt.retention) {
            for e in entries.flatten() {
                let Ok(name) = MachineName::new(e.file_name().to_string_lossy()) else { continue };
                if e.path().join("machine.json").exists() {
                    match Replica::reopen(&mt.config, &name, mt.exports.clone(), mt.shutdown.clone()) {
                        Ok(r) => {
                            mt.lock_replicas().insert(name, r);
                        }
                        Err(e) => tracing::error!(machine = %name, error = %e, "cannot reopen replica"),
                    }
                }
            }
        }
        Ok(mt)
    }

    fn lock_replicas(&self) -> std::sync::MutexGuard<'_, HashMap<MachineName, Arc<Replica>>> {
        self.replicas.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// Whether `peer` may stream `machine` here: a process-server certificate, and when the
    /// configuration server routed the machine, exactly the process server it routed it through.
    fn check_process_server(
        &self,
        peer: &ferry_tls::Identity,
        machine: &MachineName,
    ) -> Result<(), (u32, String, String)> {
        let wrong = |m: String| (codes::WRONG_IDENTITY.code, m, codes::WRONG_IDENTITY.remedy.to_owned());
        if peer.role != ferry_tls::CertRole::ProcessServer {
            return Err(wrong(format!("certificate {peer} is not a process server's")));
        }
        let live = self.live.read().unwrap_or_else(|p| p.into_inner());
        match live.machine_process_servers.get(machine.as_str()) {
            Some(expected) if *expected != peer.to_string() => Err(wrong(format!(
                "machine {machine} does not stream through {peer} to master target {}",
                self.config.name
            ))),
            Some(_) => Ok(()),
            // Linked to a configuration server, only the process server its protection routed
            // the machine through may stream it (also for a replica made before the link: any
            // other process server, of either site, would overwrite it) — unless this master
            // target's own configuration file names the machine (its local operator's choice).
            None if self.config.config_server.is_some()
                && !self.config.machine_datastores.contains_key(machine.as_str()) =>
            {
                Err((
                codes::NOT_PROTECTED.code,
                format!(
                    "machine {machine} has no process server assigned on master target {} (it was not protected through the configuration server)",
                    self.config.name
                ),
                codes::NOT_PROTECTED.remedy.to_owned(),
                ))
            }
            None => Ok(()),
        }
    }

    fn replica_for(&self, hello: &Hello, peer: &ferry_tls::Identity) -> Result<Arc<Replica>, (u32, String, String)> {
        let (machine, _) = hello
            .machine
            .checked_names()
            .map_err(|m| (codes::BAD_NAME.code, m, "rename the machine or disk".into()))?;
        self.check_process_server(peer, &machine)?;
        if let Some(order) = self.removal_ordered(machine.as_str()) {
            return Err((
                codes::NOT_PROTECTED.code,
                format!(
                    "protection of {machine} was disabled (job {order}): its replica is deleted and nothing of it is taken here; protect it again for a new one"
                ),
                codes::NOT_PROTECTED.remedy.to_owned(),
            ));
        }
        let mut map = self.lock_replicas();
        if let Some(r) = map.get(&machine) {
            if let Err(e) = r.refuse_if_fenced() {
                return Err((codes::FENCED.code, e.to_string(), codes::FENCED.remedy.to_owned()));
            }
            r.check_layout(&hello.machine)?;
            r.check_lineage(&hello.lineage)?;
            return Ok(r.clone());
        }
        // A master target linked to a configuration server replicates only what it protected
        // (the protect job assigns the machine's datastore first): a certificate holder cannot
        // make it create replicas, threads and sparse disks for any name it invents.
        let config = self.config_for_new();
        let adoption =
            self.live.read().unwrap_or_else(|p| p.into_inner()).machine_adoptions.get(machine.as_str()).cloned();
        if let Some(order) = adoption {
            // Only the copy the reprotect named, checked before any file is opened or locked.
            if hello.lineage.id == 0 || Some(hello.lineage.id) != order.lineage_id() {
                return Err((
                    codes::LINEAGE_MISMATCH.code,
                    format!(
                        "the reprotect of {machine} adopts the old primary's disks for the copy with lineage {}; this stream comes from {:016x}: nothing was opened",
                        order.lineage, hello.lineage.id
                    ),
                    "run the reprotect again: it names the copy that runs now".into(),
                ));
            }
            let r = Replica::create_adopting(
                &config,
                &machine,
                &hello.machine,
                &order,
                self.exports.clone(),
                self.shutdown.clone(),
            )
            .map_err(|e| {
                (codes::STORAGE.code, e.to_string(), "check the old primary's disks and the retention folder".into())
            })?;
            r.check_lineage(&hello.lineage)?;
            map.insert(machine, r.clone());
            return Ok(r);
        }
        if config.config_server.is_some() && !config.machine_datastores.contains_key(machine.as_str()) {
            return Err((
                codes::NOT_PROTECTED.code,
                format!("machine {machine} is not protected on master target {}", self.config.name),
                codes::NOT_PROTECTED.remedy.to_owned(),
            ));
        }
        let r = Replica::create(&config, &machine, &hello.machine, self.exports.clone(), self.shutdown.clone())
            .map_err(|e| (codes::STORAGE.code, e.to_string(), "check the datastore and retention folders".into()))?;
        r.check_lineage(&hello.lineage)?;
        map.insert(machine, r.clone());
        Ok(r)
    }

    /// The configuration with the live per-machine settings (for replicas created now).
    fn config_for_new(&self) -> MasterTargetConfig {
        let mut c = self.config.clone();
        let live = self.live.read().unwrap_or_else(|p| p.into_inner());
        c.machine_retention_secs.extend(live.machine_retention_secs.clone());
        c.machine_datastores.extend(live.machine_datastores.clone());
        c
    }

    /// Take new per-machine settings (from the configuration server). A machine's datastore
    /// applies when its replica is created; a new retention window applies at once.
    pub fn apply_settings(self: &Arc<Self>, v: &ferry_api::control::ComponentSettings) {
        *self.failover_orders.lock().unwrap_or_else(|p| p.into_inner()) =
            v.machine_failovers.clone().unwrap_or_default();
        self.follow_failover_orders();
        *self.test_failover_orders.lock().unwrap_or_else(|p| p.into_inner()) =
            Some(v.machine_test_failovers.clone().unwrap_or_default());
        self.follow_test_failover_orders();
        let mut s = LiveSettings {
            machine_retention_secs: v.machine_retention_secs.clone().unwrap_or_default(),
            machine_datastores: v.machine_datastores.clone().unwrap_or_default(),
            machine_process_servers: v.machine_process_servers.clone().unwrap_or_default(),
            machine_adoptions: v.machine_adoptions.clone().unwrap_or_default(),
        };
        if let Err(e) = self.revoked.extend(v.revoked_certificates.as_deref().unwrap_or_default()) {
            tracing::error!(error = %e, "cannot keep the revoked certificates");
        }
        {
            {
                let mut live = self.live.write().unwrap_or_else(|p| p.into_inner());
                // Keys the server does not send keep their values from the local file.
                for (k, w) in &self.config.machine_retention_secs {
                    s.machine_retention_secs.entry(k.clone()).or_insert(*w);
                }
                for (k, d) in &self.config.machine_datastores {
                    s.machine_datastores.entry(k.clone()).or_insert(d.clone());
                }
                for (k, p) in &self.config.machine_process_servers {
                    s.machine_process_servers.entry(k.clone()).or_insert(p.clone());
                }
                let path = self.retention.join(ASSIGNED_FILE);
                let saved = serde_json::to_vec_pretty(&s)
                    .map_err(std::io::Error::other)
                    .and_then(|d| ferry_sys::fs::write_atomic(&path, &d));
                if let Err(e) = saved {
                    tracing::error!(error = %e, file = %path.display(), "cannot keep the assigned settings");
                }
                *live = s;
                let windows = live.machine_retention_secs.clone();
                drop(live);
                for (m, r) in self.lock_replicas().iter() {
                    r.set_window(windows.get(m.as_str()).copied(), self.config.retention_window_secs);
                }
            }
        }
        self.set_removal_orders(v.machine_removals.as_ref());
    }

    pub fn status(&self) -> ferry_api::master_target::MasterTargetStatus {
        let replicas: Vec<_> = self.lock_replicas().values().cloned().collect();
        let mut machines: Vec<_> = replicas
            .iter()
            .map(|r| {
                let mut st = r.status();
                st.test_failover = self.test_failover_export(r);
                st
            })
            .collect();
        machines.sort_by(|a, b| a.machine.cmp(&b.machine));
        let live = self.live.read().unwrap_or_else(|p| p.into_inner()).clone();
        ferry_api::master_target::MasterTargetStatus {
            config_server_link: self.server_link.get().map(|l| l.snapshot(self.revoked.len())),
            name: self.config.name.clone(),
            listen: self.config.listen.clone(),
            advertise: self.config.advertise.clone().unwrap_or_else(|| self.config.listen.clone()),
            status_listen: self.config.status_listen.clone(),
            control_token_file: Some(self.config.control_token_path().display().to_string()),
            settings: live,
            machines,
            removed_machines: self.removed_machines(),
        }
    }

    pub fn replica(&self, machine: &str) -> Option<Arc<Replica>> {
        self.lock_replicas().get(machine).cloned()
    }

    pub fn config(&self) -> &MasterTargetConfig {
        &self.config
    }
}

/// Run the master target on pre-bound listeners until `shutdown` is cancelled.
pub async fn serve(
    config: MasterTargetConfig,
    listener: TcpListener,
    status_listener: Option<TcpListener>,
    shutdown: CancellationToken,
) -> Result<(), MasterTargetError> {
    let acceptor = ferry_tls::acceptor(&config.tls)?;
    if let Some(addr) = &config.nbd_listen {
        return Err(MasterTargetError::Refused(format!(
            "nbd_listen = {addr:?}: recovery-point exports are served only on the owner-only unix socket <retention>/nbd.sock (plain TCP, loopback included, would let every local user read any machine's points and write test-failover disks); remove nbd_listen and attach with nbd+unix:///EXPORT?socket=<retention>/nbd.sock"
        )));
    }
    let mt = MasterTarget::new(config, shutdown.clone())?;
    let token_file = mt.config.control_token_path();
    let control = ferry_status::control::load_or_create_control_token(&token_file)
        .map_err(|source| MasterTargetError::Io { path: token_file.clone(), source })?;
    let nbd_config = Arc::new(ferry_nbd::ServerConfig::new(mt.exports.clone(), None, false));
    let sock = mt.config.nbd_socket();
    let _ = std::fs::remove_file(&sock);
    let unix =
        tokio::net::UnixListener::bind(&sock).map_err(|source| MasterTargetError::Io { path: sock.clone(), source })?;
    // Owner-only (the umask made it so; say it): the exports are machines' disks.
    std::fs::set_permissions(&sock, std::os::unix::fs::PermissionsExt::from_mode(0o600))
        .map_err(|source| MasterTargetError::Io { path: sock.clone(), source })?;
    tokio::spawn(ferry_nbd::serve_unix(unix, nbd_config, shutdown.clone()));
    if let Some(addr) = status_listener.as_ref().and_then(|l| l.local_addr().ok()) {
        if !addr.ip().is_loopback() {
            tracing::warn!(%addr, "the status and recovery-point API listens on a non-loopback address over plain HTTP: the control token would cross the network in clear and anyone who reaches it reads the status; keep status_listen on 127.0.0.1");
        }
    }
    ferry_status::spawn(
        status_listener,
        api::router(mt.clone(), &ferry_status::Access::control(&control)),
        shutdown.clone(),
    );
    if let Some(link) = mt.config.config_server.clone() {
        let mt2 = mt.clone();
        ferry_status::spawn_heartbeats(
            link.clone(),
            ComponentKind::MasterTarget,
            mt.config.name.clone(),
            move || ComponentStatus::MasterTarget(mt2.status()),
            shutdown.clone(),
        );
        let mt2 = mt.clone();
        let watch = ferry_status::spawn_settings_watch(
            link,
            ComponentKind::MasterTarget,
            mt.config.name.clone(),
            move |v| mt2.apply_settings(&v),
            shutdown.clone(),
        );
        let _ = mt.server_link.set(watch);
    }
    let (mt2, sd) = (mt.clone(), shutdown.clone());
    ferry_tls::serve_tls(listener, acceptor, mt.revoked.clone(), shutdown, "process server", move |tls, peer| {
        handle_process_server(mt2.clone(), tls, peer, sd.clone())
    })
    .await;
    mt.lock_replicas().values().for_each(|r| r.stop());
    Ok(())
}

async fn handle_process_server<S>(
    mt: Arc<MasterTarget>,
    stream: S,
    peer: Result<ferry_tls::Identity, ferry_tls::PeerError>,
    shutdown: CancellationToken,
) -> Result<(), String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut framed = Framed::new(stream, FrameCodec::default());
    let peer = match peer {
        Ok(p) => p,
        Err(e) => return Err(ferry_protocol::refuse(&mut framed, e.code().code, e.to_string(), e.code().remedy).await),
    };
    let Some(hello) = ferry_protocol::read_hello(&mut framed, Role::ProcessServer).await? else { return Ok(()) };
    let replica = match mt.replica_for(&hello, &peer) {
        Ok(r) => r,
        Err((code, message, remedy)) => return Err(ferry_protocol::refuse(&mut framed, code, message, &remedy).await),
    };
    let machine = hello.machine.name.clone();
    tracing::info!(%machine, "process server connected");
    let (durable, applied) = replica.positions();
    framed
        .send(Message::HelloAck(HelloAck {
            durable_seq: ferry_protocol::Seq(durable),
            applied_seq: ferry_protocol::Seq(applied),
        }))
        .await
        .map_err(|e| e.to_string())?;
    let bulk_epoch = replica.new_bulk_epoch();
    let mut applied_rx = replica.applied_watch();
    let mut events = replica.subscribe_events();
    let mut last_sent_applied = applied;
    let mut next: Option<Message> = None;
    loop {
        let msg = match next.take() {
            Some(m) => m,
            None => tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                msg = framed.next() => match msg {
                    None => return Ok(()),
                    Some(Err(e)) => {
                        let _ = framed.send(Message::Error { code: codes::PROTOCOL.code, message: format!("bad frame: {e}"), remedy: "check the process server version and the network path".into() }).await;
                        return Err(format!("bad frame: {e}"));
                    }
                    Some(Ok(m)) => m,
                },
                r = applied_rx.changed() => {
                    if r.is_err() { return Ok(()); }
                    let applied = *applied_rx.borrow_and_update();
                    if applied != last_sent_applied {
                        last_sent_applied = applied;
                        let (durable, _) = replica.positions();
                        framed.send(Message::Ack(Ack { durable_seq: ferry_protocol::Seq(durable), target_durable_seq: ferry_protocol::Seq(durable), applied_seq: ferry_protocol::Seq(applied) })).await.map_err(|e| e.to_string())?;
                    }
                    continue;
                }
                ev = events.recv() => {
                    if let Ok(ev) = ev {
                        framed.send(Message::Event(ev)).await.map_err(|e| e.to_string())?;
                    }
                    continue;
                }
            },
        };
        let storage_error = |e: String| Message::Error {
            code: codes::STORAGE.code,
            message: e,
            remedy: "check the datastore and retention volume (space, permissions)".into(),
        };
        let refusal = |e: &MasterTargetError| match e {
            MasterTargetError::BulkOutsideInitialSync { .. } => Some(codes::BULK_OUTSIDE_INITIAL_SYNC),
            MasterTargetError::InvalidRecord(_) => Some(codes::INVALID_RECORD),
            MasterTargetError::Fenced { .. } => Some(codes::FENCED),
            _ => None,
        };
        let error_message = |e: &MasterTargetError| match refusal(e) {
            Some(c) => Message::Error { code: c.code, message: e.to_string(), remedy: c.remedy.into() },
            None => storage_error(e.to_string()),
        };
        match msg {
            Message::Records(records) => {
                let r2 = replica.clone();
                let durable = tokio::task::spawn_blocking(move || r2.journal_records(records))
                    .await
                    .map_err(|e| e.to_string())?;
                let durable = match durable {
                    Ok(d) => d,
                    Err(e) => {
                        let _ = framed.send(error_message(&e)).await;
                        return Err(e.to_string());
                    }
                };
                let applied = *applied_rx.borrow_and_update();
                last_sent_applied = applied;
                framed
                    .send(Message::Ack(Ack {
                        durable_seq: ferry_protocol::Seq(durable),
                        target_durable_seq: ferry_protocol::Seq(durable),
                        applied_seq: ferry_protocol::Seq(applied),
                    }))
                    .await
                    .map_err(|e| e.to_string())?;
            }
            Message::Bulk(chunk) => {
                // Group the bulk chunks that already arrived under one fdatasync.
                let mut chunks = vec![chunk];
                let mut bytes = chunks[0].len;
                while bytes < (64 << 20) {
                    match framed.next().now_or_never() {
                        Some(Some(Ok(Message::Bulk(c)))) => {
                            bytes = bytes.saturating_add(c.len);
                            chunks.push(c);
                        }
                        Some(Some(Ok(other))) => {
                            next = Some(other);
                            break;
                        }
                        Some(Some(Err(e))) => return Err(format!("bad frame: {e}")),
                        Some(None) | None => break,
                    }
                }
                let r2 = replica.clone();
                let ids = match tokio::task::spawn_blocking(move || r2.write_bulk(bulk_epoch, chunks))
                    .await
                    .map_err(|e| e.to_string())?
                {
                    Ok(ids) => ids,
                    Err(e) => {
                        let _ = framed.send(error_message(&e)).await;
                        return Err(e.to_string());
                    }
                };
                for id in ids {
                    framed.feed(Message::BulkAck { id }).await.map_err(|e| e.to_string())?;
                }
                SinkExt::<Message>::flush(&mut framed)
                    .await
                    .map_err(|e: ferry_protocol::ProtocolError| e.to_string())?;
            }
            other => return Err(format!("unexpected {} from process server", kind(&other))),
        }
    }
}

pub(crate) fn kind(m: &Message) -> &'static str {
    match m {
        Message::Hello(_) => "Hello",
        Message::HelloAck(_) => "HelloAck",
        Message::Records(_) => "Records",
        Message::Ack(_) => "Ack",
        Message::Throttle { .. } => "Throttle",
        Message::Event(_) => "Event",
        Message::Error { .. } => "Error",
        Message::Bulk(_) => "Bulk",
        Message::BulkAck { .. } => "BulkAck",
        Message::BulkReset => "BulkReset",
        Message::PeerStateLost { .. } => "PeerStateLost",
    }
}
