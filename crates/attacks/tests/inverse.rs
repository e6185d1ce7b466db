//! The learned inverse recovers images from releases that keep them, and not from releases that
//! do not.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use trustsplit_attacks::inverse::{resize_nearest, InverseNetwork, InverseSettings, Pairs};
use trustsplit_attacks::metrics::psnr;

/// Smooth random images in [0, 1]: a few random sinusoids.
fn images(rng: &mut ChaCha8Rng, n: usize, side: usize) -> Vec<Vec<f32>> {
    (0..n)
        .map(|_| {
            let waves: Vec<[f32; 4]> = (0..3)
                .map(|_| {
                    [
                        rng.random_range(0.1..0.6),
                        rng.random_range(0.1..0.6),
                        rng.random_range(0.0..6.3),
                        rng.random_range(0.05..0.2),
                    ]
                })
                .collect();
            (0..side * side)
                .map(|k| {
                    let (i, j) = ((k / side) as f32, (k % side) as f32);
                    (0.5 + waves.iter().map(|[a, b, p, amp]| amp * (a * i + b * j + p).sin()).sum::<f32>())
                        .clamp(0.0, 1.0)
                })
                .collect()
        })
        .collect()
}

fn mean_psnr(a: &[Vec<f32>], b: &[Vec<f32>]) -> f64 {
    a.iter().zip(b).map(|(x, y)| psnr(x, y)).sum::<f64>() / a.len() as f64
}

#[test]
fn the_inverse_learns_an_informative_release_and_gains_nothing_from_noise() {
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let side = 12;
    let public = images(&mut rng, 256, side);
    let private = images(&mut rng, 32, side);
    let settings = InverseSettings { steps: 600, batch_size: 16, lr: 2e-3, width: 16, seed: 1 };
    let fit = |release: &dyn Fn(&[f32], &mut ChaCha8Rng) -> Vec<f32>, shape: [usize; 3], rng: &mut ChaCha8Rng| {
        let pairs = Pairs {
            release_shape: shape,
            image_shape: [1, side, side],
            releases: public.iter().map(|x| release(x, rng)).collect(),
            images: public.clone(),
        };
        let mut net = InverseNetwork::train(&pairs, settings).unwrap();
        let seen: Vec<Vec<f32>> = private.iter().map(|x| release(x, rng)).collect();
        mean_psnr(&private, &net.reconstruct(&seen).unwrap())
    };
    // What knowing nothing gives: the public mean image.
    let mean: Vec<f32> =
        (0..side * side).map(|k| public.iter().map(|x| x[k]).sum::<f32>() / public.len() as f32).collect();
    let chance = mean_psnr(&private, &vec![mean; private.len()]);

    let identity = fit(&|x, _| x.to_vec(), [1, side, side], &mut rng);
    let scaled_noisy =
        fit(&|x, r| x.iter().map(|v| 3.0 * v - 1.0 + r.random_range(-0.05..0.05)).collect(), [1, side, side], &mut rng);
    let quarter =
        fit(&|x, _| resize_nearest(x, [1, side, side], side / 4, side / 4), [1, side / 4, side / 4], &mut rng);
    let pure_noise =
        fit(&|_, r| (0..side * side).map(|_| r.random_range(-1.0..1.0)).collect(), [1, side, side], &mut rng);
    assert!(identity > 25.0 && identity > chance + 10.0, "identity {identity:.1} dB, chance {chance:.1}");
    assert!(scaled_noisy > chance + 8.0, "scaled and noisy {scaled_noisy:.1} dB, chance {chance:.1}");
    assert!(
        quarter > chance + 3.0 && quarter < identity - 2.0,
        "quarter resolution {quarter:.1} dB, identity {identity:.1}"
    );
    assert!((pure_noise - chance).abs() < 2.0, "noise alone {pure_noise:.1} dB, chance {chance:.1}");
}

#[test]
fn mismatched_pairs_are_refused() {
    let pairs = Pairs {
        release_shape: [1, 4, 4],
        image_shape: [1, 4, 4],
        releases: vec![vec![0.5; 16]],
        images: vec![vec![0.5; 15]],
    };
    assert!(InverseNetwork::train(&pairs, InverseSettings::default()).is_err());
    let empty = Pairs { release_shape: [1, 4, 4], image_shape: [1, 4, 4], releases: vec![], images: vec![] };
    assert!(InverseNetwork::train(&empty, InverseSettings::default()).is_err());
}
