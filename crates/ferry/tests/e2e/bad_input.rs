//! Hostile and malformed input at the replication ports: clear errors, only that connection
//! closes, the daemons keep serving and lose nothing.

use std::io::{Read, Write};
use std::time::Duration;

use crate::harness::*;
use ferry_protocol::{DiskDescriptor, FrameCodec, Hello, MachineDescriptor, Message, Record, RecordBody, Role};
use futures::{SinkExt, StreamExt};
use tokio_util::codec::Framed;

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn malformed_frames_close_only_that_connection() {
    let mut c = Cluster::new(Opts::default());
    c.start_all();
    // Plaintext garbage on a TLS port: the handshake fails, nothing else happens.
    let mut raw = std::net::TcpStream::connect(("127.0.0.1", c.ps_port)).unwrap();
    let _ = raw.write_all(b"GET / HTTP/1.0\r\n\r\n\x00\xff garbage");
    raw.set_read_timeout(Some(Duration::from_secs(5))).unwrap();
    let mut sink = Vec::new();
    let _ = raw.read_to_end(&mut sink);

    // A well-authenticated peer sending a corrupt frame gets an error naming the problem.
    let mut tls = tls_to(c.ps_port, &c, "agent-vm1", "process-server").await;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let mut frame = b"FRY1".to_vec();
    frame.push(ferry_protocol::PROTOCOL_VERSION);
    frame.extend_from_slice(b"\x00\x00\x00\x00\x00\x00\x04\xde\xad\xbe\xefabcd");
    tls.write_all(&frame).await.unwrap();
    let mut resp = Vec::new();
    let _ = tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut resp)).await;

    // A frame of another protocol version.
    let mut tls = tls_to(c.ps_port, &c, "agent-vm1", "process-server").await;
    tls.write_all(b"FRY1\x07\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00\x00").await.unwrap();
    let _ = tokio::time::timeout(Duration::from_secs(5), tls.read_to_end(&mut resp)).await;

    // A process server sending records outside the disk to the master target is refused with a
    // clear error and nothing is journaled.
    let tls = tls_to(c.mt_port, &c, "process-server", "master-target").await;
    let mut f = Framed::new(tls, FrameCodec::default());
    let machine = MachineDescriptor {
        name: "rogue".into(),
        disks: vec![DiskDescriptor { name: "d".into(), size: 1 << 20, uuid: "u".into() }],
    };
    f.send(Message::Hello(Hello {
        role: Role::ProcessServer,
        machine,
        generation: ferry_protocol::Generation(1),
        lineage: Default::default(),
    }))
    .await
    .unwrap();
    assert!(matches!(f.next().await, Some(Ok(Message::HelloAck(_)))));
    f.send(Message::Records(vec![Record {
        seq: ferry_protocol::Seq(1),
        time_ms: 0,
        body: RecordBody::Write { disk: 0, offset: 1 << 20, data: vec![1; 4096] },
    }]))
    .await
    .unwrap();
    match f.next().await {
        Some(Ok(Message::Error { message, .. })) => assert!(message.contains("beyond disk"), "{message}"),
        other => panic!("expected an error, got {other:?}"),
    }

    // An agent impersonating nothing: wrong role at the master target.
    let tls = tls_to(c.mt_port, &c, "agent-vm1", "master-target").await;
    let mut f = Framed::new(tls, FrameCodec::default());
    let machine = MachineDescriptor { name: "x".into(), disks: vec![] };
    f.send(Message::Hello(Hello {
        role: Role::Agent,
        machine,
        generation: ferry_protocol::Generation(1),
        lineage: Default::default(),
    }))
    .await
    .unwrap();
    match f.next().await {
        Some(Ok(Message::Error { message, .. })) => assert!(message.contains("process server"), "{message}"),
        other => panic!("expected an error, got {other:?}"),
    }

    // A path-traversal machine name is refused.
    let tls = tls_to(c.ps_port, &c, "agent-vm1", "process-server").await;
    let mut f = Framed::new(tls, FrameCodec::default());
    let machine = MachineDescriptor { name: "../../etc".into(), disks: vec![] };
    f.send(Message::Hello(Hello {
        role: Role::Agent,
        machine,
        generation: ferry_protocol::Generation(1),
        lineage: Default::default(),
    }))
    .await
    .unwrap();
    match f.next().await {
        Some(Ok(Message::Error { message, .. })) => assert!(message.contains("invalid machine name"), "{message}"),
        other => panic!("expected an error, got {other:?}"),
    }

    // Through all of this, replication kept working.
    let cc = &c;
    let out = tokio::task::block_in_place(|| cc.qemu_io("disk0", "write -P 3 0 2M\nflush\n"));
    assert!(out.status.success());
    tokio::task::block_in_place(|| {
        cc.wait_caught_up(Duration::from_secs(30));
        cc.assert_identical();
    });
    let log = c.log("process-server");
    assert!(
        log.contains("checksum mismatch") && log.contains("unsupported protocol version 7"),
        "the process server must log why it closed: {log}"
    );
}

