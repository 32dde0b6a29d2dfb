//! Matrix files: the YAML schema, its validation (errors carry file, line and column), and the
//! expansion into cases.
//!
//! ```yaml
//! seed: 1597                 # one generator for every input
//! max_cases: 100000          # optional; refuse bigger expansions before running anything
//! axes:                      # every combination of these is a case (per shape)
//!   backend: [tch, candle]
//!   device: [cpu, cuda]      # cuda = cuda:0; cuda:N also accepted
//!   dtype: [f32, f16, bf16, f64]
//!   adapter: [lora, dora]
//!   op: [init, forward, backward, merge, unmerge]
//!   precision: [native, upcast, autocast]
//!   layer: [linear, embedding, conv2d]           # optional, default [linear]
//!   profile: [normal, llm, zero_rows, large, tiny] # optional, default [normal]
//! shapes:                    # one or more named layer geometries
//!   small: {batch: 4, in_features: 64, out_features: 32, rank: 8, alpha: 16, bias: true, rslora: false}
//!   # conv2d also reads `kernel` (default 3) and `image` (default 8)
//! exclude:                   # drop every combination matching all the keys given
//!   - {dtype: [f32, f64], precision: upcast}
//! include:                   # add one combination (all six axes); shape optional = every shape
//!   - {backend: tch, device: cpu, dtype: f32, adapter: dora, op: init, precision: upcast}
//! tolerances:                # later rules win; `factor` scales the model, `rel` replaces it
//!   - {dtype: bf16, op: unmerge, factor: 2}
//! expectations:              # expected outcomes with reasons; see `expect`
//!   - {backend: candle, dtype: bf16, adapter: dora, shape: small, expect: mismatch, reason: "..."}
//! ```

use crate::case::{
    Adapter, Backend, Case, Coords, DType, Device, Layer, Op, Precision, Profile, Shape,
};
use crate::expect::{Expectation, RawExpectation};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

/// The default ceiling on the number of cases one matrix may expand to.
pub const DEFAULT_MAX_CASES: usize = 100_000;

/// A problem with a matrix file, located as precisely as the YAML allows.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("{}{}\n  help: {help}", location(.path, *.line, *.column), .message)]
pub struct MatrixError {
    pub path: PathBuf,
    pub line: Option<usize>,
    pub column: Option<usize>,
    pub message: String,
    pub help: String,
}

fn location(path: &Path, line: Option<usize>, column: Option<usize>) -> String {
    match (line, column) {
        (Some(l), Some(c)) => format!("{}:{l}:{c}: ", path.display()),
        (Some(l), None) => format!("{}:{l}: ", path.display()),
        _ => format!("{}: ", path.display()),
    }
}

/// The values an optional key lists; none when the key is absent.
pub fn values<T>(o: &Option<OneOrMany<T>>) -> &[T] {
    o.as_ref().map_or(&[], OneOrMany::as_slice)
}

/// One axis value or a list of them.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(untagged)]
pub enum OneOrMany<T> {
    One(T),
    Many(Vec<T>),
}

impl<T> OneOrMany<T> {
    pub fn as_slice(&self) -> &[T] {
        match self {
            OneOrMany::One(x) => std::slice::from_ref(x),
            OneOrMany::Many(xs) => xs,
        }
    }

    fn contains<Q: ?Sized>(&self, v: &Q) -> bool
    where
        T: PartialEq<Q>,
    {
        self.as_slice().iter().any(|x| x == v)
    }
}

/// A case pattern: every key given must match; absent keys match anything.
#[derive(Debug, Clone, Default, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct Pattern {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub backend: Option<OneOrMany<Backend>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub device: Option<OneOrMany<Device>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub dtype: Option<OneOrMany<DType>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adapter: Option<OneOrMany<Adapter>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub op: Option<OneOrMany<Op>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub precision: Option<OneOrMany<Precision>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub layer: Option<OneOrMany<Layer>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub profile: Option<OneOrMany<Profile>>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub shape: Option<OneOrMany<String>>,
}

impl Pattern {
    pub fn matches(&self, c: &Coords) -> bool {
        fn ok<T: PartialEq<Q>, Q: ?Sized>(p: &Option<OneOrMany<T>>, v: &Q) -> bool {
            p.as_ref().is_none_or(|p| p.contains(v))
        }
        self.backend
            .as_ref()
            .is_none_or(|p| p.as_slice().iter().any(|&b| c.backend.matches(b)))
            && ok(&self.device, &c.device)
            && ok(&self.dtype, &c.dtype)
            && ok(&self.adapter, &c.adapter)
            && ok(&self.op, &c.op)
            && ok(&self.precision, &c.precision)
            && ok(&self.layer, &c.layer)
            && ok(&self.profile, &c.profile)
            && ok(&self.shape, c.shape)
    }
}

