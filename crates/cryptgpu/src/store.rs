//! A party's store of uploaded datasets: its replicated shares of every record, on its own disk,
//! so that the data owner shares a dataset once (`trustsplit upload --scheme cryptgpu`) and each
//! training step after sends only the batch's record numbers.
//!
//! One file per dataset, split and party, `NAME.SPLIT.partyI.shares`:
//! - the magic `TSSHARE1`, then the header's length (u64, little-endian) and the header as JSON
//!   ([`UploadHeader`]);
//! - then `count` records of the same size, each the party's `(cur, prev)` of the sample's
//!   fixed-point values and of its one-hot label: `x_cur, x_prev, y_cur, y_prev`, u64
//!   little-endian.
//!
//! A file is written under a temporary name and renamed when complete, so a store never holds a
//! half upload. One party's file is two of the three parts of each value: uniform random on its
//! own (the sharing is fresh, from the owner's OS-keyed generator), like everything a party holds.
//!
//! The header's fingerprint is SHA-256 of the plaintext the owner shared (its fixed-point words
//! and labels, with the settings that produced them). The owner recomputes it from its own copy
//! before training, so a store that holds other data, other settings or another split is refused
//! instead of trained on. It lets a party check a guess of the whole dataset, nothing more.

use crate::arith::AShare;
use crate::party::MpcError;
use serde::{Deserialize, Serialize};
use sha2::{Digest, Sha256};
use std::fs::File;
use std::io::{BufWriter, Read, Write};
use std::os::unix::fs::FileExt;
use std::path::{Path, PathBuf};

const MAGIC: &[u8; 8] = b"TSSHARE1";
/// The largest header read: a few hundred bytes of JSON in practice.
const MAX_HEADER_BYTES: u64 = 1 << 16;

/// What an uploaded split holds.
#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct UploadHeader {
    /// The upload's name (`--name`): letters, digits, `.`, `_`, `-`.
    pub name: String,
    /// `train` or `test`.
    pub split: String,
    pub count: usize,
    /// One sample's shape, `C x H x W`.
    pub sample_shape: Vec<usize>,
    pub classes: usize,
    pub frac_bits: u32,
    /// SHA-256 of the shared plaintext, hex ([`Fingerprint`]).
    pub fingerprint: String,
}

impl UploadHeader {
    /// Ring words of one record in a party's file.
    pub fn record_words(&self) -> usize {
        2 * self.sample_shape.iter().product::<usize>() + 2 * self.classes
    }

    /// Checks what a header promises before a file is made or read from it.
    pub fn check(&self) -> Result<(), String> {
        check_name(&self.name)?;
        if self.split != "train" && self.split != "test" {
            return Err(format!("split {:?} is neither train nor test", self.split));
        }
        let volume = self.sample_shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
        if self.sample_shape.len() != 3 || volume.is_none_or(|v| v == 0 || v > 1 << 26) {
            return Err(format!("sample shape {:?} is not C x H x W of a sensible size", self.sample_shape));
        }
        if self.classes == 0 || self.classes > 1 << 16 {
            return Err(format!("{} classes", self.classes));
        }
        if self.count == 0 || self.count > 1 << 32 {
            return Err(format!("{} records", self.count));
        }
        if self.fingerprint.len() != 64 || !self.fingerprint.bytes().all(|b| b.is_ascii_hexdigit()) {
            return Err("the fingerprint is not 64 hex digits".into());
        }
        Ok(())
    }
}

/// An upload's name becomes part of a file name: keep it to a safe alphabet.
pub fn check_name(name: &str) -> Result<(), String> {
    let ok = !name.is_empty()
        && name.len() <= 64
        && !name.starts_with('.')
        && name.bytes().all(|b| b.is_ascii_alphanumeric() || b"._-".contains(&b));
    if ok {
        Ok(())
    } else {
        Err(format!("upload name {name:?}: use 1 to 64 letters, digits, '.', '_' or '-', not starting with '.'"))
    }
}

/// The file of party `id`'s shares of split `split` of upload `name` in `dir`.
pub fn path(dir: &Path, name: &str, split: &str, id: usize) -> PathBuf {
    dir.join(format!("{name}.{split}.party{id}.shares"))
}

/// SHA-256 of what an upload shares, fed record by record in order.
pub struct Fingerprint(Sha256);

