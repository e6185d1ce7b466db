//! 2-D convolution (groups = 1) as im2col + GEMM, with both backward passes.
//!
//! Samples are processed in groups: each group's patches are unrolled side by side into one
//! `(C_in*kh*kw) x (group*H_out*W_out)` matrix so that late layers with tiny maps still give the GEMM
//! a wide enough right-hand side. Groups run in parallel (one single-threaded GEMM each) when there
//! are at least as many groups as threads; otherwise groups run in turn with a multi-threaded GEMM.
//! The unrolled patches are recomputed in the backward pass rather than kept: the trusted side has
//! little memory.
//!
//! Groups are sized so that each GEMM has at least 256 output columns (late VGG layers have 2x2
//! maps). Forward: `W (C_out x C_in kh kw) * patches`. Input gradient: `W^T * dY`, then [`col2im`].
//! Weight gradient: `dW^T = patches * dY^T`, then transposed (about 1.5x faster with `gemm` than
//! `dY * patches^T`). `gemm` picks its AVX-512 kernels at run time where the CPU has them (the
//! workspace enables its `x86-v4` feature).
//!
//! Convolutions with few input or few output channels (AsymML's virtual channels, a network's RGB
//! input) have variants that read the large side in place instead of unrolling it
//! ([`conv2d_backward_weight_few_inputs`], [`conv2d_backward_weight_few_outputs`],
//! [`conv2d_backward_data_few_outputs`]). Past [`FEW_INPUTS`] or [`FEW_OUTPUTS`] channels they take
//! the unrolled route themselves; where [`direct_weight_gradient_pays`], the weight gradients go to
//! [`crate::thin_conv`]'s direct correlation.
//!
//! Tried and dropped:
//! - The stride-2 `im2col`/`col2im` through a stepping iterator instead of an indexed loop: still
//!   scalar, no faster (stride-2 forward, backward-data and backward-weight on one thread 28.5-32
//!   ms either way) (2026-12-03).
//! - The few-output-channel input gradient on small maps as a column-major product with a
//!   transposing copy out: three times slower at 8x8 (2026-12-03); maps side by side lost at 8x8
//!   too (512 channels, rank 8: 0.42 -> 0.52 ms), hence only below 64 positions.
//! - The few-output-channel weight gradient `corr(X, Q)` with the input as the GEMM's right
//!   operand: 8.3 ms either way on VGG16-like layers, where the left operand (the route kept) is 2x
//!   faster (2026-12-01); reading `X` in place as that left operand: no gain (2026-12-02).
//!
//! Not yet tried:
//! - A channels-last unrolling (`HW x (kh*kw*C)`, contiguous copies from an HWC copy of the input)
//!   with a column-major output for the forward GEMM, the slowest of the three (about 70 GFLOP/s
//!   against 85-93): 93 GFLOP/s for the bare product, but two transposes per sample leave a gain of
//!   a few milliseconds.

pub use crate::geometry::ConvGeometry;
use crate::matmul::{matmul, parallelism, threads, MatRef};
use crate::thin_conv;
use gemm::Parallelism;
use rayon::prelude::*;

/// Below this many output pixels per GEMM, samples are batched into one product.
const MIN_GEMM_COLUMNS: usize = 256;

/// `w` (`A x B x k x k`) with its two leading axes swapped and each kernel rotated by 180 degrees
/// (`B x A x k x k`): the weight of the transposed convolution.
fn flipped_transpose(w: &[f32], a: usize, b: usize, k: usize) -> Vec<f32> {
    let kk = k * k;
    let mut out = vec![0.0f32; w.len()];
    for i in 0..a {
        for j in 0..b {
            let src = &w[(i * b + j) * kk..][..kk];
            let dst = &mut out[(j * a + i) * kk..][..kk];
            for (t, d) in dst.iter_mut().enumerate() {
                *d = src[kk - 1 - t];
            }
        }
    }
    out
}

/// How samples are grouped and how the work is spread over threads.
struct Plan {
    group: usize,
    threads: usize,
}

