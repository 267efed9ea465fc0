//! Recovery points of one replica: the frozen base, pruning, materialization and changed extents.
//!
//! Layout under `<retention>/<machine>/`:
//! - `journal/` — every record after the base (the redo journal, kept for the
//!   retention window instead of being released once applied);
//! - `base-<epoch>/<disk>.img` + `base.json` — the disks at seq `base.seq`, frozen while any
//!   materialization pins them; pruning advances the base by replaying the oldest journal records;
//! - `history.jsonl` — the markers (tags, resyncs, group tags) the point list is computed from;
//! - `materializations.json` — images and exports that pin their point and base.
//!
//! Architecture Invariant: a disk at point k = base (at seq b ≤ k) + journal records (b, k]. The
//! journal is released only through min(base seq, applied checkpoint, every pin's base seq), and the
//! base advances only while nothing pins it, so every listed point and every pinned one can be
//! rebuilt after a crash of any component.
//!
//! Size: base, pruning, materialization and changes share the base slot and its pins; the split into base/prune/materialize is planned (docs/limitations.md).

use std::collections::HashMap;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;
use std::time::Duration;

use ferry_journal::Cursor;
use ferry_nbd::{Backend, CowBackend, Export};
use ferry_protocol::{now_ms, RecordBody};

use ferry_api::master_target::{Changes, DiskChanges, Extent, PointKind, PointOrigin, PointScope, RetentionStatus};

use crate::history::{Marker, MarkerKind, Point};
use crate::point_image::{self, ExtentMap, PointBackend, PointDisk, Source};
use crate::replica::Replica;
use crate::MasterTargetError;

use crate::base::BaseSlot;
pub use crate::base::BaseState;

pub use ferry_api::master_target::{
    ImageFormat, Materialization, MaterializationKind, MaterializeRequest, MaterializedAs,
};

#[derive(Debug, thiserror::Error)]
pub enum PointError {
    #[error("{0}")]
    NotFound(String),
    #[error("{0}")]
    Conflict(String),
    #[error("{0}")]
    Invalid(String),
    #[error("{0}")]
    Failed(String),
}

impl PointError {
    pub fn remedy(&self) -> &'static str {
        match self {
            PointError::NotFound(_) => {
                "list the points (`ferry master-target points`) and choose one inside the retention window"
            }
            PointError::Conflict(_) => "wait for the resync to finish, or choose `latest-processed`",
            PointError::Invalid(_) => "fix the request (see `ferry master-target --help`)",
            PointError::Failed(_) => "check the master target's log, disk space and that qemu-utils is installed",
        }
    }
}

/// Journal bytes replayed into the base between two releases of journal segments.
const PRUNE_BATCH: u64 = 4 << 20;
/// The largest write one record carries (an NBD request).
const MAX_RECORD: u64 = 32 << 20;

/// Free-space thresholds of a retention volume of `total` bytes, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) struct SpaceLimits {
    /// Below this much free space the oldest points are pruned early, inside the window.
    pub reserve: u64,
    /// Records that would leave less than this free are refused (the process server retries).
    pub floor: u64,
}

/// The reserve is `min_free_percent` of the volume; the floor a quarter of it, and at least the
/// room pruning needs to make progress (the largest record plus two pruning batches and two
/// journal segments: pruning fills the base's holes before it frees segments, one batch at a
/// time). The reserve is never below twice that room, so early pruning always starts before
/// records are refused: on a small volume the percentage alone would put the refusal floor above
/// the reserve, and the volume would stall for good with nothing pruning.
pub(crate) fn space_limits(total: u64, min_free_percent: f64, segment_bytes: u64) -> SpaceLimits {
    let room = MAX_RECORD + 2 * (PRUNE_BATCH + segment_bytes);
    let share = (total as f64 * min_free_percent / 100.0) as u64;
    SpaceLimits { reserve: share.max(2 * room), floor: (share / 4).max(room) }
}

pub(crate) fn statvfs_free(path: &Path) -> Option<(u64, u64)> {
    ferry_sys::fs::space(path).ok().map(|s| (s.available, s.total))
}

fn allocated_bytes(path: &Path) -> u64 {
    use std::os::unix::fs::MetadataExt;
    std::fs::metadata(path).map(|m| m.blocks() * 512).unwrap_or(0)
}

impl Replica {
    pub(crate) fn history_on(&self) -> bool {
        !self.window().is_zero()
    }

    fn base_dir(&self, epoch: u64) -> PathBuf {
        self.dir.join(format!("base-{epoch}"))
    }

    pub(crate) fn push_event(&self, kind: &str, message: String) {
        let mut ev = self.events.lock().unwrap_or_else(|p| p.into_inner());
        // The same event again within 10 s is not news.
        if ev
            .back()
            .is_some_and(|e| e.kind == kind && e.message == message && now_ms().saturating_sub(e.time_ms) < 10_000)
        {
            return;
        }
        tracing::warn!(machine = %self.name, kind, "{message}");
        ev.push_back(ferry_api::Event { time_ms: now_ms(), kind: kind.to_owned(), message });
        while ev.len() > 50 {
            ev.pop_front();
        }
    }

    /// Load `base.json`, finish an interrupted pruning step and open the base files.
    pub(crate) fn open_base(&self) -> Result<(), MasterTargetError> {
        let path = self.dir.join("base.json");
        let state: Option<BaseState> = match std::fs::read(&path) {
            Ok(d) => Some(
                serde_json::from_slice(&d)
                    .map_err(|e| MasterTargetError::Refused(format!("{} is corrupt: {e}", path.display())))?,
            ),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => None,
            Err(source) => return Err(MasterTargetError::Io { path, source }),
        };
        let Some(state) = state else { return Ok(()) };
        let released = self.lock_journal().released_seq();
        if released > state.seq {
            // History was off for a while (the journal was released past the base): the base can
            // no longer be brought forward. Start history again from a new base.
            self.push_event(
                "history-restarted",
                format!(
                    "the journal was released through seq {released}, past the base at seq {}: older recovery points are gone; a new base will be taken",
                    state.seq
                ),
            );
            let _ = std::fs::remove_file(&path);
            let _ = std::fs::remove_dir_all(self.base_dir(state.epoch));
            return Ok(());
        }
        let files = self.open_base_files(state.epoch)?;
        let mut slot = self.lock_base();
        slot.state = Some(state.clone());
        slot.files = files;
        if let Some(to) = state.advancing_to {
            tracing::info!(machine = %self.name, from = state.seq, to, "finishing an interrupted pruning step");
            self.advance_base(&mut slot, to).map_err(MasterTargetError::Refused)?;
        }
        self.update_release_limit(&slot);
        Ok(())
    }

