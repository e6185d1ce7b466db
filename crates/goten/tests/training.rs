//! Goten's placement in the runner against plaintext: a model with every path through a
//! convolution and a linear layer (strides, padding, batch-norm, pooling, a residual block) takes
//! SGD steps whose updates follow plaintext's within 8-bit quantisation error, and every value sent
//! to a server is a share or a mask, never an input, weight or gradient.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::sync::Arc;
use trustsplit_boundary::{Direction, Secret, Transcript};
use trustsplit_nn::layers::{BatchNorm, Conv2d, Layer, Linear, Pool, Residual};
use trustsplit_nn::optim::{Optimizer, OptimizerKind};
use trustsplit_nn::tensor::{data, from_vec};
use trustsplit_nn::{Model, Tensor};
use trustsplit_schemes::{plaintext, RunnerInputs, SplitRunner};

fn random(rng: &mut ChaCha8Rng, shape: &[usize], scale: f32) -> Tensor {
    let n = shape.iter().product();
    from_vec(shape, (0..n).map(|_| rng.random_range(-scale..scale)).collect())
}

fn conv(rng: &mut ChaCha8Rng, out: usize, cin: usize, k: usize, stride: usize, bias: bool) -> Layer {
    let scale = (3.0 / (cin * k * k) as f32).sqrt();
    Layer::Conv2d(Conv2d {
        weight: random(rng, &[out, cin, k, k], scale),
        bias: bias.then(|| random(rng, &[out], 0.1)),
        stride,
        padding: k / 2,
    })
}

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
        Layer::Linear(Linear { weight: random(rng, &[10, 12 * 9], 0.3), bias: Some(random(rng, &[10], 0.1)) }),
    ];
    Model::new("small", &[3, 12, 12], layers).unwrap()
}

fn params(m: &mut Model) -> Vec<Vec<f32>> {
    m.params_mut().iter().map(|p| data(p).to_vec()).collect()
}

/// One SGD step from the same model and batch; the parameters' updates.
fn update(runner: &mut SplitRunner, seed: u64) -> Vec<Vec<f32>> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut model = small_model(&mut rng);
    let before = params(&mut model);
    let mut opt = Optimizer::new(OptimizerKind::Sgd { momentum: 0.0, nesterov: false }, 0.0);
    let x = random(&mut rng, &[6, 3, 12, 12], 1.0);
    let y: Vec<usize> = (0..6).map(|_| rng.random_range(0..10)).collect();
    runner.train_step(&mut model, Secret::new(x), &Secret::new(y), &mut opt, 0.1).unwrap();
    params(&mut model).iter().zip(&before).map(|(a, b)| a.iter().zip(b).map(|(a, b)| a - b).collect()).collect()
}

fn inputs(transcript: Arc<Transcript>) -> RunnerInputs<'static> {
    RunnerInputs { devices: Vec::new(), memory_budget: 96 << 20, transcript, training: None }
}

#[test]
fn a_step_on_shares_follows_plaintexts_step_and_sends_only_shares() {
    let transcript = Arc::new(Transcript::keeping_records());
    let mut goten = trustsplit_goten::scheme::build(inputs(transcript.clone()), &Default::default()).unwrap();
    let mut plain = plaintext::build(inputs(Arc::new(Transcript::new()))).unwrap();
    for seed in [1, 2] {
        let (g, p) = (update(&mut goten, seed), update(&mut plain, seed));
        for (i, (g, p)) in g.iter().zip(&p).enumerate() {
            // Relative error of the whole update of each parameter, and its direction.
            let norm = |v: &[f32]| v.iter().map(|x| (*x as f64).powi(2)).sum::<f64>().sqrt();
            let diff: Vec<f32> = g.iter().zip(p).map(|(a, b)| a - b).collect();
            let (rel, dot) =
                (norm(&diff) / norm(p), g.iter().zip(p).map(|(a, b)| (*a as f64) * (*b as f64)).sum::<f64>());
            let cosine = dot / (norm(g) * norm(p));
            if norm(p) < 1e-6 {
                // A bias before batch-norm: its gradient is zero up to rounding, in both.
                continue;
            }
            // 8-bit operands with stochastic rounding: 1-30% off, in the same direction (a
            // product wired wrongly would point anywhere: cosine near 0).
            assert!(rel < 0.5 && cosine > 0.9, "seed {seed}, parameter {i}: relative error {rel}, cosine {cosine}");
        }
    }
    let records = transcript.records().unwrap();
    assert!(!records.is_empty());
    for r in records.iter().filter(|r| r.direction == Direction::TeeToDevice) {
        let k = r.info.kind.as_str();
        let allowed = ["A0", "B0", "E", "F", "CM0", "A1", "B1", "CM1", "U", "V", "CMZ"];
        let name = k.split_once(": ").map(|(_, n)| n).unwrap_or(k);
        assert!(k.starts_with("server ") && allowed.contains(&name), "released {k} of {}", r.info.layer);
    }
}
