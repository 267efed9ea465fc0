//! The frozen base of a replica's history: what it holds and the files behind it. Shared by the
//! replica (which owns the slot) and the recovery-point code (which reads, pins and prunes it).

use std::collections::HashMap;
use std::fs::File;
use std::path::PathBuf;
use std::sync::Arc;

use ferry_protocol::ResyncReason;
use serde::{Deserialize, Serialize};

use crate::point_image::PointDisk;

/// The frozen base of a replica's history.
#[derive(Debug, Clone, Serialize, Deserialize)]
pub struct BaseState {
    /// Bumped when the base is taken again from the target (after an initial sync).
    pub epoch: u64,
    /// The base holds the disks as of this seq.
    pub seq: u64,
    pub time_ms: u64,
    /// Set while pruning replays records (seq, advancing_to] into the base: after a crash the
    /// replay is finished before the base is used.
    #[serde(default)]
    pub advancing_to: Option<u64>,
    /// Disk generation in effect at `seq` (the history before it is pruned).
    #[serde(default)]
    pub generation: u64,
}

pub(crate) struct BaseSlot {
    pub state: Option<BaseState>,
    /// Open base files (read by materializations, written by pruning).
    pub files: Vec<(PathBuf, Arc<File>)>,
    /// Why pruning is not running, for the status.
    pub paused: Option<String>,
    /// Discarded exports whose NBD clients are still connected: they still read the base, so
    /// they pin it until the last connection closes.
    pub lingering: Vec<(String, u64, Vec<std::sync::Weak<PointDisk>>)>,
    /// The disks behind each export materialization (to notice connections that outlive it).
    pub exported: HashMap<String, Vec<std::sync::Weak<PointDisk>>>,
}

/// An initial sync's data does not pass through the journal (it goes straight to the target
/// disks), so the history cannot reach back across it.
pub(crate) fn bypasses_journal(reason: ResyncReason) -> bool {
    reason == ResyncReason::InitialSync
}
