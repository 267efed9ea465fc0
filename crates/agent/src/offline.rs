//! What an agent's own state says may not be at the recovery site, read with the agent stopped:
//! the failover of a powered-off primary, or an operator asking what a lost site took with it.
//!
//! Every region the agent changed that the master target has not confirmed durable is in its
//! activity log (an active extent) or its change bitmap — extents retire only once the master
//! target has their changes (see the Architecture Invariant in [`crate::machine`]). So the union
//! of both, read from `<state_dir>`, covers everything the primary wrote and never shipped. It is
//! an over-approximation at extent granularity (`al_extent_bytes`), never an under-one.

use ferry_journal::{ActivityLog, DirtyMap, TRACK_BLOCK};

use crate::{AgentConfig, AgentError};

pub use ferry_api::agent::{UnconfirmedChanges, UnconfirmedDisk};

/// Read `config.state_dir` without changing anything (the agent must be stopped: a running one
/// changes these files as it goes).
pub fn unconfirmed_changes(config: &AgentConfig) -> Result<UnconfirmedChanges, AgentError> {
    let dir = &config.state_dir;
    let state_path = dir.join("state.json");
    let state = std::fs::read(&state_path).map_err(|source| AgentError::Io { path: state_path.clone(), source })?;
    #[derive(serde::Deserialize)]
    struct Disks {
        disks: Vec<ferry_protocol::DiskDescriptor>,
        #[serde(default)]
        resync_open_seq: Option<u64>,
    }
    let disks: Disks = serde_json::from_slice(&state)
        .map_err(|e| AgentError::Config(format!("{} is corrupt: {e}", state_path.display())))?;
    // A running agent changes these files as it goes, and holds its disks' one-writer lock.
    for d in &config.disks {
        if let Err(e) = ferry_sys::fs::WriterLock::open(&d.path, "ferry agent changes") {
            if e.kind() == std::io::ErrorKind::WouldBlock {
                return Err(AgentError::Config(format!(
                    "the agent of {} is running ({e}): stop it first, or ask the running agent (`ferry agent status`)",
                    config.machine
                )));
            }
        }
    }
    let mut map = DirtyMap::load(&dir.join("dirty.map"), disks.disks.len())?;
    let al_path = dir.join("activity.log");
    // As at the agent's start: without the activity log nothing bounds what may differ.
    let mut whole_disks = (!al_path.exists()).then(|| format!("{} is missing: anything may differ", al_path.display()));
    // A resync that was open: the regions it already sent left the change bitmap, yet the
    // master target may have held them back (its replica waits for the run's end), so they are
    // in no list here — everything counts as changed (compared by hash, not copied whole).
    if let (None, Some(seq)) = (&whole_disks, disks.resync_open_seq) {
        whole_disks = Some(format!(
            "a resync was open (its begin is seq {seq}): the regions it already sent may never have reached the recovery site"
        ));
    }
    if whole_disks.is_some() {
        for (i, d) in disks.disks.iter().enumerate() {
            map.mark(i, 0, d.size);
        }
    }
    let ext = config.al_extent_bytes.max(TRACK_BLOCK);
    for (disk, e) in ActivityLog::read_active(&al_path)? {
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
        out.push(UnconfirmedDisk {
            name: d.name.clone(),
            size: d.size,
            extents,
            bytes,
            hashes: Vec::new(),
            whole_hashes: None,
        });
    }
    let bytes = out.iter().map(|d| d.bytes).sum();
    let lease_path = dir.join(crate::machine::WRITE_LEASE_FILE);
    let writes_until_ms = match std::fs::read(&lease_path) {
        Ok(d) => Some(
            serde_json::from_slice::<crate::machine::WriteLease>(&d)
                .map_err(|e| AgentError::Config(format!("{} is corrupt: {e}", lease_path.display())))?
                .writes_until_ms,
        ),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
        Err(source) => return Err(AgentError::Io { path: lease_path, source }),
    };
    Ok(UnconfirmedChanges {
        writes_until_ms,
        machine: config.machine.to_string(),
        disks: out,
        bytes,
        open_resync_seq: disks.resync_open_seq,
        whole_disks,
    })
}

/// Add the 4 KiB block hashes of every listed extent, read from the (stopped) agent's disks
/// (`ferry agent changes --hashes`): holes are not read.
pub fn add_block_hashes(config: &AgentConfig, changes: &mut UnconfirmedChanges) -> Result<(), AgentError> {
    for d in &mut changes.disks {
        let Some(dc) = config.disks.iter().find(|c| c.name.as_str() == d.name) else {
            return Err(AgentError::Config(format!("disk {} of the agent's state is not configured", d.name)));
        };
        let backend = ferry_nbd::FileBackend::open(&dc.path, true)
            .map_err(|e| AgentError::Disk { path: dc.path.clone(), error: e.to_string() })?;
        d.hashes = Vec::with_capacity(d.extents.len());
        for (off, len) in &d.extents {
            let h = crate::block_hash::region_hashes(&backend, *off, *len)
                .map_err(|error| AgentError::Disk { path: dc.path.clone(), error })?;
            d.hashes.push(crate::block_hash::to_hex(&h));
        }
    }
    Ok(())
}

/// Add the 4 KiB block hashes of each whole disk (`ferry agent changes --whole-disks`, for a
/// hash fallback): holes are not read.
pub fn add_whole_disk_hashes(config: &AgentConfig, changes: &mut UnconfirmedChanges) -> Result<(), AgentError> {
    for d in &mut changes.disks {
        let Some(dc) = config.disks.iter().find(|c| c.name.as_str() == d.name) else {
            return Err(AgentError::Config(format!("disk {} of the agent's state is not configured", d.name)));
        };
        let backend = ferry_nbd::FileBackend::open(&dc.path, true)
            .map_err(|e| AgentError::Disk { path: dc.path.clone(), error: e.to_string() })?;
        let h = crate::block_hash::region_hashes(&backend, 0, d.size)
            .map_err(|error| AgentError::Disk { path: dc.path.clone(), error })?;
        d.whole_hashes = Some(crate::block_hash::to_hex(&h));
    }
    Ok(())
}
