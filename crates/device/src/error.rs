//! Errors of device backends, the client handle and the server.

use trustsplit_boundary::ChannelError;

#[derive(Debug, thiserror::Error)]
pub enum DeviceError {
    /// The backend cannot run on this machine (no GPU, no driver library, ...).
    #[error("device unavailable: {0}")]
    Unavailable(String),
    /// The request itself is wrong (shape, operand lengths, size limits); nothing was computed.
    #[error("invalid device request: {0}")]
    Invalid(String),
    /// The device answered with an error message (it names the device and the operation).
    #[error("device error: {0}")]
    Remote(String),
    /// The connection to the device failed during an operation: it died, hung past the channel
    /// timeout, or sent something that is not a frame. `error` is kept for matching.
    #[error("device {device}: {op}: {error}")]
    Channel { device: String, op: String, error: ChannelError },
    /// The peer broke the device protocol (wrong reply, wrong result length, bad handshake).
    #[error("device protocol error: {0}")]
    Protocol(String),
    /// The backend failed while computing (a GPU runtime error, a panic inside the backend).
    #[error("device backend failed: {0}")]
    Backend(String),
    /// An earlier failure left the connection in an unknown state; the handle must be replaced.
    #[error("device {device} is unusable after an earlier failure ({reason}); reconnect")]
    Broken { device: String, reason: String },
    /// Listening for connections failed.
    #[error("device listener: {0}")]
    Io(String),
}
