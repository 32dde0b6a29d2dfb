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
//!   - `id`: `backend/device/dtype/adapter/op/precision/shape`, then `/layer` unless `linear`
//!     and `/profile` unless `normal`; stable across runs;
//!   - `backend`, `device`, `dtype`, `adapter`, `op`, `precision`, `layer`, `profile`, `shape`:
//!     the axes;
//!   - `outcome`: `pass`, `mismatch`, `nonfinite`, `unsupported`, `crashed`, `timeout` or
//!     `skipped`;
//!   - `error`: the backend's message (unsupported), the panic message or the dead worker's
//!     status and stderr tail (crashed), the deadline (timeout) or the skip reason (skipped,
//!     including the resource guard's refusals); absent otherwise;
//!   - `upcast`: where PEFT's fixed path casts to fp32 for this case, or absent when the
//!     upcast path equals the native one here; `upcast_applied`: whether this case took it;
//!   - `metrics` (cases that ran): `max_abs_err`, `max_rel_err` (relative to the output's
//!     scale), `tolerance` (allowed `max_rel_err`), `worst_output`, and `outputs` with the same
//!     figures per output tensor plus `err_units` (error in units of the dtype's roundoff);
//!   - `tolerance`: the tolerance model's value for the case, `factor`, `overridden`;
//!   - `index`: the case's position in the matrix's expansion;
//!   - `duration_ms`, and `compute_ms`: the part the backend spent computing (in its worker);
//!   - `expected` (cases a matrix expectation governs): `outcome` (`pass`, `mismatch`,
//!     `nonfinite`, `unsupported`, `crashed`, `fail` or `flaky`), `reason`, `error` (the
//!     pattern, if any), `rule` (`file:line`), `status` (`met`, `unexpected_pass`, `violated`,
//!     `not_run`).
//! - `partition` (reports of one `--partition K/N` job only): `spec`, `selected` (the cases the
//!   N parts add up to), `filter`. `peft-compat merge` joins the parts into the report a single
//!   job gives, without this field.
//! - `inactive_expectations` (when any): rules whose `when` does not hold here: `rule`,
//!   `expect`, `reason`, `unmet` (each condition with what this environment has).

use crate::case::{Adapter, Backend, Coords, DType, Device, Layer, Op, Precision, Profile};
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
    /// Present in the report of one `--partition K/N` job; `merge` joins the N of them.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub partition: Option<PartitionInfo>,
}

/// Which share of the matrix a partial report holds.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct PartitionInfo {
    /// `count:K/N` or `hash:K/N`.
    pub spec: String,
    /// Cases selected (after --filter) before partitioning: what the N parts add up to.
    pub selected: usize,
    pub filter: Vec<String>,
}

/// Why partial reports cannot be merged.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum MergeError {
    #[error("{0} is not a partial report (it was not run with --partition K/N)")]
    NotPartial(String),
    #[error("{a} and {b} differ in {what}: they are not parts of one run")]
    Differ {
        a: String,
        b: String,
        what: &'static str,
    },
    #[error("case {id} is in both {a} and {b}")]
    Duplicate { id: String, a: String, b: String },
    #[error("the parts hold {got} of the {want} cases selected: missing {missing}")]
    Incomplete {
        got: usize,
        want: usize,
        missing: String,
    },
}

