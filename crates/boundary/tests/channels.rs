//! Frames, limits, malformed input, timeouts, dead peers, and the encrypted channel.

use std::io::Write;
use std::net::{TcpListener, TcpStream};
use std::time::{Duration, Instant};
use trustsplit_boundary::channel::{header, MAGIC};
use trustsplit_boundary::*;

fn opts(max: usize, timeout_ms: u64) -> ChannelOptions {
    ChannelOptions { max_frame_bytes: max, timeout: Some(Duration::from_millis(timeout_ms)) }
}

/// A TCP channel whose other end is a raw socket the test controls.
fn tcp_pair(o: ChannelOptions) -> (TcpChannel, TcpStream) {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let client = std::thread::spawn(move || TcpChannel::connect(&addr, o).unwrap());
    let (raw, _) = l.accept().unwrap();
    (client.join().unwrap(), raw)
}

#[test]
fn tcp_round_trip_between_two_channels() {
    let l = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = l.local_addr().unwrap().to_string();
    let server = std::thread::spawn(move || {
        let (s, _) = l.accept().unwrap();
        let mut c = TcpChannel::from_stream(s, ChannelOptions::default()).unwrap();
        let f = c.recv().unwrap();
        c.send(f.tag + 1, &f.payload.iter().rev().copied().collect::<Vec<u8>>()).unwrap();
    });
    let mut c = TcpChannel::connect(&addr, ChannelOptions::default()).unwrap();
    let payload: Vec<u8> = (0..100_000u32).map(|i| (i * 7) as u8).collect();
    c.send(41, &payload).unwrap();
    let back = c.recv_tag(42).unwrap();
    assert_eq!(back, payload.iter().rev().copied().collect::<Vec<u8>>());
    server.join().unwrap();
}

#[test]
fn malformed_frames_are_rejected_with_clear_errors() {
    let cases: Vec<(Vec<u8>, &str)> = vec![
        (b"HTTP/1.1 200 OK\r\n".to_vec(), "bad frame magic"),
        (
            {
                let mut h = header(1, 4).to_vec();
                h[4] = 9;
                h
            },
            "protocol version 9",
        ),
        (header(1, 1 << 20).to_vec(), "exceeds the limit"),
        (
            {
                let mut h = header(1, 10).to_vec();
                h.extend_from_slice(b"short");
                h
            },
            "in the middle of a 10-byte message",
        ),
        (MAGIC[..3].to_vec(), "connection closed"),
    ];
    for (bytes, want) in cases {
        let (mut c, mut raw) = tcp_pair(opts(1024, 2000));
        raw.write_all(&bytes).unwrap();
        drop(raw); // close after the bad bytes
        let err = c.recv().unwrap_err().to_string();
        assert!(err.contains(want), "expected '{want}' in: {err}");
    }
}

#[test]
fn oversized_sends_and_unexpected_tags_are_errors() {
    let (mut a, mut b) = InProcessChannel::pair(opts(16, 1000));
    assert!(a.send(1, &[0u8; 17]).unwrap_err().to_string().contains("exceeds the limit of 16"));
    a.send(3, b"x").unwrap();
    let err = b.recv_tag(4).unwrap_err().to_string();
    assert!(err.contains("expected message tag 4, got 3"), "{err}");
    let (mut c, _raw) = tcp_pair(opts(16, 1000));
    assert!(c.send(1, &[0u8; 17]).is_err());
}

#[test]
fn silent_or_dead_peers_time_out_or_close() {
    let (mut c, raw) = tcp_pair(opts(1024, 300));
    let t = Instant::now();
    let err = c.recv().unwrap_err();
    assert!(matches!(err, ChannelError::Timeout { .. }), "{err}");
    assert!(t.elapsed() < Duration::from_secs(5));
    drop(raw);
    let err = c.recv().unwrap_err();
    assert!(matches!(err, ChannelError::Closed { .. }), "{err}");

    let (mut a, b) = InProcessChannel::pair(opts(1024, 200));
    assert!(matches!(a.recv().unwrap_err(), ChannelError::Timeout { .. }));
    drop(b);
    assert!(matches!(a.recv().unwrap_err(), ChannelError::Closed { .. }));
}

