//! `tap_products::transform_outputs` (`T = P^T W`, the weight seen from AsymML's few virtual
//! output channels) against the same product through `gemm`, on VGG16's 13 convolution weights at
//! 8 columns (the best setting's output-gradient rank in the deep layers), one thread:
//!
//!     cargo run --release -p trustsplit-kernels --example output_transform
//!
//! Each pass transforms all 13 weights once, after a sweep of a 256 MiB buffer has pushed them out
//! of the caches (as a training step's other work does). Measured twice: alone, and with a second
//! thread copying a 256 MiB buffer back and forth meanwhile, as the CPU device's thread streams
//! memory beside the enclave in `trustsplit bench step --device cpu:1`. Prints the median of 7
//! passes of each, alternating, and their ratio.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;
use trustsplit_kernels::matmul::{matmul, parallelism, MatRef};
use trustsplit_kernels::tap_products::{transform_outputs, TapShape};

const LAYERS: [(usize, usize); 13] = [
    (64, 3),
    (64, 64),
    (128, 64),
    (128, 128),
    (256, 128),
    (256, 256),
    (256, 256),
    (512, 256),
    (512, 512),
    (512, 512),
    (512, 512),
    (512, 512),
    (512, 512),
];
const COLS: usize = 8;
const BIG: usize = 64 << 20; // f32 values: 256 MiB

fn values(n: usize, salt: usize) -> Vec<f32> {
    (0..n).map(|i| ((i * 7919 + salt * 31) % 2001) as f32 / 1000.0 - 1.0).collect()
}

struct Layer {
    shape: TapShape,
    weight: Vec<f32>,
    /// The basis, `out_channels x COLS`.
    p: Vec<f32>,
    out: Vec<f32>,
}

/// Milliseconds for one pass over every layer with `product`, after evicting the weights.
fn pass(layers: &mut [Layer], evict: &[f32], product: fn(&mut Layer)) -> f64 {
    let sum: f32 = evict.iter().step_by(16).sum();
    std::hint::black_box(sum);
    let start = Instant::now();
    for layer in layers.iter_mut() {
        product(layer);
    }
    start.elapsed().as_secs_f64() * 1e3
}

fn kernel(l: &mut Layer) {
    transform_outputs(l.shape, &l.weight, &l.p, COLS, &mut l.out);
}

fn through_gemm(l: &mut Layer) {
    let (co, n) = (l.shape.out_channels, l.shape.in_channels * l.shape.taps);
    let (a, b) = (MatRef::row_major(&l.p, co, COLS).t(), MatRef::row_major(&l.weight, co, n));
    matmul(a, b, &mut l.out, n, false, parallelism(1));
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Medians of 7 alternating passes of the kernel and of `gemm`.
fn compare(layers: &mut [Layer], evict: &[f32]) -> (f64, f64) {
    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    for _ in 0..7 {
        ours.push(pass(layers, evict, kernel));
        theirs.push(pass(layers, evict, through_gemm));
    }
    (median(ours), median(theirs))
}

fn main() {
    let mut layers: Vec<Layer> = LAYERS
        .iter()
        .enumerate()
        .map(|(i, &(co, ci))| {
            let shape = TapShape { out_channels: co, in_channels: ci, taps: 9 };
            Layer {
                shape,
                weight: values(shape.weight_len(), i),
                p: values(co * COLS, i + 100),
                out: vec![0.0; COLS * ci * 9],
            }
        })
        .collect();
    let evict = values(BIG, 7);
    // The two paths agree (to rounding) before anything is timed.
    for l in layers.iter_mut() {
        kernel(l);
        let ours = l.out.clone();
        through_gemm(l);
        let worst = ours.iter().zip(&l.out).map(|(a, b)| (a - b).abs() / b.abs().max(1.0)).fold(0.0, f32::max);
        assert!(worst < 1e-4, "the kernel and gemm differ by {worst}");
    }
    let (alone, alone_gemm) = compare(&mut layers, &evict);
    println!(
        "VGG16's 13 weights, {COLS} columns, alone: transform_outputs {alone:.2} ms, gemm {alone_gemm:.2} ms \
         (gemm / ours {:.2}x)",
        alone_gemm / alone
    );
    let stop = AtomicBool::new(false);
    let (busy, busy_gemm) = std::thread::scope(|s| {
        s.spawn(|| {
            let (mut a, mut b) = (values(BIG, 1), vec![0.0f32; BIG]);
            while !stop.load(Ordering::Relaxed) {
                b.copy_from_slice(&a);
                std::mem::swap(&mut a, &mut b);
            }
        });
        let out = compare(&mut layers, &evict);
        stop.store(true, Ordering::Relaxed);
        out
    });
    println!(
        "VGG16's 13 weights, {COLS} columns, beside a thread copying 256 MiB: transform_outputs {busy:.2} ms, \
         gemm {busy_gemm:.2} ms (gemm / ours {:.2}x)",
        busy_gemm / busy
    );
}