    fn open_base_files(&self, epoch: u64) -> Result<Vec<(PathBuf, Arc<File>)>, MasterTargetError> {
        let dir = self.base_dir(epoch);
        let mut files = Vec::new();
        for d in &self.disks {
            let p = dir.join(format!("{}.img", d.name));
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .open(&p)
                .map_err(|source| MasterTargetError::Io { path: p.clone(), source })?;
            files.push((p, Arc::new(f)));
        }
        Ok(files)
    }

    pub(crate) fn lock_base(&self) -> std::sync::MutexGuard<'_, BaseSlot> {
        self.base.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lock_mats(&self) -> std::sync::MutexGuard<'_, Vec<Materialization>> {
        self.mats.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn lock_history(&self) -> std::sync::MutexGuard<'_, crate::history::History> {
        self.history.lock().unwrap_or_else(|p| p.into_inner())
    }

    /// The journal may be released only through this seq (base and pins need what follows).
    fn update_release_limit(&self, slot: &BaseSlot) {
        let mut limit = match &slot.state {
            Some(s) if self.history_on() => s.seq,
            _ => u64::MAX,
        };
        for m in self.lock_mats().iter().filter(|m| m.problem.is_none()) {
            limit = limit.min(m.base_seq);
        }
        for (_, base_seq, disks) in &slot.lingering {
            if disks.iter().any(|d| d.strong_count() > 0) {
                limit = limit.min(*base_seq);
            }
        }
        self.release_limit.store(limit, Ordering::SeqCst);
    }

    /// Take a new base from the target disks, which hold exactly seq `seq` (the applier calls
    /// this with nothing applied past it). Points before it become unreachable.
    pub(crate) fn create_base(&self, seq: u64, time_ms: u64) -> Result<(), String> {
        // The copy runs without the base lock (the applier, our caller, is stopped at `seq`, so
        // the target does not change); materializations of the old base go on meanwhile.
        let epoch = self.next_epoch();
        let dir = self.base_dir(epoch);
        let tmp = self.dir.join(format!("base-{epoch}.tmp"));
        let _ = std::fs::remove_dir_all(&tmp);
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&tmp).map_err(|e| format!("cannot create {}: {e}", tmp.display()))?;
        let mut copied = 0;
        for (d, (tp, tf)) in self.disks.iter().zip(&self.targets) {
            let p = tmp.join(format!("{}.img", d.name));
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .create_new(true)
                .open(&p)
                .map_err(|e| format!("cannot create {}: {e}", p.display()))?;
            copied += point_image::sparse_copy(tf, &f, d.size)
                .map_err(|e| format!("copying {} to the base failed: {e}", tp.display()))?;
            f.sync_all().map_err(|e| format!("fsync of {} failed: {e}", p.display()))?;
        }
        ferry_sys::fs::sync_dir(&tmp).map_err(|e| e.to_string())?;
        ferry_sys::fs::rename_durable(&tmp, &dir).map_err(|e| format!("cannot rename {}: {e}", tmp.display()))?;
        let initial = self.lock_base().state.as_ref().map(|s| s.generation).unwrap_or(0);
        let generation = self.points_generation(seq, initial);
        let state = BaseState { epoch, seq, time_ms, advancing_to: None, generation };
        let files = self.open_base_files(epoch).map_err(|e| e.to_string())?;
        let mut slot = self.lock_base();
        self.write_base_state(&state)?;
        let old_epoch = slot.state.as_ref().map(|s| s.epoch);
        slot.files = files;
        slot.state = Some(state);
        // The applier stopped at `seq`: the index restarts there.
        self.lock_index().reset(seq);
        if let Err(e) = self.lock_history().prune_before(seq) {
            tracing::warn!(machine = %self.name, error = %e, "cannot prune the history index");
        }
        // An older base stays while a materialization still reads it.
        if let Some(old) = old_epoch {
            self.remove_base_if_unused(&slot, old);
        }
        self.update_release_limit(&slot);
        drop(slot);
        self.push_event(
            "history-started",
            format!("recovery points start at seq {seq}: base taken from the replica ({copied} bytes copied)"),
        );
        Ok(())
    }

    /// At start: index the records applied between the base and the checkpoint (the applier
    /// indexes what follows), once, in the background; until it is done a failover reads the
    /// journal itself.
    pub(crate) fn index_applied_history(self: &Arc<Self>) {
        let from = match &self.lock_base().state {
            Some(s) if self.history_on() => s.seq,
            _ => return,
        };
        let to = self.lock_index().from_seq();
        if from >= to {
            return;
        }
        let r = self.clone();
        let spawned = std::thread::Builder::new().name(format!("index-{}", self.name)).spawn(move || {
            let started = std::time::Instant::now();
            match r.scan_index(from, to) {
                Ok(older) => {
                    let entries = older.entries();
                    let base = r.lock_base().state.as_ref().map_or(from, |s| s.seq);
                    let mut idx = r.lock_index();
                    if idx.join_older(older) {
                        idx.forget_through(base);
                        tracing::info!(machine = %r.name, from, to, entries, elapsed_ms = started.elapsed().as_millis() as u64, "journal indexed");
                    }
                }
                Err(e) => r.push_event("index-error", format!("cannot index the journal ({e}): a failover reads the journal instead")),
            }
        });
        if let Err(e) = spawned {
            self.push_event("index-error", format!("cannot start the indexing thread: {e}"));
        }
    }

    /// One more than the highest `base-N` folder present (never reuses a folder a pin may name).
    fn next_epoch(&self) -> u64 {
        let mut max = self.lock_base().state.as_ref().map(|s| s.epoch).unwrap_or(0);
        if let Ok(entries) = std::fs::read_dir(&self.dir) {
            for e in entries.flatten() {
                let name = e.file_name().to_string_lossy().into_owned();
                if let Some(n) =
                    name.strip_prefix("base-").and_then(|n| n.split('.').next()).and_then(|n| n.parse().ok())
                {
                    max = max.max(n);
                }
            }
        }
        max + 1
    }

    fn remove_base_if_unused(&self, slot: &BaseSlot, epoch: u64) {
        let current = slot.state.as_ref().map(|s| s.epoch);
        let used = self.lock_mats().iter().any(|m| m.base_epoch == epoch && m.problem.is_none())
            || slot.lingering.iter().any(|(_, _, d)| d.iter().any(|w| w.strong_count() > 0));
        if current != Some(epoch) && !used {
            let _ = std::fs::remove_dir_all(self.base_dir(epoch));
        }
    }

    fn write_base_state(&self, state: &BaseState) -> Result<(), String> {
        let data = serde_json::to_vec(state).map_err(|e| e.to_string())?;
        ferry_sys::fs::write_atomic(&self.dir.join("base.json"), &data).map_err(|e| e.to_string())
    }

    /// Replay journal records (base, to] into the base files (pruning). The base advances and the
    /// journal is released batch by batch, so a nearly full volume needs little headroom.
    fn advance_base(&self, slot: &mut BaseSlot, to: u64) -> Result<u64, String> {
        let Some(mut state) = slot.state.clone() else { return Ok(0) };
        {
            let j = self.lock_journal();
            if to > j.synced_seq() {
                return Err(format!("seq {to} is not durable in the journal (durable through {})", j.synced_seq()));
            }
            if j.released_seq() > state.seq {
                return Err(format!(
                    "the journal was released through seq {}, past the base at seq {}",
                    j.released_seq(),
                    state.seq
                ));
            }
        }
        state.advancing_to = Some(to);
        self.write_base_state(&state)?;
        ferry_sys::fail::fail_point("master-target.base.advance");
        // Until the step completes the base may hold writes past `state.seq`: materializations
        // wait (see `materialize`), and a failed step is retried to the same `to`.
        slot.state = Some(state.clone());
        let mut cursor = Cursor::after(state.seq);
        let mut bytes = 0;
        loop {
            let batch = self
                .lock_journal()
                .read(&mut cursor, PRUNE_BATCH as usize)
                .map_err(|e| format!("cannot read journal: {e}"))?;
            let Some(last) = batch.iter().map(|r| r.seq).filter(|s| *s <= to).max() else { break };
            for r in batch.iter().filter(|r| r.seq <= to) {
                match &r.body {
                    RecordBody::Write { disk, offset, data } => {
                        let (p, f) = &slot.files[*disk as usize];
                        f.write_all_at(data, *offset).map_err(|e| format!("write to {} failed: {e}", p.display()))?;
                        bytes += data.len() as u64;
                    }
                    RecordBody::Zero { disk, offset, len } => {
                        let (p, f) = &slot.files[*disk as usize];
                        point_image::zero_range(f, *offset, *len)
                            .map_err(|e| format!("zeroing {} failed: {e}", p.display()))?;
                    }
                    _ => {}
                }
            }
            for (p, f) in &slot.files {
                f.sync_data().map_err(|e| format!("fsync of {} failed: {e}", p.display()))?;
            }
            // The base now holds everything through `last`: record it, then free the journal.
            if last < to {
                state.seq = last.get();
                self.write_base_state(&state)?;
                slot.state = Some(state.clone());
                self.update_release_limit(slot);
                let applied = self.lock_apply().persisted.applied_seq;
                let limit = self.release_limit.load(Ordering::SeqCst);
                self.lock_journal().release_through(applied.min(limit)).map_err(|e| e.to_string())?;
            } else {
                break;
            }
        }
        for (p, f) in &slot.files {
            f.sync_data().map_err(|e| format!("fsync of {} failed: {e}", p.display()))?;
        }
        let time_ms = self.lock_history().markers().iter().find(|m| m.seq >= to).map(|m| m.time_ms).unwrap_or(now_ms());
        state.generation = self.points_generation(to, state.generation);
        state.seq = to;
        state.time_ms = time_ms;
        state.advancing_to = None;
        self.write_base_state(&state)?;
        slot.state = Some(state);
        self.lock_index().forget_through(to);
        self.lock_history().prune_before(to).map_err(|e| e.to_string())?;
        self.update_release_limit(slot);
        let applied = self.lock_apply().persisted.applied_seq;
        let limit = self.release_limit.load(Ordering::SeqCst);
        self.lock_journal().release_through(applied.min(limit)).map_err(|e| e.to_string())?;
        Ok(bytes)
    }

    /// Disk generation in effect at `seq` (the last resync begin/end before it), starting from
    /// `initial` (the base's generation: older markers are pruned).
    pub(crate) fn points_generation(&self, seq: u64, initial: u64) -> u64 {
        let h = self.lock_history();
        let mut g = initial;
        for m in h.markers().iter().take_while(|m| m.seq <= seq) {
            match m.kind {
                MarkerKind::ResyncBegin { generation, .. } | MarkerKind::ResyncEnd { generation } => g = generation,
                _ => {}
            }
        }
        g
    }

    pub(crate) fn base_generation(&self) -> u64 {
        self.lock_base().state.as_ref().map(|s| s.generation).unwrap_or(0)
    }

    /// All points of this machine (single-machine ones plus group tags it committed).
    pub fn local_points(&self) -> (Vec<Point>, Vec<crate::history::GroupCommitted>) {
        if !self.history_on() {
            // History off: the journal is released once applied, nothing can be rebuilt.
            return (Vec::new(), Vec::new());
        }
        // Points below a pruning step in progress are already being replayed into the base.
        let (from, generation) = match &self.lock_base().state {
            Some(s) => (s.advancing_to.unwrap_or(s.seq).max(s.seq), s.generation),
            None => return (Vec::new(), Vec::new()),
        };
        // Markers are written before their records are durable: list only durable positions.
        let durable = self.lock_journal().synced_seq();
        let (points, mut groups) = self.lock_history().points(&self.name, from, generation);
        groups.retain(|g| g.prepare_seq <= durable);
        (points.into_values().filter(|p| p.seq <= durable).collect(), groups)
    }

    /// One pruning pass: advance the base to the oldest point inside the window (or further when
    /// the retention volume is short of space). Returns whether it did anything.
    pub(crate) fn prune_once(&self, all_points: &[Point]) -> bool {
        let mut slot = self.lock_base();
        let Some(state) = slot.state.clone() else { return false };
        if let Some(to) = state.advancing_to {
            // A step that failed part-way: the base may hold writes up to `to`; finish it first.
            return match self.advance_base(&mut slot, to) {
                Ok(_) => true,
                Err(e) => {
                    self.push_event("prune-error", format!("pruning failed: {e}; retrying"));
                    false
                }
            };
        }
        let window_ms = self.window().as_millis() as u64;
        let cutoff = now_ms().saturating_sub(window_ms);
        let mut seqs: Vec<(u64, u64)> = all_points.iter().map(|p| (p.seq, p.time_ms)).collect();
        seqs.sort_unstable();
        seqs.dedup_by_key(|p| p.0);
        let Some(&(newest, _)) = seqs.last() else { return false };
        // The oldest point still inside the window; never past the newest point.
        let mut target = seqs.iter().find(|(_, t)| *t >= cutoff).map(|p| p.0).unwrap_or(newest);
        let low = self.space_low();
        if low {
            if let Some(&(next, _)) = seqs.iter().find(|(s, _)| *s > state.seq) {
                target = target.max(next);
            }
        }
        if let Some(begin) = self.lock_history().initial_sync_begin_after(state.seq) {
            target = target.min(begin - 1);
        }
        if target <= state.seq {
            if low {
                self.note_pause(
                    &mut slot,
                    "the retention volume is short of space and only the newest recovery point is left: enlarge the volume or shorten the retention window",
                );
            } else {
                slot.paused = None;
            }
            return false;
        }
        let pins = self.lock_mats().iter().filter(|m| m.problem.is_none()).count();
        if pins > 0 {
            self.note_pause(
                &mut slot,
                &format!(
                    "pruning is paused: {pins} image(s)/export(s) pin recovery points and the base; delete them (`ferry master-target discard ID`) to let history be pruned"
                ),
            );
            return false;
        }
        slot.lingering.retain(|(_, _, disks)| disks.iter().any(|d| d.strong_count() > 0));
        if let Some((id, _, _)) = slot.lingering.first() {
            let why = format!(
                "pruning is paused: an NBD client is still connected to discarded export {id}; disconnect it (stop the test machine) to let history be pruned"
            );
            self.note_pause(&mut slot, &why);
            return false;
        }
        slot.paused = None;
        let pruned = seqs.iter().filter(|(s, _)| *s < target).count();
        match self.advance_base(&mut slot, target) {
            Ok(bytes) => {
                if low {
                    self.push_event(
                        "pruned-early",
                        format!("retention volume short of space: pruned {pruned} recovery point(s) before seq {target} early, inside the retention window ({bytes} bytes replayed into the base)"),
                    );
                } else {
                    tracing::debug!(machine = %self.name, target, pruned, bytes, "pruned history");
                }
                true
            }
            Err(e) => {
                self.push_event("prune-error", format!("pruning failed: {e}; retrying"));
                false
            }
        }
    }

    fn note_pause(&self, slot: &mut BaseSlot, why: &str) {
        if slot.paused.as_deref() != Some(why) {
            slot.paused = Some(why.to_owned());
            self.push_event("pruning-paused", why.to_owned());
        }
    }

    /// The retention volume has less free space than the reserve: the oldest points are pruned
    /// early.
    pub(crate) fn space_low(&self) -> bool {
        match statvfs_free(&self.dir) {
            Some((free, total)) => free < space_limits(total, self.min_free_percent, self.segment_bytes).reserve,
            None => false,
        }
    }

    /// Records that would leave less than the floor free are refused (the process server
    /// retries) so pruning keeps the room it needs (see [`space_limits`]).
    pub(crate) fn journal_room_check(&self, incoming: u64) -> Result<(), String> {
        let Some((free, total)) = statvfs_free(&self.dir) else { return Ok(()) };
        let floor = space_limits(total, self.min_free_percent, self.segment_bytes).floor;
        if free.saturating_sub(incoming) >= floor || !self.history_on() {
            return Ok(());
        }
        self.prune_wake.notify_all();
        let msg = format!(
            "retention volume {} is nearly full ({free} bytes free of {total}): new changes wait while the oldest recovery points are pruned; if this persists, release pinned images/exports, shorten the retention window or enlarge the volume",
            self.dir.display()
        );
        self.push_event("retention-full", msg.clone());
        Err(msg)
    }

    /// Why a machine has no points at all, when that is the case.
    pub(crate) fn no_points_reason(&self) -> Option<String> {
        if !self.history_on() {
            return Some(format!(
                "history is off for {} (retention_window_secs = 0): only the replica itself is kept; set a retention window to keep recovery points",
                self.name
            ));
        }
        if self.lock_base().state.is_none() {
            return Some(format!("{} has no recovery point yet: its initial sync has not finished", self.name));
        }
        None
    }

    /// Register "latest": everything durable in the journal now, as a crash-consistent point.
    pub(crate) fn take_latest(&self) -> Result<Point, PointError> {
        if let Some(why) = self.no_points_reason() {
            return Err(PointError::NotFound(why));
        }
        let j = self.lock_journal();
        let seq = j.synced_seq();
        let mut h = self.lock_history();
        if let Some(open) = h.open_resync() {
            return Err(PointError::Conflict(format!(
                "{} is in a resync since seq {} (its replica is not consistent at the latest received write); the newest consistent point is still listed",
                self.name, open.seq
            )));
        }
        let marker = Marker { seq, time_ms: now_ms(), kind: MarkerKind::Latest };
        h.append(&[marker]).map_err(|e| PointError::Failed(e.to_string()))?;
        drop(h);
        drop(j);
        let (points, _) = self.local_points();
        points.into_iter().find(|p| p.seq == seq).ok_or_else(|| {
            PointError::NotFound(format!("{} has no recovery point yet (initial sync not finished)", self.name))
        })
    }

    /// Index the journal between the base and `seq` for every disk.
    fn build_index(&self, slot: &BaseSlot, seq: u64) -> Result<Vec<ExtentMap>, String> {
        let Some(state) = &slot.state else { return Err("no base".into()) };
        {
            let j = self.lock_journal();
            if seq > j.synced_seq() {
                return Err(format!("seq {seq} is not durable in the journal yet"));
            }
            if j.released_seq() > state.seq {
                return Err(format!(
                    "the journal was released through seq {}, past the base at seq {}",
                    j.released_seq(),
                    state.seq
                ));
            }
        }
        let mut maps = vec![ExtentMap::default(); self.disks.len()];
        let mut files: HashMap<u64, Arc<File>> = HashMap::new();
        let mut cursor = Cursor::after(state.seq);
        'outer: loop {
            let j = self.lock_journal();
            let batch = j.read_located(&mut cursor, 16 << 20).map_err(|e| format!("cannot read journal: {e}"))?;
            if batch.is_empty() {
                break;
            }
            for (r, loc) in batch {
                if r.seq > seq {
                    break 'outer;
                }
                match &r.body {
                    RecordBody::Write { disk, offset, data } => {
                        let file = match files.get(&loc.seg_first) {
                            Some(f) => f.clone(),
                            None => {
                                let (_, f) = j
                                    .segment_file(loc.seg_first)
                                    .ok_or_else(|| format!("journal segment {} vanished", loc.seg_first))?;
                                files.insert(loc.seg_first, f.clone());
                                f
                            }
                        };
                        let src = Source::File { file, offset: loc.data_offset(data.len() as u64) };
                        maps[*disk as usize].insert(*offset, data.len() as u64, src);
                    }
                    RecordBody::Zero { disk, offset, len } => maps[*disk as usize].insert(*offset, *len, Source::Zero),
                    _ => {}
                }
            }
        }
        Ok(maps)
    }

    /// Materialize `point`: build its index under the base lock and pin it, then produce the
    /// image files or exports. `all_exports` is the master target's NBD export table.
    pub(crate) fn materialize(
        &self,
        point: Point,
        req: &MaterializeRequest,
        datastore: &Path,
        nbd_socket: &Path,
        image_root: Option<&Path>,
    ) -> Result<Materialization, PointError> {
        let kind = req.kind;
        if kind == MaterializationKind::Export && req.format.is_some() {
            return Err(PointError::Invalid("an export has no format (it is served over NBD)".into()));
        }
        if kind == MaterializationKind::Image && req.writable {
            return Err(PointError::Invalid("`writable` applies to exports only".into()));
        }
        static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
        let n = NEXT.fetch_add(1, Ordering::Relaxed);
        let id = format!("{}-{}-{:x}{n}", self.name, point.seq, now_ms() % 0xffff_ffff);
        let (disks, base_epoch, base_seq) = {
            let slot = self.lock_base();
            let Some(state) = slot.state.clone() else {
                return Err(PointError::NotFound(format!("{} has no recovery point yet", self.name)));
            };
            if let Some(to) = state.advancing_to {
                return Err(PointError::Conflict(format!(
                    "a pruning step of {} (to seq {to}) failed part-way and is being retried; see the events",
                    self.name
                )));
            }
            if point.seq < state.seq {
                return Err(PointError::NotFound(format!(
                    "point {} was pruned (history now starts at seq {})",
                    point.id, state.seq
                )));
            }
            let maps = self.build_index(&slot, point.seq).map_err(PointError::Failed)?;
            let disks: Vec<Arc<PointDisk>> = maps
                .into_iter()
                .zip(&slot.files)
                .zip(&self.disks)
                .map(|((map, (p, f)), d)| {
                    Arc::new(PointDisk { size: d.size, base: f.clone(), base_path: p.clone(), map })
                })
                .collect();
            // Pin before the base lock is released: pruning cannot move the base under us.
            let m = Materialization {
                id: id.clone(),
                machine: self.name.clone(),
                point: point.clone(),
                base_epoch: state.epoch,
                base_seq: state.seq,
                created_ms: now_ms(),
                what: MaterializedAs::Export { writable: false, exports: Vec::new(), overlays: Vec::new() },
                problem: None,
                nbd_urls: Vec::new(),
                // Set once it is made: an order's export is never reported half-made.
                order: None,
            };
            self.lock_mats().push(m);
            self.update_release_limit(&slot);
            (disks, state.epoch, state.seq)
        };
        let result = if kind == MaterializationKind::Image {
            let format = req.format.unwrap_or(ImageFormat::Raw);
            let dir = req.dir.clone().unwrap_or_else(|| datastore.join(&self.name).join("images").join(&id));
            if let Err(e) = self.check_image_dir(&dir, format, req.dir.is_some().then_some(image_root)) {
                self.lock_mats().retain(|m| m.id != id);
                let slot = self.lock_base();
                self.update_release_limit(&slot);
                return Err(e);
            }
            self.write_images(&disks, format, &dir, nbd_socket, &id)
                .map(|files| MaterializedAs::Image { format, files })
        } else {
            self.create_exports(&id, &disks, req.writable)
        };
        let what = match result {
            Ok(w) => w,
            Err(e) => {
                self.lock_mats().retain(|m| m.id != id);
                let slot = self.lock_base();
                self.update_release_limit(&slot);
                return Err(PointError::Failed(e));
            }
        };
        let m = Materialization {
            id: id.clone(),
            machine: self.name.clone(),
            point,
            base_epoch,
            base_seq,
            created_ms: now_ms(),
            what,
            problem: None,
            nbd_urls: Vec::new(),
            order: req.order.clone(),
        };
        {
            let mut mats = self.lock_mats();
            if let Some(slot) = mats.iter_mut().find(|x| x.id == id) {
                *slot = m.clone();
            }
        }
        self.save_mats().map_err(PointError::Failed)?;
        Ok(m)
    }

    /// Image folders must be absolute and outside the retention volume (MT-5: it holds nothing
    /// else). A folder the request names (`requested` = Some(the configured image root)) must also
    /// lie below the admin's image root and be reached without a symbolic link: `qemu-img`
    /// follows links, so a folder another local user controls could make it create or overwrite
    /// any file.
    fn check_image_dir(
        &self,
        dir: &Path,
        format: ImageFormat,
        requested: Option<Option<&Path>>,
    ) -> Result<(), PointError> {
        if !dir.is_absolute() {
            return Err(PointError::Invalid(format!("image folder {} must be an absolute path", dir.display())));
        }
        let retention = self.dir.parent().unwrap_or(&self.dir);
        let mut probe = dir.to_path_buf();
        while !probe.exists() {
            match probe.parent() {
                Some(p) => probe = p.to_path_buf(),
                None => break,
            }
        }
        let canon = probe.canonicalize().unwrap_or(probe);
        if canon.starts_with(retention) {
            return Err(PointError::Invalid(format!(
                "image folder {} is on the retention volume {}, which holds recovery points only (MT-5): choose another folder",
                dir.display(),
                retention.display()
            )));
        }
        let Some(root) = requested else { return Ok(()) };
        let Some(root) = root else {
            return Err(PointError::Invalid(format!(
                "this master target takes no image folder from a request ({}): leave `dir` out for the default folder, or an admin sets image_root in its configuration",
                dir.display()
            )));
        };
        let below = dir.strip_prefix(root).ok().filter(|rest| {
            !rest.as_os_str().is_empty() && rest.components().all(|c| matches!(c, std::path::Component::Normal(_)))
        });
        let Some(rest) = below else {
            return Err(PointError::Invalid(format!(
                "image folder {} is not below the image root {}: choose a folder there",
                dir.display(),
                root.display()
            )));
        };
        let mut at = root.to_path_buf();
        for c in rest.components() {
            at.push(c);
            match std::fs::symlink_metadata(&at) {
                Ok(m) if m.file_type().is_symlink() => {
                    return Err(PointError::Invalid(format!(
                        "{} is a symbolic link: image folders are reached without links",
                        at.display()
                    )))
                }
                Ok(m) if !m.is_dir() => return Err(PointError::Invalid(format!("{} is not a folder", at.display()))),
                Ok(_) => {}
                Err(_) => break,
            }
        }
        for d in &self.disks {
            let out = dir.join(format!("{}.{}", d.name, format.ext()));
            // Not `exists()`: a dangling link would pass it, and qemu-img would follow it.
            if std::fs::symlink_metadata(&out).is_ok() {
                return Err(PointError::Invalid(format!("{} already exists: choose another folder", out.display())));
            }
        }
        Ok(())
    }

    fn write_images(
        &self,
        disks: &[Arc<PointDisk>],
        format: ImageFormat,
        dir: &Path,
        nbd_socket: &Path,
        id: &str,
    ) -> Result<Vec<PathBuf>, String> {
        std::fs::create_dir_all(dir).map_err(|e| format!("cannot create {}: {e}", dir.display()))?;
        let mut files = Vec::new();
        let result = (|| {
            for (disk, d) in disks.iter().zip(&self.disks) {
                let out = dir.join(format!("{}.{}", d.name, format.ext()));
                // Not `exists()`: a dangling link would pass it, and qemu-img would follow it.
                if std::fs::symlink_metadata(&out).is_ok() {
                    return Err(format!("{} already exists: choose another folder", out.display()));
                }
                files.push(out.clone());
                match format {
                    ImageFormat::Raw => point_image::write_raw(disk, &out)
                        .map_err(|e| format!("writing {} failed: {e}", out.display()))?,
                    ImageFormat::Qcow2 => point_image::write_qcow2_overlay(disk, &out, &self.dir)?,
                    ImageFormat::Vmdk | ImageFormat::Vhd => {
                        // Convert from a temporary export of the point on the master target's socket.
                        let name = format!("{id}/{}.convert", d.name);
                        self.exports.insert(Export {
                            name: name.clone(),
                            description: format!("{} {} for conversion", self.name, d.name),
                            backend: Arc::new(PointBackend(disk.clone())),
                        });
                        let url = format!("nbd+unix:///{name}?socket={}", nbd_socket.display());
                        let mut cmd = std::process::Command::new("qemu-img");
                        cmd.args(["convert", "-q", "-f", "raw"]);
                        if format == ImageFormat::Vmdk {
                            cmd.args(["-O", "vmdk"]);
                        } else {
                            cmd.args(["-O", "vpc", "-o", "subformat=fixed,force_size=on"]);
                        }
                        cmd.arg(&url).arg(&out);
                        let o = cmd.output();
                        self.exports.remove(&name);
                        let o = o.map_err(|e| format!("cannot run qemu-img: {e} (install qemu-utils)"))?;
                        if !o.status.success() {
                            return Err(format!(
                                "qemu-img convert failed: {}",
                                String::from_utf8_lossy(&o.stderr).trim()
                            ));
                        }
                    }
                }
            }
            Ok(())
        })();
        if let Err(e) = result {
            for f in &files {
                let _ = std::fs::remove_file(f);
            }
            let _ = std::fs::remove_dir(dir);
            return Err(e);
        }
        Ok(files)
    }

    fn create_exports(&self, id: &str, disks: &[Arc<PointDisk>], writable: bool) -> Result<MaterializedAs, String> {
        let mut exports = Vec::new();
        let mut overlays = Vec::new();
        let odir = self.dir.join("exports").join(id);
        if writable {
            std::fs::create_dir_all(&odir).map_err(|e| format!("cannot create {}: {e}", odir.display()))?;
        }
        for (disk, d) in disks.iter().zip(&self.disks) {
            let name = format!("{id}/{}", d.name);
            let point: Arc<dyn Backend> = Arc::new(PointBackend(disk.clone()));
            let backend: Arc<dyn Backend> = if writable {
                let p = odir.join(format!("{}.cow", d.name));
                let cow =
                    CowBackend::new(point, &p).map_err(|e| format!("cannot create overlay {}: {e}", p.display()))?;
                overlays.push(p);
                Arc::new(cow)
            } else {
                point
            };
            self.exports.insert(Export {
                name: name.clone(),
                description: format!(
                    "{} disk {} at {}{}",
                    self.name,
                    d.name,
                    id,
                    if writable { " (test overlay)" } else { "" }
                ),
                backend,
            });
            exports.push(name);
        }
        self.lock_base().exported.insert(id.to_owned(), disks.iter().map(Arc::downgrade).collect());
        Ok(MaterializedAs::Export { writable, exports, overlays })
    }

    pub(crate) fn save_mats(&self) -> Result<(), String> {
        // Saves in turn, each copying the list once it holds the turn: the last file written is
        // always the newest list (two saves racing could otherwise rename an older copy last).
        // Process-wide, as these saves are rare.
        static SAVING: std::sync::Mutex<()> = std::sync::Mutex::new(());
        let _turn = SAVING.lock().unwrap_or_else(|p| p.into_inner());
        let mats = self.lock_mats().clone();
        let data = serde_json::to_vec_pretty(&mats).map_err(|e| e.to_string())?;
        ferry_sys::fs::write_atomic(&self.dir.join("materializations.json"), &data).map_err(|e| e.to_string())
    }

    /// At start: reload pins; read-only exports are served again, writable ones are reported
    /// lost (their throwaway overlays do not survive a restart).
    pub(crate) fn reload_mats(&self) -> Result<(), MasterTargetError> {
        let path = self.dir.join("materializations.json");
        let mut mats: Vec<Materialization> = match std::fs::read(&path) {
            Ok(d) => serde_json::from_slice(&d)
                .map_err(|e| MasterTargetError::Refused(format!("{} is corrupt: {e}", path.display())))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(()),
            Err(source) => return Err(MasterTargetError::Io { path, source }),
        };
        *self.lock_mats() = mats.clone();
        for m in mats.iter_mut() {
            let MaterializedAs::Export { writable, overlays, .. } = &m.what else { continue };
            if *writable {
                for o in overlays {
                    let _ = std::fs::remove_file(o);
                }
                m.problem = Some(
                    "the master target restarted: the test-failover overlay (writes made to the export) is gone; discard this materialization and create a new one"
                        .into(),
                );
                continue;
            }
            let slot = self.lock_base();
            let same_base = slot.state.as_ref().is_some_and(|s| s.epoch == m.base_epoch && s.seq == m.base_seq);
            let disks = if same_base { self.build_index(&slot, m.point.seq).ok() } else { None };
            drop(slot);
            match disks {
                Some(maps) => {
                    let slot = self.lock_base();
                    let disks: Vec<Arc<PointDisk>> = maps
                        .into_iter()
                        .zip(&slot.files)
                        .zip(&self.disks)
                        .map(|((map, (p, f)), d)| {
                            Arc::new(PointDisk { size: d.size, base: f.clone(), base_path: p.clone(), map })
                        })
                        .collect();
                    drop(slot);
                    if let Err(e) = self.create_exports(&m.id, &disks, false) {
                        m.problem = Some(format!("cannot serve it again: {e}"));
                    }
                }
                None => m.problem = Some("its base was replaced: discard it and create a new one".into()),
            }
        }
        *self.lock_mats() = mats;
        let slot = self.lock_base();
        self.update_release_limit(&slot);
        Ok(())
    }

    pub(crate) fn materializations(&self) -> Vec<Materialization> {
        self.lock_mats().clone()
    }

    /// Delete a materialization: exports removed, overlays and image files deleted, pin released.
    pub(crate) fn discard(&self, id: &str) -> Result<Option<Materialization>, String> {
        let Some(m) = self.lock_mats().iter().find(|m| m.id == id).cloned() else { return Ok(None) };
        match &m.what {
            MaterializedAs::Export { exports, overlays, .. } => {
                for e in exports {
                    self.exports.remove(e);
                }
                for o in overlays {
                    let _ = std::fs::remove_file(o);
                }
                let _ = std::fs::remove_dir(self.dir.join("exports").join(&m.id));
            }
            MaterializedAs::Image { files, .. } => {
                for f in files {
                    match std::fs::remove_file(f) {
                        Err(e) if e.kind() != std::io::ErrorKind::NotFound => {
                            return Err(format!("cannot delete {}: {e}", f.display()))
                        }
                        _ => {}
                    }
                }
                if let Some(dir) = files.first().and_then(|f| f.parent()) {
                    let _ = std::fs::remove_dir(dir);
                }
            }
        }
        self.lock_mats().retain(|x| x.id != id);
        self.save_mats()?;
        let mut slot = self.lock_base();
        // Clients still connected to a removed export keep reading the base: it stays pinned.
        let exported = slot.exported.remove(id);
        if let Some(disks) = exported {
            if disks.iter().any(|d| d.strong_count() > 0) {
                slot.lingering.push((id.to_owned(), m.base_seq, disks));
            }
        }
        // An old base nobody reads any more can go.
        self.remove_base_if_unused(&slot, m.base_epoch);
        self.update_release_limit(&slot);
        Ok(Some(m))
    }

    /// Extents of each disk changed between point seqs `from` and `to` (the journal's end when
    /// None). `full` = everything must be resynced (initial-sync data is not in the journal).
    pub(crate) fn changed_extents(&self, from: u64, to: Option<u64>) -> Result<Changes, PointError> {
        let slot = self.lock_base();
        let Some(state) = slot.state.clone() else {
            return Err(PointError::NotFound(format!("{} has no recovery point yet", self.name)));
        };
        if from < state.seq {
            return Err(PointError::NotFound(format!("seq {from} was pruned (history starts at seq {})", state.seq)));
        }
        let head = self.lock_journal().synced_seq();
        let to = to.unwrap_or(head).min(head);
        if to < from {
            return Err(PointError::Invalid(format!("`to` (seq {to}) is before `from` (seq {from})")));
        }
        let full = self.lock_history().initial_sync_begin_after(from).is_some_and(|s| s <= to);
        let mut maps = vec![ExtentMap::default(); self.disks.len()];
        let mut cursor = Cursor::after(from);
        if !full {
            'outer: loop {
                let batch =
                    self.lock_journal().read(&mut cursor, 16 << 20).map_err(|e| PointError::Failed(e.to_string()))?;
                if batch.is_empty() {
                    break;
                }
                for r in batch {
                    if r.seq > to {
                        break 'outer;
                    }
                    match &r.body {
                        RecordBody::Write { disk, offset, data } => {
                            maps[*disk as usize].insert(*offset, data.len() as u64, Source::Zero)
                        }
                        RecordBody::Zero { disk, offset, len } => {
                            maps[*disk as usize].insert(*offset, *len, Source::Zero)
                        }
                        _ => {}
                    }
                }
            }
        }
        drop(slot);
        let disks: Vec<_> = self
            .disks
            .iter()
            .zip(&maps)
            .map(|(d, m)| {
                let ranges = if full { vec![(0, d.size)] } else { m.ranges() };
                let bytes: u64 = ranges.iter().map(|r| r.1).sum();
                DiskChanges {
                    disk: d.name.clone(),
                    bytes,
                    extents: ranges.iter().map(|&(offset, length)| Extent { offset, length }).collect(),
                }
            })
            .collect();
        Ok(Changes { machine: self.name.clone(), from_seq: from, to_seq: Some(to), full_resync: full, disks })
    }

    /// Retention figures for the status.
    pub(crate) fn retention_status(&self) -> RetentionStatus {
        let slot = self.lock_base();
        let (journal_bytes, payload) = {
            let j = self.lock_journal();
            (j.bytes(), j.payload_bytes())
        };
        let base_bytes: u64 = slot.files.iter().map(|(p, _)| allocated_bytes(p)).sum();
        let (free, total) = statvfs_free(&self.dir).unwrap_or((0, 0));
        RetentionStatus {
            window_secs: self.window().as_secs_f64(),
            base_seq: slot.state.as_ref().map(|s| s.seq),
            base_time_ms: slot.state.as_ref().map(|s| s.time_ms),
            base_bytes,
            journal_bytes,
            journal_payload_bytes: payload,
            journal_bytes_per_gib_written: if payload > 0 {
                (journal_bytes as f64 / payload as f64) * (1u64 << 30) as f64
            } else {
                0.0
            },
            volume_free_bytes: free,
            volume_total_bytes: total,
            pruning_paused: slot.paused.clone(),
            pinned_by: self.lock_mats().iter().map(|m| m.id.clone()).collect(),
        }
    }
}

