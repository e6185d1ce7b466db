//! Remote devices: over an in-process channel and TCP, malformed requests, dead and hung devices.

mod common;

use common::*;
use std::net::TcpListener;
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};
use trustsplit_boundary::{
    Channel, ChannelError, ChannelOptions, InProcessChannel, KeyPair, Link, LinkPolicy, TcpChannel, Transcript,
};
use trustsplit_device::protocol::{self, Hello, HelloOk, DEVICE_PROTOCOL};
use trustsplit_device::{
    serve, Backend, CpuBackend, Device, DeviceError, DeviceListener, GemmShape, LinkSecurity, Op, ServeOptions,
    LINK_PURPOSE,
};
use trustsplit_kernels::ConvGeometry;

fn opts(timeout_ms: u64) -> ChannelOptions {
    ChannelOptions { max_frame_bytes: 64 << 20, timeout: Some(Duration::from_millis(timeout_ms)) }
}

/// A worker's serving options: its key, the clients it allows, at most `max_connections`.
fn serving(worker: &Arc<KeyPair>, allowed: LinkPolicy, max_connections: usize) -> ServeOptions {
    let security = LinkSecurity::Authenticated { key: Arc::clone(worker), allowed };
    ServeOptions { channel: opts(5000), security, max_connections, idle_limit: trustsplit_device::DEFAULT_IDLE_LIMIT }
}

/// Starts a CPU worker on a free port; returns its address and its log.
fn start_worker(
    options: ServeOptions,
    make_backend: impl Fn() -> Result<Box<dyn Backend>, DeviceError> + Send + Sync + 'static,
) -> (String, Arc<Mutex<Vec<String>>>) {
    let listener = DeviceListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let log = Arc::new(Mutex::new(Vec::<String>::new()));
    let sink = Arc::clone(&log);
    thread::spawn(move || listener.run(make_backend, options, move |line| sink.lock().unwrap().push(line.to_string())));
    (addr, log)
}

fn cpu_backend() -> Result<Box<dyn Backend>, DeviceError> {
    Ok(Box::new(CpuBackend::new(1)?))
}

/// Connects to a worker over the link.
fn link_to(addr: &str, client: &KeyPair, worker: &KeyPair) -> Result<Link, ChannelError> {
    Link::connect(addr, LINK_PURPOSE, client, &LinkPolicy::Only(vec![worker.public()]), opts(5000))
}

/// A CPU device served on a thread over an in-process channel.
fn in_process_device(threads: usize, o: ChannelOptions) -> (Device, thread::JoinHandle<Result<(), DeviceError>>) {
    let (client, mut server) = InProcessChannel::pair(o);
    let handle = thread::spawn(move || {
        let mut backend = CpuBackend::new(threads).unwrap();
        serve(&mut server, &mut backend)
    });
    (Device::remote(Box::new(client)).unwrap(), handle)
}

/// Runs random ops on `remote` and on a local CPU backend with the same thread count: the results
/// must be bit-identical (the protocol moves f32 bytes verbatim).
fn check_against_local(remote: &mut Device, threads: usize, seed: u64) {
    let t = Transcript::new();
    let mut rng = Rng::new(seed);
    let mut cpu = CpuBackend::new(threads).unwrap();
    for (ta, tb) in [(false, false), (true, false), (false, true), (true, true)] {
        let s = rng.gemm_shape(ta, tb);
        let (a, b) = (rng.values(s.m * s.k), rng.values(s.k * s.n));
        let got = remote.gemm(&s, &release(&t, a.clone()), &release(&t, b.clone())).unwrap();
        assert_bits(&got, &cpu.gemm(&s, &a, &b).unwrap(), &format!("remote {s:?}"));
        assert_close(&got, &naive_gemm(&s, &a, &b), 1e-5, "remote gemm vs naive");
    }
    for i in 0..6 {
        let g = if i == 0 { strided_geometry() } else { rng.geometry() };
        let (x, w, dy) = (rng.values(g.input_len()), rng.values(g.weight_len()), rng.values(g.output_len()));
        let (rx, rw, rdy) = (release(&t, x.clone()), release(&t, w.clone()), release(&t, dy.clone()));
        assert_bits(&remote.conv_forward(&g, &rx, &rw).unwrap(), &cpu.conv_forward(&g, &x, &w).unwrap(), "fwd");
        assert_bits(
            &remote.conv_backward_data(&g, &rdy, &rw).unwrap(),
            &cpu.conv_backward_data(&g, &dy, &w).unwrap(),
            "bwd data",
        );
        assert_bits(
            &remote.conv_backward_weight(&g, &rx, &rdy).unwrap(),
            &cpu.conv_backward_weight(&g, &x, &dy).unwrap(),
            "bwd weight",
        );
    }
}

