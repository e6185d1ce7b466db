//! Goten's servers as separate endpoints on the authenticated links (threads here, each serving
//! over TCP on localhost exactly as `trustsplit goten-server` does): products on shares match the
//! in-process ones, the offline mode works across the link, a wrong key is refused, and a server
//! that disappears is named.

use rand::{Rng, SeedableRng};
use rand_chacha::ChaCha8Rng;
use std::net::TcpListener;
use std::sync::Arc;
use std::thread::JoinHandle;
use trustsplit_boundary::{KeyPair, Link, LinkPolicy, PublicKey, Transcript};
use trustsplit_cryptgpu::gemm::ConvShape;
use trustsplit_goten::network;
use trustsplit_goten::ops::Op;
use trustsplit_goten::protocol::Servers;
use trustsplit_goten::quant::{product_scale, Quantised};

struct Cluster {
    addrs: Vec<String>,
    keys: Vec<PublicKey>,
    enclave: KeyPair,
    threads: Vec<JoinHandle<Result<(), String>>>,
}

/// Three servers listening on localhost, each taking only `enclave_key` (the enclave's own
/// unless given).
fn cluster(enclave_key: Option<PublicKey>) -> Cluster {
    let enclave = KeyPair::generate().unwrap();
    let pinned = enclave_key.unwrap_or(enclave.public());
    let (mut addrs, mut keys, mut threads) = (Vec::new(), Vec::new(), Vec::new());
    for role in 0..3 {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        addrs.push(listener.local_addr().unwrap().to_string());
        let key = KeyPair::generate().unwrap();
        keys.push(key.public());
        threads.push(std::thread::spawn(move || {
            network::run_server(listener, &key, role, pinned, Default::default(), &mut |_| {})
        }));
    }
    Cluster { addrs, keys, enclave, threads }
}

fn quantised(rng: &mut ChaCha8Rng, n: usize) -> Quantised {
    Quantised { values: (0..n).map(|_| rng.random_range(-128i64..=127) as u64).collect(), exp: 0 }
}

fn exact(op: &Op, a: &Quantised, b: &Quantised) -> Vec<f32> {
    let scale = product_scale(a.exp, b.exp);
    op.eval(&a.values, &b.values).iter().map(|&w| (w as i64 as f64 * scale) as f32).collect()
}

#[test]
fn remote_servers_compute_the_same_products_online_and_offline() {
    let c = cluster(None);
    let sides = network::connect(&c.addrs, &c.keys, &c.enclave).unwrap();
    let mut servers = Servers::with_sides(Arc::new(Transcript::new()), sides).unwrap();
    servers.go_offline();
    let mut rng = ChaCha8Rng::seed_from_u64(51);
    let conv =
        ConvShape { batch: 2, in_channels: 3, height: 6, width: 5, out_channels: 4, kernel: 3, stride: 1, padding: 1 };
    let schedule = [Op::ConvForward(conv), Op::ConvWeightGrad(conv), Op::LinearForward { n: 3, k: 7, m: 2 }];
    for round in 0..3 {
        servers.prepare().unwrap();
        for (i, op) in schedule.iter().enumerate() {
            let (a, b) = (quantised(&mut rng, op.a_len()), quantised(&mut rng, op.b_len()));
            assert_eq!(
                servers.outsource(&format!("layers.{i}"), *op, &a, &b).unwrap(),
                exact(op, &a, &b),
                "round {round}"
            );
        }
    }
    let o = servers.offline.as_ref().unwrap();
    assert_eq!((o.precomputed, o.online), (6, 3));
    drop(servers);
    for t in c.threads {
        t.join().unwrap().unwrap();
    }
}

#[test]
fn a_wrong_key_is_refused_and_a_vanished_server_is_named() {
    // The servers pin another enclave's key: every link is refused.
    let other = KeyPair::generate().unwrap().public();
    let c = cluster(Some(other));
    let err = network::connect(&c.addrs, &c.keys, &c.enclave).err().unwrap();
    assert!(err.contains("cannot reach goten server 0"), "{err}");
    // The enclave pins a key server 0 does not hold.
    let c = cluster(None);
    let mut keys = c.keys.clone();
    keys[0] = other;
    let err = network::connect(&c.addrs, &keys, &c.enclave).err().unwrap();
    assert!(err.contains("cannot reach goten server 0"), "{err}");

    // Server 1 goes away right after its link is up: the first product names it.
    let enclave = KeyPair::generate().unwrap();
    let (mut addrs, mut keys) = (Vec::new(), Vec::new());
    for role in 0..3 {
        let listener = TcpListener::bind("127.0.0.1:0").unwrap();
        addrs.push(listener.local_addr().unwrap().to_string());
        let key = KeyPair::generate().unwrap();
        keys.push(key.public());
        let pinned = enclave.public();
        std::thread::spawn(move || {
            if role == 1 {
                let (stream, _) = listener.accept().unwrap();
                let link = Link::accept(
                    stream,
                    &network::purpose(1),
                    &key,
                    &LinkPolicy::Only(vec![pinned]),
                    network::link_options(),
                );
                drop(link);
                return Ok(());
            }
            network::run_server(listener, &key, role, pinned, Default::default(), &mut |_| {})
        });
    }
    let sides = network::connect(&addrs, &keys, &enclave).unwrap();
    let mut servers = Servers::with_sides(Arc::new(Transcript::new()), sides).unwrap();
    let op = Op::LinearForward { n: 2, k: 3, m: 2 };
    let mut rng = ChaCha8Rng::seed_from_u64(52);
    let (a, b) = (quantised(&mut rng, op.a_len()), quantised(&mut rng, op.b_len()));
    let err = servers.outsource("layers.0", op, &a, &b).err().unwrap();
    assert!(err.contains("goten server 1") && err.contains(&addrs[1]), "{err}");
}
