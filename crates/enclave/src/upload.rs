//! The data owner's encrypted upload into an attested enclave.
//!
//! The owner must not send a byte of data until it knows (a) the peer is the code it audited, on a
//! genuine TEE, and (b) the key it encrypts to belongs to that code and not to whoever relays the
//! messages. The protocol, over any [`Channel`]:
//!
//! 1. owner → enclave [`TAG_HELLO`]: a fresh X25519 public key and a 32-byte nonce.
//! 2. enclave → owner [`TAG_ATTEST`]: a fresh X25519 public key and a quote whose report data is
//!    [`report_data_for`]: SHA-256("trustsplit-upload-v1" || enclave key || owner key || nonce),
//!    then the channel binding: the handshake hash of the link the protocol runs over
//!    ([`trustsplit_boundary::Link::handshake_hash`]; zeros over no link). The nonce makes the
//!    quote fresh; the hash binds the enclave's key to it; the binding ties it to this very link,
//!    whose other end authenticated as the data owner, so nobody can relay it into another.
//! 3. The owner verifies the quote against its policy and recomputes the report data. On any
//!    failure it drops the channel having sent nothing but step 1. Otherwise both sides derive one
//!    AES-256-GCM key per direction with HKDF-SHA256 (salt: the transcript hash, input: the X25519
//!    shared secret) and continue over an [`EncryptedChannel`]:
//!    [`TAG_HEADER`] (JSON: file names and sizes, total) → [`TAG_HEADER_OK`] or [`TAG_ERROR`];
//!    [`TAG_CHUNK`]s of at most [`CHUNK_BYTES`], each within one file, files in order;
//!    [`TAG_DONE`] with SHA-256(header bytes || all file bytes).
//! 4. enclave → owner [`TAG_OK`], or [`TAG_ERROR`] with a reason. The encrypted channel stays open:
//!    the enclave reports on the training to the owner over it ([`TAG_REPORT`] lines, then
//!    [`TAG_FINISHED`] or [`TAG_ERROR`]), so the untrusted host sees none of it.
//!
//! The enclave bounds everything it is sent (header size, number of files, name lengths, total
//! bytes, each chunk) before allocating. This protocol does not authenticate the owner; the link
//! it runs over does (the enclave accepts only the owner's key).

use crate::attestation::{
    hex, AttestationError, AttestationProvider, Policy, Quote, QuoteKind, QuoteVerifier, VerifiedReport,
};
use hkdf::Hkdf;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use trustsplit_boundary::{Channel, ChannelError, EncryptedChannel};
use x25519_dalek::{PublicKey, SharedSecret, StaticSecret};

/// Step 1, in clear: owner key (32) || nonce (32).
pub const TAG_HELLO: u16 = 0x0100;
/// Step 2, in clear: enclave key (32) || quote kind (1) || quote.
pub const TAG_ATTEST: u16 = 0x0101;
/// Encrypted from here on. The dataset header (JSON).
pub const TAG_HEADER: u16 = 0x0102;
/// The enclave accepts the header; the owner may send data.
pub const TAG_HEADER_OK: u16 = 0x0103;
/// Up to [`CHUNK_BYTES`] bytes of the current file.
pub const TAG_CHUNK: u16 = 0x0104;
/// SHA-256 of the header bytes followed by all file bytes.
pub const TAG_DONE: u16 = 0x0105;
/// The enclave received and checked everything.
pub const TAG_OK: u16 = 0x0106;
/// The enclave refused, or training failed; payload: the reason (UTF-8).
pub const TAG_ERROR: u16 = 0x0107;
/// After the upload: one line about the training, for the owner (UTF-8).
pub const TAG_REPORT: u16 = 0x0108;
/// The training finished; payload: its summary (JSON).
pub const TAG_FINISHED: u16 = 0x0109;

