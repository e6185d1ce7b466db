//! The authenticated, encrypted link: round trips, every way a peer can be refused, limits,
//! deadlines, tampering, replay, and that nothing sent crosses the wire in the clear.

use std::io::{Read, Write};
use std::net::{TcpListener, TcpStream};
use std::sync::{Arc, Mutex};
use std::thread;
use std::time::{Duration, Instant};
use trustsplit_boundary::{Channel, ChannelError, ChannelOptions, KeyPair, Link, LinkPolicy, TcpChannel};

fn opts(timeout_ms: u64) -> ChannelOptions {
    ChannelOptions { max_frame_bytes: 64 << 20, timeout: Some(Duration::from_millis(timeout_ms)) }
}

fn only(k: &KeyPair) -> LinkPolicy {
    LinkPolicy::Only(vec![k.public()])
}

/// A listener whose first connection is accepted as a link with `policy`.
fn serve_one(
    server: KeyPair,
    policy: LinkPolicy,
    o: ChannelOptions,
) -> (String, thread::JoinHandle<Result<Link, ChannelError>>) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let h = thread::spawn(move || {
        let (s, _) = listener.accept().unwrap();
        Link::accept(s, "test", &server, &policy, o)
    });
    (addr, h)
}

fn compressed_len(bytes: &[u8]) -> usize {
    let mut z = flate2::write::DeflateEncoder::new(Vec::new(), flate2::Compression::best());
    z.write_all(bytes).unwrap();
    z.finish().unwrap().len()
}

fn pseudo_random(n: usize, seed: u64) -> Vec<u8> {
    let mut x = seed.wrapping_mul(0x9E37_79B9_7F4A_7C15) | 1;
    (0..n)
        .map(|_| {
            x ^= x << 13;
            x ^= x >> 7;
            x ^= x << 17;
            x as u8
        })
        .collect()
}

#[test]
fn frames_of_every_size_cross_and_each_side_learns_the_others_key() {
    let (server, client) = (KeyPair::generate().unwrap(), KeyPair::generate().unwrap());
    let (sp, cp) = (server.public(), client.public());
    let (addr, h) = serve_one(server, only(&client), opts(5000));
    let mut c = Link::connect(&addr, "test", &client, &LinkPolicy::Only(vec![sp]), opts(5000)).unwrap();
    let s = h.join().unwrap().unwrap();
    assert_eq!((c.remote_key(), s.remote_key()), (sp, cp));
    assert_eq!(c.handshake_hash(), s.handshake_hash());
    let chunk = trustsplit_boundary::link::CHUNK_BYTES;
    let sizes = [0, 1, 100, chunk - 1, chunk, chunk + 1, 3 * chunk + 7, 5 << 20];
    // The server answers each frame with its first half (on its own thread: a large frame does not
    // fit the sockets' buffers, so sending waits for the other end to read).
    let mut s = s;
    let echo = thread::spawn(move || {
        for _ in sizes {
            let f = s.recv().unwrap();
            s.send(f.tag, &f.payload[..f.payload.len() / 2]).unwrap();
        }
    });
    for (i, len) in sizes.into_iter().enumerate() {
        let payload = pseudo_random(len, i as u64);
        c.send(7 + i as u16, &payload).unwrap();
        let f = c.recv().unwrap();
        assert_eq!((f.tag, f.payload.len()), (7 + i as u16, len / 2));
        assert!(f.payload == payload[..len / 2], "payload {len} differs");
    }
    echo.join().unwrap();
}

