//! Every Ferry daemon serves its status as JSON over HTTP (`GET /status`) on a loopback address,
//! and `ferry <component> status` reads it. Extra routes (e.g. the agent's verify) are merged in.

mod rate;
pub mod server_client;
pub use rate::RateMeter;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::routing::get;
use axum::{Json, Router};
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error(
        "cannot reach the status endpoint at {addr}: {source} — is the daemon running, and is `status_listen` right?"
    )]
    Connect { addr: String, source: std::io::Error },
    #[error("status endpoint at {addr} answered badly: {reason}")]
    BadResponse { addr: String, reason: String },
}

/// Serve `GET /status` (the JSON from `status`) plus `extra` routes until `shutdown`.
pub async fn serve<F>(
    listener: tokio::net::TcpListener,
    status: F,
    extra: Router,
    shutdown: tokio_util::sync::CancellationToken,
) -> std::io::Result<()>
where
    F: Fn() -> serde_json::Value + Send + Sync + 'static,
{
    let status = Arc::new(status);
    let app = Router::new()
        .route(
            "/status",
            get(move || {
                let status = status.clone();
                // A status may take locks a busy component holds for a while: never block the
                // async workers with it.
                async move {
                    match tokio::task::spawn_blocking(move || status()).await {
                        Ok(v) => Json(v),
                        Err(e) => Json(serde_json::json!({ "error": format!("status failed: {e}") })),
                    }
                }
            }),
        )
        .merge(extra);
    axum::serve(listener, app).with_graceful_shutdown(async move { shutdown.cancelled().await }).await
}

/// Serve the status endpoint in the background when a listener is given (errors are logged).
pub fn spawn<F>(
    listener: Option<tokio::net::TcpListener>,
    status: F,
    extra: Router,
    shutdown: tokio_util::sync::CancellationToken,
) where
    F: Fn() -> serde_json::Value + Send + Sync + 'static,
{
    if let Some(l) = listener {
        tokio::spawn(async move {
            if let Err(e) = serve(l, status, extra, shutdown).await {
                tracing::error!(error = %e, "status endpoint failed");
            }
        });
    }
}

/// Minimal HTTP/1.1 client for the CLI: `method path` with an optional JSON body, returns the
/// status code and JSON body.
pub async fn request(
    addr: &str,
    method: &str,
    path: &str,
    body: Option<&serde_json::Value>,
) -> Result<(u16, serde_json::Value), StatusError> {
    let connect_err = |source| StatusError::Connect { addr: addr.to_owned(), source };
    let bad = |reason: String| StatusError::BadResponse { addr: addr.to_owned(), reason };
    let sa: SocketAddr = tokio::net::lookup_host(addr)
        .await
        .map_err(connect_err)?
        .next()
        .ok_or_else(|| StatusError::Connect { addr: addr.to_owned(), source: std::io::Error::other("no address") })?;
    let mut s = tokio::net::TcpStream::connect(sa).await.map_err(connect_err)?;
    let body = body.map(|b| b.to_string()).unwrap_or_default();
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\nContent-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).await.map_err(connect_err)?;
    let mut resp = Vec::new();
    s.read_to_end(&mut resp).await.map_err(connect_err)?;
    let text = String::from_utf8_lossy(&resp);
    let (head, rest) = text.split_once("\r\n\r\n").ok_or_else(|| bad("no header terminator".into()))?;
    let code: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| bad(format!("bad status line {head:?}")))?;
    let chunked = head.to_ascii_lowercase().contains("transfer-encoding: chunked");
    let payload = if chunked { dechunk(rest) } else { rest.to_owned() };
    let json = if payload.trim().is_empty() {
        serde_json::Value::Null
    } else {
        serde_json::from_str(&payload).unwrap_or(serde_json::Value::String(payload))
    };
    Ok((code, json))
}

fn dechunk(mut s: &str) -> String {
    let mut out = String::new();
    while let Some((size, rest)) = s.split_once("\r\n") {
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.push_str(&rest[..n]);
        s = rest[n..].trim_start_matches("\r\n");
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn serves_and_reads_status() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let token = tokio_util::sync::CancellationToken::new();
        let t = token.clone();
        let h = tokio::spawn(serve(l, || serde_json::json!({"ok": true}), Router::new(), t));
        let (code, v) = request(&addr, "GET", "/status", None).await.unwrap();
        assert_eq!(code, 200);
        assert_eq!(v["ok"], true);
        token.cancel();
        h.await.unwrap().unwrap();
        assert!(request(&addr, "GET", "/status", None).await.is_err());
    }
}

