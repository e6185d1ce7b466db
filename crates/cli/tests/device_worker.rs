//! A device worker process that dies mid-training: clear error, then resume with nothing lost.

use std::io::{BufRead, BufReader, Read, Write};
use std::net::{Shutdown, TcpListener, TcpStream};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{mpsc, Arc};
use std::time::{Duration, Instant};
use trustsplit::train::{train, Scheme, TrainConfig};
use trustsplit_nn::{checkpoint, zoo};

/// Makes a key file with `trustsplit keygen`; returns its path and public key.
fn keygen(tag: &str) -> (PathBuf, String) {
    let dir = std::env::temp_dir().join(format!("trustsplit-worker-keys-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join(format!("{tag}-{}.key", KEYS.fetch_add(1, Ordering::SeqCst)));
    let out = Command::new(env!("CARGO_BIN_EXE_trustsplit")).args(["keygen", "--out"]).arg(&path).output().unwrap();
    assert!(out.status.success(), "{}", String::from_utf8_lossy(&out.stderr));
    (path, String::from_utf8(out.stdout).unwrap().trim().to_string())
}

static KEYS: AtomicU64 = AtomicU64::new(0);

/// The trainer's key, shared by the tests of this file.
fn trainer_key() -> &'static (PathBuf, String) {
    static KEY: std::sync::OnceLock<(PathBuf, String)> = std::sync::OnceLock::new();
    KEY.get_or_init(|| keygen("trainer"))
}

/// A `trustsplit device` process serving the trainer's key, killed when dropped.
struct Worker {
    child: Child,
    addr: String,
    /// The worker's public key.
    key: String,
}

impl Worker {
    fn start() -> Worker {
        let (key_file, key) = keygen("worker");
        let mut command = Command::new(env!("CARGO_BIN_EXE_trustsplit"));
        command.args(["device", "--listen", "127.0.0.1:0", "--backend", "cpu:1", "--allow", &trainer_key().1, "--key"]);
        Worker::spawn(command.arg(&key_file), key)
    }

    /// A worker on plain TCP (`--insecure-plaintext-link`).
    fn start_plaintext() -> Worker {
        let mut command = Command::new(env!("CARGO_BIN_EXE_trustsplit"));
        command.args(["device", "--listen", "127.0.0.1:0", "--backend", "cpu:1", "--insecure-plaintext-link"]);
        Worker::spawn(&mut command, String::new())
    }

    fn spawn(command: &mut Command, key: String) -> Worker {
        let mut child = command.stderr(Stdio::piped()).spawn().unwrap();
        let stderr = child.stderr.take().unwrap();
        let (tx, rx) = std::sync::mpsc::channel();
        std::thread::spawn(move || {
            for line in BufReader::new(stderr).lines().map_while(Result::ok) {
                if let Some(rest) = line.split("listening on ").nth(1) {
                    let _ = tx.send(rest.split_whitespace().next().unwrap_or("").to_string());
                }
            }
        });
        let addr = rx.recv_timeout(Duration::from_secs(60)).expect("device worker did not report its address");
        Worker { child, addr, key }
    }
    fn kill(&mut self) {
        let _ = self.child.kill();
        let _ = self.child.wait();
    }
}

impl Drop for Worker {
    fn drop(&mut self) {
        self.kill();
    }
}

/// A TCP relay in front of a worker that counts the bytes the trainer sends, so the test can kill
/// the worker at a point fixed by the work done rather than by the wall clock.
struct CountingRelay {
    addr: String,
    sent: Arc<AtomicU64>,
    crossed: mpsc::Receiver<()>,
}

impl CountingRelay {
    /// Relays to `upstream`; `crossed` fires once the trainer has sent `threshold` bytes.
    fn start(upstream: String, threshold: u64) -> CountingRelay {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let sent = Arc::new(AtomicU64::new(0));
        let (tx, crossed) = mpsc::channel();
        let counter = sent.clone();
        std::thread::spawn(move || {
            for client in listener.incoming().map_while(Result::ok) {
                let Ok(worker) = TcpStream::connect(&upstream) else { return };
                // Without this, Nagle's algorithm holds back every small reply for tens of milliseconds.
                let _ = (client.set_nodelay(true), worker.set_nodelay(true));
                let (client_in, worker_out) = (client.try_clone().unwrap(), worker.try_clone().unwrap());
                std::thread::spawn(move || pump(worker, client, None));
                let (counter, tx) = (counter.clone(), tx.clone());
                std::thread::spawn(move || pump(client_in, worker_out, Some((counter, threshold, tx))));
            }
        });
        CountingRelay { addr, sent, crossed }
    }
}

/// Copies `from` to `to` until either side closes, then closes both.
fn pump(mut from: TcpStream, mut to: TcpStream, count: Option<(Arc<AtomicU64>, u64, mpsc::Sender<()>)>) {
    let mut buf = vec![0u8; 1 << 16];
    loop {
        let n = match from.read(&mut buf) {
            Ok(0) | Err(_) => break,
            Ok(n) => n,
        };
        if to.write_all(&buf[..n]).is_err() {
            break;
        }
        if let Some((sent, threshold, tx)) = &count {
            let before = sent.fetch_add(n as u64, Ordering::SeqCst);
            if before < *threshold && before + n as u64 >= *threshold {
                let _ = tx.send(());
            }
        }
    }
    let _ = from.shutdown(Shutdown::Both);
    let _ = to.shutdown(Shutdown::Both);
}

/// A gpu-only run on `device`; a `tcp://` device is reached over the link, pinned to `worker_key`.
fn config(epochs: usize, device: &str, worker_key: Option<&str>) -> TrainConfig {
    let mut cfg = TrainConfig::new("lenet5", "embedded");
    cfg.scheme = Scheme::named("gpu-only").unwrap();
    cfg.device = device.to_string();
    if let Some(key) = worker_key {
        cfg.device_link.key = Some(trainer_key().0.clone());
        cfg.device_link.device_key = vec![key.parse().unwrap()];
    }
    cfg.epochs = epochs;
    cfg.schedule = trustsplit_nn::optim::Schedule::Cosine { epochs: 3 };
    cfg.train_limit = 1500;
    cfg.test_limit = 200;
    cfg
}

fn out_dir(tag: &str) -> PathBuf {
    let d = std::env::temp_dir().join(format!("trustsplit-worker-{tag}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&d);
    d
}

fn weights(path: &std::path::Path) -> Vec<(String, trustsplit_nn::Tensor)> {
    let mut m = zoo::build("lenet5", &[1, 28, 28], 10, 0).unwrap();
    checkpoint::load(path).unwrap().restore_model(&mut m).unwrap();
    m.named_params().into_iter().map(|(n, t)| (n, t.clone())).collect()
}

#[test]
fn killed_worker_gives_a_clear_error_and_training_resumes_without_loss() {
    // The reference: an uninterrupted run on an in-process one-thread CPU device.
    let reference = train(&config(3, "cpu:1", None), &out_dir("reference"), false, false).unwrap();

    let out = out_dir("interrupted");
    let mut first = Worker::start();
    let measuring = CountingRelay::start(first.addr.clone(), u64::MAX);
    train(&config(1, &format!("tcp://{}", measuring.addr), Some(&first.key)), &out, false, false).unwrap();
    let bytes_per_epoch = measuring.sent.load(Ordering::SeqCst);

    // A worker that is gone before the run starts: a connection error naming the address.
    first.kill();
    let gone = format!(
        "{:#}",
        train(&config(3, &format!("tcp://{}", first.addr), Some(&first.key)), &out, true, false).unwrap_err()
    );
    assert!(gone.contains(&first.addr), "{gone}");

    // A worker killed halfway through the second epoch: the step fails promptly with a clear error.
    let mut second = Worker::start();
    let relay = CountingRelay::start(second.addr.clone(), bytes_per_epoch / 2);
    let cfg = config(3, &format!("tcp://{}", relay.addr), Some(&second.key));
    let (out2, started) = (out.clone(), Instant::now());
    let run = std::thread::spawn(move || train(&cfg, &out2, true, false));
    relay.crossed.recv_timeout(Duration::from_secs(120)).expect("the resumed run never reached mid-epoch");
    second.kill();
    let err = format!("{:#}", run.join().unwrap().unwrap_err());
    assert!(started.elapsed() < Duration::from_secs(60), "the failure took {:?}", started.elapsed());
    assert!(err.contains("device") && (err.contains("closed") || err.contains("Connection reset")), "{err}");

    // The last checkpoint survived; a new worker finishes the run.
    let third = Worker::start();
    let done = train(&config(3, &format!("tcp://{}", third.addr), Some(&third.key)), &out, true, false).unwrap();
    assert_eq!(done.resumed_from_epoch, 1);
    assert_eq!(done.accuracy, reference.accuracy);
    assert_eq!(weights(&done.checkpoint), weights(&reference.checkpoint), "resumed weights differ");
}

#[test]
fn an_epoch_replayed_after_its_worker_died_is_charged_again_under_asymml() {
    // Under AsymML the epoch the worker died in had already released part of its samples' noised
    // residuals; replayed after --resume, it releases them again, and is charged again.
    let asymml = |epochs: usize, worker: &Worker, addr: &str| {
        let mut cfg = config(epochs, &format!("tcp://{addr}"), Some(&worker.key));
        cfg.scheme = Scheme::named("asymml").unwrap();
        cfg.train_limit = 600;
        cfg
    };
    let out = out_dir("asymml-charged");
    let mut first = Worker::start();
    let measuring = CountingRelay::start(first.addr.clone(), u64::MAX);
    train(&asymml(1, &first, &measuring.addr), &out, false, false).unwrap();
    let bytes_per_epoch = measuring.sent.load(Ordering::SeqCst);
    first.kill();

    // Killed halfway through the second epoch (its training part: the evaluation sends far less).
    let mut second = Worker::start();
    let relay = CountingRelay::start(second.addr.clone(), bytes_per_epoch / 2);
    let (cfg, out2) = (asymml(3, &second, &relay.addr), out.clone());
    let run = std::thread::spawn(move || train(&cfg, &out2, true, false));
    relay.crossed.recv_timeout(Duration::from_secs(120)).expect("the resumed run never reached mid-epoch");
    second.kill();
    assert!(run.join().unwrap().is_err());

    let third = Worker::start();
    let done = train(&asymml(3, &third, &third.addr), &out, true, false).unwrap();
    let p = done.privacy.unwrap();
    let ledger = done.scheme_report.placement.privacy.unwrap();
    assert_eq!((p.participations, p.evaluation.evaluations), (4, 3), "{p:?}");
    let epsilon = |participations| ledger.spent(participations).unwrap().epsilon;
    assert_eq!(p.epsilon, Some(epsilon(4)), "the conservative bound: epochs 1, 2, 2 again and 3");
    assert!(epsilon(4) > epsilon(3));
}

#[test]
fn a_worker_refuses_an_unknown_trainer_and_a_trainer_refuses_an_unknown_worker() {
    let worker = Worker::start();
    let (stranger_file, _) = keygen("stranger");
    let device = format!("tcp://{}", worker.addr);
    // A trainer whose key the worker does not allow.
    let mut cfg = config(1, &device, Some(&worker.key));
    cfg.device_link.key = Some(stranger_file);
    let err = format!("{:#}", train(&cfg, &out_dir("stranger"), false, false).unwrap_err());
    assert!(err.contains("refused") && err.contains("not allowed"), "{err}");
    // A worker that is not the one pinned.
    let (_, other_key) = keygen("other");
    let err =
        format!("{:#}", train(&config(1, &device, Some(&other_key)), &out_dir("pinned"), false, false).unwrap_err());
    assert!(err.contains(&worker.key) && err.contains("expected"), "{err}");
    // No key at all, or a key count that does not match the devices.
    let err = format!("{:#}", train(&config(1, &device, None), &out_dir("nokey"), false, false).unwrap_err());
    assert!(err.contains("--key FILE") && err.contains("--insecure-plaintext-link"), "{err}");
    let mut cfg = config(1, &format!("{device},{device}"), Some(&worker.key));
    cfg.device_link.device_key.truncate(1);
    let err = format!("{:#}", train(&cfg, &out_dir("count"), false, false).unwrap_err());
    assert!(err.contains("2 tcp:// device(s)"), "{err}");
}

/// A TCP relay that keeps every byte the trainer sends to the worker.
struct CapturingRelay {
    addr: String,
    captured: Arc<std::sync::Mutex<Vec<u8>>>,
}

impl CapturingRelay {
    fn start(upstream: String) -> CapturingRelay {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        let addr = listener.local_addr().unwrap().to_string();
        let captured = Arc::new(std::sync::Mutex::new(Vec::new()));
        let keep = captured.clone();
        std::thread::spawn(move || {
            for mut client in listener.incoming().map_while(Result::ok) {
                let Ok(worker) = TcpStream::connect(&upstream) else { return };
                let _ = (client.set_nodelay(true), worker.set_nodelay(true));
                let (back_from, back_to) = (worker.try_clone().unwrap(), client.try_clone().unwrap());
                std::thread::spawn(move || pump(back_from, back_to, None));
                let (keep, mut worker) = (keep.clone(), worker);
                std::thread::spawn(move || {
                    let mut buf = vec![0u8; 1 << 16];
                    while let Ok(n @ 1..) = client.read(&mut buf) {
                        keep.lock().unwrap().extend_from_slice(&buf[..n]);
                        if worker.write_all(&buf[..n]).is_err() {
                            break;
                        }
                    }
                });
            }
        });
        CapturingRelay { addr, captured }
    }
}

fn compressed_len(bytes: &[u8]) -> usize {
    let mut z = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::fast());
    z.write_all(bytes).unwrap();
    z.finish().unwrap().len()
}

#[test]
fn the_link_to_a_device_carries_no_released_value_in_the_clear() {
    // gpu-only sends LeNet-5's first weight, as built from seed 0, to the device at its first step.
    let model = zoo::build("lenet5", &[1, 28, 28], 10, 0).unwrap();
    let (name, weight) = &model.named_params()[0];
    let weight: Vec<u8> = weight.iter().flat_map(|v| v.to_le_bytes()).collect();
    let probe = &weight[..64];
    for plaintext in [false, true] {
        let worker = if plaintext { Worker::start_plaintext() } else { Worker::start() };
        let relay = CapturingRelay::start(worker.addr.clone());
        let mut cfg = config(1, &format!("tcp://{}", relay.addr), (!plaintext).then_some(worker.key.as_str()));
        cfg.device_link.insecure_plaintext_link = plaintext;
        cfg.train_limit = 64;
        cfg.test_limit = 32;
        train(&cfg, &out_dir(&format!("capture-{plaintext}")), false, false).unwrap();
        let captured = relay.captured.lock().unwrap().clone();
        assert!(captured.len() > 1 << 20, "{} bytes captured", captured.len());
        let found = captured.windows(probe.len()).any(|w| w == probe);
        let ratio = compressed_len(&captured) as f64 / captured.len() as f64;
        if plaintext {
            // The control: on plain TCP the weight is there and the stream compresses.
            assert!(found, "{name} not found in the plaintext capture: the probe is wrong");
            assert!(ratio < 0.95, "the plaintext capture compresses to {ratio}");
        } else {
            assert!(!found, "{name}'s bytes crossed the link in the clear");
            assert!(ratio > 0.99, "the encrypted capture compresses to {ratio}");
        }
    }
}
