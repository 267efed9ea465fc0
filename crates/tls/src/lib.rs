//! TLS 1.3 with mutual authentication for every link between Ferry processes, and `ferry certs`:
//! a CA and component certificates. Later the configuration server adopts this CA and signs
//! component CSRs, so each component's private key never leaves its host.

use std::path::{Path, PathBuf};
use std::sync::Arc;

pub mod identity;
pub mod revocation;
pub use identity::{CertRole, Identity};
pub use revocation::{PeerError, Revoked};

pub use rustls;
pub use tokio_rustls;

use rustls::pki_types::{CertificateDer, PrivateKeyDer, ServerName};
use serde::Deserialize;

#[derive(Debug, thiserror::Error)]
pub enum TlsError {
    #[error("cannot read {path}: {source} (create certificates with `ferry certs --dir DIR` and point [tls] or --certs at them)")]
    Read { path: PathBuf, source: std::io::Error },
    #[error("cannot write {path}: {source}")]
    Write { path: PathBuf, source: std::io::Error },
    #[error("{path} holds no PEM {what}: point the [tls] section at the files `ferry certs` wrote")]
    NoPem { path: PathBuf, what: &'static str },
    #[error("invalid TLS configuration: {0}")]
    Rustls(#[from] rustls::Error),
    #[error("cannot build client-certificate verifier: {0}")]
    Verifier(String),
    #[error("certificate generation failed: {0}")]
    Generate(#[from] rcgen::Error),
    #[error("invalid TLS server name {0:?}")]
    ServerName(String),
    #[error("invalid component identity {0}")]
    Identity(String),
}

/// Where a component finds its identity: the CA certificate it trusts, its own certificate and key.
#[derive(Debug, Clone, Deserialize, serde::Serialize, PartialEq, Eq)]
pub struct TlsFiles {
    pub ca: PathBuf,
    pub cert: PathBuf,
    pub key: PathBuf,
}

impl TlsFiles {
    /// The files `ferry certs` writes for `component` in `dir`.
    pub fn in_dir(dir: &Path, component: &str) -> Self {
        TlsFiles {
            ca: dir.join("ca.pem"),
            cert: dir.join(format!("{component}.pem")),
            key: dir.join(format!("{component}.key")),
        }
    }
}

fn read(path: &Path) -> Result<Vec<u8>, TlsError> {
    std::fs::read(path).map_err(|source| TlsError::Read { path: path.to_owned(), source })
}

fn certs(path: &Path) -> Result<Vec<CertificateDer<'static>>, TlsError> {
    let data = read(path)?;
    let certs: Vec<_> = rustls_pemfile::certs(&mut data.as_slice()).filter_map(Result::ok).collect();
    if certs.is_empty() {
        return Err(TlsError::NoPem { path: path.to_owned(), what: "certificate" });
    }
    Ok(certs)
}

fn key(path: &Path) -> Result<PrivateKeyDer<'static>, TlsError> {
    let data = read(path)?;
    rustls_pemfile::private_key(&mut data.as_slice())
        .ok()
        .flatten()
        .ok_or_else(|| TlsError::NoPem { path: path.to_owned(), what: "private key" })
}

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn roots(ca: &Path) -> Result<rustls::RootCertStore, TlsError> {
    let mut roots = rustls::RootCertStore::empty();
    for c in certs(ca)? {
        roots.add(c)?;
    }
    Ok(roots)
}

/// Server side: TLS 1.3 only, client certificate signed by the CA required.
pub fn server_config(files: &TlsFiles) -> Result<Arc<rustls::ServerConfig>, TlsError> {
    let verifier = rustls::server::WebPkiClientVerifier::builder_with_provider(Arc::new(roots(&files.ca)?), provider())
        .build()
        .map_err(|e| TlsError::Verifier(e.to_string()))?;
    let cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_client_cert_verifier(verifier)
        .with_single_cert(certs(&files.cert)?, key(&files.key)?)?;
    Ok(Arc::new(cfg))
}

/// Client side: TLS 1.3 only, presents its certificate, trusts only the CA.
pub fn client_config(files: &TlsFiles) -> Result<Arc<rustls::ClientConfig>, TlsError> {
    let cfg = rustls::ClientConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_root_certificates(roots(&files.ca)?)
        .with_client_auth_cert(certs(&files.cert)?, key(&files.key)?)?;
    Ok(Arc::new(cfg))
}

/// Mutual TLS 1.3: the peer must present a certificate issued by the CA (the data path between
/// components, and NBD exports with `nbd_tls`, where qemu presents `client-cert.pem`).
pub fn acceptor(files: &TlsFiles) -> Result<tokio_rustls::TlsAcceptor, TlsError> {
    Ok(tokio_rustls::TlsAcceptor::from(server_config(files)?))
}

/// Server-authenticated TLS 1.3 without client certificates: for the configuration server's
/// API only, whose clients authenticate with tokens. Every listener that reaches disk data (the
/// data path, NBD exports) uses [`acceptor`], which requires a client certificate from the CA.
pub fn token_api_acceptor(files: &TlsFiles) -> Result<tokio_rustls::TlsAcceptor, TlsError> {
    let cfg = rustls::ServerConfig::builder_with_provider(provider())
        .with_protocol_versions(&[&rustls::version::TLS13])?
        .with_no_client_auth()
        .with_single_cert(certs(&files.cert)?, key(&files.key)?)?;
    Ok(tokio_rustls::TlsAcceptor::from(Arc::new(cfg)))
}

pub fn connector(files: &TlsFiles) -> Result<tokio_rustls::TlsConnector, TlsError> {
    Ok(tokio_rustls::TlsConnector::from(client_config(files)?))
}

pub fn server_name(name: &str) -> Result<ServerName<'static>, TlsError> {
    ServerName::try_from(name.to_owned()).map_err(|_| TlsError::ServerName(name.to_owned()))
}

