//! Comparisons of arithmetic shares: ReLU, maxima (pairwise, per row, per pooling window, with a
//! one-hot argmax) and average pooling.
//!
//! - [`Party::ge_zero`] / [`Party::lt_zero`]: the sign bit ([`Party::msb`], 7 rounds) injected into
//!   the ring as an integer 0/1 ([`Party::bit_to_arith`], 2 rounds): 9 rounds. Bytes sent per
//!   element (see [`crate::binary`]): party 0 26.9 + 8, parties 1 and 2 15 + 8 (26.9 on average).
//! - [`Party::relu`]: `x * [x >= 0]`, the product with an integer bit re-shared without
//!   truncation: 10 rounds, 8 more bytes per element (34.9 on average per party). The bit is kept,
//!   so the backward pass is one product (1 round, 8 bytes).
//! - Maxima: a tree of pairwise comparisons, `max(a, b) = b + [a - b >= 0] (a - b)`; every
//!   level compares all pairs of all windows at once: `ceil(log2 k)` levels of 10 rounds for `k`
//!   candidates. The one-hot argmax is carried along the tree: a merged subtree's one-hot is
//!   `[bit * onehot_a, onehot_b - bit * onehot_b]`, in the same product round as the value (a single
//!   candidate's one-hot is the public 1, so its part is the bit itself, without a product). For
//!   2x2 max pooling: 2 levels, 20 rounds; per output, 3 comparisons and 7 products
//!   (3 x 26.9 + 7 x 8 = 137 bytes on average per party). The backward pass is one product round:
//!   `dy` times the one-hot, scattered back (overlapping windows add).
//! - Padding in max pooling is the public ring value `-2^62`, below every value a
//!   [`crate::ring::FixedPoint`] can encode; the comparison is exact over the full ring, so a
//!   padding slot never wins (every window holds at least one input: [`PoolGeometry::validate`]).
//! - [`Party::avg_pool2d`]: a local window sum, then the public `1 / k^2` (padding counts in the
//!   divisor, as in `trustsplit_kernels::pool`): one truncation, 2 rounds.
//!
//! Security: the only messages are those of [`Party::msb`], [`Party::bit_to_arith`] and
//! [`Party::reshare`] (each padded with a stream its receiver lacks); nothing is opened, not even
//! which candidate won.

use crate::arith::AShare;
use crate::bitslice;
use crate::party::{MpcError, Party};
use crate::ring;
use trustsplit_kernels::PoolGeometry;

/// Max pooling's padding (module docs).
const PAD: u64 = (1u64 << 62).wrapping_neg();

fn gather(x: &AShare, idx: impl Iterator<Item = usize> + Clone) -> AShare {
    let cur: Vec<u64> = idx.clone().map(|i| x.cur[i]).collect();
    let prev = idx.map(|i| x.prev[i]).collect();
    AShare { shape: vec![cur.len()], cur, prev }
}

pub(crate) fn slice(x: &AShare, start: usize, len: usize) -> AShare {
    gather(x, start..start + len)
}

pub(crate) fn concat(parts: &[AShare]) -> AShare {
    let cur: Vec<u64> = parts.iter().flat_map(|p| p.cur.iter().copied()).collect();
    let prev = parts.iter().flat_map(|p| p.prev.iter().copied()).collect();
    AShare { shape: vec![cur.len()], cur, prev }
}

/// Each element `t` times in a row (a per-row value broadcast over the row).
pub(crate) fn repeat_each(x: &AShare, t: usize) -> AShare {
    gather(x, (0..x.len() * t).map(move |i| i / t))
}

/// Rows of `a` (`m x wa`) followed by the rows of `b` (`m x wb`), row by row.
fn join_rows(a: &AShare, wa: usize, b: &AShare, wb: usize, m: usize) -> AShare {
    let w = wa + wb;
    gather(
        &concat(&[a.clone(), b.clone()]),
        (0..m * w).map(move |i| {
            let (row, col) = (i / w, i % w);
            if col < wa {
                row * wa + col
            } else {
                m * wa + row * wb + col - wa
            }
        }),
    )
}

