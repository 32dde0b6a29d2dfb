//! Command-line interface: clap definitions turned into a run, and the only place anyhow lives.

use crate::environment::Environment;
use crate::gate;
use crate::guard::{self, Limits};
use crate::matrix::Matrix;
use crate::partition::Partition;
use crate::progress::{Progress, Style};
use crate::record;
use crate::render::{junit, table};
use crate::report::{CaseReport, Report};
use crate::runner::{self, Backends, Event, RunOptions, WorkerPaths, Workers};
use crate::snapshot;
use crate::stream;
use anyhow::Context;
use clap::{Parser, Subcommand, ValueEnum};
use std::collections::{BTreeMap, BTreeSet};
use std::io::{IsTerminal, Write};
use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::Arc;
use std::time::Duration;

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
    /// Interrupted (Ctrl-C): finished cases are in the results stream; --resume continues.
    pub const INTERRUPTED: i32 = 130;
}

const AFTER_HELP: &str = "\
Exit codes:
  0    the run completed; failing cases are findings, reported in the table and JSON
       (with --check: the gate passed)
  1    --check: the gate failed; each changed case is listed once with before -> after
  2    bad input: the matrix file (the message names file:line:column and the fix) or the flags
  3    the run could not complete (e.g. --json could not be written)
  130  interrupted (Ctrl-C): every finished case is in the results stream; --resume continues

Environment:
  NO_COLOR   set to disable colours (as does --color never)
  CI         set: never write snapshots (not even .snap.new)

Examples:
  peft-compat run matrices/default.yaml
  peft-compat run matrices/default.yaml --json report.json --markdown support.md
  peft-compat run matrices/default.yaml --filter /f16/dora/ --dump dumps/
  peft-compat run matrices/default.yaml --check --junit junit.xml   # the CI gate
  peft-compat run matrices/default.yaml --partition 2/3 --json part2.json
  peft-compat merge part1.json part2.json part3.json --check
  peft-compat run matrices/default.yaml --resume                    # after Ctrl-C
  peft-compat run matrices/mine.yaml --record expectations.yaml --repeats 5
  peft-compat list matrices/default.yaml";

/// Which LoRA/DoRA combinations work, on which backend, device and dtype, and how precisely.
///
/// Runs every case of a matrix file (backend x device x dtype x adapter x op x precision x shape)
/// for real, each backend in its own worker process, judges each output against a float64
/// reference computed from the same rounded inputs, and prints a support table.
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
    /// Join partial reports (from --partition K/N jobs) into one report and one table,
    /// identical to a single-job run, with the same outputs and gate as `run`.
    Merge(Box<MergeArgs>),
    /// Render a saved JSON report again (table, Markdown, JUnit) and gate it with --check: e.g.
    /// a report made on a GPU runner, gated where the snapshot lives.
    Report(Box<ReportArgs>),
    /// Put reports from different machines or builds side by side: one table whose cells read
    /// A / B / ..., the environments, and every case that behaves differently.
    Compare {
        /// Two or more JSON reports (from `run --json` or `merge --json`).
        #[arg(required = true, num_args = 2..)]
        reports: Vec<PathBuf>,
        /// A name per report, in order [default: the file name].
        #[arg(long)]
        label: Vec<String>,
        /// How many differing cases to list.
        #[arg(long, default_value_t = 60)]
        max_differences: usize,
    },
    /// Print the case ids a matrix expands to, without running them.
    List {
        /// The matrix file (YAML).
        matrix: PathBuf,
        /// Ceiling on the number of cases [default: the file's max_cases, else 100000].
        #[arg(long)]
        max_cases: Option<usize>,
    },
    /// Print the environment block a report would carry (versions, CPU flags, GPUs).
    Env {
        /// Do not start the backend workers (no library versions; instant).
        #[arg(long)]
        no_backends: bool,
        /// A worker binary to use instead of the one beside peft-compat (repeatable).
        #[arg(long, value_name = "BACKEND=PATH", value_parser = parse_worker)]
        worker: Vec<(crate::case::Backend, PathBuf)>,
    },
}

#[derive(Debug, Clone, Copy, PartialEq, Eq, ValueEnum)]
pub enum ColorChoice {
    Auto,
    Always,
    Never,
}

