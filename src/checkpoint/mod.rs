//! Real layers from a checkpoint: the matrix's `weights:` section.
//!
//! An entry names a safetensors checkpoint (one file, or a folder of shards with
//! `model.safetensors.index.json`), globs over its tensor names and the layer kind; each
//! matched tensor becomes one layer that takes the place of a shape, named
//! `<entry>:<module>` (the tensor's name without its `.weight`). Its weight is the stored
//! tensor, its bias the sibling `<module>.bias` when there is one; an optional adapter folder
//! saved by PEFT's `save_pretrained` gives lora_A, lora_B and DoRA's magnitude (and r,
//! lora_alpha, use_dora, use_rslora, overriding the entry's). Activations are always drawn
//! from the seed.
//!
//! ```yaml
//! weights:
//!   minilm:
//!     file: ckpt/model.safetensors   # relative to the matrix file's folder
//!     tensors: ["encoder.layer.*.attention.self.query.weight"]
//!     limit: 4                       # optional: the first N matches in name order
//!     layer: linear                  # linear (2-D weight), embedding (2-D), conv2d (4-D)
//!     batch: 4
//!     rank: 8                        # rank and alpha: required without an adapter
//!     alpha: 16
//!     rslora: false
//!     image: 8                       # conv2d only: the input image's side
//!     adapter: ckpt/adapter          # optional
//! ```
//!
//! Globs match whole tensor names: `*` within one dot-separated part, `**` across parts
//! (globset, with `.` as the separator). Everything is checked when the matrix loads, from the
//! files' headers alone; a tensor's data is read when its first case runs ([`files`]).

pub mod adapter;
pub mod files;

use crate::case::{Adapter, DType, Layer, Shape};
use crate::worker::tensor::HostTensor;
use adapter::{ModuleAdapter, SavedAdapter};
use files::{dtype_name, is_float, Checkpoint, FileRecord, TensorRef};
use serde::{Deserialize, Serialize};
use std::collections::{BTreeMap, BTreeSet};
use std::path::{Path, PathBuf};
use std::sync::Arc;

/// What is wrong with a `weights:` entry or the files it names. The matrix loader turns each
/// into a located error (the entry's line) with [`WeightsError::help`].
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
pub enum WeightsError {
    #[error("cannot open {}: {why}", path.display())]
    Missing { path: PathBuf, why: String },
    #[error("{} is not a readable safetensors file: {why}", path.display())]
    Corrupt { path: PathBuf, why: String },
    #[error("tensors pattern `{pattern}` matches no tensor of {}", file.display())]
    NoMatch {
        pattern: String,
        file: PathBuf,
        closest: Vec<String>,
    },
    #[error("tensor `{tensor}` of {} has shape {shape:?}: {want}", file.display())]
    Rank {
        file: PathBuf,
        tensor: String,
        shape: Vec<usize>,
        want: String,
    },
    #[error("{0}")]
    AdapterShape(Box<AdapterMismatch>),
    #[error("{0}")]
    Adapter(String),
    #[error("{0}")]
    Spec(String),
}

/// A saved adapter tensor that does not fit its base layer: both shapes, and the one needed.
#[derive(Debug, Clone, PartialEq, thiserror::Error)]
#[error("adapter tensor `{name}` of {} has shape {got:?} but the base layer `{tensor}` (shape {base:?}) needs {want:?}", file.display())]
pub struct AdapterMismatch {
    pub file: PathBuf,
    pub name: String,
    pub got: Vec<usize>,
    pub tensor: String,
    pub base: Vec<usize>,
    pub want: Vec<usize>,
}

