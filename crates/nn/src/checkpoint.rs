//! Checkpoints in safetensors: weights, batch-norm statistics, optimizer state and training
//! metadata (epoch, seed, RNG state, configuration), written atomically.
//!
//! Tensors are named `param.*`, `buffer.*` (batch-norm running statistics) and `optim.<slot>.*`.
//! [`save`] writes `*.safetensors.tmp`, fsyncs it, renames it over the target and fsyncs the
//! folder, so a crash leaves either the old checkpoint or the new one.

use crate::model::Model;
use crate::optim::Optimizer;
use crate::tensor::{data, from_vec, Tensor};
use safetensors::{tensor::TensorView, Dtype, SafeTensors};
use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};

const FORMAT: &str = "trustsplit-checkpoint-v1";
const META_KEY: &str = "trustsplit";

/// Everything besides tensors that a resumed run needs.
#[derive(Clone, Debug, Serialize, Deserialize, PartialEq)]
pub struct Meta {
    pub format: String,
    pub model: String,
    pub input_shape: Vec<usize>,
    pub num_classes: usize,
    /// Epochs completed.
    pub epoch: usize,
    pub optimizer_steps: u64,
    /// The data-order and augmentation RNG is a pure function of `(seed, epoch)`, so these two
    /// numbers are its complete state.
    pub seed: u64,
    /// The training configuration, as the trainer chose to record it.
    pub config: serde_json::Value,
}

/// A checkpoint read from disk.
pub struct Checkpoint {
    pub meta: Meta,
    tensors: HashMap<String, Tensor>,
    path: PathBuf,
}

#[derive(Debug, thiserror::Error)]
pub enum CheckpointError {
    #[error("{path}: {source}")]
    Io { path: PathBuf, source: std::io::Error },
    #[error("{path}: not a safetensors file: {reason}")]
    Format { path: PathBuf, reason: String },
    #[error("{path}: {reason}")]
    Mismatch { path: PathBuf, reason: String },
}

fn param_key(name: &str) -> String {
    format!("param.{name}")
}
fn buffer_key(name: &str) -> String {
    format!("buffer.{name}")
}
fn optim_key(slot: &str, name: &str) -> String {
    format!("optim.{slot}.{name}")
}

/// Writes a checkpoint atomically: a temporary file in the same folder, flushed to disk, then
/// renamed over `path`, so a crash leaves either the old checkpoint or the new one.
pub fn save(path: &Path, model: &Model, opt: &Optimizer, meta: &Meta) -> Result<(), CheckpointError> {
    let io = |source| CheckpointError::Io { path: path.to_path_buf(), source };
    let mut entries: Vec<(String, &Tensor)> = Vec::new();
    let params = model.named_params();
    for (n, t) in &params {
        entries.push((param_key(n), t));
    }
    for (n, t) in model.named_buffers() {
        entries.push((buffer_key(&n), t));
    }
    for (slot, tensors) in opt.kind.slots().iter().zip(&opt.state) {
        for ((n, _), t) in params.iter().zip(tensors) {
            entries.push((optim_key(slot, n), t));
        }
    }
    let views: Vec<(String, TensorView)> = entries
        .iter()
        .map(|(n, t)| {
            let bytes: &[u8] = bytemuck_cast(data(t));
            (n.clone(), TensorView::new(Dtype::F32, t.shape().to_vec(), bytes).expect("valid view"))
        })
        .collect();
    let mut info = HashMap::new();
    info.insert(META_KEY.to_string(), serde_json::to_string(meta).expect("metadata serialises"));
    let bytes = safetensors::serialize(views, Some(info))
        .map_err(|e| CheckpointError::Format { path: path.to_path_buf(), reason: e.to_string() })?;
    write_atomically(path, &bytes).map_err(io)
}

/// Writes `bytes` to `path` so that a crash leaves either the old file or the new one: a temporary
/// file in the same folder (`path` with `.tmp` appended), flushed to disk, renamed over `path`,
/// and the folder flushed so that the rename is durable too.
pub fn write_atomically(path: &Path, bytes: &[u8]) -> std::io::Result<()> {
    let dir = path.parent().filter(|p| !p.as_os_str().is_empty()).unwrap_or(Path::new("."));
    std::fs::create_dir_all(dir)?;
    let mut tmp = path.as_os_str().to_owned();
    tmp.push(".tmp");
    let tmp = PathBuf::from(tmp);
    {
        let mut f = std::fs::File::create(&tmp)?;
        f.write_all(bytes)?;
        f.sync_all()?;
    }
    std::fs::rename(&tmp, path)?;
    if let Ok(d) = std::fs::File::open(dir) {
        let _ = d.sync_all();
    }
    Ok(())
}

