//! The `trustsplit` command line's library half: the trainer, evaluation and benchmarks, the
//! registry of schemes (`registry`) and the devices `--device` names (`devices`), kept here so
//! integration tests can drive them without spawning processes.

pub mod bench;
pub mod data_fetch;
pub mod devices;
pub mod enclave_cmd;
pub mod eval;
pub mod goten_cmd;
pub mod memory_tuning;
pub mod party_cmd;
pub mod privacy_report;
pub mod progress;
pub mod registry;
pub mod runner;
pub mod share_upload;
pub mod train;
pub mod training_args;

/// Runs `f` on a rayon pool of exactly `threads` threads: every kernel inside uses that pool,
/// which is how the trusted side is held to its thread budget.
pub fn with_threads<T: Send>(threads: usize, f: impl FnOnce() -> T + Send) -> anyhow::Result<T> {
    anyhow::ensure!(threads >= 1, "--threads must be at least 1");
    let pool = rayon::ThreadPoolBuilder::new().num_threads(threads).build()?;
    Ok(pool.install(f))
}

/// A switch flag's value (`--augment on`, `--protect-gradients off`).
#[derive(Clone, Copy, Debug, PartialEq, Eq, clap::ValueEnum)]
pub enum OnOff {
    On,
    Off,
}
