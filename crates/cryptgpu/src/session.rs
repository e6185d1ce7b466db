//! The data owner and the three parties: the owner shares the model and each batch, the parties
//! train or infer on shares, and only the owner ever sees a reconstructed value (the logits, to
//! report loss and accuracy, and the trained model).
//!
//! The owner talks to each party over its own link: in memory for a one-process run
//! ([`Session::local`]), the authenticated, encrypted link for parties in other processes. A
//! party that fails tells the owner why before it closes its links; the other parties then see
//! their link to it close, and stop.
//!
//! Sizes. Every message either side receives has a size known, or bounded, in advance (the
//! setup, the parameters' shares implied by it, a batch, the logits of a batch, an export, the
//! statistics), and is refused beyond it: over TCP before its payload is read, so a buggy or
//! hostile peer cannot make the other side allocate up to the 2 GiB frame limit.

use crate::arith::{self, AShare};
use crate::model::{self, SecureModel, Sgd, Spec};
use crate::party::{local_links, MpcError, Party, Traffic};
use crate::prg::Prg;
use crate::ring::FixedPoint;
use serde::{Deserialize, Serialize};
use std::panic::AssertUnwindSafe;
use std::path::Path;
use std::thread::JoinHandle;
use trustsplit_boundary::{Channel, ChannelError, ChannelOptions, Frame, InProcessChannel};
use trustsplit_nn::{Model, Tensor};

mod upload;

/// Owner-to-party commands and their answers.
mod cmd {
    pub const SETUP: u16 = 0x4781;
    pub const TRAIN: u16 = 0x4782;
    pub const EVAL: u16 = 0x4783;
    pub const EXPORT: u16 = 0x4784;
    pub const STATS: u16 = 0x4785;
    pub const STOP: u16 = 0x4786;
    pub const UPLOAD: u16 = 0x4787;
    pub const UPLOAD_RECORDS: u16 = 0x4788;
    pub const UPLOAD_END: u16 = 0x4789;
    pub const TRAIN_ROWS: u16 = 0x478a;
    pub const EVAL_ROWS: u16 = 0x478b;
    pub const LOGITS: u16 = 0x4791;
    pub const PARAMS: u16 = 0x4792;
    pub const STATS_REPLY: u16 = 0x4793;
    pub const UPLOADED: u16 = 0x4794;
    pub const UPLOAD_READY: u16 = 0x4795;
    pub const FAILED: u16 = 0x47ff;
}

/// The largest setup a party takes: a zoo model's architecture is a few KiB of JSON.
pub const MAX_SETUP_BYTES: usize = 16 << 20;
/// The largest training or inference command a party takes (its shares of a batch, and of the
/// labels): a VGG16 batch of 256 ImageNet-sized samples is about 620 MiB.
pub const MAX_BATCH_BYTES: usize = 1 << 30;
/// The largest statistics answer the owner takes: a few hundred layers' counters.
const MAX_STATS_BYTES: usize = 16 << 20;
/// The longest failure note sent or taken: error texts list shapes, never values.
const MAX_FAILURE_BYTES: usize = 64 << 10;

/// What a party is told before its first batch.
#[derive(Clone, Debug, Serialize, Deserialize)]
pub struct Setup {
    pub specs: Vec<Spec>,
    /// One sample's shape (`C x H x W`): every batch is `N x` this.
    pub input_shape: Vec<usize>,
    pub frac_bits: u32,
    pub classes: usize,
    pub sgd: Sgd,
    /// Whether the parameters' shares are followed by momentum buffers' (a resumed run).
    #[serde(default)]
    pub momentum_state: bool,
    /// ReLU zeroes inputs at or above this ([`SecureModel::activation_bound`]).
    #[serde(default = "default_bound")]
    pub activation_bound: f64,
    /// Batches come from the parties' stores of this upload, by record number.
    #[serde(default)]
    pub uploaded: Option<UploadRef>,
}

/// A dataset the parties hold in their stores ([`crate::store`]), with the fingerprints the
/// owner computed from its own copy: a party whose store differs refuses the run.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UploadRef {
    pub name: String,
    pub train_fingerprint: String,
    pub test_fingerprint: String,
}

fn default_bound() -> f64 {
    model::DEFAULT_ACTIVATION_BOUND
}

