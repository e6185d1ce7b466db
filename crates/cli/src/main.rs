//! `trustsplit`: train and evaluate neural networks on private data, split between a trusted
//! execution environment and untrusted accelerators.

use anyhow::Result;
use clap::{Args, Parser, Subcommand};
use std::path::PathBuf;
use trustsplit::registry::{scheme_parser, Scheme, SchemeOptions};
use trustsplit::train::TrainConfig;
use trustsplit::training_args::TrainingArgs;
use trustsplit::OnOff;
use trustsplit::{bench, eval, train};

#[global_allocator]
static ALLOCATOR: mimalloc::MiMalloc = mimalloc::MiMalloc;

#[derive(Parser)]
#[command(name = "trustsplit", version, about = "Private deep learning split between a TEE and untrusted GPUs")]
#[command(long_about = "Train and evaluate deep neural networks on private data, splitting each step \
between a trusted execution environment and untrusted accelerators.\n\nHuman-readable output goes to \
stderr; --json prints one JSON object on stdout.")]
struct Cli {
    #[command(subcommand)]
    command: Command,
}

#[derive(Subcommand)]
enum Command {
    /// Train a model and report test accuracy (checkpoints and metrics go to --out).
    Train(TrainArgs),
    /// Evaluate a checkpoint on a dataset's test split.
    Eval(EvalArgs),
    /// Train as `train` would while the in-process device records everything it receives and
    /// returns (OUT/view), then attack that recording as the device's owner would: reconstruct
    /// the training images from the first release and score it (PSNR, SSIM, the trained model's
    /// accuracy on the reconstructions), with a PNG per attack. Prints the bytes released by
    /// kind, the epsilon and what it covers. See docs/privacy.md.
    PrivacyReport(PrivacyReportArgs),
    /// Measure performance.
    Bench {
        #[command(subcommand)]
        what: BenchWhat,
    },
    /// Run an untrusted device worker that serves linear algebra (GEMM, conv forward and
    /// backward) to enclaves connecting over TCP. It sees everything it is sent.
    Device(DeviceArgs),
    /// Run the trusted half as its own process: prove what it is (attestation), receive the data
    /// owner's dataset over an encrypted channel, then train on it.
    Enclave(trustsplit::enclave_cmd::EnclaveArgs),
    /// The data owner's client: check the enclave's attestation, then upload a dataset to it
    /// encrypted with a key bound to that attestation.
    Upload(trustsplit::enclave_cmd::UploadArgs),
    /// Run one of CryptGPU's three parties (--scheme cryptgpu) as its own process: it links with
    /// the other two over authenticated, encrypted links, serves one run of the data owner
    /// (`train`, `eval` or `bench step` with --peers), then exits. It sees only random shares.
    Party(trustsplit::party_cmd::PartyArgs),
    /// Run one of Goten's three servers' untrusted sides (--scheme goten) as its own process: it
    /// serves the enclave of one run over an authenticated, encrypted link, computing on shares
    /// and masks only, then exits.
    GotenServer(trustsplit::goten_cmd::GotenServerArgs),
    /// Make a key pair for the links between processes: writes the secret key to --out and prints
    /// the public key (64 hex digits) on stdout, for the peers' --allow, --device-key or
    /// --owner-key.
    Keygen(KeygenArgs),
    /// Get datasets that do not ship with trustsplit.
    Data {
        #[command(subcommand)]
        what: DataWhat,
    },
}

#[derive(Subcommand)]
enum DataWhat {
    /// Download CIFAR-10 or CIFAR-100 (the binary version) from its authors' site, check it
    /// against the pinned size and SHA-256, unpack it into --data-dir and load it once. An
    /// archive already in --data-dir is checked and reused. Without internet access, fetch the
    /// archive elsewhere and pass it with --archive (the same checks apply).
    Fetch(FetchArgs),
}

