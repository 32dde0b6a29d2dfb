//! LoRA on a Linear layer, as PEFT's `lora.Linear` computes it, over any `TensorOps`.

use super::Layer;
use crate::backend::{OpResult, TensorOps};
use crate::case::DType;

/// `lora_B @ lora_A`: [out, in]. With `upcast`, both factors are cast to fp32 first and the
/// product cast back to `dtype` (PEFT's fix for CPU 16-bit; the caller decides when it applies).
pub fn product<O: TensorOps>(
    ops: &O,
    l: &Layer<O::Tensor>,
    dtype: DType,
    upcast: bool,
) -> OpResult<O::Tensor> {
    scaled_product(ops, l, dtype, upcast, None)
}

/// `get_delta_weight`: dW = s * (B @ A). With `upcast` the scaling is applied in fp32 too,
/// before the cast back, as PEFT does.
pub fn delta_weight<O: TensorOps>(
    ops: &O,
    l: &Layer<O::Tensor>,
    dtype: DType,
    upcast: bool,
) -> OpResult<O::Tensor> {
    scaled_product(ops, l, dtype, upcast, Some(l.scaling))
}

fn scaled_product<O: TensorOps>(
    ops: &O,
    l: &Layer<O::Tensor>,
    dtype: DType,
    upcast: bool,
    scaling: Option<f64>,
) -> OpResult<O::Tensor> {
    let mut p = if upcast {
        let a = ops.cast(&l.lora_a, DType::F32)?;
        ops.matmul(&ops.cast(&l.lora_b, DType::F32)?, &a)?
    } else {
        ops.matmul(&l.lora_b, &l.lora_a)?
    };
    if let Some(s) = scaling {
        p = ops.scale(&p, s)?;
    }
    if upcast {
        ops.cast(&p, dtype)
    } else {
        Ok(p)
    }
}

/// The base layer: x W^T + b ([batch, out]).
pub fn base<O: TensorOps>(ops: &O, l: &Layer<O::Tensor>, x: &O::Tensor) -> OpResult<O::Tensor> {
    let y = ops.matmul(x, &ops.t(&l.weight)?)?;
    match &l.bias {
        Some(b) => ops.add(&y, b),
        None => Ok(y),
    }
}

/// The adapter branch without scaling: (x A^T) B^T ([batch, out]).
pub fn branch<O: TensorOps>(ops: &O, l: &Layer<O::Tensor>, x: &O::Tensor) -> OpResult<O::Tensor> {
    let h = ops.matmul(x, &ops.t(&l.lora_a)?)?;
    ops.matmul(&h, &ops.t(&l.lora_b)?)
}

/// y = x W^T + b + s * (x A^T) B^T.
pub fn forward<O: TensorOps>(ops: &O, l: &Layer<O::Tensor>, x: &O::Tensor) -> OpResult<O::Tensor> {
    let y = base(ops, l, x)?;
    ops.add(&y, &ops.scale(&branch(ops, l, x)?, l.scaling)?)
}

/// W' = W + dW, rounded in the base dtype.
pub fn merge<O: TensorOps>(ops: &O, l: &Layer<O::Tensor>, dw: &O::Tensor) -> OpResult<O::Tensor> {
    ops.add(&l.weight, dw)
}

/// W = W' - dW.
pub fn unmerge<O: TensorOps>(ops: &O, merged: &O::Tensor, dw: &O::Tensor) -> OpResult<O::Tensor> {
    ops.sub(merged, dw)
}
