//! XOR-shared words: AND, the sign bit of an arithmetic share, and bit injection back into the ring.
//!
//! Party `i` holds `(b_i, b_{i-1})` of `b = b_0 ^ b_1 ^ b_2`, as for arithmetic shares.
//!
//! - [`Party::and`] / [`Party::and_batch`]: `z_i = x_i y_i ^ x_i y_{i-1} ^ x_{i-1} y_i ^ beta_i`
//!   (`beta` a fresh XOR zero sharing), sent to `next`. One round; the bits a caller asks for
//!   (a mask per operand) are packed, so `k` useful bits per element cost `k/8` bytes, not 8.
//! - [`Party::msb`]: the sign of `x = x_0 + x_1 + x_2` over the full 64-bit ring. `x = a + b` with
//!   `a = x_0 + x_2` (party 0 holds both parts) and `b = x_1` (held by parties 1 and 2, so already
//!   a replicated XOR sharing `(0, x_1, 0)`). Party 0 XOR-shares `a` as `(a ^ r, 0, r)`, and with
//!   it `a_h & a_l` (the one product of `a` with itself that the first carry level needs), where `r`
//!   is drawn from the stream it shares with party 2: every product of the first level is then a
//!   product of an `a`-term and a `b`-term, which parties 1 and 2 compute locally, so that level
//!   costs one re-sharing round, not two. Five more levels of a log-depth prefix tree follow (the
//!   top of Kogge-Stone: only the carry into bit 63 is wanted). 7 rounds. The circuit runs
//!   bit-sliced ([`crate::bitslice`]: 64 elements per word, one word per bit), so every gate is
//!   one word operation for 64 elements and no round packs bits. Bytes per element:
//!   party 0 sends 95 bits in round 1; every party sends 63 + 31 + 15 + 7 + 3 + 1 = 120 bits in the
//!   six AND rounds, so 26.9 bytes for party 0 and 15 for parties 1 and 2 (19 on average).
//! - [`Party::bit_to_arith`]: an XOR-shared bit to an arithmetic 0/1 (an integer, not fixed
//!   point). Party 1 knows `u = c_0 ^ c_1`, parties 0 and 2 know `c_2`, and `c = c_2 + (1 - 2 c_2) u`
//!   is linear in `u` once `c_2` is known. 2 rounds, 8 bytes per element from each party.
//!
//! ## Why no message reveals anything
//! Every message is one-time padded with a stream its receiver lacks. An AND part `z_i` carries
//! `beta_i = F(k_i) ^ F(k_{i-1})` and goes to party `i + 1`, which lacks `k_{i-1}`. In the sign's
//! first round party 1 receives `a ^ r` and `(a_h & a_l) ^ r'`, with `r, r'` from the stream of
//! parties 0 and 2. In the bit injection, party 2 receives `u - r` (`r` from the stream of parties 0
//! and 1), and party 1 receives `y_0 = w_0 - s - m` and `y_1 = w_2 + m` (`s, m` from the stream of
//! parties 0 and 2): independent and uniform. Outputs are fresh sharings, so later protocols may
//! open or combine them like any other share.

use crate::arith::AShare;
use crate::bitslice;
use crate::party::{tag, MpcError, Party, Side};

/// A replicated XOR share of bit-sliced words ([`crate::bitslice`]): this party's `(b_i, b_{i-1})`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub(crate) struct Sliced {
    pub cur: Vec<u64>,
    pub prev: Vec<u64>,
}

impl Sliced {
    /// `b ^ 1...1` (a NOT of every bit): part 0 carries the constant.
    pub fn not(&self, party_id: usize) -> Sliced {
        let mut out = self.clone();
        match party_id {
            0 => out.cur.iter_mut().for_each(|w| *w = !*w),
            1 => out.prev.iter_mut().for_each(|w| *w = !*w),
            _ => {}
        }
        out
    }

    /// Words `range` of both parts.
    pub fn words(&self, range: std::ops::Range<usize>) -> Sliced {
        Sliced { cur: self.cur[range.clone()].to_vec(), prev: self.prev[range].to_vec() }
    }

