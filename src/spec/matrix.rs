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
//! shapes:                    # named layer geometries (optional when `weights:` is given)
//!   small: {batch: 4, in_features: 64, out_features: 32, rank: 8, alpha: 16, bias: true, rslora: false}
//!   # conv2d also reads `kernel` (default 3) and `image` (default 8)
//! weights:                   # real layers from a checkpoint, used like shapes: see `checkpoint`
//!   minilm: {file: ckpt/model.safetensors, tensors: ["encoder.layer.*.attention.self.query.weight"], batch: 4, rank: 8, alpha: 16}
//! exclude:                   # drop every combination matching all the keys given
//!   - {dtype: [f32, f64], precision: upcast}
//! include:                   # add one combination (all six axes); shape optional = every shape
//!   - {backend: tch, device: cpu, dtype: f32, adapter: dora, op: init, precision: upcast}
//! tolerances:                # later rules win; `factor` scales the model, `rel` replaces it
//!   - {dtype: bf16, op: unmerge, factor: 2}
//! expectations:              # expected outcomes with reasons; see `rules`
//!   - {backend: candle, dtype: bf16, adapter: dora, shape: small, expect: mismatch, reason: "..."}
//! ```

use super::expand::{self, Axes};
use super::pattern::{values, Pattern};
use super::rules::{self, Expectation, RawExpectation};
use super::validate::{MatrixError, Source};
use crate::case::{Case, Shape};
use crate::checkpoint::{Weights, WeightsSpec};
use crate::util::fnv1a;
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, HashSet};
use std::path::{Path, PathBuf};

/// The default ceiling on the number of cases one matrix may expand to.
pub const DEFAULT_MAX_CASES: usize = 100_000;

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

impl ToleranceRule {
    /// A rule gives `factor` or `rel`, each a positive number.
    fn check(&self, src: &Source) -> Result<(), MatrixError> {
        let bad = match (self.factor, self.rel) {
            (None, None) => Some("a tolerance rule needs `factor` or `rel`"),
            (Some(f), _) if !(f > 0.0 && f.is_finite()) => {
                Some("`factor` must be a positive number")
            }
            (_, Some(r)) if !(r > 0.0 && r.is_finite()) => Some("`rel` must be a positive number"),
            _ => None,
        };
        match bad {
            Some(msg) => Err(src.error_at(
                "tolerances:",
                msg,
                "e.g. `- {dtype: bf16, op: unmerge, factor: 2}`",
            )),
            None => Ok(()),
        }
    }
}

/// A shape's sizes fit a LoRA layer: positive dimensions, a rank within them, a kernel inside
/// the image, a finite alpha.
fn check_shape(s: &Shape, src: &Source) -> Result<(), MatrixError> {
    check_name(&s.name, src)?;
    check_sizes(s, src)
}

/// A shape's (or weights entry's) name: 1 to 64 of A-Z a-z 0-9 _ . -
fn check_name(name: &str, src: &Source) -> Result<(), MatrixError> {
    let valid = |c: char| c.is_ascii_alphanumeric() || matches!(c, '_' | '.' | '-');
    if name.is_empty() || name.len() > 64 || !name.chars().all(valid) {
        let printable: String = name.escape_debug().collect();
        // A name with control characters is written quoted with escapes: find its opening.
        let needle = match name.find(char::is_control) {
            None if !name.is_empty() => name.to_string(),
            Some(at) if at > 0 => format!("\"{}", &name[..at]),
            _ => "shapes:".to_string(),
        };
        return Err(src.error_in(
            "shapes",
            &needle,
            format!("shape name \"{printable}\": a shape name is 1 to 64 of A-Z a-z 0-9 _ . -"),
            "shape names become part of case ids and dump file names (`/` would split an id, and \
             two names must never give one id): rename it, e.g. llama_7b-q_proj",
        ));
    }
    Ok(())
}

