//! `Device`: the trusted side's handle on an untrusted device, local or remote.
//!
//! Its operations accept only [`Released`] operands, so everything a device sees has a
//! transcript record. Results come back as plain vectors: they are untrusted data, checked here
//! only for length; schemes decide what else to verify.

use crate::backend::{run_op, Backend};
use crate::error::DeviceError;
use crate::op::{GemmShape, Op};
use crate::protocol::{self, Hello, HelloOk, DEVICE_PROTOCOL};
use serde::Serialize;
use std::time::Instant;
use trustsplit_boundary::{Channel, ChannelError, ChannelOptions, Released};
use trustsplit_kernels::ConvGeometry;

/// Traffic and time spent on one device.
#[derive(Clone, Debug, Default, Serialize)]
pub struct DeviceStats {
    /// Operations requested (including those that failed).
    pub requests: u64,
    /// Wall-clock seconds spent waiting for results (transfer included for remote devices).
    pub device_seconds: f64,
    /// Bytes sent: operand bytes for a local device, request payloads for a remote one.
    pub bytes_sent: u64,
    /// Bytes received: result bytes for a local device, reply payloads for a remote one.
    pub bytes_received: u64,
}

enum Transport {
    Local(Box<dyn Backend>),
    Remote {
        channel: Box<dyn Channel>,
        /// The smaller of the two ends' frame limits.
        max_frame_bytes: usize,
        /// Set when a failure left the connection out of step (a late reply may still arrive).
        broken: Option<String>,
    },
}

/// The trusted side's handle on a device. Only `Released` data can be sent to it.
pub struct Device {
    transport: Transport,
    name: String,
    stats: DeviceStats,
}

impl Device {
    /// A backend in this process (no serialisation).
    pub fn local(backend: Box<dyn Backend>) -> Device {
        let name = backend.name();
        Device { transport: Transport::Local(backend), name, stats: DeviceStats::default() }
    }

    /// A device served over `channel`, assuming the default frame limit on this end.
    pub fn remote(channel: Box<dyn Channel>) -> Result<Device, DeviceError> {
        Device::remote_with_limit(channel, ChannelOptions::default().max_frame_bytes)
    }

    /// A device served over `channel`, whose frames may be at most `max_frame_bytes` here.
    /// Performs the handshake: `Hello` -> `HelloOk` (or the device's error).
    pub fn remote_with_limit(mut channel: Box<dyn Channel>, max_frame_bytes: usize) -> Result<Device, DeviceError> {
        let peer = channel.peer();
        let wrap =
            |error: ChannelError| DeviceError::Channel { device: format!("at {peer}"), op: "handshake".into(), error };
        let hello = Hello { protocol: DEVICE_PROTOCOL, max_frame_bytes: max_frame_bytes as u64 };
        channel.send(protocol::HELLO, &postcard::to_stdvec(&hello).expect("encodes")).map_err(wrap)?;
        let reply = channel.recv_limited(protocol::SMALL_REPLY_BYTES).map_err(wrap)?;
        let ok: HelloOk = match reply.tag {
            protocol::HELLO_OK => postcard::from_bytes(&reply.payload)
                .map_err(|e| DeviceError::Protocol(format!("device at {peer}: malformed HelloOk: {e}")))?,
            protocol::ERROR => {
                let msg = trustsplit_boundary::printable(&reply.payload);
                return Err(DeviceError::Remote(format!("device at {peer} refused the connection: {msg}")));
            }
            other => {
                return Err(DeviceError::Protocol(format!(
                    "device at {peer}: expected HelloOk, got {}",
                    protocol::tag_name(other)
                )))
            }
        };
        if ok.protocol != DEVICE_PROTOCOL {
            return Err(DeviceError::Protocol(format!(
                "device at {peer} speaks device protocol {}, this side {DEVICE_PROTOCOL}",
                ok.protocol
            )));
        }
        let limit = usize::try_from(ok.max_frame_bytes).unwrap_or(usize::MAX).min(max_frame_bytes);
        Ok(Device {
            transport: Transport::Remote { channel, max_frame_bytes: limit, broken: None },
            name: format!("{} at {peer}", trustsplit_boundary::printable(ok.backend.as_bytes())),
            stats: DeviceStats::default(),
        })
    }

    /// The backend's name (and, for remote devices, the peer address).
    pub fn name(&self) -> String {
        self.name.clone()
    }

    pub fn stats(&self) -> DeviceStats {
        self.stats.clone()
    }

    pub fn gemm(
        &mut self,
        s: &GemmShape,
        a: &Released<impl AsRef<[f32]>>,
        b: &Released<impl AsRef<[f32]>>,
    ) -> Result<Vec<f32>, DeviceError> {
        self.call(Op::Gemm(*s), a.get().as_ref(), b.get().as_ref())
    }

