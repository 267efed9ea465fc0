//! Making the failed-over disks at a point: a 4 GiB disk, ≥ 2 GiB of journal between the base
//! and the point, 1 % of the disk written after it; the failover's restore against `cp` of the
//! disk in the same run, then again with the journal doubled (the restore should not change).
//!
//!     cargo bench -p ferry-master-target --bench failover_at_point [-- --dir DIR]
//!
//! Runs a replica in-process (journal, applier, base: no network), on DIR (default: the
//! system temp folder). Each timing starts with the page cache dropped (when run as root).
//! Needs about 3 × 4 GiB + the journals of free space.

use std::fs::OpenOptions;
use std::path::Path;
use std::process::Command;
use std::sync::Arc;
use std::time::{Duration, Instant};

use ferry_master_target::{MasterTargetConfig, Replica};
use ferry_nbd::Exports;
use ferry_protocol::{
    DiskDescriptor, Generation, MachineDescriptor, MachineName, Record, RecordBody, ResyncReason, Seq, TagKind,
};
use tokio_util::sync::CancellationToken;

type Fallible<T> = Result<T, Box<dyn std::error::Error>>;

const DISK: u64 = 4 << 30;
const WRITE: u64 = 1 << 20;

fn replica(dir: &Path) -> Fallible<(Arc<Replica>, CancellationToken)> {
    let config: MasterTargetConfig = serde_json::from_value(serde_json::json!({
        "datastore": dir.join("ds"),
        "retention": dir.join("ret"),
        "listen": "127.0.0.1:0",
        "tls": { "ca": "ca.pem", "cert": "mt.pem", "key": "mt.key" },
    }))?;
    std::fs::create_dir_all(dir.join("ds"))?;
    std::fs::create_dir_all(dir.join("ret"))?;
    let machine = MachineDescriptor {
        name: "vm1".into(),
        disks: vec![DiskDescriptor { name: "disk0".into(), size: DISK, uuid: "u0".into() }],
    };
    let shutdown = CancellationToken::new();
    let r = Replica::create(&config, &MachineName::new("vm1")?, &machine, Exports::new(), shutdown.clone())?;
    Ok((r, shutdown))
}

struct Run {
    journal_gib: u64,
    restore_s: f64,
    restored_bytes: u64,
    cp_s: f64,
}

async fn one(dir: &Path, journal_gib: u64) -> Fallible<Run> {
    let _ = std::fs::remove_dir_all(dir);
    std::fs::create_dir_all(dir)?;
    let (r, shutdown) = replica(dir)?;
    let seq = std::cell::Cell::new(0u64);
    let next = |body| {
        seq.set(seq.get() + 1);
        Record { seq: Seq(seq.get()), time_ms: seq.get(), body }
    };
    r.journal_records(vec![
        next(RecordBody::ResyncBegin {
            generation: Generation(1),
            reason: ResyncReason::InitialSync,
            preserve_consistent: false,
        }),
        next(RecordBody::ResyncEnd { generation: Generation(1) }),
    ])?;
    // The journal between the base and P: 1 MiB writes sweeping the disk (and again when the
    // journal is larger than the disk), with a crash point every 256 MiB.
    let mut x: u64 = 7;
    let mut batch = Vec::new();
    let writes = (journal_gib << 30) / WRITE;
    for i in 0..writes {
        let offset = (i * WRITE) % DISK;
        batch.push(next(RecordBody::Write { disk: 0, offset, data: vec![(i % 251) as u8 + 1; WRITE as usize] }));
        if i % 256 == 255 {
            batch.push(next(RecordBody::Tag { id: format!("t{i}"), kind: TagKind::CrashConsistent }));
        }
        if batch.len() >= 32 {
            r.journal_records(std::mem::take(&mut batch))?;
        }
    }
    batch.push(next(RecordBody::Tag { id: "P".into(), kind: TagKind::CrashConsistent }));
    let p_seq = seq.get();
    // 1 % of the disk after P: 64 KiB writes at random places of the first 2 GiB (which every
    // run's journal covers, so each restores the same kind of content: journal bytes).
    for _ in 0..(DISK / 100) / (64 << 10) {
        x = x.wrapping_mul(6364136223846793005).wrapping_add(1442695040888963407);
        let offset = ((x >> 20) % ((2 << 30) / (64 << 10))) * (64 << 10);
        batch.push(next(RecordBody::Write { disk: 0, offset, data: vec![0xab; 64 << 10] }));
        if batch.len() >= 256 {
            r.journal_records(std::mem::take(&mut batch))?;
        }
    }
    let head = seq.get();
    r.journal_records(batch)?;
    let mut applied = r.applied_watch();
    tokio::time::timeout(Duration::from_secs(3600), applied.wait_for(|s| *s >= head)).await??;
    let target = r.status().disks[0].target.clone();
    let point = r.local_points().0.into_iter().find(|p| p.seq == p_seq).ok_or("point P is not listed")?;
    let fenced = tokio::task::block_in_place(|| r.fence_for_failover("bench"))?;
    if fenced != head {
        return Err(format!("handed over at seq {fenced}, not at the head {head}").into());
    }
    sync();
    let t = Instant::now();
    let f = tokio::task::block_in_place(|| r.failover_to(point, Vec::new(), None))?;
    let restore_s = t.elapsed().as_secs_f64();
    // The peer: a copy of the disk, made durable.
    let copy = dir.join("copy.img");
    sync();
    let t = Instant::now();
    let ok = Command::new("cp").arg(&target).arg(&copy).status()?.success();
    let out = OpenOptions::new().write(true).open(&copy)?;
    out.sync_all()?;
    let cp_s = t.elapsed().as_secs_f64();
    if !ok {
        return Err("cp failed".into());
    }
    shutdown.cancel();
    drop(r);
    let _ = std::fs::remove_dir_all(dir);
    Ok(Run { journal_gib, restore_s, restored_bytes: f.restored_bytes, cp_s })
}

