//! What a report means. [`expectations`] applies the matrix's rules to each case; the
//! [`snapshot`] is what was accepted; the [`gate`] compares a report with both and says what
//! changed; [`record`] writes rules from repeated runs; [`compare`] puts reports from several
//! environments side by side. Data only: `render` shows it.

pub mod compare;
pub mod expectations;
pub mod gate;
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
    report
}
