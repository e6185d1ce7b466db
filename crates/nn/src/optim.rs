//! Optimizers (SGD with momentum, Adam) and learning-rate schedules, PyTorch semantics.

use crate::tensor::{data, data_mut, zeros, Tensor};
use serde::{Deserialize, Serialize};

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
    /// `state[slot][param]`, created on the first step.
    pub state: Vec<Vec<Tensor>>,
    /// Updates applied so far (Adam's bias correction needs it).
    pub steps: u64,
}

impl Optimizer {
    pub fn new(kind: OptimizerKind, weight_decay: f32) -> Self {
        Optimizer { kind, weight_decay, state: Vec::new(), steps: 0 }
    }

    /// Applies one update with learning rate `lr`.
    pub fn step(&mut self, params: Vec<&mut Tensor>, grads: &[Tensor], lr: f32) {
        assert_eq!(params.len(), grads.len(), "optimizer: one gradient per parameter");
        if self.state.is_empty() {
            self.state = self.kind.slots().iter().map(|_| params.iter().map(|p| zeros(p.shape())).collect()).collect();
        }
        self.steps += 1;
        let wd = self.weight_decay;
        for (i, (p, g)) in params.into_iter().zip(grads).enumerate() {
            assert_eq!(p.shape(), g.shape(), "optimizer: gradient shape");
            let (p, g) = (data_mut(p), data(g));
            match self.kind {
                OptimizerKind::Sgd { momentum, nesterov } => {
                    sgd_update(p, g, data_mut(&mut self.state[0][i]), [lr, momentum, wd], nesterov);
                }
                OptimizerKind::Adam { beta1, beta2, eps } => {
                    let (m_slot, v_slot) = self.state.split_at_mut(1);
                    let (m, v) = (data_mut(&mut m_slot[0][i]), data_mut(&mut v_slot[0][i]));
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
