//! `peft-compat compare` as a person reads it: one support table whose cells read `A / B / ...`
//! (one verdict per report), the environments each letter stands for, the cases that ran in
//! only some reports, and every case that behaves differently.

use super::grid::{backend_label, Grid, MAX_WIDTH};
use crate::case::{Adapter, Backend, DType, Device, Op};
use crate::util::plural;
use crate::verdict::compare::{Comparison, Labeled};
use comfy_table::{presets, Cell, CellAlignment, ContentArrangement, Table};
use std::collections::{BTreeMap, BTreeSet};

/// The support table of `reports`, or one per backend build when one would be wider than
/// [`MAX_WIDTH`] (as `run` does).
pub fn tables(reports: &[Labeled], color: bool) -> Vec<String> {
    let grids: Vec<Grid> = reports.iter().map(|l| Grid::new(&l.report)).collect();
    let mut labels: BTreeMap<Backend, String> = BTreeMap::new();
    for l in reports {
        for c in &l.report.cases {
            labels
                .entry(c.point.backend)
                .or_insert_with(|| backend_label(&l.report, c.point.backend));
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
    let table_of = |cols: &[&(Backend, Device, DType)]| {
        let mut t = Table::new();
        t.set_content_arrangement(ContentArrangement::Disabled);
        t.load_preset(presets::UTF8_FULL_CONDENSED);
        if !color {
            t.force_no_tty();
        }
        let mut header = vec![Cell::new("adapter / op")];
        header.extend(cols.iter().map(|(b, d, dt)| {
            Cell::new(format!("{} {d}\n{dt}", labels[b])).set_alignment(CellAlignment::Center)
        }));
        t.set_header(header);
        for (a, op) in &rows {
            let mut row = vec![Cell::new(format!("{a} {op}"))];
            for (b, d, dt) in cols {
                let parts: Vec<String> = grids
                    .iter()
                    .map(|g| {
                        g.cell_text(&(*a, *op, *b, *d, *dt), " ")
                            .unwrap_or_else(|| "·".to_string())
                    })
                    .collect();
                row.push(Cell::new(parts.join(" / ")).set_alignment(CellAlignment::Center));
            }
            t.add_row(row);
        }
        t.to_string()
    };
    let all: Vec<&(Backend, Device, DType)> = columns.iter().collect();
    let whole = table_of(&all);
    let width = whole.lines().next().map_or(0, |l| l.chars().count());
    let tables = if width <= MAX_WIDTH {
        vec![whole]
    } else {
        // As `run` does: one table per backend build when one would be too wide to read.
        let mut builds: Vec<Backend> = columns.iter().map(|c| c.0).collect();
        builds.dedup();
        builds
            .into_iter()
            .map(|b| table_of(&all.iter().copied().filter(|c| c.0 == b).collect::<Vec<_>>()))
            .collect()
    };
    tables
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
