//! Multi-process test harness: real `ferry` daemons on loopback with TLS, real qemu clients.
//!
//! Size: one harness for every scenario (cluster, clients, oracles); splitting it would scatter the helpers each test reaches for.

use std::collections::HashMap;
use std::io::{Read, Write};
use std::path::{Path, PathBuf};
use std::process::{Child, Command, Output, Stdio};
use std::time::{Duration, Instant};

use ferry_lab::component::ComponentFile;
use rand::{Rng, SeedableRng};

pub const FERRY: &str = env!("CARGO_BIN_EXE_ferry");

/// Fail loudly when the qemu tools are missing: these tests use them as the real clients.
pub fn require_qemu() {
    for tool in ["qemu-io", "qemu-img"] {
        let ok = Command::new(tool).arg("--version").output().map(|o| o.status.success()).unwrap_or(false);
        assert!(ok, "{tool} is not installed: run ./test (it installs qemu-utils) or `apt-get install qemu-utils`");
    }
}

/// A listener on a loopback port the kernel chooses, for a daemon started later: the test binds
/// it and hands it down (`ferry_lab::launch`); the daemon never binds the address itself, so no
/// other process can take the port in between, and a restarted daemon gets the same socket.
pub fn listener() -> std::net::TcpListener {
    std::net::TcpListener::bind("127.0.0.1:0").unwrap()
}

/// The port of a listener.
pub fn port_of(l: &std::net::TcpListener) -> u16 {
    l.local_addr().unwrap().port()
}

/// A loopback port nothing listens on, for a *client* that must find no daemon there (never
/// given to a daemon to bind).
pub fn closed_port() -> u16 {
    port_of(&listener())
}

/// Seed from FERRY_TEST_SEED or the clock; printed so a failure can be replayed.
pub fn seed(test: &str) -> u64 {
    let s = std::env::var("FERRY_TEST_SEED").ok().and_then(|s| s.parse().ok()).unwrap_or_else(|| {
        std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_nanos() as u64
    });
    eprintln!("{test}: seed {s} (replay with FERRY_TEST_SEED={s})");
    s
}

/// Start `ferry ARGS` as a daemon the way the lab starts its daemons (`ferry_lab::launch::spawn`):
/// `listeners` handed down, standard error appended to `log`, standard output to `stdout` (a
/// private file) or nowhere; returns once it listens (its ready file), or panics with its log.
pub fn start_daemon(
    args: &[&str],
    log: &Path,
    stdout: Option<&Path>,
    listeners: &[(&str, &std::net::TcpListener)],
) -> Child {
    let args: Vec<String> = args.iter().map(|a| a.to_string()).collect();
    let mut child = ferry_lab::launch::spawn(&ferry_lab::launch::Spawn {
        exe: Path::new(FERRY),
        args: &args,
        log,
        stdout: stdout.map_or(ferry_lab::launch::Stdout::Null, ferry_lab::launch::Stdout::Private),
        listeners,
        env: &[("FERRY_LOG", "info")],
        own_group: false,
    })
    .unwrap_or_else(|e| panic!("ferry {}: {e}", args.join(" ")));
    let ready = ferry_lab::launch::ready_file(log);
    if let Err(e) = ferry_lab::launch::wait_ready_blocking(&ready, Duration::from_secs(30), || {
        child.try_wait().ok().flatten().map(|st| st.to_string())
    }) {
        panic!("ferry {}: {e}; log:\n{}", args.join(" "), std::fs::read_to_string(log).unwrap_or_default());
    }
    child
}

/// The first whole line a daemon wrote to `path` (the configuration server's first-start JSON).
pub fn first_line(path: &Path, child: &mut Child) -> serde_json::Value {
    let deadline = Instant::now() + Duration::from_secs(30);
    loop {
        let text = std::fs::read_to_string(path).unwrap_or_default();
        if let Some((line, _)) = text.split_once('\n') {
            return serde_json::from_str(line).unwrap_or_else(|e| panic!("bad first line {line:?}: {e}"));
        }
        if let Ok(Some(st)) = child.try_wait() {
            panic!("it exited ({st}) before writing a line to {}", path.display());
        }
        assert!(Instant::now() < deadline, "no first line in {} after 30 s", path.display());
        std::thread::sleep(Duration::from_millis(20));
    }
}

