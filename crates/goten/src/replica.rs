//! The enclaves of servers 0 and 1 as two processes (`--goten-role 0|1`), as Goten runs them:
//! each trains the same model on the same data with the same settings and seed, so both hold the
//! same plaintext, and each drives only its own server's device (enclave 0 also drives server 2).
//!
//! - They share every stream of the protocol (the shares `A0, B0`, the Beaver masks `U, V`, the
//!   output masks and the rounding noise, so that both quantise alike): enclave 0 draws the keys
//!   from the OS and hands them to enclave 1 over their link (Noise XX with pinned keys; the link
//!   ends in the enclaves, so the keys never reach a host).
//! - Per op, after each device's work, they swap partial results: enclave 1 sends `C1`, enclave 0
//!   sends `C0` and server 2's `Z`; both reconstruct, check and dequantise. Each host sees the other
//!   server's partial result and `Z`, both masked by output masks it never holds.
//! - With its partial result each enclave sends a digest of the op's quantised operands. Enclaves
//!   that differ (other settings, data, seed or checkpoint; a non-deterministic kernel) stop at the
//!   first op where they part, with an error that says so, instead of reconstructing garbage.
//!
//! Messages (`tag`, payload): `KEYS` (the four 32-byte stream keys; 0 to 1, once); `PARTIAL`
//! (the op's number, the digest, then `C1`; 1 to 0); `PARTIALS` (the op's number, the digest, then
//! `C0` and `Z`; 0 to 1); `FAILED` (a note, either way).

use std::net::TcpListener;
use std::time::{Duration, Instant};
use trustsplit_boundary::{Channel, ChannelError, KeyPair, Link, LinkPolicy, PublicKey};
use trustsplit_cryptgpu::prg::Prg;

pub mod tag {
    pub const KEYS: u16 = 0x4c01;
    pub const PARTIAL: u16 = 0x4c02;
    pub const PARTIALS: u16 = 0x4c03;
    pub const FAILED: u16 = 0x4cff;
}

/// The purpose the enclaves' link names.
const PURPOSE: &str = "goten enclaves 0 and 1";

/// The keys of the streams the two enclaves share.
pub struct SharedKeys {
    pub shares: [u8; 32],
    pub beaver: [u8; 32],
    pub masks: [u8; 32],
    pub rounding: [u8; 32],
}

impl SharedKeys {
    fn from_os() -> Result<SharedKeys, String> {
        Ok(SharedKeys {
            shares: Prg::os_key()?,
            beaver: Prg::os_key()?,
            masks: Prg::os_key()?,
            rounding: Prg::os_key()?,
        })
    }

    fn to_bytes(&self) -> Vec<u8> {
        [self.shares, self.beaver, self.masks, self.rounding].concat()
    }

    fn from_bytes(b: &[u8]) -> Option<SharedKeys> {
        let key = |i: usize| b.get(32 * i..32 * (i + 1))?.try_into().ok();
        (b.len() == 128).then_some(())?;
        Some(SharedKeys { shares: key(0)?, beaver: key(1)?, masks: key(2)?, rounding: key(3)? })
    }
}

/// This enclave's link to the other one.
pub struct Replica {
    /// 0 or 1.
    pub role: usize,
    link: Box<dyn Channel + Send>,
    /// The other enclave, for errors.
    peer: String,
    /// Ops swapped so far: the number each message carries.
    ops: u64,
}

/// What enclave `role` gets back from a swap: the other server's partial result, and `Z` (which
/// enclave 1 gets from enclave 0).
pub struct Swapped {
    pub other: Vec<u64>,
    pub z: Option<Vec<u64>>,
}

fn words_to_bytes(w: &[u64]) -> impl Iterator<Item = u8> + '_ {
    w.iter().flat_map(|x| x.to_le_bytes())
}

fn bytes_to_words(b: &[u8]) -> Vec<u64> {
    b.chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes"))).collect()
}

