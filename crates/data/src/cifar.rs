//! The CIFAR-10 and CIFAR-100 "binary version" formats.
//!
//! Each file is a sequence of fixed-size records: label byte(s) followed by a
//! 3x32x32 image stored channel-major (all red, then green, then blue), which
//! is already the NCHW layout `Dataset` uses, so pixels are copied verbatim.

use std::borrow::Cow;
use std::path::{Path, PathBuf};

use crate::{files, DataError, Dataset, Splits};

const CHANNELS: usize = 3;
const SIDE: usize = 32;
const IMAGE_LEN: usize = CHANNELS * SIDE * SIDE;

/// What distinguishes the two CIFAR variants on disk.
pub(crate) struct Format {
    /// Folder name inside the official tarball, searched as well as `data_dir`.
    pub folder: &'static str,
    pub train_files: &'static [&'static str],
    pub test_files: &'static [&'static str],
    /// Label bytes before each image (CIFAR-100 has coarse then fine).
    pub label_bytes: usize,
    /// Which of those bytes is the label we train on.
    pub label_index: usize,
    pub num_classes: usize,
}

pub(crate) const CIFAR10: Format = Format {
    folder: "cifar-10-batches-bin",
    train_files: &["data_batch_1.bin", "data_batch_2.bin", "data_batch_3.bin", "data_batch_4.bin", "data_batch_5.bin"],
    test_files: &["test_batch.bin"],
    label_bytes: 1,
    label_index: 0,
    num_classes: 10,
};

/// CIFAR-100 is loaded with its 100 fine labels; the coarse byte is skipped.
pub(crate) const CIFAR100: Format = Format {
    folder: "cifar-100-binary",
    train_files: &["train.bin"],
    test_files: &["test.bin"],
    label_bytes: 2,
    label_index: 1,
    num_classes: 100,
};

impl Format {
    /// Every file of the dataset: the train files, then the test files.
    pub fn all_files(&self) -> impl Iterator<Item = &'static str> {
        self.train_files.iter().chain(self.test_files).copied()
    }
}

/// Where `file_name` may be found: in `dir`, then in the tarball's folder inside it.
pub(crate) fn path_candidates(dir: &Path, format: &Format, file_name: &str) -> Vec<PathBuf> {
    vec![dir.join(file_name), dir.join(format.folder).join(file_name)]
}

/// Loads the train and test files of `format` from `dir` or its tarball folder.
pub(crate) fn load_dir(name: &str, format: &Format, dir: &Path) -> Result<Splits, DataError> {
    load_with(name, format, |file_name| {
        let path = files::find(path_candidates(dir, format, file_name))?;
        let bytes = files::read(&path)?;
        Ok((path, Cow::Owned(bytes)))
    })
}

/// Loads both splits, getting each file from `open(file_name)` as a display path (it only names
/// the file in errors) and its contents. This is how files on disk and files already in memory
/// share one parser. Files are opened one at a time and dropped once parsed, so at most one
/// file's bytes are held beside the split being built.
pub(crate) fn load_with<'a>(
    name: &str,
    format: &Format,
    mut open: impl FnMut(&str) -> Result<(PathBuf, Cow<'a, [u8]>), DataError>,
) -> Result<Splits, DataError> {
    let mut split = |split_name: &str, file_names: &[&str]| -> Result<Dataset, DataError> {
        let mut ds = Dataset {
            name: format!("{name}/{split_name}"),
            images: Vec::new(),
            labels: Vec::new(),
            channels: CHANNELS,
            height: SIDE,
            width: SIDE,
            num_classes: format.num_classes,
        };
        for file_name in file_names {
            let (path, bytes) = open(file_name)?;
            parse_into(&path, &bytes, format, &mut ds)?;
        }
        Ok(ds)
    };
    Ok(Splits { train: split("train", format.train_files)?, test: split("test", format.test_files)? })
}

/// Appends the records in `bytes` to `ds`, validating length and labels.
fn parse_into(path: &Path, bytes: &[u8], format: &Format, ds: &mut Dataset) -> Result<(), DataError> {
    let record_len = format.label_bytes + IMAGE_LEN;
    if bytes.is_empty() {
        return Err(DataError::EmptyFile { path: path.to_path_buf() });
    }
    let whole = bytes.len() - bytes.len() % record_len;
    if whole != bytes.len() {
        return Err(DataError::PartialRecord {
            path: path.to_path_buf(),
            offset: whole as u64,
            record_len,
            found: bytes.len() - whole,
        });
    }
    let records = bytes.chunks_exact(record_len);
    ds.images.reserve(records.len() * IMAGE_LEN);
    ds.labels.reserve(records.len());
    for (index, record) in records.enumerate() {
        let label = record[format.label_index];
        if usize::from(label) >= format.num_classes {
            return Err(DataError::LabelOutOfRange {
                path: path.to_path_buf(),
                index,
                offset: (index * record_len + format.label_index) as u64,
                label,
                num_classes: format.num_classes,
            });
        }
        ds.labels.push(label);
        ds.images.extend_from_slice(&record[format.label_bytes..]);
    }
    Ok(())
}