#[test]
fn in_process_remote_matches_local_and_counts_bytes() {
    let (mut dev, server) = in_process_device(2, opts(5000));
    assert_eq!(dev.name(), "cpu (2 threads) at in-process peer B");
    check_against_local(&mut dev, 2, 10);
    let stats = dev.stats();
    assert_eq!(stats.requests, 4 + 6 * 3);
    assert!(stats.bytes_sent > 0 && stats.bytes_received > 0);
    // A device error leaves the connection usable.
    let t = Transcript::new();
    let s = GemmShape { m: 1, n: 1, k: 1, trans_a: false, trans_b: false };
    let bad = dev.gemm(&s, &release(&t, vec![1.0; 2]), &release(&t, vec![1.0]));
    assert!(matches!(bad, Err(DeviceError::Invalid(_))), "client-side validation");
    assert_eq!(dev.gemm(&s, &release(&t, vec![2.0]), &release(&t, vec![3.0])).unwrap(), vec![6.0]);
    dev.shutdown();
    server.join().unwrap().unwrap();
}

#[test]
fn tcp_remote_matches_local_with_concurrent_clients() {
    let (worker, client) = (Arc::new(KeyPair::generate().unwrap()), KeyPair::generate().unwrap());
    let (addr, log) = start_worker(serving(&worker, LinkPolicy::Only(vec![client.public()]), 8), cpu_backend);
    let client = Arc::new(client);
    let clients: Vec<_> = (0..2)
        .map(|i| {
            let (addr, client, worker) = (addr.clone(), Arc::clone(&client), Arc::clone(&worker));
            thread::spawn(move || {
                let channel = link_to(&addr, &client, &worker).unwrap();
                let mut dev = Device::remote_with_limit(Box::new(channel), 64 << 20).unwrap();
                assert!(dev.name().starts_with("cpu (1 threads) at 127.0.0.1:"), "{}", dev.name());
                check_against_local(&mut dev, 1, 20 + i);
                dev.shutdown();
            })
        })
        .collect();
    for c in clients {
        c.join().unwrap();
    }
    let deadline = Instant::now() + Duration::from_secs(5);
    while log.lock().unwrap().iter().filter(|l| l.ends_with("disconnected")).count() < 2 {
        assert!(Instant::now() < deadline, "log: {:?}", log.lock().unwrap());
        thread::sleep(Duration::from_millis(20));
    }
    assert!(log.lock().unwrap()[0].starts_with("device listening on 127.0.0.1:"));
}

#[test]
fn plaintext_workers_serve_plaintext_clients_only_when_asked() {
    let options = ServeOptions {
        channel: opts(5000),
        security: LinkSecurity::InsecurePlaintext,
        max_connections: 8,
        idle_limit: trustsplit_device::DEFAULT_IDLE_LIMIT,
    };
    let (addr, _) = start_worker(options, cpu_backend);
    let mut dev = Device::remote(Box::new(TcpChannel::connect(&addr, opts(5000)).unwrap())).unwrap();
    check_against_local(&mut dev, 1, 3);
    // A link client to a plaintext worker fails its handshake with a clear error.
    let (client, worker) = (KeyPair::generate().unwrap(), KeyPair::generate().unwrap());
    let err = link_to(&addr, &client, &worker).unwrap_err();
    assert!(matches!(err, ChannelError::Handshake { .. } | ChannelError::Closed { .. }), "{err}");
}

