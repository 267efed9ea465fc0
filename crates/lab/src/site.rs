//! `ferry lab up|status|down|crash|power|link`: a whole two-site Ferry on one machine.
//!
//! `lab up DIR` turns a lab description (the built-in `default-lab.toml`, or `--config FILE`)
//! into site folders the local provider discovers (`DIR/sites/<site>/site.toml`, datastores as
//! folders, disks as sparse files), starts a configuration server (SQLite), a lab link in front of
//! every master target and of the configuration server for every other site (so `lab link cut`
//! separates the sites), the master targets and a process server per site — all on loopback with
//! TLS, each logging to `DIR/logs/<name>.log` — registers them, adds the sites, creates the
//! replication groups, powers the machines on (their guests register after the boot delay) and
//! waits until everything reports. `DIR/lab.json` records pids, endpoints and tokens (mode 0600).
//! `lab down` stops guests cleanly, then every daemon, and checks by pid that none is left.
//!
//! Size: the lab description, site building and daemon supervision of `lab up`; the split into spec/sites/supervise is planned (docs/limitations.md).

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::guest::{GuestSettings, WorkloadSpec};
use crate::link::LinkStatus;
use anyhow::{bail, Context, Result};
use ferry_api::config_server::{
    Job, JobState, MachineView, NewToken, ReplicationGroup, Site, SiteAdded, SiteOperation, Started, TokenCreated,
};
use ferry_api::control::ComponentHealth;
use ferry_api::Method;
use ferry_config_server::discovery::{self, Credential, Host, Network, Nic};
use serde::{Deserialize, Serialize};

use crate::component::ComponentFile;
use ferry_status::server_client::ServerClient;
use ferry_status::ConfigServerLink;
use ferry_tls::TlsFiles;

pub const DEFAULT_LAB: &str = include_str!("../default-lab.toml");

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LabSpec {
    /// Seconds from power-on until a machine's mobility service registers (RP-7).
    #[serde(default = "one", deserialize_with = "ferry_types::bounds::secs")]
    pub boot_delay_secs: f64,
    /// Components' heartbeat interval.
    #[serde(default = "one", deserialize_with = "ferry_types::bounds::secs")]
    pub heartbeat_interval_secs: f64,
    /// The configuration server's missing-heartbeat threshold (806 / 78174 / 78022).
    #[serde(default = "ten", deserialize_with = "ferry_types::bounds::secs")]
    pub heartbeat_timeout_secs: f64,
    pub sites: Vec<LabSite>,
    #[serde(default)]
    pub groups: Vec<LabGroup>,
}

