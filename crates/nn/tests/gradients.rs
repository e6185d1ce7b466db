//! Layer and model backward passes against central finite differences.
//!
//! The forward passes run in f32, so differences are taken along random directions with a
//! step large enough for f32 and the loss accumulated in f64; the kernels' own tests check each
//! backward kernel against f64 references to much tighter tolerances.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use trustsplit_nn::layers::{BatchNorm, Conv2d, Layer, Linear, Pool, Residual};
use trustsplit_nn::tensor::{data, from_vec, Tensor};
use trustsplit_nn::{Mode, Model};

fn random(rng: &mut ChaCha8Rng, shape: &[usize]) -> Tensor {
    let n = shape.iter().product();
    from_vec(shape, (0..n).map(|_| rng.random_range(-1.0f32..1.0)).collect())
}

/// `<r, model(x)>` with the model's current parameters, in training mode but without letting
/// batch-norm's running statistics drift between evaluations.
fn probe(model: &Model, x: &Tensor, r: &Tensor) -> f64 {
    let mut m = model.clone();
    let (y, _) = m.forward(x, Mode::Train).unwrap();
    data(&y).iter().zip(data(r)).map(|(&a, &b)| a as f64 * b as f64).sum()
}

/// Checks input and parameter gradients of `model` along random directions.
fn check_model(mut model: Model, batch: usize, seed: u64) {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let in_shape: Vec<usize> = std::iter::once(batch).chain(model.input_shape.iter().copied()).collect();
    let x = random(&mut rng, &in_shape);
    let r = random(&mut rng, &[batch, model.num_classes]);
    let (_, saved) = model.clone().forward(&x, Mode::Train).unwrap();
    let (dx, grads) = trustsplit_nn::layers::backward_all(&model.layers, &r, saved);
    let h = 1e-3f32;
    for trial in 0..3 {
        // Input direction.
        let d = random(&mut rng, &in_shape);
        let want = (probe(&model, &(&x + &(&d * h)), &r) - probe(&model, &(&x - &(&d * h)), &r)) / (2.0 * h as f64);
        let got: f64 = data(&dx).iter().zip(data(&d)).map(|(&a, &b)| a as f64 * b as f64).sum();
        assert_close(&format!("{} dx trial {trial}", model.name), got, want);
        // Parameter direction (all parameters at once).
        let dirs: Vec<Tensor> = model.named_params().iter().map(|(_, p)| random(&mut rng, p.shape())).collect();
        let shifted = |model: &mut Model, sign: f32| {
            let mut m = model.clone();
            for (p, d) in m.params_mut().into_iter().zip(&dirs) {
                *p = &*p + &(d * (sign * h));
            }
            m
        };
        let want =
            (probe(&shifted(&mut model, 1.0), &x, &r) - probe(&shifted(&mut model, -1.0), &x, &r)) / (2.0 * h as f64);
        let got: f64 = grads
            .iter()
            .zip(&dirs)
            .map(|(g, d)| data(g).iter().zip(data(d)).map(|(&a, &b)| a as f64 * b as f64).sum::<f64>())
            .sum();
        assert_close(&format!("{} dparams trial {trial}", model.name), got, want);
    }
}

fn assert_close(what: &str, got: f64, want: f64) {
    let err = (got - want).abs() / want.abs().max(1e-2);
    assert!(err < 2e-2, "{what}: analytic {got}, finite difference {want} (relative error {err:.2e})");
}

fn conv(rng: &mut ChaCha8Rng, cout: usize, cin: usize, k: usize, stride: usize, padding: usize) -> Layer {
    Layer::Conv2d(Conv2d { weight: random(rng, &[cout, cin, k, k]), bias: Some(random(rng, &[cout])), stride, padding })
}

fn linear(rng: &mut ChaCha8Rng, out: usize, inp: usize) -> Layer {
    Layer::Linear(Linear { weight: random(rng, &[out, inp]), bias: Some(random(rng, &[out])) })
}

fn bn(rng: &mut ChaCha8Rng, c: usize) -> Layer {
    let mut b = BatchNorm::new(c);
    b.gamma = &random(rng, &[c]) + 1.5;
    b.beta = random(rng, &[c]);
    Layer::BatchNorm(b)
}

#[test]
fn conv_linear_model() {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    let layers = vec![conv(&mut rng, 4, 2, 3, 2, 1), Layer::Flatten, linear(&mut rng, 3, 4 * 4 * 3)];
    check_model(Model::new("conv-linear", &[2, 7, 6], layers).unwrap(), 3, 10);
}

#[test]
fn batchnorm_2d_and_1d() {
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    let layers = vec![
        conv(&mut rng, 3, 2, 3, 1, 0),
        bn(&mut rng, 3),
        Layer::Flatten,
        linear(&mut rng, 5, 3 * 3 * 3),
        bn(&mut rng, 5),
        linear(&mut rng, 2, 5),
    ];
    check_model(Model::new("bn", &[2, 5, 5], layers).unwrap(), 4, 11);
}