pub struct Opts {
    pub disks: Vec<(&'static str, u64)>,
    pub agent_extra: String,
    pub ps_capacity: u64,
    pub ps_extra: String,
    pub mt_extra: String,
    pub volatile: bool,
    /// Number of agents (machines vm1, vm2, ...; components "agent", "agent2", ...).
    pub agents: usize,
    /// The agents' NBD exports over TCP (`nbd_listen`, which needs `nbd_tls`) instead of their
    /// owner-only unix sockets.
    pub nbd_tcp: bool,
}

impl Default for Opts {
    fn default() -> Self {
        Opts {
            disks: vec![("disk0", 64 << 20)],
            agent_extra: String::new(),
            ps_capacity: 1 << 30,
            ps_extra: String::new(),
            mt_extra: String::new(),
            volatile: false,
            agents: 1,
            nbd_tcp: false,
        }
    }
}

pub struct Cluster {
    /// Every daemon's listeners, bound by the test and handed to each start of the daemon:
    /// (component, configuration key) → socket.
    listeners: HashMap<(&'static str, &'static str), std::net::TcpListener>,
    pub dir: tempfile::TempDir,
    /// The first agent's NBD port (with `Opts::nbd_tcp`; 0 otherwise).
    pub nbd: u16,
    /// NBD port of each agent ("agent", "agent2", ...), with `Opts::nbd_tcp`.
    pub nbds: HashMap<&'static str, u16>,
    pub ps_port: u16,
    pub mt_port: u16,
    pub status: HashMap<&'static str, u16>,
    procs: HashMap<&'static str, Child>,
    pub disks: Vec<(&'static str, u64)>,
}

pub const COMPONENTS: [&str; 3] = ["master-target", "process-server", "agent"];
pub const AGENTS: [&str; 3] = ["agent", "agent2", "agent3"];

/// The owner-only unix socket of an agent's NBD export in a cluster folder.
pub fn nbd_socket_in(dir: &Path, agent: &str) -> PathBuf {
    dir.join(format!("{agent}-nbd.sock"))
}

/// The file stem of an agent component's certificate (`agent-vm1`).
pub fn agent_cert(agent: &str) -> String {
    format!("agent-{}", machine_of(agent))
}

/// Machine name of an agent component.
pub fn machine_of(agent: &str) -> String {
    format!("vm{}", agent.strip_prefix("agent").filter(|n| !n.is_empty()).unwrap_or("1"))
}

impl Cluster {
    pub fn new(opts: Opts) -> Cluster {
        require_qemu();
        let dir = tempfile::Builder::new().prefix("ferry-test-").tempdir().unwrap();
        let d = dir.path();
        // One certificate per component, each agent's naming its machine (`agent-vm1.pem`, ...):
        // the process server takes a machine's stream only from its own agent's certificate.
        let mut certs = Command::new(FERRY);
        certs.args(["certs", "--dir"]).arg(d.join("certs"));
        for id in ["process-server", "master-target"] {
            certs.args(["--component", id]);
        }
        for a in &AGENTS[..opts.agents] {
            certs.args(["--component", &format!("agent/{}", machine_of(a))]);
        }
        let out = certs.output().unwrap();
        assert!(out.status.success(), "ferry certs failed: {}", String::from_utf8_lossy(&out.stderr));
        let mut listeners = HashMap::new();
        let mut bind = |c: &'static str, key: &'static str| {
            let l = listener();
            let port = port_of(&l);
            listeners.insert((c, key), l);
            port
        };
        let (ps, mt) = (bind("process-server", "listen"), bind("master-target", "listen"));
        let mut status: HashMap<_, _> = COMPONENTS.iter().map(|c| (*c, bind(c, "status_listen"))).collect();
        let mut nbds = HashMap::new();
        for a in &AGENTS[..opts.agents] {
            if *a != "agent" {
                status.insert(*a, bind(a, "status_listen"));
            }
            if opts.nbd_tcp {
                nbds.insert(*a, bind(a, "nbd_listen"));
            }
        }
        let nbd = nbds.get("agent").copied().unwrap_or(0);
        // Written the way the lab writes its components' files (`ferry_lab::component`).
        let tls = |c: &str| ferry_tls::TlsFiles::in_dir(&d.join("certs"), c);
        let fill =
            |extra: &str, machine: &str| extra.replace("{machine}", machine).replace("{dir}", &d.display().to_string());
        let loopback = |port: u16| format!("127.0.0.1:{port}");
        ComponentFile::new()
            .path("datastore", &d.join("datastore"))
            .path("retention", &d.join("retention"))
            .set("listen", loopback(mt))
            .set("status_listen", loopback(status["master-target"]))
            .set("checkpoint_interval_secs", 0.2)
            .path("image_root", d)
            .tls(&tls("master-target"))
            .unwrap()
            .extra(&fill(&opts.mt_extra, ""))
            .unwrap()
            .write(&d.join("master-target.toml"))
            .unwrap();
        ComponentFile::new()
            .path("cache_dir", &d.join("cache"))
            .set("cache_capacity_bytes", opts.ps_capacity as i64)
            .set("listen", loopback(ps))
            .set("status_listen", loopback(status["process-server"]))
            .set("master_target", loopback(mt))
            .set("reconnect_interval_secs", 0.2)
            .tls(&tls("process-server"))
            .unwrap()
            .extra(&opts.ps_extra)
            .unwrap()
            .write(&d.join("process-server.toml"))
            .unwrap();
        for agent in &AGENTS[..opts.agents] {
            let machine = machine_of(agent);
            let prefix = if *agent == "agent" { String::new() } else { format!("{machine}-") };
            let mut disks = Vec::new();
            for (name, size) in &opts.disks {
                let p = d.join(format!("{prefix}{name}.img"));
                std::fs::File::create(&p).unwrap().set_len(*size).unwrap();
                let mut disk = toml::Table::new();
                disk.insert("name".into(), (*name).into());
                disk.insert("path".into(), ferry_lab::component::path_value(&p));
                disk.insert("cache".into(), if opts.volatile { "volatile" } else { "page-cache" }.into());
                disks.push(toml::Value::Table(disk));
            }
            let nbd_export = match nbds.get(agent) {
                Some(port) => ComponentFile::new().set("nbd_listen", loopback(*port)),
                None => ComponentFile::new().path("nbd_socket", &nbd_socket_in(d, agent)),
            };
            nbd_export
                .set("machine", machine.as_str())
                .path("state_dir", &d.join(format!("{agent}-state")))
                .set("process_server", loopback(ps))
                .set("status_listen", loopback(status[agent]))
                .set("reconnect_interval_secs", 0.2)
                .set("maintenance_interval_secs", 0.2)
                .set("al_retire_interval_secs", 0.5)
                .set("disks", disks)
                .tls(&tls(&agent_cert(agent)))
                .unwrap()
                .extra(&fill(&opts.agent_extra, &machine))
                .unwrap()
                .write(&d.join(format!("{agent}.toml")))
                .unwrap();
        }
        Cluster {
            listeners,
            dir,
            nbd,
            nbds,
            ps_port: ps,
            mt_port: mt,
            status,
            procs: HashMap::new(),
            disks: opts.disks,
        }
    }

