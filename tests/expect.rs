//! Expectations with reasons: parsing (with file:line errors), environment conditions, the gate
//! holding cases to them, the table marking them, and `--record` writing them from real runs.

mod support;

use peft_compat::case::Case;
use peft_compat::environment::Environment;
use peft_compat::render as table;
use peft_compat::render::gate::text as gate_text;
use peft_compat::report::CaseReport;
use peft_compat::report::Report;
use peft_compat::report::Status;
use peft_compat::spec::rules as expect;
use peft_compat::spec::Matrix;
use peft_compat::verdict;
use peft_compat::verdict::gate::{self, ChangeKind};
use peft_compat::verdict::record;
use peft_compat::verdict::snapshot;
use peft_compat::worker::io::{Inputs, Outputs};
use peft_compat::worker::ops::{BackendError, OpResult};
use std::path::{Path, PathBuf};
use std::process::Command;
use std::sync::atomic::{AtomicUsize, Ordering};

/// Four forward cases: {tch, candle} x {f32, f16}, one small shape.
const BASE: &str = "\
seed: 11
axes:
  backend: [tch, candle]
  device: [cpu]
  dtype: [f32, f16]
  adapter: [dora]
  op: [forward]
  precision: [native]
shapes:
  s: {batch: 2, in_features: 16, out_features: 8, rank: 2, alpha: 4}
";

const TCH16: &str = "tch/cpu/f16/dora/forward/native/s";
const CANDLE16: &str = "candle/cpu/f16/dora/forward/native/s";
const OLD_TORCH_ERROR: &str = "\"addmm_impl_cpu_\" not implemented for 'Half'";

fn write(dir: &Path, body: &str) -> PathBuf {
    let p = dir.join("m.yaml");
    std::fs::write(&p, body).unwrap();
    p
}

fn load(body: &str) -> Matrix {
    let dir = tempfile::tempdir().unwrap();
    Matrix::load(&write(dir.path(), body), None).unwrap()
}

fn load_err(body: &str) -> String {
    let dir = tempfile::tempdir().unwrap();
    Matrix::load(&write(dir.path(), body), None)
        .unwrap_err()
        .to_string()
}

/// The real backends, except that `refuse` cases fail as old libtorch did.
fn refusing(refuse: &'static [&'static str]) -> impl Fn(&Case, &Inputs) -> OpResult<Outputs> {
    move |c: &Case, inp: &Inputs| {
        if refuse.contains(&c.id().as_str()) {
            Err(BackendError::new(OLD_TORCH_ERROR))
        } else {
            support::run_on_backend(c, inp)
        }
    }
}

fn report_with(
    m: &Matrix,
    exec: &(dyn Fn(&Case, &Inputs) -> OpResult<Outputs> + Sync),
    env: &Environment,
) -> Report {
    let results = support::run_in_process(m, exec);
    verdict::assemble(
        "m.yaml",
        m,
        env.clone(),
        results.iter().map(CaseReport::from_result).collect(),
        0.0,
    )
}

fn env_with_libtorch(version: &str) -> Environment {
    let mut env = support::env();
    env.libraries.insert("libtorch".into(), version.into());
    env
}

fn case<'a>(r: &'a Report, id: &str) -> &'a peft_compat::report::CaseReport {
    r.cases.iter().find(|c| c.id == id).unwrap()
}

