//! Recovery points end to end: real daemons, real qemu clients, and an oracle — the source's own
//! write log (`source_write_log`) replayed up to each point's sequence position.
//!
//! Size: one scenario area (recovery points) with its oracle.

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use crate::harness::*;
use rand::seq::SliceRandom;
use rand::Rng;
use serde_json::{json, Value};

const DISK0: u64 = 24 << 20;
const DISK1: u64 = 8 << 20;

fn points(c: &Cluster, machine: &str) -> Vec<Value> {
    let (code, v) = c.mt_api("GET", &format!("/machines/{machine}/points"), None);
    assert_eq!(code, 200, "{v}");
    v["points"].as_array().cloned().unwrap_or_default()
}

fn wait_for(what: &str, timeout: Duration, mut f: impl FnMut() -> bool) {
    let deadline = Instant::now() + timeout;
    while !f() {
        assert!(Instant::now() < deadline, "timed out waiting for {what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

fn oracle_opts(agent_extra: &str, mt_extra: &str) -> Opts {
    Opts {
        disks: vec![("disk0", DISK0), ("disk1", DISK1)],
        agent_extra: format!("source_write_log = '{{dir}}/{{machine}}-source.log'\n{agent_extra}"),
        mt_extra: mt_extra.into(),
        ..Default::default()
    }
}

/// Fill the sources with random data and keep copies (the oracle's starting images).
fn prepare_sources(c: &Cluster, seed: u64) {
    for (i, (d, _)) in c.disks.iter().enumerate() {
        fill_random(&c.source(d), seed + i as u64);
        std::fs::copy(c.source(d), initial(c, d)).unwrap();
    }
}

fn initial(c: &Cluster, disk: &str) -> PathBuf {
    c.path().join(format!("{disk}.initial"))
}

fn source_log(c: &Cluster) -> Vec<SourceEntry> {
    read_source_log(&c.path().join("vm1-source.log"))
}

fn nbd_socket(c: &Cluster) -> PathBuf {
    c.path().join("retention/nbd.sock")
}

/// Materialize `point` as `how` ("raw", "qcow2", "export", "vmdk") and compare every disk with
/// the oracle. Returns the materialization.
fn check_point(c: &Cluster, log: &[SourceEntry], point: &Value, how: &str) -> Value {
    let body = match how {
        "export" => json!({ "point": point["id"], "kind": "export" }),
        f => json!({ "point": point["id"], "kind": "image", "format": f }),
    };
    let (code, m) = c.mt_api("POST", "/machines/vm1/materializations", Some(body));
    assert_eq!(code, 201, "materializing {} as {how}: {m}", point["id"]);
    assert_eq!(m["point"]["seq"], point["seq"]);
    let k = point["seq"].as_u64().unwrap();
    for (i, (d, _)) in c.disks.iter().enumerate() {
        let oracle = c.path().join(format!("oracle-{d}-{k}.img"));
        replay_source(&initial(c, d), log, i as u16, k, &oracle);
        let (target, fmt) = match how {
            "export" => (
                format!("nbd+unix:///{}?socket={}", m["exports"][i].as_str().unwrap(), nbd_socket(c).display()),
                "raw".to_string(),
            ),
            "raw" => (m["files"][i].as_str().unwrap().to_owned(), "raw".into()),
            f => (m["files"][i].as_str().unwrap().to_owned(), f.into()),
        };
        if let Some(diff) = image_difference(&oracle, "raw", &target, &fmt) {
            panic!(
                "point {} ({} {}) disk {d} as {how} differs from the source replayed to seq {k}: {diff}\nmaster-target log:\n{}",
                point["id"],
                point["kind"],
                point["origin"],
                tail(&c.log("master-target"))
            );
        }
        std::fs::remove_file(&oracle).unwrap();
    }
    m
}

fn discard(c: &Cluster, m: &Value) {
    let id = m["id"].as_str().unwrap();
    let (code, v) = c.mt_api("DELETE", &format!("/materializations/{id}"), None);
    assert_eq!(code, 200, "{v}");
    for f in m["files"].as_array().into_iter().flatten() {
        assert!(!Path::new(f.as_str().unwrap()).exists(), "{f} must be deleted at cleanup");
    }
}

/// Sectors changed by the source log in (from, to], as merged (offset, len) ranges per disk.
fn logged_changes(log: &[SourceEntry], disk: u16, from: u64, to: u64) -> Vec<(u64, u64)> {
    let mut iv: Vec<(u64, u64)> = log
        .iter()
        .filter(|e| e.disk == disk && e.kind < 2 && e.seq > from && e.seq <= to && e.len > 0)
        .map(|e| (e.offset, e.offset + e.len))
        .collect();
    iv.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (s, e) in iv {
        match out.last_mut() {
            Some(last) if s <= last.1 => last.1 = last.1.max(e),
            _ => out.push((s, e)),
        }
    }
    out.into_iter().map(|(s, e)| (s, e - s)).collect()
}

#[test]
fn materialized_points_equal_the_source_log_replayed_to_them() {
    let seed = seed("materialized_points_equal_the_source_log_replayed_to_them");
    let mut r = rng(seed);
    let mut c = Cluster::new(oracle_opts(
        "crash_point_interval_secs = 0.25\nfreeze_command = 'echo freeze >> {dir}/hooks.log'\nthaw_command = 'echo thaw >> {dir}/hooks.log'\n",
        "",
    ));
    prepare_sources(&c, seed);
    c.start_all();
    c.wait_caught_up(Duration::from_secs(60));
    wait_for("the first recovery point", Duration::from_secs(30), || !points(&c, "vm1").is_empty());
    let mut app_seqs = Vec::new();
    for _ in 0..3 {
        let w0 = spawn_workload(c.nbd_url("disk0"), workload(&mut r, DISK0, 120));
        let w1 = spawn_workload(c.nbd_url("disk1"), workload(&mut r, DISK1, 50));
        std::thread::sleep(Duration::from_millis(r.gen_range(50..400)));
        let (code, v) = c.api("agent", "POST", "/points/app", None);
        assert_eq!(code, 200, "app-consistent point: {v}");
        app_seqs.push(v["seq"].as_u64().unwrap());
        assert!(w0.join().unwrap().success());
        assert!(w1.join().unwrap().success());
    }
    c.wait_caught_up(Duration::from_secs(60));
    let (code, latest) = c.mt_api("POST", "/machines/vm1/points", Some(json!({ "selector": "latest" })));
    assert_eq!(code, 200, "{latest}");
    let hooks = std::fs::read_to_string(c.path().join("hooks.log")).unwrap();
    assert_eq!(hooks.matches("freeze").count(), 3, "{hooks}");
    assert_eq!(hooks.matches("thaw").count(), 3, "{hooks}");

    let pts = points(&c, "vm1");
    let apps: Vec<_> = pts.iter().filter(|p| p["kind"] == "app").collect();
    let listed: Vec<u64> = apps.iter().map(|p| p["seq"].as_u64().unwrap()).collect();
    assert_eq!(listed, app_seqs, "every app-consistent tag is a point at its position");
    assert!(pts.iter().any(|p| p["kind"] == "crash" && p["origin"] == "tag"), "crash-consistent points on the timer");
    assert!(pts.len() >= 6, "{pts:#?}");
    // IDs are unique and stable-looking; times and seqs increase together.
    for w in pts.windows(2) {
        assert!(w[0]["seq"].as_u64() < w[1]["seq"].as_u64());
        assert!(w[0]["time_ms"].as_u64() <= w[1]["time_ms"].as_u64());
    }
    let (_, sel) = c.mt_api("GET", "/machines/vm1/points", None);
    assert_eq!(sel["selectors"]["latest-app"], apps.last().unwrap()["id"]);
    assert_eq!(sel["selectors"]["latest-processed"], pts.last().unwrap()["id"]);
    assert_eq!(latest["id"], pts.last().unwrap()["id"], "\"latest\" is everything received");

    let log = source_log(&c);
    let mut chosen: Vec<Value> = apps.iter().map(|p| (*p).clone()).collect();
    chosen.push(pts[0].clone());
    chosen.push(latest.clone());
    let mut others: Vec<Value> = pts.iter().filter(|p| p["kind"] == "crash").cloned().collect();
    others.shuffle(&mut r);
    chosen.extend(others.into_iter().take(4));
    let kinds = ["raw", "qcow2", "export", "raw", "export", "qcow2", "vmdk"];
    let mut mats = Vec::new();
    for (i, p) in chosen.iter().enumerate() {
        mats.push(check_point(&c, &log, p, kinds[i % kinds.len()]));
    }
    let (_, list) = c.mt_api("GET", "/materializations", None);
    assert_eq!(list["materializations"].as_array().unwrap().len(), mats.len());

    // Changed extents between two points equal what the source wrote between them.
    let (a, b) = (&pts[1], &pts[pts.len() - 2]);
    let (code, ch) =
        c.mt_api("GET", &format!("/machines/vm1/changes?from={}&to={}", a["id"], b["id"]).replace('"', ""), None);
    assert_eq!(code, 200, "{ch}");
    for (i, d) in ch["disks"].as_array().unwrap().iter().enumerate() {
        let want = logged_changes(&log, i as u16, a["seq"].as_u64().unwrap(), b["seq"].as_u64().unwrap());
        let got: Vec<(u64, u64)> = d["extents"]
            .as_array()
            .unwrap()
            .iter()
            .map(|e| (e["offset"].as_u64().unwrap(), e["length"].as_u64().unwrap()))
            .collect();
        assert_eq!(got, want, "changed extents of disk {i}");
    }
    for m in &mats {
        discard(&c, m);
    }
    let (_, list) = c.mt_api("GET", "/materializations", None);
    assert!(list["materializations"].as_array().unwrap().is_empty());
    // Replication itself was never disturbed.
    c.assert_identical();
}

#[test]
fn failing_or_slow_freeze_hook_gives_an_event_and_no_app_point() {
    let mut c = Cluster::new(Opts {
        agent_extra: "crash_point_interval_secs = 0\nfreeze_command = 'test -e {dir}/allow-freeze || { echo cannot freeze >&2; exit 3; }; test ! -e {dir}/slow || sleep 30'\nthaw_command = 'echo thaw >> {dir}/thaw.log'\nhook_timeout_secs = 1\n".into(),
        ..Default::default()
    });
    c.start_all();
    c.wait_caught_up(Duration::from_secs(30));
    let (code, v) = c.api("agent", "POST", "/points/app", None);
    assert_eq!(code, 409, "{v}");
    assert!(v["message"].as_str().unwrap().contains("cannot freeze"), "{v}");
    assert_eq!(v["code"], 9011);
    std::fs::write(c.path().join("allow-freeze"), "").unwrap();
    std::fs::write(c.path().join("slow"), "").unwrap();
    let t = Instant::now();
    let (code, v) = c.api("agent", "POST", "/points/app", None);
    assert_eq!(code, 409, "{v}");
    assert!(v["message"].as_str().unwrap().contains("did not finish"), "{v}");
    assert!(t.elapsed() < Duration::from_secs(10), "the hook timeout bounds the wait");
    let events = c.status("agent")["events"].to_string();
    assert!(events.contains("app-point-failed"), "{events}");
    // Thaw runs after a failed freeze too (it may have frozen part of the machine).
    assert_eq!(std::fs::read_to_string(c.path().join("thaw.log")).unwrap().lines().count(), 2);
    std::fs::remove_file(c.path().join("slow")).unwrap();
    let (code, ok) = c.api("agent", "POST", "/points/app", None);
    assert_eq!(code, 200, "{ok}");
    c.wait_caught_up(Duration::from_secs(30));
    let apps: Vec<_> = points(&c, "vm1").into_iter().filter(|p| p["kind"] == "app").collect();
    assert_eq!(apps.len(), 1, "only the successful hook gives an app-consistent point: {apps:#?}");
    assert_eq!(apps[0]["seq"], ok["seq"]);
}

#[test]
fn test_failover_overlay_never_touches_the_replica_and_is_removed_at_cleanup() {
    let mut c = Cluster::new(oracle_opts("crash_point_interval_secs = 0.2\n", ""));
    let seed = seed("test_failover_overlay");
    prepare_sources(&c, seed);
    c.start_all();
    c.wait_caught_up(Duration::from_secs(60));
    wait_for("a point", Duration::from_secs(30), || !points(&c, "vm1").is_empty());
    let (code, p) = c.mt_api("POST", "/machines/vm1/points", Some(json!({ "selector": "latest-processed" })));
    assert_eq!(code, 200, "{p}");
    let (code, m) = c.mt_api(
        "POST",
        "/machines/vm1/materializations",
        Some(json!({ "point": p["id"], "kind": "export", "writable": true })),
    );
    assert_eq!(code, 201, "{m}");
    let export = m["exports"][0].as_str().unwrap();
    // The test machine boots from the export on the master target's owner-only unix socket.
    let url = format!("nbd+unix:///{export}?socket={}", c.path().join("retention/nbd.sock").display());
    assert!(m["nbd_urls"].to_string().contains(&url), "{m:#}");
    let before = c.status("master-target")["machines"][0]["journaled_seq"].clone();
    // The test-failover machine writes to its disk...
    let out = std::process::Command::new("qemu-io")
        .args(["-f", "raw", &url, "-c", "write -P 0x5a 1M 3M", "-c", "flush", "-c", "read -P 0x5a 1M 3M"])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stdout));
    assert!(!String::from_utf8_lossy(&out.stdout).contains("Pattern verification failed"));
    // ... while the protected machine keeps replicating.
    assert!(c.qemu_io("disk0", "write -P 0x33 8M 1M\nflush\n").status.success());
    c.wait_caught_up(Duration::from_secs(30));
    c.assert_identical();
    let after = c.status("master-target")["machines"][0]["journaled_seq"].as_u64().unwrap();
    assert!(after > before.as_u64().unwrap(), "only the source's write is journaled");
    // The test machine's writes are nowhere in the replica or the journal.
    let journal = std::fs::read_dir(c.path().join("retention/vm1/journal")).unwrap();
    let needle = vec![0x5au8; 64 << 10];
    for seg in journal.flatten() {
        let data = std::fs::read(seg.path()).unwrap();
        assert!(
            !data.windows(needle.len()).step_by(4096).any(|w| w == needle.as_slice()),
            "overlay data leaked into the journal"
        );
    }
    let overlays: Vec<PathBuf> =
        m["overlays"].as_array().unwrap().iter().map(|o| PathBuf::from(o.as_str().unwrap())).collect();
    assert!(overlays.iter().all(|o| o.exists()));
    discard(&c, &m);
    assert!(overlays.iter().all(|o| !o.exists()), "cleanup removes the overlays");
    let out = std::process::Command::new("qemu-img").args(["info", &url]).output().unwrap();
    assert!(!out.status.success(), "the export is gone after cleanup");
    // A fresh export of the same point shows the point again, not the test machine's writes.
    let m2 = check_point(&c, &source_log(&c), &p, "export");
    discard(&c, &m2);
}

#[test]
fn pruning_keeps_the_window_frees_space_and_honours_pins() {
    let seed = seed("pruning_keeps_the_window_frees_space_and_honours_pins");
    let mut r = rng(seed);
    let mut c = Cluster::new(oracle_opts(
        "crash_point_interval_secs = 0.2\n",
        "retention_window_secs = 2\nsegment_bytes = 1048576\n",
    ));
    prepare_sources(&c, seed);
    c.start_all();
    c.wait_caught_up(Duration::from_secs(60));
    wait_for("a point", Duration::from_secs(30), || !points(&c, "vm1").is_empty());
    let mt = |c: &Cluster| c.status("master-target")["machines"][0].clone();
    let base0 = mt(&c)["retention"]["base_seq"].as_u64().unwrap();
    // Pin an early point with a read-only export.
    let early = points(&c, "vm1")[0].clone();
    let (code, pin) =
        c.mt_api("POST", "/machines/vm1/materializations", Some(json!({ "point": early["id"], "kind": "export" })));
    assert_eq!(code, 201, "{pin}");
    let start = Instant::now();
    while start.elapsed() < Duration::from_secs(5) {
        let w = spawn_workload(c.nbd_url("disk0"), workload(&mut r, DISK0, 80));
        assert!(w.join().unwrap().success());
    }
    c.wait_caught_up(Duration::from_secs(60));
    // Pinned: nothing pruned, the pinned point still listed and still correct.
    let s = mt(&c);
    assert_eq!(s["retention"]["base_seq"].as_u64().unwrap(), base0, "{s:#}");
    assert!(s["retention"]["pruning_paused"].as_str().unwrap().contains("pin"), "{s:#}");
    assert!(points(&c, "vm1").iter().any(|p| p["id"] == early["id"]));
    let log = source_log(&c);
    let k = early["seq"].as_u64().unwrap();
    for (i, (d, _)) in c.disks.iter().enumerate() {
        let oracle = c.path().join(format!("pinned-{d}.img"));
        replay_source(&initial(&c, d), &log, i as u16, k, &oracle);
        let url = format!("nbd+unix:///{}?socket={}", pin["exports"][i].as_str().unwrap(), nbd_socket(&c).display());
        assert_eq!(image_difference(&oracle, "raw", &url, "raw"), None, "pinned export of {d}");
    }
    let pinned_journal = s["retention"]["journal_bytes"].as_u64().unwrap();
    discard(&c, &pin);
    // Released: history is pruned to the window and the journal shrinks.
    wait_for("pruning after the pin is released", Duration::from_secs(20), || {
        let s = mt(&c);
        s["retention"]["base_seq"].as_u64().unwrap() > k
            && s["retention"]["journal_bytes"].as_u64().unwrap() < pinned_journal / 2
    });
    // Keep writing: every listed point stays inside the window (plus a pruning pass) and valid.
    let start = Instant::now();
    let mut last_pin_ms = 0;
    while start.elapsed() < Duration::from_secs(8) {
        let w = spawn_workload(c.nbd_url("disk0"), workload(&mut r, DISK0, 60));
        assert!(w.join().unwrap().success());
        let now_ms = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64;
        let pts = points(&c, "vm1");
        assert!(!pts.is_empty(), "never prune the newest point");
        let oldest = pts[0]["time_ms"].as_u64().unwrap();
        // Window, plus pruning passes (slow when the whole suite shares two cores), plus the
        // time the previous check pinned the history.
        let bound = 2_000 + 4_000 + last_pin_ms;
        if now_ms - oldest >= bound {
            // Behind (the suite shares two cores): pruning must catch up, not merely be late.
            wait_for("pruning to catch up with the window", Duration::from_secs(20), || {
                let pts = points(&c, "vm1");
                let now =
                    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).unwrap().as_millis() as u64;
                !pts.is_empty() && now - pts[0]["time_ms"].as_u64().unwrap() < 2_000 + 4_000
            });
        }
        // Materialize while writes, apply and pruning go on (the pin pauses pruning briefly).
        let pinned_at = Instant::now();
        let w = spawn_workload(c.nbd_url("disk1"), workload(&mut r, DISK1, 40));
        // A point well inside the window (an older one may be pruned before the request lands).
        let recent: Vec<&Value> = pts.iter().filter(|p| p["time_ms"].as_u64().unwrap() + 1_000 > now_ms).collect();
        let p =
            if recent.is_empty() { pts.last().unwrap().clone() } else { recent[r.gen_range(0..recent.len())].clone() };
        let m = check_point(&c, &source_log(&c), &p, "export");
        discard(&c, &m);
        last_pin_ms = pinned_at.elapsed().as_millis() as u64;
        assert!(w.join().unwrap().success());
    }
    c.wait_caught_up(Duration::from_secs(60));
    let log = source_log(&c);
    let pts = points(&c, "vm1");
    for p in [&pts[0], &pts[pts.len() / 2], pts.last().unwrap()] {
        let m = check_point(&c, &log, p, "raw");
        discard(&c, &m);
    }
    let s = mt(&c);
    let per_gib = s["retention"]["journal_bytes_per_gib_written"].as_f64().unwrap();
    assert!(per_gib < 1.1 * (1u64 << 30) as f64, "journal overhead per GiB written: {per_gib}");
}

