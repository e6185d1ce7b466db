//! Products of one sample's activation `X` (`channels x positions`, row-major) with a few columns in
//! channel space: the split and the fast subspace of the low-rank (AsymML) path.
//!
//! - [`project`]: `V = U^T X` (`cols x positions`), `U` being `channels x cols`.
//! - [`split`]: `V = U^T X` and the residual `X - U V` in one sweep.
//! - [`residual`]: `X - U V` for coordinates `V` already known.
//! - [`power_step`]: `Y = X (X^T Omega)` (`channels x cols`), or `Y +=` it: one step of subspace
//!   iteration without forming `X X^T`.
//!
//! Each needs two products with `X`. Through `gemm` they are two (or three, with the residual's
//! subtraction) passes over `X`, with 1 to 16 columns on the small side, where its microkernels
//! spend as much time loading as multiplying. The AVX-512 kernels here walk `X` in blocks of 16 to
//! 64 positions whose `channels` rows stay in L1 between the two products, with the block's `cols`
//! results in registers (the timing test below measures both routes on VGG16's shapes). Beyond 16
//! columns, without AVX-512, and for the power step on maps of fewer than 128 positions (where
//! `gemm` measured faster), the portable code (`gemm`) does the work; the last `< 16` positions of
//! a row take plain loops. Callers lay a batch's small maps side by side, so that rows are long
//! enough ([`LONG_ROWS`]). Both routes are checked against naive loops.
//!
//! Tried and dropped:
//! - The residual in the same block walk as `U^T X` on rows of 512 positions or more: the stores to
//!   every channel's row at once collide in L1's sets (0.73 against 0.55 ms for two passes on
//!   VGG16's 64 x 1024 maps), so long rows take a second, row-by-row pass (2026-12-02).
//! - Software prefetch of the next block's rows in the split's and the subspace's walk: no change,
//!   those activations having just been written (2026-12-02, again 2026-12-03).
//! - The AVX-512 power step on maps of fewer than 128 positions: 0.39 and 0.33 ms against `gemm`'s
//!   0.35 and 0.23 ms on VGG16's 256 x 64 and 512 x 16 maps (2026-12-02).
//!
//! Not yet tried:
//! - The power step on a single sample's short rows (handed to `gemm` today) with its second
//!   product transposed, each position's row of `X^T Omega` in a register, instead of per-(channel,
//!   column) partial sums.

use crate::elementwise::sum_f64_of;
use crate::matmul::{matmul, parallelism, MatRef};

/// Columns up to which the AVX-512 kernels hold a block's results in registers.
pub const MAX_FAST_COLS: usize = 16;
/// Row length (positions) from which [`power_step`] takes the AVX-512 path: with fewer, the
/// per-(channel, column) partial sums cost more to reduce than the block saves (VGG16's 256 x 64
/// and 512 x 16 maps with 12 columns: 0.39 and 0.33 ms that way, 0.35 and 0.23 ms through `gemm`;
/// 128 x 256 with 8 columns: 0.28 against 0.61 ms). Callers with many short rows (a batch's small
/// maps) do better to lay them side by side.
pub const LONG_ROWS: usize = 128;

