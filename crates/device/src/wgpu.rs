//! GPUs through burn 0.22's wgpu backend (Vulkan, Metal, DX12; on GPU-less Linux, Mesa's
//! software Vulkan driver lavapipe).
//!
//! GEMM is burn's `matmul` (transposes are free stride swaps); the convolution passes are burn's
//! own kernels: `conv2d`, `conv_transpose2d` for the data gradient (with `padding_out` chosen so
//! the output has the input's size), and the backend's `conv2d_weight_backward`. burn reports
//! many failures by panicking, so each call runs under `catch_unwind` and a panic becomes
//! [`DeviceError::Backend`].

use crate::backend::{check, Backend};
use crate::error::DeviceError;
use crate::op::{GemmShape, Op};
use crate::server::panic_message;
use burn::tensor::module::{conv2d, conv2d_weight_backward, conv_transpose2d};
use burn::tensor::ops::{ConvOptions, ConvTransposeOptions};
use burn::tensor::{DType, Device, DeviceKind, Tensor, TensorData};
use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::{Mutex, OnceLock};
use trustsplit_kernels::ConvGeometry;

/// Which wgpu adapter to use.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub enum WgpuAdapter {
    /// The first discrete GPU, else the first integrated GPU, else a CPU adapter (lavapipe).
    Auto,
    Cpu,
    DiscreteGpu,
    IntegratedGpu,
}

/// burn registers one runtime per adapter kind per process and refuses a second `init`, so the
/// initialised devices (and their adapter names) are kept here and shared by every backend.
fn registry() -> &'static Mutex<HashMap<String, (Device, String)>> {
    static DEVICES: OnceLock<Mutex<HashMap<String, (Device, String)>>> = OnceLock::new();
    DEVICES.get_or_init(|| Mutex::new(HashMap::new()))
}

/// Initialises (once per process) the runtime for `kind`; returns the device and a description.
fn open(kind: DeviceKind) -> Result<(Device, String), String> {
    let key = format!("{kind:?}");
    let mut devices = registry().lock().unwrap_or_else(|p| p.into_inner());
    if let Some(found) = devices.get(&key) {
        return Ok(found.clone());
    }
    let init = catch_unwind(|| Device::wgpu_options().device_kind(kind).init_with_setup());
    let (device, setup) = match init {
        Ok(Ok(pair)) => pair,
        Ok(Err(e)) => return Err(format!("{key}: {e}")),
        Err(panic) => return Err(format!("{key}: wgpu initialisation panicked: {}", panic_message(&panic))),
    };
    let info = setup.adapter.get_info();
    let desc = format!("{} ({:?}, {:?})", info.name, info.device_type, info.backend);
    devices.insert(key, (device.clone(), desc.clone()));
    Ok((device, desc))
}

/// burn's wgpu backend on one adapter.
pub struct WgpuBackend {
    device: Device,
    adapter: String,
}

impl WgpuBackend {
    /// Opens the adapter; `Unavailable` (with each attempt's reason) if there is none.
    pub fn new(adapter: WgpuAdapter) -> Result<WgpuBackend, DeviceError> {
        let kinds = match adapter {
            WgpuAdapter::Auto => vec![DeviceKind::DiscreteGpu(0), DeviceKind::IntegratedGpu(0), DeviceKind::Cpu],
            WgpuAdapter::Cpu => vec![DeviceKind::Cpu],
            WgpuAdapter::DiscreteGpu => vec![DeviceKind::DiscreteGpu(0)],
            WgpuAdapter::IntegratedGpu => vec![DeviceKind::IntegratedGpu(0)],
        };
        let mut reasons = Vec::new();
        for kind in kinds {
            match open(kind) {
                Ok((device, adapter)) => return Ok(WgpuBackend { device, adapter }),
                Err(e) => reasons.push(e),
            }
        }
        Err(DeviceError::Unavailable(format!("no wgpu adapter for {adapter:?}: {}", reasons.join("; "))))
    }

    fn tensor<const D: usize>(&self, values: &[f32], shape: [usize; D]) -> Tensor<D> {
        Tensor::from_data(TensorData::new(values.to_vec(), shape), (&self.device, DType::F32))
    }

