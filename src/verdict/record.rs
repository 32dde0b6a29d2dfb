//! `--record`: expectations written from observed runs, for a person to review.
//!
//! Over N runs of the same matrix, each case that ran in every run becomes:
//! - passed every time: nothing (a pass is what a case is expected to do);
//! - failed every time, the same way: `expect: <outcome>`, carrying the captured error as its
//!   `error` pattern (for unsupported and crashed cases, whose failures have a text);
//! - failed every time, in different ways: `expect: fail`;
//! - passed in some runs and failed in others: `expect: flaky`, never a silently expected pass or
//!   failure.
//!
//! Cases that share an expectation are merged into one rule wherever the union is exact (two
//! rules that differ on one axis only become one rule listing both values), so a block of
//! failures reads as one line. A rule of the matrix that already governs a case and admits every
//! run stays as written (expectation, error pattern, reason); every other rule gets a reason
//! starting `TODO(review)`, with the evidence (and what the matrix said before, if anything), for
//! a person to replace with the cause. Rules whose `when` does not hold here
//! are kept as they are: these runs say nothing about them.

use super::expectations;
use crate::case::Point;
use crate::environment::Environment;
use crate::outcome::OutcomeKind;
use crate::report::Status;
use crate::report::{CaseReport, Report};
use crate::spec::pattern::OneOrMany;
use crate::spec::rules::{Expected, RawExpectation};
use crate::spec::Matrix;
use crate::util::plural;
use std::collections::{BTreeMap, HashMap};

/// The nine axis names, in the order rules are written: the point's eight, then the shape.
const AXES: [&str; 9] = {
    let p = Point::AXES;
    [p[0], p[1], p[2], p[3], p[4], p[5], p[6], p[7], "shape"]
};

fn axis_values(c: &CaseReport) -> [String; 9] {
    let [a, b, d, e, f, g, h, i] = c.point.values();
    [a, b, d, e, f, g, h, i, c.shape.clone()]
}

/// Axes a rule leaves out when every case of the recording has the same value on them
/// (`layer` and `profile` of a matrix that has only the defaults): the rule reads as before.
const OPTIONAL_AXES: [&str; 2] = ["layer", "profile"];

/// One recorded rule: a product of axis value sets, and what it expects.
#[derive(Debug, Clone, PartialEq)]
pub struct RecordedRule {
    /// Per axis (in `AXES` order: the eight axes, then the shape), the values the rule covers.
    pub axes: [Vec<String>; 9],
    pub expect: Expected,
    pub error: Option<String>,
    /// A reason a person wrote (carried over from the matrix), or the evidence, `TODO(review)`.
    pub reason: String,
    /// The case ids it covers, in matrix order.
    pub cases: Vec<String>,
}

/// What a recording found.
#[derive(Debug, Clone)]
pub struct Recorded {
    pub runs: usize,
    pub rules: Vec<RecordedRule>,
    /// Rules of the matrix that do not apply here, kept verbatim.
    pub kept: Vec<RawExpectation>,
    /// Of the optional axes (`layer`, `profile`), those with one value in the whole recording: left out of rules.
    pub omitted: Vec<&'static str>,
    /// Cases that ran in every run.
    pub ran: usize,
    /// Of those, cases whose outcome, error text and every error figure were bit-identical in
    /// every run.
    pub identical: usize,
    pub always_failing: usize,
    pub flaky: usize,
}

/// A regular expression matching a captured error: its first line (up to 120 characters),
/// escaped, with numbers and hex addresses generalised so that counts and pointers do not break
/// it.
pub fn error_pattern(text: &str) -> String {
    let first: String = text
        .lines()
        .next()
        .unwrap_or("")
        .chars()
        .take(120)
        .collect();
    let first = first.trim();
    let numbers = regex::Regex::new("0x[0-9a-fA-F]+|[0-9]+").expect("valid");
    let mut out = String::new();
    let mut at = 0;
    for m in numbers.find_iter(first) {
        out.push_str(&regex::escape(&first[at..m.start()]));
        out.push_str(if m.as_str().starts_with("0x") {
            "0x[0-9a-fA-F]+"
        } else {
            r"\d+"
        });
        at = m.end();
    }
    out.push_str(&regex::escape(&first[at..]));
    out
}