/// `v = U^T X`: `u` is `channels x cols`, `x` is `channels x positions`; row `j` of the result is
/// written to `v[j * v_stride..][..positions]` (so that several samples can fill one wide matrix).
pub fn project(u: &[f32], cols: usize, x: &[f32], positions: usize, v: &mut [f32], v_stride: usize) {
    let channels = check(u, cols, x, positions, "project");
    assert!(v_stride >= positions, "project: output stride {v_stride} below {positions} positions");
    assert!(cols == 0 || v.len() >= (cols - 1) * v_stride + positions, "project: output too short");
    if cols == 0 || positions == 0 {
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if avx512::usable(cols) {
        // SAFETY: `usable` checked AVX-512F; the asserts above give the lengths the kernel indexes by.
        unsafe { avx512::project_or_split(u, channels, cols, x, positions, v, v_stride, None) };
        return;
    }
    portable::project(u, channels, cols, x, positions, v, v_stride);
}

/// `v = U^T X` (`cols x positions`) and `residual = X - U v` (`channels x positions`), both
/// overwritten. Returns the residual's energy, the sum of its squares accumulated in f64 (each
/// square of an f32 is exact there): what clipping it needs, computed while the values are at hand.
pub fn split(u: &[f32], cols: usize, x: &[f32], positions: usize, v: &mut [f32], residual: &mut [f32]) -> f64 {
    let channels = match split_operands(u, cols, x, positions, v.len(), residual, "split") {
        Ok(channels) => channels,
        Err(energy) => return energy,
    };
    #[cfg(target_arch = "x86_64")]
    if avx512::usable(cols) {
        // SAFETY: as in `project`.
        return unsafe { avx512::project_or_split(u, channels, cols, x, positions, v, positions, Some(residual)) };
    }
    portable::split(u, channels, cols, x, positions, v, residual)
}

/// `residual = X - U v` (`channels x positions`, overwritten) for coordinates `v` (`cols x
/// positions`) known already (the fast subspace computes them from its own projection, saving the
/// split its product `U^T X`). Returns the residual's energy, as [`split`] does.
pub fn residual(u: &[f32], cols: usize, x: &[f32], positions: usize, v: &[f32], residual: &mut [f32]) -> f64 {
    let channels = match split_operands(u, cols, x, positions, v.len(), residual, "residual") {
        Ok(channels) => channels,
        Err(energy) => return energy,
    };
    #[cfg(target_arch = "x86_64")]
    if avx512::usable(cols) {
        // SAFETY: as in `project`; `v` holds `cols` rows of `positions`.
        return unsafe { avx512::residual(u, channels, cols, x, positions, v, positions, residual) };
    }
    portable::residual(u, channels, cols, x, positions, v, residual)
}

/// `y = X (X^T omega)`, or `y +=` it when `accumulate`: `x` is `channels x positions`, `omega` and
/// `y` are `channels x cols`.
pub fn power_step(x: &[f32], positions: usize, omega: &[f32], cols: usize, y: &mut [f32], accumulate: bool) {
    let channels = check(omega, cols, x, positions, "power_step");
    assert_eq!(y.len(), omega.len(), "power_step: y is not channels x cols");
    if !accumulate {
        y.fill(0.0);
    }
    if cols == 0 || positions == 0 {
        return;
    }
    #[cfg(target_arch = "x86_64")]
    if positions >= LONG_ROWS && avx512::usable(cols) {
        // SAFETY: as in `project`.
        return unsafe { avx512::power_step(x, channels, positions, omega, cols, y) };
    }
    portable::power_step(x, channels, positions, omega, cols, y);
}

/// Checks a split's operands (`v` is `cols x positions`, the residual as long as `x`) and returns
/// `channels`; with no columns or positions the residual is `x` itself, written here, and `Err`
/// carries its energy.
fn split_operands(
    u: &[f32],
    cols: usize,
    x: &[f32],
    positions: usize,
    v_len: usize,
    residual: &mut [f32],
    what: &str,
) -> Result<usize, f64> {
    let channels = check(u, cols, x, positions, what);
    assert_eq!(v_len, cols * positions, "{what}: v is not cols x positions");
    assert_eq!(residual.len(), x.len(), "{what}: residual is not channels x positions");
    if cols == 0 || positions == 0 {
        residual.copy_from_slice(x);
        return Err(sum_f64_of(residual, |r| r * r));
    }
    Ok(channels)
}

/// Checks that `basis` is `channels x cols` for the `channels` that `x` has; returns `channels`.
fn check(basis: &[f32], cols: usize, x: &[f32], positions: usize, what: &str) -> usize {
    let channels = x.len().checked_div(positions).unwrap_or(0);
    assert_eq!(channels * positions, x.len(), "{what}: x is not channels x {positions} positions");
    assert_eq!(basis.len(), channels * cols, "{what}: basis is not {channels} channels x {cols} columns");
    channels
}

pub(crate) mod portable {
    use super::*;

    fn gemm(a: MatRef, b: MatRef, c: &mut [f32], stride: usize, accumulate: bool) {
        matmul(a, b, c, stride, accumulate, parallelism(1));
    }

    pub(crate) fn project(u: &[f32], c: usize, r: usize, x: &[f32], p: usize, v: &mut [f32], v_stride: usize) {
        gemm(MatRef::row_major(u, c, r).t(), MatRef::row_major(x, c, p), v, v_stride, false);
    }

    pub(crate) fn split(
        u: &[f32],
        c: usize,
        r: usize,
        x: &[f32],
        p: usize,
        v: &mut [f32],
        residual: &mut [f32],
    ) -> f64 {
        project(u, c, r, x, p, v, p);
        self::residual(u, c, r, x, p, v, residual)
    }

    pub(crate) fn residual(u: &[f32], c: usize, r: usize, x: &[f32], p: usize, v: &[f32], residual: &mut [f32]) -> f64 {
        // residual = x - U v, with U v written into the residual's own buffer first.
        gemm(MatRef::row_major(u, c, r), MatRef::row_major(v, r, p), residual, p, false);
        residual.iter_mut().zip(x).for_each(|(d, &a)| *d = a - *d);
        sum_f64_of(residual, |r| r * r)
    }

    pub(crate) fn power_step(x: &[f32], c: usize, p: usize, omega: &[f32], k: usize, y: &mut [f32]) {
        let mut t = vec![0.0; p * k];
        gemm(MatRef::row_major(x, c, p).t(), MatRef::row_major(omega, c, k), &mut t, k, false);
        gemm(MatRef::row_major(x, c, p), MatRef::row_major(&t, p, k), y, k, true);
    }
}

#[cfg(target_arch = "x86_64")]
pub(crate) mod avx512 {
    use super::MAX_FAST_COLS;
    use std::arch::x86_64::*;

    const LANES: usize = 16;
    /// Row length from which the split's residual is a separate pass (see `project_or_split`).
    const FUSED_BELOW: usize = 512;

    pub(crate) fn usable(cols: usize) -> bool {
        cols <= MAX_FAST_COLS && is_x86_feature_detected!("avx512f")
    }

    /// Calls `$f::<R, B>` for the runtime column count `$r` (1..=16), with `B` position blocks
    /// of 16 per step: as many as keep the `R x B` accumulators within 16 of the 32 registers.
    macro_rules! dispatch {
        ($r:expr, $f:ident ( $($arg:expr),* )) => {
            match $r {
                1 => $f::<1, 4>($($arg),*),
                2 => $f::<2, 4>($($arg),*),
                3 => $f::<3, 4>($($arg),*),
                4 => $f::<4, 4>($($arg),*),
                5 => $f::<5, 2>($($arg),*),
                6 => $f::<6, 2>($($arg),*),
                7 => $f::<7, 2>($($arg),*),
                8 => $f::<8, 2>($($arg),*),
                9 => $f::<9, 1>($($arg),*),
                10 => $f::<10, 1>($($arg),*),
                11 => $f::<11, 1>($($arg),*),
                12 => $f::<12, 1>($($arg),*),
                13 => $f::<13, 1>($($arg),*),
                14 => $f::<14, 1>($($arg),*),
                15 => $f::<15, 1>($($arg),*),
                _ => $f::<16, 1>($($arg),*),
            }
        };
    }

    /// Calls `$f::<R, 1>` for the runtime column count `$r` (1..=16): one block of 16 positions
    /// per step, for the whole blocks the wider steps leave.
    macro_rules! dispatch_narrow {
        ($r:expr, $f:ident ( $($arg:expr),* )) => {
            match $r {
                1 => $f::<1, 1>($($arg),*),
                2 => $f::<2, 1>($($arg),*),
                3 => $f::<3, 1>($($arg),*),
                4 => $f::<4, 1>($($arg),*),
                5 => $f::<5, 1>($($arg),*),
                6 => $f::<6, 1>($($arg),*),
                7 => $f::<7, 1>($($arg),*),
                8 => $f::<8, 1>($($arg),*),
                9 => $f::<9, 1>($($arg),*),
                10 => $f::<10, 1>($($arg),*),
                11 => $f::<11, 1>($($arg),*),
                12 => $f::<12, 1>($($arg),*),
                13 => $f::<13, 1>($($arg),*),
                14 => $f::<14, 1>($($arg),*),
                15 => $f::<15, 1>($($arg),*),
                _ => $f::<16, 1>($($arg),*),
            }
        };
    }

    /// # Safety
    /// The CPU must have AVX-512F; `u` is `c x r`, `x` (and `residual`) `c x p`, `v` holds `r`
    /// rows of `p` at stride `v_stride`; `1 <= r <= 16`. Returns the residual's energy (0 without
    /// one).
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    pub(crate) unsafe fn project_or_split(
        u: &[f32],
        c: usize,
        r: usize,
        x: &[f32],
        p: usize,
        v: &mut [f32],
        v_stride: usize,
        mut residual: Option<&mut [f32]>,
    ) -> f64 {
        // Rows of 512 positions or more are 2 KiB or more apart, and a block's stores to all of
        // them at once collide in L1's sets (VGG16's 64 x 1024 split: 0.73 ms this way against
        // 0.55 ms as two passes); there the residual is a second, row-by-row pass.
        let fused = residual.is_some() && p < FUSED_BELOW;
        let mut energy = 0.0f64;
        let res = residual.as_mut().filter(|_| fused).map(|s| ResidualOut { at: s.as_mut_ptr(), energy: &mut energy });
        let (up, xp, vp) = (u.as_ptr(), x.as_ptr(), v.as_mut_ptr());
        let pos = dispatch!(r, project_blocks(up, c, xp, p, 0, vp, v_stride, res));
        // Whole blocks of 16 left over, one at a time.
        let pos = dispatch_narrow!(r, project_blocks(up, c, xp, p, pos, vp, v_stride, res));
        // The last few positions.
        for q in pos..p {
            for j in 0..r {
                let mut s = 0.0f32;
                for ci in 0..c {
                    s += u[ci * r + j] * x[ci * p + q];
                }
                v[j * v_stride + q] = s;
            }
        }
        if let Some(residual) = residual {
            // Fused: only the last few positions are left.
            energy += subtract_low_rank(u, c, r, x, p, v, v_stride, residual, if fused { pos } else { 0 });
        }
        energy
    }

    /// Where a block writes the residual, and the energy it adds its squares to.
    #[derive(Clone, Copy)]
    struct ResidualOut {
        at: *mut f32,
        energy: *mut f64,
    }

    /// Adds the squares of `s`'s 16 values, in f64 (exact squares), to two 8-lane accumulators.
    #[target_feature(enable = "avx512f")]
    #[inline]
    fn add_squares(s: __m512, acc: &mut [__m512d; 2]) {
        let lo = _mm512_cvtps_pd(_mm512_castps512_ps256(s));
        let hi = _mm512_cvtps_pd(_mm256_castsi256_ps(_mm512_extracti64x4_epi64::<1>(_mm512_castps_si512(s))));
        acc[0] = _mm512_fmadd_pd(lo, lo, acc[0]);
        acc[1] = _mm512_fmadd_pd(hi, hi, acc[1]);
    }

    /// Every whole step of `16 B` positions from `start`; returns where they end.
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn project_blocks<const R: usize, const B: usize>(
        u: *const f32,
        c: usize,
        x: *const f32,
        p: usize,
        start: usize,
        v: *mut f32,
        v_stride: usize,
        res: Option<ResidualOut>,
    ) -> usize {
        let mut pos = start;
        while pos + LANES * B <= p {
            project_block::<R, B>(u, c, x, p, pos, v, v_stride, res);
            pos += LANES * B;
        }
        pos
    }

    /// `U^T X` for positions `pos..pos + 16 B` (`u` is `c x R`), in `R x B` registers: one FMA per
    /// column for each channel's row.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn projection<const R: usize, const B: usize>(
        u: *const f32,
        c: usize,
        x: *const f32,
        p: usize,
        pos: usize,
    ) -> [[__m512; B]; R] {
        let mut acc = [[_mm512_setzero_ps(); B]; R];
        let mut xs = [_mm512_setzero_ps(); B];
        for ci in 0..c {
            let row = x.add(ci * p + pos);
            for (b, xb) in xs.iter_mut().enumerate() {
                *xb = _mm512_loadu_ps(row.add(LANES * b));
            }
            let u_row = u.add(ci * R);
            for (j, acc_j) in acc.iter_mut().enumerate() {
                let uj = _mm512_set1_ps(*u_row.add(j));
                for (a, xb) in acc_j.iter_mut().zip(&xs) {
                    *a = _mm512_fmadd_ps(uj, *xb, *a);
                }
            }
        }
        acc
    }

    /// Positions `pos..pos + 16 B` of `v` (see `projection`), then, if `res` is given, of the
    /// residual from the same rows (now in L1).
    #[target_feature(enable = "avx512f")]
    #[inline]
    #[allow(clippy::too_many_arguments)]
    unsafe fn project_block<const R: usize, const B: usize>(
        u: *const f32,
        c: usize,
        x: *const f32,
        p: usize,
        pos: usize,
        v: *mut f32,
        v_stride: usize,
        res: Option<ResidualOut>,
    ) {
        let acc = projection::<R, B>(u, c, x, p, pos);
        for (j, acc_j) in acc.iter().enumerate() {
            for (b, a) in acc_j.iter().enumerate() {
                _mm512_storeu_ps(v.add(j * v_stride + pos + LANES * b), *a);
            }
        }
        if let Some(res) = res {
            subtract_block::<R, B>(u, c, x, p, pos, &acc, res);
        }
    }

    /// Every whole step of `16 B` positions from `start` of `residual = x - U v`, for `v` (`R` rows
    /// at `v_stride`) given: each block's `v` is loaded into registers once for all channels.
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn residual_blocks<const R: usize, const B: usize>(
        u: *const f32,
        c: usize,
        x: *const f32,
        p: usize,
        start: usize,
        v: *const f32,
        v_stride: usize,
        res: ResidualOut,
    ) -> usize {
        let mut pos = start;
        while pos + LANES * B <= p {
            let acc: [[__m512; B]; R] = std::array::from_fn(|j| {
                std::array::from_fn(|b| _mm512_loadu_ps(v.add(j * v_stride + pos + LANES * b)))
            });
            subtract_block::<R, B>(u, c, x, p, pos, &acc, res);
            pos += LANES * B;
        }
        pos
    }

    /// `residual = x - U v` at positions `pos..pos + 16 B`, with that block of `v` in registers.
    #[target_feature(enable = "avx512f")]
    #[inline]
    #[allow(clippy::too_many_arguments)]
    unsafe fn subtract_block<const R: usize, const B: usize>(
        u: *const f32,
        c: usize,
        x: *const f32,
        p: usize,
        pos: usize,
        acc: &[[__m512; B]; R],
        res: ResidualOut,
    ) {
        // One pair of accumulators per block column, so the squares do not wait on each other.
        let mut squares = [[_mm512_setzero_pd(); 2]; B];
        for ci in 0..c {
            let row = x.add(ci * p + pos);
            let u_row = u.add(ci * R);
            for (b, sq) in squares.iter_mut().enumerate() {
                let mut s = _mm512_loadu_ps(row.add(LANES * b));
                for (j, acc_j) in acc.iter().enumerate() {
                    s = _mm512_fnmadd_ps(_mm512_set1_ps(*u_row.add(j)), acc_j[b], s);
                }
                _mm512_storeu_ps(res.at.add(ci * p + pos + LANES * b), s);
                add_squares(s, sq);
            }
        }
        let mut total = _mm512_setzero_pd();
        for [a, b] in squares {
            total = _mm512_add_pd(total, _mm512_add_pd(a, b));
        }
        *res.energy += _mm512_reduce_add_pd(total);
    }

    /// `residual = x - U v` for coordinates `v` known already (`r x p` at `v_stride`): rows shorter
    /// than [`FUSED_BELOW`] in blocks of positions (each block's `v` in registers for all channels,
    /// as the split's fused walk does), longer ones row by row. Returns the residual's energy.
    ///
    /// # Safety
    /// As [`project_or_split`]'s, with `v` holding `r` rows of `p` at stride `v_stride`.
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    pub(crate) unsafe fn residual(
        u: &[f32],
        c: usize,
        r: usize,
        x: &[f32],
        p: usize,
        v: &[f32],
        v_stride: usize,
        residual: &mut [f32],
    ) -> f64 {
        if p >= FUSED_BELOW {
            return subtract_low_rank(u, c, r, x, p, v, v_stride, residual, 0);
        }
        let mut energy = 0.0f64;
        let res = ResidualOut { at: residual.as_mut_ptr(), energy: &mut energy };
        let (up, xp, vp) = (u.as_ptr(), x.as_ptr(), v.as_ptr());
        let pos = dispatch!(r, residual_blocks(up, c, xp, p, 0, vp, v_stride, res));
        let pos = dispatch_narrow!(r, residual_blocks(up, c, xp, p, pos, vp, v_stride, res));
        // The last few positions (all of them below 16: `from == 0` means the whole row there).
        energy + subtract_low_rank(u, c, r, x, p, v, v_stride, residual, pos)
    }

    /// `residual = x - U v` for positions `from..`, one channel's row at a time (sequential rows of
    /// `x` and `residual`, `v` in L1); returns the energy of what it wrote.
    #[target_feature(enable = "avx512f")]
    #[allow(clippy::too_many_arguments)]
    unsafe fn subtract_low_rank(
        u: &[f32],
        c: usize,
        r: usize,
        x: &[f32],
        p: usize,
        v: &[f32],
        v_stride: usize,
        residual: &mut [f32],
        from: usize,
    ) -> f64 {
        let whole = if from == 0 { p / LANES * LANES } else { from };
        let mut squares = [_mm512_setzero_pd(); 2];
        let mut tail = 0.0f64;
        for ci in 0..c {
            let (row, out, u_row) =
                (&x[ci * p..(ci + 1) * p], &mut residual[ci * p..(ci + 1) * p], &u[ci * r..(ci + 1) * r]);
            for pos in (from..whole).step_by(LANES) {
                let mut s = _mm512_loadu_ps(row.as_ptr().add(pos));
                for (j, &uj) in u_row.iter().enumerate() {
                    s = _mm512_fnmadd_ps(_mm512_set1_ps(uj), _mm512_loadu_ps(v.as_ptr().add(j * v_stride + pos)), s);
                }
                _mm512_storeu_ps(out.as_mut_ptr().add(pos), s);
                add_squares(s, &mut squares);
            }
            for q in whole..p {
                let mut s = row[q];
                for (j, &uj) in u_row.iter().enumerate() {
                    s -= uj * v[j * v_stride + q];
                }
                out[q] = s;
                tail += f64::from(s) * f64::from(s);
            }
        }
        _mm512_reduce_add_pd(_mm512_add_pd(squares[0], squares[1])) + tail
    }

    /// # Safety
    /// The CPU must have AVX-512F; `x` is `c x p`, `omega` and `y` are `c x k`; `1 <= k <= 16`.
    #[target_feature(enable = "avx512f")]
    pub(crate) unsafe fn power_step(x: &[f32], c: usize, p: usize, omega: &[f32], k: usize, y: &mut [f32]) {
        // Per (channel, column): 16 lanes of partial sums over the blocks, reduced at the end.
        let mut partial = vec![0.0f32; c * k * LANES];
        let (xp, op, pp) = (x.as_ptr(), omega.as_ptr(), partial.as_mut_ptr());
        let pos = dispatch!(k, power_blocks(xp, c, p, 0, op, pp));
        let pos = dispatch_narrow!(k, power_blocks(xp, c, p, pos, op, pp));
        for (yv, lanes) in y.iter_mut().zip(partial.chunks_exact(LANES)) {
            *yv += _mm512_reduce_add_ps(_mm512_loadu_ps(lanes.as_ptr()));
        }
        // The last few positions: t = x^T omega for the position, then y += x t^T.
        let mut t = vec![0.0f32; k];
        for q in pos..p {
            t.fill(0.0);
            for ci in 0..c {
                let xv = x[ci * p + q];
                for (tj, &o) in t.iter_mut().zip(&omega[ci * k..(ci + 1) * k]) {
                    *tj += xv * o;
                }
            }
            for ci in 0..c {
                let xv = x[ci * p + q];
                for (yv, &tj) in y[ci * k..(ci + 1) * k].iter_mut().zip(&t) {
                    *yv += xv * tj;
                }
            }
        }
    }

    /// Every whole step of `16 B` positions from `start`; returns where they end.
    #[target_feature(enable = "avx512f")]
    unsafe fn power_blocks<const K: usize, const B: usize>(
        x: *const f32,
        c: usize,
        p: usize,
        start: usize,
        omega: *const f32,
        partial: *mut f32,
    ) -> usize {
        let mut pos = start;
        while pos + LANES * B <= p {
            power_block::<K, B>(x, c, p, pos, omega, partial);
            pos += LANES * B;
        }
        pos
    }

    /// Positions `pos..pos + 16 B`: `t = X^T omega` for the block in `K x B` registers, then each
    /// channel's row (now in L1) times `t` into that channel's `K` partial sums.
    #[target_feature(enable = "avx512f")]
    #[inline]
    unsafe fn power_block<const K: usize, const B: usize>(
        x: *const f32,
        c: usize,
        p: usize,
        pos: usize,
        omega: *const f32,
        partial: *mut f32,
    ) {
        let t = projection::<K, B>(omega, c, x, p, pos);
        let mut xs = [_mm512_setzero_ps(); B];
        for ci in 0..c {
            let row = x.add(ci * p + pos);
            for (b, xb) in xs.iter_mut().enumerate() {
                *xb = _mm512_loadu_ps(row.add(LANES * b));
            }
            let slots = partial.add(ci * K * LANES);
            for (j, t_j) in t.iter().enumerate() {
                let mut s = _mm512_mul_ps(xs[0], t_j[0]);
                for b in 1..B {
                    s = _mm512_fmadd_ps(xs[b], t_j[b], s);
                }
                let slot = slots.add(j * LANES);
                _mm512_storeu_ps(slot, _mm512_add_ps(_mm512_loadu_ps(slot), s));
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};

    fn values(rng: &mut rand::rngs::StdRng, n: usize) -> Vec<f32> {
        (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect()
    }

    /// (channels, positions, cols): positions below, at and past the block widths and their tails;
    /// columns across every register layout and past the fast path's limit.
    fn shapes() -> Vec<(usize, usize, usize)> {
        let mut out = Vec::new();
        for (c, p) in [(3, 1024), (64, 256), (17, 100), (512, 4), (130, 16), (9, 77), (64, 33)] {
            for r in [1, 2, 3, 4, 5, 7, 8, 9, 12, 16, 17] {
                out.push((c, p, r));
            }
        }
        out
    }

    fn assert_close(got: &[f32], want: &[f64], scale: f64, what: &str) {
        assert_eq!(got.len(), want.len(), "{what}: length");
        for (i, (&g, &w)) in got.iter().zip(want).enumerate() {
            assert!((g as f64 - w).abs() <= 1e-5 * scale, "{what}[{i}]: {g} vs {w}");
        }
    }

    #[test]
    fn split_and_project_match_naive_loops() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(11);
        for (c, p, r) in shapes() {
            let (u, x) = (values(&mut rng, c * r), values(&mut rng, c * p));
            let mut v_want = vec![0.0f64; r * p];
            for j in 0..r {
                for q in 0..p {
                    v_want[j * p + q] = (0..c).map(|ci| u[ci * r + j] as f64 * x[ci * p + q] as f64).sum();
                }
            }
            let mut res_want = vec![0.0f64; c * p];
            for ci in 0..c {
                for q in 0..p {
                    let low: f64 = (0..r).map(|j| u[ci * r + j] as f64 * v_want[j * p + q]).sum();
                    res_want[ci * p + q] = x[ci * p + q] as f64 - low;
                }
            }
            let what = format!("c {c} p {p} r {r}");
            let scale = (c * r) as f64;
            let (mut v, mut res) = (vec![f32::NAN; r * p], vec![f32::NAN; c * p]);
            let energy = split(&u, r, &x, p, &mut v, &mut res);
            assert_close(&v, &v_want, scale, &format!("split v, {what}"));
            assert_close(&res, &res_want, scale, &format!("split residual, {what}"));
            // The energy is that of the residual as written, to f64 summation rounding.
            let written: f64 = res.iter().map(|&r| f64::from(r) * f64::from(r)).sum();
            assert!((energy - written).abs() <= 1e-12 * written, "split energy {energy} vs {written}, {what}");
            // Into a wider matrix: other columns untouched.
            let stride = p + 5;
            let mut wide = vec![7.0f32; r * stride];
            project(&u, r, &x, p, &mut wide, stride);
            for j in 0..r {
                assert_close(&wide[j * stride..j * stride + p], &v_want[j * p..(j + 1) * p], scale, &what);
                assert!(wide[j * stride + p..(j + 1) * stride].iter().all(|&w| w == 7.0), "{what}: stride gap");
            }
            let mut v_portable = vec![f32::NAN; r * p];
            let mut res_portable = vec![f32::NAN; c * p];
            let energy = portable::split(&u, c, r, &x, p, &mut v_portable, &mut res_portable);
            assert_close(&v_portable, &v_want, scale, &format!("portable v, {what}"));
            assert_close(&res_portable, &res_want, scale, &format!("portable residual, {what}"));
            let written: f64 = res_portable.iter().map(|&r| f64::from(r) * f64::from(r)).sum();
            assert!((energy - written).abs() <= 1e-12 * written, "portable energy {energy} vs {written}, {what}");
            // The residual alone, from coordinates computed elsewhere (here: random ones, so the
            // reference is recomputed for them).
            let v_given = values(&mut rng, r * p);
            let mut want = vec![0.0f64; c * p];
            for ci in 0..c {
                for q in 0..p {
                    let low: f64 = (0..r).map(|j| u[ci * r + j] as f64 * v_given[j * p + q] as f64).sum();
                    want[ci * p + q] = x[ci * p + q] as f64 - low;
                }
            }
            let mut out = vec![f32::NAN; c * p];
            let energy = residual(&u, r, &x, p, &v_given, &mut out);
            assert_close(&out, &want, scale, &format!("residual, {what}"));
            let written: f64 = out.iter().map(|&r| f64::from(r) * f64::from(r)).sum();
            assert!((energy - written).abs() <= 1e-12 * written, "residual energy {energy} vs {written}, {what}");
            let mut out = vec![f32::NAN; c * p];
            let energy = portable::residual(&u, c, r, &x, p, &v_given, &mut out);
            assert_close(&out, &want, scale, &format!("portable residual from v, {what}"));
            let written: f64 = out.iter().map(|&r| f64::from(r) * f64::from(r)).sum();
            assert!((energy - written).abs() <= 1e-12 * written, "portable residual energy, {what}");
        }
    }

    #[test]
    fn power_step_matches_naive_loops() {
        let mut rng = rand::rngs::StdRng::seed_from_u64(12);
        for (c, p, k) in shapes() {
            let (x, omega, y0) = (values(&mut rng, c * p), values(&mut rng, c * k), values(&mut rng, c * k));
            let mut t = vec![0.0f64; p * k];
            for q in 0..p {
                for j in 0..k {
                    t[q * k + j] = (0..c).map(|ci| x[ci * p + q] as f64 * omega[ci * k + j] as f64).sum();
                }
            }
            let mut want = vec![0.0f64; c * k];
            for ci in 0..c {
                for j in 0..k {
                    want[ci * k + j] = (0..p).map(|q| x[ci * p + q] as f64 * t[q * k + j]).sum();
                }
            }
            let what = format!("c {c} p {p} k {k}");
            let scale = (c * p) as f64;
            let mut y = vec![f32::NAN; c * k];
            power_step(&x, p, &omega, k, &mut y, false);
            assert_close(&y, &want, scale, &format!("power step, {what}"));
            let mut y = y0.clone();
            power_step(&x, p, &omega, k, &mut y, true);
            let plus: Vec<f64> = want.iter().zip(&y0).map(|(w, &a)| w + a as f64).collect();
            assert_close(&y, &plus, scale, &format!("accumulated power step, {what}"));
            let mut y = y0.clone();
            portable::power_step(&x, c, p, &omega, k, &mut y);
            assert_close(&y, &plus, scale, &format!("portable power step, {what}"));
        }
    }

    #[test]
    fn no_columns_leave_the_residual_equal_to_the_input() {
        let x: Vec<f32> = (0..12).map(|i| i as f32 - 5.5).collect();
        let mut res = vec![0.0; 12];
        let energy = split(&[], 0, &x, 4, &mut [], &mut res);
        assert_eq!(res, x);
        assert_eq!(energy, x.iter().map(|&v| f64::from(v) * f64::from(v)).sum::<f64>());
        let mut y = vec![1.0f32; 0];
        power_step(&x, 4, &[], 0, &mut y, false);
    }

    /// Single-threaded time of the kernels here against the `gemm` route on VGG16's split shapes
    /// (batch 32, the ranks 1, 2, 4, 4, 8 and 4 more columns for the power step), same run:
    /// `cargo test --release -p trustsplit-kernels --lib channel_products::tests::timing -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn timing_against_gemm() {
        // (channels, positions, rank) of each convolution's input in VGG16 at 32x32, and of each
        // output gradient.
        let forward = [(3, 1024, 1), (64, 1024, 2), (64, 256, 4), (128, 256, 4), (128, 64, 8), (256, 64, 8)];
        let backward = [(64, 1024, 1), (64, 1024, 2), (128, 256, 4), (128, 256, 4), (256, 64, 8), (256, 64, 8)];
        let layers: Vec<_> =
            forward.into_iter().chain(backward).chain([(256, 16, 8), (512, 16, 8), (512, 4, 8)]).collect();
        let mut rng = rand::rngs::StdRng::seed_from_u64(1);
        let data: Vec<_> = layers
            .iter()
            .map(|&(c, p, r)| {
                let xs: Vec<Vec<f32>> = (0..32).map(|_| values(&mut rng, c * p)).collect();
                (c, p, r, values(&mut rng, c * r), values(&mut rng, c * (r + 4)), xs)
            })
            .collect();
        let pool = rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap();
        let time = |fast: bool| {
            pool.install(|| {
                let start = std::time::Instant::now();
                for (c, p, r, u, omega, xs) in &data {
                    let (c, p, r) = (*c, *p, *r);
                    let (mut v, mut res, mut y) = (vec![0.0; r * p], vec![0.0; c * p], vec![0.0; c * (r + 4)]);
                    for (b, x) in xs.iter().enumerate() {
                        if fast {
                            power_step(x, p, omega, r + 4, &mut y, b > 0);
                            split(u, r, x, p, &mut v, &mut res);
                        } else {
                            portable::power_step(x, c, p, omega, r + 4, &mut y);
                            portable::split(u, c, r, x, p, &mut v, &mut res);
                        }
                    }
                    std::hint::black_box((&v, &res, &y));
                }
                start.elapsed().as_secs_f64() * 1e3
            })
        };
        let (mut gemm, mut ours) = (f64::INFINITY, f64::INFINITY);
        for _ in 0..5 {
            gemm = gemm.min(time(false));
            ours = ours.min(time(true));
        }
        println!(
            "VGG16 split shapes, batch 32: gemm {gemm:.2} ms, these kernels {ours:.2} ms, speed-up {:.2}x",
            gemm / ours
        );
    }
}
