//! NBD wire format: constants, pure parsers and encoders.
//!
//! Everything in this module works on byte slices only (no I/O), so it can be
//! unit-tested and fuzzed directly (see `fuzz/fuzz_targets/nbd_request.rs`).
//! Parsers never panic and never allocate more than the input they are given.
//!
//! Size: the whole NBD wire format (constants, parsers, encoders) in one place, next to the spec it follows.

use thiserror::Error;

/// `NBDMAGIC`, first 8 bytes the server sends.
pub const NBD_MAGIC: u64 = 0x4e42_444d_4147_4943;
/// `IHAVEOPT`, newstyle magic (server greeting and every client option).
pub const IHAVEOPT: u64 = 0x4948_4156_454F_5054;
/// Magic of every option reply.
pub const OPT_REPLY_MAGIC: u64 = 0x0003_e889_0455_65a9;
/// Magic of every (compact) transmission request.
pub const REQUEST_MAGIC: u32 = 0x2560_9513;
/// Magic of simple replies.
pub const SIMPLE_REPLY_MAGIC: u32 = 0x6744_6698;
/// Magic of structured reply chunks.
pub const STRUCTURED_REPLY_MAGIC: u32 = 0x668e_33ef;

/// Handshake flags (server).
pub const FLAG_FIXED_NEWSTYLE: u16 = 1 << 0;
pub const FLAG_NO_ZEROES: u16 = 1 << 1;
/// Client flags.
pub const FLAG_C_FIXED_NEWSTYLE: u32 = 1 << 0;
pub const FLAG_C_NO_ZEROES: u32 = 1 << 1;

/// Transmission flags.
pub const TF_HAS_FLAGS: u16 = 1 << 0;
pub const TF_READ_ONLY: u16 = 1 << 1;
pub const TF_SEND_FLUSH: u16 = 1 << 2;
pub const TF_SEND_FUA: u16 = 1 << 3;
pub const TF_ROTATIONAL: u16 = 1 << 4;
pub const TF_SEND_TRIM: u16 = 1 << 5;
pub const TF_SEND_WRITE_ZEROES: u16 = 1 << 6;
pub const TF_SEND_DF: u16 = 1 << 7;
pub const TF_CAN_MULTI_CONN: u16 = 1 << 8;
pub const TF_SEND_RESIZE: u16 = 1 << 9;
pub const TF_SEND_CACHE: u16 = 1 << 10;
pub const TF_SEND_FAST_ZERO: u16 = 1 << 11;

/// Options.
pub const OPT_EXPORT_NAME: u32 = 1;
pub const OPT_ABORT: u32 = 2;
pub const OPT_LIST: u32 = 3;
pub const OPT_STARTTLS: u32 = 5;
pub const OPT_INFO: u32 = 6;
pub const OPT_GO: u32 = 7;
pub const OPT_STRUCTURED_REPLY: u32 = 8;
pub const OPT_LIST_META_CONTEXT: u32 = 9;
pub const OPT_SET_META_CONTEXT: u32 = 10;
pub const OPT_EXTENDED_HEADERS: u32 = 11;

/// Option reply types.
pub const REP_ACK: u32 = 1;
pub const REP_SERVER: u32 = 2;
pub const REP_INFO: u32 = 3;
pub const REP_META_CONTEXT: u32 = 4;
const REP_ERR: u32 = 1 << 31;
pub const REP_ERR_UNSUP: u32 = REP_ERR + 1;
pub const REP_ERR_POLICY: u32 = REP_ERR + 2;
pub const REP_ERR_INVALID: u32 = REP_ERR + 3;
pub const REP_ERR_PLATFORM: u32 = REP_ERR + 4;
pub const REP_ERR_TLS_REQD: u32 = REP_ERR + 5;
pub const REP_ERR_UNKNOWN: u32 = REP_ERR + 6;
pub const REP_ERR_SHUTDOWN: u32 = REP_ERR + 7;
pub const REP_ERR_BLOCK_SIZE_REQD: u32 = REP_ERR + 8;
pub const REP_ERR_TOO_BIG: u32 = REP_ERR + 9;

/// `NBD_INFO_*` types (in `NBD_REP_INFO` replies and INFO/GO requests).
pub const INFO_EXPORT: u16 = 0;
pub const INFO_NAME: u16 = 1;
pub const INFO_DESCRIPTION: u16 = 2;
pub const INFO_BLOCK_SIZE: u16 = 3;

