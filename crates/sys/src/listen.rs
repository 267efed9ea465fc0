//! Listening sockets handed from a parent to a child, in the style of systemd's `LISTEN_FDS`.
//!
//! Whoever starts a component (the lab, the test harness) binds each of its listeners itself and
//! passes them to the child as inherited file descriptors named after the configuration key they
//! stand for (`listen`, `status_listen`, `nbd_listen`, …). The child never binds an address it was
//! handed a socket for, so no other process can take the port between "chosen" and "bound", and a
//! restarted child gets the very same socket again: routes, links and peers that name its address
//! stay valid.
//!
//! Protocol: the environment variable [`ENV`] holds `name=fd[,name=fd…]`. The child calls [`adopt`]
//! once, first thing in `main` while it is single-threaded: it removes the variable (so its own
//! children never see descriptors that are not theirs), checks each descriptor is a listening TCP
//! socket and marks it close-on-exec.

use std::collections::HashMap;
use std::io;
use std::net::TcpListener;
use std::os::fd::{AsRawFd, FromRawFd, RawFd};
use std::os::unix::process::CommandExt;
use std::sync::Mutex;

/// `name=fd,…`: the inherited listeners.
pub const ENV: &str = "FERRY_LISTEN_FDS";
/// Where this daemon publishes what it listens on ([`publish`]).
pub const READY_ENV: &str = "FERRY_READY_FILE";

static READY_FILE: Mutex<Option<std::path::PathBuf>> = Mutex::new(None);

static ADOPTED: Mutex<Option<HashMap<String, TcpListener>>> = Mutex::new(None);

fn is_listening_tcp(fd: RawFd) -> bool {
    let mut val: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: getsockopt writes an int into our buffer; an fd that is not a socket fails cleanly.
    let ok = unsafe {
        libc::getsockopt(fd, libc::SOL_SOCKET, libc::SO_ACCEPTCONN, &mut val as *mut _ as *mut libc::c_void, &mut len)
    } == 0;
    if !ok || val == 0 {
        return false;
    }
    let mut ty: libc::c_int = 0;
    let mut len = std::mem::size_of::<libc::c_int>() as libc::socklen_t;
    // SAFETY: as above.
    let ok = unsafe {
        libc::getsockopt(fd, libc::SOL_SOCKET, libc::SO_TYPE, &mut ty as *mut _ as *mut libc::c_void, &mut len)
    } == 0;
    ok && ty == libc::SOCK_STREAM
}

/// Parse `name=fd,…`.
pub fn parse(spec: &str) -> Result<Vec<(String, RawFd)>, String> {
    let mut out = Vec::new();
    for part in spec.split(',').filter(|p| !p.is_empty()) {
        let Some((name, fd)) = part.split_once('=') else {
            return Err(format!("{ENV}: {part:?} is not NAME=FD"));
        };
        let fd: RawFd = fd.parse().map_err(|_| format!("{ENV}: {fd:?} is not a file descriptor number"))?;
        if fd < 3 || name.is_empty() {
            return Err(format!("{ENV}: {part:?} names no usable descriptor (3 or above)"));
        }
        if out.iter().any(|(n, f)| n == name || *f == fd) {
            // Two owners of one descriptor would close it twice.
            return Err(format!("{ENV}: {part:?} repeats a name or a descriptor"));
        }
        out.push((name.to_owned(), fd));
    }
    Ok(out)
}

/// Take the listeners this process inherited. Call once at the start of `main`, before any
/// thread is started (it edits the environment). A descriptor that is not a listening TCP socket
/// is an error naming it.
pub fn adopt() -> Result<(), String> {
    // Ours alone: a daemon's children (guests, agents, qemu tools) must not publish for it.
    if let Some(p) = std::env::var_os(READY_ENV) {
        *READY_FILE.lock().unwrap_or_else(|p| p.into_inner()) = Some(p.into());
        std::env::remove_var(READY_ENV);
    }
    let Ok(spec) = std::env::var(ENV) else { return Ok(()) };
    // Edition 2021's safe API; sound here because the process is still single-threaded.
    std::env::remove_var(ENV);
    let mut map = HashMap::new();
    for (name, fd) in parse(&spec)? {
        if !is_listening_tcp(fd) {
            return Err(format!("{ENV}: descriptor {fd} for {name} is not a listening TCP socket"));
        }
        // SAFETY: the parent handed this descriptor to us alone; it is a listening socket (checked).
        let l = unsafe { TcpListener::from_raw_fd(fd) };
        // SAFETY: fcntl on an fd we own.
        unsafe { libc::fcntl(fd, libc::F_SETFD, libc::FD_CLOEXEC) };
        map.insert(name, l);
    }
    *ADOPTED.lock().unwrap_or_else(|p| p.into_inner()) = Some(map);
    Ok(())
}

/// Publish the addresses this daemon listens on, once every listener is bound: the file named by
/// [`READY_ENV`] at start (if any) is written atomically as JSON
/// `{"pid": N, "listeners": {"key": "address"}}`. Whoever started the daemon waits for the file
/// instead of probing a port (which, after a daemon died at start, may be another process's).
pub fn publish(listeners: &[(&str, std::net::SocketAddr)]) -> io::Result<()> {
    let Some(path) = READY_FILE.lock().unwrap_or_else(|p| p.into_inner()).clone() else { return Ok(()) };
    let quote = |s: &str| s.replace('\\', "\\\\").replace('"', "\\\"");
    let body =
        listeners.iter().map(|(k, a)| format!("\"{}\":\"{}\"", quote(k), quote(&a.to_string()))).collect::<Vec<_>>();
    let json = format!("{{\"pid\":{},\"listeners\":{{{}}}}}", std::process::id(), body.join(","));
    crate::fs::write_atomic(&path, json.as_bytes())
}

