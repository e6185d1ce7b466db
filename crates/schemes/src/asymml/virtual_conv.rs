//! Convolutions of a low-rank tensor through its factors, so the enclave's work scales with the
//! rank r instead of the channel count.
//!
//! A sample's activation `X` (C x P) splits as `U V + R` with `U` (C x r) and `V` (r x P). By
//! linearity `conv(U V, W) = conv(V, W_T)` where `W_T[o, i] = sum_c W[o, c] U[c, i]`: a convolution
//! with r input channels ("virtual channels"). The same trick serves the backward products:
//! `conv_transpose(P Q, W) = conv_transpose(Q, P^T W)`, `corr(U V, dY) = corr(V, dY) U^T` and
//! `corr(X, P Q) = P corr(X, Q)`. Weights are `C_out x C_in x kh x kw` as in the kernels crate.
//!
//! Every function takes all of a batch's groups (samples sharing a basis) at once, so the weight
//! is swept once per call: the groups' bases are stacked side by side and transformed together,
//! in the weight's own layout (no transposed copy of the weight; `kernels::tap_products`). The
//! weight gradient's low-rank terms stay factored ([`LowRankWeightGradient`]) until they are added
//! to the device's share in one sweep. Groups for which the factored route would cost more than
//! the ordinary product (at small maps the transform `r C_in C_out k^2` exceeds the whole
//! convolution) are rebuilt and convolved together in one ordinary call.
//!
//! With the output gradient split too, as `P Q + R`, the weight gradient's input side is taken by
//! pairs of factors, `corr(U V, R) + P corr(V, Q)` ([`LowRankWeightGradient::add_low_rank_pairs`]),
//! so `P Q + R` is never rebuilt.

use std::borrow::Cow;
use trustsplit_kernels::conv::{
    conv2d_backward_data, conv2d_backward_data_few_outputs, conv2d_backward_weight, conv2d_backward_weight_few_inputs,
    conv2d_backward_weight_few_outputs, conv2d_forward, ConvGeometry,
};
use trustsplit_kernels::elementwise::add_assign;
use trustsplit_kernels::matmul::{matmul, parallelism, threads, MatRef};
use trustsplit_kernels::tap_products::{add_expansions, transform_inputs, transform_outputs, Expansion, TapShape};

/// One group's factors: samples `start..start + len` share `basis` (`channels x rank`, row-major),
/// and `coords` holds their coordinates (`len x rank x positions`).
#[derive(Clone, Copy)]
pub struct Factors<'a> {
    pub start: usize,
    pub len: usize,
    pub rank: usize,
    pub basis: &'a [f32],
    pub coords: &'a [f32],
}

fn taps(g: &ConvGeometry) -> usize {
    g.kernel_h * g.kernel_w
}

fn gemm(a: MatRef, b: MatRef, c: &mut [f32], stride: usize, accumulate: bool) {
    matmul(a, b, c, stride, accumulate, parallelism(threads()));
}

fn tap_shape(g: &ConvGeometry) -> TapShape {
    TapShape { out_channels: g.out_channels, in_channels: g.in_channels, taps: taps(g) }
}

/// `T = W [U_1 U_2 ...]` over the input channels: `us` is the bases side by side (`C_in x total`),
/// the result `C_out x total x kh x kw`, so that each group's `r` columns, taken per output
/// channel, are its weight on `r` virtual input channels.
fn transformed_weight(g: &ConvGeometry, w: &[f32], us: &[f32], total: usize) -> Vec<f32> {
    let mut t = vec![0.0f32; g.out_channels * total * taps(g)];
    transform_inputs(tap_shape(g), w, us, total, &mut t);
    t
}

/// Whether `len` samples of rank `r` (over `low_rank_channels` channels) cost less through virtual
/// channels, transform included, than through the ordinary product on the rebuilt tensor.
pub(crate) fn factored_is_cheaper(g: &ConvGeometry, r: usize, low_rank_channels: usize) -> bool {
    let full = g.forward_macs();
    let factored = r as u64 * g.forward_macs() / low_rank_channels.max(1) as u64
        + (r * g.in_channels * g.out_channels * taps(g)) as u64;
    factored < full
}

