//! Failover of a replica's machine: after the fence has handed the target disks over (they hold
//! the journal's head A), put them at the chosen recovery point P, keeping the files (and so the
//! disk identities) — in time proportional to the writes after P, found through the
//! [`JournalIndex`]: only the extents written in (P, A] (and those the machine wrote at the
//! recovery site, when the point changes later) are rewritten, each with its content at P (the
//! newest journal record at or before P, or the base).
//!
//! `failover.json` beside the journal is written before the disks are touched (phase
//! `restoring`) and again once they hold P durably (`at-point`); a master target restarted
//! mid-restore finishes it before anything else uses the disks. The journal after P stays (a
//! fenced replica is never pruned), so the reprotect can send back exactly what differs.

use std::fs::File;
use std::os::unix::fs::FileExt;
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_api::master_target::{CancelledFailover, DiscardedWrites, DiskExtent, Failover, FailoverPhase};
use ferry_journal::Cursor;
use ferry_protocol::now_ms;

use crate::history::Point;
use crate::journal_index::{JournalIndex, Piece};
use crate::point_image::zero_range;
use crate::recovery::PointError;
use crate::replica::Replica;

#[derive(Debug, thiserror::Error)]
pub enum FailoverError {
    /// The failover's state does not allow this (9019).
    #[error("{0}")]
    State(String),
    /// Another writer holds a target disk (9032).
    #[error("{0}")]
    DiskInUse(String),
    #[error(transparent)]
    Point(#[from] PointError),
    #[error("{0}")]
    Storage(String),
}

impl FailoverError {
    /// The registry's code for this error.
    pub fn code(&self) -> ferry_types::ErrorCode {
        use ferry_protocol::codes;
        match self {
            FailoverError::State(_) => codes::FAILOVER_STATE,
            FailoverError::DiskInUse(_) => codes::DISK_IN_USE,
            FailoverError::Storage(_) => codes::STORAGE,
            FailoverError::Point(p) => match p {
                PointError::NotFound(_) => codes::POINT_NOT_FOUND,
                PointError::Conflict(_) => codes::CONFLICT,
                PointError::Invalid(_) => codes::BAD_REQUEST,
                PointError::Failed(_) => codes::MATERIALIZE_FAILED,
            },
        }
    }
}

pub use ferry_api::master_target::{FAILOVER_SEED_FILE, RECOVERY_WRITES_FILE};

/// Beside the journal: the last cancelled failover.
const CANCELLED_FILE: &str = "failover-cancelled.json";

/// The last cancelled failover of the replica in `dir`; a corrupt record refuses the start (it
/// may be the only trace of a cancel to finish).
pub(crate) fn read_cancelled(dir: &std::path::Path) -> Result<Option<CancelledFailover>, crate::MasterTargetError> {
    let path = dir.join(CANCELLED_FILE);
    match std::fs::read(&path) {
        Ok(d) => serde_json::from_slice(&d).map(Some).map_err(|e| {
            crate::MasterTargetError::Refused(format!(
                "{} is corrupt ({e}): restore it, or remove it if the failover it names was not being cancelled",
                path.display()
            ))
        }),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(None),
        Err(e) => Err(crate::io_at(&path)(e)),
    }
}

/// Whether a recorded cancel is to be finished at open: its fence is the one on disk, the
/// failover record is the cancel's own restore (or already removed), and no report of writes at
/// the recovery site came after it (the report goes first when the files are removed, so one
/// that is there now may be newer than the restore: then the cancel is asked again and restores).
pub(crate) fn cancel_to_finish(
    cancelled: Option<&CancelledFailover>,
    fence: Option<&ferry_api::master_target::Fence>,
    failover: Option<&Failover>,
    tdir: &std::path::Path,
) -> bool {
    let Some(c) = cancelled else { return false };
    let (Some(cf), Some(f)) = (c.fence.as_ref(), fence) else { return false };
    let own_restore = failover
        .is_none_or(|x| x.phase == FailoverPhase::AtPoint && x.order == c.order && x.point.seq == c.restored_seq);
    cf == f && own_restore && !tdir.join(RECOVERY_WRITES_FILE).exists()
}

/// Take every target disk's one-writer lock, or none.
pub(crate) fn lock_all(targets: &[(std::path::PathBuf, File)], holder: &str) -> Result<(), String> {
    let mut locked = Vec::new();
    for (p, f) in targets {
        if let Err(e) = ferry_sys::fs::lock_one_writer(f, p, holder) {
            for g in locked {
                let _ = ferry_sys::fs::unlock_one_writer(g);
            }
            return Err(e.to_string());
        }
        locked.push(f);
    }
    Ok(())
}

fn unlock_all(targets: &[(std::path::PathBuf, File)]) {
    for (_, f) in targets {
        let _ = ferry_sys::fs::unlock_one_writer(f);
    }
}

/// Remove the files of a failover (the report of recovery-site writes first, the fence last,
/// each removal durable): what remains after a crash in between still says "fenced", never
/// "replicating with a failover half-undone".
pub(crate) fn remove_failover_files(dir: &std::path::Path, tdir: &std::path::Path) -> Result<(), String> {
    for p in [tdir.join(RECOVERY_WRITES_FILE), tdir.join(FAILOVER_SEED_FILE), dir.join("failover.json")] {
        match std::fs::remove_file(&p) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(format!("cannot remove {}: {e}", p.display())),
        }
    }
    for d in [dir, tdir] {
        ferry_sys::fs::sync_dir(d).map_err(|e| format!("cannot sync {}: {e}", d.display()))?;
    }
    let fence = dir.join("fence.json");
    match std::fs::remove_file(&fence) {
        Ok(()) => {}
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
        Err(e) => return Err(format!("cannot remove {}: {e}", fence.display())),
    }
    ferry_sys::fs::sync_dir(dir).map_err(|e| format!("cannot sync {}: {e}", dir.display()))
}

/// How long a failover request waits for the applier to reach the fence.
const HAND_OVER_WAIT: Duration = Duration::from_secs(30);

impl Replica {
    /// A file beside the target disks (the machine's folder in its datastore).
    pub fn failover_file(&self, name: &str) -> std::path::PathBuf {
        let dir = self.targets.first().and_then(|(p, _)| p.parent()).unwrap_or(&self.dir);
        dir.join(name)
    }

    /// Every extent names a disk of the machine and lies inside it.
    fn check_extents(&self, writes: &[DiskExtent]) -> Result<(), FailoverError> {
        for w in writes {
            let d = self.disks.iter().find(|d| d.name == w.disk).ok_or_else(|| {
                PointError::Invalid(format!("recovery write on disk {:?}, which {} does not have", w.disk, self.name))
            })?;
            if w.offset.checked_add(w.length).is_none_or(|end| end > d.size) {
                return Err(PointError::Invalid(format!(
                    "recovery write {}+{} lies outside disk {} ({} bytes)",
                    w.offset, w.length, d.name, d.size
                ))
                .into());
            }
        }
        Ok(())
    }

