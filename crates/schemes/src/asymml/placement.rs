//! The AsymML placement: per-sample splits inside the enclave, the residual's convolution on the
//! device, the low-rank part's convolution on r virtual channels in the enclave, concurrently.
//!
//! Each device call runs on one thread kept for the placement's life, beside the enclave's
//! products. The first layer's weight gradient is computed whole in the enclave (its input has
//! few channels, and nothing of its output gradient leaves). A projection block's input is split
//! once for both of its convolutions ([`Placement::conv_forward_pair`]).
//!
//! Not yet tried:
//! - Releasing a projection block's shared residual to the device once for both convolutions: a
//!   request with several weights would halve those bytes (the protocol takes one input per
//!   request).
//! - A device-side cache of the weights and residuals: each goes to the device twice per step, for
//!   the forward and the backward call (228 MB per VGG16 step).
//! - Moving the weights, the merge of the weight gradient and the optimizer to the device, as the
//!   paper's code does: the enclave would skip the optimizer (6-8 ms per VGG16 step) and the
//!   expansion (7-9 ms), but would release the low-rank terms in factored form, which needs its own
//!   argument about what they reveal.

use super::keystream::NoiseRng;
use super::lowrank::{find_basis_and_coordinates, residual_into, split_into, Basis, RankPolicy};
use super::noise::{clip_and_noise, Clipped};
use super::spares::Spares;
use super::virtual_conv as vc;
use super::{AsymmlConfig, BasisScope, PrivacyLedger, RankRule};
use crate::device_check::{
    check_backward_data, check_backward_weight, check_forward, secret, CheckTally, InputProjection, WeightCheck,
};
use crate::placement::{
    add_bias, crossing, lock, received, LayerSplit, PassInfo, Placement, PlacementReport, PlacementResult,
};
use crate::{RunnerError, SplitRunner};
use rand::SeedableRng;
use std::cell::RefCell;
use std::collections::{BTreeMap, HashMap};
use std::sync::{Arc, Mutex};
use std::time::Instant;
use trustsplit_boundary::secret::WireSize;
use trustsplit_boundary::{Released, Transcript};
use trustsplit_device::{Device, DeviceError, DeviceStats};
use trustsplit_kernels::conv::{conv2d_backward_weight_few_inputs, ConvGeometry};
use trustsplit_kernels::elementwise::{add_assign_finite, add_assign_with_bias_finite, all_finite, sum_f64_of};
use trustsplit_nn::layers::{Conv2d, Linear};
use trustsplit_nn::tensor::{data, from_vec};
use trustsplit_nn::{Layer, Mode, Model, Saved, Tensor};

const SCHEME: &str = super::INFO.name;

/// A runner that trains and evaluates under AsymML with `device` computing the residuals.
pub fn runner(
    device: Device,
    cfg: AsymmlConfig,
    memory_budget: usize,
    transcript: Arc<Transcript>,
) -> Result<SplitRunner, RunnerError> {
    validate(&cfg).map_err(RunnerError::Input)?;
    let placement = Asymml::new(device, cfg, transcript.clone())?;
    let stats = placement.device_stats();
    SplitRunner::new(&super::INFO, Box::new(placement), Some(memory_budget), transcript, Some(stats))
}

impl Asymml {
    fn new(device: Device, cfg: AsymmlConfig, transcript: Arc<Transcript>) -> Result<Asymml, RunnerError> {
        let device = Arc::new(Mutex::new(device));
        Ok(Asymml {
            rng: NoiseRng::from_os().map_err(RunnerError::Input)?,
            starts: match cfg.subspace_seed {
                Some(seed) => NoiseRng::seed_from_u64(seed),
                None => NoiseRng::from_os().map_err(RunnerError::Input)?,
            },
            cfg,
            device,
            transcript,
            waiting: Arc::new(Mutex::new(0.0)),
            pass: PassInfo { mode: Mode::Eval, batch: 0, couples_samples: false },
            conv_index: HashMap::new(),
            pending: HashMap::new(),
            totals: BTreeMap::new(),
            enclave_macs: 0,
            device_macs: 0,
            step_releases: 0,
            max_step_releases: 0,
            evaluation_releases: 0,
            max_evaluation_releases: 0,
            training_steps: 0,
            gradients_in_clear: false,
            checked: CheckTally::default(),
            phases: RefCell::new(BTreeMap::new()),
            spares: Spares::default(),
            device_caller: rayon::ThreadPoolBuilder::new()
                .num_threads(1)
                .thread_name(|_| "asymml-device-call".into())
                .build()
                .map_err(|e| RunnerError::Placement(format!("cannot start the thread that calls the device: {e}")))?,
        })
    }

    /// The device's statistics, with the time the enclave waited for it.
    fn device_stats(&self) -> Box<dyn Fn() -> DeviceStats + Send> {
        let (handle, wait) = (self.device.clone(), self.waiting.clone());
        Box::new(move || DeviceStats { device_seconds: *lock(&wait), ..lock(&handle).stats() })
    }
}

/// Checks a configuration's numbers, naming the command-line flag at fault.
pub fn validate(cfg: &AsymmlConfig) -> Result<(), String> {
    let z = cfg.noise_multiplier;
    if !(z.is_finite() && z >= 0.0) {
        return Err(format!("--noise-multiplier must be a finite number >= 0, got {z}"));
    }
    for (name, v) in [("--clip-norm", cfg.clip_norm), ("--grad-clip-norm", cfg.grad_clip_norm)] {
        if !(v.is_finite() && v > 0.0) {
            return Err(format!("{name} must be a positive number, got {v}"));
        }
    }
    if !(cfg.delta > 0.0 && cfg.delta < 1.0) {
        return Err(format!("--delta must lie strictly between 0 and 1, got {}", cfg.delta));
    }
    if let Some(clip) = cfg.dp_sgd_clip {
        if !(clip.is_finite() && clip > 0.0) {
            return Err(format!("--dp-clip must be a positive number, got {clip}"));
        }
        if z == 0.0 {
            return Err("--dp full needs noise: --noise-multiplier 0 (or no --epsilon) leaves the updates bare".into());
        }
        if !cfg.protect_gradients {
            return Err("--dp full bounds the device's whole view, which --protect-gradients off (output gradients \
                        in the clear) breaks: use them apart"
                .into());
        }
    }
    match &cfg.rank {
        RankRule::Schedule(s) if s.is_empty() || s.contains(&0) => {
            Err(format!("the rank schedule needs at least one rank and no zeros, got {s:?}"))
        }
        RankRule::Energy { tau, max_rank } if !(*tau > 0.0 && *tau < 1.0) || *max_rank == 0 => Err(format!(
            "the energy threshold must lie in (0, 1) and the maximum rank be >= 1, got {tau} and {max_rank}"
        )),
        _ => Ok(()),
    }
}

/// Samples `start..start + len` sharing one basis, and their coordinates in it.
#[derive(Clone)]
struct Group {
    start: usize,
    len: usize,
    basis: Basis,
    /// `len x rank x positions`.
    v: Vec<f32>,
}

/// A batch split into low-rank groups and a residual (`N x C x P`), with each sample's residual
/// norm (computed by the split, for the clipping).
struct Decomposition {
    groups: Vec<Group>,
    residual: Vec<f32>,
    norms: Vec<f64>,
}

