//! Runs cases and emits events; never prints. Reporters (progress, the results stream, the
//! table) only see the events and the results.
//!
//! A run: every case is first planned (skipped here because its backend or device is absent,
//! or refused by the resource [`guard`](mod@super::guard)), then the cases to run are dispatched to
//! `jobs` slots, each with its own [`Executor`] (a set of worker processes). Dispatch is grouped
//! by inputs (shape, dtype, adapter, op) so each group's inputs and reference are computed once
//! and dropped when the group is done ([`super::cache`]); results are reported in matrix order whatever
//! the order of completion, so `-j 1` and `-j 8` give the same report.

use super::cache::Cache;
use super::dump;
use super::executor::{Backends, Execution, Executor, InProcess};
use super::guard::{self, Limits};
use super::twins::Twins;
use crate::case::{Case, Op};
use crate::outcome::{Agreement, Outcome, Skip, SkipKind, Tolerance};
use crate::spec::Matrix;
use crate::truth::judge::{judge_files, judged_dtype, unmoved};
use crate::worker::io::{names, Inputs, Outputs};
use std::collections::{HashMap, HashSet, VecDeque};
use std::path::PathBuf;
use std::sync::atomic::{AtomicBool, Ordering};
use std::sync::{mpsc, Arc, Mutex};
use std::time::{Duration, Instant};

/// The default `--timeout`: generous for an LLM-sized case on a slow CPU, short enough that a
/// hung CI job still ends with a report.
pub const DEFAULT_TIMEOUT: Duration = Duration::from_secs(600);

/// One case's result: everything the report needs.
#[derive(Debug, Clone)]
pub struct CaseResult {
    /// Position in the matrix (reports are in this order).
    pub index: usize,
    pub case: Case,
    pub outcome: Outcome,
    /// The tolerance the case was judged with (also when it did not get as far as judging).
    pub tolerance: Tolerance,
    /// Wall time from dispatch to verdict.
    pub duration: Duration,
    /// Time the backend itself spent computing (from the worker); `None` when it did not run.
    pub compute: Option<Duration>,
    /// Why `--dump` could not write this case's file, if it could not.
    pub dump_error: Option<String>,
    /// A PEFT case's distance to its tch twin ([`super::twins`]).
    pub agreement: Option<Agreement>,
    /// The outputs, while the dispatcher pairs twins; taken before the result is reported.
    pub outputs: Option<Outputs>,
    /// A checkpoint layer's case: how many of the stored weight's values the case dtype
    /// rounded (0: the backends ran on the checkpoint's very values).
    pub weight_rounded: Option<usize>,
}

impl CaseResult {
    /// A case that never reached the judge (skipped, or crashed before its outputs could be
    /// judged): its outcome and the tolerance it would have been judged with, nothing else.
    fn unjudged(
        index: usize,
        matrix: &Matrix,
        outcome: Outcome,
        duration: Duration,
        weight_rounded: Option<usize>,
    ) -> CaseResult {
        let case = &matrix.cases[index];
        let (factor, rel) = matrix.tolerance_for(case);
        CaseResult {
            index,
            case: case.clone(),
            outcome,
            tolerance: Tolerance::for_case(case, 1.0, factor, rel),
            duration,
            compute: None,
            dump_error: None,
            agreement: None,
            outputs: None,
            weight_rounded,
        }
    }
}

/// What the runner tells its observers.
#[derive(Debug)]
pub enum Event<'a> {
    RunStarted {
        /// Cases in this run (skipped ones included).
        total: usize,
    },
    CaseStarted {
        index: usize,
        case: &'a Case,
    },
    CaseFinished {
        result: &'a CaseResult,
    },
    RunFinished {
        elapsed: Duration,
        /// True when the run was stopped before every case finished.
        interrupted: bool,
    },
}