    pub fn path(&self) -> &Path {
        self.dir.path()
    }

    pub fn source(&self, disk: &str) -> PathBuf {
        self.path().join(format!("{disk}.img"))
    }

    pub fn target(&self, disk: &str) -> PathBuf {
        self.path().join("datastore/vm1").join(format!("{disk}.img"))
    }

    pub fn start(&mut self, c: &'static str) {
        let mut child = self.spawn(c, &[]);
        let ready = ferry_lab::launch::ready_file(&self.log_path(c));
        let r = ferry_lab::launch::wait_ready_blocking(&ready, Duration::from_secs(20), || {
            child.try_wait().ok().flatten().map(|st| st.to_string())
        });
        if let Err(e) = r {
            panic!("{c}: {e}; log:\n{}", self.log(c));
        }
        self.procs.insert(c, child);
        self.wait_status(c);
    }

    fn log_path(&self, c: &str) -> PathBuf {
        self.path().join(format!("{c}.log"))
    }

    fn args(&self, c: &str) -> Vec<String> {
        vec![
            if c.starts_with("agent") { "agent" } else { c }.to_owned(),
            "--config".to_owned(),
            self.path().join(format!("{c}.toml")).to_string_lossy().into_owned(),
        ]
    }

    fn handed(&self, c: &str) -> Vec<(&str, &std::net::TcpListener)> {
        self.listeners.iter().filter(|((comp, _), _)| *comp == c).map(|((_, key), l)| (*key, l)).collect()
    }