impl Fingerprint {
    pub fn new(sample_shape: &[usize], classes: usize, frac_bits: u32) -> Fingerprint {
        let mut h = Sha256::new();
        h.update(b"trustsplit cryptgpu upload v1");
        h.update((sample_shape.len() as u64).to_le_bytes());
        sample_shape.iter().for_each(|&d| h.update((d as u64).to_le_bytes()));
        h.update((classes as u64).to_le_bytes());
        h.update(frac_bits.to_le_bytes());
        Fingerprint(h)
    }

    /// One record: its fixed-point words and its label.
    pub fn record(&mut self, words: &[u64], label: usize) {
        self.0.update(bytemuck::cast_slice::<u64, u8>(words));
        self.0.update((label as u64).to_le_bytes());
    }

    /// The hex digest, after the record count.
    pub fn finish(mut self, count: usize) -> String {
        self.0.update((count as u64).to_le_bytes());
        self.0.finalize().iter().map(|b| format!("{b:02x}")).collect()
    }
}

/// A split's file being written: records are appended, and [`StoreWriter::finish`] makes it
/// visible under its name.
pub struct StoreWriter {
    pub header: UploadHeader,
    tmp: PathBuf,
    dest: PathBuf,
    /// `None` once finished; a writer dropped before that removes its partial file.
    out: Option<BufWriter<File>>,
    written: usize,
}

impl Drop for StoreWriter {
    fn drop(&mut self) {
        if self.out.take().is_some() {
            let _ = std::fs::remove_file(&self.tmp);
        }
    }
}

fn io_error(path: &Path, what: &str, e: std::io::Error) -> MpcError {
    MpcError::Invalid(format!("{what} {}: {e}", path.display()))
}

impl StoreWriter {
    pub fn create(dir: &Path, id: usize, header: UploadHeader) -> Result<StoreWriter, MpcError> {
        header.check().map_err(|e| MpcError::Invalid(format!("party {id}: the upload's header: {e}")))?;
        let dest = path(dir, &header.name, &header.split, id);
        // A name of its own: an abandoned upload's cleanup never removes another's file.
        let nonce = std::time::SystemTime::now().duration_since(std::time::UNIX_EPOCH).map_or(0, |d| d.as_nanos());
        let tmp = dest.with_extension(format!("shares.partial-{}-{nonce}", std::process::id()));
        let file = File::create(&tmp).map_err(|e| io_error(&tmp, &format!("party {id}: creating"), e))?;
        let mut out = BufWriter::with_capacity(1 << 20, file);
        let json = serde_json::to_vec(&header).expect("serialises");
        let mut head = MAGIC.to_vec();
        head.extend_from_slice(&(json.len() as u64).to_le_bytes());
        head.extend_from_slice(&json);
        out.write_all(&head).map_err(|e| io_error(&tmp, &format!("party {id}: writing"), e))?;
        Ok(StoreWriter { header, tmp, dest, out: Some(out), written: 0 })
    }

    /// Appends whole records (`words` is a multiple of the record size).
    pub fn append(&mut self, words: &[u64]) -> Result<(), MpcError> {
        let per = self.header.record_words();
        if !words.len().is_multiple_of(per) {
            return Err(MpcError::Invalid(format!(
                "an upload's chunk of {} words is not whole records of {per} words",
                words.len()
            )));
        }
        let n = words.len() / per;
        if self.written + n > self.header.count {
            return Err(MpcError::Invalid(format!(
                "the upload sends more than the {} records its header announced",
                self.header.count
            )));
        }
        let out = self.out.as_mut().expect("not finished");
        out.write_all(bytemuck::cast_slice(words)).map_err(|e| io_error(&self.tmp, "writing", e))?;
        self.written += n;
        Ok(())
    }

    /// Flushes, syncs and renames the file into place; the record count must be the header's.
    pub fn finish(mut self) -> Result<PathBuf, MpcError> {
        if self.written != self.header.count {
            return Err(MpcError::Invalid(format!(
                "the upload ended after {} of the {} records its header announced",
                self.written, self.header.count
            )));
        }
        let out = self.out.take().expect("not finished");
        let done = out
            .into_inner()
            .map_err(|e| io_error(&self.tmp, "writing", e.into_error()))
            .and_then(|file| file.sync_all().map_err(|e| io_error(&self.tmp, "syncing", e)))
            .and_then(|()| {
                std::fs::rename(&self.tmp, &self.dest).map_err(|e| io_error(&self.dest, "renaming into", e))
            });
        if done.is_err() {
            let _ = std::fs::remove_file(&self.tmp);
        }
        done.map(|()| self.dest.clone())
    }
}

