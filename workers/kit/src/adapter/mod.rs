//! LoRA and DoRA math, written once against `TensorOps` so that every backend runs the same
//! formulas (`lora.rs`, `dora.rs`, and `init.rs` for PiSSA/OLoRA), and the per-op drivers
//! that produce a case's outputs.

pub mod dora;
pub mod init;
pub mod lora;

use crate::case::{Base, Case, DType, Layer as Kind, Op};
use crate::io::{names, Inputs, Outputs};
use crate::ops::{OpResult, TensorOps};
use crate::tensor::HostTensor;

/// A layer with its adapter, on one backend: the base layer in the case dtype, the adapter in
/// [`Case::adapter_dtype`] (fp32 under autocast with a 16-bit base).
pub struct Layer<T> {
    pub kind: Kind,
    pub weight: T,
    pub bias: Option<T>,
    pub lora_a: T,
    pub lora_b: T,
    /// `lora_B.bias` (`lora_bias: true`), in the adapter dtype.
    pub lora_bias: Option<T>,
    pub scaling: f64,
    /// The base weight's dtype.
    pub dtype: DType,
    /// The dtype the base layer computes in, and its input, bias and output are held in: the
    /// weight's dtype, except an fp8 weight off the native path, which computes in bf16
    /// ([`Case::compute_dtype`]).
    pub compute_dtype: DType,
    pub adapter_dtype: DType,
    /// The weight's shape ([out, in], [num_embeddings, dim] or [out, in, k, k]).
    pub weight_shape: Vec<usize>,
    /// How many rows DoRA normalises: out_features, or embedding_dim for an Embedding.
    pub norm_len: usize,
    pub rank: usize,
    /// A Conv2d's `groups` (1 otherwise).
    pub groups: usize,
    /// How the base layer computes: one fused kernel or product then bias.
    pub base: Base,
}

/// A case's tensors on the backend: the layer with its adapter, the input, and the magnitude
/// the case gives (DoRA after init).
pub struct Uploaded<T> {
    pub layer: Layer<T>,
    pub x: T,
    pub magnitude: Option<T>,
}

/// Upload a case's inputs: the base layer in the case dtype, the adapter in
/// [`Case::adapter_dtype`], token ids as f32 (exact; the backend's `embedding` reads them as
/// integers).
pub fn upload<O: TensorOps>(ops: &O, case: &Case, inp: &Inputs) -> OpResult<Uploaded<O::Tensor>> {
    // fp32_init builds the layer in fp32; `initialise` casts it to the case dtype.
    let (dt, cdt, adt) = if case.inits_in_fp32() {
        (DType::F32, DType::F32, DType::F32)
    } else {
        (case.point.dtype, case.compute_dtype(), case.adapter_dtype())
    };
    let kind = case.point.layer;
    let norm_len = match kind {
        Kind::Embedding => inp.weight.shape[1],
        _ => inp.weight.shape[0],
    };
    let layer = Layer {
        kind,
        weight: ops.upload(&inp.weight, dt)?,
        bias: inp.bias.as_ref().map(|b| ops.upload(b, cdt)).transpose()?,
        lora_a: ops.upload(&inp.lora_a, adt)?,
        lora_b: ops.upload(&inp.lora_b, adt)?,
        lora_bias: inp
            .lora_bias
            .as_ref()
            .map(|b| ops.upload(b, adt))
            .transpose()?,
        scaling: inp.scaling,
        dtype: dt,
        compute_dtype: cdt,
        adapter_dtype: adt,
        weight_shape: inp.weight.shape.clone(),
        norm_len,
        rank: case.shape.rank,
        groups: case.shape.groups,
        base: case.shape.base,
    };
    let x_dtype = if kind == Kind::Embedding {
        DType::F32
    } else {
        case.compute_dtype()
    };
    Ok(Uploaded {
        layer,
        x: ops.upload(&inp.x, x_dtype)?,
        magnitude: inp
            .magnitude
            .as_ref()
            .map(|m| ops.upload(m, adt))
            .transpose()?,
    })
}

/// Run one case's operation on `ops` and read its outputs back, named as in `io::names`: the
/// case's inputs uploaded, then one function per op family, each shaped like its f64
/// counterpart in the runner's reference.
pub fn run<O: TensorOps>(ops: &O, case: &Case, inp: &Inputs) -> OpResult<Outputs> {
    let u = upload(ops, case, inp)?;
    match case.point.op {
        Op::Init => init(ops, case, u),
        Op::InitNoop => init_noop(ops, case, inp, u),
        Op::Forward => forward(ops, u),
        Op::Backward => backward(ops, inp, u),
        Op::Step => step(ops, inp, u),
        Op::Merge | Op::Unmerge | Op::Parity | Op::Roundtrip => merges(ops, case, u),
    }
}

/// The adapted layer's forward: DoRA's with a magnitude, LoRA's without.
fn adapted<O: TensorOps>(
    ops: &O,
    layer: &Layer<O::Tensor>,
    m: Option<&O::Tensor>,
    x: &O::Tensor,
) -> OpResult<O::Tensor> {
    match m {
        Some(m) => dora::forward(ops, layer, m, x),
        None => lora::forward(ops, layer, x),
    }
}

