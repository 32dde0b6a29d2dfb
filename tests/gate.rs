//! The CI gate: planted changes of every kind, each caught (or, for noise and absent devices,
//! not) with the right message; determinism; and the project gating itself.

mod support;

use peft_compat::outcome::OutcomeKind;
use peft_compat::render::gate::text as gate_text;
use peft_compat::report::CaseReport;
use peft_compat::report::Report;
use peft_compat::spec::Matrix;
use peft_compat::verdict;
use peft_compat::verdict::gate::{self, ChangeKind};

use peft_compat::verdict::snapshot::{self, Snapshot};
use std::path::{Path, PathBuf};
use std::process::Command;

fn report_of(m: &Matrix, name: &str) -> Report {
    let (results, env) = support::run_workers_env(m, 2, &Default::default());
    verdict::assemble(
        name,
        m,
        env,
        results.iter().map(CaseReport::from_result).collect(),
        0.0,
    )
}

fn run_default_cpu() -> Report {
    // CUDA cases skip at once here (and are "not checked" by the gate), so run the whole matrix.
    let m = Matrix::load(Path::new("matrices/default.yaml"), None).unwrap();
    report_of(&m, "matrices/default.yaml")
}

/// A one-op (forward, native) matrix file over the given axis lists, written to `dir/m.yaml`.
fn tiny_matrix(dir: &Path, backend: &str, device: &str, dtype: &str, adapter: &str) -> PathBuf {
    let p = dir.join("m.yaml");
    std::fs::write(
        &p,
        format!(
            "seed: 5\naxes:\n  backend: [{backend}]\n  device: [{device}]\n  dtype: [{dtype}]\n  adapter: [{adapter}]\n  op: [forward]\n  precision: [native]\nshapes:\n  s: {{batch: 2, in_features: 16, out_features: 8, rank: 2, alpha: 4}}\n"
        ),
    )
    .unwrap();
    p
}

fn small_report() -> Report {
    let dir = tempfile::tempdir().unwrap();
    let p = tiny_matrix(
        dir.path(),
        "tch, candle",
        "cpu, cuda",
        "f32, f16",
        "lora, dora",
    );
    report_of(&Matrix::load(&p, None).unwrap(), "m.yaml")
}

const ID: &str = "tch/cpu/f16/dora/forward/native/s";

fn accepted(r: &Report) -> Snapshot {
    snapshot::from_report(r)
}

/// The exit code `run --check` would end with (the CLI test below checks the process does).
fn exit(v: &gate::Verdict) -> i32 {
    peft_compat::cli::gate_exit_code(v)
}

fn only_change(v: &gate::Verdict) -> &gate::Change {
    assert_eq!(v.changes.len(), 1, "{:?}", v.changes);
    &v.changes[0]
}

#[test]
fn an_unchanged_run_passes_and_absent_devices_are_not_checked() {
    let r = small_report();
    let v = gate::check(&r, &accepted(&r), false);
    assert!(v.passed(), "{}", gate_text(&v, "m.yaml"));
    assert_eq!(exit(&v), 0);
    assert_eq!(v.checked, 8);
    assert_eq!(
        v.not_checked.len(),
        8,
        "cuda cases are not checked here, not passed"
    );
    assert!(gate_text(&v, "m.yaml").contains("not checked here: 8 cases"));
}

#[test]
fn a_pass_that_becomes_unsupported_is_a_regression() {
    let mut r = small_report();
    let snap = accepted(&r);
    let c = r.cases.iter_mut().find(|c| c.id == ID).unwrap();
    c.outcome = OutcomeKind::Unsupported;
    c.metrics = None;
    c.error = Some("\"addmm_impl_cpu_\" not implemented for 'Half'".into());
    let v = gate::check(&r, &snap, false);
    assert!(!v.passed());
    assert_eq!(exit(&v), 1);
    let ch = only_change(&v);
    assert_eq!(ch.kind, ChangeKind::Regression);
    assert!(ch.detail.starts_with("pass (result"), "{}", ch.detail);
    assert!(
        ch.detail.contains("-> unsupported") && ch.detail.contains("addmm_impl_cpu_"),
        "{}",
        ch.detail
    );
    assert!(gate_text(&v, "m.yaml").contains(&format!("FAIL {ID}: regression")));
}

