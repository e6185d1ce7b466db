//! `trustsplit enclave` and `trustsplit upload`: the trusted half as its own process, and the data
//! owner's client that feeds it.
//!
//! The enclave proves what it is (a quote over a fresh key), receives the owner's dataset over a
//! channel encrypted to that key ([`trustsplit_enclave::upload`]), parses it with the same loaders
//! as files on disk and trains on it. The owner's client refuses to send a byte before the quote
//! satisfies its policy: the expected measurement, an accepted TCB status, no debug enclave, and
//! simulated quotes only when asked for explicitly.

use crate::training_args::TrainingArgs;
use anyhow::{bail, ensure, Context, Result};
use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use std::time::{SystemTime, UNIX_EPOCH};
use trustsplit_boundary::{
    Channel, ChannelError, ChannelOptions, Frame, KeyPair, Link, LinkPolicy, PublicKey, TcpChannel,
};
use trustsplit_data::DatasetKind;
use trustsplit_enclave::attestation::{
    hex, AttestationProvider, DcapVerifier, GramineDcapProvider, Policy, QuoteVerifier, SimulatedAttestation,
    SimulatedVerifier, TdxPolicy, SIMULATED_WARNING,
};
use trustsplit_enclave::upload::{
    enclave_receive, owner_upload, UploadError, UploadedFile, TAG_ERROR, TAG_FINISHED, TAG_REPORT,
};

/// The purpose the upload link's handshake names.
const LINK_PURPOSE: &str = "upload";

use crate::registry::Scheme;
use crate::train::{self, RunLog, TrainConfig};

/// Who produces the enclave's quotes.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum EnclaveAttestation {
    /// An ed25519 signature in place of hardware. Provides NO security: for development and CI.
    Simulated,
    /// SGX DCAP quotes from Gramine's /dev/attestation (run under gramine-sgx with
    /// sgx.remote_attestation = "dcap").
    Gramine,
    /// TDX quotes through Linux's configfs-tsm (/sys/kernel/config/tsm/report, Linux 6.7+), inside
    /// an Intel TDX confidential VM whose host runs a quote generation service.
    Tdx,
}

/// Which quotes the data owner accepts.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum OwnerAttestation {
    /// Intel SGX / TDX DCAP quotes, verified offline against --collateral.
    Dcap,
    /// `trustsplit enclave --attestation simulated` quotes, checked against --simulation-key.
    /// Provides NO security: for development and CI.
    Simulated,
}

#[derive(clap::Args)]
pub struct EnclaveArgs {
    /// Address to listen on for the data owner, e.g. 127.0.0.1:7000 (port 0 picks a free port).
    /// The bound address is printed on stderr as `enclave listening on ADDR`. One upload is
    /// accepted, then the enclave trains and exits.
    #[arg(long)]
    listen: String,
    /// The data owner's public key (64 hex digits, from its `trustsplit keygen`): only that owner
    /// can connect and upload; anyone else is refused and the enclave keeps listening.
    /// (With --insecure-plaintext-link the upload comes over plain TCP from whoever connects
    /// first: its data stays encrypted to the attested key, but nothing proves who uploaded.)
    #[arg(long, value_name = "HEX", conflicts_with = "insecure_plaintext_link")]
    owner_key: Option<PublicKey>,
    /// Where quotes come from: simulated (no security; prints its measurement and key for the
    /// owner), gramine (SGX DCAP under Gramine) or tdx (a TDX confidential VM).
    #[arg(long, value_enum, default_value = "simulated")]
    attestation: EnclaveAttestation,
    /// Largest dataset accepted, in MiB; a larger upload is refused before any of it is read.
    #[arg(long, default_value_t = 1024)]
    max_upload_mib: u64,
    /// The kind of the uploaded dataset: mnist, fashion-mnist, cifar10, cifar100 (files with the
    /// standard names; IDX may be .gz).
    #[arg(long)]
    dataset: DatasetKind,
    /// Where the trust boundary lies (each scheme's page: docs/schemes/).
    #[arg(long, default_value = "tee-only", value_parser = crate::registry::scheme_parser())]
    scheme: Scheme,
    #[command(flatten)]
    training: TrainingArgs,
}

