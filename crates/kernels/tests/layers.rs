//! Pooling, batch-norm, linear, ReLU and loss kernels against naive f64 references.

mod common;
use common::*;
use rand::Rng;
use trustsplit_kernels::{activation::*, batchnorm::*, linear::*, loss::*, pool::*};

fn naive_pool(g: &PoolGeometry, x: &[f64], max: bool) -> Vec<f64> {
    let (oh, ow) = (g.out_h(), g.out_w());
    let mut y = Vec::with_capacity(g.output_len());
    for plane in x.chunks(g.in_h * g.in_w) {
        for r in 0..oh {
            for c in 0..ow {
                let mut best = f64::NEG_INFINITY;
                let mut sum = 0.0;
                for ki in 0..g.kernel {
                    for kj in 0..g.kernel {
                        let i = (r * g.stride + ki) as isize - g.padding as isize;
                        let j = (c * g.stride + kj) as isize - g.padding as isize;
                        if i >= 0 && j >= 0 && (i as usize) < g.in_h && (j as usize) < g.in_w {
                            let v = plane[i as usize * g.in_w + j as usize];
                            best = best.max(v);
                            sum += v;
                        }
                    }
                }
                y.push(if max { best } else { sum / (g.kernel * g.kernel) as f64 });
            }
        }
    }
    y
}

fn random_pool(r: &mut impl Rng) -> PoolGeometry {
    loop {
        let g = PoolGeometry {
            batch: r.random_range(1..4),
            channels: r.random_range(1..5),
            in_h: r.random_range(1..10),
            in_w: r.random_range(1..10),
            kernel: r.random_range(1..4),
            stride: r.random_range(1..3),
            padding: r.random_range(0..2),
        };
        if g.validate().is_ok() {
            return g;
        }
    }
}

#[test]
fn pooling_matches_reference() {
    let mut r = rng(11);
    for case in 0..40 {
        let g = random_pool(&mut r);
        let x = random_vec(&mut r, g.input_len());
        let dy = random_vec(&mut r, g.output_len());
        let (xd, dyd) = (to_f64(&x), to_f64(&dy));
        with_threads(1 + case % 2, || {
            let mut y = vec![0.0; g.output_len()];
            let mut am = vec![0u32; g.output_len()];
            max_pool_forward(&g, &x, &mut y, &mut am);
            assert_close(&format!("max forward {g:?}"), &y, &naive_pool(&g, &xd, true), 1e-6);
            let mut dx = max_pool_backward(&g, &dy, &am);
            // Random inputs have distinct values, so the max is differentiable almost surely.
            let fd = finite_difference(|v| naive_pool(&g, v, true), &xd, &dyd);
            assert_close(&format!("max backward {g:?}"), &dx, &fd, 1e-5);

            avg_pool_forward(&g, &x, &mut y);
            assert_close(&format!("avg forward {g:?}"), &y, &naive_pool(&g, &xd, false), 1e-6);
            avg_pool_backward(&g, &dy, &mut dx);
            let fd = finite_difference(|v| naive_pool(&g, v, false), &xd, &dyd);
            assert_close(&format!("avg backward {g:?}"), &dx, &fd, 1e-5);
        });
    }
}

fn naive_bn(s: BnShape, x: &[f64], gamma: &[f64], beta: &[f64], eps: f64) -> Vec<f64> {
    let mut y = vec![0.0; x.len()];
    let idx = |n: usize, c: usize, p: usize| (n * s.channels + c) * s.spatial + p;
    for c in 0..s.channels {
        let vals: Vec<f64> =
            (0..s.batch).flat_map(|n| (0..s.spatial).map(move |p| (n, p))).map(|(n, p)| x[idx(n, c, p)]).collect();
        let m = vals.iter().sum::<f64>() / vals.len() as f64;
        let v = vals.iter().map(|a| (a - m).powi(2)).sum::<f64>() / vals.len() as f64;
        for n in 0..s.batch {
            for p in 0..s.spatial {
                y[idx(n, c, p)] = gamma[c] * (x[idx(n, c, p)] - m) / (v + eps).sqrt() + beta[c];
            }
        }
    }
    y
}

