//! Lab sites end to end: `ferry lab up` from nothing (real processes, TLS on loopback, SQLite),
//! registration of every component, enable replication through the API and `ferry protect`,
//! workloads verified on the replica, a cut link, a crashed machine, `ferry demo`, a custom lab
//! description, and `ferry lab down` leaving no process behind (checked by pid).
//!
//! Size: one scenario area (lab sites); each test is a story that needs the whole lab.

use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::{Duration, Instant};

use crate::harness::*;
use serde_json::{json, Value};

pub(crate) fn ferry(args: &[&str], env: &[(&str, String)]) -> Output {
    let mut c = Command::new(FERRY);
    c.args(args);
    for (k, v) in env {
        c.env(k, v);
    }
    c.output().unwrap()
}

pub(crate) fn ok(o: &Output, what: &str) -> String {
    assert!(
        o.status.success(),
        "{what}: {}\n{}",
        String::from_utf8_lossy(&o.stderr),
        String::from_utf8_lossy(&o.stdout)
    );
    String::from_utf8_lossy(&o.stdout).into_owned()
}

pub(crate) fn json_of(o: &Output, what: &str) -> Value {
    serde_json::from_str(&ok(o, what))
        .unwrap_or_else(|e| panic!("{what}: not JSON ({e}): {}", String::from_utf8_lossy(&o.stdout)))
}

pub(crate) fn alive(pid: i64) -> bool {
    std::fs::read_to_string(format!("/proc/{pid}/stat"))
        .map(|s| !s.rsplit(')').next().is_some_and(|r| r.trim_start().starts_with('Z')))
        .unwrap_or(false)
}

/// Live processes whose command line mentions `path` (whatever the lab recorded).
fn processes_mentioning(path: &Path) -> Vec<String> {
    let needle = path.to_string_lossy().into_owned();
    let mut out = Vec::new();
    for e in std::fs::read_dir("/proc").unwrap().flatten() {
        let Ok(pid) = e.file_name().to_string_lossy().parse::<i64>() else { continue };
        let Ok(cmd) = std::fs::read(e.path().join("cmdline")) else { continue };
        let cmd = String::from_utf8_lossy(&cmd).replace('\0', " ");
        if cmd.contains(&needle) && alive(pid) {
            out.push(format!("{pid}: {cmd}"));
        }
    }
    out
}

pub(crate) struct Lab {
    pub(crate) dir: PathBuf,
    pub(crate) state: Value,
    pub(crate) env: Vec<(&'static str, String)>,
    down: bool,
}

impl Lab {
    /// Read lab.json again (after `ferry lab restart` changed a component's pid or ends).
    pub(crate) fn reload(&mut self) {
        self.state = serde_json::from_slice(&std::fs::read(self.dir.join("lab.json")).unwrap()).unwrap();
    }

    pub(crate) fn up(dir: &Path, config: Option<&Path>) -> Lab {
        let mut args =
            vec!["--output".to_owned(), "json".into(), "lab".into(), "up".into(), dir.to_string_lossy().into_owned()];
        if let Some(c) = config {
            args.push("--config".into());
            args.push(c.to_string_lossy().into_owned());
        }
        let o = Command::new(FERRY).args(&args).output().unwrap();
        let state = json_of(&o, "lab up");
        let env = vec![
            ("FERRY_LAB", dir.to_string_lossy().into_owned()),
            ("FERRY_SERVER", state["config_server"].as_str().unwrap().to_owned()),
            ("FERRY_CA", state["ca"].as_str().unwrap().to_owned()),
            ("FERRY_TOKEN", state["operator_token"].as_str().unwrap().to_owned()),
        ];
        Lab { dir: dir.to_owned(), state, env, down: false }
    }

    pub(crate) fn run(&self, args: &[&str]) -> Output {
        ferry(args, &self.env)
    }

    pub(crate) fn json(&self, args: &[&str]) -> Value {
        let mut a = vec!["--output", "json"];
        a.extend_from_slice(args);
        json_of(&self.run(&a), &args.join(" "))
    }

    /// Every pid the lab started: daemons, guests, agents, workloads.
    pub(crate) fn pids(&self) -> Vec<(String, i64)> {
        let state: Value = serde_json::from_slice(&std::fs::read(self.dir.join("lab.json")).unwrap()).unwrap();
        let mut out: Vec<(String, i64)> = state["processes"]
            .as_array()
            .unwrap()
            .iter()
            .map(|p| (p["name"].as_str().unwrap().to_owned(), p["pid"].as_i64().unwrap()))
            .collect();
        for site in ["primary", "recovery"] {
            let Ok(entries) = std::fs::read_dir(self.dir.join("sites").join(site).join("guests")) else { continue };
            for e in entries.flatten() {
                for what in ["power", "agent", "workload"] {
                    if let Ok(t) = std::fs::read_to_string(e.path().join(format!("{what}.pid"))) {
                        let pid = t.split_whitespace().next().unwrap().parse().unwrap();
                        out.push((format!("{}/{what}", e.file_name().to_string_lossy()), pid));
                    }
                }
            }
        }
        out
    }

