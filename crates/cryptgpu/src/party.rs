//! One party: its links to the other two, its random streams, and its traffic counters.
//!
//! Parties sit on a ring: party `i`'s `next` is `i + 1` and its `prev` is `i - 1` (mod 3). A
//! replicated share gives party `i` the pair `(x_i, x_{i-1})` of `x = x_0 + x_1 + x_2`. Party `i`
//! shares the key `k_i` with `next` and `k_{i-1}` with `prev`.

use crate::prg::{Key, Prg};
use crate::ring::FixedPoint;
use std::collections::BTreeMap;
use trustsplit_boundary::{Channel, ChannelError};

/// Why a protocol step failed.
#[derive(Debug, thiserror::Error)]
pub enum MpcError {
    #[error("party {party}: link to party {peer} failed: {source}")]
    Link { party: usize, peer: usize, source: ChannelError },
    #[error("party {party}: party {peer} sent {found} bytes for {what}, expected {expected}")]
    Malformed { party: usize, peer: usize, what: &'static str, expected: usize, found: usize },
    #[error(
        "party {party}: party {peer} sent message tag {found:#06x} where {what} (tag {expected:#06x}) was due; the \
         parties are out of step"
    )]
    OutOfStep { party: usize, peer: usize, what: &'static str, expected: u16, found: u16 },
    #[error("party {party}: {reason}")]
    Setup { party: usize, reason: String },
    #[error("{0}")]
    Invalid(String),
}

/// Bytes, messages and communication rounds of one protocol in one layer.
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, serde::Serialize, serde::Deserialize)]
pub struct Traffic {
    pub bytes_sent: u64,
    pub messages: u64,
    pub rounds: u64,
}

impl Traffic {
    pub fn add(&mut self, other: &Traffic) {
        self.bytes_sent += other.bytes_sent;
        self.messages += other.messages;
        self.rounds += other.rounds;
    }
}

/// Message tags: each protocol step has its own, so parties that fall out of step are caught at
/// the first message instead of computing on the wrong values.
pub mod tag {
    pub const KEY: u16 = 0x4701;
    pub const RESHARE: u16 = 0x4702;
    pub const TRUNCATE_1: u16 = 0x4703;
    pub const TRUNCATE_2: u16 = 0x4704;
    pub const REVEAL: u16 = 0x4705;
    pub const AND: u16 = 0x4706;
    pub const BINARY_SHARE: u16 = 0x4707;
    pub const BIT_INJECT_1: u16 = 0x4708;
    pub const BIT_INJECT_2: u16 = 0x4709;
}

/// Which neighbour a message goes to or comes from.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Side {
    Next,
    Prev,
}

pub struct Party {
    pub id: usize,
    next: Box<dyn Channel>,
    prev: Box<dyn Channel>,
    /// The stream of `k_id`, shared with `next`.
    prg_next: Prg,
    /// The stream of `k_{id-1}`, shared with `prev`.
    prg_prev: Prg,
    pub fp: FixedPoint,
    /// The layer the next protocol steps are counted under.
    scope: String,
    traffic: BTreeMap<(String, &'static str), Traffic>,
}

impl Party {
    /// Party `id` over its links to `next` and `prev`: draws `k_id` from the OS, sends it to
    /// `next` and receives `k_{id-1}` from `prev` (the links are the authenticated, encrypted ones
    /// between processes, or memory within one).
    pub fn connect(
        id: usize,
        mut next: Box<dyn Channel>,
        mut prev: Box<dyn Channel>,
        fp: FixedPoint,
    ) -> Result<Party, MpcError> {
        if id > 2 {
            return Err(MpcError::Setup { party: id, reason: "party ids are 0, 1 and 2".into() });
        }
        let own = Prg::os_key().map_err(|reason| MpcError::Setup { party: id, reason })?;
        next.send(tag::KEY, &own).map_err(|source| MpcError::Link { party: id, peer: (id + 1) % 3, source })?;
        let peer = (id + 2) % 3;
        let got = prev.recv_limited(32).map_err(|source| MpcError::Link { party: id, peer, source })?;
        let what = "the pairwise key";
        if got.tag != tag::KEY {
            return Err(MpcError::OutOfStep { party: id, peer, what, expected: tag::KEY, found: got.tag });
        }
        if got.payload.len() != 32 {
            return Err(MpcError::Malformed { party: id, peer, what, expected: 32, found: got.payload.len() });
        }
        let theirs: Key = got.payload.try_into().expect("32 bytes");
        Ok(Party {
            id,
            next,
            prev,
            prg_next: Prg::from_key(own),
            prg_prev: Prg::from_key(theirs),
            fp,
            scope: String::new(),
            traffic: BTreeMap::new(),
        })
    }

