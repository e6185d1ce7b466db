//! The three parties and the data owner over real TCP links on localhost (threads of this test
//! standing for the processes): the same results as in-memory parties, a key that is not pinned
//! refused, and a party killed mid-run named by the owner; idle connections that cannot lock the
//! parties out, a neighbour that never answers named when the wait runs out, and a neighbour
//! restarted during the setup let in again.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::io::Read;
use std::net::{TcpListener, TcpStream};
use std::sync::Arc;
use std::thread::JoinHandle;
use std::time::{Duration, Instant};
use trustsplit_boundary::{Channel, ChannelError, Frame, KeyPair, Link, LinkPolicy};
use trustsplit_cryptgpu::model::Sgd;
use trustsplit_cryptgpu::network::{self, Parties, PartyConfig, PartyNode};
use trustsplit_cryptgpu::party::MpcError;
use trustsplit_cryptgpu::ring::FixedPoint;
use trustsplit_cryptgpu::session::{self, RunSettings, Session};
use trustsplit_nn::layers::{Conv2d, Layer, Linear, Pool};
use trustsplit_nn::tensor::{data, from_vec};
use trustsplit_nn::{Model, Tensor};

const SGD: Sgd = Sgd { lr: 0.0, momentum: 0.9, weight_decay: 0.01 };

fn settings(fp: FixedPoint) -> RunSettings {
    RunSettings { fp, sgd: SGD, activation_bound: trustsplit_cryptgpu::model::DEFAULT_ACTIVATION_BOUND, uploaded: None }
}

fn random(rng: &mut ChaCha8Rng, shape: &[usize], scale: f32) -> Tensor {
    let n = shape.iter().product();
    from_vec(shape, (0..n).map(|_| rng.random_range(-scale..scale)).collect())
}

fn tiny_model(rng: &mut ChaCha8Rng) -> Model {
    let layers = vec![
        Layer::Conv2d(Conv2d {
            weight: random(rng, &[3, 2, 3, 3], 0.4),
            bias: Some(random(rng, &[3], 0.1)),
            stride: 1,
            padding: 1,
        }),
        Layer::Relu,
        Layer::AvgPool(Pool { kernel: 2, stride: 2, padding: 0 }),
        Layer::Flatten,
        Layer::Linear(Linear { weight: random(rng, &[4, 48], 0.3), bias: Some(random(rng, &[4], 0.1)) }),
    ];
    Model::new("tiny", &[2, 8, 8], layers).unwrap()
}

/// A party run on a thread: its outcome and its log.
type PartyThread = JoinHandle<(Result<(), MpcError>, Vec<String>)>;

/// Three party keys, the owner's, and three listeners on free localhost ports.
struct Net {
    keys: Vec<Arc<KeyPair>>,
    owner: KeyPair,
    listeners: Vec<Option<TcpListener>>,
    parties: Parties,
}

fn net() -> Net {
    let keys: Vec<Arc<KeyPair>> = (0..3).map(|_| Arc::new(KeyPair::generate().unwrap())).collect();
    let listeners: Vec<TcpListener> = (0..3).map(|_| TcpListener::bind("127.0.0.1:0").unwrap()).collect();
    let addrs = listeners.iter().map(|l| l.local_addr().unwrap().to_string()).collect();
    let parties = Parties::new(addrs, keys.iter().map(|k| k.public()).collect()).unwrap();
    Net { keys, owner: KeyPair::generate().unwrap(), listeners: listeners.into_iter().map(Some).collect(), parties }
}

impl Net {
    fn config(&self, id: usize, wait: Duration) -> PartyConfig {
        PartyConfig { id, parties: self.parties.clone(), owner_key: self.owner.public(), wait, store: None }
    }

    /// Party `id` on a thread, as `trustsplit party` runs it; returns its outcome and its log.
    fn spawn(&mut self, id: usize, wait: Duration) -> PartyThread {
        let (listener, key, config) =
            (self.listeners[id].take().unwrap(), self.keys[id].clone(), self.config(id, wait));
        std::thread::spawn(move || {
            let mut log = Vec::new();
            let outcome = network::run_party(listener, key, config, &mut |line| log.push(line.to_string()));
            (outcome, log)
        })
    }
}

fn close(a: &[f32], b: &[f32], what: &str) {
    assert_eq!(a.len(), b.len(), "{what}");
    for (x, y) in a.iter().zip(b) {
        assert!((x - y).abs() < 1e-3, "{what}: {x} over the network, {y} in memory");
    }
}

