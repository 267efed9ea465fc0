//! The old primary's own data that a reprotect's first resync overwrites on adopted disks.
//!
//! An original-location reprotect writes the recovery site's version over every block of the
//! old primary's disks that differs: the primary's unshipped tail (the expected loss of an
//! unplanned failover) and, when the operator chose to discard it, what it wrote after the
//! failover (a split brain). Those blocks are the only copy of that history, so before the
//! applier writes a block of an adopted disk for the first time during that resync, the block's
//! old content is kept here — durably, before the target write — until the operator discards
//! it (disabling the reverse protection removes the replica folder and with it this copy).
//!
//! Layout, in the replica's folder: `primary-overwritten/<disk>.img` (sparse, the disk's size:
//! each kept block at its own offset; all-zero blocks stay holes) and `saved.jsonl` (one line
//! per kept run: `{"disk":…,"offset":…,"len":…}`; a torn last line is ignored). The first save
//! of a block wins: a journal replayed after a crash never keeps the new data instead. Once the
//! first resync ends, `complete` is written and nothing more is kept (later writes are the
//! recovery machine's, replicated as usual).

use std::collections::BTreeSet;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::os::unix::fs::{FileExt, OpenOptionsExt};
use std::path::{Path, PathBuf};

use ferry_protocol::DiskDescriptor;
use serde::{Deserialize, Serialize};

pub use ferry_api::master_target::PrimaryOverwritten;

/// The folder in a replica's directory.
pub const DIR: &str = "primary-overwritten";
/// Granularity of what is kept.
const BLOCK: u64 = 4096;
/// Bytes read at once while keeping a run.
const READ_PIECE: u64 = 1 << 20;

#[derive(Debug, Clone, Copy, Serialize, Deserialize)]
struct SavedRun {
    disk: usize,
    offset: u64,
    len: u64,
}

pub struct Overwritten {
    dir: PathBuf,
    copies: Vec<(PathBuf, File)>,
    log: File,
    saved: Vec<BTreeSet<u64>>,
    sizes: Vec<u64>,
    bytes: u64,
    complete: bool,
}

impl Overwritten {
    /// Open (or start) the copy of an adopted replica in `replica_dir`.
    pub fn open(replica_dir: &Path, disks: &[DiskDescriptor]) -> std::io::Result<Overwritten> {
        let dir = replica_dir.join(DIR);
        let existed = dir.exists();
        ferry_sys::fs::private_dir(&dir)?;
        if !existed {
            // The folder's own entry survives a power loss before anything is kept in it.
            ferry_sys::fs::sync_dir(replica_dir)?;
        }
        let complete = dir.join("complete").exists();
        let mut copies = Vec::new();
        for d in disks {
            let p = dir.join(format!("{}.img", d.name));
            let f = OpenOptions::new()
                .read(true)
                .write(true)
                .create(true)
                .truncate(false)
                .mode(0o600)
                .custom_flags(libc::O_NOFOLLOW)
                .open(&p)?;
            if f.metadata()?.len() != d.size {
                f.set_len(d.size)?;
            }
            copies.push((p, f));
        }
        let log_path = dir.join("saved.jsonl");
        let mut saved = vec![BTreeSet::new(); disks.len()];
        let mut bytes = 0;
        if let Ok(text) = std::fs::read_to_string(&log_path) {
            // A torn last line (a crash while appending) named nothing written over yet: cut it
            // off, so the next line starts on its own.
            if !text.is_empty() && !text.ends_with('\n') {
                let keep = text.rfind('\n').map_or(0, |i| i + 1);
                let f = OpenOptions::new().write(true).open(&log_path)?;
                f.set_len(keep as u64)?;
                f.sync_data()?;
            }
            for line in text.lines() {
                // A torn last line (a crash while appending) names nothing yet written over.
                let Ok(r) = serde_json::from_str::<SavedRun>(line) else { continue };
                if let Some(set) = saved.get_mut(r.disk) {
                    for b in r.offset / BLOCK..r.offset.saturating_add(r.len).div_ceil(BLOCK) {
                        if set.insert(b) {
                            bytes += BLOCK;
                        }
                    }
                }
            }
        }
        let log = OpenOptions::new().append(true).create(true).mode(0o600).open(&log_path)?;
        ferry_sys::fs::sync_dir(&dir)?;
        Ok(Overwritten { dir, copies, log, saved, sizes: disks.iter().map(|d| d.size).collect(), bytes, complete })
    }