impl WeightsError {
    /// How to fix it.
    pub fn help(&self) -> String {
        match self {
            WeightsError::Missing { .. } => "give the path of a .safetensors file, or of a folder holding one or model.safetensors.index.json with its shards (relative paths start at the matrix file's folder); an adapter is a folder saved by PEFT's save_pretrained".into(),
            WeightsError::Corrupt { .. } => "the header or index cannot be read: re-save the checkpoint (safetensors.torch.save_file, or save_pretrained), or point `file:` at an intact copy".into(),
            WeightsError::NoMatch { closest, .. } if closest.is_empty() => "the checkpoint holds no tensor at all".into(),
            WeightsError::NoMatch { closest, .. } => format!(
                "`*` matches within one dot-separated part, `**` across parts; the closest tensor names: {}",
                closest.join(", ")
            ),
            WeightsError::Rank { .. } => "match only tensors of the entry's `layer` (linear and embedding take 2-D weights, conv2d 4-D ones with a square kernel), or change `layer:`".into(),
            WeightsError::AdapterShape(_) => "the adapter was trained on another model (or another version of it): point `adapter:` at the one saved for this checkpoint".into(),
            WeightsError::Adapter(_) => "narrow `tensors:` to the modules the adapter adapts, or drop `adapter:` to draw A and B from the seed".into(),
            WeightsError::Spec(_) => "see the `weights:` section in the README".into(),
        }
    }

    /// What to point at within the entry: the pattern, or the key whose value is at fault
    /// (`None`: the entry's name).
    pub fn needle(&self) -> Option<&str> {
        let adapter_file = |p: &Path| {
            p.file_name()
                .is_some_and(|n| n == adapter::CONFIG || n == adapter::WEIGHTS)
        };
        match self {
            WeightsError::NoMatch { pattern, .. } => Some(pattern),
            WeightsError::Missing { path, .. } | WeightsError::Corrupt { path, .. }
                if adapter_file(path) =>
            {
                Some("adapter:")
            }
            WeightsError::Missing { .. } | WeightsError::Corrupt { .. } => Some("file:"),
            WeightsError::Rank { .. } => Some("tensors:"),
            WeightsError::AdapterShape(_) | WeightsError::Adapter(_) => Some("adapter:"),
            WeightsError::Spec(_) => None,
        }
    }
}

/// One `weights:` entry as written.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
#[serde(deny_unknown_fields)]
pub struct WeightsSpec {
    pub file: PathBuf,
    pub tensors: Vec<String>,
    #[serde(default)]
    pub limit: Option<usize>,
    #[serde(default = "linear")]
    pub layer: Layer,
    pub batch: usize,
    #[serde(default)]
    pub rank: Option<usize>,
    #[serde(default)]
    pub alpha: Option<f64>,
    #[serde(default)]
    pub rslora: bool,
    #[serde(default)]
    pub image: Option<usize>,
    #[serde(default)]
    pub adapter: Option<PathBuf>,
}

fn linear() -> Layer {
    Layer::Linear
}

/// One matched tensor: a layer of the checkpoint.
#[derive(Debug)]
pub struct CheckpointLayer {
    pub entry: String,
    /// The weight's stored name, e.g. `encoder.layer.0.attention.self.query.weight`.
    pub tensor: String,
    pub layer: Layer,
    pub weight: TensorRef,
    pub bias: Option<TensorRef>,
    pub adapter: Option<ModuleAdapter>,
    /// Why no backend can take this tensor (a quantized or fp8 stored dtype): its cases skip.
    pub unreadable: Option<String>,
}

impl CheckpointLayer {
    /// The stored dtype of the weight, as safetensors spells it.
    pub fn stored(&self) -> String {
        dtype_name(self.weight.dtype)
    }

    /// Read the weight, bias and adapter tensors (A, B, magnitude flattened), as f64.
    pub fn read(&self) -> Result<Stored, String> {
        let weight = self.weight.read()?;
        let bias = self.bias.as_ref().map(TensorRef::read).transpose()?;
        let adapter = match &self.adapter {
            None => None,
            Some(a) => {
                let magnitude = match &a.magnitude {
                    None => None,
                    Some(m) => {
                        let t = m.read()?;
                        let n = t.data.len();
                        Some(HostTensor::new(vec![n], t.data))
                    }
                };
                Some((a.lora_a.read()?, a.lora_b.read()?, magnitude))
            }
        };
        Ok(Stored {
            weight,
            bias,
            adapter,
        })
    }
}

