//! The untrusted device worker and the trusted side's handle on it.
//!
//! Devices compute only linear algebra on data the trusted side has released: GEMM and the three
//! convolution passes (f32, NCHW, groups = 1). A [`Backend`] does the arithmetic (our kernels on
//! the CPU, burn's wgpu backend, or cuBLAS); a [`Device`] is the trusted side's handle, either
//! in-process or over a [`Channel`](trustsplit_boundary::Channel) speaking the [`protocol`]; and
//! [`serve`] / [`listen`] run the device end of that channel.
//!
//! Nothing a device receives is trusted to be well-formed: every request is validated with
//! checked arithmetic before a kernel sees it, and a bad request gets an error reply, never a
//! panic. Nothing a device returns is trusted either: the handle checks result lengths, and the
//! schemes decide what else to verify.

pub mod backend;
pub mod client;
pub mod error;
pub mod lowering;
pub mod op;
pub mod protocol;
pub mod server;

#[cfg(feature = "cuda")]
pub mod cuda;
#[cfg(feature = "wgpu")]
pub mod wgpu;

pub use backend::{Backend, CpuBackend};
pub use client::{Device, DeviceStats};
pub use error::DeviceError;
pub use op::{GemmShape, Op};
pub use server::{
    listen, serve, serve_with_limit, DeviceListener, LinkSecurity, ServeOptions, DEFAULT_IDLE_LIMIT, LINK_PURPOSE,
    MAX_HANDSHAKES,
};

#[cfg(feature = "cuda")]
pub use cuda::CudaBackend;
#[cfg(feature = "wgpu")]
pub use wgpu::{WgpuAdapter, WgpuBackend};