#[test]
fn a_worker_serves_only_allowed_keys_and_does_nothing_for_anyone_else() {
    let (worker, client, stranger) =
        (Arc::new(KeyPair::generate().unwrap()), KeyPair::generate().unwrap(), KeyPair::generate().unwrap());
    let backends = Arc::new(std::sync::atomic::AtomicUsize::new(0));
    let made = Arc::clone(&backends);
    let (addr, log) = start_worker(serving(&worker, LinkPolicy::Only(vec![client.public()]), 8), move || {
        made.fetch_add(1, std::sync::atomic::Ordering::SeqCst);
        cpu_backend()
    });
    // A stranger's key is refused, and told so; no backend was made for it.
    let err = link_to(&addr, &stranger, &worker).unwrap_err();
    assert!(matches!(err, ChannelError::Refused { .. }), "{err}");
    // Junk, and a plaintext client, get nothing either.
    let mut junk = std::net::TcpStream::connect(&addr).unwrap();
    std::io::Write::write_all(&mut junk, &[0xff; 64]).unwrap();
    let mut plain = TcpChannel::connect(&addr, opts(2000)).unwrap();
    let _ = plain.send(protocol::HELLO, &[0u8; 8]);
    assert!(plain.recv().is_err());
    assert_eq!(backends.load(std::sync::atomic::Ordering::SeqCst), 0, "log: {:?}", log.lock().unwrap());
    // The allowed client is served.
    let mut dev = Device::remote(Box::new(link_to(&addr, &client, &worker).unwrap())).unwrap();
    check_against_local(&mut dev, 1, 5);
    assert_eq!(backends.load(std::sync::atomic::Ordering::SeqCst), 1);
    // --allow-any serves any authenticated client.
    let (addr, _) = start_worker(serving(&worker, LinkPolicy::AnyAuthenticated, 8), cpu_backend);
    let mut dev = Device::remote(Box::new(link_to(&addr, &stranger, &worker).unwrap())).unwrap();
    check_against_local(&mut dev, 1, 6);
}

#[test]
fn connections_beyond_the_cap_are_refused_and_silent_ones_take_no_served_place() {
    let (worker, client) = (Arc::new(KeyPair::generate().unwrap()), KeyPair::generate().unwrap());
    let (addr, log) = start_worker(serving(&worker, LinkPolicy::Only(vec![client.public()]), 1), cpu_backend);
    // Silent connections that never authenticate do not count against the served connections.
    let _silent: Vec<_> = (0..3).map(|_| std::net::TcpStream::connect(&addr).unwrap()).collect();
    let first = Device::remote(Box::new(link_to(&addr, &client, &worker).unwrap())).unwrap();
    let err = Device::remote(Box::new(link_to(&addr, &client, &worker).unwrap())).err().expect("over the cap");
    assert!(err.to_string().contains("serves 1 connections already"), "{err}");
    assert!(log.lock().unwrap().iter().any(|l| l.contains("connections are being served already")));
    // The place comes back when the first client leaves.
    first.shutdown();
    let deadline = Instant::now() + Duration::from_secs(5);
    loop {
        match link_to(&addr, &client, &worker) {
            Ok(link) => {
                Device::remote(Box::new(link)).unwrap();
                break;
            }
            Err(e) => assert!(Instant::now() < deadline, "{e}"),
        }
        thread::sleep(Duration::from_millis(20));
    }
}

#[test]
fn a_request_for_a_result_far_larger_than_its_operands_is_refused_on_both_ends() {
    // k = 0, m = n = 16384: 1 GiB of zeros from no operands.
    let op = Op::Gemm(GemmShape { m: 16384, k: 0, n: 16384, trans_a: false, trans_b: false });
    let sizes = op.sizes().unwrap();
    assert!(op.check_result_size(&sizes).unwrap_err().contains("refused"));
    // Over the wire, a smaller one that fits the frame limit: 32 MiB of zeros from nothing.
    let op = Op::Gemm(GemmShape { m: 4096, k: 0, n: 2048, trans_a: false, trans_b: false });
    let (mut c, server) = raw_session();
    let (tag, payload) = protocol::encode_request(&op, &[], &[]);
    c.send(tag, &payload).unwrap();
    let reply = c.recv().unwrap();
    assert_eq!(reply.tag, protocol::ERROR);
    assert!(String::from_utf8_lossy(&reply.payload).contains("refused"));
    c.send(protocol::SHUTDOWN, &[]).unwrap();
    server.join().unwrap().unwrap();
}

