//! A server's untrusted side (its host and device): what it computes on what it is sent, in this
//! process or as `trustsplit goten-server` behind an authenticated, encrypted link.
//!
//! - Server 0: `C0 = op(A0, F) + op(E, B0 - F) - CM0` from `A0, B0, E, F, CM0`.
//! - Server 1: `C1 = op(A1, F) + op(E, B1) - CM1` from `A1, B1, E, F, CM1`.
//! - Server 2: `Z = op(U, V) - CMZ` from `U, V, CMZ`; in the offline mode it makes `Z` when asked
//!   to prepare and keeps it, under a number, until the enclave takes it.
//!
//! Messages (`tag`, payload of little-endian u64 words): `COMPUTE` (the op, then the operands in
//! the order above) and `RESULT` (the values); `PREPARE` (a number, the op, `U, V, CMZ`) and
//! `READY`; `TAKE` (a number) and `RESULT`; `STOP`; `FAILED` (a note, the other way). Every size
//! follows from the op, which is checked before anything is allocated from it.

use crate::field;
use crate::ops::Op;
use std::collections::VecDeque;
use trustsplit_attacks::{Entry, Recorder, Values};
use trustsplit_boundary::{Channel, ChannelError, Frame, ReleaseInfo, Released, Transcript};
use trustsplit_cryptgpu::gemm::ConvShape;

pub mod tag {
    pub const COMPUTE: u16 = 0x4b01;
    pub const RESULT: u16 = 0x4b02;
    pub const PREPARE: u16 = 0x4b03;
    pub const READY: u16 = 0x4b04;
    pub const TAKE: u16 = 0x4b05;
    pub const STOP: u16 = 0x4b06;
    pub const FAILED: u16 = 0x4bff;
}

/// The largest tensor a server takes: 2^28 values (2 GiB of words).
const MAX_VALUES: usize = 1 << 28;
/// The most offline products a server keeps, and their most bytes.
const MAX_STORED: usize = 1 << 16;
const MAX_STORED_BYTES: usize = 16 << 30;
/// Words that encode an op.
pub const OP_WORDS: usize = 9;

/// `x - m` reduced into the field, for each value of an exact product `x`.
fn minus_mask(x: Vec<u64>, m: &[u64]) -> Vec<u64> {
    x.iter().zip(m).map(|(&x, &m)| field::reduce((x as i64 - m as i64) as u64)).collect()
}

fn add_words(acc: &mut [u64], x: &[u64]) {
    acc.iter_mut().zip(x).for_each(|(a, b)| *a = a.wrapping_add(*b));
}

/// The names of the operands server `role` takes, in order.
pub fn operand_names(role: usize) -> &'static [&'static str] {
    match role {
        0 => &["A0", "B0", "E", "F", "CM0"],
        1 => &["A1", "B1", "E", "F", "CM1"],
        _ => &["U", "V", "CMZ"],
    }
}

/// What a `goten-server` process keeps of its requests: names and sizes in its own transcript,
/// the values themselves in a recording.
#[derive(Clone, Copy, Default)]
pub struct Keep<'a> {
    pub transcript: Option<&'a Transcript>,
    pub recorder: Option<&'a Recorder>,
}

/// Keeps what server `role` received for request `n` (each operand) and what it returned; a
/// recording that cannot be written fails the request.
fn record(keep: Keep, role: usize, n: u64, op: &Op, operands: &[&[u64]], result: &[u64]) -> Result<(), String> {
    if let Some(r) = keep.recorder {
        record_request(r, role, op, operands, result)?;
    }
    let Some(t) = keep.transcript else { return Ok(()) };
    let info = |kind: &str, len: usize, reason: &str| ReleaseInfo {
        scheme: "goten".into(),
        layer: format!("request {n}"),
        kind: format!("server {role}: {kind}"),
        shape: vec![len],
        reason: reason.into(),
    };
    for (name, x) in operand_names(role).iter().zip(operands) {
        Released::new(t, info(name, x.len(), "received from the enclave"), *x);
    }
    t.record_received_value(info(result_name(role), result.len(), "returned to the enclave"), result);
    Ok(())
}

