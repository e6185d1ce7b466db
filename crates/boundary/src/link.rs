//! The link between two trustsplit processes: TCP, mutually authenticated and encrypted with the
//! Noise protocol framework (`Noise_XX_25519_AESGCM_SHA256`, through the `snow` crate; AES-GCM and
//! SHA-256 from `ring`).
//!
//! Keys. Every process that connects or listens has a long-term X25519 key pair
//! ([`KeyPair::generate`], `trustsplit keygen`): a file holding the secret key in hex, mode 0600.
//! Each side names the public keys it accepts from the other ([`LinkPolicy`]); an enclave that
//! has no long-term key uses a fresh one and proves it by attestation instead (the upload binds
//! [`Link::handshake_hash`] into its quote).
//!
//! Handshake. XX, three messages. The initiator checks the responder's static key as soon as
//! message 2 reveals it, before message 3 reveals its own; the responder checks the initiator's
//! after message 3 and answers, encrypted, that it accepts the key or why it does not. The
//! prologue names the link's purpose (`device`, `upload`, ...), so a handshake made for one
//! purpose fails for another. Until the handshake is over a peer can make us read at most three
//! messages of [`HANDSHAKE_MAX_BYTES`] each, within [`HANDSHAKE_TIMEOUT`].
//!
//! Frames. A frame is a header message (tag and payload length, authenticated), then the payload
//! in messages of at most [`CHUNK_BYTES`], each with its two-byte length in front. A receiver
//! refuses a header that announces more than it expects before reading any payload, and a frame
//! must arrive whole within the channel's timeout once it has begun. After any failure (a message
//! that does not authenticate, a deadline missed in the middle of a frame, a frame too large) the
//! link is closed and refuses every later call. Both sides' ephemeral keys make every session's
//! keys fresh, so a recorded session played back to either side fails at its first message after
//! the handshake.

use crate::channel::{connect_stream, Channel, ChannelError, ChannelOptions, Frame};
use crate::wire::Wire;
use snow::params::DHChoice;
use snow::resolvers::{CryptoResolver, DefaultResolver};
use std::fmt;
use std::net::TcpStream;
use std::path::Path;
use std::time::{Duration, Instant};

/// The Noise protocol every link speaks.
pub const NOISE_PARAMS: &str = "Noise_XX_25519_AESGCM_SHA256";
/// The largest handshake message accepted (XX's are 32, 96 and 64 bytes).
pub const HANDSHAKE_MAX_BYTES: usize = 1024;
/// The whole handshake must be over within this (or the channel's timeout, if shorter).
pub const HANDSHAKE_TIMEOUT: Duration = Duration::from_secs(30);
/// The largest Noise message, and the payload bytes one carries (16 go to the tag).
const NOISE_MAX: usize = 65535;
pub const CHUNK_BYTES: usize = NOISE_MAX - 16;
/// Encrypted bytes gathered before a write.
const WRITE_BATCH: usize = 1 << 20;
/// The responder's answer after the handshake: accepted (empty payload) or refused (the reason).
const TAG_LINK_ACCEPTED: u16 = 0xFF00;
const TAG_LINK_REFUSED: u16 = 0xFF01;
/// The longest refusal reason read.
const MAX_REFUSAL_BYTES: usize = 1024;

/// An X25519 public key: a process's identity on the link.
#[derive(Clone, Copy, PartialEq, Eq, Hash)]
pub struct PublicKey(pub [u8; 32]);

impl fmt::Display for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(&hex(&self.0))
    }
}

impl fmt::Debug for PublicKey {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "PublicKey({self})")
    }
}

impl std::str::FromStr for PublicKey {
    type Err = String;
    fn from_str(s: &str) -> Result<PublicKey, String> {
        let bytes = unhex(s.trim()).ok_or_else(|| format!("'{s}' is not a public key: expected 64 hex digits"))?;
        Ok(PublicKey(bytes.try_into().map_err(|_| format!("'{s}' is not a public key: expected 64 hex digits"))?))
    }
}

