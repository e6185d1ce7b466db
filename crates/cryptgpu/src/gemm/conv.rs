//! Convolutions lowered to the ring GEMM: im2col, one GEMM per group of images, col2im.
//!
//! The lowered input of a group of `g` images is `C*K*K x g*OH*OW` (row `(c, ky, kx)`, column
//! `(image, oy, ox)`); the forward pass is `W (O x CKK)` times it, the input gradient is
//! `W^T dY` scattered back by col2im, and the weight gradient is `dY` times its transpose summed
//! over the groups. Groups run in parallel and keep their lowered input in a per-thread buffer
//! instead of lowering the whole batch at once.

use rayon::prelude::*;

use super::kernel::{add_assign, gemm_acc, View};
use super::ConvShape;

/// Fewest GEMM columns worth running alone: below it, images are grouped so that a small output
/// (a 2 x 2 map has 4 columns) does not leave most of a 16-wide register tile padding and the
/// weights are not re-packed for a handful of multiply-adds.
const MIN_COLUMNS: usize = 64;

struct Geometry {
    /// Output pixels per image and channel.
    p: usize,
    /// Rows of the lowered input: `C * K * K`.
    ckk: usize,
    /// Images per GEMM.
    g: usize,
    /// A 1x1, stride-1, unpadded kernel lowers an image to itself, so im2col is skipped.
    pointwise: bool,
}

impl Geometry {
    fn new(s: &ConvShape) -> Geometry {
        let p = s.out_height() * s.out_width();
        let g = if p >= MIN_COLUMNS { 1 } else { MIN_COLUMNS.div_ceil(p.max(1)).min(s.batch).max(1) };
        Geometry {
            p,
            ckk: s.in_channels * s.kernel * s.kernel,
            g,
            pointwise: s.kernel == 1 && s.stride == 1 && s.padding == 0,
        }
    }
}

/// `y = conv(x, w)`: `N x O x OH x OW`.
pub fn conv2d(x: &[u64], w: &[u64], s: &ConvShape) -> Vec<u64> {
    assert_eq!(x.len(), s.input_len());
    assert_eq!(w.len(), s.weight_len());
    let mut y = vec![0u64; s.output_len()];
    if y.is_empty() || x.is_empty() || w.is_empty() {
        return y;
    }
    let Geometry { p, ckk, g, pointwise } = Geometry::new(s);
    let (o, chw) = (s.out_channels, s.in_channels * s.height * s.width);
    let wv = View::rows(w, ckk);
    y.par_chunks_mut(g * o * p).zip(x.par_chunks(g * chw)).for_each_init(
        || (Vec::new(), Vec::new()),
        |(cols, out), (yg, xg)| {
            let gn = yg.len() / (o * p);
            if pointwise && gn == 1 {
                gemm_acc(yg, wv, View::rows(xg, p), o, ckk, p);
                return;
            }
            im2col(xg, s, gn, cols);
            if gn == 1 {
                gemm_acc(yg, wv, View::rows(cols, p), o, ckk, p);
                return;
            }
            out.clear();
            out.resize(o * gn * p, 0);
            gemm_acc(out, wv, View::rows(cols, gn * p), o, ckk, gn * p);
            ungroup_columns(out, o, p, gn, yg);
        },
    );
    y
}

/// The input gradient `dx` (`N x C x H x W`) of [`conv2d`] from `dy` (`N x O x OH x OW`).
pub fn conv2d_input_grad(dy: &[u64], w: &[u64], s: &ConvShape) -> Vec<u64> {
    assert_eq!(dy.len(), s.output_len());
    assert_eq!(w.len(), s.weight_len());
    let mut dx = vec![0u64; s.input_len()];
    if dx.is_empty() || dy.is_empty() || w.is_empty() {
        return dx;
    }
    let Geometry { p, ckk, g, pointwise } = Geometry::new(s);
    let (o, chw) = (s.out_channels, s.in_channels * s.height * s.width);
    let wt = View::transposed(w, ckk);
    dx.par_chunks_mut(g * chw).zip(dy.par_chunks(g * o * p)).for_each_init(
        || (Vec::new(), Vec::new()),
        |(dcols, gathered), (dxg, dyg)| {
            let gn = dyg.len() / (o * p);
            if pointwise && gn == 1 {
                gemm_acc(dxg, wt, View::rows(dyg, p), ckk, o, p);
                return;
            }
            let dy_mat = group_columns(dyg, o, p, gn, gathered);
            dcols.clear();
            dcols.resize(ckk * gn * p, 0);
            gemm_acc(dcols, wt, View::rows(dy_mat, gn * p), ckk, o, gn * p);
            col2im(dcols, s, gn, dxg);
        },
    );
    dx
}

/// The weight gradient `dw` (`O x C x K x K`) of [`conv2d`] from its input and `dy`.
pub fn conv2d_weight_grad(x: &[u64], dy: &[u64], s: &ConvShape) -> Vec<u64> {
    assert_eq!(x.len(), s.input_len());
    assert_eq!(dy.len(), s.output_len());
    let len = s.weight_len();
    if len == 0 || x.is_empty() || dy.is_empty() {
        return vec![0u64; len];
    }
    let Geometry { p, ckk, g, pointwise } = Geometry::new(s);
    let (o, chw) = (s.out_channels, s.in_channels * s.height * s.width);
    x.par_chunks(g * chw)
        .zip(dy.par_chunks(g * o * p))
        .fold(
            || (vec![0u64; len], Vec::new(), Vec::new()),
            |(mut dw, mut cols, mut gathered), (xg, dyg)| {
                let gn = dyg.len() / (o * p);
                let dy_mat = View::rows(group_columns(dyg, o, p, gn, &mut gathered), gn * p);
                if pointwise && gn == 1 {
                    gemm_acc(&mut dw, dy_mat, View::transposed(xg, p), o, p, ckk);
                } else {
                    im2col(xg, s, gn, &mut cols);
                    gemm_acc(&mut dw, dy_mat, View::transposed(&cols, gn * p), o, gn * p, ckk);
                }
                (dw, cols, gathered)
            },
        )
        .map(|(dw, _, _)| dw)
        .reduce_with(|mut a, b| {
            add_assign(&mut a, &b);
            a
        })
        .unwrap_or_else(|| vec![0u64; len])
}

