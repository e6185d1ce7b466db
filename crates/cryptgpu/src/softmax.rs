//! Softmax over rows of shares, and the gradient of the cross-entropy loss, with nothing opened.
//!
//! - [`Party::exp`]: the limit `(1 + x / 2^9)^(2^9)` (CryptGPU's 9 squarings): one public scale and
//!   9 products, each truncated: 20 rounds, 10 truncations (a truncation sends 3 elements across
//!   the three parties: 80 bytes per element and party on average). Meant for `x <= 0`
//!   (in softmax, after the row maximum is subtracted); it breaks down below `x = -1024`.
//!   Absolute error on `[-16, 0]`: the limit's own error is at most `e^x x^2 / 1024` (5.3e-4, at
//!   `x = -2`) and a truncation's unit error in `1 + x / 512` grows 512-fold through the squarings
//!   (about `2^-11` near `x = 0`); the test bounds the total by 1e-3 (6.1e-4 seen).
//! - [`Party::reciprocal`]: Newton-Raphson `y <- y (2 - x y)` from a public guess `y_0`, for
//!   `0 < x < 2 / y_0`. The error `e = 1 - x y` squares each step. The first step is two public
//!   scales (`y_1 = y_0 (2 - x y_0)`, 4 rounds); each later one two products (4 rounds).
//! - [`Party::softmax_rows`]: `e = exp(x - max_row(x))`, `s = sum_row(e)`, `e * (1 / s)`, with two
//!   guards against a failed truncation (`crate::arith`): `x - max` is clamped into `[-32, 0]`
//!   ([`Party::keep_within`], 11 rounds) and a probability outside `[0, 2)` is zeroed (11 more), so
//!   the loss gradient stays bounded by 1 even when a logit, an exp or the reciprocal failed. The row's
//!   maximum contributes `exp(0) = 1`, so `s` lies in `[1, C]` (up to exp's error) and `y_0 = 1 / C`
//!   gives `e_0 = 1 - s / C <= 1 - 1 / C`; after `k` steps `e_k <= (1 - 1/C)^(2^k) <= exp(-2^k / C)`,
//!   which is below `2^-f` once `2^k >= C f ln 2`: `k = ceil(log2(C f ln 2))`
//!   ([`reciprocal_iterations`]; 8 for `C = 10`, `f = 20`). Rounds for `C = 10`: the maximum
//!   (4 comparison levels of 10 rounds, no argmax kept), 11 for the clamp, 20 for exp, 32 for the
//!   reciprocal, 2 for the product, 11 for the final check: 116. Bytes per row, on average per party: the maximum's 9 comparisons and products
//!   (9 x (26.9 + 8)), 10 truncations per element for exp and 1 for the product (C x 11 x 8), and
//!   16 truncations for the reciprocal (16 x 8), and the two guards (2 x C x 54): about 2400 bytes
//!   for C = 10.
//!   Accuracy: the limit approximation itself moves a softmax of 10 classes by up to 2.0e-3
//!   (rows with several logits about 2 below the maximum); the protocol adds about 1e-4.
//! - [`Party::cross_entropy_grad`]: `(softmax(logits) - onehot) / N`, 2 more rounds.
//!
//! Security: built only from [`Party::mul`], [`Party::scale`], the comparisons of
//! [`crate::compare`] and local additions; nothing is revealed (CryptGPU's release opens values
//! inside exp and max for debugging; this does not).

use crate::arith::AShare;
use crate::compare::repeat_each;
use crate::party::{MpcError, Party};

/// Squarings in [`Party::exp`].
pub const EXP_SQUARINGS: u32 = 9;

/// [`Party::softmax_rows`] clamps `x - max` at `-EXP_FLOOR`: `exp(-32)` is below 2^-46, zero at
/// any fractional bits we allow.
const EXP_FLOOR: f64 = 32.0;