/// Finding 5: a plain TCP NBD export, loopback included, would let every local user write the
/// protected disks: refused at start unless `nbd_tls` (the default export is an owner-only unix
/// socket).
#[test]
fn a_plain_tcp_nbd_export_is_refused_loopback_included() {
    let c = Cluster::new(Opts::default());
    let cfg = std::fs::read_to_string(c.path().join("agent.toml")).unwrap();
    for listen in ["127.0.0.1:0", "0.0.0.0:0"] {
        let cfg = cfg
            .lines()
            .map(|l| {
                if l.starts_with("nbd_socket") {
                    format!("nbd_listen = '{listen}'")
                } else if l.starts_with("status_listen") {
                    // The cluster holds the agent's own status socket; this run binds its own.
                    "status_listen = '127.0.0.1:0'".to_owned()
                } else {
                    l.to_owned()
                }
            })
            .collect::<Vec<_>>()
            .join("\n");
        std::fs::write(c.path().join("agent-open.toml"), cfg).unwrap();
        let out = std::process::Command::new(FERRY)
            .arg("agent")
            .arg("--config")
            .arg(c.path().join("agent-open.toml"))
            .output()
            .unwrap();
        assert!(!out.status.success(), "{listen}");
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("plain TCP") && err.contains("nbd_tls") && err.contains("unix socket"), "{err}");
    }
}

/// The master target's point exports are a machine's disks: never on plain TCP (refused at
/// start), only on its owner-only unix socket.
#[test]
fn master_target_point_exports_over_tcp_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    assert!(std::process::Command::new(FERRY).args(["certs", "--dir"]).arg(&certs).output().unwrap().status.success());
    let out = std::process::Command::new(FERRY)
        .args(["master-target", "--datastore"])
        .arg(dir.path().join("ds"))
        .arg("--retention")
        .arg(dir.path().join("ret"))
        .args(["--listen", "127.0.0.1:0", "--set", "nbd_listen = '127.0.0.1:0'", "--certs"])
        .arg(&certs)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("nbd_listen") && err.contains("owner-only unix socket"), "{err}");
}

#[test]
fn bad_configuration_names_the_file_and_the_problem() {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("ps.toml");
    std::fs::write(&p, "cache_dir = '/tmp/x'\ncache_capacity_bytes = 'lots'\n").unwrap();
    let out = std::process::Command::new(FERRY).args(["process-server", "--config"]).arg(&p).output().unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("ps.toml") && err.contains("cache_capacity_bytes"), "{err}");
    let out =
        std::process::Command::new(FERRY).args(["agent", "--config", "/nonexistent/agent.toml"]).output().unwrap();
    assert!(String::from_utf8_lossy(&out.stderr).contains("/nonexistent/agent.toml"));
}