/// `U V` for each of the group's samples (`len x C x P`), written to `out` or, with `accumulate`,
/// added to it.
pub(crate) fn rebuild(f: &Factors, channels: usize, positions: usize, out: &mut [f32], accumulate: bool) {
    let (r, p) = (f.rank, positions);
    if r == 0 {
        if !accumulate {
            out.fill(0.0);
        }
        return;
    }
    let u = MatRef::row_major(f.basis, channels, r);
    for s in 0..f.len {
        let v = MatRef::row_major(&f.coords[s * r * p..(s + 1) * r * p], r, p);
        gemm(u, v, &mut out[s * channels * p..(s + 1) * channels * p], p, accumulate);
    }
}

/// The groups split into those worth factoring and those to rebuild; `channels` is the side the
/// factors live on (inputs or output gradients).
fn partition<'a>(g: &ConvGeometry, groups: &[Factors<'a>], channels: usize) -> (Vec<Factors<'a>>, Vec<Factors<'a>>) {
    groups
        .iter()
        .filter(|f| f.len > 0 && f.rank > 0)
        .partition(|f| factored_is_cheaper(&ConvGeometry { batch: f.len, ..*g }, f.rank, channels))
}

/// Rebuilds the `direct` groups into one contiguous tensor (in group order) and returns it with the
/// number of samples.
fn rebuild_all(direct: &[Factors], channels: usize, positions: usize) -> (Vec<f32>, usize) {
    let n: usize = direct.iter().map(|f| f.len).sum();
    let per = channels * positions;
    let mut out = vec![0.0f32; n * per];
    let mut at = 0;
    for f in direct {
        rebuild(f, channels, positions, &mut out[at * per..(at + f.len) * per], false);
        at += f.len;
    }
    (out, n)
}

/// The samples the groups cover, as `start..end`, when they follow one another without a gap.
fn contiguous(groups: &[Factors]) -> Option<std::ops::Range<usize>> {
    let start = groups.first()?.start;
    let mut end = start;
    for f in groups {
        if f.start != end {
            return None;
        }
        end += f.len;
    }
    Some(start..end)
}

/// The groups' rows (`per` values per sample) of a whole-batch tensor, in group order: borrowed
/// when the groups are one contiguous run, copied out otherwise.
fn gather<'a>(groups: &[Factors], all: &'a [f32], per: usize) -> Cow<'a, [f32]> {
    if let Some(span) = contiguous(groups) {
        return Cow::Borrowed(&all[span.start * per..span.end * per]);
    }
    let mut out = Vec::with_capacity(groups.iter().map(|f| f.len).sum::<usize>() * per);
    for f in groups {
        out.extend_from_slice(&all[f.start * per..(f.start + f.len) * per]);
    }
    Cow::Owned(out)
}

/// Runs `write` (which overwrites its argument) on the groups' rows of a whole-batch tensor, in
/// group order: in place when the groups are one contiguous run, else through a buffer written
/// back to the groups' places.
fn write_rows(groups: &[Factors], all: &mut [f32], per: usize, write: impl FnOnce(&mut [f32])) {
    if let Some(span) = contiguous(groups) {
        write(&mut all[span.start * per..span.end * per]);
        return;
    }
    let mut rows = vec![0.0f32; groups.iter().map(|f| f.len).sum::<usize>() * per];
    write(&mut rows);
    let mut at = 0;
    for f in groups {
        all[f.start * per..(f.start + f.len) * per].copy_from_slice(&rows[at * per..(at + f.len) * per]);
        at += f.len;
    }
}