#[derive(clap::Args)]
pub struct UploadArgs {
    /// The enclave's address, HOST:PORT (as printed by `trustsplit enclave`); with --scheme
    /// cryptgpu, the three parties' addresses HOST:PORT,HOST:PORT,HOST:PORT (their --listen as
    /// this machine reaches them), party 0, 1, 2 in order.
    #[arg(long)]
    pub(crate) to: String,
    /// Upload into CryptGPU's three parties (`trustsplit party ... --store DIR`) instead of an
    /// enclave: each party stores its shares of every record, and `train --scheme cryptgpu
    /// --peers ... --uploaded NAME` then trains on them without sharing any batch again. The
    /// enclave's options (attestation, measurements) do not apply.
    #[arg(long, value_enum, value_name = "SCHEME")]
    pub(crate) scheme: Option<UploadScheme>,
    /// --scheme cryptgpu: the three parties' public keys (64 hex digits each, as their `trustsplit
    /// keygen` printed them), in the order of --to.
    #[arg(long, value_name = "HEX,HEX,HEX", value_delimiter = ',', requires = "scheme")]
    pub(crate) party_keys: Vec<trustsplit_boundary::PublicKey>,
    /// --scheme cryptgpu: the name the parties store the upload under (letters, digits, '.', '_',
    /// '-'), for `train --uploaded NAME`. An upload of the same name replaces it.
    #[arg(long, value_name = "NAME", requires = "scheme")]
    pub(crate) name: Option<String>,
    /// --scheme cryptgpu: fractional bits of the shared fixed-point values; the runs that train
    /// on the upload must use the same --frac-bits.
    #[arg(long, value_name = "BITS", requires = "scheme", default_value_t = trustsplit_cryptgpu::ring::DEFAULT_FRAC_BITS)]
    pub(crate) frac_bits: u32,
    /// --scheme cryptgpu: the model the upload is for: its input size decides whether images are
    /// padded (28x28 images to 32x32 for the models that take 32x32). Any model with the same
    /// input size may train on the upload.
    #[arg(long, value_name = "MODEL", requires = "scheme", default_value = "lenet", value_parser = crate::training_args::model_parser())]
    pub(crate) model: String,
    /// --scheme cryptgpu: upload only the first N training samples (0: all); runs on the upload
    /// must give the same --train-limit.
    #[arg(long, value_name = "N", default_value_t = 0, requires = "scheme")]
    pub(crate) train_limit: usize,
    /// --scheme cryptgpu: upload only the first N test samples (0: all); runs on the upload must
    /// give the same --test-limit.
    #[arg(long, value_name = "N", default_value_t = 0, requires = "scheme")]
    pub(crate) test_limit: usize,
    /// The data owner's key file (`trustsplit keygen --out FILE`); the enclave is started with its
    /// public key as --owner-key and accepts an upload from no one else.
    #[arg(long, value_name = "FILE")]
    pub(crate) key: Option<PathBuf>,
    /// INSECURE: connect over plain TCP (the enclave must say the same): the data stays encrypted
    /// to the attested enclave key, but the enclave cannot tell who uploads.
    #[arg(long, conflicts_with_all = ["key", "scheme"])]
    insecure_plaintext_link: bool,
    /// The dataset: mnist, fashion-mnist, cifar10, cifar100 (with --scheme cryptgpu also
    /// embedded).
    #[arg(long)]
    pub(crate) dataset: DatasetKind,
    /// Folder with the dataset's files under their standard names (IDX raw or .gz; CIFAR also in
    /// the folder its tarball unpacks to). They are checked locally before connecting.
    #[arg(long, required_unless_present = "scheme")]
    pub(crate) data_dir: Option<PathBuf>,
    /// The measurement (64 hex digits) of the enclave code you audited: MRENCLAVE for SGX,
    /// SHA-256(MRTD||RTMR0..3) for TDX, the printed value for simulated attestation.
    #[arg(long, required_unless_present_any = ["allow_any_measurement", "scheme"], conflicts_with = "scheme")]
    expect_measurement: Option<String>,
    /// Accept any measurement: whatever code runs in the enclave, a malicious build included, gets
    /// the data. INSECURE, development only: with --attestation dcap it also needs --insecure.
    #[arg(long, conflicts_with_all = ["expect_measurement", "scheme"])]
    allow_any_measurement: bool,
    /// Which quotes to accept: dcap (SGX/TDX hardware) or simulated (INSECURE: provides NO
    /// security, anyone can forge its quotes; development only).
    #[arg(long, value_enum, default_value = "dcap")]
    attestation: OwnerAttestation,
    /// The simulated enclave's verifying key (64 hex digits, printed by `trustsplit enclave`).
    #[arg(long, conflicts_with = "scheme", required_if_eq("attestation", "simulated"))]
    simulation_key: Option<String>,
    /// DCAP collateral (TCB info, QE identity, CRLs) as JSON, as the dcap-qvl tool writes it.
    /// Required with --attestation dcap.
    #[arg(long, conflicts_with = "scheme")]
    collateral: Option<PathBuf>,
    /// Accept debug enclaves and TDs, whose memory the host can read. INSECURE: needs --insecure.
    #[arg(long, conflicts_with = "scheme")]
    allow_debug: bool,
    /// Permit the insecure options --allow-any-measurement (with --attestation dcap) and
    /// --allow-debug, for development with data that is not private; every run then prints a
    /// warning. (--attestation simulated is insecure by itself and is chosen explicitly.)
    #[arg(long, conflicts_with = "scheme")]
    insecure: bool,
    /// TDX: the MRCONFIGID the TD must report (96 hex digits, 48 bytes). Refused if it differs or
    /// the quote is not a TDX quote.
    #[arg(long, value_name = "HEX", conflicts_with = "scheme")]
    expect_mrconfigid: Option<String>,
    /// TDX: the MROWNER the TD must report (96 hex digits, 48 bytes).
    #[arg(long, value_name = "HEX", conflicts_with = "scheme")]
    expect_mrowner: Option<String>,
    /// TDX: the MROWNERCONFIG the TD must report (96 hex digits, 48 bytes).
    #[arg(long, value_name = "HEX", conflicts_with = "scheme")]
    expect_mrownerconfig: Option<String>,
    /// TDX: the exact TD attributes the TD must report (16 hex digits, 8 bytes, in the TD report's
    /// byte order). Without it only the DEBUG bit must be clear (and dcap-qvl's own checks pass).
    #[arg(long, value_name = "HEX", conflicts_with = "scheme")]
    expect_td_attributes: Option<String>,
    /// DCAP TCB statuses to accept, comma-separated (e.g. UpToDate,SWHardeningNeeded).
    #[arg(long, value_delimiter = ',', default_value = "UpToDate")]
    accept_tcb: Vec<String>,
}

