//! Raw image file / block device backend.

use std::fs::{File, OpenOptions};
use std::io::{Seek, SeekFrom};
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::Path;

use crate::backend::{Backend, BackendError, Extent};

use super::zero_file_range;

/// Raw image file (or block device) accessed with pread/pwrite.
///
/// * `write_zeroes`: `fallocate(PUNCH_HOLE|KEEP_SIZE)` when trimming is allowed,
///   else `FALLOC_FL_ZERO_RANGE`, falling back to writing zeroes.
/// * `flush` = `fdatasync`; FUA = write then `fdatasync`.
/// * `block_status` via `lseek(SEEK_DATA/SEEK_HOLE)`; holes read as zero.
/// * Safe for multiple connections (`can_multi_conn`).
#[derive(Debug)]
pub struct FileBackend {
    file: File,
    size: u64,
    read_only: bool,
}

impl FileBackend {
    /// Open `path` read-write (or read-only). The export size is the file size at open time.
    pub fn open(path: impl AsRef<Path>, read_only: bool) -> Result<FileBackend, BackendError> {
        let mut file = OpenOptions::new().read(true).write(!read_only).open(path.as_ref())?;
        // seek(End) also works for block devices, whose metadata length is 0.
        let size = file.seek(SeekFrom::End(0))?;
        Ok(FileBackend { file, size, read_only })
    }

    /// The underlying file.
    pub fn file(&self) -> &File {
        &self.file
    }

    fn check_writable(&self) -> Result<(), BackendError> {
        if self.read_only {
            Err(BackendError::ReadOnly)
        } else {
            Ok(())
        }
    }

    /// `lseek(fd, offset, whence)`; `Ok(None)` on ENXIO (no more data/holes).
    fn seek_whence(&self, offset: u64, whence: libc::c_int) -> std::io::Result<Option<u64>> {
        let Ok(off) = libc::off_t::try_from(offset) else {
            return Ok(None);
        };
        // SAFETY: lseek on a valid fd; pread/pwrite use explicit offsets, so moving
        // the shared file position is harmless.
        let r = unsafe { libc::lseek(self.file.as_raw_fd(), off, whence) };
        if r < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                return Ok(None);
            }
            return Err(e);
        }
        Ok(Some(r as u64))
    }
}

/// Upper bound on extents returned by one `block_status` call.
const MAX_EXTENTS: usize = 1 << 16;

impl Backend for FileBackend {
    fn size(&self) -> u64 {
        self.size
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn can_multi_conn(&self) -> bool {
        true
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), BackendError> {
        self.file.read_exact_at(buf, offset)?;
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), BackendError> {
        self.check_writable()?;
        self.file.write_all_at(data, offset)?;
        if fua {
            self.file.sync_data()?;
        }
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool, fua: bool) -> Result<(), BackendError> {
        self.check_writable()?;
        zero_file_range(&self.file, offset, len, may_trim)?;
        if fua {
            self.file.sync_data()?;
        }
        Ok(())
    }

    fn flush(&self) -> Result<(), BackendError> {
        if !self.read_only {
            self.file.sync_data()?;
        }
        Ok(())
    }

    fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>, BackendError> {
        let end = offset.saturating_add(len).min(self.size);
        let mut extents = Vec::new();
        let mut pos = offset;
        let data_extent = |length| Extent { length, hole: false, zero: false };
        while pos < end && extents.len() < MAX_EXTENTS {
            let data = match self.seek_whence(pos, libc::SEEK_DATA) {
                Ok(d) => d,
                // Filesystem without SEEK_DATA support: everything is data.
                Err(_) if extents.is_empty() => return Ok(vec![data_extent(end - offset)]),
                Err(e) => return Err(e.into()),
            };
            match data {
                None => {
                    // No data after pos: hole up to EOF.
                    extents.push(Extent { length: self.size - pos, hole: true, zero: true });
                    break;
                }
                Some(d) if d > pos => {
                    let d = d.min(self.size);
                    extents.push(Extent { length: d - pos, hole: true, zero: true });
                    pos = d;
                }
                Some(_) => {
                    let hole = self.seek_whence(pos, libc::SEEK_HOLE)?.unwrap_or(self.size);
                    let hole = hole.clamp(pos + 1, self.size.max(pos + 1));
                    extents.push(data_extent(hole - pos));
                    pos = hole;
                }
            }
        }
        if extents.is_empty() {
            extents.push(data_extent(len));
        }
        Ok(extents)
    }
}