/// What a layer's forward pass released, kept (outside the enclave: it is already public) until
/// its backward pass. (The weight is released again, without a copy, when the backward pass sends
/// it.)
struct Pending {
    /// Shared by the convolutions that read the same input ([`Asymml::forward_sharing_split`]).
    residual: Option<Arc<Released<Vec<f32>>>>,
    /// What the enclave kept of that residual to check the device's weight gradient
    /// (`verify_device`), shared like it.
    input_check: Option<Arc<InputProjection>>,
    /// The weight's projections the forward pass checked with, to check the input gradient.
    weight_check: Option<WeightCheck>,
    is_input: bool,
    index: usize,
    in_shape: Vec<usize>,
}

#[derive(Default)]
struct SplitTotals {
    rank_samples: f64,
    samples: u64,
    residual_energy: f64,
    total_energy: f64,
    released: u64,
    clipped: u64,
}

/// The AsymML placement (see the module docs of [`super`] for what it releases).
pub struct Asymml {
    cfg: AsymmlConfig,
    device: Arc<Mutex<Device>>,
    transcript: Arc<Transcript>,
    /// Seconds the enclave sat idle waiting for the device.
    waiting: Arc<Mutex<f64>>,
    rng: NoiseRng,
    /// The fast subspace's random start blocks and the samples a batch-wide basis is computed
    /// from: a generator of their own, drawn the same way whatever the data, so that a group's
    /// start depends on nothing but its position in the run (and `subspace_seed`). Apart from
    /// the noise's, which a seed must never reach.
    starts: NoiseRng,
    pass: PassInfo,
    conv_index: HashMap<String, usize>,
    pending: HashMap<String, Pending>,
    totals: BTreeMap<(usize, String, &'static str), SplitTotals>,
    enclave_macs: u64,
    device_macs: u64,
    step_releases: u64,
    max_step_releases: u64,
    /// The same for evaluation passes: releases charged to each example evaluated.
    evaluation_releases: u64,
    max_evaluation_releases: u64,
    training_steps: u64,
    gradients_in_clear: bool,
    /// The device's result values checked so far (`verify_device`).
    checked: CheckTally,
    /// Enclave seconds per phase (subspace, split, noise, low-rank products, merge).
    phases: Phases,
    /// Released residuals and device results, reused as buffers for outputs written in full.
    spares: Spares,
    /// The one thread that makes [`Asymml::overlapped`]'s device calls, kept for the placement's
    /// life: a thread spawned and joined per call (two per convolution and step) cost
    /// 50-73 us against 10-33 us for a job on a kept thread (a throwaway timing, 2026-12-03).
    device_caller: rayon::ThreadPool,
}

type Phases = RefCell<BTreeMap<&'static str, f64>>;

/// Runs `f`, adding its wall time to `phase`.
fn timed<T>(phases: &Phases, phase: &'static str, f: impl FnOnce() -> T) -> T {
    let start = Instant::now();
    let out = f();
    *phases.borrow_mut().entry(phase).or_default() += start.elapsed().as_secs_f64();
    out
}

/// Whether a policy keeps every direction, leaving an all-zero residual: then nothing is released.
/// Decided from shapes only, so that whether a release happens reveals nothing about the data.
fn keeps_everything(policy: RankPolicy, channels: usize, group_positions: usize) -> bool {
    matches!(policy, RankPolicy::Fixed(r) if r >= channels.min(group_positions))
}

/// How many samples share one basis in a batch of `n`.
fn group_len(basis: BasisScope, n: usize) -> usize {
    match basis {
        BasisScope::Sample => 1,
        BasisScope::Batch => n.max(1),
    }
}

/// Gaussian releases charged to each sample for one release over a batch of `n`: 1, or `4n - 3`
/// when the release depends on the whole batch (its own residual moves by up to the bound, each of
/// the `n - 1` others by up to twice the bound, both versions being clipped).
fn release_charge(coupled: bool, n: u64) -> u64 {
    if coupled && n > 1 {
        4 * n - 3
    } else {
        1
    }
}

/// The Gaussian releases one training step charges to each sample of a full batch of `batch`:
/// the same decisions as the placement makes (which layers release, which releases depend on the
/// whole batch), taken from the model's shapes before any data is seen. Used to calibrate the
/// noise for a target epsilon; tests check it against the placement's own count.
pub fn releases_per_step(model: &Model, cfg: &AsymmlConfig, batch: usize) -> u64 {
    // Under --dp full each sample runs its own pass: nothing couples it with the others.
    let batch = if cfg.dp_sgd_clip.is_some() { 1 } else { batch };
    let coupled_model = crate::runner::has_batchnorm(&model.layers);
    let group = group_len(cfg.basis, batch);
    let charge = |own_sample_only: bool| {
        release_charge(cfg.basis == BasisScope::Batch || (coupled_model && !own_sample_only), batch as u64)
    };
    let mut convs = Vec::new();
    collect_convs(&model.layers, &model.input_shape, true, &mut convs);
    let mut total = 0;
    for (index, site) in convs.iter().enumerate() {
        let policy = cfg.rank.policy(index);
        let g = &site.geometry;
        // A projection shortcut's input was split and released with its block's first convolution.
        let forward = !site.shares_split && !keeps_everything(policy, g.in_channels, g.in_h * g.in_w * group);
        if forward {
            total += charge(site.is_input);
        }
        // The first layer's output gradient stays in the enclave (`conv_backward`).
        let out_positions = g.out_h() * g.out_w() * group;
        if cfg.protect_gradients && !site.is_input && !keeps_everything(policy, g.out_channels, out_positions) {
            total += charge(false);
        }
    }
    // `--dp full`: the step's noised update, to which each sample adds its clipped gradient once.
    total + u64::from(cfg.dp_sgd_clip.is_some())
}

/// The Gaussian releases one evaluation charges to each example of a full batch of `batch`, as
/// [`releases_per_step`] counts them: the forward residuals only, coupled only by a batch-wide
/// basis (batch-norm uses its running statistics).
pub fn releases_per_evaluation(model: &Model, cfg: &AsymmlConfig, batch: usize) -> u64 {
    let group = group_len(cfg.basis, batch);
    let mut convs = Vec::new();
    collect_convs(&model.layers, &model.input_shape, true, &mut convs);
    let charge = release_charge(cfg.basis == BasisScope::Batch, batch as u64);
    let released = convs.iter().enumerate().filter(|(index, site)| {
        let g = &site.geometry;
        !site.shares_split && !keeps_everything(cfg.rank.policy(*index), g.in_channels, g.in_h * g.in_w * group)
    });
    released.count() as u64 * charge
}

/// A convolution as [`releases_per_step`] sees it.
struct ConvSite {
    geometry: ConvGeometry,
    /// The model's first layer.
    is_input: bool,
    /// A projection shortcut, whose input is split with its block's first convolution.
    shares_split: bool,
}

/// Every convolution's geometry (batch 1) in the order the placement first meets them (the
/// runner's order, a residual block's two leading convolutions together), and how it is split.
fn collect_convs(layers: &[Layer], shape: &[usize], top_level: bool, out: &mut Vec<ConvSite>) {
    let mut shape = shape.to_vec();
    let with_batch = |shape: &[usize]| -> Vec<usize> { std::iter::once(1).chain(shape.iter().copied()).collect() };
    for (i, layer) in layers.iter().enumerate() {
        match layer {
            Layer::Conv2d(c) => {
                out.push(ConvSite {
                    geometry: c.geometry(&with_batch(&shape)),
                    is_input: top_level && i == 0,
                    shares_split: false,
                });
            }
            Layer::Residual(r) => match (r.main.first(), r.shortcut.first()) {
                (Some(Layer::Conv2d(a)), Some(Layer::Conv2d(b))) => {
                    let in_shape = with_batch(&shape);
                    out.push(ConvSite { geometry: a.geometry(&in_shape), is_input: false, shares_split: false });
                    out.push(ConvSite { geometry: b.geometry(&in_shape), is_input: false, shares_split: true });
                    let after = |l: &Layer| l.output_shape(&shape).expect("a validated model");
                    collect_convs(&r.main[1..], &after(&r.main[0]), false, out);
                    collect_convs(&r.shortcut[1..], &after(&r.shortcut[0]), false, out);
                }
                _ => {
                    collect_convs(&r.main, &shape, false, out);
                    collect_convs(&r.shortcut, &shape, false, out);
                }
            },
            _ => {}
        }
        shape = layer.output_shape(&shape).expect("a validated model");
    }
}

impl Asymml {
    fn index_of(&mut self, layer: &str) -> usize {
        if let Some(&i) = self.conv_index.get(layer) {
            return i; // every step after the first: no allocation
        }
        let next = self.conv_index.len();
        self.conv_index.insert(layer.to_string(), next);
        next
    }

