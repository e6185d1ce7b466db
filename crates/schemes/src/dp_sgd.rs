//! DP-SGD inside the enclave (`--dp full`; Abadi et al. 2016): each sample's gradient of every
//! parameter is clipped to L2 norm `clip` over the whole model, the clipped gradients are summed,
//! Gaussian noise of standard deviation `noise_multiplier * clip` is added to every coordinate of
//! the sum, and the optimizer takes the noisy sum over the batch size. A sample then changes an
//! update by at most `clip` in L2 (zero-out adjacency), so each update is a Gaussian mechanism of
//! that multiplier, which the run's accountant composes with the scheme's other releases; the
//! weights the device sees every step are post-processing of those updates.
//!
//! Per-sample gradients come from running each sample of the batch alone through the scheme's
//! forward and backward passes ([`crate::SplitRunner`]): exact for every layer and placement, at
//! the price of one pass per sample. Ghost clipping (per-sample norms from the batched pass, Li et
//! al. 2021, Bu et al. 2022) is not done. Batch-norm, which couples the samples of a batch, is
//! refused.

use crate::asymml::keystream::NoiseRng;
use crate::asymml::noise::clip_and_noise;
use trustsplit_nn::tensor::{data, data_mut};
use trustsplit_nn::Tensor;

/// DP-SGD's settings and noise stream.
pub struct DpSgd {
    /// The L2 bound of each sample's whole gradient.
    pub clip: f64,
    pub noise_multiplier: f64,
    rng: NoiseRng,
    /// Samples whose gradient was scaled down, and samples seen.
    pub clipped: u64,
    pub samples: u64,
}

impl DpSgd {
    /// Noise from a stream keyed by the OS.
    pub fn new(clip: f64, noise_multiplier: f64) -> Result<DpSgd, String> {
        if !(clip.is_finite() && clip > 0.0) {
            return Err(format!("--dp-clip must be a positive number, got {clip}"));
        }
        if !(noise_multiplier.is_finite() && noise_multiplier > 0.0) {
            return Err(format!(
                "--dp full needs noise on the updates: --noise-multiplier must be positive, got {noise_multiplier}"
            ));
        }
        Ok(DpSgd { clip, noise_multiplier, rng: NoiseRng::from_os()?, clipped: 0, samples: 0 })
    }

    /// Adds one sample's gradients (every parameter, in order), scaled to L2 norm at most `clip`
    /// over all of them, to `sum` (empty before the first sample).
    pub fn add_sample(&mut self, sum: &mut Vec<Tensor>, mut grads: Vec<Tensor>) {
        let norm = grads.iter().flat_map(|g| data(g).iter()).map(|&v| f64::from(v) * f64::from(v)).sum::<f64>().sqrt();
        self.samples += 1;
        if norm > self.clip {
            self.clipped += 1;
            // Just under the bound, so that f32 rounding cannot take the norm past it.
            let scale = (self.clip / norm * (1.0 - 1e-6)) as f32;
            grads.iter_mut().for_each(|g| data_mut(g).iter_mut().for_each(|v| *v *= scale));
        }
        if sum.is_empty() {
            *sum = grads;
            return;
        }
        for (s, g) in sum.iter_mut().zip(&grads) {
            data_mut(s).iter_mut().zip(data(g)).for_each(|(s, g)| *s += g);
        }
    }

    /// The update the optimizer takes: `sum` plus noise, over `batch`.
    pub fn noisy_mean(&mut self, mut sum: Vec<Tensor>, batch: usize) -> Vec<Tensor> {
        let inverse = 1.0 / batch.max(1) as f32;
        for s in &mut sum {
            let values = data_mut(s);
            let len = values.len();
            // One "sample" of `len` values, norm 0: nothing clipped, noise of std z * clip on each.
            clip_and_noise(values, len, &[0.0], self.clip, self.noise_multiplier, &mut self.rng);
            values.iter_mut().for_each(|v| *v *= inverse);
        }
        sum
    }
}

/// Its settings and counts (never the noise stream).
impl std::fmt::Debug for DpSgd {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.debug_struct("DpSgd")
            .field("clip", &self.clip)
            .field("noise_multiplier", &self.noise_multiplier)
            .field("clipped", &self.clipped)
            .field("samples", &self.samples)
            .finish_non_exhaustive()
    }
}
