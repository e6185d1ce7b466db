//! Opens the devices named by `--device`: local backends (our CPU kernels, wgpu, CUDA) or remote
//! `trustsplit device` workers.

use anyhow::{bail, Context, Result};
use trustsplit_boundary::{ChannelOptions, TcpChannel};
use trustsplit_device::{Backend, CpuBackend, Device};

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
