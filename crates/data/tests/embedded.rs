//! The embedded Fashion-MNIST subset, and the `DatasetKind` helpers.

use std::path::Path;

use trustsplit_data::{load, DatasetKind};

#[test]
fn embedded_loads_without_a_directory() {
    let splits = load(DatasetKind::Embedded, None).unwrap();
    for (ds, n) in [(&splits.train, 5000), (&splits.test, 1000)] {
        assert_eq!(ds.len(), n);
        assert_eq!((ds.channels, ds.height, ds.width, ds.num_classes), (1, 28, 28, 10));
        assert_eq!(ds.images.len(), n * 784);
        let mut seen = [false; 10];
        for &l in &ds.labels {
            seen[usize::from(l)] = true;
        }
        assert_eq!(seen, [true; 10], "{} lacks a class", ds.name);
    }
    assert_eq!(splits.train.name, "embedded/train");
}

/// The embedded files must be exactly the first records of the real dataset.
/// Runs only where Debian's dataset-fashion-mnist package is installed.
#[test]
fn embedded_is_a_prefix_of_debian_fashion_mnist() {
    let dir = Path::new("/usr/share/datasets/fashion-mnist");
    if !dir.is_dir() {
        eprintln!("skipped: {} not present", dir.display());
        return;
    }
    let full = load(DatasetKind::FashionMnist, Some(dir)).unwrap();
    assert_eq!((full.train.len(), full.test.len()), (60000, 10000));
    let embedded = load(DatasetKind::Embedded, None).unwrap();
    for (small, big) in [(&embedded.train, &full.train), (&embedded.test, &full.test)] {
        let prefix = big.subset(small.len());
        assert_eq!(small.images, prefix.images);
        assert_eq!(small.labels, prefix.labels);
    }
}

#[test]
fn kind_names_round_trip() {
    for kind in DatasetKind::ALL {
        assert_eq!(kind.name().parse::<DatasetKind>(), Ok(kind));
        assert_eq!(kind.to_string(), kind.name());
    }
    let err = "imagenet".parse::<DatasetKind>().unwrap_err();
    for name in ["embedded", "mnist", "fashion-mnist", "cifar10", "cifar100"] {
        assert!(err.contains(name), "{err}");
    }
}

#[test]
fn kind_defaults() {
    assert_eq!(DatasetKind::Mnist.normalization().mean, [0.1307]);
    assert_eq!(DatasetKind::Embedded.normalization(), DatasetKind::FashionMnist.normalization());
    let c100 = DatasetKind::Cifar100.normalization();
    assert_eq!((c100.mean.len(), c100.std[2]), (3, 0.2762));
    assert!(DatasetKind::Cifar10.augments_by_default());
    assert!(!DatasetKind::FashionMnist.augments_by_default());
}
