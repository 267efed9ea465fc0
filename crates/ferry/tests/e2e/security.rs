//! Attacks on a running Ferry, performed as the attacker would: a local unprivileged user
//! (`nobody`, through `runuser`), and each shown refused at Ferry's own checks and modes.

use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::time::Duration;

use crate::harness::*;

/// Run `cmd args` as the unprivileged user `nobody`.
fn as_nobody(cmd: &str, args: &[&str]) -> Output {
    Command::new("runuser").args(["-u", "nobody", "--", cmd]).args(args).output().unwrap()
}

/// Run the ferry CLI as this test's user (the daemons' user).
fn ferry_cmd(args: &[&str]) -> Output {
    Command::new(FERRY).args(args).output().unwrap()
}

/// Every file and folder below `root` (and `root` itself) with its mode.
fn modes(root: &Path) -> Vec<(PathBuf, u32, bool)> {
    let mut out = Vec::new();
    let mut todo = vec![root.to_owned()];
    while let Some(p) = todo.pop() {
        let m = std::fs::symlink_metadata(&p).unwrap();
        out.push((p.clone(), m.permissions().mode() & 0o777, m.is_dir()));
        if m.is_dir() {
            for e in std::fs::read_dir(&p).unwrap().flatten() {
                todo.push(e.path());
            }
        }
    }
    out
}

