//! NVIDIA GPUs through cudarc: cuBLAS `sgemm` for GEMM; convolutions are lowered on the host
//! (im2col/col2im in [`crate::lowering`]) to cuBLAS GEMMs.
//!
//! The lowering is the simple, acceptable first version, not the fast one: the unrolled patches
//! (`kernel_h * kernel_w` times the input) cross PCIe, and weights are uploaded once per chunk.
//! cuDNN would avoid both.
//!
//! cudarc loads `libcuda` and `libcublas` at run time and panics if they are missing, so
//! [`CudaBackend::new`] probes for both first and reports absence as
//! [`DeviceError::Unavailable`].

use crate::backend::{check, Backend};
use crate::error::DeviceError;
use crate::lowering::{self, DEFAULT_MAX_COLS};
use crate::op::{GemmShape, Op};
use cudarc::cublas::sys::cublasOperation_t;
use cudarc::cublas::{CudaBlas, Gemm, GemmConfig};
use cudarc::driver::{CudaContext, CudaStream};
use std::ffi::c_int;
use std::sync::Arc;
use trustsplit_kernels::ConvGeometry;

/// cuBLAS on one CUDA device.
pub struct CudaBackend {
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    name: String,
}

impl CudaBackend {
    /// Opens CUDA device `ordinal`.
    pub fn new(ordinal: usize) -> Result<CudaBackend, DeviceError> {
        // SAFETY: these only try to dlopen the libraries; nothing is called through them.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err(DeviceError::Unavailable(
                "libcuda not found: the NVIDIA driver (libcuda.so) is not installed or not on the loader path".into(),
            ));
        }
        if !unsafe { cudarc::cublas::sys::is_culib_present() } {
            return Err(DeviceError::Unavailable(
                "libcublas not found: install cuBLAS (CUDA 12) or add it to LD_LIBRARY_PATH".into(),
            ));
        }
        let unavailable = |what: &str, e: &dyn std::fmt::Display| {
            DeviceError::Unavailable(format!("CUDA device {ordinal}: {what}: {e}"))
        };
        let ctx = CudaContext::new(ordinal).map_err(|e| unavailable("cannot open", &e))?;
        let gpu = ctx.name().unwrap_or_else(|_| "unknown GPU".into());
        let stream = ctx.default_stream();
        let blas = CudaBlas::new(stream.clone()).map_err(|e| unavailable("cannot start cuBLAS", &e))?;
        Ok(CudaBackend { stream, blas, name: format!("cuda:{ordinal} {gpu}") })
    }

    fn sgemm(&mut self, s: &GemmShape, a: &[f32], b: &[f32]) -> Result<Vec<f32>, DeviceError> {
        let op = Op::Gemm(*s);
        let out_len = check(&op, a, b)?;
        if let Some(zeros) = op.trivial_result() {
            return Ok(zeros);
        }
        let dim = |v: usize, what: &str| {
            c_int::try_from(v)
                .map_err(|_| DeviceError::Invalid(format!("{op}: {what}={v} exceeds cuBLAS's 32-bit sizes")))
        };
        let (m, n, k) = (dim(s.m, "m")?, dim(s.n, "n")?, dim(s.k, "k")?);
        let failed = |e: &dyn std::fmt::Display| DeviceError::Backend(format!("{}: {op}: {e}", self.name));
        let a_dev = self.stream.clone_htod(a).map_err(|e| failed(&e))?;
        let b_dev = self.stream.clone_htod(b).map_err(|e| failed(&e))?;
        let mut c_dev = self.stream.alloc_zeros::<f32>(out_len).map_err(|e| failed(&e))?;
        // cuBLAS is column-major, and a row-major matrix read column-major is its transpose, so
        // compute C^T = op(B)^T op(A)^T: B's buffer is cuBLAS's first operand.
        let flag = |t: bool| if t { cublasOperation_t::CUBLAS_OP_T } else { cublasOperation_t::CUBLAS_OP_N };
        let cfg = GemmConfig {
            transa: flag(s.trans_b),
            transb: flag(s.trans_a),
            m: n,
            n: m,
            k,
            alpha: 1.0f32,
            lda: if s.trans_b { k } else { n },
            ldb: if s.trans_a { m } else { k },
            beta: 0.0f32,
            ldc: n,
        };
        // SAFETY: the buffers hold exactly the element counts the shape implies (checked above),
        // which are what these leading dimensions address.
        unsafe { self.blas.gemm(cfg, &b_dev, &a_dev, &mut c_dev) }.map_err(|e| failed(&e))?;
        self.stream.clone_dtoh(&c_dev).map_err(|e| failed(&e))
    }
}

impl Backend for CudaBackend {
    fn name(&self) -> String {
        self.name.clone()
    }

    fn gemm(&mut self, s: &GemmShape, a: &[f32], b: &[f32]) -> Result<Vec<f32>, DeviceError> {
        self.sgemm(s, a, b)
    }

    fn conv_forward(&mut self, g: &ConvGeometry, x: &[f32], w: &[f32]) -> Result<Vec<f32>, DeviceError> {
        lowering::conv_forward(g, x, w, DEFAULT_MAX_COLS, &mut |s, a, b| self.sgemm(s, a, b))
    }

    fn conv_backward_data(&mut self, g: &ConvGeometry, dy: &[f32], w: &[f32]) -> Result<Vec<f32>, DeviceError> {
        lowering::conv_backward_data(g, dy, w, DEFAULT_MAX_COLS, &mut |s, a, b| self.sgemm(s, a, b))
    }

    fn conv_backward_weight(&mut self, g: &ConvGeometry, x: &[f32], dy: &[f32]) -> Result<Vec<f32>, DeviceError> {
        lowering::conv_backward_weight(g, x, dy, DEFAULT_MAX_COLS, &mut |s, a, b| self.sgemm(s, a, b))
    }
}