#[test]
fn a_wrong_key_is_refused_on_either_side() {
    // The client expects another server key: it stops after message 2, never revealing its own.
    let (server, client, stranger) =
        (KeyPair::generate().unwrap(), KeyPair::generate().unwrap(), KeyPair::generate().unwrap());
    let (addr, h) = serve_one(server, only(&client), opts(2000));
    let err = Link::connect(&addr, "test", &client, &only(&stranger), opts(2000)).unwrap_err();
    assert!(matches!(err, ChannelError::Handshake { .. }) && err.to_string().contains("expected"), "{err}");
    assert!(h.join().unwrap().is_err());

    // The server does not allow the client's key: the client is told so.
    let server = KeyPair::generate().unwrap();
    let sp = server.public();
    let (addr, h) = serve_one(server, only(&stranger), opts(2000));
    let err = Link::connect(&addr, "test", &client, &LinkPolicy::Only(vec![sp]), opts(2000)).unwrap_err();
    assert!(matches!(err, ChannelError::Refused { .. }), "{err}");
    assert!(err.to_string().contains(&client.public().to_string()), "{err}");
    let server_side = h.join().unwrap().unwrap_err();
    assert!(matches!(server_side, ChannelError::Refused { .. }), "{server_side}");

    // Any authenticated client is served under AnyAuthenticated.
    let server = KeyPair::generate().unwrap();
    let sp = server.public();
    let (addr, h) = serve_one(server, LinkPolicy::AnyAuthenticated, opts(2000));
    Link::connect(&addr, "test", &client, &LinkPolicy::Only(vec![sp]), opts(2000)).unwrap();
    assert_eq!(h.join().unwrap().unwrap().remote_key(), client.public());
}

#[test]
fn a_link_for_another_purpose_or_a_plaintext_peer_fails_the_handshake() {
    let (server, client) = (KeyPair::generate().unwrap(), KeyPair::generate().unwrap());
    let sp = server.public();
    let (addr, h) = serve_one(server, LinkPolicy::AnyAuthenticated, opts(2000));
    let err = Link::connect(&addr, "other purpose", &client, &LinkPolicy::Only(vec![sp]), opts(2000)).unwrap_err();
    assert!(matches!(err, ChannelError::Handshake { .. }), "{err}");
    assert!(h.join().unwrap().is_err());

    // A plaintext client's frame header is no handshake message.
    let (addr, h) = serve_one(KeyPair::generate().unwrap(), LinkPolicy::AnyAuthenticated, opts(2000));
    let mut plain = TcpChannel::connect(&addr, opts(2000)).unwrap();
    let _ = plain.send(1, b"hello");
    let err = h.join().unwrap().unwrap_err();
    assert!(err.to_string().contains("--insecure-plaintext-link"), "{err}");
}

#[test]
fn a_reply_larger_than_expected_is_refused_before_its_payload_and_the_link_stays_closed() {
    let (server, client) = (KeyPair::generate().unwrap(), KeyPair::generate().unwrap());
    let sp = server.public();
    let (addr, h) = serve_one(server, LinkPolicy::AnyAuthenticated, opts(2000));
    let mut c = Link::connect(&addr, "test", &client, &LinkPolicy::Only(vec![sp]), opts(2000)).unwrap();
    let mut s = h.join().unwrap().unwrap();
    s.send(3, &vec![1u8; 1 << 20]).unwrap();
    let err = c.recv_limited(4096).unwrap_err();
    assert!(matches!(err, ChannelError::TooLarge { len, max: 4096, .. } if len == 1 << 20), "{err}");
    assert!(matches!(c.recv().unwrap_err(), ChannelError::Broken { .. }));
    assert!(matches!(c.send(1, b"x").unwrap_err(), ChannelError::Broken { .. }));
}

/// The bytes a proxy saw.
type Captured = Arc<Mutex<Vec<u8>>>;

