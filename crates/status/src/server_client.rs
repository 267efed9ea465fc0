//! The configuration server's HTTPS client, shared by the CLI, the lab and the guests: calls with
//! a bearer token over TLS pinned to the server's CA, and registration of a component by passphrase
//! and certificate request (the component's key never leaves it).

use std::path::{Path, PathBuf};

use ferry_api::config_server::{RegisterRequest, Registered};
use ferry_api::control::ComponentKind;
use ferry_api::{ErrorBody, Method};
use serde::de::DeserializeOwned;
use serde::Serialize;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("give the configuration server's CA certificate with --ca FILE or FERRY_CA (it is <state_dir>/tls/ca.pem on the server)")]
    NoCa,
    #[error("cannot reach the configuration server at {server}: {source}")]
    Unreachable { server: String, source: ferry_tls::TlsError },
    #[error("{} (HTTP {status}, code {}; remedy: {})", error.message, error.code, if error.remedy.is_empty() { "-" } else { &error.remedy })]
    Refused { status: u16, error: ErrorBody },
    #[error("the server's CA fingerprint is {got}, not the {want} you were given: do not register with this server (wrong address, or someone in between)")]
    WrongFingerprint { got: String, want: String },
    #[error("registration refused: {message} (remedy: {remedy})")]
    RegistrationRefused { message: String, remedy: String },
    #[error("{server} answered {what}")]
    BadAnswer { server: String, what: String },
    #[error(transparent)]
    Tls(#[from] ferry_tls::TlsError),
    #[error("cannot write {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
}

/// Where the configuration server is and how to talk to it.
#[derive(Debug, Clone)]
pub struct ServerClient {
    /// HOST:PORT.
    pub server: String,
    pub token: Option<String>,
    /// The server's CA certificate (PEM).
    pub ca: Option<PathBuf>,
}

impl ServerClient {
    /// `METHOD path` with an optional JSON body; the answer as `T`, or the server's refusal.
    pub async fn call<T: DeserializeOwned>(
        &self,
        method: Method,
        path: &str,
        body: Option<&(impl Serialize + ?Sized)>,
    ) -> Result<T, ClientError> {
        let ca = self.ca.clone().ok_or(ClientError::NoCa)?;
        let auth = self.token.as_ref().map(|t| format!("Bearer {t}"));
        let mut headers = Vec::new();
        if let Some(a) = &auth {
            headers.push(("Authorization", a.as_str()));
        }
        let body = match body {
            Some(b) => Some(serde_json::to_vec(b).map_err(|e| ClientError::BadAnswer {
                server: self.server.clone(),
                what: format!("a request this client cannot encode: {e}"),
            })?),
            None => None,
        };
        let (status, resp) = ferry_tls::https_request(
            &self.server,
            ferry_tls::Trust::CaFile(&ca),
            method.http(),
            path,
            &headers,
            body.as_deref(),
        )
        .await
        .map_err(|source| ClientError::Unreachable { server: self.server.clone(), source })?;
        if !(200..300).contains(&status) {
            return Err(ClientError::Refused { status, error: refusal(&resp) });
        }
        serde_json::from_slice(&resp).map_err(|e| ClientError::BadAnswer {
            server: self.server.clone(),
            what: format!("to {path} something that is not the expected answer: {e}"),
        })
    }

    /// The server's answer as text (the CA certificate).
    pub async fn text(&self, path: &str) -> Result<String, ClientError> {
        let ca = self.ca.clone().ok_or(ClientError::NoCa)?;
        let (status, resp) =
            ferry_tls::https_request(&self.server, ferry_tls::Trust::CaFile(&ca), "GET", path, &[], None)
                .await
                .map_err(|source| ClientError::Unreachable { server: self.server.clone(), source })?;
        if !(200..300).contains(&status) {
            return Err(ClientError::Refused { status, error: refusal(&resp) });
        }
        Ok(String::from_utf8_lossy(&resp).into_owned())
    }
}

/// A refusal's error body (or its text, when a proxy or an older server answered).
fn refusal(resp: &[u8]) -> ErrorBody {
    serde_json::from_slice(resp).unwrap_or_else(|_| ErrorBody {
        code: 0,
        name: String::new(),
        message: String::from_utf8_lossy(resp).chars().take(500).collect(),
        remedy: String::new(),
    })
}

