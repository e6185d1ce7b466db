//! An authenticated, encrypted channel: AES-256-GCM over any [`Channel`].
//!
//! Each direction has its own key and a 64-bit message counter used as the nonce, so a dropped,
//! replayed, reordered or altered message fails authentication, and after one has failed the
//! channel refuses every later frame it receives. The frame tag is authenticated as associated data. Keys come from an attested key exchange (see the enclave crate); this type only
//! uses them.

use crate::channel::{Channel, ChannelError, Frame};
use ring::aead::{Aad, LessSafeKey, Nonce, UnboundKey, AES_256_GCM};

pub struct EncryptedChannel<C: Channel> {
    inner: C,
    send: LessSafeKey,
    recv: LessSafeKey,
    send_counter: u64,
    recv_counter: u64,
    /// Set when a received frame failed to authenticate.
    broken: bool,
}

/// The nonce for a message counter; each direction has its own key, so counters never repeat a
/// nonce under one key.
fn nonce(counter: u64) -> Nonce {
    let mut n = [0u8; 12];
    n[4..].copy_from_slice(&counter.to_le_bytes());
    Nonce::assume_unique_for_key(n)
}

fn key(bytes: &[u8; 32]) -> LessSafeKey {
    // ring rejects only keys of the wrong length, and this one is 32 bytes by type.
    LessSafeKey::new(UnboundKey::new(&AES_256_GCM, bytes).expect("AES-256-GCM takes a 32-byte key"))
}

impl<C: Channel> std::fmt::Debug for EncryptedChannel<C> {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(
            f,
            "EncryptedChannel {{ peer: {}, sent: {}, received: {} }}",
            self.peer(),
            self.send_counter,
            self.recv_counter
        )
    }
}

impl<C: Channel> EncryptedChannel<C> {
    /// `send_key` encrypts what this end sends; `recv_key` what it receives (the peer swaps them).
    pub fn new(inner: C, send_key: &[u8; 32], recv_key: &[u8; 32]) -> Self {
        EncryptedChannel {
            inner,
            send: key(send_key),
            recv: key(recv_key),
            send_counter: 0,
            recv_counter: 0,
            broken: false,
        }
    }
}

impl<C: Channel> Channel for EncryptedChannel<C> {
    fn send(&mut self, tag: u16, payload: &[u8]) -> Result<(), ChannelError> {
        // Sending stays possible after a forged message arrived (this direction's key and counter
        // are untouched), so a receiver can still tell its peer why it stops.
        let mut sealed = Vec::with_capacity(payload.len() + AES_256_GCM.tag_len());
        sealed.extend_from_slice(payload);
        self.send
            .seal_in_place_append_tag(nonce(self.send_counter), Aad::from(tag.to_le_bytes()), &mut sealed)
            .map_err(|_| ChannelError::Malformed { peer: self.peer(), reason: "encryption failed".into() })?;
        // The counter moves on once the frame is out: a send the inner channel refused without
        // sending (too large) leaves both ends in step.
        self.inner.send(tag, &sealed)?;
        self.send_counter += 1;
        Ok(())
    }

    fn recv(&mut self) -> Result<Frame, ChannelError> {
        self.recv_limited(usize::MAX)
    }

    fn recv_limited(&mut self, max_payload: usize) -> Result<Frame, ChannelError> {
        if self.broken {
            let cause = "a message failed authentication".to_string();
            return Err(ChannelError::Broken { peer: self.peer(), cause });
        }
        let sealed_max = max_payload.saturating_add(AES_256_GCM.tag_len());
        let Frame { tag, mut payload } = self.inner.recv_limited(sealed_max)?;
        let opened = self.recv.open_in_place(nonce(self.recv_counter), Aad::from(tag.to_le_bytes()), &mut payload);
        let Ok(plain) = opened else {
            self.broken = true;
            return Err(ChannelError::Authentication { peer: self.peer() });
        };
        let plain_len = plain.len();
        payload.truncate(plain_len);
        self.recv_counter += 1;
        Ok(Frame { tag, payload })
    }

    fn peer(&self) -> String {
        self.inner.peer()
    }
}
