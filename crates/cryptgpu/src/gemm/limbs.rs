//! CryptGPU's route to ring products on hardware that only multiplies floats: split every `u64`
//! into `b`-bit limbs, multiply limb matrices with an `f64` GEMM (exact while every dot product
//! stays below 2^53) and recombine the limb products with shifts mod 2^64.

use gemm::Parallelism;
use rayon::prelude::*;

/// `f64` holds every integer below 2^53 exactly.
const F64_EXACT_BITS: u32 = 53;
/// Values per parallel task when splitting and recombining: large enough that a task costs more
/// than handing it to another thread.
const RECOMBINE_CHUNK: usize = 1 << 14;

/// `C = A B` over Z_2^64 (`A: m x k`, `B: k x n`) through `f64` GEMMs on `limb_bits`-bit limbs.
///
/// With `L = limb_bits` and `l = ceil(64 / L)` limbs, `A B = sum_{i,j} A_i B_j 2^{(i+j)L}`
/// and only the pairs with `(i + j) L < 64` survive mod 2^64: 10 of 16 for `L = 16`, 6 of 9 for
/// `L = 22`. Each limb product is exact while `k * 2^(2L) <= 2^53`; beyond that this returns
/// an error rather than a wrong product.
pub fn matmul_float_limbs(
    a: &[u64],
    b: &[u64],
    m: usize,
    k: usize,
    n: usize,
    limb_bits: u32,
) -> Result<Vec<u64>, String> {
    assert_eq!(a.len(), m * k);
    assert_eq!(b.len(), k * n);
    let plan = LimbPlan::new(m, k, n, limb_bits)?;
    let mut c = vec![0u64; m * n];
    if plan.is_empty() {
        return Ok(c);
    }
    let (a_limbs, b_limbs) = (plan.split(a), plan.split(b));
    // Sized for the largest product and reused: fresh pages cost a fault each.
    let mut products = vec![0.0f64; plan.rows(0) * n];
    for j in 0..plan.limbs {
        let rows = plan.rows(j);
        let products = &mut products[..rows * n];
        gemm_f64(products, &a_limbs[..rows * k], plan.b_limb(&b_limbs, j), rows, k, n);
        plan.accumulate(&mut c, j, products);
    }
    Ok(c)
}

/// The limb products of one ring product `A B` (`A: m x k`, `B: k x n`), shared by every place
/// they run (the CPU here, cuBLAS in `gemm::cuda`) so that the split and recombine a GPU relies
/// on are the ones the CPU tests check.
///
/// Limbs are stacked limb-major: rows `i*m..(i+1)*m` of the `A` stack are `A_i`, so the `A` limbs
/// that pair with `B_j` (`i < limbs - j`) are one contiguous prefix of [`LimbPlan::rows`]`(j)`
/// rows, and one GEMM per `j` computes all of them.
#[derive(Clone, Copy, Debug)]
pub(crate) struct LimbPlan {
    pub m: usize,
    pub k: usize,
    pub n: usize,
    pub limb_bits: u32,
    /// Limbs per value: `ceil(64 / limb_bits)`.
    pub limbs: usize,
}

impl LimbPlan {
    /// Refuses limb sizes whose products `f64` cannot hold exactly.
    pub fn new(m: usize, k: usize, n: usize, limb_bits: u32) -> Result<LimbPlan, String> {
        if !(1..=F64_EXACT_BITS / 2).contains(&limb_bits) {
            return Err(format!("float limbs must have 1..={} bits, got {limb_bits}", F64_EXACT_BITS / 2));
        }
        let max_k = 1u64 << (F64_EXACT_BITS - 2 * limb_bits);
        if k as u64 > max_k {
            return Err(format!(
                "float limbs of {limb_bits} bits are exact only for k <= 2^{} = {max_k} \
                 (k * 2^{} <= 2^{F64_EXACT_BITS}); got k = {k}",
                F64_EXACT_BITS - 2 * limb_bits,
                2 * limb_bits,
            ));
        }
        Ok(LimbPlan { m, k, n, limb_bits, limbs: 64usize.div_ceil(limb_bits as usize) })
    }

    /// Whether the product is all zeros without any GEMM.
    pub fn is_empty(&self) -> bool {
        self.m == 0 || self.n == 0 || self.k == 0
    }

