//! Where every write after the base lies in the journal, by disk and 4 MiB chunk, so that the
//! content of any block at any retained point — and the set of blocks written after it — is
//! found without scanning the journal. Failover uses it to put the target disks back at a point
//! in time proportional to the writes after that point (their content at the point is the newest
//! entry at or before it, or the base), whatever the length of the journal between the base and
//! the point.
//!
//! The index lives in memory: one entry of 48 bytes per write and 4 MiB chunk it touches (a
//! `Zero` record over a large range gets one per chunk). The applier feeds it as it applies; at
//! start the records already applied since the base are indexed once in the background (one read
//! of that part of the journal). Until then, or with history off, [`JournalIndex::covers`] says
//! no and a caller scans the journal instead.

use std::collections::BTreeMap;

use ferry_journal::Location;
use ferry_protocol::{Record, RecordBody};

/// log2 of the chunk size.
pub const CHUNK_SHIFT: u32 = 22;
const CHUNK: u64 = 1 << CHUNK_SHIFT;
/// `data_offset` of an entry that writes zeroes.
const ZEROES: u64 = u64::MAX;

/// One write (or the part of it inside one chunk).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
struct Entry {
    seq: u64,
    /// The record's time (the discarded writes' time range comes from here, not the journal).
    time_ms: u64,
    offset: u64,
    len: u64,
    /// The journal segment holding the data (first seq of the segment).
    seg_first: u64,
    /// File position of the data's first byte in that segment, or [`ZEROES`].
    data_offset: u64,
}

/// Where the bytes of an extent at a point come from.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Piece {
    /// Unchanged since the base: the base file at the same offset.
    Base,
    Zero,
    /// Journal segment `seg_first`, file position `offset`.
    Journal {
        seg_first: u64,
        offset: u64,
    },
}

#[derive(Debug, Clone, PartialEq, Eq)]
pub struct JournalIndex {
    /// Per disk: chunk number → entries in seq order.
    disks: Vec<BTreeMap<u64, Vec<Entry>>>,
    /// Every record in (from_seq, through_seq] is indexed.
    from_seq: u64,
    through_seq: u64,
    entries: usize,
}

impl JournalIndex {
    /// An empty index of `disks` disks whose next record follows `after_seq`.
    pub fn new(disks: usize, after_seq: u64) -> Self {
        JournalIndex { disks: vec![BTreeMap::new(); disks], from_seq: after_seq, through_seq: after_seq, entries: 0 }
    }

    /// Start again after `seq` (a new base, or records that were not indexed).
    pub fn reset(&mut self, seq: u64) {
        *self = JournalIndex::new(self.disks.len(), seq);
    }

    /// Whether every record in (from, to] is indexed.
    pub fn covers(&self, from: u64, to: u64) -> bool {
        self.from_seq <= from && to <= self.through_seq
    }

    pub fn through_seq(&self) -> u64 {
        self.through_seq
    }

    pub fn from_seq(&self) -> u64 {
        self.from_seq
    }

    pub fn entries(&self) -> usize {
        self.entries
    }

    /// Approximate memory held, bytes.
    pub fn memory_bytes(&self) -> usize {
        let chunks: usize = self.disks.iter().map(|d| d.len()).sum();
        self.entries * std::mem::size_of::<Entry>() + chunks * 64
    }

    /// Index a record read at `loc`. Records at or before the indexed end are ignored (an
    /// applier restarting from its checkpoint reads them again).
    pub fn add(&mut self, rec: &Record, loc: &Location) {
        let seq = rec.seq.get();
        if seq <= self.through_seq {
            return;
        }
        match &rec.body {
            RecordBody::Write { disk, offset, data } => {
                let len = data.len() as u64;
                self.add_extent(*disk, (seq, rec.time_ms), *offset, len, loc.seg_first, loc.data_offset(len));
            }
            RecordBody::Zero { disk, offset, len } => {
                self.add_extent(*disk, (seq, rec.time_ms), *offset, *len, loc.seg_first, ZEROES)
            }
            _ => {}
        }
        self.through_seq = seq;
    }

