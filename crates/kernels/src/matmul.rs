//! A safe wrapper around the `gemm` crate's strided f32 matrix product: the workspace's one caller
//! of `gemm`.
//!
//! A right operand read through a transposed view, whose columns lie a multiple of 512 bytes
//! apart, is first copied to columns one cache line further apart: `gemm` reads such columns side
//! by side, and columns 4 KB apart (a 1024-position map's) fall in one L1 set, which made products
//! up to 2.6x slower (see `ALIASING_COLUMN_STRIDE` for the figures).
//!
//! Tried and dropped:
//! - Restriding a left operand read through a transposed view, as `matmul_strided` does right
//!   operands: 1.3-1.8x on 1024-row products with 8-16 columns, but within 1-20% on the shapes that
//!   use it (tee-only's backward-data, `w^T` with columns 1152-4608 floats apart) (2026-12-03).
//! - A fresh allocation for each restrided copy: a few hundred KB went back to the system at each
//!   free and made the product 40% slower than not copying at all, hence the thread's kept buffer
//!   (2026-12-03).

use gemm::Parallelism;

/// A read-only strided matrix view over a slice.
#[derive(Clone, Copy)]
pub struct MatRef<'a> {
    pub data: &'a [f32],
    pub rows: usize,
    pub cols: usize,
    pub row_stride: usize,
    pub col_stride: usize,
}

impl<'a> MatRef<'a> {
    /// A row-major `rows x cols` matrix.
    pub fn row_major(data: &'a [f32], rows: usize, cols: usize) -> Self {
        MatRef { data, rows, cols, row_stride: cols, col_stride: 1 }
    }
    /// The transpose of this view (no copy).
    pub fn t(self) -> Self {
        MatRef {
            data: self.data,
            rows: self.cols,
            cols: self.rows,
            row_stride: self.col_stride,
            col_stride: self.row_stride,
        }
    }
    fn check(&self, what: &str) {
        if self.rows > 0 && self.cols > 0 {
            let last = (self.rows - 1) * self.row_stride + (self.cols - 1) * self.col_stride;
            assert!(last < self.data.len(), "matmul: {what} view exceeds its slice");
        }
    }
}

/// How many threads a kernel may use: those of the rayon pool it runs in.
pub fn threads() -> usize {
    rayon::current_num_threads()
}

/// `gemm` parallelism for a product that is the only work in flight.
pub fn parallelism(threads: usize) -> Parallelism {
    if threads > 1 {
        Parallelism::Rayon(threads)
    } else {
        Parallelism::None
    }
}

/// `c = a * b` (or `c += a * b` when `accumulate`), with `c` row-major `a.rows x b.cols`
/// starting at `c[0]` with row stride `c_row_stride`.
pub fn matmul(a: MatRef, b: MatRef, c: &mut [f32], c_row_stride: usize, accumulate: bool, par: Parallelism) {
    matmul_strided(a, b, c, c_row_stride, 1, accumulate, par);
}

/// `c = a * b` (or `c += a * b` when `accumulate`), with `c` an `a.rows x b.cols` matrix starting
/// at `c[0]`: element `(i, j)` lives at `c[i * c_row_stride + j * c_col_stride]`. The strides must
/// not make two elements share a place (the product would race on them).
pub fn matmul_strided(
    a: MatRef,
    b: MatRef,
    c: &mut [f32],
    c_row_stride: usize,
    c_col_stride: usize,
    accumulate: bool,
    par: Parallelism,
) {
    if !columns_alias(&b) {
        return matmul_strided_as_given(a, b, c, c_row_stride, c_col_stride, accumulate, par);
    }
    // The copy's buffer is kept by the thread between products, up to RETAINED_FLOATS: a fresh
    // allocation of a few hundred kilobytes goes back to the system when freed and is paid for
    // again in page faults each time (that made the 64 x 1024 x 72 product of
    // ALIASING_COLUMN_STRIDE's figures 40% slower than not copying at all).
    // It is taken out of its cell for the product, not borrowed: a thread that waits inside a
    // parallel `gemm` may run another rayon job meanwhile, whose product then finds the cell
    // empty and allocates its own.
    const RETAINED_FLOATS: usize = 1 << 18;
    thread_local! {
        static RESTRIDED: std::cell::Cell<Vec<f32>> = const { std::cell::Cell::new(Vec::new()) };
    }
    let mut scratch = RESTRIDED.take();
    matmul_strided_as_given(
        a,
        restride_aliasing_columns(b, &mut scratch),
        c,
        c_row_stride,
        c_col_stride,
        accumulate,
        par,
    );
    if scratch.capacity() <= RETAINED_FLOATS {
        RESTRIDED.set(scratch);
    }
}

