//! Goten as a `--scheme`: its description and the runner a run starts.

use crate::placement::{lock, GotenPlacement};
use crate::protocol::Servers;
use std::sync::{Arc, Mutex};
use trustsplit_device::DeviceStats;
use trustsplit_schemes::{RunnerError, RunnerInputs, SchemeInfo, SplitRunner};

pub const INFO: SchemeInfo = SchemeInfo {
    name: "goten",
    releases: "nothing to any one server: convolutions and linear layers run on additive shares in Z_p across three \
               non-colluding servers' devices (two that collude learn the operands)",
    uses_device: false,
    docs: "docs/schemes/goten.md",
};

/// A runner whose linear layers run on shares across three servers' untrusted sides, in this
/// process; the enclave keeps the rest under `memory_budget`.
pub fn build(inputs: RunnerInputs) -> Result<SplitRunner, RunnerError> {
    let servers = Servers::new(inputs.transcript.clone()).map_err(RunnerError::Placement)?;
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
