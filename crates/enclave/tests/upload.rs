//! The attested key exchange and encrypted upload, end to end, with the simulated provider.

use std::net::TcpListener;
use std::thread;
use trustsplit_boundary::{Channel, ChannelError, ChannelOptions, Frame, InProcessChannel, TcpChannel};
use trustsplit_enclave::attestation::*;
use trustsplit_enclave::upload::*;

const MEASUREMENT: [u8; 32] = [0x42; 32];

fn random_files() -> Vec<UploadedFile> {
    // Empty, tiny, spanning two chunks, odd-sized.
    [0usize, 1, CHUNK_BYTES + 17, 1000]
        .iter()
        .enumerate()
        .map(|(i, &n)| {
            let mut bytes = vec![0u8; n];
            getrandom::fill(&mut bytes).unwrap();
            UploadedFile { name: format!("part-{i}.bin"), bytes }
        })
        .collect()
}

/// A channel that lets the test rewrite what one end receives: the attacker on the wire.
struct Tamper<C> {
    inner: C,
    on_recv: Box<dyn FnMut(&mut Frame) + Send>,
}

impl<C: Channel> Channel for Tamper<C> {
    fn send(&mut self, tag: u16, payload: &[u8]) -> Result<(), ChannelError> {
        self.inner.send(tag, payload)
    }
    fn recv(&mut self) -> Result<Frame, ChannelError> {
        let mut f = self.inner.recv()?;
        (self.on_recv)(&mut f);
        Ok(f)
    }
    fn peer(&self) -> String {
        self.inner.peer()
    }
}

fn tamper<C: Channel>(inner: C, on_recv: impl FnMut(&mut Frame) + Send + 'static) -> Tamper<C> {
    Tamper { inner, on_recv: Box::new(on_recv) }
}

/// Runs the enclave on a thread over `ch` and the owner here over `owner_ch`.
fn run<CE: Channel + 'static, CO: Channel>(
    enclave_ch: CE,
    owner_ch: CO,
    policy: &Policy,
    files: &[UploadedFile],
    max_total_bytes: u64,
) -> (Result<VerifiedReport, UploadError>, Result<Vec<UploadedFile>, UploadError>) {
    let provider = SimulatedAttestation::new(MEASUREMENT).unwrap();
    let verifier = provider.verifier();
    let enclave = thread::spawn(move || {
        enclave_receive(enclave_ch, &NO_LINK, &provider, max_total_bytes).map(|(files, _)| files)
    });
    let owner = owner_upload(owner_ch, &NO_LINK, &verifier, policy, files, 0).map(|(report, _)| report);
    (owner, enclave.join().unwrap())
}

/// The channel binding of a channel that is no link.
const NO_LINK: [u8; 32] = [0; 32];

fn pair() -> (InProcessChannel, InProcessChannel) {
    InProcessChannel::pair(ChannelOptions::default())
}

#[test]
fn upload_round_trips_in_process() {
    let files = random_files();
    let (a, b) = pair();
    let (owner, enclave) = run(a, b, &Policy::simulated(MEASUREMENT), &files, 1 << 30);
    let report = owner.unwrap();
    assert_eq!(report.measurement, MEASUREMENT);
    assert_eq!(enclave.unwrap(), files);
}

#[test]
fn upload_round_trips_over_tcp() {
    let files = random_files();
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let provider = SimulatedAttestation::new(MEASUREMENT).unwrap();
    let verifier = provider.verifier();
    let enclave = thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        let ch = TcpChannel::from_stream(stream, ChannelOptions::default()).unwrap();
        enclave_receive(ch, &NO_LINK, &provider, 1 << 30).map(|(files, _)| files)
    });
    let ch = TcpChannel::connect(&addr, ChannelOptions::default()).unwrap();
    owner_upload(ch, &NO_LINK, &verifier, &Policy::simulated(MEASUREMENT), &files, 0).unwrap();
    assert_eq!(enclave.join().unwrap().unwrap(), files);
}