    /// Start component `c` on its configuration the way the lab starts its daemons
    /// (`ferry_lab::launch::spawn`): its listeners handed down, its ready file named.
    fn spawn(&self, c: &str, env: &[(&str, &str)]) -> Child {
        let mut env = env.to_vec();
        env.push(("FERRY_LOG", "info"));
        let (args, listeners, log) = (self.args(c), self.handed(c), self.log_path(c));
        ferry_lab::launch::spawn(&ferry_lab::launch::Spawn {
            exe: Path::new(FERRY),
            args: &args,
            log: &log,
            stdout: ferry_lab::launch::Stdout::Null,
            listeners: &listeners,
            env: &env,
            own_group: false,
        })
        .unwrap_or_else(|e| panic!("{c}: {e}"))
    }

    /// Change component `c`'s configuration file (read, edit as a table, write back).
    pub fn edit_config(&self, c: &str, edit: impl FnOnce(&mut toml::Table)) {
        let p = self.path().join(format!("{c}.toml"));
        let mut t: toml::Table = toml::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap();
        edit(&mut t);
        std::fs::write(&p, toml::to_string(&t).unwrap()).unwrap();
    }

    /// The command that runs component `c` (for a test that runs it in the foreground itself).
    pub fn command(&self, c: &str) -> Command {
        let ready = ferry_lab::launch::ready_file(&self.log_path(c));
        ferry_lab::launch::daemon_command(Path::new(FERRY), &self.args(c), &self.handed(c), Some(&ready))
    }

    /// Start component `c` with extra environment (e.g. `FERRY_FAILPOINTS`), without waiting
    /// for it to come up (a failpoint may stop it at once).
    pub fn start_env(&mut self, c: &'static str, env: &[(&str, &str)]) {
        let child = self.spawn(c, env);
        self.procs.insert(c, child);
    }

    /// Wait for component `c` to exit on its own; its exit status, or None after `limit`.
    pub fn wait_exit(&mut self, c: &str, limit: Duration) -> Option<std::process::ExitStatus> {
        let deadline = Instant::now() + limit;
        while Instant::now() < deadline {
            if let Some(child) = self.procs.get_mut(c) {
                if let Ok(Some(st)) = child.try_wait() {
                    self.procs.remove(c);
                    return Some(st);
                }
            } else {
                return None;
            }
            std::thread::sleep(Duration::from_millis(20));
        }
        None
    }

    pub fn start_all(&mut self) {
        for c in COMPONENTS {
            self.start(c);
        }
        let more: Vec<&'static str> = AGENTS[1..].iter().copied().filter(|a| self.status.contains_key(a)).collect();
        for a in more {
            self.start(a);
        }
    }

    /// Call the master target's API.
    pub fn mt_api(&self, method: &str, path: &str, body: Option<serde_json::Value>) -> (u16, serde_json::Value) {
        self.api("master-target", method, path, body)
    }

    /// Call a component's API (status listener) as the ferry CLI does: what is not a GET carries
    /// the daemon's control token, read from the file its status names.
    pub fn api(&self, c: &str, method: &str, path: &str, body: Option<serde_json::Value>) -> (u16, serde_json::Value) {
        let token = (method != "GET").then(|| self.control_token(c));
        self.api_as(c, token.as_deref(), method, path, body)
    }

