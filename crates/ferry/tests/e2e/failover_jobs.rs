//! Failover through the configuration server, on lab sites: a planned failover loses no
//! acknowledged write (the failed-over disk holds exactly the workload's last record), an
//! unplanned one goes to the chosen point and reports what it discards (checked against the
//! workload's log), change point and commit, the old primary kept off and fenced, and the errors
//! an operator meets on the way.
//!
//! Size: one story per test; each needs a whole lab.

use std::collections::BTreeSet;
use std::path::{Path, PathBuf};
use std::time::Duration;

use crate::lab_sites::{json_of, ok, records, wait, Lab};
use serde_json::Value;

pub(crate) const LAB: &str = r#"
boot_delay_secs = 0.5
[[sites]]
name = "primary"
config_server = true
hosts = [{ name = "esx-p1" }]
datastores = [{ name = "vmfs-p", kind = "vmfs", hosts = ["esx-p1"] }]
process_server = { name = "ps-primary" }
[[sites.machines]]
name = "web1"
os_family = "linux"
host = "esx-p1"
datastore = "vmfs-p"
disks = [{ name = "disk0", size = 16777216 }]
workload = { rate = 25, max_blocks = 4, seed = 21 }
[[sites.machines]]
name = "db1"
os_family = "linux"
host = "esx-p1"
datastore = "vmfs-p"
disks = [{ name = "disk0", size = 16777216 }]
workload = { rate = 25, max_blocks = 4, seed = 22 }
[[sites.machines]]
name = "spare"
os_family = "linux"
host = "esx-p1"
datastore = "vmfs-p"
power = "off"
disks = [{ name = "disk0", size = 1048576 }]
[[sites]]
name = "recovery"
hosts = [{ name = "esx-r1" }]
datastores = [{ name = "vmfs-r", kind = "vmfs", hosts = ["esx-r1"] }]
[[sites.master_targets]]
name = "mt-r"
os_family = "linux"
host = "esx-r1"
"#;

pub(crate) fn failed(o: &std::process::Output, want: &str, what: &str) {
    let err = String::from_utf8_lossy(&o.stderr).into_owned() + &String::from_utf8_lossy(&o.stdout);
    assert!(!o.status.success(), "{what} must fail: {err}");
    assert!(err.contains(want), "{what}: expected {want:?} in: {err}");
}

/// The failed-over disk, copied (the target file itself belongs to whoever runs the machine).
pub(crate) fn copy_of(lab: &Lab, m: &str, tmp: &Path, name: &str) -> PathBuf {
    let target = lab.dir.join("sites/recovery/datastores/vmfs-r").join(m).join("disk0.img");
    let copy = tmp.join(name);
    std::fs::copy(&target, &copy).unwrap();
    copy
}

pub(crate) fn verify(lab: &Lab, m: &str, seed: u64, disk: &Path, exact: Option<u64>) -> (bool, Value) {
    verify_log(lab, &lab.guest(m).join("records.log"), seed, disk, exact)
}

/// The lab's "gold" policy, then a protect job of `what` (machines, or `--group G`) to mt-r.
pub(crate) fn protect(lab: &Lab, what: &[&str]) {
    let mut args = vec!["protect"];
    args.extend_from_slice(what);
    args.extend_from_slice(&[
        "--policy",
        "gold",
        "--process-server",
        "ps-primary",
        "--master-target",
        "mt-r",
        "--datastore",
        "vmfs-r",
    ]);
    let job = lab.json(&args);
    assert_eq!(job["state"], "succeeded", "{job:#}");
}

fn sha(p: &Path) -> String {
    let o = std::process::Command::new("sha256sum").arg(p).output().unwrap();
    String::from_utf8_lossy(&o.stdout).split_whitespace().next().unwrap_or("").to_owned()
}

/// Where a failed-over machine's guest keeps its files.
pub(crate) fn recovery_guest(lab: &Lab, rm: &str) -> PathBuf {
    lab.dir.join("sites/recovery/guests").join(rm)
}