/// Largest chunk sent or accepted.
pub const CHUNK_BYTES: usize = 4 << 20;
/// Most files in one upload.
pub const MAX_FILES: usize = 100_000;
/// Longest file name, in bytes.
pub const MAX_NAME_BYTES: usize = 1024;
/// Largest header accepted (bounds JSON parsing, independent of the channel's frame limit).
const MAX_HEADER_BYTES: usize = 16 << 20;

/// Largest attestation message the owner reads (a DCAP quote with its certificate chain is a few
/// KiB), before the quote is checked.
const MAX_ATTEST_BYTES: usize = 256 << 10;
/// Largest refusal or acknowledgement read.
const MAX_REASON_BYTES: usize = 64 << 10;

const DOMAIN: &[u8] = b"trustsplit-upload-v1";

/// Receives one frame of tag `expected` of at most `max` bytes (a larger one is refused before it
/// is read, where the channel can tell).
fn recv_tag_limited<C: Channel>(ch: &mut C, expected: u16, max: usize) -> Result<Vec<u8>, UploadError> {
    let f = ch.recv_limited(max)?;
    if f.tag != expected {
        return Err(ChannelError::UnexpectedTag { peer: ch.peer(), expected, found: f.tag }.into());
    }
    Ok(f.payload)
}

/// One file of a dataset. Names are labels; this module never uses them as paths.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct UploadedFile {
    pub name: String,
    pub bytes: Vec<u8>,
}