/// The name of what server `role` returns.
pub fn result_name(role: usize) -> &'static str {
    ["C0", "C1", "Z"][role.min(2)]
}

/// Keeps request `op` of server `role` (its operands and its result) in `recorder`, as the
/// server's owner could: what `trustsplit privacy-report` attacks.
pub fn record_request(
    recorder: &Recorder,
    role: usize,
    op: &Op,
    operands: &[&[u64]],
    result: &[u64],
) -> Result<(), String> {
    let [a, b, c] = op.shapes();
    let shapes = match role {
        0 | 1 => vec![a.clone(), b.clone(), a, b, c.clone()],
        _ => vec![a, b, c.clone()],
    };
    let mut entries: Vec<Entry> = operand_names(role)
        .iter()
        .zip(shapes)
        .zip(operands)
        .map(|((name, shape), values)| Entry { name, shape, received: true, values: Values::Words(values) })
        .collect();
    entries.push(Entry { name: result_name(role), shape: c, received: false, values: Values::Words(result) });
    recorder.record_entries(op.name(), &format!("goten server {role}: {}", describe(op)), &entries)
}

/// `op` in a few words: its name and shapes.
pub fn describe(op: &Op) -> String {
    let [a, b, _] = op.shapes();
    let dims = |s: &[usize]| s.iter().map(usize::to_string).collect::<Vec<_>>().join("x");
    match op {
        Op::ConvForward(s) | Op::ConvInputGrad(s) | Op::ConvWeightGrad(s) => {
            format!("{} {} by {} stride {} padding {}", op.name(), dims(&a), dims(&b), s.stride, s.padding)
        }
        _ => format!("{} {} by {}", op.name(), dims(&a), dims(&b)),
    }
}

/// The operands' lengths server `role` takes for `op`, in order.
pub fn operand_lens(role: usize, op: &Op) -> Vec<usize> {
    let (a, b, c) = (op.a_len(), op.b_len(), op.out_len());
    match role {
        0 | 1 => vec![a, b, a, b, c],
        _ => vec![a, b, c],
    }
}

/// What server `role` returns for `op` on `operands` (checked by the caller to have
/// [`operand_lens`]).
pub fn compute(role: usize, op: &Op, operands: &[&[u64]]) -> Vec<u64> {
    match (role, operands) {
        (0, [a0, b0, e, f, cm0]) => {
            let mut c = op.eval(a0, f);
            add_words(&mut c, &op.eval(e, &field::sub(b0, f)));
            minus_mask(c, cm0)
        }
        (1, [a1, b1, e, f, cm1]) => {
            let mut c = op.eval(a1, f);
            add_words(&mut c, &op.eval(e, b1));
            minus_mask(c, cm1)
        }
        (2, [u, v, cmz]) => minus_mask(op.eval(u, v), cmz),
        _ => panic!("server {role} takes {} operands, not {}", operand_lens(role, op).len(), operands.len()),
    }
}

pub fn encode_op(op: &Op) -> [u64; OP_WORDS] {
    let mut w = [0u64; OP_WORDS];
    let conv = |kind: u64, s: &ConvShape| {
        [
            kind,
            s.batch as u64,
            s.in_channels as u64,
            s.height as u64,
            s.width as u64,
            s.out_channels as u64,
            s.kernel as u64,
            s.stride as u64,
            s.padding as u64,
        ]
    };
    match op {
        Op::LinearForward { n, k, m } => w[..4].copy_from_slice(&[1, *n as u64, *k as u64, *m as u64]),
        Op::LinearInputGrad { n, k, m } => w[..4].copy_from_slice(&[2, *n as u64, *k as u64, *m as u64]),
        Op::LinearWeightGrad { n, k, m } => w[..4].copy_from_slice(&[3, *n as u64, *k as u64, *m as u64]),
        Op::ConvForward(s) => w = conv(4, s),
        Op::ConvInputGrad(s) => w = conv(5, s),
        Op::ConvWeightGrad(s) => w = conv(6, s),
    }
    w
}

