//! One machine's durable spool at the process server.

use std::path::PathBuf;
use std::sync::{Arc, Mutex, MutexGuard};

use ferry_journal::{Cursor, SegmentLog};
use ferry_protocol::{now_ms, Ack, Hello, MachineName, Message, Record};
use ferry_status::RateMeter;
use tokio::sync::{broadcast, mpsc, Notify};

use crate::{ProcessServerConfig, ProcessServerError};

#[derive(Default)]
struct SpoolState {
    target_durable: u64,
    applied: u64,
    forwarded: u64,
    /// Open agent connections (an old one may end after its replacement started).
    agent_connections: u32,
    downstream_connected: bool,
    downstream_error: Option<String>,
    throttled: bool,
    rate_in: RateMeter,
    rate_out: RateMeter,
    /// (seq, agent time) of the newest record received, for lag.
    newest: (u64, u64),
    /// Agent time of the newest record the master target applied.
    applied_time_ms: u64,
}

pub use ferry_api::process_server::SpoolStatus;

pub struct MachineSpool {
    name: String,
    dir: PathBuf,
    log: Mutex<SegmentLog>,
    descriptor: Mutex<Option<Hello>>,
    state: Mutex<SpoolState>,
    data: Notify,
    upstream: broadcast::Sender<Message>,
    /// Initial-sync chunks passing through to the master target (not spooled).
    bulk_tx: mpsc::Sender<(u64, Message)>,
    bulk_rx: Mutex<Option<mpsc::Receiver<(u64, Message)>>>,
    /// Bumped by every agent connection: bulk chunks of a superseded connection are dropped, so
    /// an old copy of a region can never reach the master target after its newer resend.
    agent_epoch: std::sync::atomic::AtomicU64,
    /// Spool size, readable without the log lock (which is held across fsyncs).
    bytes: std::sync::atomic::AtomicU64,
    /// Cancelled when the machine's protection was disabled: its forwarding and agent
    /// connection end, and its folder is deleted.
    pub(crate) closed: tokio_util::sync::CancellationToken,
}

impl MachineSpool {
    pub(crate) fn open(
        config: &ProcessServerConfig,
        name: &MachineName,
        hello: Option<&Hello>,
    ) -> Result<Arc<Self>, ProcessServerError> {
        let dir = config.cache_dir.join(name);
        ferry_sys::fs::private_dir(&dir).map_err(|source| ProcessServerError::Io { path: dir.clone(), source })?;
        let descriptor = match hello {
            Some(h) => Some(h.clone()),
            None => {
                let p = dir.join("machine.json");
                std::fs::read(&p).ok().and_then(|d| serde_json::from_slice::<HelloFile>(&d).ok()).map(|f| f.0)
            }
        };
        let log = SegmentLog::open(&dir.join("spool"), config.segment_bytes)?;
        let (upstream, _) = broadcast::channel(1024);
        let (bulk_tx, bulk_rx) = mpsc::channel(32);
        let s = Arc::new(MachineSpool {
            name: name.to_string(),
            dir,
            log: Mutex::new(log),
            descriptor: Mutex::new(None),
            state: Mutex::new(SpoolState::default()),
            data: Notify::new(),
            upstream,
            bulk_tx,
            bulk_rx: Mutex::new(Some(bulk_rx)),
            bytes: std::sync::atomic::AtomicU64::new(0),
            agent_epoch: std::sync::atomic::AtomicU64::new(0),
            closed: tokio_util::sync::CancellationToken::new(),
        });
        s.bytes.store(s.lock_log().bytes(), std::sync::atomic::Ordering::Relaxed);
        if let Some(h) = descriptor {
            s.set_descriptor(&h)?;
        }
        Ok(s)
    }

    pub fn name(&self) -> &str {
        &self.name
    }

    pub(crate) fn dir(&self) -> &std::path::Path {
        &self.dir
    }

