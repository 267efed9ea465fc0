//! Data-path components registered with a configuration server: certificates by CSR, heartbeats
//! with their status, health derived from it, and critical health once one stops.

use std::process::Command;
use std::time::{Duration, Instant};

use crate::harness::*;
use serde_json::Value;

#[test]
fn registered_components_take_their_settings_from_the_server_heartbeat_and_turn_critical_when_killed() {
    let state = tempfile::tempdir().unwrap();
    let server_listener = listener();
    let port = port_of(&server_listener);
    let addr = format!("127.0.0.1:{port}");
    let state_dir = state.path().to_string_lossy().into_owned();
    let out = state.path().with_extension("out");
    let mut server = start_daemon(
        &[
            "--output",
            "json",
            "config-server",
            "--listen",
            &addr,
            "--state-dir",
            &state_dir,
            "--set",
            "heartbeat_timeout_secs = 2",
            "--set",
            "health_interval_secs = 0.3",
        ],
        &state.path().with_extension("log"),
        Some(&out),
        &[("listen", &server_listener)],
    );
    let first = first_line(&out, &mut server);
    let certs = state.path().join("component-certs");
    for (kind, name) in [("agent", "vm1"), ("process-server", "process-server"), ("master-target", "master-target")] {
        let out = Command::new(FERRY)
            .args(["register", "--server", &addr, "--ca-fingerprint", first["ca_fingerprint"].as_str().unwrap()])
            .args([
                "--passphrase",
                first["registration_passphrase"].as_str().unwrap(),
                "--kind",
                kind,
                "--name",
                name,
                "--dir",
            ])
            .arg(certs.join(kind))
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    }
    // Settings held by the server: vm1 runs with policy gold (crash-consistent every second,
    // 2 h retention), which the agent and the master target take at start.
    let admin = first["admin_token"].as_str().unwrap().to_owned();
    let ca = state.path().join("tls/ca.pem");
    let cli = |args: &[&str]| {
        let out = Command::new(FERRY)
            .args(args)
            .args(["--server", &addr, "--token", &admin, "--ca"])
            .arg(&ca)
            .output()
            .unwrap();
        assert!(out.status.success(), "{args:?}: {}", String::from_utf8_lossy(&out.stderr));
        out
    };
    cli(&["policies", "create", "gold", "--crash-consistent-secs", "1", "--retention-secs", "7200"]);
    let put = Command::new("curl")
        .args(["-s", "-o", "/dev/null", "-w", "%{http_code}", "--cacert"])
        .arg(&ca)
        .args(["-X", "PUT", "-H", &format!("Authorization: Bearer {admin}"), "-H", "Content-Type: application/json"])
        .args(["--data-binary", r#"{"policy": "gold"}"#])
        .arg(format!("https://{addr}/api/v1/components/agent/vm1/settings"))
        .output()
        .unwrap();
    assert_eq!(String::from_utf8_lossy(&put.stdout), "200");
    let link = |kind: &str| {
        format!(
            "[config_server]\naddress = '{addr}'\nca = '{0}/ca.pem'\ntoken_file = '{0}/config-server.token'\nheartbeat_interval_secs = 0.3\n",
            certs.join(kind).display()
        )
    };
    let mut c = Cluster::new(Opts {
        agent_extra: link("agent"),
        ps_extra: link("process-server"),
        // vm1 is not protected through the server here: the master target's own file names it
        // (a linked master target creates replicas only for the machines it was given).
        mt_extra: format!("{}[machine_datastores]\nvm1 = '{{dir}}/datastore'\n", link("master-target")),
        ..Default::default()
    });
    // Likewise the process server spools only machines routed to it.
    c.edit_config("process-server", |t| {
        let mut route = toml::Table::new();
        route.insert("address".into(), t["master_target"].clone());
        route.insert("name".into(), "master-target".into());
        let mut routes = toml::Table::new();
        routes.insert("vm1".into(), route.into());
        t.insert("machine_master_targets".into(), routes.into());
    });
    c.start_all();
    c.wait_caught_up(Duration::from_secs(30));
    let mt = c.status("master-target");
    assert_eq!(mt["machines"][0]["retention"]["window_secs"], 7200.0, "the retention of vm1's policy: {mt:#}");
    let deadline = Instant::now() + Duration::from_secs(15);
    while c.status("agent")["points"]["crash_tags"].as_u64().unwrap_or(0) < 2 {
        assert!(
            Instant::now() < deadline,
            "the agent takes its policy's crash-consistent interval: {:#}",
            c.status("agent")
        );
        std::thread::sleep(Duration::from_millis(200));
    }
    let admin = admin.as_str();
    let components = || -> Value {
        let out = Command::new(FERRY)
            .args(["--output", "json", "components", "--server", &addr, "--token", admin, "--ca"])
            .arg(state.path().join("tls/ca.pem"))
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        serde_json::from_slice(&out.stdout).unwrap()
    };
    let wait = |what: &str, f: &dyn Fn(&Value) -> bool| {
        let deadline = Instant::now() + Duration::from_secs(20);
        loop {
            let v = components();
            if f(&v) {
                return v;
            }
            assert!(Instant::now() < deadline, "{what}: {v:#}");
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    let health =
        |v: &Value, kind: &str| v.as_array().unwrap().iter().find(|c| c["kind"] == kind).map(|c| c["health"].clone());
    let v = wait("all three healthy", &|v| {
        ["agent", "process-server", "master-target"].iter().all(|k| health(v, k) == Some("healthy".into()))
    });
    let agent = v.as_array().unwrap().iter().find(|c| c["kind"] == "agent").unwrap();
    assert_eq!(agent["status"]["machine"], "vm1", "the heartbeat carries the agent's status: {agent:#}");
    // A stream for a machine the server never gave this master target creates nothing (300 such
    // Hellos once made 300 replicas of sparse 4 TiB disks, with their threads, kept for good).
    let state: Value =
        serde_json::from_slice(&std::fs::read(c.path().join("agent-state/state.json")).unwrap()).unwrap();
    let intruder = ferry_protocol::MachineDescriptor {
        name: "intruder".into(),
        disks: serde_json::from_value(state["disks"].clone()).unwrap(),
    };
    // Its own agent certificate (the CA's holder issues it), so that what refuses it is the
    // protection check, not the identity check.
    let issued = Command::new(FERRY)
        .args(["certs", "--component", "agent/intruder", "--dir"])
        .arg(c.path().join("certs"))
        .output()
        .unwrap();
    assert!(issued.status.success(), "{}", String::from_utf8_lossy(&issued.stderr));
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        use ferry_protocol::{FrameCodec, Hello, Message, Role};
        use futures::{SinkExt, StreamExt};
        for (port, as_component, server, role) in [
            (c.mt_port, "process-server", "master-target", Role::ProcessServer),
            (c.ps_port, "agent-intruder", "process-server", Role::Agent),
        ] {
            let tls = tls_to(port, &c, as_component, server).await;
            let mut f = tokio_util::codec::Framed::new(tls, FrameCodec::default());
            let hello = Hello {
                role,
                machine: intruder.clone(),
                generation: ferry_protocol::Generation(1),
                lineage: Default::default(),
            };
            f.send(Message::Hello(hello)).await.unwrap();
            match f.next().await {
                Some(Ok(Message::Error { code, message, .. })) => {
                    assert_eq!(code, ferry_protocol::codes::NOT_PROTECTED.code, "{server}: {message}")
                }
                other => panic!("{server}: expected a refusal, got {other:?}"),
            }
        }
    });
    assert!(!c.path().join("cache/intruder").exists(), "no spool was created");
    assert!(!c.path().join("datastore/intruder").exists(), "no replica folder was created");
    assert!(!c.path().join("retention/intruder").exists(), "no journal was created");
    assert!(c.status("master-target")["machines"].as_array().unwrap().iter().all(|m| m["machine"] != "intruder"));
    c.kill9("process-server");
    let v =
        wait("the process server turns critical (806)", &|v| health(v, "process-server") == Some("critical".into()));
    assert!(v.to_string().contains("806"), "{v:#}");
    assert_eq!(health(&v, "master-target"), Some("healthy".into()));
    let _ = server.kill();
    let _ = server.wait();
    // What the server assigned is kept on the retention volume: restarted while the server is
    // gone, the master target still holds vm1's assigned settings (its window here; protection
    // also assigns datastores and process servers the same way).
    assert!(c.path().join("retention/assigned-settings.json").exists());
    // Gone for good: its address refuses connections (the test held its listener until now).
    drop(server_listener);
    c.kill9("master-target");
    c.start("master-target");
    let mt = c.status("master-target");
    assert_eq!(mt["settings"]["machine_retention_secs"]["vm1"], 7200.0, "kept across the restart: {mt:#}");
}

/// Registering a component again revokes its earlier certificate (a reinstalled host, a stolen
/// key): the server hands the revoked serial to every linked component with its settings, the
/// process server keeps it in its cache folder, and a stream from the old certificate is refused
/// with 9016 — the established stream is cut, and after a restart it stays refused — while the
/// new certificate streams on. An admin then revokes the new one by serial, with the same effect.
#[test]
fn registering_again_revokes_the_earlier_certificate_on_the_data_path() {
    let mut c = Cluster::new(Opts::default());
    // The server adopts the cluster's CA, so that what it signs verifies on the data path.
    let state = c.path().join("server");
    let server_listener = listener();
    let addr = format!("127.0.0.1:{}", port_of(&server_listener));
    let certs_set = format!("certs = '{}'", c.path().join("certs").display());
    let out = c.path().join("server.out");
    let args = ["--output", "json", "config-server", "--listen", &addr, "--state-dir"];
    let mut args: Vec<String> = args.iter().map(|s| s.to_string()).collect();
    args.extend([state.display().to_string(), "--set".into(), certs_set]);
    let args: Vec<&str> = args.iter().map(String::as_str).collect();
    let mut server = start_daemon(&args, &c.path().join("server.log"), Some(&out), &[("listen", &server_listener)]);
    let first = first_line(&out, &mut server);
    let root = c.path().to_owned();
    let register = |kind: &str, name: &str, dir: &str| {
        let out = Command::new(FERRY)
            .args(["register", "--server", &addr, "--ca-fingerprint", first["ca_fingerprint"].as_str().unwrap()])
            .args(["--passphrase", first["registration_passphrase"].as_str().unwrap()])
            .args(["--kind", kind, "--name", name, "--dir"])
            .arg(root.join(dir))
            .output()
            .unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    };
    let serial = |dir: &str| {
        let out = Command::new("openssl")
            .args(["x509", "-noout", "-serial", "-in"])
            .arg(root.join(dir).join("agent.pem"))
            .output()
            .unwrap();
        String::from_utf8_lossy(&out.stdout).trim().trim_start_matches("serial=").to_ascii_lowercase()
    };
    register("process-server", "process-server", "reg-ps");
    register("agent", "vm1", "reg-old");
    let old = serial("reg-old");
    let use_cert = |c: &Cluster, dir: &str| {
        let dir = c.path().join(dir);
        c.edit_config("agent", |t| {
            let tls = t["tls"].as_table_mut().unwrap();
            tls["cert"] = dir.join("agent.pem").display().to_string().into();
            tls["key"] = dir.join("agent.key").display().to_string().into();
        });
    };
    use_cert(&c, "reg-old");
    let reg_ps = c.path().join("reg-ps");
    c.edit_config("process-server", |t| {
        let mut link = toml::Table::new();
        link.insert("address".into(), addr.clone().into());
        link.insert("ca".into(), reg_ps.join("ca.pem").display().to_string().into());
        link.insert("token_file".into(), reg_ps.join("config-server.token").display().to_string().into());
        link.insert("heartbeat_interval_secs".into(), 0.3.into());
        t.insert("config_server".into(), link.into());
        let mut route = toml::Table::new();
        route.insert("address".into(), t["master_target"].clone());
        route.insert("name".into(), "master-target".into());
        let mut routes = toml::Table::new();
        routes.insert("vm1".into(), route.into());
        t.insert("machine_master_targets".into(), routes.into());
    });
    c.start_all();
    assert!(c.qemu_io("disk0", "write -P 7 0 1M\nflush\n").status.success());
    c.wait_caught_up(Duration::from_secs(30));

    register("agent", "vm1", "reg-new");
    let kept = c.path().join("cache/revoked-certificates.json");
    let wait_kept = |serial: &str| {
        let deadline = Instant::now() + Duration::from_secs(20);
        while !std::fs::read_to_string(&kept).unwrap_or_default().contains(serial) {
            assert!(Instant::now() < deadline, "the process server takes the revocation of {serial}");
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    let wait_refused = |c: &Cluster, serial: &str| {
        let deadline = Instant::now() + Duration::from_secs(30);
        loop {
            let e = c.status("agent")["link_error"].as_str().unwrap_or_default().to_owned();
            if e.contains("revoked") && e.contains(serial) {
                assert!(e.contains("9016"), "{e}");
                break;
            }
            assert!(Instant::now() < deadline, "the certificate {serial} is refused: {:#}", c.status("agent"));
            std::thread::sleep(Duration::from_millis(200));
        }
    };
    wait_kept(&old);
    // The agent's established stream is cut (no restart of anything) and its reconnection is
    // refused: the next write stays at the agent.
    assert!(c.qemu_io("disk0", "write -P 8 1M 1M\nflush\n").status.success());
    wait_refused(&c, &old);
    assert_ne!(c.status("agent")["caught_up"], true, "nothing of the new write reached the replica");
    // The process server restarts (the revocation is kept), the agent comes back with the old
    // certificate: refused again.
    c.kill9("process-server");
    c.start("process-server");
    c.kill9("agent");
    c.start("agent");
    wait_refused(&c, &old);
    assert_ne!(c.status("agent")["caught_up"], true, "nothing of the new write reached the replica");
    // With the new certificate the agent streams again, byte for byte.
    c.kill9("agent");
    use_cert(&c, "reg-new");
    c.start("agent");
    c.wait_caught_up(Duration::from_secs(60));
    c.assert_identical();

    // An admin revokes the new certificate by hand (a stolen key), pasting the serial as openssl
    // prints it; a reader cannot. The streaming agent is cut and refused.
    let new = serial("reg-new");
    let admin = first["admin_token"].as_str().unwrap().to_owned();
    let ca = state.join("tls/ca.pem");
    let cli = |token: &str, args: &[&str]| {
        Command::new(FERRY)
            .args(["--output", "json"])
            .args(args)
            .args(["--server", &addr, "--token", token, "--ca"])
            .arg(&ca)
            .output()
            .unwrap()
    };
    let reader = cli(&admin, &["tokens", "create", "--name", "watcher", "--role", "reader"]);
    assert!(reader.status.success(), "{}", String::from_utf8_lossy(&reader.stderr));
    let reader: serde_json::Value = serde_json::from_slice(&reader.stdout).unwrap();
    let reader = reader["token"].as_str().unwrap().to_owned();
    let refused = cli(&reader, &["certificates", "revoke", &new]);
    assert!(!refused.status.success());
    assert!(String::from_utf8_lossy(&refused.stderr).contains("admin"), "{}", String::from_utf8_lossy(&refused.stderr));
    let bad = cli(&admin, &["certificates", "revoke", "not-a-serial"]);
    assert!(!bad.status.success());
    assert!(String::from_utf8_lossy(&bad.stderr).contains("hex"), "{}", String::from_utf8_lossy(&bad.stderr));
    assert!(c.qemu_io("disk0", "write -P 9 2M 1M\nflush\n").status.success());
    let revoked = cli(&admin, &["certificates", "revoke", &new.to_ascii_uppercase(), "--reason", "key stolen"]);
    assert!(revoked.status.success(), "{}", String::from_utf8_lossy(&revoked.stderr));
    wait_kept(&new);
    assert!(c.qemu_io("disk0", "write -P 10 3M 1M\nflush\n").status.success());
    wait_refused(&c, &new);
    let list = cli(&reader, &["certificates", "revoked"]);
    assert!(list.status.success(), "{}", String::from_utf8_lossy(&list.stderr));
    let list: Vec<ferry_api::config_server::RevokedCertificate> = serde_json::from_slice(&list.stdout).unwrap();
    let reasons: Vec<(&str, &str)> = list.iter().map(|r| (r.serial.as_str(), r.reason.as_str())).collect();
    assert!(reasons.iter().any(|(s, r)| *s == old && r.contains("registered again")), "{reasons:?}");
    assert!(
        reasons.iter().any(|(s, r)| *s == new && r.contains("key stolen") && r.contains("agent/vm1")),
        "the revocation names whose certificate it was: {reasons:?}"
    );
    let _ = server.kill();
    let _ = server.wait();
}
