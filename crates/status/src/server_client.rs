//! The configuration server's HTTPS client, shared by the CLI, the lab and the guests: calls with
//! a bearer token over TLS pinned to the server's CA, and registration of a component by passphrase
//! and certificate request (the component's key never leaves it).

use std::path::{Path, PathBuf};

use serde_json::{json, Value};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("give the configuration server's CA certificate with --ca FILE or FERRY_CA (it is <state_dir>/tls/ca.pem on the server)")]
    NoCa,
    #[error("cannot reach the configuration server at {server}: {source}")]
    Unreachable { server: String, source: ferry_tls::TlsError },
    #[error("{message} (HTTP {status}, code {code}; remedy: {remedy})")]
    Refused { status: u16, code: Value, message: String, remedy: String },
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
    /// `METHOD path` with an optional JSON body; the JSON answer, or the server's refusal.
    pub async fn call(&self, method: &str, path: &str, body: Option<Value>) -> Result<Value, ClientError> {
        let ca = self.ca.clone().ok_or(ClientError::NoCa)?;
        let auth = self.token.as_ref().map(|t| format!("Bearer {t}"));
        let mut headers = Vec::new();
        if let Some(a) = &auth {
            headers.push(("Authorization", a.as_str()));
        }
        let body = body.map(|b| b.to_string());
        let (status, resp) = ferry_tls::https_request(
            &self.server,
            ferry_tls::Trust::CaFile(&ca),
            method,
            path,
            &headers,
            body.as_deref().map(str::as_bytes),
        )
        .await
        .map_err(|source| ClientError::Unreachable { server: self.server.clone(), source })?;
        let v: Value = serde_json::from_slice(&resp).unwrap_or(Value::Null);
        if !(200..300).contains(&status) {
            return Err(ClientError::Refused {
                status,
                code: v["code"].clone(),
                message: v["message"].as_str().unwrap_or("request refused").to_owned(),
                remedy: v["remedy"].as_str().unwrap_or("-").to_owned(),
            });
        }
        Ok(v)
    }
}

/// Register a component with the configuration server at `server`: fetch its CA and check it
/// against `fingerprint`, send a certificate request with `passphrase`, and keep the CA, the key,
/// the signed certificate and the component token in `dir`. Returns where the files went.
pub async fn register_component(
    server: &str,
    fingerprint: &str,
    passphrase: &str,
    kind: &str,
    name: &str,
    hosts: &[String],
    dir: &Path,
) -> Result<Value, ClientError> {
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
    let body = json!({"kind": kind, "name": name, "passphrase": passphrase, "csr": csr, "hosts": hosts}).to_string();
    let (status, resp) = ferry_tls::https_request(
        server,
        ferry_tls::Trust::CaFile(&ca_path),
        "POST",
        "/api/v1/register",
        &[],
        Some(body.as_bytes()),
    )
    .await
    .map_err(unreachable)?;
    let v: Value = serde_json::from_slice(&resp).unwrap_or(Value::Null);
    if status != 201 {
        return Err(ClientError::RegistrationRefused {
            message: v["message"].as_str().unwrap_or("?").to_owned(),
            remedy: v["remedy"].as_str().unwrap_or("-").to_owned(),
        });
    }
    let key_path = dir.join(format!("{kind}.key"));
    let cert_path = dir.join(format!("{kind}.pem"));
    let token_path = dir.join("config-server.token");
    ferry_sys::fs::atomic_replace(&key_path, key.as_bytes(), 0o600).map_err(write_err(&key_path))?;
    let cert = v["certificate"].as_str().unwrap_or("");
    ferry_sys::fs::atomic_replace(&cert_path, cert.as_bytes(), 0o644).map_err(write_err(&cert_path))?;
    let token = v["token"].as_str().unwrap_or("");
    ferry_sys::fs::atomic_replace(&token_path, token.as_bytes(), 0o600).map_err(write_err(&token_path))?;
    Ok(json!({"ca": ca_path, "cert": cert_path, "key": key_path, "token_file": token_path}))
}
