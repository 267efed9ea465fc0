//! Durable file replacement and filesystem facts.
//!
//! Architecture Invariant: a file that another start of a component reads back (checkpoints,
//! settings, routes, state) is replaced only by [`write_atomic`]: write a temporary file, fsync
//! it, rename it over the old one, fsync the folder. A crash leaves the old or the new content,
//! never a torn mix, and the rename itself survives power loss.

use std::fs::File;
use std::io::{self, Write};
use std::os::unix::ffi::OsStrExt;
use std::os::unix::fs::OpenOptionsExt;
use std::path::{Path, PathBuf};

/// Create `dir` (and its parents) and make `dir` itself private to this user (0700), also when
/// it existed: it is a folder of Ferry's own (a retention volume, a machine's replica or spool,
/// a state folder), whose files no other local user may list or read.
pub fn private_dir(dir: &Path) -> io::Result<()> {
    use std::os::unix::fs::PermissionsExt;
    std::fs::create_dir_all(dir)?;
    let mode = std::fs::metadata(dir)?.permissions().mode() & 0o777;
    if mode != 0o700 {
        std::fs::set_permissions(dir, std::fs::Permissions::from_mode(0o700))?;
    }
    Ok(())
}

/// fsync a folder so an entry created, renamed or removed in it survives a crash.
pub fn sync_dir(dir: &Path) -> io::Result<()> {
    File::open(dir)?.sync_all()
}

/// Delete the folder `dir` and everything in it, durably, and return the bytes its files held.
/// `marker` (a file in `dir` whose presence makes a component open the folder at start, e.g.
/// `machine.json`) goes first: a crash midway leaves a folder nobody reopens, and calling this
/// again finishes it. Links are removed, never followed. A missing `dir` is 0 bytes.
pub fn remove_tree(dir: &Path, marker: &str) -> io::Result<u64> {
    fn size(p: &Path) -> io::Result<u64> {
        let m = std::fs::symlink_metadata(p)?;
        if !m.is_dir() {
            return Ok(if m.is_file() { m.len() } else { 0 });
        }
        let mut total = 0;
        for e in std::fs::read_dir(p)? {
            total += size(&e?.path())?;
        }
        Ok(total)
    }
    let bytes = match size(dir) {
        Ok(b) => b,
        Err(e) if e.kind() == io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(io::Error::new(e.kind(), format!("cannot read {}: {e}", dir.display()))),
    };
    let m = dir.join(marker);
    match std::fs::remove_file(&m) {
        Ok(()) => sync_dir(dir)?,
        Err(e) if e.kind() == io::ErrorKind::NotFound => {}
        Err(e) => return Err(io::Error::new(e.kind(), format!("cannot remove {}: {e}", m.display()))),
    }
    std::fs::remove_dir_all(dir)
        .map_err(|e| io::Error::new(e.kind(), format!("cannot remove {}: {e}", dir.display())))?;
    if let Some(parent) = dir.parent().filter(|d| !d.as_os_str().is_empty()) {
        sync_dir(parent)?;
    }
    Ok(bytes)
}

/// A temporary name for [`write_atomic`]: beside the file (so the rename stays within one
/// filesystem) and unique to this process and call (so two writers of one file never share a
/// temporary file; the last rename wins whole).
pub fn temp_path(path: &Path) -> PathBuf {
    static NEXT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = NEXT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    let mut name = path.file_name().map(|n| n.to_os_string()).unwrap_or_default();
    name.push(format!(".{}.{n}.tmp", std::process::id()));
    path.with_file_name(name)
}

/// Replace `path` atomically and durably with `data` (write temp, fsync, rename, fsync folder).
/// The file is created with `mode` (before the umask).
pub fn atomic_replace(path: &Path, data: &[u8], mode: u32) -> io::Result<()> {
    let tmp = temp_path(path);
    let result = (|| {
        let mut f = std::fs::OpenOptions::new().write(true).create_new(true).mode(mode).open(&tmp)?;
        f.write_all(data)?;
        f.sync_all()?;
        std::fs::rename(&tmp, path)?;
        match path.parent() {
            Some(dir) if !dir.as_os_str().is_empty() => sync_dir(dir),
            _ => sync_dir(Path::new(".")),
        }
    })();
    if result.is_err() {
        let _ = std::fs::remove_file(&tmp);
    }
    result.map_err(|e| io::Error::new(e.kind(), format!("cannot replace {}: {e}", path.display())))
}

