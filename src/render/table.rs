//! The support table: per adapter and op (rows), per backend/device and dtype (columns), does the
//! native path work, does only PEFT's upcast path work, or neither. Pure functions of a report.

use crate::case::{Adapter, Backend, DType, Device, Op, Precision};
use crate::judge::OutcomeKind;
use crate::report::{CaseReport, Report};
use comfy_table::{presets, Cell, CellAlignment, Color, ContentArrangement, Table};
use std::collections::BTreeMap;

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
    },
    /// Every case of the cell skipped.
    Skipped,
}

impl CellVerdict {
    fn text(&self) -> String {
        match self {
            CellVerdict::Native => "✓".into(),
            CellVerdict::UpcastOnly => "↑ upcast".into(),
            CellVerdict::Fails { kind, failed, of } if failed < of => {
                format!("✗ {kind} {failed}/{of}")
            }
            CellVerdict::Fails { kind, .. } => format!("✗ {kind}"),
            CellVerdict::Skipped => "–".into(),
        }
    }

    fn color(&self) -> Color {
        match self {
            CellVerdict::Native => Color::Green,
            CellVerdict::UpcastOnly => Color::Yellow,
            CellVerdict::Fails { .. } => Color::Red,
            CellVerdict::Skipped => Color::DarkGrey,
        }
    }
}

/// Worst first: a crash hides less than a mismatch.
fn severity(k: OutcomeKind) -> u8 {
    match k {
        OutcomeKind::Crashed => 5,
        OutcomeKind::Unsupported => 4,
        OutcomeKind::Nonfinite => 3,
        OutcomeKind::Mismatch => 2,
        OutcomeKind::Skipped => 1,
        OutcomeKind::Pass => 0,
    }
}

fn verdict(cases: &[&CaseReport]) -> CellVerdict {
    let ran: Vec<&&CaseReport> = cases
        .iter()
        .filter(|c| c.outcome != OutcomeKind::Skipped)
        .collect();
    if ran.is_empty() {
        return CellVerdict::Skipped;
    }
    let path =
        |p: Precision| -> Vec<&&&CaseReport> { ran.iter().filter(|c| c.precision == p).collect() };
    let (native, upcast) = (path(Precision::Native), path(Precision::Upcast));
    let all_pass = |v: &[&&&CaseReport]| !v.is_empty() && v.iter().all(|c| c.outcome.is_pass());
    if all_pass(&native) {
        return CellVerdict::Native;
    }
    if all_pass(&upcast) {
        return CellVerdict::UpcastOnly;
    }
    let judged = if native.is_empty() { &upcast } else { &native };
    let failed: Vec<_> = judged.iter().filter(|c| !c.outcome.is_pass()).collect();
    let kind = failed
        .iter()
        .map(|c| c.outcome)
        .max_by_key(|k| severity(*k))
        .unwrap_or(OutcomeKind::Mismatch);
    CellVerdict::Fails {
        kind,
        failed: failed.len(),
        of: judged.len(),
    }
}

/// The grid behind the table: which columns run here, which were skipped whole, and cells.
pub struct Grid {
    /// (backend, device) groups with at least one case that ran, with their dtypes.
    pub columns: Vec<(Backend, Device, Vec<DType>)>,
    /// (backend, device) groups where every case skipped, with the reason(s).
    pub skipped: Vec<(Backend, Device, usize, Vec<String>)>,
    pub rows: Vec<(Adapter, Op)>,
    pub cells: BTreeMap<(Adapter, Op, Backend, Device, DType), CellVerdict>,
}

impl Grid {
    pub fn new(report: &Report) -> Grid {
        let mut groups: BTreeMap<(Backend, Device), Vec<&CaseReport>> = BTreeMap::new();
        let mut by_cell: BTreeMap<(Adapter, Op, Backend, Device, DType), Vec<&CaseReport>> =
            BTreeMap::new();
        for c in &report.cases {
            groups.entry((c.backend, c.device)).or_default().push(c);
            by_cell
                .entry((c.adapter, c.op, c.backend, c.device, c.dtype))
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
                let mut dtypes: Vec<DType> = cases.iter().map(|c| c.dtype).collect();
                dtypes.sort();
                dtypes.dedup();
                columns.push((*b, *d, dtypes));
            }
        }
        let mut rows: Vec<(Adapter, Op)> = report.cases.iter().map(|c| (c.adapter, c.op)).collect();
        rows.sort();
        rows.dedup();
        let cells = by_cell.into_iter().map(|(k, v)| (k, verdict(&v))).collect();
        Grid {
            columns,
            skipped,
            rows,
            cells,
        }
    }

    fn table(&self, color: bool, header_sep: &str) -> Table {
        let mut t = Table::new();
        t.set_content_arrangement(ContentArrangement::Disabled);
        let mut header = vec![Cell::new("adapter / op")];
        for (b, d, dtypes) in &self.columns {
            for dt in dtypes {
                header.push(
                    Cell::new(format!("{b} {d}{header_sep}{dt}"))
                        .set_alignment(CellAlignment::Center),
                );
            }
        }
        t.set_header(header);
        for (a, op) in &self.rows {
            let mut row = vec![Cell::new(format!("{a} {op}"))];
            for (b, d, dtypes) in &self.columns {
                for dt in dtypes {
                    let cell = match self.cells.get(&(*a, *op, *b, *d, *dt)) {
                        Some(v) => {
                            let c = Cell::new(v.text()).set_alignment(CellAlignment::Center);
                            if color {
                                c.fg(v.color())
                            } else {
                                c
                            }
                        }
                        None => Cell::new(""),
                    };
                    row.push(cell);
                }
            }
            t.add_row(row);
        }
        t
    }
}

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
    ("–", "skipped here (see below)"),
    ("blank", "not in the matrix"),
];

