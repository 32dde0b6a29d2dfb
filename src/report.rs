//! The report: the one structure every output (table, Markdown, JSON, snapshot, gate) is
//! rendered from. Its JSON form (`--json PATH`) is a contract for users' scripts.
//!
//! # JSON wire format (schema `peft-compat/report/v1`)
//! - `schema`: `"peft-compat/report/v1"`; a field is renamed or removed only with a new version.
//! - `matrix`: the matrix file's path as given; `seed`: its seed.
//! - `environment`: see [`Environment`] (`peft_compat`, `libraries` {`tch`, `libtorch`,
//!   `candle`}, `cpu_model`, `cpu_flags`, `cpu_count`, `cuda`, `gpus`, `os`, `arch`).
//! - `summary`: case counts per outcome and `total`; `elapsed_s`.
//! - `cases`: one object per case, in matrix order:
//!   - `id`: `backend/device/dtype/adapter/op/precision/shape`, stable across runs;
//!   - `backend`, `device`, `dtype`, `adapter`, `op`, `precision`, `shape`: the axes;
//!   - `outcome`: `pass`, `mismatch`, `nonfinite`, `unsupported`, `crashed` or `skipped`;
//!   - `error`: the backend's message (unsupported), the panic message (crashed) or the skip
//!     reason (skipped); absent otherwise;
//!   - `upcast`: where PEFT's fixed path casts to fp32 for this case, or absent when the
//!     upcast path equals the native one here; `upcast_applied`: whether this case took it;
//!   - `metrics` (cases that ran): `max_abs_err`, `max_rel_err` (relative to the output's
//!     scale), `tolerance` (allowed `max_rel_err`), `worst_output`, and `outputs` with the same
//!     figures per output tensor plus `err_units` (error in units of the dtype's roundoff);
//!   - `tolerance`: the tolerance model's value for the case, `factor`, `overridden`;
//!   - `duration_ms`.

use crate::case::{Adapter, Backend, DType, Device, Op, Precision};
use crate::environment::Environment;
use crate::judge::{Metrics, OutcomeKind, Tolerance};
use crate::runner::CaseResult;
use serde::{Deserialize, Serialize};
use std::collections::BTreeMap;

pub const SCHEMA: &str = "peft-compat/report/v1";

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Report {
    pub schema: String,
    pub matrix: String,
    pub seed: u64,
    pub environment: Environment,
    pub summary: Summary,
    pub cases: Vec<CaseReport>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Summary {
    pub total: usize,
    /// Count per outcome name; every outcome is present, zero or not.
    pub outcomes: BTreeMap<OutcomeKind, usize>,
    pub elapsed_s: f64,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CaseReport {
    pub id: String,
    pub backend: Backend,
    pub device: Device,
    pub dtype: DType,
    pub adapter: Adapter,
    pub op: Op,
    pub precision: Precision,
    pub shape: String,
    pub outcome: OutcomeKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub upcast: Option<String>,
    pub upcast_applied: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub metrics: Option<Metrics>,
    pub tolerance: Tolerance,
    pub duration_ms: f64,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dump_error: Option<String>,
}

impl CaseReport {
    pub fn from_result(r: &CaseResult) -> CaseReport {
        let c = &r.case;
        CaseReport {
            id: c.id(),
            backend: c.backend,
            device: c.device,
            dtype: c.dtype,
            adapter: c.adapter,
            op: c.op,
            precision: c.precision,
            shape: c.shape.name.clone(),
            outcome: r.outcome.kind(),
            error: r.outcome.message().map(String::from),
            upcast: c.upcast_site().map(String::from),
            upcast_applied: c.upcasts(),
            metrics: r.outcome.metrics().cloned(),
            tolerance: r.tolerance,
            duration_ms: r.duration.as_secs_f64() * 1e3,
            dump_error: r.dump_error.clone(),
        }
    }
}

impl Report {
    pub fn new(
        matrix: &str,
        seed: u64,
        environment: Environment,
        results: &[CaseResult],
        elapsed_s: f64,
    ) -> Report {
        let cases: Vec<CaseReport> = results.iter().map(CaseReport::from_result).collect();
        let mut outcomes: BTreeMap<OutcomeKind, usize> =
            OutcomeKind::ALL.iter().map(|k| (*k, 0)).collect();
        for c in &cases {
            *outcomes.entry(c.outcome).or_default() += 1;
        }
        Report {
            schema: SCHEMA.to_string(),
            matrix: matrix.to_string(),
            seed,
            environment,
            summary: Summary {
                total: cases.len(),
                outcomes,
                elapsed_s,
            },
            cases,
        }
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("reports contain only serializable data")
    }

    pub fn count(&self, kind: OutcomeKind) -> usize {
        self.summary.outcomes.get(&kind).copied().unwrap_or(0)
    }
}
