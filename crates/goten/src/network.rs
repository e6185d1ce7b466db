//! Goten's servers as processes: each `trustsplit goten-server` is one server's untrusted side,
//! serving the enclave of one run over the project's authenticated, encrypted link (Noise XX with
//! pinned keys). The server takes only the enclave's key (`--enclave-key`), and the enclave links
//! only with the server keys it was given; each link names its purpose (`goten server 1`), so a
//! key cannot be used for another server's place. A server that fails tells the enclave why before
//! it closes; a server that disappears is named in the enclave's error.

use crate::protocol::Side;
use std::net::TcpListener;
use std::time::Duration;
use trustsplit_boundary::{Channel, ChannelOptions, KeyPair, Link, LinkPolicy, PublicKey};

/// The purpose server `role`'s links name.
pub fn purpose(role: usize) -> String {
    format!("goten server {role}")
}

/// Link limits: a request carries five tensors of a layer (VGG at batch 256 is under 2 GiB) and
/// a server may compute for minutes between two messages on a large model.
pub fn link_options() -> ChannelOptions {
    ChannelOptions { max_frame_bytes: (1 << 31) - 1, timeout: Some(Duration::from_secs(600)) }
}

/// Serves the first connection that proves `enclave_key` as server `role`, until its run ends,
/// recording in `transcript` every value it receives and returns.
/// Connections with other keys are refused (and told why) and `log`ged; the server waits on.
pub fn run_server(
    listener: TcpListener,
    key: &KeyPair,
    role: usize,
    enclave_key: PublicKey,
    keep: crate::server::Keep,
    log: &mut dyn FnMut(&str),
) -> Result<(), String> {
    if role > 2 {
        return Err(format!("there are servers 0, 1 and 2, not {role}"));
    }
    let policy = LinkPolicy::Only(vec![enclave_key]);
    for stream in listener.incoming() {
        let stream = stream.map_err(|e| format!("goten server {role}: accepting a connection: {e}"))?;
        let from = stream.peer_addr().map(|a| a.to_string()).unwrap_or_else(|_| "an unknown address".into());
        match Link::accept(stream, &purpose(role), key, &policy, link_options()) {
            Ok(mut link) => {
                log(&format!("goten server {role}: serving the enclave at {from}"));
                return crate::server::serve(role, &mut link, link_options().max_frame_bytes, keep);
            }
            Err(e) => log(&format!("goten server {role}: refused a connection from {from}: {e}")),
        }
    }
    Err(format!("goten server {role}: the listener closed"))
}

/// The enclave's links to the three servers at `addrs`, each pinned to its key in `keys`.
pub fn connect(addrs: &[String], keys: &[PublicKey], key: &KeyPair) -> Result<[Side; 3], String> {
    if addrs.len() != 3 || keys.len() != 3 {
        return Err(format!(
            "--goten-servers and --goten-keys name the three servers, 0, 1 and 2 in order: got {} addresses and {} keys",
            addrs.len(),
            keys.len()
        ));
    }
    let mut sides = Vec::new();
    for (role, (addr, their_key)) in addrs.iter().zip(keys).enumerate() {
        let link = Link::connect(addr, &purpose(role), key, &LinkPolicy::Only(vec![*their_key]), link_options())
            .map_err(|e| format!("cannot reach goten server {role} at {addr}: {e}"))?;
        sides.push(Side::Remote { link: Box::new(link) as Box<dyn Channel + Send>, name: addr.clone() });
    }
    Ok(sides.try_into().unwrap_or_else(|_| unreachable!("three sides")))
}
