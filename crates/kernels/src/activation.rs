//! Elementwise nonlinearities.
//!
//! ReLU works in place on a tensor its caller no longer needs (the layers' `forward_owned` and
//! `backward_owned`). Its backward pass needs only the sign of each output, so the forward pass
//! returns a mask of 32 values per `u32` word, kept between the passes instead of the output; with
//! AVX-512 a word is two registers' comparison masks side by side.

use rayon::prelude::*;

/// Values per parallel task; a multiple of `MASK_BITS`.
const CHUNK: usize = 1 << 14;

/// Values per word of a ReLU's sign mask.
pub const MASK_BITS: usize = 32;

/// `x = max(x, 0)` in place, and the sign mask the backward pass needs: bit `i % 32` of
/// `positive[i / 32]` is set where the output `x[i] > 0` (1 bit per value kept between the passes
/// instead of the 32-bit output). A NaN input gives 0, as `f32::max` does.
pub fn relu_in_place(x: &mut [f32], positive: &mut [u32]) {
    assert_eq!(positive.len(), x.len().div_ceil(MASK_BITS), "relu: mask length");
    let words = CHUNK / MASK_BITS;
    let avx512 = avx512::usable();
    x.par_chunks_mut(CHUNK).zip(positive.par_chunks_mut(words)).for_each(|(x, mask)| {
        // Whole words of 32 values; the last, partial one below.
        let whole = if avx512 { avx512::relu_forward(x, mask) } else { 0 };
        let (x, mask) = (&mut x[whole * MASK_BITS..], &mut mask[whole..]);
        for (x, bits) in x.chunks_mut(MASK_BITS).zip(mask.iter_mut()) {
            let mut word = 0u32;
            for (j, v) in x.iter_mut().enumerate() {
                *v = v.max(0.0);
                word |= ((*v > 0.0) as u32) << j;
            }
            *bits = word;
        }
    });
}

/// The backward pass in place: `gradient` keeps its values where the forward output was
/// positive (its bit in `positive` is set) and becomes 0 elsewhere.
pub fn relu_backward_in_place(positive: &[u32], gradient: &mut [f32]) {
    assert_eq!(positive.len(), gradient.len().div_ceil(MASK_BITS), "relu_backward: mask length");
    let words = CHUNK / MASK_BITS;
    let avx512 = avx512::usable();
    gradient.par_chunks_mut(CHUNK).zip(positive.par_chunks(words)).for_each(|(g, mask)| {
        let whole = if avx512 { avx512::relu_backward(mask, g) } else { 0 };
        let (g, mask) = (&mut g[whole * MASK_BITS..], &mask[whole..]);
        for (g, &bits) in g.chunks_mut(MASK_BITS).zip(mask) {
            for (j, d) in g.iter_mut().enumerate() {
                if bits >> j & 1 == 0 {
                    *d = 0.0;
                }
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

    /// The whole mask words of `x`, in place, and their `mask`; returns how many words it did.
    pub(super) fn relu_forward(x: &mut [f32], mask: &mut [u32]) -> usize {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: callers check `usable` first.
        return unsafe { forward_words(x, mask) };
        #[cfg(not(target_arch = "x86_64"))]
        0
    }

    /// The gradient masked in place, for the whole words; returns how many it did.
    pub(super) fn relu_backward(mask: &[u32], gradient: &mut [f32]) -> usize {
        #[cfg(target_arch = "x86_64")]
        // SAFETY: callers check `usable` first.
        return unsafe { backward_words(mask, gradient) };
        #[cfg(not(target_arch = "x86_64"))]
        0
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    fn forward_words(x: &mut [f32], mask: &mut [u32]) -> usize {
        let zero = _mm512_setzero_ps();
        let mut words = 0;
        for (x, bits) in x.chunks_exact_mut(32).zip(mask.iter_mut()) {
            // SAFETY: the chunk holds 32 values; unaligned loads and stores.
            unsafe {
                // MAXPS returns its second operand when the first is NaN: 0, as f32::max does.
                let lo = _mm512_max_ps(_mm512_loadu_ps(x.as_ptr()), zero);
                let hi = _mm512_max_ps(_mm512_loadu_ps(x.as_ptr().add(16)), zero);
                _mm512_storeu_ps(x.as_mut_ptr(), lo);
                _mm512_storeu_ps(x.as_mut_ptr().add(16), hi);
                let positive = |v| u32::from(_mm512_cmp_ps_mask::<_CMP_GT_OQ>(v, zero));
                *bits = positive(lo) | positive(hi) << 16;
            }
            words += 1;
        }
        words
    }

    #[cfg(target_arch = "x86_64")]
    #[target_feature(enable = "avx512f")]
    fn backward_words(mask: &[u32], gradient: &mut [f32]) -> usize {
        let mut words = 0;
        for (g, &bits) in gradient.chunks_exact_mut(32).zip(mask) {
            // SAFETY: the chunk holds 32 values; unaligned loads and stores (a zeroing move
            // between registers, not a masked load from memory).
            unsafe {
                let lo = _mm512_maskz_mov_ps(bits as u16, _mm512_loadu_ps(g.as_ptr()));
                let hi = _mm512_maskz_mov_ps((bits >> 16) as u16, _mm512_loadu_ps(g.as_ptr().add(16)));
                _mm512_storeu_ps(g.as_mut_ptr(), lo);
                _mm512_storeu_ps(g.as_mut_ptr().add(16), hi);
            }
            words += 1;
        }
        words
    }
}
