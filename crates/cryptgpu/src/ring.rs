//! The ring Z_2^64 and the fixed-point numbers it carries.
//!
//! Ring elements are `u64` with wrapping arithmetic; a fixed-point number `v` with `f` fractional
//! bits is the ring element `round(v * 2^f)` (two's complement for negatives). A product of two
//! such numbers carries `2f` fractional bits until it is truncated by `2^f` (see
//! [`crate::arith`]).

/// The fixed-point encoding: how many of the 64 bits are fractional.
#[derive(Clone, Copy, Debug, PartialEq, Eq)]
pub struct FixedPoint {
    pub frac_bits: u32,
}

/// CryptGPU's default (CrypTen uses 16).
pub const DEFAULT_FRAC_BITS: u32 = 20;

impl Default for FixedPoint {
    fn default() -> Self {
        FixedPoint { frac_bits: DEFAULT_FRAC_BITS }
    }
}

impl FixedPoint {
    /// `frac_bits` in 9..=24: fewer leave too little precision for training (and `exp` needs 9),
    /// more make a product's truncation fail too often (with probability `|value| 2^(2f-64)` per
    /// element: `2^-16` at 24 bits for values near 1; `crate::arith`).
    pub fn new(frac_bits: u32) -> Result<FixedPoint, String> {
        if !(9..=24).contains(&frac_bits) {
            return Err(format!(
                "fixed-point fractional bits must be in 9..=24 (CryptGPU uses 20, CrypTen 16), got {frac_bits}"
            ));
        }
        Ok(FixedPoint { frac_bits })
    }

    pub fn scale(&self) -> f64 {
        (1u64 << self.frac_bits) as f64
    }

    /// The ring element of `v` (rounded to nearest); an error names a value that is not finite or
    /// does not fit in 63 bits.
    pub fn encode(&self, v: f64) -> Result<u64, String> {
        let scaled = (v * self.scale()).round();
        if !scaled.is_finite() || scaled.abs() >= 2f64.powi(62) {
            return Err(format!("value {v} cannot be encoded with {} fractional bits", self.frac_bits));
        }
        Ok(scaled as i64 as u64)
    }

    pub fn encode_all(&self, values: &[f32]) -> Result<Vec<u64>, String> {
        values.iter().map(|&v| self.encode(v as f64)).collect()
    }

    pub fn decode(&self, r: u64) -> f64 {
        r as i64 as f64 / self.scale()
    }

    pub fn decode_all(&self, ring: &[u64]) -> Vec<f32> {
        ring.iter().map(|&r| self.decode(r) as f32).collect()
    }
}

/// `a + b` elementwise, in place.
pub fn add_assign(a: &mut [u64], b: &[u64]) {
    assert_eq!(a.len(), b.len());
    a.iter_mut().zip(b).for_each(|(x, y)| *x = x.wrapping_add(*y));
}

/// `a - b` elementwise, in place.
pub fn sub_assign(a: &mut [u64], b: &[u64]) {
    assert_eq!(a.len(), b.len());
    a.iter_mut().zip(b).for_each(|(x, y)| *x = x.wrapping_sub(*y));
}

pub fn add(a: &[u64], b: &[u64]) -> Vec<u64> {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| x.wrapping_add(*y)).collect()
}

pub fn sub(a: &[u64], b: &[u64]) -> Vec<u64> {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| x.wrapping_sub(*y)).collect()
}

/// `a * b` elementwise.
pub fn mul(a: &[u64], b: &[u64]) -> Vec<u64> {
    assert_eq!(a.len(), b.len());
    a.iter().zip(b).map(|(x, y)| x.wrapping_mul(*y)).collect()
}

/// `a * c` for a public ring constant.
pub fn scale(a: &[u64], c: u64) -> Vec<u64> {
    a.iter().map(|x| x.wrapping_mul(c)).collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn encoding_round_trips_within_half_a_unit() {
        let fp = FixedPoint::default();
        for v in [-3.75f64, -1e-6, 0.0, 0.3, 1234.5678, -((1u64 << 40) as f64)] {
            let back = fp.decode(fp.encode(v).unwrap());
            assert!((back - v).abs() <= 0.5 / fp.scale(), "{v} -> {back}");
        }
        assert!(fp.encode(f64::NAN).is_err());
        assert!(fp.encode(1e15).is_err());
        assert!(FixedPoint::new(40).is_err());
    }
}
