//! `ferry lab guest --dir DIR`: the guest of a powered-on lab machine, started by the local
//! provider's power-on (see `ferry_config_server::discovery`). Like a real machine with the
//! mobility service installed, it boots (a delay), registers its agent with the configuration
//! server (once; the passphrase and CA fingerprint come with the site, like an installer's), reports
//! in while unprotected, and runs the agent once protection gives it a process server and disks —
//! restarting it when those settings change. A configured workload (`ferry lab workload`) writes
//! through the agent's NBD exports; the agent's app-consistency hooks pause it.
//!
//! Power-off sends SIGTERM to the guest's process group: the agent drains and stops cleanly.
//! `ferry lab crash` sends SIGKILL to the group. Children also die with the guest
//! (PR_SET_PDEATHSIG), so a killed guest never leaves an agent behind.

use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::component::ComponentFile;
use anyhow::{Context, Result};
use ferry_api::control::{
    ComponentKind, ComponentSettings, ComponentStatus, Heartbeat, HeartbeatAck, MobilityServiceStatus,
};
use ferry_api::Method;
use ferry_status::server_client::ServerClient;
use serde::{Deserialize, Serialize};
use serde_json::Value;
use tokio::process::{Child, Command};
use tokio_util::sync::CancellationToken;

/// What a lab machine's guest is given (like a mobility-service installer: the server's address,
/// its CA fingerprint and the registration passphrase). It reaches the guest through the site's
/// `[power.extra.guest]`, copied by the provider into the machine's `machine.toml`.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct GuestSettings {
    pub config_server: String,
    /// The installation's other configuration servers (a standby), tried in order when
    /// `config_server` does not answer or is not authoritative.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub other_config_servers: Vec<String>,
    pub ca_fingerprint: String,
    /// File holding the registration passphrase.
    pub passphrase_file: PathBuf,
    /// Seconds from power-on until the mobility service starts and registers (RP-7: up to 15 min
    /// in the reference; seconds in a lab).
    #[serde(default = "default_boot_delay")]
    pub boot_delay_secs: f64,
    #[serde(default = "default_guest_heartbeat")]
    pub heartbeat_interval_secs: f64,
}

fn default_boot_delay() -> f64 {
    2.0
}
fn default_guest_heartbeat() -> f64 {
    2.0
}

/// A workload the guest runs once its disks are served (`ferry lab workload`); a machine's
/// `[extra.workload]` in site.toml.
#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WorkloadSpec {
    /// Records per second.
    #[serde(default = "default_rate")]
    pub rate: f64,
    #[serde(default = "default_seed")]
    pub seed: u64,
    /// Largest record, in 4 KiB blocks.
    #[serde(default = "default_max_blocks")]
    pub max_blocks: u32,
}

fn default_rate() -> f64 {
    20.0
}
fn default_seed() -> u64 {
    1
}
fn default_max_blocks() -> u32 {
    16
}

/// The lab's part of `machine.toml` (`[extra]`).
#[derive(Debug, Clone, Deserialize)]
struct GuestExtra {
    guest: GuestSettings,
    #[serde(default)]
    workload: Option<WorkloadSpec>,
    #[serde(default)]
    test_failover: Option<TestArea>,
}

/// A test failover's machine (`[extra.test_failover]`, written by the provider's
/// `create-test-machine`): it runs in the isolated test network, its disks the drill's
/// network-attached exports; no agent, and it never reaches the configuration server.
#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TestArea {
    pub network: String,
    pub disks: Vec<TestDisk>,
}

#[derive(Debug, Clone, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct TestDisk {
    pub name: String,
    /// `unix:SOCKET:EXPORT` or `HOST:PORT/EXPORT`.
    pub nbd: String,
}

/// A guest's view of its machine: `machine.toml` as the provider wrote it at power-on.
#[derive(Debug, Clone)]
pub struct GuestFile {
    pub machine: String,
    pub settings: GuestSettings,
    pub workload: Option<WorkloadSpec>,
    /// Disk files (absolute), in the machine's order.
    pub disks: Vec<(String, PathBuf)>,
    /// Set for a test failover's machine.
    pub test_area: Option<TestArea>,
}