/// [`matmul_strided`] without moving aliasing columns apart (public for the example that
/// compares the two: `cargo run --release -p trustsplit-kernels --example aliasing_columns`).
#[doc(hidden)]
pub fn matmul_strided_as_given(
    a: MatRef,
    b: MatRef,
    c: &mut [f32],
    c_row_stride: usize,
    c_col_stride: usize,
    accumulate: bool,
    par: Parallelism,
) {
    assert_eq!(a.cols, b.rows, "matmul: inner dimensions differ");
    let (m, n, k) = (a.rows, b.cols, a.cols);
    a.check("lhs");
    b.check("rhs");
    if m == 0 || n == 0 {
        return;
    }
    assert!((m - 1) * c_row_stride + (n - 1) * c_col_stride < c.len(), "matmul: destination too small");
    assert!(disjoint(m, n, c_row_stride, c_col_stride), "matmul: destination elements overlap");
    if k == 0 {
        if !accumulate {
            for r in 0..m {
                for j in 0..n {
                    c[r * c_row_stride + j * c_col_stride] = 0.0;
                }
            }
        }
        return;
    }
    // SAFETY: the asserts above keep every index the product touches inside the three slices and
    // give every destination element its own place; `c` is borrowed mutably, so it cannot alias
    // `a` or `b`.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            c_col_stride as isize,
            c_row_stride as isize,
            accumulate,
            a.data.as_ptr(),
            a.col_stride as isize,
            a.row_stride as isize,
            b.data.as_ptr(),
            b.col_stride as isize,
            b.row_stride as isize,
            1.0,
            1.0,
            false,
            false,
            false,
            par,
        );
    }
}

/// A right operand whose columns are contiguous (`row_stride == 1`, a transposed row-major
/// matrix) and lie a multiple of this many floats (512 bytes) apart is copied to columns
/// [`COLUMN_PADDING`] floats further apart before the product: `gemm` reads such columns side by
/// side, and columns 4 KB apart fall in the same L1 cache set. One thread, 32 products of
/// 64 x 1024 times 1024 x 72 on a Zen 5 EPYC: 5.6-7.4 ms through the transposed view against
/// 2.4-2.8 ms restrided, copy included; 1.2-2x on other 1024-long shapes
/// (`cargo run --release -p trustsplit-kernels --example aliasing_columns`).
const ALIASING_COLUMN_STRIDE: usize = 128;
/// How much further apart [`restride_aliasing_columns`] puts the columns: 64 bytes, one line.
const COLUMN_PADDING: usize = 16;

/// `b`, or where its columns alias (see [`ALIASING_COLUMN_STRIDE`]) a copy of it in `scratch`
/// with columns [`COLUMN_PADDING`] floats further apart. The copy reads and writes `k x n`
/// values once, against the product's `m` multiply-adds for each.
fn restride_aliasing_columns<'a>(b: MatRef<'a>, scratch: &'a mut Vec<f32>) -> MatRef<'a> {
    if !columns_alias(&b) {
        return b;
    }
    let (k, n) = (b.rows, b.cols);
    let stride = k + COLUMN_PADDING;
    scratch.clear();
    scratch.reserve(stride * n);
    for j in 0..n {
        scratch.extend_from_slice(&b.data[j * b.col_stride..][..k]);
        scratch.extend_from_slice(&[0.0; COLUMN_PADDING]);
    }
    MatRef { data: scratch, rows: k, cols: n, row_stride: 1, col_stride: stride }
}

/// Whether `b`'s columns are contiguous, long and a multiple of [`ALIASING_COLUMN_STRIDE`] apart.
fn columns_alias(b: &MatRef) -> bool {
    b.row_stride == 1
        && b.cols >= 2
        && b.rows >= ALIASING_COLUMN_STRIDE
        && b.col_stride.is_multiple_of(ALIASING_COLUMN_STRIDE)
}

