//! Reprotect on lab sites: every precondition checked before anything changes (dry run and
//! real run), then the failed-over machine replicates back to the old primary's own disks,
//! sending what differs, and the two sides end byte-identical.
//!
//! Size: one story per test; each needs a whole lab.

use std::path::Path;
use std::time::Duration;

use crate::failover_jobs::{copy_of, failed, fork_log, recovery_guest, verify, verify_log};
use crate::lab_sites::{ok, records, wait, Lab};
use serde_json::Value;

const LAB: &str = r#"
boot_delay_secs = 0.5
[[sites]]
name = "primary"
config_server = true
hosts = [{ name = "esx-p1" }]
datastores = [{ name = "vmfs-p", kind = "vmfs", hosts = ["esx-p1"] }, { name = "nfs-p", kind = "nfs", hosts = ["esx-p1"] }]
process_server = { name = "ps-primary" }
[[sites.machines]]
name = "web1"
os_family = "linux"
host = "esx-p1"
datastore = "vmfs-p"
disks = [{ name = "disk0", size = 67108864 }]
workload = { rate = 25, max_blocks = 4, seed = 21 }
[[sites.machines]]
name = "db1"
os_family = "linux"
host = "esx-p1"
datastore = "nfs-p"
disks = [{ name = "disk0", size = 16777216 }]
workload = { rate = 25, max_blocks = 4, seed = 22 }
[[sites.master_targets]]
name = "mt-p"
os_family = "linux"
host = "esx-p1"
[[sites.master_targets]]
name = "mt-pw"
os_family = "windows"
host = "esx-p1"
run = false
[[sites]]
name = "recovery"
hosts = [{ name = "esx-r1" }]
datastores = [{ name = "vmfs-r", kind = "vmfs", hosts = ["esx-r1"] }]
process_server = { name = "ps-recovery" }
[[sites.master_targets]]
name = "mt-r"
os_family = "linux"
host = "esx-r1"
"#;

/// A lab from `spec` in a temp folder (kept alive by the returned guard) with policy `gold`
/// (crash-consistent points every 2 s).
fn lab_with_gold(spec: &str) -> (tempfile::TempDir, Lab) {
    let tmp = tempfile::tempdir().unwrap();
    let cfg = tmp.path().join("lab.toml");
    std::fs::write(&cfg, spec).unwrap();
    let lab = Lab::up(&tmp.path().join("lab"), Some(&cfg));
    ok(&lab.run(&["policies", "create", "gold", "--crash-consistent-secs", "2", "--retention-secs", "3600"]), "policy");
    (tmp, lab)
}

/// `ferry reprotect M --dry-run` (JSON) to `mt`: (exit ok, the plan).
fn dry_run(lab: &Lab, m: &str, mt: &str, ds: &str) -> (bool, Value) {
    let o = lab.run(&[
        "--output",
        "json",
        "reprotect",
        m,
        "--master-target",
        mt,
        "--process-server",
        "ps-recovery",
        "--datastore",
        ds,
        "--dry-run",
    ]);
    let v: Value = serde_json::from_slice(&o.stdout).unwrap_or(Value::Null);
    (o.status.success(), v)
}

fn check<'a>(plan: &'a Value, id: &str) -> &'a Value {
    plan["checks"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["id"] == id)
        .unwrap_or_else(|| panic!("no check {id}: {plan:#}"))
}

fn identical(a: &Path, b: &Path) -> Result<(), String> {
    let o = std::process::Command::new("qemu-img")
        .args(["compare", "-f", "raw", "-F", "raw"])
        .arg(a)
        .arg(b)
        .output()
        .unwrap();
    if o.status.success() {
        Ok(())
    } else {
        Err(String::from_utf8_lossy(&o.stdout).into_owned() + &String::from_utf8_lossy(&o.stderr))
    }
}

