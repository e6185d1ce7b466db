//! The training flags `train` and `enclave` share, so the enclave process takes the same model,
//! optimiser, schedule, output and resume settings as a local run (its dataset arrives by upload
//! instead of from `--data-dir`, and its scheme defaults to tee-only).
//!
//! Tried and dropped:
//! - Learning rate 0.03 as the default (until 2026-12-02): 9 of 95 default LeNet-5 runs collapsed
//!   to chance that day, against none of 60 at 0.02; weight decay 5e-3 at 0.03 still collapsed once
//!   in 30 runs (2026-12-02).
//! - `--max-grad-norm 1` by default: at the default noise it cost 1-2 points in 5 epochs (LeNet-5,
//!   medians 81.3% against 82.25% over ten runs each), though it stops the collapses at z = 8
//!   (2026-12-02, commit 40b59a5).

use std::path::PathBuf;

use anyhow::{bail, ensure, Result};
use trustsplit_nn::optim::{OptimizerKind, Schedule};

use crate::registry::SchemeOptions;
use crate::train::{self, TrainConfig};

#[derive(clap::Args)]
pub struct TrainingArgs {
    /// Device for schemes that offload: cpu, cpu:THREADS, wgpu, wgpu:cpu, cuda, cuda:INDEX, or
    /// tcp://HOST:PORT (a `trustsplit device` worker). Several, comma-separated, split each batch.
    #[arg(long, default_value = "cpu")]
    pub device: String,
    #[command(flatten)]
    pub device_link: crate::devices::DeviceLinkArgs,
    /// The enclave's memory budget in MiB (SGX's usable EPC is typically about 96 MiB); past it,
    /// saved activations are sealed (AES-256-GCM) and spilled to untrusted memory.
    #[arg(long, default_value_t = 96)]
    pub memory_budget_mib: usize,
    /// Write every value that crosses the trust boundary as a JSON line to FILE, with the SHA-256
    /// of its bytes (which finds it in a device's --record).
    #[arg(long)]
    pub transcript: Option<PathBuf>,
    /// Model: lenet5, lenet (CryptGPU's), alexnet, vgg11|13|16|19 (add -bn for batch-norm),
    /// resnet18, resnet34.
    #[arg(long, default_value = "lenet5", value_parser = model_parser())]
    pub model: String,
    /// Pooling of the models that max-pool: max, or avg (average pools of the same windows, as
    /// CryptGPU's networks; the model is then recorded as MODEL-avgpool).
    #[arg(long, default_value = "max", value_parser = ["max", "avg"])]
    pub pool: String,
    #[arg(long, default_value_t = 5)]
    pub epochs: usize,
    #[arg(long, default_value_t = 32)]
    pub batch_size: usize,
    /// Base learning rate (0.02: at 0.03 AsymML's default noise made LeNet-5 collapse to chance
    /// in about one run in ten; BENCHMARKS.md, "Accuracy against epsilon").
    #[arg(long, default_value_t = 0.02)]
    pub lr: f32,
    /// sgd (momentum 0.9) or adam.
    #[arg(long, default_value = "sgd")]
    pub optimizer: String,
    #[arg(long, default_value_t = 0.9)]
    pub momentum: f32,
    #[arg(long, default_value_t = 5e-4)]
    pub weight_decay: f32,
    /// Clip each step's gradients to this global L2 norm before the update (PyTorch's
    /// clip_grad_norm_); off by default. Steadies AsymML under heavy noise: at
    /// --noise-multiplier 8, 1.0 kept LeNet-5 from collapsing (BENCHMARKS.md, "Accuracy against
    /// epsilon"), but at the default noise it costs accuracy in 5 epochs.
    #[arg(long, value_name = "NORM")]
    pub max_grad_norm: Option<f32>,
    /// Learning-rate schedule: cosine, constant, or step:EVERY:GAMMA (e.g. step:30:0.1).
    #[arg(long, default_value = "cosine")]
    pub schedule: String,
    /// Compute threads (the trusted side of a TEE typically has 1 or 2).
    #[arg(long, default_value_t = 1)]
    pub threads: usize,
    #[arg(long, default_value_t = 0)]
    pub seed: u64,
    /// Output folder for checkpoint.safetensors and metrics.jsonl [default: runs/MODEL-DATASET].
    #[arg(long)]
    pub out: Option<PathBuf>,
    /// Continue from the checkpoint in --out (written by a run with the same settings).
    #[arg(long)]
    pub resume: bool,
    /// Write a metrics line every N steps.
    #[arg(long, default_value_t = 50)]
    pub log_every: usize,
    /// Print one JSON summary object on stdout.
    #[arg(long)]
    pub json: bool,
    #[command(flatten)]
    pub scheme_options: SchemeOptions,
}

