//! Batch normalisation over `N x C x (H*W)`, per channel.
//!
//! Statistics are accumulated in f64: a channel of a large batch sums hundreds of thousands of
//! values, and the variance of nearly constant channels would otherwise lose its digits.
//!
//! No pass makes a call per plane (that cost 5-20x a plain sweep at ResNet18's 8x8 and 4x4 maps):
//! normalisation and the input gradient take one call per sample; the statistics one per sample
//! on larger maps and one per block of channels on small ones (`channel_sums`), added up in an
//! order fixed by the shape, so the result does not depend on the thread count.
//!
//! The statistics take one sweep: per channel, f64 lane sums of `x - k` and `(x - k)^2`, with `k`
//! the channel's first value, a shift that keeps the one-pass variance's digits. Explicit AVX-512
//! does the sums where the CPU has it, portable code otherwise, with the same bits. Maps of 64
//! positions or more are walked sample by sample in memory order; smaller ones channel by channel
//! across the batch, so that the lanes are reduced once per channel. The training forward writes a
//! new output without zeroing it first; the evaluation forward works in place on its input.
//!
//! Tried and dropped:
//! - Batch-norm and the ReLU after it in one sweep (each sample rectified right after it is
//!   normalised): within the noise (AsymML's best VGG16 row 106-110 against 108-110 ms, ResNet18's
//!   249-253 against 248-252 ms, tee-only VGG16 451-464 against 464-465 ms), the ReLU's sweep
//!   reading what batch-norm has just left in L3 (2026-12-03).

use crate::simd::multiversion;
use rayon::prelude::*;
use std::ops::Range;

/// Shapes: `batch x channels x spatial` (spatial = H*W; 1 after a linear layer).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct BnShape {
    pub batch: usize,
    pub channels: usize,
    pub spatial: usize,
}

impl BnShape {
    pub fn len(&self) -> usize {
        self.batch * self.channels * self.spatial
    }
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }
    /// Values per sample.
    fn per_sample(&self) -> usize {
        self.channels * self.spatial
    }
}

/// Per-channel batch statistics from a training-mode forward pass.
pub struct BnBatchStats {
    pub mean: Vec<f32>,
    /// Biased variance (divides by the count), as used for normalising.
    pub var: Vec<f32>,
    /// `1 / sqrt(var + eps)`.
    pub inv_std: Vec<f32>,
}

/// Independent f64 partial sums per channel's walk ([`sums_of_products`]): two 512-bit registers
/// per sum, in a fixed order of additions on every instruction set.
const LANES: usize = 16;

/// The lanes' total, added pairwise. Inlined into the multiversioned kernels, it adds in this
/// order on every instruction set (and the AVX-512 kernel's reduction follows it).
#[inline(always)]
fn tree_sum(lanes: [f64; LANES]) -> f64 {
    let eight: [f64; 8] = std::array::from_fn(|i| lanes[i] + lanes[i + 8]);
    let four: [f64; 4] = std::array::from_fn(|i| eight[i] + eight[i + 4]);
    (four[0] + four[2]) + (four[1] + four[3])
}

/// Channels per call of [`sums_of_products`] (a rayon task each) on small maps.
const CHANNEL_BLOCK: usize = 16;

/// Maps of at least this many positions are summed sample by sample: each task walks one
/// sample's planes in memory order, and the per-sample sums are added up in sample order (a walk
/// of one channel across the batch jumps a sample's size between planes; on ResNet18's 8x8 and
/// larger maps, beside the device's thread, the walk in memory order was a few milliseconds per
/// step faster). Smaller maps are summed channel by channel across the batch, so that the lanes
/// are added up once per channel instead of once per plane of a few vectors.
const SAMPLE_MAJOR_POSITIONS: usize = 64;

