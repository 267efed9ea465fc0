//! Process identity. A pid alone names a process only until it exits and the number is reused;
//! a pid with its start time (clock ticks since boot, `/proc/PID/stat` field 22) names exactly one
//! process. Nothing in Ferry signals a pid without checking its start time first.

/// Whether `pid` is a live (not zombie) process.
pub fn alive(pid: i32) -> bool {
    match std::fs::read_to_string(format!("/proc/{pid}/stat")) {
        Ok(s) => !s.rsplit(')').next().is_some_and(|r| r.trim_start().starts_with('Z')),
        Err(_) => false,
    }
}

/// A process's start time in clock ticks since boot (`/proc/PID/stat` field 22).
pub fn start_ticks(pid: i32) -> Option<u64> {
    let s = std::fs::read_to_string(format!("/proc/{pid}/stat")).ok()?;
    // The command name (field 2) may hold spaces and parentheses: fields after it follow the last ')'.
    s.rsplit(')').next()?.split_whitespace().nth(19)?.parse().ok()
}

/// Whether `pid` still is the process started at `ticks`. An unknown start time (0) or pid 0/1
/// never matches: nothing is signalled on a guess.
pub fn same_process(pid: i32, ticks: u64) -> bool {
    pid > 1 && ticks != 0 && alive(pid) && start_ticks(pid) == Some(ticks)
}

/// The process's command line, NUL-separated arguments joined by spaces ("" if unreadable).
pub fn cmdline(pid: i32) -> String {
    std::fs::read(format!("/proc/{pid}/cmdline"))
        .map(|b| b.split(|c| *c == 0).map(|a| String::from_utf8_lossy(a).into_owned()).collect::<Vec<_>>().join(" "))
        .unwrap_or_default()
}

/// Send `signal` to the process group `pgid`, only if its leader is still the process that
/// started at `ticks`. Returns whether a signal was sent.
pub fn signal_group(pgid: i32, ticks: u64, signal: i32) -> bool {
    if !same_process(pgid, ticks) {
        return false;
    }
    // SAFETY: kill with a negative pid signals a group; pgid > 1 was checked by same_process.
    unsafe { libc::kill(-pgid, signal) == 0 }
}

/// Send `signal` to `pid`, only if it is still the process that started at `ticks`.
pub fn signal(pid: i32, ticks: u64, signal: i32) -> bool {
    if !same_process(pid, ticks) {
        return false;
    }
    // SAFETY: plain kill(2) of a checked pid > 1.
    unsafe { libc::kill(pid, signal) == 0 }
}

/// Ask the kernel to send `signal` to this process when its parent exits (`PR_SET_PDEATHSIG`).
/// Meant for `pre_exec` in a child: async-signal-safe.
pub fn set_parent_death_signal(signal: i32) -> std::io::Result<()> {
    // SAFETY: prctl with PR_SET_PDEATHSIG takes a signal number; no memory is passed.
    if unsafe { libc::prctl(libc::PR_SET_PDEATHSIG, signal as libc::c_ulong, 0, 0, 0) } != 0 {
        return Err(std::io::Error::last_os_error());
    }
    Ok(())
}

/// Make every file and folder this process (and its children, e.g. `qemu-img`) creates private
/// to its user: mode 0600 files, 0700 folders. Ferry's files hold replicated disk data, recovery
/// points, keys and the configuration database; no other local user may read them.
pub fn private_umask() {
    // SAFETY: umask only sets the process's file-creation mask; it cannot fail.
    unsafe {
        libc::umask(0o077);
    }
}

/// The effective user ID of this process.
pub fn effective_uid() -> u32 {
    // SAFETY: geteuid has no preconditions and cannot fail.
    unsafe { libc::geteuid() }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn start_ticks_identify_a_process() {
        let me = std::process::id() as i32;
        let t = start_ticks(me).unwrap();
        assert!(same_process(me, t));
        assert!(!same_process(me, t + 1), "another start time is another process");
        assert!(!same_process(me, 0), "an unknown start time never matches");
        assert!(!same_process(1, start_ticks(1).unwrap_or(1)), "pid 1 is never ours to signal");
        assert!(cmdline(me).contains("ferry_sys"), "{}", cmdline(me));
    }

    #[test]
    fn a_reaped_child_is_not_alive_and_is_never_signalled() {
        let mut c = std::process::Command::new("true").spawn().unwrap();
        let pid = c.id() as i32;
        let ticks = start_ticks(pid).unwrap_or(1);
        c.wait().unwrap();
        assert!(!alive(pid));
        assert!(!signal(pid, ticks, libc::SIGTERM));
    }
}
