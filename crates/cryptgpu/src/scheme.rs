//! CryptGPU as a `--scheme`: its description, options, and the session a run starts.

use crate::model::Sgd;
use crate::party::MpcError;
use crate::session::Session;
use serde::{Deserialize, Serialize};
use trustsplit_nn::optim::{Optimizer, OptimizerKind};
use trustsplit_nn::Model;
use trustsplit_schemes::SchemeInfo;

pub const INFO: SchemeInfo = SchemeInfo {
    name: "cryptgpu",
    releases: "nothing to any one party: three parties hold 2-out-of-3 replicated shares (semi-honest, honest majority; no TEE)",
    uses_device: false,
    docs: "docs/schemes/cryptgpu.md",
};

/// CryptGPU's settings.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "cli", derive(clap::Args))]
pub struct CryptgpuOptions {
    /// cryptgpu: fractional bits of the fixed-point numbers in Z_2^64 (CryptGPU uses 20, CrypTen
    /// 16). More bits: finer values, but a truncation fails (one value off by 2^(64-f)) with
    /// probability |value| * 2^(2f-64) per product.
    #[cfg_attr(feature = "cli", arg(long, default_value_t = crate::ring::DEFAULT_FRAC_BITS, value_name = "BITS"))]
    #[serde(default = "default_frac_bits")]
    pub frac_bits: u32,
}

fn default_frac_bits() -> u32 {
    crate::ring::DEFAULT_FRAC_BITS
}

impl Default for CryptgpuOptions {
    fn default() -> Self {
        CryptgpuOptions { frac_bits: default_frac_bits() }
    }
}

/// The optimizer settings the parties apply on shares: SGD with momentum and weight decay.
pub fn sgd_of(opt: &Optimizer) -> Result<Sgd, MpcError> {
    if opt.max_grad_norm.is_some() {
        return Err(MpcError::Invalid(
            "cryptgpu does not clip gradients (--max-grad-norm needs a private square root)".into(),
        ));
    }
    match opt.kind {
        OptimizerKind::Sgd { momentum, nesterov: false } => {
            Ok(Sgd { lr: 0.0, momentum: momentum as f64, weight_decay: opt.weight_decay as f64 })
        }
        OptimizerKind::Sgd { nesterov: true, .. } => {
            Err(MpcError::Invalid("cryptgpu runs SGD without Nesterov momentum".into()))
        }
        OptimizerKind::Adam { .. } => {
            Err(MpcError::Invalid("cryptgpu runs SGD (Adam needs a private square root and division)".into()))
        }
    }
}

/// Three parties in this process, sharing `model` (and `opt`'s momentum buffers, on resume).
pub fn start_local(model: &Model, opt: &Optimizer, options: &CryptgpuOptions) -> Result<Session, MpcError> {
    Session::local(model, momentum_of(opt), options.frac_bits, sgd_of(opt)?)
}

/// The momentum buffers a resumed run starts from (`None` before the first step).
pub fn momentum_of(opt: &Optimizer) -> Option<&[trustsplit_nn::Tensor]> {
    opt.state.first().map(Vec::as_slice)
}
