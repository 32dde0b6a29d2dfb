//! A gate that means something on a GPU runner: the committed H200 reports
//! (tests/evidence/h200-2026-11-28, from ../shared/evidence) held to the default matrix's
//! expectations, and CUDA cases that ran against a snapshot recorded without a GPU.

use peft_compat::outcome::OutcomeKind;
use peft_compat::render as table;
use peft_compat::render::gate::text as gate_text;
use peft_compat::report::Report;
use peft_compat::report::Status;
use peft_compat::spec::Matrix;
use peft_compat::verdict;
use peft_compat::verdict::gate::{self, ChangeKind};
use peft_compat::verdict::snapshot;
use std::path::{Path, PathBuf};
use std::process::Command;

const EVIDENCE: &str = "tests/evidence/h200-2026-11-28";

fn h200(name: &str) -> Report {
    let p = Path::new(EVIDENCE).join(name);
    serde_json::from_str(&std::fs::read_to_string(&p).unwrap()).unwrap()
}

/// Both H200 reports, their cases judged again by today's default matrix.
fn h200_now() -> Vec<Report> {
    let m = Matrix::load(Path::new("matrices/default.yaml"), None).unwrap();
    [
        "default-tch-candle-cpu-tch-cuda.json",
        "default-candle-cuda.json",
    ]
    .into_iter()
    .map(|n| {
        let mut r = h200(n);
        for c in &mut r.cases {
            c.expected = None;
        }
        verdict::expectations::annotate(&mut r, &m.expectations);
        r
    })
    .collect()
}

/// A rule that is wrong on a GPU fails here, on a CPU runner: no H200 case breaks a rule of
/// the default matrix, and the candle CUDA cases (which pass) are not declared as failing.
#[test]
fn the_h200_reports_meet_the_default_matrix_expectations() {
    for r in h200_now() {
        for c in &r.cases {
            if let Some(e) = &c.expected {
                assert!(
                    matches!(e.status, Status::Met | Status::NotRun),
                    "{}: {:?} under {} ({})",
                    c.id,
                    e.status,
                    e.rule,
                    e.reason
                );
            }
        }
        let candle_cuda: Vec<_> = r
            .cases
            .iter()
            .filter(|c| c.id.starts_with("candle/cuda/") && c.outcome != OutcomeKind::Skipped)
            .collect();
        for c in &candle_cuda {
            assert_eq!(c.outcome, OutcomeKind::Pass, "{}", c.id);
            assert!(
                c.expected.is_none(),
                "{} is declared: {:?}",
                c.id,
                c.expected
            );
        }
        // Gated against a snapshot of its own CPU part: the CUDA cases are new here (no
        // baseline), the rules hold, and with --allow-new the gate passes.
        let snap = cpu_snapshot(&r);
        let v = gate::check_with(
            &r,
            &snap,
            gate::GatePolicy {
                allow_improvements: false,
                allow_new: true,
            },
        );
        assert!(v.passed(), "{}", gate_text(&v, "matrices/default.yaml"));
    }
    let r = &h200_now()[1];
    assert_eq!(
        r.cases
            .iter()
            .filter(|c| c.id.starts_with("candle/cuda/") && c.outcome == OutcomeKind::Pass)
            .count(),
        120
    );
}

/// The report as a CPU-only machine would have recorded it: CUDA cases skipped.
fn cpu_only(r: &Report) -> Report {
    let mut cpu = r.clone();
    for c in &mut cpu.cases {
        if c.point.device.to_string().starts_with("cuda") {
            c.outcome = OutcomeKind::Skipped;
            c.error = Some("no CUDA device (libtorch: torch.cuda.is_available() is false)".into());
            c.metrics = None;
            c.expected = None;
        }
    }
    cpu
}

fn cpu_snapshot(r: &Report) -> snapshot::Snapshot {
    snapshot::from_report(&cpu_only(r))
}

