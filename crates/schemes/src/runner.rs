//! The shared walk over a model: one training step or evaluation batch under a scheme.
//!
//! Inside the enclave: batch-norm, activations, pooling, residual additions, the loss, labels and
//! the optimizer. The scheme's [`Placement`] decides where convolutions and linear layers run.
//! Between the forward and the backward pass each layer's saved context is kept in the enclave's
//! budgeted memory ([`SecureMemory`]), which encodes, seals and spills it only when the budget is
//! exceeded.
//!
//! A residual block's leading convolutions read its input in place, without a copy per branch; in
//! the backward pass the main branch's last layer reads the block's output gradient by reference
//! while the shortcut takes it. Each layer's parameters are updated as soon as its backward pass is
//! done (all at once after it with gradient clipping), and every gradient is checked for NaN and
//! infinities first, except those the placement vouches for
//! ([`Placement::checks_conv_weight_gradients`]).
//!
//! Not yet tried:
//! - Working sample by sample through several layers while a sample's activation (256 KB at 64 x
//!   32x32) stays in L2: every whole-activation pass reads from L3 at best, and fusing two
//!   neighbouring passes saved nothing (batch-norm + ReLU, expansion + update; 2026-12-03); the
//!   batch-wide steps (batch-norm's statistics, a basis per batch, one device call per layer) stand
//!   against it.

use crate::dp_sgd::DpSgd;
use crate::placement::{PassInfo, Placement, PlacementReport, PlacementResult};
use crate::SchemeInfo;
use serde::Serialize;
use std::sync::Arc;
use std::time::Instant;
use trustsplit_boundary::{Secret, Transcript, TranscriptSummary};
use trustsplit_device::DeviceStats;
use trustsplit_enclave::memory::{BlobId, MemoryError, MemoryStats, SecureMemory, Spill};
use trustsplit_kernels::{elementwise, loss::softmax_cross_entropy};
use trustsplit_nn::layers::Residual;
use trustsplit_nn::optim::{first_non_finite, Optimizer};
use trustsplit_nn::tensor::{data, data_mut, from_vec, zeros};
use trustsplit_nn::{Layer, Mode, Model, Saved, Tensor};

