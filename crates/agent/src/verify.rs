//! Online verify (like `drbdadm verify`): compare block hashes of source and target at the same
//! point of the change stream, without stopping replication; optionally resync what differs.

use std::sync::Arc;

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

    fn verify_walk(&self, id: u64, disk: u16) -> Result<(), AgentError> {
        let d = &self.disks[disk as usize];
        let mut off = 0;
        let mut buf = Vec::new();
        while off < d.size {
            let len = VERIFY_CHUNK.min(d.size - off);
            self.wait_log_room(len / 64);
            let last = off + len >= d.size;
            self.insert_record(|m| {
                buf.resize(len as usize, 0);
                let d = &m.disks[disk as usize];
                d.backend
                    .read(off, &mut buf)
                    .map_err(|e| AgentError::Disk { path: d.path.clone(), error: e.to_string() })?;
                let mut hashes = Vec::with_capacity((len / VERIFY_BLOCK as u64 + 1) as usize * 32);
                for block in buf.chunks(VERIFY_BLOCK as usize) {
                    hashes.extend_from_slice(blake3::hash(block).as_bytes());
                }
                Ok(RecordBody::VerifyChunk { verify_id: id, disk, offset: off, block_size: VERIFY_BLOCK, hashes, last })
            })?;
            off += len;
            if let Some(s) = self.verify.lock().get_mut(&id) {
                s.bytes_hashed = off;
            }
        }
        Ok(())
    }

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
