//! Byte encoding of `Saved` contexts, so the trusted runtime can keep them in its budgeted (and
//! possibly sealed and spilled) memory between the forward and the backward pass.

use crate::layers::Saved;
use crate::tensor::{data, from_vec, Tensor};
use trustsplit_kernels::batchnorm::BnBatchStats;
use trustsplit_kernels::le_bytes;

const INPUT: u8 = 1;
const BATCHNORM: u8 = 2;
const MAXPOOL: u8 = 4;
const SHAPE: u8 = 5;
const RESIDUAL: u8 = 6;
const NOTHING: u8 = 7;
const TENSORS: u8 = 8;
const POSITIVE: u8 = 9;

fn put_u64(out: &mut Vec<u8>, v: u64) {
    out.extend_from_slice(&v.to_le_bytes());
}
fn put_shape(out: &mut Vec<u8>, s: &[usize]) {
    put_u64(out, s.len() as u64);
    s.iter().for_each(|&d| put_u64(out, d as u64));
}
fn put_f32s(out: &mut Vec<u8>, v: &[f32]) {
    put_u64(out, v.len() as u64);
    le_bytes::put_f32s(out, v);
}
fn put_tensor(out: &mut Vec<u8>, t: &Tensor) {
    put_shape(out, t.shape());
    put_f32s(out, data(t));
}
fn put_list(out: &mut Vec<u8>, list: &[Saved]) {
    put_u64(out, list.len() as u64);
    list.iter().for_each(|s| s.encode(out));
}

/// Reads back what the `put_*` functions wrote; every read is bounds-checked.
struct Reader<'a> {
    bytes: &'a [u8],
    pos: usize,
}

impl Reader<'_> {
    fn take(&mut self, n: usize) -> Result<&[u8], String> {
        let end = self.pos.checked_add(n).filter(|&e| e <= self.bytes.len());
        let end = end.ok_or_else(|| format!("saved context truncated at byte {}", self.pos))?;
        let s = &self.bytes[self.pos..end];
        self.pos = end;
        Ok(s)
    }
    fn u8(&mut self) -> Result<u8, String> {
        Ok(self.take(1)?[0])
    }
    fn u64(&mut self) -> Result<u64, String> {
        Ok(u64::from_le_bytes(self.take(8)?.try_into().expect("8 bytes")))
    }
    fn len(&mut self) -> Result<usize, String> {
        let v = self.u64()?;
        usize::try_from(v).ok().filter(|&n| n <= self.bytes.len()).ok_or_else(|| format!("bad length {v}"))
    }
    fn shape(&mut self) -> Result<Vec<usize>, String> {
        let n = self.len()?;
        (0..n).map(|_| self.u64().map(|d| d as usize)).collect()
    }
    fn f32s(&mut self) -> Result<Vec<f32>, String> {
        let n = self.len()?;
        let raw = self.take(n.checked_mul(4).ok_or("length overflow")?)?;
        Ok(le_bytes::f32s(raw).ok_or("f32 data not a multiple of 4 bytes")?)
    }
    fn tensor(&mut self) -> Result<Tensor, String> {
        let shape = self.shape()?;
        let values = self.f32s()?;
        if shape.iter().product::<usize>() != values.len() {
            return Err(format!("tensor of shape {shape:?} holds {} values", values.len()));
        }
        Ok(from_vec(&shape, values))
    }
    fn list(&mut self) -> Result<Vec<Saved>, String> {
        let n = self.len()?;
        (0..n).map(|_| self.saved()).collect()
    }
    fn saved(&mut self) -> Result<Saved, String> {
        Ok(match self.u8()? {
            INPUT => Saved::Input(self.tensor()?),
            BATCHNORM => {
                let x = self.tensor()?;
                let (mean, var, inv_std) = (self.f32s()?, self.f32s()?, self.f32s()?);
                Saved::BatchNorm { x, stats: BnBatchStats { mean, var, inv_std } }
            }
            POSITIVE => {
                let shape = self.shape()?;
                let values = shape.iter().try_fold(1usize, |n, &d| n.checked_mul(d)).ok_or("shape overflow")?;
                let n = self.len()?;
                if n != values.div_ceil(32) {
                    return Err(format!("a ReLU mask of {n} words for {values} values"));
                }
                let raw = self.take(n.checked_mul(4).ok_or("length overflow")?)?;
                let mask = le_bytes::u32s(raw).ok_or("mask data not a multiple of 4 bytes")?;
                Saved::Positive { mask, shape }
            }
            MAXPOOL => {
                let in_shape = self.shape()?;
                let n = self.len()?;
                let raw = self.take(n.checked_mul(4).ok_or("length overflow")?)?;
                let argmax = le_bytes::u32s(raw).ok_or("argmax data not a multiple of 4 bytes")?;
                Saved::MaxPool { argmax, in_shape }
            }
            SHAPE => Saved::Shape(self.shape()?),
            RESIDUAL => Saved::Residual { main: self.list()?, shortcut: self.list()? },
            NOTHING => Saved::Nothing,
            TENSORS => {
                let n = self.len()?;
                Saved::Tensors((0..n).map(|_| self.tensor()).collect::<Result<_, _>>()?)
            }
            t => return Err(format!("unknown saved-context tag {t} at byte {}", self.pos - 1)),
        })
    }
}