impl Replica {
    /// Enclave `role`'s side of a link that is already open: enclave 0 draws the shared keys and
    /// sends them, enclave 1 takes them.
    pub fn open(role: usize, mut link: Box<dyn Channel + Send>, peer: &str) -> Result<(Replica, SharedKeys), String> {
        let failed = |e: ChannelError| format!("goten enclave {}: {e}", 1 - role);
        let keys = match role {
            0 => {
                let keys = SharedKeys::from_os()?;
                link.send(tag::KEYS, &keys.to_bytes()).map_err(failed)?;
                keys
            }
            1 => {
                let payload = link.recv_limited(128).map_err(failed)?;
                if payload.tag != tag::KEYS {
                    return Err(format!(
                        "goten enclave 0 at {peer} sent tag {:#06x} where its keys were due",
                        payload.tag
                    ));
                }
                SharedKeys::from_bytes(&payload.payload).ok_or_else(|| {
                    format!("goten enclave 0 at {peer} sent {} bytes of keys, expected 128", payload.payload.len())
                })?
            }
            r => return Err(format!("--goten-role is 0 or 1 (the enclaves of servers 0 and 1), not {r}")),
        };
        Ok((Replica { role, link, peer: peer.to_string(), ops: 0 }, keys))
    }

    /// Swaps this enclave's partial result of the op whose operands have `digest` for the other
    /// enclave's: enclave 1 sends `C1` first and then takes `C0` and `Z`; enclave 0 takes `C1`
    /// first (so neither blocks the other on a full socket) and then sends `C0` and `z`.
    pub fn swap(&mut self, layer: &str, digest: [u8; 32], own: &[u64], z: Option<&[u64]>) -> Result<Swapped, String> {
        let n = own.len();
        self.ops += 1;
        let header = |digest: &[u8; 32], ops: u64| [&ops.to_le_bytes()[..], &digest[..]].concat();
        if self.role == 1 {
            let mut payload = header(&digest, self.ops);
            payload.extend(words_to_bytes(own));
            self.send(tag::PARTIAL, &payload)?;
            let words = self.take(layer, tag::PARTIALS, &digest, 2 * n)?;
            let (other, z) = words.split_at(n);
            Ok(Swapped { other: other.to_vec(), z: Some(z.to_vec()) })
        } else {
            let z = z.ok_or("enclave 0 swaps server 2's Z, which it has not")?;
            let other = self.take(layer, tag::PARTIAL, &digest, n)?;
            let mut payload = header(&digest, self.ops);
            payload.extend(words_to_bytes(own));
            payload.extend(words_to_bytes(z));
            self.send(tag::PARTIALS, &payload)?;
            Ok(Swapped { other, z: None })
        }
    }

    fn send(&mut self, tag: u16, payload: &[u8]) -> Result<(), String> {
        let other = 1 - self.role;
        self.link.send(tag, payload).map_err(|e| format!("goten enclave {other} at {}: {e}", self.peer))
    }

    /// The other enclave's message `expected` for this op: `words` values after its number and
    /// digest, which must be this op's and match `digest`.
    fn take(&mut self, layer: &str, expected: u16, digest: &[u8; 32], words: usize) -> Result<Vec<u64>, String> {
        let (other, peer) = (1 - self.role, self.peer.clone());
        let frame = self
            .link
            .recv_limited((40 + words * 8).max(1 << 16))
            .map_err(|e| format!("goten enclave {other} at {peer}: {e}"))?;
        if frame.tag == tag::FAILED {
            return Err(format!(
                "goten enclave {other} at {peer} failed: {}",
                trustsplit_boundary::printable(&frame.payload)
            ));
        }
        if frame.tag != expected || frame.payload.len() != 40 + words * 8 {
            return Err(format!(
                "goten enclave {other} at {peer} sent tag {:#06x} with {} bytes, expected {expected:#06x} with {}",
                frame.tag,
                frame.payload.len(),
                40 + words * 8
            ));
        }
        let ops = u64::from_le_bytes(frame.payload[..8].try_into().expect("8 bytes"));
        if ops != self.ops || frame.payload[8..40] != digest[..] {
            let note = format!(
                "{layer}: the enclaves of servers 0 and 1 diverged at their op {} (enclave {other} is at its op {ops}, \
                 on other operands): were both started with the same settings, data, --seed and checkpoint?",
                self.ops
            );
            let _ = self.link.send(tag::FAILED, note.as_bytes());
            return Err(note);
        }
        Ok(bytes_to_words(&frame.payload[40..]))
    }