const OLD_TORCH_RULE: &str = "\
expectations:
  - backend: tch
    dtype: f16
    when: {libtorch: \"<2.2\"}
    expect: unsupported
    error: \"addmm_impl_cpu_\"
    reason: no CPU fp16 matmul before libtorch 2.2
";

#[test]
fn rules_parse_with_their_line_and_bad_rules_say_where_and_how_to_fix() {
    let m = load(&format!("{BASE}{OLD_TORCH_RULE}"));
    assert_eq!(m.expectations.len(), 1);
    assert!(
        m.expectations[0].source.ends_with("m.yaml:12"),
        "{}",
        m.expectations[0].source
    );

    let cases: &[(&str, &[&str])] = &[
        (
            "  - {dtype: f16, expect: broken, reason: r}\n",
            &["m.yaml:12:", "broken", "flaky"],
        ),
        (
            "  - {dtype: f16, expect: unsupported, reason: r, error: \"(unclosed\"}\n",
            &["m.yaml:12", "not a valid regular expression", "escape"],
        ),
        (
            "  - {dtype: f16, expect: mismatch, reason: r, error: x}\n",
            &["m.yaml:12", "`error` does not apply to `expect: mismatch`"],
        ),
        (
            "  - {dtype: f16, expect: fail, reason: r, when: {cpu_flag: avx9000}}\n",
            &["m.yaml:12", "avx9000", "avx512_fp16"],
        ),
        (
            "  - {dtype: f16, expect: fail, reason: r, when: {libtorch: \"about 2\"}}\n",
            &["m.yaml:12", "not a version requirement", ">=2.2"],
        ),
        (
            "  - {dtype: f16, expect: fail, reason: \"  \"}\n",
            &["m.yaml:12", "needs a reason"],
        ),
        (
            "  - {dtype: bf16, expect: fail, reason: r}\n",
            &["m.yaml:12", "matches no case", "out of date"],
        ),
        (
            "  - {dtype: f16, expect: fail, reason: r, because: x}\n",
            &["m.yaml:12", "because", "expect (pass, mismatch"],
        ),
        (
            "  - {dtype: f16, expect: fail, reason: r, shape: big}\n",
            &["unknown shape `big`", "shapes defined in this file: s"],
        ),
    ];
    for (rule, needles) in cases {
        let err = load_err(&format!("{BASE}expectations:\n{rule}"));
        for n in *needles {
            assert!(err.contains(n), "{rule}: `{n}` not in: {err}");
        }
    }
    // The second rule of a block list is located on its own line.
    let err = load_err(&format!(
        "{BASE}expectations:\n  - {{dtype: f16, expect: fail, reason: r}}\n\n  # why\n  - {{dtype: f32, expect: fail, reason: r, error: \"[\"}}\n"
    ));
    assert!(
        err.contains("m.yaml:15") && err.contains("expectation 2"),
        "{err}"
    );
}

#[test]
fn conditions_follow_the_environment() {
    let m = load(&format!(
        "{BASE}expectations:\n  - {{dtype: f16, expect: fail, reason: r, when: {{libtorch: \">=2.1, <2.2\", cpu_flag: [avx2, \"!avx512_fp16\"]}}}}\n"
    ));
    let rule = &m.expectations[0];
    let mut env = env_with_libtorch("2.1.2+cpu");
    env.cpu_flags = vec!["avx2".into()];
    assert!(rule.active(&env));
    env.cpu_flags.push("avx512_fp16".into());
    assert!(!rule.active(&env), "a flag that must be absent is present");
    env.cpu_flags.pop();
    env.libraries
        .insert("libtorch".into(), "2.11.0+cu130".into());
    assert!(!rule.active(&env));
    env.libraries.remove("libtorch");
    assert!(
        !rule.active(&env),
        "a library not compiled in satisfies no version"
    );
    assert_eq!(
        expect::lenient_version("2.1.2a0+git1234").map(|v| v.to_string()),
        Some("2.1.2".into())
    );
    assert_eq!(
        expect::lenient_version("13.0").map(|v| v.to_string()),
        Some("13.0.0".into())
    );
}

/// The scenario the project exists for: on libtorch 2.1 the fp16 CPU matmul is refused. With the
/// rule active, the gate accepts it as declared (a note, not a failure) and the table marks it;
/// on a libtorch where the rule is inactive, the same refusal is a regression.
#[test]
fn a_declared_failure_passes_the_gate_where_its_condition_holds_and_only_there() {
    let m = load(&format!("{BASE}{OLD_TORCH_RULE}"));
    let accepted = snapshot::from_report(&report_with(
        &m,
        &support::run_on_backend,
        &env_with_libtorch("2.11.0"),
    ));
    let exec = refusing(&[TCH16]);

    let old = report_with(&m, &exec, &env_with_libtorch("2.1.2"));
    let e = case(&old, TCH16).expected.as_ref().unwrap();
    assert_eq!(e.status, Status::Met);
    assert!(e.rule.ends_with("m.yaml:12"));
    let v = gate::check(&old, &accepted, false);
    assert!(v.passed(), "{}", gate_text(&v, "m.yaml"));
    assert_eq!(v.expected_failures, 1);
    assert_eq!(v.changes.len(), 1);
    assert_eq!(v.changes[0].kind, ChangeKind::Expected);
    let text = gate_text(&v, "m.yaml");
    assert!(
        text.contains(&format!("note {TCH16}: changed as expected: pass"))
            && text.contains("no CPU fp16 matmul before libtorch 2.2"),
        "{text}"
    );
    let marked = |t: &str| {
        t.lines()
            .any(|l| l.contains('┆') && l.contains("(expected)"))
    };
    let table = table::render_text(&old, false, 40);
    assert!(table.contains("✗ unsupported") && marked(&table), "{table}");
    assert!(table.contains("1 unsupported (1 expected)"), "{table}");
    let md = table::render_markdown(&old, Some((&v, "m.yaml")));
    assert!(
        md.contains("### Gate ✅") && md.contains("✗ unsupported (expected)"),
        "{md}"
    );

    let new = report_with(&m, &exec, &env_with_libtorch("2.11.0+cu130"));
    assert!(
        case(&new, TCH16).expected.is_none(),
        "inactive: governs nothing"
    );
    assert_eq!(new.inactive_expectations.len(), 1);
    assert_eq!(
        new.inactive_expectations[0].unmet,
        vec!["libtorch <2.2, here 2.11.0+cu130".to_string()]
    );
    let v = gate::check(&new, &accepted, false);
    assert!(!v.passed());
    assert_eq!(v.changes[0].kind, ChangeKind::Regression);
    assert!(!marked(&table::render_text(&new, false, 40)));
}

#[test]
fn a_declared_failure_that_passes_is_an_unexpected_success_naming_the_rule() {
    let m = load(&format!(
        "{BASE}expectations:\n  - {{backend: candle, dtype: f16, expect: unsupported, reason: candle lacks it}}\n"
    ));
    let r = report_with(&m, &support::run_on_backend, &support::env());
    // Even a snapshot that accepted the pass does not excuse it: the rule says otherwise.
    let v = gate::check(&r, &snapshot::from_report(&r), false);
    assert!(!v.passed());
    assert_eq!(v.changes.len(), 1);
    let c = &v.changes[0];
    assert_eq!(
        (c.id.as_str(), &c.kind),
        (CANDLE16, &ChangeKind::UnexpectedSuccess)
    );
    assert!(
        c.detail.contains("expected unsupported")
            && c.detail.contains("candle lacks it")
            && c.detail.contains("remove or narrow the expectation at")
            && c.detail.contains("m.yaml:12"),
        "{}",
        c.detail
    );
    assert!(gate::check(&r, &snapshot::from_report(&r), true).passed());
}

#[test]
fn a_failure_of_another_kind_or_text_breaks_the_rule() {
    let m = load(
        &format!("{BASE}{OLD_TORCH_RULE}")
            .replace("error: \"addmm_impl_cpu_\"", "error: \"^other kernel\""),
    );
    let env = env_with_libtorch("2.1.2");
    let r = report_with(&m, &refusing(&[TCH16]), &env);
    assert_eq!(
        case(&r, TCH16).expected.as_ref().unwrap().status,
        Status::Violated
    );
    let v = gate::check(&r, &snapshot::from_report(&r), false);
    assert!(!v.passed());
    let c = &v.changes[0];
    assert_eq!(c.kind, ChangeKind::Regression);
    assert!(
        c.detail
            .contains("the error does not match `^other kernel`"),
        "{}",
        c.detail
    );
    assert!(
        c.detail.contains("addmm_impl_cpu_"),
        "the error text is shown: {}",
        c.detail
    );

    // A rule that expects a pass holds even where the snapshot accepted the failure.
    let m = load(&format!(
        "{BASE}expectations:\n  - {{backend: tch, dtype: f16, expect: pass, reason: fixed in 2.2}}\n"
    ));
    let r = report_with(&m, &refusing(&[TCH16]), &env);
    let v = gate::check(&r, &snapshot::from_report(&r), false);
    assert!(!v.passed());
    assert!(
        v.changes[0].detail.contains("expected pass"),
        "{}",
        v.changes[0].detail
    );
    assert!(v.changes[0].detail.contains("now unsupported"));
}

#[test]
fn a_flaky_case_passes_the_gate_either_way_and_is_marked() {
    let m = load(&format!(
        "{BASE}expectations:\n  - {{backend: tch, dtype: f16, expect: flaky, reason: seen both ways}}\n"
    ));
    let env = support::env();
    let good = report_with(&m, &support::run_on_backend, &env);
    let bad = report_with(&m, &refusing(&[TCH16]), &env);
    for (accepted, now) in [(&good, &bad), (&bad, &good), (&good, &good)] {
        let v = gate::check(now, &snapshot::from_report(accepted), false);
        assert!(v.passed(), "{}", gate_text(&v, "m.yaml"));
    }
    let t = table::render_text(&bad, false, 40);
    assert!(
        t.lines().any(|l| l.contains('┆') && l.contains("(flaky)")),
        "{t}"
    );
}

/// `--record` from real runs: a case refused in every run becomes an expected failure carrying
/// its error, a case that flips becomes `flaky`, a case off in every run becomes `mismatch`, and
/// the recorded list, pasted into the matrix, makes the gate pass on the next run.
#[test]
fn record_writes_reviewable_rules_that_the_gate_then_holds() {
    // A tolerance far below f16 roundoff makes the candle f16 case a real mismatch.
    let body = format!("{BASE}tolerances:\n  - {{backend: candle, dtype: f16, rel: 1.0e-12}}\n");
    let m = load(&body);
    let calls = AtomicUsize::new(0);
    let exec = |c: &Case, inp: &Inputs| -> OpResult<Outputs> {
        match c.id().as_str() {
            TCH16 => Err(BackendError::new(
                "\"addmm_impl_cpu_\" not implemented for 'Half' (at 0x7f3a)",
            )),
            "tch/cpu/f32/dora/forward/native/s"
                if calls.fetch_add(1, Ordering::SeqCst) % 2 == 1 =>
            {
                Err(BackendError::new("intermittent"))
            }
            _ => support::run_on_backend(c, inp),
        }
    };
    let env = support::env();
    let runs: Vec<Report> = (0..3).map(|_| report_with(&m, &exec, &env)).collect();
    let rec = record::record(&m, &runs);
    assert_eq!(
        (rec.runs, rec.ran, rec.always_failing, rec.flaky),
        (3, 4, 2, 1)
    );
    assert_eq!(rec.identical, 3, "only the flaky case differs between runs");
    let by_case = |id: &str| {
        rec.rules
            .iter()
            .find(|r| r.cases.iter().any(|c| c == id))
            .unwrap()
    };
    let refused = by_case(TCH16);
    assert_eq!(refused.expect.as_str(), "unsupported");
    let pattern = refused.error.as_deref().unwrap();
    assert!(
        regex::Regex::new(pattern)
            .unwrap()
            .is_match("\"addmm_impl_cpu_\" not implemented for 'Half' (at 0x99)"),
        "{pattern}"
    );
    assert_eq!(by_case(CANDLE16).expect.as_str(), "mismatch");
    let flaky = by_case("tch/cpu/f32/dora/forward/native/s");
    assert_eq!(flaky.expect.as_str(), "flaky");
    assert!(
        flaky
            .reason
            .starts_with("TODO(review): passed in 2 of 3 runs"),
        "{}",
        flaky.reason
    );
    assert!(rec.rules.iter().all(|r| r.cases.len() == 1
        && !r
            .cases
            .contains(&"candle/cpu/f32/dora/forward/native/s".to_string())));

    let yaml = rec.to_yaml("m.yaml", &env);
    assert!(yaml.contains("# Review every rule"), "{yaml}");
    let m2 = load(&format!(
        "{body}{}",
        yaml.lines()
            .filter(|l| !l.starts_with('#'))
            .collect::<Vec<_>>()
            .join("\n")
    ));
    assert_eq!(m2.expectations.len(), 3);
    let again = report_with(&m2, &exec, &env);
    let v = gate::check(&again, &snapshot::from_report(&runs[2]), false);
    assert!(v.passed(), "{}", gate_text(&v, "m.yaml"));
    // The flaky case failed this time: a declared failure too.
    assert_eq!(v.expected_failures, 3);
    // A reason a person wrote survives re-recording.
    let reviewed = load(&format!("{body}expectations:\n  - {{backend: tch, dtype: f16, expect: unsupported, reason: old libtorch}}\n"));
    let rec = record::record(&reviewed, &runs);
    assert_eq!(by_case_in(&rec, TCH16).reason, "old libtorch");
    // A broader rule that admits every run stays as written; one the runs contradict is
    // replaced, and its old claim is quoted for the reviewer.
    let reviewed = load(&format!(
        "{body}expectations:\n  - {{backend: candle, dtype: f16, expect: fail, reason: any failure}}\n  - {{backend: tch, dtype: f32, expect: mismatch, reason: thought broken}}\n"
    ));
    let rec = record::record(&reviewed, &runs);
    let candle = by_case_in(&rec, CANDLE16);
    assert_eq!(
        (candle.expect.as_str(), candle.reason.as_str()),
        ("fail", "any failure")
    );
    let flaky = by_case_in(&rec, "tch/cpu/f32/dora/forward/native/s");
    assert_eq!(flaky.expect.as_str(), "flaky");
    assert!(
        flaky.reason.contains("the matrix expected mismatch")
            && flaky.reason.contains("thought broken"),
        "{}",
        flaky.reason
    );
}

fn by_case_in<'a>(rec: &'a record::Recorded, id: &str) -> &'a record::RecordedRule {
    rec.rules
        .iter()
        .find(|r| r.cases.iter().any(|c| c == id))
        .unwrap()
}

