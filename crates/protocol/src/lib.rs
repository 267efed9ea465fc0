//! Ferry's replication wire protocol: the frames and messages exchanged between the agent, the
//! process server and the master target.
//!
//! A frame is a 16-byte header followed by a payload:
//!
//! ```text
//! magic u32 "FRY1" | version u8 | flags u8 | reserved u16 | length u32 | crc32c u32 | payload
//! ```
//!
//! The payload is a postcard-encoded [`Message`], optionally lz4-compressed (flag bit 0, with the
//! uncompressed length prepended). Every frame is checked (magic, version, length bound, checksum)
//! before a single byte of it is interpreted; a bad frame is an error for that connection only.

mod codec;
mod handshake;
mod message;

pub use codec::{FrameCodec, ProtocolError, FRAME_HEADER_LEN, FRAME_MAGIC, MAX_FRAME_LEN, PROTOCOL_VERSION};
pub use handshake::{read_hello, read_hello_within, refuse, HELLO_TIMEOUT};
pub use message::*;

pub use ferry_types::{validate_name, DiskName, Generation, MachineName, Seq};

pub use ferry_sys::time::now_ms;

/// Error codes: the one registry (`ferry_types::codes`), re-exported for the data path.
pub use ferry_types::codes;
