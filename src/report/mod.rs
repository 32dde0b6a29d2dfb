//! The document. Each finished case becomes a [`CaseReport`] once (written to the results
//! [`stream`] as it finishes, so an interrupted run resumes), the cases of a run become the
//! [`Report`], the one structure every output (table, Markdown, JSON, snapshot, gate) is
//! rendered from; [`merge`](mod@merge) joins the reports of partitioned jobs. Its JSON form
//! (`--json PATH`) is a contract for users' scripts.
//!
//! # JSON wire format (schema `peft-compat/report/v1`)
//! - `schema`: `"peft-compat/report/v1"`; a field is renamed or removed only with a new version.
//! - `matrix`: the matrix file's path as given; `seed`: its seed; `matrix_fnv`: a fingerprint
//!   of its text.
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
//!   - `skip` (skipped cases): `absent` (no such device here, or not enough memory: not checked
//!     here), `not_applicable` (PEFT refuses the combination), `declared` (`--skip-backend`) or
//!     `backend_lost` (the backend's worker should have run and could not: the gate fails);
//!   - `upcast`: where PEFT's fixed path casts to fp32 for this case, or absent when the
//!     upcast path equals the native one here; `upcast_applied`: whether this case took it;
//!   - `metrics` (cases that ran): `max_abs_err`, `max_rel_err` (relative to the output's
//!     scale), `tolerance` (allowed `max_rel_err`), `worst_output`, and `outputs` with the same
//!     figures per output tensor plus `err_units` (`max_rel_err / u`, u the dtype's unit
//!     roundoff: see `units`), `scale` (`max|reference|`, the denominator of `max_rel_err`),
//!     `norm` and `l1` (the L2 norm and the L1 sum of the output's finite values: figures that
//!     move when the output does, kept in snapshots), `nonfinite` (NaN/inf elements),
//!     `reference_nonfinite` (of those, where the f64 reference is not finite either) and
//!     `elements`;
//!   - `tolerance`: the tolerance model's value for the case, `factor`, `overridden`;
//!   - `index`: the case's position in the matrix's expansion;
//!   - `duration_ms`, and `compute_ms`: the part the backend spent computing (in its worker);
//!   - `expected` (cases a matrix expectation governs): `outcome` (`pass`, `mismatch`,
//!     `nonfinite`, `unsupported`, `crashed`, `fail` or `flaky`), `reason`, `error` (the
//!     pattern, if any), `rule` (`file:line`), `status` (`met`, `unexpected_pass`, `violated`,
//!     `not_run`).
//! - `threads` (reports of `run`): intra-op threads per worker; `filter`: the `--filter`
//!   substrings that selected the cases (absent: all).
//! - `gate` (reports written with `--check`): `passed`, `checked`, `not_checked`, `changes`
//!   (`id`, `kind`, `detail`, `fails`), `problems` (lost backends, a changed seed).
//! - `partition` (reports of one `--partition K/N` job only): `spec`, `selected` (the cases the
//!   N parts add up to), `filter`. `peft-compat merge` joins the parts into the report a single
//!   job gives, without this field.
//! - `shapes`: each shape the cases use, by name: `batch`, `in_features`, `out_features`,
//!   `rank`, `alpha`, `bias`, `rslora`, and `kernel`/`image` for a shape a Conv2d case uses;
//!   `units`: `u` per dtype the cases use (`f16` 2^-11, `bf16` 2^-8, `f32` 2^-24, `f64` 2^-53).
//! - `weights` (when the matrix has a `weights:` section): per entry, `checkpoint` (the path
//!   given), `files` (`path`, `size`, `sha256` for each file holding a used tensor, `read`),
//!   `tensors` (the matched weights), `adapter` (`path`, `files`, `use_dora`, `use_rslora`,
//!   `r`, `lora_alpha`); a checkpoint layer's shape (`<entry>:<module>`) adds `tensor`,
//!   `stored_dtype` and `saved_adapter` to its `shapes` entry, and its cases
//!   `weight_rounded` (how many stored weight values the case dtype rounded).
//! - `command` (reports of `run` and `merge`): the command line; `dump`: the `--dump` folder.
//! - `inactive_expectations` (when any): rules whose `when` does not hold here: `rule`,
//!   `expect`, `reason`, `unmet` (each condition with what this environment has).

pub mod merge;
pub mod stream;

pub use merge::{merge, MergeError};