/// What a case did in every run: its expectation, or `None` for "passed every time".
fn classify(obs: &[&CaseReport]) -> Option<(Expected, Option<String>)> {
    let passes = obs.iter().filter(|c| c.outcome.is_pass()).count();
    if passes == obs.len() {
        return None;
    }
    if passes > 0 {
        return Some((Expected::Flaky, None));
    }
    let first = obs[0];
    if obs
        .iter()
        .all(|c| c.outcome == first.outcome && c.error == first.error)
    {
        let expect = Expected::of(first.outcome).unwrap_or(Expected::Fail);
        let error = matches!(expect, Expected::Unsupported | Expected::Crashed)
            .then(|| first.error.as_deref().map(error_pattern))
            .flatten();
        return Some((expect, error));
    }
    if obs.iter().all(|c| c.outcome == first.outcome) {
        // The same failure kind with texts that differ between runs: no stable pattern.
        return Some((Expected::of(first.outcome).unwrap_or(Expected::Fail), None));
    }
    Some((Expected::Fail, None))
}

/// The evidence a generated reason carries.
fn evidence(expect: Expected, obs: &[&CaseReport]) -> String {
    let runs = obs.len();
    let id = &obs[0].id;
    let failed: Vec<&&CaseReport> = obs.iter().filter(|c| c.outcome.is_failure()).collect();
    let detail = failed
        .first()
        .map(|c| format!("{}: {}", c.outcome, c.failure_detail()))
        .unwrap_or_default();
    match expect {
        Expected::Flaky => format!(
            "TODO(review): passed in {} of {runs} runs; e.g. {id}: {detail}",
            runs - failed.len()
        ),
        Expected::Fail => {
            let mut kinds: Vec<&str> = failed.iter().map(|c| c.outcome.as_str()).collect();
            kinds.sort();
            kinds.dedup();
            format!(
                "TODO(review): failed in all {runs} runs, as {}; e.g. {id}: {detail}",
                kinds.join(" or ")
            )
        }
        _ => format!("TODO(review): {expect} in all {runs} runs; e.g. {id}: {detail}"),
    }
}

/// A fingerprint of everything a case produced, to tell whether runs were bit-identical.
fn fingerprint(c: &CaseReport) -> String {
    serde_json::to_string(&(&c.outcome, &c.error, &c.metrics)).expect("plain data")
}

/// Merge rules that differ on exactly one axis, until none do.
fn merge(mut rules: Vec<RecordedRule>) -> Vec<RecordedRule> {
    loop {
        let before = rules.len();
        for axis in 0..AXES.len() {
            let mut groups: BTreeMap<String, RecordedRule> = BTreeMap::new();
            let mut order = Vec::new();
            for r in rules {
                let mut key = r.axes.clone();
                key[axis].clear();
                let key = format!("{key:?}|{}|{:?}|{}", r.expect, r.error, r.reason);
                match groups.get_mut(&key) {
                    Some(g) => {
                        g.axes[axis].extend(r.axes[axis].iter().cloned());
                        g.axes[axis].sort();
                        g.axes[axis].dedup();
                        g.cases.extend(r.cases);
                    }
                    None => {
                        order.push(key.clone());
                        groups.insert(key, r);
                    }
                }
            }
            rules = order
                .into_iter()
                .map(|k| groups.remove(&k).expect("grouped"))
                .collect();
        }
        if rules.len() == before {
            return rules;
        }
    }
}

