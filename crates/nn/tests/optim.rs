//! Optimizer updates against hand-computed PyTorch formulas; schedules; checkpoints.

use trustsplit_nn::optim::{clip_grad_norm, Optimizer, OptimizerKind, Schedule};
use trustsplit_nn::tensor::{data_mut, from_vec};
use trustsplit_nn::{checkpoint, zoo, Mode};

#[test]
fn sgd_momentum_weight_decay_matches_formula() {
    let mut p = from_vec(&[2], vec![1.0, -2.0]);
    let mut opt = Optimizer::new(OptimizerKind::Sgd { momentum: 0.9, nesterov: false }, 0.1);
    let g1 = from_vec(&[2], vec![0.5, 0.25]);
    let g2 = from_vec(&[2], vec![-1.0, 2.0]);
    opt.step(vec![&mut p], std::slice::from_ref(&g1), 0.1).unwrap();
    // buf = g + wd*p = [0.6, 0.05]; p -= 0.1*buf
    let (b1, p1) = ([0.6f32, 0.05], [1.0f32 - 0.06, -2.0 - 0.005]);
    assert!((p[0] - p1[0]).abs() < 1e-6 && (p[1] - p1[1]).abs() < 1e-6);
    opt.step(vec![&mut p], std::slice::from_ref(&g2), 0.1).unwrap();
    let d = [-1.0 + 0.1 * p1[0], 2.0 + 0.1 * p1[1]];
    let b2 = [0.9 * b1[0] + d[0], 0.9 * b1[1] + d[1]];
    assert!((p[0] - (p1[0] - 0.1 * b2[0])).abs() < 1e-6);
    assert!((p[1] - (p1[1] - 0.1 * b2[1])).abs() < 1e-6);
}

#[test]
fn gradient_clipping_scales_to_the_global_norm() {
    // Three tensors of different sizes with values of either sign; the global norm in f64.
    let values = |n: usize, k: f32| (0..n).map(|i| ((i as f32 * 0.618 + k).fract() - 0.4) * 3.0).collect::<Vec<_>>();
    let grads =
        vec![from_vec(&[3, 5], values(15, 0.1)), from_vec(&[7], values(7, 0.5)), from_vec(&[2, 2], values(4, 0.9))];
    let norm = grads.iter().flat_map(|g| g.iter()).map(|&v| f64::from(v) * f64::from(v)).sum::<f64>().sqrt();
    // Above the bound: one factor for every value, the result on the bound (PyTorch's 1e-6).
    let mut clipped = grads.clone();
    assert!((clip_grad_norm(&mut clipped, 0.5 * norm) - norm).abs() <= 1e-12 * norm);
    let factor = (0.5 * norm / (norm + 1e-6)) as f32;
    for (c, g) in clipped.iter().zip(&grads) {
        assert!(c.iter().zip(g.iter()).all(|(&c, &g)| c == g * factor));
    }
    let after = clipped.iter().flat_map(|g| g.iter()).map(|&v| f64::from(v) * f64::from(v)).sum::<f64>().sqrt();
    assert!((after - 0.5 * norm).abs() <= 1e-5 * norm, "{after} vs {}", 0.5 * norm);
    // Within the bound, or not finite: untouched.
    let mut same = grads.clone();
    clip_grad_norm(&mut same, 2.0 * norm);
    assert_eq!(same, grads);
    let mut broken = grads.clone();
    data_mut(&mut broken[1])[3] = f32::INFINITY;
    let before = broken.clone();
    assert!(clip_grad_norm(&mut broken, 1e-3).is_infinite());
    assert_eq!(broken, before);
    // Through the optimizer: only where a bound is set.
    let opt = Optimizer::new(OptimizerKind::Sgd { momentum: 0.9, nesterov: false }, 0.0);
    let mut untouched = grads.clone();
    assert_eq!(opt.clip_gradients(&mut untouched), None);
    assert_eq!(untouched, grads);
    let opt = opt.with_max_grad_norm(Some((0.5 * norm) as f32));
    let mut through = grads.clone();
    assert!(opt.clip_gradients(&mut through).is_some());
    let after = through.iter().flat_map(|g| g.iter()).map(|&v| f64::from(v) * f64::from(v)).sum::<f64>().sqrt();
    assert!((after - 0.5 * norm).abs() <= 1e-5 * norm);
}

