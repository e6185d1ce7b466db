//! `trustsplit privacy-report`: trains as `train` would while the in-process device records what
//! it sees (`--record`), then attacks that recording and says what each attack recovered.
//!
//! The attacks see only the recording and what an attacker is granted besides (public images of
//! the same distribution: the dataset's test split, and the scheme's code). The originals and the
//! labels are used only to score them. The attacked release is the first request of the first
//! training step: the earliest layer whose input the scheme sends to the device (the raw image
//! under gpu-only; under asymml the input's residual where the input has more channels than the
//! rank keeps, otherwise the residual of the first activation that has).
//!
//! Attacks (each scored by PSNR and SSIM against the original images, and by the trained model's
//! accuracy on the reconstructions, as AsymML's paper scores its model inversion):
//! - `released-operand`: the operand itself, read as an image, where it has the input's shape.
//! - `learned-inverse`: [`trustsplit_attacks::inverse`], trained on pairs the attacker makes by
//!   running the scheme on public images with the model as it stood at the attacked step.
//! - `public-mean`: the mean public image for every sample: what knowing nothing gives, the floor
//!   the others are read against.
//! - `label-recovery`: the labels from the logits' gradient, where the device received it.
//! - `weight-difference`: each released layer's first-step weight gradient, from its weights at
//!   the first two steps and the run's optimizer settings, split into what the device computed
//!   itself and what the enclave did (which the weights give away).

use crate::train::{self, Data, TrainConfig, TrainSummary};
use anyhow::{bail, ensure, Context, Result};
use serde::Serialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use trustsplit_attacks::grid::write_png;
use trustsplit_attacks::inverse::{InverseNetwork, InverseSettings, Pairs};
use trustsplit_attacks::metrics::{psnr, ssim};
use trustsplit_attacks::RecordedView;
use trustsplit_boundary::Secret;
use trustsplit_data::{batches, BatchOptions, Normalization};
use trustsplit_nn::layers::Mode;
use trustsplit_nn::optim::Optimizer;
use trustsplit_nn::tensor::{data as values, from_vec};
use trustsplit_nn::{checkpoint, zoo, Model};
use trustsplit_schemes::TrainingRun;

/// What the attacks may use and how long they train.
#[derive(Clone, Copy, Debug)]
pub struct ReportSettings {
    /// Public images the attacker learns from (the test split's first ones).
    pub public_samples: usize,
    /// Training steps of the learned inverse.
    pub attack_steps: usize,
    /// Images drawn in each grid.
    pub shown: usize,
}

/// One attack's figures; `None` where a figure does not apply.
#[derive(Clone, Debug, Serialize)]
pub struct AttackResult {
    pub name: String,
    /// What it attacked, in words.
    pub target: String,
    pub psnr: Option<f64>,
    pub ssim: Option<f64>,
    pub label_accuracy: Option<f64>,
    /// The PNG of originals (top) and reconstructions (bottom).
    pub grid: Option<PathBuf>,
}

/// An attack that found nothing to work on in this view.
#[derive(Clone, Debug, Serialize)]
pub struct NotApplicable {
    pub name: String,
    pub why: String,
}

/// What a layer's released weights at the first two steps tell the device about the first
/// step's gradient (the weight-difference attack).
#[derive(Clone, Debug, Serialize)]
pub struct WeightDifference {
    /// The layer's forward convolution, as the device saw it.
    pub layer: String,
    /// L2 norm of the weight gradient recovered from the two weights and the run's (public)
    /// optimizer settings.
    pub recovered_norm: f64,
    /// L2 norm of the part the device computed itself (its weight-gradient results for the layer
    /// in that step).
    pub device_part_norm: f64,
    /// Norm of the rest, which the enclave computed and the weights give away, over the
    /// recovered norm: 0 where the device computed everything (gpu-only). `None` with
    /// `--max-grad-norm`: the update is then scaled by a factor the device does not see, so the
    /// recovered (clipped) gradient does not split into the two parts.
    pub hidden_fraction: Option<f64>,
    /// Under `--dp full`: the norm the update's Gaussian noise has on this layer's weights
    /// (noise multiplier x --dp-clip / batch x the square root of their number), which the
    /// recovered gradient carries. `None` otherwise.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub update_noise_norm: Option<f64>,
}