/// Per channel, over the whole batch, [`sums_of_products`] of `a` and `b`: returns `(sum(a'),
/// sum(a' b'))`. The order of the additions depends on the shape only, not on the thread count.
fn channel_sums(s: BnShape, ab: [&[f32]; 2], shifts: [&[f32]; 2]) -> (Vec<f64>, Vec<f64>) {
    let c = s.channels;
    let mut sums = vec![0.0f64; 2 * c];
    if s.spatial >= SAMPLE_MAJOR_POSITIONS {
        let mut per_sample = vec![0.0f64; s.batch * 2 * c];
        per_sample
            .par_chunks_mut(2 * c)
            .enumerate()
            .for_each(|(n, out)| sums_of_products(s, ab, n..n + 1, 0..c, shifts, out));
        for part in per_sample.chunks_exact(2 * c) {
            sums.iter_mut().zip(part).for_each(|(total, v)| *total += v);
        }
    } else {
        sums.par_chunks_mut(2 * CHANNEL_BLOCK).enumerate().for_each(|(block, out)| {
            let first = block * CHANNEL_BLOCK;
            sums_of_products(s, ab, 0..s.batch, first..first + out.len() / 2, shifts, out)
        });
    }
    (sums.iter().step_by(2).copied().collect(), sums.iter().skip(1).step_by(2).copied().collect())
}

/// Training mode: normalise with the batch's own statistics, then scale and shift. The output is
/// a new vector, written without being zeroed first.
///
/// The statistics take one pass: per channel, the sums of `x - k` and `(x - k)^2` in f64, with `k`
/// the channel's first value (a shift that keeps the variance's subtraction from cancelling
/// digits when the mean is large against the spread; tested against a two-pass reference).
pub fn batchnorm_train_forward(
    s: BnShape,
    x: &[f32],
    gamma: &[f32],
    beta: &[f32],
    eps: f32,
) -> (Vec<f32>, BnBatchStats) {
    assert_eq!(x.len(), s.len(), "batchnorm: input length");
    assert!(gamma.len() == s.channels && beta.len() == s.channels, "batchnorm: parameter length");
    let (per, plane) = (s.per_sample(), s.spatial);
    if s.is_empty() {
        let zeros = vec![0.0f32; s.channels];
        let inv_std = vec![1.0 / eps.sqrt(); s.channels];
        return (Vec::new(), BnBatchStats { mean: zeros.clone(), var: zeros, inv_std });
    }
    let shift: Vec<f32> = (0..s.channels).map(|c| x[c * plane]).collect();
    let (sums, squares) = channel_sums(s, [x, x], [&shift, &shift]);
    let count = (s.batch * s.spatial) as f64;
    let (mean, var): (Vec<f32>, Vec<f32>) = (0..s.channels)
        .map(|c| {
            let d = sums[c] / count;
            ((f64::from(shift[c]) + d) as f32, (squares[c] / count - d * d).max(0.0) as f32)
        })
        .unzip();
    let inv_std: Vec<f32> = var.iter().map(|v| 1.0 / (v + eps).sqrt()).collect();
    let scale: Vec<f32> = gamma.iter().zip(&inv_std).map(|(g, i)| g * i).collect();
    let offset: Vec<f32> = (0..s.channels).map(|c| beta[c] - mean[c] * scale[c]).collect();
    let mut y = Vec::with_capacity(x.len());
    y.spare_capacity_mut()[..x.len()]
        .par_chunks_mut(per)
        .zip(x.par_chunks(per))
        .for_each(|(y, x)| affine_sample_into(y, x, plane, &scale, &offset));
    // SAFETY: the samples cover `x.len()` values, and `affine_sample_into` wrote every one of them.
    unsafe { y.set_len(x.len()) };
    (y, BnBatchStats { mean, var, inv_std })
}

/// Evaluation mode, in place: normalise with running statistics, then scale and shift.
#[allow(clippy::too_many_arguments)]
pub fn batchnorm_eval_forward_in_place(
    s: BnShape,
    x: &mut [f32],
    gamma: &[f32],
    beta: &[f32],
    running_mean: &[f32],
    running_var: &[f32],
    eps: f32,
) {
    assert_eq!(x.len(), s.len(), "batchnorm: input length");
    if s.is_empty() {
        return;
    }
    let scale: Vec<f32> = (0..s.channels).map(|c| gamma[c] / (running_var[c] + eps).sqrt()).collect();
    let offset: Vec<f32> = (0..s.channels).map(|c| beta[c] - running_mean[c] * scale[c]).collect();
    x.par_chunks_mut(s.per_sample()).for_each(|x| affine_sample_in_place(x, s.spatial, &scale, &offset));
}