/// Zeroes the rows (`per` values per sample) of the samples no group with a basis covers: the
/// products overwrite every other row, so the whole output need not be cleared first.
fn zero_rows_without_factors(groups: &[Factors], per: usize, out: &mut [f32]) {
    let mut covered = vec![false; out.len() / per.max(1)];
    for f in groups.iter().filter(|f| f.rank > 0) {
        covered[f.start..f.start + f.len].iter_mut().for_each(|c| *c = true);
    }
    for (row, _) in out.chunks_exact_mut(per.max(1)).zip(&covered).filter(|(_, &c)| !c) {
        row.fill(0.0);
    }
}

/// The bases side by side `[U_1 U_2 ...]` (`channels x sum r`).
fn side_by_side(groups: &[Factors], channels: usize) -> Vec<f32> {
    let total: usize = groups.iter().map(|f| f.rank).sum();
    let mut out = vec![0.0f32; channels * total];
    let mut col = 0;
    for f in groups {
        for c in 0..channels {
            out[c * total + col..][..f.rank].copy_from_slice(&f.basis[c * f.rank..(c + 1) * f.rank]);
        }
        col += f.rank;
    }
    out
}

/// `y = conv(U V, W)` for every group (overwrites `y`, the whole batch's `N x C_out x H' x W'`).
/// Returns the multiply-adds spent.
pub fn low_rank_forward(g: &ConvGeometry, w: &[f32], groups: &[Factors], y: &mut [f32]) -> u64 {
    let (c, kk, p) = (g.in_channels, taps(g), g.in_h * g.in_w);
    let out_per = g.out_channels * g.out_h() * g.out_w();
    zero_rows_without_factors(groups, out_per, y);
    let (factored, direct) = partition(g, groups, c);
    let mut macs = 0;
    if !direct.is_empty() {
        let (x, n) = rebuild_all(&direct, c, p);
        let gd = ConvGeometry { batch: n, ..*g };
        write_rows(&direct, y, out_per, |out| conv2d_forward(&gd, &x, w, None, out));
        macs += gd.forward_macs() + (x.len() * direct[0].rank) as u64;
    }
    if !factored.is_empty() {
        // All groups' transforms in one pass over the weight: W [U_1 U_2 ...] (C_out x sum r x kk).
        let total: usize = factored.iter().map(|f| f.rank).sum();
        let t = transformed_weight(g, w, &side_by_side(&factored, c), total);
        macs += (total * c * g.out_channels * kk) as u64;
        let mut row = 0;
        for f in &factored {
            let gv = ConvGeometry { batch: f.len, in_channels: f.rank, ..*g };
            let dst = &mut y[f.start * out_per..(f.start + f.len) * out_per];
            if f.rank == total {
                conv2d_forward(&gv, f.coords, &t, None, dst);
            } else {
                // The group's columns, per output channel (C_out x r x kk: small).
                let wt: Vec<f32> =
                    t.chunks_exact(total * kk).flat_map(|o| &o[row * kk..(row + f.rank) * kk]).copied().collect();
                conv2d_forward(&gv, f.coords, &wt, None, dst);
            }
            macs += gv.forward_macs();
            row += f.rank;
        }
    }
    macs
}

/// `dx = conv_transpose(P Q, W)` for every group (overwrites `dx`, the whole batch's input
/// gradient); the factors live on the output channels.
pub fn low_rank_input_gradient(g: &ConvGeometry, w: &[f32], groups: &[Factors], dx: &mut [f32]) -> u64 {
    let (co, po) = (g.out_channels, g.out_h() * g.out_w());
    let in_per = g.in_channels * g.in_h * g.in_w;
    zero_rows_without_factors(groups, in_per, dx);
    let (factored, direct) = partition(g, groups, co);
    let mut macs = 0;
    if !direct.is_empty() {
        let (dy, n) = rebuild_all(&direct, co, po);
        let gd = ConvGeometry { batch: n, ..*g };
        write_rows(&direct, dx, in_per, |out| conv2d_backward_data(&gd, &dy, w, out));
        macs += gd.forward_macs() + (dy.len() * direct[0].rank) as u64;
    }
    if !factored.is_empty() {
        // [P_1^T; P_2^T; ...] W: each group's r virtual output channels.
        let total: usize = factored.iter().map(|f| f.rank).sum();
        let cols = g.in_channels * taps(g);
        let mut wp = vec![0.0f32; total * cols];
        transform_outputs(tap_shape(g), w, &side_by_side(&factored, co), total, &mut wp);
        macs += (total * co * cols) as u64;
        let mut row = 0;
        for f in &factored {
            let gq = ConvGeometry { batch: f.len, out_channels: f.rank, ..*g };
            let dst = &mut dx[f.start * in_per..(f.start + f.len) * in_per];
            conv2d_backward_data_few_outputs(&gq, f.coords, &wp[row * cols..(row + f.rank) * cols], dst);
            macs += gq.forward_macs();
            row += f.rank;
        }
    }
    macs
}