#[derive(Debug, thiserror::Error)]
pub enum RunnerError {
    #[error("{0}")]
    Input(String),
    #[error("{0}")]
    Placement(String),
    #[error("enclave memory: {0}")]
    Memory(#[from] MemoryError),
    #[error("training diverged: the loss is {0}; try a smaller --lr")]
    Diverged(f32),
    /// The step was refused before updating this parameter's layer: that layer and the ones
    /// before it are as before the step. Without global gradient clipping the layers after it
    /// have already been updated (each layer is updated as soon as its gradient is known), so the
    /// model and optimizer should be discarded, as `trustsplit train` does (it resumes from the
    /// last checkpoint); with clipping nothing was updated.
    #[error("training diverged: the gradient of {0} holds NaN or infinite values; try a smaller --lr")]
    NonFiniteGradient(String),
}

/// Loss and accuracy of one batch.
#[derive(Clone, Copy, Debug)]
pub struct StepOutput {
    pub loss: f32,
    pub correct: usize,
    pub samples: usize,
}

/// What a run cost and released so far.
#[derive(Clone, Debug, Serialize)]
pub struct SchemeReport {
    /// The scheme's name.
    pub scheme: &'static str,
    pub steps: u64,
    /// Wall time of training steps minus the time spent waiting for the device.
    pub enclave_seconds: f64,
    pub device_seconds: f64,
    /// Traffic to the device: every operand sent, including a released value sent again (AsymML
    /// resends each residual for its weight gradient), so at least `transcript.bytes_released`.
    pub device_bytes_sent: u64,
    /// Traffic from the device: every result received.
    pub device_bytes_received: u64,
    pub memory: Option<MemoryStats>,
    pub transcript: TranscriptSummary,
    /// The placement's own counters (AsymML: enclave/device multiply-adds, ranks, privacy).
    pub placement: PlacementReport,
}

/// A saved context as enclave memory keeps it: as it is while resident, encoded only to be sealed.
struct Context(Saved);

impl Spill for Context {
    fn spill_len(&self) -> usize {
        self.0.encoded_len()
    }
    fn into_bytes(self) -> Vec<u8> {
        let mut bytes = Vec::with_capacity(self.spill_len());
        self.0.encode(&mut bytes);
        bytes
    }
    fn from_bytes(bytes: Vec<u8>) -> Result<Self, String> {
        Saved::decode(&bytes).map(Context).map_err(|e| format!("corrupt saved context: {e}"))
    }
}

/// Where the enclave keeps a layer's saved context between the passes: as it is (no memory
/// budget), or in the budgeted memory, which may seal and spill it.
enum Kept {
    Plain(Saved),
    Stored(BlobId),
}

/// Runs training steps and evaluation batches under one scheme.
pub struct SplitRunner {
    scheme: &'static SchemeInfo,
    placement: Box<dyn Placement + Send>,
    memory: Option<SecureMemory<Context>>,
    transcript: Arc<Transcript>,
    device_stats: Option<Box<dyn Fn() -> DeviceStats + Send>>,
    steps: u64,
    step_seconds: f64,
    /// The placement's own retained bytes, as reserved in `memory` (see `Placement::retained_bytes`).
    placement_reserved: usize,
    /// Set for `--dp full`: every training step is a DP-SGD step.
    dp_sgd: Option<DpSgd>,
}

impl SplitRunner {
    /// `memory_budget`: the enclave's budget in bytes, or `None` for no enclave accounting
    /// (plaintext). `device_stats` reports the device's counters, if the placement uses one.
    pub fn new(
        scheme: &'static SchemeInfo,
        placement: Box<dyn Placement + Send>,
        memory_budget: Option<usize>,
        transcript: Arc<Transcript>,
        device_stats: Option<Box<dyn Fn() -> DeviceStats + Send>>,
    ) -> Result<SplitRunner, RunnerError> {
        let memory = memory_budget.map(SecureMemory::new).transpose()?;
        Ok(SplitRunner {
            scheme,
            placement,
            memory,
            transcript,
            device_stats,
            steps: 0,
            step_seconds: 0.0,
            placement_reserved: 0,
            dp_sgd: None,
        })
    }

    /// Makes every training step a DP-SGD step ([`DpSgd`]).
    pub fn enable_dp_sgd(&mut self, dp: DpSgd) {
        self.dp_sgd = Some(dp);
    }

    /// DP-SGD's settings and counts, when it is on.
    pub fn dp_sgd(&self) -> Option<&DpSgd> {
        self.dp_sgd.as_ref()
    }

    pub fn scheme(&self) -> &'static SchemeInfo {
        self.scheme
    }

    pub fn transcript(&self) -> &Arc<Transcript> {
        &self.transcript
    }

    /// One SGD/Adam step on a private batch.
    pub fn train_step(
        &mut self,
        model: &mut Model,
        x: Secret<Tensor>,
        labels: &Secret<Vec<usize>>,
        opt: &mut Optimizer,
        lr: f32,
    ) -> Result<StepOutput, RunnerError> {
        let started = Instant::now();
        model.check_input(x.expose()).map_err(RunnerError::Input)?;
        let x = x.into_exposed();
        // Parameters and optimizer state stay resident in the enclave for the whole step, unless
        // the scheme publishes the weights anyway.
        let resident =
            if self.placement.weights_are_public() { 0 } else { 4 * model.num_params() * (1 + opt.kind.slots().len()) };
        if let Some(m) = self.memory.as_mut() {
            m.reserve_transient(resident)?;
        }
        let result = self.train_step_inner(model, x, labels.expose(), opt, lr);
        if let Some(m) = self.memory.as_mut() {
            m.release_transient(resident);
        }
        self.steps += 1;
        self.step_seconds += started.elapsed().as_secs_f64();
        result
    }

