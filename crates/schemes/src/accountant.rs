//! Rényi-DP accountant for the Gaussian releases of AsymML.
//!
//! Every vector AsymML releases about a training sample is L2-clipped to a bound B and gets Gaussian noise of
//! standard deviation z·B, so each release is a Gaussian mechanism with noise multiplier z and RDP
//! α/(2z²) at order α (Mironov 2017). The accountant composes every release that touches a sample by adding
//! RDP; it claims no amplification by subsampling (sample rate q = 1). The total is converted to (ε, δ) with
//! the improved conversion of Balle et al. 2020 ("Hypothesis testing interpretations and Rényi DP", Thm. 21)
//! and Canonne, Kamath & Steinke 2020: ε = RDP(α) + ln((α−1)/α) − (ln δ + ln α)/(α−1), minimized over a
//! fixed grid of orders. The result is an upper bound on the true ε of the composition, never an estimate.

use serde::{Deserialize, Serialize};

/// Gaussian releases composed so far: (noise multiplier, how many releases at it). Serializable so a
/// checkpoint can carry it and a resumed run continues the same budget.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RdpAccountant {
    /// One entry per distinct multiplier (compared bit for bit).
    releases: Vec<(f64, u64)>,
}

/// An (ε, δ) guarantee and the Rényi order it came from.
#[derive(Clone, Copy, Debug, PartialEq, Serialize)]
pub struct PrivacySpent {
    pub epsilon: f64,
    pub delta: f64,
    /// The Rényi order that gave the bound (infinite when nothing was composed).
    pub order: f64,
}

/// Largest noise multiplier [`calibrate_noise_multiplier`] will return.
const MAX_NOISE_MULTIPLIER: f64 = 1e6;

/// The Rényi orders searched: dense near 1 (many releases at large z), up to 65536 (few releases at small z).
fn orders() -> impl Iterator<Item = f64> {
    const LARGE: [f64; 11] = [320.0, 384.0, 512.0, 768.0, 1024.0, 2048.0, 4096.0, 8192.0, 16384.0, 32768.0, 65536.0];
    (1..10u32)
        .map(|x| 1.0 + f64::from(x) / 100.0)
        .chain((1..100u32).map(|x| 1.0 + f64::from(x) / 10.0))
        .chain((11..=256u32).map(f64::from))
        .chain(LARGE)
}

impl RdpAccountant {
    pub fn new() -> Self {
        Self::default()
    }

    /// Adds `count` Gaussian releases with noise multiplier `noise_multiplier`. A multiplier that is not
    /// positive and finite counts as unbounded privacy loss: [`Self::spent`] then reports ε = ∞.
    pub fn compose_gaussian(&mut self, noise_multiplier: f64, count: u64) {
        if count == 0 {
            return;
        }
        match self.releases.iter_mut().find(|(z, _)| z.to_bits() == noise_multiplier.to_bits()) {
            Some((_, n)) => *n = n.saturating_add(count),
            None => self.releases.push((noise_multiplier, count)),
        }
    }

    /// Total releases composed.
    pub fn releases(&self) -> u64 {
        self.releases.iter().fold(0u64, |acc, &(_, n)| acc.saturating_add(n))
    }

    /// RDP per unit order: Σ count / (2 z²), infinite if any multiplier is invalid.
    fn rdp_slope(&self) -> f64 {
        self.releases.iter().fold(0.0, |acc, &(z, n)| {
            if z > 0.0 && z.is_finite() {
                acc + n as f64 / (2.0 * z * z)
            } else {
                f64::INFINITY
            }
        })
    }

    /// RDP of everything composed at order `order`: Σ count · α / (2 z²).
    pub fn rdp(&self, order: f64) -> f64 {
        if self.releases.is_empty() {
            return 0.0;
        }
        order * self.rdp_slope()
    }

    /// Smallest ε over the order grid for this δ (meant for 0 < δ < 1; δ ≤ 0 or NaN gives ε = ∞). Zero
    /// releases give ε = 0. The bound is clamped at ε ≥ 0.
    pub fn spent(&self, delta: f64) -> PrivacySpent {
        if self.releases.is_empty() {
            return PrivacySpent { epsilon: 0.0, delta, order: f64::INFINITY };
        }
        let mut best = PrivacySpent { epsilon: f64::INFINITY, delta, order: orders().next().unwrap_or(1.0) };
        for a in orders() {
            let eps = self.rdp(a) + ((a - 1.0) / a).ln() - (delta.ln() + a.ln()) / (a - 1.0);
            if eps < best.epsilon {
                best.epsilon = eps;
                best.order = a;
            }
        }
        best.epsilon = best.epsilon.max(0.0);
        best
    }
}

