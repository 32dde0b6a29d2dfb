//! The CI gate: a fresh run (observed) against the accepted snapshot -> a verdict that lists each
//! changed case once.
//!
//! # Rules
//! - **regression**: a case that passed now fails (mismatch, nonfinite, unsupported, crashed, timeout); a
//!   case whose worst error grew beyond the allowed drift: more than [`DRIFT_FACTOR`] times the
//!   accepted error *and* by more than the noise floor: [`NOISE_UNITS`] units of roundoff, or
//!   [`NOISE_SHARE`] of the case's tolerance where that is more (so 0.3 u -> 0.7 u is noise, and
//!   so is 0 u -> 3 u on an f64 case allowed 72 u, where another CPU's GEMM kernel sums in
//!   another order; 3 u -> 7 u on an f16 case allowed 8 u is not); an output whose L2 norm moved by more than its tolerance
//!   (relative): the numbers themselves changed, e.g. the math or the inputs did; a failing case
//!   that now fails differently (another outcome or error class).
//! - **unexpected success**: a case that failed now passes; fails the gate unless
//!   `--allow-improvements`, and the message says how to accept it.
//! - **missing**: a case of the matrix with no snapshot entry; **orphan**: a snapshot entry no
//!   case of the selection produces (with `--filter`, entries outside the filter are not
//!   judged at all).
//! - **tolerance changed**: a case's tolerance differs from the accepted one (a matrix rule or
//!   the model changed): every error is judged against another bar, so it fails until accepted.
//! - **seed changed**: the snapshot was recorded with another seed: every input differs; said
//!   once, and it fails the gate.
//! - **expectations**: where the matrix declares an expected outcome for a case (with a reason,
//!   maybe an error pattern and an environment condition), the expectation decides: a case that
//!   breaks it is a regression (or an unexpected success, when a declared failure passes) even if
//!   the snapshot agrees; a change from the snapshot that meets it is a note, not a failure.
//! - **new here**: a case that ran, whose accepted entry records it as skipped (the snapshot
//!   was made where its device or backend was absent, e.g. CUDA cases on a CPU runner): there is
//!   no baseline to compare with, so it fails the gate unless `--allow-new`, and the `.snap.new`
//!   carries the new entries beside every accepted one, so a GPU runner records its baseline
//!   through the normal accept flow.
//! - **not checked here**: a case skipped because its device is absent (or too small, by the
//!   resource guard), its backend is declared not expected here (`--skip-backend`), or PEFT
//!   refuses the combination; never a pass and never an error.
//! - **lost backend**: a backend whose worker should have run and could not (missing, not
//!   executable, another protocol, died or hung at start). Its cases are not checked, and that
//!   fails the gate: a CI runner whose libtorch stopped loading must not stay green.

use super::snapshot::{self, Entry, Snapshot};
use crate::outcome::OutcomeKind;
use crate::outcome::SkipKind;
use crate::report::Status;
use crate::report::{CaseReport, GateChange, GateRecord, LostBackend, Report};
use crate::spec::rules::Expected;
use std::collections::BTreeSet;

/// An error may grow by this factor before it is a regression...
pub const DRIFT_FACTOR: f64 = 2.0;
/// ...and must also grow by more than this many units of roundoff (the noise floor)...
pub const NOISE_UNITS: f64 = 1.0;
/// ...or by more than this share of the case's tolerance, where that is larger: the same build
/// on another CPU model (AVX2 or AVX-512 kernels) or thread count sums in another order, which
/// moves an f32/f64 error by a few roundings out of the tens its tolerance allows.
pub const NOISE_SHARE: f64 = 0.25;

/// How one case changed.
#[derive(Debug, Clone, PartialEq)]
pub enum ChangeKind {
    Regression,
    UnexpectedSuccess,
    Missing,
    Orphan,
    /// Ran here, but the snapshot recorded it as skipped: no baseline for this environment.
    New,
    /// The outcome differs from the snapshot, as a matrix expectation says it should: a note,
    /// never a failure.
    Expected,
    /// The case's tolerance differs from the accepted one.
    ToleranceChanged,
}