impl GuestFile {
    fn load(dir: &Path) -> Result<GuestFile> {
        let p = dir.join("machine.toml");
        let text = std::fs::read_to_string(&p)
            .with_context(|| format!("cannot read {} (written by power-on)", p.display()))?;
        let m: ferry_config_server::discovery::MachineFile =
            toml::from_str(&text).with_context(|| format!("{} is invalid", p.display()))?;
        let extra: GuestExtra = toml::Value::Table(m.extra).try_into().with_context(|| {
            format!("{}: [extra] must hold [extra.guest] (and may hold [extra.workload])", p.display())
        })?;
        Ok(GuestFile {
            machine: m.machine,
            settings: extra.guest,
            workload: extra.workload,
            disks: m.disks,
            test_area: extra.test_failover,
        })
    }
}

/// Where the guest's agent serves, kept across reboots: its status port, and its NBD export's
/// owner-only unix socket (the guest's "hypervisor" attaches the disks through it).
#[derive(serde::Serialize, serde::Deserialize)]
pub struct Endpoints {
    /// The agent's NBD unix socket.
    pub nbd: String,
    pub status: String,
}

/// The agent's status listener, bound by the guest itself and handed to every agent it starts
/// (so a restarted agent serves the very same socket). The first boot binds port 0 and records
/// the port in `endpoints.json`; later boots bind the recorded port again, since the
/// configuration server knows the machine by it.
struct Listeners {
    status: std::net::TcpListener,
}

fn endpoints(dir: &Path) -> Result<(Endpoints, Listeners)> {
    let p = dir.join("endpoints.json");
    let recorded = std::fs::read(&p).ok().and_then(|d| serde_json::from_slice::<Endpoints>(&d).ok());
    let bind = |a: &str| std::net::TcpListener::bind(a).with_context(|| format!("cannot listen on {a} for the agent"));
    let listeners = match &recorded {
        Some(e) => Listeners { status: bind(&e.status)? },
        None => Listeners { status: bind("127.0.0.1:0")? },
    };
    let e = Endpoints {
        nbd: dir.join("nbd.sock").to_string_lossy().into_owned(),
        status: listeners.status.local_addr()?.to_string(),
    };
    if recorded.is_none() {
        ferry_sys::fs::atomic_replace(&p, &serde_json::to_vec_pretty(&e)?, 0o644)?;
    }
    Ok((e, listeners))
}

/// JSON settings → TOML (no nulls in TOML: they are dropped).
fn to_toml(v: &Value) -> Option<toml::Value> {
    match v {
        Value::Null => None,
        Value::Bool(b) => Some(toml::Value::Boolean(*b)),
        Value::Number(n) => n.as_i64().map(toml::Value::Integer).or_else(|| n.as_f64().map(toml::Value::Float)),
        Value::String(s) => Some(toml::Value::String(s.clone())),
        Value::Array(a) => Some(toml::Value::Array(a.iter().filter_map(to_toml).collect())),
        Value::Object(o) => {
            Some(toml::Value::Table(o.iter().filter_map(|(k, v)| to_toml(v).map(|v| (k.clone(), v))).collect()))
        }
    }
}

fn spawn(exe: &Path, args: &[String], log: &Path, listeners: &[(&str, &std::net::TcpListener)]) -> Result<Child> {
    let out = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(log)
        .with_context(|| format!("cannot open {}", log.display()))?;
    let err = out.try_clone()?;
    let mut cmd = Command::from(crate::launch::daemon_command(exe, args, listeners, None));
    cmd.stdout(out).stderr(err);
    // SAFETY: prctl in the child before exec; async-signal-safe.
    unsafe {
        cmd.pre_exec(|| {
            libc::prctl(libc::PR_SET_PDEATHSIG, libc::SIGKILL);
            Ok(())
        });
    }
    cmd.spawn().with_context(|| format!("cannot start {} {}", exe.display(), args.join(" ")))
}

/// Children's pids go to files beside the guest's, so `lab down` can check none is left.
fn record_pid(path: &Path, c: &Child) {
    if let Some(pid) = c.id() {
        let ticks = ferry_sys::proc::start_ticks(pid as i32).unwrap_or(0);
        let _ = std::fs::write(path, format!("{pid} {ticks}\n"));
    }
}

async fn stop(child: &mut Child, limit: Duration) {
    if let Some(pid) = child.id() {
        // SAFETY: a signal to our own child.
        unsafe { libc::kill(pid as i32, libc::SIGTERM) };
    }
    if tokio::time::timeout(limit, child.wait()).await.is_err() {
        let _ = child.kill().await;
    }
}

