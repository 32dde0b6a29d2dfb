//! The f64 reference: PEFT's LoRA/DoRA formulas in plain Rust on the host.
//!
//! Written separately from `adapter/` on purpose (no tensor trait, no shared helpers), so that a
//! mistake in the shared math cannot hide in both the backends and the yardstick. It takes the
//! already rounded case inputs, so its distance to a backend's output is that backend's error.
//!
//! Embedding and Conv2d layers are restated as Linear layers ([`linear_view`]) and their outputs
//! put back in the layer's own layout, so one set of formulas serves all three:
//! - an Embedding of ids is a Linear layer on one-hot rows with weight W^T ([dim, num_emb]),
//!   A = lora_embedding_A, B = lora_embedding_B: DoRA's norm per embedding dimension and PEFT's
//!   transposes fall out of that;
//! - a Conv2d (stride 1, no padding) is a Linear layer on the image's patches (im2col) with the
//!   kernels flattened to rows; DoRA's norm over all but the output channel is then a row norm.
//!
//! PiSSA and OLoRA take the SVD and QR of the rounded weight in f64 (nalgebra).

use super::parallel;
use crate::case::{Adapter, Layer, Op};
use crate::worker::io::{names, Inputs, Outputs};
use crate::worker::tensor::HostTensor;
use std::borrow::Cow;
use std::sync::Arc;

/// A row-major view of a matrix: its values, row stride and column stride.
type Strided<'a> = (&'a [f64], isize, isize);

/// `C = A B` into `out` (row stride `ldc`) for A: [n, k] and B: [k, m] given by their strides,
/// with a real blocked GEMM (matrixmultiply's dgemm: plain f64 arithmetic, no lower precision
/// anywhere).
fn dgemm((n, k, m): (usize, usize, usize), a: Strided, b: Strided, out: &mut [f64], ldc: usize) {
    if n == 0 || m == 0 || k == 0 {
        return;
    }
    let end = |(d, rs, cs): Strided, rows: usize, cols: usize| {
        (rows - 1) as isize * rs + (cols - 1) as isize * cs < d.len() as isize
    };
    assert!(end(a, n, k) && end(b, k, m) && (n - 1) * ldc + m <= out.len());
    // SAFETY: the asserts above keep every strided element of a, b and out inside its slice
    // (strides are non-negative here), and `out` is borrowed mutably, so nothing aliases it.
    unsafe {
        matrixmultiply::dgemm(
            n,
            k,
            m,
            1.0,
            a.0.as_ptr(),
            a.1,
            a.2,
            b.0.as_ptr(),
            b.1,
            b.2,
            0.0,
            out.as_mut_ptr(),
            ldc as isize,
            1,
        );
    }
}

/// The strided matrix `m` from element (row, col) on.
fn at((d, rs, cs): Strided, row: usize, col: usize) -> Strided {
    (
        &d[(row as isize * rs + col as isize * cs) as usize..],
        rs,
        cs,
    )
}

/// Rows (or columns) of C per block of a parallel product.
const GEMM_BLOCK: usize = 64;

/// `C = A B` for A: [n, k], B: [k, m] given by their strides, split over the cores by blocks of
/// C's rows (or of its columns when C has few rows, as `x W^T` of an LLM layer has). dgemm sums
/// each element over k in the same blocks whatever the size of the call, so C is bit for bit
/// the single call's, on any number of threads.
fn gemm(n: usize, k: usize, m: usize, a: Strided, b: Strided) -> HostTensor {
    let mut out = vec![0.0; n * m];
    let work = n.saturating_mul(k).saturating_mul(m) / 16;
    if n >= 2 * GEMM_BLOCK || m < 2 * GEMM_BLOCK || n == 0 || k == 0 {
        parallel::map_chunks(
            &mut out,
            GEMM_BLOCK * m.max(1),
            work,
            parallel::threads(),
            |j, c| {
                let r0 = j * GEMM_BLOCK;
                dgemm((c.len() / m, k, m), at(a, r0, 0), b, c, m)
            },
        );
    } else {
        // Column blocks, each written [n, block] into its own part of a scratch, then placed.
        let mut blocks = vec![0.0; n * m];
        parallel::map_chunks(
            &mut blocks,
            GEMM_BLOCK * n,
            work,
            parallel::threads(),
            |j, c| {
                let mb = c.len() / n;
                dgemm((n, k, mb), a, at(b, 0, j * GEMM_BLOCK), c, mb)
            },
        );
        for (j, c) in blocks.chunks(GEMM_BLOCK * n).enumerate() {
            let (c0, mb) = (j * GEMM_BLOCK, c.len() / n);
            for i in 0..n {
                out[i * m + c0..i * m + c0 + mb].copy_from_slice(&c[i * mb..(i + 1) * mb]);
            }
        }
    }
    HostTensor::new(vec![n, m], out)
}

/// `a @ b^T` for a: [n, k], b: [m, k] -> [n, m].
fn matmul_nt(a: &HostTensor, b: &HostTensor) -> HostTensor {
    let (n, k, m) = (a.rows(), a.cols(), b.rows());
    assert_eq!(k, b.cols());
    assert_eq!(a.data.len(), n * k);
    assert_eq!(b.data.len(), m * k);
    gemm(n, k, m, (&a.data, k as isize, 1), (&b.data, 1, k as isize))
}

/// `a @ b` for a: [n, k], b: [k, m] -> [n, m].
fn matmul(a: &HostTensor, b: &HostTensor) -> HostTensor {
    let (n, k, m) = (a.rows(), a.cols(), b.cols());
    assert_eq!(k, b.rows());
    assert_eq!(a.data.len(), n * k);
    assert_eq!(b.data.len(), k * m);
    gemm(n, k, m, (&a.data, k as isize, 1), (&b.data, m as isize, 1))
}

/// `a^T @ b` for a: [k, n], b: [k, m] -> [n, m].
fn matmul_tn(a: &HostTensor, b: &HostTensor) -> HostTensor {
    let (k, n, m) = (a.rows(), a.cols(), b.cols());
    assert_eq!(k, b.rows());
    assert_eq!(a.data.len(), k * n);
    assert_eq!(b.data.len(), k * m);
    gemm(n, k, m, (&a.data, 1, n as isize), (&b.data, m as isize, 1))
}

/// Elementwise `a + s * b`.
fn axpy(a: &HostTensor, s: f64, b: &HostTensor) -> HostTensor {
    assert_eq!(a.shape, b.shape);
    HostTensor::new(
        a.shape.clone(),
        a.data.iter().zip(&b.data).map(|(x, y)| x + s * y).collect(),
    )
}

/// Multiply row i of a 2-D tensor (or element i of a vector) by f(i, value).
fn map_rows(a: &HostTensor, f: impl Fn(usize, f64) -> f64) -> HostTensor {
    let cols = a.data.len() / a.rows();
    HostTensor::new(
        a.shape.clone(),
        a.data
            .iter()
            .enumerate()
            .map(|(idx, &v)| f(idx / cols, v))
            .collect(),
    )
}

/// Multiply column j of a [n, m] tensor by v[j].
fn scale_cols(a: &HostTensor, v: &[f64]) -> HostTensor {
    let m = a.cols();
    HostTensor::new(
        a.shape.clone(),
        a.data
            .iter()
            .enumerate()
            .map(|(idx, &x)| x * v[idx % m])
            .collect(),
    )
}

/// Delta weight s * (B @ A): [out, in].
pub fn delta_weight(a: &HostTensor, b: &HostTensor, scaling: f64) -> HostTensor {
    let mut ba = matmul(b, a);
    ba.data.iter_mut().for_each(|v| *v *= scaling);
    ba
}

/// DoRA's weight norm ||W + s B A||_2 per output row: \[out\].
pub fn weight_norm(w: &HostTensor, a: &HostTensor, b: &HostTensor, scaling: f64) -> HostTensor {
    let mut norms = vec![0.0; w.rows()];
    let cols = w.cols();
    sum_rows(w, a, b, scaling, &mut norms, 1, |rows, out| {
        for (o, r) in out.iter_mut().zip(rows.sum.chunks(cols)) {
            *o = r.iter().map(|v| v * v).sum::<f64>().sqrt();
        }
    });
    HostTensor::new(vec![w.rows()], norms)
}

