//! Weight gradients of 3x3 "same" convolutions (stride 1, padding 1) in which one side has only a
//! few channels, such as AsymML's products on r virtual channels or a network's RGB input,
//! computed directly with AVX-512 instead of through unrolled patches and a GEMM.
//!
//! With a few channels on one side the GEMM's output is a thin `C x 9r` matrix and it spends its
//! time packing and in short loops. Both weight gradients are instead one correlation of a "wide"
//! tensor (many channels, read once, in place) with a "thin" one at the nine tap offsets
//! `off_t = (ki - 1) W + (kj - 1)` of a plane flattened row by row:
//! `acc[c, j, t] = sum_p wide[c, p] thin[j, p + off_t]`, the sums kept in registers.
//!
//! The thin side is copied once into zero-guarded planes (`W + 1` zeros before and after each
//! plane), so the taps that fall above or below the plane read zeros; the taps that would wrap
//! around a row's left or right edge are masked off lane by lane. Planes need `H W` a multiple of
//! 16 and `W` a multiple or a divisor of 16 (every map of VGG and ResNet on 32x32 inputs from 4x4
//! up); [`fits`] says when a geometry qualifies, and callers take the GEMM route otherwise.
//!
//! Up to [`MAX_THIN_CHANNELS`] channels count as thin. One thin plane is correlated with three wide
//! rows at a time: 27 sums (3 rows x 9 taps) in registers. The GEMM route takes what does not fit
//! (stride 2, 1x1 kernels, maps under 16 positions, no AVX-512) and, where both apply, whatever
//! [`crate::conv::direct_weight_gradient_pays`] says it does faster (more than 4 thin channels on
//! maps under 16x16). Both routes are checked against naive loops.
//!
//! The forward pass and the input gradient were tried the same way (weights broadcast against
//! shifted planes) and dropped: no faster than the GEMM route at 1 thread, and 2-4x slower at 32x32
//! where the channels' 4 KiB distance aliases in the store buffer (34 against 72 G multiply-adds/s, 2026-12-02).
//!
//! Tried and dropped:
//! - Walking the correlation sample by sample (wide tensor in memory order, sums parked in a buffer
//!   between samples): 0.98x of the GEMM route overall, slower on maps of 64 positions or fewer
//!   (2026-12-02).
//! - Writing the direct forward and input-gradient products four vectors of two channels at a time
//!   (against the store-buffer aliasing above): helped at 32x32, lost at 8x8 and 4x4, where too few
//!   accumulators hide the FMA latency (2026-12-02).
//! - A 4 x 4 block of dot products in registers across a group of samples (`C += sum_s A_s B_s^T`)
//!   for the thin weight gradients: 14.7-16.1 against `gemm`'s 15.0-16.8 ms for VGG16's thirteen
//!   layers' three products, faster at 32x32 (0.5 against 0.85 ms), slower at 4x4, bound by
//!   reloading the small operand from L2 (2026-12-02).
//! - The direct route for every shape it fits: at 8 thin channels on 4x4 maps (512 wide channels)
//!   the GEMM route is about 20% faster on a Zen 5 and on a Xeon, hence
//!   `conv::direct_weight_gradient_pays` (2026-12-03).
//!
//! Not yet tried:
//! - ResNet18's stride-2 and 1x1 convolutions on this kernel: through a zero-interleaved thin plane
//!   (4x the multiply-adds), or by splitting a stride-2 input into its four phases (even/odd rows
//!   and columns), which turns each product into 1-, 2- and 4-tap stride-1 correlations; their
//!   low-rank products are about a tenth of ResNet18's best-setting enclave time (2026-12-03).

use crate::geometry::ConvGeometry;
use crate::matmul::threads;
use rayon::prelude::*;

/// Vector width in f32 lanes.
const LANES: usize = 16;

/// Wide channels per correlation block: 3 x 9 accumulators fill 27 of the 32 vector registers.
const ROW_BLOCK: usize = 3;

/// Up to this many channels count as "few" (the GEMM route wins past it: `--example thin_conv`).
pub const MAX_THIN_CHANNELS: usize = 8;

/// The nine taps' flat offsets for rows of `w`, and which column (0, 1, 2) each reads.
fn tap_offsets(w: usize) -> [(isize, usize); 9] {
    let w = w as isize;
    std::array::from_fn(|t| (((t / 3) as isize - 1) * w + (t % 3) as isize - 1, t % 3))
}

