//! Buffers kept from one use to the next, so that outputs which overwrite every value skip the
//! zeroing pass a fresh `vec![0.0; n]` costs (about a tenth of the enclave's time went to such
//! passes in the best VGG16 setting's profile).
//!
//! Only buffers whose last contents were already public go in: values the device returned and
//! residuals that were released. Whoever takes one must overwrite every value before reading any
//! (tests fill the kept buffers with NaN to check that they do).
//!
//! Tried and dropped:
//! - Keeping up to 8 buffers per length: with gradients in the clear the best VGG16 row got slower
//!   (102-110 against 95-99 ms), more buffers coming back than were taken and the surplus paged in
//!   afresh; capping the kept buffers by the demand fixed it (92-98 ms) (2026-12-02).

use std::collections::HashMap;

/// Kept buffers and the demand for them, per length. A buffer is kept only while fewer of its
/// length are kept than a pass takes (this pass or the one before): a surplus held here would
/// be memory the allocator cannot hand out again, and cost more in fresh pages than it saves.
#[derive(Default)]
pub(crate) struct Spares {
    by_len: HashMap<usize, Kept>,
}

#[derive(Default)]
struct Kept {
    buffers: Vec<Vec<f32>>,
    taken_this_pass: usize,
    taken_last_pass: usize,
}

impl Spares {
    /// Starts a pass: the takes counted so far become the previous pass's demand, and buffers of
    /// a length the previous pass did not take are dropped (evaluation batches, say, whose
    /// buffers would otherwise be held through the training passes between evaluations).
    pub(crate) fn begin_pass(&mut self) {
        self.by_len.retain(|_, kept| {
            kept.taken_last_pass = kept.taken_this_pass;
            kept.taken_this_pass = 0;
            kept.taken_last_pass > 0
        });
    }

    /// A buffer of `len` values with unspecified (public) contents, for an output that
    /// overwrites all of it; a zeroed one when none of that length is kept.
    pub(crate) fn take(&mut self, len: usize) -> Vec<f32> {
        let kept = self.by_len.entry(len).or_default();
        kept.taken_this_pass += 1;
        kept.buffers.pop().unwrap_or_else(|| vec![0.0; len])
    }

    /// Keeps `buffer` (whose contents are public) for a later [`Spares::take`], if a pass wants
    /// that many of its length; drops it otherwise.
    pub(crate) fn keep(&mut self, buffer: Vec<f32>) {
        if let Some(kept) = self.by_len.get_mut(&buffer.len()) {
            if kept.buffers.len() < kept.taken_this_pass.max(kept.taken_last_pass) {
                kept.buffers.push(buffer);
            }
        }
    }

    /// Fills every kept buffer with NaN, so a test sees any value a taker forgot to write.
    #[cfg(test)]
    pub(crate) fn poison(&mut self) {
        self.by_len.values_mut().flat_map(|k| &mut k.buffers).for_each(|b| b.fill(f32::NAN));
    }

    #[cfg(test)]
    pub(crate) fn count(&self) -> usize {
        self.by_len.values().map(|k| k.buffers.len()).sum()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_kept_buffer_is_handed_out_again_for_its_length_only() {
        let mut s = Spares::default();
        s.keep(vec![1.0; 7]);
        assert_eq!(s.count(), 0, "no pass has taken a buffer of 7: none is wanted");
        let _ = s.take(7);
        let b = vec![1.5f32; 7];
        let at = b.as_ptr();
        s.keep(b);
        s.keep(vec![2.5; 7]); // one take of 7 so far: a second buffer is not wanted
        assert_eq!(s.count(), 1);
        assert_eq!(s.take(6), vec![0.0; 6]); // another length: a fresh zeroed buffer
        let again = s.take(7);
        assert_eq!(again.as_ptr(), at);
        assert_eq!(s.take(7), vec![0.0; 7]); // none left
    }

    #[test]
    fn as_many_are_kept_as_the_last_pass_took() {
        let mut s = Spares::default();
        // A pass takes three buffers of 4 and gives back eight: three are kept.
        let taken: Vec<Vec<f32>> = (0..3).map(|_| s.take(4)).collect();
        for b in taken.into_iter().chain((0..5).map(|_| vec![0.0; 4])) {
            s.keep(b);
        }
        assert_eq!(s.count(), 3);
        s.begin_pass(); // the pass before took three: they stay for this one
        assert_eq!(s.count(), 3);
        s.begin_pass(); // the pass before took none: they are dropped
        assert_eq!(s.count(), 0);
        s.keep(vec![0.0; 4]);
        assert_eq!(s.count(), 0, "nothing of that length is wanted any more");
        let _ = s.take(4);
        s.keep(vec![0.0; 4]);
        assert_eq!(s.count(), 1);
    }
}
