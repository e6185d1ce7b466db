//! A model on shares: the zoo's layers, run by each party on its replicated shares.
//!
//! The architecture ([`Spec`]) is public; every parameter, activation and gradient is shared.
//! Convolutions and linear layers are private bilinear products ([`crate::arith`]); ReLU and
//! max-pooling compare ([`crate::compare`]); the loss gradient is a private softmax
//! ([`crate::softmax`]). The optimizer (SGD with momentum and weight decay, all public
//! constants) updates the shares in place. Batch-norm runs for inference only, as in CryptGPU: its
//! scale and shift are folded from the running statistics by the data owner before sharing
//! (normalising by a private batch variance needs a private square root, which is not built).

use crate::arith::AShare;
use crate::compare::{concat, slice};
use crate::gemm::{self, ConvShape};
use crate::party::{MpcError, Party};
use serde::{Deserialize, Serialize};
use trustsplit_nn::layers::Layer;
use trustsplit_nn::Model;

/// One layer's public description.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub enum Spec {
    Conv {
        in_channels: usize,
        out_channels: usize,
        kernel: usize,
        stride: usize,
        padding: usize,
        bias: bool,
    },
    Linear {
        inputs: usize,
        outputs: usize,
        bias: bool,
    },
    /// Inference only: `y = x * scale[c] + shift[c]`.
    BatchNorm {
        channels: usize,
    },
    Relu,
    MaxPool {
        kernel: usize,
        stride: usize,
        padding: usize,
    },
    AvgPool {
        kernel: usize,
        stride: usize,
        padding: usize,
    },
    Flatten,
    Residual {
        main: Vec<Spec>,
        shortcut: Vec<Spec>,
    },
}

/// The public architecture of `model`.
pub fn specs_of(layers: &[Layer]) -> Vec<Spec> {
    layers
        .iter()
        .map(|l| match l {
            Layer::Conv2d(c) => {
                let s = c.weight.shape();
                Spec::Conv {
                    in_channels: s[1],
                    out_channels: s[0],
                    kernel: s[2],
                    stride: c.stride,
                    padding: c.padding,
                    bias: c.bias.is_some(),
                }
            }
            Layer::Linear(f) => {
                let s = f.weight.shape();
                Spec::Linear { inputs: s[1], outputs: s[0], bias: f.bias.is_some() }
            }
            Layer::BatchNorm(b) => Spec::BatchNorm { channels: b.gamma.len() },
            Layer::Relu => Spec::Relu,
            Layer::MaxPool(p) => Spec::MaxPool { kernel: p.kernel, stride: p.stride, padding: p.padding },
            Layer::AvgPool(p) => Spec::AvgPool { kernel: p.kernel, stride: p.stride, padding: p.padding },
            Layer::Flatten => Spec::Flatten,
            Layer::Residual(r) => Spec::Residual { main: specs_of(&r.main), shortcut: specs_of(&r.shortcut) },
        })
        .collect()
}

/// Whether any layer is a batch-norm (which cannot train on shares).
pub fn has_batch_norm(specs: &[Spec]) -> bool {
    specs.iter().any(|s| match s {
        Spec::BatchNorm { .. } => true,
        Spec::Residual { main, shortcut } => has_batch_norm(main) || has_batch_norm(shortcut),
        _ => false,
    })
}

/// The shapes of the shared parameters, in order (for batch-norm: scale, shift).
pub fn param_shapes(specs: &[Spec]) -> Vec<Vec<usize>> {
    let mut out = Vec::new();
    for s in specs {
        match s {
            Spec::Conv { in_channels, out_channels, kernel, bias, .. } => {
                out.push(vec![*out_channels, *in_channels, *kernel, *kernel]);
                if *bias {
                    out.push(vec![*out_channels]);
                }
            }
            Spec::Linear { inputs, outputs, bias } => {
                out.push(vec![*outputs, *inputs]);
                if *bias {
                    out.push(vec![*outputs]);
                }
            }
            Spec::BatchNorm { channels } => {
                out.push(vec![*channels]);
                out.push(vec![*channels]);
            }
            Spec::Residual { main, shortcut } => {
                out.extend(param_shapes(main));
                out.extend(param_shapes(shortcut));
            }
            _ => {}
        }
    }
    out
}

