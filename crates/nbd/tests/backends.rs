//! Backend semantics, checked against a simple in-memory model.
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::sync::Arc;

use common::assert_same;
#[cfg(feature = "testing")]
use ferry_nbd::VolatileCacheFileBackend;
use ferry_nbd::{Backend, CowBackend, Extent, FileBackend, MemBackend};
use rand::{Rng, SeedableRng};

const SIZE: usize = 256 * 1024 + 1536; // deliberately not 4 KiB aligned

/// Apply random writes/zeroes/trims to `b` and a model; verify reads match.
fn exercise(b: &dyn Backend, model: &mut [u8], seed: u64) {
    let mut rng = rand::rngs::StdRng::seed_from_u64(seed);
    for i in 0..400 {
        let off = rng.gen_range(0..model.len() as u64);
        let max = (model.len() as u64 - off).min(20_000);
        let len = rng.gen_range(0..=max);
        let r = off as usize..(off + len) as usize;
        match rng.gen_range(0..10) {
            0..=5 => {
                let mut d = vec![0u8; len as usize];
                rng.fill(&mut d[..]);
                b.write(off, &d, i % 7 == 0).unwrap();
                model[r].copy_from_slice(&d);
            }
            6 => {
                b.write_zeroes(off, len, rng.gen(), false).unwrap();
                model[r].fill(0);
            }
            7 => {
                b.trim(off, len, false).unwrap();
                model[r].fill(0);
            }
            8 => b.flush().unwrap(),
            _ => {
                let mut buf = vec![0xeeu8; len as usize];
                b.read(off, &mut buf).unwrap();
                assert_same(&buf, &model[r], "partial read");
            }
        }
    }
    let mut all = vec![0u8; model.len()];
    b.read(0, &mut all).unwrap();
    assert_same(&all, model, "full read");
}

fn random_file(dir: &std::path::Path, name: &str) -> (std::path::PathBuf, Vec<u8>) {
    let mut data = vec![0u8; SIZE];
    rand::thread_rng().fill(&mut data[..]);
    let p = dir.join(name);
    std::fs::write(&p, &data).unwrap();
    (p, data)
}

#[test]
fn mem_backend_model() {
    let b = MemBackend::new(SIZE as u64);
    let mut model = vec![0u8; SIZE];
    exercise(&b, &mut model, 1);
    assert_eq!(b.contents(), model);
    let ro = MemBackend::read_only_from(vec![1; 10]);
    assert!(ro.read_only());
    assert!(ro.write(0, &[0], false).is_err());
}

#[test]
fn file_backend_model_and_block_status() {
    let dir = tempfile::tempdir().unwrap();
    let (p, mut model) = random_file(dir.path(), "f.img");
    let b = FileBackend::open(&p, false).unwrap();
    assert_eq!(b.size(), SIZE as u64);
    assert!(b.can_multi_conn());
    exercise(&b, &mut model, 2);
    b.flush().unwrap();
    assert_same(&std::fs::read(&p).unwrap(), &model, "file content");

    // Punch a 64 KiB hole and check SEEK_HOLE based block status.
    b.write_zeroes(64 * 1024, 64 * 1024, true, true).unwrap();
    let ext = b.block_status(0, SIZE as u64).unwrap();
    let total: u64 = ext.iter().map(|e| e.length).sum();
    assert!(total >= SIZE as u64);
    let mut pos = 0u64;
    let mut found_hole = false;
    for e in &ext {
        if e.hole {
            assert!(e.zero);
            // Every hole must read as zero.
            let mut buf = vec![1u8; e.length.min(SIZE as u64 - pos) as usize];
            b.read(pos, &mut buf).unwrap();
            assert!(buf.iter().all(|&x| x == 0));
            if pos <= 64 * 1024 && pos + e.length >= 128 * 1024 {
                found_hole = true;
            }
        }
        pos += e.length;
    }
    assert!(found_hole, "hole not reported: {ext:?}");
    // NO_HOLE zeroing also reads back as zeroes.
    b.write(0, &[7u8; 8192], false).unwrap();
    b.write_zeroes(0, 8192, false, false).unwrap();
    let mut buf = [1u8; 8192];
    b.read(0, &mut buf).unwrap();
    assert!(buf.iter().all(|&x| x == 0));

    // Read-only open refuses writes.
    let ro = FileBackend::open(&p, true).unwrap();
    assert!(ro.read_only());
    assert!(matches!(ro.write(0, &[1], false), Err(ferry_nbd::BackendError::ReadOnly)));
}