    pub(crate) fn guest(&self, m: &str) -> PathBuf {
        self.dir.join("sites/primary/guests").join(m)
    }

    pub(crate) fn machine(&self, m: &str) -> Value {
        let v = self.json(&["machines"]);
        v.as_array().unwrap().iter().find(|x| x["machine"] == m).cloned().unwrap_or_else(|| panic!("no {m}: {v:#}"))
    }

    pub(crate) fn process_status(&self, name: &str) -> Value {
        let p = self.state["processes"].as_array().unwrap().iter().find(|p| p["name"] == name).unwrap();
        http_json(p["status"].as_str().unwrap(), "GET", "/status", None).1
    }

    /// A master target's status entry for one machine's replica (Null when it holds none).
    pub(crate) fn replica(&self, mt: &str, m: &str) -> Value {
        let st = self.process_status(mt);
        st["machines"].as_array().unwrap().iter().find(|r| r["machine"] == m).cloned().unwrap_or(Value::Null)
    }

    pub(crate) fn agent_status(&self, m: &str) -> Value {
        self.agent_status_at(&self.guest(m))
    }

    /// The status of the agent of the guest in `guest` (a folder of any site).
    pub(crate) fn agent_status_at(&self, guest: &Path) -> Value {
        let ends: Value = serde_json::from_slice(&std::fs::read(guest.join("endpoints.json")).unwrap()).unwrap();
        http_json(ends["status"].as_str().unwrap(), "GET", "/status", None).1
    }