/// An unexpected pass shows in the table without --check: a mark in the cell and the rule's
/// file:line under the table. (The H200 candle CUDA cases under the old, device-less rule.)
#[test]
fn an_unexpected_pass_is_marked_without_the_gate() {
    let r = h200("default-candle-cuda.json");
    assert!(r.cases.iter().any(|c| c
        .expected
        .as_ref()
        .is_some_and(|e| e.status == Status::UnexpectedPass)));
    let t = table::render_text(&r, false, 40);
    assert!(t.contains("(unexpected pass)"), "{t}");
    assert!(
        t.contains(
            "unexpected pass, 16 cases (matrices/default.yaml:33): the rule expects mismatch"
        ),
        "{t}"
    );
    let md = table::render_markdown(&r, None);
    assert!(md.contains("✓ (unexpected pass)"), "{md}");
}

fn bin() -> Command {
    let mut c = Command::new(env!("CARGO_BIN_EXE_peft-compat"));
    c.env("NO_COLOR", "1").env_remove("CI");
    c
}

fn write(dir: &Path, name: &str, text: String) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, text).unwrap();
    p
}

/// CUDA cases that ran, against a snapshot that has them as skipped: new cases fail the gate
/// (exit 1, named), pass with --allow-new, and the .snap.new holds old and new entries; the same
/// snapshot on a CPU-only run: "not checked here", exit 0.
#[test]
fn cuda_cases_without_a_baseline_are_new_not_silently_unchecked() {
    let dir = tempfile::tempdir().unwrap();
    let gpu = h200("default-tch-candle-cpu-tch-cuda.json");
    let cpu = cpu_only(&gpu);
    let snap_path = write(
        dir.path(),
        "default.snap",
        snapshot::to_text(&snapshot::from_report(&cpu)),
    );
    let gpu_json = write(dir.path(), "gpu.json", gpu.to_json());
    let cpu_json = write(dir.path(), "cpu.json", cpu.to_json());

    let v = gate::check(&gpu, &snapshot::read(&snap_path).unwrap(), false);
    let new: Vec<_> = v
        .changes
        .iter()
        .filter(|c| c.kind == ChangeKind::New)
        .collect();
    assert_eq!(new.len(), 120, "{}", gate_text(&v, "m"));
    assert!(new.iter().all(|c| c.id.starts_with("tch/cuda/")));

    let gate = |report: &Path, extra: &[&str]| {
        bin()
            .arg("report")
            .arg(report)
            .args(["-q", "--check", "--snapshot"])
            .arg(&snap_path)
            .args(extra)
            .output()
            .unwrap()
    };
    let out = gate(&gpu_json, &[]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(
        stdout
            .contains("FAIL tch/cuda/f32/lora/init/native/small: new here (no baseline): now pass"),
        "{stdout}"
    );
    assert!(stdout.contains("--allow-new"), "{stdout}");
    let pending = dir.path().join("default.snap.new");
    let proposed = snapshot::read(&pending).unwrap();
    assert_eq!(proposed.len(), gpu.cases.len());
    assert_eq!(
        proposed["tch/cuda/f16/dora/merge/native/wide"].outcome,
        OutcomeKind::Pass,
        "the new entry"
    );
    assert_eq!(
        proposed["candle/cuda/f16/dora/merge/native/wide"].outcome,
        OutcomeKind::Skipped,
        "an accepted entry of a case skipped here is kept"
    );
    std::fs::remove_file(&pending).unwrap();

    let out = gate(&gpu_json, &["--allow-new"]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert!(
        stdout.contains("note tch/cuda/") && stdout.contains("gate passed"),
        "{stdout}"
    );
    assert!(
        pending.exists(),
        "the new baseline is still offered for acceptance"
    );
    std::fs::remove_file(&pending).unwrap();

    let out = gate(&cpu_json, &[]);
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert!(stdout.contains("not checked here: 240 cases"), "{stdout}");
    assert!(!pending.exists(), "nothing to accept on the CPU run");
}