/// A checkpoint layer's stored tensors as f64.
#[derive(Debug)]
pub struct Stored {
    pub weight: HostTensor,
    pub bias: Option<HostTensor>,
    /// lora_A, lora_B and (DoRA) the magnitude, from a saved adapter.
    pub adapter: Option<(HostTensor, HostTensor, Option<HostTensor>)>,
}

/// One resolved entry.
#[derive(Debug)]
pub struct Entry {
    pub checkpoint: Checkpoint,
    pub adapter: Option<SavedAdapter>,
    pub layers: Vec<Arc<CheckpointLayer>>,
}

/// What a report says about an entry: which files, hashed, and which tensors.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct WeightsRecord {
    pub checkpoint: String,
    pub files: Vec<FileRecord>,
    pub tensors: Vec<String>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub adapter: Option<AdapterRecord>,
}

#[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
pub struct AdapterRecord {
    pub path: String,
    pub files: Vec<FileRecord>,
    pub use_dora: bool,
    pub use_rslora: bool,
    pub r: usize,
    pub lora_alpha: f64,
}

/// Every `weights:` entry of a matrix, and its layers by shape name.
#[derive(Debug, Clone, Default)]
pub struct Weights {
    pub entries: BTreeMap<String, Arc<Entry>>,
    layers: BTreeMap<String, Arc<CheckpointLayer>>,
}

/// What the expansion holds fixed for a checkpoint layer's cases: its layer kind, and (with a
/// saved adapter) its adapter.
#[derive(Debug, Clone, Copy, PartialEq)]
pub struct Pin {
    pub layer: Layer,
    pub adapter: Option<Adapter>,
}

impl Weights {
    /// The checkpoint layer a shape name stands for.
    pub fn layer(&self, shape: &str) -> Option<&Arc<CheckpointLayer>> {
        self.layers.get(shape)
    }

    /// What the expansion holds fixed for `shape`'s cases, when it is a checkpoint layer.
    pub fn pin(&self, shape: &str) -> Option<Pin> {
        let l = self.layer(shape)?;
        let entry = &self.entries[&l.entry];
        Some(Pin {
            layer: l.layer,
            adapter: entry.adapter.as_ref().map(|a| {
                if a.config.use_dora {
                    Adapter::Dora
                } else {
                    Adapter::Lora
                }
            }),
        })
    }

    /// The report's record of the entries `used` names, each file hashed where a used tensor
    /// lives.
    pub fn records(&self, used: &BTreeSet<String>) -> BTreeMap<String, WeightsRecord> {
        let mut out = BTreeMap::new();
        for (name, e) in self.entries.iter().filter(|(n, _)| used.contains(*n)) {
            let mut read: BTreeSet<PathBuf> = BTreeSet::new();
            for l in &e.layers {
                read.insert(l.weight.file.path.clone());
                read.extend(l.bias.iter().map(|b| b.file.path.clone()));
            }
            out.insert(
                name.clone(),
                WeightsRecord {
                    checkpoint: e.checkpoint.path.display().to_string(),
                    files: e.checkpoint.records(&|p| read.contains(p)),
                    tensors: e.layers.iter().map(|l| l.tensor.clone()).collect(),
                    adapter: e.adapter.as_ref().map(|a| AdapterRecord {
                        path: a.path.display().to_string(),
                        files: a.weights.records(&|_| true),
                        use_dora: a.config.use_dora,
                        use_rslora: a.config.use_rslora,
                        r: a.config.r,
                        lora_alpha: a.config.lora_alpha,
                    }),
                },
            );
        }
        out
    }

    /// Resolve every entry (paths relative to `base`): the shapes its layers stand for, in entry
    /// then name order; the error names the entry.
    pub fn resolve(
        specs: &BTreeMap<String, WeightsSpec>,
        base: &Path,
    ) -> Result<(Weights, Vec<Shape>), (String, WeightsError)> {
        let mut weights = Weights::default();
        let mut shapes = Vec::new();
        for (name, spec) in specs {
            let (entry, entry_shapes) =
                resolve_entry(name, spec, base).map_err(|e| (name.clone(), e))?;
            let entry = Arc::new(entry);
            for (l, s) in entry.layers.iter().zip(&entry_shapes) {
                weights.layers.insert(s.name.clone(), Arc::clone(l));
            }
            shapes.extend(entry_shapes);
            weights.entries.insert(name.clone(), entry);
        }
        Ok((weights, shapes))
    }
}

