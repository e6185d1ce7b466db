//! `trustsplit bench kernels`: conv and VGG16-step timings at 1 and 2 threads, with a GEMM of the
//! same arithmetic measured in the same run as the baseline. `trustsplit bench step`: a scheme's
//! enclave and device time per training step (or inference batch) on random data, beside a
//! baseline scheme measured in the same run.
//!
//! Tried and dropped:
//! - Timing the baseline's steps first and the scheme's after them: tens of seconds apart on a
//!   host whose speed drifts, single pairs of steps ranged over 1.5x, so a short run's ratio could
//!   be off by a fifth; the steps now alternate (b050726, 2026-12-03).

use crate::registry::{Scheme, SchemeOptions};
use anyhow::Result;
use serde::Serialize;
use std::collections::BTreeMap;
use std::time::Instant;
use trustsplit_cryptgpu::session::PartyStats;
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
        if let Err(i) = opt.step(model.params_mut(), &grads, 1e-3) {
            failure = Some(format!("the gradient of parameter {i} holds NaN or infinite values"));
        }
    });
    match failure {
        Some(e) => Err(anyhow::Error::msg(e)),
        None => Ok(ms),
    }
}

/// Per-step costs of one scheme (`trustsplit bench step`).
#[derive(Debug, Serialize)]
pub struct StepBench {
    pub scheme: String,
    pub model: String,
    pub batch_size: usize,
    /// One sample's shape, `C x H x W`.
    pub input_shape: Vec<usize>,
    /// Inference batches instead of training steps.
    pub inference: bool,
    /// Learning rate of the training steps.
    pub lr: f32,
    /// Measured steps, after `warmup` unmeasured ones.
    pub steps: usize,
    pub warmup: usize,
    pub threads: usize,
    pub device: String,
    /// Wall time per step.
    pub step_ms: f64,
    /// Wall time minus time spent waiting for the device.
    pub enclave_ms: f64,
    pub device_ms: f64,
    /// Bytes of the values released per step, each counted once (the transcript's figure).
    pub bytes_released: u64,
    /// Bytes sent to the device per step, resends included (AsymML sends each residual twice:
    /// for the output and for the weight gradient).
    pub device_bytes_sent: u64,
    pub device_bytes_received: u64,
    /// Bytes sealed and spilled to untrusted memory per step, and restored.
    pub spill_bytes: u64,
    pub restore_bytes: u64,
    pub seal_ms: f64,
    /// Peak bytes the enclave held during the measured steps (0 for plaintext, which has no enclave).
    pub peak_enclave_bytes: usize,
    pub memory_budget_bytes: usize,
    /// Forward multiply-adds per sample of the convolutions and linear layers.
    pub forward_macs_per_sample: u64,
    /// Multiply-adds per step in the convolutions and linear layers: inside the enclave, and asked
    /// of the device. For schemes that do not count them (plaintext, tee-only, gpu-only) the
    /// enclave figure is the model's own: forward (x1 inference, x3 training) for the whole batch.
    pub enclave_macs: u64,
    pub device_macs: u64,
    /// Enclave milliseconds per step in each of the scheme's own phases (AsymML only).
    pub enclave_phase_ms: BTreeMap<String, f64>,
    /// The device's results checked over the run, warm-up included (AsymML with
    /// `--verify-device on`; `None` otherwise).
    pub device_checks: Option<trustsplit_schemes::device_check::CheckTally>,
    /// A three-party scheme (cryptgpu): each party's traffic per step (`step_ms` is then the
    /// parties' wall time, all three on this machine).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub parties: Option<Vec<PartyStep>>,
}

/// One party's traffic per measured step.
#[derive(Debug, Serialize)]
pub struct PartyStep {
    pub party: usize,
    pub bytes_sent: u64,
    pub messages: u64,
    pub rounds: u64,
}

/// Settings of [`step`].
#[derive(Clone)]
pub struct StepOptions<'a> {
    pub scheme: Scheme,
    pub model: &'a str,
    pub batch_size: usize,
    /// Square input images of this side (`None`: the model's usual 32, or 28 for LeNet-5).
    pub image_size: Option<usize>,
    pub inference: bool,
    /// Learning rate of the timed steps.
    pub lr: f32,
    pub steps: usize,
    /// Unmeasured steps before the measured ones.
    pub warmup: usize,
    pub threads: usize,
    pub device: &'a str,
    pub link: crate::devices::DeviceLinkArgs,
    pub memory_budget: usize,
    pub options: SchemeOptions,
    /// Also time this scheme in the same run and report the enclave-time ratio against it.
    pub baseline: Option<Scheme>,
}

/// [`step`] of a scheme beside a baseline scheme measured in the same run.
#[derive(Debug, Serialize)]
pub struct Compared {
    #[serde(flatten)]
    pub run: StepBench,
    pub baseline: Option<StepBench>,
    /// Baseline enclave time / this scheme's enclave time, over all measured steps.
    pub enclave_speedup: Option<f64>,
    /// The lowest and highest of that ratio over the alternated pairs of steps (one baseline
    /// step, then one of the scheme): how far the host's drift moved it during the run.
    pub enclave_speedup_per_pair: Option<(f64, f64)>,
}