fn one() -> f64 {
    1.0
}
fn ten() -> f64 {
    10.0
}
fn yes() -> bool {
    true
}
fn on() -> String {
    "on".into()
}
fn rw() -> String {
    "read-write".into()
}
fn pvscsi() -> String {
    "pvscsi".into()
}
fn lsilogic() -> String {
    "lsilogic-sas".into()
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LabSite {
    pub name: String,
    /// The site that hosts the configuration server (exactly one).
    #[serde(default)]
    pub config_server: bool,
    /// This site hosts a standby configuration server (at most one site, not the one above): it
    /// copies the active server's data and is promoted with `ferry config-server promote`; every
    /// component lists it after its own site's server.
    #[serde(default)]
    pub standby_config_server: bool,
    #[serde(default)]
    pub hosts: Vec<Host>,
    #[serde(default)]
    pub datastores: Vec<LabDatastore>,
    #[serde(default)]
    pub networks: Vec<Network>,
    #[serde(default)]
    pub credentials: Vec<Credential>,
    #[serde(default)]
    pub machines: Vec<LabMachine>,
    #[serde(default)]
    pub master_targets: Vec<LabMasterTarget>,
    #[serde(default)]
    pub process_server: Option<LabProcessServer>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LabDatastore {
    pub name: String,
    /// `vmfs`, `vsan` or `nfs`.
    pub kind: String,
    #[serde(default)]
    pub hosts: Vec<String>,
    #[serde(default = "rw")]
    pub access: String,
    /// `false` leaves its folder out, so it is inaccessible (8061).
    #[serde(default = "yes")]
    pub accessible: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LabMachine {
    pub name: String,
    pub os_family: String,
    #[serde(default)]
    pub os: String,
    pub host: String,
    pub datastore: String,
    #[serde(default)]
    pub nics: Vec<Nic>,
    pub disks: Vec<LabDisk>,
    #[serde(default = "pvscsi")]
    pub controller: String,
    #[serde(default = "on")]
    pub power: String,
    #[serde(default)]
    pub workload: Option<WorkloadSpec>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LabDisk {
    pub name: String,
    pub size: u64,
    /// A fixed UUID (e.g. a template clone's, colliding with another disk's).
    #[serde(default)]
    pub uuid: Option<String>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LabMasterTarget {
    pub name: String,
    pub os_family: String,
    #[serde(default)]
    pub host: String,
    /// The master target's SCSI controller: LSI Logic by default (MT-9 refuses paravirtual).
    #[serde(default = "lsilogic")]
    pub controller: String,
    #[serde(default = "yes")]
    pub enable_uuid: bool,
    /// Disks already attached (the inventory's count; 60 is the most a master target takes).
    #[serde(default)]
    pub attached_disks: u32,
    /// Start a `ferry master-target` for it (false: inventory only).
    #[serde(default = "yes")]
    pub run: bool,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LabProcessServer {
    pub name: String,
    #[serde(default = "default_cache")]
    pub cache_capacity_bytes: u64,
}

fn default_cache() -> u64 {
    2 << 30
}

#[derive(Debug, Clone, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct LabGroup {
    pub name: String,
    pub machines: Vec<String>,
}

/// `DIR/lab.json`: what `lab up` started and where it listens.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LabState {
    pub dir: PathBuf,
    pub config_server: String,
    /// The standby configuration server's address, if the lab has one.
    #[serde(default)]
    pub standby_config_server: Option<String>,
    pub ca: PathBuf,
    pub ca_fingerprint: String,
    pub admin_token: String,
    pub operator_token: String,
    pub processes: Vec<LabProcess>,
    pub links: Vec<LabLink>,
    pub sites: Vec<(String, PathBuf)>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LabProcess {
    pub name: String,
    pub kind: String,
    pub site: Option<String>,
    pub pid: i32,
    pub log: PathBuf,
    /// The main address (API, replication, agents, or the link's near side).
    pub address: String,
    /// Status endpoint (plain HTTP, loopback), if any.
    pub status: Option<String>,
    /// Its start time (clock ticks since boot): a reused pid is never signalled.
    #[serde(default)]
    pub start_ticks: u64,
    /// Its command line (`ferry lab restart` starts it again the same way).
    #[serde(default)]
    pub args: Vec<String>,
    /// The listeners the lab bound and handed down: configuration key → (address, descriptor
    /// number in the child). A restart takes the same sockets back and hands them on.
    #[serde(default)]
    pub listeners: BTreeMap<String, (String, i32)>,
}

#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LabLink {
    pub name: String,
    pub listen: String,
    pub to: String,
    pub control: String,
}

impl LabState {
    pub fn load(dir: &Path) -> Result<LabState> {
        let p = dir.join("lab.json");
        let d = std::fs::read(&p).with_context(|| {
            format!("cannot read {} (is {} a lab made by `ferry lab up`?)", p.display(), dir.display())
        })?;
        serde_json::from_slice(&d).with_context(|| format!("{} is not a lab state file", p.display()))
    }

    fn save(&self) -> Result<()> {
        Ok(ferry_sys::fs::write_atomic(&self.dir.join("lab.json"), &serde_json::to_vec_pretty(self)?)?)
    }

    /// API access as the lab's operator.
    pub fn server(&self) -> ServerClient {
        ServerClient {
            server: self.config_server.clone(),
            token: Some(self.operator_token.clone()),
            ca: Some(self.ca.clone()),
        }
    }

    pub fn process(&self, name: &str) -> Option<&LabProcess> {
        self.processes.iter().find(|p| p.name == name)
    }

    /// The folder of the site holding `machine`, and the site's name.
    pub fn machine_site(&self, machine: &str) -> Result<(String, PathBuf)> {
        for (name, folder) in &self.sites {
            let text = std::fs::read_to_string(folder.join("site.toml")).unwrap_or_default();
            if let Ok(f) = toml::from_str::<discovery::SiteFile>(&text) {
                if f.machines.iter().any(|m| m.name == machine) {
                    return Ok((name.clone(), folder.clone()));
                }
            }
        }
        bail!("no site of the lab in {} has a machine {machine}", self.dir.display())
    }

    /// Every pid the guests recorded (guest, agent, workload), as ("machine/what", pid, start ticks).
    pub fn guest_pids(&self) -> Vec<(String, i32, u64)> {
        let mut out = Vec::new();
        for (_, folder) in &self.sites {
            let Ok(entries) = std::fs::read_dir(folder.join("guests")) else { continue };
            for e in entries.flatten() {
                // power.pid: the guest, as the provider started it.
                for what in ["power", "agent", "workload"] {
                    let text = std::fs::read_to_string(e.path().join(format!("{what}.pid"))).unwrap_or_default();
                    let mut it = text.split_whitespace();
                    if let Some(pid) = it.next().and_then(|p| p.parse().ok()) {
                        let ticks = it.next().and_then(|t| t.parse().ok()).unwrap_or(0);
                        out.push((format!("{}/{what}", e.file_name().to_string_lossy()), pid, ticks));
                    }
                }
            }
        }
        out
    }

    /// Where a machine's guest serves (from its `endpoints.json`).
    pub fn guest_endpoints(&self, machine: &str) -> Result<crate::guest::Endpoints> {
        let (_, folder) = self.machine_site(machine)?;
        let p = folder.join("guests").join(machine).join("endpoints.json");
        let d =
            std::fs::read(&p).with_context(|| format!("{machine} has not booted yet ({} is missing)", p.display()))?;
        Ok(serde_json::from_slice(&d)?)
    }
}

/// A new loopback listener on a port the kernel chooses. The lab binds every daemon's listeners
/// itself and hands them down (`ferry_sys::listen`), so no port is ever chosen by one process and
/// bound by another.
fn bind_loopback() -> Result<(String, std::net::TcpListener)> {
    let l = std::net::TcpListener::bind("127.0.0.1:0").context("cannot listen on 127.0.0.1")?;
    Ok((l.local_addr()?.to_string(), l))
}

/// A started daemon: pid, start time, command line, listeners handed down.
type Spawned = (i32, u64, Vec<String>, BTreeMap<String, (String, i32)>);

pub use ferry_sys::proc::{alive, same_process, start_ticks};

/// Start a daemon detached in its own process group, logging to `log`. Its pid and start time
/// are appended to `DIR/pids` at once, so a failure before lab.json is saved still stops it.
fn spawn_daemon(
    exe: &Path,
    args: &[String],
    log: &Path,
    stdout: Option<&Path>,
    listeners: &[(&str, &std::net::TcpListener)],
) -> Result<Spawned> {
    let child = crate::launch::spawn(&crate::launch::Spawn {
        exe,
        args,
        log,
        stdout: stdout.map_or(crate::launch::Stdout::Log, crate::launch::Stdout::Private),
        listeners,
        env: &[],
        own_group: true,
    })?;
    let pid = child.id() as i32;
    let ticks = start_ticks(pid).unwrap_or(0);
    if let Some(dir) = log.parent().and_then(|l| l.parent()) {
        use std::io::Write;
        let line = format!("{pid} {ticks} {}\n", log.file_stem().map(|s| s.to_string_lossy()).unwrap_or_default());
        let _ = std::fs::OpenOptions::new()
            .create(true)
            .append(true)
            .open(dir.join("pids"))
            .and_then(|mut f| f.write_all(line.as_bytes()));
    }
    let mut handed = BTreeMap::new();
    for (key, l) in listeners {
        use std::os::fd::AsRawFd;
        handed.insert((*key).to_owned(), (l.local_addr()?.to_string(), l.as_raw_fd()));
    }
    Ok((pid, ticks, args.to_vec(), handed))
}

use crate::launch::ready_file;

/// Wait until the daemon `pid` (logging to `log`) says it listens: its ready file exists. Not a
/// connection attempt: a port freed by a daemon that died at start may already belong to another
/// process on this machine.
async fn wait_ready(pid: i32, log: &Path, limit: Duration) -> Result<()> {
    let deadline = Instant::now() + limit;
    let ready = ready_file(log);
    loop {
        if ready.exists() {
            return Ok(());
        }
        if !alive(pid) {
            bail!("it exited at start; see {}", log.display());
        }
        if Instant::now() >= deadline {
            bail!("it did not start listening within {limit:?}; see {}", log.display());
        }
        tokio::time::sleep(Duration::from_millis(50)).await;
    }
}

fn s(p: &Path) -> String {
    p.to_string_lossy().into_owned()
}

/// Write a registered component's configuration (its keys, its certificate from registration,
/// the server link) to `<reg>/<kind>.toml` and start it.
#[allow(clippy::too_many_arguments)]
fn start_component(
    exe: &Path,
    logs: &Path,
    reg: &Path,
    kind: &str,
    (site, name): (&String, &String),
    keys: ComponentFile,
    link: &ConfigServerLink,
    (address, address_l): (String, &std::net::TcpListener),
    (status, status_l): (String, &std::net::TcpListener),
    extra: &[(&str, &std::net::TcpListener)],
) -> Result<LabProcess> {
    let cfg_path = reg.join(format!("{kind}.toml"));
    keys.tls(&registered_tls(reg, kind))?.config_server(link)?.write(&cfg_path)?;
    let log = logs.join(format!("{name}.log"));
    let mut handed = vec![("listen", address_l), ("status_listen", status_l)];
    handed.extend_from_slice(extra);
    let (pid, start_ticks, args, listeners) =
        spawn_daemon(exe, &[kind.into(), "--config".into(), s(&cfg_path)], &log, None, &handed)?;
    Ok(LabProcess {
        name: name.clone(),
        kind: kind.into(),
        site: Some(site.clone()),
        pid,
        log,
        address,
        status: Some(status),
        start_ticks,
        args,
        listeners,
    })
}

/// The TLS files `ferry register` wrote for `kind` in `reg`.
pub fn registered_tls(reg: &Path, kind: &str) -> TlsFiles {
    TlsFiles { ca: reg.join("ca.pem"), cert: reg.join(format!("{kind}.pem")), key: reg.join(format!("{kind}.key")) }
}

/// The link to the configuration server at `address` of a component registered as `name` into
/// `reg`: heartbeats and settings go under that name.
pub fn registered_link(address: String, reg: &Path, name: &str, heartbeat_interval_secs: f64) -> ConfigServerLink {
    ConfigServerLink {
        address,
        ca: reg.join("ca.pem"),
        token_file: reg.join("config-server.token"),
        name: Some(name.to_owned()),
        policy: None,
        heartbeat_interval_secs,
        other_addresses: Vec::new(),
    }
}

/// A byte count as a TOML integer (TOML integers are signed 64-bit).
fn to_toml_int(n: u64) -> Result<i64> {
    i64::try_from(n).with_context(|| format!("{n} is too large for the configuration file"))
}

fn check_spec(spec: &LabSpec) -> Result<()> {
    let servers = spec.sites.iter().filter(|s| s.config_server).count();
    if servers != 1 {
        bail!("exactly one site must have config_server = true (found {servers})");
    }
    let standbys = spec.sites.iter().filter(|s| s.standby_config_server).count();
    if standbys > 1 || spec.sites.iter().any(|s| s.standby_config_server && s.config_server) {
        bail!("at most one site may have standby_config_server = true, and not the configuration server's own");
    }
    let mut names = std::collections::HashSet::new();
    for site in &spec.sites {
        ferry_types::validate_name("site", &site.name).map_err(anyhow::Error::msg)?;
        for n in site
            .machines
            .iter()
            .map(|m| &m.name)
            .chain(site.master_targets.iter().map(|m| &m.name))
            .chain(site.process_server.iter().map(|p| &p.name))
        {
            ferry_types::validate_name("lab object", n).map_err(anyhow::Error::msg)?;
            if !names.insert(n.clone()) {
                bail!("{n} is named twice in the lab description (machines, master targets and process servers share one namespace)");
            }
        }
        for m in &site.machines {
            if !site.datastores.iter().any(|d| d.name == m.datastore) {
                bail!("machine {}: site {} has no datastore {}", m.name, site.name, m.datastore);
            }
            for d in &m.disks {
                ferry_types::validate_name("disk", &d.name).map_err(anyhow::Error::msg)?;
            }
        }
        if site.process_server.is_some()
            && !spec.sites.iter().any(|o| o.name != site.name && o.master_targets.iter().any(|m| m.run))
        {
            bail!("the process server of site {} needs a running master target on another site to send to", site.name);
        }
    }
    Ok(())
}

/// Write `DIR/sites/<site>/` (site.toml, datastore folders, sparse disks) for one site.
/// `guest` (with the `ferry` executable) makes powering a machine on start its guest:
/// `[power] on = [FERRY, "lab", "guest", "--dir", "{dir}"]`, the settings in `[power.extra.guest]`.
fn build_site(site: &LabSite, folder: &Path, guest: Option<(&Path, GuestSettings)>) -> Result<discovery::SiteFile> {
    let power = match guest {
        Some((exe, settings)) => {
            let mut extra = toml::Table::new();
            extra.insert("guest".into(), toml::Value::try_from(&settings)?);
            Some(discovery::PowerCommand {
                on: vec![s(exe), "lab".into(), "guest".into(), "--dir".into(), "{dir}".into()],
                extra,
            })
        }
        None => None,
    };
    std::fs::create_dir_all(folder)?;
    let mut file = discovery::SiteFile {
        hosts: site.hosts.clone(),
        datastores: Vec::new(),
        networks: site.networks.clone(),
        machines: Vec::new(),
        master_targets: Vec::new(),
        process_servers: Vec::new(),
        credentials: site.credentials.clone(),
        power,
    };
    for d in &site.datastores {
        let rel = PathBuf::from("datastores").join(&d.name);
        if d.accessible {
            std::fs::create_dir_all(folder.join(&rel))?;
        }
        file.datastores.push(discovery::Datastore {
            name: d.name.clone(),
            kind: d.kind.clone(),
            path: rel,
            hosts: d.hosts.clone(),
            access: d.access.clone(),
            free_bytes: None,
            accessible: None,
        });
    }
    for m in &site.machines {
        let mut disks = Vec::new();
        for d in &m.disks {
            let rel = PathBuf::from("datastores").join(&m.datastore).join(&m.name).join(format!("{}.img", d.name));
            let p = folder.join(&rel);
            if let Some(parent) = p.parent() {
                std::fs::create_dir_all(parent)?;
            }
            if !p.exists() {
                std::fs::File::create(&p)
                    .and_then(|f| f.set_len(d.size))
                    .with_context(|| format!("cannot create {}", p.display()))?;
            }
            let uuid = d.uuid.clone().unwrap_or_else(|| {
                let u: [u8; 16] = rand::random();
                u.iter().map(|b| format!("{b:02x}")).collect()
            });
            disks.push(discovery::Disk {
                name: d.name.clone(),
                path: rel,
                uuid: Some(uuid),
                size: None,
                allocated: None,
            });
        }
        file.machines.push(discovery::Machine {
            name: m.name.clone(),
            os_family: m.os_family.clone(),
            os: m.os.clone(),
            host: m.host.clone(),
            nics: m.nics.clone(),
            disks,
            controller: m.controller.clone(),
            snapshots: Vec::new(),
            // Powered on through the provider once the server runs (which starts the guest).
            power: "off".into(),
            extra: match &m.workload {
                Some(w) => {
                    let mut t = toml::Table::new();
                    t.insert("workload".into(), toml::Value::try_from(w)?);
                    t
                }
                None => toml::Table::new(),
            },
        });
    }
    for mt in &site.master_targets {
        let rel = PathBuf::from("retention").join(&mt.name);
        std::fs::create_dir_all(folder.join(&rel))?;
        file.master_targets.push(discovery::MasterTargetMachine {
            name: mt.name.clone(),
            os_family: mt.os_family.clone(),
            host: mt.host.clone(),
            attached_disks: mt.attached_disks,
            controller: mt.controller.clone(),
            enable_uuid: mt.enable_uuid,
            retention_volumes: vec![rel],
            retention_free_bytes: Vec::new(),
            attached: Vec::new(),
        });
    }
    if let Some(ps) = &site.process_server {
        let rel = PathBuf::from("cache").join(&ps.name);
        std::fs::create_dir_all(folder.join(&rel))?;
        file.process_servers.push(discovery::ProcessServerMachine {
            name: ps.name.clone(),
            cache: rel,
            cache_free_percent: None,
        });
    }
    Ok(file)
}

fn write_site(folder: &Path, file: &discovery::SiteFile) -> Result<()> {
    let p = folder.join("site.toml");
    std::fs::write(&p, toml::to_string(file)?).with_context(|| format!("cannot write {}", p.display()))
}

pub(crate) async fn wait_job(server: &ServerClient, job: &Job, limit: Duration) -> Result<Job> {
    let id = &job.id;
    let deadline = Instant::now() + limit;
    loop {
        let v: Job = server.call(Method::Get, &format!("/api/v1/jobs/{id}"), None::<&()>).await?;
        match v.state {
            JobState::Succeeded => return Ok(v),
            JobState::Failed | JobState::Cancelled => {
                bail!("job {id} ({}) failed: {}", v.kind, v.error.as_ref().map(|e| e.message.as_str()).unwrap_or("-"))
            }
            _ => {}
        }
        if Instant::now() >= deadline {
            bail!("job {id} ({}) did not finish within {limit:?}", v.kind);
        }
        tokio::time::sleep(Duration::from_millis(200)).await;
    }
}

/// Where the lab reports progress (one line per step); the binary prints it, tests ignore it.
pub type Say<'a> = &'a (dyn Fn(&str) + Send + Sync);

/// `ferry lab up DIR [--config FILE]`.
pub async fn up(dir: &Path, config: Option<&Path>, say: Say<'_>) -> Result<LabState> {
    let text = match config {
        Some(p) => {
            std::fs::read_to_string(p).with_context(|| format!("cannot read the lab description {}", p.display()))?
        }
        None => DEFAULT_LAB.to_owned(),
    };
    let spec: LabSpec = toml::from_str(&text).with_context(|| {
        format!(
            "invalid lab description {}",
            config.map(|p| p.display().to_string()).unwrap_or_else(|| "(built-in)".into())
        )
    })?;
    check_spec(&spec)?;
    if dir.join("lab.json").exists() {
        let st = LabState::load(dir)?;
        if st.processes.iter().any(|p| alive(p.pid)) {
            bail!("a lab is already running in {} (`ferry lab down {}` first)", dir.display(), dir.display());
        }
        bail!("{} holds a stopped lab: remove the folder or choose another", dir.display());
    }
    std::fs::create_dir_all(dir).with_context(|| format!("cannot create {}", dir.display()))?;
    let dir = std::fs::canonicalize(dir)?;
    {
        // Claim the folder: of two `lab up` racing here, one creates lab.json, the other stops
        // now (before starting or cleaning up anything).
        use std::os::unix::fs::OpenOptionsExt;
        std::fs::OpenOptions::new().write(true).create_new(true).mode(0o600).open(dir.join("lab.json")).with_context(
            || {
                format!(
                    "{} is being set up by another `ferry lab up` (or holds a lab): choose another folder",
                    dir.display()
                )
            },
        )?;
    }
    match start(&dir, &spec, &text, say).await {
        Ok(st) => Ok(st),
        Err(e) => {
            // Stop whatever this attempt started (its pids are in lab.json); keep the logs.
            if dir.join("lab.json").exists() {
                if let Err(d) = down(&dir, false).await {
                    tracing::warn!(error = %format!("{d:#}"), "cleaning up the failed lab");
                }
            }
            Err(e.context(format!("the lab did not come up (logs in {}/logs; processes stopped)", dir.display())))
        }
    }
}

async fn start(dir: &Path, spec: &LabSpec, text: &str, say: Say<'_>) -> Result<LabState> {
    let spec = spec.clone();
    let dir = dir.to_owned();
    std::fs::write(dir.join("lab.toml"), text)?;
    let logs = dir.join("logs");
    std::fs::create_dir_all(&logs)?;
    let exe = std::env::current_exe().context("cannot find the ferry executable")?;
    let mut processes = Vec::new();
    let mut links = Vec::new();
    // Anything started is recorded at once, so a failure half-way can be cleaned up by `lab down`.
    let mut state = LabState {
        dir: dir.clone(),
        config_server: String::new(),
        standby_config_server: None,
        ca: dir.join("config-server/tls/ca.pem"),
        ca_fingerprint: String::new(),
        admin_token: String::new(),
        operator_token: String::new(),
        processes: Vec::new(),
        links: Vec::new(),
        sites: spec.sites.iter().map(|s| (s.name.clone(), dir.join("sites").join(&s.name))).collect(),
    };
    state.save()?;

    // 1. The configuration server.
    say("starting the configuration server (SQLite)…");
    let (cs_addr, cs_listener) = bind_loopback()?;
    let primary_site = spec.sites.iter().find(|s| s.config_server).map(|s| s.name.clone()).unwrap_or_default();
    let standby_site = spec.sites.iter().find(|s| s.standby_config_server).map(|s| s.name.clone());
    // Bound now: the active server asks its peer for the authority from its first start.
    let standby_bound = match &standby_site {
        Some(_) => Some(bind_loopback()?),
        None => None,
    };
    let server_keys = |name: &str| -> Vec<String> {
        vec![
            "--set".into(),
            format!("heartbeat_timeout_secs = {}", spec.heartbeat_timeout_secs),
            "--set".into(),
            "health_interval_secs = 1.0".into(),
            // The lab's sites, and the one program their power commands run: its guest.
            "--set".into(),
            format!("site_root = {}", toml::Value::String(s(&dir.join("sites")))),
            "--set".into(),
            format!("power_programs = [[{}, 'lab', 'guest']]", toml::Value::String(s(&exe))),
            "--set".into(),
            format!("name = {}", toml::Value::String(name.to_owned())),
            "--set".into(),
            "peer_check_interval_secs = 1.0".into(),
        ]
    };
    let mut cs_keys = server_keys(&format!("cs-{primary_site}"));
    if let Some((addr, _)) = &standby_bound {
        cs_keys.extend(["--set".into(), format!("peers = [{}]", toml::Value::String(addr.clone()))]);
    }
    let cs_log = logs.join("config-server.log");
    let first_out = logs.join("config-server.first-start.json");
    let (cs_pid, cs_ticks, cs_args, cs_listeners) = spawn_daemon(
        &exe,
        &[
            "--output".into(),
            "json".into(),
            "config-server".into(),
            "--listen".into(),
            cs_addr.clone(),
            "--state-dir".into(),
            s(&dir.join("config-server")),
        ]
        .into_iter()
        .chain(cs_keys)
        .collect::<Vec<_>>(),
        &cs_log,
        Some(&first_out),
        &[("listen", &cs_listener)],
    )?;
    drop(cs_listener);
    processes.push(LabProcess {
        name: "config-server".into(),
        kind: "config-server".into(),
        site: spec.sites.iter().find(|s| s.config_server).map(|s| s.name.clone()),
        pid: cs_pid,
        log: cs_log.clone(),
        address: cs_addr.clone(),
        status: None,
        start_ticks: cs_ticks,
        args: cs_args,
        listeners: cs_listeners,
    });
    state.processes = processes.clone();
    state.config_server = cs_addr.clone();
    state.save()?;
    wait_ready(cs_pid, &cs_log, Duration::from_secs(60)).await.context("the configuration server")?;
    let first: Started = {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let t = std::fs::read_to_string(&first_out).unwrap_or_default();
            if let Some(line) = t.lines().next().filter(|_| t.contains('\n')) {
                break serde_json::from_str(line).context("the configuration server's first-start output")?;
            }
            if !alive(cs_pid) {
                bail!("the configuration server exited at start; see {}", cs_log.display());
            }
            if Instant::now() >= deadline {
                bail!("the configuration server printed no first-start line; see {}", cs_log.display());
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    };
    let _ = std::fs::remove_file(&first_out);
    state.admin_token = first.admin_token.context("no admin token in the first-start output")?;
    state.ca_fingerprint = first.ca_fingerprint;
    let passphrase = first.registration_passphrase.context("no registration passphrase")?;
    let pass_file = dir.join("registration.passphrase");
    {
        use std::os::unix::fs::OpenOptionsExt;
        let mut f = std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&pass_file)?;
        std::io::Write::write_all(&mut f, passphrase.as_bytes())?;
    }
    let admin =
        ServerClient { server: cs_addr.clone(), token: Some(state.admin_token.clone()), ca: Some(state.ca.clone()) };
    let new = NewToken { name: "lab-operator".into(), role: "operator".into() };
    let tok: TokenCreated = admin.call(Method::Post, "/api/v1/tokens", Some(&new)).await?;
    state.operator_token = tok.token;
    state.save()?;

    // 2. Links: in front of every master target and of the configuration server for other sites.
    let mut start_link = |name: String, to: String| -> Result<LabLink> {
        let (listen, listen_l) = bind_loopback()?;
        let (control, control_l) = bind_loopback()?;
        let l = LabLink { name: name.clone(), listen, to, control };
        let log = logs.join(format!("link-{name}.log"));
        let (pid, start_ticks, args, listeners) = spawn_daemon(
            &exe,
            &[
                "lab".into(),
                "link".into(),
                "--listen".into(),
                l.listen.clone(),
                "--to".into(),
                l.to.clone(),
                "--control".into(),
                l.control.clone(),
            ],
            &log,
            None,
            &[("listen", &listen_l), ("control", &control_l)],
        )?;
        processes.push(LabProcess {
            name: format!("link-{name}"),
            kind: "link".into(),
            site: None,
            pid,
            log,
            address: l.listen.clone(),
            status: Some(l.control.clone()),
            start_ticks,
            args,
            listeners,
        });
        Ok(l)
    };
    // name -> listen and status listeners (bound here, handed to the master target; its point
    // exports are on its retention volume's owner-only unix socket).
    type Bound = (String, std::net::TcpListener);
    let mut mt_addr: BTreeMap<String, (Bound, Bound)> = BTreeMap::new();
    for site in &spec.sites {
        for mt in site.master_targets.iter().filter(|m| m.run) {
            let listen = bind_loopback()?;
            let link = start_link(mt.name.clone(), listen.0.clone())?;
            mt_addr.insert(mt.name.clone(), (listen, bind_loopback()?));
            links.push(link);
        }
    }
    let mut site_server: BTreeMap<String, String> = BTreeMap::new();
    for site in &spec.sites {
        if site.config_server {
            site_server.insert(site.name.clone(), cs_addr.clone());
        } else {
            let link = start_link(format!("config-server-{}", site.name), cs_addr.clone())?;
            site_server.insert(site.name.clone(), link.listen.clone());
            links.push(link);
        }
    }
    state.processes = processes.clone();
    state.links = links.clone();
    state.save()?;
    for l in &links {
        let p = state.process(&format!("link-{}", l.name)).context("link process")?;
        wait_ready(p.pid, &p.log, Duration::from_secs(30)).await.with_context(|| format!("link {}", l.name))?;
    }

    // 2b. The standby configuration server: it copies the active one through its site's link,
    // with the active server's CA and an admin token of it.
    let mut site_standby: BTreeMap<String, String> = BTreeMap::new();
    if let (Some(site), Some((sb_addr, sb_listener))) = (&standby_site, standby_bound) {
        say(&format!("starting the standby configuration server on site {site}…"));
        let sb_dir = dir.join(format!("config-server-{site}"));
        let token_file = dir.join(format!("config-server-{site}.primary-admin.token"));
        {
            use std::os::unix::fs::OpenOptionsExt;
            let mut f =
                std::fs::OpenOptions::new().write(true).create(true).truncate(true).mode(0o600).open(&token_file)?;
            std::io::Write::write_all(&mut f, state.admin_token.as_bytes())?;
        }
        let primary = site_server[site].clone();
        let standby = format!(
            "standby = {{ primary = {}, token_file = {}, interval_secs = 1.0 }}",
            toml::Value::String(primary.clone()),
            toml::Value::String(s(&token_file))
        );
        let mut args: Vec<String> = vec![
            "--output".into(),
            "json".into(),
            "config-server".into(),
            "--listen".into(),
            sb_addr.clone(),
            "--state-dir".into(),
            s(&sb_dir),
        ];
        args.extend(server_keys(&format!("cs-{site}")));
        args.extend([
            "--set".into(),
            standby,
            "--set".into(),
            format!("certs = {}", toml::Value::String(s(&dir.join("config-server/tls")))),
            "--set".into(),
            format!("peers = [{}]", toml::Value::String(primary)),
        ]);
        let log = logs.join(format!("config-server-{site}.log"));
        let out = logs.join(format!("config-server-{site}.first-start.json"));
        let (pid, ticks, args, listeners) = spawn_daemon(&exe, &args, &log, Some(&out), &[("listen", &sb_listener)])?;
        drop(sb_listener);
        processes.push(LabProcess {
            name: format!("config-server-{site}"),
            kind: "config-server".into(),
            site: Some(site.clone()),
            pid,
            log: log.clone(),
            address: sb_addr.clone(),
            status: None,
            start_ticks: ticks,
            args,
            listeners,
        });
        state.processes = processes.clone();
        state.standby_config_server = Some(sb_addr.clone());
        state.save()?;
        wait_ready(pid, &log, Duration::from_secs(60)).await.context("the standby configuration server")?;
        // The lab's components reach it directly (the lab's links stand between sites' data
        // paths and in front of the active server only).
        for site in &spec.sites {
            site_standby.insert(site.name.clone(), sb_addr.clone());
        }
    }

    // 3. Register and start the master targets and process servers.
    let comps = dir.join("components");
    let link_of = |name: &str| links.iter().find(|l| l.name == name).map(|l| l.listen.clone());
    let hb = spec.heartbeat_interval_secs;
    // The registered name goes with the link: heartbeats and settings are under it.
    let server_link = |site: &str, reg: &Path, name: &str| -> ConfigServerLink {
        let mut l = registered_link(site_server[site].clone(), reg, name, hb);
        l.other_addresses = site_standby.get(site).cloned().into_iter().collect();
        l
    };
    for site in &spec.sites {
        let folder = dir.join("sites").join(&site.name);
        for mt in site.master_targets.iter().filter(|m| m.run) {
            say(&format!("starting master target {} ({}) on site {}…", mt.name, mt.os_family, site.name));
            let reg = comps.join(format!("master-target-{}", mt.name));
            ferry_status::server_client::register_component(
                &cs_addr,
                &state.ca_fingerprint,
                &passphrase,
                &ferry_status::server_client::Registrant {
                    kind: ferry_api::control::ComponentKind::MasterTarget,
                    name: &mt.name,
                    hosts: &[],
                    site: Some(&site.name),
                },
                &reg,
            )
            .await
            .with_context(|| format!("registering master target {}", mt.name))?;
            let ((listen, listen_l), (status, status_l)) =
                mt_addr.remove(&mt.name).context("master target listeners")?;
            let keys = ComponentFile::new()
                .set("name", mt.name.as_str())
                .path("datastore", &reg.join("datastore"))
                .path("retention", &folder.join("retention").join(&mt.name))
                .path("image_root", &dir)
                .set("listen", listen.as_str())
                .set("status_listen", status.as_str())
                .set("advertise", link_of(&mt.name).unwrap_or_else(|| listen.clone()));
            let link = server_link(&site.name, &reg, &mt.name);
            let names = (&site.name, &mt.name);
            processes.push(start_component(
                &exe,
                &logs,
                &reg,
                "master-target",
                names,
                keys,
                &link,
                (listen, &listen_l),
                (status, &status_l),
                &[],
            )?);
        }
        if let Some(ps) = &site.process_server {
            say(&format!("starting process server {} on site {}…", ps.name, site.name));
            let reg = comps.join(format!("process-server-{}", ps.name));
            ferry_status::server_client::register_component(
                &cs_addr,
                &state.ca_fingerprint,
                &passphrase,
                &ferry_status::server_client::Registrant {
                    kind: ferry_api::control::ComponentKind::ProcessServer,
                    name: &ps.name,
                    hosts: &[],
                    site: Some(&site.name),
                },
                &reg,
            )
            .await
            .with_context(|| format!("registering process server {}", ps.name))?;
            // Default route: the first master target of another site (protection sets each machine's).
            let (mt_name, mt_link) = spec
                .sites
                .iter()
                .filter(|o| o.name != site.name)
                .flat_map(|o| o.master_targets.iter().filter(|m| m.run))
                .find_map(|m| link_of(&m.name).map(|l| (m.name.clone(), l)))
                .context("no master target on another site")?;
            let (listen, listen_l) = bind_loopback()?;
            let (status, status_l) = bind_loopback()?;
            let keys = ComponentFile::new()
                .path("cache_dir", &folder.join("cache").join(&ps.name))
                .set("cache_capacity_bytes", to_toml_int(ps.cache_capacity_bytes)?)
                .set("listen", listen.as_str())
                .set("status_listen", status.as_str())
                .set("master_target", mt_link.as_str())
                .set("master_target_name", mt_name.as_str());
            let link = server_link(&site.name, &reg, &ps.name);
            let names = (&site.name, &ps.name);
            processes.push(start_component(
                &exe,
                &logs,
                &reg,
                "process-server",
                names,
                keys,
                &link,
                (listen, &listen_l),
                (status, &status_l),
                &[],
            )?);
        }
        state.processes = processes.clone();
        state.save()?;
    }
    for p in processes.iter().filter(|p| p.kind == "master-target" || p.kind == "process-server") {
        wait_ready(p.pid, &p.log, Duration::from_secs(60)).await.with_context(|| format!("{} {}", p.kind, p.name))?;
    }

    // 4. Sites, inventory, groups, and the machines powered on.
    say("adding the sites and discovering them…");
    let op = state.server();
    for site in &spec.sites {
        let folder = dir.join("sites").join(&site.name);
        let guest = GuestSettings {
            config_server: site_server[&site.name].clone(),
            other_config_servers: site_standby.get(&site.name).cloned().into_iter().collect(),
            ca_fingerprint: state.ca_fingerprint.clone(),
            passphrase_file: pass_file.clone(),
            boot_delay_secs: spec.boot_delay_secs,
            heartbeat_interval_secs: hb,
        };
        let file = build_site(site, &folder, Some((&exe, guest)))?;
        write_site(&folder, &file)?;
        let new = Site { name: site.name.clone(), provider: "local".into(), path: folder.clone() };
        let added: SiteAdded = op.call(Method::Post, "/api/v1/sites", Some(&new)).await?;
        wait_job(&op, &added.job, Duration::from_secs(60)).await?;
    }
    for g in &spec.groups {
        let group = ReplicationGroup { name: g.name.clone(), machines: g.machines.clone(), policy: None };
        let _: ReplicationGroup = op.call(Method::Post, "/api/v1/replication-groups", Some(&group)).await?;
    }
    let mut powered = Vec::new();
    for site in &spec.sites {
        for m in site.machines.iter().filter(|m| m.power == "on") {
            let power_on = SiteOperation::PowerOn { machine: m.name.clone(), allow_failed_over: false };
            let path = format!("/api/v1/sites/{}/operations", site.name);
            let job: Job = op.call(Method::Post, &path, Some(&power_on)).await?;
            wait_job(&op, &job, Duration::from_secs(60)).await.with_context(|| format!("powering {} on", m.name))?;
            powered.push(m.name.clone());
        }
    }

    // 5. Everything reports in.
    say(&format!("waiting for {} machine(s) to boot and register…", powered.len()));
    let want: Vec<String> = processes
        .iter()
        .filter(|p| p.kind == "master-target" || p.kind == "process-server")
        .map(|p| format!("{}/{}", p.kind, p.name))
        .chain(powered.iter().map(|m| format!("agent/{m}")))
        .collect();
    let deadline = Instant::now() + Duration::from_secs_f64(120.0 + spec.boot_delay_secs);
    loop {
        // A daemon may publish its listeners and still refuse its configuration a moment later.
        if let Some(p) = processes.iter().find(|p| !same_process(p.pid, p.start_ticks)) {
            bail!("{} {}: it exited at start; see {}", p.kind, p.name, p.log.display());
        }
        let comps: Vec<ComponentHealth> = op.call(Method::Get, "/api/v1/components", None::<&()>).await?;
        let missing: Vec<&String> = want
            .iter()
            .filter(|w| {
                !comps.iter().any(|c| {
                    format!("{}/{}", c.component.kind, c.component.name) == **w && c.component.last_seen_ms.is_some()
                })
            })
            .collect();
        if missing.is_empty() {
            break;
        }
        if Instant::now() >= deadline {
            bail!("{missing:?} did not report to the configuration server; see the logs in {}", logs.display());
        }
        tokio::time::sleep(Duration::from_millis(300)).await;
    }
    state.processes = processes;
    state.links = links;
    state.save()?;
    Ok(state)
}

/// `ferry lab status`: processes, links, components and machines.
pub async fn status(dir: &Path) -> Result<LabStatus> {
    let st = LabState::load(dir)?;
    let processes = st
        .processes
        .iter()
        .map(|p| ProcessState {
            name: p.name.clone(),
            kind: p.kind.clone(),
            site: p.site.clone(),
            pid: p.pid,
            running: alive(p.pid),
            address: p.address.clone(),
            status: p.status.clone(),
            log: p.log.clone(),
        })
        .collect();
    let mut links = Vec::new();
    for l in &st.links {
        let state = ferry_status::call(&l.control, Method::Get, "/status", None::<&()>).await.ok();
        links.push(LinkState { link: l.clone(), state });
    }
    let server = st.server();
    let machines = server.call(Method::Get, "/api/v1/machines", None::<&()>).await.ok();
    let components = server.call(Method::Get, "/api/v1/components", None::<&()>).await.ok();
    Ok(LabStatus {
        dir: st.dir.clone(),
        config_server: st.config_server.clone(),
        processes,
        links,
        components,
        machines,
    })
}

/// `ferry lab status`.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LabStatus {
    pub dir: PathBuf,
    pub config_server: String,
    pub processes: Vec<ProcessState>,
    pub links: Vec<LinkState>,
    /// None when the configuration server does not answer.
    pub components: Option<Vec<ComponentHealth>>,
    pub machines: Option<Vec<MachineView>>,
}

/// A lab process and whether it runs.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct ProcessState {
    pub name: String,
    pub kind: String,
    pub site: Option<String>,
    pub pid: i32,
    pub running: bool,
    pub address: String,
    pub status: Option<String>,
    pub log: PathBuf,
}

/// A link and its state (None when its control endpoint does not answer).
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LinkState {
    #[serde(flatten)]
    pub link: LabLink,
    pub state: Option<LinkStatus>,
}

/// What `ferry lab down` did.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LabDown {
    pub dir: PathBuf,
    pub stopped_processes: usize,
    pub stopped_guests: usize,
    pub removed: bool,
}

/// What a link control call answered.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct LinkResult {
    pub link: String,
    pub result: LinkStatus,
}

