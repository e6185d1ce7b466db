//! The noise's random source: the AES-256 keystream in counter mode, keyed from the operating
//! system's CSPRNG.
//!
//! Counter-mode AES under a secret random key is a standard cryptographically secure generator (it
//! is the core of NIST SP 800-90A's CTR_DRBG): without the key, its output cannot be told from
//! uniform bytes, so the device can neither predict nor replay the noise. It replaced ChaCha12
//! (`rand`'s `StdRng`) because the CPU's AES instructions make it several times faster, and the
//! noise is the largest AsymML phase that is not a product. Counter mode is written here on top of
//! the `aes` crate's block cipher, with a 512-bit VAES loop that makes its own counter blocks
//! where the CPU has one: for 17.6 M words (one VGG16 step's noise) on a Zen 5 core, 3.2-3.3 ms,
//! against 15.4-15.8 ms for the `ctr` crate over `aes` 0.9 and 27.5-28.0 ms for ChaCha12 in the
//! same runs (this module's `timing` test; the previous `ctr` 0.9 over `aes` 0.8 took 9.0-11.1 ms
//! in earlier runs of it). The 128-bit counter never wraps in practice (2^128 blocks).
//!
//! Tried and dropped:
//! - The `aes` 0.9 crate's VAES backend under `ctr` 0.10: 15.4-15.8 ms for 17.6 M words, against
//!   9.0-11.1 ms for `ctr` 0.9 over `aes` 0.8 and 3.2-3.3 ms for the 512-bit VAES loop here
//!   (2026-12-02).

use aes::cipher::{BlockCipherEncrypt, KeyInit};
use aes::{Aes256, Block};
use rand::{CryptoRng, RngCore, SeedableRng};

/// AES blocks of keystream generated at once (16 KiB). Large batches matter: each call into the
/// cipher broadcasts the round keys and sets up its pipeline, which for a few blocks at a time
/// cost as much as the encryption itself.
const BLOCKS: usize = 1024;
const BUFFER: usize = BLOCKS * 16;
#[cfg(target_arch = "x86_64")]
const _: () = assert!(BUFFER.is_multiple_of(vaes::CHUNK));

/// A cryptographically secure random generator: the AES-256-CTR keystream (128-bit big-endian
/// counter from zero) under a 256-bit key. Every keystream byte is handed out at most once, in
/// order (only [`NoiseRng::words_in_place`] skips any: the last 1-3 bytes of a batch that a
/// byte-sized read left short of a word).
///
/// Counter mode is written here over the `aes` block cipher rather than taken from the `ctr`
/// crate: the keystream is the encryption of the counter blocks themselves, so a batch of them is
/// encrypted in place (with VAES where the CPU has it) without the zeroing and XOR of a
/// stream-cipher interface. The NIST test vector below pins it to the standard construction.
pub struct NoiseRng {
    cipher: Aes256,
    /// The same key's round keys for the VAES path, where the CPU has AVX-512 VAES.
    #[cfg(target_arch = "x86_64")]
    vaes: Option<vaes::RoundKeys>,
    /// Counter of the first block of the next batch.
    next_counter: u128,
    buffer: Box<[Block]>,
    /// Bytes of `buffer` already handed out (`BUFFER`: empty).
    used: usize,
}

impl NoiseRng {
    /// A generator keyed from the operating system's CSPRNG.
    pub fn from_os() -> Result<Self, String> {
        use rand::TryRngCore;
        let mut key = [0u8; 32];
        rand::rngs::OsRng
            .try_fill_bytes(&mut key)
            .map_err(|e| format!("the operating system's random source failed: {e}"))?;
        Ok(Self::from_seed(key))
    }

    fn with_counter(key: [u8; 32], first_counter: u128) -> Self {
        NoiseRng {
            cipher: Aes256::new(&key.into()),
            #[cfg(target_arch = "x86_64")]
            vaes: vaes::RoundKeys::expand(&key),
            next_counter: first_counter,
            buffer: vec![Block::default(); BLOCKS].into_boxed_slice(),
            used: BUFFER,
        }
    }

