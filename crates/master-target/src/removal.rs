//! Removal orders: the configuration server disabled a machine's protection, so its replica —
//! journal, recovery points, checkpoints and (unless a failed-over machine runs from them) its
//! target disks — is deleted. Done once per order and recorded in [`REMOVED_FILE`], so a restart
//! neither forgets it nor does it twice; a failure is reported in the status and tried again at
//! the next settings fetch.

use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::atomic::Ordering;
use std::sync::Arc;

use ferry_api::control::{RemovalOrder, RemovedMachine};
use ferry_protocol::MachineName;

use crate::MasterTarget;

/// Where a master target keeps what it did with removal orders (on its retention volume).
pub const REMOVED_FILE: &str = "removed-machines.json";

/// In a target folder whose disks a disabled protection kept (a failed-over machine runs from
/// them): no replica is ever created there again.
pub const KEPT_MARKER: &str = ".kept-by-disabled-protection.json";

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

    /// Take the removal orders of the latest settings and carry them out on a thread of their
    /// own (deleting a journal and disks takes a while; heartbeats and status go on meanwhile),
    /// trying a failed one again every few seconds.
    pub(crate) fn set_removal_orders(self: &Arc<Self>, orders: Option<&BTreeMap<String, RemovalOrder>>) {
        *self.removal_orders.lock().unwrap_or_else(|p| p.into_inner()) = orders.cloned().unwrap_or_default();
        self.kick_removals();
    }

    fn kick_removals(self: &Arc<Self>) {
        if self.removals_busy.swap(true, Ordering::SeqCst) {
            // The running thread looks at the orders again before it ends.
            self.removals_again.store(true, Ordering::SeqCst);
            return;
        }
        let mt = self.clone();
        let spawned = std::thread::Builder::new().name("removals".into()).spawn(move || loop {
            mt.removals_again.store(false, Ordering::SeqCst);
            let pending = mt.follow_removals();
            if mt.shutdown.is_cancelled() {
                mt.removals_busy.store(false, Ordering::SeqCst);
                return;
            }
            if pending {
                std::thread::sleep(std::time::Duration::from_secs(3));
                continue;
            }
            mt.removals_busy.store(false, Ordering::SeqCst);
            // Orders that came while it finished: take them (unless another thread did).
            if !mt.removals_again.load(Ordering::SeqCst) || mt.removals_busy.swap(true, Ordering::SeqCst) {
                return;
            }
        });
        if let Err(e) = spawned {
            self.removals_busy.store(false, Ordering::SeqCst);
            tracing::error!(error = %e, "cannot start the removal thread");
        }
    }

    /// Whether a removal order for `machine` is given (its protection was disabled): no stream
    /// of it is taken, whatever the local file or earlier settings say, until it is withdrawn.
    pub(crate) fn removal_ordered(&self, machine: &str) -> Option<String> {
        self.removal_orders.lock().unwrap_or_else(|p| p.into_inner()).get(machine).map(|o| o.order.clone())
    }

    /// Carry out the orders not done yet (records of withdrawn orders — the machine was
    /// protected again — are dropped). Returns whether one failed (to be tried again).
    fn follow_removals(&self) -> bool {
        let orders = self.removal_orders.lock().unwrap_or_else(|p| p.into_inner()).clone();
        let todo: Vec<(String, RemovalOrder)> = {
            let mut removed = self.removed.lock().unwrap_or_else(|p| p.into_inner());
            let before = removed.len();
            removed.retain(|m, _| orders.contains_key(m));
            if removed.len() != before {
                self.save_removed(&removed);
            }
            orders
                .iter()
                .filter(|(m, o)| !removed.get(*m).is_some_and(|r| r.order == o.order && r.error.is_none()))
                .map(|(m, o)| (m.clone(), o.clone()))
                .collect()
        };
        let mut failed = false;
        for (m, o) in todo {
            // The removed lock is not held while files are deleted: the status goes on.
            let done = match self.remove_replica(&m, &o) {
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
                    failed = true;
                    tracing::error!(machine = %m, error = %e, "cannot delete the replica of a disabled protection (tried again)");
                    RemovedMachine {
                        order: o.order.clone(),
                        at_ms: 0,
                        deleted_bytes: 0,
                        kept_target_disks: o.keep_target_disks,
                        error: Some(e),
                    }
                }
            };
            let mut removed = self.removed.lock().unwrap_or_else(|p| p.into_inner());
            // Withdrawn meanwhile: not recorded.
            if self.removal_ordered(&m).as_deref() == Some(o.order.as_str()) {
                removed.insert(m.clone(), done);
                self.save_removed(&removed);
            }
        }
        failed
    }

    fn save_removed(&self, removed: &BTreeMap<String, RemovedMachine>) {
        let path = self.retention.join(REMOVED_FILE);
        let saved = serde_json::to_vec_pretty(removed)
            .map_err(std::io::Error::other)
            .and_then(|d| ferry_sys::fs::write_atomic(&path, &d));
        if let Err(e) = saved {
            tracing::error!(error = %e, file = %path.display(), "cannot keep the removal records");
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
        // Adopted disks are the old primary's own files: never deleted, never marked.
        let adopted = adopted_by(&dir).is_some();
        keep |= adopted;
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
            // Not loaded (a restart, or one that failed to open): its own record says where its
            // disks are; a replica from before per-machine datastores has them in the master
            // target's datastore. No retention folder: nothing of it is here.
            None if dir.exists() => target_dir(&dir).or_else(|| Some(self.config.datastore.join(name.as_str()))),
            None => None,
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
        let tdir = tdir.filter(|_| !adopted);
        match (&tdir, keep) {
            (Some(t), false) => bytes += remove_target_dir(t)?,
            // Kept for the failed-over machine that runs from them: marked, so no later replica
            // is ever created over them.
            (Some(t), true) if t.exists() => {
                let mark =
                    serde_json::json!({ "machine": machine, "order": order.order, "at_ms": ferry_protocol::now_ms() });
                ferry_sys::fs::write_atomic(&t.join(KEPT_MARKER), mark.to_string().as_bytes())
                    .map_err(|e| format!("cannot mark the kept disks in {}: {e}", t.display()))?;
            }
            _ => {}
        }
        bytes += ferry_sys::fs::remove_tree(&dir, "machine.json").map_err(|e| e.to_string())?;
        Ok((bytes, keep))
    }
}

/// The reprotect order that adopted the replica's target disks, if it did.
fn adopted_by(dir: &Path) -> Option<String> {
    let d = std::fs::read(dir.join("targets.json")).ok()?;
    serde_json::from_slice::<crate::replica::TargetsFile>(&d).ok()?.adopted_by
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