#[test]
fn a_quote_bound_to_another_link_is_refused_and_the_channel_reports_after_the_upload() {
    // The enclave quotes over its link's handshake hash; an owner on another link (a relay in
    // between runs two links) sees a different binding and refuses before sending any data.
    let (a, b) = pair();
    let provider = SimulatedAttestation::new(MEASUREMENT).unwrap();
    let verifier = provider.verifier();
    let enclave = thread::spawn(move || enclave_receive(a, &[1; 32], &provider, 1 << 20).map(|(f, _)| f));
    let err = owner_upload(b, &[2; 32], &verifier, &Policy::simulated(MEASUREMENT), &random_files(), 0).unwrap_err();
    assert!(matches!(err, UploadError::ReportDataMismatch { .. }), "{err}");
    assert!(enclave.join().unwrap().is_err());

    // The same binding on both ends: the upload goes through, and the channel carries the
    // enclave's reports to the owner afterwards.
    let (a, b) = pair();
    let provider = SimulatedAttestation::new(MEASUREMENT).unwrap();
    let verifier = provider.verifier();
    let enclave = thread::spawn(move || {
        let (files, mut ch) = enclave_receive(a, &[7; 32], &provider, 1 << 30).unwrap();
        ch.send(TAG_REPORT, b"epoch 1 done").unwrap();
        files
    });
    let files = random_files();
    let (_, mut ch) = owner_upload(b, &[7; 32], &verifier, &Policy::simulated(MEASUREMENT), &files, 0).unwrap();
    assert_eq!(ch.recv_tag(TAG_REPORT).unwrap(), b"epoch 1 done");
    assert_eq!(enclave.join().unwrap(), files);
}

#[test]
fn wrong_measurement_owner_refuses_and_sends_nothing() {
    let (a, b) = pair();
    let (owner, enclave) = run(a, b, &Policy::simulated([0x43; 32]), &random_files(), 1 << 30);
    let err = owner.unwrap_err();
    assert!(matches!(err, UploadError::Attestation(AttestationError::MeasurementMismatch { .. })), "{err}");
    // The enclave got the hello and then a closed channel: no header, no data.
    let err = enclave.unwrap_err();
    assert!(matches!(err, UploadError::Channel(ChannelError::Closed { .. })), "{err}");
}

#[test]
fn owner_refuses_simulated_quote_under_a_strict_policy() {
    let (a, b) = pair();
    let (owner, enclave) = run(a, b, &Policy::strict(MEASUREMENT), &random_files(), 1 << 30);
    assert!(matches!(owner, Err(UploadError::Attestation(AttestationError::SimulatedNotAllowed))));
    assert!(matches!(enclave, Err(UploadError::Channel(ChannelError::Closed { .. }))));
}

#[test]
fn man_in_the_middle_replacing_the_enclave_key_is_detected() {
    let (a, b) = pair();
    // The attacker's key (fixed: it models an attacker, not a real key).
    let attacker = x25519_dalek::PublicKey::from(&x25519_dalek::StaticSecret::from([7u8; 32])).to_bytes();
    let owner_side = tamper(b, move |f| {
        if f.tag == TAG_ATTEST {
            f.payload[..32].copy_from_slice(&attacker);
        }
    });
    let (owner, enclave) = run(a, owner_side, &Policy::simulated(MEASUREMENT), &random_files(), 1 << 30);
    let err = owner.unwrap_err();
    assert!(matches!(err, UploadError::ReportDataMismatch { .. }), "{err}");
    assert!(err.to_string().contains("replaced the enclave's public key"), "{err}");
    assert!(matches!(enclave, Err(UploadError::Channel(ChannelError::Closed { .. }))));
}

#[test]
fn tampered_ciphertext_fails_authentication() {
    let (a, b) = pair();
    let mut done = false;
    let enclave_side = tamper(a, move |f| {
        if f.tag == TAG_CHUNK && !done {
            f.payload[5] ^= 0x20;
            done = true;
        }
    });
    let (owner, enclave) = run(enclave_side, b, &Policy::simulated(MEASUREMENT), &random_files(), 1 << 30);
    let err = enclave.unwrap_err();
    assert!(matches!(err, UploadError::Channel(ChannelError::Authentication { .. })), "{err}");
    let err = owner.unwrap_err();
    assert!(matches!(&err, UploadError::RejectedByEnclave(m) if m.contains("authentication")), "{err}");
}

#[test]
fn header_over_the_limit_is_refused_before_any_data() {
    let files = random_files();
    let (a, b) = pair();
    let mut chunks_seen = 0;
    let counting = tamper(a, move |f| {
        chunks_seen += (f.tag == TAG_CHUNK) as usize;
        assert_eq!(chunks_seen, 0, "the owner sent data after the header was refused");
    });
    let (owner, enclave) = run(counting, b, &Policy::simulated(MEASUREMENT), &files, 1000);
    let err = enclave.unwrap_err();
    assert!(matches!(&err, UploadError::Refused(m) if m.contains("more than the limit of 1000 bytes")), "{err}");
    let err = owner.unwrap_err();
    assert!(matches!(&err, UploadError::RejectedByEnclave(m) if m.contains("limit")), "{err}");
}

