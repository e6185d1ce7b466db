//! Uploads: the owner shares a dataset's splits into the parties' stores once ([`crate::store`]),
//! and a later run trains and evaluates on record numbers (`TRAIN_ROWS`, `EVAL_ROWS`) instead of
//! sharing every batch again.

use super::{cmd, from_owner, to_bytes, to_ring, Expect, Session, Setup, UploadRef, MAX_BATCH_BYTES};
use crate::arith;
use crate::model;
use crate::party::MpcError;
use crate::prg::Prg;
use crate::ring::FixedPoint;
use crate::store::{self, Store, StoreWriter, UploadHeader};
use std::path::Path;
use trustsplit_boundary::{Channel, Frame};

/// The most records one step may name (a batch's shares are capped at [`MAX_BATCH_BYTES`] too).
const MAX_ROWS: usize = 1 << 20;

impl Session {
    /// The owner's end of links to three parties, for an upload (no model is shared).
    pub fn for_upload(parties: Vec<Box<dyn Channel>>) -> Session {
        Session {
            parties,
            threads: Vec::new(),
            fp: FixedPoint::default(),
            classes: 0,
            specs: Vec::new(),
            input_shape: Vec::new(),
            param_values: 0,
            uploaded: false,
            stopped: false,
        }
    }

    /// Shares one split into each party's store: `batches` yields the samples (`N x` the header's
    /// sample shape, as f32, already normalised) and their labels, `header.count` in all, in the
    /// order the fingerprint was computed in. `progress` gets the records sent so far. Returns
    /// when every party has written its file.
    pub fn upload_split(
        &mut self,
        header: &UploadHeader,
        batches: impl Iterator<Item = (Vec<f32>, Vec<usize>)>,
        progress: &mut dyn FnMut(usize),
    ) -> Result<(), MpcError> {
        header.check().map_err(|e| MpcError::Invalid(format!("the upload's header: {e}")))?;
        let fp = FixedPoint::new(header.frac_bits).map_err(MpcError::Invalid)?;
        let per: usize = header.sample_shape.iter().product();
        let json = serde_json::to_vec(header).expect("serialises");
        for i in 0..3 {
            self.send(i, cmd::UPLOAD, &json)?;
        }
        // A party that cannot store the split says so before any record is sent.
        for i in 0..3 {
            self.recv(i, cmd::UPLOAD_READY, "its readiness for the upload", Expect::Exactly(0))?;
        }
        let mut rng = Prg::from_key(Prg::os_key().map_err(MpcError::Invalid)?);
        let mut sent = 0;
        for (x, labels) in batches {
            let n = labels.len();
            if x.len() != n * per || sent + n > header.count {
                return Err(MpcError::Invalid(format!(
                    "the upload's batch of {} values and {n} labels does not fit {:?} per sample, {} records in all",
                    x.len(),
                    header.sample_shape,
                    header.count
                )));
            }
            if let Some(&bad) = labels.iter().find(|&&l| l >= header.classes) {
                return Err(MpcError::Invalid(format!("label {bad} is out of range for {} classes", header.classes)));
            }
            let mut shape = vec![n];
            shape.extend_from_slice(&header.sample_shape);
            let xs = arith::split(&fp.encode_all(&x).map_err(MpcError::Invalid)?, &mut rng);
            let ys = arith::split(&model::one_hot(&labels, header.classes, fp), &mut rng);
            for i in 0..3 {
                let records = store::records(
                    &arith::replicated(&xs, i, &shape),
                    &arith::replicated(&ys, i, &[n, header.classes]),
                );
                self.send(i, cmd::UPLOAD_RECORDS, &to_bytes(&records))?;
            }
            sent += n;
            progress(sent);
        }
        if sent != header.count {
            return Err(MpcError::Invalid(format!("the upload had {sent} records, its header {}", header.count)));
        }
        for i in 0..3 {
            self.send(i, cmd::UPLOAD_END, &[])?;
        }
        for i in 0..3 {
            let got = self.recv(i, cmd::UPLOADED, "its receipt of the upload", Expect::Exactly(8))?;
            let stored = u64::from_le_bytes(got.try_into().expect("8 bytes"));
            if stored != header.count as u64 {
                return Err(MpcError::Invalid(format!("party {i} stored {stored} of {} records", header.count)));
            }
        }
        Ok(())
    }

    /// Whether this run trains on the parties' stored upload ([`Session::train_rows`]).
    pub fn is_uploaded(&self) -> bool {
        self.uploaded
    }

    /// One training step on the stored records `rows` of the upload's train split.
    pub fn train_rows(&mut self, rows: &[usize], lr: f64) -> Result<super::Logits, MpcError> {
        let mut words = vec![lr.to_bits()];
        words.extend(rows.iter().map(|&r| r as u64));
        self.send_rows(cmd::TRAIN_ROWS, rows.len(), &words)
    }

    /// The logits of the stored records `rows` of the upload's test split.
    pub fn infer_rows(&mut self, rows: &[usize]) -> Result<super::Logits, MpcError> {
        let words: Vec<u64> = rows.iter().map(|&r| r as u64).collect();
        self.send_rows(cmd::EVAL_ROWS, rows.len(), &words)
    }

