//! The recording holds exactly what the trusted side's transcript says crossed: every released
//! value, byte for byte (matched by SHA-256), and every result the device returned.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::collections::BTreeSet;
use std::sync::Arc;
use trustsplit_attacks::{RecordedView, Recorder, RecordingBackend};
use trustsplit_boundary::{Direction, Secret, Transcript};
use trustsplit_device::{Backend, CpuBackend, Device};
use trustsplit_nn::layers::{Conv2d, Layer, Linear, Pool};
use trustsplit_nn::optim::{Optimizer, OptimizerKind};
use trustsplit_nn::tensor::from_vec;
use trustsplit_nn::{Model, Tensor};
use trustsplit_schemes::asymml::{self, AsymmlConfig, RankRule};
use trustsplit_schemes::{gpu_only, SplitRunner};

fn random(rng: &mut ChaCha8Rng, shape: &[usize], scale: f32) -> Tensor {
    let n = shape.iter().product();
    from_vec(shape, (0..n).map(|_| rng.random_range(-scale..scale)).collect())
}

fn model(rng: &mut ChaCha8Rng) -> Model {
    let layers = vec![
        Layer::Conv2d(Conv2d {
            weight: random(rng, &[6, 3, 3, 3], 0.3),
            bias: Some(random(rng, &[6], 0.1)),
            stride: 1,
            padding: 1,
        }),
        Layer::Relu,
        Layer::MaxPool(Pool { kernel: 2, stride: 2, padding: 0 }),
        Layer::Conv2d(Conv2d { weight: random(rng, &[8, 6, 3, 3], 0.2), bias: None, stride: 1, padding: 1 }),
        Layer::Relu,
        Layer::Flatten,
        Layer::Linear(Linear { weight: random(rng, &[10, 8 * 16], 0.1), bias: Some(random(rng, &[10], 0.1)) }),
    ];
    Model::new("small", &[3, 8, 8], layers).unwrap()
}

