//! The bilinear ops on shares against plaintext: every op on random shapes and values gives the
//! exact product of the quantised operands (and, dequantised, the layer's own f32 result within
//! the quantisation error); a result that wraps around the field is recomputed, one a device
//! corrupts is refused; each untrusted side sees only uniform values.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::sync::Arc;
use trustsplit_boundary::Transcript;
use trustsplit_goten::field::{self, HALF, P};
use trustsplit_goten::ops::Op;
use trustsplit_goten::protocol::Servers;
use trustsplit_goten::quant::{product_scale, Quantised};
mod common;
use common::{ops, quantised};

#[test]
fn every_op_on_shares_is_the_exact_product_of_the_quantised_operands() {
    let mut rng = ChaCha8Rng::seed_from_u64(41);
    let mut servers = Servers::new(Arc::new(Transcript::new())).unwrap();
    for _ in 0..12 {
        for op in ops(&mut rng) {
            let (a, b) = (quantised(&mut rng, op.a_len()), quantised(&mut rng, op.b_len()));
            let got = servers.outsource("t", op, &a, &b).unwrap();
            let exact = op.eval(&a.values, &b.values);
            let scale = product_scale(a.exp, b.exp);
            for (g, e) in got.iter().zip(&exact) {
                assert_eq!(*g, (*e as i64 as f64 * scale) as f32, "{op:?}");
            }
        }
    }
}

