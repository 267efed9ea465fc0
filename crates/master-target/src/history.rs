//! The history index of one machine: the few records of its stream that matter for recovery points
//! (tags, group prepare/commit, resync begin/end, points taken on request), kept in a small
//! append-only file next to the journal so listing points never scans the journal.
//!
//! Architecture Invariant: markers are made durable *before* the journal records they describe
//! (so a crash never leaves a durable tag without its marker); at open, markers beyond the
//! journal's durable end are dropped (they described records that were never acknowledged).

use std::collections::{BTreeMap, HashMap};
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

use ferry_protocol::{Record, RecordBody, ResyncReason, TagKind};
use serde::{Deserialize, Serialize};

use crate::MasterTargetError;

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Marker {
    pub seq: u64,
    pub time_ms: u64,
    #[serde(flatten)]
    pub kind: MarkerKind,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
#[serde(tag = "marker", rename_all = "kebab-case")]
pub enum MarkerKind {
    /// A consistency tag inserted by the agent (crash-consistent timer or app-consistent hooks).
    Tag {
        id: String,
        app: bool,
    },
    /// A crash-consistent point taken on request at the journal's durable end ("latest").
    Latest,
    GroupPrepare {
        group: String,
        tag: String,
    },
    GroupCommit {
        group: String,
        tag: String,
        members: Vec<String>,
        app: bool,
    },
    /// `prev_seq`: the record journaled just before (the last consistent position: writes
    /// between it and the begin may never have been shipped, they are part of the resync).
    ResyncBegin {
        generation: u64,
        reason: ResyncReason,
        preserve: bool,
        #[serde(default)]
        prev_seq: u64,
    },
    ResyncEnd {
        generation: u64,
    },
}

impl Marker {
    /// The marker a journal record contributes, if any; `prev_seq` is the journal's last seq
    /// before the record.
    pub fn of(r: &Record, prev_seq: u64) -> Option<Marker> {
        let kind = match &r.body {
            RecordBody::Tag { id, kind } => MarkerKind::Tag { id: id.clone(), app: *kind == TagKind::AppConsistent },
            RecordBody::GroupPrepare { group, tag } => {
                MarkerKind::GroupPrepare { group: group.clone(), tag: tag.clone() }
            }
            RecordBody::GroupCommit { group, tag, members, kind } => MarkerKind::GroupCommit {
                group: group.clone(),
                tag: tag.clone(),
                members: members.clone(),
                app: *kind == TagKind::AppConsistent,
            },
            RecordBody::ResyncBegin { generation, reason, preserve_consistent } => MarkerKind::ResyncBegin {
                generation: generation.get(),
                reason: *reason,
                preserve: *preserve_consistent,
                prev_seq,
            },
            RecordBody::ResyncEnd { generation } => MarkerKind::ResyncEnd { generation: generation.get() },
            _ => return None,
        };
        Some(Marker { seq: r.seq.get(), time_ms: r.time_ms, kind })
    }
}

pub use ferry_api::master_target::{Point, PointKind, PointOrigin, PointScope};

/// A group tag this machine committed: valid as a multi-machine point once all members did.
#[derive(Debug, Clone)]
pub struct GroupCommitted {
    pub group: String,
    pub tag: String,
    pub members: Vec<String>,
    pub app: bool,
    pub prepare_seq: u64,
    pub prepare_time_ms: u64,
}

pub struct History {
    path: PathBuf,
    file: File,
    markers: Vec<Marker>,
}

impl History {
    /// Open the index, dropping a torn last line and markers beyond `durable_seq`.
    pub fn open(path: &Path, durable_seq: u64) -> Result<History, MasterTargetError> {
        let io = |source| MasterTargetError::Io { path: path.to_owned(), source };
        let text = match std::fs::read(path) {
            Ok(b) => String::from_utf8_lossy(&b).into_owned(),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => String::new(),
            Err(e) => return Err(io(e)),
        };
        let mut markers: Vec<Marker> = Vec::new();
        let mut dropped = 0;
        for line in text.lines() {
            match serde_json::from_str::<Marker>(line) {
                Ok(m) if m.seq <= durable_seq => {
                    if !markers.contains(&m) {
                        markers.push(m);
                    }
                }
                Ok(_) => dropped += 1,
                // A torn last line after a crash: the record it described is resent.
                Err(_) => dropped += 1,
            }
        }
        markers.sort_by_key(|m| m.seq);
        let mut h = History {
            path: path.to_owned(),
            file: OpenOptions::new().create(true).append(true).open(path).map_err(io)?,
            markers,
        };
        if dropped > 0 {
            h.rewrite()?;
        }
        Ok(h)
    }

    pub fn markers(&self) -> &[Marker] {
        &self.markers
    }

    /// Append markers durably (before the journal records they describe are synced).
    pub fn append(&mut self, new: &[Marker]) -> Result<(), MasterTargetError> {
        let new: Vec<&Marker> = new.iter().filter(|m| !self.markers.contains(m)).collect();
        if new.is_empty() {
            return Ok(());
        }
        let mut buf = Vec::new();
        for m in &new {
            serde_json::to_writer(&mut buf, m).map_err(|e| MasterTargetError::Refused(e.to_string()))?;
            buf.push(b'\n');
        }
        let io = |source| MasterTargetError::Io { path: self.path.clone(), source };
        let len = self.file.metadata().map_err(io)?.len();
        if let Err(e) = self.file.write_all(&buf).and_then(|_| self.file.sync_data()) {
            // Never leave a partial line for the next append to be glued to.
            let _ = self.file.set_len(len);
            return Err(io(e));
        }
        for m in new {
            self.markers.push(m.clone());
        }
        self.markers.sort_by_key(|m| m.seq);
        Ok(())
    }

    /// Forget markers of records that did not become durable (a failed journal sync).
    pub fn forget_after(&mut self, seq: u64) {
        self.markers.retain(|m| m.seq <= seq);
    }

    /// Drop markers before `seq` (pruned history), keeping the file small.
    pub fn prune_before(&mut self, seq: u64) -> Result<(), MasterTargetError> {
        let before = self.markers.len();
        self.markers.retain(|m| m.seq >= seq);
        if self.markers.len() != before {
            self.rewrite()?;
        }
        Ok(())
    }

    fn rewrite(&mut self) -> Result<(), MasterTargetError> {
        let mut buf = Vec::new();
        for m in &self.markers {
            serde_json::to_writer(&mut buf, m).map_err(|e| MasterTargetError::Refused(e.to_string()))?;
            buf.push(b'\n');
        }
        ferry_sys::fs::write_atomic(&self.path, &buf).map_err(crate::io_at(&self.path))?;
        self.file = OpenOptions::new()
            .append(true)
            .open(&self.path)
            .map_err(|source| MasterTargetError::Io { path: self.path.clone(), source })?;
        Ok(())
    }

    /// Whether a resync is open at the end of the history, and the newest resync begin.
    pub fn open_resync(&self) -> Option<&Marker> {
        let mut open = None;
        for m in &self.markers {
            match m.kind {
                MarkerKind::ResyncBegin { .. } => open = Some(m),
                MarkerKind::ResyncEnd { .. } => open = None,
                _ => {}
            }
        }
        open
    }

    /// Seq of the first initial-sync begin after `after` (history before it cannot be replayed
    /// past it: initial-sync data bypasses the journal).
    pub fn initial_sync_begin_after(&self, after: u64) -> Option<u64> {
        self.markers
            .iter()
            .find(|m| {
                m.seq > after && matches!(m.kind, MarkerKind::ResyncBegin { reason: ResyncReason::InitialSync, .. })
            })
            .map(|m| m.seq)
    }

    /// This machine's points at or after `base_seq` (positions the journal can rebuild), and
    /// the group tags it committed. Group tags are returned separately: whether they are points
    /// depends on the other members (see [`crate::MasterTarget`]).
    pub fn points(
        &self,
        machine: &str,
        base_seq: u64,
        base_generation: u64,
    ) -> (BTreeMap<u64, Point>, Vec<GroupCommitted>) {
        let mut points: BTreeMap<u64, Point> = BTreeMap::new();
        let mut groups = Vec::new();
        let mut in_resync = false;
        // Resyncs whose begin we did not see (pruned) are not open: a point exists only
        // after a consistent base, which is never inside a resync.
        let mut generation = base_generation;
        let mut prepares: HashMap<(String, String), (u64, u64, bool)> = HashMap::new();
        let add =
            |points: &mut BTreeMap<u64, Point>, seq: u64, time_ms: u64, app: bool, origin: PointOrigin, g: u64| {
                if seq < base_seq {
                    return;
                }
                let p = Point {
                    id: format!("{machine}@{seq}"),
                    machine: machine.to_owned(),
                    seq,
                    time_ms,
                    kind: if app { PointKind::App } else { PointKind::Crash },
                    scope: PointScope::Single,
                    group: None,
                    group_tag: None,
                    generation: g,
                    origin,
                };
                match points.get(&seq) {
                    // Same position: keep the most useful description (app beats crash).
                    Some(old) if old.is_app() || !app => {}
                    _ => {
                        points.insert(seq, p);
                    }
                }
            };
        for m in &self.markers {
            match &m.kind {
                MarkerKind::Tag { app, .. } if !in_resync => {
                    add(&mut points, m.seq, m.time_ms, *app, PointOrigin::Tag, generation)
                }
                MarkerKind::Latest if !in_resync => {
                    add(&mut points, m.seq, m.time_ms, false, PointOrigin::Latest, generation)
                }
                MarkerKind::GroupPrepare { group, tag } => {
                    prepares.insert((group.clone(), tag.clone()), (m.seq, m.time_ms, in_resync));
                }
                MarkerKind::GroupCommit { group, tag, members, app } => {
                    if let Some((pseq, ptime, false)) = prepares.get(&(group.clone(), tag.clone())).copied() {
                        if pseq >= base_seq && !in_resync {
                            groups.push(GroupCommitted {
                                group: group.clone(),
                                tag: tag.clone(),
                                members: members.clone(),
                                app: *app,
                                prepare_seq: pseq,
                                prepare_time_ms: ptime,
                            });
                        }
                    }
                }
                MarkerKind::ResyncBegin { generation: g, preserve, prev_seq, .. } => {
                    if !in_resync && *preserve && *prev_seq > 0 {
                        // The last consistent state before the resync stays a point (never destroyed).
                        add(&mut points, *prev_seq, m.time_ms, false, PointOrigin::BeforeResync, generation);
                    }
                    in_resync = true;
                    generation = *g;
                }
                MarkerKind::ResyncEnd { generation: g } => {
                    in_resync = false;
                    generation = *g;
                    add(&mut points, m.seq, m.time_ms, false, PointOrigin::ResyncEnd, generation);
                }
                _ => {}
            }
        }
        (points, groups)
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn m(seq: u64, kind: MarkerKind) -> Marker {
        Marker { seq, time_ms: seq * 10, kind }
    }

    #[test]
    fn points_outside_resyncs_only_and_torn_tail_dropped() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("history.jsonl");
        let mut h = History::open(&p, 0).unwrap();
        h.append(&[
            m(
                5,
                MarkerKind::ResyncBegin {
                    generation: 1,
                    reason: ResyncReason::InitialSync,
                    preserve: false,
                    prev_seq: 0,
                },
            ),
            m(9, MarkerKind::Tag { id: "a".into(), app: false }),
            m(10, MarkerKind::ResyncEnd { generation: 1 }),
            m(20, MarkerKind::Tag { id: "b".into(), app: true }),
            m(
                30,
                MarkerKind::ResyncBegin {
                    generation: 2,
                    reason: ResyncReason::LogOverflow,
                    preserve: true,
                    prev_seq: 27,
                },
            ),
            m(35, MarkerKind::Tag { id: "c".into(), app: false }),
            m(40, MarkerKind::ResyncEnd { generation: 2 }),
        ])
        .unwrap();
        let (pts, _) = h.points("vm", 0, 0);
        let seqs: Vec<_> = pts.keys().copied().collect();
        assert_eq!(seqs, vec![10, 20, 27, 40]);
        assert!(pts[&20].is_app());
        assert_eq!(pts[&40].generation, 2);
        // A crash mid-append leaves a torn line; markers beyond the durable journal go too.
        std::fs::OpenOptions::new().append(true).open(&p).unwrap().write_all(b"{\"seq\":50,\"ti").unwrap();
        drop(h);
        let h = History::open(&p, 35).unwrap();
        assert_eq!(h.markers().last().unwrap().seq, 35);
        assert!(h.open_resync().is_some());
    }
}
