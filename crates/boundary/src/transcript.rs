//! The boundary transcript: one record per value that crosses the trust boundary.

use crate::secret::{wire_digest, WireSize};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::Write;
use std::sync::Mutex;

/// Which way a value crossed.
#[derive(Clone, Copy, Debug, PartialEq, Eq, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "kebab-case")]
pub enum Direction {
    /// Left the trusted side (a release).
    TeeToDevice,
    /// Came back from an untrusted device (results the trusted side must not trust blindly).
    DeviceToTee,
}

/// What the caller says about one release.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ReleaseInfo {
    pub scheme: String,
    /// The layer, e.g. `layers.3` or `layers.7.main.0`, or `model` for whole-model data.
    pub layer: String,
    /// What kind of value: `input`, `activation`, `weight`, `gradient`, `noised-residual`, ...
    pub kind: String,
    pub shape: Vec<usize>,
    /// Why releasing it is acceptable under the scheme (or, for insecure baselines, that it is not).
    pub reason: String,
}

/// A transcript line.
#[derive(Clone, Debug, PartialEq, Serialize, Deserialize)]
pub struct ReleaseRecord {
    pub seq: u64,
    pub direction: Direction,
    #[serde(flatten)]
    pub info: ReleaseInfo,
    pub bytes: u64,
    /// The SHA-256 of the value's wire bytes, when the transcript records digests
    /// ([`Transcript::with_digests`]): it finds the value in an untrusted side's recording.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub sha256: Option<String>,
}

/// Totals per (layer, kind, direction).
#[derive(Clone, Debug, Default, Serialize)]
pub struct TranscriptSummary {
    pub records: u64,
    /// Bytes of the values released to the device, each counted once (a value the trusted side
    /// sends again, such as AsymML's residual for the weight gradient, is released only once).
    pub bytes_released: u64,
    /// Bytes of the results the device returned.
    pub bytes_returned: u64,
    /// `"layer/kind/direction" -> (count, bytes)`.
    pub by_layer_kind: BTreeMap<String, (u64, u64)>,
}

struct Inner {
    next_seq: u64,
    summary: TranscriptSummary,
    kept: Option<Vec<ReleaseRecord>>,
    sink: Option<(std::io::BufWriter<std::fs::File>, std::path::PathBuf)>,
    sink_error: Option<String>,
    digests: bool,
}

/// The record of everything that crossed the boundary. Shared by reference; internally locked.
pub struct Transcript {
    inner: Mutex<Inner>,
}

impl Default for Transcript {
    fn default() -> Self {
        Self::new()
    }
}

impl Transcript {
    /// A transcript that keeps totals only.
    pub fn new() -> Self {
        Transcript {
            inner: Mutex::new(Inner {
                next_seq: 0,
                summary: TranscriptSummary::default(),
                kept: None,
                sink: None,
                sink_error: None,
                digests: false,
            }),
        }
    }

    /// A transcript that also keeps every record in memory (for tests and short runs).
    pub fn keeping_records() -> Self {
        let t = Self::new();
        t.lock().kept = Some(Vec::new());
        t
    }

    /// Also writes every record as a JSON line to `path` (created or truncated).
    pub fn with_jsonl(self, path: &std::path::Path) -> std::io::Result<Self> {
        let f = std::fs::File::create(path)?;
        self.lock().sink = Some((std::io::BufWriter::new(f), path.to_path_buf()));
        Ok(self)
    }

    /// Also records the SHA-256 of every value that crosses (costs a pass over each value).
    pub fn with_digests(self) -> Self {
        self.lock().digests = true;
        self
    }

    fn lock(&self) -> std::sync::MutexGuard<'_, Inner> {
        // A panic while holding the lock cannot leave the totals half-updated in a harmful way.
        self.inner.lock().unwrap_or_else(|p| p.into_inner())
    }

    pub(crate) fn record_release<T: WireSize + ?Sized>(&self, info: ReleaseInfo, value: &T) {
        let digest = self.digests().then(|| wire_digest(value));
        self.record(Direction::TeeToDevice, info, value.wire_bytes(), digest);
    }

    /// Records a value that came back from the untrusted side (for byte accounting).
    pub fn record_received(&self, info: ReleaseInfo, bytes: u64) {
        self.record(Direction::DeviceToTee, info, bytes, None);
    }

    /// [`Transcript::record_received`] with the value at hand, so that its digest is recorded
    /// when the transcript records digests.
    pub fn record_received_value<T: WireSize + ?Sized>(&self, info: ReleaseInfo, value: &T) {
        let digest = self.digests().then(|| wire_digest(value));
        self.record(Direction::DeviceToTee, info, value.wire_bytes(), digest);
    }

    fn digests(&self) -> bool {
        self.lock().digests
    }

    fn record(&self, direction: Direction, info: ReleaseInfo, bytes: u64, sha256: Option<String>) {
        let mut g = self.lock();
        let seq = g.next_seq;
        g.next_seq += 1;
        let s = &mut g.summary;
        s.records += 1;
        match direction {
            Direction::TeeToDevice => s.bytes_released += bytes,
            Direction::DeviceToTee => s.bytes_returned += bytes,
        }
        let dir = match direction {
            Direction::TeeToDevice => "out",
            Direction::DeviceToTee => "in",
        };
        let e = s.by_layer_kind.entry(format!("{}/{}/{dir}", info.layer, info.kind)).or_default();
        e.0 += 1;
        e.1 += bytes;
        let rec = ReleaseRecord { seq, direction, info, bytes, sha256 };
        if let Some((w, _)) = g.sink.as_mut() {
            let line = serde_json::to_string(&rec).expect("records serialise");
            if let Err(e) = writeln!(w, "{line}") {
                g.sink_error.get_or_insert(e.to_string());
            }
        }
        if let Some(k) = g.kept.as_mut() {
            k.push(rec);
        }
    }

    /// Totals so far.
    pub fn summary(&self) -> TranscriptSummary {
        self.lock().summary.clone()
    }

    /// Every record so far, if this transcript keeps them.
    pub fn records(&self) -> Option<Vec<ReleaseRecord>> {
        self.lock().kept.clone()
    }

    /// Flushes the JSONL file, reporting any write error that happened on the way.
    pub fn flush(&self) -> Result<(), String> {
        let mut g = self.lock();
        if let Some(e) = g.sink_error.take() {
            return Err(format!("writing the transcript failed: {e}"));
        }
        if let Some((w, path)) = g.sink.as_mut() {
            w.flush().map_err(|e| format!("{}: {e}", path.display()))?;
        }
        Ok(())
    }
}
