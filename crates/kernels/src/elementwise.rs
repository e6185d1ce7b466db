//! Elementwise arithmetic on slices (residual connections, gradient sums).

/// `acc += x`.
pub fn add_assign(acc: &mut [f32], x: &[f32]) {
    // The finiteness check rides along in the same pass at no measurable cost.
    add_assign_finite(acc, x);
}

crate::simd::multiversion! {
    /// [`add_assign`], and whether every value of `x` is finite: an untrusted operand (a device's
    /// result) checked in the pass that merges it rather than in a pass of its own.
    pub fn add_assign_finite(acc: &mut [f32], x: &[f32]) -> bool {
        assert_eq!(acc.len(), x.len(), "add_assign_finite: lengths differ");
        let mut non_finite = false;
        for (a, &b) in acc.iter_mut().zip(x) {
            *a += b;
            non_finite |= !b.is_finite();
        }
        !non_finite
    }
}

crate::simd::multiversion! {
    /// `acc += x`, then `+ bias[c]` on each plane of `acc` (laid out `N x C x per_channel`, with
    /// `C = bias.len()`): a merge and a bias in one pass, rounding as the two passes would.
    /// Returns whether every value of `x` is finite (as [`add_assign_finite`]).
    pub fn add_assign_with_bias_finite(acc: &mut [f32], x: &[f32], bias: &[f32], per_channel: usize) -> bool {
        assert_eq!(acc.len(), x.len(), "add_assign_with_bias_finite: lengths differ");
        assert!(per_channel > 0 && !bias.is_empty(), "add_assign_with_bias_finite: empty planes or bias");
        assert_eq!(acc.len() % (bias.len() * per_channel), 0, "add_assign_with_bias_finite: not N x C x per_channel");
        let mut non_finite = false;
        let planes = acc.chunks_exact_mut(per_channel).zip(x.chunks_exact(per_channel));
        for ((a_plane, x_plane), b) in planes.zip(bias.iter().cycle()) {
            for (a, &v) in a_plane.iter_mut().zip(x_plane) {
                *a = *a + v + *b;
                non_finite |= !v.is_finite();
            }
        }
        !non_finite
    }
}

crate::simd::multiversion! {
    /// Whether every value of `x` is finite (no NaN or infinity): one read-only pass, the flags
    /// OR-ed so that the loop vectorises instead of stopping at the first bad value.
    pub fn all_finite(x: &[f32]) -> bool {
        let mut non_finite = false;
        for &v in x {
            non_finite |= !v.is_finite();
        }
        !non_finite
    }
}

crate::simd::multiversion! {
    /// `out = a + b`.
    pub fn add(a: &[f32], b: &[f32], out: &mut [f32]) {
        assert!(a.len() == b.len() && b.len() == out.len(), "add: lengths differ");
        for ((o, &x), &y) in out.iter_mut().zip(a).zip(b) {
            *o = x + y;
        }
    }
}

/// Sum of `x`. Eight independent partial sums let the compiler vectorise the loop (one running
/// sum is bound by the latency of each addition) and keep the rounding error smaller.
pub fn sum(x: &[f32]) -> f32 {
    let mut lanes = [0.0f32; 8];
    let chunks = x.chunks_exact(8);
    let tail: f32 = chunks.remainder().iter().sum();
    for chunk in chunks {
        for (lane, &v) in lanes.iter_mut().zip(chunk) {
            *lane += v;
        }
    }
    lanes.iter().sum::<f32>() + tail
}

/// Partial sums of [`sum_f64_of`] and [`dot_f64_of`]: four AVX-512 registers (eight AVX2 ones), so
/// that four additions, each waiting on its register's last, are in flight at once.
pub const F64_LANES: usize = 32;

crate::simd::multiversion! {
    /// `sum f(x_i)` accumulated in f64 over [`F64_LANES`] independent partial sums, so the loop
    /// vectorises and keeps several additions in flight instead of waiting on each in turn
    /// (energies, norms); compiled for the CPU's widest vectors ([`crate::simd`]:
    /// same result on every path).
    #[inline]
    pub fn sum_f64_of(x: &[f32], f: impl Fn(f64) -> f64) -> f64 {
        let mut lanes = [0.0f64; F64_LANES];
        let chunks = x.chunks_exact(F64_LANES);
        let tail: f64 = chunks.remainder().iter().map(|&v| f(f64::from(v))).sum();
        for chunk in chunks {
            for (lane, &v) in lanes.iter_mut().zip(chunk) {
                *lane += f(f64::from(v));
            }
        }
        lanes.iter().sum::<f64>() + tail
    }
}

