//! The two-path support grid: per adapter and op (rows), per backend/device and dtype (columns),
//! does the native path work, does only PEFT's upcast path work, or neither. Pure functions of
//! a report; `render` composes it into the document and `render::compare` reuses its cells.

use super::sheet::{CaseRef, Sheet, SheetCell, Tone};
use crate::case::{Adapter, Backend, DType, Device, Op, Precision};
use crate::outcome::OutcomeKind;
use crate::report::{CaseReport, Report, Status};
use crate::spec::rules::Expected;
use comfy_table::{Cell, CellAlignment, Color, ContentArrangement, Table};
use std::collections::{BTreeMap, BTreeSet};

/// The verdict of one table cell, aggregated over shapes.
#[derive(Debug, Clone, PartialEq)]
pub enum CellVerdict {
    /// Native passes on every shape.
    Native,
    /// Native fails somewhere, the upcast path passes everywhere.
    UpcastOnly,
    /// Neither path passes everywhere; the worst native (or upcast) failure and how many of the
    /// cell's cases on that path failed.
    Fails {
        kind: OutcomeKind,
        failed: usize,
        of: usize,
        mark: Mark,
    },
    /// Every case of the cell skipped.
    Skipped,
}

/// Whether a failing cell's failures are all declared by the matrix's expectations.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Mark {
    /// At least one failure has no expectation that explains it.
    Unexpected,
    /// Every failure is an expected one.
    Expected,
    /// Every failure is explained, at least one by a `flaky` rule.
    Flaky,
}

impl CellVerdict {
    /// `sep` goes before an expectation mark: a line break in a terminal, a space in Markdown.
    pub fn text(&self, sep: &str) -> String {
        match self {
            CellVerdict::Native => "✓".into(),
            CellVerdict::UpcastOnly => "↑ upcast".into(),
            CellVerdict::Fails {
                kind,
                failed,
                of,
                mark,
            } => {
                let count = if failed < of {
                    format!(" {failed}/{of}")
                } else {
                    String::new()
                };
                let suffix = match mark {
                    Mark::Unexpected => String::new(),
                    Mark::Expected => format!("{sep}(expected)"),
                    Mark::Flaky => format!("{sep}(flaky)"),
                };
                format!("✗ {kind}{count}{suffix}")
            }
            CellVerdict::Skipped => "–".into(),
        }
    }

    pub(crate) fn color(&self) -> Color {
        match self {
            CellVerdict::Native => Color::Green,
            CellVerdict::UpcastOnly => Color::Yellow,
            CellVerdict::Fails {
                mark: Mark::Unexpected,
                ..
            } => Color::Red,
            CellVerdict::Fails { .. } => Color::Magenta,
            CellVerdict::Skipped => Color::DarkGrey,
        }
    }
}

/// A case that passed where its matrix rule declares a failure.
pub fn unexpected_pass(c: &CaseReport) -> bool {
    c.expected
        .as_ref()
        .is_some_and(|e| e.status == Status::UnexpectedPass)
}

fn expectation_mark(failed: &[&CaseReport]) -> Mark {
    let declared: Option<Vec<_>> = failed.iter().map(|c| c.expected_failure()).collect();
    match declared {
        None => Mark::Unexpected,
        Some(es) if es.iter().any(|e| e.outcome == Expected::Flaky) => Mark::Flaky,
        Some(_) => Mark::Expected,
    }
}

fn verdict(cases: &[&CaseReport]) -> CellVerdict {
    let ran = cases.iter().filter(|c| c.outcome != OutcomeKind::Skipped);
    let path = |p: Precision| -> Vec<&CaseReport> {
        ran.clone()
            .filter(|c| c.point.precision == p)
            .copied()
            .collect()
    };
    let (native, upcast) = (path(Precision::Native), path(Precision::Upcast));
    // Autocast cases (only `compare` puts them in this two-path grid): a cell whose autocast
    // cases fail is never shown as working.
    let autocast = path(Precision::Autocast);
    if native.is_empty() && upcast.is_empty() && autocast.is_empty() {
        return CellVerdict::Skipped;
    }
    let all_pass = |v: &[&CaseReport]| !v.is_empty() && v.iter().all(|c| c.outcome.is_pass());
    let autocast_ok = autocast.iter().all(|c| c.outcome.is_pass());
    if all_pass(&native) && autocast_ok {
        return CellVerdict::Native;
    }
    if all_pass(&upcast) && autocast_ok {
        return CellVerdict::UpcastOnly;
    }
    let judged = match (native.is_empty(), upcast.is_empty()) {
        (false, _) if !all_pass(&native) => &native,
        (_, false) if !all_pass(&upcast) => &upcast,
        _ => &autocast,
    };
    let failed: Vec<&CaseReport> = judged
        .iter()
        .filter(|c| !c.outcome.is_pass())
        .copied()
        .collect();
    let kind = failed
        .iter()
        .map(|c| c.outcome)
        .max_by_key(|k| k.severity())
        .unwrap_or(OutcomeKind::Mismatch);
    CellVerdict::Fails {
        kind,
        failed: failed.len(),
        of: judged.len(),
        mark: expectation_mark(&failed),
    }
}

