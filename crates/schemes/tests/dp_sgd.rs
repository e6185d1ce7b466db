//! `--dp full`: a DP-SGD step is the mean of the per-sample gradients, each clipped to the bound
//! over the whole model, plus Gaussian noise of std `z * clip / batch` on every coordinate (checked
//! against per-sample gradients from `Model::backward`, and the noise's spread measured); batch-norm
//! is refused; AsymML charges the update beside its residual releases and says what it covers.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::sync::Arc;
use trustsplit_boundary::{Secret, Transcript};
use trustsplit_nn::optim::{Optimizer, OptimizerKind};
use trustsplit_nn::tensor::from_vec;
use trustsplit_nn::{zoo, Mode, Model, Tensor};
use trustsplit_schemes::asymml::{self, AsymmlConfig, AsymmlOptions, DpScope};
use trustsplit_schemes::dp_sgd::DpSgd;
use trustsplit_schemes::{plaintext, RunnerInputs, TrainingRun};
mod common;

const INPUT: [usize; 3] = [1, 28, 28];

fn batch(rng: &mut ChaCha8Rng, n: usize) -> (Tensor, Vec<usize>) {
    let len = n * INPUT.iter().product::<usize>();
    let x = from_vec(&[n, 1, 28, 28], (0..len).map(|_| rng.random_range(-1.0f32..1.0)).collect());
    (x, (0..n).map(|_| rng.random_range(0..10)).collect())
}

/// Sample `i`'s gradient of every parameter, by the model's own forward and backward pass.
fn sample_gradient(model: &mut Model, x: &Tensor, y: &[usize], i: usize) -> Vec<f32> {
    let per = x.len() / x.shape()[0];
    let xi = from_vec(&[1, 1, 28, 28], x.as_slice().unwrap()[i * per..(i + 1) * per].to_vec());
    let (logits, saved) = model.forward(&xi, Mode::Train).unwrap();
    let mut dlogits = trustsplit_nn::tensor::zeros(logits.shape());
    let classes = logits.shape()[1];
    trustsplit_kernels::loss::softmax_cross_entropy(
        1,
        classes,
        logits.as_slice().unwrap(),
        &y[i..i + 1],
        Some(dlogits.as_slice_mut().unwrap()),
    );
    model.backward(&dlogits, saved).iter().flat_map(|g| g.iter().copied()).collect()
}

fn flat(model: &mut Model) -> Vec<f32> {
    model.params_mut().into_iter().flat_map(|p| p.iter().copied().collect::<Vec<_>>()).collect()
}

/// One DP-SGD step (plain SGD at lr 1) from a seeded LeNet-5: the weights' change, and the
/// per-sample clipped mean it should be without noise, and the samples clipped.
fn step(clip_quantile: f64, z: f64) -> (Vec<f32>, Vec<f64>, u64, u64, f64) {
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let n = 6;
    let (x, y) = batch(&mut rng, n);
    let mut reference = zoo::build("lenet5", &INPUT, 10, 9).unwrap();
    let grads: Vec<Vec<f32>> = (0..n).map(|i| sample_gradient(&mut reference, &x, &y, i)).collect();
    let norms: Vec<f64> = grads.iter().map(|g| g.iter().map(|&v| f64::from(v).powi(2)).sum::<f64>().sqrt()).collect();
    let mut sorted = norms.clone();
    sorted.sort_by(f64::total_cmp);
    let clip = sorted[((n - 1) as f64 * clip_quantile) as usize];
    let mut mean = vec![0f64; grads[0].len()];
    for (g, norm) in grads.iter().zip(&norms) {
        let scale = (clip / norm).min(1.0);
        mean.iter_mut().zip(g).for_each(|(m, &v)| *m += scale * f64::from(v) / n as f64);
    }
    let expected_clipped = norms.iter().filter(|&&v| v > clip).count() as u64;

    let mut model = zoo::build("lenet5", &INPUT, 10, 9).unwrap();
    let before = flat(&mut model);
    let mut runner = plaintext::runner(Arc::new(Transcript::new())).unwrap();
    runner.enable_dp_sgd(DpSgd::new(clip, z).unwrap());
    let mut opt = Optimizer::new(OptimizerKind::Sgd { momentum: 0.0, nesterov: false }, 0.0);
    runner.train_step(&mut model, Secret::new(x), &Secret::new(y), &mut opt, 1.0).unwrap();
    let change: Vec<f32> = before.iter().zip(flat(&mut model)).map(|(b, a)| b - a).collect();
    let dp = runner.dp_sgd().unwrap();
    assert_eq!(dp.samples, n as u64);
    (change, mean, dp.clipped, expected_clipped, clip)
}

#[test]
fn a_step_is_the_mean_of_the_per_sample_clipped_gradients() {
    // Noise far below the gradients' scale: the step is the clipped mean to within it.
    let (change, mean, clipped, expected_clipped, clip) = step(0.5, 1e-7);
    assert!(expected_clipped > 0 && expected_clipped < 6, "the bound {clip} should clip some samples only");
    assert_eq!(clipped, expected_clipped);
    let scale = mean.iter().fold(0f64, |m, v| m.max(v.abs()));
    for (i, (&c, &m)) in change.iter().zip(&mean).enumerate() {
        assert!((f64::from(c) - m).abs() <= 1e-4 * scale, "parameter {i}: step {c}, clipped mean {m}");
    }
    // Clipping bounds what one sample moves: the mean's norm is at most the bound.
    let norm = mean.iter().map(|v| v * v).sum::<f64>().sqrt();
    assert!(norm <= clip * (1.0 + 1e-9), "{norm} > {clip}");
}