/// Rows of W per block of the weight-sized passes (W + s B A is never held whole: a block of
/// it lives in cache while it is used).
const ROW_BLOCK: usize = 32;

/// One block of rows of W, with s B A and W + s B A for those rows.
struct SumRows<'a> {
    first: usize,
    w: &'a [f64],
    dw: &'a [f64],
    sum: &'a [f64],
}

/// `f(block, out)` for each block of [`ROW_BLOCK`] rows of W, split over the cores, where `out`
/// is the block's part of `out` (`per_row` values a row); the results in block order. Each
/// value is computed as the whole-matrix expressions `s (B A)` and `W + 1 dW` compute it, so the
/// passes agree bit for bit with them and with each other.
fn sum_rows<T: Send, R: Send>(
    w: &HostTensor,
    a: &HostTensor,
    b: &HostTensor,
    scaling: f64,
    out: &mut [T],
    per_row: usize,
    f: impl Fn(&SumRows, &mut [T]) -> R + Sync,
) -> Vec<R> {
    let (rows, cols, r) = (w.rows(), w.cols(), a.rows());
    assert_eq!(w.data.len(), rows * cols);
    assert_eq!((a.cols(), b.rows(), b.cols()), (cols, rows, r));
    assert_eq!(out.len(), rows * per_row);
    let work = w.data.len() * (r + 2);
    let scratch = |j: usize, out: &mut [T]| {
        let first = j * ROW_BLOCK;
        let nr = (rows - first).min(ROW_BLOCK);
        let mut dw = vec![0.0; nr * cols];
        if r > 0 {
            dgemm(
                (nr, r, cols),
                (&b.data[first * r..], r as isize, 1),
                (&a.data, cols as isize, 1),
                &mut dw,
                cols,
            );
        }
        dw.iter_mut().for_each(|v| *v *= scaling);
        let w = &w.data[first * cols..(first + nr) * cols];
        let sum: Vec<f64> = w.iter().zip(&dw).map(|(x, y)| x + 1.0 * y).collect();
        f(
            &SumRows {
                first,
                w,
                dw: &dw,
                sum: &sum,
            },
            out,
        )
    };
    if per_row == 0 {
        // Nothing to write: the blocks alone.
        return parallel::map_ranges(rows, ROW_BLOCK, work, parallel::threads(), |j, _| {
            scratch(j, &mut [])
        });
    }
    parallel::map_chunks(
        out,
        ROW_BLOCK * per_row,
        work,
        parallel::threads(),
        |j, o| scratch(j, o),
    )
}

fn add_bias(y: HostTensor, bias: Option<&HostTensor>) -> HostTensor {
    match bias {
        None => y,
        Some(b) => {
            let m = y.cols();
            HostTensor::new(
                y.shape.clone(),
                y.data
                    .iter()
                    .enumerate()
                    .map(|(i, v)| v + b.data[i % m])
                    .collect(),
            )
        }
    }
}

/// The base layer alone with weight `w`: x w^T + b.
fn base_layer(inp: &Inputs, w: &HostTensor) -> HostTensor {
    add_bias(matmul_nt(&inp.x, w), inp.bias.as_ref())
}

/// Forward pieces: base = x W^T, h = x A^T, lora = h B^T.
struct Pieces {
    base: HostTensor,
    h: HostTensor,
    lora: HostTensor,
}

fn pieces(inp: &Inputs) -> Pieces {
    let base = matmul_nt(&inp.x, &inp.weight);
    let h = matmul_nt(&inp.x, &inp.lora_a);
    let lora = matmul_nt(&h, &inp.lora_b);
    Pieces { base, h, lora }
}

/// y = x W^T + b + s (x A^T) B^T (LoRA), or c * (x W^T + s (x A^T) B^T) + b with the row factor c
/// (DoRA).
fn forward(inp: &Inputs, p: &Pieces, c: Option<&[f64]>) -> HostTensor {
    let pre = axpy(&p.base, inp.scaling, &p.lora);
    let pre = match c {
        Some(c) => scale_cols(&pre, c),
        None => pre,
    };
    add_bias(
        add_bias(pre, inp.bias.as_ref()),
        scaled_lora_bias(inp).as_ref(),
    )
}

/// s * lora_B.bias, the adapter's share of the output's bias (`lora_bias`; LoRA only: PEFT
/// refuses it with DoRA).
fn scaled_lora_bias(inp: &Inputs) -> Option<HostTensor> {
    inp.lora_bias
        .as_ref()
        .map(|b| map_rows(b, |_, v| inp.scaling * v))
}

/// The base layer's bias after a merge with `lora_bias`: b + s * lora_B.bias.
fn merged_bias(inp: &Inputs) -> Option<HostTensor> {
    let (b, lb) = (inp.bias.as_ref()?, scaled_lora_bias(inp)?);
    Some(axpy(b, 1.0, &lb))
}

/// The reference outputs of one case, under the same names the backends use.
pub fn compute(adapter: Adapter, op: Op, inp: &Inputs) -> Outputs {
    compute_with_conditioning(adapter, op, inp).0
}

fn transpose(a: &HostTensor) -> HostTensor {
    let (n, m) = (a.rows(), a.cols());
    let mut out = vec![0.0; n * m];
    for i in 0..n {
        for j in 0..m {
            out[j * n + i] = a.data[i * m + j];
        }
    }
    HostTensor::new(vec![m, n], out)
}

/// The same values as a 2-D [shape[0], rest] matrix.
fn flat2(a: &HostTensor) -> HostTensor {
    let rows = a.shape[0];
    HostTensor::new(vec![rows, a.data.len() / rows], a.data.clone())
}

fn reshaped(a: HostTensor, shape: &[usize]) -> HostTensor {
    HostTensor::new(shape.to_vec(), a.data)
}

/// Conv2d geometry: (batch, in channels, image side, kernel side, output side).
fn conv_dims(inp: &Inputs) -> (usize, usize, usize, usize, usize) {
    let (b, c, h) = (inp.x.shape[0], inp.x.shape[1], inp.x.shape[2]);
    let k = inp.weight.shape[2];
    (b, c, h, k, h - k + 1)
}

/// Every (patch index, image index) pair of a stride-1, unpadded convolution: patch rows
/// [(n, oy, ox)], columns [(c, ky, kx)], over a [b, c, h, h] image.
fn for_each_patch_value(inp: &Inputs, mut f: impl FnMut(usize, usize)) {
    let (b, c, h, k, o) = conv_dims(inp);
    let cols = c * k * k;
    for n in 0..b {
        for oy in 0..o {
            for ox in 0..o {
                let row = (n * o + oy) * o + ox;
                for ch in 0..c {
                    for ky in 0..k {
                        for kx in 0..k {
                            f(
                                row * cols + (ch * k + ky) * k + kx,
                                ((n * c + ch) * h + oy + ky) * h + ox + kx,
                            );
                        }
                    }
                }
            }
        }
    }
}

/// The patches of a [b, c, h, h] image as rows [(n, oy, ox), (c, ky, kx)].
fn im2col(inp: &Inputs) -> HostTensor {
    let (b, c, _, k, o) = conv_dims(inp);
    let mut out = vec![0.0; b * o * o * c * k * k];
    for_each_patch_value(inp, |p, i| out[p] = inp.x.data[i]);
    HostTensor::new(vec![b * o * o, c * k * k], out)
}

/// The adjoint of [`im2col`]: patch gradients summed back into the image.
fn col2im(inp: &Inputs, cols: &HostTensor) -> HostTensor {
    let mut out = vec![0.0; inp.x.data.len()];
    for_each_patch_value(inp, |p, i| out[i] += cols.data[p]);
    HostTensor::new(inp.x.shape.clone(), out)
}