/// One tolerance rule: a pattern plus `factor` (scales the model) or `rel` (replaces it).
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct ToleranceRule {
    #[serde(flatten)]
    pub pattern: Pattern,
    #[serde(default)]
    pub factor: Option<f64>,
    #[serde(default)]
    pub rel: Option<f64>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct Axes {
    backend: Vec<Backend>,
    device: Vec<Device>,
    dtype: Vec<DType>,
    adapter: Vec<Adapter>,
    op: Vec<Op>,
    precision: Vec<Precision>,
    #[serde(default = "linear_only")]
    layer: Vec<Layer>,
    #[serde(default = "normal_only")]
    profile: Vec<Profile>,
}

fn linear_only() -> Vec<Layer> {
    vec![Layer::Linear]
}

fn normal_only() -> Vec<Profile> {
    vec![Profile::Normal]
}

/// Lists of axis values whose every combination (with every shape) is a candidate case.
struct Product<'a> {
    backend: &'a [Backend],
    device: &'a [Device],
    dtype: &'a [DType],
    adapter: &'a [Adapter],
    op: &'a [Op],
    precision: &'a [Precision],
    layer: &'a [Layer],
    profile: &'a [Profile],
}

impl Product<'_> {
    /// Each axis's number of values, outermost (slowest-varying) first, in table order.
    fn sizes(&self) -> [usize; 8] {
        [
            self.backend.len(),
            self.device.len(),
            self.dtype.len(),
            self.layer.len(),
            self.profile.len(),
            self.adapter.len(),
            self.op.len(),
            self.precision.len(),
        ]
    }

    fn len(&self) -> usize {
        self.sizes()
            .iter()
            .try_fold(1usize, |acc, &n| acc.checked_mul(n))
            .unwrap_or(usize::MAX)
    }

    /// Every combination for `shape`, in table order (the last axis varies fastest), without
    /// the ones that are not cases ([`Case::not_a_case`]).
    fn for_each(&self, shape: &Shape, mut f: impl FnMut(Case)) {
        let sizes = self.sizes();
        if sizes.contains(&0) {
            return;
        }
        let mut at = [0usize; 8];
        loop {
            let case = Case {
                backend: self.backend[at[0]],
                device: self.device[at[1]],
                dtype: self.dtype[at[2]],
                layer: self.layer[at[3]],
                profile: self.profile[at[4]],
                adapter: self.adapter[at[5]],
                op: self.op[at[6]],
                precision: self.precision[at[7]],
                shape: shape.clone(),
            };
            if case.not_a_case().is_none() {
                f(case);
            }
            // Advance like an odometer; done when the outermost axis rolls over.
            let mut axis = sizes.len();
            loop {
                if axis == 0 {
                    return;
                }
                axis -= 1;
                at[axis] += 1;
                if at[axis] < sizes[axis] {
                    break;
                }
                at[axis] = 0;
            }
        }
    }
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMatrix {
    seed: u64,
    #[serde(default)]
    max_cases: Option<usize>,
    axes: Axes,
    shapes: BTreeMap<String, Shape>,
    #[serde(default)]
    exclude: Vec<Pattern>,
    #[serde(default)]
    include: Vec<Pattern>,
    #[serde(default)]
    tolerances: Vec<ToleranceRule>,
    #[serde(default)]
    expectations: Vec<RawExpectation>,
}

/// A validated matrix, expanded into cases.
#[derive(Debug, Clone)]
pub struct Matrix {
    pub path: PathBuf,
    pub seed: u64,
    pub cases: Vec<Case>,
    pub tolerances: Vec<ToleranceRule>,
    /// Expected outcomes with reasons (see [`crate::expect`]), in file order; later rules win.
    pub expectations: Vec<Expectation>,
}

const HELP_AXES: &str =
    "axes take: backend: tch, tch@2.1.2, candle; device: cpu, cuda, cuda:N; dtype: f32, f16, bf16, f64; \
adapter: lora, dora, pissa, pissa_dora, olora; op: init, forward, backward, merge, unmerge, init_noop, parity, \
roundtrip; precision: native, upcast, autocast; layer: linear, embedding, conv2d; profile: normal, llm, zero_rows, \
large, tiny (see matrices/default.yaml and matrices/failures.yaml for complete files)";