    fn add_extent(
        &mut self,
        disk: u16,
        (seq, time_ms): (u64, u64),
        offset: u64,
        len: u64,
        seg_first: u64,
        data_offset: u64,
    ) {
        // Records were validated against the machine's disks before they were journaled.
        let Some(chunks) = self.disks.get_mut(disk as usize) else { return };
        let end = offset.saturating_add(len);
        let mut at = offset;
        while at < end {
            let chunk = at >> CHUNK_SHIFT;
            let piece_end = end.min((chunk + 1) << CHUNK_SHIFT);
            let data = if data_offset == ZEROES { ZEROES } else { data_offset + (at - offset) };
            chunks.entry(chunk).or_default().push(Entry {
                seq,
                time_ms,
                offset: at,
                len: piece_end - at,
                seg_first,
                data_offset: data,
            });
            self.entries += 1;
            at = piece_end;
        }
    }

    /// Put `older` (which must end where this index starts) in front. Returns false, changing
    /// nothing, when it does not.
    pub fn join_older(&mut self, older: JournalIndex) -> bool {
        if older.through_seq != self.from_seq || older.disks.len() != self.disks.len() {
            return false;
        }
        for (mine, mut theirs) in self.disks.iter_mut().zip(older.disks) {
            for (chunk, newer) in std::mem::take(mine) {
                theirs.entry(chunk).or_default().extend(newer);
            }
            *mine = theirs;
        }
        self.entries += older.entries;
        self.from_seq = older.from_seq;
        true
    }

    /// Drop entries at or before `seq` (the base advanced past them).
    pub fn forget_through(&mut self, seq: u64) {
        if seq <= self.from_seq {
            return;
        }
        let mut entries = 0;
        for chunks in &mut self.disks {
            chunks.retain(|_, v| {
                let keep = v.partition_point(|e| e.seq <= seq);
                v.drain(..keep);
                entries += v.len();
                !v.is_empty()
            });
        }
        self.entries = entries;
        self.from_seq = seq;
        self.through_seq = self.through_seq.max(seq);
    }

    /// The write and zero records after `after_seq`: how many, and the times of the first and
    /// the last.
    pub fn records_after(&self, after_seq: u64) -> (u64, Option<(u64, u64)>) {
        let mut seqs: Vec<(u64, u64)> = self
            .disks
            .iter()
            .flat_map(|d| d.values())
            .flat_map(|v| v[v.partition_point(|e| e.seq <= after_seq)..].iter().map(|e| (e.seq, e.time_ms)))
            .collect();
        seqs.sort_unstable();
        seqs.dedup();
        let times = seqs.first().zip(seqs.last()).map(|(f, l)| (f.1, l.1));
        (seqs.len() as u64, times)
    }

    /// Ranges of `disk` written by records after `after_seq` (sorted, merged).
    pub fn written_after(&self, disk: usize, after_seq: u64) -> Vec<(u64, u64)> {
        let Some(chunks) = self.disks.get(disk) else { return Vec::new() };
        let mut out: Vec<(u64, u64)> = Vec::new();
        for entries in chunks.values() {
            let first = entries.partition_point(|e| e.seq <= after_seq);
            let mut pieces: Vec<(u64, u64)> = entries[first..].iter().map(|e| (e.offset, e.offset + e.len)).collect();
            pieces.sort_unstable();
            for (s, e) in pieces {
                match out.last_mut() {
                    Some((_, last_end)) if s <= *last_end => *last_end = (*last_end).max(e),
                    _ => out.push((s, e)),
                }
            }
        }
        out.into_iter().map(|(s, e)| (s, e - s)).collect()
    }

