//! `trustsplit bench kernels`: conv and VGG16-step timings at 1 and 2 threads, with a GEMM of the
//! same arithmetic measured in the same run as the baseline.

use anyhow::Result;
use serde::Serialize;
use std::collections::BTreeMap;
use std::time::Instant;
use trustsplit_kernels::conv::{conv2d_backward_data, conv2d_backward_weight, conv2d_forward, ConvGeometry};
use trustsplit_kernels::loss::softmax_cross_entropy;
use trustsplit_kernels::matmul::{matmul, parallelism, MatRef};
use trustsplit_nn::optim::{Optimizer, OptimizerKind};
use trustsplit_nn::tensor::{data, data_mut, from_vec, zeros};
use trustsplit_nn::{zoo, Mode};

/// The reference convolution: batch 32, 64 -> 64 channels, 32x32, 3x3, padding 1.
pub const CONV: ConvGeometry = ConvGeometry {
    batch: 32,
    in_channels: 64,
    out_channels: 64,
    in_h: 32,
    in_w: 32,
    kernel_h: 3,
    kernel_w: 3,
    stride: 1,
    padding: 1,
};

/// Timings keyed by thread count (as strings, for JSON).
pub type PerThreads = BTreeMap<String, f64>;

#[derive(Debug, Serialize)]
pub struct KernelBench {
    pub conv_fwd_ms: PerThreads,
    pub conv_fwd_bwd_ms: PerThreads,
    pub conv_fwd_gflops: PerThreads,
    pub conv_fwd_bwd_gflops: PerThreads,
    /// The three GEMMs of the same shapes and FLOPs as forward + both backward passes, without
    /// unrolling: what the conv would take if im2col and col2im were free.
    pub gemm_baseline_ms: PerThreads,
    /// conv forward+backward time / GEMM baseline time (1.0 = no overhead beyond the GEMMs).
    pub conv_overhead_ratio: PerThreads,
    pub vgg16_step_ms: PerThreads,
    pub vgg16_batch: usize,
    pub repeats: usize,
    pub threads: Vec<usize>,
}

/// Median of `repeats` timed runs after one warm-up, in milliseconds.
fn median_ms(repeats: usize, mut f: impl FnMut()) -> f64 {
    f();
    let mut t: Vec<f64> = (0..repeats.max(1))
        .map(|_| {
            let s = Instant::now();
            f();
            s.elapsed().as_secs_f64() * 1e3
        })
        .collect();
    t.sort_by(f64::total_cmp);
    t[t.len() / 2]
}

fn pseudo_random(n: usize, salt: usize) -> Vec<f32> {
    // A cheap deterministic fill; values only need to be non-trivial, not random.
    (0..n).map(|i| (((i * 2654435761 + salt * 97) % 1000) as f32 / 500.0) - 1.0).collect()
}

