//! `gpu-only`: convolutions and linear layers on the device, in the clear. INSECURE baseline.
//!
//! Releases, for every convolution and linear layer and every step: the layer's input (for the
//! first layer, the raw private input), its weights, and in the backward pass the gradient of its
//! output. The device returns outputs, input gradients and weight gradients. Labels, logits, the
//! loss, batch-norm, activations and the optimizer stay inside the enclave, but the released
//! tensors reveal the data to whoever runs the device. It exists to measure the best-case speed
//! of offloading.
//!
//! With several devices the batch is split into contiguous shards, one per device, computed
//! concurrently; each device receives its shard of the activations and gradients and the full
//! weights, and the weight gradients are summed in shard order inside the enclave.

use crate::placement::{
    add_bias, bias_gradient, crossing, keep_input, lock, received, saved_input, Placement, PlacementResult,
};
use crate::{RunnerError, RunnerInputs, SchemeInfo, SplitRunner};
use std::ops::Range;
use std::sync::{Arc, Mutex};
use std::time::Instant;
use trustsplit_boundary::{Released, Transcript};
use trustsplit_device::{Device, DeviceStats, GemmShape};
use trustsplit_kernels::elementwise::add_assign;
use trustsplit_nn::layers::{Conv2d, Linear};
use trustsplit_nn::tensor::{data, data_mut, from_vec};
use trustsplit_nn::{Mode, Saved, Tensor};

pub const INFO: SchemeInfo = SchemeInfo {
    name: "gpu-only",
    releases: "INSECURE: every layer's input activations, weights and output gradients go to the device in the clear",
    uses_device: true,
    docs: "docs/schemes/baselines.md",
};

const SCHEME: &str = INFO.name;
const WHY: &str = "none: gpu-only is an insecure baseline that sends linear-layer operands in the clear";

type Shared<T> = Arc<Mutex<T>>;

/// The device placement of the gpu-only baseline.
pub struct GpuOnly {
    devices: Vec<Shared<Device>>,
    transcript: Arc<Transcript>,
    /// Wall time spent waiting for devices (concurrent shards count once).
    waiting: Shared<f64>,
}

/// A runner whose linear layers run on `devices` (at least one).
pub fn runner(
    devices: Vec<Device>,
    memory_budget: usize,
    transcript: Arc<Transcript>,
) -> Result<SplitRunner, RunnerError> {
    if devices.is_empty() {
        return Err(RunnerError::Placement("gpu-only needs at least one device".into()));
    }
    let devices: Vec<Shared<Device>> = devices.into_iter().map(|d| Arc::new(Mutex::new(d))).collect();
    let waiting = Arc::new(Mutex::new(0.0));
    let (handles, wait) = (devices.clone(), waiting.clone());
    let stats = Box::new(move || {
        let mut total = DeviceStats::default();
        for d in &handles {
            let s = lock(d).stats();
            total.requests += s.requests;
            total.bytes_sent += s.bytes_sent;
            total.bytes_received += s.bytes_received;
        }
        total.device_seconds = *lock(&wait);
        total
    }) as Box<dyn Fn() -> DeviceStats + Send>;
    let placement = GpuOnly { devices, transcript: transcript.clone(), waiting };
    SplitRunner::new(&INFO, Box::new(placement), Some(memory_budget), transcript, Some(stats))
}

/// The runner from the common inputs (the registry's constructor).
pub fn build(inputs: RunnerInputs) -> Result<SplitRunner, RunnerError> {
    runner(inputs.devices, inputs.memory_budget, inputs.transcript)
}

/// Splits `n` samples into at most `k` contiguous, non-empty ranges of near-equal size.
fn shards(n: usize, k: usize) -> Vec<Range<usize>> {
    let k = k.min(n).max(1);
    (0..k).map(|i| (i * n / k)..((i + 1) * n / k)).collect()
}

/// Rows `r` of a tensor's first (batch) axis, copied.
fn rows(t: &Tensor, r: &Range<usize>) -> Tensor {
    let per = t.len() / t.shape()[0].max(1);
    let mut shape = t.shape().to_vec();
    shape[0] = r.len();
    from_vec(&shape, data(t)[r.start * per..r.end * per].to_vec())
}

impl GpuOnly {
    fn release(&self, layer: &str, kind: &str, t: &Tensor) -> Released<Vec<f32>> {
        Released::new(&self.transcript, crossing(SCHEME, layer, kind, t.shape(), WHY), data(t).to_vec())
    }

    /// Releases `t` split along its batch axis into `parts` (one release when there is one part).
    fn release_shards(&self, layer: &str, kind: &str, t: &Tensor, parts: &[Range<usize>]) -> Vec<Released<Vec<f32>>> {
        match parts {
            [only] if only.len() == t.shape()[0] => vec![self.release(layer, kind, t)],
            _ => parts.iter().map(|r| self.release(layer, kind, &rows(t, r))).collect(),
        }
    }

    fn received(&self, layer: &str, kind: &str, shape: &[usize], values: Vec<f32>) -> PlacementResult<Tensor> {
        Ok(from_vec(shape, received(&self.transcript, SCHEME, layer, kind, shape, values)?))
    }