    pub(crate) fn down(&mut self) -> Vec<(String, i64)> {
        let pids = self.pids();
        ok(&self.run(&["lab", "down", self.dir.to_str().unwrap()]), "lab down");
        self.down = true;
        pids
    }
}

impl Drop for Lab {
    fn drop(&mut self) {
        if !self.down {
            let _ = self.run(&["lab", "down", self.dir.to_str().unwrap()]);
        }
        if std::thread::panicking() {
            // Keep the logs of a failed test (the lab folder itself goes with its temp dir).
            let keep = std::env::temp_dir().join(format!("ferry-lab-failed-{}", std::process::id()));
            let _ = Command::new("cp").arg("-r").arg(self.dir.join("logs")).arg(&keep).status();
            for site in ["primary", "recovery"] {
                let _ = Command::new("cp")
                    .arg("-r")
                    .arg(self.dir.join("sites").join(site).join("guests"))
                    .arg(keep.join(format!("guests-{site}")))
                    .status();
            }
            eprintln!("lab logs kept in {}", keep.display());
        }
    }
}

/// Plain HTTP to a status endpoint (loopback).
pub(crate) fn http_json(addr: &str, method: &str, path: &str, body: Option<&Value>) -> (u16, Value) {
    http_json_as(addr, None, method, path, body)
}

/// [`http_json`] with a bearer token.
pub(crate) fn http_json_as(
    addr: &str,
    bearer: Option<&str>,
    method: &str,
    path: &str,
    body: Option<&Value>,
) -> (u16, Value) {
    let mut c = Command::new("curl");
    // Bounded: a listener nobody accepts on (an agent restarting) must fail the call, not hang
    // the test.
    c.args(["-s", "--max-time", "30", "-X", method, "-w", "\n%{http_code}", "-H", "Content-Type: application/json"]);
    if let Some(b) = bearer {
        c.args(["-H", &format!("Authorization: Bearer {b}")]);
    }
    if let Some(b) = body {
        c.args(["--data-binary", &b.to_string()]);
    }
    let o = c.arg(format!("http://{addr}{path}")).output().unwrap();
    let text = String::from_utf8_lossy(&o.stdout).into_owned();
    let (body, code) = text.rsplit_once('\n').unwrap_or(("", "0"));
    (code.trim().parse().unwrap_or(0), serde_json::from_str(body).unwrap_or(Value::Null))
}

pub(crate) fn wait<T>(what: &str, limit: Duration, mut f: impl FnMut() -> Option<T>) -> T {
    let deadline = Instant::now() + limit;
    loop {
        if let Some(v) = f() {
            return v;
        }
        assert!(Instant::now() < deadline, "timed out: {what}");
        std::thread::sleep(Duration::from_millis(250));
    }
}

/// SIGKILL to a process group the lab started.
pub(crate) fn kill_group(pid: i64) {
    let _ = Command::new("kill").args(["-KILL", "--", &format!("-{pid}")]).status();
    wait("the process dies", Duration::from_secs(10), || (!alive(pid)).then_some(()));
}

pub(crate) fn records(p: &Path) -> usize {
    std::fs::read_to_string(p).map(|t| t.lines().count()).unwrap_or(0)
}

#[test]
fn lab_comes_up_from_nothing_registers_everything_and_goes_down_leaving_no_process() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("lab");
    let mut lab = Lab::up(&dir, None);
    // Every component registered and heartbeating.
    let comps = lab.json(&["components"]);
    let names: Vec<String> = comps
        .as_array()
        .unwrap()
        .iter()
        .map(|c| format!("{}/{}", c["kind"].as_str().unwrap(), c["name"].as_str().unwrap()))
        .collect();
    for want in [
        "agent/app1",
        "agent/app2",
        "agent/db1",
        "agent/win1",
        "master-target/mt-linux-p",
        "master-target/mt-windows-p",
        "master-target/mt-linux-r",
        "master-target/mt-windows-r",
        "process-server/ps-primary",
        "process-server/ps-recovery",
    ] {
        assert!(names.contains(&want.to_owned()), "{want} registered: {names:?}");
    }
    // The two sites of the built-in lab description.
    let inv = lab.json(&["inventory"]);
    let site = |n: &str| {
        inv.as_array().unwrap().iter().find(|s| s["site"] == n).unwrap_or_else(|| panic!("{inv:#}"))["content"].clone()
    };
    let p = site("primary");
    assert_eq!(p["hosts"].as_array().unwrap().len(), 2);
    let kinds: Vec<&str> = p["datastores"].as_array().unwrap().iter().map(|d| d["kind"].as_str().unwrap()).collect();
    assert_eq!(kinds, ["vmfs", "vsan", "nfs"]);
    let machines = p["machines"].as_array().unwrap();
    assert_eq!(machines.iter().filter(|m| m["os_family"] == "linux").count(), 3);
    assert_eq!(machines.iter().filter(|m| m["os_family"] == "windows").count(), 1);
    assert!(machines.iter().all(|m| m["power"] == "on"), "powered on through the provider: {machines:#?}");
    let families = |s: &Value| -> Vec<String> {
        s["master_targets"].as_array().unwrap().iter().map(|m| m["os_family"].as_str().unwrap().to_owned()).collect()
    };
    assert_eq!(families(&p), ["linux", "windows"]);
    assert_eq!(families(&site("recovery")), ["linux", "windows"]);
    assert!(site("recovery")["master_targets"][0]["retention_free_bytes"][0].as_u64().unwrap() > 0);
    let groups = lab.json(&["groups", "list"]);
    assert_eq!(groups[0]["machines"], json!(["app1", "app2"]));
    // Every daemon logs under DIR; status shows them running.
    for p in lab.state["processes"].as_array().unwrap() {
        assert!(Path::new(p["log"].as_str().unwrap()).starts_with(&dir), "{p}");
        assert!(Path::new(p["log"].as_str().unwrap()).exists(), "{p}");
    }
    let st = lab.json(&["lab", "status", dir.to_str().unwrap()]);
    assert!(st["processes"].as_array().unwrap().iter().all(|p| p["running"] == true), "{st:#}");
    assert_eq!(
        st["links"].as_array().unwrap().len(),
        5,
        "a link per master target and one for the recovery site's path to the server"
    );
    // Links are controlled by name (or all at once).
    ok(
        &lab.run(&["lab", "link", "slow", "mt-linux-r", "--latency-ms", "50", "--bandwidth-bytes-per-sec", "1000000"]),
        "slow",
    );
    let st = lab.json(&["lab", "status", dir.to_str().unwrap()]);
    let link =
        |st: &Value, n: &str| st["links"].as_array().unwrap().iter().find(|l| l["name"] == n).unwrap()["state"].clone();
    assert_eq!(link(&st, "mt-linux-r")["latency_ms"], 50, "{st:#}");
    assert_eq!(link(&st, "mt-linux-r")["bandwidth_bytes_per_sec"], 1000000);
    assert_eq!(link(&st, "mt-windows-r")["latency_ms"], 0, "only the named link");
    ok(&lab.run(&["lab", "link", "cut"]), "cut all");
    let st = lab.json(&["lab", "status", dir.to_str().unwrap()]);
    assert!(st["links"].as_array().unwrap().iter().all(|l| l["state"]["cut"] == true), "{st:#}");
    ok(&lab.run(&["lab", "link", "restore"]), "restore all");
    let st = lab.json(&["lab", "status", dir.to_str().unwrap()]);
    assert!(st["links"]
        .as_array()
        .unwrap()
        .iter()
        .all(|l| l["state"]["cut"] == false && l["state"]["latency_ms"] == 0));
    let o = lab.run(&["lab", "link", "cut", "nosuch"]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("no link nosuch"), "{}", String::from_utf8_lossy(&o.stderr));
    // A second `lab up` in the same folder is refused, clearly.
    let again = ferry(&["lab", "up", dir.to_str().unwrap()], &[]);
    assert!(!again.status.success());
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("already running"),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
    let pids = lab.down();
    assert!(pids.len() >= 12 + 4, "daemons and guests: {pids:?}");
    let left: Vec<_> = pids.iter().filter(|(_, p)| alive(*p)).collect();
    assert!(left.is_empty(), "left running after lab down: {left:?}");
    let stray = processes_mentioning(&dir);
    assert!(stray.is_empty(), "processes of the lab still running: {stray:#?}");
}

