//! What each scheme releases, and that tee-only and gpu-only compute what plaintext computes.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::BTreeSet;
use std::sync::Arc;
use trustsplit_boundary::{Direction, Secret, Transcript};
mod common;

use common::{cpu_device, max_relative_difference};
use trustsplit_nn::optim::{Optimizer, OptimizerKind};
use trustsplit_nn::tensor::from_vec;
use trustsplit_nn::{zoo, Model, Tensor};
use trustsplit_schemes::{gpu_only, plaintext, tee_only, SplitRunner};

fn batch(rng: &mut ChaCha8Rng, n: usize, shape: &[usize]) -> (Tensor, Vec<usize>) {
    let len = n * shape.iter().product::<usize>();
    let full: Vec<usize> = std::iter::once(n).chain(shape.iter().copied()).collect();
    let x = from_vec(&full, (0..len).map(|_| rng.random_range(-1.0f32..1.0)).collect());
    (x, (0..n).map(|_| rng.random_range(0..10)).collect())
}

/// Trains `steps` SGD steps on seeded random batches; returns the model and the per-step losses.
fn train(runner: &mut SplitRunner, name: &str, input: &[usize], steps: usize) -> (Model, Vec<f32>) {
    let mut opt = Optimizer::new(OptimizerKind::Sgd { momentum: 0.9, nesterov: false }, 5e-4);
    train_with(runner, name, input, steps, &mut opt)
}

fn train_with(
    runner: &mut SplitRunner,
    name: &str,
    input: &[usize],
    steps: usize,
    opt: &mut Optimizer,
) -> (Model, Vec<f32>) {
    let mut model = zoo::build(name, input, 10, 3).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let mut losses = Vec::new();
    for _ in 0..steps {
        let (x, y) = batch(&mut rng, 6, input);
        let out = runner.train_step(&mut model, Secret::new(x), &Secret::new(y), opt, 0.01).unwrap();
        losses.push(out.loss);
    }
    let (x, y) = batch(&mut rng, 6, input);
    runner.eval_batch(&mut model, Secret::new(x), &Secret::new(y)).unwrap();
    (model, losses)
}

fn one_thread<T: Send>(f: impl FnOnce() -> T + Send) -> T {
    rayon::ThreadPoolBuilder::new().num_threads(1).build().unwrap().install(f)
}

#[test]
fn tee_only_and_gpu_only_train_like_plaintext() {
    // One enclave thread and a one-thread device: the kernels then split work identically on both
    // sides, so even gpu-only must match plaintext bit for bit.
    one_thread(compare_schemes);
}

fn compare_schemes() {
    for (name, input) in [("lenet5", vec![1, 28, 28]), ("resnet18", vec![3, 32, 32])] {
        let steps = if name == "lenet5" { 4 } else { 2 };
        let (reference, ref_losses) =
            train(&mut plaintext::runner(Arc::new(Transcript::new())).unwrap(), name, &input, steps);
        // A tiny budget forces sealed spills of every saved activation; results must not change.
        let mut tee = tee_only::runner(256 << 10, Arc::new(Transcript::keeping_records())).unwrap();
        let (m, losses) = train(&mut tee, name, &input, steps);
        assert_eq!(losses, ref_losses, "{name}: tee-only losses differ");
        assert_eq!(max_relative_difference(&reference, &m), 0.0, "{name}: tee-only weights differ");
        let mem = tee.report().memory.unwrap();
        assert!(mem.spill_bytes > 0 && mem.restore_bytes > 0, "{name}: the small budget did not spill: {mem:?}");

        let mut gpu = gpu_only::runner(vec![cpu_device()], 96 << 20, Arc::new(Transcript::keeping_records())).unwrap();
        let (m, losses) = train(&mut gpu, name, &input, steps);
        assert_eq!(losses, ref_losses, "{name}: gpu-only losses differ");
        assert_eq!(max_relative_difference(&reference, &m), 0.0, "{name}: gpu-only weights differ");
    }
}

#[test]
fn updating_each_layer_as_its_backward_ends_matches_one_update_after_the_backward() {
    // Without global gradient clipping the runner updates each layer's parameters as soon as its
    // backward is done; with it (here a bound no gradient reaches, so nothing is scaled), after the
    // whole backward. Same arithmetic, so the same weights, optimizer state and losses, bit for
    // bit, for SGD and Adam, through residual blocks too.
    let kinds = [
        OptimizerKind::Sgd { momentum: 0.9, nesterov: true },
        OptimizerKind::Adam { beta1: 0.9, beta2: 0.999, eps: 1e-8 },
    ];
    for (name, input) in [("lenet5", vec![1, 28, 28]), ("resnet18", vec![3, 32, 32])] {
        for kind in kinds {
            let run = |max_grad_norm: Option<f32>| {
                let mut opt = Optimizer::new(kind, 5e-4).with_max_grad_norm(max_grad_norm);
                let mut runner = tee_only::runner(96 << 20, Arc::new(Transcript::new())).unwrap();
                let (model, losses) = one_thread(|| train_with(&mut runner, name, &input, 2, &mut opt));
                (model, losses, opt)
            };
            let (each_layer, losses, opt) = run(None);
            let (at_the_end, end_losses, end_opt) = run(Some(1e30));
            assert_eq!(losses, end_losses, "{name} {kind:?}: losses differ");
            assert_eq!(max_relative_difference(&at_the_end, &each_layer), 0.0, "{name} {kind:?}: weights differ");
            assert!(
                opt.state == end_opt.state && opt.steps == 2 && end_opt.steps == 2,
                "{name} {kind:?}: state differs"
            );
        }
    }
}

