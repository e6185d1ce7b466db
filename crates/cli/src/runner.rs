//! What runs a scheme's steps: the enclave and its device ([`SplitRunner`]), or three parties
//! holding shares (CryptGPU's [`Session`]), behind one interface for `train`, `eval` and `bench`.

use std::sync::Arc;
use std::time::Instant;
use trustsplit_boundary::{Secret, Transcript};
use trustsplit_cryptgpu::session::{PartyStats, Session};
use trustsplit_nn::optim::Optimizer;
use trustsplit_nn::{Model, Tensor};
use trustsplit_schemes::{RunnerError, SchemeReport, SplitRunner, StepOutput};

#[allow(clippy::large_enum_variant)] // one per run; boxing buys nothing
pub enum Runner {
    Split(SplitRunner),
    Parties(PartyRunner),
}

/// The data owner's side of a three-party scheme, with the counters a report needs.
pub struct PartyRunner {
    pub scheme: &'static str,
    pub session: Session,
    pub transcript: Arc<Transcript>,
    steps: u64,
    seconds: f64,
    /// The parties' traffic, added up over the calls to [`Runner::party_stats`].
    traffic: Vec<PartyStats>,
}

impl PartyRunner {
    pub fn new(scheme: &'static str, session: Session, transcript: Arc<Transcript>) -> PartyRunner {
        PartyRunner { scheme, session, transcript, steps: 0, seconds: 0.0, traffic: Vec::new() }
    }
}

/// Mean cross-entropy and correct predictions of logits `[n, classes]` (the owner's bookkeeping).
fn score(logits: &[f32], classes: usize, labels: &[usize]) -> StepOutput {
    let (mut loss, mut correct) = (0.0f64, 0);
    for (row, &label) in logits.chunks(classes).zip(labels) {
        let max = row.iter().copied().fold(f32::NEG_INFINITY, f32::max) as f64;
        let sum: f64 = row.iter().map(|&v| (v as f64 - max).exp()).sum();
        loss += max + sum.ln() - row[label] as f64;
        let best = row.iter().enumerate().fold(0, |b, (i, &v)| if v > row[b] { i } else { b });
        correct += usize::from(best == label);
    }
    StepOutput { loss: (loss / labels.len().max(1) as f64) as f32, correct, samples: labels.len() }
}

fn mpc(e: trustsplit_cryptgpu::party::MpcError) -> RunnerError {
    RunnerError::Placement(e.to_string())
}

impl Runner {
    /// One training step on `x` and `labels`; `rows` are the samples' numbers in the training
    /// split, which a run on the parties' uploaded data sends instead of the samples.
    pub fn train_step(
        &mut self,
        model: &mut Model,
        x: Secret<Tensor>,
        labels: &Secret<Vec<usize>>,
        rows: &[usize],
        opt: &mut Optimizer,
        lr: f32,
    ) -> Result<StepOutput, RunnerError> {
        match self {
            Runner::Split(r) => r.train_step(model, x, labels, opt, lr),
            Runner::Parties(p) => {
                model.check_input(x.expose()).map_err(RunnerError::Input)?;
                let started = Instant::now();
                let x = x.expose();
                let logits = if p.session.is_uploaded() {
                    p.session.train_rows(rows, lr as f64)
                } else {
                    p.session.train_step(x.as_slice().expect("contiguous"), x.shape(), labels.expose(), lr as f64)
                }
                .map_err(mpc)?;
                p.seconds += started.elapsed().as_secs_f64();
                p.steps += 1;
                opt.steps += 1;
                let out = score(&logits.values, logits.classes, labels.expose());
                if !out.loss.is_finite() {
                    return Err(RunnerError::Diverged(out.loss));
                }
                Ok(out)
            }
        }
    }

    /// `rows`: the samples' numbers in the test split (see [`Runner::train_step`]).
    pub fn eval_batch(
        &mut self,
        model: &mut Model,
        x: Secret<Tensor>,
        labels: &Secret<Vec<usize>>,
        rows: &[usize],
    ) -> Result<StepOutput, RunnerError> {
        match self {
            Runner::Split(r) => r.eval_batch(model, x, labels),
            Runner::Parties(p) => {
                model.check_input(x.expose()).map_err(RunnerError::Input)?;
                let x = x.expose();
                let logits = if p.session.is_uploaded() {
                    p.session.infer_rows(rows)
                } else {
                    p.session.infer(x.as_slice().expect("contiguous"), x.shape())
                }
                .map_err(mpc)?;
                Ok(score(&logits.values, logits.classes, labels.expose()))
            }
        }
    }

    /// Brings the trained model and its optimizer state to the owner's side before a checkpoint
    /// (the parties' shares, reconstructed; nothing for a split scheme, which trains `model` itself).
    pub fn sync_model(&mut self, model: &mut Model, opt: &mut Optimizer) -> Result<(), RunnerError> {
        match self {
            Runner::Split(_) => Ok(()),
            Runner::Parties(p) => {
                let momentum = p.session.export(model).map_err(mpc)?;
                if !opt.kind.slots().is_empty() {
                    opt.state = vec![momentum];
                }
                Ok(())
            }
        }
    }

    pub fn report(&self) -> SchemeReport {
        match self {
            Runner::Split(r) => r.report(),
            Runner::Parties(p) => SchemeReport {
                scheme: p.scheme,
                steps: p.steps,
                enclave_seconds: 0.0,
                device_seconds: 0.0,
                device_bytes_sent: 0,
                device_bytes_received: 0,
                memory: None,
                transcript: p.transcript.summary(),
                placement: Default::default(),
            },
        }
    }

    /// Wall seconds of the parties' training steps so far (`None` for a split scheme).
    pub fn party_seconds(&self) -> Option<f64> {
        match self {
            Runner::Split(_) => None,
            Runner::Parties(p) => Some(p.seconds),
        }
    }

    /// Each party's traffic since the run began (`None` for a split scheme).
    pub fn party_stats(&mut self) -> Result<Option<Vec<PartyStats>>, RunnerError> {
        let Runner::Parties(p) = self else { return Ok(None) };
        let new = p.session.stats().map_err(mpc)?;
        if p.traffic.is_empty() {
            p.traffic = new;
        } else {
            for (acc, s) in p.traffic.iter_mut().zip(new) {
                acc.total.add(&s.total);
                for (layer, protocol, t) in s.by_layer {
                    match acc.by_layer.iter_mut().find(|(l, q, _)| *l == layer && *q == protocol) {
                        Some(entry) => entry.2.add(&t),
                        None => acc.by_layer.push((layer, protocol, t)),
                    }
                }
            }
        }
        Ok(Some(p.traffic.clone()))
    }

    pub fn transcript(&self) -> &Arc<Transcript> {
        match self {
            Runner::Split(r) => r.transcript(),
            Runner::Parties(p) => &p.transcript,
        }
    }

    pub fn reset_peak(&mut self) {
        if let Runner::Split(r) = self {
            r.reset_peak()
        }
    }
}
