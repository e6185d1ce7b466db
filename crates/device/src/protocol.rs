//! The device wire protocol, carried in `trustsplit_boundary` frames (which add magic, version,
//! tag and length, and enforce the frame-size limit).
//!
//! Conversation (client = trusted side, server = device):
//!
//! ```text
//! client -> HELLO      postcard Hello { protocol, max_frame_bytes }
//! server -> HELLO_OK   postcard HelloOk { protocol, backend, max_frame_bytes }   (or ERROR, then close)
//! then, repeatedly:
//! client -> GEMM | CONV_FORWARD | CONV_BACKWARD_DATA | CONV_BACKWARD_WEIGHT
//!           payload = postcard header (shape + operand byte lengths) ++ operand a ++ operand b
//! server -> RESULT     payload = the result as little-endian f32
//!        or ERROR      payload = UTF-8 message
//! client -> SHUTDOWN   (empty; the server ends this connection without replying)
//! ```
//!
//! Both sides use the smaller of the two `max_frame_bytes`. The server validates every request
//! (geometry, exact operand lengths, checked size arithmetic, limits) before computing. A
//! malformed request inside an intact frame (garbage header, wrong lengths, unknown tag) gets an
//! ERROR reply and the server keeps serving: the frame boundary is intact, so later requests are
//! unaffected. Broken framing, a failed handshake or a backend panic close the connection.

use crate::op::{GemmShape, Op};
use serde::{Deserialize, Serialize};
use trustsplit_kernels::ConvGeometry;

pub const HELLO: u16 = 0x0200;
pub const HELLO_OK: u16 = 0x0201;
pub const GEMM: u16 = 0x0210;
pub const CONV_FORWARD: u16 = 0x0211;
pub const CONV_BACKWARD_DATA: u16 = 0x0212;
pub const CONV_BACKWARD_WEIGHT: u16 = 0x0213;
pub const RESULT: u16 = 0x0220;
pub const SHUTDOWN: u16 = 0x0230;
pub const ERROR: u16 = 0x02FF;

/// Version of this message set (the frame version is the boundary crate's).
/// The most a reply that carries no result may be: `HelloOk`, an error message.
pub const SMALL_REPLY_BYTES: usize = 4096;
pub const DEVICE_PROTOCOL: u32 = 1;

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct Hello {
    pub protocol: u32,
    /// Largest frame payload the client accepts.
    pub max_frame_bytes: u64,
}

#[derive(Clone, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct HelloOk {
    pub protocol: u32,
    /// The backend's name, e.g. `cpu (8 threads)`.
    pub backend: String,
    /// Largest frame payload the server accepts.
    pub max_frame_bytes: u64,
}

/// Convolution geometry on the wire (the kernels' type is not `Serialize`); fixed-width fields
/// so 32- and 64-bit peers agree.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct WireGeometry {
    pub batch: u64,
    pub in_channels: u64,
    pub out_channels: u64,
    pub in_h: u64,
    pub in_w: u64,
    pub kernel_h: u64,
    pub kernel_w: u64,
    pub stride: u64,
    pub padding: u64,
}

impl From<&ConvGeometry> for WireGeometry {
    fn from(g: &ConvGeometry) -> Self {
        WireGeometry {
            batch: g.batch as u64,
            in_channels: g.in_channels as u64,
            out_channels: g.out_channels as u64,
            in_h: g.in_h as u64,
            in_w: g.in_w as u64,
            kernel_h: g.kernel_h as u64,
            kernel_w: g.kernel_w as u64,
            stride: g.stride as u64,
            padding: g.padding as u64,
        }
    }
}

impl TryFrom<&WireGeometry> for ConvGeometry {
    type Error = String;
    fn try_from(w: &WireGeometry) -> Result<Self, String> {
        let u = |v: u64, name: &str| usize::try_from(v).map_err(|_| format!("geometry field {name}={v} is too large"));
        Ok(ConvGeometry {
            batch: u(w.batch, "batch")?,
            in_channels: u(w.in_channels, "in_channels")?,
            out_channels: u(w.out_channels, "out_channels")?,
            in_h: u(w.in_h, "in_h")?,
            in_w: u(w.in_w, "in_w")?,
            kernel_h: u(w.kernel_h, "kernel_h")?,
            kernel_w: u(w.kernel_w, "kernel_w")?,
            stride: u(w.stride, "stride")?,
            padding: u(w.padding, "padding")?,
        })
    }
}

/// Header of a GEMM request.
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct GemmHeader {
    pub shape: GemmShape,
    pub a_bytes: u64,
    pub b_bytes: u64,
}

/// Header of a convolution request (the tag says which pass).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Serialize, Deserialize)]
pub struct ConvHeader {
    pub geometry: WireGeometry,
    pub a_bytes: u64,
    pub b_bytes: u64,
}

/// The message tag of an operation.
pub fn tag_of(op: &Op) -> u16 {
    match op {
        Op::Gemm(_) => GEMM,
        Op::ConvForward(_) => CONV_FORWARD,
        Op::ConvBackwardData(_) => CONV_BACKWARD_DATA,
        Op::ConvBackwardWeight(_) => CONV_BACKWARD_WEIGHT,
    }
}

