//! The gate's verdict as a person reads it: each changed case once, what is not checked here,
//! and the conclusion with what to do; as text for a terminal or Markdown for a CI summary.

use crate::util::plural;
use crate::verdict::gate::{Change, Verdict};

/// `FAIL` for a change that fails the gate, `note` for one that does not.
fn label(v: &Verdict, c: &Change) -> &'static str {
    if v.fails(c) {
        "FAIL"
    } else {
        "note"
    }
}

/// The human verdict: each changed case once, then what to do.
pub fn text(v: &Verdict, matrix: &str) -> String {
    let mut out = String::new();
    for l in &v.lost {
        out.push_str(&format!("FAIL backend lost: {}\n", l.describe()));
    }
    for p in &v.problems {
        out.push_str(&format!("FAIL {p}\n"));
    }
    for c in &v.changes {
        out.push_str(&format!(
            "{} {}: {}: {}\n",
            label(v, c),
            c.id,
            c.kind.as_str(),
            c.detail
        ));
    }
    if let Some(line) = not_checked_line(v, "") {
        out.push_str(&format!("{line}\n"));
    }
    if let Some(line) = unexplained_line(v, "") {
        out.push_str(&format!("{line}\n"));
    }
    out.push_str(&conclusion(v, matrix));
    out.push('\n');
    out
}

/// The last line(s): passed or failed, counts, and what to do about each kind of failure: a
/// broken rule is fixed in the matrix, a lost backend in the build, a snapshot change accepted.
fn conclusion(v: &Verdict, matrix: &str) -> String {
    let failed = v.failures().count();
    let expected = match v.expected_failures {
        0 => String::new(),
        n => format!(", {n} of them failing as the matrix expects"),
    };
    if v.passed() {
        return format!(
            "gate passed: {} checked against the snapshot{expected}",
            plural(v.checked, "case")
        );
    }
    let mut out = format!(
        "gate FAILED: {}; {} compared with the snapshot{expected}.",
        plural(failed + v.lost.len() + v.problems.len(), "failure"),
        plural(v.checked, "case")
    );
    let command = v
        .command
        .clone()
        .unwrap_or_else(|| format!("peft-compat run {matrix} --check"));
    let mut rules: Vec<&str> = v.failures().filter_map(|c| c.rule.as_deref()).collect();
    rules.dedup();
    if !v.lost.is_empty() {
        let names: Vec<String> = v.lost.iter().map(|l| l.backend.to_string()).collect();
        out.push_str(&format!(
            "\n{} should have run here and could not ({}): fix the build or its worker path \
             (--worker), or declare it not expected on this runner with --skip-backend.",
            plural(v.lost.len(), "backend"),
            names.join(", ")
        ));
    }
    if !rules.is_empty() {
        out.push_str(&format!(
            "\nA matrix expectation no longer holds ({}): fix what broke it, or edit the rule; \
             a snapshot cannot accept this.",
            rules.join(", ")
        ));
    }
    let to_accept = v.failures().any(|c| c.rule.is_none()) || !v.problems.is_empty();
    if to_accept {
        out.push_str(&format!(
            "\nIf the change is intended, accept it: run `{command}` outside CI (it writes the \
             observed snapshot as a .snap.new beside the accepted one), then `cargo insta \
             review` (or `cargo insta accept`) and commit the snapshot."
        ));
    }
    out
}

/// The verdict as Markdown, for a CI job summary: the conclusion, then a table of changes.
pub fn markdown(v: &Verdict, matrix: &str) -> String {
    let mark = if v.passed() { "✅" } else { "❌" };
    let mut out = format!("### Gate {mark}\n\n{}\n", conclusion(v, matrix));
    for l in &v.lost {
        out.push_str(&format!("\n- ❌ backend lost: {}\n", l.describe()));
    }
    for p in &v.problems {
        out.push_str(&format!("\n- ❌ {p}\n"));
    }
    if !v.changes.is_empty() {
        out.push_str("\n| | case | change | detail |\n|---|---|---|---|\n");
        for c in &v.changes {
            out.push_str(&format!(
                "| {} | `{}` | {} | {} |\n",
                label(v, c),
                c.id,
                c.kind.as_str(),
                c.detail.replace('|', "\\|").replace('\n', " ")
            ));
        }
    }
    if let Some(line) = not_checked_line(v, "`") {
        out.push_str(&format!("\n{line}\n"));
    }
    if let Some(line) = unexplained_line(v, "`") {
        out.push_str(&format!("\n{line}\n"));
    }
    out
}

/// One line on the failing cases that only the snapshot accepts, with an example id.
fn unexplained_line(v: &Verdict, quote: &str) -> Option<String> {
    let id = v.unexplained.first()?;
    Some(format!(
        "note: {} accepted by the snapshot with no expectation saying why, e.g. {quote}{id}{quote}; \
         give each a rule with a reason (`peft-compat run MATRIX --record FILE` drafts them)",
        plural(v.unexplained.len(), "failing case")
    ))
}

/// One line on the cases not checked here, with an example id (quoted with `quote`).
fn not_checked_line(v: &Verdict, quote: &str) -> Option<String> {
    let (id, why) = v.not_checked.first()?;
    Some(format!(
        "not checked here: {} (device absent, or backend not expected here), e.g. {quote}{id}{quote}: {why}",
        plural(v.not_checked.len(), "case")
    ))
}
