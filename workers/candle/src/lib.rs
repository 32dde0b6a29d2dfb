//! peft-compat's candle worker: the candle glue ([`ops`]) and the [`WorkerBackend`] that serves
//! cases to the runner. Tests use [`run`] in process.

pub mod ops;

/// The library itself, for tests that wrap its tensors.
pub use candle_core;

use peft_compat_kit::adapter;
use peft_compat_kit::case::{Case, Device};
use peft_compat_kit::io::{Inputs, Outputs};
use peft_compat_kit::ops::OpResult;
use peft_compat_kit::WorkerBackend;
use std::collections::BTreeMap;

/// Run one case through the shared adapter math on candle.
pub fn run(case: &Case, inputs: &Inputs) -> OpResult<Outputs> {
    adapter::run(&ops::CandleOps::new(case.point.device)?, case, inputs)
}

pub struct Candle;

impl WorkerBackend for Candle {
    fn name(&self) -> String {
        "candle".into()
    }
    fn libraries(&self) -> BTreeMap<String, String> {
        [("candle".to_string(), ops::CANDLE_VERSION.to_string())]
            .into_iter()
            .collect()
    }
    fn set_threads(&self, _threads: usize) {
        // candle's CPU kernels use rayon's global pool, sized by RAYON_NUM_THREADS, which the
        // runner sets in the worker's environment.
    }
    fn unavailable(&self, device: Device) -> Option<String> {
        ops::unavailable(device)
    }
    fn run(&self, case: &Case, inputs: &Inputs) -> OpResult<Outputs> {
        run(case, inputs)
    }
}
