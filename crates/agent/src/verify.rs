//! Online verify (like `drbdadm verify`): compare block hashes of source and target at the same
//! point of the change stream, without stopping replication; optionally resync what differs.

use std::sync::Arc;

use std::time::{Duration, Instant};

use ferry_api::agent::{DifferingBlocks, VerifyOrderStatus};
use ferry_api::control::VerifyOrder;
use ferry_protocol::{Event, RecordBody, ResyncReason};

use crate::machine::Machine;
use crate::AgentError;

/// Hash granularity of verify.
pub const VERIFY_BLOCK: u32 = 64 * 1024;
/// Bytes covered by one verify record.
const VERIFY_CHUNK: u64 = 4 << 20;

pub use ferry_api::agent::{VerifySession, VerifyState};

impl Machine {
    /// Start verifying a disk; returns the session id.
    pub fn start_verify(self: &Arc<Self>, disk_name: &str, repair: bool) -> Result<u64, AgentError> {
        let disk = self.disks.iter().position(|d| d.name.as_str() == disk_name).ok_or_else(|| {
            AgentError::Config(format!(
                "no disk named {disk_name:?}; this machine has {:?}",
                self.disks.iter().map(|d| &d.name).collect::<Vec<_>>()
            ))
        })?;
        {
            let c = self.lock();
            if c.mode != crate::machine::Mode::Replicating {
                return Err(AgentError::NotReplicating(format!("{:?}", c.mode)));
            }
        }
        let id = rand::random::<u64>() >> 12;
        let size = self.disks[disk].size;
        self.verify.lock().insert(
            id,
            VerifySession {
                id,
                disk: disk_name.to_owned(),
                repair,
                state: VerifyState::Running,
                error: None,
                bytes_hashed: 0,
                disk_size: size,
                blocks_compared: 0,
                block_size: VERIFY_BLOCK,
                differing_offsets: Vec::new(),
                repair_started: false,
            },
        );
        let m = self.clone();
        std::thread::spawn(move || {
            if let Err(e) = m.verify_walk(id, disk as u16) {
                if let Some(s) = m.verify.lock().get_mut(&id) {
                    s.state = VerifyState::Failed;
                    s.error = Some(e.to_string());
                }
            }
        });
        Ok(id)
    }

    /// Follow the settings' verify order: a new order (by name) starts a comparison of every
    /// disk; the same order again does nothing. The result is the status's `verify_order`.
    pub fn follow_verify_order(self: &Arc<Self>, order: Option<VerifyOrder>) {
        let Some(o) = order else { return };
        {
            let mut cur = self.verify.order();
            if cur.as_ref().is_some_and(|c| c.order == o.order) {
                return;
            }
            *cur = Some(VerifyOrderStatus {
                order: o.order.clone(),
                repair: o.repair,
                state: VerifyState::Running,
                error: None,
                block_size: VERIFY_BLOCK,
                blocks_compared: 0,
                bytes_compared: 0,
                differing: Vec::new(),
                differing_blocks: 0,
                repair_started: false,
                attempts: 0,
                bytes_hashed: 0,
            });
        }
        let m = self.clone();
        let spawned = std::thread::Builder::new().name("verify-order".into()).spawn(move || m.run_verify_order(&o));
        if let Err(e) = spawned {
            self.set_order_error(&order_name_of(self), &format!("cannot start the verify thread: {e}"));
        }
    }

    /// Run an order until it completes or a newer one replaces it; a comparison cut short (the
    /// agent left in-order replication, a result never came back) starts over.
    fn run_verify_order(self: &Arc<Self>, o: &VerifyOrder) {
        loop {
            if self.stopped.load(std::sync::atomic::Ordering::SeqCst) || order_name_of(self) != o.order {
                return;
            }
            if self.lock().mode != crate::machine::Mode::Replicating {
                std::thread::sleep(Duration::from_millis(200));
                continue;
            }
            match self.verify_order_once(o) {
                Ok(true) => return,
                Ok(false) => {}
                Err(e) => {
                    tracing::warn!(order = %o.order, error = %e, "verify order cut short; starting it again");
                    self.set_order_error(&o.order, &format!("{e} (starting again)"));
                    std::thread::sleep(Duration::from_secs(1));
                }
            }
        }
    }

