//! Attestation: the simulated provider and verifier, and offline DCAP verification of quotes recorded
//! on real SGX / TDX machines (see `testdata/README.md`).

use sha2::{Digest, Sha256};
use trustsplit_enclave::attestation::*;

const SGX_QUOTE: &[u8] = include_bytes!("../testdata/sgx_quote");
const SGX_COLLATERAL: &[u8] = include_bytes!("../testdata/sgx_quote_collateral.json");
const TDX_QUOTE: &[u8] = include_bytes!("../testdata/tdx_quote");
const TDX_COLLATERAL: &[u8] = include_bytes!("../testdata/tdx_quote_collateral.json");
/// The times dcap-qvl's own tests verify these samples at: the end of the collateral's validity
/// window minus one second.
const SGX_NOW: u64 = 1_752_919_277;
const TDX_NOW: u64 = 1_752_919_234;
const SGX_MRENCLAVE: &str = "33d8736db756ed4997e04ba358d27833188f1932ff7b1d156904d3f560452fbb";
const TDX_MEASUREMENT: &str = "8ef444fda246f7e0d5f9a3ba0a2822ae0be7dbec5e321277d03b73b198fa2545";
/// Offset of the SGX report body (after the 48-byte header) and of report data within it.
const SGX_REPORT_DATA_AT: usize = 48 + 320;

fn unhex32(s: &str) -> [u8; 32] {
    let v: Vec<u8> = (0..64).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect();
    v.try_into().unwrap()
}

fn report_data(tag: u8) -> [u8; 64] {
    let mut rd = [0u8; 64];
    rd[0] = tag;
    rd[63] = tag.wrapping_add(1);
    rd
}

// ---- simulated ----

fn sim() -> (SimulatedAttestation, [u8; 32]) {
    let m: [u8; 32] = Sha256::digest(b"trustsplit test enclave").into();
    (SimulatedAttestation::new(m).unwrap(), m)
}

#[test]
fn simulated_quote_verifies() {
    let (p, m) = sim();
    let q = p.quote(report_data(7)).unwrap();
    assert_eq!(q.kind, QuoteKind::Simulated);
    let r = p.verifier().verify(&q, &Policy::simulated(m), 0).unwrap();
    assert_eq!(r.kind, QuoteKind::Simulated);
    assert_eq!(r.measurement, m);
    assert_eq!(r.report_data, report_data(7));
    assert_eq!(r.tcb_status, "SIMULATED");
    assert!(r.advisories[0].contains("provides no security"));
}

#[test]
fn simulated_wrong_measurement_names_expected_and_found() {
    let (p, m) = sim();
    let q = p.quote(report_data(1)).unwrap();
    let expected = [0xabu8; 32];
    let err = p.verifier().verify(&q, &Policy::simulated(expected), 0).unwrap_err();
    assert!(matches!(err, AttestationError::MeasurementMismatch { .. }), "{err}");
    let msg = err.to_string();
    assert!(msg.contains(&hex(&expected)) && msg.contains(&hex(&m)), "{msg}");
    assert!(msg.contains("SIMULATED"), "{msg}");
}

#[test]
fn simulated_tampering_breaks_the_signature() {
    let (p, m) = sim();
    let q = p.quote(report_data(2)).unwrap();
    // The last byte is in the signature; 6 + 32 + 10 is in the report data; 6 is in the measurement.
    for at in [q.bytes.len() - 1, 6 + 32 + 10, 6] {
        let mut bad = q.clone();
        bad.bytes[at] ^= 0x01;
        let err = p.verifier().verify(&bad, &Policy::simulated(m), 0).unwrap_err();
        assert!(matches!(err, AttestationError::BadSignature { .. }), "byte {at}: {err}");
    }
}

#[test]
fn simulated_quote_from_another_key_is_refused() {
    let (p, m) = sim();
    let other = SimulatedAttestation::new(m).unwrap();
    let q = other.quote(report_data(3)).unwrap();
    let err = p.verifier().verify(&q, &Policy::simulated(m), 0).unwrap_err();
    assert!(matches!(err, AttestationError::BadSignature { .. }), "{err}");
}

