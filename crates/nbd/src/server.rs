//! Connection handling: handshake (option haggling) and the transmission phase.
//!
//! Size: one connection's state machine (option haggling, then transmission), read top to bottom.

use std::io;
use std::sync::Arc;

use tokio::io::{AsyncRead, AsyncReadExt, AsyncWrite, AsyncWriteExt, BufReader, BufWriter};
use tokio::sync::{mpsc, OwnedSemaphorePermit, Semaphore};
use tokio_util::sync::CancellationToken;
use tracing::{debug, warn};

use crate::backend::{Backend, Extent};
use crate::proto::{self, ClientOption, Command, ProtocolError, Rejection, Request};
use crate::{CutSignal, Export, NbdError, ServerConfig};

trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}
type BoxIo = Box<dyn Io>;

/// Per-connection budget of in-flight request bytes (at least the largest request).
pub const CONNECTION_BUDGET: u32 = 32 * 1024 * 1024;
/// Minimum budget charged per request (bounds the number of requests in flight).
const MIN_REQUEST_COST: u32 = 4096;
/// Max options accepted during one negotiation (denial-of-service guard).
const MAX_OPTIONS: u32 = 4096;

/// Serve NBD on a TCP listener until `shutdown` is cancelled.
///
/// Each connection runs in its own task; errors of one connection are logged
/// and never stop the listener. On shutdown, open connections are aborted.
pub async fn serve_tcp(
    listener: tokio::net::TcpListener,
    config: Arc<ServerConfig>,
    shutdown: CancellationToken,
) -> io::Result<()> {
    let mut tasks = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            r = listener.accept() => match r {
                Ok((stream, peer)) => {
                    let Ok(slot) = config.limits.connections.clone().try_acquire_owned() else {
                        warn!(%peer, max = crate::Limits::MAX_CONNECTIONS, "too many NBD connections: closing this one");
                        continue;
                    };
                    if let Err(e) = stream.set_nodelay(true) {
                        debug!(%peer, error = %e, "set_nodelay failed");
                    }
                    let config = config.clone();
                    tasks.spawn(async move {
                        let _slot = slot;
                        debug!(%peer, "nbd connection accepted");
                        match handle_connection(stream, config).await {
                            Ok(()) => debug!(%peer, "nbd connection closed"),
                            Err(e) => warn!(%peer, error = %e, "nbd connection ended with error"),
                        }
                    });
                }
                Err(e) => accept_error(e).await,
            },
        }
    }
    tasks.abort_all();
    Ok(())
}

/// Serve NBD on a Unix socket listener until `shutdown` is cancelled.
pub async fn serve_unix(
    listener: tokio::net::UnixListener,
    config: Arc<ServerConfig>,
    shutdown: CancellationToken,
) -> io::Result<()> {
    let mut tasks = tokio::task::JoinSet::new();
    loop {
        tokio::select! {
            _ = shutdown.cancelled() => break,
            Some(_) = tasks.join_next(), if !tasks.is_empty() => {}
            r = listener.accept() => match r {
                Ok((stream, _)) => {
                    let Ok(slot) = config.limits.connections.clone().try_acquire_owned() else {
                        warn!(max = crate::Limits::MAX_CONNECTIONS, "too many NBD connections: closing this one");
                        continue;
                    };
                    let config = config.clone();
                    tasks.spawn(async move {
                        let _slot = slot;
                        match handle_connection(stream, config).await {
                            Ok(()) => debug!("nbd unix connection closed"),
                            Err(e) => warn!(error = %e, "nbd unix connection ended with error"),
                        }
                    });
                }
                Err(e) => accept_error(e).await,
            },
        }
    }
    tasks.abort_all();
    Ok(())
}

async fn accept_error(e: io::Error) {
    warn!(error = %e, "accept failed");
    // E.g. EMFILE: back off instead of spinning.
    tokio::time::sleep(std::time::Duration::from_millis(50)).await;
}

