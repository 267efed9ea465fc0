use ferry_types::{DiskName, Generation, MachineName, Seq};
use serde::{Deserialize, Serialize};

/// Which Ferry component is speaking.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum Role {
    Agent,
    ProcessServer,
    MasterTarget,
}

impl std::fmt::Display for Role {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            Role::Agent => "agent",
            Role::ProcessServer => "process server",
            Role::MasterTarget => "master target",
        })
    }
}

/// One protected disk of a machine, as the replication chain knows it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct DiskDescriptor {
    /// Stable name of the disk within the machine (e.g. `disk0`); names the target disk file.
    pub name: String,
    /// Size in bytes; a protected disk is never resized (resizing needs re-protection).
    pub size: u64,
    /// Disk UUID (MT-3: disks are matched by UUID).
    pub uuid: String,
}

/// The machine whose change stream a connection carries.
///
/// The names are plain strings on the wire, checked by the receiver with [`Self::checked_names`]:
/// a postcard decode error cannot say what was wrong, and a refused name must come back as
/// BAD_NAME naming it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct MachineDescriptor {
    pub name: String,
    pub disks: Vec<DiskDescriptor>,
}

impl MachineDescriptor {
    /// The machine's name and its disks' names, each validated (safe as a folder or file name).
    pub fn checked_names(&self) -> Result<(MachineName, Vec<DiskName>), String> {
        let machine = MachineName::new(self.name.clone())?;
        let disks = self.disks.iter().map(|d| DiskName::new(d.name.clone())).collect::<Result<_, _>>()?;
        Ok((machine, disks))
    }

    /// Whether record `r` fits this machine (see [`check_record`]).
    pub fn check_record(&self, r: &Record) -> Result<(), String> {
        check_record(&self.disks, r)
    }
}

/// Whether record `r` fits a machine with `disks`: it names one of its disks, writes inside that disk
/// (no offset that wraps), and a verify chunk has a sane block size and hash list. Every hop
/// checks this before it acknowledges a record: one acknowledged record that a later hop must
/// refuse would block the machine's stream there for good.
pub fn check_record(disks: &[DiskDescriptor], r: &Record) -> Result<(), String> {
    let check = |disk: u16, offset: u64, len: u64| -> Result<(), String> {
        let d = disks
            .get(disk as usize)
            .ok_or_else(|| format!("record {} names disk {disk}, machine has {}", r.seq, disks.len()))?;
        if offset.checked_add(len).is_none_or(|end| end > d.size) {
            return Err(format!(
                "record {} writes [{offset}, +{len}) beyond disk {} of {} bytes",
                r.seq, d.name, d.size
            ));
        }
        Ok(())
    };
    match &r.body {
        RecordBody::Write { disk, offset, data } => check(*disk, *offset, data.len() as u64),
        RecordBody::Zero { disk, offset, len } => check(*disk, *offset, *len),
        RecordBody::VerifyChunk { disk, offset, block_size, hashes, .. } => {
            if !(512..=(4 << 20)).contains(block_size) || hashes.len() % 32 != 0 {
                return Err(format!(
                    "record {} has a verify block size of {block_size} or a malformed hash list",
                    r.seq
                ));
            }
            check(*disk, *offset, 0)
        }
        _ => Ok(()),
    }
}

/// Opens every connection: who speaks, for which machine.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub role: Role,
    pub machine: MachineDescriptor,
    /// The sender's replication generation (see [`RecordBody::ResyncBegin`]).
    pub generation: Generation,
    /// Which copy of the machine's disks the stream comes from (see [`Lineage`]). Absent in a
    /// process server's spool description from before lineage: unknown.
    #[serde(default)]
    pub lineage: Lineage,
}

/// The lineage of a copy of a machine's disks: an ID made when the copy starts (an agent's
/// first start, a failed-over machine's first boot), and the copy it forked from with the seq
/// it forked at. A replica takes a stream only from the copy it holds (or from one starting an
/// initial sync, which replaces its content): never from another copy with the same name.
/// ID 0: unknown (a sender that predates lineage); taken, never recorded.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Lineage {
    pub id: u64,
    pub parent: Option<LineageParent>,
    /// The parent's own ancestors, newest first (a short history: at most
    /// [`LINEAGE_HISTORY`] entries with the parent), so later cycles can tell how two copies
    /// are related.
    pub ancestors: Vec<LineageParent>,
    /// The sender is about to copy the whole disks (an initial sync): the replica's content,
    /// and its lineage, are replaced.
    pub initial_sync: bool,
}

