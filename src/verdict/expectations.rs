//! The matrix's expectations applied to a report: each case gets the rule that governs it (the
//! last active rule whose pattern matches, judged per backend build against that build's
//! library versions) and how its outcome stands against it; rules that do not apply here are
//! listed with the conditions that do not hold.

use crate::case::{Backend, Coords};
use crate::environment::Environment;
use crate::outcome::OutcomeKind;
use crate::report::{CaseExpectation, InactiveRule, Report, Status};
use crate::spec::rules::Expectation;

/// How an observed outcome and its error text stand against a rule.
pub fn judge(rule: &Expectation, outcome: OutcomeKind, error: Option<&str>) -> Status {
    if outcome == OutcomeKind::Skipped {
        return Status::NotRun;
    }
    if outcome.is_pass() {
        return if rule.written.expect.admits(outcome) {
            Status::Met
        } else {
            Status::UnexpectedPass
        };
    }
    if !rule.written.expect.admits(outcome) {
        return Status::Violated;
    }
    match &rule.error {
        Some(re) if !error.is_some_and(|t| re.is_match(t)) => Status::Violated,
        _ => Status::Met,
    }
}

/// The builds rules are judged for: the default ones, every build the environment records (a
/// `peft@X+torchY` a matrix named) and every build of `seen` (a `tch@X.Y.Z` of a sweep).
fn builds(env: &Environment, seen: &[Backend]) -> Vec<Backend> {
    let mut v: Vec<Backend> = Backend::ALL.to_vec();
    v.extend(
        env.backends
            .keys()
            .filter_map(|k| k.parse::<Backend>().ok()),
    );
    v.extend_from_slice(seen);
    v.sort();
    v.dedup();
    v
}

/// The rules whose conditions hold, per backend build (each judged against its own library
/// versions), in file order; evaluated once per build rather than once per case.
pub struct Active<'a> {
    by_backend: Vec<(Backend, Vec<&'a Expectation>)>,
}

impl<'a> Active<'a> {
    /// `seen`: the builds the cases to judge use, beyond the defaults and the environment's.
    pub fn new(rules: &'a [Expectation], env: &Environment, seen: &[Backend]) -> Active<'a> {
        Active {
            by_backend: builds(env, seen)
                .into_iter()
                .map(|b| {
                    let env = env.for_backend(b);
                    (b, rules.iter().filter(|r| r.active(&env)).collect())
                })
                .collect(),
        }
    }

    /// The rule that governs a case: the last active rule (for its build) whose pattern matches.
    pub fn governing(&self, c: &Coords) -> Option<&'a Expectation> {
        self.by_backend
            .iter()
            .find(|(b, _)| *b == c.point.backend)
            .and_then(|(_, rules)| rules.iter().rev().find(|r| r.written.pattern.matches(c)))
            .copied()
    }

    /// Whether a rule holds for some build of `backends`.
    pub fn active_for_any(&self, rule: &Expectation, backends: &[Backend]) -> bool {
        self.by_backend
            .iter()
            .filter(|(b, _)| backends.contains(b))
            .any(|(_, rules)| rules.iter().any(|r| std::ptr::eq(*r, rule)))
    }
}

/// Attach to every case of the report the expectation that governs it, judged against what was
/// observed; list the rules that do not apply here.
pub fn annotate(report: &mut Report, rules: &[Expectation]) {
    let Report {
        environment: env,
        cases,
        inactive_expectations,
        ..
    } = report;
    let mut seen: Vec<Backend> = cases.iter().map(|c| c.point.backend).collect();
    seen.sort();
    seen.dedup();
    let active = Active::new(rules, env, &seen);
    for c in cases.iter_mut() {
        c.expected = active.governing(&c.coords()).map(|r| CaseExpectation {
            outcome: r.written.expect,
            reason: r.written.reason.clone(),
            error: r.written.error.clone(),
            rule: r.source.clone(),
            status: judge(r, c.outcome, c.error.as_deref()),
        });
    }
    // A rule is inactive here when it holds for none of the builds that ran (for the report's
    // first build, or the default builds, when it names others); its unmet conditions are told
    // against the builds its pattern names.
    let mut builds: Vec<Backend> = cases.iter().map(|c| c.point.backend).collect();
    builds.sort();
    builds.dedup();
    if builds.is_empty() {
        builds = vec![Backend::Tch, Backend::Candle];
    }
    *inactive_expectations = rules
        .iter()
        .filter(|r| !active.active_for_any(r, &builds))
        .map(|r| {
            let b = builds
                .iter()
                .copied()
                .find(|b| {
                    r.written
                        .pattern
                        .backend
                        .as_ref()
                        .is_none_or(|p| p.as_slice().iter().any(|&q| b.matches(q)))
                })
                .unwrap_or(builds[0]);
            (r, env.for_backend(b))
        })
        .map(|(r, env)| InactiveRule {
            rule: r.source.clone(),
            expect: r.written.expect,
            reason: r.written.reason.clone(),
            unmet: r
                .when
                .iter()
                .filter(|q| !q.holds(&env))
                .map(|q| q.describe(&env))
                .collect(),
        })
        .collect();
}
