//! Elementwise nonlinearities.

use rayon::prelude::*;

const CHUNK: usize = 1 << 14;

/// `y = max(x, 0)`.
pub fn relu_forward(x: &[f32], y: &mut [f32]) {
    assert_eq!(x.len(), y.len(), "relu_forward: lengths differ");
    y.par_chunks_mut(CHUNK).zip(x.par_chunks(CHUNK)).for_each(|(y, x)| {
        for (o, &i) in y.iter_mut().zip(x) {
            *o = i.max(0.0);
        }
    });
}

/// `dx = dy` where the forward OUTPUT `y` was positive, else 0 (needs only the output, so the
/// input need not be kept).
pub fn relu_backward(y: &[f32], dy: &[f32], dx: &mut [f32]) {
    assert!(y.len() == dy.len() && dy.len() == dx.len(), "relu_backward: lengths differ");
    dx.par_chunks_mut(CHUNK).zip(dy.par_chunks(CHUNK)).zip(y.par_chunks(CHUNK)).for_each(|((dx, dy), y)| {
        for ((d, &g), &o) in dx.iter_mut().zip(dy).zip(y) {
            *d = if o > 0.0 { g } else { 0.0 };
        }
    });
}