/// The plaintext values the data owner shares, in [`param_shapes`] order: the model's parameters,
/// with each batch-norm's `(gamma, beta)` replaced by its folded `(scale, shift)`.
pub fn plain_params(model: &Model) -> Vec<Vec<f32>> {
    fn walk(layers: &[Layer], out: &mut Vec<Vec<f32>>) {
        for l in layers {
            match l {
                Layer::Conv2d(c) => {
                    out.push(c.weight.iter().copied().collect());
                    out.extend(c.bias.as_ref().map(|b| b.iter().copied().collect()));
                }
                Layer::Linear(f) => {
                    out.push(f.weight.iter().copied().collect());
                    out.extend(f.bias.as_ref().map(|b| b.iter().copied().collect()));
                }
                Layer::BatchNorm(b) => {
                    let scale: Vec<f32> =
                        b.gamma.iter().zip(b.running_var.iter()).map(|(g, v)| g / (v + b.eps).sqrt()).collect();
                    let shift =
                        b.beta.iter().zip(b.running_mean.iter()).zip(&scale).map(|((be, m), s)| be - m * s).collect();
                    out.push(scale);
                    out.push(shift);
                }
                Layer::Residual(r) => {
                    walk(&r.main, out);
                    walk(&r.shortcut, out);
                }
                _ => {}
            }
        }
    }
    let mut out = Vec::new();
    walk(&model.layers, &mut out);
    out
}

/// What a layer keeps from the forward pass for the backward pass.
enum Saved {
    Input(AShare),
    Bit(AShare),
    Argmax { argmax: AShare, input_shape: Vec<usize> },
    Shape(Vec<usize>),
    Residual { main: Vec<Saved>, shortcut: Vec<Saved> },
    None,
}

/// The shared model one party holds.
pub struct SecureModel {
    pub specs: Vec<Spec>,
    /// The parameters' shares, in [`param_shapes`] order.
    pub params: Vec<AShare>,
    /// Momentum buffers (empty until the first step).
    velocity: Vec<AShare>,
    /// In training, ReLU zeroes inputs at or above this and the update zeroes weight-gradient
    /// entries beyond it either way: what a failed truncation leaves ([`Party::keep_within`]).
    pub activation_bound: f64,
}

/// Gradient entries checked against the bound at once (11 rounds per slice).
const GUARD_SLICE: usize = 1 << 20;

/// The default of [`SecureModel::activation_bound`]: far above the gradients (and activations) of
/// the zoo's models, far below the 2^24 a failed truncation adds at 20 fractional bits.
pub const DEFAULT_ACTIVATION_BOUND: f64 = 4096.0;

/// SGD's public settings.
#[derive(Clone, Copy, Debug, Serialize, Deserialize)]
pub struct Sgd {
    pub lr: f64,
    pub momentum: f64,
    pub weight_decay: f64,
}

impl SecureModel {
    pub fn new(specs: Vec<Spec>, params: Vec<AShare>) -> Result<SecureModel, MpcError> {
        let shapes = param_shapes(&specs);
        if shapes.len() != params.len() || shapes.iter().zip(&params).any(|(s, p)| s != &p.shape) {
            return Err(MpcError::Invalid(format!(
                "parameter shares do not match the architecture: expected {shapes:?}, got {:?}",
                params.iter().map(|p| &p.shape).collect::<Vec<_>>()
            )));
        }
        Ok(SecureModel { specs, params, velocity: Vec::new(), activation_bound: DEFAULT_ACTIVATION_BOUND })
    }

    /// Starts from momentum buffers (a resumed run's; shares in [`param_shapes`] order).
    pub fn with_velocity(mut self, velocity: Vec<AShare>) -> Result<SecureModel, MpcError> {
        if velocity.len() != self.params.len() || velocity.iter().zip(&self.params).any(|(v, p)| v.shape != p.shape) {
            return Err(MpcError::Invalid("momentum shares do not match the parameters".into()));
        }
        self.velocity = velocity;
        Ok(self)
    }

    /// The momentum buffers' shares (zeros before the first step: the same update follows).
    pub fn velocity(&self) -> Vec<AShare> {
        match self.velocity.is_empty() {
            true => self.params.iter().map(|p| AShare::zeros(&p.shape)).collect(),
            false => self.velocity.clone(),
        }
    }

    /// Logits `[N, classes]` for a batch, and the saved contexts when training.
    pub fn forward(&self, party: &mut Party, x: AShare, train: bool) -> Result<(AShare, Vec<SavedBox>), MpcError> {
        let mut index = 0;
        let (y, saved) =
            forward_all(party, &self.specs, &self.params, &mut index, x, train, "", self.activation_bound)?;
        Ok((y, saved.into_iter().map(SavedBox).collect()))
    }

