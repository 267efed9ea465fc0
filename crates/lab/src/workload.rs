//! `ferry lab workload` and `ferry lab verify`: verifiable writes through a machine's NBD exports,
//! and the check that disks hold a consistent prefix of them.
//!
//! Every 4 KiB block a record writes carries a header (magic, record seq, disk, block index,
//! record length, offset) and a payload derived from (seed, seq, block), sealed by a CRC-32C. The
//! workload appends each record to its log *before* writing it, so the log is a superset, in order,
//! of what any disk can hold. A disk state is a consistent prefix when one N exists such that every
//! block equals what the records with seq ≤ N wrote last (or its initial content if none did).

use std::collections::HashMap;
use std::io::{BufRead, Write};
use std::path::{Path, PathBuf};
use std::time::{Duration, Instant};

use anyhow::{bail, Context, Result};
use rand::{Rng, SeedableRng};

pub const BLOCK: usize = 4096;
const MAGIC: &[u8; 8] = b"FRYLAB01";

/// One record of the log: `seq disk offset blocks`.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct LabRecord {
    pub seq: u64,
    pub disk: u32,
    pub offset: u64,
    pub blocks: u32,
}

fn fill_block(buf: &mut [u8], seed: u64, r: &LabRecord, i: u32) {
    buf[..8].copy_from_slice(MAGIC);
    buf[8..16].copy_from_slice(&r.seq.to_le_bytes());
    buf[16..20].copy_from_slice(&r.disk.to_le_bytes());
    buf[20..24].copy_from_slice(&i.to_le_bytes());
    buf[24..28].copy_from_slice(&r.blocks.to_le_bytes());
    buf[28..36].copy_from_slice(&r.offset.to_le_bytes());
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed ^ r.seq.wrapping_mul(0x9E37_79B9_7F4A_7C15) ^ u64::from(i));
    rng.fill(&mut buf[40..]);
    let crc = crc32c::crc32c(&buf[..36]) ^ crc32c::crc32c(&buf[40..]);
    buf[36..40].copy_from_slice(&crc.to_le_bytes());
}

/// What a block holds: Some((seq, block index)) for an intact record block, None otherwise.
fn parse_block(buf: &[u8]) -> Option<(u64, u32, u32)> {
    if &buf[..8] != MAGIC {
        return None;
    }
    let crc = u32::from_le_bytes(buf[36..40].try_into().ok()?);
    if crc32c::crc32c(&buf[..36]) ^ crc32c::crc32c(&buf[40..]) != crc {
        return None;
    }
    let seq = u64::from_le_bytes(buf[8..16].try_into().ok()?);
    let disk = u32::from_le_bytes(buf[16..20].try_into().ok()?);
    let idx = u32::from_le_bytes(buf[20..24].try_into().ok()?);
    Some((seq, disk, idx))
}

pub struct WorkloadArgs {
    /// NBD exports, one per disk: `host:port/export`.
    pub disks: Vec<String>,
    pub log: PathBuf,
    pub seed: u64,
    /// Records per second (0 = as fast as possible).
    pub rate: f64,
    pub records: Option<u64>,
    pub duration: Option<Duration>,
    pub max_blocks: u32,
    /// While this file exists the workload flushes every disk, writes `<file>.paused` with the last
    /// seq written, and waits (an app-consistency freeze hook creates the file, the thaw removes it).
    pub pause_file: Option<PathBuf>,
    /// The first record's seq when the log is empty (a fork of another machine's log).
    pub first_seq: Option<u64>,
}

