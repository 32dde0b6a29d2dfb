//! PiSSA and OLoRA init, as PEFT's `pissa_init` and `olora_init` compute it, over any
//! `TensorOps`: the adapter is cut out of the base weight (its top-r singular triplets, or the
//! first r columns of its QR), and the residual is written back into the base layer, so that the
//! layer at init still computes W.
//!
//! PEFT always casts the weight to fp32 first; `native` asks the library for the SVD/QR in the
//! case dtype instead, which is what fails in 16-bit (`"linalg_svd_cpu" not implemented for
//! 'Half'`).

use super::Layer;
use crate::case::{Adapter, DType};
use crate::ops::{OpResult, TensorOps};

/// Replace the layer's A, B and weight by PiSSA's or OLoRA's, computed in fp32 when `upcast`.
/// - PiSSA: W = U S Vh, S_r /= s, A = diag(sqrt(S_r)) Vh_r, B = U_r diag(sqrt(S_r)).
/// - OLoRA: W = Q R, A = R\[:r\], B = Q\[:, :r\].
/// - Both: W_res = W - (s * B) @ A (Python's left-to-right `scaling * lora_B @ lora_A`), cast to
///   the base dtype; A and B are then cast to the base dtype
///   (`_move_adapter_to_device_of_base_layer`) and, under autocast, back to fp32.
pub fn data_init<O: TensorOps>(
    ops: &O,
    adapter: Adapter,
    l: &mut Layer<O::Tensor>,
    upcast: bool,
) -> OpResult<()> {
    let compute = if upcast { DType::F32 } else { l.dtype };
    let w = ops.cast(&l.weight, compute)?;
    let r = l.rank;
    let (a, b) = if adapter == Adapter::Olora {
        let (q, rr) = ops.qr(&w)?;
        (ops.narrow(&rr, 0, 0, r)?, ops.narrow(&q, 1, 0, r)?)
    } else {
        let (u, s, vh) = ops.svd(&w)?;
        let root = ops.sqrt(&ops.scale(&ops.narrow(&s, 0, 0, r)?, 1.0 / l.scaling)?)?;
        let a = ops.mul(&ops.reshape(&root, &[r, 1])?, &ops.narrow(&vh, 0, 0, r)?)?;
        let b = ops.mul(&ops.narrow(&u, 1, 0, r)?, &ops.reshape(&root, &[1, r])?)?;
        (a, b)
    };
    let residual = ops.sub(&w, &ops.matmul(&ops.scale(&b, l.scaling)?, &a)?)?;
    l.weight = ops.cast(&residual, l.dtype)?;
    l.lora_a = ops.cast(&ops.cast(&a, l.dtype)?, l.adapter_dtype)?;
    l.lora_b = ops.cast(&ops.cast(&b, l.dtype)?, l.adapter_dtype)?;
    Ok(())
}
