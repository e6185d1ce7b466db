//! Checks of what a device returns for a convolution, through secret random projections:
//! Freivalds' idea over the reals.
//!
//! The device's result `Y = conv(X, W)` is checked through a secret Gaussian vector `s` over its
//! output channels: `sum_o s_o Y[o]` must equal `conv(X, sum_o s_o W[o])`, a convolution with one
//! output channel, so the check costs the enclave about `1 / C_out` of the device's work. The
//! input gradient is checked the same way over the input channels, and the weight gradient
//! `corr(X, dY)` over the input channels too, through `sum_i t_i X[i]`, which the enclave computes
//! when it releases `X` (the device keeps `X` until the backward pass, and the host could swap it).
//! The enclave computes both sides in f64 from what it released and its own weights.
//!
//! **Tolerance.** An honest device does not return the exact products: it rounds. Any device that
//! forms each result value as a sum of its `K` products in f32 arithmetic, in any order, with or
//! without fused multiply-adds, errs by at most `gamma_K * sum |products|`, with
//! `gamma_K = K u / (1 - K u)` and `u = 2^-24` (Higham, *Accuracy and Stability of Numerical
//! Algorithms*, 2nd ed., section 3.1), and Cauchy-Schwarz bounds that sum by the product of the
//! two factors' norms. The device does not know `s`, so the projection of its errors `e_o` is
//! Gaussian, `s^T e ~ N(0, sum_o e_o^2)`: the check allows [`SIGMAS`] standard deviations of the
//! worst case (plus the enclave's own f64 rounding, about 10^-8 of that), which an honest f32
//! device exceeds with probability below 1.3e-15 per value checked.
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

use rand::Rng;
use rand_distr::StandardNormal;
use serde::Serialize;
use std::ops::Range;
use trustsplit_kernels::elementwise::sum_f64_of;
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

