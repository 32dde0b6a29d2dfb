//! The gate cannot pass by accident: a lost backend fails it, a resumed run keeps its
//! environment, numbers do not depend on -j, every flag and input is checked before anything
//! runs, misbehaving workers cost their cases and never the runner, one run writes a stream at
//! a time, and a filtered gate judges only what it selected. Each test asserts the exit code
//! and the message a user sees.

mod support;

use support::{bin, json, masked, write};

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output, Stdio};
use std::time::{Duration, Instant};

fn text(o: &Output) -> (String, String) {
    (
        String::from_utf8_lossy(&o.stdout).into_owned(),
        String::from_utf8_lossy(&o.stderr).into_owned(),
    )
}

const SMALL: &str = "\
seed: 3
axes:
  backend: [candle]
  device: [cpu]
  dtype: [f32, f16]
  adapter: [lora, dora]
  op: [forward]
  precision: [native]
shapes:
  s: {batch: 4, in_features: 32, out_features: 16, rank: 4, alpha: 8}
";

/// SMALL written to `dir/m.yaml` and its snapshot recorded to `dir/m.snap` (returned).
fn recorded(dir: &Path) -> PathBuf {
    let m = write(dir, "m.yaml", SMALL);
    let snap = dir.join("m.snap");
    let out = bin()
        .arg("run")
        .arg(&m)
        .args(["-q", "--results", "/dev/null", "--snapshot-out"])
        .arg(&snap)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    snap
}

/// `peft-compat run M -q --check --snapshot SNAP`, writing no results stream.
fn check(m: &Path, snap: &Path) -> Command {
    let mut c = bin();
    c.arg("run")
        .arg(m)
        .args(["-q", "--check", "--results", "/dev/null", "--snapshot"])
        .arg(snap);
    c
}

fn fault_worker() -> String {
    format!("candle={}", support::fault_worker().display())
}

// --- lost backends -------------------------------------------------------------------------

/// The default matrix with the tch worker missing: the gate fails, naming tch and the fix;
/// declared not expected (`--skip-backend tch`), the same run passes with tch not checked.
#[test]
fn the_gate_fails_with_a_missing_tch_worker_and_passes_with_it_declared() {
    let dir = tempfile::tempdir().unwrap();
    let junit = dir.path().join("junit.xml");
    let run = |extra: &[&str]| {
        bin()
            .args(["run", "matrices/default.yaml", "--check", "-q"])
            .args(["--worker", "tch=/nonexistent/peft-compat-worker-tch"])
            .args(["--results", "/dev/null", "--junit"])
            .arg(&junit)
            .args(extra)
            .env("CI", "1")
            .output()
            .unwrap()
    };
    let out = run(&[]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("FAIL backend lost: tch: tch worker /nonexistent/peft-compat-worker-tch does not exist (--worker) (320 cases not run); if tch is not expected on this runner, pass --skip-backend tch"),
        "{stdout}"
    );
    assert!(stdout.contains("gate FAILED"), "{stdout}");
    // In JUnit, each of the lost backend's cases is a failure, not a skip.
    let xml = std::fs::read_to_string(&junit).unwrap();
    assert_eq!(xml.matches("<failure type=\"backend lost\"").count(), 320);

    let out = run(&["--skip-backend", "tch"]);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    assert!(
        stdout.contains("not checked here: 600 cases")
            && stdout.contains("tch is declared not expected on this runner (--skip-backend tch)")
            && stdout.contains("gate passed"),
        "{stdout}"
    );
    let xml = std::fs::read_to_string(&junit).unwrap();
    assert_eq!(xml.matches("<failure").count(), 0);
}

