//! The three-path tables: what a matrix with PEFT's autocast default, Embedding/Conv2d layers or
//! weight profiles shows. One table per (layer, profile); each cell gives one symbol per
//! precision path, in the order native, upcast, autocast, so the paths read side by side.
//! Then the figures: the gaps `init_noop`, `parity` and `roundtrip` measure, as numbers.

use super::grid::backend_label;
use super::sheet::{positions, Sheet, SheetCell, Tone};
use crate::case::{Adapter, Backend, DType, Device, Layer, Op, Precision, Profile};
use crate::outcome::OutcomeKind;
use crate::report::{CaseReport, Report};
use comfy_table::{Cell, CellAlignment, Color, ContentArrangement, Table};
use std::collections::BTreeMap;

/// Whether the report needs the three-path tables instead of the two-path grid.
pub fn is_extended(report: &Report) -> bool {
    report.cases.iter().any(|c| {
        matches!(c.point.precision, Precision::Autocast | Precision::Fp32Init)
            || c.point.layer != Layer::Linear
            || c.point.profile != Profile::Normal
    })
}

pub const LEGEND: &[(&str, &str)] = &[
    (
        "✓ ✗ ...",
        "one symbol per precision path, in the order native upcast autocast (fp32_init fourth, where the report has it)",
    ),
    ("✓", "every case of the path passes"),
    (
        "U M N C T",
        "the worst failure: unsupported, mismatch, nonfinite, crashed, timeout",
    ),
    (
        "u m n c t",
        "the same, every failure expected by the matrix (the reason is listed below)",
    ),
    ("–", "skipped here (see below)"),
    ("·", "this path is not in the matrix for the cell"),
    (
        "!",
        "a case passed where a matrix rule declares a failure (the rule is named below)",
    ),
];

/// The paths a cell shows, in order: the three always (`·` where the matrix lacks one, so the
/// columns read alike in every report), `fp32_init` where the report has it.
fn paths(report: &Report) -> Vec<Precision> {
    let mut p = vec![Precision::Native, Precision::Upcast, Precision::Autocast];
    if report
        .cases
        .iter()
        .any(|c| c.point.precision == Precision::Fp32Init)
    {
        p.push(Precision::Fp32Init);
    }
    p
}

/// The symbol of one path of one cell.
fn symbol(cases: &[&CaseReport]) -> String {
    if cases.is_empty() {
        return "·".into();
    }
    let ran: Vec<&&CaseReport> = cases
        .iter()
        .filter(|c| c.outcome != OutcomeKind::Skipped)
        .collect();
    if ran.is_empty() {
        return "–".into();
    }
    let failed: Vec<&&CaseReport> = ran
        .iter()
        .copied()
        .filter(|c| !c.outcome.is_pass())
        .collect();
    let mut s = match failed
        .iter()
        .map(|c| c.outcome)
        .max_by_key(|k| k.severity())
    {
        None => "✓".to_string(),
        Some(worst) => {
            let letter = match worst {
                OutcomeKind::Unsupported => 'U',
                OutcomeKind::Mismatch => 'M',
                OutcomeKind::Nonfinite => 'N',
                OutcomeKind::Crashed => 'C',
                _ => 'T',
            };
            if failed.iter().all(|c| c.expected_failure().is_some()) {
                letter.to_ascii_lowercase().to_string()
            } else {
                letter.to_string()
            }
        }
    };
    if cases.iter().any(|c| {
        c.expected
            .as_ref()
            .is_some_and(|e| e.status == crate::report::Status::UnexpectedPass)
    }) {
        s.push('!');
    }
    s
}

type Column = (Backend, Device, DType);

/// A titled table of some cases: rows (adapter, op), columns (build, device, dtype).
struct Group<'a> {
    title: String,
    rows: Vec<(Adapter, Op)>,
    columns: Vec<Column>,
    cells: BTreeMap<(Adapter, Op, Column), Vec<&'a CaseReport>>,
}

