//! The direct few-channel weight gradients (`thin_conv`) against the GEMM route they replace, on
//! the low-rank products of AsymML's best VGG16 setting (batch 32, ranks 1, 2, 4, 4 by block, the
//! 2x2 block has no direct route), one thread:
//!
//!     cargo run --release -p trustsplit-kernels --example thin_conv
//!
//! Prints the median of 9 runs of each, per layer shape and in total, and the ratio. The two
//! routes alternate run by run, so load on a shared machine falls on both alike.

use std::time::Instant;
use trustsplit_kernels::conv::{
    backward_weight_few_inputs_by_gemm, backward_weight_few_outputs_by_gemm, conv2d_backward_weight_few_inputs,
    conv2d_backward_weight_few_outputs, ConvGeometry,
};
use trustsplit_kernels::thin_conv;

const RUNS: usize = 9;

/// Medians (ms) of `a` and `b`, run alternately.
fn medians(mut a: impl FnMut(), mut b: impl FnMut()) -> (f64, f64) {
    let time = |f: &mut dyn FnMut()| {
        let start = Instant::now();
        f();
        start.elapsed().as_secs_f64() * 1e3
    };
    let (mut ta, mut tb) = (Vec::new(), Vec::new());
    for _ in 0..RUNS {
        ta.push(time(&mut a));
        tb.push(time(&mut b));
    }
    let median = |mut v: Vec<f64>| {
        v.sort_by(|x, y| x.total_cmp(y));
        v[RUNS / 2]
    };
    (median(ta), median(tb))
}

fn values(n: usize, salt: usize) -> Vec<f32> {
    (0..n).map(|i| ((i * 7919 + salt * 104_729) % 2001) as f32 / 1000.0 - 1.0).collect()
}

/// The two routes sum in different orders: equal to f32 rounding.
fn agree(a: &[f32], b: &[f32]) {
    let scale = a.iter().fold(1e-3f32, |m, v| m.max(v.abs()));
    let worst = a.iter().zip(b).fold(0.0f32, |m, (x, y)| m.max((x - y).abs()));
    assert!(worst <= 1e-4 * scale, "the routes disagree: {worst} against a scale of {scale}");
}

fn main() {
    let pool = rayon::ThreadPoolBuilder::new().num_threads(1).build().expect("a one-thread pool");
    pool.install(run);
}

fn run() {
    // (wide channels, map side, rank): VGG16's 3x3 layers from 32x32 to 4x4.
    let layers = [(64, 32, 1), (64, 32, 1), (128, 16, 2), (128, 16, 2), (256, 8, 4), (256, 8, 4), (256, 8, 4)]
        .into_iter()
        .chain([(512, 4, 4); 3]);
    let mut totals = [0.0f64; 4];
    println!("{:>22} {:>24} {:>24}", "layer (wide, side, r)", "few inputs gemm/direct", "few outputs gemm/direct");
    for (wide, side, rank) in layers {
        let few_in = ConvGeometry {
            batch: 32,
            in_channels: rank,
            out_channels: wide,
            in_h: side,
            in_w: side,
            kernel_h: 3,
            kernel_w: 3,
            stride: 1,
            padding: 1,
        };
        let few_out = ConvGeometry { in_channels: wide, out_channels: rank, ..few_in };
        assert!(
            thin_conv::fits(&few_in, rank),
            "this CPU has no AVX-512 (or the shape does not fit): nothing to compare"
        );
        let (x, dy) = (values(few_in.input_len(), 1), values(few_in.output_len(), 2));
        let (mut by_gemm, mut direct) = (vec![0.0f32; few_in.weight_len()], vec![0.0f32; few_in.weight_len()]);
        let (a, b) = medians(
            || backward_weight_few_inputs_by_gemm(&few_in, &x, &dy, &mut by_gemm),
            || conv2d_backward_weight_few_inputs(&few_in, &x, &dy, &mut direct),
        );
        agree(&by_gemm, &direct);
        let (x, dy) = (values(few_out.input_len(), 3), values(few_out.output_len(), 4));
        let (mut by_gemm, mut direct) = (vec![0.0f32; few_out.weight_len()], vec![0.0f32; few_out.weight_len()]);
        let (c, d) = medians(
            || backward_weight_few_outputs_by_gemm(&few_out, &x, &dy, &mut by_gemm),
            || conv2d_backward_weight_few_outputs(&few_out, &x, &dy, &mut direct),
        );
        agree(&by_gemm, &direct);
        println!("{:>22} {:>15.3} / {:.3} ms {:>15.3} / {:.3} ms", format!("{wide}, {side}, {rank}"), a, b, c, d);
        for (t, v) in totals.iter_mut().zip([a, b, c, d]) {
            *t += v;
        }
    }
    let [a, b, c, d] = totals;
    println!("total: few inputs {a:.2} -> {b:.2} ms ({:.2}x), few outputs {c:.2} -> {d:.2} ms ({:.2}x)", a / b, c / d);
}
