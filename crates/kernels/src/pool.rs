//! Max pooling (with the argmax kept for the backward pass) and average pooling.

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
pub fn max_pool_forward(g: &PoolGeometry, x: &[f32], y: &mut [f32], argmax: &mut [u32]) {
    g.check();
    assert_eq!(x.len(), g.input_len(), "max_pool_forward: input length");
    assert_eq!(y.len(), g.output_len(), "max_pool_forward: output length");
    assert_eq!(argmax.len(), g.output_len(), "max_pool_forward: argmax length");
    let (ih, iw, oh, ow) = (g.in_h, g.in_w, g.out_h(), g.out_w());
    y.par_chunks_mut(oh * ow).zip(argmax.par_chunks_mut(oh * ow)).zip(x.par_chunks(ih * iw)).for_each(
        |((y, am), x)| {
            for r in 0..oh {
                let (r0, r1) = g.window(r, ih);
                for c in 0..ow {
                    let (c0, c1) = g.window(c, iw);
                    let (mut best, mut best_i) = (f32::NEG_INFINITY, r0 * iw + c0);
                    for i in r0..r1 {
                        for j in c0..c1 {
                            let v = x[i * iw + j];
                            // A NaN wins (and stays) so it propagates, as in PyTorch.
                            if v > best || v.is_nan() {
                                best = v;
                                best_i = i * iw + j;
                            }
                        }
                    }
                    y[r * ow + c] = best;
                    am[r * ow + c] = best_i as u32;
                }
            }
        },
    );
}

/// Routes each output gradient to its window's winner. `dx` is overwritten.
pub fn max_pool_backward(g: &PoolGeometry, dy: &[f32], argmax: &[u32], dx: &mut [f32]) {
    g.check();
    assert_eq!(dy.len(), g.output_len(), "max_pool_backward: output-gradient length");
    assert_eq!(argmax.len(), g.output_len(), "max_pool_backward: argmax length");
    assert_eq!(dx.len(), g.input_len(), "max_pool_backward: input-gradient length");
    let (plane_in, plane_out) = (g.in_h * g.in_w, g.out_h() * g.out_w());
    dx.par_chunks_mut(plane_in).zip(dy.par_chunks(plane_out)).zip(argmax.par_chunks(plane_out)).for_each(
        |((dx, dy), am)| {
            dx.fill(0.0);
            for (&g, &i) in dy.iter().zip(am) {
                dx[i as usize] += g;
            }
        },
    );
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