/// [`atomic_replace`] with mode 0600: Ferry's state files are nobody else's business.
pub fn write_atomic(path: &Path, data: &[u8]) -> io::Result<()> {
    atomic_replace(path, data, 0o600)
}

/// Rename `from` over `to` (a file or a folder) and fsync the folder of `to` (and of `from`
/// when it differs), so the rename survives a crash.
pub fn rename_durable(from: &Path, to: &Path) -> io::Result<()> {
    std::fs::rename(from, to)?;
    let to_dir = to.parent().filter(|d| !d.as_os_str().is_empty()).unwrap_or(Path::new("."));
    sync_dir(to_dir)?;
    if let Some(from_dir) = from.parent().filter(|d| !d.as_os_str().is_empty()) {
        if from_dir != to_dir {
            sync_dir(from_dir)?;
        }
    }
    Ok(())
}

fn c_path(path: &Path) -> io::Result<std::ffi::CString> {
    std::ffi::CString::new(path.as_os_str().as_bytes())
        .map_err(|_| io::Error::new(io::ErrorKind::InvalidInput, format!("{} contains a NUL byte", path.display())))
}

/// Space of the filesystem that holds `path`, in bytes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Space {
    /// Bytes an unprivileged writer may still use (`f_bavail`).
    pub available: u64,
    /// The filesystem's size.
    pub total: u64,
}

impl Space {
    /// Free space as a percentage of the total (100 for an empty or size-less filesystem).
    pub fn free_percent(&self) -> f64 {
        if self.total == 0 {
            100.0
        } else {
            self.available as f64 * 100.0 / self.total as f64
        }
    }
}

/// The first offset at or after `offset` that holds data (`lseek(SEEK_DATA)`): `None` when only
/// a hole follows up to the end of the file. A filesystem without `SEEK_DATA` answers `offset`
/// (everything counts as data), so a caller that skips holes never skips data.
pub fn next_data(file: &File, offset: u64) -> io::Result<Option<u64>> {
    use std::os::fd::AsRawFd;
    let Ok(off) = libc::off_t::try_from(offset) else { return Ok(None) };
    // SAFETY: lseek on a valid fd we borrow; callers use positioned I/O, so the moved file
    // position is harmless.
    let r = unsafe { libc::lseek(file.as_raw_fd(), off, libc::SEEK_DATA) };
    if r < 0 {
        let e = io::Error::last_os_error();
        return match e.raw_os_error() {
            Some(libc::ENXIO) => Ok(None),
            Some(libc::EINVAL) | Some(libc::EOPNOTSUPP) => Ok(Some(offset)),
            _ => Err(e),
        };
    }
    Ok(Some(r as u64))
}

/// `statvfs` of the filesystem that holds `path`.
pub fn space(path: &Path) -> io::Result<Space> {
    let c = c_path(path)?;
    // SAFETY: statvfs writes into a zeroed struct we own; the path is a valid C string.
    let mut s: libc::statvfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statvfs(c.as_ptr(), &mut s) } != 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(e.kind(), format!("cannot read the free space of {}: {e}", path.display())));
    }
    let bs = s.f_frsize as u64;
    Ok(Space { available: s.f_bavail as u64 * bs, total: s.f_blocks as u64 * bs })
}

/// The filesystem type (`statfs` `f_type`, e.g. `0x4d44` for FAT) of the filesystem holding `path`.
pub fn fs_type(path: &Path) -> io::Result<i64> {
    let c = c_path(path)?;
    // SAFETY: statfs fills a zeroed struct we own; the path is a valid C string.
    let mut st: libc::statfs = unsafe { std::mem::zeroed() };
    if unsafe { libc::statfs(c.as_ptr(), &mut st) } != 0 {
        let e = io::Error::last_os_error();
        return Err(io::Error::new(e.kind(), format!("cannot read the filesystem type of {}: {e}", path.display())));
    }
    #[allow(clippy::unnecessary_cast)] // f_type's width differs between libc targets
    Ok(st.f_type as i64)
}