/// Accept TLS connections until `shutdown`, running `handle` for each in its own task with the
/// identity the peer's verified certificate carries (or why it has none usable: no identity, or
/// a certificate in `revoked`; the handler refuses such a peer with a code on its own protocol). A failed handshake or handler is logged with
/// the peer's address; the listener keeps serving others.
pub async fn serve_tls<F, Fut>(
    listener: tokio::net::TcpListener,
    acceptor: tokio_rustls::TlsAcceptor,
    revoked: Arc<Revoked>,
    shutdown: tokio_util::sync::CancellationToken,
    what: &'static str,
    handle: F,
) where
    F: Fn(tokio_rustls::server::TlsStream<tokio::net::TcpStream>, Result<Identity, PeerError>) -> Fut
        + Send
        + Sync
        + 'static,
    Fut: std::future::Future<Output = Result<(), String>> + Send + 'static,
{
    let handle = Arc::new(handle);
    loop {
        let (stream, peer) = tokio::select! {
            _ = shutdown.cancelled() => return,
            r = listener.accept() => match r {
                Ok(x) => x,
                Err(e) => {
                    tracing::warn!(error = %e, "accept failed");
                    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
                    continue;
                }
            },
        };
        let _ = stream.set_nodelay(true);
        let acceptor = acceptor.clone();
        let handle = handle.clone();
        let revoked = revoked.clone();
        tokio::spawn(async move {
            let tls = match tokio::time::timeout(std::time::Duration::from_secs(10), acceptor.accept(stream)).await {
                Ok(Ok(t)) => t,
                Ok(Err(e)) => {
                    tracing::warn!(%peer, error = %e, "TLS handshake failed");
                    return;
                }
                Err(_) => {
                    tracing::warn!(%peer, "TLS handshake did not complete within 10 s");
                    return;
                }
            };
            let identity = revoked.peer_identity(tls.get_ref().1);
            // A peer refused now gets its refusal from the handler; one accepted is watched.
            let serial = identity.as_ref().ok().and_then(|_| Revoked::peer_serial(tls.get_ref().1)).unwrap_or_default();
            let cut = async {
                if serial.is_empty() {
                    std::future::pending::<()>().await
                }
                revoked.revoked_now(&serial).await
            };
            tokio::select! {
                r = handle(tls, identity) => if let Err(e) = r {
                    tracing::warn!(%peer, error = %e, "{what} connection closed");
                },
                // Revoked while connected: the connection is dropped at once (the peer's
                // reconnect is then refused with the revocation's code).
                _ = cut => tracing::warn!(%peer, serial, "{what} connection cut: its certificate was revoked"),
            }
        });
    }
}

/// What `ferry certs` produced.
#[derive(Debug, Clone, serde::Serialize)]
pub struct GeneratedCerts {
    pub ca: PathBuf,
    pub components: Vec<TlsFiles>,
}

