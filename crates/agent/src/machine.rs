//! The agent's core: one per-machine sequencer that orders every write of every disk, the
//! in-order log awaiting the process server's acknowledgement, the activity log, the change
//! bitmap, and the resync that copies changed regions when in-order shipping is not possible.
//!
//! Architecture Invariant: under the sequencer lock, a write is (1) given the next seq, (2) covered
//! by an activity-log extent made durable *before* (3) it is submitted to the local disk, then
//! (4) either appended to the in-order log or marked in the change bitmap. Holding the lock across
//! the submission applies overlapping writes to the source in seq order.
//!
//! Architecture Invariant: an activity-log extent is retired only when every change in it is
//! durable at the **master target** (not merely at the process server: its spool may be lost) or
//! recorded in the persisted change bitmap, *and* a local flush completed after its last write —
//! so after a crash, even one that loses the page cache, every region that may differ between
//! source and target is resynced, and what never reached the recovery site is known from the
//! agent's own state.
//!
//! Size: the sequencer, activity-log retirement, bulk window and resync share one lock and its invariants; the split into machine/ submodules is planned (docs/limitations.md).

use std::collections::{HashMap, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use ferry_journal::{ActivityLog, AlSlot, DirtyMap, JournalError, TRACK_BLOCK};
use ferry_nbd::{Backend, BackendError};
use ferry_protocol::{
    now_ms, Ack, DiskDescriptor, DiskName, MachineDescriptor, MachineName, Record, RecordBody, ResyncReason,
};
use ferry_status::RateMeter;
use serde::{Deserialize, Serialize};
use tokio::sync::Notify;

use crate::config::{AgentConfig, DiskCache};
use crate::AgentError;

const SEQ_RESERVATION: u64 = 1 << 20;
/// How far ahead of a write its lease reaches (see `Machine::ensure_write_lease`).
pub const WRITE_LEASE_MS: u64 = 1000;
/// The write lease's file in the state folder.
pub const WRITE_LEASE_FILE: &str = "write-lease.json";

/// The agent's promise that it submitted no write after `writes_until_ms` (its own clock).
#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
pub struct WriteLease {
    pub writes_until_ms: u64,
}

fn write_lease(dir: &std::path::Path, until: u64) -> Result<(), AgentError> {
    let path = dir.join(WRITE_LEASE_FILE);
    let data =
        serde_json::to_vec(&WriteLease { writes_until_ms: until }).map_err(|e| AgentError::Config(e.to_string()))?;
    ferry_sys::fs::write_atomic(&path, &data).map_err(crate::io_at(&path))
}
/// Initial-sync bytes in flight (sent, not yet durable at the master target).
const BULK_WINDOW: u64 = 64 << 20;

pub use ferry_api::agent::Mode;

#[derive(Debug, Clone, Serialize, Deserialize)]
struct PersistentState {
    generation: u64,
    initial_sync_complete: bool,
    disks: Vec<DiskDescriptor>,
    /// Seq of the ResyncBegin of a resync whose ResyncEnd is not yet acknowledged. While set, the
    /// master target may be holding its replica for that run: if the run's end never arrives
    /// (stop, crash, overflow), a restart runs a (possibly empty) resync to close it.
    #[serde(default)]
    resync_open_seq: Option<u64>,
    /// The failover seed last counted (its point ID).
    #[serde(default)]
    failover_seed: Option<String>,
    /// Which copy of the disks this is (made at the first start; a failed-over machine's
    /// names the primary's copy and the point as its parent).
    #[serde(default)]
    lineage: Option<StateLineage>,
    /// A planned failover's quiesce: kept across restarts, taken before the disks are served.
    #[serde(default)]
    pub(crate) quiesced: Option<ferry_api::agent::Quiesced>,
    /// The resync seed last counted (its order).
    #[serde(default)]
    resync_seed: Option<String>,
    /// Why what changed on the disks is not known (state lost after the machine ran); cleared
    /// by a seed that replaces the tracking with a whole-disk comparison.
    #[serde(default)]
    tracking_lost: Option<String>,
}

impl PersistentState {
    /// A first start's state (a new generation; no lineage yet: `open` gives one).
    fn first(disks: &[Disk], initial_sync_complete: bool) -> PersistentState {
        PersistentState {
            generation: rand::random::<u64>() | 1,
            initial_sync_complete,
            resync_open_seq: None,
            disks: disks
                .iter()
                .map(|d| DiskDescriptor { name: d.name.to_string(), size: d.size, uuid: d.uuid.clone() })
                .collect(),
            failover_seed: None,
            lineage: None,
            quiesced: None,
            resync_seed: None,
            tracking_lost: None,
        }
    }
}

#[derive(Debug, Clone, Serialize, Deserialize)]
struct StateLineage {
    id: u64,
    #[serde(default)]
    parent: Option<(u64, u64)>,
    /// The parent's ancestors, newest first (bounded by `ferry_protocol::LINEAGE_HISTORY`).
    #[serde(default)]
    ancestors: Vec<(u64, u64)>,
}

pub struct Disk {
    pub name: DiskName,
    pub size: u64,
    pub uuid: String,
    pub path: PathBuf,
    pub backend: Arc<dyn Backend>,
    /// Held while the agent runs: one writer per disk (a second agent on it fails at start).
    _writer: ferry_sys::fs::WriterLock,
}

#[derive(Default)]
struct AlEntry {
    slot: AlSlot,
    /// Log records touching this extent not yet acknowledged by the process server.
    pending: u32,
    /// Bitmap bits set in this extent that are not yet persisted.
    bitmap_unsaved: bool,
    /// Stamp of the last write submitted to this extent (to know whether a flush covered it).
    writes: u64,
}

/// An initial-sync region in flight outside the ordered log (see `Message::Bulk`).
struct BulkEntry {
    id: u64,
    disk: u16,
    offset: u64,
    len: u64,
    /// Empty for an all-zero region; moved out when sent (the source disk is the durable copy:
    /// a lost chunk re-marks its region in the bitmap).
    data: Vec<u8>,
    sent: Option<Instant>,
    extents: Vec<(u16, u64)>,
    /// What the entry counts against the in-flight window (its payload; zeroing is cheap).
    weight: u64,
}

struct LogEntry {
    record: Record,
    extents: Vec<(u16, u64)>,
    bytes: u64,
}

/// A change durable at the process server, not yet at the master target: its activity-log
/// extents stay active until the master target has it (its data is no longer held).
struct AwaitingTarget {
    seq: u64,
    disk: u16,
    offset: u64,
    len: u64,
    extents: Vec<(u16, u64)>,
}

/// Changes awaiting the master target kept by range; past this many they go to the bitmap.
const MAX_AWAITING_TARGET: usize = 1 << 20;

/// An event the agent shows in its status.
pub type EventEntry = ferry_api::Event;

struct ResyncRun {
    generation: u64,
    reason: ResyncReason,
    total_bytes: u64,
}

pub(crate) struct Core {
    /// No write is submitted after this instant (this agent's clock) unless it is durable in
    /// `write-lease.json` first: after any stop the file bounds when the machine last wrote.
    lease_until_ms: u64,
    /// When the last write was submitted (written to the lease file at a clean stop).
    last_write_ms: u64,
    next_seq: u64,
    al: ActivityLog,
    al_index: HashMap<(u16, u64), AlEntry>,
    dirty: DirtyMap,
    dirty_unsaved: bool,
    log: VecDeque<LogEntry>,
    log_bytes: u64,
    /// Released from `log` on the process server's ack, oldest first.
    awaiting_target: VecDeque<AwaitingTarget>,
    pub(crate) ack: Ack,
    pub(crate) mode: Mode,
    resync_reason: ResyncReason,
    resync: Option<ResyncRun>,
    state: PersistentState,
    state_path: PathBuf,
    pub(crate) events: VecDeque<EventEntry>,
    pub(crate) connected: bool,
    pub(crate) throttled: bool,
    pub(crate) link_error: Option<String>,
    last_record_seq: u64,
    unapplied: VecDeque<(u64, u64)>,
    rate_in: RateMeter,
    pub(crate) rate_out: RateMeter,
    /// Bytes shipped to the process server since this agent started (changes and initial sync).
    pub(crate) shipped_bytes: u64,
    pub(crate) sent_seq: u64,
    /// Bytes of the running resync read and shipped, and shipped as hole zeroing (not read).
    resync_bytes_sent: u64,
    resync_bytes_zeroed: u64,
    bulk: VecDeque<BulkEntry>,
    bulk_bytes: u64,
    next_bulk_id: u64,
    /// Seq of the queued ResyncEnd of the open run (its ack closes the run).
    pending_end_seq: Option<u64>,
    /// Stamps writes so activity-log retirement can tell whether a flush covered the last one
    /// (monotonic across re-activations of an extent).
    write_stamp: u64,
    /// Finished resyncs (reason, bytes copied), newest last: tests and operators check that a
    /// crash resent only the activity log's regions.
    completed_resyncs: VecDeque<ferry_api::agent::CompletedResync>,
    /// Writes are held (multi-machine prepare) until this group tag commits, aborts or expires.
    pub(crate) hold: Option<WriteHold>,
    /// A planned failover stopped the writes (see `points::quiesce`).
    pub(crate) quiesced: Option<ferry_api::agent::Quiesced>,
    /// The group tags prepared here lately (newest last, at most 256): a replayed prepare of one
    /// of them is refused before it freezes or holds anything.
    pub(crate) prepared_tags: VecDeque<String>,
    /// Recovery-point tags inserted, for the status.
    pub(crate) points: ferry_api::agent::PointStats,
}

impl Core {
    /// The seq of the newest record sequenced.
    pub(crate) fn last_seq(&self) -> u64 {
        self.last_record_seq
    }

    pub(crate) fn set_quiesced(&mut self, q: Option<ferry_api::agent::Quiesced>) {
        self.state.quiesced = q.clone();
        self.quiesced = q;
    }
}

/// Writes held by a group prepare.
#[derive(Debug, Clone)]
pub(crate) struct WriteHold {
    pub group: String,
    pub tag: String,
    pub until: Instant,
    pub app: bool,
}

/// Online verify sessions by id (the comparison itself is `verify`).
#[derive(Default)]
pub struct VerifySessions {
    sessions: Mutex<HashMap<u64, ferry_api::agent::VerifySession>>,
    /// The settings' verify order being followed (see `Machine::follow_verify_order`).
    pub(crate) order: Mutex<Option<ferry_api::agent::VerifyOrderStatus>>,
}

impl VerifySessions {
    pub(crate) fn lock(&self) -> std::sync::MutexGuard<'_, HashMap<u64, ferry_api::agent::VerifySession>> {
        self.sessions.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn get(&self, id: u64) -> Option<ferry_api::agent::VerifySession> {
        self.lock().get(&id).cloned()
    }

    pub(crate) fn order(&self) -> std::sync::MutexGuard<'_, Option<ferry_api::agent::VerifyOrderStatus>> {
        self.order.lock().unwrap_or_else(|p| p.into_inner())
    }
}

