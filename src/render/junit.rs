//! JUnit XML: one test case per matrix case, for CI systems that display test results.
//! With a gate verdict, a case fails when the gate flags it; without one, when it failed. A
//! failure the matrix expects is reported as skipped with type `xfail`, as pytest does; a
//! failure only the snapshot accepts (no expectation says why) as skipped with type
//! `accepted`, never as a pass; a case whose backend was lost as a failure.

use crate::report::Report;
use crate::verdict::gate::Verdict;

fn esc(s: &str) -> String {
    s.replace('&', "&amp;")
        .replace('<', "&lt;")
        .replace('>', "&gt;")
        .replace('"', "&quot;")
}

pub fn render(report: &Report, verdict: Option<&Verdict>) -> String {
    let mut cases = String::new();
    let (mut failures, mut skipped) = (0, 0);
    for c in &report.cases {
        let time = c.duration_ms / 1e3;
        let classname =
            format!("{}.{}.{}", c.point.backend, c.point.device, c.point.dtype).replace(':', "_");
        cases.push_str(&format!(
            "    <testcase classname=\"{}\" name=\"{}\" time=\"{time:.3}\">\n",
            esc(&classname),
            esc(&c.id)
        ));
        let xfail = c.expected_failure();
        let lost = c.skip_kind() == Some(crate::outcome::SkipKind::BackendLost);
        let failure = match verdict {
            _ if lost => Some((
                "backend lost".to_string(),
                c.error.clone().unwrap_or_default(),
            )),
            Some(v) => v
                .failures()
                .find(|ch| ch.id == c.id)
                .map(|ch| (ch.kind.as_str().to_string(), ch.detail.clone())),
            None if c.outcome.is_failure() && xfail.is_none() => Some((
                c.outcome.to_string(),
                c.error.clone().unwrap_or_else(|| c.failure_detail()),
            )),
            None => None,
        };
        // (type, message) of a skip: none for a failure or a pass.
        let skip = match (&failure, xfail) {
            (Some(_), _) => None,
            // pytest's convention for an expected failure: skipped, of type xfail.
            (None, Some(e)) => Some((
                " type=\"xfail\"",
                format!(
                    "expected {} ({}): {}: {}",
                    e.outcome,
                    e.rule,
                    e.reason,
                    c.failure_detail()
                ),
            )),
            // Failing, and the gate let it through only because the snapshot accepts it.
            (None, None) if c.outcome.is_failure() => Some((
                " type=\"accepted\"",
                format!(
                    "{} accepted by the snapshot, with no expectation saying why: {}",
                    c.outcome,
                    c.failure_detail()
                ),
            )),
            (None, None) if c.outcome == crate::outcome::OutcomeKind::Skipped => {
                Some(("", c.error.clone().unwrap_or_default()))
            }
            (None, None) => None,
        };
        if let Some((kind, message)) = skip {
            skipped += 1;
            cases.push_str(&format!(
                "      <skipped{kind} message=\"{}\"/>\n",
                esc(&message)
            ));
        } else if let Some((kind, detail)) = failure {
            failures += 1;
            cases.push_str(&format!(
                "      <failure type=\"{}\" message=\"{}\">{}</failure>\n",
                esc(&kind),
                esc(&detail),
                esc(&detail)
            ));
        }
        cases.push_str("    </testcase>\n");
    }
    format!(
        "<?xml version=\"1.0\" encoding=\"UTF-8\"?>\n<testsuites>\n  <testsuite name=\"peft-compat {}\" tests=\"{}\" failures=\"{failures}\" skipped=\"{skipped}\" time=\"{:.3}\">\n{cases}  </testsuite>\n</testsuites>\n",
        esc(&report.matrix),
        report.cases.len(),
        report.summary.elapsed_s
    )
}