/// Without --check, a lost backend is exit 4 with the backend, the reason and the fix; a
/// worker that hangs at start is lost within --timeout; /bin/cat (which echoes the handshake)
/// is lost at once; PEFT_COMPAT_SKIP_LIBTORCH_2_1 declares tch@2.1.2 like --skip-backend.
#[test]
fn a_worker_that_is_missing_hangs_or_speaks_no_protocol_is_a_lost_backend() {
    let dir = tempfile::tempdir().unwrap();
    let m = write(dir.path(), "m.yaml", SMALL);
    let sleeper = write(dir.path(), "sleeper.sh", "#!/bin/sh\nexec sleep 1000\n");
    Command::new("chmod")
        .arg("+x")
        .arg(&sleeper)
        .status()
        .unwrap();
    for (worker, says) in [
        (
            "/bin/cat".to_string(),
            "unreadable output: unreadable header",
        ),
        (sleeper.display().to_string(), "no answer within 2.0 s"),
        ("/nonexistent/w".to_string(), "does not exist (--worker)"),
    ] {
        let r = dir.path().join("r.json");
        let t0 = Instant::now();
        let out = bin()
            .arg("run")
            .arg(&m)
            .args(["-q", "--timeout", "2", "--json"])
            .arg(&r)
            .arg("--worker")
            .arg(format!("candle={worker}"))
            .output()
            .unwrap();
        let (_, stderr) = text(&out);
        assert!(
            t0.elapsed() < Duration::from_secs(20),
            "{worker}: not cut short"
        );
        assert_eq!(out.status.code(), Some(4), "{worker}: {stderr}");
        assert!(
            stderr.contains("error: backend lost: candle: candle worker")
                && stderr.contains(says)
                && stderr.contains("pass --skip-backend candle"),
            "{worker}: {stderr}"
        );
        let r = json(&r);
        for c in r["cases"].as_array().unwrap() {
            assert_eq!(c["outcome"], "skipped");
            assert_eq!(c["skip"], "backend_lost");
        }
    }
    let tch21 = SMALL.replace("backend: [candle]", "backend: [tch@2.1.2]");
    let m = write(dir.path(), "t.yaml", &tch21);
    let out = bin()
        .arg("run")
        .arg(&m)
        .args([
            "-q",
            "--worker",
            "tch@2.1.2=/nonexistent/w",
            "--results",
            "/dev/null",
        ])
        .env("PEFT_COMPAT_SKIP_LIBTORCH_2_1", "1")
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out).1);
}

// --- resume keeps the environment ----------------------------------------------------------

/// A complete stream resumed (no worker needed) gives the uninterrupted report: environment,
/// libtorch 2.1.2's expected failures and the gate included.
#[test]
fn a_resumed_complete_stream_gives_the_uninterrupted_report() {
    let dir = tempfile::tempdir().unwrap();
    let (full, again) = (dir.path().join("full.json"), dir.path().join("again.json"));
    let stream = dir.path().join("s.jsonl");
    let run = |json: &Path, resume: bool| {
        let mut c = bin();
        c.args([
            "run",
            "matrices/default.yaml",
            "-q",
            "--filter",
            "tch@2.1.2/cpu/f16",
        ])
        .args(["--check", "--json"])
        .arg(json)
        .arg("--results")
        .arg(&stream)
        .env("CI", "1");
        if resume {
            c.arg("--resume");
        }
        c.output().unwrap()
    };
    let out = run(&full, false);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out).0);
    let out = run(&again, true);
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    let (a, b) = (json(&full), json(&again));
    assert_eq!(
        b["environment"]["backends"]["tch@2.1.2"]["libtorch"], "2.1.2+cu121",
        "{}",
        b["environment"]
    );
    assert_eq!(b["gate"]["passed"], true);
    assert!(
        b["inactive_expectations"].is_null(),
        "{}",
        b["inactive_expectations"]
    );
    assert_eq!(masked(a), masked(b));
}

