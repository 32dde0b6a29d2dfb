//! The CI gate: a fresh run (observed) against the accepted snapshot -> a verdict that lists each
//! changed case once.
//!
//! # Rules
//! - **regression**: a case that passed now fails (mismatch, nonfinite, unsupported, crashed); a
//!   case whose worst error grew beyond the allowed drift: more than [`DRIFT_FACTOR`] times the
//!   accepted error *and* more than [`NOISE_UNITS`] units of roundoff above it (so 0.3 u -> 0.7 u is
//!   noise, 3 u -> 7 u is not); an output whose L2 norm moved by more than its tolerance
//!   (relative): the numbers themselves changed, e.g. the math or the inputs did; a failing case
//!   that now fails differently (another outcome or error class).
//! - **unexpected success**: a case that failed now passes; fails the gate unless
//!   `--allow-improvements`, and the message says how to accept it.
//! - **missing**: a case of the matrix with no snapshot entry; **orphan**: a snapshot entry no
//!   case produces.
//! - **not checked here**: a case skipped because its device or backend is absent; never a pass
//!   and never an error.

use crate::judge::OutcomeKind;
use crate::report::Report;
use crate::snapshot::{self, Entry, Snapshot};
use std::collections::BTreeSet;

/// An error may grow by this factor before it is a regression...
pub const DRIFT_FACTOR: f64 = 2.0;
/// ...and must also grow by more than this many units of roundoff (the noise floor).
pub const NOISE_UNITS: f64 = 1.0;

/// How one case changed.
#[derive(Debug, Clone, PartialEq)]
pub enum ChangeKind {
    Regression,
    UnexpectedSuccess,
    Missing,
    Orphan,
}

