//! Checks of what a device returns for a convolution, through secret random projections:
//! Freivalds' idea over the reals.
//!
//! The device's result `Y = conv(X, W)` is checked through a secret Gaussian vector `s` over its
//! output channels: `sum_o s_o Y[o]` must equal `conv(X, sum_o s_o W[o])`, a convolution with one
//! output channel, so the check costs the enclave about `1 / C_out` of the device's work. The
//! input gradient is checked the same way over the input channels, and the weight gradient
//! `corr(X, dY)` over the input channels too, through `sum_i t_i X[i]`, which the enclave computes
//! when it releases `X` (the device keeps `X` until the backward pass, and the host could swap it).
//! The enclave works from what it released and its own weights: it projects the weights and the
//! device's results in f64, runs its one-channel products in f32 (the gemm crate, the kernels'
//! few-input weight gradient) and sums their taps in f64.
//!
//! **Tolerance.** An honest device does not return the exact products: it rounds. Any device that
//! forms each result value as a sum of its `K` products in f32 arithmetic, in any order, with or
//! without fused multiply-adds, errs by at most `gamma_K * sum |products|`, with
//! `gamma_K = K u / (1 - K u)` and `u = 2^-24` (Higham, *Accuracy and Stability of Numerical
//! Algorithms*, 2nd ed., section 3.1), and Cauchy-Schwarz bounds that sum by the product of the
//! two factors' norms. The device does not know `s`, so the projection of its errors `e_o` is
//! Gaussian, `s^T e ~ N(0, sum_o e_o^2)`: the check allows [`SIGMAS`] standard deviations of the
//! worst case, plus the worst case of the enclave's own f32 products (a fixed bound, about an
//! eighth of the device's allowance, since it is not a projection of errors) and of its f64 sums
//! (about 10^-8 of the rest). An honest f32 device exceeds that with probability below 1.3e-15
//! per value checked.
//!
//! **What it catches.** A corruption `d` of one result value moves its check by `s_o d`, which is
//! caught unless `|s_o d|` stays within the tolerance: with probability about `0.8 T / |d|` for a
//! tolerance `T`. `T` is a worst case, so it is loose: tens to hundreds of times the rounding an
//! honest device actually shows ([`CheckTally::worst_ratio`] reports how close the run came), and
//! for wide layers about the size of a result value itself. A device that shifts many values at
//! once (a bias, a scaled or stale result, a different operand) is caught far more surely: every
//! checked value gives it another chance to be seen. Not covered: devices that compute in reduced
//! precision (TF32, f16) or with Winograd or FFT convolutions, whose honest rounding can exceed
//! the bound and would be reported as a fault.
//!
//! Tried and dropped:
//! - The forward check's weight projections after the low-rank products (which read the weight), to
//!   find it in cache: VGG16 inference enclave 32, 34, 32 against 34, 35, 31 ms alternated; with
//!   `cpu:1` the device's thread streams its own tensors through the shared cache (2026-12-03).
//! - The enclave's one-channel products with the 9 taps as rows: a third of the speed of positions
//!   as rows (2.61 against 1.0 ms) (2026-12-03).
//! - Prefetching 512 values ahead in the weight-sized sweeps: 0.69 against 0.52 ms at 1024 for a
//!   2.36 M-value weight's projection; 2048 and 4096 no better than 1024 (2026-12-03).
//!
//! Not yet tried:
//! - Fusing the weight projections into the optimizer's sweep (the next step's projections riding
//!   along) or into the forward weight transform: would save most of their 5.7% of VGG16's enclave
//!   samples.
//! - Checking a secret random subset of the samples or output channels per step: cuts the rest in
//!   proportion, catching a corruption of a few samples only with that probability per step.
//! - A tighter, measured tolerance (honest devices came within 2-3e-3 of the rigorous one): would
//!   catch smaller single-value changes, but is no longer a proof.

use rand::Rng;
use rand_distr::StandardNormal;
use serde::Serialize;
use std::ops::Range;
use trustsplit_kernels::conv::conv2d_backward_weight_few_inputs;
use trustsplit_kernels::elementwise::sum_f64_of;
use trustsplit_kernels::matmul::{matmul_strided, parallelism, threads, MatRef};
use trustsplit_kernels::ConvGeometry;

/// Standard deviations of the worst-case rounding a check allows: an honest f32 device passes
/// each value checked with probability above `1 - 1.3e-15` (`erfc(8 / sqrt(2))`).
pub const SIGMAS: f64 = 8.0;

/// f32's unit roundoff: an honest device's rounding per operation.
const F32_ROUNDOFF: f64 = 1.0 / (1u64 << 24) as f64;
/// f64's, for the enclave's side of each check.
const F64_ROUNDOFF: f64 = f64::EPSILON / 2.0;

/// `K u / (1 - K u)`: the relative error bound of a sum of `terms` products. Infinite where the
/// bound says nothing (`K u >= 1/2`, over 8 million products per value in f32).
fn gamma(terms: usize, roundoff: f64) -> f64 {
    let ku = terms as f64 * roundoff;
    if ku < 0.5 {
        ku / (1.0 - ku)
    } else {
        f64::INFINITY
    }
}

/// A check's tolerance: `per_norm` times the norm that bounds a checked value's operand (its
/// patch of the input, its window of the output gradient, its output channel's gradient), plus
/// `absolute`.
#[derive(Clone, Copy)]
struct Tolerance {
    per_norm: f64,
    absolute: f64,
}

impl Tolerance {
    /// Four parts:
    /// - the device's rounding: [`SIGMAS`] times the worst case of `device_terms` f32 products per
    ///   value, over a factor of norm `device_norm` (the weight's, or the released input's);
    /// - the enclave's own f32 product with the rounded projection (norm `enclave_norm`) over
    ///   `enclave_terms` channels, a fixed bound (it does not shrink like a projection of errors);
    /// - the enclave's f64 rounding of the projections and sums, about 10^-8 of the rest, bounded
    ///   generously; a factor covers the f64 rounding of the norms themselves;
    /// - underflow, absolute: a device that flushes subnormal results to zero (GPUs may) errs by
    ///   up to f32's smallest normal value per operation, whatever the operands' size; over the
    ///   `projected` channels' values (`SIGMAS` deviations again), and the enclave's own.
    fn new(
        (device_terms, device_norm): (usize, f64),
        (enclave_terms, enclave_norm): (usize, f64),
        (projected, secret_norm): (usize, f64),
    ) -> Tolerance {
        let device = SIGMAS * gamma(device_terms, F32_ROUNDOFF) * device_norm;
        let enclave = gamma(enclave_terms + 1, F32_ROUNDOFF) * (1.0 + F32_ROUNDOFF) * enclave_norm;
        let f64_sums =
            3.0 * gamma(device_terms + enclave_terms + 64, F64_ROUNDOFF) * (secret_norm * device_norm + enclave_norm);
        let operations = |terms: usize| 2.0 * terms as f64 * f64::from(f32::MIN_POSITIVE);
        let absolute =
            SIGMAS * operations(device_terms) * (projected as f64).sqrt() + 2.0 * operations(enclave_terms + 16);
        Tolerance { per_norm: (device + enclave + f64_sums) * (1.0 + 1e-6), absolute }
    }

    fn at(&self, norm: f64) -> f64 {
        self.per_norm * norm + self.absolute
    }
}