fn term(t: &Option<(Vec<f32>, Vec<f32>, usize)>) -> Option<Expansion<'_>> {
    t.as_ref().map(|(basis, coeffs, cols)| Expansion { basis, coeffs, cols: *cols })
}

/// The enclave's share of a weight gradient, kept as factors: `corr(U V, dY)` as the bases
/// `[U_1 U_2 ...]` and `D = [corr(V_1, dY) ...]`, `corr(X, P Q)` as `[P_1 P_2 ...]` and
/// `E = [corr(X, Q_1); ...]`. [`LowRankWeightGradient::add_to`] expands both terms into a full
/// gradient (the device's share) in one sweep of it, so the enclave never writes a weight-sized
/// buffer of its own for them. Groups not worth factoring are correlated in full instead.
#[derive(Default)]
pub struct LowRankWeightGradient {
    full: Option<Vec<f32>>,
    /// Bases side by side (`C_in x cols`), `D` (`C_out x cols x kh x kw`), `cols`.
    inputs: Option<(Vec<f32>, Vec<f32>, usize)>,
    /// Output-gradient bases side by side (`C_out x cols`), `E` (`cols x C_in x kh x kw`), `cols`.
    outputs: Option<(Vec<f32>, Vec<f32>, usize)>,
}

impl LowRankWeightGradient {
    fn add_full(&mut self, g: &ConvGeometry, compute: impl FnOnce(&mut [f32])) {
        let mut part = vec![0.0f32; g.weight_len()];
        compute(&mut part);
        match &mut self.full {
            Some(full) => add_assign(full, &part),
            None => self.full = Some(part),
        }
    }

    /// Adds `corr(U V, dY)` for every group (the factors live on the input channels); `dy` is the
    /// whole batch's output gradient. Returns the multiply-adds spent.
    pub fn add_input_side(&mut self, g: &ConvGeometry, groups: &[Factors], dy: &[f32]) -> u64 {
        assert!(self.inputs.is_none(), "one input-side term per gradient");
        let (c, kk, p) = (g.in_channels, taps(g), g.in_h * g.in_w);
        let out_per = g.out_channels * g.out_h() * g.out_w();
        let (factored, direct) = partition(g, groups, c);
        let mut macs = 0;
        if !direct.is_empty() {
            let (x, n) = rebuild_all(&direct, c, p);
            let gd = ConvGeometry { batch: n, ..*g };
            self.add_full(g, |full| conv2d_backward_weight(&gd, &x, &gather(&direct, dy, out_per), full, None));
            macs += gd.forward_macs() + (x.len() * direct[0].rank) as u64;
        }
        if !factored.is_empty() {
            // Per group corr(V, dY) (C_out x r x kk), stacked along the middle axis into D.
            let total: usize = factored.iter().map(|f| f.rank).sum();
            let mut d = vec![0.0f32; g.out_channels * total * kk];
            let mut row = 0;
            for f in &factored {
                let gv = ConvGeometry { batch: f.len, in_channels: f.rank, ..*g };
                let dy_g = &dy[f.start * out_per..(f.start + f.len) * out_per];
                if f.rank == total {
                    conv2d_backward_weight_few_inputs(&gv, f.coords, dy_g, &mut d);
                } else {
                    let mut dwt = vec![0.0f32; gv.weight_len()];
                    conv2d_backward_weight_few_inputs(&gv, f.coords, dy_g, &mut dwt);
                    for (dst, src) in d.chunks_exact_mut(total * kk).zip(dwt.chunks_exact(f.rank * kk)) {
                        dst[row * kk..(row + f.rank) * kk].copy_from_slice(src);
                    }
                }
                macs += gv.forward_macs();
                row += f.rank;
            }
            self.inputs = Some((side_by_side(&factored, c), d, total));
        }
        macs
    }

