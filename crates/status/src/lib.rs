//! Every Ferry daemon serves its status as JSON over HTTP (`GET /status`) on a loopback address,
//! and `ferry <component> status` reads it. Extra routes (e.g. the agent's verify) are merged in.

pub mod control;
pub mod http;
mod rate;
pub mod server_client;
pub use control::Access;
pub use rate::RateMeter;

use std::net::SocketAddr;
use std::sync::Arc;

use axum::extract::FromRequest;
use axum::http::StatusCode;
use axum::response::{IntoResponse, Response};
use axum::routing::{get, MethodRouter};
use axum::{Json, Router};
use ferry_api::control::{ComponentKind, ComponentSettings, ComponentStatus, Heartbeat};
use ferry_api::{ErrorBody, Method, Route};
use ferry_types::codes;
use serde::de::DeserializeOwned;
use serde::Serialize;
use tokio::io::{AsyncReadExt, AsyncWriteExt};

#[derive(Debug, thiserror::Error)]
pub enum StatusError {
    #[error(
        "cannot reach the status endpoint at {addr}: {source} — is the daemon running, and is `status_listen` right?"
    )]
    Connect { addr: String, source: std::io::Error },
    #[error("status endpoint at {addr} answered badly: {reason}")]
    BadResponse { addr: String, reason: String },
    #[error(
        "cannot read the control token of the daemon at {addr} from {file}: {source} — run this as the daemon's user on its host"
    )]
    ControlToken { addr: String, file: String, source: std::io::Error },
    #[error("{addr} refused (HTTP {status}): {error}")]
    Refused { addr: String, status: u16, error: ErrorBody },
}

/// Serve `routes` (which must include `GET /status`, see [`status_route`]) until `shutdown`.
pub async fn serve(
    listener: tokio::net::TcpListener,
    routes: Router,
    shutdown: tokio_util::sync::CancellationToken,
) -> std::io::Result<()> {
    let app = routes.fallback(|| async {
        Failure(
            StatusCode::NOT_FOUND,
            ErrorBody::with_remedy(
                codes::NOT_FOUND,
                "no such route",
                "see the component's OpenAPI document (docs/openapi/)",
            ),
        )
    });
    let app = app.layer(axum::middleware::from_fn(refuse_browser_writes));
    // Loopback listeners are reached by every local user: a flood must not take the descriptors
    // the daemon needs for its data path, so connections are capped and timed out.
    http::serve_tcp(
        listener,
        app,
        http::HttpLimits { max_connections: 512, max_per_source: 128, ..Default::default() },
        shutdown,
    )
    .await
}

/// Any web page a local user opens can make the browser send a "simple" cross-origin POST (a
/// form or text body, no preflight) to a loopback port, and so take points or freeze a
/// machine's writes through a status listener. Such requests are refused: a request that
/// changes state must not come from a browser page (it carries `Origin`, or `Sec-Fetch-Site`
/// other than `none`) and must not have a body type a form can send. Ferry's own clients send
/// `application/json` and no `Origin`; a non-simple request from a page needs a preflight, which
/// these listeners never grant.
async fn refuse_browser_writes(req: axum::extract::Request, next: axum::middleware::Next) -> axum::response::Response {
    use axum::http::{header, Method as M};
    use axum::response::IntoResponse;
    if req.method() != M::GET && req.method() != M::HEAD {
        let h = req.headers();
        let from_page =
            h.contains_key(header::ORIGIN) || h.get("sec-fetch-site").is_some_and(|v| v.as_bytes() != b"none");
        let form_type = h.get(header::CONTENT_TYPE).and_then(|v| v.to_str().ok()).is_some_and(|v| {
            let v = v.split(';').next().unwrap_or("").trim().to_ascii_lowercase();
            matches!(v.as_str(), "application/x-www-form-urlencoded" | "multipart/form-data" | "text/plain")
        });
        if from_page || form_type || req.method() == M::OPTIONS {
            return Failure::of(
                codes::FORBIDDEN,
                "requests that change state are not accepted from web pages or with a form body type",
                "send the request with Content-Type: application/json and no Origin header (the ferry CLI does)",
            )
            .into_response();
        }
    }
    next.run(req).await
}