    /// Keep the blocks of `[offset, offset + len)` of `disk` not kept yet, read from `target`,
    /// durably — call before writing that range of the target.
    pub fn save_before(&mut self, disk: usize, target: &File, offset: u64, len: u64) -> std::io::Result<()> {
        if self.complete || len == 0 {
            return Ok(());
        }
        let (Some(set), Some(&size)) = (self.saved.get(disk), self.sizes.get(disk)) else { return Ok(()) };
        let end = offset.saturating_add(len).min(size);
        let mut runs: Vec<(u64, u64)> = Vec::new();
        for b in offset / BLOCK..end.div_ceil(BLOCK) {
            if set.contains(&b) {
                continue;
            }
            match runs.last_mut() {
                Some((s, e)) if *e == b => *e = b + 1,
                _ => runs.push((b, b + 1)),
            }
        }
        if runs.is_empty() {
            return Ok(());
        }
        let (_, copy) = &self.copies[disk];
        let mut buf = Vec::new();
        let mut lines = String::new();
        for &(first, last) in &runs {
            let at = first * BLOCK;
            let n = (last * BLOCK).min(size) - at;
            // In bounded pieces (a zeroing of gigabytes is not read at once), and holes of the
            // target are not read: they held zeros, which the copy's holes keep, as they keep
            // all-zero blocks.
            let mut pos = at;
            while pos < at + n {
                let piece_end = (pos + READ_PIECE).min(at + n);
                let data = ferry_sys::fs::next_data(target, pos)?.unwrap_or(u64::MAX);
                if data >= piece_end {
                    pos = piece_end;
                    continue;
                }
                let from = data.max(pos) / BLOCK * BLOCK;
                buf.resize((piece_end - from) as usize, 0);
                target.read_exact_at(&mut buf, from)?;
                for (i, chunk) in buf.chunks(BLOCK as usize).enumerate() {
                    if chunk.iter().any(|&x| x != 0) {
                        copy.write_all_at(chunk, from + i as u64 * BLOCK)?;
                    }
                }
                pos = piece_end;
            }
            lines.push_str(
                &serde_json::to_string(&SavedRun { disk, offset: at, len: n }).map_err(std::io::Error::other)?,
            );
            lines.push('\n');
        }
        // The data first, then the line naming it: a line never names a block not kept.
        copy.sync_data()?;
        self.log.write_all(lines.as_bytes())?;
        self.log.sync_data()?;
        let set = &mut self.saved[disk];
        for (first, last) in runs {
            for b in first..last {
                if set.insert(b) {
                    self.bytes += BLOCK;
                }
            }
        }
        Ok(())
    }

    /// The first resync ended: nothing more is kept.
    pub fn finish(&mut self) -> std::io::Result<()> {
        if !self.complete {
            ferry_sys::fs::write_atomic(&self.dir.join("complete"), b"the first resync after the adoption ended\n")?;
            self.complete = true;
        }
        Ok(())
    }

    pub fn status(&self) -> PrimaryOverwritten {
        PrimaryOverwritten {
            dir: self.dir.clone(),
            disks: self.copies.iter().map(|(p, _)| p.clone()).collect(),
            blocks: self.bytes / BLOCK,
            bytes: self.bytes,
            complete: self.complete,
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn the_first_content_of_a_block_is_kept_once_durably_and_survives_a_reopen() {
        let dir = tempfile::tempdir().unwrap();
        let target_path = dir.path().join("disk0.img");
        let target = OpenOptions::new().read(true).write(true).create(true).truncate(false).open(&target_path).unwrap();
        target.set_len(1 << 20).unwrap();
        target.write_all_at(&[7u8; 8192], 4096).unwrap();
        let disks = [DiskDescriptor { name: "disk0".into(), size: 1 << 20, uuid: "u".into() }];
        let mut o = Overwritten::open(dir.path(), &disks).unwrap();
        // A write over [4146, 8242): blocks 1 and 2 kept.
        o.save_before(0, &target, 4096 + 50, 4096).unwrap();
        target.write_all_at(&[1u8; 4096], 4096 + 50).unwrap();
        // Written again (a journal replay): the old content stays what was kept first.
        o.save_before(0, &target, 4096, 8192).unwrap();
        assert_eq!(o.status().blocks, 2, "blocks 1 and 2, once");
        drop(o);
        let o = Overwritten::open(dir.path(), &disks).unwrap();
        assert_eq!(o.status().bytes, 2 * 4096);
        let copy = std::fs::read(dir.path().join(DIR).join("disk0.img")).unwrap();
        assert_eq!(&copy[4096..12288], &[7u8; 8192][..], "the primary's data as it was");
        assert!(copy[12288..16384].iter().all(|&b| b == 0));
        // A torn line at the end is cut off at the next open.
        std::fs::OpenOptions::new()
            .append(true)
            .open(dir.path().join(DIR).join("saved.jsonl"))
            .unwrap()
            .write_all(b"{\"disk\":0,\"off")
            .unwrap();
        drop(o);
        let mut o = Overwritten::open(dir.path(), &disks).unwrap();
        o.save_before(0, &target, 20480, 4096).unwrap();
        drop(o);
        let mut o = Overwritten::open(dir.path(), &disks).unwrap();
        assert_eq!(o.status().blocks, 3, "the line after the torn one is read");
        o.finish().unwrap();
        o.save_before(0, &target, 65536, 4096).unwrap();
        drop(o);
        let o = Overwritten::open(dir.path(), &disks).unwrap();
        let st = o.status();
        assert!(st.complete && st.blocks == 3, "nothing kept after the first resync: {st:?}");
    }
}