#[test]
fn a_full_retention_volume_prunes_early_with_an_event_and_replication_continues() {
    let mut c = Cluster::new(Opts {
        disks: vec![("disk0", 16 << 20)],
        agent_extra: "crash_point_interval_secs = 0.2\n".into(),
        mt_extra: "retention_window_secs = 3600\nsegment_bytes = 1048576\nretention_min_free_percent = 40\n".into(),
        ..Default::default()
    });
    let Some(_fs) = SmallFs::mount(&c.path().join("retention"), "128M") else {
        assert!(is_not_root(), "mounting a tmpfs failed although running as root");
        eprintln!("SKIPPED: mounting a small filesystem needs root");
        return;
    };
    c.start_all();
    c.wait_caught_up(Duration::from_secs(60));
    for round in 0..12u8 {
        let out = c.qemu_io("disk0", &format!("write -P {} 0 16M\nflush\n", round + 1));
        assert!(out.status.success());
        std::thread::sleep(Duration::from_millis(300));
    }
    let deadline = Instant::now() + Duration::from_secs(120);
    while c.status("agent")["caught_up"] != true {
        if Instant::now() > deadline {
            let ls = std::process::Command::new("sh")
                .arg("-c")
                .arg(format!(
                    "df {0}/retention; ls -laR {0}/retention; cat {0}/retention/vm1/base.json",
                    c.path().display()
                ))
                .output()
                .unwrap();
            panic!(
                "not caught up with a full retention volume\n{:#}\n{}\nmaster-target log:\n{}",
                c.status("master-target"),
                String::from_utf8_lossy(&ls.stdout),
                tail(&c.log("master-target"))
            );
        }
        std::thread::sleep(Duration::from_millis(200));
    }
    c.assert_identical();
    let s = c.status("master-target")["machines"][0].clone();
    assert!(s["events"].to_string().contains("pruned-early"), "an event says points were pruned early: {s:#}");
    assert!(s["error"].is_null(), "{s:#}");
    let (code, p) = c.mt_api("POST", "/machines/vm1/points", Some(json!({ "selector": "latest" })));
    assert_eq!(code, 200, "{p}");
    let (code, m) =
        c.mt_api("POST", "/machines/vm1/materializations", Some(json!({ "point": p["id"], "kind": "export" })));
    assert_eq!(code, 201, "{m}");
    let url = format!("nbd+unix:///{}?socket={}", m["exports"][0].as_str().unwrap(), nbd_socket(&c).display());
    assert_eq!(image_difference(&c.source("disk0"), "raw", &url, "raw"), None);
    discard(&c, &m);
    for comp in COMPONENTS {
        c.kill9(comp);
    }
}