/// Where `trustsplit upload` sends a dataset instead of an enclave.
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum UploadScheme {
    /// CryptGPU's three parties.
    Cryptgpu,
}

/// Runs the trusted half: attest, receive one dataset, train on it.
pub fn run_enclave(a: EnclaveArgs) -> Result<()> {
    // Everything that can be checked without the data is checked before waiting for it, so a
    // typo does not surface only after the owner has uploaded.
    ensure!(a.dataset != DatasetKind::Embedded, "--dataset embedded is built in; the enclave trains on uploaded data");
    a.training.check()?;
    let max_upload_bytes = a.max_upload_mib.checked_mul(1 << 20).context("--max-upload-mib is too large")?;

    let provider: Box<dyn AttestationProvider> = match a.attestation {
        EnclaveAttestation::Simulated => {
            let exe = std::env::current_exe().context("locating this binary to measure it")?;
            let sim = SimulatedAttestation::for_binary(&exe)
                .with_context(|| format!("measuring {} for simulated attestation", exe.display()))?;
            eprintln!("{}", "!".repeat(100));
            eprintln!("!!! WARNING: {SIMULATED_WARNING}.");
            eprintln!("!!! Anyone can forge these quotes; never upload real private data to this enclave.");
            eprintln!("{}", "!".repeat(100));
            eprintln!("enclave measurement: {} (SHA-256 of {})", hex(&sim.measurement()), exe.display());
            eprintln!(
                "enclave simulation key: {} (give it to the data owner)",
                hex(sim.verifier().trusted_key.as_bytes())
            );
            Box::new(sim)
        }
        EnclaveAttestation::Gramine => {
            let p = GramineDcapProvider::new().context("starting SGX DCAP attestation under Gramine")?;
            eprintln!("attestation: SGX DCAP via Gramine; the measurement is this enclave's MRENCLAVE");
            Box::new(p)
        }
        EnclaveAttestation::Tdx => {
            let p = trustsplit_enclave::tsm::ConfigfsTsmProvider::new().context("starting TDX attestation")?;
            eprintln!(
                "attestation: TDX DCAP via configfs-tsm; the measurement is SHA-256(MRTD || RTMR0..3) of this TD"
            );
            Box::new(p)
        }
    };

    ensure!(
        a.owner_key.is_some() || a.training.device_link.insecure_plaintext_link,
        "--owner-key HEX is required: the data owner's public key (its `trustsplit keygen`), the only one allowed \
         to upload (or --insecure-plaintext-link, which takes an upload from whoever connects first)"
    );
    let listener = TcpListener::bind(&a.listen).with_context(|| format!("listening on {}", a.listen))?;
    let addr = listener.local_addr().context("reading the bound address")?;
    // The enclave's key on the link is fresh: its quote, which binds the link, proves whose it is.
    let link_key = KeyPair::generate().map_err(anyhow::Error::msg)?;
    let owner = match (a.owner_key, a.training.device_link.insecure_plaintext_link) {
        (_, true) => None,
        (Some(k), false) => Some(LinkPolicy::Only(vec![k])),
        (None, false) => bail!("--owner-key HEX is required (or --insecure-plaintext-link)"),
    };
    match &owner {
        Some(_) => eprintln!("enclave listening on {addr}"),
        None => eprintln!(
            "enclave listening on {addr}\nWARNING: --insecure-plaintext-link: whoever connects first uploads, over plain \
             TCP"
        ),
    }
    // Until the owner has uploaded, a connection that fails (junk, a stranger's key, a refused
    // quote) is logged and the enclave keeps listening. Handshakes run on their own threads, so
    // silent connections cannot hold the owner's up; the upload itself runs here, one at a time,
    // on connections that authenticated as the owner.
    let authenticated = accept_owners(listener, owner, Arc::new(link_key));
    let (files, mut to_owner, peer) = loop {
        let (channel, binding, peer) =
            authenticated.recv().context("the enclave stopped accepting connections before an upload")?;
        match receive(channel, &binding, provider.as_ref(), max_upload_bytes, &peer) {
            Ok((files, to_owner)) => break (files, to_owner, peer),
            // The top of the error only: its causes may quote the upload's file names and sizes.
            Err(e) => eprintln!("the upload from {peer} failed: {e}; still listening on {addr}"),
        }
    };
    drop(authenticated); // one upload per run: later connections are dropped after their handshake
    let total: usize = files.iter().map(|f| f.bytes.len()).sum();
    eprintln!("received {} file(s), {total} bytes, from {peer}", files.len());

    // From here on the host sees nothing about the data or the training but that it runs and
    // how it ends: losses, accuracies, per-layer figures and errors (which may quote values) go
    // to the owner over the encrypted channel.
    let mut log = ToOwner { channel: to_owner.as_mut(), lost: false };
    match train_on_upload(&a, files, &mut log) {
        Ok(summary) => {
            for line in train::summary_lines(&summary) {
                log.line(&line);
            }
            let sent = log.channel.send(TAG_FINISHED, &serde_json::to_vec(&summary)?);
            if let Err(e) = sent {
                bail!("training finished, but its summary could not reach the data owner: {e}");
            }
            eprintln!("training finished; the summary went to the data owner");
            Ok(())
        }
        Err(e) => {
            let _ = log.channel.send(TAG_ERROR, format!("{e:#}").as_bytes());
            bail!("training failed; the reason went to the data owner (it may quote data, so it is not shown here)")
        }
    }
}