    /// Rows of the `A` stack that pair with `B_j`: `A_0 .. A_{limbs-1-j}`, whose shifts
    /// `(i + j) * limb_bits` stay below 64.
    pub fn rows(&self, j: usize) -> usize {
        (self.limbs - j) * self.m
    }

    /// `B_j` (`k x n`) in the `B` stack.
    pub fn b_limb<'a>(&self, b_limbs: &'a [f64], j: usize) -> &'a [f64] {
        &b_limbs[j * self.k * self.n..][..self.k * self.n]
    }

    /// Every value's limbs as floats, limb-major: `limbs` copies of `x`'s shape.
    pub fn split(&self, x: &[u64]) -> Vec<f64> {
        split(x, self.limb_bits, self.limbs)
    }

    /// Adds `products` (`rows(j) x n`: `A_i B_j` for `i < limbs - j`, stacked) into `c` mod 2^64,
    /// each shifted by its weight `(i + j) * limb_bits`.
    pub fn accumulate(&self, c: &mut [u64], j: usize, products: &[f64]) {
        let mn = self.m * self.n;
        assert_eq!(c.len(), mn);
        assert_eq!(products.len(), self.rows(j) * self.n);
        let shifts: Vec<u32> = (0..self.limbs - j).map(|i| ((i + j) * self.limb_bits as usize) as u32).collect();
        c.par_chunks_mut(RECOMBINE_CHUNK).enumerate().for_each(|(chunk, out)| {
            let start = chunk * RECOMBINE_CHUNK;
            for (product, &shift) in products.chunks_exact(mn).zip(&shifts) {
                // Every limb product is an integer below 2^53, which `f64` holds exactly, so the
                // conversion is exact and needs no rounding.
                for (cv, &v) in out.iter_mut().zip(&product[start..]) {
                    *cv = cv.wrapping_add((v as u64) << shift);
                }
            }
        });
    }
}

/// The limb size a GPU ring product uses for inner dimension `k`: 22 bits (6 limb products)
/// while `k <= 2^9`, 16 bits (10 limb products) up to `2^21`, and an error beyond, where only
/// smaller limbs (and many more products) would stay exact.
#[cfg(any(feature = "cuda", test))]
pub(crate) fn limb_bits_for(k: usize) -> Result<u32, String> {
    [22, 16].into_iter().find(|&bits| k as u64 <= 1u64 << (F64_EXACT_BITS - 2 * bits)).ok_or_else(|| {
        format!(
            "ring products on the GPU are exact only for k <= 2^{} (16-bit float limbs); got k = {k}",
            F64_EXACT_BITS - 32
        )
    })
}

/// Every value's limbs as floats, limb-major: `limbs` copies of `x`'s shape.
fn split(x: &[u64], limb_bits: u32, limbs: usize) -> Vec<f64> {
    let mask = (1u64 << limb_bits) - 1;
    let mut out = vec![0.0f64; limbs * x.len()];
    if x.is_empty() {
        return out;
    }
    out.par_chunks_mut(x.len()).enumerate().for_each(|(l, limb)| {
        let shift = l as u32 * limb_bits;
        limb.par_chunks_mut(RECOMBINE_CHUNK).zip(x.par_chunks(RECOMBINE_CHUNK)).for_each(|(out, x)| {
            for (o, &v) in out.iter_mut().zip(x) {
                // A limb has at most 26 bits, so it converts through `i32`, which vectorises
                // where a 64-bit integer conversion would not.
                *o = (((v >> shift) & mask) as i32) as f64;
            }
        });
    });
    out
}

/// `C = A B` in `f64`, overwriting `c`.
fn gemm_f64(c: &mut [f64], a: &[f64], b: &[f64], m: usize, k: usize, n: usize) {
    assert_eq!(a.len(), m * k);
    assert_eq!(b.len(), k * n);
    assert_eq!(c.len(), m * n);
    // SAFETY: `a` is `m x k`, `b` is `k x n` and `c` is `m x n`, all row-major (column stride 1,
    // row stride the column count) and checked above, so every index stays in its slice; `c` is
    // borrowed mutably, so it cannot alias the inputs. With `read_dst` false `c` is only written.
    unsafe {
        gemm::gemm(
            m,
            n,
            k,
            c.as_mut_ptr(),
            1,
            n as isize,
            false,
            a.as_ptr(),
            1,
            k as isize,
            b.as_ptr(),
            1,
            n as isize,
            0.0,
            1.0,
            false,
            false,
            false,
            Parallelism::Rayon(0),
        );
    }
}
