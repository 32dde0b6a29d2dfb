//! What happened to a case, in the terms every later stage uses: the outcome, its error
//! figures and the tolerance they were held to. Computed in `truth::judge`; carried by the
//! report; named by the matrix's expectation rules; rendered by the tables.

use serde::{Deserialize, Serialize};

/// The tolerance a case's outputs are judged with, and where it came from.
#[derive(Debug, Clone, Copy, PartialEq, Serialize, Deserialize)]
pub struct Tolerance {
    /// Allowed `max_rel_err`.
    pub rel: f64,
    /// The model's factor from the matrix (1 by default).
    pub factor: f64,
    /// True when a matrix rule set `rel` outright instead of the model.
    pub overridden: bool,
    /// The op's conditioning (1 except for unmerge).
    pub kappa: f64,
}

/// Error figures for one output tensor.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct OutputMetrics {
    pub name: String,
    #[serde(deserialize_with = "null_as_nan")]
    pub max_abs_err: f64,
    /// `max_abs_err / max|ref|` (or `max_abs_err` when the reference is all zeros).
    #[serde(deserialize_with = "null_as_nan")]
    pub max_rel_err: f64,
    /// `max_rel_err` in units of the dtype's unit roundoff: 1-10 is "as good as the dtype allows".
    #[serde(deserialize_with = "null_as_nan")]
    pub err_units: f64,
    #[serde(deserialize_with = "null_as_nan")]
    pub tolerance: f64,
    /// `max|ref|`.
    #[serde(deserialize_with = "null_as_nan")]
    pub scale: f64,
    /// L2 norm and L1 sum of the output's finite values: summary figures for snapshots.
    #[serde(deserialize_with = "null_as_nan")]
    pub norm: f64,
    #[serde(deserialize_with = "null_as_nan")]
    pub l1: f64,
    /// Elements that are NaN or infinite: a finding whatever the reference says.
    pub nonfinite: usize,
    /// Of those, the elements where the f64 reference is not finite either: the formula itself
    /// is undefined there (DoRA's 0/0 on a zero row, PEFT #2049), not the dtype's fault.
    #[serde(default, skip_serializing_if = "is_zero")]
    pub reference_nonfinite: usize,
    pub elements: usize,
}

/// A figure JSON wrote as `null`: serde_json writes NaN so (a DoRA 0/0 on a zero row gives NaN
/// errors), and a saved report must read back (`report`, `history`, `compare`).
fn null_as_nan<'de, D: serde::Deserializer<'de>>(d: D) -> Result<f64, D::Error> {
    Ok(Option::<f64>::deserialize(d)?.unwrap_or(f64::NAN))
}

fn is_zero(n: &usize) -> bool {
    *n == 0
}

impl OutputMetrics {
    /// Error over tolerance; infinite where a value is not finite.
    pub fn ratio(&self) -> f64 {
        if self.nonfinite > 0 {
            f64::INFINITY
        } else {
            self.max_rel_err / self.tolerance
        }
    }
}

/// Error figures for a case: the worst output's (by error over tolerance), then every output.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct Metrics {
    #[serde(deserialize_with = "null_as_nan")]
    pub max_abs_err: f64,
    #[serde(deserialize_with = "null_as_nan")]
    pub max_rel_err: f64,
    #[serde(deserialize_with = "null_as_nan")]
    pub tolerance: f64,
    pub worst_output: String,
    pub outputs: Vec<OutputMetrics>,
}

/// What happened to a case. "Could not run" (unsupported, crashed, skipped) and "ran and was
/// wrong" (mismatch, nonfinite) are different variants, never just different strings.
#[derive(Debug, Clone, PartialEq)]
pub enum Outcome {
    /// Every output within tolerance of the reference.
    Pass(Metrics),
    /// Finite, but some output beyond tolerance.
    Mismatch(Metrics),
    /// NaN or inf where the reference is finite.
    Nonfinite(Metrics),
    /// The backend refused an operation; its message verbatim.
    Unsupported(String),
    /// The case panicked, or its worker process died (abort, segfault, killed for memory, CUDA
    /// fault): the panic message, or the exit status and the tail of the worker's stderr.
    Crashed(String),
    /// The case did not finish within `--timeout`; its worker was killed and replaced.
    Timeout(String),
    /// Not run here; why, and by whose doing.
    Skipped(Skip),
}

/// How far a PEFT build's outputs are from the `tch` build's on the same libtorch, for the same
/// case (same device, dtype, path, inputs): the restatement held to PEFT itself.
#[derive(Debug, Clone, PartialEq, serde::Serialize, serde::Deserialize)]
pub struct Agreement {
    /// The tch case's id.
    pub with: String,
    /// The largest difference over the outputs both produced, relative to the tch output's
    /// largest magnitude, in units of roundoff of the case dtype (infinite where one has a
    /// non-finite value the other has not, or a shape the other has not).
    pub max_u: f64,
}

/// Why a case did not run. What the gate makes of a skip depends on its kind: an absent GPU is
/// "not checked here", a worker that should have run and could not is a failure of the run.
#[derive(Debug, Clone, PartialEq)]
pub struct Skip {
    pub kind: SkipKind,
    pub reason: String,
}

