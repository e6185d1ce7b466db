//! CryptGPU: private training and inference among three parties that hold 2-out-of-3 replicated
//! secret shares over Z_2^64 (semi-honest, honest majority; Tan, Knott, Tian, Wu, S&P 2021).
//! No party sees the data, the weights, the gradients or the labels; there is no TEE.
//!
//! - [`ring`]: the ring and the fixed-point numbers it carries.
//! - [`gemm`]: ring products (matrix products, convolutions): where the compute goes.
//! - [`binary`]: XOR-shared words: AND, the sign bit of an arithmetic share, bit injection.
//! - [`compare`]: ReLU, maxima and pooling (max with a one-hot argmax, average).
//! - [`softmax`]: exp, reciprocal, row softmax and the cross-entropy gradient.
//! - [`model`]: the zoo's layers on shares, forward, backward and SGD.
//! - [`session`]: the data owner and the three parties; [`scheme`]: `--scheme cryptgpu`.
//! - [`network`]: the parties as separate processes, over authenticated, encrypted links.
//! - [`store`]: a party's shares of uploaded datasets, on its disk.

pub mod arith;
pub mod binary;
pub mod bitslice;
pub mod compare;
pub mod gemm;
pub mod model;
pub mod network;
pub mod party;
pub mod prg;
pub mod ring;
pub mod scheme;
pub mod session;
pub mod softmax;
pub mod store;
