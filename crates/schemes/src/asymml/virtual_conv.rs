//! Convolutions of a low-rank tensor through its factors, so the enclave's work scales with the
//! rank r instead of the channel count.
//!
//! A sample's activation `X` (C x P) splits as `U V + R` with `U` (C x r) and `V` (r x P). By
//! linearity `conv(U V, W) = conv(V, W_T)` where `W_T[o, i] = sum_c W[o, c] U[c, i]`: a convolution
//! with r input channels ("virtual channels"). The same trick serves the backward products:
//! `conv_transpose(P Q, W) = conv_transpose(Q, P^T W)`, `corr(U V, dY) = corr(V, dY) U^T` and
//! `corr(X, P Q) = P corr(X, Q)`. Weights are `C_out x C_in x kh x kw` as in the kernels crate.
//!
//! Every function works on a group of samples that share one basis (`g.batch` samples).

use trustsplit_kernels::conv::{conv2d_backward_data, conv2d_backward_weight, conv2d_forward, ConvGeometry};
use trustsplit_kernels::elementwise::add_assign;
use trustsplit_kernels::matmul::{matmul, parallelism, threads, MatRef};

/// Copies an `a x b x inner` array into `b x a x inner` order.
pub fn swap_leading_axes(src: &[f32], a: usize, b: usize, inner: usize) -> Vec<f32> {
    assert_eq!(src.len(), a * b * inner, "swap_leading_axes: length");
    let mut out = vec![0.0; src.len()];
    for i in 0..a {
        for j in 0..b {
            out[(j * a + i) * inner..][..inner].copy_from_slice(&src[(i * b + j) * inner..][..inner]);
        }
    }
    out
}

fn taps(g: &ConvGeometry) -> usize {
    g.kernel_h * g.kernel_w
}

/// The weight with input channels first (`C_in x C_out x kh x kw`), computed once per layer call
/// and shared by every group's [`virtual_weight`].
pub fn input_major(g: &ConvGeometry, w: &[f32]) -> Vec<f32> {
    swap_leading_axes(w, g.out_channels, g.in_channels, taps(g))
}

/// `W_T = W x_c U` (`C_out x r x kh x kw`) from the input-major weight and `u` (C_in x r).
pub fn virtual_weight(g: &ConvGeometry, w_input_major: &[f32], u: &[f32], r: usize) -> Vec<f32> {
    let cols = g.out_channels * taps(g);
    let mut t = vec![0.0; r * cols];
    let u = MatRef::row_major(u, g.in_channels, r);
    matmul(u.t(), MatRef::row_major(w_input_major, g.in_channels, cols), &mut t, cols, false, parallelism(threads()));
    swap_leading_axes(&t, r, g.out_channels, taps(g))
}

/// The geometry of the same convolution over `r` virtual input channels.
pub fn with_inputs(g: &ConvGeometry, r: usize) -> ConvGeometry {
    ConvGeometry { in_channels: r, ..*g }
}

/// The geometry of the same convolution producing `r` virtual output channels.
pub fn with_outputs(g: &ConvGeometry, r: usize) -> ConvGeometry {
    ConvGeometry { out_channels: r, ..*g }
}

/// `U V` for each of the group's `n` samples (`n x C x P` from `u`, C x r, and `v`, `n x r x P`).
pub fn reconstruct(u: &[f32], c: usize, r: usize, v: &[f32], n: usize, p: usize) -> Vec<f32> {
    let mut out = vec![0.0f32; n * c * p];
    if r == 0 {
        return out;
    }
    let um = MatRef::row_major(u, c, r);
    for s in 0..n {
        let vs = MatRef::row_major(&v[s * r * p..(s + 1) * r * p], r, p);
        matmul(um, vs, &mut out[s * c * p..(s + 1) * c * p], p, false, parallelism(threads()));
    }
    out
}

/// Whether working through `r` virtual channels costs less than rebuilding the low-rank tensor
/// and running the ordinary product: at small maps the per-group weight transform (`r x C_in x
/// C_out x taps`) can exceed the whole convolution, and the enclave then takes the direct path.
pub(crate) fn factored_is_cheaper(g: &ConvGeometry, r: usize, low_rank_channels: usize) -> bool {
    let full = g.forward_macs();
    let factored = r as u64 * g.forward_macs() / low_rank_channels.max(1) as u64
        + (r * g.in_channels * g.out_channels * taps(g)) as u64;
    factored < full
}

