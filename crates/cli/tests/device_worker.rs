//! A device worker process that dies mid-training: clear error, then resume with nothing lost.

use std::io::{BufRead, BufReader};
use std::path::PathBuf;
use std::process::{Child, Command, Stdio};
use std::time::{Duration, Instant};
use trustsplit::train::{train, Scheme, TrainConfig};
use trustsplit_nn::{checkpoint, zoo};

/// A `trustsplit device` process, killed when dropped.
struct Worker {
    child: Child,
    addr: String,
}

impl Worker {
    fn start() -> Worker {
        let mut child = Command::new(env!("CARGO_BIN_EXE_trustsplit"))
            .args(["device", "--listen", "127.0.0.1:0", "--backend", "cpu:1"])
            .stderr(Stdio::piped())
            .spawn()
            .unwrap();
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
        Worker { child, addr }
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

fn config(epochs: usize, device: &str) -> TrainConfig {
    let mut cfg = TrainConfig::new("lenet5", "embedded");
    cfg.scheme = Scheme::GpuOnly;
    cfg.device = device.to_string();
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
    let reference = train(&config(3, "cpu:1"), &out_dir("reference"), false, false).unwrap();

    let out = out_dir("interrupted");
    let mut first = Worker::start();
    train(&config(1, &format!("tcp://{}", first.addr)), &out, false, false).unwrap();

    // A worker that is gone before the run starts: a connection error naming the address.
    first.kill();
    let gone = format!("{:#}", train(&config(3, &format!("tcp://{}", first.addr)), &out, true, false).unwrap_err());
    assert!(gone.contains(&first.addr), "{gone}");

    // A worker killed in the middle of a step: the step fails promptly with a clear error.
    let mut second = Worker::start();
    let cfg = config(3, &format!("tcp://{}", second.addr));
    let (out2, started) = (out.clone(), Instant::now());
    let run = std::thread::spawn(move || train(&cfg, &out2, true, false));
    std::thread::sleep(Duration::from_millis(700));
    second.kill();
    let err = format!("{:#}", run.join().unwrap().unwrap_err());
    assert!(started.elapsed() < Duration::from_secs(60), "the failure took {:?}", started.elapsed());
    assert!(err.contains("device") && (err.contains("closed") || err.contains("Connection reset")), "{err}");

    // The last checkpoint survived; a new worker finishes the run.
    let third = Worker::start();
    let done = train(&config(3, &format!("tcp://{}", third.addr)), &out, true, false).unwrap();
    assert_eq!(done.resumed_from_epoch, 1);
    assert_eq!(done.accuracy, reference.accuracy);
    assert_eq!(weights(&done.checkpoint), weights(&reference.checkpoint), "resumed weights differ");
}
