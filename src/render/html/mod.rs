//! The report as one self-contained HTML page (`--html PATH`): what a reviewer clicks first in a
//! CI artifact. Rendered from the same [`Report`] as every other output: the verdict first, the
//! support tables as [`Sheet`]s (the terminal's symbols and colours; each cell a button that
//! opens its cases), the precision picture (each case's worst error over its tolerance, log
//! scale, per backend and dtype), filters by axis value kept in the URL fragment, and the
//! environment with the command line.
//!
//! Self-contained by construction: the styles, the script and the data are inline, and the
//! page's Content-Security-Policy (`default-src 'none'`) forbids every request. The markup is
//! maud's (each interpolated string escaped); the cases travel as JSON in a
//! `<script type="application/json">` with every `<` written `\u003c`, and the script puts
//! them into the page with `textContent` only, so an error message or a shape name holding
//! `<script>` stays text.

use super::grid::{Grid, LEGEND};
use super::sheet::{Sheet, Tone};
use super::{notes, paths, summary_line};
use crate::case::{Adapter, Backend, DType, Layer, Op, Point, Precision, Profile};
use crate::outcome::OutcomeKind;
use crate::report::{CaseReport, Report};
use crate::verdict::compare::{self, Labeled};
use maud::{html, Markup, PreEscaped, DOCTYPE};
use serde_json::{json, Value};
use std::collections::BTreeMap;

const CSS: &str = include_str!("page.css");
const SCRIPT: &str = include_str!("page.js");
const CSP: &str = "default-src 'none'; style-src 'unsafe-inline'; script-src 'unsafe-inline'; \
                   img-src data:; form-action 'none'; base-uri 'none'";

/// The page of one report.
pub fn page(report: &Report) -> String {
    let sheets = if paths::is_extended(report) {
        paths::sheets(report, 0)
    } else {
        vec![Grid::new(report).sheet(report, 0)]
    };
    let legend: Vec<(&str, &str)> = if paths::is_extended(report) {
        paths::LEGEND.to_vec()
    } else {
        LEGEND.to_vec()
    };
    let reports = [Labeled {
        label: report.matrix.clone(),
        report: report.clone(),
    }];
    let body = html! {
        header {
            h1 { "peft-compat: " (report.matrix) }
            @if let Some(cmd) = &report.command { p.command { code { (cmd) } } }
        }
        section #verdict aria-label="verdict" {
            h2 { "Verdict" }
            (summary(report))
            (gate(report))
        }
        (filters())
        section #support {
            h2 { "Support" }
            (tables(&sheets))
            (legend_list(&legend))
            @let lines = notes(report, &Grid::new(report));
            @if !lines.is_empty() {
                ul.notes { @for l in &lines { li { (l) } } }
            }
        }
        (detail())
        (precision(&reports))
        section #environment {
            h2 { "Environment" }
            (environment(report))
        }
    };
    document(&format!("peft-compat: {}", report.matrix), body, &reports)
}