    /// The next batch of keystream: counter blocks, encrypted in place.
    fn refill(&mut self) {
        self.used = 0;
        #[cfg(target_arch = "x86_64")]
        if let Some(keys) = &self.vaes {
            // The VAES loop makes its counter blocks in registers, stepping the low 64 bits only:
            // a batch whose low half would wrap goes the general way below.
            if (self.next_counter as u64).checked_add(BLOCKS as u64 - 1).is_some() {
                keys.counter_mode(self.next_counter, Block::slice_as_flattened_mut(&mut self.buffer));
                self.next_counter = self.next_counter.wrapping_add(BLOCKS as u128);
                return;
            }
        }
        for block in self.buffer.iter_mut() {
            *block = self.next_counter.to_be_bytes().into();
            self.next_counter = self.next_counter.wrapping_add(1);
        }
        #[cfg(target_arch = "x86_64")]
        if let Some(keys) = &self.vaes {
            keys.encrypt_in_place(Block::slice_as_flattened_mut(&mut self.buffer));
            return;
        }
        self.cipher.encrypt_blocks(&mut self.buffer);
    }

    fn bytes(&self) -> &[u8] {
        Block::slice_as_flattened(&self.buffer)
    }

    /// The next whole words of the keystream, up to `max_words` (at least one when `max_words > 0`),
    /// as their little-endian bytes, read in place instead of copied out: at most what is left of
    /// the current batch. A word is four bytes; should a byte-sized read have left fewer than four
    /// in the batch, they are skipped (the rest of the stream is still handed out once, in order).
    pub fn words_in_place(&mut self, max_words: usize) -> &[u8] {
        if max_words == 0 {
            return &[];
        }
        if BUFFER - self.used < 4 {
            self.refill();
        }
        let n = 4 * max_words.min((BUFFER - self.used) / 4);
        let start = self.used;
        self.used += n;
        &self.bytes()[start..start + n]
    }

    /// The next `N` bytes of the keystream.
    #[inline]
    fn take<const N: usize>(&mut self) -> [u8; N] {
        let mut out = [0u8; N];
        if self.used + N <= BUFFER {
            out.copy_from_slice(&self.bytes()[self.used..self.used + N]);
            self.used += N;
        } else {
            self.fill_bytes(&mut out);
        }
        out
    }
}

impl SeedableRng for NoiseRng {
    /// The AES-256 key.
    type Seed = [u8; 32];

    fn from_seed(key: [u8; 32]) -> Self {
        Self::with_counter(key, 0)
    }
}

impl RngCore for NoiseRng {
    fn next_u32(&mut self) -> u32 {
        u32::from_le_bytes(self.take())
    }

    fn next_u64(&mut self) -> u64 {
        u64::from_le_bytes(self.take())
    }

    fn fill_bytes(&mut self, mut dst: &mut [u8]) {
        while !dst.is_empty() {
            if self.used == BUFFER {
                self.refill();
            }
            let n = dst.len().min(BUFFER - self.used);
            let (head, rest) = std::mem::take(&mut dst).split_at_mut(n);
            head.copy_from_slice(&self.bytes()[self.used..self.used + n]);
            self.used += n;
            dst = rest;
        }
    }
}

impl CryptoRng for NoiseRng {}

/// AES-256 encryption with 512-bit VAES: four blocks per instruction, eight registers in flight.
/// The `aes` crate has a VAES backend too, but its generic block loading and storing around the
/// rounds took as long as the rounds themselves (this module's timing test measures both).
#[cfg(target_arch = "x86_64")]
mod vaes {
    use std::arch::x86_64::*;

    /// Bytes encrypted per loop iteration: 8 registers of 4 blocks.
    pub const CHUNK: usize = 8 * 64;

    pub struct RoundKeys([__m128i; 15]);

    impl RoundKeys {
        /// The expanded key, or `None` where the CPU lacks AES-NI, AVX-512F or VAES.
        pub fn expand(key: &[u8; 32]) -> Option<RoundKeys> {
            let supported = is_x86_feature_detected!("aes")
                && is_x86_feature_detected!("avx512f")
                && is_x86_feature_detected!("avx512bw")
                && is_x86_feature_detected!("vaes");
            // SAFETY: the features were just detected.
            supported.then(|| RoundKeys(unsafe { expand_256(key) }))
        }

        /// Encrypts each 16-byte block of `bytes` in place (ECB; the caller wrote counter blocks).
        pub fn encrypt_in_place(&self, bytes: &mut [u8]) {
            assert_eq!(bytes.len() % CHUNK, 0, "VAES batches are whole chunks");
            // SAFETY: a `RoundKeys` exists only where `expand` detected the features.
            unsafe { encrypt_chunks(&self.0, bytes) }
        }

