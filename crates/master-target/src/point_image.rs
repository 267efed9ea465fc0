//! Rebuilding a disk at a recovery point: an index of the extents written between the frozen
//! base and the point (each pointing at its bytes inside a journal segment, or at zeroes), and
//! the ways to use it — a read-only NBD backend, a raw image file, or a qcow2 overlay on the base.
//! Building the index costs time proportional to the journal between base and point, never to
//! the disk size.

use std::collections::BTreeMap;
use std::fs::{File, OpenOptions};
use std::os::unix::fs::FileExt;
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_nbd::{Backend, BackendError, Extent};

/// Where the bytes of an extent come from.
#[derive(Clone)]
pub enum Source {
    Zero,
    /// Bytes in a file — a journal segment, or the frozen base; `offset` is the file position
    /// of the extent's first byte.
    File {
        file: Arc<File>,
        offset: u64,
    },
}

impl Source {
    fn advanced(&self, by: u64) -> Source {
        match self {
            Source::Zero => Source::Zero,
            Source::File { file, offset } => Source::File { file: file.clone(), offset: offset + by },
        }
    }
}

/// Non-overlapping extents, later inserts replacing earlier ones where they overlap.
#[derive(Clone, Default)]
pub struct ExtentMap {
    /// start -> (end, source of `start`)
    map: BTreeMap<u64, (u64, Source)>,
}

impl ExtentMap {
    pub fn insert(&mut self, start: u64, len: u64, src: Source) {
        if len == 0 {
            return;
        }
        let end = start + len;
        // Cut an extent that begins before `start` and reaches into the new one.
        if let Some((&s, (e, old))) = self.map.range(..start).next_back() {
            let (e, old) = (*e, old.clone());
            if e > start {
                self.map.insert(s, (start, old.clone()));
                if e > end {
                    self.map.insert(end, (e, old.advanced(end - s)));
                }
            }
        }
        // Extents beginning inside the new one are covered, except a tail past `end`.
        let inside: Vec<u64> = self.map.range(start..end).map(|(s, _)| *s).collect();
        for s in inside {
            if let Some((e, old)) = self.map.remove(&s) {
                if e > end {
                    self.map.insert(end, (e, old.advanced(end - s)));
                }
            }
        }
        self.map.insert(start, (end, src));
    }

    /// Extents overlapping `[start, end)`, clipped to it: (offset, len, source of offset).
    pub fn overlapping(&self, start: u64, end: u64) -> Vec<(u64, u64, Source)> {
        let mut out = Vec::new();
        if let Some((&s, (e, src))) = self.map.range(..start).next_back() {
            if *e > start {
                out.push((start, (*e).min(end) - start, src.advanced(start - s)));
            }
        }
        for (&s, (e, src)) in self.map.range(start..end) {
            out.push((s, (*e).min(end) - s, src.clone()));
        }
        out
    }

    pub fn iter(&self) -> impl Iterator<Item = (u64, u64, &Source)> {
        self.map.iter().map(|(s, (e, src))| (*s, e - s, src))
    }

    pub fn len(&self) -> usize {
        self.map.len()
    }

    pub fn is_empty(&self) -> bool {
        self.map.is_empty()
    }

    /// Total bytes covered.
    pub fn bytes(&self) -> u64 {
        self.map.iter().map(|(s, (e, _))| e - s).sum()
    }

    /// Covered ranges, adjacent ones merged (changed extents).
    pub fn ranges(&self) -> Vec<(u64, u64)> {
        let mut out: Vec<(u64, u64)> = Vec::new();
        for (&s, (e, _)) in &self.map {
            match out.last_mut() {
                Some((ls, ll)) if *ls + *ll == s => *ll += e - s,
                _ => out.push((s, e - s)),
            }
        }
        out
    }
}

/// One disk at one point: the frozen base plus the index.
pub struct PointDisk {
    pub size: u64,
    pub base: Arc<File>,
    pub base_path: PathBuf,
    pub map: ExtentMap,
}

impl PointDisk {
    fn read_into(&self, offset: u64, buf: &mut [u8]) -> std::io::Result<()> {
        let end = offset + buf.len() as u64;
        self.base.read_exact_at(buf, offset)?;
        for (o, len, src) in self.map.overlapping(offset, end) {
            let slice = &mut buf[(o - offset) as usize..(o - offset + len) as usize];
            match src {
                Source::Zero => slice.fill(0),
                Source::File { file, offset } => file.read_exact_at(slice, offset)?,
            }
        }
        Ok(())
    }
}

/// Read-only NBD backend of a disk at a point.
pub struct PointBackend(pub Arc<PointDisk>);