/// The public settings of a run the data owner gives the parties.
#[derive(Clone, Debug)]
pub struct RunSettings {
    pub fp: FixedPoint,
    pub sgd: Sgd,
    pub activation_bound: f64,
    /// Train and evaluate on the parties' stored upload (by record number) rather than on batches
    /// the owner shares.
    pub uploaded: Option<UploadRef>,
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

/// The words of a whole number of ring elements (callers check the length first).
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

/// The number of values of a shape, if it fits in memory's address space.
fn volume(shape: &[usize]) -> Option<usize> {
    shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d))
}

/// The exact size of the parameters' shares the owner sends for `specs` (as [`encode_share`]
/// lays them out), with the momentum buffers' when `momentum`; `None` past the address space.
fn params_bytes(specs: &[Spec], momentum: bool) -> Option<usize> {
    let mut words = 0usize;
    for shape in model::param_shapes(specs) {
        let share = volume(&shape)?.checked_mul(2)?.checked_add(1 + shape.len())?;
        words = words.checked_add(share)?;
    }
    words.checked_mul(if momentum { 2 } else { 1 })?.checked_mul(8)
}

/// `text`, cut to at most [`MAX_FAILURE_BYTES`] (at a character boundary).
fn failure_note(text: &str) -> &str {
    let mut end = text.len().min(MAX_FAILURE_BYTES);
    while !text.is_char_boundary(end) {
        end -= 1;
    }
    &text[..end]
}

/// What a panic said, if it said it in text.
fn panic_text(panic: &(dyn std::any::Any + Send)) -> &str {
    match (panic.downcast_ref::<&str>(), panic.downcast_ref::<String>()) {
        (Some(s), _) => s,
        (_, Some(s)) => s,
        _ => "(no message)",
    }
}

/// Runs one party for the owner until it says stop (or its link closes).
pub fn serve(party: Party, owner: &mut dyn Channel) -> Result<(), MpcError> {
    serve_with_store(party, owner, None)
}

/// [`serve`] for a party that keeps uploads in `store` (a folder): it also takes an upload, or a
/// run that trains on one.
pub fn serve_with_store(mut party: Party, owner: &mut dyn Channel, store: Option<&Path>) -> Result<(), MpcError> {
    let id = party.id;
    // A panic (a bug, or an input no check foresaw) would otherwise end the party without a word:
    // the owner and the neighbours would wait out their 600 s timeouts. Unwind safety is moot:
    // the party is abandoned after a panic, whatever state it left.
    let result = std::panic::catch_unwind(AssertUnwindSafe(|| run_commands(&mut party, &mut *owner, store)))
        .unwrap_or_else(|panic| {
            Err(MpcError::Invalid(format!("party {id} stopped on an internal error: {}", panic_text(&*panic))))
        });
    if let Err(e) = &result {
        // Tell the owner why; the other parties learn of it when their links to this one close.
        let _ = owner.send(cmd::FAILED, failure_note(&e.to_string()).as_bytes());
    }
    result
}

/// One message from the owner of at most `max` bytes (refused before it is read over TCP).
fn from_owner(owner: &mut dyn Channel, id: usize, what: &str, max: usize) -> Result<Frame, MpcError> {
    owner.recv_limited(max).map_err(|source| match source {
        ChannelError::TooLarge { len, max, .. } => {
            MpcError::Invalid(format!("party {id}: the owner sent {len} bytes for {what}; at most {max} are taken"))
        }
        source => MpcError::Link { party: id, peer: 3, source },
    })
}

/// The owner's message `tag` of exactly `expected` bytes (at most, when `exact` is false).
fn expect_from_owner(
    owner: &mut dyn Channel,
    id: usize,
    tag: u16,
    what: &str,
    expected: usize,
    exact: bool,
) -> Result<Vec<u8>, MpcError> {
    let frame = from_owner(owner, id, what, expected)?;
    if frame.tag != tag {
        return Err(MpcError::Invalid(format!(
            "party {id}: the owner sent message tag {:#06x} where {what} (tag {tag:#06x}) was due",
            frame.tag
        )));
    }
    if exact && frame.payload.len() != expected {
        return Err(MpcError::Invalid(format!(
            "party {id}: the owner sent {} bytes for {what}; the setup implies {expected}",
            frame.payload.len()
        )));
    }
    Ok(frame.payload)
}