impl From<AttestationError> for UploadError {
    fn from(e: AttestationError) -> Self {
        UploadError::Attestation(e)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum UploadError {
    #[error(transparent)]
    Channel(#[from] ChannelError),
    // Not `#[from]`: that would also make the cause the error's `source`, and reports that print
    // the chain would show it twice.
    #[error("attestation failed: {0}")]
    Attestation(AttestationError),
    #[error(
        "the quote does not bind this session's key exchange (report data {found}, expected {expected}); \
         someone between the owner and the enclave may have replaced the enclave's public key"
    )]
    ReportDataMismatch { expected: String, found: String },
    #[error("{peer}: key exchange gave a non-contributory shared secret (low-order public key)")]
    WeakKey { peer: String },
    #[error("{peer}: protocol violation: {reason}")]
    Protocol { peer: String, reason: String },
    #[error("upload refused: {0}")]
    Refused(String),
    #[error("enclave: {0}")]
    RejectedByEnclave(String),
    #[error("the OS random number generator failed: {0}")]
    Random(String),
}

#[derive(Serialize, Deserialize)]
struct Header {
    files: Vec<FileEntry>,
    total_bytes: u64,
}

#[derive(Serialize, Deserialize)]
struct FileEntry {
    name: String,
    len: u64,
}

fn random_32() -> Result<[u8; 32], UploadError> {
    let mut b = [0u8; 32];
    getrandom::fill(&mut b).map_err(|e| UploadError::Random(e.to_string()))?;
    Ok(b)
}

fn transcript_hash(enclave_pub: &[u8; 32], owner_pub: &[u8; 32], nonce: &[u8; 32]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(DOMAIN);
    h.update(enclave_pub);
    h.update(owner_pub);
    h.update(nonce);
    h.finalize().into()
}

/// The report data an enclave must put in its quote for this session: the transcript hash, then
/// the channel binding (the link's handshake hash).
pub fn report_data_for(enclave_pub: &[u8; 32], owner_pub: &[u8; 32], nonce: &[u8; 32], binding: &[u8; 32]) -> [u8; 64] {
    let mut rd = [0u8; 64];
    rd[..32].copy_from_slice(&transcript_hash(enclave_pub, owner_pub, nonce));
    rd[32..].copy_from_slice(binding);
    rd
}

/// `(owner→enclave, enclave→owner)` keys. Distinct keys per direction, so neither side's counter
/// nonces can collide with the other's.
fn derive_keys(shared: &SharedSecret, transcript: &[u8; 32]) -> ([u8; 32], [u8; 32]) {
    let hk = Hkdf::<Sha256>::new(Some(transcript), shared.as_bytes());
    let (mut o2e, mut e2o) = ([0u8; 32], [0u8; 32]);
    hk.expand(b"trustsplit-upload-v1 owner->enclave", &mut o2e).expect("32 bytes is a valid HKDF length");
    hk.expand(b"trustsplit-upload-v1 enclave->owner", &mut e2o).expect("32 bytes is a valid HKDF length");
    (o2e, e2o)
}

fn shared_secret(secret: &StaticSecret, theirs: &[u8; 32], peer: String) -> Result<SharedSecret, UploadError> {
    let shared = secret.diffie_hellman(&PublicKey::from(*theirs));
    // An all-zero secret means the peer sent a low-order point: the "shared" key would be public.
    if !shared.was_contributory() {
        return Err(UploadError::WeakKey { peer });
    }
    Ok(shared)
}

/// The owner's half of steps 1-3: returns the encrypted channel and what the quote proved. On any
/// refusal the channel is dropped (closed) having carried only the hello.
pub fn owner_handshake<C: Channel>(
    mut ch: C,
    binding: &[u8; 32],
    verifier: &dyn QuoteVerifier,
    policy: &Policy,
    now_unix: u64,
) -> Result<(EncryptedChannel<C>, VerifiedReport), UploadError> {
    let secret = StaticSecret::from(random_32()?);
    let owner_pub = PublicKey::from(&secret).to_bytes();
    let nonce = random_32()?;
    ch.send(TAG_HELLO, &[owner_pub, nonce].concat())?;

    let msg = recv_tag_limited(&mut ch, TAG_ATTEST, MAX_ATTEST_BYTES)?;
    let protocol = |reason: String| UploadError::Protocol { peer: ch.peer(), reason };
    if msg.len() < 33 {
        return Err(protocol(format!("attestation message of {} bytes, need at least 33", msg.len())));
    }
    let enclave_pub: [u8; 32] = msg[..32].try_into().expect("32 bytes");
    let kind = QuoteKind::from_byte(msg[32]).ok_or_else(|| protocol(format!("unknown quote kind {}", msg[32])))?;
    let quote = Quote { bytes: msg[33..].to_vec(), kind };

    let report = verifier.verify(&quote, policy, now_unix)?;
    let expected = report_data_for(&enclave_pub, &owner_pub, &nonce, binding);
    if report.report_data != expected {
        return Err(UploadError::ReportDataMismatch { expected: hex(&expected), found: hex(&report.report_data) });
    }
    let shared = shared_secret(&secret, &enclave_pub, ch.peer())?;
    let (o2e, e2o) = derive_keys(&shared, &transcript_hash(&enclave_pub, &owner_pub, &nonce));
    Ok((EncryptedChannel::new(ch, &o2e, &e2o), report))
}

/// The enclave's half of steps 1-3: answers the hello with a quote over a fresh key and returns the
/// encrypted channel.
pub fn enclave_handshake<C: Channel>(
    mut ch: C,
    binding: &[u8; 32],
    provider: &dyn AttestationProvider,
) -> Result<EncryptedChannel<C>, UploadError> {
    let hello = recv_tag_limited(&mut ch, TAG_HELLO, 64)?;
    if hello.len() != 64 {
        let reason = format!("hello of {} bytes, expected 64 (key and nonce)", hello.len());
        return Err(UploadError::Protocol { peer: ch.peer(), reason });
    }
    let owner_pub: [u8; 32] = hello[..32].try_into().expect("32 bytes");
    let nonce: [u8; 32] = hello[32..].try_into().expect("32 bytes");

    let secret = StaticSecret::from(random_32()?);
    let enclave_pub = PublicKey::from(&secret).to_bytes();
    let shared = shared_secret(&secret, &owner_pub, ch.peer())?;
    let quote = provider.quote(report_data_for(&enclave_pub, &owner_pub, &nonce, binding))?;

    let mut msg = Vec::with_capacity(33 + quote.bytes.len());
    msg.extend_from_slice(&enclave_pub);
    msg.push(quote.kind.to_byte());
    msg.extend_from_slice(&quote.bytes);
    ch.send(TAG_ATTEST, &msg)?;

    let (o2e, e2o) = derive_keys(&shared, &transcript_hash(&enclave_pub, &owner_pub, &nonce));
    Ok(EncryptedChannel::new(ch, &e2o, &o2e))
}

/// Uploads `files` to the enclave at the other end of `ch` (a link whose handshake hash is
/// `binding`), after verifying its quote with `verifier` and `policy` at time `now_unix`. Returns
/// what the quote proved once the enclave has confirmed receipt, and the encrypted channel, over
/// which the enclave then reports on the training.
pub fn owner_upload<C: Channel>(
    ch: C,
    binding: &[u8; 32],
    verifier: &dyn QuoteVerifier,
    policy: &Policy,
    files: &[UploadedFile],
    now_unix: u64,
) -> Result<(VerifiedReport, EncryptedChannel<C>), UploadError> {
    let (mut ch, report) = owner_handshake(ch, binding, verifier, policy, now_unix)?;
    let header = Header {
        files: files.iter().map(|f| FileEntry { name: f.name.clone(), len: f.bytes.len() as u64 }).collect(),
        total_bytes: files.iter().map(|f| f.bytes.len() as u64).sum(),
    };
    let header = serde_json::to_vec(&header).expect("the header serialises");
    let mut digest = Sha256::new();
    digest.update(&header);
    ch.send(TAG_HEADER, &header)?;
    expect_reply(&mut ch, TAG_HEADER_OK)?;

    for f in files {
        for chunk in f.bytes.chunks(CHUNK_BYTES) {
            digest.update(chunk);
            send_or_explain(&mut ch, TAG_CHUNK, chunk)?;
        }
    }
    send_or_explain(&mut ch, TAG_DONE, &digest.finalize())?;
    expect_reply(&mut ch, TAG_OK)?;
    Ok((report, ch))
}

/// Waits for `ok_tag` (empty payload) or the enclave's error.
fn expect_reply<C: Channel>(ch: &mut C, ok_tag: u16) -> Result<(), UploadError> {
    let f = ch.recv_limited(MAX_REASON_BYTES)?;
    match f.tag {
        TAG_ERROR => Err(UploadError::RejectedByEnclave(trustsplit_boundary::printable(&f.payload))),
        t if t == ok_tag && f.payload.is_empty() => Ok(()),
        t => {
            Err(UploadError::Protocol { peer: ch.peer(), reason: format!("expected tag {ok_tag:#06x}, got {t:#06x}") })
        }
    }
}

/// Sends; if that fails because the enclave gave up, reports the enclave's reason when it sent one.
fn send_or_explain<C: Channel>(ch: &mut C, tag: u16, payload: &[u8]) -> Result<(), UploadError> {
    ch.send(tag, payload).map_err(|e| match ch.recv_limited(MAX_REASON_BYTES) {
        Ok(f) if f.tag == TAG_ERROR => UploadError::RejectedByEnclave(trustsplit_boundary::printable(&f.payload)),
        _ => e.into(),
    })
}

/// The enclave's side: attests, then receives at most `max_total_bytes` of files and checks their
/// digest. The owner is told the outcome (`TAG_OK`, or `TAG_ERROR` with the reason).
pub fn enclave_receive<C: Channel>(
    ch: C,
    binding: &[u8; 32],
    provider: &dyn AttestationProvider,
    max_total_bytes: u64,
) -> Result<(Vec<UploadedFile>, EncryptedChannel<C>), UploadError> {
    let mut ch = enclave_handshake(ch, binding, provider)?;
    match receive_dataset(&mut ch, max_total_bytes) {
        Ok(files) => {
            ch.send(TAG_OK, &[])?;
            Ok((files, ch))
        }
        Err(e) => {
            // Best effort: the owner may already be gone.
            let _ = ch.send(TAG_ERROR, e.to_string().as_bytes());
            Err(e)
        }
    }
}

fn receive_dataset<C: Channel>(ch: &mut C, max_total_bytes: u64) -> Result<Vec<UploadedFile>, UploadError> {
    let protocol = |ch: &C, reason: String| UploadError::Protocol { peer: ch.peer(), reason };
    let header_bytes = recv_tag_limited(ch, TAG_HEADER, MAX_HEADER_BYTES)?;
    if header_bytes.len() > MAX_HEADER_BYTES {
        return Err(UploadError::Refused(format!(
            "header of {} bytes exceeds the limit of {MAX_HEADER_BYTES} bytes",
            header_bytes.len()
        )));
    }
    let header: Header =
        serde_json::from_slice(&header_bytes).map_err(|e| protocol(ch, format!("unreadable header: {e}")))?;
    let n = header.files.len();
    if n > MAX_FILES {
        return Err(UploadError::Refused(format!("header announces {n} files, more than the limit of {MAX_FILES}")));
    }
    if let Some(f) = header.files.iter().find(|f| f.name.len() > MAX_NAME_BYTES) {
        return Err(UploadError::Refused(format!(
            "a file name of {} bytes exceeds the limit of {MAX_NAME_BYTES} bytes",
            f.name.len()
        )));
    }
    let sum = header.files.iter().try_fold(0u64, |acc, f| acc.checked_add(f.len));
    if sum != Some(header.total_bytes) {
        return Err(protocol(
            ch,
            format!("header announces {} bytes but its file sizes do not add up to that", header.total_bytes),
        ));
    }
    let total = header.total_bytes;
    if total > max_total_bytes {
        return Err(UploadError::Refused(format!(
            "header announces {total} bytes in {n} files, more than the limit of {max_total_bytes} bytes"
        )));
    }
    ch.send(TAG_HEADER_OK, &[])?;

    let mut digest = Sha256::new();
    digest.update(&header_bytes);
    let mut files: Vec<UploadedFile> =
        header.files.iter().map(|f| UploadedFile { name: f.name.clone(), bytes: Vec::new() }).collect();
    let (mut current, mut received) = (0usize, 0u64);
    loop {
        let f = ch.recv_limited(CHUNK_BYTES)?;
        match f.tag {
            TAG_CHUNK => {
                if f.payload.is_empty() || f.payload.len() > CHUNK_BYTES {
                    return Err(protocol(
                        ch,
                        format!("chunk of {} bytes (allowed: 1..={CHUNK_BYTES})", f.payload.len()),
                    ));
                }
                while current < n && files[current].bytes.len() as u64 == header.files[current].len {
                    current += 1;
                }
                if current == n {
                    return Err(UploadError::Refused(format!(
                        "a {}-byte chunk arrived after all {total} announced bytes",
                        f.payload.len()
                    )));
                }
                let (file, len) = (&mut files[current], header.files[current].len);
                let left = len - file.bytes.len() as u64;
                if f.payload.len() as u64 > left {
                    return Err(UploadError::Refused(format!(
                        "a {}-byte chunk overruns file {:?}, which has {left} of {len} announced bytes left",
                        f.payload.len(),
                        file.name
                    )));
                }
                if file.bytes.is_empty() {
                    // Exact, once: bounded by the checked total, and no doubling on growth.
                    file.bytes.reserve_exact(len as usize);
                }
                digest.update(&f.payload);
                file.bytes.extend_from_slice(&f.payload);
                received += f.payload.len() as u64;
            }
            TAG_DONE => {
                if received != total {
                    return Err(protocol(ch, format!("the dataset ended after {received} of {total} announced bytes")));
                }
                if f.payload[..] != digest.finalize()[..] {
                    return Err(UploadError::Refused("dataset digest mismatch".into()));
                }
                return Ok(files);
            }
            t => return Err(protocol(ch, format!("unexpected message tag {t:#06x} during the upload"))),
        }
    }
}