/// Newton steps that take `1 / s` for `s` in `[1, classes]` from the guess `1 / classes` to a
/// relative error below `2^-frac_bits` (module docs): `ceil(log2(classes * frac_bits * ln 2))`.
pub fn reciprocal_iterations(classes: usize, frac_bits: u32) -> usize {
    let need = classes.max(1) as f64 * frac_bits as f64 * std::f64::consts::LN_2;
    need.log2().ceil().max(1.0) as usize
}

fn row_sums(x: &AShare, rows: usize, cols: usize) -> AShare {
    let mut s = AShare::zeros(&[rows]);
    for r in 0..rows {
        for c in r * cols..(r + 1) * cols {
            s.cur[r] = s.cur[r].wrapping_add(x.cur[c]);
            s.prev[r] = s.prev[r].wrapping_add(x.prev[c]);
        }
    }
    s
}

impl Party {
    /// A public fixed-point constant added to every element.
    fn plus_constant(&self, x: &AShare, c: f64) -> Result<AShare, MpcError> {
        let c = self.fp.encode(c).map_err(MpcError::Invalid)?;
        Ok(x.add_public(self.id, &vec![c; x.len()]))
    }

    /// `exp(x)` for `x <= 0` (module docs: 20 rounds).
    pub fn exp(&mut self, x: &AShare) -> Result<AShare, MpcError> {
        if self.fp.frac_bits < EXP_SQUARINGS {
            return Err(MpcError::Invalid(format!("exp needs at least {EXP_SQUARINGS} fractional bits")));
        }
        // 2^-9 is exact in fixed point with at least 9 fractional bits.
        let t = self.scale(x, 1.0 / (1u64 << EXP_SQUARINGS) as f64)?;
        let mut y = self.plus_constant(&t, 1.0)?;
        for _ in 0..EXP_SQUARINGS {
            y = self.mul(&y, &y)?;
        }
        Ok(y)
    }

    /// `1 / x` by `iterations` Newton steps from the public guess `initial` (module docs);
    /// converges for `0 < x < 2 / initial`.
    pub fn reciprocal(&mut self, x: &AShare, iterations: usize, initial: f64) -> Result<AShare, MpcError> {
        if iterations == 0 {
            return self.plus_constant(&AShare::zeros(&x.shape), initial);
        }
        // y_1 = y_0 (2 - x y_0), scaled by y_0 twice: a single scale by y_0^2 would round it to
        // zero for many classes (1/C^2 < 2^-f once C > 2^((f+1)/2)).
        let xy = self.scale(x, initial)?;
        let two_minus = self.plus_constant(&xy.neg(), 2.0)?;
        let mut y = self.scale(&two_minus, initial)?;
        for _ in 1..iterations {
            let xy = self.mul(x, &y)?;
            let two_minus = self.plus_constant(&xy.neg(), 2.0)?;
            y = self.mul(&y, &two_minus)?;
        }
        Ok(y)
    }

    /// Softmax of each row of `x: N x C` (module docs).
    pub fn softmax_rows(&mut self, x: &AShare) -> Result<AShare, MpcError> {
        let [rows, cols] = *x.shape.as_slice() else {
            return Err(MpcError::Invalid(format!("softmax needs a matrix, got shape {:?}", x.shape)));
        };
        let (max, _) = self.tree_max(x, rows, cols, false, "max")?;
        // x - max <= 0, clamped at -EXP_FLOOR: exp is only good above about -1000, and a logit
        // that a failed truncation pushed 2^24 up would otherwise send its row's exp there.
        let shifted = self.plus_constant(&x.sub(&repeat_each(&max, cols)), EXP_FLOOR)?;
        let (clamped, _) = self.keep_within(&shifted, 0.0, 2.0 * EXP_FLOOR)?;
        let e = self.exp(&self.plus_constant(&clamped, -EXP_FLOOR)?)?;
        let s = row_sums(&e, rows, cols);
        let r = self.reciprocal(&s, reciprocal_iterations(cols, self.fp.frac_bits), 1.0 / cols as f64)?;
        let p = self.mul(&e, &repeat_each(&r, cols))?;
        // A probability outside [0, 2) is a failed truncation inside exp or the reciprocal: zero
        // it, so that the loss gradient stays bounded by 1 whatever happened.
        Ok(self.keep_within(&p, 0.0, 2.0)?.0.reshaped(&[rows, cols]))
    }