    /// What the machine wrote at the recovery site, as its agent reported after a clean stop.
    fn recovery_writes_reported(&self) -> Result<Vec<DiskExtent>, FailoverError> {
        let path = self.failover_file(RECOVERY_WRITES_FILE);
        let data = match std::fs::read(&path) {
            Ok(d) => d,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(Vec::new()),
            Err(e) => return Err(FailoverError::Storage(format!("cannot read {}: {e}", path.display()))),
        };
        let w: ferry_api::agent::RecoveryWrites = serde_json::from_slice(&data)
            .map_err(|e| FailoverError::Storage(format!("{} is corrupt: {e}", path.display())))?;
        if !w.clean {
            return Err(FailoverError::DiskInUse(format!(
                "the machine at the recovery site runs, or did not stop cleanly ({} says so): what it wrote is not known here; shut it down cleanly (or start and shut it down once more), then retry",
                path.display()
            )));
        }
        Ok(w.extents)
    }

    pub fn failover_state(&self) -> Option<Failover> {
        self.failover.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    fn write_failover(&self, f: &Failover) -> Result<(), FailoverError> {
        let path = self.dir.join("failover.json");
        let data = serde_json::to_vec_pretty(f).map_err(|e| FailoverError::Storage(e.to_string()))?;
        ferry_sys::fs::write_atomic(&path, &data)
            .map_err(|e| FailoverError::Storage(format!("cannot write {}: {e}", path.display())))?;
        *self.failover.lock().unwrap_or_else(|p| p.into_inner()) = Some(f.clone());
        Ok(())
    }

    /// Refuse a failover that is committed; fence the replica and wait (bounded) until the
    /// applier handed the disks over. Returns the seq they hold.
    pub fn fence_for_failover(&self, reason: &str) -> Result<u64, FailoverError> {
        if let Some(f) = self.failover_state().filter(|f| f.phase == FailoverPhase::Committed) {
            return Err(FailoverError::State(format!(
                "the failover of {} to {} is committed: its recovery point cannot change",
                self.name, f.point.id
            )));
        }
        self.set_fence(reason).map_err(|e| FailoverError::Storage(e.to_string()))?;
        let deadline = Instant::now() + HAND_OVER_WAIT;
        loop {
            let f = self.fence_state().ok_or_else(|| FailoverError::State("the fence vanished".into()))?;
            if f.handed_over {
                return Ok(f.applied_seq);
            }
            if Instant::now() >= deadline {
                let applied = self.positions().1;
                return Err(FailoverError::State(format!(
                    "{} is fenced at seq {} but its journal is applied only to seq {applied}: the disks are not handed over yet; retry the failover (nothing was changed)",
                    self.name, f.at_seq
                )));
            }
            std::thread::sleep(Duration::from_millis(100));
        }
    }

    /// Put the handed-over disks at `point` (or at another point, before commit).
    /// `recovery_writes` are extents the machine wrote at the recovery site since: they are put
    /// back too, now and at every later change of point.
    pub fn failover_to(
        &self,
        point: Point,
        recovery_writes: Vec<DiskExtent>,
        order: Option<String>,
    ) -> Result<Failover, FailoverError> {
        let _op = self.failover_op.lock().unwrap_or_else(|p| p.into_inner());
        self.void_pending_cancel()?;
        self.failover_to_locked(point, recovery_writes, order, false)
    }

    /// A recorded cancel whose fence still stands is void once the failover goes on (a change
    /// of point, a commit): it must never be finished at a later start.
    fn void_pending_cancel(&self) -> Result<(), FailoverError> {
        let pending = self.cancelled_state().is_some_and(|c| c.fence.is_some() && c.fence == self.fence_state());
        if !pending {
            return Ok(());
        }
        let path = self.dir.join(CANCELLED_FILE);
        std::fs::remove_file(&path)
            .and_then(|_| ferry_sys::fs::sync_dir(&self.dir))
            .map_err(|e| FailoverError::Storage(format!("cannot remove {}: {e}", path.display())))?;
        *self.cancelled.lock().unwrap_or_else(|p| p.into_inner()) = None;
        Ok(())
    }

    /// [`Replica::failover_to`], the caller holding `failover_op` (and, with `disks_locked`,
    /// the disks' one-writer locks: they are then neither taken nor released here).
    fn failover_to_locked(
        &self,
        point: Point,
        recovery_writes: Vec<DiskExtent>,
        order: Option<String>,
        disks_locked: bool,
    ) -> Result<Failover, FailoverError> {
        let fence = self.fence_state().filter(|f| f.handed_over).ok_or_else(|| {
            FailoverError::State(format!("{} is not fenced and handed over: fail it over first", self.name))
        })?;
        let head = fence.applied_seq;
        let prev = self.failover_state();
        if let Some(f) = prev.as_ref().filter(|f| f.phase == FailoverPhase::Committed) {
            return Err(FailoverError::State(format!(
                "the failover of {} to {} is committed: its recovery point cannot change",
                self.name, f.point.id
            )));
        }
        if point.seq > head {
            return Err(PointError::Invalid(format!(
                "point {} lies after seq {head}, the last consistent state the disks were handed over at (a resync the fence cut off): choose `latest-processed` or an earlier point",
                point.id
            ))
            .into());
        }
        // Initial-sync data bypasses the journal: what it wrote after the point is in no index.
        if let Some(begin) = self.lock_history().initial_sync_begin_after(point.seq).filter(|b| *b <= head) {
            return Err(PointError::Invalid(format!(
                "an initial sync began at seq {begin}, after point {}: its data never passed through the journal, so the disks cannot be put back before it; choose a point after the initial sync ended",
                point.id
            ))
            .into());
        }
        let mut writes = prev.as_ref().map(|f| f.recovery_writes.clone()).unwrap_or_default();
        writes.extend(recovery_writes);
        self.check_extents(&writes)?;
        let restore_after = prev.as_ref().map_or(head, |f| f.restored_after_seq).min(point.seq);
        let slot = self.lock_base();
        let base_seq = match &slot.state {
            Some(s) if self.history_on() => {
                if s.advancing_to.is_some() {
                    return Err(PointError::Conflict(format!(
                        "a pruning step of {} failed part-way; see the events and retry",
                        self.name
                    ))
                    .into());
                }
                if point.seq < s.seq {
                    return Err(PointError::NotFound(format!(
                        "point {} was pruned (history now starts at seq {})",
                        point.id, s.seq
                    ))
                    .into());
                }
                s.seq
            }
            // No history: the disks can be only where they are.
            _ if point.seq == head && writes.is_empty() => head,
            _ => {
                return Err(PointError::NotFound(format!(
                    "{} keeps no history (retention window 0): it can fail over only to `latest`, the seq {head} its disks hold, before its machine wrote at the recovery site",
                    self.name
                ))
                .into())
            }
        };
        // Nobody else may write the disks meanwhile (the machine at the recovery site holds
        // them while it runs).
        if !disks_locked {
            if let Err(e) = lock_all(&self.targets, &format!("the master target failing {} over", self.name)) {
                return Err(FailoverError::DiskInUse(format!(
                    "{e}; the failover of {} to {} needs the disks",
                    self.name, point.id
                )));
            }
        }
        // Read under the disks' lock: the machine at the recovery site cannot start (and
        // write) between reading its report and the restore.
        let result = (|| {
            let mut writes = writes;
            if prev.is_some() {
                // A change of point also undoes what the machine wrote at the recovery site.
                let reported = self.recovery_writes_reported()?;
                self.check_extents(&reported)?;
                writes.extend(reported);
                writes.sort_by(|a, b| (&a.disk, a.offset, a.length).cmp(&(&b.disk, b.offset, b.length)));
                writes.dedup();
            }
            self.restore(&slot, base_seq, head, restore_after, point, writes, prev, order)
        })();
        drop(slot);
        if !disks_locked {
            unlock_all(&self.targets);
        }
        result
    }

    #[allow(clippy::too_many_arguments)]
    fn restore(
        &self,
        slot: &crate::base::BaseSlot,
        base_seq: u64,
        head: u64,
        restore_after: u64,
        point: Point,
        writes: Vec<DiskExtent>,
        prev: Option<Failover>,
        order: Option<String>,
    ) -> Result<Failover, FailoverError> {
        let mut earlier = prev.as_ref().map(|f| f.earlier_points.clone()).unwrap_or_default();
        if let Some(p) = prev.as_ref().filter(|f| f.phase != FailoverPhase::Restoring && f.point.seq != point.seq) {
            earlier.push(p.point.clone());
        }
        let mut state = Failover {
            phase: FailoverPhase::Restoring,
            point: point.clone(),
            handed_over_seq: head,
            discarded: prev.as_ref().map(|f| f.discarded.clone()).unwrap_or_default(),
            restored_bytes: 0,
            restored_after_seq: restore_after,
            started_ms: prev.as_ref().map_or(now_ms(), |f| f.started_ms),
            at_point_ms: None,
            committed_ms: None,
            earlier_points: earlier,
            recovery_writes: writes,
            order,
        };
        // Durable before the disks change: a restart finishes the restore.
        self.write_failover(&state)?;
        ferry_sys::fail::fail_point("master-target.failover.restoring");
        let index = self.index_for(base_seq, head)?;
        let mut restored = 0;
        let mut buf = Vec::new();
        let mut seed = Vec::new();
        for (d, (path, target)) in self.targets.iter().enumerate() {
            let name = &self.disks[d].name;
            let mut ranges = index.written_after(d, restore_after);
            ranges.extend(state.recovery_writes.iter().filter(|w| &w.disk == name).map(|w| (w.offset, w.length)));
            let ranges = merge(ranges);
            seed.extend(ranges.iter().map(|&(offset, length)| DiskExtent { disk: name.to_string(), offset, length }));
            for (off, len, piece) in index.content_at(d, base_seq, point.seq, &ranges) {
                let io =
                    |e: std::io::Error| FailoverError::Storage(format!("restoring {} failed: {e}", path.display()));
                match piece {
                    Piece::Zero => zero_range(target, off, len).map_err(io)?,
                    Piece::Base => {
                        let (_, base) = slot
                            .files
                            .get(d)
                            .ok_or_else(|| FailoverError::Storage(format!("the base of disk {name} is not open")))?;
                        copy_at(base, off, target, off, len, &mut buf).map_err(io)?;
                    }
                    Piece::Journal { seg_first, offset } => {
                        let (_, seg) = self.lock_journal().segment_file(seg_first).ok_or_else(|| {
                            FailoverError::Storage(format!(
                                "journal segment {seg_first} is gone; the point cannot be restored"
                            ))
                        })?;
                        copy_at(&seg, offset, target, off, len, &mut buf).map_err(io)?;
                    }
                }
                restored += len;
            }
            target
                .sync_data()
                .map_err(|e| FailoverError::Storage(format!("fsync of {} failed: {e}", path.display())))?;
        }
        ferry_sys::fail::fail_point("master-target.failover.restored");
        // Beside the disks, for the machine's agent at the recovery site: what it must count
        // as changed (the primary holds something else there, or nothing).
        let source = self.source_lineage();
        let seed = ferry_api::agent::FailoverSeed {
            machine: self.name.to_string(),
            lineage: source.as_ref().map_or(0, |l| l.id),
            // The new copy's ancestors: the held copy's parent, then its ancestors.
            lineage_ancestors: source
                .as_ref()
                .map(|l| l.parent.iter().chain(l.ancestors.iter()).map(|p| (p.id, p.seq)).collect())
                .unwrap_or_default(),
            point: point.id.clone(),
            point_seq: point.seq,
            extents: seed,
        };
        let path = self.failover_file(FAILOVER_SEED_FILE);
        serde_json::to_vec(&seed)
            .map_err(std::io::Error::other)
            .and_then(|d| ferry_sys::fs::write_atomic(&path, &d))
            .map_err(|e| FailoverError::Storage(format!("cannot write {}: {e}", path.display())))?;
        state.discarded = self.discarded_after(&index, point.seq, head);
        state.restored_bytes = restored;
        state.phase = FailoverPhase::AtPoint;
        state.at_point_ms = Some(now_ms());
        self.write_failover(&state)?;
        tracing::warn!(
            machine = %self.name, point = %point.id, restored_bytes = restored,
            discarded_bytes = state.discarded.bytes, "failed-over disks are at the recovery point"
        );
        self.push_event(
            "failover",
            format!(
                "the target disks are at point {} ({} bytes put back); {}",
                point.id, restored, state.discarded.note
            ),
        );
        Ok(state)
    }

    /// The index covering (base, head]: the live one when it does, else one read from the
    /// journal now (after a restart, until the background indexing has caught up).
    fn index_for(&self, base_seq: u64, head: u64) -> Result<JournalIndex, FailoverError> {
        {
            let idx = self.lock_index();
            if idx.covers(base_seq, head) {
                return Ok(idx.clone());
            }
        }
        self.scan_index(base_seq, head).map_err(FailoverError::Storage)
    }

    /// Index the journal's records in (from, to] (one read of them).
    pub(crate) fn scan_index(&self, from: u64, to: u64) -> Result<JournalIndex, String> {
        let mut idx = JournalIndex::new(self.disks.len(), from);
        let mut cursor = Cursor::after(from);
        'outer: loop {
            let batch = self
                .lock_journal()
                .read_located(&mut cursor, 16 << 20)
                .map_err(|e| format!("cannot read the journal: {e}"))?;
            if batch.is_empty() {
                break;
            }
            for (r, loc) in batch {
                if r.seq.get() > to {
                    break 'outer;
                }
                idx.add(&r, &loc);
            }
        }
        if idx.through_seq() < to {
            return Err(format!("the journal ends at seq {} before seq {to}", idx.through_seq()));
        }
        Ok(idx)
    }

