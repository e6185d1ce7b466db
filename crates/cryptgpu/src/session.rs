//! The data owner and the three parties: the owner shares the model and each batch, the parties
//! train or infer on shares, and only the owner ever sees a reconstructed value (the logits, to
//! report loss and accuracy, and the trained model).
//!
//! The owner talks to each party over its own link: in memory for a one-process run
//! ([`Session::local`]), the authenticated, encrypted link for parties in other processes. A
//! party that fails tells the owner why before it closes its links; the other parties then see
//! their link to it close, and stop.

use crate::arith::{self, AShare};
use crate::model::{self, SecureModel, Sgd, Spec};
use crate::party::{local_links, MpcError, Party, Traffic};
use crate::prg::Prg;
use crate::ring::FixedPoint;
use serde::{Deserialize, Serialize};
use std::thread::JoinHandle;
use trustsplit_boundary::{Channel, ChannelOptions, InProcessChannel};
use trustsplit_nn::{Model, Tensor};

/// Owner-to-party commands and their answers.
mod cmd {
    pub const SETUP: u16 = 0x4781;
    pub const TRAIN: u16 = 0x4782;
    pub const EVAL: u16 = 0x4783;
    pub const EXPORT: u16 = 0x4784;
    pub const STATS: u16 = 0x4785;
    pub const STOP: u16 = 0x4786;
    pub const LOGITS: u16 = 0x4791;
    pub const PARAMS: u16 = 0x4792;
    pub const STATS_REPLY: u16 = 0x4793;
    pub const FAILED: u16 = 0x47ff;
}

/// What a party is told before its first batch.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Setup {
    pub specs: Vec<Spec>,
    pub frac_bits: u32,
    pub classes: usize,
    pub sgd: Sgd,
    /// Whether the parameters' shares are followed by momentum buffers' (a resumed run).
    #[serde(default)]
    pub momentum_state: bool,
    /// ReLU zeroes inputs at or above this ([`SecureModel::activation_bound`]).
    #[serde(default = "default_bound")]
    pub activation_bound: f64,
}

fn default_bound() -> f64 {
    model::DEFAULT_ACTIVATION_BOUND
}

/// The public settings of a run the data owner gives the parties.
#[derive(Clone, Copy, Debug)]
pub struct RunSettings {
    pub fp: FixedPoint,
    pub sgd: Sgd,
    pub activation_bound: f64,
}

/// One party's traffic over a run: totals and by layer and protocol.
#[derive(Clone, Debug, Default, Serialize, Deserialize)]
pub struct PartyStats {
    pub party: usize,
    pub total: Traffic,
    /// `(layer, protocol, traffic)`: layers are numbered as in the model (`3`, `5.main.0`);
    /// `sgd` is the optimizer.
    pub by_layer: Vec<(String, String, Traffic)>,
}

fn to_bytes(values: &[u64]) -> Vec<u8> {
    bytemuck::cast_slice(values).to_vec()
}

fn to_ring(bytes: &[u8]) -> Vec<u64> {
    let n = bytes.len() / 8;
    let mut out = vec![0u64; n];
    bytemuck::cast_slice_mut::<u64, u8>(&mut out).copy_from_slice(&bytes[..n * 8]);
    out
}

/// A share as it travels from the owner: shape, then `cur`, then `prev`.
fn encode_share(s: &AShare, out: &mut Vec<u64>) {
    out.push(s.shape.len() as u64);
    out.extend(s.shape.iter().map(|&d| d as u64));
    out.extend_from_slice(&s.cur);
    out.extend_from_slice(&s.prev);
}