impl Plan {
    fn new(g: &ConvGeometry) -> Plan {
        let threads = threads();
        let mut group = MIN_GEMM_COLUMNS.div_ceil(g.out_pixels().max(1)).max(1);
        // Keep enough groups to occupy every thread.
        group = group.min(g.batch.div_ceil(threads)).max(1);
        Plan { group, threads }
    }
    fn groups(&self, batch: usize) -> usize {
        batch.div_ceil(self.group)
    }
    fn parallel_groups(&self, batch: usize) -> bool {
        self.threads > 1 && self.groups(batch) >= self.threads
    }
    /// GEMM parallelism inside one group.
    fn inner(&self, batch: usize) -> Parallelism {
        if self.parallel_groups(batch) {
            Parallelism::None
        } else {
            parallelism(self.threads)
        }
    }
    fn samples(&self, group_index: usize, batch: usize) -> std::ops::Range<usize> {
        let start = group_index * self.group;
        start..(start + self.group).min(batch)
    }
}

/// Runs `work(group_index, scratch)` for every group, in parallel or in turn as the plan says.
fn for_each_group<F>(plan: &Plan, batch: usize, work: F)
where
    F: Fn(usize, &mut Vec<f32>) + Sync + Send,
{
    let groups = plan.groups(batch);
    if plan.parallel_groups(batch) {
        (0..groups).into_par_iter().for_each_init(Vec::new, |scratch, i| work(i, scratch));
    } else {
        let mut scratch = Vec::new();
        for i in 0..groups {
            work(i, &mut scratch);
        }
    }
}

/// A `*mut f32` that may cross threads: each group writes a disjoint set of samples.
#[derive(Clone, Copy)]
struct SharedMut(*mut f32, usize);
unsafe impl Send for SharedMut {}
unsafe impl Sync for SharedMut {}
impl SharedMut {
    fn new(s: &mut [f32]) -> Self {
        SharedMut(s.as_mut_ptr(), s.len())
    }
    /// # Safety
    /// Callers must take disjoint ranges from different threads.
    #[allow(clippy::mut_from_ref)]
    unsafe fn range(&self, start: usize, len: usize) -> &mut [f32] {
        assert!(start + len <= self.1);
        std::slice::from_raw_parts_mut(self.0.add(start), len)
    }
}

/// Output column range `[lo, hi)` whose input column `ow*stride + k - padding` lies in `[0, size)`.
fn valid_range(out: usize, size: usize, k: usize, stride: usize, padding: usize) -> (usize, usize) {
    let lo = if padding > k { (padding - k).div_ceil(stride) } else { 0 };
    let hi = if size + padding > k { ((size + padding - k - 1) / stride + 1).min(out) } else { 0 };
    (lo.min(hi), hi)
}

/// Unrolls one sample `x` (`C x H x W`) into `cols` rows of length `row_stride`, at column `col0`:
/// row `(c, ki, kj)` holds, for each output pixel, the input value its kernel tap reads (0 in the
/// padding). Also used by the device crate's host-side lowering for BLAS-only devices.
pub fn im2col(g: &ConvGeometry, x: &[f32], cols: &mut [f32], row_stride: usize, col0: usize) {
    let (h, w, oh_n, ow_n) = (g.in_h, g.in_w, g.out_h(), g.out_w());
    let (s, p) = (g.stride, g.padding);
    for c in 0..g.in_channels {
        let plane = &x[c * h * w..(c + 1) * h * w];
        for ki in 0..g.kernel_h {
            for kj in 0..g.kernel_w {
                let r = (c * g.kernel_h + ki) * g.kernel_w + kj;
                let row = &mut cols[r * row_stride + col0..][..oh_n * ow_n];
                let (lo, hi) = valid_range(ow_n, w, kj, s, p);
                for oh in 0..oh_n {
                    let dst = &mut row[oh * ow_n..(oh + 1) * ow_n];
                    let ih = (oh * s + ki) as isize - p as isize;
                    if ih < 0 || ih >= h as isize {
                        dst.fill(0.0);
                        continue;
                    }
                    let src = &plane[ih as usize * w..(ih as usize + 1) * w];
                    dst[..lo].fill(0.0);
                    dst[hi..].fill(0.0);
                    if s == 1 && lo < hi {
                        let start = lo + kj - p;
                        dst[lo..hi].copy_from_slice(&src[start..start + hi - lo]);
                    } else {
                        for (ow, d) in dst[lo..hi].iter_mut().enumerate() {
                            *d = src[(ow + lo) * s + kj - p];
                        }
                    }
                }
            }
        }
    }
}