    /// Splits `x` (`n` samples of `c x p`) into per-group bases, coordinates and a residual, for
    /// the `index`-th convolution (`layer`) under `policy`. An error where no subspace exists:
    /// values that are NaN or infinite, as a run whose weights have blown up produces.
    fn decompose(
        &mut self,
        (index, layer): (usize, &str),
        what: &'static str,
        policy: RankPolicy,
        x: &[f32],
        (n, c, p): (usize, usize, usize),
    ) -> PlacementResult<Decomposition> {
        let per = c * p;
        let step = group_len(self.cfg.basis, n);
        // Every sample's residual is written below (`residual_into` or `split_into`).
        let mut residual = self.spares.take(n * per);
        let mut norms = vec![0.0f64; n];
        let mut groups = Vec::new();
        let totals = self.totals.entry((index, layer.to_string(), what)).or_default();
        for start in (0..n).step_by(step) {
            let len = step.min(n - start);
            let samples: Vec<&[f32]> = (start..start + len).map(|b| &x[b * per..(b + 1) * per]).collect();
            let cannot_split =
                |e: String| format!("training diverged: {layer}'s {what} cannot be split: {e}; {DIVERGED}");
            let group = Samples { values: &samples, first: start, positions: p };
            let out = &mut residual[start * per..(start + len) * per];
            let started = Instant::now();
            // Each group's basis is its own samples' alone: nothing carries over between groups.
            let (basis, coordinates) =
                find_basis_and_coordinates(&samples, c, p, policy, self.cfg.subspace, &mut self.starts)
                    .map_err(cannot_split)?;
            let subspace_seconds = started.elapsed().as_secs_f64();
            let split = split_group(&basis, coordinates, &group, out, &mut norms[start..start + len])
                .map_err(|b| unsplittable(layer, what, b, &x[b * per..(b + 1) * per]))?;
            self.enclave_macs += basis.macs + split.macs;
            let mut phases = self.phases.borrow_mut();
            *phases.entry("subspace").or_default() += subspace_seconds;
            *phases.entry("split").or_default() += started.elapsed().as_secs_f64() - subspace_seconds;
            drop(phases);
            let v = split.coordinates;
            totals.rank_samples += (basis.rank * len) as f64;
            totals.samples += len as u64;
            totals.residual_energy += split.residual_energy;
            totals.total_energy += split.total_energy;
            groups.push(Group { start, len, basis, v });
        }
        Ok(Decomposition { groups, residual, norms })
    }

    fn count_clipped(&mut self, index: usize, layer: &str, what: &'static str, c: Clipped) {
        let t = self.totals.entry((index, layer.to_string(), what)).or_default();
        t.released += c.samples as u64;
        t.clipped += c.clipped as u64;
    }

    /// Charges one release to the privacy ledger: to the training samples in a training pass, to
    /// the evaluated examples otherwise.
    fn charge(&mut self, depends_on_own_sample_only: bool) {
        let coupled = self.cfg.basis == BasisScope::Batch || (self.pass.couples_samples && !depends_on_own_sample_only);
        let charge = release_charge(coupled, self.pass.batch as u64);
        match self.pass.mode {
            Mode::Train => self.step_releases += charge,
            // Evaluation releases concern the examples evaluated (test data), accounted apart.
            _ => self.evaluation_releases += charge,
        }
    }

    fn release<T: WireSize>(&self, layer: &str, kind: &str, shape: &[usize], values: T, reason: &str) -> Released<T> {
        Released::new(&self.transcript, crossing(SCHEME, layer, kind, shape, reason), values)
    }

