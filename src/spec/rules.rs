//! Expectations: what the matrix says a case should do, and why.
//!
//! A snapshot records what *was* observed; an expectation says what *should* happen and why, in
//! words a person wrote, so that a known failure reads as known (the table marks it) and a
//! change of behaviour is caught even after the snapshot is re-accepted.
//!
//! ```yaml
//! expectations:              # later rules win; a rule whose `when` does not hold here is inactive
//!   - backend: candle
//!     dtype: [f16, bf16]
//!     adapter: dora
//!     shape: wide
//!     expect: mismatch       # pass | mismatch | nonfinite | unsupported | crashed | timeout | fail | flaky
//!     reason: "candle sums the row norm's squares in 16-bit"
//!   - {backend: tch, device: cpu, dtype: f16, precision: native,
//!      when: {libtorch: "<2.2"},                 # libtorch, tch, candle, cuda: version requirements;
//!      expect: unsupported,                      # cpu_flag: a flag or list (`!flag` = absent);
//!      error: "addmm_impl_cpu_",                 # arch; gpu: a substring of a GPU's name
//!      reason: "no CPU fp16 matmul before libtorch 2.2 (PEFT #1597)"}
//! ```
//!
//! `fail` accepts any failure; `flaky` accepts a pass or a failure (its numbers are not compared
//! either). `error` is a regular expression searched for in the failure's text.

use super::pattern::{values, OneOrMany, Pattern};
use super::validate::{MatrixError, Source};
use crate::case::Case;
use crate::environment::{Environment, RELEVANT_CPU_FLAGS};
use crate::outcome::OutcomeKind;
use regex::Regex;
use semver::{Version, VersionReq};
use serde::{Deserialize, Serialize};

/// The outcome a rule expects.
#[derive(Debug, Clone, Copy, PartialEq, Eq, Hash, PartialOrd, Ord, Serialize, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Expected {
    Pass,
    Mismatch,
    Nonfinite,
    Unsupported,
    Crashed,
    Timeout,
    /// Any failure.
    Fail,
    /// A pass or a failure: the case has been seen to do both.
    Flaky,
}

impl Expected {
    pub fn as_str(self) -> &'static str {
        match self {
            Expected::Pass => "pass",
            Expected::Mismatch => "mismatch",
            Expected::Nonfinite => "nonfinite",
            Expected::Unsupported => "unsupported",
            Expected::Crashed => "crashed",
            Expected::Timeout => "timeout",
            Expected::Fail => "fail",
            Expected::Flaky => "flaky",
        }
    }

    /// The expectation that a single observed outcome would give.
    pub fn of(k: OutcomeKind) -> Option<Expected> {
        match k {
            OutcomeKind::Pass => Some(Expected::Pass),
            OutcomeKind::Mismatch => Some(Expected::Mismatch),
            OutcomeKind::Nonfinite => Some(Expected::Nonfinite),
            OutcomeKind::Unsupported => Some(Expected::Unsupported),
            OutcomeKind::Crashed => Some(Expected::Crashed),
            OutcomeKind::Timeout => Some(Expected::Timeout),
            OutcomeKind::Skipped => None,
        }
    }

    /// Whether an observed outcome (one that ran) is what this rule expects.
    pub fn admits(self, k: OutcomeKind) -> bool {
        match self {
            Expected::Fail => k.is_failure(),
            Expected::Flaky => k != OutcomeKind::Skipped,
            e => Expected::of(k) == Some(e),
        }
    }

    /// Whether a failure this rule accepts can carry a text for an `error` pattern to match.
    pub fn has_text(self) -> bool {
        matches!(
            self,
            Expected::Unsupported
                | Expected::Crashed
                | Expected::Timeout
                | Expected::Fail
                | Expected::Flaky
        )
    }
}

impl std::fmt::Display for Expected {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(self.as_str())
    }
}

/// An expectation as written in a matrix file.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct RawExpectation {
    #[serde(flatten)]
    pub pattern: Pattern,
    pub expect: Expected,
    pub reason: String,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub when: Option<When>,
}

/// Conditions on the environment (all given must hold), because whether an op works depends on
/// the library version and the CPU as much as on the case.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct When {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub libtorch: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub tch: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub candle: Option<String>,
    /// The CUDA version libtorch was built for.
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cuda: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub cpu_flag: Option<OneOrMany<String>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub arch: Option<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub gpu: Option<String>,
}

