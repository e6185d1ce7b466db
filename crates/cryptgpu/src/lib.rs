//! CryptGPU: private training and inference among three parties that hold 2-out-of-3 replicated
//! secret shares over Z_2^64 (semi-honest, honest majority; Tan, Knott, Tian, Wu, S&P 2021).
//! No party sees the data, the weights, the gradients or the labels; there is no TEE.
//!
//! - [`ring`]: the ring and the fixed-point numbers it carries.
//! - [`gemm`]: ring products (matrix products, convolutions): where the compute goes.

pub mod arith;
pub mod gemm;
pub mod party;
pub mod prg;
pub mod ring;