#[test]
fn batchnorm_matches_reference() {
    let mut r = rng(12);
    for case in 0..20 {
        let s = BnShape { batch: r.random_range(2..5), channels: r.random_range(1..5), spatial: r.random_range(1..10) };
        let eps = 1e-5;
        // Offset and scale the input so normalisation does real work.
        let x: Vec<f32> = random_vec(&mut r, s.len()).iter().map(|v| 3.0 * v + 0.5).collect();
        let gamma = random_vec(&mut r, s.channels);
        let beta = random_vec(&mut r, s.channels);
        let dy = random_vec(&mut r, s.len());
        let (xd, gd, bd, dyd) = (to_f64(&x), to_f64(&gamma), to_f64(&beta), to_f64(&dy));
        with_threads(1 + case % 2, || {
            let (y, stats) = batchnorm_train_forward(s, &x, &gamma, &beta, eps as f32);
            assert_close("bn forward", &y, &naive_bn(s, &xd, &gd, &bd, eps), 1e-5);
            let (mut dg, mut db) = (vec![0.0; s.channels], vec![0.0; s.channels]);
            let dx = batchnorm_backward(s, &x, &dy, &gamma, &stats, &mut dg, &mut db);
            // In place, the same values bit for bit.
            let (mut in_place, mut dg2, mut db2) = (dy.clone(), vec![0.0; s.channels], vec![0.0; s.channels]);
            batchnorm_backward_in_place(s, &x, &mut in_place, &gamma, &stats, &mut dg2, &mut db2);
            assert!(dx.iter().zip(&in_place).all(|(a, b)| a.to_bits() == b.to_bits()), "bn dx in place differs");
            assert!(dg == dg2 && db == db2, "bn parameter gradients in place differ");
            let fd = finite_difference(|v| naive_bn(s, v, &gd, &bd, eps), &xd, &dyd);
            assert_close("bn dx", &dx, &fd, 1e-4);
            let fd = finite_difference(|v| naive_bn(s, &xd, v, &bd, eps), &gd, &dyd);
            assert_close("bn dgamma", &dg, &fd, 1e-4);
            let fd = finite_difference(|v| naive_bn(s, &xd, &gd, v, eps), &bd, &dyd);
            assert_close("bn dbeta", &db, &fd, 1e-4);

            // Eval mode with arbitrary running statistics.
            let rm = random_vec(&mut rng(case as u64), s.channels);
            let rv: Vec<f32> =
                random_vec(&mut rng(case as u64 + 50), s.channels).iter().map(|v| v.abs() + 0.1).collect();
            let mut y = x.clone();
            batchnorm_eval_forward_in_place(s, &mut y, &gamma, &beta, &rm, &rv, eps as f32);
            let want: Vec<f64> = (0..s.len())
                .map(|i| {
                    let c = (i / s.spatial) % s.channels;
                    gd[c] * (xd[i] - rm[c] as f64) / (rv[c] as f64 + eps).sqrt() + bd[c]
                })
                .collect();
            assert_close("bn eval", &y, &want, 1e-5);
        });
    }
}

fn naive_linear(n: usize, i: usize, o: usize, x: &[f64], w: &[f64], b: &[f64]) -> Vec<f64> {
    let mut y = vec![0.0; n * o];
    for a in 0..n {
        for c in 0..o {
            y[a * o + c] = b[c] + (0..i).map(|k| x[a * i + k] * w[c * i + k]).sum::<f64>();
        }
    }
    y
}

#[test]
fn linear_matches_reference() {
    let mut r = rng(13);
    for case in 0..20 {
        let (n, i, o) = (r.random_range(1..9), r.random_range(1..40), r.random_range(1..13));
        let x = random_vec(&mut r, n * i);
        let w = random_vec(&mut r, o * i);
        let b = random_vec(&mut r, o);
        let dy = random_vec(&mut r, n * o);
        let (xd, wd, bd, dyd) = (to_f64(&x), to_f64(&w), to_f64(&b), to_f64(&dy));
        with_threads(1 + case % 2, || {
            let mut y = vec![0.0; n * o];
            linear_forward(n, i, o, &x, &w, Some(&b), &mut y);
            assert_close("linear forward", &y, &naive_linear(n, i, o, &xd, &wd, &bd), 1e-5);
            let mut dx = vec![0.0; n * i];
            linear_backward_data(n, i, o, &dy, &w, &mut dx);
            let fd = finite_difference(|v| naive_linear(n, i, o, v, &wd, &bd), &xd, &dyd);
            assert_close("linear dx", &dx, &fd, 1e-5);
            let (mut dw, mut db) = (vec![0.0; o * i], vec![0.0; o]);
            linear_backward_weight(n, i, o, &x, &dy, &mut dw, Some(&mut db));
            let fd = finite_difference(|v| naive_linear(n, i, o, &xd, v, &bd), &wd, &dyd);
            assert_close("linear dw", &dw, &fd, 1e-5);
            let fd = finite_difference(|v| naive_linear(n, i, o, &xd, &wd, v), &bd, &dyd);
            assert_close("linear db", &db, &fd, 1e-5);
        });
    }
}

