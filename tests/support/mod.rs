//! Helpers shared by the integration tests: the backends in process (through the worker
//! crates' glue) and through their real worker processes.
#![allow(dead_code)]

use peft_compat::case::{Backend, Case, Device};
use peft_compat::environment::Environment;
use peft_compat::exec::{self, CaseResult, InProcess, Pool, RunOptions, WorkerPaths, Workers};
use peft_compat::spec::Matrix;
use peft_compat::worker::io::{Inputs, Outputs};
use peft_compat::worker::ops::OpResult;
use std::collections::BTreeMap;
use std::path::PathBuf;

/// Run a case on its backend in this process.
pub fn run_on_backend(case: &Case, inputs: &Inputs) -> OpResult<Outputs> {
    match case.point.backend {
        Backend::Tch => peft_compat_worker_tch::run(case, inputs),
        Backend::Candle => peft_compat_worker_candle::run(case, inputs),
        b @ (Backend::TchAt(_) | Backend::Peft(_)) => {
            Err(peft_compat::worker::ops::BackendError::new(format!(
                "{b} runs only in its worker process"
            )))
        }
    }
}

/// Why a backend cannot use a device here (in process).
pub fn unavailable(backend: Backend, device: Device) -> Option<String> {
    match backend {
        Backend::Tch => peft_compat_worker_tch::ops::unavailable(device),
        Backend::Candle => peft_compat_worker_candle::ops::unavailable(device),
        b @ (Backend::TchAt(_) | Backend::Peft(_)) => {
            Some(format!("{b} runs only in its worker process"))
        }
    }
}

/// Run every case of `m` in process with `exec`.
pub fn run_in_process(
    m: &Matrix,
    exec: &(dyn Fn(&Case, &Inputs) -> OpResult<Outputs> + Sync),
) -> Vec<CaseResult> {
    let backends = InProcess {
        run: exec,
        unavailable: &unavailable,
    };
    exec::run_in_process(m, &RunOptions::default(), &backends, &mut |_| {})
}

/// The libraries as the workers report them.
pub fn env() -> Environment {
    let libraries: BTreeMap<String, String> = [
        ("tch", peft_compat_worker_tch::ops::tch_version()),
        ("libtorch", peft_compat_worker_tch::ops::libtorch_version()),
        (
            "candle",
            peft_compat_worker_candle::ops::CANDLE_VERSION.to_string(),
        ),
    ]
    .into_iter()
    .map(|(k, v)| (k.to_string(), v))
    .collect();
    Environment::detect(
        libraries,
        peft_compat_worker_tch::ops::libtorch_cuda_version().map(String::from),
    )
}

/// The binaries cargo built beside the test executables (target/<profile>/).
pub fn target_dir() -> PathBuf {
    let exe = std::env::current_exe().unwrap();
    exe.parent().unwrap().parent().unwrap().to_path_buf()
}

/// The test-only worker with the fault-injection hook (an example target).
pub fn fault_worker() -> PathBuf {
    target_dir().join("examples").join("fault_worker")
}

/// Every case of `m` through the real worker processes, `jobs` at a time, and the environment
/// as the workers describe it.
pub fn run_workers_env(
    m: &Matrix,
    jobs: usize,
    opts: &RunOptions,
) -> (Vec<CaseResult>, Environment) {
    let mut pairs: Vec<_> = m
        .cases
        .iter()
        .map(|c| (c.point.backend, c.point.device))
        .collect();
    pairs.sort();
    pairs.dedup();
    let workers = Workers::start(
        WorkerPaths::default(),
        &pairs,
        Pool {
            jobs,
            ..Pool::default()
        },
    );
    let results = exec::run(m, None, &workers, opts, &mut |_| {}).results;
    (results, Environment::of_workers(&workers.info))
}

pub fn run_workers_with(m: &Matrix, jobs: usize, opts: &RunOptions) -> Vec<CaseResult> {
    run_workers_env(m, jobs, opts).0
}

pub fn run_workers(m: &Matrix) -> Vec<CaseResult> {
    run_workers_with(m, 2, &RunOptions::default())
}

/// The `peft-compat` binary, as a user runs it: no colour, outside CI, every backend expected.
pub fn bin() -> std::process::Command {
    let mut c = std::process::Command::new(env!("CARGO_BIN_EXE_peft-compat"));
    c.env("NO_COLOR", "1")
        .env_remove("CI")
        .env_remove("PEFT_COMPAT_SKIP_LIBTORCH_2_1");
    c
}

/// Write `body` to `dir/name`; its path.
pub fn write(dir: &std::path::Path, name: &str, body: &str) -> PathBuf {
    let p = dir.join(name);
    std::fs::write(&p, body).unwrap();
    p
}

/// A JSON file read back.
pub fn json(path: &std::path::Path) -> serde_json::Value {
    serde_json::from_str(&std::fs::read_to_string(path).unwrap()).unwrap()
}

/// The report with what legitimately differs between two runs (timings, paths) taken out.
pub fn masked(mut r: serde_json::Value) -> serde_json::Value {
    use serde_json::Value;
    r["summary"]["elapsed_s"] = Value::Null;
    r["matrix"] = Value::Null;
    // `run`, `run --resume` and `merge` are different commands for the same cases.
    r["command"] = Value::Null;
    for c in r["cases"].as_array_mut().unwrap() {
        c["duration_ms"] = Value::Null;
        c["compute_ms"] = Value::Null;
    }
    r
}

/// The case `id` of a JSON report.
pub fn report_case<'a>(report: &'a serde_json::Value, id: &str) -> &'a serde_json::Value {
    report["cases"]
        .as_array()
        .unwrap()
        .iter()
        .find(|c| c["id"] == id)
        .unwrap_or_else(|| panic!("no case {id}"))
}

/// `.venv`'s Python when it has torch, PEFT and safetensors (scripts/test installs them).
pub fn python() -> Option<&'static str> {
    let py = ".venv/bin/python";
    let ok = std::process::Command::new(py)
        .args(["-c", "import torch, peft, safetensors"])
        .output()
        .is_ok_and(|o| o.status.success());
    ok.then_some(py)
}

/// Replay a dump through PEFT (scripts/replay.py): `(what, |peft - peft-compat|)` for each
/// "what: peft vs output: D" line it prints, and all it printed; panics when replay.py fails.
pub fn replay(file: &std::path::Path) -> (Vec<(String, f64)>, String) {
    let py = python().expect(".venv with torch and peft (scripts/test makes it)");
    let out = std::process::Command::new(py)
        .arg("scripts/replay.py")
        .arg(file)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert!(
        out.status.success(),
        "{}: {stdout}{}",
        file.display(),
        String::from_utf8_lossy(&out.stderr)
    );
    let pairs = stdout
        .lines()
        .filter_map(|l| {
            let (what, d) = l.split_once(": peft vs output: ")?;
            // "D" or "D (non-finite at the same N places)".
            let d = d.split_whitespace().next()?;
            Some((what.to_string(), d.parse().ok()?))
        })
        .collect();
    (pairs, stdout.into_owned())
}
