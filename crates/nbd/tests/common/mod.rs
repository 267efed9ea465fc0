//! Shared helpers: an in-process server on its own runtime thread and a tiny
//! raw NBD client for protocol-level checks.
#![allow(dead_code, clippy::unwrap_used, clippy::expect_used)]

use std::io::{Read, Write};
use std::net::TcpStream;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::Arc;
use std::time::Duration;

use ferry_nbd::proto::*;
use ferry_nbd::{Backend, Export, Exports, ServerConfig};
use tokio_util::sync::CancellationToken;

pub struct TestServer {
    pub port: u16,
    pub socket: Option<PathBuf>,
    pub exports: Exports,
    shutdown: CancellationToken,
    thread: Option<std::thread::JoinHandle<()>>,
}

impl TestServer {
    pub fn url(&self, export: &str) -> String {
        format!("nbd://127.0.0.1:{}/{}", self.port, export)
    }
}

impl Drop for TestServer {
    fn drop(&mut self) {
        self.shutdown.cancel();
        if let Some(t) = self.thread.take() {
            let _ = t.join();
        }
    }
}

pub fn export(name: &str, backend: Arc<dyn Backend>) -> Export {
    Export { name: name.into(), description: format!("test export {name}"), backend }
}

pub fn start_tcp(exports: Exports) -> TestServer {
    start_tcp_with(ServerConfig::new(exports, None, false))
}

pub fn start_tcp_with(config: ServerConfig) -> TestServer {
    let _ = tracing_init();
    let std_listener = std::net::TcpListener::bind("127.0.0.1:0").unwrap();
    std_listener.set_nonblocking(true).unwrap();
    let port = std_listener.local_addr().unwrap().port();
    let exports = config.exports.clone();
    let shutdown = CancellationToken::new();
    let token = shutdown.clone();
    let config = Arc::new(config);
    let thread = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        rt.block_on(async move {
            let l = tokio::net::TcpListener::from_std(std_listener).unwrap();
            ferry_nbd::serve_tcp(l, config, token).await.unwrap();
        });
    });
    TestServer { port, socket: None, exports, shutdown, thread: Some(thread) }
}

pub fn start_unix(exports: Exports, path: &Path) -> TestServer {
    let std_listener = std::os::unix::net::UnixListener::bind(path).unwrap();
    std_listener.set_nonblocking(true).unwrap();
    let shutdown = CancellationToken::new();
    let token = shutdown.clone();
    let config = Arc::new(ServerConfig::new(exports.clone(), None, false));
    let thread = std::thread::spawn(move || {
        let rt = tokio::runtime::Builder::new_multi_thread().worker_threads(2).enable_all().build().unwrap();
        rt.block_on(async move {
            let l = tokio::net::UnixListener::from_std(std_listener).unwrap();
            ferry_nbd::serve_unix(l, config, token).await.unwrap();
        });
    });
    TestServer { port: 0, socket: Some(path.to_path_buf()), exports, shutdown, thread: Some(thread) }
}

fn tracing_init() -> Option<()> {
    None
}

/// Run a command, returning its output (panics if it can't be spawned).
pub fn run(cmd: &str, args: &[&str]) -> Output {
    let out = Command::new(cmd).args(args).output().unwrap_or_else(|e| panic!("cannot run {cmd}: {e}"));
    out
}

pub fn stdout_of(out: &Output) -> String {
    format!("{}{}", String::from_utf8_lossy(&out.stdout), String::from_utf8_lossy(&out.stderr))
}

pub fn have(cmd: &str) -> bool {
    Command::new("sh").args(["-c", &format!("command -v {cmd}")]).output().map(|o| o.status.success()).unwrap_or(false)
}

/// Create a file of `size` bytes filled with `byte`.
pub fn filled_file(dir: &Path, name: &str, size: usize, byte: u8) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, vec![byte; size]).unwrap();
    p
}

/// Minimal blocking NBD client over TCP for protocol tests.
pub struct RawClient {
    pub s: TcpStream,
}