#[test]
fn the_update_noise_has_std_z_clip_over_the_batch() {
    let z = 1.3;
    let (change, mean, _, _, clip) = step(0.2, z);
    let noise: Vec<f64> = change.iter().zip(&mean).map(|(&c, &m)| f64::from(c) - m).collect();
    let n = noise.len() as f64;
    let avg = noise.iter().sum::<f64>() / n;
    let sd = (noise.iter().map(|v| (v - avg).powi(2)).sum::<f64>() / n).sqrt();
    let want = z * clip / 6.0;
    // 61,706 draws: the sample std is within 2% of the true one with overwhelming probability.
    assert!((sd / want - 1.0).abs() < 0.02, "noise std {sd}, expected {want}");
    assert!(avg.abs() < 5.0 * want / n.sqrt(), "noise mean {avg}");
}

#[test]
fn batch_norm_is_refused_and_bad_settings_named() {
    let mut model = zoo::build("vgg11-bn", &[1, 32, 32], 10, 1).unwrap();
    let mut runner = plaintext::runner(Arc::new(Transcript::new())).unwrap();
    runner.enable_dp_sgd(DpSgd::new(1.0, 1.0).unwrap());
    let (x, y) = (from_vec(&[2, 1, 32, 32], vec![0.5; 2048]), vec![1, 2]);
    let mut opt = Optimizer::new(OptimizerKind::Sgd { momentum: 0.0, nesterov: false }, 0.0);
    let err = runner.train_step(&mut model, Secret::new(x), &Secret::new(y), &mut opt, 0.1).unwrap_err().to_string();
    assert!(err.contains("--dp full") && err.contains("batch-norm"), "{err}");
    assert!(DpSgd::new(0.0, 1.0).unwrap_err().contains("--dp-clip"));
    assert!(DpSgd::new(1.0, 0.0).unwrap_err().contains("--noise-multiplier"));
    let options = AsymmlOptions { dp: DpScope::Full, noise_multiplier: 0.0, ..AsymmlOptions::default() };
    assert!(options.check().unwrap_err().contains("--dp full needs noise"));
    let options = AsymmlOptions { dp: DpScope::Full, protect_gradients: false, ..AsymmlOptions::default() };
    assert!(options.check().unwrap_err().contains("--protect-gradients off"));
}

#[test]
fn asymml_charges_the_update_beside_its_releases_and_trains_with_it() {
    let model = zoo::build("lenet5", &INPUT, 10, 2).unwrap();
    let residuals = AsymmlConfig { noise_multiplier: 1.0, ..AsymmlConfig::default() };
    let full = AsymmlConfig { dp_sgd_clip: Some(1.0), ..residuals.clone() };
    let (r, f) = (asymml::releases_per_step(&model, &residuals, 32), asymml::releases_per_step(&model, &full, 32));
    assert!(r > 0 && f == r + 1, "{r} and {f}");
    // A basis per batch couples a batch's samples, but not under --dp full, where each runs alone.
    let batch_basis = AsymmlConfig { basis: asymml::BasisScope::Batch, ..full.clone() };
    assert_eq!(asymml::releases_per_step(&model, &batch_basis, 32), f);

    let options = AsymmlOptions { dp: DpScope::Full, noise_multiplier: 1.5, ..AsymmlOptions::default() };
    let mut model = zoo::build("lenet5", &INPUT, 10, 2).unwrap();
    let transcript = Arc::new(Transcript::new());
    let inputs = RunnerInputs {
        devices: vec![common::cpu_device()],
        memory_budget: 96 << 20,
        transcript: transcript.clone(),
        training: Some(TrainingRun { model: &model.clone(), batch_size: 4, epochs: 1 }),
    };
    let mut runner = asymml::build(inputs, &options).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let (x, y) = batch(&mut rng, 4);
    let mut opt = Optimizer::new(OptimizerKind::Sgd { momentum: 0.9, nesterov: false }, 0.0);
    let before = flat(&mut model);
    runner.train_step(&mut model, Secret::new(x), &Secret::new(y), &mut opt, 0.05).unwrap();
    assert_eq!(runner.dp_sgd().unwrap().samples, 4);
    assert_ne!(before, flat(&mut model));
    let report = runner.report();
    let ledger = report.placement.privacy.as_ref().unwrap();
    assert_eq!(ledger.dp_sgd_clip, Some(1.0));
    let mut charges = asymml::PrivacyCharges::default();
    charges.charge_epoch(1.5, f);
    let summary = asymml::privacy_summary(ledger, &charges);
    assert!(summary.covers.starts_with("the device's whole view"), "{}", summary.covers);
    assert!(summary.epsilon.unwrap().is_finite());
}