/// Record expectations from `runs` (reports of the same matrix, with the same environment).
pub fn record(matrix: &Matrix, runs: &[Report]) -> Recorded {
    let env: &Environment = &runs[0].environment;
    // Per case of the first run (matrix order), what it did in every run.
    let index: HashMap<&str, usize> = runs[0]
        .cases
        .iter()
        .enumerate()
        .map(|(i, c)| (c.id.as_str(), i))
        .collect();
    let mut per_case: Vec<Vec<&CaseReport>> = runs[0].cases.iter().map(|c| vec![c]).collect();
    for c in runs[1..].iter().flat_map(|r| &r.cases) {
        if let Some(&i) = index.get(c.id.as_str()) {
            per_case[i].push(c);
        }
    }
    // Ranks of axis values in matrix order, so merged lists read as the matrix does.
    let mut rank: [HashMap<String, usize>; 9] = Default::default();
    for (i, obs) in per_case.iter().enumerate() {
        for (a, v) in axis_values(obs[0]).into_iter().enumerate() {
            rank[a].entry(v).or_insert(i);
        }
    }
    let mut seen: Vec<_> = matrix.cases.iter().map(|c| c.point.backend).collect();
    seen.sort();
    seen.dedup();
    let active = expectations::Active::new(&matrix.expectations, env, &seen);
    let (mut ran, mut identical, mut always_failing, mut flaky) = (0, 0, 0, 0);
    let mut rules = Vec::new();
    let mut evidence_of: HashMap<String, String> = HashMap::new();
    for obs in &per_case {
        let c = obs[0];
        if obs.len() < runs.len() || obs.iter().any(|o| o.outcome == OutcomeKind::Skipped) {
            continue;
        }
        ran += 1;
        let first = fingerprint(c);
        if obs[1..].iter().all(|o| fingerprint(o) == first) {
            identical += 1;
        }
        let seen = classify(obs);
        match seen {
            Some((Expected::Flaky, _)) => flaky += 1,
            Some(_) => always_failing += 1,
            None => {}
        }
        // A rule of the matrix that governs the case and admits every run (its outcome, and its
        // error pattern where it has one) stays as a person wrote it: a few runs cannot prove
        // a `fail` or `flaky` too broad.
        let existing = active.governing(&c.coords());
        let admitted = existing.filter(|r| {
            r.written.expect != Expected::Pass
                && obs
                    .iter()
                    .all(|o| expectations::judge(r, o.outcome, o.error.as_deref()) == Status::Met)
        });
        let (expect, error, reason) = match (admitted, seen) {
            (Some(r), _) => (
                r.written.expect,
                r.written.error.clone(),
                r.written.reason.clone(),
            ),
            (None, None) => continue,
            (None, Some((expect, error))) => {
                // Generated reasons are filled in after merging, so that evidence (which differs
                // per case) does not keep apart cases that belong in one rule.
                let mut why = evidence(expect, obs);
                if let Some(r) = existing {
                    why.push_str(&format!(
                        "; the matrix expected {} ({}: {})",
                        r.written.expect, r.source, r.written.reason
                    ));
                }
                evidence_of.insert(c.id.clone(), why);
                (expect, error, String::new())
            }
        };
        rules.push(RecordedRule {
            axes: axis_values(c).map(|v| vec![v]),
            expect,
            error,
            reason,
            cases: vec![c.id.clone()],
        });
    }
    let mut rules = merge(rules);
    for r in &mut rules {
        if r.reason.is_empty() {
            r.reason = evidence_of.remove(&r.cases[0]).unwrap_or_default();
        }
        for (a, values) in r.axes.iter_mut().enumerate() {
            values.sort_by_key(|v| rank[a].get(v).copied().unwrap_or(usize::MAX));
        }
    }
    let omitted = AXES
        .iter()
        .zip(&rank)
        .filter(|(name, values)| OPTIONAL_AXES.contains(name) && values.len() == 1)
        .map(|(name, _)| *name)
        .collect();
    Recorded {
        omitted,
        runs: runs.len(),
        rules,
        kept: matrix
            .expectations
            .iter()
            // Inactive for every build this matrix runs (a rule for libtorch < 2.2 in a matrix of
            // libtorch 2.11 only), whatever other builds exist.
            .filter(|r| !active.active_for_any(r, &seen))
            .map(|r| r.written.clone())
            .collect(),
        ran,
        identical,
        always_failing,
        flaky,
    }
}

fn scalar(s: &str) -> String {
    if !s.is_empty()
        && s.chars()
            .all(|c| c.is_ascii_alphanumeric() || c == '_' || c == '-')
        && s.chars().next().is_some_and(|c| c.is_ascii_alphabetic())
    {
        s.to_string()
    } else {
        serde_json::to_string(s).expect("strings serialize")
    }
}

fn push_rule(
    out: &mut String,
    axes: &[(&str, Vec<String>)],
    expect: Expected,
    reason: &str,
    error: Option<&str>,
    when: Option<&crate::spec::rules::When>,
) {
    let mut first = true;
    let mut line = |out: &mut String, text: String| {
        out.push_str(if first { "  - " } else { "    " });
        first = false;
        out.push_str(&text);
        out.push('\n');
    };
    for (name, values) in axes {
        let text = match values.as_slice() {
            [one] => scalar(one),
            many => format!(
                "[{}]",
                many.iter()
                    .map(|v| scalar(v))
                    .collect::<Vec<_>>()
                    .join(", ")
            ),
        };
        line(out, format!("{name}: {text}"));
    }
    if let Some(w) = when {
        let v = serde_json::to_value(w).expect("plain data");
        let parts: Vec<String> = v
            .as_object()
            .into_iter()
            .flatten()
            .map(|(k, v)| format!("{k}: {v}"))
            .collect();
        line(out, format!("when: {{{}}}", parts.join(", ")));
    }
    line(out, format!("expect: {expect}"));
    if let Some(e) = error {
        line(out, format!("error: {}", scalar(e)));
    }
    line(out, format!("reason: {}", scalar(reason)));
}

