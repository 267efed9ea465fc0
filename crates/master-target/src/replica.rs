//! One protected machine's replica at the master target: its journal, target disks and applier.
//!
//! Size: ingest, apply and checkpoint of one replica share its locks; the split into ingest/apply is planned (docs/limitations.md).

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, AtomicU64, Ordering};
use std::sync::{Arc, Condvar, Mutex, MutexGuard};
use std::time::{Duration, Instant};

use std::collections::VecDeque;

use ferry_journal::{Cursor, SegmentLog};
use ferry_nbd::Exports;
use ferry_protocol::{
    codes, now_ms, BulkChunk, DiskDescriptor, Event, MachineDescriptor, MachineName, Record, RecordBody,
};
use ferry_status::RateMeter;
use serde::{Deserialize, Serialize};
use tokio::sync::{broadcast, watch};
use tokio_util::sync::CancellationToken;

use crate::base::BaseSlot;
use crate::history::{History, Marker};
use crate::journal_index::JournalIndex;
use crate::{MasterTargetConfig, MasterTargetError};
use ferry_api::master_target::Materialization;

/// Persisted apply position. Written only after the target disks were fsync'd.
#[derive(Debug, Clone, Copy, Default, Serialize, Deserialize)]
pub(crate) struct Checkpoint {
    pub(crate) applied_seq: u64,
    /// The target disks hold a write-order-consistent state (no resync half-applied).
    consistent: bool,
    /// A resync was started and not finished: the target is mid-copy.
    in_resync: bool,
    /// The open resync is an initial sync: its end starts a new history (a new base).
    #[serde(default)]
    initial_sync_open: bool,
    /// A new base must be taken from the target at `applied_seq` before anything more is
    /// applied (persisted, so a crash while taking it retries at the same position).
    #[serde(default)]
    base_due: bool,
}

pub(crate) struct ApplyState {
    ckpt: Checkpoint,
    /// The last checkpoint made durable: after an error, applying restarts from here (the
    /// journal still holds everything after it, and replay is idempotent).
    pub(crate) persisted: Checkpoint,
    last_applied_time_ms: u64,
    rate: RateMeter,
    /// Journaled resync data waiting for its ResyncEnd (the replica keeps its consistent state).
    holding_resync_at: Option<u64>,
    error: Option<String>,
}

pub use ferry_api::master_target::{ReplicaDisk, ReplicaStatus};

/// `targets.json` in a replica's retention folder: where its target disks are (chosen at first
/// contact, kept whatever later settings say).
#[derive(serde::Serialize, serde::Deserialize)]
pub(crate) struct TargetsFile {
    pub(crate) dir: PathBuf,
    /// Adopted (a reprotect to the original location): the existing file of each disk, in the
    /// machine's disk order. Empty: `<dir>/<disk>.img`, created by the replica.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub(crate) files: Vec<PathBuf>,
    /// The reprotect job whose order adopted the files. An adopted disk is the old primary's own:
    /// removing the replica never deletes it.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub(crate) adopted_by: Option<String>,
}

/// `window.json`: the retention window last set for the machine, used while the configuration
/// server is unreachable.
#[derive(serde::Serialize, serde::Deserialize)]
struct WindowFile {
    window_secs: f64,
}

/// The copy of the disks a replica holds (beside its journal).
const LINEAGE_FILE: &str = "lineage.json";

#[derive(serde::Serialize, serde::Deserialize)]
struct StoredLineage {
    id: u64,
    #[serde(default)]
    parent: Option<(u64, u64)>,
    #[serde(default)]
    ancestors: Vec<(u64, u64)>,
    since_ms: u64,
}

pub struct Replica {
    pub(crate) name: String,
    pub(crate) dir: PathBuf,
    pub(crate) disks: Vec<DiskDescriptor>,
    pub(crate) targets: Vec<(PathBuf, File)>,
    /// The datastore folder holding `<machine>/` (target disks, images).
    pub(crate) datastore: PathBuf,
    journal: Mutex<SegmentLog>,
    apply: Mutex<ApplyState>,
    pub(crate) wake: Condvar,
    /// Retention window in ms (zero: no history, the journal is released once applied). Kept
    /// in `window.json` beside the journal so a restart without the configuration server keeps it.
    window_ms: std::sync::atomic::AtomicU64,
    /// Prune early when the retention volume has less free space than this share.
    pub(crate) min_free_percent: f64,
    pub(crate) history: Mutex<History>,
    pub(crate) base: Mutex<BaseSlot>,
    pub(crate) mats: Mutex<Vec<Materialization>>,
    pub(crate) events: Mutex<VecDeque<ferry_api::Event>>,
    /// The master target's NBD exports (materialized points are served there).
    pub(crate) exports: Exports,
    /// The journal is never released past this seq (the base and pinned points need it).
    pub(crate) release_limit: AtomicU64,
    pub(crate) prune_wake: Condvar,
    pub(crate) segment_bytes: u64,
    /// Seq of the newest ResyncEnd durable in the journal.
    latest_end_seq: AtomicU64,
    /// Bulk (initial-sync) data is taken only while this holds: the replica has no consistent
    /// state yet, or the journal holds an initial sync's ResyncBegin without its ResyncEnd.
    /// Outside that window a `Bulk` chunk would overwrite replicated data without ordering.
    bulk_open: AtomicBool,
    journal_last_time_ms: AtomicU64,
    applied_tx: watch::Sender<u64>,
    events_tx: broadcast::Sender<Event>,
    pub(crate) stopped: AtomicBool,
    /// Its protection was disabled: nothing more is taken, its files are being deleted.
    pub(crate) removed: AtomicBool,
    checkpoint_interval: Duration,
    /// Bumped by every new process-server connection; bulk writes of an older connection are
    /// refused so a stale chunk never lands after its resent copy. Held while writing bulk.
    bulk_epoch: Mutex<u64>,
    /// Closed to its source (`fence.json`; see [`Fence`]). Set under the journal lock, so no
    /// batch lands after the head it names.
    pub(crate) fence: Mutex<Option<Fence>>,
    /// Adopted disks: the old primary's blocks the first resync writes over, kept first.
    overwritten: Mutex<Option<crate::overwritten::Overwritten>>,
    /// Where each write after the base lies in the journal (see [`JournalIndex`]).
    pub(crate) index: Mutex<JournalIndex>,
    /// `failover.json`: the target disks put at a recovery point (see `failover.rs`).
    pub(crate) failover: Mutex<Option<ferry_api::master_target::Failover>>,
    /// Serializes failover, change of point and commit.
    pub(crate) failover_op: Mutex<()>,
    /// A configuration server's failover order is being carried out.
    pub(crate) order_busy: std::sync::atomic::AtomicBool,
    /// The last order that failed (reported until another succeeds).
    pub(crate) order_error: Mutex<Option<ferry_api::master_target::FailoverOrderError>>,
    /// The last cancelled failover (`failover-cancelled.json`).
    pub(crate) cancelled: Mutex<Option<ferry_api::master_target::CancelledFailover>>,
    /// The last test-failover order that could not be carried out.
    pub(crate) test_order_error: Mutex<Option<ferry_api::master_target::FailoverOrderError>>,
}

pub use ferry_api::master_target::Fence;

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> MasterTargetError + '_ {
    move |source| MasterTargetError::Io { path: path.to_owned(), source }
}

impl Replica {
    pub(crate) fn window(&self) -> Duration {
        Duration::from_millis(self.window_ms.load(std::sync::atomic::Ordering::Relaxed))
    }

    /// A new retention window (the machine's policy changed), remembered in `window.json`.
    /// Turning history on or off takes effect at the next start (the base and journal must be set
    /// up or released first); the new window is remembered for it. `None`: no window is set for
    /// the machine any more; the master target's default applies (and nothing is remembered).
    pub fn set_window(&self, secs: Option<f64>, default_secs: f64) {
        let path = self.dir.join("window.json");
        let target = secs.unwrap_or(default_secs).max(0.0);
        let recorded = match secs {
            Some(w) => {
                serde_json::to_vec(&WindowFile { window_secs: w }).map_err(std::io::Error::other).and_then(|rec| {
                    let same = std::fs::read(&path).is_ok_and(|d| d == rec);
                    if same {
                        Ok(())
                    } else {
                        ferry_sys::fs::write_atomic(&path, &rec).map_err(|e| std::io::Error::other(e.to_string()))
                    }
                })
            }
            None => match std::fs::remove_file(&path) {
                Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
                _ => Ok(()),
            },
        };
        if let Err(e) = recorded {
            tracing::error!(machine = %self.name, error = %e, "cannot record the retention window; keeping the old one");
            return;
        }
        let new = (target * 1000.0) as u64;
        let old = self.window_ms.load(std::sync::atomic::Ordering::Relaxed);
        if new == old {
            return;
        }
        if (old == 0) != (new == 0) {
            tracing::warn!(machine = %self.name, from = old / 1000, to = new / 1000, "turning history on or off takes effect when the master target restarts");
            return;
        }
        self.window_ms.store(new, std::sync::atomic::Ordering::Relaxed);
        tracing::info!(machine = %self.name, window_secs = target, "retention window changed");
    }