impl Backend for PointBackend {
    fn size(&self) -> u64 {
        self.0.size
    }
    fn read_only(&self) -> bool {
        true
    }
    fn can_multi_conn(&self) -> bool {
        true
    }
    fn read(&self, offset: u64, buf: &mut [u8]) -> Result<(), BackendError> {
        self.0.read_into(offset, buf).map_err(BackendError::Io)
    }
    fn write(&self, _: u64, _: &[u8], _: bool) -> Result<(), BackendError> {
        Err(BackendError::ReadOnly)
    }
    fn write_zeroes(&self, _: u64, _: u64, _: bool, _: bool) -> Result<(), BackendError> {
        Err(BackendError::ReadOnly)
    }
    fn flush(&self) -> Result<(), BackendError> {
        Ok(())
    }
    fn block_status(&self, offset: u64, len: u64) -> Result<Vec<Extent>, BackendError> {
        let _ = offset;
        Ok(vec![Extent { length: len, hole: false, zero: false }])
    }
}

/// Copy `src` to `dst` (created, `size` bytes), allocated regions only (holes stay holes).
pub fn sparse_copy(src: &File, dst: &File, size: u64) -> std::io::Result<u64> {
    dst.set_len(size)?;
    let mut copied = 0;
    let mut pos = 0u64;
    while pos < size {
        // SAFETY: lseek on a file descriptor we own.
        let data = unsafe { libc::lseek(src.as_raw_fd(), pos as libc::off_t, libc::SEEK_DATA) };
        if data < 0 {
            let e = std::io::Error::last_os_error();
            if e.raw_os_error() == Some(libc::ENXIO) {
                break; // no data after pos
            }
            return Err(e);
        }
        let data = data as u64;
        if data >= size {
            break;
        }
        // SAFETY: as above.
        let hole = unsafe { libc::lseek(src.as_raw_fd(), data as libc::off_t, libc::SEEK_HOLE) };
        let hole = if hole < 0 { size } else { (hole as u64).min(size) };
        copy_range(src, dst, data, hole - data)?;
        copied += hole - data;
        pos = hole;
    }
    Ok(copied)
}

/// Copy a range into a fresh (all-zero) file, leaving all-zero blocks unwritten so the copy
/// stays as sparse as the data allows (a fully allocated source still gives a sparse copy).
fn copy_range(src: &File, dst: &File, offset: u64, len: u64) -> std::io::Result<()> {
    const BLOCK: usize = 64 << 10;
    let mut buf = vec![0u8; len.min(4 << 20) as usize];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(buf.len() as u64) as usize;
        src.read_exact_at(&mut buf[..n], offset + done)?;
        let mut pos = 0;
        while pos < n {
            let end = (pos + BLOCK).min(n);
            if buf[pos..end].iter().any(|b| *b != 0) {
                dst.write_all_at(&buf[pos..end], offset + done + pos as u64)?;
            }
            pos = end;
        }
        done += n as u64;
    }
    Ok(())
}

/// Zero a range of a sparse file: punch a hole, falling back to writing zeros.
pub fn zero_range(f: &File, offset: u64, len: u64) -> std::io::Result<()> {
    if len == 0 {
        return Ok(());
    }
    // SAFETY: plain fallocate on a file descriptor we own; no memory is passed.
    let r = unsafe {
        libc::fallocate(
            f.as_raw_fd(),
            libc::FALLOC_FL_PUNCH_HOLE | libc::FALLOC_FL_KEEP_SIZE,
            offset as libc::off_t,
            len as libc::off_t,
        )
    };
    if r == 0 {
        return Ok(());
    }
    let zeros = vec![0u8; (len.min(1 << 20)) as usize];
    let mut done = 0;
    while done < len {
        let n = (len - done).min(zeros.len() as u64) as usize;
        f.write_all_at(&zeros[..n], offset + done)?;
        done += n as u64;
    }
    Ok(())
}

/// Apply the index's extents onto `dst` (which holds the base), reading journal bytes in place.
fn apply_map(map: &ExtentMap, dst: &File) -> std::io::Result<()> {
    let mut buf = Vec::new();
    for (off, len, src) in map.iter() {
        match src {
            Source::Zero => zero_range(dst, off, len)?,
            Source::File { file, offset } => {
                let mut done = 0;
                while done < len {
                    let n = (len - done).min(8 << 20) as usize;
                    buf.resize(n, 0);
                    file.read_exact_at(&mut buf, offset + done)?;
                    dst.write_all_at(&buf, off + done)?;
                    done += n as u64;
                }
            }
        }
    }
    Ok(())
}

/// A self-contained raw image of the disk at the point: the base's allocated regions plus the
/// changes, fsync'd.
pub fn write_raw(disk: &PointDisk, out: &Path) -> std::io::Result<()> {
    let f = OpenOptions::new().read(true).write(true).create_new(true).open(out)?;
    sparse_copy(&disk.base, &f, disk.size)?;
    apply_map(&disk.map, &f)?;
    f.sync_all()
}