/// The report (`--json` prints it).
#[derive(Clone, Debug, Serialize)]
pub struct PrivacyReport {
    pub scheme: String,
    pub model: String,
    pub dataset: String,
    pub accuracy: f64,
    /// The run's epsilon; `None` where the scheme gives none.
    pub epsilon: Option<f64>,
    pub delta: Option<f64>,
    /// What the epsilon (or the absence of one) covers.
    pub covers: String,
    pub bytes_released: u64,
    /// Bytes released to the device by kind (`input`, `weight`, `noised-residual`, ...).
    pub released_by_kind: BTreeMap<String, u64>,
    pub attacks: Vec<AttackResult>,
    /// Attacks that did not apply to this view, with the reason.
    pub not_applicable: Vec<NotApplicable>,
    /// The weight-difference attack, per released layer (SGD only).
    pub weight_difference: Vec<WeightDifference>,
    /// Why no attack ran, where none did.
    #[serde(skip_serializing_if = "Option::is_none")]
    pub no_attack: Option<String>,
    /// The device's recording the attacks read.
    pub recording: PathBuf,
    pub training: TrainSummary,
}

/// Trains with the device recording into `out/view` and the transcript in
/// `out/transcript.jsonl`, then attacks the recording. An earlier report's recordings in `out`
/// are replaced.
pub fn run(mut cfg: TrainConfig, out: &Path, settings: ReportSettings) -> Result<PrivacyReport> {
    ensure!(
        settings.attack_steps >= 1 && settings.public_samples >= 1,
        "--attack-steps and --public-samples must be at least 1"
    );
    ensure!(
        !cfg.device.split(',').any(|d| d.trim().starts_with("tcp://")),
        "privacy-report records an in-process device; --device tcp://... records with `trustsplit device --record`"
    );
    let view_dir = out.join("view");
    let prior_dir = out.join("prior-view");
    for dir in [&view_dir, &prior_dir] {
        remove_recording(dir)?;
    }
    cfg.device_link.record = Some(view_dir.clone());
    cfg.options.goten.goten_record = Some(view_dir.clone());
    cfg.transcript = Some(out.join("transcript.jsonl"));
    std::fs::create_dir_all(out).with_context(|| format!("creating {}", out.display()))?;

    let data = train::load_data(&cfg.dataset, cfg.data_dir.as_deref(), &cfg.model, cfg.train_limit, cfg.test_limit)?;
    let training = train::train(&cfg, out, false, true)?;
    let (epsilon, delta, covers) = match &training.privacy {
        Some(p) if p.epsilon.is_none() => (None, None, "nothing: no noise is added (--noise-multiplier 0)".into()),
        Some(p) => (p.epsilon, Some(p.delta), p.covers.clone()),
        None if training.bytes_released == 0 => (None, None, "nothing was released to a device".into()),
        None => (None, None, format!("no differential privacy; released: {}", training.released)),
    };
    let mut released_by_kind = BTreeMap::new();
    for (key, (_, bytes)) in &training.scheme_report.transcript.by_layer_kind {
        let mut parts = key.rsplitn(3, '/');
        if let (Some("out"), Some(kind)) = (parts.next(), parts.next()) {
            *released_by_kind.entry(kind.to_string()).or_insert(0) += bytes;
        }
    }

    let mut report = PrivacyReport {
        scheme: cfg.scheme.name().into(),
        model: cfg.model.clone(),
        dataset: cfg.dataset.clone(),
        accuracy: training.accuracy,
        epsilon,
        delta,
        covers,
        bytes_released: training.bytes_released,
        released_by_kind,
        attacks: Vec::new(),
        not_applicable: Vec::new(),
        weight_difference: Vec::new(),
        no_attack: None,
        recording: view_dir.clone(),
        training,
    };
    let mut attacked = false;
    for (suffix, sub) in recordings(&view_dir) {
        let view = RecordedView::open(&view_dir.join(&sub)).map_err(anyhow::Error::msg)?;
        let Some(target) = view.requests.first() else { continue };
        if target.op != "conv_forward" {
            report.not_applicable.push(NotApplicable {
                name: format!("learned-inverse{suffix}"),
                why: format!("the first release is a {} operand; the attacks take convolution inputs", target.op),
            });
            continue;
        }
        let floor = !attacked;
        let found = crate::with_threads(cfg.threads, || {
            attack_first_release(&cfg, &data, out, &view, Target { suffix: &suffix, sub: &sub, floor }, settings)
        })??;
        report.attacks.extend(found);
        if sub.as_os_str().is_empty() {
            let noise = report.training.privacy.as_ref().map(|p| p.noise_multiplier);
            match weight_difference(&cfg, &view, noise, cfg.batch_size.min(data.train.len()))? {
                Ok(found) => report.weight_difference = found,
                Err(why) => report.not_applicable.push(NotApplicable { name: "weight-difference".into(), why }),
            }
        }
        match recover_labels(&cfg, &data, &view)? {
            Ok(found) => report.attacks.push(AttackResult { name: format!("{}{suffix}", found.name), ..found }),
            Err(why) => report.not_applicable.push(NotApplicable { name: format!("label-recovery{suffix}"), why }),
        }
        attacked = true;
    }
    if !attacked && report.not_applicable.is_empty() {
        report.no_attack = Some(if matches!(cfg.scheme.entry().build, crate::registry::Build::Parties(_)) {
            format!("the parties of {} are not recorded yet", cfg.scheme)
        } else if report.bytes_released == 0 {
            "nothing was released".into()
        } else {
            "the untrusted side received nothing".into()
        });
    }
    save(report, out)
}