#[test]
fn sending_to_a_dead_tcp_peer_says_the_connection_closed() {
    let (mut c, raw) = tcp_pair(opts(1 << 20, 1000));
    drop(raw);
    // The first writes may still land in the kernel's buffer; the peer's reset surfaces within a few.
    let err =
        (0..100).find_map(|_| c.send(1, &[0u8; 1 << 16]).err()).expect("sends to a closed socket kept succeeding");
    assert!(matches!(err, ChannelError::Closed { .. }), "{err}");
    assert!(err.to_string().contains("connection closed while sending"), "{err}");
}

#[test]
fn encrypted_channel_round_trips_and_hides_the_payload() {
    let (a, b) = InProcessChannel::pair(opts(1 << 20, 1000));
    let (k1, k2) = ([7u8; 32], [9u8; 32]);
    let mut ea = EncryptedChannel::new(a, &k1, &k2);
    let mut eb = EncryptedChannel::new(b, &k2, &k1);
    ea.send(5, b"private pixels").unwrap();
    ea.send(6, b"more").unwrap();
    assert_eq!(eb.recv().unwrap(), Frame { tag: 5, payload: b"private pixels".to_vec() });
    assert_eq!(eb.recv_tag(6).unwrap(), b"more");
    eb.send(1, b"ack").unwrap();
    assert_eq!(ea.recv_tag(1).unwrap(), b"ack");
}

/// A channel that lets the test alter, replay or reorder frames between two encrypted ends.
#[test]
fn tampering_replay_reordering_and_wrong_keys_fail_authentication() {
    let key_a = [1u8; 32];
    let key_b = [2u8; 32];
    type Mutate = fn(Vec<Frame>) -> Vec<Frame>;
    let mutations: [(&str, Mutate); 4] = [
        ("flip a bit", |mut f| {
            f[0].payload[3] ^= 1;
            f
        }),
        ("change the tag", |mut f| {
            f[0].tag ^= 1;
            f
        }),
        ("replay", |f| vec![f[0].clone(), f[0].clone()]),
        ("reorder", |f| vec![f[1].clone(), f[0].clone()]),
    ];
    for (what, mutate) in mutations {
        let (a, mut mid_in) = InProcessChannel::pair(opts(1 << 20, 1000));
        let (mut mid_out, b) = InProcessChannel::pair(opts(1 << 20, 1000));
        let mut ea = EncryptedChannel::new(a, &key_a, &key_b);
        let mut eb = EncryptedChannel::new(b, &key_b, &key_a);
        ea.send(1, b"first message").unwrap();
        ea.send(2, b"second message").unwrap();
        let frames = vec![mid_in.recv().unwrap(), mid_in.recv().unwrap()];
        for f in mutate(frames) {
            mid_out.send(f.tag, &f.payload).unwrap();
        }
        let first = eb.recv();
        let second = eb.recv();
        let failed = matches!(first, Err(ChannelError::Authentication { .. }))
            || matches!(second, Err(ChannelError::Authentication { .. }));
        assert!(failed, "{what} was not detected");
    }
    let (a, b) = InProcessChannel::pair(opts(1 << 20, 1000));
    let mut ea = EncryptedChannel::new(a, &key_a, &key_b);
    let mut eb = EncryptedChannel::new(b, &[3u8; 32], &[4u8; 32]);
    ea.send(1, b"hello").unwrap();
    assert!(eb.recv().unwrap_err().to_string().contains("failed authentication"));
    // After one failure every later frame is refused, even one that would authenticate; the
    // receiver can still say why it stops.
    ea.send(2, b"again").unwrap();
    assert!(matches!(eb.recv().unwrap_err(), ChannelError::Broken { .. }));
    eb.send(1, b"refused").unwrap();
}

#[test]
fn peer_text_is_printed_without_control_characters() {
    assert_eq!(trustsplit_boundary::printable(b"ok\x1b[2J\x07done\nnext"), "ok?[2J?done\nnext");
    assert_eq!(trustsplit_boundary::printable(&[0xff, b'a']), "\u{fffd}a");
}
