//! Optimizers (SGD with momentum, Adam) and learning-rate schedules, PyTorch semantics.
//!
//! Global gradient-norm clipping (`--max-grad-norm`, [`Optimizer::clip_gradients`]) is applied by
//! whoever runs the step, before the update. Without it a layer's parameters can be updated as soon
//! as its gradient exists ([`Optimizer::begin_step`], [`Optimizer::update`]), while weight and
//! gradient are still in cache; with it, [`Optimizer::step`] updates them all after the backward pass.
//!
//! Tried and dropped:
//! - Updating the parameters last to first, so that the update starts on the gradients the
//!   finiteness check has just left in cache: no different in five alternated runs (2026-12-02).
//! - Completing each AsymML weight gradient inside the optimizer (its low-rank terms added to a 128
//!   KiB block just before the block's update): 14.4% of the best VGG16 row's profile against 14.0%
//!   with the two apart, the expansion being bound by its arithmetic (2026-12-02); handing each
//!   finished block straight to the update: the same as updating each layer after its backward
//!   (108-112 against 109-110 ms) (2026-12-03).

use crate::tensor::{data, data_mut, zeros, Tensor};
use serde::{Deserialize, Serialize};
use trustsplit_kernels::elementwise::{all_finite, sum_f64_of};

/// Which update rule, with its hyper-parameters.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum OptimizerKind {
    Sgd { momentum: f32, nesterov: bool },
    Adam { beta1: f32, beta2: f32, eps: f32 },
}

impl OptimizerKind {
    /// Names of the per-parameter state slots (saved in checkpoints).
    pub fn slots(&self) -> &'static [&'static str] {
        match self {
            OptimizerKind::Sgd { .. } => &["momentum"],
            OptimizerKind::Adam { .. } => &["exp_avg", "exp_avg_sq"],
        }
    }
}

/// An optimizer with its per-parameter state.
pub struct Optimizer {
    pub kind: OptimizerKind,
    /// L2 penalty added to the gradient (PyTorch's `weight_decay`).
    pub weight_decay: f32,
    /// Bound on the global L2 norm of all gradients of a step, applied before the update by
    /// whoever runs the step ([`Optimizer::clip_gradients`]); `None`: no clipping.
    pub max_grad_norm: Option<f32>,
    /// `state[slot][param]`, created on the first step.
    pub state: Vec<Vec<Tensor>>,
    /// Updates applied so far (Adam's bias correction needs it).
    pub steps: u64,
}

impl Optimizer {
    pub fn new(kind: OptimizerKind, weight_decay: f32) -> Self {
        Optimizer { kind, weight_decay, max_grad_norm: None, state: Vec::new(), steps: 0 }
    }

    /// The same, clipping each step's gradients to global L2 norm `max` where given.
    pub fn with_max_grad_norm(mut self, max: Option<f32>) -> Self {
        self.max_grad_norm = max;
        self
    }

    /// Scales `grads` down to the global norm bound where one is set and exceeded
    /// ([`clip_grad_norm`]); returns their norm before, where a bound is set.
    pub fn clip_gradients(&self, grads: &mut [Tensor]) -> Option<f64> {
        self.max_grad_norm.map(|max| clip_grad_norm(grads, f64::from(max)))
    }

    /// Applies one update with learning rate `lr`. A gradient holding NaN or infinite values is
    /// refused with `Err(index)` of its parameter before anything changes: the parameters and the
    /// optimizer's state are left as they were (one read-only pass over the gradients first).
    pub fn step(&mut self, params: Vec<&mut Tensor>, grads: &[Tensor], lr: f32) -> Result<(), usize> {
        self.step_known_finite(params, grads, &[], lr)
    }

    /// [`Optimizer::step`], skipping the check of gradient `i` where `known_finite[i]`: whoever
    /// made it checked it already (for AsymML's weight-sized convolution gradients, that pass
    /// over memory was 3% of a VGG16 step). `known_finite` is empty or one flag per gradient.
    pub fn step_known_finite(
        &mut self,
        mut params: Vec<&mut Tensor>,
        grads: &[Tensor],
        known_finite: &[bool],
        lr: f32,
    ) -> Result<(), usize> {
        assert_eq!(params.len(), grads.len(), "optimizer: one gradient per parameter");
        assert!(known_finite.is_empty() || known_finite.len() == grads.len(), "optimizer: one flag per gradient");
        if let Some(i) = first_non_finite(grads, known_finite) {
            return Err(i);
        }
        let shapes: Vec<&[usize]> = params.iter().map(|p| p.shape()).collect();
        self.begin_step(&shapes);
        for (i, (p, g)) in params.iter_mut().zip(grads).enumerate() {
            self.update(i, p, g, lr);
        }
        Ok(())
    }

    /// Whether a step may update each parameter on its own, as soon as its gradient is known
    /// ([`Optimizer::begin_step`], then [`Optimizer::update`] per parameter): yes unless the
    /// gradients are clipped to a global norm, which needs all of them first.
    pub fn updates_each_parameter_alone(&self) -> bool {
        self.max_grad_norm.is_none()
    }

