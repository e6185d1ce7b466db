//! AsymML: without noise the split computes exactly what plaintext computes (forward, backward,
//! every rank policy and subspace method); with noise it releases only noised residuals and
//! public weights.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::BTreeSet;
use std::sync::Arc;
use trustsplit_boundary::{Direction, Secret, Transcript};
mod common;

use common::{cpu_device, max_relative_difference};
use trustsplit_nn::layers::{BatchNorm, Conv2d, Layer, Linear, Pool, Residual};
use trustsplit_nn::optim::{Optimizer, OptimizerKind};
use trustsplit_nn::tensor::from_vec;
use trustsplit_nn::{Model, Tensor};
use trustsplit_schemes::asymml::{self, AsymmlConfig, BasisScope, RankRule, Subspace};
use trustsplit_schemes::{plaintext, SplitRunner};

fn random(rng: &mut ChaCha8Rng, shape: &[usize], scale: f32) -> Tensor {
    let n = shape.iter().product();
    from_vec(shape, (0..n).map(|_| rng.random_range(-scale..scale)).collect())
}

fn conv(rng: &mut ChaCha8Rng, out: usize, inp: usize, k: usize, stride: usize, bias: bool) -> Layer {
    let scale = (2.0 / (inp * k * k) as f32).sqrt();
    Layer::Conv2d(Conv2d {
        weight: random(rng, &[out, inp, k, k], scale),
        bias: bias.then(|| random(rng, &[out], 0.1)),
        stride,
        padding: k / 2,
    })
}

/// Convolutions with and without bias, batch-norm, pooling and a projection residual block: every
/// path the runner can take through a convolution. 3 x 12 x 12 input.
fn small_model(rng: &mut ChaCha8Rng) -> Model {
    let block = Layer::Residual(Residual {
        main: vec![
            conv(rng, 12, 8, 3, 2, false),
            Layer::BatchNorm(BatchNorm::new(12)),
            Layer::Relu,
            conv(rng, 12, 12, 3, 1, true),
        ],
        shortcut: vec![conv(rng, 12, 8, 1, 2, false)],
    });
    let layers = vec![
        conv(rng, 8, 3, 3, 1, true),
        Layer::BatchNorm(BatchNorm::new(8)),
        Layer::Relu,
        Layer::MaxPool(Pool { kernel: 2, stride: 2, padding: 0 }),
        block,
        Layer::Relu,
        Layer::Flatten,
        Layer::Linear(Linear { weight: random(rng, &[10, 12 * 9], 0.1), bias: Some(random(rng, &[10], 0.1)) }),
    ];
    Model::new("small", &[3, 12, 12], layers).unwrap()
}

fn runner(cfg: AsymmlConfig, transcript: Transcript) -> SplitRunner {
    asymml::runner(cpu_device(), cfg, 96 << 20, Arc::new(transcript)).unwrap()
}

/// Trains three SGD steps and evaluates once; returns the model and the losses.
fn train(runner: &mut SplitRunner, seed: u64) -> (Model, Vec<f32>) {
    train_batches_of(runner, seed, 5)
}

/// [`train`] with training batches of `batch` samples.
fn train_batches_of(runner: &mut SplitRunner, seed: u64, batch: usize) -> (Model, Vec<f32>) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut model = small_model(&mut rng);
    let mut opt = Optimizer::new(OptimizerKind::Sgd { momentum: 0.9, nesterov: false }, 5e-4);
    let mut losses = Vec::new();
    for _ in 0..3 {
        let x = random(&mut rng, &[batch, 3, 12, 12], 1.0);
        let y: Vec<usize> = (0..batch).map(|_| rng.random_range(0..10)).collect();
        losses.push(runner.train_step(&mut model, Secret::new(x), &Secret::new(y), &mut opt, 0.05).unwrap().loss);
    }
    let x = random(&mut rng, &[4, 3, 12, 12], 1.0);
    let y: Vec<usize> = (0..4).map(|_| rng.random_range(0..10)).collect();
    losses.push(runner.eval_batch(&mut model, Secret::new(x), &Secret::new(y)).unwrap().loss);
    (model, losses)
}