impl TrainingArgs {
    /// Checks what can be checked before any data is at hand (the enclave runs this before it
    /// waits for the upload, so that a typo does not surface only after the owner has uploaded).
    pub fn check(&self) -> Result<()> {
        ensure!(
            trustsplit_nn::zoo::is_known(&self.model_name()),
            "unknown model '{}'; choose one of: {}",
            self.model,
            trustsplit_nn::zoo::MODEL_NAMES.join(", ")
        );
        ensure!(self.epochs >= 1 && self.batch_size >= 1, "--batch-size and --epochs must be at least 1");
        ensure!(self.threads >= 1, "--threads must be at least 1");
        train::check_update_settings(self.lr, self.max_grad_norm)?;
        parse_optimizer(&self.optimizer, self.momentum)?;
        parse_schedule(&self.schedule, self.epochs)?;
        self.scheme_options.asymml.check().map_err(anyhow::Error::msg)
    }

    /// The zoo name of the model asked for (with `-avgpool` under `--pool avg`).
    pub fn model_name(&self) -> String {
        model_with_pool(&self.model, &self.pool)
    }

    /// Sets these flags in `cfg` (whose model and dataset it was made with); returns the output
    /// folder.
    pub fn apply(&self, cfg: &mut TrainConfig) -> Result<PathBuf> {
        cfg.epochs = self.epochs;
        cfg.batch_size = self.batch_size;
        cfg.lr = self.lr;
        cfg.optimizer = parse_optimizer(&self.optimizer, self.momentum)?;
        cfg.weight_decay = self.weight_decay;
        cfg.max_grad_norm = self.max_grad_norm;
        cfg.schedule = parse_schedule(&self.schedule, self.epochs)?;
        cfg.threads = self.threads;
        cfg.seed = self.seed;
        cfg.log_every = self.log_every;
        cfg.device = self.device.clone();
        cfg.device_link = self.device_link.clone();
        cfg.memory_budget = self.memory_budget_mib << 20;
        cfg.transcript = self.transcript.clone();
        cfg.options = self.scheme_options.clone();
        Ok(self.out.clone().unwrap_or_else(|| PathBuf::from("runs").join(format!("{}-{}", cfg.model, cfg.dataset))))
    }
}

/// `model` with the zoo's average-pooling suffix when `pool` is `avg`.
pub fn model_with_pool(model: &str, pool: &str) -> String {
    match pool {
        "avg" if !model.ends_with(trustsplit_nn::zoo::AVG_POOL_SUFFIX) => {
            format!("{model}{}", trustsplit_nn::zoo::AVG_POOL_SUFFIX)
        }
        _ => model.to_string(),
    }
}

/// `--model`'s parser: any zoo name, with the zoo's names in the error.
pub fn model_parser() -> impl clap::builder::TypedValueParser<Value = String> {
    use clap::builder::TypedValueParser;
    clap::builder::NonEmptyStringValueParser::new().try_map(|name: String| {
        if trustsplit_nn::zoo::is_known(&name) {
            Ok(name)
        } else {
            Err(format!("unknown model '{name}'; choose one of: {}", trustsplit_nn::zoo::MODEL_NAMES.join(", ")))
        }
    })
}

fn parse_optimizer(name: &str, momentum: f32) -> Result<OptimizerKind> {
    Ok(match name {
        "sgd" => OptimizerKind::Sgd { momentum, nesterov: false },
        "adam" => OptimizerKind::Adam { beta1: 0.9, beta2: 0.999, eps: 1e-8 },
        other => bail!("unknown optimizer '{other}'; choose sgd or adam"),
    })
}

fn parse_schedule(s: &str, epochs: usize) -> Result<Schedule> {
    let parts: Vec<&str> = s.split(':').collect();
    Ok(match parts.as_slice() {
        ["cosine"] => Schedule::Cosine { epochs },
        ["constant"] => Schedule::Constant,
        ["step", every, gamma] => Schedule::Step { every: every.parse()?, gamma: gamma.parse()? },
        _ => bail!("unknown schedule '{s}'; use cosine, constant or step:EVERY:GAMMA"),
    })
}
