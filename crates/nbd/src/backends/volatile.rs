//! **TEST-ONLY** crash-simulation backend.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::path::Path;
use std::sync::Mutex;

use crate::backend::{Backend, BackendError, BLOCK};

use super::zero_file_range;

enum Cached {
    Data(Box<[u8]>),
    Zero,
}

/// **TEST-ONLY** crash simulation: a raw file with a volatile write cache.
///
/// Writes, zeroes and trims go to an in-memory overlay of 4 KiB blocks (reads
/// merge it) and reach the file only on `flush()` (everything) or on a FUA
/// request (the blocks it touched), followed by `fdatasync`. A `SIGKILL` of the
/// process therefore loses unflushed writes exactly like a power loss loses a
/// disk's volatile cache. The overlay is unbounded: do not use in production.
pub struct VolatileCacheFileBackend {
    file: File,
    size: u64,
    cache: Mutex<BTreeMap<u64, Cached>>,
}

impl VolatileCacheFileBackend {
    /// Open an existing image file read-write.
    pub fn open(path: impl AsRef<Path>) -> Result<VolatileCacheFileBackend, BackendError> {
        let mut file = OpenOptions::new().read(true).write(true).open(path.as_ref())?;
        let size = file.seek(SeekFrom::End(0))?;
        Ok(VolatileCacheFileBackend { file, size, cache: Mutex::new(BTreeMap::new()) })
    }

    /// Number of cached (unflushed) blocks.
    pub fn dirty_blocks(&self) -> usize {
        self.cache.lock().unwrap_or_else(|e| e.into_inner()).len()
    }

    fn block_len(&self, b: u64) -> usize {
        (((b + 1) * BLOCK).min(self.size) - b * BLOCK) as usize
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<u64, BackendError> {
        offset
            .checked_add(len)
            .filter(|&e| e <= self.size)
            .ok_or_else(|| BackendError::Invalid("range beyond end of disk".into()))
    }

    /// Apply `data` (or zeroes when `None`) to `[offset, offset+len)` in the cache.
    fn apply(
        &self,
        cache: &mut BTreeMap<u64, Cached>,
        offset: u64,
        len: u64,
        data: Option<&[u8]>,
    ) -> Result<(), BackendError> {
        if len == 0 {
            return Ok(());
        }
        let end = offset + len;
        for b in offset / BLOCK..=(end - 1) / BLOCK {
            let bs = b * BLOCK;
            let blen = self.block_len(b);
            let s = offset.max(bs);
            let e = end.min(bs + blen as u64);
            let full = s == bs && e == bs + blen as u64;
            if full && data.is_none() {
                cache.insert(b, Cached::Zero);
                continue;
            }
            let mut buf: Box<[u8]> = match cache.remove(&b) {
                Some(Cached::Data(d)) => d,
                Some(Cached::Zero) => vec![0u8; blen].into_boxed_slice(),
                None if full => vec![0u8; blen].into_boxed_slice(),
                None => {
                    let mut v = vec![0u8; blen];
                    self.file.read_exact_at(&mut v, bs)?;
                    v.into_boxed_slice()
                }
            };
            let dst = &mut buf[(s - bs) as usize..(e - bs) as usize];
            match data {
                Some(d) => dst.copy_from_slice(&d[(s - offset) as usize..(e - offset) as usize]),
                None => dst.fill(0),
            }
            cache.insert(b, Cached::Data(buf));
        }
        Ok(())
    }

    fn persist_block(&self, b: u64, c: &Cached) -> std::io::Result<()> {
        match c {
            Cached::Data(d) => self.file.write_all_at(d, b * BLOCK),
            Cached::Zero => zero_file_range(&self.file, b * BLOCK, self.block_len(b) as u64, true),
        }
    }

    /// Write back the cached blocks in `[first, last]` and fdatasync.
    fn persist(&self, cache: &mut BTreeMap<u64, Cached>, first: u64, last: u64) -> Result<(), BackendError> {
        let keys: Vec<u64> = cache.range(first..=last).map(|(k, _)| *k).collect();
        for b in keys {
            if let Some(c) = cache.get(&b) {
                self.persist_block(b, c)?;
            }
            cache.remove(&b);
        }
        self.file.sync_data()?;
        Ok(())
    }

    fn modify(&self, offset: u64, len: u64, data: Option<&[u8]>, fua: bool) -> Result<(), BackendError> {
        let end = self.check_range(offset, len)?;
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        self.apply(&mut cache, offset, len, data)?;
        if fua && len > 0 {
            self.persist(&mut cache, offset / BLOCK, (end - 1) / BLOCK)?;
        }
        Ok(())
    }
}

impl Backend for VolatileCacheFileBackend {
    fn size(&self) -> u64 {
        self.size
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), BackendError> {
        let end = self.check_range(offset, buf.len() as u64)?;
        if buf.is_empty() {
            return Ok(());
        }
        let cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        self.file.read_exact_at(buf, offset)?;
        for (&b, c) in cache.range(offset / BLOCK..=(end - 1) / BLOCK) {
            let bs = b * BLOCK;
            let s = offset.max(bs);
            let e = end.min(bs + self.block_len(b) as u64);
            let dst = &mut buf[(s - offset) as usize..(e - offset) as usize];
            match c {
                Cached::Data(d) => dst.copy_from_slice(&d[(s - bs) as usize..(e - bs) as usize]),
                Cached::Zero => dst.fill(0),
            }
        }
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), BackendError> {
        self.modify(offset, data.len() as u64, Some(data), fua)
    }

    fn write_zeroes(&self, offset: u64, len: u64, _may_trim: bool, fua: bool) -> Result<(), BackendError> {
        self.modify(offset, len, None, fua)
    }

    fn flush(&self) -> Result<(), BackendError> {
        let mut cache = self.cache.lock().unwrap_or_else(|e| e.into_inner());
        self.persist(&mut cache, 0, u64::MAX)
    }
}
