//! The few-output-channel input gradient (`conv2d_backward_data_few_outputs`, AsymML's
//! `conv_transpose(Q, P^T W)` through r virtual output channels) against the unrolled route
//! (`conv2d_backward_data`: column matrix, then col2im), on the input-gradient shapes of AsymML's
//! best VGG16 and ResNet18 settings (batch 32, 3x3 kernels), one thread:
//!
//!     cargo run --release -p trustsplit-kernels --example input_gradient
//!
//! Prints the median of 9 runs of each, per shape and in total, and the ratio. The two routes
//! alternate run by run, so load on a shared machine falls on both alike.

use std::time::Instant;
use trustsplit_kernels::conv::{conv2d_backward_data, conv2d_backward_data_few_outputs, ConvGeometry};

const RUNS: usize = 9;

fn values(n: usize, salt: usize) -> Vec<f32> {
    (0..n).map(|i| ((i * 7919 + salt * 104_729) % 2001) as f32 / 1000.0 - 1.0).collect()
}

fn median(mut v: Vec<f64>) -> f64 {
    v.sort_by(f64::total_cmp);
    v[v.len() / 2]
}

fn main() {
    rayon::ThreadPoolBuilder::new().num_threads(1).build_global().expect("a one-thread pool");
    // (input channels, input map side, rank, stride): each distinct input-gradient shape of the
    // two models' 3x3 convolutions under ranks 1, 2, 4, 4, 8 (VGG16: 2x2 to 32x32, stride 1;
    // ResNet18 adds the three stride-2 convolutions that open a stage).
    let shapes = [
        (64, 32, 2, 1),
        (64, 32, 4, 1),
        (64, 32, 8, 1),
        (64, 16, 4, 1),
        (128, 16, 4, 1),
        (128, 16, 8, 1),
        (128, 8, 8, 1),
        (256, 8, 8, 1),
        (256, 4, 8, 1),
        (512, 4, 8, 1),
        (512, 2, 8, 1),
        (64, 32, 8, 2),
        (128, 16, 8, 2),
        (256, 8, 8, 2),
    ];
    let (mut total_few, mut total_unrolled) = (0.0, 0.0);
    for (c, side, rank, stride) in shapes {
        let g = ConvGeometry {
            batch: 32,
            in_channels: c,
            out_channels: rank,
            in_h: side,
            in_w: side,
            kernel_h: 3,
            kernel_w: 3,
            stride,
            padding: 1,
        };
        let (dy, w) = (values(g.output_len(), 1), values(g.weight_len(), 2));
        let (mut few, mut unrolled) = (vec![0.0f32; g.input_len()], vec![0.0f32; g.input_len()]);
        let (mut t_few, mut t_unrolled) = (Vec::new(), Vec::new());
        for _ in 0..RUNS {
            let start = Instant::now();
            conv2d_backward_data_few_outputs(&g, &dy, &w, &mut few);
            t_few.push(start.elapsed().as_secs_f64() * 1e3);
            let start = Instant::now();
            conv2d_backward_data(&g, &dy, &w, &mut unrolled);
            t_unrolled.push(start.elapsed().as_secs_f64() * 1e3);
        }
        let worst = few.iter().zip(&unrolled).map(|(a, b)| (a - b).abs() / b.abs().max(1.0)).fold(0.0, f32::max);
        assert!(worst < 1e-4, "the two routes differ by {worst}");
        let (a, b) = (median(t_few), median(t_unrolled));
        total_few += a;
        total_unrolled += b;
        println!(
            "{c:3} channels {side:2}x{side:<2} rank {rank} stride {stride}: few-outputs {a:6.3} ms, unrolled {b:6.3} ms ({:.2}x)",
            b / a
        );
    }
    println!(
        "total: few-outputs {total_few:.2} ms, unrolled {total_unrolled:.2} ms ({:.2}x)",
        total_unrolled / total_few
    );
}
