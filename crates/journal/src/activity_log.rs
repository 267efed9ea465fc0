use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

use crate::{io_err, JournalError};

const MAGIC: &[u8; 8] = b"FERRYAL1";
const HEADER: u64 = 4096;
const SLOT: u64 = 16;

/// A slot index in the activity log.
pub type AlSlot = usize;

/// The agent's activity log: a fixed array of slots, each naming an active extent
/// `(disk, extent index)`. An extent is activated (slot written + fdatasync) *before* any write to
/// it is submitted to the local disk, and deactivated once every change in it is durable elsewhere
/// (at the master target, or recorded in the persisted [`crate::DirtyMap`]).
/// After a crash, the active extents are exactly the regions that may differ from what the peer
/// holds and are not in the dirty map: they are resynced. The header also holds the sequence
/// reservation, so a restarted agent never reuses a sequence number.
pub struct ActivityLog {
    path: PathBuf,
    file: File,
    slots: Vec<Option<(u16, u64)>>,
    reserved_seq: u64,
}

fn slot_bytes(entry: Option<(u16, u64)>) -> [u8; SLOT as usize] {
    let mut b = [0u8; SLOT as usize];
    if let Some((disk, ext)) = entry {
        b[0] = 1;
        b[2..4].copy_from_slice(&disk.to_le_bytes());
        b[8..16].copy_from_slice(&ext.to_le_bytes());
        let crc = crc32c::crc32c(&[&b[0..4], &b[8..16]].concat());
        b[4..8].copy_from_slice(&crc.to_le_bytes());
    }
    b
}

impl ActivityLog {
    /// Open or create; returns the log and the extents that were active (to be resynced).
    pub fn open(path: &Path, slots: usize) -> Result<(Self, Vec<(u16, u64)>), JournalError> {
        let file =
            OpenOptions::new().read(true).write(true).create(true).truncate(false).open(path).map_err(io_err(path))?;
        let (reserved_seq, active) = Self::parse(&file, path)?;
        let mut al = ActivityLog { path: path.to_owned(), file, slots: vec![None; slots.max(1)], reserved_seq };
        al.write_header()?;
        al.file.set_len(HEADER + SLOT * al.slots.len() as u64).map_err(io_err(path))?;
        // Recovered extents are handed to the caller, who must persist them (in the dirty map)
        // before calling `clear`.
        for (i, e) in active.iter().enumerate().take(al.slots.len()) {
            al.slots[i] = Some(*e);
            al.file.write_all_at(&slot_bytes(Some(*e)), HEADER + SLOT * i as u64).map_err(io_err(path))?;
        }
        al.file.sync_all().map_err(io_err(path))?;
        Ok((al, active))
    }

    /// The extents active in the log at `path`, read without changing it (the agent stopped,
    /// e.g. a powered-off primary whose state a failover reads); a missing file: none.
    pub fn read_active(path: &Path) -> Result<Vec<(u16, u64)>, JournalError> {
        match File::open(path) {
            Ok(f) => Ok(Self::parse(&f, path)?.1),
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => Ok(Vec::new()),
            Err(e) => Err(io_err(path)(e)),
        }
    }

    /// The header's sequence reservation and the active extents (sorted, unique).
    fn parse(file: &File, path: &Path) -> Result<(u64, Vec<(u16, u64)>), JournalError> {
        let len = file.metadata().map_err(io_err(path))?.len();
        let mut active = Vec::new();
        let mut reserved_seq = 0;
        if len >= HEADER {
            let mut h = [0u8; 32];
            file.read_exact_at(&mut h, 0).map_err(io_err(path))?;
            if &h[0..8] != MAGIC {
                return Err(JournalError::Corrupt {
                    path: path.to_owned(),
                    offset: 0,
                    reason: "not an activity log".into(),
                });
            }
            let crc = u32::from_le_bytes([h[16], h[17], h[18], h[19]]);
            if crc32c::crc32c(&h[8..16]) != crc {
                return Err(JournalError::Corrupt {
                    path: path.to_owned(),
                    offset: 8,
                    reason: "header checksum".into(),
                });
            }
            reserved_seq = u64::from_le_bytes([h[8], h[9], h[10], h[11], h[12], h[13], h[14], h[15]]);
            let n = ((len - HEADER) / SLOT) as usize;
            let mut buf = vec![0u8; n * SLOT as usize];
            file.read_exact_at(&mut buf, HEADER).map_err(io_err(path))?;
            for s in buf.chunks_exact(SLOT as usize) {
                if s[0] == 1 {
                    let crc = u32::from_le_bytes([s[4], s[5], s[6], s[7]]);
                    // A torn slot write is treated as unknown content: be safe, and only trust
                    // slots whose checksum holds (a torn *activation* never had its write submitted).
                    if crc32c::crc32c(&[&s[0..4], &s[8..16]].concat()) == crc {
                        let disk = u16::from_le_bytes([s[2], s[3]]);
                        let ext = u64::from_le_bytes([s[8], s[9], s[10], s[11], s[12], s[13], s[14], s[15]]);
                        active.push((disk, ext));
                    }
                }
            }
        }
        active.sort_unstable();
        active.dedup();
        Ok((reserved_seq, active))
    }

