//! The Fashion-MNIST subset compiled into the binary.
//!
//! Shipping a small real dataset means training works on a fresh clone with
//! no downloads. The bytes are ordinary gzip'd IDX files (see
//! `embedded/README.md` and `scripts/make_embedded_dataset.sh`) and go
//! through the same parser as files on disk, so there is one code path to trust.

use std::borrow::Cow;
use std::path::PathBuf;

use crate::idx::{self, IdxFile, IdxSet};
use crate::{DataError, Splits};

/// Loads the embedded split: 5000 training and 1000 test images, 1x28x28.
pub(crate) fn load(name: &str) -> Result<Splits, DataError> {
    let file = |file_name: &str, gz: &'static [u8]| -> Result<IdxFile<'static>, DataError> {
        // A pseudo path, so error messages still say which blob was bad.
        IdxFile::new(PathBuf::from("<embedded>").join(file_name), Cow::Borrowed(gz))
    };
    idx::load_set(
        name,
        IdxSet {
            train_images: file("train-images-idx3-ubyte.gz", include_bytes!("../embedded/train-images-idx3-ubyte.gz"))?,
            train_labels: file("train-labels-idx1-ubyte.gz", include_bytes!("../embedded/train-labels-idx1-ubyte.gz"))?,
            test_images: file("t10k-images-idx3-ubyte.gz", include_bytes!("../embedded/t10k-images-idx3-ubyte.gz"))?,
            test_labels: file("t10k-labels-idx1-ubyte.gz", include_bytes!("../embedded/t10k-labels-idx1-ubyte.gz"))?,
        },
    )
}
