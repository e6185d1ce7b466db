//! Uploads: the owner shares a dataset into the parties' stores once; a later run trains and
//! evaluates on record numbers and computes what sharing each batch would have computed. A store
//! that holds other data, or a party with no store, is refused with a clear error.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::path::{Path, PathBuf};
use std::thread::JoinHandle;
use trustsplit_boundary::{Channel, ChannelOptions, InProcessChannel};
use trustsplit_cryptgpu::model::{Sgd, DEFAULT_ACTIVATION_BOUND};
use trustsplit_cryptgpu::party::{local_links, MpcError, Party};
use trustsplit_cryptgpu::ring::FixedPoint;
use trustsplit_cryptgpu::session::{self, RunSettings, Session, UploadRef};
use trustsplit_cryptgpu::store::{self, Fingerprint, UploadHeader};
use trustsplit_nn::layers::{Conv2d, Layer, Linear};
use trustsplit_nn::tensor::{data, from_vec};
use trustsplit_nn::{Mode, Model};

const SHAPE: [usize; 3] = [2, 4, 4];
const CLASSES: usize = 3;

fn model(rng: &mut ChaCha8Rng) -> Model {
    let mut w = |n: usize, scale: f32| (0..n).map(|_| rng.random_range(-scale..scale)).collect::<Vec<f32>>();
    let layers = vec![
        Layer::Conv2d(Conv2d {
            weight: from_vec(&[2, 2, 3, 3], w(36, 0.4)),
            bias: Some(from_vec(&[2], w(2, 0.1))),
            stride: 1,
            padding: 1,
        }),
        Layer::Relu,
        Layer::Flatten,
        Layer::Linear(Linear { weight: from_vec(&[3, 32], w(96, 0.3)), bias: Some(from_vec(&[3], w(3, 0.1))) }),
    ];
    Model::new("small", &SHAPE, layers).unwrap()
}

fn settings(uploaded: Option<UploadRef>) -> RunSettings {
    RunSettings {
        fp: FixedPoint::default(),
        sgd: Sgd { lr: 0.0, momentum: 0.0, weight_decay: 0.0 },
        activation_bound: DEFAULT_ACTIVATION_BOUND,
        uploaded,
    }
}

/// Three parties serving one run each, party `i` keeping its uploads in `stores[i]`.
type PartyThreads = Vec<JoinHandle<Result<(), MpcError>>>;

fn parties(stores: [Option<PathBuf>; 3]) -> (Vec<Box<dyn Channel>>, PartyThreads) {
    let opts = ChannelOptions { max_frame_bytes: 1 << 31, timeout: None };
    let (mut ends, mut threads): (Vec<Box<dyn Channel>>, _) = (Vec::new(), Vec::new());
    for ((id, (next, prev)), store) in local_links().into_iter().enumerate().zip(stores) {
        let (mine, mut theirs) = InProcessChannel::pair(opts);
        ends.push(Box::new(mine));
        threads.push(std::thread::spawn(move || {
            let party = Party::connect(id, next, prev, FixedPoint::default())?;
            session::serve_with_store(party, &mut theirs, store.as_deref())
        }));
    }
    (ends, threads)
}

fn stores(root: &Path) -> [Option<PathBuf>; 3] {
    std::array::from_fn(|i| {
        let d = root.join(format!("party{i}"));
        std::fs::create_dir_all(&d).unwrap();
        Some(d)
    })
}

struct Split {
    x: Vec<f32>,
    labels: Vec<usize>,
}

impl Split {
    fn random(rng: &mut ChaCha8Rng, n: usize) -> Split {
        let per: usize = SHAPE.iter().product();
        Split {
            x: (0..n * per).map(|_| rng.random_range(-1.0..1.0f32)).collect(),
            labels: (0..n).map(|_| rng.random_range(0..CLASSES)).collect(),
        }
    }

    fn rows(&self, rows: &[usize]) -> (Vec<f32>, Vec<usize>) {
        let per: usize = SHAPE.iter().product();
        let x = rows.iter().flat_map(|&r| self.x[r * per..(r + 1) * per].iter().copied()).collect();
        (x, rows.iter().map(|&r| self.labels[r]).collect())
    }