/// 1-based line and column of the first occurrence of `needle` at or after line `from`.
fn locate(src: &str, needle: &str, from: usize) -> (Option<usize>, Option<usize>) {
    for (i, line) in src.lines().enumerate().skip(from.saturating_sub(1)) {
        if let Some(c) = line.find(needle) {
            return (Some(i + 1), Some(c + 1));
        }
    }
    (None, None)
}

/// 1-based line of each item of the block sequence under the top-level key `section`, in
/// order; empty when the section is written in flow style (`[...]`) or absent.
fn item_lines(src: &str, section: &str) -> Vec<usize> {
    let key = format!("{section}:");
    let mut lines = src.lines().enumerate();
    if !lines.any(|(_, l)| l.starts_with(&key)) {
        return vec![];
    }
    let mut indent = None;
    let mut out = Vec::new();
    for (i, line) in lines {
        let body = line.trim_start();
        if body.is_empty() || body.starts_with('#') {
            continue;
        }
        let ind = line.len() - body.len();
        if ind == 0 && !body.starts_with('-') {
            break;
        }
        if (body.starts_with("- ") || body == "-") && *indent.get_or_insert(ind) == ind {
            out.push(i + 1);
        }
    }
    out
}

impl Matrix {
    /// Read, validate and expand a matrix file.
    pub fn load(path: &Path, max_cases: Option<usize>) -> Result<Matrix, MatrixError> {
        let src = std::fs::read_to_string(path).map_err(|e| MatrixError {
            path: path.to_path_buf(),
            line: None,
            column: None,
            message: format!("cannot read the matrix file: {e}"),
            help: "pass the path of a YAML matrix file, e.g. matrices/default.yaml".into(),
        })?;
        Matrix::parse(&src, path, max_cases)
    }

