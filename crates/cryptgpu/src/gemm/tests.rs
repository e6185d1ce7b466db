use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;

use super::kernel::{gemm_acc_with, Kernel, View};
use super::*;

fn random(rng: &mut ChaCha8Rng, len: usize) -> Vec<u64> {
    (0..len).map(|_| rng.random()).collect()
}

/// Odd sizes on both sides of every block edge (`MR` 8, `NR` 24, `KC` 192, `MC` 128, `NC` 480),
/// and small-`C`, long-`k` shapes that take the split-`k` path.
const SHAPES: &[(usize, usize, usize)] = &[
    (1, 1, 1),
    (1, 3, 17),
    (3, 17, 33),
    (17, 1, 3),
    (33, 33, 17),
    (8, 16, 24),
    (16, 384, 48),
    (9, 193, 15),
    (20, 25, 700),
    (129, 385, 33),
    (130, 200, 530),
    (3, 1000, 5),
    (1, 777, 1),
];

#[test]
fn gemm_products_match_reference() {
    let mut rng = ChaCha8Rng::seed_from_u64(1);
    for &(m, k, n) in SHAPES {
        let (a, b) = (random(&mut rng, m * k), random(&mut rng, k * n));
        let want = reference::matmul(&a, &b, m, k, n);
        assert_eq!(matmul(&a, &b, m, k, n), want, "matmul {m}x{k}x{n}");
        let (at, bt) = (reference::transpose(&a, m, k), reference::transpose(&b, k, n));
        assert_eq!(matmul_tn(&at, &b, m, k, n), want, "matmul_tn {m}x{k}x{n}");
        assert_eq!(matmul_nt(&a, &bt, m, k, n), want, "matmul_nt {m}x{k}x{n}");
        assert_eq!(reference::matmul_tn(&at, &b, m, k, n), want);
        assert_eq!(reference::matmul_nt(&a, &bt, m, k, n), want);
    }
}

#[test]
fn gemm_every_kernel_matches_reference() {
    let mut rng = ChaCha8Rng::seed_from_u64(2);
    let mut kernels = vec![Kernel::Portable];
    if Kernel::detect() == Kernel::Avx512 {
        kernels.push(Kernel::Avx512);
    }
    for kernel in kernels {
        for &(m, k, n) in SHAPES {
            let (a, b) = (random(&mut rng, m * k), random(&mut rng, k * n));
            // Accumulating onto a random `C` checks the `+=` as well as the product.
            let c0 = random(&mut rng, m * n);
            let mut want = reference::matmul(&a, &b, m, k, n);
            kernel::add_assign(&mut want, &c0);
            let mut c = c0.clone();
            gemm_acc_with(kernel, &mut c, View::rows(&a, k), View::rows(&b, n), m, k, n);
            assert_eq!(c, want, "{kernel:?} {m}x{k}x{n}");
            let (at, bt) = (reference::transpose(&a, m, k), reference::transpose(&b, k, n));
            let mut c = c0.clone();
            gemm_acc_with(kernel, &mut c, View::transposed(&at, m), View::transposed(&bt, k), m, k, n);
            assert_eq!(c, want, "{kernel:?} transposed views {m}x{k}x{n}");
        }
    }
}

#[test]
fn gemm_empty_products_are_zero() {
    assert_eq!(matmul(&[], &[], 0, 5, 0), Vec::<u64>::new());
    assert_eq!(matmul(&[], &[], 2, 0, 3), vec![0; 6]);
    assert_eq!(matmul_tn(&[], &[], 3, 0, 2), vec![0; 6]);
    assert_eq!(transpose(&[], 0, 4), Vec::<u64>::new());
}

#[test]
fn gemm_transpose_matches_reference() {
    let mut rng = ChaCha8Rng::seed_from_u64(3);
    for &(rows, cols) in &[(1, 1), (1, 40), (40, 1), (3, 17), (33, 70), (100, 3), (65, 97)] {
        let a = random(&mut rng, rows * cols);
        assert_eq!(transpose(&a, rows, cols), reference::transpose(&a, rows, cols), "{rows}x{cols}");
    }
}

fn check_conv(rng: &mut ChaCha8Rng, s: &ConvShape) {
    let x = random(rng, s.input_len());
    let w = random(rng, s.weight_len());
    let dy = random(rng, s.output_len());
    assert_eq!(conv2d(&x, &w, s), reference::conv2d(&x, &w, s), "conv2d {s:?}");
    assert_eq!(conv2d_input_grad(&dy, &w, s), reference::conv2d_input_grad(&dy, &w, s), "input grad {s:?}");
    assert_eq!(conv2d_weight_grad(&x, &dy, s), reference::conv2d_weight_grad(&x, &dy, s), "weight grad {s:?}");
}

