//! The support table: per adapter and op (rows), per backend/device and dtype (columns), does the
//! native path work, does only PEFT's upcast path work, or neither. Pure functions of a report.

use crate::case::{Adapter, Backend, DType, Device, Op, Precision};
use crate::expect::{CaseExpectation, Expected};
use crate::gate::Verdict;
use crate::judge::OutcomeKind;
use crate::render::plural;
use crate::report::{CaseReport, Report};
use comfy_table::{presets, Cell, CellAlignment, Color, ContentArrangement, Table};
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

    fn color(&self) -> Color {
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
fn unexpected_pass(c: &CaseReport) -> bool {
    c.expected
        .as_ref()
        .is_some_and(|e| e.status == crate::expect::Status::UnexpectedPass)
}

fn expectation_mark(failed: &[&CaseReport]) -> Mark {
    let declared: Option<Vec<_>> = failed.iter().map(|c| c.expected_failure()).collect();
    match declared {
        None => Mark::Unexpected,
        Some(es) if es.iter().any(|e| e.outcome == Expected::Flaky) => Mark::Flaky,
        Some(_) => Mark::Expected,
    }
}

/// Worst first: a crash hides less than a mismatch.
pub(crate) fn severity(k: OutcomeKind) -> u8 {
    match k {
        OutcomeKind::Timeout => 6,
        OutcomeKind::Crashed => 5,
        OutcomeKind::Unsupported => 4,
        OutcomeKind::Nonfinite => 3,
        OutcomeKind::Mismatch => 2,
        OutcomeKind::Skipped => 1,
        OutcomeKind::Pass => 0,
    }
}

fn verdict(cases: &[&CaseReport]) -> CellVerdict {
    let ran = cases.iter().filter(|c| c.outcome != OutcomeKind::Skipped);
    let path = |p: Precision| -> Vec<&CaseReport> {
        ran.clone().filter(|c| c.precision == p).copied().collect()
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
        .max_by_key(|k| severity(*k))
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

    /// `sep` separates a cell's lines: a line break in a terminal, a space in Markdown.
    fn table(&self, color: bool, sep: &str) -> Table {
        self.table_of(&self.columns, color, sep)
    }

    /// The table of some of the columns.
    fn table_of(&self, columns: &[(Backend, Device, Vec<DType>)], color: bool, sep: &str) -> Table {
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

fn summary_line(report: &Report) -> String {
    let expected = |k: OutcomeKind| {
        report
            .cases
            .iter()
            .filter(|c| c.outcome == k && c.expected_failure().is_some())
            .count()
    };
    let parts: Vec<String> = report
        .summary
        .outcomes
        .iter()
        .filter(|(_, n)| **n > 0)
        .map(|(k, n)| match expected(*k) {
            0 => format!("{n} {k}"),
            e => format!("{n} {k} ({e} expected)"),
        })
        .collect();
    format!(
        "{}: {} ({:.1}s)",
        plural(report.summary.total, "case"),
        parts.join(", "),
        report.summary.elapsed_s
    )
}

/// A failing case worth a person's attention.
pub struct Finding {
    pub id: String,
    pub kind: OutcomeKind,
    /// One line: the error, or the worst output's error against its tolerance.
    pub detail: String,
    /// The matrix rule (`file:line`) that expects this failure, if one does.
    pub expected_by: Option<String>,
}

/// Failing cases, unexpected ones first, then worst first.
pub fn findings(report: &Report) -> Vec<Finding> {
    let mut v: Vec<Finding> = report
        .cases
        .iter()
        .filter(|c| c.outcome.is_failure())
        .map(|c| Finding {
            id: c.id.clone(),
            kind: c.outcome,
            detail: c.failure_detail(),
            expected_by: c.expected_failure().map(|e| e.rule.clone()),
        })
        .collect();
    v.sort_by_key(|f| {
        (
            f.expected_by.is_some(),
            std::cmp::Reverse(severity(f.kind)),
            f.id.clone(),
        )
    });
    v
}

/// Lines under the table: groups skipped whole, expected failures by rule, rules inactive here.
fn notes(report: &Report, grid: &Grid) -> Vec<String> {
    let mut out = Vec::new();
    for (b, d, n, reasons) in &grid.skipped {
        out.push(format!(
            "skipped: {} {d} ({}): {}",
            grid.labels[b],
            plural(*n, "case"),
            reasons.join("; ")
        ));
    }
    // Cases skipped inside groups that ran (e.g. a shape the resource guard refused): by reason.
    let whole: Vec<(Backend, Device)> = grid.skipped.iter().map(|s| (s.0, s.1)).collect();
    let mut partial: BTreeMap<&str, Vec<&str>> = BTreeMap::new();
    for c in report
        .cases
        .iter()
        .filter(|c| c.outcome == OutcomeKind::Skipped && !whole.contains(&(c.backend, c.device)))
    {
        partial
            .entry(c.error.as_deref().unwrap_or(""))
            .or_default()
            .push(&c.id);
    }
    for (reason, ids) in partial {
        let more = if ids.len() > 1 { ", ..." } else { "" };
        out.push(format!(
            "skipped: {} ({}{more}): {reason}",
            plural(ids.len(), "case"),
            ids[0]
        ));
    }
    let mut by_rule: BTreeMap<&str, (usize, &CaseExpectation)> = BTreeMap::new();
    for e in report.cases.iter().filter_map(CaseReport::expected_failure) {
        by_rule.entry(e.rule.as_str()).or_insert((0, e)).0 += 1;
    }
    for (rule, (n, e)) in by_rule {
        out.push(format!(
            "expected {}, {} ({rule}): {}",
            e.outcome,
            plural(n, "case"),
            e.reason
        ));
    }
    // Declared failures that passed: the rule to edit, as the gate would name it.
    let mut surprised: BTreeMap<&str, (usize, &CaseExpectation)> = BTreeMap::new();
    for c in report.cases.iter().filter(|c| unexpected_pass(c)) {
        let e = c
            .expected
            .as_ref()
            .expect("unexpected_pass has an expectation");
        surprised.entry(e.rule.as_str()).or_insert((0, e)).0 += 1;
    }
    for (rule, (n, e)) in surprised {
        out.push(format!(
            "unexpected pass, {} ({rule}): the rule expects {}: {}; narrow or remove it",
            plural(n, "case"),
            e.outcome,
            e.reason
        ));
    }
    for r in &report.inactive_expectations {
        out.push(format!(
            "inactive here ({}): {} expect {}: {}",
            r.unmet.join("; "),
            r.rule,
            r.expect,
            r.reason
        ));
    }
    out
}

fn findings_title(f: &[Finding]) -> String {
    let expected = f.iter().filter(|f| f.expected_by.is_some()).count();
    match expected {
        0 => format!("{}", f.len()),
        n => format!("{}, {n} of them expected", f.len()),
    }
}

/// The table, legend, notes, findings and summary for a terminal.
pub fn render_text(report: &Report, color: bool, max_findings: usize) -> String {
    let grid = Grid::new(report);
    let mut out = String::new();
    let render = |t: &mut Table| {
        t.load_preset(presets::UTF8_FULL_CONDENSED);
        if !color {
            t.force_no_tty();
        } else {
            t.enforce_styling();
        }
        t.to_string()
    };
    if super::paths::is_extended(report) {
        out.push_str(&super::paths::render(report, false, color, &|t| render(t)));
    } else {
        if !grid.columns.is_empty() {
            let whole = render(&mut grid.table(color, "\n"));
            let width = whole.lines().next().map_or(0, |l| l.chars().count());
            if width <= MAX_WIDTH {
                out.push_str(&whole);
                out.push('\n');
            } else {
                // Too wide to read at a glance: one table per backend build, each with the rows.
                let mut builds: Vec<Backend> = grid.columns.iter().map(|c| c.0).collect();
                builds.dedup();
                for b in builds {
                    let cols: Vec<_> = grid.columns.iter().filter(|c| c.0 == b).cloned().collect();
                    out.push_str(&render(&mut grid.table_of(&cols, color, "\n")));
                    out.push('\n');
                }
            }
        }
        for (sym, meaning) in LEGEND {
            out.push_str(&format!("  {sym:<17} {meaning}\n"));
        }
    }
    for line in notes(report, &grid) {
        out.push_str(&line);
        out.push('\n');
    }
    let f = findings(report);
    if !f.is_empty() {
        out.push_str(&format!("\nfindings ({}):\n", findings_title(&f)));
        for x in f.iter().take(max_findings) {
            let tag = if x.expected_by.is_some() {
                " [expected]"
            } else {
                ""
            };
            out.push_str(&format!("  {}: {}{tag}: {}\n", x.id, x.kind, x.detail));
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

/// The same table in GitHub-flavoured Markdown, for docs and CI job summaries; with `gate`
/// (the verdict and the matrix path), the gate's verdict comes first.
pub fn render_markdown(report: &Report, gate: Option<(&Verdict, &str)>) -> String {
    let grid = Grid::new(report);
    let mut out = format!("## peft-compat: {}\n\n", report.matrix);
    if let Some((verdict, matrix)) = gate {
        out.push_str(&verdict.render_markdown(matrix));
        out.push_str("\n### Support table\n\n");
    }
    let env = &report.environment;
    out.push_str(&format!(
        "peft-compat {} · {} · {} · {}\n\n",
        env.peft_compat,
        env.libraries_line(),
        env.cpu_model,
        env.os
    ));
    let markdown = |t: &mut Table| {
        t.load_preset(presets::ASCII_MARKDOWN);
        t.force_no_tty();
        t.to_string()
    };
    if super::paths::is_extended(report) {
        out.push_str(&super::paths::render(report, true, false, &markdown));
    } else {
        if !grid.columns.is_empty() {
            // Markdown table cells cannot hold line breaks.
            out.push_str(&markdown(&mut grid.table(false, " ")));
            out.push_str("\n\n");
        }
        for (sym, meaning) in LEGEND {
            out.push_str(&format!("- `{sym}`: {meaning}\n"));
        }
    }
    for line in notes(report, &grid) {
        out.push_str(&format!("- {line}\n"));
    }
    let f = findings(report);
    if !f.is_empty() {
        out.push_str(&format!(
            "\n### Findings ({})\n\n| case | outcome | detail |\n|---|---|---|\n",
            findings_title(&f)
        ));
        for x in &f {
            let kind = match &x.expected_by {
                Some(rule) => format!("{} (expected, {rule})", x.kind),
                None => x.kind.to_string(),
            };
            out.push_str(&format!(
                "| `{}` | {kind} | {} |\n",
                x.id,
                x.detail.replace('|', "\\|")
            ));
        }
    }
    out.push_str(&format!("\n{}\n", summary_line(report)));
    out
}
