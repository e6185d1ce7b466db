//! The IDX format used by MNIST and Fashion-MNIST.
//!
//! An IDX file is a big-endian header — magic `00 00 08 D` (unsigned bytes,
//! `D` dimensions), then `D` u32 sizes — followed by the data. Images have
//! three dimensions (count, rows, cols), labels one (count).

use std::borrow::Cow;
use std::path::{Path, PathBuf};

use crate::{files, DataError, Dataset, Splits};

/// IDX data-type code for unsigned bytes, the only type these datasets use.
const TYPE_U8: u8 = 0x08;
/// Both MNIST variants have ten classes.
const NUM_CLASSES: usize = 10;

/// The standard file names, without the optional `.gz`, in the order
/// train images, train labels, test images, test labels.
pub(crate) const FILE_NAMES: [&str; 4] =
    ["train-images-idx3-ubyte", "train-labels-idx1-ubyte", "t10k-images-idx3-ubyte", "t10k-labels-idx1-ubyte"];

/// The names a standard file may have, in order of preference: raw, then gzip'd.
pub(crate) fn name_candidates(base: &str) -> [String; 2] {
    [base.to_string(), format!("{base}.gz")]
}

/// The contents of one IDX file (already decompressed) and where it came from
/// (a path, or a pseudo path naming an in-memory file, for error messages).
pub(crate) struct IdxFile<'a> {
    pub path: PathBuf,
    pub bytes: Cow<'a, [u8]>,
}

impl<'a> IdxFile<'a> {
    /// Wraps a file's contents, decompressing them if they are gzip'd.
    pub fn new(path: PathBuf, bytes: Cow<'a, [u8]>) -> Result<IdxFile<'a>, DataError> {
        let bytes = files::gunzip_if_gzip(&path, bytes)?;
        Ok(IdxFile { path, bytes })
    }
}

/// The four files of an MNIST-style dataset.
pub(crate) struct IdxSet<'a> {
    pub train_images: IdxFile<'a>,
    pub train_labels: IdxFile<'a>,
    pub test_images: IdxFile<'a>,
    pub test_labels: IdxFile<'a>,
}

impl<'a> IdxSet<'a> {
    /// Builds the set from the four files in [`FILE_NAMES`] order, each
    /// produced by `open` from its base name.
    pub fn open_each(mut open: impl FnMut(&str) -> Result<IdxFile<'a>, DataError>) -> Result<IdxSet<'a>, DataError> {
        let [train_images, train_labels, test_images, test_labels] = FILE_NAMES;
        Ok(IdxSet {
            train_images: open(train_images)?,
            train_labels: open(train_labels)?,
            test_images: open(test_images)?,
            test_labels: open(test_labels)?,
        })
    }
}

/// Where the standard file `base` may be found in `dir`, in order of preference.
pub(crate) fn path_candidates(dir: &Path, base: &str) -> Vec<PathBuf> {
    name_candidates(base).iter().map(|n| dir.join(n)).collect()
}

/// Loads the standard four IDX files (raw or gzip'd) from `dir`.
pub(crate) fn load_dir(name: &str, dir: &Path) -> Result<Splits, DataError> {
    let set = IdxSet::open_each(|base| {
        let path = files::find(path_candidates(dir, base))?;
        let bytes = files::read(&path)?;
        IdxFile::new(path, Cow::Owned(bytes))
    })?;
    load_set(name, set)
}

/// Parses the four files and checks that train and test images agree in size.
pub(crate) fn load_set(name: &str, set: IdxSet<'_>) -> Result<Splits, DataError> {
    let train = parse_split(&format!("{name}/train"), &set.train_images, &set.train_labels)?;
    let test = parse_split(&format!("{name}/test"), &set.test_images, &set.test_labels)?;
    if (train.height, train.width) != (test.height, test.width) {
        return Err(DataError::ImageSizeMismatch {
            train_path: set.train_images.path,
            train: (train.height, train.width),
            test_path: set.test_images.path,
            test: (test.height, test.width),
        });
    }
    Ok(Splits { train, test })
}

/// Parses one image file and its label file into a dataset split.
fn parse_split(name: &str, images: &IdxFile<'_>, labels: &IdxFile<'_>) -> Result<Dataset, DataError> {
    let (dims, pixels) = parse(images, 3, "image data")?;
    let (n, rows, cols) = (dims[0], dims[1], dims[2]);
    if rows == 0 || cols == 0 {
        return Err(DataError::BadImageSize { path: images.path.clone(), rows, cols });
    }
    let (label_dims, label_bytes) = parse(labels, 1, "label data")?;
    if label_dims[0] != n {
        return Err(DataError::CountMismatch {
            images_path: images.path.clone(),
            images: n,
            labels_path: labels.path.clone(),
            labels: label_dims[0],
        });
    }
    let data_offset = labels.bytes.len() - label_bytes.len();
    if let Some(index) = label_bytes.iter().position(|&l| usize::from(l) >= NUM_CLASSES) {
        return Err(DataError::LabelOutOfRange {
            path: labels.path.clone(),
            index,
            offset: (data_offset + index) as u64,
            label: label_bytes[index],
            num_classes: NUM_CLASSES,
        });
    }
    Ok(Dataset {
        name: name.to_string(),
        images: pixels.to_vec(),
        labels: label_bytes.to_vec(),
        channels: 1,
        height: rows,
        width: cols,
        num_classes: NUM_CLASSES,
    })
}

/// Validates the header of a u8 IDX file with `ndims` dimensions and returns
/// the dimensions and the data that follows, which must match them exactly.
fn parse<'a>(file: &'a IdxFile<'_>, ndims: u8, what: &'static str) -> Result<(Vec<usize>, &'a [u8]), DataError> {
    let (path, bytes) = (&file.path, &file.bytes[..]);
    let truncated = |what, offset: usize, expected: u128| DataError::Truncated {
        path: path.clone(),
        what,
        offset: offset as u64,
        expected,
        found: (bytes.len() - offset) as u64,
    };
    if bytes.is_empty() {
        return Err(DataError::EmptyFile { path: path.clone() });
    }
    if bytes.len() < 4 {
        return Err(truncated("IDX header", 0, 4));
    }
    if bytes[..3] != [0, 0, TYPE_U8] {
        return Err(DataError::BadMagic {
            path: path.clone(),
            offset: 0,
            expected: u32::from_be_bytes([0, 0, TYPE_U8, ndims]),
            found: u32::from_be_bytes([bytes[0], bytes[1], bytes[2], bytes[3]]),
        });
    }
    if bytes[3] != ndims {
        return Err(DataError::WrongDims { path: path.clone(), offset: 3, expected: ndims, found: bytes[3] });
    }
    let header_len = 4 + 4 * usize::from(ndims);
    if bytes.len() < header_len {
        return Err(truncated("IDX header", 0, header_len as u128));
    }
    let dims: Vec<usize> =
        bytes[4..header_len].chunks_exact(4).map(|b| u32::from_be_bytes([b[0], b[1], b[2], b[3]]) as usize).collect();
    // u128 cannot overflow: at most three u32 factors.
    let expected: u128 = dims.iter().map(|&d| d as u128).product();
    let data = &bytes[header_len..];
    if (data.len() as u128) < expected {
        return Err(truncated(what, header_len, expected));
    }
    let expected = expected as usize; // fits: it is at most data.len()
    if data.len() > expected {
        return Err(DataError::TrailingData {
            path: path.clone(),
            offset: (header_len + expected) as u64,
            found: (data.len() - expected) as u64,
        });
    }
    Ok((dims, data))
}