/// Knobs for one run.
#[derive(Debug, Clone)]
pub struct RunOptions {
    /// Write one safetensors file per case here.
    pub dump_dir: Option<PathBuf>,
    /// A case that takes longer is `timeout` (its worker is killed and replaced).
    pub timeout: Duration,
    /// The resource guard's limits.
    pub limits: Limits,
    /// Set (e.g. by Ctrl-C) to stop: no new case starts, cases in flight are abandoned and
    /// not reported.
    pub stop: Arc<AtomicBool>,
}

impl Default for RunOptions {
    fn default() -> Self {
        RunOptions {
            dump_dir: None,
            timeout: DEFAULT_TIMEOUT,
            limits: Limits::default(),
            stop: Arc::default(),
        }
    }
}

/// What a run produced.
#[derive(Debug)]
pub struct Run {
    /// The finished cases, in matrix order.
    pub results: Vec<CaseResult>,
    pub elapsed: Duration,
    pub interrupted: bool,
}

enum Msg {
    Started(usize),
    Finished(Box<CaseResult>),
}

/// Run the cases of `matrix` at `indices` (every case when `None`) on `backends`, keeping
/// every result (in matrix order): [`run_streaming`] for callers that take each case as it
/// finishes.
pub fn run(
    matrix: &Matrix,
    indices: Option<&[usize]>,
    backends: &dyn Backends,
    opts: &RunOptions,
    on_event: &mut dyn FnMut(Event),
) -> Run {
    let mut results: Vec<CaseResult> = Vec::new();
    let (elapsed, interrupted) = run_streaming(matrix, indices, backends, opts, &mut |e| {
        if let Event::CaseFinished { result } = &e {
            results.push((*result).clone());
        }
        on_event(e);
    });
    results.sort_by_key(|r| r.index);
    Run {
        results,
        elapsed,
        interrupted,
    }
}

/// Plan, then dispatch what can run, handing each case to `on_event` as it finishes and
/// keeping nothing (a long run's memory stays flat); returns the elapsed time and whether the
/// run was stopped before every case finished.
pub fn run_streaming(
    matrix: &Matrix,
    indices: Option<&[usize]>,
    backends: &dyn Backends,
    opts: &RunOptions,
    on_event: &mut dyn FnMut(Event),
) -> (Duration, bool) {
    let started = Instant::now();
    let all: Vec<usize>;
    let indices = match indices {
        Some(i) => i,
        None => {
            all = (0..matrix.cases.len()).collect();
            &all
        }
    };
    on_event(Event::RunStarted {
        total: indices.len(),
    });
    let Plan { skipped, to_run } = plan(matrix, indices, backends, opts);
    let mut finished = skipped.len();
    for r in skipped {
        on_event(Event::CaseFinished { result: &r });
    }
    finished += dispatch(matrix, to_run, backends, opts, on_event);
    let interrupted = finished < indices.len();
    let elapsed = started.elapsed();
    on_event(Event::RunFinished {
        elapsed,
        interrupted,
    });
    (elapsed, interrupted)
}

/// What a run does with each selected case before any worker sees it.
struct Plan {
    /// Cases that cannot run here, with why.
    skipped: Vec<CaseResult>,
    /// Cases to run, in dispatch order: grouped by inputs, shapes in matrix order, so each
    /// group's cache entry lives briefly.
    to_run: Vec<usize>,
}

