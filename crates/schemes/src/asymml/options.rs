//! AsymML's settings as a run records them (in its configuration and checkpoints) and as the
//! command line takes them (clap's derive, behind the crate's `cli` feature), their translation
//! into [`AsymmlConfig`], and the noise calibration from a target epsilon.

use super::{
    releases_per_step, validate, AsymmlConfig, BasisScope, RankRule, Subspace, DEFAULT_CLIP_NORM,
    DEFAULT_GRAD_CLIP_NORM, PROTOTYPE_RANKS,
};
use crate::accountant::calibrate_noise_multiplier;
use serde::{Deserialize, Serialize};
use trustsplit_nn::Model;

/// The noise multiplier when neither `--noise-multiplier` nor `--epsilon` is given. With it and
/// the default clipping bounds LeNet-5 reaches 82-84% at epsilon 8 on the embedded data
/// (BENCHMARKS.md, "Accuracy against epsilon: LeNet-5, embedded data"); twice the bound at the same
/// multiplier collapsed to chance (2026-11-22).
pub const DEFAULT_NOISE: f64 = 2.0;

/// `--protect-gradients` and `--verify-device` take `on` or `off`.
#[cfg(feature = "cli")]
fn on_off() -> impl clap::builder::TypedValueParser<Value = bool> {
    use clap::builder::TypedValueParser;
    clap::builder::PossibleValuesParser::new(["on", "off"]).map(|s| s == "on")
}

/// AsymML's settings (ignored by the other schemes). Every field is a flag of `train`, `eval`,
/// `bench step` and `enclave`; the defaults are the same from the command line and from code.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
#[cfg_attr(feature = "cli", derive(clap::Args))]
pub struct AsymmlOptions {
    /// AsymML: ranks of the 1st, 2nd, ... convolution (the last repeats). The prototype's 2,4,8,16,32.
    #[cfg_attr(
        feature = "cli",
        arg(long, value_delimiter = ',', default_value = "2,4,8,16,32", help_heading = "AsymML")
    )]
    pub rank_schedule: Vec<usize>,
    /// AsymML: instead of the schedule, keep per sample the fewest components whose residual holds
    /// at most this share of the energy (e.g. 0.1), up to --max-rank.
    #[cfg_attr(feature = "cli", arg(long, help_heading = "AsymML"))]
    pub energy_threshold: Option<f64>,
    /// AsymML: the most components the energy threshold may keep.
    #[cfg_attr(feature = "cli", arg(long, default_value_t = 32, help_heading = "AsymML"))]
    pub max_rank: usize,
    /// AsymML: exact (eigen-decomposition of the Gram matrix) or fast (one subspace iteration from
    /// a random start; with --basis batch and a fixed rank, computed from a random quarter of a large
    /// batch, which every sample's split then projects).
    #[cfg_attr(feature = "cli", arg(long, value_enum, default_value = "exact", help_heading = "AsymML"))]
    pub subspace: Subspace,
    /// AsymML: one basis per sample (the paper; per-sample DP accounting) or one per batch
    /// (cheaper; every release is then charged to every sample of its batch).
    #[cfg_attr(feature = "cli", arg(long, value_enum, default_value = "sample", help_heading = "AsymML"))]
    pub basis: BasisScope,
    /// AsymML: split output gradients too and release only their noised residual (off sends them
    /// in the clear, as the public prototype does).
    #[cfg_attr(
        feature = "cli",
        arg(long, value_name = "on|off", default_value = "on", value_parser = on_off(), action = clap::ArgAction::Set, help_heading = "AsymML")
    )]
    pub protect_gradients: bool,
    /// AsymML: Gaussian noise standard deviation over the clipping bound (0: no clipping, no noise,
    /// no finite epsilon).
    #[cfg_attr(
        feature = "cli",
        arg(long, help_heading = "AsymML", conflicts_with = "epsilon", default_value_t = DEFAULT_NOISE)
    )]
    pub noise_multiplier: f64,
    /// AsymML: target epsilon; the noise multiplier is calibrated to reach it over the whole run.
    #[cfg_attr(feature = "cli", arg(long, help_heading = "AsymML"))]
    pub epsilon: Option<f64>,
    /// AsymML: delta of the (epsilon, delta) guarantee.
    #[cfg_attr(feature = "cli", arg(long, default_value_t = 1e-5, help_heading = "AsymML"))]
    pub delta: f64,
    /// AsymML: per-value RMS bound on each sample's released activation residual (a residual of D
    /// values is clipped to L2 norm clip-norm * sqrt(D)).
    #[cfg_attr(feature = "cli", arg(long, default_value_t = DEFAULT_CLIP_NORM, help_heading = "AsymML"))]
    pub clip_norm: f64,
    /// AsymML: the same bound for output-gradient residuals (of the sample's own loss).
    #[cfg_attr(feature = "cli", arg(long, default_value_t = DEFAULT_GRAD_CLIP_NORM, help_heading = "AsymML"))]
    pub grad_clip_norm: f64,
    /// AsymML: check every result the device returns (outputs, input and weight gradients)
    /// through secret random projections and refuse the step on a mismatch beyond what f32
    /// rounding allows (a bias or scaled or stale results are caught; a single value changed by a
    /// few times its size may pass: docs/schemes/asymml.md). Costs 15-30% of the enclave's time.
    /// Off trusts the device's arithmetic.
    #[cfg_attr(
        feature = "cli",
        arg(long, value_name = "on|off", default_value = "on", value_parser = on_off(), action = clap::ArgAction::Set, help_heading = "AsymML")
    )]
    // Runs recorded before the flag existed did not verify.
    #[serde(default)]
    pub verify_device: bool,
    /// AsymML: what the epsilon covers. `residuals`: the noised residual releases only (the
    /// weights, trained without noise and sent to the device every step, are not covered).
    /// `full`: DP-SGD too: each sample's gradient of every parameter clipped to --dp-clip and
    /// Gaussian noise of --noise-multiplier x --dp-clip on the batch's sum, inside the enclave,
    /// composed with the residual releases, so that the epsilon bounds the device's whole view
    /// (each sample runs its own forward and backward pass: slower; no batch-norm).
    #[cfg_attr(feature = "cli", arg(long, value_enum, default_value = "residuals", help_heading = "AsymML"))]
    #[serde(default)]
    pub dp: DpScope,
    /// AsymML with --dp full: the L2 bound of each sample's whole gradient (all parameters).
    #[cfg_attr(feature = "cli", arg(long, default_value_t = DEFAULT_DP_CLIP, help_heading = "AsymML"))]
    #[serde(default = "default_dp_clip")]
    pub dp_clip: f64,
}

