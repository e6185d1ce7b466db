//! The training loop: data, model, optimizer, metrics, checkpoints and resume.
//!
//! A scheme that keeps a privacy ledger (AsymML) has each epoch's training steps and evaluation
//! charged before their first release, durably, in the output folder's `privacy.json`
//! ([`PrivacyCharges`]): an epoch cut short and replayed after `--resume` is charged twice, and a
//! resume without that file, or with one older than the checkpoint, is refused.

use crate::progress;
use crate::runner::Runner;
use anyhow::{bail, Context, Result};
use serde::{Deserialize, Serialize};
use std::io::Write;
use std::path::{Path, PathBuf};
use std::time::Instant;
use trustsplit_boundary::Secret;
use trustsplit_data::{batches, num_batches, BatchOptions, Dataset, DatasetKind};
use trustsplit_nn::optim::{Optimizer, OptimizerKind, Schedule};
use trustsplit_nn::tensor::from_vec;
use trustsplit_nn::{checkpoint, zoo, Model};
use trustsplit_schemes::asymml::{self, EvaluationPrivacy, PrivacyCharges, PrivacyLedger, PrivacySummary};
use trustsplit_schemes::{RunnerError, TrainingRun};

pub use crate::registry::{Scheme, SchemeOptions};

/// Everything that defines a training run. Recorded in checkpoints so `--resume` can refuse a
/// run whose settings differ.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct TrainConfig {
    pub scheme: Scheme,
    pub model: String,
    pub dataset: String,
    pub data_dir: Option<PathBuf>,
    pub epochs: usize,
    pub batch_size: usize,
    pub lr: f32,
    pub optimizer: OptimizerKind,
    pub weight_decay: f32,
    /// Clip each step's gradients to this global L2 norm (`None`: no clipping; left out of the
    /// recorded configuration then, so that older checkpoints still resume).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub max_grad_norm: Option<f32>,
    pub schedule: Schedule,
    pub threads: usize,
    pub seed: u64,
    /// Use only the first N training samples (0 = all).
    pub train_limit: usize,
    /// Use only the first N test samples (0 = all).
    pub test_limit: usize,
    /// Random crop + flip; `None` = the dataset's default (on for CIFAR).
    pub augment: Option<bool>,
    /// Write a metrics line every this many steps.
    pub log_every: usize,
    /// The enclave's memory budget in bytes (tee-only, gpu-only).
    pub memory_budget: usize,
    /// Where device work runs: `cpu`, `cpu:THREADS`, `wgpu`, `cuda`, or `tcp://HOST:PORT`.
    pub device: String,
    /// How `tcp://` devices are reached (keys, or plain TCP); not recorded.
    #[serde(skip)]
    pub device_link: crate::devices::DeviceLinkArgs,
    /// Write every boundary crossing as a JSON line here.
    pub transcript: Option<PathBuf>,
    /// Every scheme's settings (recorded for every scheme, each under its own key: `asymml`).
    #[serde(flatten)]
    pub options: SchemeOptions,
}

impl TrainConfig {
    /// Defaults: LeNet-5 on the embedded data, SGD with momentum 0.9.
    pub fn new(model: &str, dataset: &str) -> Self {
        TrainConfig {
            scheme: Scheme::of(&trustsplit_schemes::plaintext::INFO),
            model: model.into(),
            dataset: dataset.into(),
            data_dir: None,
            epochs: 5,
            batch_size: 32,
            lr: 0.02,
            optimizer: OptimizerKind::Sgd { momentum: 0.9, nesterov: false },
            weight_decay: 5e-4,
            max_grad_norm: None,
            schedule: Schedule::Cosine { epochs: 5 },
            threads: 1,
            seed: 0,
            train_limit: 0,
            test_limit: 0,
            augment: None,
            log_every: 50,
            memory_budget: trustsplit_enclave::memory::DEFAULT_BUDGET_BYTES,
            device: "cpu".into(),
            device_link: Default::default(),
            transcript: None,
            options: Default::default(),
        }
    }