fn write_file(path: &Path, data: &str, private: bool) -> Result<(), TlsError> {
    use std::io::Write;
    use std::os::unix::fs::OpenOptionsExt;
    std::fs::OpenOptions::new()
        .write(true)
        .create(true)
        .truncate(true)
        .mode(if private { 0o600 } else { 0o644 })
        .open(path)
        .and_then(|mut f| f.write_all(data.as_bytes()).and_then(|_| f.sync_all()))
        .map_err(|source| TlsError::Write { path: path.to_owned(), source })
}

fn ca_params() -> Result<rcgen::CertificateParams, TlsError> {
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    params.is_ca = rcgen::IsCa::Ca(rcgen::BasicConstraints::Unconstrained);
    params.distinguished_name.push(rcgen::DnType::CommonName, "Ferry CA");
    params.key_usages = vec![rcgen::KeyUsagePurpose::KeyCertSign, rcgen::KeyUsagePurpose::CrlSign];
    Ok(params)
}

/// Create (or reuse) a CA in `dir` and a certificate for each component, named by its identity
/// (`process-server`, `master-target`, `agent/vm1`, `nbd-client/vm1`, optionally `@SITE`; see
/// [`Identity::parse`]) and written as `<file stem>.pem`/`.key` ([`Identity::file_stem`]). Each
/// certificate carries the identity, its name and every entry of `hosts` (DNS names or IP
/// addresses) and is valid for both server and client authentication (components are both).
pub fn generate(dir: &Path, components: &[String], hosts: &[String]) -> Result<GeneratedCerts, TlsError> {
    let identities =
        components.iter().map(|c| Identity::parse(c).map_err(TlsError::Identity)).collect::<Result<Vec<_>, _>>()?;
    std::fs::create_dir_all(dir).map_err(|source| TlsError::Write { path: dir.to_owned(), source })?;
    let ca_pem = dir.join("ca.pem");
    let ca_key_pem = dir.join("ca.key");
    let (ca_cert, ca_key) = if ca_pem.exists() && ca_key_pem.exists() {
        let key_pem = String::from_utf8_lossy(&read(&ca_key_pem)?).into_owned();
        let ca_key = rcgen::KeyPair::from_pem(&key_pem)?;
        // Same subject and key as the stored CA certificate: what we sign verifies against it.
        let ca_cert = ca_params()?.self_signed(&ca_key)?;
        (ca_cert, ca_key)
    } else {
        let ca_key = rcgen::KeyPair::generate()?;
        let ca_cert = ca_params()?.self_signed(&ca_key)?;
        write_file(&ca_pem, &ca_cert.pem(), false)?;
        write_file(&ca_key_pem, &ca_key.serialize_pem(), true)?;
        (ca_cert, ca_key)
    };
    let mut out = Vec::new();
    for identity in &identities {
        let mut names = vec![identity.name.clone(), "localhost".to_owned(), "127.0.0.1".to_owned()];
        names.extend(hosts.iter().cloned());
        let key = rcgen::KeyPair::generate()?;
        let cert = component_params(identity, &names, 825)?.signed_by(&key, &ca_cert, &ca_key)?;
        let files = TlsFiles::in_dir(dir, &identity.file_stem());
        write_file(&files.cert, &cert.pem(), false)?;
        write_file(&files.key, &key.serialize_pem(), true)?;
        out.push(files);
    }
    Ok(GeneratedCerts { ca: ca_pem, components: out })
}

/// A component certificate's contents: the identity (subject and URI name), its host names,
/// server and client authentication, a random serial (what a revocation list names).
fn component_params(identity: &Identity, names: &[String], days: u32) -> Result<rcgen::CertificateParams, TlsError> {
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    let mut seen = std::collections::HashSet::new();
    for n in names.iter().filter(|n| seen.insert(n.to_ascii_lowercase())) {
        let san = match n.parse::<std::net::IpAddr>() {
            Ok(ip) => rcgen::SanType::IpAddress(ip),
            Err(_) => rcgen::SanType::DnsName(n.clone().try_into()?),
        };
        params.subject_alt_names.push(san);
    }
    params.subject_alt_names.push(rcgen::SanType::URI(identity.uri().try_into()?));
    params.distinguished_name.push(rcgen::DnType::CommonName, identity.to_string());
    params.extended_key_usages =
        vec![rcgen::ExtendedKeyUsagePurpose::ServerAuth, rcgen::ExtendedKeyUsagePurpose::ClientAuth];
    params.is_ca = rcgen::IsCa::NoCa;
    // 16 random bytes, positive and without a leading zero (DER keeps them as they are, so the
    // serial a revocation list names is exactly what the peer's certificate carries).
    let mut serial: [u8; 16] = rand_bytes()?;
    serial[0] = (serial[0] & 0x7f) | 0x40;
    params.serial_number = Some(rcgen::SerialNumber::from_slice(&serial));
    let now = std::time::SystemTime::now();
    params.not_before = now.into();
    params.not_after = (now + std::time::Duration::from_secs(u64::from(days) * 86_400)).into();
    Ok(params)
}

