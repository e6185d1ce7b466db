//! Channels: how the trusted side talks to anything outside it.
//!
//! Every message is a frame: `b"TSPL"`, protocol version (u16), message tag (u16), payload length
//! (u32), payload; integers little-endian. Receivers check the magic, the version and the length
//! limit before reading a payload, so a malformed or hostile peer gets an error, never a panic or an
//! unbounded allocation.
//!
//! Three implementations: [`InProcessChannel`] (a device thread in the same process, tests),
//! [`crate::link::Link`] (TCP between processes, mutually authenticated and encrypted: the
//! default) and [`TcpChannel`] (plain TCP, only with `--insecure-plaintext-link`). All give up after
//! the options' timeout instead of waiting forever, so a silent peer becomes an error; over TCP a
//! message must arrive whole within the timeout once its first byte has come, and after a failure
//! in the middle of a message the channel refuses every later call.

use crate::wire::Wire;
use std::net::{TcpStream, ToSocketAddrs};
use std::sync::mpsc;
use std::time::Duration;

pub const MAGIC: [u8; 4] = *b"TSPL";
pub const PROTOCOL_VERSION: u16 = 1;
const HEADER_LEN: usize = 12;

/// One message.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Frame {
    pub tag: u16,
    pub payload: Vec<u8>,
}

/// Limits applied by both ends.
#[derive(Clone, Copy, Debug)]
pub struct ChannelOptions {
    /// Largest payload accepted or sent.
    pub max_frame_bytes: usize,
    /// How long `recv` waits for a message to start, and how long a message may take from its
    /// first byte to its last, either way (`None`: forever).
    pub timeout: Option<Duration>,
}

impl Default for ChannelOptions {
    fn default() -> Self {
        // 1 GiB covers the largest tensors we send (a VGG conv input at batch 256 is ~256 MiB).
        ChannelOptions { max_frame_bytes: 1 << 30, timeout: Some(Duration::from_secs(120)) }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum ChannelError {
    #[error(
        "{peer}: bad frame magic {found:02x?} (expected {MAGIC:02x?}); the peer does not speak the trustsplit protocol"
    )]
    BadMagic { peer: String, found: [u8; 4] },
    #[error("{peer}: protocol version {found}, expected {PROTOCOL_VERSION}; upgrade the older side")]
    Version { peer: String, found: u16 },
    #[error("{peer}: frame of {len} bytes exceeds the limit of {max} bytes")]
    TooLarge { peer: String, len: usize, max: usize },
    #[error("{peer}: expected message tag {expected}, got {found}")]
    UnexpectedTag { peer: String, expected: u16, found: u16 },
    #[error("{peer}: connection closed {context}")]
    Closed { peer: String, context: String },
    #[error("{peer}: no answer within {after:?}; the peer may have died or hung")]
    Timeout { peer: String, after: Duration },
    #[error("{peer}: a message took longer than {after:?} {context}; the connection is closed")]
    Deadline { peer: String, after: Duration, context: String },
    #[error("{peer}: the connection was closed after an earlier failure ({cause})")]
    Broken { peer: String, cause: String },
    #[error("{peer}: the link's handshake failed: {reason}")]
    Handshake { peer: String, reason: String },
    #[error("{peer}: refused this connection: {reason}")]
    Refused { peer: String, reason: String },
    #[error("{peer}: {source}")]
    Io { peer: String, source: std::io::Error },
    #[error("{peer}: {reason}")]
    Malformed { peer: String, reason: String },
    #[error("{peer}: message failed authentication (tampered, replayed, reordered or wrong key)")]
    Authentication { peer: String },
}

/// A bidirectional, ordered message channel.
pub trait Channel: Send {
    fn send(&mut self, tag: u16, payload: &[u8]) -> Result<(), ChannelError>;
    fn recv(&mut self) -> Result<Frame, ChannelError>;
    /// Receives one frame of at most `max_payload` bytes: a frame announcing more is refused
    /// before its payload is read (over TCP; an in-process frame is already in memory).
    fn recv_limited(&mut self, max_payload: usize) -> Result<Frame, ChannelError> {
        let frame = self.recv()?;
        if frame.payload.len() > max_payload {
            return Err(ChannelError::TooLarge { peer: self.peer(), len: frame.payload.len(), max: max_payload });
        }
        Ok(frame)
    }
    /// A name for the peer, used in error messages.
    fn peer(&self) -> String;

