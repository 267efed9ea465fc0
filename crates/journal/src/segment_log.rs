//! Size: one data structure (append, fsync, torn-tail recovery, readers, release) whose invariants are read together.
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use ferry_protocol::Record;

use crate::{io_err, JournalError};

const ENTRY_HEADER: usize = 8;
/// Largest entry accepted when reading back (a record carries at most one 32 MiB write).
const MAX_ENTRY: usize = 40 << 20;

struct Segment {
    /// Every record in the segment has seq >= first_seq; an empty segment named N means the log
    /// already held everything before N.
    first_seq: u64,
    last_seq: u64,
    len: u64,
    /// Length known durable (the last successful fsync).
    synced_len: u64,
    /// Payload bytes of the records in it (space accounting).
    payload: u64,
    path: PathBuf,
    file: Arc<File>,
}

/// Append-only, checksummed, segmented record log. Entry: `len u32 | crc32c u32 | postcard(Record)`.
///
/// Architecture Invariant: records are strictly increasing in seq; a torn tail (crash mid-append)
/// is cut at open; only records covered by a completed [`SegmentLog::sync`] are durable.
pub struct SegmentLog {
    dir: PathBuf,
    segment_bytes: u64,
    segments: Vec<Segment>,
    last_seq: u64,
    synced_seq: u64,
    released_seq: u64,
    /// Encoded entries not yet written to the active segment (written at sync or when large):
    /// one write per batch instead of one per record.
    wbuf: Vec<u8>,
}

/// Read position of a consumer (the forwarder, the applier).
#[derive(Debug, Clone, Copy, Default)]
pub struct Cursor {
    /// Last seq returned to the consumer.
    pub after_seq: u64,
    seg_first: u64,
    offset: u64,
    valid: bool,
}

impl Cursor {
    pub fn after(seq: u64) -> Self {
        Cursor { after_seq: seq, ..Default::default() }
    }
}

/// Where a record lies in the log.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Location {
    pub seg_first: u64,
    pub entry_offset: u64,
    pub entry_len: u64,
}

impl Location {
    /// File offset of the payload of a `Write` of `data_len` bytes: postcard puts the data bytes
    /// last (the last field of the last field), so they end the entry.
    pub fn data_offset(&self, data_len: u64) -> u64 {
        self.entry_offset + self.entry_len - data_len
    }
}

fn seg_name(first: u64) -> String {
    format!("{first:020}.seg")
}

impl SegmentLog {
    /// Open (or create) the log in `dir`, recovering from a torn tail.
    pub fn open(dir: &Path, segment_bytes: u64) -> Result<Self, JournalError> {
        ferry_sys::fs::private_dir(dir).map_err(io_err(dir))?;
        let mut firsts = Vec::new();
        for entry in std::fs::read_dir(dir).map_err(io_err(dir))? {
            let entry = entry.map_err(io_err(dir))?;
            let name = entry.file_name().to_string_lossy().into_owned();
            if let Some(stem) = name.strip_suffix(".seg") {
                if let Ok(n) = stem.parse::<u64>() {
                    firsts.push(n);
                }
            }
        }
        firsts.sort_unstable();
        let mut log = SegmentLog {
            dir: dir.to_owned(),
            segment_bytes: segment_bytes.max(4096),
            segments: Vec::new(),
            last_seq: 0,
            synced_seq: 0,
            released_seq: 0,
            wbuf: Vec::new(),
        };
        let count = firsts.len();
        for (i, first) in firsts.into_iter().enumerate() {
            let path = dir.join(seg_name(first));
            let file = OpenOptions::new().read(true).write(true).open(&path).map_err(io_err(&path))?;
            let is_last = i + 1 == count;
            let (valid_len, last, payload) = scan(&file, &path, is_last)?;
            let file_len = file.metadata().map_err(io_err(&path))?.len();
            if valid_len < file_len {
                tracing::warn!(path = %path.display(), valid_len, file_len, "cutting torn tail of log segment");
                file.set_len(valid_len).map_err(io_err(&path))?;
            }
            // What a crashed process wrote may still be only in the page cache: make it durable
            // before anything in it is treated (and acknowledged) as such.
            file.sync_all().map_err(io_err(&path))?;
            let last_seq = last.unwrap_or(0).max(first.saturating_sub(1));
            log.last_seq = log.last_seq.max(last_seq);
            log.segments.push(Segment {
                first_seq: first,
                last_seq,
                len: valid_len,
                synced_len: valid_len,
                payload,
                path,
                file: Arc::new(file),
            });
        }
        if log.segments.is_empty() {
            log.new_segment(1)?;
        }
        log.synced_seq = log.last_seq;
        log.released_seq = log.segments.first().map(|s| s.first_seq.saturating_sub(1)).unwrap_or(0);
        Ok(log)
    }