fn rand_bytes<const N: usize>() -> Result<[u8; N], TlsError> {
    use ring::rand::SecureRandom;
    let mut b = [0u8; N];
    ring::rand::SystemRandom::new().fill(&mut b).map_err(|_| TlsError::Verifier("no system randomness".into()))?;
    Ok(b)
}

/// SHA-256 of a PEM certificate's DER, as lowercase hex: what an operator compares before
/// trusting a CA it received over the network.
pub fn fingerprint(pem: &str) -> Result<String, TlsError> {
    let der = rustls_pemfile::certs(&mut pem.as_bytes())
        .next()
        .ok_or_else(|| TlsError::Verifier("no certificate in PEM".into()))?
        .map_err(|e| TlsError::Verifier(e.to_string()))?;
    Ok(ring::digest::digest(&ring::digest::SHA256, der.as_ref()).as_ref().iter().map(|b| format!("{b:02x}")).collect())
}

/// A new key pair and a certificate request for `name` (the key never leaves this host).
pub fn key_and_csr(name: &str, hosts: &[String]) -> Result<(String, String), TlsError> {
    let mut params = rcgen::CertificateParams::new(Vec::<String>::new())?;
    let mut names = vec![name.to_owned(), "localhost".to_owned()];
    names.extend(hosts.iter().cloned());
    names.dedup();
    for n in &names {
        let san = match n.parse::<std::net::IpAddr>() {
            Ok(ip) => rcgen::SanType::IpAddress(ip),
            Err(_) => rcgen::SanType::DnsName(n.clone().try_into()?),
        };
        params.subject_alt_names.push(san);
    }
    params.subject_alt_names.push(rcgen::SanType::IpAddress(std::net::Ipv4Addr::LOCALHOST.into()));
    params.distinguished_name.push(rcgen::DnType::CommonName, name.to_owned());
    let key = rcgen::KeyPair::generate()?;
    let csr = params.serialize_request(&key)?;
    Ok((key.serialize_pem(), csr.pem()?))
}

/// A certificate the CA signed: the PEM and its serial (lowercase hex), which a revocation list
/// names when the certificate is revoked.
#[derive(Debug, Clone)]
pub struct Signed {
    pub pem: String,
    pub serial: String,
}

/// Sign a certificate request with the CA in `ca_dir` (server and client auth, `days` valid).
/// Only the request's public key is used: the identity and names (`sans`) are the signer's
/// choice, never the requester's.
pub fn sign_csr(
    ca_dir: &Path,
    csr_pem: &str,
    identity: &Identity,
    sans: &[String],
    days: u32,
) -> Result<Signed, TlsError> {
    let key_pem = String::from_utf8_lossy(&read(&ca_dir.join("ca.key"))?).into_owned();
    let ca_key = rcgen::KeyPair::from_pem(&key_pem)?;
    let ca_cert = ca_params()?.self_signed(&ca_key)?;
    let mut csr = rcgen::CertificateSigningRequestParams::from_pem(csr_pem)?;
    let params = component_params(identity, sans, days)?;
    let serial = params.serial_number.as_ref().map(|s| hex(s.as_ref())).unwrap_or_default();
    csr.params = params;
    Ok(Signed { pem: csr.signed_by(&ca_cert, &ca_key)?.pem(), serial })
}

fn hex(b: &[u8]) -> String {
    b.iter().map(|b| format!("{b:02x}")).collect()
}