#[test]
fn a_tcp_device_announcing_a_1_gib_reply_fails_the_call_before_sending_any_of_it() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let fake_device = thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        let mut raw = stream.try_clone().unwrap();
        let mut ch = TcpChannel::from_stream(stream, opts(5000)).unwrap();
        ch.recv().unwrap();
        let ok = HelloOk { protocol: DEVICE_PROTOCOL, backend: "fake".into(), max_frame_bytes: 64 << 20 };
        ch.send(protocol::HELLO_OK, &postcard::to_stdvec(&ok).unwrap()).unwrap();
        ch.recv().unwrap();
        // A header announcing 1 GiB, and then nothing: the client must not wait for it.
        std::io::Write::write_all(&mut raw, &trustsplit_boundary::channel::header(protocol::RESULT, 1 << 30)).unwrap();
        thread::sleep(Duration::from_secs(3));
    });
    let mut dev = Device::remote(Box::new(TcpChannel::connect(&addr, opts(5000)).unwrap())).unwrap();
    let shape = GemmShape { m: 2, k: 2, n: 2, trans_a: false, trans_b: false };
    let t = Transcript::new();
    let start = Instant::now();
    let err = dev.gemm(&shape, &release(&t, vec![1.0; 4]), &release(&t, vec![1.0; 4])).unwrap_err();
    assert!(start.elapsed() < Duration::from_secs(2), "{err} after {:?}", start.elapsed());
    assert!(err.to_string().contains(&format!("{} bytes exceeds the limit of 4096 bytes", 1u64 << 30)), "{err}");
    fake_device.join().unwrap();
}

#[test]
fn a_device_announcing_a_reply_larger_than_the_result_fails_the_call_at_once() {
    let (client, mut fake) = InProcessChannel::pair(opts(5000));
    let fake_device = thread::spawn(move || {
        fake.recv().unwrap();
        let ok = HelloOk { protocol: DEVICE_PROTOCOL, backend: "fake".into(), max_frame_bytes: 64 << 20 };
        fake.send(protocol::HELLO_OK, &postcard::to_stdvec(&ok).unwrap()).unwrap();
        fake.recv().unwrap();
        // 16 MiB where 4 values were asked for.
        fake.send(protocol::RESULT, &vec![0u8; 16 << 20]).unwrap();
    });
    let mut dev = Device::remote(Box::new(client)).unwrap();
    let shape = GemmShape { m: 2, k: 2, n: 2, trans_a: false, trans_b: false };
    let t = Transcript::new();
    let err = dev.gemm(&shape, &release(&t, vec![1.0; 4]), &release(&t, vec![1.0; 4])).unwrap_err();
    assert!(err.to_string().contains("exceeds the limit of 4096 bytes"), "{err}");
    fake_device.join().unwrap();
}

#[test]
fn listen_fails_clearly_on_a_bad_address() {
    let worker = Arc::new(KeyPair::generate().unwrap());
    let options = serving(&worker, LinkPolicy::AnyAuthenticated, 8);
    let err = trustsplit_device::listen("256.0.0.1:1", || Err(DeviceError::Io("unused".into())), options, |_| {})
        .unwrap_err();
    assert!(err.to_string().contains("cannot listen on 256.0.0.1:1"), "{err}");
}

/// A raw client: handshake done by hand so tests can send anything afterwards.
fn raw_session() -> (InProcessChannel, thread::JoinHandle<Result<(), DeviceError>>) {
    let (mut client, mut server) = InProcessChannel::pair(opts(5000));
    let handle = thread::spawn(move || {
        let mut backend = CpuBackend::new(1).unwrap();
        serve(&mut server, &mut backend)
    });
    let hello = Hello { protocol: DEVICE_PROTOCOL, max_frame_bytes: 64 << 20 };
    client.send(protocol::HELLO, &postcard::to_stdvec(&hello).unwrap()).unwrap();
    let ok: HelloOk = postcard::from_bytes(&client.recv_tag(protocol::HELLO_OK).unwrap()).unwrap();
    assert_eq!(ok.backend, "cpu (1 threads)");
    (client, handle)
}

