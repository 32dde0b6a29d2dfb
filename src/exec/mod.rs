//! How cases run. The [`runner`] plans a selection (what cannot run here is skipped before
//! anything is allocated for it, the resource [`guard`] refuses what cannot fit), dispatches the
//! rest to job slots, each with an [`executor`] (one worker process per backend build, spoken
//! to through the [`client`]), and emits events; it never prints. Inputs and references are
//! computed once per group of cases and dropped when the group is done ([`cache`]), a large
//! weight handed to the workers through [`shared`] memory; `--dump`
//! writes each case's tensors ([`dump`]).

pub mod cache;
pub mod client;
pub mod dump;
pub mod executor;
pub mod guard;
pub mod runner;
pub mod shared;
pub mod twins;

pub use executor::{Backends, Execution, Executor, InProcess, Pool, WorkerPaths, Workers};
pub use runner::{
    run, run_in_process, run_streaming, CaseResult, Event, Run, RunOptions, DEFAULT_TIMEOUT,
};