/// The inherited listener for `name`, if the parent handed one (each is taken once).
pub fn take(name: &str) -> Option<TcpListener> {
    ADOPTED.lock().unwrap_or_else(|p| p.into_inner()).as_mut().and_then(|m| m.remove(name))
}

/// The inherited listener for `name`, or a new one bound to `addr`. Non-blocking, ready for tokio.
pub fn listener(name: &str, addr: &str) -> io::Result<TcpListener> {
    let l = match take(name) {
        Some(l) => l,
        None => TcpListener::bind(addr)?,
    };
    l.set_nonblocking(true)?;
    Ok(l)
}

/// Hand `listeners` to the child that `cmd` will start: their descriptors stay open across exec
/// (in the child only: the parent's stay close-on-exec, so children started concurrently by other
/// threads never get them) and the environment names them. The caller keeps its own copies, to
/// hand the same sockets to a later restart.
pub fn pass(cmd: &mut std::process::Command, listeners: &[(&str, &TcpListener)]) {
    if listeners.is_empty() {
        return;
    }
    let fds: Vec<RawFd> = listeners.iter().map(|(_, l)| l.as_raw_fd()).collect();
    let spec = listeners.iter().map(|(n, l)| format!("{n}={}", l.as_raw_fd())).collect::<Vec<_>>().join(",");
    cmd.env(ENV, spec);
    // SAFETY: the closure only calls fcntl (async-signal-safe) on descriptors the parent owns.
    unsafe {
        cmd.pre_exec(move || {
            for fd in &fds {
                if libc::fcntl(*fd, libc::F_SETFD, 0) != 0 {
                    return Err(io::Error::last_os_error());
                }
            }
            Ok(())
        });
    }
}

/// Duplicate descriptor `fd` of the live process `pid` (started at `ticks`) into this process
/// (`pidfd_getfd`), e.g. to take a listener back from a child before restarting it. The pidfd is
/// opened first and the start time checked after, so a reused pid never hands over another
/// process's socket. Needs ptrace rights over `pid`.
pub fn take_from_process(pid: i32, ticks: u64, fd: RawFd) -> io::Result<TcpListener> {
    // SAFETY: raw syscalls with integer arguments; the returned descriptors are owned here.
    unsafe {
        let pidfd = libc::syscall(libc::SYS_pidfd_open, pid, 0) as i32;
        if pidfd < 0 {
            return Err(io::Error::last_os_error());
        }
        if !crate::proc::same_process(pid, ticks) {
            libc::close(pidfd);
            return Err(io::Error::other(format!("process {pid} is not the one started at {ticks}")));
        }
        let got = libc::syscall(libc::SYS_pidfd_getfd, pidfd, fd, 0) as i32;
        let err = io::Error::last_os_error();
        libc::close(pidfd);
        if got < 0 {
            return Err(err);
        }
        if !is_listening_tcp(got) {
            libc::close(got);
            return Err(io::Error::other(format!("descriptor {fd} of process {pid} is not a listening TCP socket")));
        }
        Ok(TcpListener::from_raw_fd(got))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parse_accepts_names_and_refuses_garbage() {
        assert_eq!(parse("listen=3,status_listen=7").unwrap(), vec![("listen".into(), 3), ("status_listen".into(), 7)]);
        assert!(parse("listen").is_err());
        assert!(parse("listen=x").is_err());
        assert!(parse("listen=1").is_err(), "stdio is never a listener");
        assert!(parse("listen=3,status_listen=3").is_err(), "one descriptor, one owner");
        assert!(parse("listen=3,listen=4").is_err());
    }

    #[test]
    fn a_child_receives_the_listener_and_the_parent_keeps_its_port() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let fd = l.as_raw_fd();
        let mut cmd = std::process::Command::new("sh");
        // The child proves the descriptor is open in it and named in its environment.
        cmd.args(["-c", &format!("[ -e /proc/self/fd/{fd} ] && echo \"$FERRY_LISTEN_FDS\"")]);
        pass(&mut cmd, &[("listen", &l)]);
        let out = cmd.output().unwrap();
        assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
        assert_eq!(String::from_utf8_lossy(&out.stdout).trim(), format!("listen={fd}"));
        // Still close-on-exec in the parent: a child started without `pass` does not get it.
        let out = std::process::Command::new("sh").args(["-c", &format!("[ ! -e /proc/self/fd/{fd} ]")]).status();
        assert!(out.unwrap().success());
    }

    #[test]
    fn a_listener_is_taken_back_from_a_live_process() {
        let l = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = l.local_addr().unwrap();
        let mut cmd = std::process::Command::new("sleep");
        cmd.arg("30");
        pass(&mut cmd, &[("listen", &l)]);
        let mut child = cmd.spawn().unwrap();
        let fd = l.as_raw_fd();
        drop(l);
        let ticks = crate::proc::start_ticks(child.id() as i32).unwrap_or(0);
        assert!(take_from_process(child.id() as i32, ticks + 1, fd).is_err(), "another start time, another process");
        match take_from_process(child.id() as i32, ticks, fd) {
            Ok(back) => assert_eq!(back.local_addr().unwrap(), addr),
            // Without ptrace rights (an unprivileged run under Yama) the caller rebinds instead.
            Err(e) => assert!(e.raw_os_error() == Some(libc::EPERM) || e.raw_os_error() == Some(libc::ENOSYS), "{e}"),
        }
        let _ = child.kill();
        let _ = child.wait();
    }
}