/// Adds unrolled patch gradients back onto one sample `dx` (`C x H x W`): the adjoint of
/// [`im2col`].
pub fn col2im(g: &ConvGeometry, cols: &[f32], row_stride: usize, col0: usize, dx: &mut [f32]) {
    let (h, w, oh_n, ow_n) = (g.in_h, g.in_w, g.out_h(), g.out_w());
    let (s, p) = (g.stride, g.padding);
    for c in 0..g.in_channels {
        let plane = &mut dx[c * h * w..(c + 1) * h * w];
        for ki in 0..g.kernel_h {
            for kj in 0..g.kernel_w {
                let r = (c * g.kernel_h + ki) * g.kernel_w + kj;
                let row = &cols[r * row_stride + col0..][..oh_n * ow_n];
                let (lo, hi) = valid_range(ow_n, w, kj, s, p);
                for oh in 0..oh_n {
                    let ih = (oh * s + ki) as isize - p as isize;
                    if ih < 0 || ih >= h as isize {
                        continue;
                    }
                    let src = &row[oh * ow_n..(oh + 1) * ow_n];
                    let dst = &mut plane[ih as usize * w..(ih as usize + 1) * w];
                    if s == 1 && lo < hi {
                        let start = lo + kj - p;
                        for (d, v) in dst[start..start + hi - lo].iter_mut().zip(&src[lo..hi]) {
                            *d += v;
                        }
                    } else {
                        for (ow, v) in src[lo..hi].iter().enumerate() {
                            dst[(ow + lo) * s + kj - p] += v;
                        }
                    }
                }
            }
        }
    }
}

/// Unrolls samples `range` of `x` into `scratch`, returning the patch matrix
/// (`patch_len x samples*out_pixels`). A pointwise conv of one sample borrows `x` instead.
fn patches<'a>(g: &ConvGeometry, x: &'a [f32], range: std::ops::Range<usize>, scratch: &'a mut Vec<f32>) -> MatRef<'a> {
    let (hw, in_len) = (g.out_pixels(), g.in_channels * g.in_h * g.in_w);
    let width = range.len() * hw;
    if g.is_pointwise() && range.len() == 1 {
        return MatRef::row_major(&x[range.start * in_len..][..in_len], g.patch_len(), width);
    }
    scratch.resize(g.patch_len() * width, 0.0);
    for (i, n) in range.enumerate() {
        im2col(g, &x[n * in_len..(n + 1) * in_len], scratch, width, i * hw);
    }
    MatRef::row_major(scratch, g.patch_len(), width)
}

/// `y = conv(x, w) + bias`. `x`: `N x C_in x H x W`, `w`: `C_out x C_in x kh x kw`,
/// `y`: `N x C_out x H_out x W_out` (overwritten).
pub fn conv2d_forward(g: &ConvGeometry, x: &[f32], w: &[f32], bias: Option<&[f32]>, y: &mut [f32]) {
    g.check();
    assert_eq!(x.len(), g.input_len(), "conv2d_forward: input length");
    assert_eq!(w.len(), g.weight_len(), "conv2d_forward: weight length");
    assert_eq!(y.len(), g.output_len(), "conv2d_forward: output length");
    if let Some(b) = bias {
        assert_eq!(b.len(), g.out_channels, "conv2d_forward: bias length");
    }
    let plan = Plan::new(g);
    let inner = plan.inner(g.batch);
    let (hw, cout) = (g.out_pixels(), g.out_channels);
    let wmat = MatRef::row_major(w, cout, g.patch_len());
    let out = SharedMut::new(y);
    for_each_group(&plan, g.batch, |gi, scratch| {
        let range = plan.samples(gi, g.batch);
        let (first, count) = (range.start, range.len());
        // SAFETY: groups cover disjoint samples, so their output ranges are disjoint.
        let y_group = unsafe { out.range(first * cout * hw, count * cout * hw) };
        let mut cols_buf = std::mem::take(scratch);
        let cols = patches(g, x, range, &mut cols_buf);
        if count == 1 {
            matmul(wmat, cols, y_group, hw, false, inner);
        } else {
            // The product's columns run sample by sample; scatter them into NCHW.
            let mut tmp = vec![0.0f32; cout * count * hw];
            matmul(wmat, cols, &mut tmp, count * hw, false, inner);
            for s in 0..count {
                for co in 0..cout {
                    y_group[(s * cout + co) * hw..][..hw].copy_from_slice(&tmp[co * count * hw + s * hw..][..hw]);
                }
            }
        }
        if let Some(b) = bias {
            for (i, plane) in y_group.chunks_mut(hw).enumerate() {
                let bv = b[i % cout];
                plane.iter_mut().for_each(|v| *v += bv);
            }
        }
        *scratch = cols_buf;
    });
}

