//! A minimal blocking NBD client (fixed newstyle, `NBD_OPT_GO`, simple replies): enough to write
//! changed extents into an image served by `qemu-nbd` (e.g. a qcow2 overlay on a frozen base)
//! and to read exports in tests. One request at a time.

use std::io::{Read, Write};
use std::os::unix::net::UnixStream;
use std::path::Path;

use crate::proto::*;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("NBD connection failed: {0}")]
    Io(#[from] std::io::Error),
    #[error("NBD server misbehaved: {0}")]
    Protocol(String),
    #[error("NBD server refused export {export:?}: reply type {reply:#x}")]
    Refused { export: String, reply: u32 },
    #[error("NBD request failed with errno {0}")]
    Errno(u32),
}

/// A TCP or unix-socket connection, for callers that take either.
pub enum AnyStream {
    Tcp(std::net::TcpStream),
    Unix(UnixStream),
}

impl Read for AnyStream {
    fn read(&mut self, b: &mut [u8]) -> std::io::Result<usize> {
        match self {
            AnyStream::Tcp(s) => s.read(b),
            AnyStream::Unix(s) => s.read(b),
        }
    }
}

impl Write for AnyStream {
    fn write(&mut self, b: &[u8]) -> std::io::Result<usize> {
        match self {
            AnyStream::Tcp(s) => s.write(b),
            AnyStream::Unix(s) => s.write(b),
        }
    }
    fn flush(&mut self) -> std::io::Result<()> {
        match self {
            AnyStream::Tcp(s) => s.flush(),
            AnyStream::Unix(s) => s.flush(),
        }
    }
}

impl NbdClient<AnyStream> {
    /// Open an export named `HOST:PORT/EXPORT` (TCP) or `unix:SOCKET:EXPORT` (unix socket).
    pub fn connect_spec(spec: &str) -> Result<Self, ClientError> {
        let bad = || ClientError::Protocol(format!("{spec:?} is neither HOST:PORT/EXPORT nor unix:SOCKET:EXPORT"));
        let timeout = Some(std::time::Duration::from_secs(120));
        let (stream, export) = if let Some(rest) = spec.strip_prefix("unix:") {
            let (socket, export) = rest.rsplit_once(':').ok_or_else(bad)?;
            let s = UnixStream::connect(socket)?;
            s.set_read_timeout(timeout)?;
            s.set_write_timeout(timeout)?;
            (AnyStream::Unix(s), export)
        } else {
            let (addr, export) = spec.split_once('/').ok_or_else(bad)?;
            let s = std::net::TcpStream::connect(addr)?;
            s.set_nodelay(true)?;
            s.set_read_timeout(timeout)?;
            s.set_write_timeout(timeout)?;
            (AnyStream::Tcp(s), export)
        };
        Self::handshake(stream, export)
    }
}

pub struct NbdClient<S: Read + Write> {
    stream: S,
    size: u64,
    flags: u16,
    cookie: u64,
}

impl NbdClient<std::net::TcpStream> {
    /// Connect to a TCP NBD server (`host:port`) and open `export`.
    pub fn connect_tcp(addr: &str, export: &str) -> Result<Self, ClientError> {
        let s = std::net::TcpStream::connect(addr)?;
        s.set_nodelay(true)?;
        // A server that stops answering fails the request instead of hanging the caller.
        s.set_read_timeout(Some(std::time::Duration::from_secs(120)))?;
        s.set_write_timeout(Some(std::time::Duration::from_secs(120)))?;
        Self::handshake(s, export)
    }
}

impl NbdClient<UnixStream> {
    /// Connect to a unix-socket NBD server and open `export`.
    pub fn connect_unix(socket: &Path, export: &str) -> Result<Self, ClientError> {
        let s = UnixStream::connect(socket)?;
        s.set_read_timeout(Some(std::time::Duration::from_secs(120)))?;
        s.set_write_timeout(Some(std::time::Duration::from_secs(120)))?;
        Self::handshake(s, export)
    }
}

