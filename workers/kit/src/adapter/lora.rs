//! LoRA on a Linear, Embedding or Conv2d layer, as PEFT's `lora.Linear`, `lora.Embedding` and
//! `lora.Conv2d` compute it, over any `TensorOps`.
//!
//! Each function takes the adapter's dtype into account: under `autocast` the adapter (A, B)
//! is fp32 while the base layer is 16-bit, the branch runs on an fp32 copy of the input and the
//! sum is cast back; everywhere else the casts are no-ops.

use super::Layer;
use crate::case::{Base, DType, Layer as Kind};
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
            let a = ops.reshape(&l.lora_a, &[l.rank, dense_cols(l)])?;
            let b = ops.reshape(&l.lora_b, &[l.norm_len, l.rank / l.groups])?;
            f(
                &block_diagonal(ops, &b, l.norm_len, l.rank / l.groups, l.groups)?,
                &a,
            )
        }
        _ => f(&l.lora_b, &l.lora_a),
    }
}

/// The columns of a Conv2d weight as a dense matrix: in_channels * k * k (a grouped weight
/// holds only in_channels / groups of them per output channel).
fn dense_cols<T>(l: &Layer<T>) -> usize {
    l.weight_shape[1..].iter().product::<usize>() * l.groups
}

/// A grouped layer's [rows, cols] blocks as the dense [rows, cols * groups] matrix they stand
/// for: the rows of group j keep their values in column block j and are zero elsewhere. A
/// grouped Conv2d's weight ([out, in / g, k, k]) and PEFT's grouped lora_B ([out, r / g, 1, 1])
/// are the block diagonals of the full convolution's [out, in * k * k] and [out, r]. Returns
/// `t` itself for one group.
fn block_diagonal<O: TensorOps>(
    ops: &O,
    t: &O::Tensor,
    rows: usize,
    cols: usize,
    groups: usize,
) -> OpResult<O::Tensor> {
    if groups == 1 {
        return ops.reshape(t, &[rows, cols]);
    }
    let per = rows / groups;
    let mut blocks = Vec::with_capacity(groups);
    for j in 0..groups {
        let blk = ops.narrow(t, 0, j * per, per)?;
        let zero = ops.scale(&blk, 0.0)?;
        let parts: Vec<&O::Tensor> = (0..groups)
            .map(|i| if i == j { &blk } else { &zero })
            .collect();
        blocks.push(ops.cat(&parts, 1)?);
    }
    ops.cat(&blocks.iter().collect::<Vec<_>>(), 0)
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
            let per_group = l.weight_shape[1..].iter().product();
            let w = ops.reshape(w, &[l.norm_len, per_group])?;
            block_diagonal(ops, &w, l.norm_len, per_group, l.groups)
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

/// The base layer with weight `w`: x W^T + b, W\[ids\], or conv2d(x, W) + b.
pub fn base_with<O: TensorOps>(
    ops: &O,
    l: &Layer<O::Tensor>,
    w: &O::Tensor,
    x: &O::Tensor,
) -> OpResult<O::Tensor> {
    base_with_bias(ops, l, w, l.bias.as_ref(), x)
}

/// The base layer with weight `w` and bias `b`, in the compute dtype (an fp8 weight is cast to
/// it first, off the native path): `split` computes the product and adds the bias after it
/// (`x @ W.T + b`), `fused` runs the library's one kernel (`F.linear`, `nn.Conv2d`).
pub fn base_with_bias<O: TensorOps>(
    ops: &O,
    l: &Layer<O::Tensor>,
    w: &O::Tensor,
    b: Option<&O::Tensor>,
    x: &O::Tensor,
) -> OpResult<O::Tensor> {
    let cast;
    let w = if l.compute_dtype != l.dtype {
        cast = ops.cast(w, l.compute_dtype)?;
        &cast
    } else {
        w
    };
    let fused = l.base == Base::Fused;
    let y = match l.kind {
        Kind::Linear if fused => return ops.linear(x, w, b),
        Kind::Conv2d if fused => return ops.conv2d(x, w, b, l.groups),
        Kind::Linear => ops.matmul(x, &ops.t(w)?)?,
        Kind::Embedding => ops.embedding(x, w)?,
        Kind::Conv2d => ops.conv2d(x, w, None, l.groups)?,
    };
    match b {
        Some(b) => ops.add(&y, &ops.reshape(b, &channel_shape(l))?),
        None => Ok(y),
    }
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

/// The adapter branch without scaling: lora_B(lora_A(x)) ((x A^T) B^T + lora_B.bias for a
/// Linear layer; embed(ids, A^T) @ B^T; conv2d(conv2d(x, A), B) + lora_B.bias, lora_B over the
/// base layer's groups).
pub fn branch<O: TensorOps>(ops: &O, l: &Layer<O::Tensor>, x: &O::Tensor) -> OpResult<O::Tensor> {
    match l.kind {
        Kind::Linear | Kind::Embedding => {
            let h = match l.kind {
                Kind::Linear => ops.matmul(x, &ops.t(&l.lora_a)?)?,
                _ => ops.embedding(x, &ops.t(&l.lora_a)?)?,
            };
            match &l.lora_bias {
                // lora_B is an nn.Linear with a bias: F.linear.
                Some(lb) => ops.linear(&h, &l.lora_b, Some(lb)),
                None => ops.matmul(&h, &ops.t(&l.lora_b)?),
            }
        }
        Kind::Conv2d => {
            let h = ops.conv2d(x, &l.lora_a, None, 1)?;
            ops.conv2d(&h, &l.lora_b, l.lora_bias.as_ref(), l.groups)
        }
    }
}

/// y = base(x) + s * lora_B(lora_A(x)), the sum in the adapter dtype, cast back.
pub fn forward<O: TensorOps>(ops: &O, l: &Layer<O::Tensor>, x: &O::Tensor) -> OpResult<O::Tensor> {
    let y = base(ops, l, x)?;
    let xa = cast_input(ops, l, x)?;
    let lora = ops.scale(&branch(ops, l, xa.as_ref().unwrap_or(x))?, l.scaling)?;
    let y = ops.add(&ops.cast(&y, l.adapter_dtype)?, &lora)?;
    ops.cast(&y, l.compute_dtype)
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
/// An fp8 weight off the native path is unmerged in the compute dtype and rounded back.
pub fn unmerge<O: TensorOps>(
    ops: &O,
    l: &Layer<O::Tensor>,
    merged: &O::Tensor,
    dw: &O::Tensor,
) -> OpResult<O::Tensor> {
    if l.compute_dtype == l.dtype {
        return ops.sub(merged, &ops.cast(dw, l.dtype)?);
    }
    let w = ops.sub(
        &ops.cast(merged, l.compute_dtype)?,
        &ops.cast(dw, l.compute_dtype)?,
    )?;
    ops.cast(&w, l.dtype)
}

/// The bias a merge leaves with `lora_bias`: `base_layer.bias + lora_B.bias * scaling`, as
/// PEFT merges it since 0.16 (#2486), rounded to the bias's dtype; `None` without lora_B's
/// bias. A base layer without a bias never gets here: PEFT refuses that merge (see
/// `Case::refused_by_peft`).
pub fn merge_bias<O: TensorOps>(ops: &O, l: &Layer<O::Tensor>) -> OpResult<Option<O::Tensor>> {
    let (Some(b), Some(lb)) = (&l.bias, &l.lora_bias) else {
        return Ok(None);
    };
    let sum = ops.add(&ops.cast(b, l.adapter_dtype)?, &ops.scale(lb, l.scaling)?)?;
    ops.cast(&sum, l.compute_dtype).map(Some)
}

/// The bias an unmerge restores: `bias.data -= lora_B.bias * scaling`.
pub fn unmerge_bias<O: TensorOps>(
    ops: &O,
    l: &Layer<O::Tensor>,
    merged: &O::Tensor,
) -> OpResult<O::Tensor> {
    let lb = l
        .lora_bias
        .as_ref()
        .expect("a merged bias comes from lora_B's bias");
    let b = ops.sub(
        &ops.cast(merged, l.adapter_dtype)?,
        &ops.scale(lb, l.scaling)?,
    )?;
    ops.cast(&b, l.compute_dtype)
}