    /// First contact for a machine: create its folders and sparse target disks. `name` is the
    /// descriptor's name, validated: only it is joined to a folder.
    pub fn create(
        config: &MasterTargetConfig,
        name: &MachineName,
        machine: &MachineDescriptor,
        exports: Exports,
        shutdown: CancellationToken,
    ) -> Result<Arc<Self>, MasterTargetError> {
        let dir = config.retention_dir().join(name);
        ferry_sys::fs::private_dir(&dir).map_err(io(&dir))?;
        // Where the target disks go is recorded first: the datastore chosen now stays the
        // replica's, whatever later settings say (`open` reads it back).
        let tdir = config.datastore_for(name).join(name);
        let kept = tdir.join(crate::removal::KEPT_MARKER);
        if kept.exists() {
            return Err(MasterTargetError::Refused(format!(
                "{} holds disks a disabled protection of {} kept for its failed-over machine ({}): a new replica there would write over them; protect it to another datastore, or move those disks away and remove the marker",
                tdir.display(),
                machine.name,
                kept.display()
            )));
        }
        let targets = dir.join("targets.json");
        match std::fs::read(&targets) {
            Ok(d) => {
                let had = serde_json::from_slice::<TargetsFile>(&d).ok().map(|t| t.dir);
                if had.as_deref() != Some(tdir.as_path()) {
                    return Err(MasterTargetError::Refused(format!(
                        "{} already has target disks in {} on this master target, not in {}: protect it to that datastore again, or remove {} and the old target disks first",
                        machine.name,
                        had.map(|p| p.display().to_string()).unwrap_or_else(|| "an unreadable place".into()),
                        tdir.display(),
                        dir.display()
                    )));
                }
            }
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => return Err(io(&targets)(e)),
            Err(_) => {
                let rec = serde_json::to_vec(&TargetsFile { dir: tdir.clone(), files: Vec::new(), adopted_by: None })
                    .map_err(|e| MasterTargetError::Refused(e.to_string()))?;
                ferry_sys::fs::write_atomic(&targets, &rec).map_err(crate::io_at(&targets))?;
            }
        }
        let desc = serde_json::to_vec_pretty(machine).map_err(|e| MasterTargetError::Refused(e.to_string()))?;
        ferry_sys::fs::write_atomic(&dir.join("machine.json"), &desc)
            .map_err(crate::io_at(&dir.join("machine.json")))?;
        Self::open(config, name, machine.clone(), exports, shutdown)
    }

    /// First contact for a machine whose reprotect adopts existing files as its target disks
    /// (original-location recovery): the old primary's disks. Nothing in them is moved or
    /// truncated; the replica is not consistent (no recovery point) until the first resync of
    /// the copy named by the order ends, and takes a stream only from that copy.
    pub fn create_adopting(
        config: &MasterTargetConfig,
        name: &MachineName,
        machine: &MachineDescriptor,
        order: &ferry_api::control::AdoptionOrder,
        exports: Exports,
        shutdown: CancellationToken,
    ) -> Result<Arc<Self>, MasterTargetError> {
        let files = check_adoption(machine, order, &config.retention_dir())?;
        let dir = config.retention_dir().join(name);
        if dir.join("machine.json").exists() {
            // This order's adoption, cut off before it opened (the disks were still locked, a
            // crash): open it now. Any other replica there is a leftover the job must remove.
            let same = std::fs::read(dir.join("targets.json"))
                .ok()
                .and_then(|d| serde_json::from_slice::<TargetsFile>(&d).ok())
                .is_some_and(|t| t.adopted_by.as_deref() == Some(order.order.as_str()) && t.files == files);
            if !same {
                return Err(MasterTargetError::Refused(format!(
                    "{} already holds a replica of {}: it cannot adopt other disks (disable its protection to remove the leftover replica first)",
                    dir.display(),
                    machine.name
                )));
            }
            return Self::open(config, name, machine.clone(), exports, shutdown);
        }
        // Without machine.json the folder may still hold this order's own first files (a crash
        // while adopting) — or an earlier replica's journal and checkpoint (a removal cut off),
        // which must never be replayed onto the primary's disks.
        const OWN: [&str; 4] = ["targets.json", LINEAGE_FILE, "targets.created", "machine.json"];
        if let Ok(entries) = std::fs::read_dir(&dir) {
            let mut leftovers = Vec::new();
            for e in entries.flatten() {
                let n = e.file_name().to_string_lossy().into_owned();
                if !OWN.contains(&n.as_str()) && !n.contains(".tmp") {
                    leftovers.push(n);
                }
            }
            let other_order = std::fs::read(dir.join("targets.json"))
                .ok()
                .and_then(|d| serde_json::from_slice::<TargetsFile>(&d).ok())
                .is_some_and(|t| t.adopted_by.as_deref() != Some(order.order.as_str()));
            if !leftovers.is_empty() || other_order {
                leftovers.sort();
                return Err(MasterTargetError::Refused(format!(
                    "{} holds files of an earlier replica of {} ({}): it cannot adopt the old primary's disks until they are removed (disable that protection, or let its removal finish)",
                    dir.display(),
                    machine.name,
                    if leftovers.is_empty() { "targets.json of another reprotect".to_owned() } else { leftovers.join(", ") }
                )));
            }
        }
        ferry_sys::fs::private_dir(&dir).map_err(io(&dir))?;
        let tdir = files.first().and_then(|f| f.parent()).map(Path::to_owned).unwrap_or_else(|| dir.clone());
        let rec = serde_json::to_vec(&TargetsFile { dir: tdir, files, adopted_by: Some(order.order.clone()) })
            .map_err(|e| MasterTargetError::Refused(e.to_string()))?;
        ferry_sys::fs::write_atomic(&dir.join("targets.json"), &rec)
            .map_err(crate::io_at(&dir.join("targets.json")))?;
        // The copy that will stream here, recorded before its first hello is checked.
        let Some(id) = order.lineage_id() else {
            return Err(MasterTargetError::Refused(format!(
                "the adoption order {} names lineage {:?}, not 16 hex digits",
                order.order, order.lineage
            )));
        };
        let l = StoredLineage { id, parent: None, ancestors: Vec::new(), since_ms: now_ms() };
        let data = serde_json::to_vec(&l).map_err(|e| MasterTargetError::Refused(e.to_string()))?;
        ferry_sys::fs::write_atomic(&dir.join(LINEAGE_FILE), &data).map_err(crate::io_at(&dir.join(LINEAGE_FILE)))?;
        // The files exist and are the replica's from now on (never set aside as not adopted).
        let marker = dir.join("targets.created");
        ferry_sys::fs::write_atomic(&marker, b"target disks adopted\n").map_err(crate::io_at(&marker))?;
        let desc = serde_json::to_vec_pretty(machine).map_err(|e| MasterTargetError::Refused(e.to_string()))?;
        ferry_sys::fs::write_atomic(&dir.join("machine.json"), &desc)
            .map_err(crate::io_at(&dir.join("machine.json")))?;
        tracing::info!(machine = %machine.name, order = %order.order, "target disks adopted: the old primary's files");
        Self::open(config, name, machine.clone(), exports, shutdown)
    }

    /// Reopen a machine known from a previous run (its journal is replayed by the applier).
    pub fn reopen(
        config: &MasterTargetConfig,
        name: &MachineName,
        exports: Exports,
        shutdown: CancellationToken,
    ) -> Result<Arc<Self>, MasterTargetError> {
        let path = config.retention_dir().join(name).join("machine.json");
        let data = std::fs::read(&path).map_err(io(&path))?;
        let machine: MachineDescriptor = serde_json::from_slice(&data)
            .map_err(|e| MasterTargetError::Refused(format!("{} is unreadable: {e}", path.display())))?;
        if machine.name != **name {
            return Err(MasterTargetError::Refused(format!(
                "{} describes machine {:?}, not {name}: restore the file or remove the folder",
                path.display(),
                machine.name
            )));
        }
        Self::open(config, name, machine, exports, shutdown)
    }

