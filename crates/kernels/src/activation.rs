//! Elementwise nonlinearities.

use rayon::prelude::*;

/// Values per parallel task; a multiple of `MASK_BITS`.
const CHUNK: usize = 1 << 14;

/// Values per word of a ReLU's sign mask.
pub const MASK_BITS: usize = 32;

/// `y = max(x, 0)`, and the sign mask the backward pass needs: bit `i % 32` of `positive[i / 32]`
/// is set where `y[i] > 0` (1 bit per value kept between the passes instead of the 32-bit output).
/// A NaN input gives 0, as `f32::max` does.
pub fn relu_forward(x: &[f32], y: &mut [f32], positive: &mut [u32]) {
    assert_eq!(x.len(), y.len(), "relu_forward: lengths differ");
    assert_eq!(positive.len(), x.len().div_ceil(MASK_BITS), "relu_forward: mask length");
    let words = CHUNK / MASK_BITS;
    y.par_chunks_mut(CHUNK).zip(x.par_chunks(CHUNK)).zip(positive.par_chunks_mut(words)).for_each(|((y, x), mask)| {
        for ((y, x), bits) in y.chunks_mut(MASK_BITS).zip(x.chunks(MASK_BITS)).zip(mask.iter_mut()) {
            let mut word = 0u32;
            for (j, (o, &i)) in y.iter_mut().zip(x).enumerate() {
                *o = i.max(0.0);
                word |= ((*o > 0.0) as u32) << j;
            }
            *bits = word;
        }
    });
}

/// `dx = dy` where the forward output was positive (its bit in `positive` is set), else 0.
pub fn relu_backward(positive: &[u32], dy: &[f32], dx: &mut [f32]) {
    assert_eq!(dy.len(), dx.len(), "relu_backward: lengths differ");
    assert_eq!(positive.len(), dy.len().div_ceil(MASK_BITS), "relu_backward: mask length");
    let words = CHUNK / MASK_BITS;
    dx.par_chunks_mut(CHUNK).zip(dy.par_chunks(CHUNK)).zip(positive.par_chunks(words)).for_each(|((dx, dy), mask)| {
        for ((dx, dy), &bits) in dx.chunks_mut(MASK_BITS).zip(dy.chunks(MASK_BITS)).zip(mask) {
            for (j, (d, &g)) in dx.iter_mut().zip(dy).enumerate() {
                *d = if bits >> j & 1 == 1 { g } else { 0.0 };
            }
        }
    });
}