    fn write_header(&mut self) -> Result<(), JournalError> {
        let mut h = [0u8; 32];
        h[0..8].copy_from_slice(MAGIC);
        h[8..16].copy_from_slice(&self.reserved_seq.to_le_bytes());
        let crc = crc32c::crc32c(&h[8..16]);
        h[16..20].copy_from_slice(&crc.to_le_bytes());
        self.file.write_all_at(&h, 0).map_err(io_err(&self.path))
    }

    /// Durably record that sequence numbers up to `seq` may have been handed out.
    pub fn reserve_seq(&mut self, seq: u64) -> Result<(), JournalError> {
        self.reserved_seq = seq;
        self.write_header()?;
        self.file.sync_data().map_err(io_err(&self.path))
    }

    pub fn reserved_seq(&self) -> u64 {
        self.reserved_seq
    }

    pub fn capacity(&self) -> usize {
        self.slots.len()
    }

    pub fn active_count(&self) -> usize {
        self.slots.iter().filter(|s| s.is_some()).count()
    }

    /// Activate an extent durably. Fails with `ActivityLogFull` when no slot is free.
    pub fn activate(&mut self, disk: u16, extent: u64) -> Result<AlSlot, JournalError> {
        let Some(i) = self.slots.iter().position(|s| s.is_none()) else {
            return Err(JournalError::ActivityLogFull { path: self.path.clone(), slots: self.slots.len() });
        };
        self.file
            .write_all_at(&slot_bytes(Some((disk, extent))), HEADER + SLOT * i as u64)
            .map_err(io_err(&self.path))?;
        self.file.sync_data().map_err(io_err(&self.path))?;
        self.slots[i] = Some((disk, extent));
        Ok(i)
    }

    /// Activate several extents with one fdatasync; all or nothing (`ActivityLogFull` when the
    /// free slots do not suffice).
    pub fn activate_many(&mut self, extents: &[(u16, u64)]) -> Result<Vec<AlSlot>, JournalError> {
        let free: Vec<usize> =
            self.slots.iter().enumerate().filter(|(_, s)| s.is_none()).map(|(i, _)| i).take(extents.len()).collect();
        if free.len() < extents.len() {
            return Err(JournalError::ActivityLogFull { path: self.path.clone(), slots: self.slots.len() });
        }
        for (i, e) in free.iter().zip(extents) {
            self.file.write_all_at(&slot_bytes(Some(*e)), HEADER + SLOT * *i as u64).map_err(io_err(&self.path))?;
        }
        self.file.sync_data().map_err(io_err(&self.path))?;
        for (i, e) in free.iter().zip(extents) {
            self.slots[*i] = Some(*e);
        }
        Ok(free)
    }

    pub fn free_count(&self) -> usize {
        self.slots.len() - self.active_count()
    }

    /// Deactivate (lazily: not synced; a stale active slot only costs a resync of that extent).
    pub fn deactivate(&mut self, slot: AlSlot) -> Result<(), JournalError> {
        if let Some(s) = self.slots.get_mut(slot) {
            *s = None;
            self.file.write_all_at(&slot_bytes(None), HEADER + SLOT * slot as u64).map_err(io_err(&self.path))?;
        }
        Ok(())
    }

    /// Deactivate everything (after the caller persisted those regions elsewhere).
    pub fn clear(&mut self) -> Result<(), JournalError> {
        for i in 0..self.slots.len() {
            if self.slots[i].is_some() {
                self.deactivate(i)?;
            }
        }
        self.file.sync_data().map_err(io_err(&self.path))
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn active_extents_survive_reopen_and_full_is_reported() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("al");
        let (mut al, active) = ActivityLog::open(&p, 3).unwrap();
        assert!(active.is_empty());
        al.reserve_seq(1000).unwrap();
        let a = al.activate(0, 5).unwrap();
        al.activate(1, 7).unwrap();
        al.activate(0, 9).unwrap();
        assert!(matches!(al.activate(0, 10), Err(JournalError::ActivityLogFull { .. })));
        al.deactivate(a).unwrap();
        assert!(matches!(al.activate_many(&[(2, 1), (2, 2)]), Err(JournalError::ActivityLogFull { .. })));
        assert_eq!(al.free_count(), 1);
        drop(al);
        let (al, active) = ActivityLog::open(&p, 3).unwrap();
        assert_eq!(active, vec![(0, 9), (1, 7)]);
        assert_eq!(al.reserved_seq(), 1000);
    }
}
