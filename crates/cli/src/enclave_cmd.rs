//! `trustsplit enclave` and `trustsplit upload`: being written.

#[derive(clap::Args)]
pub struct EnclaveArgs {}

#[derive(clap::Args)]
pub struct UploadArgs {}

pub fn run_enclave(_: EnclaveArgs) -> anyhow::Result<()> {
    anyhow::bail!("trustsplit enclave is not available yet")
}

pub fn run_upload(_: UploadArgs) -> anyhow::Result<()> {
    anyhow::bail!("trustsplit upload is not available yet")
}