/// Data at rest: target disks, bases, journal segments, spools, the agent's state and the
/// configuration database are 0600 in 0700 folders, so a local user who can reach the folders
/// that hold them reads nothing.
#[test]
fn replicated_data_and_the_database_are_private_to_ferrys_user() {
    if is_not_root() {
        eprintln!("skipped: runs the attack as nobody, which needs root to switch users");
        return;
    }
    let mut c = Cluster::new(Opts::default());
    // The test folder is 0700 (tempfile): open it, so that a refusal below proves Ferry's modes.
    std::fs::set_permissions(c.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    let listing = as_nobody("ls", &[c.path().to_str().unwrap()]);
    assert!(
        listing.status.success(),
        "nobody must reach the test folder: {}",
        String::from_utf8_lossy(&listing.stderr)
    );
    c.start_all();
    assert!(c.qemu_io("disk0", "write -P 7 0 4M\nflush\n").status.success());
    c.wait_caught_up(Duration::from_secs(30));
    let state = c.path().join("cs-state");
    let cs_l = listener();
    let mut cs = start_daemon(
        &["config-server", "--listen", "127.0.0.1:0", "--state-dir", state.to_str().unwrap()],
        &c.path().join("cs.log"),
        None,
        &[("listen", &cs_l)],
    );
    let roots = [
        c.path().join("datastore/vm1"),
        c.path().join("retention"),
        c.path().join("cache"),
        c.path().join("agent-state"),
        state.clone(),
    ];
    let mut files = 0;
    for root in &roots {
        for (p, mode, dir) in modes(root) {
            if p.extension().is_some_and(|e| e == "sock") {
                continue;
            }
            if dir {
                assert_eq!(mode, 0o700, "{} is a folder of mode {mode:o}", p.display());
            } else {
                assert_eq!(mode & 0o077, 0, "{} is readable by others (mode {mode:o})", p.display());
                files += 1;
            }
        }
    }
    assert!(files >= 5, "the walk found Ferry's files ({files})");
    // And the attack itself: nobody reads neither the replica nor the database.
    let target = c.target("disk0");
    let read = as_nobody("cat", &[target.to_str().unwrap()]);
    assert!(!read.status.success() && read.stdout.is_empty(), "nobody read the replica");
    assert!(
        String::from_utf8_lossy(&read.stderr).contains("Permission denied"),
        "{}",
        String::from_utf8_lossy(&read.stderr)
    );
    let db = as_nobody("ls", &[state.to_str().unwrap()]);
    assert!(!db.status.success(), "nobody listed the configuration server's state");
    let _ = cs.kill();
    let _ = cs.wait();
}

/// The layout vm1's agent announces (from its state file).
fn vm1_layout(c: &Cluster) -> ferry_protocol::MachineDescriptor {
    let state: serde_json::Value =
        serde_json::from_slice(&std::fs::read(c.path().join("agent-state/state.json")).unwrap()).unwrap();
    ferry_protocol::MachineDescriptor {
        name: "vm1".into(),
        disks: serde_json::from_value(state["disks"].clone()).unwrap(),
    }
}

/// One invalid record (a disk the machine lacks, an offset that wraps) is refused by the process
/// server before it is acknowledged or spooled, with its code; the machine's replication goes on
/// (it once blocked forwarding for good). A refused layout does not reveal the replica's.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn an_invalid_record_is_refused_before_it_is_acknowledged_and_blocks_nothing() {
    use ferry_protocol::{FrameCodec, Hello, Message, Record, RecordBody, Role};
    use futures::{SinkExt, StreamExt};
    let mut c = Cluster::new(Opts::default());
    c.start_all();
    assert!(c.qemu_io("disk0", "write -P 3 0 1M\nflush\n").status.success());
    c.wait_caught_up(Duration::from_secs(30));
    let layout = vm1_layout(&c);
    let bad_bodies = [
        RecordBody::Write { disk: 99, offset: 0, data: vec![9; 4096] },
        RecordBody::Zero { disk: 0, offset: u64::MAX - 100, len: 4096 },
    ];
    for body in bad_bodies {
        let tls = tls_to(c.ps_port, &c, "agent-vm1", "process-server").await;
        let mut f = tokio_util::codec::Framed::new(tls, FrameCodec::default());
        let hello = Hello {
            role: Role::Agent,
            machine: layout.clone(),
            generation: ferry_protocol::Generation(1),
            lineage: Default::default(),
        };
        f.send(Message::Hello(hello)).await.unwrap();
        let durable = match f.next().await {
            Some(Ok(Message::HelloAck(a))) => a.durable_seq,
            other => panic!("expected a HelloAck, got {other:?}"),
        };
        let seq = ferry_protocol::Seq(durable.get() + 1);
        f.send(Message::Records(vec![Record { seq, time_ms: 0, body }])).await.unwrap();
        loop {
            match f.next().await {
                Some(Ok(Message::Error { code, message, .. })) => {
                    assert_eq!(code, ferry_protocol::codes::INVALID_RECORD.code, "{message}");
                    break;
                }
                Some(Ok(Message::Ack(a))) if a.durable_seq >= seq => {
                    panic!("the invalid record was acknowledged: {a:?}")
                }
                Some(Ok(_)) => continue,
                other => panic!("expected an error, got {other:?}"),
            }
        }
    }
    // The real agent reconnects and its writes still reach the replica, byte for byte.
    assert!(c.qemu_io("disk0", "write -P 4 1M 1M\nflush\n").status.success());
    c.wait_caught_up(Duration::from_secs(60));
    c.assert_identical();

    // A process server's certificate offering vm1 with another layout learns nothing of vm1's.
    let tls = tls_to(c.mt_port, &c, "process-server", "master-target").await;
    let mut f = tokio_util::codec::Framed::new(tls, FrameCodec::default());
    let mut other = layout.clone();
    other.disks[0].size *= 2;
    let hello = Hello {
        role: Role::ProcessServer,
        machine: other,
        generation: ferry_protocol::Generation(1),
        lineage: Default::default(),
    };
    f.send(Message::Hello(hello)).await.unwrap();
    match f.next().await {
        Some(Ok(Message::Error { code, message, remedy })) => {
            assert_eq!(code, ferry_protocol::codes::DISK_LAYOUT_CHANGED.code);
            let told = format!("{message} {remedy}");
            assert!(
                !told.contains(&layout.disks[0].uuid) && !told.contains(&layout.disks[0].size.to_string()),
                "{told}"
            );
        }
        other => panic!("expected a refusal, got {other:?}"),
    }
}