/// A tensor name's module: the name without its trailing `.weight`.
pub fn module_of(tensor: &str) -> &str {
    tensor.strip_suffix(".weight").unwrap_or(tensor)
}

/// Compile a tensor glob: `.` is the separator, so `*` stays within a part and `**` crosses.
fn glob(pattern: &str) -> Result<globset::GlobMatcher, WeightsError> {
    globset::GlobBuilder::new(&pattern.replace('.', "/"))
        .literal_separator(true)
        .build()
        .map(|g| g.compile_matcher())
        .map_err(|e| WeightsError::Spec(format!("tensors pattern `{pattern}`: {e}")))
}

/// The `n` stored names closest to `pattern` (edit distance), for a pattern matching nothing.
fn closest(pattern: &str, names: impl Iterator<Item = String>, n: usize) -> Vec<String> {
    let mut scored: Vec<(usize, String)> = names
        .map(|t| (strsim::levenshtein(pattern, &t), t))
        .collect();
    scored.sort();
    scored.into_iter().take(n).map(|(_, t)| t).collect()
}

fn resolve_entry(
    name: &str,
    spec: &WeightsSpec,
    base: &Path,
) -> Result<(Entry, Vec<Shape>), WeightsError> {
    let at = |p: &Path| {
        if p.is_absolute() {
            p.to_path_buf()
        } else {
            base.join(p)
        }
    };
    if spec.batch == 0 {
        return Err(WeightsError::Spec(format!(
            "weights `{name}`: batch must be at least 1"
        )));
    }
    if spec.tensors.is_empty() {
        return Err(WeightsError::Spec(format!(
            "weights `{name}`: `tensors` lists no pattern"
        )));
    }
    let checkpoint = Checkpoint::open(&at(&spec.file))?;
    let adapter = spec
        .adapter
        .as_ref()
        .map(|p| SavedAdapter::open(&at(p)))
        .transpose()?;
    if adapter.is_none() && (spec.rank.is_none() || spec.alpha.is_none()) {
        return Err(WeightsError::Spec(format!(
            "weights `{name}`: without an `adapter:`, give `rank:` and `alpha:` (A and B are drawn from the seed)"
        )));
    }
    let slashed: Vec<(String, &String)> = checkpoint
        .tensors
        .keys()
        .map(|k| (k.replace('.', "/"), k))
        .collect();
    let mut matched: BTreeSet<&String> = BTreeSet::new();
    for pattern in &spec.tensors {
        let g = glob(pattern)?;
        let hits: Vec<&String> = slashed
            .iter()
            .filter(|(s, _)| g.is_match(s))
            .map(|(_, k)| *k)
            .collect();
        matched.extend(hits.iter().copied());
        if hits.is_empty() {
            return Err(WeightsError::NoMatch {
                pattern: pattern.clone(),
                file: checkpoint.path.clone(),
                closest: closest(pattern, checkpoint.tensors.keys().cloned(), 5),
            });
        }
    }
    let take = spec.limit.unwrap_or(usize::MAX);
    let mut layers = Vec::new();
    let mut shapes = Vec::new();
    for tensor in matched.into_iter().take(take) {
        let weight = checkpoint.tensors[tensor].clone();
        let module = module_of(tensor);
        if module.contains('/') || module.is_empty() {
            return Err(WeightsError::Spec(format!(
                "tensor `{tensor}`: a name with `/` cannot be part of a case id"
            )));
        }
        let (shape, bias) = layer_shape(name, spec, tensor, &weight, &checkpoint)?;
        let module_adapter = match &adapter {
            None => None,
            Some(a) => Some(
                a.module(module, spec.layer)
                    .map_err(WeightsError::Adapter)?,
            ),
        };
        let mut shape = shape;
        if let (Some(a), Some(saved)) = (&module_adapter, &adapter) {
            check_adapter(tensor, &weight, spec.layer, a)?;
            shape.rank = a.rank;
            shape.alpha = a.alpha;
            shape.rslora = saved.config.use_rslora;
        }
        check_rank(&shape, tensor)?;
        let unreadable = [Some(&weight), bias.as_ref()]
            .into_iter()
            .flatten()
            .chain(module_adapter.iter().flat_map(|a| {
                [Some(&a.lora_a), Some(&a.lora_b), a.magnitude.as_ref()]
                    .into_iter()
                    .flatten()
            }))
            .find(|t| !is_float(t.dtype))
            .map(|t| {
                format!(
                    "not applicable: `{}` is stored as {} (quantized or packed); no backend takes it as a base weight or adapter, and dequantizing it is the loader's business, not PEFT's",
                    t.name,
                    dtype_name(t.dtype)
                )
            });
        layers.push(Arc::new(CheckpointLayer {
            entry: name.to_string(),
            tensor: tensor.clone(),
            layer: spec.layer,
            weight,
            bias,
            adapter: module_adapter,
            unreadable,
        }));
        shapes.push(shape);
    }
    Ok((
        Entry {
            checkpoint,
            adapter,
            layers,
        },
        shapes,
    ))
}

