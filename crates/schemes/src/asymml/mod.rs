//! `asymml`: the AsymML / 3LegRace asymmetric decomposition (Niu, Ali, Avestimehr, PoPETs 2022).
//!
//! Inside the enclave, every convolution's input (the raw image for the first layer, otherwise the
//! output of a nonlinearity or pooling) is split per sample into a low-rank part `U V` (the top-r
//! channel subspace, kept) and a residual (released). The enclave convolves its r "virtual
//! channels" (`V` with the transformed weight `W x_c U`); the device convolves the clipped, noised
//! residual with the public weight; the enclave adds the two, then runs batch-norm, ReLU, pooling,
//! the classifier, the loss and the optimizer itself.
//!
//! Releases, per convolution and step (see `docs/schemes/asymml.md` for the guarantee):
//! - `noised-residual`: each sample's residual, L2-clipped and with Gaussian noise (`z * bound`).
//!   Skipped where the rank covers every channel (nothing is left to release).
//! - `weight`: the layer's current weight (treated as public, as in the paper; it is trained on the
//!   private data, and the DP accounting does not cover it).
//! - backward, with `protect_gradients`: `noised-gradient-residual`, the output gradient's residual
//!   after its own low-rank split, clipped and noised. Without it: `output-gradient` in the clear.
//!
//! Never released: inputs, labels, logits, the loss, batch-norm statistics, the low-rank factors.
//!
//! Each sample's basis (`--basis sample`) is computed from that sample alone, the fast subspace
//! from a fresh random start, so its residual depends on nothing else; with `--basis batch` on its
//! batch alone (and is charged so). What is charged, and when: [`PrivacyLedger`] counts the
//! releases a step makes; [`charges`] keeps what a training run has charged, epoch by epoch,
//! before each epoch's first release and durably, so that an epoch replayed after `--resume` is
//! charged again.

pub mod charges;
pub mod keystream;
pub mod lowrank;
pub mod noise;
pub mod options;
pub mod placement;
mod spares;
pub mod summary;
pub mod virtual_conv;

pub use charges::{releases_per_epoch, PrivacyCharges};
pub use lowrank::{RankPolicy, Subspace};
pub use options::{AsymmlOptions, DpScope};
pub use placement::{releases_per_evaluation, releases_per_step, runner, validate};
pub use summary::{describe_evaluation, describe_run, privacy_summary, EvaluationPrivacy, PrivacySummary};

use crate::accountant::{PrivacySpent, RdpAccountant};
use crate::{RunnerError, RunnerInputs, SchemeInfo, SplitRunner};
use serde::Serialize;

pub const INFO: SchemeInfo = SchemeInfo {
    name: "asymml",
    releases: "each convolution's input residual (after a per-sample top-r split; clipped and noised when \
               --noise-multiplier > 0), the weights, and the output gradients' noised residuals (or the gradients \
               in the clear with --protect-gradients off)",
    uses_device: true,
    docs: "docs/schemes/asymml.md",
};

/// The runner from the common inputs and the run's options (the registry's constructor): the
/// noise is calibrated to `--epsilon` over a training run when one is asked for.
pub fn build(inputs: RunnerInputs, options: &AsymmlOptions) -> Result<SplitRunner, RunnerError> {
    let training = inputs.training.is_some();
    let noise = match inputs.training {
        Some(run) => options.noise_for_training(run.model, run.batch_size, run.epochs),
        // Evaluation releases concern the evaluated inputs; the noise multiplier applies as given.
        None => options.check().map(|()| options.noise_multiplier),
    }
    .map_err(RunnerError::Input)?;
    let mut devices = inputs.devices;
    if devices.len() != 1 {
        return Err(RunnerError::Input(format!("asymml uses one device; got {}", devices.len())));
    }
    let config = options.config(noise);
    let dp_sgd = config.dp_sgd_clip.filter(|_| training);
    let mut runner = runner(devices.remove(0), config, inputs.memory_budget, inputs.transcript)?;
    if let Some(clip) = dp_sgd {
        runner.enable_dp_sgd(crate::dp_sgd::DpSgd::new(clip, noise).map_err(RunnerError::Input)?);
    }
    Ok(runner)
}

/// How many components each layer keeps.
#[derive(Clone, Debug, PartialEq)]
pub enum RankRule {
    /// The k-th convolution keeps `schedule[k]` components (the last entry repeats).
    Schedule(Vec<usize>),
    /// Each basis keeps the fewest components whose residual energy is at most `tau` of the total,
    /// and at most `max_rank`.
    Energy { tau: f64, max_rank: usize },
}

/// The prototype's rank schedule: 2, 4, 8, 16, then 32 for every later convolution.
pub const PROTOTYPE_RANKS: [usize; 5] = [2, 4, 8, 16, 32];

impl RankRule {
    /// The prototype's schedule, [`PROTOTYPE_RANKS`].
    pub fn prototype() -> RankRule {
        RankRule::Schedule(PROTOTYPE_RANKS.to_vec())
    }

    /// The policy of the `index`-th convolution.
    pub fn policy(&self, index: usize) -> RankPolicy {
        match self {
            RankRule::Schedule(s) => RankPolicy::Fixed(s[index.min(s.len() - 1)]),
            RankRule::Energy { tau, max_rank } => RankPolicy::Energy { tau: *tau, max_rank: *max_rank },
        }
    }

    pub fn describe(&self) -> String {
        match self {
            RankRule::Schedule(s) => {
                let list: Vec<String> = s.iter().map(|r| r.to_string()).collect();
                format!("fixed schedule {} (last repeats)", list.join(","))
            }
            RankRule::Energy { tau, max_rank } => format!("energy threshold tau={tau}, at most {max_rank}"),
        }
    }
}