/// A long-term X25519 key pair. The secret half is never printed (`Debug` shows the public key).
pub struct KeyPair {
    secret: [u8; 32],
    public: PublicKey,
}

impl fmt::Debug for KeyPair {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "KeyPair {{ public: {}, secret: <redacted> }}", self.public)
    }
}

impl KeyPair {
    /// A fresh key pair from the operating system's random number generator.
    pub fn generate() -> Result<KeyPair, String> {
        let params = NOISE_PARAMS.parse().expect("the link's Noise parameters parse");
        let pair = snow::Builder::new(params).generate_keypair().map_err(|e| format!("generating a key: {e}"))?;
        KeyPair::from_secret(pair.private.try_into().map_err(|_| "a 32-byte X25519 key".to_string())?)
    }

    fn from_secret(secret: [u8; 32]) -> Result<KeyPair, String> {
        let mut dh = DefaultResolver.resolve_dh(&DHChoice::Curve25519).ok_or("no X25519 implementation")?;
        dh.set(&secret);
        let public = PublicKey(dh.pubkey().try_into().map_err(|_| "a 32-byte X25519 public key".to_string())?);
        Ok(KeyPair { secret, public })
    }

    pub fn public(&self) -> PublicKey {
        self.public
    }

    /// Writes the secret key to a new file readable by its owner only (mode 0600 on Unix); an
    /// existing file is never overwritten.
    pub fn save(&self, path: &Path) -> Result<(), String> {
        use std::io::Write;
        let mut options = std::fs::OpenOptions::new();
        options.write(true).create_new(true);
        #[cfg(unix)]
        std::os::unix::fs::OpenOptionsExt::mode(&mut options, 0o600);
        let mut file = options.open(path).map_err(|e| match e.kind() {
            std::io::ErrorKind::AlreadyExists => {
                format!("{} exists; a key file is never overwritten (remove it or choose another path)", path.display())
            }
            _ => format!("creating {}: {e}", path.display()),
        })?;
        let text = format!("# trustsplit link key (X25519 secret). Keep it secret.\n{}\n", hex(&self.secret));
        file.write_all(text.as_bytes())
            .and_then(|()| file.sync_all())
            .map_err(|e| format!("writing {}: {e}", path.display()))
    }

    /// Reads a key file written by [`KeyPair::save`]. A file other users can read is refused.
    pub fn load(path: &Path) -> Result<KeyPair, String> {
        use std::io::Read;
        let shown = path.display();
        // One open file for the check and the read: the path cannot be swapped in between.
        let file = std::fs::File::open(path).map_err(|e| format!("reading {shown}: {e}"))?;
        #[cfg(unix)]
        {
            use std::os::unix::fs::PermissionsExt;
            let mode = file.metadata().map_err(|e| format!("reading {shown}: {e}"))?.permissions().mode();
            if mode & 0o077 != 0 {
                return Err(format!(
                    "{shown} is readable by other users (mode {:o}); a secret key must not be: chmod 600 {shown}",
                    mode & 0o777
                ));
            }
        }
        let mut text = String::new();
        file.take(1 << 16).read_to_string(&mut text).map_err(|e| format!("reading {shown}: {e}"))?;
        let line = text.lines().map(str::trim).find(|l| !l.is_empty() && !l.starts_with('#')).unwrap_or("");
        let secret = unhex(line)
            .and_then(|b| <[u8; 32]>::try_from(b).ok())
            .ok_or_else(|| format!("{shown} holds no key: expected one line of 64 hex digits (trustsplit keygen)"))?;
        KeyPair::from_secret(secret)
    }
}

/// Which peers a side accepts.
#[derive(Clone, Debug, PartialEq, Eq)]
pub enum LinkPolicy {
    /// Only these keys.
    Only(Vec<PublicKey>),
    /// Any peer that proves it holds some key (a device serving anyone, for free compute; an
    /// owner uploading to an enclave whose key its attestation proves).
    AnyAuthenticated,
}

