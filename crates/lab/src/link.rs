//! `ferry lab link`: a fault-injecting TCP proxy between two sites. Its control endpoint (plain
//! HTTP on loopback) cuts the link (open connections are dropped, new ones refused), restores it,
//! or slows it (added latency per chunk and a bandwidth limit).

use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::Arc;
use std::time::Duration;

use anyhow::{Context, Result};
use axum::extract::State;
use axum::routing::post;
use axum::{Json, Router};
use tokio::io::{AsyncReadExt, AsyncWriteExt};
use tokio::net::{TcpListener, TcpStream};
use tokio_util::sync::CancellationToken;

/// A link's state, as its control endpoint answers (`GET /status`, and every control call).
#[derive(Debug, Clone, Default, serde::Serialize, serde::Deserialize)]
pub struct LinkStatus {
    pub cut: bool,
    pub latency_ms: u64,
    pub bandwidth_bytes_per_sec: u64,
    pub bytes_forwarded: u64,
    pub connections: u64,
}

#[derive(Default)]
pub struct LinkState {
    cut: AtomicBool,
    latency_ms: AtomicU64,
    /// Bytes per second per direction and connection (0 = unlimited).
    bandwidth: AtomicU64,
    /// Cancelled when the link is cut: drops every open connection.
    generation: std::sync::Mutex<CancellationToken>,
    bytes: AtomicU64,
    connections: AtomicU64,
}

impl LinkState {
    fn token(&self) -> CancellationToken {
        self.generation.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }
    fn status(&self) -> LinkStatus {
        LinkStatus {
            cut: self.cut.load(Ordering::SeqCst),
            latency_ms: self.latency_ms.load(Ordering::SeqCst),
            bandwidth_bytes_per_sec: self.bandwidth.load(Ordering::SeqCst),
            bytes_forwarded: self.bytes.load(Ordering::SeqCst),
            connections: self.connections.load(Ordering::SeqCst),
        }
    }
}

async fn pump(
    mut from: tokio::net::tcp::OwnedReadHalf,
    mut to: tokio::net::tcp::OwnedWriteHalf,
    state: Arc<LinkState>,
) {
    let mut buf = vec![0u8; 64 << 10];
    loop {
        let n = match from.read(&mut buf).await {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        let latency = state.latency_ms.load(Ordering::SeqCst);
        if latency > 0 {
            tokio::time::sleep(Duration::from_millis(latency)).await;
        }
        let bw = state.bandwidth.load(Ordering::SeqCst);
        if bw > 0 {
            tokio::time::sleep(Duration::from_secs_f64(n as f64 / bw as f64)).await;
        }
        if to.write_all(&buf[..n]).await.is_err() {
            break;
        }
        state.bytes.fetch_add(n as u64, Ordering::Relaxed);
    }
    let _ = to.shutdown().await;
}

async fn handle(client: TcpStream, upstream: String, state: Arc<LinkState>) {
    let cut = state.token();
    // A cut between the accept and taking the token must still drop this connection.
    if state.cut.load(Ordering::SeqCst) {
        return;
    }
    let Ok(server) = TcpStream::connect(&upstream).await else { return };
    let _ = client.set_nodelay(true);
    let _ = server.set_nodelay(true);
    state.connections.fetch_add(1, Ordering::Relaxed);
    let (cr, cw) = client.into_split();
    let (sr, sw) = server.into_split();
    let a = tokio::spawn(pump(cr, sw, state.clone()));
    let b = tokio::spawn(pump(sr, cw, state.clone()));
    let (abort_a, abort_b) = (a.abort_handle(), b.abort_handle());
    tokio::select! {
        _ = cut.cancelled() => {
            // Dropping both halves closes the sockets: the peers see the network go away.
            abort_a.abort();
            abort_b.abort();
        }
        _ = async { let _ = a.await; let _ = b.await; } => {}
    }
    state.connections.fetch_sub(1, Ordering::Relaxed);
}

/// `POST /slow`: added latency per chunk and a bandwidth limit (0 = none).
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize, Default)]
#[serde(deny_unknown_fields)]
pub struct Slow {
    #[serde(default)]
    pub latency_ms: u64,
    #[serde(default)]
    pub bandwidth_bytes_per_sec: u64,
}

/// Run the link until `shutdown`.
pub async fn run(listen: &str, upstream: String, control: &str, shutdown: CancellationToken) -> Result<()> {
    let listener = ferry_sys::listen::listener("listen", listen)
        .and_then(TcpListener::from_std)
        .with_context(|| format!("cannot listen on {listen}"))?;
    let control_l = ferry_sys::listen::listener("control", control)
        .and_then(TcpListener::from_std)
        .with_context(|| format!("cannot listen on {control} for control"))?;
    ferry_sys::listen::publish(&[("listen", listener.local_addr()?), ("control", control_l.local_addr()?)])?;
    let state = Arc::new(LinkState::default());
    let routes = Router::new()
        .route("/status", axum::routing::get(|State(s): State<Arc<LinkState>>| async move { Json(s.status()) }))
        .route(
            "/cut",
            post(|State(s): State<Arc<LinkState>>| async move {
                s.cut.store(true, Ordering::SeqCst);
                let mut g = s.generation.lock().unwrap_or_else(|p| p.into_inner());
                g.cancel();
                *g = CancellationToken::new();
                drop(g);
                Json(s.status())
            }),
        )
        .route(
            "/restore",
            post(|State(s): State<Arc<LinkState>>| async move {
                s.cut.store(false, Ordering::SeqCst);
                s.latency_ms.store(0, Ordering::SeqCst);
                s.bandwidth.store(0, Ordering::SeqCst);
                Json(s.status())
            }),
        )
        .route(
            "/slow",
            post(|State(s): State<Arc<LinkState>>, body: Option<Json<Slow>>| async move {
                let slow = body.map(|b| b.0).unwrap_or_default();
                s.latency_ms.store(slow.latency_ms, Ordering::SeqCst);
                s.bandwidth.store(slow.bandwidth_bytes_per_sec, Ordering::SeqCst);
                Json(s.status())
            }),
        )
        .with_state(state.clone());
    ferry_status::spawn(Some(control_l), routes, shutdown.clone());
    loop {
        let (client, _) = tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    continue;
                }
            },
        };
        if state.cut.load(Ordering::SeqCst) {
            drop(client); // the sites are apart: the connection fails like a lost network
            continue;
        }
        tokio::spawn(handle(client, upstream.clone(), state.clone()));
    }
}
