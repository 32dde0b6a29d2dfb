//! `run`'s flags turned into a plan (ripgrep's low and high arguments): the matrix loaded, the
//! selection made, the results stream located (and, with `--resume`, read back), the job and
//! thread counts and the run options settled. Nothing runs here.

use super::args::RunArgs;
use super::{bad_input, worker_paths, Failure};
use crate::case::Backend;
use crate::environment::Environment;
use crate::exec::guard::{self, Limits};
use crate::exec::{Pool, RunOptions, WorkerPaths};
use crate::report::stream::{self, Header};
use crate::report::CaseReport;
use crate::spec::select::{self, Selection};
use crate::spec::Matrix;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};
use std::sync::Arc;
use std::time::Duration;

/// Where a resumed stream stands.
pub struct ResumeAt {
    /// The environment its header recorded (none in streams that predate it).
    pub environment: Option<Environment>,
    /// Its length up to the last complete line.
    pub complete: u64,
}

/// Everything a `run` needs, settled before any worker starts.
pub struct RunPlan {
    pub matrix: Matrix,
    /// The matrix path as the user gave it (reports and messages name it so).
    pub name: String,
    pub selection: Selection,
    /// The selected cases still to run (all of them, unless resuming).
    pub to_run: Vec<usize>,
    /// Cases a resumed stream already holds.
    pub finished: Vec<CaseReport>,
    pub stream_path: PathBuf,
    pub header: Header,
    /// Held while the run writes the stream.
    pub lock: Option<stream::Lock>,
    /// `--resume`: where the stream's run stood.
    pub resumed: Option<ResumeAt>,
    pub workers: WorkerPaths,
    /// Slots, threads, the start-up wait, the backends not expected here.
    pub pool: Pool,
    pub options: RunOptions,
    /// How many times the selection runs (`--record --repeats N`, else 1).
    pub runs: usize,
}

/// The backends declared not expected here, with where that was said: `--skip-backend`, and
/// the environment variables the provisioning scripts' opt-outs honour
/// (`PEFT_COMPAT_SKIP_LIBTORCH_2_1`: tch@2.1.2; `PEFT_COMPAT_SKIP_PEFT_BUILDS`: every PEFT build
/// of `builds` but the pinned `peft`).
pub fn not_expected(flags: &[Backend], builds: &[Backend]) -> BTreeMap<Backend, String> {
    let mut m: BTreeMap<Backend, String> = flags
        .iter()
        .map(|&b| (b, format!("--skip-backend {b}")))
        .collect();
    let set = |var: &str| std::env::var(var).is_ok_and(|v| !v.is_empty() && v != "0");
    if set("PEFT_COMPAT_SKIP_LIBTORCH_2_1") {
        m.entry(Backend::TCH_2_1_2)
            .or_insert_with(|| "PEFT_COMPAT_SKIP_LIBTORCH_2_1 is set".to_string());
    }
    if set("PEFT_COMPAT_SKIP_PEFT_BUILDS") {
        for &b in builds {
            if b.peft()
                .is_some_and(|p| p != crate::case::PeftBuild::PINNED)
            {
                m.entry(b)
                    .or_insert_with(|| "PEFT_COMPAT_SKIP_PEFT_BUILDS is set".to_string());
            }
        }
    }
    m
}

/// `--dump DIR` must be a folder this run can write, before any case runs (else every case
/// would warn, and the dumps asked for would not exist).
fn check_dump_dir(dir: &Path) -> anyhow::Result<()> {
    let probe = dir.join(format!(".peft-compat-probe-{}", std::process::id()));
    std::fs::create_dir_all(dir)
        .and_then(|_| std::fs::write(&probe, b""))
        .and_then(|_| std::fs::remove_file(&probe))
        .map_err(|e| anyhow::anyhow!("--dump {}: cannot write there: {e}", dir.display()))
}

fn cores() -> usize {
    std::thread::available_parallelism().map_or(1, |n| n.get())
}

/// Check `run`'s flags against each other, load the matrix, select its cases and settle how
/// they run.
pub fn plan(args: &RunArgs) -> Result<RunPlan, Failure> {
    if let (Some(p), true) = (&args.partition, args.out.check) {
        return Err(bad_input(anyhow::anyhow!(
            "--check on partition {p}: gate the merged report instead \
             (`peft-compat merge PARTS... --check`); a part alone would call the others missing"
        )));
    }
    if let Some(dir) = &args.dump {
        check_dump_dir(dir).map_err(bad_input)?;
    }
    let matrix = Matrix::load(&args.matrix, args.max_cases).map_err(bad_input)?;
    let selection = select::select(&matrix, &args.filter, args.partition).map_err(bad_input)?;
    let stream_path = args
        .results
        .clone()
        .unwrap_or_else(|| stream::default_path(args.out.json.as_deref(), &args.matrix));
    let header = Header::new(
        &matrix,
        selection.label.clone(),
        selection.indices.len(),
        args.threads as usize,
    );
    // Before the stream is read or truncated: one writer at a time.
    let lock = stream::Lock::acquire(&stream_path).map_err(bad_input)?;
    let (finished, to_run, resumed) = if args.resume {
        let r = stream::resume(&stream_path, &header, &matrix, &selection.indices)
            .map_err(bad_input)?;
        let at = ResumeAt {
            environment: r.environment,
            complete: r.complete,
        };
        (r.finished, r.remaining, Some(at))
    } else {
        (Vec::new(), selection.indices.clone(), None)
    };
    // A slot per case at most: more would start workers that never get one.
    let jobs = args
        .jobs
        .map_or(cores(), |j| j as usize)
        .min(to_run.len())
        .max(1);
    let options = RunOptions {
        dump_dir: args.dump.clone(),
        timeout: Duration::from_secs_f64(args.timeout),
        limits: Limits {
            host: args.max_memory.or_else(guard::available_host_memory),
            device: args.max_device_memory.or_else(guard::device_memory),
        },
        stop: Arc::default(),
    };
    let mut builds: Vec<Backend> = matrix.cases.iter().map(|c| c.point.backend).collect();
    builds.sort();
    builds.dedup();
    Ok(RunPlan {
        name: args.matrix.display().to_string(),
        matrix,
        selection,
        to_run,
        finished,
        stream_path,
        header,
        lock,
        resumed,
        workers: worker_paths(&args.worker),
        pool: Pool {
            jobs,
            threads: args.threads as usize,
            timeout: Duration::from_secs_f64(args.timeout),
            not_expected: not_expected(&args.skip_backend, &builds),
        },
        options,
        runs: if args.record.is_some() {
            args.repeats as usize
        } else {
            1
        },
    })
}
