//! Test-only behaviour, compiled only with the `testing` feature (./test builds it): the source
//! write log the recovery-point tests use as their oracle. A normal build refuses the settings
//! that ask for test-only behaviour (`source_write_log`, `shipping_paused`, `cache = "volatile"`)
//! with a clear error instead of ignoring them.

use std::fs::{File, OpenOptions};
use std::io::{BufWriter, Write};
use std::path::Path;

use crate::AgentError;

/// TEST/DIAGNOSTIC: the source's own record of every write and marker, in seq order.
/// Entry: `seq u64 | kind u8 (0 write, 1 zero, 2 marker) | disk u16 | offset u64 | len u64 | data`
/// (little endian; data only for writes).
pub(crate) struct SourceLog {
    out: BufWriter<File>,
}

impl SourceLog {
    pub fn open(path: &Path) -> Result<SourceLog, AgentError> {
        let f = OpenOptions::new()
            .create(true)
            .append(true)
            .open(path)
            .map_err(|source| AgentError::Io { path: path.to_owned(), source })?;
        Ok(SourceLog { out: BufWriter::new(f) })
    }

    fn entry(&mut self, seq: u64, kind: u8, disk: u16, offset: u64, len: u64, data: Option<&[u8]>) {
        let mut h = [0u8; 27];
        h[0..8].copy_from_slice(&seq.to_le_bytes());
        h[8] = kind;
        h[9..11].copy_from_slice(&disk.to_le_bytes());
        h[11..19].copy_from_slice(&offset.to_le_bytes());
        h[19..27].copy_from_slice(&len.to_le_bytes());
        let r =
            self.out.write_all(&h).and_then(|_| self.out.write_all(data.unwrap_or(&[]))).and_then(|_| self.out.flush());
        if let Err(e) = r {
            tracing::error!(error = %e, "cannot append to the source write log");
        }
    }

    pub fn write(&mut self, seq: u64, disk: u16, offset: u64, len: u64, data: Option<&[u8]>) {
        self.entry(seq, if data.is_some() { 0 } else { 1 }, disk, offset, len, data);
    }

    pub fn marker(&mut self, seq: u64) {
        self.entry(seq, 2, 0, 0, 0, None);
    }
}