/// Decide what cannot run here before anything is allocated for it: where the device or
/// backend is absent, that is why (and whole groups skip for one reason); PEFT's own refusals
/// (f64 PiSSA/OLoRA) and the resource guard come next.
fn plan(matrix: &Matrix, indices: &[usize], backends: &dyn Backends, opts: &RunOptions) -> Plan {
    let mut skipped = Vec::new();
    let mut to_run = Vec::new();
    for &i in indices {
        let case = &matrix.cases[i];
        let why = backends
            .unavailable(case.point.backend, case.point.device)
            .or_else(|| {
                case.refused_by_peft()
                    .map(str::to_string)
                    .or_else(|| case.beyond_build())
                    .or_else(|| {
                        matrix
                            .weights
                            .layer(&case.shape.name)
                            .and_then(|l| l.unreadable.clone())
                    })
                    .map(|r| Skip::new(SkipKind::NotApplicable, r))
            })
            .or_else(|| guard::refuse(case, &opts.limits).map(|r| Skip::new(SkipKind::Absent, r)));
        match why {
            Some(reason) => skipped.push(CaseResult::unjudged(
                i,
                matrix,
                Outcome::Skipped(reason),
                Duration::ZERO,
                None,
            )),
            None => to_run.push(i),
        }
    }
    let mut shape_rank: HashMap<&str, usize> = HashMap::new();
    for c in &matrix.cases {
        let n = shape_rank.len();
        shape_rank.entry(c.shape.name.as_str()).or_insert(n);
    }
    to_run.sort_by_key(|&i| {
        let c = &matrix.cases[i];
        (
            shape_rank[c.shape.name.as_str()],
            c.point.dtype,
            c.point.adapter,
            c.point.op,
            i,
        )
    });
    Plan { skipped, to_run }
}

/// Run `to_run` on `backends.jobs()` slots, each with its own executor, reporting each
/// finished case in a `CaseFinished` event; returns how many finished. Stops taking cases when
/// `opts.stop` is set.
fn dispatch(
    matrix: &Matrix,
    to_run: Vec<usize>,
    backends: &dyn Backends,
    opts: &RunOptions,
    on_event: &mut dyn FnMut(Event),
) -> usize {
    let mut done = 0;
    let mut twins = Twins::new(matrix, &to_run);
    let twinned = &twins.cases();
    let cache = Cache::new(
        matrix.seed,
        &matrix.weights,
        to_run.iter().map(|&i| &matrix.cases[i]),
    );
    let queue = Mutex::new(to_run.into_iter().collect::<VecDeque<usize>>());
    let jobs = backends.jobs().max(1);
    let (tx, rx) = mpsc::channel::<Msg>();
    std::thread::scope(|s| {
        let (queue, cache) = (&queue, &cache);
        let work = |slot: usize, tx: mpsc::Sender<Msg>| {
            let mut exec = backends.executor(slot);
            loop {
                if opts.stop.load(Ordering::Relaxed) {
                    break;
                }
                let next = queue.lock().unwrap_or_else(|p| p.into_inner()).pop_front();
                let Some(i) = next else { break };
                if tx.send(Msg::Started(i)).is_err() {
                    break;
                }
                let r = run_one(i, matrix, cache, exec.as_mut(), opts, twinned);
                cache.release(&matrix.cases[i]);
                let Some(r) = r else { break };
                if tx.send(Msg::Finished(Box::new(r))).is_err() {
                    break;
                }
            }
        };
        for slot in 0..jobs {
            let sender = tx.clone();
            let spawned = std::thread::Builder::new()
                .name(format!("slot-{slot}"))
                .spawn_scoped(s, move || work(slot, sender));
            if spawned.is_err() {
                // Out of threads: the slots that started take every case; with none, this
                // thread does (the channel keeps the events until the loop below reads them).
                if slot == 0 {
                    work(0, tx.clone());
                }
                break;
            }
        }
        drop(tx);
        for msg in rx {
            match msg {
                Msg::Started(i) => on_event(Event::CaseStarted {
                    index: i,
                    case: &matrix.cases[i],
                }),
                Msg::Finished(r) => {
                    for r in twins.finished(*r) {
                        on_event(Event::CaseFinished { result: &r });
                        done += 1;
                    }
                }
            }
        }
    });
    for r in twins.unpaired() {
        on_event(Event::CaseFinished { result: &r });
        done += 1;
    }
    done
}

