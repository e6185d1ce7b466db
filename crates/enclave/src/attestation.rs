//! Attestation: the enclave proves what code it runs, and binds 64 bytes of its choosing (a hash of
//! its session key) to that proof.
//!
//! Two halves, kept apart because they run on different machines:
//! - [`AttestationProvider`] runs inside the TEE and produces a [`Quote`] over `report_data`.
//! - [`QuoteVerifier`] runs at the data owner and turns a quote into a [`VerifiedReport`], refusing it
//!   unless it is genuine *and* satisfies the owner's [`Policy`].
//!
//! Providers and verifiers:
//! - [`SimulatedAttestation`] / [`SimulatedVerifier`]: an ed25519 signature in place of hardware.
//!   It proves nothing about the code that runs (whoever holds the key can sign anything); it exists
//!   so the protocol can be developed and tested on machines without a TEE.
//! - [`DcapVerifier`]: real Intel SGX and TDX quotes, verified offline with `dcap-qvl` against
//!   collateral (TCB info, QE identity, CRLs) the owner fetched from Intel's PCS or a PCCS.
//! - [`GramineDcapProvider`]: the SGX provider under Gramine (`/dev/attestation`).

use ed25519_dalek::{Signature, Signer, SigningKey, VerifyingKey};
use sha2::{Digest, Sha256};
use std::fmt;
use std::path::{Path, PathBuf};

/// Stated wherever the simulation provider is involved.
pub const SIMULATED_WARNING: &str = "SIMULATED attestation: provides no security, for development and CI only";

/// Which kind of evidence a quote is.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash)]
pub enum QuoteKind {
    /// [`SimulatedAttestation`]: no security.
    Simulated,
    /// An Intel SGX ECDSA (DCAP) quote, version 3.
    SgxDcap,
    /// An Intel TDX quote, version 4 or 5.
    TdxDcap,
}

impl QuoteKind {
    /// Wire encoding (one byte).
    pub fn to_byte(self) -> u8 {
        match self {
            QuoteKind::Simulated => 0,
            QuoteKind::SgxDcap => 1,
            QuoteKind::TdxDcap => 2,
        }
    }

    pub fn from_byte(b: u8) -> Option<QuoteKind> {
        match b {
            0 => Some(QuoteKind::Simulated),
            1 => Some(QuoteKind::SgxDcap),
            2 => Some(QuoteKind::TdxDcap),
            _ => None,
        }
    }
}

impl fmt::Display for QuoteKind {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        f.write_str(match self {
            QuoteKind::Simulated => "SIMULATED attestation (provides no security, for development and CI only)",
            QuoteKind::SgxDcap => "SGX DCAP",
            QuoteKind::TdxDcap => "TDX DCAP",
        })
    }
}

/// Evidence produced inside the TEE. `kind` is what the sender claims; verifiers check it against
/// the bytes and never trust it alone.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct Quote {
    pub bytes: Vec<u8>,
    pub kind: QuoteKind,
}

/// What a verifier established about a quote.
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct VerifiedReport {
    pub kind: QuoteKind,
    /// The code identity. SGX: MRENCLAVE. TDX: [`tdx_measurement`], SHA-256 over MRTD and RTMR0-3
    /// (MRTD alone measures only the virtual firmware, not the kernel and binary that run on it).
    /// Simulated: whatever the provider was given.
    pub measurement: [u8; 32],
    /// The 64 bytes the enclave bound into the quote.
    pub report_data: [u8; 64],
    /// DCAP's combined platform/QE TCB status (`UpToDate`, `SWHardeningNeeded`, ...), or
    /// `"SIMULATED"`.
    pub tcb_status: String,
    /// Intel security advisory ids that apply to the platform (`INTEL-SA-...`).
    pub advisories: Vec<String>,
    /// TDX quotes only: the TD report's registers, as verified. `None` for SGX and simulated
    /// quotes.
    pub tdx: Option<TdReportFields>,
}