/// Two sums per channel `c` of `channels`, over its planes in every sample of `a` and `b` (both
/// `N x C x spatial`), with `a' = a - ka[c]` and `b' = b - kb[c]` in f64: `sum(a')` and `sum(a'
/// b')`, into `out` (`[sum, sum of products]` per channel, overwritten). With `a = b = x` and the
/// channel's shift, the moments of the forward pass; with `a = dy` (no shift) and `b = x` shifted
/// by the mean, the backward pass' `sum(dy)` and `sum(dy (x - mean))`.
///
/// Each of [`LANES`] partial sums takes every 16th value of each plane, the few left over at a
/// plane's end are summed apart, and the lanes are added pairwise once per channel
/// ([`tree_sum`]): the AVX-512 kernel does just that in registers, so every path gives the same
/// bits (tested). The compiler's own vectorisation of these loops was mostly scalar conversions.
fn sums_of_products(
    s: BnShape,
    ab: [&[f32]; 2],
    samples: Range<usize>,
    channels: Range<usize>,
    shifts: [&[f32]; 2],
    out: &mut [f64],
) {
    assert!(ab[0].len() == s.len() && ab[1].len() == s.len(), "batchnorm: tensor length");
    assert!(shifts[0].len() == s.channels && shifts[1].len() == s.channels, "batchnorm: shift length");
    assert!(channels.end <= s.channels && out.len() == 2 * channels.len(), "batchnorm: channel range");
    assert!(samples.end <= s.batch, "batchnorm: sample range");
    #[cfg(target_arch = "x86_64")]
    if crate::simd::level() == crate::simd::Level::Avx512 {
        // SAFETY: the level says the CPU has AVX-512F; the asserts give the lengths it reads.
        return unsafe { avx512::sums_of_products(s, ab, samples, channels, shifts, out) };
    }
    portable_sums_of_products(s, ab, samples, channels, shifts, out)
}

/// The values of a plane past its last whole 16 ([`sums_of_products`]), one at a time.
#[inline(always)]
fn add_rest(a: &[f32], b: &[f32], (ka, kb): (f64, f64), (sum, product): (&mut f64, &mut f64)) {
    for (&a, &b) in a.iter().zip(b) {
        let a = f64::from(a) - ka;
        *sum += a;
        *product += a * (f64::from(b) - kb);
    }
}

multiversion! {
    /// [`sums_of_products`] in plain loops.
    fn portable_sums_of_products(
        s: BnShape,
        ab: [&[f32]; 2],
        samples: Range<usize>,
        channels: Range<usize>,
        shifts: [&[f32]; 2],
        out: &mut [f64],
    ) {
        let (plane, whole) = (s.spatial, s.spatial - s.spatial % LANES);
        for (c, out) in channels.zip(out.chunks_exact_mut(2)) {
            let (ka, kb) = (f64::from(shifts[0][c]), f64::from(shifts[1][c]));
            let (mut sums, mut products) = ([0.0f64; LANES], [0.0f64; LANES]);
            let (mut sum_rest, mut product_rest) = (0.0f64, 0.0f64);
            for n in samples.clone() {
                let at = (n * s.channels + c) * plane;
                let (a, b) = (&ab[0][at..at + plane], &ab[1][at..at + plane]);
                for (a, b) in a[..whole].chunks_exact(LANES).zip(b[..whole].chunks_exact(LANES)) {
                    for j in 0..LANES {
                        let aj = f64::from(a[j]) - ka;
                        sums[j] += aj;
                        products[j] += aj * (f64::from(b[j]) - kb);
                    }
                }
                add_rest(&a[whole..], &b[whole..], (ka, kb), (&mut sum_rest, &mut product_rest));
            }
            out[0] = tree_sum(sums) + sum_rest;
            out[1] = tree_sum(products) + product_rest;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{add_rest, BnShape, Range, LANES};
    use std::arch::x86_64::*;

    /// Values `at..at + 16` of `v` in f64 (lanes 0-7, 8-15), minus `k`.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn shifted_halves(v: &[f32], at: usize, k: __m512d) -> [__m512d; 2] {
        debug_assert!(at + LANES <= v.len());
        let p = v.as_ptr().add(at);
        [
            _mm512_sub_pd(_mm512_cvtps_pd(_mm256_loadu_ps(p)), k),
            _mm512_sub_pd(_mm512_cvtps_pd(_mm256_loadu_ps(p.add(8))), k),
        ]
    }

    /// The 16 lanes `[0-7, 8-15]` added as `super::tree_sum` adds them.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn total(halves: [__m512d; 2]) -> f64 {
        let eight = _mm512_add_pd(halves[0], halves[1]);
        let four = _mm256_add_pd(_mm512_castpd512_pd256(eight), _mm512_extractf64x4_pd::<1>(eight));
        let two = _mm_add_pd(_mm256_castpd256_pd128(four), _mm256_extractf128_pd::<1>(four));
        _mm_cvtsd_f64(_mm_add_sd(two, _mm_unpackhi_pd(two, two)))
    }

    /// # Safety
    /// The CPU must have AVX-512F; the lengths must be those `super::sums_of_products` asserts.
    #[target_feature(enable = "avx512f")]
    pub(super) unsafe fn sums_of_products(
        s: BnShape,
        ab: [&[f32]; 2],
        samples: Range<usize>,
        channels: Range<usize>,
        shifts: [&[f32]; 2],
        out: &mut [f64],
    ) {
        let (plane, whole) = (s.spatial, s.spatial - s.spatial % LANES);
        let zero = _mm512_setzero_pd();
        for (c, out) in channels.zip(out.chunks_exact_mut(2)) {
            let (ka, kb) = (f64::from(shifts[0][c]), f64::from(shifts[1][c]));
            let (kav, kbv) = (_mm512_set1_pd(ka), _mm512_set1_pd(kb));
            let (mut sums, mut products) = ([zero; 2], [zero; 2]);
            let (mut sum_rest, mut product_rest) = (0.0f64, 0.0f64);
            for n in samples.clone() {
                let at = (n * s.channels + c) * plane;
                let (a, b) = (&ab[0][at..at + plane], &ab[1][at..at + plane]);
                for i in (0..whole).step_by(LANES) {
                    let (av, bv) = (shifted_halves(a, i, kav), shifted_halves(b, i, kbv));
                    for h in 0..2 {
                        sums[h] = _mm512_add_pd(sums[h], av[h]);
                        products[h] = _mm512_add_pd(products[h], _mm512_mul_pd(av[h], bv[h]));
                    }
                }
                add_rest(&a[whole..], &b[whole..], (ka, kb), (&mut sum_rest, &mut product_rest));
            }
            out[0] = total(sums) + sum_rest;
            out[1] = total(products) + product_rest;
        }
    }
}