/// f32 slice as bytes (little-endian on every platform we build for).
fn bytemuck_cast(v: &[f32]) -> &[u8] {
    // SAFETY: f32 has no padding and any byte pattern is a valid u8.
    unsafe { std::slice::from_raw_parts(v.as_ptr() as *const u8, std::mem::size_of_val(v)) }
}

/// Reads and checks a checkpoint file.
pub fn load(path: &Path) -> Result<Checkpoint, CheckpointError> {
    let bytes = std::fs::read(path).map_err(|source| CheckpointError::Io { path: path.to_path_buf(), source })?;
    let format = |reason: String| CheckpointError::Format { path: path.to_path_buf(), reason };
    let (_, header) = SafeTensors::read_metadata(&bytes).map_err(|e| format(e.to_string()))?;
    let meta_json = header
        .metadata()
        .as_ref()
        .and_then(|m| m.get(META_KEY))
        .ok_or_else(|| format("no trustsplit metadata (is this a trustsplit checkpoint?)".into()))?;
    let meta: Meta = serde_json::from_str(meta_json).map_err(|e| format(format!("bad metadata: {e}")))?;
    if meta.format != FORMAT {
        return Err(format(format!("format '{}', expected '{FORMAT}'", meta.format)));
    }
    let st = SafeTensors::deserialize(&bytes).map_err(|e| format(e.to_string()))?;
    let mut tensors = HashMap::new();
    for (name, view) in st.tensors() {
        if view.dtype() != Dtype::F32 {
            return Err(format(format!("tensor {name} has dtype {:?}, expected F32", view.dtype())));
        }
        let values = trustsplit_kernels::le_bytes::f32s(view.data()).ok_or_else(|| {
            format(format!("tensor {name}: {} bytes is not a whole number of f32s", view.data().len()))
        })?;
        tensors.insert(name, from_vec(view.shape(), values));
    }
    Ok(Checkpoint { meta, tensors, path: path.to_path_buf() })
}

impl Checkpoint {
    fn mismatch(&self, reason: String) -> CheckpointError {
        CheckpointError::Mismatch { path: self.path.clone(), reason }
    }

    fn take(&self, key: &str, shape: &[usize]) -> Result<&Tensor, CheckpointError> {
        let t = self.tensors.get(key).ok_or_else(|| self.mismatch(format!("tensor {key} is missing")))?;
        if t.shape() != shape {
            return Err(self.mismatch(format!("tensor {key} has shape {:?}, the model expects {shape:?}", t.shape())));
        }
        Ok(t)
    }

    /// Copies weights and batch-norm statistics into `model` (which must have the same layout).
    pub fn restore_model(&self, model: &mut Model) -> Result<(), CheckpointError> {
        if model.name != self.meta.model {
            return Err(self.mismatch(format!("checkpoint is for model {}, not {}", self.meta.model, model.name)));
        }
        let names: Vec<(String, Vec<usize>)> =
            model.named_params().iter().map(|(n, t)| (param_key(n), t.shape().to_vec())).collect();
        let values = names.iter().map(|(k, s)| self.take(k, s).cloned()).collect::<Result<Vec<_>, _>>()?;
        for (p, v) in model.params_mut().into_iter().zip(values) {
            *p = v;
        }
        let names: Vec<(String, Vec<usize>)> =
            model.named_buffers().iter().map(|(n, t)| (buffer_key(n), t.shape().to_vec())).collect();
        let values = names.iter().map(|(k, s)| self.take(k, s).cloned()).collect::<Result<Vec<_>, _>>()?;
        for (b, v) in model.buffers_mut().into_iter().zip(values) {
            *b = v;
        }
        Ok(())
    }

    /// Restores the optimizer's state for `model`'s parameters.
    pub fn restore_optimizer(&self, opt: &mut Optimizer, model: &Model) -> Result<(), CheckpointError> {
        opt.steps = self.meta.optimizer_steps;
        if opt.steps == 0 {
            opt.state.clear();
            return Ok(());
        }
        let params = model.named_params();
        opt.state = opt
            .kind
            .slots()
            .iter()
            .map(|slot| params.iter().map(|(n, t)| self.take(&optim_key(slot, n), t.shape()).cloned()).collect())
            .collect::<Result<_, _>>()?;
        Ok(())
    }
}

/// Builds the metadata block for a checkpoint.
pub fn meta(model: &Model, epoch: usize, optimizer_steps: u64, seed: u64, config: serde_json::Value) -> Meta {
    Meta {
        format: FORMAT.to_string(),
        model: model.name.clone(),
        input_shape: model.input_shape.clone(),
        num_classes: model.num_classes,
        epoch,
        optimizer_steps,
        seed,
        config,
    }
}