pub struct Machine {
    pub name: MachineName,
    pub disks: Vec<Disk>,
    pub(crate) config: AgentConfig,
    core: Mutex<Core>,
    /// Wakes the sender: records are waiting.
    pub(crate) records_ready: Notify,
    /// Wakes the resync thread: mode changed or log space freed.
    resync_wake: Condvar,
    pub(crate) stopped: AtomicBool,
    pub(crate) verify: VerifySessions,
    /// Wakes writers held by a group prepare.
    pub(crate) hold_released: Condvar,
    /// One quiesce or lift at a time (their hooks run outside the core lock).
    pub(crate) quiesce_op: Mutex<()>,
    /// The link to the configuration server and the revocations held, for the status (set
    /// once the settings watch runs).
    pub(crate) server_link: std::sync::OnceLock<(ferry_status::SettingsLink, Arc<ferry_tls::Revoked>)>,
    /// TEST/DIAGNOSTIC: every local write with its seq (see `AgentConfig::source_write_log`).
    #[cfg(feature = "testing")]
    source_log: Option<Mutex<crate::testing::SourceLog>>,
}

fn extents_of(disk: u16, offset: u64, len: u64, ext: u64) -> impl Iterator<Item = (u16, u64)> {
    let first = offset / ext;
    let last = (offset + len.max(1) - 1) / ext;
    (first..=last).map(move |e| (disk, e))
}