/// A secret Gaussian vector of `n` values, drawn from `rng` (the caller's CSPRNG).
pub fn secret(rng: &mut impl Rng, n: usize) -> Vec<f64> {
    (0..n).map(|_| rng.sample(StandardNormal)).collect()
}

/// The values checked and how close they came to their tolerance.
#[derive(Clone, Copy, Debug, Default, PartialEq, Serialize)]
pub struct CheckTally {
    /// Projected values compared.
    pub checks: u64,
    /// The largest `|difference| / tolerance` seen (a check fails above 1).
    pub worst_ratio: f64,
}

impl CheckTally {
    pub fn add(&mut self, other: CheckTally) {
        self.checks += other.checks;
        self.worst_ratio = self.worst_ratio.max(other.worst_ratio);
    }

    /// Compares one projected value: `Err` with the difference and tolerance where it fails
    /// (NaN fails).
    fn compare(&mut self, device_side: f64, enclave_side: f64, tolerance: f64) -> Result<(), (f64, f64)> {
        let difference = (device_side - enclave_side).abs();
        self.checks += 1;
        if difference.is_nan() || tolerance.is_nan() || difference > tolerance {
            return Err((difference, tolerance));
        }
        if difference > 0.0 {
            self.worst_ratio = self.worst_ratio.max(difference / tolerance);
        }
        Ok(())
    }
}

/// Why a check failed: where, by how much, and what an honest device stays within.
fn mismatch(what: &str, at: String, (difference, tolerance): (f64, f64)) -> String {
    format!(
        "the device's {what} failed verification at {at}: its secret projection differs from the enclave's by \
         {difference:.3e}, where an honest f32 device stays within {tolerance:.3e}; a faulty or malicious device \
         (or one computing in reduced precision), so the step is refused"
    )
}

/// The outputs `o` (of `out_len`) whose input `o * stride + tap - padding` lies in `0..in_len`.
fn valid_outputs(out_len: usize, in_len: usize, tap: usize, stride: usize, padding: usize) -> Range<usize> {
    let first = padding.saturating_sub(tap).div_ceil(stride);
    let end = if in_len + padding > tap { ((in_len + padding - tap - 1) / stride + 1).min(out_len) } else { 0 };
    first.min(end)..end
}

/// Calls `f(tap, output, input, len)` for every tap `(kh, kw)` (numbered `kh * kernel_w + kw`)
/// and output row: the run of `len` consecutive outputs from position `output` whose inputs
/// under that tap lie in the plane, the first at position `input`, the others `stride` apart
/// (positions numbered row by row in their planes).
#[inline(always)]
fn for_each_tap_run(g: &ConvGeometry, mut f: impl FnMut(usize, usize, usize, usize)) {
    let (s, pad, ow_len) = (g.stride, g.padding, g.out_w());
    for kh in 0..g.kernel_h {
        for oh in valid_outputs(g.out_h(), g.in_h, kh, s, pad) {
            let ih = oh * s + kh - pad;
            for kw in 0..g.kernel_w {
                let columns = valid_outputs(ow_len, g.in_w, kw, s, pad);
                if !columns.is_empty() {
                    let input = ih * g.in_w + columns.start * s + kw - pad;
                    f(kh * g.kernel_w + kw, oh * ow_len + columns.start, input, columns.len());
                }
            }
        }
    }
}

/// `out[k] += f64(from[k * stride])` and `sums[k] += squares[k * stride]` for `k < out.len()`:
/// a tap's run of outputs collecting its share and its inputs' squares.
#[inline(always)]
fn gather_run(out: &mut [f64], from: &[f32], sums: &mut [f64], squares: &[f64], stride: usize) {
    if stride == 1 {
        for (((o, &v), sum), &sq) in out.iter_mut().zip(from).zip(sums.iter_mut()).zip(squares) {
            *o += f64::from(v);
            *sum += sq;
        }
    } else {
        for (k, (o, sum)) in out.iter_mut().zip(sums.iter_mut()).enumerate() {
            *o += f64::from(from[k * stride]);
            *sum += squares[k * stride];
        }
    }
}

/// The transpose of [`gather_run`]: `out[k * stride] += f64(from[k])` and
/// `sums[k * stride] += squares[k]` for `k < from.len()`.
#[inline(always)]
fn scatter_run(from: &[f32], out: &mut [f64], squares: &[f64], sums: &mut [f64], stride: usize) {
    if stride == 1 {
        for (((o, &v), sum), &sq) in out.iter_mut().zip(from).zip(sums.iter_mut()).zip(squares) {
            *o += f64::from(v);
            *sum += sq;
        }
    } else {
        for (k, (&v, &sq)) in from.iter().zip(squares).enumerate() {
            out[k * stride] += f64::from(v);
            sums[k * stride] += sq;
        }
    }
}

trustsplit_kernels::multiversion! {
    /// `out += sum_r secret[r] * rows[r]` in f64, each row `out.len()` long.
    fn add_projected_rows(rows: &[f32], secret: &[f64], out: &mut [f64]) {
        for (row, &s) in rows.chunks_exact(out.len()).zip(secret) {
            for (o, &v) in out.iter_mut().zip(row) {
                *o += s * f64::from(v);
            }
        }
    }
}

/// `sum_r secret[r] * rows[r]` in f64, each row `len` long.
fn project_rows(rows: &[f32], len: usize, secret: &[f64]) -> Vec<f64> {
    let mut out = vec![0.0f64; len];
    add_projected_rows(rows, secret, &mut out);
    out
}

trustsplit_kernels::multiversion! {
    /// `sum_r rows[r]^2` in f64, each row `len` long.
    fn squares_of_rows(rows: &[f32], len: usize) -> Vec<f64> {
        let mut out = vec![0.0f64; len];
        for row in rows.chunks_exact(len) {
            for (o, &v) in out.iter_mut().zip(row) {
                *o += f64::from(v) * f64::from(v);
            }
        }
        out
    }
}

fn norm(values: &[f32]) -> f64 {
    sum_f64_of(values, |v| v * v).sqrt()
}

fn norm64(values: &[f64]) -> f64 {
    values.iter().map(|v| v * v).sum::<f64>().sqrt()
}

fn to_f32(values: &[f64]) -> Vec<f32> {
    values.iter().map(|&v| v as f32).collect()
}

/// Calls `visit(n, z_n)` for each sample `n` of `v` (`N x C x P`), with `z_n[tap, p] =
/// sum_c coef[c, tap] * v[n, c, p]` (f32, `taps x P`), stopping at its first error. One product
/// per sample into a buffer that stays in cache, or, where the planes hold fewer positions than
/// the batch has samples (the deep layers' 4 and 2), one per position for the whole batch, so
/// that the long side of each product is its rows (the gemm crate's kernels want many rows: with
/// the 9 taps as rows it ran at a third of the speed); the result is written transposed, so that
/// each tap's plane is contiguous for the sums over taps that follow.
fn for_each_sample_taps(
    (coef, taps): (&[f32], usize),
    v: &[f32],
    (n, c, p): (usize, usize, usize),
    mut visit: impl FnMut(usize, &[f32]) -> Result<(), String>,
) -> Result<(), String> {
    let b = MatRef::row_major(coef, c, taps);
    let par = parallelism(threads());
    if p >= n {
        let mut z_n = vec![0.0f32; taps * p];
        for (sample, v_n) in v.chunks_exact(c * p).enumerate() {
            matmul_strided(MatRef::row_major(v_n, c, p).t(), b, &mut z_n, 1, p, false, par);
            visit(sample, &z_n)?;
        }
    } else {
        let mut z = vec![0.0f32; n * taps * p];
        for q in 0..p {
            let a = MatRef { data: &v[q..], rows: n, cols: c, row_stride: c * p, col_stride: p };
            matmul_strided(a, b, &mut z[q..], taps * p, p, false, par);
        }
        for (sample, z_n) in z.chunks_exact(taps * p).enumerate() {
            visit(sample, z_n)?;
        }
    }
    Ok(())
}