/// The op `w` encodes, if its sizes are sensible: every tensor of it below [`MAX_VALUES`] and
/// its reduction within [`crate::ops::MAX_REDUCTION`].
pub fn decode_op(w: &[u64]) -> Result<Op, String> {
    if w.len() < OP_WORDS {
        return Err(format!("an op of {} words, expected {OP_WORDS}", w.len()));
    }
    let linear = (1..=3).contains(&w[0]);
    let mut dims = Vec::new();
    for (i, &v) in w[1..if linear { 4 } else { OP_WORDS }].iter().enumerate() {
        // Every dimension is at least 1, except a convolution's padding (the last one).
        let ok = if !linear && i == 7 { v < 64 } else { v > 0 && v <= MAX_VALUES as u64 };
        if !ok {
            return Err(format!("an op dimension of {v}"));
        }
        dims.push(v as usize);
    }
    let conv = || {
        let s = ConvShape {
            batch: dims[0],
            in_channels: dims[1],
            height: dims[2],
            width: dims[3],
            out_channels: dims[4],
            kernel: dims[5],
            stride: dims[6],
            padding: dims[7],
        };
        if s.kernel > s.height + 2 * s.padding || s.kernel > s.width + 2 * s.padding {
            return Err(format!("a convolution whose {}x{} kernel exceeds its padded input", s.kernel, s.kernel));
        }
        Ok(s)
    };
    let op = match w[0] {
        1 => Op::LinearForward { n: dims[0], k: dims[1], m: dims[2] },
        2 => Op::LinearInputGrad { n: dims[0], k: dims[1], m: dims[2] },
        3 => Op::LinearWeightGrad { n: dims[0], k: dims[1], m: dims[2] },
        4 => Op::ConvForward(conv()?),
        5 => Op::ConvInputGrad(conv()?),
        6 => Op::ConvWeightGrad(conv()?),
        k => return Err(format!("unknown op kind {k}")),
    };
    let sizes = [op.a_len(), op.b_len(), op.out_len()];
    let fits =
        [dims.iter().try_fold(1usize, |a, &d| a.checked_mul(d)).is_some(), sizes.iter().all(|&n| n <= MAX_VALUES)];
    if !fits.iter().all(|&f| f) {
        return Err(format!("{op:?} has tensors of more than {MAX_VALUES} values"));
    }
    op.check_shape()?;
    Ok(op)
}

fn words(payload: &[u8]) -> Result<Vec<u64>, String> {
    if !payload.len().is_multiple_of(8) {
        return Err(format!("{} bytes, not whole words", payload.len()));
    }
    Ok(payload.chunks_exact(8).map(|c| u64::from_le_bytes(c.try_into().expect("8 bytes"))).collect())
}

pub fn to_bytes(words: &[u64]) -> Vec<u8> {
    words.iter().flat_map(|w| w.to_le_bytes()).collect()
}

/// Splits `rest` into operands of `lens`, which must use it up exactly.
fn operands<'a>(rest: &'a [u64], lens: &[usize]) -> Result<Vec<&'a [u64]>, String> {
    let total: usize = lens.iter().sum();
    if rest.len() != total {
        return Err(format!("{} operand values, the op needs {total}", rest.len()));
    }
    let mut out = Vec::new();
    let mut at = 0;
    for &n in lens {
        out.push(&rest[at..at + n]);
        at += n;
    }
    Ok(out)
}