    /// Runs `work(device, shard)` for every shard, concurrently on one device each; results come
    /// back in shard order.
    fn on_devices<T: Send>(
        &self,
        layer: &str,
        shards: usize,
        work: impl Fn(&mut Device, usize) -> Result<T, trustsplit_device::DeviceError> + Sync,
    ) -> PlacementResult<Vec<T>> {
        let start = Instant::now();
        let run = |i: usize| work(&mut lock(&self.devices[i]), i).map_err(|e| format!("device failed on {layer}: {e}"));
        let results: Vec<PlacementResult<T>> = if shards == 1 {
            vec![run(0)]
        } else {
            std::thread::scope(|s| {
                let handles: Vec<_> = (0..shards).map(|i| s.spawn(move || run(i))).collect();
                handles
                    .into_iter()
                    .map(|h| h.join().unwrap_or_else(|_| Err("a device thread panicked".into())))
                    .collect()
            })
        };
        *lock(&self.waiting) += start.elapsed().as_secs_f64();
        results.into_iter().collect()
    }
}

/// Concatenates per-shard results along the batch axis.
fn concat(parts: Vec<Vec<f32>>) -> Vec<f32> {
    parts.concat()
}

/// Adds up per-shard weight gradients in shard order.
fn sum(parts: Vec<Vec<f32>>) -> Vec<f32> {
    let mut it = parts.into_iter();
    let mut total = it.next().unwrap_or_default();
    for p in it {
        add_assign(&mut total, &p);
    }
    total
}

impl Placement for GpuOnly {
    fn conv_forward(
        &mut self,
        layer: &str,
        is_input: bool,
        conv: &Conv2d,
        x: &Tensor,
        mode: Mode,
    ) -> PlacementResult<(Tensor, Saved)> {
        let g = conv.geometry(x.shape());
        let parts = shards(g.batch, self.devices.len());
        let xr = self.release_shards(layer, if is_input { "input" } else { "activation" }, x, &parts);
        let wr: Vec<_> = parts.iter().map(|_| self.release(layer, "weight", &conv.weight)).collect();
        let y = self.on_devices(layer, parts.len(), |d, i| {
            d.conv_forward(&trustsplit_kernels::ConvGeometry { batch: parts[i].len(), ..g }, &xr[i], &wr[i])
        })?;
        let mut y = self.received(layer, "output", &[g.batch, g.out_channels, g.out_h(), g.out_w()], concat(y))?;
        add_bias(data_mut(&mut y), conv.bias.as_ref(), g.out_channels, g.out_h() * g.out_w());
        Ok((y, keep_input(x, mode)))
    }

    fn conv_backward(
        &mut self,
        layer: &str,
        conv: &Conv2d,
        saved: Saved,
        dy: &Tensor,
    ) -> PlacementResult<(Tensor, Vec<Tensor>)> {
        let x = &saved_input(layer, saved)?;
        let g = conv.geometry(x.shape());
        let parts = shards(g.batch, self.devices.len());
        let dyr = self.release_shards(layer, "output-gradient", dy, &parts);
        let wr: Vec<_> = parts.iter().map(|_| self.release(layer, "weight", &conv.weight)).collect();
        let xr = self.release_shards(layer, "activation", x, &parts);
        let results = self.on_devices(layer, parts.len(), |d, i| {
            let gi = trustsplit_kernels::ConvGeometry { batch: parts[i].len(), ..g };
            Ok((d.conv_backward_data(&gi, &dyr[i], &wr[i])?, d.conv_backward_weight(&gi, &xr[i], &dyr[i])?))
        })?;
        let (dx, dw): (Vec<_>, Vec<_>) = results.into_iter().unzip();
        let dx = self.received(layer, "input-gradient", x.shape(), concat(dx))?;
        let mut grads = vec![self.received(layer, "weight-gradient", conv.weight.shape(), sum(dw))?];
        if conv.bias.is_some() {
            grads.push(bias_gradient(dy, g.out_channels));
        }
        Ok((dx, grads))
    }

    fn linear_forward(&mut self, layer: &str, is_input: bool, lin: &Linear, x: &Tensor) -> PlacementResult<Tensor> {
        let (n, i, o) = lin.dims(x.shape());
        let parts = shards(n, self.devices.len());
        let xr = self.release_shards(layer, if is_input { "input" } else { "activation" }, x, &parts);
        let wr: Vec<_> = parts.iter().map(|_| self.release(layer, "weight", &lin.weight)).collect();
        let y = self.on_devices(layer, parts.len(), |d, s| {
            d.gemm(&GemmShape { m: parts[s].len(), n: o, k: i, trans_a: false, trans_b: true }, &xr[s], &wr[s])
        })?;
        let mut y = self.received(layer, "output", &[n, o], concat(y))?;
        add_bias(data_mut(&mut y), lin.bias.as_ref(), o, 1);
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
        let parts = shards(n, self.devices.len());
        let dyr = self.release_shards(layer, "output-gradient", dy, &parts);
        let wr: Vec<_> = parts.iter().map(|_| self.release(layer, "weight", &lin.weight)).collect();
        let xr = self.release_shards(layer, "activation", x, &parts);
        let results = self.on_devices(layer, parts.len(), |d, s| {
            let m = parts[s].len();
            let dx = d.gemm(&GemmShape { m, n: i, k: o, trans_a: false, trans_b: false }, &dyr[s], &wr[s])?;
            let dw = d.gemm(&GemmShape { m: o, n: i, k: m, trans_a: true, trans_b: false }, &dyr[s], &xr[s])?;
            Ok((dx, dw))
        })?;
        let (dx, dw): (Vec<_>, Vec<_>) = results.into_iter().unzip();
        let dx = self.received(layer, "input-gradient", x.shape(), concat(dx))?;
        let mut grads = vec![self.received(layer, "weight-gradient", lin.weight.shape(), sum(dw))?];
        if lin.bias.is_some() {
            grads.push(bias_gradient(dy, o));
        }
        Ok((dx, grads))
    }
}
