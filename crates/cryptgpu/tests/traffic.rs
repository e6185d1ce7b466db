//! What crosses the links between parties during a whole training step, recorded: every message
//! after the key exchange is re-randomised. Two runs on the very same input shares (the same
//! sharing of the same batch and model) must never send the same message, nor agree on more
//! than a chance fraction of words: a message that was a function of the shares alone (a share
//! sent without a fresh mask) would repeat exactly, since the streams are keyed afresh from the
//! operating system in each run.

use rand::{Rng, RngCore, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::sync::{Arc, Mutex};
use trustsplit_boundary::{Channel, ChannelError, Frame};
use trustsplit_cryptgpu::arith::{replicated, split, AShare};
use trustsplit_cryptgpu::model::{self, SecureModel, Sgd, Spec};
use trustsplit_cryptgpu::party::{local_links, Party};
use trustsplit_cryptgpu::prg::Prg;
use trustsplit_cryptgpu::ring::FixedPoint;

/// The frames a party sent, in order, with their tags.
type Log = Arc<Mutex<Vec<Frame>>>;

struct Recording {
    inner: Box<dyn Channel>,
    log: Log,
}

impl Channel for Recording {
    fn send(&mut self, tag: u16, payload: &[u8]) -> Result<(), ChannelError> {
        self.log.lock().unwrap().push(Frame { tag, payload: payload.to_vec() });
        self.inner.send(tag, payload)
    }
    fn recv(&mut self) -> Result<Frame, ChannelError> {
        self.inner.recv()
    }
    fn peer(&self) -> String {
        self.inner.peer()
    }
}

fn specs() -> Vec<Spec> {
    vec![
        Spec::Conv { in_channels: 1, out_channels: 3, kernel: 3, stride: 1, padding: 1, bias: true },
        Spec::Relu,
        Spec::MaxPool { kernel: 2, stride: 2, padding: 0 },
        Spec::AvgPool { kernel: 2, stride: 2, padding: 0 },
        Spec::Flatten,
        Spec::Linear { inputs: 12, outputs: 4, bias: true },
    ]
}

/// The three parties' shares of the batch, its one-hot labels and the parameters, from `seed`.
fn shares(seed: u64, fp: FixedPoint) -> [(AShare, AShare, Vec<AShare>); 3] {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    let mut key = [0u8; 32];
    rng.fill_bytes(&mut key);
    let mut prg = Prg::from_key(key);
    let mut share = |values: Vec<f64>, shape: &[usize]| {
        let ring: Vec<u64> = values.iter().map(|&v| fp.encode(v).unwrap()).collect();
        let parts = split(&ring, &mut prg);
        [0, 1, 2].map(|i| replicated(&parts, i, shape))
    };
    let n = 3;
    let x = share((0..n * 64).map(|_| rng.random_range(-1.0..1.0)).collect(), &[n, 1, 8, 8]);
    let labels: Vec<usize> = (0..n).map(|_| rng.random_range(0..4)).collect();
    let hot = share(labels.iter().flat_map(|&l| (0..4).map(move |j| f64::from(j == l))).collect(), &[n, 4]);
    let params: Vec<[AShare; 3]> = model::param_shapes(&specs())
        .iter()
        .map(|shape| share((0..shape.iter().product()).map(|_| rng.random_range(-0.5..0.5)).collect(), shape))
        .collect();
    [0, 1, 2].map(|i| (x[i].clone(), hot[i].clone(), params.iter().map(|p| p[i].clone()).collect()))
}

/// Runs `step` on the fixed shares of `seed` (batch, one-hot labels, parameters) on three
/// recorded parties; returns each party's sent frames (key exchange excluded).
fn record(seed: u64, step: impl Fn(&mut Party, AShare, AShare, Vec<AShare>) + Sync) -> Vec<Vec<Frame>> {
    let fp = FixedPoint::default();
    let inputs = shares(seed, fp);
    let step = &step;
    let logs: Vec<Log> = (0..3).map(|_| Log::default()).collect();
    std::thread::scope(|s| {
        let handles: Vec<_> = local_links()
            .into_iter()
            .zip(inputs)
            .enumerate()
            .map(|(id, ((next, prev), (x, hot, params)))| {
                let log = logs[id].clone();
                s.spawn(move || {
                    let next = Box::new(Recording { inner: next, log: log.clone() });
                    let prev = Box::new(Recording { inner: prev, log: log.clone() });
                    let mut party = Party::connect(id, next, prev, fp).unwrap();
                    log.lock().unwrap().clear();
                    step(&mut party, x, hot, params);
                })
            })
            .collect();
        handles.into_iter().for_each(|h| h.join().unwrap());
    });
    logs.iter().map(|l| l.lock().unwrap().clone()).collect()
}

fn training_step(party: &mut Party, x: AShare, hot: AShare, params: Vec<AShare>) {
    let mut net = SecureModel::new(specs(), params).unwrap();
    let (logits, saved) = net.forward(party, x, true).unwrap();
    let dlogits = party.cross_entropy_grad(&logits, &hot).unwrap();
    let grads = net.backward(party, dlogits, saved).unwrap();
    net.update(party, grads, Sgd { lr: 0.1, momentum: 0.9, weight_decay: 1e-3 }).unwrap();
}

#[test]
fn no_message_of_a_training_step_repeats_on_the_same_shares() {
    assert_fresh("a training step", record(5, training_step), record(5, training_step), 50);
}

/// Each protocol on its own, on the same input shares: a protocol's first messages depend only on
/// those shares and fresh randomness, so one sent without its mask would repeat.
#[test]
fn no_protocol_sends_an_unmasked_share() {
    type Step = fn(&mut Party, AShare, AShare, Vec<AShare>);
    let protocols: [(&str, Step); 9] = [
        ("mul", |p, x, _, _| drop(p.mul(&x, &x).unwrap())),
        ("mul_int", |p, x, _, _| drop(p.mul_int(&x, &x).unwrap())),
        ("scale", |p, x, _, _| drop(p.scale(&x, 0.3).unwrap())),
        ("msb", |p, x, _, _| drop(p.msb(&x).unwrap())),
        ("relu", |p, x, _, _| drop(p.relu(&x).unwrap())),
        ("max_pool2d", |p, x, _, _| drop(p.max_pool2d(&x, 2, 2, 0).unwrap())),
        ("avg_pool2d", |p, x, _, _| drop(p.avg_pool2d(&x, 2, 2, 0).unwrap())),
        ("exp", |p, _, hot, _| drop(p.exp(&hot).unwrap())),
        ("cross_entropy_grad", |p, _, hot, _| drop(p.cross_entropy_grad(&hot, &hot).unwrap())),
    ];
    for (name, step) in protocols {
        assert_fresh(name, record(9, step), record(9, step), 1);
    }
}

/// Asserts that two runs on the same shares sent the same sequence of message kinds and sizes but
/// no equal message, and (nearly) no equal word.
fn assert_fresh(what: &str, a: Vec<Vec<Frame>>, b: Vec<Vec<Frame>>, at_least: usize) {
    for (party, (a, b)) in a.iter().zip(&b).enumerate() {
        assert!(a.len() >= at_least, "{what}: party {party} sent only {} messages", a.len());
        assert_eq!(a.len(), b.len(), "party {party}: the protocol's message count depends on randomness");
        let (mut words, mut equal) = (0usize, 0usize);
        for (i, (fa, fb)) in a.iter().zip(b).enumerate() {
            assert_eq!((fa.tag, fa.payload.len()), (fb.tag, fb.payload.len()), "{what}: party {party} message {i}");
            assert_ne!(fa.payload, fb.payload, "{what}: party {party}'s message {i} (tag {:#x}) repeats", fa.tag);
            for (x, y) in fa.payload.chunks(8).zip(fb.payload.chunks(8)) {
                words += 1;
                equal += usize::from(x == y);
            }
        }
        // Uniform words agree with probability 2^-64; packed single bits with probability about
        // 2^-(bits in the word). Allow a few chance matches of short packed words.
        assert!(equal * 1000 <= words, "{what}: party {party}: {equal} of {words} words repeat between runs");
    }
}