    fn open(
        config: &MasterTargetConfig,
        name: &MachineName,
        machine: MachineDescriptor,
        exports: Exports,
        shutdown: CancellationToken,
    ) -> Result<Arc<Self>, MasterTargetError> {
        let dir = config.retention_dir().join(name);
        let targets_file = match std::fs::read(dir.join("targets.json")) {
            Ok(d) => serde_json::from_slice::<TargetsFile>(&d).map_err(|e| {
                MasterTargetError::Refused(format!("{} is corrupt: {e}", dir.join("targets.json").display()))
            })?,
            // Replicas from before per-machine datastores live in the master target's own.
            Err(_) => TargetsFile { dir: config.datastore.join(name), files: Vec::new(), adopted_by: None },
        };
        let tdir = targets_file.dir.clone();
        let adopted = !targets_file.files.is_empty();
        if adopted {
            if targets_file.files.len() != machine.disks.len() {
                return Err(MasterTargetError::Refused(format!(
                    "{} names {} adopted disk file(s) for the {} disk(s) of {}: restore the file",
                    dir.join("targets.json").display(),
                    targets_file.files.len(),
                    machine.disks.len(),
                    machine.name
                )));
            }
        } else {
            ferry_sys::fs::private_dir(&tdir).map_err(io(&tdir))?;
        }
        let ckpt_path = dir.join("checkpoint.json");
        let ckpt: Checkpoint = match std::fs::read(&ckpt_path) {
            Ok(d) => serde_json::from_slice(&d)
                .map_err(|e| MasterTargetError::Refused(format!("{} is corrupt: {e}", ckpt_path.display())))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Checkpoint::default(),
            Err(e) => return Err(io(&ckpt_path)(e)),
        };
        let fence_path = dir.join("fence.json");
        let fence: Option<Fence> = match std::fs::read(&fence_path) {
            Ok(d) => Some(serde_json::from_slice(&d).map_err(|e| {
                // A fence must never be forgotten: an unreadable one stops the replica.
                MasterTargetError::Refused(format!(
                    "{} is corrupt ({e}): the replica was fenced; restore the file (or remove the replica) before starting",
                    fence_path.display()
                ))
            })?),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(io(&fence_path)(e)),
        };
        let failover_path = dir.join("failover.json");
        let mut fence = fence;
        let mut handed_over = fence.as_ref().is_some_and(|f| f.handed_over);
        let mut failover: Option<ferry_api::master_target::Failover> = match std::fs::read(&failover_path) {
            Ok(d) => Some(serde_json::from_slice(&d).map_err(|e| {
                MasterTargetError::Refused(format!(
                    "{} is corrupt ({e}): the machine was failed over; restore the file before starting",
                    failover_path.display()
                ))
            })?),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(e) => return Err(io(&failover_path)(e)),
        };
        let cancelled = crate::failover::read_cancelled(&dir)?;
        // A cancel that a crash cut off after it was recorded, the disks back at the fence's seq
        // and nothing changed since: finished below, once the disks are locked for the applier.
        let finish_cancel =
            crate::failover::cancel_to_finish(cancelled.as_ref(), fence.as_ref(), failover.as_ref(), &tdir);
        // Written once the target disks exist: from then on a missing target is an error.
        let created_marker = dir.join("targets.created");
        let mut targets = Vec::new();
        for (i, d) in machine.disks.iter().enumerate() {
            let p = match targets_file.files.get(i) {
                Some(f) => f.clone(),
                None => tdir.join(format!("{}.img", d.name)),
            };
            if !p.exists() && (ckpt.applied_seq > 0 || created_marker.exists()) {
                // Re-creating it empty would silently leave a replica without its earlier data.
                return Err(MasterTargetError::Refused(format!(
                    "target disk {} is missing, but this replica already holds data for it (applied up to seq {}): restore the file from a copy, or disable protection of {} and protect it again (a full copy)",
                    p.display(),
                    ckpt.applied_seq,
                    machine.name
                )));
            }
            if !created_marker.exists() && ckpt.applied_seq == 0 {
                if let Ok(m) = std::fs::symlink_metadata(&p) {
                    // A file this replica did not create (planted there, or a copy kept when the
                    // retention volume was lost) is never adopted: the initial copy sends
                    // allocated regions only, so anything it holds in the source's holes would
                    // stay in the replica. It is moved aside, not deleted: it may be the only
                    // other copy of the machine until the new initial copy completes.
                    let aside = p.with_extension(format!("img.not-adopted-{}", now_ms()));
                    tracing::warn!(machine = %machine.name, path = %p.display(), aside = %aside.display(), bytes = m.len(), "a target disk file this replica did not create is moved aside; the initial copy starts from an empty disk");
                    ferry_sys::fs::rename_durable(&p, &aside).map_err(io(&p))?;
                }
            }
            // Never through a link: the target disk is this replica's own file.
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .custom_flags(libc::O_NOFOLLOW)
                .open(&p)
                .map_err(io(&p))?;
            // One writer per disk: this applier, until the replica is closed or handed over.
            if !handed_over && !finish_cancel {
                ferry_sys::fs::lock_one_writer(&f, &p, &format!("the master target's applier for {}", machine.name))
                    .map_err(io(&p))?;
            }
            let len = f.metadata().map_err(io(&p))?.len();
            if len == 0 {
                f.set_len(d.size).map_err(io(&p))?;
            } else if len != d.size {
                return Err(MasterTargetError::Refused(format!(
                    "target disk {} is {len} bytes but the protected disk {} is {} bytes: resizing a protected disk needs re-protection (disable protection, then protect again)",
                    p.display(), d.name, d.size
                )));
            }
            targets.push((p, f));
        }
        ferry_sys::fs::sync_dir(&tdir).map_err(crate::io_at(&tdir))?;
        if finish_cancel {
            // The disks first: held by someone (the machine at the recovery site started
            // since), the replica stays fenced and the cancel can be asked again.
            match crate::failover::lock_all(&targets, &format!("the master target's applier for {}", machine.name)) {
                Ok(()) => {
                    crate::failover::remove_failover_files(&dir, &tdir).map_err(MasterTargetError::Refused)?;
                    tracing::warn!(machine = %machine.name, "a recorded cancel of the failover is finished: the fence is lifted");
                    fence = None;
                    failover = None;
                    handed_over = false;
                }
                Err(e) => {
                    tracing::warn!(machine = %machine.name, error = %e, "a recorded cancel cannot finish (the disks are in use): the replica stays fenced");
                }
            }
        }
        if !created_marker.exists() {
            ferry_sys::fs::write_atomic(&created_marker, b"target disks created\n")
                .map_err(crate::io_at(&created_marker))?;
        }
        let journal = SegmentLog::open(&dir.join("journal"), config.segment_bytes)?;
        // Where does the newest completed resync end? (decides whether held resync data may apply)
        let mut latest_end = 0;
        let mut bulk_open = ckpt.initial_sync_open || (journal.last_seq() == 0 && !ckpt.consistent);
        let mut cur = Cursor::after(ckpt.applied_seq);
        loop {
            let batch = journal.read(&mut cur, 64 << 20)?;
            if batch.is_empty() {
                break;
            }
            for r in &batch {
                match r.body {
                    RecordBody::ResyncEnd { .. } => {
                        latest_end = r.seq.get();
                        bulk_open = false;
                    }
                    RecordBody::ResyncBegin { reason, .. } if crate::base::bypasses_journal(reason) => {
                        bulk_open = true;
                    }
                    _ => {}
                }
            }
        }
        let history = History::open(&dir.join("history.jsonl"), journal.synced_seq())?;
        // The window: set for this machine (its policy) > remembered from an earlier policy
        // setting (the configuration server may be unreachable now) > this master target's default.
        let remembered = std::fs::read(dir.join("window.json"))
            .ok()
            .and_then(|d| serde_json::from_slice::<WindowFile>(&d).ok())
            .map(|w| w.window_secs);
        let window_secs = match config.machine_retention_secs.get(&machine.name) {
            Some(w) => {
                if remembered != Some(*w) {
                    let rec = serde_json::to_vec(&WindowFile { window_secs: *w })
                        .map_err(|e| MasterTargetError::Refused(e.to_string()))?;
                    ferry_sys::fs::write_atomic(&dir.join("window.json"), &rec)
                        .map_err(crate::io_at(&dir.join("window.json")))?;
                }
                *w
            }
            None => remembered.unwrap_or(config.retention_window_secs),
        }
        .max(0.0);
        let window_ms = (window_secs * 1000.0) as u64;
        let (applied_tx, _) = watch::channel(ckpt.applied_seq);
        let (events_tx, _) = broadcast::channel(1024);
        let overwritten = if targets_file.adopted_by.is_some() {
            Some(
                crate::overwritten::Overwritten::open(&dir, &machine.disks)
                    .map_err(io(&dir.join(crate::overwritten::DIR)))?,
            )
        } else {
            None
        };
        let r = Arc::new(Replica {
            name: machine.name.clone(),
            dir,
            disks: machine.disks.clone(),
            datastore: tdir.parent().map(|p| p.to_owned()).unwrap_or_else(|| config.datastore.clone()),
            targets,
            journal: Mutex::new(journal),
            apply: Mutex::new(ApplyState {
                ckpt,
                persisted: ckpt,
                last_applied_time_ms: 0,
                rate: RateMeter::default(),
                holding_resync_at: None,
                error: None,
            }),
            wake: Condvar::new(),
            window_ms: std::sync::atomic::AtomicU64::new(window_ms),
            min_free_percent: config.retention_min_free_percent,
            history: Mutex::new(history),
            base: Mutex::new(BaseSlot {
                state: None,
                files: Vec::new(),
                paused: None,
                lingering: Vec::new(),
                exported: Default::default(),
            }),
            mats: Mutex::new(Vec::new()),
            events: Mutex::new(VecDeque::new()),
            exports,
            release_limit: AtomicU64::new(u64::MAX),
            prune_wake: Condvar::new(),
            segment_bytes: config.segment_bytes,
            latest_end_seq: AtomicU64::new(latest_end),
            bulk_open: AtomicBool::new(bulk_open),
            journal_last_time_ms: AtomicU64::new(0),
            applied_tx,
            events_tx,
            stopped: AtomicBool::new(false),
            removed: AtomicBool::new(false),
            bulk_epoch: Mutex::new(0),
            fence: Mutex::new(fence),
            overwritten: Mutex::new(overwritten),
            index: Mutex::new(JournalIndex::new(machine.disks.len(), ckpt.applied_seq)),
            failover: Mutex::new(failover),
            failover_op: Mutex::new(()),
            order_busy: std::sync::atomic::AtomicBool::new(false),
            order_error: Mutex::new(None),
            cancelled: Mutex::new(cancelled),
            test_order_error: Mutex::new(None),
            checkpoint_interval: Duration::from_secs_f64(config.checkpoint_interval_secs.max(0.01)),
        });
        r.open_base()?;
        r.reload_mats()?;
        r.index_applied_history();
        r.resume_failover();
        // A handed-over replica's target disks belong to the failed-over machine: no applier.
        if !handed_over {
            let r2 = r.clone();
            std::thread::Builder::new()
                .name(format!("apply-{}", machine.name))
                .spawn(move || r2.apply_loop())
                .map_err(|e| MasterTargetError::Refused(format!("cannot start applier thread: {e}")))?;
        }
        let r2 = r.clone();
        std::thread::Builder::new()
            .name(format!("prune-{}", machine.name))
            .spawn(move || Replica::prune_loop(r2))
            .map_err(|e| MasterTargetError::Refused(format!("cannot start pruning thread: {e}")))?;
        let r3 = r.clone();
        tokio::spawn(async move {
            shutdown.cancelled().await;
            r3.stop();
        });
        Ok(r)
    }

