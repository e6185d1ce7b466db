//! Arithmetic shares and their protocols: sharing, revealing, products and truncation.
//!
//! Party `i` holds `(x_i, x_{i-1})` of `x = x_0 + x_1 + x_2 (mod 2^64)`. A product of two shared
//! values is computed locally as a 3-out-of-3 sharing, `z_i = x_i y_i + x_i y_{i-1} + x_{i-1} y_i`
//! (ABY3, section 3.2; written here as `x_i (y_i + y_{i-1}) + x_{i-1} y_i`, two ring products
//! instead of three), and turned back into a replicated one by [`Party::reshare`] (one round, one
//! element per party and value) or, for fixed-point values, by [`Party::truncate`]. Both add a
//! fresh zero sharing before anything is sent: a party never sends a share that was not
//! re-randomised.
//!
//! ## Truncation and its failure probability
//! [`Party::truncate`] is ABY3's semi-honest share truncation (Mohassel and Rindal, CCS 2018,
//! section 5.1.1): party 2 sends its `z_2` to party 1, so that parties 0 and 1 hold a 2-out-of-2
//! sharing `z = z_0 + (z_1 + z_2)` with `z_0` uniform, and each shifts its part right by `f` bits.
//! The result is `floor(z / 2^f)` or one unit off, except when `z_0 + (z_1 + z_2)` overflows as a
//! signed 64-bit sum: that happens with probability `|z| / 2^64` for a uniform `z_0`, and then the
//! result is off by `2^(64-f)` units (a huge value). For a product of magnitude `v` with `f = 20`,
//! `|z| = v 2^40`, so the probability is `v 2^-24` per element (about 6e-8 for `v = 1`); with
//! `f = 16` it is `v 2^-32`. The test `truncation_failures_match_their_bound` measures it.
//! The parties then re-share the result with a mask `r` that parties 0 and 1 draw from their
//! common stream: two rounds in all (party 0's message goes in the first), three elements sent per value.

use crate::party::{tag, MpcError, Party, Side};
use crate::ring;

/// A replicated arithmetic share of a tensor: this party's `(x_i, x_{i-1})`.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct AShare {
    pub shape: Vec<usize>,
    pub cur: Vec<u64>,
    pub prev: Vec<u64>,
}

impl AShare {
    pub fn len(&self) -> usize {
        self.cur.len()
    }

    pub fn is_empty(&self) -> bool {
        self.cur.is_empty()
    }

    /// A share of zero (every part zero).
    pub fn zeros(shape: &[usize]) -> AShare {
        let n = shape.iter().product();
        AShare { shape: shape.to_vec(), cur: vec![0; n], prev: vec![0; n] }
    }

    pub fn reshaped(mut self, shape: &[usize]) -> AShare {
        assert_eq!(shape.iter().product::<usize>(), self.len(), "reshape {:?} -> {shape:?}", self.shape);
        self.shape = shape.to_vec();
        self
    }

    pub fn add(&self, other: &AShare) -> AShare {
        assert_eq!(self.len(), other.len());
        AShare {
            shape: self.shape.clone(),
            cur: ring::add(&self.cur, &other.cur),
            prev: ring::add(&self.prev, &other.prev),
        }
    }

    pub fn sub(&self, other: &AShare) -> AShare {
        assert_eq!(self.len(), other.len());
        AShare {
            shape: self.shape.clone(),
            cur: ring::sub(&self.cur, &other.cur),
            prev: ring::sub(&self.prev, &other.prev),
        }
    }

    pub fn add_assign(&mut self, other: &AShare) {
        ring::add_assign(&mut self.cur, &other.cur);
        ring::add_assign(&mut self.prev, &other.prev);
    }

    pub fn neg(&self) -> AShare {
        let neg = |v: &[u64]| v.iter().map(|x| x.wrapping_neg()).collect();
        AShare { shape: self.shape.clone(), cur: neg(&self.cur), prev: neg(&self.prev) }
    }

    /// `x * c` for a public ring integer `c` (no truncation: `c` is an integer, not fixed point).
    pub fn scale_int(&self, c: u64) -> AShare {
        AShare { shape: self.shape.clone(), cur: ring::scale(&self.cur, c), prev: ring::scale(&self.prev, c) }
    }