fn groups<'a>(
    report: &'a Report,
    keep: impl Fn(&CaseReport) -> bool,
    label: impl Fn(Layer, Profile) -> String,
    variant: impl Fn(&CaseReport) -> Option<String>,
) -> Vec<Group<'a>> {
    let mut by: BTreeMap<(Layer, Profile, Option<String>), Vec<&CaseReport>> = BTreeMap::new();
    for c in report.cases.iter().filter(|c| keep(c)) {
        by.entry((c.point.layer, c.point.profile, variant(c)))
            .or_default()
            .push(c);
    }
    by.into_iter()
        .map(|((layer, profile, variant), cases)| {
            let mut rows: Vec<(Adapter, Op)> = cases
                .iter()
                .map(|c| (c.point.adapter, c.point.op))
                .collect();
            rows.sort();
            rows.dedup();
            // A column shows when some case of it ran here; wholly skipped builds and devices are
            // listed under the tables.
            let mut columns: Vec<Column> = cases
                .iter()
                .filter(|c| c.outcome != OutcomeKind::Skipped)
                .map(|c| (c.point.backend, c.point.device, c.point.dtype))
                .collect();
            columns.sort();
            columns.dedup();
            let mut cells: BTreeMap<(Adapter, Op, Column), Vec<&CaseReport>> = BTreeMap::new();
            for c in cases {
                cells
                    .entry((
                        c.point.adapter,
                        c.point.op,
                        (c.point.backend, c.point.device, c.point.dtype),
                    ))
                    .or_default()
                    .push(c);
            }
            Group {
                title: match variant {
                    Some(v) => format!("{}, {v}", label(layer, profile)),
                    None => label(layer, profile),
                },
                rows,
                columns,
                cells,
            }
        })
        .collect()
}

fn header(report: &Report, cols: &[Column], sep: &str) -> Vec<Cell> {
    let mut h = vec![Cell::new("adapter / op")];
    for (b, d, dt) in cols {
        h.push(
            Cell::new(format!("{}{sep}{d} {dt}", backend_label(report, *b)))
                .set_alignment(CellAlignment::Center),
        );
    }
    h
}

/// `cols` in runs of one (build, device) each.
fn per_build(cols: &[Column]) -> Vec<Vec<Column>> {
    let mut out: Vec<Vec<Column>> = Vec::new();
    for c in cols {
        match out.last_mut() {
            Some(last) if (last[0].0, last[0].1) == (c.0, c.1) => last.push(*c),
            _ => out.push(vec![*c]),
        }
    }
    out
}

/// Render tables with `style` (a preset and tty settings), each under its title; split per
/// build where wider than `max_width`.
fn render_groups(
    report: &Report,
    groups: &[Group],
    sep: &str,
    max_width: usize,
    cell: &dyn Fn(&[&CaseReport]) -> String,
    paint: Option<&dyn Fn(&str) -> Color>,
    style: &dyn Fn(&mut Table) -> String,
) -> Vec<(String, String)> {
    let mut out = Vec::new();
    for g in groups.iter().filter(|g| !g.columns.is_empty()) {
        let build = |cols: &[Column]| {
            let mut t = Table::new();
            t.set_content_arrangement(ContentArrangement::Disabled);
            t.set_header(header(report, cols, sep));
            for (a, op) in &g.rows {
                let mut row = vec![Cell::new(format!("{a} {op}"))];
                for col in cols {
                    let text = g
                        .cells
                        .get(&(*a, *op, *col))
                        .map_or(String::new(), |v| cell(v));
                    let c = match paint {
                        Some(p) if !text.is_empty() => Cell::new(&text).fg(p(&text)),
                        _ => Cell::new(&text),
                    };
                    row.push(c.set_alignment(CellAlignment::Center));
                }
                t.add_row(row);
            }
            style(&mut t)
        };
        let width = |t: &str| t.lines().next().map_or(0, |l| l.chars().count());
        // Whole, else one table per build, else halves of a build's columns until they fit.
        let mut pending = vec![g.columns.clone()];
        while let Some(cols) = pending.pop() {
            let text = build(&cols);
            if width(&text) <= max_width || cols.len() == 1 {
                out.push((g.title.clone(), text));
                continue;
            }
            let parts = per_build(&cols);
            let parts = if parts.len() > 1 {
                parts
            } else {
                let (a, b) = cols.split_at(cols.len() / 2);
                vec![a.to_vec(), b.to_vec()]
            };
            pending.extend(parts.into_iter().rev());
        }
    }
    out
}