    pub fn fence_state(&self) -> Option<Fence> {
        self.fence.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Refused with 9018 once fenced (checked under the journal lock by the journaling paths).
    pub(crate) fn refuse_if_fenced(&self) -> Result<(), MasterTargetError> {
        if self.removed.load(Ordering::SeqCst) {
            return Err(MasterTargetError::Refused(format!(
                "protection of {} was disabled: its replica is deleted; protect it again for a new one",
                self.name
            )));
        }
        match self.fence_state() {
            Some(f) => Err(MasterTargetError::Fenced { machine: self.name.clone(), at_seq: f.at_seq }),
            None => Ok(()),
        }
    }

    /// Close the replica to its source at the journal's head (idempotent: an existing fence
    /// stands). Durable before it returns; the applier then applies up to the head and hands
    /// the disks over.
    pub fn set_fence(&self, reason: &str) -> Result<Fence, MasterTargetError> {
        // No initial-sync chunk (written straight to the target disks) lands after the fence.
        let _bulk = self.bulk_epoch.lock().unwrap_or_else(|p| p.into_inner());
        let j = self.lock_journal();
        let mut slot = self.fence.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(f) = slot.as_ref() {
            return Ok(f.clone());
        }
        let f = Fence {
            at_seq: j.synced_seq(),
            time_ms: now_ms(),
            reason: reason.to_owned(),
            handed_over: false,
            applied_seq: 0,
        };
        self.write_fence(&f)?;
        *slot = Some(f.clone());
        drop(slot);
        drop(j);
        tracing::warn!(machine = %self.name, at_seq = f.at_seq, reason, "replica fenced: no stream is taken any more");
        self.wake.notify_all();
        self.prune_wake.notify_all();
        Ok(f)
    }

    fn write_fence(&self, f: &Fence) -> Result<(), MasterTargetError> {
        let path = self.dir.join("fence.json");
        let data = serde_json::to_vec_pretty(f).map_err(|e| MasterTargetError::Refused(e.to_string()))?;
        ferry_sys::fs::write_atomic(&path, &data).map_err(crate::io_at(&path))
    }

    /// The applier reached the fence: make that durable (a checkpoint at the head, then the
    /// fence marked handed over) so no restart applies anything to the disks again.
    /// Called by the applier when idle. Also reached when the applier holds the consistent state
    /// for a resync run the fence cut off (its `ResyncEnd` can never come now): the disks are
    /// handed over at that consistent state, `applied_seq` says which.
    fn hand_over(&self) -> Result<bool, String> {
        let Some(f) = self.fence_state().filter(|f| !f.handed_over) else { return Ok(false) };
        let applied = {
            let st = self.lock_apply();
            if st.ckpt.applied_seq < f.at_seq && st.holding_resync_at.is_none() {
                return Ok(false);
            }
            st.ckpt.applied_seq
        };
        self.checkpoint()?;
        // Unlocked before the hand-over is published: whoever sees it can take the disks.
        for (p, file) in &self.targets {
            ferry_sys::fs::unlock_one_writer(file).map_err(|e| format!("cannot unlock {}: {e}", p.display()))?;
        }
        let done = Fence { handed_over: true, applied_seq: applied, ..f };
        self.write_fence(&done).map_err(|e| e.to_string())?;
        *self.fence.lock().unwrap_or_else(|p| p.into_inner()) = Some(done.clone());
        tracing::warn!(machine = %self.name, at_seq = done.at_seq, applied_seq = applied, "fenced replica applied: target disks handed over");
        Ok(true)
    }

    pub fn stop(&self) {
        self.stopped.store(true, Ordering::SeqCst);
        self.wake.notify_all();
        self.prune_wake.notify_all();
    }

    pub(crate) fn lock_index(&self) -> MutexGuard<'_, JournalIndex> {
        self.index.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn lock_journal(&self) -> MutexGuard<'_, SegmentLog> {
        self.journal.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn lock_apply(&self) -> MutexGuard<'_, ApplyState> {
        self.apply.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// `lineage.json`: None when there is none yet; an unreadable or corrupt one is an error,
    /// never "none" (that would let any copy in).
    fn read_lineage(&self) -> Result<Option<ferry_protocol::Lineage>, String> {
        let path = self.dir.join(LINEAGE_FILE);
        let data = match std::fs::read(&path) {
            Ok(d) => d,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(None),
            Err(e) => return Err(format!("cannot read {}: {e}", path.display())),
        };
        let l: StoredLineage =
            serde_json::from_slice(&data).map_err(|e| format!("{} is corrupt: {e}", path.display()))?;
        Ok(Some(ferry_protocol::Lineage {
            id: l.id,
            parent: l.parent.map(|(id, seq)| ferry_protocol::LineageParent { id, seq }),
            ancestors: l.ancestors.iter().map(|&(id, seq)| ferry_protocol::LineageParent { id, seq }).collect(),
            initial_sync: false,
        }))
    }

    /// The copy of the machine's disks this replica holds (`lineage.json`), if known.
    pub fn source_lineage(&self) -> Option<ferry_protocol::Lineage> {
        self.read_lineage().ok().flatten()
    }

    /// Take a stream only from the copy this replica holds, or from one starting an initial
    /// sync (it replaces the content, and the lineage is recorded anew). Never deduplicate
    /// another copy's records by machine name.
    pub fn check_lineage(&self, offered: &ferry_protocol::Lineage) -> Result<(), (u32, String, String)> {
        // Adopted disks (the old primary's own) take only the copy the reprotect named: an
        // unknown sender or another copy's initial sync (which skips its holes) would leave
        // the primary's old data where the source has none.
        let adopted = std::fs::read(self.dir.join("targets.json"))
            .ok()
            .and_then(|d| serde_json::from_slice::<TargetsFile>(&d).ok())
            .is_some_and(|t| t.adopted_by.is_some());
        if adopted {
            let held = self.read_lineage().ok().flatten().map(|h| h.id);
            if held != Some(offered.id) || offered.id == 0 {
                return Err((
                    codes::LINEAGE_MISMATCH.code,
                    format!(
                        "the replica of {} adopted the old primary's disks for the copy with lineage {}; this stream comes from lineage {:016x}: nothing was written",
                        self.name,
                        held.map(|h| format!("{h:016x}")).unwrap_or_else(|| "(unreadable)".into()),
                        offered.id
                    ),
                    "run the reprotect again (it names the copy that runs now); a copy whose agent state was lost is compared by hash, never taken as an initial sync onto adopted disks".into(),
                ));
            }
            return Ok(());
        }
        if offered.id == 0 {
            return Ok(());
        }
        let held = self
            .read_lineage()
            .map_err(|e| (codes::STORAGE.code, e, "the replica's lineage file is damaged: check the retention volume (removing the file lets the next copy that connects be recorded)".to_owned()))?;
        match held {
            Some(h) if h.id == offered.id => Ok(()),
            Some(h) if !offered.initial_sync => {
                tracing::warn!(machine = %self.name, held = h.id, offered = offered.id, "a stream from another copy of the machine was refused");
                Err((
                    codes::LINEAGE_MISMATCH.code,
                    format!(
                        "the stream for {} comes from another copy of its disks (lineage {:016x}{}) than the one this replica holds ({:016x}): nothing was written",
                        self.name,
                        offered.id,
                        offered.parent.map(|p| format!(", forked from {:016x} at seq {}", p.id, p.seq)).unwrap_or_default(),
                        h.id
                    ),
                    codes::LINEAGE_MISMATCH.remedy.to_owned(),
                ))
            }
            _ => {
                let l = StoredLineage {
                    id: offered.id,
                    parent: offered.parent.map(|p| (p.id, p.seq)),
                    ancestors: offered
                        .ancestors
                        .iter()
                        .take(ferry_protocol::LINEAGE_HISTORY)
                        .map(|p| (p.id, p.seq))
                        .collect(),
                    since_ms: now_ms(),
                };
                let path = self.dir.join(LINEAGE_FILE);
                serde_json::to_vec(&l)
                    .map_err(std::io::Error::other)
                    .and_then(|d| ferry_sys::fs::write_atomic(&path, &d))
                    .map_err(|e| {
                        (
                            codes::STORAGE.code,
                            format!("cannot write {}: {e}", path.display()),
                            codes::STORAGE.remedy.to_owned(),
                        )
                    })?;
                if held.is_some() {
                    self.push_event(
                        "lineage",
                        format!("an initial sync from copy {:016x} replaces the replica's content", offered.id),
                    );
                }
                Ok(())
            }
        }
    }

    pub fn check_layout(&self, machine: &MachineDescriptor) -> Result<(), (u32, String, String)> {
        if machine.disks != self.disks {
            // The replica's own layout stays in the log: a refusal must not tell a peer what
            // another machine's disks are.
            tracing::warn!(machine = %self.name, offered = ?machine.disks, held = ?self.disks, "disk layout differs from the replica's");
            return Err((
                codes::DISK_LAYOUT_CHANGED.code,
                format!("machine {}'s disk layout differs from the one its replica holds", self.name),
                "a disk was added, removed or resized: re-protect the machine (the master target's log names the difference)".into(),
            ));
        }
        Ok(())
    }

    /// (durable in journal, applied to target disks)
    pub fn positions(&self) -> (u64, u64) {
        let durable = self.lock_journal().synced_seq();
        (durable, *self.applied_tx.borrow())
    }

    pub fn applied_watch(&self) -> watch::Receiver<u64> {
        self.applied_tx.subscribe()
    }

    pub fn subscribe_events(&self) -> broadcast::Receiver<Event> {
        self.events_tx.subscribe()
    }

    fn validate(&self, r: &Record) -> Result<(), String> {
        ferry_protocol::check_record(&self.disks, r)
    }

    /// Append records to the journal and fsync; returns the durable seq (what may be acknowledged).
    /// Records at or below the journal's last seq are duplicates of a resend and are skipped.
    pub fn journal_records(&self, records: Vec<Record>) -> Result<u64, MasterTargetError> {
        let incoming = records.iter().map(|r| r.body.data_len() + 64).sum();
        self.journal_room_check(incoming).map_err(MasterTargetError::Refused)?;
        // The whole batch is checked before anything of it is journaled.
        for r in &records {
            self.validate(r).map_err(MasterTargetError::InvalidRecord)?;
        }
        let mut j = self.lock_journal();
        self.refuse_if_fenced()?;
        let result = self.journal_locked(&mut j, &records);
        if result.is_err() {
            // Nothing of a failed batch may stay half-appended: its resend must be journaled
            // again, with its markers.
            j.discard_unsynced();
            self.lock_history().forget_after(j.synced_seq());
        }
        let (durable, end) = result?;
        drop(j);
        if let Some(e) = end {
            self.latest_end_seq.fetch_max(e, Ordering::SeqCst);
        }
        let _guard = self.lock_apply();
        self.wake.notify_all();
        Ok(durable)
    }

    fn journal_locked(&self, j: &mut SegmentLog, records: &[Record]) -> Result<(u64, Option<u64>), MasterTargetError> {
        let mut end = None;
        let mut bulk_open = None;
        let mut markers = Vec::new();
        for r in records {
            if r.seq <= j.last_seq() {
                continue;
            }
            let prev = j.last_seq();
            j.append(r)?;
            match r.body {
                RecordBody::ResyncEnd { .. } => {
                    end = Some(r.seq.get());
                    bulk_open = Some(false);
                }
                RecordBody::ResyncBegin { reason, .. } if crate::base::bypasses_journal(reason) => {
                    bulk_open = Some(true);
                }
                _ => {}
            }
            markers.extend(Marker::of(r, prev));
            self.journal_last_time_ms.store(r.time_ms, Ordering::Relaxed);
        }
        // Markers are durable before the records they describe (see `history`).
        if !markers.is_empty() {
            self.lock_history().append(&markers)?;
        }
        j.sync()?;
        // Only a durable ResyncBegin opens the replica to bulk data (a crash must not leave bulk
        // on the target that the journal does not explain).
        if let Some(open) = bulk_open {
            self.bulk_open.store(open, Ordering::SeqCst);
        }
        ferry_sys::fail::fail_point("master-target.journal.fsync-before-ack");
        Ok((j.synced_seq(), end))
    }

    /// Initial-sync data: written straight to the target disks (there is no consistent state to
    /// preserve yet), made durable, and reported by id.
    pub fn write_bulk(&self, epoch: u64, chunks: Vec<BulkChunk>) -> Result<Vec<u64>, MasterTargetError> {
        let current = self.bulk_epoch.lock().unwrap_or_else(|p| p.into_inner());
        if *current != epoch {
            return Err(MasterTargetError::Refused(
                "a newer connection for this machine exists: dropping this one's bulk data".into(),
            ));
        }
        self.refuse_if_fenced()?;
        if !self.bulk_open.load(Ordering::SeqCst) {
            return Err(MasterTargetError::BulkOutsideInitialSync { machine: self.name.clone() });
        }
        let mut touched = vec![false; self.targets.len()];
        let mut ids = Vec::with_capacity(chunks.len());
        let mut bytes = 0;
        for c in chunks {
            let d = self.disks.get(c.disk as usize).ok_or_else(|| {
                MasterTargetError::InvalidRecord(format!(
                    "bulk chunk {} names disk {}, machine has {}",
                    c.id,
                    c.disk,
                    self.disks.len()
                ))
            })?;
            let len = if c.data.is_empty() { c.len } else { c.data.len() as u64 };
            if c.offset.checked_add(len).is_none_or(|end| end > d.size) {
                return Err(MasterTargetError::InvalidRecord(format!(
                    "bulk chunk {} writes [{}, +{len}) beyond disk {} of {} bytes",
                    c.id, c.offset, d.name, d.size
                )));
            }
            self.keep_overwritten(c.disk, c.offset, len).map_err(MasterTargetError::Refused)?;
            let (p, f) = &self.targets[c.disk as usize];
            if c.data.is_empty() {
                zero_range(f, c.offset, len).map_err(io(p))?;
            } else {
                f.write_all_at(&c.data, c.offset).map_err(io(p))?;
            }
            touched[c.disk as usize] = true;
            bytes += len;
            ids.push(c.id);
        }
        for (i, t) in touched.iter().enumerate() {
            if *t {
                let (p, f) = &self.targets[i];
                f.sync_data().map_err(io(p))?;
            }
        }
        self.lock_apply().rate.add(bytes);
        Ok(ids)
    }

    /// A new process-server connection: later bulk writes of older ones are refused.
    pub fn new_bulk_epoch(&self) -> u64 {
        let mut e = self.bulk_epoch.lock().unwrap_or_else(|p| p.into_inner());
        *e += 1;
        *e
    }

    pub(crate) fn apply_loop(self: Arc<Self>) {
        let start = self.lock_apply().ckpt.applied_seq;
        let mut cursor = Cursor::after(start);
        let mut last_ckpt = Instant::now();
        let mut dirty = false;
        while !self.stopped.load(Ordering::SeqCst) {
            let step = self.apply_step(&mut cursor, &mut dirty, &mut last_ckpt).and_then(|idle| {
                // Idle with a fence: hand the disks over (an error takes the restart path below).
                let handed = if idle { self.hand_over()? } else { false };
                Ok((idle, handed))
            });
            match step {
                // The target disks are no longer this applier's.
                Ok((_, true)) => return,
                Ok((idle, false)) => {
                    if idle {
                        let g = self.lock_apply();
                        let wait = if dirty { Duration::from_millis(20) } else { Duration::from_millis(200) };
                        let _ = self.wake.wait_timeout(g, wait);
                    }
                }
                Err(e) => {
                    // A full or failing datastore: report, wait, and start again from the last
                    // durable checkpoint (a failed fsync may have dropped written pages).
                    self.fail(e);
                    let restart = {
                        let mut st = self.lock_apply();
                        st.ckpt = st.persisted;
                        st.holding_resync_at = None;
                        st.ckpt.applied_seq
                    };
                    cursor = Cursor::after(restart);
                    dirty = false;
                    std::thread::sleep(Duration::from_secs(1));
                }
            }
        }
        if dirty {
            let _ = self.checkpoint();
        }
    }

    /// Apply one batch; returns whether there was nothing to do (the caller then waits).
    fn apply_step(&self, cursor: &mut Cursor, dirty: &mut bool, last_ckpt: &mut Instant) -> Result<bool, String> {
        let due = {
            let st = self.lock_apply();
            st.ckpt.base_due.then(|| (st.ckpt.applied_seq, st.last_applied_time_ms.max(1)))
        };
        if let Some((seq, time_ms)) = due {
            // The target holds exactly `seq`: nothing after it was applied since base_due was set.
            self.checkpoint()?;
            self.create_base(seq, time_ms)?;
            self.lock_apply().ckpt.base_due = false;
            self.checkpoint()?;
            *dirty = false;
            *last_ckpt = Instant::now();
        }
        let batch =
            self.lock_journal().read_located(cursor, 16 << 20).map_err(|e| format!("cannot read journal: {e}"))?;
        let mut held = false;
        let mut base_next = false;
        let history_on = self.history_on();
        for (rec, loc) in &batch {
            if !self.apply_record(rec)? {
                // Hold at this ResyncBegin: re-read from here once its ResyncEnd is durable.
                *cursor = Cursor::after(rec.seq.get() - 1);
                held = true;
                break;
            }
            *dirty = true;
            {
                // Without history nothing is kept to index; a base taken later starts it again.
                let mut idx = self.lock_index();
                if history_on {
                    idx.add(rec, loc);
                } else {
                    idx.reset(rec.seq.get());
                }
            }
            if self.lock_apply().ckpt.base_due {
                // An initial sync just ended: nothing more is applied until the base is taken.
                *cursor = Cursor::after(rec.seq.get());
                base_next = true;
                break;
            }
        }
        if !base_next && batch.is_empty() && self.history_on() && self.lock_base().state.is_none() {
            // No base yet (history turned on for an existing replica): take it now that
            // everything journaled is applied, so the target holds exactly the journal's end.
            let mut st = self.lock_apply();
            if st.ckpt.consistent && !st.ckpt.in_resync && st.ckpt.applied_seq > 0 && st.holding_resync_at.is_none() {
                st.ckpt.base_due = true;
                base_next = true;
            }
        }
        let applied = self.lock_apply().ckpt.applied_seq;
        self.applied_tx.send_replace(applied);
        if *dirty && (last_ckpt.elapsed() >= self.checkpoint_interval || batch.is_empty() || held) {
            self.checkpoint()?;
            *dirty = false;
            *last_ckpt = Instant::now();
        }
        let had_error = self.lock_apply().error.take();
        if let Some(e) = had_error {
            if !batch.is_empty() {
                tracing::info!(machine = %self.name, previous_error = %e, "applying again");
            } else {
                self.lock_apply().error = Some(e);
            }
        }
        Ok((batch.is_empty() || held) && !base_next)
    }

    fn fail(&self, e: String) {
        tracing::error!(machine = %self.name, error = %e, "applying to the target disks failed; retrying from the last checkpoint");
        self.lock_apply().error = Some(e);
    }

    /// Adopted disks: keep the old primary's blocks of a range before it is written over.
    fn keep_overwritten(&self, disk: u16, offset: u64, len: u64) -> Result<(), String> {
        let mut o = self.overwritten.lock().unwrap_or_else(|p| p.into_inner());
        let Some(o) = o.as_mut() else { return Ok(()) };
        let (p, f) = &self.targets[disk as usize];
        o.save_before(disk as usize, f, offset, len).map_err(|e| {
            format!("cannot keep the old primary's blocks of {} before writing over them: {e}", p.display())
        })
    }

    /// Apply one record. Returns false when it must be held (preserving resync without its end yet).
    fn apply_record(&self, rec: &Record) -> Result<bool, String> {
        match &rec.body {
            RecordBody::Write { disk, offset, data } => {
                self.keep_overwritten(*disk, *offset, data.len() as u64)?;
                let (p, f) = &self.targets[*disk as usize];
                f.write_all_at(data, *offset).map_err(|e| format!("write to {} failed: {e}", p.display()))?;
            }
            RecordBody::Zero { disk, offset, len } => {
                self.keep_overwritten(*disk, *offset, *len)?;
                let (p, f) = &self.targets[*disk as usize];
                zero_range(f, *offset, *len).map_err(|e| format!("zeroing {} failed: {e}", p.display()))?;
            }
            RecordBody::ResyncBegin { preserve_consistent, reason, .. } => {
                let mut st = self.lock_apply();
                if *preserve_consistent
                    && st.ckpt.consistent
                    && self.latest_end_seq.load(Ordering::SeqCst) < rec.seq.get()
                {
                    st.holding_resync_at = Some(rec.seq.get());
                    return Ok(false);
                }
                st.holding_resync_at = None;
                st.ckpt.consistent = false;
                st.ckpt.in_resync = true;
                st.ckpt.initial_sync_open = crate::base::bypasses_journal(*reason);
            }
            RecordBody::ResyncEnd { .. } => {
                if let Some(o) = self.overwritten.lock().unwrap_or_else(|p| p.into_inner()).as_mut() {
                    o.finish().map_err(|e| format!("cannot close the kept primary blocks of {}: {e}", self.name))?;
                }
                let mut st = self.lock_apply();
                st.ckpt.consistent = true;
                st.ckpt.in_resync = false;
                if std::mem::take(&mut st.ckpt.initial_sync_open) && self.history_on() {
                    st.ckpt.base_due = true;
                }
            }
            RecordBody::VerifyChunk { verify_id, disk, offset, block_size, hashes, last } => {
                self.verify(*verify_id, *disk, *offset, *block_size, hashes, *last)?;
            }
            RecordBody::GenerationChange { .. }
            | RecordBody::Tag { .. }
            | RecordBody::GroupPrepare { .. }
            | RecordBody::GroupCommit { .. } => {}
        }
        let mut st = self.lock_apply();
        st.ckpt.applied_seq = rec.seq.get();
        st.last_applied_time_ms = rec.time_ms;
        st.rate.add(rec.body.data_len());
        Ok(true)
    }

    fn verify(
        &self,
        verify_id: u64,
        disk: u16,
        offset: u64,
        block_size: u32,
        hashes: &[u8],
        last: bool,
    ) -> Result<(), String> {
        let (p, f) = &self.targets[disk as usize];
        let size = self.disks[disk as usize].size;
        let bs = block_size.max(512) as u64;
        // A fault test's bit rot: one byte of the first data block of a chunk flipped after the
        // resync, before its comparison, which must find and repair it (only a chunk that holds
        // data counts as a pass, so the flipped byte is always compared right here).
        #[cfg(feature = "testing")]
        {
            let chunk_end = (offset + (hashes.len() / 32) as u64 * bs).min(size);
            let first_data = ferry_sys::fs::next_data(f, offset).ok().flatten().filter(|&d| d < chunk_end);
            if let Some(at) = first_data.filter(|_| ferry_sys::fail::fires("master-target.verify.corrupt-block")) {
                let mut b = [0u8; 1];
                if f.read_exact_at(&mut b, at).is_ok() {
                    b[0] ^= 0xff;
                    match f.write_all_at(&b, at) {
                        Ok(()) => tracing::warn!(offset = at, "failpoint: corrupted one byte of {}", p.display()),
                        Err(e) => {
                            tracing::warn!(offset = at, error = %e, "failpoint: could not corrupt {}", p.display())
                        }
                    }
                }
            }
        }
        let zero_hash = blake3::hash(&vec![0u8; bs as usize]);
        let mut differing = Vec::new();
        let mut buf = vec![0u8; bs as usize];
        let mut compared = 0;
        // Where the next data starts (holes are compared as zeros, without reading them).
        let mut data_at: Option<u64> = None;
        for (i, h) in hashes.chunks_exact(32).enumerate() {
            let off = offset + i as u64 * bs;
            if off >= size {
                break;
            }
            let n = bs.min(size - off) as usize;
            if data_at.is_none_or(|d| d < off) {
                data_at = Some(
                    ferry_sys::fs::next_data(f, off)
                        .map_err(|e| format!("verify of {}: cannot find its data: {e}", p.display()))?
                        .unwrap_or(u64::MAX),
                );
            }
            compared += 1;
            let in_hole = data_at.is_some_and(|d| d >= off + n as u64);
            let ours = if in_hole && n as u64 == bs {
                zero_hash
            } else if in_hole {
                blake3::hash(&vec![0u8; n])
            } else {
                f.read_exact_at(&mut buf[..n], off)
                    .map_err(|e| format!("verify read of {} failed: {e}", p.display()))?;
                blake3::hash(&buf[..n])
            };
            if ours.as_bytes() != h {
                differing.push(off);
            }
        }
        let _ = self.events_tx.send(Event::VerifyResult {
            verify_id,
            disk,
            differing_offsets: differing,
            blocks_compared: compared,
            last,
        });
        Ok(())
    }

    /// Make applied changes durable on the target disks, then record the position and release the journal.
    fn checkpoint(&self) -> Result<(), String> {
        for (p, f) in &self.targets {
            f.sync_data().map_err(|e| format!("fsync of {} failed: {e}", p.display()))?;
        }
        let ckpt = self.lock_apply().ckpt;
        let data = serde_json::to_vec(&ckpt).map_err(|e| e.to_string())?;
        ferry_sys::fs::write_atomic(&self.dir.join("checkpoint.json"), &data).map_err(|e| e.to_string())?;
        // The position is durable, the journal not yet released.
        ferry_sys::fail::fail_point("master-target.checkpoint.write");
        self.lock_apply().persisted = ckpt;
        // With history on, the journal also serves recovery points: keep what the base needs.
        let limit = self.release_limit.load(Ordering::SeqCst);
        self.lock_journal().release_through(ckpt.applied_seq.min(limit)).map_err(|e| e.to_string())?;
        Ok(())
    }

    pub fn status(&self) -> ReplicaStatus {
        let (journaled, journal_bytes) = {
            let j = self.lock_journal();
            (j.synced_seq(), j.bytes())
        };
        let retention = self.retention_status();
        let (points, _) = self.local_points();
        let events: Vec<_> = self.events.lock().unwrap_or_else(|p| p.into_inner()).iter().cloned().collect();
        let mut st = self.lock_apply();
        let applied = st.ckpt.applied_seq;
        let lag = if applied >= journaled {
            0.0
        } else {
            (now_ms().saturating_sub(st.last_applied_time_ms.max(1)) as f64 / 1000.0).max(0.0)
        };
        let mode = if st.holding_resync_at.is_some() {
            "resync (holding consistent state)"
        } else if st.ckpt.in_resync {
            if st.ckpt.consistent {
                "resync"
            } else {
                "resync (target not consistent)"
            }
        } else if st.ckpt.applied_seq == 0 {
            "waiting for initial sync"
        } else {
            "replicating"
        };
        ReplicaStatus {
            machine: self.name.clone(),
            disks: self
                .disks
                .iter()
                .zip(&self.targets)
                .map(|(d, (p, _))| ReplicaDisk { name: d.name.clone(), size: d.size, target: p.clone() })
                .collect(),
            journaled_seq: journaled,
            applied_seq: applied,
            fence: self.fence_state(),
            failover: self.failover_state(),
            failover_order_error: self.order_error.lock().unwrap_or_else(|p| p.into_inner()).clone(),
            failover_cancelled: self.cancelled_state(),
            // Filled in by the master target (it knows the NBD socket).
            test_failover: None,
            test_failover_error: self.test_order_error.lock().unwrap_or_else(|p| p.into_inner()).clone(),
            primary_overwritten: self
                .overwritten
                .lock()
                .unwrap_or_else(|p| p.into_inner())
                .as_ref()
                .map(|o| o.status()),
            consistent: st.ckpt.consistent,
            mode: mode.to_owned(),
            journal_bytes,
            lag_seconds: lag,
            apply_bytes_per_sec: st.rate.bytes_per_sec(),
            error: st.error.clone(),
            retention,
            points: points.len(),
            newest_point: points.last().cloned(),
            events,
        }
    }
}

use crate::point_image::zero_range;

/// The adoption order's files, checked against the machine: one per disk, by name and in order,
/// each an existing regular file (never a link) of the disk's size.
fn check_adoption(
    machine: &MachineDescriptor,
    order: &ferry_api::control::AdoptionOrder,
    retention: &Path,
) -> Result<Vec<PathBuf>, MasterTargetError> {
    let names: Vec<&str> = machine.disks.iter().map(|d| d.name.as_str()).collect();
    let given: Vec<&str> = order.disks.iter().map(|d| d.name.as_str()).collect();
    if names != given {
        return Err(MasterTargetError::Refused(format!(
            "the reprotect of {} adopts disks {given:?}, but its stream has disks {names:?}: reprotect it again (its disks changed)",
            machine.name
        )));
    }
    let mut files = Vec::new();
    for (d, a) in machine.disks.iter().zip(&order.disks) {
        if !a.path.is_absolute() {
            return Err(MasterTargetError::Refused(format!(
                "adopted disk {} is not an absolute path",
                a.path.display()
            )));
        }
        let m = std::fs::symlink_metadata(&a.path).map_err(|e| {
            MasterTargetError::Refused(format!(
                "the old primary's disk {} of {} cannot be adopted ({e}): is its datastore mounted on this master target's host (MT-11)?",
                a.path.display(),
                machine.name
            ))
        })?;
        if !m.file_type().is_file() {
            return Err(MasterTargetError::Refused(format!(
                "the old primary's disk {} is not a regular file: it is not adopted",
                a.path.display()
            )));
        }
        // The path as it is, with no `..` or linked folder in it, outside this master target's
        // own retention volume, and each file once: a planted path cannot point the replica at
        // another replica's files or at Ferry's own state.
        let canonical = std::fs::canonicalize(&a.path).map_err(|e| {
            MasterTargetError::Refused(format!("the old primary's disk {} cannot be resolved: {e}", a.path.display()))
        })?;
        if canonical != a.path {
            return Err(MasterTargetError::Refused(format!(
                "the old primary's disk {} resolves to {}: give its real path (no `..`, no linked folders)",
                a.path.display(),
                canonical.display()
            )));
        }
        let retention = std::fs::canonicalize(retention).unwrap_or_else(|_| retention.to_owned());
        if canonical.starts_with(&retention) {
            return Err(MasterTargetError::Refused(format!(
                "the old primary's disk {} lies in the master target's retention volume {}: it is not adopted",
                a.path.display(),
                retention.display()
            )));
        }
        if files.contains(&canonical) {
            return Err(MasterTargetError::Refused(format!(
                "the old primary's disk {} is named twice: each disk is its own file",
                a.path.display()
            )));
        }
        if m.len() != d.size {
            return Err(MasterTargetError::Refused(format!(
                "the old primary's disk {} is {} bytes, the failed-over disk {} is {} bytes: reprotect to an alternate location (a new disk) instead",
                a.path.display(),
                m.len(),
                d.name,
                d.size
            )));
        }
        files.push(a.path.clone());
    }
    Ok(files)
}

#[cfg(test)]
mod bulk_tests {
    use super::*;
    use ferry_protocol::{Generation, ResyncReason, Seq};

