//! The device side: serve one connection, or listen for many (`trustsplit device --listen`).
//!
//! Error policy: a malformed request inside an intact frame (garbage header, bad geometry, wrong
//! operand lengths, unknown tag) gets an `Error` reply and the connection keeps going, since the
//! next frame is unaffected. The connection is closed when the framing breaks (bad magic or
//! version, an oversized frame), when the handshake fails, or after a backend panic (the backend
//! may be left inconsistent). A timeout while idle between requests is not an error: the trusted
//! side may spend a long time on its own work between device calls.
//!
//! A listener authenticates every connection before it does anything for it: the link's handshake
//! ([`trustsplit_boundary::Link`]) comes first, and only a client whose key is allowed gets a
//! backend or any allocation beyond the handshake's few KiB. At most [`MAX_HANDSHAKES`] connections
//! may be in their handshake at once and at most [`ServeOptions::max_connections`] authenticated
//! ones be served; beyond either, a connection is closed at once. A served connection idle for
//! [`ServeOptions::idle_limit`] is closed. (Whoever can open many connections to the port can
//! still delay others' handshakes by up to the handshake's deadline: the link protects what is
//! sent, not the worker's availability.)

use crate::backend::{run_op, Backend};
use crate::error::DeviceError;
use crate::protocol::{self, Hello, HelloOk, DEVICE_PROTOCOL};
use std::net::{SocketAddr, TcpListener, TcpStream};
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::sync::atomic::{AtomicUsize, Ordering};
use std::sync::Arc;
use trustsplit_boundary::{Channel, ChannelError, ChannelOptions, KeyPair, Link, LinkPolicy, TcpChannel};

/// The purpose the device link's handshake names.
pub const LINK_PURPOSE: &str = "device";

/// How a listener's connections are secured.
pub enum LinkSecurity {
    /// The authenticated, encrypted link with this worker's key, serving the clients `allowed`.
    Authenticated { key: Arc<KeyPair>, allowed: LinkPolicy },
    /// Plain TCP: anyone who reaches the port is served and everything is readable on the
    /// network (`--insecure-plaintext-link`).
    InsecurePlaintext,
}

/// How a listener serves.
pub struct ServeOptions {
    pub channel: ChannelOptions,
    pub security: LinkSecurity,
    /// Authenticated connections served at once; more are closed once they authenticate.
    pub max_connections: usize,
    /// A served connection that sends no request for this long is closed.
    pub idle_limit: std::time::Duration,
}

/// Connections in their handshake at once; more are closed as they arrive.
pub const MAX_HANDSHAKES: usize = 64;

/// The idle limit of `trustsplit device` (and [`serve`]): ten minutes.
pub const DEFAULT_IDLE_LIMIT: std::time::Duration = std::time::Duration::from_secs(600);

/// Sends an error reply, cut to what a client accepts for one.
fn send_error(channel: &mut dyn Channel, msg: &str) -> Result<(), ChannelError> {
    let mut end = msg.len().min(protocol::SMALL_REPLY_BYTES);
    while !msg.is_char_boundary(end) {
        end -= 1;
    }
    channel.send(protocol::ERROR, &msg.as_bytes()[..end])
}

/// Serves requests from one connection until it closes or sends Shutdown, with the default
/// frame limit.
pub fn serve(channel: &mut dyn Channel, backend: &mut dyn Backend) -> Result<(), DeviceError> {
    serve_with_limit(channel, backend, ChannelOptions::default().max_frame_bytes, DEFAULT_IDLE_LIMIT)
}