    fn train_step_inner(
        &mut self,
        model: &mut Model,
        x: Tensor,
        labels: &[usize],
        opt: &mut Optimizer,
        lr: f32,
    ) -> Result<StepOutput, RunnerError> {
        if self.dp_sgd.is_some() {
            return self.train_step_dp_sgd(model, x, labels, opt, lr);
        }
        // Without global gradient clipping, each layer's parameters are updated as soon as its
        // backward is done, while its weight and gradient are still in cache: the update's sweep
        // over weight, gradient and optimizer state then reads two of them from cache instead of
        // memory (AsymML's best VGG16 row 109-115 -> 103-112 ms, 2026-12-03). With clipping, it
        // waits for every gradient.
        let updates_each_layer = opt.updates_each_parameter_alone();
        let checks_conv_weights = self.placement.checks_conv_weight_gradients();
        if updates_each_layer {
            let named = model.named_params();
            let shapes: Vec<&[usize]> = named.iter().map(|(_, t)| t.shape()).collect();
            opt.begin_step(&shapes);
        }
        let mut per_layer = Vec::with_capacity(model.layers.len());
        let out = self.gradients(model, x, labels, &mut |model, i, first_param, grads| {
            if updates_each_layer {
                let known_finite = if checks_conv_weights { model.layers[i].conv_weight_flags() } else { vec![] };
                let name = format!("layers.{i}");
                update_layer(&mut model.layers[i], &name, opt, &grads, &known_finite, first_param, lr)
            } else {
                per_layer.push(grads);
                Ok(())
            }
        })?;
        if !updates_each_layer {
            per_layer.reverse();
            let mut grads: Vec<Tensor> = per_layer.into_iter().flatten().collect();
            opt.clip_gradients(&mut grads);
            // Scaling a finite gradient down keeps it finite, so the placement's checks still hold.
            let checked = if checks_conv_weights { model.conv_weight_flags() } else { vec![] };
            step_all(model, opt, &grads, &checked, lr)?;
        }
        Ok(out)
    }

    /// A DP-SGD step ([`DpSgd`]): each sample's forward and backward pass alone, its gradient
    /// clipped, the sum noised, then one update.
    fn train_step_dp_sgd(
        &mut self,
        model: &mut Model,
        x: Tensor,
        labels: &[usize],
        opt: &mut Optimizer,
        lr: f32,
    ) -> Result<StepOutput, RunnerError> {
        if has_batchnorm(&model.layers) {
            return Err(RunnerError::Input(
                "--dp full clips each sample's own gradient, and batch-norm mixes the samples of a batch: use a model \
                 without it (lenet5, vgg11, vgg16)"
                    .into(),
            ));
        }
        let n = x.shape()[0];
        if n == 0 || labels.len() != n {
            return Err(RunnerError::Input(format!("a batch of {n} samples with {} labels", labels.len())));
        }
        let per_sample = x.len() / n;
        let mut sample_shape = x.shape().to_vec();
        sample_shape[0] = 1;
        let mut dp = self.dp_sgd.take().expect("DP-SGD is on");
        let mut sum = Vec::new();
        let (mut loss, mut correct) = (0.0f64, 0);
        let mut run = || -> Result<(), RunnerError> {
            for i in 0..n {
                let xi = from_vec(&sample_shape, data(&x)[i * per_sample..(i + 1) * per_sample].to_vec());
                let mut per_layer = Vec::with_capacity(model.layers.len());
                let out = self.gradients(model, xi, &labels[i..i + 1], &mut |_, _, _, grads| {
                    per_layer.push(grads);
                    Ok(())
                })?;
                per_layer.reverse();
                let grads: Vec<Tensor> = per_layer.into_iter().flatten().collect();
                if let Some(j) = first_non_finite(&grads, &[]) {
                    return Err(RunnerError::NonFiniteGradient(param_name(model, j)));
                }
                dp.add_sample(&mut sum, grads);
                loss += f64::from(out.loss);
                correct += out.correct;
            }
            Ok(())
        };
        let ran = run();
        let mut grads = if ran.is_ok() { dp.noisy_mean(sum, n) } else { Vec::new() };
        self.dp_sgd = Some(dp);
        ran?;
        opt.clip_gradients(&mut grads);
        step_all(model, opt, &grads, &[], lr)?;
        Ok(StepOutput { loss: (loss / n.max(1) as f64) as f32, correct, samples: n })
    }