impl Machine {
    /// Open the machine's disks and state; recover after a crash (activity-log regions are marked
    /// for resync); refuse a resized disk.
    pub fn open(config: AgentConfig) -> Result<Arc<Machine>, AgentError> {
        // Before any state is touched: a refused start must leave the agent's state as it was.
        #[cfg(not(feature = "testing"))]
        if config.source_write_log.is_some() {
            return Err(crate::testing_only("source_write_log"));
        }
        #[cfg(not(feature = "testing"))]
        if config.shipping_paused {
            return Err(crate::testing_only("shipping_paused"));
        }
        #[cfg(not(feature = "testing"))]
        if let Some(d) = config.disks.iter().find(|d| matches!(d.cache, crate::config::DiskCache::Volatile)) {
            return Err(crate::testing_only(&format!("cache = \"volatile\" (disk {})", d.name)));
        }
        if config.disks.is_empty() {
            return Err(AgentError::Config(
                "no disks configured: add at least one [[disks]] entry with name and path".into(),
            ));
        }
        if config.disks.len() > u16::MAX as usize {
            return Err(AgentError::Config("too many disks".into()));
        }
        validate_limits(&config)?;
        ferry_sys::fs::private_dir(&config.state_dir)
            .map_err(|source| AgentError::Io { path: config.state_dir.clone(), source })?;
        let state_path = config.state_dir.join("state.json");
        if config.protection_disabled {
            if config.process_server.is_some() || config.failover_seed.is_some() {
                return Err(AgentError::Config(
                    "protection_disabled = true with a process_server or failover_seed: a disabled machine ships nothing; remove those keys (or protect the machine again, which clears protection_disabled)".into(),
                ));
            }
            // Its replica is gone: what this state says was shipped no longer holds anywhere.
            for f in ["state.json", "activity.log", "dirty.map"] {
                let p = config.state_dir.join(f);
                match std::fs::remove_file(&p) {
                    Ok(()) => {}
                    Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
                    Err(source) => return Err(AgentError::Io { path: p, source }),
                }
            }
            ferry_sys::fs::sync_dir(&config.state_dir).map_err(crate::io_at(&config.state_dir))?;
        }
        let previous: Option<PersistentState> = match std::fs::read(&state_path) {
            Ok(d) => Some(
                serde_json::from_slice(&d)
                    .map_err(|e| AgentError::Config(format!("{} is corrupt: {e}", state_path.display())))?,
            ),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(source) => return Err(AgentError::Io { path: state_path, source }),
        };
        let mut disks = Vec::new();
        for (i, dc) in config.disks.iter().enumerate() {
            if config.disks[..i].iter().any(|d| d.name == dc.name) {
                return Err(AgentError::Config(format!("disk name {:?} is used twice", dc.name)));
            }
            let open_err = |e: BackendError| {
                AgentError::Disk {
                path: dc.path.clone(),
                error: format!("cannot open disk {}: {e}; check its path in [[disks]] and that the file exists and is readable and writable", dc.name),
            }
            };
            let writer = ferry_sys::fs::WriterLock::open(&dc.path, &format!("agent {}", config.machine))
                .map_err(|e| AgentError::Disk { path: dc.path.clone(), error: e.to_string() })?;
            let backend: Arc<dyn Backend> = match dc.cache {
                DiskCache::PageCache => Arc::new(ferry_nbd::FileBackend::open(&dc.path, false).map_err(open_err)?),
                #[cfg(feature = "testing")]
                DiskCache::Volatile => Arc::new(ferry_nbd::VolatileCacheFileBackend::open(&dc.path).map_err(open_err)?),
                #[cfg(not(feature = "testing"))]
                DiskCache::Volatile => return Err(crate::testing_only("cache = \"volatile\"")),
            };
            let size = backend.size();
            let known = previous.as_ref().and_then(|p| p.disks.iter().find(|d| d.name == *dc.name));
            if let Some(k) = known {
                if k.size != size {
                    return Err(AgentError::Config(format!(
                        "disk {} ({}) was resized from {} to {} bytes while protected: resizing needs re-protection — restore the original size, or disable protection and protect the machine again",
                        dc.name, dc.path.display(), k.size, size
                    )));
                }
            }
            if size / TRACK_BLOCK > u32::MAX as u64 {
                return Err(AgentError::Config(format!(
                    "disk {} is larger than 16 TiB, the largest Ferry tracks",
                    dc.name
                )));
            }
            let uuid = dc.uuid.clone().or_else(|| known.map(|k| k.uuid.clone())).unwrap_or_else(new_uuid);
            disks.push(Disk { name: dc.name.clone(), size, uuid, path: dc.path.clone(), backend, _writer: writer });
        }
        if let Some(p) = &previous {
            let now: Vec<&str> = disks.iter().map(|d| d.name.as_str()).collect();
            let before: Vec<&str> = p.disks.iter().map(|d| d.name.as_str()).collect();
            if now != before {
                return Err(AgentError::Config(format!(
                    "the machine's disks changed from {before:?} to {now:?}: adding or removing a disk needs re-protection (disable protection, then protect again)"
                )));
            }
        }
        let al_path = config.state_dir.join("activity.log");
        let al_lost = previous.is_some() && !al_path.exists();
        let (mut al, recovered) = ActivityLog::open(&al_path, config.al_extents)?;
        let mut dirty = DirtyMap::load(&config.state_dir.join("dirty.map"), disks.len())?;
        let ext = config.al_extent_bytes.max(TRACK_BLOCK);
        for (disk, e) in &recovered {
            if let Some(d) = disks.get(*disk as usize) {
                let off = e * ext;
                if off < d.size {
                    dirty.mark(*disk as usize, off, ext.min(d.size - off));
                }
            }
        }
        if al_lost {
            // Without the activity log nothing bounds what may differ: compare and copy whole
            // disks (holes travel as zeroing, without reading them).
            for (i, d) in disks.iter().enumerate() {
                dirty.mark(i, 0, d.size);
            }
        }
        let seed = read_seed(&config, &disks)?;
        // A failed-over machine whose agent state is gone although it ran (its report exists):
        // what it wrote at the recovery site is unknown, so everything counts as changed.
        let ran_before =
            previous.is_none() && seed.is_some() && config.recovery_writes_file.as_ref().is_some_and(|p| p.exists());
        if ran_before {
            for (i, d) in disks.iter().enumerate() {
                dirty.mark(i, 0, d.size);
            }
        }
        // Another copy's point now on these disks (a failback: the reverse replica's point on
        // the original machine's own disks): the state here describes a history the disks no
        // longer hold. It starts as a failed-over machine's first start — a new lineage forked
        // from the seed's, tracking what changes after the point — and its old regions go.
        // (A change of point of this same failed-over copy names the lineage it forked from,
        // its parent: its own tracking stays and the new seed adds to it.)
        let new_copy = matches!((&previous, &seed), (Some(st), Some(s))
            if s.lineage != 0
                && st.failover_seed.as_deref() != Some(s.point.as_str())
                && st.lineage.as_ref().map(|l| l.id) != Some(s.lineage)
                && st.lineage.as_ref().and_then(|l| l.parent).map(|p| p.0) != Some(s.lineage));
        let previous = if new_copy {
            for b in dirty.disks.iter_mut() {
                b.clear();
            }
            tracing::info!(machine = %config.machine, "the disks hold another copy's point (a failback): starting a new lineage from it");
            None
        } else {
            previous
        };
        // A reprotect's seed: counted once, before the mode is chosen (it makes a resync run).
        let own_lineage = previous.as_ref().and_then(|p| p.lineage.as_ref()).map(|l| format!("{:016x}", l.id));
        let resync_seed = config.resync_seed.clone().filter(|s| {
            previous.as_ref().and_then(|p| p.resync_seed.as_deref()) != Some(s.order.as_str())
                && s.lineage.as_ref().is_none_or(|l| Some(l) == own_lineage.as_ref())
        });
        if let Some(s) =
            config.resync_seed.as_ref().filter(|s| s.lineage.as_ref().is_some_and(|l| Some(l) != own_lineage.as_ref()))
        {
            tracing::info!(order = %s.order, "a resync seed for another copy of these disks is ignored");
        }
        let mut resync_seeded = None;
        if let Some(seed) = &resync_seed {
            // Checked whole before anything is marked. A seed this agent cannot use never stops
            // it (the machine it serves runs production now): every block is resynced instead,
            // holes as zeroing — slower, never wrong.
            let mut marks: Vec<(usize, u64, u64)> = Vec::new();
            let checked = (|| -> Result<(String, u64), AgentError> {
                if seed.replace_tracking {
                    // It replaces what this agent knows only if it compares every block.
                    for d in &disks {
                        let mut regions: Vec<(u64, u64)> =
                            seed.compare.iter().filter(|c| *c.disk == *d.name).map(|c| (c.offset, c.length)).collect();
                        regions.sort_unstable();
                        let mut at = 0;
                        for (o, l) in regions {
                            if o != at {
                                break;
                            }
                            at = o.saturating_add(l);
                        }
                        if at != d.size || !seed.extents.iter().all(|e| disks.iter().any(|d| *d.name == *e.disk)) {
                            return Err(AgentError::Config(format!(
                                "the resync seed of order {} replaces the tracking but does not compare all of disk {} ({} of {} bytes in order)",
                                seed.order, d.name, at, d.size
                            )));
                        }
                    }
                }
                let mut bytes = 0;
                for e in &seed.extents {
                    let Some(i) = disks.iter().position(|d| *d.name == *e.disk) else {
                        return Err(AgentError::Config(format!(
                            "the resync seed of order {} names disk {:?}, which is not configured",
                            seed.order, e.disk
                        )));
                    };
                    if e.offset.checked_add(e.length).is_none_or(|end| end > disks[i].size) {
                        return Err(AgentError::Config(format!(
                            "the resync seed of order {}: extent {}+{} lies outside disk {} ({} bytes)",
                            seed.order, e.offset, e.length, e.disk, disks[i].size
                        )));
                    }
                    marks.push((i, e.offset, e.length));
                    bytes += e.length;
                }
                // Compared regions: only the blocks that differ from the other side's.
                let mut compared = 0;
                for c in &seed.compare {
                    let Some(i) = disks.iter().position(|d| *d.name == *c.disk) else {
                        return Err(AgentError::Config(format!(
                            "the resync seed of order {} names disk {:?}, which is not configured",
                            seed.order, c.disk
                        )));
                    };
                    let theirs = crate::block_hash::from_hex(&c.hashes).ok_or_else(|| {
                        AgentError::Config(format!(
                            "the resync seed of order {}: the hashes of {}+{} are not hex",
                            seed.order, c.offset, c.length
                        ))
                    })?;
                    if c.offset.checked_add(c.length).is_none_or(|end| end > disks[i].size) {
                        return Err(AgentError::Config(format!(
                            "the resync seed of order {}: region {}+{} lies outside disk {} ({} bytes)",
                            seed.order, c.offset, c.length, c.disk, disks[i].size
                        )));
                    }
                    let runs = crate::block_hash::differing(disks[i].backend.as_ref(), c.offset, c.length, &theirs)
                        .map_err(|e| AgentError::Config(format!("the resync seed of order {}: {e}", seed.order)))?;
                    compared += c.length;
                    for (off, len) in runs {
                        marks.push((i, off, len));
                        bytes += len;
                    }
                }
                let reason = if compared > 0 {
                    format!("{} ({compared} byte(s) compared by block hash)", seed.reason)
                } else {
                    seed.reason.clone()
                };
                Ok((reason, bytes))
            })();
            match checked {
                Ok((reason, bytes)) => {
                    if seed.replace_tracking {
                        // The comparison saw every block: what it found is what differs.
                        for b in dirty.disks.iter_mut() {
                            b.clear();
                        }
                    }
                    for (i, off, len) in marks {
                        dirty.mark(i, off, len);
                    }
                    resync_seeded = Some((seed.order.clone(), reason, bytes));
                }
                Err(e) => {
                    tracing::error!(order = %seed.order, error = %e, "unusable resync seed: every block will be resynced");
                    let mut bytes = 0;
                    for (i, d) in disks.iter().enumerate() {
                        dirty.mark(i, 0, d.size);
                        bytes += d.size;
                    }
                    resync_seeded = Some((seed.order.clone(), format!("{e}: every block is resynced instead"), bytes));
                }
            }
        }
        let (mut state, mode, reason) = match previous {
            // A failed-over machine's first start: its disks hold the point; what differs from
            // the primary is the seed (the extents after the point), not the whole disk.
            None if seed.is_some() => {
                let mut st = PersistentState::first(&disks, true);
                st.lineage = seed.as_ref().map(|s| StateLineage {
                    id: rand::random::<u64>() | 1,
                    parent: (s.lineage != 0).then_some((s.lineage, s.point_seq)),
                    ancestors: s
                        .lineage_ancestors
                        .iter()
                        .copied()
                        .take(ferry_protocol::LINEAGE_HISTORY.saturating_sub(1))
                        .collect(),
                });
                (st, Mode::Tracking, ResyncReason::AgentRecovery)
            }
            None => {
                // First start: everything allocated is copied; holes are skipped (the master
                // target starts from sparse, all-zero target disks).
                for (i, d) in disks.iter().enumerate() {
                    mark_allocated(&mut dirty, i, d)?;
                }
                let st = PersistentState::first(&disks, false);
                (st, Mode::InitialSync, ResyncReason::InitialSync)
            }
            Some(st) if !st.initial_sync_complete => (st, Mode::InitialSync, ResyncReason::InitialSync),
            Some(st) if !dirty.is_empty() || st.resync_open_seq.is_some() => {
                let reason = if al_lost {
                    ResyncReason::StateLost
                } else if recovered.is_empty() {
                    ResyncReason::LogOverflow
                } else {
                    ResyncReason::AgentRecovery
                };
                (st, Mode::Resync, reason)
            }
            Some(st) => (st, Mode::Replicating, ResyncReason::AgentRecovery),
        };
        let mut seeded_bytes = None;
        if let Some(seed) = seed.filter(|s| state.failover_seed.as_deref() != Some(s.point.as_str())) {
            let mut bytes = 0;
            for e in &seed.extents {
                if let Some(i) = disks.iter().position(|d| *d.name == *e.disk) {
                    dirty.mark(i, e.offset, e.length);
                    bytes += e.length;
                }
            }
            state.failover_seed = Some(seed.point.clone());
            seeded_bytes = Some((seed.point, bytes));
        }
        if ran_before {
            state.tracking_lost = Some(
                "the agent's state was lost after the machine ran at the recovery site: what it wrote there is not known"
                    .into(),
            );
        }
        if let Some((order, _, _)) = &resync_seeded {
            state.resync_seed = Some(order.clone());
            if resync_seed.as_ref().is_some_and(|s| s.replace_tracking) {
                state.tracking_lost = None;
            }
        }
        // A copy without a lineage (a first start, or state from before lineage) gets one.
        if state.lineage.is_none() {
            state.lineage = Some(StateLineage { id: rand::random::<u64>() | 1, parent: None, ancestors: Vec::new() });
        }
        // Without a process server nothing ships: every write is tracked.
        let mode = match (config.protection_disabled, config.process_server.is_none()) {
            (true, _) => Mode::Disabled,
            (false, true) => Mode::Tracking,
            (false, false) => mode,
        };
        // The recovered regions are now in the persisted bitmap: the activity log can start empty.
        dirty.save()?;
        al.clear()?;
        let next_seq = al.reserved_seq() + 1;
        al.reserve_seq(next_seq + SEQ_RESERVATION)?;
        ferry_sys::fs::write_atomic(
            &state_path,
            &serde_json::to_vec_pretty(&state).map_err(|e| AgentError::Config(e.to_string()))?,
        )
        .map_err(crate::io_at(&state_path))?;
        let mut events = VecDeque::new();
        if let Some((point, bytes)) = seeded_bytes {
            events.push_back(EventEntry {
                time_ms: now_ms(),
                kind: "failover-seed".into(),
                message: format!("failed over at {point}: {bytes} byte(s) written after it count as changed"),
            });
        }
        if let Some((order, reason, bytes)) = resync_seeded {
            events.push_back(EventEntry {
                time_ms: now_ms(),
                kind: "resync-seed".into(),
                message: format!("{reason} (order {order}): {bytes} byte(s) more to resync"),
            });
        }
        if al_lost {
            let msg = format!("{} is missing although the machine was protected: all allocated regions will be compared and copied again", al_path.display());
            tracing::warn!("{msg}");
            events.push_back(EventEntry { time_ms: now_ms(), kind: "state-lost".into(), message: msg });
        }
        if !recovered.is_empty() {
            let bytes = recovered.len() as u64 * ext;
            tracing::warn!(
                extents = recovered.len(),
                bytes,
                "recovered from an unclean stop: activity-log regions will be resynced"
            );
            events.push_back(EventEntry {
                time_ms: now_ms(),
                kind: "agent-recovery".into(),
                message: format!(
                    "unclean stop: {} activity-log extents ({} bytes at most) will be resynced",
                    recovered.len(),
                    bytes
                ),
            });
        }
        let was_quiesced = state.quiesced.clone();
        let core = Core {
            next_seq,
            al,
            al_index: HashMap::new(),
            dirty,
            dirty_unsaved: false,
            log: VecDeque::new(),
            log_bytes: 0,
            awaiting_target: VecDeque::new(),
            ack: Ack::default(),
            mode,
            resync_reason: reason,
            resync: None,
            state,
            state_path,
            events,
            connected: false,
            throttled: false,
            link_error: None,
            last_record_seq: 0,
            unapplied: VecDeque::new(),
            rate_in: RateMeter::default(),
            rate_out: RateMeter::default(),
            shipped_bytes: 0,
            sent_seq: 0,
            resync_bytes_sent: 0,
            resync_bytes_zeroed: 0,
            completed_resyncs: VecDeque::new(),
            bulk: VecDeque::new(),
            bulk_bytes: 0,
            next_bulk_id: 1,
            pending_end_seq: None,
            write_stamp: 0,
            lease_until_ms: 0,
            last_write_ms: 0,
            hold: None,
            quiesced: was_quiesced,
            prepared_tags: VecDeque::new(),
            points: Default::default(),
        };
        #[cfg(feature = "testing")]
        let source_log = match &config.source_write_log {
            Some(p) => Some(Mutex::new(crate::testing::SourceLog::open(p)?)),
            None => None,
        };

        Ok(Arc::new(Machine {
            name: config.machine.clone(),
            disks,
            config,
            core: Mutex::new(core),
            records_ready: Notify::new(),
            resync_wake: Condvar::new(),
            stopped: AtomicBool::new(false),
            verify: VerifySessions::default(),
            hold_released: Condvar::new(),
            quiesce_op: Mutex::new(()),
            server_link: std::sync::OnceLock::new(),
            #[cfg(feature = "testing")]
            source_log,
        }))
    }

