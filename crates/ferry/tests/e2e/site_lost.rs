//! Failover with the whole primary site lost (issue 13), on lab sites with a standby
//! configuration server at the recovery site: every primary-site process is killed (the
//! configuration server, the process server, the machines) and the links are cut; the operator
//! promotes the standby and fails a recovery plan over through it; the failed-over machines'
//! agents register with it (RP-7) and the recovery-site components follow it under their list of
//! servers. Then the old site comes back: its configuration server is stale and refuses every
//! change, and the old primary's stream stays fenced out.
//!
//! Size: one story; it needs a whole lab.

use std::time::Duration;

use crate::failover_jobs::{failed, protect, recovery_guest, LAB};
use crate::lab_sites::{ferry, kill_group, ok, records, wait, Lab};
use serde_json::Value;

fn lab_with_standby() -> String {
    LAB.replace("[[sites]]\nname = \"recovery\"\n", "[[sites]]\nname = \"recovery\"\nstandby_config_server = true\n")
}

#[test]
fn a_plan_fails_over_through_the_promoted_standby_with_the_primary_site_gone() {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("lab.toml");
    let spec = lab_with_standby();
    assert!(spec.contains("standby_config_server = true"), "{spec}");
    std::fs::write(&cfg, spec).unwrap();
    let dir = tmp.path().join("lab");
    let mut lab = Lab::up(&dir, Some(&cfg));
    let state: Value = serde_json::from_slice(&std::fs::read(dir.join("lab.json")).unwrap()).unwrap();
    let standby = state["standby_config_server"].as_str().unwrap().to_owned();
    let admin_token = state["admin_token"].as_str().unwrap().to_owned();
    // The same operator, through the standby (its tokens are the active server's).
    let mut at_standby = lab.env.clone();
    for (k, v) in at_standby.iter_mut() {
        if *k == "FERRY_SERVER" {
            *v = standby.clone();
        }
    }
    let mut admin_at_standby = at_standby.clone();
    for (k, v) in admin_at_standby.iter_mut() {
        if *k == "FERRY_TOKEN" {
            *v = admin_token.clone();
        }
    }
    ok(&lab.run(&["policies", "create", "gold", "--crash-consistent-secs", "2", "--retention-secs", "3600"]), "policy");
    protect(&lab, &["web1", "db1"]);
    let plan = serde_json::json!({"name": "dr", "groups": [{"machines": ["web1"]}, {"machines": ["db1"]}]});
    let file = tmp.path().join("plan.json");
    std::fs::write(&file, plan.to_string()).unwrap();
    ok(&lab.run(&["plans", "create", file.to_str().unwrap()]), "create the plan");
    for m in ["web1", "db1"] {
        let log = lab.guest(m).join("records.log");
        wait(&format!("{m} writes"), Duration::from_secs(60), || (records(&log) > 30).then_some(()));
    }
    // The standby holds the protection and the plan, and refuses changes.
    wait("the standby has copied the plan and the protections", Duration::from_secs(60), || {
        let o = ferry(&["--output", "json", "plans", "list"], &at_standby);
        let m = ferry(&["--output", "json", "machines"], &at_standby);
        let m: Value = serde_json::from_slice(&m.stdout).unwrap_or(Value::Null);
        let protected = m.as_array().is_some_and(|a| {
            a.iter().filter(|x| x["machine"] == "web1" || x["machine"] == "db1").all(|x| x["master_target"] == "mt-r")
        });
        (String::from_utf8_lossy(&o.stdout).contains("\"dr\"") && protected).then_some(())
    });
    failed(
        &ferry(&["plans", "failover", "dr", "--unplanned"], &at_standby),
        "standby",
        "a failover through the standby before it is promoted",
    );

    // The primary site is lost: its configuration server, process server and machines die, and
    // every link between the sites is cut.
    let dead: Vec<(String, i64)> = lab
        .pids()
        .into_iter()
        .filter(|(n, _)| n == "config-server" || n == "ps-primary" || n.ends_with("/power"))
        .filter(|(n, _)| !n.contains(".recovery"))
        .collect();
    assert!(dead.iter().any(|(n, _)| n == "web1/power"), "{dead:?}");
    for (_, pid) in &dead {
        kill_group(*pid);
    }
    ok(&lab.run(&["lab", "link", "cut"]), "cut the links");
    let mt_records = lab.replica("mt-r", "web1")["journaled_seq"].as_u64().unwrap();
    assert!(mt_records > 0);

    // The operator promotes the standby and fails the plan over through it.
    let st: Value =
        serde_json::from_slice(&ferry(&["--output", "json", "config-server", "promote"], &admin_at_standby).stdout)
            .unwrap();
    assert_eq!((st["role"].as_str(), st["authority"]["epoch"].as_u64()), (Some("active"), Some(2)), "{st:#}");
    let o = ferry(&["--output", "json", "plans", "failover", "dr", "--unplanned"], &at_standby);
    let job: Value = serde_json::from_slice(&o.stdout).unwrap_or(Value::Null);
    assert_eq!(job["state"], "succeeded", "{}\n{job:#}", String::from_utf8_lossy(&o.stderr));
    for m in ["web1", "db1"] {
        let rm = format!("{m}.recovery");
        let rlog = recovery_guest(&lab, &rm).join("records.log");
        wait(&format!("{rm} runs and writes"), Duration::from_secs(120), || (records(&rlog) > 5).then_some(()));
        // Its agent registered with the promoted server (RP-7 with the primary site gone).
        let comps = ferry(&["--output", "json", "components"], &at_standby);
        let comps: Value = serde_json::from_slice(&comps.stdout).unwrap();
        let c = comps.as_array().unwrap().iter().find(|c| c["name"] == rm.as_str()).cloned();
        assert!(c.as_ref().is_some_and(|c| c["identity"].is_string()), "{rm} registered: {comps:#}");
        let r = lab.replica("mt-r", m);
        assert!(r["fence"].is_object(), "{m}'s replica is fenced: {r:#}");
    }
    // The recovery site's master target follows the promoted server (its first address is dead).
    let link = lab.process_status("mt-r")["config_server_link"].clone();
    assert!(link["unreachable_since_ms"].is_null(), "it hears from a server: {link:#}");

    let epoch_file = dir.join("components/master-target-mt-r/config-server.epoch");
    assert_eq!(std::fs::read_to_string(&epoch_file).unwrap().trim(), "2", "it remembers the epoch it follows");

    // The old site comes back while the promoted server cannot be reached (a partition): the
    // old server, unable to ask its peer, believes it is active — and the master target, which
    // saw epoch 2, ignores its epoch-1 settings.
    let sb_pid = lab.pids().into_iter().find(|(n, _)| n == "config-server-recovery").map(|(_, p)| p).unwrap();
    kill_group(sb_pid);
    ok(&lab.run(&["lab", "link", "restore"]), "restore the links");
    ok(&lab.run(&["lab", "restart", "config-server"]), "the old configuration server starts again");
    lab.state = serde_json::from_slice(&std::fs::read(dir.join("lab.json")).unwrap()).unwrap();
    let st: Value =
        serde_json::from_slice(&lab.run(&["--output", "json", "config-server", "authority"]).stdout).unwrap();
    assert_eq!((st["role"].as_str(), st["authority"]["epoch"].as_u64()), (Some("active"), Some(1)), "{st:#}");
    wait("the master target ignores the epoch-1 server", Duration::from_secs(60), || {
        let log = std::fs::read_to_string(dir.join("logs/mt-r.log")).unwrap_or_default();
        let link = lab.process_status("mt-r")["config_server_link"].clone();
        (log.contains("below the highest epoch") && link["unreachable_since_ms"].is_u64()).then_some(())
    });

    // The promoted server is reachable again: the old one asks it, and is stale.
    ok(&lab.run(&["lab", "restart", "config-server-recovery"]), "the promoted server is back");
    let st = wait("the old server learns it is stale", Duration::from_secs(60), || {
        let st: Value =
            serde_json::from_slice(&lab.run(&["--output", "json", "config-server", "authority"]).stdout).ok()?;
        (st["role"] == "stale").then_some(st)
    });
    assert_eq!(st["superseded_by"]["epoch"].as_u64(), Some(2), "{st:#}");
    wait("the master target follows the promoted server again", Duration::from_secs(60), || {
        lab.process_status("mt-r")["config_server_link"]["unreachable_since_ms"].is_null().then_some(())
    });
    let o = lab.run(&["policies", "create", "silver"]);
    failed(&o, "stale", "a change at the old server");
    assert!(String::from_utf8_lossy(&o.stderr).contains("cs-recovery"), "it names the promoted server");
    // The old primary's process server comes back with what it spooled: the master target
    // takes nothing more from the old primary.
    ok(&lab.run(&["lab", "restart", "ps-primary"]), "the old process server starts again");
    std::thread::sleep(Duration::from_secs(3));
    for m in ["web1", "db1"] {
        let r = lab.replica("mt-r", m);
        assert!(r["fence"].is_object(), "{m} stays fenced: {r:#}");
    }
    let m: Value = serde_json::from_slice(&ferry(&["--output", "json", "machines"], &at_standby).stdout).unwrap();
    let web1 = m.as_array().unwrap().iter().find(|x| x["machine"] == "web1").unwrap();
    assert!(web1["replication"].as_str().unwrap().starts_with("failed over"), "{web1:#}");
    failed(
        &ferry(&["failover", "start", "web1", "--unplanned"], &at_standby),
        "already failed over",
        "a second failover",
    );
}