multiversion! {
    /// `y = x * scale[c] + offset[c]` over one sample's planes, into `y` as it is (every value
    /// written).
    fn affine_sample_into(
        y: &mut [std::mem::MaybeUninit<f32>],
        x: &[f32],
        plane: usize,
        scale: &[f32],
        offset: &[f32],
    ) {
        for (c, (y, x)) in y.chunks_exact_mut(plane).zip(x.chunks_exact(plane)).enumerate() {
            let (a, b) = (scale[c], offset[c]);
            for (o, &v) in y.iter_mut().zip(x) {
                o.write(v * a + b);
            }
        }
    }
}

multiversion! {
    /// `x = x * scale[c] + offset[c]` over one sample's planes.
    fn affine_sample_in_place(x: &mut [f32], plane: usize, scale: &[f32], offset: &[f32]) {
        for (c, x) in x.chunks_exact_mut(plane).enumerate() {
            let (a, b) = (scale[c], offset[c]);
            for v in x.iter_mut() {
                *v = *v * a + b;
            }
        }
    }
}

/// Training-mode backward into a new input gradient (`dy` is only read: no copy of it is made,
/// and the output is written without being zeroed first). Writes `dgamma` and `dbeta`
/// (overwritten). The same values as [`batchnorm_backward_in_place`], bit for bit.
#[allow(clippy::too_many_arguments)]
pub fn batchnorm_backward(
    s: BnShape,
    x: &[f32],
    dy: &[f32],
    gamma: &[f32],
    stats: &BnBatchStats,
    dgamma: &mut [f32],
    dbeta: &mut [f32],
) -> Vec<f32> {
    assert!(x.len() == s.len() && dy.len() == s.len(), "batchnorm: lengths");
    let (per, plane) = (s.per_sample(), s.spatial);
    let coefficients = backward_coefficients(s, x, dy, gamma, stats, dgamma, dbeta);
    let mut dx = Vec::with_capacity(dy.len());
    if !s.is_empty() {
        dx.spare_capacity_mut()[..dy.len()]
            .par_chunks_mut(per)
            .zip(dy.par_chunks(per))
            .zip(x.par_chunks(per))
            .for_each(|((dx, dy), x)| input_gradient_sample_into(dx, dy, x, plane, &coefficients));
        // SAFETY: the samples cover `dy.len()` values, each written by `input_gradient_sample_into`.
        unsafe { dx.set_len(dy.len()) };
    }
    dx
}