    /// Whether [`LowRankWeightGradient::add_low_rank_pairs`] can stand in for adding `P Q` to the
    /// output gradient before [`LowRankWeightGradient::add_input_side`]: every input group with a
    /// basis is factored, and each is paired with the output-gradient group over the same samples.
    pub fn pairs_cover(g: &ConvGeometry, x_groups: &[Factors], dy_groups: &[Factors]) -> bool {
        let (factored, direct) = partition(g, x_groups, g.in_channels);
        direct.is_empty() && factored.iter().all(|f| dy_groups.iter().any(|d| d.start == f.start && d.len == f.len))
    }

    /// Adds `corr(U V, P Q)` for each input group and the output-gradient group over the same
    /// samples, to the input-side term that [`LowRankWeightGradient::add_input_side`] left:
    /// `corr(V, P Q) = P corr(V, Q)`, whose `corr(V, Q)` has `r_x r_dy k^2` entries. With the
    /// output gradient split as `P Q + R`, `add_input_side` on `R` and this give the input side of
    /// the whole gradient without rebuilding `P Q + R`. Requires [`LowRankWeightGradient::pairs_cover`].
    /// Returns the multiply-adds spent.
    pub fn add_low_rank_pairs(&mut self, g: &ConvGeometry, x_groups: &[Factors], dy_groups: &[Factors]) -> u64 {
        assert!(Self::pairs_cover(g, x_groups, dy_groups), "add_low_rank_pairs: groups not paired");
        let Some((_, d, total)) = &mut self.inputs else {
            return 0; // no input group has a basis
        };
        let (co, kk, total) = (g.out_channels, taps(g), *total);
        let (factored, _) = partition(g, x_groups, g.in_channels);
        let mut macs = 0;
        let mut row = 0;
        for f in &factored {
            let pair = dy_groups.iter().find(|q| q.start == f.start && q.len == f.len).expect("paired");
            let (rx, rq) = (f.rank, pair.rank);
            if rq > 0 {
                // corr(V, Q): a convolution from rx channels to rq, its weight gradient (rq x rx x kk).
                let gv = ConvGeometry { batch: f.len, in_channels: rx, out_channels: rq, ..*g };
                let mut c = vec![0.0f32; gv.weight_len()];
                conv2d_backward_weight_few_inputs(&gv, f.coords, pair.coords, &mut c);
                macs += gv.forward_macs();
                // D[o, row + i, t] += sum_j P[o, j] c[j, i, t].
                for o in 0..co {
                    let d_o = &mut d[(o * total + row) * kk..][..rx * kk];
                    for j in 0..rq {
                        let p = pair.basis[o * rq + j];
                        d_o.iter_mut().zip(&c[j * rx * kk..(j + 1) * rx * kk]).for_each(|(d, c)| *d += p * c);
                    }
                }
                macs += (co * rq * rx * kk) as u64;
            }
            row += rx;
        }
        macs
    }

