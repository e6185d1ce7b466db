//! Locating and reading dataset files.
//!
//! Datasets are distributed in slightly different shapes (raw or `.gz`, in the
//! chosen directory or in the folder a tarball unpacks to), so files are looked
//! up among several candidates and the error lists every path that was tried.

use std::borrow::Cow;
use std::io::Read;
use std::path::{Path, PathBuf};

use flate2::read::MultiGzDecoder;

use crate::DataError;

/// The two magic bytes every gzip stream starts with.
const GZIP_MAGIC: [u8; 2] = [0x1f, 0x8b];

/// Returns the first candidate that exists as a file.
pub(crate) fn find(candidates: Vec<PathBuf>) -> Result<PathBuf, DataError> {
    match candidates.iter().find(|p| p.is_file()) {
        Some(found) => Ok(found.clone()),
        None => Err(DataError::MissingFile { tried: candidates }),
    }
}

/// Reads a whole file into memory.
pub(crate) fn read(path: &Path) -> Result<Vec<u8>, DataError> {
    std::fs::read(path).map_err(|source| DataError::Io { path: path.to_path_buf(), source })
}

/// Decompresses `bytes` if they are a gzip stream, else returns them unchanged.
///
/// Gzip is detected by content rather than by file name, so a renamed file
/// still loads. `path` is used only for error messages. Raw bytes are passed
/// through as given (borrowed stays borrowed), so files already in memory
/// (embedded, uploaded) are not copied just to be parsed.
pub(crate) fn gunzip_if_gzip<'a>(path: &Path, bytes: Cow<'a, [u8]>) -> Result<Cow<'a, [u8]>, DataError> {
    if !bytes.starts_with(&GZIP_MAGIC) {
        return Ok(bytes);
    }
    let mut out = Vec::new();
    MultiGzDecoder::new(&bytes[..])
        .read_to_end(&mut out)
        .map_err(|source| DataError::CorruptGzip { path: path.to_path_buf(), source })?;
    Ok(Cow::Owned(out))
}
