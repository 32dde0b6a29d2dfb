//! The results stream: one JSON line per finished case, written and flushed as each case
//! finishes, so that Ctrl-C, a kill or a dead machine never loses a finished case, and
//! `--resume` can continue where a run stopped.
//!
//! # Format (`peft-compat/stream/v1`, JSON Lines)
//! - Line 1, the header: `{"schema": "peft-compat/stream/v1", "matrix": path, "matrix_fnv":
//!   hex hash of the matrix file's text, "seed", "selection": the --filter and --partition that
//!   chose the cases, "total": cases selected, "threads": intra-op threads per worker,
//!   "environment": as in the JSON report}`. The header is written once the workers have
//!   started, so it holds every backend build's libraries: a resumed run's report carries the
//!   environment its cases ran in, and its expectations are judged against it.
//! - Every further line: one case, as in the JSON report's `cases` (without `expected`, which
//!   the report adds from the matrix), in the order cases finished.
//!
//! A last line cut short by a kill (no newline) is ignored on reading and cut off on resume;
//! its case runs again. Any other line that does not read is an error naming `path:line`.
//! One run writes a stream at a time: `<stream>.lock` is held (flock) while it does.

use super::CaseReport;
use crate::environment::Environment;
use crate::spec::Matrix;
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::fs::{File, OpenOptions};
use std::io::Write;
use std::path::{Path, PathBuf};

pub const SCHEMA: &str = "peft-compat/stream/v1";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Header {
    pub schema: String,
    pub matrix: String,
    pub matrix_fnv: String,
    pub seed: u64,
    pub selection: String,
    pub total: usize,
    /// Intra-op threads per worker: a multi-threaded GEMM sums in another order.
    #[serde(default = "one")]
    pub threads: usize,
    /// Where the cases ran (streams that predate it have none).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub environment: Option<Environment>,
}

fn one() -> usize {
    1
}

impl Header {
    /// The header of a run of `matrix` (named as the user gave it) over a selection of
    /// `total` cases.
    pub fn new(matrix: &Matrix, selection: String, total: usize, threads: usize) -> Self {
        Header {
            schema: SCHEMA.into(),
            matrix: matrix.path.display().to_string(),
            matrix_fnv: matrix.fingerprint.clone(),
            seed: matrix.seed,
            selection,
            total,
            threads,
            environment: None,
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum StreamError {
    #[error("cannot write the results stream {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot read the results stream {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("{path} is not a peft-compat results stream: {message}")]
    Format { path: PathBuf, message: String },
    #[error(
        "{path} was written by another run ({what}: {was}, now {now}); run without --resume to start over"
    )]
    Mismatch {
        path: PathBuf,
        what: String,
        was: String,
        now: String,
    },
    #[error("{path}:{line}: not a case ({message}); the stream is damaged: run without --resume to start over")]
    Line {
        path: PathBuf,
        line: usize,
        message: String,
    },
    #[error(
        "{path} is being written by another peft-compat run ({holder}); wait for it to end, or \
         give this run a stream of its own with --results PATH"
    )]
    Busy { path: PathBuf, holder: String },
}

/// The lock that makes a run the only writer of its results stream: `<stream>.lock`, held
/// (flock) until dropped, holding the owner's pid for the message another run gets. The lock
/// file stays (deleting it would let two runs lock two different files).
#[derive(Debug)]
pub struct Lock {
    _file: File,
}

impl Lock {
    /// Take the lock of the stream at `path`. `Ok(None)` when there is nothing to lock: the
    /// stream is not a regular file (`/dev/null`), or its folder cannot hold a lock file (then
    /// writing the stream fails too, and says so).
    pub fn acquire(path: &Path) -> Result<Option<Lock>, StreamError> {
        if path.exists() && !path.is_file() {
            return Ok(None);
        }
        let mut name = path.file_name().unwrap_or_default().to_os_string();
        name.push(".lock");
        let lock_path = path.with_file_name(name);
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            let _ = std::fs::create_dir_all(dir);
        }
        let Ok(mut file) = OpenOptions::new()
            .read(true)
            .write(true)
            .create(true)
            .truncate(false)
            .open(&lock_path)
        else {
            return Ok(None);
        };
        match file.try_lock() {
            Ok(()) => {
                let _ = file.set_len(0);
                let _ = write!(file, "pid {}", std::process::id());
                let _ = file.flush();
                Ok(Some(Lock { _file: file }))
            }
            Err(std::fs::TryLockError::WouldBlock) => {
                let holder = std::fs::read_to_string(&lock_path)
                    .ok()
                    .filter(|h| !h.trim().is_empty())
                    .unwrap_or_else(|| "pid unknown".into());
                Err(StreamError::Busy {
                    path: path.to_path_buf(),
                    holder: holder.trim().to_string(),
                })
            }
            Err(std::fs::TryLockError::Error(_)) => Ok(None),
        }
    }
}

