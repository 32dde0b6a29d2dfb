//! LoRA and DoRA math, written once against `TensorOps` so that every backend runs the same
//! formulas (`lora.rs`, `dora.rs`, and `init.rs` for PiSSA/OLoRA), and the per-op drivers
//! that produce a case's outputs.

pub mod dora;
pub mod init;
pub mod lora;

use crate::backend::{OpResult, TensorOps};
use crate::case::{Case, DType, Layer as Kind, Op};
use crate::inputs::{names, Inputs, Outputs};

/// A layer with its adapter, on one backend: the base layer in the case dtype, the adapter in
/// [`Case::adapter_dtype`] (fp32 under autocast with a 16-bit base).
pub struct Layer<T> {
    pub kind: Kind,
    pub weight: T,
    pub bias: Option<T>,
    pub lora_a: T,
    pub lora_b: T,
    pub scaling: f64,
    pub dtype: DType,
    pub adapter_dtype: DType,
    /// The weight's shape ([out, in], [num_embeddings, dim] or [out, in, k, k]).
    pub weight_shape: Vec<usize>,
    /// How many rows DoRA normalises: out_features, or embedding_dim for an Embedding.
    pub norm_len: usize,
    pub rank: usize,
}

/// Run one case's operation on `ops` and read its outputs back, named as in `inputs::names`.
pub fn run<O: TensorOps>(ops: &O, case: &Case, inp: &Inputs) -> OpResult<Outputs> {
    let dt = case.dtype;
    let adt = case.adapter_dtype();
    let up = |t, d| ops.upload(t, d);
    let kind = case.layer;
    let norm_len = match kind {
        Kind::Embedding => inp.weight.shape[1],
        _ => inp.weight.shape[0],
    };
    let mut layer = Layer {
        kind,
        weight: up(&inp.weight, dt)?,
        bias: inp.bias.as_ref().map(|b| up(b, dt)).transpose()?,
        lora_a: up(&inp.lora_a, adt)?,
        lora_b: up(&inp.lora_b, adt)?,
        scaling: inp.scaling,
        dtype: dt,
        adapter_dtype: adt,
        weight_shape: inp.weight.shape.clone(),
        norm_len,
        rank: case.shape.rank,
    };
    // Token ids travel as f32 (exact); the backend's `embedding` reads them as integers.
    let x = up(
        &inp.x,
        if kind == Kind::Embedding {
            DType::F32
        } else {
            dt
        },
    )?;
    let magnitude = inp.magnitude.as_ref().map(|m| up(m, adt)).transpose()?;
    let upcast = case.upcasts();
    let down = |t: &O::Tensor| ops.download(t);
    let forward = |layer: &Layer<O::Tensor>, m: Option<&O::Tensor>, x: &O::Tensor| match m {
        Some(m) => dora::forward(ops, layer, m, x),
        None => lora::forward(ops, layer, x),
    };
    // PiSSA/OLoRA cut A, B and the residual out of W; DoRA's magnitude is the norm of what the
    // init leaves (PEFT's `update_layer` order), stored in the adapter dtype.
    let initialise = |layer: &mut Layer<O::Tensor>| -> OpResult<Option<O::Tensor>> {
        if case.adapter.is_data_init() {
            init::data_init(ops, case.adapter, layer, upcast)?;
        }
        if case.adapter.is_dora() {
            let m = dora::init_magnitude(ops, layer, upcast)?;
            return Ok(Some(ops.cast(&m, adt)?));
        }
        Ok(None)
    };

    Ok(match case.op {
        // PiSSA/OLoRA init: the residual weight and the part of W the adapter now holds.
        Op::Init if case.adapter.is_data_init() => {
            let m = initialise(&mut layer)?;
            let mut out = vec![
                (names::RESIDUAL, down(&layer.weight)?),
                (
                    names::DELTA,
                    down(&lora::delta_weight(ops, &layer, upcast)?)?,
                ),
            ];
            if let Some(m) = m {
                out.push((names::MAGNITUDE, down(&m)?));
            }
            out
        }
        // DoRA init is PEFT's `update_layer` (the magnitude); LoRA init computes nothing, so its
        // check is the forward at init, which must equal the base layer (B = 0).
        Op::Init => match initialise(&mut layer)? {
            Some(m) => vec![(names::MAGNITUDE, down(&m)?)],
            None => vec![(names::RESULT, down(&forward(&layer, None, &x)?)?)],
        },
        // The layer as its init leaves it, beside the base layer alone.
        Op::InitNoop => {
            let base = lora::base_with(ops, &layer, &up(&inp.weight, dt)?, &x)?;
            let m = initialise(&mut layer)?;
            vec![
                (names::RESULT, down(&forward(&layer, m.as_ref(), &x)?)?),
                (names::BASE_RESULT, down(&base)?),
            ]
        }
        Op::Forward => vec![(
            names::RESULT,
            down(&forward(&layer, magnitude.as_ref(), &x)?)?,
        )],
        Op::Backward => {
            layer.lora_a = ops.param(&layer.lora_a)?;
            layer.lora_b = ops.param(&layer.lora_b)?;
            let ids = kind == Kind::Embedding;
            let x = if ids { x } else { ops.param(&x)? };
            let m = magnitude.as_ref().map(|m| ops.param(m)).transpose()?;
            let y = forward(&layer, m.as_ref(), &x)?;
            let g = up(&inp.grad_output, dt)?;
            let mut wrt = vec![&layer.lora_a, &layer.lora_b];
            wrt.extend(m.as_ref());
            if !ids {
                wrt.push(&x);
            }
            let grads = ops.grads(&y, &g, &wrt)?;
            let mut out = vec![
                (names::RESULT, down(&y)?),
                (names::GRAD_A, down(&grads[0])?),
                (names::GRAD_B, down(&grads[1])?),
            ];
            if m.is_some() {
                out.push((names::GRAD_M, down(&grads[2])?));
            }
            if !ids {
                out.push((
                    names::GRAD_X,
                    down(grads.last().expect("x is always last"))?,
                ));
            }
            out
        }
        Op::Merge | Op::Unmerge | Op::Parity | Op::Roundtrip => {
            let dw = lora::delta_weight(ops, &layer, upcast)?;
            let (merged, factor) = match &magnitude {
                Some(m) => {
                    let (f, sum) = dora::merge_factor(ops, &layer, m, &dw)?;
                    (dora::merge(ops, &layer, &f, &sum)?, Some(f))
                }
                None => (lora::merge(ops, &layer, &dw)?, None),
            };
            match case.op {
                Op::Merge => vec![(names::MERGED, down(&merged)?)],
                Op::Parity => vec![
                    (
                        names::RESULT,
                        down(&forward(&layer, magnitude.as_ref(), &x)?)?,
                    ),
                    (
                        names::MERGED_RESULT,
                        down(&lora::base_with(ops, &layer, &merged, &x)?)?,
                    ),
                ],
                _ => {
                    // Unmerge recomputes dW exactly as PEFT does (same path, same rounding).
                    let dw = lora::delta_weight(ops, &layer, upcast)?;
                    let restored = match &factor {
                        Some(f) => dora::unmerge(ops, &layer, &merged, f, &dw)?,
                        None => lora::unmerge(ops, &layer, &merged, &dw)?,
                    };
                    vec![(names::UNMERGED, down(&restored)?)]
                }
            }
        }
    })
}
