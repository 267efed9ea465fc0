//! The agent's decisions tested against a stand-in process server that speaks the real frames
//! over an in-memory stream: the sequencer's order (what arrives, applied in arrival order,
//! rebuilds the source disks exactly) and the activity-log retirement invariant (an extent is
//! never retired while a change to it is not durable at the process server).

use std::collections::HashMap;
use std::sync::{Arc, Mutex};
use std::time::{Duration, Instant};

use ferry_protocol::{Ack, FrameCodec, HelloAck, Message, RecordBody};
use futures::{SinkExt, StreamExt};
use tokio::sync::watch;
use tokio_util::codec::Framed;
use tokio_util::sync::CancellationToken;

use crate::machine::{Machine, Mode};
use crate::AgentConfig;

const DISK: u64 = 8 << 20;

/// What the stand-in received, in arrival order.
#[derive(Default)]
struct Received {
    /// Seqs of ordered records (writes, zeroes, markers), as they arrived.
    seqs: Vec<u64>,
    /// In-memory replica of each disk: initial-sync chunks and records applied in arrival order.
    disks: HashMap<u16, Vec<u8>>,
}

struct StandIn {
    received: Arc<Mutex<Received>>,
    /// Acknowledge records as durable up to this seq (u64::MAX: everything received).
    ack_through: watch::Sender<u64>,
}

/// Serve one agent session on `stream`: answer the hello, apply what arrives, acknowledge bulk
/// chunks at once and records up to `ack_through`.
fn stand_in<S>(stream: S, disks: u16) -> StandIn
where
    S: tokio::io::AsyncRead + tokio::io::AsyncWrite + Unpin + Send + 'static,
{
    let received = Arc::new(Mutex::new(Received::default()));
    {
        let mut r = received.lock().unwrap();
        for d in 0..disks {
            r.disks.insert(d, vec![0; DISK as usize]);
        }
    }
    let (ack_through, mut ack_rx) = watch::channel(u64::MAX);
    let rec = received.clone();
    tokio::spawn(async move {
        let mut framed = Framed::new(stream, FrameCodec::default());
        match framed.next().await {
            Some(Ok(Message::Hello(_))) => {}
            other => panic!("expected a hello, got {other:?}"),
        }
        framed
            .send(Message::HelloAck(HelloAck {
                durable_seq: ferry_protocol::Seq(0),
                applied_seq: ferry_protocol::Seq(0),
            }))
            .await
            .unwrap();
        let mut highest = 0u64;
        let mut acked = 0u64;
        loop {
            let limit = *ack_rx.borrow();
            let through = highest.min(limit);
            if through > acked {
                acked = through;
                let ack = Ack {
                    durable_seq: ferry_protocol::Seq(through),
                    target_durable_seq: ferry_protocol::Seq(through),
                    applied_seq: ferry_protocol::Seq(through),
                };
                if framed.send(Message::Ack(ack)).await.is_err() {
                    return;
                }
            }
            let msg = tokio::select! {
                m = framed.next() => m,
                _ = ack_rx.changed() => continue,
            };
            let Some(Ok(msg)) = msg else { return };
            match msg {
                Message::Records(records) => {
                    let mut r = rec.lock().unwrap();
                    for record in records {
                        r.seqs.push(record.seq.get());
                        highest = highest.max(record.seq.get());
                        match record.body {
                            RecordBody::Write { disk, offset, data } => {
                                let d = r.disks.get_mut(&disk).unwrap();
                                d[offset as usize..offset as usize + data.len()].copy_from_slice(&data);
                            }
                            RecordBody::Zero { disk, offset, len } => {
                                let d = r.disks.get_mut(&disk).unwrap();
                                d[offset as usize..(offset + len) as usize].fill(0);
                            }
                            _ => {}
                        }
                    }
                }
                Message::Bulk(chunk) => {
                    {
                        let mut r = rec.lock().unwrap();
                        let d = r.disks.get_mut(&chunk.disk).unwrap();
                        let range = chunk.offset as usize..(chunk.offset + chunk.len) as usize;
                        if chunk.data.is_empty() {
                            d[range].fill(0);
                        } else {
                            d[range].copy_from_slice(&chunk.data);
                        }
                    }
                    if framed.send(Message::BulkAck { id: chunk.id }).await.is_err() {
                        return;
                    }
                }
                _ => {}
            }
        }
    });
    StandIn { received, ack_through }
}