impl ChangeKind {
    pub fn as_str(&self) -> &'static str {
        match self {
            ChangeKind::Regression => "regression",
            ChangeKind::UnexpectedSuccess => "unexpected success",
            ChangeKind::Missing => "missing from snapshot",
            ChangeKind::Orphan => "orphan snapshot entry",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    pub id: String,
    pub kind: ChangeKind,
    /// `before -> after, numbers, error text`.
    pub detail: String,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct Verdict {
    pub changes: Vec<Change>,
    /// Cases skipped here (device or backend absent): (id, reason).
    pub not_checked: Vec<(String, String)>,
    pub checked: usize,
    pub allow_improvements: bool,
}

impl Verdict {
    /// Whether this change fails the gate (an unexpected success may be allowed).
    fn fails(&self, c: &Change) -> bool {
        !(self.allow_improvements && c.kind == ChangeKind::UnexpectedSuccess)
    }

    /// The changes that fail the gate.
    pub fn failures(&self) -> impl Iterator<Item = &Change> {
        self.changes.iter().filter(|c| self.fails(c))
    }

    pub fn passed(&self) -> bool {
        self.failures().next().is_none()
    }

    /// The human verdict: each changed case once, then what to do.
    pub fn render(&self, matrix: &str) -> String {
        let mut out = String::new();
        for c in &self.changes {
            out.push_str(&format!(
                "{} {}: {}: {}\n",
                if self.fails(c) { "FAIL" } else { "note" },
                c.id,
                c.kind.as_str(),
                c.detail
            ));
        }
        if !self.not_checked.is_empty() {
            out.push_str(&format!(
                "not checked here: {} cases (device or backend absent), e.g. {}: {}\n",
                self.not_checked.len(),
                self.not_checked[0].0,
                self.not_checked[0].1
            ));
        }
        let failed = self.failures().count();
        if failed == 0 {
            out.push_str(&format!(
                "gate passed: {} cases checked against the snapshot\n",
                self.checked
            ));
        } else {
            out.push_str(&format!(
                "gate FAILED: {failed} changes ({} cases compared with the snapshot).\n\
                 If the change is intended, accept it: run `peft-compat run {matrix} --check` outside CI \
                 (it writes the observed snapshot as a .snap.new beside the accepted one), then \
                 `cargo insta review` (or `cargo insta accept`) and commit the snapshot.\n",
                self.checked
            ));
        }
        out
    }
}

fn describe(e: &Entry) -> String {
    let worst = e
        .outputs
        .iter()
        .max_by(|a, b| a.1.err_units.total_cmp(&b.1.err_units))
        .map(|(n, o)| format!(" ({n} {} u)", o.err_units))
        .unwrap_or_default();
    match &e.error_class {
        Some(err) => format!("{}{worst} [{err}]", e.outcome),
        None => format!("{}{worst}", e.outcome),
    }
}

/// Compare a fresh report with the accepted snapshot.
pub fn check(report: &Report, accepted: &Snapshot, allow_improvements: bool) -> Verdict {
    let mut v = Verdict {
        allow_improvements,
        ..Verdict::default()
    };
    let produced: BTreeSet<&str> = report.cases.iter().map(|c| c.id.as_str()).collect();
    for c in &report.cases {
        // Every skip means the device or backend is absent here.
        if c.outcome == OutcomeKind::Skipped {
            v.not_checked
                .push((c.id.clone(), c.error.clone().unwrap_or_default()));
            continue;
        }
        let now = snapshot::entry(c);
        let Some(before) = accepted.get(&c.id) else {
            v.changes.push(Change {
                id: c.id.clone(),
                kind: ChangeKind::Missing,
                detail: format!("now {}; no accepted entry", describe(&now)),
            });
            continue;
        };
        if before.outcome == OutcomeKind::Skipped {
            // Accepted where this case could not run: there is no baseline to compare with.
            v.not_checked.push((
                c.id.clone(),
                "no baseline: skipped when the snapshot was recorded".into(),
            ));
            continue;
        }
        v.checked += 1;
        let tolerance = c.metrics.as_ref().map(|m| m.tolerance).unwrap_or(0.0);
        let detail = |why: String| format!("{} -> {}: {why}", describe(before), describe(&now));
        let change = match (before.outcome.is_pass(), now.outcome.is_pass()) {
            (true, false) => Some((ChangeKind::Regression, detail(format!("now {}", c.outcome)))),
            (false, true) => Some((
                ChangeKind::UnexpectedSuccess,
                detail("a case that failed now passes".into()),
            )),
            (false, false)
                if before.outcome != now.outcome || before.error_class != now.error_class =>
            {
                Some((ChangeKind::Regression, detail("fails differently".into())))
            }
            _ => numeric_drift(before, &now, tolerance)
                .map(|why| (ChangeKind::Regression, detail(why))),
        };
        if let Some((kind, mut detail)) = change {
            if let Some(err) = &c.error {
                if !detail.contains(err.as_str()) {
                    detail.push_str(&format!("; error: {}", err.lines().next().unwrap_or("")));
                }
            }
            v.changes.push(Change {
                id: c.id.clone(),
                kind,
                detail,
            });
        }
    }
    for id in accepted.keys().filter(|id| !produced.contains(id.as_str())) {
        v.changes.push(Change {
            id: id.clone(),
            kind: ChangeKind::Orphan,
            detail: format!(
                "accepted as {} but no case of the matrix produces it",
                describe(&accepted[id])
            ),
        });
    }
    v
}

/// The drift rules for two runs that both produced numbers.
fn numeric_drift(before: &Entry, now: &Entry, tolerance: f64) -> Option<String> {
    for (name, b) in &before.outputs {
        let Some(n) = now.outputs.get(name) else {
            return Some(format!("output {name} is gone"));
        };
        if n.err_units > DRIFT_FACTOR * b.err_units && n.err_units - b.err_units > NOISE_UNITS {
            return Some(format!(
                "{name}: error grew from {} u to {} u (allowed: x{DRIFT_FACTOR} and +{NOISE_UNITS} u)",
                b.err_units, n.err_units
            ));
        }
        let moved = (n.norm - b.norm).abs() / b.norm.abs().max(f64::MIN_POSITIVE);
        if moved > tolerance.max(1e-3) {
            return Some(format!(
                "{name}: norm moved from {} to {} ({moved:.1e} relative, over {:.1e})",
                b.norm,
                n.norm,
                tolerance.max(1e-3)
            ));
        }
    }
    now.outputs
        .keys()
        .find(|k| !before.outputs.contains_key(*k))
        .map(|k| format!("new output {k}"))
}
