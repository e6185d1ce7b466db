//! The schemes this build runs. Registering a scheme is one entry in [`SCHEMES`] and, for a scheme
//! with options, one field in [`SchemeOptions`]; everything else about it (its placement, its
//! options and their flags, what it adds to a run's summary, its docs page) lives with the scheme.

use crate::devices::DeviceLinkArgs;
use crate::runner::{PartyRunner, Runner};
use anyhow::{Context, Result};
use serde::{Deserialize, Serialize};
use std::path::Path;
use std::sync::Arc;
use trustsplit_boundary::{KeyPair, Transcript};
use trustsplit_cryptgpu::party::MpcError;
use trustsplit_cryptgpu::scheme::{self as cryptgpu, CryptgpuOptions};
use trustsplit_cryptgpu::session::Session;
use trustsplit_goten::scheme::{self as goten, GotenOptions};
use trustsplit_nn::optim::Optimizer;
use trustsplit_nn::Model;
use trustsplit_schemes::asymml::{self, AsymmlOptions, PrivacySummary};
use trustsplit_schemes::{
    gpu_only, plaintext, tee_only, RunnerError, RunnerInputs, SchemeInfo, SchemeReport, SplitRunner, TrainingRun,
};

/// How the command line runs one scheme.
pub struct SchemeEntry {
    pub info: &'static SchemeInfo,
    /// Builds its runner from the common inputs and the run's options.
    pub build: Build,
    /// Lines it adds to the end of a training run's summary (given the privacy the run charged,
    /// for a scheme that keeps a privacy ledger).
    pub describe_run: DescribeRun,
    /// Lines it adds to the end of an evaluation.
    pub describe_evaluation: fn(&SchemeReport) -> Vec<String>,
}

/// How a scheme's runner is made.
#[derive(Clone, Copy)]
pub enum Build {
    /// An enclave and (maybe) a device, from the common inputs and the run's options.
    Split(fn(RunnerInputs, &SchemeOptions) -> Result<SplitRunner, RunnerError>),
    /// Three parties holding shares of the model (trained with the optimizer's settings), in
    /// this process or reached over the links (with the owner's `--key`).
    Parties(BuildParties),
}

type BuildParties = fn(&Model, &Optimizer, &SchemeOptions, &DeviceLinkArgs) -> Result<Session, MpcError>;

type DescribeRun = fn(&SchemeReport, Option<&PrivacySummary>) -> Vec<String>;

impl SchemeEntry {
    /// A scheme that adds nothing to the summaries.
    const fn new(
        info: &'static SchemeInfo,
        build: fn(RunnerInputs, &SchemeOptions) -> Result<SplitRunner, RunnerError>,
    ) -> SchemeEntry {
        SchemeEntry {
            info,
            build: Build::Split(build),
            describe_run: no_run_lines,
            describe_evaluation: no_evaluation_lines,
        }
    }

    /// A scheme run by three parties.
    const fn parties(info: &'static SchemeInfo, build: BuildParties) -> SchemeEntry {
        SchemeEntry {
            info,
            build: Build::Parties(build),
            describe_run: no_run_lines,
            describe_evaluation: no_evaluation_lines,
        }
    }

    /// With the lines it adds to the summaries of a training run and of an evaluation.
    const fn summarised(self, run: DescribeRun, evaluation: fn(&SchemeReport) -> Vec<String>) -> Self {
        SchemeEntry { describe_run: run, describe_evaluation: evaluation, ..self }
    }
}

fn no_run_lines(_: &SchemeReport, _: Option<&PrivacySummary>) -> Vec<String> {
    Vec::new()
}

fn no_evaluation_lines(_: &SchemeReport) -> Vec<String> {
    Vec::new()
}

/// Every scheme, in the order error messages list them.
#[rustfmt::skip]
pub static SCHEMES: &[SchemeEntry] = &[
    SchemeEntry::new(&plaintext::INFO, |i, _| plaintext::build(i)),
    SchemeEntry::new(&tee_only::INFO, |i, _| tee_only::build(i)),
    SchemeEntry::new(&gpu_only::INFO, |i, _| gpu_only::build(i)),
    SchemeEntry::new(&asymml::INFO, |i, o| asymml::build(i, &o.asymml)).summarised(asymml::describe_run, asymml::describe_evaluation),
    SchemeEntry::parties(&cryptgpu::INFO, |m, opt, o, link| start_cryptgpu(m, opt, &o.cryptgpu, link)),
    SchemeEntry::new(&goten::INFO, |i, o| goten::build(i, &o.goten)).summarised(|r, _| goten::summary_lines(r), goten::summary_lines),
];

