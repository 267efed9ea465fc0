//! Multi-machine (replication group) points: three real agents coordinate a prepare/commit; a
//! slow, killed or uncommitted member leaves no partial multi-machine point.

use std::time::{Duration, Instant};

use crate::harness::*;
use serde_json::{json, Value};

fn wait_all_caught_up(c: &Cluster, agents: &[&str]) {
    let deadline = Instant::now() + Duration::from_secs(60);
    for a in agents {
        loop {
            if c.try_status(a).is_some_and(|s| s["caught_up"] == true) {
                break;
            }
            assert!(Instant::now() < deadline, "{a} not caught up: {:#}", c.try_status(a).unwrap_or_default());
            std::thread::sleep(Duration::from_millis(100));
        }
    }
}

fn multi_points(c: &Cluster, machine: &str) -> Vec<Value> {
    let (code, v) = c.mt_api("GET", &format!("/machines/{machine}/points"), None);
    assert_eq!(code, 200, "{v}");
    v["points"].as_array().unwrap().iter().filter(|p| p["scope"] == "multi").cloned().collect()
}

fn group(c: &Cluster) -> Value {
    let (code, v) = c.mt_api("GET", "/groups/g1/points", None);
    assert_eq!(code, 200, "{v}");
    v
}

fn append(c: &Cluster, agent: &str, text: &str) {
    use std::io::Write;
    let mut f = std::fs::OpenOptions::new().append(true).open(c.path().join(format!("{agent}.toml"))).unwrap();
    f.write_all(text.as_bytes()).unwrap();
}

fn wait_for_file_lines(path: &std::path::Path, word: &str, n: usize) {
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        let t = std::fs::read_to_string(path).unwrap_or_default();
        if t.matches(word).count() >= n {
            return;
        }
        assert!(Instant::now() < deadline, "{} never had {n} x {word}: {t}", path.display());
        std::thread::sleep(Duration::from_millis(50));
    }
}

fn member_request(tag: &str, members: &[&str]) -> Value {
    json!({ "group": "g1", "tag": tag, "timeout_ms": 5000, "members": members })
}

