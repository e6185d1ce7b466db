//! f32 compute kernels for NCHW tensors held in contiguous slices.
//!
//! Every kernel is pure compute: no I/O, no allocation policy beyond scratch buffers, no global
//! state. Kernels parallelise with rayon over whatever thread pool the caller installed, so the
//! trusted side can run them with one or two threads (`rayon::ThreadPool::install`) while a device
//! worker uses all cores. Each kernel is checked against naive f64 loops in `tests/`.
//!
//! `examples/` holds single-thread benchmarks that print their own baselines
//! (`cargo run --release -p trustsplit-kernels --example NAME`): `thin_conv`, `aliasing_columns`,
//! `input_gradient`, `expansion` and `weight_transforms` time kernels (most against the route
//! they replace); `memory_sweep` measures one core's read bandwidth by buffer size (the cache levels).

pub mod activation;
pub mod batchnorm;
pub mod channel_products;
pub mod conv;
pub mod elementwise;
pub mod geometry;
pub mod le_bytes;
pub mod linear;
pub mod loss;
pub mod matmul;
pub mod pool;
pub mod simd;
pub mod tap_products;
pub mod thin_conv;

pub use geometry::ConvGeometry;
pub use pool::PoolGeometry;