/// `n` copies of the public ring element `v`.
fn public(party_id: usize, v: u64, n: usize) -> AShare {
    AShare::zeros(&[n]).add_public(party_id, &vec![v; n])
}

/// A candidate subtree of the max tree: its maximum, and the one-hot of its winner over its
/// `width` leaves (`None`: a single leaf, whose one-hot is the public 1).
struct Slot {
    value: AShare,
    onehot: Option<AShare>,
    width: usize,
}

fn pool_geometry(shape: &[usize], kernel: usize, stride: usize, padding: usize) -> Result<PoolGeometry, MpcError> {
    let [batch, channels, in_h, in_w] = *shape else {
        return Err(MpcError::Invalid(format!("pooling needs an N x C x H x W input, got shape {shape:?}")));
    };
    let g = PoolGeometry { batch, channels, in_h, in_w, kernel, stride, padding };
    g.validate().map_err(MpcError::Invalid)?;
    Ok(g)
}

/// For every output (N, C, OH, OW order) and window position (row-major): the input index, or
/// `None` for padding.
fn taps(g: &PoolGeometry) -> Vec<Option<usize>> {
    let (k, s, p) = (g.kernel, g.stride, g.padding as isize);
    let inside = |v: isize, size: usize| (0..size as isize).contains(&v).then_some(v as usize);
    let mut out = Vec::with_capacity(g.output_len() * k * k);
    for plane in 0..g.batch * g.channels {
        for r in 0..g.out_h() {
            for c in 0..g.out_w() {
                for i in 0..k {
                    for j in 0..k {
                        let y = inside((r * s + i) as isize - p, g.in_h);
                        let x = inside((c * s + j) as isize - p, g.in_w);
                        out.push(y.zip(x).map(|(y, x)| (plane * g.in_h + y) * g.in_w + x));
                    }
                }
            }
        }
    }
    out
}

fn out_shape(g: &PoolGeometry) -> [usize; 4] {
    [g.batch, g.channels, g.out_h(), g.out_w()]
}

/// Adds `v[t]` into `dx[i]` for every tap `t` that reads input `i`, `v` indexed by `t / per`.
fn scatter(dx: &mut AShare, v: &AShare, taps: &[Option<usize>], per: usize) {
    for (t, tap) in taps.iter().enumerate() {
        if let Some(i) = *tap {
            dx.cur[i] = dx.cur[i].wrapping_add(v.cur[t / per]);
            dx.prev[i] = dx.prev[i].wrapping_add(v.prev[t / per]);
        }
    }
}

impl Party {
    /// `[x < 0]` as an arithmetic 0/1 integer. 9 rounds.
    pub fn lt_zero(&mut self, x: &AShare) -> Result<AShare, MpcError> {
        let sign = self.msb(x)?;
        self.bit_to_arith(&sign)
    }

    /// `[x >= 0]` as an arithmetic 0/1 integer. 9 rounds.
    pub fn ge_zero(&mut self, x: &AShare) -> Result<AShare, MpcError> {
        let sign = self.msb(x)?.xor_public(self.id, 1);
        self.bit_to_arith(&sign)
    }

    /// `(relu(x), [x >= 0])`; the bit is what the backward pass needs. 10 rounds.
    pub fn relu(&mut self, x: &AShare) -> Result<(AShare, AShare), MpcError> {
        let bit = self.ge_zero(x)?;
        let y = self.reshare(x.bilinear(&bit, ring::mul), &x.shape, "relu")?;
        Ok((y, bit))
    }

    /// `(x * [0 <= x < bound], [0 <= x < bound])`: ReLU that also zeroes values at or above a
    /// public `bound`. A truncation that fails (`crate::arith`, module docs) leaves a value off by
    /// `2^(64-2f)` in real terms (2^24 for f = 20), far above any activation; zeroing it here, and
    /// stopping its gradient, keeps one failed truncation from reaching the weights.
    /// [`Party::keep_within`] with `lo = 0`: 11 rounds, about 54 bytes per element.
    pub fn relu_bounded(&mut self, x: &AShare, bound: f64) -> Result<(AShare, AShare), MpcError> {
        self.keep_within(x, 0.0, bound)
    }