/// Sends one frame and returns the Error reply's text (panics on any other reply).
fn error_reply(c: &mut InProcessChannel, tag: u16, payload: &[u8]) -> String {
    c.send(tag, payload).unwrap();
    let f = c.recv().unwrap();
    assert_eq!(f.tag, protocol::ERROR, "expected an Error reply");
    String::from_utf8(f.payload).unwrap()
}

#[test]
fn malformed_requests_get_clear_errors_and_the_server_keeps_serving() {
    let (mut c, server) = raw_session();
    let g = strided_geometry();
    let (x, w) = (vec![0.5f32; g.input_len()], vec![0.25f32; g.weight_len()]);
    let expect = |msg: String, needle: &str| assert!(msg.contains(needle), "{msg:?} should mention {needle:?}");

    // Bad geometry: stride 0, a kernel larger than the padded input, overflowing padding.
    let (tag, p) = protocol::encode_request(&Op::ConvForward(ConvGeometry { stride: 0, ..g }), &x, &w);
    expect(error_reply(&mut c, tag, &p), "stride must be at least 1");
    let big = ConvGeometry { kernel_h: 20, ..g };
    let (tag, p) = protocol::encode_request(&Op::ConvBackwardData(big), &[], &[]);
    expect(error_reply(&mut c, tag, &p), "larger than the padded input");
    let (tag, p) =
        protocol::encode_request(&Op::ConvForward(ConvGeometry { padding: usize::MAX / 2 + 1, ..g }), &[], &[]);
    expect(error_reply(&mut c, tag, &p), "overflows");
    // Sizes whose products overflow, and a result too large for a frame.
    let huge = GemmShape { m: usize::MAX / 2, n: 4, k: 4, trans_a: false, trans_b: false };
    let (tag, p) = protocol::encode_request(&Op::Gemm(huge), &[], &[]);
    expect(error_reply(&mut c, tag, &p), "gemm operand A (m*k) overflows");
    let wide = GemmShape { m: 1 << 20, n: 1 << 20, k: 0, trans_a: false, trans_b: false };
    let (tag, p) = protocol::encode_request(&Op::Gemm(wide), &[], &[]);
    expect(error_reply(&mut c, tag, &p), "frame limit");
    // Wrong operand length (the declared lengths still add up to the payload).
    let (tag, p) = protocol::encode_request(&Op::ConvForward(g), &x[1..], &w);
    expect(error_reply(&mut c, tag, &p), "operand x has");
    // Truncated payload.
    let (tag, mut p) = protocol::encode_request(&Op::ConvBackwardWeight(g), &x, &vec![0.0; g.output_len()]);
    p.truncate(p.len() - 3);
    expect(error_reply(&mut c, tag, &p), "truncated");
    // Unknown tag, a reply tag sent as a request, garbage and empty headers.
    expect(error_reply(&mut c, 0x0299, b"hi"), "unknown tag 0x0299");
    expect(error_reply(&mut c, protocol::RESULT, &[]), "Result (0x0220) is not a request");
    expect(error_reply(&mut c, protocol::GEMM, &[0xff; 7]), "malformed request header");
    expect(error_reply(&mut c, protocol::CONV_FORWARD, &[]), "malformed request header");
    expect(error_reply(&mut c, protocol::HELLO, &[]), "Hello (0x0200) is not a request");

    // Still serving: a valid request works.
    let s = GemmShape { m: 1, n: 2, k: 2, trans_a: false, trans_b: false };
    let (tag, p) = protocol::encode_request(&Op::Gemm(s), &[1.0, 2.0], &[1.0, 2.0, 3.0, 4.0]);
    c.send(tag, &p).unwrap();
    let r = c.recv_tag(protocol::RESULT).unwrap();
    assert_eq!(protocol::read_f32s(&r).unwrap(), vec![7.0, 10.0]);
    c.send(protocol::SHUTDOWN, &[]).unwrap();
    server.join().unwrap().unwrap();
}