#[test]
fn without_noise_the_split_computes_what_plaintext_computes() {
    let (reference, ref_losses) = train(&mut plaintext::runner(Arc::new(Transcript::new())).unwrap(), 7);
    let settings = [
        (RankRule::prototype(), Subspace::Exact, BasisScope::Sample, true),
        (RankRule::Schedule(vec![1, 3]), Subspace::Fast, BasisScope::Sample, true),
        (RankRule::Energy { tau: 0.2, max_rank: 6 }, Subspace::Exact, BasisScope::Batch, true),
        (RankRule::Schedule(vec![2]), Subspace::Fast, BasisScope::Batch, false),
        (RankRule::Energy { tau: 0.05, max_rank: 32 }, Subspace::Fast, BasisScope::Sample, false),
    ];
    for (rank, subspace, basis, protect_gradients) in settings {
        let what = format!("{rank:?} {subspace:?} {basis:?} protect={protect_gradients}");
        let cfg = AsymmlConfig { rank, subspace, basis, protect_gradients, ..AsymmlConfig::default() };
        let mut r = runner(cfg.clone(), Transcript::new());
        let (model, losses) = train(&mut r, 7);
        // The count the noise calibration uses, from shapes alone, is the count the run charged.
        let counted = r.report().placement.privacy.unwrap().releases_per_step;
        assert_eq!(asymml::releases_per_step(&model, &cfg, 5), counted, "{what}");
        for (a, b) in losses.iter().zip(&ref_losses) {
            assert!((a - b).abs() <= 1e-4 * b.abs().max(1.0), "{what}: losses {losses:?} vs {ref_losses:?}");
        }
        let d = max_relative_difference(&reference, &model);
        assert!(d < 1e-4, "{what}: weights differ from plaintext by {d}");
        let report = r.report();
        assert!(report.device_seconds >= 0.0 && report.device_bytes_sent > 0, "{what}: the device was not used");
        assert!(report.placement.enclave_macs > 0 && report.placement.device_macs > 0, "{what}");
        assert!(!report.placement.layers.is_empty(), "{what}: no per-layer ranks");
    }
}

#[test]
fn a_basis_from_part_of_a_large_batch_splits_exactly() {
    // Batches of 20 12x12 maps: the fast subspace computes a fixed-rank batch basis from 8 of
    // them (the input's and the first convolution's), and the split projects every sample itself.
    // Without noise, training is still plaintext's.
    let (reference, ref_losses) = train_batches_of(&mut plaintext::runner(Arc::new(Transcript::new())).unwrap(), 9, 20);
    for protect_gradients in [true, false] {
        let rank = RankRule::Schedule(vec![1, 3]);
        let cfg = AsymmlConfig {
            rank,
            subspace: Subspace::Fast,
            basis: BasisScope::Batch,
            protect_gradients,
            ..AsymmlConfig::default()
        };
        let mut r = runner(cfg, Transcript::new());
        let (model, losses) = train_batches_of(&mut r, 9, 20);
        for (a, b) in losses.iter().zip(&ref_losses) {
            assert!((a - b).abs() <= 1e-4 * b.abs().max(1.0), "losses {losses:?} vs {ref_losses:?}");
        }
        let d = max_relative_difference(&reference, &model);
        assert!(d < 1e-4, "weights differ from plaintext by {d}");
        // The energies reported are the whole batch's, as split.
        for layer in r.report().placement.layers {
            assert!((0.0..=1.0).contains(&layer.residual_energy_ratio), "{layer:?}");
        }
    }
}

#[test]
fn an_energy_threshold_holds_for_the_whole_batch() {
    // Batches of 20 3x12x12 images, large enough for a fixed rank's fast basis to come from 8 of
    // them. Nineteen images lie along the first colour channel; one, 100 times brighter, along
    // the second. A basis from eight images without the bright one would keep the first channel
    // and leave almost all of the batch's energy in the residual; the energy threshold's basis
    // sees every image, so the threshold holds.
    let tau = 0.1;
    let rank = RankRule::Energy { tau, max_rank: 3 };
    let cfg = AsymmlConfig { rank, subspace: Subspace::Fast, basis: BasisScope::Batch, ..AsymmlConfig::default() };
    let mut r = runner(cfg, Transcript::new());
    let mut rng = ChaCha8Rng::seed_from_u64(13);
    let mut model = small_model(&mut rng);
    let mut opt = Optimizer::new(OptimizerKind::Sgd { momentum: 0.9, nesterov: false }, 5e-4);
    for step in 0..6 {
        let mut x = vec![0.0f32; 20 * 3 * 144];
        let bright = (step * 7) % 20;
        for (b, image) in x.chunks_exact_mut(3 * 144).enumerate() {
            let (channel, scale) = if b == bright { (1, 100.0) } else { (0, 1.0) };
            image[channel * 144..(channel + 1) * 144].iter_mut().for_each(|v| *v = scale * rng.random_range(-1.0..1.0));
        }
        let y: Vec<usize> = (0..20).map(|_| rng.random_range(0..10)).collect();
        let x = from_vec(&[20, 3, 12, 12], x);
        r.train_step(&mut model, Secret::new(x), &Secret::new(y), &mut opt, 0.05).unwrap();
    }
    let layers = r.report().placement.layers;
    let input = layers.iter().find(|l| l.layer == "layers.0" && l.what == "forward").expect("the input's split");
    assert!(input.residual_energy_ratio <= tau, "{input:?}");
}

