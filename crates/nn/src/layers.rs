//! Layers: each has `forward(x) -> (y, saved)` and `backward(dy, saved) -> (dx, grads)`.
//!
//! Gradients come back in the same order as `params()`, so a model's flat parameter list and its
//! flat gradient list line up without names.

use crate::tensor::{data, data_mut, from_vec, zeros, Tensor};
use trustsplit_kernels::{activation, batchnorm as bn, conv, elementwise, linear, pool};

/// Whether a forward pass trains (batch statistics, saved context) or only evaluates.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum Mode {
    Train,
    Eval,
}

/// A 2-D convolution with weight `out x in x kh x kw`.
#[derive(Clone, Debug)]
pub struct Conv2d {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
    pub stride: usize,
    pub padding: usize,
}

/// A fully connected layer with weight `out x in`.
#[derive(Clone, Debug)]
pub struct Linear {
    pub weight: Tensor,
    pub bias: Option<Tensor>,
}

/// Batch normalisation over channels (`N x C x H x W`, or `N x C` after a linear layer).
#[derive(Clone, Debug)]
pub struct BatchNorm {
    pub gamma: Tensor,
    pub beta: Tensor,
    pub running_mean: Tensor,
    pub running_var: Tensor,
    pub eps: f32,
    /// Weight of the new batch in the running statistics (PyTorch's default 0.1).
    pub momentum: f32,
}

/// Window size, stride and padding of a pooling layer.
#[derive(Clone, Copy, Debug)]
pub struct Pool {
    pub kernel: usize,
    pub stride: usize,
    pub padding: usize,
}

/// `main(x) + shortcut(x)`; an empty shortcut is the identity.
#[derive(Clone, Debug)]
pub struct Residual {
    pub main: Vec<Layer>,
    pub shortcut: Vec<Layer>,
}

/// One layer of a model.
#[derive(Clone, Debug)]
#[allow(clippy::large_enum_variant)] // a model holds tens of layers; boxing buys nothing
pub enum Layer {
    Conv2d(Conv2d),
    Linear(Linear),
    BatchNorm(BatchNorm),
    Relu,
    MaxPool(Pool),
    AvgPool(Pool),
    Flatten,
    Residual(Residual),
}

/// What a training-mode forward pass keeps for the backward pass.
pub enum Saved {
    /// The layer's input (convolution, linear).
    Input(Tensor),
    /// The input and the batch statistics it was normalised with.
    BatchNorm {
        x: Tensor,
        stats: bn::BnBatchStats,
    },
    /// Where a ReLU's output was positive (all its backward pass needs): bit `i % 32` of word
    /// `i / 32` for value `i` of a tensor of `shape`.
    Positive {
        mask: Vec<u32>,
        shape: Vec<usize>,
    },
    /// Where each window's maximum came from.
    MaxPool {
        argmax: Vec<u32>,
        in_shape: Vec<usize>,
    },
    /// The input shape (average pooling, flatten).
    Shape(Vec<usize>),
    Residual {
        main: Vec<Saved>,
        shortcut: Vec<Saved>,
    },
    /// A scheme's own context for a layer it computes split (e.g. AsymML's low-rank factors).
    Tensors(Vec<Tensor>),
    /// Evaluation mode keeps nothing.
    Nothing,
}

impl std::fmt::Debug for Saved {
    /// Names the variant only: saved activations can be private data and stay out of logs.
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        let name = match self {
            Saved::Input(_) => "Input",
            Saved::BatchNorm { .. } => "BatchNorm",
            Saved::Positive { .. } => "Positive",
            Saved::MaxPool { .. } => "MaxPool",
            Saved::Shape(_) => "Shape",
            Saved::Residual { .. } => "Residual",
            Saved::Tensors(_) => "Tensors",
            Saved::Nothing => "Nothing",
        };
        write!(f, "Saved::{name}")
    }
}

impl Conv2d {
    pub fn geometry(&self, in_shape: &[usize]) -> conv::ConvGeometry {
        let w = self.weight.shape();
        assert_eq!(in_shape.len(), 4, "conv2d expects an N x C x H x W input");
        assert_eq!(in_shape[1], w[1], "conv2d: input has {} channels, weight expects {}", in_shape[1], w[1]);
        conv::ConvGeometry {
            batch: in_shape[0],
            in_channels: w[1],
            out_channels: w[0],
            in_h: in_shape[2],
            in_w: in_shape[3],
            kernel_h: w[2],
            kernel_w: w[3],
            stride: self.stride,
            padding: self.padding,
        }
    }
}