#[derive(Args)]
struct FetchArgs {
    /// cifar10 or cifar100 (MNIST and Fashion-MNIST come from your distribution, e.g. Debian's
    /// dataset-fashion-mnist, or from their authors' sites).
    dataset: String,
    /// Folder for the archive and the unpacked files; give `train` the same --data-dir.
    #[arg(long, default_value = "data")]
    data_dir: PathBuf,
    /// A copy of the official archive to check and unpack instead of downloading.
    #[arg(long, conflicts_with = "url")]
    archive: Option<PathBuf>,
    /// Download from this mirror instead of the authors' site; the pinned size and SHA-256 still
    /// apply.
    #[arg(long)]
    url: Option<String>,
    /// Print one JSON object on stdout (the archive, its digest, the files, the example counts).
    #[arg(long)]
    json: bool,
}

#[derive(Args)]
struct DeviceArgs {
    /// Address to listen on, e.g. 127.0.0.1:7070 (port 0 picks a free port; the address is printed).
    #[arg(long)]
    listen: String,
    /// Compute backend: cpu, cpu:THREADS, wgpu, wgpu:cpu, cuda, cuda:INDEX.
    #[arg(long, default_value = "cpu")]
    backend: String,
    /// This worker's key file (`trustsplit keygen --out FILE`); clients pin its public key with
    /// --device-key.
    #[arg(long, value_name = "FILE", required_unless_present = "insecure_plaintext_link")]
    key: Option<PathBuf>,
    /// The public keys (64 hex digits each) of the trusted sides this worker serves; no one else
    /// gets any work done or memory allocated.
    #[arg(long, value_name = "HEX[,HEX...]", value_delimiter = ',', conflicts_with = "allow_any")]
    allow: Vec<trustsplit_boundary::PublicKey>,
    /// Serve any client that authenticates with some key: free compute for whoever reaches the
    /// port (the link still encrypts and authenticates this worker to them).
    #[arg(long)]
    allow_any: bool,
    /// INSECURE: serve over plain TCP, unauthenticated and unencrypted (clients must say the
    /// same): anyone who reaches the port is served and anyone on the network reads every operand.
    #[arg(long, conflicts_with_all = ["key", "allow", "allow_any"])]
    insecure_plaintext_link: bool,
    /// Authenticated connections served at once; more are refused.
    #[arg(long, default_value_t = 8)]
    max_connections: usize,
    /// Close a served connection that sends no request for this many seconds.
    #[arg(long, default_value_t = 600)]
    idle_limit_s: u64,
    /// Keep everything this worker receives and returns, as an attacker controlling it would: per
    /// request, the operands and the result (DIR/NNNNNNNN.safetensors) and a line of
    /// DIR/index.jsonl with their SHA-256 digests, which match the trusted side's --transcript:
    /// the attacker's view, in the form `trustsplit privacy-report` attacks (docs/privacy.md).
    #[arg(long, value_name = "DIR")]
    record: Option<PathBuf>,
    /// Past this many MiB of tensors, --record indexes requests without keeping their tensors.
    #[arg(long, value_name = "MIB", default_value_t = 4096, requires = "record")]
    record_limit_mib: u64,
}

#[derive(Args)]
struct KeygenArgs {
    /// Where to write the new secret key (mode 0600; an existing file is never overwritten). Its
    /// public key is printed on stdout as one line of hex.
    #[arg(long, value_name = "FILE")]
    out: PathBuf,
}