/// Handle one already-accepted connection: handshake, then transmission.
pub async fn handle_connection<S>(stream: S, config: Arc<ServerConfig>) -> Result<(), NbdError>
where
    S: AsyncRead + AsyncWrite + Unpin + Send + 'static,
{
    let limit = config.limits.negotiation_timeout;
    let shared = config.limits.inflight_bytes.clone();
    let (cut_tx, cut_rx) = tokio::sync::oneshot::channel::<CutSignal>();
    let neg = Negotiation {
        io: Box::new(stream),
        config,
        no_zeroes: false,
        tls_active: false,
        structured: false,
        meta: None,
        cut: Some(cut_tx),
    };
    let work = async {
        // A client that never finishes negotiating would hold its connection slot for good.
        let negotiated = tokio::time::timeout(limit, neg.run())
            .await
            .map_err(|_| NbdError::Io(io::Error::new(io::ErrorKind::TimedOut, "negotiation took too long")))??;
        match negotiated {
            Some(session) => transmission(session, shared).await,
            None => Ok(()),
        }
    };
    let cut = async {
        match cut_rx.await {
            Ok(signal) => signal.await,
            Err(_) => std::future::pending().await,
        }
    };
    tokio::select! {
        r = work => r,
        reason = cut => {
            warn!(%reason, "NBD connection cut");
            Err(NbdError::Cut(reason))
        }
    }
}

/// Result of a successful negotiation.
struct Session {
    io: BoxIo,
    export: Arc<Export>,
    structured: bool,
    block_status: bool,
}

struct Negotiation {
    io: BoxIo,
    config: Arc<ServerConfig>,
    no_zeroes: bool,
    tls_active: bool,
    structured: bool,
    /// (export name, base:allocation selected) from SET_META_CONTEXT.
    meta: Option<(String, bool)>,
    /// Where an accepted TLS client's cut signal goes (see `handle_connection`).
    cut: Option<tokio::sync::oneshot::Sender<CutSignal>>,
}

fn transmission_flags(backend: &dyn Backend, structured: bool) -> u16 {
    let mut f = proto::TF_HAS_FLAGS | proto::TF_SEND_FLUSH;
    if backend.read_only() {
        f |= proto::TF_READ_ONLY;
    } else {
        f |= proto::TF_SEND_FUA | proto::TF_SEND_TRIM | proto::TF_SEND_WRITE_ZEROES;
    }
    if structured {
        f |= proto::TF_SEND_DF;
    }
    if backend.can_multi_conn() {
        f |= proto::TF_CAN_MULTI_CONN;
    }
    f
}

impl Negotiation {
    async fn send(&mut self, buf: &[u8]) -> io::Result<()> {
        self.io.write_all(buf).await?;
        self.io.flush().await
    }

    async fn reply(&mut self, option: u32, typ: u32, payload: &[u8]) -> io::Result<()> {
        let buf = proto::encode_option_reply(option, typ, payload);
        self.send(&buf).await
    }

    async fn reply_err(&mut self, option: u32, typ: u32, msg: &str) -> io::Result<()> {
        debug!(option, reply = typ, msg, "option refused");
        self.reply(option, typ, msg.as_bytes()).await
    }

