//! The configuration server end to end: a real `ferry config-server` process over TLS, driven with
//! curl (and the `ferry` CLI), on SQLite and on a throwaway PostgreSQL cluster — one conformance
//! suite for both.
//!
//! Size: one conformance suite run on both databases; it must stay one list to stay one contract.

use std::path::{Path, PathBuf};
use std::process::{Child, Command};
use std::time::{Duration, Instant};

use serde_json::{json, Value};

const FERRY: &str = env!("CARGO_BIN_EXE_ferry");

fn is_root() -> bool {
    Command::new("id").arg("-u").output().map(|o| String::from_utf8_lossy(&o.stdout).trim() == "0").unwrap_or(false)
}

/// A throwaway PostgreSQL cluster on a unix socket (initdb refuses root: run as `postgres`).
struct Postgres {
    dir: tempfile::TempDir,
    bin: PathBuf,
}

impl Postgres {
    fn find_bin() -> Option<PathBuf> {
        let mut candidates: Vec<PathBuf> =
            std::env::var_os("PATH").map(|p| std::env::split_paths(&p).collect()).unwrap_or_default();
        if let Ok(entries) = std::fs::read_dir("/usr/lib/postgresql") {
            let mut v: Vec<PathBuf> = entries.flatten().map(|e| e.path().join("bin")).collect();
            v.sort();
            v.reverse();
            candidates.extend(v);
        }
        candidates.into_iter().find(|d| d.join("initdb").is_file() && d.join("pg_ctl").is_file())
    }

    /// None only when FERRY_SKIP_POSTGRES=1 says to skip; otherwise missing binaries fail loudly.
    fn start() -> Option<Postgres> {
        let Some(bin) = Self::find_bin() else {
            if std::env::var("FERRY_SKIP_POSTGRES").as_deref() == Ok("1") {
                eprintln!("SKIPPED: PostgreSQL binaries not found and FERRY_SKIP_POSTGRES=1");
                return None;
            }
            panic!("PostgreSQL server binaries (initdb, pg_ctl) not found in PATH or /usr/lib/postgresql/*/bin: run ./test (it installs postgresql) or set FERRY_SKIP_POSTGRES=1 to skip these tests");
        };
        let dir = tempfile::Builder::new().prefix("ferry-pg-").tempdir().unwrap();
        let run = |args: &[&str]| {
            let mut cmd = if is_root() {
                let mut c = Command::new("runuser");
                c.args(["-u", "postgres", "--"]);
                c.arg(bin.join(args[0]));
                c
            } else {
                Command::new(bin.join(args[0]))
            };
            let out = cmd.args(&args[1..]).output().unwrap();
            assert!(
                out.status.success(),
                "{:?} failed: {}{}",
                args,
                String::from_utf8_lossy(&out.stdout),
                String::from_utf8_lossy(&out.stderr)
            );
        };
        if is_root() {
            Command::new("chown").arg("postgres").arg(dir.path()).status().unwrap();
        }
        let d = dir.path().display().to_string();
        run(&["initdb", "-D", &format!("{d}/data"), "-A", "trust", "-U", "ferry", "--no-sync"]);
        run(&[
            "pg_ctl",
            "-D",
            &format!("{d}/data"),
            "-o",
            &format!("-k {d} -c listen_addresses='' -c fsync=off"),
            "-l",
            &format!("{d}/log"),
            "-w",
            "start",
        ]);
        Some(Postgres { dir, bin })
    }

    fn url(&self) -> String {
        format!("postgres://ferry@localhost/postgres?host={}", self.dir.path().display())
    }
}

impl Drop for Postgres {
    fn drop(&mut self) {
        let d = self.dir.path().display().to_string();
        let mut cmd = if is_root() {
            let mut c = Command::new("runuser");
            c.args(["-u", "postgres", "--"]).arg(self.bin.join("pg_ctl"));
            c
        } else {
            Command::new(self.bin.join("pg_ctl"))
        };
        let _ = cmd.args(["-D", &format!("{d}/data"), "-m", "immediate", "stop"]).output();
    }
}

struct Server {
    child: Option<Child>,
    /// Bound by the test and handed to every start of the server (restarts keep the address).
    listener: std::net::TcpListener,
    port: u16,
    state: PathBuf,
    database: String,
    sets: Vec<String>,
    first: Value,
}

impl Server {
    fn start(state: &Path, database: &str, sets: &[&str]) -> Server {
        Self::start_on(crate::harness::listener(), state, database, sets)
    }

    /// On a listener the test bound (its address known before the server starts). An empty
    /// `database`: the default SQLite file in the state folder.
    fn start_on(listener: std::net::TcpListener, state: &Path, database: &str, sets: &[&str]) -> Server {
        let mut s = Server {
            child: None,
            port: crate::harness::port_of(&listener),
            listener,
            state: state.to_owned(),
            database: database.to_owned(),
            sets: sets.iter().map(|s| s.to_string()).collect(),
            first: Value::Null,
        };
        s.first = s.spawn();
        s
    }

    fn spawn(&mut self) -> Value {
        let listen = format!("127.0.0.1:{}", self.port);
        let state = self.state.to_string_lossy().into_owned();
        let mut args = vec!["--output", "json", "config-server", "--listen", &listen, "--state-dir", &state];
        if !self.database.is_empty() {
            args.extend(["--database", &self.database]);
        }
        for s in &self.sets {
            args.extend(["--set", s]);
        }
        let out = self.state.with_extension("out");
        let log = self.state.with_extension("log");
        let mut child = crate::harness::start_daemon(&args, &log, Some(&out), &[("listen", &self.listener)]);
        let first = crate::harness::first_line(&out, &mut child);
        self.child = Some(child);
        first
    }

    fn kill9(&mut self) {
        if let Some(mut c) = self.child.take() {
            let _ = c.kill();
            let _ = c.wait();
        }
    }

    fn restart(&mut self) -> Value {
        self.kill9();
        self.spawn()
    }

    fn ca(&self) -> PathBuf {
        self.state.join("tls/ca.pem")
    }

    fn admin(&self) -> String {
        self.first["admin_token"].as_str().unwrap().to_owned()
    }

    /// A request with curl (a real client): (status, JSON body).
    fn curl(&self, method: &str, path: &str, token: Option<&str>, body: Option<&str>) -> (u16, Value) {
        let mut cmd = Command::new("curl");
        cmd.args(["-s", "-w", "\n%{http_code}", "--cacert"]).arg(self.ca()).args(["-X", method]);
        if let Some(t) = token {
            cmd.args(["-H", &format!("Authorization: Bearer {t}")]);
        }
        if let Some(b) = body {
            // Through a file: bodies may exceed the argument-list limit.
            let f = tempfile::NamedTempFile::new().unwrap();
            std::fs::write(f.path(), b).unwrap();
            cmd.args(["-H", "Content-Type: application/json", "--data-binary"]).arg(format!("@{}", f.path().display()));
            let out = cmd.arg(format!("https://127.0.0.1:{}{path}", self.port)).output().unwrap();
            return parse_curl(&out.stdout);
        }
        cmd.arg(format!("https://127.0.0.1:{}{path}", self.port));
        let out = cmd.output().unwrap();
        parse_curl(&out.stdout)
    }

    fn ferry(&self, args: &[&str]) -> std::process::Output {
        Command::new(FERRY)
            .args(args)
            .env("FERRY_SERVER", format!("127.0.0.1:{}", self.port))
            .env("FERRY_TOKEN", self.admin())
            .env("FERRY_CA", self.ca())
            .output()
            .unwrap()
    }