    fn discarded_after(&self, index: &JournalIndex, seq: u64, head: u64) -> DiscardedWrites {
        let bytes: u64 = (0..self.disks.len()).flat_map(|d| index.written_after(d, seq)).map(|(_, len)| len).sum();
        if head <= seq {
            return DiscardedWrites {
                note: "no write after the point: nothing the recovery site holds was discarded; writes the primary acknowledged but never shipped are known only at reprotect".into(),
                ..Default::default()
            };
        }
        let (records, times) = index.records_after(seq);
        let (first, last) = (times.map(|t| t.0), times.map(|t| t.1));
        DiscardedWrites {
            bytes,
            records,
            first_seq: Some(seq + 1),
            last_seq: Some(head),
            first_time_ms: first,
            last_time_ms: last,
            note: format!(
                "{records} write records after the point (seqs {}..={head}, {bytes} bytes of extents) that the recovery site holds were discarded from the failed-over disks; the journal keeps them for the reprotect; writes the primary acknowledged but never shipped are known only at reprotect",
                seq + 1
            ),
        }
    }

    /// Commit: the point cannot change any more.
    pub fn commit_failover(&self, order: Option<String>) -> Result<Failover, FailoverError> {
        let _op = self.failover_op.lock().unwrap_or_else(|p| p.into_inner());
        self.void_pending_cancel()?;
        let mut f = self
            .failover_state()
            .ok_or_else(|| FailoverError::State(format!("{} is not failed over: nothing to commit", self.name)))?;
        match f.phase {
            FailoverPhase::Committed => {
                return Err(FailoverError::State(format!(
                    "the failover of {} to {} is already committed",
                    self.name, f.point.id
                )))
            }
            FailoverPhase::Restoring => {
                return Err(FailoverError::State(format!(
                    "the disks of {} are still being put at {}: commit once they are",
                    self.name, f.point.id
                )))
            }
            FailoverPhase::AtPoint => {}
        }
        f.phase = FailoverPhase::Committed;
        f.committed_ms = Some(now_ms());
        f.order = order;
        self.write_failover(&f)?;
        self.push_event("failover-committed", format!("failover to {} committed", f.point.id));
        Ok(f)
    }

