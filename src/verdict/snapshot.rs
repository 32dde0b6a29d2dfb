//! Snapshots: what was accepted for a matrix, as text that insta manages (`snapshots/NAME.snap`,
//! reviewed with `cargo insta review`, accepted with `cargo insta accept`).
//!
//! # Rounding rule
//! A snapshot must not churn on harmless last-bit differences, yet must move on real drift:
//! - errors are stored in units of the dtype's roundoff (`err_units`) with 2 significant digits;
//! - each output's L2 norm (`norm`) and L1 checksum (`l1`) with 4 significant digits (a relative
//!   resolution of 1e-3, coarser than f32 noise and finer than any real change in a result);
//! - failure texts as a class: the first line, with digits replaced by `#`;
//! - each case's tolerance (`tolerance`, 2 significant digits): a tolerance raised in the matrix
//!   would otherwise let a worse error pass unnoticed;
//! - a PEFT case's agreement with its tch twin (`agreement`, in units, 2 significant digits):
//!   held like an error, so the restatement drifting from PEFT fails the gate.
//!
//! The insta header's `info` records the matrix's `seed`: another seed draws other inputs, so
//! every number moves, and the gate says that once instead of case by case.
//!
//! The gate does not compare this text for equality: it applies the drift rules in `gate` to the
//! parsed numbers, so a rounding boundary crossed by noise does not fail CI.

use crate::outcome::OutcomeKind;
use crate::report::{CaseReport, Report};
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

/// One output's accepted figures.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OutputEntry {
    pub err_units: f64,
    pub norm: f64,
    pub l1: f64,
}

/// One case's accepted state.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Entry {
    pub outcome: OutcomeKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error_class: Option<String>,
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub outputs: BTreeMap<String, OutputEntry>,
    /// The allowed `max_rel_err` (absent in snapshots that predate it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tolerance: Option<f64>,
    /// A PEFT case's agreement with its tch twin, in units of roundoff (2 significant digits).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agreement: Option<f64>,
}

/// A whole snapshot: case id -> entry.
pub type Snapshot = BTreeMap<String, Entry>;

/// `x` rounded to `digits` significant digits.
pub fn sig(x: f64, digits: usize) -> f64 {
    if !x.is_finite() || x == 0.0 {
        return x;
    }
    format!("{:.*e}", digits - 1, x).parse().unwrap_or(x)
}

/// The first line of a failure text, with digits replaced, so that addresses and counts inside
/// messages do not churn the snapshot.
pub fn error_class(text: &str) -> String {
    text.lines()
        .next()
        .unwrap_or("")
        .chars()
        .map(|c| if c.is_ascii_digit() { '#' } else { c })
        .take(200)
        .collect()
}

pub fn entry(c: &CaseReport) -> Entry {
    let outputs = c
        .metrics
        .iter()
        .flat_map(|m| &m.outputs)
        .map(|o| {
            (
                o.name.clone(),
                OutputEntry {
                    err_units: sig(o.err_units, 2),
                    norm: sig(o.norm, 4),
                    l1: sig(o.l1, 4),
                },
            )
        })
        .collect();
    Entry {
        outcome: c.outcome,
        error_class: match c.outcome {
            OutcomeKind::Unsupported
            | OutcomeKind::Crashed
            | OutcomeKind::Timeout
            | OutcomeKind::Skipped => c.error.as_deref().map(error_class),
            _ => None,
        },
        outputs,
        tolerance: (c.outcome != OutcomeKind::Skipped).then(|| sig(c.tolerance.rel, 2)),
        agreement: c.agreement.as_ref().map(|a| sig(a.max_u, 2)),
    }
}

pub fn from_report(report: &Report) -> Snapshot {
    report
        .cases
        .iter()
        .map(|c| (c.id.clone(), entry(c)))
        .collect()
}

