//! The model zoo builds, has the expected sizes, and runs forward and backward.

use trustsplit_nn::tensor::{from_vec, zeros};
use trustsplit_nn::{zoo, Layer, Mode};

#[test]
fn every_model_builds_with_expected_output() {
    for name in zoo::MODEL_NAMES {
        let input = if zoo::required_input_size(name).is_some() { [3, 32, 32] } else { [1, 28, 28] };
        let m = zoo::build(name, &input, 10, 0).unwrap();
        assert_eq!(m.num_classes, 10, "{name}");
        assert!(m.num_params() > 0);
    }
    assert!(zoo::build("vgg12", &[3, 32, 32], 10, 0).unwrap_err().contains("unknown model"));
}

#[test]
fn parameter_counts_match_the_standard_architectures() {
    // LeNet-5 on 28x28 with a padded first conv: the classic 61,706.
    assert_eq!(zoo::build("lenet5", &[1, 28, 28], 10, 0).unwrap().num_params(), 61_706);
    // CIFAR ResNet-18 (kuangliu's variant, PyTorch-counted): 11,173,962.
    assert_eq!(zoo::build("resnet18", &[3, 32, 32], 10, 0).unwrap().num_params(), 11_173_962);
    // VGG-16: torchvision's convolutional part has 14,714,688 parameters; plus a 512x10 classifier.
    assert_eq!(zoo::build("vgg16", &[3, 32, 32], 10, 0).unwrap().num_params(), 14_714_688 + 5_130);
}

#[test]
fn cryptgpus_lenet_and_the_average_pooled_variants() {
    // conv 20@5x5 (520), conv 50@5x5 (25,050), FC 800x500 (400,500), FC 500x10 (5,010).
    assert_eq!(zoo::build("lenet", &[1, 28, 28], 10, 0).unwrap().num_params(), 431_080);
    let count = |m: &trustsplit_nn::Model, avg: bool| {
        m.layers
            .iter()
            .filter(|l| if avg { matches!(l, Layer::AvgPool(_)) } else { matches!(l, Layer::MaxPool(_)) })
            .count()
    };
    for name in ["lenet", "vgg16", "alexnet"] {
        let input = if zoo::required_input_size(name).is_some() { [3, 32, 32] } else { [1, 28, 28] };
        let max = zoo::build(name, &input, 10, 3).unwrap();
        let avg = zoo::build(&format!("{name}-avgpool"), &input, 10, 3).unwrap();
        assert!(zoo::is_known(&avg.name) && avg.name.ends_with("-avgpool"));
        assert_eq!((count(&avg, false), count(&avg, true)), (0, count(&max, false)), "{name}");
        // Same seed, same weights: only the pooling differs.
        assert_eq!(max.named_params()[0].1, avg.named_params()[0].1);
    }
    assert!(zoo::build("resnet18-avgpool", &[3, 32, 32], 10, 0).unwrap_err().contains("no max-pooling"));
    assert!(!zoo::is_known("lenet-maxpool"));
}

#[test]
fn initialisation_is_seeded() {
    let a = zoo::build("lenet5", &[1, 28, 28], 10, 5).unwrap();
    let b = zoo::build("lenet5", &[1, 28, 28], 10, 5).unwrap();
    let c = zoo::build("lenet5", &[1, 28, 28], 10, 6).unwrap();
    assert_eq!(a.named_params()[0].1, b.named_params()[0].1);
    assert_ne!(a.named_params()[0].1, c.named_params()[0].1);
    // Kaiming normal: std sqrt(2 / fan_in) for the first conv (fan_in 25).
    let w = a.named_params()[0].1;
    let std = (w.iter().map(|v| v * v).sum::<f32>() / w.len() as f32).sqrt();
    assert!((std - (2.0f32 / 25.0).sqrt()).abs() < 0.08, "std {std}");
}

#[test]
fn vgg16_and_resnet18_forward_backward_shapes() {
    for name in ["vgg16", "vgg16-bn", "resnet18"] {
        let mut m = zoo::build(name, &[3, 32, 32], 10, 1).unwrap();
        let x = from_vec(&[2, 3, 32, 32], (0..2 * 3 * 32 * 32).map(|i| ((i * 37) % 101) as f32 / 50.0 - 1.0).collect());
        let (y, saved) = m.forward(&x, Mode::Train).unwrap();
        assert_eq!(y.shape(), &[2, 10], "{name}");
        assert!(y.iter().all(|v| v.is_finite()));
        let grads = m.backward(&y, saved);
        let params = m.named_params();
        assert_eq!(grads.len(), params.len(), "{name}");
        for (g, (n, p)) in grads.iter().zip(&params) {
            assert_eq!(g.shape(), p.shape(), "{name} {n}");
        }
        assert!(grads.iter().any(|g| g.iter().any(|&v| v != 0.0)));
        let (e, _) = m.forward(&x, Mode::Eval).unwrap();
        assert_eq!(e.shape(), &[2, 10]);
    }
}

#[test]
fn wrong_input_shape_and_nan_are_rejected() {
    let mut m = zoo::build("lenet5", &[1, 28, 28], 10, 0).unwrap();
    let err = m.forward(&zeros(&[2, 3, 28, 28]), Mode::Eval).unwrap_err();
    assert!(err.contains("expects inputs of shape"), "{err}");
    let mut x = zeros(&[1, 1, 28, 28]);
    x[[0, 0, 3, 3]] = f32::NAN;
    assert!(m.forward(&x, Mode::Eval).unwrap_err().contains("NaN"));
}
