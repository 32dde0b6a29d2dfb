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
//!   `f32`, `f64`, and `f8e4m3`, `f8e5m2` one byte a value), `shape` and byte length. Values are exact: inputs are sent in the case
//!   dtype (they are representable in it), outputs in the narrowest of the case dtype, f32 and
//!   f64 that holds every value.
//! - Unknown JSON fields are ignored, so either side may add fields within a version.
//! - A request's tensor may name a `file` instead of travelling in the payload: its bytes are
//!   then the first `bytes` of that file (a memfd of the runner's, `/proc/<pid>/fd/<n>`, which
//!   the worker maps and reads in place). The runner does this only for workers whose hello says
//!   `files: true`, and only for large tensors: an LLM-sized weight is written once per dtype
//!   instead of once per case through the pipe. Likewise a reply's large tensor may name a
//!   memfd of the worker's, when the runner's hello said `files: true`; the worker keeps it open
//!   until it reads the next request (by then the runner has read the reply).
//!
//! Requests (`type`):
//! - `hello` {`protocol`, `threads`, `files` (absent = no files)}: first, once. `files` names
//!   a memfd of the runner's holding [`FILES_PROBE`]: a worker that reads it there answers
//!   `files: true`, and both sides may then use files (where one cannot open the other's
//!   descriptors under /proc, everything stays in the pipe). `threads` is the worker's share of the cores
//!   for its library's intra-op pool (set before the first op).
//! - `probe` {`device`}: can this backend run on `cpu`, `cuda` or `cuda:N` here?
//! - `run` {`id`, `case`, `tensors`}: run one case on the given inputs (PEFT's state-dict names:
//!   `input`, `base_layer.weight`, `base_layer.bias`, `lora_A.weight`, `lora_B.weight` (an
//!   Embedding's `lora_embedding_A`, `lora_embedding_B`), `lora_magnitude_vector`,
//!   `grad_output`, with `lora_bias` also `lora_B.bias`). `case` carries the axes (including
//!   `layer` and `profile`, since version 2) and the shape (with `kernel` and `image`, and the
//!   options `lora_bias`, `groups`, `base` and `lr`, absent = their defaults). An Embedding's `input` (token ids) travels as f32.
//!
//! Replies (`type`):
//! - `hello` {`protocol`, `backend`, `libraries` (name -> version), `cuda`, `files` (whether
//!   it reads tensors from files; absent = no)}: a worker whose
//!   `protocol` differs from the runner's is refused with both versions in the message.
//! - `probe` {`unavailable`}: `null` when the device can be used, else why not.
//! - `outputs` {`compute_ms`, `tensors`}: the case's outputs (names in `io::names`) and the
//!   time the backend spent on them.
//! - `refused` {`message`}: the library refused an operation (its message verbatim): the case is
//!   `unsupported`.
//! - `panicked` {`message`}: the backend code panicked (the Python worker: an exception raised in
//!   its own code); the worker stays usable: `crashed`.
//! - `not_applicable` {`message`} (since version 3): the build cannot express the case (a PEFT
//!   release without DoRA, without PiSSA, without the autocast option): the case is skipped with
//!   the message, never a pass.
//! - `error` {`message`}: the worker could not read the request (a bug on one side).
//!
//! Two implementations speak it: the Rust workers (`serve.rs`) and the PEFT worker
//! (`workers/peft/worker.py`); tests/conformance.rs drives both with the same requests. For that
//! test both honour `PEFT_COMPAT_WORKER_TEST`: `stray` writes a non-protocol line before every
//! reply, `panic` fails every run in the worker's own code, `abort` aborts the process on a run.
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
use std::sync::Arc;

/// Bumped on any change that an old peer would misread.
pub const VERSION: u32 = 3;

/// Every header line starts with this.
pub const MAGIC: &str = "PCW1 ";