    /// The forward and backward pass of a batch in training mode: `on_layer(model, i, first, grads)`
    /// gets layer `i`'s parameter gradients (its first parameter being the model's `first`-th) as
    /// soon as its backward pass is done, from the last layer to the first.
    fn gradients(
        &mut self,
        model: &mut Model,
        x: Tensor,
        labels: &[usize],
        on_layer: &mut LayerGradients<'_>,
    ) -> Result<StepOutput, RunnerError> {
        let n = x.shape()[0];
        let couples_samples = has_batchnorm(&model.layers);
        self.placement.begin_pass(&PassInfo { mode: Mode::Train, batch: n, couples_samples });
        let mut kept = Vec::with_capacity(model.layers.len());
        let mut h = x;
        for (i, layer) in model.layers.iter_mut().enumerate() {
            let name = format!("layers.{i}");
            let bytes = h.len() * 4;
            let input = take(&mut h);
            let (y, saved) =
                self.with_transient(bytes, |p| forward_layer(p, layer, &name, i == 0, input, Mode::Train))?;
            kept.push(self.keep(saved)?);
            h = y;
        }
        let mut dlogits = zeros(h.shape());
        let out = softmax_cross_entropy(n, model.num_classes, data(&h), labels, Some(data_mut(&mut dlogits)));
        if !out.loss.is_finite() {
            self.discard(kept);
            return Err(RunnerError::Diverged(out.loss));
        }
        let mut first_param = model.named_params().len();
        let mut g = dlogits;
        for i in (0..model.layers.len()).rev() {
            let name = format!("layers.{i}");
            let bytes = g.len() * 4;
            let output_gradient = take(&mut g);
            let layer = &model.layers[i];
            let backward = self.restore(kept.pop().expect("one context per layer")).and_then(|saved| {
                self.with_transient(bytes, |p| backward_layer(p, layer, &name, output_gradient, saved))
            });
            let (dx, grads) = match backward {
                Ok(r) => r,
                Err(e) => {
                    self.discard(kept);
                    return Err(e);
                }
            };
            first_param -= grads.len();
            if let Err(e) = on_layer(model, i, first_param, grads) {
                self.discard(kept);
                return Err(e);
            }
            g = dx;
        }
        Ok(StepOutput { loss: out.loss, correct: out.correct, samples: n })
    }

    /// Loss and accuracy of a private batch in evaluation mode.
    pub fn eval_batch(
        &mut self,
        model: &mut Model,
        x: Secret<Tensor>,
        labels: &Secret<Vec<usize>>,
    ) -> Result<StepOutput, RunnerError> {
        model.check_input(x.expose()).map_err(RunnerError::Input)?;
        let mut h = x.into_exposed();
        let n = h.shape()[0];
        self.placement.begin_pass(&PassInfo { mode: Mode::Eval, batch: n, couples_samples: false });
        // The parameters are resident (unless public); each layer holds its input while it computes its output.
        let resident = if self.placement.weights_are_public() { 0 } else { 4 * model.num_params() };
        if let Some(m) = self.memory.as_mut() {
            m.reserve_transient(resident)?;
        }
        let mut result = Ok(());
        for (i, layer) in model.layers.iter_mut().enumerate() {
            let name = format!("layers.{i}");
            let bytes = h.len() * 4;
            let input = take(&mut h);
            match self.with_transient(bytes, |p| forward_layer(p, layer, &name, i == 0, input, Mode::Eval)) {
                Ok((y, _)) => h = y,
                Err(e) => {
                    result = Err(e);
                    break;
                }
            }
        }
        if let Some(m) = self.memory.as_mut() {
            m.release_transient(resident);
        }
        result?;
        let out = softmax_cross_entropy(n, model.num_classes, data(&h), labels.expose(), None);
        Ok(StepOutput { loss: out.loss, correct: out.correct, samples: n })
    }