/// Commands.
pub const CMD_READ: u16 = 0;
pub const CMD_WRITE: u16 = 1;
pub const CMD_DISC: u16 = 2;
pub const CMD_FLUSH: u16 = 3;
pub const CMD_TRIM: u16 = 4;
pub const CMD_CACHE: u16 = 5;
pub const CMD_WRITE_ZEROES: u16 = 6;
pub const CMD_BLOCK_STATUS: u16 = 7;

/// Command flags.
pub const CMD_FLAG_FUA: u16 = 1 << 0;
pub const CMD_FLAG_NO_HOLE: u16 = 1 << 1;
pub const CMD_FLAG_DF: u16 = 1 << 2;
pub const CMD_FLAG_REQ_ONE: u16 = 1 << 3;
pub const CMD_FLAG_FAST_ZERO: u16 = 1 << 4;

/// Structured reply flags and types.
pub const REPLY_FLAG_DONE: u16 = 1 << 0;
pub const REPLY_TYPE_NONE: u16 = 0;
pub const REPLY_TYPE_OFFSET_DATA: u16 = 1;
pub const REPLY_TYPE_OFFSET_HOLE: u16 = 2;
pub const REPLY_TYPE_BLOCK_STATUS: u16 = 5;
pub const REPLY_TYPE_ERROR: u16 = (1 << 15) + 1;
pub const REPLY_TYPE_ERROR_OFFSET: u16 = (1 << 15) + 2;

/// `base:allocation` status flags.
pub const STATE_HOLE: u32 = 1 << 0;
pub const STATE_ZERO: u32 = 1 << 1;

/// Error values on the wire.
pub const NBD_EPERM: u32 = 1;
pub const NBD_EIO: u32 = 5;
pub const NBD_ENOMEM: u32 = 12;
pub const NBD_EINVAL: u32 = 22;
pub const NBD_ENOSPC: u32 = 28;
pub const NBD_EOVERFLOW: u32 = 75;
pub const NBD_ENOTSUP: u32 = 95;
pub const NBD_ESHUTDOWN: u32 = 108;

/// The only metadata context this server knows.
pub const META_BASE_ALLOCATION: &str = "base:allocation";
/// Context id we hand out for `base:allocation`.
pub const META_BASE_ALLOCATION_ID: u32 = 1;

/// Block-size constraints advertised with `NBD_INFO_BLOCK_SIZE`.
pub const MIN_BLOCK_SIZE: u32 = 1;
pub const PREFERRED_BLOCK_SIZE: u32 = 4096;
/// Maximum payload of a READ/WRITE (32 MiB); larger requests are refused.
pub const MAX_PAYLOAD: u32 = 32 * 1024 * 1024;
/// Maximum option data length accepted during the handshake.
pub const MAX_OPTION_LEN: u32 = 64 * 1024;
/// Maximum string length (export names, queries) per the spec.
pub const MAX_STRING_LEN: usize = 4096;

/// Size of a request header on the wire.
pub const REQUEST_LEN: usize = 28;
/// Size of an option header on the wire.
pub const OPTION_HEADER_LEN: usize = 16;
/// Size of a simple reply header.
pub const SIMPLE_REPLY_LEN: usize = 16;
/// Size of a structured reply chunk header.
pub const STRUCTURED_REPLY_LEN: usize = 20;