/// A layer's weight as the checks see it, projected in one pass over it when the device is
/// sent the weight: `sum_o s_o W[o]` for the output, `sum_i t_i W[:, i]` for the input gradient
/// (training only), with secrets `s` and `t` the device never sees.
pub struct WeightCheck {
    s: Vec<f64>,
    t: Option<Vec<f64>>,
    /// `sum_o s_o W[o]`, `C_in x taps`, rounded to f32 for the enclave's product.
    by_outputs: Vec<f32>,
    /// `sum_i t_i W[o, i]`, `C_out x taps`, rounded to f32.
    by_inputs: Vec<f32>,
    norm: f64,
}

/// Hints the CPU to fetch the cache line `ahead` values past `values`' start: the weight-sized
/// sweeps here reach a third of the memory bandwidth a plain sum does without it (the hardware
/// prefetcher falls behind their f64 arithmetic), about two thirds with it.
#[inline(always)]
fn prefetch_ahead(values: &[f32], ahead: usize) {
    #[cfg(target_arch = "x86_64")]
    // SAFETY: a prefetch only hints; it reads nothing, even past the slice's end.
    unsafe {
        use std::arch::x86_64::{_mm_prefetch, _MM_HINT_T0};
        _mm_prefetch::<_MM_HINT_T0>(values.as_ptr().wrapping_add(ahead).cast());
    }
}

/// How far ahead (in values: 4 KB) the weight-sized sweeps prefetch.
const PREFETCH_AHEAD: usize = 1024;

/// `out[k] = sum_i t_i rows[i][k]` for rows of `T` values (`T` fixed, so that the sums stay in
/// registers: two sets, for even and odd rows, so that each addition waits on the one before
/// last), prefetching ahead where `STREAMING` (the rows come from memory, not the cache).
#[inline(always)]
fn project_taps_fixed<const T: usize, const STREAMING: bool>(rows: &[f32], t: &[f64], out: &mut [f64]) {
    let (mut even, mut odd) = ([0.0f64; T], [0.0f64; T]);
    let pairs = rows.chunks_exact(2 * T).zip(t.chunks_exact(2));
    for (i, (pair, t_pair)) in pairs.enumerate() {
        if STREAMING && (i * 2 * T) % 16 < 2 * T {
            prefetch_ahead(pair, PREFETCH_AHEAD);
        }
        let (first, second) = pair.split_at(T);
        for k in 0..T {
            even[k] += t_pair[0] * f64::from(first[k]);
            odd[k] += t_pair[1] * f64::from(second[k]);
        }
    }
    if t.len() % 2 == 1 {
        let (last, t_last) = (&rows[(t.len() - 1) * T..], t[t.len() - 1]);
        for k in 0..T {
            even[k] += t_last * f64::from(last[k]);
        }
    }
    for k in 0..T {
        out[k] = even[k] + odd[k];
    }
}

/// `out[k] = sum_i t_i rows[i][k]` for rows of `taps` values: a weight's (or its gradient's)
/// output channel projected over its input channels.
#[inline(always)]
fn project_taps<const STREAMING: bool>(rows: &[f32], taps: usize, t: &[f64], out: &mut [f64]) {
    match taps {
        9 => project_taps_fixed::<9, STREAMING>(rows, t, out),
        1 => project_taps_fixed::<1, STREAMING>(rows, t, out),
        _ => {
            out[..taps].fill(0.0);
            for (row, &t_i) in rows.chunks_exact(taps).zip(t) {
                for (sum, &v) in out.iter_mut().zip(row) {
                    *sum += t_i * f64::from(v);
                }
            }
        }
    }
}

trustsplit_kernels::multiversion! {
    /// One pass over the weight (`C_out x C_in x taps`): `by_outputs += s_o W[o]` for every `o`,
    /// `by_inputs[o] = sum_i t_i W[o, i]` where `t` is not empty, and the sum of the squares.
    fn project_weight(w: &[f32], taps: usize, s: &[f64], t: &[f64], by_outputs: &mut [f64], by_inputs: &mut [f64]) -> f64 {
        // 16 values per pass (one cache line), their squares in two sets of 8 so that each
        // addition waits on the one before last.
        const LANES: usize = 16;
        let mut squares = [0.0f64; LANES];
        for (o, w_o) in w.chunks_exact(by_outputs.len()).enumerate() {
            let s_o = s[o];
            let (w_chunks, acc_chunks) = (w_o.chunks_exact(LANES), by_outputs.chunks_exact_mut(LANES));
            for (&v, acc) in w_chunks.remainder().iter().zip(acc_chunks.into_remainder()) {
                *acc += s_o * f64::from(v);
                squares[0] += f64::from(v) * f64::from(v);
            }
            for (chunk, acc) in w_o.chunks_exact(LANES).zip(by_outputs.chunks_exact_mut(LANES)) {
                prefetch_ahead(chunk, PREFETCH_AHEAD);
                let chunk: &[f32; LANES] = chunk.try_into().expect("chunks of LANES");
                let acc: &mut [f64; LANES] = acc.try_into().expect("chunks of LANES");
                for l in 0..LANES {
                    let v = f64::from(chunk[l]);
                    acc[l] += s_o * v;
                    squares[l] += v * v;
                }
            }
            if !t.is_empty() {
                project_taps::<false>(w_o, taps, t, &mut by_inputs[o * taps..]); // w_o is in cache now
            }
        }
        squares.iter().sum()
    }
}

impl WeightCheck {
    /// Bytes it holds (kept in the enclave until the backward pass).
    pub fn bytes(&self) -> usize {
        8 * (self.s.len() + self.t.as_ref().map_or(0, Vec::len)) + 4 * (self.by_outputs.len() + self.by_inputs.len())
    }
}

impl WeightCheck {
    /// Projects `w` (`C_out x C_in x KH x KW` as `g` says) through `s` (`C_out` values) and, for
    /// a training pass, `t` (`C_in` values).
    pub fn new(g: &ConvGeometry, w: &[f32], s: Vec<f64>, t: Option<Vec<f64>>) -> WeightCheck {
        let taps = g.kernel_h * g.kernel_w;
        let mut by_outputs = vec![0.0f64; g.in_channels * taps];
        let mut by_inputs = vec![0.0f64; if t.is_some() { g.out_channels * taps } else { 0 }];
        let squares = project_weight(w, taps, &s, t.as_deref().unwrap_or(&[]), &mut by_outputs, &mut by_inputs);
        WeightCheck { s, t, by_outputs: to_f32(&by_outputs), by_inputs: to_f32(&by_inputs), norm: squares.sqrt() }
    }
}