/// Numbers no setting can mean (`inf`, NaN, 1e300, a percentage of 200) are refused when the
/// daemon starts, naming the key, instead of panicking a background task later and leaving a
/// daemon that runs but never replicates.
#[test]
fn out_of_range_numbers_in_a_configuration_are_refused_at_start() {
    let c = Cluster::new(Opts::default());
    for (component, set, key) in [
        ("agent", "crash_point_interval_secs = inf", "crash_point_interval_secs"),
        ("agent", "reconnect_interval_secs = 1e300", "reconnect_interval_secs"),
        ("agent", "hook_timeout_secs = -1", "hook_timeout_secs"),
        ("process-server", "reconnect_interval_secs = nan", "reconnect_interval_secs"),
        ("process-server", "throttle_free_percent = 200", "throttle_free_percent"),
        ("master-target", "retention_min_free_percent = 200", "retention_min_free_percent"),
        ("master-target", "retention_min_free_percent = nan", "retention_min_free_percent"),
        ("master-target", "retention_window_secs = inf", "retention_window_secs"),
    ] {
        let out = c.command(component).args(["--set", set]).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{component} started with {set}: {err}");
        assert!(
            err.contains(key) && (err.contains("not a number of seconds") || err.contains("not a percentage")),
            "{component} {set}: {err}"
        );
    }
    // Sizes and counts: 0 or 2^63 would reach an allocation or a division much later.
    for (component, set, key) in [
        ("agent", "batch_bytes = 0", "batch_bytes"),
        ("agent", "al_extents = 9223372036854775807", "al_extents"),
        ("agent", "log_limit_bytes = 9223372036854775807", "log_limit_bytes"),
        ("agent", "al_extent_bytes = 1", "al_extent_bytes"),
        ("process-server", "segment_bytes = 0", "segment_bytes"),
        ("process-server", "forward_batch_bytes = 9223372036854775807", "forward_batch_bytes"),
        ("process-server", "cache_capacity_bytes = 0", "cache_capacity_bytes"),
        ("master-target", "segment_bytes = 9223372036854775807", "segment_bytes"),
    ] {
        let out = c.command(component).args(["--set", set]).output().unwrap();
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(!out.status.success(), "{component} started with {set}: {err}");
        assert!(err.contains(key) && err.contains("out of range: use"), "{component} {set}: {err}");
    }
    let state = c.path().join("cs-state");
    let out = std::process::Command::new(FERRY)
        .args(["config-server", "--listen", "127.0.0.1:0", "--set", "heartbeat_timeout_secs = inf", "--state-dir"])
        .arg(&state)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(
        !out.status.success() && err.contains("heartbeat_timeout_secs") && err.contains("not a number of seconds"),
        "{err}"
    );
}

/// MT-5 on a real FAT filesystem: a vfat image made by mkfs.vfat, mounted through FUSE with
/// fusefat (this kernel has no vfat driver; ./test installs dosfstools and fusefat).
#[test]
fn retention_volume_on_fat_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let img = dir.path().join("fat.img");
    let mnt = dir.path().join("fat");
    std::fs::create_dir_all(&mnt).unwrap();
    std::fs::File::create(&img).unwrap().set_len(32 << 20).unwrap();
    let mkfs = ["mkfs.vfat", "/usr/sbin/mkfs.vfat", "/sbin/mkfs.vfat"]
        .iter()
        .any(|m| std::process::Command::new(m).arg(&img).output().map(|o| o.status.success()).unwrap_or(false));
    assert!(mkfs, "mkfs.vfat is missing: ./test installs dosfstools");
    let mounted = std::process::Command::new("fusefat")
        .args(["-o", "rw+"])
        .arg(&img)
        .arg(&mnt)
        .output()
        .map(|o| o.status.success())
        .unwrap_or(false);
    assert!(mounted, "mounting the FAT image with fusefat failed: ./test installs fusefat (needs /dev/fuse)");
    struct Unmount(std::path::PathBuf);
    impl Drop for Unmount {
        fn drop(&mut self) {
            let ok = std::process::Command::new("fusermount")
                .arg("-u")
                .arg(&self.0)
                .status()
                .map(|s| s.success())
                .unwrap_or(false);
            if !ok {
                let _ = std::process::Command::new("umount").arg("-l").arg(&self.0).status();
            }
        }
    }
    let _guard = Unmount(mnt.clone());
    let certs = dir.path().join("certs");
    assert!(std::process::Command::new(FERRY).args(["certs", "--dir"]).arg(&certs).output().unwrap().status.success());
    let out = std::process::Command::new(FERRY)
        .args(["master-target", "--datastore"])
        .arg(dir.path().join("ds"))
        .arg("--retention")
        .arg(mnt.join("retention"))
        .args(["--listen", "127.0.0.1:0", "--certs"])
        .arg(&certs)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("FAT") && err.contains("MT-5"), "{err}");
}