#[test]
fn the_runners_walk_gives_the_models_own_gradients() {
    // The runner walks the layers itself (residual branches, the main branch reading the output
    // gradient in place of a copy, per-layer updates); `Model::backward` is the plain walk that
    // the layer tests check against finite differences. One plain SGD step from each (no momentum,
    // no weight decay: the weights move by exactly -lr times the gradient) must agree bit for bit.
    one_thread(|| {
        for (name, input) in [("resnet18", vec![3, 32, 32]), ("vgg11-bn", vec![3, 32, 32])] {
            let mut rng = ChaCha8Rng::seed_from_u64(7);
            let (x, y) = batch(&mut rng, 4, &input);
            let lr = 0.05f32;
            let mut by_runner = zoo::build(name, &input, 10, 5).unwrap();
            let mut opt = Optimizer::new(OptimizerKind::Sgd { momentum: 0.0, nesterov: false }, 0.0);
            let mut runner = plaintext::runner(Arc::new(Transcript::new())).unwrap();
            runner.train_step(&mut by_runner, Secret::new(x.clone()), &Secret::new(y.clone()), &mut opt, lr).unwrap();

            let mut by_model = zoo::build(name, &input, 10, 5).unwrap();
            let (logits, saved) = by_model.forward(&x, trustsplit_nn::Mode::Train).unwrap();
            let mut dlogits = trustsplit_nn::tensor::zeros(logits.shape());
            let (n, classes) = (logits.shape()[0], logits.shape()[1]);
            trustsplit_kernels::loss::softmax_cross_entropy(
                n,
                classes,
                logits.as_slice().unwrap(),
                &y,
                Some(dlogits.as_slice_mut().unwrap()),
            );
            let grads = by_model.backward(&dlogits, saved);
            for (p, g) in by_model.params_mut().into_iter().zip(&grads) {
                p.iter_mut().zip(g.iter()).for_each(|(w, d)| *w -= lr * d);
            }
            assert_eq!(max_relative_difference(&by_model, &by_runner), 0.0, "{name}: the runner's step differs");
        }
    });
}

#[test]
fn tee_only_releases_nothing() {
    let t = Arc::new(Transcript::keeping_records());
    let mut r = tee_only::runner(96 << 20, t.clone()).unwrap();
    train(&mut r, "vgg11-bn", &[3, 32, 32], 1);
    assert_eq!(t.records().unwrap(), vec![]);
    let s = t.summary();
    assert_eq!((s.records, s.bytes_released, s.bytes_returned), (0, 0, 0));
}

#[test]
fn gpu_only_releases_inputs_weights_and_gradients_but_not_labels_or_loss() {
    let t = Arc::new(Transcript::keeping_records());
    let mut r = gpu_only::runner(vec![cpu_device()], 96 << 20, t.clone()).unwrap();
    let (model, _) = train(&mut r, "lenet5", &[1, 28, 28], 1);
    let recs = t.records().unwrap();
    let out: Vec<_> = recs.iter().filter(|r| r.direction == Direction::TeeToDevice).collect();
    let kinds: BTreeSet<&str> = out.iter().map(|r| r.info.kind.as_str()).collect();
    assert_eq!(kinds, BTreeSet::from(["input", "activation", "weight", "output-gradient"]));
    // The very first release is the raw private input of the first layer.
    assert_eq!((out[0].info.layer.as_str(), out[0].info.kind.as_str()), ("layers.0", "input"));
    assert_eq!(out[0].info.shape, vec![6, 1, 28, 28]);
    assert!(out.iter().all(|r| r.info.reason.contains("insecure")));
    // Every linear layer's weights went out; nothing else (no labels, logits, loss, BN) did.
    let weight_layers: BTreeSet<&str> =
        out.iter().filter(|r| r.info.kind == "weight").map(|r| r.info.layer.as_str()).collect();
    let linear_layers: BTreeSet<String> = model
        .named_params()
        .iter()
        .filter(|(n, t)| n.ends_with("weight") && t.ndim() > 1)
        .map(|(n, _)| n.trim_end_matches(".weight").to_string())
        .collect();
    assert_eq!(weight_layers, linear_layers.iter().map(String::as_str).collect());
    let s = t.summary();
    assert_eq!(s.bytes_released, out.iter().map(|r| r.bytes).sum::<u64>());
    assert!(s.bytes_returned > 0);
    // The device counts every operand it receives; a released tensor used by two device calls
    // (dy for both backward passes) is sent twice but recorded once.
    assert!(r.report().device_bytes_sent >= s.bytes_released);
}

#[test]
fn gpu_only_splits_batches_across_several_devices() {
    one_thread(|| {
        let (reference, ref_losses) =
            train(&mut plaintext::runner(Arc::new(Transcript::new())).unwrap(), "lenet5", &[1, 28, 28], 3);
        let t = Arc::new(Transcript::keeping_records());
        let devices = vec![cpu_device(), cpu_device(), cpu_device()];
        let mut r = gpu_only::runner(devices, 96 << 20, t.clone()).unwrap();
        let (m, losses) = train(&mut r, "lenet5", &[1, 28, 28], 3);
        for (a, b) in losses.iter().zip(&ref_losses) {
            assert!((a - b).abs() <= 1e-5 * b.abs().max(1.0), "loss {a} vs plaintext {b}");
        }
        // Weight gradients are summed over shards, so only float reordering separates the runs.
        let d = max_relative_difference(&reference, &m);
        assert!(d < 1e-5, "weights differ from plaintext by {d}");
        // The first layer's input went out as three shards of the batch of 6.
        let recs = t.records().unwrap();
        let first: Vec<_> =
            recs.iter().filter(|r| r.info.layer == "layers.0" && r.info.kind == "input").take(3).collect();
        assert_eq!(first.iter().map(|r| r.info.shape[0]).collect::<Vec<_>>(), vec![2, 2, 2]);
    });
}
