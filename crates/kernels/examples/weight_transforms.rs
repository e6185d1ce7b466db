//! `tap_products`' two weight transforms against the same products through `gemm`, on VGG16's
//! 13 convolution weights at 8 columns (the best setting's rank in the deep layers), one thread:
//!
//! - `transform_inputs`: `T = W U`, the weight on AsymML's few virtual input channels (forward);
//! - `transform_outputs`: `T = P^T W`, on its few virtual output channels (input gradient).
//!
//!     cargo run --release -p trustsplit-kernels --example weight_transforms
//!
//! Each pass transforms all 13 weights once, after a sweep of a 256 MiB buffer has pushed them out
//! of the caches (as a training step's other work does). Measured twice: alone, and with a second
//! thread copying a 256 MiB buffer back and forth meanwhile, as the CPU device's thread streams
//! memory beside the enclave in `trustsplit bench step --device cpu:1`. Prints the median of 7
//! passes of each, alternating, and their ratio.

use std::sync::atomic::{AtomicBool, Ordering};
use std::time::Instant;
use trustsplit_kernels::matmul::{matmul, matmul_strided, parallelism, MatRef};
use trustsplit_kernels::tap_products::{transform_inputs, transform_outputs, TapShape};

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
const TAPS: usize = 9;
const BIG: usize = 64 << 20; // f32 values: 256 MiB

fn values(n: usize, salt: usize) -> Vec<f32> {
    (0..n).map(|i| ((i * 7919 + salt * 31) % 2001) as f32 / 1000.0 - 1.0).collect()
}

struct Layer {
    shape: TapShape,
    weight: Vec<f32>,
    /// The input-side basis, `in_channels x COLS`.
    u: Vec<f32>,
    /// The output-side basis, `out_channels x COLS`.
    p: Vec<f32>,
    out: Vec<f32>,
}

/// One direction: the kernel and the `gemm` route, each filling `out` for one layer.
struct Direction {
    name: &'static str,
    kernel: fn(&mut Layer),
    through_gemm: fn(&mut Layer),
    out_len: fn(&TapShape) -> usize,
}

fn inputs_kernel(l: &mut Layer) {
    transform_inputs(l.shape, &l.weight, &l.u, COLS, &mut l.out);
}

/// Per tap, `W[:, :, tap] U` (strided views of the weight and of `T`) through `gemm`, as the
/// kernel's portable fallback does.
fn inputs_gemm(l: &mut Layer) {
    let (c, co) = (l.shape.in_channels, l.shape.out_channels);
    let u = MatRef::row_major(&l.u, c, COLS);
    for tap in 0..TAPS {
        let w_tap = MatRef { data: &l.weight[tap..], rows: co, cols: c, row_stride: c * TAPS, col_stride: TAPS };
        matmul_strided(w_tap, u, &mut l.out[tap..], COLS * TAPS, TAPS, false, parallelism(1));
    }
}

fn outputs_kernel(l: &mut Layer) {
    transform_outputs(l.shape, &l.weight, &l.p, COLS, &mut l.out);
}

fn outputs_gemm(l: &mut Layer) {
    let (co, n) = (l.shape.out_channels, l.shape.in_channels * l.shape.taps);
    let (a, b) = (MatRef::row_major(&l.p, co, COLS).t(), MatRef::row_major(&l.weight, co, n));
    matmul(a, b, &mut l.out, n, false, parallelism(1));
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

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

/// Medians of 7 alternating passes of the kernel and of `gemm`.
fn compare(layers: &mut [Layer], evict: &[f32], d: &Direction) -> (f64, f64) {
    let (mut ours, mut theirs) = (Vec::new(), Vec::new());
    for _ in 0..7 {
        ours.push(pass(layers, evict, d.kernel));
        theirs.push(pass(layers, evict, d.through_gemm));
    }
    (median(ours), median(theirs))
}

fn main() {
    let directions = [
        Direction {
            name: "transform_inputs",
            kernel: inputs_kernel,
            through_gemm: inputs_gemm,
            out_len: |s| s.out_channels * COLS * s.taps,
        },
        Direction {
            name: "transform_outputs",
            kernel: outputs_kernel,
            through_gemm: outputs_gemm,
            out_len: |s| COLS * s.in_channels * s.taps,
        },
    ];
    let evict = values(BIG, 7);
    for d in &directions {
        let mut layers: Vec<Layer> = LAYERS
            .iter()
            .enumerate()
            .map(|(i, &(co, ci))| {
                let shape = TapShape { out_channels: co, in_channels: ci, taps: TAPS };
                Layer {
                    shape,
                    weight: values(shape.weight_len(), i),
                    u: values(ci * COLS, i + 50),
                    p: values(co * COLS, i + 100),
                    out: vec![0.0; (d.out_len)(&shape)],
                }
            })
            .collect();
        // The two routes agree (to rounding) before anything is timed.
        for l in layers.iter_mut() {
            (d.kernel)(l);
            let ours = l.out.clone();
            (d.through_gemm)(l);
            let worst = ours.iter().zip(&l.out).map(|(a, b)| (a - b).abs() / b.abs().max(1.0)).fold(0.0, f32::max);
            assert!(worst < 1e-4, "{}: the kernel and gemm differ by {worst}", d.name);
        }
        let (alone, alone_gemm) = compare(&mut layers, &evict, d);
        println!(
            "VGG16's 13 weights, {COLS} columns, alone: {} {alone:.2} ms, gemm {alone_gemm:.2} ms (gemm / ours {:.2}x)",
            d.name,
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
            let out = compare(&mut layers, &evict, d);
            stop.store(true, Ordering::Relaxed);
            out
        });
        println!(
            "VGG16's 13 weights, {COLS} columns, beside a thread copying 256 MiB: {} {busy:.2} ms, gemm {busy_gemm:.2} ms \
             (gemm / ours {:.2}x)",
            d.name,
            busy_gemm / busy
        );
    }
}
