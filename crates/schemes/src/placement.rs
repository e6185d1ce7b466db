//! Where a scheme runs the linear layers (convolutions and fully connected layers).

use trustsplit_nn::layers::{Conv2d, Linear};
use trustsplit_nn::Tensor;

/// Errors a placement can raise (device failures, protocol errors).
pub type PlacementResult<T> = Result<T, String>;

/// A scheme's decision for the linear layers. Everything else runs inside the enclave.
///
/// `layer` names the layer (`layers.3`, `layers.7.main.0`) for the transcript; `is_input` is true
/// for the first layer, whose input is the raw private data.
pub trait Placement {
    fn conv_forward(&mut self, layer: &str, is_input: bool, conv: &Conv2d, x: &Tensor) -> PlacementResult<Tensor>;
    /// `dx` and `[dweight, dbias?]`.
    fn conv_backward(
        &mut self,
        layer: &str,
        conv: &Conv2d,
        x: &Tensor,
        dy: &Tensor,
    ) -> PlacementResult<(Tensor, Vec<Tensor>)>;
    fn linear_forward(&mut self, layer: &str, is_input: bool, lin: &Linear, x: &Tensor) -> PlacementResult<Tensor>;
    fn linear_backward(
        &mut self,
        layer: &str,
        lin: &Linear,
        x: &Tensor,
        dy: &Tensor,
    ) -> PlacementResult<(Tensor, Vec<Tensor>)>;
}

/// Computes the linear layers inside the trusted side, with the same kernels as plaintext.
pub struct Trusted;

impl Placement for Trusted {
    fn conv_forward(&mut self, _: &str, _: bool, conv: &Conv2d, x: &Tensor) -> PlacementResult<Tensor> {
        Ok(conv.forward(x))
    }
    fn conv_backward(
        &mut self,
        _: &str,
        conv: &Conv2d,
        x: &Tensor,
        dy: &Tensor,
    ) -> PlacementResult<(Tensor, Vec<Tensor>)> {
        Ok(conv.backward(x, dy))
    }
    fn linear_forward(&mut self, _: &str, _: bool, lin: &Linear, x: &Tensor) -> PlacementResult<Tensor> {
        Ok(lin.forward(x))
    }
    fn linear_backward(
        &mut self,
        _: &str,
        lin: &Linear,
        x: &Tensor,
        dy: &Tensor,
    ) -> PlacementResult<(Tensor, Vec<Tensor>)> {
        Ok(lin.backward(x, dy))
    }
}
