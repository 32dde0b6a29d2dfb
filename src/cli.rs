//! Command-line interface: clap definitions turned into a run, and the only place anyhow lives.

use crate::environment::Environment;
use crate::gate;
use crate::matrix::{Matrix, MatrixError};
use crate::record;
use crate::render::{junit, table};
use crate::report::Report;
use crate::runner::{self, Event, RunOptions};
use crate::snapshot;
use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use std::io::IsTerminal;
use std::path::PathBuf;

/// Exit codes, documented in `--help`.
pub mod exit {
    /// The run completed (failing cases are findings, not errors); with --check, the gate passed.
    pub const OK: i32 = 0;
    /// --check: the gate failed (a regression, an unexpected success, a missing or orphan entry).
    pub const GATE_FAILED: i32 = 1;
    /// Bad input: a matrix file that does not parse or validate, or bad flags.
    pub const BAD_INPUT: i32 = 2;
    /// The run could not complete: an output file could not be written.
    pub const RUNTIME: i32 = 3;
}

const AFTER_HELP: &str = "\
Exit codes:
  0  the run completed; failing cases are findings, reported in the table and JSON
     (with --check: the gate passed)
  1  --check: the gate failed; each changed case is listed once with before -> after
  2  bad input: the matrix file (the message names file:line:column and the fix) or the flags
  3  the run could not complete (e.g. --json could not be written)

Environment:
  NO_COLOR   set to disable colours (as does --color never)
  CI         set: never write snapshots (not even .snap.new)

Examples:
  peft-compat run matrices/default.yaml
  peft-compat run matrices/default.yaml --json report.json --markdown support.md
  peft-compat run matrices/default.yaml --filter /f16/dora/ --dump dumps/
  peft-compat run matrices/default.yaml --check --junit junit.xml   # the CI gate
  peft-compat run matrices/default.yaml --check --markdown \"$GITHUB_STEP_SUMMARY\"
  peft-compat run matrices/mine.yaml --record expectations.yaml --repeats 5
  peft-compat list matrices/default.yaml";

/// Which LoRA/DoRA combinations work, on which backend, device and dtype, and how precisely.
///
/// Runs every case of a matrix file (backend x device x dtype x adapter x op x precision x shape)
/// for real, judges each output against a float64 reference computed from the same rounded
/// inputs, and prints a support table.
#[derive(Debug, Parser)]
#[command(name = "peft-compat", version, after_help = AFTER_HELP)]
pub struct Cli {
    #[command(subcommand)]
    pub command: Command,
}

#[derive(Debug, Subcommand)]
pub enum Command {
    /// Run a matrix and print the support table.
    Run(Box<RunArgs>),
    /// Print the case ids a matrix expands to, without running them.
    List {
        /// The matrix file (YAML).
        matrix: PathBuf,
        /// Ceiling on the number of cases [default: the file's max_cases, else 100000].
        #[arg(long)]
        max_cases: Option<usize>,
    },
    /// Print the environment block a report would carry (versions, CPU flags, GPUs).
    Env,
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ColorChoice {
    Auto,
    Always,
    Never,
}

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// The matrix file (YAML), e.g. matrices/default.yaml.
    pub matrix: PathBuf,
    /// Write the full report as JSON (schema peft-compat/report/v1) to PATH.
    #[arg(long, value_name = "PATH")]
    pub json: Option<PathBuf>,
    /// Write the support table as Markdown to PATH, with the gate's verdict first under --check
    /// (for docs and CI job summaries).
    #[arg(long, value_name = "PATH")]
    pub markdown: Option<PathBuf>,
    /// Write each case's inputs, outputs and reference as a safetensors file into DIR.
    #[arg(long, value_name = "DIR")]
    pub dump: Option<PathBuf>,
    /// Run only the cases whose id contains one of these substrings (repeatable),
    /// e.g. --filter /f16/ --filter candle/cpu.
    #[arg(long, value_name = "SUBSTR")]
    pub filter: Vec<String>,
    /// Ceiling on the number of cases [default: the file's max_cases, else 100000].
    #[arg(long)]
    pub max_cases: Option<usize>,
    /// How many failing cases to list under the table.
    #[arg(long, default_value_t = 40)]
    pub max_findings: usize,
    /// Gate: compare with the accepted snapshot (snapshots/<matrix stem>.snap) and the matrix's
    /// expectations, and exit 1 on any regression, unexpected success, missing or orphan entry. Outside CI, a failed gate writes
    /// the observed snapshot as .snap.new for `cargo insta review`.
    #[arg(long)]
    pub check: bool,
    /// The snapshot to check against [default: snapshots/<matrix file stem>.snap].
    #[arg(long, value_name = "PATH", requires = "check")]
    pub snapshot: Option<PathBuf>,
    /// With --check: report cases that newly pass without failing the gate.
    #[arg(long, requires = "check")]
    pub allow_improvements: bool,
    /// Write the observed snapshot (the accepted-snapshot format) to PATH, e.g. to compare runs
    /// byte for byte. Refused when CI is set.
    #[arg(long, value_name = "PATH")]
    pub snapshot_out: Option<PathBuf>,
    /// Write a JUnit XML file with one test case per matrix case (expected failures are
    /// skipped with type xfail).
    #[arg(long, value_name = "PATH")]
    pub junit: Option<PathBuf>,
    /// Run the matrix --repeats times and write expectations from what was observed to PATH,
    /// for a person to review: cases that fail in every run become expected failures carrying
    /// their captured error, cases that both pass and fail become `flaky`.
    #[arg(long, value_name = "PATH", conflicts_with = "check")]
    pub record: Option<PathBuf>,
    /// With --record: how many times to run the matrix.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..), requires = "record")]
    pub repeats: u32,
    /// Colour the table.
    #[arg(long, value_enum, default_value_t = ColorChoice::Auto)]
    pub color: ColorChoice,
    /// No progress bar and no table on stdout (files are still written).
    #[arg(long, short)]
    pub quiet: bool,
}