fn scale_error(r: &mut Report, factor: f64) {
    let c = r.cases.iter_mut().find(|c| c.id == ID).unwrap();
    for o in &mut c.metrics.as_mut().unwrap().outputs {
        o.err_units *= factor;
    }
}

#[test]
fn an_error_that_doubles_and_more_fails_but_drift_within_the_rule_does_not() {
    let base = small_report();
    let snap = accepted(&base);
    let before = snap[ID].outputs["result"].err_units;
    let mut worse = base.clone();
    // Make the error clearly exceed both the x2 rule and the +1 u noise floor.
    scale_error(&mut worse, (2.0 * before + 2.0) / before * 1.1);
    let v = gate::check(&worse, &snap, false);
    assert_eq!(exit(&v), 1);
    let ch = only_change(&v);
    assert_eq!(ch.kind, ChangeKind::Regression);
    assert!(ch.detail.contains("error grew from"), "{}", ch.detail);
    let mut noise = base.clone();
    scale_error(&mut noise, 1.5);
    let v = gate::check(&noise, &snap, false);
    assert_eq!(exit(&v), 0);
    assert!(
        v.passed(),
        "1.5x is within the drift rule: {}",
        gate_text(&v, "m.yaml")
    );
}

#[test]
fn a_new_pass_is_an_unexpected_success_unless_allowed() {
    let r = small_report();
    let mut snap = accepted(&r);
    snap.get_mut(ID).unwrap().outcome = OutcomeKind::Mismatch;
    let v = gate::check(&r, &snap, false);
    let ch = only_change(&v);
    assert_eq!(ch.kind, ChangeKind::UnexpectedSuccess);
    assert!(
        ch.detail.starts_with("mismatch") && ch.detail.contains("-> pass"),
        "{}",
        ch.detail
    );
    let text = gate_text(&v, "m.yaml");
    assert!(
        text.contains("cargo insta review") && text.contains("peft-compat run m.yaml --check"),
        "{text}"
    );
    assert!(!v.passed());
    assert_eq!(exit(&v), 1);
    let allowed = gate::check(&r, &snap, true);
    assert!(allowed.passed());
    assert_eq!(exit(&allowed), 0);
    assert!(gate_text(&allowed, "m.yaml").contains(&format!("note {ID}: unexpected success")));
}

#[test]
fn missing_and_orphan_entries_fail() {
    let r = small_report();
    let mut snap = accepted(&r);
    snap.remove(ID);
    let v = gate::check(&r, &snap, false);
    assert_eq!(exit(&v), 1);
    let ch = only_change(&v);
    assert_eq!(ch.kind, ChangeKind::Missing);
    assert!(gate_text(&v, "m.yaml").contains(&format!("FAIL {ID}: missing from snapshot")));
    let mut snap = accepted(&r);
    let e = snap[ID].clone();
    snap.insert("tch/cpu/f16/dora/forward/native/gone".into(), e);
    let v = gate::check(&r, &snap, false);
    assert_eq!(exit(&v), 1);
    let ch = only_change(&v);
    assert_eq!(ch.kind, ChangeKind::Orphan);
    assert!(ch.detail.contains("no case of the matrix produces it"));
}

#[test]
fn a_shifted_number_with_the_same_error_is_caught_by_the_norm() {
    let mut r = small_report();
    let snap = accepted(&r);
    let c = r.cases.iter_mut().find(|c| c.id == ID).unwrap();
    c.metrics.as_mut().unwrap().outputs[0].norm *= 1.01;
    let v = gate::check(&r, &snap, false);
    assert_eq!(exit(&v), 1);
    assert!(
        only_change(&v).detail.contains("norm moved"),
        "{:?}",
        v.changes
    );
}

/// Same matrix, seed and build: bit-identical results, so byte-identical snapshots.
#[test]
fn runs_are_deterministic() {
    let a = snapshot::to_text(&snapshot::from_report(&run_default_cpu()));
    let b = snapshot::to_text(&snapshot::from_report(&run_default_cpu()));
    assert_eq!(a, b);
}

