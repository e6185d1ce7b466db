//! conv2d forward and both backward passes against naive f64 loops and finite differences.

mod common;
use common::*;
use rand::Rng;
use trustsplit_kernels::conv::*;

fn naive_forward(g: &ConvGeometry, x: &[f64], w: &[f64], b: &[f64]) -> Vec<f64> {
    let (oh, ow) = (g.out_h(), g.out_w());
    let mut y = vec![0.0; g.output_len()];
    for n in 0..g.batch {
        for co in 0..g.out_channels {
            for r in 0..oh {
                for c in 0..ow {
                    let mut s = b[co];
                    for ci in 0..g.in_channels {
                        for ki in 0..g.kernel_h {
                            for kj in 0..g.kernel_w {
                                let ih = (r * g.stride + ki) as isize - g.padding as isize;
                                let iw = (c * g.stride + kj) as isize - g.padding as isize;
                                if ih < 0 || iw < 0 || ih >= g.in_h as isize || iw >= g.in_w as isize {
                                    continue;
                                }
                                let xi = ((n * g.in_channels + ci) * g.in_h + ih as usize) * g.in_w + iw as usize;
                                let wi = ((co * g.in_channels + ci) * g.kernel_h + ki) * g.kernel_w + kj;
                                s += x[xi] * w[wi];
                            }
                        }
                    }
                    y[((n * g.out_channels + co) * oh + r) * ow + c] = s;
                }
            }
        }
    }
    y
}

fn random_geometry(rng: &mut impl Rng) -> ConvGeometry {
    loop {
        let k = [1, 3, 5][rng.random_range(0..3)];
        let g = ConvGeometry {
            batch: rng.random_range(1..6),
            in_channels: rng.random_range(1..6),
            out_channels: rng.random_range(1..7),
            in_h: rng.random_range(1..12),
            in_w: rng.random_range(1..12),
            kernel_h: k,
            kernel_w: if rng.random_bool(0.8) { k } else { [1, 3][rng.random_range(0..2)] },
            stride: rng.random_range(1..3),
            padding: rng.random_range(0..3),
        };
        if g.validate().is_ok() {
            return g;
        }
    }
}

fn check(g: &ConvGeometry, seed: u64, threads: usize) {
    let mut r = rng(seed);
    let x = random_vec(&mut r, g.input_len());
    let w = random_vec(&mut r, g.weight_len());
    let b = random_vec(&mut r, g.out_channels);
    let dy = random_vec(&mut r, g.output_len());
    let (xd, wd, bd, dyd) = (to_f64(&x), to_f64(&w), to_f64(&b), to_f64(&dy));
    let (y, dx, dw, db, [dw_few, dw_few_out], dx_few_out) = with_threads(threads, || {
        let mut y = vec![0.0; g.output_len()];
        conv2d_forward(g, &x, &w, Some(&b), &mut y);
        let mut dx = vec![f32::NAN; g.input_len()];
        conv2d_backward_data(g, &dy, &w, &mut dx);
        let mut dw = vec![f32::NAN; g.weight_len()];
        let mut db = vec![f32::NAN; g.out_channels];
        conv2d_backward_weight(g, &x, &dy, &mut dw, Some(&mut db));
        let mut dw_few = vec![f32::NAN; g.weight_len()];
        conv2d_backward_weight_few_inputs(g, &x, &dy, &mut dw_few);
        let mut dw_few_out = vec![f32::NAN; g.weight_len()];
        conv2d_backward_weight_few_outputs(g, &x, &dy, &mut dw_few_out);
        let mut dx_few_out = vec![f32::NAN; g.input_len()];
        conv2d_backward_data_few_outputs(g, &dy, &w, &mut dx_few_out);
        (y, dx, dw, db, [dw_few, dw_few_out], dx_few_out)
    });
    let what = format!("{g:?} threads={threads}");
    assert_close(&format!("forward {what}"), &y, &naive_forward(g, &xd, &wd, &bd), 1e-5);
    let want_dx = finite_difference(|xv| naive_forward(g, xv, &wd, &bd), &xd, &dyd);
    assert_close(&format!("backward-data {what}"), &dx, &want_dx, 1e-5);
    assert_close(&format!("backward-data, few-outputs path {what}"), &dx_few_out, &want_dx, 1e-5);
    let want_dw = finite_difference(|wv| naive_forward(g, &xd, wv, &bd), &wd, &dyd);
    assert_close(&format!("backward-weight {what}"), &dw, &want_dw, 1e-5);
    assert_close(&format!("backward-weight, few-inputs path {what}"), &dw_few, &want_dw, 1e-5);
    assert_close(&format!("backward-weight, few-outputs path {what}"), &dw_few_out, &want_dw, 1e-5);
    let want_db = finite_difference(|bv| naive_forward(g, &xd, &wd, bv), &bd, &dyd);
    assert_close(&format!("backward-bias {what}"), &db, &want_db, 1e-5);
}

#[test]
fn random_geometries_match_reference_on_one_and_two_threads() {
    let mut r = rng(7);
    for case in 0..60 {
        let g = random_geometry(&mut r);
        check(&g, 100 + case, 1 + (case as usize % 2));
    }
}

#[test]
fn edge_geometries() {
    let base = ConvGeometry {
        batch: 3,
        in_channels: 4,
        out_channels: 5,
        in_h: 7,
        in_w: 9,
        kernel_h: 3,
        kernel_w: 3,
        stride: 1,
        padding: 1,
    };
    let cases = [
        // pointwise (no unrolling) path
        ConvGeometry { kernel_h: 1, kernel_w: 1, padding: 0, ..base },
        // stride 2, padding 2, kernel 5
        ConvGeometry { kernel_h: 5, kernel_w: 5, stride: 2, padding: 2, ..base },
        // kernel covering the whole padded input: one output pixel, samples grouped
        ConvGeometry { kernel_h: 9, kernel_w: 11, padding: 1, batch: 7, ..base },
        // many tiny maps: grouped samples spread over threads
        ConvGeometry { in_h: 2, in_w: 3, batch: 9, ..base },
        // padding larger than the kernel's reach leaves whole zero rows
        ConvGeometry { kernel_h: 1, kernel_w: 1, padding: 2, stride: 2, ..base },
        // fewer output than input channels, stride 1: both backward passes go through the
        // transposed convolution (same padding, no padding, and padding up to k - 1)
        ConvGeometry { in_channels: 9, out_channels: 2, ..base },
        ConvGeometry { in_channels: 6, out_channels: 1, padding: 0, ..base },
        ConvGeometry { in_channels: 7, out_channels: 3, kernel_h: 5, kernel_w: 5, padding: 4, ..base },
        ConvGeometry { in_channels: 5, out_channels: 2, kernel_h: 1, kernel_w: 1, padding: 0, batch: 1, ..base },
    ];
    for (i, g) in cases.iter().enumerate() {
        for threads in [1, 2] {
            check(g, 900 + i as u64, threads);
        }
    }
}

#[test]
fn invalid_geometry_is_reported() {
    let g = ConvGeometry {
        batch: 1,
        in_channels: 1,
        out_channels: 1,
        in_h: 2,
        in_w: 2,
        kernel_h: 5,
        kernel_w: 5,
        stride: 1,
        padding: 0,
    };
    let err = g.validate().unwrap_err();
    assert!(err.contains("larger than the padded input"), "{err}");
}
