//! The trust boundary.
//!
//! Data that belongs to the trusted side is held as [`Secret`], which cannot be serialised or
//! printed. The only way out is a [`Released`] value, and the only way to make one is
//! [`Released::new`], which appends a record to the [`Transcript`]: what left, from which layer,
//! under which scheme, how many bytes, and why that is acceptable. Everything crosses the boundary
//! through a [`Channel`]: framed, size-limited, versioned, and encrypted ([`EncryptedChannel`])
//! whenever it carries secrets between machines.

pub mod channel;
pub mod encrypted;
pub mod link;
pub mod secret;
pub mod transcript;
mod wire;

pub use channel::{printable, Channel, ChannelError, ChannelOptions, Frame, InProcessChannel, TcpChannel};
pub use encrypted::EncryptedChannel;
pub use link::{KeyPair, Link, LinkPolicy, PublicKey};
pub use secret::{wire_digest, Released, Secret, WireSize};
pub use transcript::{Direction, ReleaseInfo, ReleaseRecord, Transcript, TranscriptSummary};
