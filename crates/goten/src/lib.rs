//! Goten (Ng, Chow, Woo, Wong, Zhao; AAAI 2021): training with the linear layers' inputs,
//! weights and gradients all hidden from the GPUs, as additive shares in Z_p (p = 2^21 - 9) across
//! three non-colluding servers. Servers 0 and 1 each run an enclave and a device; server 2 supplies
//! the Beaver-style masks and computes their product on its device. The enclave quantises each
//! operand to 8 bits, outsources the product on shares, reconstructs, checks and dequantises it,
//! and runs every other layer, the loss and the optimizer itself.
//!
//! - [`field`]: Z_p with centred elements.
//! - [`quant`]: dynamic 8-bit stochastic quantisation.
//! - [`ops`]: the six bilinear ops, exact on field elements, and the check of a result.
//! - [`protocol`]: one op on shares across the three untrusted sides.
//! - [`server`]: an untrusted side's computations, in this process or as `trustsplit goten-server`;
//!   [`network`]: the servers' links; [`replica`]: the enclaves of servers 0 and 1 as two
//!   processes.
//! - [`placement`]: the layers that go to the servers; [`scheme`]: `--scheme goten`.

pub mod field;
pub mod network;
pub mod ops;
pub mod placement;
pub mod protocol;
pub mod quant;
pub mod replica;
pub mod scheme;
pub mod server;
