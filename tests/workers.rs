//! Backends in worker processes: crashes, hangs and absurd shapes cost one case each; a run
//! interrupted midway resumes to the same report; partitions merge into the single-job report;
//! the number of jobs changes nothing; the main binary links no tensor library.

mod support;
use support::report_case as case;

use support::{bin, json, masked, write};

use std::io::{BufRead, BufReader};
use std::path::Path;
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const FAULTS: &str = "\
seed: 5
axes:
  backend: [candle]
  device: [cpu]
  dtype: [f32, f16]
  adapter: [lora, dora]
  op: [forward, merge]
  precision: [native]
shapes:
  s: {batch: 4, in_features: 32, out_features: 16, rank: 4, alpha: 8}
  absurd: {batch: 4, in_features: 1000000000, out_features: 1000000, rank: 4, alpha: 8}
";

/// The fault-injection worker stands in for candle: one case aborts, one segfaults, one hangs,
/// one allocates without bound, one panics, one prints junk on stdout. Every run finishes, the
/// other cases pass, and each faulty one says what happened. The absurd shape never allocates:
/// the guard refuses it with its estimate.
#[test]
fn crashes_hangs_and_absurd_shapes_cost_one_case_each() {
    let dir = tempfile::tempdir().unwrap();
    let m = write(dir.path(), "faults.yaml", FAULTS);
    let report = dir.path().join("r.json");
    let faults = [
        ("f32/lora/forward/native/s", "abort"),
        ("f32/lora/merge/native/s", "segfault"),
        ("f32/dora/forward/native/s", "hang"),
        ("f32/dora/merge/native/s", "oom"),
        ("f16/lora/forward/native/s", "panic"),
        ("f16/dora/forward/native/s", "stdout"),
    ];
    let spec: Vec<String> = faults.iter().map(|(k, v)| format!("{k}={v}")).collect();
    let t0 = Instant::now();
    let out = bin()
        .arg("run")
        .arg(&m)
        .args(["-j", "2", "--timeout", "3", "--max-memory", "8G", "--json"])
        .arg(&report)
        .arg("--worker")
        .arg(format!("candle={}", support::fault_worker().display()))
        .env("PEFT_COMPAT_FAULTS", spec.join(","))
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(
        out.status.code(),
        Some(0),
        "{stdout}\n{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert!(
        t0.elapsed() < Duration::from_secs(60),
        "the hang was not cut short"
    );
    let r = json(&report);
    let outcome = |id: &str| {
        let c = case(&r, &format!("candle/cpu/{id}"));
        (
            c["outcome"].as_str().unwrap().to_string(),
            c["error"].as_str().unwrap_or("").to_string(),
        )
    };
    // Each faulty case: its outcome, and what its message must say.
    for (id, want, says) in [
        (
            "f32/lora/forward/native/s",
            "crashed",
            ["signal 6 (SIGABRT)", "aborting on"],
        ),
        (
            "f32/lora/merge/native/s",
            "crashed",
            ["signal 11 (SIGSEGV)", "segfaulting on"],
        ),
        (
            "f32/dora/forward/native/s",
            "timeout",
            ["no answer within 3.0 s", "killed"],
        ),
        (
            "f32/dora/merge/native/s",
            "crashed",
            ["memory allocation of", "SIGABRT"],
        ),
        (
            "f16/lora/forward/native/s",
            "crashed",
            ["panicked: fault_worker: planted panic", ""],
        ),
    ] {
        let (o, e) = outcome(id);
        assert_eq!(o, want, "{id}: {e}");
        assert!(says.iter().all(|s| e.contains(s)), "{id}: {e}");
    }
    assert_eq!(outcome("f16/dora/forward/native/s").0, "pass");
    for other in ["f16/lora/merge/native/s", "f16/dora/merge/native/s"] {
        assert_eq!(outcome(other).0, "pass", "{other}");
    }
    // The absurd shape: refused per case with the estimate and the limit, never allocated.
    for c in r["cases"].as_array().unwrap() {
        if c["shape"] == "absurd" {
            assert_eq!(c["outcome"], "skipped");
            let e = c["error"].as_str().unwrap();
            assert!(
                e.contains("not run: needs about") && e.contains("8.6 GB limit"),
                "{e}"
            );
        }
    }
    // The table shows the new outcomes.
    assert!(
        stdout.contains("✗ timeout") || stdout.contains("timeout"),
        "{stdout}"
    );
    assert!(stdout.contains("crashed"), "{stdout}");
}

const SLOW: &str = "\
seed: 9
axes:
  backend: [candle]
  device: [cpu]
  dtype: [f32, f16, bf16]
  adapter: [lora, dora]
  op: [init, forward, backward, merge, unmerge]
  precision: [native, upcast]
shapes:
  s: {batch: 4, in_features: 32, out_features: 16, rank: 4, alpha: 8}
";

fn lines(p: &Path) -> usize {
    std::fs::read_to_string(p).map_or(0, |s| s.lines().count())
}

