//! Opens the devices named by `--device`: local backends (our CPU kernels, wgpu, CUDA) or remote
//! `trustsplit device` workers, each over the authenticated, encrypted link (its key pinned by
//! `--device-key`) unless `--insecure-plaintext-link` says otherwise.

use anyhow::{bail, ensure, Context, Result};
use std::path::PathBuf;
use std::sync::Arc;
use trustsplit_attacks::{Recorder, RecordingBackend};
use trustsplit_boundary::{ChannelOptions, KeyPair, Link, LinkPolicy, PublicKey, TcpChannel};
use trustsplit_device::{Backend, CpuBackend, Device, LINK_PURPOSE};

/// How the trusted side reaches `tcp://` devices, and whether its in-process devices record what
/// they see: the flags of `train`, `eval`, `bench step` and `enclave`. Not part of a run's recorded
/// settings.
#[derive(clap::Args, Clone, Debug, Default, PartialEq)]
pub struct DeviceLinkArgs {
    /// This side's key file for `tcp://` devices (`trustsplit keygen --out FILE`; give its public
    /// key to each worker's --allow).
    #[arg(long, value_name = "FILE")]
    pub key: Option<PathBuf>,
    /// The public key (64 hex digits, from the worker's `trustsplit keygen`) of each `tcp://`
    /// device, in the order --device names them.
    #[arg(long, value_name = "HEX[,HEX...]", value_delimiter = ',')]
    pub device_key: Vec<PublicKey>,
    /// INSECURE: talk to `tcp://` devices over plain TCP, unauthenticated and unencrypted (the
    /// workers must say the same): anyone on the network reads every released value and can pose
    /// as a device.
    #[arg(long, conflicts_with_all = ["key", "device_key"])]
    pub insecure_plaintext_link: bool,
    /// Keep everything the in-process devices receive and return, as an attacker controlling them
    /// would: per request, the operands and the result (DIR/NNNNNNNN.safetensors) and a line of
    /// DIR/index.jsonl with their SHA-256 digests, which match --transcript's: the attacker's
    /// view, in the form `trustsplit privacy-report` attacks. A `tcp://` worker records with its own `trustsplit device
    /// --record`.
    #[arg(long, value_name = "DIR")]
    pub record: Option<PathBuf>,
    /// Past this many MiB of tensors, --record (and privacy-report's recording) indexes requests
    /// without keeping their tensors.
    #[arg(long, value_name = "MIB", default_value_t = 4096)]
    pub record_limit_mib: u64,
}

/// Opens one device per comma-separated spec (`tcp://a:7070,tcp://b:7070`): gpu-only splits each
/// batch across them.
pub fn open_devices(specs: &str, link: &DeviceLinkArgs) -> Result<Vec<Device>> {
    let specs: Vec<&str> = specs.split(',').map(str::trim).collect();
    let remote = specs.iter().filter(|s| s.starts_with("tcp://")).count();
    let key = if remote > 0 && !link.insecure_plaintext_link {
        let Some(path) = &link.key else {
            bail!(
                "tcp:// devices need --key FILE (this side's key: trustsplit keygen --out FILE) and --device-key \
                 HEX for each device (its worker's public key), or --insecure-plaintext-link on both sides"
            );
        };
        ensure!(
            link.device_key.len() == remote,
            "{remote} tcp:// device(s) in --device but {} --device-key; give one key per tcp:// device, in order",
            link.device_key.len()
        );
        Some(Arc::new(KeyPair::load(path).map_err(anyhow::Error::msg)?))
    } else {
        ensure!(link.device_key.is_empty() || remote > 0, "--device-key is for tcp:// devices; --device names none");
        None
    };
    ensure!(
        link.record.is_none() || remote == 0,
        "--record keeps what in-process devices see; a tcp:// worker records with its own `trustsplit device --record DIR`"
    );
    let recorder = link.record.as_deref().map(|dir| recorder(dir, link.record_limit_mib)).transpose()?;
    let mut keys = link.device_key.iter();
    specs
        .into_iter()
        .map(|spec| match spec.strip_prefix("tcp://") {
            Some(addr) => match &key {
                Some(key) => open_remote(addr, key, *keys.next().expect("one key per tcp:// device, checked")),
                None => open_plaintext(addr),
            },
            None => Ok(Device::local(recording(open_backend(spec)?, recorder.as_ref()))),
        })
        .collect()
}

