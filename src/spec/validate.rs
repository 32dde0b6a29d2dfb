//! Located errors: every problem with a matrix file names the file, the line and column (as
//! precisely as the YAML allows) and the fix.

use serde::de::DeserializeOwned;
use std::path::{Path, PathBuf};

/// A problem with a matrix file, located as precisely as the YAML allows.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{}{}\n  help: {help}", location(.path, *.line, *.column), .message)]
pub struct MatrixError {
    pub path: PathBuf,
    pub line: Option<usize>,
    pub column: Option<usize>,
    pub message: String,
    pub help: String,
}

fn location(path: &Path, line: Option<usize>, column: Option<usize>) -> String {
    match (line, column) {
        (Some(l), Some(c)) => format!("{}:{l}:{c}: ", path.display()),
        (Some(l), None) => format!("{}:{l}: ", path.display()),
        _ => format!("{}: ", path.display()),
    }
}

/// What the axes take, for every message about an axis value: made from the axes' own
/// spellings, so it never lags behind them.
pub fn help_axes() -> String {
    use crate::case::{Adapter, Backend, DType, Device, Layer, Op, Precision, Profile};
    format!(
        "axes take: backend: {}; device: {}; dtype: {}; adapter: {}; op: {}; precision: {}; \
         layer: {}; profile: {} (see matrices/default.yaml and matrices/failures.yaml for \
         complete files)",
        Backend::valid(),
        Device::valid(),
        DType::valid(),
        Adapter::valid(),
        Op::valid(),
        Precision::valid(),
        Layer::valid(),
        Profile::valid()
    )
}

/// The text of a matrix file and its path: finds where a key is written, and makes the
/// located error for it.
#[derive(Debug, Clone, Copy)]
pub struct Source<'a> {
    pub text: &'a str,
    pub path: &'a Path,
}

impl<'a> Source<'a> {
    pub fn new(text: &'a str, path: &'a Path) -> Source<'a> {
        Source { text, path }
    }

    /// 1-based line and column of the first occurrence of `needle` at or after line `from`.
    pub fn locate(&self, needle: &str, from: usize) -> (Option<usize>, Option<usize>) {
        for (i, line) in self.text.lines().enumerate().skip(from.saturating_sub(1)) {
            if let Some(c) = line.find(needle) {
                return (Some(i + 1), Some(c + 1));
            }
        }
        (None, None)
    }

    /// An error at a position.
    pub fn error(
        &self,
        (line, column): (Option<usize>, Option<usize>),
        message: impl Into<String>,
        help: impl Into<String>,
    ) -> MatrixError {
        MatrixError {
            path: self.path.to_path_buf(),
            line,
            column,
            message: message.into(),
            help: help.into(),
        }
    }

    /// An error at the first place `needle` is written (e.g. `"shapes:"`).
    pub fn error_at(
        &self,
        needle: &str,
        message: impl Into<String>,
        help: impl Into<String>,
    ) -> MatrixError {
        self.error(self.locate(needle, 1), message, help)
    }

    /// An error at the first `needle` inside the top-level `section`.
    pub fn error_in(
        &self,
        section: &str,
        needle: &str,
        message: impl Into<String>,
        help: impl Into<String>,
    ) -> MatrixError {
        let from = self.locate(&format!("{section}:"), 1).0.unwrap_or(1);
        self.error(self.locate(needle, from), message, help)
    }

    /// 1-based line of each item of the block sequence under the top-level key `section`, in
    /// order; empty when the section is written in flow style (`[...]`) or absent.
    pub fn item_lines(&self, section: &str) -> Vec<usize> {
        let key = format!("{section}:");
        let mut lines = self.text.lines().enumerate();
        if !lines.any(|(_, l)| l.starts_with(&key)) {
            return vec![];
        }
        let mut indent = None;
        let mut out = Vec::new();
        for (i, line) in lines {
            let body = line.trim_start();
            if body.is_empty() || body.starts_with('#') {
                continue;
            }
            let ind = line.len() - body.len();
            if ind == 0 && !body.starts_with('-') {
                break;
            }
            if (body.starts_with("- ") || body == "-") && *indent.get_or_insert(ind) == ind {
                out.push(i + 1);
            }
        }
        out
    }

    /// The text parsed as `T`, serde's message located and given the help that fits it.
    pub fn deserialize<T: DeserializeOwned>(&self) -> Result<T, MatrixError> {
        serde_yaml::from_str(self.text).map_err(|e| {
            let loc = e.location();
            let text = e.to_string();
            // serde_yaml appends " at line L column C"; the location is shown up front instead.
            let message = text
                .rsplit_once(" at line ")
                .map(|(m, _)| m.to_string())
                .unwrap_or(text);
            let message = number_from_one(&message);
            let help = deserialize_help(&message);
            self.error(
                (
                    loc.as_ref().map(|l| l.line()),
                    loc.as_ref().map(|l| l.column()),
                ),
                message,
                help,
            )
        })
    }
}

/// serde's paths number list items from 0 (`expectations[0].expect`); every other message
/// numbers them from 1, as a person counts: `expectations entry 1.expect`.
fn number_from_one(message: &str) -> String {
    let re = regex::Regex::new(r"([A-Za-z_]+)\[(\d+)\]").expect("valid regex");
    re.replace_all(message, |c: &regex::Captures| {
        let n: usize = c[2].parse().unwrap_or(0);
        format!("{} entry {}", &c[1], n + 1)
    })
    .into_owned()
}

/// The fix to suggest for one of serde's messages.
fn deserialize_help(message: &str) -> String {
    let unknown = message.contains("unknown field") || message.contains("missing field");
    let number = ["expected usize", "expected u64", "expected u32"]
        .iter()
        .any(|t| message.contains(t));
    let text = if message.starts_with("expectations") && message.contains("unknown variant") {
        "expect takes: pass, mismatch, nonfinite, unsupported, crashed, timeout, fail (any failure), flaky (pass or fail)"
    } else if message.starts_with("shapes") && message.contains(".base:") {
        "a shape's base takes: split (x @ W.T, then + b; the default) or fused (one addmm, F.linear)"
    } else if message.contains("unknown variant") || message.contains("unknown device") {
        return help_axes();
    } else if number {
        "this key takes a whole number: sizes (batch, in_features, out_features, rank, kernel, \
         image) and max_cases >= 1, seed >= 0; e.g. batch: 4"
    } else if message.starts_with("expectations") && unknown {
        "an expectation takes a case pattern (backend, device, dtype, adapter, op, precision, layer, profile, shape), \
         expect (pass, mismatch, nonfinite, unsupported, crashed, timeout, fail, flaky), reason, and optionally \
         error (a regular expression) and when (libtorch, tch, candle, cuda, cpu_flag, arch, gpu)"
    } else if unknown {
        "top-level keys: seed, max_cases, axes, shapes, exclude, include, tolerances, expectations; \
         a shape requires batch, in_features, out_features, rank, alpha and takes bias (default \
         true), rslora (default false), kernel (default 3), image (default 8), lora_bias \
         (default false), groups (default 1), base (split or fused), lr (default 0.0001) and \
         draws (another shape's name)"
    } else {
        "check the YAML syntax near this position (indentation, a missing ':' or ']')"
    };
    text.to_string()
}