    /// Starts a step whose parameters will be updated one at a time by [`Optimizer::update`]:
    /// counts the step and, on the first one, creates the state for parameters of these shapes
    /// (all of them, in order).
    pub fn begin_step(&mut self, shapes: &[&[usize]]) {
        if self.state.is_empty() {
            self.state = self.kind.slots().iter().map(|_| shapes.iter().map(|s| zeros(s)).collect()).collect();
        }
        assert_eq!(self.state[0].len(), shapes.len(), "optimizer: state for a different parameter count");
        self.steps += 1;
    }

    /// Updates parameter `index` (in [`Optimizer::begin_step`]'s order) with its gradient `g`,
    /// which the caller has checked is finite.
    pub fn update(&mut self, index: usize, p: &mut Tensor, g: &Tensor, lr: f32) {
        assert_eq!(p.shape(), g.shape(), "optimizer: gradient shape");
        let wd = self.weight_decay;
        let (p, g) = (data_mut(p), data(g));
        match self.kind {
            OptimizerKind::Sgd { momentum, nesterov } => {
                sgd_update(p, g, data_mut(&mut self.state[0][index]), [lr, momentum, wd], nesterov)
            }
            OptimizerKind::Adam { beta1, beta2, eps } => {
                let (m_slot, v_slot) = self.state.split_at_mut(1);
                let (m, v) = (data_mut(&mut m_slot[0][index]), data_mut(&mut v_slot[0][index]));
                let c1 = 1.0 - beta1.powi(self.steps as i32);
                let c2 = 1.0 - beta2.powi(self.steps as i32);
                for (((w, &gr), m), v) in p.iter_mut().zip(g).zip(m.iter_mut()).zip(v.iter_mut()) {
                    let d = gr + wd * *w;
                    *m = beta1 * *m + (1.0 - beta1) * d;
                    *v = beta2 * *v + (1.0 - beta2) * d * d;
                    *w -= lr * (*m / c1) / ((*v / c2).sqrt() + eps);
                }
            }
        }
    }
}

/// The first gradient holding NaN or infinite values, skipping those flagged `known_finite`
/// (empty or one flag per gradient: whoever made them checked them already).
pub fn first_non_finite(grads: &[Tensor], known_finite: &[bool]) -> Option<usize> {
    let checked = |i: usize| known_finite.get(i).copied().unwrap_or(false);
    grads.iter().enumerate().position(|(i, g)| !checked(i) && !all_finite(data(g)))
}

trustsplit_kernels::simd::multiversion! {
    /// One SGD step over a parameter: `d = g + wd w`, `b = momentum b + d`, `w -= lr b` (or
    /// `lr (d + momentum b)` with Nesterov); `h` is `[lr, momentum, wd]`.
    fn sgd_update(w: &mut [f32], g: &[f32], b: &mut [f32], h: [f32; 3], nesterov: bool) {
        let [lr, momentum, wd] = h;
        for ((w, &gr), b) in w.iter_mut().zip(g).zip(b.iter_mut()) {
            let d = gr + wd * *w;
            *b = momentum * *b + d;
            let step = if nesterov { d + momentum * *b } else { *b };
            *w -= lr * step;
        }
    }
}

/// Scales all `grads` by one factor so that their global L2 norm (over every value of every
/// tensor, summed in f64) is at most `max`, as PyTorch's `clip_grad_norm_` does (factor
/// `max / (norm + 1e-6)`); returns the norm before. Gradients within the bound are left as they
/// are, and so are non-finite ones (the step's loss check or the next one catches those).
pub fn clip_grad_norm(grads: &mut [Tensor], max: f64) -> f64 {
    let norm = grads.iter().map(|g| sum_f64_of(data(g), |v| v * v)).sum::<f64>().sqrt();
    if norm.is_finite() && norm > max {
        let scale = (max / (norm + 1e-6)) as f32;
        for g in grads.iter_mut() {
            data_mut(g).iter_mut().for_each(|v| *v *= scale);
        }
    }
    norm
}

/// How the learning rate changes over training.
#[derive(Clone, Copy, Debug, PartialEq, Serialize, Deserialize)]
#[serde(tag = "kind", rename_all = "lowercase")]
pub enum Schedule {
    Constant,
    /// Multiply by `gamma` every `every` epochs.
    Step {
        every: usize,
        gamma: f32,
    },
    /// Cosine decay from the base rate to 0 over `epochs`, updated every step.
    Cosine {
        epochs: usize,
    },
}

impl Schedule {
    /// The rate at `progress` epochs into training (fractional within an epoch).
    pub fn lr(&self, base: f32, progress: f64) -> f32 {
        match *self {
            Schedule::Constant => base,
            Schedule::Step { every, gamma } => base * gamma.powi((progress as usize / every.max(1)) as i32),
            Schedule::Cosine { epochs } => {
                let t = (progress / epochs.max(1) as f64).clamp(0.0, 1.0);
                (base as f64 * 0.5 * (1.0 + (std::f64::consts::PI * t).cos())) as f32
            }
        }
    }
}