/// One tensor of a frame's payload.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct TensorHeader {
    pub name: String,
    pub dtype: DType,
    pub shape: Vec<usize>,
    pub bytes: usize,
    /// Where the bytes are when they are not in the payload (requests only, see above).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub file: Option<String>,
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
    /// The shape options added after the first protocol (absent: their defaults).
    #[serde(default)]
    pub lora_bias: bool,
    #[serde(default = "one")]
    pub groups: usize,
    #[serde(default)]
    pub base: crate::case::Base,
    #[serde(default = "step_lr")]
    pub lr: f64,
}

fn one() -> usize {
    1
}

fn step_lr() -> f64 {
    crate::case::STEP_LR
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
            lora_bias: s.lora_bias,
            groups: s.groups,
            base: s.base,
            lr: s.lr,
        }
    }

    pub fn case(&self) -> Case {
        Case {
            point: self.point,
            shape: Shape {
                bias: self.bias,
                rslora: self.rslora,
                kernel: self.kernel,
                image: self.image,
                lora_bias: self.lora_bias,
                groups: self.groups,
                base: self.base,
                lr: self.lr,
                ..Shape::new(
                    self.shape_name.clone(),
                    self.batch,
                    self.in_features,
                    self.out_features,
                    self.rank,
                    self.alpha,
                )
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
        #[serde(default, skip_serializing_if = "Option::is_none")]
        files: Option<String>,
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
        #[serde(default)]
        files: bool,
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
    NotApplicable {
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
            file: None,
        },
        data,
    }
}

/// The narrowest of `preferred`, f32 and f64 that holds every value of `t` exactly, so that an
/// output travels at its own size (an fp16 merged weight as 2 bytes per value) and loses nothing.
pub fn lossless_dtype(t: &HostTensor, preferred: DType) -> DType {
    let exact = |d: DType| {
        let n = t.data.len();
        crate::parallel::map_ranges(n, 1 << 16, n, crate::parallel::threads(), |_, r| {
            t.data[r].iter().all(|&v| v.is_nan() || d.round(v) == v)
        })
        .into_iter()
        .all(|e| e)
    };
    [preferred, DType::F32]
        .into_iter()
        .find(|&d| exact(d))
        .unwrap_or(DType::F64)
}

/// Read a tensor back from its bytes.
pub fn decode(h: &TensorHeader, bytes: &[u8]) -> io::Result<HostTensor> {
    let n = h.shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
    let Some(n) = n.filter(|n| n.checked_mul(h.dtype.size()) == Some(bytes.len())) else {
        return Err(bad(format!(
            "tensor `{}`: {} bytes for shape {:?} of {}",
            h.name,
            bytes.len(),
            h.shape,
            h.dtype
        )));
    };
    debug_assert_eq!(n * h.dtype.size(), bytes.len());
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

/// The longest header line read (a header lists a few tensors: a few KiB at most).
pub const MAX_HEADER: usize = 1 << 20;
/// How much stray (non-protocol) output is kept per frame: a library printing a banner fits, a
/// worker flooding stdout does not grow the reader.
pub const MAX_STRAY: usize = 16 << 10;

/// Read one line into `line`, keeping at most `keep` bytes of it (the rest is read and dropped,
/// so a line without an end never fills memory); returns the bytes read (0 at end of stream) and
/// whether the line was cut.
fn read_line_bounded(
    r: &mut impl BufRead,
    line: &mut Vec<u8>,
    keep: usize,
) -> io::Result<(usize, bool)> {
    let mut read = 0;
    let mut cut = false;
    loop {
        let buf = match r.fill_buf() {
            Ok(b) => b,
            Err(e) if e.kind() == io::ErrorKind::Interrupted => continue,
            Err(e) => return Err(e),
        };
        if buf.is_empty() {
            return Ok((read, cut));
        }
        let (chunk, done) = match buf.iter().position(|&b| b == b'\n') {
            Some(i) => (&buf[..=i], true),
            None => (buf, false),
        };
        let room = keep.saturating_sub(line.len());
        line.extend_from_slice(&chunk[..chunk.len().min(room)]);
        cut |= chunk.len() > room;
        let n = chunk.len();
        r.consume(n);
        read += n;
        if done {
            return Ok((read, cut));
        }
    }
}

/// Read the next frame; `Ok(None)` at end of stream. `tensors` tells how long the payload is;
/// `max_payload` (asked once the header is read, so it may follow the request in flight) is the
/// most a frame may carry: a header that claims more is an error quoting it, never an
/// allocation. Header lines are at most [`MAX_HEADER`] bytes; stray lines are kept up to
/// [`MAX_STRAY`] bytes in all, the rest counted.
pub fn read_frame<M: for<'de> Deserialize<'de>>(
    r: &mut impl BufRead,
    tensors: impl Fn(&M) -> Option<usize>,
    max_payload: impl Fn() -> usize,
) -> io::Result<Option<Frame<M>>> {
    let mut stray = Vec::new();
    let mut kept = 0usize;
    let mut dropped = 0usize;
    let summary = |stray: &[String], dropped: usize| {
        let mut s = stray.join(" | ");
        if dropped > 0 {
            s.push_str(&format!(" (and {dropped} more bytes)"));
        }
        s
    };
    loop {
        let mut line = Vec::new();
        let (n, cut) = read_line_bounded(r, &mut line, MAX_HEADER)?;
        if n == 0 {
            return if stray.is_empty() && dropped == 0 {
                Ok(None)
            } else {
                Err(bad(format!(
                    "the stream ended after non-protocol output: {}",
                    summary(&stray, dropped)
                )))
            };
        }
        let Some(json) = line.strip_prefix(MAGIC.as_bytes()) else {
            let text = String::from_utf8_lossy(&line);
            let text = text.trim_end();
            let room = MAX_STRAY.saturating_sub(kept);
            if room >= text.len() && !cut {
                kept += text.len();
                stray.push(text.to_string());
            } else {
                dropped += n;
            }
            continue;
        };
        let json = String::from_utf8_lossy(json);
        let json = json.trim_end();
        if cut {
            return Err(bad(format!(
                "a header line longer than {MAX_HEADER} bytes: {}...",
                quote(json)
            )));
        }
        let message: M = serde_json::from_str(json)
            .map_err(|e| bad(format!("unreadable header ({e}): {}", quote(json))))?;
        let limit = max_payload();
        let len = match tensors(&message) {
            Some(len) if len <= limit => len,
            claimed => {
                return Err(bad(format!(
                    "a frame claims {} payload bytes, more than the {limit} this request can \
                     need: {}",
                    claimed.map_or("more than 2^64".to_string(), |c| c.to_string()),
                    quote(json)
                )))
            }
        };
        let mut payload = vec![0u8; len];
        r.read_exact(&mut payload)?;
        return Ok(Some(Frame {
            message,
            payload,
            stray,
        }));
    }
}

/// A header as quoted in an error: its first 300 characters.
fn quote(json: &str) -> String {
    match json.char_indices().nth(300) {
        Some((i, _)) => format!("{}...", &json[..i]),
        None => json.to_string(),
    }
}

/// The sum of a frame's tensor lengths, or `None` when it does not fit in a `usize`.
fn payload_len(tensors: &[TensorHeader]) -> Option<usize> {
    tensors
        .iter()
        .filter(|t| t.file.is_none())
        .try_fold(0usize, |a, t| a.checked_add(t.bytes))
}

/// Payload length of a request.
pub fn request_bytes(r: &Request) -> Option<usize> {
    match r {
        Request::Run { tensors, .. } => payload_len(tensors),
        Request::Hello { .. } | Request::Probe { .. } => Some(0),
    }
}

/// Payload length of a reply.
pub fn reply_bytes(r: &Reply) -> Option<usize> {
    match r {
        Reply::Outputs { tensors, .. } => payload_len(tensors),
        Reply::Hello { .. }
        | Reply::Probe { .. }
        | Reply::Refused { .. }
        | Reply::Panicked { .. }
        | Reply::NotApplicable { .. }
        | Reply::Error { .. } => Some(0),
    }
}

/// Split a payload into tensors, in header order.
pub fn split_payload(headers: &[TensorHeader], payload: &[u8]) -> io::Result<Vec<HostTensor>> {
    let mut at = 0usize;
    headers
        .iter()
        .map(|h| {
            if h.file.is_some() {
                return decode_file(h);
            }
            let end = at.saturating_add(h.bytes);
            let bytes = payload
                .get(at..end)
                .ok_or_else(|| bad(format!("payload too short for `{}`", h.name)))?;
            at = end;
            decode(h, bytes)
        })
        .collect()
}

/// A weight read from a request's file, kept for the next request that names the same file:
/// the runner writes one file per rounded weight and sends every case of that weight with
/// it, so a worker decodes it once per dtype, not once per case. The file is known by its
/// inode (a memfd's is not reused while the runner holds it) with the header's dtype and shape.
fn weight_from_file(h: &TensorHeader) -> io::Result<Arc<HostTensor>> {
    use std::os::unix::fs::MetadataExt;
    type Key = (u64, u64, usize, DType, Vec<usize>);
    static LAST: std::sync::Mutex<Option<(Key, Arc<HostTensor>)>> = std::sync::Mutex::new(None);
    let path = h.file.as_deref().unwrap_or_default();
    let meta = std::fs::metadata(path)
        .map_err(|e| bad(format!("tensor `{}`: cannot open {path}: {e}", h.name)))?;
    let key = (meta.dev(), meta.ino(), h.bytes, h.dtype, h.shape.clone());
    let mut last = LAST.lock().unwrap_or_else(|p| p.into_inner());
    if let Some((k, t)) = last.as_ref() {
        if *k == key {
            return Ok(Arc::clone(t));
        }
    }
    // Drop the old weight before reading the new one: at most one is held.
    *last = None;
    let t = Arc::new(decode_file(h)?);
    *last = Some((key, Arc::clone(&t)));
    Ok(t)
}

/// A tensor in a file (a message's `file`), checked against its header on opening and read
/// with positioned reads, a chunk at a time: the reader never holds the file's bytes (a
/// mapping would count them in its memory too), and need not hold the tensor whole either.
#[derive(Debug)]
pub struct TensorFile {
    pub header: TensorHeader,
    file: std::fs::File,
    path: String,
}

impl TensorFile {
    /// Open `h`'s file; an error says which tensor and why.
    pub fn open(h: &TensorHeader) -> io::Result<TensorFile> {
        let path = h.file.clone().unwrap_or_default();
        let file = std::fs::File::open(&path)
            .map_err(|e| bad(format!("tensor `{}`: cannot open {path}: {e}", h.name)))?;
        let len = file.metadata()?.len();
        if len < h.bytes as u64 {
            return Err(bad(format!(
                "tensor `{}`: {path} holds {len} bytes, the header says {}",
                h.name, h.bytes
            )));
        }
        let n = h.shape.iter().try_fold(1usize, |a, &d| a.checked_mul(d));
        if n.and_then(|n| n.checked_mul(h.dtype.size())) != Some(h.bytes) {
            return Err(bad(format!(
                "tensor `{}`: {} bytes for shape {:?} of {}",
                h.name, h.bytes, h.shape, h.dtype
            )));
        }
        Ok(TensorFile {
            header: h.clone(),
            file,
            path,
        })
    }

    /// How many values it holds.
    pub fn len(&self) -> usize {
        self.header.bytes / self.header.dtype.size()
    }

    /// Whether it holds none.
    pub fn is_empty(&self) -> bool {
        self.len() == 0
    }

    /// Values `start..start + out.len()` into `out`.
    pub fn read(&self, start: usize, out: &mut [f64]) -> io::Result<()> {
        let (dtype, offset) = (self.header.dtype, (start * self.header.dtype.size()) as u64);
        crate::tensor::read_values(&self.file, offset, dtype, out).map_err(|e| self.error(e))
    }

    /// The whole tensor, read in parallel chunks.
    pub fn decode(&self) -> io::Result<HostTensor> {
        let h = &self.header;
        crate::tensor::read_tensor(&self.file, 0, h.dtype, h.shape.clone())
            .map_err(|e| self.error(e))
    }

    fn error(&self, e: io::Error) -> io::Error {
        bad(format!(
            "tensor `{}`: cannot read {}: {e}",
            self.header.name, self.path
        ))
    }
}

/// A tensor's values from its `file`.
fn decode_file(h: &TensorHeader) -> io::Result<HostTensor> {
    TensorFile::open(h)?.decode()
}

/// The `run` request for a case: its inputs in the case dtype. `file(name, tensor, dtype)`
/// may name a file that already holds a tensor's bytes in that dtype (see the module doc);
/// the tensor then stays out of the payload.
pub fn run_request(
    id: &str,
    case: &Case,
    inputs: &Inputs,
    file: impl Fn(&str, &HostTensor, DType) -> Option<String>,
) -> (Request, Vec<Encoded>) {
    let mut headers = Vec::new();
    let mut payload = Vec::new();
    for (n, t) in inputs.named() {
        // Token ids travel as f32 (exact up to 2^24); bf16 holds integers only up to 256.
        let dtype = if n == "input" && case.point.layer == Layer::Embedding {
            DType::F32
        } else {
            case.point.dtype
        };
        match file(n, t, dtype) {
            Some(path) => headers.push(TensorHeader {
                name: n.to_string(),
                dtype,
                shape: t.shape.clone(),
                bytes: t.data.len() * dtype.size(),
                file: Some(path),
            }),
            None => {
                let e = encode(n, t, dtype);
                headers.push(e.header.clone());
                payload.push(e);
            }
        }
    }
    let req = Request::Run {
        id: id.to_string(),
        case: WireCase::of(case),
        tensors: headers,
    };
    (req, payload)
}

/// The most bytes a reply to `case`'s `run` request can carry: every output name at f64, each
/// as large as the inputs together or the layer's output, whichever is larger. A header that
/// claims more is a broken worker, refused before anything is allocated for it.
pub fn max_reply_bytes(case: &Case, inputs: &Inputs) -> usize {
    let inputs: usize = inputs.named().iter().map(|(_, t)| t.data.len()).sum();
    let s = &case.shape;
    let output = s
        .batch
        .saturating_mul(s.out_features)
        .saturating_mul(s.image.max(1).saturating_pow(2));
    crate::io::names::ALL
        .len()
        .saturating_mul(8)
        .saturating_mul(inputs.max(output))
        .saturating_add(1 << 20)
}

/// Rebuild a case's inputs from a `run` request's tensors.
pub fn inputs_from(case: &Case, headers: &[TensorHeader], payload: &[u8]) -> io::Result<Inputs> {
    const WEIGHT: &str = "base_layer.weight";
    let (weight_file, inline): (Vec<&TensorHeader>, Vec<&TensorHeader>) = headers
        .iter()
        .partition(|h| h.name == WEIGHT && h.file.is_some());
    let inline: Vec<TensorHeader> = inline.into_iter().cloned().collect();
    let tensors = split_payload(&inline, payload)?;
    let mut named: BTreeMap<&str, HostTensor> = inline
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
        weight: match weight_file.first() {
            Some(h) => weight_from_file(h)?,
            None => Arc::new(take(WEIGHT)?),
        },
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
        lora_bias: take("lora_B.bias").ok(),
        scaling: case.shape.scaling(),
        lr: case.shape.lr,
    })
}

