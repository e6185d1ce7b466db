//! The field Z_p, p = 2^21 - 9 (Goten's `PrimeLimit`), with elements kept centred in
//! `[-(p-1)/2, (p-1)/2]` and stored as the two's-complement words the ring kernels take.
//!
//! Why those words: a product of two centred elements is below 2^40 in magnitude, so a sum of up
//! to 2^23 of them is below 2^63, and the Z_2^64 kernels (`trustsplit_cryptgpu::gemm`) then
//! compute the exact integer result, which [`reduce`] maps back into the field. No reduction
//! length used by a network comes near 2^23; [`crate::ops::Op::check_shape`] refuses one that does.

use trustsplit_cryptgpu::prg::Prg;

/// The modulus.
pub const P: i64 = (1 << 21) - 9;
/// The largest centred element.
pub const HALF: i64 = (P - 1) / 2;

/// The centred representative of `v` mod p.
pub fn centre(v: i64) -> i64 {
    let r = v.rem_euclid(P);
    if r > HALF {
        r - P
    } else {
        r
    }
}

/// An exact integer result (a two's-complement word) reduced into the field, as a word.
pub fn reduce(w: u64) -> u64 {
    centre(w as i64) as u64
}

/// The centred representative of `v` for `|v| < 2^50`, without a division: the quotient is
/// estimated in `f64` (exact enough at that size to be off by at most one) and corrected.
#[inline]
pub fn centre_small(v: i64) -> i64 {
    const INV_P: f64 = 1.0 / P as f64;
    let mut r = v - (v as f64 * INV_P).round() as i64 * P;
    r += P & -((r < -HALF) as i64);
    r -= P & -((r > HALF) as i64);
    r
}

/// `x - y` for centred `x, y`.
#[inline]
pub fn sub_one(x: u64, y: u64) -> u64 {
    let mut d = x as i64 - y as i64;
    d += P & -((d < -HALF) as i64);
    d -= P & -((d > HALF) as i64);
    d as u64
}

/// `a - b` in the field, elementwise.
pub fn sub(a: &[u64], b: &[u64]) -> Vec<u64> {
    a.iter().zip(b).map(|(&x, &y)| sub_one(x, y)).collect()
}

/// The sum of six vectors of centred elements, elementwise, in one parallel pass.
pub fn sum6(p: [&[u64]; 6]) -> Vec<u64> {
    use rayon::prelude::*;
    let n = p[0].len();
    let mut out = vec![0u64; n];
    const CHUNK: usize = 1 << 14;
    out.par_chunks_mut(CHUNK).enumerate().for_each(|(c, o)| {
        let at = c * CHUNK;
        for (i, o) in o.iter_mut().enumerate() {
            let j = at + i;
            let v = p[0][j] as i64 + p[1][j] as i64 + p[2][j] as i64 + p[3][j] as i64 + p[4][j] as i64 + p[5][j] as i64;
            *o = centre_small(v) as u64;
        }
    });
    out
}

/// Words per child stream of [`words`].
const CHILD_WORDS: usize = 1 << 16;

/// `n` words of `prg`'s stream, or for long draws of child streams keyed from it (one per 64 Ki
/// words, filled in parallel: one AES-CTR stream runs at about 2 GB/s on a core here).
pub fn words(prg: &mut Prg, n: usize) -> Vec<u64> {
    use rayon::prelude::*;
    if n <= CHILD_WORDS {
        return prg.ring(n);
    }
    let children = n.div_ceil(CHILD_WORDS);
    let keys = prg.ring(4 * children);
    let mut out = vec![0u64; n];
    out.par_chunks_mut(CHILD_WORDS).zip(keys.par_chunks(4)).for_each(|(chunk, key)| {
        let mut k = [0u8; 32];
        for (bytes, w) in k.chunks_exact_mut(8).zip(key) {
            bytes.copy_from_slice(&w.to_le_bytes());
        }
        Prg::from_key(k).fill(chunk);
    });
    out
}

/// `n` uniform field elements from `prg` (21 bits at a time, values >= p rejected).
pub fn uniform(prg: &mut Prg, n: usize) -> Vec<u64> {
    use rayon::prelude::*;
    const MASK: u64 = 0x1f_ffff;
    // Never a centred element (they lie in [-HALF, HALF]).
    const REJECTED: u64 = (HALF + 1) as u64;
    // Three 21-bit draws per word, taken in parallel; about 4 in a million are >= p and drawn
    // again from the stream (an accepted draw is uniform on [0, p), and so is a fresh one).
    let w = words(prg, n.div_ceil(3));
    let mut out = vec![0u64; n];
    const CHUNK: usize = 3 << 14;
    let rejected: usize = out
        .par_chunks_mut(CHUNK)
        .enumerate()
        .map(|(c, o)| {
            let mut bad = 0;
            for (j, v) in o.iter_mut().enumerate() {
                let i = c * CHUNK + j;
                let d = ((w[i / 3] >> (21 * (i % 3))) & MASK) as i64;
                bad += usize::from(d >= P);
                *v = if d < P { centre_draw(d) } else { REJECTED };
            }
            bad
        })
        .sum();
    if rejected > 0 {
        for v in out.iter_mut().filter(|v| **v == REJECTED) {
            *v = loop {
                let d = (prg.ring(1)[0] & MASK) as i64;
                if d < P {
                    break centre_draw(d);
                }
            };
        }
    }
    out
}

/// A draw in `[0, p)`, centred.
#[inline]
fn centre_draw(d: i64) -> u64 {
    (d - (P & -((d > HALF) as i64))) as u64
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn centring_and_reduction_match_the_definition() {
        for v in [0i64, 1, -1, HALF, -HALF, HALF + 1, -HALF - 1, P, -P, 3 * P + 17, -(1 << 40) + 5, 1 << 62] {
            let c = centre(v);
            assert!((-HALF..=HALF).contains(&c), "{v} -> {c}");
            assert_eq!((v - c).rem_euclid(P), 0, "{v} -> {c}");
            assert_eq!(reduce(v as u64) as i64, c);
            if v.abs() < 1 << 50 {
                assert_eq!(centre_small(v), c, "{v}");
            }
        }
        for (x, y) in [(HALF, -HALF), (-HALF, HALF), (0, HALF), (5, 7), (-HALF, -HALF)] {
            assert_eq!(sub_one(x as u64, y as u64) as i64, centre(x - y));
        }
    }

    #[test]
    fn uniform_elements_cover_the_field_evenly() {
        let mut prg = Prg::from_key([3; 32]);
        let n = 300_000;
        let v = uniform(&mut prg, n);
        assert_eq!(v.len(), n);
        assert!(v.iter().all(|&w| (-HALF..=HALF).contains(&(w as i64))));
        // Eight equal bins of the field: each within 5 standard deviations of n/8.
        let mut bins = [0usize; 8];
        v.iter().for_each(|&w| bins[((w as i64 + HALF) * 8 / P) as usize] += 1);
        let (mean, sd) = (n as f64 / 8.0, (n as f64 / 8.0 * 7.0 / 8.0).sqrt());
        assert!(bins.iter().all(|&b| (b as f64 - mean).abs() < 5.0 * sd), "{bins:?}");
    }
}
