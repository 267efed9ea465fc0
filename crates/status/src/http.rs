//! Bounded HTTP serving for every Ferry HTTP listener (status listeners, the configuration
//! server's API).
//!
//! `axum::serve` keeps every accepted connection for as long as the client likes: 20 000
//! connections that send half a header (or nothing) exhausted a server's file descriptors and
//! kept its memory after they closed. Here every connection is admitted by a [`Gate`] (a cap in
//! total and per source address: a flood from one address cannot take the slots others need;
//! over the cap a connection is closed at once), must send each request's header within
//! [`HttpLimits::header_read_timeout`] (hyper's timer also runs while a kept-alive connection
//! waits for its next request, so idle connections are closed too), and is shut down
//! gracefully with the server.

use std::collections::HashMap;
use std::net::{IpAddr, SocketAddr};
use std::sync::{Arc, Mutex};
use std::time::Duration;

use axum::extract::ConnectInfo;
use axum::Router;
use hyper_util::rt::{TokioIo, TokioTimer};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio_util::sync::CancellationToken;

/// Limits of one HTTP listener.
#[derive(Debug, Clone, Copy)]
pub struct HttpLimits {
    /// Connections open at once (being handshaken, read or answered); more are closed at accept.
    pub max_connections: usize,
    /// Connections open at once from one source address (IPv6: one /64).
    pub max_per_source: usize,
    /// Time to send a request's header, and the longest a kept-alive connection waits idle.
    pub header_read_timeout: Duration,
}

impl Default for HttpLimits {
    fn default() -> Self {
        HttpLimits { max_connections: 1024, max_per_source: 128, header_read_timeout: Duration::from_secs(10) }
    }
}

/// Admission of connections under [`HttpLimits`].
#[derive(Clone)]
pub struct Gate {
    limits: HttpLimits,
    open: Arc<Mutex<(usize, HashMap<IpAddr, usize>)>>,
}

/// A connection's place under the gate, given back when dropped.
pub struct Admitted {
    open: Arc<Mutex<(usize, HashMap<IpAddr, usize>)>>,
    source: IpAddr,
}

impl Drop for Admitted {
    fn drop(&mut self) {
        let mut g = self.open.lock().unwrap_or_else(|p| p.into_inner());
        g.0 = g.0.saturating_sub(1);
        if let Some(n) = g.1.get_mut(&self.source) {
            *n -= 1;
            if *n == 0 {
                g.1.remove(&self.source);
            }
        }
    }
}

/// The address a per-source cap counts: IPv4 as is, IPv6 by its /64 (one host owns a /64).
fn source_of(ip: IpAddr) -> IpAddr {
    match ip {
        IpAddr::V6(v6) => match v6.to_ipv4_mapped() {
            Some(v4) => IpAddr::V4(v4),
            None => {
                let s = v6.segments();
                IpAddr::V6(std::net::Ipv6Addr::new(s[0], s[1], s[2], s[3], 0, 0, 0, 0))
            }
        },
        v4 => v4,
    }
}

impl Gate {
    pub fn new(limits: HttpLimits) -> Gate {
        Gate { limits, open: Arc::new(Mutex::new((0, HashMap::new()))) }
    }

    pub fn limits(&self) -> HttpLimits {
        self.limits
    }

    /// A place for a connection from `peer`, or `None` when the listener or that source is full.
    pub fn admit(&self, peer: IpAddr) -> Option<Admitted> {
        let source = source_of(peer);
        let mut g = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let from_source = g.1.get(&source).copied().unwrap_or(0);
        if g.0 >= self.limits.max_connections || from_source >= self.limits.max_per_source {
            return None;
        }
        g.0 += 1;
        *g.1.entry(source).or_insert(0) += 1;
        Some(Admitted { open: self.open.clone(), source })
    }

    /// Wait until every admitted connection has ended (they finish their requests after a
    /// shutdown), at most `limit`.
    pub async fn drained(&self, limit: Duration) {
        let deadline = tokio::time::Instant::now() + limit;
        while self.open() > 0 && tokio::time::Instant::now() < deadline {
            tokio::time::sleep(Duration::from_millis(20)).await;
        }
    }

    /// Connections open now.
    pub fn open(&self) -> usize {
        self.open.lock().unwrap_or_else(|p| p.into_inner()).0
    }
}

/// Serve one admitted connection in the background: HTTP/1.1 with the header timeout, the peer's
/// address as `ConnectInfo<A>` for handlers that need it, shut down gracefully with `shutdown`.
pub fn spawn_connection<I, A>(
    io: I,
    peer: A,
    app: Router,
    limits: HttpLimits,
    admitted: Admitted,
    shutdown: CancellationToken,
) where
    I: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    A: Clone + Send + Sync + 'static,
{
    tokio::spawn(async move {
        let _admitted = admitted;
        let body_limit = limits.header_read_timeout;
        let service = hyper::service::service_fn(move |mut req: hyper::Request<hyper::body::Incoming>| {
            req.extensions_mut().insert(ConnectInfo(peer.clone()));
            let mut app = app.clone();
            // The body, too, must arrive within the header time (from the end of the header): a
            // client that trickles it would otherwise hold the connection and its task for ever.
            let req = req.map(|b| axum::body::Body::new(Deadline::new(b, body_limit)));
            async move { tower_service::Service::call(&mut app, req).await }
        });
        let mut builder = hyper::server::conn::http1::Builder::new();
        builder.timer(TokioTimer::new()).header_read_timeout(limits.header_read_timeout);
        let conn = builder.serve_connection(TokioIo::new(io), service);
        tokio::pin!(conn);
        tokio::select! {
            r = conn.as_mut() => {
                if let Err(e) = r {
                    tracing::debug!(error = %e, "HTTP connection ended with an error");
                }
            }
            _ = shutdown.cancelled() => {
                conn.as_mut().graceful_shutdown();
                let _ = tokio::time::timeout(Duration::from_secs(5), conn).await;
            }
        }
    });
}

