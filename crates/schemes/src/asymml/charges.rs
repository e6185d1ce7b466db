//! What a training run has charged, per training sample and per test example, kept so that no
//! release goes uncharged: one small serialisable value, [`PrivacyCharges`], that the training loop
//! writes durably before the releases it charges (`trustsplit train`: `privacy.json` in the output
//! folder, written atomically) and reads back on `--resume`.
//!
//! The charge is per sample and conservative. An epoch that starts may release every sample once
//! (in its one step with that sample), so it is charged in full before its first release, whether
//! or not it completes; an epoch interrupted (a device that died, a result refused) and replayed
//! after `--resume` is charged again, as the samples it had already sent go out again with fresh
//! noise, which a device could otherwise average by forcing replays. Each evaluation of the test
//! split likewise, for the test examples. The epsilon is then the composition of every charge.

use super::{releases_per_evaluation, releases_per_step, AsymmlConfig};
use crate::accountant::{PrivacySpent, RdpAccountant};
use serde::{Deserialize, Serialize};
use trustsplit_nn::Model;

/// Every charge a training run has made so far (see the module docs).
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
pub struct PrivacyCharges {
    /// Training epochs started, replays included: the training steps charged to each sample.
    pub participations: u64,
    /// Evaluations of the test split started, replays included.
    pub evaluations: u64,
    /// The Gaussian releases charged to each training sample, composed.
    pub training: RdpAccountant,
    /// The Gaussian releases charged to each test example, composed.
    pub evaluation: RdpAccountant,
}

impl PrivacyCharges {
    /// Charges one epoch to each training sample: `releases` Gaussian releases at `noise_multiplier`.
    pub fn charge_epoch(&mut self, noise_multiplier: f64, releases: u64) {
        self.participations += 1;
        self.training.compose_gaussian(noise_multiplier, releases);
    }

    /// Charges one evaluation to each test example.
    pub fn charge_evaluation(&mut self, noise_multiplier: f64, releases: u64) {
        self.evaluations += 1;
        self.evaluation.compose_gaussian(noise_multiplier, releases);
    }

    /// What the training samples spent; `None` without noise (no finite epsilon).
    pub fn training_spent(&self, delta: f64) -> Option<PrivacySpent> {
        finite(&self.training, delta)
    }

    /// What the test examples spent; `None` without noise.
    pub fn evaluation_spent(&self, delta: f64) -> Option<PrivacySpent> {
        finite(&self.evaluation, delta)
    }
}

fn finite(acc: &RdpAccountant, delta: f64) -> Option<PrivacySpent> {
    Some(acc.spent(delta)).filter(|s| s.epsilon.is_finite())
}

/// The Gaussian releases one epoch charges to each training sample (its step, in training batches
/// of `batch`) and to each test example (one evaluation, in batches of `eval_batch`), counted from
/// `model`'s shapes before anything is released. Pass the batches actually run (a split smaller
/// than the batch size makes a smaller batch); a smaller last batch charges no more.
pub fn releases_per_epoch(model: &Model, config: &AsymmlConfig, batch: usize, eval_batch: usize) -> (u64, u64) {
    (releases_per_step(model, config, batch), releases_per_evaluation(model, config, eval_batch))
}
