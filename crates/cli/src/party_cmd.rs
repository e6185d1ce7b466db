//! `trustsplit party`: one of CryptGPU's three parties as a process of its own, on this machine
//! or another. It links with the other two parties and serves one run of the data owner (`train`,
//! `eval` or `bench step` with `--scheme cryptgpu --peers`, or an upload of a dataset into its
//! `--store`), every link authenticated by a pinned key and encrypted; then it exits. Start all
//! three again for the next run.

use anyhow::{Context, Result};
use std::net::TcpListener;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;
use trustsplit_boundary::{KeyPair, PublicKey};
use trustsplit_cryptgpu::gemm::{set_ring_device, RingDevice};
use trustsplit_cryptgpu::network::{self, Parties, PartyConfig};

#[derive(clap::Args)]
pub struct PartyArgs {
    /// This party's number: 0, 1 or 2 (its place in --peers and --party-keys).
    #[arg(long, value_parser = clap::value_parser!(u8).range(0..=2))]
    pub id: u8,
    /// The address this party listens on for the other two parties and the data owner, e.g.
    /// 0.0.0.0:7100 (a fixed port: the others dial the one --peers names).
    #[arg(long, value_name = "HOST:PORT")]
    pub listen: String,
    /// The three parties' addresses as the other parties reach them (their --listen), party 0, 1,
    /// 2 in order: the same list on every party and on the data owner's --peers (this party's
    /// own entry is in it too).
    #[arg(long, value_name = "HOST:PORT,HOST:PORT,HOST:PORT", value_delimiter = ',', required = true)]
    pub peers: Vec<String>,
    /// This party's key file (`trustsplit keygen --out FILE`); its public key must be this
    /// party's entry of --party-keys.
    #[arg(long, value_name = "FILE")]
    pub key: PathBuf,
    /// The three parties' public keys (64 hex digits each, as `trustsplit keygen` printed them),
    /// party 0, 1, 2 in order: the same list on every party and on the data owner. A party is
    /// linked only if it proves its key.
    #[arg(long, value_name = "HEX,HEX,HEX", value_delimiter = ',', required = true)]
    pub party_keys: Vec<PublicKey>,
    /// The data owner's public key (64 hex digits; the owner's --key on `train`, `eval` or `bench
    /// step`): the only one whose run this party serves.
    #[arg(long, value_name = "HEX")]
    pub owner_key: PublicKey,
    /// Seconds to wait for the other two parties to come up and link (start all three within
    /// this). The data owner may come any time after.
    #[arg(long, value_name = "SECONDS", default_value_t = 300)]
    pub wait_s: u64,
    /// Where this party computes its ring products: cpu (native 64-bit integers), or cuda (float
    /// limbs through cuBLAS DGEMM on GPU 0, exact; needs a build with the `cuda` feature, an
    /// NVIDIA driver and cuBLAS). A GPU that fails mid-run hands the rest of the run to the CPU,
    /// with a warning.
    #[arg(long, value_enum, default_value_t = RingDevice::Cpu, value_name = "DEVICE")]
    pub ring_device: RingDevice,
    /// A folder where this party keeps the datasets uploaded to it (`trustsplit upload --scheme
    /// cryptgpu`): one file of its shares per dataset and split, which a later run with
    /// --uploaded NAME trains on. Without it the party takes no upload.
    #[arg(long, value_name = "DIR")]
    pub store: Option<PathBuf>,
}

/// Runs the party until the data owner stops its run; an error names the party (or owner) that
/// failed or disappeared.
pub fn run_party(a: PartyArgs) -> Result<()> {
    let id = usize::from(a.id);
    // Before listening: a party that cannot use its GPU says so before the others wait on it.
    set_ring_device(a.ring_device).map_err(|e| anyhow::Error::msg(format!("party {id}: {e}")))?;
    let key = KeyPair::load(&a.key).map_err(anyhow::Error::msg)?;
    // The errors' texts already carry their causes (which `{:#}` would print a second time).
    let parties = Parties::new(a.peers, a.party_keys).map_err(|e| anyhow::Error::msg(e.to_string()))?;
    if let Some(dir) = &a.store {
        std::fs::create_dir_all(dir).with_context(|| format!("party {id}: creating --store {}", dir.display()))?;
    }
    let config =
        PartyConfig { id, parties, owner_key: a.owner_key, wait: Duration::from_secs(a.wait_s), store: a.store };
    let listener = TcpListener::bind(&a.listen).with_context(|| format!("party {id}: listening on {}", a.listen))?;
    network::run_party(listener, Arc::new(key), config, &mut |line| eprintln!("{line}"))
        .map_err(|e| anyhow::Error::msg(e.to_string()))?;
    eprintln!("cryptgpu party {id}: the run ended (the data owner stopped it)");
    Ok(())
}