#[test]
fn adam_matches_formula() {
    let mut p = from_vec(&[1], vec![0.5]);
    let mut opt = Optimizer::new(OptimizerKind::Adam { beta1: 0.9, beta2: 0.999, eps: 1e-8 }, 0.0);
    let (mut m, mut v, mut w) = (0.0f64, 0.0f64, 0.5f64);
    for (t, g) in [0.3f64, -0.7, 0.2].iter().enumerate() {
        opt.step(vec![&mut p], &[from_vec(&[1], vec![*g as f32])], 0.01).unwrap();
        m = 0.9 * m + 0.1 * g;
        v = 0.999 * v + 0.001 * g * g;
        let (mh, vh) = (m / (1.0 - 0.9f64.powi(t as i32 + 1)), v / (1.0 - 0.999f64.powi(t as i32 + 1)));
        w -= 0.01 * mh / (vh.sqrt() + 1e-8);
        assert!((p[0] as f64 - w).abs() < 1e-6, "step {t}: {} vs {w}", p[0]);
    }
}

#[test]
fn schedules() {
    assert_eq!(Schedule::Constant.lr(0.1, 7.5), 0.1);
    let s = Schedule::Step { every: 2, gamma: 0.5 };
    assert_eq!(s.lr(0.1, 1.9), 0.1);
    assert!((s.lr(0.1, 2.0) - 0.05).abs() < 1e-9);
    assert!((s.lr(0.1, 5.0) - 0.025).abs() < 1e-9);
    let c = Schedule::Cosine { epochs: 4 };
    assert!((c.lr(0.2, 0.0) - 0.2).abs() < 1e-7);
    assert!((c.lr(0.2, 2.0) - 0.1).abs() < 1e-7);
    assert!(c.lr(0.2, 4.0).abs() < 1e-7);
}

fn temp_dir(tag: &str) -> std::path::PathBuf {
    let d = std::env::temp_dir().join(format!("trustsplit-nn-{tag}-{}", std::process::id()));
    std::fs::create_dir_all(&d).unwrap();
    d
}

#[test]
fn checkpoint_round_trip_restores_everything() {
    let mut m = zoo::build("vgg11-bn", &[3, 32, 32], 10, 3).unwrap();
    let x = from_vec(&[2, 3, 32, 32], (0..6144).map(|i| (i % 17) as f32 / 8.0 - 1.0).collect());
    let (y, saved) = m.forward(&x, Mode::Train).unwrap();
    let grads = m.backward(&y, saved);
    let mut opt = Optimizer::new(OptimizerKind::Sgd { momentum: 0.9, nesterov: false }, 5e-4);
    opt.step(m.params_mut(), &grads, 0.01).unwrap();
    let dir = temp_dir("ckpt");
    let path = dir.join("c.safetensors");
    let meta = checkpoint::meta(&m, 3, opt.steps, 42, serde_json::json!({"lr": 0.01}));
    checkpoint::save(&path, &m, &opt, &meta).unwrap();
    assert!(!dir.join("c.safetensors.tmp").exists(), "temporary file left behind");

    let c = checkpoint::load(&path).unwrap();
    assert_eq!(c.meta, meta);
    let mut fresh = zoo::build("vgg11-bn", &[3, 32, 32], 10, 99).unwrap();
    let mut opt2 = Optimizer::new(opt.kind, 5e-4);
    c.restore_model(&mut fresh).unwrap();
    c.restore_optimizer(&mut opt2, &fresh).unwrap();
    for ((a, x), (_, y)) in m.named_params().iter().zip(fresh.named_params()) {
        assert_eq!(*x, y, "{a}");
    }
    for ((a, x), (_, y)) in m.named_buffers().iter().zip(fresh.named_buffers()) {
        assert_eq!(*x, y, "{a}");
    }
    assert_eq!(opt2.steps, 1);
    assert_eq!(opt2.state.len(), 1);
    assert_eq!(opt2.state[0], opt.state[0]);

    let mut other = zoo::build("vgg13-bn", &[3, 32, 32], 10, 0).unwrap();
    let err = c.restore_model(&mut other).unwrap_err().to_string();
    assert!(err.contains("vgg11-bn"), "{err}");
}