/// Serves one enclave on `link` as server `role`'s untrusted side until it says STOP. `log`
/// gets a line per event worth telling.
pub fn serve(role: usize, link: &mut dyn Channel, max_frame: usize, keep: Keep) -> Result<(), String> {
    let mut stored: VecDeque<(u64, Op, Vec<u64>)> = VecDeque::new();
    let mut requests = 0u64;
    let link_err = |e: ChannelError| format!("goten server {role}: the enclave's link: {e}");
    loop {
        let Frame { tag: t, payload } = link.recv_limited(max_frame).map_err(link_err)?;
        let result = (|| -> Result<Option<(u16, Vec<u64>)>, String> {
            let w = words(&payload)?;
            match t {
                tag::COMPUTE => {
                    let op = decode_op(&w)?;
                    let parts = operands(&w[OP_WORDS..], &operand_lens(role, &op))?;
                    let result = compute(role, &op, &parts);
                    requests += 1;
                    record(keep, role, requests, &op, &parts, &result)?;
                    Ok(Some((tag::RESULT, result)))
                }
                tag::PREPARE if role == 2 => {
                    let (id, op) = (*w.first().ok_or("an empty PREPARE")?, decode_op(w.get(1..).unwrap_or(&[]))?);
                    let parts = operands(&w[1 + OP_WORDS..], &operand_lens(2, &op))?;
                    let bytes: usize = stored.iter().map(|(_, _, z)| z.len() * 8).sum::<usize>() + op.out_len() * 8;
                    if stored.len() >= MAX_STORED || bytes > MAX_STORED_BYTES {
                        return Err(format!(
                            "more than {MAX_STORED} offline products or {} GiB waiting",
                            MAX_STORED_BYTES >> 30
                        ));
                    }
                    let z = compute(2, &op, &parts);
                    requests += 1;
                    record(keep, role, requests, &op, &parts, &z)?;
                    stored.push_back((id, op, z));
                    Ok(Some((tag::READY, Vec::new())))
                }
                tag::TAKE if role == 2 => {
                    let id = *w.first().ok_or("an empty TAKE")?;
                    // Products prepared for a schedule that did not come are dropped.
                    while let Some((got, _, z)) = stored.pop_front() {
                        if got == id {
                            return Ok(Some((tag::RESULT, z)));
                        }
                    }
                    Err(format!("no offline product {id} is stored"))
                }
                tag::STOP => Ok(None),
                other => Err(format!("message tag {other:#06x} is not for server {role}")),
            }
        })();
        match result {
            Ok(Some((t, values))) => link.send(t, &to_bytes(&values)).map_err(link_err)?,
            Ok(None) => return Ok(()),
            Err(e) => {
                let note = format!("goten server {role}: {e}");
                let _ = link.send(tag::FAILED, note.as_bytes());
                return Err(note);
            }
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn ops_round_trip_and_absurd_ones_are_refused() {
        let s = ConvShape {
            batch: 2,
            in_channels: 3,
            height: 8,
            width: 7,
            out_channels: 4,
            kernel: 3,
            stride: 2,
            padding: 0,
        };
        for op in [
            Op::LinearForward { n: 2, k: 3, m: 4 },
            Op::LinearInputGrad { n: 5, k: 1, m: 9 },
            Op::LinearWeightGrad { n: 7, k: 3, m: 2 },
            Op::ConvForward(s),
            Op::ConvInputGrad(ConvShape { padding: 1, ..s }),
            Op::ConvWeightGrad(s),
        ] {
            assert_eq!(decode_op(&encode_op(&op)).unwrap(), op);
        }
        for bad in [
            vec![9, 1, 1, 1, 0, 0, 0, 0, 0],
            vec![1, 0, 3, 4, 0, 0, 0, 0, 0],
            vec![1, 1 << 40, 3, 4, 0, 0, 0, 0, 0],
            vec![4, 1, 1, 2, 2, 1, 5, 1, 0],
            vec![1, 2, 3],
            vec![1, 1 << 20, 1 << 20, 1, 0, 0, 0, 0, 0],
        ] {
            assert!(decode_op(&bad).is_err(), "{bad:?}");
        }
    }
}