/// Stop every guest of the lab cleanly (power off), in parallel.
fn stop_guests(st: &LabState, signal: i32) -> usize {
    let mut handles = Vec::new();
    for (_, folder) in &st.sites {
        let Ok(entries) = std::fs::read_dir(folder.join("guests")) else { continue };
        for e in entries.flatten() {
            let dir = e.path();
            handles.push(std::thread::spawn(move || discovery::stop_machine(&dir, signal, Duration::from_secs(90))));
        }
    }
    handles.into_iter().filter_map(|h| h.join().ok()).filter(|stopped| *stopped).count()
}

/// `ferry lab down`: guests first (clean shutdown), then process servers, master targets, links
/// and the configuration server; SIGKILL after a grace period; then check no pid is left. Only
/// processes this lab started are signalled: a pid must still have the start time recorded.
pub async fn down(dir: &Path, remove: bool) -> Result<LabDown> {
    let st = LabState::load(dir)?;
    let guests = tokio::task::spawn_blocking({
        let st = st.clone();
        move || stop_guests(&st, libc::SIGTERM)
    })
    .await?;
    // lab.json's processes, and any spawned before lab.json recorded them (a failed `lab up`).
    let mut targets: Vec<(String, String, i32, u64)> =
        st.processes.iter().map(|p| (p.kind.clone(), p.name.clone(), p.pid, p.start_ticks)).collect();
    for line in std::fs::read_to_string(st.dir.join("pids")).unwrap_or_default().lines() {
        let mut it = line.split_whitespace();
        let (Some(pid), Some(ticks), Some(name)) = (it.next(), it.next(), it.next()) else { continue };
        let (Ok(pid), Ok(ticks)) = (pid.parse::<i32>(), ticks.parse::<u64>()) else { continue };
        if !targets.iter().any(|t| t.2 == pid) {
            targets.push(("unrecorded".into(), name.to_owned(), pid, ticks));
        }
    }
    for kind in ["process-server", "master-target", "unrecorded", "link", "config-server"] {
        let ps: Vec<&(String, String, i32, u64)> =
            targets.iter().filter(|t| t.0 == kind && same_process(t.2, t.3)).collect();
        for t in &ps {
            // SAFETY: signals to process groups this lab started (pgid = pid), checked above.
            unsafe { libc::kill(-t.2, libc::SIGTERM) };
        }
        let deadline = Instant::now() + Duration::from_secs(30);
        while ps.iter().any(|t| same_process(t.2, t.3)) && Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
        for t in &ps {
            if same_process(t.2, t.3) {
                tracing::warn!(name = %t.1, "did not stop within 30 s: killing it");
                unsafe { libc::kill(-t.2, libc::SIGKILL) };
            }
        }
    }
    tokio::time::sleep(Duration::from_millis(100)).await;
    let mut left: Vec<String> =
        targets.iter().filter(|t| same_process(t.2, t.3)).map(|t| format!("{} (pid {})", t.1, t.2)).collect();
    for (name, pid, ticks) in st.guest_pids() {
        if same_process(pid, ticks) {
            left.push(format!("{name} (pid {pid})"));
        }
    }
    if !left.is_empty() {
        bail!("still running after lab down: {left:?} (stop them with kill, then run `ferry lab down` again)");
    }
    if remove {
        std::fs::remove_dir_all(&st.dir).with_context(|| format!("cannot remove {}", st.dir.display()))?;
    }
    Ok(LabDown { dir: st.dir.clone(), stopped_processes: targets.len(), stopped_guests: guests, removed: remove })
}