#[test]
fn killing_the_master_target_during_apply_and_pruning_loses_no_point_in_the_window() {
    let seed = seed("killing_the_master_target_during_apply_and_pruning");
    let mut r = rng(seed);
    let mut c = Cluster::new(oracle_opts(
        "crash_point_interval_secs = 0.2\n",
        "retention_window_secs = 3\nsegment_bytes = 1048576\n",
    ));
    prepare_sources(&c, seed);
    c.start_all();
    c.wait_caught_up(Duration::from_secs(60));
    wait_for("a point", Duration::from_secs(30), || !points(&c, "vm1").is_empty());
    for _ in 0..4 {
        let w = spawn_workload(c.nbd_url("disk0"), workload(&mut r, DISK0, 300));
        std::thread::sleep(Duration::from_millis(r.gen_range(200..1500)));
        let before = points(&c, "vm1");
        c.kill9("master-target");
        let killed_at = now_ms();
        c.start("master-target");
        let after = points(&c, "vm1");
        let listed_at = now_ms();
        let ids: std::collections::HashSet<_> = after.iter().map(|p| p["id"].clone()).collect();
        // Points may only disappear by pruning: older than the window when listed again. (Measured
        // from the listing, not the kill: a restart on a loaded machine takes its time, and the
        // window goes on meanwhile.)
        for p in &before {
            let t = p["time_ms"].as_u64().unwrap();
            if t + 3_000 > listed_at + 500 {
                assert!(
                    ids.contains(&p["id"]),
                    "point {} (age {} ms at the kill, {} ms when listed again) lost by the restart",
                    p["id"],
                    killed_at - t.min(killed_at),
                    listed_at - t.min(listed_at)
                );
            }
        }
        assert!(w.join().unwrap().success());
    }
    // Kills aimed at pruning: a burst of writes ages out of the 3 s window, then the master
    // target dies at a random moment of the pass that replays it into the base.
    for _ in 0..3 {
        assert!(c.qemu_io("disk0", &format!("write -P {} 0 16M\nflush\n", r.gen_range(1..255))).status.success());
        c.wait_caught_up(Duration::from_secs(60));
        std::thread::sleep(Duration::from_millis(3000 + r.gen_range(0..1200)));
        c.kill9("master-target");
        c.start("master-target");
        let s = c.status("master-target")["machines"][0].clone();
        assert!(s["retention"]["base_seq"].is_u64(), "{s:#}");
    }
    c.wait_caught_up(Duration::from_secs(60));
    c.assert_identical();
    let log = source_log(&c);
    let pts = points(&c, "vm1");
    assert!(!pts.is_empty());
    for p in [&pts[0], pts.last().unwrap()] {
        let m = check_point(&c, &log, p, "raw");
        discard(&c, &m);
    }
    assert!(c.status("master-target")["machines"][0]["error"].is_null());
}

