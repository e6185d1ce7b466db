//! MNIST / Fashion-MNIST (IDX) loading: round trips and every error kind.

mod common;

use std::path::Path;

use common::{gzip, idx, write, write_mnist, Split};
use trustsplit_data::{load, DataError, DatasetKind, Splits};

fn load_mnist(dir: &Path) -> Result<Splits, DataError> {
    load(DatasetKind::Mnist, Some(dir))
}

/// A valid dataset in `dir` (raw files) whose parts a test then breaks.
fn valid_dir() -> (tempfile::TempDir, Split, Split) {
    let dir = tempfile::tempdir().unwrap();
    let (train, test) = (Split::random(6, 5, 4, 1), Split::random(3, 5, 4, 2));
    write_mnist(dir.path(), &train, &test, false);
    (dir, train, test)
}

fn assert_matches(splits: &Splits, train: &Split, test: &Split) {
    for (ds, split) in [(&splits.train, train), (&splits.test, test)] {
        assert_eq!(ds.images, split.images);
        assert_eq!(ds.labels, split.labels);
        assert_eq!((ds.channels, ds.height, ds.width), (1, 5, 4));
        assert_eq!(ds.num_classes, 10);
        assert_eq!(ds.len(), split.labels.len());
        assert_eq!(ds.image_len(), 20);
    }
}

#[test]
fn raw_files_round_trip() {
    let (dir, train, test) = valid_dir();
    let splits = load_mnist(dir.path()).unwrap();
    assert_matches(&splits, &train, &test);
    assert_eq!(splits.train.name, "mnist/train");
    assert_eq!(splits.test.name, "mnist/test");
}

#[test]
fn gzip_files_round_trip() {
    let dir = tempfile::tempdir().unwrap();
    let (train, test) = (Split::random(9, 5, 4, 3), Split::random(4, 5, 4, 4));
    write_mnist(dir.path(), &train, &test, true);
    let splits = load(DatasetKind::FashionMnist, Some(dir.path())).unwrap();
    assert_matches(&splits, &train, &test);
    assert_eq!(splits.train.name, "fashion-mnist/train");
}

#[test]
fn gzip_is_detected_by_content_not_name() {
    let (dir, train, test) = valid_dir();
    write(dir.path(), "train-images-idx3-ubyte", &gzip(&train.image_file()));
    assert_matches(&load_mnist(dir.path()).unwrap(), &train, &test);
}

#[test]
fn missing_data_dir() {
    let err = load(DatasetKind::FashionMnist, None).unwrap_err();
    assert!(matches!(err, DataError::MissingDataDir { dataset: "fashion-mnist" }));
    assert!(err.to_string().contains("fashion-mnist"));
}

#[test]
fn missing_file_lists_both_names_tried() {
    let (dir, _, _) = valid_dir();
    std::fs::remove_file(dir.path().join("t10k-labels-idx1-ubyte")).unwrap();
    let err = load_mnist(dir.path()).unwrap_err();
    let DataError::MissingFile { tried } = &err else { panic!("{err}") };
    assert_eq!(tried, &[dir.path().join("t10k-labels-idx1-ubyte"), dir.path().join("t10k-labels-idx1-ubyte.gz")]);
    let msg = err.to_string();
    assert!(msg.contains("t10k-labels-idx1-ubyte,") && msg.contains("t10k-labels-idx1-ubyte.gz"));
}

#[test]
fn empty_file() {
    let (dir, _, _) = valid_dir();
    write(dir.path(), "train-labels-idx1-ubyte", &[]);
    let err = load_mnist(dir.path()).unwrap_err();
    assert!(matches!(&err, DataError::EmptyFile { path } if path.ends_with("train-labels-idx1-ubyte")));
    assert!(err.to_string().contains("is empty"));
}

#[test]
fn gzip_that_decompresses_to_nothing_is_empty() {
    let (dir, _, _) = valid_dir();
    write(dir.path(), "train-labels-idx1-ubyte", &gzip(&[]));
    assert!(matches!(load_mnist(dir.path()), Err(DataError::EmptyFile { .. })));
}

#[test]
fn corrupt_gzip_stream() {
    let (dir, train, _) = valid_dir();
    let gz = gzip(&train.image_file());
    for broken in [gz[..gz.len() / 2].to_vec(), vec![0x1f, 0x8b, 0xff, 0xff, 0xff], {
        let mut flipped = gz.clone();
        let at = flipped.len() - 6; // inside the CRC trailer
        flipped[at] ^= 0xff;
        flipped
    }] {
        write(dir.path(), "train-images-idx3-ubyte", &broken);
        let err = load_mnist(dir.path()).unwrap_err();
        assert!(matches!(err, DataError::CorruptGzip { .. }), "{err}");
        assert!(err.to_string().contains("corrupt gzip"), "{err}");
    }
}

#[test]
fn bad_magic() {
    let (dir, train, _) = valid_dir();
    let mut bytes = train.image_file();
    bytes[2] = 0x0d; // IDX type code for f32 instead of u8
    write(dir.path(), "train-images-idx3-ubyte", &bytes);
    let err = load_mnist(dir.path()).unwrap_err();
    let DataError::BadMagic { offset, expected, found, .. } = err else { panic!("{err}") };
    assert_eq!((offset, expected, found), (0, 0x0803, 0x0d03));
    assert!(err.to_string().contains("expected 0x00000803, found 0x00000d03"), "{err}");
}

