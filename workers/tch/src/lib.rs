//! peft-compat's libtorch worker: the tch glue ([`ops`]) and the [`WorkerBackend`] that serves
//! cases to the runner. Tests use [`run`] in process.

pub mod ops;

/// The library itself, for tests that wrap its tensors.
pub use tch;

use peft_compat_kit::adapter;
use peft_compat_kit::case::{Case, Device};
use peft_compat_kit::io::{Inputs, Outputs};
use peft_compat_kit::ops::OpResult;
use peft_compat_kit::WorkerBackend;
use std::collections::BTreeMap;

/// Run one case through the shared adapter math on libtorch.
pub fn run(case: &Case, inputs: &Inputs) -> OpResult<Outputs> {
    adapter::run(&ops::TchOps::new(case.point.device), case, inputs)
}

pub struct Tch;

impl WorkerBackend for Tch {
    fn name(&self) -> String {
        // The backend axis value this build runs: `tch` on libtorch 2.11.0, else `tch@X.Y.Z`.
        ops::libtorch_release()
            .map_or(peft_compat_kit::case::Backend::Tch, |v| {
                peft_compat_kit::case::Backend::tch_at(v)
            })
            .to_string()
    }
    fn libraries(&self) -> BTreeMap<String, String> {
        [
            ("tch".to_string(), ops::tch_version()),
            ("libtorch".to_string(), ops::libtorch_version()),
        ]
        .into_iter()
        .collect()
    }
    fn cuda(&self) -> Option<String> {
        ops::libtorch_cuda_version().map(String::from)
    }
    fn set_threads(&self, threads: usize) {
        // Before the first op: the inter-op pool cannot be resized once used.
        tch::set_num_interop_threads(1);
        tch::set_num_threads(threads as i32);
    }
    fn unavailable(&self, device: Device) -> Option<String> {
        ops::unavailable(device)
    }
    fn run(&self, case: &Case, inputs: &Inputs) -> OpResult<Outputs> {
        run(case, inputs)
    }
}