/// Write verifiable records; returns the last seq written.
pub fn workload(a: &WorkloadArgs) -> Result<u64> {
    let mut clients = Vec::new();
    let mut sizes = Vec::new();
    for d in &a.disks {
        let c = ferry_nbd::NbdClient::connect_spec(d).with_context(|| format!("cannot open NBD export {d}"))?;
        if c.read_only() {
            bail!("NBD export {d} is read-only");
        }
        sizes.push(c.size() / BLOCK as u64);
        clients.push(c);
    }
    if clients.is_empty() {
        bail!("give at least one --disk HOST:PORT/EXPORT or unix:SOCKET:EXPORT");
    }
    // Continue after an earlier run's log (same --seed): cut a torn last line, and write the last
    // logged record again — it may have been logged but never written when that run was killed.
    let previous = if a.log.exists() {
        truncate_to_last_line(&a.log)?;
        read_log(&a.log)?
    } else {
        Vec::new()
    };
    let mut seq = previous.last().map(|r| r.seq).unwrap_or(a.first_seq.unwrap_or(1).saturating_sub(1));
    let mut buf = Vec::new();
    if let Some(r) = previous.last() {
        let c = clients.get_mut(r.disk as usize).with_context(|| {
            format!("the log's record {} is on disk {}, but only {} disks were given", r.seq, r.disk, a.disks.len())
        })?;
        buf.resize(r.blocks as usize * BLOCK, 0);
        for i in 0..r.blocks {
            fill_block(&mut buf[i as usize * BLOCK..(i as usize + 1) * BLOCK], a.seed, r, i);
        }
        c.write(r.offset, &buf).with_context(|| format!("rewriting record {}", r.seq))?;
    }
    let mut log = std::fs::OpenOptions::new()
        .create(true)
        .append(true)
        .open(&a.log)
        .with_context(|| format!("cannot open {}", a.log.display()))?;
    let mut rng = rand::rngs::StdRng::seed_from_u64(a.seed ^ seq);
    let start = Instant::now();
    let mut written = 0u64;
    loop {
        if a.records.is_some_and(|n| written >= n) || a.duration.is_some_and(|d| start.elapsed() >= d) {
            break;
        }
        if let Some(p) = &a.pause_file {
            if p.exists() {
                for c in &mut clients {
                    c.flush().context("flush before pausing")?;
                }
                let marker = p.with_extension("paused");
                std::fs::write(&marker, seq.to_string())
                    .with_context(|| format!("cannot write {}", marker.display()))?;
                while p.exists() {
                    std::thread::sleep(Duration::from_millis(5));
                }
                // Gone before writing resumes: a freeze never reads a stale seq.
                let _ = std::fs::remove_file(&marker);
            }
        }
        let disk = rng.gen_range(0..clients.len());
        let blocks = rng.gen_range(1..=a.max_blocks.max(1)).min(sizes[disk].max(1) as u32);
        let first = rng.gen_range(0..=sizes[disk].saturating_sub(u64::from(blocks)));
        seq += 1;
        let r = LabRecord { seq, disk: disk as u32, offset: first * BLOCK as u64, blocks };
        // Logged (and flushed to the file) before it is written: the log covers every disk state.
        // One write per line: a kill leaves a whole line or a torn last one, never a glued one.
        log.write_all(format!("{} {} {} {}\n", r.seq, r.disk, r.offset, r.blocks).as_bytes())
            .context("cannot append to the workload log")?;
        buf.resize(blocks as usize * BLOCK, 0);
        for i in 0..blocks {
            fill_block(&mut buf[i as usize * BLOCK..(i as usize + 1) * BLOCK], a.seed, &r, i);
        }
        clients[disk].write(r.offset, &buf).with_context(|| format!("write of record {seq} failed"))?;
        written += 1;
        if a.rate > 0.0 {
            let due = start + Duration::from_secs_f64(written as f64 / a.rate);
            if let Some(wait) = due.checked_duration_since(Instant::now()) {
                std::thread::sleep(wait);
            }
        }
    }
    for c in &mut clients {
        c.flush()?;
    }
    log.sync_all()?;
    Ok(seq)
}

/// Cut a torn last line (a killed workload) so the next append starts on a line of its own.
fn truncate_to_last_line(path: &Path) -> Result<()> {
    let data = std::fs::read(path).with_context(|| format!("cannot read {}", path.display()))?;
    let keep = data.iter().rposition(|b| *b == b'\n').map(|i| i + 1).unwrap_or(0);
    if keep < data.len() {
        std::fs::OpenOptions::new().write(true).open(path)?.set_len(keep as u64)?;
    }
    Ok(())
}