impl Pool {
    pub fn geometry(&self, in_shape: &[usize]) -> pool::PoolGeometry {
        assert_eq!(in_shape.len(), 4, "pooling expects an N x C x H x W input");
        pool::PoolGeometry {
            batch: in_shape[0],
            channels: in_shape[1],
            in_h: in_shape[2],
            in_w: in_shape[3],
            kernel: self.kernel,
            stride: self.stride,
            padding: self.padding,
        }
    }
}

impl BatchNorm {
    pub fn new(channels: usize) -> Self {
        BatchNorm {
            gamma: Tensor::ones(vec![channels]),
            beta: zeros(&[channels]),
            running_mean: zeros(&[channels]),
            running_var: Tensor::ones(vec![channels]),
            eps: 1e-5,
            momentum: 0.1,
        }
    }
    fn shape(&self, in_shape: &[usize]) -> bn::BnShape {
        let channels = self.gamma.len();
        assert!(
            in_shape.len() >= 2 && in_shape[1] == channels,
            "batch-norm: input {in_shape:?} does not have {channels} channels"
        );
        bn::BnShape { batch: in_shape[0], channels, spatial: in_shape[2..].iter().product() }
    }
}

impl Conv2d {
    /// `y = conv(x, weight) + bias`.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let g = self.geometry(x.shape());
        let mut y = zeros(&[g.batch, g.out_channels, g.out_h(), g.out_w()]);
        conv::conv2d_forward(&g, data(x), data(&self.weight), self.bias.as_ref().map(data), data_mut(&mut y));
        y
    }

    /// `dx` and the parameter gradients `[dweight, dbias?]` for input `x` and output gradient `dy`.
    pub fn backward(&self, x: &Tensor, dy: &Tensor) -> (Tensor, Vec<Tensor>) {
        let g = self.geometry(x.shape());
        let mut dx = zeros(x.shape());
        conv::conv2d_backward_data(&g, data(dy), data(&self.weight), data_mut(&mut dx));
        let mut dw = zeros(self.weight.shape());
        let mut db = self.bias.as_ref().map(|b| zeros(b.shape()));
        conv::conv2d_backward_weight(&g, data(x), data(dy), data_mut(&mut dw), db.as_mut().map(data_mut));
        (dx, std::iter::once(dw).chain(db).collect())
    }
}

impl Linear {
    /// `(batch, in, out)` for an input of shape `x_shape`.
    pub fn dims(&self, x_shape: &[usize]) -> (usize, usize, usize) {
        let w = self.weight.shape();
        assert!(x_shape.len() == 2 && x_shape[1] == w[1], "linear: input {x_shape:?} does not have {} features", w[1]);
        (x_shape[0], w[1], w[0])
    }

    /// `y = x weight^T + bias`.
    pub fn forward(&self, x: &Tensor) -> Tensor {
        let (n, i, o) = self.dims(x.shape());
        let mut y = zeros(&[n, o]);
        linear::linear_forward(n, i, o, data(x), data(&self.weight), self.bias.as_ref().map(data), data_mut(&mut y));
        y
    }

    /// `dx` and the parameter gradients `[dweight, dbias?]`.
    pub fn backward(&self, x: &Tensor, dy: &Tensor) -> (Tensor, Vec<Tensor>) {
        let (n, i, o) = self.dims(x.shape());
        let mut dx = zeros(x.shape());
        linear::linear_backward_data(n, i, o, data(dy), data(&self.weight), data_mut(&mut dx));
        let mut dw = zeros(self.weight.shape());
        let mut db = self.bias.as_ref().map(|b| zeros(b.shape()));
        linear::linear_backward_weight(n, i, o, data(x), data(dy), data_mut(&mut dw), db.as_mut().map(data_mut));
        (dx, std::iter::once(dw).chain(db).collect())
    }
}

