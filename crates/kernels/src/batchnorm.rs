//! Batch normalisation over `N x C x (H*W)`, per channel.
//!
//! Statistics are accumulated in f64: a channel of a large batch sums hundreds of thousands of
//! values, and the variance of nearly constant channels would otherwise lose its digits.

use crate::elementwise::{sum_and_dot_f64_of, sum_f64_of};
use crate::simd::multiversion;
use rayon::prelude::*;

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
    /// Channel `c`'s plane in each sample, in order.
    fn channel_planes<'a>(&self, x: &'a [f32], c: usize) -> impl Iterator<Item = &'a [f32]> + 'a {
        let (cs, s) = (self.channels * self.spatial, self.spatial);
        (0..self.batch).map(move |n| &x[n * cs + c * s..n * cs + (c + 1) * s])
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

/// Training mode: normalise with the batch's own statistics, then scale and shift. The output is
/// a new vector, written without being zeroed first.
pub fn batchnorm_train_forward(
    s: BnShape,
    x: &[f32],
    gamma: &[f32],
    beta: &[f32],
    eps: f32,
) -> (Vec<f32>, BnBatchStats) {
    assert_eq!(x.len(), s.len(), "batchnorm: input length");
    assert!(gamma.len() == s.channels && beta.len() == s.channels, "batchnorm: parameter length");
    let count = (s.batch * s.spatial) as f64;
    let (mean, var): (Vec<f32>, Vec<f32>) = (0..s.channels)
        .into_par_iter()
        .map(|c| {
            let m = s.channel_planes(x, c).map(|p| sum_f64_of(p, |v| v)).sum::<f64>() / count;
            let v = s.channel_planes(x, c).map(|p| sum_f64_of(p, |v| (v - m) * (v - m))).sum::<f64>() / count;
            (m as f32, v as f32)
        })
        .unzip();
    let inv_std: Vec<f32> = var.iter().map(|v| 1.0 / (v + eps).sqrt()).collect();
    let scale: Vec<f32> = gamma.iter().zip(&inv_std).map(|(g, i)| g * i).collect();
    let shift: Vec<f32> = (0..s.channels).map(|c| beta[c] - mean[c] * scale[c]).collect();
    let mut y = Vec::with_capacity(x.len());
    let plane = s.spatial.max(1);
    y.spare_capacity_mut()[..x.len()].par_chunks_mut(plane).zip(x.par_chunks(plane)).enumerate().for_each(
        |(i, (y, x))| {
            let c = i % s.channels;
            affine_plane_into(y, x, scale[c], shift[c]);
        },
    );
    // SAFETY: the planes cover `x.len()` values, and `affine_plane_into` wrote every one of them.
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
    let scale: Vec<f32> = (0..s.channels).map(|c| gamma[c] / (running_var[c] + eps).sqrt()).collect();
    let shift: Vec<f32> = (0..s.channels).map(|c| beta[c] - running_mean[c] * scale[c]).collect();
    x.par_chunks_mut(s.spatial.max(1)).enumerate().for_each(|(i, x)| {
        let c = i % s.channels;
        affine_plane_in_place(x, scale[c], shift[c]);
    });
}

multiversion! {
    /// `y = x * scale + shift` over one plane, into `y` as it is (every value written).
    fn affine_plane_into(y: &mut [std::mem::MaybeUninit<f32>], x: &[f32], scale: f32, shift: f32) {
        for (o, &v) in y.iter_mut().zip(x) {
            o.write(v * scale + shift);
        }
    }
}

multiversion! {
    /// `x = x * scale + shift` over one plane.
    fn affine_plane_in_place(x: &mut [f32], scale: f32, shift: f32) {
        for v in x.iter_mut() {
            *v = *v * scale + shift;
        }
    }
}

/// Training-mode backward. Writes `dx`, `dgamma` and `dbeta` (all overwritten).
#[allow(clippy::too_many_arguments)]
pub fn batchnorm_backward(
    s: BnShape,
    x: &[f32],
    dy: &[f32],
    gamma: &[f32],
    stats: &BnBatchStats,
    dx: &mut [f32],
    dgamma: &mut [f32],
    dbeta: &mut [f32],
) {
    assert_eq!(dx.len(), dy.len(), "batchnorm: lengths");
    dx.copy_from_slice(dy);
    batchnorm_backward_in_place(s, x, dx, gamma, stats, dgamma, dbeta);
}

/// [`batchnorm_backward`] with the input gradient written over the output gradient `dy_dx`
/// (each value depends only on its own `dy`, once the per-channel sums are taken), so no
/// buffer is allocated and zeroed for it.
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
    let count = (s.batch * s.spatial) as f64;
    // Per channel: sum(dy) and sum(dy * xhat).
    let dy: &[f32] = dy_dx;
    let sums: Vec<(f64, f64)> = (0..s.channels)
        .into_par_iter()
        .map(|c| {
            let (m, inv) = (stats.mean[c] as f64, stats.inv_std[c] as f64);
            let (mut sum_dy, mut sum_dy_xc) = (0.0, 0.0);
            for (g, v) in s.channel_planes(dy, c).zip(s.channel_planes(x, c)) {
                let (plane_dy, plane_dy_xc) = sum_and_dot_f64_of(g, v, |g| g, |g, v| g * (v - m));
                sum_dy += plane_dy;
                sum_dy_xc += plane_dy_xc;
            }
            (sum_dy, sum_dy_xc * inv)
        })
        .collect();
    for c in 0..s.channels {
        dbeta[c] = sums[c].0 as f32;
        dgamma[c] = sums[c].1 as f32;
    }
    // dx = gamma * inv_std * (dy - mean(dy) - xhat * mean(dy * xhat))
    let plane = s.spatial.max(1);
    dy_dx.par_chunks_mut(plane).zip(x.par_chunks(plane)).enumerate().for_each(|(i, (g, x))| {
        let c = i % s.channels;
        let (m, inv) = (stats.mean[c], stats.inv_std[c]);
        let mean_dy = (sums[c].0 / count) as f32;
        let mean_dy_xhat = (sums[c].1 / count) as f32;
        input_gradient_plane(g, x, [m, inv, gamma[c] * inv, mean_dy, mean_dy_xhat]);
    });
}