/// Ctrl-C midway: exit 130, the partial table printed, every finished case on disk; `--resume`
/// runs only the rest and ends with the report of an uninterrupted run.
#[test]
fn an_interrupted_run_resumes_to_the_same_report() {
    let dir = tempfile::tempdir().unwrap();
    let m = write(dir.path(), "slow.yaml", SLOW);
    let (full, part) = (dir.path().join("full.json"), dir.path().join("part.json"));
    let worker = format!("candle={}", support::fault_worker().display());
    let run = |json: &Path| {
        let mut c = bin();
        c.arg("run")
            .arg(&m)
            .args(["-j", "2", "--json"])
            .arg(json)
            .arg("--worker")
            .arg(&worker);
        c
    };
    let out = run(&full).output().unwrap();
    assert_eq!(out.status.code(), Some(0));

    // Every case sleeps 150 ms: 60 cases on 2 jobs take about 4.5 s.
    let child = run(&part)
        .env("PEFT_COMPAT_FAULTS", "/s=slow")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let stream = dir.path().join("part.jsonl");
    let t0 = Instant::now();
    while lines(&stream) < 12 {
        assert!(t0.elapsed() < Duration::from_secs(60), "no progress");
        std::thread::sleep(Duration::from_millis(20));
    }
    let kill = Command::new("kill")
        .args(["-INT", &child.id().to_string()])
        .status()
        .unwrap();
    assert!(kill.success());
    let out = child.wait_with_output().unwrap();
    let stderr = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(130), "{stderr}");
    assert!(
        stderr.contains("interrupted:") && stderr.contains("--resume"),
        "{stderr}"
    );
    let kept = lines(&stream) - 1;
    assert!((11..60).contains(&kept), "{kept} cases kept");
    assert!(String::from_utf8_lossy(&out.stdout).contains("adapter / op"));
    assert!(!part.exists(), "an interrupted run writes no report");

    let out = run(&part).arg("--resume").output().unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    assert_eq!(lines(&stream) - 1, 60, "the stream holds every case once");
    assert_eq!(masked(json(&part)), masked(json(&full)));
}

/// The default matrix as 3 partitions on 2 jobs each, merged, is the single-job report run on
/// 1 job; and the gate passes on the merged report.
#[test]
fn partitions_merge_into_the_single_run_report_whatever_the_jobs() {
    let dir = tempfile::tempdir().unwrap();
    let single = dir.path().join("single.json");
    let out = bin()
        // One intra-op thread everywhere: libtorch's f64 GEMM over 4096 splits its sums by
        // thread count on some CPUs (AVX-512 EPYC: 2e-14 vs 2.4e-14), and the point here is
        // the jobs and partitions, not the threads.
        .args([
            "run",
            "matrices/default.yaml",
            "-q",
            "-j",
            "1",
            "--threads",
            "1",
            "--json",
        ])
        .arg(&single)
        .output()
        .unwrap();
    assert_eq!(
        out.status.code(),
        Some(0),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let mut parts = Vec::new();
    let mut sizes = Vec::new();
    for k in 1..=3 {
        let p = dir.path().join(format!("part{k}.json"));
        let out = bin()
            .args([
                "run",
                "matrices/default.yaml",
                "-q",
                "-j",
                "2",
                "--threads",
                "1",
                "--partition",
            ])
            .arg(format!("{k}/3"))
            .arg("--json")
            .arg(&p)
            .output()
            .unwrap();
        assert_eq!(
            out.status.code(),
            Some(0),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let r = json(&p);
        assert_eq!(r["partition"]["spec"], format!("count:{k}/3"));
        sizes.push(r["cases"].as_array().unwrap().len());
        parts.push(p);
    }
    // Every case once; a PEFT case goes with its tch twin, so the parts are near, not exactly, a
    // third each.
    assert_eq!(sizes.iter().sum::<usize>(), 1280);
    assert!(sizes.iter().all(|&n| (380..=480).contains(&n)), "{sizes:?}");
    let merged = dir.path().join("merged.json");
    let out = bin()
        .arg("merge")
        .args(&parts)
        .args(["--json"])
        .arg(&merged)
        .args(["--check", "--snapshot", "snapshots/default.snap"])
        .env("CI", "1")
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(0), "{stdout}");
    assert!(stdout.contains("gate passed"), "{stdout}");
    assert!(
        stdout.contains("adapter / op"),
        "the merged table is printed"
    );
    // The merged report is the single run's, plus the verdict of the gate it was checked by.
    let mut merged = json(&merged);
    assert_eq!(merged["gate"]["passed"], true);
    merged.as_object_mut().unwrap().remove("gate");
    assert_eq!(masked(merged), masked(json(&single)));

    // Parts that do not add up are refused, naming what is missing.
    let out = bin().arg("merge").args(&parts[..2]).output().unwrap();
    assert_eq!(out.status.code(), Some(2));
    let err = String::from_utf8_lossy(&out.stderr);
    assert!(err.contains("count:3/3"), "{err}");
    // Gating one partition alone is refused (it would report the others as missing).
    let out = bin()
        .args([
            "run",
            "matrices/default.yaml",
            "-q",
            "--results",
            "/dev/null",
            "--partition",
            "1/3",
            "--check",
        ])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(2));
}

