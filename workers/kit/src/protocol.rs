//! The worker protocol, version [`VERSION`].
//!
//! The runner writes requests to the worker's stdin; the worker writes one reply per request to
//! its stdout, in order. Each message is a **frame**: one header line, then a binary payload.
//!
//! ```text
//! PCW1 {"type":"run", ..., "tensors":[{"name":"input","dtype":"f16","shape":[4,256],"bytes":2048}, ...]}\n
//! <the tensors' bytes, little-endian, in the order listed, with no separator>
//! ```
//!
//! - The header is `PCW1 ` followed by one JSON object on one line. Lines that do not start with
//!   `PCW1 ` are not protocol (a library printing to stdout): the reader skips them and keeps
//!   them with the worker's log, so stray output never desynchronises the stream.
//! - `tensors` (absent = none) lists the payload: each tensor's `name`, `dtype` (`f16`, `bf16`,
//!   `f32`, `f64`), `shape` and byte length. Values are exact: inputs are sent in the case
//!   dtype (they are representable in it), outputs in the narrowest of the case dtype, f32 and
//!   f64 that holds every value.
//! - Unknown JSON fields are ignored, so either side may add fields within a version.
//!
//! Requests (`type`):
//! - `hello` {`protocol`, `threads`}: first, once. `threads` is the worker's share of the cores
//!   for its library's intra-op pool (set before the first op).
//! - `probe` {`device`}: can this backend run on `cpu`, `cuda` or `cuda:N` here?
//! - `run` {`id`, `case`, `tensors`}: run one case on the given inputs (PEFT's state-dict names:
//!   `input`, `base_layer.weight`, `base_layer.bias`, `lora_A.weight`, `lora_B.weight` (an
//!   Embedding's `lora_embedding_A`, `lora_embedding_B`), `lora_magnitude_vector`,
//!   `grad_output`). `case` carries the axes (including `layer` and `profile`, since version 2)
//!   and the shape (with `kernel` and `image`). An Embedding's `input` (token ids) travels as f32.
//!
//! Replies (`type`):
//! - `hello` {`protocol`, `backend`, `libraries` (name -> version), `cuda`}: a worker whose
//!   `protocol` differs from the runner's is refused with both versions in the message.
//! - `probe` {`unavailable`}: `null` when the device can be used, else why not.
//! - `outputs` {`compute_ms`, `tensors`}: the case's outputs (names in `io::names`) and the
//!   time the backend spent on them.
//! - `refused` {`message`}: the library refused an operation (its message verbatim): the case is
//!   `unsupported`.
//! - `panicked` {`message`}: the backend code panicked; the worker stays usable: `crashed`.
//! - `error` {`message`}: the worker could not read the request (a bug on one side).
//!
//! End of stdin ends the worker. A worker that exits, is killed by a signal or stops answering
//! costs the case in flight (`crashed` with the status and the tail of its stderr, or `timeout`)
//! and is replaced for the next one.

use crate::case::{Case, DType, Device, Layer, Point, Shape};
use crate::io::{Inputs, Outputs};
use crate::tensor::HostTensor;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::io::{self, BufRead, Write};

/// Bumped on any change that an old peer would misread.
pub const VERSION: u32 = 2;

/// Every header line starts with this.
pub const MAGIC: &str = "PCW1 ";

/// One tensor of a frame's payload.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TensorHeader {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub bytes: usize,
}

/// A case as sent to a worker: the axes and the layer geometry.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WireCase {
    #[serde(flatten)]
    pub point: Point,
    pub shape_name: String,
    pub batch: usize,
    pub in_features: usize,
    pub out_features: usize,
    pub rank: usize,
    pub alpha: f64,
    pub bias: bool,
    pub rslora: bool,
    pub kernel: usize,
    pub image: usize,
}