#[test]
fn recorded_rules_merge_into_products_and_keep_inactive_rules_last() {
    let body = format!("{BASE}tolerances:\n  - {{dtype: f16, rel: 1.0e-12}}\n{OLD_TORCH_RULE}");
    let m = load(&body);
    let env = env_with_libtorch("2.11.0");
    let runs: Vec<Report> = (0..2)
        .map(|_| report_with(&m, &support::run_on_backend, &env))
        .collect();
    let rec = record::record(&m, &runs);
    assert_eq!(rec.rules.len(), 1, "{:?}", rec.rules);
    assert_eq!(
        rec.rules[0].axes[0],
        vec!["tch".to_string(), "candle".to_string()]
    );
    assert_eq!(rec.rules[0].cases.len(), 2);
    let yaml = rec.to_yaml("m.yaml", &env);
    let recorded_at = yaml.find("backend: [tch, candle]").unwrap();
    let kept_at = yaml.find("# kept").unwrap();
    assert!(recorded_at < kept_at, "{yaml}");
    assert!(yaml.contains("when: {libtorch: \"<2.2\"}"), "{yaml}");
    let m2 = load(&body.replace(OLD_TORCH_RULE, &yaml));
    assert_eq!(m2.expectations.len(), 2);
}

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_peft-compat"));
    c.env("CI", "true");
    c
}

