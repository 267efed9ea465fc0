//! Ferry's durable storage structures, shared by the data-path components:
//!
//! - [`SegmentLog`]: an append-only, checksummed, segmented log of [`Record`]s ordered by sequence.
//!   It is the process server's spool and the master target's redo journal (which the retention
//!   journal extends: it keeps segments for the retention window instead of releasing them).
//! - [`ActivityLog`]: the agent's activity log (DRBD's model): regions are marked durable *before*
//!   writes to them are submitted, so after a crash only those regions need a resync.
//! - [`DirtyMap`]: persistent per-disk change bitmaps at 4 KiB granularity (roaring-compressed):
//!   the regions changed since the generation the peer holds.
//!
//! [`Record`]: ferry_protocol::Record

mod activity_log;
mod dirty_map;
mod segment_log;

pub use activity_log::{ActivityLog, AlSlot};
pub use dirty_map::DirtyMap;
pub use segment_log::{Cursor, Location, SegmentLog};

use std::path::PathBuf;

#[derive(Debug, thiserror::Error)]
pub enum JournalError {
    #[error("i/o error on {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path} is corrupt at byte {offset}: {reason}; the file was not written by Ferry or was damaged — restore it from a copy or re-protect the machine")]
    Corrupt { path: PathBuf, offset: u64, reason: String },
    #[error("record seq {seq} is not after the log's last seq {last}: records must be appended in order")]
    OutOfOrder { seq: u64, last: u64 },
    #[error("activity log {path} is full ({slots} slots)")]
    ActivityLogFull { path: PathBuf, slots: usize },
    #[error("cannot encode record: {0}")]
    Encode(#[from] postcard::Error),
}

pub(crate) fn io_err(path: &std::path::Path) -> impl FnOnce(std::io::Error) -> JournalError + '_ {
    move |source| JournalError::Io { path: path.to_owned(), source }
}

/// Size of a tracked block (change-tracking granularity).
pub const TRACK_BLOCK: u64 = 4096;
