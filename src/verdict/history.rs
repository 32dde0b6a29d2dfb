//! `peft-compat history`: the same cells across builds of one library in version order, like
//! `git bisect` naming the commit: for each cell (device, dtype, adapter, op, precision, shape,
//! layer, profile), each build's outcome, and the first release where the outcome, the error
//! class or the error beyond its noise changed.
//!
//! Two series: the libtorch builds (`tch`, `tch@X.Y.Z`, by libtorch version) and the PEFT builds
//! (`peft@X+torchY`, by PEFT release, then torch). candle has one build and no series. The
//! reports may be one sweep or several runs; a cell run twice by one build keeps the first.
//!
//! "Beyond its noise": the worst output's error in units of roundoff moves by more than a
//! factor of 2 and by more than 2 u (a GEMM that sums in another order moves it by about 1 u).

use super::snapshot::error_class;
use crate::case::{Backend, Coords, Point, Version};
use crate::outcome::OutcomeKind;
use crate::report::{CaseReport, Report};
use serde::Serialize;
use std::collections::BTreeMap;

/// Where a cell sits: a case without its backend.
#[derive(Debug, Clone, PartialEq, Eq, PartialOrd, Ord, Serialize)]
pub struct Cell {
    /// The case id with the backend left out: `cpu/f16/dora/init/native/small`.
    pub id: String,
}

/// One build's observation of a cell.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Seen {
    pub outcome: OutcomeKind,
    /// The worst output's error in units of roundoff (cases that produced outputs).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub max_u: Option<f64>,
    /// The error's first line (failures that carry one).
    #[serde(skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

/// A change between two consecutive builds that ran the cell.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Change {
    /// The build where it changed (its version, as the columns name it).
    pub at: String,
    /// `unsupported -> pass`, `another error: ...`, or `3.0 u -> 12.5 u`.
    pub what: String,
}

#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Row {
    pub cell: String,
    /// One entry per column; `None`: the build did not run the cell (absent or skipped).
    pub seen: Vec<Option<Seen>>,
    pub changes: Vec<Change>,
}

/// One series: its builds in version order and its rows.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct Series {
    /// `libtorch` or `peft`.
    pub library: String,
    /// The column names: versions (`2.1.2`, ...; a PEFT build `0.10.0+torch2.1.2`).
    pub columns: Vec<String>,
    /// The backend spelling of each column (`tch@2.1.2`, `tch`, `peft@0.10.0+torch2.1.2`).
    pub backends: Vec<String>,
    pub rows: Vec<Row>,
}

/// The histories of the reports, with what made them.
#[derive(Debug, Clone, PartialEq, Serialize)]
pub struct History {
    pub schema: &'static str,
    pub reports: Vec<String>,
    pub series: Vec<Series>,
    /// Problems with comparing these reports (another seed or matrix).
    pub warnings: Vec<String>,
}

fn cell_id(c: &CaseReport) -> String {
    let id = crate::case::case_id(&Coords {
        point: Point {
            backend: Backend::Candle,
            ..c.point
        },
        shape: &c.shape,
    });
    id.split_once('/')
        .map_or(id.clone(), |(_, rest)| rest.to_string())
}

/// What a case shows of itself across builds: `None` when it did not run.
pub fn seen(c: &CaseReport) -> Option<Seen> {
    (c.outcome != OutcomeKind::Skipped).then(|| Seen {
        outcome: c.outcome,
        max_u: c.metrics.as_ref().and_then(|m| {
            m.outputs
                .iter()
                .map(|o| o.err_units)
                .filter(|u| u.is_finite())
                .reduce(f64::max)
        }),
        error: c
            .error
            .as_deref()
            .map(|e| e.lines().next().unwrap_or("").to_string()),
    })
}