/// Drives the owner's side by hand after a genuine handshake, to send what `owner_upload` never
/// would.
fn hostile_owner(script: impl FnOnce(&mut dyn Channel) + Send + 'static) -> UploadError {
    let (a, b) = pair();
    let provider = SimulatedAttestation::new(MEASUREMENT).unwrap();
    let verifier = provider.verifier();
    let enclave = thread::spawn(move || enclave_receive(a, &NO_LINK, &provider, 1 << 20).map(|(f, _)| f));
    let (mut ch, _) = owner_handshake(b, &NO_LINK, &verifier, &Policy::simulated(MEASUREMENT), 0).unwrap();
    script(&mut ch);
    enclave.join().unwrap().unwrap_err()
}

fn header(files: &[(&str, u64)]) -> Vec<u8> {
    let entries: Vec<String> = files.iter().map(|(n, l)| format!("{{\"name\":\"{n}\",\"len\":{l}}}")).collect();
    let total: u64 = files.iter().map(|f| f.1).sum();
    format!("{{\"files\":[{}],\"total_bytes\":{total}}}", entries.join(",")).into_bytes()
}

#[test]
fn chunk_beyond_the_announced_size_is_refused() {
    let err = hostile_owner(|ch| {
        ch.send(TAG_HEADER, &header(&[("a", 10)])).unwrap();
        assert_eq!(ch.recv().unwrap().tag, TAG_HEADER_OK);
        ch.send(TAG_CHUNK, &[0u8; 11]).unwrap();
        assert_eq!(ch.recv().unwrap().tag, TAG_ERROR);
    });
    assert!(matches!(&err, UploadError::Refused(m) if m.contains("overruns file \"a\"")), "{err}");

    let err = hostile_owner(|ch| {
        ch.send(TAG_HEADER, &header(&[("a", 4)])).unwrap();
        ch.recv().unwrap();
        ch.send(TAG_CHUNK, &[0u8; 4]).unwrap();
        ch.send(TAG_CHUNK, &[0u8; 1]).unwrap();
        ch.recv().unwrap();
    });
    assert!(matches!(&err, UploadError::Refused(m) if m.contains("after all 4 announced bytes")), "{err}");
}

#[test]
fn too_many_files_or_inconsistent_totals_are_refused() {
    let err = hostile_owner(|ch| {
        let many: Vec<(&str, u64)> = vec![("f", 0); MAX_FILES + 1];
        ch.send(TAG_HEADER, &header(&many)).unwrap();
        ch.recv().unwrap();
    });
    assert!(matches!(&err, UploadError::Refused(m) if m.contains("files, more than the limit")), "{err}");

    let err = hostile_owner(|ch| {
        ch.send(TAG_HEADER, br#"{"files":[{"name":"a","len":5}],"total_bytes":3}"#).unwrap();
        ch.recv().unwrap();
    });
    assert!(matches!(&err, UploadError::Protocol { reason, .. } if reason.contains("do not add up")), "{err}");
}

#[test]
fn truncated_dataset_or_wrong_digest_is_refused() {
    let err = hostile_owner(|ch| {
        ch.send(TAG_HEADER, &header(&[("a", 8)])).unwrap();
        ch.recv().unwrap();
        ch.send(TAG_CHUNK, &[1u8; 5]).unwrap();
        ch.send(TAG_DONE, &[0u8; 32]).unwrap();
        ch.recv().unwrap();
    });
    assert!(matches!(&err, UploadError::Protocol { reason, .. } if reason.contains("after 5 of 8")), "{err}");

    let err = hostile_owner(|ch| {
        ch.send(TAG_HEADER, &header(&[("a", 2)])).unwrap();
        ch.recv().unwrap();
        ch.send(TAG_CHUNK, &[1u8; 2]).unwrap();
        ch.send(TAG_DONE, &[0u8; 32]).unwrap();
        ch.recv().unwrap();
    });
    assert!(matches!(&err, UploadError::Refused(m) if m.contains("digest mismatch")), "{err}");
}

#[test]
fn low_order_owner_key_is_refused() {
    let (mut a, b) = pair();
    let provider = SimulatedAttestation::new(MEASUREMENT).unwrap();
    let enclave = thread::spawn(move || enclave_receive(b, &NO_LINK, &provider, 1 << 20).map(|(f, _)| f));
    // The all-zero X25519 point has low order: every "shared secret" with it is zero.
    a.send(TAG_HELLO, &[0u8; 64]).unwrap();
    let err = enclave.join().unwrap().unwrap_err();
    assert!(matches!(err, UploadError::WeakKey { .. }), "{err}");
    drop(a);
}