/// The log a failed-over machine's disk holds: the primary's records up to the point, then the
/// recovery site's (its workload forks at [`FORK_SEQ`]).
pub(crate) fn fork_log(lab: &Lab, m: &str, upto: u64, recovery_log: &Path, tmp: &Path) -> PathBuf {
    let primary = std::fs::read_to_string(lab.guest(m).join("records.log")).unwrap();
    let mut text: String = primary
        .lines()
        .filter(|l| l.split_whitespace().next().unwrap().parse::<u64>().unwrap() <= upto)
        .map(|l| format!("{l}\n"))
        .collect();
    text.push_str(&std::fs::read_to_string(recovery_log).unwrap());
    let p = tmp.join(format!("{m}-forked.log"));
    std::fs::write(&p, text).unwrap();
    p
}

pub(crate) fn verify_log(lab: &Lab, log: &Path, seed: u64, disk: &Path, exact: Option<u64>) -> (bool, Value) {
    let seed = seed.to_string();
    let mut args = vec![
        "--output",
        "json",
        "lab",
        "verify",
        "--seed",
        &seed,
        "--record-log",
        log.to_str().unwrap(),
        "--disk",
        disk.to_str().unwrap(),
    ];
    let e = exact.map(|e| e.to_string());
    if let Some(e) = &e {
        args.extend_from_slice(&["--exact-seq", e]);
    }
    let o = lab.run(&args);
    let v: Value = serde_json::from_slice(&o.stdout).unwrap_or(Value::Null);
    (o.status.success() && v["consistent"] == true, v)
}

/// The failed-over machine's agent, read offline after a clean stop, holds as changed every
/// extent the master target put back (its seed) and every block written at the recovery
/// site (from the workload's log), and at most 1.1 times that.
fn tracking_covers(lab: &Lab, m: &str, rm: &str, recovery_log: &Path) {
    let folder = lab.dir.join("sites/recovery/datastores/vmfs-r").join(m);
    let seed: Value = serde_json::from_slice(&std::fs::read(folder.join("failover-seed.json")).unwrap()).unwrap();
    let mut want = BTreeSet::new();
    for e in seed["extents"].as_array().unwrap() {
        let (o, l) = (e["offset"].as_u64().unwrap(), e["length"].as_u64().unwrap());
        want.extend((o / 4096)..(o + l).div_ceil(4096));
    }
    // The last record may have been logged and never written (the shutdown stopped the
    // workload in between): it may be missing, and counts only towards the bound.
    let text = std::fs::read_to_string(recovery_log).unwrap();
    let mut last_record = BTreeSet::new();
    let n = text.lines().count();
    for (i, line) in text.lines().enumerate() {
        let v: Vec<u64> = line.split_whitespace().map(|x| x.parse().unwrap()).collect();
        let blocks = (0..v[3]).map(|b| v[2] / 4096 + b);
        if i + 1 == n {
            last_record.extend(blocks);
        } else {
            want.extend(blocks);
        }
    }
    let config = recovery_guest(lab, rm).join("agent.toml");
    let changes =
        json_of(&lab.run(&["--output", "json", "agent", "changes", "--config", config.to_str().unwrap()]), "changes");
    let mut have = BTreeSet::new();
    for e in changes["disks"][0]["extents"].as_array().unwrap() {
        let (o, l) = (e[0].as_u64().unwrap(), e[1].as_u64().unwrap());
        have.extend((o / 4096)..(o + l).div_ceil(4096));
    }
    let missing: Vec<_> = want.difference(&have).take(5).collect();
    assert!(missing.is_empty(), "{rm}'s change set lacks blocks {missing:?}: {changes:#}");
    let bound = want.union(&last_record).count();
    assert!(
        have.len() as f64 <= 1.1 * bound as f64,
        "{rm}'s change set is {} blocks for {} changed: {changes:#}",
        have.len(),
        bound
    );
}

const FORK_SEQ: u64 = 1_000_000_000;