/// Checks what a setup promises before anything is allocated or computed from it.
fn check_setup(id: usize, setup: &Setup) -> Result<(), MpcError> {
    let bad = |reason: String| Err(MpcError::Invalid(format!("party {id}: the owner's setup {reason}")));
    if setup.classes == 0 {
        return bad("has no classes".into());
    }
    if setup.input_shape.is_empty() || setup.input_shape.contains(&0) || volume(&setup.input_shape).is_none() {
        return bad(format!("gives the input shape {:?}", setup.input_shape));
    }
    if !(setup.activation_bound.is_finite() && setup.activation_bound > 0.0) {
        return bad(format!("gives the activation bound {}, which is not positive", setup.activation_bound));
    }
    Ok(())
}

/// A training or inference batch: the inputs' share, and for training the labels' share and the
/// learning rate, checked against the setup (a misaligned share would compute garbage, or panic).
fn decode_batch(
    id: usize,
    payload: &[u8],
    setup: &Setup,
    train: bool,
) -> Result<(AShare, Option<(AShare, f64)>), MpcError> {
    let bad = |e: String| MpcError::Invalid(format!("party {id}: malformed batch: {e}"));
    if !payload.len().is_multiple_of(8) {
        return Err(bad(format!("{} bytes, not a whole number of ring elements", payload.len())));
    }
    let words = to_ring(payload);
    let mut at = 0;
    let x = decode_share(&words, &mut at).map_err(bad)?;
    let n = x.shape.first().copied().unwrap_or(0);
    if x.shape.len() != setup.input_shape.len() + 1 || x.shape[1..] != setup.input_shape[..] || n == 0 {
        return Err(bad(format!("inputs of shape {:?}; the model takes N x {:?}, N > 0", x.shape, setup.input_shape)));
    }
    let labels = match train {
        false => None,
        true => {
            let y = decode_share(&words, &mut at).map_err(bad)?;
            if y.shape != [n, setup.classes] {
                return Err(bad(format!(
                    "labels of shape {:?} for {n} inputs, expected [{n}, {}]",
                    y.shape, setup.classes
                )));
            }
            let lr = f64::from_bits(*words.get(at).ok_or_else(|| bad("no learning rate".into()))?);
            at += 1;
            if !lr.is_finite() {
                return Err(bad(format!("learning rate {lr}")));
            }
            Some((y, lr))
        }
    };
    if at != words.len() {
        return Err(bad(format!("{} ring elements after the batch", words.len() - at)));
    }
    Ok((x, labels))
}