    /// `x + c` for public ring elements `c` (party 0's `x_0` carries them).
    pub fn add_public(&self, party_id: usize, c: &[u64]) -> AShare {
        assert_eq!(c.len(), self.len());
        let mut out = self.clone();
        match party_id {
            0 => ring::add_assign(&mut out.cur, c),
            1 => ring::add_assign(&mut out.prev, c),
            _ => {}
        }
        out
    }

    /// The local 3-out-of-3 share of a bilinear product `op(x, y)`:
    /// `op(x_i, y_i + y_{i-1}) + op(x_{i-1}, y_i)`.
    pub fn bilinear(&self, other: &AShare, op: impl Fn(&[u64], &[u64]) -> Vec<u64>) -> Vec<u64> {
        let y_both = ring::add(&other.cur, &other.prev);
        let mut z = op(&self.cur, &y_both);
        ring::add_assign(&mut z, &op(&self.prev, &other.cur));
        z
    }
}

/// The three parts of a fresh sharing of `values` (what the data owner sends), drawn from `prg`
/// (keyed from the operating system's CSPRNG).
pub fn split(values: &[u64], prg: &mut crate::prg::Prg) -> [Vec<u64>; 3] {
    let a = prg.ring(values.len());
    let b = prg.ring(values.len());
    let c = values.iter().zip(a.iter().zip(&b)).map(|(v, (x, y))| v.wrapping_sub(*x).wrapping_sub(*y)).collect();
    [a, b, c]
}

/// Party `i`'s replicated share `(x_i, x_{i-1})` of a sharing's three parts.
pub fn replicated(parts: &[Vec<u64>; 3], i: usize, shape: &[usize]) -> AShare {
    AShare { shape: shape.to_vec(), cur: parts[i].clone(), prev: parts[(i + 2) % 3].clone() }
}

/// Sums three parts (what the data owner does with the shares it receives).
pub fn combine(parts: [&[u64]; 3]) -> Vec<u64> {
    let mut out = parts[0].to_vec();
    ring::add_assign(&mut out, parts[1]);
    ring::add_assign(&mut out, parts[2]);
    out
}

/// Arithmetic right shift by `f` bits (the signed view's floor division by `2^f`).
fn shift_right(v: u64, f: u32) -> u64 {
    ((v as i64) >> f) as u64
}

impl Party {
    /// Turns a 3-out-of-3 sharing (`z` is this party's part) into a replicated one: re-randomise
    /// with a zero sharing, send the part to `next`, receive `prev`'s. One round.
    pub fn reshare(&mut self, mut z: Vec<u64>, shape: &[usize], protocol: &'static str) -> Result<AShare, MpcError> {
        let n = z.len();
        ring::add_assign(&mut z, &self.zero_share(n));
        self.send(Side::Next, tag::RESHARE, protocol, &z)?;
        let prev = self.recv(Side::Prev, tag::RESHARE, "a re-shared product", n)?;
        self.count_rounds(protocol, 1);
        Ok(AShare { shape: shape.to_vec(), cur: z, prev })
    }