impl ChangeKind {
    pub fn as_str(&self) -> &'static str {
        match self {
            ChangeKind::Regression => "regression",
            ChangeKind::UnexpectedSuccess => "unexpected success",
            ChangeKind::Missing => "missing from snapshot",
            ChangeKind::Orphan => "orphan snapshot entry",
            ChangeKind::New => "new here (no baseline)",
            ChangeKind::Expected => "changed as expected",
            ChangeKind::ToleranceChanged => "tolerance changed",
        }
    }
}

#[derive(Debug, Clone, PartialEq)]
pub struct Change {
    pub id: String,
    pub kind: ChangeKind,
    /// `before -> after, numbers, error text`.
    pub detail: String,
    /// The matrix rule (`file:line`) this change breaks, when an expectation decided it: the
    /// fix is in the matrix, not in the snapshot.
    pub rule: Option<String>,
}

#[derive(Debug, Clone, PartialEq, Default)]
pub struct Verdict {
    pub changes: Vec<Change>,
    /// Cases skipped here (device or backend absent): (id, reason).
    pub not_checked: Vec<(String, String)>,
    pub checked: usize,
    /// Checked cases that fail as the matrix expects (counted in `checked`).
    pub expected_failures: usize,
    pub allow_improvements: bool,
    /// `--allow-new`: new cases are noted, not failures.
    pub allow_new: bool,
    /// Backends that should have run and could not: each fails the gate.
    pub lost: Vec<LostBackend>,
    /// Setup changes that fail the gate on their own, said once (the seed changed).
    pub problems: Vec<String>,
    /// Failing cases the snapshot accepts with no expectation to say why: not a change, but
    /// never silent either.
    pub unexplained: Vec<String>,
    /// The command that records an accepted change (`peft-compat run M --check`, with the
    /// user's `--snapshot`); `None`: the plain one for the matrix.
    pub command: Option<String>,
}

impl Verdict {
    /// Whether this change fails the gate (an unexpected success may be allowed).
    pub fn fails(&self, c: &Change) -> bool {
        match c.kind {
            ChangeKind::Expected => false,
            ChangeKind::UnexpectedSuccess => !self.allow_improvements,
            ChangeKind::New => !self.allow_new,
            _ => true,
        }
    }

    /// The changes that fail the gate.
    pub fn failures(&self) -> impl Iterator<Item = &Change> {
        self.changes.iter().filter(|c| self.fails(c))
    }

    pub fn passed(&self) -> bool {
        self.failures().next().is_none() && self.lost.is_empty() && self.problems.is_empty()
    }

    /// The verdict as the JSON report carries it.
    pub fn record(&self) -> GateRecord {
        GateRecord {
            passed: self.passed(),
            checked: self.checked,
            not_checked: self.not_checked.len(),
            changes: self
                .changes
                .iter()
                .map(|c| GateChange {
                    id: c.id.clone(),
                    kind: c.kind.as_str().to_string(),
                    detail: c.detail.clone(),
                    fails: self.fails(c),
                })
                .collect(),
            problems: self
                .lost
                .iter()
                .map(|l| format!("backend lost: {}", l.describe()))
                .chain(self.problems.iter().cloned())
                .collect(),
        }
    }

