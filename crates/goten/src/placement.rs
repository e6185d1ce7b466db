//! Goten's placement: every convolution and linear layer (forward, input gradient, weight
//! gradient) goes to the three servers on shares ([`crate::protocol`]); everything else (bias,
//! batch-norm, activations, pooling, the loss and its gradient, the optimizer) stays in the
//! enclave, on the runner's layer code.
//!
//! Quantisation is done once per tensor and step, as in Goten: a layer's input and weights are
//! quantised in its forward pass and the same quantised values serve the backward pass (the
//! input's for the weight gradient, the weights' for the input gradient); the output gradient is
//! quantised once for both of its products. Shares are drawn afresh for every product.

use crate::ops::Op;
use crate::protocol::Servers;
use crate::quant::Quantised;
use std::collections::HashMap;
use std::sync::{Arc, Mutex, MutexGuard};
use trustsplit_cryptgpu::gemm::ConvShape;
use trustsplit_nn::layers::{Conv2d, Linear};
use trustsplit_nn::tensor::{data, from_vec};
use trustsplit_nn::{Mode, Saved, Tensor};
use trustsplit_schemes::placement::{
    add_bias, bias_gradient, lock, PassInfo, Placement, PlacementReport, PlacementResult,
};

pub struct GotenPlacement {
    pub(crate) servers: Arc<Mutex<Servers>>,
    mode: Mode,
    /// A linear layer's quantised input and weights, from its forward pass to its backward pass.
    linear_saved: HashMap<String, (Quantised, Quantised)>,
    /// Layers whose input is the model's input: no input gradient is needed.
    input_layers: Vec<String>,
    /// A failure outside a call that can return it (preparing offline products).
    failure: Option<String>,
}

/// A quantised tensor kept in a saved context: its values as f32 (exact: integers up to 128) and
/// its exponent.
fn keep(q: &Quantised) -> [Tensor; 2] {
    let values = q.values.iter().map(|&w| w as i64 as f32).collect::<Vec<f32>>();
    [from_vec(&[values.len()], values), from_vec(&[1], vec![q.exp as f32])]
}

fn restore(values: &Tensor, exp: &Tensor) -> Quantised {
    let values = data(values).iter().map(|&v| crate::field::centre(v as i64) as u64).collect();
    Quantised { values, exp: data(exp)[0] as i32 }
}

fn conv_shape(conv: &Conv2d, xs: &[usize]) -> PlacementResult<ConvShape> {
    let ws = conv.weight.shape();
    if xs.len() != 4 || ws.len() != 4 || xs[1] != ws[1] || ws[2] != ws[3] {
        return Err(format!("convolution of input {xs:?} with weights {ws:?}"));
    }
    Ok(ConvShape {
        batch: xs[0],
        in_channels: xs[1],
        height: xs[2],
        width: xs[3],
        out_channels: ws[0],
        kernel: ws[2],
        stride: conv.stride,
        padding: conv.padding,
    })
}

impl GotenPlacement {
    pub fn new(servers: Arc<Mutex<Servers>>) -> GotenPlacement {
        GotenPlacement {
            servers,
            mode: Mode::Eval,
            linear_saved: HashMap::new(),
            input_layers: Vec::new(),
            failure: None,
        }
    }

    fn servers(&self) -> MutexGuard<'_, Servers> {
        lock(&self.servers)
    }

    /// The failure `begin_pass` could not return.
    fn check_failure(&mut self) -> PlacementResult<()> {
        self.failure.take().map_or(Ok(()), Err)
    }

    fn note_input(&mut self, layer: &str, is_input: bool) {
        if is_input && !self.input_layers.iter().any(|l| l == layer) {
            self.input_layers.push(layer.to_string());
        }
    }

    fn is_input(&self, layer: &str) -> bool {
        self.input_layers.iter().any(|l| l == layer)
    }
}

impl Placement for GotenPlacement {
    fn begin_pass(&mut self, pass: &PassInfo) {
        self.mode = pass.mode;
        // Offline mode: server 2's products for this pass, from the last pass's schedule. A
        // failure here leaves the pass to run them online (and the next call to report it).
        let prepared = self.servers().prepare();
        if let Err(e) = prepared {
            self.failure = Some(e);
        }
    }

    fn retained_bytes(&self) -> usize {
        self.linear_saved.values().map(|(x, w)| (x.values.len() + w.values.len()) * 8).sum()
    }

    fn conv_forward(
        &mut self,
        layer: &str,
        is_input: bool,
        conv: &Conv2d,
        x: &Tensor,
        mode: Mode,
    ) -> PlacementResult<(Tensor, Saved)> {
        self.check_failure()?;
        self.note_input(layer, is_input);
        let shape = conv_shape(conv, x.shape())?;
        let mut servers = self.servers();
        let qx = servers.quantise(data(x), &format!("{layer} input"))?;
        let qw = servers.quantise(data(&conv.weight), &format!("{layer} weights"))?;
        let mut y = servers.outsource(layer, Op::ConvForward(shape), &qx, &qw)?;
        drop(servers);
        add_bias(&mut y, conv.bias.as_ref(), shape.out_channels, shape.out_height() * shape.out_width());
        let out = from_vec(&[shape.batch, shape.out_channels, shape.out_height(), shape.out_width()], y);
        let saved = match mode {
            Mode::Train => {
                let [xv, xe] = keep(&qx);
                let [wv, we] = keep(&qw);
                let dims = from_vec(&[4], x.shape().iter().map(|&d| d as f32).collect());
                Saved::Tensors(vec![xv, xe, wv, we, dims])
            }
            Mode::Eval => Saved::Nothing,
        };
        Ok((out, saved))
    }