    /// Turns a 3-out-of-3 sharing of a value with `2f` fractional bits into a replicated sharing
    /// of it divided by `2^f` (module docs: two rounds, and the failure probability).
    pub fn truncate(&mut self, mut z: Vec<u64>, shape: &[usize], protocol: &'static str) -> Result<AShare, MpcError> {
        let n = z.len();
        let f = self.fp.frac_bits;
        ring::add_assign(&mut z, &self.zero_share(n));
        // Parties 0 and 1 share the mask r (party 0's `next` stream is party 1's `prev` stream).
        let share = match self.id {
            0 => {
                let r = self.common_with_next(n);
                // y_2 = floor(z_0 / 2^f) - r goes to party 2 at once; y_0 = r.
                let y2: Vec<u64> = z.iter().zip(&r).map(|(v, r)| shift_right(*v, f).wrapping_sub(*r)).collect();
                self.send(Side::Prev, tag::TRUNCATE_1, protocol, &y2)?;
                AShare { shape: shape.to_vec(), cur: r, prev: y2 }
            }
            1 => {
                let r = self.common_with_prev(n);
                let z2 = self.recv(Side::Next, tag::TRUNCATE_1, "the truncation's first message", n)?;
                // y_1 = -floor(-(z_1 + z_2) / 2^f): the 2-out-of-2 partner of party 0's part.
                let y1: Vec<u64> = z
                    .iter()
                    .zip(&z2)
                    .map(|(a, b)| shift_right(a.wrapping_add(*b).wrapping_neg(), f).wrapping_neg())
                    .collect();
                self.send(Side::Next, tag::TRUNCATE_2, protocol, &y1)?;
                AShare { shape: shape.to_vec(), cur: y1, prev: r }
            }
            _ => {
                self.send(Side::Prev, tag::TRUNCATE_1, protocol, &z)?;
                let y2 = self.recv(Side::Next, tag::TRUNCATE_1, "the truncation's first message", n)?;
                let y1 = self.recv(Side::Prev, tag::TRUNCATE_2, "the truncation's second message", n)?;
                AShare { shape: shape.to_vec(), cur: y2, prev: y1 }
            }
        };
        self.count_rounds(protocol, 2);
        Ok(share)
    }

    /// `x * y` elementwise for fixed-point values (truncated).
    pub fn mul(&mut self, x: &AShare, y: &AShare) -> Result<AShare, MpcError> {
        let z = x.bilinear(y, ring::mul);
        self.truncate(z, &x.shape, "mul")
    }

    /// `x * y` elementwise where one factor is an integer (a bit, a one-hot mask): no truncation.
    pub fn mul_int(&mut self, x: &AShare, y: &AShare) -> Result<AShare, MpcError> {
        let z = x.bilinear(y, ring::mul);
        self.reshare(z, &x.shape, "mul")
    }

    /// `x * c` for a public fixed-point constant (truncated).
    pub fn scale(&mut self, x: &AShare, c: f64) -> Result<AShare, MpcError> {
        let c = self.fp.encode(c).map_err(MpcError::Invalid)?;
        // The local products x_i c form a 3-out-of-3 sharing (each party keeps its own part).
        let z = ring::scale(&x.cur, c);
        self.truncate(z, &x.shape, "scale")
    }

