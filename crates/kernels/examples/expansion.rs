//! Throughput of `tap_products::add_expansions`, the expansion of AsymML's low-rank weight-gradient
//! terms into a weight-sized gradient, on VGG16's 3x3 layers with the best setting's ranks (1, 2,
//! 4, 4, 8 by block), one thread:
//!
//!     cargo run --release -p trustsplit-kernels --example expansion
//!
//! First a block of rows of about 128 KiB expanded 200 times (so the gradient stays in cache),
//! per layer width; then all 13 layers once each on fresh gradients, three times. Both terms
//! (input and output side) are present, as in the placement.

use std::time::Instant;
use trustsplit_kernels::tap_products::{add_expansions, Expansion, TapShape};

fn values(n: usize, salt: usize) -> Vec<f32> {
    (0..n).map(|i| ((i * 7919 + salt * 31) % 2001) as f32 / 1000.0 - 1.0).collect()
}

/// `dw += U D + P E` for `rows` output channels of a `c_in`-input layer at rank `r`; returns the
/// multiply-adds.
fn expand(c_in: usize, rows: usize, r: usize, dw: &mut [f32], operands: &[Vec<f32>; 4]) -> usize {
    let [u, d, p, e] = operands;
    let shape = TapShape { out_channels: rows, in_channels: c_in, taps: 9 };
    let inputs = Expansion { basis: u, coeffs: &d[..rows * r * 9], cols: r };
    let outputs = Expansion { basis: &p[..rows * r], coeffs: e, cols: r };
    add_expansions(shape, Some(inputs), Some(outputs), dw);
    2 * r * rows * c_in * 9
}

fn operands(c_in: usize, c_out: usize, r: usize) -> [Vec<f32>; 4] {
    [values(c_in * r, 1), values(c_out * r * 9, 2), values(c_out * r, 3), values(r * c_in * 9, 4)]
}

fn main() {
    let pool = rayon::ThreadPoolBuilder::new().num_threads(1).build().expect("a one-thread pool");
    pool.install(run);
}

fn run() {
    for (c, r) in [(64, 1), (128, 2), (256, 4), (512, 8)] {
        let rows = (32768 / (c * 9)).clamp(1, c);
        let ops = operands(c, c, r);
        let mut dw = values(rows * c * 9, 5);
        let start = Instant::now();
        let macs: usize = (0..200).map(|_| expand(c, rows, r, &mut dw, &ops)).sum();
        let seconds = start.elapsed().as_secs_f64();
        let bytes = 200.0 * (rows * c * 9 * 8) as f64;
        println!(
            "in cache, {c} x {c} channels, rank {r}, {rows} rows: {:.1} G multiply-adds/s, {:.1} GB/s of gradient read and written",
            macs as f64 / seconds / 1e9,
            bytes / seconds / 1e9
        );
    }
    let layers = [(3, 64, 1), (64, 64, 1), (64, 128, 2), (128, 128, 2), (128, 256, 4), (256, 256, 4), (256, 256, 4)]
        .into_iter()
        .chain([(256, 512, 4), (512, 512, 4), (512, 512, 4), (512, 512, 8), (512, 512, 8), (512, 512, 8)]);
    let layers: Vec<(usize, usize, usize)> = layers.collect();
    for round in 1..=3 {
        let (mut seconds, mut macs) = (0.0, 0);
        for &(c_in, c_out, r) in &layers {
            let ops = operands(c_in, c_out, r);
            let mut dw = values(c_out * c_in * 9, 5);
            let start = Instant::now();
            macs += expand(c_in, c_out, r, &mut dw, &ops);
            seconds += start.elapsed().as_secs_f64();
        }
        println!(
            "round {round}: all 13 layers {:.2} ms, {:.1} G multiply-adds/s",
            seconds * 1e3,
            macs as f64 / seconds / 1e9
        );
    }
}