    fn conv_backward(
        &mut self,
        layer: &str,
        conv: &Conv2d,
        saved: Saved,
        dy: &Tensor,
    ) -> PlacementResult<(Tensor, Vec<Tensor>)> {
        let Saved::Tensors(t) = saved else {
            return Err(format!("{layer}: expected goten's saved context, found {saved:?}"));
        };
        let [xv, xe, wv, we, dims] = t.as_slice() else {
            return Err(format!("{layer}: goten's saved context holds {} tensors", t.len()));
        };
        let (qx, qw) = (restore(xv, xe), restore(wv, we));
        let x_shape: Vec<usize> = data(dims).iter().map(|&d| d as usize).collect();
        let shape = conv_shape(conv, &x_shape)?;
        if dy.shape() != [shape.batch, shape.out_channels, shape.out_height(), shape.out_width()] {
            return Err(format!("{layer}: output gradient {:?} for an input of {x_shape:?}", dy.shape()));
        }
        let ws = conv.weight.shape();
        let mut servers = self.servers();
        let qdy = servers.quantise(data(dy), &format!("{layer} output gradient"))?;
        let dw = servers.outsource(layer, Op::ConvWeightGrad(shape), &qx, &qdy)?;
        let dx = if self.is_input(layer) {
            vec![0.0; shape.input_len()]
        } else {
            servers.outsource(layer, Op::ConvInputGrad(shape), &qdy, &qw)?
        };
        drop(servers);
        let mut grads = vec![from_vec(ws, dw)];
        if conv.bias.is_some() {
            grads.push(bias_gradient(dy, ws[0]));
        }
        Ok((from_vec(&[shape.batch, shape.in_channels, shape.height, shape.width], dx), grads))
    }

    fn linear_forward(&mut self, layer: &str, is_input: bool, lin: &Linear, x: &Tensor) -> PlacementResult<Tensor> {
        self.check_failure()?;
        self.note_input(layer, is_input);
        let (n, k, m) = (x.shape()[0], x.len() / x.shape()[0].max(1), lin.weight.shape()[0]);
        if lin.weight.shape() != [m, k] {
            return Err(format!("{layer}: input of {k} features for weights {:?}", lin.weight.shape()));
        }
        let mut servers = self.servers();
        let qx = servers.quantise(data(x), &format!("{layer} input"))?;
        let qw = servers.quantise(data(&lin.weight), &format!("{layer} weights"))?;
        let mut y = servers.outsource(layer, Op::LinearForward { n, k, m }, &qx, &qw)?;
        drop(servers);
        add_bias(&mut y, lin.bias.as_ref(), m, 1);
        if self.mode == Mode::Train {
            self.linear_saved.insert(layer.to_string(), (qx, qw));
        }
        Ok(from_vec(&[n, m], y))
    }

    fn linear_backward(
        &mut self,
        layer: &str,
        lin: &Linear,
        x: &Tensor,
        dy: &Tensor,
    ) -> PlacementResult<(Tensor, Vec<Tensor>)> {
        let (n, k, m) = (x.shape()[0], x.len() / x.shape()[0].max(1), lin.weight.shape()[0]);
        let saved = self.linear_saved.remove(layer);
        let mut servers = self.servers();
        let (qx, qw) = match saved {
            Some(s) => s,
            None => (
                servers.quantise(data(x), &format!("{layer} input"))?,
                servers.quantise(data(&lin.weight), &format!("{layer} weights"))?,
            ),
        };
        let qdy = servers.quantise(data(dy), &format!("{layer} output gradient"))?;
        let dw = servers.outsource(layer, Op::LinearWeightGrad { n, k, m }, &qdy, &qx)?;
        let dx = if self.is_input(layer) {
            vec![0.0; n * k]
        } else {
            servers.outsource(layer, Op::LinearInputGrad { n, k, m }, &qdy, &qw)?
        };
        drop(servers);
        let mut grads = vec![from_vec(&[m, k], dw)];
        if lin.bias.is_some() {
            grads.push(bias_gradient(dy, m));
        }
        Ok((from_vec(x.shape(), dx), grads))
    }

    fn report(&self) -> PlacementReport {
        let s = self.servers();
        let mut counters = std::collections::BTreeMap::new();
        counters.insert("products".to_string(), s.ops);
        counters.insert("recomputed after a field wrap".to_string(), s.recomputed);
        if let Some(o) = &s.offline {
            counters.insert("made offline".to_string(), o.precomputed);
            counters.insert("run online for want of an offline product".to_string(), o.online);
            counters.insert("offline storage, peak bytes".to_string(), o.peak_stored_bytes);
        }
        PlacementReport {
            enclave_macs: s.enclave_macs,
            device_macs: s.device_macs,
            enclave_phase_seconds: s.phases.iter().map(|(k, v)| (k.to_string(), *v)).collect(),
            counters,
            ..Default::default()
        }
    }
}
