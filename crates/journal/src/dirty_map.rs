use std::path::{Path, PathBuf};

use roaring::RoaringBitmap;

use crate::{io_err, JournalError, TRACK_BLOCK};

const MAGIC: &[u8; 8] = b"FERRYDM1";

/// Per-disk sets of changed 4 KiB blocks (u32 block index: disks up to 16 TiB), persisted
/// atomically. Memory: roaring bitmaps cost ~2 bits per changed block at worst (random),
/// a few bytes per contiguous run at best — a fully dirty 1 TiB disk is a few KiB.
pub struct DirtyMap {
    path: PathBuf,
    pub disks: Vec<RoaringBitmap>,
}

impl DirtyMap {
    /// Load, or start empty when the file does not exist.
    pub fn load(path: &Path, disks: usize) -> Result<Self, JournalError> {
        let mut map = DirtyMap { path: path.to_owned(), disks: vec![RoaringBitmap::new(); disks] };
        let data = match std::fs::read(path) {
            Ok(d) => d,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(map),
            Err(e) => return Err(io_err(path)(e)),
        };
        let corrupt = |reason: &str| JournalError::Corrupt { path: path.to_owned(), offset: 0, reason: reason.into() };
        if data.len() < 16 || &data[0..8] != MAGIC {
            return Err(corrupt("not a dirty map"));
        }
        let body = &data[8..data.len() - 4];
        let crc = u32::from_le_bytes([
            data[data.len() - 4],
            data[data.len() - 3],
            data[data.len() - 2],
            data[data.len() - 1],
        ]);
        if crc32c::crc32c(body) != crc {
            return Err(corrupt("checksum mismatch"));
        }
        let mut rest = body;
        let mut i = 0;
        while !rest.is_empty() {
            let bm = RoaringBitmap::deserialize_from(&mut rest).map_err(|e| corrupt(&e.to_string()))?;
            if i < map.disks.len() {
                map.disks[i] = bm;
            }
            i += 1;
        }
        Ok(map)
    }

    /// Persist atomically and durably.
    pub fn save(&self) -> Result<(), JournalError> {
        let mut data = MAGIC.to_vec();
        for bm in &self.disks {
            bm.serialize_into(&mut data).map_err(io_err(&self.path))?;
        }
        let crc = crc32c::crc32c(&data[8..]);
        data.extend_from_slice(&crc.to_le_bytes());
        ferry_sys::fs::write_atomic(&self.path, &data).map_err(io_err(&self.path))
    }

    /// Mark the blocks covering `[offset, offset+len)`.
    pub fn mark(&mut self, disk: usize, offset: u64, len: u64) {
        if len == 0 {
            return;
        }
        if let Some(bm) = self.disks.get_mut(disk) {
            let first = (offset / TRACK_BLOCK) as u32;
            let last = ((offset + len - 1) / TRACK_BLOCK) as u32;
            bm.insert_range(first..=last);
        }
    }

    pub fn is_empty(&self) -> bool {
        self.disks.iter().all(|b| b.is_empty())
    }

    /// Total marked bytes.
    pub fn bytes(&self) -> u64 {
        self.disks.iter().map(|b| b.len() * TRACK_BLOCK).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn mark_save_load() {
        let dir = tempfile::tempdir().unwrap();
        let p = dir.path().join("dirty");
        let mut m = DirtyMap::load(&p, 2).unwrap();
        m.mark(1, 4095, 2);
        m.mark(0, 1 << 40, 1 << 20);
        m.save().unwrap();
        let m2 = DirtyMap::load(&p, 2).unwrap();
        assert_eq!(m2.disks[1].iter().collect::<Vec<_>>(), vec![0, 1]);
        assert_eq!(m2.disks[0].len(), 256);
        assert_eq!(m2.bytes(), 258 * 4096);
        std::fs::write(&p, b"FERRYDM1garbagegarbage").unwrap();
        assert!(DirtyMap::load(&p, 2).is_err());
    }
}