/// Runs the kernel benchmark at each thread count.
pub fn kernels(threads: &[usize], repeats: usize, vgg_batch: usize, mut log: impl FnMut(&str)) -> Result<KernelBench> {
    let g = CONV;
    let x = pseudo_random(g.input_len(), 1);
    let w = pseudo_random(g.weight_len(), 2);
    let dy = pseudo_random(g.output_len(), 3);
    let fwd_flops = 2.0 * g.forward_macs() as f64;
    let mut r = KernelBench {
        conv_fwd_ms: BTreeMap::new(),
        conv_fwd_bwd_ms: BTreeMap::new(),
        conv_fwd_gflops: BTreeMap::new(),
        conv_fwd_bwd_gflops: BTreeMap::new(),
        gemm_baseline_ms: BTreeMap::new(),
        conv_overhead_ratio: BTreeMap::new(),
        vgg16_step_ms: BTreeMap::new(),
        vgg16_batch: vgg_batch,
        repeats,
        threads: threads.to_vec(),
    };
    for &t in threads {
        let key = t.to_string();
        let (fwd, fwd_bwd, gemm) = crate::with_threads(t, || {
            let (mut y, mut dx, mut dw) =
                (vec![0.0; g.output_len()], vec![0.0; g.input_len()], vec![0.0; g.weight_len()]);
            let fwd = median_ms(repeats, || conv2d_forward(&g, &x, &w, None, &mut y));
            let fwd_bwd = median_ms(repeats, || {
                conv2d_forward(&g, &x, &w, None, &mut y);
                conv2d_backward_data(&g, &dy, &w, &mut dx);
                conv2d_backward_weight(&g, &x, &dy, &mut dw, None);
            });
            (fwd, fwd_bwd, gemm_baseline(&g, repeats, t))
        })?;
        log(&format!(
            "conv {t} thread(s): forward {fwd:.1} ms, forward+backward {fwd_bwd:.1} ms (GEMM baseline {gemm:.1} ms)"
        ));
        r.conv_fwd_gflops.insert(key.clone(), fwd_flops / fwd / 1e6);
        r.conv_fwd_bwd_gflops.insert(key.clone(), 3.0 * fwd_flops / fwd_bwd / 1e6);
        r.conv_overhead_ratio.insert(key.clone(), fwd_bwd / gemm);
        r.conv_fwd_ms.insert(key.clone(), fwd);
        r.conv_fwd_bwd_ms.insert(key.clone(), fwd_bwd);
        r.gemm_baseline_ms.insert(key, gemm);
    }
    for &t in threads {
        let ms = crate::with_threads(t, || vgg16_step(vgg_batch, repeats.min(5)))??;
        log(&format!("vgg16 training step, batch {vgg_batch}, {t} thread(s): {ms:.0} ms"));
        r.vgg16_step_ms.insert(t.to_string(), ms);
    }
    Ok(r)
}

/// The forward, backward-data and backward-weight GEMMs of `g` on ready-made operands.
fn gemm_baseline(g: &ConvGeometry, repeats: usize, threads: usize) -> f64 {
    let (m, k, n) = (g.out_channels, g.patch_len(), g.out_h() * g.out_w());
    let a = pseudo_random(m * k, 4);
    let b = pseudo_random(k * n, 5);
    let (mut c, mut d, mut e) = (vec![0.0; m * n], vec![0.0; k * n], vec![0.0; k * m]);
    let par = parallelism(threads);
    median_ms(repeats, || {
        for _ in 0..g.batch {
            matmul(MatRef::row_major(&a, m, k), MatRef::row_major(&b, k, n), &mut c, n, false, par);
            matmul(MatRef::row_major(&a, m, k).t(), MatRef::row_major(&c, m, n), &mut d, n, false, par);
            matmul(MatRef::row_major(&b, k, n), MatRef::row_major(&c, m, n).t(), &mut e, m, false, par);
        }
    })
}

/// One SGD step of VGG16 (no batch-norm) on 32x32x3 inputs: forward, loss, backward, update.
fn vgg16_step(batch: usize, repeats: usize) -> Result<f64> {
    let mut model = zoo::build("vgg16", &[3, 32, 32], 10, 0).map_err(anyhow::Error::msg)?;
    let mut opt = Optimizer::new(OptimizerKind::Sgd { momentum: 0.9, nesterov: false }, 5e-4);
    let x = from_vec(&[batch, 3, 32, 32], pseudo_random(batch * 3 * 32 * 32, 6));
    let labels: Vec<usize> = (0..batch).map(|i| i % 10).collect();
    let mut failure = None;
    let ms = median_ms(repeats, || {
        let (logits, saved) = match model.forward(&x, Mode::Train) {
            Ok(v) => v,
            Err(e) => {
                failure = Some(e);
                return;
            }
        };
        let mut dlogits = zeros(logits.shape());
        softmax_cross_entropy(batch, 10, data(&logits), &labels, Some(data_mut(&mut dlogits)));
        let grads = model.backward(&dlogits, saved);
        opt.step(model.params_mut(), &grads, 1e-3);
    });
    match failure {
        Some(e) => Err(anyhow::Error::msg(e)),
        None => Ok(ms),
    }
}