/// [b, o, oy, ox] (channels first) <-> [(n, oy, ox), o] (one row per output position).
fn channels_last(t: &HostTensor) -> HostTensor {
    let (b, o, p) = (t.shape[0], t.shape[1], t.shape[2] * t.shape[3]);
    let mut out = vec![0.0; t.data.len()];
    for n in 0..b {
        for ch in 0..o {
            for q in 0..p {
                out[(n * p + q) * o + ch] = t.data[(n * o + ch) * p + q];
            }
        }
    }
    HostTensor::new(vec![b * p, o], out)
}

fn channels_first(t: &HostTensor, like: &[usize]) -> HostTensor {
    let (b, o, p) = (like[0], like[1], like[2] * like[3]);
    let mut out = vec![0.0; t.data.len()];
    for n in 0..b {
        for ch in 0..o {
            for q in 0..p {
                out[(n * o + ch) * p + q] = t.data[(n * p + q) * o + ch];
            }
        }
    }
    HostTensor::new(like.to_vec(), out)
}

/// The layer's inputs restated as a Linear layer's (see the module doc); a Linear layer's as
/// they are (no copy: on an LLM-sized layer the weight is hundreds of MB).
pub fn linear_view(inp: &Inputs) -> Cow<'_, Inputs> {
    Cow::Owned(match inp.layer {
        Layer::Linear => return Cow::Borrowed(inp),
        Layer::Embedding => {
            let num = inp.weight.rows();
            let mut onehot = vec![0.0; inp.x.data.len() * num];
            for (row, &id) in inp.x.data.iter().enumerate() {
                onehot[row * num + id as usize] = 1.0;
            }
            Inputs {
                layer: Layer::Linear,
                x: HostTensor::new(vec![inp.x.data.len(), num], onehot),
                weight: Arc::new(transpose(&inp.weight)),
                ..inp.clone()
            }
        }
        Layer::Conv2d => {
            let g = &inp.grad_output;
            let out_shape = [g.shape[0], g.shape[1], g.shape[2], g.shape[3]];
            let groups = conv_groups(inp);
            Inputs {
                layer: Layer::Linear,
                x: im2col(inp),
                weight: Arc::new(block_diagonal(&flat2(&inp.weight), groups)),
                lora_a: flat2(&inp.lora_a),
                lora_b: block_diagonal(&flat2(&inp.lora_b), groups),
                grad_output: channels_last(&reshaped(g.clone(), &out_shape)),
                ..inp.clone()
            }
        }
    })
}

/// Outputs of the linear view put back in the layer's layout.
fn layer_outputs(inp: &Inputs, outputs: Outputs) -> Outputs {
    let weight_like = [
        names::MERGED,
        names::UNMERGED,
        names::RESIDUAL,
        names::DELTA,
    ];
    let result_like = [names::RESULT, names::BASE_RESULT, names::MERGED_RESULT];
    match inp.layer {
        Layer::Linear => outputs,
        Layer::Embedding => outputs
            .into_iter()
            .filter(|(n, _)| *n != names::GRAD_X)
            .map(|(n, t)| {
                if weight_like.contains(&n) {
                    (n, transpose(&t))
                } else {
                    (n, t)
                }
            })
            .collect(),
        Layer::Conv2d => outputs
            .into_iter()
            .map(|(n, t)| {
                let t = if weight_like.contains(&n) {
                    // A grouped layer's merge is the full convolution's (PEFT refuses it, see
                    // `Case::refused_by_peft`): [out, in, k, k].
                    let w = &inp.weight.shape;
                    reshaped(t, &[w[0], inp.x.shape[1], w[2], w[3]])
                } else if result_like.contains(&n) {
                    channels_first(&t, &inp.grad_output.shape)
                } else if n == names::GRAD_A || n == names::STEP_A {
                    reshaped(t, &inp.lora_a.shape)
                } else if n == names::GRAD_B || n == names::STEP_B {
                    reshaped(blocks_of(&t, conv_groups(inp)), &inp.lora_b.shape)
                } else if n == names::GRAD_X {
                    col2im(inp, &t)
                } else {
                    t
                };
                (n, t)
            })
            .collect(),
    }
}

/// DoRA's norm of W + s B A for any layer: per output row of a Linear layer, per embedding
/// dimension of an Embedding, per output channel of a Conv2d.
pub fn layer_weight_norm(
    layer: Layer,
    w: &HostTensor,
    a: &HostTensor,
    b: &HostTensor,
    scaling: f64,
) -> HostTensor {
    match layer {
        Layer::Linear => weight_norm(w, a, b, scaling),
        Layer::Embedding => weight_norm(&transpose(w), a, b, scaling),
        Layer::Conv2d => {
            // A grouped weight [out, in / g, k, k] beside A [r, in, k, k].
            let groups = a.data.len() / a.shape[0] / (w.data.len() / w.shape[0]);
            let dense = |t: &HostTensor| block_diagonal(&flat2(t), groups);
            weight_norm(&dense(w), &flat2(a), &dense(b), scaling)
        }
    }
}

/// A Conv2d's `groups`: the input's channels over the weight's.
fn conv_groups(inp: &Inputs) -> usize {
    inp.x.shape[1] / inp.weight.shape[1]
}

/// A grouped layer's [rows, cols] blocks as the dense [rows, cols * groups] matrix they stand
/// for (rows of group j in column block j, zeros elsewhere): a grouped Conv2d's weight and
/// PEFT's grouped lora_B as the full convolution's. The identity for one group.
fn block_diagonal(t: &HostTensor, groups: usize) -> HostTensor {
    if groups == 1 {
        return t.clone();
    }
    let (rows, cols) = (t.rows(), t.cols());
    let per = rows / groups;
    let mut out = vec![0.0; rows * cols * groups];
    for i in 0..rows {
        let j = i / per;
        let at = i * cols * groups + j * cols;
        out[at..at + cols].copy_from_slice(&t.data[i * cols..(i + 1) * cols]);
    }
    HostTensor::new(vec![rows, cols * groups], out)
}

/// The inverse of [`block_diagonal`]: each row's own column block.
fn blocks_of(t: &HostTensor, groups: usize) -> HostTensor {
    if groups == 1 {
        return t.clone();
    }
    let (rows, cols) = (t.rows(), t.cols() / groups);
    let per = rows / groups;
    let data = (0..rows)
        .flat_map(|i| {
            let at = i * cols * groups + (i / per) * cols;
            t.data[at..at + cols].to_vec()
        })
        .collect();
    HostTensor::new(vec![rows, cols], data)
}

/// PiSSA's or OLoRA's init from the (rounded) weight, in f64: (A, B, W_res).
/// PiSSA: W = U S Vh, A = diag(sqrt(S_r / s)) Vh_r, B = U_r diag(sqrt(S_r / s)).
/// OLoRA: W = Q R, A = R\[:r\], B = Q\[:, :r\]. Both: W_res = W - s B A.
///
/// Also returns the init's conditioning: a rank-r truncated SVD moves by about
/// u * sigma_1 / (sigma_r - sigma_{r+1}) per unit of rounding in W (Wedin's bound), so an SVD
/// that is as good as its dtype allows lands that many roundings away from this one; QR's
/// leading columns are backward stable, 1.
pub fn data_init(
    adapter: Adapter,
    inp: &Inputs,
    rank: usize,
) -> (HostTensor, HostTensor, HostTensor, f64) {
    data_init_by(adapter, inp, rank, inp.weight.data.len() >= LLM_INIT)
}

/// From this many weight values on, PiSSA and OLoRA take the LLM route ([`llm_init`]):
/// nalgebra's unblocked SVD and full QR take minutes on a 4096x4096 weight. Below it the
/// reference stays nalgebra's, as it always was, so committed reports keep their last digits.
const LLM_INIT: usize = 1 << 20;

