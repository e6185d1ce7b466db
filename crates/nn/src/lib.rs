//! Neural-network layers with explicit forward and backward passes, the model zoo, optimizers
//! and checkpoints.
//!
//! There is no autograd tape: `forward` returns what `backward` will need (`Saved`), and the
//! caller hands it back. Every scheme can therefore decide, layer by layer, which side of the
//! trust boundary computes what.

pub mod checkpoint;
pub mod layers;
pub mod model;
pub mod optim;
mod saved_codec;
pub mod tensor;
pub mod zoo;

pub use layers::{Layer, Mode, Saved};
pub use model::Model;
pub use tensor::Tensor;