/// `--help`, `list` and bad input never load a tensor library: the main binary does not link one.
#[test]
fn the_main_binary_links_no_tensor_library() {
    let exe = std::fs::read(env!("CARGO_BIN_EXE_peft-compat")).unwrap();
    let has = |needle: &[u8]| exe.windows(needle.len()).any(|w| w == needle);
    assert!(!has(b"libtorch_cpu.so"), "peft-compat links libtorch");
    assert!(!has(b"libc10.so"), "peft-compat links libtorch");
    let worker = support::target_dir().join("peft-compat-worker-tch");
    let w = std::fs::read(worker).unwrap();
    assert!(
        w.windows(15).any(|x| x == b"libtorch_cpu.so"),
        "the tch worker links libtorch"
    );
}

/// `list | head -1` ends quietly: no panic on the closed pipe, exit 0.
#[test]
fn list_into_a_closed_pipe_exits_quietly() {
    // More ids than a pipe buffers (64 KiB), so the writer really meets the closed pipe.
    let dir = tempfile::tempdir().unwrap();
    let shapes: String = (0..40)
        .map(|i| {
            format!("  s{i}: {{batch: 1, in_features: 8, out_features: 8, rank: 2, alpha: 2}}\n")
        })
        .collect();
    let m = write(
        dir.path(),
        "many.yaml",
        &format!(
            "seed: 1\naxes:\n  backend: [tch, candle]\n  device: [cpu, cuda]\n  dtype: [f32, f16, bf16, f64]\n  \
             adapter: [lora, dora]\n  op: [init, forward, backward, merge, unmerge]\n  precision: [native, upcast]\nshapes:\n{shapes}"
        ),
    );
    let mut child = bin()
        .arg("list")
        .arg(&m)
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let mut first = String::new();
    BufReader::new(child.stdout.take().unwrap())
        .read_line(&mut first)
        .unwrap();
    assert_eq!(first.trim(), "tch/cpu/f32/lora/init/native/s0");
    // The reader is gone now (its end of the pipe was dropped with it).
    let out = child.wait_with_output().unwrap();
    assert_eq!(out.status.code(), Some(0));
    assert!(
        out.stderr.is_empty(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
}

/// A worker that is missing is a skip with the way to build it, not a crash of the run.
#[test]
fn a_missing_worker_loses_its_cases_with_the_fix() {
    let dir = tempfile::tempdir().unwrap();
    let m = write(
        dir.path(),
        "m.yaml",
        &FAULTS.replace("  absurd:", "  #absurd:"),
    );
    let r = dir.path().join("r.json");
    let out = bin()
        .arg("run")
        .arg(&m)
        .args(["-q", "--worker", "candle=/nonexistent/worker", "--json"])
        .arg(&r)
        .output()
        .unwrap();
    // A backend that should run and cannot is a failure of the run (exit 4), not hardware
    // that is absent here.
    assert_eq!(out.status.code(), Some(4));
    assert!(String::from_utf8_lossy(&out.stderr).contains("backend lost: candle"));
    let r = json(&r);
    for c in r["cases"].as_array().unwrap() {
        assert_eq!(c["outcome"], "skipped");
        assert_eq!(c["skip"], "backend_lost");
        assert!(c["error"]
            .as_str()
            .unwrap()
            .contains("does not exist (--worker)"));
    }
}

/// One place decides what a non-fatal problem does: a results stream that cannot be written is
/// a warning, the run and every other output go on, and the exit code is 3.
#[test]
fn an_unwritable_results_stream_is_a_warning_and_exit_3() {
    let dir = tempfile::tempdir().unwrap();
    let m = write(
        dir.path(),
        "m.yaml",
        "seed: 1\naxes: {backend: [candle], device: [cpu], dtype: [f32], adapter: [lora], op: [forward], precision: [native]}\nshapes: {s: {batch: 2, in_features: 8, out_features: 4, rank: 2, alpha: 4}}\n",
    );
    let report = dir.path().join("r.json");
    let out = bin()
        .args(["run", "--quiet", "--results", "/dev/full", "--json"])
        .arg(&report)
        .arg(&m)
        .output()
        .unwrap();
    let err = String::from_utf8_lossy(&out.stderr);
    assert_eq!(out.status.code(), Some(3), "{err}");
    assert!(
        err.contains("warning: cannot write the results stream /dev/full")
            && err.contains("--resume cannot continue this run")
            && err.contains("error: 1 output could not be written"),
        "{err}"
    );
    assert_eq!(json(&report)["summary"]["outcomes"]["pass"], 1);
}