/// [`data_init`] by the LLM route or nalgebra's.
fn data_init_by(
    adapter: Adapter,
    inp: &Inputs,
    rank: usize,
    llm: bool,
) -> (HostTensor, HostTensor, HostTensor, f64) {
    let s = inp.scaling;
    if llm {
        let (a, b, kappa) = llm_init(adapter, &inp.weight, rank, s);
        let residual = axpy(&inp.weight, -1.0, &delta_weight(&a, &b, s));
        return (a, b, residual, kappa);
    }
    let (o, i) = (inp.weight.rows(), inp.weight.cols());
    let w = nalgebra::DMatrix::from_row_slice(o, i, &inp.weight.data);
    let mut kappa = 1.0;
    let (a, b) = if adapter == Adapter::Olora {
        let qr = w.qr();
        let (q, r) = (qr.q(), qr.r());
        (
            r.rows(0, rank).into_owned(),
            q.columns(0, rank).into_owned(),
        )
    } else {
        let svd = w.svd(true, true);
        let (u, vt) = (svd.u.expect("asked for U"), svd.v_t.expect("asked for V^T"));
        let mut order: Vec<usize> = (0..svd.singular_values.len()).collect();
        order.sort_by(|&x, &y| svd.singular_values[y].total_cmp(&svd.singular_values[x]));
        let sigma = |k: usize| order.get(k).map_or(0.0, |&j| svd.singular_values[j]);
        let gap = sigma(rank - 1) - sigma(rank);
        if gap > 0.0 {
            kappa = (sigma(0) / gap).max(1.0);
        }
        let mut a = nalgebra::DMatrix::zeros(rank, i);
        let mut b = nalgebra::DMatrix::zeros(o, rank);
        for (k, &j) in order.iter().take(rank).enumerate() {
            let root = (svd.singular_values[j] / s).sqrt();
            a.set_row(k, &(vt.row(j) * root));
            b.set_column(k, &(u.column(j) * root));
        }
        (a, b)
    };
    let host = |m: &nalgebra::DMatrix<f64>| {
        let mut data = Vec::with_capacity(m.len());
        for row in m.row_iter() {
            data.extend(row.iter());
        }
        HostTensor::new(vec![m.nrows(), m.ncols()], data)
    };
    let (a, b) = (host(&a), host(&b));
    let residual = axpy(&inp.weight, -1.0, &delta_weight(&a, &b, s));
    (a, b, residual, kappa)
}

/// PiSSA's or OLoRA's (A, B, kappa) on an LLM-sized weight W: [o, i], in f64.
/// - OLoRA: W = Q R gives B = Q\[:, :r\] and A = R\[:r\]. The first r columns of Q and the
///   leading r x r block of R are the QR of W's first r columns alone (Householder QR works
///   column by column), and A = R\[:r\] = Q_r^T W: one QR of an [o, r] matrix and one product,
///   instead of the QR of all of W. Exact in exact arithmetic; s B A = s Q_r Q_r^T W (what the
///   outputs hold) is free of the QR's sign choices.
/// - PiSSA: faer's thin SVD (blocked, cache-aware), sequential so that the reference does not
///   depend on the core count; A, B and kappa as in [`data_init`].
fn llm_init(
    adapter: Adapter,
    w: &HostTensor,
    rank: usize,
    s: f64,
) -> (HostTensor, HostTensor, f64) {
    let (o, i) = (w.rows(), w.cols());
    if adapter == Adapter::Olora {
        let lead = nalgebra::DMatrix::from_fn(o, rank, |r, c| w.data[r * i + c]);
        let q = lead.qr().q();
        let q = HostTensor::new(
            vec![o, rank],
            (0..o)
                .flat_map(|r| q.row(r).iter().copied().collect::<Vec<_>>())
                .collect(),
        );
        return (matmul_tn(&q, w), q, 1.0);
    }
    faer::set_global_parallelism(faer::Par::Seq);
    let m = faer::Mat::<f64>::from_fn(o, i, |r, c| w.data[r * i + c]);
    let Ok(svd) = m.thin_svd() else {
        // faer's SVD did not converge (not seen on finite weights): a NaN reference marks it.
        let nan = |r, c| HostTensor::new(vec![r, c], vec![f64::NAN; r * c]);
        return (nan(rank, i), nan(o, rank), f64::NAN);
    };
    let sigma = svd.S().column_vector();
    let sv = |k: usize| if k < sigma.nrows() { sigma[k] } else { 0.0 };
    let gap = sv(rank - 1) - sv(rank);
    let kappa = if gap > 0.0 {
        (sv(0) / gap).max(1.0)
    } else {
        1.0
    };
    let (u, v) = (svd.U(), svd.V());
    let root = |k: usize| (sv(k) / s).sqrt();
    let a = (0..rank)
        .flat_map(|k| (0..i).map(move |j| (k, j)))
        .map(|(k, j)| v[(j, k)] * root(k))
        .collect();
    let b = (0..o)
        .flat_map(|r| (0..rank).map(move |k| (r, k)))
        .map(|(r, k)| u[(r, k)] * root(k))
        .collect();
    (
        HostTensor::new(vec![rank, i], a),
        HostTensor::new(vec![o, rank], b),
        kappa,
    )
}

/// The layer as its init leaves it: B = 0 (A = 0 for an Embedding) as given, or PiSSA/OLoRA's
/// A, B and residual weight; DoRA's magnitude is the norm of what the init leaves.
/// Also returns the init's conditioning (see [`data_init`]; 1 for LoRA and DoRA).
fn initialised(adapter: Adapter, inp: &Inputs) -> (Inputs, f64) {
    let mut out = inp.clone();
    let mut kappa = 1.0;
    if adapter.is_data_init() {
        let (a, b, w, k) = data_init(adapter, inp, inp.lora_a.rows());
        out.lora_a = a;
        out.lora_b = b;
        out.weight = Arc::new(w);
        kappa = k;
    }
    if adapter.is_dora() {
        out.magnitude = Some(weight_norm(
            &out.weight,
            &out.lora_a,
            &out.lora_b,
            out.scaling,
        ));
    }
    (out, kappa)
}

/// How much unmerge's cancellation amplifies rounding: unmerge returns W through W + dW (and,
/// for DoRA, W' = c (W + dW)), so a rounding of those costs max|W + dW| / max|W| times more,
/// relative to W, than a rounding of W itself. 1 for every other op.
pub fn conditioning(op: Op, inp: &Inputs) -> f64 {
    if !matches!(op, Op::Unmerge | Op::Roundtrip) {
        return 1.0;
    }
    let lin = linear_view(inp);
    merge_pass(&lin, Pass::Kappa).1
}

/// kappa from max|W| and max(|W + dW|, |W'|).
fn kappa(w: f64, sum_or_merged: f64) -> f64 {
    if w == 0.0 {
        return 1.0;
    }
    (sum_or_merged / w).max(1.0)
}

/// [`compute`] and [`conditioning`] together, sharing the weight-sized intermediates (on an
/// LLM-sized layer those dominate the reference's time).
pub fn compute_with_conditioning(adapter: Adapter, op: Op, inp: &Inputs) -> (Outputs, f64) {
    let (outputs, kappa) = compute_linear(adapter, op, &linear_view(inp));
    (layer_outputs(inp, outputs), kappa)
}