#[test]
fn parties_over_tcp_links_match_parties_in_memory() {
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let model = tiny_model(&mut rng);
    let n = 4;
    let x = random(&mut rng, &[n, 2, 8, 8], 1.0);
    let labels: Vec<usize> = (0..n).map(|i| i % 4).collect();

    let mut net = net();
    let parties: Vec<_> = (0..3).map(|id| net.spawn(id, Duration::from_secs(20))).collect();
    let links = network::connect_parties(&net.parties, &net.owner).unwrap();
    let fp = FixedPoint::new(20).unwrap();
    let mut remote = Session::start(links, Vec::new(), &model, None, settings(fp)).unwrap();
    let mut local = Session::local(&model, None, settings(fp)).unwrap();

    let (r, l) = (remote.infer(data(&x), x.shape()).unwrap(), local.infer(data(&x), x.shape()).unwrap());
    close(&r.values, &l.values, "inference logits");
    let r = remote.train_step(data(&x), x.shape(), &labels, 0.5).unwrap();
    let l = local.train_step(data(&x), x.shape(), &labels, 0.5).unwrap();
    close(&r.values, &l.values, "training logits");
    // The step's update, on both sides.
    let (r, l) = (remote.infer(data(&x), x.shape()).unwrap(), local.infer(data(&x), x.shape()).unwrap());
    close(&r.values, &l.values, "logits after the step");
    let stats = remote.stats().unwrap();
    assert!(stats.iter().all(|s| s.total.bytes_sent > 0), "{stats:?}");

    remote.finish().unwrap();
    local.finish().unwrap();
    for (id, p) in parties.into_iter().enumerate() {
        let (outcome, log) = p.join().unwrap();
        assert!(outcome.is_ok(), "party {id}: {outcome:?}");
        assert!(log.iter().any(|l| l.contains(&format!("party {id} ready"))), "{log:?}");
    }
}

#[test]
fn a_key_not_in_party_keys_is_refused() {
    let mut net = net();
    // Parties 1 and 2 never start (their ports close): party 0 gives up on them after the wait.
    net.listeners[1].take();
    net.listeners[2].take();
    let party0 = net.spawn(0, Duration::from_secs(3));
    let addr0 = net.parties.addrs[0].clone();
    let pinned = LinkPolicy::Only(vec![net.keys[0].public()]);
    let opts = network::link_options();

    let impostor = KeyPair::generate().unwrap();
    let err = Link::connect(&addr0, &network::purpose_to(0), &impostor, &pinned, opts).unwrap_err();
    assert!(err.to_string().contains("not allowed"), "{err}");

    // Party 2's key may link to party 0 only as party 2.
    let mut link = Link::connect(&addr0, &network::purpose_to(0), &net.keys[2], &pinned, opts).unwrap();
    link.send(network::tag::HELLO, network::party_purpose(1, 0).as_bytes()).unwrap();
    let answer = link.recv().unwrap();
    assert_eq!(answer.tag, network::tag::REFUSED);
    let reason = String::from_utf8_lossy(&answer.payload).to_string();
    assert!(reason.contains("cryptgpu party 2 to 0"), "{reason}");

    let (outcome, log) = party0.join().unwrap();
    let err = outcome.unwrap_err().to_string();
    assert!(err.contains("party 0") && err.contains("party 1"), "{err}");
    let log = log.join("\n");
    assert!(log.contains(&impostor.public().to_string()) && log.contains("cryptgpu party 1 to 0"), "{log}");
}

/// The owner's link of a party that dies on receiving its `frames`-th command: it answers
/// nothing more, as a killed process would not.
struct DiesAfter {
    inner: Box<dyn Channel>,
    frames: usize,
}

impl Channel for DiesAfter {
    fn send(&mut self, tag: u16, payload: &[u8]) -> Result<(), ChannelError> {
        match self.frames {
            0 => Err(ChannelError::Closed { peer: self.peer(), context: "after dying".into() }),
            _ => self.inner.send(tag, payload),
        }
    }
    fn recv(&mut self) -> Result<Frame, ChannelError> {
        let frame = self.inner.recv()?;
        self.frames -= 1;
        match self.frames {
            0 => Err(ChannelError::Closed { peer: self.peer(), context: "after dying".into() }),
            _ => Ok(frame),
        }
    }
    fn peer(&self) -> String {
        self.inner.peer()
    }
}

#[test]
fn a_party_killed_mid_run_is_named_by_the_owner() {
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let model = tiny_model(&mut rng);
    let x = random(&mut rng, &[2, 2, 8, 8], 1.0);

    let mut net = net();
    let wait = Duration::from_secs(20);
    let survivors = [net.spawn(0, wait), net.spawn(2, wait)];
    let (listener, key, config) = (net.listeners[1].take().unwrap(), net.keys[1].clone(), net.config(1, wait));
    let victim = std::thread::spawn(move || {
        let mut node = PartyNode::start(listener, key, config).unwrap();
        let party = node.link_parties(&mut |_| {}).unwrap();
        let owner = node.accept_owner(&mut |_| {}).unwrap();
        // The setup, the parameters, one inference; the training step's command kills it. Its
        // links close when `serve` returns, with nothing said to anyone.
        let _ = session::serve(party, &mut DiesAfter { inner: owner, frames: 4 });
    });

    let links = network::connect_parties(&net.parties, &net.owner).unwrap();
    let mut owner = Session::start(links, Vec::new(), &model, None, settings(FixedPoint::new(20).unwrap())).unwrap();
    owner.infer(data(&x), x.shape()).unwrap();
    let Err(err) = owner.train_step(data(&x), x.shape(), &[0, 1], 0.1) else { panic!("a party died mid-step") };
    let err = err.to_string();
    assert!(err.contains("party 1"), "{err}");
    victim.join().unwrap();
    drop(owner);
    for survivor in survivors {
        let (outcome, _) = survivor.join().unwrap();
        let err = outcome.unwrap_err().to_string();
        assert!(err.contains("party 1"), "{err}");
    }
}

