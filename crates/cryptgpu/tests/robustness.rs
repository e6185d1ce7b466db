//! What a buggy data owner or party cannot do to the others: a batch that does not fit the model
//! is refused before it is shared, a party that panics tells the owner why (and its neighbours
//! stop at once, instead of waiting out their timeouts), and a message out of step is named as
//! such.

use std::time::{Duration, Instant};
use trustsplit_boundary::{Channel, ChannelError, ChannelOptions, Frame, InProcessChannel};
use trustsplit_cryptgpu::model::{Sgd, DEFAULT_ACTIVATION_BOUND};
use trustsplit_cryptgpu::party::{local_links, tag, MpcError, Party, Side};
use trustsplit_cryptgpu::ring::FixedPoint;
use trustsplit_cryptgpu::session::{self, RunSettings, Session};
use trustsplit_nn::layers::{Conv2d, Layer, Linear};
use trustsplit_nn::tensor::from_vec;
use trustsplit_nn::Model;

/// Inputs `2 x 4 x 4`, three classes.
fn model() -> Model {
    let w = |n: usize, scale: f32| (0..n).map(|i| ((i * 5 % 13) as f32 - 6.0) * scale).collect::<Vec<f32>>();
    let layers = vec![
        Layer::Conv2d(Conv2d {
            weight: from_vec(&[2, 2, 3, 3], w(36, 0.05)),
            bias: Some(from_vec(&[2], vec![0.1, -0.1])),
            stride: 1,
            padding: 1,
        }),
        Layer::Relu,
        Layer::Flatten,
        Layer::Linear(Linear { weight: from_vec(&[3, 32], w(96, 0.02)), bias: Some(from_vec(&[3], vec![0.0; 3])) }),
    ];
    Model::new("small", &[2, 4, 4], layers).unwrap()
}

fn settings() -> RunSettings {
    RunSettings {
        fp: FixedPoint::default(),
        sgd: Sgd { lr: 0.0, momentum: 0.9, weight_decay: 0.0 },
        activation_bound: DEFAULT_ACTIVATION_BOUND,
        uploaded: None,
    }
}

#[test]
fn a_batch_that_does_not_fit_the_model_is_refused_before_it_is_shared() {
    let mut s = Session::local(&model(), None, settings()).unwrap();
    let x = vec![0.25f32; 64];
    let refused = |r: Result<session::Logits, MpcError>| r.err().expect("refused").to_string();

    let err = refused(s.infer(&x[..60], &[2, 2, 4, 4]));
    assert!(err.contains("holds 64 values, but 60 were given"), "{err}");
    let err = refused(s.infer(&x, &[2, 4, 2, 4]));
    assert!(err.contains("[2, 4, 2, 4]") && err.contains("N x [2, 4, 4]"), "{err}");
    let err = refused(s.infer(&x, &[4, 16]));
    assert!(err.contains("[4, 16]") && err.contains("N x [2, 4, 4]"), "{err}");
    let err = refused(s.infer(&[], &[]));
    assert!(err.contains("N x [2, 4, 4]"), "{err}");
    let err = refused(s.infer(&[], &[0, 2, 4, 4]));
    assert!(err.contains("an empty batch"), "{err}");
    let err = refused(s.train_step(&x, &[2, 2, 4, 4], &[0, 1, 2], 0.1));
    assert!(err.contains("3 labels for a batch of 2 samples"), "{err}");
    let err = refused(s.train_step(&x, &[2, 2, 4, 4], &[0, 3], 0.1));
    assert!(err.contains("label 3 is out of range for 3 classes"), "{err}");

    // Nothing reached the parties: the run goes on.
    let logits = s.infer(&x, &[2, 2, 4, 4]).unwrap();
    assert_eq!((logits.values.len(), logits.classes), (6, 3));
    s.train_step(&x, &[2, 2, 4, 4], &[0, 2], 0.1).unwrap();
    s.finish().unwrap();
}

/// A link that panics on its `after`-th send (a bug deep in a protocol step, as it would show).
struct PanicsOnSend {
    inner: Box<dyn Channel>,
    after: usize,
}

impl Channel for PanicsOnSend {
    fn send(&mut self, tag: u16, payload: &[u8]) -> Result<(), ChannelError> {
        self.after -= 1;
        assert!(self.after > 0, "a bug in a protocol step");
        self.inner.send(tag, payload)
    }
    fn recv(&mut self) -> Result<Frame, ChannelError> {
        self.inner.recv()
    }
    fn peer(&self) -> String {
        self.inner.peer()
    }
}

#[test]
fn a_party_that_panics_tells_the_owner_and_the_others_stop_at_once() {
    let started = Instant::now();
    // Long enough that a party left waiting would fail the test by its time, not hang it.
    let opts = ChannelOptions { max_frame_bytes: 1 << 31, timeout: Some(Duration::from_secs(60)) };
    let mut owner_ends: Vec<Box<dyn Channel>> = Vec::new();
    let mut threads = Vec::new();
    for (id, (next, prev)) in local_links().into_iter().enumerate() {
        let (mine, mut theirs) = InProcessChannel::pair(opts);
        owner_ends.push(Box::new(mine));
        // Party 0 panics on its first protocol message (its first send is its pairwise key).
        let next: Box<dyn Channel> = match id {
            0 => Box::new(PanicsOnSend { inner: next, after: 2 }),
            _ => next,
        };
        threads.push(std::thread::spawn(move || {
            let party = Party::connect(id, next, prev, FixedPoint::default())?;
            session::serve(party, &mut theirs)
        }));
    }
    let mut owner = Session::start(owner_ends, Vec::new(), &model(), None, settings()).unwrap();
    let err = owner.infer(&[0.25; 64], &[2, 2, 4, 4]).err().expect("party 0 panicked").to_string();
    assert!(err.contains("party 0 failed") && err.contains("a bug in a protocol step"), "{err}");
    drop(owner);
    let outcomes: Vec<String> =
        threads.into_iter().map(|t| t.join().expect("no thread panics").unwrap_err().to_string()).collect();
    assert!(outcomes[0].contains("internal error: a bug in a protocol step"), "{outcomes:?}");
    assert!(started.elapsed() < Duration::from_secs(10), "the parties waited: {:?}", started.elapsed());
}

/// Three parties linked in memory.
fn three_parties() -> Vec<Party> {
    let handles: Vec<_> = local_links()
        .into_iter()
        .enumerate()
        .map(|(id, (next, prev))| std::thread::spawn(move || Party::connect(id, next, prev, FixedPoint::default())))
        .collect();
    handles.into_iter().map(|h| h.join().unwrap().unwrap()).collect()
}

#[test]
fn a_message_out_of_step_is_named_with_its_tags() {
    let mut parties = three_parties();
    parties[1].send(Side::Prev, tag::REVEAL, "reveal", &[1, 2]).unwrap();
    let err = parties[0].recv(Side::Next, tag::RESHARE, "a re-shared product", 2).unwrap_err();
    assert!(matches!(err, MpcError::OutOfStep { party: 0, peer: 1, expected: tag::RESHARE, found: tag::REVEAL, .. }));
    let err = err.to_string();
    assert!(err.contains("0x4705") && err.contains("0x4702") && err.contains("a re-shared product"), "{err}");

    // The right step with the wrong size is a size mismatch.
    parties[1].send(Side::Prev, tag::RESHARE, "reshare", &[1]).unwrap();
    let err = parties[0].recv(Side::Next, tag::RESHARE, "a re-shared product", 2).unwrap_err().to_string();
    assert!(err.contains("sent 8 bytes for a re-shared product, expected 16"), "{err}");
}