    /// The layer's weight, released in place (no copy: the device reads it while the enclave
    /// leaves it untouched, and the optimizer changes it only after the step).
    fn release_weight<'w>(&self, layer: &str, conv: &'w Conv2d) -> Released<&'w [f32]> {
        let why = "the model's weights are public to the device in AsymML (not covered by the DP accounting)";
        self.release(layer, "weight", conv.weight.shape(), data(&conv.weight), why)
    }

    fn residual_kind(&self, gradient: bool) -> (&'static str, &'static str) {
        match (gradient, self.cfg.noise_multiplier > 0.0) {
            (false, true) => ("noised-residual", "residual after the top-r split, clipped, with Gaussian noise"),
            (false, false) => ("residual", "residual after the top-r split (no noise: --noise-multiplier 0)"),
            (true, true) => (
                "noised-gradient-residual",
                "output-gradient residual after the top-r split, clipped, with Gaussian noise",
            ),
            (true, false) => ("gradient-residual", "output-gradient residual after the top-r split (no noise)"),
        }
    }

    fn received(&self, layer: &str, kind: &str, shape: &[usize], values: Vec<f32>) -> PlacementResult<Vec<f32>> {
        received(&self.transcript, SCHEME, layer, kind, shape, values)
    }

    /// Runs `device_work` on the device while the enclave runs `enclave_work`; the time the enclave
    /// then waits for the device is counted as device time.
    fn overlapped<T: Send, U>(
        &self,
        layer: &str,
        device_work: impl FnOnce(&mut Device) -> Result<T, DeviceError> + Send,
        enclave_work: impl FnOnce() -> U,
    ) -> PlacementResult<(T, U)> {
        let device = &self.device;
        let mut theirs = None;
        let mut waited = None;
        // The enclave's work runs here, on this thread; the device call on `device_caller`. The
        // scope ends when both are done.
        let mine = self.device_caller.in_place_scope(|s| {
            s.spawn(|_| {
                theirs =
                    Some(std::panic::catch_unwind(std::panic::AssertUnwindSafe(|| device_work(&mut lock(device)))));
            });
            let mine = timed(&self.phases, "low-rank products", enclave_work);
            waited = Some(Instant::now());
            mine
        });
        *lock(&self.waiting) += waited.map_or(0.0, |w| w.elapsed().as_secs_f64());
        let theirs = theirs
            .expect("the scope ends after its job")
            .map_err(|_| format!("the device thread panicked on {layer}"))?;
        Ok((theirs.map_err(|e| format!("device failed on {layer}: {e}"))?, mine))
    }

    /// The forward passes of convolutions reading the same input `x`: it is split once, under the
    /// first convolution's rank policy, and its noised residual released once (named after the
    /// first, charged once); each convolution then runs its own device and low-rank products.
    /// Each convolution keeps its own index (its output gradient is split under its own policy).
    fn forward_sharing_split(
        &mut self,
        convs: &[(&str, &Conv2d)],
        is_input: bool,
        x: &Tensor,
        mode: Mode,
    ) -> PlacementResult<Vec<(Tensor, Saved)>> {
        let (layer, first) = convs[0];
        let g = first.geometry(x.shape());
        let (n, c, p) = (g.batch, g.in_channels, g.in_h * g.in_w);
        let indices: Vec<usize> = convs.iter().map(|(name, _)| self.index_of(name)).collect();
        let policy = self.cfg.rank.policy(indices[0]);
        // The split's statistics and errors name every convolution it serves.
        let names: Vec<&str> = convs.iter().map(|(name, _)| *name).collect();
        let split_name = names.join(" + ");
        let mut parts = self.decompose((indices[0], &split_name), "forward", policy, data(x), (n, c, p))?;
        let released = if keeps_everything(policy, c, p * group_len(self.cfg.basis, n)) {
            None
        } else {
            let bound = self.cfg.clip_norm * ((c * p) as f64).sqrt();
            let z = self.cfg.noise_multiplier;
            let clipped = timed(&self.phases, "noise", || {
                clip_and_noise(&mut parts.residual, c * p, &parts.norms, bound, z, &mut self.rng)
            });
            self.count_clipped(indices[0], &split_name, "forward", clipped);
            self.charge(is_input);
            let (kind, why) = self.residual_kind(false);
            let why = match &names[..] {
                [_, others @ ..] if !others.is_empty() => format!("{why}; also the input of {}", others.join(", ")),
                _ => why.to_string(),
            };
            Some(Arc::new(self.release(layer, kind, x.shape(), std::mem::take(&mut parts.residual), &why)))
        };
        // The device's backward results for these convolutions, checked where there are any (the
        // first layer's backward runs whole in the enclave; `conv_backward`).
        let checks_backward = mode == Mode::Train && !is_input && self.cfg.verify_device;
        // The device keeps the residual until the backward pass, where the host could swap it: to
        // check the weight gradient computed from it, the enclave keeps a secret projection now.
        let input_check = match &released {
            Some(r) if checks_backward => {
                let t = secret(&mut self.rng, c);
                Some(Arc::new(timed(&self.phases, "verify", || InputProjection::new(&g, r.get(), t))))
            }
            _ => None,
        };
        let mut out = Vec::with_capacity(convs.len());
        for (k, (&(name, conv), &index)) in convs.iter().zip(&indices).enumerate() {
            let (y, weight_check) =
                self.forward_products(name, conv, &parts.groups, released.as_deref(), x.shape(), checks_backward)?;
            if mode != Mode::Train {
                out.push((y, Saved::Nothing));
                continue;
            }
            let residual = released.clone();
            let input_check = input_check.clone();
            let in_shape = x.shape().to_vec();
            let pending = Pending { residual, input_check, weight_check, is_input, index, in_shape };
            self.pending.insert(name.to_string(), pending);
            // The last convolution takes the factors; the others get copies (bases and
            // coordinates: r channels, not C).
            let groups = if k + 1 == convs.len() { std::mem::take(&mut parts.groups) } else { parts.groups.clone() };
            out.push((y, save_groups(groups, g.in_h, g.in_w)));
        }
        if let Some(released) = released {
            // Kept by the pending backward passes in training; done with otherwise.
            if let Ok(released) = Arc::try_unwrap(released) {
                self.spares.keep(released.into_inner());
            }
        }
        Ok(out)
    }

    /// One convolution's output from the split of its input: the enclave's low-rank products,
    /// plus (where a residual was released) the device's convolution of it, merged. With
    /// `verify_device`, also the weight's projections it checked the device's output with (with
    /// `checks_backward`, also those the backward pass checks the input gradient with).
    fn forward_products(
        &mut self,
        layer: &str,
        conv: &Conv2d,
        groups: &[Group],
        residual: Option<&Released<Vec<f32>>>,
        in_shape: &[usize],
        checks_backward: bool,
    ) -> PlacementResult<(Tensor, Option<WeightCheck>)> {
        let g = conv.geometry(in_shape);
        let (n, out_c, out_hw) = (g.batch, g.out_channels, g.out_h() * g.out_w());
        let out_shape = [n, out_c, g.out_h(), g.out_w()];
        // `low_rank_forward` overwrites all of it, in both branches below.
        let mut y = self.spares.take(n * out_c * out_hw);
        let Some(residual) = residual else {
            self.enclave_macs += timed(&self.phases, "low-rank products", || {
                vc::low_rank_forward(&g, data(&conv.weight), &factors(groups), &mut y)
            });
            add_bias(&mut y, conv.bias.as_ref(), out_c, out_hw);
            return Ok((from_vec(&out_shape, y), None));
        };
        let weight_check = self.cfg.verify_device.then(|| {
            let s = secret(&mut self.rng, out_c);
            let t = checks_backward.then(|| secret(&mut self.rng, g.in_channels));
            timed(&self.phases, "verify", || WeightCheck::new(&g, data(&conv.weight), s, t))
        });
        let weight = self.release_weight(layer, conv);
        let (from_device, macs) = self.overlapped(
            layer,
            |d| d.conv_forward(&g, residual, &weight),
            || vc::low_rank_forward(&g, data(&conv.weight), &factors(groups), &mut y),
        )?;
        self.enclave_macs += macs;
        self.device_macs += g.forward_macs();
        let from_device = self.received(layer, "output", &out_shape, from_device)?;
        let finite = match &conv.bias {
            Some(b) => add_assign_with_bias_finite(&mut y, &from_device, data(b), out_hw),
            None => add_assign_finite(&mut y, &from_device),
        };
        if !finite {
            let terms = g.in_channels * g.kernel_h * g.kernel_w;
            return Err(device_fault(layer, "output", (data(&conv.weight), residual.get(), terms)));
        }
        if let Some(weight) = &weight_check {
            let checked = timed(&self.phases, "verify", || check_forward(&g, weight, residual.get(), &from_device));
            self.checked.add(checked.map_err(|e| format!("{layer}: {e}"))?);
        }
        self.spares.keep(from_device);
        Ok((from_vec(&out_shape, y), weight_check))
    }
}

/// The groups as the virtual-channel kernels see them.
fn factors(groups: &[Group]) -> Vec<vc::Factors<'_>> {
    groups
        .iter()
        .map(|g| vc::Factors { start: g.start, len: g.len, rank: g.basis.rank, basis: &g.basis.u, coords: &g.v })
        .collect()
}

type Gradients = (Option<Vec<f32>>, Option<Vec<f32>>);

/// The device's share of a convolution's backward pass: the input gradient when given the weight,
/// the weight gradient when given the released input residual.
fn device_backward(
    d: &mut Device,
    g: &ConvGeometry,
    grad: &Released<Vec<f32>>,
    weight: Option<&Released<&[f32]>>,
    x_residual: Option<&Released<Vec<f32>>>,
) -> Result<Gradients, DeviceError> {
    let dx = weight.map(|w| d.conv_backward_data(g, grad, w)).transpose()?;
    let dw = x_residual.map(|x| d.conv_backward_weight(g, x, grad)).transpose()?;
    Ok((dx, dw))
}