    /// `(x * [lo <= x < hi], [lo <= x < hi])` for public `lo < hi`: the signs of `x - lo` and
    /// `x - hi` come from one [`Party::msb`] over both (the same 7 rounds, twice the bytes), then
    /// one packed AND, the bit injection and the product: 11 rounds, about 54 bytes per element on
    /// average per party.
    pub fn keep_within(&mut self, x: &AShare, lo: f64, hi: f64) -> Result<(AShare, AShare), MpcError> {
        let n = x.len();
        let minus = |p: &Party, v: f64| -> Result<AShare, MpcError> {
            let c = p.fp.encode(v).map_err(MpcError::Invalid)?;
            Ok(x.add_public(p.id, &vec![c.wrapping_neg(); n]))
        };
        // x - lo padded to whole 64-element blocks, so that the two signs come out in separate
        // bit-sliced words.
        let nb = bitslice::blocks(n);
        let both = concat(&[minus(self, lo)?, AShare::zeros(&[64 * nb - n]), minus(self, hi)?]);
        let signs = self.msb_sliced(&both)?;
        let (below_lo, below_hi) = (signs.words(0..nb), signs.words(nb..2 * nb));
        let inside = self.and_sliced(&below_lo.not(self.id), &below_hi, "within")?.unslice(&x.shape);
        let bit = self.bit_to_arith(&inside)?;
        let y = self.reshare(x.bilinear(&bit, ring::mul), &x.shape, "within")?;
        Ok((y, bit))
    }

    /// `dy * [x >= 0]`. 1 round.
    pub fn relu_backward(&mut self, dy: &AShare, bit: &AShare) -> Result<AShare, MpcError> {
        if dy.len() != bit.len() {
            return Err(MpcError::Invalid(format!("relu backward: {} gradients for {} bits", dy.len(), bit.len())));
        }
        self.reshare(dy.bilinear(bit, ring::mul), &dy.shape, "relu")
    }

    /// `(max(x, y), [x >= y])` elementwise. 10 rounds.
    pub fn max_pairwise(&mut self, x: &AShare, y: &AShare) -> Result<(AShare, AShare), MpcError> {
        if x.len() != y.len() {
            return Err(MpcError::Invalid(format!("max of {} and {} values", x.len(), y.len())));
        }
        let d = x.sub(y);
        let bit = self.ge_zero(&d)?;
        let picked = self.reshare(d.bilinear(&bit, ring::mul), &x.shape, "max")?;
        Ok((y.add(&picked), bit))
    }

