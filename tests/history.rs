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
    let t = peft_compat::render::history::text(&h, false, false);
    assert!(t.contains("2.2.2: unsupported -> pass"), "{t}");
    assert!(t.contains("unchanged across every build"), "{t}");
    assert!(!t.contains("cpu/f16/dora/init/upcast/s"), "{t}");
    let all = peft_compat::render::history::text(&h, true, true);
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
