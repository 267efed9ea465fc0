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
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(crate::harness::seed("drill"));
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

    // The configuration server is killed at a seeded random moment of the drill's start job;
    // restarted, it resumes the job.
    let id = lab.json(&["test-failover", "start", "web1", "--point", &point_id, "--no-wait"])["id"]
        .as_str()
        .unwrap()
        .to_owned();
    std::thread::sleep(Duration::from_millis(rng.gen_range(0..2500)));
    ok(&lab.run(&["lab", "restart", "config-server", "--kill"]), "kill and restart the configuration server");
    let o = lab.run(&["--output", "json", "jobs", "watch", &id]);
    let job: Value = serde_json::from_slice(&o.stdout).unwrap_or(Value::Null);
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
    // A restart of the master target loses the writable overlay: the machine's health says so.
    assert_eq!(lab.machine("web1")["health"], "healthy");
    ok(&lab.run(&["lab", "restart", "mt-r", "--kill"]), "kill and restart the master target");
    let m = wait("the lost export shows in the machine's health", Duration::from_secs(60), || {
        let m = lab.machine("web1");
        m["reasons"].to_string().contains("drill").then_some(m)
    });
    assert_eq!(m["health"], "warning", "{m:#}");

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

/// A step's start and end times.
fn times(job: &Value, name_has: &str) -> (u64, u64) {
    let s = job["steps"].as_array().unwrap().iter().find(|s| s["name"].as_str().unwrap().contains(name_has));
    let s = s.unwrap_or_else(|| panic!("no step {name_has:?}: {job:#}"));
    (s["started_ms"].as_u64().unwrap(), s["finished_ms"].as_u64().unwrap())
}

