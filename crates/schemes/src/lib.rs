//! Schemes decide, layer by layer, which side of the trust boundary computes what.
//!
//! One module or folder per scheme says what it releases; a reviewer reads its header to see what
//! leaks. Each exports `INFO` ([`SchemeInfo`]) and a `build` constructor, with its options and run
//! summary beside it; the command line lists them in `crates/cli/src/registry.rs`
//! (ARCHITECTURE.md, "Adding a scheme"):
//! - [`plaintext`]: no split, the numerical reference (nothing leaves; no enclave accounting).
//! - [`tee_only`]: every operation inside the enclave; nothing is released.
//! - [`gpu_only`]: linear operations on the device in the clear; an insecure baseline.
//! - [`asymml`]: low-rank parts in the enclave, noised residuals on the device (AsymML / 3LegRace).
//!
//! The walk over the model ([`runner`]) is shared: it runs batch-norm, activations, pooling, the
//! loss and the optimizer inside the enclave and hands convolutions and linear layers to the
//! scheme's [`Placement`].

pub mod accountant;
pub mod asymml;
pub mod device_check;
pub mod dp_sgd;
pub mod gpu_only;
pub mod placement;
pub mod plaintext;
pub mod runner;
pub mod tee_only;

pub use placement::Placement;
pub use runner::{RunnerError, SchemeReport, SplitRunner, StepOutput};

use std::sync::Arc;
use trustsplit_boundary::Transcript;
use trustsplit_device::Device;
use trustsplit_nn::Model;

/// What the command line, the reports and the docs need to know of a scheme. Each scheme's module
/// exports one as `INFO`; the command line's registry lists them.
#[derive(Debug)]
pub struct SchemeInfo {
    /// The `--scheme` value, recorded in checkpoints and reports.
    pub name: &'static str,
    /// One line on what the untrusted side learns.
    pub releases: &'static str,
    /// Whether the scheme computes on a device (`--device`).
    pub uses_device: bool,
    /// The scheme's page, from the repository's root.
    pub docs: &'static str,
}

impl PartialEq for SchemeInfo {
    fn eq(&self, other: &SchemeInfo) -> bool {
        self.name == other.name
    }
}

impl std::fmt::Display for SchemeInfo {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name)
    }
}

/// What every scheme's runner is built from.
pub struct RunnerInputs<'a> {
    /// The devices the caller opened from `--device` (empty for a scheme that uses none).
    pub devices: Vec<Device>,
    /// The enclave's memory budget in bytes.
    pub memory_budget: usize,
    pub transcript: Arc<Transcript>,
    /// Set when the runner will train: the run's model and length, for schemes that calibrate
    /// themselves to the whole run (AsymML's `--epsilon`). `None` for evaluation and benchmarks.
    pub training: Option<TrainingRun<'a>>,
}

/// The shape of a training run.
#[derive(Clone, Copy)]
pub struct TrainingRun<'a> {
    pub model: &'a Model,
    pub batch_size: usize,
    pub epochs: usize,
}
