//! Failover of a machine: what must hold once its replica is fenced.

use std::process::Command;
use std::time::{Duration, Instant};

use crate::harness::*;
use serde_json::{json, Value};

fn wait_until(what: &str, mut done: impl FnMut() -> Option<Value>) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(v) = done() {
            return v;
        }
        assert!(Instant::now() < deadline, "{what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Fencing: once a machine's replica is fenced (what a failover does first), no byte from the
/// old primary reaches its target disks — not from its agent writing on, not from the process
/// server's spool forwarded after a restart, not from the master target replaying its journal
/// after a restart. Every stream is refused with 9018; the journal stops at the fence's seq; the
/// target disks are byte-identical before and after, and no longer locked by the master target
/// (the failed-over machine's agent becomes their one writer).
#[test]
fn a_fenced_replica_takes_nothing_from_its_old_primary() {
    let mut c = Cluster::new(Opts::default());
    c.start_all();
    assert!(c.qemu_io("disk0", "write -P 1 0 4M\nflush\n").status.success());
    c.wait_caught_up(Duration::from_secs(30));
    // A reason is required and range-checked; an unknown machine is refused.
    let (code, v) = c.mt_api("POST", "/machines/vm1/fence", Some(json!({ "reason": "" })));
    assert_eq!(code, 400, "{v}");
    let (code, v) = c.mt_api("POST", "/machines/vm9/fence", Some(json!({ "reason": "drill" })));
    assert_eq!(code, 404, "{v}");
    let (code, fence) = c.mt_api("POST", "/machines/vm1/fence", Some(json!({ "reason": "failover drill" })));
    assert_eq!(code, 200, "{fence}");
    let at_seq = fence["at_seq"].as_u64().unwrap();
    let replica = |c: &Cluster| c.status("master-target")["machines"][0].clone();
    wait_until("the fenced replica is applied to its head and handed over", || {
        let r = replica(&c);
        (r["fence"]["handed_over"] == true).then_some(r)
    });
    let target = std::fs::read(c.target("disk0")).unwrap();
    let handed = Command::new("flock").args(["-n", "-x"]).arg(c.target("disk0")).arg("true").status().unwrap();
    assert!(handed.success(), "the master target let go of the target disk's one-writer lock");

    // The old primary writes on: its stream is refused, the spool holds the writes.
    assert!(c.qemu_io("disk0", "write -P 7 0 4M\nflush\n").status.success());
    let refused = |c: &Cluster| {
        let ps = c.status("process-server");
        let e = ps["machines"][0]["master_target_error"].as_str().unwrap_or_default().to_owned();
        (e.contains("9018")).then_some(ps)
    };
    wait_until("the process server is refused with 9018", || refused(&c));
    // Restarts of each old-primary component: the spool is forwarded again, the journal replayed.
    for who in ["process-server", "master-target", "agent"] {
        c.kill9(who);
        c.start(who);
        assert!(c.qemu_io("disk0", &format!("write -P {} 1M 1M\nflush\n", 8)).status.success());
        wait_until(&format!("after restarting the {who}, still refused with 9018"), || refused(&c));
        let r = replica(&c);
        assert_eq!(r["journaled_seq"].as_u64(), Some(at_seq), "nothing journaled past the fence: {r:#}");
        assert_eq!(r["fence"]["handed_over"], true, "{r:#}");
        assert!(std::fs::read(c.target("disk0")).unwrap() == target, "the fenced target disk changed ({who})");
    }
    // Fencing again keeps the first fence.
    let (code, again) = c.mt_api("POST", "/machines/vm1/fence", Some(json!({ "reason": "another" })));
    assert_eq!((code, again["at_seq"].as_u64(), again["reason"].as_str()), (200, Some(at_seq), Some("failover drill")));
}

fn lab_verify(log: &std::path::Path, disk: &std::path::Path, exact: Option<u64>) -> (bool, Value) {
    let mut cmd = Command::new(FERRY);
    cmd.args(["--output", "json", "lab", "verify", "--seed", "11", "--record-log"]).arg(log).arg("--disk").arg(disk);
    if let Some(e) = exact {
        cmd.args(["--exact-seq", &e.to_string()]);
    }
    let out = cmd.output().unwrap();
    (out.status.success(), serde_json::from_slice(&out.stdout).unwrap_or(Value::Null))
}

/// Unplanned failover to a chosen point: the failed-over disk (the same file, so the same disk
/// identity) is byte-identical to the point materialized independently, holds exactly the
/// workload's records up to it and none after, and the report names the discarded writes; the
/// point changes (recovery-site writes put back too), then commit freezes it. Clear errors
/// with codes: a disk another writer holds, commit twice, failover after commit, unknown machine.
/// A cluster whose agent takes a crash point every 0.3 s, after `records` workload records
/// (seed 11) are replicated: the cluster, the workload's log, and the tagged points.
fn written_with_points(records: u32) -> (Cluster, std::path::PathBuf, Vec<Value>) {
    let mut c = Cluster::new(Opts {
        disks: vec![("disk0", 16 << 20)],
        agent_extra: "crash_point_interval_secs = 0.3\n".into(),
        ..Default::default()
    });
    c.start_all();
    c.wait_caught_up(Duration::from_secs(30));
    let log = c.path().join("workload.log");
    let out = Command::new(FERRY)
        .args(["lab", "workload", "--disk", &c.nbd_spec("agent", "disk0"), "--record-log"])
        .arg(&log)
        .args(["--records", &records.to_string(), "--rate", "100", "--seed", "11"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    c.wait_caught_up(Duration::from_secs(60));
    let (_, pts) = c.mt_api("GET", "/machines/vm1/points", None);
    let tags = pts["points"].as_array().unwrap().iter().filter(|p| p["origin"] == "tag").cloned().collect();
    (c, log, tags)
}

#[test]
fn unplanned_failover_puts_the_disk_exactly_at_the_point_and_commit_freezes_it() {
    let (mut c, log, crash) = written_with_points(300);
    assert!(crash.len() >= 4, "crash points during the workload: {crash:#?}");
    let (early, mid) = (crash[1].clone(), crash[crash.len() / 2].clone());
    // Each point materialized the slow, independent way (a replay from the base), and what
    // the workload log says it holds.
    let image_of = |p: &Value| {
        let (code, m) = c.mt_api(
            "POST",
            "/machines/vm1/materializations",
            Some(json!({ "point": p["id"], "kind": "image", "format": "raw" })),
        );
        assert_eq!(code, 201, "{m}");
        let file = std::path::PathBuf::from(m["files"][0].as_str().unwrap());
        let (ok, v) = lab_verify(&log, &file, None);
        assert!(ok, "{v}");
        (file, v["prefix_seq"].as_u64().unwrap())
    };
    let (mid_image, mid_records) = image_of(&mid);
    let (early_image, early_records) = image_of(&early);
    assert!(early_records < mid_records && mid_records < 300, "{early_records} {mid_records}");

    // Another writer holds the disk (once the fence handed it over): refused with 9032,
    // nothing changed.
    let (code, fence) = c.mt_api("POST", "/machines/vm1/fence", Some(json!({ "reason": "site lost" })));
    assert_eq!(code, 200, "{fence}");
    // The agent's crash points go on arriving until the fence: its head is the last seq held.
    let head = fence["at_seq"].as_u64().unwrap();
    wait_until("handed over", || {
        let r = c.status("master-target")["machines"][0].clone();
        (r["fence"]["handed_over"] == true).then_some(r)
    });
    let holder = ferry_sys::fs::WriterLock::open(&c.target("disk0"), "the recovery machine's agent").unwrap();
    let (code, v) =
        c.mt_api("POST", "/machines/vm1/failover", Some(json!({ "point": mid["id"], "reason": "site lost" })));
    assert_eq!((code, v["code"].as_u64()), (409, Some(9032)), "{v}");
    drop(holder);
    let (ok, _) = lab_verify(&log, &c.target("disk0"), Some(300));
    assert!(ok, "the refused failover left the disk at the head");

    // Through the CLI, as an operator does it.
    let out = Command::new(FERRY)
        .args(["--output", "json", "master-target", "failover", "--machine", "vm1", "--point"])
        .arg(mid["id"].as_str().unwrap())
        .args(["--reason", "primary site lost", "--config"])
        .arg(c.path().join("master-target.toml"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let f: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(f["phase"], "at-point", "{f:#}");
    let mid_seq = mid["seq"].as_u64().unwrap();
    let d = &f["discarded"];
    assert_eq!((d["first_seq"].as_u64(), d["last_seq"].as_u64()), (Some(mid_seq + 1), Some(head)), "{f:#}");
    assert!(d["bytes"].as_u64().unwrap() > 0 && d["records"].as_u64().unwrap() >= 300 - mid_records, "{f:#}");
    assert!(d["first_time_ms"].as_u64() >= mid["time_ms"].as_u64(), "{f:#}");
    assert!(d["note"].as_str().unwrap().contains("known only at reprotect"), "{f:#}");
    assert!(image_difference(&c.target("disk0"), "raw", mid_image.to_str().unwrap(), "raw").is_none());
    let (ok, v) = lab_verify(&log, &c.target("disk0"), Some(mid_records));
    assert!(ok, "exactly the records up to the point: {v}");
    assert!(!lab_verify(&log, &c.target("disk0"), Some(mid_records + 1)).0, "no record after the point");
    let status = c.status("master-target")["machines"][0].clone();
    assert_eq!(status["failover"]["point"]["id"], mid["id"], "{status:#}");

    // The machine writes at the recovery site; the operator then picks an earlier point.
    let w =
        Command::new("qemu-io").args(["-f", "raw", "-c", "write -P 9 1M 64k"]).arg(c.target("disk0")).output().unwrap();
    assert!(w.status.success());
    let body = json!({
        "point": early["id"], "reason": "change point",
        "recovery_writes": [{ "disk": "disk0", "offset": 1 << 20, "length": 65536 }],
    });
    let (code, f) = c.mt_api("POST", "/machines/vm1/failover", Some(body));
    assert_eq!(code, 200, "{f}");
    assert_eq!(f["earlier_points"][0]["id"], mid["id"]);
    assert!(image_difference(&c.target("disk0"), "raw", early_image.to_str().unwrap(), "raw").is_none());
    let (ok, v) = lab_verify(&log, &c.target("disk0"), Some(early_records));
    assert!(ok, "{v}");
    // Bad bodies: a point that does not exist, an extent outside the disk.
    let (code, v) = c.mt_api("POST", "/machines/vm1/failover", Some(json!({ "point": "vm1@999999", "reason": "x" })));
    assert_eq!((code, v["code"].as_u64()), (404, Some(9007)), "{v}");
    let body = json!({ "point": early["id"], "reason": "x", "recovery_writes": [{ "disk": "disk0", "offset": 16 << 20, "length": 1 }] });
    let (code, v) = c.mt_api("POST", "/machines/vm1/failover", Some(body));
    assert_eq!((code, v["code"].as_u64()), (400, Some(9009)), "{v}");

    // Commit; then the point cannot change, and a restart keeps all of it.
    let (code, f) = c.mt_api("POST", "/machines/vm1/failover/commit", None);
    assert_eq!((code, f["phase"].as_str()), (200, Some("committed")), "{f}");
    let (code, v) = c.mt_api("POST", "/machines/vm1/failover/commit", None);
    assert_eq!((code, v["code"].as_u64()), (409, Some(9019)), "{v}");
    let (code, v) = c.mt_api("POST", "/machines/vm1/failover", Some(json!({ "point": mid["id"], "reason": "x" })));
    assert_eq!((code, v["code"].as_u64()), (409, Some(9019)), "{v}");
    let (code, v) = c.mt_api("POST", "/machines/vm9/failover", Some(json!({ "point": "latest", "reason": "x" })));
    assert_eq!(code, 404, "{v}");
    let before = std::fs::read(c.target("disk0")).unwrap();
    c.kill9("master-target");
    c.start("master-target");
    let status = c.status("master-target")["machines"][0].clone();
    assert_eq!(
        (status["failover"]["phase"].as_str(), &status["failover"]["point"]["id"]),
        (Some("committed"), &early["id"])
    );
    assert!(std::fs::read(c.target("disk0")).unwrap() == before, "the restart did not touch the failed-over disk");
}

/// A master target stopped exactly at each durability boundary of a failover — `failover.json`
/// says restoring but no disk byte changed yet; every extent is back and fsync'd but the state
/// does not say at-point yet — finishes the restore at its restart: the disk then holds exactly
/// the point, and the status says at-point.
#[test]
fn a_failover_stopped_at_each_durability_boundary_finishes_at_the_point_after_a_restart() {
    for failpoint in ["master-target.failover.restoring", "master-target.failover.restored"] {
        assert!(ferry_sys::fail::ALL.contains(&failpoint));
        let (mut c, log, tags) = written_with_points(200);
        assert!(tags.len() >= 3, "{tags:#?}");
        let p = tags[tags.len() / 2].clone();
        let (code, m) = c.mt_api(
            "POST",
            "/machines/vm1/materializations",
            Some(json!({ "point": p["id"], "kind": "image", "format": "raw" })),
        );
        assert_eq!(code, 201, "{m}");
        let image = std::path::PathBuf::from(m["files"][0].as_str().unwrap());
        let (ok, v) = lab_verify(&log, &image, None);
        assert!(ok, "{v}");
        let records = v["prefix_seq"].as_u64().unwrap();
        assert!(records < 200, "writes after the point: {v}");

        c.stop("master-target");
        c.start_env("master-target", &[("FERRY_FAILPOINTS", &format!("{failpoint}=abort"))]);
        // The master target dies inside the request: no answer.
        let body = json!({ "point": p["id"], "reason": "site lost" }).to_string();
        let token = c.control_token("master-target");
        let _ = http_json_as(c.status["master-target"], Some(&token), "POST", "/machines/vm1/failover", Some(&body));
        let st =
            c.wait_exit("master-target", Duration::from_secs(60)).unwrap_or_else(|| panic!("{failpoint} never hit"));
        assert_eq!(st.code(), Some(ferry_sys::fail::EXIT_CODE), "{failpoint}: {st}");
        assert!(c.log("master-target").contains(&format!("ferry failpoint {failpoint} hit")));
        c.start("master-target");
        let r = wait_until("the restarted master target finishes the restore", || {
            let r = c.status("master-target")["machines"][0].clone();
            (r["failover"]["phase"] == "at-point").then_some(r)
        });
        assert_eq!(r["failover"]["point"]["id"], p["id"], "{r:#}");
        assert!(
            image_difference(&c.target("disk0"), "raw", image.to_str().unwrap(), "raw").is_none(),
            "{failpoint}: the disk is the point, byte for byte"
        );
        let (ok, v) = lab_verify(&log, &c.target("disk0"), Some(records));
        assert!(ok, "{failpoint}: exactly the records up to the point: {v}");
    }
}