/// What changed from `a` to `b`, if anything did: the outcome, the error's class, or its size
/// beyond its noise.
pub fn change(a: &Seen, b: &Seen) -> Option<String> {
    if a.outcome != b.outcome {
        return Some(format!("{} -> {}", a.outcome, b.outcome));
    }
    let class = |s: &Seen| s.error.as_deref().map(error_class);
    if class(a) != class(b) {
        return Some(format!(
            "{}: another error: {}",
            b.outcome,
            b.error.as_deref().unwrap_or("")
        ));
    }
    match (a.max_u, b.max_u) {
        (Some(x), Some(y)) if (x - y).abs() > 2.0 && (x.max(y) > 2.0 * x.min(y)) => {
            Some(format!("{x:.1} u -> {y:.1} u"))
        }
        _ => None,
    }
}

/// Where a build sorts within its series: (libtorch, -) or (PEFT, torch).
type Order = (Version, Version);

/// The series of a backend, its place in it and its column name; `None` for a build with no
/// series (candle).
fn placed(b: Backend) -> Option<(&'static str, Order, String)> {
    match b {
        Backend::Tch | Backend::TchAt(_) => {
            let v = b.libtorch()?;
            Some(("libtorch", (v, Version::new(0, 0, 0)), v.to_string()))
        }
        Backend::Peft(p) => Some((
            "peft",
            (p.peft, p.torch),
            format!("{}+torch{}", p.peft, p.torch),
        )),
        Backend::Candle => None,
    }
}

/// The history of `reports` (named by `names`).
pub fn history(reports: &[Report], names: &[String]) -> History {
    type Key = Order;
    // series -> column key -> (name, backend) ; series -> cell -> column key -> seen
    let mut columns: BTreeMap<&str, BTreeMap<Key, (String, Backend)>> = BTreeMap::new();
    let mut cells: BTreeMap<&str, BTreeMap<String, BTreeMap<Key, Option<Seen>>>> = BTreeMap::new();
    for r in reports {
        for c in &r.cases {
            let Some((series, key, name)) = placed(c.point.backend) else {
                continue;
            };
            columns
                .entry(series)
                .or_default()
                .entry(key)
                .or_insert((name, c.point.backend));
            cells
                .entry(series)
                .or_default()
                .entry(cell_id(c))
                .or_default()
                .entry(key)
                .or_insert_with(|| seen(c));
        }
    }
    let mut series = Vec::new();
    for (library, cols) in &columns {
        let keys: Vec<&Key> = cols.keys().collect();
        let rows = cells[library]
            .iter()
            .map(|(cell, by)| {
                let seen: Vec<Option<Seen>> =
                    keys.iter().map(|k| by.get(*k).cloned().flatten()).collect();
                let mut changes = Vec::new();
                let mut last: Option<&Seen> = None;
                for (i, s) in seen.iter().enumerate() {
                    let Some(s) = s else { continue };
                    if let Some(what) = last.and_then(|l| change(l, s)) {
                        changes.push(Change {
                            at: cols[keys[i]].0.clone(),
                            what,
                        });
                    }
                    last = Some(s);
                }
                Row {
                    cell: cell.clone(),
                    seen,
                    changes,
                }
            })
            .collect();
        series.push(Series {
            library: library.to_string(),
            columns: cols.values().map(|c| c.0.clone()).collect(),
            backends: cols.values().map(|c| c.1.to_string()).collect(),
            rows,
        });
    }
    History {
        schema: "peft-compat/history/v1",
        reports: names.to_vec(),
        series,
        warnings: super::compare::comparability(reports, names),
    }
}

impl Row {
    /// The last column's text: each change with the build where it happened, or that nothing
    /// changed between the first and last builds that ran the cell.
    pub fn summary(&self, columns: &[String]) -> String {
        if !self.changes.is_empty() {
            return self
                .changes
                .iter()
                .map(|c| format!("{}: {}", c.at, c.what))
                .collect::<Vec<_>>()
                .join("; ");
        }
        let ran: Vec<&String> = self
            .seen
            .iter()
            .zip(columns)
            .filter_map(|(s, c)| s.as_ref().map(|_| c))
            .collect();
        match ran.as_slice() {
            [] => "not run".into(),
            [one] => format!("only {one}"),
            [first, .., last] => format!("unchanged {first} -> {last}"),
        }
    }
}