    impl Replica {
        fn config_for_test(&self, dir: &Path) -> MasterTargetConfig {
            config(dir)
        }
    }

    fn config(dir: &Path) -> MasterTargetConfig {
        serde_json::from_value(serde_json::json!({
            "datastore": dir.join("ds"),
            "retention": dir.join("ret"),
            "listen": "127.0.0.1:0",
            "tls": { "ca": "ca.pem", "cert": "mt.pem", "key": "mt.key" },
        }))
        .unwrap()
    }

    /// A replica without an applier, and the token whose cancellation lets it go (its shutdown
    /// task holds it, and with it the target disks' one-writer lock, until then).
    pub(super) fn replica_for_test(dir: &Path) -> (Arc<Replica>, CancellationToken) {
        let config = config(dir);
        std::fs::create_dir_all(dir.join("ds")).unwrap();
        std::fs::create_dir_all(dir.join("ret")).unwrap();
        let machine = MachineDescriptor {
            name: "vm1".into(),
            disks: vec![DiskDescriptor { name: "disk0".into(), size: 1 << 20, uuid: "u0".into() }],
        };
        let name = MachineName::new("vm1").unwrap();
        let shutdown = CancellationToken::new();
        let r = Replica::create(&config, &name, &machine, Exports::new(), shutdown.clone()).unwrap();
        r.stop(); // no applier: the test looks at what is journaled and written only
        (r, shutdown)
    }

