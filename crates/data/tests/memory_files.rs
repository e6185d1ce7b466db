//! Datasets from in-memory files (`load_from_files`) and finding the files to send
//! (`locate_files`): same results as loading the folder, same strictness, errors naming the file.

mod common;

use std::path::Path;

use common::{cifar_file, gzip, random_bytes, random_labels, write, write_mnist, Split};
use trustsplit_data::{load, load_from_files, locate_files, DataError, DatasetKind};

type Files = Vec<(String, Vec<u8>)>;

/// What a data owner would send for `dir`: the located files, read.
fn read_located(kind: DatasetKind, dir: &Path) -> Files {
    locate_files(kind, dir).unwrap().into_iter().map(|(name, path)| (name, std::fs::read(path).unwrap())).collect()
}

/// The four MNIST files in memory, raw.
fn mnist_files(train: &Split, test: &Split) -> Files {
    vec![
        ("train-images-idx3-ubyte".into(), train.image_file()),
        ("train-labels-idx1-ubyte".into(), train.label_file()),
        ("t10k-images-idx3-ubyte".into(), test.image_file()),
        ("t10k-labels-idx1-ubyte".into(), test.label_file()),
    ]
}

fn set(files: &mut Files, name: &str, bytes: Vec<u8>) {
    files.iter_mut().find(|(n, _)| n == name).unwrap().1 = bytes;
}

#[test]
fn idx_from_memory_equals_idx_from_disk() {
    for gz in [false, true] {
        let dir = tempfile::tempdir().unwrap();
        let (train, test) = (Split::random(7, 5, 4, 1), Split::random(3, 5, 4, 2));
        write_mnist(dir.path(), &train, &test, gz);
        let files = read_located(DatasetKind::FashionMnist, dir.path());
        assert_eq!(files.iter().all(|(n, _)| n.ends_with(".gz")), gz, "names keep .gz: {:?}", files[0].0);
        let from_memory = load_from_files(DatasetKind::FashionMnist, &files).unwrap();
        assert_eq!(from_memory, load(DatasetKind::FashionMnist, Some(dir.path())).unwrap());
        assert_eq!(from_memory.train.name, "fashion-mnist/train");
        assert_eq!(from_memory.train.labels, train.labels);
        assert_eq!(from_memory.test.images, test.images);
    }
}

#[test]
fn raw_name_wins_over_gz_and_other_names_are_ignored() {
    let (train, test) = (Split::random(4, 3, 3, 5), Split::random(2, 3, 3, 6));
    let mut files = mnist_files(&train, &test);
    // A broken .gz beside the raw file is never read, as on disk; unrelated files are ignored.
    files.push(("train-images-idx3-ubyte.gz".into(), b"\x1f\x8bnot gzip".to_vec()));
    files.push(("README.txt".into(), b"hello".to_vec()));
    let splits = load_from_files(DatasetKind::Mnist, &files).unwrap();
    assert_eq!(splits.train.images, train.images);
    assert_eq!(splits.test.name, "mnist/test");
}

#[test]
fn gz_names_alone_are_decompressed() {
    let (train, test) = (Split::random(4, 3, 3, 7), Split::random(2, 3, 3, 8));
    let files: Files = mnist_files(&train, &test).into_iter().map(|(n, b)| (format!("{n}.gz"), gzip(&b))).collect();
    let splits = load_from_files(DatasetKind::Mnist, &files).unwrap();
    assert_eq!(splits.train.images, train.images);
    assert_eq!(splits.test.labels, test.labels);
}

#[test]
fn cifar10_from_memory_equals_cifar10_from_tarball_folder() {
    let dir = tempfile::tempdir().unwrap();
    let folder = dir.path().join("cifar-10-batches-bin");
    let names = ["data_batch_1.bin", "data_batch_2.bin", "data_batch_3.bin", "data_batch_4.bin", "data_batch_5.bin"];
    for (i, name) in names.iter().chain(&["test_batch.bin"]).enumerate() {
        let n = i % 3 + 1;
        let labels: Vec<Vec<u8>> = random_labels(n, 10, i as u64).into_iter().map(|l| vec![l]).collect();
        write(&folder, name, &cifar_file(&labels, &random_bytes(n * 3072, 50 + i as u64)));
    }
    let files = read_located(DatasetKind::Cifar10, dir.path());
    let located: Vec<&str> = files.iter().map(|(n, _)| n.as_str()).collect();
    assert_eq!(located, [&names[..], &["test_batch.bin"]].concat());
    let splits = load_from_files(DatasetKind::Cifar10, &files).unwrap();
    assert_eq!(splits, load(DatasetKind::Cifar10, Some(dir.path())).unwrap());
    assert_eq!(splits.train.len(), 1 + 2 + 3 + 1 + 2);
}

#[test]
fn cifar100_from_memory_uses_fine_labels() {
    let record = |coarse: u8, fine: u8, n: usize| -> Vec<u8> {
        let labels: Vec<Vec<u8>> = (0..n).map(|_| vec![coarse, fine]).collect();
        cifar_file(&labels, &random_bytes(n * 3072, fine as u64))
    };
    let files: Files = vec![("train.bin".into(), record(3, 99, 2)), ("test.bin".into(), record(19, 42, 1))];
    let splits = load_from_files(DatasetKind::Cifar100, &files).unwrap();
    assert_eq!((splits.train.labels.clone(), splits.test.labels.clone()), (vec![99, 99], vec![42]));
    assert_eq!(splits.train.num_classes, 100);
}