/// Keep the pruner going: a pass every second, until the replica stops. Group tags count as
/// positions too (whether complete or not, the base may rest on any consistent position).
impl Replica {
    /// The pruner of one replica (its own thread, started with the replica).
    pub(crate) fn prune_loop(replica: Arc<Replica>) {
        while !replica.stopped.load(Ordering::SeqCst) {
            // Fenced: the failover point and everything after it stay for the reprotect.
            if replica.history_on() && replica.fence_state().is_none() {
                let (mut pts, groups) = replica.local_points();
                for g in groups {
                    pts.push(Point {
                        id: String::new(),
                        machine: String::new(),
                        seq: g.prepare_seq,
                        time_ms: g.prepare_time_ms,
                        kind: PointKind::Crash,
                        scope: PointScope::Multi,
                        group: None,
                        group_tag: None,
                        generation: 0,
                        origin: PointOrigin::Group,
                    });
                }
                while replica.prune_once(&pts) && replica.space_low() && !replica.stopped.load(Ordering::SeqCst) {}
            }
            let g = replica.lock_apply();
            let _ = replica.prune_wake.wait_timeout(g, Duration::from_secs(1));
        }
    }
}

#[cfg(test)]
mod space_tests {
    use super::space_limits;

    #[test]
    fn early_pruning_starts_before_records_are_refused_at_any_volume_size() {
        for total_mib in [64u64, 200, 512, 1024, 3 << 10, 3300, 10 << 10, 1 << 20, 16 << 20] {
            for pct in [0.0, 1.0, 5.0, 10.0, 40.0, 50.0, 100.0] {
                for segment in [1u64 << 20, 64 << 20] {
                    let l = space_limits(total_mib << 20, pct, segment);
                    assert!(l.reserve > l.floor, "{total_mib} MiB at {pct} %: reserve {} floor {}", l.reserve, l.floor);
                }
            }
        }
        // A large volume keeps the configured share as its reserve.
        let l = space_limits(1 << 40, 5.0, 64 << 20);
        assert_eq!(l.reserve, ((1u64 << 40) as f64 * 0.05) as u64);
    }
}