fn decode_share(words: &[u64], at: &mut usize) -> Result<AShare, String> {
    let ndim = *words.get(*at).ok_or("truncated share")? as usize;
    if ndim > 8 {
        return Err(format!("share with {ndim} dimensions"));
    }
    let shape: Vec<usize> =
        words.get(*at + 1..*at + 1 + ndim).ok_or("truncated shape")?.iter().map(|&d| d as usize).collect();
    let n = shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d)).ok_or("share too large")?;
    let start = *at + 1 + ndim;
    let end = start.checked_add(2 * n).filter(|&e| e <= words.len()).ok_or("truncated share values")?;
    *at = end;
    Ok(AShare { shape, cur: words[start..start + n].to_vec(), prev: words[start + n..end].to_vec() })
}

/// Runs one party for the owner until it says stop (or its link closes).
pub fn serve(mut party: Party, owner: &mut dyn Channel) -> Result<(), MpcError> {
    let id = party.id;
    let owner_err = |source| MpcError::Link { party: id, peer: 3, source };
    let result = (|| -> Result<(), MpcError> {
        let setup = owner.recv_tag(cmd::SETUP).map_err(owner_err)?;
        let setup: Setup = serde_json::from_slice(&setup)
            .map_err(|e| MpcError::Invalid(format!("party {id}: the owner's setup is malformed: {e}")))?;
        party.fp = FixedPoint::new(setup.frac_bits).map_err(MpcError::Invalid)?;
        let words = to_ring(&owner.recv_tag(cmd::PARAMS).map_err(owner_err)?);
        let mut at = 0;
        let count = model::param_shapes(&setup.specs).len();
        let shares = if setup.momentum_state { 2 * count } else { count };
        let mut params = Vec::new();
        for _ in 0..shares {
            params.push(decode_share(&words, &mut at).map_err(|e| MpcError::Invalid(format!("party {id}: {e}")))?);
        }
        let velocity = params.split_off(count);
        if !(setup.activation_bound.is_finite() && setup.activation_bound > 0.0) {
            return Err(MpcError::Invalid(format!(
                "party {id}: activation bound {} is not positive",
                setup.activation_bound
            )));
        }
        let mut net = SecureModel::new(setup.specs.clone(), params)?;
        net.activation_bound = setup.activation_bound;
        if setup.momentum_state {
            net = net.with_velocity(velocity)?;
        }
        loop {
            let frame = owner.recv().map_err(owner_err)?;
            match frame.tag {
                cmd::TRAIN => {
                    let words = to_ring(&frame.payload);
                    let mut at = 0;
                    let bad = |e: String| MpcError::Invalid(format!("party {id}: malformed batch: {e}"));
                    let x = decode_share(&words, &mut at).map_err(bad)?;
                    let y = decode_share(&words, &mut at).map_err(bad)?;
                    let lr = f64::from_bits(*words.get(at).ok_or_else(|| bad("no learning rate".into()))?);
                    let (logits, saved) = net.forward(&mut party, x, true)?;
                    owner.send(cmd::LOGITS, &to_bytes(&logits.cur)).map_err(owner_err)?;
                    party.set_scope("loss");
                    let dlogits = party.cross_entropy_grad(&logits, &y)?;
                    let grads = net.backward(&mut party, dlogits, saved)?;
                    net.update(&mut party, grads, Sgd { lr, ..setup.sgd })?;
                }
                cmd::EVAL => {
                    let words = to_ring(&frame.payload);
                    let x = decode_share(&words, &mut 0)
                        .map_err(|e| MpcError::Invalid(format!("party {id}: malformed batch: {e}")))?;
                    let (logits, _) = net.forward(&mut party, x, false)?;
                    owner.send(cmd::LOGITS, &to_bytes(&logits.cur)).map_err(owner_err)?;
                }
                cmd::EXPORT => {
                    let velocity = net.velocity();
                    let cur: Vec<u64> =
                        net.params.iter().chain(&velocity).flat_map(|p| p.cur.iter().copied()).collect();
                    owner.send(cmd::PARAMS, &to_bytes(&cur)).map_err(owner_err)?;
                }
                cmd::STATS => {
                    let stats = PartyStats {
                        party: id,
                        total: party.total_traffic(),
                        by_layer: party.traffic().iter().map(|((l, p), t)| (l.clone(), p.to_string(), *t)).collect(),
                    };
                    owner
                        .send(cmd::STATS_REPLY, &serde_json::to_vec(&stats).expect("serialises"))
                        .map_err(owner_err)?;
                    party.reset_traffic();
                }
                cmd::STOP => return Ok(()),
                other => {
                    return Err(MpcError::Invalid(format!("party {id}: unknown command {other:#x} from the owner")))
                }
            }
        }
    })();
    if let Err(e) = &result {
        // Tell the owner why; the other parties learn of it when their links to this one close.
        let _ = owner.send(cmd::FAILED, e.to_string().as_bytes());
    }
    result
}