    pub(crate) fn lock(&self) -> MutexGuard<'_, Core> {
        self.core.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub fn descriptor(&self) -> MachineDescriptor {
        MachineDescriptor {
            name: self.name.to_string(),
            disks: self
                .disks
                .iter()
                .map(|d| DiskDescriptor { name: d.name.to_string(), size: d.size, uuid: d.uuid.clone() })
                .collect(),
        }
    }

    /// This copy's lineage, as a hello announces it.
    pub fn lineage(&self) -> ferry_protocol::Lineage {
        let c = self.lock();
        let l = c.state.lineage.clone().unwrap_or(StateLineage { id: 0, parent: None, ancestors: Vec::new() });
        ferry_protocol::Lineage {
            id: l.id,
            parent: l.parent.map(|(id, seq)| ferry_protocol::LineageParent { id, seq }),
            ancestors: l.ancestors.iter().map(|&(id, seq)| ferry_protocol::LineageParent { id, seq }).collect(),
            initial_sync: !c.state.initial_sync_complete,
        }
    }

    pub fn generation(&self) -> u64 {
        self.lock().state.generation
    }

    /// Largest zeroing submitted as one record: a quarter of the activity log's reach.
    pub(crate) fn max_zero_piece(&self) -> u64 {
        ((self.config.al_extents as u64 / 4).max(1) * self.ext_bytes()).max(TRACK_BLOCK)
    }

    fn ext_bytes(&self) -> u64 {
        self.config.al_extent_bytes.max(TRACK_BLOCK)
    }

    // ---- the write path -------------------------------------------------------------------

    /// This agent's clock (ms since the epoch; a test build may be told it is off).
    pub(crate) fn clock_ms(&self) -> u64 {
        now_ms().saturating_add_signed(ferry_sys::fail::clock_offset_ms())
    }

    /// Make the write lease cover now: renewed (durably, a small file) when less than half of
    /// it is left, so a stopped machine's last write is known to within [`WRITE_LEASE_MS`]
    /// — what a reprotect reads to tell a split brain from the expected loss.
    fn ensure_write_lease(&self, c: &mut Core) -> Result<(), AgentError> {
        let now = self.clock_ms();
        c.last_write_ms = now;
        if now + WRITE_LEASE_MS / 2 < c.lease_until_ms {
            return Ok(());
        }
        let until = now + WRITE_LEASE_MS;
        write_lease(&self.config.state_dir, until)?;
        c.lease_until_ms = until;
        Ok(())
    }

    /// Sequence, protect and submit a write or zeroing, then log or track it.
    pub(crate) fn submit(
        &self,
        disk: u16,
        offset: u64,
        len: u64,
        data: Option<&[u8]>,
        may_trim: bool,
        fua: bool,
    ) -> Result<(), BackendError> {
        let d = &self.disks[disk as usize];
        let mut c = self.lock();
        // A multi-machine prepare holds writes until its commit or abort, never past its expiry
        // (the expiry thread then clears it and thaws; see `points::expire_hold`).
        while let Some(until) = c.hold.as_ref().map(|h| h.until) {
            let now = std::time::Instant::now();
            if now >= until {
                break;
            }
            c = self.hold_released.wait_timeout(c, until - now).map(|(g, _)| g).unwrap_or_else(|p| p.into_inner().0);
        }
        if let Some(q) = &c.quiesced {
            return Err(BackendError::Refused(format!(
                "machine {} is quiesced for failover {} (its last write is seq {}): it takes no writes",
                self.name, q.order, q.last_seq
            )));
        }
        self.ensure_active(&mut c, disk, offset, len)
            .map_err(|e| BackendError::Io(std::io::Error::other(e.to_string())))?;
        self.ensure_write_lease(&mut c).map_err(|e| BackendError::Io(std::io::Error::other(e.to_string())))?;
        let seq = self.alloc_seq(&mut c).map_err(|e| BackendError::Io(std::io::Error::other(e.to_string())))?;
        let result = match data {
            Some(buf) => d.backend.write(offset, buf, fua),
            None => d.backend.write_zeroes(offset, len, may_trim, fua),
        };
        if let Err(e) = result {
            // The local write may have partly happened: whatever the source now holds there is
            // the truth, so the region is resynced rather than shipped.
            c.dirty.mark(disk as usize, offset, len);
            c.dirty_unsaved = true;
            for key in extents_of(disk, offset, len, self.ext_bytes()) {
                if let Some(a) = c.al_index.get_mut(&key) {
                    a.bitmap_unsaved = true;
                }
            }
            if c.mode == Mode::Replicating {
                c.mode = Mode::Resync;
                c.resync_reason = ResyncReason::LocalWriteError;
            }
            push_event(
                &mut c,
                "local-write-error",
                format!("write to {} at {offset} (+{len}) failed: {e}; the region will be resynced", d.name),
            );
            drop(c);
            self.resync_wake.notify_all();
            return Err(e);
        }
        #[cfg(feature = "testing")]
        if let Some(log) = &self.source_log {
            log.lock().unwrap_or_else(|p| p.into_inner()).write(seq, disk, offset, len, data);
        }
        c.write_stamp += 1;
        let stamp = c.write_stamp;
        for key in extents_of(disk, offset, len, self.ext_bytes()) {
            if let Some(e) = c.al_index.get_mut(&key) {
                e.writes = stamp;
            }
        }
        c.rate_in.add(len);
        let body = match data {
            Some(buf) => RecordBody::Write { disk, offset, data: buf.to_vec() },
            None => RecordBody::Zero { disk, offset, len },
        };
        let record_bytes = if data.is_some() { len } else { 64 };
        if c.mode == Mode::Replicating && c.log_bytes + record_bytes <= self.config.log_limit_bytes {
            self.push(&mut c, seq, body);
        } else {
            if c.mode == Mode::Replicating {
                self.overflow(&mut c);
            }
            c.dirty.mark(disk as usize, offset, len);
            c.dirty_unsaved = true;
            for key in extents_of(disk, offset, len, self.ext_bytes()) {
                if let Some(e) = c.al_index.get_mut(&key) {
                    e.bitmap_unsaved = true;
                }
            }
        }
        drop(c);
        self.records_ready.notify_one();
        Ok(())
    }

    fn alloc_seq(&self, c: &mut Core) -> Result<u64, JournalError> {
        let seq = c.next_seq;
        if seq >= c.al.reserved_seq() {
            c.al.reserve_seq(seq + SEQ_RESERVATION)?;
        }
        c.next_seq += 1;
        Ok(seq)
    }

    /// Append a record to the in-order log (its extents must be active).
    fn push(&self, c: &mut Core, seq: u64, body: RecordBody) {
        let (extents, bytes) = match &body {
            RecordBody::Write { disk, offset, data } => {
                (extents_of(*disk, *offset, data.len() as u64, self.ext_bytes()).collect(), data.len() as u64)
            }
            RecordBody::Zero { disk, offset, len } => {
                (extents_of(*disk, *offset, *len, self.ext_bytes()).collect(), 64)
            }
            other => (Vec::new(), 64 + other.data_len()),
        };
        for key in &extents {
            if let Some(e) = c.al_index.get_mut(key) {
                e.pending += 1;
            }
        }
        let time_ms = now_ms();
        // Bounded: when the applier is far behind, the oldest samples still give the lag.
        if c.unapplied.len() < 1_000_000 {
            c.unapplied.push_back((seq, time_ms));
        }
        c.last_record_seq = seq;
        c.log_bytes += bytes;
        c.log.push_back(LogEntry { record: Record { seq: ferry_protocol::Seq(seq), time_ms, body }, extents, bytes });
    }

    /// Make sure the extents covering a range are active in the activity log (durably).
    fn ensure_active(&self, c: &mut Core, disk: u16, offset: u64, len: u64) -> Result<(), JournalError> {
        // Fast path (nearly every write): all extents already active, nothing to allocate.
        if extents_of(disk, offset, len, self.ext_bytes()).all(|k| c.al_index.contains_key(&k)) {
            return Ok(());
        }
        // The request's own extents are pinned: retiring to make room must never free one of them.
        let keys: Vec<(u16, u64)> = extents_of(disk, offset, len, self.ext_bytes()).collect();
        let missing: Vec<(u16, u64)> = keys.iter().filter(|k| !c.al_index.contains_key(k)).copied().collect();
        if missing.is_empty() {
            return Ok(());
        }
        if c.al.free_count() < missing.len() {
            // Retire what can be retired (flush disks, persist the bitmap); if everything active
            // still has unacknowledged records, fall back to the bitmap.
            self.retire_extents(c, &keys)?;
            if c.al.free_count() < missing.len() {
                self.overflow(c);
                self.retire_extents(c, &keys)?;
            }
        }
        // One fdatasync for all of them.
        let slots = c.al.activate_many(&missing)?;
        // The slots are durable; the data write they cover has not happened yet.
        ferry_sys::fail::fail_point("agent.activity-log.slot-before-data");
        for (key, slot) in missing.into_iter().zip(slots) {
            c.al_index.insert(key, AlEntry { slot, ..Default::default() });
        }
        Ok(())
    }

