//! The f64 reference: PEFT's LoRA/DoRA formulas in plain Rust on the host.
//!
//! Written separately from `adapter/` on purpose (no tensor trait, no shared helpers), so that a
//! mistake in the shared math cannot hide in both the backends and the yardstick. It takes the
//! already rounded case inputs, so its distance to a backend's output is that backend's error.

use crate::case::{Adapter, Op};
use crate::inputs::{names, HostTensor, Inputs, Outputs};

/// `a @ b^T` for a: [n, k], b: [m, k] -> [n, m].
fn matmul_nt(a: &HostTensor, b: &HostTensor) -> HostTensor {
    let (n, k, m) = (a.rows(), a.cols(), b.rows());
    assert_eq!(k, b.cols());
    let mut out = vec![0.0; n * m];
    for i in 0..n {
        for j in 0..m {
            let mut acc = 0.0;
            for t in 0..k {
                acc += a.data[i * k + t] * b.data[j * k + t];
            }
            out[i * m + j] = acc;
        }
    }
    HostTensor::new(vec![n, m], out)
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
    let ba = matmul_nt(b, &transpose(a));
    map_rows(&ba, |_, v| scaling * v)
}

/// DoRA's weight norm ||W + s B A||_2 per output row: [out].
pub fn weight_norm(w: &HostTensor, a: &HostTensor, b: &HostTensor, scaling: f64) -> HostTensor {
    let merged = axpy(w, 1.0, &delta_weight(a, b, scaling));
    row_norms(&merged)
}

fn row_norms(m: &HostTensor) -> HostTensor {
    let cols = m.cols();
    HostTensor::new(
        vec![m.rows()],
        m.data
            .chunks(cols)
            .map(|r| r.iter().map(|v| v * v).sum::<f64>().sqrt())
            .collect(),
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

/// DoRA's per-row factor m / ||W + s B A||.
fn dora_factor(inp: &Inputs, m: &HostTensor) -> Vec<f64> {
    let n = weight_norm(&inp.weight, &inp.lora_a, &inp.lora_b, inp.scaling);
    m.data.iter().zip(&n.data).map(|(m, n)| m / n).collect()
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
    add_bias(pre, inp.bias.as_ref())
}

/// The reference outputs of one case, under the same names the backends use.
pub fn compute(adapter: Adapter, op: Op, inp: &Inputs) -> Outputs {
    let dora = adapter == Adapter::Dora;
    match op {
        // DoRA init computes the magnitude m = ||W + s B A|| (PEFT's `update_layer`); LoRA
        // init computes nothing, so its check is that the layer is a no-op at init (B = 0).
        Op::Init if dora => vec![(
            names::MAGNITUDE,
            weight_norm(&inp.weight, &inp.lora_a, &inp.lora_b, inp.scaling),
        )],
        Op::Init => vec![(names::RESULT, forward(inp, &pieces(inp), None))],
        Op::Forward => {
            let p = pieces(inp);
            let c = inp.magnitude.as_ref().map(|m| dora_factor(inp, m));
            vec![(names::RESULT, forward(inp, &p, c.as_deref()))]
        }
        Op::Backward => backward(inp),
        Op::Merge => vec![(names::MERGED, merge(inp).0)],
        Op::Unmerge => {
            let (merged, c) = merge(inp);
            let dw = delta_weight(&inp.lora_a, &inp.lora_b, inp.scaling);
            let unscaled = match c {
                Some(c) => map_rows(&merged, |i, v| v / c[i]),
                None => merged,
            };
            vec![(names::UNMERGED, axpy(&unscaled, -1.0, &dw))]
        }
    }
}

/// How much unmerge's cancellation amplifies rounding: unmerge returns W through W + dW (and,
/// for DoRA, W' = c (W + dW)), so a rounding of those costs max|W + dW| / max|W| times more,
/// relative to W, than a rounding of W itself. 1 for every other op.
pub fn conditioning(op: Op, inp: &Inputs) -> f64 {
    if op != Op::Unmerge {
        return 1.0;
    }
    let dw = delta_weight(&inp.lora_a, &inp.lora_b, inp.scaling);
    let sum = axpy(&inp.weight, 1.0, &dw);
    let merged = merge(inp).0;
    let w = inp.weight.max_abs();
    if w == 0.0 {
        return 1.0;
    }
    (sum.max_abs().max(merged.max_abs()) / w).max(1.0)
}

/// W' = W + dW (LoRA) or (m / ||W + dW||) * (W + dW) row-wise (DoRA); returns the factor too.
fn merge(inp: &Inputs) -> (HostTensor, Option<Vec<f64>>) {
    let dw = delta_weight(&inp.lora_a, &inp.lora_b, inp.scaling);
    let sum = axpy(&inp.weight, 1.0, &dw);
    match &inp.magnitude {
        Some(m) => {
            let c = dora_factor(inp, m);
            (map_rows(&sum, |i, v| c[i] * v), Some(c))
        }
        None => (sum, None),
    }
}

/// Gradients of sum(y * g) with the DoRA norm held constant (detached), by hand:
/// with gc = g * c (c = 1 for LoRA), h = x A^T:
/// dB = s gc^T h, dh = s gc B, dA = dh^T x, dx = gc W + dh A,
/// dm_j = sum_i g_ij (x W^T + s h B^T)_ij / n_j.
fn backward(inp: &Inputs) -> Outputs {
    let p = pieces(inp);
    let g = &inp.grad_output;
    let c = inp.magnitude.as_ref().map(|m| dora_factor(inp, m));
    let y = forward(inp, &p, c.as_deref());
    let gc = match &c {
        Some(c) => scale_cols(g, c),
        None => g.clone(),
    };
    let gct = transpose(&gc);
    let s = inp.scaling;
    let grad_b = map_rows(&matmul_nt(&gct, &transpose(&p.h)), |_, v| s * v);
    let dh = map_rows(&matmul_nt(&gc, &transpose(&inp.lora_b)), |_, v| s * v);
    let grad_a = matmul_nt(&transpose(&dh), &transpose(&inp.x));
    let grad_x = axpy(
        &matmul_nt(&gc, &transpose(&inp.weight)),
        1.0,
        &matmul_nt(&dh, &transpose(&inp.lora_a)),
    );
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
            x: t(&[1, 3], &[1.0, 1.0, 1.0]),
            weight: t(&[2, 3], &[1.0, 2.0, 2.0, 0.0, 3.0, 4.0]),
            bias: Some(t(&[2], &[0.5, -1.0])),
            lora_a: t(&[1, 3], &[1.0, 0.0, 0.0]),
            lora_b: t(&[2, 1], &[1.0, 0.0]),
            magnitude: Some(t(&[2], &[17f64.sqrt(), 10.0])),
            grad_output: t(&[1, 2], &[1.0, 1.0]),
            scaling: 2.0,
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
}