/// `y = conv(U V, W)` for the group (overwrites `y`, `N x C_out x H' x W'`); `v` is `N x r x H x W`.
/// Returns the multiply-adds spent.
pub fn low_rank_forward(g: &ConvGeometry, w_input_major: &[f32], u: &[f32], r: usize, v: &[f32], y: &mut [f32]) -> u64 {
    if r == 0 {
        y.fill(0.0);
        return 0;
    }
    if !factored_is_cheaper(g, r, g.in_channels) {
        let x = reconstruct(u, g.in_channels, r, v, g.batch, g.in_h * g.in_w);
        let w = swap_leading_axes(w_input_major, g.in_channels, g.out_channels, taps(g));
        conv2d_forward(g, &x, &w, None, y);
        return g.forward_macs() + (g.batch * g.in_channels * r * g.in_h * g.in_w) as u64;
    }
    let wt = virtual_weight(g, w_input_major, u, r);
    let gv = with_inputs(g, r);
    conv2d_forward(&gv, v, &wt, None, y);
    gv.forward_macs() + (r * g.in_channels * g.out_channels * taps(g)) as u64
}

/// `dx = conv_transpose(P Q, W)` (overwrites `dx`, `N x C_in x H x W`); `p` is C_out x r, `q` is
/// `N x r x H' x W'`.
pub fn low_rank_input_gradient(g: &ConvGeometry, w: &[f32], p: &[f32], r: usize, q: &[f32], dx: &mut [f32]) -> u64 {
    if r == 0 {
        dx.fill(0.0);
        return 0;
    }
    if !factored_is_cheaper(g, r, g.out_channels) {
        let dy = reconstruct(p, g.out_channels, r, q, g.batch, g.out_h() * g.out_w());
        conv2d_backward_data(g, &dy, w, dx);
        return g.forward_macs() + (g.batch * g.out_channels * r * g.out_h() * g.out_w()) as u64;
    }
    // P^T W: r virtual output channels, each a mix of the real ones.
    let cols = g.in_channels * taps(g);
    let mut wp = vec![0.0; r * cols];
    let pm = MatRef::row_major(p, g.out_channels, r);
    matmul(pm.t(), MatRef::row_major(w, g.out_channels, cols), &mut wp, cols, false, parallelism(threads()));
    let gq = with_outputs(g, r);
    conv2d_backward_data(&gq, q, &wp, dx);
    gq.forward_macs() + (r * g.out_channels * cols) as u64
}

/// Adds `corr(U V, dY)` to `dw_input_major` (`C_in x C_out x kh x kw`).
pub fn add_low_rank_input_weight_gradient(
    g: &ConvGeometry,
    u: &[f32],
    r: usize,
    v: &[f32],
    dy: &[f32],
    dw_input_major: &mut [f32],
) -> u64 {
    if r == 0 {
        return 0;
    }
    if !factored_is_cheaper(g, r, g.in_channels) {
        let x = reconstruct(u, g.in_channels, r, v, g.batch, g.in_h * g.in_w);
        let mut dw = vec![0.0; g.weight_len()];
        conv2d_backward_weight(g, &x, dy, &mut dw, None);
        add_assign(dw_input_major, &swap_leading_axes(&dw, g.out_channels, g.in_channels, taps(g)));
        return g.forward_macs() + (g.batch * g.in_channels * r * g.in_h * g.in_w) as u64;
    }
    let gv = with_inputs(g, r);
    let mut dwt = vec![0.0; gv.weight_len()];
    conv2d_backward_weight(&gv, v, dy, &mut dwt, None);
    // dW[o, c] = sum_i dW_T[o, i] U[c, i]: with dW_T as r x (C_out kh kw), dW_im += U dW_T.
    let cols = g.out_channels * taps(g);
    let d = swap_leading_axes(&dwt, g.out_channels, r, taps(g));
    matmul(
        MatRef::row_major(u, g.in_channels, r),
        MatRef::row_major(&d, r, cols),
        dw_input_major,
        cols,
        true,
        parallelism(threads()),
    );
    gv.forward_macs() + (g.in_channels * r * cols) as u64
}

