//! Shared helpers for the kernel tests: random data, f64 finite differences, comparisons.
#![allow(dead_code)]

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

pub fn rng(seed: u64) -> ChaCha8Rng {
    ChaCha8Rng::seed_from_u64(seed)
}

pub fn random_vec(rng: &mut ChaCha8Rng, n: usize) -> Vec<f32> {
    (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
}

pub fn to_f64(v: &[f32]) -> Vec<f64> {
    v.iter().map(|&x| x as f64).collect()
}

/// Gradient of `<r, f(x)>` with respect to `x` by central differences.
pub fn finite_difference(f: impl Fn(&[f64]) -> Vec<f64>, x: &[f64], r: &[f64]) -> Vec<f64> {
    let h = 1e-6;
    let mut xp = x.to_vec();
    (0..x.len())
        .map(|i| {
            xp[i] = x[i] + h;
            let up: f64 = f(&xp).iter().zip(r).map(|(a, b)| a * b).sum();
            xp[i] = x[i] - h;
            let down: f64 = f(&xp).iter().zip(r).map(|(a, b)| a * b).sum();
            xp[i] = x[i];
            (up - down) / (2.0 * h)
        })
        .collect()
}

/// Asserts `got` matches `want` to `tol` relative to the largest reference magnitude.
pub fn assert_close(what: &str, got: &[f32], want: &[f64], tol: f64) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let scale = want.iter().fold(1e-3f64, |m, v| m.max(v.abs()));
    for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
        let err = (g as f64 - w).abs() / scale;
        assert!(err <= tol, "{what}: index {i}: got {g}, want {w} (relative error {err:.2e})");
    }
}

/// Runs `f` inside a rayon pool of `threads` threads.
pub fn with_threads<T: Send>(threads: usize, f: impl FnOnce() -> T + Send) -> T {
    rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap().install(f)
}