/// [`compute_with_conditioning`] on a Linear layer (or a layer's linear view).
fn compute_linear(adapter: Adapter, op: Op, inp: &Inputs) -> (Outputs, f64) {
    let dora = adapter.is_dora();
    let outputs = match op {
        Op::Init if adapter.is_data_init() => {
            let (init, k) = initialised(adapter, inp);
            let mut out = vec![
                (names::RESIDUAL, (*init.weight).clone()),
                (
                    names::DELTA,
                    delta_weight(&init.lora_a, &init.lora_b, init.scaling),
                ),
            ];
            if let Some(m) = init.magnitude {
                out.push((names::MAGNITUDE, m));
            }
            return (out, k);
        }
        // The layer as its init leaves it, against the base layer alone (no adapter): equal in
        // exact arithmetic, except where DoRA divides 0 by 0 (a zero row).
        Op::InitNoop => {
            let (init, _) = initialised(adapter, inp);
            let c = row_factor(&init);
            vec![
                (names::RESULT, forward(&init, &pieces(&init), c.as_deref())),
                (names::BASE_RESULT, base_layer(inp, &inp.weight)),
            ]
        }
        // The unmerged layer's forward and the merged layer's (W' alone): equal in exact arithmetic.
        Op::Parity => {
            let c = row_factor(inp);
            let merged = merge_pass(inp, Pass::Merged).0;
            let merged_y = match merged_bias(inp) {
                Some(b) => add_bias(matmul_nt(&inp.x, &merged), Some(&b)),
                None => base_layer(inp, &merged),
            };
            vec![
                (names::RESULT, forward(inp, &pieces(inp), c.as_deref())),
                (names::MERGED_RESULT, merged_y),
            ]
        }
        // Merge then unmerge gives back the original weight, exactly, in f64's terms.
        Op::Roundtrip => {
            let k = merge_pass(inp, Pass::Kappa).1;
            let mut out = vec![(names::UNMERGED, (*inp.weight).clone())];
            out.extend(restored_bias(inp));
            return (out, k);
        }
        Op::Step => step(inp),
        // DoRA init computes the magnitude m = ||W + s B A|| (PEFT's `update_layer`); LoRA
        // init computes nothing, so its check is that the layer is a no-op at init (B = 0).
        Op::Init if dora => vec![(
            names::MAGNITUDE,
            weight_norm(&inp.weight, &inp.lora_a, &inp.lora_b, inp.scaling),
        )],
        Op::Init => vec![(names::RESULT, forward(inp, &pieces(inp), None))],
        Op::Forward => {
            let p = pieces(inp);
            let c = row_factor(inp);
            vec![(names::RESULT, forward(inp, &p, c.as_deref()))]
        }
        Op::Backward => backward(inp),
        Op::Merge => {
            let mut out = vec![(names::MERGED, merge_pass(inp, Pass::Merged).0)];
            out.extend(merged_bias(inp).map(|b| (names::MERGED_BIAS, b)));
            out
        }
        Op::Unmerge => {
            let (unmerged, k) = merge_pass(inp, Pass::Unmerged);
            let mut out = vec![(names::UNMERGED, unmerged)];
            out.extend(restored_bias(inp));
            return (out, k);
        }
    };
    (outputs, 1.0)
}

/// The bias an unmerge restores with `lora_bias`: (b + s lb) - s lb = b.
fn restored_bias(inp: &Inputs) -> Option<(&'static str, HostTensor)> {
    inp.lora_bias.as_ref()?;
    inp.bias.clone().map(|b| (names::UNMERGED_BIAS, b))
}

/// One SGD step from the gradients of [`backward`]: p - lr * grad for A, B, the magnitude
/// (DoRA) and lora_B's bias.
fn step(inp: &Inputs) -> Outputs {
    let grads = backward(inp);
    let grad = |name: &str| {
        &grads
            .iter()
            .find(|(n, _)| *n == name)
            .expect("backward gives every parameter's gradient")
            .1
    };
    let lr = inp.lr;
    let mut out = vec![
        (names::STEP_A, axpy(&inp.lora_a, -lr, grad(names::GRAD_A))),
        (names::STEP_B, axpy(&inp.lora_b, -lr, grad(names::GRAD_B))),
    ];
    if let Some(m) = &inp.magnitude {
        out.push((names::MAGNITUDE, axpy(m, -lr, grad(names::GRAD_M))));
    }
    if let Some(b) = &inp.lora_bias {
        out.push((
            names::STEP_LORA_BIAS,
            axpy(b, -lr, grad(names::GRAD_LORA_BIAS)),
        ));
    }
    out
}

/// DoRA's row factor c = m / ||W + dW||, or `None` for LoRA.
fn row_factor(inp: &Inputs) -> Option<Vec<f64>> {
    inp.magnitude.as_ref().map(|m| {
        let n = weight_norm(&inp.weight, &inp.lora_a, &inp.lora_b, inp.scaling);
        m.data.iter().zip(&n.data).map(|(m, n)| m / n).collect()
    })
}

/// The largest |value| of a slice (NaN ignored, as [`HostTensor::max_abs`] does).
fn max_abs(v: &[f64]) -> f64 {
    v.iter().fold(0.0, |m, v| m.max(v.abs()))
}

/// What a pass over the rows of W + dW writes.
#[derive(Clone, Copy, PartialEq)]
enum Pass {
    /// Nothing: the merge's kappa alone.
    Kappa,
    /// The merged weight W' = W + dW (LoRA) or (m / ||W + dW||) * (W + dW) row-wise (DoRA).
    Merged,
    /// Unmerge's W = W' / c - dW (W' - dW for LoRA), from that W'.
    Unmerged,
}

/// One pass over the rows of W + dW: what `pass` writes (an empty tensor for `Kappa`) and
/// the unmerge conditioning kappa of the merge.
fn merge_pass(inp: &Inputs, pass: Pass) -> (HostTensor, f64) {
    let c = row_factor(inp);
    let (rows, cols) = (inp.weight.rows(), inp.weight.cols());
    let per_row = if pass == Pass::Kappa { 0 } else { cols };
    let mut out = vec![0.0; rows * per_row];
    let maxes = sum_rows(
        &inp.weight,
        &inp.lora_a,
        &inp.lora_b,
        inp.scaling,
        &mut out,
        per_row,
        |blk, out| {
            let mut merged_max: f64 = 0.0;
            for (k, &v) in blk.sum.iter().enumerate() {
                let ci = c.as_ref().map(|c| c[blk.first + k / cols]);
                let m = ci.map_or(v, |ci| ci * v);
                merged_max = merged_max.max(m.abs());
                match pass {
                    Pass::Merged => out[k] = m,
                    Pass::Unmerged => out[k] = ci.map_or(m, |ci| m / ci) - blk.dw[k],
                    Pass::Kappa => {}
                }
            }
            (max_abs(blk.w), max_abs(blk.sum).max(merged_max))
        },
    );
    let (w, sm) = maxes
        .iter()
        .fold((0.0f64, 0.0f64), |(a, b), (x, y)| (a.max(*x), b.max(*y)));
    let shape = if per_row == 0 {
        vec![0]
    } else {
        vec![rows, cols]
    };
    (HostTensor::new(shape, out), kappa(w, sm))
}

/// Gradients of sum(y * g) with the DoRA norm held constant (detached), by hand:
/// with gc = g * c (c = 1 for LoRA), h = x A^T:
/// dB = s gc^T h, dh = s gc B, dA = dh^T x, dx = gc W + dh A,
/// dm_j = sum_i g_ij (x W^T + s h B^T)_ij / n_j.
fn backward(inp: &Inputs) -> Outputs {
    let p = pieces(inp);
    let g = &inp.grad_output;
    let c = row_factor(inp);
    let y = forward(inp, &p, c.as_deref());
    let gc = match &c {
        Some(c) => scale_cols(g, c),
        None => g.clone(),
    };
    let s = inp.scaling;
    let grad_b = map_rows(&matmul_tn(&gc, &p.h), |_, v| s * v);
    let dh = map_rows(&matmul(&gc, &inp.lora_b), |_, v| s * v);
    let grad_a = matmul_tn(&dh, &inp.x);
    let grad_x = axpy(&matmul(&gc, &inp.weight), 1.0, &matmul(&dh, &inp.lora_a));
    let mut out = vec![(names::RESULT, y)];
    out.push((names::GRAD_A, grad_a));
    out.push((names::GRAD_B, grad_b));
    if let Some(m) = &inp.magnitude {
        let n = weight_norm(&inp.weight, &inp.lora_a, &inp.lora_b, inp.scaling);
        let pre = axpy(&p.base, s, &p.lora);
        let (rows, cols) = (pre.rows(), pre.cols());
        let dm = (0..cols)
            .map(|j| {
                (0..rows)
                    .map(|i| g.data[i * cols + j] * pre.data[i * cols + j])
                    .sum::<f64>()
                    / n.data[j]
            })
            .collect();
        out.push((names::GRAD_M, HostTensor::new(m.shape.clone(), dm)));
    }
    if let Some(lb) = &inp.lora_bias {
        // y carries s * lb in every row: d/d lb = s * the column sums of g.
        let (rows, cols) = (g.rows(), g.cols());
        let db = (0..cols)
            .map(|j| s * (0..rows).map(|i| g.data[i * cols + j]).sum::<f64>())
            .collect();
        out.push((names::GRAD_LORA_BIAS, HostTensor::new(lb.shape.clone(), db)));
    }
    out.push((names::GRAD_X, grad_x));
    out
}

