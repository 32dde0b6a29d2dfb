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
    out.push_str(&conclusion(v, matrix));
    out.push('\n');
    out
}

/// The last line(s): passed or failed, counts, and how to accept an intended change.
fn conclusion(v: &Verdict, matrix: &str) -> String {
    let failed = v.failures().count();
    let expected = match v.expected_failures {
        0 => String::new(),
        n => format!(", {n} of them failing as the matrix expects"),
    };
    if failed == 0 {
        format!(
            "gate passed: {} checked against the snapshot{expected}",
            plural(v.checked, "case")
        )
    } else {
        format!(
            "gate FAILED: {}; {} compared with the snapshot{expected}.\n\
             If the change is intended, accept it: run `peft-compat run {matrix} --check` outside CI \
             (it writes the observed snapshot as a .snap.new beside the accepted one), then \
             `cargo insta review` (or `cargo insta accept`) and commit the snapshot; \
             for a case a matrix expectation governs, edit the rule it names.",
            plural(failed, "change"),
            plural(v.checked, "case")
        )
    }
}

/// The verdict as Markdown, for a CI job summary: the conclusion, then a table of changes.
pub fn markdown(v: &Verdict, matrix: &str) -> String {
    let mark = if v.passed() { "✅" } else { "❌" };
    let mut out = format!("### Gate {mark}\n\n{}\n", conclusion(v, matrix));
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
    out
}

/// One line on the cases not checked here, with an example id (quoted with `quote`).
fn not_checked_line(v: &Verdict, quote: &str) -> Option<String> {
    let (id, why) = v.not_checked.first()?;
    Some(format!(
        "not checked here: {} (device or backend absent), e.g. {quote}{id}{quote}: {why}",
        plural(v.not_checked.len(), "case")
    ))
}