/// Run one case: its inputs go to the executor, the reference is computed meanwhile, then the
/// outputs are judged. `None` when the run was stopped under it.
fn run_one(
    index: usize,
    matrix: &Matrix,
    cache: &Cache,
    exec: &mut dyn Executor,
    opts: &RunOptions,
    twinned: &HashSet<usize>,
) -> Option<CaseResult> {
    // The outputs are needed whole only to be dumped or compared with a twin's; else an
    // LLM-sized output is judged from its worker's file, never held beside its reference.
    let whole = opts.dump_dir.is_some() || twinned.contains(&index);
    let case = &matrix.cases[index];
    let t0 = Instant::now();
    let (factor, rel) = matrix.tolerance_for(case);
    let entry = cache.get(case);
    let prepared = match entry.as_ref() {
        Ok(p) => p,
        Err(why) => {
            // The checkpoint changed or vanished since the matrix loaded: this case cannot run.
            return Some(CaseResult::unjudged(
                index,
                matrix,
                Outcome::Crashed(format!("the checkpoint could not be read: {why}")),
                t0.elapsed(),
                None,
            ));
        }
    };
    let inputs = &prepared.inputs;
    let started = exec.start(case, inputs);
    let reference = prepared.reference();
    let execution = match started {
        Ok(()) => exec.finish(case, inputs, opts.timeout, &opts.stop, whole),
        Err(e) => e,
    };
    let (want, kappa) = match reference {
        Ok((want, kappa)) => (want, *kappa),
        Err(why) => {
            // The backend's answer cannot be judged; the worker has answered (or been replaced),
            // so the next case starts clean.
            if matches!(execution, Execution::Interrupted) {
                return None;
            }
            return Some(CaseResult::unjudged(
                index,
                matrix,
                Outcome::Crashed(format!("the f64 reference failed: {why}")),
                t0.elapsed(),
                prepared.weight_rounded,
            ));
        }
    };
    let tolerance = Tolerance::for_case(case, kappa, factor, rel);
    let (outcome, got, compute) = match execution {
        Execution::Ran {
            outputs,
            files,
            compute,
        } => {
            let dtype = judged_dtype(case);
            let judged = judge_files(&outputs, &files, want, tolerance, dtype);
            let judged = match case.point.op {
                Op::Step => unmoved(judged, &outputs, want, &step_before(inputs), dtype),
                _ => judged,
            };
            (judged, Some(outputs), Some(compute))
        }
        Execution::Refused(m) => (Outcome::Unsupported(m), None, None),
        Execution::Crashed(m) => (Outcome::Crashed(m), None, None),
        Execution::TimedOut(m) => (Outcome::Timeout(m), None, None),
        Execution::NotApplicable(m) => (
            Outcome::Skipped(Skip::new(SkipKind::NotApplicable, m)),
            None,
            None,
        ),
        Execution::Interrupted => return None,
    };
    let mut result = CaseResult {
        index,
        case: case.clone(),
        outcome,
        tolerance,
        duration: t0.elapsed(),
        compute,
        dump_error: None,
        agreement: None,
        outputs: None,
        weight_rounded: prepared.weight_rounded,
    };
    if let Some(dir) = &opts.dump_dir {
        let origin = matrix.weights.layer(&case.shape.name).map(|l| l.as_ref());
        result.dump_error = dump::write(
            dir,
            case,
            &result.outcome,
            inputs,
            got.as_ref(),
            want,
            origin,
        )
        .err()
        .map(|e| e.to_string());
    }
    result.outputs = got;
    Some(result)
}

/// Run every case of `matrix` in this process with `exec` (tests plant faults this way).
pub fn run_in_process(
    matrix: &Matrix,
    opts: &RunOptions,
    exec: &InProcess,
    on_event: &mut dyn FnMut(Event),
) -> Vec<CaseResult> {
    run(matrix, None, exec, opts, on_event).results
}

/// What each of the `step` op's outputs held before the step (see [`unmoved`]).
fn step_before(inp: &Inputs) -> Vec<(&'static str, &crate::worker::tensor::HostTensor)> {
    let mut v = vec![(names::STEP_A, &inp.lora_a), (names::STEP_B, &inp.lora_b)];
    v.extend(inp.magnitude.as_ref().map(|m| (names::MAGNITUDE, m)));
    v.extend(inp.lora_bias.as_ref().map(|b| (names::STEP_LORA_BIAS, b)));
    v
}