    /// Receives one frame and checks its tag.
    fn recv_tag(&mut self, expected: u16) -> Result<Vec<u8>, ChannelError> {
        let f = self.recv()?;
        if f.tag != expected {
            return Err(ChannelError::UnexpectedTag { peer: self.peer(), expected, found: f.tag });
        }
        Ok(f.payload)
    }
}

/// A boxed channel is a channel (so generic protocol code takes either kind of link).
impl Channel for Box<dyn Channel> {
    fn send(&mut self, tag: u16, payload: &[u8]) -> Result<(), ChannelError> {
        (**self).send(tag, payload)
    }
    fn recv(&mut self) -> Result<Frame, ChannelError> {
        (**self).recv()
    }
    fn recv_limited(&mut self, max_payload: usize) -> Result<Frame, ChannelError> {
        (**self).recv_limited(max_payload)
    }
    fn peer(&self) -> String {
        (**self).peer()
    }
}

/// Both ends of a channel inside one process (threads), with the same limits as TCP.
pub struct InProcessChannel {
    tx: mpsc::Sender<Frame>,
    rx: mpsc::Receiver<Frame>,
    opts: ChannelOptions,
    name: String,
}

impl InProcessChannel {
    /// Two connected ends.
    pub fn pair(opts: ChannelOptions) -> (InProcessChannel, InProcessChannel) {
        let (a_tx, b_rx) = mpsc::channel();
        let (b_tx, a_rx) = mpsc::channel();
        (
            InProcessChannel { tx: a_tx, rx: a_rx, opts, name: "in-process peer B".into() },
            InProcessChannel { tx: b_tx, rx: b_rx, opts, name: "in-process peer A".into() },
        )
    }
}

impl Channel for InProcessChannel {
    fn send(&mut self, tag: u16, payload: &[u8]) -> Result<(), ChannelError> {
        if payload.len() > self.opts.max_frame_bytes {
            return Err(ChannelError::TooLarge {
                peer: self.peer(),
                len: payload.len(),
                max: self.opts.max_frame_bytes,
            });
        }
        self.tx
            .send(Frame { tag, payload: payload.to_vec() })
            .map_err(|_| ChannelError::Closed { peer: self.peer(), context: "while sending".into() })
    }
    fn recv(&mut self) -> Result<Frame, ChannelError> {
        let closed = || ChannelError::Closed { peer: self.peer(), context: "while waiting for a message".into() };
        match self.opts.timeout {
            None => self.rx.recv().map_err(|_| closed()),
            Some(t) => self.rx.recv_timeout(t).map_err(|e| match e {
                mpsc::RecvTimeoutError::Timeout => ChannelError::Timeout { peer: self.peer(), after: t },
                mpsc::RecvTimeoutError::Disconnected => closed(),
            }),
        }
    }
    fn peer(&self) -> String {
        self.name.clone()
    }
}

/// A channel over plain TCP: neither authenticated nor encrypted. Only for
/// `--insecure-plaintext-link` and tests; [`crate::link::Link`] is the default between processes.
pub struct TcpChannel {
    wire: Wire,
    opts: ChannelOptions,
}

impl TcpChannel {
    /// Connects to `addr`, failing after the options' timeout (or 10 s without one).
    pub fn connect(addr: &str, opts: ChannelOptions) -> Result<TcpChannel, ChannelError> {
        TcpChannel::from_stream(connect_stream(addr, opts.timeout)?, opts)
    }

