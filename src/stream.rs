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

use crate::partition::fnv1a;
use crate::report::CaseReport;
use serde::{Deserialize, Serialize};
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
    pub fn new(
        matrix: &str,
        matrix_text: &str,
        seed: u64,
        selection: String,
        total: usize,
    ) -> Self {
        Header {
            schema: SCHEMA.into(),
            matrix: matrix.into(),
            matrix_fnv: format!("{:016x}", fnv1a(matrix_text.as_bytes())),
            seed,
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

#[cfg(test)]
mod tests {
    use super::*;
    use crate::case::*;
    use crate::judge::{OutcomeKind, Tolerance};

    fn case(index: usize) -> CaseReport {
        CaseReport {
            index,
            id: format!("tch/cpu/f32/lora/init/native/s{index}"),
            backend: Backend::Tch,
            device: Device::Cpu,
            dtype: DType::F32,
            adapter: Adapter::Lora,
            op: Op::Init,
            precision: Precision::Native,
            layer: Layer::Linear,
            profile: Profile::Normal,
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
        let header = Header::new("m.yaml", "seed: 1\n", 1, "all".into(), 3);
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

        let other = Header::new("m.yaml", "seed: 2\n", 1, "all".into(), 3);
        let e = check_resumable(&path, &h, &other).unwrap_err().to_string();
        assert!(
            e.contains("matrix file") && e.contains("without --resume"),
            "{e}"
        );
        assert!(check_resumable(&path, &h, &header).is_ok());
    }
}