/// The enclave's saved context: for each group, its basis `U` (C x r) and coordinates `V`.
fn save_groups(groups: Vec<Group>, h: usize, w: usize) -> Saved {
    let mut list = Vec::with_capacity(2 * groups.len());
    for g in groups {
        let (c, r) = (g.basis.channels, g.basis.rank);
        list.push(from_vec(&[c, r], g.basis.u));
        list.push(from_vec(&[g.len, r, h, w], g.v));
    }
    Saved::Tensors(list)
}

fn restore_groups(layer: &str, saved: Saved) -> PlacementResult<Vec<Group>> {
    let Saved::Tensors(list) = saved else {
        return Err(format!("{layer}: expected AsymML's saved factors, found {saved:?}"));
    };
    if list.len() % 2 != 0 {
        return Err(format!("{layer}: saved factors come in pairs, found {}", list.len()));
    }
    let mut groups = Vec::with_capacity(list.len() / 2);
    let mut start = 0;
    let mut it = list.into_iter();
    while let (Some(u), Some(v)) = (it.next(), it.next()) {
        let (c, r, len) = (u.shape()[0], u.shape()[1], v.shape()[0]);
        let basis =
            Basis { channels: c, rank: r, u: data(&u).to_vec(), total_energy: 0.0, residual_energy: 0.0, macs: 0 };
        groups.push(Group { start, len, basis, v: data(&v).to_vec() });
        start += len;
    }
    Ok(groups)
}

/// What a diverged AsymML run can change, ending each of its errors.
const DIVERGED: &str = "try a smaller --lr, less noise or --max-grad-norm";

/// A group of samples to split: `values[i]` is sample `first + i` of the batch, `positions` long
/// per channel.
struct Samples<'a> {
    values: &'a [&'a [f32]],
    first: usize,
    positions: usize,
}

/// A group's split: the coordinates `V`, and the energies as split (a sampled basis' own are
/// those of its sample).
struct GroupSplit {
    coordinates: Vec<f32>,
    residual_energy: f64,
    /// `||V||^2 + ||R||^2`, since `R` is orthogonal to the basis.
    total_energy: f64,
    macs: u64,
}

/// Splits every sample of `group` with `basis` into `residual` (the group's part, overwritten)
/// and `norms` (each residual's L2 norm), taking the coordinates where the subspace gave them
/// and projecting otherwise. `Err(b)`: sample `b`'s residual is not finite, which nothing may
/// release: values near f32's range overflow the subspace's products (a NaN basis) though each
/// is finite, or the sample holds NaN that a sampled basis did not see.
fn split_group(
    basis: &Basis,
    coordinates: Option<Vec<f32>>,
    group: &Samples,
    residual: &mut [f32],
    norms: &mut [f64],
) -> Result<GroupSplit, usize> {
    let (p, len) = (group.positions, group.values.len());
    let rp = basis.rank * p;
    let given = coordinates.is_some();
    let mut v = coordinates.unwrap_or_else(|| vec![0.0f32; len * rp]);
    let (mut residual_energy, mut low_rank_energy) = (0.0, 0.0);
    let per = residual.len() / len.max(1);
    for (i, x) in group.values.iter().enumerate() {
        let (v_i, out) = (&mut v[i * rp..(i + 1) * rp], &mut residual[i * per..(i + 1) * per]);
        let energy = if given { residual_into(basis, x, p, v_i, out) } else { split_into(basis, x, p, v_i, out) };
        if !energy.is_finite() {
            return Err(group.first + i);
        }
        norms[i] = energy.sqrt();
        residual_energy += energy;
        low_rank_energy += sum_f64_of(v_i, |v| v * v);
    }
    // Multiply-adds: the residual's `U v`, and `U^T X` where the split projects.
    let macs = if given { 1 } else { 2 } * (len * per * basis.rank) as u64;
    Ok(GroupSplit { coordinates: v, residual_energy, total_energy: low_rank_energy + residual_energy, macs })
}

/// The error for a weight gradient holding NaN or infinite values. Every convolution's weight
/// gradient is checked here, as it is made ([`Placement::checks_conv_weight_gradients`]), and the
/// step refused before the update, as the optimizer would.
fn non_finite_weight_gradient(layer: &str) -> String {
    format!("training diverged: {layer}'s weight gradient holds NaN or infinite values; {DIVERGED}")
}

/// The error for a split whose residual came out non-finite for sample `b` (`sample` its values):
/// values near f32's range overflow the subspace's products (each finite, the basis NaN), or the
/// sample holds NaN or infinite values itself (a sampled basis does not see every sample).
fn unsplittable(layer: &str, what: &str, b: usize, sample: &[f32]) -> String {
    let cause = if sample.iter().all(|v| v.is_finite()) {
        let largest = sample.iter().fold(0.0f32, |m, v| m.max(v.abs()));
        format!("the values reach {largest:.3e}, beyond what f32 products can take")
    } else {
        "it holds NaN or infinite values".to_string()
    };
    format!(
        "training diverged: {layer}'s {what} cannot be split: sample {b}'s residual is not finite ({cause}); \
         {DIVERGED}"
    )
}

/// The error for a device result holding NaN or infinite values, from a product of `weight` (the
/// enclave's) and the released `operand`, each result value a sum of at most `terms` products.
/// Where the weight is not finite, or so large that such a sum can leave f32's range (an honest
/// device's result may then overflow), training diverged; otherwise no honest device could have
/// returned these values (AsymML does not verify the device's arithmetic, but these cannot be
/// used).
fn device_fault(layer: &str, what: &str, (weight, operand, terms): (&[f32], &[f32], usize)) -> String {
    let largest = |v: &[f32]| v.iter().fold(0.0f64, |m, x| m.max(f64::from(x.abs())));
    if !weight.iter().all(|v| v.is_finite()) {
        return format!("training diverged: {layer}'s weight holds NaN or infinite values; {DIVERGED}");
    }
    // Rounding adds far less than a factor 2 to a sum of `terms` products in f32.
    let (w, x) = (largest(weight), largest(operand));
    if w * x * terms as f64 >= f64::from(f32::MAX) / 2.0 {
        return format!(
            "training diverged: {layer}'s weight has grown so large (largest magnitude {w:.3e}, against \
             {x:.3e} in what it multiplies) that its {what} overflows; {DIVERGED}"
        );
    }
    format!(
        "the device returned NaN or infinite values as {layer}'s {what}: a faulty or malicious device \
         (its results are not verified, and these cannot be used)"
    )
}

/// `U v` plus the residual for every sample: the tensor the device and enclave together act on.
fn recombine(groups: &[Group], residual: &[f32], positions: usize) -> Vec<f32> {
    let mut out = residual.to_vec();
    for (g, f) in groups.iter().zip(factors(groups)) {
        let per = g.basis.channels * positions;
        vc::rebuild(&f, g.basis.channels, positions, &mut out[g.start * per..(g.start + g.len) * per], true);
    }
    out
}

impl Placement for Asymml {
    fn weights_are_public(&self) -> bool {
        true
    }

    fn begin_pass(&mut self, pass: &PassInfo) {
        if pass.mode == Mode::Train {
            self.max_step_releases = self.max_step_releases.max(self.step_releases);
            self.step_releases = 0;
            self.training_steps += 1;
        } else {
            self.max_evaluation_releases = self.max_evaluation_releases.max(self.evaluation_releases);
            self.evaluation_releases = 0;
        }
        self.pending.clear();
        self.spares.begin_pass();
        self.pass = *pass;
    }