    /// Fail the gate once when the snapshot was recorded with another seed than the run's.
    pub fn check_seed(&mut self, accepted: Option<u64>, now: u64) {
        if let Some(was) = accepted.filter(|&was| was != now) {
            self.problems.push(format!(
                "the seed changed: the snapshot was recorded with seed {was}, this matrix has \
                 seed {now}, so every input differs; restore the seed, or record the snapshot \
                 again"
            ));
        }
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

/// A case's expectation, when the matrix has one and the case breaks it.
fn expectation_change(c: &CaseReport, now: &Entry) -> Option<(ChangeKind, String)> {
    let e = c.expected.as_ref()?;
    let declared = format!("expected {} ({}: {})", e.outcome, e.rule, e.reason);
    match e.status {
        Status::Met | Status::NotRun => None,
        Status::UnexpectedPass => Some((
            ChangeKind::UnexpectedSuccess,
            format!(
                "{declared} -> {}: the declared failure is gone; if intended, remove or narrow the \
                 expectation at {}",
                describe(now),
                e.rule
            ),
        )),
        Status::Violated => {
            let why = match (&e.error, c.outcome.is_failure()) {
                (Some(p), true) if e.outcome.admits(c.outcome) => {
                    format!("the error does not match `{p}`")
                }
                _ => format!("now {}", c.outcome),
            };
            Some((
                ChangeKind::Regression,
                format!("{declared} -> {}: {why}", describe(now)),
            ))
        }
    }
}

/// Compare a fresh report with the accepted snapshot and the matrix's expectations (already
/// attached to the report's cases, see [`crate::verdict::expectations::annotate`]).
///
/// Where an expectation governs a case, it decides whether the outcome is acceptable: an
/// outcome that differs from the snapshot but meets the expectation is reported as a note
/// (`changed as expected`), not a failure; a `flaky` case's numbers are not compared.
pub fn check(report: &Report, accepted: &Snapshot, allow_improvements: bool) -> Verdict {
    check_with(
        report,
        accepted,
        GatePolicy {
            allow_improvements,
            allow_new: false,
        },
    )
}

/// What the user lets pass: cases that newly pass (`--allow-improvements`), cases that ran
/// here without a baseline (`--allow-new`).
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq)]
pub struct GatePolicy {
    pub allow_improvements: bool,
    pub allow_new: bool,
}

/// [`check`] under a [`GatePolicy`].
pub fn check_with(report: &Report, accepted: &Snapshot, policy: GatePolicy) -> Verdict {
    let mut v = Verdict {
        allow_improvements: policy.allow_improvements,
        allow_new: policy.allow_new,
        lost: report.lost_backends(),
        ..Verdict::default()
    };
    let produced: BTreeSet<&str> = report.cases.iter().map(|c| c.id.as_str()).collect();
    for c in &report.cases {
        match c.skip_kind() {
            // Counted once per backend in `lost`.
            Some(SkipKind::BackendLost) => continue,
            Some(_) => {
                v.not_checked
                    .push((c.id.clone(), c.error.clone().unwrap_or_default()));
                continue;
            }
            None => {}
        }
        if c.expected_failure().is_some() {
            v.expected_failures += 1;
        }
        let now = snapshot::entry(c);
        let mut rule = None;
        let change = if let Some(change) = expectation_change(c, &now) {
            v.checked += 1;
            rule = c.expected.as_ref().map(|e| e.rule.clone());
            Some(change)
        } else {
            match accepted.get(&c.id) {
                None => Some((
                    ChangeKind::Missing,
                    format!("now {}; no accepted entry", describe(&now)),
                )),
                Some(before) if before.outcome == OutcomeKind::Skipped => {
                    // Accepted where this case could not run: it ran here, and nothing says
                    // what it should give. Never a silent pass.
                    let why = before.error_class.as_deref().unwrap_or("skipped");
                    Some((
                        ChangeKind::New,
                        format!(
                            "now {}; the snapshot has no baseline for it (recorded as skipped: \
                             {why}); accept the .snap.new to record one, or pass --allow-new",
                            describe(&now)
                        ),
                    ))
                }
                Some(before) => {
                    v.checked += 1;
                    compare(before, &now, c)
                }
            }
        };
        if let Some((kind, mut detail)) = change {
            if c.error.is_some() {
                let first = c.failure_detail();
                if !detail.contains(&first) {
                    detail.push_str(&format!("; error: {first}"));
                }
            }
            v.changes.push(Change {
                id: c.id.clone(),
                kind,
                detail,
                rule,
            });
        } else if c.outcome.is_failure() && c.expected.is_none() {
            v.unexplained.push(c.id.clone());
        }
    }
    let orphans = accepted
        .keys()
        .filter(|id| !produced.contains(id.as_str()) && report.selects(id));
    for id in orphans {
        v.changes.push(Change {
            id: id.clone(),
            kind: ChangeKind::Orphan,
            detail: format!(
                "accepted as {} but no case of the matrix produces it",
                describe(&accepted[id])
            ),
            rule: None,
        });
    }
    v
}