/// Where `register_component` put the component's files.
#[derive(Debug, Clone, Serialize, serde::Deserialize)]
pub struct RegistrationFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
    pub token_file: PathBuf,
}

/// The component being registered: its kind and name, the host names peers reach it at, and the
/// site it runs at (for its identity; an agent's comes from its machine's inventory).
#[derive(Debug, Clone, Copy)]
pub struct Registrant<'a> {
    pub kind: ComponentKind,
    pub name: &'a str,
    pub hosts: &'a [String],
    pub site: Option<&'a str>,
}

/// Register a component with the configuration server at `server`: fetch its CA and check it
/// against `fingerprint`, send a certificate request with `passphrase`, and keep the CA, the key,
/// the signed certificate and the component token in `dir`. Returns where the files went.
pub async fn register_component(
    server: &str,
    fingerprint: &str,
    passphrase: &str,
    who: &Registrant<'_>,
    dir: &Path,
) -> Result<RegistrationFiles, ClientError> {
    let Registrant { kind, name, hosts, site } = *who;
    let unreachable = |source| ClientError::Unreachable { server: server.to_owned(), source };
    let (status, ca) = ferry_tls::https_request(server, ferry_tls::Trust::Insecure, "GET", "/api/v1/ca", &[], None)
        .await
        .map_err(unreachable)?;
    if status != 200 {
        return Err(ClientError::BadAnswer { server: server.to_owned(), what: format!("HTTP {status} for its CA") });
    }
    // Exactly one certificate: what is fingerprinted is all that will be trusted.
    let ca = ferry_tls::single_certificate(&String::from_utf8_lossy(&ca))?;
    let got = ferry_tls::fingerprint(&ca)?;
    let want = fingerprint.replace(':', "").to_ascii_lowercase();
    if got != want {
        return Err(ClientError::WrongFingerprint { got, want });
    }
    let write_err = |path: &Path| {
        let path = path.to_owned();
        move |source| ClientError::Write { path, source }
    };
    std::fs::create_dir_all(dir).map_err(write_err(dir))?;
    let ca_path = dir.join("ca.pem");
    ferry_sys::fs::atomic_replace(&ca_path, ca.as_bytes(), 0o644).map_err(write_err(&ca_path))?;
    let (key, csr) = ferry_tls::key_and_csr(name, hosts)?;
    let req = RegisterRequest {
        kind,
        name: name.to_owned(),
        passphrase: passphrase.to_owned(),
        csr,
        hosts: hosts.to_vec(),
        site: site.map(str::to_owned),
    };
    let body = serde_json::to_vec(&req)
        .map_err(|e| ClientError::BadAnswer { server: server.to_owned(), what: e.to_string() })?;
    let (status, resp) = ferry_tls::https_request(
        server,
        ferry_tls::Trust::CaFile(&ca_path),
        "POST",
        "/api/v1/register",
        &[],
        Some(&body),
    )
    .await
    .map_err(unreachable)?;
    if status != 201 {
        let e = refusal(&resp);
        return Err(ClientError::RegistrationRefused { message: e.message, remedy: e.remedy });
    }
    let v: Registered = serde_json::from_slice(&resp).map_err(|e| ClientError::BadAnswer {
        server: server.to_owned(),
        what: format!("a registration answer that is not one: {e}"),
    })?;
    let key_path = dir.join(format!("{kind}.key"));
    let cert_path = dir.join(format!("{kind}.pem"));
    let token_path = dir.join("config-server.token");
    ferry_sys::fs::atomic_replace(&key_path, key.as_bytes(), 0o600).map_err(write_err(&key_path))?;
    ferry_sys::fs::atomic_replace(&cert_path, v.certificate.as_bytes(), 0o644).map_err(write_err(&cert_path))?;
    ferry_sys::fs::atomic_replace(&token_path, v.token.as_bytes(), 0o600).map_err(write_err(&token_path))?;
    Ok(RegistrationFiles { ca: ca_path, cert: cert_path, key: key_path, token_file: token_path })
}