    async fn run(mut self) -> Result<Option<Session>, NbdError> {
        let mut greeting = [0u8; 18];
        greeting[0..8].copy_from_slice(&proto::NBD_MAGIC.to_be_bytes());
        greeting[8..16].copy_from_slice(&proto::IHAVEOPT.to_be_bytes());
        greeting[16..18].copy_from_slice(&(proto::FLAG_FIXED_NEWSTYLE | proto::FLAG_NO_ZEROES).to_be_bytes());
        self.send(&greeting).await?;
        let mut cf = [0u8; 4];
        self.io.read_exact(&mut cf).await?;
        let client_flags = proto::parse_client_flags(&cf).inspect_err(|e| {
            warn!(error = %e, "closing connection: bad client flags");
        })?;
        self.no_zeroes = client_flags & proto::FLAG_C_NO_ZEROES != 0;

        let mut count = 0u32;
        loop {
            let mut hdr = [0u8; proto::OPTION_HEADER_LEN];
            match self.io.read_exact(&mut hdr).await {
                Ok(_) => {}
                Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                    debug!("client closed during negotiation");
                    return Ok(None);
                }
                Err(e) => return Err(e.into()),
            }
            let h = proto::parse_option_header(&hdr).inspect_err(|e| {
                warn!(error = %e, "closing connection: bad option header");
            })?;
            count += 1;
            if count > MAX_OPTIONS {
                warn!("closing connection: too many options");
                return Err(NbdError::TooManyOptions);
            }
            let mut data = vec![0u8; h.len as usize]; // <= MAX_OPTION_LEN
            self.io.read_exact(&mut data).await?;

            if self.config.require_tls
                && !self.tls_active
                && h.option != proto::OPT_STARTTLS
                && h.option != proto::OPT_ABORT
            {
                if h.option == proto::OPT_EXPORT_NAME {
                    warn!("closing connection: EXPORT_NAME without required TLS");
                    return Err(NbdError::TlsRequired);
                }
                self.reply_err(h.option, proto::REP_ERR_TLS_REQD, "TLS is required").await?;
                continue;
            }

            let opt = match proto::parse_option(h.option, &data) {
                Ok(o) => o,
                Err(e) if h.option == proto::OPT_EXPORT_NAME => {
                    warn!(error = %e, "closing connection: malformed EXPORT_NAME");
                    return Err(e.into());
                }
                Err(e) => {
                    self.reply_err(h.option, proto::REP_ERR_INVALID, &e.to_string()).await?;
                    continue;
                }
            };
            match self.handle_option(h.option, opt).await? {
                Step::Continue => {}
                Step::Abort => return Ok(None),
                Step::Transmit(export) => {
                    let block_status = match &self.meta {
                        Some((name, selected)) => *selected && *name == export.name,
                        None => false,
                    };
                    return Ok(Some(Session { io: self.io, export, structured: self.structured, block_status }));
                }
            }
        }
    }

    async fn handle_option(&mut self, option: u32, opt: ClientOption) -> Result<Step, NbdError> {
        let exports = self.config.exports.clone();
        match opt {
            ClientOption::ExportName(name) => {
                let Some(export) = exports.get(&name) else {
                    warn!(name, "closing connection: EXPORT_NAME for unknown export");
                    return Err(NbdError::UnknownExport(name));
                };
                let mut buf = Vec::with_capacity(10 + 124);
                buf.extend_from_slice(&export.backend.size().to_be_bytes());
                let flags = transmission_flags(export.backend.as_ref(), self.structured);
                buf.extend_from_slice(&flags.to_be_bytes());
                if !self.no_zeroes {
                    buf.extend_from_slice(&[0u8; 124]);
                }
                self.send(&buf).await?;
                Ok(Step::Transmit(export))
            }
            ClientOption::Abort => {
                // The client may already have hung up; that's fine.
                let _ = self.reply(option, proto::REP_ACK, &[]).await;
                Ok(Step::Abort)
            }
            ClientOption::List => {
                for e in exports.all() {
                    let mut p = Vec::with_capacity(4 + e.name.len() + e.description.len());
                    p.extend_from_slice(&(e.name.len() as u32).to_be_bytes());
                    p.extend_from_slice(e.name.as_bytes());
                    p.extend_from_slice(e.description.as_bytes());
                    self.reply(option, proto::REP_SERVER, &p).await?;
                }
                self.reply(option, proto::REP_ACK, &[]).await?;
                Ok(Step::Continue)
            }
            ClientOption::StartTls => {
                if self.tls_active {
                    self.reply_err(option, proto::REP_ERR_INVALID, "TLS already active").await?;
                    return Ok(Step::Continue);
                }
                let Some(acceptor) = self.config.tls.clone() else {
                    self.reply_err(option, proto::REP_ERR_UNSUP, "TLS not configured").await?;
                    return Ok(Step::Continue);
                };
                self.reply(option, proto::REP_ACK, &[]).await?;
                let placeholder: BoxIo = Box::new(tokio::io::duplex(1).0);
                let plain = std::mem::replace(&mut self.io, placeholder);
                let tls = acceptor.accept(plain).await.map_err(|e| {
                    warn!(error = %e, "TLS handshake failed");
                    NbdError::Tls(e)
                })?;
                if let Some(check) = &self.config.tls_client_check {
                    let signal = check(tls.get_ref().1).map_err(|e| {
                        warn!(error = %e, "NBD TLS client refused");
                        NbdError::TlsClientRefused(e)
                    })?;
                    if let (Some(signal), Some(tx)) = (signal, self.cut.take()) {
                        let _ = tx.send(signal);
                    }
                }
                self.io = Box::new(tls);
                self.tls_active = true;
                // Negotiation state before STARTTLS is forgotten.
                self.structured = false;
                self.meta = None;
                Ok(Step::Continue)
            }
            ClientOption::Info(req) | ClientOption::Go(req) => {
                let Some(export) = exports.get(&req.name) else {
                    let msg = format!("unknown export {:?}", req.name);
                    self.reply_err(option, proto::REP_ERR_UNKNOWN, &msg).await?;
                    return Ok(Step::Continue);
                };
                let mut p = Vec::with_capacity(12);
                p.extend_from_slice(&proto::INFO_EXPORT.to_be_bytes());
                p.extend_from_slice(&export.backend.size().to_be_bytes());
                let flags = transmission_flags(export.backend.as_ref(), self.structured);
                p.extend_from_slice(&flags.to_be_bytes());
                self.reply(option, proto::REP_INFO, &p).await?;
                if req.requests.contains(&proto::INFO_NAME) {
                    let mut p = proto::INFO_NAME.to_be_bytes().to_vec();
                    p.extend_from_slice(export.name.as_bytes());
                    self.reply(option, proto::REP_INFO, &p).await?;
                }
                if req.requests.contains(&proto::INFO_DESCRIPTION) && !export.description.is_empty() {
                    let mut p = proto::INFO_DESCRIPTION.to_be_bytes().to_vec();
                    let d = export.description.as_bytes();
                    p.extend_from_slice(&d[..d.len().min(proto::MAX_STRING_LEN)]);
                    self.reply(option, proto::REP_INFO, &p).await?;
                }
                let mut p = proto::INFO_BLOCK_SIZE.to_be_bytes().to_vec();
                p.extend_from_slice(&proto::MIN_BLOCK_SIZE.to_be_bytes());
                p.extend_from_slice(&proto::PREFERRED_BLOCK_SIZE.to_be_bytes());
                p.extend_from_slice(&proto::MAX_PAYLOAD.to_be_bytes());
                self.reply(option, proto::REP_INFO, &p).await?;
                self.reply(option, proto::REP_ACK, &[]).await?;
                if option == proto::OPT_GO {
                    Ok(Step::Transmit(export))
                } else {
                    Ok(Step::Continue)
                }
            }
            ClientOption::StructuredReply => {
                self.structured = true;
                self.reply(option, proto::REP_ACK, &[]).await?;
                Ok(Step::Continue)
            }
            ClientOption::ListMetaContext(req) | ClientOption::SetMetaContext(req) => {
                let set = option == proto::OPT_SET_META_CONTEXT;
                if set && !self.structured {
                    self.reply_err(option, proto::REP_ERR_INVALID, "structured replies required").await?;
                    return Ok(Step::Continue);
                }
                let Some(export) = exports.get(&req.export) else {
                    let msg = format!("unknown export {:?}", req.export);
                    self.reply_err(option, proto::REP_ERR_UNKNOWN, &msg).await?;
                    return Ok(Step::Continue);
                };
                let selected = if set {
                    req.queries.iter().any(|q| q == proto::META_BASE_ALLOCATION)
                } else {
                    req.queries.is_empty()
                        || req.queries.iter().any(|q| q == proto::META_BASE_ALLOCATION || q == "base:")
                };
                if selected {
                    let id = if set { proto::META_BASE_ALLOCATION_ID } else { 0 };
                    let mut p = id.to_be_bytes().to_vec();
                    p.extend_from_slice(proto::META_BASE_ALLOCATION.as_bytes());
                    self.reply(option, proto::REP_META_CONTEXT, &p).await?;
                }
                if set {
                    self.meta = Some((export.name.clone(), selected));
                }
                self.reply(option, proto::REP_ACK, &[]).await?;
                Ok(Step::Continue)
            }
            ClientOption::Unknown(o) => {
                self.reply_err(o, proto::REP_ERR_UNSUP, "option not supported").await?;
                Ok(Step::Continue)
            }
        }
    }
}