/// What the runner's hello probe file holds (see `hello` in the module doc).
pub const FILES_PROBE: &[u8] = b"peft-compat files\n";

/// Whether the probe file a hello names can be read here.
pub fn files_readable(probe: &str) -> bool {
    std::fs::read(probe).is_ok_and(|b| b == FILES_PROBE)
}

/// Tensors of at least this many bytes may travel in a file (see the module doc).
pub const FILE_MIN_BYTES: usize = 1 << 20;

/// A new, empty memfd, and the path another process opens it by (`/proc/<pid>/fd/<n>`). The
/// kernel frees it when its last holder closes it.
#[cfg(target_os = "linux")]
pub fn memfd() -> io::Result<(std::fs::File, String)> {
    use std::os::fd::{AsRawFd, FromRawFd};
    // SAFETY: a C string literal and flags; the fd returned is owned by the File below.
    let fd = unsafe { libc::memfd_create(c"peft-compat-tensor".as_ptr(), libc::MFD_CLOEXEC) };
    if fd < 0 {
        return Err(io::Error::last_os_error());
    }
    // SAFETY: `fd` is a fresh descriptor that nothing else owns.
    let file = unsafe { std::fs::File::from_raw_fd(fd) };
    let path = format!("/proc/{}/fd/{}", std::process::id(), file.as_raw_fd());
    Ok((file, path))
}

