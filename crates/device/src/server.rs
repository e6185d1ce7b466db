//! The device side: serve one connection, or listen for many (`trustsplit device --listen`).
//!
//! Error policy: a malformed request inside an intact frame (garbage header, bad geometry, wrong
//! operand lengths, unknown tag) gets an `Error` reply and the connection keeps going, since the
//! next frame is unaffected. The connection is closed when the framing breaks (bad magic or
//! version, an oversized frame), when the handshake fails, or after a backend panic (the backend
//! may be left inconsistent). A timeout while idle between requests is not an error: the trusted
//! side may spend a long time on its own work between device calls.

use crate::backend::{run_op, Backend};
use crate::error::DeviceError;
use crate::protocol::{self, Hello, HelloOk, DEVICE_PROTOCOL};
use std::net::{SocketAddr, TcpListener};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::Arc;
use trustsplit_boundary::{Channel, ChannelError, ChannelOptions, TcpChannel};

/// Serves requests from one connection until it closes or sends Shutdown, with the default
/// frame limit.
pub fn serve(channel: &mut dyn Channel, backend: &mut dyn Backend) -> Result<(), DeviceError> {
    serve_with_limit(channel, backend, ChannelOptions::default().max_frame_bytes)
}

/// [`serve`] with this end's frame limit (it should match the channel's options).
pub fn serve_with_limit(
    channel: &mut dyn Channel,
    backend: &mut dyn Backend,
    max_frame_bytes: usize,
) -> Result<(), DeviceError> {
    let limit = handshake(channel, backend, max_frame_bytes)?;
    let peer = channel.peer();
    let channel_error = |error: ChannelError| DeviceError::Channel {
        device: format!("serving {peer}"),
        op: "waiting for a request".into(),
        error,
    };
    loop {
        let frame = match channel.recv() {
            Ok(f) => f,
            Err(ChannelError::Closed { .. }) => return Ok(()),
            Err(ChannelError::Timeout { .. }) => continue,
            Err(e) => return Err(channel_error(e)),
        };
        if frame.tag == protocol::SHUTDOWN {
            return Ok(());
        }
        let reply = match protocol::decode_request(frame.tag, &frame.payload, limit) {
            Err(msg) => Err(msg),
            Ok((op, a, b)) => {
                let outcome = catch_unwind(AssertUnwindSafe(|| run_op(backend, &op, &a, &b)));
                match outcome {
                    Ok(Ok(y)) if y.len() == op.sizes().map(|s| s.out).unwrap_or(usize::MAX) => Ok(y),
                    Ok(Ok(y)) => Err(format!("{op}: backend {} returned {} values (bug)", backend.name(), y.len())),
                    Ok(Err(e)) => Err(format!("{op}: {e}")),
                    Err(panic) => {
                        let msg = format!("{op}: backend {} panicked: {}", backend.name(), panic_message(&panic));
                        let _ = channel.send(protocol::ERROR, msg.as_bytes());
                        return Err(DeviceError::Backend(msg));
                    }
                }
            }
        };
        let sent = match reply {
            Ok(y) => channel.send(protocol::RESULT, &protocol::f32_bytes(&y)),
            Err(msg) => channel.send(protocol::ERROR, msg.as_bytes()),
        };
        match sent {
            Ok(()) => {}
            Err(ChannelError::Closed { .. }) => return Ok(()),
            Err(e) => return Err(channel_error(e)),
        }
    }
}

/// Expects `Hello`, answers `HelloOk`; returns the frame limit both ends accept.
fn handshake(channel: &mut dyn Channel, backend: &dyn Backend, max_frame_bytes: usize) -> Result<usize, DeviceError> {
    let peer = channel.peer();
    let first = channel.recv().map_err(|error| DeviceError::Channel {
        device: format!("serving {peer}"),
        op: "handshake".into(),
        error,
    })?;
    let refuse = |channel: &mut dyn Channel, msg: String| {
        let _ = channel.send(protocol::ERROR, msg.as_bytes());
        Err(DeviceError::Protocol(format!("{peer}: {msg}")))
    };
    if first.tag != protocol::HELLO {
        return refuse(channel, format!("expected Hello first, got {}", protocol::tag_name(first.tag)));
    }
    let hello: Hello = match postcard::from_bytes(&first.payload) {
        Ok(h) => h,
        Err(e) => return refuse(channel, format!("malformed Hello: {e}")),
    };
    if hello.protocol != DEVICE_PROTOCOL {
        return refuse(
            channel,
            format!("client speaks device protocol {}, this device {DEVICE_PROTOCOL}", hello.protocol),
        );
    }
    let ok = HelloOk { protocol: DEVICE_PROTOCOL, backend: backend.name(), max_frame_bytes: max_frame_bytes as u64 };
    channel
        .send(protocol::HELLO_OK, &postcard::to_stdvec(&ok).expect("encodes"))
        .map_err(|error| DeviceError::Channel { device: format!("serving {peer}"), op: "handshake".into(), error })?;
    Ok(usize::try_from(hello.max_frame_bytes).unwrap_or(usize::MAX).min(max_frame_bytes))
}