impl WireCase {
    pub fn of(c: &Case) -> WireCase {
        let s = &c.shape;
        WireCase {
            point: c.point,
            shape_name: s.name.clone(),
            batch: s.batch,
            in_features: s.in_features,
            out_features: s.out_features,
            rank: s.rank,
            alpha: s.alpha,
            bias: s.bias,
            rslora: s.rslora,
            kernel: s.kernel,
            image: s.image,
        }
    }

    pub fn case(&self) -> Case {
        Case {
            point: self.point,
            shape: Shape {
                name: self.shape_name.clone(),
                batch: self.batch,
                in_features: self.in_features,
                out_features: self.out_features,
                rank: self.rank,
                alpha: self.alpha,
                bias: self.bias,
                rslora: self.rslora,
                kernel: self.kernel,
                image: self.image,
            },
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Request {
    Hello {
        protocol: u32,
        threads: usize,
    },
    Probe {
        device: Device,
    },
    Run {
        id: String,
        case: WireCase,
        #[serde(default)]
        tensors: Vec<TensorHeader>,
    },
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(tag = "type", rename_all = "snake_case")]
pub enum Reply {
    Hello {
        protocol: u32,
        backend: String,
        #[serde(default)]
        libraries: BTreeMap<String, String>,
        #[serde(default)]
        cuda: Option<String>,
    },
    Probe {
        unavailable: Option<String>,
    },
    Outputs {
        compute_ms: f64,
        #[serde(default)]
        tensors: Vec<TensorHeader>,
    },
    Refused {
        message: String,
    },
    Panicked {
        message: String,
    },
    Error {
        message: String,
    },
}

/// A tensor ready to be framed: header plus bytes.
pub struct Encoded {
    pub header: TensorHeader,
    pub data: Vec<u8>,
}

/// Encode `t` in `dtype` (exact when its values are representable there).
pub fn encode(name: &str, t: &HostTensor, dtype: DType) -> Encoded {
    let data = t.to_le_bytes(dtype);
    Encoded {
        header: TensorHeader {
            name: name.to_string(),
            dtype,
            shape: t.shape.clone(),
            bytes: data.len(),
        },
        data,
    }
}

/// The narrowest of `preferred`, f32 and f64 that holds every value of `t` exactly, so that an
/// output travels at its own size (an fp16 merged weight as 2 bytes per value) and loses nothing.
pub fn lossless_dtype(t: &HostTensor, preferred: DType) -> DType {
    let exact = |d: DType| t.data.iter().all(|&v| v.is_nan() || d.round(v) == v);
    [preferred, DType::F32]
        .into_iter()
        .find(|&d| exact(d))
        .unwrap_or(DType::F64)
}

/// Read a tensor back from its bytes.
pub fn decode(h: &TensorHeader, bytes: &[u8]) -> io::Result<HostTensor> {
    let n: usize = h.shape.iter().product();
    if bytes.len() != n * h.dtype.size() {
        return Err(bad(format!(
            "tensor `{}`: {} bytes for {n} {} values",
            h.name,
            bytes.len(),
            h.dtype
        )));
    }
    Ok(HostTensor::from_le_bytes(h.shape.clone(), h.dtype, bytes))
}

fn bad(msg: String) -> io::Error {
    io::Error::new(io::ErrorKind::InvalidData, msg)
}

/// Write one frame: the header with its tensor list, then the tensors' bytes.
pub fn write_frame<M: Serialize>(
    w: &mut impl Write,
    msg: &M,
    payload: &[Encoded],
) -> io::Result<()> {
    let line = serde_json::to_string(msg).map_err(|e| bad(e.to_string()))?;
    w.write_all(MAGIC.as_bytes())?;
    w.write_all(line.as_bytes())?;
    w.write_all(b"\n")?;
    for e in payload {
        w.write_all(&e.data)?;
    }
    w.flush()
}

/// One frame read back: the message, its tensor headers' payload, and any stray lines that came
/// before it.
pub struct Frame<M> {
    pub message: M,
    pub payload: Vec<u8>,
    pub stray: Vec<String>,
}

/// Read the next frame; `Ok(None)` at end of stream. `tensors` tells how long the payload is.
pub fn read_frame<M: for<'de> Deserialize<'de>>(
    r: &mut impl BufRead,
    tensors: impl Fn(&M) -> usize,
) -> io::Result<Option<Frame<M>>> {
    let mut stray = Vec::new();
    loop {
        let mut line = Vec::new();
        if r.read_until(b'\n', &mut line)? == 0 {
            return if stray.is_empty() {
                Ok(None)
            } else {
                Err(bad(format!(
                    "the stream ended after non-protocol output: {}",
                    stray.join(" | ")
                )))
            };
        }
        let text = String::from_utf8_lossy(&line);
        let Some(json) = text.strip_prefix(MAGIC) else {
            stray.push(text.trim_end().to_string());
            continue;
        };
        let message: M = serde_json::from_str(json.trim_end())
            .map_err(|e| bad(format!("unreadable header ({e}): {}", json.trim_end())))?;
        let mut payload = vec![0u8; tensors(&message)];
        r.read_exact(&mut payload)?;
        return Ok(Some(Frame {
            message,
            payload,
            stray,
        }));
    }
}

/// Payload length of a request.
pub fn request_bytes(r: &Request) -> usize {
    match r {
        Request::Run { tensors, .. } => tensors.iter().map(|t| t.bytes).sum(),
        Request::Hello { .. } | Request::Probe { .. } => 0,
    }
}

/// Payload length of a reply.
pub fn reply_bytes(r: &Reply) -> usize {
    match r {
        Reply::Outputs { tensors, .. } => tensors.iter().map(|t| t.bytes).sum(),
        Reply::Hello { .. }
        | Reply::Probe { .. }
        | Reply::Refused { .. }
        | Reply::Panicked { .. }
        | Reply::Error { .. } => 0,
    }
}

/// Split a payload into tensors, in header order.
pub fn split_payload(headers: &[TensorHeader], payload: &[u8]) -> io::Result<Vec<HostTensor>> {
    let mut at = 0;
    headers
        .iter()
        .map(|h| {
            let end = at + h.bytes;
            let bytes = payload
                .get(at..end)
                .ok_or_else(|| bad(format!("payload too short for `{}`", h.name)))?;
            at = end;
            decode(h, bytes)
        })
        .collect()
}

/// The `run` request for a case: its inputs in the case dtype.
pub fn run_request(id: &str, case: &Case, inputs: &Inputs) -> (Request, Vec<Encoded>) {
    let payload: Vec<Encoded> = inputs
        .named()
        .into_iter()
        .map(|(n, t)| {
            // Token ids travel as f32 (exact up to 2^24); bf16 holds integers only up to 256.
            let dtype = if n == "input" && case.point.layer == Layer::Embedding {
                DType::F32
            } else {
                case.point.dtype
            };
            encode(n, t, dtype)
        })
        .collect();
    let req = Request::Run {
        id: id.to_string(),
        case: WireCase::of(case),
        tensors: payload.iter().map(|e| e.header.clone()).collect(),
    };
    (req, payload)
}

/// Rebuild a case's inputs from a `run` request's tensors.
pub fn inputs_from(case: &Case, headers: &[TensorHeader], payload: &[u8]) -> io::Result<Inputs> {
    let tensors = split_payload(headers, payload)?;
    let mut named: BTreeMap<&str, HostTensor> = headers
        .iter()
        .map(|h| h.name.as_str())
        .zip(tensors)
        .collect();
    let mut take = |n: &str| {
        named
            .remove(n)
            .ok_or_else(|| bad(format!("the run request has no tensor `{n}`")))
    };
    let embedding = case.point.layer == Layer::Embedding;
    Ok(Inputs {
        layer: case.point.layer,
        x: take("input")?,
        weight: take("base_layer.weight")?,
        lora_a: take(if embedding {
            "lora_embedding_A"
        } else {
            "lora_A.weight"
        })?,
        lora_b: take(if embedding {
            "lora_embedding_B"
        } else {
            "lora_B.weight"
        })?,
        grad_output: take("grad_output")?,
        bias: take("base_layer.bias").ok(),
        magnitude: take("lora_magnitude_vector").ok(),
        scaling: case.shape.scaling(),
    })
}

/// The `outputs` reply for a backend's outputs.
pub fn outputs_reply(case: &Case, outputs: &Outputs, compute_ms: f64) -> (Reply, Vec<Encoded>) {
    let payload: Vec<Encoded> = outputs
        .iter()
        .map(|(n, t)| encode(n, t, lossless_dtype(t, case.point.dtype)))
        .collect();
    let reply = Reply::Outputs {
        compute_ms,
        tensors: payload.iter().map(|e| e.header.clone()).collect(),
    };
    (reply, payload)
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn frames_round_trip_and_stray_lines_are_skipped() {
        let t = HostTensor::new(vec![2, 2], vec![1.0, -0.5, 65504.0, f64::NAN]);
        let enc = encode("x", &t, DType::F16);
        let reply = Reply::Outputs {
            compute_ms: 1.5,
            tensors: vec![enc.header.clone()],
        };
        let mut buf = b"some library printed this\n".to_vec();
        write_frame(&mut buf, &reply, &[enc]).unwrap();
        let mut r = io::BufReader::new(&buf[..]);
        let f = read_frame::<Reply>(&mut r, reply_bytes).unwrap().unwrap();
        assert_eq!(f.stray, vec!["some library printed this".to_string()]);
        let Reply::Outputs { tensors, .. } = &f.message else {
            panic!()
        };
        let back = split_payload(tensors, &f.payload).unwrap();
        assert_eq!(back[0].data[..3], t.data[..3]);
        assert!(back[0].data[3].is_nan());
        assert!(read_frame::<Reply>(&mut r, reply_bytes).unwrap().is_none());
    }

    #[test]
    fn outputs_travel_in_the_narrowest_exact_dtype() {
        let h = HostTensor::new(vec![2], vec![0.5, 3.0]);
        assert_eq!(lossless_dtype(&h, DType::F16), DType::F16);
        let f = HostTensor::new(vec![1], vec![1.0 + 2f64.powi(-20)]);
        assert_eq!(lossless_dtype(&f, DType::F16), DType::F32);
        let d = HostTensor::new(vec![1], vec![0.1]);
        assert_eq!(lossless_dtype(&d, DType::F16), DType::F64);
    }

    /// The `case` of a run request, key by key: the wire format both sides (and any second
    /// implementation of the protocol) read.
    #[test]
    fn a_wire_case_has_one_key_per_axis_then_the_geometry() {
        use crate::case::*;
        let case = Case {
            point: Point {
                backend: Backend::Tch212,
                device: Device::Cuda(1),
                dtype: DType::Bf16,
                adapter: Adapter::PissaDora,
                op: Op::InitNoop,
                precision: Precision::Autocast,
                layer: Layer::Conv2d,
                profile: Profile::ZeroRows,
            },
            shape: Shape {
                name: "s".into(),
                batch: 2,
                in_features: 8,
                out_features: 4,
                rank: 2,
                alpha: 0.1,
                bias: true,
                rslora: false,
                kernel: 3,
                image: 5,
            },
        };
        let json = serde_json::to_string(&WireCase::of(&case)).unwrap();
        assert_eq!(
            json,
            r#"{"backend":"tch@2.1.2","device":"cuda:1","dtype":"bf16","adapter":"pissa_dora","op":"init_noop","precision":"autocast","layer":"conv2d","profile":"zero_rows","shape_name":"s","batch":2,"in_features":8,"out_features":4,"rank":2,"alpha":0.1,"bias":true,"rslora":false,"kernel":3,"image":5}"#
        );
        let back: WireCase = serde_json::from_str(&json).unwrap();
        assert_eq!(back.case(), case);
    }
}