/// Which samples share one basis (`--basis sample|batch`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, serde::Deserialize)]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
pub enum BasisScope {
    /// One basis per sample (the paper): a sample's release depends on that sample alone.
    Sample,
    /// One basis for the whole batch: one weight transform per layer instead of one per sample,
    /// but every release then depends on every sample of the batch (charged as such).
    Batch,
}

/// Default per-value clipping bounds for activation and output-gradient residuals. The noise a
/// released value carries is `noise_multiplier * bound * sqrt(values per sample)`, so a small bound
/// keeps the noise small at a given epsilon: the residual is mostly clipped away and the model
/// learns from the low-rank part, which stays exact in the enclave.
pub const DEFAULT_CLIP_NORM: f64 = 0.001;
pub const DEFAULT_GRAD_CLIP_NORM: f64 = 0.0001;

/// Settings of an AsymML run.
#[derive(Clone, Debug)]
pub struct AsymmlConfig {
    pub rank: RankRule,
    pub subspace: Subspace,
    pub basis: BasisScope,
    /// Decompose output gradients too and release only their noised residual.
    pub protect_gradients: bool,
    /// Noise standard deviation over the clipping bound; 0 turns clipping and noise off.
    pub noise_multiplier: f64,
    /// Per-element RMS bound on each sample's released activation residual: a residual of D
    /// values is clipped to L2 norm `clip_norm * sqrt(D)`.
    pub clip_norm: f64,
    /// The same bound for output-gradient residuals, on the gradient of the sample's own loss
    /// (the batch-mean gradient times the batch size).
    pub grad_clip_norm: f64,
    pub delta: f64,
    /// Check every result the device returns through secret random projections
    /// ([`crate::device_check`]) and refuse the step on a mismatch.
    pub verify_device: bool,
    /// Seed of the fast subspace's random start blocks (and of the samples a batch-wide basis is
    /// computed from), for runs that must repeat (tests); `None`: a key from the OS. Never the
    /// noise's, which always comes from the OS.
    pub subspace_seed: Option<u64>,
    /// `--dp full`: every step is a DP-SGD step ([`crate::dp_sgd`]) with each sample's whole
    /// gradient clipped to this L2 bound and noise at `noise_multiplier`, charged beside the
    /// residual releases. `None`: the epsilon covers the residual releases only.
    pub dp_sgd_clip: Option<f64>,
}

impl Default for AsymmlConfig {
    fn default() -> Self {
        AsymmlConfig {
            rank: RankRule::prototype(),
            subspace: Subspace::Exact,
            basis: BasisScope::Sample,
            protect_gradients: true,
            noise_multiplier: 0.0,
            clip_norm: DEFAULT_CLIP_NORM,
            grad_clip_norm: DEFAULT_GRAD_CLIP_NORM,
            delta: 1e-5,
            verify_device: true,
            subspace_seed: None,
            dp_sgd_clip: None,
        }
    }
}

/// What the releases of a training run cost in privacy, per sample, as the placement counted them
/// in this process (a training run charges them through [`PrivacyCharges`]).
#[derive(Clone, Debug, Serialize)]
pub struct PrivacyLedger {
    pub noise_multiplier: f64,
    pub clip_norm: f64,
    pub grad_clip_norm: f64,
    pub delta: f64,
    /// Gaussian releases charged to a sample for one training step it takes part in (the most
    /// over the steps so far). A release that depends on the whole batch (batch-norm statistics,
    /// a batch-wide basis) is charged `4 * batch - 3` times: clipping bounds its change by twice
    /// the bound for every other sample of the batch.
    pub releases_per_step: u64,
    /// Gaussian releases charged to an example each time it is evaluated (evaluation mode: the
    /// forward releases only; batch-norm uses its running statistics, so only a batch-wide basis
    /// couples the examples of a batch). These concern the evaluated (test) data, not the
    /// training samples, and are accounted apart from them.
    pub releases_per_evaluation: u64,
    /// Output gradients went to the device in the clear (`--protect-gradients` off): the epsilon
    /// then covers the activation releases only.
    pub gradients_in_clear: bool,
    pub training_steps: u64,
    /// `--dp full`: each sample's whole-gradient bound; the updates, and so the weights, are then
    /// covered too.
    pub dp_sgd_clip: Option<f64>,
}

impl PrivacyLedger {
    /// Privacy spent by a sample that took part in `participations` training steps (one per epoch
    /// started when every epoch visits each sample once). `None` without noise: no finite epsilon.
    pub fn spent(&self, participations: u64) -> Option<PrivacySpent> {
        if self.noise_multiplier <= 0.0 {
            return None;
        }
        let mut acc = RdpAccountant::new();
        acc.compose_gaussian(self.noise_multiplier, self.releases_per_step * participations);
        Some(acc.spent(self.delta))
    }

    /// Privacy spent by an evaluated example over `evaluations` evaluations of it (`None` without
    /// noise, or when no evaluation released anything).
    pub fn spent_by_evaluations(&self, evaluations: u64) -> Option<PrivacySpent> {
        if self.noise_multiplier <= 0.0 || self.releases_per_evaluation == 0 || evaluations == 0 {
            return None;
        }
        let mut acc = RdpAccountant::new();
        acc.compose_gaussian(self.noise_multiplier, self.releases_per_evaluation * evaluations);
        Some(acc.spent(self.delta))
    }
}