/// A backend build as headers name it: a libtorch build by its libtorch version (`tch 2.1.2`,
/// `tch 2.11.0`), so two builds read apart at a glance; other backends by name.
pub fn backend_label(report: &Report, b: Backend) -> String {
    if b.family() != Backend::Tch {
        return b.to_string();
    }
    if let Backend::TchAt(v) = b {
        // Built for exactly this release (a build that never started has no environment).
        return format!("tch {v}");
    }
    let env = report.environment.for_backend(b);
    match env.libraries.get("libtorch") {
        Some(v) if !v.is_empty() && v != "unknown" => {
            format!("tch {}", v.split('+').next().unwrap_or(v))
        }
        _ => b.to_string(),
    }
}

/// The grid behind the table: which columns run here, which were skipped whole, and cells.
pub struct Grid {
    /// How each backend build is named in headers: `tch 2.11.0`, `tch 2.1.2`, `candle`.
    pub labels: BTreeMap<Backend, String>,
    /// (backend, device) groups with at least one case that ran, with their dtypes.
    pub columns: Vec<(Backend, Device, Vec<DType>)>,
    /// (backend, device) groups where every case skipped, with the reason(s).
    pub skipped: Vec<(Backend, Device, usize, Vec<String>)>,
    pub rows: Vec<(Adapter, Op)>,
    pub cells: BTreeMap<(Adapter, Op, Backend, Device, DType), CellVerdict>,
    /// Cells where a case passed although a matrix rule declares a failure for it.
    pub surprises: BTreeSet<(Adapter, Op, Backend, Device, DType)>,
}

impl Grid {
    pub fn new(report: &Report) -> Grid {
        let mut groups: BTreeMap<(Backend, Device), Vec<&CaseReport>> = BTreeMap::new();
        let mut by_cell: BTreeMap<(Adapter, Op, Backend, Device, DType), Vec<&CaseReport>> =
            BTreeMap::new();
        for c in &report.cases {
            groups
                .entry((c.point.backend, c.point.device))
                .or_default()
                .push(c);
            by_cell
                .entry((
                    c.point.adapter,
                    c.point.op,
                    c.point.backend,
                    c.point.device,
                    c.point.dtype,
                ))
                .or_default()
                .push(c);
        }
        let mut columns = Vec::new();
        let mut skipped = Vec::new();
        for ((b, d), cases) in &groups {
            if cases.iter().all(|c| c.outcome == OutcomeKind::Skipped) {
                let mut reasons: Vec<String> =
                    cases.iter().filter_map(|c| c.error.clone()).collect();
                reasons.sort();
                reasons.dedup();
                skipped.push((*b, *d, cases.len(), reasons));
            } else {
                let mut dtypes: Vec<DType> = cases.iter().map(|c| c.point.dtype).collect();
                dtypes.sort();
                dtypes.dedup();
                columns.push((*b, *d, dtypes));
            }
        }
        let mut rows: Vec<(Adapter, Op)> = report
            .cases
            .iter()
            .map(|c| (c.point.adapter, c.point.op))
            .collect();
        rows.sort();
        rows.dedup();
        let surprises = by_cell
            .iter()
            .filter(|(_, v)| v.iter().any(|c| unexpected_pass(c)))
            .map(|(k, _)| *k)
            .collect();
        let cells = by_cell.into_iter().map(|(k, v)| (k, verdict(&v))).collect();
        let labels = groups
            .keys()
            .map(|(b, _)| (*b, backend_label(report, *b)))
            .collect();
        Grid {
            labels,
            columns,
            skipped,
            rows,
            cells,
            surprises,
        }
    }

