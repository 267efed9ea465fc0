//! End-to-end replication on loopback: three real processes, real qemu clients, byte-exact targets.

use std::time::Duration;

use crate::harness::*;

#[test]
fn random_overlapping_writes_replicate_byte_exact() {
    let mut c = Cluster::new(Opts { disks: vec![("disk0", 64 << 20), ("disk1", 32 << 20)], ..Default::default() });
    // Some data before protection starts: initial sync must copy it (and skip the holes).
    let pre = std::process::Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 0x5a 3M 5M", "-c", "write -P 0x11 60M 1M"])
        .arg(c.source("disk0"))
        .output()
        .unwrap();
    assert!(pre.status.success());
    c.start_all();
    c.wait_caught_up(Duration::from_secs(60));
    let seed = seed("random_overlapping_writes_replicate_byte_exact");
    let mut r = rng(seed);
    for (disk, size) in c.disks.clone() {
        let out = c.qemu_io(disk, &workload(&mut r, size, 1500));
        assert!(out.status.success(), "qemu-io failed: {}", String::from_utf8_lossy(&out.stderr));
        let text = String::from_utf8_lossy(&out.stdout);
        assert!(!text.contains("error") && !text.contains("failed"), "qemu-io reported an error: {text}");
    }
    c.wait_caught_up(Duration::from_secs(60));
    c.assert_identical();
    let s = c.status("agent");
    let initial = &s["completed_resyncs"][0];
    assert_eq!(initial["reason"], "InitialSync");
    // Only the 6 MiB that held data were copied, not the 96 MiB of disks.
    assert!(initial["bytes_copied"].as_u64().unwrap() <= 6 << 20, "initial sync copied holes: {initial}");
    // One counter orders both disks: seqs at every hop agree.
    assert_eq!(s["applied_seq"], s["last_seq"]);
    let ps = c.status("process-server");
    assert_eq!(ps["machines"][0]["applied_seq"], s["last_seq"]);
}

#[test]
fn clean_restart_of_every_component_resumes_without_resync() {
    let mut c = Cluster::new(Opts::default());
    c.start_all();
    let mut r = rng(seed("clean_restart"));
    assert!(c.qemu_io("disk0", &workload(&mut r, 64 << 20, 300)).status.success());
    c.wait_caught_up(Duration::from_secs(30));
    for comp in COMPONENTS {
        c.stop(comp);
        c.start(comp);
        assert!(c.qemu_io("disk0", &workload(&mut r, 64 << 20, 200)).status.success());
        c.wait_caught_up(Duration::from_secs(30));
        c.assert_identical();
    }
    let s = c.status("agent");
    let resyncs = s["completed_resyncs"].as_array().unwrap();
    assert!(resyncs.iter().all(|r| r["reason"] == "InitialSync"), "a clean restart must not resync: {resyncs:?}");
}

#[test]
fn resized_disk_is_refused_with_a_clear_error() {
    let mut c = Cluster::new(Opts::default());
    c.start_all();
    c.wait_caught_up(Duration::from_secs(30));
    c.stop("agent");
    std::fs::OpenOptions::new().write(true).open(c.source("disk0")).unwrap().set_len(128 << 20).unwrap();
    let out = c.command("agent").output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("resized") && err.contains("re-protection"), "{err}");
}

#[test]
fn status_commands_show_every_hop_as_table_and_json() {
    let mut c = Cluster::new(Opts::default());
    c.start_all();
    assert!(c.qemu_io("disk0", "write -P 7 0 1M\nflush\n").status.success());
    c.wait_caught_up(Duration::from_secs(30));
    for comp in COMPONENTS {
        let cfg = c.path().join(format!("{comp}.toml"));
        let json = std::process::Command::new(FERRY)
            .args([comp, "status", "--output", "json", "--config"])
            .arg(&cfg)
            .output()
            .unwrap();
        assert!(json.status.success(), "{}", String::from_utf8_lossy(&json.stderr));
        let v: serde_json::Value = serde_json::from_slice(&json.stdout).unwrap();
        assert_eq!(v["component"], comp);
        let table = std::process::Command::new(FERRY).args([comp, "status", "--config"]).arg(&cfg).output().unwrap();
        assert!(table.status.success());
        assert!(String::from_utf8_lossy(&table.stdout).contains("vm1"));
    }
    let v = c.status("agent");
    for k in [
        "last_seq",
        "process_server_durable_seq",
        "master_target_durable_seq",
        "applied_seq",
        "pending_log_bytes",
        "lag_seconds",
        "ship_bytes_per_sec",
        "mode",
    ] {
        assert!(!v[k].is_null(), "agent status lacks {k}");
    }
    let down = std::process::Command::new(FERRY)
        .args(["agent", "status", "--status-addr", &format!("127.0.0.1:{}", closed_port())])
        .output()
        .unwrap();
    assert!(!down.status.success());
    assert!(String::from_utf8_lossy(&down.stderr).contains("is the daemon running"));
}