    fn set_order_error(&self, order: &str, e: &str) {
        if let Some(s) = self.verify.order().as_mut().filter(|s| s.order == order) {
            s.error = Some(e.to_owned());
        }
    }

    /// One comparison of every disk; `Ok(false)` when it must start over.
    fn verify_order_once(&self, o: &VerifyOrder) -> Result<bool, AgentError> {
        if let Some(s) = self.verify.order().as_mut().filter(|s| s.order == o.order) {
            s.attempts += 1;
            s.bytes_hashed = 0;
        }
        let mut ids = Vec::new();
        let mut last_seq = 0;
        for (disk, d) in self.disks.iter().enumerate() {
            let id = rand::random::<u64>() >> 12;
            self.verify.lock().insert(
                id,
                VerifySession {
                    id,
                    disk: d.name.to_string(),
                    repair: false,
                    state: VerifyState::Running,
                    error: None,
                    bytes_hashed: 0,
                    disk_size: d.size,
                    blocks_compared: 0,
                    block_size: VERIFY_BLOCK,
                    differing_offsets: Vec::new(),
                    repair_started: false,
                },
            );
            ids.push((id, disk as u16));
            let walked = self.verify_walk(id, disk as u16);
            let forget = |ids: &[(u64, u16)]| {
                let mut s = self.verify.lock();
                for (id, _) in ids {
                    s.remove(id);
                }
            };
            match walked {
                Ok(seq) => last_seq = last_seq.max(seq),
                Err(e) => {
                    forget(&ids);
                    return Err(e);
                }
            }
        }
        // The results come back from the master target as it applies the chunks. One that is
        // lost on the way (a restarted process server) makes the round start over.
        let mut applied_since: Option<Instant> = None;
        let sessions = loop {
            let done: Option<Vec<VerifySession>> = {
                let s = self.verify.lock();
                ids.iter().map(|(id, _)| s.get(id).filter(|v| v.state == VerifyState::Complete).cloned()).collect()
            };
            if let Some(done) = done {
                break done;
            }
            let (mode, applied) = {
                let c = self.lock();
                (c.mode, c.ack.applied_seq)
            };
            let superseded = order_name_of(self) != o.order;
            if applied >= last_seq {
                applied_since.get_or_insert_with(Instant::now);
            }
            let lost = applied_since.is_some_and(|t| t.elapsed() > Duration::from_secs(30));
            if self.stopped.load(std::sync::atomic::Ordering::SeqCst)
                || superseded
                || mode != crate::machine::Mode::Replicating
                || lost
            {
                let mut s = self.verify.lock();
                for (id, _) in &ids {
                    s.remove(id);
                }
                return if superseded || self.stopped.load(std::sync::atomic::Ordering::SeqCst) {
                    Ok(true)
                } else if lost {
                    Err(AgentError::Config("the master target's verify results did not come back".into()))
                } else {
                    Ok(false)
                };
            }
            std::thread::sleep(Duration::from_millis(100));
        };
        {
            let mut s = self.verify.lock();
            for (id, _) in &ids {
                s.remove(id);
            }
        }
        // Every block's result must have come back exactly once (an event lost on the way, or
        // one repeated by a replayed journal, would make "no difference" mean nothing).
        for v in &sessions {
            let want = v.disk_size.div_ceil(VERIFY_BLOCK as u64);
            if v.blocks_compared != want {
                return Err(AgentError::Config(format!(
                    "the verify of disk {} got results for {} of its {want} blocks",
                    v.disk, v.blocks_compared
                )));
            }
        }
        let mut differing = Vec::new();
        let (mut blocks, mut total) = (0, 0);
        let mut repairs = Vec::new();
        for (v, (_, disk)) in sessions.iter().zip(&ids) {
            blocks += v.blocks_compared;
            let count = v.differing_offsets.len() as u64;
            total += count;
            if count > 0 {
                differing.push(DifferingBlocks {
                    disk: v.disk.clone(),
                    count,
                    offsets: v.differing_offsets.iter().copied().take(64).collect(),
                });
                repairs
                    .push((*disk, v.differing_offsets.iter().map(|o| (*o, VERIFY_BLOCK as u64)).collect::<Vec<_>>()));
            }
        }
        let bytes: u64 = self.disks.iter().map(|d| d.size).sum();
        if o.repair {
            for (disk, ranges) in &repairs {
                self.request_resync(*disk, ranges, ResyncReason::VerifyRepair);
            }
        }
        tracing::info!(order = %o.order, blocks, differing = total, "verify order complete");
        if let Some(s) = self.verify.order().as_mut().filter(|s| s.order == o.order) {
            s.state = VerifyState::Complete;
            s.error = None;
            s.blocks_compared = blocks;
            s.bytes_compared = bytes;
            s.differing = differing;
            s.differing_blocks = total;
            s.repair_started = o.repair && total > 0;
        }
        Ok(true)
    }