/// The recordings under `dir` to attack, each with the suffix of its attacks' names and its
/// folder relative to `dir`: the device's (`dir` itself) or each Goten server's (`dir/serverR`).
fn recordings(dir: &Path) -> Vec<(String, PathBuf)> {
    let mut found = Vec::new();
    if dir.join("index.jsonl").is_file() {
        found.push((String::new(), PathBuf::new()));
    }
    for role in 0..3 {
        let sub = PathBuf::from(format!("server{role}"));
        if dir.join(&sub).join("index.jsonl").is_file() {
            found.push((format!(" (server {role})"), sub));
        }
    }
    found
}

/// Writes `out/report.json` (atomically) and hands the report back.
fn save(report: PrivacyReport, out: &Path) -> Result<PrivacyReport> {
    let path = out.join("report.json");
    let json = serde_json::to_string_pretty(&report)?;
    checkpoint::write_atomically(&path, json.as_bytes()).with_context(|| format!("writing {}", path.display()))?;
    Ok(report)
}

/// Removes an earlier report's recording folder (one holding `index.jsonl`); refuses a folder
/// that holds something else.
fn remove_recording(dir: &Path) -> Result<()> {
    if !dir.exists() {
        return Ok(());
    }
    ensure!(
        dir.join("index.jsonl").is_file() || !recordings(dir).is_empty(),
        "{} exists and is not a recording; move it away or choose another --out",
        dir.display()
    );
    std::fs::remove_dir_all(dir).with_context(|| format!("removing the earlier recording {}", dir.display()))
}

/// Batches of the training split as the run's first epoch drew them, or of the test split in order.
fn batch_options(cfg: &TrainConfig, data: &Data, train: bool) -> BatchOptions {
    let mut o = BatchOptions::new(cfg.batch_size, data.kind.normalization());
    o.shuffle = train;
    o.seed = cfg.seed;
    o.epoch = 0;
    o.augment = train && cfg.augment.unwrap_or(data.kind.augments_by_default());
    o.pad_to = data.pad_to;
    o.drop_last = !train;
    o
}

/// Samples of a batch of `n` laid out `n x per`.
fn samples(flat: &[f32], n: usize) -> Vec<Vec<f32>> {
    let per = flat.len() / n.max(1);
    flat.chunks(per.max(1)).map(<[f32]>::to_vec).collect()
}

/// Which recording an attack reads.
#[derive(Clone, Copy)]
struct Target<'a> {
    /// Appended to the attacks' names: ` (server 1)`, or nothing for the device.
    suffix: &'a str,
    /// The recording's folder under `view/` (and the attacker's own under `prior-view/`).
    sub: &'a Path,
    /// Also score the public-mean floor (once per report).
    floor: bool,
}