    fn lock_log(&self) -> MutexGuard<'_, SegmentLog> {
        self.log.lock().unwrap_or_else(|p| p.into_inner())
    }

    fn lock_state(&self) -> MutexGuard<'_, SpoolState> {
        self.state.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn set_descriptor(&self, hello: &Hello) -> Result<(), ProcessServerError> {
        let mut d = self.descriptor.lock().unwrap_or_else(|p| p.into_inner());
        if d.as_ref() != Some(hello) {
            let data = serde_json::to_vec_pretty(&HelloFile(hello.clone()))
                .map_err(|e| ProcessServerError::Config(e.to_string()))?;
            ferry_sys::fs::write_atomic(&self.dir.join("machine.json"), &data)
                .map_err(crate::io_at(&self.dir.join("machine.json")))?;
            *d = Some(hello.clone());
        }
        drop(d);
        self.data.notify_one();
        Ok(())
    }

    pub(crate) fn descriptor(&self) -> Option<Hello> {
        self.descriptor.lock().unwrap_or_else(|p| p.into_inner()).clone()
    }

    pub fn bytes(&self) -> u64 {
        self.bytes.load(std::sync::atomic::Ordering::Relaxed)
    }

    /// (durable here or beyond, applied at the master target)
    pub(crate) fn positions(&self) -> (u64, u64) {
        let synced = self.lock_log().synced_seq();
        let st = self.lock_state();
        (synced.max(st.target_durable), st.applied)
    }

    /// The acknowledgement of everything known now, the master target's confirmation included
    /// (the agent retires its activity log on it; sent when it may have missed one).
    pub(crate) fn current_ack(&self) -> Ack {
        let synced = self.lock_log().synced_seq();
        let st = self.lock_state();
        Ack {
            durable_seq: ferry_protocol::Seq(synced.max(st.target_durable)),
            target_durable_seq: ferry_protocol::Seq(st.target_durable),
            applied_seq: ferry_protocol::Seq(st.applied),
        }
    }

    /// Spool batches from the agent and fsync once; returns the ack to send.
    pub(crate) fn append(&self, batches: Vec<Vec<Record>>) -> Result<Ack, ProcessServerError> {
        let mut log = self.lock_log();
        let mut bytes = 0;
        let mut newest = None;
        for r in batches.iter().flatten() {
            if r.seq <= log.last_seq() {
                continue; // a resend of something already spooled
            }
            log.append(r)?;
            bytes += r.body.data_len();
            newest = Some((r.seq.get(), r.time_ms));
        }
        log.sync()?;
        ferry_sys::fail::fail_point("process-server.spool.fsync-before-ack");
        let synced = log.synced_seq();
        self.bytes.store(log.bytes(), std::sync::atomic::Ordering::Relaxed);
        drop(log);
        self.data.notify_one();
        let mut st = self.lock_state();
        st.rate_in.add(bytes);
        if let Some(n) = newest {
            st.newest = n;
        }
        Ok(Ack {
            durable_seq: ferry_protocol::Seq(synced.max(st.target_durable)),
            target_durable_seq: ferry_protocol::Seq(st.target_durable),
            applied_seq: ferry_protocol::Seq(st.applied),
        })
    }

    /// A new agent connection: returns its epoch.
    pub(crate) fn new_agent_epoch(&self) -> u64 {
        self.agent_epoch.fetch_add(1, std::sync::atomic::Ordering::SeqCst) + 1
    }

    pub(crate) fn is_current_agent(&self, epoch: u64) -> bool {
        self.agent_epoch.load(std::sync::atomic::Ordering::SeqCst) == epoch
    }

    /// Pass an initial-sync chunk to the forwarder (waits while 32 chunks are queued). Chunks of
    /// a superseded agent connection are dropped (the agent resent them).
    pub(crate) async fn pass_bulk(&self, epoch: u64, m: Message, bytes: u64) -> Result<(), String> {
        if !self.is_current_agent(epoch) {
            return Ok(());
        }
        self.lock_state().rate_in.add(bytes);
        self.bulk_tx.send((epoch, m)).await.map_err(|_| "bulk forwarder stopped".to_owned())
    }

    pub(crate) fn take_bulk_rx(&self) -> Option<mpsc::Receiver<(u64, Message)>> {
        self.bulk_rx.lock().unwrap_or_else(|p| p.into_inner()).take()
    }

    pub(crate) fn released_seq(&self) -> u64 {
        self.lock_log().released_seq()
    }

    /// Remember (durably) that the master target lost records this spool already released, until
    /// an agent has been told.
    pub(crate) fn mark_downstream_lost(&self, detail: &str) -> Result<(), ProcessServerError> {
        ferry_sys::fs::write_atomic(&self.dir.join("downstream-lost"), detail.as_bytes())
            .map_err(crate::io_at(&self.dir.join("downstream-lost")))?;
        self.relay_upstream(Message::PeerStateLost { detail: detail.to_owned() });
        Ok(())
    }

    /// A pending loss notice for the agent, if any.
    pub(crate) fn downstream_lost(&self) -> Option<String> {
        std::fs::read_to_string(self.dir.join("downstream-lost")).ok()
    }

    pub(crate) fn clear_downstream_lost(&self) {
        let _ = std::fs::remove_file(self.dir.join("downstream-lost"));
    }

    pub(crate) fn read(&self, cursor: &mut Cursor, max_bytes: usize) -> Result<Vec<Record>, ProcessServerError> {
        Ok(self.lock_log().read(cursor, max_bytes)?)
    }

    pub(crate) async fn wait_data(&self) {
        self.data.notified().await
    }

    pub(crate) fn forwarded(&self, seq: u64, bytes: u64) {
        let mut st = self.lock_state();
        st.forwarded = st.forwarded.max(seq);
        st.rate_out.add(bytes);
    }

    /// The master target made records durable (and applied some): release the spool, tell the agent.
    pub(crate) fn downstream_acked(
        &self,
        durable: u64,
        target_durable: u64,
        applied: u64,
    ) -> Result<(), ProcessServerError> {
        let synced = {
            let mut log = self.lock_log();
            log.release_through(durable)?;
            self.bytes.store(log.bytes(), std::sync::atomic::Ordering::Relaxed);
            log.synced_seq()
        };
        let ack = {
            let mut st = self.lock_state();
            st.target_durable = st.target_durable.max(target_durable);
            if applied > st.applied {
                st.applied = applied;
                if applied >= st.newest.0 {
                    st.applied_time_ms = st.newest.1;
                }
            }
            Ack {
                durable_seq: ferry_protocol::Seq(synced.max(st.target_durable)),
                target_durable_seq: ferry_protocol::Seq(st.target_durable),
                applied_seq: ferry_protocol::Seq(st.applied),
            }
        };
        let _ = self.upstream.send(Message::Ack(ack));
        Ok(())
    }

    pub(crate) fn relay_upstream(&self, m: Message) {
        let _ = self.upstream.send(m);
    }

    pub(crate) fn subscribe_upstream(&self) -> broadcast::Receiver<Message> {
        self.upstream.subscribe()
    }

    pub(crate) fn set_agent_connected(&self, v: bool) {
        let mut st = self.lock_state();
        if v {
            st.agent_connections += 1;
        } else {
            st.agent_connections = st.agent_connections.saturating_sub(1);
        }
    }

    pub(crate) fn downstream_connected(&self) -> bool {
        self.lock_state().downstream_connected
    }

    pub(crate) fn set_downstream(&self, connected: bool, error: Option<String>) {
        let mut st = self.lock_state();
        st.downstream_connected = connected;
        st.downstream_error = error;
    }

    pub(crate) fn set_throttled(&self, v: bool) {
        self.lock_state().throttled = v;
    }

    pub fn status(&self) -> SpoolStatus {
        let (spooled, bytes) = {
            let log = self.lock_log();
            (log.synced_seq(), log.bytes())
        };
        let mut st = self.lock_state();
        let lag = if st.applied >= st.newest.0 {
            0.0
        } else {
            now_ms().saturating_sub(st.newest.1.min(now_ms())) as f64 / 1000.0
        };
        SpoolStatus {
            machine: self.name.clone(),
            agent_connected: st.agent_connections > 0,
            master_target_connected: st.downstream_connected,
            master_target_error: st.downstream_error.clone(),
            spooled_seq: spooled,
            forwarded_seq: st.forwarded,
            target_durable_seq: st.target_durable,
            applied_seq: st.applied,
            spool_bytes: bytes,
            throttled: st.throttled,
            receive_bytes_per_sec: st.rate_in.bytes_per_sec(),
            forward_bytes_per_sec: st.rate_out.bytes_per_sec(),
            lag_seconds: lag,
        }
    }
}