#[cfg(test)]
mod tests {
    use super::*;

    fn t(shape: &[usize], d: &[f64]) -> HostTensor {
        HostTensor::new(shape.to_vec(), d.to_vec())
    }

    /// A 2x3 DoRA layer checked on paper.
    /// W = [[1,2,2],[0,3,4]], A = [[1,0,0]] (r=1), B = [[1],[0]], s = 2.
    /// dW = s B A = [[2,0,0],[0,0,0]]; W + dW = [[3,2,2],[0,3,4]]; norms = [sqrt(17), 5].
    /// m = [sqrt(17), 10] -> c = [1, 2]. x = [[1,1,1]].
    /// x (W+dW)^T = [7, 7]; y = c * that + b = [7, 14] + [0.5, -1] = [7.5, 13].
    fn paper() -> Inputs {
        Inputs {
            layer: Layer::Linear,
            x: t(&[1, 3], &[1.0, 1.0, 1.0]),
            weight: t(&[2, 3], &[1.0, 2.0, 2.0, 0.0, 3.0, 4.0]).into(),
            bias: Some(t(&[2], &[0.5, -1.0])),
            lora_a: t(&[1, 3], &[1.0, 0.0, 0.0]),
            lora_b: t(&[2, 1], &[1.0, 0.0]),
            magnitude: Some(t(&[2], &[17f64.sqrt(), 10.0])),
            grad_output: t(&[1, 2], &[1.0, 1.0]),
            scaling: 2.0,
            lora_bias: None,
            lr: crate::case::STEP_LR,
        }
    }