/// The one certificate of a PEM document, or an error when it holds none or several (a CA
/// fetched for pinning must be exactly what was fingerprinted).
pub fn single_certificate(pem: &str) -> Result<String, TlsError> {
    let certs: Vec<_> = rustls_pemfile::certs(&mut pem.as_bytes())
        .collect::<Result<_, _>>()
        .map_err(|e| TlsError::Verifier(e.to_string()))?;
    if certs.len() != 1 {
        return Err(TlsError::Verifier(format!("expected exactly one CA certificate, found {}", certs.len())));
    }
    let b64 = base64_encode(certs[0].as_ref());
    let mut out = String::from("-----BEGIN CERTIFICATE-----\n");
    for chunk in b64.as_bytes().chunks(64) {
        out.push_str(&String::from_utf8_lossy(chunk));
        out.push('\n');
    }
    out.push_str("-----END CERTIFICATE-----\n");
    Ok(out)
}

fn base64_encode(data: &[u8]) -> String {
    const T: &[u8; 64] = b"ABCDEFGHIJKLMNOPQRSTUVWXYZabcdefghijklmnopqrstuvwxyz0123456789+/";
    let mut out = String::with_capacity(data.len().div_ceil(3) * 4);
    for c in data.chunks(3) {
        let n =
            (u32::from(c[0]) << 16) | (u32::from(*c.get(1).unwrap_or(&0)) << 8) | u32::from(*c.get(2).unwrap_or(&0));
        for i in 0..4 {
            if i <= c.len() {
                out.push(T[(n >> (18 - 6 * i) & 63) as usize] as char);
            } else {
                out.push('=');
            }
        }
    }
    out
}

/// Accepts any server certificate: only for fetching a CA whose fingerprint is checked next.
#[derive(Debug)]
struct AnyServer(Arc<rustls::crypto::CryptoProvider>);

impl rustls::client::danger::ServerCertVerifier for AnyServer {
    fn verify_server_cert(
        &self,
        _: &rustls::pki_types::CertificateDer<'_>,
        _: &[rustls::pki_types::CertificateDer<'_>],
        _: &ServerName<'_>,
        _: &[u8],
        _: rustls::pki_types::UnixTime,
    ) -> Result<rustls::client::danger::ServerCertVerified, rustls::Error> {
        Ok(rustls::client::danger::ServerCertVerified::assertion())
    }
    fn verify_tls12_signature(
        &self,
        m: &[u8],
        c: &rustls::pki_types::CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls12_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn verify_tls13_signature(
        &self,
        m: &[u8],
        c: &rustls::pki_types::CertificateDer<'_>,
        d: &rustls::DigitallySignedStruct,
    ) -> Result<rustls::client::danger::HandshakeSignatureValid, rustls::Error> {
        rustls::crypto::verify_tls13_signature(m, c, d, &self.0.signature_verification_algorithms)
    }
    fn supported_verify_schemes(&self) -> Vec<rustls::SignatureScheme> {
        self.0.signature_verification_algorithms.supported_schemes()
    }
}

/// How an HTTPS client trusts the server.
pub enum Trust<'a> {
    /// CA certificate file; the server must present a configuration server's certificate.
    CaFile(&'a Path),
    /// Anything (bootstrap only: check the CA's fingerprint afterwards).
    Insecure,
}

/// A small HTTPS/1.1 client for the CLI and registration: one request, `Connection: close`.
/// Returns (status, body).
pub async fn https_request(
    addr: &str,
    trust: Trust<'_>,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: Option<&[u8]>,
) -> Result<(u16, Vec<u8>), TlsError> {
    let cfg = match trust {
        Trust::CaFile(ca) => rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .with_root_certificates(roots(ca)?)
            .with_no_client_auth(),
        Trust::Insecure => rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])?
            .dangerous()
            .with_custom_certificate_verifier(Arc::new(AnyServer(provider())))
            .with_no_client_auth(),
    };
    let host = addr.rsplit_once(':').map(|(h, _)| h).unwrap_or(addr).trim_matches(['[', ']']);
    let io = |e: std::io::Error| TlsError::Write { path: PathBuf::from(addr), source: e };
    let tcp = tokio::time::timeout(std::time::Duration::from_secs(10), tokio::net::TcpStream::connect(addr))
        .await
        .map_err(|_| io(std::io::Error::new(std::io::ErrorKind::TimedOut, "connect timed out")))?
        .map_err(io)?;
    // A stalled server must not hang the caller (heartbeats, settings watches, the CLI).
    let limit = std::time::Duration::from_secs(60);
    let timed_out = || io(std::io::Error::new(std::io::ErrorKind::TimedOut, format!("no answer within {limit:?}")));
    let check_role = matches!(trust, Trust::CaFile(_));
    let exchange = async {
        let tls = tokio_rustls::TlsConnector::from(Arc::new(cfg)).connect(server_name(host)?, tcp).await.map_err(io)?;
        // Only a configuration server's certificate (never issued by registration) is one: an
        // agent's or process server's certificate that happens to carry the host name is not.
        if check_role {
            let id = Identity::of_peer(tls.get_ref().1).map_err(|e| io(std::io::Error::other(e)))?;
            if id.role != CertRole::ConfigServer {
                return Err(io(std::io::Error::other(format!(
                    "the server presented {id}'s certificate, not a configuration server's"
                ))));
            }
        }
        exchange(tls, addr, host, method, path, headers, body.unwrap_or(&[])).await
    };
    tokio::time::timeout(limit, exchange).await.map_err(|_| timed_out())?
}