    /// Call a component's API with this bearer token (or none).
    pub fn api_as(
        &self,
        c: &str,
        bearer: Option<&str>,
        method: &str,
        path: &str,
        body: Option<serde_json::Value>,
    ) -> (u16, serde_json::Value) {
        let body = body.map(|b| b.to_string());
        http_json_as(self.status[c], bearer, method, path, body.as_deref())
            .unwrap_or_else(|| panic!("{c} API {method} {path} unreachable; log:\n{}", tail(&self.log(c))))
    }

    /// A coordinator route of agent `c` called as the group's coordinator: `body` signed with
    /// the group's private key (hex).
    pub fn api_signed(&self, c: &str, key: &str, path: &str, body: serde_json::Value) -> (u16, serde_json::Value) {
        let body = body.to_string();
        let signer = ferry_status::control::GroupSigner::from_hex(key).unwrap();
        let bearer = signer.bearer(path, body.as_bytes());
        self.api_as(c, Some(&bearer), "POST", path, Some(serde_json::from_str(&body).unwrap()))
    }

    /// The process ID of a running component.
    pub fn pid(&self, c: &str) -> u32 {
        self.procs[c].id()
    }

    /// The control token of a component, from the file its status names.
    pub fn control_token(&self, c: &str) -> String {
        let st = self.status(c);
        let file = st["control_token_file"].as_str().unwrap_or_else(|| panic!("{c} names no control token: {st}"));
        std::fs::read_to_string(file).unwrap_or_else(|e| panic!("{file}: {e}")).trim().to_owned()
    }

    /// Wait until a component's status endpoint answers (it is up), or fail with its log.
    fn wait_status(&mut self, c: &'static str) {
        let deadline = Instant::now() + Duration::from_secs(20);
        while Instant::now() < deadline {
            if let Some(child) = self.procs.get_mut(c) {
                if let Ok(Some(st)) = child.try_wait() {
                    panic!("{c} exited with {st} during start; log:\n{}", self.log(c));
                }
            }
            if self.try_status(c).is_some() {
                return;
            }
            std::thread::sleep(Duration::from_millis(50));
        }
        panic!("{c} did not come up; log:\n{}", self.log(c));
    }

    pub fn log(&self, c: &str) -> String {
        std::fs::read_to_string(self.path().join(format!("{c}.log"))).unwrap_or_default()
    }

    pub fn kill9(&mut self, c: &str) {
        if let Some(mut child) = self.procs.remove(c) {
            let _ = child.kill();
            let _ = child.wait();
        }
    }

    /// SIGTERM and wait for a clean exit.
    pub fn stop(&mut self, c: &str) {
        if let Some(mut child) = self.procs.remove(c) {
            let _ = Command::new("kill").arg("-TERM").arg(child.id().to_string()).status();
            let deadline = Instant::now() + Duration::from_secs(20);
            loop {
                if let Ok(Some(_)) = child.try_wait() {
                    return;
                }
                if Instant::now() > deadline {
                    let _ = child.kill();
                    let _ = child.wait();
                    panic!("{c} did not stop on SIGTERM");
                }
                std::thread::sleep(Duration::from_millis(20));
            }
        }
    }

    pub fn try_status(&self, c: &str) -> Option<serde_json::Value> {
        http_json(self.status[c], "GET", "/status", None).map(|(_, v)| v)
    }

    pub fn status(&self, c: &str) -> serde_json::Value {
        self.try_status(c).unwrap_or_else(|| panic!("{c} status unavailable; log:\n{}", self.log(c)))
    }

    /// Wait until the agent reports caught up (everything applied at the master target).
    pub fn wait_caught_up(&self, timeout: Duration) {
        let deadline = Instant::now() + timeout;
        let mut last = serde_json::Value::Null;
        while Instant::now() < deadline {
            if let Some(s) = self.try_status("agent") {
                if s["caught_up"] == true {
                    return;
                }
                last = s;
            }
            std::thread::sleep(Duration::from_millis(100));
        }
        panic!(
            "agent not caught up after {timeout:?}: {last:#}\nagent log:\n{}\nprocess-server log:\n{}\nmaster-target log:\n{}",
            tail(&self.log("agent")),
            tail(&self.log("process-server")),
            tail(&self.log("master-target"))
        );
    }

    pub fn nbd_url(&self, disk: &str) -> String {
        self.nbd_url_of("agent", disk)
    }