#[test]
fn planned_and_unplanned_failover_change_point_commit_and_the_old_primary_stays_out() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("lab.toml");
    std::fs::write(&cfg, LAB).unwrap();
    let dir = tmp.path().join("lab");
    let mut lab = Lab::up(&dir, Some(&cfg));
    ok(&lab.run(&["policies", "create", "gold", "--crash-consistent-secs", "2", "--retention-secs", "3600"]), "policy");
    protect(&lab, &["web1", "db1"]);
    for m in ["web1", "db1"] {
        let log = lab.guest(m).join("records.log");
        wait(&format!("{m} writes"), Duration::from_secs(60), || (records(&log) > 40).then_some(()));
    }

    // What an operator may get wrong, refused at once with what to do.
    failed(&lab.run(&["failover", "start", "spare", "--planned"]), "is not protected", "unprotected machine");
    failed(
        &lab.run(&["failover", "start", "web1", "--planned", "--point", "latest"]),
        "cannot be used with",
        "planned + point",
    );
    failed(&lab.run(&["failover", "commit", "web1"]), "is not failed over", "commit before failover");
    failed(
        &lab.run(&["failover", "start", "web1", "--unplanned", "--point", "no such point!"]),
        "RC-1 selector",
        "a malformed point",
    );

    // A planned failover that cannot drain (the link to the recovery site is cut) fails before
    // the fence: the primary is released — it writes and replicates again — and stays Protected.
    ok(&lab.run(&["lab", "link", "cut"]), "cut the link");
    let o = lab.run(&["--output", "json", "failover", "start", "web1", "--planned", "--drain-secs", "3"]);
    failed(&o, "was released", "a planned failover that cannot drain");
    let job: Value = serde_json::from_slice(&o.stdout).unwrap();
    assert_eq!(job["error"]["code"], 9033, "{job:#}");
    ok(&lab.run(&["lab", "link", "restore"]), "restore the link");
    let m = lab.machine("web1");
    assert!(m["failover"].is_null() && m["replication"].as_str().unwrap().starts_with("protected"), "{m:#}");
    let log = lab.guest("web1").join("records.log");
    let n = records(&log);
    wait("the released primary writes again", Duration::from_secs(60), || {
        (records(&log) > n + 20 && lab.agent_status("web1")["quiesced"].is_null()).then_some(())
    });
    wait("and replicates", Duration::from_secs(60), || (lab.agent_status("web1")["caught_up"] == true).then_some(()));

    // Planned: every write the primary acknowledged is on the failed-over disk, exactly, and
    // the machine runs at the recovery site on it.
    let primary_lineage = lab.agent_status("web1")["lineage"]["id"].as_u64().unwrap();
    let job = lab.json(&["failover", "start", "web1", "--planned", "--reason", "maintenance of site primary"]);
    assert_eq!(job["state"], "succeeded", "{job:#}");
    assert_eq!(job["steps"].as_array().unwrap().len(), 7, "{job:#}");
    let paused: u64 = std::fs::read_to_string(lab.guest("web1").join("pause.paused")).unwrap().trim().parse().unwrap();
    let m = lab.machine("web1");
    assert_eq!(m["replication"], "failed over (uncommitted)", "{m:#}");
    assert_eq!(m["health"], "healthy", "{m:#}");
    assert_eq!(m["power"], "off", "the primary was shut down: {m:#}");
    assert_eq!(m["failover"]["kind"], "planned");
    assert_eq!(m["failover"]["recovery_machine"], "web1.recovery", "{m:#}");
    assert!(m["failover"]["primary_last_seq"].as_u64().is_some(), "{m:#}");
    let rm = lab.machine("web1.recovery");
    assert_eq!((rm["site"].as_str(), rm["power"].as_str()), (Some("recovery"), Some("on")), "{rm:#}");
    let rep = lab.replica("mt-r", "web1");
    assert_eq!(rep["failover"]["phase"], "at-point", "{rep:#}");
    assert!(rep["fence"]["reason"].as_str().unwrap().contains("maintenance"), "{rep:#}");
    failed(&lab.run(&["failover", "start", "web1", "--planned"]), "already failed over", "a second failover");
    let recovery_log = recovery_guest(&lab, "web1.recovery").join("records.log");
    wait("the failed-over machine writes", Duration::from_secs(60), || (records(&recovery_log) > 20).then_some(()));
    // Its agent tracks a copy of its own, forked from the primary's at the point.
    let ends: Value =
        serde_json::from_slice(&std::fs::read(recovery_guest(&lab, "web1.recovery").join("endpoints.json")).unwrap())
            .unwrap();
    let st = crate::lab_sites::http_json(ends["status"].as_str().unwrap(), "GET", "/status", None).1;
    assert_eq!(st["mode"], "tracking", "{st:#}");
    assert_eq!(st["lineage"]["parent_id"].as_u64(), Some(primary_lineage), "{st:#}");
    assert_eq!(st["lineage"]["parent_seq"], m["failover"]["point"]["seq"], "{st:#}");
    assert_ne!(st["lineage"]["id"].as_u64(), Some(primary_lineage));
    // An identity of its own: registering it revoked nothing of the primary's.
    let comps = lab.json(&["components"]);
    let comp = |n: &str| comps.as_array().unwrap().iter().find(|c| c["kind"] == "agent" && c["name"] == n).cloned();
    let (p_id, r_id) = (comp("web1").unwrap(), comp("web1.recovery").unwrap());
    assert!(r_id["identity"].as_str().unwrap().contains("web1.recovery@recovery"), "{r_id:#}");
    assert_ne!(p_id["certificate_serial"], r_id["certificate_serial"]);
    let revoked = lab.json(&["certificates", "revoked"]).to_string();
    assert!(
        !revoked.contains(p_id["certificate_serial"].as_str().unwrap()),
        "the primary's certificate stands: {revoked}"
    );

    // The old primary stays off unless the operator insists; then it runs, fenced: not a byte
    // of it reaches the failed-over disk (the forked log below verifies without its tail).
    failed(&lab.run(&["lab", "power-on", "web1"]), "allow-failed-over", "powering the old primary on");
    ok(&lab.run(&["lab", "power-on", "web1", "--allow-failed-over"]), "power on, explicitly");
    let log = lab.guest("web1").join("records.log");
    let n = records(&log);
    wait("the old primary's workload writes again", Duration::from_secs(60), || (records(&log) > n + 25).then_some(()));
    // Its process server (with what it spooled) and the master target restart meanwhile.
    ok(&lab.run(&["lab", "restart", "ps-primary", "--kill"]), "kill and restart the process server");
    ok(&lab.run(&["lab", "restart", "mt-r", "--kill"]), "kill and restart the master target");
    let n = records(&log);
    wait("the old primary writes on", Duration::from_secs(60), || (records(&log) > n + 10).then_some(()));
    let rep = lab.replica("mt-r", "web1");
    assert_eq!(rep["journaled_seq"], rep["fence"]["at_seq"], "nothing journaled after the fence: {rep:#}");
    ok(&lab.run(&["lab", "power-off", "web1"]), "power the old primary off");
    ok(&lab.run(&["lab", "power-off", "web1.recovery"]), "shut the failed-over machine down");
    let forked = fork_log(&lab, "web1", paused, &recovery_log, tmp.path());
    let disk = copy_of(&lab, "web1", tmp.path(), "web1-planned.img");
    let (good, v) = verify_log(&lab, &forked, 21, &disk, None);
    assert!(good, "the disk holds the primary's records up to {paused} exactly, then the recovery site's: {v:#}");
    assert!(v["prefix_seq"].as_u64().unwrap() > FORK_SEQ + 20, "{v:#}");
    tracking_covers(&lab, "web1", "web1.recovery", &recovery_log);
    // Unplanned, to a chosen point: the disk holds exactly the records up to it, and the
    // report of what was discarded matches the workload's log.
    let points = wait("db1 has crash points", Duration::from_secs(60), || {
        let v = lab.json(&["recovery-points", "db1"]);
        let pts: Vec<Value> =
            v["points"].as_array().unwrap().iter().filter(|p| p["kind"] == "crash").cloned().collect();
        (pts.len() >= 4).then_some(pts)
    });
    let chosen = points[points.len() - 2]["id"].as_str().unwrap().to_owned();
    let earlier = points[1]["id"].as_str().unwrap().to_owned();
    ok(&lab.run(&["lab", "crash", "db1"]), "the primary is lost");
    let job = lab.json(&["failover", "start", "db1", "--unplanned", "--point", &chosen, "--no-start"]);
    assert_eq!(job["state"], "succeeded", "{job:#}");
    assert_eq!(job["steps"].as_array().unwrap().len(), 5, "{job:#}");
    let at_point = job["steps"][2]["message"].as_str().unwrap();
    assert!(at_point.contains(&chosen) && at_point.contains("known only at reprotect"), "{job:#}");
    let m = lab.machine("db1");
    assert_eq!(m["failover"]["point"]["id"], chosen.as_str(), "{m:#}");
    let discarded = m["failover"]["discarded"].clone();
    let disk = copy_of(&lab, "db1", tmp.path(), "db1-unplanned.img");
    let (good, v) = verify(&lab, "db1", 22, &disk, None);
    assert!(good, "{v:#}");
    let k = v["prefix_seq"].as_u64().unwrap();
    assert!(verify(&lab, "db1", 22, &disk, Some(k)).0 && !verify(&lab, "db1", 22, &disk, Some(k + 1)).0);
    let n = discarded["records"].as_u64().unwrap();
    assert!(n > 0, "writes came after the chosen point: {discarded:#}");
    let log = std::fs::read_to_string(lab.guest("db1").join("records.log")).unwrap();
    let mut blocks = BTreeSet::new();
    for line in log.lines() {
        let v: Vec<u64> = line.split_whitespace().map(|x| x.parse().unwrap()).collect();
        if v[0] > k && v[0] <= k + n {
            blocks.extend((0..v[3]).map(|i| v[2] / 4096 + i));
        }
    }
    assert_eq!(
        discarded["bytes"].as_u64().unwrap(),
        blocks.len() as u64 * 4096,
        "the discarded bytes are the blocks of records {}..={} of the workload's log: {discarded:#}",
        k + 1,
        k + n
    );

    // With nothing running at the recovery site, the failed-over disk is byte-identical before
    // and after the old primary comes back writing and its process server (with a spool of its
    // writes) and the master target are restarted.
    let target = lab.dir.join("sites/recovery/datastores/vmfs-r/db1/disk0.img");
    let before = sha(&target);
    ok(&lab.run(&["lab", "power-on", "db1", "--allow-failed-over"]), "the old primary comes back");
    let old_log = lab.guest("db1").join("records.log");
    let n0 = records(&old_log);
    wait("the old primary writes", Duration::from_secs(60), || (records(&old_log) > n0 + 20).then_some(()));
    ok(&lab.run(&["lab", "restart", "ps-primary", "--kill"]), "kill and restart the process server");
    ok(&lab.run(&["lab", "restart", "mt-r", "--kill"]), "kill and restart the master target");
    let n1 = records(&old_log);
    wait("the old primary writes on", Duration::from_secs(60), || (records(&old_log) > n1 + 20).then_some(()));
    ok(&lab.run(&["lab", "power-off", "db1"]), "the old primary goes off again");
    assert_eq!(sha(&target), before, "not a byte of the old primary reached the failed-over disk");

    // Change point (before commit), then commit; after that the point is fixed.
    let job = lab.json(&["failover", "change-point", "db1", "--point", &earlier]);
    assert_eq!(job["state"], "succeeded", "{job:#}");
    let disk = copy_of(&lab, "db1", tmp.path(), "db1-earlier.img");
    let (good, v) = verify(&lab, "db1", 22, &disk, None);
    assert!(good, "{v:#}");
    assert!(v["prefix_seq"].as_u64().unwrap() < k, "an earlier point holds fewer records: {v:#}");
    let k2 = v["prefix_seq"].as_u64().unwrap();
    assert_eq!(lab.machine("db1")["failover"]["point"]["id"], earlier.as_str());

    // The machine runs at the recovery site from the earlier point; its agent tracks the
    // extents after the point and every write since its first boot.
    ok(&lab.run(&["lab", "power-on", "db1.recovery"]), "start the failed-over machine");
    let recovery_log = recovery_guest(&lab, "db1.recovery").join("records.log");
    wait("the failed-over machine writes", Duration::from_secs(60), || (records(&recovery_log) > 20).then_some(()));
    ok(&lab.run(&["lab", "power-off", "db1.recovery"]), "shut it down");
    let forked = fork_log(&lab, "db1", k2, &recovery_log, tmp.path());
    let disk = copy_of(&lab, "db1", tmp.path(), "db1-recovery.img");
    let (good, v) = verify_log(&lab, &forked, 22, &disk, None);
    assert!(good, "the point's records, then the recovery site's, none of the lost tail: {v:#}");
    tracking_covers(&lab, "db1", "db1.recovery", &recovery_log);

    // Back to the later point: the recovery site's writes are undone with the change.
    let job = lab.json(&["failover", "change-point", "db1", "--point", &chosen]);
    assert_eq!(job["state"], "succeeded", "{job:#}");
    let disk = copy_of(&lab, "db1", tmp.path(), "db1-again.img");
    assert!(verify(&lab, "db1", 22, &disk, Some(k)).0, "exactly record {k} again, no recovery write left");
    assert_eq!(lab.machine("db1.recovery")["power"], "off", "it was off: it stays off");
    let job = lab.json(&["failover", "commit", "db1"]);
    assert_eq!(job["state"], "succeeded", "{job:#}");
    let m = lab.machine("db1");
    assert_eq!(m["replication"], "failed over (committed)", "{m:#}");
    assert_eq!(lab.replica("mt-r", "db1")["failover"]["phase"], "committed");
    failed(&lab.run(&["failover", "commit", "db1"]), "already committed", "commit twice");
    failed(&lab.run(&["failover", "change-point", "db1", "--point", &chosen]), "committed", "change after commit");
    assert_eq!(json_of(&lab.run(&["--output", "json", "machines"]), "machines").as_array().unwrap().len(), 5);
    lab.down();
}