/// Times the scheme and, if asked, its baseline. With a baseline, both are set up and warmed up
/// first, then their measured steps alternate (baseline, scheme, baseline, ...), so that a shared
/// host's speed, which drifts over seconds to minutes, weighs on both alike.
pub fn step_compared(o: &StepOptions) -> Result<Compared> {
    let Some(baseline) = o.baseline.filter(|&b| b != o.scheme) else {
        let run = step(o)?;
        return Ok(Compared { run, baseline: None, enclave_speedup: None, enclave_speedup_per_pair: None });
    };
    let mut base = Stepper::new(&StepOptions { scheme: baseline, baseline: None, ..o.clone() })?;
    let mut run = Stepper::new(o)?;
    crate::with_threads(o.threads, || -> Result<()> {
        for stepper in [&mut base, &mut run] {
            stepper.warm_up()?;
        }
        for _ in 0..o.steps {
            base.measured_step()?;
            run.measured_step()?;
        }
        Ok(())
    })??;
    let pairs = base.enclave_seconds.iter().zip(&run.enclave_seconds).map(|(b, r)| b / r.max(1e-12));
    let per_pair =
        pairs.fold(None, |range: Option<(f64, f64)>, x| Some(range.map_or((x, x), |(lo, hi)| (lo.min(x), hi.max(x)))));
    let (base, run) = (base.finish()?, run.finish()?);
    let enclave_speedup = Some(base.enclave_ms / run.enclave_ms.max(1e-9));
    Ok(Compared { run, baseline: Some(base), enclave_speedup, enclave_speedup_per_pair: per_pair })
}

/// Times training steps (or inference batches) of `model` under a scheme on random data.
pub fn step(o: &StepOptions) -> Result<StepBench> {
    let mut stepper = Stepper::new(o)?;
    crate::with_threads(o.threads, || -> Result<()> {
        stepper.warm_up()?;
        for _ in 0..o.steps {
            stepper.measured_step()?;
        }
        Ok(())
    })??;
    stepper.finish()
}

/// One scheme's model, runner and optimizer on a batch of random data, stepped one step at a time
/// so that [`step_compared`] can alternate two of them.
struct Stepper<'a> {
    o: StepOptions<'a>,
    input: Vec<usize>,
    model: trustsplit_nn::Model,
    runner: crate::runner::Runner,
    opt: Optimizer,
    x: trustsplit_nn::tensor::Tensor,
    labels: Vec<usize>,
    /// The runner's counters when measuring began.
    before: Option<trustsplit_schemes::SchemeReport>,
    /// A three-party scheme's traffic counters when measuring began.
    parties_before: Option<Vec<PartyStats>>,
    /// The runner's device time so far (at the end of the last step).
    device_seconds: f64,
    wall_seconds: f64,
    /// Wall time minus device time, per measured step.
    enclave_seconds: Vec<f64>,
}

impl<'a> Stepper<'a> {
    fn new(o: &StepOptions<'a>) -> Result<Self> {
        anyhow::ensure!(o.batch_size > 0 && o.steps > 0, "--batch-size and --steps must be at least 1");
        anyhow::ensure!(
            o.options.cryptgpu.uploaded.is_none(),
            "bench step measures on random inputs; --uploaded applies to train and eval"
        );
        anyhow::ensure!(o.lr.is_finite() && o.lr >= 0.0, "--lr must be a finite rate of at least 0, got {}", o.lr);
        let (channels, usual) = if zoo::required_input_size(o.model).is_some() { (3, 32) } else { (1, 28) };
        let side = o.image_size.unwrap_or(usual);
        anyhow::ensure!(side > 0, "--image-size must be at least 1");
        let input = vec![channels, side, side];
        let model = zoo::build(o.model, &input, 10, 0)
            .map_err(|e| anyhow::anyhow!("{} does not take {side}x{side} images: {e}", o.model))?;
        let opt = Optimizer::new(OptimizerKind::Sgd { momentum: 0.9, nesterov: false }, 5e-4);
        let runner = crate::registry::build_runner(
            o.scheme,
            o.device,
            &o.link,
            o.memory_budget,
            None,
            None,
            &o.options,
            (&model, &opt),
        )?;
        let n = o.batch_size;
        let x = from_vec(&[&[n][..], &input[..]].concat(), pseudo_random(n * input.iter().product::<usize>(), 7));
        let labels: Vec<usize> = (0..n).map(|i| i % 10).collect();
        let o = o.clone();
        Ok(Stepper {
            o,
            input,
            model,
            runner,
            opt,
            x,
            labels,
            before: None,
            parties_before: None,
            device_seconds: 0.0,
            wall_seconds: 0.0,
            enclave_seconds: Vec::new(),
        })
    }