/// Errors detected while parsing client messages.
#[derive(Debug, Clone, PartialEq, Eq, Error)]
pub enum ProtocolError {
    /// Request/option magic is wrong: the stream is out of sync; fatal.
    #[error("bad magic {got:#x} (expected {expected:#x})")]
    BadMagic { expected: u64, got: u64 },
    /// Unknown command type: reply `EINVAL` with this cookie and continue.
    #[error("unknown command {command} (cookie {cookie:#x})")]
    UnknownCommand { command: u16, cookie: u64 },
    /// Option data length above [`MAX_OPTION_LEN`]; fatal (we refuse to buffer it).
    #[error("option {option} data length {len} exceeds limit")]
    OptionTooLong { option: u32, len: u32 },
    /// Unknown client handshake flags; fatal per spec.
    #[error("unknown client flags {0:#x}")]
    UnknownClientFlags(u32),
    /// Option payload is malformed; reply `NBD_REP_ERR_INVALID`.
    #[error("malformed option data: {0}")]
    InvalidOptionData(&'static str),
}

impl ProtocolError {
    /// Whether the connection must be dropped (stream can't be resynchronised).
    pub fn is_fatal(&self) -> bool {
        !matches!(self, ProtocolError::UnknownCommand { .. } | ProtocolError::InvalidOptionData(_))
    }
}

fn be_u16(b: &[u8], at: usize) -> Option<u16> {
    let s = b.get(at..at.checked_add(2)?)?;
    Some(u16::from_be_bytes([s[0], s[1]]))
}

fn be_u32(b: &[u8], at: usize) -> Option<u32> {
    let s = b.get(at..at.checked_add(4)?)?;
    Some(u32::from_be_bytes([s[0], s[1], s[2], s[3]]))
}

fn be_u64(b: &[u8], at: usize) -> Option<u64> {
    let s = b.get(at..at.checked_add(8)?)?;
    let mut a = [0u8; 8];
    a.copy_from_slice(s);
    Some(u64::from_be_bytes(a))
}

/// Transmission-phase command.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Command {
    Read,
    Write,
    Disc,
    Flush,
    Trim,
    Cache,
    WriteZeroes,
    BlockStatus,
}

impl Command {
    fn from_wire(v: u16) -> Option<Command> {
        Some(match v {
            CMD_READ => Command::Read,
            CMD_WRITE => Command::Write,
            CMD_DISC => Command::Disc,
            CMD_FLUSH => Command::Flush,
            CMD_TRIM => Command::Trim,
            CMD_CACHE => Command::Cache,
            CMD_WRITE_ZEROES => Command::WriteZeroes,
            CMD_BLOCK_STATUS => Command::BlockStatus,
            _ => return None,
        })
    }

    /// Flags that are meaningful for this command.
    pub fn allowed_flags(self) -> u16 {
        // FUA is accepted on every command (spec: clients are known to set it anywhere).
        CMD_FLAG_FUA
            | match self {
                Command::Read => CMD_FLAG_DF,
                Command::WriteZeroes => CMD_FLAG_NO_HOLE,
                Command::BlockStatus => CMD_FLAG_REQ_ONE,
                _ => 0,
            }
    }

    /// Commands that modify the export; they run in request order.
    pub fn is_write_type(self) -> bool {
        matches!(self, Command::Write | Command::WriteZeroes | Command::Trim)
    }
}

/// A parsed request header (payload of WRITE follows on the wire).
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct Request {
    pub flags: u16,
    pub command: Command,
    pub cookie: u64,
    pub offset: u64,
    pub length: u32,
}

/// Parse a 28-byte request header. Only checks framing (magic) and command
/// type; use [`validate_request`] for the semantic checks.
pub fn parse_request(buf: &[u8; REQUEST_LEN]) -> Result<Request, ProtocolError> {
    let magic = u32::from_be_bytes([buf[0], buf[1], buf[2], buf[3]]);
    if magic != REQUEST_MAGIC {
        return Err(ProtocolError::BadMagic { expected: REQUEST_MAGIC as u64, got: magic as u64 });
    }
    let flags = u16::from_be_bytes([buf[4], buf[5]]);
    let typ = u16::from_be_bytes([buf[6], buf[7]]);
    let mut c = [0u8; 8];
    c.copy_from_slice(&buf[8..16]);
    let cookie = u64::from_be_bytes(c);
    c.copy_from_slice(&buf[16..24]);
    let offset = u64::from_be_bytes(c);
    let length = u32::from_be_bytes([buf[24], buf[25], buf[26], buf[27]]);
    let command = Command::from_wire(typ).ok_or(ProtocolError::UnknownCommand { command: typ, cookie })?;
    Ok(Request { flags, command, cookie, offset, length })
}

