//! Two libtorch builds in one run: the `tch@2.1.2` backend value (parsing, ids, the table),
//! expectations judged per case by that case's libtorch, the real libtorch 2.1.2 worker, and
//! `compare` across environments.

mod support;

use peft_compat::case::{Backend, Case};
use peft_compat::environment::Environment;
use peft_compat::render as table;
use peft_compat::report::CaseReport;
use peft_compat::report::Report;
use peft_compat::report::Status;
use peft_compat::spec::Matrix;
use peft_compat::verdict;
use peft_compat::verdict::compare::{self, Labeled};
use peft_compat::worker::io::{Inputs, Outputs};
use peft_compat::worker::ops::{BackendError, OpResult};
use std::collections::BTreeMap;
use std::path::Path;
use std::process::Command;

const OLD_TORCH_ERROR: &str = "\"addmm_impl_cpu_\" not implemented for 'Half'";

const TWO_BUILDS: &str = "\
seed: 4
axes:
  backend: [tch, tch@2.1.2]
  device: [cpu]
  dtype: [f16, bf16]
  adapter: [dora]
  op: [init, forward]
  precision: [native, upcast]
exclude:
  - {dtype: bf16, precision: upcast}
shapes:
  s: {batch: 2, in_features: 16, out_features: 8, rank: 2, alpha: 4}