/// The project gates itself: the CPU part of the default matrix against the committed snapshot.
/// A change to the math that shifts any number or outcome fails here (and so in .ci/run).
#[test]
fn the_default_matrix_passes_its_own_gate() {
    let r = run_default_cpu();
    let snap = snapshot::read(Path::new("snapshots/default.snap")).unwrap();
    let v = gate::check(&r, &snap, false);
    assert!(v.passed(), "{}", gate_text(&v, "matrices/default.yaml"));
    let ran = |prefix: &str| {
        r.cases
            .iter()
            .any(|c| c.id.starts_with(prefix) && c.outcome != OutcomeKind::Skipped)
    };
    if ran("tch@2.1.2/") && ran("peft@0.10.0+torch2.1.2/") {
        // libtorch 2.11 and 2.1.2, candle, and the three PEFT builds on CPU.
        assert_eq!(v.checked, 840);
        // The 22 candle 16-bit DoRA mismatches on `wide`, the 38 fp16 refusals of libtorch
        // 2.1.2 and the 48 of PEFT 0.10.0 and 0.11.0 on torch 2.1.2, each held to its rule
        // (active there by that case's libtorch).
        assert_eq!(v.expected_failures, 108);
        assert!(
            r.inactive_expectations.is_empty(),
            "{:?}",
            r.inactive_expectations
        );
    } else {
        // A runner that declared the old builds not expected: they are not checked, and
        // what ran still passed the gate above.
        assert!(
            std::env::var_os("PEFT_COMPAT_SKIP_LIBTORCH_2_1").is_some()
                || std::env::var_os("PEFT_COMPAT_SKIP_PEFT_BUILDS").is_some(),
            "the tch@2.1.2 worker or the PEFT builds on torch 2.1.2 did not run"
        );
    }
}

#[test]
fn cli_check_exits_1_on_a_regression_and_writes_nothing_under_ci() {
    let dir = tempfile::tempdir().unwrap();
    let m = tiny_matrix(dir.path(), "candle", "cpu", "f16", "dora");
    let snap = dir.path().join("m.snap");
    let bin = env!("CARGO_BIN_EXE_peft-compat");
    let run = |ci: bool| {
        let mut c = Command::new(bin);
        c.args(["run", "-q", "--results", "/dev/null", "--check", "--junit"])
            .arg(dir.path().join("j.xml"))
            .arg(&m)
            .arg("--snapshot")
            .arg(&snap);
        if ci {
            c.env("CI", "true");
        } else {
            c.env_remove("CI");
        }
        c.output().unwrap()
    };
    // No snapshot: fails; outside CI it leaves m.snap.new to accept.
    let out = run(false);
    assert_eq!(out.status.code(), Some(1));
    assert!(String::from_utf8_lossy(&out.stdout).contains("no snapshot at"));
    let pending = dir.path().join("m.snap.new");
    assert!(pending.exists());
    std::fs::rename(&pending, &snap).unwrap();
    assert_eq!(run(true).status.code(), Some(0));
    let junit = std::fs::read_to_string(dir.path().join("j.xml")).unwrap();
    assert!(
        junit.contains(
            "<testcase classname=\"candle.cpu.f16\" name=\"candle/cpu/f16/dora/forward/native/s\""
        ),
        "{junit}"
    );
    // Plant a regression in the accepted snapshot: the accepted outputs were other numbers (an
    // error that grows within a quarter of the tolerance is noise, so moving the accepted
    // error alone is not a regression at this size).
    let mut accepted = snapshot::read(&snap).unwrap();
    for e in accepted.values_mut() {
        for o in e.outputs.values_mut() {
            o.norm *= 1.5;
        }
    }
    std::fs::write(
        &snap,
        format!("---\nsource: test\n---\n{}", snapshot::to_text(&accepted)),
    )
    .unwrap();
    let out = run(true);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains("FAIL candle/cpu/f16/dora/forward/native/s: regression")
            && stdout.contains("(CI is set: no snapshot written)"),
        "{stdout}"
    );
    assert!(!pending.exists(), "nothing is written under CI");
    assert!(std::fs::read_to_string(dir.path().join("j.xml"))
        .unwrap()
        .contains("<failure type=\"regression\""));
}