/// Join the reports of the N partition jobs of one run into the report a single job gives:
/// cases back in matrix order, counts recomputed, the elapsed time of the slowest part.
pub fn merge(parts: Vec<(String, Report)>) -> Result<Report, MergeError> {
    let mut parts = parts.into_iter();
    let (first_name, first) = parts
        .next()
        .ok_or_else(|| MergeError::NotPartial("(no report)".into()))?;
    let info = first
        .partition
        .clone()
        .ok_or_else(|| MergeError::NotPartial(first_name.clone()))?;
    let n_of = |spec: &str| spec.rsplit('/').next().unwrap_or("").to_string();
    let mut specs = BTreeMap::new();
    let mut owner: BTreeMap<String, String> = BTreeMap::new();
    let mut cases = Vec::new();
    let mut elapsed: f64 = 0.0;
    for (name, r) in std::iter::once((first_name.clone(), first.clone())).chain(parts) {
        let p = r
            .partition
            .clone()
            .ok_or_else(|| MergeError::NotPartial(name.clone()))?;
        let differ = |what| MergeError::Differ {
            a: first_name.clone(),
            b: name.clone(),
            what,
        };
        if r.matrix != first.matrix || r.seed != first.seed {
            return Err(differ("matrix or seed"));
        }
        if r.environment.libraries != first.environment.libraries {
            return Err(differ("library versions (use separate reports per build)"));
        }
        if p.selected != info.selected
            || p.filter != info.filter
            || n_of(&p.spec) != n_of(&info.spec)
        {
            return Err(differ("selection (--filter or the N of --partition)"));
        }
        if specs.insert(p.spec.clone(), name.clone()).is_some() {
            return Err(differ("nothing: the same partition was given twice"));
        }
        elapsed = elapsed.max(r.summary.elapsed_s);
        for c in r.cases {
            if let Some(prev) = owner.insert(c.id.clone(), name.clone()) {
                return Err(MergeError::Duplicate {
                    id: c.id,
                    a: prev,
                    b: name,
                });
            }
            cases.push(c);
        }
    }
    if cases.len() != info.selected {
        let n: usize = n_of(&info.spec).parse().unwrap_or(0);
        let missing = (1..=n)
            .map(|k| {
                let strategy = info.spec.split(':').next().unwrap_or("count");
                format!("{strategy}:{k}/{n}")
            })
            .filter(|s| !specs.contains_key(s))
            .collect::<Vec<_>>()
            .join(", ");
        return Err(MergeError::Incomplete {
            got: cases.len(),
            want: info.selected,
            missing: if missing.is_empty() {
                "cases from unfinished parts".into()
            } else {
                format!("partitions {missing}")
            },
        });
    }
    cases.sort_by_key(|c| c.index);
    let mut merged = Report::from_cases(
        &first.matrix,
        first.seed,
        first.environment.clone(),
        cases,
        elapsed,
    );
    merged.inactive_expectations = first.inactive_expectations;
    Ok(merged)
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
    /// Position in the matrix's expansion (partial reports merge back into this order).
    #[serde(default)]
    pub index: usize,
    pub id: String,
    pub backend: Backend,
    pub device: Device,
    pub dtype: DType,
    pub adapter: Adapter,
    pub op: Op,
    pub precision: Precision,
    /// Absent in reports written before the layer axis: `linear`.
    #[serde(default = "linear")]
    pub layer: Layer,
    /// Absent in reports written before the profile axis: `normal`.
    #[serde(default = "normal")]
    pub profile: Profile,
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
    /// Of `duration_ms`, the time the backend spent computing (in its worker); absent when it
    /// did not run. The rest is the harness: inputs, transfer, the reference, judging.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub compute_ms: Option<f64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dump_error: Option<String>,
    /// The matrix's expectation for this case, judged against the outcome.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub expected: Option<CaseExpectation>,
}

fn linear() -> Layer {
    Layer::Linear
}

fn normal() -> Profile {
    Profile::Normal
}

impl CaseReport {
    /// Why the case failed, in one line: the error's first line, or the worst output's error
    /// against its tolerance.
    pub fn failure_detail(&self) -> String {
        match (&self.error, &self.metrics) {
            (Some(e), _) => e.lines().next().unwrap_or("").to_string(),
            (None, Some(m)) if m.outputs.iter().any(|o| o.nonfinite > 0) => {
                let o = m
                    .outputs
                    .iter()
                    .find(|o| o.nonfinite > 0)
                    .expect("checked above");
                let why = match o.reference_nonfinite {
                    0 => " where the f64 reference is finite".to_string(),
                    n if n == o.nonfinite => {
                        " (the f64 reference is undefined there too: the formula divides by zero)"
                            .to_string()
                    }
                    n => format!(" ({n} of them undefined in the f64 reference too)"),
                };
                format!(
                    "{}: {} of {} values non-finite{why}",
                    o.name, o.nonfinite, o.elements
                )
            }
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
            layer: self.layer,
            profile: self.profile,
            shape: &self.shape,
        }
    }

    pub fn from_result(r: &CaseResult) -> CaseReport {
        let c = &r.case;
        CaseReport {
            index: r.index,
            id: c.id(),
            backend: c.backend,
            device: c.device,
            dtype: c.dtype,
            adapter: c.adapter,
            op: c.op,
            precision: c.precision,
            layer: c.layer,
            profile: c.profile,
            shape: c.shape.name.clone(),
            outcome: r.outcome.kind(),
            error: r.outcome.message().map(String::from),
            upcast: c.upcast_site().map(String::from),
            upcast_applied: c.upcasts(),
            metrics: r.outcome.metrics().cloned(),
            tolerance: r.tolerance,
            duration_ms: r.duration.as_secs_f64() * 1e3,
            compute_ms: r.compute.map(|d| d.as_secs_f64() * 1e3),
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
        let cases = results.iter().map(CaseReport::from_result).collect();
        Report::from_cases(matrix, seed, environment, cases, elapsed_s)
    }

    /// A report of `cases` (in matrix order), e.g. read back from a results stream.
    pub fn from_cases(
        matrix: &str,
        seed: u64,
        environment: Environment,
        cases: Vec<CaseReport>,
        elapsed_s: f64,
    ) -> Report {
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
            partition: None,
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