#[derive(Args)]
struct TrainArgs {
    /// Where the trust boundary lies (each scheme's page: docs/schemes/).
    #[arg(long, default_value = "asymml", value_parser = scheme_parser())]
    scheme: Scheme,
    /// Dataset: embedded (ships with trustsplit), mnist, fashion-mnist, cifar10, cifar100
    /// (`trustsplit data fetch` gets the CIFAR sets).
    #[arg(long, default_value = "embedded")]
    dataset: String,
    /// Folder with the dataset's files (standard names; IDX may be .gz). Not needed for embedded.
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Use only the first N training samples (0 = all).
    #[arg(long, default_value_t = 0)]
    train_limit: usize,
    /// Use only the first N test samples (0 = all).
    #[arg(long, default_value_t = 0)]
    test_limit: usize,
    /// Random crop + horizontal flip: on or off [default: on for CIFAR, off otherwise].
    #[arg(long)]
    augment: Option<OnOff>,
    #[command(flatten)]
    training: TrainingArgs,
}

#[derive(Args)]
struct PrivacyReportArgs {
    #[command(flatten)]
    train: TrainArgs,
    /// Public images the attacker learns from: the first N of the test split (the split the
    /// training did not use, which the attacker is assumed to have).
    #[arg(long, default_value_t = 2048)]
    public_samples: usize,
    /// Training steps (batches of 32) of the learned inverse network.
    #[arg(long, default_value_t = 600)]
    attack_steps: usize,
    /// Images drawn in each PNG grid.
    #[arg(long, default_value_t = 16)]
    shown: usize,
}

#[derive(Args)]
struct EvalArgs {
    #[arg(long)]
    checkpoint: PathBuf,
    #[arg(long, default_value = "embedded")]
    dataset: String,
    #[arg(long)]
    data_dir: Option<PathBuf>,
    /// Scheme to evaluate under.
    #[arg(long, default_value = "plaintext", value_parser = scheme_parser())]
    scheme: Scheme,
    /// Device for schemes that offload (see `train --help`).
    #[arg(long, default_value = "cpu")]
    device: String,
    #[command(flatten)]
    device_link: trustsplit::devices::DeviceLinkArgs,
    #[arg(long, default_value_t = 256)]
    batch_size: usize,
    #[arg(long, default_value_t = 1)]
    threads: usize,
    #[arg(long)]
    json: bool,
    #[command(flatten)]
    scheme_options: SchemeOptions,
}

#[derive(Subcommand)]
enum BenchWhat {
    /// Per training step (or inference batch) under a scheme: time in the enclave and on the
    /// device, bytes each way, sealed spill, peak enclave memory. Random data.
    Step {
        /// The scheme to time.
        #[arg(long, default_value = "tee-only", value_parser = scheme_parser())]
        scheme: Scheme,
        #[arg(long, default_value = "vgg16", value_parser = trustsplit::training_args::model_parser())]
        model: String,
        /// max, or avg: the model's max-pools replaced by average pools (as CryptGPU's networks).
        #[arg(long, default_value = "max", value_parser = ["max", "avg"])]
        pool: String,
        #[arg(long, default_value_t = 32)]
        batch_size: usize,
        /// Height and width of the random input images (default: 32 for the CIFAR-sized models, 28
        /// for lenet5). VGG needs at least 32 (five 2x2 poolings); the residual networks end in a
        /// global average pool and take any size. Larger images make the enclave's saved
        /// activations outgrow --memory-budget-mib sooner (then sealed and spilled).
        #[arg(long)]
        image_size: Option<usize>,
        /// Time inference batches instead of training steps.
        #[arg(long)]
        inference: bool,
        /// Learning rate of the timed SGD steps. The data are random, so nothing is learnt; a
        /// large model whose updates blow up under AsymML's noise ("training diverged") can be
        /// timed with a smaller rate, or 0 (the update still runs, and changes nothing).
        #[arg(long, default_value_t = 1e-3)]
        lr: f32,
        /// Measured steps, after the warm-up steps.
        #[arg(long, default_value_t = 3)]
        steps: usize,
        /// Unmeasured steps first: the first steps fault in the process's working set (the
        /// allocator keeps it from then on), which a long training run pays once.
        #[arg(long, default_value_t = 2)]
        warmup: usize,
        /// Enclave threads.
        #[arg(long, default_value_t = 1)]
        threads: usize,
        /// Device for schemes that offload (see `train --help`).
        #[arg(long, default_value = "cpu")]
        device: String,
        #[command(flatten)]
        device_link: Box<trustsplit::devices::DeviceLinkArgs>,
        #[arg(long, default_value_t = 96)]
        memory_budget_mib: usize,
        #[arg(long)]
        json: bool,
        /// Also time this scheme in the same run and print the enclave-time ratio (default:
        /// tee-only for a scheme that splits a step between the enclave and untrusted hardware:
        /// asymml, gpu-only, goten; `none` to skip). Both are warmed up first, then
        /// their measured steps alternate (baseline, scheme, baseline, ...), so that a shared
        /// host's drifting speed weighs on both alike; the ratio's range over those pairs of
        /// steps is printed too.
        #[arg(long)]
        baseline: Option<String>,
        #[command(flatten)]
        scheme_options: Box<SchemeOptions>,
    },
    /// Conv (batch 32, 64->64, 32x32, 3x3) forward and forward+backward, and a VGG16 training
    /// step, at 1 and 2 threads, beside a GEMM baseline of the same arithmetic.
    Kernels {
        /// Timed runs per measurement (the median is reported).
        #[arg(long, default_value_t = 7)]
        repeats: usize,
        /// Batch size of the VGG16 step.
        #[arg(long, default_value_t = 32)]
        vgg_batch: usize,
        /// Thread counts to measure.
        #[arg(long, value_delimiter = ',', default_value = "1,2")]
        threads: Vec<usize>,
        #[arg(long)]
        json: bool,
    },
}