/// A shape's sizes fit a LoRA layer.
fn check_sizes(s: &Shape, src: &Source) -> Result<(), MatrixError> {
    let name = &s.name;
    let fail = |message: String, help: &str| src.error_at(&format!("{name}:"), message, help);
    let zero = [
        ("batch", s.batch),
        ("in_features", s.in_features),
        ("out_features", s.out_features),
        ("rank", s.rank),
    ]
    .into_iter()
    .find(|(_, v)| *v == 0);
    if let Some((field, _)) = zero {
        return Err(fail(
            format!("shape `{name}`: {field} must be at least 1"),
            "give every dimension a positive size",
        ));
    }
    if s.rank > s.in_features.min(s.out_features) {
        return Err(fail(
            format!(
                "shape `{name}`: rank {} exceeds min(in_features, out_features)",
                s.rank
            ),
            "a LoRA rank is at most the smaller layer dimension",
        ));
    }
    if s.kernel == 0 || s.kernel > s.image {
        return Err(fail(
            format!(
                "shape `{name}`: kernel {} must be between 1 and image {}",
                s.kernel, s.image
            ),
            "a conv2d kernel (stride 1, no padding) fits inside the image, e.g. kernel: 3, image: 8",
        ));
    }
    if !s.alpha.is_finite() {
        return Err(fail(
            format!("shape `{name}`: alpha must be finite"),
            "use a number such as 16",
        ));
    }
    if s.groups == 0
        || ![s.in_features, s.out_features, s.rank]
            .iter()
            .all(|d| d.is_multiple_of(s.groups))
    {
        return Err(fail(
            format!(
                "shape `{name}`: groups {} must divide in_features {}, out_features {} and rank {}",
                s.groups, s.in_features, s.out_features, s.rank
            ),
            "a grouped Conv2d splits its channels, and PEFT its rank, into equal groups, e.g. groups: 2 with in_features: 8, out_features: 16, rank: 4",
        ));
    }
    if !(s.lr.is_finite() && s.lr > 0.0) {
        return Err(fail(
            format!("shape `{name}`: lr must be a positive number"),
            "the step op's SGD learning rate, e.g. lr: 0.001",
        ));
    }
    Ok(())
}

/// A matrix file as written.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
struct RawMatrix {
    seed: u64,
    #[serde(default)]
    max_cases: Option<usize>,
    axes: Axes,
    #[serde(default)]
    shapes: BTreeMap<String, Shape>,
    #[serde(default)]
    weights: BTreeMap<String, WeightsSpec>,
    #[serde(default)]
    exclude: Vec<Pattern>,
    #[serde(default)]
    include: Vec<Pattern>,
    #[serde(default)]
    tolerances: Vec<ToleranceRule>,
    #[serde(default)]
    expectations: Vec<RawExpectation>,
}

impl RawMatrix {
    /// Every section checked on its own (the expectations are checked as they compile, against
    /// the cases): the named shapes, in name order, then each checkpoint layer (`weights:`,
    /// resolved from the files' headers, paths relative to the matrix file's folder).
    fn validate(&self, src: &Source) -> Result<(Vec<Shape>, Weights), MatrixError> {
        self.axes.check(src)?;
        if self.shapes.is_empty() && self.weights.is_empty() {
            return Err(src.error_at(
                "shapes:",
                "no shapes given",
                "add at least one named shape under `shapes:` (or a checkpoint under `weights:`)",
            ));
        }
        let mut shapes = Vec::new();
        for (name, shape) in &self.shapes {
            let mut s = shape.clone();
            s.name = name.clone();
            check_shape(&s, src)?;
            self.check_draws(&s, src)?;
            shapes.push(s);
        }
        if let Some(name) = self.weights.keys().find(|w| self.shapes.contains_key(*w)) {
            return Err(src.error_in(
                "weights",
                &format!("{name}:"),
                format!("`{name}` names both a shape and a weights entry"),
                "rename one: both become the shape part of case ids",
            ));
        }
        for name in self.weights.keys() {
            check_name(name, src)?;
        }
        let base = src.path.parent().unwrap_or(Path::new("."));
        let (weights, layers) = Weights::resolve(&self.weights, base).map_err(|(entry, e)| {
            // The entry's line, or the line of the key at fault within it.
            let from = src.locate("weights:", 1).0.unwrap_or(1);
            let entry_at = src.locate(&format!("{entry}:"), from);
            let at = e
                .needle()
                .map(|n| src.locate(n, entry_at.0.unwrap_or(from)))
                .filter(|p| p.0.is_some())
                .unwrap_or(entry_at);
            src.error(at, format!("weights `{entry}`: {e}"), e.help())
        })?;
        shapes.extend(layers);
        self.check_shape_names(&shapes, src)?;
        expand::check_includes(&self.include, src)?;
        for t in &self.tolerances {
            t.check(src)?;
        }
        Ok((shapes, weights))
    }