    /// Abandon in-order shipping: every unacknowledged record's region goes to the change
    /// bitmap and a resync will copy them. The replica keeps the consistent prefix it has.
    fn overflow(&self, c: &mut Core) {
        let dropped = c.log.len();
        let bytes = c.log_bytes;
        while let Some(e) = c.log.pop_front() {
            match &e.record.body {
                RecordBody::Write { disk, offset, data } => c.dirty.mark(*disk as usize, *offset, data.len() as u64),
                RecordBody::Zero { disk, offset, len } => c.dirty.mark(*disk as usize, *offset, *len),
                _ => {}
            }
            for key in &e.extents {
                if let Some(a) = c.al_index.get_mut(key) {
                    a.pending = a.pending.saturating_sub(1);
                    a.bitmap_unsaved = true;
                }
            }
        }
        c.log_bytes = 0;
        // What the process server holds but the master target may not goes to the bitmap too:
        // after a fallback, everything not known at the recovery site is in the bitmap.
        while let Some(a) = c.awaiting_target.pop_front() {
            c.dirty.mark(a.disk as usize, a.offset, a.len);
            for key in &a.extents {
                if let Some(e) = c.al_index.get_mut(key) {
                    e.pending = e.pending.saturating_sub(1);
                    e.bitmap_unsaved = true;
                }
            }
        }
        c.dirty_unsaved = true;
        c.unapplied.clear();
        self.requeue_bulk_locked(c);
        // A resync that was running restarts with a new ResyncBegin (its own may have been dropped).
        c.resync = None;
        if c.mode == Mode::Replicating {
            c.mode = Mode::Resync;
            c.resync_reason = ResyncReason::LogOverflow;
        }
        // Resend from the ack point: the sender must not skip what the process server lacks.
        c.sent_seq = c.ack.durable_seq.get();
        let msg = format!(
            "in-order log overflowed ({dropped} records, {bytes} bytes unacknowledged; limit {} bytes): falling back to the change bitmap; changed regions will be resynced when the process server catches up",
            self.config.log_limit_bytes
        );
        tracing::warn!(machine = %self.name, "{msg}");
        push_event(c, "log-overflow", msg);
        self.resync_wake.notify_all();
    }

    /// Persist the change bitmap if it changed; extents then no longer wait for it.
    fn save_bitmap(&self, c: &mut Core) -> Result<(), JournalError> {
        if c.dirty_unsaved {
            c.dirty.save()?;
            c.dirty_unsaved = false;
            for e in c.al_index.values_mut() {
                e.bitmap_unsaved = false;
            }
        }
        Ok(())
    }

    /// Extents whose changes are all durable elsewhere, with their write counters.
    fn retire_candidates(c: &Core, pinned: &[(u16, u64)]) -> Vec<((u16, u64), u64)> {
        c.al_index
            .iter()
            .filter(|(k, e)| e.pending == 0 && !e.bitmap_unsaved && !pinned.contains(k))
            .map(|(k, e)| (*k, e.writes))
            .collect()
    }

    fn flush_disks(&self) -> Result<(), JournalError> {
        for d in &self.disks {
            d.backend
                .flush()
                .map_err(|e| JournalError::Io { path: d.path.clone(), source: std::io::Error::other(e.to_string()) })?;
        }
        Ok(())
    }

    /// Retire the candidates a completed flush covered (no write since the snapshot).
    fn retire(c: &mut Core, flushed: Vec<((u16, u64), u64)>) -> Result<(), JournalError> {
        for (key, writes) in flushed {
            let still_idle =
                c.al_index.get(&key).is_some_and(|e| e.pending == 0 && !e.bitmap_unsaved && e.writes == writes);
            if still_idle {
                if let Some(e) = c.al_index.remove(&key) {
                    c.al.deactivate(e.slot)?;
                }
            }
        }
        Ok(())
    }

    /// Make room in the activity log now (under the lock): persist the bitmap, flush the disks,
    /// and free extents whose changes are all durable elsewhere — never the `pinned` ones.
    fn retire_extents(&self, c: &mut Core, pinned: &[(u16, u64)]) -> Result<(), JournalError> {
        self.save_bitmap(c)?;
        let candidates = Self::retire_candidates(c, pinned);
        if candidates.is_empty() {
            return Ok(());
        }
        self.flush_disks()?;
        Self::retire(c, candidates)
    }

    /// Periodic maintenance: persist the bitmap; when due (interval, or the activity log half
    /// full), flush the disks outside the lock, then retire extents whose last write that flush
    /// covered.
    pub(crate) fn maintenance(&self, retire_due: bool) -> Result<(), JournalError> {
        let snapshot = {
            let mut c = self.lock();
            self.save_bitmap(&mut c)?;
            if !retire_due && c.al.active_count() * 2 < c.al.capacity() {
                return Ok(());
            }
            Self::retire_candidates(&c, &[])
        };
        if snapshot.is_empty() {
            return Ok(());
        }
        self.flush_disks()?;
        Self::retire(&mut self.lock(), snapshot)
    }

    // ---- acknowledgements and the sender ---------------------------------------------------

    /// The process server acknowledged: release durable records from the log.
    pub(crate) fn on_ack(&self, ack: Ack) {
        let mut c = self.lock();
        // An acknowledgement of a seq this agent never handed out is another history's (a new
        // process server passes the master target's head on): jump past it before taking it
        // as confirmation of anything.
        let highest = ack.durable_seq.max(ack.target_durable_seq).get();
        if highest >= c.next_seq {
            let who = if ack.target_durable_seq.get() >= c.next_seq { "master target" } else { "process server" };
            self.jump_past(&mut c, highest, who);
        }
        if ack.durable_seq > c.ack.durable_seq {
            c.ack.durable_seq = ack.durable_seq;
        }
        c.ack.target_durable_seq = c.ack.target_durable_seq.max(ack.target_durable_seq);
        c.ack.applied_seq = c.ack.applied_seq.max(ack.applied_seq);
        let durable = c.ack.durable_seq;
        while c.log.front().is_some_and(|e| e.record.seq <= durable) {
            if let Some(e) = c.log.pop_front() {
                c.log_bytes -= e.bytes;
                let range = match &e.record.body {
                    RecordBody::Write { disk, offset, data } => Some((*disk, *offset, data.len() as u64)),
                    RecordBody::Zero { disk, offset, len } => Some((*disk, *offset, *len)),
                    _ => None,
                };
                if let (Some((disk, offset, len)), false) = (range, e.extents.is_empty()) {
                    let seq = e.record.seq.get();
                    c.awaiting_target.push_back(AwaitingTarget { seq, disk, offset, len, extents: e.extents });
                }
            }
        }
        // The master target has these: their extents may retire.
        let at_target = c.ack.target_durable_seq.get();
        while c.awaiting_target.front().is_some_and(|a| a.seq <= at_target) {
            if let Some(a) = c.awaiting_target.pop_front() {
                for key in &a.extents {
                    if let Some(e) = c.al_index.get_mut(key) {
                        e.pending = e.pending.saturating_sub(1);
                    }
                }
            }
        }
        if c.awaiting_target.len() > MAX_AWAITING_TARGET {
            // The master target is far behind: keep the regions in the bitmap instead.
            self.overflow(&mut c);
        }
        // A run is closed once the master target has its end (not merely the process server).
        if c.pending_end_seq.is_some_and(|e| c.ack.target_durable_seq >= ferry_protocol::Seq(e)) {
            c.pending_end_seq = None;
            c.state.resync_open_seq = None;
            if let Err(e) = self.save_state(&c) {
                tracing::error!(machine = %self.name, error = %e, "cannot persist agent state");
            }
        }
        let applied = c.ack.applied_seq;
        while c.unapplied.front().is_some_and(|(s, _)| *s <= applied.get()) {
            c.unapplied.pop_front();
        }
        drop(c);
        self.resync_wake.notify_all();
    }

    /// The chain already holds seq `held`, at or beyond this agent's counter (its state was lost
    /// or restored from a copy, maybe with the process server's spool): continue after it, or new
    /// writes would be taken as resends — never forwarded (the process server resumes after the
    /// master target's head) yet acknowledged as durable there.
    fn jump_past(&self, c: &mut Core, held: u64, who: &str) {
        let msg = format!(
            "the {who} already holds seq {held}, beyond this agent's counter {}: continuing after it",
            c.next_seq
        );
        tracing::warn!(machine = %self.name, "{msg}");
        push_event(c, "sequence-jump", msg);
        // Whatever was queued or awaits confirmation under the old numbers would be taken for
        // resends and dropped: turn it into bitmap regions, copied again in a new run numbered
        // after the chain.
        self.overflow(c);
        if c.mode == Mode::Resync {
            c.resync_reason = ResyncReason::StateLost;
        }
        c.next_seq = held + 1;
        c.sent_seq = c.sent_seq.max(c.ack.durable_seq.get());
        let reserve = c.next_seq + SEQ_RESERVATION;
        if let Err(e) = c.al.reserve_seq(reserve) {
            tracing::error!(error = %e, "cannot persist the sequence reservation");
        }
    }

    /// Downstream lost acknowledged changes: copy the whole disks again (holes as zeroing).
    pub(crate) fn on_peer_state_lost(&self, detail: &str) {
        let mut c = self.lock();
        let msg = format!("{detail}; copying the whole disks again");
        tracing::error!(machine = %self.name, "{msg}");
        push_event(&mut c, "peer-state-lost", msg);
        self.mark_everything(&mut c);
        drop(c);
        self.resync_wake.notify_all();
    }