fn attack_first_release(
    cfg: &TrainConfig,
    data: &Data,
    out: &Path,
    view: &RecordedView,
    which: Target,
    settings: ReportSettings,
) -> Result<Vec<AttackResult>> {
    let target = &view.requests[0];
    let operand = &target.tensors[0].name;
    let first =
        batches(&data.train, &batch_options(cfg, data, true)).next().context("the training split yields no batch")?;
    // Under --dp full each sample of a step runs its own pass: the step's first release is then
    // the first request of each of its first `first.n` passes.
    let passes = if per_sample_passes(cfg) { first.n } else { 1 };
    let (mut targets, mut release_shape) = (Vec::new(), [0; 3]);
    for request in pass_starts(&view.requests).take(passes) {
        let released = view.load(request, operand).map_err(anyhow::Error::msg)?;
        let n = match released.shape.as_slice() {
            &[n, c, h, w] => {
                release_shape = [c, h, w];
                n
            }
            other => bail!("the first release has shape {other:?}, expected N x C x H x W"),
        };
        targets.extend(samples(&released.values, n));
    }
    let n = targets.len();
    let image_shape = [data.input_shape[0], data.input_shape[1], data.input_shape[2]];
    ensure!(first.n == n, "the first release holds {n} samples but the first batch {}", first.n);
    let originals = samples(&first.images, n);
    let norm = data.kind.normalization();

    eprintln!("privacy-report: making the attacker's pairs from {} public images", settings.public_samples);
    let pairs = public_pairs(cfg, data, out, which.sub, target, release_shape, image_shape, settings.public_samples)?;
    let final_model = trained_model(cfg, data, out)?;
    let score = |name: &str, what: &str, reconstructions: &[Vec<f32>]| -> Result<AttackResult> {
        let name = if name == "public-mean" { name.to_string() } else { format!("{name}{}", which.suffix) };
        let pixels = |v: &[f32]| to_pixels(v, &norm, image_shape);
        let (orig, recon): (Vec<Vec<f32>>, Vec<Vec<f32>>) =
            originals.iter().zip(reconstructions).map(|(o, r)| (pixels(o), pixels(r))).unzip();
        let psnr_mean = orig.iter().zip(&recon).map(|(o, r)| psnr(o, r)).sum::<f64>() / n as f64;
        let [c, h, w] = image_shape;
        let ssim_mean = orig
            .iter()
            .zip(&recon)
            .map(|(o, r)| ssim(o, r, c, h, w))
            .collect::<Result<Vec<f64>, String>>()
            .map_err(anyhow::Error::msg)?
            .iter()
            .sum::<f64>()
            / n as f64;
        let label_accuracy = label_accuracy(&final_model, &recon, &norm, image_shape, &first.labels)?;
        let shown = settings.shown.min(n);
        let file: String = name.chars().map(|c| if c.is_ascii_alphanumeric() { c } else { '-' }).collect();
        let grid = out.join(format!("{}.png", file.trim_end_matches('-')));
        write_png(&grid, &[orig[..shown].to_vec(), recon[..shown].to_vec()], c, h, w).map_err(anyhow::Error::msg)?;
        Ok(AttackResult {
            name,
            target: what.into(),
            psnr: Some(psnr_mean),
            ssim: Some(ssim_mean),
            label_accuracy: Some(label_accuracy),
            grid: Some(grid),
        })
    };
    let what =
        format!("{operand} of {} in the first training step ({} per sample)", target.detail, fmt_shape(&release_shape));
    let mut results = Vec::new();
    if release_shape == image_shape {
        results.push(score("released-operand", &what, &targets)?);
    }
    eprintln!("privacy-report: training the inverse network ({} steps)", settings.attack_steps);
    let inverse_settings =
        InverseSettings { steps: settings.attack_steps, seed: cfg.seed, ..InverseSettings::default() };
    let mut net = InverseNetwork::train(&pairs, inverse_settings).map_err(anyhow::Error::msg)?;
    results.push(score("learned-inverse", &what, &net.reconstruct(&targets).map_err(anyhow::Error::msg)?)?);
    let per = pairs.images[0].len();
    let mean: Vec<f32> =
        (0..per).map(|k| pairs.images.iter().map(|x| x[k]).sum::<f32>() / pairs.images.len() as f32).collect();
    if let Some(found) = optimisation_inverse(cfg, data, release_shape, &targets, &mean, settings)? {
        results.push(score("optimisation-inverse", &what, &found)?);
    }
    if which.floor {
        results.push(score("public-mean", "nothing: the mean public image", &vec![mean; n])?);
    }
    Ok(results)
}

