//! Channels: how the trusted side talks to anything outside it.
//!
//! Every message is a frame: `b"TSPL"`, protocol version (u16), message tag (u16), payload length
//! (u32), payload; integers little-endian. Receivers check the magic, the version and the length
//! limit before reading a payload, so a malformed or hostile peer gets an error, never a panic or an
//! unbounded allocation.
//!
//! Two implementations: [`InProcessChannel`] (a device thread in the same process, tests) and
//! [`TcpChannel`]. Both give up after the options' timeout instead of waiting forever, so a silent
//! peer becomes an error.

use std::io::{Read, Write};
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
    /// How long `recv` waits before giving up (`None`: forever).
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

/// A channel over TCP.
pub struct TcpChannel {
    stream: TcpStream,
    opts: ChannelOptions,
    peer: String,
}

impl TcpChannel {
    /// Connects to `addr`, failing after the options' timeout (or 10 s without one).
    pub fn connect(addr: &str, opts: ChannelOptions) -> Result<TcpChannel, ChannelError> {
        let peer = addr.to_string();
        let io = |source| ChannelError::Io { peer: peer.clone(), source };
        let mut last = None;
        for a in addr.to_socket_addrs().map_err(io)? {
            match TcpStream::connect_timeout(&a, opts.timeout.unwrap_or(Duration::from_secs(10))) {
                Ok(s) => return TcpChannel::from_stream(s, opts),
                Err(e) => last = Some(e),
            }
        }
        Err(io(last.unwrap_or_else(|| std::io::Error::other("address resolved to nothing"))))
    }

    /// Wraps an accepted or connected stream.
    pub fn from_stream(stream: TcpStream, opts: ChannelOptions) -> Result<TcpChannel, ChannelError> {
        let peer = stream.peer_addr().map(|a| a.to_string()).unwrap_or_else(|_| "tcp peer".into());
        let io = |source| ChannelError::Io { peer: peer.clone(), source };
        stream.set_nodelay(true).map_err(io)?;
        stream.set_read_timeout(opts.timeout).map_err(io)?;
        stream.set_write_timeout(opts.timeout).map_err(io)?;
        Ok(TcpChannel { stream, opts, peer })
    }

    fn read_exact(&mut self, buf: &mut [u8], context: &str) -> Result<(), ChannelError> {
        self.stream.read_exact(buf).map_err(|e| self.classify(e, context))
    }

    /// Names a dead or hung peer as such, whichever side of the socket noticed first: a peer that
    /// died shows up as end of file or a reset when reading and as a broken pipe or a reset when
    /// writing.
    fn classify(&self, e: std::io::Error, context: &str) -> ChannelError {
        use std::io::ErrorKind::*;
        match e.kind() {
            UnexpectedEof => ChannelError::Closed { peer: self.peer.clone(), context: context.to_string() },
            BrokenPipe | ConnectionReset | ConnectionAborted => {
                ChannelError::Closed { peer: self.peer.clone(), context: format!("{context} ({e})") }
            }
            WouldBlock | TimedOut => {
                ChannelError::Timeout { peer: self.peer.clone(), after: self.opts.timeout.unwrap_or_default() }
            }
            _ => ChannelError::Io { peer: self.peer.clone(), source: e },
        }
    }
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
        let max = self.opts.max_frame_bytes.min(u32::MAX as usize);
        if payload.len() > max {
            return Err(ChannelError::TooLarge { peer: self.peer.clone(), len: payload.len(), max });
        }
        let write = |stream: &mut TcpStream, bytes: &[u8]| stream.write_all(bytes).and_then(|_| stream.flush());
        write(&mut self.stream, &header(tag, payload.len())).map_err(|e| self.classify(e, "while sending"))?;
        write(&mut self.stream, payload).map_err(|e| self.classify(e, "while sending"))
    }

    fn recv(&mut self) -> Result<Frame, ChannelError> {
        let mut h = [0u8; HEADER_LEN];
        self.read_exact(&mut h, "while waiting for a message")?;
        let found: [u8; 4] = h[..4].try_into().expect("4 bytes");
        if found != MAGIC {
            return Err(ChannelError::BadMagic { peer: self.peer.clone(), found });
        }
        let version = u16::from_le_bytes([h[4], h[5]]);
        if version != PROTOCOL_VERSION {
            return Err(ChannelError::Version { peer: self.peer.clone(), found: version });
        }
        let tag = u16::from_le_bytes([h[6], h[7]]);
        let len = u32::from_le_bytes([h[8], h[9], h[10], h[11]]) as usize;
        if len > self.opts.max_frame_bytes {
            return Err(ChannelError::TooLarge { peer: self.peer.clone(), len, max: self.opts.max_frame_bytes });
        }
        let mut payload = vec![0u8; len];
        self.read_exact(&mut payload, &format!("in the middle of a {len}-byte message"))?;
        Ok(Frame { tag, payload })
    }

    fn peer(&self) -> String {
        self.peer.clone()
    }
}