    fn mark_everything(&self, c: &mut Core) {
        for (i, d) in self.disks.iter().enumerate() {
            c.dirty.mark(i, 0, d.size);
        }
        c.dirty_unsaved = true;
        if let Err(e) = self.save_bitmap(c) {
            tracing::error!(machine = %self.name, error = %e, "cannot persist the change bitmap");
        }
        self.overflow(c);
        if c.mode == Mode::Resync {
            c.resync_reason = ResyncReason::StateLost;
        }
    }

    /// A (re)connection to the process server: resume after its durable seq, and check that
    /// neither side lost state.
    pub(crate) fn on_hello_ack(&self, durable_seq: u64, applied_seq: u64) {
        let mut c = self.lock();
        if durable_seq < c.ack.durable_seq.get() {
            // The process server acknowledged more before: its spool (or the master target's
            // journal) was lost, and with it records this agent no longer holds.
            let msg = format!(
                "process server reports durable seq {durable_seq}, below the {} it acknowledged before: acknowledged changes were lost downstream; copying the whole disks again",
                c.ack.durable_seq
            );
            tracing::error!(machine = %self.name, "{msg}");
            push_event(&mut c, "peer-state-lost", msg);
            self.mark_everything(&mut c);
            c.ack.durable_seq = ferry_protocol::Seq(durable_seq);
        }
        if durable_seq >= c.next_seq {
            self.jump_past(&mut c, durable_seq, "process server");
        }
        c.sent_seq = durable_seq.max(c.ack.durable_seq.get());
        drop(c);
        self.on_ack(Ack {
            durable_seq: ferry_protocol::Seq(durable_seq),
            target_durable_seq: ferry_protocol::Seq::ZERO,
            applied_seq: ferry_protocol::Seq(applied_seq),
        });
        self.resync_wake.notify_all();
    }

    /// Records after `after_seq`, up to about `max_bytes`, for the sender.
    pub(crate) fn records_after(&self, after_seq: u64, max_bytes: usize) -> Vec<Record> {
        let c = self.lock();
        let mut out = Vec::new();
        let mut bytes = 0;
        let start = c.log.partition_point(|e| e.record.seq <= after_seq);
        for e in c.log.range(start..) {
            out.push(e.record.clone());
            bytes += e.bytes as usize;
            if bytes >= max_bytes {
                break;
            }
        }
        out
    }

    /// Unsent initial-sync chunks, up to about `max_bytes` (their data moves out: no copy).
    pub(crate) fn bulk_to_send(&self, max_bytes: u64) -> Vec<ferry_protocol::BulkChunk> {
        let mut c = self.lock();
        let mut out = Vec::new();
        let mut bytes = 0;
        for e in c.bulk.iter_mut() {
            if bytes >= max_bytes {
                break;
            }
            if e.sent.is_some() {
                continue;
            }
            e.sent = Some(Instant::now());
            let data = std::mem::take(&mut e.data);
            bytes += e.weight;
            out.push(ferry_protocol::BulkChunk { id: e.id, disk: e.disk, offset: e.offset, len: e.len, data });
        }
        if !out.is_empty() {
            c.rate_out.add(bytes);
            c.shipped_bytes += bytes;
        }
        out
    }

    /// An initial-sync chunk is durable at the master target.
    pub(crate) fn on_bulk_ack(&self, id: u64) {
        let mut c = self.lock();
        if let Some(i) = c.bulk.iter().position(|e| e.id == id) {
            if let Some(e) = c.bulk.remove(i) {
                c.bulk_bytes -= e.weight;
                for key in &e.extents {
                    if let Some(a) = c.al_index.get_mut(key) {
                        a.pending = a.pending.saturating_sub(1);
                    }
                }
            }
        }
        drop(c);
        self.resync_wake.notify_all();
    }

    /// Safety net: a chunk unacknowledged for this long is presumed lost and copied again.
    pub(crate) fn requeue_stale_bulk(&self, timeout: Duration) {
        let stale = self.lock().bulk.front().and_then(|e| e.sent).is_some_and(|t| t.elapsed() > timeout);
        if stale {
            tracing::warn!(machine = %self.name, "initial-sync chunk unacknowledged for {timeout:?}: copying the in-flight regions again");
            self.requeue_bulk();
        }
    }

    /// Chunks in flight may be lost (link reset): mark their regions for copying again.
    pub(crate) fn requeue_bulk(&self) {
        let mut c = self.lock();
        self.requeue_bulk_locked(&mut c);
        drop(c);
        self.resync_wake.notify_all();
    }

    fn requeue_bulk_locked(&self, c: &mut Core) {
        while let Some(e) = c.bulk.pop_front() {
            c.dirty.mark(e.disk as usize, e.offset, e.len);
            for key in &e.extents {
                if let Some(a) = c.al_index.get_mut(key) {
                    a.pending = a.pending.saturating_sub(1);
                    a.bitmap_unsaved = true;
                }
            }
        }
        c.bulk_bytes = 0;
        c.dirty_unsaved = true;
    }

    // ---- resync -----------------------------------------------------------------------------

    /// The resync thread: copies bitmap regions through the same ordered log, bracketed by
    /// ResyncBegin/ResyncEnd, then returns the machine to in-order replication.
    pub(crate) fn resync_loop(self: Arc<Self>) {
        let chunk_blocks = (self.config.resync_chunk_bytes.max(TRACK_BLOCK) / TRACK_BLOCK) as u32;
        let mut buf = Vec::new();
        while !self.stopped.load(Ordering::SeqCst) {
            let mut c = self.lock();
            // The resync keeps at most half the activity log busy (writes need the rest): retire
            // what was acknowledged, else wait for acknowledgements.
            if c.al.active_count() * 2 > c.al.capacity() {
                if let Err(e) = self.retire_extents(&mut c, &[]) {
                    tracing::error!(machine = %self.name, error = %e, "cannot retire activity-log extents");
                }
            }
            let al_busy = c.al.active_count() * 2 > c.al.capacity();
            let bulk_wait = c.bulk_bytes + self.config.resync_chunk_bytes > BULK_WINDOW
                || (c.dirty.is_empty() && !c.bulk.is_empty())
                || (al_busy && !c.dirty.is_empty());
            if c.mode == Mode::Replicating
                || bulk_wait
                || c.log_bytes + self.config.resync_chunk_bytes > self.config.log_limit_bytes / 2
            {
                let _ = self.resync_wake.wait_timeout(c, Duration::from_millis(200));
                continue;
            }
            if let Err(e) = self.resync_step(&mut c, chunk_blocks, &mut buf) {
                let msg = format!("resync step failed: {e}; retrying");
                tracing::error!(machine = %self.name, "{msg}");
                push_event(&mut c, "resync-error", msg);
                drop(c);
                std::thread::sleep(Duration::from_secs(1));
                continue;
            }
            drop(c);
            self.records_ready.notify_one();
        }
    }

    fn resync_step(&self, c: &mut Core, chunk_blocks: u32, buf: &mut Vec<u8>) -> Result<(), AgentError> {
        if c.resync.is_none() {
            let generation = rand::random::<u64>() | 1;
            let reason = if c.mode == Mode::InitialSync { ResyncReason::InitialSync } else { c.resync_reason };
            let preserve = c.state.initial_sync_complete;
            let seq = self.alloc_seq(c)?;
            self.push(
                c,
                seq,
                RecordBody::ResyncBegin {
                    generation: ferry_protocol::Generation(generation),
                    reason,
                    preserve_consistent: preserve,
                },
            );
            c.state.generation = generation;
            c.state.resync_open_seq = Some(seq);
            c.pending_end_seq = None;
            self.save_state(c)?;
            let total = c.dirty.bytes();
            tracing::info!(machine = %self.name, ?reason, bytes = total, "resync started");
            c.resync = Some(ResyncRun { generation, reason, total_bytes: total });
            c.resync_bytes_sent = 0;
            c.resync_bytes_zeroed = 0;
        }
        // Next contiguous dirty run of any disk.
        let mut found = None;
        for (i, bm) in c.dirty.disks.iter().enumerate() {
            if let Some(first) = bm.min() {
                let mut n = 0u32;
                while n < chunk_blocks && bm.contains(first + n) {
                    n += 1;
                }
                found = Some((i, first, n));
                break;
            }
        }
        let Some((disk, first, n)) = found else {
            // Initial-sync chunks still in flight: the end waits until they are durable.
            if !c.bulk.is_empty() {
                return Ok(());
            }
            // Everything copied: the target is consistent again at the ResyncEnd.
            let Some(run) = c.resync.take() else { return Ok(()) };
            let seq = self.alloc_seq(c)?;
            self.push(c, seq, RecordBody::ResyncEnd { generation: ferry_protocol::Generation(run.generation) });
            let was_initial = c.mode == Mode::InitialSync;
            c.mode = Mode::Replicating;
            c.state.initial_sync_complete = true;
            c.pending_end_seq = Some(seq);
            self.save_state(c)?;
            self.save_bitmap(c)?;
            let msg = format!(
                "{:?} finished: {} bytes read and copied, {} bytes of holes zeroed",
                run.reason, c.resync_bytes_sent, c.resync_bytes_zeroed
            );
            tracing::info!(machine = %self.name, initial = was_initial, "{msg}");
            push_event(c, "resync-complete", msg);
            let done = ferry_api::agent::CompletedResync {
                reason: format!("{:?}", run.reason),
                bytes_copied: c.resync_bytes_sent,
                hole_bytes_zeroed: c.resync_bytes_zeroed,
                bytes_planned: run.total_bytes,
                time_ms: now_ms(),
            };
            c.completed_resyncs.push_back(done);
            if c.completed_resyncs.len() > 20 {
                c.completed_resyncs.pop_front();
            }
            return Ok(());
        };
        let d = &self.disks[disk];
        let offset = first as u64 * TRACK_BLOCK;
        if self.resync_hole(c, disk, first)? {
            return Ok(());
        }
        let len = (n as u64 * TRACK_BLOCK).min(d.size.saturating_sub(offset));
        if len == 0 {
            c.dirty.disks[disk].remove_range(first..first + n);
            return Ok(());
        }
        // Protect and read first; the bits are cleared only once the data is in hand, so an
        // error (a bad sector, a full activity log) leaves the region marked.
        self.ensure_active(c, disk as u16, offset, len)?;
        if c.resync.is_none() {
            // Making room overflowed the log, which may have dropped this run's ResyncBegin:
            // the next step starts a new run.
            return Ok(());
        }
        buf.resize(len as usize, 0);
        d.backend.read(offset, buf).map_err(|e| AgentError::Disk { path: d.path.clone(), error: e.to_string() })?;
        c.dirty.disks[disk].remove_range(first..first + n);
        c.dirty_unsaved = true;
        c.resync_bytes_sent += len;
        // The initial sync bypasses the ordered log (the target has no consistent state yet):
        // one chunk per step, all-zero chunks sent as zeroing.
        if c.resync.as_ref().is_some_and(|r| r.reason == ResyncReason::InitialSync) {
            let extents: Vec<_> = extents_of(disk as u16, offset, len, self.ext_bytes()).collect();
            for key in &extents {
                if let Some(e) = c.al_index.get_mut(key) {
                    e.pending += 1;
                }
            }
            let id = c.next_bulk_id;
            c.next_bulk_id += 1;
            let data = if is_zero(buf) { Vec::new() } else { std::mem::take(buf) };
            let weight = (data.len() as u64).max(TRACK_BLOCK);
            c.bulk_bytes += weight;
            c.bulk.push_back(BulkEntry { id, disk: disk as u16, offset, len, data, sent: None, extents, weight });
            return Ok(());
        }
        // Split into runs of data blocks (shipped) and all-zero blocks (shipped as zeroing).
        let mut pos = 0usize;
        while pos < buf.len() {
            let end = (pos + TRACK_BLOCK as usize).min(buf.len());
            let zero = is_zero(&buf[pos..end]);
            let mut run_end = end;
            while run_end < buf.len() {
                let next = (run_end + TRACK_BLOCK as usize).min(buf.len());
                if is_zero(&buf[run_end..next]) != zero {
                    break;
                }
                run_end = next;
            }
            let off = offset + pos as u64;
            let seq = self.alloc_seq(c)?;
            let body = if zero {
                RecordBody::Zero { disk: disk as u16, offset: off, len: (run_end - pos) as u64 }
            } else {
                RecordBody::Write { disk: disk as u16, offset: off, data: buf[pos..run_end].to_vec() }
            };
            self.push(c, seq, body);
            pos = run_end;
        }
        Ok(())
    }

