//! End-to-end tests against real NBD clients (qemu-io, qemu-img, qemu-nbd,
//! and libnbd's nbdinfo/nbdcopy when installed).
#![allow(clippy::unwrap_used, clippy::expect_used)]

mod common;

use std::io::Write;
use std::sync::Arc;

use common::*;
use ferry_nbd::proto::*;
use ferry_nbd::{Backend, CowBackend, Exports, FileBackend};

const MIB: usize = 1024 * 1024;

fn file_export(exports: &Exports, name: &str, path: &std::path::Path, ro: bool) {
    let b = FileBackend::open(path, ro).unwrap();
    exports.insert(export(name, Arc::new(b)));
}

#[test]
fn qemu_io_write_read_zero_discard() {
    let dir = tempfile::tempdir().unwrap();
    let img = filled_file(dir.path(), "disk0.img", 4 * MIB, 0xcd);
    let exports = Exports::new();
    file_export(&exports, "disk0", &img, false);
    let srv = start_tcp(exports);
    let out = run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0xab 0 64k",
            "-c",
            "read -P 0xab 0 64k",
            "-c",
            "aio_write -P 1 4k 8k",
            "-c",
            "aio_flush",
            "-c",
            "write -z 128k 64k",
            "-c",
            "discard 1M 64k",
            "-c",
            "flush",
            "-c",
            "write -P 0x5a -f 2M 4k",
            &srv.url("disk0"),
        ],
    );
    let text = stdout_of(&out);
    assert!(out.status.success(), "qemu-io failed: {text}");
    assert!(!text.contains("error") && !text.contains("Pattern verification failed"), "{text}");

    let data = std::fs::read(&img).unwrap();
    let k = 1024;
    let check = |from: usize, to: usize, b: u8| {
        assert!(data[from..to].iter().all(|&x| x == b), "range {from}..{to} expected {b:#x}");
    };
    check(0, 4 * k, 0xab);
    check(4 * k, 12 * k, 0x01);
    check(12 * k, 64 * k, 0xab);
    check(64 * k, 128 * k, 0xcd);
    check(128 * k, 192 * k, 0x00);
    check(192 * k, MIB, 0xcd);
    check(MIB, MIB + 64 * k, 0x00);
    check(MIB + 64 * k, 2 * MIB, 0xcd);
    check(2 * MIB, 2 * MIB + 4 * k, 0x5a);
    check(2 * MIB + 4 * k, 4 * MIB, 0xcd);
}

#[test]
fn qemu_io_many_in_flight_requests() {
    let dir = tempfile::tempdir().unwrap();
    let img = filled_file(dir.path(), "d.img", 8 * MIB, 0);
    let exports = Exports::new();
    file_export(&exports, "d", &img, false);
    let srv = start_tcp(exports);
    let mut args: Vec<String> = vec!["-f".into(), "raw".into()];
    for i in 0..64u32 {
        args.push("-c".into());
        args.push(format!("aio_write -P {} {} 8k", i + 1, i * 8192));
    }
    args.push("-c".into());
    args.push("aio_flush".into());
    for i in 0..64u32 {
        args.push("-c".into());
        args.push(format!("aio_read -P {} {} 8k", i + 1, i * 8192));
    }
    args.push("-c".into());
    args.push("aio_flush".into());
    args.push(srv.url("d"));
    let argv: Vec<&str> = args.iter().map(String::as_str).collect();
    let out = run("qemu-io", &argv);
    let text = stdout_of(&out);
    assert!(out.status.success() && !text.contains("failed"), "{text}");
}