/// The fields of a verified TDX TD report that a [`Policy`] can check (TDX module ABI names).
#[derive(Clone, Debug, PartialEq, Eq)]
pub struct TdReportFields {
    /// TDATTRIBUTES; byte 0 bit 0 is DEBUG.
    pub td_attributes: [u8; 8],
    /// MRTD: the initial TD contents (the virtual firmware).
    pub mr_td: [u8; 48],
    /// MRCONFIGID: software-defined configuration, set by the host when it creates the TD.
    pub mr_config_id: [u8; 48],
    /// MROWNER: the TD's owner, set by the host when it creates the TD.
    pub mr_owner: [u8; 48],
    /// MROWNERCONFIG: owner-defined configuration, set by the host when it creates the TD.
    pub mr_owner_config: [u8; 48],
    /// RTMR0-3: the boot chain and run-time measurements.
    pub rtmr: [[u8; 48]; 4],
}

/// TDX fields a [`Policy`] pins besides the measurement. Each `Some` must equal the verified TD
/// report's field exactly; a quote without TD report fields (SGX, simulated) is then refused.
///
/// MRCONFIGID, MROWNER and MROWNERCONFIG are chosen by whoever launches the TD and are not part of
/// [`tdx_measurement`]; pin them when the deployment uses them (all zeros when it does not).
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct TdxPolicy {
    pub mr_config_id: Option<[u8; 48]>,
    pub mr_owner: Option<[u8; 48]>,
    pub mr_owner_config: Option<[u8; 48]>,
    /// The exact TDATTRIBUTES. `None` checks only that DEBUG is clear (unless
    /// [`Policy::allow_debug`]), on top of the attribute checks `dcap-qvl` makes (no reserved
    /// bits, no migration, SEPT_VE_DISABLE set).
    pub td_attributes: Option<[u8; 8]>,
}

impl TdxPolicy {
    /// Whether nothing is pinned.
    pub fn is_empty(&self) -> bool {
        *self == TdxPolicy::default()
    }
}

/// The data owner's conditions for trusting a quote.
#[derive(Clone, Debug, Default, PartialEq, Eq)]
pub struct Policy {
    /// The measurement the owner audited. `None` accepts any code on a genuine TEE, which is rarely
    /// what an owner wants outside development.
    pub expected_measurement: Option<[u8; 32]>,
    /// Accept [`QuoteKind::Simulated`] quotes. Never in production.
    pub allow_simulated: bool,
    /// Accept debug enclaves / TDs, whose memory the host can read.
    pub allow_debug: bool,
    /// TCB statuses accepted for DCAP quotes, e.g. `["UpToDate"]`. Empty accepts none (fail closed).
    pub accepted_tcb: Vec<String>,
    /// TDX fields pinned besides the measurement (none by default).
    pub tdx: TdxPolicy,
}

impl Policy {
    /// Production: this measurement, an up-to-date platform, no debug, no simulation.
    pub fn strict(measurement: [u8; 32]) -> Policy {
        Policy {
            expected_measurement: Some(measurement),
            allow_simulated: false,
            allow_debug: false,
            accepted_tcb: vec!["UpToDate".into()],
            tdx: TdxPolicy::default(),
        }
    }