/// A split's file opened for reading records by number.
pub struct Store {
    pub header: UploadHeader,
    path: PathBuf,
    file: File,
    data_offset: u64,
}

impl Store {
    /// Opens and checks a file: magic, header, and a length of exactly `count` records.
    pub fn open(dir: &Path, name: &str, split: &str, id: usize) -> Result<Store, MpcError> {
        check_name(name).map_err(MpcError::Invalid)?;
        let path = path(dir, name, split, id);
        let bad = |offset: u64, what: String| {
            MpcError::Invalid(format!("party {id}: {} at byte {offset}: {what}", path.display()))
        };
        let mut file = File::open(&path).map_err(|e| {
            MpcError::Invalid(format!(
                "party {id} holds no upload {name:?} ({split} split): {}: {e}; upload it first (trustsplit upload \
                 --scheme cryptgpu --name {name})",
                path.display()
            ))
        })?;
        let len = file.metadata().map_err(|e| io_error(&path, "reading", e))?.len();
        let mut head = [0u8; 16];
        file.read_exact(&mut head).map_err(|_| bad(0, format!("{len} bytes, too short for the header")))?;
        if &head[..8] != MAGIC {
            return Err(bad(0, format!("magic {:?}, expected {:?}", &head[..8], MAGIC)));
        }
        let json_len = u64::from_le_bytes(head[8..].try_into().expect("8 bytes"));
        if json_len > MAX_HEADER_BYTES || 16 + json_len > len {
            return Err(bad(8, format!("a header of {json_len} bytes in a file of {len}")));
        }
        let mut json = vec![0u8; json_len as usize];
        file.read_exact(&mut json).map_err(|e| bad(16, e.to_string()))?;
        let header: UploadHeader =
            serde_json::from_slice(&json).map_err(|e| bad(16, format!("the header is malformed: {e}")))?;
        header.check().map_err(|e| bad(16, e))?;
        if header.name != name || header.split != split {
            return Err(bad(16, format!("the header names {}/{}, expected {name}/{split}", header.name, header.split)));
        }
        let data_offset = 16 + json_len;
        let expected = header.count as u64 * header.record_words() as u64 * 8;
        if len - data_offset != expected {
            return Err(bad(
                data_offset,
                format!("{} bytes of records, expected {expected} ({} records)", len - data_offset, header.count),
            ));
        }
        Ok(Store { header, path, file, data_offset })
    }

    /// The records `rows` as shares: inputs `[n, C, H, W]` and one-hot labels `[n, classes]`.
    pub fn gather(&self, rows: &[usize]) -> Result<(AShare, AShare), MpcError> {
        let h = &self.header;
        let (v, c) = (h.sample_shape.iter().product::<usize>(), h.classes);
        let n = rows.len();
        let mut x_shape = vec![n];
        x_shape.extend_from_slice(&h.sample_shape);
        let mut x = AShare::zeros(&x_shape);
        let mut y = AShare::zeros(&[n, c]);
        let mut record = vec![0u64; h.record_words()];
        for (r, &row) in rows.iter().enumerate() {
            if row >= h.count {
                return Err(MpcError::Invalid(format!("record {row} of a split of {} records", h.count)));
            }
            let at = self.data_offset + (row * record.len() * 8) as u64;
            self.file
                .read_exact_at(bytemuck::cast_slice_mut(&mut record), at)
                .map_err(|e| io_error(&self.path, &format!("reading record {row} at byte {at} of"), e))?;
            x.cur[r * v..(r + 1) * v].copy_from_slice(&record[..v]);
            x.prev[r * v..(r + 1) * v].copy_from_slice(&record[v..2 * v]);
            y.cur[r * c..(r + 1) * c].copy_from_slice(&record[2 * v..2 * v + c]);
            y.prev[r * c..(r + 1) * c].copy_from_slice(&record[2 * v + c..]);
        }
        Ok((x, y))
    }
}