#[test]
fn handshake_violations_are_refused() {
    // A request before Hello.
    let (mut c, mut s) = InProcessChannel::pair(opts(2000));
    let server = thread::spawn(move || serve(&mut s, &mut CpuBackend::new(1).unwrap()));
    let msg = error_reply(&mut c, protocol::GEMM, &[]);
    assert!(msg.contains("expected Hello first"), "{msg}");
    assert!(matches!(server.join().unwrap(), Err(DeviceError::Protocol(_))));
    // A newer protocol.
    let (mut c, mut s) = InProcessChannel::pair(opts(2000));
    let server = thread::spawn(move || serve(&mut s, &mut CpuBackend::new(1).unwrap()));
    let hello = Hello { protocol: 99, max_frame_bytes: 1 << 20 };
    let msg = error_reply(&mut c, protocol::HELLO, &postcard::to_stdvec(&hello).unwrap());
    assert!(msg.contains("protocol 99"), "{msg}");
    assert!(server.join().unwrap().is_err());
    // The client side of a refusal.
    let (c, mut s) = InProcessChannel::pair(opts(2000));
    let server = thread::spawn(move || {
        s.recv().unwrap();
        s.send(protocol::ERROR, b"busy").unwrap();
    });
    let err = Device::remote(Box::new(c)).err().expect("refused");
    assert!(err.to_string().contains("refused the connection: busy"), "{err}");
    server.join().unwrap();
}

/// Answers the handshake by hand, then hands the channel to `then` for the first request.
fn fake_device(
    server: impl Channel + 'static,
    then: impl FnOnce(Box<dyn Channel>) + Send + 'static,
) -> thread::JoinHandle<()> {
    let mut server: Box<dyn Channel> = Box::new(server);
    thread::spawn(move || {
        server.recv_tag(protocol::HELLO).unwrap();
        let ok = HelloOk { protocol: DEVICE_PROTOCOL, backend: "fake".into(), max_frame_bytes: 64 << 20 };
        server.send(protocol::HELLO_OK, &postcard::to_stdvec(&ok).unwrap()).unwrap();
        server.recv().unwrap();
        then(server)
    })
}

fn small_gemm(dev: &mut Device) -> Result<Vec<f32>, DeviceError> {
    let t = Transcript::new();
    let s = GemmShape { m: 2, n: 2, k: 2, trans_a: false, trans_b: true };
    dev.gemm(&s, &release(&t, vec![1.0; 4]), &release(&t, vec![1.0; 4]))
}

#[test]
fn a_hung_device_times_out_naming_the_operation() {
    let (client, server) = InProcessChannel::pair(opts(300));
    let fake = fake_device(server, |channel| {
        thread::sleep(Duration::from_millis(1500)); // never answers in time
        drop(channel);
    });
    let mut dev = Device::remote(Box::new(client)).unwrap();
    let start = Instant::now();
    let err = small_gemm(&mut dev).unwrap_err();
    let waited = start.elapsed();
    assert!(waited >= Duration::from_millis(250) && waited < Duration::from_millis(1200), "{waited:?}");
    assert!(matches!(&err, DeviceError::Channel { error: ChannelError::Timeout { .. }, .. }), "{err:?}");
    let msg = err.to_string();
    assert!(msg.contains("fake at in-process peer B") && msg.contains("gemm m=2 n=2 k=2 B^T"), "{msg}");
    assert!(msg.contains("no answer within 300ms"), "{msg}");
    // The stream is out of step now; the handle refuses further use instead of mixing replies.
    let again = small_gemm(&mut dev).unwrap_err();
    assert!(matches!(again, DeviceError::Broken { .. }), "{again}");
    fake.join().unwrap();
}