    pub fn cancelled_state(&self) -> Option<CancelledFailover> {
        self.cancelled.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Cancel the failover (before commit): the disks go back to the seq they were handed over
    /// at — the journal's head at the fence, the primary's state — by putting back, from the
    /// journal, every extent written since (the recovery site's writes, as its agent reported
    /// them after a clean stop, and the writes after the point). Then the fence is lifted and
    /// the applier runs again: the primary's stream resumes where it stopped, nothing of it
    /// lost. Recorded (`failover-cancelled.json`) before the fence goes, so a crash in between
    /// finishes the cancel at the next start. Cancelling again with the same order changes
    /// nothing.
    pub fn cancel_failover(self: &Arc<Self>, order: Option<String>) -> Result<CancelledFailover, FailoverError> {
        let _op = self.failover_op.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(c) = self.cancelled_state().filter(|c| order.is_some() && c.order == order) {
            if c.fence.is_none() || self.fence_state() != c.fence {
                return Ok(c);
            }
            // Recorded, not finished (the disks were busy, a removal failed): done again in
            // full below, restore included — the disks may have been written since.
        }
        let Some(fence) = self.fence_state() else {
            // Never fenced (a failover stopped before its fence): nothing to undo. Recorded all
            // the same, so the order counts as carried out.
            let c = CancelledFailover {
                order,
                fence: None,
                point: None,
                restored_seq: self.positions().1,
                recovery_writes: Vec::new(),
                recovery_write_bytes: 0,
                restored_bytes: 0,
                at_ms: now_ms(),
            };
            self.write_cancelled(&c)?;
            return Ok(c);
        };
        if !fence.handed_over {
            return Err(FailoverError::State(format!(
                "{} is fenced at seq {} but its journal is not applied that far yet: retry the cancel in a moment",
                self.name, fence.at_seq
            )));
        }
        if fence.applied_seq != fence.at_seq {
            return Err(FailoverError::State(format!(
                "{} was fenced inside a resync (its disks were handed over at seq {}, the journal holds seq {}): the primary's resync cannot resume from there; commit the failover and reprotect, or disable protection and protect {} again",
                self.name, fence.applied_seq, fence.at_seq, self.name
            )));
        }
        let prev = self.failover_state();
        if let Some(f) = prev.as_ref().filter(|f| f.phase == FailoverPhase::Committed) {
            return Err(FailoverError::State(format!(
                "the failover of {} to {} is committed: it cannot be cancelled (reprotect the machine to replicate back)",
                self.name, f.point.id
            )));
        }
        // From the restore until the applier runs, the disks stay locked: nobody writes them
        // between what the cancel puts back and what the applier applies next.
        lock_all(&self.targets, &format!("the master target's applier for {}", self.name)).map_err(|e| {
            FailoverError::DiskInUse(format!(
                "{e}; the cancel of the failover of {} needs the disks (is the machine at the recovery site running?)",
                self.name
            ))
        })?;
        let result = self.cancel_locked(order, fence, prev);
        if result.is_err() && self.fence_state().is_some() {
            unlock_all(&self.targets);
        }
        result
    }

    fn cancel_locked(
        self: &Arc<Self>,
        order: Option<String>,
        fence: ferry_api::master_target::Fence,
        prev: Option<Failover>,
    ) -> Result<CancelledFailover, FailoverError> {
        let head = fence.applied_seq;
        let (point, writes, restored) = match &prev {
            // Fenced, never put at a point: the disks hold the head; nobody ran on them (a
            // report of writes now would be newer than any cancel: refuse rather than guess).
            None => {
                if self.failover_file(RECOVERY_WRITES_FILE).exists() {
                    return Err(FailoverError::DiskInUse(format!(
                        "{} says the machine ran at the recovery site on disks that were never put at a point: what it wrote cannot be undone from the journal; commit the failover and reprotect",
                        self.failover_file(RECOVERY_WRITES_FILE).display()
                    )));
                }
                (None, Vec::new(), 0)
            }
            Some(f) => {
                let at = Point {
                    id: format!("{}@{head}", self.name),
                    machine: self.name.to_string(),
                    seq: head,
                    time_ms: fence.time_ms,
                    kind: ferry_api::master_target::PointKind::Crash,
                    scope: ferry_api::master_target::PointScope::Single,
                    group: None,
                    group_tag: None,
                    generation: self.base_generation(),
                    origin: ferry_api::master_target::PointOrigin::Latest,
                };
                let back = self.failover_to_locked(at, Vec::new(), order.clone(), true)?;
                // The original point, not the cancel's own restore (a retried cancel finds that).
                let point = if f.order.is_some() && f.order == order { None } else { Some(f.point.clone()) };
                (point, back.recovery_writes, back.restored_bytes)
            }
        };
        let recovery_write_bytes =
            merge(writes.iter().map(|w| (w.offset, w.length)).collect::<Vec<_>>()).iter().map(|r| r.1).sum::<u64>();
        let point = point.or_else(|| self.cancelled_state().and_then(|c| c.point));
        let c = CancelledFailover {
            order,
            fence: Some(fence),
            point,
            restored_seq: head,
            recovery_writes: writes,
            recovery_write_bytes,
            restored_bytes: restored,
            at_ms: now_ms(),
        };
        self.write_cancelled(&c)?;
        ferry_sys::fail::fail_point("master-target.failover.cancel-recorded");
        self.finish_cancel(&c)?;
        Ok(c)
    }

    fn write_cancelled(&self, c: &CancelledFailover) -> Result<(), FailoverError> {
        let path = self.dir.join(CANCELLED_FILE);
        let data = serde_json::to_vec_pretty(c).map_err(|e| FailoverError::Storage(e.to_string()))?;
        ferry_sys::fs::write_atomic(&path, &data)
            .map_err(|e| FailoverError::Storage(format!("cannot write {}: {e}", path.display())))?;
        *self.cancelled.lock().unwrap_or_else(|p| p.into_inner()) = Some(c.clone());
        Ok(())
    }

    /// The cancel is recorded, the disks are back and locked for the applier: remove what
    /// says "failed over" (the fence last) and start the applier.
    fn finish_cancel(self: &Arc<Self>, c: &CancelledFailover) -> Result<(), FailoverError> {
        let tdir = self.targets.first().and_then(|(p, _)| p.parent()).unwrap_or(&self.dir);
        remove_failover_files(&self.dir, tdir).map_err(FailoverError::Storage)?;
        *self.failover.lock().unwrap_or_else(|p| p.into_inner()) = None;
        *self.fence.lock().unwrap_or_else(|p| p.into_inner()) = None;
        *self.order_error.lock().unwrap_or_else(|p| p.into_inner()) = None;
        let r = self.clone();
        std::thread::Builder::new().name(format!("apply-{}", self.name)).spawn(move || r.apply_loop()).map_err(
            |e| FailoverError::Storage(format!("cannot start the applier thread: {e} (restart the master target)")),
        )?;
        self.wake.notify_all();
        self.prune_wake.notify_all();
        tracing::warn!(machine = %self.name, seq = c.restored_seq, recovery_write_bytes = c.recovery_write_bytes, "failover cancelled: the fence is lifted, replication resumes");
        self.push_event(
            "failover-cancelled",
            format!(
                "failover cancelled: the disks are back at seq {} ({} bytes put back; {} bytes the machine wrote at the recovery site discarded); the fence is lifted",
                c.restored_seq, c.restored_bytes, c.recovery_write_bytes
            ),
        );
        Ok(())
    }

    /// At start: a restore that a crash interrupted is finished before the disks are used.
    pub(crate) fn resume_failover(self: &Arc<Self>) {
        let Some(f) = self.failover_state().filter(|f| f.phase == FailoverPhase::Restoring) else { return };
        let r = self.clone();
        let spawned = std::thread::Builder::new().name(format!("failover-{}", self.name)).spawn(move || {
            // Until then the disks are locked by nobody: the phase says they are not ready.
            while !r.stopped.load(Ordering::SeqCst) {
                // Only the restore that was interrupted: a later cancel or change ends this.
                let same = r.failover_state().is_some_and(|x| {
                    x.phase == FailoverPhase::Restoring && x.order == f.order && x.point.seq == f.point.seq
                });
                if !same || r.fence_state().is_none() {
                    return;
                }
                match r.failover_to(f.point.clone(), Vec::new(), f.order.clone()) {
                    Ok(_) => return,
                    Err(e) => {
                        r.push_event(
                            "failover-error",
                            format!("finishing the restore to {} failed: {e}; retrying", f.point.id),
                        );
                        std::thread::sleep(Duration::from_secs(2));
                    }
                }
            }
        });
        if let Err(e) = spawned {
            self.push_event("failover-error", format!("cannot start the restore thread: {e}"));
        }
    }
}

impl crate::MasterTarget {
    /// Fence `machine`'s replica (waiting for the hand-over), resolve `reference` and put the
    /// disks there: the path of both the API and the configuration server's orders.
    pub fn fail_over(
        &self,
        machine: &str,
        reference: &str,
        reason: &str,
        recovery_writes: Vec<DiskExtent>,
        order: Option<String>,
    ) -> Result<Failover, FailoverError> {
        let r = self
            .replica(machine)
            .ok_or_else(|| PointError::NotFound(format!("machine {machine:?} is not replicated here")))?;
        let head = r.fence_for_failover(reason)?;
        let point = if !r.history_on() && reference == "latest" {
            // No history: `latest` is what the disks hold.
            Point {
                id: format!("{machine}@{head}"),
                machine: machine.to_owned(),
                seq: head,
                time_ms: now_ms(),
                kind: ferry_api::master_target::PointKind::Crash,
                scope: ferry_api::master_target::PointScope::Single,
                group: None,
                group_tag: None,
                generation: r.base_generation(),
                origin: ferry_api::master_target::PointOrigin::Latest,
            }
        } else {
            self.resolve_point(machine, reference)?
        };
        r.failover_to(point, recovery_writes, order)
    }