enum Step {
    Continue,
    Abort,
    Transmit(Arc<Export>),
}

// ---------------------------------------------------------------------------
// Transmission phase
// ---------------------------------------------------------------------------

/// In-flight budget held by one request until its reply is sent: the connection's and the
/// server's.
type Cost = (OwnedSemaphorePermit, OwnedSemaphorePermit);

/// One encoded reply; the permit (if any) returns its budget once sent.
struct Reply {
    buf: Vec<u8>,
    _permit: Option<Cost>,
}

type ReplyTx = mpsc::UnboundedSender<Reply>;

/// Builds replies according to the negotiated reply style.
#[derive(Clone, Copy)]
struct Replies {
    structured: bool,
}

impl Replies {
    fn ok(self, cookie: u64) -> Vec<u8> {
        // A simple reply is allowed for any non-READ command even with structured replies.
        proto::encode_simple_reply(0, cookie).to_vec()
    }

    fn err(self, cookie: u64, errno: u32, msg: &str) -> Vec<u8> {
        if self.structured {
            proto::encode_structured_error(cookie, errno, msg)
        } else {
            proto::encode_simple_reply(errno, cookie).to_vec()
        }
    }

    fn header_len(self) -> usize {
        if self.structured {
            proto::STRUCTURED_REPLY_LEN + 8
        } else {
            proto::SIMPLE_REPLY_LEN
        }
    }

