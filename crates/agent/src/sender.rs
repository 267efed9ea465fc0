//! Ships the in-order log to the process server over mutual TLS, reconnecting forever.

use std::sync::Arc;
use std::time::Duration;

use ferry_protocol::{FrameCodec, Hello, Message, Role};
use futures::{SinkExt, StreamExt};
use tokio_util::codec::Framed;
use tokio_util::sync::CancellationToken;

use crate::machine::{push_event, Machine};

pub(crate) async fn run(
    machine: Arc<Machine>,
    connector: ferry_tls::tokio_rustls::TlsConnector,
    revoked: Arc<ferry_tls::Revoked>,
    shutdown: CancellationToken,
) {
    let interval = Duration::from_secs_f64(machine.config.reconnect_interval_secs.max(0.01));
    loop {
        if shutdown.is_cancelled() {
            return;
        }
        let result = session(&machine, &connector, &revoked, &shutdown).await;
        // Initial-sync chunks sent on a lost link may never be acknowledged: copy them again.
        machine.requeue_bulk();
        let err = match result {
            Ok(()) => return,
            Err(e) => e,
        };
        {
            let mut c = machine.lock();
            if c.connected || c.link_error.as_deref() != Some(err.as_str()) {
                push_event(&mut c, "process-server-unreachable", err.clone());
                tracing::warn!(machine = %machine.name, error = %err, "process server link down; retrying");
            }
            c.connected = false;
            c.link_error = Some(err);
        }
        tokio::select! {
            _ = shutdown.cancelled() => return,
            _ = tokio::time::sleep(interval) => {}
        }
    }
}

async fn session(
    machine: &Arc<Machine>,
    connector: &ferry_tls::tokio_rustls::TlsConnector,
    revoked: &ferry_tls::Revoked,
    shutdown: &CancellationToken,
) -> Result<(), String> {
    let Some(addr) = &machine.config.process_server else {
        return Err("no process server is configured (tracking only)".into());
    };
    // Bounded: an unreachable address must not hang the agent for the OS's SYN timeout.
    let limit = Duration::from_secs(10);
    let tcp = tokio::time::timeout(limit, tokio::net::TcpStream::connect(addr))
        .await
        .map_err(|_| format!("cannot connect to process server {addr}: no answer within {limit:?}"))?
        .map_err(|e| format!("cannot connect to process server {addr}: {e}"))?;
    let _ = tcp.set_nodelay(true);
    let name = ferry_tls::server_name(&machine.config.process_server_name).map_err(|e| e.to_string())?;
    let tls = tokio::time::timeout(limit, connector.connect(name, tcp))
        .await
        .map_err(|_| format!("TLS with process server {addr} did not complete within {limit:?}"))?
        .map_err(|e| format!("TLS with process server {addr} failed: {e}"))?;
    // Only a process server's certificate, not revoked: the disk's writes go nowhere else.
    revoked
        .check_server(tls.get_ref().1, ferry_tls::CertRole::ProcessServer)
        .map_err(|e| format!("process server {addr} refused: {e}"))?;
    ship(machine, tls, shutdown).await
}

/// One session over an established stream: hello, then the in-order log and initial-sync chunks
/// out, acknowledgements in, until the stream fails or `shutdown`.
pub(crate) async fn ship<S>(machine: &Arc<Machine>, stream: S, shutdown: &CancellationToken) -> Result<(), String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let mut framed = Framed::new(stream, FrameCodec::default());
    framed
        .send(Message::Hello(Hello {
            role: Role::Agent,
            machine: machine.descriptor(),
            generation: ferry_protocol::Generation(machine.generation()),
            lineage: machine.lineage(),
        }))
        .await
        .map_err(|e| e.to_string())?;
    let ack = match framed.next().await {
        Some(Ok(Message::HelloAck(a))) => a,
        Some(Ok(Message::Error { code, message, remedy })) => {
            return Err(format!("process server refused (code {code}): {message}; {remedy}"))
        }
        Some(Ok(_)) => return Err("process server answered with an unexpected message".into()),
        Some(Err(e)) => return Err(e.to_string()),
        None => return Err("process server closed the connection".into()),
    };
    machine.on_hello_ack(ack.durable_seq.get(), ack.applied_seq.get());
    {
        let mut c = machine.lock();
        c.connected = true;
        c.link_error = None;
    }
    tracing::info!(machine = %machine.name, resume_after = ack.durable_seq.get(), "connected to process server");
    let (mut sink, mut stream) = framed.split();
    let batch = machine.config.batch_bytes;
    loop {
        if machine.config.shipping_paused {
            tokio::select! {
                _ = shutdown.cancelled() => return Ok(()),
                m = stream.next() => handle(machine, m)?,
            }
            continue;
        }
        let after = machine.lock().sent_seq;
        let records = machine.records_after(after, batch);
        if let Some(last) = records.last().map(|r| r.seq) {
            let bytes: u64 = records.iter().map(|r| r.body.data_len()).sum();
            let send = sink.send(Message::Records(records));
            tokio::pin!(send);
            loop {
                tokio::select! {
                    r = &mut send => { r.map_err(|e| format!("send to process server failed: {e}"))?; break; }
                    m = stream.next() => handle(machine, m)?,
                }
            }
            let mut c = machine.lock();
            c.sent_seq = c.sent_seq.max(last.get());
            c.rate_out.add(bytes);
            c.shipped_bytes += bytes;
            continue;
        }
        let chunks = machine.bulk_to_send(batch as u64);
        if !chunks.is_empty() {
            for chunk in chunks {
                let send = sink.send(Message::Bulk(chunk));
                tokio::pin!(send);
                loop {
                    tokio::select! {
                        r = &mut send => { r.map_err(|e| format!("send to process server failed: {e}"))?; break; }
                        m = stream.next() => handle(machine, m)?,
                    }
                }
            }
            continue;
        }
        tokio::select! {
            _ = shutdown.cancelled() => return Ok(()),
            _ = machine.records_ready.notified() => {}
            m = stream.next() => handle(machine, m)?,
        }
    }
}

fn handle(machine: &Arc<Machine>, m: Option<Result<Message, ferry_protocol::ProtocolError>>) -> Result<(), String> {
    match m {
        None => Err("process server closed the connection".into()),
        Some(Err(e)) => Err(format!("bad frame from process server: {e}")),
        Some(Ok(Message::Ack(a))) => {
            machine.on_ack(a);
            Ok(())
        }
        Some(Ok(Message::Throttle { active, free_percent })) => {
            let mut c = machine.lock();
            c.throttled = active;
            let msg = if active {
                format!("process server cache low ({free_percent}% free): replication throttled (NET-2)")
            } else {
                format!("process server cache recovered ({free_percent}% free): replication resumed")
            };
            tracing::warn!(machine = %machine.name, "{msg}");
            push_event(&mut c, if active { "throttled" } else { "throttle-released" }, msg);
            Ok(())
        }
        Some(Ok(Message::Event(ev))) => {
            machine.on_event(ev);
            Ok(())
        }
        Some(Ok(Message::BulkAck { id })) => {
            machine.on_bulk_ack(id);
            Ok(())
        }
        Some(Ok(Message::BulkReset)) => {
            machine.requeue_bulk();
            Ok(())
        }
        Some(Ok(Message::PeerStateLost { detail })) => {
            machine.on_peer_state_lost(&detail);
            Ok(())
        }
        Some(Ok(Message::Error { code, message, remedy })) => {
            Err(format!("process server error {code}: {message}; {remedy}"))
        }
        Some(Ok(_)) => Err("unexpected message from process server".into()),
    }
}