    /// Parameter gradients (in [`param_shapes`] order) from the logits' gradient.
    pub fn backward(&self, party: &mut Party, dy: AShare, saved: Vec<SavedBox>) -> Result<Vec<AShare>, MpcError> {
        let saved = saved.into_iter().map(|s| s.0).collect();
        let mut grads: Vec<Option<AShare>> = vec![None; self.params.len()];
        let mut index = self.params.len();
        backward_all(party, &self.specs, &self.params, &mut index, dy, saved, &mut grads, "", false)?;
        Ok(grads.into_iter().map(|g| g.expect("every parameter gets a gradient")).collect())
    }

    /// One SGD step on the shares: `v = momentum v + (g + wd w)`, `w -= lr v` (each product by a
    /// public constant is one truncation over all parameters at once). Gradient entries outside
    /// `(-bound, bound)` are zeroed first (CrypTen zeroes those above 100 for the same reason): a
    /// failed truncation anywhere in the forward or backward pass must not move a weight by 2^24.
    /// A failed activation (off by 2^24, or wrapped around the ring after the next product) makes
    /// the gradient entries it touches huge or uniformly random, so they land outside the bound
    /// (a random ring element falls inside with probability about `bound 2^(f-63)`, 2^-31 here);
    /// the softmax keeps the loss gradient bounded. 11 rounds, about 54 bytes per parameter.
    pub fn update(&mut self, party: &mut Party, grads: Vec<AShare>, sgd: Sgd) -> Result<(), MpcError> {
        party.set_scope("sgd");
        let bound = self.activation_bound;
        let mut g = concat(&grads);
        // In slices: the sign bits of a whole VGG16's gradients at once took gigabytes per party.
        for start in (0..g.len()).step_by(GUARD_SLICE) {
            let end = (start + GUARD_SLICE).min(g.len());
            let part = slice(&g, start, end - start);
            let (kept, _) = party.keep_within(&part, -bound, bound)?;
            g.cur[start..end].copy_from_slice(&kept.cur);
            g.prev[start..end].copy_from_slice(&kept.prev);
        }
        let w = concat(&self.params);
        if sgd.weight_decay != 0.0 {
            g.add_assign(&party.scale(&w, sgd.weight_decay)?);
        }
        let v = if sgd.momentum != 0.0 {
            let v = match self.velocity.is_empty() {
                true => g,
                false => party.scale(&concat(&self.velocity), sgd.momentum)?.add(&g),
            };
            self.velocity = split(&v, &self.params);
            v
        } else {
            g
        };
        let w = w.sub(&party.scale(&v, sgd.lr)?);
        self.params = split(&w, &self.params);
        Ok(())
    }
}

/// A saved context (opaque outside this module).
pub struct SavedBox(Saved);

/// `flat` cut into pieces shaped like `like`.
fn split(flat: &AShare, like: &[AShare]) -> Vec<AShare> {
    let mut at = 0;
    like.iter()
        .map(|l| {
            let n = l.len();
            let piece = AShare {
                shape: l.shape.clone(),
                cur: flat.cur[at..at + n].to_vec(),
                prev: flat.prev[at..at + n].to_vec(),
            };
            at += n;
            piece
        })
        .collect()
}

fn conv_shape(x: &[usize], spec: &Spec) -> ConvShape {
    let Spec::Conv { in_channels, out_channels, kernel, stride, padding, .. } = *spec else { unreachable!() };
    ConvShape { batch: x[0], in_channels, height: x[2], width: x[3], out_channels, kernel, stride, padding }
}

/// Adds a per-channel bias (axis 1 of `y`) to the shares.
fn add_bias(y: &mut AShare, b: &AShare) {
    let channels = b.len();
    let inner: usize = y.shape[2..].iter().product();
    for (i, (c, p)) in y.cur.iter_mut().zip(y.prev.iter_mut()).enumerate() {
        let ch = (i / inner) % channels;
        *c = c.wrapping_add(b.cur[ch]);
        *p = p.wrapping_add(b.prev[ch]);
    }
}

/// Sums `dy` over every axis but 1 (a bias's gradient; local).
fn bias_grad(dy: &AShare) -> AShare {
    let channels = dy.shape[1];
    let inner: usize = dy.shape[2..].iter().product();
    let mut out = AShare::zeros(&[channels]);
    for (i, (c, p)) in dy.cur.iter().zip(&dy.prev).enumerate() {
        let ch = (i / inner) % channels;
        out.cur[ch] = out.cur[ch].wrapping_add(*c);
        out.prev[ch] = out.prev[ch].wrapping_add(*p);
    }
    out
}

