//! The bilinear ops Goten outsources, evaluated exactly on field elements, and the enclave's
//! check of a reconstructed result.
//!
//! Every op is `C = op(A, B)`, linear in each operand: a linear layer's forward pass, its input
//! gradient and its weight gradient, and the same three for a convolution.
//!
//! ## Why results are checked
//! The field is small: the exact integer product of two quantised tensors (entries up to 128 in
//! magnitude) reaches `K x 2^14` for a reduction of length `K`, beyond `p/2` once `K > 63`, and
//! then its centred value mod p is not the product (Goten's prototype never checks). Real
//! activations and weights stay far below that bound, but a bound that only holds in practice
//! would make a wrong result possible. So the enclave checks each reconstructed result against
//! the exact integer product with a randomised (Freivalds-style) test that costs one
//! output-channel's worth of the op, in Z_2^64: collapsing one axis of the output with a random
//! vector `s` must give the op applied to the collapsed operand. A result that wrapped differs
//! from the exact product by multiples of p, and is caught except with probability about 2^-48.
//! It is then recomputed in the enclave from the quantised operands, and the difference must be
//! a multiple of p in every entry: anything else is a device that returned a wrong value, and
//! aborts the step. The same test catches a device that corrupts a result.

use trustsplit_cryptgpu::gemm::{self, ConvShape};

/// A bilinear op and its shape. Operand order as the kernels take them.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    /// `X W^T`: `a = X (n x k)`, `b = W (m x k)`, `C: n x m`.
    LinearForward { n: usize, k: usize, m: usize },
    /// `dY W`: `a = dY (n x m)`, `b = W (m x k)`, `C: n x k`.
    LinearInputGrad { n: usize, k: usize, m: usize },
    /// `dY^T X`: `a = dY (n x m)`, `b = X (n x k)`, `C: m x k`.
    LinearWeightGrad { n: usize, k: usize, m: usize },
    /// `a = X`, `b = W`, `C = Y`.
    ConvForward(ConvShape),
    /// `a = dY`, `b = W`, `C = dX`.
    ConvInputGrad(ConvShape),
    /// `a = X`, `b = dY`, `C = dW`.
    ConvWeightGrad(ConvShape),
}

/// The longest reduction whose exact result fits the kernels' 64-bit words (module docs of
/// [`crate::field`]).
pub const MAX_REDUCTION: usize = 1 << 22;