    fn wait_job(&self, id: &str, states: &[&str]) -> Value {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let (code, j) = self.curl("GET", &format!("/api/v1/jobs/{id}"), Some(&self.admin()), None);
            assert_eq!(code, 200, "{j}");
            if states.contains(&j["state"].as_str().unwrap_or("")) {
                return j;
            }
            assert!(Instant::now() < deadline, "job {id} never reached {states:?}: {j:#}");
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

impl Drop for Server {
    fn drop(&mut self) {
        self.kill9();
    }
}

fn parse_curl(stdout: &[u8]) -> (u16, Value) {
    let text = String::from_utf8_lossy(stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), serde_json::from_str(body).unwrap_or(Value::String(body.to_owned())))
}

fn write_site(dir: &Path) -> PathBuf {
    let site = dir.join("site-a");
    for d in ["ds1", "vms/vm1", "vms/vm2", "retention", "cache"] {
        std::fs::create_dir_all(site.join(d)).unwrap();
    }
    for (vm, size) in [("vm1", 64 << 20), ("vm2", 32 << 20)] {
        std::fs::File::create(site.join(format!("vms/{vm}/disk0.img"))).unwrap().set_len(size).unwrap();
    }
    std::fs::write(
        site.join("site.toml"),
        r#"
[[hosts]]
name = "esx1"
edition = "ESXi 8.0"
licence = "enterprise"
tools = ["vmware-tools"]

[[hosts]]
name = "esx2"
edition = "ESXi 8.0"

[[datastores]]
name = "ds1"
kind = "vmfs"
path = "ds1"
hosts = ["esx1"]

[[datastores]]
name = "ds-ro"
kind = "nfs"
path = "missing"
hosts = ["esx1"]
access = "read-only"

[[networks]]
name = "prod"
subnet = "10.0.0.0/24"

[[machines]]
name = "vm1"
os_family = "linux"
host = "esx1"
power = "on"
nics = [{ network = "prod", addressing = "static", ip = "10.0.0.5" }]
disks = [{ name = "disk0", path = "vms/vm1/disk0.img", uuid = "6000C291-0001" }]

[[machines]]
name = "vm2"
os_family = "windows"
host = "esx1"
disks = [{ name = "disk0", path = "vms/vm2/disk0.img" }]

[[master_targets]]
name = "mt1"
os_family = "linux"
attached_disks = 3
enable_uuid = true
retention_volumes = ["retention"]

[[process_servers]]
name = "ps1"
cache = "cache"

[[credentials]]
name = "readonly"
user = "viewer"
read_only = true
"#,
    )
    .unwrap();
    site
}

/// The behaviour every database backend must have.
fn conformance(database: &str, dir: &Path) {
    let mut s = Server::start(
        &dir.join("state"),
        database,
        &[
            "heartbeat_timeout_secs = 1.5",
            "health_interval_secs = 0.3",
            "discovery_interval_secs = 1",
            &format!("site_root = '{}'", dir.display()),
        ],
    );
    let admin = s.admin();
    let a = Some(admin.as_str());
    assert!(s.first["ca_fingerprint"].as_str().unwrap().len() == 64);
    assert!(s.first["registration_passphrase"].is_string());

    // Server identity and the OpenAPI document (committed; drift fails).
    let (code, info) = s.curl("GET", "/api/v1/server", None, None);
    assert_eq!(code, 200);
    assert_eq!(info["database"], if database.starts_with("postgres") { "postgres" } else { "sqlite" });
    let (_, doc) = s.curl("GET", "/api/v1/openapi.json", None, None);
    let committed: Value = serde_json::from_str(
        &std::fs::read_to_string(concat!(env!("CARGO_MANIFEST_DIR"), "/../../docs/openapi/config-server.json"))
            .unwrap(),
    )
    .unwrap();
    assert_eq!(doc, committed, "the server serves another document than docs/openapi/config-server.json: run `UPDATE_OPENAPI=1 cargo test -p ferry-api`");
    // Every documented route exists (no fallback 404).
    for (path, ops) in doc["paths"].as_object().unwrap() {
        for method in ops.as_object().unwrap().keys() {
            let p = path.replace("{name}", "nosuch").replace("{id}", "nosuch");
            let (code, v) = s.curl(
                &method.to_uppercase(),
                &p,
                Some("fy_invalid"),
                if method == "post" || method == "put" { Some("{}") } else { None },
            );
            assert!(
                v.get("message").is_none_or(|m| !m.as_str().unwrap_or("").contains("no such API route")),
                "{method} {path}: {code} {v}"
            );
        }
    }

    // Authentication and roles.
    assert_eq!(s.curl("GET", "/api/v1/policies", None, None).0, 401);
    assert_eq!(s.curl("GET", "/api/v1/policies", Some("fy_wrong"), None).0, 401);
    let (code, reader) = s.curl("POST", "/api/v1/tokens", a, Some(r#"{"name": "auditor", "role": "reader"}"#));
    assert_eq!(code, 201, "{reader}");
    let reader = reader["token"].as_str().unwrap().to_owned();
    assert_eq!(s.curl("GET", "/api/v1/policies", Some(&reader), None).0, 200, "a reader sees everything");
    let (code, v) = s.curl("POST", "/api/v1/policies", Some(&reader), Some(r#"{"name": "x"}"#));
    assert_eq!(code, 403, "{v}");
    assert_eq!(v["code"], 9021);
    assert_eq!(s.curl("GET", "/api/v1/tokens", Some(&reader), None).0, 403);

    // Policies (POL-1, POL-2).
    let (code, v) = s.curl(
        "POST",
        "/api/v1/policies",
        a,
        Some(r#"{"name": "gold", "rpo_threshold_secs": 600, "retention_secs": 7200, "app_consistent_secs": 1800}"#),
    );
    assert_eq!(code, 201, "{v}");
    let (code, fb) = s.curl("GET", "/api/v1/policies/gold-failback", a, None);
    assert_eq!(code, 200);
    assert_eq!(
        (
            fb["rpo_threshold_secs"].as_u64(),
            fb["retention_secs"].as_u64(),
            fb["app_consistent_secs"].as_u64(),
            fb["read_only"].as_bool()
        ),
        (Some(900), Some(86400), Some(3600), Some(true))
    );
    let (code, v) = s.curl(
        "PUT",
        "/api/v1/policies/gold-failback",
        a,
        Some(r#"{"name": "gold-failback", "rpo_threshold_secs": 60}"#),
    );
    assert_eq!(code, 409, "{v}");
    assert_eq!(v["code"], 9022);
    assert!(v["message"].as_str().unwrap().contains("read-only"), "{v}");
    assert_eq!(s.curl("POST", "/api/v1/policies", a, Some(r#"{"name": "gold"}"#)).0, 409);
    let (code, v) = s.curl("PUT", "/api/v1/policies/gold", a, Some(r#"{"name": "gold", "rpo_threshold_secs": 300}"#));
    assert_eq!(code, 200, "{v}");
    // Numbers no policy can mean are refused, naming the field (u64::MAX once reached the agents).
    let huge = format!(r#"{{"name": "huge", "retention_secs": {}}}"#, u64::MAX);
    let (code, v) = s.curl("POST", "/api/v1/policies", a, Some(&huge));
    assert_eq!(code, 400, "{v}");
    assert!(
        v["message"].as_str().unwrap().contains("retention_secs") && v["message"].as_str().unwrap().contains("maximum"),
        "{v}"
    );
    assert_eq!(s.curl("GET", "/api/v1/policies/huge", a, None).0, 404);
    // Settings pushed to a component are range-checked too.
    let (code, v) =
        s.curl("PUT", "/api/v1/components/agent/vm9/settings", a, Some(r#"{"crash_point_interval_secs": 1e300}"#));
    assert_eq!(code, 422, "{v}");
    assert!(v["message"].as_str().unwrap().contains("not a number of seconds"), "{v}");
    // A size the agent would refuse at its next start (it would not come up again).
    let (code, v) = s.curl("PUT", "/api/v1/components/agent/vm9/settings", a, Some(r#"{"batch_bytes": 0}"#));
    assert!((400..500).contains(&code) && v["message"].as_str().unwrap().contains("out of range"), "{code} {v}");

    // Bad input: 4xx with a JSON error; the server keeps serving.
    for (body, what) in [
        ("{not json", "malformed JSON"),
        (r#"{"name": 5}"#, "wrong type"),
        (r#"{"name": "p", "bogus": 1}"#, "unknown field"),
        (r#"{"name": "../etc"}"#, "path-like name"),
        (r#"{"name": "a/b"}"#, "slash"),
    ] {
        let (code, v) = s.curl("POST", "/api/v1/policies", a, Some(body));
        assert!((400..500).contains(&code), "{what}: {code} {v}");
        assert!(v["code"].is_u64() && v["message"].is_string() && v["remedy"].is_string(), "{what}: {v}");
    }
    let big = format!(r#"{{"name": "{}"}}"#, "x".repeat(2 << 20));
    let (code, v) = s.curl("POST", "/api/v1/policies", a, Some(&big));
    assert_eq!(code, 413, "{v}");
    // Refused on Content-Length, before `100 Continue`: every try gets the JSON error, never a
    // reset connection or the interim 100.
    let huge = format!(r#"{{"name": "{}"}}"#, "x".repeat(4 << 20));
    for i in 0..20 {
        let (code, v) = s.curl("POST", "/api/v1/policies", a, Some(&huge));
        assert_eq!(code, 413, "try {i}: {v}");
        assert_eq!(v["code"], 9028, "try {i}: {v}");
    }
    assert_eq!(s.curl("GET", "/api/v1/policies/nosuch", a, None).0, 404);
    assert_eq!(s.curl("GET", "/api/v1/jobs/nosuch", a, None).0, 404);
    assert_eq!(s.curl("GET", "/api/v1/nothing/here", a, None).0, 404);

    // Sites and discovery (a job), inventory.
    let site = write_site(dir);
    let (code, v) = s.curl("POST", "/api/v1/sites", a, Some(&json!({"name": "site-a", "path": site}).to_string()));
    assert_eq!(code, 201, "{v}");
    let job = s.wait_job(v["job"]["id"].as_str().unwrap(), &["succeeded", "failed"]);
    assert_eq!(job["state"], "succeeded", "{job:#}");
    let (_, inv) = s.curl("GET", "/api/v1/inventory", a, None);
    let c = &inv[0]["content"];
    assert_eq!(c["machines"][0]["disks"][0]["size"], 64 << 20);
    assert_eq!(c["datastores"][1]["accessible"], false);
    assert_eq!(c["credentials"][0]["read_only"], true);
    assert!(c["process_servers"][0]["cache_free_percent"].as_f64().is_some());
    assert!(inv[0]["warnings"].to_string().contains("8061"), "{inv:#}");
    // Periodic rediscovery: a retention volume added to the site shows up by itself (MT-5).
    std::fs::create_dir_all(site.join("retention2")).unwrap();
    let toml = std::fs::read_to_string(site.join("site.toml"))
        .unwrap()
        .replace(r#"retention_volumes = ["retention"]"#, r#"retention_volumes = ["retention", "retention2"]"#);
    std::fs::write(site.join("site.toml"), toml).unwrap();
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let (_, inv) = s.curl("GET", "/api/v1/inventory", a, None);
        if inv[0]["content"]["master_targets"][0]["retention_volumes"].to_string().contains("retention2") {
            break;
        }
        assert!(Instant::now() < deadline, "the new retention volume never showed: {inv:#}");
        std::thread::sleep(Duration::from_millis(200));
    }
    let out = s.ferry(&["inventory"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("vm1"), "{}", String::from_utf8_lossy(&out.stderr));

    // Replication groups (RG-1) and recovery plans (limits).
    let (code, v) =
        s.curl("POST", "/api/v1/replication-groups", a, Some(r#"{"name": "mixed", "machines": ["vm1", "vm2"]}"#));
    assert_eq!(code, 400, "{v}");
    assert_eq!(v["code"], 9030);
    let (code, v) = s.curl(
        "POST",
        "/api/v1/replication-groups",
        a,
        Some(r#"{"name": "web", "machines": ["vm1", "vm3"], "policy": "gold"}"#),
    );
    assert_eq!(code, 201, "{v}");
    let (code, v) = s.curl("POST", "/api/v1/replication-groups", a, Some(r#"{"name": "web2", "machines": ["vm3"]}"#));
    assert_eq!(code, 409, "a machine in two replication groups: {v}");
    let eight: Vec<Value> = (0..8).map(|i| json!({"machines": [format!("m{i}")]})).collect();
    let (code, v) =
        s.curl("POST", "/api/v1/recovery-plans", a, Some(&json!({"name": "big", "groups": eight}).to_string()));
    assert_eq!((code, v["code"].as_u64()), (400, Some(9023)), "{v}");
    let many: Vec<String> = (0..101).map(|i| format!("m{i}")).collect();
    let (code, v) = s.curl(
        "POST",
        "/api/v1/recovery-plans",
        a,
        Some(&json!({"name": "big", "groups": [{"machines": many}]}).to_string()),
    );
    assert_eq!((code, v["code"].as_u64()), (400, Some(9023)), "{v}");
    let (code, v) = s.curl(
        "POST",
        "/api/v1/recovery-plans",
        a,
        Some(r#"{"name": "dup", "groups": [{"replication_groups": ["web"]}, {"machines": ["vm1"]}]}"#),
    );
    assert_eq!((code, v["code"].as_u64()), (400, Some(9023)), "a machine in two groups of a plan: {v}");
    let plan = json!({"name": "dr", "groups": [
        {"replication_groups": ["web"], "pre_actions": [{"kind": "script", "name": "notify", "command": format!("echo pre >> {}/actions.log", dir.display())}],
         "post_actions": [{"kind": "manual", "name": "check dns", "instruction": "check that www resolves to the recovery site"}]},
        {"machines": ["db1"], "post_actions": [{"kind": "script", "name": "fail", "command": "echo broken >&2; exit 4"}]}
    ]});
    let (_, op) = s.curl("POST", "/api/v1/tokens", a, Some(r#"{"name": "ops", "role": "operator"}"#));
    let op = op["token"].as_str().unwrap().to_owned();
    let (code, v) = s.curl("POST", "/api/v1/recovery-plans", Some(&op), Some(&plan.to_string()));
    assert_eq!(code, 403, "script actions run on the server: admins only: {v}");
    // Settings are allow-listed per kind and role: an operator cannot make an agent run a
    // command, and nobody points a component at other disks, addresses or peers.
    let settings = "/api/v1/components/agent/vm9/settings";
    let (code, v) = s.curl("PUT", settings, Some(&op), Some(r#"{"freeze_command": "id > /tmp/owned"}"#));
    assert_eq!((code, v["code"].as_u64()), (403, Some(9021)), "{v}");
    for body in [
        r#"{"disks": [{"name": "disk0", "path": "/etc/shadow"}]}"#,
        r#"{"nbd_listen": "0.0.0.0:10809"}"#,
        r#"{"process_server": "203.0.113.9:7200"}"#,
        r#"{"source_write_log": "/tmp/copy"}"#,
        r#"{"no_such_key": 1}"#,
    ] {
        for token in [&op, &s.admin()] {
            let (code, v) = s.curl("PUT", settings, Some(token), Some(body));
            assert_eq!(code, 400, "{body}: {v}");
        }
    }
    let (code, v) =
        s.curl("PUT", "/api/v1/components/process-server/ps1/settings", Some(&op), Some(r#"{"policy": "gold"}"#));
    assert_eq!(code, 400, "a process server has no policy setting: {v}");
    let (code, v) = s.curl("PUT", settings, a, Some(r#"{"freeze_command": "true", "policy": "gold"}"#));
    assert_eq!(code, 200, "an admin may set a hook: {v}");
    let (code, v) = s.curl("PUT", settings, Some(&op), Some(r#"{"policy": "gold", "crash_point_interval_secs": 60}"#));
    assert_eq!(code, 200, "{v}");
    let (code, v) = s.curl("POST", "/api/v1/recovery-plans", a, Some(&plan.to_string()));
    assert_eq!(code, 201, "{v}");
    // Two confirmations in a row confirm one manual action, not the next one too.
    let two = json!({"name": "two-checks", "groups": [{"machines": ["vm9"], "pre_actions": [
        {"kind": "manual", "name": "first", "instruction": "a"}, {"kind": "manual", "name": "second", "instruction": "b"}]}]});
    assert_eq!(s.curl("POST", "/api/v1/recovery-plans", Some(&op), Some(&two.to_string())).0, 201);
    let (_, job) = s.curl("POST", "/api/v1/recovery-plans/two-checks/drill", Some(&op), None);
    let tid = job["id"].as_str().unwrap().to_owned();
    s.wait_job(&tid, &["waiting-for-input"]);
    // The same confirmation twice (a double click): the second confirms nothing.
    let first = s.wait_job(&tid, &["waiting-for-input"])["current_step"].clone();
    let body = json!({ "step": first }).to_string();
    assert_eq!(s.curl("POST", &format!("/api/v1/jobs/{tid}/confirm"), Some(&op), Some(&body)).0, 200);
    std::thread::sleep(Duration::from_millis(300));
    let (code, v) = s.curl("POST", &format!("/api/v1/jobs/{tid}/confirm"), Some(&op), Some(&body));
    assert_eq!(code, 409, "{v}");
    std::thread::sleep(Duration::from_millis(300));
    let j = s.wait_job(&tid, &["waiting-for-input", "succeeded"]);
    assert_eq!(j["state"], "waiting-for-input", "the second manual action still waits: {j:#}");
    assert!(j["input_prompt"].as_str().unwrap().contains("second"), "{j:#}");
    assert_eq!(s.curl("POST", &format!("/api/v1/jobs/{tid}/confirm"), Some(&op), None).0, 200);
    assert_eq!(s.wait_job(&tid, &["succeeded", "failed"])["state"], "succeeded");

    // A drill: script runs, manual action waits for input, confirm, the failing script fails the job.
    let (code, job) = s.curl("POST", "/api/v1/recovery-plans/dr/drill", a, None);
    assert_eq!(code, 202, "{job}");
    let id = job["id"].as_str().unwrap().to_owned();
    let j = s.wait_job(&id, &["waiting-for-input", "failed"]);
    assert_eq!(j["state"], "waiting-for-input", "{j:#}");
    assert!(j["input_prompt"].as_str().unwrap().contains("check dns"));
    assert_eq!(std::fs::read_to_string(dir.join("actions.log")).unwrap().trim(), "pre");
    // Waiting jobs survive a SIGKILL of the server.
    s.restart();
    let j = s.wait_job(&id, &["waiting-for-input"]);
    assert_eq!(j["resumes"], 1, "{j:#}");
    assert_eq!(s.curl("POST", &format!("/api/v1/jobs/{id}/confirm"), Some(&reader), None).0, 403);
    let (code, v) = s.curl("POST", &format!("/api/v1/jobs/{id}/confirm"), a, None);
    assert_eq!(code, 200, "{v}");
    let j = s.wait_job(&id, &["failed", "succeeded"]);
    assert_eq!(j["state"], "failed", "{j:#}");
    assert!(
        j["error"]["message"].as_str().unwrap().contains("exit status: 4") && j["error"]["remedy"].is_string(),
        "{j:#}"
    );
    assert!(j["steps"].as_array().unwrap().iter().filter(|st| st["state"] == "done").count() >= 3, "{j:#}");

    // Registration: wrong passphrase refused; right one gives a CA-signed certificate; heartbeats.
    let certs = dir.join("agent-certs");
    let fp = s.first["ca_fingerprint"].as_str().unwrap().to_owned();
    let server = format!("127.0.0.1:{}", s.port);
    let reg = |pass: &str, fingerprint: &str| {
        Command::new(FERRY)
            .args([
                "register",
                "--server",
                &server,
                "--ca-fingerprint",
                fingerprint,
                "--passphrase",
                pass,
                "--kind",
                "agent",
                "--name",
                "vm1",
                "--host",
                "vm1.example.net",
                "--dir",
            ])
            .arg(&certs)
            .output()
            .unwrap()
    };
    let out = reg("wrong words", &fp);
    assert!(
        !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("passphrase"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = reg(s.first["registration_passphrase"].as_str().unwrap(), &"0".repeat(64));
    assert!(
        !out.status.success() && String::from_utf8_lossy(&out.stderr).contains("fingerprint"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let out = reg(s.first["registration_passphrase"].as_str().unwrap(), &fp);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let verify =
        Command::new("openssl").arg("verify").arg("-CAfile").arg(s.ca()).arg(certs.join("agent.pem")).output().unwrap();
    assert!(verify.status.success(), "{}", String::from_utf8_lossy(&verify.stdout));
    let text =
        Command::new("openssl").args(["x509", "-noout", "-text", "-in"]).arg(certs.join("agent.pem")).output().unwrap();
    let text = String::from_utf8_lossy(&text.stdout);
    assert!(
        text.contains("CN = agent/vm1") && text.contains("DNS:vm1.example.net"),
        "the server chooses the names: {text}"
    );
    let comp_token = std::fs::read_to_string(certs.join("config-server.token")).unwrap();
    let (code, v) = s.curl(
        "POST",
        "/api/v1/heartbeats",
        Some(&comp_token),
        Some(&agent_heartbeat("vm1", Some("gold"), |a| {
            a.lag_seconds = 1000.0;
            a.applied_seq = 5;
        })),
    );
    assert_eq!(code, 200, "{v}");
    let (code, v) =
        s.curl("POST", "/api/v1/heartbeats", Some(&comp_token), Some(r#"{"kind": "agent", "name": "vm2"}"#));
    assert_eq!(code, 403, "a component speaks for itself only: {v}");
    assert_eq!(s.curl("POST", "/api/v1/policies", Some(&comp_token), Some(r#"{"name": "c"}"#)).0, 403);
    let (_, comps) = s.curl("GET", "/api/v1/components", a, None);
    assert_eq!(comps[0]["health"], "warning", "lag 1000 s above gold's RPO of 300 s: {comps:#}");
    s.curl("POST", "/api/v1/heartbeats", a, Some(&process_server_heartbeat("ps1", 10)));
    let (_, comps) = s.curl("GET", "/api/v1/components", a, None);
    let ps = comps.as_array().unwrap().iter().find(|c| c["kind"] == "process-server").unwrap();
    assert_eq!(ps["health"], "critical", "{ps:#}");
    // Missing heartbeats: 78174 for the agent, 806 for the process server, as events too.
    std::thread::sleep(Duration::from_millis(2500));
    let (_, comps) = s.curl("GET", "/api/v1/components", a, None);
    let codes = comps.to_string();
    assert!(codes.contains("78174") && codes.contains("806"), "{comps:#}");
    let deadline = Instant::now() + Duration::from_secs(10);
    loop {
        let (_, ev) = s.curl("GET", "/api/v1/events", a, None);
        if ev.to_string().contains("78174") {
            break;
        }
        assert!(Instant::now() < deadline, "no heartbeat event: {ev:#}");
        std::thread::sleep(Duration::from_millis(200));
    }

    // Backup while writes happen, then restore: consistent data, same identity.
    let writer = {
        let (port, ca, token) = (s.port, s.ca(), admin.clone());
        std::thread::spawn(move || {
            for i in 0..20 {
                let _ = Command::new("curl")
                    .args(["-s", "-o", "/dev/null", "--cacert"])
                    .arg(&ca)
                    .args(["-H", &format!("Authorization: Bearer {token}"), "-H", "Content-Type: application/json"])
                    .args(["--data-binary", &format!(r#"{{"name": "bulk{i}"}}"#)])
                    .arg(format!("https://127.0.0.1:{port}/api/v1/policies"))
                    .output();
            }
        })
    };
    let out = s.ferry(&["--output", "json", "backup"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    writer.join().unwrap();
    let job: Value = serde_json::from_slice(&out.stdout).unwrap();
    let msg = job["steps"][0]["message"].as_str().unwrap();
    let file = PathBuf::from(msg.trim_start_matches("backup written to "));
    let raw = std::fs::read(&file).unwrap();
    assert!(
        !raw.windows(4).any(|w| w == b"gold") && !raw.windows(10).any(|w| w == b"BEGIN PRIV"),
        "the backup is encrypted"
    );
    let (_, before) = s.curl("GET", "/api/v1/policies", a, None);
    s.curl("POST", "/api/v1/policies", a, Some(r#"{"name": "after-backup"}"#));
    s.kill9();
    // Never while a server runs on the state folder.
    s.spawn();
    let live = Command::new(FERRY)
        .args(["config-server", "restore", "--database", database, "--from"])
        .arg(&file)
        .arg("--state-dir")
        .arg(&s.state)
        .output()
        .unwrap();
    assert!(
        !live.status.success() && String::from_utf8_lossy(&live.stderr).contains("in use"),
        "{}",
        String::from_utf8_lossy(&live.stderr)
    );
    s.kill9();
    let out = Command::new(FERRY)
        .args(["config-server", "restore", "--database", database, "--from"])
        .arg(&file)
        .arg("--state-dir")
        .arg(&s.state)
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let again = s.spawn();
    assert_eq!(again["ca_fingerprint"], s.first["ca_fingerprint"], "a restored server keeps its identity");
    assert!(again["admin_token"].is_null(), "tokens were restored: no new admin token");
    let (code, after) = s.curl("GET", "/api/v1/policies", a, None);
    assert_eq!(code, 200, "{after}");
    let names =
        |v: &Value| v.as_array().unwrap().iter().map(|p| p["name"].as_str().unwrap().to_owned()).collect::<Vec<_>>();
    assert!(!names(&after).contains(&"after-backup".to_owned()));
    assert!(names(&after).contains(&"gold".to_owned()) && names(&after).contains(&"gold-failback".to_owned()));
    // Every forward policy in the backup has its failback policy: a consistent snapshot.
    for n in names(&after).iter().filter(|n| !n.ends_with("-failback")) {
        assert!(names(&after).contains(&format!("{n}-failback")), "{n} without its failback policy in the backup");
    }
    assert!(names(&after).len() <= names(&before).len() + 1);
    // Components re-report; a difference from the restored records is an event.
    s.curl(
        "POST",
        "/api/v1/heartbeats",
        Some(&comp_token),
        Some(&agent_heartbeat("vm1", None, |a| a.applied_seq = 99)),
    );
    s.curl("POST", "/api/v1/heartbeats", a, Some(r#"{"kind": "master-target", "name": "mt-new"}"#));
    let (_, ev) = s.curl("GET", "/api/v1/events", a, None);
    let ev = ev.to_string();
    assert!(ev.contains("moved on since the backup") && ev.contains("not in the restored configuration"), "{ev}");
}

#[test]
fn config_server_conformance_on_sqlite() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("ferry.db");
    conformance(db.to_str().unwrap(), dir.path());
}

#[test]
fn config_server_conformance_on_postgres() {
    let Some(pg) = Postgres::start() else { return };
    let dir = tempfile::tempdir().unwrap();
    conformance(&pg.url(), dir.path());
}

#[test]
fn a_job_interrupted_by_sigkill_is_failed_with_a_reason_never_stuck() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("ferry.db");
    let mut s = Server::start(&dir.path().join("state"), db.to_str().unwrap(), &[]);
    let a = s.admin();
    let plan = json!({"name": "slow", "groups": [{"machines": ["vm1"], "pre_actions": [{"kind": "script", "name": "long", "command": "sleep 30"}]}]});
    assert_eq!(s.curl("POST", "/api/v1/recovery-plans", Some(&a), Some(&plan.to_string())).0, 201);
    let (_, job) = s.curl("POST", "/api/v1/recovery-plans/slow/drill", Some(&a), None);
    let id = job["id"].as_str().unwrap().to_owned();
    let j = s.wait_job(&id, &["in-progress"]);
    assert_eq!(j["steps"][0]["state"], "running");
    std::thread::sleep(Duration::from_millis(300));
    s.restart();
    let j = s.wait_job(&id, &["failed", "succeeded", "cancelled"]);
    assert_eq!(j["state"], "failed", "{j:#}");
    assert!(j["error"]["message"].as_str().unwrap().contains("restarted while step"), "{j:#}");
    // Cancelling a running job kills its script.
    let (_, job) = s.curl("POST", "/api/v1/recovery-plans/slow/drill", Some(&a), None);
    let id = job["id"].as_str().unwrap().to_owned();
    s.wait_job(&id, &["in-progress"]);
    let t = Instant::now();
    assert_eq!(s.curl("POST", &format!("/api/v1/jobs/{id}/cancel"), Some(&a), None).0, 200);
    let j = s.wait_job(&id, &["cancelled", "failed"]);
    assert_eq!(j["state"], "cancelled", "{j:#}");
    assert!(t.elapsed() < Duration::from_secs(10));
    let (code, v) = s.curl("POST", &format!("/api/v1/jobs/{id}/cancel"), Some(&a), None);
    assert_eq!(code, 409, "{v}");
    // The CLI shows jobs.
    let out = s.ferry(&["jobs", "list"]);
    assert!(String::from_utf8_lossy(&out.stdout).contains("cancelled"), "{}", String::from_utf8_lossy(&out.stdout));
}

#[test]
fn registration_guessing_is_throttled_and_reregistration_revokes_the_old_token() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("ferry.db");
    let s = Server::start(&dir.path().join("state"), db.to_str().unwrap(), &[]);
    let fp = s.first["ca_fingerprint"].as_str().unwrap().to_owned();
    let server = format!("127.0.0.1:{}", s.port);
    let pass = s.first["registration_passphrase"].as_str().unwrap().to_owned();
    let reg = |dir: &Path| {
        Command::new(FERRY)
            .args(["register", "--server", &server, "--ca-fingerprint", &fp, "--passphrase", &pass])
            .args(["--kind", "master-target", "--name", "mt1", "--dir"])
            .arg(dir)
            .output()
            .unwrap()
    };
    assert!(reg(&dir.path().join("first")).status.success());
    let old = std::fs::read_to_string(dir.path().join("first/config-server.token")).unwrap();
    let hb = r#"{"kind": "master-target", "name": "mt1"}"#;
    assert_eq!(s.curl("POST", "/api/v1/heartbeats", Some(&old), Some(hb)).0, 200);
    assert!(reg(&dir.path().join("second")).status.success());
    let new = std::fs::read_to_string(dir.path().join("second/config-server.token")).unwrap();
    assert_eq!(s.curl("POST", "/api/v1/heartbeats", Some(&old), Some(hb)).0, 401, "the earlier token is revoked");
    assert_eq!(s.curl("POST", "/api/v1/heartbeats", Some(&new), Some(hb)).0, 200);
    // Guessing is throttled per source: guesses from 127.0.0.2 lock out 127.0.0.2 only.
    let body = r#"{"kind": "agent", "name": "x", "passphrase": "guess", "csr": "-"}"#;
    let guess_from = |source: &str| -> u16 {
        let out = Command::new("curl")
            .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "--interface", source, "--cacert"])
            .arg(s.ca())
            .args(["-X", "POST", "-H", "Content-Type: application/json", "--data-binary", body])
            .arg(format!("https://127.0.0.1:{}/api/v1/register", s.port))
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().parse().unwrap_or(0)
    };
    let codes: Vec<u16> = (0..12).map(|_| guess_from("127.0.0.2")).collect();
    assert!(codes[..10].iter().all(|c| *c == 403) && codes[10..].iter().all(|c| *c == 429), "{codes:?}");
    assert_eq!(guess_from("127.0.0.3"), 403, "another source is not locked out: its guess is judged");
    assert!(reg(&dir.path().join("third")).status.success(), "the right passphrase is served from another source");
    // The server chooses the names: no certificate may name another component or this server.
    let claim = |kind: &str, name: &str, host: Option<&str>| {
        let mut cmd = Command::new(FERRY);
        cmd.args(["register", "--server", &server, "--ca-fingerprint", &fp, "--passphrase", &pass])
            .args(["--kind", kind, "--name", name, "--dir"])
            .arg(dir.path().join(format!("claim-{kind}-{name}")));
        if let Some(h) = host {
            cmd.args(["--host", h]);
        }
        cmd.output().unwrap()
    };
    for (kind, name, host, why) in [
        ("agent", "app1", Some("mt1"), "the name of master-target mt1"),
        ("agent", "app1", Some("config-server"), "reserved"),
        ("agent", "process-server", None, "reserved"),
        ("process-server", "MT1", None, "the name of master-target mt1"),
    ] {
        let out = claim(kind, name, host);
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success() && err.contains(why), "{kind} {name} {host:?}: {err}");
    }
}

#[test]
fn adopts_the_ferry_certs_ca_rotates_the_passphrase_and_keeps_scheduled_backups() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    assert!(Command::new(FERRY).args(["certs", "--dir"]).arg(&certs).output().unwrap().status.success());
    let db = dir.path().join("ferry.db");
    let state = dir.path().join("state");
    let certs_set = format!("certs = '{}'", certs.display());
    let s = Server::start(&state, db.to_str().unwrap(), &[&certs_set, "backup_interval_secs = 0.5", "backup_keep = 2"]);
    // The CA of `ferry certs` is the server's CA: data-path certificates and registrations share it.
    let pem = std::fs::read_to_string(certs.join("ca.pem")).unwrap();
    let fp = Command::new("openssl")
        .args(["x509", "-noout", "-fingerprint", "-sha256", "-in"])
        .arg(certs.join("ca.pem"))
        .output()
        .unwrap();
    let fp = String::from_utf8_lossy(&fp.stdout).split('=').nth(1).unwrap().trim().replace(':', "").to_lowercase();
    assert_eq!(s.first["ca_fingerprint"].as_str().unwrap(), fp, "{pem}");
    // Rotation: the old passphrase stops working, the new one works.
    let old = s.first["registration_passphrase"].as_str().unwrap().to_owned();
    let (code, v) = s.curl("POST", "/api/v1/registration/passphrase", Some(&s.admin()), None);
    assert_eq!(code, 200, "{v}");
    let new = v["passphrase"].as_str().unwrap().to_owned();
    let server = format!("127.0.0.1:{}", s.port);
    let reg = |pass: &str, sub: &str| {
        Command::new(FERRY)
            .args([
                "register",
                "--server",
                &server,
                "--ca-fingerprint",
                &fp,
                "--passphrase",
                pass,
                "--kind",
                "agent",
                "--name",
                "vm7",
                "--dir",
            ])
            .arg(dir.path().join(sub))
            .output()
            .unwrap()
    };
    assert!(!reg(&old, "a").status.success());
    assert!(reg(&new, "b").status.success());
    // Scheduled backups, the newest two kept.
    std::thread::sleep(Duration::from_secs(3));
    let files: Vec<_> = std::fs::read_dir(state.join("backups"))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().ends_with(".bak"))
        .collect();
    assert_eq!(files.len(), 2, "{files:?}");
}

#[test]
fn provider_operations_change_real_files() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("ferry.db");
    let root = format!("site_root = '{}'", dir.path().display());
    let s = Server::start(&dir.path().join("state"), db.to_str().unwrap(), &[&root]);
    let a = s.admin();
    let site = write_site(dir.path());
    let (code, v) =
        s.curl("POST", "/api/v1/sites", Some(&a), Some(&json!({"name": "site-a", "path": site}).to_string()));
    assert_eq!(code, 201, "{v}");
    s.wait_job(v["job"]["id"].as_str().unwrap(), &["succeeded"]);
    let op = |body: Value| -> Value {
        let (code, job) = s.curl("POST", "/api/v1/sites/site-a/operations", Some(&a), Some(&body.to_string()));
        assert_eq!(code, 202, "{job}");
        s.wait_job(job["id"].as_str().unwrap(), &["succeeded", "failed"])
    };
    let machine = |name: &str| -> Value {
        let (_, inv) = s.curl("GET", "/api/v1/inventory", Some(&a), None);
        inv[0]["content"]["machines"]
            .as_array()
            .unwrap()
            .iter()
            .find(|m| m["name"] == name)
            .cloned()
            .unwrap_or(Value::Null)
    };
    // Create: sparse disk files on the datastore, visible in the inventory.
    let j = op(
        json!({"op": "create-machine", "machine": "vm5", "host": "esx1", "datastore": "ds1", "os_family": "linux", "disks": [{"name": "disk0", "size": 8 << 20}]}),
    );
    assert_eq!(j["state"], "succeeded", "{j:#}");
    let disk = site.join("ds1/vm5/disk0.img");
    assert_eq!(std::fs::metadata(&disk).unwrap().len(), 8 << 20);
    assert_eq!(machine("vm5")["disks"][0]["size"], 8 << 20);
    // A datastore the host does not mount: 8061.
    let j = op(
        json!({"op": "create-machine", "machine": "vm6", "host": "esx2", "datastore": "ds1", "os_family": "linux", "disks": []}),
    );
    assert_eq!((j["state"].as_str(), j["error"]["code"].as_u64()), (Some("failed"), Some(8061)), "{j:#}");
    // Power.
    assert_eq!(op(json!({"op": "power-on", "machine": "vm5"}))["state"], "succeeded");
    assert_eq!(machine("vm5")["power"], "on");
    let j = op(json!({"op": "delete-machine", "machine": "vm5"}));
    assert!(j["error"]["message"].as_str().unwrap().contains("powered on"), "{j:#}");
    assert_eq!(op(json!({"op": "power-off", "machine": "vm5"}))["state"], "succeeded");
    // Snapshots: writes land in the overlay; merging commits them into the disk.
    assert_eq!(op(json!({"op": "create-snapshot", "machine": "vm5"}))["state"], "succeeded");
    let overlay = site.join("ds1/vm5/disk0.snap1.qcow2");
    let w = Command::new("qemu-io").args(["-f", "qcow2", "-c", "write -P 0x77 0 1M"]).arg(&overlay).output().unwrap();
    assert!(w.status.success(), "{}", String::from_utf8_lossy(&w.stderr));
    assert_eq!(machine("vm5")["snapshots"], json!(["snap1"]));
    let j = op(json!({"op": "merge-snapshots", "machine": "vm5"}));
    assert_eq!(j["state"], "succeeded", "{j:#}");
    assert!(!overlay.exists());
    let r = Command::new("qemu-io").args(["-f", "raw", "-c", "read -P 0x77 0 1M"]).arg(&disk).output().unwrap();
    let text = String::from_utf8_lossy(&r.stdout);
    assert!(
        r.status.success() && text.contains("read 1048576/1048576") && !text.contains("Pattern verification failed"),
        "merged data is in the disk: {text}"
    );
    assert_eq!(machine("vm5")["snapshots"], json!([]));
    // Attach / detach to a master target.
    let rel = "ds1/vm5/disk0.img";
    assert_eq!(op(json!({"op": "attach-disk", "master_target": "mt1", "disk": rel}))["state"], "succeeded");
    let (_, inv) = s.curl("GET", "/api/v1/inventory", Some(&a), None);
    assert_eq!(inv[0]["content"]["master_targets"][0]["attached_disks"], 4);
    assert_eq!(
        op(json!({"op": "attach-disk", "master_target": "mt1", "disk": rel}))["state"],
        "failed",
        "attached once only"
    );
    assert_eq!(op(json!({"op": "detach-disk", "master_target": "mt1", "disk": rel}))["state"], "succeeded");
    assert_eq!(op(json!({"op": "attach-disk", "master_target": "mt1", "disk": "../outside.img"}))["state"], "failed");
    // Delete removes the files.
    assert_eq!(op(json!({"op": "delete-machine", "machine": "vm5"}))["state"], "succeeded");
    assert!(!disk.exists());
    assert!(machine("vm5").is_null());
    // Unknown operations are refused up front.
    let (code, v) = s.curl("POST", "/api/v1/sites/site-a/operations", Some(&a), Some(r#"{"op": "explode"}"#));
    assert_eq!(code, 422, "{v}");
}

/// A heartbeat of agent `name` whose status `f` fills in (the rest as a fresh agent's).
fn agent_heartbeat(name: &str, policy: Option<&str>, f: impl FnOnce(&mut ferry_api::agent::AgentStatus)) -> String {
    let mut st = ferry_api::agent::AgentStatus { machine: name.into(), ..Default::default() };
    f(&mut st);
    let beat = ferry_api::control::Heartbeat {
        kind: ferry_api::control::ComponentKind::Agent,
        name: name.into(),
        status: Some(ferry_api::control::ComponentStatus::Agent(st)),
        policy: policy.map(str::to_owned),
    };
    serde_json::to_string(&beat).unwrap()
}

/// A heartbeat of process server `name` with its cache `free_percent` free.
fn process_server_heartbeat(name: &str, free_percent: u8) -> String {
    let st = ferry_api::process_server::ProcessServerStatus { free_percent, ..Default::default() };
    let beat = ferry_api::control::Heartbeat {
        kind: ferry_api::control::ComponentKind::ProcessServer,
        name: name.into(),
        status: Some(ferry_api::control::ComponentStatus::ProcessServer(st)),
        policy: None,
    };
    serde_json::to_string(&beat).unwrap()
}

/// A site is data, not a program: only folders below the admin's site root are accepted (links
/// resolved), a power command runs only a program the admin allowed, and no site operation
/// reaches a file outside the site through a link planted in it.
#[test]
fn a_site_cannot_make_the_server_run_a_program_or_touch_files_outside_it() {
    let dir = tempfile::tempdir().unwrap();
    let root = dir.path().join("sites");
    let elsewhere = dir.path().join("elsewhere");
    let marker = dir.path().join("ran");
    let victim = dir.path().join("victim");
    for d in [&root, &elsewhere, &victim] {
        std::fs::create_dir_all(d).unwrap();
    }
    std::fs::write(victim.join("disk0.img"), b"not yours").unwrap();
    let site_file = |folder: &Path| {
        std::fs::create_dir_all(folder.join("datastores/ds/m1")).unwrap();
        std::fs::File::create(folder.join("datastores/ds/m1/disk0.img")).unwrap().set_len(1 << 20).unwrap();
        std::fs::create_dir_all(folder.join("datastores/ds")).unwrap();
        std::os::unix::fs::symlink(&victim, folder.join("datastores/ds/m2")).unwrap();
        let text = format!(
            "[power]\non = [\"sh\", \"-c\", \"touch {}\"]\n[[hosts]]\nname = \"h\"\n[[datastores]]\nname = \"ds\"\nkind = \"vmfs\"\npath = \"datastores/ds\"\nhosts = [\"h\"]\n[[machines]]\nname = \"m1\"\nos_family = \"linux\"\nhost = \"h\"\ndisks = [{{ name = \"disk0\", path = \"datastores/ds/m1/disk0.img\" }}]\n[[machines]]\nname = \"m2\"\nos_family = \"linux\"\nhost = \"h\"\npower = \"off\"\ndisks = [{{ name = \"disk0\", path = \"datastores/ds/m2/disk0.img\" }}]\n",
            marker.display()
        );
        std::fs::write(folder.join("site.toml"), text).unwrap();
    };
    site_file(&root.join("a"));
    site_file(&elsewhere);
    // The root itself is no site either.
    std::fs::copy(elsewhere.join("site.toml"), root.join("site.toml")).unwrap();
    std::os::unix::fs::symlink(&elsewhere, root.join("link")).unwrap();
    let db = dir.path().join("ferry.db");
    let set_root = format!("site_root = '{}'", root.display());
    let s = Server::start(&dir.path().join("state"), db.to_str().unwrap(), &[&set_root]);
    let a = s.admin();
    let add = |name: &str, path: &Path| {
        s.curl("POST", "/api/v1/sites", Some(&a), Some(&json!({"name": name, "path": path}).to_string()))
    };
    for (name, path) in [("out", elsewhere.clone()), ("via-link", root.join("link")), ("root", root.clone())] {
        let (code, v) = add(name, &path);
        assert_eq!(code, 400, "{name}: {v}");
        assert!(v["message"].as_str().unwrap().contains("below the site root"), "{v}");
    }
    let (code, v) = add("a", &root.join("a"));
    assert_eq!(code, 201, "{v}");
    s.wait_job(v["job"]["id"].as_str().unwrap(), &["succeeded", "failed"]);
    let op = |body: Value| -> Value {
        let (code, job) = s.curl("POST", "/api/v1/sites/a/operations", Some(&a), Some(&body.to_string()));
        assert_eq!(code, 202, "{job}");
        s.wait_job(job["id"].as_str().unwrap(), &["succeeded", "failed"])
    };
    let j = op(json!({"op": "power-on", "machine": "m1"}));
    assert_eq!(j["state"], "failed", "{j}");
    assert!(j["error"]["message"].as_str().unwrap().contains("power_programs"), "{j}");
    // The refusal comes before anything is started or written for the machine.
    assert!(!marker.exists(), "the site's program ran");
    assert!(!root.join("a/guests/m1").exists(), "the refused power-on wrote the machine's run folder");
    let j = op(json!({"op": "delete-machine", "machine": "m2"}));
    assert_eq!(j["state"], "failed", "{j}");
    assert!(j["error"]["message"].as_str().unwrap().contains("symbolic link"), "{j}");
    assert_eq!(std::fs::read(victim.join("disk0.img")).unwrap(), b"not yours");
}

/// 16 000 connections that never finish their TLS handshake (or their header) cannot exhaust the
/// configuration server: those over the per-source cap are closed at accept, the others after
/// the header timeout; a client from another address is served throughout, and descriptors and
/// memory come back after the flood. Bad limits are refused at start.
#[test]
fn a_connection_flood_cannot_exhaust_the_configuration_server() {
    let dir = tempfile::tempdir().unwrap();
    let db = dir.path().join("ferry.db");
    let s = Server::start(&dir.path().join("state"), db.to_str().unwrap(), &["header_read_timeout_secs=2"]);
    let pid = s.child.as_ref().unwrap().id();
    let admin = s.admin();
    let probe = || {
        let out = Command::new("curl")
            .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "10", "--interface", "127.0.0.3"])
            .arg("--cacert")
            .arg(s.ca())
            .args(["-H", &format!("Authorization: Bearer {admin}")])
            .arg(format!("https://127.0.0.1:{}/api/v1/policies", s.port))
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    assert_eq!(probe(), "200");
    let (fds0, rss0) = crate::harness::fds_and_rss(pid);
    let mut flood = Vec::new();
    // 16 000: the test's own descriptor limit here is 20 000.
    for _ in 0..16 {
        flood.extend(crate::harness::slow_connections(s.port, "127.0.0.2", 1000, b""));
        assert_eq!(probe(), "200", "a client from another address is served during the flood");
    }
    let (fds, _) = crate::harness::fds_and_rss(pid);
    assert!(fds <= fds0 + 128 + 16, "the flood holds {fds} descriptors (baseline {fds0})");
    eprintln!("flood: {} client sockets, daemon descriptors {fds0} -> {fds}", flood.len());
    assert!(flood.len() >= 15_000, "the flood reached the listener");
    drop(flood);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (fds, rss) = crate::harness::fds_and_rss(pid);
        if fds <= fds0 + fds0 / 10 + 1 && rss <= rss0 + rss0 / 10 + (4 << 20) {
            break;
        }
        assert!(Instant::now() < deadline, "descriptors {fds} (was {fds0}), RSS {rss} (was {rss0})");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(probe(), "200");

    for (set, what) in [
        ("max_connections=0", "max_connections"),
        ("max_connections_per_source=5000", "max_connections_per_source"),
        ("header_read_timeout_secs=0", "header_read_timeout_secs"),
    ] {
        let state = dir.path().join(format!("bad-{what}"));
        let out = Command::new(FERRY)
            .args(["config-server", "--listen", "127.0.0.1:0", "--state-dir"])
            .arg(&state)
            .args(["--set", set])
            .output()
            .unwrap();
        assert!(!out.status.success(), "{set} was accepted");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains(what), "{set}: {err}");
    }
}

/// Primary site lost (issue 13): a standby at the recovery site keeps a copy of the active
/// server's data and takes no changes; with the active one killed, an explicit promotion makes
/// it authoritative (next epoch) — it takes changes and registers components (same CA, same
/// passphrase) — and the old server, back, asks its peer before resuming anything and refuses
/// every change as stale, naming the promoted one.
#[test]
fn a_promoted_standby_takes_over_and_the_returning_server_is_stale() {
    let dir = tempfile::tempdir().unwrap();
    let (la, lb) = (crate::harness::listener(), crate::harness::listener());
    let (pa, pb) = (crate::harness::port_of(&la), crate::harness::port_of(&lb));
    let (addr_a, addr_b) = (format!("127.0.0.1:{pa}"), format!("127.0.0.1:{pb}"));
    let peer_b = format!("peers=[\"{addr_b}\"]");
    let fast = "peer_check_interval_secs=0.5";
    let mut a = Server::start_on(la, &dir.path().join("a"), "", &["name=\"cs-primary\"", &peer_b, fast]);
    let token_file = dir.path().join("a-admin.token");
    std::fs::write(&token_file, a.admin()).unwrap();
    let standby =
        format!("standby={{primary=\"{addr_a}\", token_file=\"{}\", interval_secs=0.3}}", token_file.display());
    let certs = format!("certs=\"{}\"", dir.path().join("a/tls").display());
    let peer_a = format!("peers=[\"{addr_a}\"]");
    let b = Server::start_on(lb, &dir.path().join("b"), "", &["name=\"cs-recovery\"", &standby, &certs, &peer_a, fast]);
    let token = a.admin();
    let (_, st) = a.curl("GET", "/api/v1/authority", None, None);
    assert_eq!((st["role"].as_str(), st["authority"]["epoch"].as_u64()), (Some("active"), Some(1)), "{st:#}");

    // The standby follows the active server's changes and takes none itself.
    let policy = |name: &str| {
        json!({"name": name, "rpo_threshold_secs": 900, "retention_secs": 3600, "app_consistent_secs": 3600, "crash_consistent_secs": 300}).to_string()
    };
    assert_eq!(a.curl("POST", "/api/v1/policies", Some(&token), Some(&policy("gold"))).0, 201);
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        let (code, list) = b.curl("GET", "/api/v1/policies", Some(&token), None);
        if code == 200 && list.to_string().contains("\"gold\"") {
            break;
        }
        assert!(Instant::now() < deadline, "the standby never copied the policy: {code} {list}");
        std::thread::sleep(Duration::from_millis(100));
    }
    let (_, st) = b.curl("GET", "/api/v1/authority", None, None);
    assert_eq!(st["role"], "standby", "{st:#}");
    assert_eq!((st["authority"]["server"].as_str(), st["authority"]["epoch"].as_u64()), (Some("cs-primary"), Some(1)));
    assert!(st["standby"]["copies"].as_u64().unwrap() >= 1 && st["standby"]["error"].is_null(), "{st:#}");
    let (code, e) = b.curl("POST", "/api/v1/policies", Some(&token), Some(&policy("silver")));
    assert_eq!((code, e["code"].as_u64()), (503, Some(9036)), "a standby takes no changes: {e}");
    let (code, e) = b.curl("GET", "/api/v1/components/agent/web1/settings", Some(&token), None);
    assert_eq!((code, e["code"].as_u64()), (503, Some(9036)), "nor serves settings: {e}");
    let (code, e) = a.curl("POST", "/api/v1/authority/promote", Some(&token), Some("{}"));
    assert_eq!(code, 409, "the active server is not promoted: {e}");
    let promote = || {
        Command::new(FERRY)
            .args(["--output", "json", "config-server", "promote"])
            .env("FERRY_SERVER", &addr_b)
            .env("FERRY_TOKEN", &token)
            .env("FERRY_CA", b.ca())
            .output()
            .unwrap()
    };
    let early = promote();
    let err = String::from_utf8_lossy(&early.stderr);
    assert!(!early.status.success() && err.contains("still answers as the active server"), "{err}");
    assert_eq!(b.curl("GET", "/api/v1/authority", None, None).1["role"], "standby", "nothing changed");

    // The primary site is lost; the operator promotes the standby.
    a.kill9();
    let promote = promote();
    assert!(promote.status.success(), "{}", String::from_utf8_lossy(&promote.stderr));
    let st: Value = serde_json::from_slice(&promote.stdout).unwrap();
    assert_eq!((st["role"].as_str(), st["authority"]["epoch"].as_u64()), (Some("active"), Some(2)), "{st:#}");
    assert_eq!(st["authority"]["server"], "cs-recovery");
    assert_eq!(b.curl("POST", "/api/v1/policies", Some(&token), Some(&policy("silver"))).0, 201, "it takes changes");
    // Registration and signing work with the primary gone: same CA, the copied passphrase.
    let pass = a.first["registration_passphrase"].as_str().unwrap().to_owned();
    let fp = a.first["ca_fingerprint"].as_str().unwrap().to_owned();
    let reg = Command::new(FERRY)
        .args(["register", "--server", &addr_b, "--ca-fingerprint", &fp, "--passphrase", &pass])
        .args(["--kind", "agent", "--name", "web1.recovery", "--dir"])
        .arg(dir.path().join("reg"))
        .output()
        .unwrap();
    assert!(reg.status.success(), "{}", String::from_utf8_lossy(&reg.stderr));

    // The old server comes back: it asks its peer first, and is stale.
    a.spawn();
    let (_, st) = a.curl("GET", "/api/v1/authority", None, None);
    assert_eq!(st["role"], "stale", "{st:#}");
    assert_eq!(
        (st["superseded_by"]["server"].as_str(), st["superseded_by"]["epoch"].as_u64()),
        (Some("cs-recovery"), Some(2))
    );
    let (code, e) = a.curl("POST", "/api/v1/policies", Some(&token), Some(&policy("bronze")));
    assert_eq!((code, e["code"].as_u64()), (409, Some(9037)), "{e}");
    assert!(e["message"].as_str().unwrap().contains("cs-recovery"), "it names the promoted server: {e}");
    let (code, _) = a.curl("GET", "/api/v1/components/agent/web1/settings", Some(&token), None);
    assert_eq!(code, 409, "a stale server serves no settings");
    let (code, list) = a.curl("GET", "/api/v1/policies", Some(&token), None);
    assert!(code == 200 && !list.to_string().contains("silver"), "it still answers reads (its own, older data)");
    // Stale across a restart, too (the promoted server need not answer).
    drop(b);
    a.restart();
    assert_eq!(a.curl("GET", "/api/v1/authority", None, None).1["role"], "stale");
}