/// An error with the exit code it maps to.
#[derive(Debug)]
pub struct Failure {
    pub code: i32,
    pub error: anyhow::Error,
}

fn bad_input(e: MatrixError) -> Failure {
    Failure {
        code: exit::BAD_INPUT,
        error: e.into(),
    }
}

fn bad_input_any(e: anyhow::Error) -> Failure {
    Failure {
        code: exit::BAD_INPUT,
        error: e,
    }
}

fn runtime(e: anyhow::Error) -> Failure {
    Failure {
        code: exit::RUNTIME,
        error: e,
    }
}

fn use_color(choice: ColorChoice) -> bool {
    match choice {
        ColorChoice::Always => true,
        ColorChoice::Never => false,
        ColorChoice::Auto => {
            std::env::var_os("NO_COLOR").is_none_or(|v| v.is_empty())
                && std::io::stdout().is_terminal()
        }
    }
}

pub fn run(cli: Cli) -> Result<(), Failure> {
    match cli.command {
        Command::Run(args) => run_matrix(*args),
        Command::List { matrix, max_cases } => {
            let m = Matrix::load(&matrix, max_cases).map_err(bad_input)?;
            for c in &m.cases {
                println!("{}", c.id());
            }
            Ok(())
        }
        Command::Env => {
            let env = Environment::detect();
            println!(
                "{}",
                serde_json::to_string_pretty(&env).expect("serializable")
            );
            Ok(())
        }
    }
}