/// How many forks a lineage remembers (parent included).
pub const LINEAGE_HISTORY: usize = 8;

#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub struct LineageParent {
    pub id: u64,
    pub seq: u64,
}

/// The receiver's answer: everything up to `durable_seq` is durable at the receiver (or beyond),
/// so the sender resumes after it.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct HelloAck {
    pub durable_seq: Seq,
    /// Sequence applied to the target disks at the master target, when known.
    pub applied_seq: Seq,
}

/// Why a resync (out-of-order shipping of regions) runs.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum ResyncReason {
    /// First copy of the disks: the target holds nothing consistent yet.
    InitialSync,
    /// The agent restarted without a clean shutdown: its activity log's regions are resent.
    AgentRecovery,
    /// The in-order log overflowed (long outage): changed regions are resent from the bitmap.
    LogOverflow,
    /// Online verify found differing blocks and the operator asked for a repair.
    VerifyRepair,
    /// A write to the source disk failed part-way: the region is copied as it now is.
    LocalWriteError,
    /// A peer's acknowledged position went backwards (its spool or journal was lost), or the
    /// agent's own tracking state was lost: everything allocated is compared and copied again.
    StateLost,
}

/// The kind of a consistency tag.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
pub enum TagKind {
    CrashConsistent,
    AppConsistent,
}

/// One entry of a machine's ordered change stream. `seq` comes from the machine's single counter,
/// strictly increasing along the stream (gaps are allowed; a gap is always followed by a resync).
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct Record {
    pub seq: Seq,
    /// Unix time in milliseconds when the agent sequenced the record (lag and recovery-point times).
    pub time_ms: u64,
    pub body: RecordBody,
}

#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum RecordBody {
    /// Bytes written to a disk (index into the machine's disk list).
    Write {
        disk: u16,
        offset: u64,
        #[serde(with = "serde_bytes")]
        data: Vec<u8>,
    },
    /// A range zeroed (WRITE_ZEROES) or discarded (TRIM: replicated as zeroing).
    Zero { disk: u16, offset: u64, len: u64 },
    /// Start of an out-of-order region copy. With `preserve_consistent`, the master target must
    /// not overwrite its last consistent state until the matching `ResyncEnd`.
    ResyncBegin { generation: Generation, reason: ResyncReason, preserve_consistent: bool },
    /// End of the resync: the target is consistent again at this record's seq.
    ResyncEnd { generation: Generation },
    /// A new generation starts (a side was promoted, or in-order shipping was abandoned).
    GenerationChange { generation: Generation },
    /// A consistency tag (a recovery-point candidate).
    Tag { id: String, kind: TagKind },
    /// Multi-machine consistency: the machine's writes are held from here until the commit (or
    /// abort) of the group tag, so this position is common to every machine of the group.
    GroupPrepare { group: String, tag: String },
    /// Every member prepared: the tag is a multi-machine point at its `GroupPrepare` position, valid
    /// once every machine in `members` has this commit in its stream.
    GroupCommit { group: String, tag: String, members: Vec<String>, kind: TagKind },
    /// Online verify: the source's block hashes at this point of the stream. The master target
    /// compares its target disk at the same point and reports differing blocks.
    VerifyChunk {
        verify_id: u64,
        disk: u16,
        offset: u64,
        block_size: u32,
        /// 32-byte blake3 hash per block, concatenated.
        #[serde(with = "serde_bytes")]
        hashes: Vec<u8>,
        last: bool,
    },
}

impl RecordBody {
    /// Payload bytes this record carries (for throughput and spool accounting).
    pub fn data_len(&self) -> u64 {
        match self {
            RecordBody::Write { data, .. } => data.len() as u64,
            RecordBody::VerifyChunk { hashes, .. } => hashes.len() as u64,
            _ => 0,
        }
    }
}

