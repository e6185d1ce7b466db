//! Rényi-DP accountant for the Gaussian releases of AsymML.
//!
//! Every vector AsymML releases about a training sample is L2-clipped to a bound B and gets Gaussian noise of
//! standard deviation z·B, so each release is a Gaussian mechanism with noise multiplier z and RDP
//! α/(2z²) at order α (Mironov 2017). The accountant composes every release that touches a sample by adding
//! RDP; it claims no amplification by subsampling (sample rate q = 1). The total is converted to (ε, δ) with
//! the improved conversion of Balle et al. 2020 ("Hypothesis testing interpretations and Rényi DP", Thm. 21)
//! and Canonne, Kamath & Steinke 2020: ε = RDP(α) + ln((α−1)/α) − (ln δ + ln α)/(α−1), minimized over a
//! fixed grid of orders. The result is an upper bound on the true ε of the composition, never an estimate.
//!
//! Releases under Poisson sampling (each sample in a step with probability q, independently) are
//! composed with [`RdpAccountant::compose_sampled_gaussian`]: the Rényi divergence of the sampled
//! Gaussian mechanism (Mironov, Talwar & Zhang 2019, "Rényi Differential Privacy of the Sampled
//! Gaussian Mechanism", section 3.3), computed in log space as a finite sum at integer orders and a
//! convergent series at fractional ones. It applies to a mechanism that adds noise to a *sum* over
//! the sampled batch (DP-SGD's update), not to per-sample releases such as AsymML's residuals, whose
//! count would show who was sampled.

use serde::{Deserialize, Serialize};

