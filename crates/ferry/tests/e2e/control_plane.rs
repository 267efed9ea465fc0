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
    let rt = tokio::runtime::Builder::new_current_thread().enable_all().build().unwrap();
    rt.block_on(async {
        use ferry_protocol::{FrameCodec, Hello, Message, Role};
        use futures::{SinkExt, StreamExt};
        for (port, as_component, server, role) in [
            (c.mt_port, "process-server", "master-target", Role::ProcessServer),
            (c.ps_port, "agent", "process-server", Role::Agent),
        ] {
            let tls = tls_to(port, &c, as_component, server).await;
            let mut f = tokio_util::codec::Framed::new(tls, FrameCodec::default());
            let hello = Hello { role, machine: intruder.clone(), generation: ferry_protocol::Generation(1) };
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
}