    /// The settings that must match for `--resume` to continue a run (thread count, logging,
    /// the epoch target, the device and whether its results are verified may change).
    fn identity(&self) -> serde_json::Value {
        let mut v = serde_json::to_value(self).expect("config serialises");
        for k in ["threads", "log_every", "epochs", "data_dir", "schedule", "device", "transcript", "memory_budget"] {
            v.as_object_mut().expect("object").remove(k);
        }
        if let Some(asymml) = v.get_mut("asymml").and_then(|a| a.as_object_mut()) {
            asymml.remove("verify_device");
        }
        v
    }
}

/// The outcome of a run (printed by `--json`).
#[derive(Clone, Debug, Serialize)]
pub struct TrainSummary {
    pub scheme: Scheme,
    pub model: String,
    pub dataset: String,
    pub accuracy: f64,
    pub loss: f64,
    pub train_accuracy: f64,
    pub train_loss: f64,
    pub epochs: usize,
    pub resumed_from_epoch: usize,
    pub steps: u64,
    pub seconds: f64,
    pub train_samples: usize,
    pub test_samples: usize,
    pub parameters: usize,
    pub threads: usize,
    pub checkpoint: PathBuf,
    pub metrics: PathBuf,
    /// What left the trusted side, in words.
    pub released: String,
    /// Bytes of the values released to the device, each counted once (the transcript's total).
    pub bytes_released: u64,
    /// Bytes of the results the device returned.
    pub bytes_returned: u64,
    /// Costs and releases of the scheme: enclave and device time, memory peak and spill, transcript totals.
    pub scheme_report: trustsplit_schemes::SchemeReport,
    /// AsymML: the (epsilon, delta) each training sample spent over every charged participation
    /// (earlier runs of a resumed one and replayed epochs included), and what it covers.
    pub privacy: Option<PrivacySummary>,
    /// A three-party scheme (cryptgpu): each party's traffic over the run, by layer and protocol.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parties: Option<Vec<trustsplit_cryptgpu::session::PartyStats>>,
}

/// Accuracy and mean loss over a dataset.
#[derive(Clone, Debug, Default, Serialize)]
pub struct EvalResult {
    pub accuracy: f64,
    pub loss: f64,
    pub samples: usize,
    /// AsymML (set by `trustsplit eval`): what this evaluation released about each example.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub privacy: Option<EvaluationPrivacy>,
    /// AsymML (set by `trustsplit eval`): the device's results checked, `None` when unverified.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub device_checks: Option<trustsplit_schemes::device_check::CheckTally>,
    /// What the scheme adds to the end of an evaluation, in words (printed, not serialised).
    #[serde(skip)]
    pub summary_lines: Vec<String>,
}

/// Loaded data with the batch settings the model needs.
pub struct Data {
    pub kind: DatasetKind,
    pub train: Dataset,
    pub test: Dataset,
    /// Square size images are padded to (VGG and friends want 32x32).
    pub pad_to: Option<usize>,
    pub input_shape: Vec<usize>,
}

/// The learning rate and the gradient bound must be positive numbers (the `enclave` command checks
/// them before it listens, `train` before it starts).
pub fn check_update_settings(lr: f32, max_grad_norm: Option<f32>) -> Result<()> {
    if !(lr.is_finite() && lr > 0.0) {
        bail!("--lr must be a positive number, got {lr}");
    }
    if let Some(max) = max_grad_norm.filter(|m| !(m.is_finite() && *m > 0.0)) {
        bail!("--max-grad-norm must be a positive number, got {max}");
    }
    Ok(())
}

/// Loads a dataset and works out the input shape `model` will see.
pub fn load_data(
    dataset: &str,
    data_dir: Option<&Path>,
    model: &str,
    train_limit: usize,
    test_limit: usize,
) -> Result<Data> {
    let kind: DatasetKind = dataset.parse().map_err(anyhow::Error::msg)?;
    let splits = trustsplit_data::load(kind, data_dir).with_context(|| format!("loading dataset {dataset}"))?;
    prepare_data(kind, splits, model, train_limit, test_limit)
}