/// A machine with `disks` sparse disks of 8 MiB in `dir`, 1 MiB activity-log extents.
fn machine(dir: &std::path::Path, disks: u16) -> Arc<Machine> {
    let mut cfg = format!(
        "machine = \"vm1\"\nstate_dir = \"{0}/state\"\nprocess_server = \"127.0.0.1:1\"\nal_extent_bytes = 1048576\nal_extents = 64\nresync_chunk_bytes = 1048576\ncrash_point_interval_secs = 0\napp_point_interval_secs = 0\n[tls]\nca = \"{0}/ca.pem\"\ncert = \"{0}/a.pem\"\nkey = \"{0}/a.key\"\n",
        dir.display()
    );
    for d in 0..disks {
        let path = dir.join(format!("d{d}.img"));
        std::fs::File::create(&path).unwrap().set_len(DISK).unwrap();
        cfg.push_str(&format!("[[disks]]\nname = \"d{d}\"\npath = \"{}\"\n", path.display()));
    }
    let config: AgentConfig = toml::from_str(&cfg).unwrap();
    Machine::open(config).unwrap()
}

/// Connect the machine to a stand-in and run its initial sync to the end.
async fn replicating(m: &Arc<Machine>, disks: u16) -> (StandIn, CancellationToken) {
    let (agent_end, ps_end) = tokio::io::duplex(1 << 20);
    let ps = stand_in(ps_end, disks);
    let stop = CancellationToken::new();
    {
        let (m, stop) = (m.clone(), stop.clone());
        tokio::spawn(async move { crate::sender::ship(&m, agent_end, &stop).await });
    }
    {
        let m = m.clone();
        std::thread::spawn(move || m.resync_loop());
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while !(m.status().mode == Mode::Replicating && m.status().caught_up) {
        assert!(Instant::now() < deadline, "the initial sync did not finish: {:?}", m.status());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    (ps, stop)
}

async fn write(m: &Arc<Machine>, disk: u16, offset: u64, data: Vec<u8>) {
    let m = m.clone();
    tokio::task::spawn_blocking(move || m.submit(disk, offset, data.len() as u64, Some(&data), false, false))
        .await
        .unwrap()
        .unwrap();
}

fn source(dir: &std::path::Path, disk: u16) -> Vec<u8> {
    std::fs::read(dir.join(format!("d{disk}.img"))).unwrap()
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn records_arrive_in_one_order_that_rebuilds_the_source_disks() {
    let dir = tempfile::tempdir().unwrap();
    let m = machine(dir.path(), 2);
    let (ps, stop) = replicating(&m, 2).await;
    let before = ps.received.lock().unwrap().seqs.len();
    // Four writers race on overlapping regions of both disks: whatever order the sequencer gave
    // them, applying the records in arrival order must end where the source disks ended.
    let mut tasks = Vec::new();
    for w in 0..4u64 {
        let m = m.clone();
        tasks.push(tokio::spawn(async move {
            for i in 0..200u64 {
                let disk = ((w + i) % 2) as u16;
                let offset = ((w * 7919 + i * 104_729) % 64) * 65_536 + (i % 3) * 4096;
                let byte = (w * 50 + i % 50) as u8 + 1;
                write(&m, disk, offset, vec![byte; 4096 * (1 + (i % 4) as usize)]).await;
            }
        }));
    }
    for t in tasks {
        t.await.unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(60);
    while !m.status().caught_up {
        assert!(Instant::now() < deadline, "not caught up: {:?}", m.status());
        tokio::time::sleep(Duration::from_millis(20)).await;
    }
    let r = ps.received.lock().unwrap();
    let seqs = &r.seqs[before..];
    assert_eq!(seqs.len(), 800, "one record per write");
    assert!(seqs.windows(2).all(|w| w[1] == w[0] + 1), "seqs arrive strictly in order, without gaps: {seqs:?}");
    for d in 0..2 {
        assert!(r.disks[&d] == source(dir.path(), d), "disk {d}: the replica differs from the source");
    }
    stop.cancel();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn an_extent_is_never_retired_while_a_change_to_it_is_not_durable_downstream() {
    let dir = tempfile::tempdir().unwrap();
    let m = machine(dir.path(), 1);
    let (ps, stop) = replicating(&m, 1).await;
    // Retire whatever the initial sync left active.
    let m2 = m.clone();
    tokio::task::spawn_blocking(move || m2.maintenance(true)).await.unwrap().unwrap();
    assert_eq!(m.status().activity_log_extents, 0, "{:?}", m.status());

    // Hold acknowledgements at what the chain has now; write to extents 0 and 5.
    let held = m.status().last_seq;
    ps.ack_through.send(held).unwrap();
    write(&m, 0, 4096, vec![7; 4096]).await;
    let first = m.status().last_seq;
    write(&m, 0, 5 << 20, vec![9; 8192]).await;
    let deadline = Instant::now() + Duration::from_secs(30);
    while m.status().sent_seq < first + 1 {
        assert!(Instant::now() < deadline, "records not shipped: {:?}", m.status());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    for _ in 0..3 {
        let m2 = m.clone();
        tokio::task::spawn_blocking(move || m2.maintenance(true)).await.unwrap().unwrap();
        assert_eq!(m.status().activity_log_extents, 2, "both extents stay active until durable downstream");
    }
    // The first write becomes durable: only its extent may go.
    ps.ack_through.send(first).unwrap();
    while m.status().process_server_durable_seq < first {
        assert!(Instant::now() < deadline, "ack not taken: {:?}", m.status());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let m2 = m.clone();
    tokio::task::spawn_blocking(move || m2.maintenance(true)).await.unwrap().unwrap();
    assert_eq!(m.status().activity_log_extents, 1, "the acknowledged extent retires, the other stays");
    // Everything durable: the activity log empties.
    ps.ack_through.send(u64::MAX).unwrap();
    while !m.status().caught_up {
        assert!(Instant::now() < deadline, "not caught up: {:?}", m.status());
        tokio::time::sleep(Duration::from_millis(10)).await;
    }
    let m2 = m.clone();
    tokio::task::spawn_blocking(move || m2.maintenance(true)).await.unwrap().unwrap();
    assert_eq!(m.status().activity_log_extents, 0);
    stop.cancel();
}

/// A failed-over machine's agent: no process server, a seed file from the master target.
fn tracking_machine(dir: &std::path::Path, seed: &ferry_api::agent::FailoverSeed) -> Arc<Machine> {
    let disk = dir.join("d0.img");
    if !disk.exists() {
        std::fs::File::create(&disk).unwrap().set_len(DISK).unwrap();
    }
    std::fs::write(dir.join("seed.json"), serde_json::to_vec(seed).unwrap()).unwrap();
    let cfg = format!(
        "machine = \"vm1.recovery\"\nstate_dir = \"{0}/state\"\nal_extent_bytes = 1048576\nal_extents = 64\ncrash_point_interval_secs = 0\napp_point_interval_secs = 0\nfailover_seed = \"{0}/seed.json\"\nrecovery_writes_file = \"{0}/writes.json\"\n[tls]\nca = \"{0}/ca.pem\"\ncert = \"{0}/a.pem\"\nkey = \"{0}/a.key\"\n[[disks]]\nname = \"d0\"\npath = \"{1}\"\n",
        dir.display(),
        disk.display()
    );
    Machine::open(toml::from_str(&cfg).unwrap()).unwrap()
}

fn extent(offset: u64, length: u64) -> ferry_api::master_target::DiskExtent {
    ferry_api::master_target::DiskExtent { disk: "d0".into(), offset, length }
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failback_point_of_another_copy_starts_a_new_lineage_and_a_change_of_point_does_not() {
    let dir = tempfile::tempdir().unwrap();
    let seed = ferry_api::agent::FailoverSeed {
        machine: "vm1".into(),
        lineage: 7,
        lineage_ancestors: Vec::new(),
        point: "vm1@100".into(),
        point_seq: 100,
        extents: vec![extent(0, 4096)],
    };
    let m = tracking_machine(dir.path(), &seed);
    write(&m, 0, 2 << 20, vec![1u8; 8192]).await;
    let own = m.lineage().id;
    m.shutdown().unwrap();
    drop(m);
    // A change of point of the same copy (the seed names its parent): its writes stay tracked.
    let changed = ferry_api::agent::FailoverSeed { point: "vm1@90".into(), point_seq: 90, ..seed.clone() };
    let m = tracking_machine(dir.path(), &changed);
    assert_eq!(m.status().disks[0].resync_pending_bytes, 4096 + 8192, "its own writes are kept");
    assert_eq!(m.lineage().id, own);
    m.shutdown().unwrap();
    drop(m);
    // Another copy's point on these disks (a failback: the reverse copy forked from this one):
    // a new lineage from it; what this copy tracked before describes another history.
    let failback = ferry_api::agent::FailoverSeed {
        lineage: own ^ 0x55,
        point: "vm1.recovery@300".into(),
        point_seq: 300,
        extents: vec![extent(6 << 20, 4096)],
        ..seed
    };
    let m = tracking_machine(dir.path(), &failback);
    let l = m.lineage();
    assert_eq!(l.parent.map(|p| (p.id, p.seq)), Some((own ^ 0x55, 300)));
    assert!(l.id != own);
    assert_eq!(m.status().disks[0].resync_pending_bytes, 4096, "only the new point's seed");
    assert_eq!(m.status().mode, Mode::Tracking);
    m.shutdown().unwrap();
}

#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_failed_over_machine_tracks_the_seed_and_every_write_and_reports_them_after_a_clean_stop() {
    let dir = tempfile::tempdir().unwrap();
    let seed = ferry_api::agent::FailoverSeed {
        machine: "vm1".into(),
        lineage: 7,
        lineage_ancestors: vec![(3, 40)],
        point: "vm1@100".into(),
        point_seq: 100,
        extents: vec![extent(0, 8192), extent(1 << 20, 4096)],
    };
    let m = tracking_machine(dir.path(), &seed);
    assert_eq!(m.status().mode, Mode::Tracking, "no process server: tracking, not an initial sync");
    assert!(m.status().initial_sync_complete, "the disks hold the point: nothing to copy in full");
    let l = m.lineage();
    assert_eq!(
        l.parent.map(|p| (p.id, p.seq)),
        Some((7, 100)),
        "a copy of its own, forked from the primary's at the point"
    );
    assert!(l.id != 0 && l.id != 7 && !l.initial_sync);
    assert_eq!(l.ancestors.iter().map(|p| (p.id, p.seq)).collect::<Vec<_>>(), vec![(3, 40)], "and its history");
    m.write_recovery_writes(&m.lock(), false).unwrap();
    let unclean: ferry_api::agent::RecoveryWrites =
        serde_json::from_slice(&std::fs::read(dir.path().join("writes.json")).unwrap()).unwrap();
    assert!(!unclean.clean, "while it runs its writes are not complete anywhere but in its state");
    write(&m, 0, 3 << 20, vec![7u8; 12288]).await;
    write(&m, 0, 4096, vec![7u8; 4096]).await;
    assert_eq!(m.status().disks[0].resync_pending_bytes, 8192 + 4096 + 12288, "seed ∪ writes, block-exact");
    m.shutdown().unwrap();
    let w: ferry_api::agent::RecoveryWrites =
        serde_json::from_slice(&std::fs::read(dir.path().join("writes.json")).unwrap()).unwrap();
    assert!(w.clean);
    assert_eq!(w.extents, vec![extent(0, 8192), extent(1 << 20, 4096), extent(3 << 20, 12288)]);
    drop(m);
    // A restart counts the same seed once; a new one (change of point) is added.
    let m = tracking_machine(dir.path(), &seed);
    assert_eq!(m.status().disks[0].resync_pending_bytes, 24576);
    m.shutdown().unwrap();
    drop(m);
    let later = ferry_api::agent::FailoverSeed { point: "vm1@90".into(), extents: vec![extent(5 << 20, 4096)], ..seed };
    let m = tracking_machine(dir.path(), &later);
    assert_eq!(m.status().disks[0].resync_pending_bytes, 24576 + 4096);
    assert_eq!(m.status().mode, Mode::Tracking);
    m.shutdown().unwrap();
    drop(m);
    // Its state lost although it ran (its report is there): everything counts as changed.
    std::fs::remove_dir_all(dir.path().join("state")).unwrap();
    let m = tracking_machine(dir.path(), &later);
    assert_eq!(m.status().disks[0].resync_pending_bytes, DISK, "what it wrote is unknown");
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn a_quiesced_machine_refuses_writes_after_its_last_seq_until_lifted() {
    let dir = tempfile::tempdir().unwrap();
    let m = machine(dir.path(), 1);
    write(&m, 0, 0, vec![1u8; 4096]).await;
    m.quiesce("job-1/quiesce");
    let q = m.status().quiesced.unwrap();
    assert_eq!(q.last_seq, m.status().last_seq, "nothing after the last write");
    assert!(!q.frozen && q.message.unwrap().contains("refused"), "no freeze hook: writes are refused instead");
    let m2 = m.clone();
    let refused =
        tokio::task::spawn_blocking(move || m2.submit(0, 4096, 4096, Some(&[2u8; 4096]), false, false)).await.unwrap();
    assert!(matches!(refused, Err(ferry_nbd::BackendError::Refused(_))), "{refused:?}");
    assert_eq!(m.status().last_seq, q.last_seq);
    assert!(m.app_point().is_err(), "no app point wakes what a failover paused");
    m.quiesce("job-1/quiesce");
    assert_eq!(m.status().quiesced.unwrap().at_ms, q.at_ms, "the same order again changes nothing");
    m.lift_quiesce();
    assert!(m.status().quiesced.is_none());
    write(&m, 0, 4096, vec![2u8; 4096]).await;
}

/// Protection disabled: the agent forgets what it had shipped (its replica is gone), ships
/// nothing, and a later protection starts with a full initial sync — even of a failed-over
/// machine's agent, whose disks held a point.
#[tokio::test(flavor = "multi_thread", worker_threads = 2)]
async fn a_disabled_agent_forgets_its_replication_state_and_a_new_protection_copies_in_full() {
    let dir = tempfile::tempdir().unwrap();
    let seed = ferry_api::agent::FailoverSeed {
        machine: "vm1".into(),
        lineage: 7,
        lineage_ancestors: Vec::new(),
        point: "vm1@100".into(),
        point_seq: 100,
        extents: vec![extent(0, 8192)],
    };
    let m = tracking_machine(dir.path(), &seed);
    assert!(m.status().initial_sync_complete);
    m.shutdown().unwrap();
    drop(m);
    let disk = dir.path().join("d0.img");
    let base = format!(
        "machine = \"vm1.recovery\"\nstate_dir = \"{0}/state\"\nal_extent_bytes = 1048576\nal_extents = 64\ncrash_point_interval_secs = 0\napp_point_interval_secs = 0\n[tls]\nca = \"{0}/ca.pem\"\ncert = \"{0}/a.pem\"\nkey = \"{0}/a.key\"\n[[disks]]\nname = \"d0\"\npath = \"{1}\"\n",
        dir.path().display(),
        disk.display()
    );
    // A seed with the flag is refused: a disabled machine has no failover to track.
    let with_seed =
        format!("protection_disabled = true\nfailover_seed = \"{}/seed.json\"\n{base}", dir.path().display());
    let e = Machine::open(toml::from_str(&with_seed).unwrap()).err().map(|e| e.to_string()).unwrap_or_default();
    assert!(e.contains("ships nothing"), "{e}");
    let disabled = format!("protection_disabled = true\n{base}");
    let m = Machine::open(toml::from_str(&disabled).unwrap()).unwrap();
    assert_eq!(m.status().mode, Mode::Disabled);
    assert!(!m.status().initial_sync_complete, "what it had shipped no longer holds anywhere");
    m.shutdown().unwrap();
    drop(m);
    let protected = format!("process_server = \"127.0.0.1:9\"\n{base}");
    let m = Machine::open(toml::from_str(&protected).unwrap()).unwrap();
    assert_eq!(m.status().mode, Mode::InitialSync, "protected again: a full copy");
    m.shutdown().unwrap();
}
