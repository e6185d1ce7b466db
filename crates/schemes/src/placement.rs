//! Where a scheme runs the linear layers (convolutions and fully connected layers).
//!
//! The [`Placement`] trait: a convolution's forward pass returns the context its backward pass
//! needs; [`Placement::retained_bytes`] is the state a placement keeps in the enclave between calls,
//! which the runner counts against the budget; [`Placement::conv_forward_pair`] takes a residual
//! block's two convolutions of the same input together. Beside it, the helpers the device
//! placements share: transcript records for releases and device results, the bias and its gradient.

use serde::Serialize;
use std::sync::{Mutex, MutexGuard};
use trustsplit_boundary::{ReleaseInfo, Transcript};
use trustsplit_nn::layers::{Conv2d, Linear};
use trustsplit_nn::{Mode, Saved, Tensor};

/// Errors a placement can raise (device failures, protocol errors).
pub type PlacementResult<T> = Result<T, String>;

/// What the runner tells a placement before each forward pass.
#[derive(Clone, Copy, Debug)]
pub struct PassInfo {
    pub mode: Mode,
    pub batch: usize,
    /// A training-mode batch-norm makes every sample's activations depend on the whole batch.
    pub couples_samples: bool,
}

/// Per-layer low-rank statistics (AsymML): the average rank kept and the share of energy released.
#[derive(Clone, Debug, Default, Serialize)]
pub struct LayerSplit {
    pub layer: String,
    /// Activations (`forward`) or output gradients (`gradient`).
    pub what: String,
    pub mean_rank: f64,
    /// Residual energy / total energy, before clipping and noise.
    pub residual_energy_ratio: f64,
    /// Share of released residuals that exceeded the clipping bound and were scaled down.
    pub clipped_fraction: f64,
}

/// What a placement reports beyond the runner's own counters.
#[derive(Clone, Debug, Default, Serialize)]
pub struct PlacementReport {
    /// Multiply-adds the enclave spent in convolutions and linear layers (0 when not counted).
    pub enclave_macs: u64,
    /// Multiply-adds the device was asked for.
    pub device_macs: u64,
    pub layers: Vec<LayerSplit>,
    pub privacy: Option<crate::asymml::PrivacyLedger>,
    /// Enclave wall time per phase of the placement's own work (AsymML: subspace, split, noise,
    /// low-rank products); the rest of the enclave's time is batch-norm, activations, pooling,
    /// the loss, the optimizer and saved-context handling.
    pub enclave_phase_seconds: std::collections::BTreeMap<String, f64>,
    /// Where the scheme verifies the device's results: the values checked and the closest any
    /// came to its tolerance. `None`: the device's results are not verified.
    pub device_checks: Option<crate::device_check::CheckTally>,
    /// The placement's own counters, by name (Goten: products outsourced, recomputed after a
    /// field wrap, made offline, and the offline products' peak storage).
    pub counters: std::collections::BTreeMap<String, u64>,
}

/// A scheme's decision for the linear layers. Everything else runs inside the enclave.
///
/// `layer` names the layer (`layers.3`, `layers.7.main.0`) for the transcript; `is_input` is true
/// for the first layer, whose input is the raw private data. A convolution's forward pass returns
/// the context its backward pass needs (kept in the enclave's budgeted memory by the runner).
pub trait Placement {
    fn begin_pass(&mut self, _pass: &PassInfo) {}
    /// Whether the scheme treats the weights (and the optimizer state, derivable from successive
    /// weights) as public: they then live in untrusted memory, not in the enclave's budget.
    fn weights_are_public(&self) -> bool {
        false
    }
    /// Whether `conv_backward` refuses, with an error, a weight gradient holding NaN or infinite
    /// values, so that the optimizer need not read it again to check (the runner tells it so).
    fn checks_conv_weight_gradients(&self) -> bool {
        false
    }
    /// Bytes the placement itself keeps in the enclave between calls (secrets and what it keeps to
    /// check the device): the runner counts them against the memory budget beside the saved
    /// contexts. Released values kept for later (already public) do not count.
    fn retained_bytes(&self) -> usize {
        0
    }
    fn conv_forward(
        &mut self,
        layer: &str,
        is_input: bool,
        conv: &Conv2d,
        x: &Tensor,
        mode: Mode,
    ) -> PlacementResult<(Tensor, Saved)>;
    /// Two convolutions of the same input, neither the model's first layer (a residual block's
    /// first convolution and its projection shortcut, in that order): by default two
    /// [`Placement::conv_forward`] calls. Each is later given back to `conv_backward` on its own.
    fn conv_forward_pair(
        &mut self,
        first: (&str, &Conv2d),
        second: (&str, &Conv2d),
        x: &Tensor,
        mode: Mode,
    ) -> PlacementResult<[(Tensor, Saved); 2]> {
        Ok([
            self.conv_forward(first.0, false, first.1, x, mode)?,
            self.conv_forward(second.0, false, second.1, x, mode)?,
        ])
    }
    /// `dx` and `[dweight, dbias?]` from what `conv_forward` saved.
    fn conv_backward(
        &mut self,
        layer: &str,
        conv: &Conv2d,
        saved: Saved,
        dy: &Tensor,
    ) -> PlacementResult<(Tensor, Vec<Tensor>)>;
    fn linear_forward(&mut self, layer: &str, is_input: bool, lin: &Linear, x: &Tensor) -> PlacementResult<Tensor>;
    fn linear_backward(
        &mut self,
        layer: &str,
        lin: &Linear,
        x: &Tensor,
        dy: &Tensor,
    ) -> PlacementResult<(Tensor, Vec<Tensor>)>;
    fn report(&self) -> PlacementReport {
        PlacementReport::default()
    }
}