fn run_train(a: TrainArgs) -> Result<()> {
    let mut cfg = TrainConfig::new(&a.training.model_name(), &a.dataset);
    cfg.scheme = a.scheme;
    cfg.data_dir = a.data_dir;
    cfg.train_limit = a.train_limit;
    cfg.test_limit = a.test_limit;
    cfg.augment = a.augment.map(|v| matches!(v, OnOff::On));
    let out = a.training.apply(&mut cfg)?;
    train::announce(&cfg, &cfg.dataset, &out);
    let s = train::train(&cfg, &out, a.training.resume, true)?;
    train::report(&s, a.training.json)
}

fn run_privacy_report(a: PrivacyReportArgs) -> Result<()> {
    let t = a.train;
    anyhow::ensure!(
        t.training.out.is_some(),
        "privacy-report needs --out DIR (the recording, grids and report go there)"
    );
    anyhow::ensure!(
        !t.training.resume,
        "privacy-report trains from the start (its recording covers the whole run); drop --resume"
    );
    anyhow::ensure!(
        t.training.transcript.is_none(),
        "privacy-report writes its transcript to OUT/transcript.jsonl; drop --transcript"
    );
    anyhow::ensure!(t.training.device_link.record.is_none(), "privacy-report records into OUT/view; drop --record");
    let mut cfg = TrainConfig::new(&t.training.model_name(), &t.dataset);
    cfg.scheme = t.scheme;
    cfg.data_dir = t.data_dir;
    cfg.train_limit = t.train_limit;
    cfg.test_limit = t.test_limit;
    cfg.augment = t.augment.map(|v| matches!(v, OnOff::On));
    let out = t.training.apply(&mut cfg)?;
    train::announce(&cfg, &cfg.dataset, &out);
    let settings = trustsplit::privacy_report::ReportSettings {
        public_samples: a.public_samples,
        attack_steps: a.attack_steps,
        shown: a.shown,
    };
    let report = trustsplit::privacy_report::run(cfg, &out, settings)?;
    for line in trustsplit::privacy_report::lines(&report) {
        eprintln!("{line}");
    }
    if t.training.json {
        println!("{}", serde_json::to_string(&report)?);
    }
    Ok(())
}

