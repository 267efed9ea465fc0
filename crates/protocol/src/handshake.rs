//! The first exchange on every replication connection, shared by the receiving components.

use futures::{SinkExt, StreamExt};
use tokio_util::codec::Framed;

use crate::{codes, FrameCodec, Hello, Message, Role};

/// Send a refusal (the peer logs why it was closed) and return the message as the error.
pub async fn refuse<S>(framed: &mut Framed<S, FrameCodec>, code: u32, message: String, remedy: &str) -> String
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let _ = framed.send(Message::Error { code, message: message.clone(), remedy: remedy.to_owned() }).await;
    message
}

/// How long a peer has after the TLS handshake to say Hello: a connection that says nothing
/// holds a descriptor and a task, so it is closed.
pub const HELLO_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(30);

/// Read the opening `Hello` and check the peer's role. `Ok(None)` when the peer closed politely;
/// anything else (also no Hello within [`HELLO_TIMEOUT`]) is refused with a clear error sent back
/// before the connection closes.
pub async fn read_hello<S>(framed: &mut Framed<S, FrameCodec>, expected: Role) -> Result<Option<Hello>, String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    read_hello_within(framed, expected, HELLO_TIMEOUT).await
}

/// [`read_hello`] with another time limit.
pub async fn read_hello_within<S>(
    framed: &mut Framed<S, FrameCodec>,
    expected: Role,
    limit: std::time::Duration,
) -> Result<Option<Hello>, String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let remedy = format!("connect a Ferry {expected} of the same version");
    let Ok(first) = tokio::time::timeout(limit, framed.next()).await else {
        let msg = format!("no Hello within {:?} of connecting", limit);
        return Err(refuse(framed, codes::PROTOCOL.code, msg, &remedy).await);
    };
    match first {
        Some(Ok(Message::Hello(h))) if h.role == expected => Ok(Some(h)),
        Some(Ok(Message::Hello(h))) => {
            let msg = format!("expected Hello from a {expected}, got Hello from a {}", h.role);
            Err(refuse(framed, codes::PROTOCOL.code, msg, &remedy).await)
        }
        Some(Ok(_)) => {
            let msg = format!("expected Hello from a {expected} as the first message");
            Err(refuse(framed, codes::PROTOCOL.code, msg, &remedy).await)
        }
        Some(Err(e)) => Err(refuse(framed, codes::PROTOCOL.code, e.to_string(), &remedy).await),
        None => Ok(None),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_peer_that_never_says_hello_is_refused_and_told_why() {
        let (server, client) = tokio::io::duplex(4096);
        let mut f = Framed::new(server, FrameCodec::default());
        let mut peer = Framed::new(client, FrameCodec::default());
        let limit = std::time::Duration::from_millis(100);
        let e = read_hello_within(&mut f, Role::Agent, limit).await.unwrap_err();
        assert!(e.contains("no Hello within"), "{e}");
        match peer.next().await {
            Some(Ok(Message::Error { code, .. })) => assert_eq!(code, codes::PROTOCOL.code),
            other => panic!("expected the refusal, got {other:?}"),
        }
    }
}