    /// The NBD URL of `disk` of agent `agent` (its unix socket, or TCP with `Opts::nbd_tcp`).
    pub fn nbd_url_of(&self, agent: &str, disk: &str) -> String {
        match self.nbds.get(agent) {
            Some(port) => format!("nbd://127.0.0.1:{port}/{disk}"),
            None => format!("nbd+unix:///{disk}?socket={}", nbd_socket_in(self.path(), agent).display()),
        }
    }

    /// The `ferry lab workload --disk` form of agent `agent`'s `disk`.
    pub fn nbd_spec(&self, agent: &str, disk: &str) -> String {
        match self.nbds.get(agent) {
            Some(port) => format!("127.0.0.1:{port}/{disk}"),
            None => format!("unix:{}:{disk}", nbd_socket_in(self.path(), agent).display()),
        }
    }

    /// Run qemu-io with commands on stdin against a disk's export.
    pub fn qemu_io(&self, disk: &str, commands: &str) -> Output {
        let mut child = Command::new("qemu-io")
            .args(["-f", "raw", &self.nbd_url(disk)])
            .stdin(Stdio::piped())
            .stdout(Stdio::piped())
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        let cmds = commands.to_owned();
        let writer = std::thread::spawn(move || {
            let _ = stdin.write_all(cmds.as_bytes());
        });
        let out = child.wait_with_output().unwrap();
        let _ = writer.join();
        out
    }