/// A stream line that cannot be read in the middle is named (path:line), not skipped; a last
/// line cut short by a kill is cut off and its case runs again.
#[test]
fn a_damaged_stream_line_is_named_and_a_cut_last_line_is_dropped() {
    let dir = tempfile::tempdir().unwrap();
    let m = write(dir.path(), "m.yaml", SMALL);
    let (r, stream) = (dir.path().join("r.json"), dir.path().join("s.jsonl"));
    let run = || {
        bin()
            .arg("run")
            .arg(&m)
            .args(["-q", "--resume", "--json"])
            .arg(&r)
            .arg("--results")
            .arg(&stream)
            .output()
            .unwrap()
    };
    let out = bin()
        .arg("run")
        .arg(&m)
        .args(["-q", "--results"])
        .arg(&stream)
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0));
    let whole = std::fs::read_to_string(&stream).unwrap();
    let lines: Vec<&str> = whole.lines().collect();
    // The last case cut in half: it runs again, and the stream holds each case once.
    let cut = format!("{}\n{}", lines[..4].join("\n"), &lines[4][..20]);
    std::fs::write(&stream, cut).unwrap();
    let out = run();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out).1);
    assert_eq!(std::fs::read_to_string(&stream).unwrap().lines().count(), 5);
    assert_eq!(json(&r)["summary"]["outcomes"]["pass"], 4);
    // A line in the middle damaged: named, and nothing runs.
    let mut damaged: Vec<String> = whole.lines().map(String::from).collect();
    damaged[2] = "{\"index\": oops".into();
    std::fs::write(&stream, damaged.join("\n") + "\n").unwrap();
    let out = run();
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(&format!("{}:3: not a case", stream.display()))
            && stderr.contains("run without --resume"),
        "{stderr}"
    );
}

// --- same numbers whatever -j ----------------------------------------------------------------

/// A 1024x1024 layer on libtorch: `-j 1` and `-j 2` give the same numbers, bit for bit, since
/// the intra-op thread count no longer follows -j (the report records it).
#[test]
fn j1_equals_j2_on_a_wide_layer() {
    let dir = tempfile::tempdir().unwrap();
    let m = write(
        dir.path(),
        "wide.yaml",
        "seed: 9\naxes: {backend: [tch], device: [cpu], dtype: [f32, f64], adapter: [lora, dora], op: [forward, merge], precision: [native]}\nshapes:\n  wide: {batch: 64, in_features: 1024, out_features: 1024, rank: 16, alpha: 32}\n",
    );
    let report = |jobs: &str| {
        let r = dir.path().join(format!("r{jobs}.json"));
        let out = bin()
            .arg("run")
            .arg(&m)
            .args(["-q", "-j", jobs, "--json"])
            .arg(&r)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(0), "{}", text(&out).1);
        json(&r)
    };
    let (a, b) = (report("1"), report("2"));
    assert_eq!(a["threads"], 1);
    let figures = |r: &Value| -> Vec<Value> {
        r["cases"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| c["metrics"].clone())
            .collect()
    };
    assert_eq!(figures(&a), figures(&b));
}

// --- flags and inputs checked before anything runs ----------------------------------------------

fn refused(args: &[&str], says: &str) {
    let out = bin().args(args).output().unwrap();
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2), "{args:?}: {stdout}{stderr}");
    assert!(stderr.contains(says), "{args:?}: {stderr}");
}

#[test]
fn timeouts_and_job_counts_outside_their_range_are_refused() {
    let m = "matrices/default.yaml";
    for t in ["1e100", "inf", "0", "NaN", "-1", "86401"] {
        refused(
            &["run", m, &format!("--timeout={t}")],
            "expected seconds from 0.01 to 86400 (a day)",
        );
    }
    refused(&["run", m, "-j", "100000"], "100000 is not in 1..=256");
    refused(&["run", m, "--threads", "0"], "0 is not in 1..=256");
    refused(
        &["run", m, "--skip-backend", "torch"],
        "unknown backend `torch`; valid values: tch, tch@2.1.2, tch@2.2.2",
    );
}

/// `--dump` into a place that cannot hold files is refused before any case runs.
#[test]
fn an_unwritable_dump_folder_is_refused_up_front() {
    let dir = tempfile::tempdir().unwrap();
    let m = write(dir.path(), "m.yaml", SMALL);
    let file = write(dir.path(), "a-file", "");
    let out = bin()
        .arg("run")
        .arg(&m)
        .args(["--results", "/dev/null", "--dump"])
        .arg(file.join("dumps"))
        .output()
        .unwrap();
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "--dump {}: cannot write there",
            file.join("dumps").display()
        )),
        "{stderr}"
    );
    assert!(!dir.path().join("out").exists());
}