/// The commands of one run, from the setup (or an upload) to STOP.
fn run_commands(party: &mut Party, owner: &mut dyn Channel, store: Option<&Path>) -> Result<(), MpcError> {
    let id = party.id;
    let owner_err = |source| MpcError::Link { party: id, peer: 3, source };
    let first = from_owner(owner, id, "the setup", MAX_SETUP_BYTES)?;
    match first.tag {
        cmd::SETUP => {}
        cmd::UPLOAD => return upload::receive(id, owner, store, first),
        other => {
            return Err(MpcError::Invalid(format!(
                "party {id}: the owner sent message tag {other:#06x} where the setup (tag {:#06x}) was due",
                cmd::SETUP
            )))
        }
    }
    let setup: Setup = serde_json::from_slice(&first.payload)
        .map_err(|e| MpcError::Invalid(format!("party {id}: the owner's setup is malformed: {e}")))?;
    check_setup(id, &setup)?;
    party.fp = FixedPoint::new(setup.frac_bits).map_err(MpcError::Invalid)?;
    let expected = params_bytes(&setup.specs, setup.momentum_state).ok_or_else(|| {
        MpcError::Invalid(format!("party {id}: the owner's setup implies parameters beyond the address space"))
    })?;
    let words = to_ring(&expect_from_owner(owner, id, cmd::PARAMS, "the parameters' shares", expected, true)?);
    let mut at = 0;
    let count = model::param_shapes(&setup.specs).len();
    let shares = if setup.momentum_state { 2 * count } else { count };
    let mut params = Vec::new();
    for _ in 0..shares {
        params.push(decode_share(&words, &mut at).map_err(|e| MpcError::Invalid(format!("party {id}: {e}")))?);
    }
    let velocity = params.split_off(count);
    let mut net = SecureModel::new(setup.specs.clone(), params)?;
    net.activation_bound = setup.activation_bound;
    if setup.momentum_state {
        net = net.with_velocity(velocity)?;
    }
    // Opened after the parameters are read: a party that refuses the store then fails on the
    // owner's first request, which reads its reason (an owner still sending would not).
    let stored = match &setup.uploaded {
        Some(u) => Some(upload::open_stores(id, store, u, &setup)?),
        None => None,
    };
    loop {
        let frame = from_owner(owner, id, "a command", MAX_BATCH_BYTES)?;
        match frame.tag {
            cmd::TRAIN => {
                let (x, labels) = decode_batch(id, &frame.payload, &setup, true)?;
                let (y, lr) = labels.expect("a training batch has labels");
                let (logits, saved) = net.forward(party, x, true)?;
                owner.send(cmd::LOGITS, &to_bytes(&logits.cur)).map_err(owner_err)?;
                party.set_scope("loss");
                let dlogits = party.cross_entropy_grad(&logits, &y)?;
                let grads = net.backward(party, dlogits, saved)?;
                net.update(party, grads, Sgd { lr, ..setup.sgd })?;
            }
            cmd::EVAL => {
                let (x, _) = decode_batch(id, &frame.payload, &setup, false)?;
                let (logits, _) = net.forward(party, x, false)?;
                owner.send(cmd::LOGITS, &to_bytes(&logits.cur)).map_err(owner_err)?;
            }
            cmd::TRAIN_ROWS | cmd::EVAL_ROWS => {
                let stores = stored.as_ref().ok_or_else(|| {
                    MpcError::Invalid(format!(
                        "party {id}: the owner asked for stored records in a run without an upload"
                    ))
                })?;
                let train = frame.tag == cmd::TRAIN_ROWS;
                let (lr, rows) = upload::decode_rows(id, &frame.payload, train)?;
                let (x, y) = if train { stores.0.gather(&rows)? } else { stores.1.gather(&rows)? };
                let (logits, saved) = net.forward(party, x, train)?;
                owner.send(cmd::LOGITS, &to_bytes(&logits.cur)).map_err(owner_err)?;
                if train {
                    party.set_scope("loss");
                    let dlogits = party.cross_entropy_grad(&logits, &y)?;
                    let grads = net.backward(party, dlogits, saved)?;
                    net.update(party, grads, Sgd { lr, ..setup.sgd })?;
                }
            }
            cmd::EXPORT => {
                let velocity = net.velocity();
                let cur: Vec<u64> = net.params.iter().chain(&velocity).flat_map(|p| p.cur.iter().copied()).collect();
                owner.send(cmd::PARAMS, &to_bytes(&cur)).map_err(owner_err)?;
            }
            cmd::STATS => {
                let stats = PartyStats {
                    party: id,
                    total: party.total_traffic(),
                    by_layer: party.traffic().iter().map(|((l, p), t)| (l.clone(), p.to_string(), *t)).collect(),
                };
                owner.send(cmd::STATS_REPLY, &serde_json::to_vec(&stats).expect("serialises")).map_err(owner_err)?;
                party.reset_traffic();
            }
            cmd::STOP => return Ok(()),
            other => return Err(MpcError::Invalid(format!("party {id}: unknown command {other:#x} from the owner"))),
        }
    }
}

/// How large an answer from a party may be.
#[derive(Clone, Copy, Debug)]
enum Expect {
    Exactly(usize),
    AtMost(usize),
}

impl Expect {
    fn max(self) -> usize {
        match self {
            Expect::Exactly(n) | Expect::AtMost(n) => n,
        }
    }

    fn allows(self, len: usize) -> bool {
        match self {
            Expect::Exactly(n) => len == n,
            Expect::AtMost(n) => len <= n,
        }
    }
}

impl std::fmt::Display for Expect {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        match self {
            Expect::Exactly(n) => write!(f, "{n}"),
            Expect::AtMost(n) => write!(f, "at most {n}"),
        }
    }
}

