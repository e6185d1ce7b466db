//! Goten as a `--scheme`: its description and the runner a run starts.

use crate::network;
use crate::placement::GotenPlacement;
use crate::protocol::Servers;
use serde::{Deserialize, Serialize};
use std::path::PathBuf;
use std::sync::{Arc, Mutex};
use trustsplit_attacks::Recorder;
use trustsplit_boundary::{KeyPair, PublicKey};
use trustsplit_device::DeviceStats;
use trustsplit_schemes::placement::lock;
use trustsplit_schemes::{RunnerError, RunnerInputs, SchemeInfo, SchemeReport, SplitRunner};

pub const INFO: SchemeInfo = SchemeInfo {
    name: "goten",
    releases: "nothing to any one server: convolutions and linear layers run on additive shares in Z_p across three \
               non-colluding servers' devices (two that collude learn the operands)",
    uses_device: false,
    docs: "docs/schemes/goten.md",
};

/// Goten's settings.
#[derive(Clone, Debug, Default, PartialEq, Serialize, Deserialize)]
#[cfg_attr(feature = "cli", derive(clap::Args))]
pub struct GotenOptions {
    /// goten: the offline mode. Server 2's products for a step are made ahead of it (for the
    /// schedule of shapes the previous step ran), so that only servers 0 and 1 compute during
    /// a step; the summary reports the storage they take. In one process they are made between
    /// steps and counted as device time.
    #[cfg_attr(feature = "cli", arg(long))]
    #[serde(default)]
    pub goten_offline: bool,
    /// goten: the three `trustsplit goten-server` processes, server 0, 1, 2 in order (their
    /// --listen as this machine reaches them), reached over the authenticated, encrypted link
    /// with this side's --key. Without it the servers' untrusted sides run in this process.
    #[cfg_attr(feature = "cli", arg(long, value_name = "HOST:PORT,HOST:PORT,HOST:PORT", value_delimiter = ','))]
    // Where the servers run is not part of a run's identity: a run may resume elsewhere.
    #[serde(skip)]
    pub goten_servers: Vec<String>,
    /// goten with --goten-servers: the servers' public keys (64 hex digits each, as their
    /// `trustsplit keygen` printed them), in the order of --goten-servers.
    #[cfg_attr(feature = "cli", arg(long, value_name = "HEX,HEX,HEX", value_delimiter = ','))]
    #[serde(skip)]
    pub goten_keys: Vec<PublicKey>,
    /// goten: run as the enclave and device of server 0 or 1 only, as Goten does: the other
    /// enclave runs the same command (same settings, data and --seed) with the other role, and
    /// the two train in step, swapping partial results over their link (--goten-peer). Enclave 0
    /// also drives server 2, a `trustsplit goten-server --role 2` named by --goten-servers (its
    /// one address) and --goten-keys. Both need --key.
    #[cfg_attr(feature = "cli", arg(long, value_name = "0|1", value_parser = clap::value_parser!(u8).range(0..=1)))]
    #[serde(skip)]
    pub goten_role: Option<u8>,
    /// goten with --goten-role: where the enclaves link: enclave 0 listens on this address,
    /// enclave 1 dials it.
    #[cfg_attr(feature = "cli", arg(long, value_name = "HOST:PORT"))]
    #[serde(skip)]
    pub goten_peer: Option<String>,
    /// goten with --goten-role: the other enclave's public key (64 hex digits, as its
    /// `trustsplit keygen` printed it); no other is linked with.
    #[cfg_attr(feature = "cli", arg(long, value_name = "HEX"))]
    #[serde(skip)]
    pub goten_peer_key: Option<PublicKey>,
    /// goten, servers in this process: keep what each server's untrusted side received and
    /// returned, as its owner could, in DIR/server0, DIR/server1 and DIR/server2 (the format of
    /// `trustsplit device --record`, the field elements as 64-bit integers). What
    /// `trustsplit privacy-report` attacks.
    #[cfg_attr(feature = "cli", arg(long, value_name = "DIR"))]
    #[serde(skip)]
    pub goten_record: Option<PathBuf>,
    /// Past this many MiB of tensors per server, --goten-record indexes requests without their
    /// tensors: the command line's --record-limit-mib.
    #[cfg_attr(feature = "cli", arg(skip))]
    #[serde(skip)]
    pub goten_record_limit_mib: Option<u64>,
    /// The enclave's key file, from the command line's --key.
    #[cfg_attr(feature = "cli", arg(skip))]
    #[serde(skip)]
    pub enclave_key: Option<PathBuf>,
}