    fn record(seq: u64, body: RecordBody) -> Record {
        Record { seq: Seq(seq), time_ms: 1, body }
    }

    /// Disks a disabled protection kept for its failed-over machine are never a new replica's.
    #[test]
    fn no_replica_is_created_over_disks_kept_for_a_failed_over_machine() {
        let dir = tempfile::tempdir().unwrap();
        let config = config(dir.path());
        let kept = dir.path().join("ds/vm1");
        std::fs::create_dir_all(&kept).unwrap();
        std::fs::write(kept.join("disk0.img"), b"the failed-over machine's data").unwrap();
        std::fs::write(kept.join(crate::removal::KEPT_MARKER), b"{}").unwrap();
        std::fs::create_dir_all(dir.path().join("ret")).unwrap();
        let machine = MachineDescriptor {
            name: "vm1".into(),
            disks: vec![DiskDescriptor { name: "disk0".into(), size: 1 << 20, uuid: "u0".into() }],
        };
        let name = MachineName::new("vm1").unwrap();
        let e = Replica::create(&config, &name, &machine, Exports::new(), CancellationToken::new()).err().unwrap();
        assert!(e.to_string().contains("kept for its failed-over machine"), "{e}");
        assert_eq!(std::fs::read(kept.join("disk0.img")).unwrap(), b"the failed-over machine's data", "untouched");
    }