    /// Carry out the configuration server's failover orders (settings `machine_failovers`): each
    /// once, in its own thread; the outcome shows in the replica's status (`failover.order`, or
    /// `failover_order_error`). An order already carried out, or that failed, is not repeated:
    /// the job that gave it decides what comes next.
    pub(crate) fn follow_failover_orders(self: &Arc<Self>) {
        let orders = self.failover_orders.lock().unwrap_or_else(|p| p.into_inner()).clone();
        for (machine, o) in &orders {
            let Some(r) = self.replica(machine) else {
                tracing::warn!(%machine, order = %o.order, "failover order for a machine this master target does not hold");
                continue;
            };
            let done = if o.cancel {
                r.cancelled_state().is_some_and(|c| c.order.as_deref() == Some(o.order.as_str()))
                    && r.fence_state().is_none()
            } else {
                r.failover_state().is_some_and(|f| {
                    f.order.as_deref() == Some(o.order.as_str()) && f.phase != FailoverPhase::Restoring
                })
            };
            let failed =
                r.order_error.lock().unwrap_or_else(|p| p.into_inner()).as_ref().is_some_and(|e| e.order == o.order);
            if done || failed || r.order_busy.swap(true, Ordering::SeqCst) {
                continue;
            }
            let (mt, o, machine) = (self.clone(), o.clone(), machine.clone());
            let spawned = std::thread::Builder::new().name(format!("order-{machine}")).spawn(move || {
                let result = if o.cancel {
                    r.cancel_failover(Some(o.order.clone()))
                        .map(|c| format!("cancelled, disks at seq {}", c.restored_seq))
                } else if o.commit {
                    r.commit_failover(Some(o.order.clone())).map(|f| format!("committed at {}", f.point.id))
                } else {
                    mt.fail_over(&machine, &o.point, &o.reason, Vec::new(), Some(o.order.clone()))
                        .map(|f| format!("disks at {}", f.point.id))
                };
                let mut err = r.order_error.lock().unwrap_or_else(|p| p.into_inner());
                match result {
                    Ok(what) => {
                        tracing::info!(%machine, order = %o.order, %what, "failover order carried out");
                        *err = None;
                    }
                    Err(e) => {
                        tracing::warn!(%machine, order = %o.order, error = %e, "failover order failed");
                        r.push_event("failover-order-failed", format!("order {}: {e}", o.order));
                        *err = Some(ferry_api::master_target::FailoverOrderError {
                            order: o.order.clone(),
                            code: e.code().code,
                            message: e.to_string(),
                            at_ms: now_ms(),
                        });
                    }
                }
                drop(err);
                r.order_busy.store(false, Ordering::SeqCst);
                // An order that arrived meanwhile was skipped: look again.
                mt.follow_failover_orders();
            });
            if let Err(e) = spawned {
                tracing::error!(error = %e, "cannot start a failover order thread");
            }
        }
    }
}

fn merge(mut ranges: Vec<(u64, u64)>) -> Vec<(u64, u64)> {
    ranges.retain(|r| r.1 > 0);
    ranges.sort_unstable();
    let mut out: Vec<(u64, u64)> = Vec::new();
    for (s, l) in ranges {
        match out.last_mut() {
            Some((ls, ll)) if s <= *ls + *ll => *ll = (*ll).max(s + l - *ls),
            _ => out.push((s, l)),
        }
    }
    out
}

fn copy_at(src: &File, src_off: u64, dst: &File, dst_off: u64, len: u64, buf: &mut Vec<u8>) -> std::io::Result<()> {
    let mut done = 0;
    while done < len {
        let n = (len - done).min(8 << 20) as usize;
        buf.resize(n, 0);
        src.read_exact_at(&mut buf[..n], src_off + done)?;
        dst.write_all_at(&buf[..n], dst_off + done)?;
        done += n as u64;
    }
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::MasterTargetConfig;
    use ferry_nbd::Exports;
    use ferry_protocol::{
        DiskDescriptor, Generation, MachineDescriptor, MachineName, Record, RecordBody, ResyncReason, Seq, TagKind,
    };
    use tokio_util::sync::CancellationToken;

    const SIZE: u64 = 1 << 20;

    fn replica(dir: &std::path::Path) -> (Arc<Replica>, CancellationToken) {
        let config = test_config(dir);
        std::fs::create_dir_all(dir.join("ds")).unwrap();
        std::fs::create_dir_all(dir.join("ret")).unwrap();
        let machine = MachineDescriptor {
            name: "vm1".into(),
            disks: vec![DiskDescriptor { name: "disk0".into(), size: SIZE, uuid: "u0".into() }],
        };
        let shutdown = CancellationToken::new();
        let r = Replica::create(&config, &MachineName::new("vm1").unwrap(), &machine, Exports::new(), shutdown.clone())
            .unwrap();
        (r, shutdown)
    }

    fn test_config(dir: &std::path::Path) -> MasterTargetConfig {
        serde_json::from_value(serde_json::json!({
            "datastore": dir.join("ds"),
            "retention": dir.join("ret"),
            "listen": "127.0.0.1:0",
            "tls": { "ca": "ca.pem", "cert": "mt.pem", "key": "mt.key" },
            "checkpoint_interval_secs": 0.05,
        }))
        .unwrap()
    }

    fn replay(records: &[Record], upto: u64) -> Vec<u8> {
        let mut d = vec![0u8; SIZE as usize];
        for r in records.iter().filter(|r| r.seq.get() <= upto) {
            match &r.body {
                RecordBody::Write { offset, data, .. } => {
                    d[*offset as usize..*offset as usize + data.len()].copy_from_slice(data)
                }
                RecordBody::Zero { offset, len, .. } => d[*offset as usize..(*offset + *len) as usize].fill(0),
                _ => {}
            }
        }
        d
    }

    /// Lineage at the hello: the copy the replica holds, another copy, an initial sync.
    #[tokio::test(flavor = "multi_thread", worker_threads = 2)]
    async fn a_replica_takes_streams_only_from_the_copy_it_holds() {
        use ferry_protocol::{Lineage, LineageParent};
        let dir = tempfile::tempdir().unwrap();
        let (r, _shutdown) = replica(dir.path());
        let primary = Lineage { id: 7, parent: None, ancestors: Vec::new(), initial_sync: true };
        r.check_lineage(&primary).unwrap();
        assert_eq!(r.source_lineage().map(|l| l.id), Some(7), "the first copy is recorded");
        r.check_lineage(&Lineage { initial_sync: false, ..primary.clone() }).unwrap();
        // A failed-over copy (forked from 7) with the same machine name: refused, not deduplicated.
        let fork = Lineage {
            id: 9,
            parent: Some(LineageParent { id: 7, seq: 150 }),
            ancestors: vec![LineageParent { id: 3, seq: 40 }],
            initial_sync: false,
        };
        let (code, msg, _) = r.check_lineage(&fork).unwrap_err();
        assert_eq!(code, ferry_protocol::codes::LINEAGE_MISMATCH.code);
        assert!(msg.contains("forked from") && msg.contains("nothing was written"), "{msg}");
        assert_eq!(r.source_lineage().map(|l| l.id), Some(7), "a refusal changes nothing");
        // A new copy that copies everything (a reinstalled agent's initial sync) replaces it.
        r.check_lineage(&Lineage { initial_sync: true, ..fork.clone() }).unwrap();
        let held = r.source_lineage().unwrap();
        assert_eq!((held.id, held.parent, held.ancestors.len()), (9, fork.parent, 1), "its history is kept");
        r.check_lineage(&Lineage { id: 11, parent: None, ancestors: Vec::new(), initial_sync: true }).unwrap();
        assert_eq!(r.source_lineage().map(|l| l.id), Some(11));
        assert!(r.check_lineage(&primary).is_ok(), "an initial sync of the old copy may replace it again");
        assert!(r.check_lineage(&Lineage { id: 11, ..Default::default() }).is_err(), "then 11 is another copy");
        assert!(r.check_lineage(&Lineage::default()).is_ok(), "an unknown lineage (an old sender) is taken as before");
    }

    fn index_written_after(r: &Replica, seq: u64) -> Vec<(u64, u64)> {
        r.lock_index().written_after(0, seq)
    }

    /// The disks go to the chosen point, then to an earlier and a later one (recovery-site
    /// writes put back each time), each compared byte for byte with a replay of the journal;
    /// the report counts exactly the writes after the point; commit freezes the point.
    #[tokio::test(flavor = "multi_thread")]
    async fn the_disks_are_exactly_at_each_chosen_point_and_commit_freezes_it() {
        let dir = tempfile::tempdir().unwrap();
        let (r, _shutdown) = replica(dir.path());
        let rec = |seq: u64, body| Record { seq: Seq(seq), time_ms: 1_000 + seq, body };
        let mut records = vec![
            rec(
                1,
                RecordBody::ResyncBegin {
                    generation: Generation(1),
                    reason: ResyncReason::InitialSync,
                    preserve_consistent: false,
                },
            ),
            rec(2, RecordBody::ResyncEnd { generation: Generation(1) }),
        ];
        let mut x: u64 = 42;
        let mut rnd = move |n: u64| {
            x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
            (x >> 33) % n
        };
        for seq in 3..=300u64 {
            let body = match seq {
                60 | 150 | 220 => RecordBody::Tag { id: format!("t{seq}"), kind: TagKind::CrashConsistent },
                _ if seq % 11 == 0 => RecordBody::Zero { disk: 0, offset: rnd(SIZE / 512 - 64) * 512, len: 16 << 10 },
                _ => {
                    let len = (1 + rnd(64)) * 512;
                    let offset = rnd((SIZE - len) / 512) * 512;
                    RecordBody::Write { disk: 0, offset, data: vec![(seq % 251) as u8 + 1; len as usize] }
                }
            };
            records.push(rec(seq, body));
        }
        r.journal_records(records.clone()).unwrap();
        let mut applied = r.applied_watch();
        tokio::time::timeout(Duration::from_secs(60), applied.wait_for(|s| *s >= 300)).await.unwrap().unwrap();
        let head = tokio::task::block_in_place(|| r.fence_for_failover("test")).unwrap();
        assert_eq!(head, 300);
        // The live index is the one a read of the journal gives (what a restarted master target uses).
        assert_eq!(r.scan_index(2, 300).unwrap(), *r.lock_index());
        let points = r.local_points().0;
        let at = |seq: u64| points.iter().find(|p| p.seq == seq).cloned().unwrap();
        let target = || std::fs::read(&r.targets[0].0).unwrap();

        let f = r.failover_to(at(150), Vec::new(), None).unwrap();
        assert_eq!(f.phase, FailoverPhase::AtPoint);
        assert!(target() == replay(&records, 150), "the disk is at seq 150");
        let data_after = records
            .iter()
            .filter(|x| x.seq.get() > 150 && matches!(x.body, RecordBody::Write { .. } | RecordBody::Zero { .. }))
            .count();
        assert_eq!(f.discarded.records as usize, data_after);
        assert_eq!((f.discarded.first_seq, f.discarded.last_seq), (Some(151), Some(300)));
        assert_eq!((f.discarded.first_time_ms, f.discarded.last_time_ms), (Some(1_151), Some(1_300)));
        assert!(f.restored_bytes > 0 && f.restored_bytes < SIZE, "only what changed after the point is rewritten");

        // The machine writes at the recovery site; then the point changes to an earlier one.
        let ours = std::fs::OpenOptions::new().write(true).open(&r.targets[0].0).unwrap();
        ours.write_all_at(&[0xee; 8192], 4096 * 100).unwrap();
        let wrote = vec![DiskExtent { disk: "disk0".into(), offset: 4096 * 100, length: 8192 }];
        let f = r.failover_to(at(60), wrote, None).unwrap();
        assert!(target() == replay(&records, 60), "the disk is at seq 60, recovery writes undone");
        assert_eq!(f.earlier_points.iter().map(|p| p.seq).collect::<Vec<_>>(), vec![150]);
        // And forward again: everything after the lowest point chosen is put back.
        ours.write_all_at(&[0xdd; 512], 4096 * 100).unwrap();
        let f = r.failover_to(at(220), Vec::new(), None).unwrap();
        assert!(target() == replay(&records, 220), "the disk is at seq 220");
        assert_eq!(f.restored_after_seq, 60);
        // The seed beside the disks names every extent put back since the lowest point.
        let seed: ferry_api::agent::FailoverSeed =
            serde_json::from_slice(&std::fs::read(r.failover_file(FAILOVER_SEED_FILE)).unwrap()).unwrap();
        assert_eq!(seed.point, at(220).id);
        let mut want = index_written_after(&r, 60);
        want.push((4096 * 100, 8192));
        let have: u64 = seed.extents.iter().map(|e| e.length).sum();
        assert_eq!(have, merge(want).iter().map(|r| r.1).sum::<u64>());

        // The machine's agent at the recovery site says what it wrote beside the disks: while it
        // runs (or after a crash) nothing is known and the point cannot change; after a clean
        // stop its writes are undone with the change.
        let report = |clean: bool, extents: Vec<DiskExtent>| {
            let w = ferry_api::agent::RecoveryWrites { machine: "vm1".into(), clean, extents };
            std::fs::write(r.failover_file(RECOVERY_WRITES_FILE), serde_json::to_vec(&w).unwrap()).unwrap();
        };
        report(false, Vec::new());
        assert!(matches!(r.failover_to(at(150), Vec::new(), None), Err(FailoverError::DiskInUse(_))));
        ours.write_all_at(&[0xcc; 4096], 4096 * 200).unwrap();
        report(true, vec![DiskExtent { disk: "disk0".into(), offset: 4096 * 200, length: 4096 }]);
        let f = r.failover_to(at(220), Vec::new(), None).unwrap();
        assert!(target() == replay(&records, 220), "the reported recovery write is undone");
        assert!(f.recovery_writes.iter().any(|w| w.offset == 4096 * 200), "and kept for later changes: {f:?}");

        let bad = vec![DiskExtent { disk: "disk9".into(), offset: 0, length: 1 }];
        assert!(matches!(r.failover_to(at(220), bad, None), Err(FailoverError::Point(PointError::Invalid(_)))));
        let outside = vec![DiskExtent { disk: "disk0".into(), offset: SIZE - 1, length: 2 }];
        assert!(matches!(r.failover_to(at(220), outside, None), Err(FailoverError::Point(PointError::Invalid(_)))));

        // Another writer holds the disk: refused, nothing changed.
        let lock = ferry_sys::fs::WriterLock::open(&r.targets[0].0, "the machine's agent").unwrap();
        assert!(matches!(r.failover_to(at(60), Vec::new(), None), Err(FailoverError::DiskInUse(_))));
        assert!(target() == replay(&records, 220));
        drop(lock);

        let c = r.commit_failover(None).unwrap();
        assert_eq!((c.phase, c.point.seq), (FailoverPhase::Committed, 220));
        assert!(matches!(r.commit_failover(None), Err(FailoverError::State(_))));
        assert!(matches!(r.failover_to(at(150), Vec::new(), None), Err(FailoverError::State(_))));
        assert!(matches!(r.fence_for_failover("again"), Err(FailoverError::State(_))));
        let saved: Failover = serde_json::from_slice(&std::fs::read(r.dir.join("failover.json")).unwrap()).unwrap();
        assert_eq!(saved, c);
    }

    /// Cancel: the disks go back to the head (the recovery site's reported writes and the
    /// writes after the point undone), the fence is lifted, new records apply again; a crash
    /// after the cancel was recorded (fence file still there) is finished at the next start.
    #[tokio::test(flavor = "multi_thread")]
    async fn a_cancelled_failover_puts_the_disks_back_at_the_head_and_replication_resumes() {
        let dir = tempfile::tempdir().unwrap();
        let (r, shutdown) = replica(dir.path());
        let rec = |seq: u64, body| Record { seq: Seq(seq), time_ms: 1_000 + seq, body };
        let mut records = vec![
            rec(
                1,
                RecordBody::ResyncBegin {
                    generation: Generation(1),
                    reason: ResyncReason::InitialSync,
                    preserve_consistent: false,
                },
            ),
            rec(2, RecordBody::ResyncEnd { generation: Generation(1) }),
        ];
        for seq in 3..=100u64 {
            let body = match seq {
                50 => RecordBody::Tag { id: "t50".into(), kind: TagKind::CrashConsistent },
                _ => RecordBody::Write { disk: 0, offset: (seq * 7919 % 200) * 4096, data: vec![seq as u8; 4096] },
            };
            records.push(rec(seq, body));
        }
        r.journal_records(records.clone()).unwrap();
        let mut applied = r.applied_watch();
        tokio::time::timeout(Duration::from_secs(60), applied.wait_for(|s| *s >= 100)).await.unwrap().unwrap();
        let none = r.cancel_failover(Some("job0/cancel".into())).unwrap();
        assert!(none.fence.is_none() && none.restored_bytes == 0, "never fenced: nothing undone, recorded: {none:?}");
        tokio::task::block_in_place(|| r.fence_for_failover("test")).unwrap();
        let at50 = r.local_points().0.into_iter().find(|p| p.seq == 50).unwrap();
        r.failover_to(at50, Vec::new(), None).unwrap();
        let target = || std::fs::read(&r.targets[0].0).unwrap();
        assert!(target() == replay(&records, 50));
        // The machine at the recovery site wrote, stopped cleanly and said what it wrote.
        let ours = std::fs::OpenOptions::new().write(true).open(&r.targets[0].0).unwrap();
        ours.write_all_at(&[0xee; 8192], SIZE - 8192).unwrap();
        let w = ferry_api::agent::RecoveryWrites {
            machine: "vm1".into(),
            clean: true,
            extents: vec![DiskExtent { disk: "disk0".into(), offset: SIZE - 8192, length: 8192 }],
        };
        std::fs::write(r.failover_file(RECOVERY_WRITES_FILE), serde_json::to_vec(&w).unwrap()).unwrap();

        let c = tokio::task::block_in_place(|| r.cancel_failover(Some("job/cancel".into()))).unwrap();
        assert!(target() == replay(&records, 100), "the disk holds the head again: the primary's state");
        assert_eq!((c.restored_seq, c.recovery_write_bytes), (100, 8192));
        assert_eq!(c.point.as_ref().map(|p| p.seq), Some(50));
        assert!(r.fence_state().is_none() && r.failover_state().is_none());
        assert!(!r.failover_file(RECOVERY_WRITES_FILE).exists() && !r.failover_file(FAILOVER_SEED_FILE).exists());
        let again = tokio::task::block_in_place(|| r.cancel_failover(Some("job/cancel".into()))).unwrap();
        assert_eq!(again, c, "the same order again changes nothing");
        // The primary's stream resumes: new records are taken and applied.
        let more: Vec<Record> = (101..=120u64)
            .map(|seq| rec(seq, RecordBody::Write { disk: 0, offset: seq * 4096, data: vec![0x5a; 4096] }))
            .collect();
        r.journal_records(more.clone()).unwrap();
        records.extend(more);
        tokio::time::timeout(Duration::from_secs(60), applied.wait_for(|s| *s >= 120)).await.unwrap().unwrap();
        assert!(target() == replay(&records, 120));

        // A crash between the record and the fence's removal: the next start finishes it.
        let config = test_config(dir.path());
        tokio::task::block_in_place(|| r.fence_for_failover("again")).unwrap();
        let fence = r.fence_state().unwrap();
        let c2 = CancelledFailover {
            order: Some("job2/cancel".into()),
            fence: Some(fence),
            point: None,
            restored_seq: 120,
            recovery_writes: Vec::new(),
            recovery_write_bytes: 0,
            restored_bytes: 0,
            at_ms: 1,
        };
        std::fs::write(r.dir.join(CANCELLED_FILE), serde_json::to_vec(&c2).unwrap()).unwrap();
        let name = ferry_protocol::MachineName::new("vm1").unwrap();
        drop(r);
        shutdown.cancel();
        let deadline = Instant::now() + Duration::from_secs(20);
        let r = loop {
            let token = CancellationToken::new();
            match Replica::reopen(&config, &name, Exports::new(), token.clone()) {
                Ok(r) => break r,
                Err(e) if Instant::now() < deadline => {
                    let _ = e;
                    std::thread::sleep(Duration::from_millis(20))
                }
                Err(e) => panic!("{e}"),
            }
        };
        assert!(r.fence_state().is_none(), "the recorded cancel was finished at start");
        assert_eq!(r.cancelled_state(), Some(c2.clone()));
        r.journal_records(vec![rec(121, RecordBody::Write { disk: 0, offset: 0, data: vec![1; 4096] })]).unwrap();
        let mut applied = r.applied_watch();
        tokio::time::timeout(Duration::from_secs(60), applied.wait_for(|s| *s >= 121)).await.unwrap().unwrap();

        // A recorded cancel is void once the failover goes on (here: a point is taken).
        tokio::task::block_in_place(|| r.fence_for_failover("third")).unwrap();
        let c3 = CancelledFailover { order: Some("job3/cancel".into()), fence: r.fence_state(), ..c2 };
        std::fs::write(r.dir.join(CANCELLED_FILE), serde_json::to_vec(&c3).unwrap()).unwrap();
        *r.cancelled.lock().unwrap() = Some(c3);
        let at50 = r.local_points().0.into_iter().find(|p| p.seq == 50).unwrap();
        r.failover_to(at50, Vec::new(), None).unwrap();
        assert!(r.cancelled_state().is_none() && !r.dir.join(CANCELLED_FILE).exists(), "the pending cancel is void");
        r.stop();
    }

    /// Initial-sync data does not pass through the journal: a point before an initial sync
    /// that the fence cut into cannot be restored from it, and says so.
    #[tokio::test(flavor = "multi_thread")]
    async fn a_point_before_a_later_initial_sync_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let (r, _shutdown) = replica(dir.path());
        let rec = |seq: u64, body| Record { seq: Seq(seq), time_ms: seq, body };
        let begin = || RecordBody::ResyncBegin {
            generation: Generation(1),
            reason: ResyncReason::InitialSync,
            preserve_consistent: false,
        };
        let write = |seq: u64| rec(seq, RecordBody::Write { disk: 0, offset: 0, data: vec![seq as u8; 4096] });
        let records = vec![
            rec(1, begin()),
            rec(2, RecordBody::ResyncEnd { generation: Generation(1) }),
            write(3),
            rec(4, RecordBody::Tag { id: "t".into(), kind: TagKind::CrashConsistent }),
            write(5),
            rec(6, begin()),
            write(7),
        ];
        r.journal_records(records).unwrap();
        let mut applied = r.applied_watch();
        tokio::time::timeout(Duration::from_secs(60), applied.wait_for(|s| *s >= 7)).await.unwrap().unwrap();
        tokio::task::block_in_place(|| r.fence_for_failover("test")).unwrap();
        let p =
            r.local_points().0.into_iter().find(|p| p.seq == 4).expect("the point before the initial sync is listed");
        match r.failover_to(p, Vec::new(), None) {
            Err(FailoverError::Point(PointError::Invalid(m))) => assert!(m.contains("initial sync"), "{m}"),
            other => panic!("{other:?}"),
        }
    }
}