        /// Fills `bytes` with the encryptions of the big-endian counter blocks `first`, `first + 1`,
        /// ...; the low 64 bits of the counter must not wrap within them.
        pub fn counter_mode(&self, first: u128, bytes: &mut [u8]) {
            assert_eq!(bytes.len() % CHUNK, 0, "VAES batches are whole chunks");
            let blocks = (bytes.len() / 16) as u64;
            assert!(blocks == 0 || (first as u64).checked_add(blocks - 1).is_some(), "counter's low half wraps");
            // SAFETY: as in `encrypt_in_place`.
            unsafe { counter_chunks(&self.0, first, bytes) }
        }
    }

    /// FIPS 197's AES-256 key expansion with AES-NI's key-generation assist (rcon as immediate).
    #[target_feature(enable = "aes,sse2")]
    fn expand_256(key: &[u8; 32]) -> [__m128i; 15] {
        // SAFETY: 32 bytes are read as two unaligned 16-byte loads.
        let (mut even, mut odd) =
            unsafe { (_mm_loadu_si128(key.as_ptr().cast()), _mm_loadu_si128(key.as_ptr().add(16).cast())) };
        let mut rk = [even; 15];
        rk[1] = odd;
        // An even round key: the one two before, chained, XOR RotWord(SubWord(last word)) ^ rcon;
        // an odd one: the one two before, chained, XOR SubWord(last word of the even one).
        macro_rules! pair {
            ($i:literal, $rcon:literal) => {
                even =
                    _mm_xor_si128(prefix_xor(even), _mm_shuffle_epi32::<0xff>(_mm_aeskeygenassist_si128::<$rcon>(odd)));
                rk[$i] = even;
                odd = _mm_xor_si128(prefix_xor(odd), _mm_shuffle_epi32::<0xaa>(_mm_aeskeygenassist_si128::<0>(even)));
                rk[$i + 1] = odd;
            };
        }
        pair!(2, 0x01);
        pair!(4, 0x02);
        pair!(6, 0x04);
        pair!(8, 0x08);
        pair!(10, 0x10);
        pair!(12, 0x20);
        rk[14] = _mm_xor_si128(prefix_xor(even), _mm_shuffle_epi32::<0xff>(_mm_aeskeygenassist_si128::<0x40>(odd)));
        rk
    }

    /// Each word of `k` XORed with all the words before it: how a round key's words chain.
    #[inline]
    #[target_feature(enable = "sse2")]
    fn prefix_xor(k: __m128i) -> __m128i {
        let k = _mm_xor_si128(k, _mm_slli_si128::<4>(k));
        let k = _mm_xor_si128(k, _mm_slli_si128::<4>(k));
        _mm_xor_si128(k, _mm_slli_si128::<4>(k))
    }

    /// Counter blocks made in registers: each 128-bit lane holds the counter little-endian as two
    /// 64-bit words (low, high), stepped by adding 4 to the low words, and a byte reversal per
    /// lane turns it into the big-endian block.
    #[target_feature(enable = "avx512f,avx512bw,vaes")]
    fn counter_chunks(rk: &[__m128i; 15], first: u128, bytes: &mut [u8]) {
        let k = rk.map(|r| _mm512_broadcast_i32x4(r));
        let (lo, hi) = (first as u64 as i64, (first >> 64) as u64 as i64);
        let mut counters =
            _mm512_set_epi64(hi, lo.wrapping_add(3), hi, lo.wrapping_add(2), hi, lo.wrapping_add(1), hi, lo);
        let step = _mm512_set_epi64(0, 4, 0, 4, 0, 4, 0, 4);
        let reverse = _mm512_broadcast_i32x4(_mm_set_epi8(0, 1, 2, 3, 4, 5, 6, 7, 8, 9, 10, 11, 12, 13, 14, 15));
        for chunk in bytes.chunks_exact_mut(CHUNK) {
            let p = chunk.as_mut_ptr().cast::<__m512i>();
            let mut s = [k[0]; 8];
            for b in s.iter_mut() {
                *b = _mm512_xor_si512(_mm512_shuffle_epi8(counters, reverse), k[0]);
                counters = _mm512_add_epi64(counters, step);
            }
            for key in &k[1..14] {
                s = s.map(|b| _mm512_aesenc_epi128(b, *key));
            }
            for (j, b) in s.into_iter().enumerate() {
                // SAFETY: `chunk` is CHUNK = 8 x 64 bytes; unaligned stores.
                unsafe { _mm512_storeu_si512(p.add(j), _mm512_aesenclast_epi128(b, k[14])) };
            }
        }
    }

