//! Cancel of a failover before commit, on lab sites: the machine at the recovery site is
//! removed with its identity, what it wrote is discarded and reported, the replica is exactly at
//! the primary's last write again (`lab verify` exact), the fence is lifted and the primary
//! replicates on — with the configuration server killed at a seeded random point of the cancel
//! and the master target stopped exactly after it recorded the cancel; then, with no
//! configuration server answering, the components keep the revocation and say since when.
//!
//! Size: one story; it needs a whole lab.

use std::time::Duration;

use crate::failover_jobs::{copy_of, failed, protect, recovery_guest, verify, LAB};
use crate::lab_sites::{alive, ferry, ok, records, wait, Lab};
use serde_json::Value;

#[test]
fn a_cancelled_failover_gives_the_primary_back_with_nothing_lost_and_the_recovery_writes_reported() {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(crate::harness::seed("failover_cancel"));
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("lab.toml");
    std::fs::write(&cfg, LAB).unwrap();
    let dir = tmp.path().join("lab");
    let mut lab = Lab::up(&dir, Some(&cfg));
    ok(&lab.run(&["policies", "create", "gold", "--crash-consistent-secs", "2", "--retention-secs", "3600"]), "policy");
    protect(&lab, &["web1"]);
    let log = lab.guest("web1").join("records.log");
    wait("web1 writes", Duration::from_secs(60), || (records(&log) > 40).then_some(()));
    failed(&lab.run(&["failover", "cancel", "web1"]), "is not failed over", "cancel before a failover");
    failed(&lab.run(&["failover", "cancel", "spare"]), "is not protected", "cancel of an unprotected machine");

    // A failover job cancelled while it drains (the link is cut) gives the primary back: its
    // quiesce is lifted and nothing was fenced.
    ok(&lab.run(&["lab", "link", "cut"]), "cut the link");
    let id = lab.json(&["failover", "start", "web1", "--planned", "--drain-secs", "600", "--no-wait"])["id"]
        .as_str()
        .unwrap()
        .to_owned();
    wait("the failover drains", Duration::from_secs(120), || {
        let j = lab.json(&["jobs", "show", &id]);
        (j["current_step"] == 2 && j["state"] == "in-progress").then_some(())
    });
    ok(&lab.run(&["jobs", "cancel", &id]), "cancel the failover job");
    wait("the job ends cancelled", Duration::from_secs(60), || {
        (lab.json(&["jobs", "show", &id])["state"] == "cancelled").then_some(())
    });
    ok(&lab.run(&["lab", "link", "restore"]), "restore the link");
    let m = lab.machine("web1");
    assert!(m["failover"].is_null(), "{m:#}");
    assert!(lab.replica("mt-r", "web1")["fence"].is_null());
    let n = records(&log);
    wait("the released primary writes and replicates", Duration::from_secs(120), || {
        let a = lab.agent_status("web1");
        (records(&log) > n + 10 && a["quiesced"].is_null() && a["caught_up"] == true).then_some(())
    });

    let job = lab.json(&["failover", "start", "web1", "--planned"]);
    assert_eq!(job["state"], "succeeded", "{job:#}");
    let paused: u64 = std::fs::read_to_string(lab.guest("web1").join("pause.paused")).unwrap().trim().parse().unwrap();
    let recovery_log = recovery_guest(&lab, "web1.recovery").join("records.log");
    wait("the failed-over machine writes", Duration::from_secs(60), || (records(&recovery_log) > 20).then_some(()));
    let serial = lab.json(&["components"]).as_array().unwrap().iter().find(|c| c["name"] == "web1.recovery").unwrap()
        ["certificate_serial"]
        .as_str()
        .unwrap()
        .to_owned();

    // The master target stops exactly once the cancel is recorded (before the fence goes), and
    // the configuration server is killed at a random point of the job; both restart.
    let failpoint = "master-target.failover.cancel-recorded";
    assert!(ferry_sys::fail::ALL.contains(&failpoint));
    let mut env = lab.env.clone();
    env.push(("FERRY_FAILPOINTS", format!("{failpoint}=abort@1")));
    ok(&ferry(&["lab", "restart", "mt-r"], &env), "restart the master target armed");
    lab.reload();
    let mt_pid = lab.pids().into_iter().find(|(n, _)| n == "mt-r").map(|(_, p)| p).unwrap();
    let job = lab.json(&["failover", "cancel", "web1", "--no-start", "--no-wait"]);
    let id = job["id"].as_str().unwrap().to_owned();
    assert_eq!(job["steps"].as_array().unwrap().len(), 6, "{job:#}");
    failed(&lab.run(&["failover", "cancel", "web1"]), "is working on the failover", "a second cancel meanwhile");
    std::thread::sleep(Duration::from_millis(rng.gen_range(0..3000)));
    ok(&lab.run(&["lab", "restart", "config-server", "--kill"]), "kill and restart the configuration server");
    wait("the master target stops at the failpoint", Duration::from_secs(180), || (!alive(mt_pid)).then_some(()));
    let mt_log = std::fs::read_to_string(lab.dir.join("logs/mt-r.log")).unwrap();
    assert!(mt_log.contains(&format!("ferry failpoint {failpoint} hit")), "stopped by the failpoint");
    ok(&lab.run(&["lab", "restart", "mt-r"]), "restart the master target");
    lab.reload();
    let o = lab.run(&["--output", "json", "jobs", "watch", &id]);
    let job: Value = serde_json::from_slice(&o.stdout).unwrap_or(Value::Null);
    assert_eq!(job["state"], "succeeded", "{}\n{job:#}", String::from_utf8_lossy(&o.stderr));
    let step = |i: usize| job["steps"][i]["message"].as_str().unwrap_or_default().to_owned();
    assert!(step(3).contains("discarded") && step(3).contains("holds seq"), "{job:#}");
    assert!(step(2).contains("retired"), "{job:#}");

    // Reported, recorded, and nothing of the recovery machine left.
    let m = lab.machine("web1");
    assert!(m["failover"].is_null(), "{m:#}");
    let c = &m["cancelled_failover"];
    assert_eq!((c["job"].as_str(), c["kind"].as_str()), (Some(id.as_str()), Some("planned")), "{m:#}");
    assert!(c["recovery_write_bytes"].as_u64().unwrap() >= 4096, "what the recovery site wrote is reported: {m:#}");
    let machines = lab.json(&["machines"]);
    assert!(!machines.to_string().contains("web1.recovery"), "{machines:#}");
    let comps = lab.json(&["components"]);
    assert!(!comps.as_array().unwrap().iter().any(|c| c["name"] == "web1.recovery"), "{comps:#}");
    assert!(lab.json(&["certificates", "revoked"]).to_string().contains(&serial), "its certificate is revoked");
    assert!(dir.join("sites/recovery/datastores/vmfs-r/web1/disk0.img").exists(), "the replica's disk stays");
    let rep = lab.replica("mt-r", "web1");
    assert!(rep["fence"].is_null() && rep["failover"].is_null(), "{rep:#}");
    assert_eq!(rep["failover_cancelled"]["order"].as_str(), Some(format!("{id}/cancel").as_str()), "{rep:#}");

    // The replica holds exactly the primary's last write: the recovery writes are undone and
    // nothing the primary acknowledged is missing.
    let disk = copy_of(&lab, "web1", tmp.path(), "web1-cancelled.img");
    let (good, v) = verify(&lab, "web1", 21, &disk, Some(paused));
    assert!(good, "the replica is at record {paused} exactly: {v:#}");

    // The primary starts (no flag needed any more) and replicates on from there.
    failed(&lab.run(&["failover", "cancel", "web1"]), "is not failed over", "a cancel after the cancel");
    ok(&lab.run(&["lab", "power-on", "web1"]), "start the primary");
    wait("the primary writes and replicates again", Duration::from_secs(120), || {
        let a = lab.agent_status("web1");
        (records(&log) as u64 > paused + 30 && a["quiesced"].is_null() && a["caught_up"] == true).then_some(())
    });
    let m = lab.machine("web1");
    assert_eq!(m["replication"], "protected (failover cancelled)", "{m:#}");
    ok(&lab.run(&["lab", "link", "cut"]), "cut the link");
    let rep = wait("the replica applies what it holds", Duration::from_secs(60), || {
        let r = lab.replica("mt-r", "web1");
        (r["applied_seq"] == r["journaled_seq"]).then_some(r)
    });
    let disk = copy_of(&lab, "web1", tmp.path(), "web1-after.img");
    let (good, v) = verify(&lab, "web1", 21, &disk, None);
    assert!(good, "the replica holds a prefix of the primary's log: {v:#} {rep:#}");
    assert!(v["prefix_seq"].as_u64().unwrap() > paused + 10, "and the primary's writes after the cancel: {v:#}");
    ok(&lab.run(&["lab", "link", "restore"]), "restore the link");

    // No configuration server answers: every component keeps enforcing the revocation list it
    // holds (web1.recovery's certificate) and says since when it has heard nothing.
    let cs = lab.pids().into_iter().find(|(n, _)| n == "config-server").map(|(_, p)| p).unwrap();
    crate::lab_sites::kill_group(cs);
    let mt = wait("the master target says the server is gone", Duration::from_secs(60), || {
        let l = lab.process_status("mt-r")["config_server_link"].clone();
        l["unreachable_since_ms"].is_u64().then_some(l)
    });
    assert!(mt["revoked_certificates"].as_u64().unwrap() >= 1, "the list is kept: {mt:#}");
    assert!(mt["last_settings_ms"].as_u64().unwrap() <= mt["unreachable_since_ms"].as_u64().unwrap(), "{mt:#}");
    let agent = wait("so does web1's agent", Duration::from_secs(60), || {
        let l = lab.agent_status("web1")["config_server_link"].clone();
        l["unreachable_since_ms"].is_u64().then_some(l)
    });
    assert!(agent["revoked_certificates"].as_u64().unwrap() >= 1, "{agent:#}");
    ok(&lab.run(&["lab", "restart", "config-server"]), "the configuration server comes back");
    wait("the master target hears from it again", Duration::from_secs(60), || {
        lab.process_status("mt-r")["config_server_link"]["unreachable_since_ms"].is_null().then_some(())
    });
}
