//! The CPU backend against direct kernel calls (bit-exact) and naive references; the host
//! lowering (used by the CUDA backend) against the kernels; the local `Device` handle.

mod common;

use common::*;
use trustsplit_boundary::Transcript;
use trustsplit_device::lowering::{self, GemmFn};
use trustsplit_device::{Backend, CpuBackend, Device, DeviceError, GemmShape};
use trustsplit_kernels::conv::{conv2d_backward_data, conv2d_backward_weight, conv2d_forward};
use trustsplit_kernels::matmul::{matmul, parallelism, MatRef};
use trustsplit_kernels::ConvGeometry;

const TRANSPOSES: [(bool, bool); 4] = [(false, false), (true, false), (false, true), (true, true)];

fn pool(threads: usize) -> rayon::ThreadPool {
    rayon::ThreadPoolBuilder::new().num_threads(threads).build().unwrap()
}

/// The kernels called directly, in a pool with the backend's thread count.
fn kernel_gemm(threads: usize, s: &GemmShape, a: &[f32], b: &[f32]) -> Vec<f32> {
    let mut c = vec![0.0; s.m * s.n];
    pool(threads).install(|| {
        let a = if s.trans_a { MatRef::row_major(a, s.k, s.m).t() } else { MatRef::row_major(a, s.m, s.k) };
        let b = if s.trans_b { MatRef::row_major(b, s.n, s.k).t() } else { MatRef::row_major(b, s.k, s.n) };
        matmul(a, b, &mut c, s.n, false, parallelism(threads));
    });
    c
}

fn kernel_convs(threads: usize, g: &ConvGeometry, x: &[f32], w: &[f32], dy: &[f32]) -> [Vec<f32>; 3] {
    let (mut y, mut dx, mut dw) = (vec![0.0; g.output_len()], vec![0.0; g.input_len()], vec![0.0; g.weight_len()]);
    pool(threads).install(|| {
        conv2d_forward(g, x, w, None, &mut y);
        conv2d_backward_data(g, dy, w, &mut dx);
        conv2d_backward_weight(g, x, dy, &mut dw, None);
    });
    [y, dx, dw]
}

#[test]
fn gemm_matches_kernels_bit_exact_and_naive_reference() {
    let mut rng = Rng::new(1);
    for threads in [1, 3] {
        let mut cpu = CpuBackend::new(threads).unwrap();
        assert_eq!(cpu.name(), format!("cpu ({threads} threads)"));
        for (ta, tb) in TRANSPOSES {
            for _ in 0..6 {
                let s = rng.gemm_shape(ta, tb);
                let (a, b) = (rng.values(s.m * s.k), rng.values(s.k * s.n));
                let c = cpu.gemm(&s, &a, &b).unwrap();
                assert_bits(&c, &kernel_gemm(threads, &s, &a, &b), &format!("{s:?} vs kernels"));
                assert_close(&c, &naive_gemm(&s, &a, &b), 1e-5, &format!("{s:?} vs naive"));
            }
        }
    }
}

#[test]
fn convolutions_match_kernels_bit_exact() {
    let mut rng = Rng::new(2);
    for threads in [1, 2] {
        let mut cpu = CpuBackend::new(threads).unwrap();
        for i in 0..25 {
            let g = if i == 0 { strided_geometry() } else { rng.geometry() };
            let (x, w, dy) = (rng.values(g.input_len()), rng.values(g.weight_len()), rng.values(g.output_len()));
            let [y, dx, dw] = kernel_convs(threads, &g, &x, &w, &dy);
            assert_bits(&cpu.conv_forward(&g, &x, &w).unwrap(), &y, &format!("forward {g:?}"));
            assert_bits(&cpu.conv_backward_data(&g, &dy, &w).unwrap(), &dx, &format!("backward data {g:?}"));
            assert_bits(&cpu.conv_backward_weight(&g, &x, &dy).unwrap(), &dw, &format!("backward weight {g:?}"));
        }
    }
}

/// AsymML's check of a device's results allows what f32 rounding allows a sum of products, in
/// any order; the CPU backend stays within it.
#[test]
fn convolutions_round_within_what_the_device_checks_allow() {
    let mut cpu = CpuBackend::new(1).unwrap();
    convolutions_round_within_the_f32_dot_bound(&mut cpu, 33, 12);
}