/// Applies sample limits and works out padding and the input shape for already loaded splits
/// (e.g. a dataset the enclave received from its owner).
pub fn prepare_data(
    kind: DatasetKind,
    splits: trustsplit_data::Splits,
    model: &str,
    train_limit: usize,
    test_limit: usize,
) -> Result<Data> {
    let dataset = kind.name();
    let limit = |ds: Dataset, n: usize| if n > 0 { ds.subset(n) } else { ds };
    let (train, test) = (limit(splits.train, train_limit), limit(splits.test, test_limit));
    if train.is_empty() || test.is_empty() {
        bail!("dataset {dataset} has an empty split (train {}, test {})", train.len(), test.len());
    }
    let pad_to = zoo::required_input_size(model).filter(|&s| s != train.height || s != train.width);
    if let Some(s) = pad_to {
        if train.height > s || train.width > s {
            bail!(
                "model {model} takes {s}x{s} inputs; dataset {dataset} has larger {}x{} images",
                train.height,
                train.width
            );
        }
    }
    let side = |d: usize| pad_to.unwrap_or(d);
    let input_shape = vec![train.channels, side(train.height), side(train.width)];
    Ok(Data { kind, train, test, pad_to, input_shape })
}

fn batch_options(data: &Data, batch_size: usize, seed: u64, epoch: u64, train: bool, augment: bool) -> BatchOptions {
    let mut o = BatchOptions::new(batch_size, data.kind.normalization());
    o.shuffle = train;
    o.seed = seed;
    o.epoch = epoch;
    o.augment = train && augment;
    o.pad_to = data.pad_to;
    o.drop_last = false;
    o
}

/// Evaluates `model` on `ds` in evaluation mode.
pub fn evaluate(
    runner: &mut Runner,
    model: &mut Model,
    data: &Data,
    ds: &Dataset,
    batch_size: usize,
    show: bool,
) -> Result<EvalResult> {
    let opts = batch_options(data, batch_size, 0, 0, false, false);
    let pb = progress::bar(num_batches(ds.len(), batch_size, false) as u64, "evaluate", show);
    let (mut loss, mut correct) = (0.0f64, 0usize);
    for b in batches(ds, &opts) {
        let x = Secret::new(from_vec(&[b.n, b.channels, b.height, b.width], b.images));
        let out = runner.eval_batch(model, x, &Secret::new(b.labels), &b.indices)?;
        loss += out.loss as f64 * b.n as f64;
        correct += out.correct;
        pb.inc(1);
    }
    pb.finish_and_clear();
    Ok(EvalResult {
        accuracy: correct as f64 / ds.len() as f64,
        loss: loss / ds.len() as f64,
        samples: ds.len(),
        ..EvalResult::default()
    })
}

/// Files a run writes into its output folder.
pub fn checkpoint_path(out: &Path) -> PathBuf {
    out.join("checkpoint.safetensors")
}
pub fn metrics_path(out: &Path) -> PathBuf {
    out.join("metrics.jsonl")
}

/// What a run that releases noised values has charged so far ([`PrivacyCharges`], as JSON).
pub fn privacy_path(out: &Path) -> PathBuf {
    out.join("privacy.json")
}

/// The batch size evaluations run at.
fn eval_batch_size(cfg: &TrainConfig) -> usize {
    256.max(cfg.batch_size)
}

/// The privacy a run charges (AsymML): what each epoch charges each training sample and each test
/// example, counted from the model's shapes before anything is released, and the charges so far,
/// written to `privacy.json` before the releases they charge.
struct Charging {
    path: PathBuf,
    noise_multiplier: f64,
    per_step: u64,
    per_evaluation: u64,
    charges: PrivacyCharges,
}

