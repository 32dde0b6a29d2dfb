//! The checkpoint tables: for each `weights:` entry, one row per tensor and one column per
//! dtype, each cell the tensor's cases in that dtype (every backend, op and path): `✓ n` when
//! all n pass, else how many fail and the ops where they do. The support grid above
//! aggregates a checkpoint's tensors like any shapes; this says which tensor.

use crate::case::{DType, Op};
use crate::outcome::OutcomeKind;
use crate::report::Report;
use comfy_table::{Cell, CellAlignment, Table};
use std::collections::{BTreeMap, BTreeSet};

/// One cell's cases: how many ran, passed, failed (of them expected), and the failing ops.
#[derive(Default)]
struct Tally {
    ran: usize,
    failed: usize,
    expected: usize,
    skipped: usize,
    ops: BTreeSet<Op>,
}

impl Tally {
    fn text(&self, sep: &str) -> String {
        let ops = || {
            self.ops
                .iter()
                .map(|o| o.as_str())
                .collect::<Vec<_>>()
                .join(",")
        };
        match (self.ran, self.failed) {
            (0, _) if self.skipped > 0 => "skipped".to_string(),
            (0, _) => "·".to_string(),
            (n, 0) => format!("✓ {n}"),
            (n, f) if f == self.expected => format!("✗ {f}/{n} expected{sep}{}", ops()),
            (n, f) => format!("✗ {f}/{n}{sep}{}", ops()),
        }
    }
}

/// The tables with a heading line each, or `None` when the report has no checkpoint layer.
pub fn tables(report: &Report, sep: &str, style: &dyn Fn(&mut Table) -> String) -> Option<String> {
    if report.weights.is_empty() {
        return None;
    }
    let mut out = String::new();
    for (entry, rec) in &report.weights {
        let prefix = format!("{entry}:");
        let mut cells: BTreeMap<(String, DType), Tally> = BTreeMap::new();
        let mut dtypes: BTreeSet<DType> = BTreeSet::new();
        for c in &report.cases {
            let Some(module) = c.shape.strip_prefix(&prefix) else {
                continue;
            };
            dtypes.insert(c.point.dtype);
            let t = cells
                .entry((module.to_string(), c.point.dtype))
                .or_default();
            match c.outcome {
                OutcomeKind::Skipped => t.skipped += 1,
                k => {
                    t.ran += 1;
                    if k.is_failure() {
                        t.failed += 1;
                        t.expected += usize::from(c.expected_failure().is_some());
                        t.ops.insert(c.point.op);
                    }
                }
            }
        }
        if cells.is_empty() {
            continue;
        }
        let adapter = rec
            .adapter
            .as_ref()
            .map_or("A and B drawn from the seed".to_string(), |a| {
                format!(
                    "adapter {} ({}, r={}, alpha={})",
                    a.path,
                    if a.use_dora { "DoRA" } else { "LoRA" },
                    a.r,
                    a.lora_alpha
                )
            });
        out.push_str(&format!(
            "weights {entry}: {} ({}; {adapter})\n",
            rec.checkpoint,
            crate::util::plural(rec.tensors.len(), "tensor")
        ));
        let mut t = Table::new();
        let mut head = vec![Cell::new("tensor")];
        head.extend(
            dtypes
                .iter()
                .map(|d| Cell::new(d).set_alignment(CellAlignment::Center)),
        );
        t.set_header(head);
        let modules: BTreeSet<&String> = cells.keys().map(|k| &k.0).collect();
        for m in modules {
            let mut row = vec![Cell::new(m)];
            for d in &dtypes {
                let text = cells
                    .get(&(m.clone(), *d))
                    .map_or("·".to_string(), |t| t.text(sep));
                row.push(Cell::new(text).set_alignment(CellAlignment::Center));
            }
            t.add_row(row);
        }
        out.push_str(&style(&mut t));
        out.push('\n');
    }
    (!out.is_empty()).then_some(out)
}
