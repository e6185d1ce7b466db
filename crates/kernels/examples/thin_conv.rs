//! The direct few-channel weight gradients (`thin_conv`) against the GEMM route, on the low-rank
//! products of AsymML's best setting (batch 32, ranks 1, 2, 4, 4, 8 by convolution, then 8) for
//! VGG16's and ResNet18's stride-1 3x3 convolutions (2x2 maps have no direct route), one thread:
//!
//!     cargo run --release -p trustsplit-kernels --example thin_conv
//!
//! Prints the median of 9 runs of each, per convolution and in total, and which route
//! `conv2d_backward_weight_few_inputs` / `_few_outputs` take there. The two routes alternate run
//! by run, so load on a shared machine falls on both alike.

use std::time::Instant;
use trustsplit_kernels::conv::{
    backward_weight_few_inputs_by_gemm, backward_weight_few_outputs_by_gemm, direct_weight_gradient_pays, ConvGeometry,
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
    // (model, input channels, output channels, map side, rank).
    let vgg16 =
        [(64, 64, 32, 2), (64, 128, 16, 4), (128, 128, 16, 4), (128, 256, 8, 8), (256, 256, 8, 8), (256, 256, 8, 8)]
            .into_iter()
            .chain([(256, 512, 4, 8), (512, 512, 4, 8), (512, 512, 4, 8)])
            .map(|(i, o, side, r)| ("vgg16", i, o, side, r));
    let resnet18 = [(64, 64, 32, 2), (64, 64, 32, 4), (64, 64, 32, 4), (64, 64, 32, 8)]
        .into_iter()
        .chain([(128, 128, 16, 8); 3])
        .chain([(256, 256, 8, 8); 3])
        .chain([(512, 512, 4, 8); 3])
        .map(|(i, o, side, r)| ("resnet18", i, o, side, r));
    let mut totals = [0.0f64; 6];
    println!(
        "{:>32} {:>30} {:>30}",
        "convolution (in, out, side, r)", "few inputs gemm/direct (pick)", "few outputs gemm/direct (pick)"
    );
    for (model, c_in, c_out, side, rank) in vgg16.chain(resnet18) {
        // `corr(V, dY)`: the input's r coordinates against the output gradient.
        let few_in = ConvGeometry {
            batch: 32,
            in_channels: rank,
            out_channels: c_out,
            in_h: side,
            in_w: side,
            kernel_h: 3,
            kernel_w: 3,
            stride: 1,
            padding: 1,
        };
        // `corr(X_r, Q)`: the input's residual against the output gradient's r coordinates.
        let few_out = ConvGeometry { in_channels: c_in, out_channels: rank, ..few_in };
        assert!(
            thin_conv::fits(&few_in, rank),
            "this CPU has no AVX-512 (or the shape does not fit): nothing to compare"
        );
        let (x, dy) = (values(few_in.input_len(), 1), values(few_in.output_len(), 2));
        let (mut by_gemm, mut direct) = (vec![0.0f32; few_in.weight_len()], vec![0.0f32; few_in.weight_len()]);
        let (a, b) = medians(
            || backward_weight_few_inputs_by_gemm(&few_in, &x, &dy, &mut by_gemm),
            || thin_conv::backward_weight_few_inputs(&few_in, &x, &dy, &mut direct),
        );
        agree(&by_gemm, &direct);
        let (x, dy) = (values(few_out.input_len(), 3), values(few_out.output_len(), 4));
        let (mut by_gemm, mut direct) = (vec![0.0f32; few_out.weight_len()], vec![0.0f32; few_out.weight_len()]);
        let (c, d) = medians(
            || backward_weight_few_outputs_by_gemm(&few_out, &x, &dy, &mut by_gemm),
            || thin_conv::backward_weight_few_outputs(&few_out, &x, &dy, &mut direct),
        );
        agree(&by_gemm, &direct);
        let (pick_in, pick_out) =
            (direct_weight_gradient_pays(&few_in, false), direct_weight_gradient_pays(&few_out, true));
        let name = |direct: bool| if direct { "direct" } else { "gemm" };
        println!(
            "{:>32} {:>11.3} / {:.3} ms ({:>6}) {:>11.3} / {:.3} ms ({:>6})",
            format!("{model} {c_in}, {c_out}, {side}, {rank}"),
            a,
            b,
            name(pick_in),
            c,
            d,
            name(pick_out)
        );
        let picked = [if pick_in { b } else { a }, if pick_out { d } else { c }];
        for (t, v) in totals.iter_mut().zip([a, b, picked[0], c, d, picked[1]]) {
            *t += v;
        }
    }
    let [a, b, e, c, d, f] = totals;
    println!("total few inputs: gemm {a:.2} ms, direct {b:.2} ms, as picked {e:.2} ms");
    println!("total few outputs: gemm {c:.2} ms, direct {d:.2} ms, as picked {f:.2} ms");
}