/// The optimisation-based inversion of the first release ([`trustsplit_attacks::optimise`])
/// through the layers in front of it, with the weights of the attacked step (the first: the
/// initial ones, which the public code and seed give), starting from the mean public image.
/// AsymML's release, the residual after each sample's own top-r channel subspace (its rank
/// schedule at that convolution), is modelled as the projection onto the recorded residual's own
/// top `C - r` channel components. `None` where no layer stands in front of the release (it is the
/// input itself, or a share of it).
fn optimisation_inverse(
    cfg: &TrainConfig,
    data: &Data,
    release_shape: [usize; 3],
    targets: &[Vec<f32>],
    start: &[f32],
    settings: ReportSettings,
) -> Result<Option<Vec<Vec<f32>>>> {
    use trustsplit_attacks::optimise::{invert, prefix_to, ReleaseModel, SearchSettings};
    use trustsplit_schemes::asymml::lowrank::{find_basis_and_coordinates, Subspace};
    use trustsplit_schemes::asymml::RankPolicy;
    let image_shape = [data.input_shape[0], data.input_shape[1], data.input_shape[2]];
    let mut model =
        zoo::build(&cfg.model, &data.input_shape, data.train.num_classes, cfg.seed).map_err(anyhow::Error::msg)?;
    let Some(cut) = prefix_to(&mut model.layers, image_shape, release_shape).filter(|&c| c > 0) else {
        return Ok(None);
    };
    let conv_index = model.layers[..cut].iter().filter(|l| matches!(l, trustsplit_nn::Layer::Conv2d(_))).count();
    let [channels, h, w] = release_shape;
    let removed = match cfg.options.asymml.config(0.0).rank.policy(conv_index) {
        RankPolicy::Fixed(r) => r.min(channels),
        // The threshold's rank varies per sample: assume the most it may take.
        RankPolicy::Energy { max_rank, .. } => max_rank.min(channels),
    };
    let onto = move |release: &[f32]| -> Result<Vec<f32>, String> {
        let mut rng = <rand::rngs::StdRng as rand::SeedableRng>::seed_from_u64(0);
        let kept = RankPolicy::Fixed(channels - removed);
        find_basis_and_coordinates(&[release], channels, h * w, kept, Subspace::Exact, &mut rng).map(|(b, _)| b.u)
    };
    let release_model = if cfg.scheme.name() == "asymml" && removed < channels {
        ReleaseModel::Projection { onto: &onto }
    } else {
        ReleaseModel::Exact
    };
    let norm = data.kind.normalization();
    let low: Vec<f32> = (0..image_shape[0]).map(|c| -norm.mean[c] / norm.std[c]).collect();
    let high: Vec<f32> = (0..image_shape[0]).map(|c| (1.0 - norm.mean[c]) / norm.std[c]).collect();
    // AsymML clips what it releases when it adds noise: only the direction is then known.
    let clipped = cfg.scheme.name() == "asymml" && cfg.options.asymml.noise_multiplier > 0.0;
    let search =
        SearchSettings { steps: settings.attack_steps.max(1), match_norm: !clipped, ..SearchSettings::default() };
    eprintln!("privacy-report: searching for the images through the first {cut} layers ({} steps)", search.steps);
    let (found, _) = invert(
        &mut model.layers[..cut],
        image_shape,
        release_shape,
        targets,
        &release_model,
        start,
        (&low, &high),
        search,
    )
    .map_err(anyhow::Error::msg)?;
    Ok(Some(found))
}

/// Whether each sample of a training step runs its own forward and backward pass (DP-SGD).
fn per_sample_passes(cfg: &TrainConfig) -> bool {
    cfg.scheme.name() == "asymml" && cfg.options.asymml.dp == trustsplit_schemes::asymml::DpScope::Full
}

/// Where the first pass of `requests` ends: at the next request like its first (which starts the
/// next pass), or at the end.
fn first_pass_end(requests: &[trustsplit_attacks::RecordedRequest]) -> usize {
    let Some(first) = requests.first() else { return 0 };
    requests.iter().skip(1).position(|r| r.detail == first.detail).map_or(requests.len(), |i| i + 1)
}

/// The requests that start a pass: those like the recording's (or step's) first.
fn pass_starts(
    requests: &[trustsplit_attacks::RecordedRequest],
) -> impl Iterator<Item = &trustsplit_attacks::RecordedRequest> {
    let first = requests.first().map(|r| r.detail.clone());
    requests.iter().filter(move |r| Some(&r.detail) == first.as_ref())
}

fn fmt_shape(s: &[usize]) -> String {
    s.iter().map(usize::to_string).collect::<Vec<_>>().join(" x ")
}

/// Normalised values of one sample back to pixels in [0, 1].
fn to_pixels(v: &[f32], norm: &Normalization, [c, h, w]: [usize; 3]) -> Vec<f32> {
    let plane = h * w;
    (0..c * plane).map(|i| (v[i] * norm.std[i / plane] + norm.mean[i / plane]).clamp(0.0, 1.0)).collect()
}

