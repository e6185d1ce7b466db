//! The Gaussian mechanism applied to each released residual: per-sample L2 clipping, then
//! independent Gaussian noise of standard deviation `noise_multiplier * bound` on every value.
//!
//! The noise comes from ChaCha12 (the cipher behind `rand`'s `StdRng`) keyed from the operating system's CSPRNG (`getrandom`), so the
//! device cannot predict or replay it. (Floating-point Gaussian samplers have known weaknesses
//! against an adversary that sees the exact bits, Mironov 2012; see docs/asymml.md.)

use rand::SeedableRng;
use rand_chacha::ChaCha12Rng;
use rand_distr::{Distribution, StandardNormal};

/// A noise source seeded from the operating system.
pub fn os_seeded() -> Result<ChaCha12Rng, String> {
    let mut seed = [0u8; 32];
    getrandom_fill(&mut seed)?;
    Ok(ChaCha12Rng::from_seed(seed))
}

fn getrandom_fill(buf: &mut [u8]) -> Result<(), String> {
    use rand::TryRngCore;
    rand::rngs::OsRng.try_fill_bytes(buf).map_err(|e| format!("the operating system's random source failed: {e}"))
}

/// What one call clipped.
#[derive(Clone, Copy, Debug, Default, PartialEq)]
pub struct Clipped {
    /// Samples whose residual exceeded the bound and was scaled down.
    pub clipped: usize,
    pub samples: usize,
}

/// Clips every `per_sample`-long row of `values` to L2 norm `bound` and adds Gaussian noise of
/// standard deviation `noise_multiplier * bound` to every value. `noise_multiplier == 0` leaves the
/// values untouched (no clipping, no noise).
pub fn clip_and_noise(
    values: &mut [f32],
    per_sample: usize,
    bound: f64,
    noise_multiplier: f64,
    rng: &mut ChaCha12Rng,
) -> Clipped {
    let samples = values.len().checked_div(per_sample).unwrap_or(0);
    let mut out = Clipped { clipped: 0, samples };
    if noise_multiplier <= 0.0 || per_sample == 0 {
        return out;
    }
    let std = noise_multiplier * bound;
    for row in values.chunks_mut(per_sample) {
        let norm = row.iter().map(|&v| (v as f64) * (v as f64)).sum::<f64>().sqrt();
        if norm > bound {
            let scale = (bound / norm) as f32;
            row.iter_mut().for_each(|v| *v *= scale);
            out.clipped += 1;
        }
        // Single-precision samples: twice as fast as f64 ones here, and the released values are f32.
        let std = std as f32;
        for v in row.iter_mut() {
            let z: f32 = StandardNormal.sample(rng);
            *v += z * std;
        }
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn clips_to_the_bound_and_adds_noise_of_the_right_scale() {
        let mut rng = ChaCha12Rng::seed_from_u64(3);
        let per = 4000;
        // Row 0 is far above the bound, row 1 below it.
        let mut v: Vec<f32> = (0..2 * per).map(|i| if i < per { 0.5 } else { 0.001 * (i % 7) as f32 }).collect();
        let original = v.clone();
        let bound = 3.0;
        // No noise: untouched.
        assert_eq!(clip_and_noise(&mut v, per, bound, 0.0, &mut rng), Clipped { clipped: 0, samples: 2 });
        assert_eq!(v, original);
        // Tiny noise: row 0 lands on the bound, row 1 keeps its values.
        let c = clip_and_noise(&mut v, per, bound, 1e-9, &mut rng);
        assert_eq!(c, Clipped { clipped: 1, samples: 2 });
        let norm0 = v[..per].iter().map(|&x| (x as f64).powi(2)).sum::<f64>().sqrt();
        assert!((norm0 - bound).abs() < 1e-3, "clipped norm {norm0}");
        assert!(v[per..].iter().zip(&original[per..]).all(|(a, b)| (a - b).abs() < 1e-6));
        // Real noise: the per-value standard deviation is z * bound.
        let mut w = vec![0.0f32; 20000];
        clip_and_noise(&mut w, 20000, 2.0, 0.5, &mut rng);
        let std = (w.iter().map(|&x| (x as f64).powi(2)).sum::<f64>() / w.len() as f64).sqrt();
        assert!((std - 1.0).abs() < 0.03, "noise std {std}, expected 1.0");
    }

    #[test]
    fn os_seeded_sources_differ() {
        use rand::Rng;
        let (mut a, mut b) = (os_seeded().unwrap(), os_seeded().unwrap());
        assert_ne!(a.random::<u64>(), b.random::<u64>());
    }
}
