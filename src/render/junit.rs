//! JUnit XML: one test case per matrix case, for CI systems that display test results.
//! With a gate verdict, a case fails when the gate flags it; without one, when it failed. A
//! failure the matrix expects is reported as skipped with type `xfail`, as pytest does.

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
        let failure = match verdict {
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
        if let (Some(e), None) = (xfail, &failure) {
            // pytest's convention for an expected failure: skipped, of type xfail.
            skipped += 1;
            cases.push_str(&format!(
                "      <skipped type=\"xfail\" message=\"{}\"/>\n",
                esc(&format!(
                    "expected {} ({}): {}: {}",
                    e.outcome,
                    e.rule,
                    e.reason,
                    c.failure_detail()
                ))
            ));
        } else if c.outcome == crate::outcome::OutcomeKind::Skipped {
            skipped += 1;
            cases.push_str(&format!(
                "      <skipped message=\"{}\"/>\n",
                esc(c.error.as_deref().unwrap_or(""))
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