    /// Wraps an accepted or connected stream.
    pub fn from_stream(stream: TcpStream, opts: ChannelOptions) -> Result<TcpChannel, ChannelError> {
        let mut wire = Wire::new(stream, opts.timeout)?;
        // Plain TCP has no handshake: whoever connects is as trusted as it will ever be.
        wire.trust();
        Ok(TcpChannel { wire, opts })
    }

    fn recv_frame(&mut self, max: usize) -> Result<Frame, ChannelError> {
        let mut h = [0u8; HEADER_LEN];
        h[0] = self.wire.first_byte()?;
        let deadline = self.wire.deadline();
        self.wire.read_by(&mut h[1..], deadline, "in the middle of a message header")?;
        let found: [u8; 4] = h[..4].try_into().expect("4 bytes");
        if found != MAGIC {
            return Err(ChannelError::BadMagic { peer: self.wire.peer.clone(), found });
        }
        let version = u16::from_le_bytes([h[4], h[5]]);
        if version != PROTOCOL_VERSION {
            return Err(ChannelError::Version { peer: self.wire.peer.clone(), found: version });
        }
        let tag = u16::from_le_bytes([h[6], h[7]]);
        let len = u32::from_le_bytes([h[8], h[9], h[10], h[11]]) as usize;
        let max = max.min(self.opts.max_frame_bytes);
        if len > max {
            return Err(ChannelError::TooLarge { peer: self.wire.peer.clone(), len, max });
        }
        let mut payload = vec![0u8; len];
        self.wire.read_by(&mut payload, deadline, &format!("in the middle of a {len}-byte message"))?;
        Ok(Frame { tag, payload })
    }
}

/// Connects to the first address `addr` resolves to that answers, within `timeout` (10 s without).
pub(crate) fn connect_stream(addr: &str, timeout: Option<Duration>) -> Result<TcpStream, ChannelError> {
    let io = |source| ChannelError::Io { peer: addr.to_string(), source };
    let mut last = None;
    for a in addr.to_socket_addrs().map_err(io)? {
        match TcpStream::connect_timeout(&a, timeout.unwrap_or(Duration::from_secs(10))) {
            Ok(s) => return Ok(s),
            Err(e) => last = Some(e),
        }
    }
    Err(io(last.unwrap_or_else(|| std::io::Error::other("address resolved to nothing"))))
}

/// Text a peer sent, made safe to print: control characters (terminal escape sequences among
/// them) become `?`.
pub fn printable(text: &[u8]) -> String {
    String::from_utf8_lossy(text).chars().map(|c| if c.is_control() && c != '\n' { '?' } else { c }).collect()
}

/// Encodes a frame header.
pub fn header(tag: u16, len: usize) -> [u8; HEADER_LEN] {
    let mut h = [0u8; HEADER_LEN];
    h[..4].copy_from_slice(&MAGIC);
    h[4..6].copy_from_slice(&PROTOCOL_VERSION.to_le_bytes());
    h[6..8].copy_from_slice(&tag.to_le_bytes());
    h[8..12].copy_from_slice(&(len as u32).to_le_bytes());
    h
}

impl Channel for TcpChannel {
    fn send(&mut self, tag: u16, payload: &[u8]) -> Result<(), ChannelError> {
        self.wire.check_open()?;
        let max = self.opts.max_frame_bytes.min(u32::MAX as usize);
        if payload.len() > max {
            return Err(ChannelError::TooLarge { peer: self.wire.peer.clone(), len: payload.len(), max });
        }
        let deadline = self.wire.deadline();
        let sent = self
            .wire
            .write_by(&header(tag, payload.len()), deadline)
            .and_then(|()| self.wire.write_by(payload, deadline));
        sent.map_err(|e| self.wire.fail(e))
    }

    fn recv(&mut self) -> Result<Frame, ChannelError> {
        self.recv_limited(usize::MAX)
    }

    fn recv_limited(&mut self, max_payload: usize) -> Result<Frame, ChannelError> {
        self.wire.check_open()?;
        let outcome = self.recv_frame(max_payload);
        self.wire.settle(outcome)
    }

    fn peer(&self) -> String {
        self.wire.peer.clone()
    }
}
