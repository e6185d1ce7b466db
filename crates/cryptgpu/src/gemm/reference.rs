//! The naive loops the fast kernels are checked against: one multiply-add per line of the
//! definition, no blocking, no lowering.

use super::ConvShape;

/// The input pixel a kernel tap reads for an output position, if it is not padding.
fn source(s: &ConvShape, oy: usize, ox: usize, ky: usize, kx: usize) -> Option<(usize, usize)> {
    let y = (oy * s.stride + ky).checked_sub(s.padding)?;
    let x = (ox * s.stride + kx).checked_sub(s.padding)?;
    (y < s.height && x < s.width).then_some((y, x))
}

/// `C = A B` for `A: m x k`, `B: k x n`.
pub fn matmul(a: &[u64], b: &[u64], m: usize, k: usize, n: usize) -> Vec<u64> {
    assert_eq!(a.len(), m * k);
    assert_eq!(b.len(), k * n);
    let mut c = vec![0u64; m * n];
    for i in 0..m {
        for p in 0..k {
            let av = a[i * k + p];
            for j in 0..n {
                c[i * n + j] = c[i * n + j].wrapping_add(av.wrapping_mul(b[p * n + j]));
            }
        }
    }
    c
}

/// `C = A^T B` for `A` stored `k x m` and `B: k x n` (`C: m x n`).
pub fn matmul_tn(a: &[u64], b: &[u64], m: usize, k: usize, n: usize) -> Vec<u64> {
    matmul(&transpose(a, k, m), b, m, k, n)
}

/// `C = A B^T` for `A: m x k` and `B` stored `n x k` (`C: m x n`).
pub fn matmul_nt(a: &[u64], b: &[u64], m: usize, k: usize, n: usize) -> Vec<u64> {
    matmul(a, &transpose(b, n, k), m, k, n)
}

/// The transpose of a `rows x cols` matrix.
pub fn transpose(a: &[u64], rows: usize, cols: usize) -> Vec<u64> {
    assert_eq!(a.len(), rows * cols);
    let mut t = vec![0u64; rows * cols];
    for r in 0..rows {
        for c in 0..cols {
            t[c * rows + r] = a[r * cols + c];
        }
    }
    t
}

/// `y = conv(x, w)`: `N x O x OH x OW`.
pub fn conv2d(x: &[u64], w: &[u64], s: &ConvShape) -> Vec<u64> {
    assert_eq!(x.len(), s.input_len());
    assert_eq!(w.len(), s.weight_len());
    let (oh, ow) = (s.out_height(), s.out_width());
    let mut y = vec![0u64; s.output_len()];
    for n in 0..s.batch {
        for o in 0..s.out_channels {
            for oy in 0..oh {
                for ox in 0..ow {
                    let mut acc = 0u64;
                    for c in 0..s.in_channels {
                        for ky in 0..s.kernel {
                            for kx in 0..s.kernel {
                                if let Some((iy, ix)) = source(s, oy, ox, ky, kx) {
                                    let xv = x[((n * s.in_channels + c) * s.height + iy) * s.width + ix];
                                    let wv = w[((o * s.in_channels + c) * s.kernel + ky) * s.kernel + kx];
                                    acc = acc.wrapping_add(xv.wrapping_mul(wv));
                                }
                            }
                        }
                    }
                    y[((n * s.out_channels + o) * oh + oy) * ow + ox] = acc;
                }
            }
        }
    }
    y
}

/// The input gradient `dx` (`N x C x H x W`) of [`conv2d`] from `dy` (`N x O x OH x OW`).
pub fn conv2d_input_grad(dy: &[u64], w: &[u64], s: &ConvShape) -> Vec<u64> {
    assert_eq!(dy.len(), s.output_len());
    assert_eq!(w.len(), s.weight_len());
    let (oh, ow) = (s.out_height(), s.out_width());
    let mut dx = vec![0u64; s.input_len()];
    for n in 0..s.batch {
        for o in 0..s.out_channels {
            for oy in 0..oh {
                for ox in 0..ow {
                    let g = dy[((n * s.out_channels + o) * oh + oy) * ow + ox];
                    for c in 0..s.in_channels {
                        for ky in 0..s.kernel {
                            for kx in 0..s.kernel {
                                if let Some((iy, ix)) = source(s, oy, ox, ky, kx) {
                                    let wv = w[((o * s.in_channels + c) * s.kernel + ky) * s.kernel + kx];
                                    let d = &mut dx[((n * s.in_channels + c) * s.height + iy) * s.width + ix];
                                    *d = d.wrapping_add(g.wrapping_mul(wv));
                                }
                            }
                        }
                    }
                }
            }
        }
    }
    dx
}

/// The weight gradient `dw` (`O x C x K x K`) of [`conv2d`] from its input and `dy`.
pub fn conv2d_weight_grad(x: &[u64], dy: &[u64], s: &ConvShape) -> Vec<u64> {
    assert_eq!(x.len(), s.input_len());
    assert_eq!(dy.len(), s.output_len());
    let (oh, ow) = (s.out_height(), s.out_width());
    let mut dw = vec![0u64; s.weight_len()];
    for n in 0..s.batch {
        for o in 0..s.out_channels {
            for oy in 0..oh {
                for ox in 0..ow {
                    let g = dy[((n * s.out_channels + o) * oh + oy) * ow + ox];
                    for c in 0..s.in_channels {
                        for ky in 0..s.kernel {
                            for kx in 0..s.kernel {
                                if let Some((iy, ix)) = source(s, oy, ox, ky, kx) {
                                    let xv = x[((n * s.in_channels + c) * s.height + iy) * s.width + ix];
                                    let d = &mut dw[((o * s.in_channels + c) * s.kernel + ky) * s.kernel + kx];
                                    *d = d.wrapping_add(g.wrapping_mul(xv));
                                }
                            }
                        }
                    }
                }
            }
        }
    }
    dw
}