/// A connection that authenticated as the owner (or any, with `--insecure-plaintext-link`): the
/// channel, its binding for the quote, the peer's address.
type Authenticated = (Box<dyn Channel>, [u8; 32], String);

/// Connections in their handshake at once; more are closed as they arrive.
const MAX_HANDSHAKES: usize = 16;

/// Accepts connections on a thread of its own and runs each one's handshake on another (at most
/// [`MAX_HANDSHAKES`] at once); the ones that authenticate come out of the returned receiver. Once
/// the receiver is dropped (the upload is done), later connections are dropped after their
/// handshake.
fn accept_owners(
    listener: TcpListener,
    owner: Option<LinkPolicy>,
    link_key: Arc<KeyPair>,
) -> std::sync::mpsc::Receiver<Authenticated> {
    let (tx, rx) = std::sync::mpsc::channel::<Authenticated>();
    let handshaking = Arc::new(AtomicUsize::new(0));
    std::thread::spawn(move || {
        for stream in listener.incoming() {
            let Ok(stream) = stream else { continue };
            let peer = stream.peer_addr().map(|a| a.to_string()).unwrap_or_else(|_| "a peer".into());
            if handshaking.fetch_add(1, Ordering::SeqCst) >= MAX_HANDSHAKES {
                handshaking.fetch_sub(1, Ordering::SeqCst);
                eprintln!("refused a connection from {peer}: {MAX_HANDSHAKES} handshakes under way; still listening");
                continue;
            }
            let (tx, owner, link_key, handshaking) = (tx.clone(), owner.clone(), link_key.clone(), handshaking.clone());
            std::thread::spawn(move || {
                let opts = ChannelOptions::default();
                let outcome: Result<Authenticated, ChannelError> = match &owner {
                    Some(policy) => Link::accept(stream, LINK_PURPOSE, &link_key, policy, opts).map(|link| {
                        let binding = link.handshake_hash();
                        (Box::new(link) as Box<dyn Channel>, binding, peer.clone())
                    }),
                    None => TcpChannel::from_stream(stream, opts).map(|ch| (Box::new(ch) as _, [0; 32], peer.clone())),
                };
                handshaking.fetch_sub(1, Ordering::SeqCst);
                match outcome {
                    Ok(authenticated) => {
                        // After the upload nobody is listening: the connection is dropped.
                        let _ = tx.send(authenticated);
                    }
                    Err(e) => eprintln!("refused a connection from {peer}: {e}; still listening"),
                }
            });
        }
    });
    rx
}