/// A web page cannot drive an agent: the "simple" cross-origin POSTs a browser sends without a
/// preflight (an `Origin` header, a form or text body) are refused before any handler runs,
/// so no point is taken and no write is held; Ferry's own JSON requests still work.
#[test]
fn a_web_page_cannot_take_points_or_hold_writes_through_a_status_listener() {
    let mut c = Cluster::new(Opts { agent_extra: "crash_point_interval_secs = 0\n".into(), ..Default::default() });
    c.start_all();
    c.wait_caught_up(Duration::from_secs(30));
    let port = c.status["agent"];
    let tags = |c: &Cluster| c.status("agent")["points"]["crash_tags"].as_u64().unwrap_or(0);
    let before = tags(&c);
    let curl = |path: &str, headers: &[&str], data: &str| -> u16 {
        let mut cmd = Command::new("curl");
        cmd.args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "-X", "POST"]);
        for h in headers {
            cmd.args(["-H", h]);
        }
        let out = cmd.args(["--data-binary", data]).arg(format!("http://127.0.0.1:{port}{path}")).output().unwrap();
        String::from_utf8_lossy(&out.stdout).trim().parse().unwrap_or(0)
    };
    // What a page's <form> or fetch(..., {mode: "no-cors"}) sends.
    assert_eq!(curl("/points/crash", &["Origin: http://evil.example"], "x"), 403);
    assert_eq!(curl("/points/crash", &["Content-Type: text/plain"], "x"), 403);
    assert_eq!(curl("/points/crash", &[], "a=b"), 403, "curl -d sends a form body");
    assert_eq!(curl("/points/crash", &["Content-Type: multipart/form-data; boundary=x"], "x"), 403);
    let prepare = r#"{"group": "g", "tag": 1}"#;
    assert_eq!(curl("/group/prepare", &["Origin: null", "Content-Type: application/json"], prepare), 403);
    assert_eq!(curl("/group/prepare", &["Sec-Fetch-Site: cross-site", "Content-Type: application/json"], prepare), 403);
    assert_eq!(tags(&c), before, "no point was taken");
    // The machine still writes (no write hold), and Ferry's own request is served.
    assert!(c.qemu_io("disk0", "write -P 5 0 64k\nflush\n").status.success());
    let (code, v) = c.api("agent", "POST", "/points/crash", None);
    assert_eq!(code, 200, "{v}");
    assert_eq!(tags(&c), before + 1);
}