use ferry_sys::time::now_ms;

#[test]
fn the_last_consistent_point_stays_materializable_during_a_resync() {
    let seed = seed("the_last_consistent_point_stays_materializable_during_a_resync");
    let mut c = Cluster::new(oracle_opts(
        "crash_point_interval_secs = 0.3\nlog_limit_bytes = 1048576\nresync_chunk_bytes = 65536\n",
        "",
    ));
    prepare_sources(&c, seed);
    c.start_all();
    c.wait_caught_up(Duration::from_secs(60));
    wait_for("a point", Duration::from_secs(30), || !points(&c, "vm1").is_empty());
    // An outage of the process server overflows the agent's log: a resync follows, and the master
    // target holds its data until the resync's end (the replica keeps its consistent state).
    c.kill9("process-server");
    assert!(c.qemu_io("disk0", "write -P 0x61 0 20M\nflush\n").status.success());
    assert!(c.qemu_io("disk1", "write -P 0x62 1M 2M\nflush\n").status.success());
    c.start("process-server");
    // While the resync runs: the last consistent point is listed, "latest" is refused, and the
    // point can be materialized.
    let deadline = Instant::now() + Duration::from_secs(30);
    let during = loop {
        let s = c.status("master-target")["machines"][0].clone();
        if s["mode"].as_str().unwrap_or("").contains("holding") {
            let (code, v) = c.mt_api("POST", "/machines/vm1/points", Some(json!({ "selector": "latest" })));
            assert_eq!(code, 409, "\"latest\" inside a resync is refused: {v}");
            let p = points(&c, "vm1").last().cloned().expect("a point during the resync");
            let (code, m) =
                c.mt_api("POST", "/machines/vm1/materializations", Some(json!({ "point": p["id"], "kind": "export" })));
            assert_eq!(code, 201, "{m}");
            break (p, m);
        }
        assert!(Instant::now() < deadline, "never saw the resync held at the master target: {s:#}");
        std::thread::sleep(Duration::from_millis(5));
    };
    c.wait_caught_up(Duration::from_secs(60));
    let st = c.status("agent");
    assert!(st["completed_resyncs"].to_string().contains("LogOverflow"), "the outage caused a resync: {st:#}");
    let log = source_log(&c);
    let (p, m) = during;
    let k = p["seq"].as_u64().unwrap();
    for (i, (d, _)) in c.disks.iter().enumerate() {
        let oracle = c.path().join(format!("during-{d}.img"));
        replay_source(&initial(&c, d), &log, i as u16, k, &oracle);
        let url = format!("nbd+unix:///{}?socket={}", m["exports"][i].as_str().unwrap(), nbd_socket(&c).display());
        assert_eq!(
            image_difference(&oracle, "raw", &url, "raw"),
            None,
            "point {} taken during the resync, {d}",
            p["id"]
        );
    }
    discard(&c, &m);
    // After it: the resync's end is a point, and the point before it is still exact.
    let pts = points(&c, "vm1");
    let end_idx = pts.iter().rposition(|p| p["origin"] == "resync-end").expect("a point at the resync's end");
    assert!(end_idx > 0, "{pts:#?}");
    assert_eq!(pts[end_idx - 1]["seq"], p["seq"], "the point before the resync is the one listed during it");
    for p in [&pts[end_idx - 1], &pts[end_idx]] {
        let m = check_point(&c, &log, p, "raw");
        discard(&c, &m);
    }
    c.assert_identical();
}

