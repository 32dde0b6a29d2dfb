//! How a report reads: pure functions of a [`Report`] (and a gate [`Verdict`]).
//!
//! The document (the support tables, their legend, the notes under them, the findings and the
//! summary) is composed once by [`document`] for both flavours: a terminal (coloured or not,
//! tables kept narrow) and Markdown (for docs and CI job summaries). Its parts: [`grid`] (the
//! two-path support grid), [`paths`] (the three-path tables and figures of a matrix with
//! autocast, layers or profiles), [`gate`] (the gate's verdict), [`compare`] (reports side by
//! side), [`weights`] (a checkpoint's tensors), [`junit`] (JUnit XML) and [`progress`] (the bar or CI lines while a run goes).

pub mod agreement;
pub mod compare;
pub mod gate;
pub mod grid;
pub mod history;
pub mod html;
pub mod junit;
pub mod paths;
pub mod progress;
pub mod sheet;
pub mod weights;

use crate::case::{Backend, Device};
use crate::outcome::OutcomeKind;
use crate::report::{CaseExpectation, CaseReport, Report};
use crate::util::plural;
use crate::verdict::gate::Verdict;
use comfy_table::{presets, Table};
use grid::{unexpected_pass, Grid, LEGEND, MAX_WIDTH};
use std::collections::BTreeMap;

/// Where the document goes.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub enum Flavor {
    /// A terminal or a log: tables in box characters, kept narrow; coloured with `color`.
    Terminal { color: bool },
    /// GitHub-flavoured Markdown: one table per section, cells on one line.
    Markdown,
}

impl Flavor {
    fn markdown(self) -> bool {
        self == Flavor::Markdown
    }

    fn color(self) -> bool {
        matches!(self, Flavor::Terminal { color: true })
    }

    /// What separates a cell's lines: a line break, or a space where cells cannot hold one.
    fn sep(self) -> &'static str {
        if self.markdown() {
            " "
        } else {
            "\n"
        }
    }

    /// A table in this flavour's preset.
    fn style(self, t: &mut Table) -> String {
        match self {
            Flavor::Markdown => {
                t.load_preset(presets::ASCII_MARKDOWN);
                t.force_no_tty();
            }
            Flavor::Terminal { color } => {
                t.load_preset(presets::UTF8_FULL_CONDENSED);
                if color {
                    t.enforce_styling();
                } else {
                    t.force_no_tty();
                }
            }
        }
        t.to_string()
    }

    /// One entry of a legend: `  sym  meaning` or a Markdown list item.
    fn legend(self, sym: &str, meaning: &str) -> String {
        if self.markdown() {
            format!("- `{sym}`: {meaning}\n")
        } else {
            format!("  {sym:<17} {meaning}\n")
        }
    }

    /// A line under the tables.
    fn note(self, line: &str) -> String {
        if self.markdown() {
            format!("- {line}\n")
        } else {
            format!("{line}\n")
        }
    }
}

/// The table, legend, notes, findings and summary for a terminal.
pub fn render_text(report: &Report, color: bool, max_findings: usize) -> String {
    document(report, Flavor::Terminal { color }, None, max_findings)
}

/// The same in GitHub-flavoured Markdown, for docs and CI job summaries; with `gate` (the
/// verdict and the matrix path), the gate's verdict comes first. Every finding is listed.
pub fn render_markdown(report: &Report, gate: Option<(&Verdict, &str)>) -> String {
    document(report, Flavor::Markdown, gate, usize::MAX)
}

