//! Goten's dynamic 8-bit quantisation (section 3.2 of its paper; SWALP-style block floating
//! point), per tensor and per call: `exp = floor(log2 max|x|)`, `q = clamp(floor(x 2^(6-exp) + u),
//! -128, 127)` with `u` uniform in `[0, 1)`, and a product of two quantised tensors scaled back by
//! `2^(exp_a - 6 + exp_b - 6)`.
//!
//! Stochastic rounding makes `q 2^(exp-6)` an unbiased estimate of `x`, except where the clamp
//! bites: only values within `2^(exp-6)` of the top of the range (`x 2^(6-exp)` in `(127, 128)`)
//! can round to 128, and are clamped to 127. The rounding noise comes from a stream of its own
//! (Goten's prototype derives it from the bits of the share mask).

use trustsplit_cryptgpu::prg::Prg;

/// Quantised values: integers in `[-128, 127]` as field words, and the tensor's exponent.
#[derive(Clone, Debug, PartialEq)]
pub struct Quantised {
    pub values: Vec<u64>,
    pub exp: i32,
}

/// The smallest and largest exponent kept (Goten clamps to an 8-bit exponent).
const EXP_RANGE: (i32, i32) = (-128, 127);

/// The factor that turns an exact product of quantised `a` and `b` back into real values.
pub fn product_scale(exp_a: i32, exp_b: i32) -> f64 {
    2f64.powi(exp_a - 6 + exp_b - 6)
}

/// Quantises `x` with rounding noise from `noise`. A NaN or infinite value is refused, naming
/// where it is (`what`).
pub fn quantise(x: &[f32], noise: &mut Prg, what: &str) -> Result<Quantised, String> {
    let mut max = 0f32;
    for (i, &v) in x.iter().enumerate() {
        if !v.is_finite() {
            return Err(format!("{what}: value {i} is {v}; nothing non-finite is quantised"));
        }
        max = max.max(v.abs());
    }
    if max == 0.0 {
        return Ok(Quantised { values: vec![0; x.len()], exp: 0 });
    }
    let exp = (max.log2().floor() as i32).clamp(EXP_RANGE.0, EXP_RANGE.1);
    // Exact in f32: x times a power of two is exact, |x 2^(6-exp)| < 128 needs 7 integer bits,
    // which leaves 17 bits of u's fraction: rounding probabilities to within 2^-17.
    let scale = 2f32.powi(6 - exp);
    // Two 24-bit uniforms per word of the stream.
    let words = crate::field::words(noise, x.len().div_ceil(2));
    let values = {
        use rayon::prelude::*;
        x.par_iter()
            .enumerate()
            .map(|(i, &v)| {
                let w = words[i / 2] >> (32 * (i % 2));
                let u = (w & 0xff_ffff) as f32 * (1.0 / (1u32 << 24) as f32);
                // In [-128, 127]: centred already.
                (v * scale + u).floor().clamp(-128.0, 127.0) as i64 as u64
            })
            .collect()
    };
    Ok(Quantised { values, exp })
}

/// The real values a quantised tensor stands for.
pub fn dequantise(q: &Quantised) -> Vec<f32> {
    let s = 2f64.powi(q.exp - 6);
    q.values.iter().map(|&w| (w as i64 as f64 * s) as f32).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn quantised_values_are_integers_within_the_range_and_close() {
        let mut noise = Prg::from_key([5; 32]);
        let x: Vec<f32> = (0..1000).map(|i| ((i * 37 % 101) as f32 - 50.0) * 0.013).collect();
        let q = quantise(&x, &mut noise, "x").unwrap();
        let max = x.iter().fold(0f32, |m, v| m.max(v.abs()));
        assert_eq!(q.exp, max.log2().floor() as i32);
        let step = 2f32.powi(q.exp - 6);
        for ((v, d), &w) in x.iter().zip(dequantise(&q)).zip(&q.values) {
            assert!((-128..=127).contains(&(w as i64)));
            assert!((v - d).abs() <= step * 1.0001, "{v} -> {d} (step {step})");
        }
        assert!(quantise(&[1.0, f32::NAN], &mut noise, "layers.2 input").unwrap_err().contains("value 1 is NaN"));
        assert_eq!(quantise(&[0.0; 4], &mut noise, "z").unwrap().values, vec![0; 4]);
    }

    #[test]
    fn stochastic_rounding_is_unbiased_within_its_statistical_bound() {
        // Values strictly inside the range: the mean of many quantisations of each is its value,
        // within 5 standard errors (the rounding error of one draw is at most one step).
        let mut noise = Prg::from_key([6; 32]);
        let x: Vec<f32> = vec![1.0, 0.3137, -0.77, 0.0051, -0.5, 0.999];
        let trials = 20_000;
        let mut sums = vec![0f64; x.len()];
        let mut exp = 0;
        for _ in 0..trials {
            let q = quantise(&x, &mut noise, "x").unwrap();
            exp = q.exp;
            sums.iter_mut().zip(&q.values).for_each(|(s, &w)| *s += w as i64 as f64);
        }
        let step = 2f64.powi(exp - 6);
        for (s, &v) in sums.iter().zip(&x) {
            let mean = s / trials as f64 * step;
            let bound = 5.0 * 0.5 * step / (trials as f64).sqrt();
            assert!((mean - v as f64).abs() < bound, "{v}: mean {mean}, bound {bound}");
        }
    }
}
