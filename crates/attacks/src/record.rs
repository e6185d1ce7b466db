//! The attacker's copy of what an untrusted device saw: every request's operands and its result.
//!
//! [`RecordingBackend`] wraps the backend a device worker computes with (`trustsplit device
//! --record DIR`, or the in-process device of `trustsplit privacy-report`) and keeps, per request,
//! `DIR/NNNNNNNN.safetensors` with the two operands and the result under the names the operation
//! gives them (`x`, `w`, `y` for a forward convolution; `A`, `B`, `C` for a GEMM) and a line of
//! `DIR/index.jsonl`: the operation, each tensor's shape, direction and the SHA-256 of its wire
//! bytes. Other untrusted roles (a Goten server's untrusted side) record their requests in the
//! same form through [`Recorder::record_entries`], their field elements as 64-bit integers. The digests join a recording with the trusted side's transcript
//! ([`trustsplit_boundary::Transcript::with_digests`]): every released value appears in both.
//!
//! What is kept is exactly what the device held, before it computed: nothing of the trusted
//! side's. Past `max_bytes` of tensors, requests are still indexed but their tensors are dropped
//! (`"file": null`), so that a long run cannot fill the disk.

use serde::{Deserialize, Serialize};
use std::collections::HashMap;
use std::io::Write;
use std::path::{Path, PathBuf};
use std::sync::{Arc, Mutex};
use trustsplit_boundary::wire_digest;
use trustsplit_device::{Backend, DeviceError, GemmShape, Op};
use trustsplit_kernels::ConvGeometry;

/// One tensor of a recorded request.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RecordedTensor {
    pub name: String,
    pub shape: Vec<usize>,
    /// `received` (an operand the trusted side sent) or `sent` (the device's result).
    pub direction: String,
    pub sha256: String,
}

/// A line of `index.jsonl`.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct RecordedRequest {
    pub seq: u64,
    /// `gemm`, `conv_forward`, `conv_backward_data` or `conv_backward_weight`.
    pub op: String,
    /// The operation with its shape, as the device logs it.
    pub detail: String,
    pub tensors: Vec<RecordedTensor>,
    /// The safetensors file holding the tensors, relative to the folder; `None` once the
    /// recording's size limit was reached.
    pub file: Option<String>,
}