#[test]
fn empty_shapes_give_zeros_or_nothing() {
    let mut cpu = CpuBackend::new(1).unwrap();
    let s = GemmShape { m: 2, n: 3, k: 0, trans_a: false, trans_b: true };
    assert_eq!(cpu.gemm(&s, &[], &[]).unwrap(), vec![0.0; 6]);
    let s = GemmShape { m: 0, n: 3, k: 4, trans_a: false, trans_b: false };
    assert!(cpu.gemm(&s, &[], &[0.0; 12]).unwrap().is_empty());
    let g = ConvGeometry { batch: 0, ..strided_geometry() };
    assert!(cpu.conv_forward(&g, &[], &vec![0.0; g.weight_len()]).unwrap().is_empty());
    assert_eq!(cpu.conv_backward_weight(&g, &[], &[]).unwrap(), vec![0.0; g.weight_len()]);
}

#[test]
fn backend_rejects_bad_lengths_instead_of_panicking() {
    let mut cpu = CpuBackend::new(1).unwrap();
    let s = GemmShape { m: 2, n: 2, k: 2, trans_a: false, trans_b: false };
    let err = cpu.gemm(&s, &[0.0; 3], &[0.0; 4]).unwrap_err();
    assert!(matches!(err, DeviceError::Invalid(_)), "{err}");
    assert!(err.to_string().contains("operand A has 3 values, the shape needs 4"), "{err}");
    let g = ConvGeometry { stride: 0, ..strided_geometry() };
    let err = cpu.conv_forward(&g, &[], &[]).unwrap_err();
    assert!(err.to_string().contains("stride"), "{err}");
}

#[test]
fn host_lowering_matches_kernels() {
    // The CUDA backend's conv path with the CPU GEMM plugged in; small `max_cols` forces chunks.
    let mut rng = Rng::new(3);
    let mut cpu = CpuBackend::new(1).unwrap();
    let mut gemm = |s: &GemmShape, a: &[f32], b: &[f32]| cpu.gemm(s, a, b);
    let gemm: &mut GemmFn = &mut gemm;
    for i in 0..25 {
        let g = if i == 0 { strided_geometry() } else { rng.geometry() };
        let (x, w, dy) = (rng.values(g.input_len()), rng.values(g.weight_len()), rng.values(g.output_len()));
        let [y, dx, dw] = kernel_convs(1, &g, &x, &w, &dy);
        for max_cols in [1, 300, lowering::DEFAULT_MAX_COLS] {
            let what = format!("{g:?} max_cols {max_cols}");
            assert_close(&lowering::conv_forward(&g, &x, &w, max_cols, gemm).unwrap(), &y, 1e-5, &what);
            assert_close(&lowering::conv_backward_data(&g, &dy, &w, max_cols, gemm).unwrap(), &dx, 1e-5, &what);
            assert_close(&lowering::conv_backward_weight(&g, &x, &dy, max_cols, gemm).unwrap(), &dw, 1e-5, &what);
        }
    }
}

#[test]
fn local_device_computes_and_counts() {
    let t = Transcript::new();
    let mut rng = Rng::new(4);
    let mut dev = Device::local(Box::new(CpuBackend::new(2).unwrap()));
    assert_eq!(dev.name(), "cpu (2 threads)");
    let s = GemmShape { m: 5, n: 7, k: 3, trans_a: true, trans_b: false };
    let (a, b) = (rng.values(15), rng.values(21));
    let c = dev.gemm(&s, &release(&t, a.clone()), &release(&t, b.clone())).unwrap();
    assert_bits(&c, &kernel_gemm(2, &s, &a, &b), "local gemm");
    let g = strided_geometry();
    let (x, w) = (rng.values(g.input_len()), rng.values(g.weight_len()));
    dev.conv_forward(&g, &release(&t, x), &release(&t, w)).unwrap();
    // Wrong operand length: rejected before the backend runs.
    let err = dev.gemm(&s, &release(&t, vec![0.0; 14]), &release(&t, b)).unwrap_err();
    assert!(matches!(err, DeviceError::Invalid(_)), "{err}");
    let stats = dev.stats();
    assert_eq!(stats.requests, 2);
    assert_eq!(stats.bytes_sent, ((15 + 21 + g.input_len() + g.weight_len()) * 4) as u64);
    assert_eq!(stats.bytes_received, ((35 + g.output_len()) * 4) as u64);
    assert!(stats.device_seconds > 0.0);
    assert_eq!(t.summary().records, 6);
    dev.shutdown();
}