#[test]
fn simulated_refused_unless_policy_allows_it() {
    let (p, m) = sim();
    let q = p.quote(report_data(4)).unwrap();
    let err = p.verifier().verify(&q, &Policy::strict(m), 0).unwrap_err();
    assert!(matches!(err, AttestationError::SimulatedNotAllowed), "{err}");
    assert!(err.to_string().contains("SIMULATED attestation: provides no security"), "{err}");
}

#[test]
fn simulated_malformed_and_mislabelled_quotes_are_refused() {
    let (p, m) = sim();
    let mut q = p.quote(report_data(5)).unwrap();
    q.kind = QuoteKind::SgxDcap;
    assert!(matches!(p.verifier().verify(&q, &Policy::simulated(m), 0), Err(AttestationError::WrongKind { .. })));
    q.kind = QuoteKind::Simulated;
    let mut bad_magic = q.clone();
    bad_magic.bytes[3] ^= 0x01;
    let err = p.verifier().verify(&bad_magic, &Policy::simulated(m), 0).unwrap_err();
    assert!(err.to_string().contains("expected \"TSSIM1\""), "{err}");
    q.bytes.truncate(100);
    assert!(matches!(p.verifier().verify(&q, &Policy::simulated(m), 0), Err(AttestationError::Malformed { .. })));
}

#[test]
fn simulated_for_binary_measures_the_file() {
    let path = std::env::temp_dir().join(format!("trustsplit-attest-{}.bin", std::process::id()));
    std::fs::write(&path, b"pretend this is the trustsplit binary").unwrap();
    let p = SimulatedAttestation::for_binary(&path).unwrap();
    std::fs::remove_file(&path).unwrap();
    assert_eq!(p.measurement(), <[u8; 32]>::from(Sha256::digest(b"pretend this is the trustsplit binary")));
    let err = SimulatedAttestation::for_binary(&path).err().expect("file is gone");
    assert!(err.to_string().contains(&path.display().to_string()), "{err}");
}

// ---- DCAP ----

fn sgx_quote() -> Quote {
    Quote { bytes: SGX_QUOTE.to_vec(), kind: QuoteKind::SgxDcap }
}

/// The SGX sample's platform needs configuration and hardening, so a policy must accept that status.
fn sgx_policy() -> Policy {
    Policy { accepted_tcb: vec!["ConfigurationAndSWHardeningNeeded".into()], ..Policy::strict(unhex32(SGX_MRENCLAVE)) }
}

fn sgx_verifier() -> DcapVerifier {
    DcapVerifier::from_json(SGX_COLLATERAL).unwrap()
}

#[test]
fn dcap_sgx_sample_verifies() {
    let r = sgx_verifier().verify(&sgx_quote(), &sgx_policy(), SGX_NOW).unwrap();
    assert_eq!(r.kind, QuoteKind::SgxDcap);
    assert_eq!(hex(&r.measurement), SGX_MRENCLAVE);
    assert_eq!(&r.report_data[..13], b"Hello, world!");
    assert!(r.report_data[13..].iter().all(|&b| b == 0));
    assert_eq!(r.tcb_status, "ConfigurationAndSWHardeningNeeded");
    assert_eq!(r.advisories, ["INTEL-SA-00289", "INTEL-SA-00615"]);
}

#[test]
fn dcap_tcb_status_outside_the_policy_is_refused() {
    let err = sgx_verifier().verify(&sgx_quote(), &Policy::strict(unhex32(SGX_MRENCLAVE)), SGX_NOW).unwrap_err();
    assert!(matches!(err, AttestationError::TcbNotAccepted { .. }), "{err}");
    assert!(err.to_string().contains("ConfigurationAndSWHardeningNeeded"), "{err}");
}

#[test]
fn dcap_tampered_quote_is_refused() {
    // A byte of report data (signed by the attestation key) and one of MRENCLAVE.
    for at in [SGX_REPORT_DATA_AT + 3, 48 + 64] {
        let mut q = sgx_quote();
        q.bytes[at] ^= 0x01;
        let err = sgx_verifier().verify(&q, &sgx_policy(), SGX_NOW).unwrap_err();
        assert!(matches!(err, AttestationError::Dcap(_)), "byte {at}: {err}");
    }
}

