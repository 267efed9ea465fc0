//! In-memory backend for unit tests.

use std::sync::RwLock;

use crate::backend::{Backend, BackendError};

/// A zero-filled in-memory disk (for tests). Allocates `size` bytes up front.
#[derive(Debug)]
pub struct MemBackend {
    data: RwLock<Vec<u8>>,
    read_only: bool,
}

impl MemBackend {
    pub fn new(size: u64) -> MemBackend {
        MemBackend { data: RwLock::new(vec![0u8; size as usize]), read_only: false }
    }

    /// A read-only in-memory disk with the given content.
    pub fn read_only_from(data: Vec<u8>) -> MemBackend {
        MemBackend { data: RwLock::new(data), read_only: true }
    }

    /// Copy of the current content.
    pub fn contents(&self) -> Vec<u8> {
        self.data.read().unwrap_or_else(|e| e.into_inner()).clone()
    }

    fn range(offset: u64, len: u64, size: usize) -> Result<std::ops::Range<usize>, BackendError> {
        let end = offset
            .checked_add(len)
            .filter(|&e| e <= size as u64)
            .ok_or_else(|| BackendError::Invalid("range beyond end of disk".into()))?;
        Ok(offset as usize..end as usize)
    }
}

impl Backend for MemBackend {
    fn size(&self) -> u64 {
        self.data.read().unwrap_or_else(|e| e.into_inner()).len() as u64
    }

    fn read_only(&self) -> bool {
        self.read_only
    }

    fn can_multi_conn(&self) -> bool {
        true
    }

    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), BackendError> {
        let d = self.data.read().unwrap_or_else(|e| e.into_inner());
        let r = Self::range(offset, buf.len() as u64, d.len())?;
        buf.copy_from_slice(&d[r]);
        Ok(())
    }

    fn write(&self, offset: u64, data: &[u8], _fua: bool) -> Result<(), BackendError> {
        if self.read_only {
            return Err(BackendError::ReadOnly);
        }
        let mut d = self.data.write().unwrap_or_else(|e| e.into_inner());
        let r = Self::range(offset, data.len() as u64, d.len())?;
        d[r].copy_from_slice(data);
        Ok(())
    }

    fn write_zeroes(&self, offset: u64, len: u64, _may_trim: bool, _fua: bool) -> Result<(), BackendError> {
        if self.read_only {
            return Err(BackendError::ReadOnly);
        }
        let mut d = self.data.write().unwrap_or_else(|e| e.into_inner());
        let r = Self::range(offset, len, d.len())?;
        d[r].fill(0);
        Ok(())
    }

    fn flush(&self) -> Result<(), BackendError> {
        Ok(())
    }
}