/// Link of a data-path component to a configuration server: heartbeats carry its status. The
/// certificate and token come from `ferry register`.
#[derive(Debug, Clone, serde::Serialize, serde::Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ConfigServerLink {
    /// HOST:PORT of the configuration server's API.
    pub address: String,
    /// Its CA certificate (written by `ferry register`).
    pub ca: std::path::PathBuf,
    /// The component token file (written by `ferry register`).
    pub token_file: std::path::PathBuf,
    /// Name registered (default: the machine / master-target name, or "process-server").
    #[serde(default)]
    pub name: Option<String>,
    /// Replication policy this machine runs with (agents; RPO alerts).
    #[serde(default)]
    pub policy: Option<String>,
    #[serde(default = "default_heartbeat")]
    pub heartbeat_interval_secs: f64,
}

fn default_heartbeat() -> f64 {
    30.0
}

/// Send heartbeats with `status()` until `shutdown`; failures are logged and retried.
pub fn spawn_heartbeats<F>(
    link: ConfigServerLink,
    kind: &'static str,
    default_name: String,
    status: F,
    shutdown: tokio_util::sync::CancellationToken,
) where
    F: Fn() -> serde_json::Value + Send + Sync + 'static,
{
    let status = Arc::new(status);
    tokio::spawn(async move {
        let name = link.name.clone().unwrap_or(default_name);
        let every = std::time::Duration::from_secs_f64(link.heartbeat_interval_secs.max(0.1));
        let mut warned = false;
        loop {
            let token = match std::fs::read_to_string(&link.token_file) {
                Ok(t) => t.trim().to_owned(),
                Err(e) => {
                    tracing::warn!(file = %link.token_file.display(), error = %e, "cannot read the configuration-server token: run `ferry register`");
                    String::new()
                }
            };
            let st = status.clone();
            let snapshot = tokio::task::spawn_blocking(move || st()).await.unwrap_or_default();
            let body = serde_json::json!({ "kind": kind, "name": name, "status": snapshot, "policy": link.policy })
                .to_string();
            let auth = format!("Bearer {token}");
            let r = ferry_tls::https_request(
                &link.address,
                ferry_tls::Trust::CaFile(&link.ca),
                "POST",
                "/api/v1/heartbeats",
                &[("Authorization", auth.as_str())],
                Some(body.as_bytes()),
            )
            .await;
            match r {
                Ok((200, _)) => warned = false,
                Ok((code, b)) if !warned => {
                    warned = true;
                    tracing::warn!(code, body = %String::from_utf8_lossy(&b), "the configuration server refused a heartbeat");
                }
                Err(e) if !warned => {
                    warned = true;
                    tracing::warn!(error = %e, server = %link.address, "cannot send a heartbeat to the configuration server; retrying");
                }
                _ => {}
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
        }
    });
}

/// Follow the settings the configuration server holds for this component: every heartbeat
/// interval, fetch them and call `apply` when they differ from the last ones seen (the first
/// successful fetch always applies). Settings a component can take while running (per-machine
/// routes, datastores, retention windows) change without a restart this way.
pub fn spawn_settings_watch<F>(
    link: ConfigServerLink,
    kind: &'static str,
    default_name: String,
    apply: F,
    shutdown: tokio_util::sync::CancellationToken,
) where
    F: Fn(serde_json::Value) + Send + Sync + 'static,
{
    tokio::spawn(async move {
        let name = link.name.clone().unwrap_or(default_name);
        let every = std::time::Duration::from_secs_f64(link.heartbeat_interval_secs.clamp(0.1, 10.0));
        let mut last: Option<serde_json::Value> = None;
        loop {
            if let Ok(token) = std::fs::read_to_string(&link.token_file) {
                let auth = format!("Bearer {}", token.trim());
                let r = ferry_tls::https_request(
                    &link.address,
                    ferry_tls::Trust::CaFile(&link.ca),
                    "GET",
                    &format!("/api/v1/components/{kind}/{name}/settings"),
                    &[("Authorization", auth.as_str())],
                    None,
                )
                .await;
                if let Ok((200, body)) = r {
                    if let Ok(v) = serde_json::from_slice::<serde_json::Value>(&body) {
                        if last.as_ref() != Some(&v) {
                            tracing::info!(%kind, %name, "settings from the configuration server changed; applying");
                            apply(v.clone());
                            last = Some(v);
                        }
                    }
                }
            }
            tokio::select! {
                _ = shutdown.cancelled() => return,
                _ = tokio::time::sleep(every) => {}
            }
        }
    });
}
