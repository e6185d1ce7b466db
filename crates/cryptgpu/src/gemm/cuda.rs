//! Ring products on an NVIDIA GPU: CryptGPU's float limbs through cuBLAS DGEMM.
//!
//! A product over Z_2^64 is split into limbs on the host (`LimbPlan` in `limbs.rs`: the split and
//! recombine that the CPU's [`super::matmul_float_limbs`] runs and its tests check), the `f64` limb
//! stacks are uploaded, one DGEMM per limb of `B` computes every limb pair that survives mod 2^64 (6
//! pairs in 3 DGEMMs with 22-bit limbs while `k <= 512`, 10 pairs in 4 DGEMMs with 16-bit limbs
//! up to `k = 2^21`), and each result is downloaded and recombined on the host. Every limb
//! product is an integer below 2^53 and every partial sum of it is too, so the DGEMMs are exact
//! whatever order cuBLAS sums in. Convolutions are lowered on the host (im2col/col2im of
//! `super::conv`) to these products.
//!
//! This is the straightforward version: weights are split and uploaded once per group of images,
//! and nothing overlaps transfers with compute. It is compile-checked in CI
//! (`cargo check -p trustsplit --features cuda`) and has not yet run on a GPU.
//!
//! cudarc loads `libcuda` and `libcublas` at run time and panics if they are missing, so
//! [`CudaRing::new`] probes for both first and reports their absence as an error, as the device
//! crate's CUDA backend does.

use std::ffi::c_int;
use std::panic::{self, AssertUnwindSafe};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{Arc, Mutex, MutexGuard};

use cudarc::cublas::sys::cublasOperation_t;
use cudarc::cublas::{CudaBlas, Gemm, GemmConfig};
use cudarc::driver::{CudaSlice, CudaStream};

use super::conv::{col2im, group_columns, im2col, ungroup_columns};
use super::kernel::add_assign;
use super::limbs::{limb_bits_for, LimbPlan};
use super::{transpose, ConvShape};

/// Most GEMM columns (output pixels times images) a convolution lowers at once: bounds the host
/// and GPU memory of the lowered input (`C*K*K` rows of it, times 4 limbs in `f64`) and keeps a
/// weight gradient's inner dimension far below the 16-bit limbs' bound of 2^21.
const MAX_COLUMNS: usize = 1 << 16;

/// cuBLAS on one CUDA device, computing ring products over Z_2^64.
pub struct CudaRing {
    stream: Arc<CudaStream>,
    blas: CudaBlas,
    name: String,
}

impl CudaRing {
    /// Opens CUDA device `ordinal` and a cuBLAS handle on its default stream.
    pub fn new(ordinal: usize) -> Result<CudaRing, String> {
        // SAFETY: these only try to dlopen the libraries; nothing is called through them.
        if !unsafe { cudarc::driver::sys::is_culib_present() } {
            return Err(
                "libcuda not found: the NVIDIA driver (libcuda.so) is not installed or not on the loader path".into()
            );
        }
        if !unsafe { cudarc::cublas::sys::is_culib_present() } {
            return Err("libcublas not found: install cuBLAS (CUDA 12) or add it to LD_LIBRARY_PATH".into());
        }
        let unavailable = |what: &str, e: &dyn std::fmt::Display| format!("CUDA device {ordinal}: {what}: {e}");
        let ctx = cudarc::driver::CudaContext::new(ordinal).map_err(|e| unavailable("cannot open", &e))?;
        let gpu = ctx.name().unwrap_or_else(|_| "unknown GPU".into());
        let stream = ctx.default_stream();
        let blas = CudaBlas::new(stream.clone()).map_err(|e| unavailable("cannot start cuBLAS", &e))?;
        Ok(CudaRing { stream, blas, name: format!("cuda:{ordinal} {gpu}") })
    }

    /// The device, as `cuda:ORDINAL NAME`.
    pub fn name(&self) -> &str {
        &self.name
    }