/// Gathers `dy` of samples `range` into a `C_out x samples*out_pixels` matrix (borrowed for one sample).
fn output_grad_matrix<'a>(
    g: &ConvGeometry,
    dy: &'a [f32],
    range: std::ops::Range<usize>,
    buf: &'a mut Vec<f32>,
) -> MatRef<'a> {
    let (hw, cout, count) = (g.out_pixels(), g.out_channels, range.len());
    if count == 1 {
        return MatRef::row_major(&dy[range.start * cout * hw..][..cout * hw], cout, hw);
    }
    buf.resize(cout * count * hw, 0.0);
    for (s, n) in range.enumerate() {
        for co in 0..cout {
            buf[co * count * hw + s * hw..][..hw].copy_from_slice(&dy[(n * cout + co) * hw..][..hw]);
        }
    }
    MatRef::row_major(buf, cout, count * hw)
}

/// Input gradient: `dx = conv_transpose(dy, w)`. `dx` is overwritten.
pub fn conv2d_backward_data(g: &ConvGeometry, dy: &[f32], w: &[f32], dx: &mut [f32]) {
    g.check();
    assert_eq!(dy.len(), g.output_len(), "conv2d_backward_data: output-gradient length");
    assert_eq!(w.len(), g.weight_len(), "conv2d_backward_data: weight length");
    assert_eq!(dx.len(), g.input_len(), "conv2d_backward_data: input-gradient length");
    if let Some(t) = g.transposed() {
        let wt = flipped_transpose(w, g.out_channels, g.in_channels, g.kernel_h);
        return conv2d_forward(&t, dy, &wt, None, dx);
    }
    let plan = Plan::new(g);
    let inner = plan.inner(g.batch);
    let (hw, in_len) = (g.out_pixels(), g.in_channels * g.in_h * g.in_w);
    let wt = MatRef::row_major(w, g.out_channels, g.patch_len()).t();
    let out = SharedMut::new(dx);
    for_each_group(&plan, g.batch, |gi, scratch| {
        let range = plan.samples(gi, g.batch);
        let (first, count) = (range.start, range.len());
        // SAFETY: groups cover disjoint samples.
        let dx_group = unsafe { out.range(first * in_len, count * in_len) };
        let mut gathered = Vec::new();
        let dy_mat = output_grad_matrix(g, dy, range, &mut gathered);
        if g.is_pointwise() && count == 1 {
            matmul(wt, dy_mat, dx_group, hw, false, inner);
            return;
        }
        let width = count * hw;
        scratch.resize(g.patch_len() * width, 0.0);
        matmul(wt, dy_mat, scratch, width, false, inner);
        dx_group.fill(0.0);
        for s in 0..count {
            col2im(g, scratch, width, s * hw, &mut dx_group[s * in_len..(s + 1) * in_len]);
        }
    });
}