#[test]
fn cli_record_and_check_with_markdown_summary() {
    let dir = tempfile::tempdir().unwrap();
    let m = write(
        dir.path(),
        &format!("{BASE}tolerances:\n  - {{backend: candle, dtype: f16, rel: 1.0e-12}}\n"),
    );
    let rec = dir.path().join("rec.yaml");
    let out = bin()
        .args([
            "run",
            "-q",
            "--results",
            "/dev/null",
            "--repeats",
            "2",
            "--record",
        ])
        .arg(&rec)
        .arg(&m)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        stdout.contains("recorded 1 rule from 2 runs (1 case failing in every run, 0 flaky)"),
        "{stdout}"
    );
    assert!(
        stdout.contains("determinism: 4 of 4 cases that ran were bit-identical"),
        "{stdout}"
    );
    let recorded = std::fs::read_to_string(&rec).unwrap();
    assert!(
        recorded.contains("expect: mismatch") && recorded.contains(CANDLE16),
        "{recorded}"
    );

    // Append the recorded rule; accept a snapshot; the gate passes and says why.
    let body = std::fs::read_to_string(&m).unwrap() + &recorded;
    std::fs::write(&m, body).unwrap();
    let snap = dir.path().join("m.snap");
    let out = bin()
        .args(["run", "-q", "--results", "/dev/null", "--snapshot-out"])
        .arg(&snap)
        .arg(&m)
        .env_remove("CI")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    let md = dir.path().join("summary.md");
    let out = bin()
        .args([
            "run",
            "-q",
            "--results",
            "/dev/null",
            "--check",
            "--snapshot",
        ])
        .arg(&snap)
        .arg("--markdown")
        .arg(&md)
        .arg(&m)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert!(
        stdout.contains(
            "gate passed: 4 cases checked against the snapshot, 1 of them failing as the matrix expects"
        ),
        "{stdout}"
    );
    let md = std::fs::read_to_string(&md).unwrap();
    assert!(
        md.contains("### Gate ✅") && md.contains("(expected)") && md.contains("TODO(review)"),
        "{md}"
    );

    // The same failure declared as another kind breaks the rule: exit 1, the rule's line named,
    // and (the snapshot being unchanged) nothing to accept, so no .snap.new even outside CI.
    let body = std::fs::read_to_string(&m).unwrap();
    std::fs::write(&m, body.replace("expect: mismatch", "expect: nonfinite")).unwrap();
    let out = bin()
        .args([
            "run",
            "-q",
            "--results",
            "/dev/null",
            "--check",
            "--snapshot",
        ])
        .arg(&snap)
        .arg(&m)
        .env_remove("CI")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains(&format!(
            "FAIL {CANDLE16}: regression: expected nonfinite ("
        )) && stdout.contains("m.yaml:22: TODO(review)")
            && stdout.contains("now mismatch"),
        "{stdout}"
    );
    assert!(!dir.path().join("m.snap.new").exists());

    // --repeats without --record, and --record with --check, are refused as bad input.
    for args in [
        &["--repeats", "2"][..],
        &["--check", "--record", "x.yaml"][..],
    ] {
        let out = bin()
            .arg("run")
            .args(["--results", "/dev/null"])
            .args(args)
            .arg(&m)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(2), "{args:?}");
    }
}

/// The README's example rules are a valid `expectations:` section for the default matrix.
#[test]
fn the_readme_example_rules_parse() {
    let readme = std::fs::read_to_string("README.md").unwrap();
    let section = &readme[readme.find("## Expectations with reasons").unwrap()..];
    let start = section.find("```yaml\n").unwrap() + 8;
    let block = &section[start..start + section[start..].find("```").unwrap()];
    let default = std::fs::read_to_string("matrices/default.yaml").unwrap();
    let head = &default[..default.find("\nexpectations:").unwrap()];
    let m = load(&format!("{head}\n{block}"));
    assert_eq!(m.expectations.len(), 2);
    assert!(m.expectations[1]
        .error
        .as_ref()
        .unwrap()
        .is_match(OLD_TORCH_ERROR));
}