/// What a run's epsilon covers (`--dp`).
#[derive(Clone, Copy, Debug, Default, PartialEq, Eq, Serialize, Deserialize)]
#[cfg_attr(feature = "cli", derive(clap::ValueEnum))]
#[serde(rename_all = "lowercase")]
pub enum DpScope {
    /// The noised residual releases only.
    #[default]
    Residuals,
    /// The residual releases and the weights (DP-SGD updates): the device's whole view.
    Full,
}

/// `--dp-clip`'s default.
pub const DEFAULT_DP_CLIP: f64 = 1.0;

fn default_dp_clip() -> f64 {
    DEFAULT_DP_CLIP
}

impl Default for AsymmlOptions {
    fn default() -> Self {
        AsymmlOptions {
            rank_schedule: PROTOTYPE_RANKS.to_vec(),
            energy_threshold: None,
            max_rank: 32,
            subspace: Subspace::Exact,
            basis: BasisScope::Sample,
            protect_gradients: true,
            noise_multiplier: DEFAULT_NOISE,
            epsilon: None,
            delta: 1e-5,
            clip_norm: DEFAULT_CLIP_NORM,
            grad_clip_norm: DEFAULT_GRAD_CLIP_NORM,
            verify_device: true,
            dp: DpScope::Residuals,
            dp_clip: DEFAULT_DP_CLIP,
        }
    }
}

impl AsymmlOptions {
    /// The scheme's configuration with `noise_multiplier` (from the flags or a calibration).
    pub fn config(&self, noise_multiplier: f64) -> AsymmlConfig {
        AsymmlConfig {
            rank: match self.energy_threshold {
                Some(tau) => RankRule::Energy { tau, max_rank: self.max_rank },
                None => RankRule::Schedule(self.rank_schedule.clone()),
            },
            subspace: self.subspace,
            basis: self.basis,
            protect_gradients: self.protect_gradients,
            noise_multiplier,
            clip_norm: self.clip_norm,
            grad_clip_norm: self.grad_clip_norm,
            delta: self.delta,
            verify_device: self.verify_device,
            subspace_seed: None,
            dp_sgd_clip: (self.dp == DpScope::Full).then_some(self.dp_clip),
        }
    }

    /// Rejects settings that cannot make sense, before any data is touched.
    pub fn check(&self) -> Result<(), String> {
        if let Some(e) = self.epsilon {
            if !(e.is_finite() && e > 0.0) {
                return Err(format!("--epsilon must be a positive number, got {e}"));
            }
        }
        validate(&self.config(self.noise_multiplier))
    }

    /// The noise multiplier of a training run: the flag's, or the smallest one that keeps every
    /// sample within `--epsilon` after `epochs` epochs of `batch_size` batches of `model` (each
    /// sample takes part in one step per epoch).
    pub fn noise_for_training(&self, model: &Model, batch_size: usize, epochs: usize) -> Result<f64, String> {
        self.check()?;
        let Some(target) = self.epsilon else { return Ok(self.noise_multiplier) };
        let releases = releases_per_step(model, &self.config(1.0), batch_size) * epochs as u64;
        calibrate_noise_multiplier(target, self.delta, releases).map_err(|e| format!("--epsilon: {e}"))
    }
}