#[test]
fn gemm_conv_matches_reference_on_random_shapes() {
    let mut rng = ChaCha8Rng::seed_from_u64(4);
    for kernel in [1, 3, 5] {
        for stride in [1, 2] {
            for padding in [0, 1, 2] {
                for _ in 0..2 {
                    let s = ConvShape {
                        batch: rng.random_range(1..=3),
                        in_channels: rng.random_range(1..=4),
                        height: rng.random_range(kernel..=kernel + 9),
                        width: rng.random_range(kernel..=kernel + 9),
                        out_channels: rng.random_range(1..=5),
                        kernel,
                        stride,
                        padding,
                    };
                    check_conv(&mut rng, &s);
                }
            }
        }
    }
}

#[test]
fn gemm_conv_matches_reference_when_images_are_grouped() {
    let mut rng = ChaCha8Rng::seed_from_u64(5);
    let shape = |batch, in_channels, size, out_channels, kernel, stride, padding| ConvShape {
        batch,
        in_channels,
        height: size,
        width: size,
        out_channels,
        kernel,
        stride,
        padding,
    };
    for s in [
        // 3 x 3 outputs: groups of 8 images with a partial last group.
        shape(20, 3, 5, 4, 3, 1, 0),
        // 2 x 2 outputs from a strided, padded kernel.
        shape(5, 2, 4, 3, 3, 2, 1),
        // Pointwise with 64 outputs per image: the GEMM reads the input itself.
        shape(3, 5, 8, 7, 1, 1, 0),
        // Pointwise with 9 outputs per image: grouped, so lowered after all.
        shape(11, 4, 3, 6, 1, 1, 0),
        // 1 x 1 kernels that are not pointwise.
        shape(2, 3, 7, 2, 1, 2, 0),
        shape(2, 3, 5, 2, 1, 1, 1),
        // Wider than a register tile in every GEMM dimension.
        shape(2, 9, 12, 17, 3, 1, 1),
    ] {
        check_conv(&mut rng, &s);
    }
}

#[test]
fn gemm_float_limbs_are_exact_up_to_the_bound() {
    let mut rng = ChaCha8Rng::seed_from_u64(6);
    for (limb_bits, m, k, n) in [(22, 9, 512, 13), (16, 5, 4096, 7), (22, 3, 17, 33), (16, 17, 1, 3), (8, 4, 100, 5)] {
        let (a, b) = (random(&mut rng, m * k), random(&mut rng, k * n));
        let got = matmul_float_limbs(&a, &b, m, k, n, limb_bits).unwrap();
        assert_eq!(got, reference::matmul(&a, &b, m, k, n), "{limb_bits}-bit limbs, {m}x{k}x{n}");
    }
    // All-ones limbs make every dot product as large as the bound allows.
    let k = 512;
    let (a, b) = (vec![u64::MAX; 2 * k], vec![u64::MAX; k * 3]);
    assert_eq!(matmul_float_limbs(&a, &b, 2, k, 3, 22).unwrap(), reference::matmul(&a, &b, 2, k, 3));
}

#[test]
fn gemm_float_limbs_refuse_inexact_products() {
    let k = 513;
    let (a, b) = (vec![1u64; k], vec![1u64; k]);
    let err = matmul_float_limbs(&a, &b, 1, k, 1, 22).unwrap_err();
    assert!(err.contains("513") && err.contains("512"), "{err}");
    assert!(matmul_float_limbs(&a, &b, 1, k, 1, 16).is_ok());
    assert!(matmul_float_limbs(&a, &b, 1, k, 1, 0).is_err());
    assert!(matmul_float_limbs(&a, &b, 1, k, 1, 27).is_err());
}

#[test]
fn gemm_gpu_limb_sizes_follow_the_bound() {
    assert_eq!(limbs::limb_bits_for(1), Ok(22));
    assert_eq!(limbs::limb_bits_for(512), Ok(22));
    assert_eq!(limbs::limb_bits_for(513), Ok(16));
    assert_eq!(limbs::limb_bits_for(1 << 21), Ok(16));
    let err = limbs::limb_bits_for((1 << 21) + 1).unwrap_err();
    assert!(err.contains("2^21") && err.contains("2097153"), "{err}");
    // The GPU's limb choice, run through the shared split and recombine with CPU GEMMs, at both
    // sides of the switch and with the largest dot products 16-bit limbs allow for that `k`.
    let mut rng = ChaCha8Rng::seed_from_u64(7);
    for (m, k, n) in [(4, 512, 6), (3, 513, 5)] {
        let (a, b) = (random(&mut rng, m * k), random(&mut rng, k * n));
        let got = matmul_float_limbs(&a, &b, m, k, n, limbs::limb_bits_for(k).unwrap()).unwrap();
        assert_eq!(got, reference::matmul(&a, &b, m, k, n), "{m}x{k}x{n}");
    }
    let k = 513;
    let (a, b) = (vec![u64::MAX; 2 * k], vec![u64::MAX; k * 2]);
    let got = matmul_float_limbs(&a, &b, 2, k, 2, limbs::limb_bits_for(k).unwrap()).unwrap();
    assert_eq!(got, reference::matmul(&a, &b, 2, k, 2));
}