fn shape_len(s: &[usize]) -> usize {
    8 + 8 * s.len()
}
fn f32s_len(n: usize) -> usize {
    8 + 4 * n
}
fn tensor_len(t: &Tensor) -> usize {
    shape_len(t.shape()) + f32s_len(data(t).len())
}

impl Saved {
    /// The number of bytes [`Saved::encode`] appends, without encoding (what enclave memory
    /// accounts for a context it keeps unencoded until it has to seal it).
    pub fn encoded_len(&self) -> usize {
        1 + match self {
            Saved::Input(t) => tensor_len(t),
            Saved::Positive { mask, shape } => shape_len(shape) + 8 + 4 * mask.len(),
            Saved::BatchNorm { x, stats } => {
                tensor_len(x) + f32s_len(stats.mean.len()) + f32s_len(stats.var.len()) + f32s_len(stats.inv_std.len())
            }
            Saved::MaxPool { argmax, in_shape } => shape_len(in_shape) + 8 + 4 * argmax.len(),
            Saved::Shape(s) => shape_len(s),
            Saved::Residual { main, shortcut } => {
                [main, shortcut].iter().map(|l| 8 + l.iter().map(Saved::encoded_len).sum::<usize>()).sum()
            }
            Saved::Nothing => 0,
            Saved::Tensors(list) => 8 + list.iter().map(tensor_len).sum::<usize>(),
        }
    }

    /// Appends this context's bytes to `out`.
    pub fn encode(&self, out: &mut Vec<u8>) {
        match self {
            Saved::Input(t) => {
                out.push(INPUT);
                put_tensor(out, t);
            }
            Saved::BatchNorm { x, stats } => {
                out.push(BATCHNORM);
                put_tensor(out, x);
                put_f32s(out, &stats.mean);
                put_f32s(out, &stats.var);
                put_f32s(out, &stats.inv_std);
            }
            Saved::Positive { mask, shape } => {
                out.push(POSITIVE);
                put_shape(out, shape);
                put_u64(out, mask.len() as u64);
                le_bytes::put_u32s(out, mask);
            }
            Saved::MaxPool { argmax, in_shape } => {
                out.push(MAXPOOL);
                put_shape(out, in_shape);
                put_u64(out, argmax.len() as u64);
                le_bytes::put_u32s(out, argmax);
            }
            Saved::Shape(s) => {
                out.push(SHAPE);
                put_shape(out, s);
            }
            Saved::Residual { main, shortcut } => {
                out.push(RESIDUAL);
                put_list(out, main);
                put_list(out, shortcut);
            }
            Saved::Nothing => out.push(NOTHING),
            Saved::Tensors(list) => {
                out.push(TENSORS);
                put_u64(out, list.len() as u64);
                list.iter().for_each(|t| put_tensor(out, t));
            }
        }
    }

    /// Parses bytes written by `encode`, rejecting anything malformed.
    pub fn decode(bytes: &[u8]) -> Result<Saved, String> {
        let mut r = Reader { bytes, pos: 0 };
        let s = r.saved()?;
        if r.pos != bytes.len() {
            return Err(format!("{} trailing bytes after a saved context", bytes.len() - r.pos));
        }
        Ok(s)
    }
}