    fn conv_forward(
        &mut self,
        layer: &str,
        is_input: bool,
        conv: &Conv2d,
        x: &Tensor,
        mode: Mode,
    ) -> PlacementResult<(Tensor, Saved)> {
        let mut out = self.forward_sharing_split(&[(layer, conv)], is_input, x, mode)?;
        Ok(out.pop().expect("one output per convolution"))
    }

    /// One split of `x` for both: one subspace, one noised residual released (and charged), which
    /// the device convolves with both weights.
    fn conv_forward_pair(
        &mut self,
        first: (&str, &Conv2d),
        second: (&str, &Conv2d),
        x: &Tensor,
        mode: Mode,
    ) -> PlacementResult<[(Tensor, Saved); 2]> {
        let out = self.forward_sharing_split(&[first, second], false, x, mode)?;
        Ok(out.try_into().unwrap_or_else(|_| unreachable!("one output per convolution")))
    }

    fn checks_conv_weight_gradients(&self) -> bool {
        true // in `merge_device`, as the expansion writes it, or in full for the first layer
    }

    /// The checks' state kept for the backward pass (an input projection shared by a block's two
    /// convolutions counted once).
    fn retained_bytes(&self) -> usize {
        let mut inputs: Vec<*const InputProjection> = Vec::new();
        let mut bytes = 0;
        for p in self.pending.values() {
            bytes += p.weight_check.as_ref().map_or(0, WeightCheck::bytes);
            if let Some(input) = &p.input_check {
                if !inputs.contains(&Arc::as_ptr(input)) {
                    inputs.push(Arc::as_ptr(input));
                    bytes += input.bytes();
                }
            }
        }
        bytes
    }

    fn conv_backward(
        &mut self,
        layer: &str,
        conv: &Conv2d,
        saved: Saved,
        dy: &Tensor,
    ) -> PlacementResult<(Tensor, Vec<Tensor>)> {
        let pending = self.pending.remove(layer).ok_or_else(|| format!("{layer}: backward without a forward pass"))?;
        let x_groups = restore_groups(layer, saved)?;
        let g = conv.geometry(&pending.in_shape);
        let (n, out_c, out_hw) = (g.batch, g.out_channels, g.out_h() * g.out_w());
        let w = data(&conv.weight);
        let db = conv.bias.as_ref().map(|_| crate::placement::bias_gradient(dy, out_c));
        let need_dx = !pending.is_input;
        // With protected gradients `low_rank_input_gradient` overwrites all of the input gradient;
        // otherwise the device's is added to zeros.
        let mut dx = if need_dx && self.cfg.protect_gradients {
            self.spares.take(g.input_len())
        } else {
            vec![0.0f32; g.input_len()]
        };

        let dw = if !need_dx {
            // The first layer: no input gradient is wanted, so the device's only use would be the
            // residual's weight gradient. Its input has few channels, so the whole product
            // `corr(X, dY)` costs the enclave less than splitting and noising the output
            // gradient would, and nothing of the gradient leaves the enclave.
            match &pending.residual {
                None => {
                    let xf = factors(&x_groups);
                    let mut low_rank = vc::LowRankWeightGradient::default();
                    self.enclave_macs +=
                        timed(&self.phases, "low-rank products", || low_rank.add_input_side(&g, &xf, data(dy)));
                    self.merge_device((layer, w, &[]), &g, None, None, &mut dx, low_rank)?
                }
                Some(residual) => {
                    // The input the forward pass convolved: low-rank part plus the noised residual.
                    let x = timed(&self.phases, "split", || recombine(&x_groups, residual.get(), g.in_h * g.in_w));
                    let mut dw = vec![0.0f32; g.weight_len()];
                    timed(&self.phases, "first-layer weight gradient", || {
                        conv2d_backward_weight_few_inputs(&g, &x, data(dy), &mut dw)
                    });
                    self.enclave_macs += g.forward_macs();
                    if !all_finite(&dw) {
                        return Err(non_finite_weight_gradient(layer));
                    }
                    dw
                }
            }
        } else if self.cfg.protect_gradients {
            let policy = self.cfg.rank.policy(pending.index);
            let mut gparts =
                self.decompose((pending.index, layer), "gradient", policy, data(dy), (n, out_c, out_hw))?;
            let releases = !keeps_everything(policy, out_c, out_hw * group_len(self.cfg.basis, n));
            if releases {
                // The bound applies to the gradient of the sample's own loss: n times the batch mean's.
                let bound = self.cfg.grad_clip_norm * ((out_c * out_hw) as f64).sqrt() / n as f64;
                let z = self.cfg.noise_multiplier;
                let clipped = timed(&self.phases, "noise", || {
                    clip_and_noise(&mut gparts.residual, out_c * out_hw, &gparts.norms, bound, z, &mut self.rng)
                });
                self.count_clipped(pending.index, layer, "gradient", clipped);
                self.charge(false);
            } else {
                gparts.residual.fill(0.0); // only rounding is left; the enclave keeps the whole gradient
            }
            // The input side's `corr(U V, dY)` wants the whole effective gradient `P Q + R`: by
            // pairs of factors where every group is factored (`corr(U V, R)` plus the small
            // `P corr(V, Q)`), else on the rebuilt tensor.
            let (xf, gf) = (factors(&x_groups), factors(&gparts.groups));
            let by_pairs = releases && vc::LowRankWeightGradient::pairs_cover(&g, &xf, &gf);
            let dy_effective = if by_pairs {
                None
            } else {
                Some(timed(&self.phases, "split", || recombine(&gparts.groups, &gparts.residual, out_hw)))
            };
            let residual_released = pending.residual.is_some();
            let device_dx = need_dx && releases;
            let device_dw = residual_released && releases;
            let grad = if releases {
                let (kind, why) = self.residual_kind(true);
                Some(self.release(layer, kind, dy.shape(), std::mem::take(&mut gparts.residual), why))
            } else {
                None
            };
            let weight = device_dx.then(|| self.release_weight(layer, conv));
            let x_residual = pending.residual.as_ref().map(|r| r.get().as_slice());
            let released_grad = grad.as_ref().map(|r| r.get().as_slice());
            let enclave = || {
                let mut low_rank = vc::LowRankWeightGradient::default();
                let mut macs = match &dy_effective {
                    Some(dy) => low_rank.add_input_side(&g, &xf, dy),
                    None => {
                        let residual = released_grad.expect("released when paired");
                        low_rank.add_input_side(&g, &xf, residual) + low_rank.add_low_rank_pairs(&g, &xf, &gf)
                    }
                };
                if need_dx {
                    macs += vc::low_rank_input_gradient(&g, w, &gf, &mut dx);
                }
                if let Some(xr) = x_residual {
                    macs += low_rank.add_output_side(&g, xr, &gf);
                }
                (low_rank, macs)
            };
            let ((dev_dx, dev_dw), (low_rank, macs)) = if device_dx || device_dw {
                let (grad, weight) = (grad.as_ref().expect("released"), weight.as_ref());
                let x_res = pending.residual.as_deref();
                self.overlapped(
                    layer,
                    |d| device_backward(d, &g, grad, weight.filter(|_| device_dx), x_res.filter(|_| device_dw)),
                    enclave,
                )?
            } else {
                ((None, None), timed(&self.phases, "low-rank products", enclave))
            };
            self.enclave_macs += macs;
            let operand = grad.as_ref().map_or(&[][..], |r| r.get().as_slice());
            let checks = (pending.weight_check.as_ref(), pending.input_check.as_deref());
            self.verify_backward((layer, &g, w, operand), dev_dx.as_deref(), dev_dw.as_deref(), checks)?;
            let dw = self.merge_device((layer, w, operand), &g, dev_dx, dev_dw, &mut dx, low_rank)?;
            if let Some(released) = grad {
                self.spares.keep(released.into_inner());
            }
            dw
        } else {
            self.gradients_in_clear = true;
            let residual_released = pending.residual.is_some();
            let weight = need_dx.then(|| self.release_weight(layer, conv));
            let xf = factors(&x_groups);
            let enclave = || {
                let mut low_rank = vc::LowRankWeightGradient::default();
                let macs = low_rank.add_input_side(&g, &xf, data(dy));
                (low_rank, macs)
            };
            let ((dev_dx, dev_dw), (low_rank, macs)) = if need_dx || residual_released {
                let why = "INSECURE: --protect-gradients is off; the output gradient goes to the device in the clear";
                let grad = self.release(layer, "output-gradient", dy.shape(), data(dy).to_vec(), why);
                let x_res = pending.residual.as_deref();
                let weight = weight.as_ref();
                let out = self.overlapped(
                    layer,
                    |d| device_backward(d, &g, &grad, weight.filter(|_| need_dx), x_res),
                    enclave,
                )?;
                let ((dev_dx, dev_dw), _) = &out;
                let checks = (pending.weight_check.as_ref(), pending.input_check.as_deref());
                self.verify_backward((layer, &g, w, grad.get()), dev_dx.as_deref(), dev_dw.as_deref(), checks)?;
                self.spares.keep(grad.into_inner());
                out
            } else {
                ((None, None), timed(&self.phases, "low-rank products", enclave))
            };
            self.enclave_macs += macs;
            self.merge_device((layer, w, data(dy)), &g, dev_dx, dev_dw, &mut dx, low_rank)?
        };
        // The last of the convolutions sharing the released input returns it for reuse.
        if let Some(Ok(released)) = pending.residual.map(Arc::try_unwrap) {
            self.spares.keep(released.into_inner());
        }
        let grads = std::iter::once(from_vec(conv.weight.shape(), dw)).chain(db).collect();
        Ok((from_vec(&pending.in_shape, dx), grads))
    }