#[test]
fn two_tib_sparse_disk_replicates_its_data_only() {
    let mut c = Cluster::new(Opts { disks: vec![("big", 2 << 40)], ..Default::default() });
    let pre = std::process::Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 0x42 1T 4M", "-c", "write -P 0x43 2047G 1M"])
        .arg(c.source("big"))
        .output()
        .unwrap();
    assert!(pre.status.success(), "{}", String::from_utf8_lossy(&pre.stderr));
    c.start_all();
    c.wait_caught_up(Duration::from_secs(60));
    let out = c.qemu_io("big", "write -P 0x44 100G 1M\nwrite -z 1T 64k\ndiscard 2047G 4k\nflush\n");
    assert!(out.status.success());
    c.wait_caught_up(Duration::from_secs(60));
    let s = c.status("agent");
    assert!(s["completed_resyncs"][0]["bytes_copied"].as_u64().unwrap() <= 5 << 20, "{s:#}");
    // qemu-img compare reads both files; holes compare quickly.
    c.assert_identical();
}

#[test]
fn nbd_export_with_tls_serves_qemu_with_a_client_certificate_and_refuses_plaintext_and_anonymous() {
    let mut c = Cluster::new(Opts { agent_extra: "nbd_tls = true\n".into(), nbd_tcp: true, ..Default::default() });
    c.start_all();
    let creds = c.path().join("qemu-creds");
    std::fs::create_dir_all(&creds).unwrap();
    std::fs::copy(c.path().join("certs/ca.pem"), creds.join("ca-cert.pem")).unwrap();
    let plain = std::process::Command::new("qemu-io")
        .args(["-f", "raw", "-c", "read 0 4k", &c.nbd_url("disk0")])
        .output()
        .unwrap();
    assert!(!plain.status.success(), "a plaintext client must be refused");
    assert!(String::from_utf8_lossy(&plain.stderr).contains("TLS"), "{}", String::from_utf8_lossy(&plain.stderr));
    let qemu_tls = |commands: &[&str]| {
        let mut cmd = std::process::Command::new("qemu-io");
        cmd.arg("--object")
            .arg(format!("tls-creds-x509,id=tls0,endpoint=client,dir={}", creds.display()))
            .arg("--image-opts")
            .arg(format!("driver=nbd,host=127.0.0.1,port={},export=disk0,tls-creds=tls0", c.nbd));
        for command in commands {
            cmd.args(["-c", command]);
        }
        cmd.output().unwrap()
    };
    // TLS without a client certificate: anyone local could still write the disk; refused.
    let anonymous = qemu_tls(&["write -P 0x62 0 64k"]);
    assert!(!anonymous.status.success(), "a TLS client without a certificate must be refused");
    // Certificates of Ferry's CA that are not this machine's NBD client's: another machine's
    // NBD client, the process server's, the agent's own. Each refused, nothing written.
    let out = std::process::Command::new(FERRY)
        .args(["certs", "--component", "nbd-client/vm1", "--component", "nbd-client/vm2", "--dir"])
        .arg(c.path().join("certs"))
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    for stem in ["nbd-client-vm2", "process-server", "agent-vm1"] {
        std::fs::copy(c.path().join(format!("certs/{stem}.pem")), creds.join("client-cert.pem")).unwrap();
        std::fs::copy(c.path().join(format!("certs/{stem}.key")), creds.join("client-key.pem")).unwrap();
        let refused = qemu_tls(&["write -P 0x63 0 64k"]);
        assert!(!refused.status.success(), "{stem}'s certificate must not attach vm1's disks");
    }
    assert!(c.log("agent").contains("may not attach machine vm1"), "the agent says why");
    // With the certificate issued to vm1's NBD client (`ferry certs --component nbd-client/vm1`).
    std::fs::copy(c.path().join("certs/nbd-client-vm1.pem"), creds.join("client-cert.pem")).unwrap();
    std::fs::copy(c.path().join("certs/nbd-client-vm1.key"), creds.join("client-key.pem")).unwrap();
    let tls = qemu_tls(&["write -P 0x61 1M 3M", "read -P 0x61 1M 3M", "flush"]);
    assert!(tls.status.success(), "{}{}", String::from_utf8_lossy(&tls.stdout), String::from_utf8_lossy(&tls.stderr));
    c.wait_caught_up(Duration::from_secs(30));
    c.assert_identical();
}

/// Without `nbd_listen` or `nbd_socket` the agent serves its disks on `<state_dir>/nbd.sock`,
/// owner-only, and names it in its status; qemu attaches there.
#[test]
fn nbd_export_defaults_to_a_unix_socket_in_the_state_folder() {
    use std::os::unix::fs::PermissionsExt;
    let mut c = Cluster::new(Opts::default());
    c.edit_config("agent", |t| {
        t.remove("nbd_socket");
    });
    c.start_all();
    let sock = c.path().join("agent-state/nbd.sock");
    assert_eq!(c.status("agent")["nbd_socket"], sock.display().to_string());
    assert_eq!(std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777, 0o600);
    let url = format!("nbd+unix:///disk0?socket={}", sock.display());
    let out = std::process::Command::new("qemu-io")
        .args(["-f", "raw", "-c", "write -P 0x33 0 1M", "-c", "flush", &url])
        .output()
        .unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    c.wait_caught_up(Duration::from_secs(30));
    c.assert_identical();
}