    /// Adds `corr(X, P Q)` for every group (the factors live on the output channels); `x` is the
    /// whole batch's input. Returns the multiply-adds spent.
    pub fn add_output_side(&mut self, g: &ConvGeometry, x: &[f32], groups: &[Factors]) -> u64 {
        assert!(self.outputs.is_none(), "one output-side term per gradient");
        let (co, po) = (g.out_channels, g.out_h() * g.out_w());
        let in_per = g.in_channels * g.in_h * g.in_w;
        let cols = g.in_channels * taps(g);
        let (factored, direct) = partition(g, groups, co);
        let mut macs = 0;
        if !direct.is_empty() {
            let (dy, n) = rebuild_all(&direct, co, po);
            let gd = ConvGeometry { batch: n, ..*g };
            self.add_full(g, |full| conv2d_backward_weight(&gd, &gather(&direct, x, in_per), &dy, full, None));
            macs += gd.forward_macs() + (dy.len() * direct[0].rank) as u64;
        }
        if !factored.is_empty() {
            // Per group corr(X, Q) (r x C_in kk), stacked into E.
            let total: usize = factored.iter().map(|f| f.rank).sum();
            let mut e = vec![0.0f32; total * cols];
            let mut row = 0;
            for f in &factored {
                let gq = ConvGeometry { batch: f.len, out_channels: f.rank, ..*g };
                let x_g = &x[f.start * in_per..(f.start + f.len) * in_per];
                conv2d_backward_weight_few_outputs(&gq, x_g, f.coords, &mut e[row * cols..(row + f.rank) * cols]);
                macs += gq.forward_macs();
                row += f.rank;
            }
            self.outputs = Some((side_by_side(&factored, co), e, total));
        }
        macs
    }