#[test]
fn wrong_number_of_dimensions() {
    let (dir, train, _) = valid_dir();
    // An image file where the labels belong: 3 dimensions instead of 1.
    write(dir.path(), "train-labels-idx1-ubyte", &train.image_file());
    let err = load_mnist(dir.path()).unwrap_err();
    let DataError::WrongDims { offset, expected, found, .. } = err else { panic!("{err}") };
    assert_eq!((offset, expected, found), (3, 1, 3));
    assert!(err.to_string().contains("train-labels-idx1-ubyte"));
}

#[test]
fn truncated_header() {
    let (dir, train, _) = valid_dir();
    write(dir.path(), "train-images-idx3-ubyte", &train.image_file()[..10]);
    let err = load_mnist(dir.path()).unwrap_err();
    let DataError::Truncated { what, offset, expected, found, .. } = err else { panic!("{err}") };
    assert_eq!((what, offset, expected, found), ("IDX header", 0, 16, 10));

    write(dir.path(), "train-images-idx3-ubyte", &[0, 0]);
    assert!(matches!(load_mnist(dir.path()), Err(DataError::Truncated { expected: 4, found: 2, .. })));
}

#[test]
fn truncated_data() {
    let (dir, train, _) = valid_dir();
    let bytes = train.image_file();
    write(dir.path(), "train-images-idx3-ubyte", &bytes[..bytes.len() - 7]);
    let err = load_mnist(dir.path()).unwrap_err();
    let DataError::Truncated { what, offset, expected, found, .. } = err else { panic!("{err}") };
    assert_eq!((what, offset, expected, found), ("image data", 16, 120, 113));
    assert!(err.to_string().contains("expected 120 bytes, found 113"), "{err}");
}

#[test]
fn huge_header_counts_are_truncation_not_overflow() {
    let (dir, _, _) = valid_dir();
    write(dir.path(), "train-images-idx3-ubyte", &idx(&[u32::MAX; 3], &[1, 2, 3]));
    let err = load_mnist(dir.path()).unwrap_err();
    let DataError::Truncated { expected, found, .. } = err else { panic!("{err}") };
    assert_eq!((expected, found), ((u32::MAX as u128).pow(3), 3));
}

#[test]
fn trailing_data() {
    let (dir, train, _) = valid_dir();
    let mut bytes = train.label_file();
    bytes.extend_from_slice(&[0, 0]);
    write(dir.path(), "train-labels-idx1-ubyte", &bytes);
    let err = load_mnist(dir.path()).unwrap_err();
    assert!(matches!(err, DataError::TrailingData { offset: 14, found: 2, .. }), "{err}");
}

#[test]
fn label_out_of_range() {
    let (dir, mut train, _) = valid_dir();
    train.labels[4] = 10;
    write(dir.path(), "train-labels-idx1-ubyte", &train.label_file());
    let err = load_mnist(dir.path()).unwrap_err();
    let DataError::LabelOutOfRange { index, offset, label, num_classes, .. } = err else { panic!("{err}") };
    assert_eq!((index, offset, label, num_classes), (4, 12, 10, 10));
    assert!(err.to_string().contains("label 10 of item 4 at byte offset 12"), "{err}");
}

#[test]
fn image_label_count_mismatch() {
    let (dir, mut train, _) = valid_dir();
    train.labels.pop();
    write(dir.path(), "train-labels-idx1-ubyte", &train.label_file());
    let err = load_mnist(dir.path()).unwrap_err();
    assert!(matches!(err, DataError::CountMismatch { images: 6, labels: 5, .. }), "{err}");
    assert!(err.to_string().contains("6 images") && err.to_string().contains("5 labels"));
}

#[test]
fn train_and_test_image_sizes_must_agree() {
    let dir = tempfile::tempdir().unwrap();
    write_mnist(dir.path(), &Split::random(2, 5, 4, 1), &Split::random(2, 4, 5, 2), false);
    let err = load_mnist(dir.path()).unwrap_err();
    assert!(matches!(err, DataError::ImageSizeMismatch { train: (5, 4), test: (4, 5), .. }), "{err}");
}

#[test]
fn zero_image_size() {
    let (dir, _, _) = valid_dir();
    write(dir.path(), "train-images-idx3-ubyte", &idx(&[6, 0, 4], &[]));
    let err = load_mnist(dir.path()).unwrap_err();
    assert!(matches!(err, DataError::BadImageSize { rows: 0, cols: 4, .. }), "{err}");
}

/// Arbitrary damage must give an error (or, rarely, a valid file), never a panic.
#[test]
fn damaged_files_never_panic() {
    let (dir, train, _) = valid_dir();
    let images = train.image_file();
    for len in 0..images.len() {
        write(dir.path(), "train-images-idx3-ubyte", &images[..len]);
        assert!(load_mnist(dir.path()).is_err(), "prefix of {len} bytes loaded");
    }
    let gz = gzip(&images);
    for (i, noise) in common::random_bytes(300, 9).chunks(3).enumerate() {
        let mut bytes = if i % 2 == 0 { images.clone() } else { gz.clone() };
        let at = usize::from(noise[0]) * bytes.len() / 256;
        bytes[at] ^= noise[1] | 1;
        bytes.truncate(bytes.len() - usize::from(noise[2] % 3));
        write(dir.path(), "train-images-idx3-ubyte", &bytes);
        let _ = load_mnist(dir.path());
    }
}