    /// Validates, answers trivial shapes, and runs `compute` with panics turned into errors.
    fn run(
        &self,
        op: Op,
        a: &[f32],
        b: &[f32],
        compute: impl FnOnce() -> Result<Vec<f32>, String>,
    ) -> Result<Vec<f32>, DeviceError> {
        check(&op, a, b)?;
        if let Some(zeros) = op.trivial_result() {
            return Ok(zeros);
        }
        match catch_unwind(AssertUnwindSafe(compute)) {
            Ok(Ok(y)) => Ok(y),
            Ok(Err(e)) => Err(DeviceError::Backend(format!("{}: {op}: {e}", self.name()))),
            Err(panic) => {
                Err(DeviceError::Backend(format!("{}: {op}: panicked: {}", self.name(), panic_message(&panic))))
            }
        }
    }
}

/// Reads a result back to the host as f32.
fn read<const D: usize>(t: Tensor<D>) -> Result<Vec<f32>, String> {
    let data = t.try_into_data().map_err(|e| e.to_string())?;
    data.try_into_vec_as::<f32>().map_err(|e| e.to_string())
}

fn conv_options(g: &ConvGeometry) -> ConvOptions<2> {
    ConvOptions::new([g.stride; 2], [g.padding; 2], [1, 1], 1)
}

impl Backend for WgpuBackend {
    fn name(&self) -> String {
        format!("wgpu {}", self.adapter)
    }

    fn gemm(&mut self, s: &GemmShape, a: &[f32], b: &[f32]) -> Result<Vec<f32>, DeviceError> {
        self.run(Op::Gemm(*s), a, b, || {
            let a = if s.trans_a { self.tensor(a, [s.k, s.m]).transpose() } else { self.tensor(a, [s.m, s.k]) };
            let b = if s.trans_b { self.tensor(b, [s.n, s.k]).transpose() } else { self.tensor(b, [s.k, s.n]) };
            read(a.matmul(b))
        })
    }

    fn conv_forward(&mut self, g: &ConvGeometry, x: &[f32], w: &[f32]) -> Result<Vec<f32>, DeviceError> {
        self.run(Op::ConvForward(*g), x, w, || {
            let x = self.tensor(x, [g.batch, g.in_channels, g.in_h, g.in_w]);
            let w = self.tensor(w, [g.out_channels, g.in_channels, g.kernel_h, g.kernel_w]);
            read(conv2d(x, w, None, conv_options(g)))
        })
    }

    fn conv_backward_data(&mut self, g: &ConvGeometry, dy: &[f32], w: &[f32]) -> Result<Vec<f32>, DeviceError> {
        self.run(Op::ConvBackwardData(*g), dy, w, || {
            let dy = self.tensor(dy, [g.batch, g.out_channels, g.out_h(), g.out_w()]);
            // A transposed conv's weight is `C_in(of the transpose) x C_out x kh x kw`, which is
            // the forward weight's layout as stored.
            let w = self.tensor(w, [g.out_channels, g.in_channels, g.kernel_h, g.kernel_w]);
            // Rows/columns the forward stride skipped at the bottom/right edge.
            let extra = |size: usize, k: usize| (size + 2 * g.padding - k) % g.stride;
            let options = ConvTransposeOptions::new(
                [g.stride; 2],
                [g.padding; 2],
                [extra(g.in_h, g.kernel_h), extra(g.in_w, g.kernel_w)],
                [1, 1],
                1,
            );
            read(conv_transpose2d(dy, w, None, options))
        })
    }

    fn conv_backward_weight(&mut self, g: &ConvGeometry, x: &[f32], dy: &[f32]) -> Result<Vec<f32>, DeviceError> {
        self.run(Op::ConvBackwardWeight(*g), x, dy, || {
            let x = self.tensor(x, [g.batch, g.in_channels, g.in_h, g.in_w]);
            let dy = self.tensor(dy, [g.batch, g.out_channels, g.out_h(), g.out_w()]);
            // Only the weight's shape is used.
            let w_shape = [g.out_channels, g.in_channels, g.kernel_h, g.kernel_w];
            let w = Tensor::<4>::zeros(w_shape, (&self.device, DType::F32));
            read(conv2d_weight_backward(x, w, dy, conv_options(g)))
        })
    }
}