    /// Accounts a transient buffer while `f` runs on the placement, and what the placement keeps
    /// once it has (before the buffer is given back, since both were held at that moment).
    fn with_transient<T>(
        &mut self,
        bytes: usize,
        f: impl FnOnce(&mut dyn Placement) -> PlacementResult<T>,
    ) -> Result<T, RunnerError> {
        if let Some(m) = self.memory.as_mut() {
            m.reserve_transient(bytes)?;
        }
        let r = f(self.placement.as_mut()).map_err(RunnerError::Placement);
        let retained = self.placement.retained_bytes();
        if let Some(m) = self.memory.as_mut() {
            if retained > self.placement_reserved {
                m.reserve_transient(retained - self.placement_reserved)?;
            } else {
                m.release_transient(self.placement_reserved - retained);
            }
            self.placement_reserved = retained;
            m.release_transient(bytes);
        }
        r
    }

    fn keep(&mut self, saved: Saved) -> Result<Kept, RunnerError> {
        match self.memory.as_mut() {
            None => Ok(Kept::Plain(saved)),
            Some(m) => Ok(Kept::Stored(m.store(Context(saved))?)),
        }
    }

    fn restore(&mut self, kept: Kept) -> Result<Saved, RunnerError> {
        match kept {
            Kept::Plain(s) => Ok(s),
            Kept::Stored(id) => {
                let m = self.memory.as_mut().expect("stored contexts imply enclave memory");
                Ok(m.take(id)?.0)
            }
        }
    }

    fn discard(&mut self, kept: Vec<Kept>) {
        if let Some(m) = self.memory.as_mut() {
            for k in kept {
                if let Kept::Stored(id) = k {
                    m.free(id);
                }
            }
        }
    }

    /// Costs and releases so far.
    pub fn report(&self) -> SchemeReport {
        let device = self.device_stats.as_ref().map(|f| f()).unwrap_or_default();
        let transcript = self.transcript.summary();
        SchemeReport {
            scheme: self.scheme.name,
            steps: self.steps,
            enclave_seconds: (self.step_seconds - device.device_seconds).max(0.0),
            device_seconds: device.device_seconds,
            device_bytes_sent: device.bytes_sent,
            device_bytes_received: device.bytes_received,
            memory: self.memory.as_ref().map(SecureMemory::stats),
            transcript,
            placement: self.placement.report(),
        }
    }

    /// Starts a new measurement window for peak memory.
    pub fn reset_peak(&mut self) {
        if let Some(m) = self.memory.as_mut() {
            m.reset_peak();
        }
    }
}

/// The layers of a branch from its `first`-th on (named by their place in the branch).
fn forward_list(
    p: &mut dyn Placement,
    layers: &mut [Layer],
    prefix: &str,
    first: usize,
    x: Tensor,
    mode: Mode,
) -> PlacementResult<(Tensor, Vec<Saved>)> {
    let mut saved = Vec::with_capacity(layers.len());
    let mut h = x;
    for (i, l) in layers.iter_mut().enumerate() {
        let (y, s) = forward_layer(p, l, &format!("{prefix}.{}", first + i), false, take(&mut h), mode)?;
        saved.push(s);
        h = y;
    }
    Ok((h, saved))
}

fn forward_layer(
    p: &mut dyn Placement,
    layer: &mut Layer,
    name: &str,
    is_input: bool,
    x: Tensor,
    mode: Mode,
) -> PlacementResult<(Tensor, Saved)> {
    Ok(match layer {
        Layer::Conv2d(c) => p.conv_forward(name, is_input, c, &x, mode)?,
        Layer::Linear(l) => {
            let y = p.linear_forward(name, is_input, l, &x)?;
            (y, if mode == Mode::Train { Saved::Input(x) } else { Saved::Nothing })
        }
        Layer::Residual(r) => forward_residual(p, r, name, x, mode)?,
        other => other.forward_owned(x, mode),
    })
}