/// Gaussian releases composed so far: (noise multiplier, how many releases at it). Serializable so a
/// checkpoint can carry it and a resumed run continues the same budget.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct RdpAccountant {
    /// One entry per distinct multiplier (compared bit for bit).
    releases: Vec<(f64, u64)>,
    /// Releases under Poisson sampling: (noise multiplier, sample rate, how many), one entry per
    /// distinct pair. Absent from checkpoints written before it existed.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    sampled: Vec<(f64, f64, u64)>,
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

    /// Adds `count` releases of the sampled Gaussian mechanism: noise multiplier
    /// `noise_multiplier` on a sum over a batch that holds each sample with probability
    /// `sample_rate` (Poisson sampling). A rate of 1 is the plain Gaussian; a rate outside (0, 1]
    /// counts as unbounded privacy loss, as does a multiplier that is not positive and finite.
    pub fn compose_sampled_gaussian(&mut self, noise_multiplier: f64, sample_rate: f64, count: u64) {
        if count == 0 {
            return;
        }
        if sample_rate == 1.0 {
            return self.compose_gaussian(noise_multiplier, count);
        }
        let same = |&&mut (z, q, _): &&mut (f64, f64, u64)| {
            z.to_bits() == noise_multiplier.to_bits() && q.to_bits() == sample_rate.to_bits()
        };
        match self.sampled.iter_mut().find(same) {
            Some((_, _, n)) => *n = n.saturating_add(count),
            None => self.sampled.push((noise_multiplier, sample_rate, count)),
        }
    }

    /// Total releases composed.
    pub fn releases(&self) -> u64 {
        let plain = self.releases.iter().fold(0u64, |acc, &(_, n)| acc.saturating_add(n));
        self.sampled.iter().fold(plain, |acc, &(_, _, n)| acc.saturating_add(n))
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
        let plain = if self.releases.is_empty() { 0.0 } else { order * self.rdp_slope() };
        self.sampled.iter().fold(plain, |acc, &(z, q, n)| acc + n as f64 * sampled_gaussian_rdp(q, z, order))
    }

    /// Smallest ε over the order grid for this δ (meant for 0 < δ < 1; δ ≤ 0 or NaN gives ε = ∞). Zero
    /// releases give ε = 0. The bound is clamped at ε ≥ 0.
    pub fn spent(&self, delta: f64) -> PrivacySpent {
        if self.releases.is_empty() && self.sampled.is_empty() {
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

/// ln(e^a + e^b).
fn log_add(a: f64, b: f64) -> f64 {
    let (hi, lo) = if a > b { (a, b) } else { (b, a) };
    if lo == f64::NEG_INFINITY {
        return hi;
    }
    hi + (lo - hi).exp().ln_1p()
}

/// ln(e^a - e^b) for a >= b; NaN otherwise (the series lost its footing).
fn log_sub(a: f64, b: f64) -> f64 {
    if b == f64::NEG_INFINITY {
        return a;
    }
    if b > a {
        return f64::NAN;
    }
    if a == b {
        return f64::NEG_INFINITY;
    }
    a + (-(b - a).exp()).ln_1p()
}

/// ln erfc(x), also far in the upper tail where erfc underflows (asymptotic series).
fn ln_erfc(x: f64) -> f64 {
    if x < 20.0 {
        return libm::erfc(x).ln();
    }
    let t = 1.0 / (2.0 * x * x);
    let series = 1.0 - t * (1.0 - 3.0 * t * (1.0 - 5.0 * t));
    -x * x - x.ln() - 0.5 * std::f64::consts::PI.ln() + series.ln()
}

/// Rényi divergence of order `order` of the sampled Gaussian mechanism with sample rate `q` and
/// noise multiplier `z` (sensitivity 1): ln(A_α) / (α - 1), with A_α the α-th moment of the ratio of
/// the mixture (1 - q) N(0, z²) + q N(1, z²) to N(0, z²). Infinite where the series cannot be
/// summed, so that the order is never the one chosen.
fn sampled_gaussian_rdp(q: f64, z: f64, order: f64) -> f64 {
    if !(z > 0.0 && z.is_finite() && q > 0.0 && q <= 1.0 && order > 1.0) {
        return f64::INFINITY;
    }
    if q == 1.0 {
        return order / (2.0 * z * z);
    }
    let log_a = if order.fract() == 0.0 && order <= 1e6 {
        log_a_integer(q, z, order as u64)
    } else {
        log_a_fractional(q, z, order)
    };
    if log_a.is_nan() {
        f64::INFINITY
    } else {
        log_a / (order - 1.0)
    }
}

/// ln A_α at an integer order: Σ_k C(α, k) (1 - q)^(α - k) q^k exp((k² - k) / (2 z²)).
fn log_a_integer(q: f64, z: f64, alpha: u64) -> f64 {
    let a = alpha as f64;
    let ln_gamma_a = libm::lgamma(a + 1.0);
    (0..=alpha).fold(f64::NEG_INFINITY, |acc, k| {
        let k = k as f64;
        let ln_binom = ln_gamma_a - libm::lgamma(k + 1.0) - libm::lgamma(a - k + 1.0);
        let term = ln_binom + k * q.ln() + (a - k) * (-q).ln_1p() + (k * k - k) / (2.0 * z * z);
        log_add(acc, term)
    })
}

/// ln A_α at a fractional order, as two convergent series (Mironov, Talwar & Zhang 2019, section
/// 3.3): the integral split at z0 = z² ln(1/q - 1) + 1/2, each half expanded with the generalised
/// binomial coefficients of α (whose signs alternate once k > α). NaN if it does not converge.
fn log_a_fractional(q: f64, z: f64, alpha: f64) -> f64 {
    let (mut log_a0, mut log_a1) = (f64::NEG_INFINITY, f64::NEG_INFINITY);
    let z0 = z * z * (1.0 / q - 1.0).ln() + 0.5;
    let (ln_q, ln_1mq) = (q.ln(), (-q).ln_1p());
    // ln |C(α, k)| and its sign, from C(α, 0) = 1 by C(α, k + 1) = C(α, k) (α - k) / (k + 1).
    let (mut ln_coef, mut positive) = (0.0f64, true);
    for k in 0..100_000u32 {
        let i = f64::from(k);
        let j = alpha - i;
        let log_t0 = ln_coef + i * ln_q + j * ln_1mq;
        let log_t1 = ln_coef + j * ln_q + i * ln_1mq;
        let log_e0 = 0.5f64.ln() + ln_erfc((i - z0) / (std::f64::consts::SQRT_2 * z));
        let log_e1 = 0.5f64.ln() + ln_erfc((z0 - j) / (std::f64::consts::SQRT_2 * z));
        let log_s0 = log_t0 + (i * i - i) / (2.0 * z * z) + log_e0;
        let log_s1 = log_t1 + (j * j - j) / (2.0 * z * z) + log_e1;
        if positive {
            log_a0 = log_add(log_a0, log_s0);
            log_a1 = log_add(log_a1, log_s1);
        } else {
            log_a0 = log_sub(log_a0, log_s0);
            log_a1 = log_sub(log_a1, log_s1);
        }
        if log_a0.is_nan() || log_a1.is_nan() {
            return f64::NAN;
        }
        if log_s0.max(log_s1) < -30.0 {
            return log_add(log_a0, log_a1);
        }
        let factor = alpha - i;
        if factor == 0.0 {
            return log_add(log_a0, log_a1);
        }
        ln_coef += factor.abs().ln() - (i + 1.0).ln();
        positive ^= factor < 0.0;
    }
    f64::NAN
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

    /// Reference values from Google's dp-accounting 0.6.0 (numpy 2.4.6, scipy 1.17.1), whose RDP
    /// analysis of the sampled Gaussian is Opacus's, on the grid of `orders()`:
    /// ```python
    /// import dp_accounting
    /// from dp_accounting import rdp
    /// acc = rdp.RdpAccountant(orders)   # orders as in `agrees_with_opacus`
    /// acc.compose(dp_accounting.PoissonSampledDpEvent(q, dp_accounting.GaussianDpEvent(z)), steps)
    /// eps, order = acc.get_epsilon_and_optimal_order(delta)
    /// ```
    /// The first case is the DP-SGD MNIST setting (batch 256 of 60,000, z = 1.1, 60 epochs).
    #[test]
    fn sampled_gaussian_agrees_with_dp_accounting() {
        let cases = [
            (256.0 / 60000.0, 1.1, 14040u64, 1e-5, 2.5943633557853634, 8.1),
            (0.01, 1.0, 1000, 1e-5, 2.101366525420273, 7.8),
            (0.001, 0.8, 10000, 1e-6, 1.7036252861577152, 8.2),
            (0.05, 2.0, 500, 1e-5, 2.7685845622392886, 7.6),
            (0.1, 0.6, 50, 1e-5, 17.150906727158002, 2.0),
        ];
        for (q, z, steps, delta, want, order) in cases {
            let mut acc = RdpAccountant::new();
            acc.compose_sampled_gaussian(z, q, steps);
            let got = acc.spent(delta);
            let ctx = format!("q={q}, z={z}, {steps} steps, delta={delta}: {got:?}, dp-accounting {want} at {order}");
            assert!((got.epsilon - want).abs() <= 1e-6 * want, "{ctx}");
            assert!((got.order - order).abs() < 1e-9, "{ctx}");
        }
        // Rate 1 is the plain Gaussian; sampling only lowers the loss; and it composes with the rest.
        let mut one = RdpAccountant::new();
        one.compose_sampled_gaussian(2.0, 1.0, 10);
        assert_eq!(one, gaussian(2.0, 10));
        assert!((one.spent(1e-5).epsilon - 8.079406222420491).abs() < 1e-9);
        let mut both = gaussian(3.0, 20);
        both.compose_sampled_gaussian(1.0, 0.01, 1000);
        for a in [1.5, 2.0, 7.8, 32.0] {
            let mut alone = RdpAccountant::new();
            alone.compose_sampled_gaussian(1.0, 0.01, 1000);
            let sum = gaussian(3.0, 20).rdp(a) + alone.rdp(a);
            assert!((both.rdp(a) - sum).abs() <= 1e-12 * sum, "order {a}");
            assert!(alone.rdp(a) < gaussian(1.0, 1000).rdp(a), "order {a}");
        }
        for (z, q) in [(1.0, 0.0), (1.0, 1.5), (1.0, f64::NAN), (0.0, 0.1)] {
            let mut bad = RdpAccountant::new();
            bad.compose_sampled_gaussian(z, q, 1);
            assert_eq!(bad.spent(1e-5).epsilon, f64::INFINITY, "z={z}, q={q}");
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