/// One inference through parties that have linked, and each party's outcome and log.
fn run_one_inference(net: &Net, parties: Vec<PartyThread>) -> Vec<Vec<String>> {
    let mut rng = ChaCha8Rng::seed_from_u64(9);
    let model = tiny_model(&mut rng);
    let x = random(&mut rng, &[2, 2, 8, 8], 1.0);
    let links = network::connect_parties(&net.parties, &net.owner).unwrap();
    let mut owner = Session::start(links, Vec::new(), &model, None, settings(FixedPoint::new(20).unwrap())).unwrap();
    owner.infer(data(&x), x.shape()).unwrap();
    owner.finish().unwrap();
    let mut logs = Vec::new();
    for (id, p) in parties.into_iter().enumerate() {
        let (outcome, log) = p.join().unwrap();
        assert!(outcome.is_ok(), "party {id}: {outcome:?}\n{}", log.join("\n"));
        logs.push(log);
    }
    logs
}

#[test]
fn idle_connections_do_not_keep_the_parties_from_linking() {
    let started = Instant::now();
    let mut net = net();
    // Waiting in party 0's backlog before it accepts anything: the oldest handshakes it sees.
    let idle: Vec<TcpStream> = (0..40).map(|_| TcpStream::connect(&net.parties.addrs[0]).unwrap()).collect();
    let parties = (0..3).map(|id| net.spawn(id, Duration::from_secs(20))).collect();
    run_one_inference(&net, parties);
    assert!(started.elapsed() < Duration::from_secs(10), "{:?}", started.elapsed());
    // Party 0 never held more than its cap of them: the others were dropped.
    let dropped = idle
        .into_iter()
        .filter(|mut s| {
            s.set_read_timeout(Some(Duration::from_millis(50))).unwrap();
            match s.read(&mut [0u8; 1]) {
                Ok(n) => n == 0,
                Err(e) => !matches!(e.kind(), std::io::ErrorKind::WouldBlock | std::io::ErrorKind::TimedOut),
            }
        })
        .count();
    assert!(dropped >= 40 - network::MAX_HANDSHAKES, "only {dropped} of 40 idle connections were dropped");
}

#[test]
fn a_neighbour_that_never_answers_is_named_when_the_wait_runs_out() {
    let mut net = net();
    // Party 1's port takes connections and says nothing (a hung process); party 2 is not running.
    let _hung = net.listeners[1].take();
    net.listeners[2].take();
    let started = Instant::now();
    let (outcome, _) = net.spawn(0, Duration::from_secs(2)).join().unwrap();
    let elapsed = started.elapsed();
    let err = outcome.unwrap_err().to_string();
    // Not the 30 s a hung handshake may take, nor the 600 s of a link's timeout.
    assert!(elapsed < Duration::from_secs(5), "{elapsed:?}: {err}");
    let (name1, name2) = (net.parties.name(1), net.parties.name(2));
    // "within 2 s" when the wait ran out first; without it when both dials had already failed.
    assert!(err.starts_with("party 0: the other parties did not link"), "{err}");
    assert!(err.contains(&format!("{name1} never linked")) && err.contains(&format!("{name2} never linked")), "{err}");
}

#[test]
fn a_neighbour_that_dropped_during_the_setup_may_link_again() {
    let mut net = net();
    let wait = Duration::from_secs(20);
    // Party 1's listener is bound but not serving yet: the others' links to it wait there.
    let mut parties: Vec<_> = vec![net.spawn(0, wait), net.spawn(2, wait)];
    // An earlier run of party 1 linked to party 0, then died.
    let pinned = LinkPolicy::Only(vec![net.keys[0].public()]);
    let addr0 = net.parties.addrs[0].clone();
    let mut early =
        Link::connect(&addr0, &network::purpose_to(0), &net.keys[1], &pinned, network::link_options()).unwrap();
    early.send(network::tag::HELLO, network::party_purpose(1, 0).as_bytes()).unwrap();
    assert_eq!(early.recv().unwrap().tag, network::tag::WELCOME);
    drop(early);
    parties.insert(1, net.spawn(1, wait));
    let logs = run_one_inference(&net, parties);
    // Seen closed when the other links were up, or when the new one came, whichever was first.
    let rejoined = |l: &String| l.contains("party 1's link closed before") || l.contains("party 1 linked again");
    assert!(logs[0].iter().any(rejoined), "{:#?}", logs[0]);
}