impl Charging {
    /// `resumed`: the epochs the checkpoint holds, when resuming; the file must then hold at least
    /// as many charged epochs and evaluations (every one of them started, and was charged, before
    /// the checkpoint was written).
    fn start(
        cfg: &TrainConfig,
        model: &Model,
        data: &Data,
        ledger: &PrivacyLedger,
        out: &Path,
        resumed: Option<usize>,
    ) -> Result<Charging> {
        let config = cfg.options.asymml.config(ledger.noise_multiplier);
        let batches = (cfg.batch_size.min(data.train.len()), eval_batch_size(cfg).min(data.test.len()));
        let (per_step, per_evaluation) = asymml::releases_per_epoch(model, &config, batches.0, batches.1);
        let path = privacy_path(out);
        let charges = match resumed {
            None => PrivacyCharges::default(),
            Some(epochs) => {
                let unusable = || {
                    format!(
                        "cannot resume: {} (what the earlier runs charged) is missing or unreadable, so the releases they \
                         made cannot be charged; restore it, or train without --resume to start afresh",
                        path.display()
                    )
                };
                let text = std::fs::read_to_string(&path).with_context(unusable)?;
                let charges: PrivacyCharges = serde_json::from_str(&text).with_context(unusable)?;
                if charges.participations < epochs as u64 || charges.evaluations < epochs as u64 {
                    bail!(
                        "cannot resume: {} charges {} epochs and {} evaluations, fewer than the {epochs} the checkpoint \
                         holds: it is older than the checkpoint, and what was released since cannot be charged; restore \
                         the file the run wrote, or train without --resume to start afresh",
                        path.display(),
                        charges.participations,
                        charges.evaluations
                    );
                }
                charges
            }
        };
        Ok(Charging { path, noise_multiplier: ledger.noise_multiplier, per_step, per_evaluation, charges })
    }

    /// Charges an epoch's training steps, durably, before its first release.
    fn charge_epoch(&mut self) -> Result<()> {
        self.charges.charge_epoch(self.noise_multiplier, self.per_step);
        self.save()
    }

    /// Charges an evaluation of the test split, durably, before its first release.
    fn charge_evaluation(&mut self) -> Result<()> {
        self.charges.charge_evaluation(self.noise_multiplier, self.per_evaluation);
        self.save()
    }

    fn save(&self) -> Result<()> {
        let json = serde_json::to_vec_pretty(&self.charges)?;
        checkpoint::write_atomically(&self.path, &json).with_context(|| format!("writing {}", self.path.display()))
    }

    /// Stops the run where the placement counted more releases than were charged (a bug in the
    /// count from the shapes: tests check the two agree).
    fn check(&self, ledger: &PrivacyLedger) -> Result<()> {
        if ledger.releases_per_step > self.per_step || ledger.releases_per_evaluation > self.per_evaluation {
            bail!(
                "the scheme released more per sample ({} per step, {} per evaluation) than was charged ({}, {}); \
                 stopping",
                ledger.releases_per_step,
                ledger.releases_per_evaluation,
                self.per_step,
                self.per_evaluation
            );
        }
        Ok(())
    }
}

/// Where a run's words go: this machine's terminal for `train`; the data owner, over the
/// encrypted channel, for `enclave`, whose host is untrusted and must not see losses, accuracies or
/// per-layer figures.
pub trait RunLog: Send {
    /// One line about the run.
    fn line(&mut self, text: &str);
    /// Whether progress bars, which show the running loss, may be drawn on this machine.
    fn bars(&self) -> bool;
}

/// The terminal: lines on stderr, progress bars if asked for.
pub struct Terminal {
    pub bars: bool,
}

impl RunLog for Terminal {
    fn line(&mut self, text: &str) {
        eprintln!("{text}");
    }
    fn bars(&self) -> bool {
        self.bars
    }
}

/// Trains as configured, writing checkpoints and metrics under `out`. With `resume`, continues
/// from `out`'s checkpoint (which must come from the same configuration).
pub fn train(cfg: &TrainConfig, out: &Path, resume: bool, show_progress: bool) -> Result<TrainSummary> {
    let data = load_data(&cfg.dataset, cfg.data_dir.as_deref(), &cfg.model, cfg.train_limit, cfg.test_limit)?;
    train_with_data(cfg, data, out, resume, &mut Terminal { bars: show_progress })
}

