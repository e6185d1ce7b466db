//! The four operations a device runs, and the size checks both ends apply before touching data.
//!
//! Every size is computed with checked arithmetic: a request comes from another process (or
//! machine), and the kernels assert on bad lengths, so a shape that overflows `usize` or does not
//! match its operands must become an error here, before any kernel or allocation sees it.

use serde::{Deserialize, Serialize};
use std::fmt;
use trustsplit_kernels::ConvGeometry;

/// `C (m x n) = op(A) * op(B)`, all row-major. `A` is stored `m x k` (`k x m` when `trans_a`),
/// `B` is stored `k x n` (`n x k` when `trans_b`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GemmShape {
    pub m: usize,
    pub n: usize,
    pub k: usize,
    pub trans_a: bool,
    pub trans_b: bool,
}

/// One device operation with its shape.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Op {
    Gemm(GemmShape),
    /// Operands `x` (input) and `w` (weight); result `y`.
    ConvForward(ConvGeometry),
    /// Operands `dy` (output gradient) and `w`; result `dx`.
    ConvBackwardData(ConvGeometry),
    /// Operands `x` and `dy`; result `dw`.
    ConvBackwardWeight(ConvGeometry),
}

/// Element counts of an operation's operands, its result, and the largest host-side scratch
/// matrix a lowering needs (the unrolled patches of one sample for convolutions).
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct Sizes {
    pub a: usize,
    pub b: usize,
    pub out: usize,
    pub scratch: usize,
}

fn mul(parts: &[usize], what: &str) -> Result<usize, String> {
    parts.iter().try_fold(1usize, |acc, &p| acc.checked_mul(p)).ok_or_else(|| {
        format!("{what} overflows: {}", parts.iter().map(|p| p.to_string()).collect::<Vec<_>>().join(" x "))
    })
}

/// Checks a convolution geometry without any arithmetic that could overflow, then validates it.
/// Returns `(out_h, out_w)`.
pub fn check_geometry(g: &ConvGeometry) -> Result<(usize, usize), String> {
    let pad2 = g.padding.checked_mul(2).ok_or("convolution padding overflows")?;
    g.in_h.checked_add(pad2).ok_or("padded input height overflows")?;
    g.in_w.checked_add(pad2).ok_or("padded input width overflows")?;
    // With the padded sizes known to fit, `validate` (and the out_h/out_w formulas) are safe.
    g.validate()?;
    Ok((g.out_h(), g.out_w()))
}

/// Result values a request may ask for per operand value ([`Op::check_result_size`]).
pub const RESULT_PER_OPERAND: usize = 1024;
/// Result values any request may ask for beyond that: 16 MiB of f32.
pub const RESULT_ALLOWANCE: usize = 4 << 20;

