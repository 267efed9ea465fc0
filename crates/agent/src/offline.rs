//! What an agent's own state says may not be at the recovery site, read with the agent stopped:
//! the failover of a powered-off primary, or an operator asking what a lost site took with it.
//!
//! Every region the agent changed that the master target has not confirmed durable is in its
//! activity log (an active extent) or its change bitmap — extents retire only once the master
//! target has their changes (see the Architecture Invariant in [`crate::machine`]). So the union
//! of both, read from `<state_dir>`, covers everything the primary wrote and never shipped. It is
//! an over-approximation at extent granularity (`al_extent_bytes`), never an under-one.

use ferry_journal::{ActivityLog, DirtyMap, TRACK_BLOCK};
use serde::Serialize;

use crate::{AgentConfig, AgentError};

/// `ferry agent changes`: the regions of each disk that may not be at the master target.
#[derive(Debug, Clone, Serialize)]
pub struct UnconfirmedChanges {
    pub machine: String,
    pub disks: Vec<UnconfirmedDisk>,
    /// Sum over the disks.
    pub bytes: u64,
}

#[derive(Debug, Clone, Serialize)]
pub struct UnconfirmedDisk {
    pub name: String,
    pub size: u64,
    /// `(offset, len)` runs, ascending, merged.
    pub extents: Vec<(u64, u64)>,
    pub bytes: u64,
}

/// Read `config.state_dir` without changing anything (the agent must be stopped: a running one
/// changes these files as it goes).
pub fn unconfirmed_changes(config: &AgentConfig) -> Result<UnconfirmedChanges, AgentError> {
    let dir = &config.state_dir;
    let state_path = dir.join("state.json");
    let state = std::fs::read(&state_path).map_err(|source| AgentError::Io { path: state_path.clone(), source })?;
    #[derive(serde::Deserialize)]
    struct Disks {
        disks: Vec<ferry_protocol::DiskDescriptor>,
    }
    let disks: Disks = serde_json::from_slice(&state)
        .map_err(|e| AgentError::Config(format!("{} is corrupt: {e}", state_path.display())))?;
    let mut map = DirtyMap::load(&dir.join("dirty.map"), disks.disks.len())?;
    let ext = config.al_extent_bytes.max(TRACK_BLOCK);
    for (disk, e) in ActivityLog::read_active(&dir.join("activity.log"))? {
        if let Some(d) = disks.disks.get(disk as usize) {
            let off = e.saturating_mul(ext);
            if off < d.size {
                map.mark(disk as usize, off, ext.min(d.size - off));
            }
        }
    }
    let mut out = Vec::new();
    for (i, d) in disks.disks.iter().enumerate() {
        let mut extents: Vec<(u64, u64)> = Vec::new();
        for block in map.disks.get(i).into_iter().flat_map(|b| b.iter()) {
            let off = u64::from(block) * TRACK_BLOCK;
            let len = TRACK_BLOCK.min(d.size.saturating_sub(off));
            match extents.last_mut() {
                Some((o, l)) if *o + *l == off => *l += len,
                _ => extents.push((off, len)),
            }
        }
        let bytes = extents.iter().map(|(_, l)| l).sum();
        out.push(UnconfirmedDisk { name: d.name.clone(), size: d.size, extents, bytes });
    }
    let bytes = out.iter().map(|d| d.bytes).sum();
    Ok(UnconfirmedChanges { machine: config.machine.to_string(), disks: out, bytes })
}