/// `dy` of `gn` images (`gn x O x P`) as the `O x gn*P` matrix the GEMMs read; one image already
/// has that layout and is not copied.
pub(super) fn group_columns<'a>(dyg: &'a [u64], o: usize, p: usize, gn: usize, buf: &'a mut Vec<u64>) -> &'a [u64] {
    if gn == 1 {
        return dyg;
    }
    buf.clear();
    buf.resize(o * gn * p, 0);
    for (gi, image) in dyg.chunks_exact(o * p).enumerate() {
        for (oc, plane) in image.chunks_exact(p).enumerate() {
            buf[oc * gn * p + gi * p..][..p].copy_from_slice(plane);
        }
    }
    buf
}

/// The inverse of [`group_columns`]: the `O x gn*P` product of `gn` images into `yg`
/// (`gn x O x P`).
pub(super) fn ungroup_columns(out: &[u64], o: usize, p: usize, gn: usize, yg: &mut [u64]) {
    for (gi, yn) in yg.chunks_exact_mut(o * p).enumerate() {
        for (oc, plane) in yn.chunks_exact_mut(p).enumerate() {
            plane.copy_from_slice(&out[oc * gn * p + gi * p..][..p]);
        }
    }
}

/// Output positions `lo..hi` along one axis whose tap at kernel offset `off` reads inside the
/// input (`0 <= o * stride + off - pad < size`); outside them it reads padding.
fn valid_outputs(off: usize, size: usize, out: usize, stride: usize, pad: usize) -> (usize, usize) {
    let lo = if pad > off { (pad - off).div_ceil(stride) } else { 0 };
    let hi = if size + pad > off { ((size + pad - off - 1) / stride + 1).min(out) } else { 0 };
    (lo.min(hi), hi)
}

/// The lowered input of `gn` images into `cols` (`C*K*K x gn*P`; `cols` may be longer, from an
/// earlier, larger group).
pub(super) fn im2col(xg: &[u64], s: &ConvShape, gn: usize, cols: &mut Vec<u64>) {
    let (oh, ow, k) = (s.out_height(), s.out_width(), s.kernel);
    let (p, hw) = (oh * ow, s.height * s.width);
    let width = gn * p;
    let len = s.in_channels * k * k * width;
    cols.resize(len.max(cols.len()), 0);
    for (r, row) in cols[..len].chunks_exact_mut(width).enumerate() {
        let (c, ky, kx) = (r / (k * k), r / k % k, r % k);
        let (lo, hi) = valid_outputs(kx, s.width, ow, s.stride, s.padding);
        for (gi, out) in row.chunks_exact_mut(p).enumerate() {
            let plane = &xg[(gi * s.in_channels + c) * hw..][..hw];
            for (oy, orow) in out.chunks_exact_mut(ow).enumerate() {
                let iy = (oy * s.stride + ky).checked_sub(s.padding).filter(|&iy| iy < s.height);
                let Some(iy) = iy.filter(|_| lo < hi) else {
                    orow.fill(0);
                    continue;
                };
                let src = &plane[iy * s.width..][..s.width];
                orow[..lo].fill(0);
                orow[hi..].fill(0);
                let first = lo * s.stride + kx - s.padding;
                if s.stride == 1 {
                    orow[lo..hi].copy_from_slice(&src[first..first + hi - lo]);
                } else {
                    for (v, &xv) in orow[lo..hi].iter_mut().zip(src[first..].iter().step_by(s.stride)) {
                        *v = xv;
                    }
                }
            }
        }
    }
}

/// Adds the lowered gradient `dcols` (`C*K*K x gn*P`) of `gn` images back onto their pixels.
pub(super) fn col2im(dcols: &[u64], s: &ConvShape, gn: usize, dxg: &mut [u64]) {
    let (oh, ow, k) = (s.out_height(), s.out_width(), s.kernel);
    let (p, hw) = (oh * ow, s.height * s.width);
    let width = gn * p;
    for (plane_index, plane) in dxg.chunks_exact_mut(hw).enumerate() {
        let (gi, c) = (plane_index / s.in_channels, plane_index % s.in_channels);
        for ky in 0..k {
            for kx in 0..k {
                let (lo, hi) = valid_outputs(kx, s.width, ow, s.stride, s.padding);
                if lo >= hi {
                    continue;
                }
                let row = &dcols[((c * k + ky) * k + kx) * width + gi * p..][..p];
                for (oy, grow) in row.chunks_exact(ow).enumerate() {
                    let Some(iy) = (oy * s.stride + ky).checked_sub(s.padding).filter(|&iy| iy < s.height) else {
                        continue;
                    };
                    let first = lo * s.stride + kx - s.padding;
                    let dst = plane[iy * s.width + first..].iter_mut().step_by(s.stride);
                    for (d, &v) in dst.zip(&grow[lo..hi]) {
                        *d = d.wrapping_add(v);
                    }
                }
            }
        }
    }
}
