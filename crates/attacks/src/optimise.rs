//! Optimisation-based inversion: the attacker knows the layers in front of the released one (the
//! model's code, and its weights at the attacked step: the initial weights of a public seed on the
//! first step) and searches for the images whose release, computed through those layers, looks
//! like the one it recorded.
//!
//! Per sample the loss is the squared distance between the modelled release `r(f(x))` and the
//! recorded one over the latter's squared norm, or, where the scheme clips what it releases, the
//! cosine distance ([`SearchSettings::match_norm`]), plus a small total variation term (natural images are smooth); Adam on the image with a cosine-decaying step, kept
//! in the pixel range. The
//! release model `r` is the identity (gpu-only, and any scheme that sends the layer's input) or,
//! for AsymML, a projection onto a channel subspace: the residual after the sample's own top-r
//! subspace lies in the complement of that subspace, which the recorded residual itself shows (its
//! channel Gram matrix has r null directions, up to the noise), so the attacker projects `f(x)`
//! onto the span of the recorded residual's top `C - r` components, fixed per sample. (Recomputing
//! the top-r subspace from the estimate `f(x)` at every step instead, without its derivative, left
//! the search stuck at the mean image on LeNet-5.)

use trustsplit_nn::layers::{backward_all, forward_all, Layer, Mode};
use trustsplit_nn::optim::{Optimizer, OptimizerKind};
use trustsplit_nn::tensor::{data, from_vec};
use trustsplit_nn::Tensor;

use crate::inverse::Shape3;

/// How long and how hard the search runs.
#[derive(Clone, Copy, Debug)]
pub struct SearchSettings {
    pub steps: usize,
    pub lr: f32,
    /// Weight of the total-variation term against the distance.
    pub tv: f32,
    /// Match the release's norm too (squared distance over the target's squared norm), where the
    /// scheme releases values unscaled; otherwise only its direction (cosine distance), as where
    /// a release is clipped to a bound. Layers with ReLU and pooling and no bias are positively
    /// homogeneous, so a direction alone leaves each image's scale (about the normalised zero,
    /// the data's mean) open: the search then fits it to `start`, the attacker's prior.
    pub match_norm: bool,
}

impl Default for SearchSettings {
    fn default() -> Self {
        SearchSettings { steps: 1000, lr: 0.1, tv: 1e-4, match_norm: true }
    }
}

/// A channel subspace for a recorded release (`channels x positions`): `channels x k`, row-major,
/// orthonormal columns.
pub type BasisOf<'a> = dyn Fn(&[f32]) -> Result<Vec<f32>, String> + 'a;

/// How the device's value follows from the released layer's input.
pub enum ReleaseModel<'a> {
    /// The input itself.
    Exact,
    /// The input projected onto the channel subspace `onto` gives for each recorded release.
    Projection { onto: &'a BasisOf<'a> },
}

/// `V V^T x` (positions along the rows of `x`, `channels x positions`).
fn project(x: &[f32], v: &[f32], channels: usize) -> Vec<f32> {
    let positions = x.len() / channels;
    let k = v.len() / channels.max(1);
    let mut out = vec![0f32; x.len()];
    for j in 0..k {
        // Coordinates of every position on column j, then add them back along it.
        let mut coord = vec![0f32; positions];
        for c in 0..channels {
            let w = v[c * k + j];
            coord.iter_mut().zip(&x[c * positions..(c + 1) * positions]).for_each(|(s, &x)| *s += w * x);
        }
        for c in 0..channels {
            let w = v[c * k + j];
            out[c * positions..(c + 1) * positions].iter_mut().zip(&coord).for_each(|(o, &s)| *o += w * s);
        }
    }
    out
}

/// Total variation (squared differences of neighbours) of a `c x h x w` image and its gradient.
fn total_variation(x: &[f32], [c, h, w]: Shape3, grad: &mut [f32], weight: f32) -> f32 {
    let mut tv = 0f32;
    for ch in 0..c {
        for i in 0..h {
            for j in 0..w {
                let at = (ch * h + i) * w + j;
                for (di, dj) in [(1, 0), (0, 1)] {
                    if i + di < h && j + dj < w {
                        let next = (ch * h + i + di) * w + j + dj;
                        let d = x[at] - x[next];
                        tv += d * d;
                        grad[at] += 2.0 * weight * d;
                        grad[next] -= 2.0 * weight * d;
                    }
                }
            }
        }
    }
    weight * tv
}