fn by_path(
    paths: &[Precision],
    cases: &[&CaseReport],
    f: impl Fn(&[&CaseReport]) -> String,
) -> String {
    paths
        .iter()
        .map(|p| {
            let v: Vec<&CaseReport> = cases
                .iter()
                .filter(|c| c.point.precision == *p)
                .copied()
                .collect();
            f(&v)
        })
        .collect::<Vec<_>>()
        .join(" ")
}

fn title(layer: Layer, profile: Profile) -> String {
    format!("layer {layer}, profile {profile}")
}

/// A support cell's colour, as the two-path table colours its verdicts: an unexpected failure
/// red, expected ones magenta, a declared failure that passed cyan, all passing green, nothing
/// run grey.
fn paint(text: &str) -> Color {
    if text.contains('!') {
        Color::Cyan
    } else if text.chars().any(|c| "UMNCT".contains(c)) {
        Color::Red
    } else if text.chars().any(|c| "umnct".contains(c)) {
        Color::Magenta
    } else if text.contains('✓') {
        Color::Green
    } else {
        Color::DarkGrey
    }
}

/// The support tables, titled: (title, rendered table); coloured cells with `color`.
fn support_tables(
    report: &Report,
    sep: &str,
    max_width: usize,
    color: bool,
    style: &dyn Fn(&mut Table) -> String,
) -> Vec<(String, String)> {
    let g = groups(report, |_| true, title, |_| None);
    let paint: Option<&dyn Fn(&str) -> Color> = if color { Some(&paint) } else { None };
    let paths = paths(report);
    render_groups(
        report,
        &g,
        sep,
        max_width,
        &|v| by_path(&paths, v, symbol),
        paint,
        style,
    )
}

/// The number a self-check op measures: `init_noop`'s and `parity`'s gap, `roundtrip`'s error
/// against the original weight (relative to the output's scale); the largest over shapes.
fn figure(cases: &[&CaseReport]) -> String {
    if cases.is_empty() {
        return "·".into();
    }
    let mut worst: Option<f64> = None;
    for c in cases {
        let name = match c.point.op {
            Op::InitNoop => crate::truth::judge::NOOP_GAP,
            Op::Parity => crate::truth::judge::PARITY_GAP,
            _ => crate::worker::io::names::UNMERGED,
        };
        let Some(o) = c
            .metrics
            .as_ref()
            .and_then(|m| m.outputs.iter().find(|o| o.name == name))
        else {
            return "–".into();
        };
        if o.nonfinite > 0 {
            return "nan".into();
        }
        worst = Some(worst.map_or(o.max_rel_err, |w: f64| w.max(o.max_rel_err)));
    }
    match worst {
        Some(0.0) => "0".into(),
        Some(v) => format!("{v:.0e}"),
        None => "–".into(),
    }
}

/// Whether a case's numbers go in the figures tables: a self-check op, profile `normal`.
fn is_figure(c: &CaseReport) -> bool {
    matches!(c.point.op, Op::InitNoop | Op::Parity | Op::Roundtrip)
        && c.point.profile == Profile::Normal
}

/// A figures table of its own for the cases whose shape computes its base layer fused, so
/// that the parity and roundtrip figures of `base: fused` sit beside the split ones per dtype.
fn base_variant(report: &Report, c: &CaseReport) -> Option<String> {
    report
        .shapes
        .get(&c.shape)
        .and_then(|s| s.base)
        .map(|b| format!("base {b}"))
}

fn figures_title(layer: Layer, _: Profile) -> String {
    format!("figures, layer {layer}")
}