    fn verify_walk(&self, id: u64, disk: u16) -> Result<u64, AgentError> {
        let d = &self.disks[disk as usize];
        let mut last_seq = 0;
        let mut off = 0;
        while off < d.size {
            let len = VERIFY_CHUNK.min(d.size - off);
            self.wait_log_room(len / 64);
            let last = off + len >= d.size;
            last_seq = self.insert_record(|m| {
                // Read under the sequencer lock: the hashes are of the disk exactly at this
                // record's place in the stream. Holes are hashed as zeros, not read.
                let d = &m.disks[disk as usize];
                let hashes = crate::block_hash::block_hashes(d.backend.as_ref(), off, len, VERIFY_BLOCK as u64, 32)
                    .map_err(|e| AgentError::Disk { path: d.path.clone(), error: e })?;
                Ok(RecordBody::VerifyChunk { verify_id: id, disk, offset: off, block_size: VERIFY_BLOCK, hashes, last })
            })?;
            off += len;
            if let Some(s) = self.verify.lock().get_mut(&id) {
                s.bytes_hashed = off;
            }
            if let Some(s) = self.verify.order().as_mut() {
                s.bytes_hashed += len;
            }
        }
        Ok(last_seq)
    }
}

/// The order the agent follows now (empty when none).
fn order_name_of(m: &Machine) -> String {
    m.verify.order().as_ref().map(|s| s.order.clone()).unwrap_or_default()
}

impl Machine {
    /// A verify result came back from the master target.
    pub(crate) fn on_event(&self, ev: Event) {
        match ev {
            Event::VerifyResult { verify_id, disk, differing_offsets, blocks_compared, last } => {
                let mut repair = None;
                {
                    let mut sessions = self.verify.lock();
                    let Some(s) = sessions.get_mut(&verify_id) else { return };
                    s.blocks_compared += blocks_compared;
                    s.differing_offsets.extend(differing_offsets);
                    if last {
                        s.state = VerifyState::Complete;
                        if s.repair && !s.differing_offsets.is_empty() {
                            s.repair_started = true;
                            repair =
                                Some(s.differing_offsets.iter().map(|o| (*o, VERIFY_BLOCK as u64)).collect::<Vec<_>>());
                        }
                        tracing::info!(verify_id, differing = s.differing_offsets.len(), "verify complete");
                    }
                }
                if let Some(ranges) = repair {
                    self.request_resync(disk, &ranges, ResyncReason::VerifyRepair);
                }
            }
        }
    }
}