crate::simd::multiversion! {
    /// `sum f(a_i, b_i)` in f64, as [`sum_f64_of`] (`f = |x, y| x * y` is a dot product).
    #[inline]
    pub fn dot_f64_of(a: &[f32], b: &[f32], f: impl Fn(f64, f64) -> f64) -> f64 {
        debug_assert_eq!(a.len(), b.len());
        let mut lanes = [0.0f64; F64_LANES];
        let (ca, cb) = (a.chunks_exact(F64_LANES), b.chunks_exact(F64_LANES));
        let tail: f64 =
            ca.remainder().iter().zip(cb.remainder()).map(|(&x, &y)| f(f64::from(x), f64::from(y))).sum();
        for (xa, xb) in ca.zip(cb) {
            for ((lane, &x), &y) in lanes.iter_mut().zip(xa).zip(xb) {
                *lane += f(f64::from(x), f64::from(y));
            }
        }
        lanes.iter().sum::<f64>() + tail
    }
}

/// Per-channel sums of an `N x C x spatial` tensor (a convolution's bias gradient) into `out`
/// (`C` long, overwritten).
pub fn channel_sums(x: &[f32], channels: usize, spatial: usize, out: &mut [f32]) {
    assert_eq!(out.len(), channels, "channel_sums: output length");
    assert!(
        channels * spatial == 0 || x.len().is_multiple_of(channels * spatial),
        "channel_sums: length {} is not a whole number of {channels} x {spatial} samples",
        x.len()
    );
    out.fill(0.0);
    if channels == 0 || spatial == 0 {
        return;
    }
    for (i, plane) in x.chunks_exact(spatial).enumerate() {
        out[i % channels] += sum(plane);
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    #[test]
    fn sums_match_naive_f64_sums() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(4);
        for _ in 0..30 {
            let (n, c, p) = (rng.random_range(1..4), rng.random_range(1..6), rng.random_range(1..40));
            let x: Vec<f32> = (0..n * c * p).map(|_| rng.random_range(-2.0f32..2.0)).collect();
            let naive: f64 = x.iter().map(|&v| f64::from(v)).sum();
            assert!((f64::from(sum(&x)) - naive).abs() < 1e-4 * (1.0 + naive.abs()));
            let mut out = vec![f32::NAN; c];
            channel_sums(&x, c, p, &mut out);
            for (ch, &got) in out.iter().enumerate() {
                let want: f64 = (0..n).flat_map(|s| &x[(s * c + ch) * p..][..p]).map(|&v| f64::from(v)).sum();
                assert!((f64::from(got) - want).abs() < 1e-4 * (1.0 + want.abs()), "channel {ch}");
            }
        }
        assert_eq!(sum(&[]), 0.0);
    }

    #[test]
    fn merge_with_bias_is_the_two_passes_bit_for_bit() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(5);
        for _ in 0..30 {
            let (n, c, p) = (rng.random_range(1..4), rng.random_range(1..6), rng.random_range(1..70));
            let mut acc: Vec<f32> = (0..n * c * p).map(|_| rng.random_range(-2.0f32..2.0)).collect();
            let x: Vec<f32> = (0..n * c * p).map(|_| rng.random_range(-2.0f32..2.0)).collect();
            let bias: Vec<f32> = (0..c).map(|_| rng.random_range(-2.0f32..2.0)).collect();
            let mut want = acc.clone();
            for (i, w) in want.iter_mut().enumerate() {
                *w += x[i];
                *w += bias[(i / p) % c];
            }
            for level in [crate::simd::Level::Baseline, crate::simd::Level::Avx512] {
                let mut got = acc.clone();
                assert!(crate::simd::with_level_cap(level, || add_assign_with_bias_finite(&mut got, &x, &bias, p)));
                assert_eq!(got, want, "{n} x {c} x {p} at {level:?}");
            }
            acc.clear();
        }
    }

    #[test]
    fn all_finite_spots_one_bad_value_anywhere_on_every_path() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(14);
        for len in [1usize, 15, 16, 17, 100, 1000] {
            let x: Vec<f32> = (0..len).map(|_| rng.random_range(-1e30f32..1e30)).collect();
            for level in [crate::simd::Level::Baseline, crate::simd::Level::Avx2, crate::simd::Level::Avx512] {
                assert!(crate::simd::with_level_cap(level, || all_finite(&x)), "{len} at {level:?}");
                for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
                    for at in [0, len / 2, len - 1, rng.random_range(0..len)] {
                        let mut y = x.clone();
                        y[at] = bad;
                        assert!(!crate::simd::with_level_cap(level, || all_finite(&y)), "{bad} at {at} of {len}");
                    }
                }
            }
        }
        assert!(all_finite(&[]), "nothing to refuse in an empty slice");
        assert!(all_finite(&[f32::MAX, f32::MIN, f32::MIN_POSITIVE / 2.0]), "extremes and subnormals are finite");
    }

    #[test]
    fn checked_merges_add_as_the_plain_ones_and_spot_every_non_finite_value() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(13);
        let (c, p) = (3usize, 37usize);
        let len = 2 * c * p;
        let acc: Vec<f32> = (0..len).map(|_| rng.random_range(-3.0f32..3.0)).collect();
        let x: Vec<f32> = (0..len).map(|_| rng.random_range(-3.0f32..3.0)).collect();
        let bias: Vec<f32> = (0..c).map(|_| rng.random_range(-1.0f32..1.0)).collect();
        // The sums, one value at a time (the bias added after the merge, as the kernel rounds).
        let want: Vec<f32> = acc.iter().zip(&x).map(|(a, b)| a + b).collect();
        let want_bias: Vec<f32> = want.iter().enumerate().map(|(i, w)| w + bias[(i / p) % c]).collect();
        for level in [crate::simd::Level::Baseline, crate::simd::Level::Avx512] {
            let (mut got, mut got_bias) = (acc.clone(), acc.clone());
            assert!(crate::simd::with_level_cap(level, || add_assign_finite(&mut got, &x)));
            assert!(crate::simd::with_level_cap(level, || add_assign_with_bias_finite(&mut got_bias, &x, &bias, p)));
            assert_eq!((got, got_bias), (want.clone(), want_bias.clone()), "{level:?}");
            // One bad value anywhere, first, last or inside a vector, is reported.
            for (at, bad) in [(0, f32::NAN), (len - 1, f32::INFINITY), (41, f32::NEG_INFINITY), (17, f32::NAN)] {
                let mut x = x.clone();
                x[at] = bad;
                let (mut a, mut b) = (acc.clone(), acc.clone());
                assert!(!crate::simd::with_level_cap(level, || add_assign_finite(&mut a, &x)), "{at} {level:?}");
                let finite = crate::simd::with_level_cap(level, || add_assign_with_bias_finite(&mut b, &x, &bias, p));
                assert!(!finite, "{at} {level:?}");
            }
        }
    }

    #[test]
    fn f64_sums_and_dots_match_naive_sums() {
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(11);
        for len in [0usize, 1, 7, 8, 9, 100, 1027] {
            let a: Vec<f32> = (0..len).map(|_| rng.random_range(-3.0f32..3.0)).collect();
            let b: Vec<f32> = (0..len).map(|_| rng.random_range(-3.0f32..3.0)).collect();
            let naive: f64 = a.iter().zip(&b).map(|(&x, &y)| f64::from(x) * f64::from(y)).sum();
            assert!((dot_f64_of(&a, &b, |x, y| x * y) - naive).abs() <= 1e-12 * (1.0 + naive.abs()), "len {len}");
            let squares: f64 = a.iter().map(|&x| f64::from(x) * f64::from(x)).sum();
            assert!((sum_f64_of(&a, |x| x * x) - squares).abs() <= 1e-12 * (1.0 + squares), "len {len}");
            let plain: f64 = a.iter().map(|&x| f64::from(x)).sum();
            assert!((f64::from(sum(&a)) - plain).abs() <= 1e-5 * (1.0 + len as f64), "len {len}: f32 sum");
        }
    }

    #[test]
    fn f64_sums_and_dots_are_the_same_bits_at_every_vector_width() {
        use crate::simd::{level, with_level_cap, Level};
        eprintln!("this CPU: {:?}", level());
        let mut rng = rand_chacha::ChaCha8Rng::seed_from_u64(12);
        for len in [0usize, 1, 7, 8, 9, 31, 100, 1027, 4096] {
            let a: Vec<f32> = (0..len).map(|_| rng.random_range(-3.0f32..3.0)).collect();
            let b: Vec<f32> = (0..len).map(|_| rng.random_range(-3.0f32..3.0)).collect();
            let at = |cap| {
                with_level_cap(cap, || {
                    let dot = dot_f64_of(&a, &b, |x, y| x * (y - 0.25));
                    let sum = sum_f64_of(&a, |x| (x - 0.5) * (x - 0.5));
                    [dot.to_bits(), sum.to_bits()]
                })
            };
            let baseline = at(Level::Baseline);
            assert_eq!(at(Level::Avx2), baseline, "len {len}: AVX2");
            assert_eq!(at(Level::Avx512), baseline, "len {len}: AVX-512");
        }
    }
}