use crate::case::{Backend, Coords, Point};
use crate::environment::Environment;
use crate::exec::CaseResult;
use crate::outcome::{Metrics, OutcomeKind, SkipKind, Tolerance};
use crate::spec::rules::Expected;
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
    /// Intra-op threads per worker (`--threads`): a multi-threaded GEMM sums in another order.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub threads: Option<usize>,
    /// The matrix file's fingerprint (FNV-1a of its text, as the results stream has it): parts
    /// of one run agree on it, and `merge` checks case ids against the file when it matches.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub matrix_fnv: Option<String>,
    /// The `--filter` substrings that selected the cases (none: every case of the matrix). The
    /// gate judges the selected cases only.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub filter: Vec<String>,
    /// The gate's verdict, in reports written with `--check`.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gate: Option<GateRecord>,
    /// The dimensions of every shape the cases use, by name: a reader needs no matrix at hand.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub shapes: BTreeMap<String, ShapeInfo>,
    /// The unit roundoff `u` of each dtype the cases use: `err_units` is `max_rel_err / u`.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub units: BTreeMap<String, f64>,
    /// The command line that made the report (`run`, `merge`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub command: Option<String>,
    /// The `--dump` folder, when the run wrote tensor dumps (one file per case, named by
    /// `exec::dump::file_name`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dump: Option<String>,
    /// The checkpoints the cases' layers come from (`weights:` entries), by entry: each file's
    /// path, size and SHA-256, the tensors, the saved adapter.
    #[serde(default, skip_serializing_if = "BTreeMap::is_empty")]
    pub weights: BTreeMap<String, crate::checkpoint::WeightsRecord>,
}

/// A shape's dimensions, as the matrix gives them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct ShapeInfo {
    pub batch: usize,
    pub in_features: usize,
    pub out_features: usize,
    pub rank: usize,
    pub alpha: f64,
    pub bias: bool,
    pub rslora: bool,
    /// Conv2d only: the kernel's side and the input image's side.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub kernel: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub image: Option<usize>,
    /// The shape options, where they differ from their defaults (`lora_bias: false`,
    /// `groups: 1`, `base: split`, `lr: 0.001`).
    #[serde(default, skip_serializing_if = "std::ops::Not::not")]
    pub lora_bias: bool,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub groups: Option<usize>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub base: Option<crate::case::Base>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub lr: Option<f64>,
    /// A checkpoint layer: the weight's stored name and dtype, and whether a saved adapter
    /// gave A and B.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tensor: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub stored_dtype: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub saved_adapter: Option<bool>,
}

impl ShapeInfo {
    /// `conv`: whether a Conv2d case uses the shape (kernel and image mean nothing elsewhere).
    pub fn of(s: &crate::case::Shape, conv: bool) -> ShapeInfo {
        ShapeInfo {
            batch: s.batch,
            in_features: s.in_features,
            out_features: s.out_features,
            rank: s.rank,
            alpha: s.alpha,
            bias: s.bias,
            rslora: s.rslora,
            kernel: conv.then_some(s.kernel),
            image: conv.then_some(s.image),
            lora_bias: s.lora_bias,
            groups: (s.groups != 1).then_some(s.groups),
            base: (s.base != crate::case::Base::Split).then_some(s.base),
            lr: (s.lr != crate::case::STEP_LR).then_some(s.lr),
            tensor: None,
            stored_dtype: None,
            saved_adapter: None,
        }
    }
}

/// The gate's verdict as the JSON report carries it.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GateRecord {
    pub passed: bool,
    /// Cases compared with the snapshot or governed by an expectation.
    pub checked: usize,
    /// Cases not checked here (device absent, backend declared not expected, not applicable).
    pub not_checked: usize,
    /// Each changed case once: `id`, `kind` (`regression`, `unexpected success`, ...),
    /// `detail`, `fails` (whether it fails the gate).
    pub changes: Vec<GateChange>,
    /// Setup changes that fail the gate on their own (the seed changed), and lost backends.
    #[serde(default, skip_serializing_if = "Vec::is_empty")]
    pub problems: Vec<String>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct GateChange {
    pub id: String,
    pub kind: String,
    pub detail: String,
    pub fails: bool,
}

impl Report {
    /// Whether this report's selection includes the case `id` (every id without `--filter`).
    pub fn selects(&self, id: &str) -> bool {
        self.filter.is_empty() || self.filter.iter().any(|f| id.contains(f.as_str()))
    }
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
    /// The axes (`backend`, `device`, `dtype`, `adapter`, `op`, `precision`, `layer`,
    /// `profile`), one key each.
    #[serde(flatten)]
    pub point: Point,
    pub shape: String,
    pub outcome: OutcomeKind,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// Skipped cases: whose doing the skip is (absent in reports that predate it: `absent`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub skip: Option<SkipKind>,
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
    /// A PEFT build's case: how far its outputs are from the tch build's on the same libtorch
    /// (`{"with": "<tch case id>", "max_u": <units of roundoff>}`).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub agreement: Option<crate::outcome::Agreement>,
    /// A checkpoint layer's case: how many stored weight values the case dtype rounded (0: the
    /// backends ran on the checkpoint's very values).
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub weight_rounded: Option<usize>,
}

