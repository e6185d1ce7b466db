//! `trustsplit eval`: accuracy of a checkpoint on a dataset's test split.

use crate::registry::{Scheme, SchemeOptions};
use crate::train::{evaluate, load_data, EvalResult};
use anyhow::{bail, Result};
use std::path::Path;
use trustsplit_enclave::memory::DEFAULT_BUDGET_BYTES;
use trustsplit_nn::{checkpoint, zoo};

/// Loads `checkpoint` and evaluates it on `dataset`'s test split.
#[allow(clippy::too_many_arguments)]
pub fn eval(
    ckpt: &Path,
    dataset: &str,
    data_dir: Option<&Path>,
    scheme: Scheme,
    device: &str,
    link: &crate::devices::DeviceLinkArgs,
    batch_size: usize,
    threads: usize,
    options: &SchemeOptions,
    show: bool,
) -> Result<EvalResult> {
    let c = checkpoint::load(ckpt)?;
    let data = load_data(dataset, data_dir, &c.meta.model, 0, 0)?;
    if data.input_shape != c.meta.input_shape || data.test.num_classes != c.meta.num_classes {
        bail!(
            "{} was trained on inputs {:?} with {} classes; dataset {dataset} gives {:?} with {} classes",
            ckpt.display(),
            c.meta.input_shape,
            c.meta.num_classes,
            data.input_shape,
            data.test.num_classes
        );
    }
    let mut model =
        zoo::build(&c.meta.model, &c.meta.input_shape, c.meta.num_classes, 0).map_err(anyhow::Error::msg)?;
    c.restore_model(&mut model)?;
    // Evaluation never steps the optimizer; a three-party scheme is told plain SGD.
    let opt = trustsplit_nn::optim::Optimizer::new(
        trustsplit_nn::optim::OptimizerKind::Sgd { momentum: 0.0, nesterov: false },
        0.0,
    );
    let options = crate::share_upload::resolve(options, scheme, &data)?;
    let mut runner = crate::registry::build_runner(
        scheme,
        device,
        link,
        DEFAULT_BUDGET_BYTES,
        None,
        None,
        &options,
        (&model, &opt),
    )?;
    let mut result =
        crate::with_threads(threads, || evaluate(&mut runner, &mut model, &data, &data.test, batch_size, show))??;
    let report = runner.report();
    result.privacy =
        report.placement.privacy.as_ref().map(|l| trustsplit_schemes::asymml::EvaluationPrivacy::new(l, 1));
    result.device_checks = report.placement.device_checks;
    result.summary_lines = (scheme.entry().describe_evaluation)(&report);
    Ok(result)
}