#[test]
fn dcap_wrong_measurement_is_refused() {
    let policy = Policy { expected_measurement: Some([0x11; 32]), ..sgx_policy() };
    let err = sgx_verifier().verify(&sgx_quote(), &policy, SGX_NOW).unwrap_err();
    let msg = err.to_string();
    assert!(matches!(err, AttestationError::MeasurementMismatch { .. }), "{msg}");
    assert!(msg.contains(SGX_MRENCLAVE) && msg.contains(&hex(&[0x11; 32])), "{msg}");
}

#[test]
fn dcap_expired_collateral_is_refused() {
    let day = 24 * 3600;
    for now in [SGX_NOW + day, SGX_NOW + 365 * day] {
        let err = sgx_verifier().verify(&sgx_quote(), &sgx_policy(), now).unwrap_err();
        assert!(matches!(err, AttestationError::Dcap(_)), "{err}");
    }
    // And before the collateral was issued.
    let err = sgx_verifier().verify(&sgx_quote(), &sgx_policy(), SGX_NOW - 60 * day).unwrap_err();
    assert!(matches!(err, AttestationError::Dcap(_)), "{err}");
}

#[test]
fn dcap_refuses_simulated_and_mislabelled_quotes() {
    let mut q = sgx_quote();
    q.kind = QuoteKind::Simulated;
    let err = sgx_verifier().verify(&q, &sgx_policy(), SGX_NOW).unwrap_err();
    assert!(matches!(err, AttestationError::WrongKind { .. }), "{err}");
    q.kind = QuoteKind::TdxDcap;
    let err = sgx_verifier().verify(&q, &sgx_policy(), SGX_NOW).unwrap_err();
    assert!(matches!(err, AttestationError::Malformed { .. }), "{err}");
}

#[test]
fn dcap_tdx_sample_verifies() {
    let v = DcapVerifier::from_json(TDX_COLLATERAL).unwrap();
    let q = Quote { bytes: TDX_QUOTE.to_vec(), kind: QuoteKind::TdxDcap };
    let r = v.verify(&q, &Policy::strict(unhex32(TDX_MEASUREMENT)), TDX_NOW).unwrap();
    assert_eq!(r.kind, QuoteKind::TdxDcap);
    assert_eq!(hex(&r.measurement), TDX_MEASUREMENT);
    assert_eq!(r.tcb_status, "UpToDate");
    assert!(r.advisories.is_empty());
    // The measurement is SHA-256 over MRTD and RTMR0-3, read here straight from the TD report.
    let body = &TDX_QUOTE[48..48 + 584];
    let rtmr = |i: usize| <&[u8; 48]>::try_from(&body[328 + 48 * i..376 + 48 * i]).unwrap();
    let mr_td = <&[u8; 48]>::try_from(&body[136..184]).unwrap();
    assert_eq!(tdx_measurement(mr_td, [rtmr(0), rtmr(1), rtmr(2), rtmr(3)]), r.measurement);
    assert_eq!(&r.report_data[..], &body[520..584]);

    let mut bad = q.clone();
    bad.bytes[48 + 520] ^= 0x80;
    assert!(matches!(v.verify(&bad, &Policy::strict(r.measurement), TDX_NOW), Err(AttestationError::Dcap(_))));
}

/// The recorded TDX sample's TD report fields (its TD sets none of the owner fields), read with
/// `python3 -c "print(open('tdx_quote','rb').read()[48:48+584][OFFSET:END].hex())"`.
const TDX_TD_ATTRIBUTES: &str = "0000001000000000";
const TDX_MR_TD: &str =
    "91eb2b44d141d4ece09f0c75c2c53d247a3c68edd7fafe8a3520c942a604a407de03ae6dc5f87f27428b2538873118b7";

fn tdx_quote() -> Quote {
    Quote { bytes: TDX_QUOTE.to_vec(), kind: QuoteKind::TdxDcap }
}

fn tdx_verifier() -> DcapVerifier {
    DcapVerifier::from_json(TDX_COLLATERAL).unwrap()
}

fn unhex<const N: usize>(s: &str) -> [u8; N] {
    let v: Vec<u8> = (0..2 * N).step_by(2).map(|i| u8::from_str_radix(&s[i..i + 2], 16).unwrap()).collect();
    v.try_into().unwrap()
}