    /// `C = A B` over Z_2^64 for `A: m x k`, `B: k x n`, all row-major; an error for `k > 2^21`
    /// (where 16-bit limbs are no longer exact) or a CUDA failure.
    pub fn matmul(&mut self, a: &[u64], b: &[u64], m: usize, k: usize, n: usize) -> Result<Vec<u64>, String> {
        if a.len() != m * k || b.len() != k * n {
            return Err(format!("matmul {m}x{k}x{n}: operands of {} and {} values", a.len(), b.len()));
        }
        let plan = LimbPlan::new(m, k, n, limb_bits_for(k)?)?;
        let mut c = vec![0u64; m * n];
        if plan.is_empty() {
            return Ok(c);
        }
        let dim = |v: usize, what: &str| {
            c_int::try_from(v).map_err(|_| format!("matmul {m}x{k}x{n}: {what} = {v} exceeds cuBLAS's 32-bit sizes"))
        };
        let (widest, n_int, k_int) = (plan.rows(0), dim(n, "n")?, dim(k, "k")?);
        dim(widest, "limb rows")?;
        let failed = |e: &dyn std::fmt::Display| format!("{}: matmul {m}x{k}x{n}: {e}", self.name);
        // Party threads take turns on the ring, and cuBLAS runs on whichever context is current
        // on the calling thread.
        self.stream.context().bind_to_thread().map_err(|e| failed(&e))?;
        let a_dev = self.stream.clone_htod(&plan.split(a)).map_err(|e| failed(&e))?;
        let b_dev = self.stream.clone_htod(&plan.split(b)).map_err(|e| failed(&e))?;
        let mut c_dev: CudaSlice<f64> = self.stream.alloc_zeros(widest * n).map_err(|e| failed(&e))?;
        let mut products = vec![0.0f64; widest * n];
        for j in 0..plan.limbs {
            let rows = plan.rows(j);
            let a_view = a_dev.slice(..rows * k);
            let b_view = b_dev.slice(j * k * n..(j + 1) * k * n);
            let mut c_view = c_dev.slice_mut(..rows * n);
            // cuBLAS is column-major, and a row-major matrix read column-major is its transpose,
            // so compute C^T = B^T A^T: B's buffer is cuBLAS's first operand.
            let cfg = GemmConfig {
                transa: cublasOperation_t::CUBLAS_OP_N,
                transb: cublasOperation_t::CUBLAS_OP_N,
                m: n_int,
                n: dim(rows, "limb rows")?,
                k: k_int,
                alpha: 1.0f64,
                lda: n_int,
                ldb: k_int,
                beta: 0.0f64,
                ldc: n_int,
            };
            // SAFETY: `a_view` holds `rows x k`, `b_view` `k x n` and `c_view` `rows x n` values
            // (the plan's sizes, with the operands' lengths checked above), which are what these
            // dimensions and leading dimensions address.
            unsafe { self.blas.gemm(cfg, &b_view, &a_view, &mut c_view) }.map_err(|e| failed(&e))?;
            let products = &mut products[..rows * n];
            self.stream.memcpy_dtoh(&c_view, products).map_err(|e| failed(&e))?;
            // cudarc does not synchronise a download into a plain slice, and errors of its
            // asynchronous frees are only recorded on the context: both are settled before the
            // host reads the products.
            self.stream.synchronize().map_err(|e| failed(&e))?;
            self.stream.context().check_err().map_err(|e| failed(&e))?;
            plan.accumulate(&mut c, j, products);
        }
        Ok(c)
    }

    /// `C = A^T B` for `A` stored `k x m` and `B: k x n`.
    pub fn matmul_tn(&mut self, a: &[u64], b: &[u64], m: usize, k: usize, n: usize) -> Result<Vec<u64>, String> {
        if a.len() != k * m {
            return Err(format!("matmul_tn {m}x{k}x{n}: A of {} values", a.len()));
        }
        // The limb stacks pair a contiguous prefix of `A`'s rows with each limb of `B`, which a
        // transposed read cannot give; a host transpose costs far less than the limb products.
        self.matmul(&transpose(a, k, m), b, m, k, n)
    }

