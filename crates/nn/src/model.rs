//! A model: a validated sequence of layers ending in class logits.

use crate::layers::{backward_all, forward_all, macs_through, shape_through, Layer, Mode, Saved};
use crate::tensor::Tensor;

/// A sequential model whose output is `batch x num_classes` logits.
#[derive(Clone, Debug)]
pub struct Model {
    /// The zoo name (`lenet5`, `vgg16-bn`, ...).
    pub name: String,
    /// Input shape of one sample, `C x H x W`.
    pub input_shape: Vec<usize>,
    pub num_classes: usize,
    pub layers: Vec<Layer>,
}

impl Model {
    /// Checks that the layers chain from `input_shape` to `num_classes` logits.
    pub fn new(name: &str, input_shape: &[usize], layers: Vec<Layer>) -> Result<Model, String> {
        let out = shape_through(&layers, input_shape).map_err(|e| format!("model {name}: {e}"))?;
        if out.len() != 1 {
            return Err(format!("model {name}: output shape {out:?} is not a vector of logits"));
        }
        Ok(Model { name: name.to_string(), input_shape: input_shape.to_vec(), num_classes: out[0], layers })
    }

    /// Checks a batch's shape against the model's input shape.
    pub fn check_input(&self, x: &Tensor) -> Result<(), String> {
        if x.ndim() != self.input_shape.len() + 1 || x.shape()[1..] != self.input_shape[..] {
            return Err(format!(
                "model {} expects inputs of shape N x {:?}, got {:?}",
                self.name,
                self.input_shape,
                x.shape()
            ));
        }
        if x.iter().any(|v| !v.is_finite()) {
            return Err("input batch contains NaN or infinite values".into());
        }
        Ok(())
    }

    /// Logits for a batch, and (in training mode) the contexts the backward pass needs.
    pub fn forward(&mut self, x: &Tensor, mode: Mode) -> Result<(Tensor, Vec<Saved>), String> {
        self.check_input(x)?;
        Ok(forward_all(&mut self.layers, x, mode))
    }

    /// Parameter gradients (in `named_params` order) from the gradient of the logits.
    pub fn backward(&self, dlogits: &Tensor, saved: Vec<Saved>) -> Vec<Tensor> {
        backward_all(&self.layers, dlogits, saved).1
    }

    /// Trainable parameters named `layers.{i}.{name}`.
    pub fn named_params(&self) -> Vec<(String, &Tensor)> {
        self.named(Layer::named_params)
    }

    pub fn params_mut(&mut self) -> Vec<&mut Tensor> {
        self.layers.iter_mut().flat_map(Layer::params_mut).collect()
    }

    /// For each parameter, in the order of [`Model::params_mut`], whether it is a convolution's
    /// weight.
    pub fn conv_weight_flags(&self) -> Vec<bool> {
        self.layers.iter().flat_map(Layer::conv_weight_flags).collect()
    }

    /// Batch-norm running statistics named `layers.{i}.{name}`.
    pub fn named_buffers(&self) -> Vec<(String, &Tensor)> {
        self.named(Layer::named_buffers)
    }

    pub fn buffers_mut(&mut self) -> Vec<&mut Tensor> {
        self.layers.iter_mut().flat_map(Layer::buffers_mut).collect()
    }

    fn named<'a>(&'a self, f: impl Fn(&'a Layer) -> Vec<(String, &'a Tensor)>) -> Vec<(String, &'a Tensor)> {
        self.layers
            .iter()
            .enumerate()
            .flat_map(|(i, l)| f(l).into_iter().map(move |(n, t)| (format!("layers.{i}.{n}"), t)))
            .collect()
    }

    /// Number of trainable scalars.
    pub fn num_params(&self) -> usize {
        self.named_params().iter().map(|(_, t)| t.len()).sum()
    }

    /// Forward multiply-adds for one sample (convolutions and linear layers).
    pub fn forward_macs_per_sample(&self) -> u64 {
        macs_through(&self.layers, &self.input_shape)
    }
}