/// A runner whose linear layers run on shares across three servers' untrusted sides, in this
/// process; the enclave keeps the rest under `memory_budget`.
pub fn build(inputs: RunnerInputs, options: &GotenOptions) -> Result<SplitRunner, RunnerError> {
    let mut servers = if let Some(role) = options.goten_role {
        replicated(&inputs, options, usize::from(role))
    } else if options.goten_peer.is_some() || options.goten_peer_key.is_some() {
        return Err(RunnerError::Placement(
            "--goten-peer and --goten-peer-key link the two enclaves of --goten-role; give it too".into(),
        ));
    } else if options.goten_servers.is_empty() {
        if !options.goten_keys.is_empty() {
            return Err(RunnerError::Placement("--goten-keys names the keys of --goten-servers; give it too".into()));
        }
        Servers::new(inputs.transcript.clone())
    } else {
        let path = options.enclave_key.as_ref().ok_or_else(|| {
            RunnerError::Placement(
                "--goten-servers needs --key FILE: this side's key (trustsplit keygen), which every goten-server pins \
                 with --enclave-key"
                    .into(),
            )
        })?;
        if options.goten_keys.is_empty() {
            return Err(RunnerError::Placement(
                "--goten-servers needs --goten-keys HEX,HEX,HEX: the servers' public keys, in the same order".into(),
            ));
        }
        let key = KeyPair::load(path).map_err(RunnerError::Placement)?;
        let sides =
            network::connect(&options.goten_servers, &options.goten_keys, &key).map_err(RunnerError::Placement)?;
        Servers::with_sides(inputs.transcript.clone(), sides)
    }
    .map_err(RunnerError::Placement)?;
    if options.goten_offline {
        servers.go_offline();
    }
    if let Some(dir) = &options.goten_record {
        let limit = options.goten_record_limit_mib.unwrap_or(4096).saturating_mul(1 << 20);
        let recorder = |role: usize| Recorder::create(&dir.join(format!("server{role}")), limit);
        let recorders = [recorder(0), recorder(1), recorder(2)];
        let [a, b, c] = recorders.map(|r| r.map_err(RunnerError::Placement));
        servers.record_sides([a?, b?, c?]).map_err(RunnerError::Placement)?;
    }
    let servers = Arc::new(Mutex::new(servers));
    let handle = servers.clone();
    let stats = Box::new(move || {
        let t = lock(&handle).totals();
        DeviceStats {
            requests: t.requests,
            device_seconds: t.seconds,
            bytes_sent: t.bytes_sent,
            bytes_received: t.bytes_received,
        }
    }) as Box<dyn Fn() -> DeviceStats + Send>;
    SplitRunner::new(
        &INFO,
        Box::new(GotenPlacement::new(servers)),
        Some(inputs.memory_budget),
        inputs.transcript,
        Some(stats),
    )
}

/// The enclave of server `role` in a process of its own: links with the other enclave, and as
/// enclave 0 with server 2.
fn replicated(inputs: &RunnerInputs, options: &GotenOptions, role: usize) -> Result<Servers, String> {
    let (Some(peer), Some(peer_key)) = (&options.goten_peer, options.goten_peer_key) else {
        return Err(
            "--goten-role needs --goten-peer HOST:PORT (enclave 0 listens there, enclave 1 dials it) and --goten-peer-key HEX (the other enclave's public key)"
                .into(),
        );
    };
    let path = options
        .enclave_key
        .as_ref()
        .ok_or("--goten-role needs --key FILE: this enclave's key (trustsplit keygen), which the other pins")?;
    if options.goten_record.is_some() {
        return Err(
            "--goten-record keeps the views of servers run in this process; with --goten-role give each server's transcript instead (--transcript here, goten-server --record for server 2)"
                .into(),
        );
    }
    let (n, k) = (options.goten_servers.len(), options.goten_keys.len());
    let wanted = if role == 0 { 1 } else { 0 };
    if n != wanted || k != wanted {
        return Err(if role == 0 {
            format!(
                "enclave 0 drives server 2: --goten-servers names its one address and --goten-keys its key (got {n} addresses and {k} keys)"
            )
        } else {
            "enclave 1 reaches only enclave 0: --goten-servers and --goten-keys belong to enclave 0".into()
        });
    }
    let key = KeyPair::load(path)?;
    const WAIT: std::time::Duration = std::time::Duration::from_secs(300);
    let (replica, keys) = if role == 0 {
        crate::replica::accept(peer, &key, peer_key, WAIT, &mut |line| eprintln!("{line}"))
    } else {
        crate::replica::connect(peer, &key, peer_key, WAIT)
    }?;
    let server2 = if role == 0 {
        let link = trustsplit_boundary::Link::connect(
            &options.goten_servers[0],
            &network::purpose(2),
            &key,
            &trustsplit_boundary::LinkPolicy::Only(vec![options.goten_keys[0]]),
            network::link_options(),
        )
        .map_err(|e| format!("cannot reach goten server 2 at {}: {e}", options.goten_servers[0]))?;
        crate::protocol::Side::Remote { link: Box::new(link), name: options.goten_servers[0].clone() }
    } else {
        crate::protocol::Side::Local
    };
    Servers::replicated(inputs.transcript.clone(), replica, keys, server2)
}

/// The lines Goten adds to a run's summary: its products, and the offline mode's storage.
pub fn summary_lines(report: &SchemeReport) -> Vec<String> {
    let c = &report.placement.counters;
    let get = |k: &str| c.get(k).copied().unwrap_or(0);
    let mut lines = vec![format!(
        "goten: {} products on shares across the three servers; {} recomputed in the enclave after a field wrap",
        get("products"),
        get("recomputed after a field wrap")
    )];
    if c.contains_key("made offline") {
        lines.push(format!(
            "goten offline: {} of server 2's products made ahead of their step ({} run online for want of one); \
             peak storage {:.1} MB",
            get("made offline"),
            get("run online for want of an offline product"),
            get("offline storage, peak bytes") as f64 / 1e6
        ));
    }
    lines
}