/// Shape names are restricted to what case ids and file names can hold: `a/b` would make an id
/// with another field, NUL and control characters worse.
#[test]
fn shape_names_outside_the_character_set_are_refused_with_their_place() {
    let dir = tempfile::tempdir().unwrap();
    for name in ["a/b", "\"x\\u0000y\"", "\"tab\\there\""] {
        let body = SMALL.replace("  s: {", &format!("  {name}: {{"));
        let m = write(dir.path(), "m.yaml", &body);
        let out = bin().arg("list").arg(&m).output().unwrap();
        let (_, stderr) = text(&out);
        assert_eq!(out.status.code(), Some(2), "{name}: {stderr}");
        assert!(
            stderr.contains("a shape name is 1 to 64 of A-Z a-z 0-9 _ . -")
                && stderr.contains(&format!("{}:10:", m.display())),
            "{name}: {stderr}"
        );
    }
}

/// Messages a newcomer met: a negative size says "whole number"; list items are numbered from
/// 1 everywhere; a rule that matches nothing names the key that empties it; the help says
/// which shape keys are required.
#[test]
fn matrix_messages_say_what_to_write() {
    let dir = tempfile::tempdir().unwrap();
    let cases = [
        (
            SMALL.replace("batch: 4", "batch: -4"),
            vec!["this key takes a whole number", "e.g. batch: 4"],
        ),
        (
            format!("{SMALL}expectations:\n  - {{dtype: f16, expect: wrong, reason: r}}\n"),
            vec!["expectations entry 1", "expect takes: pass, mismatch"],
        ),
        (
            format!("{SMALL}expectations:\n  - {{dtype: f16, adapter: pissa, expect: fail, reason: r}}\n"),
            vec![
                "expectation 1 matches no case of the matrix: its `adapter` key leaves out every case",
            ],
        ),
        (
            SMALL.replace("batch: 4,", "batch: 4, colour: red,"),
            vec!["a shape requires batch, in_features, out_features, rank, alpha and takes bias (default true)"],
        ),
    ];
    for (body, says) in cases {
        let m = write(dir.path(), "m.yaml", &body);
        let out = bin().arg("list").arg(&m).output().unwrap();
        let (_, stderr) = text(&out);
        assert_eq!(out.status.code(), Some(2), "{stderr}");
        for s in says {
            assert!(stderr.contains(s), "want {s:?} in {stderr}");
        }
    }
}

// --- misbehaving workers --------------------------------------------------------------------

/// Run `cmd` to its end; its output and its peak resident memory in bytes (wait4's rusage:
/// the process tree's largest member, the runner or a worker).
#[allow(clippy::zombie_processes)] // reaped by wait4, which std's wait cannot replace here
fn run_measured(cmd: &mut Command) -> (Output, u64) {
    use std::io::Read;
    use std::os::unix::process::ExitStatusExt;
    let mut child = cmd
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let (mut so, mut se) = (child.stdout.take().unwrap(), child.stderr.take().unwrap());
    let out = std::thread::spawn(move || {
        let mut b = Vec::new();
        so.read_to_end(&mut b).unwrap();
        b
    });
    let err = std::thread::spawn(move || {
        let mut b = Vec::new();
        se.read_to_end(&mut b).unwrap();
        b
    });
    let mut status = 0;
    // SAFETY: a zeroed rusage is valid; wait4 fills it for our own child.
    let mut usage: libc::rusage = unsafe { std::mem::zeroed() };
    let pid = unsafe { libc::wait4(child.id() as libc::pid_t, &mut status, 0, &mut usage) };
    assert_eq!(pid, child.id() as libc::pid_t);
    let output = Output {
        status: std::process::ExitStatus::from_raw(status),
        stdout: out.join().unwrap(),
        stderr: err.join().unwrap(),
    };
    (output, usage.ru_maxrss as u64 * 1024)
}