/// ReLU on `x`, in place (the tensor becomes the output), and its sign mask when training.
fn relu_forward(mut x: Tensor, mode: Mode) -> (Tensor, Saved) {
    let mut mask = vec![0u32; x.len().div_ceil(activation::MASK_BITS)];
    activation::relu_in_place(data_mut(&mut x), &mut mask);
    let saved = if mode == Mode::Train { Saved::Positive { mask, shape: x.shape().to_vec() } } else { Saved::Nothing };
    (x, saved)
}

/// ReLU's backward pass on `dy`, in place.
fn relu_backward(mut dy: Tensor, saved: Saved) -> (Tensor, Vec<Tensor>) {
    let Saved::Positive { mask, shape } = saved else { panic!("relu backward without its mask") };
    assert_eq!(dy.shape(), &shape[..], "relu backward: gradient shape");
    activation::relu_backward_in_place(&mask, data_mut(&mut dy));
    (dy, vec![])
}

/// Batch-norm's forward on an input the caller gives up. Evaluation mode normalises it in place
/// with the running statistics. Training mode normalises with the batch's statistics into a new
/// tensor and updates the running statistics; the input and those statistics are what the
/// backward pass needs.
fn batchnorm_forward(b: &mut BatchNorm, mut x: Tensor, mode: Mode) -> (Tensor, Saved) {
    let s = b.shape(x.shape());
    if mode != Mode::Train {
        let (g, beta, rm, rv) = (data(&b.gamma), data(&b.beta), data(&b.running_mean), data(&b.running_var));
        bn::batchnorm_eval_forward_in_place(s, data_mut(&mut x), g, beta, rm, rv, b.eps);
        return (x, Saved::Nothing);
    }
    let (y, stats) = bn::batchnorm_train_forward(s, data(&x), data(&b.gamma), data(&b.beta), b.eps);
    // Running variance uses the unbiased estimate, as PyTorch does.
    let count = (s.batch * s.spatial) as f32;
    let unbias = if count > 1.0 { count / (count - 1.0) } else { 1.0 };
    let m = b.momentum;
    for c in 0..s.channels {
        b.running_mean[c] = (1.0 - m) * b.running_mean[c] + m * stats.mean[c];
        b.running_var[c] = (1.0 - m) * b.running_var[c] + m * stats.var[c] * unbias;
    }
    (from_vec(x.shape(), y), Saved::BatchNorm { x, stats })
}

/// Batch-norm's training-mode backward: the input gradient written over `dy`, then the gradients
/// of gamma and beta.
fn batchnorm_backward(b: &BatchNorm, mut dy: Tensor, x: &Tensor, stats: &bn::BnBatchStats) -> (Tensor, Vec<Tensor>) {
    let s = b.shape(x.shape());
    let (mut dg, mut db) = (zeros(b.gamma.shape()), zeros(b.beta.shape()));
    bn::batchnorm_backward_in_place(
        s,
        data(x),
        data_mut(&mut dy),
        data(&b.gamma),
        stats,
        data_mut(&mut dg),
        data_mut(&mut db),
    );
    (dy, vec![dg, db])
}

/// [`batchnorm_backward`] on an output gradient the caller keeps: the input gradient goes to a
/// new tensor, without a copy of `dy`.
fn batchnorm_backward_from(b: &BatchNorm, dy: &Tensor, x: &Tensor, stats: &bn::BnBatchStats) -> (Tensor, Vec<Tensor>) {
    let s = b.shape(x.shape());
    let (mut dg, mut db) = (zeros(b.gamma.shape()), zeros(b.beta.shape()));
    let dx = bn::batchnorm_backward(s, data(x), data(dy), data(&b.gamma), stats, data_mut(&mut dg), data_mut(&mut db));
    (from_vec(dy.shape(), dx), vec![dg, db])
}