/// Where the stream goes: `--results PATH`, else beside the JSON report (`report.jsonl` for
/// `report.json`), else `out/<matrix stem>.jsonl`.
pub fn default_path(json: Option<&Path>, matrix: &Path) -> PathBuf {
    match json {
        Some(j) => j.with_extension("jsonl"),
        None => {
            let stem = matrix
                .file_stem()
                .map_or("matrix".into(), |s| s.to_string_lossy());
            PathBuf::from("out").join(format!("{stem}.jsonl"))
        }
    }
}

pub struct Writer {
    path: PathBuf,
    file: File,
}

impl Writer {
    /// Start a new stream at `path` with `header` (replacing any old one).
    pub fn create(path: &Path, header: &Header) -> Result<Writer, StreamError> {
        let err = |source| StreamError::Write {
            path: path.to_path_buf(),
            source,
        };
        if let Some(dir) = path.parent().filter(|d| !d.as_os_str().is_empty()) {
            std::fs::create_dir_all(dir).map_err(err)?;
        }
        let file = File::create(path).map_err(err)?;
        let mut w = Writer {
            path: path.to_path_buf(),
            file,
        };
        w.line(&serde_json::to_string(header).expect("serializable"))?;
        Ok(w)
    }

    /// Continue the stream at `path` (its header already checked by [`read`]) after its
    /// first `complete` bytes: a last line cut short by a kill is cut off.
    pub fn append(path: &Path, complete: u64) -> Result<Writer, StreamError> {
        let err = |source| StreamError::Write {
            path: path.to_path_buf(),
            source,
        };
        let file = OpenOptions::new().write(true).open(path).map_err(err)?;
        file.set_len(complete).map_err(err)?;
        drop(file);
        let file = OpenOptions::new().append(true).open(path).map_err(err)?;
        Ok(Writer {
            path: path.to_path_buf(),
            file,
        })
    }

    /// Append one finished case, on disk before this returns.
    pub fn case(&mut self, c: &CaseReport) -> Result<(), StreamError> {
        self.line(&serde_json::to_string(c).expect("serializable"))
    }

    fn line(&mut self, text: &str) -> Result<(), StreamError> {
        let mut buf = Vec::with_capacity(text.len() + 1);
        buf.extend_from_slice(text.as_bytes());
        buf.push(b'\n');
        // One write per line: a kill leaves whole lines plus at most one partial one.
        self.file
            .write_all(&buf)
            .and_then(|_| self.file.flush())
            .map_err(|source| StreamError::Write {
                path: self.path.clone(),
                source,
            })
    }
}

/// A stream read back.
#[derive(Debug)]
pub struct Read {
    pub header: Header,
    /// Every complete case line, in the order written.
    pub cases: Vec<CaseReport>,
    /// Bytes up to the end of the last complete line: where a resumed run appends.
    pub complete: u64,
}

/// Read a stream back: its header and every complete case line. A last line without its
/// newline (a kill mid-write) is left out; any other line that does not read is an error that
/// names it.
pub fn read(path: &Path) -> Result<Read, StreamError> {
    let bytes = std::fs::read(path).map_err(|source| StreamError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let complete = bytes.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1);
    let mut lines = bytes[..complete].split(|&b| b == b'\n');
    let first = lines.next().unwrap_or_default();
    let header: Header = serde_json::from_slice(first).map_err(|e| StreamError::Format {
        path: path.to_path_buf(),
        message: format!("line 1: {e}"),
    })?;
    if header.schema != SCHEMA {
        return Err(StreamError::Format {
            path: path.to_path_buf(),
            message: format!("schema `{}`, expected `{SCHEMA}`", header.schema),
        });
    }
    let mut cases = Vec::new();
    // The split leaves an empty piece after the last newline.
    let body: Vec<&[u8]> = lines.collect();
    for (n, line) in body.iter().enumerate().take(body.len().saturating_sub(1)) {
        let c = serde_json::from_slice::<CaseReport>(line).map_err(|e| StreamError::Line {
            path: path.to_path_buf(),
            line: n + 2,
            message: e.to_string(),
        })?;
        cases.push(c);
    }
    Ok(Read {
        header,
        cases,
        complete: complete as u64,
    })
}