    /// The maximum of each of `m` windows of `k` candidates (`cand`: `m x k`, row-major) and, if
    /// `argmax`, the winner's one-hot (`m x k`; ties go to the first). `ceil(log2 k)` levels.
    pub(crate) fn tree_max(
        &mut self,
        cand: &AShare,
        m: usize,
        k: usize,
        argmax: bool,
        protocol: &'static str,
    ) -> Result<(AShare, Option<AShare>), MpcError> {
        if k == 0 || cand.len() != m * k {
            return Err(MpcError::Invalid(format!("max over {m} x {k} candidates given {} values", cand.len())));
        }
        let mut slots: Vec<Slot> = (0..k)
            .map(|j| Slot { value: gather(cand, (0..m).map(move |w| w * k + j)), onehot: None, width: 1 })
            .collect();
        while slots.len() > 1 {
            let pairs = slots.len() / 2;
            let diffs: Vec<AShare> = (0..pairs).map(|t| slots[2 * t].value.sub(&slots[2 * t + 1].value)).collect();
            let bits = self.ge_zero(&concat(&diffs))?;
            let bit = |t: usize| slice(&bits, t * m, m);
            // One product round for the whole level, in this order per pair: the values'
            // difference, then the one-hots of a and b that are not single leaves.
            let (mut xs, mut ys) = (Vec::new(), Vec::new());
            for (t, d) in diffs.into_iter().enumerate() {
                xs.push(d);
                ys.push(bit(t));
                for s in slots[2 * t..2 * t + 2].iter().filter(|_| argmax) {
                    if let Some(oh) = &s.onehot {
                        xs.push(oh.clone());
                        ys.push(repeat_each(&bit(t), s.width));
                    }
                }
            }
            let (x, y) = (concat(&xs), concat(&ys));
            let prod = self.reshare(x.bilinear(&y, ring::mul), &[x.len()], protocol)?;
            let mut at = 0;
            let mut take = |len: usize| {
                at += len;
                slice(&prod, at - len, len)
            };
            let mut old = slots.into_iter();
            let mut next = Vec::with_capacity(pairs + 1);
            for t in 0..pairs {
                let (a, b) = (old.next().expect("a pair"), old.next().expect("a pair"));
                let value = b.value.add(&take(m));
                let onehot = if argmax {
                    let part_a = if a.onehot.is_some() { take(m * a.width) } else { bit(t) };
                    let part_b = match &b.onehot {
                        Some(oh) => oh.sub(&take(m * b.width)),
                        None => public(self.id, 1, m).sub(&bit(t)),
                    };
                    Some(join_rows(&part_a, a.width, &part_b, b.width, m))
                } else {
                    None
                };
                next.push(Slot { value, onehot, width: a.width + b.width });
            }
            next.extend(old); // an odd one out goes up a level as it is
            slots = next;
        }
        let top = slots.pop().expect("one slot");
        let onehot = argmax.then(|| top.onehot.unwrap_or_else(|| public(self.id, 1, m)));
        Ok((top.value, onehot))
    }

    /// `(max of each row, one-hot of its first maximum)` for `x: rows x cols`.
    pub fn max_rows(&mut self, x: &AShare) -> Result<(AShare, AShare), MpcError> {
        let [rows, cols] = *x.shape.as_slice() else {
            return Err(MpcError::Invalid(format!("max_rows needs a matrix, got shape {:?}", x.shape)));
        };
        let (m, onehot) = self.tree_max(x, rows, cols, true, "max")?;
        Ok((m.reshaped(&[rows]), onehot.expect("asked for").reshaped(&[rows, cols])))
    }

    /// Max pooling of `x: N x C x H x W`: `(y: N x C x OH x OW, argmax: N x C x OH x OW x k^2)`,
    /// the argmax a one-hot over each window (row-major, padding included, never set).
    pub fn max_pool2d(
        &mut self,
        x: &AShare,
        kernel: usize,
        stride: usize,
        padding: usize,
    ) -> Result<(AShare, AShare), MpcError> {
        let g = pool_geometry(&x.shape, kernel, stride, padding)?;
        let taps = taps(&g);
        let pad = public(self.id, PAD, 1);
        let cand = AShare {
            shape: vec![taps.len()],
            cur: taps.iter().map(|t| t.map_or(pad.cur[0], |i| x.cur[i])).collect(),
            prev: taps.iter().map(|t| t.map_or(pad.prev[0], |i| x.prev[i])).collect(),
        };
        let kk = kernel * kernel;
        let (y, onehot) = self.tree_max(&cand, g.output_len(), kk, true, "maxpool")?;
        let shape = out_shape(&g);
        Ok((y.reshaped(&shape), onehot.expect("asked for").reshaped(&[shape[0], shape[1], shape[2], shape[3], kk])))
    }

    /// `dx` of max pooling: `dy` routed through the one-hot argmax. 1 round.
    pub fn max_pool2d_backward(
        &mut self,
        dy: &AShare,
        argmax: &AShare,
        input_shape: &[usize],
        kernel: usize,
        stride: usize,
        padding: usize,
    ) -> Result<AShare, MpcError> {
        let g = pool_geometry(input_shape, kernel, stride, padding)?;
        let kk = kernel * kernel;
        if dy.len() != g.output_len() || argmax.len() != dy.len() * kk {
            return Err(MpcError::Invalid(format!(
                "max pool backward: {} gradients and {} argmax entries for {} outputs of {kk}",
                dy.len(),
                argmax.len(),
                g.output_len()
            )));
        }
        let routed = self.reshare(repeat_each(dy, kk).bilinear(argmax, ring::mul), &[argmax.len()], "maxpool")?;
        let mut dx = AShare::zeros(input_shape);
        scatter(&mut dx, &routed, &taps(&g), 1);
        Ok(dx)
    }