/// The data owner's side of a three-party run.
pub struct Session {
    parties: Vec<Box<dyn Channel>>,
    threads: Vec<JoinHandle<Result<(), MpcError>>>,
    fp: FixedPoint,
    classes: usize,
    specs: Vec<Spec>,
    /// One sample's shape: every batch is `N x` this.
    input_shape: Vec<usize>,
    /// How many values the parameters hold (what an export brings back, twice: with momentum).
    param_values: usize,
    /// Whether the run trains on the parties' stored upload.
    uploaded: bool,
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
        let RunSettings { fp, sgd, activation_bound, uploaded } = settings;
        let specs = model::specs_of(&model.layers);
        if momentum.is_some() && model::has_batch_norm(&specs) {
            return Err(MpcError::Invalid("cannot resume training a model with batch-norm under cryptgpu".into()));
        }
        let param_values = model::param_shapes(&specs).iter().map(|s| s.iter().product::<usize>()).sum();
        let setup = Setup {
            specs: specs.clone(),
            input_shape: model.input_shape.clone(),
            frac_bits: fp.frac_bits,
            classes: model.num_classes,
            sgd,
            momentum_state: momentum.is_some(),
            activation_bound,
            uploaded,
        };
        let json = serde_json::to_vec(&setup).expect("serialises");
        for (i, p) in parties.iter_mut().enumerate() {
            p.send(cmd::SETUP, &json).map_err(|source| MpcError::Link { party: 3, peer: i, source })?;
        }
        let mut session = Session {
            parties,
            threads,
            fp,
            classes: model.num_classes,
            specs,
            input_shape: model.input_shape.clone(),
            param_values,
            uploaded: setup.uploaded.is_some(),
            stopped: false,
        };
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
        let f = self.parties[i].recv_limited(MAX_FAILURE_BYTES).ok()?;
        let reason = trustsplit_boundary::printable(&f.payload);
        (f.tag == cmd::FAILED).then(|| MpcError::Invalid(format!("party {i} failed: {reason}")))
    }

    /// Party `i`'s answer `tag`, of the size `expect` says (a larger one is refused before it is
    /// read over TCP), or the reason it failed.
    fn recv(&mut self, i: usize, tag: u16, what: &str, expect: Expect) -> Result<Vec<u8>, MpcError> {
        let wrong_size = |len| MpcError::Invalid(format!("party {i} sent {len} bytes for {what}, expected {expect}"));
        // A failure note may be longer than the answer expected.
        let f = self.parties[i].recv_limited(expect.max().max(MAX_FAILURE_BYTES)).map_err(|source| match source {
            ChannelError::TooLarge { len, .. } => wrong_size(len),
            source => MpcError::Link { party: 3, peer: i, source },
        })?;
        if f.tag == cmd::FAILED {
            return Err(MpcError::Invalid(format!("party {i} failed: {}", trustsplit_boundary::printable(&f.payload))));
        }
        if f.tag != tag {
            return Err(MpcError::Invalid(format!("party {i} answered {:#x}, expected {tag:#x}", f.tag)));
        }
        if !expect.allows(f.payload.len()) {
            return Err(wrong_size(f.payload.len()));
        }
        Ok(f.payload)
    }

    /// Checks a batch against the model before it is shared: the parties would otherwise decode
    /// misaligned shares (or refuse them, naming less).
    fn check_batch(&self, x: &[f32], shape: &[usize], labels: Option<&[usize]>) -> Result<(), MpcError> {
        let expected = &self.input_shape;
        if shape.len() != expected.len() + 1 || shape[1..] != expected[..] {
            return Err(MpcError::Invalid(format!(
                "a batch of shape {shape:?} does not fit the model: it takes N x {expected:?}"
            )));
        }
        let n = shape[0];
        if n == 0 {
            return Err(MpcError::Invalid(format!("an empty batch (shape {shape:?})")));
        }
        let values =
            volume(shape).ok_or_else(|| MpcError::Invalid(format!("a batch of shape {shape:?} is too large")))?;
        if x.len() != values {
            return Err(MpcError::Invalid(format!(
                "a batch of shape {shape:?} holds {values} values, but {} were given",
                x.len()
            )));
        }
        if let Some(labels) = labels {
            if labels.len() != n {
                return Err(MpcError::Invalid(format!(
                    "{} labels for a batch of {n} samples: expected {n}",
                    labels.len()
                )));
            }
        }
        // What `share_batch` and the command add: each share's shape, its two parts; the rate.
        let label_words = labels.map_or(Some(0), |_| n.checked_mul(self.classes)?.checked_mul(2)?.checked_add(4));
        let bytes = values
            .checked_mul(2)
            .and_then(|w| w.checked_add(1 + shape.len())?.checked_add(label_words?)?.checked_mul(8));
        match bytes {
            Some(b) if b <= MAX_BATCH_BYTES => Ok(()),
            _ => Err(MpcError::Invalid(format!(
                "a batch of {n} samples of {expected:?} is {} bytes of shares per party, over the {MAX_BATCH_BYTES} \
                 a party takes: use a smaller batch",
                bytes.map_or("too many".to_string(), |b| b.to_string())
            ))),
        }
    }

    /// Shares a batch (`x`: `N x C x H x W`) and, for training, its one-hot labels.
    fn share_batch(&self, x: &[f32], shape: &[usize], labels: Option<&[usize]>) -> Result<[Vec<u64>; 3], MpcError> {
        self.check_batch(x, shape, labels)?;
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
        let expect = Expect::Exactly(n * self.classes * 8);
        for i in 0..3 {
            parts.push(to_ring(&self.recv(i, cmd::LOGITS, "the logits", expect)?));
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
        let expect = Expect::Exactly(self.param_values * 2 * 8);
        for i in 0..3 {
            self.send(i, cmd::EXPORT, &[])?;
            parts.push(to_ring(&self.recv(i, cmd::PARAMS, "the exported parameters", expect)?));
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
            let bytes = self.recv(i, cmd::STATS_REPLY, "its statistics", Expect::AtMost(MAX_STATS_BYTES))?;
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::party::local_links;
    use std::time::Duration;
    use trustsplit_nn::layers::{Conv2d, Layer, Linear};
    use trustsplit_nn::tensor::from_vec;

    /// Inputs `2 x 4 x 4`, three classes.
    fn model() -> Model {
        let w = |n: usize, scale: f32| (0..n).map(|i| ((i * 7 % 11) as f32 - 5.0) * scale).collect::<Vec<f32>>();
        let layers = vec![
            Layer::Conv2d(Conv2d {
                weight: from_vec(&[2, 2, 3, 3], w(36, 0.05)),
                bias: Some(from_vec(&[2], vec![0.1, -0.1])),
                stride: 1,
                padding: 1,
            }),
            Layer::Flatten,
            Layer::Linear(Linear { weight: from_vec(&[3, 32], w(96, 0.02)), bias: None }),
        ];
        Model::new("t", &[2, 4, 4], layers).unwrap()
    }

    fn settings() -> RunSettings {
        RunSettings {
            fp: FixedPoint::default(),
            sgd: Sgd { lr: 0.1, momentum: 0.0, weight_decay: 0.0 },
            activation_bound: model::DEFAULT_ACTIVATION_BOUND,
            uploaded: None,
        }
    }

    /// Each party's share of `values` as `shape`, encoded as the owner does, past its checks.
    fn raw_shares(values: &[f32], shape: &[usize]) -> [Vec<u64>; 3] {
        let mut rng = Prg::from_key([7; 32]);
        let parts = arith::split(&FixedPoint::default().encode_all(values).unwrap(), &mut rng);
        let mut words: [Vec<u64>; 3] = Default::default();
        for (i, w) in words.iter_mut().enumerate() {
            encode_share(&arith::replicated(&parts, i, shape), w);
        }
        words
    }

    fn send_all(s: &mut Session, tag: u16, words: &[Vec<u64>; 3]) {
        for (i, w) in words.iter().enumerate() {
            s.send(i, tag, &to_bytes(w)).unwrap();
        }
    }

    #[test]
    fn parties_refuse_inputs_that_do_not_fit_the_model() {
        for shape in [vec![2, 3, 4, 4], vec![2, 2, 4], vec![0, 2, 4, 4], vec![2, 2, 4, 4, 1]] {
            let mut s = Session::local(&model(), None, settings()).unwrap();
            let values = vec![0.5; shape.iter().product()];
            send_all(&mut s, cmd::EVAL, &raw_shares(&values, &shape));
            let err = s.gather_logits(2).err().expect("refused").to_string();
            assert!(err.contains("party 0") && err.contains("malformed batch"), "{err}");
            assert!(err.contains(&format!("{shape:?}")) && err.contains("N x [2, 4, 4]"), "{err}");
            // Every party refused it, and ended.
            assert!(s.finish().is_err());
        }
    }

    #[test]
    fn parties_refuse_labels_that_do_not_fit_the_batch() {
        let mut s = Session::local(&model(), None, settings()).unwrap();
        let mut words = raw_shares(&[0.5; 64], &[2, 2, 4, 4]);
        let labels = raw_shares(&[0.0; 9], &[3, 3]);
        for (w, l) in words.iter_mut().zip(&labels) {
            w.extend_from_slice(l);
            w.push(0.1f64.to_bits());
        }
        send_all(&mut s, cmd::TRAIN, &words);
        let err = s.gather_logits(2).err().expect("refused").to_string();
        assert!(err.contains("labels of shape [3, 3] for 2 inputs, expected [2, 3]"), "{err}");
        assert!(s.finish().is_err());

        // Words after the batch: the owner and the party disagree on the layout.
        let mut s = Session::local(&model(), None, settings()).unwrap();
        let mut words = raw_shares(&[0.5; 64], &[2, 2, 4, 4]);
        words.iter_mut().for_each(|w| w.push(1));
        send_all(&mut s, cmd::EVAL, &words);
        let err = s.gather_logits(2).err().expect("refused").to_string();
        assert!(err.contains("1 ring elements after the batch"), "{err}");
        assert!(s.finish().is_err());
    }

    /// Three parties serving owner ends that the test drives frame by frame.
    fn raw_parties() -> (Vec<InProcessChannel>, Vec<JoinHandle<Result<(), MpcError>>>) {
        let opts = ChannelOptions { max_frame_bytes: 1 << 31, timeout: Some(Duration::from_secs(20)) };
        let mut ends = Vec::new();
        let mut threads = Vec::new();
        for (id, (next, prev)) in local_links().into_iter().enumerate() {
            let (mine, mut theirs) = InProcessChannel::pair(opts);
            ends.push(mine);
            threads.push(std::thread::spawn(move || {
                let party = Party::connect(id, next, prev, FixedPoint::default())?;
                serve(party, &mut theirs)
            }));
        }
        (ends, threads)
    }

    /// What party 0 answers `frames`, after which every party is let go.
    fn party0_answers(frames: &[(u16, Vec<u8>)]) -> String {
        let (mut ends, threads) = raw_parties();
        for (tag, payload) in frames {
            ends[0].send(*tag, payload).unwrap();
        }
        let answer = ends[0].recv().unwrap();
        assert_eq!(answer.tag, cmd::FAILED);
        drop(ends);
        for t in threads {
            assert!(t.join().unwrap().is_err());
        }
        String::from_utf8(answer.payload).unwrap()
    }

    fn setup_json() -> Vec<u8> {
        let m = model();
        let setup = Setup {
            specs: model::specs_of(&m.layers),
            input_shape: m.input_shape.clone(),
            frac_bits: 20,
            classes: m.num_classes,
            sgd: settings().sgd,
            momentum_state: false,
            activation_bound: model::DEFAULT_ACTIVATION_BOUND,
            uploaded: None,
        };
        serde_json::to_vec(&setup).unwrap()
    }

    #[test]
    fn parties_refuse_a_setup_or_parameters_of_the_wrong_size() {
        let answer = party0_answers(&[(cmd::SETUP, vec![b' '; MAX_SETUP_BYTES + 1])]);
        assert!(answer.contains("for the setup; at most 16777216 are taken"), "{answer}");

        let expected = params_bytes(&model::specs_of(&model().layers), false).unwrap();
        // Conv weight and bias, linear weight: each share is its rank, its shape and two parts.
        assert_eq!(expected, 8 * ((1 + 4 + 2 * 36) + (1 + 1 + 2 * 2) + (1 + 2 + 2 * 96)));
        let answer = party0_answers(&[(cmd::SETUP, setup_json()), (cmd::PARAMS, vec![0; expected + 8])]);
        assert!(answer.contains(&format!("for the parameters' shares; at most {expected} are taken")), "{answer}");
        let answer = party0_answers(&[(cmd::SETUP, setup_json()), (cmd::PARAMS, vec![0; expected - 8])]);
        assert!(answer.contains(&format!("the setup implies {expected}")), "{answer}");

        let mut setup: serde_json::Value = serde_json::from_slice(&setup_json()).unwrap();
        setup["input_shape"] = serde_json::json!([2, 0, 4]);
        let answer = party0_answers(&[(cmd::SETUP, serde_json::to_vec(&setup).unwrap())]);
        assert!(answer.contains("input shape [2, 0, 4]"), "{answer}");
    }

    /// A session whose party 0 answers every command after the setup with `answer`; parties 1
    /// and 2 never answer (the owner reads party 0 first). Returns their ends too, kept open.
    fn with_fake_party0(
        answer: impl Fn(u16) -> (u16, Vec<u8>) + Send + 'static,
    ) -> (Session, Vec<InProcessChannel>, JoinHandle<()>) {
        let opts = ChannelOptions { max_frame_bytes: 1 << 31, timeout: Some(Duration::from_secs(20)) };
        let mut owner_ends: Vec<Box<dyn Channel>> = Vec::new();
        let mut party_ends = Vec::new();
        for _ in 0..3 {
            let (mine, theirs) = InProcessChannel::pair(opts);
            owner_ends.push(Box::new(mine));
            party_ends.push(theirs);
        }
        let mut fake = party_ends.remove(0);
        let thread = std::thread::spawn(move || {
            while let Ok(f) = fake.recv() {
                match f.tag {
                    cmd::SETUP | cmd::PARAMS => {}
                    cmd::STOP => return,
                    t => {
                        let (tag, payload) = answer(t);
                        fake.send(tag, &payload).unwrap();
                    }
                }
            }
        });
        let session = Session::start(owner_ends, Vec::new(), &model(), None, settings()).unwrap();
        (session, party_ends, thread)
    }

    #[test]
    fn the_owner_takes_answers_of_the_expected_size_only() {
        let x = [0.5f32; 64];
        for (len, what) in [(56, "56 bytes"), (1 << 20, "1048576 bytes")] {
            let (mut s, _others, fake) = with_fake_party0(move |_| (cmd::LOGITS, vec![0; len]));
            let err = s.infer(&x, &[2, 2, 4, 4]).err().expect("refused").to_string();
            assert!(err.contains(&format!("party 0 sent {what} for the logits, expected 48")), "{err}");
            drop(s);
            fake.join().unwrap();
        }

        let (mut s, _others, fake) = with_fake_party0(|_| (cmd::PARAMS, vec![0; 8]));
        let err = s.export(&mut model()).expect_err("refused").to_string();
        let expected = 2 * 8 * (36 + 2 + 96);
        assert!(
            err.contains(&format!("party 0 sent 8 bytes for the exported parameters, expected {expected}")),
            "{err}"
        );
        drop(s);
        fake.join().unwrap();

        let (mut s, _others, fake) = with_fake_party0(|_| (cmd::STATS_REPLY, vec![b' '; MAX_STATS_BYTES + 1]));
        let err = s.stats().expect_err("refused").to_string();
        assert!(err.contains("party 0 sent 16777217 bytes for its statistics, expected at most 16777216"), "{err}");
        drop(s);
        fake.join().unwrap();

        // A failure note longer than the answer due is still read, and reported.
        let (mut s, _others, fake) = with_fake_party0(|_| (cmd::FAILED, vec![b'x'; 1000]));
        let err = s.infer(&x, &[2, 2, 4, 4]).err().expect("refused").to_string();
        assert!(err.contains("party 0 failed: xxxx"), "{err}");
        drop(s);
        fake.join().unwrap();
    }

    #[test]
    fn failure_notes_are_cut_at_a_character_boundary() {
        let text = "é".repeat(MAX_FAILURE_BYTES);
        let note = failure_note(&text);
        assert_eq!(note.len(), MAX_FAILURE_BYTES);
        assert_eq!(failure_note(&format!("a{text}")).len(), MAX_FAILURE_BYTES - 1);
        assert_eq!(failure_note("short"), "short");
    }
}