/// A backend build that should have run here and could not: a failure of the run, unless the
/// user declared it not expected (`--skip-backend`).
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct LostBackend {
    pub backend: Backend,
    /// Why, as the first of its cases says.
    pub reason: String,
    /// How many cases it cost.
    pub cases: usize,
}

impl LostBackend {
    /// `tch: <reason> (360 cases not run); if tch is not expected on this runner, pass
    /// --skip-backend tch`.
    pub fn describe(&self) -> String {
        format!(
            "{}: {} ({} not run); if {} is not expected on this runner, pass --skip-backend {}",
            self.backend,
            self.reason,
            crate::util::plural(self.cases, "case"),
            self.backend,
            self.backend
        )
    }
}

impl CaseReport {
    /// Whose doing the skip is, for a skipped case (`absent` where the report predates kinds).
    pub fn skip_kind(&self) -> Option<SkipKind> {
        (self.outcome == OutcomeKind::Skipped).then(|| self.skip.unwrap_or_default())
    }

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
            point: self.point,
            shape: &self.shape,
        }
    }

    pub fn from_result(r: &CaseResult) -> CaseReport {
        let c = &r.case;
        CaseReport {
            index: r.index,
            id: c.id(),
            point: c.point,
            shape: c.shape.name.clone(),
            outcome: r.outcome.kind(),
            error: r.outcome.message().map(String::from),
            skip: r.outcome.skip_kind(),
            upcast: c.upcast_site().map(String::from),
            upcast_applied: c.upcasts(),
            metrics: r.outcome.metrics().cloned(),
            tolerance: r.tolerance,
            duration_ms: r.duration.as_secs_f64() * 1e3,
            compute_ms: r.compute.map(|d| d.as_secs_f64() * 1e3),
            dump_error: r.dump_error.clone(),
            expected: None,
            agreement: r.agreement.clone(),
            weight_rounded: r.weight_rounded,
        }
    }
}

impl Report {
    /// The backends that should have run and could not, in backend order.
    pub fn lost_backends(&self) -> Vec<LostBackend> {
        let mut lost: BTreeMap<Backend, LostBackend> = BTreeMap::new();
        for c in &self.cases {
            if c.skip_kind() == Some(SkipKind::BackendLost) {
                lost.entry(c.point.backend)
                    .or_insert_with(|| LostBackend {
                        backend: c.point.backend,
                        reason: c.error.clone().unwrap_or_default(),
                        cases: 0,
                    })
                    .cases += 1;
            }
        }
        lost.into_values().collect()
    }

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
            threads: None,
            matrix_fnv: None,
            filter: Vec::new(),
            gate: None,
            shapes: BTreeMap::new(),
            units: BTreeMap::new(),
            command: None,
            dump: None,
            weights: BTreeMap::new(),
        }
    }

    pub fn to_json(&self) -> String {
        serde_json::to_string_pretty(self).expect("reports contain only serializable data")
    }

    pub fn count(&self, kind: OutcomeKind) -> usize {
        self.summary.outcomes.get(&kind).copied().unwrap_or(0)
    }
}

/// How a case stands against its expectation.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Serialize, Deserialize)]
#[serde(rename_all = "snake_case")]
pub enum Status {
    /// The outcome is what the rule expects (for an error pattern: and the text matches).
    Met,
    /// The rule expects a failure and the case passed.
    UnexpectedPass,
    /// It failed, but not as expected (another outcome, or the text does not match), or the
    /// rule expects a pass.
    Violated,
    /// The case was skipped here.
    NotRun,
}

/// A case's expectation as the report carries it (`expected` in the JSON).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct CaseExpectation {
    pub outcome: Expected,
    pub reason: String,
    /// The `error` pattern, when the rule has one.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    /// `file:line` of the rule.
    pub rule: String,
    pub status: Status,
}

impl CaseExpectation {
    /// A failure the matrix declares, observed as declared.
    pub fn explains_failure(&self) -> bool {
        self.status == Status::Met && self.outcome != Expected::Pass
    }
}

/// A rule that does not apply in this environment, and why (`inactive_expectations` in JSON).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct InactiveRule {
    pub rule: String,
    pub expect: Expected,
    pub reason: String,
    /// The conditions that do not hold, with what this environment has.
    pub unmet: Vec<String>,
}