/// The snapshot to propose after a failed gate: the accepted one, with every case this run
/// produced replaced by what it observed (except cases skipped here, e.g. GPU cases on a CPU
/// machine, which keep their accepted entry) and the entries no case of the selection produces
/// dropped. Entries outside the selection (`--filter`) stay as they are: accepting a filtered
/// run's proposal never wipes the rest of the baseline.
pub fn observed(report: &Report, accepted: &Snapshot) -> Snapshot {
    let mut s: Snapshot = accepted
        .iter()
        .filter(|(id, _)| !report.selects(id))
        .map(|(id, e)| (id.clone(), e.clone()))
        .collect();
    for c in &report.cases {
        let kept = accepted
            .get(&c.id)
            .filter(|_| c.outcome == OutcomeKind::Skipped);
        s.insert(c.id.clone(), kept.cloned().unwrap_or_else(|| entry(c)));
    }
    s
}

/// What a snapshot's insta header records besides the entries.
#[derive(Debug, Clone, Default, PartialEq, Eq, Serialize, Deserialize)]
pub struct Info {
    /// The matrix's seed when it was recorded (absent in snapshots that predate it).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub seed: Option<u64>,
}

/// The whole file: its insta header (`source`, `expression`, `info`), then the entries.
pub fn to_file_text(matrix: &str, info: &Info, s: &Snapshot) -> String {
    let info = match info.seed {
        Some(seed) => format!("info:\n  seed: {seed}\n"),
        None => String::new(),
    };
    format!(
        "---\nsource: peft-compat\nexpression: {matrix}\n{info}---\n{}",
        to_text(s)
    )
}

/// The snapshot body (what insta stores under its header).
pub fn to_text(s: &Snapshot) -> String {
    serde_yaml::to_string(s).expect("snapshots are plain data")
}

/// Where a matrix's snapshot lives: `snapshots/<matrix file stem>.snap`.
pub fn default_path(matrix: &Path) -> PathBuf {
    let stem = matrix
        .file_stem()
        .and_then(|s| s.to_str())
        .unwrap_or("matrix");
    PathBuf::from("snapshots").join(format!("{stem}.snap"))
}

#[derive(Debug, thiserror::Error)]
pub enum SnapshotError {
    #[error("no snapshot at {0}: record one with `peft-compat run MATRIX --check` outside CI and accept it with `cargo insta accept`")]
    Missing(PathBuf),
    #[error("{path}: {message}")]
    Invalid { path: PathBuf, message: String },
    #[error("cannot read the snapshot {path}: {source}")]
    Read {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write {path}: {source}")]
    Write {
        path: PathBuf,
        source: std::io::Error,
    },
}

/// Read an insta `.snap` file (a `---` header, then the body).
pub fn read(path: &Path) -> Result<Snapshot, SnapshotError> {
    read_with_info(path).map(|(_, s)| s)
}

/// Read an insta `.snap` file strictly: UTF-8 (the first bad byte named), each case id once.
pub fn read_with_info(path: &Path) -> Result<(Info, Snapshot), SnapshotError> {
    let bytes = std::fs::read(path).map_err(|source| match source.kind() {
        std::io::ErrorKind::NotFound => SnapshotError::Missing(path.to_path_buf()),
        _ => SnapshotError::Read {
            path: path.to_path_buf(),
            source,
        },
    })?;
    let invalid = |message: String| SnapshotError::Invalid {
        path: path.to_path_buf(),
        message,
    };
    let text = String::from_utf8(bytes).map_err(|e| {
        let at = e.utf8_error().valid_up_to();
        let before = &e.as_bytes()[..at];
        let line = before.iter().filter(|&&b| b == b'\n').count() + 1;
        let column = at - before.iter().rposition(|&b| b == b'\n').map_or(0, |i| i + 1) + 1;
        invalid(format!(
            "line {line}, column {column}: not UTF-8 text (byte 0x{:02x}); snapshots are written by \
             peft-compat, restore it from version control or record it again",
            e.as_bytes()[at]
        ))
    })?;
    let (header, body) = split_header(&text);
    let info = header
        .and_then(|h| {
            serde_yaml::from_str::<serde_yaml::Value>(h)
                .ok()?
                .get("info")
                .cloned()
        })
        .map(|v| serde_yaml::from_value::<Info>(v).map_err(|e| invalid(format!("info: {e}"))))
        .transpose()?
        .unwrap_or_default();
    let Strict(entries) = serde_yaml::from_str(body).map_err(|e| invalid(e.to_string()))?;
    Ok((info, entries))
}

/// A snapshot body that refuses an id listed twice (a map would keep the last one silently).
struct Strict(Snapshot);

impl<'de> Deserialize<'de> for Strict {
    fn deserialize<D: serde::Deserializer<'de>>(d: D) -> Result<Self, D::Error> {
        struct Visit;
        impl<'de> serde::de::Visitor<'de> for Visit {
            type Value = Strict;
            fn expecting(&self, f: &mut std::fmt::Formatter) -> std::fmt::Result {
                f.write_str("a map from case id to entry")
            }
            fn visit_unit<E: serde::de::Error>(self) -> Result<Strict, E> {
                Ok(Strict(Snapshot::new()))
            }
            fn visit_map<A: serde::de::MapAccess<'de>>(
                self,
                mut map: A,
            ) -> Result<Strict, A::Error> {
                let mut out = Snapshot::new();
                while let Some((id, e)) = map.next_entry::<String, Entry>()? {
                    if out.contains_key(&id) {
                        return Err(serde::de::Error::custom(format!(
                            "case `{id}` is listed twice; keep one entry"
                        )));
                    }
                    out.insert(id, e);
                }
                Ok(Strict(out))
            }
        }
        d.deserialize_any(Visit)
    }
}