/// `ferry lab restart NAME [--kill]`: stop one of the lab's daemons (SIGTERM, or SIGKILL at
/// once with `kill`) and start it again with the same command line (fault tests).
pub async fn restart(dir: &Path, name: &str, kill: bool) -> Result<LabProcess> {
    let mut st = LabState::load(dir)?;
    let i = st.processes.iter().position(|p| p.name == name).with_context(|| {
        format!(
            "no process {name} in this lab (processes: {})",
            st.processes.iter().map(|p| p.name.as_str()).collect::<Vec<_>>().join(", ")
        )
    })?;
    let p = st.processes[i].clone();
    if p.args.is_empty() {
        bail!("{name} was started by an older `ferry lab up` that did not record its command line");
    }
    // The same sockets again: taken back from the running process before it stops (so no
    // connection attempt in between is refused and nobody else can take the port), or bound
    // again at the recorded address if it is gone already.
    let mut sockets = Vec::new();
    for (key, (addr, fd)) in &p.listeners {
        // Only the socket recorded for this key: a daemon that rebound elsewhere gets a new one.
        let taken = ferry_sys::listen::take_from_process(p.pid, p.start_ticks, *fd)
            .ok()
            .filter(|l| l.local_addr().map(|a| a.to_string() == *addr).unwrap_or(false));
        sockets.push((key.clone(), addr.clone(), taken));
    }
    if same_process(p.pid, p.start_ticks) {
        // SAFETY: a signal to a process group this lab started, checked by start time.
        unsafe { libc::kill(-p.pid, if kill { libc::SIGKILL } else { libc::SIGTERM }) };
        let deadline = Instant::now() + Duration::from_secs(30);
        while same_process(p.pid, p.start_ticks) {
            if Instant::now() >= deadline {
                unsafe { libc::kill(-p.pid, libc::SIGKILL) };
            }
            tokio::time::sleep(Duration::from_millis(50)).await;
        }
    }
    let exe = std::env::current_exe().context("cannot find the ferry executable")?;
    let mut bound = Vec::new();
    for (key, addr, taken) in sockets {
        let l = match taken {
            Some(l) => l,
            None => rebind(&addr).await.with_context(|| {
                format!("cannot listen on {addr} again for {name} ({key}); another process took the port")
            })?,
        };
        bound.push((key, l));
    }
    let handed: Vec<(&str, &std::net::TcpListener)> = bound.iter().map(|(k, l)| (k.as_str(), l)).collect();
    let (pid, start_ticks, args, listeners) = spawn_daemon(&exe, &p.args, &p.log, None, &handed)?;
    st.processes[i].pid = pid;
    st.processes[i].start_ticks = start_ticks;
    st.processes[i].args = args;
    st.processes[i].listeners = listeners;
    st.save()?;
    wait_ready(pid, &p.log, Duration::from_secs(60)).await.with_context(|| format!("restarting {name}"))?;
    Ok(st.processes[i].clone())
}