/// Both sides of a check, value by value, and what separates them at most for an honest device.
struct Sides {
    device: Vec<f64>,
    enclave: Vec<f64>,
    tolerance: Vec<f64>,
}

impl Sides {
    fn with_capacity(n: usize) -> Sides {
        Sides { device: Vec::with_capacity(n), enclave: Vec::with_capacity(n), tolerance: Vec::with_capacity(n) }
    }

    fn clear(&mut self) {
        self.device.clear();
        self.enclave.clear();
        self.tolerance.clear();
    }

    #[cfg(test)]
    fn append(&mut self, other: &Sides) {
        self.device.extend(&other.device);
        self.enclave.extend(&other.enclave);
        self.tolerance.extend(&other.tolerance);
    }

    /// Compares every value; the first that fails is named by `locate(index)`.
    fn compare(&self, what: &str, locate: impl Fn(usize) -> String) -> Result<CheckTally, String> {
        let mut tally = CheckTally::default();
        for (i, ((&d, &e), &t)) in self.device.iter().zip(&self.enclave).zip(&self.tolerance).enumerate() {
            tally.compare(d, e, t).map_err(|found| mismatch(what, locate(i), found))?;
        }
        Ok(tally)
    }
}

/// Checks `y = conv(x, w)` (no bias, `N x C_out x OH x OW`), `w` as projected in `weight`.
/// Returns the values checked (one per sample and output position).
pub fn check_forward(g: &ConvGeometry, weight: &WeightCheck, x: &[f32], y: &[f32]) -> Result<CheckTally, String> {
    let (out_plane, mut tally) = (g.out_h() * g.out_w(), CheckTally::default());
    forward_samples(g, weight, (x, y), |n, sides| {
        let locate = |p: usize| format!("sample {n}, output position ({}, {})", p / g.out_w(), p % g.out_w());
        tally.add(sides.compare("output", locate)?);
        Ok(())
    })?;
    debug_assert_eq!(tally.checks as usize, g.batch * out_plane);
    Ok(tally)
}

/// Calls `visit(n, sides)` with the forward check's values for each sample `n`.
fn forward_samples(
    g: &ConvGeometry,
    weight: &WeightCheck,
    (x, y): (&[f32], &[f32]),
    mut visit: impl FnMut(usize, &Sides) -> Result<(), String>,
) -> Result<(), String> {
    let (taps, in_plane, out_plane) = (g.kernel_h * g.kernel_w, g.in_h * g.in_w, g.out_h() * g.out_w());
    let tolerance = Tolerance::new(
        (g.patch_len(), weight.norm),
        (g.in_channels, norm(&weight.by_outputs)),
        (g.out_channels, norm64(&weight.s)),
    );
    let mut sides = Sides::with_capacity(out_plane);
    let sizes = (g.batch, g.in_channels, in_plane);
    for_each_sample_taps((&weight.by_outputs, taps), x, sizes, |n, z_n| {
        let x_n = &x[n * g.in_channels * in_plane..][..g.in_channels * in_plane];
        let y_n = &y[n * g.out_channels * out_plane..][..g.out_channels * out_plane];
        sides.clear();
        forward_sample(g, (x_n, z_n, y_n), &weight.s, tolerance, &mut sides);
        visit(n, &sides)
    })
}

#[cfg(test)]
fn forward_sides(g: &ConvGeometry, weight: &WeightCheck, x: &[f32], y: &[f32]) -> Sides {
    let mut all = Sides::with_capacity(0);
    forward_samples(g, weight, (x, y), |_, sides| {
        all.append(sides);
        Ok(())
    })
    .expect("collecting fails nothing");
    all
}

trustsplit_kernels::multiversion! {
    /// One sample's values of the forward check, appended to `sides`: `z_n` its projected
    /// weight's taps applied to its input `x_n`, `y_n` the device's output.
    fn forward_sample(g: &ConvGeometry, planes: (&[f32], &[f32], &[f32]), s: &[f64], tolerance: Tolerance, sides: &mut Sides) {
        let (x_n, z_n, y_n) = planes;
        let (in_plane, out_plane) = (g.in_h * g.in_w, g.out_h() * g.out_w());
        let squares = squares_of_rows(x_n, in_plane);
        // Each output: its taps' shares, and its patch's norm squared.
        let start = sides.enclave.len();
        sides.enclave.resize(start + out_plane, 0.0);
        sides.tolerance.resize(start + out_plane, 0.0);
        let (enclave_side, patch) = (&mut sides.enclave[start..], &mut sides.tolerance[start..]);
        for_each_tap_run(g, |tap, out, input, len| {
            let (from, sq) = (&z_n[tap * in_plane + input..], &squares[input..]);
            gather_run(&mut enclave_side[out..out + len], from, &mut patch[out..out + len], sq, g.stride);
        });
        patch.iter_mut().for_each(|p| *p = tolerance.at(p.sqrt()));
        sides.device.resize(start + out_plane, 0.0);
        add_projected_rows(y_n, s, &mut sides.device[start..]);
    }
}

/// Checks the input gradient `dx` (`N x C_in x H x W`) of `y = conv(x, w)` from `dy`, `w` as
/// projected in `weight` (made for a training pass). Returns the values checked (one per sample
/// and input position).
pub fn check_backward_data(
    g: &ConvGeometry,
    weight: &WeightCheck,
    dy: &[f32],
    dx: &[f32],
) -> Result<CheckTally, String> {
    let mut tally = CheckTally::default();
    backward_data_samples(g, weight, (dy, dx), |n, sides| {
        let locate = |q: usize| format!("sample {n}, input position ({}, {})", q / g.in_w, q % g.in_w);
        tally.add(sides.compare("input gradient", locate)?);
        Ok(())
    })?;
    Ok(tally)
}

/// Calls `visit(n, sides)` with the input-gradient check's values for each sample `n`.
fn backward_data_samples(
    g: &ConvGeometry,
    weight: &WeightCheck,
    (dy, dx): (&[f32], &[f32]),
    mut visit: impl FnMut(usize, &Sides) -> Result<(), String>,
) -> Result<(), String> {
    let t = weight.t.as_deref().ok_or("no secret over the input channels: the weight was projected for inference")?;
    let (taps, in_plane, out_plane) = (g.kernel_h * g.kernel_w, g.in_h * g.in_w, g.out_h() * g.out_w());
    let tolerance = Tolerance::new(
        (g.out_channels * taps, weight.norm),
        (g.out_channels, norm(&weight.by_inputs)),
        (g.in_channels, norm64(t)),
    );
    let mut sides = Sides::with_capacity(in_plane);
    let sizes = (g.batch, g.out_channels, out_plane);
    for_each_sample_taps((&weight.by_inputs, taps), dy, sizes, |n, z_n| {
        let dy_n = &dy[n * g.out_channels * out_plane..][..g.out_channels * out_plane];
        let dx_n = &dx[n * g.in_channels * in_plane..][..g.in_channels * in_plane];
        sides.clear();
        backward_data_sample(g, (dy_n, z_n, dx_n), t, tolerance, &mut sides);
        visit(n, &sides)
    })
}