#[test]
fn relu_matches_reference() {
    let mut r = rng(14);
    // Lengths around the 32-value mask words and the parallel chunks; special values mixed in.
    for len in [0, 1, 31, 32, 33, 1000, 16_384, 40_001] {
        let mut x = random_vec(&mut r, len);
        for (i, special) in [f32::NAN, -0.0, 0.0, f32::INFINITY, f32::NEG_INFINITY, 1e-40].into_iter().enumerate() {
            if let Some(v) = x.get_mut(i * 7) {
                *v = special;
            }
        }
        let dy = random_vec(&mut r, len);
        let (mut y, mut mask) = (x.clone(), vec![0xdead_beef; len.div_ceil(MASK_BITS)]);
        relu_in_place(&mut y, &mut mask);
        // f64's max also returns the number when the other operand is NaN. ReLU is exact (and
        // infinities stay infinite), so values are compared exactly.
        let want: Vec<f64> = x.iter().map(|&v| (v as f64).max(0.0)).collect();
        for (i, (&got, &w)) in y.iter().zip(&want).enumerate() {
            assert_eq!(got as f64, w, "relu {i} of {len}");
        }
        for (i, &v) in want.iter().enumerate() {
            assert_eq!(mask[i / 32] >> (i % 32) & 1 == 1, v > 0.0, "mask bit {i} of {len}");
        }
        if len % 32 != 0 {
            assert_eq!(mask[len / 32] >> (len % 32), 0, "bits past the end of {len} values");
        }
        let mut dx = dy.clone();
        relu_backward_in_place(&mask, &mut dx);
        let want: Vec<f64> = want.iter().zip(&dy).map(|(&v, &g)| if v > 0.0 { g as f64 } else { 0.0 }).collect();
        assert_close("relu backward", &dx, &want, 0.0);
    }
}

fn naive_ce(n: usize, k: usize, logits: &[f64], labels: &[usize]) -> f64 {
    (0..n)
        .map(|i| {
            let row = &logits[i * k..(i + 1) * k];
            let lse = row.iter().map(|v| v.exp()).sum::<f64>().ln();
            lse - row[labels[i]]
        })
        .sum::<f64>()
        / n as f64
}

#[test]
fn cross_entropy_matches_reference() {
    let mut r = rng(15);
    for _ in 0..20 {
        let (n, k) = (r.random_range(1..9), r.random_range(2..12));
        let logits: Vec<f32> = random_vec(&mut r, n * k).iter().map(|v| v * 8.0).collect();
        let labels: Vec<usize> = (0..n).map(|_| r.random_range(0..k)).collect();
        let mut g = vec![0.0; n * k];
        let out = softmax_cross_entropy(n, k, &logits, &labels, Some(&mut g));
        let ld = to_f64(&logits);
        let want = naive_ce(n, k, &ld, &labels);
        assert!((out.loss as f64 - want).abs() < 1e-5 * want.abs().max(1.0), "loss {} vs {want}", out.loss);
        let fd = finite_difference(|v| vec![naive_ce(n, k, v, &labels)], &ld, &[1.0]);
        assert_close("ce grad", &g, &fd, 1e-5);
        let correct = (0..n)
            .filter(|&i| {
                let row = &logits[i * k..(i + 1) * k];
                row.iter().enumerate().all(|(j, &v)| v <= row[labels[i]] || j == labels[i])
            })
            .count();
        assert_eq!(out.correct, correct);
    }
}

#[test]
fn cross_entropy_is_stable_for_huge_logits() {
    let logits = [1000.0f32, -1000.0, 0.0, 999.0];
    let out = softmax_cross_entropy(2, 2, &logits, &[1, 0], None);
    assert!(out.loss.is_finite());
    assert!((out.loss - (2000.0 + 999.0 + (1.0f64 + (-999.0f64).exp()).ln() as f32) / 2.0).abs() < 1e-2);
}
