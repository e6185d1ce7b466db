//! Fully connected layer `y = x w^T + b`, with `w` stored `out x in` (PyTorch's layout).

use crate::matmul::{matmul, parallelism, threads, MatRef};

/// `y` (`n x out`) = `x` (`n x in`) * `w^T` + `bias`.
pub fn linear_forward(n: usize, inp: usize, out: usize, x: &[f32], w: &[f32], bias: Option<&[f32]>, y: &mut [f32]) {
    assert_eq!(x.len(), n * inp, "linear_forward: input length");
    assert_eq!(w.len(), out * inp, "linear_forward: weight length");
    assert_eq!(y.len(), n * out, "linear_forward: output length");
    let par = parallelism(threads());
    matmul(MatRef::row_major(x, n, inp), MatRef::row_major(w, out, inp).t(), y, out, false, par);
    if let Some(b) = bias {
        assert_eq!(b.len(), out, "linear_forward: bias length");
        for row in y.chunks_mut(out) {
            row.iter_mut().zip(b).for_each(|(v, bv)| *v += bv);
        }
    }
}

/// `dx = dy * w` (`n x in`).
pub fn linear_backward_data(n: usize, inp: usize, out: usize, dy: &[f32], w: &[f32], dx: &mut [f32]) {
    assert_eq!(dy.len(), n * out, "linear_backward_data: output-gradient length");
    assert_eq!(w.len(), out * inp, "linear_backward_data: weight length");
    assert_eq!(dx.len(), n * inp, "linear_backward_data: input-gradient length");
    let par = parallelism(threads());
    matmul(MatRef::row_major(dy, n, out), MatRef::row_major(w, out, inp), dx, inp, false, par);
}

/// `dw = dy^T * x` (`out x in`) and `dbias = column sums of dy`; both overwritten.
pub fn linear_backward_weight(
    n: usize,
    inp: usize,
    out: usize,
    x: &[f32],
    dy: &[f32],
    dw: &mut [f32],
    dbias: Option<&mut [f32]>,
) {
    assert_eq!(x.len(), n * inp, "linear_backward_weight: input length");
    assert_eq!(dy.len(), n * out, "linear_backward_weight: output-gradient length");
    assert_eq!(dw.len(), out * inp, "linear_backward_weight: weight-gradient length");
    let par = parallelism(threads());
    matmul(MatRef::row_major(dy, n, out).t(), MatRef::row_major(x, n, inp), dw, inp, false, par);
    if let Some(db) = dbias {
        assert_eq!(db.len(), out, "linear_backward_weight: bias-gradient length");
        db.fill(0.0);
        for row in dy.chunks(out) {
            db.iter_mut().zip(row).for_each(|(d, g)| *d += g);
        }
    }
}