    fn linear_forward(&mut self, _: &str, _: bool, lin: &Linear, x: &Tensor) -> PlacementResult<Tensor> {
        let (n, i, o) = lin.dims(x.shape());
        self.enclave_macs += (n * i * o) as u64;
        Ok(lin.forward(x))
    }

    fn linear_backward(
        &mut self,
        _: &str,
        lin: &Linear,
        x: &Tensor,
        dy: &Tensor,
    ) -> PlacementResult<(Tensor, Vec<Tensor>)> {
        let (n, i, o) = lin.dims(x.shape());
        self.enclave_macs += (2 * n * i * o) as u64;
        Ok(lin.backward(x, dy))
    }

    fn report(&self) -> PlacementReport {
        let layers = self
            .totals
            .iter()
            .map(|((_, layer, what), t)| LayerSplit {
                layer: layer.clone(),
                what: what.to_string(),
                mean_rank: t.rank_samples / t.samples.max(1) as f64,
                residual_energy_ratio: if t.total_energy > 0.0 { t.residual_energy / t.total_energy } else { 0.0 },
                clipped_fraction: t.clipped as f64 / t.released.max(1) as f64,
            })
            .collect();
        let privacy = PrivacyLedger {
            noise_multiplier: self.cfg.noise_multiplier,
            clip_norm: self.cfg.clip_norm,
            grad_clip_norm: self.cfg.grad_clip_norm,
            delta: self.cfg.delta,
            releases_per_step: self.max_step_releases.max(self.step_releases),
            releases_per_evaluation: self.max_evaluation_releases.max(self.evaluation_releases),
            gradients_in_clear: self.gradients_in_clear,
            training_steps: self.training_steps,
            dp_sgd_clip: self.cfg.dp_sgd_clip,
        };
        PlacementReport {
            enclave_macs: self.enclave_macs,
            device_macs: self.device_macs,
            layers,
            privacy: Some(privacy),
            enclave_phase_seconds: self.phases.borrow().iter().map(|(k, v)| (k.to_string(), *v)).collect(),
            device_checks: self.cfg.verify_device.then_some(self.checked),
            counters: Default::default(),
        }
    }
}

impl Asymml {
    /// Checks what the device returned for a convolution's backward pass, where `verify_device`
    /// is on: its input gradient `dx` against the output gradient `dy` it was sent and the
    /// weight's projections made in the forward pass (made now where the forward pass released
    /// nothing: a rank that kept every channel), its weight gradient `dw` against the projection
    /// the enclave kept of the input it was sent in the forward pass.
    fn verify_backward(
        &mut self,
        (layer, g, w, dy): (&str, &ConvGeometry, &[f32], &[f32]),
        dx: Option<&[f32]>,
        dw: Option<&[f32]>,
        (weight, input): (Option<&WeightCheck>, Option<&InputProjection>),
    ) -> PlacementResult<()> {
        if !self.cfg.verify_device {
            return Ok(());
        }
        if let Some(dx) = dx {
            let made_now;
            let weight = match weight {
                Some(weight) => weight,
                None => {
                    let s = secret(&mut self.rng, g.out_channels);
                    let t = Some(secret(&mut self.rng, g.in_channels));
                    made_now = timed(&self.phases, "verify", || WeightCheck::new(g, w, s, t));
                    &made_now
                }
            };
            let checked = timed(&self.phases, "verify", || check_backward_data(g, weight, dy, dx));
            self.count_checked(layer, checked, dx)?;
        }
        if let Some(dw) = dw {
            let missing = || format!("{layer}: nothing kept to check the device's weight gradient");
            let input = input.ok_or_else(missing)?;
            let checked = timed(&self.phases, "verify", || check_backward_weight(g, input, dy, dw));
            self.count_checked(layer, checked, dw)?;
        }
        Ok(())
    }

    /// Counts a passed check; a failed one ends the step, except where the result is not finite:
    /// `merge_device` then tells a diverged run from a faulty device.
    fn count_checked(
        &mut self,
        layer: &str,
        checked: Result<CheckTally, String>,
        values: &[f32],
    ) -> PlacementResult<()> {
        match checked {
            Ok(t) => {
                self.checked.add(t);
                Ok(())
            }
            Err(_) if !all_finite(values) => Ok(()),
            Err(e) => Err(format!("{layer}: {e}")),
        }
    }

