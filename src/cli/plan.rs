//! `run`'s flags turned into a plan (ripgrep's low and high arguments): the matrix loaded, the
//! selection made, the results stream located (and, with `--resume`, read back), the job and
//! thread counts and the run options settled. Nothing runs here.

use super::args::RunArgs;
use super::{bad_input, worker_paths, Failure};
use crate::exec::guard::{self, Limits};
use crate::exec::{RunOptions, WorkerPaths};
use crate::report::stream::{self, Header};
use crate::report::CaseReport;
use crate::spec::select::{self, Selection};
use crate::spec::Matrix;
use std::path::PathBuf;
use std::sync::Arc;
use std::time::Duration;

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
    pub jobs: usize,
    pub threads: usize,
    pub workers: WorkerPaths,
    pub options: RunOptions,
    /// How many times the selection runs (`--record --repeats N`, else 1).
    pub runs: usize,
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
    let matrix = Matrix::load(&args.matrix, args.max_cases).map_err(bad_input)?;
    let selection = select::select(&matrix, &args.filter, args.partition).map_err(bad_input)?;
    let stream_path = args
        .results
        .clone()
        .unwrap_or_else(|| stream::default_path(args.out.json.as_deref(), &args.matrix));
    let header = Header::new(&matrix, selection.label.clone(), selection.indices.len());
    let (finished, to_run) = if args.resume {
        let r = stream::resume(&stream_path, &header, &matrix, &selection.indices)
            .map_err(bad_input)?;
        (r.finished, r.remaining)
    } else {
        (Vec::new(), selection.indices.clone())
    };
    let cores = cores();
    let jobs = args.jobs.map_or(cores, |j| j as usize);
    let threads = args.threads.map_or((cores / jobs).max(1), |t| t as usize);
    let options = RunOptions {
        dump_dir: args.dump.clone(),
        timeout: Duration::from_secs_f64(args.timeout.max(0.001)),
        limits: Limits {
            host: args.max_memory.or_else(guard::available_host_memory),
            device: args.max_device_memory.or_else(guard::device_memory),
        },
        stop: Arc::default(),
    };
    Ok(RunPlan {
        name: args.matrix.display().to_string(),
        matrix,
        selection,
        to_run,
        finished,
        stream_path,
        header,
        jobs,
        threads,
        workers: worker_paths(&args.worker),
        options,
        runs: if args.record.is_some() {
            args.repeats as usize
        } else {
            1
        },
    })
}