/// What to do with a finished report: shared by `run` and `merge`.
#[derive(Debug, clap::Args)]
pub struct OutputArgs {
    /// Write the full report as JSON (schema peft-compat/report/v1) to PATH.
    #[arg(long, value_name = "PATH")]
    pub json: Option<PathBuf>,
    /// Write the support table as Markdown to PATH, with the gate's verdict first under --check
    /// (for docs and CI job summaries).
    #[arg(long, value_name = "PATH")]
    pub markdown: Option<PathBuf>,
    /// How many failing cases to list under the table.
    #[arg(long, default_value_t = 40)]
    pub max_findings: usize,
    /// Gate: compare with the accepted snapshot (snapshots/<matrix stem>.snap) and the matrix's
    /// expectations, and exit 1 on any regression, unexpected success, missing or orphan entry.
    /// Outside CI, a failed gate writes the observed snapshot as .snap.new for `cargo insta
    /// review`.
    #[arg(long)]
    pub check: bool,
    /// The snapshot to check against [default: snapshots/<matrix file stem>.snap].
    #[arg(long, value_name = "PATH", requires = "check")]
    pub snapshot: Option<PathBuf>,
    /// With --check: report cases that newly pass without failing the gate.
    #[arg(long, requires = "check")]
    pub allow_improvements: bool,
    /// With --check: report cases that ran here but have no baseline (the snapshot recorded
    /// them as skipped, e.g. CUDA cases accepted on a CPU runner) without failing the gate.
    #[arg(long, requires = "check")]
    pub allow_new: bool,
    /// Write the observed snapshot (the accepted-snapshot format) to PATH, e.g. to compare runs
    /// byte for byte. Refused when CI is set.
    #[arg(long, value_name = "PATH")]
    pub snapshot_out: Option<PathBuf>,
    /// Write a JUnit XML file with one test case per matrix case (expected failures are
    /// skipped with type xfail).
    #[arg(long, value_name = "PATH")]
    pub junit: Option<PathBuf>,
    /// Colour the table.
    #[arg(long, value_enum, default_value_t = ColorChoice::Auto)]
    pub color: ColorChoice,
    /// No progress and no table on stdout (files are still written).
    #[arg(long, short)]
    pub quiet: bool,
}

#[derive(Debug, clap::Args)]
pub struct RunArgs {
    /// The matrix file (YAML), e.g. matrices/default.yaml.
    pub matrix: PathBuf,
    #[command(flatten)]
    pub out: OutputArgs,
    /// Write each case's inputs, outputs and reference as a safetensors file into DIR.
    #[arg(long, value_name = "DIR")]
    pub dump: Option<PathBuf>,
    /// Run only the cases whose id contains one of these substrings (repeatable),
    /// e.g. --filter /f16/ --filter candle/cpu.
    #[arg(long, value_name = "SUBSTR")]
    pub filter: Vec<String>,
    /// Run a deterministic share of the cases: K/N (= count:K/N, every N-th case) or
    /// hash:K/N (by case id). `merge` joins the N reports.
    #[arg(long, value_name = "K/N")]
    pub partition: Option<Partition>,
    /// Ceiling on the number of cases [default: the file's max_cases, else 100000].
    #[arg(long)]
    pub max_cases: Option<usize>,
    /// Cases run at once, each in its own worker process [default: the number of cores].
    #[arg(long, short = 'j', value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub jobs: Option<u32>,
    /// Intra-op threads per worker (libtorch, rayon) [default: cores / jobs, at least 1].
    #[arg(long, value_name = "N", value_parser = clap::value_parser!(u32).range(1..))]
    pub threads: Option<u32>,
    /// A case still running after SECS is `timeout`; its worker is killed and replaced.
    #[arg(long, value_name = "SECS", default_value_t = runner::DEFAULT_TIMEOUT.as_secs_f64())]
    pub timeout: f64,
    /// Refuse (skip, with the estimate) cases estimated to need more host memory than this
    /// [default: the memory available at start]. Accepts 512M, 16G, 1.5T or bytes.
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub max_memory: Option<f64>,
    /// Likewise for GPU memory [default: the GPU's memory, from nvidia-smi].
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub max_device_memory: Option<f64>,
    /// The results stream (one JSON line per finished case, written as each finishes)
    /// [default: beside --json as .jsonl, else out/<matrix stem>.jsonl].
    #[arg(long, value_name = "PATH")]
    pub results: Option<PathBuf>,
    /// Continue an interrupted run from its results stream: only the cases not in it run, and
    /// the report is the one an uninterrupted run gives.
    #[arg(long, conflicts_with = "record")]
    pub resume: bool,
    /// A worker binary to use instead of the one beside peft-compat (repeatable),
    /// e.g. --worker tch=/opt/peft-compat-worker-tch.
    #[arg(long, value_name = "BACKEND=PATH", value_parser = parse_worker)]
    pub worker: Vec<(crate::case::Backend, PathBuf)>,
    /// Run the matrix --repeats times and write expectations from what was observed to PATH,
    /// for a person to review: cases that fail in every run become expected failures carrying
    /// their captured error, cases that both pass and fail become `flaky`.
    #[arg(long, value_name = "PATH", conflicts_with = "check")]
    pub record: Option<PathBuf>,
    /// With --record: how many times to run the matrix.
    #[arg(long, default_value_t = 3, value_parser = clap::value_parser!(u32).range(1..), requires = "record")]
    pub repeats: u32,
}

