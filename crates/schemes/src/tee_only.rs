//! `tee-only`: every operation inside the enclave.
//!
//! Releases: nothing. The inputs, labels, weights, activations and gradients never leave; the
//! transcript of a tee-only run is empty. The price is that the enclave's slow CPU does all the
//! work, and its small memory (the budget) forces saved activations to be sealed and spilled.

use crate::placement::Trusted;
use crate::{RunnerError, RunnerInputs, SchemeInfo, SplitRunner};
use std::sync::Arc;
use trustsplit_boundary::Transcript;

pub const INFO: SchemeInfo = SchemeInfo {
    name: "tee-only",
    releases: "nothing (every operation runs inside the enclave)",
    uses_device: false,
    docs: "docs/schemes/baselines.md",
};

pub fn runner(memory_budget: usize, transcript: Arc<Transcript>) -> Result<SplitRunner, RunnerError> {
    SplitRunner::new(&INFO, Box::new(Trusted), Some(memory_budget), transcript, None)
}

/// The runner from the common inputs (the registry's constructor).
pub fn build(inputs: RunnerInputs) -> Result<SplitRunner, RunnerError> {
    runner(inputs.memory_budget, inputs.transcript)
}
