//! Datasets from files held in memory, such as the files an enclave received from the data owner.
//!
//! The files carry the standard names and go through the same parsers as files on disk, so an
//! uploaded dataset is checked exactly as strictly as one loaded from a folder, and the two paths
//! cannot drift apart. [`locate_files`] is the other end: it finds on disk the files a data owner
//! has to send.

use std::borrow::Cow;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

use crate::{cifar, files, idx, DataError, DatasetKind, Splits};

/// Parses dataset `kind` from in-memory files given as `(name, contents)`.
///
/// The names are the standard ones, matched exactly (no folders):
/// - MNIST and Fashion-MNIST: `train-images-idx3-ubyte`, `train-labels-idx1-ubyte`,
///   `t10k-images-idx3-ubyte`, `t10k-labels-idx1-ubyte`, each raw or with `.gz` appended (gzip is
///   detected by content). If both names of a file are given, the raw one is used, as on disk.
/// - CIFAR-10: `data_batch_1.bin` to `data_batch_5.bin` and `test_batch.bin`.
/// - CIFAR-100: `train.bin` and `test.bin`.
///
/// Files with other names are ignored; a name given twice is an error, since which copy to parse
/// would be a guess. Errors name the file (its name stands where a path would).
pub fn load_from_files(kind: DatasetKind, files: &[(String, Vec<u8>)]) -> Result<Splits, DataError> {
    let mut by_name: HashMap<&str, &[u8]> = HashMap::with_capacity(files.len());
    for (name, bytes) in files {
        if by_name.insert(name.as_str(), bytes.as_slice()).is_some() {
            return Err(DataError::DuplicateFile { name: name.clone() });
        }
    }
    // The first of `candidates` present, with its name as the display path.
    let open = |candidates: &[String]| -> Result<(PathBuf, Cow<'_, [u8]>), DataError> {
        candidates
            .iter()
            .find_map(|c| by_name.get(c.as_str()).map(|&bytes| (PathBuf::from(c), Cow::Borrowed(bytes))))
            .ok_or_else(|| DataError::MissingFromSet {
                wanted: candidates.to_vec(),
                given: files.iter().map(|(n, _)| n.clone()).collect(),
            })
    };
    let name = kind.name();
    match kind {
        DatasetKind::Embedded => Err(DataError::NotFileBased { dataset: name }),
        DatasetKind::Mnist | DatasetKind::FashionMnist => {
            let set = idx::IdxSet::open_each(|base| {
                let (path, bytes) = open(&idx::name_candidates(base))?;
                idx::IdxFile::new(path, bytes)
            })?;
            idx::load_set(name, set)
        }
        DatasetKind::Cifar10 => cifar::load_with(name, &cifar::CIFAR10, |f| open(&[f.to_string()])),
        DatasetKind::Cifar100 => cifar::load_with(name, &cifar::CIFAR100, |f| open(&[f.to_string()])),
    }
}

/// Finds in `dir` the files [`load`](crate::load) would read for `kind`, as `(standard name,
/// path)` pairs: what a data owner sends so that the receiver can call [`load_from_files`].
///
/// Files are looked up exactly as `load` does (IDX raw before `.gz`; CIFAR in `dir`, then in the
/// tarball's folder), so a folder that trains locally also uploads. Each name is the found file's
/// own name, so a gzip'd IDX file keeps its `.gz`.
pub fn locate_files(kind: DatasetKind, dir: &Path) -> Result<Vec<(String, PathBuf)>, DataError> {
    let named = |path: PathBuf, standard: &str| {
        let name = path.file_name().map_or_else(|| standard.to_string(), |n| n.to_string_lossy().into_owned());
        (name, path)
    };
    match kind {
        DatasetKind::Embedded => Err(DataError::NotFileBased { dataset: kind.name() }),
        DatasetKind::Mnist | DatasetKind::FashionMnist => {
            idx::FILE_NAMES.iter().map(|base| Ok(named(files::find(idx::path_candidates(dir, base))?, base))).collect()
        }
        DatasetKind::Cifar10 | DatasetKind::Cifar100 => {
            let format = if kind == DatasetKind::Cifar10 { &cifar::CIFAR10 } else { &cifar::CIFAR100 };
            format.all_files().map(|f| Ok(named(files::find(cifar::path_candidates(dir, format, f))?, f))).collect()
        }
    }
}