    /// Adds the device's input gradient (when it computed one) to the enclave's, and returns the
    /// weight gradient: the enclave's low-rank terms expanded into the device's share (or into
    /// zeros), so that the weight-sized gradient is swept once. `weight` is the layer's, to tell a
    /// diverged run from a faulty device when the device's input gradient is not finite.
    /// `operand`: what the device's input gradient multiplied the weight with (the released
    /// output gradient), for the error when that gradient is not finite.
    fn merge_device(
        &mut self,
        (layer, weight, operand): (&str, &[f32], &[f32]),
        g: &ConvGeometry,
        dev_dx: Option<Vec<f32>>,
        dev_dw: Option<Vec<f32>>,
        dx: &mut [f32],
        low_rank: vc::LowRankWeightGradient,
    ) -> PlacementResult<Vec<f32>> {
        if let Some(v) = dev_dx {
            let shape = [g.batch, g.in_channels, g.in_h, g.in_w];
            let v = self.received(layer, "input-gradient", &shape, v)?;
            if !add_assign_finite(dx, &v) {
                let terms = g.out_channels * g.kernel_h * g.kernel_w;
                return Err(device_fault(layer, "input gradient", (weight, operand, terms)));
            }
            self.spares.keep(v);
            self.device_macs += g.forward_macs();
        }
        let mut dw = match dev_dw {
            Some(v) => {
                let shape = [g.out_channels, g.in_channels, g.kernel_h, g.kernel_w];
                self.device_macs += g.forward_macs();
                self.received(layer, "weight-gradient", &shape, v)?
            }
            None => vec![0.0f32; g.weight_len()],
        };
        let (macs, finite) = timed(&self.phases, "low-rank products", || low_rank.add_to(g, &mut dw));
        self.enclave_macs += macs;
        if !finite {
            return Err(non_finite_weight_gradient(layer));
        }
        Ok(dw)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;
    use trustsplit_device::CpuBackend;

    /// `overlapped` runs the device call on its kept thread beside the enclave's work, returns
    /// both results, turns a panicking device call into an error naming the layer, and keeps
    /// working afterwards.
    #[test]
    fn overlapped_calls_return_both_results_and_survive_a_panicking_device_call() {
        let device = Device::local(Box::new(CpuBackend::new(1).unwrap()));
        let a = Asymml::new(device, AsymmlConfig::default(), Arc::new(Transcript::new())).unwrap();
        let here = std::thread::current().id();
        for round in 0..3u64 {
            let (theirs, mine) = a
                .overlapped(
                    "conv1",
                    |_| Ok((round * 7, std::thread::current().id())),
                    || (round, std::thread::current().id()),
                )
                .unwrap();
            assert_eq!((theirs.0, mine.0), (round * 7, round));
            assert_eq!(mine.1, here, "the enclave's work runs on the calling thread");
            assert_ne!(theirs.1, here, "the device call runs on its own thread");
        }
        let failed = a.overlapped("conv2", |_| -> Result<(), DeviceError> { panic!("device gone") }, || 1);
        let message = failed.expect_err("a panicking device call is an error");
        assert!(message.contains("panicked on conv2"), "{message}");
        let (theirs, mine) = a.overlapped("conv3", |_| Ok(5), || 6).unwrap();
        assert_eq!((theirs, mine), (5, 6));
    }

    #[test]
    fn a_non_finite_device_result_is_blamed_on_the_device_only_where_no_honest_one_could_return_it() {
        let mut rng = ChaCha8Rng::seed_from_u64(21);
        let operand: Vec<f32> = (0..500).map(|_| rng.random_range(-3.0f32..3.0)).collect();
        let mut weight: Vec<f32> = (0..72).map(|_| rng.random_range(-0.5f32..0.5)).collect();
        let device = "a faulty or malicious device";
        // Ordinary weights: 72 products of at most 0.5 x 3 cannot overflow.
        assert!(device_fault("layers.3", "output", (&weight, &operand, 72)).contains(device));
        // Finite, but large enough that 72 products can leave f32's range: divergence, not the device.
        weight[40] = 1e37;
        let err = device_fault("layers.3", "output", (&weight, &operand, 72));
        assert!(
            err.starts_with("training diverged: layers.3's weight has grown so large") && err.contains("1.000e37"),
            "{err}"
        );
        // Just below the bound it is the device again (the largest operand is below 3).
        weight[40] = f32::MAX / 2.0 / 72.0 / 3.0;
        assert!(device_fault("layers.3", "output", (&weight, &operand, 72)).contains(device));
        weight[40] = f32::NAN;
        assert!(device_fault("layers.3", "input gradient", (&weight, &operand, 72)).contains("holds NaN or infinite"));
    }

    #[test]
    fn a_split_that_is_not_finite_names_its_cause() {
        let mut sample = vec![1.0f32, -2.5e30, 3.0];
        let big = unsplittable("layers.4", "forward", 7, &sample);
        assert!(big.starts_with("training diverged: layers.4's forward cannot be split: sample 7's"), "{big}");
        assert!(big.contains("the values reach 2.500e30"), "{big}");
        for bad in [f32::NAN, f32::INFINITY] {
            sample[2] = bad;
            let msg = unsplittable("layers.4", "gradient", 0, &sample);
            assert!(msg.contains("layers.4's gradient") && msg.contains("it holds NaN or infinite values"), "{msg}");
        }
    }

    fn random(rng: &mut ChaCha8Rng, shape: &[usize]) -> Tensor {
        let n = shape.iter().product();
        from_vec(shape, (0..n).map(|_| rng.random_range(-1.0..1.0)).collect())
    }

    /// One forward and backward pass of a convolution, for both gradient settings.
    fn pass(a: &mut Asymml, conv: &Conv2d, x: &Tensor, dy: &Tensor) -> (Tensor, Tensor, Vec<Tensor>) {
        a.begin_pass(&PassInfo { mode: Mode::Train, batch: x.shape()[0], couples_samples: false });
        let (y, saved) = a.conv_forward("layers.1", false, conv, x, Mode::Train).unwrap();
        let (dx, grads) = a.conv_backward("layers.1", conv, saved, dy).unwrap();
        (y, dx, grads)
    }

    #[test]
    fn reused_buffers_are_written_in_full_before_they_are_read() {
        // Buffers kept from the earlier passes are filled with NaN before the last: a value a
        // taker did not write would show up as NaN, or as a difference from the first pass.
        for (protect_gradients, basis) in
            [(true, BasisScope::Batch), (true, BasisScope::Sample), (false, BasisScope::Batch)]
        {
            let mut rng = ChaCha8Rng::seed_from_u64(11);
            let conv = Conv2d {
                weight: random(&mut rng, &[5, 6, 3, 3]),
                bias: Some(random(&mut rng, &[5])),
                stride: 1,
                padding: 1,
            };
            let x = random(&mut rng, &[3, 6, 7, 9]);
            let dy = random(&mut rng, &[3, 5, 7, 9]);
            let cfg = AsymmlConfig {
                noise_multiplier: 0.0,
                subspace: super::super::Subspace::Exact,
                protect_gradients,
                basis,
                rank: RankRule::Schedule(vec![2]),
                ..AsymmlConfig::default()
            };
            let device = Device::local(Box::new(CpuBackend::new(1).unwrap()));
            let mut a = Asymml::new(device, cfg, Arc::new(Transcript::new())).unwrap();
            // The second pass keeps as many buffers of each length as a pass takes.
            let first = pass(&mut a, &conv, &x, &dy);
            pass(&mut a, &conv, &x, &dy);
            assert!(a.spares.count() >= 2, "kept {}", a.spares.count());
            a.spares.poison();
            let second = pass(&mut a, &conv, &x, &dy);
            let flat = |t: &(Tensor, Tensor, Vec<Tensor>)| -> Vec<f32> {
                [&t.0, &t.1].into_iter().chain(&t.2).flat_map(|t| data(t).to_vec()).collect()
            };
            let (p, q) = (flat(&first), flat(&second));
            assert!(
                q.iter().all(|v| v.is_finite()),
                "{protect_gradients} {basis:?}: a reused buffer was read unwritten"
            );
            let worst = p.iter().zip(&q).map(|(a, b)| (a - b).abs()).fold(0.0f32, f32::max);
            assert!(worst < 1e-5, "{protect_gradients} {basis:?}: passes differ by {worst}");
        }
    }
}