/// PEFT's `update_layer`: PiSSA/OLoRA cut A, B and the residual out of W; DoRA's magnitude is
/// the norm of what the init leaves, stored in the adapter dtype. Under `fp32_init` the layer
/// arrives in fp32 and leaves cast to the case dtype (`model.to(dtype)` after the init).
fn initialise<O: TensorOps>(
    ops: &O,
    case: &Case,
    layer: &mut Layer<O::Tensor>,
) -> OpResult<Option<O::Tensor>> {
    let upcast = case.upcasts();
    if case.point.adapter.is_data_init() {
        init::data_init(ops, case.point.adapter, layer, upcast)?;
    }
    let m = if case.point.adapter.is_dora() {
        Some(dora::init_magnitude(ops, layer, upcast)?)
    } else {
        None
    };
    if case.inits_in_fp32() {
        let (dt, cdt, adt) = (case.point.dtype, case.compute_dtype(), case.adapter_dtype());
        layer.weight = ops.cast(&layer.weight, dt)?;
        layer.bias = layer.bias.as_ref().map(|b| ops.cast(b, cdt)).transpose()?;
        layer.lora_a = ops.cast(&layer.lora_a, adt)?;
        layer.lora_b = ops.cast(&layer.lora_b, adt)?;
        layer.lora_bias = layer
            .lora_bias
            .as_ref()
            .map(|b| ops.cast(b, adt))
            .transpose()?;
        layer.dtype = dt;
        layer.compute_dtype = cdt;
        layer.adapter_dtype = adt;
    }
    m.map(|m| ops.cast(&m, case.adapter_dtype())).transpose()
}

/// `init`. PiSSA/OLoRA: the residual weight and the part of W the adapter now holds. DoRA: the
/// magnitude. LoRA computes nothing at init, so its check is the forward at init, which must
/// equal the base layer (B = 0).
fn init<O: TensorOps>(ops: &O, case: &Case, u: Uploaded<O::Tensor>) -> OpResult<Outputs> {
    let Uploaded { mut layer, x, .. } = u;
    let m = initialise(ops, case, &mut layer)?;
    if case.point.adapter.is_data_init() {
        let delta = lora::delta_weight(ops, &layer, case.upcasts())?;
        let mut out = vec![
            (names::RESIDUAL, ops.download(&layer.weight)?),
            (names::DELTA, ops.download(&delta)?),
        ];
        if let Some(m) = m {
            out.push((names::MAGNITUDE, ops.download(&m)?));
        }
        return Ok(out);
    }
    Ok(match m {
        Some(m) => vec![(names::MAGNITUDE, ops.download(&m)?)],
        None => vec![(
            names::RESULT,
            ops.download(&adapted(ops, &layer, None, &x)?)?,
        )],
    })
}

/// `init_noop`: the layer as its init leaves it, beside the base layer alone (on a copy of W
/// taken before the init rewrites it).
fn init_noop<O: TensorOps>(
    ops: &O,
    case: &Case,
    inp: &Inputs,
    u: Uploaded<O::Tensor>,
) -> OpResult<Outputs> {
    let Uploaded { mut layer, x, .. } = u;
    let w = ops.upload(&inp.weight, case.point.dtype)?;
    // After the init (which leaves the bias as it was, cast to the case dtype under fp32_init).
    let m = initialise(ops, case, &mut layer)?;
    let base = lora::base_with(ops, &layer, &w, &x)?;
    Ok(vec![
        (
            names::RESULT,
            ops.download(&adapted(ops, &layer, m.as_ref(), &x)?)?,
        ),
        (names::BASE_RESULT, ops.download(&base)?),
    ])
}

/// `forward`: the adapted layer on x.
fn forward<O: TensorOps>(ops: &O, u: Uploaded<O::Tensor>) -> OpResult<Outputs> {
    let y = adapted(ops, &u.layer, u.magnitude.as_ref(), &u.x)?;
    Ok(vec![(names::RESULT, ops.download(&y)?)])
}

