//! `ferry lab workload` / `ferry lab verify` against a protected machine: the replica and an
//! app-consistent point hold exactly a prefix of the workload's records; a corrupted copy fails.

mod common;

use std::process::Command;
use std::time::Duration;

use common::*;
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
    let nbd = c.nbd;
    let pause = d.join("pause");
    let work = {
        let log = log.clone();
        std::thread::spawn(move || {
            Command::new(FERRY)
                .args([
                    "lab",
                    "workload",
                    "--disk",
                    &format!("127.0.0.1:{nbd}/disk0"),
                    "--disk",
                    &format!("127.0.0.1:{nbd}/disk1"),
                ])
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
