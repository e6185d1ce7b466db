//! The tensor type: an `ndarray` array of f32 in standard (row-major, contiguous) layout.

use ndarray::{ArrayD, IxDyn};

/// An f32 tensor, always contiguous in row-major order (NCHW for images).
pub type Tensor = ArrayD<f32>;

/// A zero tensor of the given shape.
pub fn zeros(shape: &[usize]) -> Tensor {
    ArrayD::zeros(IxDyn(shape))
}

/// Builds a tensor from a shape and matching data.
pub fn from_vec(shape: &[usize], data: Vec<f32>) -> Tensor {
    ArrayD::from_shape_vec(IxDyn(shape), data).expect("tensor data length matches its shape")
}

/// The tensor's elements as a slice (tensors here are always contiguous).
pub fn data(t: &Tensor) -> &[f32] {
    t.as_slice().expect("tensors are kept contiguous")
}

/// The tensor's elements as a mutable slice.
pub fn data_mut(t: &mut Tensor) -> &mut [f32] {
    t.as_slice_mut().expect("tensors are kept contiguous")
}