/// The tolerance per unit of the norm product that bounds a value's products: `SIGMAS` times
/// the device's worst-case f32 rounding over `terms` products, plus the enclave's f64 rounding of
/// the two sides (the projection over `projected` channels with a secret of norm `secret_norm`,
/// and the sum of `terms` projected products). The last factor covers the f64 rounding of the
/// norms the tolerance is multiplied by.
fn tolerance_factor(terms: usize, projected: usize, secret_norm: f64) -> f64 {
    (SIGMAS * gamma(terms, F32_ROUNDOFF) + 3.0 * gamma(terms + projected, F64_ROUNDOFF) * secret_norm) * (1.0 + 1e-6)
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

/// `out[oh, ow] += coef[kh, kw] * plane[oh * stride + kh - pad, ow * stride + kw - pad]` over the
/// taps (zero outside the plane): one input channel's share of a convolution with one output
/// channel. `plane` is `in_h x in_w`, `out` is `out_h x out_w`.
fn gather_taps<T: Copy + Into<f64>>(g: &ConvGeometry, plane: &[T], coef: &[f64], out: &mut [f64]) {
    let (s, pad, ow_len) = (g.stride, g.padding, g.out_w());
    for kh in 0..g.kernel_h {
        for oh in valid_outputs(g.out_h(), g.in_h, kh, s, pad) {
            let row = &plane[(oh * s + kh - pad) * g.in_w..][..g.in_w];
            let out_row = &mut out[oh * ow_len..][..ow_len];
            for kw in 0..g.kernel_w {
                let c = coef[kh * g.kernel_w + kw];
                for ow in valid_outputs(ow_len, g.in_w, kw, s, pad) {
                    out_row[ow] += c * row[ow * s + kw - pad].into();
                }
            }
        }
    }
}

/// The transpose of [`gather_taps`]: `out[oh * stride + kh - pad, ow * stride + kw - pad] +=
/// coef[kh, kw] * plane[oh, ow]`: one output channel's share of a transposed convolution with one
/// input channel. `plane` is `out_h x out_w`, `out` is `in_h x in_w`.
fn scatter_taps<T: Copy + Into<f64>>(g: &ConvGeometry, plane: &[T], coef: &[f64], out: &mut [f64]) {
    let (s, pad, ow_len) = (g.stride, g.padding, g.out_w());
    for kh in 0..g.kernel_h {
        for oh in valid_outputs(g.out_h(), g.in_h, kh, s, pad) {
            let row = &plane[oh * ow_len..][..ow_len];
            let out_row = &mut out[(oh * s + kh - pad) * g.in_w..][..g.in_w];
            for kw in 0..g.kernel_w {
                let c = coef[kh * g.kernel_w + kw];
                for ow in valid_outputs(ow_len, g.in_w, kw, s, pad) {
                    out_row[ow * s + kw - pad] += c * row[ow].into();
                }
            }
        }
    }
}

/// `sum_i a_i b_i` over independent partial sums (a single running sum would wait on each
/// addition in turn).
fn dot(a: &[f64], b: &[f32]) -> f64 {
    const LANES: usize = 8;
    let mut lanes = [0.0f64; LANES];
    let (ca, cb) = (a.chunks_exact(LANES), b.chunks_exact(LANES));
    let tail: f64 = ca.remainder().iter().zip(cb.remainder()).map(|(&x, &y)| x * f64::from(y)).sum();
    for (xa, xb) in ca.zip(cb) {
        for ((lane, &x), &y) in lanes.iter_mut().zip(xa).zip(xb) {
            *lane += x * f64::from(y);
        }
    }
    lanes.iter().sum::<f64>() + tail
}

/// `sum_r secret[r] * rows[r]`, each row `len` long.
fn project_rows(rows: &[f32], len: usize, secret: &[f64]) -> Vec<f64> {
    let mut out = vec![0.0f64; len];
    for (row, &s) in rows.chunks_exact(len).zip(secret) {
        for (o, &v) in out.iter_mut().zip(row) {
            *o += s * f64::from(v);
        }
    }
    out
}

/// `sum_r rows[r]^2`, each row `len` long.
fn squares_of_rows(rows: &[f32], len: usize) -> Vec<f64> {
    let mut out = vec![0.0f64; len];
    for row in rows.chunks_exact(len) {
        for (o, &v) in out.iter_mut().zip(row) {
            *o += f64::from(v) * f64::from(v);
        }
    }
    out
}

fn norm(values: &[f32]) -> f64 {
    sum_f64_of(values, |v| v * v).sqrt()
}

fn norm64(values: &[f64]) -> f64 {
    values.iter().map(|v| v * v).sum::<f64>().sqrt()
}

/// The weight `C_out x C_in x taps` projected over its input channels: `sum_i t_i W[o, i]`.
fn project_weight_inputs(g: &ConvGeometry, w: &[f32], t: &[f64]) -> Vec<f64> {
    let taps = g.kernel_h * g.kernel_w;
    w.chunks_exact(g.patch_len()).flat_map(|row| project_rows(row, taps, t)).collect()
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

    /// Compares every value; the first that fails is named by `locate(index)`.
    fn compare(&self, what: &str, locate: impl Fn(usize) -> String) -> Result<CheckTally, String> {
        let mut tally = CheckTally::default();
        for (i, ((&d, &e), &t)) in self.device.iter().zip(&self.enclave).zip(&self.tolerance).enumerate() {
            tally.compare(d, e, t).map_err(|found| mismatch(what, locate(i), found))?;
        }
        Ok(tally)
    }
}

/// Checks `y = conv(x, w)` (no bias, `N x C_out x OH x OW`) through the secret `s` (`C_out`
/// values). Returns the values checked (one per sample and output position).
pub fn check_forward(g: &ConvGeometry, w: &[f32], x: &[f32], y: &[f32], s: &[f64]) -> Result<CheckTally, String> {
    let out_plane = g.out_h() * g.out_w();
    forward_sides(g, w, x, y, s).compare("output", |i| {
        let p = i % out_plane;
        format!("sample {}, output position ({}, {})", i / out_plane, p / g.out_w(), p % g.out_w())
    })
}

fn forward_sides(g: &ConvGeometry, w: &[f32], x: &[f32], y: &[f32], s: &[f64]) -> Sides {
    let (taps, in_plane, out_plane) = (g.kernel_h * g.kernel_w, g.in_h * g.in_w, g.out_h() * g.out_w());
    let projected_weight = project_rows(w, g.patch_len(), s);
    let factor = tolerance_factor(g.patch_len(), g.out_channels, norm64(s)) * norm(w);
    let ones = vec![1.0f64; taps];
    let mut sides = Sides::with_capacity(g.batch * out_plane);
    for n in 0..g.batch {
        let x_n = &x[n * g.in_channels * in_plane..][..g.in_channels * in_plane];
        let mut enclave_side = vec![0.0f64; out_plane];
        for (plane, coef) in x_n.chunks_exact(in_plane).zip(projected_weight.chunks_exact(taps)) {
            gather_taps(g, plane, coef, &mut enclave_side);
        }
        // Each output's patch norm squared: the channels' squares summed over its taps.
        let mut patch = vec![0.0f64; out_plane];
        gather_taps(g, &squares_of_rows(x_n, in_plane), &ones, &mut patch);
        let y_n = &y[n * g.out_channels * out_plane..][..g.out_channels * out_plane];
        sides.device.extend(project_rows(y_n, out_plane, s));
        sides.enclave.extend(enclave_side);
        sides.tolerance.extend(patch.iter().map(|p| factor * p.sqrt()));
    }
    sides
}

/// Checks the input gradient `dx` (`N x C_in x H x W`) of `y = conv(x, w)` from `dy` through the
/// secret `t` (`C_in` values). Returns the values checked (one per sample and input position).
pub fn check_backward_data(
    g: &ConvGeometry,
    w: &[f32],
    dy: &[f32],
    dx: &[f32],
    t: &[f64],
) -> Result<CheckTally, String> {
    let in_plane = g.in_h * g.in_w;
    backward_data_sides(g, w, dy, dx, t).compare("input gradient", |i| {
        let q = i % in_plane;
        format!("sample {}, input position ({}, {})", i / in_plane, q / g.in_w, q % g.in_w)
    })
}

fn backward_data_sides(g: &ConvGeometry, w: &[f32], dy: &[f32], dx: &[f32], t: &[f64]) -> Sides {
    let (taps, in_plane, out_plane) = (g.kernel_h * g.kernel_w, g.in_h * g.in_w, g.out_h() * g.out_w());
    let projected_weight = project_weight_inputs(g, w, t);
    let factor = tolerance_factor(g.out_channels * taps, g.in_channels, norm64(t)) * norm(w);
    let ones = vec![1.0f64; taps];
    let mut sides = Sides::with_capacity(g.batch * in_plane);
    for n in 0..g.batch {
        let dy_n = &dy[n * g.out_channels * out_plane..][..g.out_channels * out_plane];
        let mut enclave_side = vec![0.0f64; in_plane];
        for (plane, coef) in dy_n.chunks_exact(out_plane).zip(projected_weight.chunks_exact(taps)) {
            scatter_taps(g, plane, coef, &mut enclave_side);
        }
        // Each input's norm squared of the output gradients it collects, over its taps.
        let mut window = vec![0.0f64; in_plane];
        scatter_taps(g, &squares_of_rows(dy_n, out_plane), &ones, &mut window);
        let dx_n = &dx[n * g.in_channels * in_plane..][..g.in_channels * in_plane];
        sides.device.extend(project_rows(dx_n, in_plane, t));
        sides.enclave.extend(enclave_side);
        sides.tolerance.extend(window.iter().map(|v| factor * v.sqrt()));
    }
    sides
}

/// What the enclave keeps of a released input `x` to check the weight gradient the device later
/// computes from it: `sum_i t_i x[n, i]` for a secret `t`, and `x`'s norm. `1 / C_in` of `x`.
pub struct InputProjection {
    t: Vec<f64>,
    /// `N x H x W`.
    projected: Vec<f64>,
    norm: f64,
}

impl InputProjection {
    /// Projects `x` (`N x C_in x H x W` as `g` says) through the secret `t` (`C_in` values).
    pub fn new(g: &ConvGeometry, x: &[f32], t: Vec<f64>) -> InputProjection {
        let per = g.in_channels * g.in_h * g.in_w;
        let projected = x.chunks_exact(per).flat_map(|x_n| project_rows(x_n, g.in_h * g.in_w, &t)).collect();
        InputProjection { t, projected, norm: norm(x) }
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
    let (taps, in_plane, out_plane) = (g.kernel_h * g.kernel_w, g.in_h * g.in_w, g.out_h() * g.out_w());
    let (s, pad, ow_len) = (g.stride, g.padding, g.out_w());
    let factor = tolerance_factor(g.batch * out_plane, g.in_channels, norm64(&x.t)) * x.norm;
    // enclave[o, tap]: over samples and outputs, the projected input at the tap times dy.
    let mut enclave = vec![0.0f64; g.out_channels * taps];
    let mut dy_squares = vec![0.0f64; g.out_channels];
    for n in 0..g.batch {
        let x_n = &x.projected[n * in_plane..][..in_plane];
        for o in 0..g.out_channels {
            let dy_plane = &dy[(n * g.out_channels + o) * out_plane..][..out_plane];
            dy_squares[o] += sum_f64_of(dy_plane, |v| v * v);
            for kh in 0..g.kernel_h {
                for kw in 0..g.kernel_w {
                    let mut sum = 0.0f64;
                    let columns = valid_outputs(ow_len, g.in_w, kw, s, pad);
                    for oh in valid_outputs(g.out_h(), g.in_h, kh, s, pad) {
                        let x_row = &x_n[(oh * s + kh - pad) * g.in_w..][..g.in_w];
                        let dy_row = &dy_plane[oh * ow_len..][..ow_len];
                        sum += if s == 1 {
                            let first = columns.start + kw - pad;
                            dot(&x_row[first..first + columns.len()], &dy_row[columns.clone()])
                        } else {
                            columns.clone().map(|ow| x_row[ow * s + kw - pad] * f64::from(dy_row[ow])).sum::<f64>()
                        };
                    }
                    enclave[o * taps + kh * g.kernel_w + kw] += sum;
                }
            }
        }
    }
    let mut sides = Sides::with_capacity(enclave.len());
    for (o, row) in dw.chunks_exact(g.patch_len()).enumerate() {
        sides.device.extend(project_rows(row, taps, &x.t));
        sides.tolerance.extend(std::iter::repeat_n(factor * dy_squares[o].sqrt(), taps));
    }
    sides.enclave = enclave;
    sides
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

    #[test]
    fn both_sides_equal_the_projections_of_the_exact_products() {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        for _ in 0..60 {
            let g = random_geometry(&mut rng);
            let (x, w) = (random_values(&mut rng, g.input_len()), random_values(&mut rng, g.weight_len()));
            let dy = random_values(&mut rng, g.output_len());
            let [y, dx, dw] = exact(&g, &x, &w, &dy);
            let (s, t) = (secret(&mut rng, g.out_channels), secret(&mut rng, g.in_channels));
            let (out_plane, in_plane, taps) = (g.out_h() * g.out_w(), g.in_h * g.in_w, g.kernel_h * g.kernel_w);
            let as_f32 = |v: &[f64]| -> Vec<f32> { v.iter().map(|&v| v as f32).collect() };
            // Each side against its definition: the device side projects what it was given (here
            // the exact result rounded to f32), the enclave side must give the exact projection.
            let cases = [
                (
                    forward_sides(&g, &w, &x, &as_f32(&y), &s),
                    projection(&y, g.batch, out_plane, &s),
                    as_f32(&y),
                    out_plane,
                    s.clone(),
                ),
                (
                    backward_data_sides(&g, &w, &dy, &as_f32(&dx), &t),
                    projection(&dx, g.batch, in_plane, &t),
                    as_f32(&dx),
                    in_plane,
                    t.clone(),
                ),
            ];
            for (sides, expected, given, len, secret) in cases {
                let given: Vec<f64> = given.iter().map(|&v| f64::from(v)).collect();
                let device = projection(&given, g.batch, len, &secret);
                for (j, (&e, &d)) in expected.iter().zip(&device).enumerate() {
                    let scale = 1.0 + e.abs();
                    assert!((sides.enclave[j] - e).abs() < 1e-12 * scale, "{g:?} {j}");
                    assert!((sides.device[j] - d).abs() < 1e-12 * scale, "{g:?} {j}");
                }
            }
            let sides = backward_weight_sides(&g, &InputProjection::new(&g, &x, t.clone()), &dy, &as_f32(&dw));
            // dw is C_out rows of C_in x taps: projected over its input channels per output channel.
            let expected = projection(&dw, g.out_channels, taps, &t);
            for (j, (&found, &e)) in sides.enclave.iter().zip(&expected).enumerate() {
                assert!((found - e).abs() < 1e-12 * (1.0 + e.abs()), "{g:?} {j}");
            }
        }
    }

    fn check_all(
        g: &ConvGeometry,
        (x, w, dy): (&[f32], &[f32], &[f32]),
        results: &[Vec<f32>; 3],
        (s, t): (&[f64], &[f64]),
    ) -> Result<CheckTally, String> {
        let mut tally = check_forward(g, w, x, &results[0], s)?;
        tally.add(check_backward_data(g, w, dy, &results[1], t)?);
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
            let tolerances = [
                forward_sides(&g, &w, &x, &honest[0], &s).tolerance,
                backward_data_sides(&g, &w, &dy, &honest[1], &t).tolerance,
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