/// A recording in `dir` keeping at most `limit_mib` MiB of tensors.
pub fn recorder(dir: &std::path::Path, limit_mib: u64) -> Result<Arc<Recorder>> {
    Recorder::create(dir, limit_mib.saturating_mul(1 << 20)).map_err(anyhow::Error::msg)
}

/// `backend`, recording what it computes when there is a recorder.
pub fn recording(backend: Box<dyn Backend>, recorder: Option<&Arc<Recorder>>) -> Box<dyn Backend> {
    match recorder {
        Some(r) => Box::new(RecordingBackend::new(backend, Arc::clone(r))),
        None => backend,
    }
}

/// A `trustsplit device` worker over the link, accepted only if it proves `worker_key`.
fn open_remote(addr: &str, key: &KeyPair, worker_key: PublicKey) -> Result<Device> {
    let pinned = LinkPolicy::Only(vec![worker_key]);
    let link = Link::connect(addr, LINK_PURPOSE, key, &pinned, ChannelOptions::default())
        .with_context(|| format!("connecting to the device worker at {addr}"))?;
    Device::remote(Box::new(link)).with_context(|| format!("handshake with the device worker at {addr}"))
}

/// A worker over plain TCP (`--insecure-plaintext-link`), said so on every run.
fn open_plaintext(addr: &str) -> Result<Device> {
    eprintln!(
        "WARNING: --insecure-plaintext-link: the device at {addr} is reached over plain TCP; anyone on the network \
         reads every released value and can pose as the device"
    );
    let ch = TcpChannel::connect(addr, ChannelOptions::default())
        .with_context(|| format!("connecting to the device worker at {addr}"))?;
    Device::remote(Box::new(ch)).with_context(|| format!("handshake with the device worker at {addr}"))
}

/// A local compute backend from a spec: `cpu` (all cores), `cpu:THREADS`, `wgpu`, `wgpu:cpu`,
/// `cuda`, `cuda:INDEX`.
pub fn open_backend(spec: &str) -> Result<Box<dyn Backend>> {
    let (kind, arg) = spec.split_once(':').map(|(k, a)| (k, Some(a))).unwrap_or((spec, None));
    match kind {
        "cpu" => {
            let threads = match arg {
                Some(t) => t.parse().with_context(|| format!("bad thread count in device '{spec}'"))?,
                None => std::thread::available_parallelism().map(|n| n.get()).unwrap_or(1),
            };
            Ok(Box::new(CpuBackend::new(threads)?))
        }
        "wgpu" => wgpu_backend(arg),
        "cuda" => cuda_backend(arg),
        _ => {
            bail!("unknown device '{spec}'; use cpu, cpu:THREADS, wgpu, wgpu:cpu, cuda, cuda:INDEX or tcp://HOST:PORT")
        }
    }
}

#[cfg(feature = "wgpu")]
fn wgpu_backend(arg: Option<&str>) -> Result<Box<dyn Backend>> {
    use trustsplit_device::{WgpuAdapter, WgpuBackend};
    let adapter = match arg {
        None | Some("auto") => WgpuAdapter::Auto,
        Some("cpu") => WgpuAdapter::Cpu,
        Some("discrete") => WgpuAdapter::DiscreteGpu,
        Some("integrated") => WgpuAdapter::IntegratedGpu,
        Some(other) => bail!("unknown wgpu adapter '{other}'; use auto, cpu, discrete or integrated"),
    };
    Ok(Box::new(WgpuBackend::new(adapter)?))
}

#[cfg(not(feature = "wgpu"))]
fn wgpu_backend(_: Option<&str>) -> Result<Box<dyn Backend>> {
    bail!("this build has no GPU support through wgpu; rebuild with `cargo build --release -p trustsplit --features wgpu`")
}

#[cfg(feature = "cuda")]
fn cuda_backend(arg: Option<&str>) -> Result<Box<dyn Backend>> {
    let index = arg.map(str::parse).transpose().context("bad CUDA device index")?.unwrap_or(0);
    Ok(Box::new(trustsplit_device::CudaBackend::new(index)?))
}

#[cfg(not(feature = "cuda"))]
fn cuda_backend(_: Option<&str>) -> Result<Box<dyn Backend>> {
    bail!("this build has no CUDA support; rebuild with `cargo build --release -p trustsplit --features cuda`")
}
