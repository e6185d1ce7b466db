//! End-to-end training on the embedded data: accuracy, resume, evaluation, bad settings.

use std::path::PathBuf;
use trustsplit::train::{train, Scheme, TrainConfig};
use trustsplit_nn::checkpoint;
use trustsplit_nn::optim::Schedule;
use trustsplit_schemes::asymml::PrivacyCharges;

fn out_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("trustsplit-cli-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

#[test]
fn lenet_on_embedded_data_beats_80_percent() {
    let cfg = TrainConfig::new("lenet5", "embedded");
    let out = out_dir("lenet");
    let s = train(&cfg, &out, false, false).unwrap();
    assert!(s.accuracy > 0.80, "test accuracy {:.3} is not above 80%", s.accuracy);
    assert_eq!(s.test_samples, 1000);
    assert_eq!(s.train_samples, 5000);
    // Metrics: one JSON line per logging step and per epoch.
    let metrics = std::fs::read_to_string(&s.metrics).unwrap();
    let epochs: Vec<serde_json::Value> = metrics
        .lines()
        .map(|l| serde_json::from_str::<serde_json::Value>(l).unwrap())
        .filter(|v| v["kind"] == "epoch")
        .collect();
    assert_eq!(epochs.len(), 5);
    assert_eq!(epochs[4]["test_accuracy"].as_f64().unwrap(), s.accuracy);
    // Evaluating the checkpoint reproduces the final accuracy.
    let r = trustsplit::eval::eval(
        &s.checkpoint,
        "embedded",
        None,
        Scheme::named("plaintext").unwrap(),
        "cpu",
        &Default::default(),
        100,
        1,
        &Default::default(),
        false,
    )
    .unwrap();
    assert_eq!(r.accuracy, s.accuracy);
}

fn small(model: &str, epochs: usize) -> TrainConfig {
    let mut cfg = TrainConfig::new(model, "embedded");
    cfg.epochs = epochs;
    cfg.schedule = trustsplit_nn::optim::Schedule::Cosine { epochs: 3 };
    cfg.train_limit = 600;
    cfg.test_limit = 200;
    cfg.log_every = 5;
    cfg
}

#[test]
fn resume_gives_the_same_result_as_an_uninterrupted_run() {
    let whole = out_dir("whole");
    let a = train(&small("lenet5", 3), &whole, false, false).unwrap();

    let parts = out_dir("parts");
    train(&small("lenet5", 1), &parts, false, false).unwrap();
    let b = train(&small("lenet5", 3), &parts, true, false).unwrap();
    assert_eq!(b.resumed_from_epoch, 1);
    assert_eq!(a.accuracy, b.accuracy);
    assert_eq!(a.loss, b.loss);
    assert_eq!(a.steps, b.steps);
    // Identical weights, bit for bit.
    let (ca, cb) = (checkpoint::load(&a.checkpoint).unwrap(), checkpoint::load(&b.checkpoint).unwrap());
    let mut ma = trustsplit_nn::zoo::build("lenet5", &[1, 28, 28], 10, 9).unwrap();
    let mut mb = ma.clone();
    ca.restore_model(&mut ma).unwrap();
    cb.restore_model(&mut mb).unwrap();
    for ((n, x), (_, y)) in ma.named_params().iter().zip(mb.named_params()) {
        assert_eq!(*x, y, "{n}");
    }
    // The resumed metrics file continues the first one.
    let lines = std::fs::read_to_string(&b.metrics).unwrap();
    let epochs = lines.lines().filter(|l| l.contains("\"kind\":\"epoch\"")).count();
    assert_eq!(epochs, 3);
}

#[test]
fn resume_refuses_different_settings_and_missing_checkpoints() {
    let out = out_dir("mismatch");
    train(&small("lenet5", 1), &out, false, false).unwrap();
    let mut other = small("lenet5", 2);
    other.seed = 7;
    let err = format!("{:#}", train(&other, &out, true, false).unwrap_err());
    assert!(err.contains("different settings"), "{err}");
    let err = format!("{:#}", train(&small("lenet5", 2), &out_dir("empty"), true, false).unwrap_err());
    assert!(err.contains("cannot resume") && err.contains("checkpoint.safetensors"), "{err}");
    let err = format!("{:#}", train(&small("lenet5", 1), &out, true, false).unwrap_err());
    assert!(err.contains("already holds 1 epochs"), "{err}");
}

#[test]
fn vgg_trains_on_padded_fashion_mnist_inputs() {
    let mut cfg = small("vgg11-bn", 1);
    cfg.train_limit = 64;
    cfg.test_limit = 32;
    cfg.threads = 2;
    let s = train(&cfg, &out_dir("vgg"), false, false).unwrap();
    assert!(s.loss.is_finite());
    let c = checkpoint::load(&s.checkpoint).unwrap();
    assert_eq!(c.meta.input_shape, vec![1, 32, 32]);
}

#[test]
fn bad_settings_are_reported() {
    let mut cfg = small("lenet5", 1);
    cfg.model = "lenet6".into();
    let err = format!("{:#}", train(&cfg, &out_dir("bad1"), false, false).unwrap_err());
    assert!(err.contains("unknown model 'lenet6'"), "{err}");
    let mut cfg = small("lenet5", 1);
    cfg.dataset = "imagenet".into();
    let err = format!("{:#}", train(&cfg, &out_dir("bad2"), false, false).unwrap_err());
    assert!(err.contains("imagenet"), "{err}");
    let mut cfg = small("lenet5", 1);
    cfg.dataset = "cifar10".into();
    let err = format!("{:#}", train(&cfg, &out_dir("bad3"), false, false).unwrap_err());
    assert!(err.to_lowercase().contains("data"), "{err}");
    let mut cfg = small("lenet5", 1);
    cfg.lr = 1e6;
    let err = format!("{:#}", train(&cfg, &out_dir("bad4"), false, false).unwrap_err());
    assert!(err.contains("diverged"), "{err}");
    for bad in [0.0, -1.0, f32::NAN] {
        let mut cfg = small("lenet5", 1);
        cfg.max_grad_norm = Some(bad);
        let err = format!("{:#}", train(&cfg, &out_dir("bad5"), false, false).unwrap_err());
        assert!(err.contains("--max-grad-norm must be a positive number"), "{err}");
    }
}

#[test]
fn gradient_clipping_changes_training_and_is_part_of_the_settings() {
    // A bound far below LeNet-5's gradient norms changes the weights; without one the recorded
    // settings have no such key (so checkpoints from before the option still resume).
    let plain = train(&small("lenet5", 1), &out_dir("clip0"), false, false).unwrap();
    let mut cfg = small("lenet5", 1);
    cfg.max_grad_norm = Some(0.01);
    let out = out_dir("clip1");
    let clipped = train(&cfg, &out, false, false).unwrap();
    assert_ne!(plain.loss, clipped.loss);
    let meta = checkpoint::load(&clipped.checkpoint).unwrap().meta;
    assert_eq!(meta.config["max_grad_norm"], serde_json::json!(0.01f32));
    let meta = checkpoint::load(&plain.checkpoint).unwrap().meta;
    assert!(meta.config.get("max_grad_norm").is_none(), "{}", meta.config);
    // Resuming under another bound is refused.
    let mut other = small("lenet5", 2);
    other.max_grad_norm = Some(0.02);
    let err = format!("{:#}", train(&other, &out, true, false).unwrap_err());
    assert!(err.contains("different settings"), "{err}");
}

#[test]
fn asymml_without_noise_trains_like_plaintext() {
    // Same seed, same data order: without noise the split computes the same function, so the two
    // runs differ only by floating-point reordering.
    let plain = train(&small("lenet5", 2), &out_dir("asym-plain"), false, false).unwrap();
    let mut cfg = small("lenet5", 2);
    cfg.scheme = asymml();
    cfg.options.asymml.noise_multiplier = 0.0;
    let asym = train(&cfg, &out_dir("asym-clean"), false, false).unwrap();
    assert!(plain.accuracy > 0.6, "plaintext reached only {}", plain.accuracy);
    assert!((asym.accuracy - plain.accuracy).abs() <= 0.01, "asymml {} vs plaintext {}", asym.accuracy, plain.accuracy);
    assert!((asym.train_loss - plain.train_loss).abs() <= 1e-3 * plain.train_loss.max(1.0));
    let p = asym.privacy.unwrap();
    assert!(p.epsilon.is_none(), "no noise must mean no finite epsilon: {p:?}");
    assert!(asym.bytes_released > 0);
    // Every device result was checked (the default), and the summary says so.
    let checks = asym.scheme_report.placement.device_checks.expect("verified by default");
    assert!(checks.checks > 0 && checks.worst_ratio < 0.5, "{checks:?}");
    let line = trustsplit_schemes::asymml::summary::describe_device_checks(Some(checks));
    assert!(line.starts_with("device results: verified ("), "{line}");
}

#[test]
fn asymml_verification_can_be_turned_off_and_a_run_resumes_across_the_switch() {
    let mut cfg = small("lenet5", 1);
    cfg.scheme = asymml();
    let out = out_dir("asym-verify");
    let first = train(&cfg, &out, false, false).unwrap();
    assert!(first.scheme_report.placement.device_checks.is_some());
    cfg.epochs = 2;
    cfg.options.asymml.verify_device = false;
    let resumed = train(&cfg, &out, true, false).unwrap();
    assert_eq!(resumed.resumed_from_epoch, 1);
    assert!(resumed.scheme_report.placement.device_checks.is_none());
    let line = trustsplit_schemes::asymml::summary::describe_device_checks(None);
    assert!(line.contains("NOT verified (--verify-device off)"), "{line}");
}

#[test]
fn asymml_epsilon_target_calibrates_the_noise() {
    let mut cfg = small("lenet5", 2);
    cfg.scheme = asymml();
    cfg.options.asymml.epsilon = Some(8.0);
    let s = train(&cfg, &out_dir("asym-eps"), false, false).unwrap();
    let p = s.privacy.unwrap();
    let eps = p.epsilon.unwrap();
    // Calibrated on the releases the run makes (counted from the model's shapes): it spends the
    // target, not more and hardly less.
    assert!(eps <= 8.0 + 1e-9 && eps > 7.99, "spent epsilon {eps}");
    assert!(p.noise_multiplier > 0.0 && p.releases_per_sample > 0, "{p:?}");
    assert!(p.covers.contains("does NOT cover the weights"), "{}", p.covers);
    assert!(s.accuracy.is_finite());
    // The test split, evaluated once per epoch, is accounted apart: LeNet-5's first layer keeps
    // its one-channel input, the second releases one residual per evaluation.
    let e = &p.evaluation;
    assert_eq!((e.evaluations, e.releases_per_evaluation), (2, 1), "{e:?}");
    assert!(e.epsilon.is_some_and(|v| v > 0.0 && v < eps), "{e:?}");
    // `eval` accounts its own single evaluation of the checkpoint.
    let mut options = cfg.options.clone();
    options.asymml.epsilon = None;
    options.asymml.noise_multiplier = p.noise_multiplier;
    let r = trustsplit::eval::eval(
        &s.checkpoint,
        "embedded",
        None,
        asymml(),
        "cpu",
        &Default::default(),
        100,
        1,
        &options,
        false,
    )
    .unwrap();
    let once = r.privacy.unwrap();
    assert_eq!((once.evaluations, once.releases_per_evaluation), (1, 1), "{once:?}");
    assert!(once.epsilon.is_some_and(|v| v < e.epsilon.unwrap()), "{once:?} vs {e:?}");
    assert!(once.describe().contains("per example over 1 evaluation ("), "{}", once.describe());
    // A nonsensical target is refused before training.
    cfg.options.asymml.epsilon = Some(-1.0);
    let err = train(&cfg, &out_dir("asym-eps-bad"), false, false).unwrap_err();
    assert!(format!("{err:#}").contains("--epsilon"), "{err:#}");
}

#[test]
fn asymml_dp_full_covers_the_weights_at_the_calibrated_epsilon() {
    let mut cfg = small("lenet5", 2);
    cfg.scheme = asymml();
    cfg.options.asymml.epsilon = Some(8.0);
    let residuals_only = train(&cfg, &out_dir("asym-dp-res"), false, false).unwrap().privacy.unwrap();
    cfg.options.asymml.dp = trustsplit_schemes::asymml::DpScope::Full;
    let s = train(&cfg, &out_dir("asym-dp-full"), false, false).unwrap();
    let p = s.privacy.unwrap();
    let eps = p.epsilon.unwrap();
    assert!(eps <= 8.0 + 1e-9 && eps > 7.99, "spent epsilon {eps}");
    assert!(p.covers.starts_with("the device's whole view"), "{}", p.covers);
    assert!(!p.covers.contains("does NOT cover"), "{}", p.covers);
    // One more Gaussian release per sample and epoch (its clipped gradient in the noised update),
    // so more noise for the same epsilon.
    assert_eq!(p.releases_per_sample, residuals_only.releases_per_sample + 2, "{p:?} / {residuals_only:?}");
    assert!(p.noise_multiplier > residuals_only.noise_multiplier);
    assert!(s.accuracy.is_finite() && s.accuracy > 0.15, "{}", s.accuracy);
}

#[test]
fn asymml_charges_an_epoch_replayed_after_resume() {
    // Every epoch started is charged before its first release, in privacy.json: an epoch cut
    // short and replayed after --resume released its samples twice and is charged twice, so the
    // run ends with the conservative bound of 4 participations where an uninterrupted one has 3.
    let mut cfg = small("lenet5", 3);
    cfg.scheme = asymml();
    let whole = train(&cfg, &out_dir("charge-whole"), false, false).unwrap();
    let p = whole.privacy.unwrap();
    let ledger = whole.scheme_report.placement.privacy.unwrap();
    assert_eq!((p.participations, p.evaluation.evaluations), (3, 3), "{p:?}");
    assert_eq!(p.releases_per_sample, 3 * ledger.releases_per_step);
    assert_eq!(p.epsilon, ledger.spent(3).map(|s| s.epsilon));

    // One epoch, then a second one aborted midway: its learning rate grown 1e30-fold (the schedule
    // may change across --resume), its second step diverges after the first released its batch.
    let out = out_dir("charge-replayed");
    let charges_file = out.join("privacy.json");
    train(&TrainConfig { epochs: 1, ..cfg.clone() }, &out, false, false).unwrap();
    let failing = TrainConfig { schedule: Schedule::Step { every: 1, gamma: 1e30 }, ..cfg.clone() };
    let err = format!("{:#}", train(&failing, &out, true, false).unwrap_err());
    assert!(err.contains("diverged") && err.contains("epoch 2 "), "{err}");
    // The aborted epoch was charged, and the charge outlived the run that never reached its checkpoint.
    let charged = std::fs::read_to_string(&charges_file).unwrap();
    let charges: PrivacyCharges = serde_json::from_str(&charged).unwrap();
    assert_eq!((charges.participations, charges.evaluations), (2, 1), "{charged}");

    // Resuming without the charges, or with charges older than the checkpoint, would undercount:
    // refused.
    std::fs::remove_file(&charges_file).unwrap();
    let err = format!("{:#}", train(&cfg, &out, true, false).unwrap_err());
    assert!(err.contains("cannot resume") && err.contains("privacy.json"), "{err}");
    std::fs::write(&charges_file, serde_json::to_string(&PrivacyCharges::default()).unwrap()).unwrap();
    let err = format!("{:#}", train(&cfg, &out, true, false).unwrap_err());
    assert!(err.contains("older than the checkpoint"), "{err}");

    // With them, the run replays epoch 2 and charges it again.
    std::fs::write(&charges_file, charged).unwrap();
    let resumed = train(&cfg, &out, true, false).unwrap();
    assert_eq!(resumed.resumed_from_epoch, 1);
    let q = resumed.privacy.unwrap();
    assert_eq!((q.participations, q.evaluation.evaluations), (4, 3), "{q:?}");
    assert_eq!(q.releases_per_sample, 4 * ledger.releases_per_step);
    assert_eq!(q.epsilon, ledger.spent(4).map(|s| s.epsilon));
    assert!(q.epsilon.unwrap() > p.epsilon.unwrap(), "{q:?} vs {p:?}");
    assert_eq!(q.evaluation.epsilon, p.evaluation.epsilon, "the aborted epoch never reached its evaluation");
    let line = trustsplit_schemes::asymml::describe_run(&resumed.scheme_report, Some(&q)).remove(0);
    assert!(line.contains("over 4 participations charged"), "{line}");
}

fn asymml() -> Scheme {
    Scheme::named("asymml").unwrap()
}