/// Acknowledgement flowing back up the chain.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize, Default)]
pub struct Ack {
    /// Durable at the hop that sends this ack.
    pub durable_seq: Seq,
    /// Durable at the master target (equals `durable_seq` when the master target sends it).
    pub target_durable_seq: Seq,
    /// Applied to the target disks at the master target.
    pub applied_seq: Seq,
}

/// A region of a disk copied during initial sync.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub struct BulkChunk {
    pub id: u64,
    pub disk: u16,
    pub offset: u64,
    pub len: u64,
    /// The bytes, or empty for an all-zero region of `len` bytes.
    #[serde(with = "serde_bytes")]
    pub data: Vec<u8>,
}

/// Something the operator should learn about, raised by a component.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Event {
    VerifyResult {
        verify_id: u64,
        disk: u16,
        /// Byte offsets of differing blocks (block size as requested).
        differing_offsets: Vec<u64>,
        blocks_compared: u64,
        last: bool,
    },
}

/// Everything that travels in a frame.
#[derive(Debug, Clone, PartialEq, Eq, Serialize, Deserialize)]
pub enum Message {
    Hello(Hello),
    HelloAck(HelloAck),
    Records(Vec<Record>),
    Ack(Ack),
    /// Initial-sync data outside the ordered stream: the process server passes it through without
    /// spooling (the source disk is the durable copy) and the master target writes it straight to
    /// the target disk. Only used while the target holds no consistent state.
    Bulk(BulkChunk),
    /// The bulk chunk is durable on the target disk.
    BulkAck {
        id: u64,
    },
    /// The process server lost its master-target link: bulk chunks in flight may be lost; resend
    /// every unacknowledged one.
    BulkReset,
    /// A hop further down lost acknowledged state (e.g. the master target's journal): what it
    /// held cannot be resent from the log, so the agent must copy its disks again.
    PeerStateLost {
        detail: String,
    },
    /// The process server's cache is low (NET-2): the sender must slow down until `active` is false.
    Throttle {
        active: bool,
        free_percent: u8,
    },
    Event(Event),
    /// A refusal; the connection is closed after it.
    Error {
        code: u32,
        message: String,
        remedy: String,
    },
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_descriptor_with_a_name_that_could_leave_a_folder_is_refused_naming_it() {
        let disk = |name: &str| DiskDescriptor { name: name.into(), size: 4096, uuid: "u".into() };
        let ok = MachineDescriptor { name: "db1".into(), disks: vec![disk("disk0")] };
        let (m, d) = ok.checked_names().unwrap();
        assert_eq!((m.as_str(), d[0].as_str()), ("db1", "disk0"));
        let bad_machine = MachineDescriptor { name: "../db1".into(), disks: vec![disk("disk0")] };
        assert!(bad_machine.checked_names().unwrap_err().contains("invalid machine name \"../db1\""));
        let bad_disk = MachineDescriptor { name: "db1".into(), disks: vec![disk("a/b")] };
        assert!(bad_disk.checked_names().unwrap_err().contains("invalid disk name \"a/b\""));
    }

    #[test]
    fn a_record_outside_the_machine_is_refused() {
        let m = MachineDescriptor {
            name: "db1".into(),
            disks: vec![DiskDescriptor { name: "disk0".into(), size: 1 << 20, uuid: "u".into() }],
        };
        let rec = |body| Record { seq: Seq(7), time_ms: 0, body };
        let write = |disk, offset: u64, n: usize| RecordBody::Write { disk, offset, data: vec![0u8; n] };
        assert!(m.check_record(&rec(write(0, 0, 4096))).is_ok());
        assert!(m.check_record(&rec(write(0, (1 << 20) - 4096, 4096))).is_ok());
        assert!(m.check_record(&rec(write(99, 0, 4096))).unwrap_err().contains("names disk 99"));
        assert!(m.check_record(&rec(write(0, 1 << 20, 1))).unwrap_err().contains("beyond disk disk0"));
        let wrap = RecordBody::Zero { disk: 0, offset: u64::MAX - 10, len: 4096 };
        assert!(m.check_record(&rec(wrap)).unwrap_err().contains("beyond disk"));
    }
}