/// The forward with A, B, the magnitude (DoRA), lora_B's bias and x (not token ids) as
/// leaves, and the gradients of `sum(y * grad_output)` with respect to them: (y, the layer,
/// the magnitude, the gradients named as in `io::names`).
type Traced<T> = (T, Layer<T>, Option<T>, Vec<(&'static str, T)>);

fn traced<O: TensorOps>(
    ops: &O,
    inp: &Inputs,
    u: Uploaded<O::Tensor>,
) -> OpResult<Traced<O::Tensor>> {
    let Uploaded {
        mut layer,
        x,
        magnitude,
    } = u;
    layer.lora_a = ops.param(&layer.lora_a)?;
    layer.lora_b = ops.param(&layer.lora_b)?;
    layer.lora_bias = layer.lora_bias.as_ref().map(|b| ops.param(b)).transpose()?;
    let ids = layer.kind == Kind::Embedding;
    let x = if ids { x } else { ops.param(&x)? };
    let m = magnitude.as_ref().map(|m| ops.param(m)).transpose()?;
    let y = adapted(ops, &layer, m.as_ref(), &x)?;
    let g = ops.upload(&inp.grad_output, layer.compute_dtype)?;
    let mut wrt = vec![
        (names::GRAD_A, &layer.lora_a),
        (names::GRAD_B, &layer.lora_b),
    ];
    wrt.extend(m.as_ref().map(|m| (names::GRAD_M, m)));
    wrt.extend(layer.lora_bias.as_ref().map(|b| (names::GRAD_LORA_BIAS, b)));
    if !ids {
        wrt.push((names::GRAD_X, &x));
    }
    let tensors: Vec<&O::Tensor> = wrt.iter().map(|(_, t)| *t).collect();
    let grads = ops.grads(&y, &g, &tensors)?;
    let named = wrt.iter().map(|(n, _)| *n).zip(grads).collect();
    Ok((y, layer, m, named))
}

/// `backward`: the forward, and the gradients of `sum(y * grad_output)` with respect to A, B,
/// the magnitude (DoRA), lora_B's bias and x (not for token ids).
fn backward<O: TensorOps>(ops: &O, inp: &Inputs, u: Uploaded<O::Tensor>) -> OpResult<Outputs> {
    let (y, _, _, grads) = traced(ops, inp, u)?;
    let mut out = vec![(names::RESULT, ops.download(&y)?)];
    for (n, g) in &grads {
        out.push((*n, ops.download(g)?));
    }
    Ok(out)
}

/// `step`: one step of `torch.optim.SGD` (no momentum, no weight decay) on the adapter after
/// forward and backward: p - lr * grad, in the parameter's own dtype (`p.add_(grad,
/// alpha=-lr)`). Outputs the updated A, B, magnitude (DoRA) and lora_B's bias.
fn step<O: TensorOps>(ops: &O, inp: &Inputs, u: Uploaded<O::Tensor>) -> OpResult<Outputs> {
    let lr = inp.lr;
    let (_, layer, m, grads) = traced(ops, inp, u)?;
    let grad = |name: &str| {
        grads
            .iter()
            .find(|(n, _)| *n == name)
            .map(|(_, g)| g)
            .expect("every parameter has its gradient")
    };
    let update = |p: &O::Tensor, name: &str| -> OpResult<HostTensor> {
        let p = ops.detach(p)?;
        ops.download(&ops.sub(&p, &ops.scale(grad(name), lr)?)?)
    };
    let mut out = vec![
        (names::STEP_A, update(&layer.lora_a, names::GRAD_A)?),
        (names::STEP_B, update(&layer.lora_b, names::GRAD_B)?),
    ];
    if let Some(m) = &m {
        out.push((names::MAGNITUDE, update(m, names::GRAD_M)?));
    }
    if let Some(b) = &layer.lora_bias {
        out.push((names::STEP_LORA_BIAS, update(b, names::GRAD_LORA_BIAS)?));
    }
    Ok(out)
}

/// `merge`, `unmerge`, `parity` and `roundtrip`: the merged weight, then what each op reads
/// off it.
fn merges<O: TensorOps>(ops: &O, case: &Case, u: Uploaded<O::Tensor>) -> OpResult<Outputs> {
    let Uploaded {
        layer,
        x,
        magnitude,
    } = u;
    let upcast = case.upcasts();
    let dw = lora::delta_weight(ops, &layer, upcast)?;
    let (merged, factor) = match &magnitude {
        Some(m) => {
            let (f, sum) = dora::merge_factor(ops, &layer, m, &dw)?;
            (dora::merge(ops, &layer, &f, &sum)?, Some(f))
        }
        None => (lora::merge(ops, &layer, &dw)?, None),
    };
    let merged_bias = lora::merge_bias(ops, &layer)?;
    Ok(match case.point.op {
        Op::Merge => {
            let mut out = vec![(names::MERGED, ops.download(&merged)?)];
            if let Some(b) = &merged_bias {
                out.push((names::MERGED_BIAS, ops.download(b)?));
            }
            out
        }
        Op::Parity => {
            let unmerged = adapted(ops, &layer, magnitude.as_ref(), &x)?;
            let bias = merged_bias.as_ref().or(layer.bias.as_ref());
            let merged_y = lora::base_with_bias(ops, &layer, &merged, bias, &x)?;
            vec![
                (names::RESULT, ops.download(&unmerged)?),
                (names::MERGED_RESULT, ops.download(&merged_y)?),
            ]
        }
        _ => {
            // Unmerge recomputes dW exactly as PEFT does (same path, same rounding).
            let dw = lora::delta_weight(ops, &layer, upcast)?;
            let restored = match &factor {
                Some(f) => dora::unmerge(ops, &layer, &merged, f, &dw)?,
                None => lora::unmerge(ops, &layer, &merged, &dw)?,
            };
            let mut out = vec![(names::UNMERGED, ops.download(&restored)?)];
            if let Some(b) = &merged_bias {
                out.push((
                    names::UNMERGED_BIAS,
                    ops.download(&lora::unmerge_bias(ops, &layer, b)?)?,
                ));
            }
            out
        }
    })
}