    fn run_one(&mut self) -> Result<()> {
        let xs = trustsplit_boundary::Secret::new(self.x.clone());
        let ys = trustsplit_boundary::Secret::new(self.labels.clone());
        if self.o.inference {
            self.runner.eval_batch(&mut self.model, xs, &ys, &[])?;
        } else {
            self.runner.train_step(&mut self.model, xs, &ys, &[], &mut self.opt, self.o.lr)?;
        }
        Ok(())
    }

    /// The unmeasured steps, then the counters measuring starts from.
    fn warm_up(&mut self) -> Result<()> {
        for _ in 0..self.o.warmup {
            self.run_one()?;
        }
        self.runner.reset_peak();
        let before = self.runner.report();
        self.device_seconds = before.device_seconds;
        self.before = Some(before);
        self.parties_before = self.runner.party_stats()?;
        Ok(())
    }

    fn measured_step(&mut self) -> Result<()> {
        let start = Instant::now();
        self.run_one()?;
        let wall = start.elapsed().as_secs_f64();
        let device_seconds = self.runner.report().device_seconds;
        self.wall_seconds += wall;
        self.enclave_seconds.push((wall - (device_seconds - self.device_seconds)).max(0.0));
        self.device_seconds = device_seconds;
        Ok(())
    }

    fn finish(mut self) -> Result<StepBench> {
        let parties = self.runner.party_stats()?.map(|after| {
            let before = self.parties_before.take().unwrap_or_default();
            after
                .iter()
                .map(|a| {
                    let b = before.iter().find(|b| b.party == a.party).map(|b| b.total).unwrap_or_default();
                    PartyStep {
                        party: a.party,
                        bytes_sent: (a.total.bytes_sent - b.bytes_sent) / self.o.steps as u64,
                        messages: (a.total.messages - b.messages) / self.o.steps as u64,
                        rounds: (a.total.rounds - b.rounds) / self.o.steps as u64,
                    }
                })
                .collect()
        });
        let Stepper { o, input, model, runner, before, wall_seconds, .. } = self;
        let before = before.expect("warm_up runs before the measured steps");
        let n = o.batch_size;
        let after = runner.report();
        let per = |a: u64, b: u64| (a - b) / o.steps as u64;
        let device_s = (after.device_seconds - before.device_seconds) / o.steps as f64;
        let step_s = wall_seconds / o.steps as f64;
        // The model's own convolution and linear multiply-adds per step: forward, or forward and both
        // backward products when training.
        let model_macs = model.forward_macs_per_sample() * n as u64 * if o.inference { 1 } else { 3 };
        // A placement that counts its multiply-adds (AsymML) reports them; for the others, a
        // scheme with a device runs all of the model's there, and one without runs them inside.
        let counted = after.placement.enclave_macs + after.placement.device_macs > 0;
        let (mem_a, mem_b) = (after.memory.clone().unwrap_or_default(), before.memory.unwrap_or_default());
        Ok(StepBench {
            scheme: o.scheme.to_string(),
            model: o.model.to_string(),
            batch_size: n,
            input_shape: input,
            inference: o.inference,
            lr: o.lr,
            steps: o.steps,
            warmup: o.warmup,
            threads: o.threads,
            device: if o.scheme.info().uses_device { o.device.to_string() } else { "none".into() },
            step_ms: step_s * 1e3,
            enclave_ms: (step_s - device_s).max(0.0) * 1e3,
            device_ms: device_s * 1e3,
            bytes_released: per(after.transcript.bytes_released, before.transcript.bytes_released),
            device_bytes_sent: per(after.device_bytes_sent, before.device_bytes_sent),
            device_bytes_received: per(after.device_bytes_received, before.device_bytes_received),
            spill_bytes: per(mem_a.spill_bytes, mem_b.spill_bytes),
            restore_bytes: per(mem_a.restore_bytes, mem_b.restore_bytes),
            seal_ms: (mem_a.seal_seconds - mem_b.seal_seconds + mem_a.unseal_seconds - mem_b.unseal_seconds) * 1e3
                / o.steps as f64,
            peak_enclave_bytes: mem_a.peak_bytes,
            memory_budget_bytes: if after.memory.is_some() { o.memory_budget } else { 0 },
            forward_macs_per_sample: model.forward_macs_per_sample(),
            enclave_macs: match (counted, o.scheme.info().uses_device) {
                (true, _) => per(after.placement.enclave_macs, before.placement.enclave_macs),
                (false, true) => 0,
                (false, false) => model_macs,
            },
            enclave_phase_ms: after
                .placement
                .enclave_phase_seconds
                .iter()
                .map(|(k, v)| {
                    let b = before.placement.enclave_phase_seconds.get(k).copied().unwrap_or(0.0);
                    (k.clone(), (v - b) * 1e3 / o.steps as f64)
                })
                .collect(),
            device_checks: after.placement.device_checks,
            device_macs: match (counted, o.scheme.info().uses_device) {
                (true, _) => per(after.placement.device_macs, before.placement.device_macs),
                (false, true) => model_macs,
                (false, false) => 0,
            },
            parties,
        })
    }
}