/// Serve the status listener in the background when a listener is given (errors are logged).
pub fn spawn(listener: Option<tokio::net::TcpListener>, routes: Router, shutdown: tokio_util::sync::CancellationToken) {
    if let Some(l) = listener {
        tokio::spawn(async move {
            if let Err(e) = serve(l, routes, shutdown).await {
                tracing::error!(error = %e, "status endpoint failed");
            }
        });
    }
}

/// The `GET /status` handler: `status()` runs on a blocking thread (a status may take locks a busy
/// component holds for a while: never block the async workers with it).
pub fn status_route<F>(status: F) -> MethodRouter
where
    F: Fn() -> ComponentStatus + Send + Sync + 'static,
{
    let status = Arc::new(status);
    get(move || {
        let status = status.clone();
        async move {
            match tokio::task::spawn_blocking(move || status()).await {
                Ok(v) => Ok(Json(v)),
                Err(e) => Err(Failure::internal(format!("status failed: {e}"))),
            }
        }
    })
}

/// Build a router from a route table: `handler` gives each route its method router (an
/// exhaustive match on the route's id), so the table is the one list of what is served.
///
/// Each route's role is checked before its handler runs: [`ferry_api::Role::Control`] and
/// [`ferry_api::Role::Coordinator`] routes need the secret `access` holds (see [`control`]).
pub fn router_from<Id: Copy, S: Clone + Send + Sync + 'static>(
    table: &'static [Route<Id>],
    access: &Access,
    mut handler: impl FnMut(&'static Route<Id>) -> MethodRouter<S>,
) -> Router<S> {
    table.iter().fold(Router::new(), |r, route| {
        let h = handler(route);
        let h = match route.role {
            ferry_api::Role::Control | ferry_api::Role::Coordinator => {
                let (access, role) = (access.clone(), route.role);
                h.route_layer(axum::middleware::from_fn(
                    move |req: axum::extract::Request, next: axum::middleware::Next| {
                        let checked = access.check(role, req.headers());
                        let access = access.clone();
                        async move {
                            if let Err(f) = checked {
                                return f.into_response();
                            }
                            if role != ferry_api::Role::Coordinator {
                                return next.run(req).await;
                            }
                            // The signature covers the exact body: read it (small, bounded),
                            // check, and hand the same bytes on.
                            let (parts, body) = req.into_parts();
                            let Ok(bytes) = axum::body::to_bytes(body, SIGNED_BODY_LIMIT).await else {
                                let f = Failure::of(
                                    ferry_types::codes::BODY_TOO_LARGE,
                                    format!("a group request body is at most {SIGNED_BODY_LIMIT} bytes"),
                                    "send a smaller request",
                                );
                                return f.into_response();
                            };
                            if let Err(f) = access.check_signed(&parts.headers, parts.uri.path(), &bytes) {
                                return f.into_response();
                            }
                            next.run(axum::extract::Request::from_parts(parts, axum::body::Body::from(bytes))).await
                        }
                    },
                ))
            }
            _ => h,
        };
        r.route(route.path, h)
    })
}

/// The method filter of a table's method.
pub fn method_filter(m: Method) -> axum::routing::MethodFilter {
    match m {
        Method::Get => axum::routing::MethodFilter::GET,
        Method::Post => axum::routing::MethodFilter::POST,
        Method::Put => axum::routing::MethodFilter::PUT,
        Method::Delete => axum::routing::MethodFilter::DELETE,
    }
}

/// An HTTP failure: status plus Ferry's error body.
#[derive(Debug, Clone)]
pub struct Failure(pub StatusCode, pub ErrorBody);

impl Failure {
    /// A failure with the registry's HTTP status for `code`.
    pub fn of(code: ferry_types::ErrorCode, message: impl Into<String>, remedy: impl Into<String>) -> Failure {
        Failure(
            StatusCode::from_u16(code.http_status).unwrap_or(StatusCode::INTERNAL_SERVER_ERROR),
            ErrorBody::with_remedy(code, message, remedy),
        )
    }
    pub fn with_status(
        status: StatusCode,
        code: ferry_types::ErrorCode,
        message: impl Into<String>,
        remedy: impl Into<String>,
    ) -> Failure {
        Failure(status, ErrorBody::with_remedy(code, message, remedy))
    }
    /// A worker thread failed (a bug): see the log.
    pub fn internal(message: impl Into<String>) -> Failure {
        Failure(
            StatusCode::INTERNAL_SERVER_ERROR,
            ErrorBody::with_remedy(codes::INTERNAL, message, "see the component's log"),
        )
    }
}