    fn new_segment(&mut self, first: u64) -> Result<(), JournalError> {
        let path = self.dir.join(seg_name(first));
        let file =
            OpenOptions::new().read(true).write(true).create(true).truncate(true).open(&path).map_err(io_err(&path))?;
        ferry_sys::fs::sync_dir(&self.dir).map_err(io_err(&self.dir))?;
        self.segments.push(Segment {
            first_seq: first,
            last_seq: first.saturating_sub(1),
            len: 0,
            synced_len: 0,
            payload: 0,
            path,
            file: Arc::new(file),
        });
        Ok(())
    }

    pub fn last_seq(&self) -> u64 {
        self.last_seq
    }

    /// Everything up to this seq is durable.
    pub fn synced_seq(&self) -> u64 {
        self.synced_seq
    }

    /// Records up to this seq were released (their segments may be gone).
    pub fn released_seq(&self) -> u64 {
        self.released_seq
    }

    /// Bytes held by all segments (including appended, not yet written entries).
    pub fn bytes(&self) -> u64 {
        self.segments.iter().map(|s| s.len).sum::<u64>() + self.wbuf.len() as u64
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Append a record (not yet durable: call [`SegmentLog::sync`]). Returns the bytes it takes.
    pub fn append(&mut self, rec: &Record) -> Result<u64, JournalError> {
        if rec.seq.get() <= self.last_seq {
            return Err(JournalError::OutOfOrder { seq: rec.seq.get(), last: self.last_seq });
        }
        let needs_roll =
            self.segments.last().map(|s| s.len + self.wbuf.len() as u64 >= self.segment_bytes).unwrap_or(true);
        if needs_roll {
            self.sync()?;
            self.new_segment(rec.seq.get())?;
        }
        let start = self.wbuf.len();
        self.wbuf.extend_from_slice(&[0u8; ENTRY_HEADER]);
        self.wbuf = postcard::to_extend(rec, std::mem::take(&mut self.wbuf))?;
        let body_len = self.wbuf.len() - start - ENTRY_HEADER;
        let crc = crc32c::crc32c(&self.wbuf[start + ENTRY_HEADER..]);
        self.wbuf[start..start + 4].copy_from_slice(&(body_len as u32).to_le_bytes());
        self.wbuf[start + 4..start + 8].copy_from_slice(&crc.to_le_bytes());
        if let Some(seg) = self.segments.last_mut() {
            seg.last_seq = rec.seq.get();
            seg.payload += rec.body.data_len();
        }
        self.last_seq = rec.seq.get();
        if self.wbuf.len() >= 8 << 20 {
            self.write_out()?;
        }
        Ok((ENTRY_HEADER + body_len) as u64)
    }

    fn write_out(&mut self) -> Result<(), JournalError> {
        if self.wbuf.is_empty() {
            return Ok(());
        }
        let Some(seg) = self.segments.last_mut() else {
            return Err(JournalError::Corrupt {
                path: self.dir.clone(),
                offset: 0,
                reason: "no active segment".into(),
            });
        };
        seg.file.write_all_at(&self.wbuf, seg.len).map_err(io_err(&seg.path))?;
        seg.len += self.wbuf.len() as u64;
        self.wbuf.clear();
        Ok(())
    }

    /// Make every appended record durable.
    pub fn sync(&mut self) -> Result<(), JournalError> {
        if self.synced_seq == self.last_seq {
            return Ok(());
        }
        let result = self.write_out().and_then(|_| match self.segments.last() {
            Some(seg) => seg.file.sync_data().map_err(io_err(&seg.path)),
            None => Ok(()),
        });
        if let Err(e) = result {
            // The kernel may have dropped the unsynced pages (and will not report it twice): cut
            // the segment back to what is known durable and forget the unsynced records, which
            // were never acknowledged and will be resent.
            self.rollback_unsynced();
            return Err(e);
        }
        if let Some(seg) = self.segments.last_mut() {
            seg.synced_len = seg.len;
        }
        self.synced_seq = self.last_seq;
        Ok(())
    }

    /// Forget appended records that are not durable yet (the caller could not complete the
    /// batch): the log is back at its last durable state and a resend is accepted again.
    pub fn discard_unsynced(&mut self) {
        if self.synced_seq != self.last_seq || !self.wbuf.is_empty() {
            self.rollback_unsynced();
        }
    }

    fn rollback_unsynced(&mut self) {
        self.wbuf.clear();
        let synced = self.synced_seq;
        if let Some(seg) = self.segments.last_mut() {
            if let Err(e) = seg.file.set_len(seg.synced_len) {
                tracing::error!(path = %seg.path.display(), error = %e, "cannot cut back an unsynced segment");
            }
            seg.len = seg.synced_len;
            seg.last_seq = synced.max(seg.first_seq.saturating_sub(1));
            self.last_seq = seg.last_seq.max(synced);
        }
    }

    /// Read durable records after `cursor.after_seq`, at most about `max_bytes`, advancing the cursor.
    pub fn read(&self, cursor: &mut Cursor, max_bytes: usize) -> Result<Vec<Record>, JournalError> {
        let mut out = Vec::new();
        self.read_with(cursor, max_bytes, |rec, _| out.push(rec))?;
        Ok(out)
    }

    /// Like [`SegmentLog::read`], also giving where each record lies, so a reader can later fetch
    /// a write's data in place ([`Location::data_offset`], [`SegmentLog::segment_file`]).
    pub fn read_located(&self, cursor: &mut Cursor, max_bytes: usize) -> Result<Vec<(Record, Location)>, JournalError> {
        let mut out = Vec::new();
        self.read_with(cursor, max_bytes, |rec, loc| out.push((rec, loc)))?;
        Ok(out)
    }

    /// The open file of the segment starting at `seg_first` (it stays readable through this
    /// handle even if the segment is released later).
    pub fn segment_file(&self, seg_first: u64) -> Option<(PathBuf, Arc<File>)> {
        self.segments.iter().find(|s| s.first_seq == seg_first).map(|s| (s.path.clone(), s.file.clone()))
    }

    /// Payload bytes (written data) of the records held, for space accounting.
    pub fn payload_bytes(&self) -> u64 {
        self.segments.iter().map(|s| s.payload).sum()
    }

    fn read_with(
        &self,
        cursor: &mut Cursor,
        max_bytes: usize,
        mut emit: impl FnMut(Record, Location),
    ) -> Result<(), JournalError> {
        let mut bytes = 0usize;
        let upto = self.synced_seq;
        if cursor.after_seq >= upto {
            return Ok(());
        }
        // Locate the segment: reuse the cursor's position when its segment still exists.
        let mut idx = match self.segments.iter().position(|s| cursor.valid && s.first_seq == cursor.seg_first) {
            Some(i) => i,
            None => {
                let target = cursor.after_seq + 1;
                let i = self.segments.iter().rposition(|s| s.first_seq <= target).unwrap_or(0);
                cursor.seg_first = self.segments[i].first_seq;
                cursor.offset = 0;
                cursor.valid = true;
                i
            }
        };
        let mut chunk = Vec::new();
        loop {
            let seg = &self.segments[idx];
            while cursor.offset < seg.len {
                // Read a large span at once and parse whole entries from memory.
                let span = (seg.len - cursor.offset).min(READ_SPAN as u64) as usize;
                chunk.resize(span, 0);
                seg.file.read_exact_at(&mut chunk, cursor.offset).map_err(io_err(&seg.path))?;
                let mut pos = 0usize;
                while pos < chunk.len() {
                    let (rec, size) = match parse_entry(&chunk[pos..], &seg.path, cursor.offset)? {
                        Some(x) => x,
                        None if pos == 0 => read_entry(&seg.file, &seg.path, cursor.offset, seg.len)?,
                        None => break,
                    };
                    if rec.seq.get() > upto {
                        return Ok(());
                    }
                    let loc = Location { seg_first: seg.first_seq, entry_offset: cursor.offset, entry_len: size };
                    pos += size as usize;
                    cursor.offset += size;
                    if rec.seq.get() <= cursor.after_seq {
                        continue;
                    }
                    cursor.after_seq = rec.seq.get();
                    bytes += size as usize;
                    emit(rec, loc);
                    if bytes >= max_bytes {
                        return Ok(());
                    }
                    if pos as u64 >= span as u64 {
                        break;
                    }
                }
            }
            if idx + 1 >= self.segments.len() {
                return Ok(());
            }
            idx += 1;
            cursor.seg_first = self.segments[idx].first_seq;
            cursor.offset = 0;
        }
    }

    /// Forget records up to `seq` (durable further down the chain, or out of retention): whole
    /// segments are deleted; a fully released active segment is rolled so it can go too.
    pub fn release_through(&mut self, seq: u64) -> Result<(), JournalError> {
        let seq = seq.min(self.synced_seq);
        if seq <= self.released_seq {
            return Ok(());
        }
        self.released_seq = seq;
        if let Some(active) = self.segments.last() {
            if active.len > 0 && active.last_seq <= seq {
                let next = self.last_seq + 1;
                self.new_segment(next)?;
            }
        }
        let mut removed = false;
        while self.segments.len() > 1 && self.segments[0].last_seq <= seq {
            let seg = self.segments.remove(0);
            std::fs::remove_file(&seg.path).map_err(io_err(&seg.path))?;
            removed = true;
        }
        if removed {
            ferry_sys::fs::sync_dir(&self.dir).map_err(io_err(&self.dir))?;
        }
        Ok(())
    }
}

const READ_SPAN: usize = 4 << 20;

/// Parse one entry from memory: None when `buf` does not hold all of it.
fn parse_entry(buf: &[u8], path: &Path, offset: u64) -> Result<Option<(Record, u64)>, JournalError> {
    let corrupt = |reason: String| JournalError::Corrupt { path: path.to_owned(), offset, reason };
    if buf.len() < ENTRY_HEADER {
        return Ok(None);
    }
    let len = u32::from_le_bytes([buf[0], buf[1], buf[2], buf[3]]) as usize;
    let crc = u32::from_le_bytes([buf[4], buf[5], buf[6], buf[7]]);
    if len > MAX_ENTRY {
        return Err(corrupt(format!("entry length {len} out of bounds")));
    }
    if buf.len() < ENTRY_HEADER + len {
        return Ok(None);
    }
    let body = &buf[ENTRY_HEADER..ENTRY_HEADER + len];
    if crc32c::crc32c(body) != crc {
        return Err(corrupt("checksum mismatch".into()));
    }
    let rec: Record = postcard::from_bytes(body).map_err(|e| corrupt(format!("undecodable record: {e}")))?;
    Ok(Some((rec, (ENTRY_HEADER + len) as u64)))
}

fn read_entry(file: &File, path: &Path, offset: u64, end: u64) -> Result<(Record, u64), JournalError> {
    let corrupt = |reason: String| JournalError::Corrupt { path: path.to_owned(), offset, reason };
    if offset + ENTRY_HEADER as u64 > end {
        return Err(corrupt("entry header past the end".into()));
    }
    let mut h = [0u8; ENTRY_HEADER];
    file.read_exact_at(&mut h, offset).map_err(io_err(path))?;
    let len = u32::from_le_bytes([h[0], h[1], h[2], h[3]]) as usize;
    let crc = u32::from_le_bytes([h[4], h[5], h[6], h[7]]);
    if len > MAX_ENTRY || offset + (ENTRY_HEADER + len) as u64 > end {
        return Err(corrupt(format!("entry length {len} out of bounds")));
    }
    let mut body = vec![0u8; len];
    file.read_exact_at(&mut body, offset + ENTRY_HEADER as u64).map_err(io_err(path))?;
    if crc32c::crc32c(&body) != crc {
        return Err(corrupt("checksum mismatch".into()));
    }
    let rec: Record = postcard::from_bytes(&body).map_err(|e| corrupt(format!("undecodable record: {e}")))?;
    Ok((rec, (ENTRY_HEADER + len) as u64))
}

/// Scan a segment: returns the length of its valid prefix and its last seq. A bad entry in the
/// last segment is a torn tail (cut it); in an earlier segment it is corruption.
fn scan(file: &File, path: &Path, is_last: bool) -> Result<(u64, Option<u64>, u64), JournalError> {
    let end = file.metadata().map_err(io_err(path))?.len();
    let mut off = 0;
    let mut last = None;
    let mut payload = 0;
    while off < end {
        match read_entry(file, path, off, end) {
            Ok((rec, size)) => {
                if last.is_some_and(|l| rec.seq.get() <= l) {
                    return Err(JournalError::Corrupt {
                        path: path.to_owned(),
                        offset: off,
                        reason: "sequence goes backwards".into(),
                    });
                }
                last = Some(rec.seq.get());
                payload += rec.body.data_len();
                off += size;
            }
            Err(JournalError::Corrupt { .. }) if is_last => break,
            Err(e) => return Err(e),
        }
    }
    Ok((off, last, payload))
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_protocol::RecordBody;

    fn rec(seq: u64, n: usize) -> Record {
        Record {
            seq: ferry_protocol::Seq(seq),
            time_ms: seq,
            body: RecordBody::Write { disk: 0, offset: seq * 4096, data: vec![seq as u8; n] },
        }
    }

    #[test]
    fn located_reads_find_write_data_in_place() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = SegmentLog::open(dir.path(), 50_000).unwrap();
        for s in 1..=40u64 {
            log.append(&rec(s, 1000 + s as usize * 37)).unwrap();
        }
        log.sync().unwrap();
        assert_eq!(log.payload_bytes(), (1..=40u64).map(|s| 1000 + s * 37).sum::<u64>());
        let mut cur = Cursor::after(0);
        let mut seen = 0;
        loop {
            let batch = log.read_located(&mut cur, 7000).unwrap();
            if batch.is_empty() {
                break;
            }
            for (r, loc) in batch {
                let RecordBody::Write { data, .. } = &r.body else { panic!() };
                let (_, f) = log.segment_file(loc.seg_first).unwrap();
                let mut buf = vec![0u8; data.len()];
                f.read_exact_at(&mut buf, loc.data_offset(data.len() as u64)).unwrap();
                assert_eq!(&buf, data, "record {}", r.seq);
                seen += 1;
            }
        }
        assert_eq!(seen, 40);
    }