    pub fn next_id(&self) -> usize {
        (self.id + 1) % 3
    }

    pub fn prev_id(&self) -> usize {
        (self.id + 2) % 3
    }

    /// Counts the following protocol steps under `layer`.
    pub fn set_scope(&mut self, layer: &str) {
        self.scope = layer.to_string();
    }

    /// Traffic by (layer, protocol), for this party.
    pub fn traffic(&self) -> &BTreeMap<(String, &'static str), Traffic> {
        &self.traffic
    }

    pub fn total_traffic(&self) -> Traffic {
        let mut t = Traffic::default();
        self.traffic.values().for_each(|v| t.add(v));
        t
    }

    pub fn reset_traffic(&mut self) {
        self.traffic.clear();
    }

    /// Counts `n` rounds of `protocol` (every party counts the same).
    pub fn count_rounds(&mut self, protocol: &'static str, n: u64) {
        self.traffic.entry((self.scope.clone(), protocol)).or_default().rounds += n;
    }

    /// Sends ring elements to a neighbour.
    pub fn send(&mut self, to: Side, tag: u16, protocol: &'static str, values: &[u64]) -> Result<(), MpcError> {
        let bytes: &[u8] = bytemuck::cast_slice(values);
        let entry = self.traffic.entry((self.scope.clone(), protocol)).or_default();
        entry.bytes_sent += bytes.len() as u64;
        entry.messages += 1;
        let (channel, peer) = match to {
            Side::Next => (&mut self.next, (self.id + 1) % 3),
            Side::Prev => (&mut self.prev, (self.id + 2) % 3),
        };
        channel.send(tag, bytes).map_err(|source| MpcError::Link { party: self.id, peer, source })
    }

    /// Receives exactly `n` ring elements from a neighbour; anything else is refused.
    pub fn recv(&mut self, from: Side, tag: u16, what: &'static str, n: usize) -> Result<Vec<u64>, MpcError> {
        let (channel, peer) = match from {
            Side::Next => (&mut self.next, (self.id + 1) % 3),
            Side::Prev => (&mut self.prev, (self.id + 2) % 3),
        };
        let frame = channel.recv_limited(n * 8).map_err(|source| MpcError::Link { party: self.id, peer, source })?;
        if frame.tag != tag {
            return Err(MpcError::OutOfStep { party: self.id, peer, what, expected: tag, found: frame.tag });
        }
        if frame.payload.len() != n * 8 {
            return Err(MpcError::Malformed {
                party: self.id,
                peer,
                what,
                expected: n * 8,
                found: frame.payload.len(),
            });
        }
        let mut out = vec![0u64; n];
        bytemuck::cast_slice_mut::<u64, u8>(&mut out).copy_from_slice(&frame.payload);
        Ok(out)
    }

    /// A fresh pseudo-random zero sharing: `alpha_i = F(k_i) - F(k_{i-1})`, so that the three
    /// parties' values sum to zero while each looks uniform to the other two. No communication.
    pub fn zero_share(&mut self, n: usize) -> Vec<u64> {
        let mut a = self.prg_next.ring(n);
        let b = self.prg_prev.ring(n);
        crate::ring::sub_assign(&mut a, &b);
        a
    }

    /// A fresh XOR zero sharing: `beta_i = F(k_i) ^ F(k_{i-1})`.
    pub fn xor_zero_share(&mut self, n: usize) -> Vec<u64> {
        let mut a = self.prg_next.ring(n);
        let b = self.prg_prev.ring(n);
        a.iter_mut().zip(&b).for_each(|(x, y)| *x ^= y);
        a
    }

    /// `n` values of the stream shared with `next`.
    pub fn common_with_next(&mut self, n: usize) -> Vec<u64> {
        self.prg_next.ring(n)
    }

    /// `n` values of the stream shared with `prev`.
    pub fn common_with_prev(&mut self, n: usize) -> Vec<u64> {
        self.prg_prev.ring(n)
    }
}

/// Three parties connected in memory (threads of one process), for tests and one-machine runs.
pub fn local_links() -> [(Box<dyn Channel>, Box<dyn Channel>); 3] {
    use trustsplit_boundary::{ChannelOptions, InProcessChannel};
    let opts = ChannelOptions { max_frame_bytes: 1 << 31, timeout: Some(std::time::Duration::from_secs(600)) };
    // (a, b): a is held by the lower party of the pair.
    let (p01, p10) = InProcessChannel::pair(opts);
    let (p12, p21) = InProcessChannel::pair(opts);
    let (p20, p02) = InProcessChannel::pair(opts);
    [
        (Box::new(p01) as Box<dyn Channel>, Box::new(p02) as Box<dyn Channel>),
        (Box::new(p12), Box::new(p10)),
        (Box::new(p20), Box::new(p21)),
    ]
}