impl IntoResponse for Failure {
    fn into_response(self) -> Response {
        (self.0, Json(self.1)).into_response()
    }
}

/// A handler's answer: the route's typed body, or a failure.
pub type Reply<T> = Result<(StatusCode, Json<T>), Failure>;

/// `200 OK` with `v`.
pub fn ok<T>(v: T) -> Reply<T> {
    Ok((StatusCode::OK, Json(v)))
}

/// A JSON body whose rejection is Ferry's error body, naming what was wrong.
pub struct JsonBody<T>(pub T);

impl<T: DeserializeOwned, S: Send + Sync> FromRequest<S> for JsonBody<T> {
    type Rejection = Failure;
    async fn from_request(req: axum::extract::Request, state: &S) -> Result<Self, Failure> {
        match Json::<T>::from_request(req, state).await {
            Ok(Json(v)) => Ok(JsonBody(v)),
            Err(e) => {
                // Malformed, mistyped or missing: all 400, with the reason (only size differs).
                let (status, code) = if e.status() == StatusCode::PAYLOAD_TOO_LARGE {
                    (StatusCode::PAYLOAD_TOO_LARGE, codes::BODY_TOO_LARGE)
                } else {
                    (StatusCode::BAD_REQUEST, codes::BAD_REQUEST)
                };
                Err(Failure(
                    status,
                    ErrorBody::with_remedy(
                        code,
                        e.body_text(),
                        format!(
                            "send the JSON body the component's OpenAPI document gives for this route ({})",
                            std::any::type_name::<T>().rsplit("::").next().unwrap_or("object")
                        ),
                    ),
                ))
            }
        }
    }
}

/// Typed call to a component's status listener: `method path` with an optional JSON body; the
/// answer as `T`, or the component's refusal.
pub async fn call<T: DeserializeOwned>(
    addr: &str,
    method: Method,
    path: &str,
    body: Option<&(impl Serialize + ?Sized)>,
) -> Result<T, StatusError> {
    call_as(addr, None, method, path, body).await
}

/// The largest body a signed (coordinator) route reads.
pub const SIGNED_BODY_LIMIT: usize = 64 << 10;

/// [`call`] with `Authorization: Bearer <bearer>` (a control token).
pub async fn call_as<T: DeserializeOwned>(
    addr: &str,
    bearer: Option<&str>,
    method: Method,
    path: &str,
    body: Option<&(impl Serialize + ?Sized)>,
) -> Result<T, StatusError> {
    let body = encode(addr, body)?;
    call_bytes(addr, bearer, method, path, body.as_deref()).await
}

/// [`call`] on a coordinator route: the request signed by the group's coordinator key.
pub async fn call_signed<T: DeserializeOwned>(
    addr: &str,
    signer: &control::GroupSigner,
    method: Method,
    path: &str,
    body: &(impl Serialize + ?Sized),
) -> Result<T, StatusError> {
    let body = encode(addr, Some(body))?.unwrap_or_default();
    let bearer = signer.bearer(path, &body);
    call_bytes(addr, Some(&bearer), method, path, Some(&body)).await
}

fn encode(addr: &str, body: Option<&(impl Serialize + ?Sized)>) -> Result<Option<Vec<u8>>, StatusError> {
    body.map(|b| serde_json::to_vec(b))
        .transpose()
        .map_err(|e| StatusError::BadResponse { addr: addr.to_owned(), reason: e.to_string() })
}

async fn call_bytes<T: DeserializeOwned>(
    addr: &str,
    bearer: Option<&str>,
    method: Method,
    path: &str,
    body: Option<&[u8]>,
) -> Result<T, StatusError> {
    let (code, payload) = request(addr, bearer, method.http(), path, body).await?;
    if !(200..300).contains(&code) {
        let error = serde_json::from_slice::<ErrorBody>(&payload).unwrap_or_else(|_| ErrorBody {
            code: 0,
            name: String::new(),
            message: String::from_utf8_lossy(&payload).chars().take(500).collect(),
            remedy: String::new(),
        });
        return Err(StatusError::Refused { addr: addr.to_owned(), status: code, error });
    }
    serde_json::from_slice(&payload).map_err(|e| StatusError::BadResponse {
        addr: addr.to_owned(),
        reason: format!(
            "the answer to {path} is not the expected {}: {e}",
            std::any::type_name::<T>().rsplit("::").next().unwrap_or("type")
        ),
    })
}

