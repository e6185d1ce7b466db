//! Per-sample low-rank / residual split (being written).