    pub fn conv_forward(
        &mut self,
        g: &ConvGeometry,
        x: &Released<impl AsRef<[f32]>>,
        w: &Released<impl AsRef<[f32]>>,
    ) -> Result<Vec<f32>, DeviceError> {
        self.call(Op::ConvForward(*g), x.get().as_ref(), w.get().as_ref())
    }

    pub fn conv_backward_data(
        &mut self,
        g: &ConvGeometry,
        dy: &Released<impl AsRef<[f32]>>,
        w: &Released<impl AsRef<[f32]>>,
    ) -> Result<Vec<f32>, DeviceError> {
        self.call(Op::ConvBackwardData(*g), dy.get().as_ref(), w.get().as_ref())
    }

    pub fn conv_backward_weight(
        &mut self,
        g: &ConvGeometry,
        x: &Released<impl AsRef<[f32]>>,
        dy: &Released<impl AsRef<[f32]>>,
    ) -> Result<Vec<f32>, DeviceError> {
        self.call(Op::ConvBackwardWeight(*g), x.get().as_ref(), dy.get().as_ref())
    }

    /// Ends the session (remote: sends `Shutdown`; errors are ignored, the device may be gone).
    pub fn shutdown(self) {
        if let Transport::Remote { mut channel, .. } = self.transport {
            let _ = channel.send(protocol::SHUTDOWN, &[]);
        }
    }

    fn call(&mut self, op: Op, a: &[f32], b: &[f32]) -> Result<Vec<f32>, DeviceError> {
        let sizes = op.check_operands(a.len(), b.len()).map_err(DeviceError::Invalid)?;
        op.check_result_size(&sizes).map_err(DeviceError::Invalid)?;
        self.stats.requests += 1;
        let start = Instant::now();
        let result = match &mut self.transport {
            Transport::Local(backend) => {
                self.stats.bytes_sent += ((a.len() + b.len()) * 4) as u64;
                let y = run_op(backend.as_mut(), &op, a, b)?;
                self.stats.bytes_received += (y.len() * 4) as u64;
                y
            }
            Transport::Remote { channel, max_frame_bytes, broken } => {
                if let Some(reason) = broken {
                    return Err(DeviceError::Broken { device: self.name.clone(), reason: reason.clone() });
                }
                op.check_limit(&sizes, *max_frame_bytes).map_err(DeviceError::Invalid)?;
                let (tag, payload) = protocol::encode_request(&op, a, b);
                if payload.len() > *max_frame_bytes {
                    return Err(DeviceError::Invalid(format!(
                        "{op}: request of {} bytes exceeds the {max_frame_bytes}-byte frame limit; split the batch",
                        payload.len()
                    )));
                }
                // The reply is the result or an error message: a device announcing more is refused
                // before a byte of it is read.
                let expected = (sizes.out * 4).max(protocol::SMALL_REPLY_BYTES);
                let outcome = exchange(channel.as_mut(), &self.name, &op, tag, &payload, expected, &mut self.stats);
                if let Err(e) = &outcome {
                    // After a timeout, a dropped connection or a protocol violation the stream is
                    // out of step; an error reply leaves it usable.
                    if !matches!(e, DeviceError::Remote(_)) {
                        *broken = Some(e.to_string());
                    }
                }
                outcome?
            }
        };
        self.stats.device_seconds += start.elapsed().as_secs_f64();
        if result.len() != sizes.out {
            return Err(DeviceError::Protocol(format!(
                "device {}: {op} returned {} values, expected {}",
                self.name,
                result.len(),
                sizes.out
            )));
        }
        Ok(result)
    }
}

/// Sends one request and reads its reply.
fn exchange(
    channel: &mut dyn Channel,
    device: &str,
    op: &Op,
    tag: u16,
    payload: &[u8],
    max_reply: usize,
    stats: &mut DeviceStats,
) -> Result<Vec<f32>, DeviceError> {
    let wrap = |error: ChannelError| DeviceError::Channel { device: device.to_string(), op: op.to_string(), error };
    channel.send(tag, payload).map_err(wrap)?;
    stats.bytes_sent += payload.len() as u64;
    let reply = channel.recv_limited(max_reply).map_err(wrap)?;
    stats.bytes_received += reply.payload.len() as u64;
    match reply.tag {
        protocol::RESULT => protocol::read_f32s(&reply.payload)
            .map_err(|e| DeviceError::Protocol(format!("device {device}: {op}: result: {e}"))),
        protocol::ERROR => {
            Err(DeviceError::Remote(format!("{device}: {op}: {}", trustsplit_boundary::printable(&reply.payload))))
        }
        other => Err(DeviceError::Protocol(format!(
            "device {device}: {op}: expected Result or Error, got {}",
            protocol::tag_name(other)
        ))),
    }
}