impl Op {
    /// The operation's name as used in messages and the protocol.
    pub fn name(&self) -> &'static str {
        match self {
            Op::Gemm(_) => "gemm",
            Op::ConvForward(_) => "conv_forward",
            Op::ConvBackwardData(_) => "conv_backward_data",
            Op::ConvBackwardWeight(_) => "conv_backward_weight",
        }
    }

    /// Names of the two operands and the result, for error messages.
    pub fn operand_names(&self) -> [&'static str; 3] {
        match self {
            Op::Gemm(_) => ["A", "B", "C"],
            Op::ConvForward(_) => ["x", "w", "y"],
            Op::ConvBackwardData(_) => ["dy", "w", "dx"],
            Op::ConvBackwardWeight(_) => ["x", "dy", "dw"],
        }
    }

    /// Validates the shape and returns its element counts; never panics.
    pub fn sizes(&self) -> Result<Sizes, String> {
        let r = match *self {
            Op::Gemm(s) => Sizes {
                a: mul(&[s.m, s.k], "gemm operand A (m*k)")?,
                b: mul(&[s.k, s.n], "gemm operand B (k*n)")?,
                out: mul(&[s.m, s.n], "gemm result (m*n)")?,
                scratch: 0,
            },
            Op::ConvForward(g) | Op::ConvBackwardData(g) | Op::ConvBackwardWeight(g) => {
                let (oh, ow) = check_geometry(&g)?;
                let input = mul(&[g.batch, g.in_channels, g.in_h, g.in_w], "convolution input")?;
                let output = mul(&[g.batch, g.out_channels, oh, ow], "convolution output")?;
                let weight = mul(&[g.out_channels, g.in_channels, g.kernel_h, g.kernel_w], "convolution weight")?;
                let scratch = mul(&[g.in_channels, g.kernel_h, g.kernel_w, oh, ow], "unrolled patches of one sample")?;
                let (a, b, out) = match self {
                    Op::ConvForward(_) => (input, weight, output),
                    Op::ConvBackwardData(_) => (output, weight, input),
                    _ => (input, output, weight),
                };
                Sizes { a, b, out, scratch }
            }
        };
        Ok(r)
    }

    /// Validates the shape and that the operands have exactly the lengths it implies.
    pub fn check_operands(&self, a: usize, b: usize) -> Result<Sizes, String> {
        let sizes = self.sizes()?;
        let [na, nb, _] = self.operand_names();
        for (name, found, expected) in [(na, a, sizes.a), (nb, b, sizes.b)] {
            if found != expected {
                return Err(format!("{self}: operand {name} has {found} values, the shape needs {expected}"));
            }
        }
        Ok(sizes)
    }

    /// Checks that no operand, result or scratch matrix exceeds `max_bytes` (the frame limit: a
    /// result must fit in one reply, and a device should not be asked for unbounded scratch).
    pub fn check_limit(&self, sizes: &Sizes, max_bytes: usize) -> Result<(), String> {
        let [na, nb, nout] = self.operand_names();
        let items =
            [(na, sizes.a), (nb, sizes.b), (nout, sizes.out), ("scratch (patches of one sample)", sizes.scratch)];
        for (name, elems) in items {
            let bytes = elems.checked_mul(4).ok_or_else(|| format!("{self}: {name} size overflows"))?;
            if bytes > max_bytes {
                return Err(format!(
                    "{self}: {name} is {bytes} bytes, over the {max_bytes}-byte frame limit; split the batch"
                ));
            }
        }
        Ok(())
    }

    /// Refuses a request whose result is far larger than its operands (a GEMM with k = 0 and
    /// m = n = 16384 asks for 1 GiB of zeros from nothing): at most [`RESULT_PER_OPERAND`] result
    /// values per operand value, plus [`RESULT_ALLOWANCE`] values. Legitimate products stay far
    /// below: a layer's weight gradient at batch 1, the largest ratio our models ask for, is a few
    /// hundred.
    pub fn check_result_size(&self, sizes: &Sizes) -> Result<(), String> {
        let operands = sizes.a.saturating_add(sizes.b);
        if sizes.out > operands.saturating_mul(RESULT_PER_OPERAND).saturating_add(RESULT_ALLOWANCE) {
            return Err(format!(
                "{self}: a result of {} values from {operands} operand values is refused (at most {RESULT_PER_OPERAND} \
                 per operand value, plus {RESULT_ALLOWANCE})",
                sizes.out
            ));
        }
        Ok(())
    }

    /// The result when no arithmetic is needed: an empty result, or one whose reduction is
    /// empty (all zeros). GPU APIs tend to reject zero-sized buffers, so backends answer these
    /// directly. Call only after [`Op::sizes`] succeeded.
    pub fn trivial_result(&self) -> Option<Vec<f32>> {
        let sizes = self.sizes().ok()?;
        let empty_reduction = match *self {
            Op::Gemm(s) => s.k == 0,
            Op::ConvForward(g) => g.in_channels == 0,
            Op::ConvBackwardData(g) => g.out_channels == 0 || g.batch == 0,
            Op::ConvBackwardWeight(g) => g.batch == 0,
        };
        (sizes.out == 0 || empty_reduction).then(|| vec![0.0; sizes.out])
    }
}

impl fmt::Display for Op {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        match self {
            Op::Gemm(s) => write!(
                f,
                "gemm m={} n={} k={}{}{}",
                s.m,
                s.n,
                s.k,
                if s.trans_a { " A^T" } else { "" },
                if s.trans_b { " B^T" } else { "" }
            ),
            Op::ConvForward(g) | Op::ConvBackwardData(g) | Op::ConvBackwardWeight(g) => write!(
                f,
                "{} N={} C={}->{} {}x{} kernel {}x{} stride {} padding {}",
                self.name(),
                g.batch,
                g.in_channels,
                g.out_channels,
                g.in_h,
                g.in_w,
                g.kernel_h,
                g.kernel_w,
                g.stride,
                g.padding
            ),
        }
    }
}