impl Layer {
    /// Runs the layer. In training mode batch-norm uses (and updates) batch statistics and the
    /// returned `Saved` holds what `backward` needs; in evaluation mode it is `Saved::Nothing`.
    pub fn forward(&mut self, x: &Tensor, mode: Mode) -> (Tensor, Saved) {
        let train = mode == Mode::Train;
        let keep_input = |x: &Tensor| if train { Saved::Input(x.clone()) } else { Saved::Nothing };
        match self {
            Layer::Conv2d(c) => (c.forward(x), keep_input(x)),
            Layer::Linear(l) => (l.forward(x), keep_input(x)),
            Layer::BatchNorm(b) => batchnorm_forward(b, x.clone(), mode),
            Layer::Relu => relu_forward(x.clone(), mode),
            Layer::MaxPool(p) => {
                let g = p.geometry(x.shape());
                let mut y = zeros(&[g.batch, g.channels, g.out_h(), g.out_w()]);
                let mut argmax = vec![0u32; g.output_len()];
                pool::max_pool_forward(&g, data(x), data_mut(&mut y), &mut argmax);
                let saved =
                    if train { Saved::MaxPool { argmax, in_shape: x.shape().to_vec() } } else { Saved::Nothing };
                (y, saved)
            }
            Layer::AvgPool(p) => {
                let g = p.geometry(x.shape());
                let mut y = zeros(&[g.batch, g.channels, g.out_h(), g.out_w()]);
                pool::avg_pool_forward(&g, data(x), data_mut(&mut y));
                (y, Saved::Shape(x.shape().to_vec()))
            }
            Layer::Flatten => {
                let n = x.shape()[0];
                let y =
                    x.clone().into_shape_with_order(vec![n, x.len() / n.max(1)]).expect("flatten a contiguous tensor");
                (y, Saved::Shape(x.shape().to_vec()))
            }
            Layer::Residual(r) => {
                let (mut y, main) = forward_all(&mut r.main, x, mode);
                let (s, shortcut) = forward_all(&mut r.shortcut, x, mode);
                assert_eq!(y.shape(), s.shape(), "residual: main and shortcut shapes differ");
                elementwise::add_assign(data_mut(&mut y), data(&s));
                let saved = if train { Saved::Residual { main, shortcut } } else { Saved::Nothing };
                (y, saved)
            }
        }
    }

    /// [`Layer::forward`] on an input the caller gives up: a ReLU then works in place instead of
    /// allocating its output.
    pub fn forward_owned(&mut self, x: Tensor, mode: Mode) -> (Tensor, Saved) {
        match self {
            Layer::Relu => relu_forward(x, mode),
            // Batch-norm keeps its input for the backward pass (the given one, not a copy), or
            // normalises it in place when there is none.
            Layer::BatchNorm(b) => batchnorm_forward(b, x, mode),
            _ => self.forward(&x, mode),
        }
    }

    /// [`Layer::backward`] on an output gradient the caller gives up: a ReLU then masks it in place.
    pub fn backward_owned(&self, dy: Tensor, saved: Saved) -> (Tensor, Vec<Tensor>) {
        match (self, saved) {
            (Layer::Relu, saved @ Saved::Positive { .. }) => relu_backward(dy, saved),
            (Layer::BatchNorm(b), Saved::BatchNorm { x, stats }) => batchnorm_backward(b, dy, &x, &stats),
            (_, saved) => self.backward(&dy, saved),
        }
    }

    /// Gradients: `dx` and one gradient per entry of `params()`, in that order.
    pub fn backward(&self, dy: &Tensor, saved: Saved) -> (Tensor, Vec<Tensor>) {
        match (self, saved) {
            (Layer::Conv2d(c), Saved::Input(x)) => c.backward(&x, dy),
            (Layer::Linear(l), Saved::Input(x)) => l.backward(&x, dy),
            (Layer::BatchNorm(b), Saved::BatchNorm { x, stats }) => batchnorm_backward_from(b, dy, &x, &stats),
            (Layer::Relu, saved @ Saved::Positive { .. }) => relu_backward(dy.clone(), saved),
            (Layer::MaxPool(p), Saved::MaxPool { argmax, in_shape }) => {
                let g = p.geometry(&in_shape);
                (from_vec(&in_shape, pool::max_pool_backward(&g, data(dy), &argmax)), vec![])
            }
            (Layer::AvgPool(p), Saved::Shape(in_shape)) => {
                let g = p.geometry(&in_shape);
                let mut dx = zeros(&in_shape);
                pool::avg_pool_backward(&g, data(dy), data_mut(&mut dx));
                (dx, vec![])
            }
            (Layer::Flatten, Saved::Shape(in_shape)) => {
                (dy.clone().into_shape_with_order(in_shape).expect("unflatten"), vec![])
            }
            (Layer::Residual(r), Saved::Residual { main, shortcut }) => {
                let (mut dx, mut grads) = backward_all(&r.main, dy, main);
                let (ds, shortcut_grads) = backward_all(&r.shortcut, dy, shortcut);
                elementwise::add_assign(data_mut(&mut dx), data(&ds));
                grads.extend(shortcut_grads);
                (dx, grads)
            }
            (layer, _) => panic!(
                "backward of {} was given the saved context of another layer (or of an evaluation pass)",
                layer.kind()
            ),
        }
    }