    /// Original-location reprotect: the old primary's files become the target disks as they
    /// are (nothing truncated, moved aside or deleted), only the ordered copy streams in, and a
    /// cut-off adoption of the same order opens again; another order or a mismatch is refused.
    #[tokio::test(flavor = "multi_thread")]
    async fn a_reprotect_adopts_the_old_primarys_files_as_they_are() {
        let dir = tempfile::tempdir().unwrap();
        let config = config(dir.path());
        std::fs::create_dir_all(dir.path().join("ret")).unwrap();
        let primary = dir.path().join("primary-ds/web1");
        std::fs::create_dir_all(&primary).unwrap();
        let disk = primary.join("disk0.img");
        let f = std::fs::File::create(&disk).unwrap();
        f.set_len(1 << 20).unwrap();
        f.write_all_at(b"the primary's data", 4096).unwrap();
        let machine = MachineDescriptor {
            name: "web1.recovery".into(),
            disks: vec![DiskDescriptor { name: "disk0".into(), size: 1 << 20, uuid: "u0".into() }],
        };
        let name = MachineName::new("web1.recovery").unwrap();
        let order = |job: &str, path: &Path| ferry_api::control::AdoptionOrder {
            order: job.into(),
            disks: vec![ferry_api::control::AdoptedDisk { name: "disk0".into(), path: path.to_owned() }],
            lineage: format!("{:016x}", 42),
        };
        // A file of another size, a missing one, a link: refused, nothing made.
        let other = primary.join("small.img");
        std::fs::File::create(&other).unwrap().set_len(4096).unwrap();
        let link = primary.join("link.img");
        std::os::unix::fs::symlink(&disk, &link).unwrap();
        for (p, want) in
            [(&other, "4096 bytes"), (&primary.join("none.img"), "cannot be adopted"), (&link, "not a regular file")]
        {
            let e = Replica::create_adopting(
                &config,
                &name,
                &machine,
                &order("j1", p),
                Exports::new(),
                CancellationToken::new(),
            )
            .err()
            .unwrap();
            assert!(e.to_string().contains(want), "{e}");
        }
        // A path with `..`, one in the retention volume: refused. So is a folder holding an
        // earlier replica's journal (a removal cut off): it would be replayed onto the disks.
        let in_retention = config.retention_dir().join("planted.img");
        std::fs::File::create(&in_retention).unwrap().set_len(1 << 20).unwrap();
        let dotted = primary.join("../web1/disk0.img");
        for (p, want) in [(&dotted, "resolves to"), (&in_retention, "retention volume")] {
            let e = Replica::create_adopting(
                &config,
                &name,
                &machine,
                &order("j1", p),
                Exports::new(),
                CancellationToken::new(),
            )
            .err()
            .unwrap();
            assert!(e.to_string().contains(want), "{e}");
        }
        let stale = config.retention_dir().join("web1.recovery");
        std::fs::create_dir_all(&stale).unwrap();
        std::fs::write(stale.join("checkpoint.json"), b"{}").unwrap();
        let e = Replica::create_adopting(
            &config,
            &name,
            &machine,
            &order("j1", &disk),
            Exports::new(),
            CancellationToken::new(),
        )
        .err()
        .unwrap();
        assert!(
            e.to_string().contains("files of an earlier replica") && e.to_string().contains("checkpoint.json"),
            "{e}"
        );
        std::fs::remove_dir_all(&stale).unwrap();
        let first = CancellationToken::new();
        let r = Replica::create_adopting(&config, &name, &machine, &order("j1", &disk), Exports::new(), first.clone())
            .unwrap();
        assert_eq!(r.targets[0].0, disk);
        let mut buf = [0u8; 18];
        r.targets[0].1.read_exact_at(&mut buf, 4096).unwrap();
        assert_eq!(&buf, b"the primary's data", "adopted as it is");
        assert!(r.check_lineage(&ferry_protocol::Lineage { id: 42, ..Default::default() }).is_ok());
        assert!(
            r.check_lineage(&ferry_protocol::Lineage { id: 7, ..Default::default() }).is_err(),
            "another copy is refused"
        );
        for (l, why) in [
            (
                ferry_protocol::Lineage { id: 7, initial_sync: true, ..Default::default() },
                "another copy's initial sync",
            ),
            (ferry_protocol::Lineage::default(), "a sender without a lineage"),
        ] {
            assert!(r.check_lineage(&l).is_err(), "{why} is refused on adopted disks");
        }
        assert!(r.check_lineage(&ferry_protocol::Lineage { id: 42, ..Default::default() }).is_ok(), "lineage kept");
        assert!(!r.status().consistent, "no recovery point before the first resync ends");
        r.stop();
        first.cancel();
        drop(r);
        // The same order again (a cut-off start) opens it; another order is a leftover.
        // (once the stopped applier let go of the disk)
        let deadline = std::time::Instant::now() + Duration::from_secs(30);
        let again = loop {
            match Replica::create_adopting(
                &config,
                &name,
                &machine,
                &order("j1", &disk),
                Exports::new(),
                CancellationToken::new(),
            ) {
                Err(e)
                    if e.to_string().contains("already open for writing") && std::time::Instant::now() < deadline =>
                {
                    std::thread::sleep(Duration::from_millis(50))
                }
                r => break r,
            }
        };
        let again = again.unwrap();
        assert_eq!(again.targets[0].0, disk);
        again.stop();
        drop(again);
        std::thread::sleep(Duration::from_millis(500));
        let e = Replica::create_adopting(
            &config,
            &name,
            &machine,
            &order("j2", &disk),
            Exports::new(),
            CancellationToken::new(),
        )
        .err()
        .unwrap();
        assert!(e.to_string().contains("already holds a replica"), "{e}");
        assert!(disk.exists(), "the primary's disk stays");
    }

