//! The results stream: one JSON line per finished case, written and flushed as each case
//! finishes, so that Ctrl-C, a kill or a dead machine never loses a finished case, and
//! `--resume` can continue where a run stopped.
//!
//! # Format (`peft-compat/stream/v1`, JSON Lines)
//! - Line 1, the header: `{"schema": "peft-compat/stream/v1", "matrix": path, "matrix_fnv":
//!   hex hash of the matrix file's text, "seed", "selection": the --filter and --partition that
//!   chose the cases, "total": cases selected}`.
//! - Every further line: one case, as in the JSON report's `cases` (without `expected`, which
//!   the report adds from the matrix), in the order cases finished.
//!
//! A line cut short by a kill is ignored on reading; its case runs again on resume.

use super::CaseReport;
use crate::spec::Matrix;
use serde::{Deserialize, Serialize};
use std::collections::BTreeSet;
use std::fs::{File, OpenOptions};
use std::io::{BufRead, BufReader, Write};
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
}

impl Header {
    /// The header of a run of `matrix` (named as the user gave it) over a selection of
    /// `total` cases.
    pub fn new(matrix: &Matrix, selection: String, total: usize) -> Self {
        Header {
            schema: SCHEMA.into(),
            matrix: matrix.path.display().to_string(),
            matrix_fnv: matrix.fingerprint.clone(),
            seed: matrix.seed,
            selection,
            total,
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
        what: &'static str,
        was: String,
        now: String,
    },
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

    /// Continue the stream at `path` (its header already checked by [`read`]).
    pub fn append(path: &Path) -> Result<Writer, StreamError> {
        let file = OpenOptions::new()
            .append(true)
            .open(path)
            .map_err(|source| StreamError::Write {
                path: path.to_path_buf(),
                source,
            })?;
        // A line cut short by a kill has no newline: start on a fresh one.
        let mut w = Writer {
            path: path.to_path_buf(),
            file,
        };
        if !ends_with_newline(path) {
            w.line("")?;
        }
        Ok(w)
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

/// Whether the file's last byte is a newline (read alone: a stream can be long).
fn ends_with_newline(path: &Path) -> bool {
    use std::io::{Read, Seek, SeekFrom};
    let mut last = [b'\n'];
    File::open(path)
        .and_then(|mut f| {
            if f.seek(SeekFrom::End(0))? > 0 {
                f.seek(SeekFrom::End(-1))?;
                f.read_exact(&mut last)?;
            }
            Ok(())
        })
        .map_or(true, |_| last[0] == b'\n')
}

/// Read a stream back: its header and every complete case line.
pub fn read(path: &Path) -> Result<(Header, Vec<CaseReport>), StreamError> {
    let f = File::open(path).map_err(|source| StreamError::Read {
        path: path.to_path_buf(),
        source,
    })?;
    let mut lines = BufReader::new(f).lines();
    let first = lines
        .next()
        .transpose()
        .map_err(|source| StreamError::Read {
            path: path.to_path_buf(),
            source,
        })?
        .unwrap_or_default();
    let header: Header = serde_json::from_str(&first).map_err(|e| StreamError::Format {
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
    for line in lines.map_while(Result::ok) {
        // A partial last line (the process was killed mid-write) does not parse: skipped.
        if let Ok(c) = serde_json::from_str::<CaseReport>(&line) {
            cases.push(c);
        }
    }
    Ok((header, cases))
}

/// Check that a stream read back belongs to the run about to resume it.
pub fn check_resumable(path: &Path, was: &Header, now: &Header) -> Result<(), StreamError> {
    let fields: [(&'static str, String, String); 4] = [
        (
            "matrix file",
            was.matrix_fnv.clone(),
            now.matrix_fnv.clone(),
        ),
        ("seed", was.seed.to_string(), now.seed.to_string()),
        ("selection", was.selection.clone(), now.selection.clone()),
        ("cases", was.total.to_string(), now.total.to_string()),
    ];
    for (what, a, b) in fields {
        if a != b {
            return Err(StreamError::Mismatch {
                path: path.to_path_buf(),
                what,
                was: a,
                now: b,
            });
        }
    }
    Ok(())
}

/// Where an interrupted run stands: the cases its stream already holds (each selected case
/// once, as it was first written) and the selected cases still to run.
#[derive(Debug)]
pub struct Resumed {
    pub finished: Vec<CaseReport>,
    pub remaining: Vec<usize>,
}

/// Read the stream at `path` for a run of `matrix` over `selected` (matrix indices) with
/// `header`, refusing a stream another run wrote.
pub fn resume(
    path: &Path,
    header: &Header,
    matrix: &Matrix,
    selected: &[usize],
) -> Result<Resumed, StreamError> {
    let (was, cases) = read(path)?;
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
        let (h, cases) = read(&path).unwrap();
        assert_eq!(h, header);
        assert_eq!(cases, vec![case(0), case(1)]);
        // Appending starts on a fresh line, so the resumed case reads back.
        let mut w = Writer::append(&path).unwrap();
        w.case(&case(2)).unwrap();
        assert_eq!(read(&path).unwrap().1.len(), 3);

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
        let header = Header::new(&m, "all".into(), 3);
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
        let other = Header::new(&m, "filter=[\"f16\"]".into(), 1);
        let e = resume(&path, &other, &m, &[1]).unwrap_err().to_string();
        assert!(
            e.contains("selection") && e.contains("without --resume"),
            "{e}"
        );
    }
}