    /// Bit 0 of each of `n` elements, one per word, with `shape`.
    pub fn unslice(&self, shape: &[usize]) -> BShare {
        let n = shape.iter().product();
        BShare {
            shape: shape.to_vec(),
            cur: bitslice::unslice_bit(&self.cur, n),
            prev: bitslice::unslice_bit(&self.prev, n),
        }
    }
}

/// A replicated XOR share of a tensor of 64-bit words: this party's `(b_i, b_{i-1})`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct BShare {
    pub shape: Vec<usize>,
    pub cur: Vec<u64>,
    pub prev: Vec<u64>,
}

impl BShare {
    pub fn len(&self) -> usize {
        self.cur.len()
    }

    pub fn is_empty(&self) -> bool {
        self.cur.is_empty()
    }

    /// `b ^ c` for a public word `c`: part 0 carries it (party 0's `cur`, party 1's `prev`).
    pub fn xor_public(&self, party_id: usize, c: u64) -> BShare {
        let mut out = self.clone();
        match party_id {
            0 => out.cur.iter_mut().for_each(|w| *w ^= c),
            1 => out.prev.iter_mut().for_each(|w| *w ^= c),
            _ => {}
        }
        out
    }
}

/// The bits of `w` under `mask`, moved down to the lowest positions (in order).
fn extract(w: u64, mask: u64) -> u64 {
    let low = mask.trailing_zeros();
    let run = mask.checked_shr(low).unwrap_or(0);
    if run & run.wrapping_add(1) == 0 {
        return (w >> (low & 63)) & run; // contiguous (or empty) mask
    }
    let (mut out, mut m, mut i) = (0, mask, 0);
    while m != 0 {
        out |= ((w >> m.trailing_zeros()) & 1) << i;
        i += 1;
        m &= m - 1;
    }
    out
}

/// The inverse of [`extract`]: the low bits of `v` spread to the positions of `mask`.
fn deposit(v: u64, mask: u64) -> u64 {
    let low = mask.trailing_zeros();
    let run = mask.checked_shr(low).unwrap_or(0);
    if run & run.wrapping_add(1) == 0 {
        return (v & run) << (low & 63);
    }
    let (mut out, mut m, mut i) = (0, mask, 0);
    while m != 0 {
        out |= ((v >> i) & 1) << m.trailing_zeros();
        i += 1;
        m &= m - 1;
    }
    out
}

/// Appends fields of 0..=64 bits to a stream of words.
struct BitWriter {
    words: Vec<u64>,
    bits: usize,
}

impl BitWriter {
    fn new(bits: usize) -> BitWriter {
        BitWriter { words: Vec::with_capacity(bits.div_ceil(64)), bits: 0 }
    }

    /// `v` must have no bits at or above `k`.
    fn push(&mut self, v: u64, k: u32) {
        if k == 0 {
            return;
        }
        let off = (self.bits % 64) as u32;
        if off == 0 {
            self.words.push(v);
        } else {
            *self.words.last_mut().expect("a partial word") |= v << off;
            if off + k > 64 {
                self.words.push(v >> (64 - off));
            }
        }
        self.bits += k as usize;
    }
}

struct BitReader<'a> {
    words: &'a [u64],
    bits: usize,
}

impl BitReader<'_> {
    fn take(&mut self, k: u32) -> u64 {
        if k == 0 {
            return 0;
        }
        let (i, off) = (self.bits / 64, (self.bits % 64) as u32);
        let mut v = self.words[i] >> off;
        if off + k > 64 {
            v |= self.words[i + 1] << (64 - off);
        }
        self.bits += k as usize;
        if k < 64 {
            v & ((1 << k) - 1)
        } else {
            v
        }
    }
}

/// The bits of `mask` from each word, element after element, in 64-bit words: with `mask = 1`,
/// 64 elements per word.
pub fn pack_bits(words: &[u64], mask: u64) -> Vec<u64> {
    let k = mask.count_ones();
    let mut w = BitWriter::new(words.len() * k as usize);
    words.iter().for_each(|&v| w.push(extract(v, mask), k));
    w.words
}