/// The text of a caught panic.
pub(crate) fn panic_message(p: &Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "(non-string panic payload)".into())
}

/// A bound TCP listener for device connections.
pub struct DeviceListener {
    listener: TcpListener,
}

impl DeviceListener {
    /// Binds `addr` (use port 0 for any free port).
    pub fn bind(addr: &str) -> Result<DeviceListener, DeviceError> {
        let listener = TcpListener::bind(addr).map_err(|e| DeviceError::Io(format!("cannot listen on {addr}: {e}")))?;
        Ok(DeviceListener { listener })
    }

    pub fn local_addr(&self) -> Result<SocketAddr, DeviceError> {
        self.listener.local_addr().map_err(|e| DeviceError::Io(e.to_string()))
    }

    /// Accepts connections forever, serving each on its own thread with a fresh backend from
    /// `make_backend` (a GPU backend per connection keeps clients independent). If the backend
    /// cannot be made, the client gets the reason as an `Error` reply to its `Hello`.
    pub fn run(
        self,
        make_backend: impl Fn() -> Result<Box<dyn Backend>, DeviceError> + Send + Sync + 'static,
        opts: ChannelOptions,
        log: impl Fn(&str) + Send + Sync + 'static,
    ) -> Result<(), DeviceError> {
        let make_backend = Arc::new(make_backend);
        let log = Arc::new(log);
        log(&format!("device listening on {}", self.local_addr()?));
        for stream in self.listener.incoming() {
            let stream = match stream {
                Ok(s) => s,
                Err(e) => {
                    log(&format!("accept failed: {e}"));
                    continue;
                }
            };
            let (make_backend, thread_log) = (Arc::clone(&make_backend), Arc::clone(&log));
            let spawned = std::thread::Builder::new()
                .name("device-connection".into())
                .spawn(move || serve_connection(stream, make_backend.as_ref(), opts, thread_log.as_ref()));
            if let Err(e) = spawned {
                log(&format!("cannot start a connection thread: {e}"));
            }
        }
        Ok(())
    }
}

fn serve_connection(
    stream: std::net::TcpStream,
    make_backend: &dyn Fn() -> Result<Box<dyn Backend>, DeviceError>,
    opts: ChannelOptions,
    log: &dyn Fn(&str),
) {
    let mut channel = match TcpChannel::from_stream(stream, opts) {
        Ok(c) => c,
        Err(e) => return log(&format!("connection setup failed: {e}")),
    };
    let peer = channel.peer();
    let mut backend = match make_backend() {
        Ok(b) => b,
        Err(e) => {
            log(&format!("{peer}: refusing: {e}"));
            // Answer the Hello (if it arrives) so the client sees why.
            let _ = channel.recv();
            let _ = channel.send(protocol::ERROR, e.to_string().as_bytes());
            return;
        }
    };
    log(&format!("{peer}: connected, serving on {}", backend.name()));
    match serve_with_limit(&mut channel, backend.as_mut(), opts.max_frame_bytes) {
        Ok(()) => log(&format!("{peer}: disconnected")),
        Err(e) => log(&format!("{peer}: connection ended: {e}")),
    }
}

/// Listens on `addr` and serves each connection on its own thread. Returns only if binding fails.
pub fn listen(
    addr: &str,
    make_backend: impl Fn() -> Result<Box<dyn Backend>, DeviceError> + Send + Sync + 'static,
    opts: ChannelOptions,
    log: impl Fn(&str) + Send + Sync + 'static,
) -> Result<(), DeviceError> {
    DeviceListener::bind(addr)?.run(make_backend, opts, log)
}