/// A frame header that claims 1 TB costs its case (`crashed`, the header quoted), never the
/// runner; so does a reply naming a file that is not one of the worker's memfds (never read);
/// a worker that floods stdout without a newline costs its case (timeout) while the runner's
/// memory stays bounded.
#[test]
fn a_huge_frame_and_a_stdout_flood_cost_one_case_each() {
    let dir = tempfile::tempdir().unwrap();
    let m = write(dir.path(), "m.yaml", SMALL);
    let r = dir.path().join("r.json");
    let (out, peak) = run_measured(
        bin()
            .arg("run")
            .arg(&m)
            .args(["-q", "-j", "1", "--timeout", "3", "--json"])
            .arg(&r)
            .arg("--worker")
            .arg(fault_worker())
            .env(
                "PEFT_COMPAT_FAULTS",
                "f32/lora/forward/native/s=hugeframe,f16/lora/forward/native/s=flood,\
                 f32/dora/forward/native/s=foreignfile",
            ),
    );
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stderr}");
    let r = json(&r);
    let case = |id: &str| {
        r["cases"]
            .as_array()
            .unwrap()
            .iter()
            .find(|c| c["id"] == format!("candle/cpu/{id}"))
            .unwrap()
            .clone()
    };
    let huge = case("f32/lora/forward/native/s");
    assert_eq!(huge["outcome"], "crashed");
    let msg = huge["error"].as_str().unwrap();
    assert!(
        msg.contains("a frame claims 1099511627776 payload bytes")
            && msg.contains("\"bytes\":1099511627776"),
        "{msg}"
    );
    let flood = case("f16/lora/forward/native/s");
    assert_eq!(flood["outcome"], "timeout", "{flood}");
    let foreign = case("f32/dora/forward/native/s");
    assert_eq!(foreign["outcome"], "crashed");
    let msg = foreign["error"].as_str().unwrap();
    assert!(
        msg.contains("names the file /etc/hostname, not one of the worker's own"),
        "{msg}"
    );
    assert_eq!(r["summary"]["outcomes"]["pass"], 1);
    // Children's peak: the runner and its workers; the flood alone would be GBs unbounded.
    eprintln!("peak resident memory of the run: {} MB", peak >> 20);
    assert!(peak < 1 << 30, "peak {} MB", peak >> 20);
}

// --- files ----------------------------------------------------------------------------------

/// A second run on the same results stream is refused, naming the other run and --results;
/// SIGTERM ends a run like Ctrl-C (exit 130, the partial table, the resume hint).
#[test]
fn one_writer_per_stream_and_sigterm_is_an_interrupt() {
    let dir = tempfile::tempdir().unwrap();
    let m = write(
        dir.path(),
        "m.yaml",
        &SMALL.replace("op: [forward]", "op: [forward, merge, backward, init]"),
    );
    let stream = dir.path().join("s.jsonl");
    let first = bin()
        .arg("run")
        .arg(&m)
        .args(["-j", "1", "--results"])
        .arg(&stream)
        .arg("--worker")
        .arg(fault_worker())
        .env("PEFT_COMPAT_FAULTS", "/s=slow")
        .stdout(Stdio::piped())
        .stderr(Stdio::piped())
        .spawn()
        .unwrap();
    let t0 = Instant::now();
    while std::fs::read_to_string(&stream).map_or(0, |s| s.lines().count()) < 3 {
        assert!(t0.elapsed() < Duration::from_secs(60), "no progress");
        std::thread::sleep(Duration::from_millis(20));
    }
    let out = bin()
        .arg("run")
        .arg(&m)
        .arg("--results")
        .arg(&stream)
        .output()
        .unwrap();
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(&format!(
            "{} is being written by another peft-compat run (pid {})",
            stream.display(),
            first.id()
        )) && stderr.contains("--results PATH"),
        "{stderr}"
    );
    let term = Command::new("kill")
        .args(["-TERM", &first.id().to_string()])
        .status()
        .unwrap();
    assert!(term.success());
    let out = first.wait_with_output().unwrap();
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(130), "{stderr}");
    assert!(
        stderr.contains("interrupted:") && stderr.contains("--resume"),
        "{stderr}"
    );
    assert!(stdout.contains("adapter / op"), "{stdout}");
}