/// `n` words back from [`pack_bits`]: the bits outside `mask` are zero.
pub fn unpack_bits(packed: &[u64], mask: u64, n: usize) -> Vec<u64> {
    let k = mask.count_ones();
    let mut r = BitReader { words: packed, bits: 0 };
    (0..n).map(|_| deposit(r.take(k), mask)).collect()
}

impl Party {
    /// Re-shares 3-out-of-3 XOR parts (each with the mask of its useful bits) in one round: packs
    /// the useful bits, adds a fresh XOR zero sharing to the packed words (so the random streams
    /// pay only for the bits sent), sends them to `next`.
    fn reshare_bits(
        &mut self,
        parts: Vec<(Vec<u64>, u64, &[usize])>,
        protocol: &'static str,
    ) -> Result<Vec<BShare>, MpcError> {
        let bits: usize = parts.iter().map(|(z, m, _)| z.len() * m.count_ones() as usize).sum();
        let mut w = BitWriter::new(bits);
        for (z, mask, _) in &parts {
            z.iter().for_each(|&v| w.push(extract(v, *mask), mask.count_ones()));
        }
        let mut own = w.words;
        let beta = self.xor_zero_share(own.len());
        own.iter_mut().zip(&beta).for_each(|(v, b)| *v ^= b);
        self.send(Side::Next, tag::AND, protocol, &own)?;
        let got = self.recv(Side::Prev, tag::AND, "a re-shared binary part", own.len())?;
        self.count_rounds(protocol, 1);
        let (mut mine, mut theirs) = (BitReader { words: &own, bits: 0 }, BitReader { words: &got, bits: 0 });
        Ok(parts
            .iter()
            .map(|(z, mask, shape)| {
                let k = mask.count_ones();
                let cur = (0..z.len()).map(|_| deposit(mine.take(k), *mask)).collect();
                let prev = (0..z.len()).map(|_| deposit(theirs.take(k), *mask)).collect();
                BShare { shape: shape.to_vec(), cur, prev }
            })
            .collect())
    }

    /// `x & y` for several pairs at once, one round: only the bits of each pair's mask are
    /// computed and sent (the others are zero in the result).
    pub fn and_batch(
        &mut self,
        ops: &[(&BShare, &BShare, u64)],
        protocol: &'static str,
    ) -> Result<Vec<BShare>, MpcError> {
        let parts = ops
            .iter()
            .map(|(x, y, mask)| {
                assert_eq!(x.len(), y.len(), "and: operand lengths");
                let z = (0..x.len()).map(|e| (x.cur[e] & (y.cur[e] ^ y.prev[e])) ^ (x.prev[e] & y.cur[e])).collect();
                (z, *mask, x.shape.as_slice())
            })
            .collect();
        self.reshare_bits(parts, protocol)
    }

    /// `x & y` on whole words. One round, 8 bytes per element.
    pub fn and(&mut self, x: &BShare, y: &BShare) -> Result<BShare, MpcError> {
        Ok(self.and_batch(&[(x, y, !0)], "and")?.remove(0))
    }

    /// Bit 0 of each word: the most significant bit (the sign) of `x` (module docs: 7 rounds).
    pub fn msb(&mut self, x: &AShare) -> Result<BShare, MpcError> {
        Ok(self.msb_sliced(x)?.unslice(&x.shape))
    }

