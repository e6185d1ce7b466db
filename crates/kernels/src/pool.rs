//! Max pooling (with the argmax kept for the backward pass) and average pooling.
//!
//! 2x2 max pooling at stride 2 (VGG's and most CIFAR networks') takes four windows at a time
//! through SSE2 compares and masks: the scalar compare-and-select compiled to branches that depend
//! on the data (see `max_pool_2x2_plane`).

use rayon::prelude::*;

/// Shapes of a pooling window sliding over `batch x channels x in_h x in_w`.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct PoolGeometry {
    pub batch: usize,
    pub channels: usize,
    pub in_h: usize,
    pub in_w: usize,
    pub kernel: usize,
    pub stride: usize,
    pub padding: usize,
}

impl PoolGeometry {
    pub fn validate(&self) -> Result<(), String> {
        if self.kernel == 0 || self.stride == 0 {
            return Err("pooling kernel and stride must be at least 1".into());
        }
        if 2 * self.padding > self.kernel {
            return Err(format!("pooling padding {} exceeds half the kernel {}", self.padding, self.kernel));
        }
        if self.in_h + 2 * self.padding < self.kernel || self.in_w + 2 * self.padding < self.kernel {
            return Err(format!(
                "pooling kernel {} is larger than the padded input {}x{}",
                self.kernel,
                self.in_h + 2 * self.padding,
                self.in_w + 2 * self.padding
            ));
        }
        Ok(())
    }
    pub fn out_h(&self) -> usize {
        (self.in_h + 2 * self.padding - self.kernel) / self.stride + 1
    }
    pub fn out_w(&self) -> usize {
        (self.in_w + 2 * self.padding - self.kernel) / self.stride + 1
    }
    pub fn input_len(&self) -> usize {
        self.batch * self.channels * self.in_h * self.in_w
    }
    pub fn output_len(&self) -> usize {
        self.batch * self.channels * self.out_h() * self.out_w()
    }
    fn check(&self) {
        if let Err(e) = self.validate() {
            panic!("{e}");
        }
    }
    /// Input rows (or columns) `[lo, hi)` covered by output index `o` on an axis of `size`.
    fn window(&self, o: usize, size: usize) -> (usize, usize) {
        let start = (o * self.stride) as isize - self.padding as isize;
        let lo = start.max(0) as usize;
        let hi = ((start + self.kernel as isize) as usize).min(size);
        (lo, hi)
    }
}

/// `y` = window maxima; `argmax` gets, per output, the index of the winner within its input plane.
/// Ties go to the first maximum in row-major order; a NaN wins (the last one, if several) so that
/// it propagates, as in PyTorch.
pub fn max_pool_forward(g: &PoolGeometry, x: &[f32], y: &mut [f32], argmax: &mut [u32]) {
    g.check();
    assert_eq!(x.len(), g.input_len(), "max_pool_forward: input length");
    assert_eq!(y.len(), g.output_len(), "max_pool_forward: output length");
    assert_eq!(argmax.len(), g.output_len(), "max_pool_forward: argmax length");
    let (ih, iw, oh, ow) = (g.in_h, g.in_w, g.out_h(), g.out_w());
    let two_by_two = g.kernel == 2 && g.stride == 2 && g.padding == 0;
    y.par_chunks_mut(oh * ow).zip(argmax.par_chunks_mut(oh * ow)).zip(x.par_chunks(ih * iw)).for_each(
        |((y, am), x)| {
            if two_by_two {
                max_pool_2x2_plane(x, iw, oh, ow, y, am);
            } else {
                max_pool_plane(g, x, y, am);
            }
        },
    );
}

/// Whether `v` takes over from the window's best so far (see [`max_pool_forward`] for ties and NaN).
#[inline(always)]
fn beats(v: f32, best: f32) -> bool {
    v > best || v.is_nan()
}

/// Any window: scans each window's rows and columns.
fn max_pool_plane(g: &PoolGeometry, x: &[f32], y: &mut [f32], am: &mut [u32]) {
    let (ih, iw, oh, ow) = (g.in_h, g.in_w, g.out_h(), g.out_w());
    for r in 0..oh {
        let (r0, r1) = g.window(r, ih);
        for c in 0..ow {
            let (c0, c1) = g.window(c, iw);
            let (mut best, mut best_i) = (f32::NEG_INFINITY, r0 * iw + c0);
            for i in r0..r1 {
                for j in c0..c1 {
                    let v = x[i * iw + j];
                    if beats(v, best) {
                        best = v;
                        best_i = i * iw + j;
                    }
                }
            }
            y[r * ow + c] = best;
            am[r * ow + c] = best_i as u32;
        }
    }
}

