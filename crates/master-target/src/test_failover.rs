//! Test failovers (drills) the configuration server orders through settings
//! (`machine_test_failovers`). Each order is a wanted state: a writable NBD export of the
//! order's point (a throwaway copy-on-write overlay over the point: the replica, its journal and
//! its target disks are never written, and replication goes on), pinning the point while the
//! order stands. An export whose order is gone is discarded and its pin released, whenever that
//! is seen — also after a restart, when the writable overlay is gone and the export says so.
//!
//! Orders are followed in one thread at a time, off the settings watch: an export of a point
//! builds an index (O(writes since the base)), which must not hold up the heartbeat.

use std::collections::BTreeMap;
use std::sync::atomic::Ordering;
use std::sync::Arc;

use ferry_api::master_target::{FailoverOrderError, MaterializationKind, TestFailoverExport, TestFailoverOrder};
use ferry_types::codes;

use crate::recovery::{MaterializeRequest, MaterializedAs, PointError};
use crate::{MasterTarget, Replica};
use ferry_protocol::now_ms;

impl MasterTarget {
    /// Carry out the latest test-failover orders (see the module's doc), in a thread.
    pub(crate) fn follow_test_failover_orders(self: &Arc<Self>) {
        if self.test_orders_busy.swap(true, Ordering::SeqCst) {
            // The running thread looks at the orders again before it stops.
            return;
        }
        let mt = self.clone();
        let spawned = std::thread::Builder::new().name("test-failover-orders".into()).spawn(move || loop {
            let Some(orders) = mt.test_failover_orders.lock().unwrap_or_else(|p| p.into_inner()).clone() else {
                mt.test_orders_busy.store(false, Ordering::SeqCst);
                return;
            };
            mt.carry_out_test_failovers(&orders);
            let now = mt.test_failover_orders.lock().unwrap_or_else(|p| p.into_inner());
            if now.as_ref() == Some(&orders) {
                // Released under the orders' lock: a change made after this is followed anew.
                mt.test_orders_busy.store(false, Ordering::SeqCst);
                return;
            }
        });
        if let Err(e) = spawned {
            self.test_orders_busy.store(false, Ordering::SeqCst);
            tracing::error!(error = %e, "cannot start the test-failover order thread");
        }
    }

    fn carry_out_test_failovers(self: &Arc<Self>, orders: &BTreeMap<String, TestFailoverOrder>) {
        let replicas: Vec<Arc<Replica>> = self.lock_replicas().values().cloned().collect();
        for (machine, o) in orders {
            if !replicas.iter().any(|r| r.name == *machine) {
                tracing::warn!(%machine, order = %o.order, "test-failover order for a machine this master target does not hold");
            }
        }
        for r in &replicas {
            let want = orders.get(r.name.as_str());
            for m in r.materializations() {
                let Some(order) = &m.order else { continue };
                if want.map(|w| &w.order) == Some(order) {
                    continue;
                }
                match r.discard(&m.id) {
                    Ok(_) => {
                        tracing::info!(machine = %r.name, %order, export = %m.id, "test failover cleaned up: export discarded, point released")
                    }
                    Err(e) => {
                        tracing::warn!(machine = %r.name, %order, error = %e, "cannot discard a test failover's export")
                    }
                }
            }
            let Some(w) = want else {
                // No drill any more: an earlier order's error is over with it.
                *r.test_order_error.lock().unwrap_or_else(|p| p.into_inner()) = None;
                continue;
            };
            if r.materializations().iter().any(|m| m.order.as_deref() == Some(w.order.as_str())) {
                continue;
            }
            let mut err = r.test_order_error.lock().unwrap_or_else(|p| p.into_inner());
            if err.as_ref().is_some_and(|e| e.order == w.order) {
                // Failed once: the job reports it; the same order is not tried again.
                continue;
            }
            drop(err);
            let result = self.resolve_point(&r.name, &w.point).and_then(|point| {
                let req = MaterializeRequest {
                    point: w.point.clone(),
                    kind: MaterializationKind::Export,
                    format: None,
                    dir: None,
                    writable: true,
                    order: Some(w.order.clone()),
                };
                r.materialize(
                    point,
                    &req,
                    &r.datastore.clone(),
                    &self.config.nbd_socket(),
                    self.config.image_root.as_deref(),
                )
            });
            err = r.test_order_error.lock().unwrap_or_else(|p| p.into_inner());
            match result {
                Ok(m) => {
                    tracing::info!(machine = %r.name, order = %w.order, point = %m.point.id, export = %m.id, "test failover: writable export of the point ready");
                    *err = None;
                }
                Err(e) => {
                    tracing::warn!(machine = %r.name, order = %w.order, error = %e, "test-failover order failed");
                    let code = match &e {
                        PointError::NotFound(_) => codes::POINT_NOT_FOUND,
                        PointError::Conflict(_) => codes::CONFLICT,
                        PointError::Invalid(_) => codes::BAD_REQUEST,
                        PointError::Failed(_) => codes::MATERIALIZE_FAILED,
                    };
                    *err = Some(FailoverOrderError {
                        order: w.order.clone(),
                        code: code.code,
                        message: format!("{e} ({})", e.remedy()),
                        at_ms: now_ms(),
                    });
                }
            }
        }
    }

    /// The test failover's export of `r`, as its status shows it.
    pub(crate) fn test_failover_export(&self, r: &Replica) -> Option<TestFailoverExport> {
        let m = r.materializations().into_iter().find(|m| m.order.is_some())?;
        let MaterializedAs::Export { exports, .. } = &m.what else { return None };
        if exports.is_empty() {
            return None;
        }
        let sock = self.config.nbd_socket();
        Some(TestFailoverExport {
            order: m.order.clone().unwrap_or_default(),
            materialization: m.id.clone(),
            point: m.point.clone(),
            nbd_disks: exports.iter().map(|e| format!("unix:{}:{e}", sock.display())).collect(),
            nbd_urls: exports.iter().map(|e| format!("nbd+unix:///{e}?socket={}", sock.display())).collect(),
            problem: m.problem.clone(),
        })
    }
}