/// Bind `addr` again after its process died. A killed multi-threaded process shows as a zombie
/// while its other threads still hold its descriptors, so the port can stay busy for a moment.
async fn rebind(addr: &str) -> std::io::Result<std::net::TcpListener> {
    let deadline = Instant::now() + Duration::from_secs(15);
    loop {
        match std::net::TcpListener::bind(addr) {
            Err(e) if e.kind() == std::io::ErrorKind::AddrInUse && Instant::now() < deadline => {
                tokio::time::sleep(Duration::from_millis(50)).await
            }
            r => return r,
        }
    }
}

/// A provider operation on a lab machine (power-on, power-off, crash), through the server.
pub async fn machine_op(dir: &Path, machine: &str, op: SiteOperation) -> Result<Job> {
    let st = LabState::load(dir)?;
    let (site, _) = st.machine_site(machine)?;
    let server = st.server();
    let job: Job = server.call(Method::Post, &format!("/api/v1/sites/{site}/operations"), Some(&op)).await?;
    wait_job(&server, &job, Duration::from_secs(120)).await
}

/// `ferry lab link cut|restore|slow [NAME...]` (all links when none is named).
pub async fn link_control(
    dir: &Path,
    names: &[String],
    action: &str,
    body: Option<crate::link::Slow>,
) -> Result<Vec<LinkResult>> {
    let st = LabState::load(dir)?;
    let chosen: Vec<&LabLink> = if names.is_empty() {
        st.links.iter().collect()
    } else {
        let mut v = Vec::new();
        for n in names {
            v.push(st.links.iter().find(|l| &l.name == n).with_context(|| {
                format!(
                    "no link {n} in this lab (links: {})",
                    st.links.iter().map(|l| l.name.as_str()).collect::<Vec<_>>().join(", ")
                )
            })?);
        }
        v
    };
    let mut results = Vec::new();
    for l in chosen {
        let result: LinkStatus = ferry_status::call(&l.control, Method::Post, &format!("/{action}"), body.as_ref())
            .await
            .with_context(|| format!("link {} refused {action} (control endpoint {})", l.name, l.control))?;
        results.push(LinkResult { link: l.name.clone(), result });
    }
    Ok(results)
}

