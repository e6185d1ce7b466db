//! Products over Z_2^64: matrix products and 2-D convolutions with wrapping `u64` arithmetic.
//!
//! Every party's share of a private product is a sum of ring products of shares (see
//! [`crate::arith`]), so these kernels are where the protocol spends its compute.
//! All matrices are row-major. Every function here is bit-exact with the naive definition
//! (checked against it in the tests on random full-range values).
//!
//! `cargo bench -p trustsplit-cryptgpu --bench ring_products`, 2026-12-07, 2 shared vCPUs of an AMD EPYC
//! (Zen 5, AVX-512, load 3-4), best of 5, native `u64` / `f64` 16-bit limbs / 22-bit limbs / `f32` in ms:
//! LeNet conv1 20x25x73728 2.4 / 89 / 62 / 1.05; conv2 50x500x8192 10.6 / 133 / 94 / 1.8; fc1 128x800x500
//! 1.0 / 9.4 / refused (k > 512) / 0.40; VGG16 256x2304x2048 38.5 / 358 / refused / 16.1. Float limbs run
//! 9-37x slower than native (6 or 10 `f64` products plus split and recombine), so [`matmul`] stays native
//! on `vpmullq`; a plaintext `f32` GEMM is 2.3-6x faster than it.
//!
//! On a machine with an NVIDIA GPU, [`set_ring_device`]`(`[`RingDevice::Cuda`]`)` (the `cuda` feature)
//! sends every product here through float limbs and cuBLAS DGEMM instead (`gemm/cuda.rs`); that path
//! is compile-checked in CI but has not yet run on a GPU.

mod conv;
#[cfg(feature = "cuda")]
pub mod cuda;
mod kernel;
mod limbs;
#[cfg(test)]
mod reference;
#[cfg(test)]
mod tests;

use rayon::prelude::*;

use kernel::{gemm_acc, View};

pub use limbs::matmul_float_limbs;

/// Where this process computes its ring products (all of [`matmul`], [`matmul_tn`],
/// [`matmul_nt`], [`conv2d`], [`conv2d_input_grad`], [`conv2d_weight_grad`]).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq)]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
pub enum RingDevice {
    /// Native `u64` GEMMs on this machine's cores.
    #[default]
    Cpu,
    /// Float limbs through cuBLAS DGEMM on CUDA device 0 (built with the `cuda` feature).
    Cuda,
}

/// Selects where this process's ring products run from now on; every party thread of the
/// process shares the choice.
///
/// `Cuda` opens CUDA device 0 and cuBLAS now, so a build without the `cuda` feature, a machine
/// without the NVIDIA driver or cuBLAS, or a device that fails to open is an error here and the
/// CPU stays selected. A GPU product that fails later does not panic: that product and all later
/// ones run on the CPU, and the failure is reported once on stderr. Both paths are exact, so a
/// switch mid-run changes no result. A matrix product longer than exact 16-bit limbs allow
/// (`k > 2^21`) runs on the CPU alone, without a warning.
pub fn set_ring_device(device: RingDevice) -> Result<(), String> {
    match device {
        RingDevice::Cpu => {
            #[cfg(feature = "cuda")]
            cuda::deselect();
            Ok(())
        }
        #[cfg(feature = "cuda")]
        RingDevice::Cuda => cuda::select(),
        #[cfg(not(feature = "cuda"))]
        RingDevice::Cuda => {
            Err("ring products on CUDA need a build with the `cuda` feature (trustsplit-cryptgpu/cuda; \
             `cargo build -p trustsplit --features cuda`); this one has only the CPU path"
                .into())
        }
    }
}

/// Where ring products run now: [`RingDevice::Cpu`] until [`set_ring_device`] selects CUDA,
/// and again after a GPU failure.
pub fn ring_device() -> RingDevice {
    #[cfg(feature = "cuda")]
    if cuda::selected() {
        return RingDevice::Cuda;
    }
    RingDevice::Cpu
}

/// `C = A B` for `A: m x k`, `B: k x n`.
pub fn matmul(a: &[u64], b: &[u64], m: usize, k: usize, n: usize) -> Vec<u64> {
    assert_eq!(a.len(), m * k);
    assert_eq!(b.len(), k * n);
    #[cfg(feature = "cuda")]
    if let Some(c) = cuda::try_product("matmul", k, |gpu| gpu.matmul(a, b, m, k, n)) {
        return c;
    }
    let mut c = vec![0u64; m * n];
    gemm_acc(&mut c, View::rows(a, k), View::rows(b, n), m, k, n);
    c
}