pub(crate) fn three_machine_lab() -> String {
    let mut lab = LAB.replace(
        "[[sites.machines]]\nname = \"spare\"",
        "[[sites.machines]]\nname = \"app1\"\nos_family = \"linux\"\nhost = \"esx-p1\"\ndatastore = \"vmfs-p\"\ndisks = [{ name = \"disk0\", size = 16777216 }]\nworkload = { rate = 25, max_blocks = 4, seed = 23 }\n[[sites.machines]]\nname = \"spare\"",
    );
    lab.push_str("\n[[groups]]\nname = \"grp\"\nmachines = [\"web1\", \"app1\"]\n");
    lab
}

/// SIGKILL to the pid a guest recorded for one of its processes (`agent`, `workload`).
fn kill_guest_process(lab: &Lab, m: &str, what: &str) {
    let t = std::fs::read_to_string(lab.guest(m).join(format!("{what}.pid"))).unwrap();
    let pid = t.split_whitespace().next().unwrap();
    let _ = std::process::Command::new("kill").args(["-KILL", pid]).status();
}

#[test]
fn failover_jobs_finish_exactly_when_each_component_is_killed_at_a_seeded_random_point() {
    use rand::{Rng, SeedableRng};
    let seed = crate::harness::seed("failover_jobs_killed");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("lab.toml");
    std::fs::write(&cfg, three_machine_lab()).unwrap();
    let dir = tmp.path().join("lab");
    let mut lab = Lab::up(&dir, Some(&cfg));
    ok(&lab.run(&["policies", "create", "gold", "--crash-consistent-secs", "2", "--retention-secs", "3600"]), "policy");
    protect(&lab, &["--group", "grp"]);
    protect(&lab, &["db1"]);
    for m in ["web1", "db1", "app1"] {
        let log = lab.guest(m).join("records.log");
        wait(&format!("{m} writes"), Duration::from_secs(60), || (records(&log) > 40).then_some(()));
    }
    let start = |args: &[&str]| -> String {
        let mut a = vec!["failover", "start"];
        a.extend_from_slice(args);
        a.push("--no-wait");
        lab.json(&a)["id"].as_str().unwrap().to_owned()
    };
    let finish = |id: &str| -> Value {
        let o = lab.run(&["--output", "json", "jobs", "watch", id]);
        let v: Value = serde_json::from_slice(&o.stdout).unwrap_or(Value::Null);
        assert_eq!(v["state"], "succeeded", "{}\n{v:#}", String::from_utf8_lossy(&o.stderr));
        v
    };
    let planned_is_exact = |m: &str, seed: u64, name: &str| {
        let paused: u64 = std::fs::read_to_string(lab.guest(m).join("pause.paused")).unwrap().trim().parse().unwrap();
        let disk = copy_of(&lab, m, tmp.path(), name);
        let (good, v) = verify(&lab, m, seed, &disk, Some(paused));
        assert!(good, "{m}: the failed-over disk holds exactly record {paused}: {v:#}");
    };

    // The configuration server dies mid-job; restarted, it resumes the job at its step.
    let id = start(&["web1", "--planned", "--no-start"]);
    std::thread::sleep(Duration::from_millis(rng.gen_range(0..2500)));
    ok(&lab.run(&["lab", "restart", "config-server", "--kill"]), "kill and restart the configuration server");
    let job = finish(&id);
    assert!(job["resumes"].as_u64().unwrap() <= 1, "{job:#}");
    planned_is_exact("web1", 21, "web1.img");

    // A replication group's member fails over only to a multi-machine point (or planned).
    let single = wait("app1 has a crash point", Duration::from_secs(60), || {
        let v = lab.json(&["recovery-points", "app1"]);
        v["points"]
            .as_array()
            .unwrap()
            .iter()
            .find(|p| p["kind"] == "crash")
            .map(|p| p["id"].as_str().unwrap().to_owned())
    });
    failed(
        &lab.run(&["failover", "start", "app1", "--unplanned", "--point", &single]),
        "replication group grp",
        "a custom point for a group member",
    );

    // The primary's agent dies mid-job (its guest restarts it, and it quiesces again), then the
    // process server it ships through.
    let id = start(&["app1", "--planned", "--no-start"]);
    std::thread::sleep(Duration::from_millis(rng.gen_range(0..1500)));
    kill_guest_process(&lab, "app1", "agent");
    std::thread::sleep(Duration::from_millis(rng.gen_range(0..1500)));
    ok(&lab.run(&["lab", "restart", "ps-primary", "--kill"]), "kill and restart the process server");
    finish(&id);
    planned_is_exact("app1", 23, "app1.img");

    // The master target dies while it fences and restores; restarted, it carries the order out.
    let point = wait("db1 has crash points", Duration::from_secs(60), || {
        let v = lab.json(&["recovery-points", "db1"]);
        let pts: Vec<Value> =
            v["points"].as_array().unwrap().iter().filter(|p| p["kind"] == "crash").cloned().collect();
        (pts.len() >= 3).then(|| pts[pts.len() - 2]["id"].as_str().unwrap().to_owned())
    });
    let id = start(&["db1", "--unplanned", "--point", &point, "--no-start"]);
    std::thread::sleep(Duration::from_millis(rng.gen_range(0..2000)));
    ok(&lab.run(&["lab", "restart", "mt-r", "--kill"]), "kill and restart the master target");
    finish(&id);
    let m = lab.machine("db1");
    assert_eq!(m["failover"]["point"]["id"], point.as_str(), "{m:#}");
    assert_eq!(m["replication"], "failed over (uncommitted)", "{m:#}");
    let disk = copy_of(&lab, "db1", tmp.path(), "db1.img");
    let (good, v) = verify(&lab, "db1", 22, &disk, None);
    assert!(good, "{v:#}");
    let k = v["prefix_seq"].as_u64().unwrap();
    assert!(!verify(&lab, "db1", 22, &disk, Some(k + 1)).0, "exactly k records: {v:#}");
    // The point is the master target's own: the disk is byte-identical to it materialized.
    let rep = lab.replica("mt-r", "db1");
    assert_eq!(rep["failover"]["point"]["id"], point.as_str(), "{rep:#}");
    lab.down();
}