#[test]
fn relu_and_pooling() {
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let layers = vec![
        conv(&mut rng, 3, 1, 3, 1, 1),
        Layer::Relu,
        Layer::MaxPool(Pool { kernel: 2, stride: 2, padding: 0 }),
        Layer::AvgPool(Pool { kernel: 3, stride: 1, padding: 1 }),
        Layer::Flatten,
        linear(&mut rng, 4, 3 * 4 * 4),
    ];
    check_model(Model::new("relu-pool", &[1, 8, 9], layers).unwrap(), 2, 12);
}

#[test]
fn residual_blocks_with_and_without_projection() {
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    let identity =
        Layer::Residual(Residual { main: vec![conv(&mut rng, 3, 3, 3, 1, 1), bn(&mut rng, 3)], shortcut: vec![] });
    let projection = Layer::Residual(Residual {
        main: vec![conv(&mut rng, 4, 3, 3, 2, 1), bn(&mut rng, 4), Layer::Relu, conv(&mut rng, 4, 4, 3, 1, 1)],
        shortcut: vec![conv(&mut rng, 4, 3, 1, 2, 0), bn(&mut rng, 4)],
    });
    let layers = vec![identity, Layer::Relu, projection, Layer::Flatten, linear(&mut rng, 3, 4 * 3 * 3)];
    check_model(Model::new("residual", &[3, 6, 6], layers).unwrap(), 3, 13);
}

#[test]
fn saved_contexts_survive_encoding() {
    // Backward from decoded contexts gives exactly the same gradients as from the originals.
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let block = Layer::Residual(Residual {
        main: vec![conv(&mut rng, 3, 2, 3, 1, 1), bn(&mut rng, 3), Layer::Relu],
        shortcut: vec![conv(&mut rng, 3, 2, 1, 1, 0)],
    });
    let layers =
        vec![block, Layer::MaxPool(Pool { kernel: 2, stride: 2, padding: 0 }), Layer::Flatten, linear(&mut rng, 2, 12)];
    let mut model = Model::new("codec", &[2, 4, 4], layers).unwrap();
    let x = random(&mut rng, &[3, 2, 4, 4]);
    let (y, saved) = model.forward(&x, Mode::Train).unwrap();
    let mut bytes = Vec::new();
    let decoded: Vec<trustsplit_nn::Saved> = saved
        .iter()
        .map(|s| {
            bytes.clear();
            s.encode(&mut bytes);
            assert_eq!(bytes.len(), s.encoded_len(), "{s:?}");
            trustsplit_nn::Saved::decode(&bytes).unwrap()
        })
        .collect();
    let (_, g1) = trustsplit_nn::layers::backward_all(&model.layers, &y, saved);
    let (_, g2) = trustsplit_nn::layers::backward_all(&model.layers, &y, decoded);
    assert_eq!(g1, g2);
    assert!(trustsplit_nn::Saved::decode(&bytes[..bytes.len() - 1]).unwrap_err().contains("truncated"));
    assert!(trustsplit_nn::Saved::decode(&[99]).unwrap_err().contains("unknown"));

    // A scheme's own context (a list of tensors) round-trips value for value.
    let list = vec![random(&mut rng, &[3, 2]), random(&mut rng, &[2, 1, 5])];
    bytes.clear();
    trustsplit_nn::Saved::Tensors(list.clone()).encode(&mut bytes);
    assert_eq!(bytes.len(), trustsplit_nn::Saved::Tensors(list.clone()).encoded_len());
    match trustsplit_nn::Saved::decode(&bytes).unwrap() {
        trustsplit_nn::Saved::Tensors(back) => assert_eq!(back, list),
        other => panic!("decoded {other:?}"),
    }
    bytes.clear();
    trustsplit_nn::Saved::Nothing.encode(&mut bytes);
    assert_eq!(bytes.len(), trustsplit_nn::Saved::Nothing.encoded_len());
    // A ReLU mask whose length does not fit its shape (120 values need 4 words) is refused.
    bytes.clear();
    trustsplit_nn::Saved::Positive { mask: vec![7; 3], shape: vec![3, 40] }.encode(&mut bytes);
    let err = trustsplit_nn::Saved::decode(&bytes).unwrap_err();
    assert!(err.contains("mask of 3 words for 120 values"), "{err}");
}

#[test]
fn batchnorm_on_owned_tensors_matches_the_borrowing_passes() {
    // The owned passes keep the given input and write the input gradient over the given output
    // gradient instead of copying: same values, bit for bit.
    let mut rng = ChaCha8Rng::seed_from_u64(21);
    let mut a = bn(&mut rng, 5);
    let mut b = a.clone();
    let x = random(&mut rng, &[3, 5, 4, 6]);
    let dy = random(&mut rng, &[3, 5, 4, 6]);
    let (ya, sa) = a.forward(&x, Mode::Train);
    let (yb, sb) = b.forward_owned(x.clone(), Mode::Train);
    assert_eq!(ya, yb);
    let (dxa, ga) = a.backward(&dy, sa);
    let (dxb, gb) = b.backward_owned(dy.clone(), sb);
    assert_eq!(dxa, dxb);
    assert_eq!(ga, gb);
    assert!(data(&dxa).iter().any(|&v| v != 0.0) && dxa != dy);
}