/// A residual block `main(x) + shortcut(x)`. Where a branch starts with a convolution, that
/// convolution reads `x` in place (no copy for the branch); where both do (a projection
/// shortcut), they go to the placement together, which may split `x` once for both.
fn forward_residual(
    p: &mut dyn Placement,
    r: &mut Residual,
    name: &str,
    x: Tensor,
    mode: Mode,
) -> PlacementResult<(Tensor, Saved)> {
    let (main_prefix, short_prefix) = (format!("{name}.main"), format!("{name}.shortcut"));
    let (mut main_saved, mut short_saved) = (Vec::new(), Vec::new());
    let (main_head, short_head, skipped) = match (r.main.first_mut(), r.shortcut.first_mut()) {
        (Some(Layer::Conv2d(a)), Some(Layer::Conv2d(b))) => {
            let names = (format!("{main_prefix}.0"), format!("{short_prefix}.0"));
            let [(ya, sa), (yb, sb)] = p.conv_forward_pair((&names.0, a), (&names.1, b), &x, mode)?;
            main_saved.push(sa);
            short_saved.push(sb);
            (ya, yb, (1, 1))
        }
        (Some(Layer::Conv2d(a)), _) => {
            let (ya, sa) = p.conv_forward(&format!("{main_prefix}.0"), false, a, &x, mode)?;
            main_saved.push(sa);
            (ya, x, (1, 0))
        }
        _ => (x.clone(), x, (0, 0)),
    };
    let (mut y, main) = forward_list(p, &mut r.main[skipped.0..], &main_prefix, skipped.0, main_head, mode)?;
    let (s, shortcut) = forward_list(p, &mut r.shortcut[skipped.1..], &short_prefix, skipped.1, short_head, mode)?;
    elementwise::add_assign(data_mut(&mut y), data(&s));
    main_saved.extend(main);
    short_saved.extend(shortcut);
    let saved =
        if mode == Mode::Train { Saved::Residual { main: main_saved, shortcut: short_saved } } else { Saved::Nothing };
    Ok((y, saved))
}

/// Moves a tensor out, leaving an empty one (no allocation) in its place.
fn take(t: &mut Tensor) -> Tensor {
    std::mem::replace(t, zeros(&[0]))
}

fn backward_list(
    p: &mut dyn Placement,
    layers: &[Layer],
    prefix: &str,
    dy: Tensor,
    saved: Vec<Saved>,
) -> PlacementResult<(Tensor, Vec<Tensor>)> {
    let mut per_layer = Vec::with_capacity(layers.len());
    let mut g = dy;
    for (i, (l, s)) in layers.iter().zip(saved).enumerate().rev() {
        let (dx, grads) = backward_layer(p, l, &format!("{prefix}.{i}"), take(&mut g), s)?;
        per_layer.push(grads);
        g = dx;
    }
    per_layer.reverse();
    Ok((g, per_layer.into_iter().flatten().collect()))
}

/// [`backward_list`] on an output gradient the caller keeps: the last layer reads it where it can
/// (convolutions, linear layers and batch-norm do; others get a copy).
fn backward_list_from(
    p: &mut dyn Placement,
    layers: &[Layer],
    prefix: &str,
    dy: &Tensor,
    mut saved: Vec<Saved>,
) -> PlacementResult<(Tensor, Vec<Tensor>)> {
    let (Some(last_saved), Some(last)) = (saved.pop(), layers.len().checked_sub(1)) else {
        return Ok((dy.clone(), Vec::new()));
    };
    let name = format!("{prefix}.{last}");
    let (g, last_grads) = match (&layers[last], last_saved) {
        (Layer::Conv2d(c), s) => p.conv_backward(&name, c, s, dy)?,
        (Layer::Linear(l), Saved::Input(x)) => p.linear_backward(&name, l, &x, dy)?,
        (bn @ Layer::BatchNorm(_), s) => bn.backward(dy, s),
        (other, s) => backward_layer(p, other, &name, dy.clone(), s)?,
    };
    let (dx, mut grads) = backward_list(p, &layers[..last], prefix, g, saved)?;
    grads.extend(last_grads);
    Ok((dx, grads))
}

