//! Retention volume eligibility (MT-5): a master target keeps its journal and recovery points on a
//! retention volume, which must not be anything else's storage. A volume is a folder; everything may
//! live on one filesystem, so the checks compare canonical paths and statfs of the folder itself.

use std::fs::{File, OpenOptions};
use std::os::unix::io::AsRawFd;
use std::path::{Path, PathBuf};

use serde::{Deserialize, Serialize};

/// Linux default when the configuration names none.
pub const DEFAULT_RETENTION: &str = "/mnt/retention";
const ROLE_MARKER: &str = ".ferry-role.json";
const LOCK_FILE: &str = ".ferry-retention.lock";
/// statfs f_type of FAT12/16/32 (vfat and msdos).
const MSDOS_SUPER_MAGIC: i64 = 0x4d44;

#[derive(Debug, thiserror::Error)]
pub enum EligibilityError {
    #[error("no retention volume configured and {DEFAULT_RETENTION} does not exist: set `retention` to a folder reserved for recovery points")]
    NotConfigured,
    #[error("retention volume {path} is not a folder")]
    NotAFolder { path: PathBuf },
    #[error("retention volume {path} {relation} the {what} {other}: a retention volume must be used for nothing else (MT-5); choose a separate folder")]
    Overlaps { path: PathBuf, relation: &'static str, what: String, other: PathBuf },
    #[error("retention volume {path} is already the {role} of master target {owner:?}: choose a folder no other master target uses (MT-5)")]
    InUse { path: PathBuf, role: String, owner: String },
    #[error("retention volume {path} is locked by another process (another master target is running on it): stop it or choose another folder")]
    Locked { path: PathBuf },
    #[error("retention volume {path} is on a FAT/FAT32 filesystem, which cannot hold recovery points safely (no sparse files, 4 GiB file limit): use ext4, xfs or similar (MT-5)")]
    Fat { path: PathBuf },
    #[error("retention volume {path} has no capacity (filesystem reports 0 blocks): use a folder on a real, writable filesystem (MT-5)")]
    NoCapacity { path: PathBuf },
    #[error("retention volume {path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
}

#[derive(Debug, Serialize, Deserialize)]
struct RoleMarker {
    role: String,
    owner: String,
}

/// An eligible retention volume, locked for this master target while the value lives.
#[derive(Debug)]
pub struct RetentionVolume {
    pub path: PathBuf,
    _lock: File,
}

fn io(path: &Path) -> impl FnOnce(std::io::Error) -> EligibilityError + '_ {
    move |source| EligibilityError::Io { path: path.to_owned(), source }
}

/// Check a candidate retention folder and take it for master target `owner`.
/// `others` are folders with another role (datastore, caches, install folder), as (what, path).
pub fn open_retention_volume(
    configured: Option<&Path>,
    owner: &str,
    others: &[(String, PathBuf)],
) -> Result<RetentionVolume, EligibilityError> {
    let path = match configured {
        Some(p) => p.to_owned(),
        None if Path::new(DEFAULT_RETENTION).is_dir() => PathBuf::from(DEFAULT_RETENTION),
        None => return Err(EligibilityError::NotConfigured),
    };
    if path.exists() && !path.is_dir() {
        return Err(EligibilityError::NotAFolder { path });
    }
    // Capacity and filesystem first: they need no write (a zero-capacity folder takes none).
    if path.is_dir() {
        check_filesystem(&path)?;
    }
    ferry_sys::fs::private_dir(&path).map_err(io(&path))?;
    let path = path.canonicalize().map_err(io(&path))?;
    check_filesystem(&path)?;
    for (what, other) in others {
        let Ok(other) = other.canonicalize() else { continue };
        let relation = if other == path {
            "is"
        } else if path.starts_with(&other) {
            "lies inside"
        } else if other.starts_with(&path) {
            "contains"
        } else {
            continue;
        };
        return Err(EligibilityError::Overlaps { path, relation, what: what.clone(), other });
    }
    let lock_path = path.join(LOCK_FILE);
    let lock = OpenOptions::new().create(true).truncate(false).write(true).open(&lock_path).map_err(io(&lock_path))?;
    // SAFETY: flock on a descriptor we own; no memory is passed.
    if unsafe { libc::flock(lock.as_raw_fd(), libc::LOCK_EX | libc::LOCK_NB) } != 0 {
        let e = std::io::Error::last_os_error();
        if e.raw_os_error() == Some(libc::EWOULDBLOCK) {
            return Err(EligibilityError::Locked { path });
        }
        return Err(io(&lock_path)(e));
    }
    claim(&path, "retention volume", owner)?;
    Ok(RetentionVolume { path, _lock: lock })
}