#[test]
fn retention_volume_inside_the_datastore_is_refused() {
    let dir = tempfile::tempdir().unwrap();
    let certs = dir.path().join("certs");
    assert!(std::process::Command::new(FERRY).args(["certs", "--dir"]).arg(&certs).output().unwrap().status.success());
    let out = std::process::Command::new(FERRY)
        .args(["master-target", "--datastore"])
        .arg(dir.path().join("ds"))
        .arg("--retention")
        .arg(dir.path().join("ds/retention"))
        .args(["--listen", "127.0.0.1:0", "--certs"])
        .arg(&certs)
        .output()
        .unwrap();
    assert!(!out.status.success());
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("lies inside") && err.contains("datastore"), "{err}");
}

/// One writer per disk file: a second agent started on a protected disk, or an agent started on
/// a replica's target disk while the master target applies to it (what a failover must never
/// leave behind), fails at start with an error naming the disk and the process holding it; the
/// running writers go on, and the replica stays byte-exact.
#[test]
fn a_disk_has_one_writer_and_a_second_one_fails_at_open() {
    let mut c = Cluster::new(Opts::default());
    c.start_all();
    assert!(c.qemu_io("disk0", "write -P 3 0 1M\nflush\n").status.success());
    c.wait_caught_up(Duration::from_secs(30));
    let mut cfg: toml::Table = std::fs::read_to_string(c.path().join("agent.toml")).unwrap().parse().unwrap();
    for (disk, holder) in [(c.source("disk0"), "agent"), (c.target("disk0"), "master-target")] {
        let state = c.path().join(format!("second-agent-{holder}"));
        std::fs::create_dir(&state).unwrap();
        cfg.insert("state_dir".into(), state.display().to_string().into());
        cfg.insert("nbd_socket".into(), state.join("nbd.sock").display().to_string().into());
        cfg.insert("status_listen".into(), "127.0.0.1:0".into());
        cfg["disks"].as_array_mut().unwrap()[0].as_table_mut().unwrap()["path"] = disk.display().to_string().into();
        let file = c.path().join(format!("second-agent-{holder}.toml"));
        std::fs::write(&file, toml::to_string(&cfg).unwrap()).unwrap();
        let out = std::process::Command::new(FERRY).arg("agent").arg("--config").arg(&file).output().unwrap();
        assert!(!out.status.success(), "a second writer of {} started", disk.display());
        let err = String::from_utf8_lossy(&out.stderr);
        assert!(err.contains("one writer per disk") && err.contains(&disk.display().to_string()), "{err}");
        assert!(err.contains(&format!("process {}", c.pid(holder))), "names the {holder} holding it: {err}");
    }
    assert!(c.qemu_io("disk0", "write -P 4 1M 1M\nflush\n").status.success());
    c.wait_caught_up(Duration::from_secs(30));
    c.assert_identical();
}