    /// When the dirty run starting at `first` lies in a hole of the source, ship it as one
    /// zeroing without reading it (whole-disk resyncs of sparse disks). Returns whether it did.
    fn resync_hole(&self, c: &mut Core, disk: usize, first: u32) -> Result<bool, AgentError> {
        let d = &self.disks[disk];
        let offset = first as u64 * TRACK_BLOCK;
        // Bounded so the activity log can cover the zeroing until it is acknowledged.
        let max_blocks = ((c.al.capacity() as u64 / 4).max(1) * self.ext_bytes() / TRACK_BLOCK).min(1 << 18);
        let span = (max_blocks * TRACK_BLOCK).min(d.size.saturating_sub(offset));
        let Ok(extents) = d.backend.block_status(offset, span) else { return Ok(false) };
        let Some(e) = extents.first().filter(|e| e.hole) else { return Ok(false) };
        let hole_blocks = (e.length.min(span) / TRACK_BLOCK) as u32;
        let bm = &c.dirty.disks[disk];
        let mut n = 0u32;
        while n < hole_blocks && bm.contains(first + n) {
            n += 1;
        }
        if n == 0 {
            return Ok(false);
        }
        let len = n as u64 * TRACK_BLOCK;
        self.ensure_active(c, disk as u16, offset, len)?;
        if c.resync.is_none() {
            return Ok(true);
        }
        if c.resync.as_ref().is_some_and(|r| r.reason == ResyncReason::InitialSync) {
            let extents: Vec<_> = extents_of(disk as u16, offset, len, self.ext_bytes()).collect();
            for key in &extents {
                if let Some(a) = c.al_index.get_mut(key) {
                    a.pending += 1;
                }
            }
            let id = c.next_bulk_id;
            c.next_bulk_id += 1;
            c.bulk_bytes += TRACK_BLOCK; // no payload travels
            let weight = TRACK_BLOCK;
            c.bulk.push_back(BulkEntry {
                id,
                disk: disk as u16,
                offset,
                len,
                data: Vec::new(),
                sent: None,
                extents,
                weight,
            });
        } else {
            let seq = self.alloc_seq(c)?;
            self.push(c, seq, RecordBody::Zero { disk: disk as u16, offset, len });
        }
        c.dirty.disks[disk].remove_range(first..first + n);
        c.dirty_unsaved = true;
        c.resync_bytes_zeroed += len;
        Ok(true)
    }

    pub(crate) fn save_state(&self, c: &Core) -> Result<(), AgentError> {
        let data = serde_json::to_vec_pretty(&c.state).map_err(|e| AgentError::Config(e.to_string()))?;
        ferry_sys::fs::write_atomic(&c.state_path, &data).map_err(crate::io_at(&c.state_path))?;
        Ok(())
    }

    /// Mark blocks for resync (verify repair) and start one.
    pub(crate) fn request_resync(&self, disk: u16, ranges: &[(u64, u64)], reason: ResyncReason) {
        let mut c = self.lock();
        for (off, len) in ranges {
            c.dirty.mark(disk as usize, *off, *len);
        }
        c.dirty_unsaved = true;
        if c.mode == Mode::Replicating {
            c.mode = Mode::Resync;
            c.resync_reason = reason;
        }
        drop(c);
        self.resync_wake.notify_all();
    }

    /// Insert a record into the stream at the current point (verify chunks, tags).
    /// `f` runs under the sequencer lock, so what it reads of the disks is exactly the state at
    /// that point of the stream.
    pub(crate) fn insert_record<F>(&self, f: F) -> Result<u64, AgentError>
    where
        F: FnOnce(&Machine) -> Result<RecordBody, AgentError>,
    {
        let mut c = self.lock();
        if c.mode != Mode::Replicating {
            return Err(AgentError::NotReplicating(format!("{:?}", c.mode)));
        }
        let body = f(self)?;
        let seq = self.alloc_seq(&mut c)?;
        self.push(&mut c, seq, body);
        drop(c);
        self.records_ready.notify_one();
        Ok(seq)
    }

    /// Insert a marker record (tags, group prepare/commit) with the core already locked.
    pub(crate) fn insert_marker_locked(&self, c: &mut Core, body: RecordBody) -> Result<u64, AgentError> {
        if c.mode != Mode::Replicating {
            return Err(AgentError::NotReplicating(format!("{:?}", c.mode)));
        }
        let seq = self.alloc_seq(c)?;
        #[cfg(feature = "testing")]
        if let Some(log) = &self.source_log {
            log.lock().unwrap_or_else(|p| p.into_inner()).marker(seq);
        }
        self.push(c, seq, body);
        self.records_ready.notify_one();
        Ok(seq)
    }

    /// Wait until the log has room for `bytes` more (verify pacing).
    pub(crate) fn wait_log_room(&self, bytes: u64) {
        let mut c = self.lock();
        while c.log_bytes + bytes > self.config.log_limit_bytes / 2 && !self.stopped.load(Ordering::SeqCst) {
            c = self
                .resync_wake
                .wait_timeout(c, Duration::from_millis(200))
                .map(|(g, _)| g)
                .unwrap_or_else(|p| p.into_inner().0);
        }
    }

    /// Clean stop: give the master target a moment to confirm what it lacks (`shutdown_drain_secs`),
    /// then turn what is left — unacknowledged, or acknowledged by the process server only — into
    /// bitmap regions, flush everything and empty the activity log (so a restart resyncs only those,
    /// and the agent's state alone still says what the recovery site may lack).
    pub fn shutdown(&self) -> Result<(), AgentError> {
        self.stopped.store(true, Ordering::SeqCst);
        self.resync_wake.notify_all();
        let deadline = Instant::now() + Duration::from_secs_f64(self.config.shutdown_drain_secs.max(0.0));
        while Instant::now() < deadline {
            let c = self.lock();
            if c.log.is_empty() && c.bulk.is_empty() && c.awaiting_target.is_empty() {
                break;
            }
            drop(c);
            std::thread::sleep(Duration::from_millis(20));
        }
        let mut c = self.lock();
        if !c.log.is_empty() || !c.awaiting_target.is_empty() {
            let mode = c.mode;
            self.overflow(&mut c);
            if mode != Mode::Replicating {
                c.mode = mode;
            }
        }
        // Initial-sync chunks not yet durable at the master target go back to the bitmap, which
        // is saved below (the activity log that covered them is cleared).
        self.requeue_bulk_locked(&mut c);
        self.flush_disks()?;
        c.dirty_unsaved = true;
        self.save_bitmap(&mut c)?;
        c.al.clear()?;
        c.al_index.clear();
        self.write_recovery_writes(&c, true)?;
        // A clean stop knows its last write exactly (the lease reached further).
        if c.lease_until_ms > 0 {
            write_lease(&self.config.state_dir, c.last_write_ms)?;
            c.lease_until_ms = 0;
        }
        Ok(())
    }