fn run_device(a: DeviceArgs) -> Result<()> {
    use trustsplit_boundary::LinkPolicy;
    use trustsplit_device::{LinkSecurity, ServeOptions};
    let security = match (&a.key, a.insecure_plaintext_link) {
        (_, true) => LinkSecurity::InsecurePlaintext,
        (Some(path), false) => {
            let key = trustsplit_boundary::KeyPair::load(path).map_err(anyhow::Error::msg)?;
            let allowed = match (a.allow_any, a.allow.is_empty()) {
                (true, _) => LinkPolicy::AnyAuthenticated,
                (false, false) => LinkPolicy::Only(a.allow.clone()),
                (false, true) => anyhow::bail!(
                    "say whom this worker serves: --allow HEX[,HEX...] (the trusted sides' public keys) or \
                     --allow-any (anyone who authenticates: free compute for whoever reaches the port)"
                ),
            };
            eprintln!("device key {} (clients pin it with --device-key)", key.public());
            LinkSecurity::Authenticated { key: std::sync::Arc::new(key), allowed }
        }
        (None, false) => anyhow::bail!("--key FILE is required (or --insecure-plaintext-link)"),
    };
    anyhow::ensure!(a.max_connections >= 1, "--max-connections must be at least 1");
    // Fail early on a backend that cannot start, instead of on the first connection.
    trustsplit::devices::open_backend(&a.backend)?;
    let listener = trustsplit_device::DeviceListener::bind(&a.listen)?;
    let serving = match &security {
        LinkSecurity::InsecurePlaintext => {
            "WARNING: --insecure-plaintext-link: plain TCP, anyone who reaches the port is served and anyone on the \
             network reads every operand"
                .to_string()
        }
        LinkSecurity::Authenticated { allowed: LinkPolicy::AnyAuthenticated, .. } => {
            "serving any authenticated client (--allow-any: free compute for whoever reaches the port)".to_string()
        }
        LinkSecurity::Authenticated { allowed: LinkPolicy::Only(keys), .. } => {
            format!("serving {} allowed key(s) over the encrypted link", keys.len())
        }
    };
    eprintln!(
        "trustsplit device worker ({}) listening on {} -- UNTRUSTED: it sees every operand it is sent; {serving}",
        a.backend,
        listener.local_addr()?
    );
    let spec = a.backend.clone();
    let recorder = a.record.as_deref().map(|dir| trustsplit::devices::recorder(dir, a.record_limit_mib)).transpose()?;
    if let Some(r) = &recorder {
        eprintln!("recording every request's operands and result in {}", r.dir().display());
    }
    let options = ServeOptions {
        channel: trustsplit_boundary::ChannelOptions::default(),
        security,
        max_connections: a.max_connections,
        idle_limit: std::time::Duration::from_secs(a.idle_limit_s),
    };
    listener.run(
        move || {
            trustsplit::devices::open_backend(&spec)
                .map(|b| trustsplit::devices::recording(b, recorder.as_ref()))
                .map_err(|e| trustsplit_device::DeviceError::Unavailable(format!("{e:#}")))
        },
        options,
        |m| eprintln!("{m}"),
    )?;
    Ok(())
}

fn run_keygen(a: KeygenArgs) -> Result<()> {
    let key = trustsplit_boundary::KeyPair::generate().map_err(anyhow::Error::msg)?;
    key.save(&a.out).map_err(anyhow::Error::msg)?;
    eprintln!("wrote the secret key to {} (mode 0600); its public key:", a.out.display());
    println!("{}", key.public());
    Ok(())
}

/// The baseline of `bench step`: named, `none`, or by default tee-only for a scheme that splits
/// a step between the enclave and untrusted hardware (asymml, gpu-only, goten).
fn parse_baseline(arg: Option<&str>, scheme: Scheme) -> Result<Option<Scheme>> {
    let splits = matches!(scheme.entry().build, trustsplit::registry::Build::Split(_))
        && !["tee-only", "plaintext"].contains(&scheme.name());
    match arg {
        Some("none") => Ok(None),
        Some(name) => Ok(Some(name.parse().map_err(anyhow::Error::msg)?)),
        None if splits => Ok(Some(Scheme::of(&trustsplit_schemes::tee_only::INFO))),
        None => Ok(None),
    }
}