    fn chunk(id: u64) -> BulkChunk {
        BulkChunk { id, disk: 0, offset: 0, len: 4096, data: vec![7; 4096] }
    }

    /// Bulk data lands only while the replica has no consistent state or an initial sync is
    /// open in the journal; after the ResyncEnd (and after a reopen) it is refused.
    #[tokio::test(flavor = "multi_thread")]
    async fn bulk_is_taken_only_inside_an_initial_sync() {
        let dir = tempfile::tempdir().unwrap();
        let (r, mut shutdown) = replica_for_test(dir.path());
        let epoch = r.new_bulk_epoch();
        // A new replica (nothing journaled yet): the initial sync's data may come first.
        assert_eq!(r.write_bulk(epoch, vec![chunk(1)]).unwrap(), vec![1]);
        let begin = RecordBody::ResyncBegin {
            generation: Generation(1),
            reason: ResyncReason::InitialSync,
            preserve_consistent: false,
        };
        r.journal_records(vec![record(1, begin)]).unwrap();
        assert_eq!(r.write_bulk(epoch, vec![chunk(2)]).unwrap(), vec![2]);
        r.journal_records(vec![record(2, RecordBody::ResyncEnd { generation: Generation(1) })]).unwrap();
        let e = r.write_bulk(epoch, vec![chunk(3)]).unwrap_err();
        assert!(matches!(e, MasterTargetError::BulkOutsideInitialSync { .. }), "{e}");
        // A resync that keeps the ordered log (a later resync) does not open it either.
        let resync = RecordBody::ResyncBegin {
            generation: Generation(1),
            reason: ResyncReason::LogOverflow,
            preserve_consistent: true,
        };
        r.journal_records(vec![record(3, resync)]).unwrap();
        assert!(r.write_bulk(epoch, vec![chunk(4)]).is_err());
        // An invalid chunk is an invalid record, not a storage error.
        let bad = BulkChunk { id: 5, disk: 9, offset: 0, len: 1, data: vec![1] };
        r.journal_records(vec![record(
            4,
            RecordBody::ResyncBegin {
                generation: Generation(1),
                reason: ResyncReason::InitialSync,
                preserve_consistent: false,
            },
        )])
        .unwrap();
        assert!(matches!(r.write_bulk(epoch, vec![bad]).unwrap_err(), MasterTargetError::InvalidRecord(_)));
        // Reopened (a master-target restart), the open initial sync still takes its data; once
        // ended, a reopen refuses it.
        let config = r.config_for_test(dir.path());
        drop(r);
        let name = MachineName::new("vm1").unwrap();
        // The old replica's threads let go of the target disks (their one-writer lock) as they end.
        let reopen = |previous: &CancellationToken| {
            previous.cancel();
            let deadline = std::time::Instant::now() + std::time::Duration::from_secs(20);
            loop {
                let token = CancellationToken::new();
                match Replica::reopen(&config, &name, Exports::new(), token.clone()) {
                    Ok(r) => return (r, token),
                    Err(e) if std::time::Instant::now() < deadline && e.to_string().contains("one writer") => {
                        std::thread::sleep(std::time::Duration::from_millis(20))
                    }
                    Err(e) => panic!("{e}"),
                }
            }
        };
        let (r, next) = reopen(&shutdown);
        shutdown = next;
        r.stop();
        let epoch = r.new_bulk_epoch();
        assert_eq!(r.write_bulk(epoch, vec![chunk(6)]).unwrap(), vec![6]);
        r.journal_records(vec![record(5, RecordBody::ResyncEnd { generation: Generation(1) })]).unwrap();
        drop(r);
        let (r, _shutdown) = reopen(&shutdown);
        r.stop();
        let epoch = r.new_bulk_epoch();
        assert!(r.write_bulk(epoch, vec![chunk(7)]).is_err());
    }
}

#[cfg(test)]
mod fence_tests {
    use super::bulk_tests::replica_for_test;
    use super::*;
    use ferry_protocol::{Generation, ResyncReason, Seq};

    /// A fence stops the journal at its head; the disks are handed over once applied there — or,
    /// when the applier holds the consistent state for a resync run the fence cut off (its end can
    /// never come now), at that state; nothing is taken after the fence, also after a reopen.
    #[tokio::test(flavor = "multi_thread")]
    async fn a_fence_hands_the_disks_over_even_inside_a_cut_off_resync() {
        let dir = tempfile::tempdir().unwrap();
        let (r, _shutdown) = replica_for_test(dir.path());
        let rec = |seq: u64, body: RecordBody| Record { seq: Seq(seq), time_ms: 1, body };
        let write = |seq| rec(seq, RecordBody::Write { disk: 0, offset: 0, data: vec![seq as u8; 4096] });
        let begin = RecordBody::ResyncBegin {
            generation: Generation(3),
            reason: ResyncReason::LogOverflow,
            preserve_consistent: true,
        };
        r.journal_records(vec![write(1), rec(2, begin), write(3)]).unwrap();
        {
            // What the applier does at the ResyncBegin: seq 1 applied, holding at 2.
            let mut st = r.lock_apply();
            st.ckpt.applied_seq = 1;
            st.holding_resync_at = Some(2);
        }
        assert!(!r.hand_over().unwrap(), "no fence, no hand-over");
        let f = r.set_fence("drill").unwrap();
        assert_eq!((f.at_seq, f.handed_over), (3, false));
        assert!(matches!(r.journal_records(vec![write(4)]).unwrap_err(), MasterTargetError::Fenced { .. }));
        assert!(r.hand_over().unwrap());
        let f = r.fence_state().unwrap();
        assert_eq!((f.at_seq, f.handed_over, f.applied_seq), (3, true, 1), "handed over at the consistent state");
        assert!(ferry_sys::fs::WriterLock::open(&r.targets[0].0, "the failed-over machine's agent").is_ok());
        assert_eq!(r.set_fence("again").unwrap(), f, "the first fence stands");
    }
}
