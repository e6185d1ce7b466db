//! How fast one core reads buffers of growing size (1 MB to 512 MB): the cache levels a kernel's
//! data falls into, used to judge which passes can gain from being fused (the runner's and
//! `kernels::batchnorm`'s module docs list the fusions tried and dropped).
//!
//!     cargo run --release -p trustsplit-kernels --example memory_sweep
//!
//! Each size is summed repeatedly (about 2 GB read per size, at least twice) with four 16-lane
//! accumulators in AVX-512 where the CPU has it (else 64 plain accumulators); prints the best of
//! three timings as GB/s.

use std::time::Instant;

fn main() {
    for mb in [1usize, 2, 4, 8, 16, 32, 64, 128, 256, 512] {
        let values = vec![1.0f32; mb << 18];
        let repeats = (2048 / mb).max(2);
        let mut best = f64::MAX;
        let mut total = 0.0f32;
        for _ in 0..3 {
            let start = Instant::now();
            for _ in 0..repeats {
                total += sum(&values);
            }
            best = best.min(start.elapsed().as_secs_f64() / repeats as f64);
        }
        std::hint::black_box(total);
        println!("{mb:>4} MB: {:6.1} GB/s", (values.len() * 4) as f64 / best / 1e9);
    }
}

fn sum(values: &[f32]) -> f32 {
    #[cfg(target_arch = "x86_64")]
    if is_x86_feature_detected!("avx512f") {
        // SAFETY: the CPU has AVX-512F.
        return unsafe { sum_avx512(values) };
    }
    let mut lanes = [0.0f32; 64];
    for chunk in values.chunks_exact(64) {
        lanes.iter_mut().zip(chunk).for_each(|(a, v)| *a += v);
    }
    lanes.iter().sum()
}

/// Sums whole 64-value blocks (the buffers here are whole megabytes).
#[cfg(target_arch = "x86_64")]
#[target_feature(enable = "avx512f")]
fn sum_avx512(values: &[f32]) -> f32 {
    use std::arch::x86_64::*;
    let mut acc = [_mm512_setzero_ps(); 4];
    for chunk in values.chunks_exact(64) {
        for (k, a) in acc.iter_mut().enumerate() {
            // SAFETY: 16 values from `16 k` are inside the 64-value chunk; unaligned load.
            *a = _mm512_add_ps(*a, unsafe { _mm512_loadu_ps(chunk.as_ptr().add(16 * k)) });
        }
    }
    _mm512_reduce_add_ps(_mm512_add_ps(_mm512_add_ps(acc[0], acc[1]), _mm512_add_ps(acc[2], acc[3])))
}