    /// Every party learns `x`: each sends `x_i` to `prev`, which lacks exactly that part. One round.
    pub fn reveal(&mut self, x: &AShare) -> Result<Vec<u64>, MpcError> {
        self.send(Side::Prev, tag::REVEAL, "reveal", &x.cur)?;
        let missing = self.recv(Side::Next, tag::REVEAL, "a revealed share", x.len())?;
        self.count_rounds("reveal", 1);
        Ok(combine([&x.cur, &x.prev, &missing]))
    }
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use crate::party::local_links;
    use crate::ring::FixedPoint;
    use rand::{Rng, RngCore, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    /// Runs `f` on three in-memory parties (one thread each) and returns their results.
    pub fn run3<T: Send>(fp: FixedPoint, f: impl Fn(&mut Party) -> T + Sync) -> [T; 3] {
        let links = local_links();
        std::thread::scope(|s| {
            let handles: Vec<_> = links
                .into_iter()
                .enumerate()
                .map(|(id, (next, prev))| {
                    let f = &f;
                    s.spawn(move || {
                        let mut p = Party::connect(id, next, prev, fp).unwrap();
                        f(&mut p)
                    })
                })
                .collect();
            let mut out: Vec<T> = handles.into_iter().map(|h| h.join().unwrap()).collect();
            let c = out.pop().unwrap();
            let b = out.pop().unwrap();
            let a = out.pop().unwrap();
            [a, b, c]
        })
    }

    /// The data owner's sharing of fixed-point values, as each party's share.
    pub fn share_f64(fp: FixedPoint, values: &[f64], shape: &[usize], rng: &mut ChaCha8Rng) -> [AShare; 3] {
        let ring: Vec<u64> = values.iter().map(|&v| fp.encode(v).unwrap()).collect();
        let mut key = [0u8; 32];
        rng.fill_bytes(&mut key);
        let parts = split(&ring, &mut crate::prg::Prg::from_key(key));
        [0, 1, 2].map(|i| replicated(&parts, i, shape))
    }

    /// What the three shares hold, decoded (checking that the replicas agree).
    pub fn open_f64(fp: FixedPoint, shares: &[AShare; 3]) -> Vec<f64> {
        for i in 0..3 {
            assert_eq!(shares[i].prev, shares[(i + 2) % 3].cur, "party {i}'s replica differs");
        }
        combine([&shares[0].cur, &shares[1].cur, &shares[2].cur]).iter().map(|&r| fp.decode(r)).collect()
    }

    fn random(rng: &mut ChaCha8Rng, n: usize, scale: f64) -> Vec<f64> {
        (0..n).map(|_| rng.random_range(-scale..scale)).collect()
    }

    #[test]
    fn products_match_plaintext_within_the_fixed_point_tolerance() {
        let fp = FixedPoint::default();
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        for &(n, scale) in &[(1usize, 1.0), (257, 3.0), (1000, 8.0), (64, 0.01)] {
            let x = random(&mut rng, n, scale);
            let y = random(&mut rng, n, scale);
            let xs = share_f64(fp, &x, &[n], &mut rng);
            let ys = share_f64(fp, &y, &[n], &mut rng);
            let out = run3(fp, |p| {
                let z = p.mul(&xs[p.id], &ys[p.id]).unwrap();
                let s = p.scale(&xs[p.id], -0.37).unwrap();
                (z, s, p.reveal(&xs[p.id]).unwrap())
            });
            let z = open_f64(fp, &[out[0].0.clone(), out[1].0.clone(), out[2].0.clone()]);
            let s = open_f64(fp, &[out[0].1.clone(), out[1].1.clone(), out[2].1.clone()]);
            for i in 0..n {
                let tol = 2.0 / fp.scale() * (1.0 + x[i].abs() + y[i].abs());
                assert!((z[i] - x[i] * y[i]).abs() <= tol, "{} * {} -> {}", x[i], y[i], z[i]);
                assert!((s[i] - x[i] * -0.37).abs() <= tol, "{} * -0.37 -> {}", x[i], s[i]);
            }
            for o in &out {
                let revealed: Vec<f64> = o.2.iter().map(|&r| fp.decode(r)).collect();
                assert!(revealed.iter().zip(&x).all(|(a, b)| (a - b).abs() <= 0.5 / fp.scale()));
            }
        }
    }

    #[test]
    fn truncation_failures_match_their_bound() {
        // Values of magnitude 2^20 with f = 20: |z| = 2^60, so a failure has probability about
        // 2^60 / 2^64 = 1/16 per element. Measure it over 20 000 elements.
        let fp = FixedPoint::default();
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        let n = 20_000;
        let big = (1u64 << 20) as f64;
        let x: Vec<f64> = (0..n).map(|_| if rng.random::<bool>() { big } else { -big }).collect();
        let ones = vec![1.0; n];
        let xs = share_f64(fp, &x, &[n], &mut rng);
        let ys = share_f64(fp, &ones, &[n], &mut rng);
        let out = run3(fp, |p| p.mul(&xs[p.id], &ys[p.id]).unwrap());
        let z = open_f64(fp, &out);
        let failures = z.iter().zip(&x).filter(|(a, b)| (*a - *b).abs() > 1.0).count();
        let rate = failures as f64 / n as f64;
        assert!((0.04..0.085).contains(&rate), "failure rate {rate}, expected about 1/16");
        // At training's magnitudes (|v| <= 4: at most 2^-22 per element) none in 20 000.
        let x: Vec<f64> = (0..n).map(|_| rng.random_range(-4.0..4.0)).collect();
        let xs = share_f64(fp, &x, &[n], &mut rng);
        let out = run3(fp, |p| p.mul(&xs[p.id], &ys[p.id]).unwrap());
        let z = open_f64(fp, &out);
        assert!(z.iter().zip(&x).all(|(a, b)| (a - b).abs() < 1e-5));
    }
}
