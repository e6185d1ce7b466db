//! Bit-sliced layout for the binary circuits: 64 elements share each word, one word per bit
//! position. A block of 64 elements `e = 64 b + t` becomes 64 words, word `64 b + j` holding bit
//! `j` of every element of the block in bit `t`. Gates of a carry tree then work on whole words
//! (64 elements per AND) and the bits a round sends are whole words, with no packing.

/// Transposes a 64x64 bit matrix in place: afterwards bit `t` of `m[j]` is what bit `j` of
/// `m[t]` was. Six rounds of block swaps (Hacker's Delight 7-3, on 64-bit words).
pub fn transpose64(m: &mut [u64; 64]) {
    let mut width = 32;
    let mut mask: u64 = 0x0000_0000_ffff_ffff;
    while width != 0 {
        let mut k = 0;
        while k < 64 {
            // Swap the high `width` bits of row k with the low `width` bits of row k + width.
            let t = ((m[k] >> width) ^ m[k + width]) & mask;
            m[k] ^= t << width;
            m[k + width] ^= t;
            k = (k + width + 1) & !width;
        }
        width >>= 1;
        mask ^= mask << width;
    }
}

/// The number of 64-element blocks that hold `n` elements (the last one padded with zeros).
pub fn blocks(n: usize) -> usize {
    n.div_ceil(64)
}

/// `values` (one element per word) in the bit-sliced layout, `64 * blocks(n)` words.
pub fn slice(values: impl ExactSizeIterator<Item = u64>) -> Vec<u64> {
    let n = values.len();
    let mut out = vec![0u64; 64 * blocks(n)];
    let mut values = values;
    for block in out.chunks_exact_mut(64) {
        let block: &mut [u64; 64] = block.try_into().expect("64 words");
        for (w, v) in block.iter_mut().zip(values.by_ref()) {
            *w = v;
        }
        transpose64(block);
    }
    out
}

/// One bit-sliced word per block back to one element per word, in bit 0: `n` words.
pub fn unslice_bit(words: &[u64], n: usize) -> Vec<u64> {
    (0..n).map(|e| (words[e / 64] >> (e % 64)) & 1).collect()
}

/// One element per word, bit 0 of each, as one bit-sliced word per block.
pub fn slice_bit(values: &[u64]) -> Vec<u64> {
    let mut out = vec![0u64; blocks(values.len())];
    values.iter().enumerate().for_each(|(e, v)| out[e / 64] |= (v & 1) << (e % 64));
    out
}

#[cfg(test)]
mod tests {
    use super::*;
    use rand::{Rng, SeedableRng};
    use rand_chacha::ChaCha8Rng;

    #[test]
    fn transpose_matches_the_naive_one() {
        let mut rng = ChaCha8Rng::seed_from_u64(11);
        for _ in 0..20 {
            let m: [u64; 64] = std::array::from_fn(|_| rng.random());
            let mut t = m;
            transpose64(&mut t);
            for (j, row) in t.iter().enumerate() {
                for (i, src) in m.iter().enumerate() {
                    assert_eq!((row >> i) & 1, (src >> j) & 1, "bit {i} of word {j}");
                }
            }
        }
    }

    #[test]
    fn slicing_round_trips_with_padding() {
        let mut rng = ChaCha8Rng::seed_from_u64(12);
        for n in [0usize, 1, 63, 64, 65, 200] {
            let v: Vec<u64> = (0..n).map(|_| rng.random()).collect();
            let s = slice(v.iter().copied());
            assert_eq!(s.len(), 64 * blocks(n));
            for (e, x) in v.iter().enumerate() {
                for j in 0..64 {
                    assert_eq!((s[64 * (e / 64) + j] >> (e % 64)) & 1, (x >> j) & 1);
                }
            }
            // Padding elements are zero in every bit.
            for e in n..64 * blocks(n) {
                assert!((0..64).all(|j| (s[64 * (e / 64) + j] >> (e % 64)) & 1 == 0));
            }
            let bits = slice_bit(&v);
            assert_eq!(unslice_bit(&bits, n), v.iter().map(|x| x & 1).collect::<Vec<_>>());
        }
    }
}