/// The data owner's side of a three-party run.
pub struct Session {
    parties: Vec<Box<dyn Channel>>,
    threads: Vec<JoinHandle<Result<(), MpcError>>>,
    fp: FixedPoint,
    classes: usize,
    specs: Vec<Spec>,
    /// Whether the parties were told to stop.
    stopped: bool,
}

/// A batch's logits, reconstructed by the owner.
pub struct Logits {
    pub values: Vec<f32>,
    pub classes: usize,
}

impl Session {
    /// Three parties as threads of this process, on in-memory links, holding shares of `model`.
    /// `momentum`: the momentum buffers to resume from, in the model's parameter order.
    pub fn local(model: &Model, momentum: Option<&[Tensor]>, settings: RunSettings) -> Result<Session, MpcError> {
        let fp = settings.fp;
        let opts = ChannelOptions { max_frame_bytes: 1 << 31, timeout: None };
        let mut owner_ends: Vec<Box<dyn Channel>> = Vec::new();
        let mut threads = Vec::new();
        for (id, (next, prev)) in local_links().into_iter().enumerate() {
            let (mine, theirs) = InProcessChannel::pair(opts);
            owner_ends.push(Box::new(mine));
            let handle = std::thread::Builder::new()
                .name(format!("cryptgpu party {id}"))
                .spawn(move || {
                    let mut owner: Box<dyn Channel> = Box::new(theirs);
                    let party = Party::connect(id, next, prev, fp)?;
                    serve(party, owner.as_mut())
                })
                .map_err(|e| MpcError::Invalid(format!("cannot start party {id}: {e}")))?;
            threads.push(handle);
        }
        Session::start(owner_ends, threads, model, momentum, settings)
    }

    /// Shares `model` into parties reached over `links` (party 0, 1, 2 in order).
    pub fn start(
        mut parties: Vec<Box<dyn Channel>>,
        threads: Vec<JoinHandle<Result<(), MpcError>>>,
        model: &Model,
        momentum: Option<&[Tensor]>,
        settings: RunSettings,
    ) -> Result<Session, MpcError> {
        let RunSettings { fp, sgd, activation_bound } = settings;
        let specs = model::specs_of(&model.layers);
        if momentum.is_some() && model::has_batch_norm(&specs) {
            return Err(MpcError::Invalid("cannot resume training a model with batch-norm under cryptgpu".into()));
        }
        let setup = Setup {
            specs: specs.clone(),
            frac_bits: fp.frac_bits,
            classes: model.num_classes,
            sgd,
            momentum_state: momentum.is_some(),
            activation_bound,
        };
        let json = serde_json::to_vec(&setup).expect("serialises");
        for (i, p) in parties.iter_mut().enumerate() {
            p.send(cmd::SETUP, &json).map_err(|source| MpcError::Link { party: 3, peer: i, source })?;
        }
        let mut session = Session { parties, threads, fp, classes: model.num_classes, specs, stopped: false };
        session.share_params(model, momentum)?;
        Ok(session)
    }

