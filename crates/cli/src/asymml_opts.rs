//! AsymML's command-line settings, their translation into the scheme's configuration, noise
//! calibration from a target epsilon, and the privacy summary of a run.

use anyhow::{bail, Result};
use clap::Args;
use serde::{Deserialize, Serialize};
use trustsplit_nn::Model;
use trustsplit_schemes::accountant::calibrate_noise_multiplier;
use trustsplit_schemes::asymml::{
    releases_per_step, AsymmlConfig, BasisScope, PrivacyLedger, RankRule, Subspace, PROTOTYPE_RANKS,
};

/// AsymML flags (ignored by the other schemes).
#[derive(Args, Clone, Debug)]
pub struct AsymmlArgs {
    /// AsymML: ranks of the 1st, 2nd, ... convolution (the last repeats). The prototype's 2,4,8,16,32.
    #[arg(long, value_delimiter = ',', default_value = "2,4,8,16,32", help_heading = "AsymML")]
    pub rank_schedule: Vec<usize>,
    /// AsymML: instead of the schedule, keep per sample the fewest components whose residual holds
    /// at most this share of the energy (e.g. 0.1), up to --max-rank.
    #[arg(long, help_heading = "AsymML")]
    pub energy_threshold: Option<f64>,
    /// AsymML: the most components the energy threshold may keep.
    #[arg(long, default_value_t = 32, help_heading = "AsymML")]
    pub max_rank: usize,
    /// AsymML: exact (eigen-decomposition of the Gram matrix) or fast (one warm-started subspace
    /// iteration; with --basis batch and a fixed rank, computed from a random quarter of a large
    /// batch, which every sample's split then projects).
    #[arg(long, default_value = "exact", help_heading = "AsymML")]
    pub subspace: SubspaceArg,
    /// AsymML: one basis per sample (the paper; per-sample DP accounting) or one per batch
    /// (cheaper; every release is then charged to every sample of its batch).
    #[arg(long, default_value = "sample", help_heading = "AsymML")]
    pub basis: BasisArg,
    /// AsymML: split output gradients too and release only their noised residual (off sends them
    /// in the clear, as the public prototype does).
    #[arg(long, default_value = "on", help_heading = "AsymML")]
    pub protect_gradients: crate::OnOff,
    /// AsymML: Gaussian noise standard deviation over the clipping bound (0: no clipping, no noise,
    /// no finite epsilon).
    #[arg(long, help_heading = "AsymML", conflicts_with = "epsilon", default_value_t = DEFAULT_NOISE)]
    pub noise_multiplier: f64,
    /// AsymML: target epsilon; the noise multiplier is calibrated to reach it over the whole run.
    #[arg(long, help_heading = "AsymML")]
    pub epsilon: Option<f64>,
    /// AsymML: delta of the (epsilon, delta) guarantee.
    #[arg(long, default_value_t = 1e-5, help_heading = "AsymML")]
    pub delta: f64,
    /// AsymML: per-value RMS bound on each sample's released activation residual (a residual of D
    /// values is clipped to L2 norm clip-norm * sqrt(D)).
    #[arg(long, default_value_t = DEFAULT_CLIP, help_heading = "AsymML")]
    pub clip_norm: f64,
    /// AsymML: the same bound for output-gradient residuals (of the sample's own loss).
    #[arg(long, default_value_t = DEFAULT_GRAD_CLIP, help_heading = "AsymML")]
    pub grad_clip_norm: f64,
    /// AsymML: check every result the device returns (outputs, input and weight gradients)
    /// through secret random projections and refuse the step on a mismatch beyond what f32
    /// rounding allows (a bias or scaled or stale results are caught; a single value changed by a
    /// few times its size may pass: docs/asymml.md). Costs 15-30% of the enclave's time. Off
    /// trusts the device's arithmetic.
    #[arg(long, default_value = "on", help_heading = "AsymML")]
    pub verify_device: crate::OnOff,
}

/// The noise multiplier when neither --noise-multiplier nor --epsilon is given.
pub const DEFAULT_NOISE: f64 = 2.0;
/// The scheme's clipping bounds (see [`trustsplit_schemes::asymml::DEFAULT_CLIP_NORM`]). LeNet-5 on
/// the embedded data: 82-84% at epsilon 8 with these and the default noise (README, "Accuracy
/// against epsilon"); twice the bound at the same multiplier collapsed (BENCHMARKS.md, "The
/// README's figures up to 2026-12-03").
pub const DEFAULT_CLIP: f64 = trustsplit_schemes::asymml::DEFAULT_CLIP_NORM;
pub const DEFAULT_GRAD_CLIP: f64 = trustsplit_schemes::asymml::DEFAULT_GRAD_CLIP_NORM;