    /// The sign of each element of `x`, one bit-sliced word per 64 elements ([`crate::bitslice`]):
    /// the circuit of [`Party::msb`] on whole words.
    pub(crate) fn msb_sliced(&mut self, x: &AShare) -> Result<Sliced, MpcError> {
        const P: &str = "msb";
        let n = x.len();
        let nb = bitslice::blocks(n);
        let mut r63 = Vec::new(); // party 0's part r of a, at bit 63
                                  // Round 1: a = x_0 + x_2, and f_k = a_{2k} & a_{2k-1} for k = 1..=31 (the products of
                                  // the two leaves of each pair; pair 0 holds the zero leaf, so f_0 = 0 is never sent).
                                  // `t` is this party's part of a, `tf` of f, `xb` its copy of b = x_1 (zero for party 0).
        let (t, tf, xb) = match self.id {
            0 => {
                let a = bitslice::slice(x.cur.iter().zip(&x.prev).map(|(c, p)| c.wrapping_add(*p)));
                let r = self.common_with_prev(64 * nb);
                let rf = self.common_with_prev(31 * nb);
                let mut sent = Vec::with_capacity(95 * nb);
                for b in 0..nb {
                    let a = &a[64 * b..64 * b + 64];
                    sent.extend((0..64).map(|j| a[j] ^ r[64 * b + j]));
                    sent.extend((1..32).map(|k| (a[2 * k] & a[2 * k - 1]) ^ rf[31 * b + k - 1]));
                }
                self.send(Side::Next, tag::BINARY_SHARE, P, &sent)?;
                // Party 0's parts: a ^ r (sent to party 1) and r (common with party 2); its part
                // of f is the whole f, as the sum of those two.
                let f = (0..nb)
                    .flat_map(|b| (1..32).map(move |k| (b, k)))
                    .map(|(b, k)| a[64 * b + 2 * k] & a[64 * b + 2 * k - 1])
                    .collect();
                r63 = (0..nb).map(|b| r[64 * b + 63]).collect();
                (a, f, Vec::new())
            }
            1 => {
                let got = self.recv(Side::Prev, tag::BINARY_SHARE, "the sign's shared addend", 95 * nb)?;
                let (mut t, mut tf) = (Vec::with_capacity(64 * nb), Vec::with_capacity(31 * nb));
                for block in got.chunks_exact(95) {
                    t.extend_from_slice(&block[..64]);
                    tf.extend_from_slice(&block[64..]);
                }
                (t, tf, bitslice::slice(x.cur.iter().copied()))
            }
            _ => {
                let r = self.common_with_next(64 * nb);
                let rf = self.common_with_next(31 * nb);
                (r, rf, bitslice::slice(x.prev.iter().copied()))
            }
        };
        self.count_rounds(P, 1);

        // Level 1 (pairs of leaves; leaf 0 is zero, leaf i is bit i - 1), as 3-out-of-3 parts:
        // with p = a ^ b and g = a & b,
        //   G = g_h ^ p_h g_l = a_h b_h ^ (a_h a_l) b_l ^ a_l (b_h b_l),
        //   P = p_h p_l = (a_h a_l) ^ (b_h b_l) ^ a_h b_l ^ a_l b_h.
        // A product of an a-term (parts (t_0, 0, t_2)) and a b-term (parts (0, x_1, 0)) has parts
        // (0, t_0 x_1, t_2 x_1): party 1 holds t_0, party 2 holds t_2, both hold x_1. Party 0's
        // part of P is f; the b-only term goes to party 1. Per block: 32 G words, 31 P words
        // (pair 0's propagate is never needed).
        let mut level = vec![0u64; 63 * nb];
        for b in 0..nb {
            let out = &mut level[63 * b..63 * b + 63];
            if self.id == 0 {
                out[32..].copy_from_slice(&tf[31 * b..31 * b + 31]);
                continue;
            }
            let (t, xb) = (&t[64 * b..64 * b + 64], &xb[64 * b..64 * b + 64]);
            for k in 0..32 {
                let (ah, bh) = (t[2 * k], xb[2 * k]);
                let (al, bl) = if k == 0 { (0, 0) } else { (t[2 * k - 1], xb[2 * k - 1]) };
                let f = if k == 0 { 0 } else { tf[31 * b + k - 1] };
                out[k] = (ah & bh) ^ (f & bl) ^ (al & bh & bl);
                if k > 0 {
                    out[31 + k] = (ah & bl) ^ (al & bh) ^ if self.id == 1 { bh & bl } else { 0 };
                }
            }
        }
        let (mut cur, mut prev) = self.reshare_words(level, P)?;

        // Levels 2..=6: group j of the next level joins groups 2j (low) and 2j + 1 (high),
        //   G' = G_h ^ P_h G_l,  P' = P_h P_l  (j >= 1).
        // Per block the words are G_0..G_{m-1} then P_1..P_{m-1}.
        let mut groups = 32;
        while groups > 1 {
            let (m, next) = (groups, groups / 2);
            let width = 2 * m - 1;
            let and =
                |x: usize, y: usize, cur: &[u64], prev: &[u64]| (cur[x] & (cur[y] ^ prev[y])) ^ (prev[x] & cur[y]);
            let g = |j: usize| j;
            let p = |j: usize| m + j - 1;
            let mut parts = vec![0u64; (2 * next - 1) * nb];
            for b in 0..nb {
                let (c, pr) = (&cur[width * b..width * (b + 1)], &prev[width * b..width * (b + 1)]);
                let out = &mut parts[(2 * next - 1) * b..(2 * next - 1) * (b + 1)];
                for j in 0..next {
                    out[j] = and(p(2 * j + 1), g(2 * j), c, pr);
                    if j > 0 {
                        out[next + j - 1] = and(p(2 * j + 1), p(2 * j), c, pr);
                    }
                }
            }
            let (c2, p2) = self.reshare_words(parts, P)?;
            // G' = G_h ^ (P_h G_l): add the local G_h to the fresh product's parts.
            let (mut c3, mut p3) = (c2, p2);
            for b in 0..nb {
                for j in 0..next {
                    c3[(2 * next - 1) * b + j] ^= cur[width * b + g(2 * j + 1)];
                    p3[(2 * next - 1) * b + j] ^= prev[width * b + g(2 * j + 1)];
                }
            }
            (cur, prev) = (c3, p3);
            groups = next;
        }
        // The sign is a_63 ^ b_63 ^ (the carry into bit 63). As replicated XOR shares, party i
        // holds (t_i, t_{i-1}) of a's parts (a ^ r, 0, r) and of b's parts (0, x_1, 0).
        for b in 0..nb {
            let (t63, x63) = (t[64 * b + 63], xb.get(64 * b + 63).copied().unwrap_or(0));
            let (c, p) = match self.id {
                0 => (t63 ^ r63[b], r63[b]),
                1 => (x63, t63),
                _ => (t63, x63),
            };
            cur[b] ^= c;
            prev[b] ^= p;
        }
        Ok(Sliced { cur, prev })
    }