/// One compiled condition of a `when`.
#[derive(Debug, Clone)]
pub enum Requirement {
    Version {
        library: &'static str,
        req: VersionReq,
    },
    CpuFlag {
        flag: String,
        present: bool,
    },
    Arch(String),
    Gpu(String),
}

/// A version as libraries print them (`2.11.0+cu130`, `13.0`, `2.1.2a0`), reduced to
/// major.minor.patch so that a requirement like `<2.2` compares what a person means.
pub fn lenient_version(s: &str) -> Option<Version> {
    let core: String = s
        .trim()
        .trim_start_matches('v')
        .chars()
        .take_while(|c| c.is_ascii_digit() || *c == '.')
        .collect();
    let mut parts = core
        .split('.')
        .filter(|p| !p.is_empty())
        .map(|p| p.parse::<u64>().ok())
        .collect::<Option<Vec<u64>>>()?;
    if parts.is_empty() || parts.len() > 3 {
        return None;
    }
    parts.resize(3, 0);
    Some(Version::new(parts[0], parts[1], parts[2]))
}

impl Requirement {
    fn observed(&self, env: &Environment) -> Option<String> {
        match self {
            Requirement::Version {
                library: "cuda", ..
            } => env.cuda.clone(),
            Requirement::Version { library, .. } => env.libraries.get(*library).cloned(),
            Requirement::CpuFlag { .. } => None,
            Requirement::Arch(_) => Some(env.arch.clone()),
            Requirement::Gpu(_) => Some(env.gpus.join(", ")),
        }
    }

    pub fn holds(&self, env: &Environment) -> bool {
        match self {
            Requirement::Version { req, .. } => self
                .observed(env)
                .and_then(|v| lenient_version(&v))
                .is_some_and(|v| req.matches(&v)),
            Requirement::CpuFlag { flag, present } => env.cpu_flags.contains(flag) == *present,
            Requirement::Arch(a) => env.arch == *a,
            Requirement::Gpu(g) => env
                .gpus
                .iter()
                .any(|n| n.to_lowercase().contains(&g.to_lowercase())),
        }
    }

    /// `libtorch <2.2, here 2.11.0+cu130`.
    pub fn describe(&self, env: &Environment) -> String {
        let want = match self {
            Requirement::Version { library, req } => format!("{library} {req}"),
            Requirement::CpuFlag {
                flag,
                present: true,
            } => format!("cpu_flag {flag}"),
            Requirement::CpuFlag {
                flag,
                present: false,
            } => format!("cpu_flag !{flag}"),
            Requirement::Arch(a) => format!("arch {a}"),
            Requirement::Gpu(g) => format!("gpu {g}"),
        };
        match (self, self.observed(env)) {
            (Requirement::CpuFlag { .. }, _) => want,
            (_, Some(v)) if !v.is_empty() => format!("{want}, here {v}"),
            _ => format!("{want}, here none"),
        }
    }
}

/// A rule ready to apply.
#[derive(Debug, Clone)]
pub struct Expectation {
    /// The rule as written (its reason trimmed); `--record` carries it over as it is.
    pub written: RawExpectation,
    /// `written.error`, compiled.
    pub error: Option<Regex>,
    /// `written.when`, compiled.
    pub when: Vec<Requirement>,
    /// `file:line` of the rule: where to edit it when it is out of date.
    pub source: String,
}

/// A problem in one rule: (message, help).
pub type RuleError = (String, String);