struct Guest {
    dir: PathBuf,
    file: GuestFile,
    exe: PathBuf,
    reg: PathBuf,
    ends: Endpoints,
    listeners: Listeners,
}

impl Guest {
    fn token(&self) -> Option<String> {
        std::fs::read_to_string(self.reg.join("config-server.token")).ok().map(|t| t.trim().to_owned())
    }

    /// A call to the configuration server with the machine's component token.
    async fn api<T: serde::de::DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&(impl serde::Serialize + ?Sized)>,
    ) -> Result<T> {
        let token = self.token().context("not registered")?;
        let mut last = None;
        for server in self.servers() {
            let client =
                ServerClient { server: server.clone(), token: Some(token.clone()), ca: Some(self.reg.join("ca.pem")) };
            match client.call(method, path, body).await {
                Ok(v) => return Ok(v),
                // Not the authoritative server (a standby, a stale one) or not answering: the next.
                Err(e)
                    if not_authoritative(&e)
                        || !matches!(e, ferry_status::server_client::ClientError::Refused { .. }) =>
                {
                    last = Some(e)
                }
                Err(e) => return Err(e.into()),
            }
        }
        Err(last.map(anyhow::Error::from).unwrap_or_else(|| anyhow::anyhow!("no configuration server is configured")))
    }

    /// The machine's settings from the authoritative server (one below the highest epoch the
    /// machine saw is skipped, as the agent's own watch does).
    async fn fetch_settings(&self) -> Result<ComponentSettings> {
        let mut link = crate::site::registered_link(
            self.file.settings.config_server.clone(),
            &self.reg,
            &self.file.machine,
            self.file.settings.heartbeat_interval_secs,
        );
        link.other_addresses.clone_from(&self.file.settings.other_config_servers);
        let (server, code, body) =
            link.fetch_settings(ferry_api::control::ComponentKind::Agent, &self.file.machine).await?;
        if code != 200 {
            let error = serde_json::from_slice(&body).unwrap_or_else(|_| ferry_api::ErrorBody {
                code: 0,
                name: String::new(),
                message: String::from_utf8_lossy(&body).into_owned(),
                remedy: String::new(),
            });
            return Err(ferry_status::server_client::ClientError::Refused { status: code, error })
                .with_context(|| format!("settings from {server}"));
        }
        serde_json::from_slice(&body).with_context(|| format!("settings from {server} are unreadable"))
    }

    /// Every configuration server of the installation, in the order they are tried.
    fn servers(&self) -> Vec<String> {
        let g = &self.file.settings;
        std::iter::once(g.config_server.clone()).chain(g.other_config_servers.iter().cloned()).collect()
    }

    async fn register(&self, shutdown: &CancellationToken) -> bool {
        if self.token().is_some() {
            return true;
        }
        let g = &self.file.settings;
        loop {
            let r = async {
                let pass = std::fs::read_to_string(&g.passphrase_file)
                    .with_context(|| format!("cannot read the passphrase file {}", g.passphrase_file.display()))?;
                // Whichever server of the installation registers it (RP-7 with the primary site lost).
                let mut last = anyhow::anyhow!("no configuration server is configured");
                for server in self.servers() {
                    let r = ferry_status::server_client::register_component(
                        &server,
                        &g.ca_fingerprint,
                        pass.trim(),
                        &ferry_status::server_client::Registrant {
                            kind: ferry_api::control::ComponentKind::Agent,
                            name: &self.file.machine,
                            hosts: &[],
                            site: None,
                        },
                        &self.reg,
                    )
                    .await;
                    match r {
                        Ok(v) => return Ok(v),
                        Err(e) => last = anyhow::Error::from(e).context(format!("at {server}")),
                    }
                }
                Err(last)
            }
            .await;
            match r {
                Ok(_) => {
                    tracing::info!(machine = %self.file.machine, "mobility service registered");
                    return true;
                }
                Err(e) => tracing::warn!(error = %format!("{e:#}"), "registration failed; retrying"),
            }
            tokio::select! {
                _ = shutdown.cancelled() => return false,
                _ = tokio::time::sleep(Duration::from_secs(2)) => {}
            }
        }
    }

    /// The agent's configuration: local keys, then the server's settings.
    fn write_agent_config(&self, settings: &ComponentSettings) -> Result<PathBuf> {
        let mut v = serde_json::to_value(settings)?;
        // Not configuration keys (the running agent follows them through its settings watch):
        // in the file they would make it refuse to start.
        if let Some(m) = v.as_object_mut() {
            for k in ferry_api::control::RUNTIME_KEYS {
                m.remove(k);
            }
        }
        let t = match to_toml(&v) {
            Some(toml::Value::Table(t)) => t,
            _ => toml::Table::new(),
        };
        let mut link = crate::site::registered_link(
            self.file.settings.config_server.clone(),
            &self.reg,
            &self.file.machine,
            self.file.settings.heartbeat_interval_secs,
        );
        link.other_addresses.clone_from(&self.file.settings.other_config_servers);
        let file = ComponentFile::new()
            .merge(t)
            .set("machine", self.file.machine.as_str())
            .path("state_dir", &self.dir.join("agent"))
            .path("nbd_socket", Path::new(&self.ends.nbd))
            .set("status_listen", self.ends.status.as_str())
            .tls(&crate::site::registered_tls(&self.reg, "agent"))?
            .config_server(&link)?;
        // App consistency: freeze pauses the workload (it flushes and writes the seq it paused
        // at, which is appended to app-consistent.log); a machine without one has nothing to quiesce.
        let (freeze, thaw) = if self.file.workload.is_some() {
            let p = self.dir.join("pause");
            let log = self.dir.join("app-consistent.log");
            (
                format!(
                    "P='{p}'; touch \"$P\"; i=0; while [ ! -f \"$P.paused\" ]; do i=$((i+1)); if [ $i -gt 600 ]; then rm -f \"$P\"; echo 'the workload did not pause within 30 s' >&2; exit 1; fi; sleep 0.05; done; {{ cat \"$P.paused\"; echo; }} >> '{log}'",
                    p = p.display(),
                    log = log.display()
                ),
                format!("rm -f '{}'", p.display()),
            )
        } else {
            ("true".to_owned(), "true".to_owned())
        };
        let path = self.dir.join("agent.toml");
        file.set("freeze_command", freeze).set("thaw_command", thaw).set("hook_timeout_secs", 60.0).write(&path)?;
        Ok(path)
    }

    /// The workload's command; a failed-over machine's (its agent has a failover seed) forks
    /// the record log at [`FORK_SEQ`].
    fn workload_args(&self, failed_over: bool) -> Option<Vec<String>> {
        let disks: Vec<String> =
            self.file.disks.iter().map(|(name, _)| format!("unix:{}:{name}", self.ends.nbd)).collect();
        self.workload_args_on(&disks, failed_over)
    }

    /// The workload's command on the NBD `disks`.
    fn workload_args_on(&self, disks: &[String], failed_over: bool) -> Option<Vec<String>> {
        let w = self.file.workload.as_ref()?;
        let mut args = vec!["lab".to_owned(), "workload".to_owned()];
        for d in disks {
            args.push("--disk".into());
            args.push(d.clone());
        }
        args.extend([
            "--record-log".into(),
            self.dir.join("records.log").to_string_lossy().into_owned(),
            "--seed".into(),
            w.seed.to_string(),
            "--rate".into(),
            w.rate.to_string(),
            "--max-blocks".into(),
            w.max_blocks.to_string(),
            "--pause-file".into(),
            self.dir.join("pause").to_string_lossy().into_owned(),
        ]);
        if failed_over {
            args.extend(["--first-seq".into(), FORK_SEQ.to_string()]);
        }
        Some(args)
    }
}