/// Naive f64 references of the six ops, on integer operands.
fn naive(op: Op, a: &[i64], b: &[i64]) -> Vec<i64> {
    match op {
        Op::LinearForward { n, k, m } => {
            (0..n * m).map(|i| (0..k).map(|t| a[i / m * k + t] * b[i % m * k + t]).sum()).collect()
        }
        Op::LinearInputGrad { n, k, m } => {
            (0..n * k).map(|i| (0..m).map(|t| a[i / k * m + t] * b[t * k + i % k]).sum()).collect()
        }
        Op::LinearWeightGrad { n, k, m } => {
            (0..m * k).map(|i| (0..n).map(|t| a[t * m + i / k] * b[t * k + i % k]).sum()).collect()
        }
        Op::ConvForward(s) | Op::ConvInputGrad(s) | Op::ConvWeightGrad(s) => {
            let (oh, ow) = (s.out_height(), s.out_width());
            let mut y = vec![0i64; s.output_len()];
            let mut dx = vec![0i64; s.input_len()];
            let mut dw = vec![0i64; s.weight_len()];
            // One pass over every (sample, out channel, out pixel, in channel, tap).
            for nn in 0..s.batch {
                for o in 0..s.out_channels {
                    for r in 0..oh {
                        for c in 0..ow {
                            for ci in 0..s.in_channels {
                                for kh in 0..s.kernel {
                                    for kw in 0..s.kernel {
                                        let (h, w) = (
                                            (r * s.stride + kh) as i64 - s.padding as i64,
                                            (c * s.stride + kw) as i64 - s.padding as i64,
                                        );
                                        if h < 0 || w < 0 || h >= s.height as i64 || w >= s.width as i64 {
                                            continue;
                                        }
                                        let xi =
                                            ((nn * s.in_channels + ci) * s.height + h as usize) * s.width + w as usize;
                                        let wi = ((o * s.in_channels + ci) * s.kernel + kh) * s.kernel + kw;
                                        let yi = ((nn * s.out_channels + o) * oh + r) * ow + c;
                                        match op {
                                            Op::ConvForward(_) => y[yi] += a[xi] * b[wi],
                                            Op::ConvInputGrad(_) => dx[xi] += a[yi] * b[wi],
                                            _ => dw[wi] += a[xi] * b[yi],
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
            }
            match op {
                Op::ConvForward(_) => y,
                Op::ConvInputGrad(_) => dx,
                _ => dw,
            }
        }
    }
}

#[test]
fn the_ops_compute_what_the_layers_mean() {
    let mut rng = ChaCha8Rng::seed_from_u64(42);
    for _ in 0..6 {
        for op in ops(&mut rng) {
            let (a, b) = (quantised(&mut rng, op.a_len()), quantised(&mut rng, op.b_len()));
            let (ai, bi): (Vec<i64>, Vec<i64>) =
                (a.values.iter().map(|&w| w as i64).collect(), b.values.iter().map(|&w| w as i64).collect());
            let exact: Vec<i64> = op.eval(&a.values, &b.values).iter().map(|&w| w as i64).collect();
            assert_eq!(exact, naive(op, &ai, &bi), "{op:?}");
        }
    }
}

#[test]
fn a_wrapped_result_is_recomputed_and_a_corrupt_one_refused() {
    // 200 products of 127 x 127: 3.2 million, past p/2 (about 1.05 million).
    let op = Op::LinearForward { n: 2, k: 200, m: 3 };
    assert!(!op.never_wraps());
    let mut servers = Servers::new(Arc::new(Transcript::new())).unwrap();
    let full = |n| Quantised { values: vec![127; n], exp: 0 };
    let got = servers.outsource("t", op, &full(op.a_len()), &full(op.b_len())).unwrap();
    assert!(got.iter().all(|&v| v == (200 * 127 * 127) as f32 * 2f32.powi(-12)), "{got:?}");
    assert_eq!(servers.recomputed, 1);

    // The check itself: an exact result passes; one entry off by p (a wrap) or by 1 (a corrupt
    // device) fails.
    let mut rng = ChaCha8Rng::seed_from_u64(43);
    for op in ops(&mut rng) {
        let (a, b) = (quantised(&mut rng, op.a_len()), quantised(&mut rng, op.b_len()));
        let c = op.eval(&a.values, &b.values);
        let s: Vec<u64> = (0..op.check_len()).map(|_| rng.random()).collect();
        assert!(op.check(&a.values, &b.values, &c, &s), "{op:?}");
        for delta in [P as u64, 1] {
            let mut bad = c.clone();
            let i = rng.random_range(0..bad.len());
            bad[i] = bad[i].wrapping_add(delta);
            assert!(!op.check(&a.values, &b.values, &bad, &s), "{op:?} missed {delta} at {i}");
        }
    }
}

#[test]
fn each_untrusted_side_sees_only_uniform_values() {
    // The same private operand twice: every value each server is sent looks uniform and differs
    // between the two runs; servers 0 and 1 together would rebuild it (why Goten needs all three
    // not to collude).
    let op = Op::LinearForward { n: 64, k: 64, m: 4 };
    let secret = Quantised { values: vec![field::centre(100) as u64; op.a_len()], exp: 0 };
    let w = Quantised { values: vec![3; op.b_len()], exp: 0 };
    let mut servers = Servers::new(Arc::new(Transcript::keeping_records())).unwrap();
    servers.record_views();
    servers.outsource("layers.0", op, &secret, &w).unwrap();
    servers.outsource("layers.0", op, &secret, &w).unwrap();
    let kinds: Vec<Vec<&str>> = (0..3).map(|r| servers.view(r).iter().map(|(k, _)| k.as_str()).collect()).collect();
    assert_eq!(kinds[0][..5], ["A0", "B0", "E", "F", "CM0"]);
    assert_eq!(kinds[1][..5], ["A1", "B1", "E", "F", "CM1"]);
    assert_eq!(kinds[2][..3], ["U", "V", "CMZ"]);
    for role in 0..3 {
        let view = servers.view(role);
        let half = view.len() / 2;
        for ((kind, first), (_, second)) in view[..half].iter().zip(&view[half..]) {
            assert_ne!(first, second, "server {role} saw the same {kind} twice");
            // Uniform over the field: mean near 0, spread near a uniform's (p / sqrt(12)).
            let n = first.len() as f64;
            let mean = first.iter().map(|&w| w as i64 as f64).sum::<f64>() / n;
            let sd = (first.iter().map(|&w| (w as i64 as f64).powi(2)).sum::<f64>() / n).sqrt();
            let uniform_sd = P as f64 / 12f64.sqrt();
            assert!(mean.abs() < 6.0 * uniform_sd / n.sqrt(), "server {role} {kind}: mean {mean}");
            assert!((sd / uniform_sd - 1.0).abs() < 0.2, "server {role} {kind}: sd {sd}");
            assert!(first.iter().all(|&w| (w as i64).abs() <= HALF));
        }
    }
    // Collusion of servers 0 and 1 reconstructs the operand.
    let (a0, a1) = (&servers.view(0)[0].1, &servers.view(1)[0].1);
    assert!(a0.iter().zip(a1).all(|(&x, &y)| field::centre(x as i64 + y as i64) == 100));
}

#[test]
fn offline_products_give_the_same_results_and_leave_server_2_idle_online() {
    let mut rng = ChaCha8Rng::seed_from_u64(44);
    let mut servers = Servers::new(Arc::new(Transcript::new())).unwrap();
    servers.go_offline();
    let schedule = ops(&mut rng);
    let operands: Vec<(Quantised, Quantised)> =
        schedule.iter().map(|op| (quantised(&mut rng, op.a_len()), quantised(&mut rng, op.b_len()))).collect();
    for round in 0..3 {
        servers.prepare().unwrap();
        servers.record_views();
        for (i, (op, (a, b))) in schedule.iter().zip(&operands).enumerate() {
            let got = servers.outsource(&format!("layers.{i}"), *op, a, b).unwrap();
            let scale = product_scale(a.exp, b.exp);
            let exact: Vec<f32> =
                op.eval(&a.values, &b.values).iter().map(|&w| (w as i64 as f64 * scale) as f32).collect();
            assert_eq!(got, exact, "round {round}, {op:?}");
        }
        // From the second round on, server 2 was sent nothing while the ops ran.
        assert_eq!(servers.view(2).is_empty(), round > 0, "round {round}");
    }
    let o = servers.offline.as_ref().unwrap();
    assert_eq!((o.precomputed, o.online), (12, 6));
    assert_eq!(o.stored_bytes, 0);
    assert_eq!(o.peak_stored_bytes, schedule.iter().map(|op| op.out_len() as u64 * 8).sum::<u64>());
}