/// Stop the lab's configuration server at failpoint `failpoint`=abort@`at` while `start` runs a
/// failover of `machine`, then start it again unarmed; returns that failover job's ID. (The server
/// may stop before it answers `start`: the job is found in its list afterwards.)
fn stop_the_configuration_server_at(lab: &Lab, failpoint: &str, at: usize, machine: &str, start: &[&str]) -> String {
    assert!(ferry_sys::fail::ALL.contains(&failpoint), "{failpoint}");
    let mut env = lab.env.clone();
    env.push(("FERRY_FAILPOINTS", format!("{failpoint}=abort@{at}")));
    ok(&crate::lab_sites::ferry(&["lab", "restart", "config-server"], &env), "restart the configuration server armed");
    let pid = lab.pids().into_iter().find(|(n, _)| n == "config-server").map(|(_, p)| p).unwrap();
    let mut a = vec!["failover", "start"];
    a.extend_from_slice(start);
    a.push("--no-wait");
    let _ = lab.run(&a);
    wait(&format!("the configuration server stops at {failpoint}@{at}"), Duration::from_secs(120), || {
        (!crate::lab_sites::alive(pid)).then_some(())
    });
    let log = std::fs::read_to_string(lab.dir.join("logs/config-server.log")).unwrap();
    assert!(log.contains(&format!("ferry failpoint {failpoint} hit")), "stopped by the failpoint, not otherwise");
    ok(&lab.run(&["lab", "restart", "config-server"]), "restart the configuration server");
    let jobs = lab.json(&["jobs", "list"]);
    let job = jobs.as_array().unwrap().iter().rfind(|j| j["kind"] == "failover" && j["target"] == machine);
    job.unwrap_or_else(|| panic!("a failover job of {machine}: {jobs:#}"))["id"].as_str().unwrap().to_owned()
}

