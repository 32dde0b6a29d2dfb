//! `--dump DIR`: one safetensors file per case, so a case can be replayed elsewhere (e.g. in
//! Python with torch and PEFT).
//!
//! Tensor names follow PEFT's state dict for one layer: `base_layer.weight`, `base_layer.bias`,
//! `lora_A.weight`, `lora_B.weight` (an Embedding's `lora_embedding_A`, `lora_embedding_B`),
//! `lora_magnitude_vector` (DoRA; PEFT stores a Conv2d's as [1, out, 1, 1]), plus `input` and
//! `grad_output`, in the case dtype, exactly the bits the backends received (an Embedding's
//! `input` holds token ids, as f32). PiSSA and OLoRA dumps carry zeros for A and B: their init
//! computes both from the weight. Outputs carry an `output.` prefix (`output.result`,
//! `output.grad.lora_A.weight`, `output.grad.lora_B.weight`, `output.grad.lora_magnitude_vector`,
//! `output.grad.input`, `output.merged_weight`, `output.unmerged_weight`,
//! `output.lora_magnitude_vector`, `output.base_result` (init_noop), `output.merged_result`
//! (parity), `output.base_layer.weight` and `output.delta_weight` (PiSSA/OLoRA init)) in the
//! narrowest of the case dtype and f32 that holds them (autocast's adapter is fp32), and the f64
//! reference of each under a `reference.` prefix. Metadata (all strings): `backend`, `device`,
//! `dtype`, `adapter`, `op`, `precision`, `layer` (`Linear`, `Embedding`, `Conv2d`), `profile`,
//! `shape`, `rank`, `alpha`, `scaling`, `rslora`, `kernel`, `image`, `id`, `outcome`, and
//! `error` when the case failed to run; a checkpoint layer's case adds `tensor` (the weight's
//! stored name), `stored_dtype`, `checkpoint` (the file holding it) and `adapter_file` (the saved
//! adapter's weights file, when it has one; `adapter` stays the axis).

use crate::case::Case;
use crate::case::{DType, Layer, Point};
use crate::checkpoint::CheckpointLayer;
use crate::outcome::Outcome;
use crate::worker::io::{Inputs, Outputs};
use crate::worker::protocol::lossless_dtype;
use crate::worker::tensor::HostTensor;
use safetensors::tensor::TensorView;
use safetensors::Dtype;
use std::collections::HashMap;
use std::path::{Path, PathBuf};

#[derive(Debug, thiserror::Error)]
pub enum DumpError {
    #[error("cannot create dump directory {path}: {source}")]
    Dir {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("cannot write dump {path}: {message}")]
    Write { path: PathBuf, message: String },
}

/// The file a case is dumped to: its id with `/` turned into `__`.
pub fn file_name(id: &str) -> String {
    format!("{}.safetensors", id.replace(['/', ':'], "__"))
}

fn st_dtype(d: DType) -> Dtype {
    match d {
        DType::F32 => Dtype::F32,
        DType::F16 => Dtype::F16,
        DType::Bf16 => Dtype::BF16,
        DType::F64 => Dtype::F64,
        DType::F8e4m3 => Dtype::F8_E4M3,
        DType::F8e5m2 => Dtype::F8_E5M2,
    }
}

/// Write one case's inputs, outputs (when it produced any) and reference to `dir`.
pub fn write(
    dir: &Path,
    case: &Case,
    outcome: &Outcome,
    inputs: &Inputs,
    outputs: Option<&Outputs>,
    reference: &Outputs,
    origin: Option<&CheckpointLayer>,
) -> Result<PathBuf, DumpError> {
    std::fs::create_dir_all(dir).map_err(|source| DumpError::Dir {
        path: dir.to_path_buf(),
        source,
    })?;
    let path = dir.join(file_name(&case.id()));
    let dtype = case.point.dtype;
    let ids = case.point.layer == Layer::Embedding;
    let mut entries: Vec<(String, DType, &HostTensor)> = inputs
        .named()
        .into_iter()
        .map(|(n, t)| {
            let d = if ids && n == "input" {
                DType::F32
            } else {
                dtype
            };
            (n.to_string(), d, t)
        })
        .collect();
    if let Some(outs) = outputs {
        entries.extend(
            outs.iter()
                .map(|(n, t)| (format!("output.{n}"), lossless_dtype(t, dtype), t)),
        );
    }
    entries.extend(
        reference
            .iter()
            .map(|(n, t)| (format!("reference.{n}"), DType::F64, t)),
    );
    let bytes: Vec<(String, Dtype, Vec<usize>, Vec<u8>)> = entries
        .into_iter()
        .map(|(n, d, t)| (n, st_dtype(d), t.shape.clone(), t.to_le_bytes(d)))
        .collect();
    let views = bytes
        .iter()
        .map(|(n, d, shape, b)| {
            TensorView::new(*d, shape.clone(), b)
                .map(|v| (n.clone(), v))
                .map_err(|e| DumpError::Write {
                    path: path.clone(),
                    message: e.to_string(),
                })
        })
        .collect::<Result<Vec<_>, _>>()?;
    let shape = &case.shape;
    // The axes as matrix files spell them, but the layer as PEFT's class name.
    let axes = Point::AXES
        .into_iter()
        .zip(case.point.values())
        .map(|(k, v)| {
            let v = match (k, case.point.layer) {
                ("layer", Layer::Linear) => "Linear".to_string(),
                ("layer", Layer::Embedding) => "Embedding".to_string(),
                ("layer", Layer::Conv2d) => "Conv2d".to_string(),
                _ => v,
            };
            (k, v)
        });
    let mut meta: HashMap<String, String> = [("id", case.id())]
        .into_iter()
        .chain(axes)
        .chain([
            ("shape", shape.name.clone()),
            ("kernel", shape.kernel.to_string()),
            ("image", shape.image.to_string()),
            ("rank", shape.rank.to_string()),
            ("alpha", shape.alpha.to_string()),
            ("scaling", inputs.scaling.to_string()),
            ("rslora", shape.rslora.to_string()),
            ("upcast_applied", case.upcasts().to_string()),
            ("outcome", outcome.kind().to_string()),
        ])
        .map(|(k, v)| (k.to_string(), v))
        .collect();
    if let Some(msg) = outcome.message() {
        meta.insert("error".into(), msg.to_string());
    }
    if let Some(o) = origin {
        meta.insert("tensor".into(), o.tensor.clone());
        meta.insert("stored_dtype".into(), o.stored());
        meta.insert(
            "checkpoint".into(),
            o.weight.file.path.display().to_string(),
        );
        if let Some(a) = &o.adapter {
            meta.insert(
                "adapter_file".into(),
                a.lora_a.file.path.display().to_string(),
            );
        }
    }
    let write_error = |message: String| DumpError::Write {
        path: path.clone(),
        message,
    };
    let bytes =
        safetensors::serialize(views, Some(meta)).map_err(|e| write_error(e.to_string()))?;
    crate::util::write_atomic(&path, &bytes).map_err(|e| write_error(e.to_string()))?;
    Ok(path)
}