    /// A short name for messages and summaries.
    pub fn kind(&self) -> &'static str {
        match self {
            Layer::Conv2d(_) => "conv2d",
            Layer::Linear(_) => "linear",
            Layer::BatchNorm(_) => "batchnorm",
            Layer::Relu => "relu",
            Layer::MaxPool(_) => "maxpool",
            Layer::AvgPool(_) => "avgpool",
            Layer::Flatten => "flatten",
            Layer::Residual(_) => "residual",
        }
    }

    /// Trainable parameters, with names relative to this layer.
    pub fn named_params(&self) -> Vec<(String, &Tensor)> {
        match self {
            Layer::Conv2d(Conv2d { weight, bias, .. }) | Layer::Linear(Linear { weight, bias }) => {
                let mut v = vec![("weight".to_string(), weight)];
                v.extend(bias.as_ref().map(|b| ("bias".to_string(), b)));
                v
            }
            Layer::BatchNorm(b) => vec![("weight".into(), &b.gamma), ("bias".into(), &b.beta)],
            Layer::Residual(r) => nested(&r.main, "main", Layer::named_params)
                .into_iter()
                .chain(nested(&r.shortcut, "shortcut", Layer::named_params))
                .collect(),
            _ => vec![],
        }
    }

    /// Trainable parameters, mutable, in the order of `named_params`.
    pub fn params_mut(&mut self) -> Vec<&mut Tensor> {
        match self {
            Layer::Conv2d(Conv2d { weight, bias, .. }) | Layer::Linear(Linear { weight, bias }) => {
                std::iter::once(weight).chain(bias.as_mut()).collect()
            }
            Layer::BatchNorm(b) => vec![&mut b.gamma, &mut b.beta],
            Layer::Residual(r) => r.main.iter_mut().chain(r.shortcut.iter_mut()).flat_map(Layer::params_mut).collect(),
            _ => vec![],
        }
    }

    /// For each of [`Layer::params_mut`]'s tensors, in order, whether it is a convolution's weight.
    pub fn conv_weight_flags(&self) -> Vec<bool> {
        match self {
            Layer::Conv2d(c) => std::iter::once(true).chain(c.bias.as_ref().map(|_| false)).collect(),
            Layer::Residual(r) => r.main.iter().chain(&r.shortcut).flat_map(Layer::conv_weight_flags).collect(),
            other => vec![false; other.named_params().len()],
        }
    }

    /// Non-trainable state (batch-norm running statistics), with names.
    pub fn named_buffers(&self) -> Vec<(String, &Tensor)> {
        match self {
            Layer::BatchNorm(b) => {
                vec![("running_mean".into(), &b.running_mean), ("running_var".into(), &b.running_var)]
            }
            Layer::Residual(r) => nested(&r.main, "main", Layer::named_buffers)
                .into_iter()
                .chain(nested(&r.shortcut, "shortcut", Layer::named_buffers))
                .collect(),
            _ => vec![],
        }
    }

    /// Non-trainable state, mutable, in the order of `named_buffers`.
    pub fn buffers_mut(&mut self) -> Vec<&mut Tensor> {
        match self {
            Layer::BatchNorm(b) => vec![&mut b.running_mean, &mut b.running_var],
            Layer::Residual(r) => r.main.iter_mut().chain(r.shortcut.iter_mut()).flat_map(Layer::buffers_mut).collect(),
            _ => vec![],
        }
    }

    /// Output shape (without the batch dimension) for an input of shape `s` (also without it).
    pub fn output_shape(&self, s: &[usize]) -> Result<Vec<usize>, String> {
        let with_batch: Vec<usize> = std::iter::once(1).chain(s.iter().copied()).collect();
        let image = |what: &str| -> Result<(), String> {
            if s.len() == 3 {
                Ok(())
            } else {
                Err(format!("{what} needs a C x H x W input, got {s:?}"))
            }
        };
        match self {
            Layer::Conv2d(c) => {
                image("conv2d")?;
                if s[0] != c.weight.shape()[1] {
                    return Err(format!("conv2d expects {} input channels, got {}", c.weight.shape()[1], s[0]));
                }
                let g = c.geometry(&with_batch);
                g.validate()?;
                Ok(vec![g.out_channels, g.out_h(), g.out_w()])
            }
            Layer::Linear(l) => {
                let w = l.weight.shape();
                if s != [w[1]] {
                    return Err(format!("linear expects {} features, got {s:?}", w[1]));
                }
                Ok(vec![w[0]])
            }
            Layer::BatchNorm(b) => {
                if s.is_empty() || s[0] != b.gamma.len() {
                    return Err(format!("batch-norm expects {} channels, got {s:?}", b.gamma.len()));
                }
                Ok(s.to_vec())
            }
            Layer::Relu => Ok(s.to_vec()),
            Layer::MaxPool(p) | Layer::AvgPool(p) => {
                image("pooling")?;
                let g = p.geometry(&with_batch);
                g.validate()?;
                Ok(vec![g.channels, g.out_h(), g.out_w()])
            }
            Layer::Flatten => Ok(vec![s.iter().product()]),
            Layer::Residual(r) => {
                let main = shape_through(&r.main, s)?;
                let short = shape_through(&r.shortcut, s)?;
                if main != short {
                    return Err(format!("residual branches disagree: {main:?} vs {short:?}"));
                }
                Ok(main)
            }
        }
    }

    /// Forward multiply-adds for one sample with input shape `s` (without the batch dimension).
    pub fn forward_macs(&self, s: &[usize]) -> u64 {
        match self {
            Layer::Conv2d(c) => c.geometry(&[1, s[0], s[1], s[2]]).forward_macs(),
            Layer::Linear(l) => l.weight.len() as u64,
            Layer::Residual(r) => macs_through(&r.main, s) + macs_through(&r.shortcut, s),
            _ => 0,
        }
    }
}

