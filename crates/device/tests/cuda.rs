//! The CUDA backend. On a machine without the NVIDIA driver it must fail cleanly; with one, it
//! must match the CPU backend.
#![cfg(feature = "cuda")]

mod common;

use common::*;
use trustsplit_device::{Backend, CpuBackend, CudaBackend, DeviceError};

#[test]
fn cuda_backend_is_unavailable_or_matches_cpu() {
    let mut gpu = match CudaBackend::new(0) {
        Err(DeviceError::Unavailable(msg)) => {
            // Only acceptable when there really is no driver.
            assert!(!msg.is_empty());
            eprintln!("CUDA unavailable (expected without a GPU): {msg}");
            return;
        }
        Err(e) => panic!("unexpected error kind: {e}"),
        Ok(b) => b,
    };
    let mut cpu = CpuBackend::new(1).unwrap();
    let mut rng = Rng::new(40);
    for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
        let s = rng.gemm_shape(ta, tb);
        let (a, b) = (rng.values(s.m * s.k), rng.values(s.k * s.n));
        assert_close(&gpu.gemm(&s, &a, &b).unwrap(), &cpu.gemm(&s, &a, &b).unwrap(), 1e-4, &format!("{s:?}"));
    }
    for i in 0..6 {
        let g = if i == 0 { strided_geometry() } else { rng.geometry() };
        let (x, w, dy) = (rng.values(g.input_len()), rng.values(g.weight_len()), rng.values(g.output_len()));
        let want = cpu.conv_forward(&g, &x, &w).unwrap();
        assert_close(&gpu.conv_forward(&g, &x, &w).unwrap(), &want, 1e-4, "forward");
        let want = cpu.conv_backward_data(&g, &dy, &w).unwrap();
        assert_close(&gpu.conv_backward_data(&g, &dy, &w).unwrap(), &want, 1e-4, "backward data");
        let want = cpu.conv_backward_weight(&g, &x, &dy).unwrap();
        assert_close(&gpu.conv_backward_weight(&g, &x, &dy).unwrap(), &want, 1e-4, "backward weight");
    }
}

#[test]
fn without_a_driver_the_error_says_so() {
    if unsafe { cudarc::driver::sys::is_culib_present() } {
        eprintln!("libcuda present; skipping the absence check");
        return;
    }
    let err = CudaBackend::new(0).err().expect("no driver here");
    assert!(matches!(&err, DeviceError::Unavailable(m) if m.starts_with("libcuda not found")), "{err}");
}