#[test]
fn cow_backend_model_never_touches_base() {
    let dir = tempfile::tempdir().unwrap();
    let (p, base_data) = random_file(dir.path(), "base.img");
    let base: Arc<dyn Backend> = Arc::new(FileBackend::open(&p, true).unwrap());
    let overlay = dir.path().join("ov");
    let cow = CowBackend::new(base, &overlay).unwrap();
    assert_eq!(cow.size(), SIZE as u64);
    let mut model = base_data.clone();
    exercise(&cow, &mut model, 3);
    assert!(cow.dirty_blocks() > 0);
    assert_same(&std::fs::read(&p).unwrap(), &base_data, "base after cow writes");
    assert_eq!(std::fs::metadata(&overlay).unwrap().len(), SIZE as u64);
    cow.discard().unwrap();
    assert!(!overlay.exists());
    cow.discard().unwrap(); // idempotent

    // Over a MemBackend base too, and dropping removes the overlay.
    let base = Arc::new(MemBackend::new(SIZE as u64));
    let overlay2 = dir.path().join("ov2");
    let cow = CowBackend::new(base.clone(), &overlay2).unwrap();
    let mut model = vec![0u8; SIZE];
    exercise(&cow, &mut model, 4);
    assert!(base.contents().iter().all(|&b| b == 0));
    drop(cow);
    assert!(!overlay2.exists());
}

#[test]
#[cfg(feature = "testing")]
fn volatile_cache_loses_unflushed_writes() {
    let dir = tempfile::tempdir().unwrap();
    let (p, original) = random_file(dir.path(), "v.img");
    let b = VolatileCacheFileBackend::open(&p).unwrap();
    b.write(100, &[1u8; 5000], false).unwrap();
    b.write_zeroes(16384, 8192, true, false).unwrap();
    // Visible through the backend...
    let mut buf = vec![0u8; 5000];
    b.read(100, &mut buf).unwrap();
    assert!(buf.iter().all(|&x| x == 1));
    // ...but not in the file (a crash now would lose them).
    assert_same(&std::fs::read(&p).unwrap(), &original, "file before flush");
    assert!(b.dirty_blocks() > 0);

    // FUA persists just that write.
    b.write(65536, &[2u8; 4096], true).unwrap();
    let on_disk = std::fs::read(&p).unwrap();
    assert!(on_disk[65536..69632].iter().all(|&x| x == 2));
    assert_same(&on_disk[100..5100], &original[100..5100], "unflushed range");

    b.flush().unwrap();
    assert_eq!(b.dirty_blocks(), 0);
    let on_disk = std::fs::read(&p).unwrap();
    assert!(on_disk[100..5100].iter().all(|&x| x == 1));
    assert!(on_disk[16384..24576].iter().all(|&x| x == 0));
    assert_same(&on_disk[..100], &original[..100], "untouched head");
    drop(b);

    // Random model check, then "crash" (drop without flush) and re-open.
    let b = VolatileCacheFileBackend::open(&p).unwrap();
    let mut model = std::fs::read(&p).unwrap();
    exercise(&b, &mut model, 5);
    b.flush().unwrap();
    assert_same(&std::fs::read(&p).unwrap(), &model, "after final flush");
    b.write(0, &[9u8; 4096], false).unwrap();
    drop(b); // simulated crash: unflushed write lost
    assert_same(&std::fs::read(&p).unwrap()[..4096], &model[..4096], "lost write");
}

#[test]
fn default_block_status_is_one_data_extent() {
    let b = MemBackend::new(8192);
    assert_eq!(b.block_status(0, 8192).unwrap(), vec![Extent { length: 8192, hole: false, zero: false }]);
}
