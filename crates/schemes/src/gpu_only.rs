//! `gpu-only`: convolutions and linear layers on the device, in the clear. INSECURE baseline.
//!
//! Releases, for every convolution and linear layer and every step: the layer's input (for the
//! first layer, the raw private input), its weights, and in the backward pass the gradient of its
//! output. The device returns outputs, input gradients and weight gradients. Labels, logits, the
//! loss, batch-norm, activations and the optimizer stay inside the enclave, but the released
//! tensors reveal the data to whoever runs the device. It exists to measure the best-case speed
//! of offloading.

use crate::placement::{Placement, PlacementResult};
use crate::{RunnerError, SchemeKind, SplitRunner};
use std::sync::{Arc, Mutex};
use trustsplit_boundary::{ReleaseInfo, Released, Transcript};
use trustsplit_device::{Device, DeviceStats, GemmShape};
use trustsplit_nn::layers::{Conv2d, Linear};
use trustsplit_nn::tensor::{data, from_vec};
use trustsplit_nn::Tensor;

const SCHEME: &str = "gpu-only";
const WHY: &str = "none: gpu-only is an insecure baseline that sends linear-layer operands in the clear";

/// The device placement of the gpu-only baseline.
pub struct GpuOnly {
    device: Arc<Mutex<Device>>,
    transcript: Arc<Transcript>,
}

/// A runner whose linear layers run on `device`.
pub fn runner(device: Device, memory_budget: usize, transcript: Arc<Transcript>) -> Result<SplitRunner, RunnerError> {
    let device = Arc::new(Mutex::new(device));
    let stats_handle = device.clone();
    let stats = Box::new(move || stats_handle.lock().map(|d| d.stats()).unwrap_or_default())
        as Box<dyn Fn() -> DeviceStats + Send>;
    let placement = GpuOnly { device, transcript: transcript.clone() };
    SplitRunner::new(SchemeKind::GpuOnly, Box::new(placement), Some(memory_budget), transcript, Some(stats))
}

impl GpuOnly {
    fn release(&self, layer: &str, kind: &str, t: &Tensor) -> Released<Vec<f32>> {
        let info = ReleaseInfo {
            scheme: SCHEME.into(),
            layer: layer.into(),
            kind: kind.into(),
            shape: t.shape().to_vec(),
            reason: WHY.into(),
        };
        Released::new(&self.transcript, info, data(t).to_vec())
    }

    fn received(&self, layer: &str, kind: &str, shape: &[usize], values: Vec<f32>) -> PlacementResult<Tensor> {
        let expected: usize = shape.iter().product();
        if values.len() != expected {
            return Err(format!("device returned {} values for {layer} {kind}, expected {expected}", values.len()));
        }
        let info = ReleaseInfo {
            scheme: SCHEME.into(),
            layer: layer.into(),
            kind: kind.into(),
            shape: shape.to_vec(),
            reason: "device result".into(),
        };
        self.transcript.record_received(info, (values.len() * 4) as u64);
        Ok(from_vec(shape, values))
    }

    fn device(&self) -> std::sync::MutexGuard<'_, Device> {
        self.device.lock().unwrap_or_else(|p| p.into_inner())
    }
}

fn err(layer: &str, e: impl std::fmt::Display) -> String {
    format!("device failed on {layer}: {e}")
}

impl Placement for GpuOnly {
    fn conv_forward(&mut self, layer: &str, is_input: bool, conv: &Conv2d, x: &Tensor) -> PlacementResult<Tensor> {
        let g = conv.geometry(x.shape());
        let xr = self.release(layer, if is_input { "input" } else { "activation" }, x);
        let wr = self.release(layer, "weight", &conv.weight);
        let y = self.device().conv_forward(&g, &xr, &wr).map_err(|e| err(layer, e))?;
        let mut y = self.received(layer, "output", &[g.batch, g.out_channels, g.out_h(), g.out_w()], y)?;
        if let Some(b) = &conv.bias {
            let hw = g.out_h() * g.out_w();
            for (i, plane) in y.as_slice_mut().expect("contiguous").chunks_mut(hw).enumerate() {
                let bv = b[i % g.out_channels];
                plane.iter_mut().for_each(|v| *v += bv);
            }
        }
        Ok(y)
    }

