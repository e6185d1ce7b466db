//! Batching: order, determinism, normalisation, padding and augmentation.

use std::collections::HashSet;

use trustsplit_data::{batches, num_batches, Batch, BatchOptions, Dataset, DatasetKind, Normalization};

/// Normalisation that maps pixel `p` to `p / 255`, so tests can read pixels back.
fn identity() -> Normalization {
    Normalization { mean: vec![0.0], std: vec![1.0] }
}

fn pixel(v: f32) -> u8 {
    (v * 255.0).round() as u8
}

/// `n` 1x1x2 images whose two pixels encode their own index; label = index % 10.
fn indexed(n: usize) -> Dataset {
    Dataset {
        name: "indexed".into(),
        images: (0..n).flat_map(|i| [(i % 256) as u8, (i / 256) as u8]).collect(),
        labels: (0..n).map(|i| (i % 10) as u8).collect(),
        channels: 1,
        height: 1,
        width: 2,
        num_classes: 10,
    }
}

/// The dataset indices of a batch of `indexed` images, checking their labels.
fn indices(batch: &Batch) -> Vec<usize> {
    let ids: Vec<usize> =
        batch.images.chunks_exact(2).map(|p| usize::from(pixel(p[0])) + 256 * usize::from(pixel(p[1]))).collect();
    for (id, &label) in ids.iter().zip(&batch.labels) {
        assert_eq!(label, id % 10);
    }
    ids
}

fn shuffled(batch_size: usize, seed: u64, epoch: u64) -> BatchOptions {
    BatchOptions { shuffle: true, seed, epoch, ..BatchOptions::new(batch_size, identity()) }
}

#[test]
fn batch_counts() {
    assert_eq!(num_batches(10, 3, false), 4);
    assert_eq!(num_batches(10, 3, true), 3);
    assert_eq!(num_batches(9, 3, false), 3);
    assert_eq!(num_batches(9, 3, true), 3);
    assert_eq!(num_batches(0, 5, false), 0);
    assert_eq!(num_batches(2, 5, true), 0);
}

#[test]
fn sequential_batches_keep_file_order() {
    let ds = indexed(10);
    let opts = BatchOptions::new(4, identity());
    let iter = batches(&ds, &opts);
    assert_eq!(iter.len(), 3);
    let all: Vec<Batch> = iter.collect();
    assert_eq!(all.iter().map(|b| b.n).collect::<Vec<_>>(), [4, 4, 2]);
    assert_eq!(all.iter().flat_map(indices).collect::<Vec<_>>(), (0..10).collect::<Vec<_>>());
    assert_eq!((all[0].channels, all[0].height, all[0].width), (1, 1, 2));
    assert_eq!(all[2].images.len(), 2 * 2);

    let opts = BatchOptions { drop_last: true, ..opts };
    let sizes: Vec<usize> = batches(&ds, &opts).map(|b| b.n).collect();
    assert_eq!(sizes, [4, 4]);
}

#[test]
fn every_sample_appears_once_per_epoch() {
    let ds = indexed(300);
    for epoch in 0..3 {
        let opts = shuffled(32, 7, epoch);
        let iter = batches(&ds, &opts);
        let order = iter.order().to_vec();
        let seen: Vec<usize> = iter.flat_map(|b| indices(&b)).collect();
        assert_eq!(seen, order);
        let mut sorted = seen.clone();
        sorted.sort();
        assert_eq!(sorted, (0..300).collect::<Vec<_>>());
        assert_ne!(seen, sorted, "epoch {epoch} was not shuffled");
    }
}

#[test]
fn order_depends_only_on_seed_and_epoch() {
    let ds = indexed(100);
    let run = |seed, epoch| -> Vec<Batch> {
        let opts = BatchOptions { augment: true, ..shuffled(16, seed, epoch) };
        batches(&ds, &opts).collect()
    };
    assert_eq!(run(1, 0), run(1, 0));
    assert_eq!(run(1, 5), run(1, 5));
    assert_ne!(run(1, 0), run(1, 1));
    assert_ne!(run(1, 0), run(2, 0));
}

#[test]
fn skipping_batches_does_not_change_later_ones() {
    let ds = indexed(100);
    let opts = BatchOptions { augment: true, pad_to: Some(6), ..shuffled(16, 3, 2) };
    let all: Vec<Batch> = batches(&ds, &opts).collect();
    let mut iter = batches(&ds, &opts);
    assert_eq!(iter.nth(2).as_ref(), Some(&all[2]));
    assert_eq!(iter.len(), all.len() - 3);
    assert_eq!(iter.next().as_ref(), Some(&all[3]));
    assert_eq!(iter.nth(100), None);
}

#[test]
fn normalisation_per_channel_and_broadcast() {
    let ds = Dataset {
        name: "rgb".into(),
        images: vec![0, 255, 128, 64, 10, 20],
        labels: vec![0],
        channels: 3,
        height: 1,
        width: 2,
        num_classes: 10,
    };
    let norm = DatasetKind::Cifar10.normalization();
    let batch = batches(&ds, &BatchOptions::new(1, norm.clone())).next().unwrap();
    for (i, (&v, &p)) in batch.images.iter().zip(&ds.images).enumerate() {
        let c = i / 2;
        let want = (f32::from(p) / 255.0 - norm.mean[c]) / norm.std[c];
        assert!((v - want).abs() < 1e-6, "channel {c}: {v} vs {want}");
    }
    let single = Normalization { mean: vec![0.5], std: vec![0.25] };
    let batch = batches(&ds, &BatchOptions::new(1, single)).next().unwrap();
    assert_eq!(batch.images[0], -2.0);
    assert_eq!(batch.images[1], 2.0);
}

