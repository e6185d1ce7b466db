//! The trusted execution environment's runtime.
//!
//! - [`memory`]: the enclave's memory budget (like SGX's usable EPC). Every buffer the trusted side
//!   keeps is accounted; past the budget, least-recently-used pages are sealed with AES-256-GCM and
//!   spilled to untrusted memory, then restored and authenticated on use.
//! - [`attestation`]: quotes and their verification (a simulation provider for development and CI,
//!   clearly insecure; SGX DCAP / TDX quote verification through `dcap-qvl`).
//! - [`tsm`]: TDX quotes from inside a confidential VM through Linux's configfs-tsm.
//! - [`upload`]: the data owner's side and the enclave's side of an attested key exchange followed by
//!   an encrypted dataset upload.

pub mod attestation;
pub mod memory;
pub mod tsm;
pub mod upload;