    /// Every shape a rule names is defined: a shape, a weights entry (all its layers) or one
    /// of an entry's layers (`entry:module`).
    /// `draws: NAME` names another shape of the same geometry (so the values it draws fit).
    fn check_draws(&self, s: &Shape, src: &Source) -> Result<(), MatrixError> {
        let Some(other) = &s.draws else {
            return Ok(());
        };
        let geometry = |t: &Shape| {
            (
                t.batch,
                t.in_features,
                t.out_features,
                t.rank,
                t.kernel,
                t.image,
                t.groups,
            )
        };
        match self.shapes.get(other) {
            Some(t) if t.draws.is_none() && geometry(t) == geometry(s) => Ok(()),
            Some(t) if t.draws.is_some() => Err(src.error_in(
                "shapes",
                &format!("{}:", s.name),
                format!("shape `{}`: draws: {other} draws from another shape itself", s.name),
                "name the shape that draws from its own stream",
            )),
            Some(_) => Err(src.error_in(
                "shapes",
                &format!("{}:", s.name),
                format!(
                    "shape `{}`: draws: {other} has another geometry (batch, in/out features, rank, kernel, image, groups must be equal)",
                    s.name
                ),
                "draw from a shape of the same sizes, or drop `draws:`",
            )),
            None => Err(src.error_in(
                "shapes",
                &format!("{}:", s.name),
                format!("shape `{}`: draws: {other} is not a shape of this matrix", s.name),
                "name one of the shapes under `shapes:`",
            )),
        }
    }

    fn check_shape_names(&self, shapes: &[Shape], src: &Source) -> Result<(), MatrixError> {
        let shape_names: HashSet<&String> = shapes
            .iter()
            .map(|s| &s.name)
            .chain(self.weights.keys())
            .collect();
        let known = self
            .shapes
            .keys()
            .chain(self.weights.keys())
            .cloned()
            .collect::<Vec<_>>()
            .join(", ");
        let patterns = self
            .exclude
            .iter()
            .map(|p| ("exclude", p))
            .chain(self.include.iter().map(|p| ("include", p)))
            .chain(self.tolerances.iter().map(|t| ("tolerances", &t.pattern)))
            .chain(
                self.expectations
                    .iter()
                    .map(|e| ("expectations", &e.pattern)),
            );
        for (section, p) in patterns {
            if let Some(s) = values(&p.shape).iter().find(|s| !shape_names.contains(s)) {
                return Err(src.error_in(
                    section,
                    s,
                    format!("{section}: unknown shape `{s}`"),
                    format!("shapes defined in this file: {known}"),
                ));
            }
        }
        Ok(())
    }
}

/// A validated matrix, expanded into cases.
#[derive(Debug, Clone)]
pub struct Matrix {
    pub path: PathBuf,
    /// FNV-1a of the file's text, as hex: the results stream's header ties a resumed run to
    /// the very file it started from.
    pub fingerprint: String,
    pub seed: u64,
    pub cases: Vec<Case>,
    pub tolerances: Vec<ToleranceRule>,
    /// Expected outcomes with reasons (see [`super::rules`]), in file order; later rules win.
    pub expectations: Vec<Expectation>,
    /// The checkpoint layers that stand in for shapes (`weights:`), by shape name.
    pub weights: Weights,
}

impl Matrix {
    /// Read (once), validate and expand a matrix file.
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

    /// Validate and expand matrix text; `path` only labels errors. Deserialize, validate each
    /// section, expand into cases, compile the expectations against them.
    pub fn parse(src: &str, path: &Path, max_cases: Option<usize>) -> Result<Matrix, MatrixError> {
        let source = Source::new(src, path);
        let raw: RawMatrix = source.deserialize()?;
        let (shapes, weights) = raw.validate(&source)?;
        let limit = max_cases.or(raw.max_cases).unwrap_or(DEFAULT_MAX_CASES);
        let cases = expand::expand(
            &raw.axes,
            &shapes,
            &|s| weights.pin(s),
            &raw.exclude,
            &raw.include,
            limit,
            &source,
        )?;
        let expectations = rules::compile_all(&raw.expectations, &cases, &source)?;
        Ok(Matrix {
            path: path.to_path_buf(),
            fingerprint: format!("{:016x}", fnv1a(src.as_bytes())),
            seed: raw.seed,
            cases,
            tolerances: raw.tolerances,
            expectations,
            weights,
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