/// Each kind of planted change, through the binary: the process's exit code and its message.
#[test]
fn cli_exit_code_and_message_for_each_planted_change() {
    let dir = tempfile::tempdir().unwrap();
    let m = tiny_matrix(dir.path(), "candle", "cpu, cuda", "f16", "dora");
    let snap = dir.path().join("m.snap");
    let bin = env!("CARGO_BIN_EXE_peft-compat");
    let out = Command::new(bin)
        .args(["run", "-q", "--results", "/dev/null", "--snapshot-out"])
        .arg(&snap)
        .arg(&m)
        .env_remove("CI")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    let clean = snapshot::read(&snap).unwrap();
    let id = "candle/cpu/f16/dora/forward/native/s";
    let check = |plant: &dyn Fn(&mut Snapshot), extra: &[&str]| {
        let mut s = clean.clone();
        plant(&mut s);
        std::fs::write(&snap, snapshot::to_text(&s)).unwrap();
        let out = Command::new(bin)
            .args([
                "run",
                "-q",
                "--results",
                "/dev/null",
                "--check",
                "--snapshot",
            ])
            .arg(&snap)
            .args(extra)
            .arg(&m)
            .env("CI", "true")
            .output()
            .unwrap();
        (
            out.status.code().unwrap(),
            String::from_utf8_lossy(&out.stdout).into_owned(),
        )
    };
    type Plant = Box<dyn Fn(&mut Snapshot)>;
    let cases: Vec<(&str, Plant, &[&str], i32, String)> = vec![
        (
            "nothing changed; the CUDA case is not checked here",
            Box::new(|_| {}),
            &[],
            0,
            "not checked here: 1 case (device absent, or backend not expected here)".into(),
        ),
        (
            "the error grew 1.5x: within the drift rule",
            Box::new(|s| {
                for o in s.get_mut(id).unwrap().outputs.values_mut() {
                    o.err_units /= 1.5;
                }
            }),
            &[],
            0,
            "gate passed: 1 case checked".into(),
        ),
        (
            "the numbers changed",
            Box::new(|s| {
                for o in s.get_mut(id).unwrap().outputs.values_mut() {
                    o.norm *= 1.5;
                }
            }),
            &[],
            1,
            format!("FAIL {id}: regression"),
        ),
        (
            "a new pass",
            Box::new(|s| s.get_mut(id).unwrap().outcome = OutcomeKind::Mismatch),
            &[],
            1,
            format!("FAIL {id}: unexpected success: mismatch"),
        ),
        (
            "a new pass, allowed",
            Box::new(|s| s.get_mut(id).unwrap().outcome = OutcomeKind::Mismatch),
            &["--allow-improvements"],
            0,
            format!("note {id}: unexpected success"),
        ),
        (
            "a missing entry",
            Box::new(|s| {
                s.remove(id);
            }),
            &[],
            1,
            format!("FAIL {id}: missing from snapshot"),
        ),
        (
            "an orphan entry",
            Box::new(|s| {
                let e = s[id].clone();
                s.insert("candle/cpu/f16/dora/forward/native/gone".into(), e);
            }),
            &[],
            1,
            "FAIL candle/cpu/f16/dora/forward/native/gone: orphan snapshot entry".into(),
        ),
    ];
    for (what, plant, extra, code, message) in cases {
        let (got, stdout) = check(&*plant, extra);
        assert_eq!(got, code, "{what}: {stdout}");
        assert!(
            stdout.contains(&message),
            "{what}: `{message}` not in {stdout}"
        );
    }
}

/// A failure that only the snapshot accepts (no expectation says why) is never a green JUnit
/// testcase: it is skipped with type `accepted` and the reason; and the gate's text lists it in
/// a note. (Planted: an f16 case recorded as a mismatch with its own numbers.)
#[test]
fn an_accepted_but_unexplained_failure_is_not_green_in_junit() {
    let mut r = small_report();
    let c = r.cases.iter_mut().find(|c| c.id == ID).unwrap();
    c.outcome = OutcomeKind::Mismatch;
    let v = gate::check(&r, &accepted(&r), false);
    assert!(v.passed(), "{}", gate_text(&v, "m.yaml"));
    assert_eq!(v.unexplained, vec![ID.to_string()]);
    assert!(gate_text(&v, "m.yaml").contains(&format!(
        "note: 1 failing case accepted by the snapshot with no expectation saying why, e.g. {ID}"
    )));
    let xml = peft_compat::render::junit::render(&r, Some(&v));
    let at = xml.find(&format!("name=\"{ID}\"")).unwrap();
    let case = &xml[at..at + xml[at..].find("</testcase>").unwrap()];
    assert!(
        case.contains("<skipped type=\"accepted\" message=\"mismatch accepted by the snapshot, with no expectation saying why"),
        "{case}"
    );
}