    fn header(&self, split: &str) -> UploadHeader {
        let fp = FixedPoint::default();
        let mut f = Fingerprint::new(&SHAPE, CLASSES, fp.frac_bits);
        let per: usize = SHAPE.iter().product();
        for (r, &label) in self.labels.iter().enumerate() {
            f.record(&fp.encode_all(&self.x[r * per..(r + 1) * per]).unwrap(), label);
        }
        UploadHeader {
            name: "toy".into(),
            split: split.into(),
            count: self.labels.len(),
            sample_shape: SHAPE.to_vec(),
            classes: CLASSES,
            frac_bits: fp.frac_bits,
            fingerprint: f.finish(self.labels.len()),
        }
    }

    /// Uploads in batches of 2 records.
    fn upload(&self, session: &mut Session, split: &str) {
        let per: usize = SHAPE.iter().product();
        let batches = self.labels.chunks(2).zip(self.x.chunks(2 * per)).map(|(l, x)| (x.to_vec(), l.to_vec()));
        let mut seen = Vec::new();
        session.upload_split(&self.header(split), batches, &mut |n| seen.push(n)).unwrap();
        assert_eq!(seen.last(), Some(&self.labels.len()));
    }
}

fn temp_root(name: &str) -> PathBuf {
    let root = std::env::temp_dir().join(format!("ts-upload-{name}-{}", std::process::id()));
    let _ = std::fs::remove_dir_all(&root);
    root
}

#[test]
fn training_on_stored_records_matches_training_on_shared_batches() {
    let mut rng = ChaCha8Rng::seed_from_u64(31);
    let net = model(&mut rng);
    let (train, test) = (Split::random(&mut rng, 7), Split::random(&mut rng, 5));
    let root = temp_root("match");
    let dirs = stores(&root);

    let (links, threads) = parties(dirs.clone());
    let mut up = Session::for_upload(links);
    train.upload(&mut up, "train");
    test.upload(&mut up, "test");
    up.finish().unwrap();
    threads.into_iter().for_each(|t| t.join().unwrap().unwrap());
    for (i, d) in dirs.iter().enumerate() {
        // Each party holds its own file, and only that; none holds the plaintext.
        let f = std::fs::read(store::path(d.as_ref().unwrap(), "toy", "train", i)).unwrap();
        let plain: Vec<u8> =
            FixedPoint::default().encode_all(&train.x[..4]).unwrap().iter().flat_map(|w| w.to_le_bytes()).collect();
        assert!(!f.windows(plain.len()).any(|w| w == plain), "party {i}'s file holds plaintext");
    }

    let reference = UploadRef {
        name: "toy".into(),
        train_fingerprint: train.header("train").fingerprint,
        test_fingerprint: test.header("test").fingerprint,
    };
    let (rows, lr) = ([5usize, 0, 3, 3], 0.5);

    // On the stores: evaluate test records, then one training step.
    let (links, threads) = parties(dirs.clone());
    let mut stored = Session::start(links, threads, &net, None, settings(Some(reference))).unwrap();
    assert!(stored.is_uploaded());
    let eval_stored = stored.infer_rows(&[4, 1]).unwrap();
    let logits_stored = stored.train_rows(&rows, lr).unwrap();
    let mut after_stored = net.clone();
    stored.export(&mut after_stored).unwrap();
    stored.finish().unwrap();

    // The same on batches the owner shares.
    let mut shared = Session::local(&net, None, settings(None)).unwrap();
    let (x, _) = test.rows(&[4, 1]);
    let eval_shared = shared.infer(&x, &[2, 2, 4, 4]).unwrap();
    let (x, labels) = train.rows(&rows);
    let logits_shared = shared.train_step(&x, &[4, 2, 4, 4], &labels, lr).unwrap();
    let mut after_shared = net.clone();
    shared.export(&mut after_shared).unwrap();
    shared.finish().unwrap();

    // And in plaintext.
    let mut plain = net.clone();
    let (x, _) = test.rows(&[4, 1]);
    let (expected, _) = plain.forward(&from_vec(&[2, 2, 4, 4], x), Mode::Eval).unwrap();
    let close = |a: &[f32], b: &[f32], tol: f32| a.iter().zip(b).all(|(a, b)| (a - b).abs() <= tol);
    assert!(close(&eval_stored.values, data(&expected), 1e-3), "{:?} vs {:?}", eval_stored.values, data(&expected));
    assert!(close(&eval_stored.values, &eval_shared.values, 1e-4));
    assert!(close(&logits_stored.values, &logits_shared.values, 1e-4));
    let params = |m: &mut Model| m.params_mut().iter().flat_map(|p| data(p).to_vec()).collect::<Vec<f32>>();
    let (a, b, before) = (params(&mut after_stored), params(&mut after_shared), params(&mut net.clone()));
    assert!(close(&a, &b, 1e-4), "the step on stored records differs from the step on shared ones");
    assert!(!close(&a, &before, 1e-3), "the step changed nothing");
    std::fs::remove_dir_all(&root).unwrap();
}