#[test]
fn a_lab_that_fails_to_come_up_says_why_and_stops_what_it_started() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("lab.toml");
    // The process server refuses a zero-byte cache: lab up fails after the configuration server,
    // the links and the master target are running.
    std::fs::write(
        &cfg,
        r#"
[[sites]]
name = "a"
config_server = true
hosts = [{ name = "h" }]
datastores = [{ name = "ds", kind = "vmfs", hosts = ["h"] }]
process_server = { name = "ps-a", cache_capacity_bytes = 0 }
[[sites.machines]]
name = "m1"
os_family = "linux"
host = "h"
datastore = "ds"
disks = [{ name = "disk0", size = 1048576 }]
[[sites]]
name = "b"
datastores = [{ name = "ds-b", kind = "vmfs" }]
master_targets = [{ name = "mt-b", os_family = "linux" }]
"#,
    )
    .unwrap();
    let dir = tmp.path().join("lab");
    let o = ferry(&["lab", "up", dir.to_str().unwrap(), "--config", cfg.to_str().unwrap()], &[]);
    let err = String::from_utf8_lossy(&o.stderr).into_owned();
    assert!(!o.status.success(), "lab up must fail: {err}");
    assert!(err.contains("ps-a") && err.contains("logs"), "names the failed process and where its log is: {err}");
    let started = std::fs::read_to_string(dir.join("pids")).unwrap();
    assert!(started.lines().count() >= 4, "config server, links, master target: {started}");
    for line in started.lines() {
        let pid: i64 = line.split_whitespace().next().unwrap().parse().unwrap();
        assert!(!alive(pid), "{line} still runs after the failed lab up");
    }
    let stray = processes_mentioning(&dir);
    assert!(stray.is_empty(), "{stray:#?}");
    assert!(std::fs::read_to_string(dir.join("logs/ps-a.log")).unwrap().contains("cache_capacity_bytes"));
}