/// [`serve`] with this end's frame limit (it should match the channel's options) and idle limit.
pub fn serve_with_limit(
    channel: &mut dyn Channel,
    backend: &mut dyn Backend,
    max_frame_bytes: usize,
    idle_limit: std::time::Duration,
) -> Result<(), DeviceError> {
    let limit = handshake(channel, backend, max_frame_bytes)?;
    let peer = channel.peer();
    let channel_error = |error: ChannelError| DeviceError::Channel {
        device: format!("serving {peer}"),
        op: "waiting for a request".into(),
        error,
    };
    let mut last_request = std::time::Instant::now();
    loop {
        let frame = match channel.recv() {
            Ok(f) => f,
            Err(ChannelError::Closed { .. }) => return Ok(()),
            Err(ChannelError::Timeout { .. }) if last_request.elapsed() < idle_limit => continue,
            Err(ChannelError::Timeout { .. }) => {
                return Err(DeviceError::Protocol(format!("{peer}: idle for {idle_limit:?}; connection closed")))
            }
            Err(e) => return Err(channel_error(e)),
        };
        last_request = std::time::Instant::now();
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
                        let _ = send_error(channel, &msg);
                        return Err(DeviceError::Backend(msg));
                    }
                }
            }
        };
        let sent = match reply {
            Ok(y) => channel.send(protocol::RESULT, &protocol::f32_bytes(&y)),
            Err(msg) => send_error(channel, &msg),
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
    let first = channel.recv_limited(protocol::SMALL_REPLY_BYTES).map_err(|error| DeviceError::Channel {
        device: format!("serving {peer}"),
        op: "handshake".into(),
        error,
    })?;
    let refuse = |channel: &mut dyn Channel, msg: String| {
        let _ = send_error(channel, &msg);
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
    /// `make_backend` (a GPU backend per connection keeps clients independent) once the client
    /// has authenticated. If the backend cannot be made, the client gets the reason as an
    /// `Error` reply to its `Hello`.
    pub fn run(
        self,
        make_backend: impl Fn() -> Result<Box<dyn Backend>, DeviceError> + Send + Sync + 'static,
        opts: ServeOptions,
        log: impl Fn(&str) + Send + Sync + 'static,
    ) -> Result<(), DeviceError> {
        let make_backend = Arc::new(make_backend);
        let log = Arc::new(log);
        let opts = Arc::new(opts);
        let (handshaking, active) = (Arc::new(AtomicUsize::new(0)), Arc::new(AtomicUsize::new(0)));
        log(&format!("device listening on {}", self.local_addr()?));
        for stream in self.listener.incoming() {
            let stream = match stream {
                Ok(s) => s,
                Err(e) => {
                    log(&format!("accept failed: {e}"));
                    continue;
                }
            };
            let peer = stream.peer_addr().map(|a| a.to_string()).unwrap_or_else(|_| "a client".into());
            let Some(handshake) = ConnectionSlot::take(&handshaking, MAX_HANDSHAKES) else {
                log(&format!("{peer}: refused: {MAX_HANDSHAKES} connections are in their handshake already"));
                continue;
            };
            let (make_backend, thread_log, opts) = (Arc::clone(&make_backend), Arc::clone(&log), Arc::clone(&opts));
            let active = Arc::clone(&active);
            let spawned = std::thread::Builder::new().name("device-connection".into()).spawn(move || {
                serve_connection(stream, handshake, &active, make_backend.as_ref(), &opts, thread_log.as_ref())
            });
            if let Err(e) = spawned {
                log(&format!("cannot start a connection thread: {e}"));
            }
        }
        Ok(())
    }
}

/// A connection's place in a count, freed when dropped (when the connection's thread ends,
/// however it ends).
struct ConnectionSlot(Arc<AtomicUsize>);

impl ConnectionSlot {
    /// A place in `count` if fewer than `cap` are taken.
    fn take(count: &Arc<AtomicUsize>, cap: usize) -> Option<ConnectionSlot> {
        if count.fetch_add(1, Ordering::SeqCst) >= cap {
            count.fetch_sub(1, Ordering::SeqCst);
            return None;
        }
        Some(ConnectionSlot(Arc::clone(count)))
    }
}

impl Drop for ConnectionSlot {
    fn drop(&mut self) {
        self.0.fetch_sub(1, Ordering::SeqCst);
    }
}

fn serve_connection(
    stream: TcpStream,
    handshake: ConnectionSlot,
    active: &Arc<AtomicUsize>,
    make_backend: &dyn Fn() -> Result<Box<dyn Backend>, DeviceError>,
    opts: &ServeOptions,
    log: &dyn Fn(&str),
) {
    let mut channel: Box<dyn Channel> = match &opts.security {
        LinkSecurity::Authenticated { key, allowed } => {
            match Link::accept(stream, LINK_PURPOSE, key, allowed, opts.channel) {
                Ok(link) => {
                    log(&format!("{}: authenticated as {}", link.peer(), link.remote_key()));
                    Box::new(link)
                }
                Err(e) => return log(&format!("refused a connection: {e}")),
            }
        }
        LinkSecurity::InsecurePlaintext => match TcpChannel::from_stream(stream, opts.channel) {
            Ok(c) => Box::new(c),
            Err(e) => return log(&format!("connection setup failed: {e}")),
        },
    };
    drop(handshake);
    let peer = channel.peer();
    let Some(_served) = ConnectionSlot::take(active, opts.max_connections) else {
        log(&format!("{peer}: refused: {} connections are being served already", opts.max_connections));
        let msg = format!("this worker serves {} connections already; try again later", opts.max_connections);
        return answer_hello_with_error(channel.as_mut(), &msg);
    };
    let mut backend = match make_backend() {
        Ok(b) => b,
        Err(e) => {
            log(&format!("{peer}: refusing: {e}"));
            return answer_hello_with_error(channel.as_mut(), &e.to_string());
        }
    };
    log(&format!("{peer}: connected, serving on {}", backend.name()));
    match serve_with_limit(channel.as_mut(), backend.as_mut(), opts.channel.max_frame_bytes, opts.idle_limit) {
        Ok(()) => log(&format!("{peer}: disconnected")),
        Err(e) => log(&format!("{peer}: connection ended: {e}")),
    }
}

/// Refuses a connection that will not be served: answers its Hello (if it arrives) with `msg`, so
/// the client sees why.
fn answer_hello_with_error(channel: &mut dyn Channel, msg: &str) {
    let _ = channel.recv_limited(protocol::SMALL_REPLY_BYTES);
    let _ = send_error(channel, msg);
}

/// Listens on `addr` and serves each connection on its own thread. Returns only if binding fails.
pub fn listen(
    addr: &str,
    make_backend: impl Fn() -> Result<Box<dyn Backend>, DeviceError> + Send + Sync + 'static,
    opts: ServeOptions,
    log: impl Fn(&str) + Send + Sync + 'static,
) -> Result<(), DeviceError> {
    DeviceListener::bind(addr)?.run(make_backend, opts, log)
}
