//! A recording read back: the attacks' only input.

use crate::record::RecordedRequest;
use safetensors::{Dtype, SafeTensors};
use std::path::{Path, PathBuf};

/// A recording folder's index, with its tensors loaded on demand.
pub struct RecordedView {
    dir: PathBuf,
    pub requests: Vec<RecordedRequest>,
}

/// A tensor loaded from a recording (64-bit integers converted to the nearest f32).
#[derive(Clone, Debug, PartialEq)]
pub struct Loaded {
    pub shape: Vec<usize>,
    pub values: Vec<f32>,
}

impl RecordedView {
    /// Reads `dir/index.jsonl`; a malformed line is an error naming the file and line.
    pub fn open(dir: &Path) -> Result<RecordedView, String> {
        let path = dir.join("index.jsonl");
        let text = std::fs::read_to_string(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        let requests = text
            .lines()
            .enumerate()
            .filter(|(_, l)| !l.trim().is_empty())
            .map(|(i, line)| {
                serde_json::from_str(line)
                    .map_err(|e| format!("{}: line {}: not a recorded request: {e}", path.display(), i + 1))
            })
            .collect::<Result<Vec<RecordedRequest>, String>>()?;
        Ok(RecordedView { dir: dir.to_path_buf(), requests })
    }

    /// Loads tensor `name` of `request`, checking its shape against the index.
    pub fn load(&self, request: &RecordedRequest, name: &str) -> Result<Loaded, String> {
        let file = request.file.as_ref().ok_or_else(|| {
            format!(
                "request {} ({}) was indexed past the recording's size limit; its tensors were not kept",
                request.seq, request.detail
            )
        })?;
        let expected = request
            .tensors
            .iter()
            .find(|t| t.name == name)
            .ok_or_else(|| format!("request {} ({}) has no tensor {name}", request.seq, request.detail))?;
        let path = self.dir.join(file);
        let bytes = std::fs::read(&path).map_err(|e| format!("{}: {e}", path.display()))?;
        let st =
            SafeTensors::deserialize(&bytes).map_err(|e| format!("{}: not a safetensors file: {e}", path.display()))?;
        let view = st.tensor(name).map_err(|e| format!("{}: tensor {name}: {e}", path.display()))?;
        if !matches!(view.dtype(), Dtype::F32 | Dtype::I64) || view.shape() != expected.shape.as_slice() {
            return Err(format!(
                "{}: tensor {name} is {:?} {:?}, the index says {:?} (F32 or I64)",
                path.display(),
                view.dtype(),
                view.shape(),
                expected.shape
            ));
        }
        // Integers (field or ring elements) are read as the numbers they are.
        let values = match view.dtype() {
            Dtype::F32 => view.data().chunks_exact(4).map(|c| f32::from_le_bytes([c[0], c[1], c[2], c[3]])).collect(),
            _ => {
                view.data().chunks_exact(8).map(|c| i64::from_le_bytes(c.try_into().expect("8 bytes")) as f32).collect()
            }
        };
        Ok(Loaded { shape: expected.shape.clone(), values })
    }

    /// The requests of operation `op` (`conv_forward`, `gemm`, ...), in order.
    pub fn of_op<'a>(&'a self, op: &'a str) -> impl Iterator<Item = &'a RecordedRequest> + 'a {
        self.requests.iter().filter(move |r| r.op == op)
    }
}