    /// `C = A B^T` for `A: m x k` and `B` stored `n x k`.
    pub fn matmul_nt(&mut self, a: &[u64], b: &[u64], m: usize, k: usize, n: usize) -> Result<Vec<u64>, String> {
        if b.len() != n * k {
            return Err(format!("matmul_nt {m}x{k}x{n}: B of {} values", b.len()));
        }
        self.matmul(a, &transpose(b, n, k), m, k, n)
    }

    /// [`super::conv2d`] on the GPU.
    pub fn conv2d(&mut self, x: &[u64], w: &[u64], s: &ConvShape) -> Result<Vec<u64>, String> {
        check_lengths("conv2d", s, &[(x.len(), s.input_len(), "x"), (w.len(), s.weight_len(), "w")])?;
        let mut y = vec![0u64; s.output_len()];
        if y.is_empty() || x.is_empty() || w.is_empty() {
            return Ok(y);
        }
        let Lowering { o, p, ckk, chw, g } = Lowering::new(s);
        let mut cols = Vec::new();
        for (yg, xg) in y.chunks_mut(g * o * p).zip(x.chunks(g * chw)) {
            let gn = yg.len() / (o * p);
            im2col(xg, s, gn, &mut cols);
            let out = self.matmul(w, &cols[..ckk * gn * p], o, ckk, gn * p)?;
            ungroup_columns(&out, o, p, gn, yg);
        }
        Ok(y)
    }

    /// [`super::conv2d_input_grad`] on the GPU.
    pub fn conv2d_input_grad(&mut self, dy: &[u64], w: &[u64], s: &ConvShape) -> Result<Vec<u64>, String> {
        check_lengths("conv2d_input_grad", s, &[(dy.len(), s.output_len(), "dy"), (w.len(), s.weight_len(), "w")])?;
        let mut dx = vec![0u64; s.input_len()];
        if dx.is_empty() || dy.is_empty() || w.is_empty() {
            return Ok(dx);
        }
        let Lowering { o, p, ckk, chw, g } = Lowering::new(s);
        let wt = transpose(w, o, ckk);
        let mut gathered = Vec::new();
        for (dxg, dyg) in dx.chunks_mut(g * chw).zip(dy.chunks(g * o * p)) {
            let gn = dyg.len() / (o * p);
            let dy_mat = group_columns(dyg, o, p, gn, &mut gathered);
            let dcols = self.matmul(&wt, dy_mat, ckk, o, gn * p)?;
            col2im(&dcols, s, gn, dxg);
        }
        Ok(dx)
    }

    /// [`super::conv2d_weight_grad`] on the GPU.
    pub fn conv2d_weight_grad(&mut self, x: &[u64], dy: &[u64], s: &ConvShape) -> Result<Vec<u64>, String> {
        check_lengths("conv2d_weight_grad", s, &[(x.len(), s.input_len(), "x"), (dy.len(), s.output_len(), "dy")])?;
        let mut dw = vec![0u64; s.weight_len()];
        if dw.is_empty() || x.is_empty() || dy.is_empty() {
            return Ok(dw);
        }
        let Lowering { o, p, ckk, chw, g } = Lowering::new(s);
        let (mut cols, mut gathered) = (Vec::new(), Vec::new());
        for (xg, dyg) in x.chunks(g * chw).zip(dy.chunks(g * o * p)) {
            let gn = dyg.len() / (o * p);
            let dy_mat = group_columns(dyg, o, p, gn, &mut gathered);
            im2col(xg, s, gn, &mut cols);
            let cols_t = transpose(&cols[..ckk * gn * p], ckk, gn * p);
            add_assign(&mut dw, &self.matmul(dy_mat, &cols_t, o, gn * p, ckk)?);
        }
        Ok(dw)
    }
}

/// A convolution's lowered sizes on the GPU path.
struct Lowering {
    /// Output channels.
    o: usize,
    /// Output pixels per image and channel.
    p: usize,
    /// Rows of the lowered input: `C * K * K`.
    ckk: usize,
    /// Values per input image: `C * H * W`.
    chw: usize,
    /// Images lowered and multiplied at once.
    g: usize,
}