    /// A cell's text (`sep` between its lines), marked where a declared failure passed; `None`
    /// where the matrix has no such cell.
    pub fn cell_text(
        &self,
        key: &(Adapter, Op, Backend, Device, DType),
        sep: &str,
    ) -> Option<String> {
        let v = self.cells.get(key)?;
        let mut t = v.text(sep);
        if self.surprises.contains(key) {
            t.push_str(sep);
            t.push_str("(unexpected pass)");
        }
        Some(t)
    }

    /// The grid as a [`Sheet`] of `report` (the report it was made from, its index `r` among
    /// the reports a page shows): each cell's text as Markdown shows it and its cases.
    pub fn sheet(&self, report: &Report, r: usize) -> Sheet {
        type Key = (Adapter, Op, Backend, Device, DType);
        let mut cases: BTreeMap<Key, Vec<CaseRef>> = BTreeMap::new();
        for (i, c) in report.cases.iter().enumerate() {
            let p = c.point;
            cases
                .entry((p.adapter, p.op, p.backend, p.device, p.dtype))
                .or_default()
                .push((r, i));
        }
        let keys: Vec<(Backend, Device, DType)> = self
            .columns
            .iter()
            .flat_map(|(b, d, dtypes)| dtypes.iter().map(move |dt| (*b, *d, *dt)))
            .collect();
        let rows = self
            .rows
            .iter()
            .map(|(a, op)| {
                let cells = keys
                    .iter()
                    .map(|(b, d, dt)| {
                        let key = (*a, *op, *b, *d, *dt);
                        let v = self.cells.get(&key)?;
                        let tone = if self.surprises.contains(&key) {
                            Tone::Surprise
                        } else {
                            Tone::of_color(v.color())
                        };
                        Some(SheetCell {
                            text: self.cell_text(&key, " ")?,
                            tone,
                            cases: cases.remove(&key).unwrap_or_default(),
                        })
                    })
                    .collect();
                (format!("{a} {op}"), cells)
            })
            .collect();
        Sheet {
            title: "adapter and op by backend, device and dtype".into(),
            columns: keys
                .iter()
                .map(|(b, d, dt)| format!("{} {d} {dt}", self.labels[b]))
                .collect(),
            rows,
        }
    }

    /// `sep` separates a cell's lines: a line break in a terminal, a space in Markdown.
    pub fn table(&self, color: bool, sep: &str) -> Table {
        self.table_of(&self.columns, color, sep)
    }

    /// The table of some of the columns.
    pub fn table_of(
        &self,
        columns: &[(Backend, Device, Vec<DType>)],
        color: bool,
        sep: &str,
    ) -> Table {
        let mut t = Table::new();
        t.set_content_arrangement(ContentArrangement::Disabled);
        let mut header = vec![Cell::new("adapter / op")];
        for (b, d, dtypes) in columns {
            for dt in dtypes {
                header.push(
                    Cell::new(format!("{} {d}{sep}{dt}", self.labels[b]))
                        .set_alignment(CellAlignment::Center),
                );
            }
        }
        t.set_header(header);
        for (a, op) in &self.rows {
            let mut row = vec![Cell::new(format!("{a} {op}"))];
            for (b, d, dtypes) in columns {
                for dt in dtypes {
                    let key = (*a, *op, *b, *d, *dt);
                    let cell = match (self.cells.get(&key), self.cell_text(&key, sep)) {
                        (Some(v), Some(text)) => {
                            let c = Cell::new(text).set_alignment(CellAlignment::Center);
                            match (color, self.surprises.contains(&key)) {
                                (false, _) => c,
                                (true, true) => c.fg(Color::Cyan),
                                (true, false) => c.fg(v.color()),
                            }
                        }
                        _ => Cell::new(""),
                    };
                    row.push(cell);
                }
            }
            t.add_row(row);
        }
        t
    }
}

/// Wider than this, the terminal table is split into one table per backend build.
pub const MAX_WIDTH: usize = 132;

pub const LEGEND: &[(&str, &str)] = &[
    (
        "✓",
        "native works: every tensor and intermediate in the dtype passes, on every shape",
    ),
    ("↑ upcast", "only PEFT's fixed fp32 path passes"),
    (
        "✗ kind",
        "neither path passes (worst failure; n/m = failed/run when only some shapes fail)",
    ),
    (
        "(expected)",
        "every failure in the cell is one the matrix expects, for the reason listed below",
    ),
    (
        "(flaky)",
        "the matrix marks a failing case as flaky: it has both passed and failed",
    ),
    (
        "(unexpected pass)",
        "a case passed where a matrix rule declares a failure (the rule is named below)",
    ),
    ("–", "skipped here (see below)"),
    ("blank", "not in the matrix"),
];