/// 2x2 windows at stride 2 without padding (VGG's and most CIFAR networks' pooling): the four
/// candidates are compared without branches and without the generic loop's window arithmetic.
/// The generic loop's compare-and-branch depends on the data, which a predictor cannot learn; the
/// scalar form below still compiled to branches (on `is_nan`'s parity flag), so on x86-64 four
/// windows at a time go through SSE2 compares and masks (baseline on every x86-64 CPU): on
/// ReLU-like random data, 13 -> ~3 ms for VGG16's five poolings of a batch of 32, one thread.
fn max_pool_2x2_plane(x: &[f32], iw: usize, oh: usize, ow: usize, y: &mut [f32], am: &mut [u32]) {
    for r in 0..oh {
        let top = &x[2 * r * iw..][..2 * ow];
        let bottom = &x[(2 * r + 1) * iw..][..2 * ow];
        let (y_row, am_row) = (&mut y[r * ow..][..ow], &mut am[r * ow..][..ow]);
        let base = (2 * r * iw) as u32;
        #[cfg(target_arch = "x86_64")]
        let done = sse2::pool_row(top, bottom, iw as u32, base, y_row, am_row);
        #[cfg(not(target_arch = "x86_64"))]
        let done = 0;
        for c in done..ow {
            let (t, b) = (&top[2 * c..2 * c + 2], &bottom[2 * c..2 * c + 2]);
            let at = base + 2 * c as u32;
            let (mut best, mut best_i) = (t[0], at);
            for (v, i) in [(t[1], at + 1), (b[0], at + iw as u32), (b[1], at + iw as u32 + 1)] {
                let take = beats(v, best);
                best = if take { v } else { best };
                best_i = if take { i } else { best_i };
            }
            y_row[c] = best;
            am_row[c] = best_i;
        }
    }
}

#[cfg(target_arch = "x86_64")]
mod sse2 {
    use std::arch::x86_64::*;

    /// `mask ? a : b` lane by lane (SSE2 has no blend).
    #[inline(always)]
    fn select(mask: __m128, a: __m128, b: __m128) -> __m128 {
        // SAFETY: SSE2 is part of the x86-64 baseline.
        unsafe { _mm_or_ps(_mm_and_ps(mask, a), _mm_andnot_ps(mask, b)) }
    }

    /// The windows of one output row, four at a time, with the scalar loop's rule (a candidate
    /// takes over when greater or NaN, in the order top-left, top-right, bottom-left,
    /// bottom-right); returns how many outputs it wrote (a multiple of 4).
    pub(super) fn pool_row(top: &[f32], bottom: &[f32], iw: u32, base: u32, y: &mut [f32], am: &mut [u32]) -> usize {
        let ow = y.len().min(am.len()).min(top.len() / 2).min(bottom.len() / 2);
        let whole = ow - ow % 4;
        // SAFETY: SSE2 is part of the x86-64 baseline; every load reads `top`/`bottom[2c..2c + 8]`
        // and every store writes `y`/`am[c..c + 4]` with `c + 4 <= whole <= ow`, inside the slices.
        unsafe {
            let offsets =
                [_mm_setzero_si128(), _mm_set1_epi32(1), _mm_set1_epi32(iw as i32), _mm_set1_epi32(iw as i32 + 1)];
            let lanes = _mm_set_epi32(6, 4, 2, 0);
            for c in (0..whole).step_by(4) {
                let (t0, t1) = (_mm_loadu_ps(top.as_ptr().add(2 * c)), _mm_loadu_ps(top.as_ptr().add(2 * c + 4)));
                let (b0, b1) = (_mm_loadu_ps(bottom.as_ptr().add(2 * c)), _mm_loadu_ps(bottom.as_ptr().add(2 * c + 4)));
                let candidates = [
                    _mm_shuffle_ps::<0b10_00_10_00>(t0, t1),
                    _mm_shuffle_ps::<0b11_01_11_01>(t0, t1),
                    _mm_shuffle_ps::<0b10_00_10_00>(b0, b1),
                    _mm_shuffle_ps::<0b11_01_11_01>(b0, b1),
                ];
                let (mut best, mut offset) = (candidates[0], offsets[0]);
                for (v, off) in candidates.iter().zip(&offsets).skip(1) {
                    let take = _mm_or_ps(_mm_cmpgt_ps(*v, best), _mm_cmpunord_ps(*v, *v));
                    best = select(take, *v, best);
                    offset = _mm_castps_si128(select(take, _mm_castsi128_ps(*off), _mm_castsi128_ps(offset)));
                }
                let at = _mm_add_epi32(_mm_set1_epi32((base + 2 * c as u32) as i32), lanes);
                _mm_storeu_ps(y.as_mut_ptr().add(c), best);
                _mm_storeu_si128(am.as_mut_ptr().add(c) as *mut __m128i, _mm_add_epi32(at, offset));
            }
        }
        whole
    }
}