/// One case against its accepted entry (its expectation, if any, is met).
fn compare(before: &Entry, now: &Entry, c: &CaseReport) -> Option<(ChangeKind, String)> {
    let tolerance = c.metrics.as_ref().map(|m| m.tolerance).unwrap_or(0.0);
    let detail = |why: String| format!("{} -> {}: {why}", describe(before), describe(now));
    let outcome_changed = before.outcome != now.outcome || before.error_class != now.error_class;
    let expected = c.expected.as_ref();
    match (expected, outcome_changed) {
        (Some(e), true) => Some((
            ChangeKind::Expected,
            detail(format!(
                "as the matrix expects ({}: {}); accept the snapshot to record it",
                e.rule, e.reason
            )),
        )),
        (_, false) if tolerance_changed(before, now) => Some((
            ChangeKind::ToleranceChanged,
            detail(format!(
                "the tolerance changed from {:.2e} to {:.2e} (a tolerance rule of the matrix, or \
                 the model, changed): errors are now held to another bar",
                before.tolerance.unwrap_or_default(),
                now.tolerance.unwrap_or_default()
            )),
        )),
        (Some(e), false) if e.outcome == Expected::Flaky => None,
        (_, false) => {
            let tol_units = tolerance / c.point.dtype.unit_roundoff();
            numeric_drift(before, now, tolerance, tol_units)
                .map(|why| (ChangeKind::Regression, detail(why)))
        }
        (None, true) => Some(match (before.outcome.is_pass(), now.outcome.is_pass()) {
            (true, _) => (ChangeKind::Regression, detail(format!("now {}", c.outcome))),
            (false, true) => (
                ChangeKind::UnexpectedSuccess,
                detail("a case that failed now passes".into()),
            ),
            (false, false) => (ChangeKind::Regression, detail("fails differently".into())),
        }),
    }
}

/// Whether both entries record a tolerance and they differ (both are rounded alike).
fn tolerance_changed(before: &Entry, now: &Entry) -> bool {
    matches!((before.tolerance, now.tolerance), (Some(a), Some(b)) if a != b)
}

/// The drift rules for two runs that both produced numbers.
fn numeric_drift(before: &Entry, now: &Entry, tolerance: f64, tol_units: f64) -> Option<String> {
    let floor = NOISE_UNITS.max(NOISE_SHARE * tol_units);
    for (name, b) in &before.outputs {
        let Some(n) = now.outputs.get(name) else {
            return Some(format!("output {name} is gone"));
        };
        if n.err_units > DRIFT_FACTOR * b.err_units && n.err_units - b.err_units > floor {
            return Some(format!(
                "{name}: error grew from {} u to {} u (allowed: x{DRIFT_FACTOR} and +{} u)",
                b.err_units,
                n.err_units,
                crate::verdict::snapshot::sig(floor, 2)
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
    if let (Some(b), Some(n)) = (before.agreement, now.agreement) {
        if !(n <= DRIFT_FACTOR * b || n - b <= NOISE_UNITS) {
            return Some(format!(
                "agreement with the tch build grew from {b} u to {n} u (allowed: x{DRIFT_FACTOR} \
                 and +{NOISE_UNITS} u): our restatement and PEFT's code drift apart"
            ));
        }
    }
    now.outputs
        .keys()
        .find(|k| !before.outputs.contains_key(*k))
        .map(|k| format!("new output {k}"))
}