/// One party's record words for a batch: its `(cur, prev)` of the inputs and labels, record by
/// record, as [`StoreWriter::append`] takes them.
pub fn records(x: &AShare, y: &AShare) -> Vec<u64> {
    let n = x.shape[0];
    let (v, c) = (x.len() / n.max(1), y.len() / n.max(1));
    let mut out = Vec::with_capacity(n * 2 * (v + c));
    for r in 0..n {
        out.extend_from_slice(&x.cur[r * v..(r + 1) * v]);
        out.extend_from_slice(&x.prev[r * v..(r + 1) * v]);
        out.extend_from_slice(&y.cur[r * c..(r + 1) * c]);
        out.extend_from_slice(&y.prev[r * c..(r + 1) * c]);
    }
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn header(count: usize) -> UploadHeader {
        UploadHeader {
            name: "fm".into(),
            split: "train".into(),
            count,
            sample_shape: vec![1, 2, 3],
            classes: 4,
            frac_bits: 16,
            fingerprint: "ab".repeat(32),
        }
    }

    fn dir() -> PathBuf {
        let d = std::env::temp_dir().join(format!("ts-store-{}-{:?}", std::process::id(), std::thread::current().id()));
        std::fs::create_dir_all(&d).unwrap();
        d
    }

    #[test]
    fn records_round_trip_and_bad_files_are_named() {
        let d = dir();
        let h = header(3);
        let per = h.record_words();
        let words: Vec<u64> = (0..3 * per as u64).map(|i| i.wrapping_mul(0x9e37_79b9_7f4a_7c15)).collect();
        let mut w = StoreWriter::create(&d, 1, h.clone()).unwrap();
        assert!(Store::open(&d, "fm", "train", 1).is_err(), "visible before it is complete");
        w.append(&words[..per]).unwrap();
        assert!(w.append(&words[..per - 1]).is_err(), "a partial record");
        w.append(&words[per..]).unwrap();
        w.finish().unwrap();
        let s = Store::open(&d, "fm", "train", 1).unwrap();
        assert_eq!(s.header, h);
        let (x, y) = s.gather(&[2, 0]).unwrap();
        assert_eq!(x.shape, vec![2, 1, 2, 3]);
        assert_eq!(records(&x, &y), [&words[2 * per..], &words[..per]].concat());
        assert!(s.gather(&[3]).unwrap_err().to_string().contains("record 3 of a split of 3"));

        // A truncated file, and one with a corrupt magic, are refused with the path and offset.
        let p = path(&d, "fm", "train", 1);
        let bytes = std::fs::read(&p).unwrap();
        std::fs::write(&p, &bytes[..bytes.len() - 8]).unwrap();
        let e = Store::open(&d, "fm", "train", 1).err().unwrap().to_string();
        assert!(e.contains("fm.train.party1.shares") && e.contains("expected"), "{e}");
        let mut bad = bytes.clone();
        bad[0] = b'X';
        std::fs::write(&p, &bad).unwrap();
        let e = Store::open(&d, "fm", "train", 1).err().unwrap().to_string();
        assert!(e.contains("at byte 0") && e.contains("magic"), "{e}");
        let e = Store::open(&d, "other", "train", 1).err().unwrap().to_string();
        assert!(e.contains("holds no upload \"other\""), "{e}");
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn an_upload_that_ends_early_is_refused() {
        let d = dir().join("early");
        std::fs::create_dir_all(&d).unwrap();
        let mut w = StoreWriter::create(&d, 0, header(2)).unwrap();
        w.append(&vec![7; header(2).record_words()]).unwrap();
        assert!(w.finish().unwrap_err().to_string().contains("after 1 of the 2 records"));
        assert!(Store::open(&d, "fm", "train", 0).is_err());
        std::fs::remove_dir_all(&d).unwrap();
    }

    #[test]
    fn names_are_kept_to_a_safe_alphabet() {
        for good in ["fashion-mnist", "a", "cifar10.v2_b"] {
            assert!(check_name(good).is_ok(), "{good}");
        }
        for bad in ["", "../x", "a/b", ".hidden", "x y", &"n".repeat(65)] {
            assert!(check_name(bad).is_err(), "{bad}");
        }
    }
}