impl<S: Read + Write> NbdClient<S> {
    pub fn handshake(mut stream: S, export: &str) -> Result<Self, ClientError> {
        let mut hdr = [0u8; 18];
        stream.read_exact(&mut hdr)?;
        let magic = u64::from_be_bytes(hdr[0..8].try_into().unwrap_or_default());
        let opt = u64::from_be_bytes(hdr[8..16].try_into().unwrap_or_default());
        if magic != NBD_MAGIC || opt != IHAVEOPT {
            return Err(ClientError::Protocol("not a fixed-newstyle NBD server".into()));
        }
        let server_flags = u16::from_be_bytes([hdr[16], hdr[17]]);
        if server_flags & FLAG_FIXED_NEWSTYLE == 0 {
            return Err(ClientError::Protocol("server does not support fixed newstyle".into()));
        }
        let mut client_flags = FLAG_C_FIXED_NEWSTYLE;
        if server_flags & FLAG_NO_ZEROES != 0 {
            client_flags |= FLAG_C_NO_ZEROES;
        }
        stream.write_all(&client_flags.to_be_bytes())?;
        // NBD_OPT_GO: export name, no information requests.
        let mut data = Vec::with_capacity(6 + export.len());
        data.extend_from_slice(&(export.len() as u32).to_be_bytes());
        data.extend_from_slice(export.as_bytes());
        data.extend_from_slice(&0u16.to_be_bytes());
        let mut msg = Vec::with_capacity(16 + data.len());
        msg.extend_from_slice(&IHAVEOPT.to_be_bytes());
        msg.extend_from_slice(&OPT_GO.to_be_bytes());
        msg.extend_from_slice(&(data.len() as u32).to_be_bytes());
        msg.extend_from_slice(&data);
        stream.write_all(&msg)?;
        let (mut size, mut flags) = (None, 0u16);
        loop {
            let mut rh = [0u8; 20];
            stream.read_exact(&mut rh)?;
            let magic = u64::from_be_bytes(rh[0..8].try_into().unwrap_or_default());
            let reply = u32::from_be_bytes(rh[12..16].try_into().unwrap_or_default());
            let len = u32::from_be_bytes(rh[16..20].try_into().unwrap_or_default()) as usize;
            if magic != OPT_REPLY_MAGIC || len > 1 << 20 {
                return Err(ClientError::Protocol("bad option reply".into()));
            }
            let mut body = vec![0u8; len];
            stream.read_exact(&mut body)?;
            match reply {
                REP_ACK => break,
                REP_INFO if body.len() >= 12 && u16::from_be_bytes([body[0], body[1]]) == INFO_EXPORT => {
                    size = Some(u64::from_be_bytes(body[2..10].try_into().unwrap_or_default()));
                    flags = u16::from_be_bytes([body[10], body[11]]);
                }
                REP_INFO => {}
                other => return Err(ClientError::Refused { export: export.to_owned(), reply: other }),
            }
        }
        let size = size.ok_or_else(|| ClientError::Protocol("server sent no export size".into()))?;
        Ok(NbdClient { stream, size, flags, cookie: 0 })
    }

    pub fn size(&self) -> u64 {
        self.size
    }

    pub fn read_only(&self) -> bool {
        self.flags & TF_READ_ONLY != 0
    }

    fn request(&mut self, cmd: u16, flags: u16, offset: u64, len: u32, payload: &[u8]) -> Result<(), ClientError> {
        self.cookie += 1;
        let mut h = [0u8; 28];
        h[0..4].copy_from_slice(&REQUEST_MAGIC.to_be_bytes());
        h[4..6].copy_from_slice(&flags.to_be_bytes());
        h[6..8].copy_from_slice(&cmd.to_be_bytes());
        h[8..16].copy_from_slice(&self.cookie.to_be_bytes());
        h[16..24].copy_from_slice(&offset.to_be_bytes());
        h[24..28].copy_from_slice(&len.to_be_bytes());
        self.stream.write_all(&h)?;
        if !payload.is_empty() {
            self.stream.write_all(payload)?;
        }
        Ok(())
    }

    fn simple_reply(&mut self) -> Result<(), ClientError> {
        let mut r = [0u8; 16];
        self.stream.read_exact(&mut r)?;
        let magic = u32::from_be_bytes(r[0..4].try_into().unwrap_or_default());
        let err = u32::from_be_bytes(r[4..8].try_into().unwrap_or_default());
        let cookie = u64::from_be_bytes(r[8..16].try_into().unwrap_or_default());
        if magic != SIMPLE_REPLY_MAGIC || cookie != self.cookie {
            return Err(ClientError::Protocol("bad reply header".into()));
        }
        if err != 0 {
            return Err(ClientError::Errno(err));
        }
        Ok(())
    }

    /// Write `data` at `offset`, in pieces of at most 32 MiB (the common server limit).
    pub fn write(&mut self, mut offset: u64, mut data: &[u8]) -> Result<(), ClientError> {
        while !data.is_empty() {
            let n = data.len().min(32 << 20);
            self.request(CMD_WRITE, 0, offset, n as u32, &data[..n])?;
            self.simple_reply()?;
            offset += n as u64;
            data = &data[n..];
        }
        Ok(())
    }

    pub fn write_zeroes(&mut self, mut offset: u64, mut len: u64) -> Result<(), ClientError> {
        if self.flags & TF_SEND_WRITE_ZEROES == 0 {
            let zeros = vec![0u8; len.min(1 << 20) as usize];
            while len > 0 {
                let n = len.min(zeros.len() as u64) as usize;
                self.write(offset, &zeros[..n])?;
                offset += n as u64;
                len -= n as u64;
            }
            return Ok(());
        }
        while len > 0 {
            let n = len.min(1 << 30);
            self.request(CMD_WRITE_ZEROES, 0, offset, n as u32, &[])?;
            self.simple_reply()?;
            offset += n;
            len -= n;
        }
        Ok(())
    }

    pub fn read(&mut self, mut offset: u64, buf: &mut [u8]) -> Result<(), ClientError> {
        let mut done = 0;
        while done < buf.len() {
            let n = (buf.len() - done).min(32 << 20);
            self.request(CMD_READ, 0, offset, n as u32, &[])?;
            self.simple_reply()?;
            self.stream.read_exact(&mut buf[done..done + n])?;
            done += n;
            offset += n as u64;
        }
        Ok(())
    }

    pub fn flush(&mut self) -> Result<(), ClientError> {
        if self.flags & TF_SEND_FLUSH == 0 {
            return Ok(()); // the server writes through: nothing to flush
        }
        self.request(CMD_FLUSH, 0, 0, 0, &[])?;
        self.simple_reply()
    }

    /// Close cleanly (the server may then exit, as `qemu-nbd` does without `--persistent`).
    pub fn disconnect(mut self) -> Result<(), ClientError> {
        self.request(CMD_DISC, 0, 0, 0, &[])?;
        Ok(())
    }
}