    /// A failed-over machine's account of its writes (see `recovery_writes_file`): complete
    /// only after a clean stop, with the bitmap saved and the activity log empty.
    pub(crate) fn write_recovery_writes(&self, c: &Core, clean: bool) -> Result<(), AgentError> {
        let Some(path) = &self.config.recovery_writes_file else { return Ok(()) };
        let mut extents = Vec::new();
        if clean {
            for (i, d) in self.disks.iter().enumerate() {
                let mut last: Option<(u64, u64)> = None;
                for block in c.dirty.disks.get(i).into_iter().flat_map(|b| b.iter()) {
                    let off = u64::from(block) * TRACK_BLOCK;
                    let len = TRACK_BLOCK.min(d.size.saturating_sub(off));
                    last = match last {
                        Some((o, l)) if o + l == off => Some((o, l + len)),
                        Some((o, l)) => {
                            extents.push(ferry_api::master_target::DiskExtent {
                                disk: d.name.to_string(),
                                offset: o,
                                length: l,
                            });
                            Some((off, len))
                        }
                        None => Some((off, len)),
                    };
                }
                if let Some((o, l)) = last {
                    extents.push(ferry_api::master_target::DiskExtent {
                        disk: d.name.to_string(),
                        offset: o,
                        length: l,
                    });
                }
            }
        }
        let w = ferry_api::agent::RecoveryWrites { machine: self.name.to_string(), clean, extents };
        let data = serde_json::to_vec(&w).map_err(|e| AgentError::Config(e.to_string()))?;
        ferry_sys::fs::write_atomic(path, &data).map_err(crate::io_at(path))
    }

    // ---- status -----------------------------------------------------------------------------

    pub fn status(&self) -> ferry_api::agent::AgentStatus {
        use ferry_api::agent::{AgentDisk, AgentStatus, ResyncProgress, WriteHold as HoldView};
        let mut c = self.lock();
        let now = now_ms();
        let lag = c.unapplied.front().map(|(_, t)| now.saturating_sub(*t) as f64 / 1000.0).unwrap_or(0.0);
        let caught_up = c.mode == Mode::Replicating
            && c.dirty.is_empty()
            && c.log.is_empty()
            && c.bulk.is_empty()
            && c.ack.applied_seq >= c.last_record_seq;
        let dirty_per_disk: Vec<u64> = c.dirty.disks.iter().map(|b| b.len() * TRACK_BLOCK).collect();
        let resync = c.resync.as_ref().map(|r| {
            let done = c.resync_bytes_sent + c.resync_bytes_zeroed;
            ResyncProgress {
                reason: format!("{:?}", r.reason),
                generation: r.generation,
                bytes_total: r.total_bytes,
                bytes_done: done,
                percent: if r.total_bytes == 0 {
                    100.0
                } else {
                    (done as f64 * 100.0 / r.total_bytes as f64).min(100.0)
                },
            }
        });
        let write_bytes_per_sec = c.rate_in.bytes_per_sec();
        let ship_bytes_per_sec = c.rate_out.bytes_per_sec();
        AgentStatus {
            config_server_link: self.server_link.get().map(|(l, r)| l.snapshot(r.len())),
            machine: self.name.to_string(),
            status_listen: self.config.status_listen.clone(),
            control_token_file: Some(self.config.control_token_path().display().to_string()),
            process_server: self.config.process_server.clone().unwrap_or_default(),
            nbd_listen: self.config.nbd_listen.clone(),
            nbd_socket: self.config.nbd_socket_path().map(|p| p.display().to_string()),
            mode: c.mode,
            generation: c.state.generation,
            initial_sync_complete: c.state.initial_sync_complete,
            caught_up,
            connected: c.connected,
            throttled: c.throttled,
            link_error: c.link_error.clone(),
            last_seq: c.last_record_seq,
            sent_seq: c.sent_seq,
            process_server_durable_seq: c.ack.durable_seq.get(),
            master_target_durable_seq: c.ack.target_durable_seq.get(),
            applied_seq: c.ack.applied_seq.get(),
            pending_log_bytes: c.log_bytes,
            pending_log_records: c.log.len(),
            initial_sync_in_flight_bytes: c.bulk_bytes,
            resync_pending_bytes: c.dirty.bytes(),
            resync,
            lag_seconds: lag,
            write_bytes_per_sec,
            ship_bytes_per_sec,
            shipped_bytes: c.shipped_bytes,
            activity_log_extents: c.al.active_count(),
            completed_resyncs: c.completed_resyncs.iter().cloned().collect(),
            disks: self
                .disks
                .iter()
                .enumerate()
                .map(|(i, d)| AgentDisk {
                    name: d.name.to_string(),
                    path: d.path.clone(),
                    size: d.size,
                    uuid: d.uuid.clone(),
                    resync_pending_bytes: dirty_per_disk.get(i).copied().unwrap_or(0),
                })
                .collect(),
            points: c.points.clone(),
            write_hold: c.hold.as_ref().map(|h| HoldView { group: h.group.clone(), tag: h.tag.clone() }),
            quiesced: c.quiesced.clone(),
            verify_order: self.verify.order().clone(),
            clock_ms: self.clock_ms(),
            tracking_lost: c.state.tracking_lost.clone(),
            lineage: c.state.lineage.as_ref().map(|l| ferry_api::agent::AgentLineage {
                id: l.id,
                parent_id: l.parent.map(|p| p.0),
                parent_seq: l.parent.map(|p| p.1),
                ancestors: l.ancestors.clone(),
            }),
            events: c.events.iter().cloned().collect(),
        }
    }
}

pub(crate) fn push_event(c: &mut Core, kind: &str, message: String) {
    c.events.push_back(EventEntry { time_ms: now_ms(), kind: kind.into(), message });
    while c.events.len() > 100 {
        c.events.pop_front();
    }
}

fn is_zero(b: &[u8]) -> bool {
    let chunks = b.chunks_exact(16);
    let rest = chunks.remainder();
    let mut chunks = chunks;
    chunks.all(|c| u128::from_ne_bytes(c.try_into().unwrap_or([1; 16])) == 0) && rest.iter().all(|&x| x == 0)
}

/// Limits that make progress possible: a resync step must fit in the log, and one maximal NBD
/// write (32 MiB) plus a resync chunk must fit in the activity log.
fn validate_limits(c: &AgentConfig) -> Result<(), AgentError> {
    use ferry_types::bounds::check_range;
    let (min_batch, max_batch) = ferry_types::bounds::BATCH_BYTES;
    [
        check_range("batch_bytes", c.batch_bytes as u64, min_batch, max_batch),
        check_range("log_limit_bytes", c.log_limit_bytes, 1 << 20, 1 << 40),
        check_range("al_extent_bytes", c.al_extent_bytes, TRACK_BLOCK, 1 << 30),
        check_range("al_extents", c.al_extents as u64, 1, 1 << 20),
    ]
    .into_iter()
    .collect::<Result<(), String>>()
    .map_err(AgentError::Config)?;
    let chunk = c.resync_chunk_bytes;
    if !(TRACK_BLOCK..=(32 << 20)).contains(&chunk) {
        return Err(AgentError::Config(format!("resync_chunk_bytes = {chunk}: use 4096 to 33554432")));
    }
    if c.log_limit_bytes < 4 * chunk {
        return Err(AgentError::Config(format!(
            "log_limit_bytes = {} is below 4 x resync_chunk_bytes ({}): resync could never make progress",
            c.log_limit_bytes,
            4 * chunk
        )));
    }
    let ext = c.al_extent_bytes.max(TRACK_BLOCK);
    let needed = (32u64 << 20).div_ceil(ext) + chunk.div_ceil(ext) + 2;
    if (c.al_extents as u64) < needed {
        return Err(AgentError::Config(format!(
            "al_extents = {} of {ext} bytes cannot cover one maximal write plus a resync step: use at least {needed}",
            c.al_extents
        )));
    }
    Ok(())
}

/// Mark every allocated (non-hole) region of a disk for the initial copy.
fn mark_allocated(dirty: &mut DirtyMap, i: usize, d: &Disk) -> Result<(), AgentError> {
    let mut off = 0;
    while off < d.size {
        let len = (d.size - off).min(1 << 30);
        let extents = d
            .backend
            .block_status(off, len)
            .map_err(|e| AgentError::Disk { path: d.path.clone(), error: e.to_string() })?;
        if extents.is_empty() {
            dirty.mark(i, off, len);
            off += len;
            continue;
        }
        for e in extents {
            let l = e.length.min(d.size - off);
            if !e.hole {
                dirty.mark(i, off, l);
            }
            off += l;
            if l == 0 || off >= d.size {
                break;
            }
        }
    }
    Ok(())
}

fn new_uuid() -> String {
    let b: [u8; 16] = rand::random();
    format!(
        "{:02x}{:02x}{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}-{:02x}{:02x}{:02x}{:02x}{:02x}{:02x}",
        b[0],
        b[1],
        b[2],
        b[3],
        b[4],
        b[5],
        (b[6] & 0x0f) | 0x40,
        b[7],
        (b[8] & 0x3f) | 0x80,
        b[9],
        b[10],
        b[11],
        b[12],
        b[13],
        b[14],
        b[15]
    )
}

/// The failover seed named in the configuration, checked against the disks.
fn read_seed(config: &AgentConfig, disks: &[Disk]) -> Result<Option<ferry_api::agent::FailoverSeed>, AgentError> {
    let Some(path) = &config.failover_seed else { return Ok(None) };
    let data = match std::fs::read(path) {
        Ok(d) => d,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
        Err(source) => return Err(AgentError::Io { path: path.clone(), source }),
    };
    let seed: ferry_api::agent::FailoverSeed = serde_json::from_slice(&data)
        .map_err(|e| AgentError::Config(format!("failover seed {} is corrupt: {e}", path.display())))?;
    for e in &seed.extents {
        let d = disks.iter().find(|d| *d.name == *e.disk).ok_or_else(|| {
            AgentError::Config(format!(
                "failover seed {} names disk {:?}, which is not configured",
                path.display(),
                e.disk
            ))
        })?;
        if e.offset.checked_add(e.length).is_none_or(|end| end > d.size) {
            return Err(AgentError::Config(format!(
                "failover seed {}: extent {}+{} lies outside disk {} ({} bytes)",
                path.display(),
                e.offset,
                e.length,
                d.name,
                d.size
            )));
        }
    }
    Ok(Some(seed))
}