/// [`call`] on a route that needs the daemon's control token: the token is read from the file
/// the daemon's status names (so the caller must run as the daemon's user on its host).
pub async fn call_control<T: DeserializeOwned>(
    addr: &str,
    method: Method,
    path: &str,
    body: Option<&(impl Serialize + ?Sized)>,
) -> Result<T, StatusError> {
    // The token is this host's secret: sent only to a daemon on this host.
    let local = tokio::net::lookup_host(addr).await.map(|mut a| a.all(|a| a.ip().is_loopback())).unwrap_or(false);
    if !local {
        return Err(StatusError::ControlToken {
            addr: addr.to_owned(),
            file: String::new(),
            source: std::io::Error::other(
                "control routes are served to the daemon's own host only: run the command there, against its loopback status address",
            ),
        });
    }
    let status = status_of(addr).await?;
    let token =
        match status.control_token_file() {
            None => None,
            Some(file) => {
                Some(control::read_control_token(std::path::Path::new(file)).map_err(|e| {
                    StatusError::ControlToken { addr: addr.to_owned(), file: file.to_owned(), source: e }
                })?)
            }
        };
    call_as(addr, token.as_deref(), method, path, body).await
}

/// A component's status (`GET /status`).
pub async fn status_of(addr: &str) -> Result<ComponentStatus, StatusError> {
    call(addr, Method::Get, "/status", None::<&()>).await
}

/// Minimal HTTP/1.1 client: `method path` with an optional JSON body, returns the status code
/// and the body's bytes.
pub async fn request(
    addr: &str,
    bearer: Option<&str>,
    method: &str,
    path: &str,
    body: Option<&[u8]>,
) -> Result<(u16, Vec<u8>), StatusError> {
    let connect_err = |source| StatusError::Connect { addr: addr.to_owned(), source };
    let bad = |reason: String| StatusError::BadResponse { addr: addr.to_owned(), reason };
    let sa: SocketAddr = tokio::net::lookup_host(addr)
        .await
        .map_err(connect_err)?
        .next()
        .ok_or_else(|| StatusError::Connect { addr: addr.to_owned(), source: std::io::Error::other("no address") })?;
    let mut s = tokio::net::TcpStream::connect(sa).await.map_err(connect_err)?;
    let body = body.unwrap_or_default();
    let auth = bearer.map(|b| format!("Authorization: Bearer {b}\r\n")).unwrap_or_default();
    let head = format!(
        "{method} {path} HTTP/1.1\r\nHost: {addr}\r\nConnection: close\r\n{auth}Content-Type: application/json\r\nContent-Length: {}\r\n\r\n",
        body.len()
    );
    s.write_all(head.as_bytes()).await.map_err(connect_err)?;
    s.write_all(body).await.map_err(connect_err)?;
    let mut resp = Vec::new();
    s.read_to_end(&mut resp).await.map_err(connect_err)?;
    let split = resp.windows(4).position(|w| w == b"\r\n\r\n").ok_or_else(|| bad("no header terminator".into()))?;
    let head = String::from_utf8_lossy(&resp[..split]).into_owned();
    let rest = &resp[split + 4..];
    let code: u16 = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| bad(format!("bad status line {head:?}")))?;
    let chunked = head.to_ascii_lowercase().contains("transfer-encoding: chunked");
    let payload = if chunked { dechunk(rest) } else { rest.to_vec() };
    Ok((code, payload))
}

fn dechunk(mut s: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    while let Some(pos) = s.windows(2).position(|w| w == b"\r\n") {
        let size = String::from_utf8_lossy(&s[..pos]);
        let rest = &s[pos + 2..];
        let n = usize::from_str_radix(size.trim(), 16).unwrap_or(0);
        if n == 0 || rest.len() < n {
            break;
        }
        out.extend_from_slice(&rest[..n]);
        s = rest[n..].strip_prefix(b"\r\n").unwrap_or(&rest[n..]);
    }
    out
}