expectations:
  - backend: tch
    dtype: f16
    precision: native
    when: {libtorch: \"<2.2\"}
    expect: unsupported
    error: \"\\\"addmm_impl_cpu_\\\" not implemented for 'Half'\"
    reason: no CPU fp16 matmul before libtorch 2.2
";

fn load(body: &str) -> Matrix {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("m.yaml");
    std::fs::write(&p, body).unwrap();
    Matrix::load(&p, None).unwrap()
}

/// The environment of a run with both builds: each build's own libtorch.
fn two_builds_env() -> Environment {
    let mut env = support::env();
    let lib = |v: &str| -> BTreeMap<String, String> {
        [("libtorch".to_string(), v.to_string())]
            .into_iter()
            .collect()
    };
    env.backends.insert("tch".into(), lib("2.11.0+cpu"));
    env.backends.insert("tch@2.1.2".into(), lib("2.1.2"));
    env
}

/// tch 2.11 in process; the 2.1.2 build simulated: refuses fp16 matmuls as libtorch 2.1 does,
/// except where PEFT's fp32 product (DoRA init, upcast) avoids them.
fn old_and_new(c: &Case, inp: &Inputs) -> OpResult<Outputs> {
    let mut c = c.clone();
    if c.point.backend == Backend::TCH_2_1_2 {
        if c.point.dtype == peft_compat::case::DType::F16 && !c.upcasts() {
            return Err(BackendError::new(OLD_TORCH_ERROR));
        }
        c.point.backend = Backend::Tch;
    }
    support::run_on_backend(&c, inp)
}

#[test]
fn the_version_axis_parses_names_cases_and_reports_bad_values() {
    let m = load(TWO_BUILDS);
    let ids: Vec<String> = m.cases.iter().map(|c| c.id()).collect();
    assert!(ids.contains(&"tch@2.1.2/cpu/f16/dora/init/native/s".to_string()));
    assert!(ids.contains(&"tch/cpu/f16/dora/init/native/s".to_string()));
    assert_eq!(ids.len(), 12);
    // `tch` in a pattern covers every libtorch build; `tch@2.1.2` only its own.
    let one = load(&TWO_BUILDS.replace(
        "precision: [native, upcast]\nexclude:\n",
        "precision: [native, upcast]\nexclude:\n  - {backend: tch@2.1.2, dtype: bf16}\n",
    ));
    assert_eq!(one.cases.len(), 10);
    let none = load(&TWO_BUILDS.replace(
        "precision: [native, upcast]\nexclude:\n",
        "precision: [native, upcast]\nexclude:\n  - {backend: tch, dtype: bf16}\n",
    ));
    assert_eq!(none.cases.len(), 8);
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("bad.yaml");
    std::fs::write(&p, TWO_BUILDS.replace("tch@2.1.2]", "tch@2.3.0]")).unwrap();
    let e = Matrix::load(&p, None).unwrap_err().to_string();
    assert!(e.contains("bad.yaml:3:"), "{e}");
    assert!(e.contains("tch@2.3.0") && e.contains("tch@2.1.2"), "{e}");
    assert_eq!(
        peft_compat::exec::WorkerPaths::file_name(Backend::TCH_2_1_2),
        "peft-compat-worker-tch-2.1.2"
    );
}

#[test]
fn expectations_hold_each_case_to_its_own_libtorch() {
    let m = load(TWO_BUILDS);
    let unavailable = |b: Backend, d| match b {
        Backend::TCH_2_1_2 => None,
        _ => support::unavailable(b, d),
    };
    let backends = peft_compat::exec::InProcess {
        run: &old_and_new,
        unavailable: &unavailable,
    };
    let results = peft_compat::exec::run_in_process(
        &m,
        &peft_compat::exec::RunOptions::default(),
        &backends,
        &mut |_| {},
    );
    let r = verdict::assemble(
        "m.yaml",
        &m,
        two_builds_env(),
        results.iter().map(CaseReport::from_result).collect(),
        0.0,
    );
    let get = |id: &str| r.cases.iter().find(|c| c.id == id).unwrap();
    let old = get("tch@2.1.2/cpu/f16/dora/forward/native/s");
    assert_eq!(old.outcome.as_str(), "unsupported");
    assert_eq!(old.expected.as_ref().unwrap().status, Status::Met);
    // The same rule does not govern the 2.11 build, where fp16 matmul works.
    let new = get("tch/cpu/f16/dora/forward/native/s");
    assert_eq!(new.outcome.as_str(), "pass");
    assert!(new.expected.is_none());
    // PEFT's fixed path passes on the old build; bf16 works there.
    assert_eq!(
        get("tch@2.1.2/cpu/f16/dora/init/upcast/s").outcome.as_str(),
        "pass"
    );
    assert_eq!(
        get("tch@2.1.2/cpu/bf16/dora/forward/native/s")
            .outcome
            .as_str(),
        "pass"
    );
    // Active for one build: not listed as inactive.
    assert!(r.inactive_expectations.is_empty());
    // The table puts the builds side by side, named by their libtorch.
    let t = table::render_text(&r, false, 40);
    assert!(
        t.contains("tch 2.11.0 cpu") && t.contains("tch 2.1.2 cpu"),
        "{t}"
    );
    assert!(t.contains("↑ upcast"), "{t}");
    // JUnit and snapshots carry the version in the id.
    let junit = peft_compat::render::junit::render(&r, None);
    assert!(junit.contains("tch@2.1.2/cpu/f16/dora/forward/native/s"));
    let snap =
        peft_compat::verdict::snapshot::to_text(&peft_compat::verdict::snapshot::from_report(&r));
    assert!(snap.contains("tch@2.1.2/cpu/f16/dora/forward/native/s"));
}

/// The real libtorch 2.1.2, in its worker: the error PEFT users met, verbatim, and PEFT's fix
/// passing. CI builds the worker (scripts/libtorch-2.1.sh); PEFT_COMPAT_SKIP_LIBTORCH_2_1 skips.
#[test]
fn libtorch_2_1_2_refuses_the_fp16_cpu_matmul_for_real() {
    let worker = support::target_dir().join("peft-compat-worker-tch-2.1.2");
    if std::env::var_os("PEFT_COMPAT_SKIP_LIBTORCH_2_1").is_some() {
        eprintln!("skipped: PEFT_COMPAT_SKIP_LIBTORCH_2_1 is set");
        return;
    }
    assert!(
        worker.is_file(),
        "{} is missing: scripts/libtorch-2.1.sh builds it",
        worker.display()
    );
    let dir = tempfile::tempdir().unwrap();
    let m = dir.path().join("m.yaml");
    std::fs::write(&m, TWO_BUILDS).unwrap();
    let json = dir.path().join("r.json");
    let out = Command::new(env!("CARGO_BIN_EXE_peft-compat"))
        .arg("run")
        .arg(&m)
        .args(["-q", "--json"])
        .arg(&json)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let r: Report = serde_json::from_str(&std::fs::read_to_string(&json).unwrap()).unwrap();
    // The wheel's own version string (2.1.2+cu121: built for CUDA 12.1, run here on CPU).
    assert!(r.environment.backends["tch@2.1.2"]["libtorch"].starts_with("2.1.2"));
    assert_eq!(r.environment.backends["tch@2.1.2"]["tch"], "0.14.0");
    let get = |id: &str| r.cases.iter().find(|c| c.id == id).unwrap();
    for id in [
        "tch@2.1.2/cpu/f16/dora/init/native/s",
        "tch@2.1.2/cpu/f16/dora/forward/native/s",
    ] {
        let c = get(id);
        assert_eq!(c.outcome.as_str(), "unsupported", "{id}");
        assert!(
            c.error.as_deref().unwrap().contains(OLD_TORCH_ERROR),
            "{id}: {:?}",
            c.error
        );
        assert_eq!(c.expected.as_ref().unwrap().status, Status::Met);
    }
    assert_eq!(
        get("tch@2.1.2/cpu/f16/dora/init/upcast/s").outcome.as_str(),
        "pass"
    );
    assert_eq!(
        get("tch@2.1.2/cpu/bf16/dora/forward/native/s")
            .outcome
            .as_str(),
        "pass"
    );
    assert_eq!(
        get("tch/cpu/f16/dora/forward/native/s").outcome.as_str(),
        "pass"
    );
}

fn write_report(dir: &Path, name: &str, r: &Report) -> std::path::PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, r.to_json()).unwrap();
    p
}

