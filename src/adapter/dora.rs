//! DoRA on a Linear layer, as PEFT's `DoraLinearLayer` computes it, over any `TensorOps`.
//!
//! The magnitude m rescales each output row of the merged weight W + s B A to m / ||W + s B A||
//! (the norm is taken per output row, `dim=1`, and detached: it gets no gradient).

use super::{lora, Layer};
use crate::backend::{OpResult, TensorOps};
use crate::case::DType;

/// `get_weight_norm`: ||W + s * lora_weight||_2 per output row, [out].
pub fn weight_norm<O: TensorOps>(
    ops: &O,
    w: &O::Tensor,
    lora_weight: &O::Tensor,
    s: f64,
) -> OpResult<O::Tensor> {
    ops.row_norm(&ops.add(w, &ops.scale(lora_weight, s)?)?)
}

/// `update_layer`: m = ||W + s B A|| with B A in fp32 when `upcast` (PEFT #1653).
pub fn init_magnitude<O: TensorOps>(
    ops: &O,
    l: &Layer<O::Tensor>,
    dtype: DType,
    upcast: bool,
) -> OpResult<O::Tensor> {
    let lora_weight = lora::product(ops, l, dtype, upcast)?;
    weight_norm(ops, &l.weight, &lora_weight, l.scaling)
}

/// Forward with dropout off. With c = m / ||W + s B A|| (detached) as a [1, out] row:
/// y = (x W^T + b) + (c - 1) * base + c * s * (x A^T) B^T, where base = (x W^T + b) - b
/// exactly as PEFT recovers it from the base layer's result.
/// PEFT forms the product as `lora_B(lora_A(eye)).T`; numerically that is B @ A.
pub fn forward<O: TensorOps>(
    ops: &O,
    l: &Layer<O::Tensor>,
    m: &O::Tensor,
    x: &O::Tensor,
    dtype: DType,
) -> OpResult<O::Tensor> {
    let lora_weight = ops.detach(&lora::product(ops, l, dtype, false)?)?;
    let norm = ops.detach(&weight_norm(ops, &l.weight, &lora_weight, l.scaling)?)?;
    let c = ops.reshape(&ops.div(m, &norm)?, &[1, l.out_features])?;
    let result = lora::base(ops, l, x)?;
    let without_bias;
    let base = match &l.bias {
        Some(b) => {
            without_bias = ops.sub(&result, b)?;
            &without_bias
        }
        None => &result,
    };
    let rescale = ops.mul(&ops.add_scalar(&c, -1.0)?, base)?;
    let branch = ops.scale(&ops.mul(&c, &lora::branch(ops, l, x)?)?, l.scaling)?;
    ops.add(&result, &ops.add(&rescale, &branch)?)
}

/// The row factor m / ||W + dW|| as an [out, 1] column, with the norm detached (`scaling=1`
/// because dW already carries it).
pub fn merge_factor<O: TensorOps>(
    ops: &O,
    l: &Layer<O::Tensor>,
    m: &O::Tensor,
    dw: &O::Tensor,
) -> OpResult<O::Tensor> {
    let norm = ops.detach(&weight_norm(ops, &l.weight, dw, 1.0)?)?;
    ops.reshape(&ops.div(m, &norm)?, &[l.out_features, 1])
}

/// W' = factor * (W + dW), row-wise.
pub fn merge<O: TensorOps>(
    ops: &O,
    l: &Layer<O::Tensor>,
    factor: &O::Tensor,
    dw: &O::Tensor,
) -> OpResult<O::Tensor> {
    ops.mul(factor, &ops.add(&l.weight, dw)?)
}

/// W = W' / factor - dW, with the factor cached at merge time.
pub fn unmerge<O: TensorOps>(
    ops: &O,
    merged: &O::Tensor,
    factor: &O::Tensor,
    dw: &O::Tensor,
) -> OpResult<O::Tensor> {
    ops.sub(&ops.div(merged, factor)?, dw)
}