/// Snapshots are read strictly: bytes that are not UTF-8 are named (not "no snapshot"), an id
/// listed twice is refused.
#[test]
fn snapshots_are_read_strictly() {
    let dir = tempfile::tempdir().unwrap();
    let m = write(dir.path(), "m.yaml", SMALL);
    let snap = dir.path().join("m.snap");
    let gate = |snap: &Path| check(&m, snap).env("CI", "1").output().unwrap();
    let mut bytes =
        b"---\nsource: peft-compat\n---\ncandle/cpu/f32/lora/forward/native/s:\n  outcome: pass\n"
            .to_vec();
    bytes.extend_from_slice(b"caf\xe9: 1\n");
    std::fs::write(&snap, &bytes).unwrap();
    let out = gate(&snap);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains("line 6, column 4: not UTF-8 text (byte 0xe9)"),
        "{stderr}"
    );
    let twice = "---\nsource: peft-compat\n---\nx:\n  outcome: pass\nx:\n  outcome: mismatch\n";
    std::fs::write(&snap, twice).unwrap();
    let out = gate(&snap);
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(stderr.contains("case `x` is listed twice"), "{stderr}");
}

/// `merge` and `report` refuse another schema version, and ids that are not the matrix's.
#[test]
fn reports_of_another_schema_or_with_foreign_ids_are_refused() {
    let dir = tempfile::tempdir().unwrap();
    let m = write(dir.path(), "m.yaml", SMALL);
    let part = |k: &str| {
        let p = dir.path().join(format!("p{k}.json"));
        let out = bin()
            .arg("run")
            .arg(&m)
            .args([
                "-q",
                "--partition",
                &format!("{k}/2"),
                "--results",
                "/dev/null",
                "--json",
            ])
            .arg(&p)
            .output()
            .unwrap();
        assert_eq!(out.status.code(), Some(0));
        p
    };
    let (p1, p2) = (part("1"), part("2"));
    let out = bin()
        .arg("merge")
        .arg(&p1)
        .arg(&p2)
        .args(["-q"])
        .output()
        .unwrap();
    assert_eq!(out.status.code(), Some(0), "{}", text(&out).1);

    let mut v = json(&p2);
    v["schema"] = "peft-compat/report/v9".into();
    std::fs::write(&p2, v.to_string()).unwrap();
    let out = bin().arg("report").arg(&p2).output().unwrap();
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(
            "schema `peft-compat/report/v9`, but this peft-compat reads peft-compat/report/v1"
        ),
        "{stderr}"
    );
    // A case whose id is not the matrix's at its index (an id edited to match its axes).
    v["schema"] = "peft-compat/report/v1".into();
    v["cases"][0]["shape"] = "t".into();
    let id = v["cases"][0]["id"].as_str().unwrap().replace("/s", "/t");
    v["cases"][0]["id"] = id.clone().into();
    std::fs::write(&p2, v.to_string()).unwrap();
    let out = bin().arg("merge").arg(&p1).arg(&p2).output().unwrap();
    let (_, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(2), "{stderr}");
    assert!(
        stderr.contains(&format!("case `{id}`")) && stderr.contains("is not a case of"),
        "{stderr}"
    );
}

// --- the gate judges what it was asked to judge ------------------------------------------------