#[test]
fn blown_up_weights_end_the_step_with_an_error_not_a_panic() {
    // A NaN weight in the first convolution (as a diverging run ends up with) makes every later
    // activation NaN: no subspace exists for them, and both methods say so.
    for subspace in [Subspace::Exact, Subspace::Fast] {
        let mut rng = ChaCha8Rng::seed_from_u64(3);
        let mut model = small_model(&mut rng);
        if let Layer::Conv2d(c) = &mut model.layers[0] {
            c.weight.as_slice_mut().expect("contiguous")[5] = f32::NAN;
        }
        let cfg = AsymmlConfig { subspace, noise_multiplier: 1.0, ..AsymmlConfig::default() };
        let mut r = runner(cfg, Transcript::new());
        let mut opt = Optimizer::new(OptimizerKind::Sgd { momentum: 0.9, nesterov: false }, 5e-4);
        let x = random(&mut rng, &[5, 3, 12, 12], 1.0);
        let y: Vec<usize> = (0..5).map(|_| rng.random_range(0..10)).collect();
        let err = r.train_step(&mut model, Secret::new(x), &Secret::new(y), &mut opt, 0.05).unwrap_err().to_string();
        assert!(err.contains("training diverged") && err.contains("NaN or infinite"), "{subspace:?}: {err}");
    }
}

#[test]
fn a_nan_weight_that_a_relu_hides_from_the_loss_ends_the_step_at_the_update() {
    // Without a split to notice it (plaintext), a NaN weight in the first convolution yields a
    // NaN channel that the ReLU zeroes: the loss stays finite, but the gradient does not, and the
    // optimizer refuses it rather than spreading NaN through the weights.
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let mut model = small_model(&mut rng);
    if let Layer::Conv2d(c) = &mut model.layers[0] {
        c.weight.as_slice_mut().expect("contiguous")[5] = f32::NAN;
    }
    let mut r = plaintext::runner(Arc::new(Transcript::new())).unwrap();
    let mut opt = Optimizer::new(OptimizerKind::Sgd { momentum: 0.9, nesterov: false }, 5e-4);
    let x = random(&mut rng, &[5, 3, 12, 12], 1.0);
    let y: Vec<usize> = (0..5).map(|_| rng.random_range(0..10)).collect();
    let err = r.train_step(&mut model, Secret::new(x), &Secret::new(y), &mut opt, 0.05).unwrap_err().to_string();
    assert!(err.contains("training diverged") && err.contains("NaN or infinite"), "{err}");
    assert!(err.contains("layers.0.") || err.contains("layers.1."), "the parameter is not named: {err}");
}

#[test]
fn releases_only_noised_residuals_and_public_weights() {
    let cfg = AsymmlConfig { noise_multiplier: 1.0, ..AsymmlConfig::default() };
    let mut r = runner(cfg, Transcript::keeping_records());
    let (model, losses) = train(&mut r, 3);
    assert!(losses.iter().all(|l| l.is_finite()), "{losses:?}");
    assert!(model.named_params().iter().all(|(_, t)| t.iter().all(|v| v.is_finite())));
    let records = r.transcript().records().unwrap();
    let sent: BTreeSet<String> =
        records.iter().filter(|r| r.direction == Direction::TeeToDevice).map(|r| r.info.kind.clone()).collect();
    let allowed: BTreeSet<String> =
        ["noised-residual", "weight", "noised-gradient-residual"].iter().map(|s| s.to_string()).collect();
    assert!(sent.is_subset(&allowed) && sent.len() == 3, "released kinds: {sent:?}");
    let back: BTreeSet<String> =
        records.iter().filter(|r| r.direction == Direction::DeviceToTee).map(|r| r.info.kind.clone()).collect();
    assert!(back.iter().all(|k| ["output", "input-gradient", "weight-gradient"].contains(&k.as_str())), "{back:?}");
    // The first layer keeps 2 of its 3 input channels; its residual is released, noised.
    assert!(records.iter().any(|r| r.info.layer == "layers.0" && r.info.kind == "noised-residual"));
    // The first layer's input gradient is never needed: its weight gradient is computed in the
    // enclave, and nothing of its output gradient is released. Nothing releases a label, a logit
    // or the loss.
    assert!(!records.iter().any(|r| r.info.layer == "layers.0" && r.info.kind == "noised-gradient-residual"));
    assert!(records.iter().any(|r| r.info.layer != "layers.0" && r.info.kind == "noised-gradient-residual"));
    for rec in &records {
        assert!(!["input", "label", "labels", "logits", "loss", "activation"].contains(&rec.info.kind.as_str()));
    }
    // The per-layer statistics list that split once, under both names.
    let report = r.report().placement;
    assert!(
        report.layers.iter().any(|l| l.layer == "layers.4.main.0 + layers.4.shortcut.0" && l.what == "forward"),
        "{:?}",
        report.layers.iter().map(|l| format!("{} {}", l.layer, l.what)).collect::<Vec<_>>()
    );
    let ledger = report.privacy.unwrap();
    // The residual block's two leading convolutions (main.0, 8 -> 12 channels, and the 1x1
    // projection shortcut) read the same input: it is split once, with main.0's rank, and its
    // noised residual released once, for both.
    let block_input: Vec<_> =
        records.iter().filter(|r| r.info.kind == "noised-residual" && r.info.layer.starts_with("layers.4")).collect();
    assert_eq!(
        block_input.len(),
        4,
        "one release of the block's input per pass (3 steps, 1 evaluation): {block_input:?}"
    );
    assert!(block_input
        .iter()
        .all(|r| r.info.layer == "layers.4.main.0" && r.info.reason.contains("layers.4.shortcut.0")));
    // Ranks 2, 4, 8, 16 in the order the convolutions are met: layers.0, main.0, shortcut.0,
    // main.3. Forward: the input's release and the block input's. Gradients: main.0's (rank 4 of
    // 12 channels) and the shortcut's (rank 8 of 12); main.3 keeps everything (rank 16 >= 12), and
    // the first layer's stays in the enclave. The model has batch-norm, so all but the input's
    // release depend on the whole batch of 5.
    assert_eq!(ledger.releases_per_step, 1 + 3 * (4 * 5 - 3));
    // Evaluating releases the same two forward residuals per example, charged apart from the
    // training samples; batch-norm then uses its running statistics, so none is coupled.
    assert_eq!(ledger.releases_per_evaluation, 2);
    let test_spent = ledger.spent_by_evaluations(2).unwrap();
    assert!(test_spent.epsilon > 0.0 && test_spent.epsilon < ledger.spent(2).unwrap().epsilon, "{test_spent:?}");
    assert!(!ledger.gradients_in_clear);
    let spent = ledger.spent(2).unwrap();
    assert!(spent.epsilon.is_finite() && spent.epsilon > 0.0, "{spent:?}");
}

