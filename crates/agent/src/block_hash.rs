//! Block hashes of disk regions at 4 KiB, reading none of the disk's holes: what a reprotect
//! compares where an agent's own tracking is coarser than a block (the old primary's activity-log
//! extents, 4 MiB each). The old primary's side is hashed offline (`ferry agent changes
//! --hashes`), the failed-over machine's agent hashes its own disk at start and resyncs only the
//! blocks whose hashes differ.

use ferry_nbd::Backend;

/// Granularity of the comparison (the change bitmap's block).
pub const COMPARE_BLOCK: u64 = ferry_journal::TRACK_BLOCK;
/// Bytes of one block's hash (BLAKE3, truncated: a collision needs 2^64 work per block pair).
pub const HASH_LEN: usize = 16;
/// Bytes read per step.
const READ_STEP: u64 = 1 << 20;

/// The hashes of the blocks of `[offset, offset + length)`, concatenated (the last block may be
/// short at the disk's end). Holes are hashed as zeros without being read.
pub fn region_hashes(disk: &dyn Backend, offset: u64, length: u64) -> Result<Vec<u8>, String> {
    block_hashes(disk, offset, length, COMPARE_BLOCK, HASH_LEN)
}

/// [`region_hashes`] at any block size, each hash the first `hash_len` (≤ 32) bytes of BLAKE3
/// (online verify uses 64 KiB blocks and whole hashes).
pub fn block_hashes(
    disk: &dyn Backend,
    offset: u64,
    length: u64,
    block: u64,
    hash_len: usize,
) -> Result<Vec<u8>, String> {
    let block = block.max(512);
    let hash_len = hash_len.clamp(1, 32);
    let end = offset.saturating_add(length).min(disk.size());
    let holes = holes(disk, offset, end)?;
    // Holes are sorted and disjoint, blocks visited in order: one cursor walks them.
    let mut cursor = 0;
    let mut in_hole = |s: u64, e: u64| {
        while cursor < holes.len() && holes[cursor].1 <= s {
            cursor += 1;
        }
        holes.get(cursor).is_some_and(|&(hs, he)| hs <= s && e <= he)
    };
    let zero = vec![0u8; block as usize];
    let mut out = Vec::with_capacity((length.div_ceil(block) as usize) * hash_len);
    let mut buf = Vec::new();
    let mut at = offset;
    while at < end {
        let block_end = (at + block).min(end);
        if in_hole(at, block_end) {
            out.extend_from_slice(&blake3::hash(&zero[..(block_end - at) as usize]).as_bytes()[..hash_len]);
            at = block_end;
            continue;
        }
        // A run of data blocks, read together (at most READ_STEP).
        let mut run_end = block_end;
        while run_end < end && run_end - at < READ_STEP.max(block) {
            let next = (run_end + block).min(end);
            if in_hole(run_end, next) {
                break;
            }
            run_end = next;
        }
        buf.resize((run_end - at) as usize, 0);
        disk.read(at, &mut buf).map_err(|e| e.to_string())?;
        for chunk in buf.chunks(block as usize) {
            out.extend_from_slice(&blake3::hash(chunk).as_bytes()[..hash_len]);
        }
        at = run_end;
    }
    Ok(out)
}

/// The holes of `[offset, end)`, sorted (block status may answer coarser or shorter: asked
/// again from where it stopped).
fn holes(disk: &dyn Backend, offset: u64, end: u64) -> Result<Vec<(u64, u64)>, String> {
    let mut holes: Vec<(u64, u64)> = Vec::new();
    let mut at = offset;
    while at < end {
        let extents = disk.block_status(at, end - at).map_err(|e| e.to_string())?;
        let from = at;
        for e in extents {
            let to = at.saturating_add(e.length).min(end);
            if e.hole {
                match holes.last_mut() {
                    Some((_, he)) if *he == at => *he = to,
                    _ => holes.push((at, to)),
                }
            }
            at = to;
            if at >= end || e.length == 0 {
                break;
            }
        }
        if at == from {
            // No answer for the rest: it counts as data (read, never skipped).
            break;
        }
    }
    Ok(holes)
}