#[test]
fn protected_lab_machine_verifies_on_the_replica_survives_a_cut_link_and_a_crash() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("lab");
    let mut lab = Lab::up(&dir, None);
    ok(
        &lab.run(&[
            "policies",
            "create",
            "gold",
            "--crash-consistent-secs",
            "5",
            "--retention-secs",
            "7200",
            "--rpo-threshold-secs",
            "3",
        ]),
        "policy",
    );
    // Wrong requests fail at once, naming what is wrong.
    let bad = |args: &[&str], want: &str| {
        let mut a = vec!["protect"];
        a.extend_from_slice(args);
        let o = lab.run(&a);
        let err = String::from_utf8_lossy(&o.stderr).into_owned();
        assert!(!o.status.success() && err.contains(want), "{args:?}: expected {want:?} in: {err}");
    };
    let base = ["--process-server", "ps-primary", "--master-target", "mt-linux-r"];
    bad(
        &["nosuch", "--policy", "gold", base[0], base[1], base[2], base[3], "--datastore", "vsan-r"],
        "machine nosuch is not in any",
    );
    bad(
        &["db1", "--policy", "gold", base[0], base[1], base[2], base[3], "--datastore", "vsan-p"],
        "has no datastore vsan-p",
    );
    bad(
        &["db1", "--policy", "gold-failback", base[0], base[1], base[2], base[3], "--datastore", "vsan-r"],
        "failback policy",
    );
    bad(
        &["db1", "--policy", "nosuch", base[0], base[1], base[2], base[3], "--datastore", "vsan-r"],
        "no policy nosuch",
    );
    bad(
        &[
            "app1",
            "--group",
            "app-tier",
            "--policy",
            "gold",
            base[0],
            base[1],
            base[2],
            base[3],
            "--datastore",
            "vsan-r",
        ],
        "protect all of its machines together",
    );
    bad(
        &["db1", "--policy", "gold", "--process-server", "ps-nosuch", base[2], base[3], "--datastore", "vsan-r"],
        "no process-server ps-nosuch",
    );
    bad(
        &["db1", "--policy", "gold", base[0], base[1], "--master-target", "mt-linux-p", "--datastore", "vsan-p"],
        "same site",
    );

    // Two requests for the same machine at once: one job, one clear refusal. (db1, a Linux
    // machine, goes to the recovery site's second master target: not the process server's default.)
    let win = ["--process-server", "ps-primary", "--master-target", "mt-windows-r"];
    let racers: Vec<_> = (0..2)
        .map(|_| {
            let env = lab.env.clone();
            std::thread::spawn(move || {
                let mut args = vec!["--output", "json", "protect", "db1", "--policy", "gold"];
                args.extend_from_slice(&win);
                args.extend_from_slice(&["--datastore", "vsan-r", "--no-wait"]);
                ferry(&args, &env)
            })
        })
        .collect();
    let outs: Vec<Output> = racers.into_iter().map(|t| t.join().unwrap()).collect();
    let errs: Vec<String> = outs.iter().map(|o| String::from_utf8_lossy(&o.stderr).into_owned()).collect();
    let winners: Vec<&Output> = outs.iter().filter(|o| o.status.success()).collect();
    assert_eq!(winners.len(), 1, "exactly one request wins: {errs:?}");
    assert!(errs.iter().any(|e| e.contains("being protected") || e.contains("already enabling")), "{errs:?}");
    let started: Value = serde_json::from_slice(&winners[0].stdout).unwrap();
    let job = lab.json(&["jobs", "watch", started["id"].as_str().unwrap()]);
    assert_eq!(job["state"], "succeeded", "{job:#}");
    assert!(job["bytes_total"].as_u64().unwrap() >= 64 << 20, "initial sync progress in bytes: {job:#}");
    assert_eq!(job["steps"].as_array().unwrap().len(), 6);
    let mut again = vec!["protect", "db1", "--policy", "gold"];
    again.extend_from_slice(&win);
    again.extend_from_slice(&["--datastore", "vsan-r"]);
    let again = lab.run(&again);
    assert!(
        String::from_utf8_lossy(&again.stderr).contains("already protected"),
        "{}",
        String::from_utf8_lossy(&again.stderr)
    );
    let m = lab.machine("db1");
    assert_eq!(m["replication"], "protected", "{m:#}");
    assert_eq!(m["master_target"], "mt-windows-r");
    assert!(
        !lab.process_status("mt-linux-r")["machines"].to_string().contains("db1"),
        "db1 goes only to the master target it was protected to"
    );
    let rep = lab.replica("mt-windows-r", "db1");
    assert_eq!(rep["retention"]["window_secs"], 7200.0, "the policy's retention: {rep:#}");
    let replica = dir.join("sites/recovery/datastores/vsan-r/db1/disk0.img");
    assert_eq!(rep["disks"][0]["target"], json!(replica), "the replica lives in the chosen datastore");

    // The workload runs; a cut link stops replication, health degrades; restore resumes it.
    let log = lab.guest("db1").join("records.log");
    wait("the workload writes", Duration::from_secs(30), || (records(&log) > 30).then_some(()));
    let st0 = lab.agent_status("db1");
    ok(&lab.run(&["lab", "link", "cut"]), "cut");
    let applied_at_cut = wait("the master target stops applying", Duration::from_secs(20), || {
        let a = lab.replica("mt-windows-r", "db1")["applied_seq"].as_u64().unwrap();
        std::thread::sleep(Duration::from_millis(500));
        let b = lab.replica("mt-windows-r", "db1")["applied_seq"].as_u64().unwrap();
        (a == b).then_some(b)
    });
    let degraded = wait("lag grows and health degrades", Duration::from_secs(30), || {
        let m = lab.machine("db1");
        let comps = lab.json(&["components"]);
        let ps = comps.as_array().unwrap().iter().find(|c| c["name"] == "ps-primary").unwrap().clone();
        (m["rpo_secs"].as_f64().unwrap_or(0.0) > 3.0 && m["health"] == "warning" && ps["health"] == "warning")
            .then_some((m, ps))
    });
    assert!(degraded.1["reasons"].to_string().contains("master target is unreachable"), "{:#}", degraded.1);
    let still = lab.replica("mt-windows-r", "db1")["applied_seq"].as_u64().unwrap();
    assert_eq!(still, applied_at_cut, "nothing crosses a cut link");
    ok(&lab.run(&["lab", "link", "restore"]), "restore");
    wait("replication resumes and catches up", Duration::from_secs(60), || {
        let a = lab.agent_status("db1");
        (a["caught_up"] == true
            || (a["lag_seconds"].as_f64().unwrap_or(99.0) < 2.0 && a["applied_seq"].as_u64().unwrap() > applied_at_cut))
            .then_some(())
    });
    let st1 = lab.agent_status("db1");
    assert_eq!(st1["generation"], st0["generation"], "no full resync after the link came back: {st1:#}");
    assert_eq!(st1["completed_resyncs"], st0["completed_resyncs"], "{st1:#}");

    // With the configuration server down, a SIGKILLed process server and master target come back
    // with what they were told: db1's route (not the default master target) and its window.
    let cs_pid = lab.state["processes"].as_array().unwrap().iter().find(|p| p["name"] == "config-server").unwrap()
        ["pid"]
        .as_i64()
        .unwrap();
    kill_group(cs_pid);
    // Durable in the master target's journal (applying may wait for a resync to end).
    let applied = |mt: &str| -> u64 { lab.replica(mt, "db1")["journaled_seq"].as_u64().unwrap_or(0) };
    ok(&lab.run(&["lab", "restart", "ps-primary", "--kill"]), "restart the process server");
    ok(&lab.run(&["lab", "restart", "mt-windows-r", "--kill"]), "restart the master target");
    let before = applied("mt-windows-r");
    wait("db1's changes reach its own master target after the restarts", Duration::from_secs(120), || {
        (applied("mt-windows-r") > before + 20).then_some(())
    });
    assert_eq!(applied("mt-linux-r"), 0, "nothing of db1 went to the default master target");
    let rep = lab.replica("mt-windows-r", "db1");
    assert_eq!(rep["retention"]["window_secs"], 7200.0, "the policy's window survives a restart without the server");
    ok(&lab.run(&["lab", "restart", "config-server"]), "restart the configuration server");

    // Clean power-off drains the agent; the replica then holds every record.
    ok(&lab.run(&["lab", "power-off", "db1"]), "power off");
    let last = records(&log) as u64;
    wait("the master target applies everything the process server holds", Duration::from_secs(60), || {
        let r = lab.replica("mt-windows-r", "db1");
        let ps = lab.replica("ps-primary", "db1");
        (r["applied_seq"] == r["journaled_seq"] && r["applied_seq"] == ps["spooled_seq"]).then_some(())
    });
    // Read the replica through a point (the target file itself is being written by the applier).
    let copy = tmp.path().join("replica-copy.img");
    std::fs::copy(&replica, &copy).unwrap();
    let verify_copy = || {
        let (log, copy) = (log.to_str().unwrap(), copy.to_str().unwrap());
        lab.run(&["--output", "json", "lab", "verify", "--seed", "13", "--record-log", log, "--disk", copy])
    };
    let v = json_of(&verify_copy(), "verify the replica");
    assert_eq!(v["consistent"], true, "{v:#}");
    // The workload may have been stopped between logging its last record and writing it.
    assert!(
        v["prefix_seq"].as_u64().unwrap() + 1 >= last,
        "every written record reached the replica ({last} logged): {v:#}"
    );
    // The verifier can fail: flip a byte inside a record's block.
    let line = std::fs::read_to_string(&log).unwrap().lines().nth(10).unwrap().to_owned();
    let off: u64 = line.split_whitespace().nth(2).unwrap().parse().unwrap();
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&copy).unwrap();
        f.write_at(b"\xde\xad\xbe\xef", off + 100).unwrap();
    }
    let o = verify_copy();
    let text = String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr);
    assert!(!o.status.success(), "a corrupted copy must fail: {text}");
    assert!(text.contains(&format!("{off}")) || text.contains("offset"), "names where: {text}");

    // Power on: the guest boots, the agent resumes; a crash kills guest, agent and workload.
    ok(&lab.run(&["lab", "power-on", "db1"]), "power on");
    wait("db1 replicates again", Duration::from_secs(60), || {
        let a = lab.agent_status("db1");
        (a["mode"] == "replicating" && records(&log) as u64 > last + 10).then_some(())
    });
    let before: Vec<(String, i64)> = lab.pids().into_iter().filter(|(n, _)| n.starts_with("db1/")).collect();
    assert_eq!(before.len(), 3, "guest, agent, workload: {before:?}");
    assert!(before.iter().all(|(_, p)| alive(*p)), "{before:?}");
    let crashed_at = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64;
    let o = lab.run(&["lab", "crash", "db1"]);
    assert!(ok(&o, "crash").contains("crashed"));
    wait("crash kills the guest's processes", Duration::from_secs(10), || {
        before.iter().all(|(_, p)| !alive(*p)).then_some(())
    });
    assert_eq!(lab.machine("db1")["power"], "off");
    let crash_again = lab.run(&["lab", "crash", "db1"]);
    assert!(
        String::from_utf8_lossy(&crash_again.stderr).contains("not running"),
        "{}",
        String::from_utf8_lossy(&crash_again.stderr)
    );
    ok(&lab.run(&["lab", "power-on", "db1"]), "power on after the crash");
    wait("db1 replicates after the crash", Duration::from_secs(60), || {
        let a = lab.agent_status("db1");
        (a["mode"] == "replicating" && a["initial_sync_complete"] == true).then_some(())
    });
    // Points continue after the crash (the policy takes one every 5 s).
    let after: u64 = wait("a crash-consistent point after the crash", Duration::from_secs(60), || {
        let pts = lab.json(&["recovery-points", "db1"]);
        pts["points"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|p| p["kind"] == "crash" && p["time_ms"].as_u64().unwrap() > crashed_at)
            .map(|p| p["seq"].as_u64().unwrap())
            .max()
    });
    assert!(after > 0);
    let pids = lab.down();
    let left: Vec<_> = pids.iter().filter(|(_, p)| alive(*p)).collect();
    assert!(left.is_empty(), "{left:?}");
}