/// Parses the uploaded files and trains on them, reporting to `log`.
fn train_on_upload(a: &EnclaveArgs, files: Vec<UploadedFile>, log: &mut ToOwner) -> Result<train::TrainSummary> {
    let files: Vec<(String, Vec<u8>)> = files.into_iter().map(|f| (f.name, f.bytes)).collect();
    let splits = trustsplit_data::load_from_files(a.dataset, &files)
        .with_context(|| format!("parsing the uploaded {} files", a.dataset))?;
    drop(files);
    let data = train::prepare_data(a.dataset, splits, &a.training.model_name(), 0, 0)?;
    log.line(&format!(
        "dataset {}: {} training and {} test images of {}x{}x{}",
        a.dataset,
        data.train.len(),
        data.test.len(),
        data.train.channels,
        data.train.height,
        data.train.width
    ));
    let mut cfg = TrainConfig::new(&a.training.model_name(), a.dataset.name());
    cfg.scheme = a.scheme;
    let out = a.training.apply(&mut cfg)?;
    train::announce(&cfg, &format!("the uploaded {}", cfg.dataset), &out);
    train::train_with_data(&cfg, data, &out, a.training.resume, log)
}

/// The enclave's run log: every line goes to the data owner over the encrypted channel, none to
/// the host's terminal, and no progress bars (they show the running loss).
struct ToOwner<'a> {
    channel: &'a mut dyn Channel,
    /// Set when a line could not be sent: the owner is gone; training goes on to its checkpoint.
    lost: bool,
}

impl RunLog for ToOwner<'_> {
    fn line(&mut self, text: &str) {
        if !self.lost {
            if let Err(e) = self.channel.send(TAG_REPORT, text.as_bytes()) {
                eprintln!("the data owner no longer receives reports ({e}); training goes on");
                self.lost = true;
            }
        }
    }
    fn bars(&self) -> bool {
        false
    }
}