pub fn read_log(path: &Path) -> Result<Vec<LabRecord>> {
    let f = std::fs::File::open(path).with_context(|| format!("cannot read the workload log {}", path.display()))?;
    let lines: Vec<String> = std::io::BufReader::new(f).lines().collect::<std::io::Result<_>>()?;
    let mut out: Vec<LabRecord> = Vec::new();
    for (n, line) in lines.iter().enumerate() {
        let v: Vec<u64> = line.split_whitespace().filter_map(|x| x.parse().ok()).collect();
        if v.len() != 4 || out.last().is_some_and(|l| v[0] <= l.seq) {
            // Only the last line may be torn (the workload was killed mid-append).
            if n + 1 == lines.len() && n > 0 {
                break;
            }
            bail!("{}:{}: not a workload log line (or seq out of order): {line:?}", path.display(), n + 1);
        }
        out.push(LabRecord { seq: v[0], disk: v[1] as u32, offset: v[2], blocks: v[3] as u32 });
    }
    Ok(out)
}

/// The verdict on a set of disk images.
#[derive(Debug, serde::Serialize)]
pub struct Verdict {
    pub consistent: bool,
    /// The prefix the disks hold (every record up to it, none after it).
    pub prefix_seq: u64,
    pub records_in_log: usize,
    pub blocks_checked: u64,
    pub problem: Option<String>,
}

