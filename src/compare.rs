//! `peft-compat compare`: reports from different machines or builds side by side.
//!
//! One support table whose cells read `A / B / ...` (one verdict per report, `·` where a
//! report does not have the cell), the environments each letter stands for, and every case whose
//! outcome differs between reports that ran it, with both outcomes and errors. Cases that ran in
//! some reports and were skipped or absent in others are counted apart: a skip is never a
//! difference in behaviour.

use crate::case::{Adapter, Backend, DType, Device, Op};
use crate::judge::OutcomeKind;
use crate::render::plural;
use crate::render::table::{backend_label, Grid, MAX_WIDTH};
use crate::report::{CaseReport, Report};
use crate::snapshot::error_class;
use comfy_table::{presets, Cell, CellAlignment, ContentArrangement, Table};
use std::collections::{BTreeMap, BTreeSet};

/// One report, under the name it is shown by.
pub struct Labeled {
    pub label: String,
    pub report: Report,
}

/// A case that behaves differently between reports: `(label, outcome, detail)` per report
/// that ran it.
#[derive(Debug, Clone, PartialEq)]
pub struct Difference {
    pub id: String,
    pub observed: Vec<(String, OutcomeKind, String)>,
}

pub struct Comparison {
    pub labels: Vec<String>,
    /// One line per report: its label and environment.
    pub environments: Vec<String>,
    /// The table, or one per backend build when one would be wider than [`MAX_WIDTH`].
    pub tables: Vec<String>,
    pub differences: Vec<Difference>,
    /// Cases that ran in only some reports: (label set, count, an example id).
    pub coverage: Vec<(String, usize, String)>,
}

fn letter(i: usize) -> String {
    ((b'A' + (i % 26) as u8) as char).to_string()
}

fn environment_line(l: &Labeled) -> String {
    let e = &l.report.environment;
    let gpu = if e.gpus.is_empty() {
        "no GPU".to_string()
    } else {
        e.gpus.join(", ")
    };
    format!(
        "{} ({}, {} cores, {gpu}; {})",
        l.label,
        e.cpu_model,
        e.cpu_count,
        e.libraries_line()
    )
}

/// A failure in one line (the error, or the error figures); empty for a pass.
fn detail(c: &CaseReport) -> String {
    match c.outcome {
        OutcomeKind::Pass => String::new(),
        _ => c.failure_detail(),
    }
}

/// Compare `reports` (at least two).
pub fn compare(reports: &[Labeled], color: bool) -> Comparison {
    let grids: Vec<Grid> = reports.iter().map(|l| Grid::new(&l.report)).collect();
    let mut labels: BTreeMap<Backend, String> = BTreeMap::new();
    for l in reports {
        for c in &l.report.cases {
            labels
                .entry(c.backend)
                .or_insert_with(|| backend_label(&l.report, c.backend));
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

    // Case by case: differences between the reports that ran a case, and coverage.
    let mut by_id: BTreeMap<&str, Vec<Option<&CaseReport>>> = BTreeMap::new();
    for (i, l) in reports.iter().enumerate() {
        for c in &l.report.cases {
            by_id
                .entry(&c.id)
                .or_insert_with(|| vec![None; reports.len()])[i] = Some(c);
        }
    }
    let mut differences = Vec::new();
    let mut coverage: BTreeMap<String, (usize, String)> = BTreeMap::new();
    for (id, seen) in &by_id {
        let ran: Vec<(usize, &CaseReport)> = seen
            .iter()
            .enumerate()
            .filter_map(|(i, c)| {
                c.filter(|c| c.outcome != OutcomeKind::Skipped)
                    .map(|c| (i, c))
            })
            .collect();
        if ran.len() < reports.len() && !ran.is_empty() {
            let who: Vec<String> = ran.iter().map(|(i, _)| letter(*i)).collect();
            let e = coverage.entry(who.join("+")).or_insert((0, id.to_string()));
            e.0 += 1;
        }
        // Behaviour: the outcome, and for failures with a text, the text with numbers masked
        // (error figures of a mismatch differ between machines without a change in behaviour).
        let key = |c: &CaseReport| (c.outcome, c.error.as_deref().map(error_class));
        let first = ran.first().map(|(_, c)| key(c));
        let differs = ran.iter().any(|(_, c)| Some(key(c)) != first);
        if differs {
            differences.push(Difference {
                id: id.to_string(),
                observed: ran
                    .iter()
                    .map(|(i, c)| (letter(*i), c.outcome, detail(c)))
                    .collect(),
            });
        }
    }
    Comparison {
        labels: (0..reports.len()).map(letter).collect(),
        environments: reports
            .iter()
            .enumerate()
            .map(|(i, l)| format!("{} = {}", letter(i), environment_line(l)))
            .collect(),
        tables,
        differences,
        coverage: coverage
            .into_iter()
            .map(|(who, (n, id))| (who, n, id))
            .collect(),
    }
}

impl Comparison {
    pub fn render_text(&self, max_differences: usize) -> String {
        let mut out = format!("cells read {}:\n", self.labels.join(" / "));
        for e in &self.environments {
            out.push_str(&format!("  {e}\n"));
        }
        for t in &self.tables {
            out.push_str(t);
            out.push('\n');
        }
        out.push_str("  · = the report has no such cell; – = skipped there\n");
        for (who, n, id) in &self.coverage {
            out.push_str(&format!(
                "ran only in {who}: {} (e.g. {id})\n",
                plural(*n, "case")
            ));
        }
        if self.differences.is_empty() {
            out.push_str("\nno case behaves differently where both ran\n");
        } else {
            out.push_str(&format!(
                "\ndiffering cases ({}):\n",
                self.differences.len()
            ));
            for d in self.differences.iter().take(max_differences) {
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
            if self.differences.len() > max_differences {
                out.push_str(&format!(
                    "  ... and {} more\n",
                    self.differences.len() - max_differences
                ));
            }
        }
        out
    }
}