/// Broadcasts a per-channel share over `shape` (axis 1).
fn per_channel(v: &AShare, shape: &[usize]) -> AShare {
    let channels = v.len();
    let inner: usize = shape[2..].iter().product();
    let n: usize = shape.iter().product();
    let pick = |src: &[u64]| (0..n).map(|i| src[(i / inner) % channels]).collect();
    AShare { shape: shape.to_vec(), cur: pick(&v.cur), prev: pick(&v.prev) }
}

#[allow(clippy::too_many_arguments)]
fn forward_all(
    party: &mut Party,
    specs: &[Spec],
    params: &[AShare],
    index: &mut usize,
    mut x: AShare,
    train: bool,
    prefix: &str,
    bound: f64,
) -> Result<(AShare, Vec<Saved>), MpcError> {
    let mut saved = Vec::with_capacity(specs.len());
    for (i, spec) in specs.iter().enumerate() {
        party.set_scope(&format!("{prefix}{i}"));
        let (y, s) = match spec {
            Spec::Conv { bias, .. } => {
                let s = conv_shape(&x.shape, spec);
                let w = &params[*index];
                *index += 1;
                let z = x.bilinear(w, |a, b| gemm::conv2d(a, b, &s));
                let shape = [s.batch, s.out_channels, s.out_height(), s.out_width()];
                let mut y = party.truncate(z, &shape, "conv")?;
                if *bias {
                    add_bias(&mut y, &params[*index]);
                    *index += 1;
                }
                (y, if train { Saved::Input(x) } else { Saved::None })
            }
            Spec::Linear { inputs, outputs, bias } => {
                let n = x.shape[0];
                if x.len() != n * inputs {
                    return Err(MpcError::Invalid(format!("linear layer {prefix}{i} expects {inputs} inputs")));
                }
                let w = &params[*index];
                *index += 1;
                let z = x.bilinear(w, |a, b| gemm::matmul_nt(a, b, n, *inputs, *outputs));
                let mut y = party.truncate(z, &[n, *outputs], "linear")?;
                if *bias {
                    add_bias(&mut y, &params[*index]);
                    *index += 1;
                }
                (y, if train { Saved::Input(x) } else { Saved::None })
            }
            Spec::BatchNorm { .. } => {
                if train {
                    return Err(MpcError::Invalid(
                        "batch-norm cannot train under cryptgpu (a private batch variance needs a private square root); \
                         choose a model without -bn"
                            .into(),
                    ));
                }
                let scale = per_channel(&params[*index], &x.shape);
                let shift = per_channel(&params[*index + 1], &x.shape);
                *index += 2;
                let y = party.mul(&x, &scale)?.add(&shift);
                (y, Saved::None)
            }
            Spec::Relu => {
                // In training, ReLU also zeroes what a failed truncation left (2^24 off): passed on,
                // it grows through the next layers into values that the gradient bound of
                // [`SecureModel::update`] does not all catch (a LeNet run broke at step 6 with the
                // plain ReLU). An inference's failure only spoils that prediction.
                let (y, bit) = if train { party.relu_bounded(&x, bound)? } else { party.relu(&x)? };
                (y, if train { Saved::Bit(bit) } else { Saved::None })
            }
            Spec::MaxPool { kernel, stride, padding } => {
                let input_shape = x.shape.clone();
                let (y, argmax) = party.max_pool2d(&x, *kernel, *stride, *padding)?;
                (y, if train { Saved::Argmax { argmax, input_shape } } else { Saved::None })
            }
            Spec::AvgPool { kernel, stride, padding } => {
                let input_shape = x.shape.clone();
                (party.avg_pool2d(&x, *kernel, *stride, *padding)?, Saved::Shape(input_shape))
            }
            Spec::Flatten => {
                let shape = x.shape.clone();
                let rest = x.len() / shape[0];
                (x.reshaped(&[shape[0], rest]), Saved::Shape(shape))
            }
            Spec::Residual { main, shortcut } => {
                let (m, sm) =
                    forward_all(party, main, params, index, x.clone(), train, &format!("{prefix}{i}.main."), bound)?;
                let (s, ss) =
                    forward_all(party, shortcut, params, index, x, train, &format!("{prefix}{i}.shortcut."), bound)?;
                (m.add(&s), Saved::Residual { main: sm, shortcut: ss })
            }
        };
        saved.push(s);
        x = y;
    }
    Ok((x, saved))
}