#[test]
fn a_store_of_other_data_or_no_store_is_refused() {
    let mut rng = ChaCha8Rng::seed_from_u64(32);
    let net = model(&mut rng);
    let (train, test) = (Split::random(&mut rng, 4), Split::random(&mut rng, 2));
    let root = temp_root("refused");
    let dirs = stores(&root);

    // A party without a store takes no upload, and says so.
    let (links, threads) = parties([dirs[0].clone(), None, dirs[2].clone()]);
    let mut up = Session::for_upload(links);
    let per: usize = SHAPE.iter().product();
    let err = up
        .upload_split(&train.header("train"), std::iter::once((train.x[..per].to_vec(), vec![0])), &mut |_| {})
        .and_then(|()| up.finish())
        .unwrap_err()
        .to_string();
    assert!(err.contains("party 1 keeps no uploads") && err.contains("--store"), "{err}");
    threads.into_iter().for_each(|t| assert!(t.join().unwrap().is_err()));

    let (links, threads) = parties(dirs.clone());
    let mut up = Session::for_upload(links);
    train.upload(&mut up, "train");
    test.upload(&mut up, "test");
    up.finish().unwrap();
    threads.into_iter().for_each(|t| t.join().unwrap().unwrap());

    // The owner's copy differs from what was uploaded: every party refuses the run.
    let other = Split::random(&mut rng, 4);
    let reference = UploadRef {
        name: "toy".into(),
        train_fingerprint: other.header("train").fingerprint,
        test_fingerprint: test.header("test").fingerprint,
    };
    let (links, threads) = parties(dirs.clone());
    let err = Session::start(links, threads, &net, None, settings(Some(reference)))
        .and_then(|mut s| s.train_rows(&[0], 0.1).map(|_| ()))
        .unwrap_err()
        .to_string();
    assert!(err.contains("is not the data the owner holds") && err.contains("upload it again"), "{err}");

    // An upload under another name does not exist.
    let reference = UploadRef { name: "nope".into(), ..train_ref(&train, &test) };
    let (links, threads) = parties(dirs.clone());
    let err = Session::start(links, threads, &net, None, settings(Some(reference)))
        .and_then(|mut s| s.infer_rows(&[0]).map(|_| ()))
        .unwrap_err()
        .to_string();
    assert!(err.contains("holds no upload \"nope\""), "{err}");

    // Record numbers past the split.
    let (links, threads) = parties(dirs.clone());
    let mut s = Session::start(links, threads, &net, None, settings(Some(train_ref(&train, &test)))).unwrap();
    let err = s.infer_rows(&[2]).err().unwrap().to_string();
    assert!(err.contains("record 2 of a split of 2 records"), "{err}");
    std::fs::remove_dir_all(&root).unwrap();
}

fn train_ref(train: &Split, test: &Split) -> UploadRef {
    UploadRef {
        name: "toy".into(),
        train_fingerprint: train.header("train").fingerprint,
        test_fingerprint: test.header("test").fingerprint,
    }
}