    /// The gradient of the mean cross-entropy of `softmax(logits)` against one-hot labels (fixed
    /// point, 1.0 for the true class) with respect to the logits: `(softmax(logits) - onehot) / N`.
    pub fn cross_entropy_grad(&mut self, logits: &AShare, onehot: &AShare) -> Result<AShare, MpcError> {
        if logits.shape.len() != 2 || logits.shape != onehot.shape {
            return Err(MpcError::Invalid(format!(
                "cross-entropy needs logits and labels of one N x C shape, got {:?} and {:?}",
                logits.shape, onehot.shape
            )));
        }
        let p = self.softmax_rows(logits)?;
        self.scale(&p.sub(onehot), 1.0 / logits.shape[0] as f64)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::arith::tests::{open_f64, run3, share_f64};
    use crate::ring::FixedPoint;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    /// Softmax of a row with `exp` given (the true one, or the limit approximation).
    fn softmax(row: &[f64], exp: impl Fn(f64) -> f64) -> Vec<f64> {
        let m = row.iter().cloned().fold(f64::NEG_INFINITY, f64::max);
        let e: Vec<f64> = row.iter().map(|v| exp(v - m)).collect();
        let s: f64 = e.iter().sum();
        e.iter().map(|v| v / s).collect()
    }

    #[test]
    fn exp_and_reciprocal_are_close() {
        let fp = FixedPoint::default();
        let mut rng = ChaCha8Rng::seed_from_u64(21);
        let mut x: Vec<f64> = (0..400).map(|_| rng.random_range(-16.0..0.0)).collect();
        x.extend([0.0, -16.0, -2.0, -1e-6]);
        let s: Vec<f64> = (0..400).map(|_| rng.random_range(1.0..10.0)).chain([1.0, 10.0]).collect();
        let (xs, ss) = (share_f64(fp, &x, &[x.len()], &mut rng), share_f64(fp, &s, &[s.len()], &mut rng));
        let iters = reciprocal_iterations(10, fp.frac_bits);
        assert_eq!(iters, 8);
        let out = run3(fp, |p| (p.exp(&xs[p.id]).unwrap(), p.reciprocal(&ss[p.id], iters, 0.1).unwrap()));
        let e = open_f64(fp, &out.each_ref().map(|o| o.0.clone()));
        let r = open_f64(fp, &out.each_ref().map(|o| o.1.clone()));
        let worst = x.iter().zip(&e).map(|(x, e)| (e - x.exp()).abs()).fold(0.0, f64::max);
        assert!(worst < 1e-3, "exp's worst absolute error {worst}");
        for (s, r) in s.iter().zip(&r) {
            assert!((r * s - 1.0).abs() < 2e-5, "1/{s} -> {r}");
        }
    }

    #[test]
    fn softmax_and_cross_entropy_gradient_match_plaintext() {
        let fp = FixedPoint::default();
        let mut rng = ChaCha8Rng::seed_from_u64(22);
        let c = 10;
        for &(n, scale) in &[(64usize, 10.0), (5, 1.0), (1, 0.01)] {
            let mut x: Vec<f64> = (0..n * c).map(|_| rng.random_range(-scale..scale)).collect();
            if n > 2 {
                x[..c].fill(3.0); // a row of ties
                x[c..2 * c].iter_mut().enumerate().for_each(|(i, v)| *v = if i == 4 { 10.0 } else { -10.0 });
            }
            let labels: Vec<usize> = (0..n).map(|_| rng.random_range(0..c)).collect();
            let hot: Vec<f64> = (0..n * c).map(|i| if labels[i / c] == i % c { 1.0 } else { 0.0 }).collect();
            let (xs, hs) = (share_f64(fp, &x, &[n, c], &mut rng), share_f64(fp, &hot, &[n, c], &mut rng));
            let out = run3(fp, |p| {
                let y = p.softmax_rows(&xs[p.id]).unwrap();
                let rounds = p.total_traffic().rounds;
                (y, p.cross_entropy_grad(&xs[p.id], &hs[p.id]).unwrap(), rounds)
            });
            assert_eq!(out[0].2, 116);
            let y = open_f64(fp, &out.each_ref().map(|o| o.0.clone()));
            let g = open_f64(fp, &out.each_ref().map(|o| o.1.clone()));
            // The limit approximation alone is off by up to 2.0e-3 from the true softmax (C = 10,
            // a row of 0 and several equal values near -2); the protocol adds about 1e-4.
            let limit = |v: f64| (1.0 + v / 512.0).powi(512);
            let (mut worst, mut worst_limit) = (0f64, 0f64);
            for r in 0..n {
                let (want, want_limit) =
                    (softmax(&x[r * c..(r + 1) * c], f64::exp), softmax(&x[r * c..(r + 1) * c], limit));
                for k in 0..c {
                    let i = r * c + k;
                    worst = worst.max((y[i] - want[k]).abs());
                    worst_limit = worst_limit.max((y[i] - want_limit[k]).abs());
                    let want_g = (want_limit[k] - hot[i]) / n as f64;
                    assert!((g[i] - want_g).abs() < 3e-4 / n as f64 + 4.0 / fp.scale(), "grad {r} {k}");
                }
            }
            assert!(worst < 2.5e-3 && worst_limit < 3e-4, "softmax error {worst} ({worst_limit} from the limit's)");
        }
    }

    #[test]
    fn a_failed_logit_leaves_the_gradient_bounded() {
        // Rows where a failed truncation left a logit 2^24 too high or too low.
        let fp = FixedPoint::default();
        let mut rng = ChaCha8Rng::seed_from_u64(23);
        let (n, c) = (6, 10);
        let mut x: Vec<f64> = (0..n * c).map(|_| rng.random_range(-5.0..5.0)).collect();
        let huge = (1u64 << 24) as f64;
        x[3] += huge;
        x[c + 7] -= huge;
        x[2 * c + 1] += huge;
        x[2 * c + 2] -= huge;
        let hot: Vec<f64> = (0..n * c).map(|i| if i % c == 0 { 1.0 } else { 0.0 }).collect();
        let (xs, hs) = (share_f64(fp, &x, &[n, c], &mut rng), share_f64(fp, &hot, &[n, c], &mut rng));
        let out = run3(fp, |p| p.cross_entropy_grad(&xs[p.id], &hs[p.id]).unwrap());
        let g = open_f64(fp, &out);
        assert!(g.iter().all(|v| v.abs() <= 1.0 / n as f64 + 1e-3), "{g:?}");
        // The row with only a too-high logit puts (nearly) all its mass there.
        assert!((g[3] - 1.0 / n as f64).abs() < 1e-3, "{}", g[3]);
    }

    #[test]
    fn reciprocal_converges_for_many_classes() {
        // 1/C^2 rounds to zero at 20 bits for C = 2000: the first step must not scale by it.
        let fp = FixedPoint::default();
        let mut rng = ChaCha8Rng::seed_from_u64(24);
        let c = 2000usize;
        let s: Vec<f64> = (0..50).map(|_| rng.random_range(1.0..c as f64)).chain([1.0, c as f64]).collect();
        let n = s.len();
        let ss = share_f64(fp, &s, &[n], &mut rng);
        let iterations = reciprocal_iterations(c, fp.frac_bits);
        let out = run3(fp, |p| p.reciprocal(&ss[p.id], iterations, 1.0 / c as f64).unwrap());
        let r = open_f64(fp, &out);
        for (v, inv) in s.iter().zip(&r) {
            assert!((v * inv - 1.0).abs() < 2e-3, "1/{v} -> {inv}");
        }
    }
}