    /// Average pooling (padding counts in the divisor `k^2`). 2 rounds.
    pub fn avg_pool2d(&mut self, x: &AShare, kernel: usize, stride: usize, padding: usize) -> Result<AShare, MpcError> {
        let g = pool_geometry(&x.shape, kernel, stride, padding)?;
        let kk = kernel * kernel;
        let mut sum = AShare::zeros(&out_shape(&g));
        for (t, tap) in taps(&g).iter().enumerate() {
            if let Some(i) = *tap {
                sum.cur[t / kk] = sum.cur[t / kk].wrapping_add(x.cur[i]);
                sum.prev[t / kk] = sum.prev[t / kk].wrapping_add(x.prev[i]);
            }
        }
        self.scale(&sum, 1.0 / kk as f64)
    }

    /// `dx` of average pooling: each `dy / k^2` added over its window. 2 rounds.
    pub fn avg_pool2d_backward(
        &mut self,
        dy: &AShare,
        input_shape: &[usize],
        kernel: usize,
        stride: usize,
        padding: usize,
    ) -> Result<AShare, MpcError> {
        let g = pool_geometry(input_shape, kernel, stride, padding)?;
        if dy.len() != g.output_len() {
            return Err(MpcError::Invalid(format!("avg pool backward: {} gradients for {}", dy.len(), g.output_len())));
        }
        let d = self.scale(dy, 1.0 / (kernel * kernel) as f64)?;
        let mut dx = AShare::zeros(input_shape);
        scatter(&mut dx, &d, &taps(&g), kernel * kernel);
        Ok(dx)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arith::tests::{open_f64, run3, share_f64};
    use crate::ring::FixedPoint;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;
    use trustsplit_kernels::pool;

    /// Multiples of 1/8 (exact in f32 and fixed point), so that ties happen and compare exactly.
    fn quantized(rng: &mut ChaCha8Rng, n: usize, lo: i32, hi: i32) -> Vec<f64> {
        (0..n).map(|_| rng.random_range(8 * lo..8 * hi) as f64 / 8.0).collect()
    }

    /// Opens 0/1 integers.
    fn open_int(shares: &[AShare; 3]) -> Vec<f64> {
        open_f64(FixedPoint { frac_bits: 0 }, shares)
    }

    #[test]
    fn relu_and_its_backward_match_plaintext() {
        let fp = FixedPoint::default();
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        let mut x: Vec<f64> = (0..500).map(|_| rng.random_range(-50.0..50.0)).collect();
        x.extend([0.0, 1.0 / fp.scale(), -1.0 / fp.scale(), 2000.0, -2000.0]);
        let n = x.len();
        let dy: Vec<f64> = (0..n).map(|_| rng.random_range(-2.0..2.0)).collect();
        let (xs, dys) = (share_f64(fp, &x, &[n], &mut rng), share_f64(fp, &dy, &[n], &mut rng));
        let out = run3(fp, |p| {
            let (y, bit) = p.relu(&xs[p.id]).unwrap();
            let dx = p.relu_backward(&dys[p.id], &bit).unwrap();
            let rounds: u64 = p.traffic().values().map(|t| t.rounds).sum();
            (y, bit, dx, rounds)
        });
        let y = open_f64(fp, &out.each_ref().map(|o| o.0.clone()));
        let bit = open_int(&out.each_ref().map(|o| o.1.clone()));
        let dx = open_f64(fp, &out.each_ref().map(|o| o.2.clone()));
        for e in 0..n {
            let xe = fp.decode(fp.encode(x[e]).unwrap());
            assert_eq!(y[e], xe.max(0.0), "relu({xe})");
            assert_eq!(bit[e], if xe >= 0.0 { 1.0 } else { 0.0 });
            assert_eq!(dx[e], if xe >= 0.0 { fp.decode(fp.encode(dy[e]).unwrap()) } else { 0.0 });
        }
        assert_eq!(out[0].3, 10 + 1, "relu's rounds, then the backward's");
        let empty = run3(fp, |p| p.relu(&AShare::zeros(&[0])).unwrap().0);
        assert!(empty.iter().all(|e| e.is_empty()));
    }

    #[test]
    fn bounded_relu_zeroes_what_a_failed_truncation_leaves() {
        let fp = FixedPoint::default();
        let mut rng = ChaCha8Rng::seed_from_u64(12);
        let bound = 4096.0;
        let mut x: Vec<f64> = (0..300).map(|_| rng.random_range(-5000.0..5000.0)).collect();
        // The bound itself, just below it, zero, and a failed truncation's values (2^24 off).
        x.extend([bound, bound - 1.0 / fp.scale(), 0.0, (1u64 << 24) as f64 + 0.5, -((1u64 << 24) as f64) + 3.0]);
        let n = x.len();
        let xs = share_f64(fp, &x, &[n], &mut rng);
        let out = run3(fp, |p| {
            let (y, bit) = p.relu_bounded(&xs[p.id], bound).unwrap();
            (y, bit, p.traffic().values().map(|t| t.rounds).sum::<u64>())
        });
        let y = open_f64(fp, &out.each_ref().map(|o| o.0.clone()));
        let bit = open_int(&out.each_ref().map(|o| o.1.clone()));
        for e in 0..n {
            let xe = fp.decode(fp.encode(x[e]).unwrap());
            let inside = (0.0..bound).contains(&xe);
            assert_eq!(bit[e], if inside { 1.0 } else { 0.0 }, "bit of {xe}");
            assert_eq!(y[e], if inside { xe } else { 0.0 }, "bounded relu({xe})");
        }
        assert_eq!(out[0].2, 11);
    }

    #[test]
    fn pairwise_and_row_maxima_pick_the_first_maximum() {
        let fp = FixedPoint::default();
        let mut rng = ChaCha8Rng::seed_from_u64(12);
        let n = 300;
        let (x, y) = (quantized(&mut rng, n, -4, 4), quantized(&mut rng, n, -4, 4));
        let (xs, ys) = (share_f64(fp, &x, &[n], &mut rng), share_f64(fp, &y, &[n], &mut rng));
        let out = run3(fp, |p| p.max_pairwise(&xs[p.id], &ys[p.id]).unwrap());
        let (m, bit) =
            (open_f64(fp, &out.each_ref().map(|o| o.0.clone())), open_int(&out.each_ref().map(|o| o.1.clone())));
        for e in 0..n {
            assert_eq!(m[e], x[e].max(y[e]));
            assert_eq!(bit[e], if x[e] >= y[e] { 1.0 } else { 0.0 });
        }
        for cols in 1..=10 {
            let rows = 13;
            let x = quantized(&mut rng, rows * cols, -2, 2);
            let xs = share_f64(fp, &x, &[rows, cols], &mut rng);
            let out = run3(fp, |p| {
                let r = p.max_rows(&xs[p.id]).unwrap();
                (r.0, r.1, p.traffic().values().map(|t| t.rounds).sum::<u64>())
            });
            let m = open_f64(fp, &out.each_ref().map(|o| o.0.clone()));
            let hot = open_int(&out.each_ref().map(|o| o.1.clone()));
            for r in 0..rows {
                let row = &x[r * cols..(r + 1) * cols];
                let best = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
                let first = row.iter().position(|&v| v == best).unwrap();
                assert_eq!(m[r], best, "cols {cols} row {r}");
                let want: Vec<f64> = (0..cols).map(|c| if c == first { 1.0 } else { 0.0 }).collect();
                assert_eq!(&hot[r * cols..(r + 1) * cols], &want[..], "cols {cols} row {r}: {row:?}");
            }
            let levels = (cols as f64).log2().ceil() as u64;
            assert_eq!(out[0].2, 10 * levels);
        }
    }

    #[test]
    fn keep_within_on_a_long_vector_of_small_values() {
        let fp = FixedPoint::default();
        let mut rng = ChaCha8Rng::seed_from_u64(15);
        let n = 100_003;
        let mut x: Vec<f64> = (0..n).map(|_| rng.random_range(-1.0..1.0)).collect();
        x[5] = 5000.0;
        x[77_777] = -((1u64 << 24) as f64);
        let xs = share_f64(fp, &x, &[n], &mut rng);
        let out = run3(fp, |p| p.keep_within(&xs[p.id], -4096.0, 4096.0).unwrap().0);
        let y = open_f64(fp, &out);
        for e in 0..n {
            let xe = fp.decode(fp.encode(x[e]).unwrap());
            let want = if (-4096.0..4096.0).contains(&xe) { xe } else { 0.0 };
            assert_eq!(y[e], want, "element {e}: {xe}");
        }
    }

    #[test]
    fn comparisons_hold_up_to_the_representable_limits() {
        // FixedPoint::encode takes |v| < 2^42 at 20 bits (2^62 in ring units), so a difference of
        // two such values stays inside the signed ring and max and ReLU are exact up to there.
        let fp = FixedPoint::default();
        let mut rng = ChaCha8Rng::seed_from_u64(14);
        let limit = (1u64 << 42) as f64 - 1.0;
        let mut x: Vec<f64> = (0..200).map(|_| rng.random_range(-limit..limit).round()).collect();
        let mut y: Vec<f64> = (0..200).map(|_| rng.random_range(-limit..limit).round()).collect();
        x.extend([limit, -limit, limit, 0.0, -limit]);
        y.extend([-limit, limit, limit - 1.0, -limit, 1.0 / fp.scale()]);
        let n = x.len();
        let (xs, ys) = (share_f64(fp, &x, &[n], &mut rng), share_f64(fp, &y, &[n], &mut rng));
        let out = run3(fp, |p| (p.max_pairwise(&xs[p.id], &ys[p.id]).unwrap().0, p.relu(&xs[p.id]).unwrap().0));
        let m = open_f64(fp, &out.each_ref().map(|o| o.0.clone()));
        let r = open_f64(fp, &out.each_ref().map(|o| o.1.clone()));
        for e in 0..n {
            assert_eq!(m[e], x[e].max(y[e]), "max({}, {})", x[e], y[e]);
            assert_eq!(r[e], x[e].max(0.0), "relu({})", x[e]);
        }
    }

    #[test]
    fn max_pooling_matches_the_plaintext_kernel() {
        let fp = FixedPoint::default();
        let mut rng = ChaCha8Rng::seed_from_u64(13);
        // (N, C, H, W, kernel, stride, padding, value range): negative inputs check that padding
        // never wins.
        let cases = [
            (2, 3, 6, 6, 2, 2, 0, (-4, 4)),
            (1, 2, 7, 5, 3, 2, 1, (-6, -2)),
            (1, 2, 5, 6, 3, 1, 1, (-3, 3)),
            (2, 1, 5, 5, 2, 1, 1, (-9, -1)),
            (1, 1, 4, 4, 1, 1, 0, (-2, 2)),
        ];
        for &(n, c, h, w, k, s, pad, (lo, hi)) in &cases {
            let g = PoolGeometry { batch: n, channels: c, in_h: h, in_w: w, kernel: k, stride: s, padding: pad };
            let x = quantized(&mut rng, g.input_len(), lo, hi);
            let dy: Vec<f64> = quantized(&mut rng, g.output_len(), -2, 2);
            let shape = [n, c, h, w];
            let (xs, dys) = (share_f64(fp, &x, &shape, &mut rng), share_f64(fp, &dy, &[g.output_len()], &mut rng));
            let out = run3(fp, |p| {
                let (y, am) = p.max_pool2d(&xs[p.id], k, s, pad).unwrap();
                let dx = p.max_pool2d_backward(&dys[p.id], &am, &shape, k, s, pad).unwrap();
                (y, am, dx)
            });
            let y = open_f64(fp, &out.each_ref().map(|o| o.0.clone()));
            let hot = open_int(&out.each_ref().map(|o| o.1.clone()));
            let dx = open_f64(fp, &out.each_ref().map(|o| o.2.clone()));
            assert_eq!(out[0].0.shape, vec![n, c, g.out_h(), g.out_w()]);
            let xf: Vec<f32> = x.iter().map(|&v| v as f32).collect();
            let (mut want_y, mut want_am) = (vec![0f32; g.output_len()], vec![0u32; g.output_len()]);
            pool::max_pool_forward(&g, &xf, &mut want_y, &mut want_am);
            let taps = taps(&g);
            let plane = h * w;
            for o in 0..g.output_len() {
                assert_eq!(y[o], want_y[o] as f64, "case {:?} output {o}", (n, c, h, w, k, s, pad));
                let hot_o = &hot[o * k * k..(o + 1) * k * k];
                assert_eq!(hot_o.iter().sum::<f64>(), 1.0);
                let t = hot_o.iter().position(|&v| v == 1.0).unwrap();
                assert_eq!(taps[o * k * k + t].map(|i| i % plane), Some(want_am[o] as usize));
            }
            let dyf: Vec<f32> = dy.iter().map(|&v| v as f32).collect();
            let want_dx = pool::max_pool_backward(&g, &dyf, &want_am);
            assert!(dx.iter().zip(&want_dx).all(|(a, b)| *a == *b as f64));
        }
    }

    #[test]
    fn average_pooling_matches_the_plaintext_kernel() {
        let fp = FixedPoint::default();
        let mut rng = ChaCha8Rng::seed_from_u64(14);
        for &(n, c, h, w, k, s, pad) in &[(2, 3, 6, 6, 2, 2, 0), (1, 2, 7, 5, 3, 2, 1), (1, 1, 5, 5, 3, 1, 1)] {
            let g = PoolGeometry { batch: n, channels: c, in_h: h, in_w: w, kernel: k, stride: s, padding: pad };
            let x: Vec<f64> = (0..g.input_len()).map(|_| rng.random_range(-5.0..5.0)).collect();
            let dy: Vec<f64> = (0..g.output_len()).map(|_| rng.random_range(-2.0..2.0)).collect();
            let shape = [n, c, h, w];
            let (xs, dys) = (share_f64(fp, &x, &shape, &mut rng), share_f64(fp, &dy, &[g.output_len()], &mut rng));
            let out = run3(fp, |p| {
                let y = p.avg_pool2d(&xs[p.id], k, s, pad).unwrap();
                (y, p.avg_pool2d_backward(&dys[p.id], &shape, k, s, pad).unwrap())
            });
            let (y, dx) = (
                open_f64(fp, &out.each_ref().map(|o| o.0.clone())),
                open_f64(fp, &out.each_ref().map(|o| o.1.clone())),
            );
            let xf: Vec<f32> = x.iter().map(|&v| v as f32).collect();
            let dyf: Vec<f32> = dy.iter().map(|&v| v as f32).collect();
            let (mut want_y, mut want_dx) = (vec![0f32; g.output_len()], vec![0f32; g.input_len()]);
            pool::avg_pool_forward(&g, &xf, &mut want_y);
            pool::avg_pool_backward(&g, &dyf, &mut want_dx);
            assert!(y.iter().zip(&want_y).all(|(a, b)| (a - *b as f64).abs() < 2e-5), "{y:?} vs {want_y:?}");
            assert!(dx.iter().zip(&want_dx).all(|(a, b)| (a - *b as f64).abs() < 2e-5), "{dx:?} vs {want_dx:?}");
        }
        // Bad geometry is an error, not a panic.
        let xs = share_f64(fp, &[0.0; 4], &[1, 1, 2, 2], &mut rng);
        let out = run3(fp, |p| p.avg_pool2d(&xs[p.id], 3, 1, 0).is_err() && p.max_pool2d(&xs[p.id], 2, 0, 0).is_err());
        assert!(out.iter().all(|&e| e));
    }
}