/// Searches for `targets.len()` images (each `image`-shaped, starting from `start`, kept within
/// `[low, high]` per channel) whose release through `prefix` matches each target (`release`
/// shaped). Returns the images and the final mean cosine distance.
#[allow(clippy::too_many_arguments)]
pub fn invert(
    prefix: &mut [Layer],
    image: Shape3,
    release: Shape3,
    targets: &[Vec<f32>],
    model: &ReleaseModel,
    start: &[f32],
    bounds: (&[f32], &[f32]),
    settings: SearchSettings,
) -> Result<(Vec<Vec<f32>>, f32), String> {
    let n = targets.len();
    let per_image: usize = image.iter().product();
    let per_release: usize = release.iter().product();
    if start.len() != per_image || targets.iter().any(|t| t.len() != per_release) {
        return Err(format!("the search takes {per_image}-value starts and {per_release}-value targets"));
    }
    let mut x = from_vec(&[n, image[0], image[1], image[2]], start.repeat(n));
    let bases = targets
        .iter()
        .map(|t| match model {
            ReleaseModel::Exact => Ok(None),
            ReleaseModel::Projection { onto } => onto(t).map(Some),
        })
        .collect::<Result<Vec<_>, String>>()?;
    let mut opt = Optimizer::new(OptimizerKind::Adam { beta1: 0.9, beta2: 0.999, eps: 1e-8 }, 0.0);
    let plane = image[1] * image[2];
    let mut distance = 0.0;
    for step in 0..settings.steps {
        let (a, saved) = forward_all(prefix, &x, Mode::Train);
        if a.len() != n * per_release {
            return Err(format!("the layers give {} values per sample, the release holds {per_release}", a.len() / n));
        }
        let mut da = vec![0f32; a.len()];
        distance = 0.0;
        for (s, target) in targets.iter().enumerate() {
            let a_s = &data(&a)[s * per_release..(s + 1) * per_release];
            let r = match &bases[s] {
                Some(v) => project(a_s, v, release[0]),
                None => a_s.to_vec(),
            };
            let (rn, tn) = (norm(&r), norm(target));
            // A cosine needs both norms; the squared distance only the target's.
            if tn == 0.0 || (rn == 0.0 && !settings.match_norm) {
                continue;
            }
            let dr: Vec<f32> = if settings.match_norm {
                distance += r.iter().zip(target).map(|(p, q)| (p - q) * (p - q)).sum::<f32>() / (tn * tn);
                r.iter().zip(target).map(|(&p, &q)| 2.0 * (p - q) / (tn * tn)).collect()
            } else {
                let dot: f32 = r.iter().zip(target).map(|(p, q)| p * q).sum();
                let cos = dot / (rn * tn);
                distance += 1.0 - cos;
                // d(1 - cos)/dr = -(t / (|r||t|) - cos r / |r|^2).
                r.iter().zip(target).map(|(&p, &q)| -(q / (rn * tn) - cos * p / (rn * rn))).collect()
            };
            let back = match &bases[s] {
                Some(v) => project(&dr, v, release[0]),
                None => dr,
            };
            da[s * per_release..(s + 1) * per_release].copy_from_slice(&back);
        }
        distance /= n as f32;
        let (dx, _) = backward_all(prefix, &from_vec(a.shape(), da), saved);
        let mut grad = data(&dx).to_vec();
        for s in 0..n {
            let range = s * per_image..(s + 1) * per_image;
            let xs = data(&x)[range.clone()].to_vec();
            total_variation(&xs, image, &mut grad[range], settings.tv);
        }
        let grads = [from_vec(x.shape(), grad)];
        // Cosine decay: large steps to find the basin, small ones to settle in it.
        let progress = step as f32 / settings.steps as f32;
        let lr = settings.lr * 0.5 * (1.0 + (std::f32::consts::PI * progress).cos());
        opt.step(vec![&mut x], &grads, lr).map_err(|_| "the search's gradient is not finite".to_string())?;
        let values = trustsplit_nn::tensor::data_mut(&mut x);
        for (i, v) in values.iter_mut().enumerate() {
            let ch = (i % per_image) / plane;
            *v = v.clamp(bounds.0[ch], bounds.1[ch]);
        }
    }
    let mut out: Vec<Vec<f32>> = data(&x).chunks(per_image).map(<[f32]>::to_vec).collect();
    if !settings.match_norm {
        // The least-squares scale towards the prior, within the pixel range.
        for image in &mut out {
            let (xm, xx) = image.iter().zip(start).fold((0f32, 0f32), |(a, b), (&v, &m)| (a + v * m, b + v * v));
            let c = if xx > 0.0 { (xm / xx).max(0.0) } else { 1.0 };
            for (i, v) in image.iter_mut().enumerate() {
                let ch = i / plane;
                *v = (*v * c).clamp(bounds.0[ch], bounds.1[ch]);
            }
        }
    }
    Ok((out, distance))
}

fn norm(v: &[f32]) -> f32 {
    v.iter().map(|x| x * x).sum::<f32>().sqrt()
}

/// The layers of `model` in front of the first convolution whose input is `release`-shaped for an
/// `image`-shaped input, or `None` if no convolution takes such an input.
pub fn prefix_to(layers: &mut [Layer], image: Shape3, release: Shape3) -> Option<usize> {
    let mut x: Tensor = from_vec(&[1, image[0], image[1], image[2]], vec![0.0; image.iter().product()]);
    for (i, layer) in layers.iter_mut().enumerate() {
        if matches!(layer, Layer::Conv2d(_)) && x.shape()[1..] == release[..] {
            return Some(i);
        }
        if matches!(layer, Layer::Residual(_)) {
            return None;
        }
        x = layer.forward(&x, Mode::Eval).0;
    }
    None
}