#[test]
fn demo_short_variant_protects_takes_points_and_verifies() {
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("demo");
    let o = Command::new(FERRY)
        .args(["--output", "json", "demo", "--workload-secs", "3", "--dir"])
        .arg(&dir)
        .output()
        .unwrap();
    let v = json_of(&o, "ferry demo");
    assert_eq!(v["verified"], true, "{v:#}");
    let rows = v["machines"].as_array().unwrap();
    assert_eq!(rows.len(), 4, "every machine of the lab: {v:#}");
    for r in rows {
        assert_eq!(r["verify_app_point"], "PASS", "{r:#}");
        assert!(r["app_point_record"].as_u64().unwrap() > 0, "{r:#}");
        assert!(r["bytes_replicated"].as_u64().unwrap() > 0, "{r:#}");
    }
    for m in ["app1", "app2"] {
        let r = rows.iter().find(|r| r["machine"] == m).unwrap();
        assert!(r["verify_group_point"].as_str().unwrap().starts_with("PASS (app-tier"), "{r:#}");
    }
    let win = rows.iter().find(|r| r["machine"] == "win1").unwrap();
    assert_eq!(win["master_target"], "mt-windows-r", "a Windows machine to the Windows master target");
    // The full cycle through a recovery plan (the group and win1; db1 is on NFS): unplanned
    // failover, reprotect, planned failback, reprotect forward, byte-exact.
    let cycle = &v["cycle"];
    assert_eq!(cycle["byte_exact"], true, "{cycle:#}");
    assert_eq!(cycle["machines"], serde_json::json!(["app1", "app2", "win1"]), "{cycle:#}");
    let phases = cycle["phases"].as_array().unwrap();
    assert_eq!(phases.len(), 4, "{cycle:#}");
    for ph in phases.iter().filter(|p| p["bytes_sent"].is_u64()) {
        let (sent, changed) = (ph["bytes_sent"].as_u64().unwrap(), ph["bytes_changed"].as_u64().unwrap());
        assert!(sent <= changed + changed / 10, "only what changed travelled: {ph:#}");
    }
    assert!(cycle["refused"].as_str().unwrap_or_default().contains("DS-1"), "{cycle:#}");
    assert!(!dir.exists(), "the demo tears its lab down and removes it");
}