    /// Validate and expand matrix text; `path` only labels errors.
    pub fn parse(src: &str, path: &Path, max_cases: Option<usize>) -> Result<Matrix, MatrixError> {
        let fail = |line, column, message: String, help: &str| MatrixError {
            path: path.to_path_buf(),
            line,
            column,
            message,
            help: help.to_string(),
        };
        let raw: RawMatrix = serde_yaml::from_str(src).map_err(|e| {
            let loc = e.location();
            let text = e.to_string();
            // serde_yaml appends " at line L column C"; the location is shown up front instead.
            let message = text
                .rsplit_once(" at line ")
                .map(|(m, _)| m.to_string())
                .unwrap_or(text);
            let help = if message.contains("unknown variant") || message.contains("unknown device")
            {
                HELP_AXES
            } else if message.starts_with("expectations") && (message.contains("unknown field") || message.contains("missing field")) {
                "an expectation takes a case pattern (backend, device, dtype, adapter, op, precision, layer, profile, shape), \
                 expect (pass, mismatch, nonfinite, unsupported, crashed, timeout, fail, flaky), reason, and optionally \
                 error (a regular expression) and when (libtorch, tch, candle, cuda, cpu_flag, arch, gpu)"
            } else if message.starts_with("expectations") && message.contains("unknown variant") {
                "expect takes: pass, mismatch, nonfinite, unsupported, crashed, timeout, fail (any failure), flaky (pass or fail)"
            } else if message.contains("unknown field") || message.contains("missing field") {
                "top-level keys: seed, max_cases, axes, shapes, exclude, include, tolerances, expectations; \
                 a shape takes batch, in_features, out_features, rank, alpha, bias, rslora, kernel, image"
            } else {
                "check the YAML syntax near this position (indentation, a missing ':' or ']')"
            };
            fail(
                loc.as_ref().map(|l| l.line()),
                loc.as_ref().map(|l| l.column()),
                message,
                help,
            )
        })?;

        let axes = &raw.axes;
        for (name, empty) in [
            ("backend", axes.backend.is_empty()),
            ("device", axes.device.is_empty()),
            ("dtype", axes.dtype.is_empty()),
            ("adapter", axes.adapter.is_empty()),
            ("op", axes.op.is_empty()),
            ("precision", axes.precision.is_empty()),
            ("layer", axes.layer.is_empty()),
            ("profile", axes.profile.is_empty()),
        ] {
            if empty {
                let (l, c) = locate(src, &format!("{name}:"), 1);
                return Err(fail(l, c, format!("axis `{name}` is empty"), HELP_AXES));
            }
        }
        if raw.shapes.is_empty() {
            let (l, c) = locate(src, "shapes:", 1);
            return Err(fail(
                l,
                c,
                "no shapes given".into(),
                "add at least one named shape under `shapes:`",
            ));
        }
        let mut shapes = Vec::new();
        for (name, shape) in &raw.shapes {
            let mut s = shape.clone();
            s.name = name.clone();
            let zero = [
                ("batch", s.batch),
                ("in_features", s.in_features),
                ("out_features", s.out_features),
                ("rank", s.rank),
            ]
            .into_iter()
            .find(|(_, v)| *v == 0);
            if let Some((field, _)) = zero {
                let (l, c) = locate(src, &format!("{name}:"), 1);
                return Err(fail(
                    l,
                    c,
                    format!("shape `{name}`: {field} must be at least 1"),
                    "give every dimension a positive size",
                ));
            }
            if s.rank > s.in_features.min(s.out_features) {
                let (l, c) = locate(src, &format!("{name}:"), 1);
                return Err(fail(
                    l,
                    c,
                    format!(
                        "shape `{name}`: rank {} exceeds min(in_features, out_features)",
                        s.rank
                    ),
                    "a LoRA rank is at most the smaller layer dimension",
                ));
            }
            if s.kernel == 0 || s.kernel > s.image {
                let (l, c) = locate(src, &format!("{name}:"), 1);
                return Err(fail(
                    l,
                    c,
                    format!(
                        "shape `{name}`: kernel {} must be between 1 and image {}",
                        s.kernel, s.image
                    ),
                    "a conv2d kernel (stride 1, no padding) fits inside the image, e.g. kernel: 3, image: 8",
                ));
            }
            if !s.alpha.is_finite() {
                let (l, c) = locate(src, &format!("{name}:"), 1);
                return Err(fail(
                    l,
                    c,
                    format!("shape `{name}`: alpha must be finite"),
                    "use a number such as 16",
                ));
            }
            shapes.push(s);
        }
        let shape_names: HashSet<&String> = raw.shapes.keys().collect();
        let known = raw.shapes.keys().cloned().collect::<Vec<_>>().join(", ");
        let patterns = raw
            .exclude
            .iter()
            .map(|p| ("exclude", p))
            .chain(raw.include.iter().map(|p| ("include", p)))
            .chain(raw.tolerances.iter().map(|t| ("tolerances", &t.pattern)))
            .chain(
                raw.expectations
                    .iter()
                    .map(|e| ("expectations", &e.pattern)),
            );
        for (section, p) in patterns {
            for s in values(&p.shape) {
                if !shape_names.contains(s) {
                    let from = locate(src, &format!("{section}:"), 1).0.unwrap_or(1);
                    let (l, c) = locate(src, s, from);
                    return Err(fail(
                        l,
                        c,
                        format!("{section}: unknown shape `{s}`"),
                        &format!("shapes defined in this file: {known}"),
                    ));
                }
            }
        }
        for (i, p) in raw.include.iter().enumerate() {
            let missing: Vec<&str> = [
                ("backend", p.backend.is_none()),
                ("device", p.device.is_none()),
                ("dtype", p.dtype.is_none()),
                ("adapter", p.adapter.is_none()),
                ("op", p.op.is_none()),
                ("precision", p.precision.is_none()),
            ]
            .into_iter()
            .filter_map(|(n, m)| m.then_some(n))
            .collect();
            if !missing.is_empty() {
                let (l, c) = locate(src, "include:", 1);
                return Err(fail(
                    l,
                    c,
                    format!("include entry {} does not name {}", i + 1, missing.join(", ")),
                    "an include entry adds combinations, so it names every axis (values may be lists); `shape` is optional",
                ));
            }
        }
        for t in &raw.tolerances {
            let bad = match (t.factor, t.rel) {
                (None, None) => Some("a tolerance rule needs `factor` or `rel`"),
                (Some(f), _) if !(f > 0.0 && f.is_finite()) => {
                    Some("`factor` must be a positive number")
                }
                (_, Some(r)) if !(r > 0.0 && r.is_finite()) => {
                    Some("`rel` must be a positive number")
                }
                _ => None,
            };
            if let Some(msg) = bad {
                let (l, c) = locate(src, "tolerances:", 1);
                return Err(fail(
                    l,
                    c,
                    msg.into(),
                    "e.g. `- {dtype: bf16, op: unmerge, factor: 2}`",
                ));
            }
        }

        let limit = max_cases.or(raw.max_cases).unwrap_or(DEFAULT_MAX_CASES);
        let product = Product {
            backend: &axes.backend,
            device: &axes.device,
            dtype: &axes.dtype,
            adapter: &axes.adapter,
            op: &axes.op,
            precision: &axes.precision,
            layer: &axes.layer,
            profile: &axes.profile,
        };
        let full = product.len().saturating_mul(shapes.len());
        let too_many = |count: usize, when: &str| {
            let (l, c) = locate(src, "axes:", 1);
            fail(
                l,
                c,
                format!("the matrix expands to {count} cases{when}, over the limit of {limit}"),
                "narrow the axes or shapes, add exclude rules, or raise the limit with `max_cases:` or --max-cases",
            )
        };
        // Expanding is linear in the full product; refuse absurd products before walking them.
        if full / 100 > limit {
            return Err(too_many(full, " before exclude rules"));
        }

        let mut cases = Vec::new();
        let mut seen = HashSet::new();
        let mut push = |case: Case, cases: &mut Vec<Case>| {
            if seen.insert(case.id()) {
                cases.push(case);
            }
        };
        for shape in &shapes {
            product.for_each(shape, |case| {
                if !raw.exclude.iter().any(|p| p.matches(&case.coords())) {
                    push(case, &mut cases);
                }
            });
        }
        for p in &raw.include {
            let included = Product {
                backend: values(&p.backend),
                device: values(&p.device),
                dtype: values(&p.dtype),
                adapter: values(&p.adapter),
                op: values(&p.op),
                precision: values(&p.precision),
                layer: p.layer.as_ref().map_or(&axes.layer, OneOrMany::as_slice),
                profile: p
                    .profile
                    .as_ref()
                    .map_or(&axes.profile, OneOrMany::as_slice),
            };
            for shape in shapes
                .iter()
                .filter(|s| p.shape.as_ref().is_none_or(|n| n.contains(&s.name)))
            {
                included.for_each(shape, |case| push(case, &mut cases));
            }
        }
        if cases.len() > limit {
            return Err(too_many(cases.len(), ""));
        }
        if cases.is_empty() {
            // PiSSA/OLoRA combinations that are not cases at all (`Case::not_a_case`) can empty
            // a matrix before any exclude rule does: say so, not "the exclude rules".
            let data_init_only = axes.adapter.iter().all(|a| a.is_data_init());
            let no_init = !axes.op.iter().any(|o| matches!(o, Op::Init | Op::InitNoop));
            let no_linear = !axes.layer.contains(&Layer::Linear);
            if data_init_only && (no_init || no_linear) {
                let (l, c) = locate(src, "adapter:", 1);
                return Err(fail(
                    l,
                    c,
                    "no combination of the axes is a case".into(),
                    "pissa, pissa_dora and olora run `init` and `init_noop` on `linear` layers only (once \
                     initialised they are LoRA/DoRA adapters): add those values, or lora/dora",
                ));
            }
            let (l, c) = locate(src, "exclude:", 1);
            return Err(fail(
                l,
                c,
                "the exclude rules remove every case".into(),
                "loosen the exclude rules",
            ));
        }
        let section_line = locate(src, "expectations:", 1).0;
        let lines = item_lines(src, "expectations");
        let mut expectations = Vec::new();
        for (i, e) in raw.expectations.iter().enumerate() {
            let line = lines.get(i).copied().or(section_line);
            let source = match line {
                Some(l) => format!("{}:{l}", path.display()),
                None => format!("{} expectation {}", path.display(), i + 1),
            };
            let rule = Expectation::compile(e, source).map_err(|(message, help)| {
                fail(
                    line,
                    None,
                    format!("expectation {}: {message}", i + 1),
                    &help,
                )
            })?;
            if !cases
                .iter()
                .any(|c| rule.written.pattern.matches(&c.coords()))
            {
                return Err(fail(
                    line,
                    None,
                    format!("expectation {} matches no case of the matrix", i + 1),
                    "a rule that governs nothing is out of date or misspelt: fix its pattern or remove it",
                ));
            }
            expectations.push(rule);
        }
        Ok(Matrix {
            path: path.to_path_buf(),
            seed: raw.seed,
            cases,
            tolerances: raw.tolerances,
            expectations,
        })
    }

    /// The tolerance factor and outright relative tolerance for a case (later rules win).
    pub fn tolerance_for(&self, case: &Case) -> (f64, Option<f64>) {
        let mut factor = 1.0;
        let mut rel = None;
        for rule in self
            .tolerances
            .iter()
            .filter(|r| r.pattern.matches(&case.coords()))
        {
            if let Some(f) = rule.factor {
                factor = f;
            }
            if rule.rel.is_some() {
                rel = rule.rel;
            }
        }
        (factor, rel)
    }
}
