//! Datasets for trustsplit: loaders for MNIST, Fashion-MNIST (IDX), CIFAR-10
//! and CIFAR-100 (binary version), a small Fashion-MNIST subset embedded in
//! the crate, and a deterministic batch iterator with normalisation, padding
//! and CIFAR-style augmentation.
//!
//! Images stay as `u8` in memory (a quarter of the size of `f32`) and are
//! converted to normalised `f32` one batch at a time.

mod batch;
mod cifar;
mod embedded;
mod error;
mod files;
mod idx;
mod memory_files;

use std::path::Path;
use std::str::FromStr;

pub use batch::{batches, num_batches, Batch, BatchIter, BatchOptions};
pub use error::DataError;
pub use memory_files::{load_from_files, locate_files};

/// The datasets this crate can load.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash)]
pub enum DatasetKind {
    /// The Fashion-MNIST subset compiled into the crate (5000 train, 1000 test).
    Embedded,
    Mnist,
    FashionMnist,
    Cifar10,
    Cifar100,
}

impl DatasetKind {
    /// Every kind, in the order they are listed to users.
    pub const ALL: [DatasetKind; 5] = [
        DatasetKind::Embedded,
        DatasetKind::Mnist,
        DatasetKind::FashionMnist,
        DatasetKind::Cifar10,
        DatasetKind::Cifar100,
    ];

    /// The name used on the command line and in dataset names.
    pub fn name(&self) -> &'static str {
        match self {
            DatasetKind::Embedded => "embedded",
            DatasetKind::Mnist => "mnist",
            DatasetKind::FashionMnist => "fashion-mnist",
            DatasetKind::Cifar10 => "cifar10",
            DatasetKind::Cifar100 => "cifar100",
        }
    }

    /// The usual per-channel mean and standard deviation of the training set.
    ///
    /// The embedded set uses Fashion-MNIST's constants, since it is a subset
    /// of it and models trained on it should transfer to the full set.
    pub fn normalization(&self) -> Normalization {
        let (mean, std): (&[f32], &[f32]) = match self {
            DatasetKind::Mnist => (&[0.1307], &[0.3081]),
            DatasetKind::Embedded | DatasetKind::FashionMnist => (&[0.2860], &[0.3530]),
            DatasetKind::Cifar10 => (&[0.4914, 0.4822, 0.4465], &[0.2470, 0.2435, 0.2616]),
            DatasetKind::Cifar100 => (&[0.5071, 0.4865, 0.4409], &[0.2673, 0.2564, 0.2762]),
        };
        Normalization { mean: mean.to_vec(), std: std.to_vec() }
    }

    /// Whether training normally uses random crop + flip. True for CIFAR:
    /// the digit and clothing sets are centred and flipping digits changes them.
    pub fn augments_by_default(&self) -> bool {
        matches!(self, DatasetKind::Cifar10 | DatasetKind::Cifar100)
    }
}

impl std::fmt::Display for DatasetKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl FromStr for DatasetKind {
    type Err = String;

    fn from_str(s: &str) -> Result<Self, Self::Err> {
        DatasetKind::ALL.into_iter().find(|k| k.name() == s).ok_or_else(|| {
            let names: Vec<&str> = DatasetKind::ALL.iter().map(|k| k.name()).collect();
            format!("unknown dataset `{s}`; valid names are: {}", names.join(", "))
        })
    }
}

/// Per-channel normalisation constants, in `[0, 1]` pixel units:
/// a pixel `p` becomes `(p / 255 - mean[c]) / std[c]`.
#[derive(Debug, Clone, PartialEq)]
pub struct Normalization {
    pub mean: Vec<f32>,
    pub std: Vec<f32>,
}

/// One split of a dataset: `u8` pixels in NCHW order, plus labels.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Dataset {
    /// `kind/split`, e.g. `fashion-mnist/train`.
    pub name: String,
    /// `len() * channels * height * width` bytes, NCHW.
    pub images: Vec<u8>,
    /// One class index per image, each `< num_classes`.
    pub labels: Vec<u8>,
    pub channels: usize,
    pub height: usize,
    pub width: usize,
    pub num_classes: usize,
}

impl Dataset {
    /// Number of images.
    pub fn len(&self) -> usize {
        self.labels.len()
    }

    pub fn is_empty(&self) -> bool {
        self.labels.is_empty()
    }

    /// Bytes (pixels) per image: `channels * height * width`.
    pub fn image_len(&self) -> usize {
        self.channels * self.height * self.width
    }

    /// The pixels of image `i`.
    pub fn image(&self, i: usize) -> &[u8] {
        let n = self.image_len();
        &self.images[i * n..(i + 1) * n]
    }

    /// The first `n` images (all of them if `n >= len()`), e.g. for quick runs.
    pub fn subset(&self, n: usize) -> Dataset {
        let n = n.min(self.len());
        Dataset {
            name: self.name.clone(),
            images: self.images[..n * self.image_len()].to_vec(),
            labels: self.labels[..n].to_vec(),
            ..*self
        }
    }
}

/// The train and test splits of a dataset.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Splits {
    pub train: Dataset,
    pub test: Dataset,
}

/// Where the official archive of `kind` puts the files [`load`] reads: its folder and the file
/// names in it, train files first (`cifar-10-batches-bin/` and `cifar-100-binary/`). `None` for the
/// datasets that do not come as one such archive.
pub fn archive_layout(kind: DatasetKind) -> Option<(&'static str, Vec<&'static str>)> {
    let format = match kind {
        DatasetKind::Cifar10 => &cifar::CIFAR10,
        DatasetKind::Cifar100 => &cifar::CIFAR100,
        _ => return None,
    };
    Some((format.folder, format.all_files().collect()))
}

/// Loads both splits of `kind`.
///
/// `data_dir` is ignored for [`DatasetKind::Embedded`] and required for every
/// other kind. MNIST-style files may be raw or gzip'd; CIFAR files may sit in
/// `data_dir` or in the folder their tarball unpacks to
/// (`cifar-10-batches-bin/`, `cifar-100-binary/`).
pub fn load(kind: DatasetKind, data_dir: Option<&Path>) -> Result<Splits, DataError> {
    let name = kind.name();
    let dir = || data_dir.ok_or(DataError::MissingDataDir { dataset: name });
    match kind {
        DatasetKind::Embedded => embedded::load(name),
        DatasetKind::Mnist | DatasetKind::FashionMnist => idx::load_dir(name, dir()?),
        DatasetKind::Cifar10 => cifar::load_dir(name, &cifar::CIFAR10, dir()?),
        DatasetKind::Cifar100 => cifar::load_dir(name, &cifar::CIFAR100, dir()?),
    }
}