/// The shape a stored weight stands for, and its bias.
fn layer_shape(
    entry: &str,
    spec: &WeightsSpec,
    tensor: &str,
    weight: &TensorRef,
    checkpoint: &Checkpoint,
) -> Result<(Shape, Option<TensorRef>), WeightsError> {
    let rank_error = |want: &str| WeightsError::Rank {
        file: weight.file.path.clone(),
        tensor: tensor.to_string(),
        shape: weight.shape.clone(),
        want: want.to_string(),
    };
    let s = &weight.shape;
    let (in_features, out_features, kernel) = match (spec.layer, s.as_slice()) {
        (Layer::Linear, [o, i]) => (*i, *o, 3),
        (Layer::Linear, _) => {
            return Err(rank_error(
                "a linear layer's weight is 2-D [out_features, in_features]",
            ))
        }
        (Layer::Embedding, [n, d]) => (*n, *d, 3),
        (Layer::Embedding, _) => {
            return Err(rank_error(
                "an embedding's weight is 2-D [num_embeddings, embedding_dim]",
            ))
        }
        (Layer::Conv2d, [o, i, k, k2]) if k == k2 => (*i, *o, *k),
        (Layer::Conv2d, _) => {
            return Err(rank_error(
                "a conv2d layer's weight is 4-D [out, in, k, k] with a square kernel",
            ))
        }
    };
    if s.contains(&0) {
        return Err(rank_error("every dimension must be at least 1"));
    }
    let bias = match spec.layer {
        Layer::Embedding => None,
        _ => checkpoint
            .tensors
            .get(&format!("{}.bias", module_of(tensor)))
            .cloned(),
    };
    if let Some(b) = &bias {
        if b.shape != [out_features] {
            return Err(WeightsError::Rank {
                file: b.file.path.clone(),
                tensor: b.name.clone(),
                shape: b.shape.clone(),
                want: format!("the bias of `{tensor}` has {out_features} elements"),
            });
        }
    }
    let image = spec.image.unwrap_or(kernel.max(8));
    if spec.layer == Layer::Conv2d && image < kernel {
        return Err(WeightsError::Spec(format!(
            "weights `{entry}`: image {image} is smaller than `{tensor}`'s kernel {kernel}"
        )));
    }
    Ok((
        Shape {
            bias: bias.is_some(),
            rslora: spec.rslora,
            kernel,
            image,
            ..Shape::new(
                format!("{entry}:{}", module_of(tensor)),
                spec.batch,
                in_features,
                out_features,
                spec.rank.unwrap_or(0),
                spec.alpha.unwrap_or(0.0),
            )
        },
        bias,
    ))
}