/// Check raw disk images (`disks[i]` = disk i) against the log; with `exact`, the prefix must be
/// exactly that seq (an app-consistent point).
pub fn verify(log_path: &Path, disks: &[PathBuf], seed: u64, exact: Option<u64>) -> Result<Verdict> {
    use std::os::unix::fs::FileExt;
    let log = read_log(log_path)?;
    if let Some(r) = log.iter().find(|r| r.disk as usize >= disks.len()) {
        bail!(
            "the log's record {} is on disk {}, but only {} disk image(s) were given: give every disk, in order",
            r.seq,
            r.disk,
            disks.len()
        );
    }
    let by_seq: HashMap<u64, LabRecord> = log.iter().map(|r| (r.seq, *r)).collect();
    // Pass 1: the highest record any disk holds is the smallest possible N.
    let mut files = Vec::new();
    for d in disks {
        files.push(std::fs::File::open(d).with_context(|| format!("cannot open {}", d.display()))?);
    }
    let mut max_seen = 0;
    let mut misplaced: Option<String> = None;
    let mut buf = vec![0u8; BLOCK];
    let mut expected = vec![0u8; BLOCK];
    let mut checked = 0;
    let scan = |f: &std::fs::File, mut each: &mut dyn FnMut(u64, &[u8]) -> Result<()>| -> Result<()> {
        let len = f.metadata()?.len();
        let mut b = vec![0u8; BLOCK];
        let mut off = 0;
        while off + BLOCK as u64 <= len {
            f.read_exact_at(&mut b, off)?;
            each(off, &b)?;
            off += BLOCK as u64;
        }
        let _ = &mut each;
        Ok(())
    };
    for (di, f) in files.iter().enumerate() {
        scan(f, &mut |off, b| {
            if let Some((seq, disk, idx)) = parse_block(b) {
                let ok = by_seq.get(&seq).is_some_and(|r| {
                    r.disk as usize == di && disk as usize == di && r.offset + u64::from(idx) * BLOCK as u64 == off
                });
                if !ok && misplaced.is_none() {
                    misplaced = Some(format!("disk {di} block at offset {off} holds record {seq} block {idx}, which the log does not place there"));
                }
                max_seen = max_seen.max(seq);
            }
            Ok(())
        })?;
    }
    if let Some(p) = misplaced {
        return Ok(Verdict {
            consistent: false,
            prefix_seq: max_seen,
            records_in_log: log.len(),
            blocks_checked: 0,
            problem: Some(p),
        });
    }
    let n = exact.unwrap_or(max_seen);
    if n < max_seen {
        return Ok(Verdict {
            consistent: false,
            prefix_seq: max_seen,
            records_in_log: log.len(),
            blocks_checked: 0,
            problem: Some(format!("the disks hold record {max_seen}, written after the point's seq {n}")),
        });
    }
    // Pass 2: every block must be what the records ≤ N wrote last there.
    let mut last: Vec<HashMap<u64, (u64, u32)>> = vec![HashMap::new(); disks.len()];
    for r in log.iter().filter(|r| r.seq <= n) {
        if (r.disk as usize) < disks.len() {
            for i in 0..r.blocks {
                last[r.disk as usize].insert(r.offset + u64::from(i) * BLOCK as u64, (r.seq, i));
            }
        }
    }
    let mut problem = None;
    for (di, f) in files.iter().enumerate() {
        for (&off, &(seq, idx)) in &last[di] {
            f.read_exact_at(&mut buf, off).with_context(|| format!("reading disk {di} at {off}"))?;
            checked += 1;
            match parse_block(&buf) {
                Some((s, _, i)) if s == seq && i == idx => {
                    // The payload too, not only a self-consistent header.
                    if let Some(r) = by_seq.get(&seq) {
                        fill_block(&mut expected, seed, r, idx);
                        if expected != buf {
                            problem = Some(format!("disk {di} block at offset {off} holds record {seq} with a payload the workload did not write (another --seed?)"));
                            break;
                        }
                    }
                }
                Some((s, _, _)) => {
                    problem = Some(format!(
                        "disk {di} block at offset {off} holds record {s}, but record {seq} (within the prefix up to {n}) wrote it last: a write is missing or out of order"
                    ));
                    break;
                }
                None => {
                    problem = Some(format!(
                        "disk {di} block at offset {off} should hold record {seq} (within the prefix up to {n}) but holds no intact record: data is lost or corrupt"
                    ));
                    break;
                }
            }
        }
        if problem.is_some() {
            break;
        }
    }
    Ok(Verdict {
        consistent: problem.is_none(),
        prefix_seq: n,
        records_in_log: log.len(),
        blocks_checked: checked,
        problem,
    })
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_replayed_prefix_verifies_and_a_corrupted_or_reordered_one_does_not() {
        let dir = tempfile::tempdir().unwrap();
        let img = dir.path().join("d0.img");
        std::fs::File::create(&img).unwrap().set_len(64 * BLOCK as u64).unwrap();
        let log = dir.path().join("log");
        let mut rng = rand::rngs::StdRng::seed_from_u64(5);
        let mut lines = String::new();
        let mut recs = Vec::new();
        for seq in 1..=40u64 {
            let blocks = rng.gen_range(1..4u32);
            let r = LabRecord { seq, disk: 0, offset: rng.gen_range(0..60u64) * BLOCK as u64, blocks };
            lines.push_str(&format!("{} 0 {} {}\n", r.seq, r.offset, r.blocks));
            recs.push(r);
        }
        std::fs::write(&log, lines).unwrap();
        use std::os::unix::fs::FileExt;
        let f = std::fs::OpenOptions::new().write(true).open(&img).unwrap();
        let mut buf = vec![0u8; BLOCK];
        for r in recs.iter().take(25) {
            for i in 0..r.blocks {
                fill_block(&mut buf, 9, r, i);
                f.write_all_at(&buf, r.offset + u64::from(i) * BLOCK as u64).unwrap();
            }
        }
        let v = verify(&log, std::slice::from_ref(&img), 9, None).unwrap();
        assert!(v.consistent && v.prefix_seq <= 25, "{v:?}");
        assert!(verify(&log, std::slice::from_ref(&img), 9, Some(25)).unwrap().consistent);
        // A corrupted byte in a block of the prefix is found, with its offset.
        let r = recs[24];
        f.write_all_at(&[0xff], r.offset + 100).unwrap();
        let v = verify(&log, std::slice::from_ref(&img), 9, Some(25)).unwrap();
        assert!(!v.consistent && v.problem.as_ref().unwrap().contains(&format!("offset {}", r.offset)), "{v:?}");
    }
}
