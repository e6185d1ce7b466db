//! The parties' random streams: AES-256 in counter mode (AsymML's keystream, the same
//! construction as NIST's CTR_DRBG core) under keys from the operating system's CSPRNG.
//!
//! Each pair of neighbouring parties shares one key ([`crate::party::Party::connect`] sends it
//! over the link between them), so both draw the same stream without talking: that is what makes
//! zero sharings and the truncation's mask free of communication. The streams stay in step because
//! every protocol draws the same counts, in the same order, on both sides of a pair.

use rand::{RngCore, SeedableRng};
use trustsplit_schemes::asymml::keystream::NoiseRng;

/// A key for a stream.
pub type Key = [u8; 32];

pub struct Prg(NoiseRng);

impl Prg {
    pub fn from_key(key: Key) -> Prg {
        Prg(NoiseRng::from_seed(key))
    }

    /// A fresh key from the operating system's CSPRNG.
    pub fn os_key() -> Result<Key, String> {
        use rand::TryRngCore;
        let mut key = [0u8; 32];
        rand::rngs::OsRng
            .try_fill_bytes(&mut key)
            .map_err(|e| format!("the operating system's random source failed: {e}"))?;
        Ok(key)
    }

    /// The next `n` uniform ring elements.
    pub fn ring(&mut self, n: usize) -> Vec<u64> {
        let mut out = vec![0u64; n];
        self.fill(&mut out);
        out
    }

    pub fn fill(&mut self, out: &mut [u64]) {
        self.0.fill_bytes(bytemuck::cast_slice_mut(out));
    }
}
