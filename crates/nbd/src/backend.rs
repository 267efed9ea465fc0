//! The [`Backend`] trait implemented by everything that can sit behind an export.

use crate::proto;

/// Ferry's block size (CoW and volatile-cache granularity, preferred NBD block size).
pub const BLOCK: u64 = 4096;

/// Errors a backend may return; each maps to an NBD error value.
#[derive(Debug, thiserror::Error)]
pub enum BackendError {
    /// -> `NBD_EIO` (or `NBD_ENOSPC` if the OS error is ENOSPC/EDQUOT/EFBIG).
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
    /// -> `NBD_ENOSPC`.
    #[error("no space left: {0}")]
    NoSpace(String),
    /// -> `NBD_EINVAL`.
    #[error("invalid request: {0}")]
    Invalid(String),
    /// -> `NBD_EPERM`.
    #[error("export is read-only")]
    ReadOnly,
    /// -> `NBD_EPERM` (e.g. the agent refuses writes while the disk is fenced).
    #[error("refused: {0}")]
    Refused(String),
}

impl BackendError {
    /// The NBD wire error value for this error.
    pub fn nbd_errno(&self) -> u32 {
        match self {
            BackendError::Io(e) => match e.raw_os_error() {
                Some(libc::ENOSPC) | Some(libc::EDQUOT) | Some(libc::EFBIG) => proto::NBD_ENOSPC,
                Some(libc::EPERM) | Some(libc::EROFS) | Some(libc::EACCES) => proto::NBD_EPERM,
                Some(libc::EINVAL) => proto::NBD_EINVAL,
                _ => proto::NBD_EIO,
            },
            BackendError::NoSpace(_) => proto::NBD_ENOSPC,
            BackendError::Invalid(_) => proto::NBD_EINVAL,
            BackendError::ReadOnly | BackendError::Refused(_) => proto::NBD_EPERM,
        }
    }
}

/// One `base:allocation` extent.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Extent {
    pub length: u64,
    /// Not allocated (`NBD_STATE_HOLE`).
    pub hole: bool,
    /// Reads as zeroes (`NBD_STATE_ZERO`).
    pub zero: bool,
}

/// A block device behind an export.
///
/// All methods are blocking and called from `spawn_blocking` / the
/// connection's ordered write worker; offsets/lengths are already validated
/// against [`Backend::size`] by the server. Within one connection, calls to
/// `write`, `write_zeroes` and `trim` *start* in the order the requests were
/// received (and never overlap each other); reads may run concurrently with
/// anything.
pub trait Backend: Send + Sync + 'static {
    fn size(&self) -> u64;
    fn read_only(&self) -> bool {
        false
    }
    fn can_multi_conn(&self) -> bool {
        false
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), BackendError>;
    fn write(&self, offset: u64, data: &[u8], fua: bool) -> Result<(), BackendError>;
    /// Zero the range; `may_trim` = client allows punching holes (no NO_HOLE flag).
    fn write_zeroes(&self, offset: u64, len: u64, may_trim: bool, fua: bool) -> Result<(), BackendError>;
    /// Discard; Ferry treats trim as zeroing so replicas stay byte-identical.
    fn trim(&self, offset: u64, len: u64, fua: bool) -> Result<(), BackendError> {
        self.write_zeroes(offset, len, true, fua)
    }
    fn flush(&self) -> Result<(), BackendError>;
    /// `base:allocation` extents covering at least `[offset, offset+len)` (may be
    /// coarser). The server clips the answer to the request and tolerates a
    /// shorter answer (it reports only the covered prefix). Default: one data extent.
    fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>, BackendError> {
        let _ = offset;
        Ok(vec![Extent { length: len, hole: false, zero: false }])
    }
}
