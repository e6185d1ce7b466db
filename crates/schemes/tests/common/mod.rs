//! Helpers shared by the scheme tests.

use trustsplit_device::{CpuBackend, Device};
use trustsplit_nn::Model;

/// A device running our CPU kernels on one thread.
pub fn cpu_device() -> Device {
    Device::local(Box::new(CpuBackend::new(1).unwrap()))
}

/// The largest parameter difference between two models, relative to each parameter's scale.
#[allow(dead_code)] // Not every test file compares models.
pub fn max_relative_difference(a: &Model, b: &Model) -> f32 {
    let mut worst = 0.0f32;
    for ((n, x), (_, y)) in a.named_params().iter().zip(b.named_params()) {
        let scale = x.iter().fold(1e-6f32, |m, v| m.max(v.abs()));
        let d = x.iter().zip(y.iter()).fold(0.0f32, |m, (p, q)| m.max((p - q).abs())) / scale;
        assert!(d.is_finite(), "{n}");
        worst = worst.max(d);
    }
    worst
}