impl Op {
    /// The op's name in recordings and messages.
    pub fn name(&self) -> &'static str {
        match self {
            Op::LinearForward { .. } => "linear_forward",
            Op::LinearInputGrad { .. } => "linear_input_grad",
            Op::LinearWeightGrad { .. } => "linear_weight_grad",
            Op::ConvForward(_) => "conv_forward",
            Op::ConvInputGrad(_) => "conv_input_grad",
            Op::ConvWeightGrad(_) => "conv_weight_grad",
        }
    }

    /// The shapes of `a`, `b` and the result (NCHW for convolutions, row-major matrices
    /// otherwise).
    pub fn shapes(&self) -> [Vec<usize>; 3] {
        let conv = |s: &ConvShape| {
            (
                vec![s.batch, s.in_channels, s.height, s.width],
                vec![s.out_channels, s.in_channels, s.kernel, s.kernel],
                vec![s.batch, s.out_channels, s.out_height(), s.out_width()],
            )
        };
        match *self {
            Op::LinearForward { n, k, m } => [vec![n, k], vec![m, k], vec![n, m]],
            Op::LinearInputGrad { n, k, m } => [vec![n, m], vec![m, k], vec![n, k]],
            Op::LinearWeightGrad { n, k, m } => [vec![n, m], vec![n, k], vec![m, k]],
            Op::ConvForward(s) => {
                let (x, w, y) = conv(&s);
                [x, w, y]
            }
            Op::ConvInputGrad(s) => {
                let (x, w, y) = conv(&s);
                [y, w, x]
            }
            Op::ConvWeightGrad(s) => {
                let (x, w, y) = conv(&s);
                [x, y, w]
            }
        }
    }

    pub fn a_len(&self) -> usize {
        match *self {
            Op::LinearForward { n, k, .. } => n * k,
            Op::LinearInputGrad { n, m, .. } | Op::LinearWeightGrad { n, m, .. } => n * m,
            Op::ConvForward(s) | Op::ConvWeightGrad(s) => s.input_len(),
            Op::ConvInputGrad(s) => s.output_len(),
        }
    }

    pub fn b_len(&self) -> usize {
        match *self {
            Op::LinearForward { k, m, .. } | Op::LinearInputGrad { k, m, .. } => m * k,
            Op::LinearWeightGrad { n, k, .. } => n * k,
            Op::ConvForward(s) | Op::ConvInputGrad(s) => s.weight_len(),
            Op::ConvWeightGrad(s) => s.output_len(),
        }
    }

    pub fn out_len(&self) -> usize {
        match *self {
            Op::LinearForward { n, m, .. } => n * m,
            Op::LinearInputGrad { n, k, .. } => n * k,
            Op::LinearWeightGrad { k, m, .. } => m * k,
            Op::ConvForward(s) => s.output_len(),
            Op::ConvInputGrad(s) => s.input_len(),
            Op::ConvWeightGrad(s) => s.weight_len(),
        }
    }

    /// The number of products summed into one output value.
    pub fn reduction(&self) -> usize {
        match *self {
            Op::LinearForward { k, .. } => k,
            Op::LinearInputGrad { m, .. } => m,
            Op::LinearWeightGrad { n, .. } => n,
            Op::ConvForward(s) => s.in_channels * s.kernel * s.kernel,
            // Each input pixel receives at most (kernel / stride)^2 taps per output channel.
            Op::ConvInputGrad(s) => s.out_channels * s.kernel.div_ceil(s.stride).pow(2),
            Op::ConvWeightGrad(s) => s.batch * s.out_height() * s.out_width(),
        }
    }

    /// Multiply-adds of the op in plaintext (the same for a layer's three products).
    pub fn macs(&self) -> u64 {
        match *self {
            Op::LinearForward { n, k, m } | Op::LinearInputGrad { n, k, m } | Op::LinearWeightGrad { n, k, m } => {
                (n * k * m) as u64
            }
            Op::ConvForward(s) | Op::ConvInputGrad(s) | Op::ConvWeightGrad(s) => {
                (s.output_len() * s.in_channels * s.kernel * s.kernel) as u64
            }
        }
    }

    /// Refuses a shape whose exact product would not fit the kernels' words.
    pub fn check_shape(&self) -> Result<(), String> {
        if self.reduction() > MAX_REDUCTION {
            return Err(format!(
                "{self:?} sums {} products per value; exact field arithmetic here allows at most {MAX_REDUCTION}",
                self.reduction()
            ));
        }
        Ok(())
    }

    /// Whether an honest product of quantised operands (entries in `[-128, 128]`) always fits
    /// the field without wrapping, so that a failed check can only be a wrong device result.
    pub fn never_wraps(&self) -> bool {
        (self.reduction() as i64) * 128 * 128 <= crate::field::HALF
    }

    /// `op(a, b)` over the integers, as two's-complement words (exact for centred field
    /// elements, see [`crate::field`]); not reduced.
    pub fn eval(&self, a: &[u64], b: &[u64]) -> Vec<u64> {
        assert_eq!(a.len(), self.a_len(), "{self:?}: first operand");
        assert_eq!(b.len(), self.b_len(), "{self:?}: second operand");
        match *self {
            Op::LinearForward { n, k, m } => gemm::matmul_nt(a, b, n, k, m),
            Op::LinearInputGrad { n, k, m } => gemm::matmul(a, b, n, m, k),
            Op::LinearWeightGrad { n, k, m } => gemm::matmul_tn(a, b, m, n, k),
            Op::ConvForward(s) => gemm::conv2d(a, b, &s),
            Op::ConvInputGrad(s) => gemm::conv2d_input_grad(a, b, &s),
            Op::ConvWeightGrad(s) => gemm::conv2d_weight_grad(a, b, &s),
        }
    }

    /// Whether `c` (centred words) is the exact integer `op(a, b)`, tested with the random
    /// words `s` (at least [`Op::check_len`] of them): both sides collapse one axis of the output.
    pub fn check(&self, a: &[u64], b: &[u64], c: &[u64], s: &[u64]) -> bool {
        assert_eq!(c.len(), self.out_len());
        let dot = |x: &[u64], y: &[u64]| x.iter().zip(y).fold(0u64, |acc, (p, q)| acc.wrapping_add(p.wrapping_mul(*q)));
        // `rows x cols` row-major times the vector `v` (length cols).
        let times = |mat: &[u64], rows: usize, cols: usize, v: &[u64]| -> Vec<u64> {
            (0..rows).map(|r| dot(&mat[r * cols..(r + 1) * cols], v)).collect()
        };
        match *self {
            Op::LinearForward { n, k, m } => {
                // C s = X (W^T s).
                let wts = combine_rows(b, m, k, &s[..m]);
                times(c, n, m, &s[..m]) == times(a, n, k, &wts)
            }
            Op::LinearInputGrad { n, k, m } => {
                // C s = dY (W s).
                let ws = times(b, m, k, &s[..k]);
                times(c, n, k, &s[..k]) == times(a, n, m, &ws)
            }
            Op::LinearWeightGrad { n, k, m } => {
                // C s = dY^T (X s).
                let xs = times(b, n, k, &s[..k]);
                times(c, m, k, &s[..k]) == combine_rows(a, n, m, &xs)
            }
            Op::ConvForward(sh) => {
                // Collapse the output channels: sum_o s_o Y[:, o] = conv(X, sum_o s_o W[o]).
                let (o, per_w) = (sh.out_channels, sh.weight_len() / sh.out_channels);
                let w1 = combine_rows(b, o, per_w, &s[..o]);
                let one = ConvShape { out_channels: 1, ..sh };
                collapse_channels(c, sh.batch, o, sh.out_height() * sh.out_width(), &s[..o])
                    == gemm::conv2d(a, &w1, &one)
            }
            Op::ConvInputGrad(sh) => {
                // Collapse the input channels: sum_c s_c dX[:, c] = input_grad(dY, W'), where
                // W'[o, 0] = sum_c s_c W[o, c].
                let (o, ci, kk) = (sh.out_channels, sh.in_channels, sh.kernel * sh.kernel);
                let mut w1 = vec![0u64; o * kk];
                for oc in 0..o {
                    let rows = &b[oc * ci * kk..(oc + 1) * ci * kk];
                    w1[oc * kk..(oc + 1) * kk].copy_from_slice(&combine_rows(rows, ci, kk, &s[..ci]));
                }
                let one = ConvShape { in_channels: 1, ..sh };
                collapse_channels(c, sh.batch, ci, sh.height * sh.width, &s[..ci])
                    == gemm::conv2d_input_grad(a, &w1, &one)
            }
            Op::ConvWeightGrad(sh) => {
                // Collapse the output channels: sum_o s_o dW[o] = weight_grad(X, sum_o s_o dY[:, o]).
                let (o, per_w) = (sh.out_channels, sh.weight_len() / sh.out_channels);
                let dy1 = collapse_channels(b, sh.batch, o, sh.out_height() * sh.out_width(), &s[..o]);
                let one = ConvShape { out_channels: 1, ..sh };
                combine_rows(c, o, per_w, &s[..o]) == gemm::conv2d_weight_grad(a, &dy1, &one)
            }
        }
    }

    /// How many random words [`Op::check`] reads.
    pub fn check_len(&self) -> usize {
        match *self {
            Op::LinearForward { m, .. } => m,
            Op::LinearInputGrad { k, .. } | Op::LinearWeightGrad { k, .. } => k,
            Op::ConvForward(s) | Op::ConvWeightGrad(s) => s.out_channels,
            Op::ConvInputGrad(s) => s.in_channels,
        }
    }
}

/// `sum_r v_r M[r, :]` for `M: rows x cols` (wrapping).
fn combine_rows(mat: &[u64], rows: usize, cols: usize, v: &[u64]) -> Vec<u64> {
    let mut out = vec![0u64; cols];
    for (r, &vr) in v.iter().enumerate().take(rows) {
        for (o, &x) in out.iter_mut().zip(&mat[r * cols..(r + 1) * cols]) {
            *o = o.wrapping_add(vr.wrapping_mul(x));
        }
    }
    out
}

/// `N x C x P` values collapsed over the channels with weights `v`: `N x 1 x P`.
fn collapse_channels(t: &[u64], n: usize, channels: usize, per: usize, v: &[u64]) -> Vec<u64> {
    let mut out = vec![0u64; n * per];
    for i in 0..n {
        let sample = &t[i * channels * per..(i + 1) * channels * per];
        let acc = combine_rows(sample, channels, per, v);
        out[i * per..(i + 1) * per].copy_from_slice(&acc);
    }
    out
}