    /// Execute a read, returning the complete reply (header + data in one buffer).
    fn read(self, backend: &dyn Backend, cookie: u64, offset: u64, len: u32) -> Vec<u8> {
        if len == 0 {
            return if self.structured {
                proto::encode_structured_header(proto::REPLY_FLAG_DONE, proto::REPLY_TYPE_NONE, cookie, 0).to_vec()
            } else {
                proto::encode_simple_reply(0, cookie).to_vec()
            };
        }
        let hl = self.header_len();
        let mut buf = vec![0u8; hl + len as usize];
        match backend.read(offset, &mut buf[hl..]) {
            Ok(()) => {
                if self.structured {
                    let h = proto::encode_structured_header(
                        proto::REPLY_FLAG_DONE,
                        proto::REPLY_TYPE_OFFSET_DATA,
                        cookie,
                        len + 8,
                    );
                    buf[..proto::STRUCTURED_REPLY_LEN].copy_from_slice(&h);
                    buf[proto::STRUCTURED_REPLY_LEN..hl].copy_from_slice(&offset.to_be_bytes());
                } else {
                    buf[..hl].copy_from_slice(&proto::encode_simple_reply(0, cookie));
                }
                buf
            }
            Err(e) => {
                warn!(offset, len, error = %e, "backend read failed");
                self.err(cookie, e.nbd_errno(), &e.to_string())
            }
        }
    }