#[test]
fn reprotect_checks_first_then_resyncs_only_what_differs_to_the_primary_disks() {
    let (tmp, mut lab) = lab_with_gold(LAB);
    let job = lab.json(&[
        "protect",
        "web1",
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
    assert_eq!(job["state"], "succeeded", "{job:#}");
    let log = lab.guest("web1").join("records.log");
    wait("web1 writes", Duration::from_secs(60), || (records(&log) > 40).then_some(()));
    wait("and replicates", Duration::from_secs(60), || (lab.agent_status("web1")["caught_up"] == true).then_some(()));

    // RP-1: a machine that never failed over, and one that does not exist, are refused.
    let (good, plan) = dry_run(&lab, "web1", "mt-p", "vmfs-p");
    assert!(!good && plan["ready"] == false, "{plan:#}");
    assert_eq!(check(&plan, "RP-1")["passed"], false, "{plan:#}");
    assert!(check(&plan, "RP-1")["message"].as_str().unwrap().contains("never failed over"), "{plan:#}");
    let (_, plan) = dry_run(&lab, "nobody", "mt-p", "vmfs-p");
    assert!(check(&plan, "RP-1")["message"].as_str().unwrap().contains("created at the recovery site"), "{plan:#}");

    // The primary site is lost with writes the recovery site never got: the link to the
    // recovery master target is cut first, then the machine crashes.
    ok(&lab.run(&["lab", "link", "cut", "mt-r"]), "cut the data link");
    let n = records(&log);
    wait("web1 writes with the link cut", Duration::from_secs(60), || (records(&log) > n + 5).then_some(()));
    ok(&lab.run(&["lab", "crash", "web1"]), "the primary is lost");
    let job = lab.json(&["failover", "start", "web1", "--unplanned", "--no-start"]);
    assert_eq!(job["state"], "succeeded", "{job:#}");
    ok(&lab.run(&["lab", "link", "restore", "mt-r"]), "restore the link");
    let at_point = copy_of(&lab, "web1", tmp.path(), "web1-at-point.img");
    let (good, v) = verify(&lab, "web1", 21, &at_point, None);
    assert!(good, "{v:#}");
    let k = v["prefix_seq"].as_u64().unwrap();
    assert!((k as usize) < records(&log), "the primary's tail never reached the recovery site: {k}");
    ok(&lab.run(&["lab", "power-on", "web1.recovery"]), "start the failed-over machine");
    let recovery_log = recovery_guest(&lab, "web1.recovery").join("records.log");
    wait("the failed-over machine writes", Duration::from_secs(60), || (records(&recovery_log) > 20).then_some(()));

    // Not committed yet: refused with the failover's code; nothing changes.
    let (_, plan) = dry_run(&lab, "web1", "mt-p", "vmfs-p");
    assert_eq!(
        (check(&plan, "failover-committed")["passed"].as_bool(), check(&plan, "failover-committed")["code"].as_u64()),
        (Some(false), Some(9019)),
        "{plan:#}"
    );
    assert_eq!(lab.json(&["failover", "commit", "web1"])["state"], "succeeded");
    wait("the failed-over machine's agent reports", Duration::from_secs(60), || {
        let (_, plan) = dry_run(&lab, "web1", "mt-p", "vmfs-p");
        (check(&plan, "RP-8")["passed"] == true).then_some(())
    });

    // DS-1: db1 lives on an NFS datastore; failed over too, its reprotect to the original
    // location is refused (and, not running at the recovery site, RP-8 with 78093).
    ok(&lab.run(&["lab", "crash", "db1"]), "db1 is lost too");
    assert_eq!(lab.json(&["failover", "start", "db1", "--unplanned", "--no-start"])["state"], "succeeded");
    assert_eq!(lab.json(&["failover", "commit", "db1"])["state"], "succeeded");
    let (good, plan) = dry_run(&lab, "db1", "mt-p", "vmfs-p");
    assert!(!good && check(&plan, "DS-1")["passed"] == false, "{plan:#}");
    assert!(check(&plan, "DS-1")["message"].as_str().unwrap().contains("NFS"), "{plan:#}");
    assert_eq!(check(&plan, "RP-8")["code"].as_u64(), Some(78093), "{plan:#}");

    // Wrong choices, each refused by its check with its code and remedy.
    let (good, plan) = dry_run(&lab, "web1", "mt-r", "vmfs-p");
    assert!(!good && check(&plan, "ST-2")["passed"] == false, "a recovery-site master target: {plan:#}");
    let (_, plan) = dry_run(&lab, "web1", "mt-pw", "vmfs-p");
    let mt2 = check(&plan, "MT-2");
    assert!(mt2["passed"] == false && mt2["remedy"].as_str().is_some(), "a Windows master target: {plan:#}");
    let (_, plan) = dry_run(&lab, "web1", "mt-p", "nope");
    assert_eq!(check(&plan, "ST-4")["passed"], false, "{plan:#}");
    // A real run performs the same checks first and changes nothing when one fails.
    let o = lab.run(&[
        "reprotect",
        "web1",
        "--master-target",
        "mt-pw",
        "--process-server",
        "ps-recovery",
        "--datastore",
        "vmfs-p",
    ]);
    failed(&o, "MT-2", "a reprotect to a Windows master target");
    let rm = lab.machine("web1.recovery");
    assert!(rm["reprotect"].is_null() && rm["power"] == "on", "nothing changed: {rm:#}");
    assert_eq!(lab.agent_status_at(&recovery_guest(&lab, "web1.recovery"))["mode"], "tracking");

    // Split brain: the old primary is started again after the failover (an operator at the
    // lost site) and writes. The reprotect powers it off (it stays off), finds from its agent's
    // write lease that it wrote after the failover started, and stops, naming what would be
    // discarded; nothing of the reverse replica is set up.
    // Its clock is a minute behind (beyond the margin): by its own timestamps its writes would
    // look older than the failover, so the clock must decide nothing. (The configuration server
    // starts the lab's guests: restarted with the fault, it hands it to web1's agent.)
    let mut env = lab.env.clone();
    env.push(("FERRY_CLOCK_OFFSET_MS", "-60000".into()));
    ok(&crate::lab_sites::ferry(&["lab", "restart", "config-server"], &env), "restart the server");
    lab.reload();
    let split_from = records(&log) as u64;
    ok(&lab.run(&["lab", "power-on", "web1", "--allow-failed-over"]), "the old primary runs again");
    let n = records(&log);
    wait("the old primary writes after the failover", Duration::from_secs(60), || {
        (records(&log) > n + 10).then_some(())
    });
    let reprotect = |lab: &Lab, extra: &[&str]| {
        let mut args = vec![
            "--output",
            "json",
            "reprotect",
            "web1",
            "--master-target",
            "mt-p",
            "--process-server",
            "ps-recovery",
            "--datastore",
            "vmfs-p",
            "--clock-skew-secs",
            "1",
        ];
        args.extend_from_slice(extra);
        lab.run(&args)
    };
    let o = reprotect(&lab, &[]);
    failed(&o, "split brain", "a reprotect over a primary that wrote after the failover");
    failed(&o, "--discard-primary-changes", "the choice is named");
    failed(&o, "60.0 s off", "the skewed clock is the reason");
    assert_eq!(lab.machine("web1")["power"], "off", "the job powered the old primary off (ST-10)");
    assert_eq!(lab.agent_status_at(&recovery_guest(&lab, "web1.recovery"))["mode"], "tracking", "nothing set up");
    let mt_p = lab.replica("mt-p", "web1.recovery");
    assert!(mt_p.is_null(), "no reverse replica: {mt_p:#}");
    let primary_disk = lab.dir.join("sites/primary/datastores/vmfs-p/web1/disk0.img");
    let before = tmp.path().join("primary-before-reprotect.img");
    std::fs::copy(&primary_disk, &before).unwrap();

    // Every check passes; the dry run says what will happen.
    let (good, plan) = dry_run(&lab, "web1", "mt-p", "vmfs-p");
    assert!(good && plan["ready"] == true, "{plan:#}");
    assert_eq!(
        (plan["recovery_machine"].as_str(), plan["direction"].as_str()),
        (Some("web1.recovery"), Some("recovery → primary"))
    );
    assert_eq!((plan["policy"].as_str(), plan["location"].as_str()), (Some("gold-failback"), Some("original")));

    // Bit rot after the resync, before the comparison: the primary's master target flips one
    // byte of the adopted disk as the first verify chunk arrives. The comparison must find it,
    // not declare the machine Protected on that round, and repair it.
    let failpoint = "master-target.verify.corrupt-block";
    assert!(ferry_sys::fail::ALL.contains(&failpoint));
    let mut env = lab.env.clone();
    env.push(("FERRY_FAILPOINTS", format!("{failpoint}=fire")));
    ok(&crate::lab_sites::ferry(&["lab", "restart", "mt-p"], &env), "restart the primary's master target armed");
    lab.reload();

    // The operator's choice given: the primary's writes after the failover are overwritten.
    let o = reprotect(&lab, &["--discard-primary-changes"]);
    let job: Value = serde_json::from_slice(&o.stdout).unwrap_or(Value::Null);
    assert_eq!(job["state"], "succeeded", "{job:#}\n{}", String::from_utf8_lossy(&o.stderr));
    assert_eq!(job["steps"].as_array().unwrap().len(), 10, "{job:#}");
    assert_eq!(lab.machine("web1.recovery")["reprotect"]["primary_writes"], "split-brain-discarded");
    let mt_log = std::fs::read_to_string(lab.dir.join("logs/mt-p.log")).unwrap();
    assert!(mt_log.contains(&format!("ferry failpoint {failpoint} fired")), "the block was corrupted");
    let verified = job["steps"][8]["message"].as_str().unwrap_or_default();
    assert!(
        verified.contains("round 2") && verified.contains("found and repaired 1 differing block(s)"),
        "the first comparison found the corrupted block, the second none: {verified}"
    );
    let rm = lab.machine("web1.recovery");
    assert_eq!(rm["replication"], "protected", "{rm:#}");
    assert_eq!(rm["master_target"], "mt-p", "{rm:#}");
    assert_eq!(rm["policy"], "gold-failback", "{rm:#}");
    assert_eq!(lab.machine("web1")["reprotected_by"], "web1.recovery");
    // The primary's master target restarts with the adoption in its settings (they become TOML
    // at its start: a lineage above 2^63 must not break them) and reopens the adopted replica.
    ok(&lab.run(&["lab", "restart", "mt-p"]), "restart the primary's master target");
    lab.reload();
    let mt_log = std::fs::read_to_string(lab.dir.join("logs/mt-p.log")).unwrap();
    assert!(!mt_log.contains("do not convert to TOML"), "settings taken at start");
    failed(&lab.run(&["lab", "power-on", "web1"]), "allow-failed-over", "the old primary stays off (ST-10)");

    // With the recovery machine's workload paused and everything applied at the primary's
    // master target, the old primary's disk is byte-identical to the running copy, and holds
    // the point's records then the recovery site's (none of the primary's lost tail).
    let rguest = recovery_guest(&lab, "web1.recovery");
    std::fs::write(rguest.join("pause"), b"").unwrap();
    wait("the recovery workload pauses", Duration::from_secs(60), || {
        rguest.join("pause.paused").exists().then_some(())
    });
    wait("the primary's master target applied everything", Duration::from_secs(60), || {
        let a = lab.agent_status_at(&rguest);
        let r = lab.replica("mt-p", "web1.recovery");
        (a["caught_up"] == true && r["applied_seq"] == a["last_seq"] && r["consistent"] == true).then_some(())
    });
    let recovery_disk = lab.dir.join("sites/recovery/datastores/vmfs-r/web1/disk0.img");
    identical(&primary_disk, &recovery_disk).unwrap();
    // Every block the resync wrote over is kept as the primary had it — among them each block
    // the primary wrote after the failover (the history the operator chose to discard).
    let kept = &lab.machine("web1.recovery")["reprotect"]["primary_overwritten"];
    assert_eq!(kept["complete"], true, "{kept:#}");
    let kept_disk = std::fs::read(kept["disks"][0].as_str().unwrap()).unwrap();
    let before_data = std::fs::read(&before).unwrap();
    let mut kept_blocks = std::collections::BTreeSet::new();
    let saved = Path::new(kept["dir"].as_str().unwrap()).join("saved.jsonl");
    for line in std::fs::read_to_string(&saved).unwrap().lines() {
        let r: Value = serde_json::from_str(line).unwrap();
        let (off, len) = (r["offset"].as_u64().unwrap() as usize, r["len"].as_u64().unwrap() as usize);
        assert_eq!(kept_disk[off..off + len], before_data[off..off + len], "kept as the primary had it at {off}");
        kept_blocks.extend(off / 4096..(off + len).div_ceil(4096));
    }
    assert_eq!(kept_blocks.len() as u64, kept["blocks"].as_u64().unwrap(), "{kept:#}");
    let mut split_blocks = 0;
    for line in std::fs::read_to_string(&log).unwrap().lines() {
        let v: Vec<u64> = line.split_whitespace().map(|x| x.parse().unwrap()).collect();
        if v[0] > split_from {
            for b in v[2] / 4096..v[2] / 4096 + v[3] {
                assert!(kept_blocks.contains(&(b as usize)), "block {b} the primary wrote after the failover is kept");
                split_blocks += 1;
            }
        }
    }
    assert!(split_blocks > 0);
    let forked = fork_log(&lab, "web1", k, &recovery_log, tmp.path());
    let copy = tmp.path().join("primary-after.img");
    std::fs::copy(&primary_disk, &copy).unwrap();
    let (good, v) = verify_log(&lab, &forked, 21, &copy, None);
    assert!(good, "the primary's disk now holds the recovery site's history: {v:#}");

    // Only what differs travelled: the tracked extents (after the point, and since the boot)
    // and the primary's unshipped regions, never the whole disk.
    let r = &rm["reprotect"];
    let (sent, tracked, unshipped) = (
        r["resynced_bytes"].as_u64().unwrap(),
        r["tracked_bytes"].as_u64().unwrap(),
        r["primary_unshipped_bytes"].as_u64().unwrap(),
    );
    // "Changed", from the workload logs alone: the blocks of the primary's records after the
    // point (the recovery site's put back, and the tail it never got) and of every record
    // written at the recovery site (taken while paused: the log is complete).
    let mut changed = std::collections::BTreeSet::new();
    for (log, after) in [(&log, k), (&recovery_log, 0)] {
        for line in std::fs::read_to_string(log).unwrap().lines() {
            let v: Vec<u64> = line.split_whitespace().map(|x| x.parse().unwrap()).collect();
            if v[0] > after {
                changed.extend((0..v[3]).map(|i| v[2] / 4096 + i));
            }
        }
    }
    let changed = changed.len() as u64 * 4096;
    eprintln!(
        "reprotect of a 64 MiB disk: {sent} bytes resynced for {changed} changed; tracked {tracked}, primary's regions not at the recovery site {unshipped}"
    );
    assert!(unshipped > 0, "the primary's unshipped tail was found: {r:#}");
    assert!(sent <= changed + changed / 10, "only what differs travelled: {sent} bytes for {changed} changed: {r:#}");
    std::fs::remove_file(rguest.join("pause")).unwrap();
    let n = records(&recovery_log);
    wait("the recovery machine writes on, replicated", Duration::from_secs(60), || {
        (records(&recovery_log) > n + 10).then_some(())
    });

    // Planned failback (FB-1): the recovery machine is quiesced, drained to the primary's master
    // target and shut down; the original machine's own disks hold its last write (no loss).
    let reverse_lineage = lab.agent_status_at(&rguest)["lineage"]["id"].as_u64().unwrap();
    failed(
        &lab.run(&["failover", "cancel", "web1.recovery"]),
        "is not failed over",
        "nothing to cancel before the failback",
    );
    let job = lab.json(&["failback", "web1", "--planned", "--no-start"]);
    assert_eq!(job["state"], "succeeded", "{job:#}");
    assert!(job["steps"].to_string().contains("fail back: start web1"), "{job:#}");
    assert_eq!(lab.machine("web1.recovery")["power"], "off", "the recovery machine was shut down");
    identical(&primary_disk, &recovery_disk).expect("a planned failback loses nothing");
    let (good, v) = verify_log(&lab, &forked_log_now(&lab, k, &recovery_log, tmp.path()), 21, &primary_disk, None);
    assert!(good, "the primary's disks hold the recovery site's history to its last record: {v:#}");
    failed(&lab.run(&["failover", "cancel", "web1.recovery"]), "failback", "a failback is not cancelled");
    ok(&lab.run(&["lab", "power-on", "web1"]), "the failed-back machine boots (no override needed)");
    wait("the failed-back machine writes", Duration::from_secs(60), || {
        let a = lab.agent_status("web1");
        (a["mode"] == "tracking" && a["lineage"]["parent_id"].as_u64() == Some(reverse_lineage)).then_some(a)
    });
    let job = lab.json(&["failover", "commit", "web1.recovery"]);
    assert_eq!(job["state"], "succeeded", "{job:#}");

    // Reprotect forward again (primary → recovery): the earlier cycle's replica at mt-r goes
    // (its disks, which web1.recovery ran from, are adopted), the forward policy comes back,
    // and only what web1 wrote since it booted travels.
    let o = lab.run(&[
        "--output",
        "json",
        "reprotect",
        "web1.recovery",
        "--master-target",
        "mt-r",
        "--process-server",
        "ps-primary",
        "--datastore",
        "vmfs-r",
        "--dry-run",
    ]);
    let plan: Value = serde_json::from_slice(&o.stdout).unwrap_or(Value::Null);
    assert_eq!(plan["ready"], true, "{plan:#}");
    assert_eq!(plan["recovery_machine"], "web1", "{plan:#}");
    assert_eq!(plan["policy"], "gold", "the forward policy again: {plan:#}");
    assert!(check(&plan, "leftover-replica")["message"].as_str().unwrap().contains("removed first"), "{plan:#}");
    let o = lab.run(&[
        "--output",
        "json",
        "reprotect",
        "web1.recovery",
        "--master-target",
        "mt-r",
        "--process-server",
        "ps-primary",
        "--datastore",
        "vmfs-r",
    ]);
    let job: Value = serde_json::from_slice(&o.stdout).unwrap_or(Value::Null);
    assert_eq!(job["state"], "succeeded", "{job:#}\n{}", String::from_utf8_lossy(&o.stderr));
    let web1 = lab.machine("web1");
    assert_eq!(web1["replication"], "protected", "{web1:#}");
    assert_eq!((web1["master_target"].as_str(), web1["policy"].as_str()), (Some("mt-r"), Some("gold")), "{web1:#}");
    assert_eq!(lab.machine("web1.recovery")["reprotected_by"], "web1");
    let pguest = lab.guest("web1");
    std::fs::write(pguest.join("pause"), b"").unwrap();
    wait("the primary workload pauses", Duration::from_secs(60), || pguest.join("pause.paused").exists().then_some(()));
    wait("the recovery master target applied everything", Duration::from_secs(60), || {
        let a = lab.agent_status("web1");
        let r = lab.replica("mt-r", "web1");
        (a["caught_up"] == true && r["applied_seq"] == a["last_seq"] && r["consistent"] == true).then_some(())
    });
    identical(&primary_disk, &recovery_disk).expect("protected as at the start: both sites byte-identical");
    let sent = web1["reprotect"]["resynced_bytes"].as_u64().unwrap();
    eprintln!("reprotect forward after the failback: {sent} bytes resynced");
    assert!(sent < 64 << 20, "no full copy: {sent} bytes");
    std::fs::remove_file(pguest.join("pause")).unwrap();
    lab.down();
}

/// The forked log of web1 (its records up to the point, then the recovery site's), as it is now.
fn forked_log_now(lab: &Lab, k: u64, recovery_log: &Path, tmp: &Path) -> std::path::PathBuf {
    let dir = tmp.join("fork-now");
    std::fs::create_dir_all(&dir).unwrap();
    fork_log(lab, "web1", k, recovery_log, &dir)
}

const CYCLES_LAB: &str = r#"
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
disks = [{ name = "disk0", size = 67108864 }]
workload = { rate = 25, max_blocks = 4, seed = 31 }
[[sites.master_targets]]
name = "mt-p"
os_family = "linux"
host = "esx-p1"
[[sites]]
name = "recovery"
hosts = [{ name = "esx-r1" }]
datastores = [{ name = "vmfs-r", kind = "vmfs", hosts = ["esx-r1"] }]
process_server = { name = "ps-recovery" }
[[sites.master_targets]]
name = "mt-r"
os_family = "linux"
host = "esx-r1"
"#;

/// The 4 KiB blocks of the records in `log` after its first `after` lines.
fn blocks_after(log: &Path, after: usize) -> std::collections::BTreeSet<u64> {
    let mut set = std::collections::BTreeSet::new();
    for line in std::fs::read_to_string(log).unwrap_or_default().lines().skip(after) {
        let v: Vec<u64> = line.split_whitespace().filter_map(|x| x.parse().ok()).collect();
        if v.len() >= 4 {
            set.extend((0..v[3]).map(|i| v[2] / 4096 + i));
        }
    }
    set
}

/// Reprotect `m` (its failed-over machine replicates to `mt`), then with the workload in `guest`
/// paused and everything applied, both disks byte-identical; returns the bytes resynced and
/// whether the hash fallback ran.
fn reprotect_and_compare(
    lab: &Lab,
    m: &str,
    to: (&str, &str, &str),
    guest: &Path,
    disks: (&Path, &Path),
) -> (u64, bool) {
    let (mt, ps, ds) = to;
    let o = lab.run(&[
        "--output",
        "json",
        "reprotect",
        m,
        "--master-target",
        mt,
        "--process-server",
        ps,
        "--datastore",
        ds,
        "--clock-skew-secs",
        "1",
    ]);
    let job: Value = serde_json::from_slice(&o.stdout).unwrap_or(Value::Null);
    assert_eq!(job["state"], "succeeded", "reprotect of {m}: {job:#}\n{}", String::from_utf8_lossy(&o.stderr));
    let rm = job["params"]["recovery_machine"].as_str().unwrap().to_owned();
    let rec = lab.machine(&rm);
    assert_eq!(rec["replication"], "protected", "{rec:#}");
    settle_and_compare(lab, mt, &rm, guest, disks);
    let r = &rec["reprotect"];
    (r["resynced_bytes"].as_u64().unwrap(), r["hash_fallback"] == true)
}

#[test]
fn three_cycles_of_failover_reprotect_failback_reprotect_never_copy_the_whole_disk() {
    let (_tmp, mut lab) = lab_with_gold(CYCLES_LAB);
    crate::failover_jobs::protect(&lab, &["web1"]);
    let pguest = lab.guest("web1");
    let rguest = recovery_guest(&lab, "web1.recovery");
    let (plog, rlog) = (pguest.join("records.log"), rguest.join("records.log"));
    wait("web1 writes and replicates", Duration::from_secs(90), || {
        (records(&plog) > 40 && lab.agent_status("web1")["caught_up"] == true).then_some(())
    });
    let primary_disk = lab.dir.join("sites/primary/datastores/vmfs-p/web1/disk0.img");
    let recovery_disk = lab.dir.join("sites/recovery/datastores/vmfs-r/web1/disk0.img");
    let disk_size = 64u64 << 20;
    for cycle in 1..=3 {
        // Failover to the recovery site (from the second cycle on, it boots web1.recovery on
        // its own disks, as a failback does the other way): planned, except in the last cycle,
        // where the primary is lost with writes the recovery site never got — stopped well
        // before the failover starts, so they are the expected loss, not a split brain.
        if cycle < 3 {
            let job = lab.json(&["failover", "start", "web1", "--planned", "--no-start"]);
            assert_eq!(job["state"], "succeeded", "cycle {cycle}: {job:#}");
            identical(&primary_disk, &recovery_disk)
                .unwrap_or_else(|e| panic!("cycle {cycle}: planned failover lost: {e}"));
        } else {
            ok(&lab.run(&["lab", "link", "cut", "mt-r"]), "cut the data link");
            let n = records(&plog);
            wait("web1 writes with the link cut", Duration::from_secs(60), || (records(&plog) > n + 5).then_some(()));
            ok(&lab.run(&["lab", "crash", "web1"]), "the primary is lost");
            // Its write lease (1 s) and the margin given below (1 s) both end before the failover.
            std::thread::sleep(Duration::from_millis(2500));
            let job = lab.json(&["failover", "start", "web1", "--unplanned", "--no-start"]);
            assert_eq!(job["state"], "succeeded", "cycle {cycle}: {job:#}");
            ok(&lab.run(&["lab", "link", "restore", "mt-r"]), "restore the link");
        }
        ok(&lab.run(&["lab", "power-on", "web1.recovery", "--allow-failed-over"]), "start the recovery machine");
        assert_eq!(lab.json(&["failover", "commit", "web1"])["state"], "succeeded", "cycle {cycle}");
        if cycle == 2 {
            // The recovery machine's agent state is lost after it ran: what it wrote is not
            // tracked any more, so the reprotect compares whole disks by hash, not copies them.
            wait("web1.recovery writes", Duration::from_secs(60), || (records(&rlog) > 10).then_some(()));
            ok(&lab.run(&["lab", "power-off", "web1.recovery"]), "stop the recovery machine");
            std::fs::remove_dir_all(rguest.join("agent")).unwrap();
            ok(&lab.run(&["lab", "power-on", "web1.recovery", "--allow-failed-over"]), "start it again");
            wait("its agent reports the lost tracking", Duration::from_secs(60), || {
                lab.agent_status_at(&rguest)["tracking_lost"].is_string().then_some(())
            });
        }
        let from = records(&rlog);
        wait("web1.recovery writes", Duration::from_secs(60), || (records(&rlog) > from + 20).then_some(()));
        let (sent, fallback) = reprotect_and_compare(
            &lab,
            "web1",
            ("mt-p", "ps-recovery", "vmfs-p"),
            &rguest,
            (&recovery_disk, &primary_disk),
        );
        // Only blocks the recovery machine wrote can differ (a planned failover loses nothing;
        // the unplanned one adds the primary's lost tail).
        let mut blocks = blocks_after(&rlog, 0);
        if cycle == 3 {
            blocks.extend(blocks_after(&plog, 0));
            let r = &lab.machine("web1.recovery")["reprotect"];
            assert_eq!(r["primary_writes"], "expected-loss", "written before the failover started: {r:#}");
            assert!(r["primary_last_write_ms"].is_u64() && r["primary_unshipped_bytes"].as_u64() > Some(0), "{r:#}");
        }
        let ever = blocks.len() as u64 * 4096;
        eprintln!("cycle {cycle}: reprotect to the primary resynced {sent} bytes (hash fallback {fallback}); the recovery machine ever wrote {ever} bytes of blocks");
        assert!(sent <= ever + ever / 10, "cycle {cycle}: {sent} bytes sent, at most {ever} could differ");
        assert_eq!(fallback, cycle == 2, "cycle {cycle}: the hash fallback runs exactly when tracking was lost");
        assert!(sent < disk_size / 4, "cycle {cycle}: no full copy ({sent} bytes)");

        // Planned failback, then forward again.
        let job = lab.json(&["failover", "start", "web1.recovery", "--planned"]);
        assert_eq!(job["state"], "succeeded", "cycle {cycle}: {job:#}");
        assert_eq!(lab.json(&["failover", "commit", "web1.recovery"])["state"], "succeeded", "cycle {cycle}");
        let from = records(&plog);
        wait("web1 writes again", Duration::from_secs(60), || (records(&plog) > from + 20).then_some(()));
        let (sent, fallback) = reprotect_and_compare(
            &lab,
            "web1.recovery",
            ("mt-r", "ps-primary", "vmfs-r"),
            &pguest,
            (&primary_disk, &recovery_disk),
        );
        eprintln!("cycle {cycle}: reprotect forward resynced {sent} bytes");
        assert!(!fallback && sent < disk_size / 4, "cycle {cycle}: forward again without a full copy ({sent} bytes)");
        let web1 = lab.machine("web1");
        assert_eq!((web1["replication"].as_str(), web1["policy"].as_str()), (Some("protected"), Some("gold")));
    }
    lab.down();
}

const PLAN_LAB: &str = r#"
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
workload = { rate = 25, max_blocks = 4, seed = 31 }
[[sites.machines]]
name = "app1"
os_family = "linux"
host = "esx-p1"
datastore = "vmfs-p"
disks = [{ name = "disk0", size = 16777216 }]
workload = { rate = 25, max_blocks = 4, seed = 32 }
[[sites.master_targets]]
name = "mt-p"
os_family = "linux"
host = "esx-p1"
[[sites.master_targets]]
name = "mt-p2"
os_family = "linux"
host = "esx-p1"
run = false
[[sites]]
name = "recovery"
hosts = [{ name = "esx-r1" }]
datastores = [{ name = "vmfs-r", kind = "vmfs", hosts = ["esx-r1"] }]
process_server = { name = "ps-recovery" }
[[sites.master_targets]]
name = "mt-r"
os_family = "linux"
host = "esx-r1"
[[groups]]
name = "grp"
machines = ["web1", "app1"]
"#;

/// Pause the workload of the machine that runs at `guest`, wait until `mt` applied all of
/// replica `rm`, compare `disks`, resume.
fn settle_and_compare(lab: &Lab, mt: &str, rm: &str, guest: &Path, disks: (&Path, &Path)) {
    std::fs::write(guest.join("pause"), b"").unwrap();
    wait("the workload pauses", Duration::from_secs(60), || guest.join("pause.paused").exists().then_some(()));
    wait("the master target applied everything", Duration::from_secs(60), || {
        let a = lab.agent_status_at(guest);
        let r = lab.replica(mt, rm);
        (a["caught_up"] == true && r["applied_seq"] == a["last_seq"] && r["consistent"] == true).then_some(())
    });
    identical(disks.0, disks.1).unwrap_or_else(|e| panic!("{rm}: {e}"));
    std::fs::remove_file(guest.join("pause")).unwrap();
}

#[test]
fn a_replication_group_is_reprotected_and_failed_back_only_through_its_recovery_plan() {
    let (tmp, mut lab) = lab_with_gold(PLAN_LAB);
    crate::failover_jobs::protect(&lab, &["--group", "grp"]);
    let plan = serde_json::json!({"name": "tier", "groups": [{"replication_groups": ["grp"]}]});
    let file = tmp.path().join("plan.json");
    std::fs::write(&file, plan.to_string()).unwrap();
    ok(&lab.run(&["plans", "create", file.to_str().unwrap()]), "create the plan");
    let ms = ["app1", "web1"];
    for m in ms {
        let log = lab.guest(m).join("records.log");
        wait(&format!("{m} writes"), Duration::from_secs(60), || (records(&log) > 30).then_some(()));
    }
    let job = lab.json(&["plans", "failover", "tier", "--planned"]);
    assert_eq!(job["state"], "succeeded", "{job:#}");
    for m in ms {
        assert_eq!(lab.json(&["failover", "commit", m])["state"], "succeeded", "commit {m}");
        let rlog = recovery_guest(&lab, &format!("{m}.recovery")).join("records.log");
        wait(&format!("{m}.recovery writes"), Duration::from_secs(90), || (records(&rlog) > 20).then_some(()));
    }

    // RG-3: a member alone is refused, and so is a plan without values for every machine;
    // RG-2: one group, two master targets. Nothing changes.
    let (good, plan) = dry_run(&lab, "web1", "mt-p", "vmfs-p");
    assert!(!good && check(&plan, "RG-3")["passed"] == false, "{plan:#}");
    failed(
        &lab.run(&[
            "reprotect",
            "web1",
            "--master-target",
            "mt-p",
            "--process-server",
            "ps-recovery",
            "--datastore",
            "vmfs-p",
        ]),
        "RG-3",
        "a group member reprotected alone",
    );
    let plan_dry = |extra: &[&str]| -> (bool, Value) {
        let mut a = vec!["--output", "json", "plans", "reprotect", "tier", "--dry-run"];
        a.extend_from_slice(extra);
        let o = lab.run(&a);
        (o.status.success(), serde_json::from_slice(&o.stdout).unwrap_or(Value::Null))
    };
    let (good, plan) = plan_dry(&["--machine", "web1=mt-p,ps-recovery,vmfs-p"]);
    assert!(!good && check(&plan, "RG-3")["passed"] == false, "values for app1 missing: {plan:#}");
    let (good, plan) =
        plan_dry(&["--machine", "web1=mt-p,ps-recovery,vmfs-p", "--machine", "app1=mt-p2,ps-recovery,vmfs-p"]);
    assert!(!good && check(&plan, "RG-2")["passed"] == false, "{plan:#}");
    assert_eq!(check(&plan, "RG-1")["passed"], true, "{plan:#}");
    let o = lab.run(&[
        "plans",
        "reprotect",
        "tier",
        "--machine",
        "web1=mt-p,ps-recovery,vmfs-p",
        "--machine",
        "app1=mt-p2,ps-recovery,vmfs-p",
    ]);
    failed(&o, "RG-2", "a group reprotected to two master targets");
    for m in ms {
        let rm = format!("{m}.recovery");
        assert!(lab.machine(&rm)["reprotect"].is_null(), "nothing changed for {rm}");
        assert!(lab.replica("mt-p", &rm).is_null(), "no replica of {rm} at mt-p");
    }
    let defaults = ["--master-target", "mt-p", "--process-server", "ps-recovery", "--datastore", "vmfs-p"];
    let (good, plan) = plan_dry(&defaults);
    assert!(good && plan["ready"] == true, "{plan:#}");

    // The plan reprotect: both members replicate back together, still one group.
    let mut a = vec!["plans", "reprotect", "tier", "--clock-skew-secs", "1"];
    a.extend_from_slice(&defaults);
    let job = lab.json(&a);
    assert_eq!(job["state"], "succeeded", "{job:#}");
    assert_eq!(job["kind"], "plan-reprotect");
    for m in ms {
        let rm = format!("{m}.recovery");
        let v = lab.machine(&rm);
        assert_eq!((v["replication"].as_str(), v["group"].as_str()), (Some("protected"), Some("grp")), "{v:#}");
        let rguest = recovery_guest(&lab, &rm);
        let (p, r) = (
            lab.dir.join(format!("sites/primary/datastores/vmfs-p/{m}/disk0.img")),
            lab.dir.join(format!("sites/recovery/datastores/vmfs-r/{m}/disk0.img")),
        );
        settle_and_compare(&lab, "mt-p", &rm, &rguest, (&r, &p));
    }
    // The group takes multi-machine points in the reverse direction (app1.recovery coordinates).
    let config = recovery_guest(&lab, "app1.recovery").join("agent.toml");
    let g = lab.json(&["agent", "group-point", "--config", config.to_str().unwrap()]);
    assert_eq!(g["committed"], true, "{g:#}");
    assert_eq!(g["members"].as_array().map(|m| m.len()), Some(2), "{g:#}");

    // The plan fails back (planned), then reprotects forward again.
    failed(
        &lab.run(&["plans", "failback", "tier", "--unplanned", "--point", "latest-processed"]),
        "latest-app",
        "RC-1",
    );
    let job = lab.json(&["plans", "failback", "tier", "--planned"]);
    assert_eq!(job["state"], "succeeded", "{job:#}");
    for m in ms {
        assert_eq!(lab.json(&["failover", "commit", &format!("{m}.recovery")])["state"], "succeeded");
        let log = lab.guest(m).join("records.log");
        let from = records(&log);
        wait(&format!("{m} writes again"), Duration::from_secs(90), || (records(&log) > from + 10).then_some(()));
    }
    let job = lab.json(&[
        "plans",
        "reprotect",
        "tier",
        "--master-target",
        "mt-r",
        "--process-server",
        "ps-primary",
        "--datastore",
        "vmfs-r",
        "--clock-skew-secs",
        "1",
    ]);
    assert_eq!(job["state"], "succeeded", "{job:#}");
    for m in ms {
        let v = lab.machine(m);
        assert_eq!(
            (v["replication"].as_str(), v["group"].as_str(), v["policy"].as_str()),
            (Some("protected"), Some("grp"), Some("gold")),
            "{v:#}"
        );
        let (p, r) = (
            lab.dir.join(format!("sites/primary/datastores/vmfs-p/{m}/disk0.img")),
            lab.dir.join(format!("sites/recovery/datastores/vmfs-r/{m}/disk0.img")),
        );
        settle_and_compare(&lab, "mt-r", m, &lab.guest(m), (&p, &r));
    }
    lab.down();
}

/// A primary site whose inventory fails one reprotect precondition per master target, a machine
/// on a free hypervisor edition, and read-only inventory credentials.
const CHECKS_LAB: &str = r#"
boot_delay_secs = 0.5
[[sites]]
name = "primary"
config_server = true
hosts = [{ name = "esx-p1" }, { name = "esx-free", licence = "free" }, { name = "esx-far" }]
datastores = [{ name = "vmfs-p", kind = "vmfs", hosts = ["esx-p1", "esx-free"] }]
credentials = [{ name = "vcenter-p", user = "reader@vsphere.local", read_only = true }]
process_server = { name = "ps-primary" }
[[sites.machines]]
name = "web1"
os_family = "linux"
host = "esx-p1"
datastore = "vmfs-p"
disks = [{ name = "disk0", size = 16777216 }]
workload = { rate = 25, max_blocks = 4, seed = 41 }
[[sites.machines]]
name = "cheap1"
os_family = "linux"
host = "esx-free"
datastore = "vmfs-p"
disks = [{ name = "disk0", size = 16777216 }]
workload = { rate = 25, max_blocks = 4, seed = 42 }
[[sites.master_targets]]
name = "mt-p"
os_family = "linux"
host = "esx-p1"
[[sites.master_targets]]
name = "mt-nouuid"
os_family = "linux"
host = "esx-p1"
enable_uuid = false
run = false
[[sites.master_targets]]
name = "mt-pv"
os_family = "linux"
host = "esx-p1"
controller = "pvscsi"
run = false
[[sites.master_targets]]
name = "mt-full"
os_family = "linux"
host = "esx-p1"
attached_disks = 60
run = false
[[sites.master_targets]]
name = "mt-far"
os_family = "linux"
host = "esx-far"
run = false
[[sites]]
name = "recovery"
hosts = [{ name = "esx-r1" }]
datastores = [{ name = "vmfs-r", kind = "vmfs", hosts = ["esx-r1"] }]
process_server = { name = "ps-recovery" }
[[sites.master_targets]]
name = "mt-r"
os_family = "linux"
host = "esx-r1"
"#;

#[test]
fn every_reprotect_precondition_refuses_with_its_code_and_changes_nothing_and_remedies_work() {
    let (_tmp, mut lab) = lab_with_gold(CHECKS_LAB);
    // RP-5: read-only credentials protect and fail over all the same.
    crate::failover_jobs::protect(&lab, &["web1", "cheap1"]);
    for m in ["web1", "cheap1"] {
        let log = lab.guest(m).join("records.log");
        wait(&format!("{m} writes"), Duration::from_secs(60), || (records(&log) > 20).then_some(()));
    }
    let job = lab.json(&["failover", "start", "web1", "--planned", "--no-start"]);
    assert_eq!(job["state"], "succeeded", "{job:#}");
    let job = lab.json(&["failover", "start", "cheap1", "--planned"]);
    assert_eq!(job["state"], "succeeded", "{job:#}");
    for m in ["web1", "cheap1"] {
        assert_eq!(lab.json(&["failover", "commit", m])["state"], "succeeded", "commit {m}");
    }
    let refuse = |plan: &Value, id: &str, code: u64| {
        let c = check(plan, id);
        assert_eq!((c["passed"].as_bool(), c["code"].as_u64()), (Some(false), Some(code)), "{id}: {plan:#}");
        assert!(c["remedy"].as_str().is_some_and(|r| !r.is_empty()), "{id} has a remedy: {c:#}");
        assert_eq!(plan["ready"], false);
    };
    let real = |m: &str, mt: &str, ps: &str| {
        lab.run(&["reprotect", m, "--master-target", mt, "--process-server", ps, "--datastore", "vmfs-p"])
    };
    let unchanged = |lab: &Lab| {
        for m in ["web1", "cheap1"] {
            let rm = format!("{m}.recovery");
            assert!(lab.machine(&rm)["reprotect"].is_null(), "no reverse protection of {rm}");
            assert!(lab.replica("mt-p", &rm).is_null(), "no replica of {rm} at mt-p");
            let v = lab.machine(m);
            assert!(v["reprotected_by"].is_null(), "{v:#}");
        }
    };

    // RP-7: web1.recovery never booted, so its agent never registered: "agent not installed".
    let (good, plan) = dry_run(&lab, "web1", "mt-p", "vmfs-p");
    assert!(!good);
    refuse(&plan, "RP-7", 9039);
    assert!(check(&plan, "RP-7")["message"].as_str().unwrap().contains("agent not installed"), "{plan:#}");
    refuse(&plan, "RP-8", 78093);
    refuse(&plan, "RP-5", 9038);
    failed(&real("web1", "mt-p", "ps-recovery"), "9039", "reprotect before the agent registered");
    unchanged(&lab);
    // The remedy: it boots, its agent registers; the retry passes RP-7.
    ok(&lab.run(&["lab", "power-on", "web1.recovery", "--allow-failed-over"]), "start web1.recovery");
    wait("web1.recovery's agent registers (RP-7 passes)", Duration::from_secs(120), || {
        let (_, plan) = dry_run(&lab, "web1", "mt-p", "vmfs-p");
        (check(&plan, "RP-7")["passed"] == true && check(&plan, "RP-8")["passed"] == true).then_some(())
    });

    // One precondition per master target, and 806 for a process server that never reported.
    for (mt, id, code) in [
        ("mt-nouuid", "MT-3", 9038),
        ("mt-pv", "MT-9", 9038),
        ("mt-full", "MT-10", 9038),
        ("mt-far", "MT-7", 9038),
        ("mt-far", "MT-11", 8061),
        ("mt-nouuid", "78022", 78022),
    ] {
        let (good, plan) = dry_run(&lab, "web1", mt, "vmfs-p");
        assert!(!good, "{mt}");
        refuse(&plan, id, code);
    }
    let o = lab.run(&[
        "--output",
        "json",
        "reprotect",
        "web1",
        "--master-target",
        "mt-p",
        "--process-server",
        "ps-nowhere",
        "--datastore",
        "vmfs-p",
        "--dry-run",
    ]);
    refuse(&serde_json::from_slice(&o.stdout).unwrap(), "806", 806);
    // CP-5: a machine on a free hypervisor edition cannot fail back.
    let (_, plan) = dry_run(&lab, "cheap1", "mt-p", "vmfs-p");
    refuse(&plan, "CP-5", 9038);
    for (m, mt, ps) in
        [("web1", "mt-pv", "ps-recovery"), ("web1", "mt-p", "ps-nowhere"), ("cheap1", "mt-p", "ps-recovery")]
    {
        let o = real(m, mt, ps);
        failed(&o, "nothing was changed", &format!("reprotect of {m} to {mt} through {ps}"));
    }
    unchanged(&lab);
    let rlog = recovery_guest(&lab, "web1.recovery").join("records.log");
    let n = records(&rlog);
    wait("web1.recovery keeps running and writing", Duration::from_secs(60), || (records(&rlog) > n + 5).then_some(()));

    // RP-5's remedy: credentials with rights, the site rediscovered, and the retry succeeds.
    let site = lab.dir.join("sites/primary/site.toml");
    let text = std::fs::read_to_string(&site).unwrap();
    assert!(text.contains("read_only = true"), "{text}");
    std::fs::write(&site, text.replace("read_only = true", "read_only = false")).unwrap();
    let id = lab.json(&["sites", "discover", "primary"])["id"].as_str().unwrap().to_owned();
    wait("the primary site rediscovered", Duration::from_secs(60), || {
        (lab.json(&["jobs", "show", &id])["state"] == "succeeded").then_some(())
    });
    let (good, plan) = dry_run(&lab, "web1", "mt-p", "vmfs-p");
    assert!(good && plan["ready"] == true, "{plan:#}");
    // A reprotect that fails midway (the data link to mt-p cut: the resync stalls) is taken up
    // again by the next one: its replica, spool and the resyncing agent are not "leftovers".
    ok(&lab.run(&["lab", "link", "cut", "mt-p"]), "cut the link to mt-p");
    let o = lab.run(&[
        "reprotect",
        "web1",
        "--master-target",
        "mt-p",
        "--process-server",
        "ps-recovery",
        "--datastore",
        "vmfs-p",
        "--stall-secs",
        "5",
    ]);
    assert!(!o.status.success(), "the resync cannot progress: {}", String::from_utf8_lossy(&o.stdout));
    let v = lab.machine("web1.recovery");
    assert_eq!(v["replication"], "failed", "{v:#}");
    ok(&lab.run(&["lab", "link", "restore", "mt-p"]), "restore the link");
    let (good, plan) = dry_run(&lab, "web1", "mt-p", "vmfs-p");
    assert!(good, "the failed reprotect is taken up again: {plan:#}");
    assert_eq!(check(&plan, "tracking")["passed"], true, "its agent resyncs for the failed one: {plan:#}");
    reprotect_and_compare(
        &lab,
        "web1",
        ("mt-p", "ps-recovery", "vmfs-p"),
        &recovery_guest(&lab, "web1.recovery"),
        (
            &lab.dir.join("sites/recovery/datastores/vmfs-r/web1/disk0.img"),
            &lab.dir.join("sites/primary/datastores/vmfs-p/web1/disk0.img"),
        ),
    );
    lab.down();
}

/// A site operation through the server's API (curl, as an operator would), then its job's end.
fn site_operation(lab: &Lab, site: &str, op: Value) -> Value {
    let env = |k: &str| lab.env.iter().find(|(n, _)| *n == k).map(|(_, v)| v.clone()).unwrap();
    let server = env("FERRY_SERVER");
    let base = if server.starts_with("https://") { server } else { format!("https://{server}") };
    let o = std::process::Command::new("curl")
        .args(["-s", "--max-time", "30", "--cacert", &env("FERRY_CA"), "-X", "POST"])
        .args(["-H", &format!("Authorization: Bearer {}", env("FERRY_TOKEN")), "-H", "Content-Type: application/json"])
        .args(["--data-binary", &op.to_string()])
        .arg(format!("{base}/api/v1/sites/{site}/operations"))
        .output()
        .unwrap();
    let job: Value = serde_json::from_slice(&o.stdout).unwrap_or(Value::Null);
    let id = job["id"].as_str().unwrap_or_else(|| panic!("{op}: {job:#}")).to_owned();
    wait("the site operation", Duration::from_secs(120), || {
        let j = lab.json(&["jobs", "show", &id]);
        (j["state"] == "succeeded" || j["state"] == "failed").then_some(j)
    })
}

#[test]
fn a_deleted_primary_is_recovered_to_an_alternate_location_with_a_full_copy_and_fails_back() {
    let (_tmp, mut lab) = lab_with_gold(LAB);
    crate::failover_jobs::protect(&lab, &["web1"]);
    let plog = lab.guest("web1").join("records.log");
    wait("web1 writes", Duration::from_secs(60), || (records(&plog) > 30).then_some(()));
    assert_eq!(lab.json(&["failover", "start", "web1", "--planned"])["state"], "succeeded");
    assert_eq!(lab.json(&["failover", "commit", "web1"])["state"], "succeeded");
    let rguest = recovery_guest(&lab, "web1.recovery");
    let rlog = rguest.join("records.log");
    wait("web1.recovery writes", Duration::from_secs(90), || (records(&rlog) > 20).then_some(()));

    // The primary machine is deleted (its disks with it).
    let old = lab.dir.join("sites/primary/datastores/vmfs-p/web1/disk0.img");
    let j = site_operation(&lab, "primary", serde_json::json!({"op": "delete-machine", "machine": "web1"}));
    assert_eq!(j["state"], "succeeded", "{j:#}");
    assert!(!old.exists(), "its disks went with it");
    // An NFS datastore is refused for the new disks; a VMFS one passes.
    let (good, plan) = dry_run(&lab, "web1", "mt-p", "nfs-p");
    assert!(!good && check(&plan, "ST-8")["passed"] == false, "{plan:#}");
    let (good, plan) = dry_run(&lab, "web1", "mt-p", "vmfs-p");
    assert!(good, "{plan:#}");
    assert_eq!(plan["location"], "alternate", "{plan:#}");
    assert_eq!(check(&plan, "ST-8")["passed"], true);
    let (sent, _) = reprotect_and_compare(
        &lab,
        "web1",
        ("mt-p", "ps-recovery", "vmfs-p"),
        &rguest,
        (
            &lab.dir.join("sites/recovery/datastores/vmfs-r/web1/disk0.img"),
            &lab.dir.join("sites/primary/datastores/vmfs-p/web1.recovery/disk0.img"),
        ),
    );
    let r = &lab.machine("web1.recovery")["reprotect"];
    assert_eq!(r["location"], "alternate", "{r:#}");
    let allocated = blocks_after(&rlog, 0).len() as u64 * 4096;
    assert!(sent >= allocated, "a full copy of what the disk holds: {sent} bytes sent, the workload wrote {allocated}");

    // Failback makes web1 anew on the new disks and boots it; it writes and is byte-identical.
    let job = lab.json(&["failback", "web1", "--planned"]);
    assert_eq!(job["state"], "succeeded", "{job:#}");
    assert_eq!(lab.json(&["failover", "commit", "web1.recovery"])["state"], "succeeded");
    let web1 = lab.machine("web1");
    assert_eq!(web1["power"], "on", "{web1:#}");
    let nlog = lab.guest("web1").join("records.log");
    let n = records(&nlog);
    wait("the new web1 writes", Duration::from_secs(90), || (records(&nlog) > n + 10).then_some(()));
    // And forward again, differential: the new web1 replicates to web1.recovery's disks.
    let (sent, fallback) = reprotect_and_compare(
        &lab,
        "web1.recovery",
        ("mt-r", "ps-primary", "vmfs-r"),
        &lab.guest("web1"),
        (
            &lab.dir.join("sites/primary/datastores/vmfs-p/web1.recovery/disk0.img"),
            &lab.dir.join("sites/recovery/datastores/vmfs-r/web1/disk0.img"),
        ),
    );
    let changed = blocks_after(&nlog, 0).len() as u64 * 4096;
    assert!(!fallback && sent <= changed + changed / 10, "only what the new web1 wrote: {sent} for {changed}");
    let v = lab.machine("web1");
    assert_eq!((v["replication"].as_str(), v["policy"].as_str()), (Some("protected"), Some("gold")), "{v:#}");
    lab.down();
}