    /// Tells the other enclave why this one stops (best effort).
    pub fn fail(&mut self, note: &str) {
        let _ = self.link.send(tag::FAILED, note.as_bytes());
    }
}

/// A digest of an op (its layer and encoded shape), the first words the shared streams gave it
/// (`streams`: enclaves whose streams parted, with other settings, differ there), and its two
/// quantised operands (values in [-128, 127], one byte each, and the exponents): what the
/// enclaves compare to know they are computing the same op. It travels only on their link.
pub fn operands_digest(
    layer: &str,
    op: &[u64],
    streams: &[u64],
    a: &crate::quant::Quantised,
    b: &crate::quant::Quantised,
) -> [u8; 32] {
    use sha2::{Digest, Sha256};
    let mut h = Sha256::new();
    h.update((layer.len() as u64).to_le_bytes());
    h.update(layer.as_bytes());
    op.iter().chain(streams).for_each(|w| h.update(w.to_le_bytes()));
    for q in [a, b] {
        h.update((q.values.len() as u64).to_le_bytes());
        h.update(q.exp.to_le_bytes());
        let bytes: Vec<u8> = q.values.iter().map(|&w| w as u8).collect();
        h.update(&bytes);
    }
    h.finalize().into()
}

/// Link options between the enclaves: a message carries two partial results of a layer, and the
/// other enclave may compute for minutes (a test pass) between two messages.
fn options() -> trustsplit_boundary::ChannelOptions {
    crate::network::link_options()
}

/// Enclave 0: waits on `listen` (up to `wait`) for enclave 1 to prove `peer_key`; other
/// connections are refused and `log`ged.
pub fn accept(
    listen: &str,
    key: &KeyPair,
    peer_key: PublicKey,
    wait: Duration,
    log: &mut dyn FnMut(&str),
) -> Result<(Replica, SharedKeys), String> {
    let listener =
        TcpListener::bind(listen).map_err(|e| format!("goten enclave 0: listening on {listen} for enclave 1: {e}"))?;
    listener.set_nonblocking(true).map_err(|e| format!("goten enclave 0: {e}"))?;
    let started = Instant::now();
    let policy = LinkPolicy::Only(vec![peer_key]);
    loop {
        match listener.accept() {
            Ok((stream, from)) => {
                stream.set_nonblocking(false).map_err(|e| format!("goten enclave 0: {e}"))?;
                match Link::accept(stream, PURPOSE, key, &policy, options()) {
                    Ok(link) => return Replica::open(0, Box::new(link), &from.to_string()),
                    Err(e) => log(&format!("goten enclave 0: refused a connection from {from}: {e}")),
                }
            }
            Err(e) if e.kind() == std::io::ErrorKind::WouldBlock => {
                if started.elapsed() > wait {
                    return Err(format!(
                        "goten enclave 0: enclave 1 did not come to {listen} within {} s (start both within that)",
                        wait.as_secs()
                    ));
                }
                std::thread::sleep(Duration::from_millis(50));
            }
            Err(e) => return Err(format!("goten enclave 0: accepting on {listen}: {e}")),
        }
    }
}

/// Enclave 1: dials enclave 0 at `addr` (retrying up to `wait`, so the two may start in either
/// order) and links if it proves `peer_key`.
pub fn connect(
    addr: &str,
    key: &KeyPair,
    peer_key: PublicKey,
    wait: Duration,
) -> Result<(Replica, SharedKeys), String> {
    let started = Instant::now();
    let policy = LinkPolicy::Only(vec![peer_key]);
    loop {
        match Link::connect(addr, PURPOSE, key, &policy, options()) {
            Ok(link) => return Replica::open(1, Box::new(link), addr),
            Err(e) if started.elapsed() < wait && matches!(e, ChannelError::Io { .. }) => {
                std::thread::sleep(Duration::from_millis(200));
            }
            Err(e) => return Err(format!("goten enclave 1: cannot link with enclave 0 at {addr}: {e}")),
        }
    }
}