/// The three tensors of an operation, in the order operand, operand, result, with their shapes.
pub fn tensor_shapes(op: &Op) -> [(&'static str, Vec<usize>); 3] {
    let [a, b, out] = op.operand_names();
    match *op {
        Op::Gemm(GemmShape { m, n, k, trans_a, trans_b }) => [
            (a, if trans_a { vec![k, m] } else { vec![m, k] }),
            (b, if trans_b { vec![n, k] } else { vec![k, n] }),
            (out, vec![m, n]),
        ],
        Op::ConvForward(g) | Op::ConvBackwardData(g) | Op::ConvBackwardWeight(g) => {
            let ConvGeometry { batch, in_channels, out_channels, in_h, in_w, kernel_h, kernel_w, .. } = g;
            let input = vec![batch, in_channels, in_h, in_w];
            let output = vec![batch, out_channels, g.out_h(), g.out_w()];
            let weight = vec![out_channels, in_channels, kernel_h, kernel_w];
            match op {
                Op::ConvForward(_) => [(a, input), (b, weight), (out, output)],
                Op::ConvBackwardData(_) => [(a, output), (b, weight), (out, input)],
                _ => [(a, input), (b, output), (out, weight)],
            }
        }
    }
}

struct State {
    index: std::io::BufWriter<std::fs::File>,
    next_seq: u64,
    bytes_kept: u64,
    error: Option<String>,
}

/// Writes a recording folder; shared by every connection of a worker.
pub struct Recorder {
    dir: PathBuf,
    max_bytes: u64,
    state: Mutex<State>,
}

impl Recorder {
    /// Starts a recording in `dir` (created; an existing recording there is refused, so that two
    /// runs never mix), keeping at most `max_bytes` of tensors.
    pub fn create(dir: &Path, max_bytes: u64) -> Result<Arc<Recorder>, String> {
        std::fs::create_dir_all(dir)
            .map_err(|e| format!("{}: cannot create the recording folder: {e}", dir.display()))?;
        let index_path = dir.join("index.jsonl");
        let index = std::fs::OpenOptions::new().write(true).create_new(true).open(&index_path).map_err(|e| {
            if e.kind() == std::io::ErrorKind::AlreadyExists {
                format!("{}: a recording is already there; choose an empty folder", index_path.display())
            } else {
                format!("{}: {e}", index_path.display())
            }
        })?;
        let state = State { index: std::io::BufWriter::new(index), next_seq: 0, bytes_kept: 0, error: None };
        Ok(Arc::new(Recorder { dir: dir.to_path_buf(), max_bytes, state: Mutex::new(state) }))
    }

    pub fn dir(&self) -> &Path {
        &self.dir
    }

    /// Records one device request; see [`Recorder::record_entries`].
    pub fn record(&self, op: &Op, a: &[f32], b: &[f32], out: &[f32]) -> Result<(), String> {
        let shapes = tensor_shapes(op);
        let values = [a, b, out];
        let entries: Vec<Entry> = shapes
            .iter()
            .zip(values)
            .enumerate()
            .map(|(i, ((name, shape), v))| Entry {
                name,
                shape: shape.clone(),
                received: i < 2,
                values: Values::F32(v),
            })
            .collect();
        self.record_entries(op.name(), &op.to_string(), &entries)
    }

    /// Records one request of any untrusted role: what it received and what it sent back. The
    /// index line is flushed at once, so that a recording is complete up to the last request
    /// even if the worker is killed. A write error fails the request (and every later one): a
    /// recording with holes would mislead whoever attacks it.
    pub fn record_entries(&self, op: &str, detail: &str, entries: &[Entry]) -> Result<(), String> {
        let mut state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        if let Some(e) = &state.error {
            return Err(e.clone());
        }
        let seq = state.next_seq;
        state.next_seq += 1;
        let tensors = entries
            .iter()
            .map(|e| RecordedTensor {
                name: e.name.to_string(),
                shape: e.shape.clone(),
                direction: if e.received { "received" } else { "sent" }.into(),
                sha256: match e.values {
                    Values::F32(v) => wire_digest(v),
                    Values::Words(v) => wire_digest(v),
                },
            })
            .collect();
        let bytes: u64 = entries.iter().map(|e| e.values.bytes()).sum();
        let mut file = None;
        if state.bytes_kept + bytes <= self.max_bytes {
            let name = format!("{seq:08}.safetensors");
            if let Err(e) = write_tensors(&self.dir.join(&name), entries, detail) {
                return Err(state.failed(e));
            }
            state.bytes_kept += bytes;
            file = Some(name);
        }
        let line = RecordedRequest { seq, op: op.into(), detail: detail.into(), tensors, file };
        let text = serde_json::to_string(&line).expect("a record serialises");
        if let Err(e) = writeln!(state.index, "{text}").and_then(|()| state.index.flush()) {
            return Err(state.failed(format!("{}: {e}", self.dir.join("index.jsonl").display())));
        }
        Ok(())
    }

    /// The first write error of the recording, if any.
    pub fn finish(&self) -> Result<(), String> {
        let state = self.state.lock().unwrap_or_else(|p| p.into_inner());
        state.error.clone().map_or(Ok(()), Err)
    }
}

impl State {
    /// Keeps the first error, which ends the recording.
    fn failed(&mut self, e: String) -> String {
        self.error.get_or_insert(format!("recording failed: {e}")).clone()
    }
}

/// A tensor's values as a recording keeps them.
#[derive(Clone, Copy, Debug)]
pub enum Values<'a> {
    F32(&'a [f32]),
    /// Field or ring elements, kept as the signed 64-bit integers their two's-complement words
    /// are (Goten's centred elements of Z_p read as themselves).
    Words(&'a [u64]),
}

impl Values<'_> {
    fn bytes(&self) -> u64 {
        match self {
            Values::F32(v) => v.len() as u64 * 4,
            Values::Words(v) => v.len() as u64 * 8,
        }
    }
}

/// One tensor of a request to record.
#[derive(Clone, Debug)]
pub struct Entry<'a> {
    pub name: &'a str,
    pub shape: Vec<usize>,
    /// Received from the trusted side (`true`) or sent back to it.
    pub received: bool,
    pub values: Values<'a>,
}

