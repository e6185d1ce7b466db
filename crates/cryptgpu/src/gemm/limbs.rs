//! CryptGPU's route to ring products on hardware that only multiplies floats: split every `u64`
//! into `b`-bit limbs, multiply limb matrices with an `f64` GEMM (exact while every dot product
//! stays below 2^53) and recombine the limb products with shifts mod 2^64.

use gemm::Parallelism;

/// The largest `f64` integer below which every integer is exact.
const F64_EXACT_BITS: u32 = 53;

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
    if !(1..=F64_EXACT_BITS / 2).contains(&limb_bits) {
        return Err(format!("float limbs must have 1..={} bits, got {limb_bits}", F64_EXACT_BITS / 2));
    }
    let max_k = 1usize << (F64_EXACT_BITS - 2 * limb_bits);
    if k > max_k {
        return Err(format!(
            "float limbs of {limb_bits} bits are exact only for k <= 2^{} = {max_k} \
             (k * 2^{} <= 2^{F64_EXACT_BITS}); got k = {k}",
            F64_EXACT_BITS - 2 * limb_bits,
            2 * limb_bits,
        ));
    }
    let mut c = vec![0u64; m * n];
    if m == 0 || n == 0 || k == 0 {
        return Ok(c);
    }
    let limbs = 64usize.div_ceil(limb_bits as usize);
    // Limb-major stacks: rows `i*m..(i+1)*m` of `a_limbs` are `A_i`, so the `A` limbs that pair
    // with `B_j` (`i < limbs - j`) are one contiguous prefix and one GEMM computes all of them.
    let a_limbs = split(a, limb_bits, limbs);
    let b_limbs = split(b, limb_bits, limbs);
    for j in 0..limbs {
        let rows = (limbs - j) * m;
        let products = gemm_f64(&a_limbs[..rows * k], &b_limbs[j * k * n..(j + 1) * k * n], rows, k, n);
        for (i, product) in products.chunks_exact(m * n).enumerate() {
            let shift = ((i + j) * limb_bits as usize) as u32;
            for (cv, &v) in c.iter_mut().zip(product) {
                *cv = cv.wrapping_add((v.round() as u64) << shift);
            }
        }
    }
    Ok(c)
}

/// Every value's limbs as floats, limb-major: `limbs` copies of `x`'s shape.
fn split(x: &[u64], limb_bits: u32, limbs: usize) -> Vec<f64> {
    let mask = (1u64 << limb_bits) - 1;
    (0..limbs).flat_map(|l| x.iter().map(move |&v| ((v >> (l as u32 * limb_bits)) & mask) as f64)).collect()
}

fn gemm_f64(a: &[f64], b: &[f64], m: usize, k: usize, n: usize) -> Vec<f64> {
    assert_eq!(a.len(), m * k);
    assert_eq!(b.len(), k * n);
    let mut c = vec![0.0f64; m * n];
    // SAFETY: `a` is `m x k`, `b` is `k x n` and `c` is `m x n`, all row-major (column stride 1,
    // row stride the column count) and checked above, so every index stays in its slice; `c` is
    // a fresh allocation and cannot alias the inputs.
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
    c
}