fn print_step(r: &bench::StepBench) {
    if let Some(parties) = &r.parties {
        let shape = r.input_shape.iter().map(|d| d.to_string()).collect::<Vec<_>>().join("x");
        let what = if r.inference { " inference" } else { "" };
        eprintln!(
            "{} {} batch {} of {shape}{what}: {:.0} ms per step for the three parties",
            r.scheme, r.model, r.batch_size, r.step_ms
        );
        for p in parties {
            eprintln!(
                "  party {}: {:.2} MB sent in {} messages, {} rounds per step",
                p.party,
                p.bytes_sent as f64 / 1e6,
                p.messages,
                p.rounds
            );
        }
        return;
    }
    eprintln!(
        "{} {} batch {} of {}{}: {:.0} ms per step ({:.0} ms enclave, {:.0} ms device); {:.1} MB released, {:.1} MB sent to the device in all, {:.1} MB back; spill {:.1} MB; peak enclave {:.1} MiB; enclave {:.2} G multiply-adds, device {:.2} G",
        r.scheme,
        r.model,
        r.batch_size,
        r.input_shape.iter().map(|d| d.to_string()).collect::<Vec<_>>().join("x"),
        if r.inference { " inference" } else { "" },
        r.step_ms,
        r.enclave_ms,
        r.device_ms,
        r.bytes_released as f64 / 1e6,
        r.device_bytes_sent as f64 / 1e6,
        r.device_bytes_received as f64 / 1e6,
        r.spill_bytes as f64 / 1e6,
        r.peak_enclave_bytes as f64 / (1 << 20) as f64,
        r.enclave_macs as f64 / 1e9,
        r.device_macs as f64 / 1e9
    );
    if !r.enclave_phase_ms.is_empty() {
        let phases: Vec<String> = r.enclave_phase_ms.iter().map(|(k, v)| format!("{k} {v:.0} ms")).collect();
        eprintln!("  enclave phases per step: {}", phases.join(", "));
    }
    if r.device_checks.is_some() {
        eprintln!("  {}", trustsplit_schemes::asymml::summary::describe_device_checks(r.device_checks));
    }
}

fn run_fetch(a: FetchArgs) -> Result<()> {
    use trustsplit::data_fetch::{fetch, official, Source};
    let kind: trustsplit_data::DatasetKind = a.dataset.parse().map_err(anyhow::Error::msg)?;
    let Some(archive) = official(kind) else {
        anyhow::bail!(
            "`data fetch` gets cifar10 and cifar100; {} is not fetched (embedded ships with trustsplit; MNIST and \
             Fashion-MNIST come from your distribution, e.g. Debian's dataset-fashion-mnist, or their authors' sites)",
            kind.name()
        );
    };
    let source = match (a.archive, a.url) {
        (Some(path), _) => Source::Local(path),
        (None, url) => Source::Download(url.unwrap_or_else(|| archive.url.clone())),
    };
    let fetched = fetch(&archive, source, &a.data_dir, true)?;
    eprintln!(
        "{}: {} {} ({} bytes, SHA-256 {}); unpacked {} files into {}: {} training and {} test examples. Train \
         with --dataset {} --data-dir {}",
        fetched.dataset,
        if fetched.downloaded { "downloaded" } else { "checked" },
        fetched.archive.display(),
        fetched.archive_bytes,
        fetched.sha256,
        fetched.files.len(),
        fetched.data_dir.display(),
        fetched.train_examples,
        fetched.test_examples,
        fetched.dataset,
        fetched.data_dir.display()
    );
    if a.json {
        println!("{}", serde_json::to_string(&fetched)?);
    }
    Ok(())
}