#[test]
fn qemu_img_info_convert_compare_map() {
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("src.img");
    // Random data with a 1 MiB hole in the middle.
    let mut data = vec![0u8; 4 * MIB];
    rand::Rng::fill(&mut rand::thread_rng(), &mut data[..]);
    data[MIB..2 * MIB].fill(0);
    std::fs::write(&src, &data).unwrap();
    let f = std::fs::OpenOptions::new().write(true).open(&src).unwrap();
    let fb = FileBackend::open(&src, false).unwrap();
    fb.write_zeroes(MIB as u64, MIB as u64, true, false).unwrap();
    drop(f);
    let exports = Exports::new();
    exports.insert(export("src", Arc::new(fb)));
    let srv = start_tcp(exports);

    let out = run("qemu-img", &["info", "-f", "raw", &srv.url("src")]);
    let text = stdout_of(&out);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("virtual size: 4 MiB"), "{text}");

    let dst = dir.path().join("out.img");
    let out = run("qemu-img", &["convert", "-f", "raw", "-O", "raw", &srv.url("src"), dst.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stdout_of(&out));
    let out = run("qemu-img", &["compare", "-f", "raw", "-F", "raw", src.to_str().unwrap(), dst.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stdout_of(&out));
    let out = run("qemu-img", &["compare", "-f", "raw", "-F", "raw", &srv.url("src"), dst.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stdout_of(&out));
    assert_same(&std::fs::read(&dst).unwrap(), &data, "dst");

    // Block status (base:allocation) through qemu: the hole must show up.
    let out = run("qemu-img", &["map", "--output=json", "-f", "raw", &srv.url("src")]);
    let text = stdout_of(&out);
    assert!(out.status.success(), "{text}");
    assert!(
        text.contains(&format!(
            "\"start\": {MIB}, \"length\": {MIB}, \"depth\": 0, \"present\": false, \"zero\": true, \"data\": false"
        )) || text.contains("\"zero\": true, \"data\": false"),
        "no hole in map: {text}"
    );
}

#[test]
fn read_only_export_refuses_writes() {
    let dir = tempfile::tempdir().unwrap();
    let img = filled_file(dir.path(), "ro.img", MIB, 0x42);
    let exports = Exports::new();
    file_export(&exports, "ro", &img, true);
    let srv = start_tcp(exports);
    let out = run("qemu-io", &["-f", "raw", "-c", "write -P 0x11 0 4k", &srv.url("ro")]);
    let text = stdout_of(&out);
    assert!(
        !out.status.success() || text.to_lowercase().contains("read-only") || text.contains("not permitted"),
        "write to read-only export did not fail: {text}"
    );
    // Reads work.
    let out = run("qemu-io", &["-r", "-f", "raw", "-c", "read -P 0x42 0 64k", &srv.url("ro")]);
    assert!(out.status.success(), "{}", stdout_of(&out));
    // A raw client that ignores READ_ONLY gets EPERM.
    let mut c = RawClient::connect(srv.port);
    let r = c.go("ro");
    assert_eq!(r.last().unwrap().1, REP_ACK);
    let flags = u16::from_be_bytes(r[0].2[10..12].try_into().unwrap());
    assert!(flags & TF_READ_ONLY != 0);
    c.request(0, CMD_WRITE, 7, 0, 4, &[1, 2, 3, 4]);
    assert_eq!(c.simple_reply(), (NBD_EPERM, 7));
    c.request(0, CMD_DISC, 8, 0, 0, &[]);
    assert!(std::fs::read(&img).unwrap().iter().all(|&b| b == 0x42));
}

#[test]
fn list_exports() {
    let dir = tempfile::tempdir().unwrap();
    let a = filled_file(dir.path(), "a.img", MIB, 0);
    let b = filled_file(dir.path(), "b.img", 2 * MIB, 0);
    let exports = Exports::new();
    file_export(&exports, "alpha", &a, false);
    file_export(&exports, "beta", &b, true);
    let srv = start_tcp(exports.clone());
    let port = srv.port.to_string();
    let out = run("qemu-nbd", &["--list", "-b", "127.0.0.1", "-p", &port]);
    let text = stdout_of(&out);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("alpha") && text.contains("beta"), "{text}");
    assert!(text.contains("test export alpha"), "{text}");

    // Exports can be removed at runtime.
    assert!(exports.remove("beta"));
    let out = run("qemu-nbd", &["--list", "-b", "127.0.0.1", "-p", &port]);
    let text = stdout_of(&out);
    assert!(text.contains("alpha") && !text.contains("beta"), "{text}");

    if have("nbdinfo") {
        let out = run("nbdinfo", &["--list", &format!("nbd://127.0.0.1:{port}")]);
        let text = stdout_of(&out);
        assert!(out.status.success(), "{text}");
        assert!(text.contains("alpha") && text.contains("base:allocation"), "{text}");
    } else {
        println!("note: nbdinfo not installed; skipping nbdinfo --list");
    }
}

#[test]
fn libnbd_nbdinfo_and_nbdcopy() {
    if !have("nbdinfo") || !have("nbdcopy") {
        println!("note: nbdinfo/nbdcopy not installed (apt-get install libnbd-bin); skipping");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let src = dir.path().join("s.img");
    let mut data = vec![0u8; 4 * MIB];
    rand::Rng::fill(&mut rand::thread_rng(), &mut data[..2 * MIB]);
    std::fs::write(&src, &data).unwrap();
    let fb = FileBackend::open(&src, false).unwrap();
    fb.write_zeroes(2 * MIB as u64, 2 * MIB as u64, true, false).unwrap();
    let exports = Exports::new();
    exports.insert(export("s", Arc::new(fb)));
    let dst = filled_file(dir.path(), "d.img", 4 * MIB, 0x77);
    file_export(&exports, "d", &dst, false);
    let srv = start_tcp(exports);

    let out = run("nbdinfo", &[&srv.url("s")]);
    let text = stdout_of(&out);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("4194304"), "{text}");
    assert!(text.contains("can_multi_conn: true"), "{text}");
    assert!(text.contains("block_size_maximum: 33554432"), "{text}");

    let out = run("nbdinfo", &["--map", &srv.url("s")]);
    let text = stdout_of(&out);
    assert!(out.status.success(), "{text}");
    assert!(text.contains("hole,zero"), "{text}");

    // nbd -> nbd copy, then nbd -> file.
    let out = run("nbdcopy", &[&srv.url("s"), &srv.url("d")]);
    assert!(out.status.success(), "{}", stdout_of(&out));
    assert_same(&std::fs::read(&dst).unwrap(), &data, "dst");
    let local = dir.path().join("local.img");
    std::fs::write(&local, b"").unwrap();
    let out = run("nbdcopy", &[&srv.url("s"), local.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stdout_of(&out));
    assert_same(&std::fs::read(&local).unwrap(), &data, "local");
}

#[test]
fn hostile_clients_are_disconnected_others_keep_working() {
    let dir = tempfile::tempdir().unwrap();
    let img = filled_file(dir.path(), "h.img", MIB, 0);
    let exports = Exports::new();
    file_export(&exports, "h", &img, false);
    let srv = start_tcp(exports);

    // A client stalled mid-handshake must not block anyone.
    let stalled = RawClient::connect(srv.port);

    // 1. Garbage after a successful GO.
    let mut bad = RawClient::connect(srv.port);
    assert_eq!(bad.go("h").last().unwrap().1, REP_ACK);
    bad.s.write_all(&[0xde; 64]).unwrap();
    assert!(bad.is_closed(), "garbage did not close the connection");

    // 2. Oversized write request (4 GiB - 1 payload announced).
    let mut big = RawClient::connect(srv.port);
    assert_eq!(big.go("h").last().unwrap().1, REP_ACK);
    big.request(0, CMD_WRITE, 1, 0, u32::MAX, &[0; 128]);
    assert!(big.is_closed(), "oversized write did not close the connection");

    // 3. Absurd option length.
    let mut opt = RawClient::connect(srv.port);
    let mut h = Vec::new();
    h.extend_from_slice(&IHAVEOPT.to_be_bytes());
    h.extend_from_slice(&OPT_GO.to_be_bytes());
    h.extend_from_slice(&u32::MAX.to_be_bytes());
    opt.s.write_all(&h).unwrap();
    assert!(opt.is_closed(), "absurd option length did not close the connection");

    // 4. Errors that keep the stream in sync: unknown command, out of range,
    //    oversized read, unknown option, unknown export.
    let mut c = RawClient::connect(srv.port);
    c.send_option(OPT_EXTENDED_HEADERS, &[]);
    assert_eq!(c.read_option_reply().1, REP_ERR_UNSUP);
    c.send_option(4242, &[1, 2, 3]);
    assert_eq!(c.read_option_reply().1, REP_ERR_UNSUP);
    assert_eq!(c.go("nope").last().unwrap().1, REP_ERR_UNKNOWN);
    c.send_option(OPT_GO, &[0, 0]);
    assert_eq!(c.read_option_reply().1, REP_ERR_INVALID);
    assert_eq!(c.go("").last().unwrap().1, REP_ACK); // default export = the only one
    c.request(0, 99, 1, 0, 0, &[]);
    assert_eq!(c.simple_reply(), (NBD_EINVAL, 1));
    c.request(0, CMD_READ, 2, MIB as u64, 1, &[]);
    assert_eq!(c.simple_reply(), (NBD_EINVAL, 2));
    c.request(0, CMD_WRITE, 3, MIB as u64 - 2, 4, &[9, 9, 9, 9]);
    assert_eq!(c.simple_reply(), (NBD_ENOSPC, 3));
    c.request(0, CMD_READ, 4, 0, MAX_PAYLOAD + 1, &[]);
    assert_eq!(c.simple_reply(), (NBD_EOVERFLOW, 4));
    c.request(CMD_FLAG_REQ_ONE, CMD_READ, 5, 0, 1, &[]);
    assert_eq!(c.simple_reply(), (NBD_EINVAL, 5));
    c.request(0, CMD_BLOCK_STATUS, 6, 0, 512, &[]);
    assert_eq!(c.simple_reply(), (NBD_EINVAL, 6)); // no meta context negotiated
    c.request(CMD_FLAG_FUA, CMD_WRITE, 7, 0, 4, &[1, 2, 3, 4]);
    assert_eq!(c.simple_reply(), (0, 7));
    c.request(0, CMD_READ, 8, 0, 4, &[]);
    assert_eq!(c.simple_reply(), (0, 8));
    let mut four = [0u8; 4];
    std::io::Read::read_exact(&mut c.s, &mut four).unwrap();
    assert_eq!(four, [1, 2, 3, 4]);

    // A well-behaved client still works while the stalled one hangs around.
    let out =
        run("qemu-io", &["-f", "raw", "-c", "write -P 0x33 64k 64k", "-c", "read -P 0x33 64k 64k", &srv.url("h")]);
    assert!(out.status.success(), "{}", stdout_of(&out));
    assert!(!stdout_of(&out).contains("failed"));
    drop(stalled);
}

#[test]
fn unix_socket_serving() {
    let dir = tempfile::tempdir().unwrap();
    let img = filled_file(dir.path(), "u.img", MIB, 0);
    let sock = dir.path().join("nbd.sock");
    let exports = Exports::new();
    file_export(&exports, "disk0", &img, false);
    let _srv = start_unix(exports, &sock);
    let url = format!("nbd+unix:///disk0?socket={}", sock.display());
    let out = run("qemu-io", &["-f", "raw", "-c", "write -P 0x7e 4k 4k", "-c", "read -P 0x7e 4k 4k", &url]);
    assert!(out.status.success(), "{}", stdout_of(&out));
    assert!(!stdout_of(&out).contains("failed"));
    let data = std::fs::read(&img).unwrap();
    assert!(data[4096..8192].iter().all(|&b| b == 0x7e));
}

#[test]
fn cow_export_leaves_base_unchanged() {
    let dir = tempfile::tempdir().unwrap();
    let base_path = dir.path().join("base.img");
    let mut base_data = vec![0u8; 2 * MIB + 1024]; // not 4 KiB aligned
    rand::Rng::fill(&mut rand::thread_rng(), &mut base_data[..]);
    std::fs::write(&base_path, &base_data).unwrap();
    let base = Arc::new(FileBackend::open(&base_path, true).unwrap());
    let overlay = dir.path().join("overlay.img");
    let cow = Arc::new(CowBackend::new(base, &overlay).unwrap());
    let exports = Exports::new();
    exports.insert(export("cow", cow.clone()));
    let srv = start_tcp(exports.clone());
    let out = run(
        "qemu-io",
        &[
            "-f",
            "raw",
            "-c",
            "write -P 0x11 100 1000",
            "-c",
            "write -P 0x22 8k 8k",
            "-c",
            "write -z 64k 12k",
            "-c",
            "discard 1M 4k",
            "-c",
            "write -P 0x33 2097000 1000",
            "-c",
            "flush",
            &srv.url("cow"),
        ],
    );
    assert!(out.status.success(), "{}", stdout_of(&out));
    // Read everything back through NBD.
    let copy = dir.path().join("copy.img");
    let out = run("qemu-img", &["convert", "-f", "raw", "-O", "raw", &srv.url("cow"), copy.to_str().unwrap()]);
    assert!(out.status.success(), "{}", stdout_of(&out));
    let mut expect = base_data.clone();
    expect[100..1100].fill(0x11);
    expect[8192..16384].fill(0x22);
    expect[65536..65536 + 12288].fill(0);
    expect[MIB..MIB + 4096].fill(0);
    expect[2097000..2098000].fill(0x33);
    assert_same(&std::fs::read(&copy).unwrap(), &expect, "cow content");
    assert_same(&std::fs::read(&base_path).unwrap(), &base_data, "base file");
    assert!(overlay.exists());
    drop(srv);
    exports.remove("cow");
    drop(cow);
    assert!(!overlay.exists(), "overlay not removed on drop");
}

#[test]
fn pipelined_overlapping_writes_apply_in_request_order() {
    let dir = tempfile::tempdir().unwrap();
    let img = filled_file(dir.path(), "o.img", MIB, 0);
    let exports = Exports::new();
    file_export(&exports, "o", &img, false);
    let srv = start_tcp(exports);
    let mut c = RawClient::connect(srv.port);
    assert_eq!(c.go("o").last().unwrap().1, REP_ACK);
    // 300 overlapping writes sent back-to-back without waiting for replies,
    // mixed with zeroing and trims; the last request touching a byte must win.
    let mut model = vec![0u8; MIB];
    let mut batch = Vec::new();
    let mut rng = rand::thread_rng();
    for i in 0..300u64 {
        let off = rand::Rng::gen_range(&mut rng, 0..64u64) * 512;
        let len = rand::Rng::gen_range(&mut rng, 1..32u32) * 512;
        let kind = i % 10;
        let cmd = match kind {
            8 => CMD_WRITE_ZEROES,
            9 => CMD_TRIM,
            _ => CMD_WRITE,
        };
        batch.extend_from_slice(&encode_request(0, cmd, i, off, len));
        let range = off as usize..off as usize + len as usize;
        if cmd == CMD_WRITE {
            let byte = (i % 251 + 1) as u8;
            batch.extend(std::iter::repeat_n(byte, len as usize));
            model[range].fill(byte);
        } else {
            model[range].fill(0);
        }
    }
    c.s.write_all(&batch).unwrap();
    let mut seen = std::collections::HashSet::new();
    for _ in 0..300 {
        let (err, cookie) = c.simple_reply();
        assert_eq!(err, 0);
        assert!(seen.insert(cookie));
    }
    c.request(0, CMD_FLUSH, 1000, 0, 0, &[]);
    assert_eq!(c.simple_reply(), (0, 1000));
    c.request(0, CMD_DISC, 1001, 0, 0, &[]);
    assert!(c.is_closed());
    assert_same(&std::fs::read(&img).unwrap(), &model, "disk after pipelined writes");
}