    /// The content of `ranges` of `disk` at `seq`, for a base that holds `base_seq`: pieces
    /// covering exactly the ranges, sorted by offset. Each chunk is walked from the newest entry
    /// at or before `seq` backwards, stopping once the range inside it is covered.
    pub fn content_at(&self, disk: usize, base_seq: u64, seq: u64, ranges: &[(u64, u64)]) -> Vec<(u64, u64, Piece)> {
        let mut out = Vec::new();
        let chunks = self.disks.get(disk);
        for &(start, len) in ranges {
            let end = start.saturating_add(len);
            let mut at = start;
            while at < end {
                let chunk = at >> CHUNK_SHIFT;
                let sub_end = end.min((chunk + 1) * CHUNK);
                let entries = chunks.and_then(|c| c.get(&chunk)).map(|v| v.as_slice()).unwrap_or(&[]);
                let lo = entries.partition_point(|e| e.seq <= base_seq);
                let hi = entries.partition_point(|e| e.seq <= seq);
                let mut uncovered = vec![(at, sub_end)];
                for e in entries[lo.min(hi)..hi].iter().rev() {
                    if uncovered.is_empty() {
                        break;
                    }
                    let (es, ee) = (e.offset, e.offset + e.len);
                    let mut rest = Vec::with_capacity(uncovered.len() + 1);
                    for (us, ue) in uncovered {
                        let (s, t) = (us.max(es), ue.min(ee));
                        if s >= t {
                            rest.push((us, ue));
                            continue;
                        }
                        let piece = if e.data_offset == ZEROES {
                            Piece::Zero
                        } else {
                            Piece::Journal { seg_first: e.seg_first, offset: e.data_offset + (s - es) }
                        };
                        out.push((s, t - s, piece));
                        if us < s {
                            rest.push((us, s));
                        }
                        if t < ue {
                            rest.push((t, ue));
                        }
                    }
                    uncovered = rest;
                }
                out.extend(uncovered.into_iter().map(|(s, e)| (s, e - s, Piece::Base)));
                at = sub_end;
            }
        }
        out.sort_unstable_by_key(|p| p.0);
        out
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_types::Seq;

    fn loc(seg_first: u64, entry_offset: u64, entry_len: u64) -> Location {
        Location { seg_first, entry_offset, entry_len }
    }

    fn write(seq: u64, offset: u64, len: usize) -> Record {
        Record { seq: Seq(seq), time_ms: seq, body: RecordBody::Write { disk: 0, offset, data: vec![seq as u8; len] } }
    }

    /// Model granularity: records are 512-byte aligned, so a model of one slot per sector is exact.
    const SECTOR: u64 = 512;

    /// A model disk: per sector, the seq of the record that last wrote it (0: none) and whether
    /// it wrote zeroes.
    fn model(records: &[(u64, u64, u64, bool)], upto: u64, size: u64) -> Vec<(u64, bool)> {
        let mut d = vec![(0u64, false); (size / SECTOR) as usize];
        for &(seq, off, len, zero) in records.iter().filter(|r| r.0 <= upto) {
            for b in &mut d[(off / SECTOR) as usize..((off + len) / SECTOR) as usize] {
                *b = (seq, zero);
            }
        }
        d
    }

    #[test]
    fn content_at_a_point_matches_a_replay_of_the_journal_and_writes_after_it_are_found() {
        // Seeded pseudo-random writes over a 3-chunk disk, some crossing chunk boundaries.
        let size = 3 * CHUNK;
        let mut x: u64 = 0x9e37_79b9_7f4a_7c15;
        let mut rnd = move || {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x
        };
        let mut idx = JournalIndex::new(1, 10);
        let mut records = Vec::new();
        for seq in 11..400u64 {
            let off = rnd() % (size / SECTOR - 1) * SECTOR;
            let len = ((1 + rnd() % (2 * CHUNK / 3 / SECTOR)) * SECTOR).min(size - off);
            let zero = rnd() % 7 == 0;
            // Segment = seq and data at seq << 32, so a piece says which record it reads.
            let body = if zero {
                RecordBody::Zero { disk: 0, offset: off, len }
            } else {
                RecordBody::Write { disk: 0, offset: off, data: vec![0u8; len as usize] }
            };
            let entry_len = if zero { 64 } else { len + 64 };
            idx.add(&Record { seq: Seq(seq), time_ms: 0, body }, &loc(seq, (seq << 32) - 64, entry_len));
            records.push((seq, off, len, zero));
        }
        assert!(idx.covers(10, 399));
        assert!(!idx.covers(9, 399) && !idx.covers(10, 400));
        let head = model(&records, u64::MAX, size);
        for (base, p) in [(10, 10), (10, 200), (120, 250), (10, 399)] {
            let after = idx.written_after(0, p);
            let at_p = model(&records, p, size);
            for (i, (h, _)) in head.iter().enumerate() {
                let i = i as u64 * SECTOR;
                if *h > p {
                    assert!(after.iter().any(|(s, l)| (*s..s + l).contains(&i)), "byte {i} missed");
                }
            }
            let pieces = idx.content_at(0, base, p, &after);
            let covered: u64 = pieces.iter().map(|p| p.1).sum();
            assert_eq!(covered, after.iter().map(|r| r.1).sum::<u64>(), "pieces cover the ranges exactly");
            for (off, len, piece) in pieces {
                for i in (off..off + len).step_by(SECTOR as usize) {
                    let want = match at_p[(i / SECTOR) as usize] {
                        (w, _) if w <= base => Piece::Base,
                        (_, true) => Piece::Zero,
                        (w, false) => {
                            Piece::Journal { seg_first: w, offset: (w << 32) + (i - records[(w - 11) as usize].1) }
                        }
                    };
                    let got = match piece {
                        Piece::Journal { seg_first, offset } => {
                            Piece::Journal { seg_first, offset: offset + (i - off) }
                        }
                        other => other,
                    };
                    assert_eq!(got, want, "byte {i} at seq {p} over a base at {base}");
                }
            }
        }
    }

    #[test]
    fn records_read_again_are_ignored_and_older_parts_join_in_front() {
        let mut newer = JournalIndex::new(1, 5);
        newer.add(&write(6, 0, 512), &loc(6, 0, 600));
        newer.add(&write(6, 0, 512), &loc(6, 0, 600));
        assert_eq!(newer.entries(), 1);
        let mut older = JournalIndex::new(1, 2);
        older.add(&write(3, 0, 1024), &loc(3, 0, 1100));
        older.add(&write(5, 4096, 512), &loc(3, 2000, 600));
        assert!(!older.clone().join_older(newer.clone()), "the newer part is not older");
        assert!(newer.join_older(older));
        assert!(newer.covers(2, 6));
        assert_eq!(newer.written_after(0, 2), vec![(0, 1024), (4096, 512)]);
        assert_eq!(newer.written_after(0, 5), vec![(0, 512)]);
        let at5 = newer.content_at(0, 2, 5, &[(0, 1024)]);
        assert_eq!(at5, vec![(0, 1024, Piece::Journal { seg_first: 3, offset: 1100 - 1024 })]);
        newer.forget_through(5);
        assert_eq!(newer.entries(), 1);
        assert!(newer.covers(5, 6) && !newer.covers(2, 6));
        // At the base itself everything reads from the base.
        assert_eq!(newer.content_at(0, 5, 5, &[(0, 512)]), vec![(0, 512, Piece::Base)]);
    }

    #[test]
    fn a_large_zero_gets_one_entry_per_chunk() {
        let mut idx = JournalIndex::new(1, 0);
        let rec = Record { seq: Seq(1), time_ms: 0, body: RecordBody::Zero { disk: 0, offset: 100, len: 3 * CHUNK } };
        idx.add(&rec, &loc(1, 0, 40));
        assert_eq!(idx.entries(), 4);
        assert_eq!(idx.written_after(0, 0), vec![(100, 3 * CHUNK)]);
    }
}