/// Weight (and bias) gradients: `dw = sum_n dy_n * patches(x_n)^T`, `dbias = sum dy`; with few
/// input channels (a network's RGB input) by [`thin_conv`] where it fits. `dw` and `dbias` are
/// overwritten.
pub fn conv2d_backward_weight(g: &ConvGeometry, x: &[f32], dy: &[f32], dw: &mut [f32], dbias: Option<&mut [f32]>) {
    g.check();
    assert_eq!(x.len(), g.input_len(), "conv2d_backward_weight: input length");
    assert_eq!(dy.len(), g.output_len(), "conv2d_backward_weight: output-gradient length");
    assert_eq!(dw.len(), g.weight_len(), "conv2d_backward_weight: weight-gradient length");
    if thin_conv::fits(g, g.in_channels) {
        thin_conv::backward_weight_few_inputs(g, x, dy, dw);
        if let Some(db) = dbias {
            bias_gradient(g, dy, db);
        }
        return;
    }
    if let Some(t) = g.transposed() {
        // The transposed convolution maps dy to x, so its weight gradient pairs them the other way.
        let mut dw_t = vec![0.0f32; dw.len()];
        conv2d_backward_weight(&t, dy, x, &mut dw_t, None);
        dw.copy_from_slice(&flipped_transpose(&dw_t, g.in_channels, g.out_channels, g.kernel_h));
        if let Some(db) = dbias {
            bias_gradient(g, dy, db);
        }
        return;
    }
    let plan = Plan::new(g);
    let inner = plan.inner(g.batch);
    let (cout, plen) = (g.out_channels, g.patch_len());
    // Accumulate dw^T = patches * dy^T (patch_len x C_out): with the unrolled patches as the
    // left operand this product measured about 1.5x faster than dy * patches^T.
    let accumulate_group = |gi: usize, acc: &mut [f32], scratch: &mut Vec<f32>, first: bool| {
        let range = plan.samples(gi, g.batch);
        let mut gathered = Vec::new();
        let dy_mat = output_grad_matrix(g, dy, range.clone(), &mut gathered);
        let cols = patches(g, x, range, scratch);
        matmul(cols, dy_mat.t(), acc, cout, !first, inner);
    };
    let groups = plan.groups(g.batch);
    let dw_t = if plan.parallel_groups(g.batch) {
        // One partial sum per thread over a fixed, contiguous run of groups, added up in order:
        // the result does not depend on how rayon schedules the work.
        let per_thread = groups.div_ceil(plan.threads);
        let partials: Vec<Vec<f32>> = (0..plan.threads)
            .into_par_iter()
            .map(|t| {
                let (mut acc, mut scratch) = (vec![0.0f32; cout * plen], Vec::new());
                let mine = t * per_thread..((t + 1) * per_thread).min(groups);
                for gi in mine.clone() {
                    accumulate_group(gi, &mut acc, &mut scratch, gi == mine.start);
                }
                acc
            })
            .collect();
        partials
            .into_iter()
            .reduce(|mut a, b| {
                a.iter_mut().zip(&b).for_each(|(x, y)| *x += y);
                a
            })
            .expect("at least one thread")
    } else {
        let (mut acc, mut scratch) = (vec![0.0f32; cout * plen], Vec::new());
        for gi in 0..groups {
            accumulate_group(gi, &mut acc, &mut scratch, gi == 0);
        }
        acc
    };
    transpose_into(&dw_t, plen, cout, dw);
    if let Some(db) = dbias {
        bias_gradient(g, dy, db);
    }
}

/// [`conv2d_backward_weight`] (without the bias) for a convolution with few input channels, such
/// as AsymML's virtual channels: per sample `dw += dy_n * patches(x_n)^T` with `dy_n` read in place
/// as the left operand, so the large side is neither gathered nor read through a transposed view;
/// only the small patch matrix is unrolled. Past [`FEW_INPUTS`] input channels it takes the
/// unrolled route, which wins there; where [`direct_weight_gradient_pays`], the direct AVX-512
/// correlation.
/// `dw` is overwritten.
pub fn conv2d_backward_weight_few_inputs(g: &ConvGeometry, x: &[f32], dy: &[f32], dw: &mut [f32]) {
    if g.in_channels > FEW_INPUTS {
        return conv2d_backward_weight(g, x, dy, dw, None);
    }
    g.check();
    assert_eq!(x.len(), g.input_len(), "conv2d_backward_weight_few_inputs: input length");
    assert_eq!(dy.len(), g.output_len(), "conv2d_backward_weight_few_inputs: output-gradient length");
    assert_eq!(dw.len(), g.weight_len(), "conv2d_backward_weight_few_inputs: weight-gradient length");
    if direct_weight_gradient_pays(g, false) {
        return thin_conv::backward_weight_few_inputs(g, x, dy, dw);
    }
    backward_weight_few_inputs_by_gemm(g, x, dy, dw);
}

/// The direct correlation ([`thin_conv`]) beats the GEMM route on its shapes up to this many thin
/// channels; past it, only on maps of at least [`DIRECT_MIN_POSITIONS`]. One thread, batch 32,
/// 8 thin channels (`cargo run --release -p trustsplit-kernels --example thin_conv`): on 4x4 maps
/// and 512 wide channels the GEMM route took 0.34-0.44 ms against the direct route's 0.41-0.55
/// on both an AVX-512 Xeon and an AMD EPYC; on 32x32 maps the direct route wins by 1.4-3x.
const DIRECT_MAX_THIN_ON_ANY_MAP: usize = 4;
/// Positions (16x16) from which the direct route is taken at any thin count. On 8x8 maps which
/// route wins depends on the machine (the GEMM one by up to 20% on the Xeon, the direct one by
/// 3-19% on the EPYC); on 16x16 at 128 wide channels the direct one won on the EPYC (1.1-1.2
/// against 1.5-1.6 ms) and tied on the Xeon.
const DIRECT_MIN_POSITIONS: usize = 256;

