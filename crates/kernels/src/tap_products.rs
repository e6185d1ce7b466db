//! Products of a convolution weight (`C_out x C_in x taps`, row-major) with a few columns along one
//! of its channel axes: the weight-sized work of the low-rank (AsymML) convolution path.
//!
//! - [`transform_inputs`]: `T[o, i, t] = sum_c W[o, c, t] U[c, i]`, the weight on `cols` virtual
//!   input channels (`T` is `C_out x cols x taps`).
//! - [`transform_outputs`]: `T[j, c, t] = sum_o P[o, j] W[o, c, t]`, the weight on `cols` virtual
//!   output channels (flat rows, no tap structure).
//! - [`add_expansions`]: `dW[o, c, t] += sum_i U[c, i] D[o, i, t] + sum_j P[o, j] E[j, c, t]`, a
//!   weight gradient's two low-rank terms (one per channel axis) added in one sweep of `dW`.
//!
//! Each reads or updates the weight once, in order. With a handful of columns and 9 taps the first
//! and last are far from the shapes a GEMM microkernel is built for: through `gemm`, VGG16's
//! forward transforms take four to five times as long as the AVX-512 path here, in which each
//! `(o, c)` row of taps sits in one 16-lane register and two output channels are transformed
//! together (`cargo run --release -p trustsplit-kernels --example weight_transforms`). The expansion works on whole 16-lane vectors of each
//! output channel's flat `C_in x taps` row instead, with the input-side basis spread along the row
//! once per call and the coefficients permuted into the row's repeating tap pattern (see
//! `add_input_term`). The output transform keeps a 1024-value chunk of each of its (at most 8 per
//! pass) rows in L1 and adds the weight's rows into it four at a time, so the weight streams from
//! memory once, in order. Both transforms prefetch the weight rows they stream (the input side
//! 512 values ahead in each of its two rows, the output side the next group's
//! rows at the offset it is reading): the hardware prefetchers did not keep up with two strided
//! rows, nor with four rows read 4 KB at a time, and the transforms ran at a third of the memory
//! bandwidth (on a Zen 5 core, VGG16's 13 weights at 8 columns from memory: input side 5.3-6.6 ->
//! 3.4-3.9 ms, output side 4.9-6.3 -> 3.2-3.8 ms, `--example weight_transforms`, alternated
//! builds). Without AVX-512, or with more columns than these kernels win at (24 for the
//! transforms, 32 for the expansion; per-sample bases stacked for a batch have more), and for the
//! other two also with 1x1 kernels or more than 16 taps, they go through `gemm`. The expansion's
//! output-side term takes four columns at a time with their coefficients in registers. The AVX-512
//! code uses plain loads and masks only a row's tail. Both routes are checked against naive loops.
//!
//! Tried and dropped:
//! - `transform_outputs` as the transposed product `W^T P` (the long side as the product's rows):
//!   0.91-0.92 against 0.92-0.95 ms for a 512-channel layer at rank 8, within 10% elsewhere
//!   (2026-12-02).
//! - An AVX-512 `P^T W` with a strip of each row's sums in registers over all output channels: no
//!   faster than `gemm` (4.7-5.1 ms for VGG16's weights), its column walk over the weight missing
//!   the cache (2026-12-02; an earlier AVX-512 `P^T W` was no faster than `gemm` at any column
//!   count, 2026-12-01).
//! - Software prefetch of the next weight row: no change in the expansions; in the forward
//!   transform about 2x slower in isolation (5.7 against 2.7-2.8 ms on one thread), so removed
//!   (2026-12-01).
//! - Prefetching in the weight-gradient expansion: slower, 4.3-5.9 -> 4.8-7.8 ms in `--example
//!   expansion` (2026-12-03).
//! - The expansion's input term four columns per pass instead of eight: no difference in three
//!   alternated runs (2026-12-03).
//! - The expansion's rows in pairs beyond 4 columns: 27.6-27.8 against 31.3-32.1 G multiply-adds/s
//!   at rank 8 (2026-12-02).
//! - Plain loops for the two weight-sized transforms: low-rank products 97-128 against 61-71 ms per
//!   VGG16 step through `gemm`; explicit AVX-512 wins only with plain loads (masked loads from
//!   memory, and loads from a masked store still in flight, stalled ~20 cycles each on a Zen 5: the
//!   first fused expansion took 39 ms per VGG16 step, the kept one ~8-11 ms) (2026-12-02).
//! - A tap-major copy of the weight before the per-tap weight transforms: no gain (2026-12-02).

use crate::elementwise::all_finite;
use crate::matmul::{matmul, matmul_strided, parallelism, threads, MatRef};

/// The weight's shape: `out_channels x in_channels x taps` (taps = kernel height x width).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct TapShape {
    pub out_channels: usize,
    pub in_channels: usize,
    pub taps: usize,
}

impl TapShape {
    pub fn weight_len(&self) -> usize {
        self.out_channels * self.in_channels * self.taps
    }
}