#[test]
fn a_rank_covering_every_channel_releases_nothing_for_that_layer() {
    // Rank 3 on the 3-channel input keeps the whole image in the enclave.
    let cfg = AsymmlConfig { rank: RankRule::Schedule(vec![3, 2]), noise_multiplier: 0.5, ..AsymmlConfig::default() };
    let mut r = runner(cfg, Transcript::keeping_records());
    train(&mut r, 5);
    let records = r.transcript().records().unwrap();
    assert!(
        !records.iter().any(|r| r.info.layer == "layers.0"
            && r.direction == Direction::TeeToDevice
            && r.info.kind != "noised-gradient-residual"),
        "layer 0 released its input or weight"
    );
    assert!(records.iter().any(|r| r.info.layer.starts_with("layers.4") && r.info.kind == "noised-residual"));
}

#[test]
fn unprotected_gradients_are_released_in_the_clear_and_flagged() {
    let cfg = AsymmlConfig { protect_gradients: false, noise_multiplier: 1.0, ..AsymmlConfig::default() };
    let mut r = runner(cfg, Transcript::keeping_records());
    train(&mut r, 9);
    let records = r.transcript().records().unwrap();
    assert!(records.iter().any(|r| r.info.kind == "output-gradient"));
    assert!(r.report().placement.privacy.unwrap().gradients_in_clear);
}

#[test]
fn bad_settings_are_refused_with_the_flag_named() {
    let bad = [
        (AsymmlConfig { noise_multiplier: -1.0, ..AsymmlConfig::default() }, "--noise-multiplier"),
        (AsymmlConfig { clip_norm: 0.0, ..AsymmlConfig::default() }, "--clip-norm"),
        (AsymmlConfig { delta: 1.0, ..AsymmlConfig::default() }, "--delta"),
        (AsymmlConfig { rank: RankRule::Schedule(vec![]), ..AsymmlConfig::default() }, "rank schedule"),
        (AsymmlConfig { rank: RankRule::Energy { tau: 1.5, max_rank: 4 }, ..AsymmlConfig::default() }, "energy"),
    ];
    for (cfg, needle) in bad {
        let err = asymml::runner(cpu_device(), cfg, 96 << 20, Arc::new(Transcript::new())).err().unwrap();
        assert!(err.to_string().contains(needle), "{err}");
    }
}

/// What the recording device saw: (values per sample, batch size, the operand).
type Seen = Arc<std::sync::Mutex<Vec<(usize, usize, Vec<f32>)>>>;