/// Whether [`conv2d_backward_weight_few_outputs`] (`few_outputs`) or
/// [`conv2d_backward_weight_few_inputs`] takes [`thin_conv`]'s direct route for `g`.
pub fn direct_weight_gradient_pays(g: &ConvGeometry, few_outputs: bool) -> bool {
    let thin = if few_outputs { g.out_channels } else { g.in_channels };
    thin_conv::fits(g, thin) && (thin <= DIRECT_MAX_THIN_ON_ANY_MAP || g.in_h * g.in_w >= DIRECT_MIN_POSITIONS)
}

/// [`conv2d_backward_weight_few_inputs`] without the direct route (public for the benchmark that
/// compares the two: `cargo run --release -p trustsplit-kernels --example thin_conv`).
#[doc(hidden)]
pub fn backward_weight_few_inputs_by_gemm(g: &ConvGeometry, x: &[f32], dy: &[f32], dw: &mut [f32]) {
    let (hw, cout, plen) = (g.out_pixels(), g.out_channels, g.patch_len());
    let in_len = g.in_channels * g.in_h * g.in_w;
    let par = parallelism(threads());
    let mut cols = vec![0.0f32; plen * hw];
    dw.fill(0.0);
    for n in 0..g.batch {
        im2col(g, &x[n * in_len..(n + 1) * in_len], &mut cols, hw, 0);
        let dy_n = MatRef::row_major(&dy[n * cout * hw..][..cout * hw], cout, hw);
        matmul(dy_n, MatRef::row_major(&cols, plen, hw).t(), dw, plen, true, par);
    }
}

/// Spreads one sample's output gradient `dy_n` (`C_out x H' x W'`) to the input positions each
/// kernel tap read: row `(o, ki, kj)` of `spread` (`C_out kh kw x H W`) holds at input position
/// `q` the gradient of the output that tap `(ki, kj)` read from `q`. A tap reads each input
/// position for at most one output, so this is the transpose of im2col's pattern without its
/// sums. Row `r` starts at `r * row_stride + col0` (as in [`im2col`], so that several samples can
/// lie side by side). Positions no tap reaches are left as they are (the caller zeroes them once:
/// they are the same for every sample).
fn spread_output_gradient(g: &ConvGeometry, dy_n: &[f32], spread: &mut [f32], row_stride: usize, col0: usize) {
    let (h, w, oh_n, ow_n) = (g.in_h, g.in_w, g.out_h(), g.out_w());
    let (s, p, in_hw, out_hw) = (g.stride, g.padding, h * w, oh_n * ow_n);
    for o in 0..g.out_channels {
        for ki in 0..g.kernel_h {
            for kj in 0..g.kernel_w {
                let row = &mut spread[((o * g.kernel_h + ki) * g.kernel_w + kj) * row_stride + col0..][..in_hw];
                let (lo, hi) = valid_range(ow_n, w, kj, s, p);
                for oh in 0..oh_n {
                    let ih = (oh * s + ki) as isize - p as isize;
                    if ih < 0 || ih >= h as isize {
                        continue;
                    }
                    let src = &dy_n[o * out_hw + oh * ow_n..][..ow_n];
                    let dst = &mut row[ih as usize * w..(ih as usize + 1) * w];
                    if s == 1 && lo < hi {
                        // One contiguous copy (the indexed loop below did not vectorise, and was
                        // 40% of a 64-channel 32x32 input gradient's time).
                        dst[lo + kj - p..hi + kj - p].copy_from_slice(&src[lo..hi]);
                    } else {
                        for ow in lo..hi {
                            dst[ow * s + kj - p] = src[ow];
                        }
                    }
                }
            }
        }
    }
}

/// Up to this many input channels [`conv2d_backward_weight_few_inputs`] beats the unrolled route
/// (single thread, ResNet18-like layers: 2.4 vs 10.0 ms at 2 channels, 25.6 vs 29.3 at 16, 49.8
/// vs 35.9 at 32); past it the function takes the unrolled route.
pub const FEW_INPUTS: usize = 16;

