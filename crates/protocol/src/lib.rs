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
pub use handshake::{read_hello, refuse};
pub use message::*;

/// Machine and disk names become file and folder names at every hop: allow only a safe alphabet.
pub fn validate_name(kind: &str, name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 128
        && !name.starts_with('.')
        && name.chars().all(|c| c.is_ascii_alphanumeric() || matches!(c, '-' | '_' | '.'));
    if ok {
        Ok(())
    } else {
        Err(format!(
            "invalid {kind} name {name:?}: use 1-128 characters from A-Z a-z 0-9 . _ - (not starting with '.')"
        ))
    }
}

/// Milliseconds since the Unix epoch.
pub fn now_ms() -> u64 {
    std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map(|d| d.as_millis() as u64).unwrap_or(0)
}

/// Error codes of the data path (the REQUIREMENTS ERR family plus Ferry's own 9xxx).
pub mod codes {
    /// The peer sent something that is not a valid Ferry message at this point.
    pub const PROTOCOL: u32 = 9001;
    /// The machine's disk layout differs from what this hop holds (a disk was added, removed or resized).
    pub const DISK_LAYOUT_CHANGED: u32 = 9002;
    /// Storage failure at this hop (spool, journal or target disk).
    pub const STORAGE: u32 = 9003;
    /// Invalid machine or disk name.
    pub const BAD_NAME: u32 = 9004;
    /// The machine is not replicating in order (initial sync or resync): retry when caught up.
    pub const NOT_REPLICATING: u32 = 9005;
    /// No such object (verify session, machine, materialization).
    pub const NOT_FOUND: u32 = 9006;
    /// No recovery point matches (none yet, pruned, or not valid).
    pub const POINT_NOT_FOUND: u32 = 9007;
    /// The request conflicts with the machine's state (e.g. "latest" during a resync).
    pub const CONFLICT: u32 = 9008;
    /// A malformed API request.
    pub const BAD_REQUEST: u32 = 9009;
    /// Materializing a point failed.
    pub const MATERIALIZE_FAILED: u32 = 9010;
    /// A freeze/thaw hook failed or timed out: no app-consistent point was taken.
    pub const HOOK_FAILED: u32 = 9011;
    /// A multi-machine (group) tag could not be taken on every member.
    pub const GROUP_TAG_FAILED: u32 = 9012;
}
