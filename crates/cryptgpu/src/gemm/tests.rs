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