async fn exchange(
    mut tls: tokio_rustls::client::TlsStream<tokio::net::TcpStream>,
    addr: &str,
    host: &str,
    method: &str,
    path: &str,
    headers: &[(&str, &str)],
    body: &[u8],
) -> Result<(u16, Vec<u8>), TlsError> {
    use tokio::io::{AsyncReadExt, AsyncWriteExt};
    let io = |e: std::io::Error| TlsError::Write { path: PathBuf::from(addr), source: e };
    let mut req =
        format!("{method} {path} HTTP/1.1\r\nHost: {host}\r\nConnection: close\r\nContent-Length: {}\r\n", body.len());
    if !body.is_empty() {
        req.push_str("Content-Type: application/json\r\n");
    }
    for (k, v) in headers {
        req.push_str(&format!("{k}: {v}\r\n"));
    }
    req.push_str("\r\n");
    tls.write_all(req.as_bytes()).await.map_err(io)?;
    tls.write_all(body).await.map_err(io)?;
    let mut resp = Vec::new();
    // A server closing without close_notify is fine for a Connection: close response.
    let _ = tls.read_to_end(&mut resp).await;
    let split =
        resp.windows(4).position(|w| w == b"\r\n\r\n").ok_or_else(|| io(std::io::Error::other("no HTTP response")))?;
    let head = String::from_utf8_lossy(&resp[..split]).into_owned();
    let status = head
        .split_whitespace()
        .nth(1)
        .and_then(|c| c.parse().ok())
        .ok_or_else(|| io(std::io::Error::other("bad status line")))?;
    let mut payload = resp[split + 4..].to_vec();
    if head.to_ascii_lowercase().contains("transfer-encoding: chunked") {
        payload = dechunk(&payload);
    }
    Ok((status, payload))
}