/// The trained model's accuracy on reconstructions (pixels in [0, 1]) against the true labels.
fn label_accuracy(
    model: &Model,
    pixels: &[Vec<f32>],
    norm: &Normalization,
    shape: [usize; 3],
    labels: &[usize],
) -> Result<f64> {
    let [c, h, w] = shape;
    let plane = h * w;
    let flat: Vec<f32> = pixels
        .iter()
        .flat_map(|p| p.iter().enumerate().map(|(i, v)| (v - norm.mean[i / plane]) / norm.std[i / plane]))
        .collect();
    let mut model = model.clone();
    let (logits, _) =
        model.forward(&from_vec(&[pixels.len(), c, h, w], flat), Mode::Eval).map_err(anyhow::Error::msg)?;
    let classes = model.num_classes;
    let correct = values(&logits)
        .chunks(classes)
        .zip(labels)
        .filter(|(row, &label)| {
            let best = row.iter().enumerate().fold(0, |b, (i, &v)| if v > row[b] { i } else { b });
            best == label
        })
        .count();
    Ok(correct as f64 / labels.len().max(1) as f64)
}

/// The model the run ended with.
fn trained_model(cfg: &TrainConfig, data: &Data, out: &Path) -> Result<Model> {
    let mut model =
        zoo::build(&cfg.model, &data.input_shape, data.train.num_classes, cfg.seed).map_err(anyhow::Error::msg)?;
    let path = train::checkpoint_path(out);
    checkpoint::load(&path)?.restore_model(&mut model).with_context(|| format!("loading {}", path.display()))?;
    Ok(model)
}

/// The attacker's pairs: the scheme run on public images (full batches of the test split) with
/// the model as it stood at the attacked step (its initial weights), its device recording into
/// `out/prior-view`; each step's first request holds what the device would see of that batch
/// (the step's other files are removed as it goes).
#[allow(clippy::too_many_arguments)]
fn public_pairs(
    cfg: &TrainConfig,
    data: &Data,
    out: &Path,
    sub: &Path,
    target: &trustsplit_attacks::RecordedRequest,
    release_shape: [usize; 3],
    image_shape: [usize; 3],
    public_samples: usize,
) -> Result<Pairs> {
    let mut model =
        zoo::build(&cfg.model, &data.input_shape, data.train.num_classes, cfg.seed).map_err(anyhow::Error::msg)?;
    let mut opt = Optimizer::new(cfg.optimizer, 0.0);
    let prior_root = out.join("prior-view");
    remove_recording(&prior_root)?;
    let prior_dir = prior_root.join(sub);
    let mut link = cfg.device_link.clone();
    link.record = Some(prior_root.clone());
    // Each public step's files are removed once read: no limit needed.
    link.record_limit_mib = u64::MAX >> 20;
    let training = TrainingRun { model: &model, batch_size: cfg.batch_size, epochs: cfg.epochs };
    let mut options = crate::share_upload::resolve(&cfg.options, cfg.scheme, data)?;
    options.goten.goten_record = Some(prior_root.clone());
    let model_copy = model.clone();
    let mut runner = crate::registry::build_runner(
        cfg.scheme,
        &cfg.device,
        &link,
        cfg.memory_budget,
        None,
        Some(training),
        &options,
        (&model_copy, &opt),
    )?;
    let public = data.test.subset(public_samples.min(data.test.len()));
    let (mut images, mut releases) = (Vec::new(), Vec::new());
    let mut indexed = 0;
    crate::with_threads(cfg.threads, || -> Result<()> {
        for b in batches(&public, &batch_options(cfg, data, false)) {
            let x = Secret::new(from_vec(&[b.n, b.channels, b.height, b.width], b.images.clone()));
            // A step at learning rate 0: the releases of a training step, the model unchanged.
            runner.train_step(&mut model, x, &Secret::new(b.labels), &b.indices, &mut opt, 0.0)?;
            images.extend(samples(&b.images, b.n));
            // This step's requests: keep its first release, drop the rest from the disk.
            let prior = RecordedView::open(&prior_dir).map_err(anyhow::Error::msg)?;
            let step = &prior.requests[indexed..];
            ensure!(!step.is_empty(), "a public step released nothing");
            let passes = if per_sample_passes(cfg) { b.n } else { 1 };
            for request in pass_starts(step).take(passes) {
                ensure!(
                    request.op == target.op && request.tensors[0].shape[1..] == target.tensors[0].shape[1..],
                    "a public step's first release ({}) differs from the attacked one ({})",
                    request.detail,
                    target.detail
                );
                let loaded = prior.load(request, &request.tensors[0].name).map_err(anyhow::Error::msg)?;
                releases.extend(samples(&loaded.values, loaded.shape[0]));
            }
            // Every recording's tensors of the step (other Goten servers' too) go.
            for (_, other) in recordings(&prior_root) {
                for entry in std::fs::read_dir(prior_root.join(&other))? {
                    let path = entry?.path();
                    if path.extension().is_some_and(|e| e == "safetensors") {
                        std::fs::remove_file(&path).with_context(|| format!("removing {}", path.display()))?;
                    }
                }
            }
            indexed = prior.requests.len();
        }
        Ok(())
    })??;
    ensure!(
        !images.is_empty(),
        "no full batch of {} public images; give --public-samples of at least --batch-size",
        cfg.batch_size
    );
    Ok(Pairs { release_shape, image_shape, releases, images })
}