/// The machine description as persisted in the spool folder.
#[derive(serde::Serialize, serde::Deserialize)]
struct HelloFile(Hello);

#[cfg(test)]
mod tests {
    //! The spool's durability rules, on real files: acknowledged ⇒ fsync'd here; a resend is not
    //! spooled twice; released ⇒ gone only after the master target made it durable; a torn tail
    //! (a crash mid-append) is cut at open without losing what was acknowledged.
    use super::*;
    use ferry_protocol::RecordBody;

    fn vm1() -> MachineName {
        MachineName::new("vm1").unwrap()
    }

    fn config(dir: &std::path::Path) -> ProcessServerConfig {
        serde_json::from_value(serde_json::json!({
            "cache_dir": dir,
            "cache_capacity_bytes": 1u64 << 30,
            "listen": "127.0.0.1:0",
            "master_target": "127.0.0.1:1",
            "segment_bytes": 65536,
            "tls": {"ca": dir.join("ca.pem"), "cert": dir.join("c.pem"), "key": dir.join("c.key")},
        }))
        .unwrap()
    }

    fn write(seq: u64) -> Record {
        Record {
            seq: ferry_protocol::Seq(seq),
            time_ms: 1000 + seq,
            body: RecordBody::Write { disk: 0, offset: seq * 4096, data: vec![seq as u8; 4096] },
        }
    }

