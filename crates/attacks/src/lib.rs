//! The attacker's side of trustsplit: what an untrusted device saw, recorded as it saw it
//! ([`record`], read back by [`view`]), and the attacks run on that recording alone.
//!
//! Nothing here is trusted or trusting: the crate links the device's `Backend` trait to record a
//! worker's traffic, and the model code to train and run attacks. No enclave-side crate depends on
//! it.

pub mod grid;
pub mod inverse;
pub mod metrics;
pub mod optimise;
pub mod record;
pub mod view;

pub use record::{Entry, RecordedRequest, RecordedTensor, Recorder, RecordingBackend, Values};
pub use view::RecordedView;
