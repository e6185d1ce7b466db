//! Convolutions lowered to GEMMs on the host: the kernels crate's im2col / col2im here, the
//! product wherever the supplied `gemm` runs (cuBLAS for the CUDA backend).
//!
//! This is the simple way to put convolutions on a BLAS-only device: the unrolled patches travel
//! to the device, which costs `kernel_h * kernel_w` times the input's bytes in transfers. It lives
//! outside the `cuda` feature so its tests run on any machine with the CPU GEMM plugged in.
//! Samples are processed in chunks so the patch matrix stays under `max_cols` elements.

use crate::error::DeviceError;
use crate::op::{GemmShape, Op};
use trustsplit_kernels::conv::{col2im, im2col};
use trustsplit_kernels::ConvGeometry;

/// A GEMM provider: `C = op(A) op(B)` as in [`crate::Backend::gemm`].
pub type GemmFn<'a> = dyn FnMut(&GemmShape, &[f32], &[f32]) -> Result<Vec<f32>, DeviceError> + 'a;

/// Default bound on the patch matrix of one chunk: 64 Mi elements (256 MiB).
pub const DEFAULT_MAX_COLS: usize = 1 << 26;

/// How a convolution is carried out.
enum Plan {
    /// No arithmetic needed (empty result or empty reduction).
    Trivial(Vec<f32>),
    /// Result length, output pixels per sample, samples per chunk.
    Chunks { out_len: usize, hw: usize, per: usize },
}

/// Validates the operands and sizes the chunks.
fn plan(op: Op, a: &[f32], b: &[f32], max_cols: usize) -> Result<Plan, DeviceError> {
    let sizes = op.check_operands(a.len(), b.len()).map_err(DeviceError::Invalid)?;
    if let Some(zeros) = op.trivial_result() {
        return Ok(Plan::Trivial(zeros));
    }
    let (Op::ConvForward(g) | Op::ConvBackwardData(g) | Op::ConvBackwardWeight(g)) = op else {
        unreachable!("plan is only called for convolutions")
    };
    let per = (max_cols / sizes.scratch.max(1)).clamp(1, g.batch.max(1));
    Ok(Plan::Chunks { out_len: sizes.out, hw: g.out_h() * g.out_w(), per })
}

/// `C_out x (samples * out_pixels)` matrix of the output gradient of samples `first..first+count`.
fn gather_outputs(g: &ConvGeometry, dy: &[f32], first: usize, count: usize, hw: usize) -> Vec<f32> {
    let width = count * hw;
    let mut m = vec![0.0f32; g.out_channels * width];
    for s in 0..count {
        for co in 0..g.out_channels {
            let src = &dy[((first + s) * g.out_channels + co) * hw..][..hw];
            m[co * width + s * hw..][..hw].copy_from_slice(src);
        }
    }
    m
}

fn unroll(g: &ConvGeometry, x: &[f32], first: usize, count: usize, hw: usize) -> Vec<f32> {
    let (width, in_len) = (count * hw, g.in_channels * g.in_h * g.in_w);
    let mut cols = vec![0.0f32; g.patch_len() * width];
    for s in 0..count {
        im2col(g, &x[(first + s) * in_len..][..in_len], &mut cols, width, s * hw);
    }
    cols
}

fn chunks(batch: usize, per: usize) -> impl Iterator<Item = (usize, usize)> {
    (0..batch).step_by(per).map(move |first| (first, per.min(batch - first)))
}

/// `y = conv(x, w)`: per chunk, `W (C_out x CKK) * cols (CKK x chunk*HW)`, scattered into NCHW.
pub fn conv_forward(
    g: &ConvGeometry,
    x: &[f32],
    w: &[f32],
    max_cols: usize,
    gemm: &mut GemmFn,
) -> Result<Vec<f32>, DeviceError> {
    let (out_len, hw, per) = match plan(Op::ConvForward(*g), x, w, max_cols)? {
        Plan::Chunks { out_len, hw, per } => (out_len, hw, per),
        Plan::Trivial(zeros) => return Ok(zeros),
    };
    let cout = g.out_channels;
    let mut y = vec![0.0f32; out_len];
    for (first, count) in chunks(g.batch, per) {
        let width = count * hw;
        let cols = unroll(g, x, first, count, hw);
        let shape = GemmShape { m: cout, n: width, k: g.patch_len(), trans_a: false, trans_b: false };
        let ymat = gemm(&shape, w, &cols)?;
        for s in 0..count {
            for co in 0..cout {
                y[((first + s) * cout + co) * hw..][..hw].copy_from_slice(&ymat[co * width + s * hw..][..hw]);
            }
        }
    }
    Ok(y)
}

/// `dx`: per chunk, `cols = W^T * dY`, then col2im.
pub fn conv_backward_data(
    g: &ConvGeometry,
    dy: &[f32],
    w: &[f32],
    max_cols: usize,
    gemm: &mut GemmFn,
) -> Result<Vec<f32>, DeviceError> {
    let (out_len, hw, per) = match plan(Op::ConvBackwardData(*g), dy, w, max_cols)? {
        Plan::Chunks { out_len, hw, per } => (out_len, hw, per),
        Plan::Trivial(zeros) => return Ok(zeros),
    };
    let in_len = g.in_channels * g.in_h * g.in_w;
    let mut dx = vec![0.0f32; out_len];
    for (first, count) in chunks(g.batch, per) {
        let width = count * hw;
        let dymat = gather_outputs(g, dy, first, count, hw);
        // W is stored C_out x CKK, i.e. k x m for this product: trans_a.
        let shape = GemmShape { m: g.patch_len(), n: width, k: g.out_channels, trans_a: true, trans_b: false };
        let cols = gemm(&shape, w, &dymat)?;
        for s in 0..count {
            col2im(g, &cols, width, s * hw, &mut dx[(first + s) * in_len..][..in_len]);
        }
    }
    Ok(dx)
}

/// `dw = sum over chunks of dY * cols^T`, added on the host in chunk order (deterministic).
pub fn conv_backward_weight(
    g: &ConvGeometry,
    x: &[f32],
    dy: &[f32],
    max_cols: usize,
    gemm: &mut GemmFn,
) -> Result<Vec<f32>, DeviceError> {
    let (out_len, hw, per) = match plan(Op::ConvBackwardWeight(*g), x, dy, max_cols)? {
        Plan::Chunks { out_len, hw, per } => (out_len, hw, per),
        Plan::Trivial(zeros) => return Ok(zeros),
    };
    let mut dw = vec![0.0f32; out_len];
    for (first, count) in chunks(g.batch, per) {
        let width = count * hw;
        let dymat = gather_outputs(g, dy, first, count, hw);
        let cols = unroll(g, x, first, count, hw);
        // cols is stored CKK x width, i.e. n x k: trans_b.
        let shape = GemmShape { m: g.out_channels, n: g.patch_len(), k: width, trans_a: false, trans_b: true };
        let part = gemm(&shape, &dymat, &cols)?;
        dw.iter_mut().zip(&part).for_each(|(d, p)| *d += p);
    }
    Ok(dw)
}
