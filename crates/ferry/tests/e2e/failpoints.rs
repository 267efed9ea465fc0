//! A process stopped *exactly* at a durability boundary (a failpoint, `testing` builds only): the
//! child must die at that failpoint (exit code and marker line, so a misspelled or unreached
//! failpoint fails the test), and after a restart every write the agent acknowledged is on the
//! replica.

use std::time::{Duration, Instant};

use crate::harness::*;

/// Writes 1 MiB blocks at offsets `base` .. `base` + 30 MiB through the agent until `stop` says
/// so; returns the (offset, pattern) of each write qemu-io completed (acknowledged by the agent).
fn write_until(c: &mut Cluster, base: u64, mut stop: impl FnMut(&mut Cluster) -> bool) -> Vec<(u64, u8)> {
    let mut acked = Vec::new();
    let deadline = Instant::now() + Duration::from_secs(60);
    for i in 0..90u64 {
        if stop(c) || Instant::now() > deadline {
            break;
        }
        let (offset, pattern) = (base + ((i % 30) << 20), (i % 250) as u8 + 1);
        let out = c.qemu_io("disk0", &format!("write -P {pattern} {offset} 1M\nflush\n"));
        if out.status.success() && !String::from_utf8_lossy(&out.stdout).contains("error") {
            acked.retain(|(o, _)| *o != offset);
            acked.push((offset, pattern));
        }
        std::thread::sleep(Duration::from_millis(100));
    }
    acked
}

fn stop_at(component: &'static str, failpoint: &str, at: u32, opts: Opts) {
    assert!(ferry_sys::fail::ALL.contains(&failpoint), "{failpoint} is not a failpoint of Ferry");
    let mut c = Cluster::new(opts);
    for comp in COMPONENTS {
        if comp == component {
            c.start_env(comp, &[("FERRY_FAILPOINTS", &format!("{failpoint}=abort@{at}"))]);
            if component != "agent" {
                std::thread::sleep(Duration::from_millis(300));
            }
        } else {
            c.start(comp);
        }
    }
    let mut exited = None;
    let acked = write_until(&mut c, 0, |c| {
        if exited.is_none() {
            exited = c.wait_exit(component, Duration::from_millis(1));
        }
        exited.is_some()
    });
    if exited.is_none() {
        exited = c.wait_exit(component, Duration::from_secs(60));
    }
    let st =
        exited.unwrap_or_else(|| panic!("{component} never reached {failpoint}; log:\n{}", tail(&c.log(component))));
    assert_eq!(st.code(), Some(ferry_sys::fail::EXIT_CODE), "{component} died otherwise: {st}");
    assert!(c.log(component).contains(&format!("ferry failpoint {failpoint} hit")), "{}", tail(&c.log(component)));
    // Restarted without the failpoint: the chain converges and nothing acknowledged is lost.
    c.start(component);
    let more = write_until(&mut c, 32 << 20, |_| false).len();
    assert!(more > 0, "writes after the restart");
    c.wait_caught_up(Duration::from_secs(120));
    c.assert_identical();
    for (offset, pattern) in &acked {
        let out = std::process::Command::new("qemu-io")
            .args(["-f", "raw", "-c", &format!("read -P {pattern} {offset} 1M")])
            .arg(c.target("disk0"))
            .output()
            .unwrap();
        assert!(out.status.success(), "qemu-io could not read the replica: {}", String::from_utf8_lossy(&out.stderr));
        assert!(!String::from_utf8_lossy(&out.stdout).contains("Pattern verification failed"), "{offset}");
    }
}

fn opts() -> Opts {
    Opts { disks: vec![("disk0", 64 << 20)], ..Default::default() }
}

#[test]
fn process_server_stopped_after_the_spool_fsync_before_the_ack_loses_nothing() {
    stop_at("process-server", "process-server.spool.fsync-before-ack", 3, opts());
}

#[test]
fn master_target_stopped_after_the_journal_fsync_before_the_ack_loses_nothing() {
    stop_at("master-target", "master-target.journal.fsync-before-ack", 3, opts());
}

#[test]
fn master_target_stopped_right_after_a_checkpoint_write_loses_nothing() {
    stop_at("master-target", "master-target.checkpoint.write", 3, opts());
}

#[test]
fn master_target_stopped_as_the_base_starts_to_advance_loses_nothing() {
    let mut o = opts();
    o.agent_extra = "crash_point_interval_secs = 0.2\n".into();
    o.mt_extra = "retention_window_secs = 1\nsegment_bytes = 1048576\n".into();
    stop_at("master-target", "master-target.base.advance", 1, o);
}

#[test]
fn agent_stopped_after_the_activity_log_slot_before_the_data_write_loses_nothing() {
    stop_at("agent", "agent.activity-log.slot-before-data", 3, opts());
}