/// Adds `corr(X, P Q)` to `dw` (`C_out x C_in x kh x kw`); `x` is the group's full input.
pub fn add_low_rank_gradient_weight_gradient(
    g: &ConvGeometry,
    x: &[f32],
    p: &[f32],
    r: usize,
    q: &[f32],
    dw: &mut [f32],
) -> u64 {
    if r == 0 {
        return 0;
    }
    if !factored_is_cheaper(g, r, g.out_channels) {
        let dy = reconstruct(p, g.out_channels, r, q, g.batch, g.out_h() * g.out_w());
        let mut full = vec![0.0; g.weight_len()];
        conv2d_backward_weight(g, x, &dy, &mut full, None);
        add_assign(dw, &full);
        return g.forward_macs() + (g.batch * g.out_channels * r * g.out_h() * g.out_w()) as u64;
    }
    let gq = with_outputs(g, r);
    let mut dwq = vec![0.0; gq.weight_len()];
    conv2d_backward_weight(&gq, x, q, &mut dwq, None);
    let cols = g.in_channels * taps(g);
    matmul(
        MatRef::row_major(p, g.out_channels, r),
        MatRef::row_major(&dwq, r, cols),
        dw,
        cols,
        true,
        parallelism(threads()),
    );
    gq.forward_macs() + (g.out_channels * r * cols) as u64
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    fn random(rng: &mut ChaCha8Rng, n: usize) -> Vec<f32> {
        (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
    }

    /// `U V` for every sample of the group: `N x C x P` from `u` (C x r) and `v` (N x r x P).
    fn expand(u: &[f32], c: usize, r: usize, v: &[f32], n: usize, p: usize) -> Vec<f32> {
        let mut x = vec![0.0f32; n * c * p];
        for s in 0..n {
            for ch in 0..c {
                for i in 0..r {
                    for q in 0..p {
                        x[(s * c + ch) * p + q] += u[ch * r + i] * v[(s * r + i) * p + q];
                    }
                }
            }
        }
        x
    }

    fn close(a: &[f32], b: &[f32], what: &str) {
        let scale = b.iter().map(|v| v.abs()).fold(1e-3f32, f32::max);
        for (i, (x, y)) in a.iter().zip(b).enumerate() {
            assert!((x - y).abs() <= 1e-4 * scale, "{what}[{i}]: {x} vs {y} (scale {scale})");
        }
    }

    fn geometry(rng: &mut ChaCha8Rng) -> ConvGeometry {
        let k = [1, 3, 5][rng.random_range(0..3)];
        ConvGeometry {
            batch: rng.random_range(1..4),
            in_channels: rng.random_range(2..9),
            out_channels: rng.random_range(1..7),
            in_h: rng.random_range(k..9),
            in_w: rng.random_range(k..9),
            kernel_h: k,
            kernel_w: k,
            stride: rng.random_range(1..3),
            padding: rng.random_range(0..k / 2 + 1),
        }
    }

    #[test]
    fn factored_products_equal_the_full_convolution() {
        let mut rng = ChaCha8Rng::seed_from_u64(41);
        let mut paths = [0usize; 2];
        for _ in 0..40 {
            let g = geometry(&mut rng);
            let (c, co, n) = (g.in_channels, g.out_channels, g.batch);
            let (p, po) = (g.in_h * g.in_w, g.out_h() * g.out_w());
            let r = rng.random_range(1..=c);
            let rg = rng.random_range(1..=co);
            let (u, v) = (random(&mut rng, c * r), random(&mut rng, n * r * p));
            let (pp, q) = (random(&mut rng, co * rg), random(&mut rng, n * rg * po));
            let w = random(&mut rng, g.weight_len());
            paths[factored_is_cheaper(&g, r, c) as usize] += 1;
            let x_low = expand(&u, c, r, &v, n, p);
            let dy_low = expand(&pp, co, rg, &q, n, po);

            let mut want = vec![0.0; g.output_len()];
            conv2d_forward(&g, &x_low, &w, None, &mut want);
            let mut got = vec![0.0; g.output_len()];
            low_rank_forward(&g, &input_major(&g, &w), &u, r, &v, &mut got);
            close(&got, &want, "forward");

            let mut want = vec![0.0; g.input_len()];
            conv2d_backward_data(&g, &dy_low, &w, &mut want);
            let mut got = vec![0.0; g.input_len()];
            low_rank_input_gradient(&g, &w, &pp, rg, &q, &mut got);
            close(&got, &want, "input gradient");

            let dy = random(&mut rng, g.output_len());
            let mut want = vec![0.0; g.weight_len()];
            conv2d_backward_weight(&g, &x_low, &dy, &mut want, None);
            let mut got_im = vec![0.0; g.weight_len()];
            add_low_rank_input_weight_gradient(&g, &u, r, &v, &dy, &mut got_im);
            close(&swap_leading_axes(&got_im, c, co, g.kernel_h * g.kernel_w), &want, "weight gradient (U V)");

            let x = random(&mut rng, g.input_len());
            let mut want = vec![0.0; g.weight_len()];
            conv2d_backward_weight(&g, &x, &dy_low, &mut want, None);
            let mut got = vec![0.0; g.weight_len()];
            add_low_rank_gradient_weight_gradient(&g, &x, &pp, rg, &q, &mut got);
            close(&got, &want, "weight gradient (P Q)");
        }
        assert!(paths[0] > 0 && paths[1] > 0, "both the direct and the factored path must be exercised: {paths:?}");
    }

    #[test]
    fn swapping_axes_twice_is_the_identity() {
        let mut rng = ChaCha8Rng::seed_from_u64(2);
        let a = random(&mut rng, 3 * 5 * 2);
        let once = swap_leading_axes(&a, 3, 5, 2);
        assert_eq!(once[2..4], a[10..12]); // element (0, 1) of the 3 x 5 grid lands at (1, 0)
        assert_eq!(swap_leading_axes(&once, 5, 3, 2), a);
    }
}