impl RawClient {
    /// Connect and complete the greeting (sends client flags FIXED|NO_ZEROES).
    pub fn connect(port: u16) -> RawClient {
        let mut s = TcpStream::connect(("127.0.0.1", port)).unwrap();
        s.set_read_timeout(Some(Duration::from_secs(10))).unwrap();
        let mut g = [0u8; 18];
        s.read_exact(&mut g).unwrap();
        assert_eq!(&g[0..8], &NBD_MAGIC.to_be_bytes());
        assert_eq!(&g[8..16], &IHAVEOPT.to_be_bytes());
        s.write_all(&3u32.to_be_bytes()).unwrap();
        RawClient { s }
    }

    pub fn send_option(&mut self, opt: u32, data: &[u8]) {
        let mut b = Vec::new();
        b.extend_from_slice(&IHAVEOPT.to_be_bytes());
        b.extend_from_slice(&opt.to_be_bytes());
        b.extend_from_slice(&(data.len() as u32).to_be_bytes());
        b.extend_from_slice(data);
        self.s.write_all(&b).unwrap();
    }

    /// Read one option reply: (option, type, payload).
    pub fn read_option_reply(&mut self) -> (u32, u32, Vec<u8>) {
        let mut h = [0u8; 20];
        self.s.read_exact(&mut h).unwrap();
        assert_eq!(&h[0..8], &OPT_REPLY_MAGIC.to_be_bytes());
        let opt = u32::from_be_bytes(h[8..12].try_into().unwrap());
        let typ = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
        let mut p = vec![0u8; len as usize];
        self.s.read_exact(&mut p).unwrap();
        (opt, typ, p)
    }

    /// Read replies until ACK or an error; returns all replies.
    pub fn read_until_final(&mut self) -> Vec<(u32, u32, Vec<u8>)> {
        let mut v = Vec::new();
        loop {
            let r = self.read_option_reply();
            let t = r.1;
            v.push(r);
            if t == REP_ACK || t & (1 << 31) != 0 {
                return v;
            }
        }
    }

    pub fn go(&mut self, name: &str) -> Vec<(u32, u32, Vec<u8>)> {
        let mut d = Vec::new();
        d.extend_from_slice(&(name.len() as u32).to_be_bytes());
        d.extend_from_slice(name.as_bytes());
        d.extend_from_slice(&0u16.to_be_bytes());
        self.send_option(OPT_GO, &d);
        self.read_until_final()
    }

    pub fn request(&mut self, flags: u16, cmd: u16, cookie: u64, offset: u64, len: u32, payload: &[u8]) {
        let mut b = encode_request(flags, cmd, cookie, offset, len).to_vec();
        b.extend_from_slice(payload);
        self.s.write_all(&b).unwrap();
    }

    /// Read a simple reply header: (error, cookie).
    pub fn simple_reply(&mut self) -> (u32, u64) {
        let mut h = [0u8; 16];
        self.s.read_exact(&mut h).unwrap();
        assert_eq!(&h[0..4], &SIMPLE_REPLY_MAGIC.to_be_bytes());
        (u32::from_be_bytes(h[4..8].try_into().unwrap()), u64::from_be_bytes(h[8..16].try_into().unwrap()))
    }

    /// True once the server has closed the connection (EOF or reset).
    pub fn is_closed(&mut self) -> bool {
        let mut b = [0u8; 64];
        loop {
            match self.s.read(&mut b) {
                Ok(0) => return true,
                Ok(_) => continue,
                Err(e) if e.kind() == std::io::ErrorKind::WouldBlock || e.kind() == std::io::ErrorKind::TimedOut => {
                    return false
                }
                Err(_) => return true,
            }
        }
    }
}

/// Compare two buffers, reporting the first differing offset (no huge dumps).
pub fn assert_same(actual: &[u8], expected: &[u8], what: &str) {
    assert_eq!(actual.len(), expected.len(), "{what}: length differs");
    if let Some(i) = actual.iter().zip(expected).position(|(a, b)| a != b) {
        panic!("{what}: first difference at offset {i}: got {:#x}, expected {:#x}", actual[i], expected[i]);
    }
}
