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

/// Read the opening `Hello` and check the peer's role. `Ok(None)` when the peer closed politely;
/// anything else is refused with a clear error sent back before the connection closes.
pub async fn read_hello<S>(framed: &mut Framed<S, FrameCodec>, expected: Role) -> Result<Option<Hello>, String>
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin,
{
    let remedy = format!("connect a Ferry {expected} of the same version");
    match framed.next().await {
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