#[cfg(test)]
fn backward_data_sides(g: &ConvGeometry, weight: &WeightCheck, dy: &[f32], dx: &[f32]) -> Result<Sides, String> {
    let mut all = Sides::with_capacity(0);
    backward_data_samples(g, weight, (dy, dx), |_, sides| {
        all.append(sides);
        Ok(())
    })?;
    Ok(all)
}

trustsplit_kernels::multiversion! {
    /// One sample's values of the input-gradient check, appended to `sides`: `z_n` its projected
    /// weight's taps applied to its output gradient `dy_n`, `dx_n` the device's input gradient.
    fn backward_data_sample(g: &ConvGeometry, planes: (&[f32], &[f32], &[f32]), t: &[f64], tolerance: Tolerance, sides: &mut Sides) {
        let (dy_n, z_n, dx_n) = planes;
        let (in_plane, out_plane) = (g.in_h * g.in_w, g.out_h() * g.out_w());
        let squares = squares_of_rows(dy_n, out_plane);
        // Each input: what its taps collect, and the norm squared of the gradients they collect.
        let start = sides.enclave.len();
        sides.enclave.resize(start + in_plane, 0.0);
        sides.tolerance.resize(start + in_plane, 0.0);
        let (enclave_side, window) = (&mut sides.enclave[start..], &mut sides.tolerance[start..]);
        for_each_tap_run(g, |tap, out, input, len| {
            let (from, sq) = (&z_n[tap * out_plane + out..][..len], &squares[out..out + len]);
            scatter_run(from, &mut enclave_side[input..], sq, &mut window[input..], g.stride);
        });
        window.iter_mut().for_each(|v| *v = tolerance.at(v.sqrt()));
        sides.device.resize(start + in_plane, 0.0);
        add_projected_rows(dx_n, t, &mut sides.device[start..]);
    }
}

/// What the enclave keeps of a released input `x` to check the weight gradient the device later
/// computes from it: `sum_i t_i x[n, i]` for a secret `t`, and `x`'s norm. `1 / C_in` of `x`.
pub struct InputProjection {
    t: Vec<f64>,
    /// `N x H x W`, rounded to f32 for the enclave's product.
    projected: Vec<f32>,
    norm: f64,
}

impl InputProjection {
    /// Bytes it holds (kept in the enclave until the backward pass).
    pub fn bytes(&self) -> usize {
        8 * self.t.len() + 4 * self.projected.len()
    }

    /// Projects `x` (`N x C_in x H x W` as `g` says) through the secret `t` (`C_in` values).
    pub fn new(g: &ConvGeometry, x: &[f32], t: Vec<f64>) -> InputProjection {
        let per = g.in_channels * g.in_h * g.in_w;
        let projected = x.chunks_exact(per).flat_map(|x_n| to_f32(&project_rows(x_n, g.in_h * g.in_w, &t))).collect();
        InputProjection { t, projected, norm: norm(x) }
    }
}

trustsplit_kernels::multiversion! {
    /// `out[o, tap] = sum_i t_i dw[o, i, tap]` in f64: the device's weight gradient projected.
    fn project_weight_gradient(dw: &[f32], taps: usize, t: &[f64], out: &mut [f64]) {
        for (o, dw_o) in dw.chunks_exact(t.len() * taps).enumerate() {
            project_taps::<true>(dw_o, taps, t, &mut out[o * taps..]);
        }
    }
}

/// Checks the weight gradient `dw = corr(x, dy)` (`C_out x C_in x KH x KW`) against the
/// projection of the `x` the enclave released. Returns the values checked (one per output
/// channel and tap).
pub fn check_backward_weight(
    g: &ConvGeometry,
    x: &InputProjection,
    dy: &[f32],
    dw: &[f32],
) -> Result<CheckTally, String> {
    let taps = g.kernel_h * g.kernel_w;
    backward_weight_sides(g, x, dy, dw).compare("weight gradient", |i| {
        let tap = i % taps;
        format!("output channel {}, tap ({}, {})", i / taps, tap / g.kernel_w, tap % g.kernel_w)
    })
}

