use bytes::{Buf, BufMut, BytesMut};
use tokio_util::codec::{Decoder, Encoder};

use crate::Message;

pub const FRAME_MAGIC: u32 = u32::from_be_bytes(*b"FRY1");
pub const PROTOCOL_VERSION: u8 = 2;
pub const FRAME_HEADER_LEN: usize = 16;
/// Largest payload accepted, compressed or not (a batch of records; writes are ≤ 32 MiB each).
pub const MAX_FRAME_LEN: usize = 64 << 20;
const FLAG_LZ4: u8 = 1;

#[derive(Debug, thiserror::Error)]
pub enum ProtocolError {
    #[error("bad frame magic {0:#010x}: the peer is not speaking Ferry's replication protocol")]
    BadMagic(u32),
    #[error("unsupported protocol version {0} (this build speaks {PROTOCOL_VERSION}): upgrade the older component")]
    UnsupportedVersion(u8),
    #[error("frame of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge { len: usize, max: usize },
    #[error("frame checksum mismatch (expected {expected:#010x}, got {actual:#010x}): data corrupted in transit")]
    Checksum { expected: u32, actual: u32 },
    #[error("unknown frame flags {0:#04x}")]
    UnknownFlags(u8),
    #[error("cannot decode message: {0}")]
    Decode(#[from] postcard::Error),
    #[error("cannot decompress frame: {0}")]
    Decompress(String),
    #[error("i/o error: {0}")]
    Io(#[from] std::io::Error),
}

/// Length-framed, checksummed, versioned codec for [`Message`]s.
#[derive(Debug, Clone)]
pub struct FrameCodec {
    /// Compress outgoing `Records` frames with lz4 (the process server → master target hop).
    pub compress: bool,
    pub max_frame_len: usize,
}

impl Default for FrameCodec {
    fn default() -> Self {
        FrameCodec { compress: false, max_frame_len: MAX_FRAME_LEN }
    }
}

impl FrameCodec {
    pub fn compressed() -> Self {
        FrameCodec { compress: true, ..Default::default() }
    }

    /// Decode one complete frame from `buf` (header + payload), for tests and fuzzing.
    pub fn decode_frame(&self, header: &[u8; FRAME_HEADER_LEN], payload: &[u8]) -> Result<Message, ProtocolError> {
        let h = parse_header(header, self.max_frame_len)?;
        if payload.len() != h.len {
            return Err(ProtocolError::Decompress(format!(
                "payload is {} bytes, header says {}",
                payload.len(),
                h.len
            )));
        }
        decode_payload(&h, payload, self.max_frame_len)
    }
}

struct Header {
    flags: u8,
    len: usize,
    crc: u32,
}

fn parse_header(b: &[u8; FRAME_HEADER_LEN], max: usize) -> Result<Header, ProtocolError> {
    let magic = u32::from_be_bytes([b[0], b[1], b[2], b[3]]);
    if magic != FRAME_MAGIC {
        return Err(ProtocolError::BadMagic(magic));
    }
    if b[4] != PROTOCOL_VERSION {
        return Err(ProtocolError::UnsupportedVersion(b[4]));
    }
    let flags = b[5];
    if flags & !FLAG_LZ4 != 0 {
        return Err(ProtocolError::UnknownFlags(flags));
    }
    let len = u32::from_be_bytes([b[8], b[9], b[10], b[11]]) as usize;
    if len > max {
        return Err(ProtocolError::TooLarge { len, max });
    }
    let crc = u32::from_be_bytes([b[12], b[13], b[14], b[15]]);
    Ok(Header { flags, len, crc })
}

fn decode_payload(h: &Header, payload: &[u8], max: usize) -> Result<Message, ProtocolError> {
    let actual = crc32c::crc32c(payload);
    if actual != h.crc {
        return Err(ProtocolError::Checksum { expected: h.crc, actual });
    }
    if h.flags & FLAG_LZ4 != 0 {
        if payload.len() < 4 {
            return Err(ProtocolError::Decompress("compressed payload shorter than its length prefix".into()));
        }
        let raw_len = u32::from_le_bytes([payload[0], payload[1], payload[2], payload[3]]) as usize;
        if raw_len > max {
            return Err(ProtocolError::TooLarge { len: raw_len, max });
        }
        let raw = lz4_flex::block::decompress(&payload[4..], raw_len)
            .map_err(|e| ProtocolError::Decompress(e.to_string()))?;
        Ok(postcard::from_bytes(&raw)?)
    } else {
        Ok(postcard::from_bytes(payload)?)
    }
}

/// Cheap guess whether lz4 will pay off: compress a 16 KiB sample from the middle.
fn compressible(raw: &[u8]) -> bool {
    const SAMPLE: usize = 16 << 10;
    if raw.len() <= 4 * SAMPLE {
        return true;
    }
    let start = raw.len() / 2;
    let sample = &raw[start..start + SAMPLE];
    lz4_flex::block::compress(sample).len() < SAMPLE * 9 / 10
}

impl Decoder for FrameCodec {
    type Item = Message;
    type Error = ProtocolError;

    fn decode(&mut self, src: &mut BytesMut) -> Result<Option<Message>, ProtocolError> {
        if src.len() < FRAME_HEADER_LEN {
            return Ok(None);
        }
        let mut hb = [0u8; FRAME_HEADER_LEN];
        hb.copy_from_slice(&src[..FRAME_HEADER_LEN]);
        let h = parse_header(&hb, self.max_frame_len)?;
        if src.len() < FRAME_HEADER_LEN + h.len {
            src.reserve(FRAME_HEADER_LEN + h.len - src.len());
            return Ok(None);
        }
        src.advance(FRAME_HEADER_LEN);
        let payload = src.split_to(h.len);
        decode_payload(&h, &payload, self.max_frame_len).map(Some)
    }
}

impl Encoder<Message> for FrameCodec {
    type Error = ProtocolError;

    fn encode(&mut self, msg: Message, dst: &mut BytesMut) -> Result<(), ProtocolError> {
        encode_into(self, &msg, dst)
    }
}

impl Encoder<&Message> for FrameCodec {
    type Error = ProtocolError;

    fn encode(&mut self, msg: &Message, dst: &mut BytesMut) -> Result<(), ProtocolError> {
        encode_into(self, msg, dst)
    }
}

fn encode_into(codec: &FrameCodec, msg: &Message, dst: &mut BytesMut) -> Result<(), ProtocolError> {
    let raw = postcard::to_allocvec(msg)?;
    let compress = codec.compress
        && matches!(msg, Message::Records(_) | Message::Bulk(_))
        && raw.len() > 256
        && compressible(&raw);
    let (flags, payload) = if compress {
        let mut out = Vec::with_capacity(4 + lz4_flex::block::get_maximum_output_size(raw.len()));
        out.extend_from_slice(&(raw.len() as u32).to_le_bytes());
        out.extend_from_slice(&lz4_flex::block::compress(&raw));
        // Incompressible after all: the raw form is cheaper for the receiver.
        if out.len() >= raw.len() {
            (0, raw)
        } else {
            (FLAG_LZ4, out)
        }
    } else {
        (0, raw)
    };
    if payload.len() > codec.max_frame_len {
        return Err(ProtocolError::TooLarge { len: payload.len(), max: codec.max_frame_len });
    }
    dst.reserve(FRAME_HEADER_LEN + payload.len());
    dst.put_u32(FRAME_MAGIC);
    dst.put_u8(PROTOCOL_VERSION);
    dst.put_u8(flags);
    dst.put_u16(0);
    dst.put_u32(payload.len() as u32);
    dst.put_u32(crc32c::crc32c(&payload));
    dst.put_slice(&payload);
    Ok(())
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::*;

    fn sample() -> Message {
        Message::Records(vec![
            Record {
                seq: crate::Seq(7),
                time_ms: 1,
                body: RecordBody::Write { disk: 0, offset: 4096, data: vec![0xab; 8192] },
            },
            Record { seq: crate::Seq(8), time_ms: 2, body: RecordBody::Zero { disk: 1, offset: 0, len: 1 << 20 } },
        ])
    }

    fn roundtrip(mut codec: FrameCodec) {
        let mut buf = BytesMut::new();
        codec.encode(sample(), &mut buf).unwrap();
        // Feed byte by byte: partial frames must wait, not fail.
        let mut rx = BytesMut::new();
        let mut got = None;
        for b in buf.iter() {
            rx.put_u8(*b);
            if let Some(m) = codec.decode(&mut rx).unwrap() {
                got = Some(m);
            }
        }
        assert_eq!(got, Some(sample()));
        assert!(rx.is_empty());
    }

    #[test]
    fn roundtrip_plain_and_compressed() {
        roundtrip(FrameCodec::default());
        roundtrip(FrameCodec::compressed());
    }

    fn encoded() -> BytesMut {
        let mut buf = BytesMut::new();
        FrameCodec::default().encode(sample(), &mut buf).unwrap();
        buf
    }

    #[test]
    fn bad_magic_is_rejected() {
        let mut buf = encoded();
        buf[0] = b'X';
        assert!(matches!(FrameCodec::default().decode(&mut buf), Err(ProtocolError::BadMagic(_))));
    }

    #[test]
    fn wrong_version_is_rejected() {
        let mut buf = encoded();
        buf[4] = 9;
        assert!(matches!(FrameCodec::default().decode(&mut buf), Err(ProtocolError::UnsupportedVersion(9))));
    }

    #[test]
    fn oversized_frame_is_rejected_before_buffering() {
        let mut buf = encoded();
        buf[8..12].copy_from_slice(&(u32::MAX).to_be_bytes());
        assert!(matches!(FrameCodec::default().decode(&mut buf), Err(ProtocolError::TooLarge { .. })));
    }

    #[test]
    fn corrupted_payload_fails_checksum() {
        let mut buf = encoded();
        let last = buf.len() - 1;
        buf[last] ^= 0xff;
        assert!(matches!(FrameCodec::default().decode(&mut buf), Err(ProtocolError::Checksum { .. })));
    }

    #[test]
    fn truncated_frame_waits() {
        let buf = encoded();
        let mut part = BytesMut::from(&buf[..buf.len() - 3]);
        assert!(FrameCodec::default().decode(&mut part).unwrap().is_none());
    }

    #[test]
    fn garbage_payload_with_valid_checksum_is_a_decode_error() {
        let payload = [0xffu8; 32];
        let mut buf = BytesMut::new();
        buf.put_u32(FRAME_MAGIC);
        buf.put_u8(PROTOCOL_VERSION);
        buf.put_u8(0);
        buf.put_u16(0);
        buf.put_u32(payload.len() as u32);
        buf.put_u32(crc32c::crc32c(&payload));
        buf.put_slice(&payload);
        assert!(matches!(FrameCodec::default().decode(&mut buf), Err(ProtocolError::Decode(_))));
    }

    #[test]
    fn compressed_length_bomb_is_rejected() {
        let mut payload = Vec::new();
        payload.extend_from_slice(&u32::MAX.to_le_bytes());
        payload.extend_from_slice(&[0u8; 8]);
        let mut buf = BytesMut::new();
        buf.put_u32(FRAME_MAGIC);
        buf.put_u8(PROTOCOL_VERSION);
        buf.put_u8(FLAG_LZ4);
        buf.put_u16(0);
        buf.put_u32(payload.len() as u32);
        buf.put_u32(crc32c::crc32c(&payload));
        buf.put_slice(&payload);
        assert!(matches!(FrameCodec::default().decode(&mut buf), Err(ProtocolError::TooLarge { .. })));
    }
}

#[cfg(test)]
mod robustness {
    use super::*;
    use crate::{Record, RecordBody};

    /// A tiny deterministic generator (no extra dependency): xorshift.
    fn next(state: &mut u64) -> u64 {
        *state ^= *state << 13;
        *state ^= *state >> 7;
        *state ^= *state << 17;
        *state
    }

    /// Random and mutated frames never panic the decoder (the fuzz target `frame_decoder` does the
    /// same with coverage guidance: `cargo fuzz run frame_decoder` in fuzz/).
    #[test]
    fn random_and_mutated_frames_never_panic() {
        let mut valid = BytesMut::new();
        let msg = Message::Records(vec![Record {
            seq: crate::Seq(1),
            time_ms: 2,
            body: RecordBody::Write { disk: 0, offset: 0, data: vec![1; 300] },
        }]);
        FrameCodec::compressed().encode(msg.clone(), &mut valid).unwrap();
        FrameCodec::default().encode(msg, &mut valid).unwrap();
        let mut s = 0x9e3779b97f4a7c15u64;
        for i in 0..20_000 {
            let mut buf = if i % 2 == 0 {
                let mut b = valid.clone();
                for _ in 0..(next(&mut s) % 8 + 1) {
                    let pos = (next(&mut s) as usize) % b.len();
                    b[pos] = next(&mut s) as u8;
                }
                // Fix the checksum half of the time so mutations reach the payload decoder.
                if next(&mut s).is_multiple_of(2) && b.len() > FRAME_HEADER_LEN {
                    let len = u32::from_be_bytes([b[8], b[9], b[10], b[11]]) as usize;
                    if FRAME_HEADER_LEN + len <= b.len() {
                        let crc = crc32c::crc32c(&b[FRAME_HEADER_LEN..FRAME_HEADER_LEN + len]);
                        b[12..16].copy_from_slice(&crc.to_be_bytes());
                    }
                }
                b
            } else {
                let n = (next(&mut s) % 200) as usize;
                BytesMut::from(&(0..n).map(|_| next(&mut s) as u8).collect::<Vec<_>>()[..])
            };
            let mut codec = FrameCodec::default();
            while let Ok(Some(_)) = codec.decode(&mut buf) {}
        }
    }
}
