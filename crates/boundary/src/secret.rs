//! `Secret<T>`: trusted-side data; `Released<T>`: data that has left, with a transcript record.

use crate::transcript::{ReleaseInfo, Transcript};

/// A value that must not leave the trusted side.
///
/// It implements neither `Serialize` nor a `Debug` that shows its contents, so it cannot be sent
/// or logged by accident:
///
/// ```compile_fail
/// let s = trustsplit_boundary::Secret::new(vec![1.0f32]);
/// serde_json::to_string(&s).unwrap(); // Secret is not Serialize
/// ```
pub struct Secret<T>(T);

impl<T> Secret<T> {
    pub fn new(value: T) -> Self {
        Secret(value)
    }
    /// Read access for trusted-side computation.
    pub fn expose(&self) -> &T {
        &self.0
    }
    pub fn expose_mut(&mut self) -> &mut T {
        &mut self.0
    }
    /// Consumes the wrapper for trusted-side computation.
    pub fn into_exposed(self) -> T {
        self.0
    }
}

impl<T> std::fmt::Debug for Secret<T> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str("Secret(<redacted>)")
    }
}

/// How many bytes a released value occupies on the wire, and those bytes (little-endian, as every
/// channel of the project sends them) for a transcript that records digests.
pub trait WireSize {
    fn wire_bytes(&self) -> u64;
    /// Feeds the value's wire bytes to `sink`, in order, in one or more pieces.
    fn feed_wire_bytes(&self, sink: &mut dyn FnMut(&[u8]));
}

/// Feeds fixed-size little-endian words to `sink` through a small buffer.
fn feed_words<const N: usize, W: Copy>(words: &[W], to_le: impl Fn(W) -> [u8; N], sink: &mut dyn FnMut(&[u8])) {
    let mut buf = Vec::with_capacity(4096 * N);
    for chunk in words.chunks(4096) {
        buf.clear();
        buf.extend(chunk.iter().flat_map(|&w| to_le(w)));
        sink(&buf);
    }
}

impl WireSize for [f32] {
    fn wire_bytes(&self) -> u64 {
        std::mem::size_of_val(self) as u64
    }
    fn feed_wire_bytes(&self, sink: &mut dyn FnMut(&[u8])) {
        feed_words(self, f32::to_le_bytes, sink)
    }
}
impl WireSize for Vec<f32> {
    fn wire_bytes(&self) -> u64 {
        self.as_slice().wire_bytes()
    }
    fn feed_wire_bytes(&self, sink: &mut dyn FnMut(&[u8])) {
        self.as_slice().feed_wire_bytes(sink)
    }
}
/// A borrowed value is released without copying it (e.g. a model's public weights).
impl<T: WireSize + ?Sized> WireSize for &T {
    fn wire_bytes(&self) -> u64 {
        (**self).wire_bytes()
    }
    fn feed_wire_bytes(&self, sink: &mut dyn FnMut(&[u8])) {
        (**self).feed_wire_bytes(sink)
    }
}
impl WireSize for [u64] {
    fn wire_bytes(&self) -> u64 {
        std::mem::size_of_val(self) as u64
    }
    fn feed_wire_bytes(&self, sink: &mut dyn FnMut(&[u8])) {
        feed_words(self, u64::to_le_bytes, sink)
    }
}
impl WireSize for Vec<u64> {
    fn wire_bytes(&self) -> u64 {
        self.as_slice().wire_bytes()
    }
    fn feed_wire_bytes(&self, sink: &mut dyn FnMut(&[u8])) {
        self.as_slice().feed_wire_bytes(sink)
    }
}
impl WireSize for Vec<u8> {
    fn wire_bytes(&self) -> u64 {
        self.len() as u64
    }
    fn feed_wire_bytes(&self, sink: &mut dyn FnMut(&[u8])) {
        sink(self)
    }
}

/// The SHA-256 of a value's wire bytes, in hex: how a transcript line and an untrusted side's
/// recording of the same value are matched.
pub fn wire_digest<T: WireSize + ?Sized>(value: &T) -> String {
    let mut ctx = ring::digest::Context::new(&ring::digest::SHA256);
    value.feed_wire_bytes(&mut |bytes| ctx.update(bytes));
    ctx.finish().as_ref().iter().map(|b| format!("{b:02x}")).collect()
}

/// A value that has been released across the trust boundary. Constructing one records it.
pub struct Released<T> {
    value: T,
}

impl<T: WireSize> Released<T> {
    /// Releases `value`: appends `info` (with the value's size) to `transcript`. Scheme release
    /// functions are the only callers; each states in `info.reason` why the release is safe.
    pub fn new(transcript: &Transcript, info: ReleaseInfo, value: T) -> Self {
        transcript.record_release(info, &value);
        Released { value }
    }
}

impl<T> Released<T> {
    pub fn get(&self) -> &T {
        &self.value
    }
    pub fn into_inner(self) -> T {
        self.value
    }
}
