//! How a Ferry daemon is started: [`spawn`] (and [`daemon_command`] under it) starts the lab's
//! daemons, its guests' agents and the end-to-end test harness's components alike, so there is
//! one way to start Ferry; [`crate::component`] writes their configuration files.
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

/// Where a started daemon's standard output goes (its standard error always goes to its log).
pub enum Stdout<'a> {
    /// Into the log too.
    Log,
    /// Nowhere.
    Null,
    /// A file only its owner may read (it holds secrets: the configuration server's first
    /// admin token and registration passphrase).
    Private(&'a Path),
}

/// What to start: `exe args`, logging to `log` (appended), with `listeners` handed down.
pub struct Spawn<'a> {
    pub exe: &'a Path,
    pub args: &'a [String],
    pub log: &'a Path,
    pub stdout: Stdout<'a>,
    pub listeners: &'a [(&'a str, &'a std::net::TcpListener)],
    pub env: &'a [(&'a str, &'a str)],
    /// In a process group of its own: it outlives the starter and a terminal's ^C (the lab's
    /// daemons); otherwise it stays in the starter's group (a test's children).
    pub own_group: bool,
}

/// Why a daemon could not be started.
#[derive(Debug, thiserror::Error)]
pub enum SpawnError {
    #[error("cannot open {path}: {source}")]
    Open { path: PathBuf, source: std::io::Error },
    #[error("cannot start {command}: {source}")]
    Start { command: String, source: std::io::Error },
}

/// Start a daemon as [`Spawn`] says; it writes [`ready_file`]`(log)` once it listens.
pub fn spawn(s: &Spawn<'_>) -> Result<std::process::Child, SpawnError> {
    use std::os::unix::fs::OpenOptionsExt;
    use std::os::unix::process::CommandExt;
    let open = |p: &Path, append: bool| {
        let mut o = std::fs::OpenOptions::new();
        if append {
            o.create(true).append(true);
        } else {
            o.write(true).create(true).truncate(true).mode(0o600);
        }
        o.open(p).map_err(|source| SpawnError::Open { path: p.to_owned(), source })
    };
    let log = open(s.log, true)?;
    let out: std::process::Stdio = match s.stdout {
        Stdout::Log => log.try_clone().map_err(|source| SpawnError::Open { path: s.log.to_owned(), source })?.into(),
        Stdout::Null => std::process::Stdio::null(),
        Stdout::Private(p) => open(p, false)?.into(),
    };
    let mut cmd = daemon_command(s.exe, s.args, s.listeners, Some(&ready_file(s.log)));
    cmd.stdout(out).stderr(log);
    for (k, v) in s.env {
        cmd.env(k, v);
    }
    if s.own_group {
        cmd.process_group(0);
    }
    cmd.spawn()
        .map_err(|source| SpawnError::Start { command: format!("{} {}", s.exe.display(), s.args.join(" ")), source })
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
