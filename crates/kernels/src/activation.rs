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
    let avx512 = avx512::usable();
    y.par_chunks_mut(CHUNK).zip(x.par_chunks(CHUNK)).zip(positive.par_chunks_mut(words)).for_each(|((y, x), mask)| {
        // Whole words of 32 values; the last, partial one below.
        let whole = if avx512 { avx512::relu_forward(x, y, mask) } else { 0 };
        let (y, x, mask) = (&mut y[whole * MASK_BITS..], &x[whole * MASK_BITS..], &mut mask[whole..]);
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
    let avx512 = avx512::usable();
    dx.par_chunks_mut(CHUNK).zip(dy.par_chunks(CHUNK)).zip(positive.par_chunks(words)).for_each(|((dx, dy), mask)| {
        let whole = if avx512 { avx512::relu_backward(mask, dy, dx) } else { 0 };
        let (dx, dy, mask) = (&mut dx[whole * MASK_BITS..], &dy[whole * MASK_BITS..], &mask[whole..]);
        for ((dx, dy), &bits) in dx.chunks_mut(MASK_BITS).zip(dy.chunks(MASK_BITS)).zip(mask) {
            for (j, (d, &g)) in dx.iter_mut().zip(dy).enumerate() {
                *d = if bits >> j & 1 == 1 { g } else { 0.0 };
            }
        }
    });
}

/// Both passes 32 values (one mask word) at a time: two registers, and the word is the two
/// 16-bit comparison masks side by side (the portable loops build it bit by bit).
mod avx512 {
    #[cfg(target_arch = "x86_64")]
    use std::arch::x86_64::*;

    pub(super) fn usable() -> bool {
        #[cfg(target_arch = "x86_64")]
        return is_x86_feature_detected!("avx512f");
        #[cfg(not(target_arch = "x86_64"))]
        false
    }

    /// The whole mask words of `x` into `y` and `mask`; returns how many words it wrote.
    pub(super) fn relu_forward(x: &[f32], y: &mut [f32], mask: &mut [u32]) -> usize {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: callers check `usable` first.
        return unsafe { forward_words(x, y, mask) };
        #[cfg(not(target_arch = "x86_64"))]
        0
    }

    /// `dx` from `dy` and the mask, for the whole words; returns how many it did.
    pub(super) fn relu_backward(mask: &[u32], dy: &[f32], dx: &mut [f32]) -> usize {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: callers check `usable` first.
        return unsafe { backward_words(mask, dy, dx) };
        #[cfg(not(target_arch = "x86_64"))]
        0
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    fn forward_words(x: &[f32], y: &mut [f32], mask: &mut [u32]) -> usize {
        let zero = _mm512_setzero_ps();
        let mut words = 0;
        for ((y, x), bits) in y.chunks_exact_mut(32).zip(x.chunks_exact(32)).zip(mask.iter_mut()) {
            // SAFETY: both chunks hold 32 values; unaligned loads and stores.
            unsafe {
                // MAXPS returns its second operand when the first is NaN: 0, as f32::max does.
                let lo = _mm512_max_ps(_mm512_loadu_ps(x.as_ptr()), zero);
                let hi = _mm512_max_ps(_mm512_loadu_ps(x.as_ptr().add(16)), zero);
                _mm512_storeu_ps(y.as_mut_ptr(), lo);
                _mm512_storeu_ps(y.as_mut_ptr().add(16), hi);
                let positive = |v| u32::from(_mm512_cmp_ps_mask::<_CMP_GT_OQ>(v, zero));
                *bits = positive(lo) | positive(hi) << 16;
            }
            words += 1;
        }
        words
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    fn backward_words(mask: &[u32], dy: &[f32], dx: &mut [f32]) -> usize {
        let mut words = 0;
        for ((dx, dy), &bits) in dx.chunks_exact_mut(32).zip(dy.chunks_exact(32)).zip(mask) {
            // SAFETY: both chunks hold 32 values; unaligned loads and stores (a zeroing move
            // between registers, not a masked load from memory).
            unsafe {
                let lo = _mm512_maskz_mov_ps(bits as u16, _mm512_loadu_ps(dy.as_ptr()));
                let hi = _mm512_maskz_mov_ps((bits >> 16) as u16, _mm512_loadu_ps(dy.as_ptr().add(16)));
                _mm512_storeu_ps(dx.as_mut_ptr(), lo);
                _mm512_storeu_ps(dx.as_mut_ptr().add(16), hi);
            }
            words += 1;
        }
        words
    }
}