/// A man in the middle: forwards both ways, recording what the client sent and applying
/// `tamper` to it.
fn proxy(to: String, tamper: impl Fn(usize, &mut [u8]) + Send + 'static) -> (String, Captured) {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let up = Arc::new(Mutex::new(Vec::new()));
    let up2 = up.clone();
    thread::spawn(move || {
        let (mut client, _) = listener.accept().unwrap();
        let mut server = TcpStream::connect(to).unwrap();
        let (mut c2, mut s2) = (client.try_clone().unwrap(), server.try_clone().unwrap());
        thread::spawn(move || {
            let mut buf = [0u8; 65536];
            while let Ok(n) = s2.read(&mut buf) {
                if n == 0 || c2.write_all(&buf[..n]).is_err() {
                    break;
                }
            }
        });
        let mut buf = [0u8; 65536];
        while let Ok(n) = client.read(&mut buf) {
            if n == 0 {
                break;
            }
            let offset = up2.lock().unwrap().len();
            tamper(offset, &mut buf[..n]);
            up2.lock().unwrap().extend_from_slice(&buf[..n]);
            if server.write_all(&buf[..n]).is_err() {
                break;
            }
        }
    });
    (addr, up)
}

#[test]
fn a_tampered_message_fails_and_every_later_frame_is_refused() {
    let (server, client) = (KeyPair::generate().unwrap(), KeyPair::generate().unwrap());
    let sp = server.public();
    let (addr, h) = serve_one(server, LinkPolicy::AnyAuthenticated, opts(2000));
    // XX's messages from the client are 2 + 32 and 2 + 64 bytes; flip a byte after them.
    let (paddr, _) = proxy(addr, |offset, bytes| {
        for (i, b) in bytes.iter_mut().enumerate() {
            if offset + i == 2 + 32 + 2 + 64 + 2 + 26 + 2 + 5 {
                *b ^= 1;
            }
        }
    });
    let mut c = Link::connect(&paddr, "test", &client, &LinkPolicy::Only(vec![sp]), opts(2000)).unwrap();
    let mut s = h.join().unwrap().unwrap();
    c.send(1, &[9u8; 100]).unwrap();
    assert!(matches!(s.recv().unwrap_err(), ChannelError::Authentication { .. }));
    assert!(matches!(s.recv().unwrap_err(), ChannelError::Broken { .. }));
}

#[test]
fn a_recorded_session_replayed_is_refused_and_no_sent_value_appears_on_the_wire() {
    let (server, client) = (KeyPair::generate().unwrap(), KeyPair::generate().unwrap());
    let (sp, cp) = (server.public(), client.public());
    let server = Arc::new(server);
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let s2 = server.clone();
    let h = thread::spawn(move || {
        let mut received = Vec::new();
        for _ in 0..2 {
            let (s, _) = listener.accept().unwrap();
            let got = Link::accept(s, "test", &s2, &LinkPolicy::Only(vec![cp]), opts(2000)).and_then(|mut l| l.recv());
            received.push(got);
        }
        received
    });
    let (paddr, up) = proxy(addr.clone(), |_, _| {});
    // A value that compresses well, as real activations do.
    let secret: Vec<u8> = (0..200_000u32).flat_map(|i| ((i % 977) as f32 * 0.25).to_le_bytes()).take(200_000).collect();
    let mut c = Link::connect(&paddr, "test", &client, &LinkPolicy::Only(vec![sp]), opts(2000)).unwrap();
    c.send(5, &secret).unwrap();
    let deadline = Instant::now() + Duration::from_secs(5);
    while up.lock().unwrap().len() < secret.len() && Instant::now() < deadline {
        thread::sleep(Duration::from_millis(10));
    }
    let recorded = up.lock().unwrap().clone();
    // Nothing of the value crosses in the clear: no 16-byte window of it is in the capture, and
    // the capture does not compress (ciphertext looks random).
    for window in secret.chunks(4096).map(|c| &c[..16]) {
        assert!(!recorded.windows(16).any(|w| w == window), "plaintext on the wire");
    }
    assert!(recorded.len() >= secret.len());
    let compressed = compressed_len(&recorded);
    assert!(compressed * 100 > recorded.len() * 99, "the capture compresses: {compressed} of {}", recorded.len());
    assert!(compressed_len(&secret) * 4 < secret.len(), "the value itself compresses");

    // Replay the client's bytes to the server: its fresh ephemeral key makes message 3 fail.
    let mut replay = TcpStream::connect(&addr).unwrap();
    replay.write_all(&recorded).unwrap();
    let results = h.join().unwrap();
    assert_eq!(results[0].as_ref().unwrap().payload, secret);
    let err = results[1].as_ref().unwrap_err();
    assert!(matches!(err, ChannelError::Handshake { .. }), "{err}");
}

