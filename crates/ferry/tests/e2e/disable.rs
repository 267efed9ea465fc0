//! Disable and remove protection, on lab sites: the machine keeps running and writing through
//! its agent (which ships nothing any more), its spool and its replica with every recovery point
//! are deleted and the record says so; protected again it copies in full and verifies; a
//! failed-over machine needs `--force` and keeps its disks; `--remove` with the primary site's
//! process server down finishes on the recovery side, and the process server deletes the spool
//! once it is back.
//!
//! Size: one story; it needs a whole lab.

use std::time::Duration;

use crate::failover_jobs::{copy_of, failed, protect, recovery_guest, verify, LAB};
use crate::lab_sites::{alive, ferry, kill_group, ok, records, wait, Lab};
use serde_json::Value;

fn step(job: &Value, i: usize) -> String {
    job["steps"][i]["message"].as_str().unwrap_or_default().to_owned()
}

#[test]
fn disabled_protection_leaves_the_machine_running_and_nothing_of_its_replica() {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(crate::harness::seed("disable"));
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("lab.toml");
    std::fs::write(&cfg, LAB).unwrap();
    let dir = tmp.path().join("lab");
    let mut lab = Lab::up(&dir, Some(&cfg));
    ok(&lab.run(&["policies", "create", "gold", "--crash-consistent-secs", "2", "--retention-secs", "3600"]), "policy");
    protect(&lab, &["web1", "db1"]);
    let log = lab.guest("web1").join("records.log");
    wait("web1 writes", Duration::from_secs(60), || (records(&log) > 40).then_some(()));
    let retention = dir.join("sites/recovery/retention/mt-r/web1");
    let targets = dir.join("sites/recovery/datastores/vmfs-r/web1");
    let spool = dir.join("sites/primary/cache/ps-primary/web1");
    for p in [&retention, &targets, &spool] {
        assert!(
            p.join("machine.json").exists() || p.join("disk0.img").exists(),
            "{} exists while protected",
            p.display()
        );
    }
    failed(&lab.run(&["disable-protection", "spare"]), "is not protected", "disable of an unprotected machine");

    // Disable: the agent stops shipping, the spool and the replica go, the machine runs on —
    // with the master target stopped exactly after it took the replica's marker away, and the
    // configuration server killed at a seeded random point of the job; both restart.
    let failpoint = "master-target.removal.marker-removed";
    assert!(ferry_sys::fail::ALL.contains(&failpoint));
    let mut env = lab.env.clone();
    env.push(("FERRY_FAILPOINTS", format!("{failpoint}=abort@1")));
    ok(&ferry(&["lab", "restart", "mt-r"], &env), "restart the master target armed");
    lab.reload();
    let mt_pid = lab.pids().into_iter().find(|(n, _)| n == "mt-r").map(|(_, p)| p).unwrap();
    let id = lab.json(&["disable-protection", "web1", "--no-wait"])["id"].as_str().unwrap().to_owned();
    failed(&lab.run(&["failover", "start", "web1", "--unplanned"]), "not protected", "a failover meanwhile");
    std::thread::sleep(Duration::from_millis(rng.gen_range(0..2000)));
    ok(&lab.run(&["lab", "restart", "config-server", "--kill"]), "kill and restart the configuration server");
    wait("the master target stops at the failpoint", Duration::from_secs(180), || (!alive(mt_pid)).then_some(()));
    let mt_log = std::fs::read_to_string(dir.join("logs/mt-r.log")).unwrap();
    assert!(mt_log.contains(&format!("ferry failpoint {failpoint} hit")), "stopped by the failpoint");
    ok(&lab.run(&["lab", "restart", "mt-r"]), "restart the master target");
    lab.reload();
    let o = lab.run(&["--output", "json", "jobs", "watch", &id]);
    let job: Value = serde_json::from_slice(&o.stdout).unwrap_or(Value::Null);
    assert_eq!(job["state"], "succeeded", "{}\n{job:#}", String::from_utf8_lossy(&o.stderr));
    assert!(step(&job, 0).contains("stopped replicating"), "{job:#}");
    assert!(step(&job, 1).contains("spool deleted"), "{job:#}");
    assert!(step(&job, 2).contains("replica and recovery points deleted"), "{job:#}");
    let m = lab.machine("web1");
    assert_eq!(m["replication"], "protection disabled", "{m:#}");
    let d = &m["disabled"];
    assert_eq!((d["job"].as_str(), d["removed"].as_bool()), (Some(id.as_str()), Some(false)), "{m:#}");
    assert!(d["deleted_replica_bytes"].as_u64().unwrap() >= 4096, "{m:#}");
    assert!(d["done_ms"].is_u64(), "{m:#}");
    assert!(!retention.exists() && !targets.exists() && !spool.exists(), "nothing of the replica or the spool is left");
    let mt = lab.process_status("mt-r");
    assert!(!mt["machines"].as_array().unwrap().iter().any(|r| r["machine"] == "web1"), "{mt:#}");
    assert_eq!(mt["removed_machines"]["web1"]["order"].as_str(), Some(id.as_str()), "{mt:#}");
    assert!(mt["settings"]["machine_datastores"]["web1"].is_null(), "{mt:#}");
    let ps = lab.process_status("ps-primary");
    assert!(!ps["machines"].as_array().unwrap().iter().any(|s| s["machine"] == "web1"), "{ps:#}");
    let n = records(&log);
    wait("the machine keeps writing through its agent", Duration::from_secs(60), || {
        let a = lab.agent_status("web1");
        (records(&log) > n + 20 && a["mode"] == "disabled").then_some(())
    });
    failed(&lab.run(&["disable-protection", "web1"]), "already protection disabled", "a second disable");
    failed(&lab.run(&["failover", "start", "web1", "--unplanned"]), "not protected", "failover of a disabled machine");

    // Protected again: a full copy, and the replica holds the machine's log.
    protect(&lab, &["web1"]);
    ok(&lab.run(&["lab", "link", "cut"]), "cut the link");
    wait("the replica applies what it holds", Duration::from_secs(60), || {
        let r = lab.replica("mt-r", "web1");
        (r["applied_seq"] == r["journaled_seq"] && r["consistent"] == true).then_some(())
    });
    let disk = copy_of(&lab, "web1", tmp.path(), "web1-again.img");
    let (good, v) = verify(&lab, "web1", 21, &disk, None);
    assert!(good, "the new replica holds a prefix of the machine's log: {v:#}");
    assert!(v["prefix_seq"].as_u64().unwrap() as usize > n, "including what it wrote while disabled: {v:#}");
    ok(&lab.run(&["lab", "link", "restore"]), "restore the link");
    assert!(lab.process_status("mt-r")["removed_machines"]["web1"].is_null(), "the done order was withdrawn");

    // A failed-over machine: only with --force, and its recovery copy keeps running on its disks.
    let job = lab.json(&["failover", "start", "db1", "--unplanned"]);
    assert_eq!(job["state"], "succeeded", "{job:#}");
    let rlog = recovery_guest(&lab, "db1.recovery").join("records.log");
    wait("the failed-over machine writes", Duration::from_secs(60), || (records(&rlog) > 10).then_some(()));
    failed(&lab.run(&["disable-protection", "db1"]), "--force", "disable of a failed-over machine");
    let job = lab.json(&["disable-protection", "db1", "--force"]);
    assert_eq!(job["state"], "succeeded", "{job:#}");
    assert!(step(&job, 2).contains("target disks are kept"), "{job:#}");
    let m = lab.machine("db1");
    assert_eq!(m["replication"], "protection disabled", "{m:#}");
    assert_eq!(
        (m["disabled"]["failed_over"].as_bool(), m["disabled"]["kept_target_disks"].as_bool()),
        (Some(true), Some(true))
    );
    assert!(!dir.join("sites/recovery/retention/mt-r/db1").exists(), "its recovery points are gone");
    assert!(dir.join("sites/recovery/datastores/vmfs-r/db1/disk0.img").exists(), "its disks stay");
    assert!(
        dir.join("sites/recovery/datastores/vmfs-r/db1/.kept-by-disabled-protection.json").exists(),
        "marked, so no later replica is made over them"
    );
    failed(&lab.run(&["failover", "cancel", "db1"]), "was disabled", "a cancel after the disable");
    let n = records(&rlog);
    wait("the recovery copy runs on", Duration::from_secs(60), || {
        let ends = recovery_guest(&lab, "db1.recovery").join("endpoints.json");
        let ends: Value = serde_json::from_slice(&std::fs::read(ends).ok()?).ok()?;
        let a = crate::lab_sites::http_json(ends["status"].as_str()?, "GET", "/status", None).1;
        (records(&rlog) > n + 10 && a["mode"] == "disabled").then_some(())
    });
    let again = lab.run(&[
        "protect",
        "db1",
        "--policy",
        "gold",
        "--process-server",
        "ps-primary",
        "--master-target",
        "mt-r",
        "--datastore",
        "vmfs-r",
    ]);
    failed(&again, "runs from the target disks", "protect over the disks a failed-over machine runs from");

    // Remove: the primary site's process server is down; the recovery side is cleaned up, and
    // the process server deletes the spool once it is back.
    let spool = dir.join("sites/primary/cache/ps-primary/web1");
    assert!(spool.exists(), "protected again, web1 has a spool");
    let ps_pid = lab.pids().into_iter().find(|(n, _)| n == "ps-primary").map(|(_, p)| p).unwrap();
    kill_group(ps_pid);
    let job = lab.json(&["disable-protection", "web1", "--remove"]);
    assert_eq!(job["state"], "succeeded", "{job:#}");
    let rid = job["id"].as_str().unwrap().to_owned();
    assert!(step(&job, 1).contains("when it is back"), "{job:#}");
    assert_eq!(lab.machine("web1")["replication"], "removed");
    assert!(!dir.join("sites/recovery/retention/mt-r/web1").exists());
    assert!(spool.exists(), "the spool waits for its process server");
    ok(&lab.run(&["lab", "restart", "ps-primary"]), "the process server is back");
    lab.reload();
    wait("it deletes the spool", Duration::from_secs(60), || {
        let ps = lab.process_status("ps-primary");
        (ps["removed_machines"]["web1"]["order"].as_str() == Some(rid.as_str()) && !spool.exists()).then_some(())
    });
}
