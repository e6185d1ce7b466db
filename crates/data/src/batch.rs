//! Turning a [`Dataset`] into normalised `f32` batches.
//!
//! All randomness (shuffle order, crop offsets, flips) comes from a ChaCha8
//! generator seeded only by `(seed, epoch)`, so a run resumed at epoch `e`
//! sees exactly the batches the original run saw. The shuffle uses stream 0
//! and batch `b` draws its augmentation from stream `b + 1`, so skipping
//! batches (e.g. resuming mid-epoch with `nth`) does not change later ones.

use rand::seq::SliceRandom;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use crate::{Dataset, Normalization};

/// How far a random crop may shift an image, as in the usual CIFAR recipe
/// (pad by 4 on every side, then crop back to the original size).
const CROP_PAD: i32 = 4;

/// How to cut a dataset into batches.
#[derive(Debug, Clone, PartialEq)]
pub struct BatchOptions {
    /// Images per batch; must be non-zero.
    pub batch_size: usize,
    /// Visit samples in a seeded random order rather than file order.
    pub shuffle: bool,
    pub seed: u64,
    /// Mixed into the seed so each epoch has its own order and augmentation.
    pub epoch: u64,
    /// Random crop (shift of up to 4 pixels, zero padded) and horizontal flip.
    pub augment: bool,
    /// Place each image in the centre of a `pad_to x pad_to` canvas, e.g. 28 ->
    /// 32 so CIFAR-shaped models run on Fashion-MNIST. A smaller size crops
    /// the centre instead.
    pub pad_to: Option<usize>,
    /// One `(mean, std)` per channel, or a single pair applied to all channels.
    pub normalization: Normalization,
    /// Skip the final batch if it would be smaller than `batch_size`.
    pub drop_last: bool,
}

impl BatchOptions {
    /// Plain sequential batches: no shuffle, augmentation or padding.
    pub fn new(batch_size: usize, normalization: Normalization) -> Self {
        BatchOptions {
            batch_size,
            shuffle: false,
            seed: 0,
            epoch: 0,
            augment: false,
            pad_to: None,
            normalization,
            drop_last: false,
        }
    }
}

/// A batch of normalised images (NCHW) and their class indices.
///
/// Padding — from `pad_to` or from the augmentation crop — has the value 0
/// *after* normalisation, i.e. it reads as the dataset's mean colour. That
/// keeps the border neutral for the network (unlike black, which is a strong
/// signal on dark-background datasets) and uses one rule for both kinds of padding.
#[derive(Debug, Clone, PartialEq)]
pub struct Batch {
    pub images: Vec<f32>,
    pub labels: Vec<usize>,
    /// The samples' numbers in the dataset, in batch order.
    pub indices: Vec<usize>,
    pub n: usize,
    pub channels: usize,
    pub height: usize,
    pub width: usize,
}

/// Number of batches an epoch of `ds_len` samples yields.
///
/// # Panics
/// If `batch_size` is zero.
pub fn num_batches(ds_len: usize, batch_size: usize, drop_last: bool) -> usize {
    assert!(batch_size > 0, "batch_size must be positive");
    if drop_last {
        ds_len / batch_size
    } else {
        ds_len.div_ceil(batch_size)
    }
}

/// Iterates over one epoch of `ds` as described by `opts`.
///
/// # Panics
/// If `opts.batch_size` or `opts.pad_to` is zero, or the normalisation has
/// neither one entry nor one per channel: programming errors, not data errors.
pub fn batches<'a>(ds: &'a Dataset, opts: &'a BatchOptions) -> BatchIter<'a> {
    BatchIter::new(ds, opts)
}

/// The iterator returned by [`batches`].
pub struct BatchIter<'a> {
    ds: &'a Dataset,
    opts: &'a BatchOptions,
    /// Dataset indices in the order this epoch visits them.
    order: Vec<usize>,
    /// Per channel, the normalised value of each of the 256 pixel values.
    lut: Vec<[f32; 256]>,
    out_h: usize,
    out_w: usize,
    seed: u64,
    next: usize,
    total: usize,
}

/// The random transform applied to one image.
#[derive(Clone, Copy)]
struct Augment {
    dy: isize,
    dx: isize,
    flip: bool,
}

impl Augment {
    const NONE: Augment = Augment { dy: 0, dx: 0, flip: false };

    fn random(rng: &mut ChaCha8Rng) -> Augment {
        Augment {
            dy: rng.random_range(-CROP_PAD..=CROP_PAD) as isize,
            dx: rng.random_range(-CROP_PAD..=CROP_PAD) as isize,
            flip: rng.random_bool(0.5),
        }
    }
}