/// Encode a request header (used by tests and the fuzzer).
pub fn encode_request(flags: u16, command: u16, cookie: u64, offset: u64, length: u32) -> [u8; 28] {
    let mut b = [0u8; 28];
    b[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&flags.to_be_bytes());
    b[6..8].copy_from_slice(&command.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b[16..24].copy_from_slice(&offset.to_be_bytes());
    b[24..28].copy_from_slice(&length.to_be_bytes());
    b
}

/// What the connection negotiated, needed to validate requests.
#[derive(Debug, Clone, Copy)]
pub struct RequestContext {
    pub export_size: u64,
    pub read_only: bool,
    pub structured: bool,
    pub block_status: bool,
}

/// Outcome of validating a request that cannot be executed.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Rejection {
    /// Reply with this NBD error (after consuming any WRITE payload).
    Error(u32),
    /// WRITE payload too large to consume safely: drop the connection.
    Fatal,
}

/// Semantic validation of a request against the negotiated state.
pub fn validate_request(req: &Request, ctx: &RequestContext) -> Result<(), Rejection> {
    let cmd = req.command;
    if cmd == Command::Write && req.length > MAX_PAYLOAD {
        return Err(Rejection::Fatal);
    }
    let mut allowed = cmd.allowed_flags();
    if !ctx.structured {
        allowed &= !CMD_FLAG_DF;
    }
    if req.flags & !allowed != 0 {
        return Err(Rejection::Error(NBD_EINVAL));
    }
    match cmd {
        Command::Disc | Command::Flush => return Ok(()),
        Command::BlockStatus if !ctx.block_status => return Err(Rejection::Error(NBD_EINVAL)),
        Command::BlockStatus if req.length == 0 => return Err(Rejection::Error(NBD_EINVAL)),
        _ => {}
    }
    if cmd == Command::Read && req.length > MAX_PAYLOAD {
        return Err(Rejection::Error(NBD_EOVERFLOW));
    }
    let in_range = req.offset.checked_add(req.length as u64).is_some_and(|end| end <= ctx.export_size);
    if !in_range {
        return Err(Rejection::Error(if cmd.is_write_type() { NBD_ENOSPC } else { NBD_EINVAL }));
    }
    if cmd.is_write_type() && ctx.read_only {
        return Err(Rejection::Error(NBD_EPERM));
    }
    Ok(())
}

/// Parse the 4 client flag bytes sent after the greeting.
pub fn parse_client_flags(buf: &[u8; 4]) -> Result<u32, ProtocolError> {
    let flags = u32::from_be_bytes(*buf);
    if flags & !(FLAG_C_FIXED_NEWSTYLE | FLAG_C_NO_ZEROES) != 0 {
        return Err(ProtocolError::UnknownClientFlags(flags));
    }
    Ok(flags)
}

/// Option header: `IHAVEOPT`, option, data length.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub struct OptionHeader {
    pub option: u32,
    pub len: u32,
}

/// Parse a 16-byte option header; rejects lengths above [`MAX_OPTION_LEN`].
pub fn parse_option_header(buf: &[u8; OPTION_HEADER_LEN]) -> Result<OptionHeader, ProtocolError> {
    let mut m = [0u8; 8];
    m.copy_from_slice(&buf[0..8]);
    let magic = u64::from_be_bytes(m);
    if magic != IHAVEOPT {
        return Err(ProtocolError::BadMagic { expected: IHAVEOPT, got: magic });
    }
    let option = u32::from_be_bytes([buf[8], buf[9], buf[10], buf[11]]);
    let len = u32::from_be_bytes([buf[12], buf[13], buf[14], buf[15]]);
    if len > MAX_OPTION_LEN {
        return Err(ProtocolError::OptionTooLong { option, len });
    }
    Ok(OptionHeader { option, len })
}

/// Payload of `NBD_OPT_INFO` / `NBD_OPT_GO`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct InfoRequest {
    pub name: String,
    pub requests: Vec<u16>,
}

/// Payload of `NBD_OPT_LIST_META_CONTEXT` / `NBD_OPT_SET_META_CONTEXT`.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct MetaContextRequest {
    pub export: String,
    pub queries: Vec<String>,
}

/// A parsed client option.
#[derive(Debug, Clone, PartialEq, Eq)]
pub enum ClientOption {
    ExportName(String),
    Abort,
    List,
    StartTls,
    Info(InfoRequest),
    Go(InfoRequest),
    StructuredReply,
    ListMetaContext(MetaContextRequest),
    SetMetaContext(MetaContextRequest),
    /// Anything else (including `NBD_OPT_EXTENDED_HEADERS`): `NBD_REP_ERR_UNSUP`.
    Unknown(u32),
}