/// A request body that fails once its deadline passes before it has all arrived.
struct Deadline<B> {
    inner: B,
    sleep: std::pin::Pin<Box<tokio::time::Sleep>>,
    limit: Duration,
}

impl<B> Deadline<B> {
    fn new(inner: B, limit: Duration) -> Self {
        Deadline { inner, sleep: Box::pin(tokio::time::sleep(limit)), limit }
    }
}

impl<B> hyper::body::Body for Deadline<B>
where
    B: hyper::body::Body<Data = hyper::body::Bytes> + Unpin,
    B::Error: Into<axum::BoxError>,
{
    type Data = hyper::body::Bytes;
    type Error = axum::BoxError;

    fn poll_frame(
        self: std::pin::Pin<&mut Self>,
        cx: &mut std::task::Context<'_>,
    ) -> std::task::Poll<Option<Result<hyper::body::Frame<Self::Data>, Self::Error>>> {
        use std::future::Future;
        let this = self.get_mut();
        if let std::task::Poll::Ready(f) = std::pin::Pin::new(&mut this.inner).poll_frame(cx) {
            return std::task::Poll::Ready(f.map(|r| r.map_err(Into::into)));
        }
        if this.sleep.as_mut().poll(cx).is_ready() {
            let why = format!("the request body did not arrive within {:?} of its header", this.limit);
            return std::task::Poll::Ready(Some(Err(why.into())));
        }
        std::task::Poll::Pending
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> hyper::body::SizeHint {
        self.inner.size_hint()
    }
}

/// Serve `app` on a plain TCP listener under `limits` until `shutdown`.
pub async fn serve_tcp(
    listener: tokio::net::TcpListener,
    app: Router,
    limits: HttpLimits,
    shutdown: CancellationToken,
) -> std::io::Result<()> {
    let gate = Gate::new(limits);
    loop {
        let (tcp, peer): (tokio::net::TcpStream, SocketAddr) = tokio::select! {
            _ = shutdown.cancelled() => {
                gate.drained(Duration::from_secs(5)).await;
                return Ok(());
            }
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    // Out of descriptors or similar: wait instead of spinning; connections
                    // being closed give them back.
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let Some(admitted) = gate.admit(peer.ip()) else {
            tracing::debug!(%peer, "HTTP connection refused: too many open");
            drop(tcp);
            continue;
        };
        spawn_connection(tcp, peer, app.clone(), limits, admitted, shutdown.clone());
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_gate_caps_in_total_and_per_source() {
        let gate = Gate::new(HttpLimits { max_connections: 3, max_per_source: 2, ..Default::default() });
        let a: IpAddr = "127.0.0.2".parse().unwrap();
        let b: IpAddr = "127.0.0.3".parse().unwrap();
        let a1 = gate.admit(a).unwrap();
        let _a2 = gate.admit(a).unwrap();
        assert!(gate.admit(a).is_none(), "per source");
        let _b1 = gate.admit(b).unwrap();
        assert!(gate.admit(b).is_none(), "in total");
        drop(a1);
        assert!(gate.admit(b).is_some(), "a closed connection gives its place back");
        // IPv6: one /64 is one source; an IPv4-mapped address is its IPv4 address.
        let g6 = Gate::new(HttpLimits { max_connections: 10, max_per_source: 1, ..Default::default() });
        let _x = g6.admit("2001:db8::1".parse().unwrap()).unwrap();
        assert!(g6.admit("2001:db8::2".parse().unwrap()).is_none());
        assert!(g6.admit("2001:db8:0:1::2".parse().unwrap()).is_some());
        let _y = g6.admit("::ffff:10.0.0.1".parse().unwrap()).unwrap();
        assert!(g6.admit("10.0.0.1".parse().unwrap()).is_none());
    }

    /// A body trickled after a complete header is cut at the header time, answered with an
    /// error, and the connection closed; a body sent in time is served.
    #[tokio::test]
    async fn a_trickled_body_is_cut_at_the_header_time() {
        use tokio::io::{AsyncReadExt, AsyncWriteExt};
        let app = Router::new().route("/echo", axum::routing::post(|body: String| async move { body }));
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let limits = HttpLimits { header_read_timeout: Duration::from_millis(300), ..Default::default() };
        let shutdown = CancellationToken::new();
        tokio::spawn(serve_tcp(listener, app, limits, shutdown.clone()));
        let head = "POST /echo HTTP/1.1\r\nHost: x\r\nContent-Length: 10\r\n\r\n";
        let mut c = tokio::net::TcpStream::connect(addr).await.unwrap();
        c.write_all(format!("{head}0123456789").as_bytes()).await.unwrap();
        let mut buf = vec![0u8; 1024];
        let n = c.read(&mut buf).await.unwrap();
        assert!(String::from_utf8_lossy(&buf[..n]).starts_with("HTTP/1.1 200"), "served in time");
        let mut slow = tokio::net::TcpStream::connect(addr).await.unwrap();
        slow.write_all(format!("{head}01").as_bytes()).await.unwrap();
        let started = std::time::Instant::now();
        let mut answer = Vec::new();
        let r = tokio::time::timeout(Duration::from_secs(30), slow.read_to_end(&mut answer)).await;
        assert!(r.is_ok(), "the trickled connection was not closed");
        let text = String::from_utf8_lossy(&answer);
        assert!(text.is_empty() || text.starts_with("HTTP/1.1 4"), "{text}");
        assert!(started.elapsed() < Duration::from_secs(20), "cut at about the header time");
        shutdown.cancel();
    }
}