pub use ferry_sys::time::now_ms;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_built_in_lab_is_the_two_site_lab_of_the_docs() {
        let spec: LabSpec = toml::from_str(DEFAULT_LAB).unwrap();
        check_spec(&spec).unwrap();
        let primary = &spec.sites[0];
        assert!(primary.config_server);
        assert_eq!(primary.hosts.len(), 2);
        let kinds: Vec<&str> = primary.datastores.iter().map(|d| d.kind.as_str()).collect();
        assert_eq!(kinds, ["vmfs", "vsan", "nfs"]);
        assert_eq!(primary.machines.iter().filter(|m| m.os_family == "linux").count(), 3);
        assert_eq!(primary.machines.iter().filter(|m| m.os_family == "windows").count(), 1);
        for site in &spec.sites {
            let mut fams: Vec<&str> = site.master_targets.iter().map(|m| m.os_family.as_str()).collect();
            fams.sort();
            assert_eq!(fams, ["linux", "windows"], "site {}", site.name);
            assert!(site.process_server.is_some());
        }
        assert_eq!(spec.groups[0].machines.len(), 2);
    }

    #[test]
    fn a_bad_lab_description_is_refused_with_what_is_wrong() {
        let base = |extra: &str| {
            format!(
                "[[sites]]\nname = 'a'\nconfig_server = true\ndatastores = [{{ name = 'ds', kind = 'vmfs' }}]\n{extra}"
            )
        };
        let check = |text: String| -> String {
            match toml::from_str::<LabSpec>(&text) {
                Ok(spec) => check_spec(&spec).map(|_| String::new()).unwrap_or_else(|e| e.to_string()),
                Err(e) => e.to_string(),
            }
        };
        let dup = base("[[sites.machines]]\nname = 'm'\nos_family = 'linux'\nhost = 'h'\ndatastore = 'ds'\ndisks = []\n[[sites.master_targets]]\nname = 'm'\nos_family = 'linux'\n");
        assert!(check(dup).contains("named twice"));
        let no_ds =
            base("[[sites.machines]]\nname = 'm'\nos_family = 'linux'\nhost = 'h'\ndatastore = 'nope'\ndisks = []\n");
        assert!(check(no_ds).contains("no datastore nope"));
        let lonely_ps = base("process_server = { name = 'ps' }\n");
        assert!(check(lonely_ps).contains("needs a running master target on another site"));
        let bad_name =
            base("[[sites.machines]]\nname = '../x'\nos_family = 'linux'\nhost = 'h'\ndatastore = 'ds'\ndisks = []\n");
        assert!(!check(bad_name).is_empty());
        assert!(check(base("surprise = 1\n")).contains("surprise"));
        assert!(check("[[sites]]\nname = 'a'\n".into()).contains("config_server = true"));
    }
}