/// Runs the upload protocol's enclave side, turning the ways it ends early into messages that
/// say what happened from the enclave's point of view.
/// Returns the files and the encrypted channel to the owner, which stays open for the run's
/// reports.
fn receive<C: Channel + 'static>(
    ch: C,
    binding: &[u8; 32],
    provider: &dyn AttestationProvider,
    max_bytes: u64,
    peer: &str,
) -> Result<(Vec<UploadedFile>, Box<dyn Channel>)> {
    let received = Arc::new(AtomicUsize::new(0));
    let ch = CountingChannel { inner: ch, received_frames: received.clone() };
    match enclave_receive(ch, binding, provider, max_bytes) {
        Ok((files, to_owner)) => Ok((files, Box::new(to_owner))),
        // The owner hangs up right after our quote when it does not trust it: nothing but the
        // hello ever arrived.
        Err(UploadError::Channel(ChannelError::Closed { .. })) => match received.load(Ordering::Relaxed) {
            0 => bail!("the data owner at {peer} closed the connection before the key exchange; no data was received"),
            1 => bail!(
                "the data owner at {peer} closed the connection after our quote, before sending any data; it most \
                 likely refused this enclave's quote (check the measurement and key it was given)"
            ),
            n => bail!("the data owner at {peer} closed the connection midway through the upload ({n} messages in)"),
        },
        Err(e) => Err(anyhow::Error::from(e)).with_context(|| format!("receiving the dataset from {peer}")),
    }
}

/// A channel that counts the frames it receives, so the enclave can tell a data owner that
/// refused its quote (hung up after the hello) from an upload that broke off midway.
struct CountingChannel<C> {
    inner: C,
    /// Shared with the caller, who keeps it after the channel is consumed.
    received_frames: Arc<AtomicUsize>,
}

impl<C: Channel> Channel for CountingChannel<C> {
    fn send(&mut self, tag: u16, payload: &[u8]) -> Result<(), ChannelError> {
        self.inner.send(tag, payload)
    }

    fn recv(&mut self) -> Result<Frame, ChannelError> {
        self.recv_limited(usize::MAX)
    }

    fn recv_limited(&mut self, max_payload: usize) -> Result<Frame, ChannelError> {
        let frame = self.inner.recv_limited(max_payload)?;
        self.received_frames.fetch_add(1, Ordering::Relaxed);
        Ok(frame)
    }

    fn peer(&self) -> String {
        self.inner.peer()
    }
}