/// The master target's point API and the agent's point and verify routes need the daemon's
/// control token, which only the daemon's user can read: a local user (as `nobody`, who reaches
/// the loopback listeners and the test folder) can neither read the token nor take a point,
/// open a writable export of a machine's disk, discard another operator's export or start a
/// verify; the read-only status stays open. The ferry CLI, as the daemon's user, is served.
#[test]
fn a_local_user_cannot_use_the_point_api_or_the_agents_control_routes() {
    let mut c = Cluster::new(Opts { agent_extra: "crash_point_interval_secs = 0\n".into(), ..Default::default() });
    c.start_all();
    assert!(c.qemu_io("disk0", "write -P 7 0 1M\nflush\n").status.success());
    c.wait_caught_up(Duration::from_secs(30));
    // An operator's export, which the attacker will try to discard.
    let (code, export) = c.mt_api(
        "POST",
        "/machines/vm1/materializations",
        Some(serde_json::json!({ "point": "latest-processed", "kind": "export" })),
    );
    assert_eq!(code, 201, "{export}");
    let id = export["id"].as_str().unwrap().to_owned();
    let listed =
        |c: &Cluster| c.mt_api("GET", "/materializations", None).1["materializations"].as_array().unwrap().len();
    let tags = |c: &Cluster| c.status("agent")["points"]["crash_tags"].as_u64().unwrap_or(0);
    let (before_listed, before_tags) = (listed(&c), tags(&c));

    let token_files = [c.status("agent"), c.status("master-target")]
        .map(|st| PathBuf::from(st["control_token_file"].as_str().unwrap()));
    for f in &token_files {
        assert_eq!(std::fs::metadata(f).unwrap().permissions().mode() & 0o777, 0o600, "{}", f.display());
    }
    let (mt, agent) = (c.status["master-target"], c.status["agent"]);
    let attempts: Vec<(u16, &str, String, String)> = vec![
        (
            mt,
            "POST",
            "/machines/vm1/materializations".into(),
            r#"{"point": "latest-processed", "kind": "export", "writable": true}"#.into(),
        ),
        (mt, "POST", "/machines/vm1/points".into(), r#"{"selector": "latest"}"#.into()),
        (mt, "DELETE", format!("/materializations/{id}"), String::new()),
        (agent, "POST", "/points/crash".into(), String::new()),
        (agent, "POST", "/points/app".into(), String::new()),
        (agent, "POST", "/verify".into(), r#"{"disk": "disk0", "repair": true}"#.into()),
        (agent, "POST", "/group/point".into(), "{}".into()),
    ];
    let root = !is_not_root();
    if root {
        std::fs::set_permissions(c.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
        assert!(as_nobody("ls", &[c.path().to_str().unwrap()]).status.success(), "nobody reaches the test folder");
        for f in &token_files {
            let read = as_nobody("cat", &[f.to_str().unwrap()]);
            assert!(!read.status.success() && read.stdout.is_empty(), "nobody read {}", f.display());
        }
        let status = as_nobody(
            "curl",
            &["-s", "-o", "/dev/null", "-w", "%{http_code}", &format!("http://127.0.0.1:{mt}/status")],
        );
        assert_eq!(String::from_utf8_lossy(&status.stdout), "200", "the read-only status stays open");
    }
    for (port, method, path, body) in &attempts {
        let url = format!("http://127.0.0.1:{port}{path}");
        let mut args =
            vec!["-s", "-o", "/dev/null", "-w", "%{http_code}", "-X", method, "-H", "Content-Type: application/json"];
        if !body.is_empty() {
            args.extend(["--data-binary", body.as_str()]);
        }
        args.push(&url);
        for bearer in [None, Some("Authorization: Bearer fc_guessed")] {
            let mut a = args.clone();
            if let Some(h) = bearer {
                a.splice(0..0, ["-H", h]);
            }
            let out = if root { as_nobody("curl", &a) } else { Command::new("curl").args(&a).output().unwrap() };
            let code = String::from_utf8_lossy(&out.stdout).into_owned();
            let want = if bearer.is_some() { "403" } else { "401" };
            assert_eq!(code, want, "{method} {path} with {bearer:?}");
        }
    }
    // Nothing changed: no point, no new export, the operator's export still there.
    assert_eq!(tags(&c), before_tags, "no point was taken");
    assert_eq!(listed(&c), before_listed, "no export was made or discarded");
    assert!(c.status("agent")["write_hold"].is_null());
    // The daemon's own user (the CLI reads the token file the status names) is served.
    let out = ferry_cmd(&["agent", "crash-point", "--status-addr", &format!("127.0.0.1:{agent}")]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(tags(&c), before_tags + 1);
    let out = ferry_cmd(&["master-target", "discard", &id, "--status-addr", &format!("127.0.0.1:{mt}")]);
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    assert_eq!(listed(&c), before_listed - 1);
}

/// Images of a point go only where the admin allows, never through a link (qemu-img follows
/// links: a planted one made it create or overwrite any file), and a new replica never adopts a
/// file it did not create (planted data in the source's holes would have stayed in the replica).
#[test]
fn images_go_only_below_the_image_root_without_links_and_planted_targets_are_set_aside() {
    let mut c = Cluster::new(Opts::default());
    // Planted before the machine is first protected: data where the source has a hole.
    let planted = c.path().join("datastore/vm1/disk0.img");
    std::fs::create_dir_all(planted.parent().unwrap()).unwrap();
    {
        use std::os::unix::fs::FileExt;
        let f = std::fs::File::create(&planted).unwrap();
        f.set_len(64 << 20).unwrap();
        f.write_all_at(&[0xaa; 65536], 32 << 20).unwrap();
    }
    c.start_all();
    assert!(c.qemu_io("disk0", "write -P 7 0 1M\nflush\n").status.success());
    c.wait_caught_up(Duration::from_secs(30));
    c.assert_identical();
    let aside: Vec<_> = std::fs::read_dir(c.path().join("datastore/vm1"))
        .unwrap()
        .flatten()
        .filter(|e| e.file_name().to_string_lossy().starts_with("disk0.img.not-adopted-"))
        .collect();
    assert_eq!(aside.len(), 1, "the planted file is moved aside, not adopted and not deleted");

    let victim = c.path().join("victim");
    std::fs::write(&victim, b"keep me").unwrap();
    let evil = c.path().join("evil");
    std::fs::create_dir_all(&evil).unwrap();
    for name in ["disk0.raw", "disk0.img", "disk0.qcow2"] {
        std::os::unix::fs::symlink(&victim, evil.join(name)).unwrap();
    }
    let outside = tempfile::tempdir().unwrap();
    std::os::unix::fs::symlink(outside.path(), c.path().join("link")).unwrap();
    let materialize = |dir: &Path| {
        c.mt_api(
            "POST",
            "/machines/vm1/materializations",
            Some(serde_json::json!({ "point": "latest-processed", "kind": "image", "dir": dir })),
        )
    };
    for (dir, why) in [
        (evil.clone(), "already exists"),
        (c.path().join("link/x"), "symbolic link"),
        (outside.path().join("x"), "not below the image root"),
        (c.path().join("a/../../x"), "not below the image root"),
    ] {
        let (code, v) = materialize(&dir);
        assert_eq!(code, 400, "{}: {v}", dir.display());
        assert!(v["message"].as_str().unwrap().contains(why), "{}: {v}", dir.display());
    }
    assert_eq!(std::fs::read(&victim).unwrap(), b"keep me");
    assert_eq!(std::fs::read_dir(outside.path()).unwrap().count(), 0, "nothing was created outside");
    // Below the root, without links: served.
    let (code, v) = materialize(&c.path().join("images/ok"));
    assert_eq!(code, 201, "{v}");
}

/// A flood of slow-header connections to the master target's loopback status listener cannot
/// take the descriptors it needs: connections over the cap are closed at accept, the others
/// after the header timeout; a request from another address is served throughout, replication
/// goes on, and descriptors and memory come back once the flood ends.
#[test]
fn a_connection_flood_on_a_status_listener_is_bounded_and_the_master_target_keeps_serving() {
    let mut c = Cluster::new(Opts::default());
    c.start_all();
    assert!(c.qemu_io("disk0", "write -P 3 0 1M\nflush\n").status.success());
    c.wait_caught_up(Duration::from_secs(30));
    let pid = c.pid("master-target");
    let port = c.status["master-target"];
    let (fds0, rss0) = fds_and_rss(pid);
    let probe = || {
        let out = Command::new("curl")
            .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "--max-time", "10", "--interface", "127.0.0.3"])
            .arg(format!("http://127.0.0.1:{port}/status"))
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).into_owned()
    };
    let mut flood = Vec::new();
    // 16 000: the test's own descriptor limit here is 20 000.
    for _ in 0..16 {
        flood.extend(slow_connections(port, "127.0.0.2", 1000, b"GET /status HTTP/1.1\r\nHost: x\r\n"));
        assert_eq!(probe(), "200", "a request from another address is served during the flood");
    }
    let (fds, _) = fds_and_rss(pid);
    // The per-source cap (128) bounds what the flood holds, whatever its size.
    assert!(fds <= fds0 + 128 + 16, "the flood holds {fds} descriptors (baseline {fds0})");
    eprintln!("flood: {} client sockets, daemon descriptors {fds0} -> {fds}", flood.len());
    assert!(flood.len() >= 15_000, "the flood reached the listener");
    // Replication goes on meanwhile.
    assert!(c.qemu_io("disk0", "write -P 4 1M 1M\nflush\n").status.success());
    c.wait_caught_up(Duration::from_secs(60));
    c.assert_identical();
    drop(flood);
    let deadline = std::time::Instant::now() + Duration::from_secs(60);
    loop {
        let (fds, rss) = fds_and_rss(pid);
        // The allocator keeps some freed memory (its arenas grow with the threads that served
        // the flood); a leak of even 1 KiB per connection would hold 16 MiB more than this.
        if fds <= fds0 + fds0 / 10 + 1 && rss <= rss0 + rss0 / 4 + (8 << 20) {
            break;
        }
        assert!(std::time::Instant::now() < deadline, "descriptors {fds} (was {fds0}), RSS {rss} (was {rss0})");
        std::thread::sleep(Duration::from_millis(200));
    }
    assert_eq!(probe(), "200");
}

/// Finding 1: a certificate of one machine's agent, or of another kind of component, cannot
/// stream another machine. At the process server only the certificate naming vm1's agent streams
/// vm1; at the master target only a process server's certificate says Hello as a process
/// server. Each is refused with 9015 before anything is spooled or journaled (the forged records
/// once landed at seq 10^12 and made every later write of vm1 a "duplicate"); vm1's replica stays
/// byte-exact and its replication goes on.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_certificate_streams_only_the_machine_and_the_role_it_names() {
    use ferry_protocol::{FrameCodec, Hello, Message, Record, RecordBody, Role};
    use futures::{SinkExt, StreamExt};
    let mut c = Cluster::new(Opts { agents: 2, ..Default::default() });
    c.start_all();
    assert!(c.qemu_io("disk0", "write -P 5 0 1M\nflush\n").status.success());
    c.wait_caught_up(Duration::from_secs(30));
    let layout = vm1_layout(&c);
    let forged = ferry_protocol::Seq(1_000_000_000_000);
    for (port, cert, server, role) in [
        (c.ps_port, "agent-vm2", "process-server", Role::Agent),
        (c.ps_port, "master-target", "process-server", Role::Agent),
        (c.ps_port, "process-server", "process-server", Role::Agent),
        (c.mt_port, "agent-vm1", "master-target", Role::ProcessServer),
        (c.mt_port, "agent-vm2", "master-target", Role::ProcessServer),
        (c.mt_port, "master-target", "master-target", Role::ProcessServer),
    ] {
        let tls = tls_to(port, &c, cert, server).await;
        let mut f = tokio_util::codec::Framed::new(tls, FrameCodec::default());
        let hello = Hello {
            role,
            machine: layout.clone(),
            generation: ferry_protocol::Generation(1),
            lineage: Default::default(),
        };
        f.send(Message::Hello(hello)).await.unwrap();
        let write = RecordBody::Write { disk: 0, offset: 0, data: vec![0xee; 4096] };
        let _ = f.send(Message::Records(vec![Record { seq: forged, time_ms: 0, body: write }])).await;
        match f.next().await {
            Some(Ok(Message::Error { code, message, remedy })) => {
                assert_eq!(code, ferry_protocol::codes::WRONG_IDENTITY.code, "{cert} → {server}: {message}");
                assert!(message.contains("certificate"), "the refusal names the certificate: {message}");
                assert!(remedy.contains("ferry register"), "{remedy}");
            }
            other => panic!("{cert} as {role} at {server}: expected a refusal, got {other:?}"),
        }
        assert!(f.next().await.is_none_or(|m| !matches!(m, Ok(Message::Ack(_)))), "nothing acknowledged");
    }
    // The routed process server's own certificate may say Hello for vm1, but initial-sync (bulk)
    // data, which bypasses the ordered log, is refused once vm1's replica is consistent.
    let tls = tls_to(c.mt_port, &c, "process-server", "master-target").await;
    let mut f = tokio_util::codec::Framed::new(tls, FrameCodec::default());
    let hello = Hello {
        role: Role::ProcessServer,
        machine: layout.clone(),
        generation: ferry_protocol::Generation(1),
        lineage: Default::default(),
    };
    f.send(Message::Hello(hello)).await.unwrap();
    assert!(matches!(f.next().await, Some(Ok(Message::HelloAck(_)))));
    let chunk = ferry_protocol::BulkChunk { id: 1, disk: 0, offset: 0, len: 4096, data: vec![0xee; 4096] };
    f.send(Message::Bulk(chunk)).await.unwrap();
    loop {
        match f.next().await {
            Some(Ok(Message::Error { code, message, .. })) => {
                assert_eq!(code, ferry_protocol::codes::BULK_OUTSIDE_INITIAL_SYNC.code, "{message}");
                break;
            }
            Some(Ok(Message::Ack(_) | Message::Event(_))) => continue,
            other => panic!("bulk outside an initial sync: expected a refusal, got {other:?}"),
        }
    }
    drop(f);
    let mt = c.status("master-target");
    let vm1 = mt["machines"].as_array().unwrap().iter().find(|m| m["machine"] == "vm1").unwrap();
    assert!(vm1["journaled_seq"].as_u64().unwrap() < forged.get(), "no forged record journaled: {vm1:#}");
    // The real agent's writes still arrive, byte for byte.
    assert!(c.qemu_io("disk0", "write -P 6 1M 1M\nflush\n").status.success());
    c.wait_caught_up(Duration::from_secs(60));
    c.assert_identical();
}