/// The one-writer lock on a disk file: an exclusive `flock` held as long as this value lives
/// (the kernel drops it when the process dies, SIGKILL included). Every Ferry writer of a disk
/// (an agent on its source disk, a master target's applier on its target disk) takes it, so a
/// second writer — a second agent started on the same disk, a master target still applying to a
/// disk a failed-over machine now runs on — fails at open with a clear error instead of
/// interleaving writes. `flock` locks are independent of the byte-range (OFD) locks QEMU takes,
/// so `qemu-img compare`/`qemu-io -r` still read a locked disk.
#[derive(Debug)]
pub struct WriterLock {
    _file: File,
}

impl WriterLock {
    /// Open `path` (following links: a disk may be a `/dev/disk/by-id` link) and lock it.
    pub fn open(path: &Path, who: &str) -> io::Result<WriterLock> {
        let file =
            File::open(path).map_err(|e| io::Error::new(e.kind(), format!("cannot open {}: {e}", path.display())))?;
        lock_one_writer(&file, path, who)?;
        Ok(WriterLock { _file: file })
    }
}

/// Take the one-writer lock (see [`WriterLock`]) on `file`, already open at `path`, for as long
/// as its open file description lives (the caller keeps `file` open for the writer's life);
/// `who` names the writer in the error.
pub fn lock_one_writer(file: &File, path: &Path, who: &str) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: flock on a descriptor we own; no memory is passed.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } == 0 {
        return Ok(());
    }
    let e = io::Error::last_os_error();
    if e.raw_os_error() != Some(libc::EWOULDBLOCK) {
        return Err(io::Error::new(e.kind(), format!("cannot lock {} for {who}: {e}", path.display())));
    }
    let holder = file
        .metadata()
        .ok()
        .and_then(|m| {
            use std::os::unix::fs::MetadataExt;
            flock_holder(m.ino())
        })
        .map(|(pid, comm)| format!(" (held by process {pid}, {comm})"))
        .unwrap_or_default();
    Err(io::Error::new(
        io::ErrorKind::WouldBlock,
        format!(
            "{} is already open for writing by another Ferry process{holder}: one writer per disk — stop the other agent or master target using it before {who} opens it",
            path.display()
        ),
    ))
}

/// Give up the one-writer lock taken by [`lock_one_writer`] on `file` (the writer keeps the
/// file open, e.g. a master target handing a failed-over machine's disks to its agent).
pub fn unlock_one_writer(file: &File) -> io::Result<()> {
    use std::os::fd::AsRawFd;
    // SAFETY: flock on a descriptor we own; no memory is passed.
    if unsafe { libc::flock(file.as_raw_fd(), libc::LOCK_UN) } != 0 {
        return Err(io::Error::last_os_error());
    }
    Ok(())
}