/// A LoRA rank fits the layer.
fn check_rank(shape: &Shape, tensor: &str) -> Result<(), WeightsError> {
    if shape.rank == 0 || shape.rank > shape.in_features.min(shape.out_features) {
        return Err(WeightsError::Spec(format!(
            "rank {} does not fit `{tensor}` ({} -> {}): a LoRA rank is between 1 and the smaller dimension",
            shape.rank, shape.in_features, shape.out_features
        )));
    }
    if !shape.alpha.is_finite() {
        return Err(WeightsError::Spec("alpha must be finite".into()));
    }
    Ok(())
}

/// The saved adapter's tensors have the shapes PEFT gives them on this base layer.
fn check_adapter(
    tensor: &str,
    weight: &TensorRef,
    layer: Layer,
    a: &ModuleAdapter,
) -> Result<(), WeightsError> {
    let s = &weight.shape;
    let r = a.rank;
    let (want_a, want_b, out) = match layer {
        Layer::Linear => (vec![r, s[1]], vec![s[0], r], s[0]),
        Layer::Embedding => (vec![r, s[0]], vec![s[1], r], s[1]),
        Layer::Conv2d => (vec![r, s[1], s[2], s[3]], vec![s[0], r, 1, 1], s[0]),
    };
    let wrong = |t: &TensorRef, want: Vec<usize>| {
        WeightsError::AdapterShape(Box::new(AdapterMismatch {
            file: t.file.path.clone(),
            name: t.name.clone(),
            got: t.shape.clone(),
            tensor: tensor.to_string(),
            base: s.clone(),
            want,
        }))
    };
    if a.lora_a.shape != want_a {
        return Err(wrong(&a.lora_a, want_a));
    }
    if a.lora_b.shape != want_b {
        return Err(wrong(&a.lora_b, want_b));
    }
    if let Some(m) = &a.magnitude {
        if m.elements() != out {
            let want = match layer {
                Layer::Conv2d => vec![1, out, 1, 1],
                _ => vec![out],
            };
            return Err(wrong(m, want));
        }
    }
    Ok(())
}

/// How many of `stored`'s values rounding to `dtype` changes (0: the case runs on the
/// checkpoint's very values).
pub fn rounded_count(stored: &HostTensor, dtype: DType) -> usize {
    stored
        .data
        .iter()
        .filter(|v| dtype.round(**v).to_bits() != v.to_bits())
        .count()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn matches(pattern: &str, name: &str) -> bool {
        glob(pattern).unwrap().is_match(name.replace('.', "/"))
    }

    /// `*` stays within one dot-separated part, `**` crosses parts; a pattern matches whole
    /// names.
    #[test]
    fn globs_match_parts_of_tensor_names() {
        let q = "encoder.layer.0.attention.self.query.weight";
        assert!(matches("encoder.layer.*.attention.self.query.weight", q));
        assert!(!matches("encoder.layer.*.query.weight", q));
        assert!(matches("encoder.layer.**.query.weight", q));
        assert!(matches("**.query.weight", q));
        assert!(matches("encoder.layer.[01].attention.self.*.weight", q));
        assert!(!matches("encoder.layer.0", q));
        assert!(!matches("*.weight", q));
        assert!(matches(
            "model.layers.1?.mlp.*_proj.weight",
            "model.layers.12.mlp.up_proj.weight"
        ));
    }

    #[test]
    fn closest_names_come_by_edit_distance() {
        let names = ["a.query.weight", "a.key.weight", "b.value.bias"].map(String::from);
        assert_eq!(
            closest("a.qeury.weight", names.into_iter(), 2),
            ["a.query.weight", "a.key.weight"]
        );
    }

    /// Rounding a stored value counts; one the dtype holds exactly does not.
    #[test]
    fn rounded_values_are_counted() {
        let t = HostTensor::new(vec![3], vec![0.5, 0.1, 1.0 + 2f64.powi(-12)]);
        assert_eq!(rounded_count(&t, DType::F64), 0);
        assert_eq!(rounded_count(&t, DType::F32), 1);
        assert_eq!(rounded_count(&t, DType::F16), 2);
    }
}
