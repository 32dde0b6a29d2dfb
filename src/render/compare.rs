//! `peft-compat compare` as a person reads it: one support table whose cells read `A / B / ...`
//! (one verdict per report), the environments each letter stands for, the cases that ran in
//! only some reports, and every case that behaves differently.

use super::grid::{backend_label, Grid, MAX_WIDTH};
use super::sheet::{CaseRef, Sheet, SheetCell, Tone};
use crate::case::{Adapter, Backend, DType, Device, Op};
use crate::util::plural;
use crate::verdict::compare::{Comparison, Labeled};
use comfy_table::{presets, Cell, CellAlignment, ContentArrangement, Table};
use std::collections::{BTreeMap, BTreeSet};

/// The side-by-side grid of `reports` as a [`Sheet`] (cells `A / B / ...`, one verdict per
/// report, `·` where a report has no such cell; tone `Differs` where they disagree) and each
/// column's backend build.
fn layout(reports: &[Labeled]) -> (Sheet, Vec<Backend>) {
    let grids: Vec<Grid> = reports.iter().map(|l| Grid::new(&l.report)).collect();
    let mut labels: BTreeMap<Backend, String> = BTreeMap::new();
    type Key = (Adapter, Op, Backend, Device, DType);
    let mut cases: BTreeMap<Key, Vec<CaseRef>> = BTreeMap::new();
    for (r, l) in reports.iter().enumerate() {
        for (i, c) in l.report.cases.iter().enumerate() {
            let p = c.point;
            labels
                .entry(p.backend)
                .or_insert_with(|| backend_label(&l.report, p.backend));
            cases
                .entry((p.adapter, p.op, p.backend, p.device, p.dtype))
                .or_default()
                .push((r, i));
        }
    }
    let mut columns: BTreeSet<(Backend, Device, DType)> = BTreeSet::new();
    let mut rows: BTreeSet<(Adapter, Op)> = BTreeSet::new();
    for g in &grids {
        for (b, d, dtypes) in &g.columns {
            columns.extend(dtypes.iter().map(|dt| (*b, *d, *dt)));
        }
        rows.extend(g.rows.iter().copied());
    }
    let sheet_rows = rows
        .iter()
        .map(|(a, op)| {
            let cells = columns
                .iter()
                .map(|(b, d, dt)| {
                    let key = (*a, *op, *b, *d, *dt);
                    let parts: Vec<String> = grids
                        .iter()
                        .map(|g| g.cell_text(&key, " ").unwrap_or_else(|| "·".to_string()))
                        .collect();
                    let tone = match grids.iter().find_map(|g| g.cells.get(&key)) {
                        _ if parts.iter().any(|p| *p != parts[0]) => Tone::Differs,
                        Some(v) => Tone::of_color(v.color()),
                        None => Tone::Skipped,
                    };
                    Some(SheetCell {
                        text: parts.join(" / "),
                        tone,
                        cases: cases.get(&key).cloned().unwrap_or_default(),
                    })
                })
                .collect();
            (format!("{a} {op}"), cells)
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
    layout(reports).0
}

/// The support table of `reports`, or one per backend build when one would be wider than
/// [`MAX_WIDTH`] (as `run` does).
pub fn tables(reports: &[Labeled], color: bool) -> Vec<String> {
    let (sheet, builds) = layout(reports);
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

/// The comparison: tables of `reports`, then what `c` found, at most `max_differences` cases.
pub fn text(reports: &[Labeled], c: &Comparison, color: bool, max_differences: usize) -> String {
    let mut out = format!("cells read {}:\n", c.labels.join(" / "));
    for e in &c.environments {
        out.push_str(&format!("  {e}\n"));
    }
    for t in tables(reports, color) {
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
                .map(|(who, o, detail)| {
                    if detail.is_empty() {
                        format!("{who}: {o}")
                    } else {
                        format!("{who}: {o} ({detail})")
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
