#![no_main]
//! Feed arbitrary bytes to the replication frame decoder: it must return frames or errors, never
//! panic, and never allocate more than the frame limit.
use libfuzzer_sys::fuzz_target;
use tokio_util::codec::Decoder;

fuzz_target!(|data: &[u8]| {
    let mut codec = ferry_protocol::FrameCodec::default();
    let mut buf = bytes::BytesMut::from(data);
    while let Ok(Some(_)) = codec.decode(&mut buf) {}
});