fn ferry(args: &[&str]) -> std::process::Output {
    std::process::Command::new(FERRY).args(args).output().unwrap()
}

#[test]
fn operator_commands_and_bad_requests() {
    let mut c = Cluster::new(Opts { agent_extra: "crash_point_interval_secs = 0\n".into(), ..Default::default() });
    let mt = format!("127.0.0.1:{}", c.status["master-target"]);
    let agent = format!("127.0.0.1:{}", c.status["agent"]);
    // Before any point exists: a clear answer, not an empty success.
    c.start("master-target");
    let out = ferry(&["master-target", "select", "--machine", "vm1", "--status-addr", &mt]);
    assert!(!out.status.success());
    assert!(
        String::from_utf8_lossy(&out.stderr).contains("not replicated"),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    c.start("process-server");
    c.start("agent");
    c.wait_caught_up(Duration::from_secs(30));
    let out = ferry(&["agent", "crash-point", "--status-addr", &agent, "--output", "json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let tag: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert!(c.qemu_io("disk0", "write -P 3 0 2M\nflush\n").status.success());
    c.wait_caught_up(Duration::from_secs(30));
    let out = ferry(&["master-target", "points", "--machine", "vm1", "--status-addr", &mt, "--output", "json"]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let v: Value = serde_json::from_slice(&out.stdout).unwrap();
    let tagged =
        v["points"].as_array().unwrap().iter().find(|p| p["seq"] == tag["seq"]).expect("the tag is listed").clone();
    let out = ferry(&["master-target", "points", "--machine", "vm1", "--status-addr", &mt]);
    let table = String::from_utf8_lossy(&out.stdout);
    assert!(table.contains(tagged["id"].as_str().unwrap()) && table.contains("latest-processed"), "{table}");
    // An image as a qcow2 overlay on the frozen base, checked against the source at that point.
    let dir = c.path().join("img");
    let out = ferry(&[
        "master-target",
        "materialize",
        "--machine",
        "vm1",
        "--point",
        tagged["id"].as_str().unwrap(),
        "--format",
        "qcow2",
        "--dir",
        dir.to_str().unwrap(),
        "--status-addr",
        &mt,
        "--output",
        "json",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let m: Value = serde_json::from_slice(&out.stdout).unwrap();
    let img = dir.join("disk0.qcow2");
    assert!(img.exists());
    let info = std::process::Command::new("qemu-img").args(["info", "--output", "json"]).arg(&img).output().unwrap();
    let info: Value = serde_json::from_slice(&info.stdout).unwrap();
    assert!(info["backing-filename"].as_str().unwrap().contains("base-"), "a qcow2 overlay on the base: {info:#}");
    let zeros = c.path().join("zeros.img");
    std::fs::File::create(&zeros).unwrap().set_len(64 << 20).unwrap();
    assert_eq!(image_difference(&zeros, "raw", img.to_str().unwrap(), "qcow2"), None, "the tag precedes the write");
    let out = ferry(&[
        "master-target",
        "changes",
        "--machine",
        "vm1",
        "--from",
        tagged["id"].as_str().unwrap(),
        "--status-addr",
        &mt,
        "--output",
        "json",
    ]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    let ch: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(ch["disks"][0]["extents"], json!([{ "offset": 0, "length": 2 << 20 }]));
    let out = ferry(&["master-target", "export", "--machine", "vm1", "--writable", "--status-addr", &mt]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert!(String::from_utf8_lossy(&out.stdout).contains("nbd+unix://"));
    let out = ferry(&["master-target", "materializations", "--status-addr", &mt, "--output", "json"]);
    let all: Value = serde_json::from_slice(&out.stdout).unwrap();
    assert_eq!(all["materializations"].as_array().unwrap().len(), 2);
    for x in all["materializations"].as_array().unwrap() {
        let out = ferry(&["master-target", "discard", x["id"].as_str().unwrap(), "--status-addr", &mt]);
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    assert!(!img.exists());
    let _ = m;

    // Bad requests get a code, a message naming what was wrong, and a remedy.
    let (code, v) = c.mt_api(
        "POST",
        "/machines/vm1/materializations",
        Some(json!({ "point": "latest-processed", "kind": "image", "format": "vdi" })),
    );
    assert_eq!(code, 400, "{v}");
    assert!(v["message"].as_str().unwrap().contains("format") && v["remedy"].is_string(), "{v}");
    let (code, v) =
        c.mt_api("POST", "/machines/vm1/materializations", Some(json!({ "point": "vm1@999999", "kind": "image" })));
    assert_eq!(code, 404, "{v}");
    assert_eq!(v["code"], 9007);
    let (code, v) =
        c.mt_api("POST", "/machines/vm1/materializations", Some(json!({ "point": "yesterday", "kind": "image" })));
    assert_eq!(code, 400, "{v}");
    assert!(v["message"].as_str().unwrap().contains("latest-app"), "{v}");
    let (code, v) = c.mt_api("POST", "/machines/vm1/points", Some(json!({ "selector": "latest-app" })));
    assert_eq!(code, 404, "{v}");
    assert!(v["message"].as_str().unwrap().contains("app-consistent"), "{v}");
    let token = c.control_token("master-target");
    let (code, v) =
        http_json_as(c.status["master-target"], Some(&token), "POST", "/machines/vm1/points", Some("{not json"))
            .unwrap();
    assert_eq!(code, 400, "{v}");
    let (code, v) = c.mt_api(
        "POST",
        "/machines/vm1/materializations",
        Some(json!({ "point": "latest-processed", "kind": "image", "dir": c.path().join("retention/x") })),
    );
    assert_eq!(code, 400, "{v}");
    assert!(v["message"].as_str().unwrap().contains("retention volume"), "{v}");
    let (code, v) = c.mt_api(
        "POST",
        "/machines/vm1/materializations",
        Some(json!({ "point": "latest-processed", "kind": "image", "dir": "relative/dir" })),
    );
    assert_eq!(code, 400, "{v}");
    assert!(
        c.mt_api("GET", "/materializations", None).1["materializations"].as_array().unwrap().is_empty(),
        "refused requests pin nothing"
    );
    let (code, v) = c.mt_api("GET", "/machines/nope/points", None);
    assert_eq!(code, 404, "{v}");
    let (code, v) = c.mt_api("DELETE", "/materializations/nope", None);
    assert_eq!(code, 404, "{v}");
    let (code, v) = c.mt_api("GET", "/machines/vm1/changes", None);
    assert_eq!(code, 400, "{v}");
    let (code, v) = c.api("agent", "POST", "/points/app", None);
    assert_eq!(code, 409, "{v}");
    assert!(v["message"].as_str().unwrap().contains("freeze_command"), "{v}");
    // The master target keeps serving after all that.
    assert!(c.status("master-target")["machines"][0]["error"].is_null());
}

#[test]
fn killing_the_master_target_while_it_takes_the_base_keeps_the_first_point_exact() {
    let seed = seed("killing_the_master_target_while_it_takes_the_base");
    let mut r = rng(seed);
    let mut c = Cluster::new(Opts {
        disks: vec![("disk0", 96 << 20), ("disk1", 32 << 20)],
        agent_extra: "crash_point_interval_secs = 0.3\nsource_write_log = '{dir}/{machine}-source.log'\n".into(),
        ..Default::default()
    });
    prepare_sources(&c, seed);
    c.start_all();
    for _ in 0..3 {
        std::thread::sleep(Duration::from_millis(r.gen_range(100..1500)));
        c.kill9("master-target");
        c.start("master-target");
    }
    c.wait_caught_up(Duration::from_secs(120));
    wait_for("a point", Duration::from_secs(30), || !points(&c, "vm1").is_empty());
    let log = source_log(&c);
    let pts = points(&c, "vm1");
    let m = check_point(&c, &log, &pts[0], "raw");
    discard(&c, &m);
    c.assert_identical();
}

#[test]
fn history_off_keeps_only_the_replica_and_says_so() {
    let mut c = Cluster::new(Opts {
        agent_extra: "crash_point_interval_secs = 0.2\n".into(),
        mt_extra: "retention_window_secs = 0\nsegment_bytes = 1048576\n".into(),
        ..Default::default()
    });
    c.start_all();
    c.wait_caught_up(Duration::from_secs(30));
    assert!(c.qemu_io("disk0", "write -P 9 0 8M\nflush\n").status.success());
    c.wait_caught_up(Duration::from_secs(30));
    c.assert_identical();
    assert!(points(&c, "vm1").is_empty());
    let (code, v) = c.mt_api("POST", "/machines/vm1/points", Some(json!({ "selector": "latest" })));
    assert_eq!(code, 404, "{v}");
    assert!(v["message"].as_str().unwrap().contains("history is off"), "{v}");
    let s = c.status("master-target")["machines"][0].clone();
    assert!(s["retention"]["journal_bytes"].as_u64().unwrap() < 2 << 20, "journal released once applied: {s:#}");
    assert!(s["retention"]["base_seq"].is_null(), "no base without history: {s:#}");
}

#[test]
fn a_connected_client_keeps_a_discarded_export_pinned() {
    let mut c = Cluster::new(Opts {
        agent_extra: "crash_point_interval_secs = 0.2\n".into(),
        mt_extra: "retention_window_secs = 1\nsegment_bytes = 1048576\n".into(),
        ..Default::default()
    });
    c.start_all();
    c.wait_caught_up(Duration::from_secs(30));
    wait_for("a point", Duration::from_secs(30), || !points(&c, "vm1").is_empty());
    let (code, m) = c.mt_api(
        "POST",
        "/machines/vm1/materializations",
        Some(json!({ "point": "latest-processed", "kind": "export" })),
    );
    assert_eq!(code, 201, "{m}");
    let url = format!("nbd+unix:///{}?socket={}", m["exports"][0].as_str().unwrap(), nbd_socket(&c).display());
    // A test machine that stays connected (qemu-io waiting on its stdin).
    let mut client = std::process::Command::new("qemu-io")
        .args(["-r", "-f", "raw", &url])
        .stdin(std::process::Stdio::piped())
        .stdout(std::process::Stdio::null())
        .stderr(std::process::Stdio::piped())
        .spawn()
        .unwrap();
    std::thread::sleep(Duration::from_millis(500));
    if let Ok(Some(st)) = client.try_wait() {
        let mut e = String::new();
        std::io::Read::read_to_string(client.stderr.as_mut().unwrap(), &mut e).unwrap();
        panic!("the NBD client exited ({st}): {e}");
    }
    discard(&c, &m);
    let base = |c: &Cluster| c.status("master-target")["machines"][0]["retention"]["base_seq"].as_u64().unwrap();
    let pinned_base = base(&c);
    for i in 0..6u8 {
        assert!(c.qemu_io("disk0", &format!("write -P {} 0 1M\nflush\n", i + 1)).status.success());
        std::thread::sleep(Duration::from_millis(400));
    }
    let s = c.status("master-target")["machines"][0].clone();
    assert_eq!(base(&c), pinned_base, "a connected client still reads the base: {s:#}");
    assert!(s["retention"]["pruning_paused"].as_str().unwrap_or("").contains("still connected"), "{s:#}");
    drop(client.stdin.take());
    client.wait().unwrap();
    wait_for("pruning after the client left", Duration::from_secs(20), || base(&c) > pinned_base);
}

#[test]
fn history_turned_off_and_on_again_restarts_from_a_new_base() {
    let mut c = Cluster::new(Opts {
        agent_extra: "crash_point_interval_secs = 0.2\n".into(),
        mt_extra: "retention_window_secs = 3600\nsegment_bytes = 1048576\n".into(),
        ..Default::default()
    });
    c.start_all();
    c.wait_caught_up(Duration::from_secs(30));
    assert!(c.qemu_io("disk0", "write -P 1 0 4M\nflush\n").status.success());
    c.wait_caught_up(Duration::from_secs(30));
    let old = points(&c, "vm1");
    assert!(!old.is_empty());
    let cfg = c.path().join("master-target.toml");
    let set_window = |secs: &str| {
        let t = std::fs::read_to_string(&cfg).unwrap();
        let t: String = t
            .lines()
            .map(|l| {
                if l.starts_with("retention_window_secs") {
                    format!("retention_window_secs = {secs}\n")
                } else {
                    format!("{l}\n")
                }
            })
            .collect();
        std::fs::write(&cfg, t).unwrap();
    };
    c.stop("master-target");
    set_window("0");
    c.start("master-target");
    assert!(c.qemu_io("disk0", "write -P 2 0 4M\nflush\n").status.success());
    c.wait_caught_up(Duration::from_secs(30));
    c.stop("master-target");
    set_window("3600");
    c.start("master-target");
    assert!(c.qemu_io("disk0", "write -P 3 4M 1M\nflush\n").status.success());
    c.wait_caught_up(Duration::from_secs(30));
    wait_for("points again", Duration::from_secs(30), || !points(&c, "vm1").is_empty());
    let s = c.status("master-target")["machines"][0].clone();
    assert!(s["events"].to_string().contains("history-restarted"), "{s:#}");
    let pts = points(&c, "vm1");
    assert!(pts[0]["seq"].as_u64() > old.last().unwrap()["seq"].as_u64(), "old points are gone: {pts:#?}");
    let (code, p) = c.mt_api("POST", "/machines/vm1/points", Some(json!({ "selector": "latest" })));
    assert_eq!(code, 200, "{p}");
    let (code, m) =
        c.mt_api("POST", "/machines/vm1/materializations", Some(json!({ "point": p["id"], "kind": "export" })));
    assert_eq!(code, 201, "{m}");
    let url = format!("nbd+unix:///{}?socket={}", m["exports"][0].as_str().unwrap(), nbd_socket(&c).display());
    assert_eq!(image_difference(&c.source("disk0"), "raw", &url, "raw"), None);
}
