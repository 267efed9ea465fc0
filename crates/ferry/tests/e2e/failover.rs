//! Failover of a machine: what must hold once its replica is fenced.

use std::process::Command;
use std::time::{Duration, Instant};

use crate::harness::*;
use serde_json::{json, Value};

fn wait_until(what: &str, mut done: impl FnMut() -> Option<Value>) -> Value {
    let deadline = Instant::now() + Duration::from_secs(60);
    loop {
        if let Some(v) = done() {
            return v;
        }
        assert!(Instant::now() < deadline, "{what}");
        std::thread::sleep(Duration::from_millis(100));
    }
}

/// Fencing: once a machine's replica is fenced (what a failover does first), no byte from the
/// old primary reaches its target disks — not from its agent writing on, not from the process
/// server's spool forwarded after a restart, not from the master target replaying its journal
/// after a restart. Every stream is refused with 9018; the journal stops at the fence's seq; the
/// target disks are byte-identical before and after, and no longer locked by the master target
/// (the failed-over machine's agent becomes their one writer).
#[test]
fn a_fenced_replica_takes_nothing_from_its_old_primary() {
    let mut c = Cluster::new(Opts::default());
    c.start_all();
    assert!(c.qemu_io("disk0", "write -P 1 0 4M\nflush\n").status.success());
    c.wait_caught_up(Duration::from_secs(30));
    // A reason is required and range-checked; an unknown machine is refused.
    let (code, v) = c.mt_api("POST", "/machines/vm1/fence", Some(json!({ "reason": "" })));
    assert_eq!(code, 400, "{v}");
    let (code, v) = c.mt_api("POST", "/machines/vm9/fence", Some(json!({ "reason": "drill" })));
    assert_eq!(code, 404, "{v}");
    let (code, fence) = c.mt_api("POST", "/machines/vm1/fence", Some(json!({ "reason": "failover drill" })));
    assert_eq!(code, 200, "{fence}");
    let at_seq = fence["at_seq"].as_u64().unwrap();
    let replica = |c: &Cluster| c.status("master-target")["machines"][0].clone();
    wait_until("the fenced replica is applied to its head and handed over", || {
        let r = replica(&c);
        (r["fence"]["handed_over"] == true).then_some(r)
    });
    let target = std::fs::read(c.target("disk0")).unwrap();
    let handed = Command::new("flock").args(["-n", "-x"]).arg(c.target("disk0")).arg("true").status().unwrap();
    assert!(handed.success(), "the master target let go of the target disk's one-writer lock");

    // The old primary writes on: its stream is refused, the spool holds the writes.
    assert!(c.qemu_io("disk0", "write -P 7 0 4M\nflush\n").status.success());
    let refused = |c: &Cluster| {
        let ps = c.status("process-server");
        let e = ps["machines"][0]["master_target_error"].as_str().unwrap_or_default().to_owned();
        (e.contains("9018")).then_some(ps)
    };
    wait_until("the process server is refused with 9018", || refused(&c));
    // Restarts of each old-primary component: the spool is forwarded again, the journal replayed.
    for who in ["process-server", "master-target", "agent"] {
        c.kill9(who);
        c.start(who);
        assert!(c.qemu_io("disk0", &format!("write -P {} 1M 1M\nflush\n", 8)).status.success());
        wait_until(&format!("after restarting the {who}, still refused with 9018"), || refused(&c));
        let r = replica(&c);
        assert_eq!(r["journaled_seq"].as_u64(), Some(at_seq), "nothing journaled past the fence: {r:#}");
        assert_eq!(r["fence"]["handed_over"], true, "{r:#}");
        assert!(std::fs::read(c.target("disk0")).unwrap() == target, "the fenced target disk changed ({who})");
    }
    // Fencing again keeps the first fence.
    let (code, again) = c.mt_api("POST", "/machines/vm1/fence", Some(json!({ "reason": "another" })));
    assert_eq!((code, again["at_seq"].as_u64(), again["reason"].as_str()), (200, Some(at_seq), Some("failover drill")));
}