fn write_tensors(path: &Path, entries: &[Entry], detail: &str) -> Result<(), String> {
    let bytes: Vec<Vec<u8>> = entries
        .iter()
        .map(|e| match e.values {
            Values::F32(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
            Values::Words(v) => v.iter().flat_map(|x| x.to_le_bytes()).collect(),
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView)> = entries
        .iter()
        .zip(&bytes)
        .map(|(e, b)| {
            let dtype = match e.values {
                Values::F32(_) => safetensors::Dtype::F32,
                Values::Words(_) => safetensors::Dtype::I64,
            };
            let view = safetensors::tensor::TensorView::new(dtype, e.shape.clone(), b)
                .map_err(|err| format!("{}: {}: {err}", path.display(), e.name))?;
            Ok((e.name.to_string(), view))
        })
        .collect::<Result<_, String>>()?;
    let meta = HashMap::from([("op".to_string(), detail.to_string())]);
    let serialized = safetensors::serialize(views, Some(meta)).map_err(|e| format!("{}: {e}", path.display()))?;
    std::fs::write(path, serialized).map_err(|e| format!("{}: {e}", path.display()))
}

/// A backend that records every request it computes (see the module docs).
pub struct RecordingBackend {
    inner: Box<dyn Backend>,
    recorder: Arc<Recorder>,
}

impl RecordingBackend {
    pub fn new(inner: Box<dyn Backend>, recorder: Arc<Recorder>) -> RecordingBackend {
        RecordingBackend { inner, recorder }
    }

    fn recorded(
        &self,
        op: Op,
        a: &[f32],
        b: &[f32],
        out: Result<Vec<f32>, DeviceError>,
    ) -> Result<Vec<f32>, DeviceError> {
        if let Ok(y) = &out {
            self.recorder.record(&op, a, b, y).map_err(DeviceError::Io)?;
        }
        out
    }
}

impl Backend for RecordingBackend {
    fn name(&self) -> String {
        format!("{} (recording to {})", self.inner.name(), self.recorder.dir().display())
    }
    fn gemm(&mut self, s: &GemmShape, a: &[f32], b: &[f32]) -> Result<Vec<f32>, DeviceError> {
        let out = self.inner.gemm(s, a, b);
        self.recorded(Op::Gemm(*s), a, b, out)
    }
    fn conv_forward(&mut self, g: &ConvGeometry, x: &[f32], w: &[f32]) -> Result<Vec<f32>, DeviceError> {
        let out = self.inner.conv_forward(g, x, w);
        self.recorded(Op::ConvForward(*g), x, w, out)
    }
    fn conv_backward_data(&mut self, g: &ConvGeometry, dy: &[f32], w: &[f32]) -> Result<Vec<f32>, DeviceError> {
        let out = self.inner.conv_backward_data(g, dy, w);
        self.recorded(Op::ConvBackwardData(*g), dy, w, out)
    }
    fn conv_backward_weight(&mut self, g: &ConvGeometry, x: &[f32], dy: &[f32]) -> Result<Vec<f32>, DeviceError> {
        let out = self.inner.conv_backward_weight(g, x, dy);
        self.recorded(Op::ConvBackwardWeight(*g), x, dy, out)
    }
}
