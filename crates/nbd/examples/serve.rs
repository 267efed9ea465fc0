//! Serve one raw image file over NBD (handy for manual testing and benchmarks).
//!
//! `cargo run --release -p ferry-nbd --example serve -- IMAGE [PORT] [EXPORT]`
use std::sync::Arc;

use ferry_nbd::{Export, Exports, FileBackend, ServerConfig};

#[tokio::main]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let mut args = std::env::args().skip(1);
    let image = args.next().ok_or("usage: serve IMAGE [PORT] [EXPORT]")?;
    let port: u16 = args.next().map(|p| p.parse()).transpose()?.unwrap_or(10809);
    let name = args.next().unwrap_or_else(|| "disk0".into());
    let exports = Exports::new();
    exports.insert(Export {
        name: name.clone(),
        description: image.clone(),
        backend: Arc::new(FileBackend::open(&image, false)?),
    });
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", port)).await?;
    eprintln!("serving {image} as nbd://127.0.0.1:{port}/{name}");
    let config = Arc::new(ServerConfig::new(exports, None, false));
    let shutdown = tokio_util::sync::CancellationToken::new();
    let s = shutdown.clone();
    tokio::spawn(async move {
        let _ = tokio::signal::ctrl_c().await;
        s.cancel();
    });
    ferry_nbd::serve_tcp(listener, config, shutdown).await?;
    Ok(())
}
