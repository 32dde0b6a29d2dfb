//! The front door, and the only place anyhow lives: [`args`] parses the command line,
//! [`plan`] turns `run`'s flags into a run plan (ripgrep's low and high arguments),
//! [`run`](mod@run) executes it with its observers (progress and the results stream), [`emit`] writes the
//! outputs and decides the exit code. The other subcommands are a few lines each, below.

pub mod args;
pub mod emit;
pub mod plan;
pub mod run;

pub use args::{Cli, ColorChoice, Command, MergeArgs, OutputArgs, ReportArgs, RunArgs};
pub use emit::gate_exit_code;

use crate::case::{Backend, Device};
use crate::environment::Environment;
use crate::exec::{Pool, WorkerPaths, Workers};
use crate::report::Report;
use crate::spec::Matrix;
use crate::verdict::compare::{self, Labeled};
use anyhow::Context;
use emit::{exit_with, print_out, Problems};
use std::collections::BTreeMap;
use std::io::Write;
use std::path::{Path, PathBuf};

/// Exit codes, documented in `--help`.
pub mod exit {
    /// The run completed (failing cases are findings, not errors); with --check, the gate passed.
    pub const OK: i32 = 0;
    /// --check: the gate failed (a regression, an unexpected success, a missing or orphan entry).
    pub const GATE_FAILED: i32 = 1;
    /// Bad input: a matrix file that does not parse or validate, or bad flags.
    pub const BAD_INPUT: i32 = 2;
    /// An output could not be written (a report file, the results stream, a dump); the run
    /// itself completed and every other output was written.
    pub const RUNTIME: i32 = 3;
    /// A backend that should run here could not (worker missing, broken, hung at start); under
    /// --check the gate fails instead (1). `--skip-backend` declares a backend not expected.
    pub const BACKEND_LOST: i32 = 4;
    /// Interrupted (Ctrl-C): finished cases are in the results stream; --resume continues.
    pub const INTERRUPTED: i32 = 130;
}

/// An error with the exit code it maps to.
#[derive(Debug)]
pub struct Failure {
    pub code: i32,
    pub error: anyhow::Error,
}

pub(crate) fn bad_input(e: impl Into<anyhow::Error>) -> Failure {
    Failure {
        code: exit::BAD_INPUT,
        error: e.into(),
    }
}

pub(crate) fn runtime(e: impl Into<anyhow::Error>) -> Failure {
    Failure {
        code: exit::RUNTIME,
        error: e.into(),
    }
}

pub fn run(cli: Cli) -> Result<(), Failure> {
    match cli.command {
        Command::Run(args) => run::run_matrix(*args),
        Command::Merge(args) => merge(*args),
        Command::Report(args) => {
            let report = read_report(&args.report)?;
            let mut problems = Problems::default();
            let path = PathBuf::from(&report.matrix);
            let code = emit::emit(&report, &args.out, &path, &mut problems)?;
            exit_with(code, &problems, &report.matrix)
        }
        Command::Compare {
            reports,
            label,
            max_differences,
            units,
            html,
        } => {
            let mut labeled = Vec::new();
            for (i, p) in reports.iter().enumerate() {
                labeled.push(Labeled {
                    label: label
                        .get(i)
                        .cloned()
                        .unwrap_or_else(|| p.display().to_string()),
                    report: read_report(p)?,
                });
            }
            let c = compare::compare(&labeled);
            print_out(&crate::render::compare::text(
                &labeled,
                &c,
                false,
                max_differences,
                units,
            ))?;
            let mut problems = Problems::default();
            if let Some(path) = &html {
                let page = crate::render::html::compare_page(&labeled, &command_line());
                emit::write(path, "the HTML page", page, &mut problems);
            }
            exit_with(exit::OK, &problems, "the comparison")
        }
        Command::History {
            reports,
            all,
            markdown,
            units,
            filter,
            json,
        } => {
            let names: Vec<String> = reports.iter().map(|p| p.display().to_string()).collect();
            let mut loaded = Vec::new();
            for p in &reports {
                loaded.push(read_report(p)?);
            }
            let mut h = crate::verdict::history::history(&loaded, &names);
            if !filter.is_empty() {
                for s in &mut h.series {
                    s.rows
                        .retain(|r| filter.iter().any(|f| r.cell.contains(f.as_str())));
                }
            }
            print_out(&crate::render::history::text(&h, all, markdown, units))?;
            let mut problems = Problems::default();
            if let Some(path) = &json {
                let body = serde_json::to_string_pretty(&h)
                    .context("the history as JSON")
                    .map_err(runtime)?;
                emit::write(path, "the history", body + "\n", &mut problems);
            }
            exit_with(exit::OK, &problems, "the history")
        }
        Command::List { matrix, max_cases } => list(&matrix, max_cases),
        Command::Env {
            no_backends,
            worker,
        } => env(no_backends, &worker),
    }
}