/// Where a failed-over machine's workload starts its record log: far above any seq the
/// primary reached, so `lab verify` of the primary's prefix followed by this log tells the two
/// apart (a block of the primary's lost tail is never in it).
pub const FORK_SEQ: u64 = 1_000_000_000;

impl Guest {
    /// A test failover's machine: no registration, no agent, no heartbeat (the test network
    /// does not reach the configuration server); the workload writes to the drill's exports,
    /// continuing the machine's record log as a fork (like a failed-over machine's), and is
    /// restarted should it stop.
    async fn run_test_machine(&self, area: &TestArea, shutdown: CancellationToken) -> Result<()> {
        tracing::info!(network = %area.network, disks = area.disks.len(), "test machine: running in the test network");
        let mut workload: Option<Child> = None;
        loop {
            if let Some(w) = &mut workload {
                if let Ok(Some(st)) = w.try_wait() {
                    tracing::warn!(status = %st, "the workload exited (see workload.log); restarting it");
                    workload = None;
                }
            }
            if workload.is_none() {
                let disks: Vec<String> = area.disks.iter().map(|d| d.nbd.clone()).collect();
                if let Some(args) = self.workload_args_on(&disks, true) {
                    match spawn(&self.exe, &args, &self.dir.join("workload.log"), &[]) {
                        Ok(c) => {
                            record_pid(&self.dir.join("workload.pid"), &c);
                            workload = Some(c);
                        }
                        Err(e) => tracing::error!(error = %format!("{e:#}"), "cannot start the workload"),
                    }
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => break,
                _ = tokio::time::sleep(Duration::from_secs(1)) => {}
            }
        }
        if let Some(mut w) = workload.take() {
            stop(&mut w, Duration::from_secs(5)).await;
        }
        Ok(())
    }
}

/// A standby's or stale server's refusal, or an unknown token: the request goes to the next
/// server.
fn not_authoritative(e: &ferry_status::server_client::ClientError) -> bool {
    use ferry_types::codes::{STALE_SERVER, STANDBY_SERVER};
    // 401: a server that does not know this machine's token (it registered with another one).
    matches!(e, ferry_status::server_client::ClientError::Refused { error, status }
        if error.code == STANDBY_SERVER.code || error.code == STALE_SERVER.code || *status == 401)
}

pub async fn run(dir: PathBuf, shutdown: CancellationToken) -> Result<()> {
    let file = GuestFile::load(&dir)?;
    let exe = std::env::current_exe().context("cannot find the ferry executable")?;
    let (ends, listeners) = endpoints(&dir)?;
    let g = Guest { reg: dir.join("mobility-service"), dir, file, exe, ends, listeners };
    tracing::info!(machine = %g.file.machine, delay = g.file.settings.boot_delay_secs, "booting");
    tokio::select! {
        _ = shutdown.cancelled() => return Ok(()),
        _ = tokio::time::sleep(Duration::from_secs_f64(g.file.settings.boot_delay_secs.max(0.0))) => {}
    }
    // A stale pause marker from a crash would freeze the new workload at once.
    let _ = std::fs::remove_file(g.dir.join("pause"));
    if let Some(area) = g.file.test_area.clone() {
        return g.run_test_machine(&area, shutdown).await;
    }
    if !g.register(&shutdown).await {
        return Ok(());
    }
    let mut agent: Option<(Child, ComponentSettings)> = None;
    let mut workload: Option<Child> = None;
    let mut last_heartbeat = std::time::Instant::now() - Duration::from_secs(3600);
    let hb_every = Duration::from_secs_f64(g.file.settings.heartbeat_interval_secs.max(0.2));
    // The last settings the server gave: a crashed agent restarts with them even while the
    // server is unreachable (a real mobility service keeps its configuration too).
    let mut known: Option<ComponentSettings> = None;
    loop {
        let fetch = g.fetch_settings();
        let answer = tokio::select! {
            r = fetch => r,
            _ = shutdown.cancelled() => break,
        };
        let fetched = match answer {
            Ok(v) => Some(v),
            Err(e)
                if e.downcast_ref::<ferry_status::server_client::ClientError>()
                    .is_some_and(|c| matches!(c, ferry_status::server_client::ClientError::Refused { .. })) =>
            {
                tracing::warn!(error = %format!("{e:#}"), "the configuration server refused the settings request");
                None
            }
            Err(e) => {
                tracing::debug!(error = %format!("{e:#}"), "configuration server unreachable; keeping the current state");
                None
            }
        };
        if let Some(mut s) = fetched {
            // The running agent follows these itself: a change must not restart it.
            s.quiesce = None;
            known = Some(s);
        }
        if let Some(s) = &known {
            // Disks to serve: a protected machine, or a failed-over one whose agent only tracks.
            let protected = s.disks.as_ref().is_some_and(|d| !d.is_empty());
            let changed = agent.as_ref().map(|(_, cur)| cur != s).unwrap_or(true);
            if protected && changed {
                if let Some((mut c, _)) = agent.take() {
                    tracing::info!("settings changed: restarting the agent");
                    if let Some(mut w) = workload.take() {
                        stop(&mut w, Duration::from_secs(5)).await;
                    }
                    stop(&mut c, Duration::from_secs(60)).await;
                }
                let started = g.write_agent_config(s).and_then(|path| {
                    let args = vec!["agent".to_owned(), "--config".to_owned(), path.to_string_lossy().into_owned()];
                    spawn(&g.exe, &args, &g.dir.join("agent.log"), &[("status_listen", &g.listeners.status)])
                });
                match started {
                    Ok(c) => {
                        tracing::info!(process_server = s.process_server.as_deref().unwrap_or(""), "agent started");
                        record_pid(&g.dir.join("agent.pid"), &c);
                        agent = Some((c, s.clone()));
                    }
                    Err(e) => tracing::error!(error = %format!("{e:#}"), "cannot start the agent"),
                }
            } else if !protected {
                if let Some((mut c, _)) = agent.take() {
                    tracing::info!("protection removed: stopping the agent");
                    stop(&mut c, Duration::from_secs(60)).await;
                }
            }
        }
        if let Some((c, _)) = &mut agent {
            if let Ok(Some(st)) = c.try_wait() {
                tracing::error!(status = %st, "the agent exited; restarting it (see agent.log)");
                agent = None;
                if let Some(mut w) = workload.take() {
                    stop(&mut w, Duration::from_secs(5)).await;
                }
            }
        }
        if agent.is_none() && last_heartbeat.elapsed() >= hb_every {
            // Unprotected: the mobility service still reports in (and says where it serves).
            let beat = Heartbeat {
                kind: ComponentKind::Agent,
                name: g.file.machine.clone(),
                status: Some(ComponentStatus::MobilityService(MobilityServiceStatus {
                    machine: g.file.machine.clone(),
                    status_listen: Some(g.ends.status.clone()),
                    nbd_listen: None,
                })),
                policy: None,
            };
            if let Err(e) = g.api::<HeartbeatAck>(Method::Post, "/api/v1/heartbeats", Some(&beat)).await {
                tracing::debug!(error = %format!("{e:#}"), "heartbeat failed");
            }
            last_heartbeat = std::time::Instant::now();
        }
        if let Some(w) = &mut workload {
            if let Ok(Some(st)) = w.try_wait() {
                tracing::warn!(status = %st, "the workload exited (see workload.log); restarting it");
                workload = None;
            }
        }
        if workload.is_none() && agent.is_some() && tokio::net::UnixStream::connect(&g.ends.nbd).await.is_ok() {
            let failed_over = known.as_ref().is_some_and(|s| s.other.contains_key("failover_seed"));
            if let Some(args) = g.workload_args(failed_over) {
                match spawn(&g.exe, &args, &g.dir.join("workload.log"), &[]) {
                    Ok(c) => {
                        record_pid(&g.dir.join("workload.pid"), &c);
                        workload = Some(c)
                    }
                    Err(e) => tracing::error!(error = %format!("{e:#}"), "cannot start the workload"),
                }
            }
        }
        tokio::select! {
            _ = shutdown.cancelled() => break,
            _ = tokio::time::sleep(Duration::from_secs(1)) => {}
        }
    }
    tracing::info!("shutting down");
    if let Some(mut w) = workload.take() {
        stop(&mut w, Duration::from_secs(5)).await;
    }
    if let Some((mut c, _)) = agent.take() {
        stop(&mut c, Duration::from_secs(60)).await;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn settings_become_toml_without_nulls() {
        let v = serde_json::json!({"process_server": "127.0.0.1:1", "disks": [{"name": "d", "path": "/x", "uuid": null}], "n": 3, "f": 1.5, "off": null});
        let t = match to_toml(&v) {
            Some(toml::Value::Table(t)) => t,
            other => panic!("{other:?}"),
        };
        assert!(!t.contains_key("off"));
        assert_eq!(t["n"].as_integer(), Some(3));
        assert_eq!(t["f"].as_float(), Some(1.5));
        let d = t["disks"].as_array().unwrap()[0].as_table().unwrap();
        assert!(d.contains_key("path") && !d.contains_key("uuid"));
    }
}