/// The smallest noise multiplier z (to ~1e-7 relative) such that `releases` Gaussian releases at z give
/// ε ≤ `target_epsilon` at `delta`. Errs on invalid inputs or if it would need z > 1e6.
pub fn calibrate_noise_multiplier(target_epsilon: f64, delta: f64, releases: u64) -> Result<f64, String> {
    if !(target_epsilon > 0.0 && target_epsilon.is_finite()) {
        return Err(format!("target epsilon must be positive and finite, got {target_epsilon}"));
    }
    if !(delta > 0.0 && delta < 1.0) {
        return Err(format!("delta must lie strictly between 0 and 1, got {delta}"));
    }
    if releases == 0 {
        return Err("cannot calibrate noise for zero releases".to_string());
    }
    let eps_at = |z: f64| {
        let mut acc = RdpAccountant::new();
        acc.compose_gaussian(z, releases);
        acc.spent(delta).epsilon
    };
    if eps_at(MAX_NOISE_MULTIPLIER) > target_epsilon {
        return Err(format!(
            "{releases} releases need a noise multiplier above {MAX_NOISE_MULTIPLIER:e} for epsilon {target_epsilon} at delta {delta}"
        ));
    }
    // Invariant: eps_at(hi) <= target < eps_at(lo). ε is strictly decreasing in z while positive, and
    // infinite once 2z² underflows, so the halving stops.
    let (mut lo, mut hi) = (MAX_NOISE_MULTIPLIER, MAX_NOISE_MULTIPLIER);
    while eps_at(lo) <= target_epsilon {
        hi = lo;
        lo /= 2.0;
    }
    while hi / lo > 1.0 + 1e-7 {
        let mid = (lo * hi).sqrt();
        if eps_at(mid) <= target_epsilon {
            hi = mid;
        } else {
            lo = mid;
        }
    }
    Ok(hi)
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn gaussian(z: f64, k: u64) -> RdpAccountant {
        let mut acc = RdpAccountant::new();
        acc.compose_gaussian(z, k);
        acc
    }

    #[test]
    fn rdp_matches_closed_form_and_composition_adds() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(7);
        for _ in 0..200 {
            let (z1, z2) = (rng.random_range(0.1..50.0), rng.random_range(0.1..50.0));
            let (k1, k2) = (rng.random_range(1..100_000u64), rng.random_range(1..100_000u64));
            let a: f64 = rng.random_range(1.01..1000.0);
            let (one, mut both) = (gaussian(z1, k1), gaussian(z1, k1));
            let want = k1 as f64 * a / (2.0 * z1 * z1);
            assert!((one.rdp(a) - want).abs() <= 1e-12 * want, "rdp({a}) at z={z1}, k={k1}: {} vs {want}", one.rdp(a));
            both.compose_gaussian(z2, k2);
            let sum = want + gaussian(z2, k2).rdp(a);
            assert!(
                (both.rdp(a) - sum).abs() <= 1e-12 * sum,
                "composition of z={z1}x{k1} and z={z2}x{k2} does not add"
            );
            assert_eq!(both.releases(), k1 + k2);
        }
        let mut merged = gaussian(1.5, 3);
        merged.compose_gaussian(1.5, 4);
        assert_eq!(merged, gaussian(1.5, 7), "equal multipliers must merge into one entry");
        assert_eq!(RdpAccountant::new().spent(1e-5).epsilon, 0.0);
        for bad in [0.0, -1.0, f64::NAN, f64::INFINITY] {
            assert_eq!(gaussian(bad, 1).spent(1e-5).epsilon, f64::INFINITY, "multiplier {bad}: unbounded loss");
        }
    }

    /// ln Φ(x), accurate also far in the lower tail where erfc underflows.
    fn ln_phi(x: f64) -> f64 {
        if x > -30.0 {
            return (0.5 * libm::erfc(-x / std::f64::consts::SQRT_2)).ln();
        }
        let t = 1.0 / (x * x);
        let series = 1.0 - t * (1.0 - t * (3.0 - t * (15.0 - t * 105.0)));
        -0.5 * x * x - (-x).ln() - 0.5 * (2.0 * std::f64::consts::PI).ln() + series.ln()
    }

    /// Exact ε of a Gaussian mechanism with sensitivity 1 and std `s` at `delta` (Balle & Wang 2018):
    /// δ(ε) = Φ(1/(2s) − εs) − e^ε Φ(−1/(2s) − εs), inverted by bisection in log space.
    fn exact_gaussian_epsilon(s: f64, delta: f64) -> f64 {
        let ln_delta = |eps: f64| {
            let (la, lb) = (ln_phi(0.5 / s - eps * s), eps + ln_phi(-0.5 / s - eps * s));
            la + (-(lb - la).exp_m1()).ln()
        };
        if ln_delta(0.0) <= delta.ln() {
            return 0.0;
        }
        let (mut lo, mut hi) = (0.0, 1.0);
        while ln_delta(hi) > delta.ln() {
            (lo, hi) = (hi, 2.0 * hi);
        }
        for _ in 0..200 {
            let mid = 0.5 * (lo + hi);
            if ln_delta(mid) > delta.ln() {
                lo = mid;
            } else {
                hi = mid;
            }
        }
        hi
    }

    #[test]
    fn upper_bounds_the_exact_gaussian_curve_and_is_close() {
        for z in [0.8, 1.0, 2.0, 5.0, 20.0] {
            for k in [1u64, 10, 100, 1000, 30000] {
                for delta in [1e-5, 1e-6] {
                    let exact = exact_gaussian_epsilon(z / (k as f64).sqrt(), delta);
                    let got = gaussian(z, k).spent(delta).epsilon;
                    let ctx = format!("z={z}, k={k}, delta={delta}: accountant {got}, exact {exact}");
                    assert!(got >= exact * (1.0 - 1e-9), "not an upper bound: {ctx}");
                    assert!(got <= 1.15 * exact + 0.05, "too loose: {ctx}");
                }
            }
        }
    }

    /// Reference values from Opacus 1.6.0 (numpy 2.4.6, scipy 1.17.1), same order grid as `orders()`:
    /// ```python
    /// # `pip install --no-deps opacus numpy scipy`; opacus/accountants/analysis/rdp.py (which needs only
    /// # numpy and scipy) loaded by path with importlib, as importing the package would pull in torch.
    /// rdp = <module opacus.accountants.analysis.rdp>
    /// orders = ([1 + x / 100 for x in range(1, 10)] + [1 + x / 10 for x in range(1, 100)]
    ///           + [float(a) for a in range(11, 257)]
    ///           + [320., 384., 512., 768., 1024., 2048., 4096., 8192., 16384., 32768., 65536.])
    /// r = rdp.compute_rdp(q=1.0, noise_multiplier=z, steps=k, orders=orders)
    /// eps, order = rdp.get_privacy_spent(orders=orders, rdp=r, delta=d)
    /// ```
    /// The mixed case adds the `compute_rdp` arrays of (z=2, k=50) and (z=0.5, k=3).
    #[test]
    fn agrees_with_opacus() {
        let grid: Vec<f64> = orders().collect();
        assert_eq!((grid.len(), grid[0], grid[364]), (365, 1.01, 65536.0), "grid differs from the Python one");
        let cases = [
            (1.0, 100, 1e-5, 96.11630842505602),
            (0.8, 1000, 1e-6, 994.1791085088009),
            (5.0, 10, 1e-5, 2.8136532471298397),
            (20.0, 30000, 1e-6, 81.2616822948525),
            (3.0, 1, 1e-5, 1.3862750468052074),
        ];
        let mut mixed = gaussian(2.0, 50);
        mixed.compose_gaussian(0.5, 3);
        let accountants =
            cases.iter().map(|&(z, k, d, e)| (gaussian(z, k), d, e)).chain([(mixed, 1e-5, 34.60675401905626)]);
        for (acc, delta, want) in accountants {
            let got = acc.spent(delta).epsilon;
            assert!((got - want).abs() <= 1e-6 * want, "{acc:?} at delta={delta}: {got}, Opacus {want}");
        }
    }

    #[test]
    fn calibration_is_tight_and_rejects_bad_inputs() {
        for (target, delta, k) in
            [(1.0, 1e-5, 1u64), (8.0, 1e-5, 100), (3.0, 1e-6, 30000), (0.1, 1e-5, 10), (50.0, 1e-5, 1)]
        {
            let z = calibrate_noise_multiplier(target, delta, k).expect("feasible target");
            let at = |z| gaussian(z, k).spent(delta).epsilon;
            assert!(at(z) <= target, "target {target}, k={k}: z={z} gives {}", at(z));
            assert!(at(z * (1.0 - 1e-3)) > target, "target {target}, k={k}: z={z} is not the smallest");
        }
        for (target, delta, k) in
            [(0.0, 1e-5, 1), (-1.0, 1e-5, 1), (f64::NAN, 1e-5, 1), (1.0, 0.0, 1), (1.0, 1.0, 1), (1.0, 1e-5, 0)]
        {
            assert!(calibrate_noise_multiplier(target, delta, k).is_err(), "({target}, {delta}, {k}) must be rejected");
        }
        let err = calibrate_noise_multiplier(1e-9, 1e-5, u64::MAX).unwrap_err();
        assert!(err.contains("above"), "unexpected message: {err}");
    }
}