    /// Development with [`SimulatedAttestation`]: accepts simulated quotes of this measurement.
    pub fn simulated(measurement: [u8; 32]) -> Policy {
        Policy { allow_simulated: true, ..Policy::strict(measurement) }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum AttestationError {
    #[error("{SIMULATED_WARNING}; the policy refuses simulated quotes (allow_simulated is off)")]
    SimulatedNotAllowed,
    #[error("{kind} quote: signature does not verify (the quote was altered or signed by another key)")]
    BadSignature { kind: QuoteKind },
    #[error("malformed {kind} quote: {reason}")]
    Malformed { kind: QuoteKind, reason: String },
    #[error("this verifier checks {expected} quotes, but got a {found} quote")]
    WrongKind { expected: &'static str, found: QuoteKind },
    #[error("{kind} measurement mismatch: expected {expected}, found {found}")]
    MeasurementMismatch { kind: QuoteKind, expected: String, found: String },
    #[error("{kind} TCB status {status} is not accepted (policy accepts {accepted:?}; advisories {advisories:?})")]
    TcbNotAccepted { kind: QuoteKind, status: String, accepted: Vec<String>, advisories: Vec<String> },
    #[error("{kind} quote comes from a debug enclave, whose memory the host can read; the policy refuses it")]
    Debug { kind: QuoteKind },
    #[error("{kind} {field} mismatch: expected {expected}, found {found}")]
    TdxFieldMismatch { kind: QuoteKind, field: &'static str, expected: String, found: String },
    #[error("the policy pins the TDX field {field}, but a {kind} quote has no TD report to check it against")]
    TdxFieldAbsent { kind: QuoteKind, field: &'static str },
    #[error("DCAP quote verification failed: {0}")]
    Dcap(String),
    #[error("DCAP collateral: {0}")]
    Collateral(String),
    #[error("attestation is not available: {0}")]
    Unavailable(String),
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("the OS random number generator failed: {0}")]
    Random(String),
}

/// The enclave side: produces quotes.
pub trait AttestationProvider: Send + Sync {
    fn kind(&self) -> QuoteKind;
    /// A quote binding `report_data` to this enclave's measurement.
    fn quote(&self, report_data: [u8; 64]) -> Result<Quote, AttestationError>;
}

/// The data owner's side: checks quotes.
pub trait QuoteVerifier {
    /// Verifies `quote` as of `now_unix` (seconds; collateral and certificates must be valid then)
    /// and applies `policy`.
    fn verify(&self, quote: &Quote, policy: &Policy, now_unix: u64) -> Result<VerifiedReport, AttestationError>;
}

/// Lower-case hex, for measurements in messages.
pub fn hex(bytes: &[u8]) -> String {
    bytes.iter().map(|b| format!("{b:02x}")).collect()
}

/// The policy checks common to all kinds, after the quote itself has been authenticated.
fn check_measurement(report: &VerifiedReport, policy: &Policy) -> Result<(), AttestationError> {
    match policy.expected_measurement {
        Some(expected) if expected != report.measurement => Err(AttestationError::MeasurementMismatch {
            kind: report.kind,
            expected: hex(&expected),
            found: hex(&report.measurement),
        }),
        _ => Ok(()),
    }
}

/// The policy's TDX pins against the report's TD fields: each pinned field must be present and equal.
fn check_tdx(report: &VerifiedReport, policy: &Policy) -> Result<(), AttestationError> {
    let (p, td) = (&policy.tdx, report.tdx.as_ref());
    let checks = [
        ("MRCONFIGID", p.mr_config_id.as_ref().map(|v| &v[..]), td.map(|t| &t.mr_config_id[..])),
        ("MROWNER", p.mr_owner.as_ref().map(|v| &v[..]), td.map(|t| &t.mr_owner[..])),
        ("MROWNERCONFIG", p.mr_owner_config.as_ref().map(|v| &v[..]), td.map(|t| &t.mr_owner_config[..])),
        ("TDATTRIBUTES", p.td_attributes.as_ref().map(|v| &v[..]), td.map(|t| &t.td_attributes[..])),
    ];
    for (field, expected, found) in checks {
        let Some(expected) = expected else { continue };
        let Some(found) = found else {
            return Err(AttestationError::TdxFieldAbsent { kind: report.kind, field });
        };
        if found != expected {
            return Err(AttestationError::TdxFieldMismatch {
                kind: report.kind,
                field,
                expected: hex(expected),
                found: hex(found),
            });
        }
    }
    Ok(())
}

fn random_32() -> Result<[u8; 32], AttestationError> {
    let mut b = [0u8; 32];
    getrandom::fill(&mut b).map_err(|e| AttestationError::Random(e.to_string()))?;
    Ok(b)
}

// ---------------------------------------------------------------------------------------------
// Simulation
// ---------------------------------------------------------------------------------------------

const SIM_MAGIC: &[u8; 6] = b"TSSIM1";
const SIM_SIGNED_LEN: usize = 6 + 32 + 64;
const SIM_QUOTE_LEN: usize = SIM_SIGNED_LEN + 64;

/// SIMULATED attestation: provides no security, for development and CI only.
///
/// A "quote" is `"TSSIM1" || measurement (32) || report_data (64) || ed25519 signature (64)` under
/// a key generated at construction. Anyone holding that key, or any process that builds its own
/// provider, can claim any measurement; the verifier only learns that the quote came from the
/// provider whose public key it was handed. It lets the upload protocol and its tests run on
/// machines without SGX or TDX.
pub struct SimulatedAttestation {
    key: SigningKey,
    measurement: [u8; 32],
}

impl SimulatedAttestation {
    /// A provider claiming `measurement`, with a fresh signing key from the OS CSPRNG.
    pub fn new(measurement: [u8; 32]) -> Result<SimulatedAttestation, AttestationError> {
        eprintln!("warning: {SIMULATED_WARNING}");
        Ok(SimulatedAttestation { key: SigningKey::from_bytes(&random_32()?), measurement })
    }

    /// A provider whose measurement is the SHA-256 of the file at `path` (e.g. the running binary),
    /// mimicking how MRENCLAVE follows the code.
    pub fn for_binary(path: impl AsRef<Path>) -> Result<SimulatedAttestation, AttestationError> {
        let path = path.as_ref();
        let bytes = std::fs::read(path).map_err(|source| AttestationError::Io { path: path.into(), source })?;
        SimulatedAttestation::new(Sha256::digest(&bytes).into())
    }

    pub fn measurement(&self) -> [u8; 32] {
        self.measurement
    }

    /// The verifier that trusts this provider's key (hand it to the data owner out of band).
    pub fn verifier(&self) -> SimulatedVerifier {
        SimulatedVerifier { trusted_key: self.key.verifying_key() }
    }
}

impl AttestationProvider for SimulatedAttestation {
    fn kind(&self) -> QuoteKind {
        QuoteKind::Simulated
    }

    fn quote(&self, report_data: [u8; 64]) -> Result<Quote, AttestationError> {
        let mut bytes = Vec::with_capacity(SIM_QUOTE_LEN);
        bytes.extend_from_slice(SIM_MAGIC);
        bytes.extend_from_slice(&self.measurement);
        bytes.extend_from_slice(&report_data);
        let sig = self.key.sign(&bytes);
        bytes.extend_from_slice(&sig.to_bytes());
        Ok(Quote { bytes, kind: QuoteKind::Simulated })
    }
}

/// Verifies [`SimulatedAttestation`] quotes. SIMULATED attestation: provides no security, for
/// development and CI only.
#[derive(Clone, Debug)]
pub struct SimulatedVerifier {
    pub trusted_key: VerifyingKey,
}

impl QuoteVerifier for SimulatedVerifier {
    fn verify(&self, quote: &Quote, policy: &Policy, _now_unix: u64) -> Result<VerifiedReport, AttestationError> {
        let kind = QuoteKind::Simulated;
        if quote.kind != kind {
            return Err(AttestationError::WrongKind { expected: "simulated", found: quote.kind });
        }
        let b = &quote.bytes;
        if b.len() != SIM_QUOTE_LEN {
            let reason = format!("{} bytes, expected {SIM_QUOTE_LEN}", b.len());
            return Err(AttestationError::Malformed { kind, reason });
        }
        if &b[..6] != SIM_MAGIC {
            let reason = format!("starts with {:02x?}, expected \"TSSIM1\"", &b[..6]);
            return Err(AttestationError::Malformed { kind, reason });
        }
        let sig = Signature::from_bytes(b[SIM_SIGNED_LEN..].try_into().expect("64 bytes"));
        self.trusted_key
            .verify_strict(&b[..SIM_SIGNED_LEN], &sig)
            .map_err(|_| AttestationError::BadSignature { kind })?;
        // Authentic; now the policy. Refusing simulation comes after the signature check only so
        // that a forged quote is reported as forged.
        if !policy.allow_simulated {
            return Err(AttestationError::SimulatedNotAllowed);
        }
        let report = VerifiedReport {
            kind,
            measurement: b[6..38].try_into().expect("32 bytes"),
            report_data: b[38..102].try_into().expect("64 bytes"),
            tcb_status: "SIMULATED".into(),
            advisories: vec![SIMULATED_WARNING.into()],
            tdx: None,
        };
        check_measurement(&report, policy)?;
        check_tdx(&report, policy)?;
        Ok(report)
    }
}

// ---------------------------------------------------------------------------------------------
// DCAP (SGX and TDX)
// ---------------------------------------------------------------------------------------------

pub use dcap_qvl::QuoteCollateralV3;

/// The 32-byte measurement used for TDX: SHA-256(MRTD || RTMR0 || RTMR1 || RTMR2 || RTMR3).
///
/// MRTD covers only the initial TD contents (the virtual firmware); the kernel, its command line,
/// the initrd and anything measured at run time are extended into the RTMRs. Hashing all five pins
/// the whole boot chain, so a deployer computes the expected value from the five registers of a
/// reference TD.
pub fn tdx_measurement(mr_td: &[u8; 48], rtmrs: [&[u8; 48]; 4]) -> [u8; 32] {
    let mut h = Sha256::new();
    h.update(mr_td);
    for r in rtmrs {
        h.update(r);
    }
    h.finalize().into()
}

/// Verifies SGX and TDX DCAP quotes offline against Intel's root of trust and the given collateral.
///
/// The collateral (TCB info, QE identity, CRLs and their issuer chains) is fetched by the data owner
/// from Intel's PCS or a PCCS, e.g. with the `dcap-qvl` command-line tool, and expires (typically
/// after 30 days); verification at a time outside its validity fails.
pub struct DcapVerifier {
    pub collateral: QuoteCollateralV3,
}

impl DcapVerifier {
    pub fn new(collateral: QuoteCollateralV3) -> DcapVerifier {
        DcapVerifier { collateral }
    }

    /// Collateral in the JSON form `dcap-qvl` writes (and its sample files use).
    pub fn from_json(json: &[u8]) -> Result<DcapVerifier, AttestationError> {
        let collateral = serde_json::from_slice(json).map_err(|e| AttestationError::Collateral(e.to_string()))?;
        Ok(DcapVerifier { collateral })
    }
}

impl QuoteVerifier for DcapVerifier {
    fn verify(&self, quote: &Quote, policy: &Policy, now_unix: u64) -> Result<VerifiedReport, AttestationError> {
        if quote.kind == QuoteKind::Simulated {
            return Err(AttestationError::WrongKind { expected: "SGX or TDX DCAP", found: quote.kind });
        }
        // dcap-qvl checks the certificate chains, CRLs, collateral validity at `now`, the QE report,
        // the quote signature, the TCB level and the enclave / TD attributes. Debug enclaves are
        // refused there unless the policy allows them.
        let dcap = dcap_qvl::verify::QuoteVerifier::new_prod()
            .allow_debug(policy.allow_debug)
            .verify(&quote.bytes, &self.collateral, now_unix)
            .map_err(|e| AttestationError::Dcap(format!("{e:#}")))?;

        let (kind, measurement, report_data, debug, tdx) = if let Some(r) = dcap.report.as_sgx() {
            // SGX ATTRIBUTES.FLAGS bit 1 is DEBUG.
            (QuoteKind::SgxDcap, r.mr_enclave, r.report_data, r.attributes[0] & 0x02 != 0, None)
        } else if let Some(r) = dcap.report.as_td10() {
            // TDATTRIBUTES byte 0 bit 0 is DEBUG.
            let m = tdx_measurement(&r.mr_td, [&r.rt_mr0, &r.rt_mr1, &r.rt_mr2, &r.rt_mr3]);
            let fields = TdReportFields {
                td_attributes: r.td_attributes,
                mr_td: r.mr_td,
                mr_config_id: r.mr_config_id,
                mr_owner: r.mr_owner,
                mr_owner_config: r.mr_owner_config,
                rtmr: [r.rt_mr0, r.rt_mr1, r.rt_mr2, r.rt_mr3],
            };
            (QuoteKind::TdxDcap, m, r.report_data, r.td_attributes[0] & 0x01 != 0, Some(fields))
        } else {
            return Err(AttestationError::Dcap("quote holds neither an SGX nor a TDX report".into()));
        };
        if kind != quote.kind {
            let reason = format!("labelled {} but holds a {kind} report", quote.kind);
            return Err(AttestationError::Malformed { kind: quote.kind, reason });
        }
        let report = VerifiedReport {
            kind,
            measurement,
            report_data,
            tcb_status: dcap.status,
            advisories: dcap.advisory_ids,
            tdx,
        };
        apply_dcap_policy(report, debug, policy)
    }
}

/// The policy's checks on an authenticated DCAP report; `debug` is the quote's DEBUG attribute.
fn apply_dcap_policy(report: VerifiedReport, debug: bool, policy: &Policy) -> Result<VerifiedReport, AttestationError> {
    // Already enforced by dcap-qvl; repeated here so the policy does not depend on its defaults.
    if debug && !policy.allow_debug {
        return Err(AttestationError::Debug { kind: report.kind });
    }
    check_measurement(&report, policy)?;
    check_tdx(&report, policy)?;
    if !policy.accepted_tcb.contains(&report.tcb_status) {
        return Err(AttestationError::TcbNotAccepted {
            kind: report.kind,
            status: report.tcb_status,
            accepted: policy.accepted_tcb.clone(),
            advisories: report.advisories,
        });
    }
    Ok(report)
}

/// SGX DCAP quotes from inside a Gramine enclave (`sgx.remote_attestation = "dcap"`).
///
/// Gramine exposes the quoting enclave as pseudo-files: writing 64 bytes to
/// `/dev/attestation/user_report_data` sets the report data, and reading `/dev/attestation/quote`
/// then returns a quote over it. Untested on hardware: this project's machines have no SGX.
pub struct GramineDcapProvider {
    root: PathBuf,
}

impl GramineDcapProvider {
    /// The provider at `/dev/attestation`; fails with [`AttestationError::Unavailable`] outside
    /// Gramine-SGX or when remote attestation is not enabled in the manifest.
    pub fn new() -> Result<GramineDcapProvider, AttestationError> {
        GramineDcapProvider::at("/dev/attestation")
    }

    /// The provider at another directory (for tests).
    pub fn at(root: impl Into<PathBuf>) -> Result<GramineDcapProvider, AttestationError> {
        let root = root.into();
        let ty = root.join("attestation_type");
        match std::fs::read_to_string(&ty) {
            Ok(t) if t.trim() == "dcap" => Ok(GramineDcapProvider { root }),
            Ok(t) => Err(AttestationError::Unavailable(format!(
                "{} says {:?}; set sgx.remote_attestation = \"dcap\" in the Gramine manifest",
                ty.display(),
                t.trim()
            ))),
            Err(e) => Err(AttestationError::Unavailable(format!(
                "cannot read {} ({e}); not running under Gramine-SGX with remote attestation enabled",
                ty.display()
            ))),
        }
    }
}

impl AttestationProvider for GramineDcapProvider {
    fn kind(&self) -> QuoteKind {
        QuoteKind::SgxDcap
    }

    fn quote(&self, report_data: [u8; 64]) -> Result<Quote, AttestationError> {
        let io = |path: PathBuf| move |source| AttestationError::Io { path, source };
        let urd = self.root.join("user_report_data");
        std::fs::write(&urd, report_data).map_err(io(urd))?;
        let q = self.root.join("quote");
        let bytes = std::fs::read(&q).map_err(io(q))?;
        Ok(Quote { bytes, kind: QuoteKind::SgxDcap })
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    /// An authenticated TDX report, as [`DcapVerifier`] builds it, with these TD attributes.
    fn td_report(td_attributes: [u8; 8]) -> VerifiedReport {
        VerifiedReport {
            kind: QuoteKind::TdxDcap,
            measurement: [7; 32],
            report_data: [0; 64],
            tcb_status: "UpToDate".into(),
            advisories: vec![],
            tdx: Some(TdReportFields {
                td_attributes,
                mr_td: [1; 48],
                mr_config_id: [2; 48],
                mr_owner: [3; 48],
                mr_owner_config: [4; 48],
                rtmr: [[5; 48]; 4],
            }),
        }
    }

    /// No recorded quote comes from a debug TD (and dcap-qvl refuses one before this point), so the
    /// policy's own DEBUG check is tested on a report built here.
    #[test]
    fn td_debug_bit_is_refused_by_default_and_an_attributes_pin_is_exact() {
        const DEBUG: [u8; 8] = [0x01, 0, 0, 0x10, 0, 0, 0, 0];
        const NORMAL: [u8; 8] = [0x00, 0, 0, 0x10, 0, 0, 0, 0];
        let strict = Policy::strict([7; 32]);
        apply_dcap_policy(td_report(NORMAL), false, &strict).unwrap();
        let err = apply_dcap_policy(td_report(DEBUG), true, &strict).unwrap_err();
        assert!(matches!(err, AttestationError::Debug { kind: QuoteKind::TdxDcap }), "{err}");
        let debug_ok = Policy { allow_debug: true, ..strict.clone() };
        apply_dcap_policy(td_report(DEBUG), true, &debug_ok).unwrap();
        // A pinned value is compared whole, even where the debug check would let it pass.
        let pinned = Policy { tdx: TdxPolicy { td_attributes: Some(NORMAL), ..TdxPolicy::default() }, ..debug_ok };
        apply_dcap_policy(td_report(NORMAL), false, &pinned).unwrap();
        let err = apply_dcap_policy(td_report(DEBUG), true, &pinned).unwrap_err();
        assert!(matches!(err, AttestationError::TdxFieldMismatch { field: "TDATTRIBUTES", .. }), "{err}");
        assert!(err.to_string().contains(&format!("expected {}, found {}", hex(&NORMAL), hex(&DEBUG))), "{err}");
    }
}
