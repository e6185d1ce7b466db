//! Throughput of the encrypted link against plain TCP on loopback, measured in the same run:
//! `cargo run --release -p trustsplit-boundary --example link_throughput [MIB] [ROUNDS]`.
//!
//! One thread sends frames of 4 MiB to another, which receives them, for MIB MiB (default 256),
//! alternating plain TCP and the link for ROUNDS rounds (default 3); it prints each round's GB/s
//! and the link's time over plain TCP's. Both ends run on this machine, so the link pays its
//! encryption and its decryption on the same cores.

use std::net::TcpListener;
use std::thread;
use std::time::Instant;
use trustsplit_boundary::{Channel, ChannelOptions, KeyPair, Link, LinkPolicy, TcpChannel};

const FRAME: usize = 4 << 20;

/// Seconds to move `total` bytes from a fresh client to a fresh server.
fn run(total: usize, encrypted: bool) -> f64 {
    let listener = TcpListener::bind("127.0.0.1:0").unwrap();
    let addr = listener.local_addr().unwrap().to_string();
    let (server_key, client_key) = (KeyPair::generate().unwrap(), KeyPair::generate().unwrap());
    let server_public = server_key.public();
    let opts = ChannelOptions::default();
    let frames = total / FRAME;
    let server = thread::spawn(move || {
        let (stream, _) = listener.accept().unwrap();
        let mut ch: Box<dyn Channel> = if encrypted {
            Box::new(Link::accept(stream, "bench", &server_key, &LinkPolicy::AnyAuthenticated, opts).unwrap())
        } else {
            Box::new(TcpChannel::from_stream(stream, opts).unwrap())
        };
        for _ in 0..frames {
            ch.recv().unwrap();
        }
        ch.send(1, b"done").unwrap();
    });
    let mut ch: Box<dyn Channel> = if encrypted {
        Box::new(Link::connect(&addr, "bench", &client_key, &LinkPolicy::Only(vec![server_public]), opts).unwrap())
    } else {
        Box::new(TcpChannel::connect(&addr, opts).unwrap())
    };
    let payload: Vec<u8> = (0..FRAME).map(|i| (i * 7 + 3) as u8).collect();
    let start = Instant::now();
    for _ in 0..frames {
        ch.send(2, &payload).unwrap();
    }
    ch.recv().unwrap();
    let seconds = start.elapsed().as_secs_f64();
    server.join().unwrap();
    seconds
}

fn main() {
    let args: Vec<usize> = std::env::args().skip(1).map(|a| a.parse().expect("MIB and ROUNDS are numbers")).collect();
    let total = args.first().copied().unwrap_or(256) << 20;
    let rounds = args.get(1).copied().unwrap_or(3);
    let gbps = |s: f64| total as f64 / s / 1e9;
    let mut ratios = Vec::new();
    for round in 1..=rounds {
        let plain = run(total, false);
        let link = run(total, true);
        ratios.push(link / plain);
        println!(
            "round {round}: plain TCP {:.2} GB/s, link {:.2} GB/s: the link takes {:.2}x the time",
            gbps(plain),
            gbps(link),
            link / plain
        );
    }
    ratios.sort_by(f64::total_cmp);
    println!("median over {rounds} rounds: the link takes {:.2}x plain TCP's time", ratios[rounds / 2]);
}