/// One low-rank term of [`add_expansions`]: `basis` holds the columns along a channel axis and
/// `coeffs` what multiplies them.
#[derive(Clone, Copy)]
pub struct Expansion<'a> {
    pub basis: &'a [f32],
    pub coeffs: &'a [f32],
    pub cols: usize,
}

/// `t = W U` over the input channels: `u` is `in_channels x cols` (row-major), `t` receives
/// `out_channels x cols x taps`.
pub fn transform_inputs(s: TapShape, w: &[f32], u: &[f32], cols: usize, t: &mut [f32]) {
    assert_eq!(w.len(), s.weight_len(), "transform_inputs: weight length");
    assert_eq!(u.len(), s.in_channels * cols, "transform_inputs: basis length");
    assert_eq!(t.len(), s.out_channels * cols * s.taps, "transform_inputs: output length");
    if cols == 0 || s.weight_len() == 0 {
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if cols <= avx512::MAX_TRANSFORM_COLS && avx512::usable(s.taps) {
        // SAFETY: `usable` checked that the CPU has AVX-512F; the asserts above give the lengths
        // the kernel indexes by.
        return unsafe { avx512::transform_inputs(s, w, u, cols, t) };
    }
    portable::transform_inputs(s, w, u, cols, t);
}

/// `t = P^T W` over the output channels: `p` is `out_channels x cols` (row-major), `t` receives
/// `cols x in_channels x taps` (the weight seen from `cols` virtual output channels). The
/// flat rows need no tap structure. The AVX-512 path reads each weight row once, in order; on a
/// 2-vCPU Xeon it took half `gemm`'s time for VGG16's weights pushed out of cache (`cargo run
/// --release -p trustsplit-kernels --example weight_transforms`) and made VGG16's training step
/// 6-9 ms faster (AsymML's best row 119-121 -> 110-114 ms, 2026-12-02); on a Zen 5 core it was slower than `gemm` until
/// it prefetched the weight's rows (0.7-0.9x, then 1.2-1.4x).
pub fn transform_outputs(s: TapShape, w: &[f32], p: &[f32], cols: usize, t: &mut [f32]) {
    assert_eq!(w.len(), s.weight_len(), "transform_outputs: weight length");
    assert_eq!(p.len(), s.out_channels * cols, "transform_outputs: basis length");
    assert_eq!(t.len(), cols * s.in_channels * s.taps, "transform_outputs: output length");
    if cols == 0 || s.weight_len() == 0 {
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if cols <= avx512::MAX_TRANSFORM_COLS && is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has AVX-512F; the asserts above give the lengths the kernel indexes by.
        return unsafe { avx512::transform_outputs(s, w, p, cols, t) };
    }
    portable::transform_outputs(s, w, p, cols, t);
}

/// `dW += U D` (over the input channels) `+ P E` (over the output channels). `inputs`: `basis` U is
/// `in_channels x cols`, `coeffs` D is `out_channels x cols x taps`. `outputs`: `basis` P is
/// `out_channels x cols`, `coeffs` E is `cols x in_channels x taps`.
///
/// Returns whether every value of `dW` is finite afterwards. The AVX-512 sweep checks each block
/// of rows just after writing it, while it is in cache, so that the optimizer need not read the
/// whole gradient from memory again to refuse NaN or infinities.
pub fn add_expansions(s: TapShape, inputs: Option<Expansion>, outputs: Option<Expansion>, dw: &mut [f32]) -> bool {
    assert_eq!(dw.len(), s.weight_len(), "add_expansions: gradient length");
    if let Some(e) = inputs {
        assert_eq!(e.basis.len(), s.in_channels * e.cols, "add_expansions: input basis length");
        assert_eq!(e.coeffs.len(), s.out_channels * e.cols * s.taps, "add_expansions: input coefficients length");
    }
    if let Some(e) = outputs {
        assert_eq!(e.basis.len(), s.out_channels * e.cols, "add_expansions: output basis length");
        assert_eq!(e.coeffs.len(), e.cols * s.in_channels * s.taps, "add_expansions: output coefficients length");
    }
    let inputs = inputs.filter(|e| e.cols > 0);
    let outputs = outputs.filter(|e| e.cols > 0);
    if (inputs.is_none() && outputs.is_none()) || dw.is_empty() {
        return all_finite(dw);
    }
    let cols = inputs.map_or(0, |e| e.cols).max(outputs.map_or(0, |e| e.cols));
    #[cfg(target_arch = "x86_64")]
    if cols <= avx512::MAX_EXPANSION_COLS && avx512::usable(s.taps) {
        // SAFETY: as in `transform_inputs`.
        return unsafe { avx512::add_expansions(s, inputs, outputs, dw) };
    }
    portable::add_expansions(s, inputs, outputs, dw);
    all_finite(dw)
}

/// The same products through `gemm`, for any CPU and tap count.
pub(crate) mod portable {
    use super::*;

    fn gemm(a: MatRef, b: MatRef, c: &mut [f32], stride: usize, accumulate: bool) {
        matmul(a, b, c, stride, accumulate, parallelism(threads()));
    }

    pub(crate) fn transform_inputs(s: TapShape, w: &[f32], u: &[f32], cols: usize, t: &mut [f32]) {
        let (c, co, kk) = (s.in_channels, s.out_channels, s.taps);
        if cols == 0 {
            return;
        }
        let u = MatRef::row_major(u, c, cols);
        for tap in 0..kk {
            let w_tap = MatRef { data: &w[tap..], rows: co, cols: c, row_stride: c * kk, col_stride: kk };
            matmul_strided(w_tap, u, &mut t[tap..], cols * kk, kk, false, parallelism(threads()));
        }
    }

    pub(crate) fn transform_outputs(s: TapShape, w: &[f32], p: &[f32], cols: usize, t: &mut [f32]) {
        let (co, n) = (s.out_channels, s.in_channels * s.taps);
        gemm(MatRef::row_major(p, co, cols).t(), MatRef::row_major(w, co, n), t, n, false);
    }

    pub(crate) fn add_expansions(s: TapShape, inputs: Option<Expansion>, outputs: Option<Expansion>, dw: &mut [f32]) {
        let (c, co, kk) = (s.in_channels, s.out_channels, s.taps);
        if let Some(e) = inputs.filter(|e| e.cols > 0) {
            let u = MatRef::row_major(e.basis, c, e.cols);
            if kk == 1 {
                // A pointwise conv: dW (C_out x C_in) += D (C_out x cols) U^T in one product.
                gemm(MatRef::row_major(e.coeffs, co, e.cols), u.t(), dw, c, true);
                return add_output_term(s, outputs, dw);
            }
            // One product per output channel, dW[o] (C_in x kk) += U D[o] (cols x kk): `dw` is
            // read and written once, in order.
            for (dw_o, d_o) in dw.chunks_exact_mut(c * kk).zip(e.coeffs.chunks_exact(e.cols * kk)) {
                gemm(u, MatRef::row_major(d_o, e.cols, kk), dw_o, kk, true);
            }
        }
        add_output_term(s, outputs, dw);
    }

    /// `dW += P E`: one product over the flat rows.
    fn add_output_term(s: TapShape, outputs: Option<Expansion>, dw: &mut [f32]) {
        let n = s.in_channels * s.taps;
        if let Some(e) = outputs.filter(|e| e.cols > 0) {
            let p = MatRef::row_major(e.basis, s.out_channels, e.cols);
            gemm(p, MatRef::row_major(e.coeffs, e.cols, n), dw, n, true);
        }
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx512 {
    use super::{Expansion, TapShape};
    use std::arch::x86_64::*;

    /// Columns a block keeps in registers.
    const BLOCK: usize = 8;
    /// How far ahead (in values: 2 KB) the input-side transform prefetches each of the two weight
    /// rows it streams (256 and 2048 were slower on a Zen 5 core, 1024 alike).
    const PREFETCH_AHEAD: usize = 512;
    /// Up to how many columns these kernels beat `gemm` (single thread, VGG16-sized layers:
    /// beyond them, as with per-sample bases stacked for a whole batch, `gemm`'s blocking wins).
    pub(crate) const MAX_TRANSFORM_COLS: usize = 24;
    pub(crate) const MAX_EXPANSION_COLS: usize = 32;
    /// Output channels whose rows take the output-side term together.
    const ROWS: usize = 4;

    pub(crate) fn usable(taps: usize) -> bool {
        (2..=16).contains(&taps) && is_x86_feature_detected!("avx512f")
    }

    fn lanes(taps: usize) -> __mmask16 {
        ((1u32 << taps) - 1) as __mmask16
    }

    /// 16 values from `v[at..]`, or the first `taps` of them (the rest zero) where 16 would run
    /// past the slice. Plain loads where possible: masked loads from memory measured several
    /// times slower on Zen 5; the extra lanes are never stored.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn load(v: &[f32], at: usize, mask: __mmask16) -> __m512 {
        if at + 16 <= v.len() {
            _mm512_loadu_ps(v.as_ptr().add(at))
        } else {
            debug_assert!(at + mask.count_ones() as usize <= v.len());
            _mm512_maskz_loadu_ps(mask, v.as_ptr().add(at))
        }
    }

    /// Calls `$f::<R>` (or `$f::<G, R>` for a leading const `G`) with the const `R` equal to the
    /// runtime `$n` (1..=BLOCK).
    macro_rules! with_block {
        ($n:expr, $f:ident ( $($arg:expr),* )) => {
            with_block!($n, $f::<>($($arg),*))
        };
        ($n:expr, $f:ident :: < $($g:literal)? > ( $($arg:expr),* )) => {
            match $n {
                1 => $f::<$($g,)? 1>($($arg),*),
                2 => $f::<$($g,)? 2>($($arg),*),
                3 => $f::<$($g,)? 3>($($arg),*),
                4 => $f::<$($g,)? 4>($($arg),*),
                5 => $f::<$($g,)? 5>($($arg),*),
                6 => $f::<$($g,)? 6>($($arg),*),
                7 => $f::<$($g,)? 7>($($arg),*),
                _ => $f::<$($g,)? 8>($($arg),*),
            }
        };
    }

    /// # Safety
    /// The CPU must have AVX-512F; the slices must have the lengths `super::transform_inputs` asserts.
    #[target_feature(enable = "avx512f")]
    pub(crate) unsafe fn transform_inputs(s: TapShape, w: &[f32], u: &[f32], cols: usize, t: &mut [f32]) {
        let per_out = cols * s.taps;
        // Output channels in pairs: each accumulator gains one multiply-add per input channel, so
        // with one channel at a time the loop waited on the FMA latency; a pair doubles the
        // independent sums and shares the basis broadcasts.
        for (pair, t_pair) in t.chunks_mut(2 * per_out).enumerate() {
            let o = 2 * pair;
            let mut first = 0;
            while first < cols {
                let n = (cols - first).min(BLOCK);
                if t_pair.len() == 2 * per_out {
                    with_block!(n, transform_block::<2>(s, w, o, u, cols, first, t_pair));
                } else {
                    with_block!(n, transform_block::<1>(s, w, o, u, cols, first, t_pair));
                }
                first += n;
            }
        }
    }

    /// Values of a flat weight row per pass of [`transform_outputs`]: the `R` rows of `T` it
    /// updates (at most 32 KiB) stay in L1 while the weight's rows stream by.
    const OUTPUT_CHUNK: usize = 1024;
    /// Output channels whose weight rows are added in together (each `T` vector is loaded and
    /// stored once per group).
    const GROUP: usize = 4;

    /// # Safety
    /// The CPU must have AVX-512F; the slices must have the lengths `super::transform_outputs` asserts.
    #[target_feature(enable = "avx512f")]
    pub(crate) unsafe fn transform_outputs(s: TapShape, w: &[f32], p: &[f32], cols: usize, t: &mut [f32]) {
        t.fill(0.0);
        let mut first = 0;
        while first < cols {
            let n = (cols - first).min(BLOCK);
            with_block!(n, outputs_block(s, w, p, cols, first, t));
            first += n;
        }
    }

    /// Adds `P^T W` to rows `first..first + R` of `T`: for each chunk of the flat rows, the weight's
    /// rows in groups of [`GROUP`], each group's rows read once, in order, per chunk.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn outputs_block<const R: usize>(
        s: TapShape,
        w: &[f32],
        p: &[f32],
        cols: usize,
        first: usize,
        t: &mut [f32],
    ) {
        let (co, n) = (s.out_channels, s.in_channels * s.taps);
        let (wp, tp, pp) = (w.as_ptr(), t.as_mut_ptr(), p.as_ptr());
        for x0 in (0..n).step_by(OUTPUT_CHUNK) {
            let end = (x0 + OUTPUT_CHUNK).min(n);
            let whole = end - (end - x0) % 16;
            let tail = ((1u32 << (end - whole)) - 1) as __mmask16;
            let mut o0 = 0;
            while o0 < co {
                let rows = (co - o0).min(GROUP);
                // The group's coefficients for the block's columns: c[k][j] = P[o0 + k, first + j].
                let coeff = |k: usize, j: usize| _mm512_set1_ps(*pp.add((o0 + k) * cols + first + j));
                let mut x = x0;
                while x < end {
                    // The next group's rows at this offset, a group's pass ahead of their use.
                    for k in 0..GROUP {
                        let ahead = wp.wrapping_add((o0 + GROUP + k) * n + x);
                        _mm_prefetch::<_MM_HINT_T0>(ahead.cast());
                    }
                    let mask = if x < whole { !0 } else { tail };
                    let load = |at: *const f32| {
                        if x < whole {
                            _mm512_loadu_ps(at)
                        } else {
                            _mm512_maskz_loadu_ps(mask, at)
                        }
                    };
                    let values: [__m512; GROUP] = std::array::from_fn(|k| {
                        if k < rows {
                            load(wp.add((o0 + k) * n + x))
                        } else {
                            _mm512_setzero_ps()
                        }
                    });
                    for j in 0..R {
                        let at = tp.add((first + j) * n + x);
                        let mut a = load(at);
                        for (k, v) in values.iter().enumerate().take(rows) {
                            a = _mm512_fmadd_ps(coeff(k, j), *v, a);
                        }
                        _mm512_mask_storeu_ps(at, mask, a);
                    }
                    x += 16;
                }
                o0 += rows;
            }
        }
    }

    /// Columns `first..first + R` of output channels `o..o + O` (`t_o` holds those channels'
    /// rows of `T`): `O R` accumulators, one FMA each per input channel's row of taps.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn transform_block<const O: usize, const R: usize>(
        s: TapShape,
        w: &[f32],
        o: usize,
        u: &[f32],
        cols: usize,
        first: usize,
        t_o: &mut [f32],
    ) {
        let (c, kk) = (s.in_channels, s.taps);
        let mask = lanes(kk);
        let row_len = c * kk;
        let base = o * row_len;
        let mut acc = [[_mm512_setzero_ps(); R]; O];
        for ci in 0..c {
            if (ci * kk) % 16 < kk {
                for k in 0..O {
                    let ahead = w.as_ptr().wrapping_add(base + k * row_len + ci * kk + PREFETCH_AHEAD);
                    _mm_prefetch::<_MM_HINT_T0>(ahead.cast());
                }
            }
            let rows: [__m512; O] = std::array::from_fn(|k| load(w, base + k * row_len + ci * kk, mask));
            let u_row = u.as_ptr().add(ci * cols + first);
            let coeffs: [__m512; R] = std::array::from_fn(|i| _mm512_set1_ps(*u_row.add(i)));
            for (acc_k, row) in acc.iter_mut().zip(&rows) {
                for (a, coeff) in acc_k.iter_mut().zip(&coeffs) {
                    *a = _mm512_fmadd_ps(*coeff, *row, *a);
                }
            }
        }
        for (k, acc_k) in acc.iter().enumerate() {
            for (i, a) in acc_k.iter().enumerate() {
                _mm512_mask_storeu_ps(t_o.as_mut_ptr().add(k * cols * kk + (first + i) * kk), mask, *a);
            }
        }
    }

    /// # Safety
    /// The CPU must have AVX-512F; the slices must have the lengths `super::add_expansions` asserts.
    #[target_feature(enable = "avx512f")]
    pub(crate) unsafe fn add_expansions(
        s: TapShape,
        inputs: Option<Expansion>,
        outputs: Option<Expansion>,
        dw: &mut [f32],
    ) -> bool {
        let mut finite = true;
        let per_out = s.in_channels * s.taps;
        let spread = inputs.map(|e| SpreadBasis::new(s, e));
        // Output channels in blocks of ROWS: each term is added to the block's rows together, which
        // reads each vector of the spread basis and of E once per block instead of once per row
        // (both are L2-resident; that traffic bounded the kernel).
        for (block, dw_b) in dw.chunks_mut(ROWS * per_out).enumerate() {
            let first_o = block * ROWS;
            if let (Some(e), Some(spread)) = (inputs, &spread) {
                let mut first = 0;
                while first < e.cols {
                    let n = (e.cols - first).min(BLOCK);
                    match dw_b.len() / per_out {
                        4 => with_block!(n, add_input_term::<4>(s, e, spread, first_o, first, dw_b)),
                        3 => with_block!(n, add_input_term::<3>(s, e, spread, first_o, first, dw_b)),
                        2 => with_block!(n, add_input_term::<2>(s, e, spread, first_o, first, dw_b)),
                        _ => with_block!(n, add_input_term::<1>(s, e, spread, first_o, first, dw_b)),
                    }
                    first += n;
                }
            }
            if let Some(e) = outputs {
                match dw_b.len() / per_out {
                    4 => add_output_term::<4>(e, first_o, per_out, dw_b),
                    3 => add_output_term::<3>(e, first_o, per_out, dw_b),
                    2 => add_output_term::<2>(e, first_o, per_out, dw_b),
                    _ => add_output_term::<1>(e, first_o, per_out, dw_b),
                }
            }
            // The block's rows are final and still in cache.
            finite &= crate::elementwise::all_finite(dw_b);
        }
        finite
    }

    /// The input-side basis laid along a gradient row: `values[i * stride + f] = U[f / taps, i]` for
    /// each position `f` of a flat `C_in x taps` row, zero-padded to whole vectors. With it the input
    /// term is, like the output term, a sum of whole 16-lane vectors along the row: the `9`-value
    /// rows of taps, each a masked load and store, ran at a third of the output term's speed.
    struct SpreadBasis {
        values: Vec<f32>,
        stride: usize,
    }

    impl SpreadBasis {
        fn new(s: TapShape, e: Expansion) -> SpreadBasis {
            let n = s.in_channels * s.taps;
            let stride = n.next_multiple_of(16);
            let mut values = vec![0.0; e.cols * stride];
            for (i, row) in values.chunks_exact_mut(stride).enumerate() {
                for (c, taps) in row[..n].chunks_exact_mut(s.taps).enumerate() {
                    taps.fill(e.basis[c * e.cols + i]);
                }
            }
            SpreadBasis { values, stride }
        }
    }

    fn gcd(a: usize, b: usize) -> usize {
        if b == 0 {
            a
        } else {
            gcd(b, a % b)
        }
    }

    /// `dW[o, c, t] += sum_i U[c, i] D[o, i, t]` over input-side columns `first..first + R`, for the
    /// `ROWS` output channels from `first_o` held in `dw_b`, along the flat rows. Lane `l` of the
    /// row's vector at `x` holds tap `(x + l) % taps`, a pattern that repeats every `taps /
    /// gcd(taps, 16)` vectors (9 for 3x3 kernels); so each pattern's coefficient vectors
    /// (`D[o, i, :]` permuted into it) are made once, then every vector with that pattern is one FMA
    /// per column against the spread basis.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn add_input_term<const ROWS: usize, const R: usize>(
        s: TapShape,
        e: Expansion,
        spread: &SpreadBasis,
        first_o: usize,
        first: usize,
        dw_b: &mut [f32],
    ) {
        let (kk, n) = (s.taps, s.in_channels * s.taps);
        let patterns = kk / gcd(kk, 16);
        let whole = n - n % 16;
        let d = dw_b.as_mut_ptr();
        let u = spread.values.as_ptr().add(first * spread.stride);
        let mut coeffs = [[_mm512_setzero_ps(); R]; ROWS];
        for (k, row) in coeffs.iter_mut().enumerate() {
            for (i, c) in row.iter_mut().enumerate() {
                let at = ((first_o + k) * e.cols + first + i) * kk;
                *c = _mm512_maskz_loadu_ps(lanes(kk), e.coeffs.as_ptr().add(at));
            }
        }
        for m in 0..patterns.min(whole / 16) {
            let p = in_pattern(&coeffs, 16 * m, kk);
            for x in (16 * m..whole).step_by(16 * patterns) {
                let mut acc = [_mm512_setzero_ps(); ROWS];
                for (k, a) in acc.iter_mut().enumerate() {
                    *a = _mm512_loadu_ps(d.add(k * n + x));
                }
                for i in 0..R {
                    let u_i = _mm512_loadu_ps(u.add(i * spread.stride + x));
                    for (a, p_k) in acc.iter_mut().zip(&p) {
                        *a = _mm512_fmadd_ps(u_i, p_k[i], *a);
                    }
                }
                for (k, a) in acc.iter().enumerate() {
                    _mm512_storeu_ps(d.add(k * n + x), *a);
                }
            }
        }
        if whole < n {
            let tail = ((1u32 << (n - whole)) - 1) as __mmask16;
            let p = in_pattern(&coeffs, whole, kk);
            for (k, p_k) in p.iter().enumerate() {
                let mut a = _mm512_maskz_loadu_ps(tail, d.add(k * n + whole));
                for (i, p_ki) in p_k.iter().enumerate() {
                    // The spread basis is padded to whole vectors: a plain load.
                    a = _mm512_fmadd_ps(_mm512_loadu_ps(u.add(i * spread.stride + whole)), *p_ki, a);
                }
                _mm512_mask_storeu_ps(d.add(k * n + whole), tail, a);
            }
        }
    }

    /// The coefficient vectors permuted into the tap pattern of the row's vector at `x`: lane `l`
    /// gets tap `(x + l) % taps`.
    #[target_feature(enable = "avx512f")]
    #[inline]
    fn in_pattern<const ROWS: usize, const R: usize>(
        coeffs: &[[__m512; R]; ROWS],
        x: usize,
        taps: usize,
    ) -> [[__m512; R]; ROWS] {
        let mut index = [0i32; 16];
        for (l, t) in index.iter_mut().enumerate() {
            *t = ((x + l) % taps) as i32;
        }
        // SAFETY: 16 values; unaligned load.
        let index = unsafe { _mm512_loadu_si512(index.as_ptr().cast()) };
        let mut out = [[_mm512_setzero_ps(); R]; ROWS];
        for (out_k, c_k) in out.iter_mut().zip(coeffs) {
            for (o, c) in out_k.iter_mut().zip(c_k) {
                *o = _mm512_permutexvar_ps(index, *c);
            }
        }
        out
    }

    /// `dW[o, :] += sum_j P[o, j] E[j, :]` for the `R` rows `first_o..` held in `dw_b`, each a flat
    /// row of `n = C_in x taps` values: no tap structure is needed, so whole 16-lane vectors
    /// (plain loads and stores; only the tail is masked).
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn add_output_term<const R: usize>(e: Expansion, first_o: usize, n: usize, dw_b: &mut [f32]) {
        let mut first = 0;
        while first < e.cols {
            match e.cols - first {
                1 => output_columns::<R, 1>(e, first_o, first, n, dw_b),
                2 => output_columns::<R, 2>(e, first_o, first, n, dw_b),
                3 => output_columns::<R, 3>(e, first_o, first, n, dw_b),
                _ => output_columns::<R, 4>(e, first_o, first, n, dw_b),
            }
            first += OUTPUT_COLUMNS;
        }
    }

    /// Columns at a time of the output term: their `R x J` coefficients stay in registers for the
    /// whole row (with all columns at once, each was broadcast from memory again for every vector:
    /// five loads per four multiply-adds).
    const OUTPUT_COLUMNS: usize = 4;

    /// [`add_output_term`] for columns `first..first + J`.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn output_columns<const R: usize, const J: usize>(
        e: Expansion,
        first_o: usize,
        first: usize,
        n: usize,
        dw_b: &mut [f32],
    ) {
        let p = e.basis.as_ptr().add(first_o * e.cols + first);
        let coeff: [[__m512; J]; R] =
            std::array::from_fn(|k| std::array::from_fn(|j| _mm512_set1_ps(*p.add(k * e.cols + j))));
        let rows: [*const f32; J] = std::array::from_fn(|j| e.coeffs.as_ptr().add((first + j) * n));
        let whole = n - n % 16;
        let d = dw_b.as_mut_ptr();
        for x in (0..whole).step_by(16) {
            let mut acc: [__m512; R] = std::array::from_fn(|k| _mm512_loadu_ps(d.add(k * n + x)));
            for (j, row) in rows.iter().enumerate() {
                let v = _mm512_loadu_ps(row.add(x));
                for (a, c) in acc.iter_mut().zip(&coeff) {
                    *a = _mm512_fmadd_ps(c[j], v, *a);
                }
            }
            for (k, a) in acc.iter().enumerate() {
                _mm512_storeu_ps(d.add(k * n + x), *a);
            }
        }
        if whole < n {
            let mask = ((1u32 << (n - whole)) - 1) as __mmask16;
            for (k, c) in coeff.iter().enumerate() {
                let mut acc = _mm512_maskz_loadu_ps(mask, d.add(k * n + whole));
                for (j, row) in rows.iter().enumerate() {
                    acc = _mm512_fmadd_ps(c[j], _mm512_maskz_loadu_ps(mask, row.add(whole)), acc);
                }
                _mm512_mask_storeu_ps(d.add(k * n + whole), mask, acc);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// Deterministic values in [-1, 1) without a dev-dependency on a generator here.
    fn values(seed: u64, n: usize) -> Vec<f32> {
        let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
        (0..n)
            .map(|_| {
                x ^= x << 13;
                x ^= x >> 7;
                x ^= x << 17;
                (x >> 40) as f32 / (1u64 << 23) as f32 - 1.0
            })
            .collect()
    }

    fn close(got: &[f32], want: &[f64], what: &str) {
        let scale = want.iter().fold(1e-3f64, |m, v| m.max(v.abs()));
        for (i, (g, w)) in got.iter().zip(want).enumerate() {
            assert!((*g as f64 - w).abs() <= 1e-5 * scale, "{what}[{i}]: {g} vs {w}");
        }
    }

    fn shapes() -> Vec<(TapShape, usize, usize)> {
        let mut out = Vec::new();
        // Rows of a few vectors and of many (each tap pattern repeating), with and without a
        // partial last vector; output channels in whole blocks of four and not.
        let sizes = [(1, (5, 3)), (2, (3, 4)), (3, (7, 5)), (3, (1, 2)), (4, (6, 3)), (5, (4, 3))];
        for (k, (c, co)) in sizes.into_iter().chain([(3, (64, 9)), (3, (21, 4)), (2, (37, 6)), (4, (33, 2))]) {
            // The last pairs pass the fast paths' column limits, so the dispatch falls back to gemm.
            for (cols_in, cols_out) in [(1, 2), (3, 0), (0, 5), (8, 8), (11, 9), (17, 1), (30, 3), (5, 40)] {
                out.push((TapShape { out_channels: co, in_channels: c, taps: k * k }, cols_in, cols_out));
            }
        }
        out
    }

    fn naive_transform(s: TapShape, w: &[f32], u: &[f32], cols: usize) -> Vec<f64> {
        let (c, kk) = (s.in_channels, s.taps);
        let mut t = vec![0.0f64; s.out_channels * cols * kk];
        for o in 0..s.out_channels {
            for i in 0..cols {
                for tap in 0..kk {
                    t[(o * cols + i) * kk + tap] =
                        (0..c).map(|ci| w[(o * c + ci) * kk + tap] as f64 * u[ci * cols + i] as f64).sum();
                }
            }
        }
        t
    }

    fn naive_expansions(
        s: TapShape,
        dw: &[f32],
        ins: (&[f32], &[f32], usize),
        outs: (&[f32], &[f32], usize),
    ) -> Vec<f64> {
        let (c, kk) = (s.in_channels, s.taps);
        let mut want: Vec<f64> = dw.iter().map(|&v| v as f64).collect();
        for o in 0..s.out_channels {
            for ci in 0..c {
                for tap in 0..kk {
                    let at = (o * c + ci) * kk + tap;
                    let (u, d, n) = ins;
                    for i in 0..n {
                        want[at] += u[ci * n + i] as f64 * d[(o * n + i) * kk + tap] as f64;
                    }
                    let (p, e, n) = outs;
                    for j in 0..n {
                        want[at] += p[o * n + j] as f64 * e[(j * c + ci) * kk + tap] as f64;
                    }
                }
            }
        }
        want
    }

    #[test]
    fn transform_matches_naive_loops() {
        for (seed, (s, cols, _)) in shapes().into_iter().enumerate() {
            let (w, u) = (values(seed as u64, s.weight_len()), values(seed as u64 + 99, s.in_channels * cols));
            let want = naive_transform(s, &w, &u, cols);
            let mut t = vec![f32::NAN; s.out_channels * cols * s.taps];
            transform_inputs(s, &w, &u, cols, &mut t);
            close(&t, &want, &format!("dispatched {s:?} cols {cols}"));
            let mut t = vec![f32::NAN; want.len()];
            portable::transform_inputs(s, &w, &u, cols, &mut t);
            close(&t, &want, &format!("portable {s:?} cols {cols}"));
        }
    }

    #[test]
    fn output_transform_matches_naive_loops() {
        // Also rows longer than one chunk of the AVX-512 path (1024 values), ending in a partial
        // vector, and a 1x1 kernel.
        let long = [(7, 131, 9, 1), (9, 131, 9, 8), (5, 120, 9, 13), (6, 1100, 1, 3)]
            .map(|(co, ci, taps, cols)| (TapShape { out_channels: co, in_channels: ci, taps }, 0, cols));
        for (seed, (s, _, cols)) in shapes().into_iter().chain(long).enumerate() {
            let (w, p) = (values(seed as u64 + 5, s.weight_len()), values(seed as u64 + 50, s.out_channels * cols));
            let n = s.in_channels * s.taps;
            let mut want = vec![0.0f64; cols * n];
            for j in 0..cols {
                for x in 0..n {
                    want[j * n + x] = (0..s.out_channels).map(|o| p[o * cols + j] as f64 * w[o * n + x] as f64).sum();
                }
            }
            let mut t = vec![f32::NAN; want.len()];
            transform_outputs(s, &w, &p, cols, &mut t);
            close(&t, &want, &format!("{s:?} cols {cols}"));
            let mut t = vec![f32::NAN; want.len()];
            portable::transform_outputs(s, &w, &p, cols, &mut t);
            close(&t, &want, &format!("portable {s:?} cols {cols}"));
        }
    }

    #[test]
    fn expansions_match_naive_loops() {
        for (seed, (s, ci, co)) in shapes().into_iter().enumerate() {
            let seed = seed as u64 * 7;
            let (u, d) = (values(seed + 1, s.in_channels * ci), values(seed + 2, s.out_channels * ci * s.taps));
            let (p, e) = (values(seed + 3, s.out_channels * co), values(seed + 4, co * s.in_channels * s.taps));
            let start = values(seed + 5, s.weight_len());
            let want = naive_expansions(s, &start, (&u, &d, ci), (&p, &e, co));
            let ins = Some(Expansion { basis: &u, coeffs: &d, cols: ci });
            let outs = Some(Expansion { basis: &p, coeffs: &e, cols: co });
            let mut got = start.clone();
            assert!(add_expansions(s, ins, outs, &mut got), "finite operands, finite gradient");
            close(&got, &want, &format!("dispatched {s:?} cols {ci}/{co}"));
            let mut got = start.clone();
            portable::add_expansions(s, ins, outs, &mut got);
            close(&got, &want, &format!("portable {s:?} cols {ci}/{co}"));
            // Each term alone.
            let only_in = naive_expansions(s, &start, (&u, &d, ci), (&p, &e, 0));
            let mut got = start.clone();
            add_expansions(s, ins, None, &mut got);
            close(&got, &only_in, &format!("inputs only {s:?} cols {ci}"));
            let only_out = naive_expansions(s, &start, (&u, &d, 0), (&p, &e, co));
            let mut got = start.clone();
            add_expansions(s, None, outs, &mut got);
            close(&got, &only_out, &format!("outputs only {s:?} cols {co}"));
        }
    }

    #[test]
    fn expansions_report_any_non_finite_value_of_the_gradient() {
        for (seed, (s, ci, co)) in shapes().into_iter().enumerate() {
            let seed = seed as u64 * 11;
            let (u, d) = (values(seed + 1, s.in_channels * ci), values(seed + 2, s.out_channels * ci * s.taps));
            let (p, e) = (values(seed + 3, s.out_channels * co), values(seed + 4, co * s.in_channels * s.taps));
            let start = values(seed + 5, s.weight_len());
            let ins = Some(Expansion { basis: &u, coeffs: &d, cols: ci });
            let outs = Some(Expansion { basis: &p, coeffs: &e, cols: co });
            let n = s.weight_len();
            for bad in [f32::NAN, f32::INFINITY, f32::NEG_INFINITY] {
                // Already in the gradient (the device's share), first, middle or last value.
                for at in [0, n / 2, n - 1] {
                    let mut dw = start.clone();
                    dw[at] = bad;
                    assert!(!add_expansions(s, ins, outs, &mut dw), "{s:?}: {bad} at {at}");
                    let mut dw = start.clone();
                    dw[at] = bad;
                    assert!(!add_expansions(s, None, None, &mut dw), "{s:?}: {bad} at {at}, no terms");
                }
                // Made by the expansion: a non-finite coefficient spreads over a row.
                if !e.is_empty() {
                    let mut e_bad = e.clone();
                    e_bad[e.len() / 2] = bad;
                    let outs_bad = Some(Expansion { basis: &p, coeffs: &e_bad, cols: co });
                    assert!(!add_expansions(s, ins, outs_bad, &mut start.clone()), "{s:?}: {bad} in E");
                }
            }
        }
    }

    #[test]
    #[cfg(target_arch = "x86_64")]
    fn fast_path_takes_only_the_tap_counts_it_handles() {
        eprintln!(
            "AVX-512F on this CPU: {} (the tests above compared that path too)",
            is_x86_feature_detected!("avx512f")
        );
        assert!(!avx512::usable(1) && !avx512::usable(17) && !avx512::usable(25));
    }
}