/// [`train`] on data that is already loaded (`cfg.dataset` and `cfg.data_dir` are then only
/// recorded, not read), telling `log` how it goes.
pub fn train_with_data(
    cfg: &TrainConfig,
    data: Data,
    out: &Path,
    resume: bool,
    log: &mut dyn RunLog,
) -> Result<TrainSummary> {
    let show_progress = log.bars();
    if cfg.batch_size == 0 || cfg.epochs == 0 {
        bail!("--batch-size and --epochs must be at least 1");
    }
    check_update_settings(cfg.lr, cfg.max_grad_norm)?;
    let started = Instant::now();
    let mut model =
        zoo::build(&cfg.model, &data.input_shape, data.train.num_classes, cfg.seed).map_err(anyhow::Error::msg)?;
    let mut opt = Optimizer::new(cfg.optimizer, cfg.weight_decay).with_max_grad_norm(cfg.max_grad_norm);
    let ckpt_path = checkpoint_path(out);
    let mut start_epoch = 0;
    if resume {
        let c = checkpoint::load(&ckpt_path)
            .with_context(|| "cannot resume: no usable checkpoint (train without --resume first)")?;
        if c.meta.config != cfg.identity() {
            bail!(
                "cannot resume {}: it was written by a run with different settings\n  checkpoint: {}\n  this run:   {}",
                ckpt_path.display(),
                c.meta.config,
                cfg.identity()
            );
        }
        c.restore_model(&mut model)?;
        c.restore_optimizer(&mut opt, &model)?;
        start_epoch = c.meta.epoch;
        if start_epoch >= cfg.epochs {
            bail!("{} already holds {} epochs; ask for more with --epochs", ckpt_path.display(), start_epoch);
        }
    }
    std::fs::create_dir_all(out).with_context(|| format!("creating output folder {}", out.display()))?;
    let mut metrics = std::fs::OpenOptions::new()
        .create(true)
        .append(resume)
        .write(true)
        .truncate(!resume)
        .open(metrics_path(out))
        .with_context(|| format!("opening {}", metrics_path(out).display()))?;
    let augment = cfg.augment.unwrap_or(data.kind.augments_by_default());
    let training = TrainingRun { model: &model, batch_size: cfg.batch_size, epochs: cfg.epochs };
    if cfg.options.cryptgpu.uploaded.is_some() && augment {
        bail!("--uploaded trains on the samples as they were uploaded: give --augment off");
    }
    let options = crate::share_upload::resolve(&cfg.options, cfg.scheme, &data)?;
    let mut runner = crate::registry::build_runner(
        cfg.scheme,
        &cfg.device,
        &cfg.device_link,
        cfg.memory_budget,
        cfg.transcript.as_deref(),
        Some(training),
        &options,
        (&model, &opt),
    )?;
    let steps_per_epoch = num_batches(data.train.len(), cfg.batch_size, false);
    // A scheme that keeps a privacy ledger adds noise to what it releases (AsymML), and charges it.
    let mut charging = match &runner.report().placement.privacy {
        Some(ledger) => Some(Charging::start(cfg, &model, &data, ledger, out, resume.then_some(start_epoch))?),
        None => None,
    };
    let releases_noise = charging.is_some();
    let (mut last_train, mut last_test) = ((0.0, 0.0), EvalResult::default());

    crate::with_threads(cfg.threads, || -> Result<()> {
        for epoch in start_epoch..cfg.epochs {
            let epoch_start = Instant::now();
            let opts = batch_options(&data, cfg.batch_size, cfg.seed, epoch as u64, true, augment);
            let pb =
                progress::bar(steps_per_epoch as u64, &format!("epoch {}/{}", epoch + 1, cfg.epochs), show_progress);
            let (mut loss_sum, mut correct, mut seen) = (0.0f64, 0usize, 0usize);
            if let Some(c) = &mut charging {
                c.charge_epoch()?;
            }
            for (step, b) in batches(&data.train, &opts).enumerate() {
                let lr = cfg.schedule.lr(cfg.lr, epoch as f64 + step as f64 / steps_per_epoch as f64);
                let x = Secret::new(from_vec(&[b.n, b.channels, b.height, b.width], b.images));
                let out = runner.train_step(&mut model, x, &Secret::new(b.labels), &b.indices, &mut opt, lr).map_err(
                    |e| match e {
                        RunnerError::Diverged(l) => {
                            let hint = if releases_noise {
                                ", less noise (--noise-multiplier, --clip-norm, --grad-clip-norm)"
                            } else {
                                ""
                            };
                            anyhow::anyhow!(
                                "training diverged: loss is {l} at epoch {} step {}; try a smaller --lr{hint} or \
                                 --max-grad-norm",
                                epoch + 1,
                                step + 1
                            )
                        }
                        other => anyhow::anyhow!("epoch {} step {}: {other}", epoch + 1, step + 1),
                    },
                )?;
                loss_sum += out.loss as f64 * b.n as f64;
                correct += out.correct;
                seen += b.n;
                if cfg.log_every > 0 && (step + 1) % cfg.log_every == 0 {
                    let line = serde_json::json!({"kind": "step", "epoch": epoch + 1, "step": step + 1,
                        "global_step": opt.steps, "lr": lr, "loss": out.loss, "batch_accuracy": out.correct as f64 / b.n as f64});
                    writeln!(metrics, "{line}")?;
                }
                pb.set_message(format!("loss {:.3}", loss_sum / seen as f64));
                pb.inc(1);
            }
            pb.finish_and_clear();
            last_train = (loss_sum / seen as f64, correct as f64 / seen as f64);
            if let Some(c) = &mut charging {
                c.charge_evaluation()?;
            }
            last_test = evaluate(&mut runner, &mut model, &data, &data.test, eval_batch_size(cfg), show_progress)?;
            let secs = epoch_start.elapsed().as_secs_f64();
            // AsymML: the privacy the training samples spent so far, over every charged epoch.
            let mut epsilon = None;
            if let (Some(c), Some(ledger)) = (&charging, runner.report().placement.privacy) {
                c.check(&ledger)?;
                epsilon = c.charges.training_spent(ledger.delta).map(|p| p.epsilon);
            }
            let line = serde_json::json!({"kind": "epoch", "epoch": epoch + 1, "train_loss": last_train.0,
                "train_accuracy": last_train.1, "test_loss": last_test.loss, "test_accuracy": last_test.accuracy,
                "seconds": secs, "epsilon": epsilon});
            writeln!(metrics, "{line}")?;
            metrics.flush()?;
            // A three-party scheme's model is in shares: the owner reconstructs it to checkpoint it.
            runner.sync_model(&mut model, &mut opt)?;
            let meta = checkpoint::meta(&model, epoch + 1, opt.steps, cfg.seed, cfg.identity());
            checkpoint::save(&ckpt_path, &model, &opt, &meta)?;
            log.line(&format!(
                "epoch {:>3}/{}: train loss {:.4} acc {:.2}% | test loss {:.4} acc {:.2}% | {:.1}s",
                epoch + 1,
                cfg.epochs,
                last_train.0,
                100.0 * last_train.1,
                last_test.loss,
                100.0 * last_test.accuracy,
                secs
            ));
        }
        Ok(())
    })??;
    runner.transcript().flush().map_err(anyhow::Error::msg)?;
    let parties = runner.party_stats()?;
    let report = runner.report();
    let privacy = match (&report.placement.privacy, &charging) {
        (Some(ledger), Some(c)) => Some(asymml::privacy_summary(ledger, &c.charges)),
        _ => None,
    };

    Ok(TrainSummary {
        scheme: cfg.scheme,
        model: cfg.model.clone(),
        dataset: cfg.dataset.clone(),
        accuracy: last_test.accuracy,
        loss: last_test.loss,
        train_accuracy: last_train.1,
        train_loss: last_train.0,
        epochs: cfg.epochs,
        resumed_from_epoch: start_epoch,
        steps: opt.steps,
        seconds: started.elapsed().as_secs_f64(),
        train_samples: data.train.len(),
        test_samples: data.test.len(),
        parameters: model.num_params(),
        threads: cfg.threads,
        checkpoint: ckpt_path,
        metrics: metrics_path(out),
        released: cfg.scheme.info().releases.to_string(),
        bytes_released: report.transcript.bytes_released,
        bytes_returned: report.transcript.bytes_returned,
        scheme_report: report,
        privacy,
        parties,
    })
}