/// Who holds a `flock` on inode `ino`, from `/proc/locks` (best effort, for the error message).
fn flock_holder(ino: u64) -> Option<(u32, String)> {
    let locks = std::fs::read_to_string("/proc/locks").ok()?;
    locks.lines().find_map(|l| {
        // "1: FLOCK  ADVISORY  WRITE 1234 08:01:5678 0 EOF"
        let f: Vec<&str> = l.split_whitespace().collect();
        let (kind, pid, dev_ino) = (f.get(1)?, f.get(4)?, f.get(5)?);
        if *kind != "FLOCK" || dev_ino.rsplit(':').next()?.parse::<u64>().ok()? != ino {
            return None;
        }
        let pid: u32 = pid.parse().ok()?;
        let comm = std::fs::read_to_string(format!("/proc/{pid}/comm")).unwrap_or_default();
        Some((pid, comm.trim().to_owned()))
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use std::os::unix::fs::PermissionsExt;

    #[test]
    fn a_removed_tree_counts_its_bytes_and_never_follows_links() {
        let d = tempfile::tempdir().unwrap();
        let keep = d.path().join("keep.img");
        std::fs::write(&keep, vec![1u8; 100]).unwrap();
        let dir = d.path().join("vm1");
        std::fs::create_dir_all(dir.join("journal")).unwrap();
        std::fs::write(dir.join("machine.json"), b"{}").unwrap();
        std::fs::write(dir.join("journal/0.seg"), vec![0u8; 4000]).unwrap();
        std::os::unix::fs::symlink(&keep, dir.join("link")).unwrap();
        assert_eq!(remove_tree(&dir, "machine.json").unwrap(), 4002);
        assert!(!dir.exists());
        assert_eq!(std::fs::read(&keep).unwrap().len(), 100, "the link's target stays");
        // Again (a crash after it): nothing left, nothing to count.
        assert_eq!(remove_tree(&dir, "machine.json").unwrap(), 0);
    }

    #[test]
    fn a_disk_has_one_writer_and_readers_are_not_blocked() {
        let d = tempfile::tempdir().unwrap();
        let disk = d.path().join("disk0.img");
        std::fs::write(&disk, vec![0u8; 4096]).unwrap();
        let first = WriterLock::open(&disk, "agent vm1").unwrap();
        let e = WriterLock::open(&disk, "agent vm1").unwrap_err();
        assert_eq!(e.kind(), io::ErrorKind::WouldBlock);
        let m = e.to_string();
        assert!(m.contains("one writer per disk") && m.contains(&std::process::id().to_string()), "{m}");
        // Through a link too: the lock is on the file.
        let link = d.path().join("by-id");
        std::os::unix::fs::symlink(&disk, &link).unwrap();
        assert!(WriterLock::open(&link, "master target").is_err());
        // A plain reader is not blocked; once the writer is gone, the next one takes it.
        assert_eq!(std::fs::read(&disk).unwrap().len(), 4096);
        drop(first);
        // (A child forked by another test may hold a copy of the descriptor until it execs.)
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while let Err(e) = WriterLock::open(&disk, "agent vm1") {
            assert!(std::time::Instant::now() < deadline, "{e}");
            std::thread::sleep(std::time::Duration::from_millis(20));
        }
    }

    #[test]
    fn write_atomic_replaces_whole_files_with_private_mode() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("state.json");
        write_atomic(&p, b"first").unwrap();
        write_atomic(&p, b"second, longer").unwrap();
        assert_eq!(std::fs::read(&p).unwrap(), b"second, longer");
        assert_eq!(std::fs::metadata(&p).unwrap().permissions().mode() & 0o777, 0o600);
        let left: Vec<_> = std::fs::read_dir(d.path()).unwrap().flatten().map(|e| e.file_name()).collect();
        assert_eq!(left, vec![std::ffi::OsString::from("state.json")], "no temporary file is left behind");
        assert_ne!(temp_path(&p), temp_path(&p), "every writer gets its own temporary file");
    }

    #[test]
    fn write_atomic_into_a_missing_folder_fails_with_the_path() {
        let d = tempfile::tempdir().unwrap();
        let p = d.path().join("missing").join("x");
        let e = write_atomic(&p, b"x").unwrap_err();
        assert!(e.to_string().contains("missing"), "{e}");
    }

    #[test]
    fn space_and_type_of_a_real_folder() {
        let d = tempfile::tempdir().unwrap();
        let s = space(d.path()).unwrap();
        assert!(s.total > 0 && s.available <= s.total);
        assert!((0.0..=100.0).contains(&s.free_percent()));
        assert!(fs_type(d.path()).is_ok());
        assert!(space(&d.path().join("nope")).is_err());
    }

    #[test]
    fn rename_durable_moves_folders() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir(d.path().join("a.tmp")).unwrap();
        rename_durable(&d.path().join("a.tmp"), &d.path().join("a")).unwrap();
        assert!(d.path().join("a").is_dir());
    }
}