/// Runs the data owner's client: check the dataset, verify the enclave's quote, upload.
pub fn run_upload(a: UploadArgs) -> Result<()> {
    if a.scheme == Some(UploadScheme::Cryptgpu) {
        return crate::share_upload::run(&a);
    }
    check_insecure_options(&a)?;
    let expected_measurement = match &a.expect_measurement {
        Some(m) => Some(parse_hex32("--expect-measurement", m)?),
        None => {
            eprintln!(
                "warning: --allow-any-measurement: the dataset goes to whatever code the enclave runs; \
                 only the TEE's genuineness is checked"
            );
            None
        }
    };
    let verifier: Box<dyn QuoteVerifier> = match a.attestation {
        OwnerAttestation::Simulated => {
            ensure!(a.collateral.is_none(), "--collateral applies to --attestation dcap, not simulated");
            let key = a.simulation_key.as_deref().context("--attestation simulated needs --simulation-key")?;
            let key = parse_hex32("--simulation-key", key)?;
            let trusted_key = key
                .as_slice()
                .try_into()
                .map_err(|e| anyhow::anyhow!("--simulation-key is not a valid ed25519 public key: {e}"))?;
            eprintln!("warning: {SIMULATED_WARNING}; the enclave's quote proves nothing about the code it runs");
            Box::new(SimulatedVerifier { trusted_key })
        }
        OwnerAttestation::Dcap => {
            ensure!(a.simulation_key.is_none(), "--simulation-key applies to --attestation simulated, not dcap");
            let path = a.collateral.as_ref().context("--attestation dcap needs --collateral FILE")?;
            let json = std::fs::read(path).with_context(|| format!("reading DCAP collateral {}", path.display()))?;
            let v = DcapVerifier::from_json(&json)
                .with_context(|| format!("parsing DCAP collateral {}", path.display()))?;
            Box::new(v)
        }
    };
    let policy = Policy {
        expected_measurement,
        allow_simulated: a.attestation == OwnerAttestation::Simulated,
        allow_debug: a.allow_debug,
        accepted_tcb: a.accept_tcb.iter().map(|s| s.trim().to_string()).filter(|s| !s.is_empty()).collect(),
        tdx: TdxPolicy {
            mr_config_id: a.expect_mrconfigid.as_deref().map(|h| parse_hex("--expect-mrconfigid", h)).transpose()?,
            mr_owner: a.expect_mrowner.as_deref().map(|h| parse_hex("--expect-mrowner", h)).transpose()?,
            mr_owner_config: a
                .expect_mrownerconfig
                .as_deref()
                .map(|h| parse_hex("--expect-mrownerconfig", h))
                .transpose()?,
            td_attributes: a
                .expect_td_attributes
                .as_deref()
                .map(|h| parse_hex("--expect-td-attributes", h))
                .transpose()?,
        },
    };
    ensure!(
        policy.tdx.is_empty() || a.attestation == OwnerAttestation::Dcap,
        "--expect-mrconfigid, --expect-mrowner, --expect-mrownerconfig and --expect-td-attributes check TDX \
         quotes; they apply to --attestation dcap only"
    );

    // Read and parse locally first: a broken or incomplete folder is reported here, before
    // anything is sent, with the loaders the enclave will use.
    let dir = a.data_dir.as_ref().context("--data-dir is required for an upload to an enclave")?;
    let located = trustsplit_data::locate_files(a.dataset, dir)
        .with_context(|| format!("finding the {} files in {}", a.dataset, dir.display()))?;
    let mut named = Vec::with_capacity(located.len());
    for (name, path) in located {
        let bytes = std::fs::read(&path).with_context(|| format!("reading {}", path.display()))?;
        named.push((name, bytes));
    }
    let splits = trustsplit_data::load_from_files(a.dataset, &named)
        .with_context(|| format!("checking the {} files in {}", a.dataset, dir.display()))?;
    let files: Vec<UploadedFile> = named.into_iter().map(|(name, bytes)| UploadedFile { name, bytes }).collect();
    let total: usize = files.iter().map(|f| f.bytes.len()).sum();
    eprintln!(
        "{}: {} training and {} test images in {} file(s), {total} bytes",
        a.dataset,
        splits.train.len(),
        splits.test.len(),
        files.len()
    );
    drop(splits);

    ensure!(
        a.key.is_some() || a.insecure_plaintext_link,
        "--key FILE is required: the data owner's key file (trustsplit keygen --out FILE), whose public key the \
         enclave was started with as --owner-key (or --insecure-plaintext-link on both sides)"
    );
    let now = SystemTime::now().duration_since(UNIX_EPOCH).context("the system clock is before 1970")?.as_secs();
    let connecting = || format!("connecting to the enclave at {}", a.to);
    let uploaded = match &a.key {
        Some(path) => {
            let key = KeyPair::load(path).map_err(anyhow::Error::msg)?;
            // The enclave's link key is fresh each run: its quote, which binds this link's
            // handshake, is what authenticates it.
            let link =
                Link::connect(&a.to, LINK_PURPOSE, &key, &LinkPolicy::AnyAuthenticated, ChannelOptions::default())
                    .with_context(connecting)?;
            let binding = link.handshake_hash();
            owner_upload(Box::new(link) as Box<dyn Channel>, &binding, verifier.as_ref(), &policy, &files, now)
        }
        None => {
            eprintln!("WARNING: --insecure-plaintext-link: the enclave cannot tell who uploads");
            let ch = TcpChannel::connect(&a.to, ChannelOptions::default()).with_context(connecting)?;
            owner_upload(Box::new(ch) as Box<dyn Channel>, &[0; 32], verifier.as_ref(), &policy, &files, now)
        }
    };
    let (report, mut from_enclave) = uploaded.map_err(|e| match e {
        // Refused during the handshake: only our hello went out.
        UploadError::Attestation(_) | UploadError::ReportDataMismatch { .. } | UploadError::WeakKey { .. } => {
            anyhow::Error::from(e).context(format!("refusing the enclave at {}; no data was sent", a.to))
        }
        e => anyhow::Error::from(e).context(format!("uploading to the enclave at {}", a.to)),
    })?;
    eprintln!("verified: {}", report.kind);
    eprintln!("  measurement {}", hex(&report.measurement));
    eprintln!("  TCB status {}", report.tcb_status);
    if !report.advisories.is_empty() {
        eprintln!("  advisories: {}", report.advisories.join(", "));
    }
    eprintln!(
        "uploaded {} file(s), {total} bytes of {} to {}; the enclave confirmed receipt and is training",
        files.len(),
        a.dataset,
        a.to
    );
    wait_for_reports(&mut from_enclave, &a.to)
}