/// Up to this many output channels the few-outputs products beat the unrolled route (single
/// thread, ResNet18-like layers, weight gradient: 3.9 vs 13.5 ms at 2 channels, 6.7 vs 13.5 at 4,
/// 10.4 vs 11.5 at 8, 19.3 vs 14.6 at 16); past it they take the unrolled route.
pub const FEW_OUTPUTS: usize = 8;

/// `src` (`a x b x kk`) with its two leading axes swapped, into `dst` (`b x a x kk`).
fn swap_leading_axes(src: &[f32], a: usize, b: usize, kk: usize, dst: &mut [f32]) {
    for i in 0..a {
        for j in 0..b {
            dst[(j * a + i) * kk..][..kk].copy_from_slice(&src[(i * b + j) * kk..][..kk]);
        }
    }
}

/// [`conv2d_backward_weight`] (without the bias) for a convolution with few output channels, such
/// as AsymML's virtual output channels: per sample `acc += x_n * spread_n^T`, with `x_n` read in
/// place as the left operand and only the small output gradient spread out, so the large input
/// is never unrolled. Past [`FEW_OUTPUTS`] output channels it takes the unrolled route; where
/// [`direct_weight_gradient_pays`], the direct AVX-512 correlation. `dw` is overwritten.
pub fn conv2d_backward_weight_few_outputs(g: &ConvGeometry, x: &[f32], dy: &[f32], dw: &mut [f32]) {
    if g.out_channels > FEW_OUTPUTS {
        return conv2d_backward_weight(g, x, dy, dw, None);
    }
    g.check();
    assert_eq!(x.len(), g.input_len(), "conv2d_backward_weight_few_outputs: input length");
    assert_eq!(dy.len(), g.output_len(), "conv2d_backward_weight_few_outputs: output-gradient length");
    assert_eq!(dw.len(), g.weight_len(), "conv2d_backward_weight_few_outputs: weight-gradient length");
    if direct_weight_gradient_pays(g, true) {
        return thin_conv::backward_weight_few_outputs(g, x, dy, dw);
    }
    backward_weight_few_outputs_by_gemm(g, x, dy, dw);
}

/// [`conv2d_backward_weight_few_outputs`] without the direct route (public for the benchmark).
#[doc(hidden)]
pub fn backward_weight_few_outputs_by_gemm(g: &ConvGeometry, x: &[f32], dy: &[f32], dw: &mut [f32]) {
    let (c, kk, in_hw) = (g.in_channels, g.kernel_h * g.kernel_w, g.in_h * g.in_w);
    let rows = g.out_channels * kk;
    let mut spread = vec![0.0f32; rows * in_hw];
    let mut acc = vec![0.0f32; c * rows];
    let per_sample = g.out_channels * g.out_pixels();
    for n in 0..g.batch {
        spread_output_gradient(g, &dy[n * per_sample..][..per_sample], &mut spread, in_hw, 0);
        let x_n = MatRef::row_major(&x[n * c * in_hw..][..c * in_hw], c, in_hw);
        matmul(x_n, MatRef::row_major(&spread, rows, in_hw).t(), &mut acc, rows, n > 0, parallelism(threads()));
    }
    // acc is C_in x C_out x tap; dw is C_out x C_in x tap.
    swap_leading_axes(&acc, c, g.out_channels, kk, dw);
}

/// The fewest columns [`conv2d_backward_data_few_outputs`] gives one product: samples with smaller
/// maps are laid side by side and copied out after it. One thread, 32 samples of 512 channels at
/// rank 8: 0.39 -> 0.11 ms at 2x2, 0.36 -> 0.27 ms at 4x4; at 8x8 (64 positions) grouping four
/// samples lost (0.42 -> 0.52 ms: the copy out cost more than the wider product saved).
const MIN_PRODUCT_COLUMNS: usize = 64;

