//! Shared helpers: a small seeded RNG, random shapes, naive references, releases for tests.
#![allow(dead_code)]

use trustsplit_boundary::{ReleaseInfo, Released, Transcript};
use trustsplit_device::{Backend, GemmShape};
use trustsplit_kernels::ConvGeometry;

/// SplitMix64: enough randomness for shapes and values, no extra dependency.
pub struct Rng(u64);

impl Rng {
    pub fn new(seed: u64) -> Rng {
        Rng(seed)
    }
    pub fn next_u64(&mut self) -> u64 {
        self.0 = self.0.wrapping_add(0x9E37_79B9_7F4A_7C15);
        let mut z = self.0;
        z = (z ^ (z >> 30)).wrapping_mul(0xBF58_476D_1CE4_E5B9);
        z = (z ^ (z >> 27)).wrapping_mul(0x94D0_49BB_1331_11EB);
        z ^ (z >> 31)
    }
    /// Uniform in `lo..=hi`.
    pub fn range(&mut self, lo: usize, hi: usize) -> usize {
        lo + (self.next_u64() % (hi - lo + 1) as u64) as usize
    }
    pub fn bool(&mut self) -> bool {
        self.next_u64() & 1 == 1
    }
    /// Uniform in [-1, 1).
    pub fn value(&mut self) -> f32 {
        ((self.next_u64() >> 40) as f32 / (1u64 << 24) as f32) * 2.0 - 1.0
    }
    pub fn values(&mut self, n: usize) -> Vec<f32> {
        (0..n).map(|_| self.value()).collect()
    }
    pub fn gemm_shape(&mut self, trans_a: bool, trans_b: bool) -> GemmShape {
        GemmShape { m: self.range(1, 37), n: self.range(1, 41), k: self.range(1, 33), trans_a, trans_b }
    }
    /// A valid geometry with odd sizes, stride 1-2, padding 0-2, kernels 1/3/5.
    pub fn geometry(&mut self) -> ConvGeometry {
        loop {
            let k = [1, 3, 5][self.range(0, 2)];
            let g = ConvGeometry {
                batch: self.range(1, 4),
                in_channels: self.range(1, 4),
                out_channels: self.range(1, 5),
                in_h: self.range(1, 11),
                in_w: self.range(1, 11),
                kernel_h: k,
                kernel_w: if self.bool() { k } else { [1, 3][self.range(0, 1)] },
                stride: self.range(1, 2),
                padding: self.range(0, 2),
            };
            if g.validate().is_ok() {
                return g;
            }
        }
    }
}

/// A geometry with stride 2 and padding 1 (the case most likely to get edges wrong).
pub fn strided_geometry() -> ConvGeometry {
    ConvGeometry {
        batch: 3,
        in_channels: 2,
        out_channels: 4,
        in_h: 8,
        in_w: 7,
        kernel_h: 3,
        kernel_w: 3,
        stride: 2,
        padding: 1,
    }
}

/// Naive f64 GEMM with the same storage conventions as `Backend::gemm`.
pub fn naive_gemm(s: &GemmShape, a: &[f32], b: &[f32]) -> Vec<f32> {
    let mut c = vec![0.0f32; s.m * s.n];
    for i in 0..s.m {
        for j in 0..s.n {
            let mut acc = 0.0f64;
            for p in 0..s.k {
                let av = if s.trans_a { a[p * s.m + i] } else { a[i * s.k + p] };
                let bv = if s.trans_b { b[j * s.k + p] } else { b[p * s.n + j] };
                acc += av as f64 * bv as f64;
            }
            c[i * s.n + j] = acc as f32;
        }
    }
    c
}

/// Asserts `max |got - want| <= tol * max(1, max |want|)`.
pub fn assert_close(got: &[f32], want: &[f32], tol: f32, what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    let scale = want.iter().fold(1.0f32, |m, v| m.max(v.abs()));
    let worst = got.iter().zip(want).map(|(g, w)| (g - w).abs()).fold(0.0f32, f32::max);
    assert!(worst <= tol * scale, "{what}: max abs error {worst} exceeds {tol} * {scale}");
}

/// Bit-for-bit equality (NaN-safe, distinguishes -0.0).
pub fn assert_bits(got: &[f32], want: &[f32], what: &str) {
    assert_eq!(got.len(), want.len(), "{what}: length");
    for (i, (g, w)) in got.iter().zip(want).enumerate() {
        assert_eq!(g.to_bits(), w.to_bits(), "{what}: element {i}: {g} vs {w}");
    }
}

/// Releases `v` through a test transcript.
pub fn release(t: &Transcript, v: Vec<f32>) -> Released<Vec<f32>> {
    let info = ReleaseInfo {
        scheme: "test".into(),
        layer: "test".into(),
        kind: "operand".into(),
        shape: vec![v.len()],
        reason: "test data, not secret".into(),
    };
    Released::new(t, info, v)
}

/// One convolution result in f64 from its definition: each value, the sum of its products'
/// magnitudes, and how many products it has at most.
pub struct Exact {
    pub values: Vec<f64>,
    pub magnitudes: Vec<f64>,
    pub terms: usize,
}