/// A qcow2 overlay whose backing file is the frozen base: only the changes are written, so the
/// time is proportional to them. `qemu-img` creates it; `qemu-nbd` serves it on a private socket
/// while the changes are written through NBD (qemu keeps its own format consistent).
pub fn write_qcow2_overlay(disk: &PointDisk, out: &Path, scratch: &Path) -> Result<(), String> {
    let run = |cmd: &mut Command| -> Result<(), String> {
        let o = cmd.output().map_err(|e| format!("cannot run {:?}: {e} (install qemu-utils)", cmd.get_program()))?;
        if !o.status.success() {
            return Err(format!("{:?} failed: {}", cmd.get_program(), String::from_utf8_lossy(&o.stderr).trim()));
        }
        Ok(())
    };
    run(Command::new("qemu-img")
        .args(["create", "-q", "-f", "qcow2", "-F", "raw", "-b"])
        .arg(&disk.base_path)
        .arg(out)
        .arg(disk.size.to_string()))?;
    if disk.map.is_empty() {
        return Ok(());
    }
    let sock = scratch.join(format!("qcow2-{}.sock", std::process::id() as u64 * 1000 + rand_suffix()));
    let _ = std::fs::remove_file(&sock);
    let mut child = Command::new("qemu-nbd")
        .args(["-f", "qcow2", "--cache=writeback", "-k"])
        .arg(&sock)
        .arg(out)
        .stdin(Stdio::null())
        .stdout(Stdio::null())
        .stderr(Stdio::piped())
        .spawn()
        .map_err(|e| format!("cannot run qemu-nbd: {e} (install qemu-utils)"))?;
    let result = (|| {
        let deadline = Instant::now() + Duration::from_secs(20);
        let mut client = loop {
            match ferry_nbd::NbdClient::connect_unix(&sock, "") {
                Ok(c) => break c,
                Err(e) if Instant::now() > deadline => return Err(format!("qemu-nbd did not start: {e}")),
                Err(_) => std::thread::sleep(Duration::from_millis(20)),
            }
        };
        let mut buf = Vec::new();
        for (off, len, src) in disk.map.iter() {
            match src {
                Source::Zero => client.write_zeroes(off, len).map_err(|e| e.to_string())?,
                Source::File { file, offset } => {
                    let mut done = 0;
                    while done < len {
                        let n = (len - done).min(8 << 20) as usize;
                        buf.resize(n, 0);
                        file.read_exact_at(&mut buf, offset + done).map_err(|e| format!("journal read: {e}"))?;
                        client.write(off + done, &buf).map_err(|e| e.to_string())?;
                        done += n as u64;
                    }
                }
            }
        }
        client.flush().map_err(|e| e.to_string())?;
        client.disconnect().map_err(|e| e.to_string())
    })();
    // qemu-nbd exits after its only client disconnects; make sure it is gone either way.
    let deadline = Instant::now() + Duration::from_secs(20);
    loop {
        match child.try_wait() {
            Ok(Some(_)) => break,
            Ok(None) if Instant::now() < deadline && result.is_ok() => std::thread::sleep(Duration::from_millis(10)),
            _ => {
                let _ = child.kill();
                let _ = child.wait();
                break;
            }
        }
    }
    let _ = std::fs::remove_file(&sock);
    result?;
    File::open(out).and_then(|f| f.sync_all()).map_err(|e| format!("fsync of {}: {e}", out.display()))
}

fn rand_suffix() -> u64 {
    use std::sync::atomic::{AtomicU64, Ordering};
    static N: AtomicU64 = AtomicU64::new(0);
    N.fetch_add(1, Ordering::Relaxed)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn extent_map_later_writes_win() {
        let dir = tempfile::tempdir().unwrap();
        let j = Arc::new(tempfile::tempfile_in(dir.path()).unwrap());
        let mut m = ExtentMap::default();
        let mut model = vec![0i64; 200]; // -1 = zero, 0 = base, >0 = journal offset + 1
        let mut rng = 12345u64;
        for _ in 0..2000 {
            rng ^= rng << 13;
            rng ^= rng >> 7;
            rng ^= rng << 17;
            let start = rng % 190;
            let len = 1 + (rng >> 8) % (200 - start).min(30);
            if (rng >> 20).is_multiple_of(4) {
                m.insert(start, len, Source::Zero);
                for i in start..start + len {
                    model[i as usize] = -1;
                }
            } else {
                let off = (rng >> 24) % 1000;
                m.insert(start, len, Source::File { file: j.clone(), offset: off });
                for i in start..start + len {
                    model[i as usize] = (off + (i - start)) as i64 + 1;
                }
            }
        }
        let mut seen = vec![0i64; 200];
        for (o, l, src) in m.overlapping(0, 200) {
            for i in o..o + l {
                seen[i as usize] = match &src {
                    Source::Zero => -1,
                    Source::File { offset, .. } => (offset + (i - o)) as i64 + 1,
                };
            }
        }
        assert_eq!(seen, model);
        // Clipped queries agree too.
        for (o, l, src) in m.overlapping(37, 91) {
            assert!(o >= 37 && o + l <= 91);
            if let Source::File { offset, .. } = src {
                assert_eq!(model[o as usize], offset as i64 + 1);
            }
        }
    }
}