/// Mark a folder with its role for master target `owner`, refusing one another master target (or
/// another role) already claimed. Used for the retention volume and the datastore.
pub fn claim(path: &Path, role: &str, owner: &str) -> Result<(), EligibilityError> {
    let marker = path.join(ROLE_MARKER);
    if let Ok(data) = std::fs::read(&marker) {
        if let Ok(m) = serde_json::from_slice::<RoleMarker>(&data) {
            if m.role != role || m.owner != owner {
                return Err(EligibilityError::InUse { path: path.to_owned(), role: m.role, owner: m.owner });
            }
            return Ok(());
        }
    }
    let data = serde_json::to_vec_pretty(&RoleMarker { role: role.to_owned(), owner: owner.to_owned() })
        .map_err(|e| io(path)(std::io::Error::other(e)))?;
    ferry_sys::fs::write_atomic(&marker, &data).map_err(|e| io(path)(std::io::Error::other(e.to_string())))
}

fn check_filesystem(path: &Path) -> Result<(), EligibilityError> {
    let f_type = ferry_sys::fs::fs_type(path).map_err(io(path))?;
    let space = ferry_sys::fs::space(path).map_err(io(path))?;
    let fat_types = ["vfat", "msdos", "fat", "exfat", "fuse.fusefat", "fuse.exfat", "fuse.fatfs"];
    let mount_type = mount_fstype(path);
    if f_type == MSDOS_SUPER_MAGIC || mount_type.as_deref().is_some_and(|t| fat_types.contains(&t)) {
        return Err(EligibilityError::Fat { path: path.to_owned() });
    }
    if space.total == 0 {
        return Err(EligibilityError::NoCapacity { path: path.to_owned() });
    }
    Ok(())
}

/// The filesystem type of the mount holding `path` (from /proc/self/mountinfo): catches FAT
/// served through FUSE, whose statfs type is FUSE's own.
fn mount_fstype(path: &Path) -> Option<String> {
    let info = std::fs::read_to_string("/proc/self/mountinfo").ok()?;
    let mut best: Option<(usize, String)> = None;
    for line in info.lines() {
        let fields: Vec<&str> = line.split(' ').collect();
        let mount_point = fields.get(4)?.replace("\\040", " ");
        let dash = fields.iter().position(|f| *f == "-")?;
        let fstype = fields.get(dash + 1)?;
        if path.starts_with(&mount_point) && best.as_ref().is_none_or(|(len, _)| mount_point.len() >= *len) {
            best = Some((mount_point.len(), (*fstype).to_owned()));
        }
    }
    best.map(|(_, t)| t)
}

#[cfg(test)]
mod tests {
    use super::*;

    fn others(d: &Path) -> Vec<(String, PathBuf)> {
        vec![("datastore (target disks)".into(), d.join("datastore")), ("process-server cache".into(), d.join("cache"))]
    }