/// Whether the direct products apply to `g` with `thin` channels on the few-channel side: a 3x3
/// stride-1 padding-1 convolution, plane sizes as the module says, and a CPU with AVX-512.
pub fn fits(g: &ConvGeometry, thin: usize) -> bool {
    let shape = g.kernel_h == 3
        && g.kernel_w == 3
        && g.stride == 1
        && g.padding == 1
        && (g.in_h * g.in_w).is_multiple_of(LANES)
        && (g.in_w.is_multiple_of(LANES) || LANES.is_multiple_of(g.in_w));
    shape && (1..=MAX_THIN_CHANNELS).contains(&thin) && avx512_available()
}

fn avx512_available() -> bool {
    #[cfg(target_arch = "x86_64")]
    {
        is_x86_feature_detected!("avx512f")
    }
    #[cfg(not(target_arch = "x86_64"))]
    {
        false
    }
}

/// Zeros before (and after) each guarded plane of rows of `w`: every tap above or below the
/// plane, `W + 1` positions away at most, lands in them.
fn guard(w: usize) -> usize {
    w + 1
}

/// The thin side of a batch (`planes` planes of `positions` values, one after the other) copied
/// into zero-guarded planes; returns the buffer and the distance between planes.
fn guarded_planes(thin: &[f32], positions: usize, w: usize) -> (Vec<f32>, usize) {
    let guard = guard(w);
    let stride = positions + 2 * guard;
    let planes = thin.len() / positions;
    let mut out = vec![0.0f32; planes * stride];
    for (dst, src) in out.chunks_exact_mut(stride).zip(thin.chunks_exact(positions)) {
        dst[guard..guard + positions].copy_from_slice(src);
    }
    (out, stride)
}

/// A plane's shape.
#[derive(Clone, Copy)]
struct Plane {
    h: usize,
    w: usize,
}

impl Plane {
    fn positions(self) -> usize {
        self.h * self.w
    }
}

/// `acc[c, j, t] = sum_{n, p} wide[n, c, p] thin[n, j, p + off_t]` (overwritten), `acc` being
/// `C x J x 3 x 3`.
fn correlate_batch(plane: Plane, wide: &[f32], c: usize, thin: &[f32], j: usize, acc: &mut [f32]) {
    let p = plane.positions();
    assert_eq!(acc.len(), c * j * 9, "correlate: acc is not C x J x 3 x 3");
    assert_eq!(wide.len() % (c * p), 0, "correlate: wide side is not N x C x H x W");
    let n = wide.len() / (c * p);
    assert_eq!(thin.len(), n * j * p, "correlate: thin side is not N x J x H x W");
    let (guarded, stride) = guarded_planes(thin, p, plane.w);
    // Channels in blocks; each block's rows of `acc` are its own, so blocks may run in parallel.
    let per_block = |(b, out): (usize, &mut [f32])| {
        // SAFETY: `fits` checked AVX-512 and the plane shape; the slices have the lengths asserted.
        #[cfg(target_arch = "x86_64")]
        unsafe {
            avx512::correlate(plane, wide, c, n, b * ROW_BLOCK, &guarded, stride, j, out)
        }
    };
    if threads() > 1 && c > ROW_BLOCK {
        acc.par_chunks_mut(ROW_BLOCK * j * 9).enumerate().for_each(per_block);
    } else {
        acc.chunks_mut(ROW_BLOCK * j * 9).enumerate().for_each(per_block);
    }
}

fn plane_of(g: &ConvGeometry) -> Plane {
    Plane { h: g.in_h, w: g.in_w }
}

/// The weight gradient `dw[o, i, t] = sum_{n, p} dy[n, o, p] x[n, i, p + off_t]` for a convolution
/// with few input channels: `dw` is overwritten.
pub fn backward_weight_few_inputs(g: &ConvGeometry, x: &[f32], dy: &[f32], dw: &mut [f32]) {
    assert!(fits(g, g.in_channels), "thin_conv::backward_weight_few_inputs: geometry does not fit");
    correlate_batch(plane_of(g), dy, g.out_channels, x, g.in_channels, dw);
}

