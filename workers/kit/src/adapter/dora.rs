//! DoRA on a Linear, Embedding or Conv2d layer, as PEFT's `DoraLinearLayer`,
//! `DoraEmbeddingLayer` and `DoraConv2dLayer` compute it, over any `TensorOps`.
//!
//! The magnitude m rescales each row of the merged weight W + s B A to m / ||W + s B A||, where
//! a row is an output row of a Linear layer, an output channel of a Conv2d (the norm runs over
//! all the other dimensions) and an embedding dimension of an Embedding (PEFT transposes its
//! weight first). The norm is detached: it gets no gradient.

use super::{lora, Layer};
use crate::case::Layer as Kind;
use crate::ops::{OpResult, TensorOps};

/// `get_weight_norm`: ||W + s * lora_weight|| per row (see the module doc), \[rows\], in the
/// dtype of the sum. `w` is weight-shaped; `lora_weight` is in the norm's 2-D layout.
pub fn weight_norm<O: TensorOps>(
    ops: &O,
    l: &Layer<O::Tensor>,
    w: &O::Tensor,
    lora_weight: &O::Tensor,
    s: f64,
) -> OpResult<O::Tensor> {
    ops.row_norm(&ops.add(&lora::view(ops, l, w)?, &ops.scale(lora_weight, s)?)?)
}

/// `update_layer`: m = ||W + s B A||, computed while the adapter is still in the base dtype
/// (PEFT casts it to fp32 for autocast only afterwards), with B A in fp32 when `upcast` (the
/// #1653 fix). Returned in the base dtype.
pub fn init_magnitude<O: TensorOps>(
    ops: &O,
    l: &Layer<O::Tensor>,
    upcast: bool,
) -> OpResult<O::Tensor> {
    let dt = l.compute_dtype;
    let lora_weight = lora::with_factors(ops, l, |b, a| {
        let (b, a) = (ops.cast(b, dt)?, ops.cast(a, dt)?);
        lora::factor_product(ops, &b, &a, dt, upcast, None)
    })?;
    weight_norm(ops, l, &ops.cast(&l.weight, dt)?, &lora_weight, l.scaling)
}

/// Forward with dropout off. With c = m / ||W + s B A|| (detached), in the adapter dtype:
/// Linear and Conv2d: y = base + (c - 1) * (base - b) + c * s * lora_B(lora_A(x)), where
/// base - b is recovered from the base layer's result exactly as PEFT does; Embedding:
/// y = c * base + c * s * (embed(ids, A^T) @ B^T). The sum is cast back to the base dtype.
/// PEFT forms the product as `lora_B(lora_A(eye)).T`; numerically that is B @ A.
pub fn forward<O: TensorOps>(
    ops: &O,
    l: &Layer<O::Tensor>,
    m: &O::Tensor,
    x: &O::Tensor,
) -> OpResult<O::Tensor> {
    let adt = l.adapter_dtype;
    let lora_weight = ops.detach(&lora::product(ops, l, false)?)?;
    let w = ops.cast(&l.weight, adt)?;
    let norm = ops.detach(&weight_norm(ops, l, &w, &lora_weight, l.scaling)?)?;
    let c = ops.reshape(&ops.div(m, &norm)?, &lora::channel_shape(l))?;
    let result = lora::base(ops, l, x)?;
    let xa = lora::cast_input(ops, l, x)?;
    let branch = lora::branch(ops, l, xa.as_ref().unwrap_or(x))?;
    let branch = ops.scale(&ops.mul(&c, &branch)?, l.scaling)?;
    let y = match l.kind {
        Kind::Embedding => ops.add(&ops.mul(&c, &ops.cast(&result, adt)?)?, &branch)?,
        _ => {
            let without_bias = lora::channel_bias(ops, l)?
                .map(|b| ops.sub(&result, &b))
                .transpose()?;
            let base = ops.cast(without_bias.as_ref().unwrap_or(&result), adt)?;
            let rescale = ops.mul(&ops.add_scalar(&c, -1.0)?, &base)?;
            ops.add(&ops.cast(&result, adt)?, &ops.add(&rescale, &branch)?)?
        }
    };
    ops.cast(&y, l.compute_dtype)
}

/// The row factor m / ||W + dW||, detached, shaped to scale the weight's rows (`scaling=1`
/// because dW already carries it): [out, 1] for Linear, [1, dim] for Embedding (PEFT's
/// `view(1, -1)`), [out, 1, 1, 1] for Conv2d; and W + dW, in the adapter dtype.
pub fn merge_factor<O: TensorOps>(
    ops: &O,
    l: &Layer<O::Tensor>,
    m: &O::Tensor,
    dw: &O::Tensor,
) -> OpResult<(O::Tensor, O::Tensor)> {
    let sum = lora::merged_sum(ops, l, dw)?;
    let norm = ops.detach(&ops.row_norm(&lora::view(ops, l, &sum)?)?)?;
    let shape = match l.kind {
        Kind::Linear => vec![l.norm_len, 1],
        Kind::Embedding => vec![1, l.norm_len],
        Kind::Conv2d => vec![l.norm_len, 1, 1, 1],
    };
    Ok((ops.reshape(&ops.div(m, &norm)?, &shape)?, sum))
}

/// W' = factor * (W + dW), cast to the base dtype.
pub fn merge<O: TensorOps>(
    ops: &O,
    l: &Layer<O::Tensor>,
    factor: &O::Tensor,
    sum: &O::Tensor,
) -> OpResult<O::Tensor> {
    ops.cast(&ops.mul(factor, sum)?, l.dtype)
}

/// W = W' / factor - dW, with the factor cached at merge time, cast to the base dtype.
pub fn unmerge<O: TensorOps>(
    ops: &O,
    l: &Layer<O::Tensor>,
    merged: &O::Tensor,
    factor: &O::Tensor,
    dw: &O::Tensor,
) -> OpResult<O::Tensor> {
    let w = ops.cast(merged, l.adapter_dtype)?;
    ops.cast(&ops.sub(&ops.div(&w, factor)?, dw)?, l.dtype)
}