/// Our CPU kernels, keeping a copy of every forward convolution's input and every backward
/// convolution's output gradient as the device received them (a layer's released, noised
/// residuals); `poison` makes it a faulty device, one value of each output (`.0`) or input
/// gradient (`.1`) it returns replaced by NaN; `tampers_with` a dishonest one, every value of one
/// kind of result scaled by 1.05 (`0`: outputs, `1`: input gradients, `2`: weight gradients), to
/// bias the training by too little for the checks of finiteness to notice.
struct RecordingDevice {
    kernels: trustsplit_device::CpuBackend,
    inputs: Seen,
    gradients: Seen,
    /// NaN in (outputs, input gradients).
    poison: (bool, bool),
    poison_weight_gradients: bool,
    tampers_with: Option<usize>,
}

impl RecordingDevice {
    fn new(poison: (bool, bool)) -> RecordingDevice {
        let kernels = trustsplit_device::CpuBackend::new(1).unwrap();
        let (inputs, gradients) = (Seen::default(), Seen::default());
        RecordingDevice { kernels, inputs, gradients, poison, poison_weight_gradients: false, tampers_with: None }
    }

    /// The `kind`-th result (as `tampers_with` counts) as this device returns it: scaled where it
    /// tampers with that kind, with its middle value NaN where `poison`.
    fn returned(
        &self,
        kind: usize,
        values: Result<Vec<f32>, trustsplit_device::DeviceError>,
        poison: bool,
    ) -> Result<Vec<f32>, trustsplit_device::DeviceError> {
        let mut values = values?;
        if self.tampers_with == Some(kind) {
            values.iter_mut().for_each(|v| *v *= 1.05);
        }
        if poison {
            let at = values.len() / 2;
            values[at] = f32::NAN;
        }
        Ok(values)
    }
}

impl trustsplit_device::Backend for RecordingDevice {
    fn name(&self) -> String {
        "recording cpu".into()
    }
    fn gemm(
        &mut self,
        s: &trustsplit_device::GemmShape,
        a: &[f32],
        b: &[f32],
    ) -> Result<Vec<f32>, trustsplit_device::DeviceError> {
        self.kernels.gemm(s, a, b)
    }
    fn conv_forward(
        &mut self,
        g: &trustsplit_kernels::ConvGeometry,
        x: &[f32],
        w: &[f32],
    ) -> Result<Vec<f32>, trustsplit_device::DeviceError> {
        self.inputs.lock().unwrap().push((g.in_channels * g.in_h * g.in_w, g.batch, x.to_vec()));
        let result = self.kernels.conv_forward(g, x, w);
        self.returned(0, result, self.poison.0)
    }
    fn conv_backward_data(
        &mut self,
        g: &trustsplit_kernels::ConvGeometry,
        dy: &[f32],
        w: &[f32],
    ) -> Result<Vec<f32>, trustsplit_device::DeviceError> {
        self.gradients.lock().unwrap().push((g.out_channels * g.out_h() * g.out_w(), g.batch, dy.to_vec()));
        let result = self.kernels.conv_backward_data(g, dy, w);
        self.returned(1, result, self.poison.1)
    }
    fn conv_backward_weight(
        &mut self,
        g: &trustsplit_kernels::ConvGeometry,
        x: &[f32],
        dy: &[f32],
    ) -> Result<Vec<f32>, trustsplit_device::DeviceError> {
        let result = self.kernels.conv_backward_weight(g, x, dy);
        self.returned(2, result, self.poison_weight_gradients)
    }
}

#[test]
fn a_weight_gradient_with_nan_ends_the_step_before_its_layer_is_updated() {
    // AsymML checks each convolution's weight gradient as it expands its own terms into the
    // device's share, and the optimizer relies on that instead of reading it again: a NaN there
    // must still end the step before the layer holding that convolution (the residual block,
    // layers.4) or any layer before it changes. Without global gradient clipping the runner updates
    // each layer as its backward ends, so the classifier after the block (layers.7) has already
    // been updated; with clipping, nothing has.
    for (protect_gradients, max_grad_norm) in [(true, None), (false, None), (true, Some(5.0))] {
        let mut device = RecordingDevice::new((false, false));
        device.poison_weight_gradients = true;
        let device = trustsplit_device::Device::local(Box::new(device));
        let cfg = AsymmlConfig { noise_multiplier: 1.0, protect_gradients, ..AsymmlConfig::default() };
        let mut r = asymml::runner(device, cfg, 96 << 20, Arc::new(Transcript::new())).unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(13);
        let mut model = small_model(&mut rng);
        let before: Vec<(String, Tensor)> = model.named_params().into_iter().map(|(n, t)| (n, t.clone())).collect();
        let mut opt = Optimizer::new(OptimizerKind::Sgd { momentum: 0.9, nesterov: false }, 5e-4)
            .with_max_grad_norm(max_grad_norm);
        let x = random(&mut rng, &[5, 3, 12, 12], 1.0);
        let y: Vec<usize> = (0..5).map(|_| rng.random_range(0..10)).collect();
        let err = r.train_step(&mut model, Secret::new(x), &Secret::new(y), &mut opt, 0.05).unwrap_err().to_string();
        let case = format!("protect_gradients {protect_gradients}, max_grad_norm {max_grad_norm:?}");
        assert!(err.contains("weight gradient holds NaN or infinite values"), "{case}: {err}");
        for ((name, was), (_, now)) in before.iter().zip(model.named_params()) {
            let updated = max_grad_norm.is_none() && name.starts_with("layers.7.");
            assert_eq!(was != now, updated, "{case}: {name} {}", if updated { "was not updated" } else { "changed" });
        }
        assert_eq!(opt.steps, u64::from(max_grad_norm.is_none()), "{case}: steps counted");
    }
}