/// Prints what the enclave reports on its training, over the encrypted channel, until it finishes.
fn wait_for_reports(from_enclave: &mut dyn Channel, enclave: &str) -> Result<()> {
    loop {
        let frame = match from_enclave.recv_limited(1 << 20) {
            Ok(f) => f,
            // Training takes a while; silence within the channel's timeout is not an error.
            Err(ChannelError::Timeout { .. }) => continue,
            Err(e) => return Err(e).with_context(|| format!("waiting for the enclave at {enclave} to report")),
        };
        let text = trustsplit_boundary::printable(&frame.payload);
        match frame.tag {
            TAG_REPORT => eprintln!("enclave: {text}"),
            TAG_FINISHED => {
                eprintln!("the enclave finished training; its summary:");
                println!("{text}");
                return Ok(());
            }
            TAG_ERROR => bail!("the enclave's training failed: {text}"),
            other => bail!("the enclave at {enclave} sent an unexpected message (tag {other:#06x})"),
        }
    }
}

/// Refuses the options that let a malicious or readable enclave receive the data unless --insecure
/// says the owner means it, and shouts about them on every run when it does. Checked first, before
/// any file is read or connection made.
fn check_insecure_options(a: &UploadArgs) -> Result<()> {
    let mut chosen = Vec::new();
    if a.allow_any_measurement && a.attestation == OwnerAttestation::Dcap {
        ensure!(
            a.insecure,
            "--allow-any-measurement with --attestation dcap is refused: any enclave build on genuine \
             hardware, including a malicious one, would then receive the data. Pin the build you audited \
             with --expect-measurement HEX, or add --insecure for development with data that is not private"
        );
        chosen.push("--allow-any-measurement: ANY enclave build, including a malicious one, receives the data");
    }
    if a.allow_debug {
        ensure!(
            a.insecure,
            "--allow-debug is refused: a debug enclave or TD can be read by its host, so the data would leave \
             the TEE's protection. Remove --allow-debug, or add --insecure for development with data that is \
             not private"
        );
        chosen.push("--allow-debug: a debug enclave's memory, and so the data, can be read by its host");
    }
    if a.insecure {
        eprintln!("{}", "!".repeat(100));
        eprintln!("!!! WARNING: --insecure: this upload is NOT protected; never use it with real private data.");
        for c in &chosen {
            eprintln!("!!!   {c}");
        }
        if chosen.is_empty() {
            eprintln!("!!!   (no insecure option is in use: --insecure changes nothing here)");
        }
        eprintln!("{}", "!".repeat(100));
    }
    Ok(())
}

/// 32 bytes from 64 hex digits (an optional `0x` is accepted), or an error naming `flag`.
fn parse_hex32(flag: &str, s: &str) -> Result<[u8; 32]> {
    parse_hex(flag, s)
}

/// `N` bytes from `2N` hex digits (an optional `0x` is accepted), or an error naming `flag`.
fn parse_hex<const N: usize>(flag: &str, s: &str) -> Result<[u8; N]> {
    let t = s.trim();
    let t = t.strip_prefix("0x").unwrap_or(t);
    ensure!(t.len() == 2 * N, "{flag}: expected {} hex digits ({N} bytes), got {} characters", 2 * N, t.len());
    let mut out = [0u8; N];
    for (i, byte) in out.iter_mut().enumerate() {
        let digits = t.get(2 * i..2 * i + 2).with_context(|| format!("{flag}: not hex: {t:?}"))?;
        *byte = u8::from_str_radix(digits, 16).with_context(|| format!("{flag}: not hex: {digits:?}"))?;
    }
    Ok(out)
}