    /// `qemu-img compare SOURCE TARGET` for every disk.
    pub fn assert_identical(&self) {
        for (d, _) in &self.disks {
            let out = Command::new("qemu-img")
                .args(["compare", "-f", "raw", "-F", "raw"])
                .arg(self.source(d))
                .arg(self.target(d))
                .output()
                .unwrap();
            assert!(
                out.status.success(),
                "{d}: source and target differ: {}{}",
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        }
    }
}

impl Drop for Cluster {
    fn drop(&mut self) {
        for (_, mut c) in self.procs.drain() {
            let _ = c.kill();
            let _ = c.wait();
        }
        if std::thread::panicking() {
            let keep = self.dir.path().to_owned();
            eprintln!("test failed; logs in {} (kept)", keep.display());
            // Keep the folder for inspection.
            let d = std::mem::replace(&mut self.dir, tempfile::tempdir().unwrap());
            let _ = d.keep();
        }
    }
}

pub fn tail(s: &str) -> String {
    let lines: Vec<&str> = s.lines().collect();
    lines[lines.len().saturating_sub(30)..].join("\n")
}

/// Blocking HTTP/1.1 request returning (status, JSON).
pub fn http_json(port: u16, method: &str, path: &str, body: Option<&str>) -> Option<(u16, serde_json::Value)> {
    http_json_as(port, None, method, path, body)
}

/// [`http_json`] with `Authorization: Bearer <bearer>`.
pub fn http_json_as(
    port: u16,
    bearer: Option<&str>,
    method: &str,
    path: &str,
    body: Option<&str>,
) -> Option<(u16, serde_json::Value)> {
    let mut s = std::net::TcpStream::connect(("127.0.0.1", port)).ok()?;
    s.set_read_timeout(Some(Duration::from_secs(10))).ok()?;
    let body = body.unwrap_or("");
    let auth = bearer.map(|b| format!("Authorization: Bearer {b}\r\n")).unwrap_or_default();
    write!(s, "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}", body.len()).ok()?;
    let mut resp = String::new();
    s.read_to_string(&mut resp).ok()?;
    let (head, rest) = resp.split_once("\r\n\r\n")?;
    let code = head.split_whitespace().nth(1)?.parse().ok()?;
    Some((code, serde_json::from_str(rest).unwrap_or(serde_json::Value::Null)))
}

/// Run a qemu-io workload in the background (the client may die with a killed agent).
pub fn spawn_workload(url: String, work: String) -> std::thread::JoinHandle<std::process::ExitStatus> {
    std::thread::spawn(move || {
        let mut child = Command::new("qemu-io")
            .args(["-f", "raw", &url])
            .stdin(Stdio::piped())
            .stdout(Stdio::null())
            .stderr(Stdio::null())
            .spawn()
            .unwrap();
        let mut stdin = child.stdin.take().unwrap();
        let _ = stdin.write_all(work.as_bytes());
        drop(stdin);
        child.wait().unwrap()
    })
}

/// A random qemu-io workload: sync and overlapping async writes, zeroing and discards, ending
/// with a flush. Offsets and sizes are 512-aligned, as qemu-io requires for raw NBD.
pub fn workload(rng: &mut rand::rngs::StdRng, size: u64, ops: usize) -> String {
    let mut s = String::new();
    let sector = 512u64;
    let mut i = 0;
    while i < ops {
        let kind = rng.gen_range(0..100);
        let len = sector * rng.gen_range(1..=256u64);
        let off = sector * rng.gen_range(0..(size - len) / sector);
        let pat = rng.gen_range(1..=255u8);
        if kind < 45 {
            s.push_str(&format!("write -P {pat} {off} {len}\n"));
            i += 1;
        } else if kind < 85 {
            // A burst of overlapping async writes around one spot.
            let n = rng.gen_range(2..8);
            for _ in 0..n {
                let l = sector * rng.gen_range(1..=64u64);
                let o = (off + sector * rng.gen_range(0..16u64)).min(size - l);
                s.push_str(&format!("aio_write -P {} {o} {l}\n", rng.gen_range(1..=255u8)));
            }
            s.push_str("aio_flush\n");
            i += n;
        } else if kind < 93 {
            s.push_str(&format!("write -z {off} {len}\n"));
            i += 1;
        } else {
            s.push_str(&format!("discard {off} {len}\n"));
            i += 1;
        }
    }
    s.push_str("flush\n");
    s
}

pub fn rng(seed: u64) -> rand::rngs::StdRng {
    rand::rngs::StdRng::seed_from_u64(seed)
}

/// One entry of the agent's source write log (`source_write_log`).
pub struct SourceEntry {
    pub seq: u64,
    /// 0 write, 1 zero, 2 marker (tag / group record)
    pub kind: u8,
    pub disk: u16,
    pub offset: u64,
    pub len: u64,
    pub data: Vec<u8>,
}

/// Parse the agent's source write log (complete entries; it may be read while it grows).
pub fn read_source_log(path: &Path) -> Vec<SourceEntry> {
    let b = std::fs::read(path).unwrap();
    let mut out = Vec::new();
    let mut pos = 0;
    while pos + 27 <= b.len() {
        let u64_at = |o: usize| u64::from_le_bytes(b[o..o + 8].try_into().unwrap());
        let seq = u64_at(pos);
        let kind = b[pos + 8];
        let disk = u16::from_le_bytes([b[pos + 9], b[pos + 10]]);
        let offset = u64_at(pos + 11);
        let len = u64_at(pos + 19);
        pos += 27;
        let data = if kind == 0 {
            // The agent may be appending this entry right now: a torn last entry is not read.
            let Some(d) = b.get(pos..pos.saturating_add(len as usize)) else { break };
            let d = d.to_vec();
            pos += len as usize;
            d
        } else {
            Vec::new()
        };
        out.push(SourceEntry { seq, kind, disk, offset, len, data });
    }
    out
}

/// The oracle: the initial image with every logged write of `disk` with seq <= k applied.
pub fn replay_source(initial: &Path, log: &[SourceEntry], disk: u16, k: u64, out: &Path) {
    use std::os::unix::fs::FileExt;
    std::fs::copy(initial, out).unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(out).unwrap();
    for e in log.iter().filter(|e| e.seq <= k && e.disk == disk) {
        match e.kind {
            0 => f.write_all_at(&e.data, e.offset).unwrap(),
            1 => f.write_all_at(&vec![0u8; e.len as usize], e.offset).unwrap(),
            _ => {}
        }
    }
    f.sync_all().unwrap();
}

/// `qemu-img compare`: None when identical, else the difference it reports.
pub fn image_difference(a: &Path, a_fmt: &str, b: &str, b_fmt: &str) -> Option<String> {
    let out = Command::new("qemu-img").args(["compare", "-f", a_fmt, "-F", b_fmt]).arg(a).arg(b).output().unwrap();
    if out.status.success() {
        None
    } else {
        Some(format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr)))
    }
}

/// Fill a file with seeded random data (a source disk's initial content).
pub fn fill_random(path: &Path, seed: u64) {
    let len = std::fs::metadata(path).unwrap().len();
    let mut r = rng(seed);
    let mut buf = vec![0u8; len as usize];
    r.fill(&mut buf[..]);
    // Leave some holes so sparse handling is exercised too.
    for chunk in buf.chunks_mut(1 << 20).step_by(3) {
        chunk.fill(0);
    }
    std::fs::write(path, &buf).unwrap();
}

/// A tmpfs mounted over a folder for the life of a test (root only: CI runs as root).
pub struct SmallFs(pub PathBuf);

impl SmallFs {
    pub fn mount(dir: &Path, size: &str) -> Option<SmallFs> {
        std::fs::create_dir_all(dir).unwrap();
        let ok = Command::new("mount")
            .args(["-t", "tmpfs", "-o", &format!("size={size}"), "tmpfs"])
            .arg(dir)
            .status()
            .map(|s| s.success())
            .unwrap_or(false);
        ok.then(|| SmallFs(dir.to_owned()))
    }
    pub fn resize(&self, size: &str) {
        assert!(Command::new("mount")
            .args(["-o", &format!("remount,size={size}")])
            .arg(&self.0)
            .status()
            .unwrap()
            .success());
    }
}

impl Drop for SmallFs {
    fn drop(&mut self) {
        let _ = Command::new("umount").arg("-l").arg(&self.0).status();
    }
}

pub fn is_not_root() -> bool {
    Command::new("id").arg("-u").output().map(|o| String::from_utf8_lossy(&o.stdout).trim() != "0").unwrap_or(true)
}

/// A TLS connection to `port` with `as_component`'s certificate from `ferry certs`, expecting the
/// server's certificate to name `server_name`.
pub async fn tls_to(
    port: u16,
    cluster: &Cluster,
    as_component: &str,
    server_name: &str,
) -> ferry_tls::tokio_rustls::client::TlsStream<tokio::net::TcpStream> {
    let files = ferry_tls::TlsFiles::in_dir(&cluster.path().join("certs"), as_component);
    let connector = ferry_tls::connector(&files).unwrap();
    let tcp = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    connector.connect(ferry_tls::server_name(server_name).unwrap(), tcp).await.unwrap()
}

/// Open descriptors and resident memory (bytes) of a process.
pub fn fds_and_rss(pid: u32) -> (usize, u64) {
    let fds = std::fs::read_dir(format!("/proc/{pid}/fd")).map(|d| d.count()).unwrap_or(0);
    let status = std::fs::read_to_string(format!("/proc/{pid}/status")).unwrap_or_default();
    let rss = status
        .lines()
        .find_map(|l| l.strip_prefix("VmRSS:"))
        .and_then(|v| v.trim().trim_end_matches("kB").trim().parse::<u64>().ok())
        .unwrap_or(0);
    (fds, rss * 1024)
}

/// `n` connections from `source` (a loopback address) to 127.0.0.1:`port`, each having sent
/// `first` (half a request header, or nothing for a TLS listener: a handshake never started)
/// and nothing more. Returns the client sockets.
pub fn slow_connections(port: u16, source: &str, n: usize, first: &[u8]) -> Vec<std::net::TcpStream> {
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    let source: std::net::SocketAddr = format!("{source}:0").parse().unwrap();
    rt.block_on(async {
        let mut open = Vec::new();
        for _ in 0..n {
            let Ok(sock) = tokio::net::TcpSocket::new_v4() else { break };
            if sock.bind(source).is_err() {
                break;
            }
            let Ok(Ok(s)) =
                tokio::time::timeout(Duration::from_secs(5), sock.connect(([127, 0, 0, 1], port).into())).await
            else {
                continue;
            };
            let s = s.into_std().unwrap();
            s.set_nonblocking(false).unwrap();
            if !first.is_empty() {
                let _ = (&s).write_all(first);
            }
            open.push(s);
        }
        open
    })
}
