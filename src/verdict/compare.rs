//! `peft-compat compare`: reports from different machines or builds side by side, as data:
//! the environments each letter stands for, every case whose outcome differs between reports
//! that ran it (with both outcomes and errors), and the cases that ran in only some reports
//! (counted apart: a skip is never a difference in behaviour). `render::compare` draws it, with
//! the support table whose cells read `A / B / ...`.

use crate::outcome::OutcomeKind;
use crate::report::{CaseReport, Report};
use std::collections::BTreeMap;

/// One report, under the name it is shown by.
pub struct Labeled {
    pub label: String,
    pub report: Report,
}

/// A case that behaves differently between reports: `(label, outcome, detail, worst error in
/// units of roundoff)` per report that ran it. Behaviour is the outcome, the error's class, and
/// the error's size beyond its noise (see [`super::history`]).
#[derive(Debug, Clone, PartialEq)]
pub struct Difference {
    pub id: String,
    pub observed: Vec<(String, OutcomeKind, String, Option<f64>)>,
}

pub struct Comparison {
    pub labels: Vec<String>,
    /// One line per report: its label and environment.
    pub environments: Vec<String>,
    pub differences: Vec<Difference>,
    /// Cases that ran in only some reports: (label set, count, an example id).
    pub coverage: Vec<(String, usize, String)>,
    /// Why the reports may not be comparable ([`comparability`]).
    pub warnings: Vec<String>,
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
pub fn compare(reports: &[Labeled]) -> Comparison {
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
        // Behaviour: the outcome, for failures with a text the text with numbers masked (error
        // figures of a mismatch differ between machines without a change in behaviour), and
        // the error's size beyond its noise.
        let seen: Vec<(usize, super::history::Seen)> = ran
            .iter()
            .filter_map(|(i, c)| super::history::seen(c).map(|s| (*i, s)))
            .collect();
        let differs = seen
            .windows(2)
            .any(|w| super::history::change(&w[0].1, &w[1].1).is_some());
        if differs {
            differences.push(Difference {
                id: id.to_string(),
                observed: ran
                    .iter()
                    .zip(&seen)
                    .map(|((i, c), (_, s))| (letter(*i), c.outcome, detail(c), s.max_u))
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
        differences,
        coverage: coverage
            .into_iter()
            .map(|(who, (n, id))| (who, n, id))
            .collect(),
        warnings: comparability(
            &reports.iter().map(|l| l.report.clone()).collect::<Vec<_>>(),
            &reports.iter().map(|l| l.label.clone()).collect::<Vec<_>>(),
        ),
    }
}

/// Why `reports` may not be comparable, one line each: another seed draws other inputs;
/// another matrix (its text's fingerprint) may hold other shapes or rules under the same
/// ids; another thread count sums a multi-threaded GEMM in another order.
pub fn comparability(reports: &[Report], names: &[String]) -> Vec<String> {
    let Some(first) = reports.first() else {
        return Vec::new();
    };
    let name = |i: usize| {
        names
            .get(i)
            .cloned()
            .unwrap_or_else(|| format!("#{}", i + 1))
    };
    let mut out = Vec::new();
    for (i, r) in reports.iter().enumerate().skip(1) {
        if r.seed != first.seed {
            out.push(format!(
                "{} has seed {} and {} seed {}: their inputs differ, so do their errors",
                name(0),
                first.seed,
                name(i),
                r.seed
            ));
        }
        if r.matrix_fnv.is_some() && first.matrix_fnv.is_some() && r.matrix_fnv != first.matrix_fnv
        {
            out.push(format!(
                "{} ({}) and {} ({}) come from different matrix files: a case id may stand for other shapes or tolerances",
                name(0),
                first.matrix,
                name(i),
                r.matrix
            ));
        }
        if r.threads != first.threads {
            out.push(format!(
                "{} ran with {:?} threads per worker and {} with {:?}: a multi-threaded GEMM sums in another order",
                name(0),
                first.threads,
                name(i),
                r.threads
            ));
        }
    }
    out
}