fn parse_string(b: &[u8]) -> Result<String, ProtocolError> {
    if b.len() > MAX_STRING_LEN {
        return Err(ProtocolError::InvalidOptionData("string too long"));
    }
    if b.contains(&0) {
        return Err(ProtocolError::InvalidOptionData("string contains NUL"));
    }
    std::str::from_utf8(b).map(str::to_owned).map_err(|_| ProtocolError::InvalidOptionData("string is not UTF-8"))
}

/// Read a `u32 length + bytes` string at `*pos`, advancing it.
fn take_lstring(data: &[u8], pos: &mut usize) -> Result<String, ProtocolError> {
    let len = be_u32(data, *pos).ok_or(ProtocolError::InvalidOptionData("truncated length"))?;
    *pos += 4;
    let len = len as usize;
    let end = pos
        .checked_add(len)
        .filter(|&e| e <= data.len())
        .ok_or(ProtocolError::InvalidOptionData("string exceeds option data"))?;
    let s = parse_string(&data[*pos..end])?;
    *pos = end;
    Ok(s)
}

fn parse_info_request(data: &[u8]) -> Result<InfoRequest, ProtocolError> {
    let mut pos = 0;
    let name = take_lstring(data, &mut pos)?;
    let n = be_u16(data, pos).ok_or(ProtocolError::InvalidOptionData("truncated info count"))?;
    pos += 2;
    let rest = &data[pos..];
    if rest.len() != n as usize * 2 {
        return Err(ProtocolError::InvalidOptionData("info request count mismatch"));
    }
    let requests = rest.chunks_exact(2).map(|c| u16::from_be_bytes([c[0], c[1]])).collect();
    Ok(InfoRequest { name, requests })
}

fn parse_meta_request(data: &[u8]) -> Result<MetaContextRequest, ProtocolError> {
    let mut pos = 0;
    let export = take_lstring(data, &mut pos)?;
    let n = be_u32(data, pos).ok_or(ProtocolError::InvalidOptionData("truncated query count"))?;
    pos += 4;
    // Each query needs at least 4 bytes, which bounds the allocation by the input size.
    if n as usize > (data.len() - pos) / 4 {
        return Err(ProtocolError::InvalidOptionData("query count exceeds option data"));
    }
    let mut queries = Vec::with_capacity(n as usize);
    for _ in 0..n {
        queries.push(take_lstring(data, &mut pos)?);
    }
    if pos != data.len() {
        return Err(ProtocolError::InvalidOptionData("trailing bytes after queries"));
    }
    Ok(MetaContextRequest { export, queries })
}

fn expect_empty(data: &[u8], what: ClientOption) -> Result<ClientOption, ProtocolError> {
    if data.is_empty() {
        Ok(what)
    } else {
        Err(ProtocolError::InvalidOptionData("option takes no data"))
    }
}

/// Parse an option's payload. `InvalidOptionData` errors should be answered
/// with `NBD_REP_ERR_INVALID` (or, for `NBD_OPT_EXPORT_NAME`, by closing).
pub fn parse_option(option: u32, data: &[u8]) -> Result<ClientOption, ProtocolError> {
    match option {
        OPT_EXPORT_NAME => Ok(ClientOption::ExportName(parse_string(data)?)),
        OPT_ABORT => Ok(ClientOption::Abort), // data is ignored for ABORT
        OPT_LIST => expect_empty(data, ClientOption::List),
        OPT_STARTTLS => expect_empty(data, ClientOption::StartTls),
        OPT_INFO => Ok(ClientOption::Info(parse_info_request(data)?)),
        OPT_GO => Ok(ClientOption::Go(parse_info_request(data)?)),
        OPT_STRUCTURED_REPLY => expect_empty(data, ClientOption::StructuredReply),
        OPT_LIST_META_CONTEXT => Ok(ClientOption::ListMetaContext(parse_meta_request(data)?)),
        OPT_SET_META_CONTEXT => Ok(ClientOption::SetMetaContext(parse_meta_request(data)?)),
        other => Ok(ClientOption::Unknown(other)),
    }
}

/// Encode an option reply header + payload.
pub fn encode_option_reply(option: u32, reply_type: u32, payload: &[u8]) -> Vec<u8> {
    let mut v = Vec::with_capacity(20 + payload.len());
    v.extend_from_slice(&OPT_REPLY_MAGIC.to_be_bytes());
    v.extend_from_slice(&option.to_be_bytes());
    v.extend_from_slice(&reply_type.to_be_bytes());
    v.extend_from_slice(&(payload.len() as u32).to_be_bytes());
    v.extend_from_slice(payload);
    v
}