/// The forward output, input gradient and weight gradient of `g` in f64, straight from the
/// definition (zero padding).
pub fn exact_convolutions(g: &ConvGeometry, x: &[f32], w: &[f32], dy: &[f32]) -> [Exact; 3] {
    let (oh, ow) = (g.out_h(), g.out_w());
    let zeros = |n: usize| (vec![0.0f64; n], vec![0.0f64; n]);
    let ((mut y, mut y_abs), (mut dx, mut dx_abs), (mut dw, mut dw_abs)) =
        (zeros(g.output_len()), zeros(g.input_len()), zeros(g.weight_len()));
    for n in 0..g.batch {
        for o in 0..g.out_channels {
            for i in 0..g.in_channels {
                for kh in 0..g.kernel_h {
                    for kw in 0..g.kernel_w {
                        let wi = ((o * g.in_channels + i) * g.kernel_h + kh) * g.kernel_w + kw;
                        for r in 0..oh {
                            for c in 0..ow {
                                let (ih, iw) = (
                                    (r * g.stride + kh) as isize - g.padding as isize,
                                    (c * g.stride + kw) as isize - g.padding as isize,
                                );
                                if ih < 0 || iw < 0 || ih >= g.in_h as isize || iw >= g.in_w as isize {
                                    continue;
                                }
                                let xi = ((n * g.in_channels + i) * g.in_h + ih as usize) * g.in_w + iw as usize;
                                let yi = ((n * g.out_channels + o) * oh + r) * ow + c;
                                let (xv, wv, dv) = (f64::from(x[xi]), f64::from(w[wi]), f64::from(dy[yi]));
                                y[yi] += wv * xv;
                                y_abs[yi] += (wv * xv).abs();
                                dx[xi] += wv * dv;
                                dx_abs[xi] += (wv * dv).abs();
                                dw[wi] += xv * dv;
                                dw_abs[wi] += (xv * dv).abs();
                            }
                        }
                    }
                }
            }
        }
    }
    [
        Exact { values: y, magnitudes: y_abs, terms: g.patch_len() },
        Exact { values: dx, magnitudes: dx_abs, terms: g.out_channels * g.kernel_h * g.kernel_w },
        Exact { values: dw, magnitudes: dw_abs, terms: g.batch * oh * ow },
    ]
}

/// Asserts that every value of `got` errs from `want` by at most what a sum of `want.terms` f32
/// products may, in any order: `gamma_K = K u / (1 - K u)` times the sum of the products'
/// magnitudes (u = 2^-24). AsymML's check of a device's results (`--verify-device`) builds its
/// tolerance on this bound, so a backend that breaks it would be refused as faulty.
pub fn assert_within_f32_dot_bound(got: &[f32], want: &Exact, what: &str) {
    assert_eq!(got.len(), want.values.len(), "{what}: length");
    let ku = want.terms as f64 / (1u64 << 24) as f64;
    let gamma = ku / (1.0 - ku);
    for (i, ((&g, &v), &m)) in got.iter().zip(&want.values).zip(&want.magnitudes).enumerate() {
        let error = (f64::from(g) - v).abs();
        // (A device summing in higher precision and rounding once errs by at most u |v|, within it.)
        let bound = gamma * m;
        assert!(
            error <= bound,
            "{what}: value {i} is {g}, exactly {v}: off by {error:e}, beyond the f32 bound {bound:e}"
        );
    }
}

/// Checks `backend`'s three convolutions against [`assert_within_f32_dot_bound`] on a strided
/// geometry, a wide one (where rounding errors add up) and `random` random ones, with values of
/// mixed sizes and signs so that sums cancel.
pub fn convolutions_round_within_the_f32_dot_bound(backend: &mut dyn Backend, seed: u64, random: usize) {
    let mut rng = Rng::new(seed);
    let wide = ConvGeometry {
        batch: 4,
        in_channels: 24,
        out_channels: 16,
        in_h: 12,
        in_w: 12,
        kernel_h: 3,
        kernel_w: 3,
        stride: 1,
        padding: 1,
    };
    let mut geometries = vec![strided_geometry(), wide];
    geometries.extend((0..random).map(|_| rng.geometry()));
    for g in geometries {
        let mut values = |n: usize| -> Vec<f32> {
            rng.values(n).iter().map(|v| v * 10f32.powi((v.to_bits() % 5) as i32 - 2)).collect()
        };
        let (x, w, dy) = (values(g.input_len()), values(g.weight_len()), values(g.output_len()));
        let [y, dx, dw] = exact_convolutions(&g, &x, &w, &dy);
        let what = format!("{g:?}");
        assert_within_f32_dot_bound(&backend.conv_forward(&g, &x, &w).unwrap(), &y, &format!("forward {what}"));
        let got = backend.conv_backward_data(&g, &dy, &w).unwrap();
        assert_within_f32_dot_bound(&got, &dx, &format!("backward data {what}"));
        let got = backend.conv_backward_weight(&g, &x, &dy).unwrap();
        assert_within_f32_dot_bound(&got, &dw, &format!("backward weight {what}"));
    }
}