/// The axes a written pattern names, as strings.
fn pattern_axes(raw: &RawExpectation) -> Vec<(&'static str, Vec<String>)> {
    fn strs<T: ToString>(o: &Option<OneOrMany<T>>) -> Option<Vec<String>> {
        o.as_ref()
            .map(|o| o.as_slice().iter().map(T::to_string).collect())
    }
    let p = &raw.pattern;
    [
        ("backend", strs(&p.backend)),
        ("device", strs(&p.device)),
        ("dtype", strs(&p.dtype)),
        ("adapter", strs(&p.adapter)),
        ("op", strs(&p.op)),
        ("precision", strs(&p.precision)),
        ("layer", strs(&p.layer)),
        ("profile", strs(&p.profile)),
        ("shape", strs(&p.shape)),
    ]
    .into_iter()
    .filter_map(|(n, v)| v.map(|v| (n, v)))
    .collect()
}

impl Recorded {
    /// The YAML to review: a header that says where it came from and what to do, then an
    /// `expectations:` list that a matrix file takes as it is.
    pub fn to_yaml(&self, matrix: &str, env: &Environment) -> String {
        let libs: Vec<String> = env
            .libraries
            .iter()
            .map(|(k, v)| format!("{k} {v}"))
            .collect();
        let mut out = format!(
            "# Expectations recorded by peft-compat {} from {} runs of {matrix}\n\
             # on {} · {} · {} CPUs ({}).\n\
             # {} cases failed in every run, {} both passed and failed (flaky); {} of {} cases that ran\n\
             # were bit-identical in every run.\n\
             # Review every rule before committing: replace each TODO(review) reason with the cause (an\n\
             # issue, the kernel at fault), and add `when:` conditions (libtorch, cpu_flag, ...) where the\n\
             # behaviour depends on the environment. Then make this list the matrix's `expectations:`.\n",
            env.peft_compat,
            self.runs,
            libs.join(" · "),
            env.cpu_model,
            env.cpu_count,
            env.arch,
            self.always_failing,
            self.flaky,
            self.identical,
            self.ran
        );
        if self.rules.is_empty() && self.kept.is_empty() {
            out.push_str("expectations: []\n");
            return out;
        }
        out.push_str("expectations:\n");
        for r in &self.rules {
            out.push_str(&format!("  # {}\n", plural(r.cases.len(), "case")));
            let axes: Vec<(&str, Vec<String>)> = AXES
                .iter()
                .copied()
                .zip(r.axes.iter().cloned())
                .filter(|(name, _)| !self.omitted.contains(name))
                .collect();
            push_rule(
                &mut out,
                &axes,
                r.expect,
                &r.reason,
                r.error.as_deref(),
                None,
            );
        }
        // Last, so that where their condition holds they win over the rules recorded here.
        for raw in &self.kept {
            out.push_str("  # kept: its `when` does not hold where this was recorded\n");
            push_rule(
                &mut out,
                &pattern_axes(raw),
                raw.expect,
                &raw.reason,
                raw.error.as_deref(),
                raw.when.as_ref(),
            );
        }
        out
    }
}

/// The one-line summary printed after a recording.
pub fn summary(r: &Recorded, path: &str) -> String {
    format!(
        "recorded {} from {} runs ({} failing in every run, {} flaky{}) -> {path}\n\
         determinism: {} of {} cases that ran were bit-identical in every run\n\
         review the reasons (TODO(review)), then make the list the matrix's `expectations:`",
        plural(r.rules.len(), "rule"),
        r.runs,
        plural(r.always_failing, "case"),
        r.flaky,
        match r.kept.len() {
            0 => String::new(),
            n => format!(", {} kept that do not apply here", plural(n, "rule")),
        },
        r.identical,
        r.ran
    )
}
