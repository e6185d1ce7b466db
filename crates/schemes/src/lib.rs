//! Schemes decide, layer by layer, which side of the trust boundary computes what.
//!
//! One module per scheme says what it releases; a reviewer reads that file to see what leaks:
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
pub mod gpu_only;
pub mod placement;
pub mod plaintext;
pub mod runner;
pub mod tee_only;

pub use placement::Placement;
pub use runner::{RunnerError, SchemeReport, SplitRunner, StepOutput};

use serde::{Deserialize, Serialize};

/// The schemes this build can run.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum SchemeKind {
    Plaintext,
    TeeOnly,
    GpuOnly,
    Asymml,
}

impl SchemeKind {
    pub const ALL: [SchemeKind; 4] =
        [SchemeKind::Plaintext, SchemeKind::TeeOnly, SchemeKind::GpuOnly, SchemeKind::Asymml];

    pub fn name(&self) -> &'static str {
        match self {
            SchemeKind::Plaintext => "plaintext",
            SchemeKind::TeeOnly => "tee-only",
            SchemeKind::GpuOnly => "gpu-only",
            SchemeKind::Asymml => "asymml",
        }
    }

    /// One line on what the untrusted side learns.
    pub fn releases(&self) -> &'static str {
        match self {
            SchemeKind::Plaintext => "nothing (no split: the whole step runs on this machine)",
            SchemeKind::TeeOnly => "nothing (every operation runs inside the enclave)",
            SchemeKind::GpuOnly => {
                "INSECURE: every layer's input activations, weights and output gradients go to the device in the clear"
            }
            SchemeKind::Asymml => {
                "each convolution's input residual (after a per-sample top-r split; clipped and noised when \
                 --noise-multiplier > 0), the weights, and the output gradients' noised residuals \
                 (or the gradients in the clear with --protect-gradients off)"
            }
        }
    }

    /// Whether the scheme needs a device.
    pub fn uses_device(&self) -> bool {
        matches!(self, SchemeKind::GpuOnly | SchemeKind::Asymml)
    }
}

impl std::str::FromStr for SchemeKind {
    type Err = String;
    fn from_str(s: &str) -> Result<Self, String> {
        SchemeKind::ALL.iter().copied().find(|k| k.name() == s).ok_or_else(|| {
            let names: Vec<&str> = SchemeKind::ALL.iter().map(|k| k.name()).collect();
            format!("unknown or not yet available scheme '{s}'; available: {}", names.join(", "))
        })
    }
}

impl std::fmt::Display for SchemeKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}