fn temp(name: &str) -> std::path::PathBuf {
    let dir = std::env::temp_dir().join(format!("trustsplit-record-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&dir);
    dir
}

/// Two training steps and an evaluation on a recording device; returns the transcript.
fn run(make: impl FnOnce(Device, Arc<Transcript>) -> SplitRunner, dir: &std::path::Path) -> Arc<Transcript> {
    let recorder = Recorder::create(dir, 1 << 30).unwrap();
    let device =
        Device::local(Box::new(RecordingBackend::new(Box::new(CpuBackend::new(1).unwrap()), recorder.clone())));
    let transcript = Arc::new(Transcript::keeping_records().with_digests());
    let mut runner = make(device, transcript.clone());
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    let mut model = model(&mut rng);
    let mut opt = Optimizer::new(OptimizerKind::Sgd { momentum: 0.9, nesterov: false }, 0.0);
    for _ in 0..2 {
        let x = random(&mut rng, &[4, 3, 8, 8], 1.0);
        let y: Vec<usize> = (0..4).map(|_| rng.random_range(0..10)).collect();
        runner.train_step(&mut model, Secret::new(x), &Secret::new(y), &mut opt, 0.05).unwrap();
    }
    let x = random(&mut rng, &[3, 3, 8, 8], 1.0);
    runner.eval_batch(&mut model, Secret::new(x), &Secret::new(vec![1, 2, 3])).unwrap();
    recorder.finish().unwrap();
    transcript
}

fn check_recording_matches(transcript: &Transcript, dir: &std::path::Path, what: &str) {
    let view = RecordedView::open(dir).unwrap();
    assert!(!view.requests.is_empty(), "{what}: nothing recorded");
    let records = transcript.records().unwrap();
    let digests = |direction: Direction| -> Vec<String> {
        records.iter().filter(|r| r.direction == direction).map(|r| r.sha256.clone().expect("digests on")).collect()
    };
    let (mut received, mut sent) = (BTreeSet::new(), Vec::new());
    for request in &view.requests {
        for t in &request.tensors {
            match t.direction.as_str() {
                "received" => drop(received.insert(t.sha256.clone())),
                _ => sent.push(t.sha256.clone()),
            }
        }
        // The kept tensors are the ones indexed.
        for t in &request.tensors {
            let loaded = view.load(request, &t.name).unwrap();
            assert_eq!(trustsplit_boundary::wire_digest(&loaded.values), t.sha256, "{what}: {}", request.detail);
        }
    }
    // Every value the device held was released, and every release reached the device (a value
    // released once may be sent twice, as AsymML's residual for the weight gradient).
    let released: BTreeSet<String> = digests(Direction::TeeToDevice).into_iter().collect();
    assert_eq!(received, released, "{what}: the device held values other than the released ones");
    let mut returned = digests(Direction::DeviceToTee);
    returned.sort();
    sent.sort();
    assert_eq!(sent, returned, "{what}: the device's results differ from what the transcript says came back");
}

#[test]
fn a_recording_holds_exactly_the_transcripts_releases() {
    let dir = temp("gpu-only");
    let transcript = run(|d, t| gpu_only::runner(vec![d], 64 << 20, t).unwrap(), &dir);
    check_recording_matches(&transcript, &dir, "gpu-only");
    // gpu-only releases the raw input: the first convolution's x is the batch itself.
    let view = RecordedView::open(&dir).unwrap();
    let first = view.of_op("conv_forward").next().unwrap();
    assert_eq!(first.tensors[0].shape, vec![4, 3, 8, 8]);
    let _ = std::fs::remove_dir_all(&dir);

    for protect_gradients in [false, true] {
        let dir = temp(&format!("asymml-{protect_gradients}"));
        let cfg = AsymmlConfig {
            rank: RankRule::Schedule(vec![1]),
            protect_gradients,
            noise_multiplier: 0.5,
            ..AsymmlConfig::default()
        };
        let transcript = run(|d, t| asymml::runner(d, cfg, 64 << 20, t).unwrap(), &dir);
        check_recording_matches(&transcript, &dir, &format!("asymml, protect_gradients {protect_gradients}"));
        let _ = std::fs::remove_dir_all(&dir);
    }
}

#[test]
fn a_recording_past_its_limit_keeps_indexing_and_a_second_recording_in_one_folder_is_refused() {
    let dir = temp("limit");
    let recorder = Recorder::create(&dir, 1000).unwrap();
    let mut device = RecordingBackend::new(Box::new(CpuBackend::new(1).unwrap()), recorder.clone());
    let shape = trustsplit_device::GemmShape { m: 4, n: 5, k: 6, trans_a: false, trans_b: true };
    let a: Vec<f32> = (0..24).map(|i| i as f32 * 0.5 - 3.0).collect();
    let b: Vec<f32> = (0..30).map(|i| 1.0 - i as f32 * 0.25).collect();
    for _ in 0..6 {
        device.gemm(&shape, &a, &b).unwrap();
    }
    recorder.finish().unwrap();
    let view = RecordedView::open(&dir).unwrap();
    assert_eq!(view.requests.len(), 6);
    // Each request holds (24 + 30 + 20) * 4 = 296 bytes: three fit in 1000.
    let kept: Vec<bool> = view.requests.iter().map(|r| r.file.is_some()).collect();
    assert_eq!(kept, [true, true, true, false, false, false]);
    let b_loaded = view.load(&view.requests[0], "B").unwrap();
    assert_eq!((b_loaded.shape, b_loaded.values), (vec![5, 6], b.clone()));
    let err = view.load(&view.requests[4], "A").unwrap_err();
    assert!(err.contains("size limit"), "{err}");
    let err = Recorder::create(&dir, 1000).err().unwrap();
    assert!(err.contains("already there"), "{err}");
    let _ = std::fs::remove_dir_all(&dir);
}
