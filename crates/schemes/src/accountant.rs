//! Rényi-DP accountant for the Gaussian releases of AsymML (being written).