#[cfg(test)]
mod tests {
    #[test]
    fn the_highest_epoch_seen_is_kept_and_never_goes_down() {
        let d = tempfile::tempdir().unwrap();
        let link = super::ConfigServerLink {
            address: "127.0.0.1:1".into(),
            ca: d.path().join("ca.pem"),
            token_file: d.path().join("config-server.token"),
            name: None,
            policy: None,
            heartbeat_interval_secs: 1.0,
            other_addresses: Vec::new(),
        };
        assert_eq!(link.highest_epoch(), 0);
        link.saw_epoch(2);
        link.saw_epoch(1);
        assert_eq!(link.highest_epoch(), 2, "a lower epoch (a stale server) does not lower it");
        assert_eq!(super::epoch_of(br#"{"authority_epoch": 3, "disks": []}"#), 3);
        assert_eq!(super::epoch_of(b"{}"), 0, "a server from before epochs");
    }

    #[test]
    fn a_standby_or_stale_refusal_sends_the_component_to_the_next_server() {
        let body =
            |code: u32| format!(r#"{{"code": {code}, "name": "x", "message": "m", "remedy": "r"}}"#).into_bytes();
        assert!(super::not_authoritative(503, &body(9036)));
        assert!(super::not_authoritative(409, &body(9037)));
        // Any other answer is the authoritative server's own (a conflict, a refusal, an error).
        assert!(!super::not_authoritative(409, &body(9008)));
        assert!(!super::not_authoritative(403, &body(9037)));
        assert!(!super::not_authoritative(200, b"{}"));
        assert!(!super::not_authoritative(503, b"not json"));
    }

    use super::*;

    #[tokio::test]
    async fn serves_and_reads_status() {
        let l = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = l.local_addr().unwrap().to_string();
        let token = tokio_util::sync::CancellationToken::new();
        let t = token.clone();
        let status = || {
            ComponentStatus::ProcessServer(ferry_api::process_server::ProcessServerStatus {
                listen: "127.0.0.1:1".into(),
                advertise: "127.0.0.1:1".into(),
                settings: Default::default(),
                cache_capacity_bytes: 1,
                spool_bytes: 0,
                free_percent: 100,
                throttling: false,
                filesystem_available_bytes: 1,
                machines: vec![],
                removed_machines: Default::default(),
                config_server_link: None,
            })
        };
        let h = tokio::spawn(serve(l, Router::new().route("/status", status_route(status)), t));
        let st = status_of(&addr).await.unwrap();
        assert_eq!(st.kind(), ComponentKind::ProcessServer);
        match call::<ComponentStatus>(&addr, Method::Get, "/nothing", None::<&()>).await {
            Err(StatusError::Refused { status: 404, error, .. }) => assert_eq!(error.code, codes::NOT_FOUND.code),
            other => panic!("{other:?}"),
        }
        token.cancel();
        h.await.unwrap().unwrap();
        assert!(status_of(&addr).await.is_err());
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
    #[serde(default = "default_heartbeat", deserialize_with = "ferry_types::bounds::secs")]
    pub heartbeat_interval_secs: f64,
    /// The other configuration servers of this installation (HOST:PORT; a standby at the other
    /// site), under the same name and CA: tried in order when `address` does not answer, or
    /// answers that it is a standby or stale. The component follows whichever is authoritative.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub other_addresses: Vec<String>,
}

fn default_heartbeat() -> f64 {
    30.0
}

/// An answer of one configuration server: its address, the HTTP status and the body.
pub type ServerAnswer = (String, u16, Vec<u8>);

impl ConfigServerLink {
    /// One request to the authoritative configuration server: `address` first, then each of
    /// `other_addresses`, skipping one that does not answer or refuses as a standby (9036) or a
    /// stale server (9037). Returns the answering address with the status and body; when none is
    /// authoritative, the last refusal (or error).
    pub async fn request(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
    ) -> Result<ServerAnswer, ferry_tls::TlsError> {
        self.request_checked(method, path, headers, body, |_| true).await
    }

    /// [`ConfigServerLink::request`] where `accept` also judges a successful answer's body:
    /// false sends the request on to the next server (settings from a server below the highest
    /// epoch seen).
    pub async fn request_checked(
        &self,
        method: &str,
        path: &str,
        headers: &[(&str, &str)],
        body: Option<&[u8]>,
        accept: impl Fn(&[u8]) -> bool,
    ) -> Result<ServerAnswer, ferry_tls::TlsError> {
        let mut last: Option<Result<ServerAnswer, ferry_tls::TlsError>> = None;
        for addr in std::iter::once(&self.address).chain(&self.other_addresses) {
            let r =
                ferry_tls::https_request(addr, ferry_tls::Trust::CaFile(&self.ca), method, path, headers, body).await;
            match r {
                // A standby, a stale server, or one that does not know this component's token
                // (it registered with another server of the installation): the next one.
                Ok((code, b)) if not_authoritative(code, &b) || code == 401 => last = Some(Ok((addr.clone(), code, b))),
                Ok((200, b)) if !accept(&b) => {
                    tracing::warn!(server = %addr, "this configuration server is below the highest epoch seen: ignored (a stale server)");
                    // Never the body: settings may hold a group coordinator's private key.
                    let refusal = serde_json::json!({
                        "code": codes::STALE_SERVER.code,
                        "name": codes::STALE_SERVER.name,
                        "message": format!("{addr} serves an epoch below the highest this component saw: it is stale"),
                        "remedy": codes::STALE_SERVER.remedy,
                    });
                    last = Some(Ok((addr.clone(), 409, refusal.to_string().into_bytes())));
                }
                Ok((code, b)) => return Ok((addr.clone(), code, b)),
                Err(e) => {
                    // An earlier refusal says more than a later connection error.
                    if !matches!(last, Some(Ok(_))) {
                        last = Some(Err(e));
                    }
                }
            }
        }
        last.unwrap_or_else(|| Ok((self.address.clone(), 0, Vec::new())))
    }
}

impl ConfigServerLink {
    /// Where the highest authority epoch seen is kept: beside the token `ferry register` wrote.
    fn epoch_file(&self) -> std::path::PathBuf {
        self.token_file.with_file_name("config-server.epoch")
    }

    /// The highest authority epoch this component has seen (0: none yet).
    pub fn highest_epoch(&self) -> u64 {
        std::fs::read_to_string(self.epoch_file()).ok().and_then(|t| t.trim().parse().ok()).unwrap_or(0)
    }

    /// Remember `epoch` if it is higher than any seen (durably: a restart does not forget it).
    pub fn saw_epoch(&self, epoch: u64) {
        if epoch > self.highest_epoch() {
            let path = self.epoch_file();
            if let Err(e) = ferry_sys::fs::write_atomic(&path, epoch.to_string().as_bytes()) {
                tracing::warn!(error = %e, file = %path.display(), "cannot keep the configuration server's epoch");
            }
        }
    }

    /// Fetch this component's settings from the authoritative server: one refusing as standby
    /// or stale, or serving settings of an epoch below the highest seen, is skipped.
    pub async fn fetch_settings(&self, kind: ComponentKind, name: &str) -> Result<ServerAnswer, ferry_tls::TlsError> {
        let token = std::fs::read_to_string(&self.token_file)
            .map_err(|e| ferry_tls::TlsError::Write { path: self.token_file.clone(), source: e })?;
        let auth = format!("Bearer {}", token.trim());
        let highest = self.highest_epoch();
        let path = format!("/api/v1/components/{kind}/{name}/settings");
        let r = self
            .request_checked("GET", &path, &[("Authorization", auth.as_str())], None, |b| epoch_of(b) >= highest)
            .await?;
        if r.1 == 200 {
            self.saw_epoch(epoch_of(&r.2));
        }
        Ok(r)
    }
}

/// The authority epoch in a settings body (0 when absent: a server from before epochs).
fn epoch_of(body: &[u8]) -> u64 {
    serde_json::from_slice::<serde_json::Value>(body).ok().and_then(|v| v["authority_epoch"].as_u64()).unwrap_or(0)
}

/// A standby's or stale server's refusal (its error body carries code 9036 or 9037).
fn not_authoritative(code: u16, body: &[u8]) -> bool {
    if code != 503 && code != 409 {
        return false;
    }
    let c = serde_json::from_slice::<serde_json::Value>(body).ok().and_then(|v| v["code"].as_u64());
    c == Some(u64::from(codes::STANDBY_SERVER.code)) || c == Some(u64::from(codes::STALE_SERVER.code))
}

/// Send heartbeats with `status()` until `shutdown`; failures are logged and retried.
pub fn spawn_heartbeats<F>(
    link: ConfigServerLink,
    kind: ComponentKind,
    default_name: String,
    status: F,
    shutdown: tokio_util::sync::CancellationToken,
) where
    F: Fn() -> ComponentStatus + Send + Sync + 'static,
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
            let snapshot = tokio::task::spawn_blocking(move || st()).await.ok();
            let beat = Heartbeat { kind, name: name.clone(), status: snapshot, policy: link.policy.clone() };
            let body = serde_json::to_string(&beat).unwrap_or_default();
            let auth = format!("Bearer {token}");
            let highest = link.highest_epoch();
            let r = link
                .request_checked(
                    "POST",
                    "/api/v1/heartbeats",
                    &[("Authorization", auth.as_str())],
                    Some(body.as_bytes()),
                    |b| epoch_of(b) >= highest,
                )
                .await
                .map(|(_, code, b)| (code, b));
            if let Ok((200, b)) = &r {
                link.saw_epoch(epoch_of(b));
            }
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

/// What [`spawn_settings_watch`] knows of the link to the configuration server, for the
/// component's status (the revoked count is the component's own, filled in by `snapshot`).
#[derive(Clone, Default)]
pub struct SettingsLink(Arc<std::sync::Mutex<ferry_api::control::ServerLinkStatus>>);

impl SettingsLink {
    pub fn snapshot(&self, revoked_certificates: usize) -> ferry_api::control::ServerLinkStatus {
        let mut s = self.0.lock().unwrap_or_else(|p| p.into_inner()).clone();
        s.revoked_certificates = revoked_certificates as u64;
        s
    }

    fn fetched(&self) {
        let mut s = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(since) = s.unreachable_since_ms.take() {
            tracing::info!(since_ms = since, "the configuration server answers again");
        }
        s.last_settings_ms = Some(now_ms());
    }

    fn failed(&self, why: &str) {
        let mut s = self.0.lock().unwrap_or_else(|p| p.into_inner());
        if s.unreachable_since_ms.is_none() {
            s.unreachable_since_ms = Some(now_ms());
            tracing::warn!(error = %why, last_settings_ms = ?s.last_settings_ms, "no configuration server answers: keeping the settings and the revocation list it sent last, and enforcing them");
        }
    }
}

fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// Follow the settings the configuration server holds for this component: every heartbeat
/// interval, fetch them and call `apply` when they differ from the last ones seen (the first
/// successful fetch always applies). Settings a component can take while running (per-machine
/// routes, datastores, retention windows) change without a restart this way.
pub fn spawn_settings_watch<F>(
    link: ConfigServerLink,
    kind: ComponentKind,
    default_name: String,
    apply: F,
    shutdown: tokio_util::sync::CancellationToken,
) -> SettingsLink
where
    F: Fn(ComponentSettings) + Send + Sync + 'static,
{
    let state = SettingsLink::default();
    let st = state.clone();
    tokio::spawn(async move {
        let name = link.name.clone().unwrap_or(default_name);
        let every = std::time::Duration::from_secs_f64(link.heartbeat_interval_secs.clamp(0.1, 10.0));
        let mut last: Option<ComponentSettings> = None;
        loop {
            if link.token_file.exists() {
                let r = link.fetch_settings(kind, &name).await.map(|(_, code, b)| (code, b));
                match &r {
                    Ok((200, _)) => st.fetched(),
                    Ok((code, _)) => st.failed(&format!("HTTP {code}")),
                    Err(e) => st.failed(&e.to_string()),
                }
                if let Ok((200, body)) = r {
                    match serde_json::from_slice::<ComponentSettings>(&body) {
                        Ok(v) if last.as_ref() != Some(&v) => {
                            tracing::info!(%kind, %name, "settings from the configuration server changed; applying");
                            apply(v.clone());
                            last = Some(v);
                        }
                        Ok(_) => {}
                        Err(e) => {
                            tracing::warn!(error = %e, "ignoring malformed settings from the configuration server")
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
    state
}
