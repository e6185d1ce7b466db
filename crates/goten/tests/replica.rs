//! The enclaves of servers 0 and 1 as two parties (`--goten-role`), each driving only its own
//! server (enclave 0 server 2's too): on random shapes of every op, online and offline, both end
//! with the exact product of the quantised operands; they quantise alike (a shared rounding
//! stream); each host is sent only its own server's values plus the other's masked partial
//! result; enclaves that part (different operands) stop with an error that says so.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::sync::Arc;
use std::thread;
use trustsplit_boundary::{ChannelOptions, InProcessChannel, Transcript};
use trustsplit_goten::ops::Op;
use trustsplit_goten::protocol::{Servers, Side};
use trustsplit_goten::quant::{product_scale, Quantised};
use trustsplit_goten::replica::Replica;
mod common;
use common::{ops, quantised};

/// Enclaves 0 and 1 linked in this process, each with a transcript that keeps its records.
fn enclaves() -> (Servers, Servers) {
    let (a, b) = InProcessChannel::pair(ChannelOptions::default());
    let one = thread::spawn(move || Replica::open(1, Box::new(b), "enclave 0"));
    let (r0, k0) = Replica::open(0, Box::new(a), "enclave 1").unwrap();
    let (r1, k1) = one.join().unwrap().unwrap();
    let t = || Arc::new(Transcript::keeping_records());
    (Servers::replicated(t(), r0, k0, Side::Local).unwrap(), Servers::replicated(t(), r1, k1, Side::Local).unwrap())
}

/// Runs `work` as enclave 0 and as enclave 1 at once (each blocks on the other).
fn both<T: Send + 'static>(
    e0: Servers,
    e1: Servers,
    work: impl Fn(&mut Servers) -> T + Send + Sync + Clone + 'static,
) -> ((Servers, T), (Servers, T)) {
    let w1 = work.clone();
    let one = thread::spawn(move || {
        let mut e1 = e1;
        let out = w1(&mut e1);
        (e1, out)
    });
    let mut e0 = e0;
    let out = work(&mut e0);
    ((e0, out), one.join().unwrap())
}

#[test]
fn two_enclaves_reconstruct_every_op_exactly_online_and_offline() {
    let mut rng = ChaCha8Rng::seed_from_u64(51);
    let schedule: Vec<Op> = (0..4).flat_map(|_| ops(&mut rng)).collect();
    let operands: Vec<(Quantised, Quantised)> =
        schedule.iter().map(|op| (quantised(&mut rng, op.a_len()), quantised(&mut rng, op.b_len()))).collect();
    let expected: Vec<Vec<f32>> = schedule
        .iter()
        .zip(&operands)
        .map(|(op, (a, b))| {
            let scale = product_scale(a.exp, b.exp);
            op.eval(&a.values, &b.values).iter().map(|&w| (w as i64 as f64 * scale) as f32).collect()
        })
        .collect();
    for offline in [false, true] {
        let (mut e0, mut e1) = enclaves();
        if offline {
            e0.go_offline();
            e1.go_offline();
        }
        let (s, o) = (schedule.clone(), operands.clone());
        let ((e0, r0), (e1, r1)) = both(e0, e1, move |e: &mut Servers| {
            let mut rounds = Vec::new();
            for _ in 0..2 {
                e.prepare().unwrap();
                let got: Vec<Vec<f32>> = s
                    .iter()
                    .zip(&o)
                    .enumerate()
                    .map(|(i, (op, (a, b)))| e.outsource(&format!("layers.{i}"), *op, a, b).unwrap())
                    .collect();
                rounds.push(got);
            }
            rounds
        });
        for rounds in [&r0, &r1] {
            for got in rounds {
                assert_eq!(got, &expected, "offline {offline}");
            }
        }
        if offline {
            // The second round's products were all made ahead of it, on both enclaves' books.
            for e in [&e0, &e1] {
                let off = e.offline.as_ref().unwrap();
                assert_eq!((off.precomputed, off.online), (schedule.len() as u64, schedule.len() as u64));
            }
        }
    }
}