/// Walks the layers backwards; `index` counts parameters down from the end. `need_dx`: whether
/// the first layer's input gradient is wanted (not for the model's input).
#[allow(clippy::too_many_arguments)]
fn backward_all(
    party: &mut Party,
    specs: &[Spec],
    params: &[AShare],
    index: &mut usize,
    mut dy: AShare,
    saved: Vec<Saved>,
    grads: &mut [Option<AShare>],
    prefix: &str,
    need_dx: bool,
) -> Result<AShare, MpcError> {
    for (i, (spec, s)) in specs.iter().zip(saved).enumerate().rev() {
        party.set_scope(&format!("{prefix}{i}"));
        let want_dx = need_dx || i > 0;
        dy = match (spec, s) {
            (Spec::Conv { bias, .. }, Saved::Input(x)) => {
                if *bias {
                    *index -= 1;
                    grads[*index] = Some(bias_grad(&dy));
                }
                *index -= 1;
                let w = &params[*index];
                let s = conv_shape(&x.shape, spec);
                let dw = x.bilinear(&dy, |a, b| gemm::conv2d_weight_grad(a, b, &s));
                let (dw, dx) = if want_dx {
                    let dx = dy.bilinear(w, |a, b| gemm::conv2d_input_grad(a, b, &s));
                    let both = [dw, dx].concat();
                    let len = both.len();
                    let both = party.truncate(both, &[len], "conv")?;
                    cut(both, s.weight_len(), &w.shape, &x.shape)
                } else {
                    (party.truncate(dw, &w.shape, "conv")?, AShare::zeros(&[0]))
                };
                grads[*index] = Some(dw);
                dx
            }
            (Spec::Linear { inputs, outputs, bias }, Saved::Input(x)) => {
                if *bias {
                    *index -= 1;
                    grads[*index] = Some(bias_grad(&dy));
                }
                *index -= 1;
                let w = &params[*index];
                let n = x.shape[0];
                let dw = dy.bilinear(&x, |a, b| gemm::matmul_tn(a, b, *outputs, n, *inputs));
                let (dw, dx) = if want_dx {
                    let dx = dy.bilinear(w, |a, b| gemm::matmul(a, b, n, *outputs, *inputs));
                    let both = [dw, dx].concat();
                    let len = both.len();
                    let both = party.truncate(both, &[len], "linear")?;
                    cut(both, outputs * inputs, &w.shape, &x.shape)
                } else {
                    (party.truncate(dw, &w.shape, "linear")?, AShare::zeros(&[0]))
                };
                grads[*index] = Some(dw);
                dx
            }
            (Spec::Relu, Saved::Bit(bit)) => party.relu_backward(&dy, &bit)?,
            (Spec::MaxPool { kernel, stride, padding }, Saved::Argmax { argmax, input_shape }) => {
                party.max_pool2d_backward(&dy, &argmax, &input_shape, *kernel, *stride, *padding)?
            }
            (Spec::AvgPool { kernel, stride, padding }, Saved::Shape(input_shape)) => {
                party.avg_pool2d_backward(&dy, &input_shape, *kernel, *stride, *padding)?
            }
            (Spec::Flatten, Saved::Shape(shape)) => dy.reshaped(&shape),
            (Spec::Residual { main, shortcut }, Saved::Residual { main: sm, shortcut: ss }) => {
                let shortcut_prefix = format!("{prefix}{i}.shortcut.");
                let ds = backward_all(party, shortcut, params, index, dy.clone(), ss, grads, &shortcut_prefix, true)?;
                let dm = backward_all(party, main, params, index, dy, sm, grads, &format!("{prefix}{i}.main."), true)?;
                // An empty shortcut is the identity: its walk hands `dy` back unchanged.
                dm.add(&ds)
            }
            (spec, _) => {
                return Err(MpcError::Invalid(format!("layer {prefix}{i} ({spec:?}) was not run in training mode")))
            }
        };
    }
    Ok(dy)
}

/// Splits a truncated `[dw, dx]` pair.
fn cut(both: AShare, w_len: usize, w_shape: &[usize], x_shape: &[usize]) -> (AShare, AShare) {
    let dw = AShare { shape: w_shape.to_vec(), cur: both.cur[..w_len].to_vec(), prev: both.prev[..w_len].to_vec() };
    let dx = AShare { shape: x_shape.to_vec(), cur: both.cur[w_len..].to_vec(), prev: both.prev[w_len..].to_vec() };
    (dw, dx)
}

/// `[N, classes]` one-hot labels as fixed-point ring values (the data owner shares them).
pub fn one_hot(labels: &[usize], classes: usize, fp: crate::ring::FixedPoint) -> Vec<u64> {
    let one = fp.encode(1.0).expect("1 encodes");
    let mut out = vec![0u64; labels.len() * classes];
    for (i, &l) in labels.iter().enumerate() {
        out[i * classes + l] = one;
    }
    out
}