/// The page of `compare`: the builds side by side (differing cells marked), each report's
/// environment, every case that behaves differently, each report's cases a click away.
pub fn compare_page(reports: &[Labeled], command: &str) -> String {
    let c = compare::compare(reports);
    let sheet = super::compare::sheet(reports);
    let legend = [
        (
            "A / B",
            "one verdict per report, in the order of the labels",
        ),
        ("≠", "the reports disagree on this cell"),
        ("·", "the report has no such cell"),
        ("–", "skipped there"),
    ];
    let body = html! {
        header {
            h1 { "peft-compat: compare" }
            p.command { code { (command) } }
        }
        section #verdict aria-label="verdict" {
            h2 { "Reports" }
            ol.reports {
                @for (l, e) in reports.iter().zip(&c.environments) {
                    li { strong { (l.label) } ": " (summary_line(&l.report)) br; small { (e) } }
                }
            }
            @for w in &c.warnings {
                p.warning { "warning: " (w) }
            }
            @if c.differences.is_empty() {
                p.ok { "✓ no case behaves differently where both ran" }
            } @else {
                details open {
                    summary { "✗ " (c.differences.len()) " differing cases" }
                    table.list {
                        thead { tr { th { "case" } th { "observed" } } }
                        tbody {
                            @for d in &c.differences {
                                tr {
                                    td { code { (d.id) } }
                                    td {
                                        @for (who, o, detail, u) in &d.observed {
                                            div { strong { (who) } ": " (o.as_str()) @if let Some(u) = u { ", " (format!("{u:.1}")) " u" } @if !detail.is_empty() { " (" (detail) ")" } }
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
            }
            @for (who, n, id) in &c.coverage {
                p { "ran only in " (who) ": " (n) " cases (e.g. " code { (id) } ")" }
            }
        }
        (filters())
        section #support {
            h2 { "Side by side" }
            (tables(std::slice::from_ref(&sheet)))
            (legend_list(&legend))
        }
        (detail())
        (precision(reports))
        section #environment {
            h2 { "Environments" }
            @for l in reports {
                h3 { (l.label) }
                (environment(&l.report))
            }
        }
    };
    document("peft-compat: compare", body, reports)
}

fn document(title: &str, body: Markup, reports: &[Labeled]) -> String {
    let data = data(reports).to_string().replace('<', "\\u003c");
    html! {
        (DOCTYPE)
        html lang="en" {
            head {
                meta charset="utf-8";
                meta name="viewport" content="width=device-width, initial-scale=1";
                meta http-equiv="Content-Security-Policy" content=(CSP);
                meta name="color-scheme" content="light dark";
                title { (title) }
                style { (PreEscaped(CSS)) }
            }
            body {
                a.skip href="#support" { "skip to the support tables" }
                main { (body) }
                script #data type="application/json" { (PreEscaped(data)) }
                script { (PreEscaped(SCRIPT)) }
            }
        }
    }
    .into_string()
}

/// Outcome counts, as badges that name themselves (colour is never the only signal).
fn summary(report: &Report) -> Markup {
    html! {
        p.summary { (summary_line(report)) }
        ul.counts {
            @for (k, n) in report.summary.outcomes.iter().filter(|(_, n)| **n > 0) {
                li class={ "count " (outcome_tone(report, *k).class()) } { strong { (n) } " " (k.as_str()) }
            }
        }
    }
}

/// A count's tone: failures all of which the matrix expects read as expected, as cells do.
fn outcome_tone(report: &Report, k: OutcomeKind) -> Tone {
    let expected = || {
        report
            .cases
            .iter()
            .filter(|c| c.outcome == k)
            .all(|c| c.expected_failure().is_some())
    };
    match k {
        OutcomeKind::Pass => Tone::Works,
        OutcomeKind::Skipped => Tone::Skipped,
        _ if expected() => Tone::Expected,
        _ => Tone::Fails,
    }
}

/// The gate's verdict, when the report was written with `--check`.
fn gate(report: &Report) -> Markup {
    let Some(g) = &report.gate else {
        return html! { p.muted { "No gate ran (run with --check to compare with the accepted snapshot)." } };
    };
    let failing: Vec<_> = g.changes.iter().filter(|c| c.fails).collect();
    let noted: Vec<_> = g.changes.iter().filter(|c| !c.fails).collect();
    html! {
        @if g.passed {
            p.gate.works { "✓ gate passed: " (g.checked) " cases checked, " (g.not_checked) " not checked here" }
        } @else {
            p.gate.fails { "✗ gate FAILED: " (failing.len() + g.problems.len()) " failures; " (g.checked) " cases checked" }
        }
        @if !g.problems.is_empty() {
            ul.problems { @for p in &g.problems { li.fails { "✗ " (p) } } }
        }
        @for (title, list) in [("failing the gate", &failing), ("noted", &noted)] {
            @if !list.is_empty() {
                details open[title == "failing the gate"] {
                    summary { (list.len()) " changes " (title) }
                    table.list {
                        thead { tr { th { "case" } th { "change" } th { "detail" } } }
                        tbody {
                            @for c in list.iter() {
                                tr {
                                    td { code { (c.id) } }
                                    td { @if c.fails { "✗ " } @else { "• " } (c.kind) }
                                    td { (c.detail) }
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

/// One select per axis; the script fills the values (from the data) and keeps the choice in
/// the URL fragment.
fn filters() -> Markup {
    html! {
        section #filters aria-label="filters" {
            h2 { "Filters" }
            form #filter-form {
                @for axis in AXES {
                    label { span { (axis) } select data-axis=(axis) { option value="" { "all" } } }
                }
                button type="button" #clear { "clear" }
            }
            p #matching aria-live="polite" {}
        }
    }
}

fn tables(sheets: &[Sheet]) -> Markup {
    html! {
        @for (s, sheet) in sheets.iter().enumerate() {
            h3 { (sheet.title) }
            div.scroll {
                table.grid {
                    thead {
                        tr {
                            th scope="col" { "adapter / op" }
                            @for c in &sheet.columns { th scope="col" { (c) } }
                        }
                    }
                    tbody {
                        @for (r, (label, cells)) in sheet.rows.iter().enumerate() {
                            tr {
                                th scope="row" { (label) }
                                @for (k, cell) in cells.iter().enumerate() {
                                    td {
                                        @if let Some(cell) = cell {
                                            @let refs = cell.cases.iter().map(|(r, i)| format!("{r}:{i}")).collect::<Vec<_>>().join(" ");
                                            button type="button"
                                                class={ "cell " (cell.tone.class()) }
                                                data-cell={ "s" (s) "r" (r) "c" (k) }
                                                data-cases=(refs)
                                                aria-label={ (label) ", " (sheet.columns[k]) ": " (cell.text) } {
                                                @if cell.tone == Tone::Differs { span.mark { "≠ " } }
                                                (cell.text)
                                            }
                                        }
                                    }
                                }
                            }
                        }
                    }
                }
            }
        }
    }
}

fn legend_list(legend: &[(&str, &str)]) -> Markup {
    html! {
        dl.legend {
            @for (sym, meaning) in legend { div { dt { code { (sym) } } dd { (meaning) } } }
        }
    }
}

/// Where a clicked cell's cases are listed (filled by the script).
fn detail() -> Markup {
    html! {
        section #detail hidden aria-live="polite" {
            h2 #detail-title tabindex="-1" { "Cases" }
            button type="button" #detail-close { "close (Esc)" }
            div.scroll {
                table.list #detail-table {
                    thead {
                        tr {
                            th { "case" } th { "outcome" } th { "error or outputs (error / tolerance, in units of roundoff u)" }
                            th { "expectation" } th { "shape" }
                        }
                    }
                    tbody {}
                }
            }
        }
    }
}

/// Each case's worst error as a fraction of its tolerance, one strip per (report,) backend and
/// dtype, log scale from 1e-4 to 10: drift toward the limit shows before it fails.
fn precision(reports: &[Labeled]) -> Markup {
    const LEFT: f64 = 190.0;
    const WIDTH: f64 = 560.0;
    const ROW: f64 = 22.0;
    const LO: f64 = -4.0;
    const HI: f64 = 1.0;
    let x = |lg: f64| LEFT + (lg.clamp(LO, HI) - LO) / (HI - LO) * WIDTH;
    type Dot = (String, f64, f64, Tone);
    let mut rows: BTreeMap<(usize, Backend, DType), Vec<Dot>> = BTreeMap::new();
    for (r, l) in reports.iter().enumerate() {
        for (i, c) in l.report.cases.iter().enumerate() {
            let Some(m) = &c.metrics else { continue };
            let ratio = m.outputs.iter().map(|o| o.ratio()).fold(0.0, f64::max);
            let lg = if ratio > 0.0 { ratio.log10() } else { LO };
            let tone = match (ratio <= 1.0, c.expected_failure().is_some()) {
                (true, _) => Tone::Works,
                (false, true) => Tone::Expected,
                (false, false) => Tone::Fails,
            };
            // A fixed jitter per case, so that equal errors do not hide each other.
            let jitter = (crate::util::fnv1a(c.id.as_bytes()) % 13) as f64 - 6.0;
            rows.entry((r, c.point.backend, c.point.dtype))
                .or_default()
                .push((format!("{r}:{i}"), x(lg), jitter, tone));
        }
    }
    let height = ROW * rows.len() as f64 + 30.0;
    html! {
        section #precision {
            h2 { "Precision" }
            p { "Each case that ran, at its worst output's error divided by its tolerance (log scale; right of the line fails). Click a dot for its case." }
            @if rows.is_empty() {
                p.muted { "No case ran." }
            } @else {
                div.scroll {
                    svg #strip viewBox={ "0 0 " (LEFT + WIDTH + 20.0) " " (height) } width=(LEFT + WIDTH + 20.0) height=(height) role="img" aria-label="error over tolerance per case" {
                        @for lg in [-4, -3, -2, -1, 0, 1] {
                            line.tick x1=(x(lg as f64)) x2=(x(lg as f64)) y1="0" y2=(height - 18.0) {}
                            text.axis x=(x(lg as f64)) y=(height - 4.0) text-anchor="middle" { "1e" (lg) }
                        }
                        line.limit x1=(x(0.0)) x2=(x(0.0)) y1="0" y2=(height - 18.0) {}
                        @for (n, ((r, b, dt), dots)) in rows.iter().enumerate() {
                            @let y = ROW * n as f64 + ROW / 2.0;
                            text.label x="4" y=(y + 4.0) {
                                @if reports.len() > 1 { (reports[*r].label) " · " }
                                (super::grid::backend_label(&reports[*r].report, *b)) " " (dt)
                            }
                            @for (refs, cx, j, tone) in dots {
                                circle class={ "dot " (tone.class()) } data-c=(refs) cx=(format!("{cx:.1}")) cy=(format!("{:.1}", y + j * 0.6)) r="3" {}
                            }
                        }
                    }
                }
            }
        }
    }
}

fn environment(report: &Report) -> Markup {
    let e = &report.environment;
    html! {
        dl.env {
            div { dt { "peft-compat" } dd { (e.peft_compat) } }
            div { dt { "CPU" } dd { (e.cpu_model) " (" (e.cpu_count) " cores; " (e.cpu_flags.join(" ")) ")" } }
            div { dt { "GPU" } dd { @if e.gpus.is_empty() { "none" } @else { (e.gpus.join(", ")) } } }
            div { dt { "OS" } dd { (e.os) " " (e.arch) } }
            @for (b, libs) in &e.backends {
                div { dt { (b) } dd { (libs.iter().map(|(k, v)| format!("{k} {v}")).collect::<Vec<_>>().join(", ")) } }
            }
            @if e.backends.is_empty() {
                div { dt { "libraries" } dd { (e.libraries_line()) } }
            }
            div { dt { "seed" } dd { (report.seed) } }
            @if let Some(t) = report.threads { div { dt { "threads" } dd { (t) } } }
            @if !report.filter.is_empty() { div { dt { "filter" } dd { (report.filter.join(", ")) } } }
            @if let Some(d) = &report.dump { div { dt { "dumps" } dd { code { (d) } } } }
            @if let Some(c) = &report.command { div { dt { "command" } dd { code { (c) } } } }
        }
    }
}

/// The axes a case can be filtered by, in the order the filters show them: the point's eight,
/// the shape and the outcome.
const AXES: [&str; 10] = {
    let p = Point::AXES;
    [
        p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7], "shape", "outcome",
    ]
};

/// A case's value on each of [`AXES`].
fn axis_values(c: &CaseReport) -> Vec<String> {
    let mut v = c.point.values().to_vec();
    v.push(c.shape.clone());
    v.push(c.outcome.as_str().to_string());
    v
}

/// The data the script reads: per axis its values (in axis order, then by name), per report
/// its label and cases (axis value indices, outcome, error, outputs, expectation, shape, dump
/// file). Numbers that are not finite are `null`.
fn data(reports: &[Labeled]) -> Value {
    let order = axis_order();
    let mut values: Vec<Vec<String>> = vec![Vec::new(); AXES.len()];
    for l in reports {
        for c in &l.report.cases {
            for (k, v) in axis_values(c).into_iter().enumerate() {
                if !values[k].contains(&v) {
                    values[k].push(v);
                }
            }
        }
    }
    for (k, vs) in values.iter_mut().enumerate() {
        vs.sort_by_key(|v| {
            let known = order[k].iter().position(|o| o == v);
            (known.unwrap_or(usize::MAX), v.clone())
        });
    }
    let finite = |x: f64| if x.is_finite() { json!(x) } else { Value::Null };
    let reports: Vec<Value> = reports
        .iter()
        .map(|l| {
            let r = &l.report;
            let cases: Vec<Value> = r
                .cases
                .iter()
                .map(|c| {
                    let a: Vec<usize> = axis_values(c)
                        .iter()
                        .enumerate()
                        .map(|(k, v)| values[k].iter().position(|x| x == v).unwrap_or(0))
                        .collect();
                    let u = c.point.dtype.unit_roundoff();
                    let outputs: Vec<Value> = c.metrics.as_ref().map_or(vec![], |m| {
                        m.outputs
                            .iter()
                            .map(|o| {
                                json!([
                                    o.name,
                                    finite(o.err_units),
                                    finite(o.tolerance / u),
                                    finite(o.ratio()),
                                    o.nonfinite
                                ])
                            })
                            .collect()
                    });
                    let x = c.expected.as_ref().map(|e| {
                        json!({"outcome": e.outcome, "reason": e.reason, "rule": e.rule,
                               "status": e.status})
                    });
                    json!({
                        "id": c.id,
                        "a": a,
                        "e": c.error,
                        "s": c.skip,
                        "m": outputs,
                        "x": x,
                        "d": r.dump.as_ref().map(|_| crate::exec::dump::file_name(&c.id)),
                    })
                })
                .collect();
            json!({"label": l.label, "shapes": r.shapes, "units": r.units, "cases": cases})
        })
        .collect();
    json!({"axes": AXES, "values": values, "reports": reports})
}

/// Each axis's values in the order the tables use (the enums' order); shapes and unknown
/// values after them by name.
fn axis_order() -> [Vec<String>; 10] {
    fn all<T: ToString + Copy>(v: &[T]) -> Vec<String> {
        v.iter().map(|x| x.to_string()).collect()
    }
    [
        all(Backend::ALL),
        vec!["cpu".to_string(), "cuda".to_string()],
        all(DType::ALL),
        all(Adapter::ALL),
        all(Op::ALL),
        all(Precision::ALL),
        all(Layer::ALL),
        all(Profile::ALL),
        Vec::new(),
        OutcomeKind::ALL
            .iter()
            .map(|k| k.as_str().to_string())
            .collect(),
    ]
}
