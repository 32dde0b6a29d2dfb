//! The version axis with many libtorch builds (ids, patterns, expectations by range, a minor no
//! tch release targets) and `peft-compat history` over the sweep: columns in version order, the
//! release where a cell changed, error sizes beyond their noise, PEFT builds ordered too, the
//! Markdown and JSON forms, and a warning when reports are not comparable.

mod support;

use peft_compat::case::{Backend, Case, DType, LibtorchBuild, Version};
use peft_compat::report::{CaseReport, Report, Status};
use peft_compat::spec::Matrix;
use peft_compat::verdict;
use peft_compat::verdict::history::history;
use peft_compat::worker::io::{Inputs, Outputs};
use peft_compat::worker::ops::{BackendError, OpResult};

const OLD: &str = "\"addmm_impl_cpu_\" not implemented for 'Half'";

const SWEEP: &str = "\
seed: 4
axes:
  backend: [tch@2.1.2, tch@2.2.2, tch@2.4.1, tch@2.8.0, tch]
  device: [cpu]
  dtype: [f32, f16]
  adapter: [dora]
  op: [init, forward]
  precision: [native, upcast]
exclude:
  - {dtype: f32, precision: upcast}
shapes:
  s: {batch: 2, in_features: 16, out_features: 8, rank: 2, alpha: 4}
