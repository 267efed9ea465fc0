//! How a Ferry daemon is started: one function builds the command for the lab's daemons, its
//! guests' agents and the end-to-end test harness alike, so there is one way to start Ferry.
//! The daemon gets its listeners handed down (`FERRY_LISTEN_FDS`, bound by the starter and kept
//! across restarts) and says when it listens by writing its ready file (`FERRY_READY_FILE`).

use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

/// The command that runs `exe args` as a daemon: no stdin, the `listeners` (configuration key →
/// socket) handed down, and `ready` as the file it writes once it listens.
pub fn daemon_command(
    exe: &Path,
    args: &[String],
    listeners: &[(&str, &std::net::TcpListener)],
    ready: Option<&Path>,
) -> std::process::Command {
    let mut cmd = std::process::Command::new(exe);
    cmd.args(args).stdin(std::process::Stdio::null());
    if let Some(r) = ready {
        let _ = std::fs::remove_file(r);
        cmd.env("FERRY_READY_FILE", r);
    }
    ferry_sys::listen::pass(&mut cmd, listeners);
    cmd
}

/// Where a daemon logging to `log` publishes the addresses it listens on once they are bound.
pub fn ready_file(log: &Path) -> PathBuf {
    log.with_extension("ready")
}

/// Why a started daemon is not ready.
#[derive(Debug, thiserror::Error)]
pub enum NotReady {
    #[error("it exited at start ({0})")]
    Exited(String),
    #[error("it did not start listening within {0:?}")]
    Timeout(Duration),
}

/// Wait (blocking) until the daemon writes `ready`, while `alive()` says it runs. Not a
/// connection attempt: a port freed by a daemon that died at start may belong to another process.
pub fn wait_ready_blocking(
    ready: &Path,
    limit: Duration,
    mut exited: impl FnMut() -> Option<String>,
) -> Result<(), NotReady> {
    let deadline = Instant::now() + limit;
    loop {
        if ready.exists() {
            return Ok(());
        }
        if let Some(how) = exited() {
            return Err(NotReady::Exited(how));
        }
        if Instant::now() >= deadline {
            return Err(NotReady::Timeout(limit));
        }
        std::thread::sleep(Duration::from_millis(20));
    }
}