/// The weight gradient for a convolution with few output channels: `dw[o, i, t] = sum_{n, q}
/// x[n, i, q] dy[n, o, q - off_t]`, i.e. the correlation of `x` with `dy` at tap `8 - t`.
/// `dw` is overwritten.
pub fn backward_weight_few_outputs(g: &ConvGeometry, x: &[f32], dy: &[f32], dw: &mut [f32]) {
    assert!(fits(g, g.out_channels), "thin_conv::backward_weight_few_outputs: geometry does not fit");
    let (co, ci) = (g.out_channels, g.in_channels);
    let mut acc = vec![0.0f32; dw.len()]; // C_in x C_out x 3 x 3
    correlate_batch(plane_of(g), x, ci, dy, co, &mut acc);
    for o in 0..co {
        for i in 0..ci {
            let (src, dst) = (&acc[(i * co + o) * 9..][..9], &mut dw[(o * ci + i) * 9..][..9]);
            for t in 0..9 {
                dst[t] = src[8 - t];
            }
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod avx512 {
    use super::{guard, tap_offsets, Plane, LANES, ROW_BLOCK};
    use std::arch::x86_64::*;

    /// For each vector of a plane row (`max(W / 16, 1)` of them, a period the positions repeat
    /// with), the lanes whose tap column stays inside the row: column 0 (left neighbour) drops the
    /// lanes at a row's start, column 2 those at its end.
    fn edge_masks(w: usize) -> Vec<[__mmask16; 3]> {
        (0..(w / LANES).max(1))
            .map(|v| {
                let (mut first, mut last) = (0u16, 0u16);
                for lane in 0..LANES {
                    let col = (v * LANES + lane) % w;
                    first |= u16::from(col == 0) << lane;
                    last |= u16::from(col == w - 1) << lane;
                }
                [!first, u16::MAX, !last]
            })
            .collect()
    }

    /// Runs `body(p0, masks)` for every vector of `p` positions, in order.
    #[inline(always)]
    unsafe fn for_each_vector(p: usize, masks: &[[__mmask16; 3]], mut body: impl FnMut(usize, &[__mmask16; 3])) {
        let period = masks.len() * LANES;
        for start in (0..p).step_by(period) {
            for (v, m) in masks.iter().enumerate() {
                body(start + v * LANES, m);
            }
        }
    }

    /// [`super::correlate_batch`] for the wide channels `c0 .. c0 + ROW_BLOCK` (fewer at the end):
    /// `acc` is their rows (`rows x J x 9`), `wide` the whole batch (`n x c x P`), `guarded` the
    /// batch's guarded thin planes (`n x j`, `stride` apart).
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    pub(super) unsafe fn correlate(
        plane: Plane,
        wide: &[f32],
        c: usize,
        n: usize,
        c0: usize,
        guarded: &[f32],
        stride: usize,
        j: usize,
        acc: &mut [f32],
    ) {
        let (rows, p) = (acc.len() / (j * 9), plane.positions());
        // The last block may have fewer rows: it repeats its last one and drops those sums.
        let wide_rows = |s: usize| [0, 1, 2].map(|r| wide.as_ptr().add((s * c + c0 + r.min(rows - 1)) * p));
        for jj in 0..j {
            let thin_plane = |s: usize| guarded.as_ptr().add((s * j + jj) * stride + guard(plane.w));
            let sums = correlate_rows(plane, n, wide_rows, thin_plane);
            for (r, row) in sums.iter().take(rows).enumerate() {
                for (t, v) in row.iter().enumerate() {
                    acc[(r * j + jj) * 9 + t] = _mm512_reduce_add_ps(*v);
                }
            }
        }
    }

    /// Sums over every sample and position of wide row `r` times the thin plane at tap `t`, in
    /// 16 lanes: `[r][t]`. One thin plane against three wide rows: 27 accumulators, and each tap
    /// load (two thirds of them split across cache lines) serves three multiply-adds; with more
    /// thin planes at once fewer rows fit and the tap loads bound the loop (measured slower).
    #[inline(always)]
    unsafe fn correlate_rows(
        plane: Plane,
        n: usize,
        wide_rows: impl Fn(usize) -> [*const f32; ROW_BLOCK],
        thin_plane: impl Fn(usize) -> *const f32,
    ) -> [[__m512; 9]; ROW_BLOCK] {
        let (p, offsets, masks) = (plane.positions(), tap_offsets(plane.w), edge_masks(plane.w));
        let mut sums = [[_mm512_setzero_ps(); 9]; ROW_BLOCK];
        for s in 0..n {
            let (rows, base) = (wide_rows(s), thin_plane(s));
            for_each_vector(p, &masks, |p0, masks| {
                let wide = rows.map(|row| _mm512_loadu_ps(row.add(p0)));
                for (t, &(off, col)) in offsets.iter().enumerate() {
                    let at = base.offset(p0 as isize + off);
                    // The centre column never crosses a row's edge.
                    let tap = if col == 1 { _mm512_loadu_ps(at) } else { _mm512_maskz_loadu_ps(masks[col], at) };
                    for (sum, w) in sums.iter_mut().zip(&wide) {
                        sum[t] = _mm512_fmadd_ps(*w, tap, sum[t]);
                    }
                }
            });
        }
        sums
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

    fn close(got: &[f32], want: &[f64], what: &str) {
        let scale = want.iter().fold(1e-3f64, |m, v| m.max(v.abs()));
        for (i, (a, b)) in got.iter().zip(want).enumerate() {
            assert!((f64::from(*a) - b).abs() <= 1e-5 * scale, "{what}[{i}]: {a} vs {b} (scale {scale})");
        }
    }

    /// Random geometries the module takes: every plane width it supports, both thin sides.
    fn geometry(rng: &mut ChaCha8Rng) -> ConvGeometry {
        let (h, w) = [(1, 16), (4, 4), (2, 8), (8, 8), (16, 1), (3, 16), (2, 32), (16, 16), (8, 2), (32, 32)]
            [rng.random_range(0..10)];
        let (thin, wide) = (rng.random_range(1..=MAX_THIN_CHANNELS), rng.random_range(1..20));
        let (in_channels, out_channels) = if rng.random_bool(0.5) { (thin, wide) } else { (wide, thin) };
        ConvGeometry {
            batch: rng.random_range(1..4),
            in_channels,
            out_channels,
            in_h: h,
            in_w: w,
            kernel_h: 3,
            kernel_w: 3,
            stride: 1,
            padding: 1,
        }
    }

    #[test]
    fn weight_gradients_match_naive_loops() {
        if !avx512_available() {
            eprintln!("no AVX-512 on this CPU: the direct products are never used, nothing to check");
            return;
        }
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        for round in 0..120 {
            let g = geometry(&mut rng);
            let (x, dy) = (random(&mut rng, g.input_len()), random(&mut rng, g.output_len()));
            let what = format!("round {round}, {g:?}");
            if fits(&g, g.in_channels) {
                let mut dw = random(&mut rng, g.weight_len()); // overwritten
                backward_weight_few_inputs(&g, &x, &dy, &mut dw);
                close(&dw, &naive_weight_gradient(&g, &x, &dy), &format!("few inputs, {what}"));
            }
            if fits(&g, g.out_channels) {
                let mut dw = random(&mut rng, g.weight_len());
                backward_weight_few_outputs(&g, &x, &dy, &mut dw);
                close(&dw, &naive_weight_gradient(&g, &x, &dy), &format!("few outputs, {what}"));
            }
        }
    }

    /// `dw[o, i, t] = sum dy[n, o, p] x[n, i, p + off_t]` by naive loops in f64.
    fn naive_weight_gradient(g: &ConvGeometry, x: &[f32], dy: &[f32]) -> Vec<f64> {
        let mut dw = vec![0.0f64; g.weight_len()];
        for_each_term(g, |y_at, x_at, w_at| dw[w_at] += f64::from(dy[y_at]) * f64::from(x[x_at]));
        dw
    }

    /// Calls `term(y index, x index, w index)` for every product `w * x` the forward pass sums.
    fn for_each_term(g: &ConvGeometry, mut term: impl FnMut(usize, usize, usize)) {
        let (hh, ww, ci, co) = (g.in_h as isize, g.in_w as isize, g.in_channels, g.out_channels);
        for n in 0..g.batch {
            for o in 0..co {
                for h in 0..hh {
                    for x0 in 0..ww {
                        for i in 0..ci {
                            for ki in 0..3isize {
                                for kj in 0..3isize {
                                    let (ih, iw) = (h + ki - 1, x0 + kj - 1);
                                    if ih >= 0 && ih < hh && iw >= 0 && iw < ww {
                                        term(
                                            ((n * co + o) * g.in_h + h as usize) * g.in_w + x0 as usize,
                                            ((n * ci + i) * g.in_h + ih as usize) * g.in_w + iw as usize,
                                            ((o * ci + i) * 3 + ki as usize) * 3 + kj as usize,
                                        );
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    }

    #[test]
    fn fits_only_what_the_kernels_handle() {
        let g = ConvGeometry {
            batch: 2,
            in_channels: 2,
            out_channels: 64,
            in_h: 32,
            in_w: 32,
            kernel_h: 3,
            kernel_w: 3,
            stride: 1,
            padding: 1,
        };
        assert_eq!(fits(&g, 2), avx512_available());
        assert!(!fits(&g, 0) && !fits(&g, MAX_THIN_CHANNELS + 1));
        assert!(!fits(&ConvGeometry { stride: 2, ..g }, 2));
        assert!(!fits(&ConvGeometry { padding: 0, ..g }, 2));
        assert!(!fits(&ConvGeometry { kernel_h: 1, kernel_w: 1, padding: 0, ..g }, 2));
        assert!(!fits(&ConvGeometry { in_h: 2, in_w: 2, ..g }, 2), "4 positions: not a whole vector");
        assert!(!fits(&ConvGeometry { in_h: 12, in_w: 12, ..g }, 2), "12 neither divides nor is a multiple of 16");
    }
}