fn nested<'a>(
    layers: &'a [Layer],
    branch: &str,
    f: impl Fn(&'a Layer) -> Vec<(String, &'a Tensor)>,
) -> Vec<(String, &'a Tensor)> {
    layers
        .iter()
        .enumerate()
        .flat_map(|(i, l)| f(l).into_iter().map(move |(n, t)| (format!("{branch}.{i}.{n}"), t)))
        .collect()
}

/// Shape after running `layers` on a (batch-less) input shape.
pub fn shape_through(layers: &[Layer], s: &[usize]) -> Result<Vec<usize>, String> {
    layers
        .iter()
        .enumerate()
        .try_fold(s.to_vec(), |s, (i, l)| l.output_shape(&s).map_err(|e| format!("layer {i} ({}): {e}", l.kind())))
}

/// Forward multiply-adds of `layers` for one sample.
pub fn macs_through(layers: &[Layer], s: &[usize]) -> u64 {
    let mut shape = s.to_vec();
    let mut total = 0;
    for l in layers {
        total += l.forward_macs(&shape);
        shape = l.output_shape(&shape).expect("a validated model");
    }
    total
}

/// Runs `layers` in order, collecting their saved contexts.
pub fn forward_all(layers: &mut [Layer], x: &Tensor, mode: Mode) -> (Tensor, Vec<Saved>) {
    let mut saved = Vec::with_capacity(layers.len());
    let mut h = x.clone();
    for l in layers.iter_mut() {
        let (y, s) = l.forward(&h, mode);
        saved.push(s);
        h = y;
    }
    (h, saved)
}

/// Backward through `layers` in reverse; gradients come back in forward parameter order.
pub fn backward_all(layers: &[Layer], dy: &Tensor, saved: Vec<Saved>) -> (Tensor, Vec<Tensor>) {
    assert_eq!(layers.len(), saved.len(), "backward: one saved context per layer");
    let mut per_layer: Vec<Vec<Tensor>> = Vec::with_capacity(layers.len());
    let mut g = dy.clone();
    for (l, s) in layers.iter().zip(saved).rev() {
        let (dx, grads) = l.backward(&g, s);
        per_layer.push(grads);
        g = dx;
    }
    per_layer.reverse();
    (g, per_layer.into_iter().flatten().collect())
}