fn run_matrix(args: RunArgs) -> Result<(), Failure> {
    let mut matrix = Matrix::load(&args.matrix, args.max_cases).map_err(bad_input)?;
    if !args.filter.is_empty() {
        matrix
            .cases
            .retain(|c| args.filter.iter().any(|f| c.id().contains(f.as_str())));
        if matrix.cases.is_empty() {
            return Err(Failure {
                code: exit::BAD_INPUT,
                error: anyhow::anyhow!(
                    "no case id of {} contains any of {:?}; `peft-compat list {}` shows the ids",
                    args.matrix.display(),
                    args.filter,
                    args.matrix.display()
                ),
            });
        }
    }
    let runs = if args.record.is_some() {
        args.repeats as usize
    } else {
        1
    };
    let progress = if args.quiet || !std::io::stderr().is_terminal() {
        indicatif::ProgressBar::hidden()
    } else {
        indicatif::ProgressBar::new((matrix.cases.len() * runs) as u64)
    };
    progress.set_style(
        indicatif::ProgressStyle::with_template("{bar:30} {pos}/{len} {elapsed} {wide_msg}")
            .expect("valid template"),
    );
    let opts = RunOptions {
        dump_dir: args.dump.clone(),
    };
    let env = Environment::detect();
    let matrix_name = args.matrix.display().to_string();
    // A panicking case is caught and reported as `crashed`; keep its message out of the table.
    let hook = std::panic::take_hook();
    std::panic::set_hook(Box::new(|_| {}));
    let mut reports = Vec::with_capacity(runs);
    for run in 0..runs {
        let mut elapsed = 0.0;
        let results = runner::run(&matrix, &opts, &mut |e| match e {
            Event::RunStarted { .. } => {}
            Event::CaseStarted { case, .. } if runs > 1 => {
                progress.set_message(format!("run {}/{runs}: {}", run + 1, case.id()))
            }
            Event::CaseStarted { case, .. } => progress.set_message(case.id()),
            Event::CaseFinished { .. } => progress.inc(1),
            Event::RunFinished { elapsed: t, .. } => elapsed = t.as_secs_f64(),
        });
        reports.push(
            Report::new(&matrix_name, matrix.seed, env.clone(), &results, elapsed)
                .with_expectations(&matrix.expectations),
        );
    }
    std::panic::set_hook(hook);
    progress.finish_and_clear();
    let report = reports.last().expect("at least one run");

    if !args.quiet {
        print!(
            "{}",
            table::render_text(report, use_color(args.color), args.max_findings)
        );
    }
    for c in report.cases.iter().filter(|c| c.dump_error.is_some()) {
        eprintln!(
            "warning: {}: {}",
            c.id,
            c.dump_error.as_deref().unwrap_or("")
        );
    }
    let verdict = if args.check {
        Some(gate_check(&args, &matrix_name, report)?)
    } else {
        None
    };
    let write = |path: &PathBuf, what: &str, text: String| {
        std::fs::write(path, text)
            .with_context(|| format!("cannot write {what} to {}", path.display()))
            .map_err(runtime)
    };
    if let Some(path) = &args.json {
        write(path, "the JSON report", report.to_json())?;
    }
    if let Some(path) = &args.markdown {
        let gate = verdict.as_ref().map(|v| (v, matrix_name.as_str()));
        write(
            path,
            "the Markdown summary",
            table::render_markdown(report, gate),
        )?;
    }
    if let Some(path) = &args.junit {
        write(
            path,
            "the JUnit file",
            junit::render(report, verdict.as_ref()),
        )?;
    }
    if let Some(path) = &args.snapshot_out {
        if snapshot::in_ci() {
            return Err(bad_input_any(anyhow::anyhow!(
                "--snapshot-out: CI is set, and snapshots are never written under CI"
            )));
        }
        write(
            path,
            "the snapshot",
            snapshot::to_text(&snapshot::from_report(report)),
        )?;
    }
    if let Some(path) = &args.record {
        let recorded = record::record(&matrix, &reports);
        write(
            path,
            "the recorded expectations",
            recorded.to_yaml(&matrix_name, &env),
        )?;
        println!(
            "{}",
            record::summary(&recorded, &path.display().to_string())
        );
    }
    match verdict.as_ref().map(gate_exit_code) {
        Some(code) if code != exit::OK => Err(Failure {
            code,
            error: anyhow::anyhow!("the gate failed for {matrix_name}"),
        }),
        _ => Ok(()),
    }
}

/// The exit code `run --check` ends with for a verdict (tests hold planted changes to it).
pub fn gate_exit_code(v: &gate::Verdict) -> i32 {
    if v.passed() {
        exit::OK
    } else {
        exit::GATE_FAILED
    }
}

/// Compare with the accepted snapshot, print the verdict, and (outside CI) leave the observed
/// snapshot as .snap.new when something changed.
fn gate_check(args: &RunArgs, matrix: &str, report: &Report) -> Result<gate::Verdict, Failure> {
    let path = args
        .snapshot
        .clone()
        .unwrap_or_else(|| snapshot::default_path(&args.matrix));
    let (accepted, missing) = match snapshot::read(&path) {
        Ok(s) => (s, None),
        Err(e @ snapshot::SnapshotError::Missing(_)) => (snapshot::Snapshot::new(), Some(e)),
        Err(e) => return Err(bad_input_any(e.into())),
    };
    let verdict = gate::check(report, &accepted, args.allow_improvements);
    match &missing {
        // Every case would be listed as missing; say it once.
        Some(e) => println!("gate FAILED: {e}"),
        None => print!("{}", verdict.render(matrix)),
    }
    let observed = snapshot::observed(report, &accepted);
    // When something changed and the snapshot would change with it (a broken expectation alone
    // has nothing to accept; noise within the drift rules is not a change).
    if missing.is_some() || (!verdict.changes.is_empty() && observed != accepted) {
        if snapshot::in_ci() {
            println!("(CI is set: no snapshot written)");
        } else {
            let pending =
                snapshot::write_pending(&path, matrix, &observed).map_err(|e| runtime(e.into()))?;
            println!("observed snapshot written to {}", pending.display());
        }
    }
    Ok(verdict)
}
