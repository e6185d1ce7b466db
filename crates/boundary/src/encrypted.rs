//! An authenticated, encrypted channel: AES-256-GCM over any [`Channel`].
//!
//! Each direction has its own key and a 64-bit message counter used as the nonce, so a dropped,
//! replayed, reordered or altered message fails authentication. The frame tag is authenticated as
//! associated data. Keys come from an attested key exchange (see the enclave crate); this type only
//! uses them.

use crate::channel::{Channel, ChannelError, Frame};
use aes_gcm::aead::{Aead, KeyInit, Payload};
use aes_gcm::{Aes256Gcm, Nonce};

pub struct EncryptedChannel<C: Channel> {
    inner: C,
    send: Aes256Gcm,
    recv: Aes256Gcm,
    send_counter: u64,
    recv_counter: u64,
}

fn nonce(counter: u64) -> [u8; 12] {
    let mut n = [0u8; 12];
    n[4..].copy_from_slice(&counter.to_le_bytes());
    n
}

impl<C: Channel> EncryptedChannel<C> {
    /// `send_key` encrypts what this end sends; `recv_key` what it receives (the peer swaps them).
    pub fn new(inner: C, send_key: &[u8; 32], recv_key: &[u8; 32]) -> Self {
        EncryptedChannel {
            inner,
            send: Aes256Gcm::new(send_key.into()),
            recv: Aes256Gcm::new(recv_key.into()),
            send_counter: 0,
            recv_counter: 0,
        }
    }
}

impl<C: Channel> Channel for EncryptedChannel<C> {
    fn send(&mut self, tag: u16, payload: &[u8]) -> Result<(), ChannelError> {
        let n = nonce(self.send_counter);
        let aad = tag.to_le_bytes();
        let sealed = self
            .send
            .encrypt(Nonce::from_slice(&n), Payload { msg: payload, aad: &aad })
            .map_err(|_| ChannelError::Malformed { peer: self.peer(), reason: "encryption failed".into() })?;
        self.send_counter += 1;
        self.inner.send(tag, &sealed)
    }

    fn recv(&mut self) -> Result<Frame, ChannelError> {
        let f = self.inner.recv()?;
        let n = nonce(self.recv_counter);
        let aad = f.tag.to_le_bytes();
        let plain = self
            .recv
            .decrypt(Nonce::from_slice(&n), Payload { msg: &f.payload, aad: &aad })
            .map_err(|_| ChannelError::Authentication { peer: self.peer() })?;
        self.recv_counter += 1;
        Ok(Frame { tag: f.tag, payload: plain })
    }

    fn peer(&self) -> String {
        self.inner.peer()
    }
}