/// Reports of two environments side by side: cells read `A / B`, the environments are named,
/// and the cases that behave differently are listed with both outcomes and errors.
#[test]
fn compare_puts_environments_side_by_side_and_lists_what_differs() {
    let m = load(&TWO_BUILDS.replace("backend: [tch, tch@2.1.2]", "backend: [tch]"));
    let new = Report::new(
        "m.yaml",
        m.seed,
        support::env(),
        &support::run_in_process(&m, &support::run_on_backend),
        0.0,
    );
    let refuse = |c: &Case, inp: &Inputs| -> OpResult<Outputs> {
        if c.point.dtype == peft_compat::case::DType::F16 && !c.upcasts() {
            Err(BackendError::new(format!("{OLD_TORCH_ERROR} (at 0x7f3a)")))
        } else {
            support::run_on_backend(c, inp)
        }
    };
    let mut old_env = support::env();
    old_env.libraries.insert("libtorch".into(), "2.1.2".into());
    old_env.cpu_model = "an old CPU".into();
    let old = Report::new(
        "m.yaml",
        m.seed,
        old_env,
        &support::run_in_process(&m, &refuse),
        0.0,
    );

    let reports = [
        Labeled {
            label: "new".into(),
            report: new.clone(),
        },
        Labeled {
            label: "old".into(),
            report: old.clone(),
        },
    ];
    let c = compare::compare(&reports);
    let text = peft_compat::render::compare::text(&reports, &c, false, 60, false);
    assert!(text.starts_with("cells read A / B:"), "{text}");
    assert!(
        text.contains("A = new (") && text.contains("B = old (an old CPU"),
        "{text}"
    );
    assert!(text.contains("libtorch 2.1.2"), "{text}");
    assert!(text.contains("✓ / ✗ unsupported"), "{text}");
    assert!(text.contains("✓ / ↑ upcast"), "{text}");
    // f16 init native, forward native and forward upcast (PEFT's fix covers only the init).
    assert_eq!(c.differences.len(), 3, "{text}");
    // Each outcome with its worst error in units of roundoff where the case produced outputs.
    let line = text
        .lines()
        .find(|l| l.contains("tch/cpu/f16/dora/forward/native/s: A: pass, "))
        .unwrap_or_else(|| panic!("{text}"));
    assert!(
        line.contains(" u | B: unsupported (\"addmm_impl_cpu_\""),
        "{line}"
    );

    // Through the binary, from JSON files, with labels.
    let dir = tempfile::tempdir().unwrap();
    let (a, b) = (
        write_report(dir.path(), "a.json", &new),
        write_report(dir.path(), "b.json", &old),
    );
    let out = Command::new(env!("CARGO_BIN_EXE_peft-compat"))
        .arg("compare")
        .args([&a, &b])
        .args(["--label", "cpu-2.11", "--label", "cpu-2.1"])
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert!(
        stdout.contains("A = cpu-2.11") && stdout.contains("differing cases (3)"),
        "{stdout}"
    );
    // One report is not a comparison.
    let out = Command::new(env!("CARGO_BIN_EXE_peft-compat"))
        .arg("compare")
        .arg(&a)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}
