//! The wgpu backend against the CPU backend (within 1e-4 relative). Without a GPU this runs on
//! Mesa's lavapipe (`apt-get install mesa-vulkan-drivers`).
#![cfg(feature = "wgpu")]

mod common;

use common::*;
use std::sync::{Mutex, MutexGuard};
use trustsplit_boundary::{ChannelOptions, InProcessChannel, Transcript};
use trustsplit_device::{serve, Backend, CpuBackend, Device, WgpuAdapter, WgpuBackend};
use trustsplit_kernels::ConvGeometry;

const TOL: f32 = 1e-4;

/// One GPU context at a time keeps lavapipe's memory and thread use in check.
fn gpu_lock() -> MutexGuard<'static, ()> {
    static LOCK: Mutex<()> = Mutex::new(());
    LOCK.lock().unwrap_or_else(|p| p.into_inner())
}

/// The adapter under test: `TRUSTSPLIT_WGPU_ADAPTER=auto|cpu|discrete|integrated` (default cpu,
/// which is lavapipe on a GPU-less machine).
fn backend() -> WgpuBackend {
    if std::env::var_os("XDG_RUNTIME_DIR").is_none() {
        // Vulkan loaders complain without it; any private directory will do.
        let dir = std::env::temp_dir().join("trustsplit-xdg-runtime");
        std::fs::create_dir_all(&dir).unwrap();
        std::env::set_var("XDG_RUNTIME_DIR", dir);
    }
    let adapter = match std::env::var("TRUSTSPLIT_WGPU_ADAPTER").as_deref() {
        Ok("auto") => WgpuAdapter::Auto,
        Ok("discrete") => WgpuAdapter::DiscreteGpu,
        Ok("integrated") => WgpuAdapter::IntegratedGpu,
        _ => WgpuAdapter::Cpu,
    };
    WgpuBackend::new(adapter).unwrap_or_else(|e| panic!("{e}"))
}

#[test]
fn gemm_all_transposes_match_cpu() {
    let _g = gpu_lock();
    let mut gpu = backend();
    eprintln!("testing {}", gpu.name());
    let mut cpu = CpuBackend::new(1).unwrap();
    let mut rng = Rng::new(30);
    for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
        for _ in 0..4 {
            let s = rng.gemm_shape(ta, tb);
            let (a, b) = (rng.values(s.m * s.k), rng.values(s.k * s.n));
            let want = cpu.gemm(&s, &a, &b).unwrap();
            assert_close(&gpu.gemm(&s, &a, &b).unwrap(), &want, TOL, &format!("{s:?}"));
        }
    }
}

#[test]
fn convolutions_match_cpu() {
    let _g = gpu_lock();
    let mut gpu = backend();
    let mut cpu = CpuBackend::new(1).unwrap();
    let mut rng = Rng::new(31);
    let mut geometries = vec![
        strided_geometry(),
        // Stride 2 where the stride skips the last row/column (needs padding_out).
        ConvGeometry { in_h: 9, in_w: 6, padding: 0, ..strided_geometry() },
        ConvGeometry { kernel_h: 5, kernel_w: 5, padding: 2, stride: 2, ..strided_geometry() },
        ConvGeometry { kernel_h: 1, kernel_w: 1, padding: 0, stride: 1, ..strided_geometry() },
    ];
    geometries.extend((0..8).map(|_| rng.geometry()));
    for g in geometries {
        let (x, w, dy) = (rng.values(g.input_len()), rng.values(g.weight_len()), rng.values(g.output_len()));
        let what = format!("{g:?}");
        let want = cpu.conv_forward(&g, &x, &w).unwrap();
        assert_close(&gpu.conv_forward(&g, &x, &w).unwrap(), &want, TOL, &format!("forward {what}"));
        let want = cpu.conv_backward_data(&g, &dy, &w).unwrap();
        assert_close(&gpu.conv_backward_data(&g, &dy, &w).unwrap(), &want, TOL, &format!("backward data {what}"));
        let want = cpu.conv_backward_weight(&g, &x, &dy).unwrap();
        assert_close(&gpu.conv_backward_weight(&g, &x, &dy).unwrap(), &want, TOL, &format!("backward weight {what}"));
    }
}

/// AsymML's check of a device's results allows what f32 rounding allows a sum of products, in
/// any order; a backend whose convolutions erred beyond that would fail it honestly.
#[test]
fn convolutions_round_within_what_the_device_checks_allow() {
    let _g = gpu_lock();
    convolutions_round_within_the_f32_dot_bound(&mut backend(), 32, 6);
}

#[test]
fn served_remotely_and_empty_shapes() {
    let _g = gpu_lock();
    let (client, mut server) = InProcessChannel::pair(ChannelOptions::default());
    let handle = std::thread::spawn(move || serve(&mut server, &mut backend()));
    let mut dev = Device::remote(Box::new(client)).unwrap();
    assert!(dev.name().starts_with("wgpu "), "{}", dev.name());
    let t = Transcript::new();
    let g = strided_geometry();
    let mut rng = Rng::new(32);
    let (x, w) = (rng.values(g.input_len()), rng.values(g.weight_len()));
    let want = CpuBackend::new(1).unwrap().conv_forward(&g, &x, &w).unwrap();
    let got = dev.conv_forward(&g, &release(&t, x), &release(&t, w)).unwrap();
    assert_close(&got, &want, TOL, "remote wgpu forward");
    // Zero-sized work never reaches the GPU.
    let s = trustsplit_device::GemmShape { m: 3, n: 2, k: 0, trans_a: true, trans_b: false };
    assert_eq!(dev.gemm(&s, &release(&t, vec![]), &release(&t, vec![])).unwrap(), vec![0.0; 6]);
    dev.shutdown();
    handle.join().unwrap().unwrap();
}