#[test]
fn a_failover_job_finishes_exactly_when_the_configuration_server_stops_at_a_step_boundary() {
    use rand::{Rng, SeedableRng};
    let seed = crate::harness::seed("failover_step_boundary");
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("lab.toml");
    std::fs::write(&cfg, LAB).unwrap();
    let dir = tmp.path().join("lab");
    let mut lab = Lab::up(&dir, Some(&cfg));
    ok(&lab.run(&["policies", "create", "gold", "--crash-consistent-secs", "2", "--retention-secs", "3600"]), "policy");
    protect(&lab, &["web1"]);
    protect(&lab, &["db1"]);
    for m in ["web1", "db1"] {
        let log = lab.guest(m).join("records.log");
        wait(&format!("{m} writes"), Duration::from_secs(60), || (records(&log) > 40).then_some(()));
    }
    let finish = |id: &str| -> Value {
        let o = lab.run(&["--output", "json", "jobs", "watch", id]);
        let v: Value = serde_json::from_slice(&o.stdout).unwrap_or(Value::Null);
        assert_eq!(v["state"], "succeeded", "{}\n{v:#}", String::from_utf8_lossy(&o.stderr));
        assert_eq!(v["resumes"], 1, "resumed once, by the restarted server: {v:#}");
        v
    };

    // Planned: the server stops right after step K is recorded done (K = 7: after the last one,
    // before the job is recorded finished).
    let k = rng.gen_range(1..=7);
    eprintln!("planned failover: the server stops after step {k} is recorded done");
    let id = stop_the_configuration_server_at(
        &lab,
        "config-server.failover.step-done",
        k,
        "web1",
        &["web1", "--planned", "--no-start"],
    );
    finish(&id);
    let paused: u64 = std::fs::read_to_string(lab.guest("web1").join("pause.paused")).unwrap().trim().parse().unwrap();
    let disk = copy_of(&lab, "web1", tmp.path(), "web1.img");
    let (good, v) = verify(&lab, "web1", 21, &disk, Some(paused));
    assert!(good, "after step {k}: the failed-over disk holds exactly record {paused}: {v:#}");
    assert_eq!(lab.machine("web1")["replication"], "failed over (uncommitted)");

    // Unplanned to a chosen point: the server stops with step K recorded running, not yet begun.
    let point = wait("db1 has crash points", Duration::from_secs(60), || {
        let v = lab.json(&["recovery-points", "db1"]);
        let pts: Vec<Value> =
            v["points"].as_array().unwrap().iter().filter(|p| p["kind"] == "crash").cloned().collect();
        (pts.len() >= 3).then(|| pts[pts.len() - 2]["id"].as_str().unwrap().to_owned())
    });
    let k = rng.gen_range(1..=5);
    eprintln!("unplanned failover: the server stops with step {k} recorded running");
    let start = ["db1", "--unplanned", "--point", &point, "--no-start"];
    let id = stop_the_configuration_server_at(&lab, "config-server.failover.step-running", k, "db1", &start);
    finish(&id);
    let m = lab.machine("db1");
    assert_eq!(m["failover"]["point"]["id"], point.as_str(), "{m:#}");
    let disk = copy_of(&lab, "db1", tmp.path(), "db1.img");
    let (good, v) = verify(&lab, "db1", 22, &disk, None);
    assert!(good, "{v:#}");
    let at = v["prefix_seq"].as_u64().unwrap();
    assert!(!verify(&lab, "db1", 22, &disk, Some(at + 1)).0, "before step {k}: exactly the point's records: {v:#}");
    lab.down();
}