#[derive(Debug, clap::Args)]
pub struct ReportArgs {
    /// The JSON report (from `run --json` or `merge --json`).
    pub report: PathBuf,
    #[command(flatten)]
    pub out: OutputArgs,
}

#[derive(Debug, clap::Args)]
pub struct MergeArgs {
    /// The partial reports (JSON, from `run --partition K/N --json PATH`), in any order.
    #[arg(required = true)]
    pub reports: Vec<PathBuf>,
    #[command(flatten)]
    pub out: OutputArgs,
}

fn parse_worker(s: &str) -> Result<(crate::case::Backend, PathBuf), String> {
    let (b, p) = s.split_once('=').ok_or_else(|| {
        format!("`{s}`: expected BACKEND=PATH, e.g. tch=/opt/peft-compat-worker-tch")
    })?;
    Ok((b.parse()?, PathBuf::from(p)))
}

/// `512M`, `16G`, `1.5T`, `1000000` (bytes); powers of 1024.
pub fn parse_size(s: &str) -> Result<f64, String> {
    let t = s.trim();
    let (num, mult) = match t.char_indices().last() {
        Some((i, c)) if c.is_ascii_alphabetic() => {
            let m = match c.to_ascii_uppercase() {
                'K' => 1024f64,
                'M' => 1024f64.powi(2),
                'G' => 1024f64.powi(3),
                'T' => 1024f64.powi(4),
                _ => return Err(format!("`{s}`: unknown unit; use K, M, G or T, e.g. 16G")),
            };
            (&t[..i], m)
        }
        _ => (t, 1.0),
    };
    let v: f64 = num
        .trim()
        .parse()
        .map_err(|_| format!("`{s}`: expected a size such as 512M, 16G or 1.5T"))?;
    if !(v.is_finite() && v > 0.0) {
        return Err(format!("`{s}`: a size must be positive"));
    }
    Ok(v * mult)
}

/// An error with the exit code it maps to.
#[derive(Debug)]
pub struct Failure {
    pub code: i32,
    pub error: anyhow::Error,
}

fn bad_input(e: impl Into<anyhow::Error>) -> Failure {
    Failure {
        code: exit::BAD_INPUT,
        error: e.into(),
    }
}

