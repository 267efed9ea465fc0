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