    fn all(s: &MachineSpool, after: u64) -> Vec<u64> {
        let mut cursor = Cursor::after(after);
        let mut seqs = Vec::new();
        loop {
            let got = s.read(&mut cursor, 1 << 20).unwrap();
            if got.is_empty() {
                return seqs;
            }
            seqs.extend(got.iter().map(|r| r.seq.get()));
        }
    }

    #[test]
    fn an_ack_covers_exactly_what_is_spooled_and_resends_are_not_spooled_twice() {
        let d = tempfile::tempdir().unwrap();
        let s = MachineSpool::open(&config(d.path()), &vm1(), None).unwrap();
        let ack = s.append(vec![(1..=5).map(write).collect()]).unwrap();
        assert_eq!(ack.durable_seq, 5);
        // The agent resends 3..=7 after a reconnect: 3..=5 are already here.
        let ack = s.append(vec![(3..=7).map(write).collect()]).unwrap();
        assert_eq!(ack.durable_seq, 7);
        assert_eq!(all(&s, 0), (1..=7).collect::<Vec<_>>());
    }

    #[test]
    fn acknowledged_records_survive_a_reopen_and_leave_only_when_the_master_target_has_them() {
        let d = tempfile::tempdir().unwrap();
        let cfg = config(d.path());
        {
            let s = MachineSpool::open(&cfg, &vm1(), None).unwrap();
            // Enough to span several 64 KiB segments.
            s.append(vec![(1..=40).map(write).collect()]).unwrap();
        }
        let s = MachineSpool::open(&cfg, &vm1(), None).unwrap();
        assert_eq!(all(&s, 0), (1..=40).collect::<Vec<_>>(), "everything acknowledged is still spooled");
        let before = s.bytes();
        s.downstream_acked(30, 30, 20).unwrap();
        assert!(s.released_seq() <= 30);
        assert!(s.bytes() < before, "released segments free the cache");
        assert_eq!(all(&s, 30), (31..=40).collect::<Vec<_>>());
        assert_eq!(s.positions(), (40, 20));
    }

    #[test]
    fn a_torn_tail_is_cut_at_open_and_acknowledged_records_stay() {
        let d = tempfile::tempdir().unwrap();
        let cfg = config(d.path());
        {
            let s = MachineSpool::open(&cfg, &vm1(), None).unwrap();
            s.append(vec![(1..=3).map(write).collect()]).unwrap();
        }
        // A crash in the middle of the next append: half a record's bytes at the end of the
        // newest segment.
        let spool = d.path().join("vm1").join("spool");
        let newest = std::fs::read_dir(&spool).unwrap().flatten().map(|e| e.path()).max().unwrap();
        let mut f = std::fs::OpenOptions::new().append(true).open(&newest).unwrap();
        std::io::Write::write_all(&mut f, &[0x5a; 1500]).unwrap();
        drop(f);
        let s = MachineSpool::open(&cfg, &vm1(), None).unwrap();
        assert_eq!(all(&s, 0), vec![1, 2, 3]);
        let ack = s.append(vec![vec![write(4)]]).unwrap();
        assert_eq!(ack.durable_seq, 4, "appending continues after the cut");
        assert_eq!(all(&s, 0), vec![1, 2, 3, 4]);
    }
}