fn runtime(e: impl Into<anyhow::Error>) -> Failure {
    Failure {
        code: exit::RUNTIME,
        error: e.into(),
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

/// Print to stdout; a reader that went away (`| head`) ends the output quietly.
fn print_out(text: &str) -> Result<(), Failure> {
    let mut out = std::io::stdout().lock();
    match out.write_all(text.as_bytes()).and_then(|_| out.flush()) {
        Ok(()) => Ok(()),
        Err(e) if e.kind() == std::io::ErrorKind::BrokenPipe => Ok(()),
        Err(e) => Err(runtime(e)),
    }
}

pub fn run(cli: Cli) -> Result<(), Failure> {
    match cli.command {
        Command::Run(args) => run_matrix(*args),
        Command::Merge(args) => merge(*args),
        Command::Report(args) => {
            let report = read_report(&args.report)?;
            let code = emit(&report, &args.out, &PathBuf::from(&report.matrix))?;
            exit_with(code, &report.matrix)
        }
        Command::Compare {
            reports,
            label,
            max_differences,
        } => {
            let mut labeled = Vec::new();
            for (i, p) in reports.iter().enumerate() {
                labeled.push(crate::compare::Labeled {
                    label: label
                        .get(i)
                        .cloned()
                        .unwrap_or_else(|| p.display().to_string()),
                    report: read_report(p)?,
                });
            }
            let c = crate::compare::compare(&labeled, false);
            print_out(&c.render_text(max_differences))
        }
        Command::List { matrix, max_cases } => {
            let m = Matrix::load(&matrix, max_cases).map_err(bad_input)?;
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
        Command::Env {
            no_backends,
            worker,
        } => {
            let env = if no_backends {
                Environment::detect(BTreeMap::new(), None)
            } else {
                let pairs: Vec<_> = crate::case::Backend::ALL
                    .iter()
                    .map(|&b| (b, crate::case::Device::Cpu))
                    .collect();
                let workers = Workers::start(worker_paths(&worker), &pairs, 1, 1);
                Environment::of_workers(&workers.info)
            };
            print_out(&format!(
                "{}\n",
                serde_json::to_string_pretty(&env).expect("serializable")
            ))
        }
    }
}

fn worker_paths(list: &[(crate::case::Backend, PathBuf)]) -> WorkerPaths {
    WorkerPaths {
        overrides: list.iter().cloned().collect(),
    }
}

/// Ctrl-C once: stop starting cases, keep what finished, print the partial table. Twice: leave now.
fn install_interrupt(stop: Arc<AtomicBool>) {
    let _ = ctrlc::set_handler(move || {
        if stop.swap(true, Ordering::SeqCst) {
            std::process::exit(exit::INTERRUPTED);
        }
        eprintln!("\npeft-compat: interrupted; stopping (Ctrl-C again to leave at once)");
    });
}

fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

fn run_matrix(args: RunArgs) -> Result<(), Failure> {
    if let (Some(p), true) = (&args.partition, args.out.check) {
        return Err(bad_input(anyhow::anyhow!(
            "--check on partition {p}: gate the merged report instead \
             (`peft-compat merge PARTS... --check`); a part alone would call the others missing"
        )));
    }
    let mut matrix = Matrix::load(&args.matrix, args.max_cases).map_err(bad_input)?;
    let matrix_name = args.matrix.display().to_string();
    let matrix_text = std::fs::read_to_string(&args.matrix).unwrap_or_default();

    // Selection: --filter, then --partition, over the matrix's expansion.
    let mut selected: Vec<usize> = (0..matrix.cases.len())
        .filter(|&i| {
            args.filter.is_empty()
                || args
                    .filter
                    .iter()
                    .any(|f| matrix.cases[i].id().contains(f.as_str()))
        })
        .collect();
    if selected.is_empty() {
        return Err(bad_input(anyhow::anyhow!(
            "no case id of {} contains any of {:?}; `peft-compat list {}` shows the ids",
            args.matrix.display(),
            args.filter,
            args.matrix.display()
        )));
    }
    let selected_before_partition = selected.len();
    if let Some(p) = &args.partition {
        selected = selected
            .iter()
            .enumerate()
            .filter(|(pos, &i)| p.contains(*pos, &matrix.cases[i].id()))
            .map(|(_, &i)| i)
            .collect();
    }
    let selection = format!(
        "filter={:?} partition={}",
        args.filter,
        args.partition.map_or("-".to_string(), |p| p.to_string())
    );

    // The results stream, and what it already holds when resuming.
    let stream_path = args
        .results
        .clone()
        .unwrap_or_else(|| stream::default_path(args.out.json.as_deref(), &args.matrix));
    let header = stream::Header::new(
        &matrix_name,
        &matrix_text,
        matrix.seed,
        selection,
        selected.len(),
    );
    let mut finished: Vec<CaseReport> = Vec::new();
    let mut writer = if args.resume {
        let (was, cases) = stream::read(&stream_path).map_err(bad_input)?;
        stream::check_resumable(&stream_path, &was, &header).map_err(bad_input)?;
        let wanted: BTreeSet<usize> = selected.iter().copied().collect();
        let mut seen = BTreeSet::new();
        for c in cases {
            let same = wanted.contains(&c.index) && matrix.cases[c.index].id() == c.id;
            if same && seen.insert(c.index) {
                finished.push(c);
            }
        }
        selected.retain(|i| !seen.contains(i));
        stream::Writer::append(&stream_path).map_err(runtime)?
    } else {
        stream::Writer::create(&stream_path, &header).map_err(runtime)?
    };

    let cores = cores();
    let jobs = args.jobs.map_or(cores, |j| j as usize);
    let threads = args.threads.map_or((cores / jobs).max(1), |t| t as usize);
    let mut pairs: Vec<_> = selected
        .iter()
        .map(|&i| (matrix.cases[i].backend, matrix.cases[i].device))
        .collect();
    pairs.sort();
    pairs.dedup();
    let workers = Workers::start(worker_paths(&args.worker), &pairs, jobs, threads);
    let env = Environment::of_workers(&workers.info);

    let stop = Arc::new(AtomicBool::new(false));
    install_interrupt(Arc::clone(&stop));
    let opts = RunOptions {
        dump_dir: args.dump.clone(),
        timeout: Duration::from_secs_f64(args.timeout.max(0.001)),
        limits: Limits {
            host: args.max_memory.or_else(guard::available_host_memory),
            device: args.max_device_memory.or_else(guard::device_memory),
        },
        stop: Arc::clone(&stop),
    };
    let runs = if args.record.is_some() {
        args.repeats as usize
    } else {
        1
    };
    let style = if args.out.quiet {
        Style::Quiet
    } else if std::io::stderr().is_terminal() {
        Style::Bar
    } else {
        Style::Plain
    };
    let mut progress = Progress::new(style);
    let mut stream_error = None;
    let mut reports = Vec::with_capacity(runs);
    let mut interrupted = false;
    for run in 0..runs {
        if runs > 1 {
            progress.set_prefix(format!("run {}/{runs}: ", run + 1));
        }
        let done = runner::run(
            &matrix,
            Some(&selected),
            &workers as &dyn Backends,
            &opts,
            &mut |e| {
                progress.event(&e);
                if let (Event::CaseFinished { result }, 0) = (&e, run) {
                    if stream_error.is_none() {
                        stream_error = writer.case(&CaseReport::from_result(result)).err();
                    }
                }
            },
        );
        let mut cases: Vec<CaseReport> = if run + 1 == runs {
            std::mem::take(&mut finished)
        } else {
            finished.clone()
        };
        cases.extend(
            done.results
                .into_iter()
                .map(|r| CaseReport::from_result(&r)),
        );
        cases.sort_by_key(|c| c.index);
        reports.push(
            Report::from_cases(
                &matrix_name,
                matrix.seed,
                env.clone(),
                cases,
                done.elapsed.as_secs_f64(),
            )
            .with_expectations(&matrix.expectations),
        );
        if done.interrupted {
            interrupted = true;
            break;
        }
    }
    drop(workers);
    if let Some(e) = stream_error {
        eprintln!("warning: {e}");
    }
    if let (Some(p), Some(last)) = (args.partition, reports.last_mut()) {
        last.partition = Some(crate::report::PartitionInfo {
            spec: p.to_string(),
            selected: selected_before_partition,
            filter: args.filter.clone(),
        });
    }
    let report = reports.last().expect("at least one run");

    if interrupted {
        if !args.out.quiet {
            print_out(&table::render_text(
                report,
                use_color(args.out.color),
                args.out.max_findings,
            ))?;
        }
        eprintln!(
            "interrupted: {} of {} cases finished, each kept in {}; \
             `peft-compat run {} --resume` (with the same flags) runs the rest",
            report.cases.len(),
            header.total,
            stream_path.display(),
            matrix_name
        );
        return Err(Failure {
            code: exit::INTERRUPTED,
            error: anyhow::anyhow!("interrupted"),
        });
    }
    for c in report.cases.iter().filter(|c| c.dump_error.is_some()) {
        eprintln!(
            "warning: {}: {}",
            c.id,
            c.dump_error.as_deref().unwrap_or("")
        );
    }
    let code = emit(report, &args.out, &args.matrix)?;
    if let Some(path) = &args.record {
        matrix
            .cases
            .retain(|c| report.cases.iter().any(|r| r.id == c.id()));
        let recorded = record::record(&matrix, &reports);
        write(
            path,
            "the recorded expectations",
            recorded.to_yaml(&matrix_name, &env),
        )?;
        print_out(&format!(
            "{}\n",
            record::summary(&recorded, &path.display().to_string())
        ))?;
    }
    exit_with(code, &matrix_name)
}

fn exit_with(code: i32, matrix: &str) -> Result<(), Failure> {
    if code == exit::OK {
        Ok(())
    } else {
        Err(Failure {
            code,
            error: anyhow::anyhow!("the gate failed for {matrix}"),
        })
    }
}

fn write(path: &Path, what: &str, text: String) -> Result<(), Failure> {
    std::fs::write(path, text)
        .with_context(|| format!("cannot write {what} to {}", path.display()))
        .map_err(runtime)
}

/// Print and write a finished report (table, gate, JSON, Markdown, JUnit, snapshot); returns
/// the exit code the gate asks for.
fn emit(report: &Report, out: &OutputArgs, matrix_path: &Path) -> Result<i32, Failure> {
    let matrix_name = report.matrix.as_str();
    if !out.quiet {
        print_out(&table::render_text(
            report,
            use_color(out.color),
            out.max_findings,
        ))?;
    }
    let verdict = if out.check {
        Some(gate_check(out, matrix_path, matrix_name, report)?)
    } else {
        None
    };
    if let Some(path) = &out.json {
        write(path, "the JSON report", report.to_json())?;
    }
    if let Some(path) = &out.markdown {
        let gate = verdict.as_ref().map(|v| (v, matrix_name));
        write(
            path,
            "the Markdown summary",
            table::render_markdown(report, gate),
        )?;
    }
    if let Some(path) = &out.junit {
        write(
            path,
            "the JUnit file",
            junit::render(report, verdict.as_ref()),
        )?;
    }
    if let Some(path) = &out.snapshot_out {
        if snapshot::in_ci() {
            return Err(bad_input(anyhow::anyhow!(
                "--snapshot-out: CI is set, and snapshots are never written under CI"
            )));
        }
        write(
            path,
            "the snapshot",
            snapshot::to_text(&snapshot::from_report(report)),
        )?;
    }
    Ok(verdict.as_ref().map_or(exit::OK, gate_exit_code))
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
fn gate_check(
    out: &OutputArgs,
    matrix_path: &Path,
    matrix: &str,
    report: &Report,
) -> Result<gate::Verdict, Failure> {
    if let Some(p) = &report.partition {
        return Err(bad_input(anyhow::anyhow!(
            "--check on partition {} of {matrix}: gate the merged report instead",
            p.spec
        )));
    }
    let path = out
        .snapshot
        .clone()
        .unwrap_or_else(|| snapshot::default_path(matrix_path));
    let (accepted, missing) = match snapshot::read(&path) {
        Ok(s) => (s, None),
        Err(e @ snapshot::SnapshotError::Missing(_)) => (snapshot::Snapshot::new(), Some(e)),
        Err(e) => return Err(bad_input(e)),
    };
    let verdict = gate::check_with(report, &accepted, out.allow_improvements, out.allow_new);
    match &missing {
        // Every case would be listed as missing; say it once.
        Some(e) => print_out(&format!("gate FAILED: {e}\n"))?,
        None => print_out(&verdict.render(matrix))?,
    }
    let observed = snapshot::observed(report, &accepted);
    // When something changed and the snapshot would change with it (a broken expectation alone
    // has nothing to accept; noise within the drift rules is not a change).
    if missing.is_some() || (!verdict.changes.is_empty() && observed != accepted) {
        if snapshot::in_ci() {
            print_out("(CI is set: no snapshot written)\n")?;
        } else {
            let pending = snapshot::write_pending(&path, matrix, &observed).map_err(runtime)?;
            print_out(&format!(
                "observed snapshot written to {}\n",
                pending.display()
            ))?;
        }
    }
    Ok(verdict)
}

fn read_report(p: &Path) -> Result<Report, Failure> {
    let text = std::fs::read_to_string(p)
        .with_context(|| format!("cannot read {}", p.display()))
        .map_err(bad_input)?;
    serde_json::from_str(&text)
        .with_context(|| format!("{} is not a peft-compat JSON report", p.display()))
        .map_err(bad_input)
}

/// `merge`: partial reports -> the single-job report.
fn merge(args: MergeArgs) -> Result<(), Failure> {
    let mut parts = Vec::new();
    for p in &args.reports {
        parts.push((p.display().to_string(), read_report(p)?));
    }
    let report = crate::report::merge(parts).map_err(bad_input)?;
    let matrix_path = PathBuf::from(&report.matrix);
    let code = emit(&report, &args.out, &matrix_path)?;
    exit_with(code, &report.matrix)
}