/// A readable name for a tag, for error messages.
pub fn tag_name(tag: u16) -> String {
    let name = match tag {
        HELLO => "Hello",
        HELLO_OK => "HelloOk",
        GEMM => "Gemm",
        CONV_FORWARD => "ConvForward",
        CONV_BACKWARD_DATA => "ConvBackwardData",
        CONV_BACKWARD_WEIGHT => "ConvBackwardWeight",
        RESULT => "Result",
        SHUTDOWN => "Shutdown",
        ERROR => "Error",
        _ => return format!("unknown tag 0x{tag:04x}"),
    };
    format!("{name} (0x{tag:04x})")
}

/// Appends `values` as little-endian f32 bytes.
pub fn put_f32s(out: &mut Vec<u8>, values: &[f32]) {
    trustsplit_kernels::le_bytes::put_f32s(out, values);
}

/// `values` as little-endian f32 bytes.
pub fn f32_bytes(values: &[f32]) -> Vec<u8> {
    let mut out = Vec::new();
    put_f32s(&mut out, values);
    out
}

/// Reads little-endian f32s; the length must be a multiple of 4.
pub fn read_f32s(bytes: &[u8]) -> Result<Vec<f32>, String> {
    trustsplit_kernels::le_bytes::f32s(bytes)
        .ok_or_else(|| format!("{} bytes is not a whole number of f32 values", bytes.len()))
}

/// Encodes a request: `(tag, payload)`. Operand lengths are taken as given (the client validates
/// them first; tests use this to send deliberately wrong ones).
pub fn encode_request(op: &Op, a: &[f32], b: &[f32]) -> (u16, Vec<u8>) {
    let (a_bytes, b_bytes) = ((a.len() * 4) as u64, (b.len() * 4) as u64);
    let header = match op {
        Op::Gemm(shape) => postcard::to_stdvec(&GemmHeader { shape: *shape, a_bytes, b_bytes }),
        Op::ConvForward(g) | Op::ConvBackwardData(g) | Op::ConvBackwardWeight(g) => {
            postcard::to_stdvec(&ConvHeader { geometry: g.into(), a_bytes, b_bytes })
        }
    }
    .expect("postcard encodes plain structs into a Vec");
    let mut payload = header;
    put_f32s(&mut payload, a);
    put_f32s(&mut payload, b);
    (tag_of(op), payload)
}

/// Decodes and validates a request: the header parses, the shape is valid, the operand byte
/// lengths match the shape exactly and account for the whole payload, and nothing exceeds
/// `max_bytes`. Never panics; the error says what is wrong.
pub fn decode_request(tag: u16, payload: &[u8], max_bytes: usize) -> Result<(Op, Vec<f32>, Vec<f32>), String> {
    let bad_header = |e: postcard::Error| format!("{}: malformed request header: {e}", tag_name(tag));
    let (op, a_bytes, b_bytes, rest) = match tag {
        GEMM => {
            let (h, rest) = postcard::take_from_bytes::<GemmHeader>(payload).map_err(bad_header)?;
            (Op::Gemm(h.shape), h.a_bytes, h.b_bytes, rest)
        }
        CONV_FORWARD | CONV_BACKWARD_DATA | CONV_BACKWARD_WEIGHT => {
            let (h, rest) = postcard::take_from_bytes::<ConvHeader>(payload).map_err(bad_header)?;
            let g = ConvGeometry::try_from(&h.geometry)?;
            let op = match tag {
                CONV_FORWARD => Op::ConvForward(g),
                CONV_BACKWARD_DATA => Op::ConvBackwardData(g),
                _ => Op::ConvBackwardWeight(g),
            };
            (op, h.a_bytes, h.b_bytes, rest)
        }
        _ => return Err(format!("{} is not a request", tag_name(tag))),
    };
    let sizes = op.sizes().map_err(|e| format!("{op}: {e}"))?;
    op.check_limit(&sizes, max_bytes)?;
    op.check_result_size(&sizes)?;
    let declared = a_bytes.checked_add(b_bytes).ok_or_else(|| format!("{op}: operand byte lengths overflow"))?;
    if declared != rest.len() as u64 {
        return Err(format!(
            "{op}: truncated or padded payload: the header declares {declared} operand bytes, {} follow",
            rest.len()
        ));
    }
    let [na, nb, _] = op.operand_names();
    for (name, bytes, elems) in [(na, a_bytes, sizes.a), (nb, b_bytes, sizes.b)] {
        // `elems * 4` fits: check_limit bounded it by max_bytes.
        if bytes != (elems * 4) as u64 {
            return Err(format!("{op}: operand {name} has {bytes} bytes, the shape needs {} ({elems} f32)", elems * 4));
        }
    }
    let (a, b) = rest.split_at(a_bytes as usize);
    Ok((op, read_f32s(a)?, read_f32s(b)?))
}
