//! Buffers kept from one use to the next, so that outputs which overwrite every value skip the
//! zeroing pass a fresh `vec![0.0; n]` costs (about a tenth of the enclave's time went to such
//! passes in the best VGG16 setting's profile).
//!
//! Only buffers whose last contents were already public go in: values the device returned and
//! residuals that were released. Whoever takes one must overwrite every value before reading any
//! (tests fill the kept buffers with NaN to check that they do).

use std::collections::HashMap;

/// Buffers kept per length; beyond this many of one length, returned buffers are dropped (the
/// same lengths come back every step, so a few per length cover a step's layers).
const KEPT_PER_LENGTH: usize = 8;

#[derive(Default)]
pub(crate) struct Spares {
    by_len: HashMap<usize, Vec<Vec<f32>>>,
}

impl Spares {
    /// A buffer of `len` values with unspecified (public) contents, for an output that
    /// overwrites all of it; a zeroed one when none of that length is kept.
    pub(crate) fn take(&mut self, len: usize) -> Vec<f32> {
        self.by_len.get_mut(&len).and_then(Vec::pop).unwrap_or_else(|| vec![0.0; len])
    }

    /// Keeps `buffer` (whose contents are public) for a later [`Spares::take`].
    pub(crate) fn keep(&mut self, buffer: Vec<f32>) {
        let kept = self.by_len.entry(buffer.len()).or_default();
        if kept.len() < KEPT_PER_LENGTH && !buffer.is_empty() {
            kept.push(buffer);
        }
    }

    /// Fills every kept buffer with NaN, so a test sees any value a taker forgot to write.
    #[cfg(test)]
    pub(crate) fn poison(&mut self) {
        self.by_len.values_mut().flatten().for_each(|b| b.fill(f32::NAN));
    }

    #[cfg(test)]
    pub(crate) fn count(&self) -> usize {
        self.by_len.values().map(Vec::len).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kept_buffer_is_handed_out_again_for_its_length_only() {
        let mut s = Spares::default();
        let b = vec![1.5f32; 7];
        let at = b.as_ptr();
        s.keep(b);
        assert_eq!(s.take(6), vec![0.0; 6]); // another length: a fresh zeroed buffer
        let again = s.take(7);
        assert_eq!(again.as_ptr(), at);
        assert_eq!(s.take(7), vec![0.0; 7]); // none left
        for _ in 0..KEPT_PER_LENGTH + 3 {
            s.keep(vec![2.0; 3]);
        }
        assert_eq!(s.count(), KEPT_PER_LENGTH);
    }
}
