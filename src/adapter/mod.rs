//! LoRA and DoRA math, written once against `TensorOps` so that every backend runs the same
//! formulas (`lora.rs`, `dora.rs`), and the per-op drivers that produce a case's outputs.

pub mod dora;
pub mod lora;

use crate::backend::{OpResult, TensorOps};
use crate::case::{Adapter, Case, Op};
use crate::inputs::{names, Inputs, Outputs};

/// A Linear layer with its adapter, on one backend, in the case dtype.
pub struct Layer<T> {
    pub weight: T,
    pub bias: Option<T>,
    pub lora_a: T,
    pub lora_b: T,
    pub scaling: f64,
    pub out_features: usize,
}

/// Run one case's operation on `ops` and read its outputs back, named as in `inputs::names`.
pub fn run<O: TensorOps>(ops: &O, case: &Case, inp: &Inputs) -> OpResult<Outputs> {
    let dt = case.dtype;
    let up = |t| ops.upload(t, dt);
    let mut layer = Layer {
        weight: up(&inp.weight)?,
        bias: inp.bias.as_ref().map(up).transpose()?,
        lora_a: up(&inp.lora_a)?,
        lora_b: up(&inp.lora_b)?,
        scaling: inp.scaling,
        out_features: inp.weight.rows(),
    };
    let x = up(&inp.x)?;
    let magnitude = inp.magnitude.as_ref().map(up).transpose()?;
    let dora = case.adapter == Adapter::Dora;
    let upcast = case.upcasts();
    let down = |t: &O::Tensor| ops.download(t);
    let forward = |layer: &Layer<O::Tensor>, m: Option<&O::Tensor>, x: &O::Tensor| match m {
        Some(m) => dora::forward(ops, layer, m, x, dt),
        None => lora::forward(ops, layer, x),
    };

    Ok(match case.op {
        // DoRA init is PEFT's `update_layer` (the magnitude); LoRA init computes nothing, so its
        // check is the forward at init, which must equal the base layer (B = 0).
        Op::Init if dora => vec![(
            names::MAGNITUDE,
            down(&dora::init_magnitude(ops, &layer, dt, upcast)?)?,
        )],
        Op::Init => vec![(names::RESULT, down(&forward(&layer, None, &x)?)?)],
        Op::Forward => vec![(
            names::RESULT,
            down(&forward(&layer, magnitude.as_ref(), &x)?)?,
        )],
        Op::Backward => {
            layer.lora_a = ops.param(&layer.lora_a)?;
            layer.lora_b = ops.param(&layer.lora_b)?;
            let x = ops.param(&x)?;
            let m = magnitude.as_ref().map(|m| ops.param(m)).transpose()?;
            let y = forward(&layer, m.as_ref(), &x)?;
            let g = up(&inp.grad_output)?;
            let mut wrt = vec![&layer.lora_a, &layer.lora_b];
            wrt.extend(m.as_ref());
            wrt.push(&x);
            let grads = ops.grads(&y, &g, &wrt)?;
            let mut out = vec![
                (names::RESULT, down(&y)?),
                (names::GRAD_A, down(&grads[0])?),
                (names::GRAD_B, down(&grads[1])?),
            ];
            if m.is_some() {
                out.push((names::GRAD_M, down(&grads[2])?));
            }
            out.push((
                names::GRAD_X,
                down(grads.last().expect("x is always last"))?,
            ));
            out
        }
        Op::Merge | Op::Unmerge => {
            let dw = lora::delta_weight(ops, &layer, dt, upcast)?;
            let (merged, factor) = match &magnitude {
                Some(m) => {
                    let f = dora::merge_factor(ops, &layer, m, &dw)?;
                    (dora::merge(ops, &layer, &f, &dw)?, Some(f))
                }
                None => (lora::merge(ops, &layer, &dw)?, None),
            };
            if case.op == Op::Merge {
                vec![(names::MERGED, down(&merged)?)]
            } else {
                // Unmerge recomputes dW exactly as PEFT does (same path, same rounding).
                let dw = lora::delta_weight(ops, &layer, dt, upcast)?;
                let restored = match &factor {
                    Some(f) => dora::unmerge(ops, &merged, f, &dw)?,
                    None => lora::unmerge(ops, &merged, &dw)?,
                };
                vec![(names::UNMERGED, down(&restored)?)]
            }
        }
    })
}
