//! `ferry lab workload` / `ferry lab verify` against a protected machine: the replica and an
//! app-consistent point hold exactly a prefix of the workload's records; a corrupted copy fails.

use std::process::Command;
use std::time::Duration;

use crate::harness::*;
use serde_json::{json, Value};

#[test]
fn lab_workload_verifies_on_the_replica_and_an_app_point_and_fails_on_a_corrupted_copy() {
    let mut c = Cluster::new(Opts {
        disks: vec![("disk0", 16 << 20), ("disk1", 8 << 20)],
        agent_extra: "crash_point_interval_secs = 0.5\nfreeze_command = 'touch {dir}/pause; while [ ! -e {dir}/pause.paused ]; do sleep 0.01; done; cat {dir}/pause.paused >> {dir}/app-seqs; echo >> {dir}/app-seqs'\nthaw_command = 'rm -f {dir}/pause'\nhook_timeout_secs = 20\n".into(),
        ..Default::default()
    });
    c.start_all();
    c.wait_caught_up(Duration::from_secs(30));
    let d = c.path().to_owned();
    let log = d.join("workload.log");
    let (disk0, disk1) = (c.nbd_spec("agent", "disk0"), c.nbd_spec("agent", "disk1"));
    let pause = d.join("pause");
    let work = {
        let log = log.clone();
        std::thread::spawn(move || {
            Command::new(FERRY)
                .args(["lab", "workload", "--disk", &disk0, "--disk", &disk1])
                .arg("--record-log")
                .arg(&log)
                .args(["--records", "400", "--rate", "200", "--seed", "7", "--pause-file"])
                .arg(&pause)
                .output()
                .unwrap()
        })
    };
    std::thread::sleep(Duration::from_millis(700));
    let (code, app) = c.api("agent", "POST", "/points/app", None);
    assert_eq!(code, 200, "{app}");
    let out = work.join().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    c.wait_caught_up(Duration::from_secs(60));
    let verify = |disks: &[std::path::PathBuf], exact: Option<u64>| {
        let mut cmd = Command::new(FERRY);
        cmd.args(["--output", "json", "lab", "verify", "--seed", "7", "--record-log"]).arg(&log);
        for p in disks {
            cmd.arg("--disk").arg(p);
        }
        if let Some(e) = exact {
            cmd.args(["--exact-seq", &e.to_string()]);
        }
        cmd.output().unwrap()
    };
    // The replica after catch-up: everything.
    let out = verify(&[c.target("disk0"), c.target("disk1")], Some(400));
    assert!(out.status.success(), "{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    // The app-consistent point: exactly the records written before the pause.
    let paused: u64 = std::fs::read_to_string(d.join("app-seqs")).unwrap().trim().parse().unwrap();
    assert!(paused > 0 && paused < 400, "the point was taken mid-workload: {paused}");
    let (_, pts) = c.mt_api("GET", "/machines/vm1/points", None);
    let p = pts["points"].as_array().unwrap().iter().find(|p| p["kind"] == "app").cloned().expect("an app point");
    assert_eq!(p["seq"], app["seq"]);
    let (code, m) = c.mt_api(
        "POST",
        "/machines/vm1/materializations",
        Some(json!({ "point": p["id"], "kind": "image", "format": "raw" })),
    );
    assert_eq!(code, 201, "{m}");
    let files: Vec<std::path::PathBuf> =
        m["files"].as_array().unwrap().iter().map(|f| f.as_str().unwrap().into()).collect();
    let out = verify(&files, Some(paused));
    assert!(out.status.success(), "{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr));
    // One more record than the point holds: refused.
    assert!(!verify(&files, Some(paused + 1)).status.success());
    // A corrupted copy fails, naming the block.
    let copy = d.join("corrupt.img");
    std::fs::copy(c.target("disk0"), &copy).unwrap();
    let v: Value = serde_json::from_slice(&verify(&[copy.clone(), c.target("disk1")], None).stdout).unwrap();
    assert_eq!(v["consistent"], true);
    let lines = std::fs::read_to_string(&log).unwrap();
    let last0 = lines
        .lines()
        .rev()
        .map(|l| l.split_whitespace().map(|x| x.parse::<u64>().unwrap()).collect::<Vec<_>>())
        .find(|v| v[1] == 0)
        .unwrap();
    use std::os::unix::fs::FileExt;
    std::fs::OpenOptions::new().write(true).open(&copy).unwrap().write_all_at(&[0x55; 16], last0[2] + 2000).unwrap();
    let out = verify(&[copy, c.target("disk1")], Some(400));
    assert!(!out.status.success());
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains(&format!("offset {}", last0[2])), "{text}");
}

#[test]
fn a_cut_lab_link_stops_replication_and_a_restored_one_resumes_without_a_resync() {
    let mut c = Cluster::new(Opts::default());
    let (link_l, control_l) = (listener(), listener());
    let (link, control) = (port_of(&link_l), port_of(&control_l));
    c.edit_config("agent", |t| {
        t.insert("process_server".into(), format!("127.0.0.1:{link}").into());
    });
    let (listen, to, ctl) =
        (format!("127.0.0.1:{link}"), format!("127.0.0.1:{}", c.ps_port), format!("127.0.0.1:{control}"));
    let mut proxy = start_daemon(
        &["lab", "link", "--listen", &listen, "--to", &to, "--control", &ctl],
        &c.path().join("link.log"),
        None,
        &[("listen", &link_l), ("control", &control_l)],
    );
    c.start_all();
    c.wait_caught_up(Duration::from_secs(30));
    assert!(c.qemu_io("disk0", "write -P 1 0 4M\nflush\n").status.success());
    c.wait_caught_up(Duration::from_secs(30));
    let (code, v) = http_json(control, "POST", "/cut", None).unwrap();
    assert_eq!((code, v["cut"].as_bool()), (200, Some(true)));
    assert!(
        c.qemu_io("disk0", "write -P 2 4M 4M\nflush\n").status.success(),
        "the source keeps working while the sites are apart"
    );
    std::thread::sleep(Duration::from_secs(2));
    let s = c.status("agent");
    assert_eq!(s["caught_up"], false, "{s:#}");
    assert!(s["pending_log_bytes"].as_u64().unwrap() >= 4 << 20, "the changes wait at the agent: {s:#}");
    assert!(s["lag_seconds"].as_f64().unwrap() > 1.0, "{s:#}");
    let (code, _) = http_json(control, "POST", "/restore", None).unwrap();
    assert_eq!(code, 200);
    c.wait_caught_up(Duration::from_secs(60));
    c.assert_identical();
    let resyncs = c.status("agent")["completed_resyncs"].to_string();
    assert_eq!(resyncs.matches("reason").count(), 1, "only the initial sync, no resync after the outage: {resyncs}");
    // A slow link still carries replication.
    http_json(control, "POST", "/slow", Some(r#"{"latency_ms": 20, "bandwidth_bytes_per_sec": 4000000}"#)).unwrap();
    assert!(c.qemu_io("disk0", "write -P 3 0 2M\nflush\n").status.success());
    c.wait_caught_up(Duration::from_secs(60));
    c.assert_identical();
    let _ = proxy.kill();
    let _ = proxy.wait();
}