/// The insta header (between the `---` lines), if any, and the body.
fn split_header(text: &str) -> (Option<&str>, &str) {
    if let Some(rest) = text.strip_prefix("---\n") {
        if let Some(i) = rest.find("\n---\n") {
            return (Some(&rest[..i]), &rest[i + 5..]);
        }
    }
    (None, text)
}

/// Write a pending snapshot beside the accepted one (`NAME.snap.new`, insta's format), for
/// `cargo insta review` / `cargo insta accept`. Never called when `CI` is set.
pub fn write_pending(
    path: &Path,
    matrix: &str,
    info: &Info,
    s: &Snapshot,
) -> Result<PathBuf, SnapshotError> {
    let pending = PathBuf::from(format!("{}.new", path.display()));
    if let Some(dir) = pending.parent() {
        std::fs::create_dir_all(dir).map_err(|source| SnapshotError::Write {
            path: pending.clone(),
            source,
        })?;
    }
    let text = to_file_text(matrix, info, s);
    crate::util::write_atomic(&pending, text.as_bytes()).map_err(|source| {
        SnapshotError::Write {
            path: pending.clone(),
            source,
        }
    })?;
    Ok(pending)
}

/// What to do about the observed snapshot after a gate ran.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Pending {
    /// Nothing changed that the snapshot would record.
    Nothing,
    /// Something changed, but CI is set: say so, write nothing.
    NotUnderCi,
    /// Write the observed snapshot as a `.snap.new` beside the accepted one.
    Write,
}

/// The pending-snapshot policy, as insta's: when the accepted snapshot is `missing` or the
/// observed one `changed`, write a `.snap.new` for review, except under CI.
pub fn pending_action(missing: bool, changed: bool, ci: bool) -> Pending {
    match (missing || changed, ci) {
        (false, _) => Pending::Nothing,
        (true, true) => Pending::NotUnderCi,
        (true, false) => Pending::Write,
    }
}

/// True when the `CI` environment variable is set (to anything but empty or `false`).
pub fn in_ci() -> bool {
    std::env::var("CI").is_ok_and(|v| !v.is_empty() && v != "false" && v != "0")
}

#[cfg(test)]
mod tests {
    use super::*;

    /// As insta: a missing or changed snapshot is written for review, never under CI.
    #[test]
    fn pending_snapshots_follow_insta() {
        assert_eq!(pending_action(false, false, false), Pending::Nothing);
        assert_eq!(pending_action(false, false, true), Pending::Nothing);
        assert_eq!(pending_action(true, false, false), Pending::Write);
        assert_eq!(pending_action(false, true, false), Pending::Write);
        assert_eq!(pending_action(true, true, true), Pending::NotUnderCi);
        assert_eq!(pending_action(false, true, true), Pending::NotUnderCi);
    }
}
