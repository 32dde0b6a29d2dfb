//! Runs cases and emits events; never prints. Reporters (progress bar, table, JSON) only see
//! the events and the results.

use crate::adapter;
use crate::backend::{self, OpResult};
use crate::case::{Backend, Case};
use crate::dump;
use crate::inputs::{Draws, Inputs, Outputs};
use crate::judge::{judge, Outcome, Tolerance};
use crate::matrix::Matrix;
use crate::reference;
use std::collections::HashMap;
use std::panic::{catch_unwind, AssertUnwindSafe};
use std::path::PathBuf;
use std::time::{Duration, Instant};

/// One case's result: everything the report needs.
#[derive(Debug, Clone)]
pub struct CaseResult {
    pub case: Case,
    pub outcome: Outcome,
    /// The tolerance the case was judged with (also when it did not get as far as judging).
    pub tolerance: Tolerance,
    pub duration: Duration,
    /// Why `--dump` could not write this case's file, if it could not.
    pub dump_error: Option<String>,
}

/// What the runner tells its observers.
#[derive(Debug)]
pub enum Event<'a> {
    RunStarted {
        total: usize,
    },
    CaseStarted {
        index: usize,
        case: &'a Case,
    },
    CaseFinished {
        index: usize,
        result: &'a CaseResult,
    },
    RunFinished {
        results: &'a [CaseResult],
        elapsed: Duration,
    },
}

/// Knobs for one run.
#[derive(Debug, Clone, Default)]
pub struct RunOptions {
    /// Write one safetensors file per case here.
    pub dump_dir: Option<PathBuf>,
}

/// A way to run a case's math on some backend. The runner uses [`run_on_backend`]; tests swap
/// in deliberately broken kernels to prove the judge catches them.
pub type Executor<'a> = dyn Fn(&Case, &Inputs) -> OpResult<Outputs> + 'a;

/// Run `case` on its own backend and device.
pub fn run_on_backend(case: &Case, inp: &Inputs) -> OpResult<Outputs> {
    match case.backend {
        Backend::Tch => run_tch(case, inp),
        Backend::Candle => run_candle(case, inp),
    }
}

#[cfg(feature = "tch")]
fn run_tch(case: &Case, inp: &Inputs) -> OpResult<Outputs> {
    adapter::run(&backend::tch::TchOps::new(case.device), case, inp)
}

#[cfg(not(feature = "tch"))]
fn run_tch(_: &Case, _: &Inputs) -> OpResult<Outputs> {
    Err(backend::BackendError::new("tch backend not compiled in"))
}

#[cfg(feature = "candle")]
fn run_candle(case: &Case, inp: &Inputs) -> OpResult<Outputs> {
    adapter::run(&backend::candle::CandleOps::new(case.device)?, case, inp)
}

#[cfg(not(feature = "candle"))]
fn run_candle(_: &Case, _: &Inputs) -> OpResult<Outputs> {
    Err(backend::BackendError::new("candle backend not compiled in"))
}

/// Inputs and references are computed once per (shape, dtype, adapter, op) and shared by every
/// backend and precision path, so all of them are judged against the very same numbers.
#[derive(Default)]
struct Cache {
    draws: HashMap<String, Draws>,
    refs: HashMap<String, (Inputs, Outputs)>,
}

impl Cache {
    fn get(&mut self, case: &Case, seed: u64) -> &(Inputs, Outputs) {
        let key = format!(
            "{}/{}/{}/{}",
            case.shape.name, case.dtype, case.adapter, case.op
        );
        let draws = self
            .draws
            .entry(case.shape.name.clone())
            .or_insert_with(|| Draws::generate(&case.shape, seed));
        self.refs.entry(key).or_insert_with(|| {
            let inputs = draws.inputs(case.dtype, case.adapter, case.op);
            let outputs = reference::compute(case.adapter, case.op, &inputs);
            (inputs, outputs)
        })
    }
}

fn panic_message(p: Box<dyn std::any::Any + Send>) -> String {
    p.downcast_ref::<&str>()
        .map(|s| s.to_string())
        .or_else(|| p.downcast_ref::<String>().cloned())
        .unwrap_or_else(|| "panic with a non-string payload".into())
}

/// Run every case of `matrix` with the real backends.
pub fn run(matrix: &Matrix, opts: &RunOptions, on_event: &mut dyn FnMut(Event)) -> Vec<CaseResult> {
    run_with(matrix, opts, &run_on_backend, on_event)
}

/// Run every case of `matrix` with `exec`. A case that fails, errors or panics never stops the
/// others.
pub fn run_with(
    matrix: &Matrix,
    opts: &RunOptions,
    exec: &Executor,
    on_event: &mut dyn FnMut(Event),
) -> Vec<CaseResult> {
    let started = Instant::now();
    let mut cache = Cache::default();
    let mut results = Vec::with_capacity(matrix.cases.len());
    on_event(Event::RunStarted {
        total: matrix.cases.len(),
    });
    for (index, case) in matrix.cases.iter().enumerate() {
        on_event(Event::CaseStarted { index, case });
        let t0 = Instant::now();
        let (factor, rel) = matrix.tolerance_for(case);
        let prepared = match backend::unavailable(case.backend, case.device) {
            Some(reason) => Err(reason),
            None => Ok(cache.get(case, matrix.seed)),
        };
        let kappa = match &prepared {
            Ok((inputs, _)) => reference::conditioning(case.op, inputs),
            Err(_) => 1.0,
        };
        let tolerance = Tolerance::for_case(case, kappa, factor, rel);
        let (outcome, got) = match &prepared {
            Err(reason) => (Outcome::Skipped(reason.clone()), None),
            Ok((inputs, want)) => match catch_unwind(AssertUnwindSafe(|| exec(case, inputs))) {
                Ok(Ok(got)) => (judge(&got, want, tolerance, case.dtype), Some(got)),
                Ok(Err(e)) => (Outcome::Unsupported(e.message), None),
                Err(p) => (Outcome::Crashed(panic_message(p)), None),
            },
        };
        let mut result = CaseResult {
            case: case.clone(),
            outcome,
            tolerance,
            duration: t0.elapsed(),
            dump_error: None,
        };
        if let (Some(dir), Ok((inputs, want))) = (&opts.dump_dir, &prepared) {
            result.dump_error = dump::write(dir, &result, inputs, got.as_ref(), want)
                .err()
                .map(|e| e.to_string());
        }
        on_event(Event::CaseFinished {
            index,
            result: &result,
        });
        results.push(result);
    }
    on_event(Event::RunFinished {
        results: &results,
        elapsed: started.elapsed(),
    });
    results
}
