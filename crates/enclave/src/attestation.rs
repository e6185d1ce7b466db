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
}

impl Policy {
    /// Production: this measurement, an up-to-date platform, no debug, no simulation.
    pub fn strict(measurement: [u8; 32]) -> Policy {
        Policy {
            expected_measurement: Some(measurement),
            allow_simulated: false,
            allow_debug: false,
            accepted_tcb: vec!["UpToDate".into()],
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
        };
        check_measurement(&report, policy)?;
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

        let (kind, measurement, report_data, debug) = if let Some(r) = dcap.report.as_sgx() {
            // SGX ATTRIBUTES.FLAGS bit 1 is DEBUG.
            (QuoteKind::SgxDcap, r.mr_enclave, r.report_data, r.attributes[0] & 0x02 != 0)
        } else if let Some(r) = dcap.report.as_td10() {
            // TDATTRIBUTES byte 0 bit 0 is DEBUG.
            let m = tdx_measurement(&r.mr_td, [&r.rt_mr0, &r.rt_mr1, &r.rt_mr2, &r.rt_mr3]);
            (QuoteKind::TdxDcap, m, r.report_data, r.td_attributes[0] & 0x01 != 0)
        } else {
            return Err(AttestationError::Dcap("quote holds neither an SGX nor a TDX report".into()));
        };
        if kind != quote.kind {
            let reason = format!("labelled {} but holds a {kind} report", quote.kind);
            return Err(AttestationError::Malformed { kind: quote.kind, reason });
        }
        let report =
            VerifiedReport { kind, measurement, report_data, tcb_status: dcap.status, advisories: dcap.advisory_ids };

        // Already enforced by dcap-qvl; repeated here so the policy does not depend on its defaults.
        if debug && !policy.allow_debug {
            return Err(AttestationError::Debug { kind });
        }
        check_measurement(&report, policy)?;
        if !policy.accepted_tcb.contains(&report.tcb_status) {
            return Err(AttestationError::TcbNotAccepted {
                kind,
                status: report.tcb_status,
                accepted: policy.accepted_tcb.clone(),
                advisories: report.advisories,
            });
        }
        Ok(report)
    }
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