    fn get<'a>(o: &'a Outputs, name: &str) -> &'a [f64] {
        &o.iter().find(|(n, _)| *n == name).unwrap().1.data
    }

    fn close(a: &[f64], b: &[f64]) {
        assert_eq!(a.len(), b.len());
        for (x, y) in a.iter().zip(b) {
            assert!((x - y).abs() < 1e-12, "{a:?} vs {b:?}");
        }
    }

    #[test]
    fn dora_by_hand() {
        let inp = paper();
        let norm = weight_norm(&inp.weight, &inp.lora_a, &inp.lora_b, 2.0);
        close(&norm.data, &[17f64.sqrt(), 5.0]);
        let f = compute(Adapter::Dora, Op::Forward, &inp);
        close(get(&f, names::RESULT), &[7.5, 13.0]);
        // merged = c * (W + dW) = [[3,2,2],[0,6,8]]
        let m = compute(Adapter::Dora, Op::Merge, &inp);
        close(get(&m, names::MERGED), &[3.0, 2.0, 2.0, 0.0, 6.0, 8.0]);
        let u = compute(Adapter::Dora, Op::Unmerge, &inp);
        close(get(&u, names::UNMERGED), &inp.weight.data);
        // init with B = 0: m = ||W|| = [3, 5]; LoRA at init is the base layer, x W^T + b = [5.5, 6]
        let mut init = paper();
        init.lora_b = t(&[2, 1], &[0.0, 0.0]);
        let i = compute(Adapter::Dora, Op::Init, &init);
        close(get(&i, names::MAGNITUDE), &[3.0, 5.0]);
        close(
            get(&compute(Adapter::Lora, Op::Init, &init), names::RESULT),
            &[5.5, 6.0],
        );
    }

    /// One SGD step at lr 0.5 from the gradients of `dora_backward_by_hand`: p - lr * grad.
    #[test]
    fn step_by_hand() {
        let inp = Inputs { lr: 0.5, ..paper() };
        let o = compute(Adapter::Dora, Op::Step, &inp);
        close(get(&o, names::STEP_A), &[0.0, -1.0, -1.0]);
        close(get(&o, names::STEP_B), &[0.0, -2.0]);
        close(
            get(&o, names::MAGNITUDE),
            &[17f64.sqrt() - 3.5 / 17f64.sqrt(), 10.0 - 0.7],
        );
        // LoRA: dA and dB as in `lora_by_hand` ([2, 2, 2] and [2, 2]); no magnitude.
        let mut lora = inp.clone();
        lora.magnitude = None;
        let o = compute(Adapter::Lora, Op::Step, &lora);
        close(get(&o, names::STEP_A), &[0.0, -1.0, -1.0]);
        close(get(&o, names::STEP_B), &[0.0, -1.0]);
        assert!(o.iter().all(|(n, _)| *n != names::MAGNITUDE));
    }

    /// lora_B's bias lb = [1, -2] with s = 2 on `paper`'s LoRA: y gains s * lb, a merge moves
    /// the base bias by s * lb (PEFT >= 0.16), an unmerge moves it back, and its gradient is
    /// s * the column sums of g.
    #[test]
    fn lora_bias_by_hand() {
        let mut inp = paper();
        inp.magnitude = None;
        inp.lora_bias = Some(t(&[2], &[1.0, -2.0]));
        inp.lr = 0.5;
        // [7.5, 6] (lora_by_hand) + 2 * [1, -2]
        let y = compute(Adapter::Lora, Op::Forward, &inp);
        close(get(&y, names::RESULT), &[9.5, 2.0]);
        let m = compute(Adapter::Lora, Op::Merge, &inp);
        close(get(&m, names::MERGED), &[3.0, 2.0, 2.0, 0.0, 3.0, 4.0]);
        close(get(&m, names::MERGED_BIAS), &[2.5, -5.0]);
        // The merged layer: x W'^T + b' = [7, 7] + [2.5, -5], the unmerged forward exactly.
        let p = compute(Adapter::Lora, Op::Parity, &inp);
        close(get(&p, names::MERGED_RESULT), &[9.5, 2.0]);
        close(get(&p, names::RESULT), &[9.5, 2.0]);
        let u = compute(Adapter::Lora, Op::Unmerge, &inp);
        close(get(&u, names::UNMERGED_BIAS), &[0.5, -1.0]);
        let b = compute(Adapter::Lora, Op::Backward, &inp);
        close(get(&b, names::GRAD_LORA_BIAS), &[2.0, 2.0]);
        let st = compute(Adapter::Lora, Op::Step, &inp);
        close(get(&st, names::STEP_LORA_BIAS), &[0.0, -3.0]);
    }

    /// A grouped 1x1 Conv2d (2 channels, groups 2: out channel j sees input channel j only)
    /// on a 1x1 image x = [1, 2], W = [3, 4]; PEFT's adapter: a full lora_A
    /// [[1, 1], [0, 1]] and a grouped lora_B [5, 7] (out channel j reads rank channel j).
    /// The full convolution's weights: W = diag(3, 4), dW = diag(5, 7) A = [[5, 5], [0, 7]].
    #[test]
    fn grouped_conv2d_by_hand() {
        let inp = Inputs {
            layer: Layer::Conv2d,
            x: t(&[1, 2, 1, 1], &[1.0, 2.0]),
            weight: t(&[2, 1, 1, 1], &[3.0, 4.0]).into(),
            bias: None,
            lora_a: t(&[2, 2, 1, 1], &[1.0, 1.0, 0.0, 1.0]),
            lora_b: t(&[2, 1, 1, 1], &[5.0, 7.0]),
            magnitude: None,
            grad_output: t(&[1, 2, 1, 1], &[1.0, 1.0]),
            scaling: 1.0,
            lora_bias: None,
            lr: 0.5,
        };
        // base [3, 8]; h = A x = [3, 2]; branch [5 * 3, 7 * 2]
        let f = compute(Adapter::Lora, Op::Forward, &inp);
        close(get(&f, names::RESULT), &[18.0, 22.0]);
        // dB (dense) = g^T h = [[3, 2], [3, 2]]; each row keeps its own group's entry.
        let b = compute(Adapter::Lora, Op::Backward, &inp);
        let gb = b.iter().find(|(n, _)| *n == names::GRAD_B).unwrap();
        assert_eq!(gb.1.shape, vec![2, 1, 1, 1]);
        close(&gb.1.data, &[3.0, 2.0]);
        // dA = (B dense)^T g = [[5], [7]] x^T: [[5, 10], [7, 14]]
        close(get(&b, names::GRAD_A), &[5.0, 10.0, 7.0, 14.0]);
        // DoRA's norm runs over the full convolution's rows: W + dW = [[8, 5], [0, 11]].
        let n = layer_weight_norm(Layer::Conv2d, &inp.weight, &inp.lora_a, &inp.lora_b, 1.0);
        close(&n.data, &[89f64.sqrt(), 11.0]);
        // m = [2 sqrt(89), 11]: c = [2, 1], y = c * (x (W + dW)^T) = [2 * 18, 22]
        let dora = Inputs {
            magnitude: Some(t(&[2], &[2.0 * 89f64.sqrt(), 11.0])),
            ..inp.clone()
        };
        close(
            get(&compute(Adapter::Dora, Op::Forward, &dora), names::RESULT),
            &[36.0, 22.0],
        );
        let st = compute(Adapter::Lora, Op::Step, &inp);
        let sb = st.iter().find(|(n, _)| *n == names::STEP_B).unwrap();
        assert_eq!(sb.1.shape, vec![2, 1, 1, 1]);
        close(&sb.1.data, &[5.0 - 1.5, 7.0 - 1.0]);
    }

    #[test]
    fn dora_backward_by_hand() {
        // g = [1, 1], c = [1, 2], h = x A^T = [1].
        // dB = s * gc^T h = 2 * [1, 2] = [[2],[4]]; dh = s * gc B = 2 * (1*1 + 2*0) = [2]
        // dA = dh^T x = [[2,2,2]]; dx = gc W + dh A = [1,2,2] + 2*[0,3,4] + [2,0,0] = [3,8,10]
        // dm = (x (W+dW)^T) / n = [7/sqrt(17), 7/5]
        let o = compute(Adapter::Dora, Op::Backward, &paper());
        close(get(&o, names::GRAD_B), &[2.0, 4.0]);
        close(get(&o, names::GRAD_A), &[2.0, 2.0, 2.0]);
        close(get(&o, names::GRAD_X), &[3.0, 8.0, 10.0]);
        close(get(&o, names::GRAD_M), &[7.0 / 17f64.sqrt(), 1.4]);
    }

    #[test]
    fn lora_by_hand() {
        let mut inp = paper();
        inp.magnitude = None;
        // y = x W^T + b + s (x A^T) B^T = [5, 7] + [0.5, -1] + 2 * [1, 0] = [7.5, 6]
        close(
            get(&compute(Adapter::Lora, Op::Forward, &inp), names::RESULT),
            &[7.5, 6.0],
        );
        close(
            get(&compute(Adapter::Lora, Op::Merge, &inp), names::MERGED),
            &[3.0, 2.0, 2.0, 0.0, 3.0, 4.0],
        );
        // dB = s g^T h = [[2],[2]]; dh = s g B = [2]; dA = [[2,2,2]]; dx = g W + dh A = [3,5,6]
        let o = compute(Adapter::Lora, Op::Backward, &inp);
        close(get(&o, names::GRAD_B), &[2.0, 2.0]);
        close(get(&o, names::GRAD_A), &[2.0, 2.0, 2.0]);
        close(get(&o, names::GRAD_X), &[3.0, 5.0, 6.0]);
    }

    fn linear(w: &[usize], wd: &[f64], x: &[usize], xd: &[f64], r: usize, s: f64) -> Inputs {
        Inputs {
            layer: Layer::Linear,
            x: t(x, xd),
            weight: t(w, wd).into(),
            bias: None,
            lora_a: HostTensor::zeros(vec![r, w[1]]),
            lora_b: HostTensor::zeros(vec![w[0], r]),
            magnitude: None,
            grad_output: HostTensor::zeros(vec![x[0], w[0]]),
            scaling: s,
            lora_bias: None,
            lr: crate::case::STEP_LR,
        }
    }

    /// W = [[3,0,0],[0,1,0]]: singular values 3 and 1, U = I, Vh = the first two unit rows.
    /// Rank 1, s = 2: A = sqrt(3/2) e1, B = sqrt(3/2) e1, s B A = [[3,0,0],[0,0,0]], so the
    /// residual is [[0,0,0],[0,1,0]]; PiSSA+DoRA's magnitude is ||W|| = [3, 1]; the SVD's
    /// conditioning is 3 / (3 - 1).
    #[test]
    fn pissa_by_hand() {
        let inp = linear(
            &[2, 3],
            &[3.0, 0.0, 0.0, 0.0, 1.0, 0.0],
            &[1, 3],
            &[1.0, 1.0, 1.0],
            1,
            2.0,
        );
        let (o, kappa) = compute_with_conditioning(Adapter::Pissa, Op::Init, &inp);
        close(get(&o, names::RESIDUAL), &[0.0, 0.0, 0.0, 0.0, 1.0, 0.0]);
        close(get(&o, names::DELTA), &[3.0, 0.0, 0.0, 0.0, 0.0, 0.0]);
        assert!((kappa - 1.5).abs() < 1e-12);
        let o = compute(Adapter::PissaDora, Op::Init, &inp);
        close(get(&o, names::MAGNITUDE), &[3.0, 1.0]);
        // At init the layer still computes x W^T = [3, 1].
        let o = compute(Adapter::Pissa, Op::InitNoop, &inp);
        close(get(&o, names::RESULT), &[3.0, 1.0]);
        close(get(&o, names::BASE_RESULT), &[3.0, 1.0]);
    }

    /// W = [[2,1],[0,3]] is already R (Q = I, up to signs that cancel in B A). Rank 1, s = 2:
    /// A = [2, 1], B = [1, 0]^T, s B A = [[4,2],[0,0]], residual [[-2,-1],[0,3]].
    #[test]
    fn olora_by_hand() {
        let inp = linear(&[2, 2], &[2.0, 1.0, 0.0, 3.0], &[1, 2], &[1.0, 0.0], 1, 2.0);
        let (o, kappa) = compute_with_conditioning(Adapter::Olora, Op::Init, &inp);
        close(get(&o, names::DELTA), &[4.0, 2.0, 0.0, 0.0]);
        close(get(&o, names::RESIDUAL), &[-2.0, -1.0, 0.0, 3.0]);
        assert_eq!(kappa, 1.0);
    }

    /// The LLM route of PiSSA and OLoRA (faer's SVD; QR of the first r columns) gives what
    /// nalgebra's full SVD and QR give: s B A and the residual to f64's precision, and PiSSA's
    /// kappa.
    #[test]
    fn llm_init_route_agrees_with_the_full_decompositions() {
        let (o, i, r) = (48, 96, 6);
        let mut state = 12345u64;
        let mut next = || {
            state = state
                .wrapping_mul(6364136223846793005)
                .wrapping_add(1442695040888963407);
            (state >> 11) as f64 / (1u64 << 53) as f64 - 0.5
        };
        let wd: Vec<f64> = (0..o * i).map(|_| next()).collect();
        let inp = linear(&[o, i], &wd, &[1, i], &vec![1.0; i], r, 2.0);
        for adapter in [Adapter::Pissa, Adapter::Olora] {
            let (a1, b1, w1, k1) = data_init_by(adapter, &inp, r, false);
            let (a2, b2, w2, k2) = data_init_by(adapter, &inp, r, true);
            let d1 = delta_weight(&a1, &b1, 2.0);
            let d2 = delta_weight(&a2, &b2, 2.0);
            let err = |x: &HostTensor, y: &HostTensor| {
                x.data
                    .iter()
                    .zip(&y.data)
                    .map(|(p, q)| (p - q).abs())
                    .fold(0.0, f64::max)
            };
            assert!(err(&d1, &d2) < 1e-12, "{adapter}: {}", err(&d1, &d2));
            assert!(err(&w1, &w2) < 1e-12, "{adapter}: {}", err(&w1, &w2));
            assert!((k1 - k2).abs() < 1e-9 * k1, "{adapter}: {k1} {k2}");
        }
    }

    /// An Embedding of 3 tokens in 2 dimensions, ids [2, 0], r = 1, s = 1.
    /// W = [[1,2],[3,4],[5,6]], A (lora_embedding_A) = [[1,0,1]], B = [[1],[0]].
    /// LoRA: W[ids] = [[5,6],[1,2]], A^T[ids] B^T = [[1,0],[1,0]], y = [[6,6],[2,2]].
    /// DoRA's norm runs per embedding dimension over W^T + B A = [[2,3,6],[2,4,6]]: [7, sqrt(56)];
    /// m = [14, sqrt(56)] gives c = [2, 1] and y = c * [[6,6],[2,2]] = [[12,6],[4,2]];
    /// merged: c (as a row) * (W + (B A)^T) = [[2,2],[3,4],[6,6]] * [2, 1] = [[4,2],[6,4],[12,6]].
    #[test]
    fn embedding_by_hand() {
        let inp = Inputs {
            layer: Layer::Embedding,
            x: t(&[2], &[2.0, 0.0]),
            weight: t(&[3, 2], &[1.0, 2.0, 3.0, 4.0, 5.0, 6.0]).into(),
            bias: None,
            lora_a: t(&[1, 3], &[1.0, 0.0, 1.0]),
            lora_b: t(&[2, 1], &[1.0, 0.0]),
            magnitude: None,
            grad_output: t(&[2, 2], &[1.0, 1.0, 1.0, 1.0]),
            scaling: 1.0,
            lora_bias: None,
            lr: crate::case::STEP_LR,
        };
        close(
            get(&compute(Adapter::Lora, Op::Forward, &inp), names::RESULT),
            &[6.0, 6.0, 2.0, 2.0],
        );
        let norm = layer_weight_norm(Layer::Embedding, &inp.weight, &inp.lora_a, &inp.lora_b, 1.0);
        close(&norm.data, &[7.0, 56f64.sqrt()]);
        let dora = Inputs {
            magnitude: Some(t(&[2], &[14.0, 56f64.sqrt()])),
            ..inp.clone()
        };
        close(
            get(&compute(Adapter::Dora, Op::Forward, &dora), names::RESULT),
            &[12.0, 6.0, 4.0, 2.0],
        );
        close(
            get(&compute(Adapter::Dora, Op::Merge, &dora), names::MERGED),
            &[4.0, 2.0, 6.0, 4.0, 12.0, 6.0],
        );
        close(
            get(
                &compute(Adapter::Dora, Op::Roundtrip, &dora),
                names::UNMERGED,
            ),
            &inp.weight.data,
        );
        // No gradient reaches token ids.
        let b = compute(Adapter::Lora, Op::Backward, &inp);
        assert!(b.iter().all(|(n, _)| *n != names::GRAD_X));
        // A is [1, 3] as given: dA = s * (g B)^T scattered to the ids' columns = [[1, 0, 1]].
        close(get(&b, names::GRAD_A), &[1.0, 0.0, 1.0]);
    }

    /// A Conv2d with one 2x2 kernel on one 2x2 image (one output position), r = 1, s = 1.
    /// x = [[1,2],[3,4]], W = [[1,0],[0,1]], b = 0.5: conv = 1 + 4 = 5, base = 5.5.
    /// A = [[0,1],[0,0]] -> conv(x, A) = 2; B = 3 -> branch 6; LoRA y = 11.5.
    /// DoRA's norm over the channel's kernel W + B A = [[1,3],[0,1]]: sqrt(11); m = 2 sqrt(11)
    /// gives c = 2 and y = 2 * (5 + 6) + 0.5 = 22.5. dy/dx for g = 1 (LoRA) is the merged
    /// kernel [[1,3],[0,1]].
    #[test]
    fn conv2d_by_hand() {
        let inp = Inputs {
            layer: Layer::Conv2d,
            x: t(&[1, 1, 2, 2], &[1.0, 2.0, 3.0, 4.0]),
            weight: t(&[1, 1, 2, 2], &[1.0, 0.0, 0.0, 1.0]).into(),
            bias: Some(t(&[1], &[0.5])),
            lora_a: t(&[1, 1, 2, 2], &[0.0, 1.0, 0.0, 0.0]),
            lora_b: t(&[1, 1, 1, 1], &[3.0]),
            magnitude: None,
            grad_output: t(&[1, 1, 1, 1], &[1.0]),
            scaling: 1.0,
            lora_bias: None,
            lr: crate::case::STEP_LR,
        };
        let f = compute(Adapter::Lora, Op::Forward, &inp);
        assert_eq!(f[0].1.shape, vec![1, 1, 1, 1]);
        close(get(&f, names::RESULT), &[11.5]);
        let b = compute(Adapter::Lora, Op::Backward, &inp);
        close(get(&b, names::GRAD_X), &[1.0, 3.0, 0.0, 1.0]);
        assert_eq!(
            b.iter().find(|(n, _)| *n == names::GRAD_A).unwrap().1.shape,
            vec![1, 1, 2, 2]
        );
        let dora = Inputs {
            magnitude: Some(t(&[1], &[2.0 * 11f64.sqrt()])),
            ..inp.clone()
        };
        close(
            get(&compute(Adapter::Dora, Op::Forward, &dora), names::RESULT),
            &[22.5],
        );
        // merged kernel = c * (W + B A) = 2 * [[1,3],[0,1]]
        let m = compute(Adapter::Dora, Op::Merge, &dora);
        assert_eq!(m[0].1.shape, vec![1, 1, 2, 2]);
        close(get(&m, names::MERGED), &[2.0, 6.0, 0.0, 2.0]);
    }

    /// init_noop: the adapted layer at init equals the base layer (B = 0), except that DoRA
    /// divides 0 by 0 on an all-zero row (PEFT #2049). parity: merged and unmerged forward
    /// agree; roundtrip: the original weight.
    #[test]
    fn self_checks_by_hand() {
        let mut inp = paper();
        inp.lora_b = t(&[2, 1], &[0.0, 0.0]);
        inp.magnitude = None;
        for adapter in [Adapter::Lora, Adapter::Dora] {
            let o = compute(adapter, Op::InitNoop, &inp);
            close(get(&o, names::RESULT), &[5.5, 6.0]);
            close(get(&o, names::BASE_RESULT), &[5.5, 6.0]);
        }
        let mut zero = inp.clone();
        zero.weight = t(&[2, 3], &[0.0, 0.0, 0.0, 0.0, 3.0, 4.0]).into();
        let o = compute(Adapter::Dora, Op::InitNoop, &zero);
        let r = get(&o, names::RESULT);
        assert!(r[0].is_nan() && r[1] == 6.0, "{r:?}");
        let o = compute(Adapter::Dora, Op::Parity, &paper());
        close(get(&o, names::RESULT), &[7.5, 13.0]);
        close(get(&o, names::MERGED_RESULT), &[7.5, 13.0]);
        let (o, kappa) = compute_with_conditioning(Adapter::Dora, Op::Roundtrip, &paper());
        close(get(&o, names::UNMERGED), &paper().weight.data);
        // max(|W + dW|, |W'|) / max|W| = 8 / 4
        assert_eq!(kappa, 2.0);
    }
}
