//! `tee-only`: every operation inside the enclave.
//!
//! Releases: nothing. The inputs, labels, weights, activations and gradients never leave; the
//! transcript of a tee-only run is empty. The price is that the enclave's slow CPU does all the
//! work, and its small memory (the budget) forces saved activations to be sealed and spilled.

use crate::placement::Trusted;
use crate::{RunnerError, SchemeKind, SplitRunner};
use std::sync::Arc;
use trustsplit_boundary::Transcript;

pub fn runner(memory_budget: usize, transcript: Arc<Transcript>) -> Result<SplitRunner, RunnerError> {
    SplitRunner::new(SchemeKind::TeeOnly, Box::new(Trusted), Some(memory_budget), transcript, None)
}
