//! `trustsplit upload --scheme cryptgpu`: the data owner shares a dataset's two splits into the
//! stores of CryptGPU's three parties once, and `train`/`eval --uploaded NAME` later run on them
//! by record number. Both sides prepare the samples the same way (file order, the dataset's
//! normalisation, the model's padding) and fingerprint them, so a run is refused, not misled,
//! when the parties hold other data or other settings.

use crate::enclave_cmd::UploadArgs;
use crate::train::{self, Data};
use anyhow::{Context, Result};
use std::io::IsTerminal;
use trustsplit_boundary::KeyPair;
use trustsplit_cryptgpu::network::{self, Parties};
use trustsplit_cryptgpu::ring::FixedPoint;
use trustsplit_cryptgpu::session::{Session, UploadRef};
use trustsplit_cryptgpu::store::{self, Fingerprint, UploadHeader};
use trustsplit_data::{batches, BatchOptions, Dataset};

/// Samples per message of an upload (about 13 MB of shares per party for 28x28 images).
const UPLOAD_BATCH: usize = 1024;

fn mpc(e: trustsplit_cryptgpu::party::MpcError) -> anyhow::Error {
    anyhow::Error::msg(e.to_string())
}

/// A split's samples in file order, as they are shared: `(inputs, labels)` per batch.
fn in_order<'a>(ds: &'a Dataset, opts: &'a BatchOptions) -> impl Iterator<Item = (Vec<f32>, Vec<usize>)> + 'a {
    batches(ds, opts).map(|b| (b.images, b.labels))
}

fn order_options(data: &Data) -> BatchOptions {
    let mut o = BatchOptions::new(UPLOAD_BATCH, data.kind.normalization());
    o.pad_to = data.pad_to;
    o
}

/// The fingerprint of a split as it would be shared with `frac_bits`.
pub fn fingerprint(data: &Data, ds: &Dataset, frac_bits: u32) -> Result<String> {
    let fp = FixedPoint::new(frac_bits).map_err(anyhow::Error::msg)?;
    let mut f = Fingerprint::new(&data.input_shape, ds_classes(data), frac_bits);
    let per: usize = data.input_shape.iter().product();
    let opts = order_options(data);
    for (x, labels) in in_order(ds, &opts) {
        for (sample, &label) in x.chunks_exact(per).zip(&labels) {
            f.record(&fp.encode_all(sample).map_err(anyhow::Error::msg)?, label);
        }
    }
    Ok(f.finish(ds.len()))
}

fn ds_classes(data: &Data) -> usize {
    data.train.num_classes
}

/// What a run on upload `name` tells the parties: the fingerprints of the owner's copy.
pub fn upload_ref(name: &str, data: &Data, frac_bits: u32) -> Result<UploadRef> {
    store::check_name(name).map_err(anyhow::Error::msg)?;
    Ok(UploadRef {
        name: name.to_string(),
        train_fingerprint: fingerprint(data, &data.train, frac_bits).context("fingerprinting the training split")?,
        test_fingerprint: fingerprint(data, &data.test, frac_bits).context("fingerprinting the test split")?,
    })
}

/// Runs the upload: checks everything locally, links to the three parties, shares both splits.
pub fn run(a: &UploadArgs) -> Result<()> {
    let name =
        a.name.as_deref().context("--scheme cryptgpu needs --name NAME: what the parties store the upload as")?;
    store::check_name(name).map_err(anyhow::Error::msg)?;
    let peers: Vec<String> = a.to.split(',').map(|s| s.trim().to_string()).collect();
    anyhow::ensure!(
        !a.party_keys.is_empty(),
        "--scheme cryptgpu needs --party-keys HEX,HEX,HEX: the three parties' public keys, in the order of --to"
    );
    let parties = Parties::new(peers, a.party_keys.clone()).map_err(mpc)?;
    let key_path = a
        .key
        .as_ref()
        .context("--scheme cryptgpu needs --key FILE: the data owner's key, which every party pins with --owner-key")?;
    let key = KeyPair::load(key_path).map_err(anyhow::Error::msg)?;
    let data = train::load_data(a.dataset.name(), a.data_dir.as_deref(), &a.model, a.train_limit, a.test_limit)?;
    FixedPoint::new(a.frac_bits).map_err(anyhow::Error::msg)?;

    let show = std::io::stderr().is_terminal();
    let splits = [("train", &data.train), ("test", &data.test)];
    let mut headers = Vec::new();
    for (split, ds) in splits {
        headers.push(UploadHeader {
            name: name.to_string(),
            split: split.to_string(),
            count: ds.len(),
            sample_shape: data.input_shape.clone(),
            classes: ds_classes(&data),
            frac_bits: a.frac_bits,
            fingerprint: fingerprint(&data, ds, a.frac_bits)
                .with_context(|| format!("fingerprinting the {split} split"))?,
        });
    }
    let links = network::connect_parties(&parties, &key).map_err(mpc)?;
    let mut session = Session::for_upload(links);
    for ((split, ds), header) in splits.into_iter().zip(&headers) {
        let bar = crate::progress::bar(ds.len() as u64, &format!("upload {split}"), show);
        let opts = order_options(&data);
        session
            .upload_split(header, in_order(ds, &opts), &mut |n| bar.set_position(n as u64))
            .map_err(mpc)
            .with_context(|| format!("uploading the {split} split of {}", a.dataset.name()))?;
        bar.finish_and_clear();
    }
    session.finish().map_err(mpc)?;
    let shape: Vec<String> = data.input_shape.iter().map(|d| d.to_string()).collect();
    println!(
        "uploaded {} as {name:?} to the three parties: {} training and {} test samples of {}, {} fractional bits; \
         each party stored only its shares",
        a.dataset.name(),
        data.train.len(),
        data.test.len(),
        shape.join("x"),
        a.frac_bits
    );
    println!(
        "train on it: trustsplit train --scheme cryptgpu --dataset {} --peers {} --party-keys ... --key ... --uploaded {name}{}",
        a.dataset.name(),
        a.to,
        if a.frac_bits == trustsplit_cryptgpu::ring::DEFAULT_FRAC_BITS { String::new() } else { format!(" --frac-bits {}", a.frac_bits) }
    );
    Ok(())
}

/// `options` with the fingerprints of `--uploaded NAME` filled in from the owner's copy `data`
/// (the parties compare them with their stores'); unchanged without `--uploaded`.
pub fn resolve(
    options: &crate::registry::SchemeOptions,
    scheme: crate::registry::Scheme,
    data: &Data,
) -> Result<crate::registry::SchemeOptions> {
    let mut options = options.clone();
    if let Some(name) = options.cryptgpu.uploaded.clone() {
        anyhow::ensure!(
            scheme.name() == "cryptgpu",
            "--uploaded names data uploaded to cryptgpu's parties; give --scheme cryptgpu"
        );
        options.cryptgpu.upload_ref = Some(upload_ref(&name, data, options.cryptgpu.frac_bits)?);
    }
    Ok(options)
}
