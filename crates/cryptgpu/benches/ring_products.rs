//! Ring-product speed: the native `u64` GEMM against CryptGPU's float-limb products (16- and
//! 22-bit limbs through `f64` GEMMs) and against an `f32` GEMM of the same shape, the speed a
//! float-only accelerator would give a plaintext network.
//!
//! `cargo bench -p trustsplit-cryptgpu --bench ring_products`

use std::time::Instant;

use gemm::Parallelism;
use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use trustsplit_cryptgpu::gemm::{matmul, matmul_float_limbs};

const RUNS: usize = 5;

/// The best of [`RUNS`] timings in milliseconds, after one warm-up run.
fn best_ms<T>(mut f: impl FnMut() -> T) -> f64 {
    std::hint::black_box(f());
    (0..RUNS)
        .map(|_| {
            let start = Instant::now();
            std::hint::black_box(f());
            start.elapsed().as_secs_f64() * 1e3
        })
        .fold(f64::INFINITY, f64::min)
}

fn matmul_f32(a: &[f32], b: &[f32], m: usize, k: usize, n: usize) -> Vec<f32> {
    assert_eq!(a.len(), m * k);
    assert_eq!(b.len(), k * n);
    let mut c = vec![0.0f32; m * n];
    // SAFETY: all three matrices are row-major with the lengths checked above, so every index
    // stays in its slice; `c` is a fresh allocation and cannot alias the inputs.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            n as isize,
            false,
            a.as_ptr(),
            1,
            k as isize,
            b.as_ptr(),
            1,
            n as isize,
            0.0,
            1.0,
            false,
            false,
            false,
            Parallelism::Rayon(0),
        );
    }
    c
}

fn main() {
    let shapes = [
        ("LeNet conv1, batch 128", 20, 25, 128 * 24 * 24),
        ("LeNet conv2, batch 128", 50, 500, 128 * 8 * 8),
        ("LeNet fc1, batch 128", 128, 800, 500),
        ("VGG16 conv 256ch 8x8, batch 32", 256, 2304, 32 * 8 * 8),
    ];
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    println!("threads: {}, best of {RUNS} runs", rayon::current_num_threads());
    for (name, m, k, n) in shapes {
        let a: Vec<u64> = (0..m * k).map(|_| rng.random()).collect();
        let b: Vec<u64> = (0..k * n).map(|_| rng.random()).collect();
        let af: Vec<f32> = a.iter().map(|&v| (v >> 40) as f32).collect();
        let bf: Vec<f32> = b.iter().map(|&v| (v >> 40) as f32).collect();
        let native = best_ms(|| matmul(&a, &b, m, k, n));
        let want = matmul(&a, &b, m, k, n);
        let mut line = format!("{name:32} M={m:<4} K={k:<5} N={n:<6} u64 {native:8.2} ms");
        for limb_bits in [16, 22] {
            match matmul_float_limbs(&a, &b, m, k, n, limb_bits) {
                Ok(c) => {
                    assert_eq!(c, want, "{limb_bits}-bit limbs disagree with the native product");
                    let t = best_ms(|| matmul_float_limbs(&a, &b, m, k, n, limb_bits));
                    line += &format!(" | f64 {limb_bits}-bit limbs {t:8.2} ms ({:5.2}x)", t / native);
                }
                Err(_) => {
                    line += &format!(" | f64 {limb_bits}-bit limbs {:>8} (k > 2^{})", "refused", 53 - 2 * limb_bits)
                }
            }
        }
        let t = best_ms(|| matmul_f32(&af, &bf, m, k, n));
        line += &format!(" | f32 {t:8.2} ms ({:5.2}x)", t / native);
        println!("{line}");
    }
}