/// The context of a placement that only needs the layer's input back.
pub fn keep_input(x: &Tensor, mode: Mode) -> Saved {
    if mode == Mode::Train {
        Saved::Input(x.clone())
    } else {
        Saved::Nothing
    }
}

/// The input saved by [`keep_input`].
pub fn saved_input(layer: &str, saved: Saved) -> PlacementResult<Tensor> {
    match saved {
        Saved::Input(x) => Ok(x),
        other => Err(format!("{layer}: expected the saved input, found {other:?}")),
    }
}

/// Locks a mutex, ignoring poisoning (a panicked device thread already failed its step).
pub fn lock<T>(m: &Mutex<T>) -> MutexGuard<'_, T> {
    m.lock().unwrap_or_else(|p| p.into_inner())
}

/// What a scheme says about one value crossing the boundary.
pub(crate) fn crossing(scheme: &str, layer: &str, kind: &str, shape: &[usize], reason: &str) -> ReleaseInfo {
    ReleaseInfo {
        scheme: scheme.into(),
        layer: layer.into(),
        kind: kind.into(),
        shape: shape.to_vec(),
        reason: reason.into(),
    }
}

/// Checks that a device result holds as many values as `shape` says and records it as received.
pub(crate) fn received(
    transcript: &Transcript,
    scheme: &str,
    layer: &str,
    kind: &str,
    shape: &[usize],
    values: Vec<f32>,
) -> PlacementResult<Vec<f32>> {
    let expected: usize = shape.iter().product();
    if values.len() != expected {
        return Err(format!("device returned {} values for {layer} {kind}, expected {expected}", values.len()));
    }
    transcript.record_received_value(crossing(scheme, layer, kind, shape, "device result"), &values);
    Ok(values)
}

/// Adds a per-channel bias to values laid out `N x C x per_channel` (`per_channel` = 1 after a
/// linear layer).
pub fn add_bias(y: &mut [f32], bias: Option<&Tensor>, channels: usize, per_channel: usize) {
    if let Some(b) = bias {
        let b = trustsplit_nn::tensor::data(b);
        for (i, plane) in y.chunks_mut(per_channel.max(1)).enumerate() {
            let v = b[i % channels];
            plane.iter_mut().for_each(|x| *x += v);
        }
    }
}

/// Bias gradient (sum of `dy` over everything but the channel axis), computed in the enclave.
pub fn bias_gradient(dy: &Tensor, channels: usize) -> Tensor {
    let per_sample = dy.len() / dy.shape()[0].max(1);
    let spatial = (per_sample / channels.max(1)).max(1);
    let mut db = vec![0.0f32; channels];
    trustsplit_kernels::elementwise::channel_sums(trustsplit_nn::tensor::data(dy), channels, spatial, &mut db);
    trustsplit_nn::tensor::from_vec(&[channels], db)
}

/// Computes the linear layers inside the trusted side, with the same kernels as plaintext.
pub struct Trusted;

impl Placement for Trusted {
    fn conv_forward(
        &mut self,
        _: &str,
        _: bool,
        conv: &Conv2d,
        x: &Tensor,
        mode: Mode,
    ) -> PlacementResult<(Tensor, Saved)> {
        Ok((conv.forward(x), keep_input(x, mode)))
    }
    fn conv_backward(
        &mut self,
        layer: &str,
        conv: &Conv2d,
        saved: Saved,
        dy: &Tensor,
    ) -> PlacementResult<(Tensor, Vec<Tensor>)> {
        Ok(conv.backward(&saved_input(layer, saved)?, dy))
    }
    fn linear_forward(&mut self, _: &str, _: bool, lin: &Linear, x: &Tensor) -> PlacementResult<Tensor> {
        Ok(lin.forward(x))
    }
    fn linear_backward(
        &mut self,
        _: &str,
        lin: &Linear,
        x: &Tensor,
        dy: &Tensor,
    ) -> PlacementResult<(Tensor, Vec<Tensor>)> {
        Ok(lin.backward(x, dy))
    }
}
