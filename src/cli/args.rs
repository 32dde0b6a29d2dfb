//! The command line as clap parses it: every flag and subcommand, with its help. What the
//! flags become (the run plan) is `plan`'s business; here they are only parsed and checked
//! one by one.

use crate::case::Backend;
use crate::exec::DEFAULT_TIMEOUT;
use crate::spec::select::Partition;
use clap::{Parser, Subcommand, ValueEnum};
use std::path::PathBuf;

pub const AFTER_HELP: &str = "\
Exit codes:
  0    the run completed; failing cases are findings, reported in the table and JSON
       (with --check: the gate passed)
  1    --check: the gate failed; each changed case is listed once with before -> after
  2    bad input: the matrix file (the message names file:line:column and the fix) or the flags
  3    an output could not be written (the JSON, Markdown or JUnit file, the results stream,
       a dump): every other output is still written; the gate's 1 takes precedence
  4    a backend that should run could not (its worker is missing, broken, or hung at start):
       its cases are listed as lost; --skip-backend BACKEND declares one not expected here
       (with --check this fails the gate: 1)
  130  interrupted (Ctrl-C, or SIGTERM as CI cancellation and `timeout` send): every finished
       case is in the results stream; --resume continues

Environment:
  NO_COLOR   set to disable colours (as does --color never)
  CI         set: never write snapshots (not even .snap.new)
  PEFT_COMPAT_SKIP_LIBTORCH_2_1=1   same as --skip-backend tch@2.1.2

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
        /// Add each report's worst error, in units of roundoff, to its part of every cell.
        #[arg(long)]
        units: bool,
        /// Write the comparison as one self-contained HTML page to PATH: the builds side by
        /// side, differing cells marked, every report's cases a click away.
        #[arg(long, value_name = "PATH")]
        html: Option<PathBuf>,
    },
    /// Follow each cell across the builds of one library in version order (libtorch builds,
    /// PEFT builds), naming the first release where its outcome, error or error size changed.
    History {
        /// One or more JSON reports (a sweep, or runs of several builds).
        #[arg(required = true, num_args = 1..)]
        reports: Vec<PathBuf>,
        /// List every cell, not only those that changed.
        #[arg(long)]
        all: bool,
        /// Print Markdown tables.
        #[arg(long)]
        markdown: bool,
        /// Add each build's worst error, in units of roundoff, to its cell.
        #[arg(long)]
        units: bool,
        /// Only the cells whose id contains one of these substrings (repeatable).
        #[arg(long)]
        filter: Vec<String>,
        /// Write the history as JSON to PATH (schema peft-compat/history/v1).
        #[arg(long, value_name = "PATH")]
        json: Option<PathBuf>,
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
        worker: Vec<(Backend, PathBuf)>,
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
    /// Gate: compare with the accepted snapshot (snapshots/STEM.snap, STEM the matrix file's name without .yaml) and the matrix's
    /// expectations, and exit 1 on any regression, unexpected success, missing or orphan entry.
    /// Outside CI, a failed gate writes the observed snapshot as .snap.new for `cargo insta
    /// review`.
    #[arg(long)]
    pub check: bool,
    /// The snapshot to check against [default: snapshots/STEM.snap, STEM the matrix file's name without .yaml].
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
    /// Write the report as one self-contained HTML page to PATH (no network request: styles,
    /// script and data inline): the support grid, each cell's cases a click away, the precision
    /// picture, filters by axis value.
    #[arg(long, value_name = "PATH")]
    pub html: Option<PathBuf>,
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
    /// Cases run at once, each in its own worker process, 1 to 256; never more than the cases
    /// to run [default: the number of cores].
    #[arg(long, short = 'j', value_name = "N", value_parser = clap::value_parser!(u32).range(1..=MAX_JOBS as i64))]
    pub jobs: Option<u32>,
    /// Intra-op threads per worker (libtorch, rayon), 1 to 256. The default does not follow -j:
    /// a multi-threaded GEMM sums in another order, so numbers (and snapshots) would depend on
    /// the flag and the machine; the report records the value used.
    #[arg(long, value_name = "N", default_value_t = 1, value_parser = clap::value_parser!(u32).range(1..=256))]
    pub threads: u32,
    /// A case still running after SECS is `timeout`: its worker is killed and replaced. Also
    /// the wait for a worker to start. From 0.01 to 86400 (a day).
    #[arg(long, value_name = "SECS", default_value_t = DEFAULT_TIMEOUT.as_secs_f64(), value_parser = parse_timeout)]
    pub timeout: f64,
    /// A backend not expected on this runner (repeatable), e.g. --skip-backend tch@2.1.2: its
    /// cases skip as `declared` instead of failing the run when its worker is missing or
    /// broken. PEFT_COMPAT_SKIP_LIBTORCH_2_1=1 declares tch@2.1.2.
    #[arg(long, value_name = "BACKEND", value_parser = |s: &str| s.parse::<Backend>())]
    pub skip_backend: Vec<Backend>,
    /// Refuse (skip, with the estimate) cases estimated to need more host memory than this
    /// [default: the memory available at start]. Accepts 512M, 16G, 1.5T or bytes.
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub max_memory: Option<f64>,
    /// Likewise for GPU memory [default: the GPU's memory, from nvidia-smi].
    #[arg(long, value_name = "SIZE", value_parser = parse_size)]
    pub max_device_memory: Option<f64>,
    /// The results stream (one JSON line per finished case, written as each finishes)
    /// [default: beside --json as .jsonl, else out/STEM.jsonl].
    #[arg(long, value_name = "PATH")]
    pub results: Option<PathBuf>,
    /// Continue an interrupted run from its results stream: only the cases not in it run, and
    /// the report is the one an uninterrupted run gives.
    #[arg(long, conflicts_with = "record")]
    pub resume: bool,
    /// A worker binary to use instead of the one beside peft-compat (repeatable),
    /// e.g. --worker tch=/opt/peft-compat-worker-tch.
    #[arg(long, value_name = "BACKEND=PATH", value_parser = parse_worker)]
    pub worker: Vec<(Backend, PathBuf)>,
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

/// The most `-j` allowed: each slot is a worker process per backend (libtorch loaded in each).
pub const MAX_JOBS: u32 = 256;
/// `--timeout`'s range, in seconds.
pub const TIMEOUT_RANGE: (f64, f64) = (0.01, 86_400.0);

/// `--timeout`: seconds, finite, within [`TIMEOUT_RANGE`].
pub fn parse_timeout(s: &str) -> Result<f64, String> {
    let (lo, hi) = TIMEOUT_RANGE;
    match s.trim().parse::<f64>() {
        Ok(v) if (lo..=hi).contains(&v) => Ok(v),
        _ => Err(format!(
            "`{s}`: expected seconds from {lo} to {hi} (a day), e.g. 600 or 0.5"
        )),
    }
}

pub fn parse_worker(s: &str) -> Result<(Backend, PathBuf), String> {
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