    #[test]
    fn append_sync_read_release_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = SegmentLog::open(dir.path(), 10_000).unwrap();
        for s in 1..=50 {
            log.append(&rec(s, 1000)).unwrap();
        }
        let mut c = Cursor::after(0);
        let early = log.read(&mut c, usize::MAX).unwrap();
        assert!(early.iter().all(|r| r.seq <= log.synced_seq()), "unsynced records are not readable");
        assert!(log.synced_seq() < 50);
        let mut c = Cursor::after(0);
        log.sync().unwrap();
        let got = log.read(&mut c, usize::MAX).unwrap();
        assert_eq!(got.iter().map(|r| r.seq).collect::<Vec<_>>(), (1..=50).collect::<Vec<_>>());
        assert!(log.append(&rec(50, 1)).is_err(), "out of order append refused");
        log.release_through(30).unwrap();
        let mut c2 = Cursor::after(30);
        assert_eq!(log.read(&mut c2, usize::MAX).unwrap().first().map(|r| r.seq.get()), Some(31));
        drop(log);
        let mut log = SegmentLog::open(dir.path(), 10_000).unwrap();
        assert_eq!(log.last_seq(), 50);
        log.release_through(50).unwrap();
        drop(log);
        let log = SegmentLog::open(dir.path(), 10_000).unwrap();
        assert_eq!(log.last_seq(), 50, "an empty log remembers how far it went");
        assert_eq!(log.bytes(), 0);
    }

    #[test]
    fn entries_larger_than_the_read_span_and_batches_across_segments() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = SegmentLog::open(dir.path(), 8 << 20).unwrap();
        let sizes = [10usize, 5 << 20, 3, 9 << 20, 100, 4 << 20, 7];
        for (i, n) in sizes.iter().enumerate() {
            log.append(&rec(i as u64 + 1, *n)).unwrap();
        }
        log.sync().unwrap();
        let mut c = Cursor::after(0);
        let mut got = Vec::new();
        loop {
            let b = log.read(&mut c, 1 << 20).unwrap();
            if b.is_empty() {
                break;
            }
            got.extend(b);
        }
        let lens: Vec<usize> = got.iter().map(|r| r.body.data_len() as usize).collect();
        assert_eq!(lens, sizes.to_vec());
    }

    #[test]
    fn a_failed_sync_forgets_exactly_the_unsynced_records() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = SegmentLog::open(dir.path(), 1 << 20).unwrap();
        for s in 1..=3 {
            log.append(&rec(s, 100)).unwrap();
        }
        log.sync().unwrap();
        for s in 4..=6 {
            log.append(&rec(s, 100)).unwrap();
        }
        log.write_out().unwrap();
        log.rollback_unsynced();
        assert_eq!(log.last_seq(), 3);
        // The resend of 4..6 is accepted again and everything reads back once.
        for s in 4..=6 {
            log.append(&rec(s, 100)).unwrap();
        }
        log.sync().unwrap();
        let mut c = Cursor::after(0);
        let seqs: Vec<u64> = log.read(&mut c, usize::MAX).unwrap().iter().map(|r| r.seq.get()).collect();
        assert_eq!(seqs, vec![1, 2, 3, 4, 5, 6]);
        drop(log);
        assert_eq!(SegmentLog::open(dir.path(), 1 << 20).unwrap().last_seq(), 6);
    }

    #[test]
    fn torn_tail_is_cut() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = SegmentLog::open(dir.path(), 1 << 20).unwrap();
        for s in 1..=5 {
            log.append(&rec(s, 100)).unwrap();
        }
        log.sync().unwrap();
        let path = log.segments[0].path.clone();
        drop(log);
        let len = std::fs::metadata(&path).unwrap().len();
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        f.set_len(len - 10).unwrap();
        let mut log = SegmentLog::open(dir.path(), 1 << 20).unwrap();
        assert_eq!(log.last_seq(), 4);
        log.append(&rec(5, 100)).unwrap();
        log.sync().unwrap();
        let mut c = Cursor::after(0);
        assert_eq!(log.read(&mut c, usize::MAX).unwrap().len(), 5);
    }

    #[test]
    fn corrupt_middle_segment_is_an_error_naming_the_file() {
        let dir = tempfile::tempdir().unwrap();
        let mut log = SegmentLog::open(dir.path(), 500).unwrap();
        for s in 1..=10 {
            log.append(&rec(s, 3000)).unwrap();
        }
        log.sync().unwrap();
        let path = log.segments[0].path.clone();
        drop(log);
        let f = OpenOptions::new().write(true).open(&path).unwrap();
        f.write_all_at(&[0xff; 16], 20).unwrap();
        let names: Vec<_> = std::fs::read_dir(dir.path()).unwrap().map(|e| e.unwrap().file_name()).collect();
        let err = SegmentLog::open(dir.path(), 500)
            .err()
            .unwrap_or_else(|| panic!("opened despite corruption: {names:?} {path:?}"))
            .to_string();
        assert!(err.contains(&path.display().to_string()), "{err}");
    }
}