impl LinkPolicy {
    pub fn allows(&self, key: &PublicKey) -> bool {
        match self {
            LinkPolicy::Only(keys) => keys.contains(key),
            LinkPolicy::AnyAuthenticated => true,
        }
    }

    fn expected(&self) -> String {
        match self {
            LinkPolicy::Only(keys) => keys.iter().map(|k| k.to_string()).collect::<Vec<_>>().join(" or "),
            LinkPolicy::AnyAuthenticated => "any key".into(),
        }
    }
}

/// An established link. Implements [`Channel`].
pub struct Link {
    wire: Wire,
    noise: snow::TransportState,
    opts: ChannelOptions,
    remote: PublicKey,
    handshake_hash: [u8; 32],
    /// Ciphertext scratch, reused across messages.
    scratch: Vec<u8>,
}

impl Link {
    /// Connects to `addr` and runs the handshake as initiator, accepting the responder only if
    /// `policy` allows its key.
    pub fn connect(
        addr: &str,
        purpose: &str,
        local: &KeyPair,
        policy: &LinkPolicy,
        opts: ChannelOptions,
    ) -> Result<Link, ChannelError> {
        let stream = connect_stream(addr, opts.timeout)?;
        let mut wire = Wire::new(stream, opts.timeout)?;
        wire.peer = addr.to_string();
        handshake(wire, purpose, local, policy, opts, true)
    }

    /// Runs the handshake as responder on an accepted stream: the peer must prove a key `policy`
    /// allows. A refused peer is told why, then the connection is closed.
    pub fn accept(
        stream: TcpStream,
        purpose: &str,
        local: &KeyPair,
        policy: &LinkPolicy,
        opts: ChannelOptions,
    ) -> Result<Link, ChannelError> {
        handshake(Wire::new(stream, opts.timeout)?, purpose, local, policy, opts, false)
    }

    /// The peer's proven public key.
    pub fn remote_key(&self) -> PublicKey {
        self.remote
    }

    /// The Noise handshake hash: the same on both ends, and unique to this session. Binding it
    /// into an attestation quote ties the quote to this very link.
    pub fn handshake_hash(&self) -> [u8; 32] {
        self.handshake_hash
    }

    /// Reads and decrypts one Noise message into `out` (whose length is the plaintext expected).
    fn recv_message(&mut self, out: &mut [u8], deadline: Option<Instant>, context: &str) -> Result<(), ChannelError> {
        let mut len = [0u8; 2];
        self.wire.read_by(&mut len, deadline, context)?;
        let len = u16::from_be_bytes(len) as usize;
        if len != out.len() + 16 {
            return Err(ChannelError::Malformed {
                peer: self.wire.peer.clone(),
                reason: format!("a {len}-byte message where {} bytes were due", out.len() + 16),
            });
        }
        self.scratch.resize(len, 0);
        let Link { wire, scratch, .. } = self;
        wire.read_by(scratch, deadline, context)?;
        let n = self
            .noise
            .read_message(&self.scratch, out)
            .map_err(|_| ChannelError::Authentication { peer: self.wire.peer.clone() })?;
        debug_assert_eq!(n, out.len());
        Ok(())
    }

    fn send_frame(&mut self, tag: u16, payload: &[u8]) -> Result<(), ChannelError> {
        let deadline = self.wire.deadline();
        let mut header = [0u8; 10];
        header[..2].copy_from_slice(&tag.to_le_bytes());
        header[2..].copy_from_slice(&(payload.len() as u64).to_le_bytes());
        // Messages are encrypted into one buffer and written a megabyte at a time: one system call
        // for sixteen messages.
        self.scratch.clear();
        for message in std::iter::once(&header[..]).chain(payload.chunks(CHUNK_BYTES)) {
            let at = self.scratch.len();
            self.scratch.resize(at + 2 + message.len() + 16, 0);
            let n = self.noise.write_message(message, &mut self.scratch[at + 2..]).map_err(|e| {
                ChannelError::Malformed { peer: self.wire.peer.clone(), reason: format!("encrypting: {e}") }
            })?;
            self.scratch[at..at + 2].copy_from_slice(&(n as u16).to_be_bytes());
            if self.scratch.len() >= WRITE_BATCH {
                let Link { wire, scratch, .. } = self;
                wire.write_by(scratch, deadline)?;
                scratch.clear();
            }
        }
        let Link { wire, scratch, .. } = self;
        wire.write_by(scratch, deadline)
    }