#[test]
fn gemm_float_limbs_of_empty_products_are_zero() {
    assert_eq!(matmul_float_limbs(&[], &[], 2, 0, 3, 16).unwrap(), vec![0; 6]);
    assert_eq!(matmul_float_limbs(&[], &[7; 12], 0, 4, 3, 22).unwrap(), Vec::<u64>::new());
}

#[test]
fn gemm_ring_device_defaults_to_the_cpu() {
    assert_eq!(RingDevice::default(), RingDevice::Cpu);
    assert_eq!(set_ring_device(RingDevice::Cpu), Ok(()));
}

#[cfg(not(feature = "cuda"))]
#[test]
fn gemm_cuda_without_the_feature_is_an_error_naming_it() {
    let err = set_ring_device(RingDevice::Cuda).unwrap_err();
    assert!(err.contains("`cuda` feature"), "{err}");
    assert_eq!(ring_device(), RingDevice::Cpu);
}

/// With the feature: on a machine without a GPU, selecting CUDA is an error (not a panic) and
/// the CPU stays selected; with one, the GPU's products match the reference. Tests share the
/// process-wide switch, so this one leaves it on the CPU and uses its own `CudaRing` for the
/// checks.
#[cfg(feature = "cuda")]
#[test]
fn gemm_cuda_ring_products_match_reference_where_a_gpu_is_present() {
    if let Err(err) = set_ring_device(RingDevice::Cuda) {
        assert!(err.contains("CUDA") || err.contains("lib"), "{err}");
        assert_eq!(ring_device(), RingDevice::Cpu);
        eprintln!("no CUDA device here, skipped: {err}");
        return;
    }
    // Other tests may run on the GPU while it is selected; their products stay exact.
    assert_eq!(ring_device(), RingDevice::Cuda);
    let (a, b) =
        (random(&mut ChaCha8Rng::seed_from_u64(9), 33 * 70), random(&mut ChaCha8Rng::seed_from_u64(10), 70 * 5));
    assert_eq!(matmul(&a, &b, 33, 70, 5), reference::matmul(&a, &b, 33, 70, 5));
    assert_eq!(ring_device(), RingDevice::Cuda, "the product fell back to the CPU");
    set_ring_device(RingDevice::Cpu).unwrap();
    let mut gpu = cuda::CudaRing::new(0).unwrap();
    let mut rng = ChaCha8Rng::seed_from_u64(8);
    for &(m, k, n) in SHAPES.iter().chain(&[(5, 513, 7), (2, 4096, 3)]) {
        let (a, b) = (random(&mut rng, m * k), random(&mut rng, k * n));
        let want = reference::matmul(&a, &b, m, k, n);
        assert_eq!(gpu.matmul(&a, &b, m, k, n).unwrap(), want, "matmul {m}x{k}x{n}");
        let (at, bt) = (reference::transpose(&a, m, k), reference::transpose(&b, k, n));
        assert_eq!(gpu.matmul_tn(&at, &b, m, k, n).unwrap(), want, "matmul_tn {m}x{k}x{n}");
        assert_eq!(gpu.matmul_nt(&a, &bt, m, k, n).unwrap(), want, "matmul_nt {m}x{k}x{n}");
    }
    let k = 512;
    let (a, b) = (vec![u64::MAX; 2 * k], vec![u64::MAX; k * 3]);
    assert_eq!(gpu.matmul(&a, &b, 2, k, 3).unwrap(), reference::matmul(&a, &b, 2, k, 3));
    let long = vec![0u64; (1 << 21) + 1];
    assert!(gpu.matmul(&long, &long, 1, long.len(), 1).unwrap_err().contains("2^21"));
    for kernel in [1, 3] {
        for (stride, padding) in [(1, 0), (2, 1)] {
            let s =
                ConvShape { batch: 3, in_channels: 2, height: 7, width: 6, out_channels: 4, kernel, stride, padding };
            let (x, w, dy) =
                (random(&mut rng, s.input_len()), random(&mut rng, s.weight_len()), random(&mut rng, s.output_len()));
            assert_eq!(gpu.conv2d(&x, &w, &s).unwrap(), reference::conv2d(&x, &w, &s), "conv2d {s:?}");
            let dx = gpu.conv2d_input_grad(&dy, &w, &s).unwrap();
            assert_eq!(dx, reference::conv2d_input_grad(&dy, &w, &s), "input grad {s:?}");
            let dw = gpu.conv2d_weight_grad(&x, &dy, &s).unwrap();
            assert_eq!(dw, reference::conv2d_weight_grad(&x, &dy, &s), "weight grad {s:?}");
        }
    }
}
