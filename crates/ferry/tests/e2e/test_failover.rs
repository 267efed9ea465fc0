//! Test failover (a drill) on lab sites: replication goes on, the test machine runs in its
//! isolated test network on a writable export of the point and writes there (no agent, never
//! registered), its disk verifies at the point, and the cleanup leaves nothing behind but the
//! drill's record.
//!
//! Size: one story; it needs a whole lab.

use std::time::Duration;

use crate::failover_jobs::{failed, fork_log, protect, recovery_guest, verify_log, LAB};
use crate::lab_sites::{ok, records, wait, Lab};
use serde_json::Value;

fn journaled(lab: &Lab) -> u64 {
    lab.replica("mt-r", "web1")["journaled_seq"].as_u64().unwrap_or(0)
}

/// Read an NBD export into a raw file with qemu-img (a real client).
fn convert(url: &str, image: &std::path::Path) {
    let o = std::process::Command::new("qemu-img")
        .args(["convert", "-f", "raw", "-O", "raw", url, image.to_str().unwrap()])
        .output()
        .unwrap();
    assert!(o.status.success(), "qemu-img convert {url}: {}", String::from_utf8_lossy(&o.stderr));
}

#[test]
fn a_drill_runs_a_test_machine_on_the_point_while_replication_goes_on_and_cleanup_leaves_its_record() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("lab.toml");
    std::fs::write(&cfg, LAB).unwrap();
    let dir = tmp.path().join("lab");
    let mut lab = Lab::up(&dir, Some(&cfg));
    ok(&lab.run(&["policies", "create", "gold", "--crash-consistent-secs", "2", "--retention-secs", "3600"]), "policy");
    protect(&lab, &["web1"]);
    let log = lab.guest("web1").join("records.log");
    wait("web1 writes", Duration::from_secs(60), || (records(&log) > 40).then_some(()));
    let point = wait("web1 has crash points", Duration::from_secs(60), || {
        let v = lab.json(&["recovery-points", "web1"]);
        let pts: Vec<Value> =
            v["points"].as_array().unwrap().iter().filter(|p| p["kind"] == "crash").cloned().collect();
        (pts.len() >= 3).then(|| pts[pts.len() - 2].clone())
    });
    let point_id = point["id"].as_str().unwrap().to_owned();

    // Bad requests first: an unprotected machine, a bad point.
    failed(&lab.run(&["test-failover", "start", "spare"]), "not protected", "a drill of an unprotected machine");
    failed(&lab.run(&["test-failover", "start", "web1", "--point", "no such"]), "point", "a malformed point");
    failed(&lab.run(&["test-failover", "cleanup", "web1"]), "no test failover", "a cleanup without a drill");

    // A drill with no test machine: the export, read by a real NBD client, is the point.
    let job = lab.json(&["test-failover", "start", "web1", "--point", &point_id, "--no-start"]);
    assert_eq!(job["state"], "succeeded", "{job:#}");
    let url = lab.json(&["drills"])[0]["nbd_urls"][0].as_str().unwrap().to_owned();
    let image = tmp.path().join("point.img");
    convert(&url, &image);
    let (good, v) = verify_log(&lab, &log, 21, &image, None);
    assert!(good, "the export holds the point: {v:#}");
    let k = v["prefix_seq"].as_u64().unwrap();
    assert!(!verify_log(&lab, &log, 21, &image, Some(k + 1)).0, "exactly the point's records: {v:#}");
    let job = lab.json(&["test-failover", "cleanup", "web1"]);
    assert_eq!(job["state"], "succeeded", "{job:#}");

    let job = lab.json(&["test-failover", "start", "web1", "--point", &point_id]);
    assert_eq!(job["state"], "succeeded", "{job:#}");
    let drills = lab.json(&["drills"]);
    assert_eq!(drills.as_array().unwrap().len(), 2, "{drills:#}");
    assert_eq!(drills[0]["state"], "cleaned-up", "{drills:#}");
    assert!(drills[0]["result"].is_null(), "{drills:#}");
    let drill = drills[1].clone();
    assert_eq!(drill["state"], "running", "{drills:#}");
    assert_eq!(drill["point"]["id"], point_id.as_str(), "{drill:#}");
    assert_eq!(drill["test_machine"], "web1.test", "{drill:#}");
    let m = lab.machine("web1");
    assert_eq!(m["replication"], "protected (test failover running)", "{m:#}");
    let t = lab.machine("web1.test");
    assert!(t["replication"].as_str().unwrap().starts_with("test machine of web1"), "{t:#}");

    // One drill at a time, and no failover during one.
    failed(&lab.run(&["test-failover", "start", "web1"]), "in test failover", "a second drill");
    failed(&lab.run(&["failover", "start", "web1", "--planned"]), "test failover", "a failover during a drill");

    // Replication goes on: the primary writes and the master target journals beyond the point.
    let before = journaled(&lab);
    wait("replication goes on during the drill", Duration::from_secs(60), || {
        (journaled(&lab) > before + 20).then_some(())
    });
    // The test machine writes to its export, never registers (its own identity: none at all).
    let test_log = recovery_guest(&lab, "web1.test").join("records.log");
    wait("the test machine writes", Duration::from_secs(60), || (records(&test_log) > 10).then_some(()));
    let comps = lab.json(&["components"]);
    assert!(
        !comps.as_array().unwrap().iter().any(|c| c["name"].as_str().is_some_and(|n| n.contains("test"))),
        "the test machine is never registered: {comps:#}"
    );

    // Its disk, read through the export by a real NBD client with the machine off, is the
    // point followed by the test machine's own records.
    ok(&lab.run(&["lab", "power-off", "web1.test"]), "power the test machine off");
    let url = drill["nbd_urls"][0].as_str().unwrap().to_owned();
    let image = tmp.path().join("drill.img");
    convert(&url, &image);
    let forked = fork_log(&lab, "web1", k, &test_log, tmp.path());
    let (good, v) = verify_log(&lab, &forked, 21, &image, None);
    assert!(good, "the drill's disk holds the point and the test machine's records: {v:#}");

    let job = lab.json(&["test-failover", "cleanup", "web1", "--result", "passed", "--notes", "booted, app answered"]);
    assert_eq!(job["state"], "succeeded", "{job:#}");
    // Nothing is left: no test machine, no export, no pin; the machine is Protected.
    let inv = lab.json(&["inventory"]);
    assert!(!inv.to_string().contains("web1.test"), "the test machine is removed: {inv:#}");
    let rep = lab.replica("mt-r", "web1");
    assert!(rep.get("test_failover").is_none_or(|x| x.is_null()), "{rep:#}");
    assert_eq!(rep["retention"]["pinned_by"], serde_json::json!([]), "the point is released: {rep:#}");
    assert_eq!(lab.machine("web1")["replication"], "protected");
    assert!(lab.machine("web1").get("test_failover").is_none_or(|x| x.is_null()));
    // The drill is recorded: when, which point, result, who.
    let drills = lab.json(&["drills"]);
    let d = &drills[1];
    assert_eq!(d["state"], "cleaned-up", "{drills:#}");
    assert_eq!(d["result"], "passed");
    assert_eq!(d["notes"], "booted, app answered");
    assert_eq!(d["point"]["id"], point_id.as_str());
    assert!(d["cleaned_up_ms"].as_u64().unwrap() >= d["started_ms"].as_u64().unwrap());
    assert!(!d["started_by"].as_str().unwrap().is_empty(), "{d:#}");
    assert_eq!(d["started_by"], d["cleaned_up_by"]);
    lab.down();
}