/// Says on stderr what is about to be trained on what (`data`, e.g. "embedded" or "the uploaded
/// fashion-mnist"), how, and where its checkpoints go.
pub fn announce(cfg: &TrainConfig, data: &str, out: &Path) {
    eprintln!(
        "training {} on {data} with scheme {}, {} epochs, batch {}, {} thread(s) -> {}",
        cfg.model,
        cfg.scheme,
        cfg.epochs,
        cfg.batch_size,
        cfg.threads,
        out.display()
    );
}

/// Ends a command that trained: the human-readable summary on stderr and, with `json`, one JSON
/// object on stdout.
pub fn report(s: &TrainSummary, json: bool) -> Result<()> {
    for line in summary_lines(s) {
        eprintln!("{line}");
    }
    if json {
        println!("{}", serde_json::to_string(s)?);
    }
    Ok(())
}

/// Each party's traffic, in all and per step.
pub fn party_lines(parties: &[trustsplit_cryptgpu::session::PartyStats], steps: u64) -> Vec<String> {
    parties
        .iter()
        .map(|p| {
            format!(
                "party {}: sent {:.1} MB in {} messages over {} rounds, evaluations included ({:.2} MB and {} rounds per \
                 training step on average)",
                p.party,
                p.total.bytes_sent as f64 / 1e6,
                p.total.messages,
                p.total.rounds,
                p.total.bytes_sent as f64 / 1e6 / steps.max(1) as f64,
                p.total.rounds / steps.max(1)
            )
        })
        .collect()
}

