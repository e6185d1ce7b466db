//! `plaintext`: no split. The numerical reference every scheme is compared with.
//!
//! Releases: nothing. Nothing is accounted either: this is an ordinary training loop.

use crate::placement::Trusted;
use crate::{RunnerError, RunnerInputs, SchemeInfo, SplitRunner};
use std::sync::Arc;
use trustsplit_boundary::Transcript;

pub const INFO: SchemeInfo = SchemeInfo {
    name: "plaintext",
    releases: "nothing (no split: the whole step runs on this machine)",
    uses_device: false,
    docs: "docs/schemes/baselines.md",
};

pub fn runner(transcript: Arc<Transcript>) -> Result<SplitRunner, RunnerError> {
    SplitRunner::new(&INFO, Box::new(Trusted), None, transcript, None)
}

/// The runner from the common inputs (the registry's constructor).
pub fn build(inputs: RunnerInputs) -> Result<SplitRunner, RunnerError> {
    runner(inputs.transcript)
}
