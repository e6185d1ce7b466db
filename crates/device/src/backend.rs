//! The `Backend` trait and the CPU backend (our own kernels in a private thread pool).

use crate::error::DeviceError;
use crate::op::{GemmShape, Op};
use trustsplit_kernels::conv::{conv2d_backward_data, conv2d_backward_weight, conv2d_forward};
use trustsplit_kernels::matmul::{matmul, parallelism, MatRef};
use trustsplit_kernels::ConvGeometry;

/// A compute backend (runs on the untrusted side).
///
/// Implementations validate their arguments and return [`DeviceError::Invalid`] on a mismatch,
/// so a backend can be driven directly without risking a kernel assertion.
pub trait Backend: Send {
    fn name(&self) -> String;
    /// C (m x n) = op(A) * op(B); A is stored row-major as m x k (or k x m when trans_a), B as
    /// k x n (or n x k when trans_b).
    fn gemm(&mut self, s: &GemmShape, a: &[f32], b: &[f32]) -> Result<Vec<f32>, DeviceError>;
    /// `y = conv(x, w)` (no bias), NCHW.
    fn conv_forward(&mut self, g: &ConvGeometry, x: &[f32], w: &[f32]) -> Result<Vec<f32>, DeviceError>;
    /// `dx` from `dy` and `w`.
    fn conv_backward_data(&mut self, g: &ConvGeometry, dy: &[f32], w: &[f32]) -> Result<Vec<f32>, DeviceError>;
    /// `dw` from `x` and `dy`.
    fn conv_backward_weight(&mut self, g: &ConvGeometry, x: &[f32], dy: &[f32]) -> Result<Vec<f32>, DeviceError>;
}

/// Runs `op` on `backend`: the single dispatch point shared by the local handle and the server.
pub fn run_op(backend: &mut dyn Backend, op: &Op, a: &[f32], b: &[f32]) -> Result<Vec<f32>, DeviceError> {
    match op {
        Op::Gemm(s) => backend.gemm(s, a, b),
        Op::ConvForward(g) => backend.conv_forward(g, a, b),
        Op::ConvBackwardData(g) => backend.conv_backward_data(g, a, b),
        Op::ConvBackwardWeight(g) => backend.conv_backward_weight(g, a, b),
    }
}

/// Validates operands for `op`; returns the result length.
pub(crate) fn check(op: &Op, a: &[f32], b: &[f32]) -> Result<usize, DeviceError> {
    op.check_operands(a.len(), b.len()).map(|s| s.out).map_err(DeviceError::Invalid)
}

/// Our kernels (`trustsplit-kernels`) in their own rayon pool, so a device worker's thread count
/// is independent of whatever pool the caller runs in.
pub struct CpuBackend {
    pool: rayon::ThreadPool,
}

impl CpuBackend {
    /// A backend with `threads` worker threads (0: one per core).
    pub fn new(threads: usize) -> Result<CpuBackend, DeviceError> {
        let pool = rayon::ThreadPoolBuilder::new()
            .num_threads(threads)
            .thread_name(|i| format!("cpu-device-{i}"))
            .build()
            .map_err(|e| DeviceError::Unavailable(format!("cannot start {threads} CPU threads: {e}")))?;
        Ok(CpuBackend { pool })
    }

    pub fn threads(&self) -> usize {
        self.pool.current_num_threads()
    }

    /// Validates, answers trivial shapes, and runs `compute` in the pool on a zeroed output.
    fn run(
        &self,
        op: Op,
        a: &[f32],
        b: &[f32],
        compute: impl FnOnce(&[f32], &[f32], &mut [f32]) + Send,
    ) -> Result<Vec<f32>, DeviceError> {
        let out_len = check(&op, a, b)?;
        if let Some(zeros) = op.trivial_result() {
            return Ok(zeros);
        }
        let mut out = vec![0.0f32; out_len];
        self.pool.install(|| compute(a, b, &mut out));
        Ok(out)
    }
}

impl Backend for CpuBackend {
    fn name(&self) -> String {
        format!("cpu ({} threads)", self.threads())
    }

    fn gemm(&mut self, s: &GemmShape, a: &[f32], b: &[f32]) -> Result<Vec<f32>, DeviceError> {
        let s = *s;
        self.run(Op::Gemm(s), a, b, |a, b, c| {
            let a = if s.trans_a { MatRef::row_major(a, s.k, s.m).t() } else { MatRef::row_major(a, s.m, s.k) };
            let b = if s.trans_b { MatRef::row_major(b, s.n, s.k).t() } else { MatRef::row_major(b, s.k, s.n) };
            matmul(a, b, c, s.n, false, parallelism(rayon::current_num_threads()));
        })
    }

    fn conv_forward(&mut self, g: &ConvGeometry, x: &[f32], w: &[f32]) -> Result<Vec<f32>, DeviceError> {
        self.run(Op::ConvForward(*g), x, w, |x, w, y| conv2d_forward(g, x, w, None, y))
    }

    fn conv_backward_data(&mut self, g: &ConvGeometry, dy: &[f32], w: &[f32]) -> Result<Vec<f32>, DeviceError> {
        self.run(Op::ConvBackwardData(*g), dy, w, |dy, w, dx| conv2d_backward_data(g, dy, w, dx))
    }

    fn conv_backward_weight(&mut self, g: &ConvGeometry, x: &[f32], dy: &[f32]) -> Result<Vec<f32>, DeviceError> {
        self.run(Op::ConvBackwardWeight(*g), x, dy, |x, dy, dw| conv2d_backward_weight(g, x, dy, dw, None))
    }
}