/// A filtered `--check` gates the selected cases only: no orphans outside the filter, and the
/// `.snap.new` it proposes keeps every other entry (accepting it never wipes the baseline);
/// the suggested command keeps the user's --snapshot and --filter; the JSON carries the gate.
#[test]
fn a_filtered_check_leaves_the_snapshot_whole() {
    let dir = tempfile::tempdir().unwrap();
    let snap = dir.path().join("default.snap");
    std::fs::copy("snapshots/default.snap", &snap).unwrap();
    let filter = "candle/cpu/f32/lora/forward/";
    let r = dir.path().join("r.json");
    let gate = || {
        bin()
            .args([
                "run",
                "matrices/default.yaml",
                "-q",
                "--check",
                "--filter",
                filter,
            ])
            .args(["--results", "/dev/null", "--json"])
            .arg(&r)
            .arg("--snapshot")
            .arg(&snap)
            .output()
            .unwrap()
    };
    let out = gate();
    let (stdout, stderr) = text(&out);
    assert_eq!(out.status.code(), Some(0), "{stdout}\n{stderr}");
    assert!(!stdout.contains("orphan"), "{stdout}");
    assert_eq!(json(&r)["gate"]["passed"], true);
    assert_eq!(json(&r)["filter"][0], filter);

    // Plant a change in a selected case: the gate fails, and the proposal keeps the rest.
    let accepted = std::fs::read_to_string(&snap).unwrap();
    // An entry starts with its case id at column 0 (`backend/device/.../shape:`).
    let count = |text: &str| {
        text.lines()
            .filter(|l| !l.starts_with(' ') && l.contains('/') && l.ends_with(':'))
            .count()
    };
    let entries = count(&accepted);
    assert_eq!(entries, 1280);
    let id = "candle/cpu/f32/lora/forward/native/small:";
    let at = accepted.find(id).unwrap();
    let planted = format!(
        "{}{}",
        &accepted[..at],
        accepted[at..].replacen("outcome: pass", "outcome: mismatch", 1)
    );
    std::fs::write(&snap, planted).unwrap();
    let out = gate();
    let (stdout, _) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains(&format!(
            "peft-compat run matrices/default.yaml --check --filter '{filter}' --snapshot {}",
            snap.display()
        )),
        "{stdout}"
    );
    let proposed = std::fs::read_to_string(format!("{}.new", snap.display())).unwrap();
    assert_eq!(
        count(&proposed),
        entries,
        "the proposal must hold every accepted entry"
    );
    assert_eq!(json(&r)["gate"]["passed"], false);
    assert_eq!(json(&r)["gate"]["changes"][0]["kind"], "unexpected success");
}

/// A changed seed is said once and fails the gate; a tolerance raised in the matrix fails it
/// ("tolerance changed"), where before it let any error pass.
#[test]
fn a_changed_seed_or_tolerance_fails_the_gate() {
    let dir = tempfile::tempdir().unwrap();
    let snap = recorded(dir.path());
    assert!(std::fs::read_to_string(&snap)
        .unwrap()
        .contains("info:\n  seed: 3\n"));
    let gate = |body: &str| {
        let m = write(dir.path(), "m.yaml", body);
        check(&m, &snap).env("CI", "1").output().unwrap()
    };
    let out = gate(SMALL);
    assert_eq!(out.status.code(), Some(0), "{}", text(&out).0);
    let out = gate(&SMALL.replace("seed: 3", "seed: 4"));
    let (stdout, _) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains(
            "FAIL the seed changed: the snapshot was recorded with seed 3, this matrix has seed 4"
        ),
        "{stdout}"
    );
    let loose = format!("{SMALL}tolerances:\n  - {{dtype: f16, factor: 1000}}\n");
    let out = gate(&loose);
    let (stdout, _) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains("tolerance changed")
            && stdout.contains("errors are now held to another bar"),
        "{stdout}"
    );
}

/// A broken expectation is fixed in the matrix: the advice names the rule and offers no
/// snapshot to accept.
#[test]
fn a_broken_rule_is_advised_as_a_rule_to_fix_not_a_snapshot_to_accept() {
    let dir = tempfile::tempdir().unwrap();
    let snap = recorded(dir.path());
    let wrong = format!(
        "{SMALL}expectations:\n  - {{dtype: f32, adapter: lora, expect: nonfinite, reason: planted}}\n"
    );
    let m = write(dir.path(), "m.yaml", &wrong);
    // Outside CI, where a gate that fails on a change writes a `.snap.new`.
    let out = check(&m, &snap).output().unwrap();
    let (stdout, _) = text(&out);
    assert_eq!(out.status.code(), Some(1), "{stdout}");
    assert!(
        stdout.contains(&format!(
            "A matrix expectation no longer holds ({}:12): fix what broke it, or edit the rule",
            m.display()
        )),
        "{stdout}"
    );
    assert!(!stdout.contains("accept it"), "{stdout}");
    assert!(!Path::new(&format!("{}.new", snap.display())).exists());
}