fn backward_weight_sides(g: &ConvGeometry, x: &InputProjection, dy: &[f32], dw: &[f32]) -> Sides {
    let (taps, out_plane) = (g.kernel_h * g.kernel_w, g.out_h() * g.out_w());
    let (n, c) = (g.batch, g.out_channels);
    let terms = n * out_plane;
    let tolerance = Tolerance::new((terms, x.norm), (terms, norm(&x.projected)), (g.in_channels, norm64(&x.t)));
    // enclave[o, tap] = sum over samples and outputs of dy times the projected input at the
    // tap: the weight gradient of a convolution with the projection as its one input channel.
    let one_input = ConvGeometry { in_channels: 1, ..*g };
    let mut enclave = vec![0.0f32; c * taps];
    conv2d_backward_weight_few_inputs(&one_input, &x.projected, dy, &mut enclave);
    let mut dy_squares = vec![0.0f64; c];
    for (o, plane) in dy.chunks_exact(out_plane).enumerate() {
        dy_squares[o % c] += sum_f64_of(plane, |v| v * v);
    }
    let mut device = vec![0.0f64; c * taps];
    project_weight_gradient(dw, taps, &x.t, &mut device);
    let tolerance = dy_squares.iter().flat_map(|sq| std::iter::repeat_n(tolerance.at(sq.sqrt()), taps)).collect();
    Sides { device, enclave: enclave.iter().map(|&v| f64::from(v)).collect(), tolerance }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;
    use trustsplit_kernels::conv::{conv2d_backward_data, conv2d_backward_weight, conv2d_forward};

    fn random_geometry(rng: &mut ChaCha8Rng) -> ConvGeometry {
        loop {
            let g = ConvGeometry {
                batch: rng.random_range(1..4),
                in_channels: rng.random_range(1..7),
                out_channels: rng.random_range(1..8),
                in_h: rng.random_range(1..10),
                in_w: rng.random_range(1..10),
                kernel_h: rng.random_range(1..6),
                kernel_w: rng.random_range(1..6),
                stride: rng.random_range(1..4),
                padding: rng.random_range(0..3),
            };
            if g.validate().is_ok() {
                return g;
            }
        }
    }

    fn random_values(rng: &mut ChaCha8Rng, n: usize) -> Vec<f32> {
        (0..n).map(|_| rng.random_range(-2.0f32..2.0)).collect()
    }

    /// `x[n, i, ih, iw]` with zeros outside the plane.
    fn at(g: &ConvGeometry, x: &[f32], n: usize, i: usize, ih: isize, iw: isize) -> f64 {
        if ih < 0 || iw < 0 || ih >= g.in_h as isize || iw >= g.in_w as isize {
            return 0.0;
        }
        f64::from(x[((n * g.in_channels + i) * g.in_h + ih as usize) * g.in_w + iw as usize])
    }

    /// Calls `f(n, o, i, kh, kw, oh, ow, ih, iw)` for every product of the convolution's
    /// definition, inputs outside the plane included.
    fn every_product(g: &ConvGeometry, mut f: impl FnMut([usize; 7], isize, isize)) {
        for n in 0..g.batch {
            for o in 0..g.out_channels {
                for i in 0..g.in_channels {
                    for kh in 0..g.kernel_h {
                        for kw in 0..g.kernel_w {
                            for oh in 0..g.out_h() {
                                for ow in 0..g.out_w() {
                                    let ih = (oh * g.stride + kh) as isize - g.padding as isize;
                                    let iw = (ow * g.stride + kw) as isize - g.padding as isize;
                                    f([n, o, i, kh, kw, oh, ow], ih, iw);
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    fn w_at(g: &ConvGeometry, w: &[f32], o: usize, i: usize, kh: usize, kw: usize) -> f64 {
        f64::from(w[((o * g.in_channels + i) * g.kernel_h + kh) * g.kernel_w + kw])
    }

    /// The three products in f64, straight from the definition.
    fn exact(g: &ConvGeometry, x: &[f32], w: &[f32], dy: &[f32]) -> [Vec<f64>; 3] {
        let (mut y, mut dx, mut dw) = (vec![0.0; g.output_len()], vec![0.0; g.input_len()], vec![0.0; g.weight_len()]);
        let inside = |ih: isize, iw: isize| ih >= 0 && iw >= 0 && ih < g.in_h as isize && iw < g.in_w as isize;
        every_product(g, |[n, o, i, kh, kw, oh, ow], ih, iw| {
            let out = ((n * g.out_channels + o) * g.out_h() + oh) * g.out_w() + ow;
            y[out] += w_at(g, w, o, i, kh, kw) * at(g, x, n, i, ih, iw);
            if inside(ih, iw) {
                let input = ((n * g.in_channels + i) * g.in_h + ih as usize) * g.in_w + iw as usize;
                dx[input] += w_at(g, w, o, i, kh, kw) * f64::from(dy[out]);
            }
            dw[((o * g.in_channels + i) * g.kernel_h + kh) * g.kernel_w + kw] +=
                at(g, x, n, i, ih, iw) * f64::from(dy[out]);
        });
        [y, dx, dw]
    }

    /// The device's three results from our kernels, in f32.
    fn from_kernels(g: &ConvGeometry, x: &[f32], w: &[f32], dy: &[f32]) -> [Vec<f32>; 3] {
        let (mut y, mut dx, mut dw) = (vec![0.0; g.output_len()], vec![0.0; g.input_len()], vec![0.0; g.weight_len()]);
        conv2d_forward(g, x, w, None, &mut y);
        conv2d_backward_data(g, dy, w, &mut dx);
        conv2d_backward_weight(g, x, dy, &mut dw, None);
        [y, dx, dw]
    }

    /// The three results as a naive f32 device computes them: each value one running f32 sum,
    /// in the definition's order.
    fn naive_f32(g: &ConvGeometry, x: &[f32], w: &[f32], dy: &[f32]) -> [Vec<f32>; 3] {
        let (mut y, mut dx, mut dw) =
            (vec![0.0f32; g.output_len()], vec![0.0f32; g.input_len()], vec![0.0f32; g.weight_len()]);
        let inside = |ih: isize, iw: isize| ih >= 0 && iw >= 0 && ih < g.in_h as isize && iw < g.in_w as isize;
        every_product(g, |[n, o, i, kh, kw, oh, ow], ih, iw| {
            let out = ((n * g.out_channels + o) * g.out_h() + oh) * g.out_w() + ow;
            let wv = w_at(g, w, o, i, kh, kw) as f32;
            if inside(ih, iw) {
                let input = ((n * g.in_channels + i) * g.in_h + ih as usize) * g.in_w + iw as usize;
                y[out] += wv * x[input];
                dx[input] += wv * dy[out];
                dw[((o * g.in_channels + i) * g.kernel_h + kh) * g.kernel_w + kw] += x[input] * dy[out];
            }
        });
        [y, dx, dw]
    }

    fn projection(values: &[f64], rows: usize, len: usize, secret: &[f64]) -> Vec<f64> {
        (0..rows * len)
            .map(|j| (0..secret.len()).map(|r| secret[r] * values[(j / len * secret.len() + r) * len + j % len]).sum())
            .collect()
    }

    #[test]
    fn valid_outputs_are_those_whose_input_lies_in_the_plane() {
        for out_len in 0..6 {
            for in_len in 1..7 {
                for tap in 0..5 {
                    for stride in 1..4 {
                        for padding in 0..4 {
                            let expected: Vec<usize> = (0..out_len)
                                .filter(|o| (o * stride + tap) >= padding && o * stride + tap - padding < in_len)
                                .collect();
                            let found: Vec<usize> = valid_outputs(out_len, in_len, tap, stride, padding).collect();
                            assert_eq!(found, expected, "{out_len} {in_len} {tap} {stride} {padding}");
                        }
                    }
                }
            }
        }
    }

    /// `|v|` for every value: the exact products of these bound each value's rounding.
    fn abs(v: &[f32]) -> Vec<f32> {
        v.iter().map(|v| v.abs()).collect()
    }

    #[test]
    fn both_sides_equal_the_projections_of_the_exact_products() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        for _ in 0..60 {
            let g = random_geometry(&mut rng);
            let (x, w) = (random_values(&mut rng, g.input_len()), random_values(&mut rng, g.weight_len()));
            let dy = random_values(&mut rng, g.output_len());
            let [y, dx, dw] = exact(&g, &x, &w, &dy);
            // The same products of absolute values, projected with absolute secrets: what the
            // enclave's f32 products may err by, relative to.
            let [y_abs, dx_abs, dw_abs] = exact(&g, &abs(&x), &abs(&w), &abs(&dy));
            let (s, t) = (secret(&mut rng, g.out_channels), secret(&mut rng, g.in_channels));
            let (s_abs, t_abs): (Vec<f64>, Vec<f64>) =
                (s.iter().map(|v| v.abs()).collect(), t.iter().map(|v| v.abs()).collect());
            let weight = WeightCheck::new(&g, &w, s.clone(), Some(t.clone()));
            let (out_plane, in_plane, taps) = (g.out_h() * g.out_w(), g.in_h * g.in_w, g.kernel_h * g.kernel_w);
            let as_f32 = |v: &[f64]| -> Vec<f32> { v.iter().map(|&v| v as f32).collect() };
            // Each side against its definition: the device side projects what it was given (here
            // the exact result rounded to f32) in f64; the enclave side gives the exact
            // projection up to f32 rounding of a sum of absolute values.
            let input = InputProjection::new(&g, &x, t.clone());
            let cases = [
                (forward_sides(&g, &weight, &x, &as_f32(&y)), [&y, &y_abs], g.batch, out_plane, [&s, &s_abs]),
                (
                    backward_data_sides(&g, &weight, &dy, &as_f32(&dx)).unwrap(),
                    [&dx, &dx_abs],
                    g.batch,
                    in_plane,
                    [&t, &t_abs],
                ),
                (
                    backward_weight_sides(&g, &input, &dy, &as_f32(&dw)),
                    [&dw, &dw_abs],
                    g.out_channels,
                    taps,
                    [&t, &t_abs],
                ),
            ];
            for (k, (sides, [exact, exact_abs], rows, len, [secret, secret_abs])) in cases.into_iter().enumerate() {
                let expected = projection(exact, rows, len, secret);
                let bound = projection(exact_abs, rows, len, secret_abs);
                let given: Vec<f64> = as_f32(exact).iter().map(|&v| f64::from(v)).collect();
                let device = projection(&given, rows, len, secret);
                for (j, ((&e, &b), &d)) in expected.iter().zip(&bound).zip(&device).enumerate() {
                    assert!(
                        (sides.enclave[j] - e).abs() <= 1e-5 * b + 1e-30,
                        "{k} {g:?} {j}: {} {e} {b}",
                        sides.enclave[j]
                    );
                    assert!((sides.device[j] - d).abs() <= 1e-12 * (1.0 + d.abs()), "{k} {g:?} {j}");
                }
            }
        }
    }

    fn check_all(
        g: &ConvGeometry,
        (x, w, dy): (&[f32], &[f32], &[f32]),
        results: &[Vec<f32>; 3],
        (s, t): (&[f64], &[f64]),
    ) -> Result<CheckTally, String> {
        let weight = WeightCheck::new(g, w, s.to_vec(), Some(t.to_vec()));
        let mut tally = check_forward(g, &weight, x, &results[0])?;
        tally.add(check_backward_data(g, &weight, dy, &results[1])?);
        tally.add(check_backward_weight(g, &InputProjection::new(g, x, t.to_vec()), dy, &results[2])?);
        Ok(tally)
    }

    #[test]
    fn honest_f32_devices_pass_with_room_to_spare() {
        let mut rng = ChaCha8Rng::seed_from_u64(4);
        let mut worst = 0.0f64;
        for round in 0..200 {
            let g = random_geometry(&mut rng);
            // Inputs of very different sizes and some cancellation, to make rounding show.
            let scale = 10f32.powi(rng.random_range(-3..4));
            let x: Vec<f32> = random_values(&mut rng, g.input_len()).iter().map(|v| v * scale).collect();
            let (w, dy) = (random_values(&mut rng, g.weight_len()), random_values(&mut rng, g.output_len()));
            let (s, t) = (secret(&mut rng, g.out_channels), secret(&mut rng, g.in_channels));
            for results in [from_kernels(&g, &x, &w, &dy), naive_f32(&g, &x, &w, &dy)] {
                let tally =
                    check_all(&g, (&x, &w, &dy), &results, (&s, &t)).unwrap_or_else(|e| panic!("{round} {g:?}: {e}"));
                assert_eq!(
                    tally.checks as usize,
                    g.batch * (g.out_h() * g.out_w() + g.in_h * g.in_w) + g.out_channels * g.kernel_h * g.kernel_w
                );
                worst = worst.max(tally.worst_ratio);
            }
        }
        // Rounding shows (the check compares something) and stays inside the tolerance with room
        // to spare: at one or two products per value the worst case is nearly reached, so the
        // ratio is about a Gaussian draw over `SIGMAS` (0.26 here).
        assert!(worst > 0.0 && worst < 0.5, "worst ratio {worst}");
    }

    /// A device that flushes subnormal products and sums to zero (as GPUs may) is honest: with
    /// values so small that every product is subnormal, its results still pass.
    #[test]
    fn a_device_flushing_subnormals_to_zero_passes() {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        let flush = |v: f32| if v.abs() < f32::MIN_POSITIVE { 0.0 } else { v };
        for _ in 0..40 {
            let g = random_geometry(&mut rng);
            let tiny = |rng: &mut ChaCha8Rng, n: usize| -> Vec<f32> {
                random_values(rng, n).iter().map(|v| v * 1e-20).collect()
            };
            let (x, w, dy) =
                (tiny(&mut rng, g.input_len()), tiny(&mut rng, g.weight_len()), tiny(&mut rng, g.output_len()));
            let (mut y, mut dx, mut dw) =
                (vec![0.0f32; g.output_len()], vec![0.0f32; g.input_len()], vec![0.0f32; g.weight_len()]);
            let inside = |ih: isize, iw: isize| ih >= 0 && iw >= 0 && ih < g.in_h as isize && iw < g.in_w as isize;
            every_product(&g, |[n, o, i, kh, kw, oh, ow], ih, iw| {
                if inside(ih, iw) {
                    let out = ((n * g.out_channels + o) * g.out_h() + oh) * g.out_w() + ow;
                    let input = ((n * g.in_channels + i) * g.in_h + ih as usize) * g.in_w + iw as usize;
                    let wi = ((o * g.in_channels + i) * g.kernel_h + kh) * g.kernel_w + kw;
                    y[out] = flush(y[out] + flush(w[wi] * x[input]));
                    dx[input] = flush(dx[input] + flush(w[wi] * dy[out]));
                    dw[wi] = flush(dw[wi] + flush(x[input] * dy[out]));
                }
            });
            let (s, t) = (secret(&mut rng, g.out_channels), secret(&mut rng, g.in_channels));
            check_all(&g, (&x, &w, &dy), &[y, dx, dw], (&s, &t)).unwrap_or_else(|e| panic!("{g:?}: {e}"));
        }
    }

    /// One value moved by 50 tolerances over its secret weight cannot hide in the rounding, and
    /// the error names it.
    #[test]
    fn one_corrupted_value_is_caught_and_named() {
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        for _ in 0..40 {
            let g = random_geometry(&mut rng);
            let (x, w) = (random_values(&mut rng, g.input_len()), random_values(&mut rng, g.weight_len()));
            let dy = random_values(&mut rng, g.output_len());
            let (s, t) = (secret(&mut rng, g.out_channels), secret(&mut rng, g.in_channels));
            let honest = from_kernels(&g, &x, &w, &dy);
            let (out_plane, in_plane, taps) = (g.out_h() * g.out_w(), g.in_h * g.in_w, g.kernel_h * g.kernel_w);
            let weight = WeightCheck::new(&g, &w, s.clone(), Some(t.clone()));
            let tolerances = [
                forward_sides(&g, &weight, &x, &honest[0]).tolerance,
                backward_data_sides(&g, &weight, &dy, &honest[1]).unwrap().tolerance,
                backward_weight_sides(&g, &InputProjection::new(&g, &x, t.clone()), &dy, &honest[2]).tolerance,
            ];
            for which in 0..3 {
                let mut results = honest.clone();
                let at = rng.random_range(0..results[which].len());
                // Where the value sits: its check, and the secret weight it enters with.
                let (check, weight, name) = match which {
                    0 => (
                        at / (g.out_channels * out_plane) * out_plane + at % out_plane,
                        s[at / out_plane % g.out_channels],
                        "output",
                    ),
                    1 => (
                        at / (g.in_channels * in_plane) * in_plane + at % in_plane,
                        t[at / in_plane % g.in_channels],
                        "input gradient",
                    ),
                    _ => (
                        at / (g.in_channels * taps) * taps + at % taps,
                        t[at / taps % g.in_channels],
                        "weight gradient",
                    ),
                };
                let shift = 50.0 * tolerances[which][check].max(1e-30) / weight.abs();
                results[which][at] += shift as f32;
                let err = check_all(&g, (&x, &w, &dy), &results, (&s, &t)).expect_err("caught");
                assert!(err.contains(&format!("the device's {name} failed verification")), "{err}");
                let place = match which {
                    0 => format!(
                        "sample {}, output position ({}, {})",
                        check / out_plane,
                        check % out_plane / g.out_w(),
                        check % g.out_w()
                    ),
                    1 => format!(
                        "sample {}, input position ({}, {})",
                        check / in_plane,
                        check % in_plane / g.in_w,
                        check % g.in_w
                    ),
                    _ => format!(
                        "output channel {}, tap ({}, {})",
                        check / taps,
                        check % taps / g.kernel_w,
                        check % g.kernel_w
                    ),
                };
                assert!(err.contains(&place), "{place}: {err}");
            }
        }
    }

    /// What a device that does not compute the product would return: scaled results, one
    /// sample's result from another's input, a stale operand, NaN. Each is caught.
    #[test]
    fn results_that_are_not_the_product_are_caught() {
        let mut rng = ChaCha8Rng::seed_from_u64(6);
        let g = ConvGeometry {
            batch: 3,
            in_channels: 16,
            out_channels: 24,
            in_h: 8,
            in_w: 8,
            kernel_h: 3,
            kernel_w: 3,
            stride: 1,
            padding: 1,
        };
        let (x, w) = (random_values(&mut rng, g.input_len()), random_values(&mut rng, g.weight_len()));
        let dy = random_values(&mut rng, g.output_len());
        let (s, t) = (secret(&mut rng, g.out_channels), secret(&mut rng, g.in_channels));
        let honest = from_kernels(&g, &x, &w, &dy);
        check_all(&g, (&x, &w, &dy), &honest, (&s, &t)).unwrap();
        let mut other_x = x.clone();
        let per = g.in_channels * g.in_h * g.in_w;
        other_x.copy_within(0..per, per); // sample 1 replaced by sample 0
        let mut stale_dy = dy.clone();
        for v in stale_dy.iter_mut().step_by(7) {
            *v *= 0.5;
        }
        for which in 0..3 {
            let scaled = {
                let mut r = honest.clone();
                r[which].iter_mut().for_each(|v| *v *= 1.1);
                r
            };
            let swapped = from_kernels(&g, &other_x, &w, &dy);
            let stale = from_kernels(&g, &x, &w, &stale_dy);
            let nan = {
                let mut r = honest.clone();
                let last = r[which].len() - 1;
                r[which][last] = f32::NAN;
                r
            };
            for (what, from) in [("scaled", &scaled), ("swapped", &swapped), ("stale", &stale), ("nan", &nan)] {
                if (what == "swapped" && which == 1) || (what == "stale" && which == 0) {
                    continue; // the input gradient does not read the input, nor the output dy
                }
                let mut results = honest.clone();
                results[which] = from[which].clone();
                let err = check_all(&g, (&x, &w, &dy), &results, (&s, &t));
                assert!(err.is_err(), "{what} result {which} passed");
            }
        }
    }
}

/// Timings of the checks' parts (ignored: run them with `--ignored --nocapture`).
#[cfg(test)]
mod timing {
    use super::*;
    use rand::SeedableRng;
    use rand_chacha::ChaCha8Rng;

    #[test]
    #[ignore]
    fn weight_projection() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        let g = ConvGeometry {
            batch: 32,
            in_channels: 512,
            out_channels: 512,
            in_h: 4,
            in_w: 4,
            kernel_h: 3,
            kernel_w: 3,
            stride: 1,
            padding: 1,
        };
        let ws: Vec<Vec<f32>> =
            (0..8).map(|_| (0..g.weight_len()).map(|_| rng.random_range(-1.0f32..1.0)).collect()).collect();
        for round in 0..3 {
            let start = std::time::Instant::now();
            for w in &ws {
                std::hint::black_box(WeightCheck::new(&g, w, secret(&mut rng, 512), None));
            }
            let a = start.elapsed().as_secs_f64() / 8.0;
            let start = std::time::Instant::now();
            for w in &ws {
                std::hint::black_box(WeightCheck::new(&g, w, secret(&mut rng, 512), Some(secret(&mut rng, 512))));
            }
            let b = start.elapsed().as_secs_f64() / 8.0;
            let start = std::time::Instant::now();
            for w in &ws {
                std::hint::black_box(norm(w));
            }
            let c = start.elapsed().as_secs_f64() / 8.0;
            let start = std::time::Instant::now();
            let t = secret(&mut rng, 512);
            for w in &ws {
                let mut out = vec![0.0; 512 * 9];
                project_weight_gradient(w, 9, &t, &mut out);
                std::hint::black_box(out);
            }
            let d = start.elapsed().as_secs_f64() / 8.0;
            eprintln!(
                "{round}: 2.36M weights: by outputs {:.2} ms, both {:.2} ms, norm alone {:.2} ms, gradient {:.2} ms",
                a * 1e3,
                b * 1e3,
                c * 1e3,
                d * 1e3
            );
        }
    }

    /// Each check's parts on VGG16's layer shapes at batch 32.
    #[test]
    #[ignore]
    fn checks_by_part() {
        // One thread, as the enclave has in `bench step`.
        rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap().install(checks_by_part_here);
    }

    fn checks_by_part_here() {
        let mut rng = ChaCha8Rng::seed_from_u64(1);
        for (c_in, c_out, hw) in [(64, 64, 32), (128, 128, 16), (256, 256, 8), (512, 512, 4), (512, 512, 2)] {
            let g = ConvGeometry {
                batch: 32,
                in_channels: c_in,
                out_channels: c_out,
                in_h: hw,
                in_w: hw,
                kernel_h: 3,
                kernel_w: 3,
                stride: 1,
                padding: 1,
            };
            let mut vals = |n: usize| -> Vec<f32> { (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect() };
            let (x, w, dy, y, dx, dw) = (
                vals(g.input_len()),
                vals(g.weight_len()),
                vals(g.output_len()),
                vals(g.output_len()),
                vals(g.input_len()),
                vals(g.weight_len()),
            );
            let s = secret(&mut rng, c_out);
            let t = secret(&mut rng, c_in);
            let time = |f: &mut dyn FnMut()| {
                let start = std::time::Instant::now();
                for _ in 0..5 {
                    f();
                }
                start.elapsed().as_secs_f64() / 5.0 * 1e3
            };
            let mut weight = None;
            let a = time(&mut || weight = Some(WeightCheck::new(&g, &w, s.clone(), Some(t.clone()))));
            let weight = weight.unwrap();
            let b = time(&mut || {
                std::hint::black_box(forward_sides(&g, &weight, &x, &y));
            });
            let c = time(&mut || {
                std::hint::black_box(backward_data_sides(&g, &weight, &dy, &dx).unwrap());
            });
            let mut input = None;
            let d = time(&mut || input = Some(InputProjection::new(&g, &x, t.clone())));
            let input = input.unwrap();
            let e = time(&mut || {
                std::hint::black_box(backward_weight_sides(&g, &input, &dy, &dw));
            });
            let z = time(&mut || {
                for_each_sample_taps((&weight.by_outputs, 9), &x, (32, c_in, hw * hw), |_, z| {
                    std::hint::black_box(z);
                    Ok(())
                })
                .unwrap();
            });
            let p = time(&mut || {
                for x_n in x.chunks_exact(c_in * hw * hw) {
                    std::hint::black_box(squares_of_rows(x_n, hw * hw));
                }
            });
            let q = time(&mut || {
                for y_n in y.chunks_exact(c_out * hw * hw) {
                    std::hint::black_box(project_rows(y_n, hw * hw, &s));
                }
            });
            eprintln!("{c_in}->{c_out} {hw}x{hw}: weight {a:.2} forward {b:.2} (contract {z:.2}, squares {p:.2}, project y {q:.2}) backward data {c:.2} input projection {d:.2} backward weight {e:.2} ms");
        }
    }
}