    fn block_status(self, backend: &dyn Backend, req: &Request) -> Vec<u8> {
        let len = u64::from(req.length);
        let extents = match backend.block_status(req.offset, len) {
            Ok(x) => x,
            Err(e) => return self.err(req.cookie, e.nbd_errno(), &e.to_string()),
        };
        let descs = block_status_descriptors(&extents, req.length, req.flags & proto::CMD_FLAG_REQ_ONE != 0);
        let mut buf = Vec::with_capacity(proto::STRUCTURED_REPLY_LEN + 4 + 8 * descs.len());
        buf.extend_from_slice(&proto::encode_structured_header(
            proto::REPLY_FLAG_DONE,
            proto::REPLY_TYPE_BLOCK_STATUS,
            req.cookie,
            (4 + 8 * descs.len()) as u32,
        ));
        buf.extend_from_slice(&proto::META_BASE_ALLOCATION_ID.to_be_bytes());
        for (l, f) in descs {
            buf.extend_from_slice(&l.to_be_bytes());
            buf.extend_from_slice(&f.to_be_bytes());
        }
        buf
    }
}

/// Clip/merge backend extents into `(length, flags)` descriptors covering at
/// most `len` bytes; always returns at least one descriptor.
pub(crate) fn block_status_descriptors(extents: &[Extent], len: u32, req_one: bool) -> Vec<(u32, u32)> {
    /// Cap on descriptors per reply (keeps replies small for fragmented files).
    const MAX_DESCRIPTORS: usize = 1 << 16;
    let mut out: Vec<(u32, u32)> = Vec::new();
    let mut remaining = len;
    for e in extents {
        if remaining == 0 {
            break;
        }
        let l = e.length.min(u64::from(remaining)) as u32;
        if l == 0 {
            continue;
        }
        let flags = (if e.hole { proto::STATE_HOLE } else { 0 }) | (if e.zero { proto::STATE_ZERO } else { 0 });
        match out.last_mut() {
            Some(last) if last.1 == flags => last.0 += l,
            _ => {
                if out.len() >= MAX_DESCRIPTORS {
                    break;
                }
                out.push((l, flags));
            }
        }
        remaining -= l;
    }
    if out.is_empty() {
        out.push((len, 0));
    }
    if req_one {
        out.truncate(1);
    }
    out
}

/// Write-type work, executed in order by the connection's worker thread.
struct Job {
    cookie: u64,
    kind: JobKind,
    /// In-flight budget held until the reply has been sent.
    permit: Cost,
}

enum JobKind {
    Write { offset: u64, data: Vec<u8>, fua: bool },
    Zeroes { offset: u64, len: u64, may_trim: bool, fua: bool },
    Trim { offset: u64, len: u64, fua: bool },
    Flush,
}

fn worker_loop(backend: Arc<dyn Backend>, jobs: std::sync::mpsc::Receiver<Job>, tx: ReplyTx, r: Replies) {
    while let Ok(Job { cookie, kind, permit }) = jobs.recv() {
        let (res, what) = match kind {
            JobKind::Write { offset, data, fua } => (backend.write(offset, &data, fua), "write"),
            JobKind::Zeroes { offset, len, may_trim, fua } => {
                (backend.write_zeroes(offset, len, may_trim, fua), "write_zeroes")
            }
            JobKind::Trim { offset, len, fua } => (backend.trim(offset, len, fua), "trim"),
            JobKind::Flush => (backend.flush(), "flush"),
        };
        let buf = match res {
            Ok(()) => r.ok(cookie),
            Err(e) => {
                warn!(op = what, error = %e, "backend request failed");
                r.err(cookie, e.nbd_errno(), &e.to_string())
            }
        };
        // The writer may be gone (client disconnected); keep draining so that
        // every queued write still reaches the backend in order.
        let _ = tx.send(Reply { buf, _permit: Some(permit) });
    }
}

/// A client that has not taken a reply within this long is dropped: its replies hold in-flight
/// budget that every other connection shares.
pub const REPLY_WRITE_TIMEOUT: std::time::Duration = std::time::Duration::from_secs(60);