#[test]
fn a_device_result_with_nan_ends_the_step_with_an_error_that_names_the_device() {
    // A faulty device's NaN output or input gradient is refused where it is merged (it would
    // otherwise pass for the enclave's own divergence), with gradients protected or in the clear.
    for (poison, protect_gradients, what) in [
        ((true, false), true, "'s output"),
        ((false, true), true, "'s input gradient"),
        ((false, true), false, "'s input gradient"),
    ] {
        let device = trustsplit_device::Device::local(Box::new(RecordingDevice::new(poison)));
        let cfg = AsymmlConfig { noise_multiplier: 1.0, protect_gradients, ..AsymmlConfig::default() };
        let mut r = asymml::runner(device, cfg, 96 << 20, Arc::new(Transcript::new())).unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(12);
        let mut model = small_model(&mut rng);
        let mut opt = Optimizer::new(OptimizerKind::Sgd { momentum: 0.9, nesterov: false }, 5e-4);
        let x = random(&mut rng, &[5, 3, 12, 12], 1.0);
        let y: Vec<usize> = (0..5).map(|_| rng.random_range(0..10)).collect();
        let err = r.train_step(&mut model, Secret::new(x), &Secret::new(y), &mut opt, 0.05).unwrap_err().to_string();
        assert!(err.contains("device returned NaN or infinite values") && err.contains(what), "{poison:?}: {err}");
    }
}

#[test]
fn finite_activations_too_large_for_the_split_end_the_step_before_anything_is_released() {
    // Weights grown by 1e24 (a diverging run) give activations near 1e24: finite, but their
    // products overflow f32 in the subspace, so the split would yield a NaN residual. It must end
    // the step as divergence without releasing that residual (and without blaming the device).
    for subspace in [Subspace::Exact, Subspace::Fast] {
        let recording = RecordingDevice::new((false, false));
        let inputs = recording.inputs.clone();
        let device = trustsplit_device::Device::local(Box::new(recording));
        let cfg = AsymmlConfig { subspace, noise_multiplier: 1.0, ..AsymmlConfig::default() };
        let mut r = asymml::runner(device, cfg, 96 << 20, Arc::new(Transcript::new())).unwrap();
        let mut rng = ChaCha8Rng::seed_from_u64(4);
        // No batch-norm, which would rescale them.
        let mut layers = vec![conv(&mut rng, 8, 3, 3, 1, true), Layer::Relu, conv(&mut rng, 8, 8, 3, 1, true)];
        if let Layer::Conv2d(c) = &mut layers[0] {
            c.weight.iter_mut().for_each(|w| *w *= 1e24);
        }
        let head = Linear { weight: random(&mut rng, &[10, 8 * 144], 0.1), bias: None };
        layers.extend([Layer::Flatten, Layer::Linear(head)]);
        let mut model = Model::new("plain", &[3, 12, 12], layers).unwrap();
        let mut opt = Optimizer::new(OptimizerKind::Sgd { momentum: 0.9, nesterov: false }, 5e-4);
        let x = random(&mut rng, &[5, 3, 12, 12], 1.0);
        let y: Vec<usize> = (0..5).map(|_| rng.random_range(0..10)).collect();
        let err = r.train_step(&mut model, Secret::new(x), &Secret::new(y), &mut opt, 0.05).unwrap_err().to_string();
        assert!(err.starts_with("training diverged: layers.2's forward cannot be split"), "{subspace:?}: {err}");
        // The exact subspace's eigensolver fails on the overflowed Gram matrix; the fast one's
        // basis comes out NaN, which the residual's energy shows. Which sample is named first
        // depends on the fast subspace's random start (drawn from the OS), so any may be.
        if subspace == Subspace::Fast {
            assert!(err.contains("'s residual is not finite"), "{err}");
        }
        // The image's split was released (finite); nothing after it.
        let seen = inputs.lock().unwrap();
        assert_eq!(seen.len(), 1, "{subspace:?}: only the first layer's residual reaches the device");
        assert!(seen[0].2.iter().all(|v| v.is_finite()), "{subspace:?}");
    }
}