/// Flush, and drop the page cache when allowed (root), so that each measurement starts cold
/// and the two journal sizes compare alike.
fn sync() {
    let _ = Command::new("sync").status();
    let _ = std::fs::write("/proc/sys/vm/drop_caches", "3\n");
}

#[tokio::main(flavor = "multi_thread")]
async fn main() -> Fallible<()> {
    let args: Vec<String> = std::env::args().collect();
    let base = args
        .iter()
        .position(|a| a == "--dir")
        .and_then(|i| args.get(i + 1))
        .map(std::path::PathBuf::from)
        .unwrap_or_else(std::env::temp_dir)
        .join(format!("ferry-bench-failover-{}", std::process::id()));
    let rounds: usize = args
        .iter()
        .position(|a| a == "--rounds")
        .and_then(|i| args.get(i + 1))
        .and_then(|n| n.parse().ok())
        .unwrap_or(3)
        .max(1);
    let mut all: Vec<Vec<Run>> = vec![Vec::new(), Vec::new()];
    // Alternating, so drift of the shared machine hits both sizes alike.
    for _ in 0..rounds {
        for (k, gib) in [2, 4].into_iter().enumerate() {
            let r = one(&base, gib).await.map_err(|e| format!("the {gib} GiB run failed: {e}"))?;
            eprintln!(
                "journal {} GiB: restore {:.3} s ({} MiB put back), cp {:.3} s, ratio {:.3}",
                r.journal_gib,
                r.restore_s,
                r.restored_bytes >> 20,
                r.cp_s,
                r.restore_s / r.cp_s
            );
            all[k].push(r);
        }
    }
    let median = |v: &mut Vec<f64>| {
        v.sort_by(f64::total_cmp);
        v[v.len() / 2]
    };
    let runs: Vec<Run> = all
        .iter()
        .map(|rs| Run {
            journal_gib: rs[0].journal_gib,
            restore_s: median(&mut rs.iter().map(|r| r.restore_s).collect()),
            restored_bytes: rs[0].restored_bytes,
            cp_s: median(&mut rs.iter().map(|r| r.cp_s).collect()),
        })
        .collect();
    println!("medians of {rounds} rounds");
    println!("| journal between base and P | failover restore | `cp` + fsync of the 4 GiB disk | ratio |");
    println!("|---|---|---|---|");
    for r in &runs {
        println!("| {} GiB | {:.3} s | {:.3} s | {:.3}× |", r.journal_gib, r.restore_s, r.cp_s, r.restore_s / r.cp_s);
    }
    println!("restore with the journal doubled: {:.2}× the first", runs[1].restore_s / runs[0].restore_s);
    Ok(())
}
