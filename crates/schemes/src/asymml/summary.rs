//! What an AsymML run tells its user at the end: the privacy each training sample and each test
//! example spent, what that epsilon covers, the per-layer splits and whether the device's results
//! were verified.

use super::{PrivacyCharges, PrivacyLedger};
use crate::device_check::CheckTally;
use crate::SchemeReport;
use serde::Serialize;

/// The privacy a training run spent, per sample.
#[derive(Clone, Debug, Serialize)]
pub struct PrivacySummary {
    /// `None` without noise (no finite guarantee); serialised as null.
    pub epsilon: Option<f64>,
    pub delta: f64,
    pub noise_multiplier: f64,
    /// Training steps charged to each sample: one per epoch started, so an epoch interrupted and
    /// replayed after `--resume` counts twice (both times it may have released the sample).
    pub participations: u64,
    /// Gaussian releases charged to each training sample over the run (every participation's).
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
    /// How many times each example was evaluated, as charged (the training command evaluates the
    /// test split once per epoch; an evaluation interrupted and replayed counts twice).
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

/// The privacy summary of a training run that made `charges` (see [`PrivacyCharges`]), with
/// `ledger` the placement's count of its releases.
pub fn privacy_summary(ledger: &PrivacyLedger, charges: &PrivacyCharges) -> PrivacySummary {
    let no_noise = ledger.noise_multiplier <= 0.0;
    let gradients = if ledger.gradients_in_clear { "" } else { " and output-gradient residuals" };
    let mut covers = match ledger.dp_sgd_clip {
        None => format!(
            "residual releases only: covers each training sample's clipped, noised activation \
             residuals{gradients} (record-level, zero-out adjacency; every layer, step and epoch composed by \
             an RDP accountant); does NOT cover the weights, which are trained on the private data and sent \
             to the device every step (--dp full covers them)"
        ),
        Some(clip) => format!(
            "the device's whole view: each training sample's clipped, noised activation residuals{gradients} \
             and the weights, trained by DP-SGD in the enclave (each sample's whole gradient clipped to {clip}, \
             Gaussian noise on every update), composed by one RDP accountant (record-level, zero-out \
             adjacency)"
        ),
    };
    if ledger.gradients_in_clear {
        covers.push_str(", nor the output gradients, sent IN THE CLEAR (--protect-gradients off)");
    }
    let evaluation_epsilon = charges.evaluation_spent(ledger.delta).filter(|_| !no_noise);
    PrivacySummary {
        epsilon: charges.training_spent(ledger.delta).filter(|_| !no_noise).map(|s| s.epsilon),
        delta: ledger.delta,
        noise_multiplier: ledger.noise_multiplier,
        participations: charges.participations,
        releases_per_sample: charges.training.releases(),
        covers,
        evaluation: EvaluationPrivacy {
            evaluations: charges.evaluations,
            releases_per_evaluation: ledger.releases_per_evaluation,
            epsilon: evaluation_epsilon.filter(|_| ledger.releases_per_evaluation > 0).map(|s| s.epsilon),
            delta: ledger.delta,
        },
    }
}

/// `n word`, with an `s` unless `n` is 1.
fn plural(n: u64, word: &str) -> String {
    format!("{n} {word}{}", if n == 1 { "" } else { "s" })
}

/// The summary's line on whether the device's results were verified.
pub fn describe_device_checks(checks: Option<CheckTally>) -> String {
    match checks {
        Some(c) => format!(
            "device results: verified ({} values checked through secret projections; the closest came to {:.2e} of \
             its tolerance)",
            c.checks, c.worst_ratio
        ),
        None => "device results: NOT verified (--verify-device off): a faulty or malicious device could have \
                 biased the training undetected"
            .to_string(),
    }
}

/// The lines AsymML adds to the end of a training run: the privacy spent (`privacy`, the run's
/// [`privacy_summary`]), the per-layer splits and the device checks.
pub fn describe_run(report: &SchemeReport, privacy: Option<&PrivacySummary>) -> Vec<String> {
    let mut lines = Vec::new();
    if let Some(p) = privacy {
        lines.push(match p.epsilon {
            Some(e) => format!(
                "privacy: epsilon {e:.3} at delta {} per training sample (noise multiplier {:.4}, {} Gaussian releases \
                 per sample over {} charged: one per epoch started, replays included); {}",
                p.delta,
                p.noise_multiplier,
                p.releases_per_sample,
                plural(p.participations, "participation"),
                p.covers
            ),
            None => "privacy: NO differential-privacy guarantee (--noise-multiplier 0): residuals were released \
                     without noise"
                .to_string(),
        });
        lines.push(p.evaluation.describe());
    }
    let layers = &report.placement.layers;
    if report.placement.privacy.is_some() && !layers.is_empty() {
        let shown: Vec<String> = layers
            .iter()
            .map(|l| {
                format!(
                    "{} {} r={:.1} residual {:.1}% clipped {:.0}%",
                    l.layer,
                    l.what,
                    l.mean_rank,
                    100.0 * l.residual_energy_ratio,
                    100.0 * l.clipped_fraction
                )
            })
            .collect();
        lines.push(format!(
            "asymml per layer (mean rank per sample; residual share of the energy before noise; released residuals \
             clipped):\n  {}",
            shown.join("\n  ")
        ));
    }
    lines.push(describe_device_checks(report.placement.device_checks));
    lines
}

/// The lines AsymML adds to the end of an evaluation: what it released about each example, and
/// the device checks.
pub fn describe_evaluation(report: &SchemeReport) -> Vec<String> {
    let mut lines: Vec<String> =
        report.placement.privacy.iter().map(|l| EvaluationPrivacy::new(l, 1).describe()).collect();
    lines.push(describe_device_checks(report.placement.device_checks));
    lines
}