async fn writer_loop<W: AsyncWrite + Unpin>(w: W, mut rx: mpsc::UnboundedReceiver<Reply>) -> io::Result<()> {
    let mut w = BufWriter::with_capacity(256 * 1024, w);
    async fn timed(f: impl std::future::Future<Output = io::Result<()>>) -> io::Result<()> {
        tokio::time::timeout(REPLY_WRITE_TIMEOUT, f)
            .await
            .unwrap_or_else(|_| Err(io::Error::new(io::ErrorKind::TimedOut, "the client took no reply for 60 s")))
    }
    while let Some(r) = rx.recv().await {
        timed(w.write_all(&r.buf)).await?;
        drop(r);
        while let Ok(r) = rx.try_recv() {
            timed(w.write_all(&r.buf)).await?;
        }
        timed(w.flush()).await?;
    }
    w.shutdown().await
}

async fn transmission(session: Session, shared: Arc<Semaphore>) -> Result<(), NbdError> {
    let Session { io, export, structured, block_status } = session;
    let backend = export.backend.clone();
    let replies = Replies { structured };
    let ctx =
        proto::RequestContext { export_size: backend.size(), read_only: backend.read_only(), structured, block_status };
    debug!(export = %export.name, structured, block_status, "entering transmission phase");

    let (rd, wr) = tokio::io::split(io);
    let (reply_tx, reply_rx) = mpsc::unbounded_channel::<Reply>();
    let writer = tokio::spawn(writer_loop(wr, reply_rx));

    let (job_tx, job_rx) = std::sync::mpsc::channel::<Job>();
    {
        let backend = backend.clone();
        let tx = reply_tx.clone();
        std::thread::Builder::new()
            .name("nbd-write".into())
            .spawn(move || worker_loop(backend, job_rx, tx, replies))?;
    }

    let budget = Arc::new(Semaphore::new(CONNECTION_BUDGET as usize));
    let mut rd = BufReader::with_capacity(256 * 1024, rd);
    let result = reader_loop(&mut rd, &ctx, replies, &backend, &reply_tx, &job_tx, (&budget, &shared)).await;

    // Stop accepting work; queued requests still complete and are answered.
    drop(job_tx);
    drop(reply_tx);
    match writer.await {
        Ok(Ok(())) => {}
        Ok(Err(e)) => debug!(error = %e, "reply writer stopped"),
        Err(e) => warn!(error = %e, "reply writer task failed"),
    }
    result
}