/// The whole document in one flavour: a Markdown heading, the gate's verdict and the
/// environment first; then the support tables and their legend, the notes, at most
/// `max_findings` findings, and the summary line.
pub fn document(
    report: &Report,
    flavor: Flavor,
    gate: Option<(&Verdict, &str)>,
    max_findings: usize,
) -> String {
    let grid = Grid::new(report);
    let mut out = String::new();
    if flavor.markdown() {
        out.push_str(&format!("## peft-compat: {}\n\n", report.matrix));
        if let Some((verdict, matrix)) = gate {
            out.push_str(&self::gate::markdown(verdict, matrix));
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
    }
    let style = |t: &mut Table| flavor.style(t);
    if paths::is_extended(report) {
        out.push_str(&paths::render(
            report,
            flavor.markdown(),
            flavor.color(),
            &style,
        ));
    } else {
        out.push_str(&grid_tables(&grid, flavor));
        for (sym, meaning) in LEGEND {
            out.push_str(&flavor.legend(sym, meaning));
        }
    }
    if let Some(t) = weights::tables(report, flavor.sep(), &style) {
        out.push_str(&t);
        out.push_str(if flavor.markdown() { "\n" } else { "" });
    }
    if let Some(t) = agreement::table(report, flavor.sep(), &style) {
        out.push_str(&flavor.note(agreement::NOTE));
        out.push_str(&t);
        out.push_str(if flavor.markdown() { "\n\n" } else { "\n" });
    }
    for line in notes(report, &grid) {
        out.push_str(&flavor.note(&line));
    }
    out.push_str(&findings_section(&findings(report), flavor, max_findings));
    out.push_str(&format!("\n{}\n", summary_line(report)));
    out
}

/// The two-path grid: whole, or on a terminal one table per backend build where the whole
/// would be too wide to read at a glance. Empty when nothing ran.
fn grid_tables(grid: &Grid, flavor: Flavor) -> String {
    if grid.columns.is_empty() {
        return String::new();
    }
    let whole = flavor.style(&mut grid.table(flavor.color(), flavor.sep()));
    if flavor.markdown() {
        return format!("{whole}\n\n");
    }
    let width = whole.lines().next().map_or(0, |l| l.chars().count());
    if width <= MAX_WIDTH {
        return format!("{whole}\n");
    }
    let mut builds: Vec<Backend> = grid.columns.iter().map(|c| c.0).collect();
    builds.dedup();
    let mut out = String::new();
    for b in builds {
        let cols: Vec<_> = grid.columns.iter().filter(|c| c.0 == b).cloned().collect();
        out.push_str(&flavor.style(&mut grid.table_of(&cols, flavor.color(), "\n")));
        out.push('\n');
    }
    out
}

/// The findings: on a terminal a list of at most `max` (the rest counted), in Markdown a table
/// of all. Empty when nothing failed.
fn findings_section(f: &[Finding], flavor: Flavor, max: usize) -> String {
    if f.is_empty() {
        return String::new();
    }
    let mut out = String::new();
    if flavor.markdown() {
        out.push_str(&format!(
            "\n### Findings ({})\n\n| case | outcome | detail |\n|---|---|---|\n",
            findings_title(f)
        ));
        for x in f {
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
        return out;
    }
    out.push_str(&format!("\nfindings ({}):\n", findings_title(f)));
    for x in f.iter().take(max) {
        let tag = if x.expected_by.is_some() {
            " [expected]"
        } else {
            ""
        };
        out.push_str(&format!("  {}: {}{tag}: {}\n", x.id, x.kind, x.detail));
    }
    if f.len() > max {
        out.push_str(&format!(
            "  ... {} more (write them all with --json PATH)\n",
            f.len() - max
        ));
    }
    out
}

pub(crate) fn summary_line(report: &Report) -> String {
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
            std::cmp::Reverse(f.kind.severity()),
            f.id.clone(),
        )
    });
    v
}

/// Lines under the table: groups skipped whole, expected failures by rule, rules inactive here.
pub(crate) fn notes(report: &Report, grid: &Grid) -> Vec<String> {
    let mut out: Vec<String> = report
        .lost_backends()
        .iter()
        .map(|l| format!("LOST backend {}", l.describe()))
        .collect();
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
    for c in report.cases.iter().filter(|c| {
        c.outcome == OutcomeKind::Skipped && !whole.contains(&(c.point.backend, c.point.device))
    }) {
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