/// Whether an `m x n` destination with these strides gives every element its own place (a
/// sufficient test: one axis steps over the whole extent of the other).
fn disjoint(m: usize, n: usize, row_stride: usize, col_stride: usize) -> bool {
    match (m, n) {
        (1, 1) => true,
        (1, _) => col_stride > 0,
        (_, 1) => row_stride > 0,
        _ => (col_stride > 0 && row_stride >= n * col_stride) || (row_stride > 0 && col_stride >= m * row_stride),
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    /// A strided view of the given shape and strides, starting at `offset`, over random values.
    fn random_view(rng: &mut ChaCha8Rng, rows: usize, cols: usize, rs: usize, cs: usize, offset: usize) -> Vec<f32> {
        let len = offset + (rows.max(1) - 1) * rs + (cols.max(1) - 1) * cs + 1 + rng.random_range(0..3);
        (0..len).map(|_| rng.random_range(-1.0f32..1.0)).collect()
    }

    #[test]
    fn strided_products_match_a_naive_loop() {
        let mut rng = ChaCha8Rng::seed_from_u64(7);
        for case in 0..200 {
            let (m, n, k) = (rng.random_range(1..9), rng.random_range(1..9), rng.random_range(0..9));
            // Operand layouts: row-major, column-major or interleaved (padded) strides.
            let layout = |rng: &mut ChaCha8Rng, rows: usize, cols: usize| -> (usize, usize) {
                let pad = rng.random_range(0..3);
                match rng.random_range(0..3) {
                    0 => (cols + pad, 1),
                    1 => (1, rows + pad),
                    _ => {
                        let inner = rng.random_range(2..4);
                        (cols * inner + pad, inner)
                    }
                }
            };
            let (ars, acs) = layout(&mut rng, m, k);
            let (brs, bcs) = layout(&mut rng, k, n);
            let (crs, ccs) = layout(&mut rng, m, n);
            let (ao, bo, co) = (rng.random_range(0..3), rng.random_range(0..3), rng.random_range(0..3));
            let a_data = random_view(&mut rng, m, k, ars, acs, ao);
            let b_data = random_view(&mut rng, k, n, brs, bcs, bo);
            let c_start = random_view(&mut rng, m, n, crs, ccs, co);
            let a = MatRef { data: &a_data[ao..], rows: m, cols: k, row_stride: ars, col_stride: acs };
            let b = MatRef { data: &b_data[bo..], rows: k, cols: n, row_stride: brs, col_stride: bcs };
            for accumulate in [false, true] {
                let par = if case % 2 == 0 { Parallelism::None } else { parallelism(2) };
                let mut c = c_start.clone();
                matmul_strided(a, b, &mut c[co..], crs, ccs, accumulate, par);
                let mut want: Vec<f64> = c_start.iter().map(|&v| v as f64).collect();
                for i in 0..m {
                    for j in 0..n {
                        let mut sum = 0.0f64;
                        for l in 0..k {
                            sum += a_data[ao + i * ars + l * acs] as f64 * b_data[bo + l * brs + j * bcs] as f64;
                        }
                        let at = co + i * crs + j * ccs;
                        want[at] = if accumulate { want[at] + sum } else { sum };
                    }
                }
                // Every value outside the destination's elements is left alone.
                for (at, (&got, &w)) in c.iter().zip(&want).enumerate() {
                    assert!(
                        (got as f64 - w).abs() <= 1e-5 * (1.0 + w.abs()),
                        "case {case} ({m}x{k} * {k}x{n}, accumulate {accumulate}): [{at}] {got} vs {w}"
                    );
                }
            }
        }
    }

    /// Columns a multiple of 128 floats apart are copied closer before the product
    /// (`restride_aliasing_columns`): the result is still the product of the given values, with
    /// the padding never read.
    #[test]
    fn restrided_column_major_operands_match_a_naive_loop() {
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        for (m, k, n, col_stride) in [(3, 128, 2, 128), (5, 130, 7, 256), (2, 300, 3, 384), (4, 1024, 6, 1024)] {
            let a_data = random_view(&mut rng, m, k, k, 1, 0);
            let b_data = random_view(&mut rng, k, n, 1, col_stride, 0);
            let a = MatRef::row_major(&a_data, m, k);
            let b = MatRef { data: &b_data, rows: k, cols: n, row_stride: 1, col_stride };
            let mut scratch = Vec::new();
            let moved = restride_aliasing_columns(b, &mut scratch);
            assert_eq!(
                moved.col_stride,
                k + COLUMN_PADDING,
                "{m}x{k} * {k}x{n}: columns {col_stride} apart were not moved"
            );
            let mut c = vec![0.0f32; m * n];
            matmul(a, b, &mut c, n, false, Parallelism::None);
            for i in 0..m {
                for j in 0..n {
                    let want: f64 = (0..k).map(|l| a_data[i * k + l] as f64 * b_data[l + j * col_stride] as f64).sum();
                    let got = c[i * n + j] as f64;
                    assert!(
                        (got - want).abs() <= 1e-5 * (1.0 + want.abs()),
                        "({i}, {j}) of {m}x{k} * {k}x{n}: {got} vs {want}"
                    );
                }
            }
        }
        // Columns not a multiple of 128 apart, or shorter than 128, are used as they are.
        let data = vec![0.5f32; 4 * 200];
        let unaligned = MatRef { data: &data, rows: 130, cols: 4, row_stride: 1, col_stride: 200 };
        assert_eq!(restride_aliasing_columns(unaligned, &mut Vec::new()).col_stride, 200);
        let short = MatRef { data: &data, rows: 100, cols: 4, row_stride: 1, col_stride: 128 };
        assert_eq!(restride_aliasing_columns(short, &mut Vec::new()).col_stride, 128);
    }

    /// Restrided products run from many rayon jobs at once, each parallel inside (a thread that
    /// waits in one product may run another job's product meanwhile), give each job's own result.
    #[test]
    fn restrided_products_in_nested_rayon_jobs_stay_apart() {
        use rayon::prelude::*;
        let (m, k, n) = (192, 256, 96);
        let mut rng = ChaCha8Rng::seed_from_u64(5);
        let a_data = random_view(&mut rng, m, k, k, 1, 0);
        let pool = rayon::ThreadPoolBuilder::new().num_threads(3).build().unwrap();
        let results: Vec<(Vec<f32>, Vec<f64>)> = pool.install(|| {
            (0..24)
                .into_par_iter()
                .map(|job| {
                    let b_t: Vec<f32> = (0..n * k).map(|i| ((i * 31 + job * 7) % 97) as f32 / 97.0 - 0.5).collect();
                    let b = MatRef::row_major(&b_t, n, k).t();
                    let mut c = vec![0.0f32; m * n];
                    matmul(MatRef::row_major(&a_data, m, k), b, &mut c, n, false, parallelism(3));
                    let want = (0..m * n)
                        .map(|at| (0..k).map(|l| a_data[(at / n) * k + l] as f64 * b_t[(at % n) * k + l] as f64).sum())
                        .collect();
                    (c, want)
                })
                .collect()
        });
        for (job, (got, want)) in results.iter().enumerate() {
            for (g, w) in got.iter().zip(want) {
                assert!((*g as f64 - w).abs() <= 1e-4 * (1.0 + w.abs()), "job {job}: {g} vs {w}");
            }
        }
    }

    #[test]
    #[should_panic(expected = "destination elements overlap")]
    fn overlapping_destination_strides_are_refused() {
        let (a, b) = (vec![1.0f32; 4], vec![1.0f32; 4]);
        let mut c = vec![0.0f32; 8];
        // 2 x 2 with strides (1, 1): elements (0, 1) and (1, 0) share a place.
        let (a, b) = (MatRef::row_major(&a, 2, 2), MatRef::row_major(&b, 2, 2));
        matmul_strided(a, b, &mut c, 1, 1, false, Parallelism::None);
    }

    #[test]
    #[should_panic(expected = "destination too small")]
    fn a_destination_past_its_slice_is_refused() {
        let (a, b) = (vec![1.0f32; 4], vec![1.0f32; 4]);
        let mut c = vec![0.0f32; 6];
        // 2 x 2 with strides (4, 2): the last element sits at 4 + 2 = 6.
        matmul_strided(
            MatRef::row_major(&a, 2, 2),
            MatRef::row_major(&b, 2, 2),
            &mut c,
            4,
            2,
            false,
            Parallelism::None,
        );
    }
}