    fn share_params(&mut self, model: &Model, momentum: Option<&[Tensor]>) -> Result<(), MpcError> {
        let mut shapes = model::param_shapes(&self.specs);
        let mut values = model::plain_params(model);
        if let Some(m) = momentum {
            if m.len() != values.len() {
                return Err(MpcError::Invalid("the momentum buffers do not match the model".into()));
            }
            shapes.extend(m.iter().map(|t| t.shape().to_vec()));
            values.extend(m.iter().map(|t| t.iter().copied().collect::<Vec<f32>>()));
        }
        let mut words: [Vec<u64>; 3] = Default::default();
        let mut rng = Prg::from_key(Prg::os_key().map_err(MpcError::Invalid)?);
        for (values, shape) in values.iter().zip(&shapes) {
            let ring = self.fp.encode_all(values).map_err(MpcError::Invalid)?;
            let parts = arith::split(&ring, &mut rng);
            for (i, w) in words.iter_mut().enumerate() {
                encode_share(&arith::replicated(&parts, i, shape), w);
            }
        }
        for (i, w) in words.iter().enumerate() {
            self.send(i, cmd::PARAMS, &to_bytes(w))?;
        }
        Ok(())
    }

    fn send(&mut self, i: usize, tag: u16, payload: &[u8]) -> Result<(), MpcError> {
        match self.parties[i].send(tag, payload) {
            Ok(()) => Ok(()),
            Err(source) => Err(self.failure(i).unwrap_or(MpcError::Link { party: 3, peer: i, source })),
        }
    }

    /// The reason party `i` gave for failing, if it gave one before its link closed.
    fn failure(&mut self, i: usize) -> Option<MpcError> {
        let f = self.parties[i].recv().ok()?;
        let reason = trustsplit_boundary::printable(&f.payload);
        (f.tag == cmd::FAILED).then(|| MpcError::Invalid(format!("party {i} failed: {reason}")))
    }

    fn recv(&mut self, i: usize, tag: u16) -> Result<Vec<u8>, MpcError> {
        let f = self.parties[i].recv().map_err(|source| MpcError::Link { party: 3, peer: i, source })?;
        if f.tag == cmd::FAILED {
            return Err(MpcError::Invalid(format!("party {i} failed: {}", trustsplit_boundary::printable(&f.payload))));
        }
        if f.tag != tag {
            return Err(MpcError::Invalid(format!("party {i} answered {:#x}, expected {tag:#x}", f.tag)));
        }
        Ok(f.payload)
    }

    /// Shares a batch (`x`: `N x C x H x W`) and, for training, its one-hot labels.
    fn share_batch(&self, x: &[f32], shape: &[usize], labels: Option<&[usize]>) -> Result<[Vec<u64>; 3], MpcError> {
        let mut rng = Prg::from_key(Prg::os_key().map_err(MpcError::Invalid)?);
        let ring = self.fp.encode_all(x).map_err(MpcError::Invalid)?;
        let parts = arith::split(&ring, &mut rng);
        let mut words: [Vec<u64>; 3] = Default::default();
        for (i, w) in words.iter_mut().enumerate() {
            encode_share(&arith::replicated(&parts, i, shape), w);
        }
        if let Some(labels) = labels {
            if let Some(&bad) = labels.iter().find(|&&l| l >= self.classes) {
                return Err(MpcError::Invalid(format!("label {bad} is out of range for {} classes", self.classes)));
            }
            let hot = model::one_hot(labels, self.classes, self.fp);
            let parts = arith::split(&hot, &mut rng);
            for (i, w) in words.iter_mut().enumerate() {
                encode_share(&arith::replicated(&parts, i, &[labels.len(), self.classes]), w);
            }
        }
        Ok(words)
    }

