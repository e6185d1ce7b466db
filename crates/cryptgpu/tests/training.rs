//! End to end: a model trained on shares by three in-process parties against the same model in
//! plaintext (the zoo's layer code, in f32): logits, and the weights after one SGD step.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use trustsplit_cryptgpu::model::{Sgd, DEFAULT_ACTIVATION_BOUND};
use trustsplit_cryptgpu::ring::FixedPoint;
use trustsplit_cryptgpu::session::{RunSettings, Session};
use trustsplit_nn::layers::{Conv2d, Layer, Linear, Pool, Residual};
use trustsplit_nn::tensor::{data, from_vec};
use trustsplit_nn::{Mode, Model, Tensor};

fn random(rng: &mut ChaCha8Rng, shape: &[usize], scale: f32) -> Tensor {
    let n = shape.iter().product();
    from_vec(shape, (0..n).map(|_| rng.random_range(-scale..scale)).collect())
}

fn conv(rng: &mut ChaCha8Rng, out: usize, cin: usize, k: usize, stride: usize, padding: usize) -> Layer {
    let scale = (3.0 / (cin * k * k) as f32).sqrt();
    Layer::Conv2d(Conv2d {
        weight: random(rng, &[out, cin, k, k], scale),
        bias: Some(random(rng, &[out], 0.1)),
        stride,
        padding,
    })
}

/// Every layer kind that trains on shares: convolutions (padded, strided), ReLU, max and average
/// pooling, a residual block, flatten, linear.
fn small_model(rng: &mut ChaCha8Rng) -> Model {
    let layers = vec![
        conv(rng, 4, 2, 3, 1, 1),
        Layer::Relu,
        Layer::MaxPool(Pool { kernel: 2, stride: 2, padding: 0 }),
        Layer::Residual(Residual {
            main: vec![conv(rng, 4, 4, 3, 1, 1), Layer::Relu, conv(rng, 4, 4, 3, 1, 1)],
            shortcut: vec![],
        }),
        Layer::Relu,
        conv(rng, 6, 4, 3, 2, 1),
        Layer::Relu,
        Layer::AvgPool(Pool { kernel: 2, stride: 2, padding: 0 }),
        Layer::Flatten,
        Layer::Linear(Linear { weight: random(rng, &[5, 6], 0.7), bias: Some(random(rng, &[5], 0.1)) }),
    ];
    Model::new("small", &[2, 8, 8], layers).unwrap()
}

/// `(softmax(logits) - onehot) / N`, in f64.
fn loss_gradient(logits: &Tensor, labels: &[usize]) -> Tensor {
    let (n, c) = (logits.shape()[0], logits.shape()[1]);
    let mut out = Vec::with_capacity(n * c);
    for (row, &label) in data(logits).chunks(c).zip(labels) {
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let sum: f64 = row.iter().map(|&v| (v as f64 - max).exp()).sum();
        for (j, &v) in row.iter().enumerate() {
            let p = (v as f64 - max).exp() / sum;
            out.push(((p - f64::from(j == label)) / n as f64) as f32);
        }
    }
    from_vec(&[n, c], out)
}

#[test]
fn one_training_step_on_shares_matches_plaintext() {
    let mut rng = ChaCha8Rng::seed_from_u64(11);
    let model = small_model(&mut rng);
    let n = 6;
    let x = random(&mut rng, &[n, 2, 8, 8], 1.0);
    let labels: Vec<usize> = (0..n).map(|_| rng.random_range(0..5)).collect();

    // Plaintext: logits, gradients, and one SGD step (no momentum state yet: v = g + wd w).
    let (lr, wd) = (0.5, 0.01);
    let mut plain = model.clone();
    let (logits, saved) = plain.forward(&x, Mode::Train).unwrap();
    let grads = plain.backward(&loss_gradient(&logits, &labels), saved);
    let expected: Vec<Vec<f32>> = plain
        .params_mut()
        .iter()
        .zip(&grads)
        .map(|(w, g)| data(w).iter().zip(data(g)).map(|(w, g)| w - lr * (g + wd * w)).collect())
        .collect();

    let mut session = Session::local(
        &model,
        None,
        RunSettings {
            fp: FixedPoint::default(),
            sgd: Sgd { lr: 0.0, momentum: 0.9, weight_decay: wd as f64 },
            activation_bound: DEFAULT_ACTIVATION_BOUND,
            uploaded: None,
        },
    )
    .unwrap();
    let shared_logits = session.infer(data(&x), x.shape()).unwrap();
    for (a, b) in shared_logits.values.iter().zip(data(&logits)) {
        assert!((a - b).abs() < 2e-3, "logit {a} on shares, {b} in plaintext");
    }
    let step_logits = session.train_step(data(&x), x.shape(), &labels, lr as f64).unwrap();
    assert_eq!(step_logits.values.len(), shared_logits.values.len());
    let mut trained = model.clone();
    let momentum = session.export(&mut trained).unwrap();
    // After one step the momentum buffer is the step's direction, g + wd w.
    for (i, ((v, w), g)) in momentum.iter().zip(model.clone().params_mut()).zip(&grads).enumerate() {
        for ((a, w), g) in data(v).iter().zip(data(w)).zip(data(g)) {
            assert!((a - (g + wd * w)).abs() < 2e-3, "momentum {i}: {a} on shares, {} in plaintext", g + wd * w);
        }
    }
    for (i, (w, e)) in trained.params_mut().iter().zip(&expected).enumerate() {
        for (a, b) in data(w).iter().zip(e) {
            assert!((a - b).abs() < 2e-3, "parameter {i}: {a} on shares, {b} in plaintext");
        }
    }
    let stats = session.stats().unwrap();
    assert!(stats.iter().all(|s| s.total.bytes_sent > 0 && s.total.rounds > 0));
    session.finish().unwrap();
}