    /// Adds the whole low-rank gradient to `dw` (`C_out x C_in x kh x kw`). Returns the
    /// multiply-adds of the expansion, and whether every value of `dw` is then finite (checked
    /// within the expansion's sweep, while each part is still in cache).
    pub fn add_to(&self, g: &ConvGeometry, dw: &mut [f32]) -> (u64, bool) {
        if let Some(full) = &self.full {
            add_assign(dw, full);
        }
        let (inputs, outputs) = (term(&self.inputs), term(&self.outputs));
        let finite = add_expansions(tap_shape(g), inputs, outputs, dw);
        let cols = inputs.map_or(0, |e| e.cols) + outputs.map_or(0, |e| e.cols);
        ((cols * g.weight_len()) as u64, finite)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    fn random(rng: &mut ChaCha8Rng, n: usize) -> Vec<f32> {
        (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
    }

    /// Random groups over `n` samples (per-sample, or one for the batch), with random ranks up to
    /// `max_rank`: (start, len, rank, basis, coords).
    type Owned = (usize, usize, usize, Vec<f32>, Vec<f32>);
    fn groups(rng: &mut ChaCha8Rng, n: usize, channels: usize, positions: usize, max_rank: usize) -> Vec<Owned> {
        let per_sample = rng.random_bool(0.5);
        let spans: Vec<(usize, usize)> = if per_sample { (0..n).map(|s| (s, 1)).collect() } else { vec![(0, n)] };
        spans
            .into_iter()
            .map(|(start, len)| {
                let r = rng.random_range(0..=max_rank);
                (start, len, r, random(rng, channels * r), random(rng, len * r * positions))
            })
            .collect()
    }

    fn view(owned: &[Owned]) -> Vec<Factors<'_>> {
        owned
            .iter()
            .map(|(start, len, rank, b, v)| Factors { start: *start, len: *len, rank: *rank, basis: b, coords: v })
            .collect()
    }

    /// The whole batch's low-rank tensor, by naive loops.
    fn expand(owned: &[Owned], n: usize, c: usize, p: usize) -> Vec<f32> {
        let mut x = vec![0.0f32; n * c * p];
        for (start, len, r, u, v) in owned {
            for s in 0..*len {
                for ch in 0..c {
                    for i in 0..*r {
                        for q in 0..p {
                            x[((start + s) * c + ch) * p + q] += u[ch * r + i] * v[(s * r + i) * p + q];
                        }
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
            batch: rng.random_range(1..5),
            // Past the kernels' FEW_INPUTS and FEW_OUTPUTS too, so both of their routes run.
            in_channels: rng.random_range(2..21),
            out_channels: rng.random_range(1..13),
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
        let mut paired = 0;
        for _ in 0..60 {
            let g = geometry(&mut rng);
            let (c, co, n) = (g.in_channels, g.out_channels, g.batch);
            let (p, po) = (g.in_h * g.in_w, g.out_h() * g.out_w());
            let xs = groups(&mut rng, n, c, p, c);
            let gs = groups(&mut rng, n, co, po, co);
            for (_, len, r, _, _) in &xs {
                if *r > 0 {
                    paths[factored_is_cheaper(&ConvGeometry { batch: *len, ..g }, *r, c) as usize] += 1;
                }
            }
            let w = random(&mut rng, g.weight_len());
            let (x_low, dy_low) = (expand(&xs, n, c, p), expand(&gs, n, co, po));

            let mut want = vec![0.0; g.output_len()];
            conv2d_forward(&g, &x_low, &w, None, &mut want);
            let mut got = random(&mut rng, g.output_len()); // overwritten
            low_rank_forward(&g, &w, &view(&xs), &mut got);
            close(&got, &want, "forward");

            let mut want = vec![0.0; g.input_len()];
            conv2d_backward_data(&g, &dy_low, &w, &mut want);
            let mut got = random(&mut rng, g.input_len()); // overwritten
            low_rank_input_gradient(&g, &w, &view(&gs), &mut got);
            close(&got, &want, "input gradient");

            let dy = random(&mut rng, g.output_len());
            let mut want_u = vec![0.0; g.weight_len()];
            conv2d_backward_weight(&g, &x_low, &dy, &mut want_u, None);
            let start = random(&mut rng, g.weight_len()); // accumulated onto
            let mut got = start.clone();
            let mut lr = LowRankWeightGradient::default();
            lr.add_input_side(&g, &view(&xs), &dy);
            lr.add_to(&g, &mut got);
            let diff: Vec<f32> = got.iter().zip(&start).map(|(a, b)| a - b).collect();
            close(&diff, &want_u, "weight gradient (U V)");

            let x = random(&mut rng, g.input_len());
            let mut want_p = vec![0.0; g.weight_len()];
            conv2d_backward_weight(&g, &x, &dy_low, &mut want_p, None);
            let mut got = start.clone();
            let mut lr_p = LowRankWeightGradient::default();
            lr_p.add_output_side(&g, &x, &view(&gs));
            lr_p.add_to(&g, &mut got);
            let diff: Vec<f32> = got.iter().zip(&start).map(|(a, b)| a - b).collect();
            close(&diff, &want_p, "weight gradient (P Q)");

            // Both terms in one sweep, as the placement uses them.
            lr.add_output_side(&g, &x, &view(&gs));
            let mut got = start.clone();
            lr.add_to(&g, &mut got);
            let diff: Vec<f32> = got.iter().zip(&start).map(|(a, b)| a - b).collect();
            let want: Vec<f32> = want_u.iter().zip(&want_p).map(|(a, b)| a + b).collect();
            close(&diff, &want, "weight gradient (U V and P Q together)");

            // The input side of a gradient split as P Q + R, without rebuilding it.
            let (xv, gv) = (view(&xs), view(&gs));
            if LowRankWeightGradient::pairs_cover(&g, &xv, &gv) {
                paired += 1;
                let r = random(&mut rng, g.output_len());
                let whole: Vec<f32> = r.iter().zip(&dy_low).map(|(a, b)| a + b).collect();
                let mut want = start.clone();
                let mut lr = LowRankWeightGradient::default();
                lr.add_input_side(&g, &xv, &whole);
                lr.add_to(&g, &mut want);
                let mut got = start.clone();
                let mut lr = LowRankWeightGradient::default();
                lr.add_input_side(&g, &xv, &r);
                lr.add_low_rank_pairs(&g, &xv, &gv);
                lr.add_to(&g, &mut got);
                close(&got, &want, "weight gradient (U V against R, then P Q by pairs)");
            }
        }
        assert!(paths[0] > 0 && paths[1] > 0, "both the direct and the factored path must be exercised: {paths:?}");
        assert!(paired > 5, "the paired input side must be exercised: {paired} times");
    }
}