/// The human-readable end of a run.
pub fn summary_lines(s: &TrainSummary) -> Vec<String> {
    let mut lines = vec![format!(
        "done: test accuracy {:.2}% (loss {:.4}) on {} test images after {} epochs, {} steps, {:.1}s; {} parameters; checkpoint {}",
        100.0 * s.accuracy,
        s.loss,
        s.test_samples,
        s.epochs,
        s.steps,
        s.seconds,
        s.parameters,
        s.checkpoint.display()
    )];
    let r = &s.scheme_report;
    if let Some(parties) = &s.parties {
        lines.push(format!("released: {}", s.released));
        lines.extend(party_lines(parties, s.steps));
    } else {
        lines.push(format!(
            "released to the device: {} ({} bytes released and {} bytes returned, in {} transcript records; {} bytes \
             sent to the device in all, resends included)",
            s.released,
            r.transcript.bytes_released,
            r.transcript.bytes_returned,
            r.transcript.records,
            r.device_bytes_sent
        ));
    }
    lines.extend((s.scheme.entry().describe_run)(r, s.privacy.as_ref()));
    if let Some(m) = &r.memory {
        lines.push(format!(
            "enclave: {:.1}s computing, device {:.1}s; peak memory {:.1} MiB of a {:.0} MiB budget; sealed spill {:.1} MiB out, {:.1} MiB back",
            r.enclave_seconds,
            r.device_seconds,
            m.peak_bytes as f64 / (1 << 20) as f64,
            m.budget_bytes as f64 / (1 << 20) as f64,
            m.spill_bytes as f64 / (1 << 20) as f64,
            m.restore_bytes as f64 / (1 << 20) as f64
        ));
    }
    lines
}