fn main() {
    trustsplit::memory_tuning::configure_allocator();
    let cli = Cli::parse();
    let result = match cli.command {
        Command::Device(d) => run_device(d),
        Command::Keygen(a) => run_keygen(a),
        Command::Party(a) => trustsplit::party_cmd::run_party(a),
        Command::GotenServer(a) => trustsplit::goten_cmd::run_goten_server(a),
        Command::Enclave(a) => trustsplit::enclave_cmd::run_enclave(a),
        Command::Upload(a) => trustsplit::enclave_cmd::run_upload(a),
        Command::Train(a) => run_train(a),
        Command::PrivacyReport(a) => run_privacy_report(a),
        Command::Data { what: DataWhat::Fetch(a) } => run_fetch(a),
        Command::Eval(a) => eval::eval(
            &a.checkpoint,
            &a.dataset,
            a.data_dir.as_deref(),
            a.scheme,
            &a.device,
            &a.device_link,
            a.batch_size,
            a.threads,
            &a.scheme_options,
            true,
        )
        .and_then(|r| {
            eprintln!(
                "{}: test accuracy {:.2}% (loss {:.4}) on {} samples",
                a.checkpoint.display(),
                100.0 * r.accuracy,
                r.loss,
                r.samples
            );
            for line in &r.summary_lines {
                eprintln!("{line}");
            }
            if a.json {
                println!("{}", serde_json::to_string(&r)?);
            }
            Ok(())
        }),
        Command::Bench {
            what:
                BenchWhat::Step {
                    scheme,
                    model,
                    pool,
                    batch_size,
                    image_size,
                    inference,
                    lr,
                    steps,
                    warmup,
                    threads,
                    device,
                    device_link,
                    memory_budget_mib,
                    json,
                    baseline,
                    scheme_options,
                },
        } => parse_baseline(baseline.as_deref(), scheme).and_then(|baseline| {
            let model = trustsplit::training_args::model_with_pool(&model, &pool);
            let r = bench::step_compared(&bench::StepOptions {
                scheme,
                model: &model,
                batch_size,
                image_size,
                inference,
                lr,
                steps,
                warmup,
                threads,
                device: &device,
                link: *device_link,
                memory_budget: memory_budget_mib << 20,
                options: *scheme_options,
                baseline,
            })?;
            for b in r.baseline.iter().chain(std::iter::once(&r.run)) {
                print_step(b);
            }
            if let (Some(b), Some(x)) = (&r.baseline, r.enclave_speedup) {
                let per_pair = match r.enclave_speedup_per_pair {
                    Some((lo, hi)) => format!("; {lo:.2}-{hi:.2}x over the {} alternated pairs of steps", b.steps),
                    None => String::new(),
                };
                eprintln!(
                    "enclave time: {} {:.0} ms / {} {:.0} ms = {x:.2}x{per_pair} (enclave multiply-adds {:.2}x)",
                    b.scheme,
                    b.enclave_ms,
                    r.run.scheme,
                    r.run.enclave_ms,
                    b.enclave_macs as f64 / r.run.enclave_macs.max(1) as f64
                );
            }
            if json {
                println!("{}", serde_json::to_string(&r)?);
            }
            Ok(())
        }),
        Command::Bench { what: BenchWhat::Kernels { repeats, vgg_batch, threads, json } } => {
            bench::kernels(&threads, repeats, vgg_batch, |m| eprintln!("{m}")).and_then(|r| {
                eprintln!(
                    "for a same-machine PyTorch reference run scripts/pytorch_conv_reference.py 1 (see BENCHMARKS.md, \"Kernels against PyTorch\")"
                );
                if json {
                    println!("{}", serde_json::to_string(&r)?);
                }
                Ok(())
            })
        }
    };
    if let Err(e) = result {
        eprintln!("error: {e:#}");
        std::process::exit(1);
    }
}
