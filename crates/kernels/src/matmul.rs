//! A safe wrapper around the `gemm` crate's strided f32 matrix product.

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
    assert_eq!(a.cols, b.rows, "matmul: inner dimensions differ");
    let (m, n, k) = (a.rows, b.cols, a.cols);
    a.check("lhs");
    b.check("rhs");
    if m == 0 || n == 0 {
        return;
    }
    assert!((m - 1) * c_row_stride + n <= c.len(), "matmul: destination too small");
    if k == 0 {
        if !accumulate {
            for r in 0..m {
                c[r * c_row_stride..r * c_row_stride + n].fill(0.0);
            }
        }
        return;
    }
    // SAFETY: the asserts above keep every index the product touches inside the three slices;
    // `c` is borrowed mutably, so it cannot alias `a` or `b`.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
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
