//! The history tables: per series (libtorch builds, PEFT builds), a row per cell, a column per
//! build in version order, cells the outcome symbol (`✓`, `M` mismatch, `N` nonfinite,
//! `U` unsupported, `C` crashed, `T` timeout, `·` not run), and a last column naming the first
//! release where each change happened.

use crate::outcome::OutcomeKind;
use crate::verdict::history::{History, Seen};
use comfy_table::{presets, Cell, CellAlignment, Table};

fn symbol(s: &Option<Seen>) -> &'static str {
    match s.as_ref().map(|s| s.outcome) {
        None | Some(OutcomeKind::Skipped) => "·",
        Some(OutcomeKind::Pass) => "✓",
        Some(OutcomeKind::Mismatch) => "M",
        Some(OutcomeKind::Nonfinite) => "N",
        Some(OutcomeKind::Unsupported) => "U",
        Some(OutcomeKind::Crashed) => "C",
        Some(OutcomeKind::Timeout) => "T",
    }
}

/// A cell: the symbol, and with `units` the worst error in units of roundoff.
fn cell(s: &Option<Seen>, units: bool) -> String {
    match s.as_ref().and_then(|s| s.max_u).filter(|_| units) {
        Some(u) => format!("{} {u:.1}", symbol(s)),
        None => symbol(s).to_string(),
    }
}

/// The tables (every row with `all`, else the rows that changed and a count of the rest), in
/// box characters or Markdown; `units` adds each build's worst error in u to its cell.
pub fn text(h: &History, all: bool, markdown: bool, units: bool) -> String {
    let mut out = String::new();
    for w in &h.warnings {
        out.push_str(&format!("warning: {w}\n"));
    }
    for s in &h.series {
        let mut t = Table::new();
        let mut head = vec![Cell::new("cell")];
        head.extend(
            s.columns
                .iter()
                .map(|c| Cell::new(c).set_alignment(CellAlignment::Center)),
        );
        head.push(Cell::new("first changed"));
        t.set_header(head);
        let mut unchanged = 0;
        for r in &s.rows {
            if !all && r.changes.is_empty() {
                unchanged += 1;
                continue;
            }
            let mut row = vec![Cell::new(&r.cell)];
            row.extend(
                r.seen
                    .iter()
                    .map(|x| Cell::new(cell(x, units)).set_alignment(CellAlignment::Center)),
            );
            row.push(Cell::new(r.summary(&s.columns)));
            t.add_row(row);
        }
        if markdown {
            t.load_preset(presets::ASCII_MARKDOWN);
            out.push_str(&format!(
                "### {} builds: {}\n\n",
                s.library,
                s.backends.join(", ")
            ));
        } else {
            t.load_preset(presets::UTF8_FULL_CONDENSED);
            out.push_str(&format!(
                "{} builds: {}\n",
                s.library,
                s.backends.join(", ")
            ));
        }
        t.force_no_tty();
        if t.row_count() > 0 {
            out.push_str(&t.to_string());
            out.push('\n');
        }
        if unchanged > 0 {
            out.push_str(&format!(
                "{}{} unchanged across every build that ran them (--all lists them)\n",
                if markdown { "\n" } else { "" },
                crate::util::plural(unchanged, "cell")
            ));
        }
        out.push('\n');
    }
    if h.series.is_empty() {
        out.push_str("no libtorch or PEFT builds in these reports: nothing has a history\n");
    }
    out
}
