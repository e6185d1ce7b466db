//! The learned inverse: a small convolutional network, trained on public data, that maps what the
//! device saw back to the input image.
//!
//! The attacker is granted the strongest realistic prior (the and AsymML's paper's setting,
//! `../shared/research/asymml.md` §6.3): public images from the same distribution and the
//! scheme's code, so it can make its own pairs (public image, what the device would see of it).
//! It learns the inverse of that release on the pairs and applies it to the recorded release.
//! The release is resized to the image's height and width (nearest neighbour) and standardised per
//! channel with the public releases' statistics; the network is four 3 x 3 convolutions (32
//! channels, ReLU between), trained with Adam on the mean squared error.

use rand::seq::SliceRandom;
use rand::SeedableRng;
use rand_chacha::ChaCha8Rng;
use rand_distr::{Distribution, Normal};
use trustsplit_nn::layers::{backward_all, forward_all, Conv2d, Layer, Mode};
use trustsplit_nn::optim::{Optimizer, OptimizerKind};
use trustsplit_nn::tensor::{data, from_vec};
use trustsplit_nn::Tensor;

/// `channels x height x width`.
pub type Shape3 = [usize; 3];

/// Releases and the images they came from, one sample per entry.
pub struct Pairs {
    pub release_shape: Shape3,
    pub image_shape: Shape3,
    pub releases: Vec<Vec<f32>>,
    pub images: Vec<Vec<f32>>,
}

/// How long and how the inverse trains.
#[derive(Clone, Copy, Debug)]
pub struct InverseSettings {
    pub steps: usize,
    pub batch_size: usize,
    pub lr: f32,
    pub width: usize,
    pub seed: u64,
}

impl Default for InverseSettings {
    fn default() -> Self {
        InverseSettings { steps: 600, batch_size: 32, lr: 1e-3, width: 32, seed: 0 }
    }
}

/// A trained inverse network.
pub struct InverseNetwork {
    layers: Vec<Layer>,
    release_shape: Shape3,
    image_shape: Shape3,
    mean: Vec<f32>,
    std: Vec<f32>,
    /// The mean squared error on the last training batches (for the report).
    pub final_loss: f32,
}

/// Nearest-neighbour resize of one `c x h x w` sample to `c x out_h x out_w`.
pub fn resize_nearest(x: &[f32], [c, h, w]: Shape3, out_h: usize, out_w: usize) -> Vec<f32> {
    let mut y = Vec::with_capacity(c * out_h * out_w);
    for ch in 0..c {
        for i in 0..out_h {
            let si = i * h / out_h;
            for j in 0..out_w {
                y.push(x[(ch * h + si) * w + j * w / out_w]);
            }
        }
    }
    y
}

fn conv(rng: &mut ChaCha8Rng, out: usize, inp: usize) -> Layer {
    // He initialisation for the ReLU layers.
    let scale = (2.0 / (inp * 9) as f32).sqrt();
    let normal = Normal::new(0.0, scale).expect("a positive scale");
    let values = (0..out * inp * 9).map(|_| normal.sample(rng)).collect();
    Layer::Conv2d(Conv2d {
        weight: from_vec(&[out, inp, 3, 3], values),
        bias: Some(from_vec(&[out], vec![0.0; out])),
        stride: 1,
        padding: 1,
    })
}