multiversion! {
    /// One plane of the input gradient, written over `dy`: `dx = k (dy - mean(dy) - xhat
    /// mean(dy xhat))` with `xhat = (x - mean) inv_std`; `c` is `[mean, inv_std, k, mean(dy),
    /// mean(dy xhat)]`.
    fn input_gradient_plane(dy_dx: &mut [f32], x: &[f32], c: [f32; 5]) {
        let [m, inv, k, mean_dy, mean_dy_xhat] = c;
        for (d, &v) in dy_dx.iter_mut().zip(x) {
            let xhat = (v - m) * inv;
            *d = k * (*d - mean_dy - xhat * mean_dy_xhat);
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::simd::{with_level_cap, Level};
    use rand::{Rng, SeedableRng};

    #[test]
    fn forward_passes_give_the_same_bits_on_every_path() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(31);
        for (batch, channels, spatial) in [(3, 5, 37), (2, 16, 64), (4, 3, 1), (1, 7, 200)] {
            let s = BnShape { batch, channels, spatial };
            let x: Vec<f32> = (0..s.len()).map(|_| rng.random_range(-2.0f32..3.0)).collect();
            let params = |rng: &mut rand::rngs::StdRng| -> Vec<f32> {
                (0..channels).map(|_| rng.random_range(0.1f32..2.0)).collect()
            };
            let (gamma, beta, mean, var) = (params(&mut rng), params(&mut rng), params(&mut rng), params(&mut rng));
            let run = |level| {
                with_level_cap(level, || {
                    let (y, stats) = batchnorm_train_forward(s, &x, &gamma, &beta, 1e-5);
                    let mut z = x.clone();
                    batchnorm_eval_forward_in_place(s, &mut z, &gamma, &beta, &mean, &var, 1e-5);
                    (y, stats.mean, stats.var, z)
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
                let values: Vec<f64> = s.channel_planes(y, c).flatten().map(|&v| f64::from(v)).collect();
                let m = values.iter().sum::<f64>() / values.len() as f64;
                assert!((m - f64::from(b)).abs() < 1e-4, "{s:?}: channel {c} mean {m}");
            }
        }
    }
}