/// Check that a stream read back belongs to the run about to resume it.
pub fn check_resumable(path: &Path, was: &Header, now: &Header) -> Result<(), StreamError> {
    let fields: [(&'static str, String, String); 5] = [
        (
            "matrix file",
            was.matrix_fnv.clone(),
            now.matrix_fnv.clone(),
        ),
        ("seed", was.seed.to_string(), now.seed.to_string()),
        ("selection", was.selection.clone(), now.selection.clone()),
        ("cases", was.total.to_string(), now.total.to_string()),
        (
            "--threads",
            was.threads.to_string(),
            now.threads.to_string(),
        ),
    ];
    for (what, a, b) in fields {
        if a != b {
            return Err(StreamError::Mismatch {
                path: path.to_path_buf(),
                what: what.to_string(),
                was: a,
                now: b,
            });
        }
    }
    Ok(())
}

/// The environment a resumed run's report carries: the stream's (where its cases ran), with
/// any backend build this run started that the stream's run did not. A build whose libraries
/// changed since is refused: the stream's cases and this run's would come from different
/// libraries.
pub fn resumed_environment(
    path: &Path,
    was: Option<&Environment>,
    now: &Environment,
) -> Result<Environment, StreamError> {
    let Some(was) = was else {
        return Ok(now.clone());
    };
    let mut env = was.clone();
    for (b, libs) in &now.backends {
        match was.backends.get(b) {
            Some(old) if old != libs => {
                let show = |m: &std::collections::BTreeMap<String, String>| {
                    m.iter()
                        .map(|(k, v)| format!("{k} {v}"))
                        .collect::<Vec<_>>()
                        .join(", ")
                };
                return Err(StreamError::Mismatch {
                    path: path.to_path_buf(),
                    what: format!("the {b} build"),
                    was: show(old),
                    now: show(libs),
                });
            }
            Some(_) => {}
            None => {
                env.backends.insert(b.clone(), libs.clone());
                for (k, v) in libs {
                    env.libraries.entry(k.clone()).or_insert_with(|| v.clone());
                }
            }
        }
    }
    Ok(env)
}

/// Where an interrupted run stands: the cases its stream already holds (each selected case
/// once, as it was first written) and the selected cases still to run.
#[derive(Debug)]
pub struct Resumed {
    pub finished: Vec<CaseReport>,
    pub remaining: Vec<usize>,
    /// Where the stream's cases ran, as its header says.
    pub environment: Option<Environment>,
    /// Where to append: after the last complete line.
    pub complete: u64,
}

/// Read the stream at `path` for a run of `matrix` over `selected` (matrix indices) with
/// `header`, refusing a stream another run wrote.
pub fn resume(
    path: &Path,
    header: &Header,
    matrix: &Matrix,
    selected: &[usize],
) -> Result<Resumed, StreamError> {
    let Read {
        header: was,
        cases,
        complete,
    } = read(path)?;
    check_resumable(path, &was, header)?;
    let wanted: BTreeSet<usize> = selected.iter().copied().collect();
    let mut seen = BTreeSet::new();
    let mut finished = Vec::new();
    for c in cases {
        let same = wanted.contains(&c.index) && matrix.cases[c.index].id() == c.id;
        if same && seen.insert(c.index) {
            finished.push(c);
        }
    }
    let remaining = selected
        .iter()
        .copied()
        .filter(|i| !seen.contains(i))
        .collect();
    Ok(Resumed {
        finished,
        remaining,
        environment: was.environment,
        complete,
    })
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::case::*;
    use crate::outcome::{OutcomeKind, Tolerance};

    fn header_of(text: &str) -> Header {
        Header {
            schema: SCHEMA.into(),
            matrix: "m.yaml".into(),
            matrix_fnv: format!("{:016x}", crate::util::fnv1a(text.as_bytes())),
            seed: 1,
            selection: "all".into(),
            total: 3,
            threads: 1,
            environment: None,
        }
    }

    fn case(index: usize) -> CaseReport {
        CaseReport {
            index,
            id: format!("tch/cpu/f32/lora/init/native/s{index}"),
            point: Point {
                backend: Backend::Tch,
                device: Device::Cpu,
                dtype: DType::F32,
                adapter: Adapter::Lora,
                op: Op::Init,
                precision: Precision::Native,
                layer: Layer::Linear,
                profile: Profile::Normal,
            },
            shape: format!("s{index}"),
            outcome: OutcomeKind::Skipped,
            error: Some("why".into()),
            skip: None,
            upcast: None,
            upcast_applied: false,
            metrics: None,
            tolerance: Tolerance {
                rel: 1e-3,
                factor: 1.0,
                overridden: false,
                kappa: 1.0,
            },
            duration_ms: 0.0,
            compute_ms: None,
            dump_error: None,
            expected: None,
            agreement: None,
            weight_rounded: None,
        }
    }

    #[test]
    fn a_line_cut_short_is_dropped_and_another_run_is_refused() {
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.jsonl");
        let header = header_of("seed: 1\n");
        let mut w = Writer::create(&path, &header).unwrap();
        w.case(&case(0)).unwrap();
        w.case(&case(1)).unwrap();
        drop(w);
        // A kill in the middle of the third line.
        let mut text = std::fs::read_to_string(&path).unwrap();
        text.push_str(r#"{"index":2,"id":"tch/cpu"#);
        std::fs::write(&path, text).unwrap();
        let Read {
            header: h,
            cases,
            complete,
        } = read(&path).unwrap();
        assert_eq!(h, header);
        assert_eq!(cases, vec![case(0), case(1)]);
        // Appending cuts the partial line off, so the resumed case reads back.
        let mut w = Writer::append(&path, complete).unwrap();
        w.case(&case(2)).unwrap();
        assert_eq!(read(&path).unwrap().cases, vec![case(0), case(1), case(2)]);

        // A damaged line in the middle is named, never skipped.
        let mut text = std::fs::read_to_string(&path).unwrap();
        text = text.replacen("{\"index\":1", "{\"index\":oops", 1);
        std::fs::write(&path, &text).unwrap();
        let e = read(&path).unwrap_err().to_string();
        assert!(e.contains("r.jsonl:3: not a case"), "{e}");

        let other = header_of("seed: 2\n");
        let e = check_resumable(&path, &h, &other).unwrap_err().to_string();
        assert!(
            e.contains("matrix file") && e.contains("without --resume"),
            "{e}"
        );
        assert!(check_resumable(&path, &h, &header).is_ok());
    }

    /// Resuming keeps each selected case of the stream once (the first line written wins; a
    /// case of another selection or with another id at that index is run again) and returns
    /// the selection's other cases, in selection order.
    #[test]
    fn resume_keeps_finished_cases_and_returns_the_rest() {
        let m = crate::spec::Matrix::parse(
            "seed: 1\naxes: {backend: [tch], device: [cpu], dtype: [f32, f16, bf16], adapter: [lora], op: [forward], precision: [native]}\nshapes: {s: {batch: 2, in_features: 8, out_features: 4, rank: 2, alpha: 4}}\n",
            Path::new("m.yaml"),
            None,
        )
        .unwrap();
        let dir = tempfile::tempdir().unwrap();
        let path = dir.path().join("r.jsonl");
        let header = Header::new(&m, "all".into(), 3, 1);
        let mut w = Writer::create(&path, &header).unwrap();
        let mut first = case(0);
        first.id = m.cases[0].id();
        let mut again = first.clone();
        again.error = Some("written twice".into());
        let mut stale = case(2);
        stale.id = "not/this/case".into();
        for c in [&first, &again, &stale] {
            w.case(c).unwrap();
        }
        drop(w);
        let r = resume(&path, &header, &m, &[0, 1, 2]).unwrap();
        assert_eq!(r.finished, vec![first]);
        assert_eq!(r.remaining, vec![1, 2]);
        let other = Header::new(&m, "filter=[\"f16\"]".into(), 1, 1);
        let e = resume(&path, &other, &m, &[1]).unwrap_err().to_string();
        assert!(
            e.contains("selection") && e.contains("without --resume"),
            "{e}"
        );
    }
}
