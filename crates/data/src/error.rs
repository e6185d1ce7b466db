//! Errors raised while finding and parsing dataset files.
//!
//! Dataset files come from outside the program, so every way they can be
//! wrong is a value here rather than a panic. Each message names the file and,
//! where it helps, the byte offset and what was expected versus found, so a
//! user can tell a truncated download from a wrong directory at a glance.

use std::path::PathBuf;

/// Everything that can go wrong while loading a dataset.
#[derive(Debug, thiserror::Error)]
pub enum DataError {
    /// A dataset other than the embedded one was requested without a directory.
    #[error("dataset `{dataset}` needs a data directory; only `embedded` is built in")]
    MissingDataDir { dataset: &'static str },

    /// None of the candidate locations for a file exists.
    #[error("missing data file; tried: {}", list_paths(.tried))]
    MissingFile { tried: Vec<PathBuf> },

    /// A file is not among the in-memory files given (e.g. an upload).
    #[error("missing data file {}; the {} file(s) given are: {}", .wanted.join(" or "), .given.len(), list_names(.given))]
    MissingFromSet { wanted: Vec<String>, given: Vec<String> },

    /// Two in-memory files have the same name, so which one to parse is ambiguous.
    #[error("data file {name:?} is given more than once")]
    DuplicateFile { name: String },

    /// The dataset is compiled in and is never read from files.
    #[error("dataset `{dataset}` is built in and has no files to load")]
    NotFileBased { dataset: &'static str },

    /// The file exists but could not be read.
    #[error("cannot read {}: {source}", .path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// The file (after decompression, if gzip'd) holds no bytes.
    #[error("{} is empty", .path.display())]
    EmptyFile { path: PathBuf },

    /// The file starts with the gzip magic but does not decompress.
    #[error("{} is a corrupt gzip stream: {source}", .path.display())]
    CorruptGzip {
        path: PathBuf,
        #[source]
        source: std::io::Error,
    },

    /// The first three bytes are not the IDX "unsigned byte" magic `00 00 08`.
    #[error("{}: bad magic at byte offset {offset}: expected {expected:#010x}, found {found:#010x}", .path.display())]
    BadMagic { path: PathBuf, offset: u64, expected: u32, found: u32 },

    /// The IDX dimension count (fourth magic byte) is wrong for this file.
    #[error("{}: wrong number of dimensions at byte offset {offset}: expected {expected}, found {found}", .path.display())]
    WrongDims { path: PathBuf, offset: u64, expected: u8, found: u8 },

    /// An IDX image dimension is zero, so there are no pixels to train on.
    #[error("{}: invalid image size {rows}x{cols} (both must be non-zero)", .path.display())]
    BadImageSize { path: PathBuf, rows: usize, cols: usize },

    /// Train and test images have different sizes, so no model fits both.
    #[error("image sizes differ: {} has {}x{}, {} has {}x{}",
        .train_path.display(), .train.0, .train.1, .test_path.display(), .test.0, .test.1)]
    ImageSizeMismatch { train_path: PathBuf, train: (usize, usize), test_path: PathBuf, test: (usize, usize) },

    /// Fewer bytes than the header (or header length) promises.
    #[error("{}: truncated {what} at byte offset {offset}: expected {expected} bytes, found {found}", .path.display())]
    Truncated { path: PathBuf, what: &'static str, offset: u64, expected: u128, found: u64 },

    /// More bytes than the header describes; usually a wrong or concatenated file.
    #[error("{}: {found} unexpected trailing bytes at byte offset {offset}", .path.display())]
    TrailingData { path: PathBuf, offset: u64, found: u64 },

    /// A label is not a valid class index.
    #[error("{}: label {label} of item {index} at byte offset {offset} is out of range (expected < {num_classes})", .path.display())]
    LabelOutOfRange { path: PathBuf, index: usize, offset: u64, label: u8, num_classes: usize },

    /// The image and label files describe different numbers of items.
    #[error("{} holds {images} images but {} holds {labels} labels",
        .images_path.display(), .labels_path.display())]
    CountMismatch { images_path: PathBuf, images: usize, labels_path: PathBuf, labels: usize },

    /// A CIFAR file's length is not a whole number of records.
    #[error("{}: partial record at byte offset {offset}: records are {record_len} bytes, found {found} left over", .path.display())]
    PartialRecord { path: PathBuf, offset: u64, record_len: usize, found: usize },
}

/// At most this many file names are listed in a message; the list comes from
/// whoever supplied the files and may be long.
const MAX_LISTED: usize = 20;

/// Names quoted (they come from outside and may hold anything), the list capped.
fn list_names(names: &[String]) -> String {
    if names.is_empty() {
        return "(none)".into();
    }
    let mut out: Vec<String> = names.iter().take(MAX_LISTED).map(|n| format!("{n:?}")).collect();
    if names.len() > MAX_LISTED {
        out.push(format!("... and {} more", names.len() - MAX_LISTED));
    }
    out.join(", ")
}

fn list_paths(paths: &[PathBuf]) -> String {
    let names: Vec<String> = paths.iter().map(|p| p.display().to_string()).collect();
    names.join(", ")
}