#[test]
fn a_plan_fails_over_group_by_group_with_its_actions_and_a_replication_group_at_one_point() {
    use rand::{Rng, SeedableRng};
    let mut rng = rand::rngs::StdRng::seed_from_u64(crate::harness::seed("plan_failover"));
    use crate::failover_jobs::{copy_of, three_machine_lab, verify};
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("lab.toml");
    std::fs::write(&cfg, three_machine_lab()).unwrap();
    let dir = tmp.path().join("lab");
    let mut lab = Lab::up(&dir, Some(&cfg));
    ok(
        &lab.run(&[
            "policies",
            "create",
            "gold",
            "--crash-consistent-secs",
            "2",
            "--retention-secs",
            "3600",
            "--app-consistent-secs",
            "4",
        ]),
        "policy",
    );
    protect(&lab, &["--group", "grp"]);
    protect(&lab, &["db1"]);
    let plan = serde_json::json!({"name": "dr", "groups": [
        {"replication_groups": ["grp"], "post_actions": [
            {"kind": "script", "name": "announce", "command": "echo web is up; echo a note >&2"},
            {"kind": "manual", "name": "check web", "instruction": "open the web site"}]},
        {"machines": ["db1"], "pre_actions": [{"kind": "script", "name": "db next", "command": "echo db next"}]}
    ]});
    let file = tmp.path().join("plan.json");
    std::fs::write(&file, plan.to_string()).unwrap();
    let mut admin = lab.env.clone();
    for (k, v) in admin.iter_mut() {
        if *k == "FERRY_TOKEN" {
            // Shown only in the lab's own state file (owner-only), never printed.
            let st: Value = serde_json::from_slice(&std::fs::read(lab.dir.join("lab.json")).unwrap()).unwrap();
            *v = st["admin_token"].as_str().unwrap().to_owned();
        }
    }
    ok(
        &crate::lab_sites::ferry(&["plans", "create", file.to_str().unwrap()], &admin),
        "create the plan (scripts: admin)",
    );
    failed(
        &lab.run(&["plans", "failover", "dr", "--unplanned", "--point", "web1@5"]),
        "selector",
        "a point ID for a plan",
    );
    wait("the replication group has a multi-machine point", Duration::from_secs(90), || {
        let v = lab.json(&["recovery-points", "app1"]);
        v["points"].as_array().unwrap().iter().any(|p| p["group_tag"].is_string()).then_some(())
    });
    for m in ["web1", "app1", "db1"] {
        let log = lab.guest(m).join("records.log");
        wait(&format!("{m} writes"), Duration::from_secs(60), || (records(&log) > 30).then_some(()));
    }

    // A planned failover of the plan while app1 is down: app1 fails its check, web1 — of the
    // same group — gets as far as its shutdown, and nobody is fenced: web1 is given back
    // (started again, replicating), the group stops and says which machine failed.
    ok(&lab.run(&["lab", "power-off", "app1"]), "app1 goes down");
    std::thread::sleep(Duration::from_secs(32));
    let o = lab.run(&["--output", "json", "plans", "failover", "dr", "--planned"]);
    failed(&o, "app1", "a planned plan failover with a member down");
    let job: Value = serde_json::from_slice(&o.stdout).unwrap();
    let why = job["error"]["message"].as_str().unwrap();
    assert!(
        why.contains("before any of its machines was fenced") && why.contains("web1: released and started again"),
        "{job:#}"
    );
    for m in ["web1", "app1", "db1"] {
        assert!(lab.replica("mt-r", m)["fence"].is_null(), "{m} is not fenced");
        assert!(lab.machine(m)["failover"].is_null(), "{m} has no failover");
    }
    let log = lab.guest("web1").join("records.log");
    let n = records(&log);
    wait("web1 writes and replicates again", Duration::from_secs(120), || {
        let a = lab.agent_status("web1");
        (records(&log) > n + 10 && a["quiesced"].is_null() && a["caught_up"] == true).then_some(())
    });
    ok(&lab.run(&["lab", "power-on", "app1"]), "app1 comes back");
    wait("app1 replicates again", Duration::from_secs(120), || {
        (lab.agent_status("app1")["caught_up"] == true).then_some(())
    });
    let newest_group_point = |lab: &Lab| -> u64 {
        let v = lab.json(&["recovery-points", "app1"]);
        v["points"]
            .as_array()
            .unwrap()
            .iter()
            .filter(|p| p["group_tag"].is_string())
            .filter_map(|p| p["seq"].as_u64())
            .max()
            .unwrap_or(0)
    };
    let before = newest_group_point(&lab);
    wait("a new multi-machine point", Duration::from_secs(90), || (newest_group_point(&lab) > before).then_some(()));

    // Test failover of the plan: every machine drilled, the replication group at one tag, in
    // one test network, the manual action waiting as in a failover; replication goes on.
    failed(&lab.run(&["plans", "test-failover", "dr", "--point", "web1@5"]), "selector", "a point ID for a plan drill");
    let id = lab.json(&["plans", "test-failover", "dr", "--no-start", "--no-wait"])["id"].as_str().unwrap().to_owned();
    wait("the plan drill waits at its manual action", Duration::from_secs(300), || {
        let j = lab.json(&["jobs", "show", &id]);
        assert!(!["failed", "cancelled", "succeeded"].contains(&j["state"].as_str().unwrap()), "{j:#}");
        (j["state"] == "waiting-for-input").then_some(())
    });
    ok(&lab.run(&["jobs", "confirm", &id]), "confirm the manual action");
    let o = lab.run(&["--output", "json", "jobs", "watch", &id]);
    let job: Value = serde_json::from_slice(&o.stdout).unwrap_or(Value::Null);
    assert_eq!(job["state"], "succeeded", "{job:#}");
    failed(&lab.run(&["jobs", "confirm", &id]), "not waiting for input", "a confirmation of a job not waiting");
    let plan_drills = |lab: &Lab| -> Vec<Value> {
        lab.json(&["drills"]).as_array().unwrap().iter().filter(|d| d["plan"] == "dr").cloned().collect()
    };
    let drills = plan_drills(&lab);
    assert_eq!(drills.len(), 3, "{drills:#?}");
    let drill_of = |m: &str| drills.iter().find(|d| d["machine"] == m).unwrap().clone();
    for (m, seed) in [("web1", 21), ("app1", 23), ("db1", 22)] {
        let d = drill_of(m);
        assert_eq!((d["state"].as_str(), d["network"].as_str()), (Some("running"), Some("plan-test-dr")), "{d:#}");
        assert!(lab.replica("mt-r", m)["fence"].is_null(), "{m}: a drill fences nothing");
        assert_eq!(lab.machine(m)["replication"], "protected (test failover running)", "{m}");
        let image = tmp.path().join(format!("{m}-plan-drill.img"));
        convert(d["nbd_urls"][0].as_str().unwrap(), &image);
        let (good, v) = verify(&lab, m, seed, &image, None);
        assert!(good, "{m}: the drill's export holds a state of its log: {v:#}");
    }
    let tag = drill_of("web1")["point"]["group_tag"].clone();
    assert!(tag.is_string() && tag == drill_of("app1")["point"]["group_tag"], "one multi-machine point: {drills:#?}");
    failed(&lab.run(&["plans", "failover", "dr", "--planned"]), "in test failover", "a failover during the drill");
    let job = lab.json(&["plans", "test-failover-cleanup", "dr", "--result", "passed", "--notes", "all three up"]);
    assert_eq!(job["state"], "succeeded", "{job:#}");
    for d in plan_drills(&lab) {
        assert_eq!((d["state"].as_str(), d["result"].as_str()), (Some("cleaned-up"), Some("passed")), "{d:#}");
        let m = d["machine"].as_str().unwrap();
        assert!(lab.machine(m)["test_failover"].is_null(), "{m}");
        assert!(lab.replica("mt-r", m)["test_failover"].is_null(), "{m}: the export is gone");
    }
    failed(&lab.run(&["plans", "test-failover-cleanup", "dr"]), "nothing to clean up", "a second cleanup");

    let id = lab.json(&["plans", "failover", "dr", "--unplanned", "--no-start", "--no-wait"])["id"]
        .as_str()
        .unwrap()
        .to_owned();
    // The configuration server is killed at a seeded random moment of group 1's failovers;
    // restarted, it resumes every machine at its own step.
    wait("group 1 fails over", Duration::from_secs(120), || {
        let j = lab.json(&["jobs", "show", &id]);
        (j["current_step"].as_u64() >= Some(1)).then_some(())
    });
    std::thread::sleep(Duration::from_millis(rng.gen_range(0..1000)));
    ok(&lab.run(&["lab", "restart", "config-server", "--kill"]), "kill and restart the configuration server");
    let job = wait("the plan waits at its manual action", Duration::from_secs(300), || {
        let j = lab.json(&["jobs", "show", &id]);
        assert!(!["failed", "cancelled", "succeeded"].contains(&j["state"].as_str().unwrap()), "{j:#}");
        (j["state"] == "waiting-for-input").then_some(j)
    });
    assert!(job["input_prompt"].as_str().unwrap().contains("open the web site"), "{job:#}");
    // Group 1 is over; group 2 has not begun: db1 still replicates, unfenced.
    for m in ["web1", "app1"] {
        assert_eq!(lab.machine(m)["replication"], "failed over (uncommitted)", "{m}");
    }
    assert!(lab.replica("mt-r", "db1")["fence"].is_null(), "db1 waits for group 2");
    ok(&lab.run(&["jobs", "confirm", &id]), "confirm the manual action");
    let o = lab.run(&["--output", "json", "jobs", "watch", &id]);
    let job: Value = serde_json::from_slice(&o.stdout).unwrap_or(Value::Null);
    assert_eq!(job["state"], "succeeded", "{job:#}");

    // Order, from the steps' times: group 1, its post-actions, then group 2's pre-action and group 2.
    let g1 = times(&job, "group 1: fail over");
    let announce = times(&job, "announce");
    let manual = times(&job, "check web");
    let pre = times(&job, "db next");
    let g2 = times(&job, "group 2: fail over");
    assert!(g1.1 <= announce.0 && announce.1 <= manual.0 && manual.1 <= pre.0 && pre.1 <= g2.0, "{job:#}");
    let msg = |name: &str| -> String {
        job["steps"].as_array().unwrap().iter().find(|s| s["name"].as_str().unwrap().contains(name)).unwrap()["message"]
            .as_str()
            .unwrap_or_default()
            .to_owned()
    };
    assert!(msg("announce").contains("web is up") && msg("announce").contains("a note"), "script output kept: {job:#}");
    // The replication group went to one multi-machine point; every disk verifies (the
    // machines were left off, so each disk is exactly its point).
    let (w, a) = (lab.machine("web1"), lab.machine("app1"));
    assert!(w["failover"]["point"]["group_tag"].is_string(), "{w:#}");
    assert_eq!(w["failover"]["point"]["group_tag"], a["failover"]["point"]["group_tag"], "{w:#}\n{a:#}");
    assert_eq!(lab.machine("db1")["replication"], "failed over (uncommitted)");
    for (m, seed) in [("web1", 21), ("app1", 23), ("db1", 22)] {
        let disk = copy_of(&lab, m, tmp.path(), &format!("{m}.img"));
        let (good, v) = verify(&lab, m, seed, &disk, None);
        assert!(good, "{m}: {v:#}");
    }
    lab.down();
}