#[test]
fn every_released_residual_is_clipped_to_its_bound() {
    // Residuals far above the clipping bounds and almost no noise: every sample's released residual
    // must sit on its bound, none above it, with either basis scope. Activations: clip_norm *
    // sqrt(values per sample); output gradients (of the batch-mean loss): grad_clip_norm *
    // sqrt(values per sample) / batch. This is the sensitivity the accountant assumes.
    for basis in [BasisScope::Sample, BasisScope::Batch] {
        let recording = RecordingDevice::new((false, false));
        let (inputs, gradients) = (recording.inputs.clone(), recording.gradients.clone());
        let device = trustsplit_device::Device::local(Box::new(recording));
        let cfg = AsymmlConfig {
            noise_multiplier: 1e-6,
            clip_norm: 1e-3,
            grad_clip_norm: 1e-6,
            basis,
            ..AsymmlConfig::default()
        };
        let mut r = asymml::runner(device, cfg, 96 << 20, Arc::new(Transcript::new())).unwrap();
        train(&mut r, 5);
        for (what, seen, clip) in [("residual", inputs, 1e-3), ("gradient residual", gradients, 1e-6)] {
            let seen = seen.lock().unwrap();
            assert!(!seen.is_empty(), "{basis:?}: no {what} was released");
            for (per, batch, values) in seen.iter() {
                let bound = clip * (*per as f64).sqrt() / if what == "residual" { 1.0 } else { *batch as f64 };
                for sample in values.chunks(*per) {
                    let norm = sample.iter().map(|&v| f64::from(v) * f64::from(v)).sum::<f64>().sqrt();
                    assert!((norm - bound).abs() <= 1e-3 * bound, "{basis:?}: {what} norm {norm}, bound {bound}");
                }
            }
        }
    }
}

#[test]
fn a_device_that_tampers_with_its_results_is_caught_and_the_step_refused() {
    for (tampers_with, what) in ["output", "input gradient", "weight gradient"].into_iter().enumerate() {
        for (protect_gradients, verify_device) in [(true, true), (false, true), (true, false)] {
            let tampering =
                RecordingDevice { tampers_with: Some(tampers_with), ..RecordingDevice::new((false, false)) };
            let device = trustsplit_device::Device::local(Box::new(tampering));
            let cfg =
                AsymmlConfig { noise_multiplier: 1.0, protect_gradients, verify_device, ..AsymmlConfig::default() };
            let mut r = asymml::runner(device, cfg, 96 << 20, Arc::new(Transcript::new())).unwrap();
            let mut rng = ChaCha8Rng::seed_from_u64(17);
            let mut model = small_model(&mut rng);
            let mut opt = Optimizer::new(OptimizerKind::Sgd { momentum: 0.9, nesterov: false }, 5e-4);
            let x = random(&mut rng, &[5, 3, 12, 12], 1.0);
            let y: Vec<usize> = (0..5).map(|_| rng.random_range(0..10)).collect();
            let step = r.train_step(&mut model, Secret::new(x.clone()), &Secret::new(y.clone()), &mut opt, 0.05);
            let case = format!("tampers with {what}, protect_gradients {protect_gradients}");
            if !verify_device {
                // The same device goes unnoticed without the checks: they are what catches it.
                step.unwrap_or_else(|e| panic!("{case}, unverified: {e}"));
                assert!(r.report().placement.device_checks.is_none());
                continue;
            }
            let err = step.expect_err(&case).to_string();
            let expected = format!("the device's {what} failed verification at");
            assert!(err.contains(&expected) && err.contains("layers."), "{case}: {err}");
            if tampers_with == 0 {
                // Evaluation checks the device's outputs too.
                let err = r.eval_batch(&mut model, Secret::new(x), &Secret::new(y)).expect_err(&case).to_string();
                assert!(err.contains(&expected), "{case}: {err}");
            }
        }
    }
}

#[test]
fn an_honest_device_passes_every_check_and_the_report_counts_them() {
    for protect_gradients in [true, false] {
        let cfg = AsymmlConfig { noise_multiplier: 1.0, protect_gradients, ..AsymmlConfig::default() };
        assert!(cfg.verify_device, "verification is on by default");
        let mut r = runner(cfg, Transcript::new());
        train(&mut r, 19);
        let checks = r.report().placement.device_checks.expect("verified");
        // Every released residual's convolution is checked: per sample and position for the
        // outputs and input gradients, per output channel and tap for the weight gradients.
        assert!(checks.checks > 1000, "{checks:?}");
        assert!(checks.worst_ratio > 0.0 && checks.worst_ratio < 0.5, "{checks:?}");
    }
}