    #[test]
    fn a_separate_folder_is_accepted_and_locked() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("datastore")).unwrap();
        let v = open_retention_volume(Some(&d.path().join("retention")), "mt1", &others(d.path())).unwrap();
        assert!(v.path.is_absolute());
        // Same process, second open: the lock is held.
        let e = open_retention_volume(Some(&d.path().join("retention")), "mt1", &others(d.path())).unwrap_err();
        assert!(matches!(e, EligibilityError::Locked { .. }), "{e}");
        drop(v);
        open_retention_volume(Some(&d.path().join("retention")), "mt1", &others(d.path())).unwrap();
    }

    #[test]
    fn overlapping_folders_are_refused_by_canonical_path() {
        let d = tempfile::tempdir().unwrap();
        std::fs::create_dir_all(d.path().join("datastore/inner")).unwrap();
        std::fs::create_dir_all(d.path().join("cache")).unwrap();
        // Equal, through a symlink and a `..` detour.
        std::os::unix::fs::symlink(d.path().join("datastore"), d.path().join("link")).unwrap();
        let e = open_retention_volume(Some(&d.path().join("link")), "mt1", &others(d.path())).unwrap_err();
        assert!(matches!(e, EligibilityError::Overlaps { relation: "is", .. }), "{e}");
        let e = open_retention_volume(Some(&d.path().join("cache/../datastore/inner")), "mt1", &others(d.path()))
            .unwrap_err();
        assert!(matches!(e, EligibilityError::Overlaps { relation: "lies inside", .. }), "{e}");
        let e = open_retention_volume(Some(d.path()), "mt1", &others(d.path())).unwrap_err();
        assert!(matches!(e, EligibilityError::Overlaps { relation: "contains", .. }), "{e}");
        assert!(e.to_string().contains("MT-5"));
    }

    #[test]
    fn another_master_targets_folder_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let r = d.path().join("r");
        drop(open_retention_volume(Some(&r), "mt1", &[]).unwrap());
        let e = open_retention_volume(Some(&r), "mt2", &[]).unwrap_err();
        assert!(matches!(e, EligibilityError::InUse { .. }), "{e}");
        assert!(e.to_string().contains("mt1"));
        let ds = d.path().join("ds");
        std::fs::create_dir_all(&ds).unwrap();
        claim(&ds, "datastore", "mt3").unwrap();
        let e = open_retention_volume(Some(&ds), "mt1", &[]).unwrap_err();
        assert!(e.to_string().contains("datastore") && e.to_string().contains("mt3"), "{e}");
    }

    #[test]
    fn a_lock_held_by_another_process_is_refused() {
        let d = tempfile::tempdir().unwrap();
        let r = d.path().join("r");
        std::fs::create_dir_all(&r).unwrap();
        // --no-fork: flock execs sleep itself, so killing it releases the lock and leaves nothing.
        let mut holder = std::process::Command::new("flock")
            .args(["-x", "--no-fork"])
            .arg(r.join(LOCK_FILE))
            .args(["sleep", "10"])
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn()
            .expect("flock(1) from util-linux");
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(5);
        let e = loop {
            match open_retention_volume(Some(&r), "mt1", &[]) {
                Err(e @ EligibilityError::Locked { .. }) => break e,
                Ok(v) => drop(v),
                Err(e) => panic!("{e}"),
            }
            assert!(std::time::Instant::now() < deadline, "the other process never took the lock");
            std::thread::sleep(std::time::Duration::from_millis(20));
        };
        assert!(e.to_string().contains("locked by another process"));
        let _ = holder.kill();
        let _ = holder.wait();
    }

    #[test]
    fn a_zero_capacity_filesystem_is_refused() {
        // sysfs reports 0 blocks: a real zero-capacity folder.
        let e = open_retention_volume(Some(Path::new("/sys/kernel")), "mt1", &[]).unwrap_err();
        assert!(matches!(e, EligibilityError::NoCapacity { .. }), "{e}");
    }

    #[test]
    fn a_missing_default_is_explained() {
        if !Path::new(DEFAULT_RETENTION).exists() {
            let e = open_retention_volume(None, "mt1", &[]).unwrap_err();
            assert!(e.to_string().contains(DEFAULT_RETENTION));
        }
    }
}