fn compile_when(w: &When) -> Result<Vec<Requirement>, RuleError> {
    let mut out = Vec::new();
    for (library, text) in [
        ("libtorch", &w.libtorch),
        ("tch", &w.tch),
        ("candle", &w.candle),
        ("cuda", &w.cuda),
    ] {
        if let Some(text) = text {
            let req = VersionReq::parse(text).map_err(|e| {
                (
                    format!("when.{library}: `{text}` is not a version requirement ({e})"),
                    "write a comparison such as \">=2.2\", \"<2.2\" or \">=2.1, <2.3\" (quote it in YAML)"
                        .to_string(),
                )
            })?;
            out.push(Requirement::Version { library, req });
        }
    }
    for f in values(&w.cpu_flag) {
        let (flag, present) = match f.strip_prefix('!') {
            Some(rest) => (rest.to_string(), false),
            None => (f.to_string(), true),
        };
        if !RELEVANT_CPU_FLAGS.contains(&flag.as_str()) {
            return Err((
                format!("when.cpu_flag: `{flag}` is not a CPU flag peft-compat records"),
                format!(
                    "recorded flags (as /proc/cpuinfo spells them; `!flag` means absent): {}",
                    RELEVANT_CPU_FLAGS.join(", ")
                ),
            ));
        }
        out.push(Requirement::CpuFlag { flag, present });
    }
    if let Some(a) = &w.arch {
        out.push(Requirement::Arch(a.clone()));
    }
    if let Some(g) = &w.gpu {
        out.push(Requirement::Gpu(g.clone()));
    }
    Ok(out)
}

impl Expectation {
    pub fn compile(raw: &RawExpectation, source: String) -> Result<Expectation, RuleError> {
        if raw.reason.trim().is_empty() {
            return Err((
                "an expectation needs a reason".into(),
                "say why the case behaves so (the cause, an issue link): it is printed beside the case"
                    .into(),
            ));
        }
        let error = match &raw.error {
            None => None,
            Some(_) if !raw.expect.has_text() => {
                return Err((
                    format!("`error` does not apply to `expect: {}`", raw.expect),
                    "only unsupported, crashed, timeout, fail and flaky failures carry an error text; drop `error`"
                        .into(),
                ))
            }
            Some(p) => Some(Regex::new(p).map_err(|e| {
                (
                    format!("`error` is not a valid regular expression: {e}"),
                    "escape special characters (e.g. \\( \\. \\[) or use a plain substring".into(),
                )
            })?),
        };
        let when = raw.when.as_ref().map(compile_when).transpose()?;
        let mut written = raw.clone();
        written.reason = raw.reason.trim().to_string();
        Ok(Expectation {
            written,
            error,
            when: when.unwrap_or_default(),
            source,
        })
    }

    /// Whether every `when` condition holds in this environment.
    pub fn active(&self, env: &Environment) -> bool {
        self.when.iter().all(|r| r.holds(env))
    }
}

/// Compile the `expectations:` section: each rule located at its line, and each one governing
/// at least one case of the matrix (a rule that matches none is out of date or misspelt).
pub fn compile_all(
    raw: &[RawExpectation],
    cases: &[Case],
    src: &Source,
) -> Result<Vec<Expectation>, MatrixError> {
    let section_line = src.locate("expectations:", 1).0;
    let lines = src.item_lines("expectations");
    let mut out = Vec::new();
    for (i, e) in raw.iter().enumerate() {
        let line = lines.get(i).copied().or(section_line);
        let source = match line {
            Some(l) => format!("{}:{l}", src.path.display()),
            None => format!("{} expectation {}", src.path.display(), i + 1),
        };
        let rule = Expectation::compile(e, source).map_err(|(message, help)| {
            src.error(
                (line, None),
                format!("expectation {}: {message}", i + 1),
                help,
            )
        })?;
        let pattern = &rule.written.pattern;
        if !cases.iter().any(|c| pattern.matches(&c.coords())) {
            // The keys that, dropped alone, would let the rule match: the ones to look at.
            let culprits: Vec<String> = pattern
                .each_key_dropped()
                .into_iter()
                .filter(|(_, p)| cases.iter().any(|c| p.matches(&c.coords())))
                .map(|(k, _)| format!("`{k}`"))
                .collect();
            let why = match culprits.len() {
                0 => "no single key is to blame: the keys together select nothing".to_string(),
                1 => format!(
                    "its {} key leaves out every case the other keys select",
                    culprits[0]
                ),
                _ => format!(
                    "each of its {} keys alone leaves out every case the others select",
                    culprits.join(", ")
                ),
            };
            return Err(src.error(
                (line, None),
                format!("expectation {} matches no case of the matrix: {why}", i + 1),
                "a rule that governs nothing is out of date or misspelt: fix that key (compare \
                 with `peft-compat list`) or remove the rule",
            ));
        }
        out.push(rule);
    }
    Ok(out)
}