#[test]
fn missing_file_names_what_was_wanted_and_given() {
    let (train, test) = (Split::random(2, 3, 3, 9), Split::random(2, 3, 3, 10));
    let mut files = mnist_files(&train, &test);
    files.retain(|(n, _)| n != "t10k-images-idx3-ubyte");
    let err = load_from_files(DatasetKind::FashionMnist, &files).unwrap_err();
    let DataError::MissingFromSet { wanted, given } = &err else { panic!("{err}") };
    assert_eq!(wanted, &["t10k-images-idx3-ubyte", "t10k-images-idx3-ubyte.gz"]);
    assert_eq!(given.len(), 3);
    let msg = err.to_string();
    assert!(msg.contains("t10k-images-idx3-ubyte or t10k-images-idx3-ubyte.gz"), "{msg}");
    assert!(msg.contains("\"train-labels-idx1-ubyte\""), "{msg}");

    // CIFAR files given for MNIST: the message shows the mix-up.
    let err = load_from_files(DatasetKind::Mnist, &[("test_batch.bin".into(), vec![0; 3073])]).unwrap_err();
    assert!(err.to_string().contains("\"test_batch.bin\""), "{err}");
    let err = load_from_files(DatasetKind::Cifar100, &[]).unwrap_err();
    assert!(err.to_string().contains("train.bin; the 0 file(s) given are: (none)"), "{err}");
}

#[test]
fn long_lists_of_given_names_are_capped() {
    let files: Files = (0..1000).map(|i| (format!("junk-{i}"), vec![])).collect();
    let msg = load_from_files(DatasetKind::Cifar10, &files).unwrap_err().to_string();
    assert!(msg.contains("the 1000 file(s) given are") && msg.contains("... and 980 more"), "{msg}");
    assert!(!msg.contains("junk-999"), "{msg}");
}

#[test]
fn duplicate_names_are_refused() {
    let (train, test) = (Split::random(2, 3, 3, 11), Split::random(2, 3, 3, 12));
    let mut files = mnist_files(&train, &test);
    files.push(files[1].clone());
    let err = load_from_files(DatasetKind::Mnist, &files).unwrap_err();
    assert!(matches!(&err, DataError::DuplicateFile { name } if name == "train-labels-idx1-ubyte"), "{err}");
}

#[test]
fn embedded_has_no_files() {
    let err = load_from_files(DatasetKind::Embedded, &[]).unwrap_err();
    assert!(matches!(err, DataError::NotFileBased { dataset: "embedded" }), "{err}");
    let err = locate_files(DatasetKind::Embedded, Path::new(".")).unwrap_err();
    assert!(matches!(err, DataError::NotFileBased { .. }), "{err}");
}

#[test]
fn parse_errors_name_the_file() {
    let (train, mut test) = (Split::random(3, 3, 3, 13), Split::random(3, 3, 3, 14));
    test.labels[2] = 10;
    let files = mnist_files(&train, &test);
    let err = load_from_files(DatasetKind::Mnist, &files).unwrap_err();
    let DataError::LabelOutOfRange { path, index, offset, .. } = &err else { panic!("{err}") };
    assert_eq!((path.to_str().unwrap(), *index, *offset), ("t10k-labels-idx1-ubyte", 2, 8 + 2));
    assert!(err.to_string().starts_with("t10k-labels-idx1-ubyte: label 10 of item 2"), "{err}");

    let mut files = mnist_files(&train, &Split::random(3, 3, 3, 15));
    set(&mut files, "train-images-idx3-ubyte", b"\x1f\x8b\x08\x00garbage".to_vec());
    let err = load_from_files(DatasetKind::Mnist, &files).unwrap_err();
    assert!(matches!(&err, DataError::CorruptGzip { path, .. } if path.ends_with("train-images-idx3-ubyte")), "{err}");

    let files: Files = vec![("train.bin".into(), vec![1; 3074]), ("test.bin".into(), vec![1; 100])];
    let err = load_from_files(DatasetKind::Cifar100, &files).unwrap_err();
    assert!(matches!(&err, DataError::PartialRecord { path, offset: 0, .. } if path.ends_with("test.bin")), "{err}");
    assert!(err.to_string().starts_with("test.bin: partial record"), "{err}");
}

#[test]
fn locate_reports_what_is_missing_on_disk() {
    let dir = tempfile::tempdir().unwrap();
    write_mnist(dir.path(), &Split::random(2, 3, 3, 16), &Split::random(2, 3, 3, 17), false);
    std::fs::remove_file(dir.path().join("train-labels-idx1-ubyte")).unwrap();
    let err = locate_files(DatasetKind::Mnist, dir.path()).unwrap_err();
    let DataError::MissingFile { tried } = &err else { panic!("{err}") };
    assert!(tried[0].ends_with("train-labels-idx1-ubyte") && tried[1].ends_with("train-labels-idx1-ubyte.gz"));
}
