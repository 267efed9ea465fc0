//! Removal orders: the configuration server disabled a machine's protection, so its replica —
//! journal, recovery points, checkpoints and (unless a failed-over machine runs from them) its
//! target disks — is deleted. Done once per order and recorded in [`REMOVED_FILE`], so a restart
//! neither forgets it nor does it twice; a failure is reported in the status and tried again at
//! the next settings fetch.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;

use ferry_api::control::{RemovalOrder, RemovedMachine};
use ferry_protocol::MachineName;

use crate::MasterTarget;

/// Where a master target keeps what it did with removal orders (on its retention volume).
pub const REMOVED_FILE: &str = "removed-machines.json";

impl MasterTarget {
    pub(crate) fn load_removed(retention: &Path) -> BTreeMap<String, RemovedMachine> {
        std::fs::read(retention.join(REMOVED_FILE))
            .ok()
            .and_then(|d| serde_json::from_slice(&d).ok())
            .unwrap_or_default()
    }

    pub(crate) fn removed_machines(&self) -> BTreeMap<String, RemovedMachine> {
        self.removed.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    /// Carry out the removal orders of the latest settings (records of orders no longer given —
    /// the machine was protected again — are dropped).
    pub(crate) fn follow_removals(&self, orders: Option<&BTreeMap<String, RemovalOrder>>) {
        let empty = BTreeMap::new();
        let orders = orders.unwrap_or(&empty);
        let mut removed = self.removed.lock().unwrap_or_else(|p| p.into_inner());
        let before = removed.clone();
        removed.retain(|m, _| orders.contains_key(m));
        for (m, o) in orders {
            if removed.get(m).is_some_and(|r| r.order == o.order && r.error.is_none()) {
                continue;
            }
            let done = match self.remove_replica(m, o) {
                Ok((bytes, kept)) => {
                    tracing::warn!(machine = %m, order = %o.order, deleted_bytes = bytes, kept_target_disks = kept, "protection disabled: replica deleted");
                    RemovedMachine {
                        order: o.order.clone(),
                        at_ms: ferry_protocol::now_ms(),
                        deleted_bytes: bytes,
                        kept_target_disks: kept,
                        error: None,
                    }
                }
                Err(e) => {
                    tracing::error!(machine = %m, error = %e, "cannot delete the replica of a disabled protection");
                    RemovedMachine {
                        order: o.order.clone(),
                        at_ms: 0,
                        deleted_bytes: 0,
                        kept_target_disks: o.keep_target_disks,
                        error: Some(e),
                    }
                }
            };
            removed.insert(m.clone(), done);
        }
        if *removed != before {
            let path = self.retention.join(REMOVED_FILE);
            let saved = serde_json::to_vec_pretty(&*removed)
                .map_err(std::io::Error::other)
                .and_then(|d| ferry_sys::fs::write_atomic(&path, &d));
            if let Err(e) = saved {
                tracing::error!(error = %e, file = %path.display(), "cannot keep the removal records");
            }
        }
    }

    /// Delete one machine's replica; returns the bytes deleted and whether the target disks were
    /// kept.
    fn remove_replica(&self, machine: &str, order: &RemovalOrder) -> Result<(u64, bool), String> {
        let name = MachineName::new(machine).map_err(|e| format!("{machine:?} is not a machine name: {e}"))?;
        if self.failover_orders.lock().unwrap_or_else(|p| p.into_inner()).contains_key(machine) {
            return Err(format!(
                "a failover order for {machine} is still given: the configuration server must withdraw it with the removal"
            ));
        }
        let dir = self.retention.join(name.as_str());
        let replica = self.replica(machine);
        let mut keep = order.keep_target_disks;
        let tdir = match &replica {
            Some(r) => {
                if !r.materializations().is_empty() {
                    return Err(format!(
                        "{machine} has materialized recovery points (a test failover or an image): clean them up first"
                    ));
                }
                // Disks handed over to a failed-over machine are never deleted, whatever the order.
                keep |= r.fence_state().is_some_and(|f| f.handed_over);
                {
                    let _j = r.lock_journal();
                    r.removed.store(true, Ordering::SeqCst);
                }
                r.stop();
                self.lock_replicas().remove(&name);
                Some(r.datastore.join(name.as_str()))
            }
            None => target_dir(&dir),
        };
        // The marker first: a crash from here on leaves a folder no start reopens, and the order,
        // given again, finishes the job.
        let marker = dir.join("machine.json");
        match std::fs::remove_file(&marker) {
            Ok(()) => ferry_sys::fs::sync_dir(&dir).map_err(|e| format!("{}: {e}", dir.display()))?,
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(format!("cannot remove {}: {e}", marker.display())),
        }
        ferry_sys::fail::fail_point("master-target.removal.marker-removed");
        let mut bytes = 0;
        if let (Some(t), false) = (&tdir, keep) {
            bytes += remove_target_dir(t)?;
        }
        bytes += ferry_sys::fs::remove_tree(&dir, "machine.json").map_err(|e| e.to_string())?;
        Ok((bytes, keep))
    }
}

/// The target-disk folder a replica's `targets.json` names (None without one).
fn target_dir(dir: &Path) -> Option<PathBuf> {
    #[derive(serde::Deserialize)]
    struct TargetsFile {
        dir: PathBuf,
    }
    let d = std::fs::read(dir.join("targets.json")).ok()?;
    serde_json::from_slice::<TargetsFile>(&d).ok().map(|t| t.dir)
}

/// Delete a replica's target-disk folder, except files set aside as not adopted (they may be a
/// machine's only other copy: the operator decides). Returns the bytes deleted.
fn remove_target_dir(t: &Path) -> Result<u64, String> {
    let entries = match std::fs::read_dir(t) {
        Ok(e) => e,
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => return Ok(0),
        Err(e) => return Err(format!("cannot read {}: {e}", t.display())),
    };
    let mut bytes = 0;
    let mut kept = 0;
    for e in entries.flatten() {
        let p = e.path();
        if e.file_name().to_string_lossy().contains(".not-adopted-") {
            kept += 1;
            continue;
        }
        let meta = std::fs::symlink_metadata(&p).map_err(|e| format!("{}: {e}", p.display()))?;
        if meta.is_dir() {
            bytes += ferry_sys::fs::remove_tree(&p, "machine.json").map_err(|e| e.to_string())?;
        } else {
            bytes += if meta.is_file() { meta.len() } else { 0 };
            std::fs::remove_file(&p).map_err(|e| format!("cannot remove {}: {e}", p.display()))?;
        }
    }
    if kept == 0 {
        match std::fs::remove_dir(t) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::NotFound => {}
            Err(e) => return Err(format!("cannot remove {}: {e}", t.display())),
        }
    } else {
        tracing::warn!(folder = %t.display(), files = kept, "target disk files set aside earlier are kept");
    }
    if let Some(parent) = t.parent() {
        ferry_sys::fs::sync_dir(parent).map_err(|e| format!("{}: {e}", parent.display()))?;
    }
    Ok(bytes)
}