expectations:
  - backend: tch
    dtype: f16
    precision: native
    when: {libtorch: \"<2.2\"}
    expect: unsupported
    error: \"addmm_impl_cpu_\"
    reason: no CPU fp16 matmul before libtorch 2.2
  - backend: tch@2.4.1
    dtype: f32
    op: forward
    when: {libtorch: \">=2.4\"}
    expect: pass
    reason: a rule for one build by name, and a range
";

fn load(body: &str) -> Matrix {
    let dir = tempfile::tempdir().unwrap();
    let p = dir.path().join("m.yaml");
    std::fs::write(&p, body).unwrap();
    Matrix::load(&p, None).unwrap()
}

/// Every build in process on libtorch 2.11, those before 2.2 refusing fp16 matmuls as libtorch
/// 2.1 does (PEFT's fp32 product excepted).
fn simulated(c: &Case, inp: &Inputs) -> OpResult<Outputs> {
    let mut c = c.clone();
    let old = c.point.backend.libtorch() < Some(Version::new(2, 2, 0));
    if old && c.point.dtype == DType::F16 && !c.upcasts() {
        return Err(BackendError::new(OLD));
    }
    c.point.backend = Backend::Tch;
    support::run_on_backend(&c, inp)
}

fn sweep() -> Report {
    let m = load(SWEEP);
    let unavailable = |b: Backend, _| match b {
        Backend::TchAt(v) => LibtorchBuild::missing_minor(v),
        _ => None,
    };
    let backends = peft_compat::exec::InProcess {
        run: &simulated,
        unavailable: &unavailable,
    };
    let results = peft_compat::exec::run_in_process(
        &m,
        &peft_compat::exec::RunOptions::default(),
        &backends,
        &mut |_| {},
    );
    verdict::assemble(
        "m.yaml",
        &m,
        support::env(),
        results.iter().map(CaseReport::from_result).collect(),
        0.0,
    )
}

#[test]
fn many_builds_parse_expand_and_take_their_rules_by_range() {
    let m = load(SWEEP);
    // 5 builds x (f32 native + f16 native/upcast) x 2 ops.
    assert_eq!(m.cases.len(), 5 * 3 * 2);
    let builds: Vec<String> = m
        .cases
        .iter()
        .map(|c| c.point.backend.to_string())
        .collect::<Vec<_>>()
        .chunks(6)
        .map(|c| c[0].clone())
        .collect();
    assert_eq!(
        builds,
        ["tch@2.1.2", "tch@2.2.2", "tch@2.4.1", "tch@2.8.0", "tch"]
    );
    // tch@2.11.0 is `tch`; a patch that is not the pinned one names the pinned one.
    assert_eq!("tch@2.11.0".parse::<Backend>(), Ok(Backend::Tch));
    let e = "tch@2.2.0".parse::<Backend>().unwrap_err();
    assert!(e.contains("the libtorch 2.2 build is tch@2.2.2"), "{e}");
    assert!(LibtorchBuild::missing_minor(Version::new(2, 8, 0))
        .unwrap()
        .contains("tch 0.20.0 targets 2.7, tch 0.22.0 targets 2.9"));
    assert!(LibtorchBuild::missing_minor(Version::new(2, 4, 1)).is_none());
    // Ordering: the libtorch builds by version.
    let mut v: Vec<Backend> = ["tch", "tch@2.4.1", "tch@2.1.2", "tch@2.10.0"]
        .iter()
        .map(|s| s.parse().unwrap())
        .collect();
    v.sort_by_key(|b| b.libtorch());
    let names: Vec<String> = v.iter().map(|b| b.to_string()).collect();
    assert_eq!(names, ["tch@2.1.2", "tch@2.4.1", "tch@2.10.0", "tch"]);
    // A PEFT build's tch twin is the build on its libtorch.
    let p: Backend = "peft@0.13.0+torch2.4.1".parse().unwrap();
    assert_eq!(p.tch_twin(), Some("tch@2.4.1".parse().unwrap()));
    let r = sweep();
    let get = |id: &str| r.cases.iter().find(|c| c.id == id).unwrap();
    let old = get("tch@2.1.2/cpu/f16/dora/forward/native/s");
    assert_eq!(old.outcome.as_str(), "unsupported");
    assert_eq!(old.expected.as_ref().unwrap().status, Status::Met);
    assert!(get("tch@2.2.2/cpu/f16/dora/forward/native/s")
        .expected
        .is_none());
    let named = get("tch@2.4.1/cpu/f32/dora/forward/native/s");
    assert_eq!(named.expected.as_ref().unwrap().status, Status::Met);
    assert!(get("tch/cpu/f32/dora/forward/native/s").expected.is_none());
    let skipped = get("tch@2.8.0/cpu/f32/dora/init/native/s");
    assert_eq!(skipped.outcome.as_str(), "skipped");
    assert!(skipped.error.as_deref().unwrap().contains("no tch release"));
}

#[test]
fn history_names_the_release_where_each_cell_changed() {
    let mut r = sweep();
    // A precision change beyond its noise from 2.4.1 on (the error figures are the report's).
    for c in r.cases.iter_mut().filter(|c| {
        c.id.ends_with("cpu/f32/dora/init/native/s")
            && c.point.backend.libtorch() >= Some(Version::new(2, 4, 0))
    }) {
        if let Some(m) = c.metrics.as_mut() {
            m.outputs[0].err_units = 40.0;
        }
    }
    let h = history(&[r.clone()], &["sweep.json".into()]);
    assert_eq!(h.series.len(), 1);
    let s = &h.series[0];
    assert_eq!(s.library, "libtorch");
    assert_eq!(s.columns, ["2.1.2", "2.2.2", "2.4.1", "2.8.0", "2.11.0"]);
    let row = |cell: &str| s.rows.iter().find(|r| r.cell == cell).unwrap();
    assert_eq!(
        row("cpu/f16/dora/forward/native/s").summary(&s.columns),
        "2.2.2: unsupported -> pass"
    );
    assert_eq!(
        row("cpu/f16/dora/init/upcast/s").summary(&s.columns),
        "unchanged 2.1.2 -> 2.11.0"
    );
    let units = row("cpu/f32/dora/init/native/s").summary(&s.columns);
    assert!(
        units.starts_with("2.4.1: ") && units.ends_with(" u -> 40.0 u"),
        "{units}"
    );
    // 2.8.0 ran nothing: its column is empty.
    assert!(s.rows.iter().all(|r| r.seen[3].is_none()));
    // The table lists what changed and counts the rest.
    let t = peft_compat::render::history::text(&h, false, false, false);
    assert!(t.contains("2.2.2: unsupported -> pass"), "{t}");
    assert!(t.contains("unchanged across every build"), "{t}");
    assert!(!t.contains("cpu/f16/dora/init/upcast/s"), "{t}");
    let all = peft_compat::render::history::text(&h, true, true, true);
    assert!(all.contains("| cpu/f16/dora/init/upcast/s"), "{all}");
}

#[test]
fn peft_builds_are_a_series_in_release_order() {
    let mut r = sweep();
    // Relabel three builds' cases as PEFT builds: the series orders them by release.
    let relabel = [
        ("tch@2.4.1", "peft"),
        ("tch@2.2.2", "peft@0.11.0+torch2.1.2"),
        ("tch@2.1.2", "peft@0.10.0+torch2.1.2"),
    ];
    r.cases.retain(|c| c.point.backend != Backend::Tch);
    for c in r.cases.iter_mut() {
        if let Some((_, to)) = relabel
            .iter()
            .find(|(from, _)| c.point.backend.to_string() == *from)
        {
            c.point.backend = to.parse().unwrap();
        }
    }
    let h = history(&[r], &["r.json".into()]);
    let peft = h.series.iter().find(|s| s.library == "peft").unwrap();
    assert_eq!(
        peft.columns,
        [
            "0.10.0+torch2.1.2",
            "0.11.0+torch2.1.2",
            "0.21.2+torch2.11.0"
        ]
    );
}

/// The binary: Markdown and JSON, and a warning when the reports came from other seeds.
#[test]
fn history_prints_markdown_writes_json_and_warns_on_other_seeds() {
    let dir = tempfile::tempdir().unwrap();
    let r = sweep();
    let a = dir.path().join("a.json");
    std::fs::write(&a, r.to_json()).unwrap();
    let mut other = r.clone();
    other.seed = 99;
    let b = dir.path().join("b.json");
    std::fs::write(&b, other.to_json()).unwrap();
    let json = dir.path().join("h.json");
    let out = support::bin()
        .args(["history", "--markdown", "--json"])
        .arg(&json)
        .arg(&a)
        .arg(&b)
        .output()
        .unwrap();
    assert!(out.status.success(), "{out:?}");
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("### libtorch builds"), "{text}");
    assert!(text.contains("| 2.2.2: unsupported -> pass |"), "{text}");
    assert!(
        text.contains("warning: ") && text.contains("seed 99"),
        "{text}"
    );
    let h = support::json(&json);
    assert_eq!(h["schema"], "peft-compat/history/v1");
    assert_eq!(h["series"][0]["columns"][0], "2.1.2");
}

/// `compare` on three-path reports: a row per path (autocast's verdict is not folded into the
/// two-path cell), the worst error in u beside each differing outcome, a change of error size
/// beyond its noise counted as a difference, and a warning for another seed.
#[test]
fn compare_shows_paths_figures_and_warns_when_not_comparable() {
    use peft_compat::verdict::compare::{compare, Labeled};
    let body = SWEEP
        .replace(
            "backend: [tch@2.1.2, tch@2.2.2, tch@2.4.1, tch@2.8.0, tch]",
            "backend: [tch@2.1.2, tch@2.4.1]",
        )
        .replace(
            "precision: [native, upcast]",
            "precision: [native, autocast]",
        )
        .replace(
            "{dtype: f32, precision: upcast}",
            "{dtype: f32, precision: autocast}",
        );
    let m = load(&body);
    let backends = peft_compat::exec::InProcess {
        run: &simulated,
        unavailable: &|_, _| None,
    };
    let results = peft_compat::exec::run_in_process(
        &m,
        &peft_compat::exec::RunOptions::default(),
        &backends,
        &mut |_| {},
    );
    let a = verdict::assemble(
        "m.yaml",
        &m,
        support::env(),
        results.iter().map(CaseReport::from_result).collect(),
        0.0,
    );
    let mut b = a.clone();
    b.seed = 7;
    let grown = "tch@2.1.2/cpu/f32/dora/forward/native/s";
    let c = b.cases.iter_mut().find(|c| c.id == grown).unwrap();
    c.metrics.as_mut().unwrap().outputs[0].err_units = 50.0;
    let labeled = [
        Labeled {
            label: "a".into(),
            report: a,
        },
        Labeled {
            label: "b".into(),
            report: b,
        },
    ];
    let cmp = compare(&labeled);
    let text = peft_compat::render::compare::text(&labeled, &cmp, false, 50, true);
    // Each path has its own row (autocast's verdict is not folded into native/upcast's).
    assert!(text.contains("dora forward native"), "{text}");
    assert!(text.contains("dora forward autocast"), "{text}");
    assert!(
        text.contains("warning: a has seed 4 and b seed 7"),
        "{text}"
    );
    let d = cmp.differences.iter().find(|d| d.id == grown).unwrap();
    assert_eq!(d.observed[1].3, Some(50.0));
    assert!(text.contains(", 50.0 u"), "{text}");
    // --units: each report's worst error in its part of the cell.
    assert!(text.contains(" / ✓ 50.0"), "{text}");
}

const EVIDENCE: &str = "tests/evidence/versions-2026-12-03/versions.json";

/// The committed sweep over every libtorch build, judged again by today's matrices/versions.yaml:
/// it holds every case the file expands to, every governed case meets its rule, nothing fails
/// that no rule explains, and its history names the releases the README states.
#[test]
fn the_committed_sweep_meets_the_versions_matrix_and_tells_its_history() {
    let m = Matrix::load(std::path::Path::new("matrices/versions.yaml"), None).unwrap();
    let mut r: Report = serde_json::from_str(&std::fs::read_to_string(EVIDENCE).unwrap()).unwrap();
    let ids: std::collections::BTreeSet<String> = m.cases.iter().map(|c| c.id()).collect();
    let got: std::collections::BTreeSet<String> = r.cases.iter().map(|c| c.id.clone()).collect();
    assert_eq!(ids, got, "the evidence is a run of this very matrix");
    for c in &mut r.cases {
        c.expected = None;
    }
    verdict::expectations::annotate(&mut r, &m.expectations);
    for c in &r.cases {
        match (&c.expected, c.outcome) {
            // 2.8.0's cases did not run: their rules are not_run there.
            (Some(e), _) if c.skip_kind().is_some() => assert_eq!(e.status, Status::NotRun),
            (Some(e), _) => {
                assert_eq!(e.status, Status::Met, "{}: {} ({})", c.id, e.rule, e.reason)
            }
            (None, o) if o.is_failure() => panic!("{} {o}: no rule explains it", c.id),
            _ => {}
        }
        if c.point.backend.to_string() == "tch@2.8.0" {
            assert_eq!(c.skip_kind().map(|k| k.as_str()), Some("not_applicable"));
        }
    }
    let h = history(&[r], &[EVIDENCE.into()]);
    let s = &h.series[0];
    assert_eq!(
        s.columns,
        [
            "2.1.2", "2.2.2", "2.3.1", "2.4.1", "2.5.1", "2.6.0", "2.7.1", "2.8.0", "2.9.1",
            "2.10.0", "2.11.0"
        ]
    );
    let says = |cell: &str| {
        s.rows
            .iter()
            .find(|r| r.cell == cell)
            .unwrap_or_else(|| panic!("{cell}"))
            .summary(&s.columns)
    };
    assert_eq!(
        says("cpu/f16/dora/init/native/small"),
        "2.2.2: unsupported -> pass"
    );
    assert_eq!(
        says("cpu/f16/lora/forward/native/wide"),
        "2.2.2: unsupported -> pass"
    );
    for cell in [
        "cpu/f16/pissa/init/native/small",
        "cpu/bf16/pissa/init/native/small",
        "cpu/f16/olora/init/native/small",
        "cpu/bf16/olora/init/native/wide",
        "cpu/bf16/dora/init/native/wide",
        "cpu/f16/dora/init/upcast/wide",
    ] {
        assert_eq!(says(cell), "unchanged 2.1.2 -> 2.11.0", "{cell}");
    }
}

/// A build that cannot be provisioned skips its cases with the provisioning script's words
/// (`backend_lost`: it should have run), and the other builds' cases run. The binary is copied
/// where no worker lies beside it, and PEFT_COMPAT_ROOT points at a checkout whose
/// scripts/libtorch.sh fails as a download would.
#[test]
fn a_build_that_fails_to_provision_skips_with_the_reason_and_the_rest_runs() {
    let dir = tempfile::tempdir().unwrap();
    let bin = dir.path().join("peft-compat");
    std::fs::copy(env!("CARGO_BIN_EXE_peft-compat"), &bin).unwrap();
    let root = dir.path().join("checkout");
    std::fs::create_dir_all(root.join("scripts")).unwrap();
    let script = root.join("scripts/libtorch.sh");
    std::fs::write(
        &script,
        "#!/bin/sh\necho \"ERROR: Could not find a version that satisfies the requirement torch==$1\" >&2\nexit 1\n",
    )
    .unwrap();
    use std::os::unix::fs::PermissionsExt;
    std::fs::set_permissions(&script, std::fs::Permissions::from_mode(0o755)).unwrap();
    let m = support::write(
        dir.path(),
        "m.yaml",
        &SWEEP.replace(
            "backend: [tch@2.1.2, tch@2.2.2, tch@2.4.1, tch@2.8.0, tch]",
            "backend: [tch@2.4.1, tch]",
        ),
    );
    let json = dir.path().join("r.json");
    let tch = support::target_dir().join("peft-compat-worker-tch");
    let run = || {
        std::process::Command::new(&bin)
            .env("PEFT_COMPAT_ROOT", &root)
            .env("NO_COLOR", "1")
            .args(["run", "-q", "--results", "/dev/null", "--json"])
            .arg(&json)
            .arg(&m)
            .arg("--worker")
            .arg(format!("tch={}", tch.display()))
            .output()
    };
    // The copy was just written: a child another test thread forks in the meantime holds its
    // write descriptor until that child execs, and exec then fails with ETXTBSY. Wait it out.
    let mut out = run();
    for _ in 0..50 {
        match &out {
            Err(e) if e.kind() == std::io::ErrorKind::ExecutableFileBusy => {
                std::thread::sleep(std::time::Duration::from_millis(20));
                out = run();
            }
            _ => break,
        }
    }
    let out = out.unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(
        out.status.code(),
        Some(4),
        "a lost backend fails the run: {err}"
    );
    assert_eq!(
        err.matches("peft-compat: provisioning tch@2.4.1").count(),
        1,
        "{err}"
    );
    let r = support::json(&json);
    for c in r["cases"].as_array().unwrap() {
        if c["backend"] == "tch@2.4.1" {
            assert_eq!(c["skip"], "backend_lost", "{c}");
            let e = c["error"].as_str().unwrap();
            assert!(
                e.contains("tch@2.4.1: its environment cannot be made")
                    && e.contains("torch==2.4.1"),
                "{e}"
            );
        } else {
            assert_ne!(c["outcome"], "skipped", "{c}");
        }
    }
}