fn summary_line(report: &Report) -> String {
    let parts: Vec<String> = report
        .summary
        .outcomes
        .iter()
        .filter(|(_, n)| **n > 0)
        .map(|(k, n)| format!("{n} {k}"))
        .collect();
    format!(
        "{} cases: {} ({:.1}s)",
        report.summary.total,
        parts.join(", "),
        report.summary.elapsed_s
    )
}

/// Failing cases worth a person's attention, worst first: (id, outcome, one-line detail).
pub fn findings(report: &Report) -> Vec<(String, OutcomeKind, String)> {
    let mut v: Vec<(String, OutcomeKind, String)> = report
        .cases
        .iter()
        .filter(|c| c.outcome.is_failure())
        .map(|c| {
            let detail = match (&c.error, &c.metrics) {
                (Some(e), _) => e.lines().next().unwrap_or("").to_string(),
                (None, Some(m)) => {
                    let worst = m.outputs.iter().find(|o| o.name == m.worst_output);
                    let units = worst.map_or(String::new(), |o| format!(" ({:.0} u)", o.err_units));
                    format!(
                        "{}: max_rel_err {:.2e}{units} > tolerance {:.2e}",
                        m.worst_output, m.max_rel_err, m.tolerance
                    )
                }
                (None, None) => String::new(),
            };
            (c.id.clone(), c.outcome, detail)
        })
        .collect();
    v.sort_by_key(|(id, k, _)| (std::cmp::Reverse(severity(*k)), id.clone()));
    v
}

/// The table, legend, skipped groups, findings and summary for a terminal.
pub fn render_text(report: &Report, color: bool, max_findings: usize) -> String {
    let grid = Grid::new(report);
    let mut out = String::new();
    if !grid.columns.is_empty() {
        let mut t = grid.table(color, "\n");
        t.load_preset(presets::UTF8_FULL_CONDENSED);
        if !color {
            t.force_no_tty();
        } else {
            t.enforce_styling();
        }
        out.push_str(&t.to_string());
        out.push('\n');
    }
    for (sym, meaning) in LEGEND {
        out.push_str(&format!("  {sym:<9} {meaning}\n"));
    }
    for (b, d, n, reasons) in &grid.skipped {
        out.push_str(&format!(
            "skipped: {b} {d} ({n} cases): {}\n",
            reasons.join("; ")
        ));
    }
    let f = findings(report);
    if !f.is_empty() {
        out.push_str(&format!("\nfindings ({}):\n", f.len()));
        for (id, kind, detail) in f.iter().take(max_findings) {
            out.push_str(&format!("  {id}: {kind}: {detail}\n"));
        }
        if f.len() > max_findings {
            out.push_str(&format!(
                "  ... {} more (write them all with --json PATH)\n",
                f.len() - max_findings
            ));
        }
    }
    out.push('\n');
    out.push_str(&summary_line(report));
    out.push('\n');
    out
}

/// The same table in GitHub-flavoured Markdown, for docs and CI job summaries.
pub fn render_markdown(report: &Report) -> String {
    let grid = Grid::new(report);
    let mut out = format!("## peft-compat: {}\n\n", report.matrix);
    let env = &report.environment;
    let libs: Vec<String> = env
        .libraries
        .iter()
        .map(|(k, v)| format!("{k} {v}"))
        .collect();
    out.push_str(&format!(
        "peft-compat {} · {} · {} · {}\n\n",
        env.peft_compat,
        libs.join(" · "),
        env.cpu_model,
        env.os
    ));
    if !grid.columns.is_empty() {
        // Markdown table cells cannot hold line breaks.
        let mut t = grid.table(false, " ");
        t.load_preset(presets::ASCII_MARKDOWN);
        t.force_no_tty();
        out.push_str(&t.to_string());
        out.push_str("\n\n");
    }
    for (sym, meaning) in LEGEND {
        out.push_str(&format!("- `{sym}`: {meaning}\n"));
    }
    for (b, d, n, reasons) in &grid.skipped {
        out.push_str(&format!(
            "- skipped: {b} {d} ({n} cases): {}\n",
            reasons.join("; ")
        ));
    }
    let f = findings(report);
    if !f.is_empty() {
        out.push_str(&format!(
            "\n### Findings ({})\n\n| case | outcome | detail |\n|---|---|---|\n",
            f.len()
        ));
        for (id, kind, detail) in &f {
            out.push_str(&format!(
                "| `{id}` | {kind} | {} |\n",
                detail.replace('|', "\\|")
            ));
        }
    }
    out.push_str(&format!("\n{}\n", summary_line(report)));
    out
}