/// Whose doing a skip is; written as `skip` in reports (`absent` where a report predates it).
#[derive(
    Debug, Clone, Copy, Default, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize,
)]
#[serde(rename_all = "snake_case")]
pub enum SkipKind {
    /// The hardware is absent here: no such device, or not enough memory for the case (the
    /// resource guard). Not checked here; never a pass, never a failure.
    #[default]
    Absent,
    /// PEFT itself refuses the combination (PiSSA/OLoRA in float64): nothing to check anywhere.
    NotApplicable,
    /// The user declared the backend not expected on this runner (`--skip-backend`).
    Declared,
    /// The backend should have run and could not: its worker is missing, not executable,
    /// speaks another protocol, or died or hung at start. A failure of the run.
    BackendLost,
}

impl SkipKind {
    pub fn as_str(self) -> &'static str {
        match self {
            SkipKind::Absent => "absent",
            SkipKind::NotApplicable => "not_applicable",
            SkipKind::Declared => "declared",
            SkipKind::BackendLost => "backend_lost",
        }
    }
}

impl Skip {
    pub fn new(kind: SkipKind, reason: impl Into<String>) -> Skip {
        Skip {
            kind,
            reason: reason.into(),
        }
    }
}

/// The outcome's name, as written in reports, tables and snapshots.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum OutcomeKind {
    Pass,
    Mismatch,
    Nonfinite,
    Unsupported,
    Crashed,
    Timeout,
    Skipped,
}

impl OutcomeKind {
    pub const ALL: &'static [OutcomeKind] = &[
        OutcomeKind::Pass,
        OutcomeKind::Mismatch,
        OutcomeKind::Nonfinite,
        OutcomeKind::Unsupported,
        OutcomeKind::Crashed,
        OutcomeKind::Timeout,
        OutcomeKind::Skipped,
    ];

    pub fn as_str(self) -> &'static str {
        match self {
            OutcomeKind::Pass => "pass",
            OutcomeKind::Mismatch => "mismatch",
            OutcomeKind::Nonfinite => "nonfinite",
            OutcomeKind::Unsupported => "unsupported",
            OutcomeKind::Crashed => "crashed",
            OutcomeKind::Timeout => "timeout",
            OutcomeKind::Skipped => "skipped",
        }
    }

    /// Only `pass` is a success; a skip is never one.
    pub fn is_pass(self) -> bool {
        match self {
            OutcomeKind::Pass => true,
            OutcomeKind::Mismatch
            | OutcomeKind::Nonfinite
            | OutcomeKind::Unsupported
            | OutcomeKind::Crashed
            | OutcomeKind::Timeout
            | OutcomeKind::Skipped => false,
        }
    }

    /// Worst first: a crash hides less than a mismatch (tables show a cell's worst failure).
    pub fn severity(self) -> u8 {
        match self {
            OutcomeKind::Timeout => 6,
            OutcomeKind::Crashed => 5,
            OutcomeKind::Unsupported => 4,
            OutcomeKind::Nonfinite => 3,
            OutcomeKind::Mismatch => 2,
            OutcomeKind::Skipped => 1,
            OutcomeKind::Pass => 0,
        }
    }

    /// Failed here (as opposed to passed or not run).
    pub fn is_failure(self) -> bool {
        !self.is_pass() && self != OutcomeKind::Skipped
    }
}

impl std::fmt::Display for OutcomeKind {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

impl Outcome {
    pub fn kind(&self) -> OutcomeKind {
        match self {
            Outcome::Pass(_) => OutcomeKind::Pass,
            Outcome::Mismatch(_) => OutcomeKind::Mismatch,
            Outcome::Nonfinite(_) => OutcomeKind::Nonfinite,
            Outcome::Unsupported(_) => OutcomeKind::Unsupported,
            Outcome::Crashed(_) => OutcomeKind::Crashed,
            Outcome::Timeout(_) => OutcomeKind::Timeout,
            Outcome::Skipped(_) => OutcomeKind::Skipped,
        }
    }

    /// Whose doing the skip is, for a skipped case.
    pub fn skip_kind(&self) -> Option<SkipKind> {
        match self {
            Outcome::Skipped(s) => Some(s.kind),
            _ => None,
        }
    }

    pub fn metrics(&self) -> Option<&Metrics> {
        match self {
            Outcome::Pass(m) | Outcome::Mismatch(m) | Outcome::Nonfinite(m) => Some(m),
            Outcome::Unsupported(_)
            | Outcome::Crashed(_)
            | Outcome::Timeout(_)
            | Outcome::Skipped(_) => None,
        }
    }

    /// The error text for failures that have one (the backend's message, the panic message),
    /// or the skip reason.
    pub fn message(&self) -> Option<&str> {
        match self {
            Outcome::Unsupported(s)
            | Outcome::Crashed(s)
            | Outcome::Timeout(s)
            | Outcome::Skipped(Skip { reason: s, .. }) => Some(s),
            Outcome::Pass(_) | Outcome::Mismatch(_) | Outcome::Nonfinite(_) => None,
        }
    }
}
