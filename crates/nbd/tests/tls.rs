//! NBD_OPT_STARTTLS with an in-process rustls client.
#![allow(clippy::unwrap_used, clippy::expect_used)]

use std::sync::Arc;

use ferry_nbd::proto::*;
use ferry_nbd::{Export, Exports, MemBackend, ServerConfig};
use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt};
use tokio_rustls::rustls;
use tokio_util::sync::CancellationToken;

fn provider() -> Arc<rustls::crypto::CryptoProvider> {
    Arc::new(rustls::crypto::ring::default_provider())
}

fn tls_pair() -> (tokio_rustls::TlsAcceptor, tokio_rustls::TlsConnector) {
    let ck = rcgen::generate_simple_self_signed(vec!["localhost".into()]).unwrap();
    let cert = ck.cert.der().clone();
    let key = rustls::pki_types::PrivateKeyDer::Pkcs8(ck.key_pair.serialize_der().into());
    let server = rustls::ServerConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_no_client_auth()
        .with_single_cert(vec![cert.clone()], key)
        .unwrap();
    let mut roots = rustls::RootCertStore::empty();
    roots.add(cert).unwrap();
    let client = rustls::ClientConfig::builder_with_provider(provider())
        .with_safe_default_protocol_versions()
        .unwrap()
        .with_root_certificates(roots)
        .with_no_client_auth();
    (tokio_rustls::TlsAcceptor::from(Arc::new(server)), tokio_rustls::TlsConnector::from(Arc::new(client)))
}

async fn start(tls: Option<tokio_rustls::TlsAcceptor>, require_tls: bool) -> (u16, CancellationToken, Arc<MemBackend>) {
    let backend = Arc::new(MemBackend::new(1 << 20));
    let exports = Exports::new();
    exports.insert(Export { name: "disk".into(), description: String::new(), backend: backend.clone() });
    let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
    let port = listener.local_addr().unwrap().port();
    let token = CancellationToken::new();
    let config = Arc::new(ServerConfig::new(exports, tls, require_tls));
    tokio::spawn(ferry_nbd::serve_tcp(listener, config, token.clone()));
    (port, token, backend)
}

async fn send_option<S: AsyncWrite + Unpin>(s: &mut S, opt: u32, data: &[u8]) {
    let mut b = Vec::new();
    b.extend_from_slice(&IHAVEOPT.to_be_bytes());
    b.extend_from_slice(&opt.to_be_bytes());
    b.extend_from_slice(&(data.len() as u32).to_be_bytes());
    b.extend_from_slice(data);
    s.write_all(&b).await.unwrap();
    s.flush().await.unwrap();
}

/// Read option replies until a final one; returns the final reply type.
async fn final_reply<S: AsyncRead + Unpin>(s: &mut S) -> u32 {
    loop {
        let mut h = [0u8; 20];
        s.read_exact(&mut h).await.unwrap();
        assert_eq!(&h[0..8], &OPT_REPLY_MAGIC.to_be_bytes());
        let typ = u32::from_be_bytes(h[12..16].try_into().unwrap());
        let len = u32::from_be_bytes(h[16..20].try_into().unwrap());
        let mut p = vec![0u8; len as usize];
        s.read_exact(&mut p).await.unwrap();
        if typ == REP_ACK || typ & (1 << 31) != 0 {
            return typ;
        }
    }
}

fn go_data(name: &str) -> Vec<u8> {
    let mut d = (name.len() as u32).to_be_bytes().to_vec();
    d.extend_from_slice(name.as_bytes());
    d.extend_from_slice(&0u16.to_be_bytes());
    d
}

async fn greet(port: u16) -> tokio::net::TcpStream {
    let mut s = tokio::net::TcpStream::connect(("127.0.0.1", port)).await.unwrap();
    let mut g = [0u8; 18];
    s.read_exact(&mut g).await.unwrap();
    assert_eq!(&g[0..8], &NBD_MAGIC.to_be_bytes());
    s.write_all(&3u32.to_be_bytes()).await.unwrap();
    s
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starttls_required_then_data_over_tls() {
    let (acceptor, connector) = tls_pair();
    let (port, token, backend) = start(Some(acceptor), true).await;

    let mut s = greet(port).await;
    // Everything except STARTTLS/ABORT is refused before TLS.
    send_option(&mut s, OPT_LIST, &[]).await;
    assert_eq!(final_reply(&mut s).await, REP_ERR_TLS_REQD);
    send_option(&mut s, OPT_GO, &go_data("disk")).await;
    assert_eq!(final_reply(&mut s).await, REP_ERR_TLS_REQD);
    send_option(&mut s, OPT_STARTTLS, &[]).await;
    assert_eq!(final_reply(&mut s).await, REP_ACK);

    let name = rustls::pki_types::ServerName::try_from("localhost").unwrap();
    let mut t = connector.connect(name, s).await.unwrap();
    send_option(&mut t, OPT_STARTTLS, &[]).await;
    assert_eq!(final_reply(&mut t).await, REP_ERR_INVALID); // already active
    send_option(&mut t, OPT_GO, &go_data("disk")).await;
    assert_eq!(final_reply(&mut t).await, REP_ACK);

    // WRITE then READ over TLS.
    let mut req = encode_request(0, CMD_WRITE, 1, 512, 4).to_vec();
    req.extend_from_slice(&[5, 6, 7, 8]);
    t.write_all(&req).await.unwrap();
    t.flush().await.unwrap();
    let mut r = [0u8; 16];
    t.read_exact(&mut r).await.unwrap();
    assert_eq!(r, encode_simple_reply(0, 1));
    t.write_all(&encode_request(0, CMD_READ, 2, 512, 4)).await.unwrap();
    t.flush().await.unwrap();
    t.read_exact(&mut r).await.unwrap();
    assert_eq!(r, encode_simple_reply(0, 2));
    let mut d = [0u8; 4];
    t.read_exact(&mut d).await.unwrap();
    assert_eq!(d, [5, 6, 7, 8]);
    t.write_all(&encode_request(0, CMD_DISC, 3, 0, 0)).await.unwrap();
    t.flush().await.unwrap();
    let mut rest = Vec::new();
    let _ = t.read_to_end(&mut rest).await;
    assert!(rest.is_empty());
    assert_eq!(&backend.contents()[512..516], &[5, 6, 7, 8]);

    // EXPORT_NAME without TLS closes the connection.
    let mut s = greet(port).await;
    send_option(&mut s, OPT_EXPORT_NAME, b"disk").await;
    let mut buf = [0u8; 8];
    assert_eq!(s.read(&mut buf).await.unwrap_or(0), 0);
    token.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn starttls_unsupported_without_acceptor_and_optional_tls() {
    let (port, token, _b) = start(None, false).await;
    let mut s = greet(port).await;
    send_option(&mut s, OPT_STARTTLS, &[]).await;
    assert_eq!(final_reply(&mut s).await, REP_ERR_UNSUP);
    send_option(&mut s, OPT_GO, &go_data("disk")).await;
    assert_eq!(final_reply(&mut s).await, REP_ACK);
    token.cancel();

    // TLS offered but not required: plain GO works.
    let (acceptor, _c) = tls_pair();
    let (port, token, _b) = start(Some(acceptor), false).await;
    let mut s = greet(port).await;
    send_option(&mut s, OPT_GO, &go_data("")).await;
    assert_eq!(final_reply(&mut s).await, REP_ACK);
    token.cancel();
}