/// Labels from the logits' gradient, where the device received it (a linear classifier on the
/// device): each row is softmax minus the one-hot label, over the batch size, so its one negative
/// entry is the label. Looks at the first training step's requests.
fn recover_labels(
    cfg: &TrainConfig,
    data: &Data,
    view: &RecordedView,
) -> Result<std::result::Result<AttackResult, String>> {
    let first =
        batches(&data.train, &batch_options(cfg, data, true)).next().context("the training split yields no batch")?;
    let (n, classes) = (first.n, data.train.num_classes);
    for request in view.requests[..first_pass_end(&view.requests)].iter().filter(|r| r.op == "gemm") {
        for t in request.tensors.iter().filter(|t| t.direction == "received" && t.shape == [n, classes]) {
            let Ok(loaded) = view.load(request, &t.name) else { continue };
            let rows: Vec<&[f32]> = loaded.values.chunks(classes).collect();
            let one_negative = rows.iter().all(|row| row.iter().filter(|&&v| v < 0.0).count() == 1);
            if !one_negative {
                continue;
            }
            let guessed =
                rows.iter().map(|row| row.iter().enumerate().fold(0, |b, (i, &v)| if v < row[b] { i } else { b }));
            let correct = guessed.zip(&first.labels).filter(|(g, l)| g == *l).count();
            return Ok(Ok(AttackResult {
                name: "label-recovery".into(),
                target: format!(
                    "operand {} of {} (the logits' gradient) in the first training step",
                    t.name, request.detail
                ),
                psnr: None,
                ssim: None,
                label_accuracy: Some(correct as f64 / n as f64),
                grid: None,
            }));
        }
    }
    Ok(Err("no logits' gradient reached the untrusted side in the first training step".into()))
}

/// The weight-difference attack: each convolution whose weight the device received in the first
/// two training steps. With SGD the update is `lr (g + wd W)` on the first step (the momentum
/// buffer starts at zero; Nesterov's step is `1 + momentum` times it), so `g` follows from the two
/// weights and the run's settings, which are not secret. What the device computed of `g` itself is
/// in its weight-gradient results of the step; the rest came from the enclave.
fn weight_difference(
    cfg: &TrainConfig,
    view: &RecordedView,
    noise_multiplier: Option<f64>,
    first_batch: usize,
) -> Result<std::result::Result<Vec<WeightDifference>, String>> {
    let trustsplit_nn::optim::OptimizerKind::Sgd { momentum, nesterov } = cfg.optimizer else {
        return Ok(Err("the attack inverts an SGD update; this run uses Adam".into()));
    };
    // A step's passes: one, or one per sample of the batch under --dp full.
    let passes = if per_sample_passes(cfg) { first_batch } else { 1 };
    let steps: Vec<usize> = view
        .requests
        .iter()
        .enumerate()
        .filter(|(_, r)| r.detail == view.requests[0].detail)
        .map(|(i, _)| i)
        .step_by(passes)
        .collect();
    if steps.len() < 2 || view.requests.len() <= steps[1] {
        return Ok(Err("the recording holds fewer than two training steps".into()));
    }
    let (first, second) =
        (&view.requests[..steps[1]], &view.requests[steps[1]..steps.get(2).copied().unwrap_or(view.requests.len())]);
    let lr = cfg.schedule.lr(cfg.lr, 0.0) as f64 * if nesterov { 1.0 + momentum as f64 } else { 1.0 };
    let wd = cfg.weight_decay as f64;
    // The step's first pass names each layer once.
    let mut found = Vec::new();
    for (i, forward) in first[..first_pass_end(first)].iter().enumerate().filter(|(_, r)| r.op == "conv_forward") {
        // The same layer in the second step: the same request, counted among its equals.
        let nth = first[..i].iter().filter(|r| r.detail == forward.detail).count();
        let Some(later) = second.iter().filter(|r| r.detail == forward.detail).nth(nth) else { continue };
        let (Ok(w1), Ok(w2)) = (view.load(forward, "w"), view.load(later, "w")) else { continue };
        let geometry = forward.detail.trim_start_matches("conv_forward");
        let mut own = vec![0.0f64; w1.values.len()];
        for r in first.iter().filter(|r| {
            r.op == "conv_backward_weight" && r.detail.trim_start_matches("conv_backward_weight") == geometry
        }) {
            let dw = view.load(r, "dw").map_err(anyhow::Error::msg)?;
            own.iter_mut().zip(&dw.values).for_each(|(o, &v)| *o += v as f64);
        }
        // Under --dp full the update is a mean over the step's passes: so is the device's part.
        own.iter_mut().for_each(|o| *o /= passes as f64);
        let g: Vec<f64> =
            w1.values.iter().zip(&w2.values).map(|(&a, &b)| (a as f64 - b as f64) / lr - wd * a as f64).collect();
        let norm = |v: &mut dyn Iterator<Item = f64>| v.map(|x| x * x).sum::<f64>().sqrt();
        let recovered_norm = norm(&mut g.iter().copied());
        let device_part_norm = norm(&mut own.iter().copied());
        let hidden = norm(&mut g.iter().zip(&own).map(|(a, b)| a - b));
        found.push(WeightDifference {
            layer: forward.detail.clone(),
            recovered_norm,
            device_part_norm,
            // The update is the raw gradient only without clipping and noise.
            hidden_fraction: (cfg.max_grad_norm.is_none() && passes == 1 && recovered_norm > 0.0)
                .then(|| hidden / recovered_norm),
            update_noise_norm: (passes > 1).then(|| {
                let z = noise_multiplier.unwrap_or(0.0);
                z * cfg.options.asymml.dp_clip / passes as f64 * (w1.values.len() as f64).sqrt()
            }),
        });
    }
    if found.is_empty() {
        return Ok(Err("no convolution's weight reached the device in both of the first two steps".into()));
    }
    Ok(Ok(found))
}