/// CryptGPU's parties: threads of this process, or the `trustsplit party` processes that
/// `--peers` names, reached as their data owner with `--key`.
fn start_cryptgpu(
    model: &Model,
    opt: &Optimizer,
    options: &CryptgpuOptions,
    link: &DeviceLinkArgs,
) -> Result<Session, MpcError> {
    if options.peers.is_empty() {
        if !options.party_keys.is_empty() {
            return Err(MpcError::Invalid(
                "--party-keys names the keys of the parties that --peers lists; give --peers too (without it the \
                 parties are threads of this process)"
                    .into(),
            ));
        }
        return cryptgpu::start_local(model, opt, options);
    }
    if link.insecure_plaintext_link {
        return Err(MpcError::Invalid(
            "the parties' links are always authenticated and encrypted: drop --insecure-plaintext-link and give \
             --key FILE"
                .into(),
        ));
    }
    let Some(path) = &link.key else {
        return Err(MpcError::Invalid(
            "--peers needs --key FILE: the data owner's key (trustsplit keygen --out FILE), whose public key every \
             party pins with --owner-key"
                .into(),
        ));
    };
    let key = KeyPair::load(path).map_err(MpcError::Invalid)?;
    cryptgpu::start_remote(model, opt, options, &key)
}

/// Every scheme's options: the flags of `train`, `eval`, `bench step` and `enclave`, and the
/// record of a run's settings in its checkpoints (each scheme's under its own key).
#[derive(clap::Args, Clone, Debug, Default, Serialize, Deserialize, PartialEq)]
pub struct SchemeOptions {
    #[command(flatten)]
    #[serde(default)]
    pub asymml: AsymmlOptions,
    #[command(flatten)]
    #[serde(default)]
    pub cryptgpu: CryptgpuOptions,
    #[command(flatten)]
    #[serde(default)]
    pub goten: GotenOptions,
}

/// A registered scheme, as `--scheme` names it and runs record it (by name).
#[derive(Clone, Copy)]
pub struct Scheme(&'static SchemeEntry);

impl Scheme {
    /// The scheme named `name`; the error lists the schemes there are.
    pub fn named(name: &str) -> Result<Scheme, String> {
        SCHEMES.iter().find(|e| e.info.name == name).map(Scheme).ok_or_else(|| {
            let names: Vec<&str> = SCHEMES.iter().map(|e| e.info.name).collect();
            format!("unknown or not yet available scheme '{name}'; available: {}", names.join(", "))
        })
    }

    /// The registered scheme whose description is `info` (every scheme's `INFO` is registered).
    pub fn of(info: &SchemeInfo) -> Scheme {
        Scheme::named(info.name).expect("every scheme's INFO is in SCHEMES")
    }

    pub fn info(&self) -> &'static SchemeInfo {
        self.0.info
    }

    pub fn name(&self) -> &'static str {
        self.0.info.name
    }

    pub fn entry(&self) -> &'static SchemeEntry {
        self.0
    }

    pub fn all() -> impl Iterator<Item = Scheme> {
        SCHEMES.iter().map(Scheme)
    }
}

impl PartialEq for Scheme {
    fn eq(&self, other: &Scheme) -> bool {
        self.name() == other.name()
    }
}

impl Eq for Scheme {}

impl std::fmt::Debug for Scheme {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        write!(f, "Scheme({})", self.name())
    }
}

impl std::fmt::Display for Scheme {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.name())
    }
}

impl std::str::FromStr for Scheme {
    type Err = String;
    fn from_str(s: &str) -> Result<Scheme, String> {
        Scheme::named(s)
    }
}

impl Serialize for Scheme {
    fn serialize<S: serde::Serializer>(&self, s: S) -> Result<S::Ok, S::Error> {
        s.serialize_str(self.name())
    }
}

impl<'de> Deserialize<'de> for Scheme {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Scheme, D::Error> {
        let name = String::deserialize(d)?;
        Scheme::named(&name).map_err(serde::de::Error::custom)
    }
}