#[test]
fn what_the_checks_keep_counts_against_the_enclave_budget_until_the_backward_pass() {
    let stats = |verify_device: bool| {
        let cfg = AsymmlConfig { noise_multiplier: 1.0, verify_device, ..AsymmlConfig::default() };
        let mut r = runner(cfg, Transcript::new());
        let mut rng = ChaCha8Rng::seed_from_u64(23);
        let mut model = small_model(&mut rng);
        let mut opt = Optimizer::new(OptimizerKind::Sgd { momentum: 0.9, nesterov: false }, 5e-4);
        for _ in 0..2 {
            let x = random(&mut rng, &[6, 3, 12, 12], 1.0);
            let y: Vec<usize> = (0..6).map(|_| rng.random_range(0..10)).collect();
            r.train_step(&mut model, Secret::new(x), &Secret::new(y), &mut opt, 0.05).unwrap();
        }
        r.report().memory.expect("a budget was given")
    };
    let (on, off) = (stats(true), stats(false));
    // The input projections (6 x 12 x 12 values per checked layer) and the weights' projections
    // were held beside the saved contexts during the step...
    assert!(on.peak_bytes > off.peak_bytes, "peak {} verified, {} not", on.peak_bytes, off.peak_bytes);
    // ...and given back by its end: what stays is the same either way.
    assert_eq!(on.transient_bytes, off.transient_bytes);
}

#[test]
fn a_sample_release_depends_on_nothing_but_that_sample() {
    // Without noise the releases are deterministic (the subspace's random starts come from a
    // seed), so a sample's released residuals (every forward input the device received) can be
    // compared bit for bit. Evaluation passes: the weights stay put and batch-norm uses its
    // running statistics, so nothing else ties the samples together. With a basis per sample, a
    // sample's releases must not change when another sample of its batch changes, nor when an
    // earlier batch does. With a basis per batch the whole batch is coupled (and charged so:
    // `4n - 3` per release), but an earlier batch must still not matter.
    let (n, per) = (4, 3 * 12 * 12);
    let images = |seed: u64| -> Vec<f32> {
        let mut rng = ChaCha8Rng::seed_from_u64(seed);
        (0..n * per).map(|_| rng.random_range(-1.0..1.0)).collect()
    };
    let first_changed = |mut x: Vec<f32>| {
        x[..per].iter_mut().for_each(|v| *v = 0.5 - *v);
        x
    };
    let (a, b) = (images(1), images(2));
    for (subspace, basis) in [
        (Subspace::Fast, BasisScope::Sample),
        (Subspace::Exact, BasisScope::Sample),
        (Subspace::Fast, BasisScope::Batch),
    ] {
        let cfg =
            AsymmlConfig { subspace, basis, noise_multiplier: 0.0, subspace_seed: Some(5), ..AsymmlConfig::default() };
        // Each sample's releases in the second of two evaluated batches: per device call, its part.
        let second_batch = |first: &[f32], second: &[f32]| -> Vec<Vec<Vec<f32>>> {
            let recording = RecordingDevice::new((false, false));
            let inputs = recording.inputs.clone();
            let mut r = asymml::runner(
                trustsplit_device::Device::local(Box::new(recording)),
                cfg.clone(),
                96 << 20,
                Arc::new(Transcript::new()),
            )
            .unwrap();
            let mut model = small_model(&mut ChaCha8Rng::seed_from_u64(3));
            let mut before = 0;
            for x in [first, second] {
                before = inputs.lock().unwrap().len();
                let x = Secret::new(from_vec(&[n, 3, 12, 12], x.to_vec()));
                r.eval_batch(&mut model, x, &Secret::new(vec![0; n])).unwrap();
            }
            let ledger = r.report().placement.privacy.unwrap();
            assert_eq!(ledger.releases_per_evaluation, asymml::releases_per_evaluation(&model, &cfg, n));
            let seen = inputs.lock().unwrap();
            assert!(seen.len() - before >= 3, "{subspace:?} {basis:?}: the evaluation released too little");
            let sample =
                |s: usize| seen[before..].iter().map(|(per, _, x)| x[s * per..(s + 1) * per].to_vec()).collect();
            (0..n).map(sample).collect()
        };
        let case = format!("{subspace:?} {basis:?}");
        let reference = second_batch(&a, &b);
        assert_eq!(
            second_batch(&first_changed(a.clone()), &b),
            reference,
            "{case}: an earlier batch changed a release"
        );
        let changed = second_batch(&a, &first_changed(b.clone()));
        assert_ne!(changed[0], reference[0], "{case}: the changed sample's own release");
        match basis {
            BasisScope::Sample => {
                assert_eq!(changed[1..], reference[1..], "{case}: a sample of the batch changed another's")
            }
            BasisScope::Batch => assert_ne!(changed[1], reference[1], "{case}: the batch's basis couples its samples"),
        }
    }
}