#[test]
fn group_tags_give_common_points_and_a_failed_member_leaves_none() {
    let mut c = Cluster::new(Opts {
        agents: 3,
        disks: vec![("disk0", 8 << 20)],
        agent_extra: "crash_point_interval_secs = 0\nsource_write_log = '{dir}/{machine}-source.log'\nfreeze_command = 'echo freeze >> {dir}/{machine}-hooks.log; test ! -e {dir}/{machine}-slow || sleep 5'\nthaw_command = 'echo thaw >> {dir}/{machine}-hooks.log'\nhook_timeout_secs = 10\n".into(),
        ..Default::default()
    });
    // Only the coordinator holds the key; every member (the coordinator's own agent too, for
    // the manual rounds below) checks its hash.
    let (key, public) = ferry_status::control::new_group_key_pair().unwrap();
    append(
        &c,
        "agent",
        &format!(
            "[group]\nname = 'g1'\ncoordinator = true\ncoordinator_key = '{key}'\ncoordinator_public_key = '{public}'\nmembers = ['127.0.0.1:{}', '127.0.0.1:{}']\ncrash_interval_secs = 0\nprepare_timeout_secs = 1\n",
            c.status["agent2"], c.status["agent3"]
        ),
    );
    append(&c, "agent2", &format!("[group]\nname = 'g1'\ncoordinator_public_key = '{public}'\n"));
    append(&c, "agent3", &format!("[group]\nname = 'g1'\ncoordinator_public_key = '{public}'\n"));
    let agents = ["agent", "agent2", "agent3"];
    c.start_all();
    wait_all_caught_up(&c, &agents);
    for a in agents {
        let out = std::process::Command::new("qemu-io")
            .args(["-f", "raw", &c.nbd_url_of(a, "disk0"), "-c", "write -P 7 0 1M", "-c", "flush"])
            .output()
            .unwrap();
        assert!(out.status.success());
    }

    // A group tag on every member: one common point, listed for each machine.
    let (code, r) = c.api("agent", "POST", "/group/point", Some(json!({})));
    assert_eq!(code, 200, "{r}");
    assert_eq!(r["committed"], true);
    let tag = r["tag"].as_str().unwrap().to_owned();
    wait_all_caught_up(&c, &agents);
    for m in ["vm1", "vm2", "vm3"] {
        let mp = multi_points(&c, m);
        assert_eq!(mp.len(), 1, "{m}: {mp:#?}");
        assert_eq!(mp[0]["group_tag"], tag.as_str());
        let (code, p) = c.mt_api("POST", &format!("/machines/{m}/points"), Some(json!({ "selector": "latest-multi" })));
        assert_eq!(code, 200, "{p}");
        assert_eq!(p["group_tag"], tag.as_str());
    }
    let g = group(&c);
    assert_eq!(g["points"].as_array().unwrap().len(), 1, "{g:#}");
    assert_eq!(g["points"][0]["members"].as_object().unwrap().len(), 3);
    // Each machine's multi point is its source state at its prepare position.
    for (i, m) in ["vm1", "vm2", "vm3"].iter().enumerate() {
        let p = &multi_points(&c, m)[0];
        let (code, mat) = c.mt_api(
            "POST",
            &format!("/machines/{m}/materializations"),
            Some(json!({ "point": p["id"], "kind": "image" })),
        );
        assert_eq!(code, 201, "{mat}");
        let log = read_source_log(&c.path().join(format!("{m}-source.log")));
        let src = if i == 0 { c.source("disk0") } else { c.path().join(format!("{m}-disk0.img")) };
        // Sources started empty: the oracle is zeros plus the logged writes.
        let zero = c.path().join(format!("{m}-zero.img"));
        std::fs::File::create(&zero).unwrap().set_len(std::fs::metadata(&src).unwrap().len()).unwrap();
        let oracle = c.path().join(format!("{m}-oracle.img"));
        replay_source(&zero, &log, 0, p["seq"].as_u64().unwrap(), &oracle);
        assert_eq!(image_difference(&oracle, "raw", mat["files"][0].as_str().unwrap(), "raw"), None, "{m}");
        let (code, _) = c.mt_api("DELETE", &format!("/materializations/{}", mat["id"].as_str().unwrap()), None);
        assert_eq!(code, 200);
    }

    // A slow member (its freeze outlasts the prepare timeout): no multi-machine point, and the
    // others' writes are not held beyond the timeout.
    std::fs::write(c.path().join("vm3-slow"), "").unwrap();
    let (code, r) = c.api("agent", "POST", "/group/point", Some(json!({ "app": true })));
    assert_eq!(code, 409, "{r}");
    assert_eq!(r["code"], 9012);
    let t = Instant::now();
    let out = std::process::Command::new("qemu-io")
        .args(["-f", "raw", &c.nbd_url("disk0"), "-c", "write -P 8 1M 1M", "-c", "flush"])
        .output()
        .unwrap();
    assert!(out.status.success());
    assert!(t.elapsed() < Duration::from_secs(4), "writes held too long: {:?}", t.elapsed());
    // vm3's late prepare is refused (the deadline passed) and what its freeze froze is thawed.
    wait_for_file_lines(&c.path().join("vm3-hooks.log"), "thaw", 1);
    for m in ["vm1", "vm2"] {
        let hooks = std::fs::read_to_string(c.path().join(format!("{m}-hooks.log"))).unwrap();
        assert_eq!(
            hooks.matches("freeze").count(),
            hooks.matches("thaw").count(),
            "{m}: every freeze is thawed: {hooks}"
        );
    }
    assert!(c.status("agent3")["write_hold"].is_null(), "no hold left behind on vm3");
    std::fs::remove_file(c.path().join("vm3-slow")).unwrap();

    // A killed member: no multi-machine point either.
    c.kill9("agent3");
    let (code, r) = c.api("agent", "POST", "/group/point", Some(json!({})));
    assert_eq!(code, 409, "{r}");
    assert!(c.status("agent")["events"].to_string().contains("group-tag-failed"));
    c.start("agent3");
    wait_all_caught_up(&c, &agents);
    std::thread::sleep(Duration::from_secs(6)); // vm3's late prepare expires
    wait_all_caught_up(&c, &agents);
    for m in ["vm1", "vm2", "vm3"] {
        assert_eq!(multi_points(&c, m).len(), 1, "{m}: only the first tag is a multi-machine point");
    }

    // Committed by two of three members only: not a point for anyone (no partial point).
    for a in agents {
        let (code, v) = c.api_signed(a, &key, "/group/prepare", member_request("manual-1", &[]));
        assert_eq!(code, 200, "{a}: {v}");
    }
    let members = ["vm1", "vm2", "vm3"];
    for a in ["agent", "agent2"] {
        let (code, v) = c.api_signed(a, &key, "/group/commit", member_request("manual-1", &members));
        assert_eq!(code, 200, "{a}: {v}");
    }
    let (code, v) = c.api_signed("agent3", &key, "/group/abort", member_request("manual-1", &members));
    assert_eq!(code, 200, "{v}");
    wait_all_caught_up(&c, &agents);
    let g = group(&c);
    assert_eq!(g["points"].as_array().unwrap().len(), 1, "{g:#}");
    assert!(g["incomplete_tags"].to_string().contains("manual-1"), "{g:#}");
    for m in members {
        assert_eq!(multi_points(&c, m).len(), 1, "{m}");
    }

    // A member replicated to another master target: no common point can exist (RG-2).
    for a in ["agent", "agent2"] {
        let (code, v) = c.api_signed(a, &key, "/group/prepare", member_request("rg2", &[]));
        assert_eq!(code, 200, "{v}");
        let (code, v) = c.api_signed(a, &key, "/group/commit", member_request("rg2", &["vm1", "vm2", "vm9"]));
        assert_eq!(code, 200, "{v}");
    }
    wait_all_caught_up(&c, &agents);
    let (_, v) = c.mt_api("GET", "/machines/vm1/points", None);
    let problems = v["problems"].to_string();
    assert!(problems.contains("vm9") && problems.contains("RG-2"), "{v:#}");
    let g = group(&c);
    assert!(g["problems"].to_string().contains("RG-2"), "{g:#}");
    // Not a member of this group: refused clearly.
    let (code, v) = c.api_signed("agent2", &key, "/group/prepare", json!({ "group": "other", "tag": "x" }));
    assert_eq!(code, 409, "{v}");
    assert!(v["message"].as_str().unwrap().contains("not a member"), "{v}");
    // Nobody without the coordinator's private key holds a member's writes: not without a
    // signature, not with the member's own control token (the local CLI's credential is not the
    // group's), not with the public key every member holds, not signed by another key, not with
    // a signature of another request replayed (what a member that saw one could try), not with
    // one two minutes old.
    let prepare = member_request("forged", &[]);
    let body = prepare.to_string();
    let token = c.control_token("agent2");
    let signer = ferry_status::control::GroupSigner::from_hex(&key).unwrap();
    let (other_key, _) = ferry_status::control::new_group_key_pair().unwrap();
    let other = ferry_status::control::GroupSigner::from_hex(&other_key).unwrap();
    let old = ferry_sys::time::now_ms() - 120_000;
    let seen = signer.bearer("/group/commit", body.as_bytes());
    let forgeries = [
        ("no signature", None),
        ("the member's control token", Some(token.clone())),
        ("the public key", Some(public.clone())),
        ("another key's signature", Some(other.bearer("/group/prepare", body.as_bytes()))),
        ("a commit's signature replayed on prepare", Some(seen)),
        ("a signature of two minutes ago", Some(signer.bearer_at("/group/prepare", body.as_bytes(), old))),
    ];
    for (who, bearer) in forgeries {
        let (code, v) = c.api_as("agent2", bearer.as_deref(), "POST", "/group/prepare", Some(prepare.clone()));
        assert!(code == 401 || code == 403, "{who}: {code} {v}");
        assert!(v["code"] == 9020 || v["code"] == 9021, "{who}: {v}");
    }
    assert!(c.status("agent2")["write_hold"].is_null(), "no write hold was taken: {}", c.status("agent2"));
    // A genuine signed prepare copied off the wire (plain HTTP on loopback) and sent again is
    // refused, and so is a fresh prepare of a tag this member already prepared: no second hold
    // or freeze from one coordinator request.
    let genuine = member_request("once", &[]);
    let body = genuine.to_string();
    let copied = signer.bearer("/group/prepare", body.as_bytes());
    let (code, v) = c.api_as("agent2", Some(&copied), "POST", "/group/prepare", Some(genuine.clone()));
    assert_eq!(code, 200, "{v}");
    let (code, v) = c.api_signed("agent2", &key, "/group/abort", genuine.clone());
    assert_eq!(code, 200, "{v}");
    let (code, v) = c.api_as("agent2", Some(&copied), "POST", "/group/prepare", Some(genuine.clone()));
    assert_eq!((code, v["code"].as_u64()), (403, Some(9021)), "{v}");
    assert!(v["message"].as_str().unwrap().contains("replay"), "{v}");
    let (code, v) = c.api_signed("agent2", &key, "/group/prepare", genuine);
    assert_eq!(code, 409, "{v}");
    assert!(v["message"].as_str().unwrap().contains("already prepared"), "{v}");
    assert!(c.status("agent2")["write_hold"].is_null(), "no write hold was taken: {}", c.status("agent2"));
}
