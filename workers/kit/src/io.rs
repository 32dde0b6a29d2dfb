//! A case's inputs and outputs as the runner, the workers and the reference exchange them, under
//! PEFT's state-dict names.

use crate::case::Layer;
use crate::tensor::HostTensor;
use std::sync::Arc;

/// Everything a case feeds to a layer with a LoRA/DoRA adapter, named as in PEFT. Shapes are
/// given for a Linear layer; an Embedding's are `input` \[batch\] (token ids, exact integers),
/// `weight` [num_embeddings, embedding_dim], `lora_embedding_A` [rank, num_embeddings] and
/// `lora_embedding_B` [embedding_dim, rank]; a Conv2d's are `input` [batch, in, image, image],
/// `weight` [out, in, k, k], `lora_A` [rank, in, k, k] and `lora_B` [out, rank, 1, 1].
#[derive(Debug, Clone)]
pub struct Inputs {
    pub layer: Layer,
    /// `input`: [batch, in_features]
    pub x: HostTensor,
    /// `base_layer.weight`: [out_features, in_features]. Shared: on an LLM-sized layer it is
    /// hundreds of MB, and every case of a shape and dtype holds the same rounded weight.
    pub weight: Arc<HostTensor>,
    /// `base_layer.bias`: \[out_features\]
    pub bias: Option<HostTensor>,
    /// `lora_A.weight`: [rank, in_features]
    pub lora_a: HostTensor,
    /// `lora_B.weight`: [out_features, rank]; zeros for `init` and `init_noop`, as PEFT
    /// initialises it (an Embedding's A is the zero one instead). Zeros, and unused, for PiSSA
    /// and OLoRA, whose init computes both from the weight.
    pub lora_b: HostTensor,
    /// `lora_B.bias`: \[out_features\]; with `lora_bias: true` only (zeros at init, as PEFT
    /// initialises it).
    pub lora_bias: Option<HostTensor>,
    /// `lora_magnitude_vector`: \[out_features\]; DoRA only, absent where the init computes it.
    pub magnitude: Option<HostTensor>,
    /// `grad_output`: [batch, out_features], the upstream gradient for `backward`.
    pub grad_output: HostTensor,
    /// alpha / r or alpha / sqrt(r).
    pub scaling: f64,
    /// The `step` op's learning rate ([`crate::case::Shape::lr`]).
    pub lr: f64,
}

impl Inputs {
    /// `(name, tensor)` under PEFT's state-dict names, for dumps.
    pub fn named(&self) -> Vec<(&'static str, &HostTensor)> {
        let (a, b) = match self.layer {
            Layer::Embedding => ("lora_embedding_A", "lora_embedding_B"),
            _ => ("lora_A.weight", "lora_B.weight"),
        };
        let mut v = vec![
            ("input", &self.x),
            ("base_layer.weight", &self.weight),
            (a, &self.lora_a),
            (b, &self.lora_b),
            ("grad_output", &self.grad_output),
        ];
        if let Some(b) = &self.bias {
            v.push(("base_layer.bias", b));
        }
        if let Some(m) = &self.magnitude {
            v.push(("lora_magnitude_vector", m));
        }
        if let Some(b) = &self.lora_bias {
            v.push(("lora_B.bias", b));
        }
        v
    }
}

/// Named outputs of one case (names without the `output.` prefix that dumps add), in a fixed
/// order. Both the backends (through `adapter`) and `reference` produce this.
pub type Outputs = Vec<(&'static str, HostTensor)>;

/// Output names, shared by the backends, the reference and the dump format.
pub mod names {
    pub const RESULT: &str = "result";
    pub const GRAD_A: &str = "grad.lora_A.weight";
    pub const GRAD_B: &str = "grad.lora_B.weight";
    pub const GRAD_M: &str = "grad.lora_magnitude_vector";
    pub const GRAD_X: &str = "grad.input";
    pub const GRAD_LORA_BIAS: &str = "grad.lora_B.bias";
    /// `merge`, `parity`, `unmerge`, `roundtrip` with `lora_bias`: the base layer's bias after
    /// the merge (b + s * lora_B.bias) and after the unmerge.
    pub const MERGED_BIAS: &str = "merged_bias";
    pub const UNMERGED_BIAS: &str = "unmerged_bias";
    /// `step`: the adapter's tensors after one SGD step (the magnitude is [`MAGNITUDE`]).
    pub const STEP_A: &str = "lora_A.weight";
    pub const STEP_B: &str = "lora_B.weight";
    pub const STEP_LORA_BIAS: &str = "lora_B.bias";
    pub const MERGED: &str = "merged_weight";
    pub const UNMERGED: &str = "unmerged_weight";
    pub const MAGNITUDE: &str = "lora_magnitude_vector";
    /// `init_noop`: the base layer's own output, beside the adapted layer's `result`.
    pub const BASE_RESULT: &str = "base_result";
    /// `parity`: the forward of the merged layer, beside the unmerged layer's `result`.
    pub const MERGED_RESULT: &str = "merged_result";
    /// PiSSA/OLoRA init: the residual weight written back into the base layer.
    pub const RESIDUAL: &str = "base_layer.weight";
    /// PiSSA/OLoRA init: scaling * lora_B @ lora_A, the part of W the adapter now holds (A and
    /// B themselves are defined up to the sign of each singular/QR vector; their product is not).
    pub const DELTA: &str = "delta_weight";
    /// Every output name (what a worker's reply may carry).
    pub const ALL: &[&str] = &[
        RESULT,
        GRAD_A,
        GRAD_B,
        GRAD_M,
        GRAD_X,
        MERGED,
        UNMERGED,
        MAGNITUDE,
        BASE_RESULT,
        MERGED_RESULT,
        RESIDUAL,
        DELTA,
        GRAD_LORA_BIAS,
        MERGED_BIAS,
        UNMERGED_BIAS,
        STEP_A,
        STEP_B,
        STEP_LORA_BIAS,
    ];
}