    fn send_rows(&mut self, tag: u16, n: usize, words: &[u64]) -> Result<super::Logits, MpcError> {
        if !self.uploaded {
            return Err(MpcError::Invalid("this run was not started on an upload".into()));
        }
        if n == 0 || n > MAX_ROWS {
            return Err(MpcError::Invalid(format!("a batch of {n} records (1 to {MAX_ROWS})")));
        }
        let bytes = to_bytes(words);
        for i in 0..3 {
            self.send(i, tag, &bytes)?;
        }
        self.gather_logits(n)
    }
}

/// A party's side of an upload: from its first `UPLOAD` (`first`) to `STOP`, each split's file
/// created (`UPLOAD_READY`), written to `store` and acknowledged with its record count.
pub(super) fn receive(id: usize, owner: &mut dyn Channel, store: Option<&Path>, first: Frame) -> Result<(), MpcError> {
    let dir = store.ok_or_else(|| {
        MpcError::Invalid(format!("party {id} keeps no uploads: start it with --store DIR to take one"))
    })?;
    let owner_err = |source| MpcError::Link { party: id, peer: 3, source };
    let mut frame = first;
    loop {
        match frame.tag {
            cmd::UPLOAD => {
                let header: UploadHeader = serde_json::from_slice(&frame.payload)
                    .map_err(|e| MpcError::Invalid(format!("party {id}: the upload's header is malformed: {e}")))?;
                let mut writer = StoreWriter::create(dir, id, header)?;
                owner.send(cmd::UPLOAD_READY, &[]).map_err(owner_err)?;
                loop {
                    let f = from_owner(owner, id, "an upload's records", MAX_BATCH_BYTES)?;
                    match f.tag {
                        cmd::UPLOAD_RECORDS if f.payload.len().is_multiple_of(8) => {
                            writer.append(&to_ring(&f.payload)).map_err(|e| named(id, e))?
                        }
                        cmd::UPLOAD_END => break,
                        tag => {
                            return Err(MpcError::Invalid(format!(
                                "party {id}: message tag {tag:#06x} of {} bytes in an upload",
                                f.payload.len()
                            )))
                        }
                    }
                }
                let count = writer.header.count as u64;
                writer.finish().map_err(|e| named(id, e))?;
                owner.send(cmd::UPLOADED, &count.to_le_bytes()).map_err(owner_err)?;
            }
            cmd::STOP => return Ok(()),
            tag => return Err(MpcError::Invalid(format!("party {id}: unknown command {tag:#x} in an upload"))),
        }
        frame = from_owner(owner, id, "a command", super::MAX_SETUP_BYTES)?;
    }
}

fn named(id: usize, e: MpcError) -> MpcError {
    match e {
        MpcError::Invalid(text) => MpcError::Invalid(format!("party {id}: {text}")),
        other => other,
    }
}

/// The train and test stores a run names, checked against its setup and the owner's fingerprints.
pub(super) fn open_stores(
    id: usize,
    store: Option<&Path>,
    upload: &UploadRef,
    setup: &Setup,
) -> Result<(Store, Store), MpcError> {
    let dir = store.ok_or_else(|| {
        MpcError::Invalid(format!("party {id} keeps no uploads (no --store), and the run asks for {:?}", upload.name))
    })?;
    let open = |split: &str, fingerprint: &str| -> Result<Store, MpcError> {
        let s = Store::open(dir, &upload.name, split, id)?;
        let h = &s.header;
        let mismatch = |what: String| {
            Err(MpcError::Invalid(format!(
                "party {id}: upload {:?} ({split} split) {what}; upload it again with this run's settings",
                upload.name
            )))
        };
        if h.sample_shape != setup.input_shape {
            return mismatch(format!("holds samples of {:?}, the model takes {:?}", h.sample_shape, setup.input_shape));
        }
        if h.classes != setup.classes {
            return mismatch(format!("has {} classes, the model {}", h.classes, setup.classes));
        }
        if h.frac_bits != setup.frac_bits {
            return mismatch(format!(
                "was shared with {} fractional bits, the run uses {}",
                h.frac_bits, setup.frac_bits
            ));
        }
        if h.fingerprint != fingerprint {
            return mismatch(format!(
                "is not the data the owner holds (fingerprint {}..., the owner's {}...)",
                &h.fingerprint[..12],
                fingerprint.get(..12).unwrap_or(fingerprint)
            ));
        }
        Ok(s)
    };
    Ok((open("train", &upload.train_fingerprint)?, open("test", &upload.test_fingerprint)?))
}

/// A `TRAIN_ROWS` (`lr`, then record numbers) or `EVAL_ROWS` (record numbers) command.
pub(super) fn decode_rows(id: usize, payload: &[u8], train: bool) -> Result<(f64, Vec<usize>), MpcError> {
    let bad = |e: String| MpcError::Invalid(format!("party {id}: malformed batch of records: {e}"));
    if !payload.len().is_multiple_of(8) {
        return Err(bad(format!("{} bytes, not whole words", payload.len())));
    }
    let mut words = to_ring(payload);
    let lr = if train {
        if words.is_empty() {
            return Err(bad("no learning rate".into()));
        }
        let lr = f64::from_bits(words.remove(0));
        if !lr.is_finite() {
            return Err(bad(format!("learning rate {lr}")));
        }
        lr
    } else {
        0.0
    };
    if words.is_empty() || words.len() > MAX_ROWS {
        return Err(bad(format!("{} records (1 to {MAX_ROWS})", words.len())));
    }
    let rows: Result<Vec<usize>, MpcError> =
        words.iter().map(|&w| usize::try_from(w).map_err(|_| bad(format!("record {w}")))).collect();
    Ok((lr, rows?))
}