/// Lowercase hex (the form hashes travel in, in JSON and TOML).
pub fn to_hex(b: &[u8]) -> String {
    let mut s = String::with_capacity(b.len() * 2);
    for x in b {
        s.push_str(&format!("{x:02x}"));
    }
    s
}

/// The bytes of a hex string, or None when it is not one.
pub fn from_hex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) || !s.bytes().all(|b| b.is_ascii_hexdigit()) {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| s.get(i..i + 2).and_then(|p| u8::from_str_radix(p, 16).ok())).collect()
}

/// The blocks of `[offset, offset + length)` whose hash on `disk` differs from `theirs` (the
/// other side's hashes of the same region), as `(offset, length)` runs.
pub fn differing(disk: &dyn Backend, offset: u64, length: u64, theirs: &[u8]) -> Result<Vec<(u64, u64)>, String> {
    let ours = region_hashes(disk, offset, length)?;
    if ours.len() != theirs.len() {
        return Err(format!(
            "the region {offset}+{length} has {} block hash(es) here and {} given",
            ours.len() / HASH_LEN,
            theirs.len() / HASH_LEN
        ));
    }
    let end = offset.saturating_add(length).min(disk.size());
    let mut runs: Vec<(u64, u64)> = Vec::new();
    for (i, (a, b)) in ours.chunks(HASH_LEN).zip(theirs.chunks(HASH_LEN)).enumerate() {
        if a == b {
            continue;
        }
        let off = offset + i as u64 * COMPARE_BLOCK;
        let len = COMPARE_BLOCK.min(end - off);
        match runs.last_mut() {
            Some((o, l)) if *o + *l == off => *l += len,
            _ => runs.push((off, len)),
        }
    }
    Ok(runs)
}

#[cfg(test)]
mod tests {
    use super::*;
    use ferry_nbd::MemBackend;

    #[test]
    fn only_differing_blocks_are_named_and_holes_hash_as_zeros() {
        let a = MemBackend::new(1 << 20);
        let b = MemBackend::new(1 << 20);
        for d in [&a, &b] {
            d.write(8192, &[7u8; 8192], false).unwrap();
        }
        b.write(12288 + 100, &[1u8; 10], false).unwrap();
        b.write(900_000, &[2u8; 1], false).unwrap();
        let theirs = region_hashes(&b, 0, 1 << 20).unwrap();
        assert_eq!(theirs.len(), 256 * HASH_LEN);
        let diff = differing(&a, 0, 1 << 20, &theirs).unwrap();
        assert_eq!(diff, vec![(12288, 4096), (897_024, 4096)]);
        assert!(differing(&a, 0, 4096, &theirs).is_err(), "a region of another length is refused");
        assert_eq!(from_hex(&to_hex(&theirs)).unwrap(), theirs);
        assert!(from_hex("zz").is_none() && from_hex("abc").is_none() && from_hex("+f").is_none());
    }

    #[test]
    fn holes_of_a_file_are_not_read() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("d.img");
        let f = std::fs::File::create(&path).unwrap();
        f.set_len(64 << 20).unwrap();
        use std::os::unix::fs::FileExt;
        f.write_all_at(&[5u8; 4096], 32 << 20).unwrap();
        f.sync_all().unwrap();
        let disk = ferry_nbd::FileBackend::open(&path, true).unwrap();
        let h = region_hashes(&disk, 0, 64 << 20).unwrap();
        let mem = MemBackend::new(64 << 20);
        mem.write(32 << 20, &[5u8; 4096], false).unwrap();
        assert_eq!(h, region_hashes(&mem, 0, 64 << 20).unwrap(), "a hole hashes as zeros");
        assert!(differing(&mem, 0, 64 << 20, &h).unwrap().is_empty());
    }

    #[test]
    fn a_short_last_block_is_hashed_as_it_is() {
        let a = MemBackend::new(4096 * 2 + 100);
        a.write(8192, &[3u8; 100], false).unwrap();
        let h = region_hashes(&a, 0, 4096 * 2 + 100).unwrap();
        assert_eq!(h.len(), 3 * HASH_LEN);
        let b = MemBackend::new(4096 * 2 + 100);
        assert_eq!(differing(&b, 0, 4096 * 2 + 100, &h).unwrap(), vec![(8192, 100)]);
    }
}