    fn recv_frame(&mut self, max: usize) -> Result<Frame, ChannelError> {
        // The two length bytes of the header message: the first decides whether a message began.
        let mut len = [0u8; 2];
        len[0] = self.wire.first_byte()?;
        let deadline = self.wire.deadline();
        let context = "in the middle of a message";
        self.wire.read_by(&mut len[1..], deadline, context)?;
        if u16::from_be_bytes(len) != 26 {
            return Err(ChannelError::Malformed {
                peer: self.wire.peer.clone(),
                reason: format!("a {}-byte frame header (26 expected)", u16::from_be_bytes(len)),
            });
        }
        let mut sealed = [0u8; 26];
        self.wire.read_by(&mut sealed, deadline, context)?;
        let mut header = [0u8; 10];
        self.noise
            .read_message(&sealed, &mut header)
            .map_err(|_| ChannelError::Authentication { peer: self.wire.peer.clone() })?;
        let tag = u16::from_le_bytes([header[0], header[1]]);
        let announced = u64::from_le_bytes(header[2..].try_into().expect("8 bytes"));
        let max = max.min(self.opts.max_frame_bytes);
        let len = usize::try_from(announced).ok().filter(|&l| l <= max).ok_or(ChannelError::TooLarge {
            peer: self.wire.peer.clone(),
            len: usize::try_from(announced).unwrap_or(usize::MAX),
            max,
        })?;
        let mut payload = vec![0u8; len];
        let mut start = 0;
        while start < len {
            let end = (start + CHUNK_BYTES).min(len);
            self.recv_message(&mut payload[start..end], deadline, context)?;
            start = end;
        }
        Ok(Frame { tag, payload })
    }
}

impl fmt::Debug for Link {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        write!(f, "Link {{ peer: {}, remote: {} }}", self.wire.peer, self.remote)
    }
}

