//! Products whose right operand is a transposed row-major matrix with rows a power of two long
//! (AsymML's weight gradients on 32x32 maps: the output gradient spread to 1024 positions, read
//! through a transposed view), through `gemm` as given and with the columns moved apart first
//! (`matmul_strided`, which does so where the columns are a multiple of 512 bytes apart), one
//! thread:
//!
//!     cargo run --release -p trustsplit-kernels --example aliasing_columns
//!
//! Prints the median of 9 runs of 32 products each, both ways, and the multiply-adds per second.
//! The two alternate run by run, so load on a shared machine falls on both alike.

use std::time::Instant;
use trustsplit_kernels::matmul::{matmul_strided, matmul_strided_as_given, parallelism, MatRef};

const RUNS: usize = 9;
const PRODUCTS: usize = 32;

fn values(n: usize, salt: usize) -> Vec<f32> {
    (0..n).map(|i| ((i * 7919 + salt * 104_729) % 2001) as f32 / 1000.0 - 1.0).collect()
}

fn main() {
    rayon::ThreadPoolBuilder::new().num_threads(1).build_global().expect("a one-thread pool");
    // (m, k, n): the few-output-channel weight gradient of 64 channels on 32x32 maps at rank 8
    // (64 x 1024 times 1024 x 72) and at rank 2, the few-input-channel one at rank 8 on 32x32
    // (128 x 1024 times 1024 x 72), the unrolled one of ResNet18's first stage (576 x 1024 times
    // 1024 x 64), and a 16x16 map's (128 x 256 times 256 x 72).
    println!("{:>18} {:>22} {:>22} {:>7}", "m x k x n", "as given ms (GMAC/s)", "restrided ms (GMAC/s)", "ratio");
    for (m, k, n) in [(64, 1024, 72), (64, 1024, 18), (128, 1024, 72), (576, 1024, 64), (128, 256, 72)] {
        let a = values(m * k, 1);
        // The right operand as its transpose, n x k row-major.
        let b_t = values(n * k, 2);
        let b = MatRef::row_major(&b_t, n, k).t();
        let (mut given, mut restrided) = (vec![0.0f32; m * n], vec![0.0f32; m * n]);
        let (mut t_given, mut t_restrided) = (Vec::new(), Vec::new());
        for _ in 0..RUNS {
            let start = Instant::now();
            for p in 0..PRODUCTS {
                let a = MatRef::row_major(&a, m, k);
                matmul_strided_as_given(a, b, &mut given, n, 1, p > 0, parallelism(1));
            }
            t_given.push(start.elapsed().as_secs_f64() * 1e3);
            let start = Instant::now();
            for p in 0..PRODUCTS {
                let a = MatRef::row_major(&a, m, k);
                matmul_strided(a, b, &mut restrided, n, 1, p > 0, parallelism(1));
            }
            t_restrided.push(start.elapsed().as_secs_f64() * 1e3);
        }
        let worst = given.iter().zip(&restrided).fold(0.0f32, |w, (x, y)| w.max((x - y).abs()));
        let scale = given.iter().fold(1.0f32, |s, v| s.max(v.abs()));
        assert!(worst <= 1e-5 * scale, "the two disagree: {worst} against a scale of {scale}");
        let median = |mut v: Vec<f64>| {
            v.sort_by(f64::total_cmp);
            v[RUNS / 2]
        };
        let (tg, tr) = (median(t_given), median(t_restrided));
        let gmacs = |ms: f64| (PRODUCTS * m * k * n) as f64 / ms / 1e6;
        println!(
            "{:>18} {:>11.3} ({:>5.1}) {:>14.3} ({:>5.1}) {:>6.2}x",
            format!("{m} x {k} x {n}"),
            tg,
            gmacs(tg),
            tr,
            gmacs(tr),
            tg / tr
        );
    }
}