/// `--scheme`'s parser: the registered names, each listed in `--help` with what it releases.
pub fn scheme_parser() -> impl clap::builder::TypedValueParser<Value = Scheme> {
    use clap::builder::{PossibleValue, PossibleValuesParser, TypedValueParser};
    let names = Scheme::all().map(|s| PossibleValue::new(s.name()).help(s.info().releases));
    PossibleValuesParser::new(names).map(|name| Scheme::named(&name).expect("a registered name"))
}

/// The runner of `scheme`, with its devices opened from `device_spec` (remote ones over `link`)
/// when it uses any, and the
/// transcript written to `transcript_path` when one is given. `training`: the run it will train
/// (`None` to evaluate or benchmark). A three-party scheme starts its parties holding shares of
/// `model`, which they train with `opt`'s settings (parties in other processes are reached with
/// `link`'s key).
#[allow(clippy::too_many_arguments)]
pub fn build_runner(
    scheme: Scheme,
    device_spec: &str,
    link: &DeviceLinkArgs,
    memory_budget: usize,
    transcript_path: Option<&Path>,
    training: Option<TrainingRun>,
    options: &SchemeOptions,
    (model, opt): (&Model, &Optimizer),
) -> Result<Runner> {
    let transcript = match transcript_path {
        Some(p) => Transcript::new()
            .with_digests()
            .with_jsonl(p)
            .with_context(|| format!("creating transcript {}", p.display()))?,
        None => Transcript::new(),
    };
    let devices = if scheme.info().uses_device { crate::devices::open_devices(device_spec, link)? } else { Vec::new() };
    let transcript = Arc::new(transcript);
    match scheme.entry().build {
        Build::Split(build) => {
            let inputs = RunnerInputs { devices, memory_budget, transcript, training };
            // Goten's servers are reached with the same key as devices.
            let mut options = options.clone();
            options.goten.enclave_key = link.key.clone();
            options.goten.goten_record_limit_mib = Some(link.record_limit_mib);
            Ok(Runner::Split(build(inputs, &options).with_context(|| format!("setting up scheme {scheme}"))?))
        }
        Build::Parties(build) => {
            let session = build(model, opt, options, link).with_context(|| format!("setting up scheme {scheme}"))?;
            Ok(Runner::Parties(PartyRunner::new(scheme.name(), session, transcript)))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use clap::Parser;

    #[derive(Parser)]
    struct Flags {
        #[command(flatten)]
        options: SchemeOptions,
    }

    #[test]
    fn command_line_defaults_are_the_recorded_defaults() {
        // Runs configured in code (tests, the library) and runs from the command line with no
        // scheme flags must get the same settings, including AsymML's prototype rank schedule.
        let parsed = Flags::try_parse_from(["trustsplit"]).unwrap();
        assert_eq!(parsed.options, SchemeOptions::default());
        assert_eq!(SchemeOptions::default().asymml.rank_schedule, asymml::PROTOTYPE_RANKS);
        let custom = Flags::try_parse_from([
            "trustsplit",
            "--rank-schedule",
            "1,3",
            "--clip-norm",
            "0.5",
            "--protect-gradients",
            "off",
            "--basis",
            "batch",
        ])
        .unwrap();
        let o = custom.options.asymml;
        assert_eq!((o.rank_schedule, o.clip_norm, o.protect_gradients), (vec![1, 3], 0.5, false));
        assert_eq!(o.basis, asymml::BasisScope::Batch);
        assert!(Flags::try_parse_from(["trustsplit", "--verify-device", "maybe"]).is_err());
    }

    #[test]
    fn schemes_are_found_by_name_and_each_has_a_docs_page() {
        let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
        for scheme in Scheme::all() {
            assert_eq!(Scheme::named(scheme.name()).unwrap(), scheme);
            assert_eq!(Scheme::of(scheme.info()), scheme);
            let page = root.join(scheme.info().docs);
            assert!(page.is_file(), "{scheme}'s docs page {} is missing", page.display());
            let json = serde_json::to_string(&scheme).unwrap();
            assert_eq!(serde_json::from_str::<Scheme>(&json).unwrap(), scheme);
        }
        let err = Scheme::named("nonesuch").unwrap_err();
        assert!(err.contains("nonesuch") && err.contains("cryptgpu") && err.contains("goten"), "{err}");
    }
}