    /// Re-shares 3-out-of-3 XOR parts that are whole words (one round): adds a fresh XOR zero
    /// sharing and sends the result to `next`.
    fn reshare_words(&mut self, mut own: Vec<u64>, protocol: &'static str) -> Result<(Vec<u64>, Vec<u64>), MpcError> {
        let beta = self.xor_zero_share(own.len());
        own.iter_mut().zip(&beta).for_each(|(v, b)| *v ^= b);
        self.send(Side::Next, tag::AND, protocol, &own)?;
        let got = self.recv(Side::Prev, tag::AND, "a re-shared binary part", own.len())?;
        self.count_rounds(protocol, 1);
        Ok((own, got))
    }

    /// `x & y` on bit-sliced words, one round.
    pub(crate) fn and_sliced(&mut self, x: &Sliced, y: &Sliced, protocol: &'static str) -> Result<Sliced, MpcError> {
        assert_eq!(x.cur.len(), y.cur.len(), "and: operand lengths");
        let z = (0..x.cur.len()).map(|e| (x.cur[e] & (y.cur[e] ^ y.prev[e])) ^ (x.prev[e] & y.cur[e])).collect();
        let (cur, prev) = self.reshare_words(z, protocol)?;
        Ok(Sliced { cur, prev })
    }

    /// An arithmetic share of the integer 0/1 in bit 0 of each word (module docs: 2 rounds).
    /// Party 1 splits `u` as `r + (u - r)` (`r` shared with party 0, `u - r` sent to party 2);
    /// parties 0 and 2, who know `c_2`, each map their half through `v -> (1 - 2 c_2) v` (party 0
    /// adds `c_2`), and mask it with `s, m` from their common stream into `y_0 = w_0 - s - m` and
    /// `y_1 = w_2 + m`, which go to party 1; `y_2 = s`. Party 0's message goes in round 1.
    pub fn bit_to_arith(&mut self, bit: &BShare) -> Result<AShare, MpcError> {
        const P: &str = "b2a";
        let n = bit.len();
        let shape = bit.shape.clone();
        // (1 - 2 c_2) v: v or -v.
        let flip = |c2: u64, v: u64| v.wrapping_mul(1u64.wrapping_sub(2 * (c2 & 1)));
        let share = match self.id {
            0 => {
                let r = self.common_with_next(n);
                let s = self.common_with_prev(n);
                let m = self.common_with_prev(n);
                // w_0 = c_2 + (1 - 2 c_2) r: party 0's half of c = c_2 + (1 - 2 c_2)(r + (u - r)).
                let y0: Vec<u64> = (0..n)
                    .map(|e| ((bit.prev[e] & 1) + flip(bit.prev[e], r[e])).wrapping_sub(s[e]).wrapping_sub(m[e]))
                    .collect();
                self.send(Side::Next, tag::BIT_INJECT_1, P, &y0)?;
                AShare { shape, cur: y0, prev: s }
            }
            1 => {
                let r = self.common_with_prev(n);
                let v: Vec<u64> = (0..n).map(|e| ((bit.cur[e] ^ bit.prev[e]) & 1).wrapping_sub(r[e])).collect();
                self.send(Side::Next, tag::BIT_INJECT_1, P, &v)?;
                let y0 = self.recv(Side::Prev, tag::BIT_INJECT_1, "the bit injection's first part", n)?;
                let y1 = self.recv(Side::Next, tag::BIT_INJECT_2, "the bit injection's second part", n)?;
                AShare { shape, cur: y1, prev: y0 }
            }
            _ => {
                let s = self.common_with_next(n);
                let m = self.common_with_next(n);
                let v = self.recv(Side::Prev, tag::BIT_INJECT_1, "the bit injection's masked bit", n)?;
                let y1: Vec<u64> = (0..n).map(|e| flip(bit.cur[e], v[e]).wrapping_add(m[e])).collect();
                self.send(Side::Prev, tag::BIT_INJECT_2, P, &y1)?;
                AShare { shape, cur: s, prev: y1 }
            }
        };
        self.count_rounds(P, 2);
        Ok(share)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arith::tests::run3;
    use crate::arith::{combine, replicated};
    use crate::ring::FixedPoint;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    fn share_bits(values: &[u64], rng: &mut ChaCha8Rng) -> [BShare; 3] {
        let mut parts = [0, 1].map(|_| (0..values.len()).map(|_| rng.random::<u64>()).collect::<Vec<u64>>());
        let last = values.iter().zip(parts[0].iter().zip(&parts[1])).map(|(v, (a, b))| v ^ a ^ b).collect();
        let parts = [std::mem::take(&mut parts[0]), std::mem::take(&mut parts[1]), last];
        [0, 1, 2].map(|i| BShare { shape: vec![values.len()], cur: parts[i].clone(), prev: parts[(i + 2) % 3].clone() })
    }

    fn open_bits(s: &[BShare; 3]) -> Vec<u64> {
        for i in 0..3 {
            assert_eq!(s[i].prev, s[(i + 2) % 3].cur, "party {i}'s replica differs");
        }
        (0..s[0].len()).map(|e| s[0].cur[e] ^ s[1].cur[e] ^ s[2].cur[e]).collect()
    }

    fn share_ring(values: &[u64], rng: &mut ChaCha8Rng) -> [AShare; 3] {
        let a: Vec<u64> = (0..values.len()).map(|_| rng.random()).collect();
        let b: Vec<u64> = (0..values.len()).map(|_| rng.random()).collect();
        let c = values.iter().zip(a.iter().zip(&b)).map(|(v, (x, y))| v.wrapping_sub(*x).wrapping_sub(*y)).collect();
        let parts = [a, b, c];
        [0, 1, 2].map(|i| replicated(&parts, i, &[values.len()]))
    }

    #[test]
    fn bit_helpers_round_trip() {
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        for mask in [1u64, !0, 0xffff_fffe, 0x8000_0000_0000_0001, 0x5555, 0, 0xf0f0] {
            for n in [0usize, 1, 63, 64, 65, 300] {
                let words: Vec<u64> = (0..n).map(|_| rng.random()).collect();
                let packed = pack_bits(&words, mask);
                assert_eq!(packed.len(), (n * mask.count_ones() as usize).div_ceil(64));
                let back = unpack_bits(&packed, mask, n);
                assert!(back.iter().zip(&words).all(|(b, w)| *b == w & mask), "mask {mask:x}, n {n}");
            }
        }
    }

    #[test]
    fn and_matches_plaintext_and_sends_only_masked_bits() {
        let mut rng = ChaCha8Rng::seed_from_u64(6);
        let n = 333;
        let x: Vec<u64> = (0..n).map(|_| rng.random()).collect();
        let y: Vec<u64> = (0..n).map(|_| rng.random()).collect();
        let (xs, ys) = (share_bits(&x, &mut rng), share_bits(&y, &mut rng));
        let out = run3(FixedPoint::default(), |p| {
            let full = p.and(&xs[p.id], &ys[p.id]).unwrap();
            let bit = p.and_batch(&[(&xs[p.id], &ys[p.id], 1)], "bit").unwrap().remove(0);
            (full, bit, p.traffic().clone())
        });
        let full = open_bits(&[out[0].0.clone(), out[1].0.clone(), out[2].0.clone()]);
        let bit = open_bits(&[out[0].1.clone(), out[1].1.clone(), out[2].1.clone()]);
        for e in 0..n {
            assert_eq!(full[e], x[e] & y[e]);
            assert_eq!(bit[e], x[e] & y[e] & 1);
        }
        let t = &out[0].2;
        assert_eq!(t[&(String::new(), "and")].bytes_sent, 8 * n as u64);
        assert_eq!(t[&(String::new(), "bit")].bytes_sent, 8 * n.div_ceil(64) as u64);
        assert_eq!(t[&(String::new(), "bit")].rounds, 1);
    }

    #[test]
    fn msb_is_the_sign_over_the_full_ring() {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let mut x: Vec<u64> =
            vec![0, 1, !0, 1 << 63, (1 << 63) - 1, (1 << 63) + 1, 1 << 62, (1u64 << 62).wrapping_neg()];
        x.extend((0..3000).map(|_| rng.random::<u64>()));
        // Near +-2^63, and small magnitudes of both signs.
        x.extend((0..200).map(|_| (1u64 << 63).wrapping_add(rng.random_range(0..1024u64)).wrapping_sub(512)));
        x.extend((0..200).map(|_| rng.random_range(-4096i64..4096) as u64));
        let xs = share_ring(&x, &mut rng);
        let out = run3(FixedPoint::default(), |p| (p.msb(&xs[p.id]).unwrap(), p.traffic().clone()));
        let sign = open_bits(&[out[0].0.clone(), out[1].0.clone(), out[2].0.clone()]);
        for (s, v) in sign.iter().zip(&x) {
            assert_eq!(*s, v >> 63, "msb of {v:#x}");
        }
        let n = x.len();
        // Bit-sliced: whole words per block of 64 elements (the last block padded).
        let blocks = n.div_ceil(64);
        let and_words: usize = [63, 31, 15, 7, 3, 1].iter().map(|b| b * blocks).sum();
        for (i, o) in out.iter().enumerate() {
            let t = o.1[&(String::new(), "msb")];
            assert_eq!(t.rounds, 7);
            let first = if i == 0 { 95 * blocks } else { 0 };
            assert_eq!(t.bytes_sent, 8 * (first + and_words) as u64, "party {i}");
        }
    }

    #[test]
    fn bit_injection_gives_integer_zero_or_one() {
        let mut rng = ChaCha8Rng::seed_from_u64(8);
        let n = 1000;
        // Garbage above bit 0 must be ignored.
        let words: Vec<u64> = (0..n).map(|_| rng.random()).collect();
        let bs = share_bits(&words, &mut rng);
        let out = run3(FixedPoint::default(), |p| (p.bit_to_arith(&bs[p.id]).unwrap(), p.traffic().clone()));
        for i in 0..3 {
            assert_eq!(out[i].0.prev, out[(i + 2) % 3].0.cur);
            let t = out[i].1[&(String::new(), "b2a")];
            assert_eq!((t.rounds, t.bytes_sent), (2, 8 * n as u64));
        }
        let v = combine([&out[0].0.cur, &out[1].0.cur, &out[2].0.cur]);
        assert!(v.iter().zip(&words).all(|(v, w)| *v == w & 1));
    }
}