/// Routes each output gradient to its window's winner, into a new vector: each plane is zeroed
/// just before its gradients are added (while it is in cache), instead of the whole tensor being
/// allocated zeroed first.
pub fn max_pool_backward(g: &PoolGeometry, dy: &[f32], argmax: &[u32]) -> Vec<f32> {
    g.check();
    assert_eq!(dy.len(), g.output_len(), "max_pool_backward: output-gradient length");
    assert_eq!(argmax.len(), g.output_len(), "max_pool_backward: argmax length");
    let (len, plane_in, plane_out) = (g.input_len(), g.in_h * g.in_w, g.out_h() * g.out_w());
    let mut dx = Vec::with_capacity(len);
    dx.spare_capacity_mut()[..len]
        .par_chunks_mut(plane_in)
        .zip(dy.par_chunks(plane_out))
        .zip(argmax.par_chunks(plane_out))
        .for_each(|((dx, dy), am)| {
            dx.fill(std::mem::MaybeUninit::new(0.0));
            // SAFETY: every value of the plane was just written.
            let dx = unsafe { &mut *(dx as *mut [std::mem::MaybeUninit<f32>] as *mut [f32]) };
            for (&g, &i) in dy.iter().zip(am) {
                dx[i as usize] += g;
            }
        });
    // SAFETY: the planes cover `len` values, each written above.
    unsafe { dx.set_len(len) };
    dx
}

/// Window means; padding counts as zeros in the divisor (PyTorch's `count_include_pad`).
pub fn avg_pool_forward(g: &PoolGeometry, x: &[f32], y: &mut [f32]) {
    g.check();
    assert_eq!(x.len(), g.input_len(), "avg_pool_forward: input length");
    assert_eq!(y.len(), g.output_len(), "avg_pool_forward: output length");
    let (ih, iw, oh, ow) = (g.in_h, g.in_w, g.out_h(), g.out_w());
    let scale = 1.0 / (g.kernel * g.kernel) as f32;
    y.par_chunks_mut(oh * ow).zip(x.par_chunks(ih * iw)).for_each(|(y, x)| {
        for r in 0..oh {
            let (r0, r1) = g.window(r, ih);
            for c in 0..ow {
                let (c0, c1) = g.window(c, iw);
                let mut sum = 0.0;
                for i in r0..r1 {
                    sum += x[i * iw + c0..i * iw + c1].iter().sum::<f32>();
                }
                y[r * ow + c] = sum * scale;
            }
        }
    });
}

/// Spreads each output gradient evenly over its window. `dx` is overwritten.
pub fn avg_pool_backward(g: &PoolGeometry, dy: &[f32], dx: &mut [f32]) {
    g.check();
    assert_eq!(dy.len(), g.output_len(), "avg_pool_backward: output-gradient length");
    assert_eq!(dx.len(), g.input_len(), "avg_pool_backward: input-gradient length");
    let (ih, iw, oh, ow) = (g.in_h, g.in_w, g.out_h(), g.out_w());
    let scale = 1.0 / (g.kernel * g.kernel) as f32;
    dx.par_chunks_mut(ih * iw).zip(dy.par_chunks(oh * ow)).for_each(|(dx, dy)| {
        dx.fill(0.0);
        for r in 0..oh {
            let (r0, r1) = g.window(r, ih);
            for c in 0..ow {
                let (c0, c1) = g.window(c, iw);
                let v = dy[r * ow + c] * scale;
                for i in r0..r1 {
                    dx[i * iw + c0..i * iw + c1].iter_mut().for_each(|d| *d += v);
                }
            }
        }
    });
}

#[cfg(test)]
mod tests {
    use super::*;

    /// The 2x2 path against the generic one, bit for bit, on values with ties, infinities and NaNs.
    #[test]
    fn two_by_two_path_matches_the_generic_window_scan() {
        let mut state = 0x2545_f491_4f6c_dd1du64;
        let mut next = move || {
            state ^= state << 13;
            state ^= state >> 7;
            state ^= state << 17;
            state
        };
        let special = [f32::NAN, f32::INFINITY, f32::NEG_INFINITY, 0.0, -0.0, 1.0];
        for case in 0..60 {
            // Widths past 8 reach the four-at-a-time path, with a scalar tail when `ow % 4 != 0`.
            let (in_h, in_w) = (2 + (next() % 9) as usize, 2 + (next() % 40) as usize);
            let g = PoolGeometry { batch: 1, channels: 2, in_h, in_w, kernel: 2, stride: 2, padding: 0 };
            let x: Vec<f32> = (0..g.input_len())
                .map(|_| match next() % 8 {
                    0 => special[(next() % special.len() as u64) as usize],
                    1 => 0.5, // ties
                    _ => (next() % 1000) as f32 / 100.0 - 5.0,
                })
                .collect();
            let (plane_in, plane_out) = (in_h * in_w, g.out_h() * g.out_w());
            for (ch, xp) in x.chunks(plane_in).enumerate() {
                let (mut y1, mut a1) = (vec![0.0; plane_out], vec![0; plane_out]);
                let (mut y2, mut a2) = (vec![0.0; plane_out], vec![0; plane_out]);
                max_pool_plane(&g, xp, &mut y1, &mut a1);
                max_pool_2x2_plane(xp, in_w, g.out_h(), g.out_w(), &mut y2, &mut a2);
                let bits = |v: &[f32]| v.iter().map(|f| f.to_bits()).collect::<Vec<_>>();
                assert_eq!(bits(&y1), bits(&y2), "case {case} channel {ch} values");
                assert_eq!(a1, a2, "case {case} channel {ch} argmax");
            }
        }
    }
}