#[cfg(not(target_os = "linux"))]
pub fn memfd() -> io::Result<(std::fs::File, String)> {
    Err(io::ErrorKind::Unsupported.into())
}

/// A memfd holding `t`'s values in `dtype` (see [`memfd`]).
pub fn tensor_file(t: &HostTensor, dtype: DType) -> io::Result<(std::fs::File, String)> {
    let (mut file, path) = memfd()?;
    // Encoded 8 MiB of values at a time: the writer never holds the whole encoding.
    for chunk in t.data.chunks(1 << 20) {
        file.write_all(&crate::tensor::encode_values(chunk, dtype))?;
    }
    Ok((file, path))
}

/// The `outputs` reply for a backend's outputs. With `files`, each large output goes into a
/// memfd (returned: the caller keeps it open until the next request).
pub fn outputs_reply(
    case: &Case,
    outputs: &Outputs,
    compute_ms: f64,
    files: bool,
) -> (Reply, Vec<Encoded>, Vec<std::fs::File>) {
    let mut headers = Vec::new();
    let mut payload = Vec::new();
    let mut kept = Vec::new();
    for (n, t) in outputs {
        let dtype = lossless_dtype(t, case.point.dtype);
        let bytes = t.data.len() * dtype.size();
        if files && bytes >= FILE_MIN_BYTES {
            if let Ok((file, path)) = tensor_file(t, dtype) {
                headers.push(TensorHeader {
                    name: n.to_string(),
                    dtype,
                    shape: t.shape.clone(),
                    bytes,
                    file: Some(path),
                });
                kept.push(file);
                continue;
            }
        }
        let e = encode(n, t, dtype);
        headers.push(e.header.clone());
        payload.push(e);
    }
    let reply = Reply::Outputs {
        compute_ms,
        tensors: headers,
    };
    (reply, payload, kept)
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
        let f = read_frame::<Reply>(&mut r, reply_bytes, || usize::MAX)
            .unwrap()
            .unwrap();
        assert_eq!(f.stray, vec!["some library printed this".to_string()]);
        let Reply::Outputs { tensors, .. } = &f.message else {
            panic!()
        };
        let back = split_payload(tensors, &f.payload).unwrap();
        assert_eq!(back[0].data[..3], t.data[..3]);
        assert!(back[0].data[3].is_nan());
        assert!(read_frame::<Reply>(&mut r, reply_bytes, || usize::MAX)
            .unwrap()
            .is_none());
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
                backend: Backend::TCH_2_1_2,
                device: Device::Cuda(1),
                dtype: DType::Bf16,
                adapter: Adapter::PissaDora,
                op: Op::InitNoop,
                precision: Precision::Autocast,
                layer: Layer::Conv2d,
                profile: Profile::ZeroRows,
            },
            shape: Shape {
                image: 5,
                ..Shape::new("s", 2, 8, 4, 2, 0.1)
            },
        };
        let json = serde_json::to_string(&WireCase::of(&case)).unwrap();
        assert_eq!(
            json,
            r#"{"backend":"tch@2.1.2","device":"cuda:1","dtype":"bf16","adapter":"pissa_dora","op":"init_noop","precision":"autocast","layer":"conv2d","profile":"zero_rows","shape_name":"s","batch":2,"in_features":8,"out_features":4,"rank":2,"alpha":0.1,"bias":true,"rslora":false,"kernel":3,"image":5,"lora_bias":false,"groups":1,"base":"split","lr":0.0001}"#
        );
        let back: WireCase = serde_json::from_str(&json).unwrap();
        assert_eq!(back.case(), case);
    }
}