impl<'a> BatchIter<'a> {
    fn new(ds: &'a Dataset, opts: &'a BatchOptions) -> Self {
        assert!(opts.pad_to != Some(0), "pad_to must be positive");
        let seed = opts.seed ^ opts.epoch.wrapping_mul(0x9E37_79B9_7F4A_7C15);
        let mut order: Vec<usize> = (0..ds.len()).collect();
        if opts.shuffle {
            order.shuffle(&mut ChaCha8Rng::seed_from_u64(seed));
        }
        BatchIter {
            ds,
            opts,
            order,
            lut: lookup_tables(&opts.normalization, ds.channels),
            out_h: opts.pad_to.unwrap_or(ds.height),
            out_w: opts.pad_to.unwrap_or(ds.width),
            seed,
            next: 0,
            total: num_batches(ds.len(), opts.batch_size, opts.drop_last),
        }
    }

    /// The dataset indices in the order this epoch visits them.
    pub fn order(&self) -> &[usize] {
        &self.order
    }

    /// Writes image `index`, transformed, into `out` (`channels * out_h * out_w`).
    fn render(&self, index: usize, aug: Augment, out: &mut [f32]) {
        let (h, w) = (self.ds.height as isize, self.ds.width as isize);
        // Offset of the source image inside the output canvas; negative crops.
        let top = (self.out_h as isize - h) / 2;
        let left = (self.out_w as isize - w) / 2;
        let image = self.ds.image(index);
        let planes = image.chunks_exact(self.ds.height * self.ds.width);
        let out_planes = out.chunks_exact_mut(self.out_h * self.out_w);
        for ((plane, out_plane), lut) in planes.zip(out_planes).zip(&self.lut) {
            for (y, out_row) in out_plane.chunks_exact_mut(self.out_w).enumerate() {
                let sy = y as isize + aug.dy - top;
                for (x, value) in out_row.iter_mut().enumerate() {
                    let x = if aug.flip { self.out_w - 1 - x } else { x };
                    let sx = x as isize + aug.dx - left;
                    *value = if (0..h).contains(&sy) && (0..w).contains(&sx) {
                        lut[usize::from(plane[(sy * w + sx) as usize])]
                    } else {
                        0.0
                    };
                }
            }
        }
    }
}

/// Precomputes `(p / 255 - mean) / std` for every pixel value and channel.
fn lookup_tables(norm: &Normalization, channels: usize) -> Vec<[f32; 256]> {
    let n = norm.mean.len();
    assert!(
        n == norm.std.len() && (n == 1 || n == channels),
        "normalisation has {} means and {} stds for {channels} channels",
        n,
        norm.std.len()
    );
    (0..channels)
        .map(|c| {
            let (mean, std) = (norm.mean[c % n], norm.std[c % n]);
            std::array::from_fn(|p| (p as f32 / 255.0 - mean) / std)
        })
        .collect()
}

impl Iterator for BatchIter<'_> {
    type Item = Batch;

    fn next(&mut self) -> Option<Batch> {
        if self.next >= self.total {
            return None;
        }
        let b = self.next;
        self.next += 1;
        let start = b * self.opts.batch_size;
        let end = (start + self.opts.batch_size).min(self.order.len());
        let indices = &self.order[start..end];

        let mut rng = self.opts.augment.then(|| {
            let mut rng = ChaCha8Rng::seed_from_u64(self.seed);
            rng.set_stream(b as u64 + 1);
            rng
        });
        let per_image = self.ds.channels * self.out_h * self.out_w;
        let mut images = vec![0.0; indices.len() * per_image];
        for (&index, out) in indices.iter().zip(images.chunks_exact_mut(per_image)) {
            let aug = rng.as_mut().map_or(Augment::NONE, Augment::random);
            self.render(index, aug, out);
        }
        Some(Batch {
            images,
            labels: indices.iter().map(|&i| usize::from(self.ds.labels[i])).collect(),
            indices: indices.to_vec(),
            n: indices.len(),
            channels: self.ds.channels,
            height: self.out_h,
            width: self.out_w,
        })
    }

    /// Skips batches without building them; later batches are unaffected.
    fn nth(&mut self, n: usize) -> Option<Batch> {
        self.next = self.next.saturating_add(n).min(self.total);
        self.next()
    }

    fn size_hint(&self) -> (usize, Option<usize>) {
        let left = self.total - self.next;
        (left, Some(left))
    }
}

impl ExactSizeIterator for BatchIter<'_> {}
impl std::iter::FusedIterator for BatchIter<'_> {}
