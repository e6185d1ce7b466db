//! The optimisation-based inversion on a known prefix (a random convolution, ReLU and pooling):
//! from the layer's output it finds smooth images again (26 dB when written), and from its
//! projection onto four of its six channels too; from a release unrelated to the images it does
//! not (8 dB).

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use trustsplit_attacks::metrics::psnr;
use trustsplit_attacks::optimise::{invert, prefix_to, ReleaseModel, SearchSettings};
use trustsplit_nn::layers::{Conv2d, Layer, Mode, Pool};
use trustsplit_nn::tensor::{data, from_vec};

const IMAGE: [usize; 3] = [1, 12, 12];

/// Smooth random images in [0, 1]: a few random blobs each.
fn images(rng: &mut ChaCha8Rng, n: usize) -> Vec<Vec<f32>> {
    (0..n)
        .map(|_| {
            let blobs: Vec<(f32, f32, f32)> = (0..3)
                .map(|_| (rng.random_range(0.0..12.0), rng.random_range(0.0..12.0), rng.random_range(0.3..1.0)))
                .collect();
            (0..144)
                .map(|k| {
                    let (i, j) = ((k / 12) as f32, (k % 12) as f32);
                    blobs
                        .iter()
                        .map(|&(a, b, h)| h * (-((i - a).powi(2) + (j - b).powi(2)) / 8.0).exp())
                        .sum::<f32>()
                        .min(1.0)
                })
                .collect()
        })
        .collect()
}

fn conv(rng: &mut ChaCha8Rng, cin: usize, out: usize) -> Layer {
    let scale = (2.0 / (cin * 9) as f32).sqrt();
    let weight = (0..out * cin * 9).map(|_| rng.random_range(-1.0f32..1.0) * scale).collect();
    Layer::Conv2d(Conv2d {
        weight: from_vec(&[out, cin, 3, 3], weight),
        bias: Some(from_vec(&[out], vec![0.05; out])),
        stride: 1,
        padding: 1,
    })
}

fn prefix(rng: &mut ChaCha8Rng) -> Vec<Layer> {
    let first = conv(rng, 1, 6);
    vec![first, Layer::Relu, Layer::MaxPool(Pool { kernel: 2, stride: 2, padding: 0 }), conv(rng, 6, 8)]
}

#[test]
fn finds_the_images_from_the_layer_s_output_and_from_its_residual() {
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let mut layers = prefix(&mut rng);
    let release = [6, 6, 6];
    let cut = prefix_to(&mut layers, IMAGE, release).expect("the second convolution takes 6 x 6 x 6");
    assert_eq!(cut, 3);
    let prefix = &mut layers[..cut];
    let originals = images(&mut rng, 4);
    let x = from_vec(&[4, 1, 12, 12], originals.concat());
    let (a, _) = trustsplit_nn::layers::forward_all(prefix, &x, Mode::Eval);
    let outputs: Vec<Vec<f32>> = data(&a).chunks(216).map(<[f32]>::to_vec).collect();
    let start = vec![0.3f32; 144];
    let bounds = (&[0.0f32][..], &[1.0f32][..]);
    let settings = SearchSettings { steps: 2000, ..SearchSettings::default() };
    let score = |found: &[Vec<f32>]| originals.iter().zip(found).map(|(o, f)| psnr(o, f)).sum::<f64>() / 4.0;

    let (found, distance) =
        invert(prefix, IMAGE, release, &outputs, &ReleaseModel::Exact, &start, bounds, settings).unwrap();
    assert!(distance < 0.01, "cosine distance {distance}");
    assert!(score(&found) > 24.0, "exact release: {} dB", score(&found));

    // Channels 2-5 only: the projection drops the first two.
    let mut v = vec![0f32; 6 * 4];
    (0..4).for_each(|j| v[(j + 2) * 4 + j] = 1.0);
    let onto = |_: &[f32]| Ok(v.clone());
    let residuals: Vec<Vec<f32>> = outputs
        .iter()
        .map(|o| {
            let mut r = o.clone();
            r[..72].iter_mut().for_each(|x| *x = 0.0);
            r
        })
        .collect();
    let model = ReleaseModel::Projection { onto: &onto };
    let (found, _) = invert(prefix, IMAGE, release, &residuals, &model, &start, bounds, settings).unwrap();
    assert!(score(&found) > 19.0, "projected release: {} dB", score(&found));

    // Unrelated releases (uniform noise) lead nowhere near the images.
    let noise: Vec<Vec<f32>> = (0..4).map(|_| (0..216).map(|_| rng.random_range(-1.0..1.0)).collect()).collect();
    let (found, _) = invert(prefix, IMAGE, release, &noise, &ReleaseModel::Exact, &start, bounds, settings).unwrap();
    assert!(score(&found) < 12.0, "noise release: {} dB", score(&found));
}