/// `C = A^T B` for `A` stored `k x m` and `B: k x n` (`C: m x n`).
pub fn matmul_tn(a: &[u64], b: &[u64], m: usize, k: usize, n: usize) -> Vec<u64> {
    assert_eq!(a.len(), k * m);
    assert_eq!(b.len(), k * n);
    #[cfg(feature = "cuda")]
    if let Some(c) = cuda::try_product("matmul_tn", k, |gpu| gpu.matmul_tn(a, b, m, k, n)) {
        return c;
    }
    let mut c = vec![0u64; m * n];
    gemm_acc(&mut c, View::transposed(a, m), View::rows(b, n), m, k, n);
    c
}

/// `C = A B^T` for `A: m x k` and `B` stored `n x k` (`C: m x n`).
pub fn matmul_nt(a: &[u64], b: &[u64], m: usize, k: usize, n: usize) -> Vec<u64> {
    assert_eq!(a.len(), m * k);
    assert_eq!(b.len(), n * k);
    #[cfg(feature = "cuda")]
    if let Some(c) = cuda::try_product("matmul_nt", k, |gpu| gpu.matmul_nt(a, b, m, k, n)) {
        return c;
    }
    let mut c = vec![0u64; m * n];
    gemm_acc(&mut c, View::rows(a, k), View::transposed(b, k), m, k, n);
    c
}

/// `y = conv(x, w)`: `N x O x OH x OW` from `x: N x C x H x W` and `w: O x C x K x K`.
pub fn conv2d(x: &[u64], w: &[u64], s: &ConvShape) -> Vec<u64> {
    assert_eq!(x.len(), s.input_len());
    assert_eq!(w.len(), s.weight_len());
    #[cfg(feature = "cuda")]
    if let Some(y) = cuda::try_run("conv2d", |gpu| gpu.conv2d(x, w, s)) {
        return y;
    }
    conv::conv2d(x, w, s)
}

/// The input gradient `dx` (`N x C x H x W`) of [`conv2d`] from `dy` (`N x O x OH x OW`).
pub fn conv2d_input_grad(dy: &[u64], w: &[u64], s: &ConvShape) -> Vec<u64> {
    assert_eq!(dy.len(), s.output_len());
    assert_eq!(w.len(), s.weight_len());
    #[cfg(feature = "cuda")]
    if let Some(dx) = cuda::try_run("conv2d_input_grad", |gpu| gpu.conv2d_input_grad(dy, w, s)) {
        return dx;
    }
    conv::conv2d_input_grad(dy, w, s)
}

/// The weight gradient `dw` (`O x C x K x K`) of [`conv2d`] from its input and `dy`.
pub fn conv2d_weight_grad(x: &[u64], dy: &[u64], s: &ConvShape) -> Vec<u64> {
    assert_eq!(x.len(), s.input_len());
    assert_eq!(dy.len(), s.output_len());
    #[cfg(feature = "cuda")]
    if let Some(dw) = cuda::try_run("conv2d_weight_grad", |gpu| gpu.conv2d_weight_grad(x, dy, s)) {
        return dw;
    }
    conv::conv2d_weight_grad(x, dy, s)
}

/// Side of the square blocks [`transpose`] moves: 32 x 32 `u64` reads 32 lines and writes 32
/// lines, all of which fit in L1 together.
const TRANSPOSE_BLOCK: usize = 32;

/// The transpose of a `rows x cols` matrix.
pub fn transpose(a: &[u64], rows: usize, cols: usize) -> Vec<u64> {
    assert_eq!(a.len(), rows * cols);
    let mut t = vec![0u64; rows * cols];
    if t.is_empty() {
        return t;
    }
    t.par_chunks_mut(TRANSPOSE_BLOCK * rows).enumerate().for_each(|(band, out)| {
        let c0 = band * TRANSPOSE_BLOCK;
        let band_cols = out.len() / rows;
        for r0 in (0..rows).step_by(TRANSPOSE_BLOCK) {
            for r in r0..rows.min(r0 + TRANSPOSE_BLOCK) {
                for (dc, &v) in a[r * cols + c0..][..band_cols].iter().enumerate() {
                    out[dc * rows + r] = v;
                }
            }
        }
    });
    t
}

/// A 2-D convolution's geometry: `N x C x H x W` input, `O x C x K x K` weight, symmetric zero
/// padding.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct ConvShape {
    pub batch: usize,
    pub in_channels: usize,
    pub height: usize,
    pub width: usize,
    pub out_channels: usize,
    pub kernel: usize,
    pub stride: usize,
    pub padding: usize,
}

impl ConvShape {
    pub fn out_height(&self) -> usize {
        (self.height + 2 * self.padding - self.kernel) / self.stride + 1
    }
    pub fn out_width(&self) -> usize {
        (self.width + 2 * self.padding - self.kernel) / self.stride + 1
    }
    pub fn input_len(&self) -> usize {
        self.batch * self.in_channels * self.height * self.width
    }
    pub fn weight_len(&self) -> usize {
        self.out_channels * self.in_channels * self.kernel * self.kernel
    }
    pub fn output_len(&self) -> usize {
        self.batch * self.out_channels * self.out_height() * self.out_width()
    }
}