    fn conv_backward(
        &mut self,
        layer: &str,
        conv: &Conv2d,
        x: &Tensor,
        dy: &Tensor,
    ) -> PlacementResult<(Tensor, Vec<Tensor>)> {
        let g = conv.geometry(x.shape());
        let dyr = self.release(layer, "output-gradient", dy);
        let wr = self.release(layer, "weight", &conv.weight);
        let xr = self.release(layer, "activation", x);
        let dx = self.device().conv_backward_data(&g, &dyr, &wr).map_err(|e| err(layer, e))?;
        let dw = self.device().conv_backward_weight(&g, &xr, &dyr).map_err(|e| err(layer, e))?;
        let dx = self.received(layer, "input-gradient", x.shape(), dx)?;
        let mut grads = vec![self.received(layer, "weight-gradient", conv.weight.shape(), dw)?];
        if conv.bias.is_some() {
            grads.push(bias_gradient(dy, g.out_channels));
        }
        Ok((dx, grads))
    }

    fn linear_forward(&mut self, layer: &str, is_input: bool, lin: &Linear, x: &Tensor) -> PlacementResult<Tensor> {
        let (n, i, o) = lin.dims(x.shape());
        let xr = self.release(layer, if is_input { "input" } else { "activation" }, x);
        let wr = self.release(layer, "weight", &lin.weight);
        let s = GemmShape { m: n, n: o, k: i, trans_a: false, trans_b: true };
        let y = self.device().gemm(&s, &xr, &wr).map_err(|e| err(layer, e))?;
        let mut y = self.received(layer, "output", &[n, o], y)?;
        if let Some(b) = &lin.bias {
            for row in y.as_slice_mut().expect("contiguous").chunks_mut(o) {
                row.iter_mut().zip(b.iter()).for_each(|(v, bv)| *v += bv);
            }
        }
        Ok(y)
    }

    fn linear_backward(
        &mut self,
        layer: &str,
        lin: &Linear,
        x: &Tensor,
        dy: &Tensor,
    ) -> PlacementResult<(Tensor, Vec<Tensor>)> {
        let (n, i, o) = lin.dims(x.shape());
        let dyr = self.release(layer, "output-gradient", dy);
        let wr = self.release(layer, "weight", &lin.weight);
        let xr = self.release(layer, "activation", x);
        let dx = self.device().gemm(&GemmShape { m: n, n: i, k: o, trans_a: false, trans_b: false }, &dyr, &wr);
        let dx = dx.map_err(|e| err(layer, e))?;
        let dw = self.device().gemm(&GemmShape { m: o, n: i, k: n, trans_a: true, trans_b: false }, &dyr, &xr);
        let dw = dw.map_err(|e| err(layer, e))?;
        let dx = self.received(layer, "input-gradient", x.shape(), dx)?;
        let mut grads = vec![self.received(layer, "weight-gradient", lin.weight.shape(), dw)?];
        if lin.bias.is_some() {
            grads.push(bias_gradient(dy, o));
        }
        Ok((dx, grads))
    }
}

/// Bias gradient (sum of `dy` over everything but the channel axis), computed in the enclave.
fn bias_gradient(dy: &Tensor, channels: usize) -> Tensor {
    let per_sample = dy.len() / dy.shape()[0];
    let spatial = per_sample / channels;
    let mut db = vec![0.0f32; channels];
    for (i, plane) in data(dy).chunks(spatial).enumerate() {
        db[i % channels] += plane.iter().sum::<f32>();
    }
    from_vec(&[channels], db)
}