fn dechunk(mut b: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    loop {
        let Some(nl) = b.windows(2).position(|w| w == b"\r\n") else { return out };
        let size = usize::from_str_radix(String::from_utf8_lossy(&b[..nl]).trim(), 16).unwrap_or(0);
        if size == 0 || b.len() < nl + 2 + size {
            return out;
        }
        out.extend_from_slice(&b[nl + 2..nl + 2 + size]);
        b = &b[(nl + 4 + size).min(b.len())..];
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[tokio::test]
    async fn mutual_tls_between_generated_components() {
        let dir = tempfile::tempdir().unwrap();
        let comps = vec!["agent".to_owned(), "process-server".to_owned()];
        generate(dir.path(), &comps, &[]).unwrap();
        let acceptor = acceptor(&TlsFiles::in_dir(dir.path(), "process-server")).unwrap();
        let connector = connector(&TlsFiles::in_dir(dir.path(), "agent")).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (s, _) = listener.accept().await.unwrap();
            let mut tls = acceptor.accept(s).await.unwrap();
            let mut b = [0u8; 5];
            tls.read_exact(&mut b).await.unwrap();
            assert_eq!(&b, b"hello");
            let (_, conn) = tls.get_ref();
            assert_eq!(conn.protocol_version(), Some(rustls::ProtocolVersion::TLSv1_3));
            assert!(conn.peer_certificates().is_some());
        });
        let s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut tls = connector.connect(server_name("process-server").unwrap(), s).await.unwrap();
        tls.write_all(b"hello").await.unwrap();
        tls.flush().await.unwrap();
        server.await.unwrap();
    }

    /// A configuration-server client talks only to a configuration server's certificate: an
    /// agent's that carries the same host name (registration gives components `127.0.0.1`) is
    /// refused before a byte of the request — its token — is sent.
    #[tokio::test]
    async fn a_config_server_client_refuses_another_components_certificate() {
        let dir = tempfile::tempdir().unwrap();
        generate(dir.path(), &["agent/vm1".to_owned(), "config-server".to_owned()], &[]).unwrap();
        for (stem, want_ok) in [("agent-vm1", false), ("config-server", true)] {
            let acceptor = token_api_acceptor(&TlsFiles::in_dir(dir.path(), stem)).unwrap();
            let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
            let addr = listener.local_addr().unwrap().to_string();
            let server = tokio::spawn(async move {
                let (s, _) = listener.accept().await.unwrap();
                let Ok(mut tls) = acceptor.accept(s).await else { return Vec::new() };
                let mut got = vec![0u8; 4096];
                let n = tls.read(&mut got).await.unwrap_or(0);
                got.truncate(n);
                if n > 0 {
                    let _ = tls.write_all(b"HTTP/1.1 200 OK\r\nContent-Length: 2\r\n\r\n{}").await;
                    let _ = tls.shutdown().await;
                }
                got
            });
            let ca = dir.path().join("ca.pem");
            let r = https_request(&addr, Trust::CaFile(&ca), "GET", "/x", &[("Authorization", "Bearer secret")], None)
                .await;
            let seen = server.await.unwrap();
            if want_ok {
                assert_eq!(r.unwrap().0, 200);
            } else {
                let e = r.unwrap_err().to_string();
                assert!(e.contains("not a configuration server's"), "{e}");
                assert!(!String::from_utf8_lossy(&seen).contains("secret"), "the token never left");
            }
        }
    }

    #[tokio::test]
    async fn client_without_certificate_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        generate(dir.path(), &["process-server".to_owned()], &[]).unwrap();
        let acceptor = acceptor(&TlsFiles::in_dir(dir.path(), "process-server")).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (s, _) = listener.accept().await.unwrap();
            acceptor.accept(s).await.is_err()
        });
        let cfg = rustls::ClientConfig::builder_with_provider(provider())
            .with_protocol_versions(&[&rustls::version::TLS13])
            .unwrap()
            .with_root_certificates(roots(&dir.path().join("ca.pem")).unwrap())
            .with_no_client_auth();
        let s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let r =
            tokio_rustls::TlsConnector::from(Arc::new(cfg)).connect(server_name("process-server").unwrap(), s).await;
        if let Ok(mut tls) = r {
            let _ = tls.write_all(b"x").await;
            let mut b = [0u8; 1];
            let _ = tls.read(&mut b).await;
        }
        assert!(server.await.unwrap(), "server must refuse a client without a certificate");
    }

    #[tokio::test]
    async fn reused_ca_still_verifies_new_components() {
        let dir = tempfile::tempdir().unwrap();
        generate(dir.path(), &["process-server".to_owned()], &[]).unwrap();
        generate(dir.path(), &["agent".to_owned()], &[]).unwrap();
        // agent was signed by the reloaded CA key: the process server must accept it.
        let acceptor = acceptor(&TlsFiles::in_dir(dir.path(), "process-server")).unwrap();
        let connector = connector(&TlsFiles::in_dir(dir.path(), "agent")).unwrap();
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let addr = listener.local_addr().unwrap();
        let server = tokio::spawn(async move {
            let (s, _) = listener.accept().await.unwrap();
            let mut tls = acceptor.accept(s).await.unwrap();
            let mut b = [0u8; 1];
            tls.read_exact(&mut b).await.unwrap();
        });
        let s = tokio::net::TcpStream::connect(addr).await.unwrap();
        let mut tls = connector.connect(server_name("127.0.0.1").unwrap(), s).await.unwrap();
        tls.write_all(b"x").await.unwrap();
        tls.flush().await.unwrap();
        server.await.unwrap();
    }

    #[test]
    fn missing_file_names_the_path() {
        let e = certs(Path::new("/nonexistent/ca.pem")).unwrap_err();
        assert!(e.to_string().contains("/nonexistent/ca.pem"));
    }
}