    #[target_feature(enable = "avx512f,vaes")]
    fn encrypt_chunks(rk: &[__m128i; 15], bytes: &mut [u8]) {
        let k = rk.map(|r| _mm512_broadcast_i32x4(r));
        for chunk in bytes.chunks_exact_mut(CHUNK) {
            let p = chunk.as_mut_ptr().cast::<__m512i>();
            // SAFETY: `chunk` is CHUNK = 8 x 64 bytes; unaligned loads and stores.
            let mut s =
                [0, 1, 2, 3, 4, 5, 6, 7].map(|j| _mm512_xor_si512(unsafe { _mm512_loadu_si512(p.add(j)) }, k[0]));
            for key in &k[1..14] {
                s = s.map(|b| _mm512_aesenc_epi128(b, *key));
            }
            for (j, b) in s.into_iter().enumerate() {
                // SAFETY: as above.
                unsafe { _mm512_storeu_si512(p.add(j), _mm512_aesenclast_epi128(b, k[14])) };
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    use aes::cipher::{KeyIvInit, StreamCipher};
    use rand::Rng;

    /// The `ctr` crate's AES-256-CTR (128-bit big-endian counter), the reference construction.
    type ReferenceCtr = ctr::Ctr128BE<Aes256>;

    fn reference_keystream(key: [u8; 32], first_counter: u128, len: usize) -> Vec<u8> {
        let mut out = vec![0u8; len];
        ReferenceCtr::new(&key.into(), &first_counter.to_be_bytes().into()).apply_keystream(&mut out);
        out
    }

    #[test]
    fn it_is_the_aes_256_ctr_keystream() {
        // NIST SP 800-38A, F.5.5 (CTR-AES256.Encrypt): the first keystream block under the
        // standard key and initial counter block, recovered from the published plaintext and
        // ciphertext; our generator with that key and counter gives the same bytes.
        let hex = |s: &str| {
            (0..s.len()).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect::<Vec<u8>>()
        };
        let key: [u8; 32] = hex("603deb1015ca71be2b73aef0857d77811f352c073b6108d72d9810a30914dff4").try_into().unwrap();
        let iv: [u8; 16] = hex("f0f1f2f3f4f5f6f7f8f9fafbfcfdfeff").try_into().unwrap();
        let plain = hex("6bc1bee22e409f96e93d7e117393172a");
        let cipher = hex("601ec313775789a5b7a7f504bbf3d228");
        let mut ks = vec![0u8; 16];
        NoiseRng::with_counter(key, u128::from_be_bytes(iv)).fill_bytes(&mut ks);
        let expected: Vec<u8> = plain.iter().zip(&cipher).map(|(p, c)| p ^ c).collect();
        assert_eq!(ks, expected);
    }

    #[test]
    fn matches_the_ctr_crate_across_batches_and_counter_carries() {
        let mut seed = rand::rngs::StdRng::seed_from_u64(7);
        // Random keys; counters that start at zero, with a nonzero high half, just before the low
        // 64 bits carry into the high ones (the VAES path's general case), and just before the
        // 128-bit counter wraps (the `ctr` crate wraps too).
        for first_counter in [0, (7 << 64) + 12345, u64::MAX as u128 - 5, u128::MAX - 5] {
            let key: [u8; 32] = seed.random();
            let len = 2 * BUFFER + 1000;
            let reference = reference_keystream(key, first_counter, len);
            for vaes in [true, false] {
                let mut rng = NoiseRng::with_counter(key, first_counter);
                if !vaes {
                    // The `aes` crate's path, which CPUs without VAES take.
                    #[cfg(target_arch = "x86_64")]
                    rng.vaes.take();
                }
                let mut ours = vec![0u8; len];
                rng.fill_bytes(&mut ours);
                assert_eq!(ours, reference, "counter {first_counter:#x}, VAES path {vaes}");
            }
        }
    }

    #[test]
    fn every_read_continues_the_keystream_in_order() {
        // Interleaved word reads and bulk fills of random lengths, some crossing batch
        // boundaries, hand out the keystream once and in order.
        let key = [5u8; 32];
        let mut picks = rand::rngs::StdRng::seed_from_u64(3);
        let mut rng = NoiseRng::from_seed(key);
        let mut handed_out = Vec::new();
        while handed_out.len() < 3 * BUFFER {
            match picks.random_range(0..3) {
                0 => handed_out.extend(rng.next_u32().to_le_bytes()),
                1 => handed_out.extend(rng.next_u64().to_le_bytes()),
                _ => {
                    let mut bulk = vec![0u8; picks.random_range(0..BUFFER + 100)];
                    rng.fill_bytes(&mut bulk);
                    handed_out.extend(bulk);
                }
            }
        }
        assert_eq!(handed_out, reference_keystream(key, 0, handed_out.len()));
    }

    #[test]
    fn words_in_place_continue_the_keystream_in_order() {
        // Word-sized reads in place, mixed with copied reads, across batch boundaries.
        let key = [9u8; 32];
        let mut picks = rand::rngs::StdRng::seed_from_u64(4);
        let mut rng = NoiseRng::from_seed(key);
        let mut handed_out = Vec::new();
        while handed_out.len() < 3 * BUFFER {
            if picks.random_range(0..4) == 0 {
                handed_out.extend(rng.next_u32().to_le_bytes());
            } else {
                let want = picks.random_range(1..700);
                let words = rng.words_in_place(want);
                assert!(!words.is_empty() && words.len() <= 4 * want && words.len() % 4 == 0);
                handed_out.extend_from_slice(words);
            }
        }
        assert_eq!(handed_out, reference_keystream(key, 0, handed_out.len()));
        assert!(rng.words_in_place(0).is_empty());
        // A byte-sized read that leaves less than a word in the batch: those bytes are skipped.
        let mut rng = NoiseRng::from_seed(key);
        let mut bulk = vec![0u8; BUFFER - 3];
        rng.fill_bytes(&mut bulk);
        let next = rng.words_in_place(1).to_vec();
        assert_eq!(next, reference_keystream(key, 0, BUFFER + 4)[BUFFER..]);
    }

    /// Words per second against the `ctr` crate's AES-256-CTR (what this module used before) and
    /// ChaCha12 (before that), in the sampler's 256-word refills, same run, not asserted:
    /// `cargo test --release -p trustsplit-schemes --lib asymml::keystream::tests::timing -- --ignored --nocapture`
    #[test]
    #[ignore]
    fn timing_against_the_ctr_crate_and_chacha12() {
        let words = 17_600_000; // one VGG16 step's noise in the best AsymML setting
        let mut block = [0u32; 256]; // the sampler's refill
        let mut chacha = rand_chacha::ChaCha12Rng::seed_from_u64(1);
        let mut reference = ReferenceCtr::new(&[1u8; 32].into(), &[0u8; 16].into());
        let mut ours = NoiseRng::seed_from_u64(1);
        let mut best = [f64::INFINITY; 3];
        for _ in 0..5 {
            let start = std::time::Instant::now();
            (0..words / 256).for_each(|_| chacha.fill(&mut block[..]));
            best[0] = best[0].min(start.elapsed().as_secs_f64());
            std::hint::black_box(&block);
            let start = std::time::Instant::now();
            for _ in 0..words / 256 {
                // As the previous generator did: zero, then XOR the keystream in.
                let bytes: &mut [u8; 1024] = bytemuck_bytes(&mut block);
                bytes.fill(0);
                reference.apply_keystream(bytes);
            }
            best[1] = best[1].min(start.elapsed().as_secs_f64());
            std::hint::black_box(&block);
            let start = std::time::Instant::now();
            (0..words / 256).for_each(|_| ours.fill(&mut block[..]));
            best[2] = best[2].min(start.elapsed().as_secs_f64());
            std::hint::black_box(&block);
        }
        let [chacha, reference, ours] = best.map(|s| s * 1e3);
        println!(
            "{words} words: ChaCha12 {chacha:.1} ms, ctr crate AES-256-CTR {reference:.1} ms, ours {ours:.1} ms; \
             speed-up {:.2}x over the ctr crate, {:.2}x over ChaCha12",
            reference / ours,
            chacha / ours
        );
    }

    fn bytemuck_bytes(words: &mut [u32; 256]) -> &mut [u8; 1024] {
        // SAFETY: u32 has no padding and any byte pattern is a valid u32; u8's alignment is 1.
        unsafe { &mut *(words as *mut [u32; 256] as *mut [u8; 1024]) }
    }

    #[test]
    fn os_keyed_generators_differ() {
        let (mut a, mut b) = (NoiseRng::from_os().unwrap(), NoiseRng::from_os().unwrap());
        assert_ne!(a.next_u64(), b.next_u64());
    }
}