/// [`conv2d_backward_data`] for a convolution with few output channels: `dx_n = W' spread_n` with
/// `W'` the weight as `C_in x (C_out, tap)`, written straight into `dx` instead of through a
/// `C_in kh kw x H' W'` column matrix and col2im (samples with small maps side by side in one
/// product, copied out after it). Past [`FEW_OUTPUTS`] output channels it takes the unrolled
/// route. `dx` is overwritten.
pub fn conv2d_backward_data_few_outputs(g: &ConvGeometry, dy: &[f32], w: &[f32], dx: &mut [f32]) {
    if g.out_channels > FEW_OUTPUTS {
        return conv2d_backward_data(g, dy, w, dx);
    }
    g.check();
    assert_eq!(dy.len(), g.output_len(), "conv2d_backward_data_few_outputs: output-gradient length");
    assert_eq!(w.len(), g.weight_len(), "conv2d_backward_data_few_outputs: weight length");
    assert_eq!(dx.len(), g.input_len(), "conv2d_backward_data_few_outputs: input-gradient length");
    if g.batch == 0 {
        return;
    }
    let (c, kk, in_hw) = (g.in_channels, g.kernel_h * g.kernel_w, g.in_h * g.in_w);
    let rows = g.out_channels * kk;
    let mut w_t = vec![0.0f32; c * rows];
    swap_leading_axes(w, g.out_channels, c, kk, &mut w_t);
    let w_t = MatRef::row_major(&w_t, c, rows);
    let group = MIN_PRODUCT_COLUMNS.div_ceil(in_hw).min(g.batch);
    let width = group * in_hw;
    let mut spread = vec![0.0f32; rows * width];
    let mut side_by_side = vec![0.0f32; if group > 1 { c * width } else { 0 }];
    let per_sample = g.out_channels * g.out_pixels();
    for first in (0..g.batch).step_by(group) {
        let samples = group.min(g.batch - first);
        for k in 0..samples {
            let n = first + k;
            spread_output_gradient(g, &dy[n * per_sample..][..per_sample], &mut spread, width, k * in_hw);
        }
        // The last group may be partial: its product reads only its own columns.
        let spread_m = MatRef { data: &spread, rows, cols: samples * in_hw, row_stride: width, col_stride: 1 };
        let par = parallelism(threads());
        if group == 1 {
            matmul(w_t, spread_m, &mut dx[first * c * in_hw..][..c * in_hw], in_hw, false, par);
            continue;
        }
        matmul(w_t, spread_m, &mut side_by_side, width, false, par);
        for k in 0..samples {
            let dx_n = &mut dx[(first + k) * c * in_hw..][..c * in_hw];
            for (ch, plane) in dx_n.chunks_exact_mut(in_hw).enumerate() {
                plane.copy_from_slice(&side_by_side[ch * width + k * in_hw..][..in_hw]);
            }
        }
    }
}

/// Writes the transpose of the row-major `rows x cols` matrix `a` into `out` (`cols x rows`),
/// tile by tile so that both sides stay in cache (an element-by-element strided write measured
/// most of the backward-weight pass outside its GEMM for 512-channel layers).
fn transpose_into(a: &[f32], rows: usize, cols: usize, out: &mut [f32]) {
    const TILE: usize = 32;
    assert_eq!(a.len(), rows * cols, "transpose: input length");
    assert_eq!(out.len(), rows * cols, "transpose: output length");
    for r0 in (0..rows).step_by(TILE) {
        for c0 in (0..cols).step_by(TILE) {
            for c in c0..(c0 + TILE).min(cols) {
                for r in r0..(r0 + TILE).min(rows) {
                    out[c * rows + r] = a[r * cols + c];
                }
            }
        }
    }
}

/// `db = sum of dy` per output channel (overwritten).
fn bias_gradient(g: &ConvGeometry, dy: &[f32], db: &mut [f32]) {
    assert_eq!(db.len(), g.out_channels, "conv2d_backward_weight: bias-gradient length");
    crate::elementwise::channel_sums(dy, g.out_channels, g.out_pixels(), db);
}

#[cfg(test)]
mod tests {
    use super::transpose_into;

    #[test]
    fn tiled_transpose_matches_the_definition_across_tile_edges() {
        for (rows, cols) in [(1, 1), (1, 70), (70, 1), (31, 33), (64, 32), (70, 45), (97, 130)] {
            let a: Vec<f32> = (0..rows * cols).map(|i| (i as f32 * 0.37).sin()).collect();
            let mut out = vec![f32::NAN; rows * cols];
            transpose_into(&a, rows, cols, &mut out);
            for r in 0..rows {
                for c in 0..cols {
                    assert_eq!(out[c * rows + r], a[r * cols + c], "{rows}x{cols} at ({r}, {c})");
                }
            }
        }
    }
}