/// The sample's own values for every TDX field a policy can pin.
fn tdx_pins() -> TdxPolicy {
    TdxPolicy {
        mr_config_id: Some([0; 48]),
        mr_owner: Some([0; 48]),
        mr_owner_config: Some([0; 48]),
        td_attributes: Some(unhex(TDX_TD_ATTRIBUTES)),
    }
}

#[test]
fn dcap_tdx_report_fields_come_from_the_verified_td_report() {
    let r = tdx_verifier().verify(&tdx_quote(), &Policy::strict(unhex32(TDX_MEASUREMENT)), TDX_NOW).unwrap();
    let td = r.tdx.as_ref().expect("a TDX report has TD fields");
    let body = &TDX_QUOTE[48..48 + 584];
    assert_eq!(&td.td_attributes[..], &body[120..128]);
    assert_eq!(hex(&td.td_attributes), TDX_TD_ATTRIBUTES);
    assert_eq!(&td.mr_td[..], &body[136..184]);
    assert_eq!(hex(&td.mr_td), TDX_MR_TD);
    assert_eq!(&td.mr_config_id[..], &body[184..232]);
    assert_eq!(&td.mr_owner[..], &body[232..280]);
    assert_eq!(&td.mr_owner_config[..], &body[280..328]);
    for (i, rtmr) in td.rtmr.iter().enumerate() {
        assert_eq!(&rtmr[..], &body[328 + 48 * i..376 + 48 * i], "RTMR{i}");
    }
    // The measurement is still SHA-256 over MRTD and RTMR0-3, and the owner fields are not in it.
    let [r0, r1, r2, r3] = &td.rtmr;
    assert_eq!(tdx_measurement(&td.mr_td, [r0, r1, r2, r3]), r.measurement);
    // SGX quotes have no TD fields.
    let r = sgx_verifier().verify(&sgx_quote(), &sgx_policy(), SGX_NOW).unwrap();
    assert_eq!(r.tdx, None);
}

#[test]
fn dcap_tdx_pins_matching_the_sample_are_accepted() {
    let policy = Policy { tdx: tdx_pins(), ..Policy::strict(unhex32(TDX_MEASUREMENT)) };
    let r = tdx_verifier().verify(&tdx_quote(), &policy, TDX_NOW).unwrap();
    assert_eq!(hex(&r.measurement), TDX_MEASUREMENT);
    // Each pin alone, too.
    let p = tdx_pins();
    for one in [
        TdxPolicy { mr_config_id: p.mr_config_id, ..TdxPolicy::default() },
        TdxPolicy { mr_owner: p.mr_owner, ..TdxPolicy::default() },
        TdxPolicy { mr_owner_config: p.mr_owner_config, ..TdxPolicy::default() },
        TdxPolicy { td_attributes: p.td_attributes, ..TdxPolicy::default() },
    ] {
        let policy = Policy { tdx: one.clone(), ..Policy::strict(unhex32(TDX_MEASUREMENT)) };
        tdx_verifier().verify(&tdx_quote(), &policy, TDX_NOW).unwrap_or_else(|e| panic!("{one:?}: {e}"));
    }
}

#[test]
fn dcap_tdx_pin_with_a_changed_byte_is_refused_naming_the_field() {
    type Pin = fn(&mut TdxPolicy) -> &mut [u8];
    let fields: [(&str, Pin); 4] = [
        ("MRCONFIGID", |p| p.mr_config_id.as_mut().unwrap()),
        ("MROWNER", |p| p.mr_owner.as_mut().unwrap()),
        ("MROWNERCONFIG", |p| p.mr_owner_config.as_mut().unwrap()),
        ("TDATTRIBUTES", |p| p.td_attributes.as_mut().unwrap()),
    ];
    for (name, field) in fields {
        for at in [0, 7] {
            let mut pins = tdx_pins();
            let found = hex(field(&mut pins));
            field(&mut pins)[at] ^= 0x01;
            let expected = hex(field(&mut pins));
            let policy = Policy { tdx: pins, ..Policy::strict(unhex32(TDX_MEASUREMENT)) };
            let err = tdx_verifier().verify(&tdx_quote(), &policy, TDX_NOW).unwrap_err();
            assert!(
                matches!(&err, AttestationError::TdxFieldMismatch { field, .. } if *field == name),
                "{name} byte {at}: {err}"
            );
            let msg = err.to_string();
            assert!(msg.contains(&format!("TDX DCAP {name} mismatch")), "{msg}");
            assert!(msg.contains(&format!("expected {expected}, found {found}")), "{msg}");
        }
    }
}

