//! The agreement figures: for each PEFT build and dtype, the largest difference of its outputs
//! from the tch build's on the same libtorch (`agreement.max_u` of its cases), and the op where
//! it is. 0 means PEFT's own code and our restatement gave the same bits.

use crate::case::{Backend, DType, Op};
use crate::report::Report;
use comfy_table::{Cell, CellAlignment, Table};
use std::collections::BTreeMap;

pub const NOTE: &str = "agreement: the largest difference of a PEFT build's outputs from the tch build's on the \
same libtorch (same case, same inputs), relative to the output's scale, in units of roundoff of the dtype, and the \
op where it is (every case's in --json: `agreement`)";

/// The table, or `None` when no case carries an agreement.
pub fn table(report: &Report, sep: &str, style: &dyn Fn(&mut Table) -> String) -> Option<String> {
    let mut worst: BTreeMap<(Backend, DType), (f64, Op)> = BTreeMap::new();
    for c in &report.cases {
        let Some(a) = &c.agreement else { continue };
        let e = worst
            .entry((c.point.backend, c.point.dtype))
            .or_insert((a.max_u, c.point.op));
        if a.max_u > e.0 || a.max_u.is_nan() {
            *e = (a.max_u, c.point.op);
        }
    }
    if worst.is_empty() {
        return None;
    }
    let mut builds: Vec<Backend> = worst.keys().map(|k| k.0).collect();
    builds.dedup();
    let mut dtypes: Vec<DType> = worst.keys().map(|k| k.1).collect();
    dtypes.sort();
    dtypes.dedup();
    let mut t = Table::new();
    let mut head = vec![Cell::new("PEFT build (vs tch)")];
    head.extend(
        dtypes
            .iter()
            .map(|d| Cell::new(d).set_alignment(CellAlignment::Center)),
    );
    t.set_header(head);
    for b in builds {
        let twin = b
            .tch_twin()
            .map_or(String::new(), |t| format!("{sep}vs {t}"));
        let mut row = vec![Cell::new(format!("{b}{twin}"))];
        for d in &dtypes {
            let text = match worst.get(&(b, *d)) {
                None => "·".to_string(),
                Some((u, _)) if *u == 0.0 => "0".to_string(),
                // A build that computes something else (a release's bug) is millions of units
                // off: in exponent form, so the column stays narrow.
                Some((u, op)) if *u >= 1e4 => format!("{u:.1e} u{sep}{op}"),
                Some((u, op)) => format!("{u:.2} u{sep}{op}"),
            };
            row.push(Cell::new(text).set_alignment(CellAlignment::Center));
        }
        t.add_row(row);
    }
    Some(style(&mut t))
}