/// [`batchnorm_backward`] with the input gradient written over the output gradient `dy_dx`
/// (each value depends only on its own `dy`, once the per-channel sums are taken), so no
/// buffer is allocated for it.
pub fn batchnorm_backward_in_place(
    s: BnShape,
    x: &[f32],
    dy_dx: &mut [f32],
    gamma: &[f32],
    stats: &BnBatchStats,
    dgamma: &mut [f32],
    dbeta: &mut [f32],
) {
    assert!(x.len() == s.len() && dy_dx.len() == s.len(), "batchnorm: lengths");
    let (per, plane) = (s.per_sample(), s.spatial);
    let coefficients = backward_coefficients(s, x, dy_dx, gamma, stats, dgamma, dbeta);
    if s.is_empty() {
        return;
    }
    // dx = gamma * inv_std * (dy - mean(dy) - xhat * mean(dy * xhat))
    dy_dx
        .par_chunks_mut(per)
        .zip(x.par_chunks(per))
        .for_each(|(g, x)| input_gradient_sample(g, x, plane, &coefficients));
}

/// The backward pass' per-channel sums `sum(dy)` and `sum(dy (x - mean))`, written to `dbeta` and
/// `dgamma`, and each channel's coefficients for the input gradient: `[mean, inv_std, gamma
/// inv_std, mean(dy), mean(dy xhat)]` (none for an empty batch, whose sums are zero).
fn backward_coefficients(
    s: BnShape,
    x: &[f32],
    dy: &[f32],
    gamma: &[f32],
    stats: &BnBatchStats,
    dgamma: &mut [f32],
    dbeta: &mut [f32],
) -> Vec<[f32; 5]> {
    if s.is_empty() {
        dgamma.fill(0.0);
        dbeta.fill(0.0);
        return Vec::new();
    }
    let count = (s.batch * s.spatial) as f64;
    let no_shift = vec![0.0f32; s.channels];
    let (sum_dy, sum_dy_xc) = channel_sums(s, [dy, x], [&no_shift, &stats.mean]);
    (0..s.channels)
        .map(|c| {
            let inv = stats.inv_std[c];
            dbeta[c] = sum_dy[c] as f32;
            dgamma[c] = (sum_dy_xc[c] * f64::from(inv)) as f32;
            let mean_dy = (sum_dy[c] / count) as f32;
            let mean_dy_xhat = (sum_dy_xc[c] * f64::from(inv) / count) as f32;
            [stats.mean[c], inv, gamma[c] * inv, mean_dy, mean_dy_xhat]
        })
        .collect()
}

multiversion! {
    /// [`input_gradient_sample`] from `dy` into `dx` as it is (every value written).
    fn input_gradient_sample_into(
        dx: &mut [std::mem::MaybeUninit<f32>],
        dy: &[f32],
        x: &[f32],
        plane: usize,
        coefficients: &[[f32; 5]],
    ) {
        let planes = dx.chunks_exact_mut(plane).zip(dy.chunks_exact(plane)).zip(x.chunks_exact(plane));
        for (c, ((out, g), x)) in planes.enumerate() {
            for ((o, &d), &v) in out.iter_mut().zip(g).zip(x) {
                o.write(input_gradient(d, v, coefficients[c]));
            }
        }
    }
}

multiversion! {
    /// One sample's input gradient, written over `dy`, plane by plane: `dx = k (dy - mean(dy) -
    /// xhat mean(dy xhat))` with `xhat = (x - mean) inv_std`; channel `c`'s coefficients are
    /// `[mean, inv_std, k, mean(dy), mean(dy xhat)]`.
    fn input_gradient_sample(dy_dx: &mut [f32], x: &[f32], plane: usize, coefficients: &[[f32; 5]]) {
        for (c, (g, x)) in dy_dx.chunks_exact_mut(plane).zip(x.chunks_exact(plane)).enumerate() {
            for (d, &v) in g.iter_mut().zip(x) {
                *d = input_gradient(*d, v, coefficients[c]);
            }
        }
    }
}

