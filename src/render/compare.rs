//! `peft-compat compare` as a person reads it: one support table whose cells read `A / B / ...`
//! (one verdict per report), the environments each letter stands for, the cases that ran in
//! only some reports, and every case that behaves differently.

use super::grid::{backend_label, Grid, MAX_WIDTH};
use super::sheet::{CaseRef, Sheet, SheetCell, Tone};
use crate::case::{Adapter, Backend, DType, Device, Op, Precision};
use crate::util::plural;
use crate::verdict::compare::{Comparison, Labeled};
use comfy_table::{presets, Cell, CellAlignment, ContentArrangement, Table};
use std::collections::{BTreeMap, BTreeSet};

/// The precision paths to show one row each: none (the two-path grid, native and upcast read
/// together as `run` draws them) unless a report has autocast or fp32_init, whose verdicts the
/// two-path cell cannot carry (a candle cell would read "✗ mismatch" where autocast passes).
fn split_paths(reports: &[Labeled]) -> Vec<Precision> {
    let extended = reports.iter().any(|l| {
        l.report
            .cases
            .iter()
            .any(|c| matches!(c.point.precision, Precision::Autocast | Precision::Fp32Init))
    });
    if !extended {
        return Vec::new();
    }
    let mut v: Vec<Precision> = reports
        .iter()
        .flat_map(|l| l.report.cases.iter().map(|c| c.point.precision))
        .collect();
    v.sort();
    v.dedup();
    v
}

/// `report` with only the cases of `path` (all of them for `None`).
fn only(report: &crate::report::Report, path: Option<Precision>) -> crate::report::Report {
    let mut r = report.clone();
    if let Some(p) = path {
        r.cases.retain(|c| c.point.precision == p);
    }
    r
}

/// The side-by-side grid of `reports` as a [`Sheet`] (cells `A / B / ...`, one verdict per
/// report, `·` where a report has no such cell; tone `Differs` where they disagree), a row per
/// adapter and op (and path, where [`split_paths`] says so), and each column's backend build.
/// With `units`, each report's part of a cell adds the worst error, in units of roundoff, of
/// its cases there.
fn layout(reports: &[Labeled], units: bool) -> (Sheet, Vec<Backend>) {
    let paths: Vec<Option<Precision>> = match split_paths(reports) {
        v if v.is_empty() => vec![None],
        v => v.into_iter().map(Some).collect(),
    };
    // grids[path][report]
    let grids: Vec<Vec<Grid>> = paths
        .iter()
        .map(|p| {
            reports
                .iter()
                .map(|l| Grid::new(&only(&l.report, *p)))
                .collect()
        })
        .collect();
    let mut labels: BTreeMap<Backend, String> = BTreeMap::new();
    type Key = (Adapter, Op, Backend, Device, DType);
    let mut cases: BTreeMap<(Option<Precision>, Key), Vec<CaseRef>> = BTreeMap::new();
    for (r, l) in reports.iter().enumerate() {
        for (i, c) in l.report.cases.iter().enumerate() {
            let p = c.point;
            labels
                .entry(p.backend)
                .or_insert_with(|| backend_label(&l.report, p.backend));
            let path = paths[0].map(|_| p.precision);
            cases
                .entry((path, (p.adapter, p.op, p.backend, p.device, p.dtype)))
                .or_default()
                .push((r, i));
        }
    }
    let mut columns: BTreeSet<(Backend, Device, DType)> = BTreeSet::new();
    let mut rows: BTreeSet<(Adapter, Op, Option<Precision>)> = BTreeSet::new();
    for (path, per_report) in paths.iter().zip(&grids) {
        for g in per_report {
            for (b, d, dtypes) in &g.columns {
                columns.extend(dtypes.iter().map(|dt| (*b, *d, *dt)));
            }
            rows.extend(g.rows.iter().map(|(a, op)| (*a, *op, *path)));
        }
    }
    let sheet_rows = rows
        .iter()
        .map(|(a, op, path)| {
            let at = paths.iter().position(|p| p == path).unwrap_or(0);
            let cells = columns
                .iter()
                .map(|(b, d, dt)| {
                    let key = (*a, *op, *b, *d, *dt);
                    let refs = cases.get(&(*path, key)).cloned().unwrap_or_default();
                    let worst = |r: usize| {
                        refs.iter()
                            .filter(|(ri, _)| *ri == r)
                            .filter_map(|(ri, ci)| reports[*ri].report.cases[*ci].metrics.as_ref())
                            .flat_map(|m| m.outputs.iter().map(|o| o.err_units))
                            .filter(|u| u.is_finite())
                            .reduce(f64::max)
                    };
                    let parts: Vec<String> = grids[at]
                        .iter()
                        .enumerate()
                        .map(|(r, g)| {
                            let text = g.cell_text(&key, " ").unwrap_or_else(|| "·".to_string());
                            match worst(r).filter(|_| units) {
                                Some(u) => format!("{text} {u:.1}"),
                                None => text,
                            }
                        })
                        .collect();
                    let tone = match grids[at].iter().find_map(|g| g.cells.get(&key)) {
                        _ if parts.iter().any(|p| *p != parts[0]) => Tone::Differs,
                        Some(v) => Tone::of_color(v.color()),
                        None => Tone::Skipped,
                    };
                    Some(SheetCell {
                        text: parts.join(" / "),
                        tone,
                        cases: refs,
                    })
                })
                .collect();
            let label = match path {
                Some(p) => format!("{a} {op} {p}"),
                None => format!("{a} {op}"),
            };
            (label, cells)
        })
        .collect();
    let sheet = Sheet {
        title: "side by side".into(),
        columns: columns
            .iter()
            .map(|(b, d, dt)| format!("{} {d} {dt}", labels[b]))
            .collect(),
        rows: sheet_rows,
    };
    (sheet, columns.iter().map(|c| c.0).collect())
}