/// Encode a simple reply header.
pub fn encode_simple_reply(error: u32, cookie: u64) -> [u8; SIMPLE_REPLY_LEN] {
    let mut b = [0u8; SIMPLE_REPLY_LEN];
    b[0..4].copy_from_slice(&SIMPLE_REPLY_MAGIC.to_be_bytes());
    b[4..8].copy_from_slice(&error.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b
}

/// Encode a structured reply chunk header.
pub fn encode_structured_header(flags: u16, typ: u16, cookie: u64, length: u32) -> [u8; STRUCTURED_REPLY_LEN] {
    let mut b = [0u8; STRUCTURED_REPLY_LEN];
    b[0..4].copy_from_slice(&STRUCTURED_REPLY_MAGIC.to_be_bytes());
    b[4..6].copy_from_slice(&flags.to_be_bytes());
    b[6..8].copy_from_slice(&typ.to_be_bytes());
    b[8..16].copy_from_slice(&cookie.to_be_bytes());
    b[16..20].copy_from_slice(&length.to_be_bytes());
    b
}

/// Encode a complete structured `NBD_REPLY_TYPE_ERROR` chunk (with DONE).
pub fn encode_structured_error(cookie: u64, error: u32, message: &str) -> Vec<u8> {
    // Keep messages short and on a char boundary.
    let mut end = message.len().min(512);
    while !message.is_char_boundary(end) {
        end -= 1;
    }
    let msg = &message.as_bytes()[..end];
    let mut v = Vec::with_capacity(STRUCTURED_REPLY_LEN + 6 + msg.len());
    v.extend_from_slice(&encode_structured_header(REPLY_FLAG_DONE, REPLY_TYPE_ERROR, cookie, (6 + msg.len()) as u32));
    v.extend_from_slice(&error.to_be_bytes());
    v.extend_from_slice(&(msg.len() as u16).to_be_bytes());
    v.extend_from_slice(msg);
    v
}

/// Parse a structured reply chunk header (client side; used by tests).
pub fn parse_structured_header(b: &[u8]) -> Option<(u16, u16, u64, u32)> {
    if be_u32(b, 0)? != STRUCTURED_REPLY_MAGIC {
        return None;
    }
    Some((be_u16(b, 4)?, be_u16(b, 6)?, be_u64(b, 8)?, be_u32(b, 16)?))
}

/// Fuzzing entry point: feeds arbitrary bytes to every wire parser (used by
/// the `nbd_request` cargo-fuzz target and by a randomized unit test). Must
/// never panic.
#[doc(hidden)]
pub fn fuzz_parsers(data: &[u8]) {
    if let Some(hdr) = data.get(..REQUEST_LEN).and_then(|b| <&[u8; REQUEST_LEN]>::try_from(b).ok()) {
        if let Ok(req) = parse_request(hdr) {
            for (size, ro, st, bs) in
                [(0, false, false, false), (1 << 30, true, true, true), (u64::MAX, false, true, false)]
            {
                let ctx = RequestContext { export_size: size, read_only: ro, structured: st, block_status: bs };
                let _ = validate_request(&req, &ctx);
            }
        }
    }
    if let Some(hdr) = data.get(..OPTION_HEADER_LEN).and_then(|b| <&[u8; OPTION_HEADER_LEN]>::try_from(b).ok()) {
        let _ = parse_option_header(hdr);
    }
    if let Some(f) = data.get(..4).and_then(|b| <&[u8; 4]>::try_from(b).ok()) {
        let _ = parse_client_flags(f);
    }
    // Option payloads: the first byte picks the option, the rest is its data.
    if let Some((&sel, rest)) = data.split_first() {
        let _ = parse_option(u32::from(sel % 13), rest);
    }
    for opt in [OPT_GO, OPT_INFO, OPT_SET_META_CONTEXT, OPT_LIST_META_CONTEXT, OPT_EXPORT_NAME] {
        let _ = parse_option(opt, data);
    }
    let _ = parse_structured_header(data);
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ctx() -> RequestContext {
        RequestContext { export_size: 1 << 20, read_only: false, structured: true, block_status: true }
    }

    #[test]
    fn request_roundtrip() {
        let b = encode_request(CMD_FLAG_FUA, CMD_WRITE, 77, 4096, 512);
        let r = parse_request(&b).expect("valid");
        assert_eq!(r.command, Command::Write);
        assert_eq!(r.flags, CMD_FLAG_FUA);
        assert_eq!(r.cookie, 77);
        assert_eq!(r.offset, 4096);
        assert_eq!(r.length, 512);
        assert_eq!(validate_request(&r, &ctx()), Ok(()));
    }

    #[test]
    fn bad_magic_is_fatal() {
        let mut b = encode_request(0, CMD_READ, 1, 0, 512);
        b[0] = 0xff;
        let e = parse_request(&b).unwrap_err();
        assert!(matches!(e, ProtocolError::BadMagic { .. }));
        assert!(e.is_fatal());
    }

    #[test]
    fn unknown_command_keeps_cookie() {
        let b = encode_request(0, 42, 0xdead, 0, 0);
        let e = parse_request(&b).unwrap_err();
        assert_eq!(e, ProtocolError::UnknownCommand { command: 42, cookie: 0xdead });
        assert!(!e.is_fatal());
    }

    #[test]
    fn oversized_requests() {
        let w = parse_request(&encode_request(0, CMD_WRITE, 1, 0, MAX_PAYLOAD + 1)).expect("p");
        assert_eq!(validate_request(&w, &ctx()), Err(Rejection::Fatal));
        let mut big = ctx();
        big.export_size = u64::MAX;
        let r = parse_request(&encode_request(0, CMD_READ, 1, 0, MAX_PAYLOAD + 1)).expect("p");
        assert_eq!(validate_request(&r, &big), Err(Rejection::Error(NBD_EOVERFLOW)));
        // Trim/zero of large ranges is fine (no payload).
        let t = parse_request(&encode_request(0, CMD_TRIM, 1, 0, u32::MAX)).expect("p");
        assert_eq!(validate_request(&t, &big), Ok(()));
    }

    #[test]
    fn out_of_range() {
        let c = ctx();
        let r = parse_request(&encode_request(0, CMD_READ, 1, (1 << 20) - 1, 2)).expect("p");
        assert_eq!(validate_request(&r, &c), Err(Rejection::Error(NBD_EINVAL)));
        let w = parse_request(&encode_request(0, CMD_WRITE, 1, 1 << 20, 1)).expect("p");
        assert_eq!(validate_request(&w, &c), Err(Rejection::Error(NBD_ENOSPC)));
        let o = parse_request(&encode_request(0, CMD_READ, 1, u64::MAX, 2)).expect("p");
        assert_eq!(validate_request(&o, &c), Err(Rejection::Error(NBD_EINVAL)));
        let mut ro = c;
        ro.read_only = true;
        let w = parse_request(&encode_request(0, CMD_WRITE, 1, 0, 1)).expect("p");
        assert_eq!(validate_request(&w, &ro), Err(Rejection::Error(NBD_EPERM)));
    }

    #[test]
    fn bad_flags_and_block_status() {
        let c = ctx();
        let r = parse_request(&encode_request(CMD_FLAG_NO_HOLE, CMD_READ, 1, 0, 1)).expect("p");
        assert_eq!(validate_request(&r, &c), Err(Rejection::Error(NBD_EINVAL)));
        let r = parse_request(&encode_request(0x8000, CMD_FLUSH, 1, 0, 0)).expect("p");
        assert_eq!(validate_request(&r, &c), Err(Rejection::Error(NBD_EINVAL)));
        let bs = parse_request(&encode_request(CMD_FLAG_REQ_ONE, CMD_BLOCK_STATUS, 1, 0, 0)).expect("p");
        assert_eq!(validate_request(&bs, &c), Err(Rejection::Error(NBD_EINVAL)));
        let bs = parse_request(&encode_request(0, CMD_BLOCK_STATUS, 1, 0, 10)).expect("p");
        let mut no_meta = c;
        no_meta.block_status = false;
        assert_eq!(validate_request(&bs, &no_meta), Err(Rejection::Error(NBD_EINVAL)));
        assert_eq!(validate_request(&bs, &c), Ok(()));
    }

    #[test]
    fn option_header_limits() {
        let mut b = [0u8; 16];
        b[0..8].copy_from_slice(&IHAVEOPT.to_be_bytes());
        b[8..12].copy_from_slice(&OPT_GO.to_be_bytes());
        b[12..16].copy_from_slice(&(MAX_OPTION_LEN + 1).to_be_bytes());
        assert!(matches!(parse_option_header(&b), Err(ProtocolError::OptionTooLong { .. })));
        b[12..16].copy_from_slice(&0u32.to_be_bytes());
        assert_eq!(parse_option_header(&b), Ok(OptionHeader { option: OPT_GO, len: 0 }));
        b[0] = 0;
        assert!(matches!(parse_option_header(&b), Err(ProtocolError::BadMagic { .. })));
    }

    #[test]
    fn option_payloads() {
        // Zero-length GO data is malformed (needs name length + count).
        assert!(matches!(parse_option(OPT_GO, &[]), Err(ProtocolError::InvalidOptionData(_))));
        // Zero-length EXPORT_NAME is the default export.
        assert_eq!(parse_option(OPT_EXPORT_NAME, &[]), Ok(ClientOption::ExportName(String::new())));
        assert_eq!(parse_option(OPT_LIST, &[]), Ok(ClientOption::List));
        assert!(parse_option(OPT_LIST, &[1]).is_err());
        assert!(parse_option(OPT_STRUCTURED_REPLY, &[0]).is_err());
        assert_eq!(parse_option(OPT_EXTENDED_HEADERS, &[]), Ok(ClientOption::Unknown(11)));

        let mut go = Vec::new();
        go.extend_from_slice(&5u32.to_be_bytes());
        go.extend_from_slice(b"disk0");
        go.extend_from_slice(&2u16.to_be_bytes());
        go.extend_from_slice(&INFO_BLOCK_SIZE.to_be_bytes());
        go.extend_from_slice(&INFO_NAME.to_be_bytes());
        assert_eq!(
            parse_option(OPT_GO, &go),
            Ok(ClientOption::Go(InfoRequest { name: "disk0".into(), requests: vec![INFO_BLOCK_SIZE, INFO_NAME] }))
        );
        // Name length pointing past the end.
        let mut bad = go.clone();
        bad[0..4].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(parse_option(OPT_GO, &bad).is_err());
        // Count mismatch.
        let mut bad = go.clone();
        bad.push(0);
        assert!(parse_option(OPT_INFO, &bad).is_err());

        let mut meta = Vec::new();
        meta.extend_from_slice(&0u32.to_be_bytes());
        meta.extend_from_slice(&1u32.to_be_bytes());
        meta.extend_from_slice(&15u32.to_be_bytes());
        meta.extend_from_slice(b"base:allocation");
        assert_eq!(
            parse_option(OPT_SET_META_CONTEXT, &meta),
            Ok(ClientOption::SetMetaContext(MetaContextRequest {
                export: String::new(),
                queries: vec!["base:allocation".into()]
            }))
        );
        // Absurd query count must not allocate.
        let mut bad = meta.clone();
        bad[4..8].copy_from_slice(&u32::MAX.to_be_bytes());
        assert!(parse_option(OPT_LIST_META_CONTEXT, &bad).is_err());
        // Non-UTF-8 name.
        assert!(parse_option(OPT_EXPORT_NAME, &[0xff, 0xfe]).is_err());
    }

    #[test]
    fn random_inputs_never_panic() {
        // Cheap stand-in for the cargo-fuzz target: random and mutated-valid inputs.
        let mut state = 0x9e37_79b9_7f4a_7c15u64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let valid = encode_request(CMD_FLAG_FUA, CMD_WRITE, 1, 4096, 512);
        for i in 0..20_000 {
            let len = (next() % 96) as usize;
            let mut buf: Vec<u8> = (0..len).map(|_| next() as u8).collect();
            if i % 2 == 0 && buf.len() >= 28 {
                buf[..28].copy_from_slice(&valid);
                let at = (next() % 28) as usize;
                buf[at] = next() as u8;
            }
            fuzz_parsers(&buf);
        }
    }

    #[test]
    fn client_flags() {
        assert_eq!(parse_client_flags(&[0, 0, 0, 3]), Ok(3));
        assert!(parse_client_flags(&[0, 0, 0, 4]).is_err());
    }
}