/// Finding 5: another local user cannot write a protected disk through the agent's NBD export.
/// The export is an owner-only unix socket (a plain TCP export is refused at start, see
/// `bad_input`); `nobody`, who reaches the folder holding the socket, cannot connect, and the
/// disk is unchanged.
#[test]
fn a_local_user_cannot_attach_a_protected_disk() {
    if is_not_root() {
        eprintln!("skipped: runs the attack as nobody, which needs root to switch users");
        return;
    }
    let mut c = Cluster::new(Opts::default());
    std::fs::set_permissions(c.path(), std::fs::Permissions::from_mode(0o755)).unwrap();
    c.start_all();
    assert!(c.qemu_io("disk0", "write -P 0x11 0 1M\nflush\n").status.success());
    c.wait_caught_up(Duration::from_secs(30));
    let sock = nbd_socket_in(c.path(), "agent");
    assert!(as_nobody("ls", &[c.path().to_str().unwrap()]).status.success(), "nobody reaches the socket's folder");
    assert_eq!(std::fs::metadata(&sock).unwrap().permissions().mode() & 0o777, 0o600, "the socket is owner-only");
    let url = c.nbd_url("disk0");
    let attack = as_nobody("qemu-io", &["-f", "raw", "-c", "write -P 0x99 0 64k", "-c", "flush", &url]);
    assert!(!attack.status.success(), "nobody attached the disk: {}", String::from_utf8_lossy(&attack.stdout));
    let err = String::from_utf8_lossy(&attack.stderr);
    assert!(err.contains("ermission denied"), "refused by the socket's mode: {err}");
    assert!(c.qemu_io("disk0", "read -P 0x11 0 1M\n").status.success(), "the disk is unchanged");
    // The master target's point exports likewise: its socket is owner-only (in its 0700
    // retention volume), and it serves no TCP export at all.
    let mt_sock = c.path().join("retention/nbd.sock");
    assert_eq!(std::fs::metadata(&mt_sock).unwrap().permissions().mode() & 0o777, 0o600);
    let mt_url = format!("nbd+unix:///x?socket={}", mt_sock.display());
    assert!(!as_nobody("qemu-io", &["-f", "raw", "-c", "read 0 4k", &mt_url]).status.success());
    c.wait_caught_up(Duration::from_secs(30));
    c.assert_identical();
}