/// The figures tables (profile `normal`, one per layer): each cell gives native, upcast and
/// autocast's figure, `–` where the case did not run or failed without figures, `·` where the
/// path is not in the matrix.
fn figure_tables(
    report: &Report,
    sep: &str,
    max_width: usize,
    style: &dyn Fn(&mut Table) -> String,
) -> Vec<(String, String)> {
    let g = groups(report, is_figure, figures_title, |c| {
        base_variant(report, c)
    });
    let paths = paths(report);
    render_groups(
        report,
        &g,
        sep,
        max_width,
        &|v| by_path(&paths, v, figure),
        None,
        style,
    )
}

/// The support tables, the legend and the figures, for a terminal (tables within 80 columns,
/// `sep` a line break) or in Markdown (no width limit: cells cannot hold line breaks);
/// `style` applies the table preset.
pub fn render(
    report: &Report,
    markdown: bool,
    color: bool,
    style: &dyn Fn(&mut Table) -> String,
) -> String {
    let (sep, max_width) = if markdown {
        (" ", usize::MAX)
    } else {
        ("\n", 80)
    };
    let titled = |title: &str, table: &str| {
        if markdown {
            format!("#### {title}\n\n{table}\n\n")
        } else {
            format!("{title}\n{table}\n")
        }
    };
    let mut out = String::new();
    for (title, table) in support_tables(report, sep, max_width, color, style) {
        out.push_str(&titled(&title, &table));
    }
    for (sym, meaning) in LEGEND {
        out.push_str(&if markdown {
            format!("- `{sym}`: {meaning}\n")
        } else {
            format!("  {sym:<17} {meaning}\n")
        });
    }
    let figures = figure_tables(report, sep, max_width, style);
    if !figures.is_empty() {
        out.push_str(&format!("\n{FIGURES_NOTE}\n"));
        if markdown {
            out.push('\n');
        }
        for (title, table) in figures {
            out.push_str(&titled(&title, &table));
        }
    }
    out
}

pub const FIGURES_NOTE: &str = "figures: max relative gap, native upcast autocast: init_noop = adapted layer at init vs \
the base layer alone (0 = an exact no-op), parity = unmerged vs merged forward, roundtrip = weight after merge and \
unmerge vs the original (profile normal; every case's figures are in --json)";

/// The support tables and then the figures tables as [`Sheet`]s of `report` (index `r` among
/// the reports a page shows), with the terminal's symbols, colours and figures.
pub fn sheets(report: &Report, r: usize) -> Vec<Sheet> {
    let at = positions(report);
    let paths = paths(report);
    let as_sheets = |groups: Vec<Group>, cell: &dyn Fn(&[&CaseReport]) -> (String, Tone)| {
        groups
            .into_iter()
            .filter(|g| !g.columns.is_empty())
            .map(|g| Sheet {
                columns: g
                    .columns
                    .iter()
                    .map(|(b, d, dt)| format!("{} {d} {dt}", backend_label(report, *b)))
                    .collect(),
                rows: g
                    .rows
                    .iter()
                    .map(|(a, op)| {
                        let cells = g
                            .columns
                            .iter()
                            .map(|col| {
                                let v = g.cells.get(&(*a, *op, *col))?;
                                let (text, tone) = cell(v);
                                Some(SheetCell {
                                    text,
                                    tone,
                                    cases: v.iter().map(|c| (r, at[c.id.as_str()])).collect(),
                                })
                            })
                            .collect();
                        (format!("{a} {op}"), cells)
                    })
                    .collect(),
                title: g.title,
            })
            .collect::<Vec<_>>()
    };
    let mut out = as_sheets(groups(report, |_| true, title, |_| None), &|v| {
        let text = by_path(&paths, v, symbol);
        let tone = Tone::of_color(paint(&text));
        (text, tone)
    });
    out.extend(as_sheets(
        groups(report, is_figure, figures_title, |c| {
            base_variant(report, c)
        }),
        &|v| (by_path(&paths, v, figure), Tone::Plain),
    ));
    out
}