/// The report in words, for stderr.
pub fn lines(r: &PrivacyReport) -> Vec<String> {
    let mut lines = vec![format!(
        "privacy report: {} on {} with {}: test accuracy {:.2}%",
        r.model,
        r.dataset,
        r.scheme,
        100.0 * r.accuracy
    )];
    let kinds: Vec<String> = r.released_by_kind.iter().map(|(k, b)| format!("{k} {b}")).collect();
    lines.push(format!(
        "released to the device: {} bytes{}",
        r.bytes_released,
        if kinds.is_empty() { String::new() } else { format!(" ({})", kinds.join(", ")) }
    ));
    lines.push(match r.epsilon {
        Some(e) => format!("epsilon {e:.2} (delta {:.0e}); covers: {}", r.delta.unwrap_or(0.0), r.covers),
        None => format!("no epsilon; {}", r.covers),
    });
    if let Some(why) = &r.no_attack {
        lines.push(format!("no attack ran: {why}"));
    }
    for w in &r.weight_difference {
        lines.push(format!(
            "weight-difference: {}: the first step's weight gradient recovered from two released weights (norm {:.3e}; \
             the device's own part {:.3e}); {}",
            w.layer,
            w.recovered_norm,
            w.device_part_norm,
            match w.hidden_fraction {
                Some(f) => format!("the rest, {:.1}% of its norm, is the part the enclave computed", 100.0 * f),
                None => match w.update_noise_norm {
                    Some(noise) => format!(
                        "a DP-SGD update (--dp full: each sample's gradient clipped, the sum noised), whose noise alone \
                         has norm about {noise:.3e} here"
                    ),
                    None => "clipped by --max-grad-norm, so it does not split into the device's part and the enclave's"
                        .into(),
                },
            }
        ));
    }
    for skipped in &r.not_applicable {
        lines.push(format!("attack {}: not applicable: {}", skipped.name, skipped.why));
    }
    for a in &r.attacks {
        let f = |v: Option<f64>, digits: usize| v.map_or("-".into(), |v| format!("{v:.digits$}"));
        lines.push(format!(
            "attack {}: PSNR {} dB, SSIM {}, label accuracy {} ({}){}",
            a.name,
            f(a.psnr, 1),
            f(a.ssim, 3),
            a.label_accuracy.map_or("-".into(), |v| format!("{:.1}%", 100.0 * v)),
            a.target,
            a.grid.as_ref().map_or(String::new(), |g| format!("; {}", g.display()))
        ));
    }
    lines
}