    fn gather_logits(&mut self, n: usize) -> Result<Logits, MpcError> {
        let mut parts = Vec::new();
        for i in 0..3 {
            let p = self.recv(i, cmd::LOGITS)?;
            if p.len() != n * self.classes * 8 {
                return Err(MpcError::Invalid(format!(
                    "party {i} sent {} bytes of logits, expected {}",
                    p.len(),
                    n * self.classes * 8
                )));
            }
            parts.push(to_ring(&p));
        }
        let sum = arith::combine([&parts[0], &parts[1], &parts[2]]);
        Ok(Logits { values: self.fp.decode_all(&sum), classes: self.classes })
    }

    /// One training step: the parties compute the logits, the loss gradient, the gradients and the
    /// update on shares; the owner gets the logits (for loss and accuracy).
    pub fn train_step(&mut self, x: &[f32], shape: &[usize], labels: &[usize], lr: f64) -> Result<Logits, MpcError> {
        let mut words = self.share_batch(x, shape, Some(labels))?;
        for (i, w) in words.iter_mut().enumerate() {
            w.push(lr.to_bits());
            self.send(i, cmd::TRAIN, &to_bytes(w))?;
        }
        self.gather_logits(shape[0])
    }

    /// The logits of a batch, computed on shares.
    pub fn infer(&mut self, x: &[f32], shape: &[usize]) -> Result<Logits, MpcError> {
        let words = self.share_batch(x, shape, None)?;
        for (i, w) in words.iter().enumerate() {
            self.send(i, cmd::EVAL, &to_bytes(w))?;
        }
        self.gather_logits(shape[0])
    }

    /// Reconstructs the trained parameters into `model` and the momentum buffers (in the model's
    /// parameter order), on the owner's side only.
    pub fn export(&mut self, model: &mut Model) -> Result<Vec<Tensor>, MpcError> {
        let mut parts = Vec::new();
        for i in 0..3 {
            self.send(i, cmd::EXPORT, &[])?;
            parts.push(to_ring(&self.recv(i, cmd::PARAMS)?));
        }
        let sum = arith::combine([&parts[0], &parts[1], &parts[2]]);
        let values = self.fp.decode_all(&sum);
        if model::has_batch_norm(&self.specs) {
            return Err(MpcError::Invalid("models with batch-norm are not exported from cryptgpu".into()));
        }
        let total: usize = model.params_mut().iter().map(|p| p.len()).sum();
        if values.len() != 2 * total {
            return Err(MpcError::Invalid("the parties' parameters do not match the model".into()));
        }
        let mut at = 0;
        let mut momentum = Vec::new();
        for p in model.params_mut() {
            let n = p.len();
            p.iter_mut().zip(&values[at..at + n]).for_each(|(d, s)| *d = *s);
            let v = &values[total + at..total + at + n];
            momentum.push(trustsplit_nn::tensor::from_vec(p.shape(), v.to_vec()));
            at += n;
        }
        Ok(momentum)
    }

    /// Each party's traffic since the last call.
    pub fn stats(&mut self) -> Result<Vec<PartyStats>, MpcError> {
        let mut out = Vec::new();
        for i in 0..3 {
            self.send(i, cmd::STATS, &[])?;
            let bytes = self.recv(i, cmd::STATS_REPLY)?;
            out.push(
                serde_json::from_slice(&bytes)
                    .map_err(|e| MpcError::Invalid(format!("party {i}'s statistics: {e}")))?,
            );
        }
        Ok(out)
    }

    /// Stops the parties and waits for their threads.
    pub fn finish(mut self) -> Result<(), MpcError> {
        self.stop();
        for t in std::mem::take(&mut self.threads) {
            t.join().map_err(|_| MpcError::Invalid("a party thread panicked".into()))??;
        }
        Ok(())
    }

    fn stop(&mut self) {
        if !std::mem::replace(&mut self.stopped, true) {
            for p in &mut self.parties {
                let _ = p.send(cmd::STOP, &[]);
            }
        }
    }
}

impl Drop for Session {
    /// Parties in other processes serve until told to stop: without this, a run that ends by
    /// dropping its session would leave them reporting that the owner disappeared.
    fn drop(&mut self) {
        self.stop();
    }
}
