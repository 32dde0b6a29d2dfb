//! PEFT releases as backends: the original failure in PEFT's own code (0.10.0 on torch 2.1.2
//! raises `addmm_impl_cpu_` in `dora_init`, 0.11.0 passes), the skip reasons (a release without
//! DoRA, one without the autocast option, a version pip cannot get: each a skip with its
//! reason, never a pass), agreement with the tch build on the same libtorch in the JSON report,
//! and the gate failing when that agreement drifts.
//!
//! Needs the PEFT environments (scripts/test makes them: scripts/peft-env.sh defaults); without
//! them each test says so and checks nothing. PEFT 0.8.2 and the unavailable version are
//! provisioned on demand by peft-compat itself, as a user's would be.

mod support;
use support::report_case as case;

use serde_json::Value;
use std::path::Path;
use support::{bin, json, write};

fn ready(torch: &str) -> bool {
    let ok = if torch == "2.11.0" {
        Path::new(".venv/bin/python").is_file()
    } else {
        Path::new(&format!(".peft/torch-{torch}/.peft-compat-lock")).is_file()
    };
    if !ok {
        eprintln!("SKIPPED: no PEFT environment for torch {torch} (scripts/test makes it)");
    }
    ok
}

fn matrix(backends: &str, dtypes: &str, adapters: &str, ops: &str, paths: &str) -> String {
    format!(
        "seed: 5
axes:
  backend: [{backends}]
  device: [cpu]
  dtype: [{dtypes}]
  adapter: [{adapters}]
  op: [{ops}]
  precision: [{paths}]
shapes:
  s: {{batch: 4, in_features: 32, out_features: 16, rank: 4, alpha: 8}}
"
    )
}

/// Run `body` as a matrix; (exit code, report JSON, stderr).
fn run(body: &str, extra: &[&str]) -> (Option<i32>, Value, String) {
    let dir = tempfile::tempdir().unwrap();
    let m = write(dir.path(), "m.yaml", body);
    let report = dir.path().join("r.json");
    let out = bin()
        .arg("run")
        .arg(&m)
        .args(["-q", "--results", "/dev/null", "--json"])
        .arg(&report)
        .args(extra)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr).into_owned();
    assert!(report.exists(), "no report: {err}");
    (out.status.code(), json(&report), err)
}

#[test]
fn peft_0_10_fails_the_fp16_dora_init_on_torch_2_1_in_dora_init_and_0_11_passes() {
    if !ready("2.1.2") {
        return;
    }
    let body = matrix(
        "peft@0.10.0+torch2.1.2, peft@0.11.0+torch2.1.2",
        "f16",
        "dora",
        "init",
        "native, fp32_init",
    );
    let (_, r, err) = run(&body, &[]);
    let old = case(&r, "peft@0.10.0+torch2.1.2/cpu/f16/dora/init/native/s");
    assert_eq!(old["outcome"], "unsupported", "{err}");
    let msg = old["error"].as_str().unwrap();
    assert!(
        msg.contains("\"addmm_impl_cpu_\" not implemented for 'Half'")
            && msg.contains("peft/tuners/lora/layer.py:")
            && msg.ends_with("in dora_init)"),
        "{msg}"
    );
    let fixed = case(&r, "peft@0.11.0+torch2.1.2/cpu/f16/dora/init/native/s");
    assert_eq!(fixed["outcome"], "pass", "{fixed}");
    // The article's last advice: initialise in fp32, then cast. The init itself passes on 0.10.0.
    let fp32 = case(&r, "peft@0.10.0+torch2.1.2/cpu/f16/dora/init/fp32_init/s");
    assert_eq!(fp32["outcome"], "pass", "{fp32}");
}

#[test]
fn a_release_without_the_autocast_option_skips_autocast_saying_so() {
    if !ready("2.1.2") {
        return;
    }
    let body = matrix(
        "peft@0.10.0+torch2.1.2",
        "bf16",
        "lora",
        "forward",
        "autocast",
    );
    let (code, r, _) = run(&body, &[]);
    let c = case(
        &r,
        "peft@0.10.0+torch2.1.2/cpu/bf16/lora/forward/autocast/s",
    );
    assert_eq!(c["outcome"], "skipped");
    assert_eq!(c["skip"], "not_applicable");
    assert_eq!(
        c["error"],
        "PEFT 0.10.0's get_peft_model has no autocast_adapter_dtype (the option arrived in 0.12.0)"
    );
    // Not a pass, not a failure of the run.
    assert_eq!(code, Some(0));
}