#[test]
fn corrupt_checkpoints_give_clear_errors() {
    let dir = temp_dir("corrupt");
    let path = dir.join("bad.safetensors");
    std::fs::write(&path, b"not a checkpoint").unwrap();
    let err = checkpoint::load(&path).err().unwrap().to_string();
    assert!(err.contains("bad.safetensors") && err.contains("not a safetensors file"), "{err}");
    let err = checkpoint::load(&dir.join("missing.safetensors")).err().unwrap().to_string();
    assert!(err.contains("missing.safetensors"), "{err}");
    // A real checkpoint cut short.
    let m = zoo::build("lenet5", &[1, 28, 28], 10, 0).unwrap();
    let opt = Optimizer::new(OptimizerKind::Sgd { momentum: 0.9, nesterov: false }, 0.0);
    let good = dir.join("good.safetensors");
    checkpoint::save(&good, &m, &opt, &checkpoint::meta(&m, 0, 0, 0, serde_json::Value::Null)).unwrap();
    let bytes = std::fs::read(&good).unwrap();
    std::fs::write(&path, &bytes[..bytes.len() - 100]).unwrap();
    assert!(checkpoint::load(&path).is_err());
}

#[test]
fn a_non_finite_gradient_is_refused_with_its_parameter_named() {
    // Both kinds, the bad value first, last or inside a vector of a larger parameter.
    let kinds = [
        OptimizerKind::Sgd { momentum: 0.9, nesterov: false },
        OptimizerKind::Sgd { momentum: 0.9, nesterov: true },
        OptimizerKind::Adam { beta1: 0.9, beta2: 0.999, eps: 1e-8 },
    ];
    for kind in kinds {
        for (at, bad) in [(0, f32::NAN), (99, f32::INFINITY), (37, f32::NEG_INFINITY)] {
            let mut opt = Optimizer::new(kind, 1e-4);
            let (mut a, mut b) = (from_vec(&[3], vec![0.5; 3]), from_vec(&[100], vec![0.25; 100]));
            let mut g = vec![0.01f32; 100];
            g[at] = bad;
            let grads = [from_vec(&[3], vec![0.1; 3]), from_vec(&[100], g)];
            // One good step first, so that there is optimizer state to leave alone.
            let fine = [from_vec(&[3], vec![0.1; 3]), from_vec(&[100], vec![0.01; 100])];
            assert_eq!(opt.step(vec![&mut a, &mut b], &fine, 0.1), Ok(()));
            let before = (a.clone(), b.clone(), opt.state.clone(), opt.steps);
            assert_eq!(opt.step(vec![&mut a, &mut b], &grads, 0.1), Err(1), "{kind:?} at {at}");
            // Refused before anything changed, the earlier parameter included.
            assert_eq!((a.clone(), b.clone(), opt.state.clone(), opt.steps), before, "{kind:?} at {at}");
            assert_eq!(opt.step(vec![&mut a, &mut b], &fine, 0.1), Ok(()));
            assert_ne!(a, before.0, "{kind:?}: the good step after the refusal updates");
        }
    }
}

#[test]
fn gradients_known_finite_are_not_checked_again_and_the_others_are() {
    let kind = OptimizerKind::Sgd { momentum: 0.9, nesterov: false };
    let mut opt = Optimizer::new(kind, 0.0);
    let (mut a, mut b) = (from_vec(&[3], vec![0.5; 3]), from_vec(&[4], vec![0.25; 4]));
    let grads = [from_vec(&[3], vec![0.1, f32::NAN, 0.1]), from_vec(&[4], vec![f32::INFINITY; 4])];
    // The second is unchecked: refused, and nothing changes.
    assert_eq!(opt.step_known_finite(vec![&mut a, &mut b], &grads, &[true, false], 0.1), Err(1));
    assert_eq!((data_mut(&mut a)[0], opt.steps), (0.5, 0));
    // Both vouched for: the flags are trusted (the caller's checks stand in for this one).
    assert_eq!(opt.step_known_finite(vec![&mut a, &mut b], &grads, &[true, true], 0.1), Ok(()));
    assert!(data_mut(&mut a)[1].is_nan() && opt.steps == 1);
    // No flags: every gradient is checked, as by `step`.
    assert_eq!(opt.step_known_finite(vec![&mut a, &mut b], &grads, &[], 0.1), Err(0));
}

#[test]
fn conv_weight_flags_follow_the_parameter_order() {
    for name in ["vgg11-bn", "resnet18", "lenet5"] {
        let mut model = zoo::build(name, &[3, 32, 32], 10, 1).unwrap();
        let flags = model.conv_weight_flags();
        let named: Vec<String> = model.named_params().into_iter().map(|(n, _)| n).collect();
        let params = model.params_mut();
        assert_eq!(flags.len(), params.len(), "{name}");
        for ((flag, p), n) in flags.iter().zip(params).zip(&named) {
            // Convolution weights are the only 4-D parameters.
            assert_eq!(*flag, p.ndim() == 4, "{name}: {n}");
        }
        assert!(flags.iter().any(|f| *f) && flags.iter().any(|f| !*f), "{name}");
    }
}
