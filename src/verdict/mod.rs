//! What a report means. [`expectations`] applies the matrix's rules to each case; the
//! [`snapshot`] is what was accepted; the [`gate`] compares a report with both and says what
//! changed; [`history`] follows cells across builds in version order; [`record`] writes rules from repeated runs; [`compare`] puts reports from several
//! environments side by side. Data only: `render` shows it.

pub mod compare;
pub mod expectations;
pub mod gate;
pub mod history;
pub mod record;
pub mod snapshot;

use crate::environment::Environment;
use crate::report::{CaseReport, Report};
use crate::spec::Matrix;

/// The report of a run of `matrix` (named `name`, as the user gave it): its cases in matrix
/// order, each judged against the matrix's expectations. The binary and the tests assemble
/// reports through this one function.
pub fn assemble(
    name: &str,
    matrix: &Matrix,
    environment: Environment,
    mut cases: Vec<CaseReport>,
    elapsed_s: f64,
) -> Report {
    cases.sort_by_key(|c| c.index);
    let mut report = Report::from_cases(name, matrix.seed, environment, cases, elapsed_s);
    expectations::annotate(&mut report, &matrix.expectations);
    describe(&mut report, matrix);
    report
}

/// Give the report what a reader needs without the matrix: each used shape's dimensions (a
/// checkpoint layer's tensor and stored dtype), each used dtype's unit roundoff, and the
/// checkpoints used (their files hashed).
pub fn describe(report: &mut Report, matrix: &Matrix) {
    use crate::case::Layer;
    use crate::report::ShapeInfo;
    for c in &report.cases {
        if let Some(s) = matrix
            .cases
            .get(c.index)
            .map(|m| &m.shape)
            .filter(|s| s.name == c.shape)
        {
            let conv = c.point.layer == Layer::Conv2d;
            let info = report
                .shapes
                .entry(c.shape.clone())
                .or_insert_with(|| ShapeInfo::of(s, conv));
            if conv && info.kernel.is_none() {
                *info = ShapeInfo::of(s, true);
            }
            if let Some(l) = matrix.weights.layer(&s.name) {
                info.tensor = Some(l.tensor.clone());
                info.stored_dtype = Some(l.stored());
                info.saved_adapter = Some(l.adapter.is_some());
            }
        }
        report
            .units
            .insert(c.point.dtype.to_string(), c.point.dtype.unit_roundoff());
    }
    let used: std::collections::BTreeSet<String> = report
        .shapes
        .keys()
        .filter_map(|s| matrix.weights.layer(s).map(|l| l.entry.clone()))
        .collect();
    if !used.is_empty() {
        report.weights = matrix.weights.records(&used);
    }
}