/// The side-by-side grid of `reports` (see [`layout`]).
pub fn sheet(reports: &[Labeled]) -> Sheet {
    layout(reports, false).0
}

/// The support table of `reports`, or one per backend build when one would be wider than
/// [`MAX_WIDTH`] (as `run` does); `units` adds each report's worst error in u to its part.
pub fn tables(reports: &[Labeled], color: bool, units: bool) -> Vec<String> {
    let (sheet, builds) = layout(reports, units);
    let table_of = |cols: &[usize]| {
        let mut t = Table::new();
        t.set_content_arrangement(ContentArrangement::Disabled);
        t.load_preset(presets::UTF8_FULL_CONDENSED);
        if !color {
            t.force_no_tty();
        }
        let mut header = vec![Cell::new("adapter / op")];
        header.extend(cols.iter().map(|&k| {
            // `tch 2.11.0 cpu f16` -> build and device over the dtype.
            let label = &sheet.columns[k];
            let (head, dt) = label.rsplit_once(' ').unwrap_or((label, ""));
            Cell::new(format!("{head}\n{dt}")).set_alignment(CellAlignment::Center)
        }));
        t.set_header(header);
        for (label, cells) in &sheet.rows {
            let mut row = vec![Cell::new(label)];
            for &k in cols {
                let text = cells[k].as_ref().map_or("", |c| c.text.as_str());
                row.push(Cell::new(text).set_alignment(CellAlignment::Center));
            }
            t.add_row(row);
        }
        t.to_string()
    };
    let all: Vec<usize> = (0..sheet.columns.len()).collect();
    let whole = table_of(&all);
    let width = whole.lines().next().map_or(0, |l| l.chars().count());
    if width <= MAX_WIDTH {
        return vec![whole];
    }
    // As `run` does: one table per backend build when one would be too wide to read.
    let mut distinct = builds.clone();
    distinct.dedup();
    distinct
        .into_iter()
        .map(|b| {
            table_of(
                &all.iter()
                    .copied()
                    .filter(|&k| builds[k] == b)
                    .collect::<Vec<_>>(),
            )
        })
        .collect()
}

/// The comparison: tables of `reports` (with `units`, each report's worst error in u in its
/// part of a cell), then what `c` found, at most `max_differences` cases.
pub fn text(
    reports: &[Labeled],
    c: &Comparison,
    color: bool,
    max_differences: usize,
    units: bool,
) -> String {
    let mut out = String::new();
    for w in &c.warnings {
        out.push_str(&format!("warning: {w}\n"));
    }
    out.push_str(&format!("cells read {}:\n", c.labels.join(" / ")));
    for e in &c.environments {
        out.push_str(&format!("  {e}\n"));
    }
    for t in tables(reports, color, units) {
        out.push_str(&t);
        out.push('\n');
    }
    out.push_str("  · = the report has no such cell; – = skipped there\n");
    for (who, n, id) in &c.coverage {
        out.push_str(&format!(
            "ran only in {who}: {} (e.g. {id})\n",
            plural(*n, "case")
        ));
    }
    if c.differences.is_empty() {
        out.push_str("\nno case behaves differently where both ran\n");
    } else {
        out.push_str(&format!("\ndiffering cases ({}):\n", c.differences.len()));
        for d in c.differences.iter().take(max_differences) {
            let seen: Vec<String> = d
                .observed
                .iter()
                .map(|(who, o, detail, u)| {
                    let u = u.map_or(String::new(), |u| format!(", {u:.1} u"));
                    if detail.is_empty() {
                        format!("{who}: {o}{u}")
                    } else {
                        format!("{who}: {o}{u} ({detail})")
                    }
                })
                .collect();
            out.push_str(&format!("  {}: {}\n", d.id, seen.join(" | ")));
        }
        if c.differences.len() > max_differences {
            out.push_str(&format!(
                "  ... and {} more\n",
                c.differences.len() - max_differences
            ));
        }
    }
    out
}
