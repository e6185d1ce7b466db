//! Helpers shared by the integration tests: writers for small IDX and CIFAR
//! files, so every format path can be exercised without real downloads.
#![allow(dead_code)] // each test binary uses a different subset

use std::io::Write;
use std::path::Path;

use flate2::write::GzEncoder;
use flate2::Compression;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

/// Deterministic random bytes, so failures reproduce.
pub fn random_bytes(len: usize, seed: u64) -> Vec<u8> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..len).map(|_| rng.random()).collect()
}

/// Deterministic random labels below `classes`.
pub fn random_labels(len: usize, classes: u8, seed: u64) -> Vec<u8> {
    let mut rng = ChaCha8Rng::seed_from_u64(seed);
    (0..len).map(|_| rng.random_range(0..classes)).collect()
}

/// An IDX u8 file with the given dimensions and data (not checked for consistency).
pub fn idx(dims: &[u32], data: &[u8]) -> Vec<u8> {
    let mut out = vec![0, 0, 0x08, dims.len() as u8];
    for d in dims {
        out.extend_from_slice(&d.to_be_bytes());
    }
    out.extend_from_slice(data);
    out
}

pub fn gzip(bytes: &[u8]) -> Vec<u8> {
    let mut enc = GzEncoder::new(Vec::new(), Compression::default());
    enc.write_all(bytes).unwrap();
    enc.finish().unwrap()
}

pub fn write(dir: &Path, name: &str, bytes: &[u8]) {
    std::fs::create_dir_all(dir).unwrap();
    std::fs::write(dir.join(name), bytes).unwrap();
}

/// One split's raw content: `n` images of `rows x cols` and their labels.
pub struct Split {
    pub rows: u32,
    pub cols: u32,
    pub images: Vec<u8>,
    pub labels: Vec<u8>,
}

impl Split {
    pub fn random(n: usize, rows: u32, cols: u32, seed: u64) -> Split {
        Split {
            rows,
            cols,
            images: random_bytes(n * (rows * cols) as usize, seed),
            labels: random_labels(n, 10, seed + 1),
        }
    }

    pub fn image_file(&self) -> Vec<u8> {
        idx(&[self.labels.len() as u32, self.rows, self.cols], &self.images)
    }

    pub fn label_file(&self) -> Vec<u8> {
        idx(&[self.labels.len() as u32], &self.labels)
    }
}

/// Writes the four standard MNIST files, gzip'd (with `.gz` names) or raw.
pub fn write_mnist(dir: &Path, train: &Split, test: &Split, gz: bool) {
    let files = [
        ("train-images-idx3-ubyte", train.image_file()),
        ("train-labels-idx1-ubyte", train.label_file()),
        ("t10k-images-idx3-ubyte", test.image_file()),
        ("t10k-labels-idx1-ubyte", test.label_file()),
    ];
    for (name, bytes) in files {
        if gz {
            write(dir, &format!("{name}.gz"), &gzip(&bytes));
        } else {
            write(dir, name, &bytes);
        }
    }
}

/// A CIFAR binary file: each record is `label_bytes` then a 3x32x32 image.
pub fn cifar_file(labels: &[Vec<u8>], images: &[u8]) -> Vec<u8> {
    let mut out = Vec::new();
    for (label, image) in labels.iter().zip(images.chunks_exact(3072)) {
        out.extend_from_slice(label);
        out.extend_from_slice(image);
    }
    out
}
