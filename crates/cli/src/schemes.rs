//! Builds a scheme's runner from command-line settings: the enclave's memory budget, the device,
//! and the transcript file.

use crate::train::TrainConfig;
use anyhow::{bail, Context, Result};
use std::path::Path;
use std::sync::Arc;
use trustsplit_boundary::{ChannelOptions, TcpChannel, Transcript};
use trustsplit_device::{Backend, CpuBackend, Device};
use trustsplit_schemes::asymml::{self, AsymmlConfig};
use trustsplit_schemes::{gpu_only, plaintext, tee_only, SchemeKind, SplitRunner};

/// The runner for a training configuration; `noise_multiplier` is AsymML's (flag or calibrated).
pub fn build_runner(cfg: &TrainConfig, noise_multiplier: f64) -> Result<SplitRunner> {
    let asymml = cfg.asymml.config(noise_multiplier);
    runner_for(cfg.scheme, &cfg.device, cfg.memory_budget, cfg.transcript.as_deref(), &asymml)
}

/// The runner for `scheme`, with its device opened from `device_spec` when the scheme needs one.
pub fn runner_for(
    scheme: SchemeKind,
    device_spec: &str,
    memory_budget: usize,
    transcript_path: Option<&Path>,
    asymml: &AsymmlConfig,
) -> Result<SplitRunner> {
    let transcript = match transcript_path {
        Some(p) => Transcript::new().with_jsonl(p).with_context(|| format!("creating transcript {}", p.display()))?,
        None => Transcript::new(),
    };
    let transcript = Arc::new(transcript);
    Ok(match scheme {
        SchemeKind::Plaintext => plaintext::runner(transcript)?,
        SchemeKind::TeeOnly => tee_only::runner(memory_budget, transcript)?,
        SchemeKind::GpuOnly => gpu_only::runner(open_devices(device_spec)?, memory_budget, transcript)?,
        SchemeKind::Asymml => {
            let mut devices = open_devices(device_spec)?;
            if devices.len() != 1 {
                bail!("asymml uses one device; got {} in --device {device_spec}", devices.len());
            }
            asymml::runner(devices.remove(0), asymml.clone(), memory_budget, transcript)?
        }
    })
}

/// Opens one device per comma-separated spec (`tcp://a:7070,tcp://b:7070`): gpu-only splits each
/// batch across them.
pub fn open_devices(specs: &str) -> Result<Vec<Device>> {
    specs.split(',').map(|s| open_device(s.trim())).collect()
}

/// Opens a device: `cpu` (all cores), `cpu:THREADS`, `wgpu`, `wgpu:cpu`, `cuda`, `cuda:INDEX`, or
/// `tcp://HOST:PORT` for a `trustsplit device` worker.
pub fn open_device(spec: &str) -> Result<Device> {
    if let Some(addr) = spec.strip_prefix("tcp://") {
        let ch = TcpChannel::connect(addr, ChannelOptions::default())
            .with_context(|| format!("connecting to the device worker at {addr}"))?;
        return Device::remote(Box::new(ch)).with_context(|| format!("handshake with the device worker at {addr}"));
    }
    Ok(Device::local(open_backend(spec)?))
}

/// A local compute backend from a spec (see [`open_device`]).
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
