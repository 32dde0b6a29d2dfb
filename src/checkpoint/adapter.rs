//! A trained adapter as PEFT's `save_pretrained` writes it: `adapter_config.json` beside
//! `adapter_model.safetensors`, tensors under PEFT's saved names (the adapter name stripped):
//! `base_model.model.<module>.lora_A.weight`, `.lora_B.weight` (an Embedding's
//! `.lora_embedding_A`, `.lora_embedding_B`) and, for DoRA, `.lora_magnitude_vector`.

use super::files::{Checkpoint, TensorRef};
use super::WeightsError;
use crate::case::Layer;
use serde::Deserialize;
use std::collections::BTreeMap;
use std::path::{Path, PathBuf};

pub const CONFIG: &str = "adapter_config.json";
pub const WEIGHTS: &str = "adapter_model.safetensors";

/// The fields of `adapter_config.json` a case takes; the rest of the file is not read.
#[derive(Debug, Clone, Deserialize)]
pub struct AdapterConfig {
    pub r: usize,
    pub lora_alpha: f64,
    #[serde(default)]
    pub use_dora: bool,
    #[serde(default)]
    pub use_rslora: bool,
    /// A list of module names, or one regular expression (PEFT accepts both).
    #[serde(default)]
    pub target_modules: Option<serde_json::Value>,
    /// Per-module overrides of `lora_alpha`, keyed by a module name's ending (`rank_pattern`
    /// is not read: a module's rank is its A's).
    #[serde(default)]
    pub alpha_pattern: BTreeMap<String, f64>,
    #[serde(default)]
    pub peft_type: Option<String>,
    /// Options whose math peft-compat does not model yet: refused with the reason.
    #[serde(default)]
    pub lora_bias: bool,
    #[serde(default)]
    pub fan_in_fan_out: bool,
}

/// A saved adapter: its config and its tensors.
#[derive(Debug)]
pub struct SavedAdapter {
    pub path: PathBuf,
    pub config: AdapterConfig,
    pub weights: Checkpoint,
}

/// One module's trained tensors.
#[derive(Debug, Clone)]
pub struct ModuleAdapter {
    pub lora_a: TensorRef,
    pub lora_b: TensorRef,
    pub magnitude: Option<TensorRef>,
    pub rank: usize,
    pub alpha: f64,
}

impl SavedAdapter {
    pub fn open(dir: &Path) -> Result<SavedAdapter, WeightsError> {
        let config_path = dir.join(CONFIG);
        let text = std::fs::read_to_string(&config_path).map_err(|e| WeightsError::Missing {
            path: config_path.clone(),
            why: e.to_string(),
        })?;
        let config: AdapterConfig =
            serde_json::from_str(&text).map_err(|e| WeightsError::Corrupt {
                path: config_path.clone(),
                why: e.to_string(),
            })?;
        if let Some(t) = config.peft_type.as_deref().filter(|t| *t != "LORA") {
            return Err(WeightsError::Corrupt {
                path: config_path,
                why: format!("peft_type is {t}; peft-compat runs LoRA and DoRA adapters (LORA)"),
            });
        }
        let unmodelled = [
            (
                config.lora_bias,
                "lora_bias: true (a trainable bias on lora_B)",
            ),
            (
                config.fan_in_fan_out,
                "fan_in_fan_out: true (GPT-2's Conv1D weights, stored transposed)",
            ),
        ]
        .into_iter()
        .find_map(|(on, what)| on.then_some(what));
        if let Some(what) = unmodelled {
            return Err(WeightsError::Corrupt {
                path: config_path,
                why: format!("{what}: peft-compat does not model this option yet"),
            });
        }
        let weights = Checkpoint::open(&dir.join(WEIGHTS))?;
        Ok(SavedAdapter {
            path: dir.to_path_buf(),
            config,
            weights,
        })
    }

    /// The saved prefix of `module` (`base_model.model.<module>.`): the exact name, else the one
    /// saved name whose module ends with `.<module>` or is the end of `module` (a checkpoint of
    /// `BertModel` against an adapter saved on `BertForSequenceClassification`).
    fn prefix(&self, module: &str, layer: Layer) -> Option<String> {
        let a = match layer {
            Layer::Embedding => "lora_embedding_A",
            _ => "lora_A.weight",
        };
        let saved: Vec<&str> = self
            .weights
            .tensors
            .keys()
            .filter_map(|k| k.strip_suffix(a)?.strip_prefix("base_model.model."))
            .collect();
        let exact = format!("{module}.");
        if saved.contains(&exact.as_str()) {
            return Some(format!("base_model.model.{exact}"));
        }
        let ends = |long: &str, short: &str| long == short || long.ends_with(&format!(".{short}"));
        let near: Vec<&&str> = saved
            .iter()
            .filter(|s| {
                let s = s.trim_end_matches('.');
                ends(s, module) || ends(module, s)
            })
            .collect();
        match near.as_slice() {
            [one] => Some(format!("base_model.model.{one}")),
            _ => None,
        }
    }

    /// The trained tensors of `module`, or why it has none here.
    pub fn module(&self, module: &str, layer: Layer) -> Result<ModuleAdapter, String> {
        let Some(prefix) = self.prefix(module, layer) else {
            let targets = match &self.config.target_modules {
                Some(serde_json::Value::Array(v)) => v
                    .iter()
                    .map(|s| s.as_str().unwrap_or("?"))
                    .collect::<Vec<_>>()
                    .join(", "),
                Some(serde_json::Value::String(s)) => format!("the regex {s}"),
                _ => "not recorded".into(),
            };
            return Err(format!(
                "the adapter in {} has no weights for `{module}` (its target_modules: {targets})",
                self.path.display()
            ));
        };
        let (a, b) = match layer {
            Layer::Embedding => ("lora_embedding_A", "lora_embedding_B"),
            _ => ("lora_A.weight", "lora_B.weight"),
        };
        let get = |suffix: &str| {
            self.weights
                .tensors
                .get(&format!("{prefix}{suffix}"))
                .cloned()
        };
        let lora_a = get(a).expect("the prefix was found by its A");
        let lora_b = get(b).ok_or_else(|| format!("the adapter has {prefix}{a} but no {b}"))?;
        let magnitude = get("lora_magnitude_vector");
        if self.config.use_dora && magnitude.is_none() {
            return Err(format!(
                "the adapter is DoRA (use_dora) but holds no {prefix}lora_magnitude_vector"
            ));
        }
        // alpha_pattern keys name a module's ending; the rank is what A has ([r, ...] for every
        // layer; a 0-D A is refused by the shape check), so rank_pattern needs no reading.
        let alpha = self
            .config
            .alpha_pattern
            .iter()
            .find(|(k, _)| module == k.as_str() || module.ends_with(&format!(".{k}")))
            .map_or(self.config.lora_alpha, |(_, v)| *v);
        let rank = lora_a.shape.first().copied().unwrap_or(self.config.r);
        Ok(ModuleAdapter {
            rank,
            alpha,
            lora_a,
            lora_b,
            magnitude: if self.config.use_dora {
                magnitude
            } else {
                None
            },
        })
    }
}