/// One value's input gradient from its output gradient `dy` and input `x`, with its channel's
/// coefficients `[mean, inv_std, k, mean(dy), mean(dy xhat)]` (inlined into each SIMD level of
/// both kernels, which therefore agree bit for bit).
#[inline(always)]
fn input_gradient(dy: f32, x: f32, [m, inv, k, mean_dy, mean_dy_xhat]: [f32; 5]) -> f32 {
    let xhat = (x - m) * inv;
    k * (dy - mean_dy - xhat * mean_dy_xhat)
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::simd::{with_level_cap, Level};
    use rand::{Rng, SeedableRng};

    /// Channel `c`'s values over the whole batch, in f64.
    fn channel_values(s: BnShape, x: &[f32], c: usize) -> Vec<f64> {
        (0..s.batch).flat_map(|n| &x[(n * s.channels + c) * s.spatial..][..s.spatial]).map(|&v| f64::from(v)).collect()
    }

    /// Mean and biased variance by two passes in f64.
    fn two_pass(values: &[f64]) -> (f64, f64) {
        let m = values.iter().sum::<f64>() / values.len() as f64;
        (m, values.iter().map(|v| (v - m) * (v - m)).sum::<f64>() / values.len() as f64)
    }

    #[test]
    fn one_pass_statistics_hold_their_digits_when_the_mean_dwarfs_the_spread() {
        // Channels centred at 0, 1e3 and -3e4 with spreads down to 0.1 (50 f32 steps at 3e4): without the shift, the
        // variance E[x^2] - E[x]^2 of the third would lose most of its digits to cancellation.
        let mut rng = rand::rngs::StdRng::seed_from_u64(32);
        for (batch, spatial) in [(32, 16), (5, 37), (2, 1024), (7, 1)] {
            let s = BnShape { batch, channels: 3, spatial };
            let (centres, spreads) = ([0.0f32, 1e3, -3e4], [1.0f32, 0.05, 0.1]);
            let x: Vec<f32> = (0..s.len())
                .map(|i| {
                    let c = (i / spatial) % 3;
                    centres[c] + spreads[c] * rng.random_range(-1.0f32..1.0)
                })
                .collect();
            let (gamma, beta) = (vec![1.0; 3], vec![0.0; 3]);
            let (_, stats) = batchnorm_train_forward(s, &x, &gamma, &beta, 1e-5);
            for c in 0..3 {
                let (m, v) = two_pass(&channel_values(s, &x, c));
                let mean_error = (f64::from(stats.mean[c]) - m).abs();
                assert!(mean_error <= 1e-7 * m.abs() + 1e-9, "{s:?}: channel {c} mean {} vs {m}", stats.mean[c]);
                assert!(
                    ((f64::from(stats.var[c]) - v) / v).abs() < 1e-6,
                    "{s:?}: channel {c} var {} vs {v}",
                    stats.var[c]
                );
            }
        }
    }

    #[test]
    fn the_f64_sums_have_the_same_bits_on_every_path() {
        // The f32 outputs round most f64 differences away, so the sums are compared themselves;
        // magnitudes from 2^-40 to 2^40, because sums of a few f32 values of one scale are exact
        // in f64 in any order.
        let mut rng = rand::rngs::StdRng::seed_from_u64(34);
        for (batch, channels, spatial) in [(3, 5, 37), (2, 4, 64), (4, 3, 1), (5, 6, 16), (3, 2, 15)] {
            let s = BnShape { batch, channels, spatial };
            let mut values = || -> Vec<f32> {
                (0..s.len()).map(|_| rng.random_range(-1.0f32..1.0) * 2f32.powi(rng.random_range(-40..40))).collect()
            };
            let (a, b) = (values(), values());
            let shifts: [Vec<f32>; 2] = [0, 1].map(|_| (0..channels).map(|_| rng.random_range(-1.0f32..1.0)).collect());
            let run = |level| {
                let mut out = vec![0.0f64; 2 * (channels - 1)];
                with_level_cap(level, || {
                    sums_of_products(s, [&a, &b], 0..batch, 1..channels, [&shifts[0], &shifts[1]], &mut out)
                });
                out.iter().map(|v| v.to_bits()).collect::<Vec<u64>>()
            };
            let baseline = run(Level::Baseline);
            assert_eq!(run(Level::Avx2), baseline, "{s:?}: AVX2");
            assert_eq!(run(Level::Avx512), baseline, "{s:?}: AVX-512");
            // And they are the sums they claim to be.
            for (i, c) in (1..channels).enumerate() {
                let (mut sum, mut product) = (0.0f64, 0.0f64);
                for n in 0..batch {
                    for p in 0..spatial {
                        let at = (n * channels + c) * spatial + p;
                        let a = f64::from(a[at]) - f64::from(shifts[0][c]);
                        sum += a;
                        product += a * (f64::from(b[at]) - f64::from(shifts[1][c]));
                    }
                }
                let got = [f64::from_bits(baseline[2 * i]), f64::from_bits(baseline[2 * i + 1])];
                let close = |got: f64, want: f64| (got - want).abs() <= 1e-12 * want.abs().max(1.0);
                assert!(
                    close(got[0], sum) && close(got[1], product),
                    "{s:?}: channel {c}: {got:?} vs {sum}, {product}"
                );
            }
        }
    }

    #[test]
    fn results_do_not_depend_on_the_thread_count() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(33);
        // Maps summed channel by channel and sample by sample.
        for spatial in [50, 100] {
            let s = BnShape { batch: 9, channels: 6, spatial };
            let x: Vec<f32> = (0..s.len()).map(|_| rng.random_range(-2.0f32..3.0)).collect();
            let dy: Vec<f32> = (0..s.len()).map(|_| rng.random_range(-1.0f32..1.0)).collect();
            let (gamma, beta) = (vec![1.5f32; 6], vec![0.25f32; 6]);
            let run = |threads: usize| {
                let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap();
                pool.install(|| {
                    let (y, stats) = batchnorm_train_forward(s, &x, &gamma, &beta, 1e-5);
                    let (mut dx, mut dg, mut db) = (dy.clone(), vec![0.0; 6], vec![0.0; 6]);
                    batchnorm_backward_in_place(s, &x, &mut dx, &gamma, &stats, &mut dg, &mut db);
                    (y, stats.mean, stats.var, dx, dg, db)
                })
            };
            let one = run(1);
            assert_eq!(run(2), one, "{s:?}");
            assert_eq!(run(3), one, "{s:?}");
        }
    }

    #[test]
    fn every_pass_gives_the_same_bits_on_every_path() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(31);
        for (batch, channels, spatial) in [(3, 5, 37), (2, 16, 64), (4, 3, 1), (1, 7, 200), (5, 20, 16), (3, 17, 15)] {
            let s = BnShape { batch, channels, spatial };
            let x: Vec<f32> = (0..s.len()).map(|_| rng.random_range(-2.0f32..3.0)).collect();
            let dy: Vec<f32> = (0..s.len()).map(|_| rng.random_range(-1.0f32..1.0)).collect();
            let params = |rng: &mut rand::rngs::StdRng| -> Vec<f32> {
                (0..channels).map(|_| rng.random_range(0.1f32..2.0)).collect()
            };
            let (gamma, beta, mean, var) = (params(&mut rng), params(&mut rng), params(&mut rng), params(&mut rng));
            let run = |level| {
                with_level_cap(level, || {
                    let (y, stats) = batchnorm_train_forward(s, &x, &gamma, &beta, 1e-5);
                    let mut z = x.clone();
                    batchnorm_eval_forward_in_place(s, &mut z, &gamma, &beta, &mean, &var, 1e-5);
                    let (mut dx, mut dgamma, mut dbeta) = (dy.clone(), vec![0.0; channels], vec![0.0; channels]);
                    batchnorm_backward_in_place(s, &x, &mut dx, &gamma, &stats, &mut dgamma, &mut dbeta);
                    (y, stats.mean, stats.var, z, dx, dgamma, dbeta)
                })
            };
            let baseline = run(Level::Baseline);
            assert_eq!(run(Level::Avx2), baseline, "{s:?}: AVX2");
            assert_eq!(run(Level::Avx512), baseline, "{s:?}: AVX-512");
            // Every output value is written: the eval pass matches its formula value by value.
            let (y, z) = (&baseline.0, &baseline.3);
            assert_eq!(y.len(), s.len());
            for (i, (&v, &got)) in x.iter().zip(z).enumerate() {
                let c = (i / spatial) % channels;
                let scale = gamma[c] / (var[c] + 1e-5).sqrt();
                assert_eq!(got, v * scale + (beta[c] - mean[c] * scale), "{s:?}: value {i}");
            }
            // The training pass normalises each channel: mean beta, spread gamma.
            for (c, &b) in beta.iter().enumerate() {
                let values: Vec<f64> = channel_values(s, y, c);
                let m = values.iter().sum::<f64>() / values.len() as f64;
                assert!((m - f64::from(b)).abs() < 1e-4, "{s:?}: channel {c} mean {m}");
            }
        }
    }
}
