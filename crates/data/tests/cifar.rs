//! CIFAR-10 / CIFAR-100 binary loading: round trips and every error kind.

mod common;

use std::path::Path;

use common::{cifar_file, random_bytes, random_labels, write};
use trustsplit_data::{load, DataError, DatasetKind};

const TRAIN10: [&str; 5] =
    ["data_batch_1.bin", "data_batch_2.bin", "data_batch_3.bin", "data_batch_4.bin", "data_batch_5.bin"];

/// Expected content of one split: images and labels in load order.
#[derive(Default)]
struct Expected {
    images: Vec<u8>,
    labels: Vec<u8>,
}

/// Writes a CIFAR-10 file of `n` random records and records what it holds.
fn write_cifar10(dir: &Path, name: &str, n: usize, seed: u64, into: &mut Expected) {
    let images = random_bytes(n * 3072, seed);
    let labels = random_labels(n, 10, seed + 1);
    let records: Vec<Vec<u8>> = labels.iter().map(|&l| vec![l]).collect();
    write(dir, name, &cifar_file(&records, &images));
    into.images.extend_from_slice(&images);
    into.labels.extend_from_slice(&labels);
}

/// A valid CIFAR-10 directory with a different record count per file.
fn cifar10_dir(dir: &Path) -> (Expected, Expected) {
    let (mut train, mut test) = (Expected::default(), Expected::default());
    for (i, name) in TRAIN10.iter().enumerate() {
        write_cifar10(dir, name, i % 3 + 1, i as u64 * 10, &mut train);
    }
    write_cifar10(dir, "test_batch.bin", 3, 100, &mut test);
    (train, test)
}

#[test]
fn cifar10_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let (train, test) = cifar10_dir(dir.path());
    let splits = load(DatasetKind::Cifar10, Some(dir.path())).unwrap();
    for (ds, want) in [(&splits.train, &train), (&splits.test, &test)] {
        assert_eq!((ds.channels, ds.height, ds.width, ds.num_classes), (3, 32, 32, 10));
        assert_eq!(ds.labels, want.labels);
        assert_eq!(ds.images, want.images);
    }
    assert_eq!(splits.train.len(), 1 + 2 + 3 + 1 + 2);
    assert_eq!(splits.test.name, "cifar10/test");
}

#[test]
fn cifar10_found_in_tarball_folder() {
    let dir = tempfile::tempdir().unwrap();
    let (train, _) = cifar10_dir(&dir.path().join("cifar-10-batches-bin"));
    let splits = load(DatasetKind::Cifar10, Some(dir.path())).unwrap();
    assert_eq!(splits.train.labels, train.labels);
}

#[test]
fn cifar100_round_trip_uses_fine_labels() {
    let dir = tempfile::tempdir().unwrap();
    let folder = dir.path().join("cifar-100-binary");
    let mut want = Vec::new();
    for (name, n, seed) in [("train.bin", 5, 1), ("test.bin", 2, 2)] {
        let images = random_bytes(n * 3072, seed);
        let fine = random_labels(n, 100, seed + 1);
        let records: Vec<Vec<u8>> = fine.iter().map(|&f| vec![f / 5, f]).collect();
        write(&folder, name, &cifar_file(&records, &images));
        want.push((images, fine));
    }
    let splits = load(DatasetKind::Cifar100, Some(dir.path())).unwrap();
    for (ds, (images, fine)) in [&splits.train, &splits.test].into_iter().zip(&want) {
        assert_eq!((ds.channels, ds.height, ds.width, ds.num_classes), (3, 32, 32, 100));
        assert_eq!(&ds.images, images);
        assert_eq!(&ds.labels, fine);
    }
    assert_eq!(splits.train.name, "cifar100/train");
}

#[test]
fn missing_data_dir() {
    let err = load(DatasetKind::Cifar100, None).unwrap_err();
    assert!(matches!(err, DataError::MissingDataDir { dataset: "cifar100" }));
}

#[test]
fn missing_file_lists_both_locations() {
    let dir = tempfile::tempdir().unwrap();
    cifar10_dir(dir.path());
    std::fs::remove_file(dir.path().join("data_batch_3.bin")).unwrap();
    let err = load(DatasetKind::Cifar10, Some(dir.path())).unwrap_err();
    let DataError::MissingFile { tried } = &err else { panic!("{err}") };
    assert_eq!(tried, &[dir.path().join("data_batch_3.bin"), dir.path().join("cifar-10-batches-bin/data_batch_3.bin")]);
}

#[test]
fn empty_file() {
    let dir = tempfile::tempdir().unwrap();
    cifar10_dir(dir.path());
    write(dir.path(), "test_batch.bin", &[]);
    let err = load(DatasetKind::Cifar10, Some(dir.path())).unwrap_err();
    assert!(matches!(&err, DataError::EmptyFile { path } if path.ends_with("test_batch.bin")));
}

#[test]
fn partial_record() {
    let dir = tempfile::tempdir().unwrap();
    cifar10_dir(dir.path());
    let mut bytes = std::fs::read(dir.path().join("data_batch_2.bin")).unwrap();
    bytes.truncate(3073 + 100);
    write(dir.path(), "data_batch_2.bin", &bytes);
    let err = load(DatasetKind::Cifar10, Some(dir.path())).unwrap_err();
    let DataError::PartialRecord { offset, record_len, found, .. } = err else { panic!("{err}") };
    assert_eq!((offset, record_len, found), (3073, 3073, 100));
    assert!(err.to_string().contains("data_batch_2.bin: partial record at byte offset 3073"), "{err}");
}

#[test]
fn cifar10_label_out_of_range() {
    let dir = tempfile::tempdir().unwrap();
    cifar10_dir(dir.path());
    let mut bytes = std::fs::read(dir.path().join("test_batch.bin")).unwrap();
    bytes[2 * 3073] = 10;
    write(dir.path(), "test_batch.bin", &bytes);
    let err = load(DatasetKind::Cifar10, Some(dir.path())).unwrap_err();
    let DataError::LabelOutOfRange { index, offset, label, num_classes, .. } = err else { panic!("{err}") };
    assert_eq!((index, offset, label, num_classes), (2, 6146, 10, 10));
}

#[test]
fn cifar100_fine_label_out_of_range() {
    let dir = tempfile::tempdir().unwrap();
    let records = vec![vec![1, 99], vec![2, 100]];
    write(dir.path(), "train.bin", &cifar_file(&records, &random_bytes(2 * 3072, 5)));
    let err = load(DatasetKind::Cifar100, Some(dir.path())).unwrap_err();
    let DataError::LabelOutOfRange { index, offset, label, num_classes, .. } = err else { panic!("{err}") };
    assert_eq!((index, offset, label, num_classes), (1, 3074 + 1, 100, 100));
}