#[derive(Clone, Copy, Debug, clap::ValueEnum, Serialize, Deserialize, PartialEq, Eq)]
pub enum SubspaceArg {
    Exact,
    Fast,
}

#[derive(Clone, Copy, Debug, clap::ValueEnum, Serialize, Deserialize, PartialEq, Eq)]
pub enum BasisArg {
    Sample,
    Batch,
}

/// AsymML settings as recorded in a run's configuration (and its checkpoints).
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct AsymmlOptions {
    pub rank_schedule: Vec<usize>,
    pub energy_threshold: Option<f64>,
    pub max_rank: usize,
    pub subspace: SubspaceArg,
    pub basis: BasisArg,
    pub protect_gradients: bool,
    pub noise_multiplier: f64,
    pub epsilon: Option<f64>,
    pub delta: f64,
    pub clip_norm: f64,
    pub grad_clip_norm: f64,
    /// Runs recorded before the flag existed did not verify.
    #[serde(default)]
    pub verify_device: bool,
}

impl Default for AsymmlOptions {
    fn default() -> Self {
        AsymmlOptions {
            rank_schedule: PROTOTYPE_RANKS.to_vec(),
            energy_threshold: None,
            max_rank: 32,
            subspace: SubspaceArg::Exact,
            basis: BasisArg::Sample,
            protect_gradients: true,
            noise_multiplier: DEFAULT_NOISE,
            epsilon: None,
            delta: 1e-5,
            clip_norm: DEFAULT_CLIP,
            grad_clip_norm: DEFAULT_GRAD_CLIP,
            verify_device: true,
        }
    }
}

impl From<&AsymmlArgs> for AsymmlOptions {
    fn from(a: &AsymmlArgs) -> Self {
        AsymmlOptions {
            rank_schedule: a.rank_schedule.clone(),
            energy_threshold: a.energy_threshold,
            max_rank: a.max_rank,
            subspace: a.subspace,
            basis: a.basis,
            protect_gradients: matches!(a.protect_gradients, crate::OnOff::On),
            noise_multiplier: a.noise_multiplier,
            epsilon: a.epsilon,
            delta: a.delta,
            clip_norm: a.clip_norm,
            grad_clip_norm: a.grad_clip_norm,
            verify_device: matches!(a.verify_device, crate::OnOff::On),
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
            subspace: match self.subspace {
                SubspaceArg::Exact => Subspace::Exact,
                SubspaceArg::Fast => Subspace::Fast,
            },
            basis: match self.basis {
                BasisArg::Sample => BasisScope::Sample,
                BasisArg::Batch => BasisScope::Batch,
            },
            protect_gradients: self.protect_gradients,
            noise_multiplier,
            clip_norm: self.clip_norm,
            grad_clip_norm: self.grad_clip_norm,
            delta: self.delta,
            verify_device: self.verify_device,
        }
    }

    /// The noise multiplier of a training run: the flag's, or the smallest one that keeps every
    /// sample within `--epsilon` after `epochs` epochs of `batch_size` batches of `model` (each
    /// sample takes part in one step per epoch).
    pub fn noise_for_training(&self, model: &Model, batch_size: usize, epochs: usize) -> Result<f64> {
        check(self)?;
        let Some(target) = self.epsilon else { return Ok(self.noise_multiplier) };
        let releases = releases_per_step(model, &self.config(1.0), batch_size) * epochs as u64;
        calibrate_noise_multiplier(target, self.delta, releases).map_err(|e| anyhow::anyhow!("--epsilon: {e}"))
    }
}

/// The privacy a training run spent, per sample.
#[derive(Clone, Debug, Serialize)]
pub struct PrivacySummary {
    /// `None` without noise (no finite guarantee); serialised as null.
    pub epsilon: Option<f64>,
    pub delta: f64,
    pub noise_multiplier: f64,
    /// Gaussian releases charged to each training sample over the run.
    pub releases_per_sample: u64,
    /// What the epsilon covers and what it does not, in words.
    pub covers: String,
    /// The evaluated (test) examples, accounted apart: their residuals are released, noised, each
    /// time they are evaluated.
    pub evaluation: EvaluationPrivacy,
}

