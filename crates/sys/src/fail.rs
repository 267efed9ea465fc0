//! Failpoints at durability boundaries, for fault tests that must stop a process *exactly* there
//! ("after the journal fsync, before the ack") rather than at a random instant.
//!
//! [`fail_point`] is a no-op unless the crate is built with the `testing` feature. With it, the
//! environment variable [`ENV`] (`name=action[,name=action…]`, read once) arms points by name in a
//! child process. Actions:
//! - `abort`: print `ferry failpoint NAME hit` to stderr, then `_exit(`[`EXIT_CODE`]`)` at once (no
//!   destructors, no buffered writes flushed: what a crash at that instant leaves);
//! - `abort@N`: the same at the N-th pass through that point (1-based);
//! - `off`: nothing;
//! - `fire` / `fire@N`: [`fires`] answers true at the first (N-th) pass, so the code at the point
//!   injects a fault there (e.g. corrupts a block) and goes on.
//!
//! A test asserts the exit code (and the marker line), so a misspelled or never-reached failpoint
//! fails the test instead of passing silently.

/// `name=action,…`: the armed failpoints of a `testing` build.
pub const ENV: &str = "FERRY_FAILPOINTS";
/// The exit status of a process stopped by a failpoint.
pub const EXIT_CODE: i32 = 86;

/// Every failpoint in Ferry, so tests and docs name only points that exist.
pub const ALL: &[&str] = &[
    "process-server.spool.fsync-before-ack",
    "master-target.journal.fsync-before-ack",
    "master-target.checkpoint.write",
    "master-target.base.advance",
    "agent.activity-log.slot-before-data",
    "master-target.failover.restoring",
    "master-target.failover.restored",
    "master-target.failover.cancel-recorded",
    "master-target.removal.marker-removed",
    "config-server.failover.step-running",
    "config-server.failover.step-done",
    "config-server.protect.step-running",
    "config-server.protect.step-done",
    "master-target.verify.corrupt-block",
];

/// Mark the failpoint `name`: in a `testing` build armed by [`ENV`], the process stops here.
#[inline]
pub fn fail_point(name: &'static str) {
    #[cfg(feature = "testing")]
    armed::hit(name);
    #[cfg(not(feature = "testing"))]
    let _ = name;
}

/// Whether the failpoint `name` armed with `fire[@N]` fires at this pass (never without the
/// `testing` feature).
#[inline]
pub fn fires(name: &'static str) -> bool {
    #[cfg(feature = "testing")]
    return armed::fires(name);
    #[cfg(not(feature = "testing"))]
    {
        let _ = name;
        false
    }
}

/// `FERRY_CLOCK_OFFSET_MS`: in a `testing` build, how far (ms, signed) this process's clock is
/// off — a fault for tests of what a skewed clock must not decide (0 otherwise).
pub fn clock_offset_ms() -> i64 {
    #[cfg(feature = "testing")]
    {
        static OFFSET: std::sync::OnceLock<i64> = std::sync::OnceLock::new();
        *OFFSET.get_or_init(|| {
            std::env::var("FERRY_CLOCK_OFFSET_MS").ok().and_then(|v| v.trim().parse().ok()).unwrap_or(0)
        })
    }
    #[cfg(not(feature = "testing"))]
    0
}

#[cfg(feature = "testing")]
mod armed {
    use std::collections::HashMap;
    use std::sync::atomic::{AtomicU64, Ordering};
    use std::sync::OnceLock;

    struct Point {
        at: u64,
        passes: AtomicU64,
        /// `fire`: [`fires`] reports the pass instead of the process stopping.
        fire: bool,
    }

    fn table() -> &'static HashMap<String, Point> {
        static T: OnceLock<HashMap<String, Point>> = OnceLock::new();
        T.get_or_init(|| {
            let mut m = HashMap::new();
            for part in std::env::var(super::ENV).unwrap_or_default().split(',').filter(|p| !p.is_empty()) {
                let Some((name, action)) = part.split_once('=') else { continue };
                let fire = action.starts_with("fire");
                let at = match action {
                    "abort" | "fire" => 1,
                    "off" => continue,
                    a => match a
                        .strip_prefix("abort@")
                        .or_else(|| a.strip_prefix("fire@"))
                        .and_then(|n| n.parse::<u64>().ok())
                    {
                        Some(n) if n >= 1 => n,
                        _ => {
                            eprintln!(
                                "ferry failpoint {name}: unknown action {action:?} (abort, abort@N, fire, fire@N, off)"
                            );
                            continue;
                        }
                    },
                };
                m.insert(name.to_owned(), Point { at, passes: AtomicU64::new(0), fire });
            }
            m
        })
    }

    pub fn fires(name: &'static str) -> bool {
        let Some(p) = table().get(name).filter(|p| p.fire) else { return false };
        let fired = p.passes.fetch_add(1, Ordering::SeqCst) + 1 == p.at;
        if fired {
            eprintln!("ferry failpoint {name} fired");
        }
        fired
    }

    pub fn hit(name: &'static str) {
        let Some(p) = table().get(name).filter(|p| !p.fire) else { return };
        if p.passes.fetch_add(1, Ordering::SeqCst) + 1 == p.at {
            // Straight to the kernel: no unwinding, no flushing, as a crash would be.
            let msg = format!("ferry failpoint {name} hit\n");
            // SAFETY: write(2) of a buffer we own to stderr, then _exit(2).
            unsafe {
                libc::write(2, msg.as_ptr() as *const libc::c_void, msg.len());
                libc::_exit(super::EXIT_CODE);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    #[test]
    fn failpoint_names_are_unique() {
        let mut names = super::ALL.to_vec();
        names.sort();
        names.dedup();
        assert_eq!(names.len(), super::ALL.len());
    }

    #[test]
    fn an_unarmed_failpoint_does_nothing() {
        super::fail_point("master-target.checkpoint.write");
    }
}