#[test]
fn a_release_without_dora_skips_its_dora_cases_and_runs_lora() {
    if !ready("2.1.2") {
        return;
    }
    let body = matrix(
        "peft@0.8.2+torch2.1.2",
        "f32",
        "lora, dora",
        "forward",
        "native",
    );
    let (_, r, err) = run(&body, &[]);
    let dora = case(&r, "peft@0.8.2+torch2.1.2/cpu/f32/dora/forward/native/s");
    assert_eq!(dora["skip"], "not_applicable", "{err}");
    assert!(
        dora["error"]
            .as_str()
            .unwrap()
            .starts_with("PEFT 0.8.2 has no DoRA"),
        "{dora}"
    );
    let lora = case(&r, "peft@0.8.2+torch2.1.2/cpu/f32/lora/forward/native/s");
    assert_eq!(lora["outcome"], "pass", "{lora}");
}

#[test]
fn a_version_pip_cannot_get_skips_every_case_with_pips_words_and_fails_the_run() {
    if !ready("2.1.2") {
        return;
    }
    let body = matrix(
        "peft@0.0.99+torch2.1.2",
        "f32",
        "lora",
        "forward, merge",
        "native",
    );
    let (code, r, err) = run(&body, &[]);
    assert_eq!(code, Some(4), "{err}");
    for c in r["cases"].as_array().unwrap() {
        assert_eq!(c["skip"], "backend_lost", "{c}");
        let msg = c["error"].as_str().unwrap();
        assert!(
            msg.contains("its environment cannot be made") && msg.contains("peft==0.0.99"),
            "{msg}"
        );
    }
    assert!(err.contains("backend lost"), "{err}");
}

/// A PEFT case beside its tch twin carries `agreement`: 0 u in f32 (the same libtorch kernels on
/// the same numbers), within a few units in 16-bit.
#[test]
fn peft_cases_carry_their_agreement_with_the_tch_build() {
    if !ready("2.11.0") {
        return;
    }
    let body = matrix(
        "tch, peft",
        "f32, bf16",
        "lora, dora",
        "forward, merge",
        "native",
    );
    let (code, r, err) = run(&body, &[]);
    assert_eq!(code, Some(0), "{err}");
    let mut seen = 0;
    for c in r["cases"].as_array().unwrap() {
        if c["backend"] != "peft" {
            assert!(c.get("agreement").is_none(), "{c}");
            continue;
        }
        let a = &c["agreement"];
        let twin = c["id"].as_str().unwrap().replacen("peft/", "tch/", 1);
        assert_eq!(a["with"], twin.as_str());
        let u = a["max_u"].as_f64().unwrap();
        if c["dtype"] == "f32" {
            assert!(u <= 1.0, "{c}");
        } else {
            assert!(u <= 4.0, "{c}");
        }
        seen += 1;
    }
    assert_eq!(seen, 8);
    // The table's figures section: one row per PEFT build, its tch twin named.
    let dir = tempfile::tempdir().unwrap();
    let m = write(dir.path(), "m.yaml", &body);
    let out = bin()
        .arg("run")
        .arg(&m)
        .args(["--results", "/dev/null"])
        .env("NO_COLOR", "1")
        .output()
        .unwrap();
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(
        text.contains("agreement: the largest difference of a PEFT build's outputs")
            && text.contains("PEFT build (vs tch)")
            && text.contains("vs tch "),
        "{text}"
    );
}

/// The accepted agreement is part of the snapshot, and an agreement that grows past the drift
/// rules (x2 and +1 u) fails the gate, naming it: here the accepted report's, planted 5 u worse.
#[test]
fn the_gate_fails_when_agreement_drifts() {
    use peft_compat::report::Report;
    use peft_compat::verdict::{gate, snapshot};
    if !ready("2.11.0") {
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    let m = write(
        dir.path(),
        "m.yaml",
        &matrix("tch, peft", "bf16", "lora", "forward", "native"),
    );
    let snap = dir.path().join("m.snap");
    let report = dir.path().join("r.json");
    let rec = bin()
        .arg("run")
        .arg(&m)
        .args(["-q", "--results", "/dev/null", "--snapshot-out"])
        .arg(&snap)
        .arg("--json")
        .arg(&report)
        .output()
        .unwrap();
    assert_eq!(rec.status.code(), Some(0));
    let text = std::fs::read_to_string(&snap).unwrap();
    assert!(text.contains("  agreement: "), "{text}");
    let mut r: Report = serde_json::from_str(&std::fs::read_to_string(&report).unwrap()).unwrap();
    let accepted = snapshot::from_report(&r);
    assert!(gate::check(&r, &accepted, false).passed());
    let peft = r
        .cases
        .iter_mut()
        .find(|c| c.point.backend.to_string() == "peft")
        .unwrap();
    peft.agreement.as_mut().unwrap().max_u += 5.0;
    let v = gate::check(&r, &accepted, false);
    assert!(!v.passed());
    let why: Vec<&str> = v.failures().map(|c| c.detail.as_str()).collect();
    assert!(
        why.iter()
            .any(|d| d.contains("agreement with the tch build grew from")),
        "{why:?}"
    );
}
