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
//!   - `duration_ms`;
//!   - `expected` (cases a matrix expectation governs): `outcome` (`pass`, `mismatch`,
//!     `nonfinite`, `unsupported`, `crashed`, `fail` or `flaky`), `reason`, `error` (the
//!     pattern, if any), `rule` (`file:line`), `status` (`met`, `unexpected_pass`, `violated`,
//!     `not_run`).
//! - `inactive_expectations` (when any): rules whose `when` does not hold here: `rule`,
//!   `expect`, `reason`, `unmet` (each condition with what this environment has).

use crate::case::{Adapter, Backend, Coords, DType, Device, Op, Precision};
use crate::environment::Environment;
use crate::expect::{self, CaseExpectation, Expectation, InactiveRule};
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
    /// Expectation rules of the matrix whose `when` does not hold here.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub inactive_expectations: Vec<InactiveRule>,
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
    /// The matrix's expectation for this case, judged against the outcome.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expected: Option<CaseExpectation>,
}

impl CaseReport {
    /// Why the case failed, in one line: the error's first line, or the worst output's error
    /// against its tolerance.
    pub fn failure_detail(&self) -> String {
        match (&self.error, &self.metrics) {
            (Some(e), _) => e.lines().next().unwrap_or("").to_string(),
            (None, Some(m)) => {
                let worst = m.outputs.iter().find(|o| o.name == m.worst_output);
                let units = worst.map_or(String::new(), |o| format!(" ({:.0} u)", o.err_units));
                format!(
                    "{}: max_rel_err {:.2e}{units} > tolerance {:.2e}",
                    m.worst_output, m.max_rel_err, m.tolerance
                )
            }
            (None, None) => String::new(),
        }
    }

    /// The matrix's expectation, when it declares this case's failure as observed.
    pub fn expected_failure(&self) -> Option<&CaseExpectation> {
        self.expected.as_ref().filter(|e| e.explains_failure())
    }

    pub fn coords(&self) -> Coords<'_> {
        Coords {
            backend: self.backend,
            device: self.device,
            dtype: self.dtype,
            adapter: self.adapter,
            op: self.op,
            precision: self.precision,
            shape: &self.shape,
        }
    }

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
            expected: None,
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
            inactive_expectations: Vec::new(),
        }
    }

    /// Judge every case against the matrix's expectations (see [`crate::expect`]).
    pub fn with_expectations(mut self, rules: &[Expectation]) -> Report {
        expect::annotate(&mut self, rules);
        self
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("reports contain only serializable data")
    }

    pub fn count(&self, kind: OutcomeKind) -> usize {
        self.summary.outcomes.get(&kind).copied().unwrap_or(0)
    }
}
