//! `plaintext`: no split. The numerical reference every scheme is compared with.
//!
//! Releases: nothing. Nothing is accounted either: this is an ordinary training loop.

use crate::placement::Trusted;
use crate::{RunnerError, SchemeKind, SplitRunner};
use std::sync::Arc;
use trustsplit_boundary::Transcript;

pub fn runner(transcript: Arc<Transcript>) -> Result<SplitRunner, RunnerError> {
    SplitRunner::new(SchemeKind::Plaintext, Box::new(Trusted), None, transcript, None)
}
