//! Backends shipped with the crate.
//!
//! * [`FileBackend`]: raw image file or block device (production).
//! * [`CowBackend`]: copy-on-write overlay over any backend (test failover).
//! * `VolatileCacheFileBackend` (only with the `testing` feature): crash simulation (unflushed
//!   writes live only in memory).
//! * [`MemBackend`]: in-memory, for unit tests.

mod cow;
mod file;
mod mem;
#[cfg(feature = "testing")]
mod volatile;

pub use cow::CowBackend;
pub use file::FileBackend;
pub use mem::MemBackend;
#[cfg(feature = "testing")]
pub use volatile::VolatileCacheFileBackend;

use std::os::unix::io::AsRawFd;

/// Outcome of a fallocate attempt.
pub(crate) enum Falloc {
    Done,
    Unsupported,
}

/// `fallocate(fd, mode, offset, len)`; EOPNOTSUPP/ENOSYS/EINVAL-like answers
/// are reported as `Unsupported` so callers can fall back to writing zeroes.
pub(crate) fn fallocate(file: &std::fs::File, mode: libc::c_int, offset: u64, len: u64) -> std::io::Result<Falloc> {
    if len == 0 {
        return Ok(Falloc::Done);
    }
    let (Ok(off), Ok(l)) = (libc::off_t::try_from(offset), libc::off_t::try_from(len)) else {
        return Ok(Falloc::Unsupported);
    };
    loop {
        // SAFETY: plain syscall on a valid fd owned by `file`.
        let r = unsafe { libc::fallocate(file.as_raw_fd(), mode, off, l) };
        if r == 0 {
            return Ok(Falloc::Done);
        }
        let err = std::io::Error::last_os_error();
        match err.raw_os_error() {
            Some(libc::EINTR) => continue,
            Some(libc::EOPNOTSUPP) | Some(libc::ENOSYS) | Some(libc::EINVAL) | Some(libc::ENODEV) => {
                return Ok(Falloc::Unsupported)
            }
            _ => return Err(err),
        }
    }
}

/// Shared buffer of zeroes used when fallocate is unavailable.
pub(crate) const ZERO_CHUNK: usize = 1 << 20;

/// Write zeroes with pwrite in chunks of at most 1 MiB.
pub(crate) fn write_zeroes_slow(file: &std::fs::File, offset: u64, len: u64) -> std::io::Result<()> {
    use std::os::unix::fs::FileExt;
    let zeroes = vec![0u8; ZERO_CHUNK.min(len as usize)];
    let mut done = 0u64;
    while done < len {
        let n = (len - done).min(zeroes.len() as u64) as usize;
        file.write_all_at(&zeroes[..n], offset + done)?;
        done += n as u64;
    }
    Ok(())
}

/// Zero a range of a file: punch a hole if allowed, else ZERO_RANGE, else pwrite zeroes.
pub(crate) fn zero_file_range(file: &std::fs::File, offset: u64, len: u64, may_trim: bool) -> std::io::Result<()> {
    if may_trim {
        let mode = libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE;
        if let Falloc::Done = fallocate(file, mode, offset, len)? {
            return Ok(());
        }
    }
    let mode = libc::FALLOC_FL_ZERO_RANGE | libc::FALLOC_FL_KEEP_SIZE;
    if let Falloc::Done = fallocate(file, mode, offset, len)? {
        return Ok(());
    }
    write_zeroes_slow(file, offset, len)
}