#[test]
fn a_custom_lab_builds_exactly_the_inventory_it_describes() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("lab.toml");
    std::fs::write(
        &cfg,
        r#"
boot_delay_secs = 0.2
[[sites]]
name = "primary"
config_server = true
hosts = [{ name = "esx-a" }, { name = "esx-nfs-only" }]
datastores = [
  { name = "vmfs-a", kind = "vmfs", hosts = ["esx-a"] },
  { name = "nfs-a", kind = "nfs", hosts = ["esx-a", "esx-nfs-only"] },
  { name = "gone", kind = "vmfs", hosts = ["esx-a"], accessible = false },
]
process_server = { name = "ps-a" }
[[sites.machines]]
name = "golden"
os_family = "linux"
host = "esx-a"
datastore = "vmfs-a"
power = "off"
disks = [{ name = "disk0", size = 1048576, uuid = "6000c29aaaaaaaaaaaaaaaaaaaaaaaaa" }]
[[sites.machines]]
name = "clone1"
os_family = "linux"
host = "esx-nfs-only"
datastore = "nfs-a"
disks = [{ name = "disk0", size = 1048576, uuid = "6000c29aaaaaaaaaaaaaaaaaaaaaaaaa" }]
[[sites]]
name = "dr"
hosts = [{ name = "esx-b" }]
datastores = [{ name = "vmfs-b", kind = "vmfs", hosts = ["esx-b"] }]
[[sites.master_targets]]
name = "mt-b"
os_family = "linux"
host = "esx-b"
controller = "pvscsi"
attached_disks = 61
[[sites.master_targets]]
name = "mt-lsi"
os_family = "linux"
host = "esx-b"
controller = "lsilogic-parallel"
enable_uuid = false
run = false
"#,
    )
    .unwrap();
    let dir = tmp.path().join("lab");
    let mut lab = Lab::up(&dir, Some(&cfg));
    let inv = lab.json(&["inventory"]);
    let site = |n: &str| inv.as_array().unwrap().iter().find(|s| s["site"] == n).unwrap().clone();
    let a = site("primary");
    let machines = a["content"]["machines"].as_array().unwrap();
    let uuid = |m: &str| machines.iter().find(|x| x["name"] == m).unwrap()["disks"][0]["uuid"].clone();
    assert_eq!(uuid("golden"), uuid("clone1"), "a template clone's disk UUID collides, as described");
    assert_eq!(machines.iter().find(|x| x["name"] == "golden").unwrap()["power"], "off");
    assert_eq!(machines.iter().find(|x| x["name"] == "clone1").unwrap()["power"], "on");
    assert!(a["warnings"].to_string().contains("gone") && a["warnings"].to_string().contains("8061"), "{a:#}");
    let nfs_only: Vec<_> = a["content"]["datastores"]
        .as_array()
        .unwrap()
        .iter()
        .filter(|d| d["hosts"].as_array().unwrap().contains(&json!("esx-nfs-only")))
        .map(|d| d["kind"].clone())
        .collect();
    assert_eq!(nfs_only, [json!("nfs")]);
    let b = site("dr");
    let mts = b["content"]["master_targets"].as_array().unwrap();
    assert_eq!(mts[0]["attached_disks"], 61);
    assert_eq!(mts[0]["controller"], "pvscsi");
    assert_eq!(mts[1]["controller"], "lsilogic-parallel");
    assert!(b["warnings"].to_string().contains("EnableUUID"), "{b:#}");
    // Only what runs is started: one master target, one process server; golden has no guest.
    let kinds: Vec<String> =
        lab.state["processes"].as_array().unwrap().iter().map(|p| p["name"].as_str().unwrap().to_owned()).collect();
    assert!(kinds.contains(&"mt-b".to_owned()) && !kinds.contains(&"mt-lsi".to_owned()), "{kinds:?}");
    assert!(!dir.join("sites/primary/guests/golden").exists());
    let comps = lab.json(&["components"]);
    assert!(
        comps
            .as_array()
            .unwrap()
            .iter()
            .any(|c| c["name"] == "clone1" && c["status"]["component"] == "mobility-service"),
        "{comps:#}"
    );
    let pids = lab.down();
    assert!(pids.iter().all(|(_, p)| !alive(*p)), "{pids:?}");
    // A description with no configuration-server site is refused, clearly.
    std::fs::write(&cfg, "[[sites]]\nname = 'x'\n").unwrap();
    let o = ferry(&["lab", "up", tmp.path().join("lab2").to_str().unwrap(), "--config", cfg.to_str().unwrap()], &[]);
    assert!(
        String::from_utf8_lossy(&o.stderr).contains("config_server = true"),
        "{}",
        String::from_utf8_lossy(&o.stderr)
    );
    std::fs::write(&cfg, "[[sites]]\nname = 'x'\nbogus = 1\n").unwrap();
    let o = ferry(&["lab", "up", tmp.path().join("lab3").to_str().unwrap(), "--config", cfg.to_str().unwrap()], &[]);
    assert!(String::from_utf8_lossy(&o.stderr).contains("bogus"), "{}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn a_protect_job_survives_the_configuration_server_killed_at_a_random_point() {
    let seed = seed("a_protect_job_survives_the_configuration_server_killed");
    let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(seed);
    let tmp = tempfile::tempdir().unwrap();
    let dir = tmp.path().join("lab");
    let mut lab = Lab::up(&dir, None);
    ok(&lab.run(&["policies", "create", "gold", "--crash-consistent-secs", "5"]), "policy");
    let started = lab.json(&[
        "protect",
        "--group",
        "app-tier",
        "--policy",
        "gold",
        "--process-server",
        "ps-primary",
        "--master-target",
        "mt-linux-r",
        "--datastore",
        "vmfs-r",
        "--no-wait",
    ]);
    let id = started["id"].as_str().unwrap().to_owned();
    // Somewhere in the job: before the settings, during them, or during the initial sync.
    let delay = rand::Rng::gen_range(&mut rng, 0..1500);
    std::thread::sleep(Duration::from_millis(delay));
    let state: Value = serde_json::from_slice(&std::fs::read(dir.join("lab.json")).unwrap()).unwrap();
    let cs = state["processes"].as_array().unwrap().iter().find(|p| p["name"] == "config-server").unwrap()["pid"]
        .as_i64()
        .unwrap();
    kill_group(cs);
    ok(&lab.run(&["lab", "restart", "config-server"]), "restart the configuration server");
    // Every step is idempotent: the job resumes where it was and ends with both machines Protected.
    let job = lab.json(&["jobs", "watch", &id]);
    assert_eq!(job["state"], "succeeded", "killed after {delay} ms: {job:#}");
    assert!(job["resumes"].as_u64().unwrap() >= 1, "the kill landed inside the job (after {delay} ms): {job:#}");
    for m in ["app1", "app2"] {
        let v = lab.machine(m);
        assert_eq!(v["replication"], "protected", "{v:#}");
        assert_eq!(v["group"], "app-tier");
    }
    // The group's machines take a common point through their coordinator.
    let ends: Value =
        serde_json::from_slice(&std::fs::read(lab.guest("app1").join("endpoints.json")).unwrap()).unwrap();
    // As the ferry CLI does it: the coordinator's control token from the file its status names.
    let addr = ends["status"].as_str().unwrap();
    let (_, st) = http_json(addr, "GET", "/status", None);
    let token = std::fs::read_to_string(st["control_token_file"].as_str().unwrap()).unwrap();
    let (code, v) = http_json_as(addr, Some(token.trim()), "POST", "/group/point", Some(&json!({"app": false})));
    assert_eq!(code, 200, "{v}");
    let pts = wait("the multi-machine point at the master target", Duration::from_secs(60), || {
        let p = lab.json(&["recovery-points", "app2"]);
        p["points"].as_array().unwrap().iter().any(|x| x["scope"] == "multi").then_some(p)
    });
    assert!(pts["points"].as_array().unwrap().iter().any(|x| x["group"] == "app-tier"), "{pts:#}");
    let pids = lab.down();
    assert!(pids.iter().all(|(_, p)| !alive(*p)), "{pids:?}");
}
