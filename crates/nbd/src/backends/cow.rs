//! Copy-on-write overlay backend.

use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};
use std::sync::{Arc, RwLock};

use roaring::RoaringBitmap;

use crate::backend::{Backend, BackendError, BLOCK};

use super::zero_file_range;

/// Copy-on-write view of a base backend.
///
/// Writes go to a sparse overlay file (created/truncated to the base size);
/// a [`RoaringBitmap`] of 4 KiB block indices records which blocks the overlay
/// holds. Partial-block writes to blocks not yet in the overlay read the rest
/// of the block from the base first. Reads merge base and overlay. The base is
/// never written. [`CowBackend::discard`] (or dropping the backend) deletes the
/// overlay file.
///
/// Writers are serialised by an internal lock, so the backend is safe for any
/// access pattern, but it does not advertise multi-connection consistency.
pub struct CowBackend {
    base: Arc<dyn Backend>,
    overlay: File,
    path: PathBuf,
    size: u64,
    map: RwLock<RoaringBitmap>,
}

impl std::fmt::Debug for CowBackend {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("CowBackend").field("path", &self.path).field("size", &self.size).finish_non_exhaustive()
    }
}

#[derive(Clone, Copy)]
enum Src<'a> {
    Data(&'a [u8]),
    Zero,
}

impl CowBackend {
    /// Create the overlay at `overlay_path` (truncating any existing file).
    pub fn new(base: Arc<dyn Backend>, overlay_path: &Path) -> Result<CowBackend, BackendError> {
        let size = base.size();
        if size.div_ceil(BLOCK) > u64::from(u32::MAX) + 1 {
            return Err(BackendError::Invalid("base too large for a copy-on-write overlay (max 16 TiB)".into()));
        }
        let overlay = OpenOptions::new().read(true).write(true).create(true).truncate(true).open(overlay_path)?;
        overlay.set_len(size)?;
        Ok(CowBackend { base, overlay, path: overlay_path.to_path_buf(), size, map: RwLock::new(RoaringBitmap::new()) })
    }

    /// Path of the overlay file.
    pub fn overlay_path(&self) -> &Path {
        &self.path
    }

    /// Number of 4 KiB blocks held by the overlay.
    pub fn dirty_blocks(&self) -> u64 {
        self.map.read().unwrap_or_else(|e| e.into_inner()).len()
    }

    /// Remove the overlay file (idempotent). The backend must not be used afterwards
    /// for writes; reads of overlay blocks then return the data of the unlinked file.
    pub fn discard(&self) -> std::io::Result<()> {
        match std::fs::remove_file(&self.path) {
            Err(e) if e.kind() != std::io::ErrorKind::NotFound => Err(e),
            _ => Ok(()),
        }
    }

    fn block_start(b: u64) -> u64 {
        b * BLOCK
    }

    fn block_end(&self, b: u64) -> u64 {
        ((b + 1) * BLOCK).min(self.size)
    }

    fn check_range(&self, offset: u64, len: u64) -> Result<u64, BackendError> {
        offset
            .checked_add(len)
            .filter(|&e| e <= self.size)
            .ok_or_else(|| BackendError::Invalid("range beyond end of disk".into()))
    }

    /// Write `[s, e)` (inside block `b`) from `src` whose first byte is at `src_off`.
    fn write_partial(
        &self,
        map: &RoaringBitmap,
        b: u64,
        s: u64,
        e: u64,
        src: Src<'_>,
        src_off: u64,
    ) -> Result<(), BackendError> {
        let seg = |buf: &mut [u8]| match src {
            Src::Data(d) => buf.copy_from_slice(&d[(s - src_off) as usize..(e - src_off) as usize]),
            Src::Zero => buf.fill(0),
        };
        if map.contains(b as u32) {
            let mut buf = vec![0u8; (e - s) as usize];
            seg(&mut buf);
            self.overlay.write_all_at(&buf, s)?;
        } else {
            let bs = Self::block_start(b);
            let be = self.block_end(b);
            let mut buf = vec![0u8; (be - bs) as usize];
            self.base.read(bs, &mut buf)?;
            seg(&mut buf[(s - bs) as usize..(e - bs) as usize]);
            self.overlay.write_all_at(&buf, bs)?;
        }
        Ok(())
    }

    fn write_src(&self, offset: u64, len: u64, src: Src<'_>, fua: bool) -> Result<(), BackendError> {
        let end = self.check_range(offset, len)?;
        if len == 0 {
            return Ok(());
        }
        let mut map = self.map.write().unwrap_or_else(|e| e.into_inner());
        let first = offset / BLOCK;
        let last = (end - 1) / BLOCK;
        let mut mid_start = first;
        let mut mid_end = last + 1;
        if offset > Self::block_start(first) || end < self.block_end(first) {
            self.write_partial(&map, first, offset, end.min(self.block_end(first)), src, offset)?;
            mid_start = first + 1;
        }
        if last >= mid_start && end < self.block_end(last) {
            self.write_partial(&map, last, Self::block_start(last), end, src, offset)?;
            mid_end = last;
        }
        if mid_start < mid_end {
            let s = Self::block_start(mid_start);
            let e = self.block_end(mid_end - 1);
            match src {
                Src::Data(d) => self.overlay.write_all_at(&d[(s - offset) as usize..(e - offset) as usize], s)?,
                Src::Zero => zero_file_range(&self.overlay, s, e - s, true)?,
            }
        }
        map.insert_range(first as u32..=last as u32);
        if fua {
            self.overlay.sync_data()?;
        }
        Ok(())
    }
}

impl Backend for CowBackend {
    fn size(&self) -> u64 {
        self.size
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), BackendError> {
        let end = self.check_range(offset, buf.len() as u64)?;
        if buf.is_empty() {
            return Ok(());
        }
        let map = self.map.read().unwrap_or_else(|e| e.into_inner());
        let first = offset / BLOCK;
        let last = (end - 1) / BLOCK;
        let mut b = first;
        while b <= last {
            let in_overlay = map.contains(b as u32);
            let mut run_end = b + 1;
            while run_end <= last && map.contains(run_end as u32) == in_overlay {
                run_end += 1;
            }
            let s = Self::block_start(b).max(offset);
            let e = self.block_end(run_end - 1).min(end);
            let dst = &mut buf[(s - offset) as usize..(e - offset) as usize];
            if in_overlay {
                self.overlay.read_exact_at(dst, s)?;
            } else {
                self.base.read(s, dst)?;
            }
            b = run_end;
        }
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), BackendError> {
        self.write_src(offset, data.len() as u64, Src::Data(data), fua)
    }

    fn write_zeroes(&self, offset: u64, len: u64, _may_trim: bool, fua: bool) -> Result<(), BackendError> {
        self.write_src(offset, len, Src::Zero, fua)
    }

    fn flush(&self) -> Result<(), BackendError> {
        self.overlay.sync_data()?;
        Ok(())
    }
}

impl Drop for CowBackend {
    fn drop(&mut self) {
        if let Err(e) = self.discard() {
            tracing::warn!(path = %self.path.display(), error = %e, "failed to remove CoW overlay");
        }
    }
}
