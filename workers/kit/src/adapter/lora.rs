//! LoRA on a Linear, Embedding or Conv2d layer, as PEFT's `lora.Linear`, `lora.Embedding` and
//! `lora.Conv2d` compute it, over any `TensorOps`.
//!
//! Each function takes the adapter's dtype into account: under `autocast` the adapter (A, B)
//! is fp32 while the base layer is 16-bit, the branch runs on an fp32 copy of the input and the
//! sum is cast back; everywhere else the casts are no-ops.

use super::Layer;
use crate::case::{DType, Layer as Kind};
use crate::ops::{OpResult, TensorOps};

/// `b @ a` for 2-D factors, in fp32 and cast back to `dtype` with `upcast`, times `scaling`
/// where given (inside the fp32 part, as PEFT's `get_delta_weight` does).
pub fn factor_product<O: TensorOps>(
    ops: &O,
    b: &O::Tensor,
    a: &O::Tensor,
    dtype: DType,
    upcast: bool,
    scaling: Option<f64>,
) -> OpResult<O::Tensor> {
    let mut p = if upcast {
        ops.matmul(&ops.cast(b, DType::F32)?, &ops.cast(a, DType::F32)?)?
    } else {
        ops.matmul(b, a)?
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

/// `f(B, A)` with A and B as 2-D matrices (a Conv2d's [r, in, k, k] and [out, r, 1, 1]
/// flattened; the others are 2-D already).
pub fn with_factors<O: TensorOps, R>(
    ops: &O,
    l: &Layer<O::Tensor>,
    f: impl FnOnce(&O::Tensor, &O::Tensor) -> OpResult<R>,
) -> OpResult<R> {
    match l.kind {
        Kind::Conv2d => {
            let rest = l.weight_shape[1..].iter().product();
            let a = ops.reshape(&l.lora_a, &[l.rank, rest])?;
            let b = ops.reshape(&l.lora_b, &[l.norm_len, l.rank])?;
            f(&b, &a)
        }
        _ => f(&l.lora_b, &l.lora_a),
    }
}

/// `lora_B @ lora_A` in the layout DoRA's norm reads (see [`view`]), in the adapter dtype
/// (fp32 and cast back with `upcast`).
pub fn product<O: TensorOps>(ops: &O, l: &Layer<O::Tensor>, upcast: bool) -> OpResult<O::Tensor> {
    with_factors(ops, l, |b, a| {
        factor_product(ops, b, a, l.adapter_dtype, upcast, None)
    })
}

/// `get_delta_weight`: dW = s * (B @ A) in the weight's own layout (an Embedding's transposed,
/// a Conv2d's as kernels), in the adapter dtype.
pub fn delta_weight<O: TensorOps>(
    ops: &O,
    l: &Layer<O::Tensor>,
    upcast: bool,
) -> OpResult<O::Tensor> {
    let p = with_factors(ops, l, |b, a| {
        factor_product(ops, b, a, l.adapter_dtype, upcast, Some(l.scaling))
    })?;
    match l.kind {
        Kind::Linear => Ok(p),
        Kind::Embedding => ops.t(&p),
        Kind::Conv2d => ops.reshape(&p, &l.weight_shape),
    }
}

/// A weight-shaped tensor as the 2-D matrix whose rows DoRA normalises: a Linear's [out, in]
/// as is, an Embedding's transposed ([dim, num_embeddings]: PEFT's `fan_in_fan_out=True`), a
/// Conv2d's flattened to [out, in * k * k].
pub fn view<O: TensorOps>(ops: &O, l: &Layer<O::Tensor>, w: &O::Tensor) -> OpResult<O::Tensor> {
    match l.kind {
        Kind::Linear => ops.reshape(w, &l.weight_shape),
        Kind::Embedding => ops.t(w),
        Kind::Conv2d => {
            let rest = l.weight_shape[1..].iter().product();
            ops.reshape(w, &[l.norm_len, rest])
        }
    }
}

/// The shape a per-channel vector (the bias, DoRA's factor) takes to broadcast over the layer's
/// output: [1, n, 1, 1] for a Conv2d (channels first), [1, n] otherwise.
pub fn channel_shape<T>(l: &Layer<T>) -> Vec<usize> {
    match l.kind {
        Kind::Conv2d => vec![1, l.norm_len, 1, 1],
        _ => vec![1, l.norm_len],
    }
}

/// The bias, if any, shaped to broadcast over the layer's output.
pub fn channel_bias<O: TensorOps>(ops: &O, l: &Layer<O::Tensor>) -> OpResult<Option<O::Tensor>> {
    l.bias
        .as_ref()
        .map(|b| ops.reshape(b, &channel_shape(l)))
        .transpose()
}

fn add_bias<O: TensorOps>(ops: &O, l: &Layer<O::Tensor>, y: O::Tensor) -> OpResult<O::Tensor> {
    match channel_bias(ops, l)? {
        Some(b) => ops.add(&y, &b),
        None => Ok(y),
    }
}

/// The base layer with weight `w`: x W^T + b, W\[ids\], or conv2d(x, W) + b.
pub fn base_with<O: TensorOps>(
    ops: &O,
    l: &Layer<O::Tensor>,
    w: &O::Tensor,
    x: &O::Tensor,
) -> OpResult<O::Tensor> {
    let y = match l.kind {
        Kind::Linear => ops.matmul(x, &ops.t(w)?)?,
        Kind::Embedding => ops.embedding(x, w)?,
        Kind::Conv2d => ops.conv2d(x, w)?,
    };
    add_bias(ops, l, y)
}

/// The base layer: x W^T + b ([batch, out]), or its Embedding/Conv2d counterpart.
pub fn base<O: TensorOps>(ops: &O, l: &Layer<O::Tensor>, x: &O::Tensor) -> OpResult<O::Tensor> {
    base_with(ops, l, &l.weight, x)
}

/// The input cast to the adapter dtype, as the adapter branch sees it (PEFT's
/// `_cast_input_dtype`); `None` for token ids, which the branch takes as they are.
pub fn cast_input<O: TensorOps>(
    ops: &O,
    l: &Layer<O::Tensor>,
    x: &O::Tensor,
) -> OpResult<Option<O::Tensor>> {
    match l.kind {
        Kind::Embedding => Ok(None),
        _ => ops.cast(x, l.adapter_dtype).map(Some),
    }
}

/// The adapter branch without scaling: lora_B(lora_A(x)) ((x A^T) B^T for a Linear layer;
/// embed(ids, A^T) @ B^T; conv2d(conv2d(x, A), B)).
pub fn branch<O: TensorOps>(ops: &O, l: &Layer<O::Tensor>, x: &O::Tensor) -> OpResult<O::Tensor> {
    match l.kind {
        Kind::Linear => {
            let h = ops.matmul(x, &ops.t(&l.lora_a)?)?;
            ops.matmul(&h, &ops.t(&l.lora_b)?)
        }
        Kind::Embedding => {
            let h = ops.embedding(x, &ops.t(&l.lora_a)?)?;
            ops.matmul(&h, &ops.t(&l.lora_b)?)
        }
        Kind::Conv2d => ops.conv2d(&ops.conv2d(x, &l.lora_a)?, &l.lora_b),
    }
}

/// y = base(x) + s * lora_B(lora_A(x)), the sum in the adapter dtype, cast back.
pub fn forward<O: TensorOps>(ops: &O, l: &Layer<O::Tensor>, x: &O::Tensor) -> OpResult<O::Tensor> {
    let y = base(ops, l, x)?;
    let xa = cast_input(ops, l, x)?;
    let lora = ops.scale(&branch(ops, l, xa.as_ref().unwrap_or(x))?, l.scaling)?;
    let y = ops.add(&ops.cast(&y, l.adapter_dtype)?, &lora)?;
    ops.cast(&y, l.dtype)
}

/// W + dW in the adapter dtype (fp32 under autocast), before any rounding to the base dtype.
pub fn merged_sum<O: TensorOps>(
    ops: &O,
    l: &Layer<O::Tensor>,
    dw: &O::Tensor,
) -> OpResult<O::Tensor> {
    ops.add(&ops.cast(&l.weight, l.adapter_dtype)?, dw)
}

/// W' = W + dW, rounded once in the base dtype (PEFT's in-place `weight.data += delta_weight`).
pub fn merge<O: TensorOps>(ops: &O, l: &Layer<O::Tensor>, dw: &O::Tensor) -> OpResult<O::Tensor> {
    ops.cast(&merged_sum(ops, l, dw)?, l.dtype)
}

/// W = W' - dW with dW first rounded to the base dtype (`weight.data -= delta_weight.to(orig_dtype)`).
pub fn unmerge<O: TensorOps>(
    ops: &O,
    l: &Layer<O::Tensor>,
    merged: &O::Tensor,
    dw: &O::Tensor,
) -> OpResult<O::Tensor> {
    ops.sub(merged, &ops.cast(dw, l.dtype)?)
}