/// A single-image dataset of one channel with the given pixels.
fn one_image(height: usize, width: usize, pixels: Vec<u8>) -> Dataset {
    Dataset { name: "one".into(), images: pixels, labels: vec![3], channels: 1, height, width, num_classes: 10 }
}

fn render(ds: &Dataset, pad_to: usize) -> Vec<u8> {
    let opts = BatchOptions { pad_to: Some(pad_to), ..BatchOptions::new(1, identity()) };
    let batch = batches(ds, &opts).next().unwrap();
    assert_eq!((batch.height, batch.width), (pad_to, pad_to));
    batch.images.iter().map(|&v| pixel(v)).collect()
}

#[test]
fn pad_to_centres_the_image() {
    let square = one_image(2, 2, vec![1, 2, 3, 4]);
    #[rustfmt::skip]
    assert_eq!(render(&square, 4), [
        0, 0, 0, 0,
        0, 1, 2, 0,
        0, 3, 4, 0,
        0, 0, 0, 0,
    ]);
    // Odd margins put the extra row/column at the bottom/right.
    let wide = one_image(2, 3, vec![1, 2, 3, 4, 5, 6]);
    #[rustfmt::skip]
    assert_eq!(render(&wide, 5), [
        0, 0, 0, 0, 0,
        0, 1, 2, 3, 0,
        0, 4, 5, 6, 0,
        0, 0, 0, 0, 0,
        0, 0, 0, 0, 0,
    ]);
    // A smaller size crops the centre.
    let big = one_image(4, 4, (1..=16).collect());
    assert_eq!(render(&big, 2), [6, 7, 10, 11]);
}

#[test]
fn padding_is_zero_after_normalisation() {
    let ds = one_image(1, 1, vec![0]);
    let opts = BatchOptions { pad_to: Some(3), ..BatchOptions::new(1, DatasetKind::Mnist.normalization()) };
    let batch = batches(&ds, &opts).next().unwrap();
    let black = (0.0 - 0.1307) / 0.3081;
    assert!((batch.images[4] - black).abs() < 1e-6);
    assert!(batch.images.iter().enumerate().all(|(i, &v)| i == 4 || v == 0.0));
}

/// What augmentation with shift `(dy, dx)` and `flip` should make of `image`.
fn transformed(image: &[u8], c: usize, h: usize, w: usize, dy: isize, dx: isize, flip: bool) -> Vec<u8> {
    let mut out = Vec::new();
    for ch in 0..c {
        for y in 0..h as isize {
            for x in 0..w as isize {
                let xs = if flip { w as isize - 1 - x } else { x };
                let (sy, sx) = (y + dy, xs + dx);
                let inside = (0..h as isize).contains(&sy) && (0..w as isize).contains(&sx);
                out.push(if inside { image[(ch * h + sy as usize) * w + sx as usize] } else { 0 });
            }
        }
    }
    out
}

#[test]
fn augmentation_is_a_shifted_or_flipped_copy() {
    let (c, h, w) = (3, 8, 8);
    let image: Vec<u8> = (1..=(c * h * w) as u8).collect(); // all distinct, none zero
    let ds = Dataset {
        name: "same".into(),
        images: image.repeat(40),
        labels: vec![1; 40],
        channels: c,
        height: h,
        width: w,
        num_classes: 10,
    };
    let mut seen = HashSet::new();
    for epoch in 0..5 {
        let opts = BatchOptions { augment: true, ..shuffled(16, 11, epoch) };
        for batch in batches(&ds, &opts) {
            for out in batch.images.chunks_exact(c * h * w) {
                let got: Vec<u8> = out.iter().map(|&v| pixel(v)).collect();
                let found = (-4..=4)
                    .flat_map(|dy| (-4..=4).flat_map(move |dx| [(dy, dx, false), (dy, dx, true)]))
                    .find(|&(dy, dx, f)| transformed(&image, c, h, w, dy, dx, f) == got);
                seen.insert(found.expect("output is not a crop/flip of the input"));
            }
        }
    }
    // 200 draws from 162 transforms: expect wide coverage, both flip states.
    assert!(seen.len() > 60, "only {} distinct transforms", seen.len());
    assert!(seen.iter().any(|t| t.2) && seen.iter().any(|t| !t.2));
    assert!(seen.iter().any(|t| t.0 == 4) && seen.iter().any(|t| t.1 == -4));
}

#[test]
fn no_augmentation_unless_asked() {
    let ds = indexed(50);
    let opts = shuffled(8, 1, 1);
    for batch in batches(&ds, &opts) {
        for (id, px) in indices(&batch).iter().zip(batch.images.chunks_exact(2)) {
            assert_eq!(&px.iter().map(|&v| pixel(v)).collect::<Vec<_>>(), &ds.images[id * 2..id * 2 + 2]);
        }
    }
}

#[test]
fn subset_takes_the_first_images() {
    let ds = indexed(20);
    let sub = ds.subset(5);
    assert_eq!(sub.len(), 5);
    assert_eq!(sub.images, ds.images[..10]);
    assert_eq!(sub.labels, ds.labels[..5]);
    assert_eq!(ds.subset(99), ds);
    assert!(ds.subset(0).is_empty());
}