/// `list`: the case ids, one per line.
fn list(matrix: &Path, max_cases: Option<usize>) -> Result<(), Failure> {
    let m = Matrix::load(matrix, max_cases).map_err(bad_input)?;
    let mut out = std::io::stdout().lock();
    for c in &m.cases {
        match writeln!(out, "{}", c.id()) {
            Ok(()) => {}
            Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => return Ok(()),
            Err(e) => return Err(runtime(e)),
        }
    }
    Ok(())
}

/// `env`: the environment block a report would carry.
fn env(no_backends: bool, worker: &[(Backend, PathBuf)]) -> Result<(), Failure> {
    let env = if no_backends {
        Environment::detect(BTreeMap::new(), None)
    } else {
        let pairs: Vec<_> = Backend::ALL.iter().map(|&b| (b, Device::Cpu)).collect();
        let workers = Workers::start(worker_paths(worker), &pairs, Pool::default());
        Environment::of_workers(&workers.info)
    };
    print_out(&format!(
        "{}\n",
        serde_json::to_string_pretty(&env).expect("serializable")
    ))
}

pub(crate) fn worker_paths(list: &[(Backend, PathBuf)]) -> WorkerPaths {
    WorkerPaths {
        overrides: list.iter().cloned().collect(),
    }
}

/// Read a JSON report strictly: UTF-8, this schema version, every field as the schema says.
pub(crate) fn read_report(p: &Path) -> Result<Report, Failure> {
    let text = std::fs::read_to_string(p)
        .with_context(|| format!("cannot read {} (a JSON report is UTF-8 text)", p.display()))
        .map_err(bad_input)?;
    let value: serde_json::Value = serde_json::from_str(&text)
        .with_context(|| format!("{} is not a peft-compat JSON report", p.display()))
        .map_err(bad_input)?;
    match value.get("schema").and_then(|s| s.as_str()) {
        Some(crate::report::SCHEMA) => {}
        other => {
            return Err(bad_input(anyhow::anyhow!(
                "{}: schema {}, but this peft-compat reads {}: render it with the peft-compat \
                 that wrote it",
                p.display(),
                other.map_or("missing".to_string(), |s| format!("`{s}`")),
                crate::report::SCHEMA
            )))
        }
    }
    serde_json::from_value(value)
        .with_context(|| format!("{} is not a peft-compat JSON report", p.display()))
        .map_err(bad_input)
}

/// The merged cases against the matrix file the parts name, when it is here and unchanged:
/// each case's id at its index. (Parts made from another version of the file are refused.)
fn check_against_matrix(report: &Report) -> Result<(), Failure> {
    let path = Path::new(&report.matrix);
    if !path.is_file() {
        return Ok(());
    }
    let m = Matrix::load(path, None).map_err(bad_input)?;
    if let Some(fnv) = report.matrix_fnv.as_ref().filter(|f| **f != m.fingerprint) {
        return Err(bad_input(anyhow::anyhow!(
            "{} changed since the parts ran (fingerprint {fnv}, now {}): run the parts again",
            report.matrix,
            m.fingerprint
        )));
    }
    for c in &report.cases {
        let want = m.cases.get(c.index).map(|k| k.id());
        if want.as_deref() != Some(c.id.as_str()) {
            return Err(bad_input(anyhow::anyhow!(
                "case `{}` (index {}) is not a case of {}{}",
                c.id,
                c.index,
                report.matrix,
                want.map_or(String::new(), |w| format!(" (index {} is `{w}`)", c.index))
            )));
        }
    }
    Ok(())
}

/// `merge`: partial reports -> the single-job report.
fn merge(args: MergeArgs) -> Result<(), Failure> {
    let mut parts = Vec::new();
    for p in &args.reports {
        parts.push((p.display().to_string(), read_report(p)?));
    }
    let report = crate::report::merge(parts).map_err(bad_input)?;
    check_against_matrix(&report)?;
    let matrix_path = PathBuf::from(&report.matrix);
    let mut problems = Problems::default();
    let code = emit::emit(&report, &args.out, &matrix_path, &mut problems)?;
    exit_with(code, &problems, &report.matrix)
}

/// This process's command line as a shell would take it back (`peft-compat run m.yaml ...`).
pub(crate) fn command_line() -> String {
    let mut args = std::env::args();
    let program = args.next().map(|p| {
        Path::new(&p)
            .file_name()
            .map_or(p.clone(), |n| n.to_string_lossy().into_owned())
    });
    program
        .into_iter()
        .chain(args)
        .map(|a| crate::util::shell_quote(&a))
        .collect::<Vec<_>>()
        .join(" ")
}
