//! CryptGPU as a `--scheme`: its description, options, and the session a run starts.

use crate::gemm::{set_ring_device, RingDevice};
use crate::model::Sgd;
use crate::network::{self, Parties};
use crate::party::MpcError;
use crate::ring::FixedPoint;
use crate::session::{RunSettings, Session, UploadRef};
use serde::{Deserialize, Serialize};
use trustsplit_boundary::{KeyPair, PublicKey};
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
    /// cryptgpu: a truncation that fails leaves a value off by 2^(64-2f) (16.7 million at 20
    /// bits); ReLU zeroes its inputs at or above this bound and each step zeroes weight-gradient
    /// entries beyond it, so that such a value never reaches the weights. Must exceed every honest
    /// activation and gradient of the model.
    #[cfg_attr(feature = "cli", arg(long, default_value_t = crate::model::DEFAULT_ACTIVATION_BOUND, value_name = "X"))]
    #[serde(default = "default_value_bound")]
    pub value_bound: f64,
    /// cryptgpu: drive three `trustsplit party` processes as their data owner, at these
    /// addresses (their --listen as this machine reaches them), party 0, 1, 2 in order, over the
    /// authenticated, encrypted link: this side's key is --key, the parties' --party-keys. Without
    /// it the three parties are threads of this process.
    #[cfg_attr(feature = "cli", arg(long, value_name = "HOST:PORT,HOST:PORT,HOST:PORT", value_delimiter = ','))]
    // Where the parties run is not part of a run's identity: a run may resume elsewhere.
    #[serde(skip)]
    pub peers: Vec<String>,
    /// cryptgpu with --peers: the three parties' public keys (64 hex digits each, as their
    /// `trustsplit keygen` printed them), in the order of --peers; a party that cannot prove its
    /// key is not linked.
    #[cfg_attr(feature = "cli", arg(long, value_name = "HEX,HEX,HEX", value_delimiter = ','))]
    #[serde(skip)]
    pub party_keys: Vec<PublicKey>,
    /// cryptgpu: where the parties of this process compute their ring products: cpu (native
    /// 64-bit integers), or cuda (float limbs through cuBLAS DGEMM on GPU 0, exact; needs a build
    /// with the `cuda` feature, an NVIDIA driver and cuBLAS). With --peers the parties are other
    /// processes: give each `trustsplit party` its own --ring-device instead.
    #[cfg_attr(feature = "cli", arg(long, value_enum, default_value_t = RingDevice::Cpu, value_name = "DEVICE"))]
    // Like --peers, where a run computes is not part of its identity: it may resume on another machine.
    #[serde(skip)]
    pub ring_device: RingDevice,
    /// cryptgpu with --peers: train and evaluate on the dataset uploaded to the parties under
    /// this name (`trustsplit upload --scheme cryptgpu --name NAME`) instead of sharing every
    /// batch: each step then sends the parties only its record numbers. The data owner still
    /// reads its own copy, to check that the parties hold the same data and settings (the
    /// fingerprint) and to score the logits.
    #[cfg_attr(feature = "cli", arg(long, value_name = "NAME"))]
    // Where the batches come from is not part of a run's identity either.
    #[serde(skip)]
    pub uploaded: Option<String>,
    /// The upload's fingerprints, which the caller computes from its copy of the data.
    #[cfg_attr(feature = "cli", arg(skip))]
    #[serde(skip)]
    pub upload_ref: Option<UploadRef>,
}

fn default_frac_bits() -> u32 {
    crate::ring::DEFAULT_FRAC_BITS
}

fn default_value_bound() -> f64 {
    crate::model::DEFAULT_ACTIVATION_BOUND
}

impl Default for CryptgpuOptions {
    fn default() -> Self {
        CryptgpuOptions {
            frac_bits: default_frac_bits(),
            value_bound: default_value_bound(),
            peers: Vec::new(),
            party_keys: Vec::new(),
            ring_device: RingDevice::Cpu,
            uploaded: None,
            upload_ref: None,
        }
    }
}

impl CryptgpuOptions {
    /// The settings the parties are given, checked.
    fn settings(&self, fp: FixedPoint, sgd: Sgd) -> Result<RunSettings, MpcError> {
        let bound = self.value_bound;
        // The bound is a fixed-point constant, and a failed truncation's 2^(64-2f) must exceed it.
        let failure = 2f64.powi(64 - 2 * fp.frac_bits as i32);
        if !(bound.is_finite() && bound > 0.0 && bound < failure) {
            return Err(MpcError::Invalid(format!(
                "--value-bound must be positive and below 2^(64 - 2 x {}) = {failure}, got {bound}",
                fp.frac_bits
            )));
        }
        if self.uploaded.is_some() != self.upload_ref.is_some() {
            return Err(MpcError::Invalid("--uploaded: the upload's fingerprints were not computed".into()));
        }
        Ok(RunSettings { fp, sgd, activation_bound: bound, uploaded: self.upload_ref.clone() })
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
    // Settings that refuse fail before a GPU is opened.
    let sgd = sgd_of(opt)?;
    if options.uploaded.is_some() {
        return Err(MpcError::Invalid(
            "--uploaded names data the parties of --peers hold: give --peers (and --party-keys, --key)".into(),
        ));
    }
    set_ring_device(options.ring_device).map_err(MpcError::Invalid)?;
    let fp = FixedPoint::new(options.frac_bits).map_err(MpcError::Invalid)?;
    Session::local(model, momentum_of(opt), options.settings(fp, sgd)?)
}

/// The three `trustsplit party` processes at `options.peers`, reached as their data owner with
/// `key`, sharing `model` (and `opt`'s momentum buffers, on resume).
pub fn start_remote(
    model: &Model,
    opt: &Optimizer,
    options: &CryptgpuOptions,
    key: &KeyPair,
) -> Result<Session, MpcError> {
    if options.party_keys.is_empty() {
        return Err(MpcError::Invalid(
            "--peers needs --party-keys HEX,HEX,HEX: the three parties' public keys (their trustsplit keygen), in \
             the order of --peers"
                .into(),
        ));
    }
    let parties = Parties::new(options.peers.clone(), options.party_keys.clone())?;
    let fp = FixedPoint::new(options.frac_bits).map_err(MpcError::Invalid)?;
    // Refused settings fail here, before any party is reached and left waiting.
    let sgd = sgd_of(opt)?;
    if options.ring_device != RingDevice::Cpu {
        // The data owner computes no ring product; a GPU opened here would sit idle while the
        // parties, which compute them all, ran on their CPUs.
        return Err(MpcError::Invalid(
            "with --peers the parties compute the ring products: give --ring-device to each `trustsplit party` \
             instead (the data owner computes none)"
                .into(),
        ));
    }
    let links = network::connect_parties(&parties, key)?;
    let settings = options.settings(fp, sgd)?;
    Session::start(links, Vec::new(), model, momentum_of(opt), settings)
}

/// The momentum buffers a resumed run starts from (`None` before the first step).
pub fn momentum_of(opt: &Optimizer) -> Option<&[trustsplit_nn::Tensor]> {
    opt.state.first().map(Vec::as_slice)
}