async fn reader_loop<R: AsyncRead + Unpin>(
    rd: &mut R,
    ctx: &proto::RequestContext,
    replies: Replies,
    backend: &Arc<dyn Backend>,
    reply_tx: &ReplyTx,
    job_tx: &std::sync::mpsc::Sender<Job>,
    (budget, shared): (&Arc<Semaphore>, &Arc<Semaphore>),
) -> Result<(), NbdError> {
    let closed = || NbdError::Io(io::Error::new(io::ErrorKind::BrokenPipe, "request worker stopped"));
    // Every request holds budget until its reply is sent, so a client that
    // never reads replies cannot make the server queue unbounded data.
    // The connection's budget first, then the server's (always in this order).
    let acquire = |cost: u32| {
        let (budget, shared) = (budget.clone(), shared.clone());
        async move {
            let n = cost.clamp(MIN_REQUEST_COST, CONNECTION_BUDGET);
            let own = budget.acquire_many_owned(n).await.map_err(|_| closed())?;
            let all = shared.acquire_many_owned(n).await.map_err(|_| closed())?;
            Ok::<Cost, NbdError>((own, all))
        }
    };
    let send = |buf: Vec<u8>, permit: Cost| {
        let _ = reply_tx.send(Reply { buf, _permit: Some(permit) });
    };
    loop {
        let mut hdr = [0u8; proto::REQUEST_LEN];
        match rd.read_exact(&mut hdr).await {
            Ok(_) => {}
            Err(e) if e.kind() == io::ErrorKind::UnexpectedEof => {
                debug!("client closed the connection without NBD_CMD_DISC");
                return Ok(());
            }
            Err(e) => return Err(e.into()),
        }
        let req = match proto::parse_request(&hdr) {
            Ok(r) => r,
            Err(ProtocolError::UnknownCommand { command, cookie }) => {
                warn!(command, "unknown NBD command; replying EINVAL");
                let permit = acquire(0).await?;
                send(replies.err(cookie, proto::NBD_EINVAL, "unknown command"), permit);
                continue;
            }
            Err(e) => {
                warn!(error = %e, "closing connection: malformed request");
                return Err(e.into());
            }
        };
        match proto::validate_request(&req, ctx) {
            Ok(()) => {}
            Err(Rejection::Fatal) => {
                warn!(length = req.length, "closing connection: oversized write payload");
                return Err(NbdError::Oversized(req.length));
            }
            Err(Rejection::Error(errno)) => {
                debug!(?req, errno, "rejecting request");
                if req.command == Command::Write {
                    // Keep the stream in sync without buffering the payload.
                    let n =
                        tokio::io::copy(&mut (&mut *rd).take(u64::from(req.length)), &mut tokio::io::sink()).await?;
                    if n != u64::from(req.length) {
                        return Err(io::Error::from(io::ErrorKind::UnexpectedEof).into());
                    }
                }
                let permit = acquire(0).await?;
                send(replies.err(req.cookie, errno, "invalid request"), permit);
                continue;
            }
        }
        let fua = req.flags & proto::CMD_FLAG_FUA != 0;
        let cookie = req.cookie;
        let (offset, len) = (req.offset, u64::from(req.length));
        let kind = match req.command {
            Command::Disc => {
                debug!("client sent NBD_CMD_DISC");
                return Ok(());
            }
            Command::Read => {
                let permit = acquire(req.length).await?;
                let backend = backend.clone();
                let tx = reply_tx.clone();
                tokio::task::spawn_blocking(move || {
                    let buf = replies.read(backend.as_ref(), cookie, offset, req.length);
                    let _ = tx.send(Reply { buf, _permit: Some(permit) });
                });
                continue;
            }
            Command::BlockStatus => {
                let permit = acquire(0).await?;
                let backend = backend.clone();
                let tx = reply_tx.clone();
                tokio::task::spawn_blocking(move || {
                    let buf = replies.block_status(backend.as_ref(), &req);
                    let _ = tx.send(Reply { buf, _permit: Some(permit) });
                });
                continue;
            }
            Command::Cache => {
                let permit = acquire(0).await?;
                send(replies.ok(cookie), permit);
                continue;
            }
            Command::Write => {
                let permit = acquire(req.length).await?;
                let mut data = vec![0u8; req.length as usize]; // <= MAX_PAYLOAD (validated)
                rd.read_exact(&mut data).await?;
                (JobKind::Write { offset, data, fua }, permit)
            }
            Command::WriteZeroes => {
                let may_trim = req.flags & proto::CMD_FLAG_NO_HOLE == 0;
                (JobKind::Zeroes { offset, len, may_trim, fua }, acquire(0).await?)
            }
            Command::Trim => (JobKind::Trim { offset, len, fua }, acquire(0).await?),
            Command::Flush => (JobKind::Flush, acquire(0).await?),
        };
        let (kind, permit) = kind;
        job_tx.send(Job { cookie, kind, permit }).map_err(|_| closed())?;
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn ext(length: u64, hole: bool) -> Extent {
        Extent { length, hole, zero: hole }
    }

    #[test]
    fn descriptors_are_clipped_and_merged() {
        let d = block_status_descriptors(&[ext(100, false), ext(50, false), ext(1000, true)], 500, false);
        assert_eq!(d, vec![(150, 0), (350, 3)]);
        let d = block_status_descriptors(&[ext(100, false), ext(1000, true)], 500, true);
        assert_eq!(d, vec![(100, 0)]);
        let d = block_status_descriptors(&[], 10, false);
        assert_eq!(d, vec![(10, 0)]);
        let d = block_status_descriptors(&[ext(0, true), ext(4, true)], 10, false);
        assert_eq!(d, vec![(4, 3)]);
    }
}