fn backward_layer(
    p: &mut dyn Placement,
    layer: &Layer,
    name: &str,
    dy: Tensor,
    saved: Saved,
) -> PlacementResult<(Tensor, Vec<Tensor>)> {
    match (layer, saved) {
        (Layer::Conv2d(c), saved) => p.conv_backward(name, c, saved, &dy),
        (Layer::Linear(l), Saved::Input(x)) => p.linear_backward(name, l, &x, &dy),
        (Layer::Residual(r), Saved::Residual { main, shortcut }) => {
            // Both branches start from `dy`: the main branch's last layer reads it without
            // writing over it, so only the shortcut takes it (no copy for the main branch).
            let (mut dx, mut grads) = backward_list_from(p, &r.main, &format!("{name}.main"), &dy, main)?;
            let (ds, short) = backward_list(p, &r.shortcut, &format!("{name}.shortcut"), dy, shortcut)?;
            elementwise::add_assign(data_mut(&mut dx), data(&ds));
            grads.extend(short);
            Ok((dx, grads))
        }
        (l, s) => Ok(l.backward_owned(dy, s)),
    }
}

/// Updates one layer's parameters (the optimizer's `first`, `first + 1`, ...) with their
/// gradients, refusing the layer before any of its parameters changes if a gradient not
/// `known_finite` (empty: none is) holds NaN or infinite values.
fn update_layer(
    layer: &mut Layer,
    name: &str,
    opt: &mut Optimizer,
    grads: &[Tensor],
    known_finite: &[bool],
    first: usize,
    lr: f32,
) -> Result<(), RunnerError> {
    if let Some(j) = first_non_finite(grads, known_finite) {
        let param = layer.named_params().into_iter().nth(j).map_or_else(|| format!("{j}"), |(n, _)| n);
        return Err(RunnerError::NonFiniteGradient(format!("{name}.{param}")));
    }
    let params = layer.params_mut();
    assert_eq!(params.len(), grads.len(), "one gradient per parameter");
    for (j, (p, g)) in params.into_iter().zip(grads).enumerate() {
        opt.update(first + j, p, g, lr);
    }
    Ok(())
}

/// What a pass does with layer `i`'s parameter gradients as they come: `(model, i, first, grads)`,
/// `first` being the model's index of the layer's first parameter.
type LayerGradients<'a> = dyn FnMut(&mut Model, usize, usize, Vec<Tensor>) -> Result<(), RunnerError> + 'a;

/// One update of every parameter from `grads`, those flagged in `checked` known to be finite.
fn step_all(
    model: &mut Model,
    opt: &mut Optimizer,
    grads: &[Tensor],
    checked: &[bool],
    lr: f32,
) -> Result<(), RunnerError> {
    if let Err(i) = opt.step_known_finite(model.params_mut(), grads, checked, lr) {
        return Err(RunnerError::NonFiniteGradient(param_name(model, i)));
    }
    Ok(())
}

/// The name of the model's `i`-th parameter, for errors.
fn param_name(model: &Model, i: usize) -> String {
    model.named_params().into_iter().nth(i).map_or_else(|| format!("parameter {i}"), |(n, _)| n)
}

/// Whether any layer is a batch-norm (whose training-mode statistics mix the batch's samples).
pub(crate) fn has_batchnorm(layers: &[Layer]) -> bool {
    layers.iter().any(|l| match l {
        Layer::BatchNorm(_) => true,
        Layer::Residual(r) => has_batchnorm(&r.main) || has_batchnorm(&r.shortcut),
        _ => false,
    })
}