impl Lowering {
    fn new(s: &ConvShape) -> Lowering {
        let p = s.out_height() * s.out_width();
        Lowering {
            o: s.out_channels,
            p,
            ckk: s.in_channels * s.kernel * s.kernel,
            chw: s.in_channels * s.height * s.width,
            g: (MAX_COLUMNS / p.max(1)).clamp(1, s.batch.max(1)),
        }
    }
}

fn check_lengths(op: &str, s: &ConvShape, operands: &[(usize, usize, &str)]) -> Result<(), String> {
    match operands.iter().find(|(got, want, _)| got != want) {
        Some((got, want, name)) => Err(format!("{op} {s:?}: {name} has {got} values, not {want}")),
        None => Ok(()),
    }
}

/// Whether ring products go to [`RING`]: read on every product, so kept apart from the lock.
static SELECTED: AtomicBool = AtomicBool::new(false);
/// The process's GPU, shared by its party threads; the lock serialises their products on it.
static RING: Mutex<Option<CudaRing>> = Mutex::new(None);

fn ring() -> MutexGuard<'static, Option<CudaRing>> {
    // A panic inside a product is caught before it unwinds through the guard, so a poisoned lock
    // only means a panic elsewhere; the ring it guards is still whole.
    RING.lock().unwrap_or_else(|poisoned| poisoned.into_inner())
}

/// Opens device 0 (once) and sends ring products to it.
pub(super) fn select() -> Result<(), String> {
    let mut ring = ring();
    if ring.is_none() {
        let opened = panic::catch_unwind(|| CudaRing::new(0)).unwrap_or_else(|p| Err(panic_text(p.as_ref())));
        *ring = Some(opened.map_err(|e| format!("cannot run ring products on CUDA: {e}"))?);
    }
    SELECTED.store(true, Ordering::SeqCst);
    Ok(())
}

/// Sends ring products back to the CPU and releases the device.
pub(super) fn deselect() {
    let mut ring = ring();
    SELECTED.store(false, Ordering::SeqCst);
    *ring = None;
}

pub(super) fn selected() -> bool {
    SELECTED.load(Ordering::Relaxed)
}

/// [`try_run`] for a matrix product with inner dimension `k`: one too long for exact 16-bit limbs
/// runs on the CPU, the products after it still on the GPU (it says nothing about the GPU).
pub(super) fn try_product<T>(
    op: &str,
    k: usize,
    product: impl FnOnce(&mut CudaRing) -> Result<T, String>,
) -> Option<T> {
    if limb_bits_for(k).is_err() {
        return None;
    }
    try_run(op, product)
}

/// `product` on the GPU, or `None` when the CPU is selected or the GPU failed (the caller then
/// computes on the CPU). The first failure is reported on stderr and sends every later product
/// to the CPU: after a CUDA error the context may be unusable, and both paths are exact.
pub(super) fn try_run<T>(op: &str, product: impl FnOnce(&mut CudaRing) -> Result<T, String>) -> Option<T> {
    if !selected() {
        return None;
    }
    let mut ring = ring();
    let gpu = ring.as_mut()?;
    // cudarc panics where a loaded library lacks a symbol it calls; that is a failure like any
    // other here, not a reason to stop the run.
    let error = match panic::catch_unwind(AssertUnwindSafe(|| product(gpu))) {
        Ok(Ok(value)) => return Some(value),
        Ok(Err(e)) => e,
        Err(p) => panic_text(p.as_ref()),
    };
    SELECTED.store(false, Ordering::SeqCst);
    let name = gpu.name().to_string();
    // Leaked, not dropped: cudarc's cuBLAS handle unwraps its destruction, which can panic after
    // a sticky CUDA error.
    std::mem::forget(ring.take());
    eprintln!(
        "warning: cryptgpu ring product {op} failed on {name}: {error}; this and all later ring products of this \
         process run on the CPU"
    );
    None
}

fn panic_text(payload: &(dyn std::any::Any + Send)) -> String {
    let text = payload.downcast_ref::<&str>().copied().or_else(|| payload.downcast_ref::<String>().map(String::as_str));
    format!("panicked: {}", text.unwrap_or("(no message)"))
}