/// What evaluating released about each evaluated example.
#[derive(Clone, Debug, Serialize)]
pub struct EvaluationPrivacy {
    /// How many times each example was evaluated (the training command evaluates the test split
    /// once per epoch).
    pub evaluations: u64,
    /// Gaussian releases charged to an example per evaluation; 0 when evaluating released nothing.
    pub releases_per_evaluation: u64,
    /// Over all the evaluations; `None` without noise or without releases (serialised as null).
    pub epsilon: Option<f64>,
    pub delta: f64,
}

impl EvaluationPrivacy {
    pub fn new(ledger: &PrivacyLedger, evaluations: u64) -> EvaluationPrivacy {
        EvaluationPrivacy {
            evaluations,
            releases_per_evaluation: ledger.releases_per_evaluation,
            epsilon: ledger.spent_by_evaluations(evaluations).map(|s| s.epsilon),
            delta: ledger.delta,
        }
    }

    /// One line for the summary.
    pub fn describe(&self) -> String {
        let plural = |n: u64, word: &str| format!("{n} {word}{}", if n == 1 { "" } else { "s" });
        match (self.releases_per_evaluation, self.epsilon) {
            (0, _) => "privacy of the test examples: nothing of them was released".to_string(),
            (r, Some(e)) => format!(
                "privacy of the test examples: epsilon {e:.3} at delta {} per example over {} ({} per \
                 evaluation: each evaluation sends their noised residuals to the device), accounted apart from \
                 the training samples",
                self.delta,
                plural(self.evaluations, "evaluation"),
                plural(r, "Gaussian release")
            ),
            (_, None) => "privacy of the test examples: NO differential-privacy guarantee (--noise-multiplier 0): \
                          their residuals were released without noise"
                .to_string(),
        }
    }
}

/// The privacy summary of a run of `epochs` epochs (each sample takes part in one step per epoch,
/// and the test split is evaluated once per epoch).
pub fn privacy_summary(ledger: &PrivacyLedger, epochs: usize) -> PrivacySummary {
    let spent = ledger.spent(epochs as u64);
    let gradients = if ledger.gradients_in_clear { "" } else { " and output-gradient residuals" };
    let mut covers = format!(
        "covers each training sample's clipped, noised activation residuals{gradients} (record-level, \
         zero-out adjacency; every layer, step and epoch composed by an RDP accountant); does NOT cover \
         the weights, which are trained on the private data and sent to the device every step"
    );
    if ledger.gradients_in_clear {
        covers.push_str(", nor the output gradients, sent IN THE CLEAR (--protect-gradients off)");
    }
    PrivacySummary {
        epsilon: spent.map(|s| s.epsilon),
        delta: ledger.delta,
        noise_multiplier: ledger.noise_multiplier,
        releases_per_sample: ledger.releases_per_step * epochs as u64,
        covers,
        evaluation: EvaluationPrivacy::new(ledger, epochs as u64),
    }
}

/// Rejects settings that cannot make sense before any data is touched.
pub fn check(o: &AsymmlOptions) -> Result<()> {
    if let Some(e) = o.epsilon {
        if !(e.is_finite() && e > 0.0) {
            bail!("--epsilon must be a positive number, got {e}");
        }
    }
    trustsplit_schemes::asymml::validate(&o.config(o.noise_multiplier)).map_err(anyhow::Error::msg)
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Flags {
        #[command(flatten)]
        asymml: AsymmlArgs,
    }

    #[test]
    fn command_line_defaults_are_the_recorded_defaults() {
        // Runs configured in code (tests, the library) and runs from the command line with no
        // AsymML flags must get the same settings, including the prototype's rank schedule.
        let parsed = Flags::try_parse_from(["trustsplit"]).unwrap();
        assert_eq!(AsymmlOptions::from(&parsed.asymml), AsymmlOptions::default());
        assert_eq!(AsymmlOptions::default().rank_schedule, PROTOTYPE_RANKS);
        let custom = Flags::try_parse_from(["trustsplit", "--rank-schedule", "1,3", "--clip-norm", "0.5"]).unwrap();
        let options = AsymmlOptions::from(&custom.asymml);
        assert_eq!((options.rank_schedule, options.clip_norm), (vec![1, 3], 0.5));
    }
}