#[test]
fn tdx_pins_on_a_quote_without_a_td_report_are_refused() {
    let cases = [
        (TdxPolicy { mr_config_id: Some([0; 48]), ..TdxPolicy::default() }, "MRCONFIGID"),
        (TdxPolicy { mr_owner: Some([0; 48]), ..TdxPolicy::default() }, "MROWNER"),
        (TdxPolicy { mr_owner_config: Some([0; 48]), ..TdxPolicy::default() }, "MROWNERCONFIG"),
        (TdxPolicy { td_attributes: Some([0; 8]), ..TdxPolicy::default() }, "TDATTRIBUTES"),
    ];
    let (sim, m) = sim();
    let sim_quote = sim.quote(report_data(8)).unwrap();
    for (pins, name) in cases {
        // A genuine SGX quote: no TD report, so the pin cannot be satisfied.
        let policy = Policy { tdx: pins.clone(), ..sgx_policy() };
        let err = sgx_verifier().verify(&sgx_quote(), &policy, SGX_NOW).unwrap_err();
        assert!(
            matches!(&err, AttestationError::TdxFieldAbsent { kind: QuoteKind::SgxDcap, field } if *field == name),
            "{err}"
        );
        assert!(err.to_string().contains(&format!("pins the TDX field {name}, but a SGX DCAP quote")), "{err}");
        // Nor a simulated one.
        let policy = Policy { tdx: pins, ..Policy::simulated(m) };
        let err = sim.verifier().verify(&sim_quote, &policy, 0).unwrap_err();
        assert!(matches!(&err, AttestationError::TdxFieldAbsent { field, .. } if *field == name), "{err}");
    }
    assert!(TdxPolicy::default().is_empty() && !tdx_pins().is_empty());
}

#[test]
fn bad_collateral_json_is_a_clear_error() {
    let err = DcapVerifier::from_json(b"{\"not\": \"collateral\"}").err().expect("refused");
    assert!(matches!(err, AttestationError::Collateral(_)), "{err}");
}

// ---- Gramine ----

#[test]
fn gramine_provider_outside_gramine_is_unavailable() {
    let dir = std::env::temp_dir().join(format!("trustsplit-no-attestation-{}", std::process::id()));
    let err = GramineDcapProvider::at(&dir).err().expect("no such directory");
    assert!(matches!(err, AttestationError::Unavailable(_)), "{err}");
    assert!(err.to_string().contains("Gramine"), "{err}");
    if !std::path::Path::new("/dev/attestation/quote").exists() {
        assert!(matches!(GramineDcapProvider::new(), Err(AttestationError::Unavailable(_))));
    }
}

#[test]
fn gramine_provider_writes_report_data_and_reads_the_quote() {
    // A stand-in for Gramine's pseudo-files, to test the plumbing (not the hardware).
    let dir = std::env::temp_dir().join(format!("trustsplit-fake-attestation-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    std::fs::write(dir.join("attestation_type"), "dcap\n").unwrap();
    std::fs::write(dir.join("quote"), SGX_QUOTE).unwrap();
    let p = GramineDcapProvider::at(&dir).unwrap();
    assert_eq!(p.kind(), QuoteKind::SgxDcap);
    let q = p.quote(report_data(9)).unwrap();
    assert_eq!(q, sgx_quote());
    assert_eq!(std::fs::read(dir.join("user_report_data")).unwrap(), report_data(9));

    std::fs::write(dir.join("attestation_type"), "none").unwrap();
    let err = GramineDcapProvider::at(&dir).err().expect("attestation disabled");
    assert!(err.to_string().contains("sgx.remote_attestation"), "{err}");
    std::fs::remove_dir_all(&dir).unwrap();
}
