//! `trustsplit goten-server`: one of Goten's three servers' untrusted sides (host and device) as
//! a process of its own. It serves the enclave of one run (`train`, `eval` or `bench step` with
//! `--scheme goten --goten-servers`), taking only that enclave's key, then exits.

use anyhow::{Context, Result};
use std::net::TcpListener;
use std::path::PathBuf;
use trustsplit_boundary::{KeyPair, PublicKey};

#[derive(clap::Args)]
pub struct GotenServerArgs {
    /// Which server this is: 0 or 1 (each computes on one share of every operand), or 2 (it
    /// multiplies the masks). Its place in the enclave's --goten-servers and --goten-keys.
    #[arg(long, value_parser = clap::value_parser!(u8).range(0..=2))]
    pub role: u8,
    /// The address to listen on for the enclave, e.g. 0.0.0.0:7200.
    #[arg(long, value_name = "HOST:PORT")]
    pub listen: String,
    /// This server's key file (`trustsplit keygen --out FILE`); its public key is this server's
    /// entry of the enclave's --goten-keys.
    #[arg(long, value_name = "FILE")]
    pub key: PathBuf,
    /// The enclave's public key (64 hex digits; the --key of `train --scheme goten`): the only
    /// one this server serves.
    #[arg(long, value_name = "HEX")]
    pub enclave_key: PublicKey,
    /// Write this server's own transcript to FILE (JSON lines): every value it received from
    /// the enclave and returned, by request, operand name and size.
    #[arg(long, value_name = "FILE")]
    pub transcript: Option<PathBuf>,
    /// Keep the values themselves, as this server's owner could: per request, what it received
    /// and returned, in the format of `trustsplit device --record` (DIR/index.jsonl and
    /// DIR/NNNNNNNN.safetensors, the field elements as 64-bit integers): the attacker's view,
    /// in the form `trustsplit privacy-report` attacks (docs/privacy.md).
    #[arg(long, value_name = "DIR")]
    pub record: Option<PathBuf>,
    /// Past this many MiB of tensors, --record indexes requests without their tensors.
    #[arg(long, value_name = "MIB", default_value_t = 4096)]
    pub record_limit_mib: u64,
}

pub fn run_goten_server(a: GotenServerArgs) -> Result<()> {
    let role = usize::from(a.role);
    let key = KeyPair::load(&a.key).map_err(anyhow::Error::msg)?;
    let listener =
        TcpListener::bind(&a.listen).with_context(|| format!("goten server {role}: listening on {}", a.listen))?;
    eprintln!("goten server {role} listening on {}; waiting for the enclave (key {})", a.listen, a.enclave_key);
    let transcript = match &a.transcript {
        Some(p) => Some(
            trustsplit_boundary::Transcript::new()
                .with_digests()
                .with_jsonl(p)
                .with_context(|| format!("creating transcript {}", p.display()))?,
        ),
        None => None,
    };
    let recorder = a.record.as_deref().map(|dir| crate::devices::recorder(dir, a.record_limit_mib)).transpose()?;
    let keep = trustsplit_goten::server::Keep { transcript: transcript.as_ref(), recorder: recorder.as_deref() };
    let served = trustsplit_goten::network::run_server(listener, &key, role, a.enclave_key, keep, &mut |line| {
        eprintln!("{line}")
    });
    if let Some(t) = &transcript {
        t.flush().map_err(|e| anyhow::anyhow!("goten server {role}: writing its transcript: {e}"))?;
    }
    served.map_err(anyhow::Error::msg)?;
    eprintln!("goten server {role}: the run ended (the enclave stopped it)");
    Ok(())
}