#[test]
fn the_enclaves_quantise_alike_and_each_host_holds_only_its_own_server_s_values() {
    let (mut e0, mut e1) = enclaves();
    let x: Vec<f32> = {
        let mut rng = ChaCha8Rng::seed_from_u64(52);
        (0..500).map(|_| rng.random_range(-3.0f32..3.0)).collect()
    };
    // The same stream: the same stochastic rounding (which in one enclave would differ call by call).
    let (q0, q1) = (e0.quantise(&x, "x").unwrap(), e1.quantise(&x, "x").unwrap());
    assert_eq!(q0, q1);
    assert_ne!(e0.quantise(&x, "x").unwrap(), q0);
    e1.quantise(&x, "x").unwrap();

    e0.record_views();
    e1.record_views();
    let op = Op::LinearForward { n: 10, k: 50, m: 3 };
    let w = Quantised { values: (0..op.b_len()).map(|i| (i as i64 % 7 - 3) as u64).collect(), exp: -1 };
    let (t0, t1) = (e0.transcript().clone(), e1.transcript().clone());
    let (qa, qb) = (q0.clone(), w.clone());
    let ((e0, _), (e1, _)) = both(e0, e1, move |e: &mut Servers| e.outsource("fc", op, &qa, &qb).unwrap());
    let names = |e: &Servers, r: usize| e.view(r).iter().map(|(k, _)| k.clone()).collect::<Vec<_>>();
    assert_eq!(names(&e0, 0), ["A0", "B0", "E", "F", "CM0"]);
    assert_eq!(names(&e0, 2), ["U", "V", "CMZ"]);
    assert!(names(&e0, 1).is_empty());
    assert_eq!(names(&e1, 1), ["A1", "B1", "E", "F", "CM1"]);
    assert!(names(&e1, 0).is_empty() && names(&e1, 2).is_empty());
    // What each transcript says its host received: its own result, and the other's masked one.
    let kinds = |t: &Transcript| t.records().unwrap().into_iter().map(|r| r.info.kind).collect::<Vec<_>>();
    let (k0, k1) = (kinds(&t0), kinds(&t1));
    assert!(k0.iter().all(|k| k.starts_with("server 0: ") || k.starts_with("server 2: ")), "{k0:?}");
    assert!(k0.contains(&"server 0: C1 (from enclave 1)".to_string()), "{k0:?}");
    assert!(k1.iter().all(|k| k.starts_with("server 1: ")), "{k1:?}");
    assert!(k1.contains(&"server 1: C0 (from enclave 0)".to_string()), "{k1:?}");
    assert!(k1.contains(&"server 1: Z (from enclave 0)".to_string()), "{k1:?}");
    // Servers 0 and 1's shares of the operand add up to it (why the two must not collude).
    let (a0, a1) = (&e0.view(0)[0].1, &e1.view(1)[0].1);
    let sum: Vec<u64> =
        a0.iter().zip(a1).map(|(&x, &y)| trustsplit_goten::field::centre(x as i64 + y as i64) as u64).collect();
    assert_eq!(sum, q0.values);
}

#[test]
fn enclaves_that_part_stop_with_an_error_that_says_so() {
    let (e0, e1) = enclaves();
    let op = Op::LinearForward { n: 4, k: 6, m: 2 };
    let a = Quantised { values: vec![5; op.a_len()], exp: 0 };
    let b = Quantised { values: vec![(-2i64) as u64; op.b_len()], exp: 0 };
    let other = Quantised { values: vec![6; op.a_len()], exp: 0 };
    let one = thread::spawn(move || {
        let mut e1 = e1;
        e1.outsource("conv1", op, &other, &b.clone()).map(|_| ())
    });
    let mut e0 = e0;
    let b = Quantised { values: vec![(-2i64) as u64; op.b_len()], exp: 0 };
    let err0 = e0.outsource("conv1", op, &a, &b).unwrap_err();
    let err1 = one.join().unwrap().unwrap_err();
    for err in [err0, err1] {
        assert!(err.contains("conv1") && err.contains("diverged") && err.contains("--seed"), "{err}");
    }
}

#[test]
fn enclaves_with_other_settings_stop_at_the_first_op_where_their_streams_part() {
    // Enclave 0 in the offline mode, enclave 1 not: their second pass draws the masks apart.
    let (mut e0, e1) = enclaves();
    e0.go_offline();
    let op = Op::LinearForward { n: 3, k: 5, m: 2 };
    let a = Quantised { values: vec![7; op.a_len()], exp: 0 };
    let b = Quantised { values: vec![(-3i64) as u64; op.b_len()], exp: 1 };
    let ((_, r0), (_, r1)) = both(e0, e1, move |e: &mut Servers| {
        (0..2)
            .map(|_| {
                e.prepare()?;
                e.outsource("fc", op, &a, &b)
            })
            .collect::<Result<Vec<_>, String>>()
    });
    for err in [r0.unwrap_err(), r1.unwrap_err()] {
        assert!(err.contains("diverged"), "{err}");
    }
}