impl Channel for Link {
    fn send(&mut self, tag: u16, payload: &[u8]) -> Result<(), ChannelError> {
        self.wire.check_open()?;
        if payload.len() > self.opts.max_frame_bytes {
            let max = self.opts.max_frame_bytes;
            return Err(ChannelError::TooLarge { peer: self.wire.peer.clone(), len: payload.len(), max });
        }
        self.send_frame(tag, payload).map_err(|e| self.wire.fail(e))
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

/// Runs the XX handshake on `wire`.
fn handshake(
    mut wire: Wire,
    purpose: &str,
    local: &KeyPair,
    policy: &LinkPolicy,
    opts: ChannelOptions,
    initiator: bool,
) -> Result<Link, ChannelError> {
    let peer = wire.peer.clone();
    let failed = |reason: String| ChannelError::Handshake { peer: peer.clone(), reason };
    let prologue = format!("trustsplit link v1: {purpose}");
    let builder = snow::Builder::new(NOISE_PARAMS.parse().expect("the link's Noise parameters parse"))
        .local_private_key(&local.secret)
        .and_then(|b| b.prologue(prologue.as_bytes()))
        .map_err(|e| failed(e.to_string()))?;
    let mut noise = if initiator { builder.build_initiator() } else { builder.build_responder() }
        .map_err(|e| failed(e.to_string()))?;
    let deadline = Some(Instant::now() + opts.timeout.map_or(HANDSHAKE_TIMEOUT, |t| t.min(HANDSHAKE_TIMEOUT)));
    let mut buf = vec![0u8; HANDSHAKE_MAX_BYTES];
    let mut send = |wire: &mut Wire, noise: &mut snow::HandshakeState| -> Result<(), ChannelError> {
        let n = noise.write_message(&[], &mut buf[2..]).map_err(|e| failed(e.to_string()))?;
        buf[..2].copy_from_slice(&(n as u16).to_be_bytes());
        wire.write_by(&buf[..2 + n], deadline)
    };
    let recv = |wire: &mut Wire, noise: &mut snow::HandshakeState| -> Result<(), ChannelError> {
        let mut len = [0u8; 2];
        wire.read_by(&mut len, deadline, "during the link's handshake")?;
        let len = u16::from_be_bytes(len) as usize;
        if len > HANDSHAKE_MAX_BYTES {
            return Err(failed(format!(
                "a {len}-byte handshake message (at most {HANDSHAKE_MAX_BYTES}); the peer does not speak the \
                 trustsplit link (a plaintext peer? both sides need --insecure-plaintext-link, or neither)"
            )));
        }
        let mut message = vec![0u8; len];
        wire.read_by(&mut message, deadline, "during the link's handshake")?;
        let mut payload = [0u8; HANDSHAKE_MAX_BYTES];
        noise.read_message(&message, &mut payload).map(|_| ()).map_err(|e| {
            failed(format!("{e}: the peer is not a trustsplit link of purpose '{purpose}', or the message was altered"))
        })
    };
    let outcome = (|| {
        if initiator {
            send(&mut wire, &mut noise)?;
            recv(&mut wire, &mut noise)?;
            // Check the responder before revealing who we are.
            let remote = remote_key(&noise, &peer)?;
            if !policy.allows(&remote) {
                return Err(failed(format!("the peer's key is {remote}; expected {}", policy.expected())));
            }
            send(&mut wire, &mut noise)?;
        } else {
            recv(&mut wire, &mut noise)?;
            send(&mut wire, &mut noise)?;
            recv(&mut wire, &mut noise)?;
        }
        let remote = remote_key(&noise, &peer)?;
        let handshake_hash: [u8; 32] =
            noise.get_handshake_hash().try_into().map_err(|_| failed("a 32-byte handshake hash".into()))?;
        let noise = noise.into_transport_mode().map_err(|e| failed(e.to_string()))?;
        wire.trust();
        Ok(Link { wire, noise, opts, remote, handshake_hash, scratch: Vec::new() })
    })();
    let mut link = outcome?;
    if initiator {
        let answer = link.recv_limited(MAX_REFUSAL_BYTES)?;
        return match answer.tag {
            TAG_LINK_ACCEPTED => Ok(link),
            TAG_LINK_REFUSED => {
                Err(ChannelError::Refused { peer: link.peer(), reason: crate::channel::printable(&answer.payload) })
            }
            other => Err(failed(format!("expected the peer's answer to the handshake, got message tag {other}"))),
        };
    }
    let remote = link.remote;
    if policy.allows(&remote) {
        link.send(TAG_LINK_ACCEPTED, &[])?;
        Ok(link)
    } else {
        let reason = format!("key {remote} is not allowed here");
        let _ = link.send(TAG_LINK_REFUSED, reason.as_bytes());
        link.wire.close();
        Err(ChannelError::Refused { peer: link.peer(), reason: format!("we refused it: {reason}") })
    }
}

fn remote_key(noise: &snow::HandshakeState, peer: &str) -> Result<PublicKey, ChannelError> {
    noise
        .get_remote_static()
        .and_then(|k| <[u8; 32]>::try_from(k).ok())
        .map(PublicKey)
        .ok_or_else(|| ChannelError::Handshake { peer: peer.to_string(), reason: "no static key from the peer".into() })
}

/// Lowercase hex.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// Bytes from hex (either case); `None` for odd lengths or other characters.
pub fn unhex(s: &str) -> Option<Vec<u8>> {
    if !s.len().is_multiple_of(2) {
        return None;
    }
    (0..s.len()).step_by(2).map(|i| s.get(i..i + 2).and_then(|d| u8::from_str_radix(d, 16).ok())).collect()
}