impl InverseNetwork {
    /// Trains on `pairs` (at least one).
    pub fn train(pairs: &Pairs, settings: InverseSettings) -> Result<InverseNetwork, String> {
        if pairs.releases.is_empty() || pairs.releases.len() != pairs.images.len() {
            return Err(format!("{} releases and {} images to learn from", pairs.releases.len(), pairs.images.len()));
        }
        let [rc, rh, rw] = pairs.release_shape;
        let [c, h, w] = pairs.image_shape;
        for (r, x) in pairs.releases.iter().zip(&pairs.images) {
            if r.len() != rc * rh * rw || x.len() != c * h * w {
                return Err("a pair's sizes differ from its shapes".into());
            }
        }
        // Per-channel statistics of the public releases.
        let plane = rh * rw;
        let (mut mean, mut std) = (vec![0.0f32; rc], vec![0.0f32; rc]);
        for ch in 0..rc {
            let values = pairs.releases.iter().flat_map(|r| &r[ch * plane..(ch + 1) * plane]);
            let (s, s2, n) =
                values.fold((0.0f64, 0.0f64, 0usize), |(s, s2, n), &v| (s + v as f64, s2 + (v as f64).powi(2), n + 1));
            let m = s / n as f64;
            mean[ch] = m as f32;
            std[ch] = ((s2 / n as f64 - m * m).max(0.0).sqrt() as f32).max(1e-6);
        }
        let mut rng = ChaCha8Rng::seed_from_u64(settings.seed);
        let k = settings.width;
        let layers = vec![
            conv(&mut rng, k, rc),
            Layer::Relu,
            conv(&mut rng, k, k),
            Layer::Relu,
            conv(&mut rng, k, k),
            Layer::Relu,
            conv(&mut rng, c, k),
        ];
        let mut net = InverseNetwork {
            layers,
            release_shape: pairs.release_shape,
            image_shape: pairs.image_shape,
            mean,
            std,
            final_loss: f32::NAN,
        };
        let mut opt = Optimizer::new(OptimizerKind::Adam { beta1: 0.9, beta2: 0.999, eps: 1e-8 }, 0.0);
        let mut order: Vec<usize> = (0..pairs.images.len()).collect();
        let mut cursor = order.len();
        let mut recent = Vec::new();
        for _ in 0..settings.steps {
            let mut batch = Vec::with_capacity(settings.batch_size);
            while batch.len() < settings.batch_size.min(order.len()) {
                if cursor == order.len() {
                    order.shuffle(&mut rng);
                    cursor = 0;
                }
                batch.push(order[cursor]);
                cursor += 1;
            }
            let input = net.input(batch.iter().map(|&i| pairs.releases[i].as_slice()));
            let target: Vec<f32> = batch.iter().flat_map(|&i| pairs.images[i].iter().copied()).collect();
            let (y, saved) = forward_all(&mut net.layers, &input, Mode::Train);
            let count = target.len() as f32;
            let diff: Vec<f32> = data(&y).iter().zip(&target).map(|(a, b)| a - b).collect();
            let loss = diff.iter().map(|d| d * d).sum::<f32>() / count;
            if !loss.is_finite() {
                return Err(format!("the inverse network diverged (loss {loss})"));
            }
            recent.push(loss);
            let grad = from_vec(y.shape(), diff.iter().map(|d| 2.0 * d / count).collect());
            let (_, grads) = backward_all(&net.layers, &grad, saved);
            let params = net.layers.iter_mut().flat_map(Layer::params_mut).collect();
            opt.step(params, &grads, settings.lr).map_err(|i| format!("gradient {i} is not finite"))?;
        }
        let tail = &recent[recent.len().saturating_sub(20)..];
        net.final_loss = tail.iter().sum::<f32>() / tail.len().max(1) as f32;
        Ok(net)
    }

    /// The network's input for these releases: resized and standardised.
    fn input<'a>(&self, releases: impl Iterator<Item = &'a [f32]>) -> Tensor {
        let [rc, rh, rw] = self.release_shape;
        let [_, h, w] = self.image_shape;
        let mut values = Vec::new();
        let mut n = 0;
        for r in releases {
            let resized = resize_nearest(r, [rc, rh, rw], h, w);
            for (i, v) in resized.into_iter().enumerate() {
                let ch = i / (h * w);
                values.push((v - self.mean[ch]) / self.std[ch]);
            }
            n += 1;
        }
        from_vec(&[n, rc, h, w], values)
    }

    /// Reconstructs one image per release.
    pub fn reconstruct(&mut self, releases: &[Vec<f32>]) -> Result<Vec<Vec<f32>>, String> {
        let per = self.image_shape.iter().product::<usize>();
        let mut out = Vec::with_capacity(releases.len());
        for chunk in releases.chunks(64) {
            let input = self.input(chunk.iter().map(Vec::as_slice));
            let (y, _) = forward_all(&mut self.layers, &input, Mode::Eval);
            out.extend(data(&y).chunks(per).map(<[f32]>::to_vec));
        }
        Ok(out)
    }
}