#[test]
fn a_peer_that_trickles_bytes_is_cut_off_at_the_deadline() {
    // During the handshake: one byte every 150 ms against a 1 s deadline.
    let (addr, h) = serve_one(KeyPair::generate().unwrap(), LinkPolicy::AnyAuthenticated, opts(1000));
    let trickler = thread::spawn(move || {
        let mut s = TcpStream::connect(addr).unwrap();
        for _ in 0..40 {
            if s.write_all(&[0]).is_err() {
                break;
            }
            thread::sleep(Duration::from_millis(150));
        }
    });
    let start = Instant::now();
    let err = h.join().unwrap().unwrap_err();
    assert!(start.elapsed() < Duration::from_secs(3), "{err} after {:?}", start.elapsed());
    assert!(matches!(err, ChannelError::Deadline { .. } | ChannelError::Handshake { .. }), "{err}");
    trickler.join().unwrap();

    // In the middle of a frame (plain TCP shares the deadline code): a header, then a trickle.
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let h = thread::spawn(move || {
        let (s, _) = listener.accept().unwrap();
        let mut ch = TcpChannel::from_stream(s, opts(1000)).unwrap();
        let first = ch.recv();
        (first, ch.recv())
    });
    let mut s = TcpStream::connect(addr).unwrap();
    s.write_all(&trustsplit_boundary::channel::header(1, 100)).unwrap();
    let start = Instant::now();
    for _ in 0..40 {
        if s.write_all(&[0]).is_err() {
            break;
        }
        thread::sleep(Duration::from_millis(150));
        if start.elapsed() > Duration::from_secs(3) {
            break;
        }
    }
    let (first, second) = h.join().unwrap();
    assert!(matches!(first, Err(ChannelError::Deadline { .. })), "{first:?}");
    assert!(matches!(second, Err(ChannelError::Broken { .. })), "{second:?}");
}

#[test]
fn key_files_are_private_never_overwritten_and_load_back() {
    let dir = std::env::temp_dir().join(format!("trustsplit-link-keys-{}", std::process::id()));
    std::fs::create_dir_all(&dir).unwrap();
    let path = dir.join("k.key");
    let _ = std::fs::remove_file(&path);
    let k = KeyPair::generate().unwrap();
    k.save(&path).unwrap();
    assert_eq!(KeyPair::load(&path).unwrap().public(), k.public());
    // The secret is in the file and nowhere in the key's Debug output.
    let text = std::fs::read_to_string(&path).unwrap();
    let secret = text.lines().find(|l| !l.starts_with('#')).unwrap().trim().to_string();
    assert_eq!(secret.len(), 64);
    assert!(!format!("{k:?}").contains(&secret) && format!("{k:?}").contains("redacted"));
    assert!(k.save(&path).unwrap_err().contains("never overwritten"));
    #[cfg(unix)]
    {
        use std::os::unix::fs::PermissionsExt;
        assert_eq!(std::fs::metadata(&path).unwrap().permissions().mode() & 0o777, 0o600);
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o644)).unwrap();
        assert!(KeyPair::load(&path).unwrap_err().contains("chmod 600"));
        std::fs::set_permissions(&path, std::fs::Permissions::from_mode(0o600)).unwrap();
    }
    std::fs::write(&path, "not a key\n").unwrap();
    assert!(KeyPair::load(&path).unwrap_err().contains("64 hex digits"));
    assert!("zz".parse::<trustsplit_boundary::PublicKey>().is_err());
    assert_eq!(k.public().to_string().parse::<trustsplit_boundary::PublicKey>().unwrap(), k.public());
    std::fs::remove_dir_all(&dir).unwrap();
}