#[test]
fn a_device_that_dies_mid_request_gives_closed() {
    let (client, server) = InProcessChannel::pair(opts(5000));
    let fake = fake_device(server, drop);
    let mut dev = Device::remote(Box::new(client)).unwrap();
    let err = small_gemm(&mut dev).unwrap_err();
    assert!(matches!(&err, DeviceError::Channel { error: ChannelError::Closed { .. }, .. }), "{err:?}");
    assert!(err.to_string().contains("gemm"), "{err}");
    fake.join().unwrap();
}

#[test]
fn a_tcp_device_killed_mid_request_gives_closed_quickly() {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let fake = thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        let channel = TcpChannel::from_stream(stream, opts(5000)).unwrap();
        fake_device(channel, drop).join().unwrap();
    });
    let mut dev = Device::remote(Box::new(TcpChannel::connect(&addr, opts(5000)).unwrap())).unwrap();
    let start = Instant::now();
    let err = small_gemm(&mut dev).unwrap_err();
    assert!(start.elapsed() < Duration::from_secs(3), "closed, not timed out");
    assert!(matches!(&err, DeviceError::Channel { error: ChannelError::Closed { .. }, .. }), "{err:?}");
    fake.join().unwrap();
}

#[test]
fn a_wrong_result_length_is_a_protocol_error() {
    let (client, server) = InProcessChannel::pair(opts(5000));
    let fake = fake_device(server, |mut channel| {
        channel.send(protocol::RESULT, &protocol::f32_bytes(&[1.0; 3])).unwrap();
    });
    let mut dev = Device::remote(Box::new(client)).unwrap();
    let err = small_gemm(&mut dev).unwrap_err();
    assert!(matches!(err, DeviceError::Protocol(_)), "{err}");
    assert!(err.to_string().contains("returned 3 values, expected 4"), "{err}");
    fake.join().unwrap();
}

#[test]
fn a_request_over_the_negotiated_frame_limit_is_refused_before_sending() {
    // The server allows the default 1 GiB, this client 4 KiB: the smaller limit applies.
    let (client, mut s) = InProcessChannel::pair(opts(5000));
    let server = thread::spawn(move || serve(&mut s, &mut CpuBackend::new(1).unwrap()));
    let mut dev = Device::remote_with_limit(Box::new(client), 4096).unwrap();
    let t = Transcript::new();
    let s = GemmShape { m: 40, n: 40, k: 1, trans_a: false, trans_b: false };
    let err = dev.gemm(&s, &release(&t, vec![1.0; 40]), &release(&t, vec![1.0; 40])).unwrap_err();
    assert!(matches!(err, DeviceError::Invalid(_)) && err.to_string().contains("frame limit"), "{err}");
    assert_eq!(dev.stats().bytes_sent, 0, "nothing was sent");
    let s = GemmShape { m: 2, n: 2, k: 1, trans_a: false, trans_b: false };
    assert_eq!(dev.gemm(&s, &release(&t, vec![1.0; 2]), &release(&t, vec![1.0; 2])).unwrap(), vec![1.0; 4]);
    dev.shutdown();
    server.join().unwrap().unwrap();
}

#[test]
fn an_idle_connection_is_closed_after_the_idle_limit() {
    let (worker, client) = (Arc::new(KeyPair::generate().unwrap()), KeyPair::generate().unwrap());
    let mut options = serving(&worker, LinkPolicy::Only(vec![client.public()]), 8);
    (options.channel.timeout, options.idle_limit) = (Some(Duration::from_millis(100)), Duration::from_millis(500));
    let (addr, log) = start_worker(options, cpu_backend);
    let mut dev = Device::remote(Box::new(link_to(&addr, &client, &worker).unwrap())).unwrap();
    check_against_local(&mut dev, 1, 7);
    thread::sleep(Duration::from_millis(1500));
    let t = Transcript::new();
    let shape = GemmShape { m: 2, k: 2, n: 2, trans_a: false, trans_b: false };
    assert!(dev.gemm(&shape, &release(&t, vec![1.0; 4]), &release(&t, vec![1.0; 4])).is_err());
    assert!(log.lock().unwrap().iter().any(|l| l.contains("idle for")), "{:?}", log.lock().unwrap());
}
