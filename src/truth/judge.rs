//! How far a backend's outputs are from the f64 reference, what tolerance applies, and the verdict.
//!
//! # The tolerance model
//! Each output tensor is judged by its error relative to its own scale,
//! `e = max|y - ref| / max|ref|` (`max_rel_err`), so that a tensor of gradients of size 1e-3 and a
//! result of size 10 are judged alike. The tolerance is
//!
//! `tol = C(op) * kappa * factor * (u + sqrt(K) * u_acc)`
//!
//! - `u`: the case dtype's unit roundoff (2^-11 f16, 2^-8 bf16, 2^-24 f32, 2^-53 f64): the
//!   rounding every stored result pays at least once.
//! - `K`: the longest reduction in the case (the largest of batch, in, out and rank): good kernels
//!   accumulate in f32 (f64 for f64), and a K-long sum costs about `sqrt(K) * u_acc`.
//! - `u_acc`: 2^-24 for f16, bf16 and f32 (f32 accumulation), 2^-53 for f64. For 16-bit outputs
//!   the term is negligible; for f32 outputs it is what lets a 4096-long dot product pass.
//! - `C(op)`: the number of roundings an op chain is allowed, with margin: [`chain_constant`].
//! - `kappa`: the op's conditioning, 1 except for `unmerge` and `roundtrip`, which recover W by
//!   cancellation from W + dW: kappa = max(|W + dW|, |W'|) / max|W| from the reference
//!   ([`crate::truth::reference::conditioning`]); and PiSSA's init, whose rank-r truncated SVD moves by
//!   sigma_1 / (sigma_r - sigma_{r+1}) roundings per rounding of W (Wedin's bound; random
//!   matrices have close singular values, so this is often 10-100).
//!   A correct 16-bit round trip loses exactly that much; the figure is in the report.
//! - `factor`: 1 unless the matrix's `tolerances` rules say otherwise.
//!
//! A kernel that accumulates in 16-bit (a naive fp16 sum of squares over 4096 values is ~4e-2
//! off, ~90 u) lands far outside this and comes out as `mismatch`, which is the point: widening
//! the tolerance until it passes would hide exactly what users need to see.

use super::parallel;
use crate::case::{Case, DType, Op};
use crate::outcome::{Metrics, Outcome, OutputMetrics, Tolerance};
use crate::worker::io::{names, Outputs};
use crate::worker::tensor::HostTensor;

/// Roundings allowed per op chain, with margin. Init, forward, merge and unmerge chain 4-6
/// rounded steps (unmerge's amplification by cancellation is `kappa`'s business); backward
/// chains twice as many.
pub fn chain_constant(op: Op) -> f64 {
    match op {
        Op::Init
        | Op::Forward
        | Op::Merge
        | Op::Unmerge
        | Op::InitNoop
        | Op::Parity
        | Op::Roundtrip => 8.0,
        Op::Backward => 16.0,
    }
}

/// The pairs of a backend's own outputs that must agree, and the name of their gap:
/// `init_noop`'s adapted layer against the base layer alone, `parity`'s unmerged forward
/// against the merged layer's.
pub const GAPS: &[(&str, &str, &str)] = &[
    (names::RESULT, names::BASE_RESULT, NOOP_GAP),
    (names::RESULT, names::MERGED_RESULT, PARITY_GAP),
];

/// The name of `init_noop`'s gap output.
pub const NOOP_GAP: &str = "noop_gap";
/// The name of `parity`'s gap output.
pub const PARITY_GAP: &str = "parity_gap";

/// Unit roundoff of the accumulator a good kernel uses for this dtype.
pub fn accumulator_roundoff(dtype: DType) -> f64 {
    match dtype {
        DType::F64 => DType::F64.unit_roundoff(),
        _ => DType::F32.unit_roundoff(),
    }
}

impl Tolerance {
    /// The model tolerance for `case` with conditioning `kappa`, times `factor`, or `rel`
    /// outright when given.
    pub fn for_case(case: &Case, kappa: f64, factor: f64, rel: Option<f64>) -> Tolerance {
        if let Some(rel) = rel {
            return Tolerance {
                rel,
                factor,
                overridden: true,
                kappa,
            };
        }
        let s = &case.shape;
        let k = [s.batch, s.in_features, s.out_features, s.rank]
            .into_iter()
            .max()
            .unwrap_or(1) as f64;
        let u = case.point.dtype.unit_roundoff();
        let rel = chain_constant(case.point.op)
            * kappa
            * factor
            * (u + k.sqrt() * accumulator_roundoff(case.point.dtype));
        Tolerance {
            rel,
            factor,
            overridden: false,
            kappa,
        }
    }
}

/// The agreement of two backends' outputs for one case (see [`crate::outcome::Agreement`]): the
/// largest, over the outputs both hold, of `measure`'s error in units, with `twin` as the yardstick;
/// `None` when they share no output.
pub fn agreement_units(got: &Outputs, twin: &Outputs, dtype: DType) -> Option<f64> {
    let mut worst: Option<f64> = None;
    for (name, t) in twin {
        let Some((_, g)) = got.iter().find(|(n, _)| n == name) else {
            continue;
        };
        let m = measure(name, g, t, 0.0, dtype);
        let units = if m.nonfinite != m.reference_nonfinite {
            f64::INFINITY
        } else {
            m.err_units
        };
        worst = Some(worst.map_or(units, |w: f64| w.max(units)));
    }
    worst
}

fn measure(
    name: &str,
    got: &HostTensor,
    want: &HostTensor,
    tol: f64,
    dtype: DType,
) -> OutputMetrics {
    let mut max_abs: f64 = 0.0;
    let mut scale: f64 = 0.0;
    let mut nonfinite = 0;
    let mut reference_nonfinite = 0;
    if got.shape != want.shape {
        return OutputMetrics {
            name: name.to_string(),
            max_abs_err: f64::INFINITY,
            max_rel_err: f64::INFINITY,
            err_units: f64::INFINITY,
            tolerance: tol,
            scale: want.max_abs(),
            norm: f64::NAN,
            l1: f64::NAN,
            nonfinite: 0,
            reference_nonfinite: 0,
            elements: got.data.len(),
        };
    }
    // Maxima and counts do not depend on the order they are taken in: split over the cores.
    let n = want.data.len();
    let parts = parallel::map_ranges(n, 1 << 16, n, parallel::threads(), |_, r| {
        let (mut max_abs, mut scale, mut nonfinite, mut reference_nonfinite) =
            (0.0f64, 0.0f64, 0, 0);
        for (&g, &w) in got.data[r.clone()].iter().zip(&want.data[r]) {
            if !w.is_finite() {
                // The reference itself is undefined here (e.g. a zero-norm DoRA row): a finite
                // value there is an error of unbounded size; a non-finite one is still a finding
                // (the user gets NaN), counted apart so the report can say whose fault it is.
                if g.is_finite() {
                    max_abs = f64::INFINITY;
                } else {
                    nonfinite += 1;
                    reference_nonfinite += 1;
                }
                continue;
            }
            scale = scale.max(w.abs());
            if !g.is_finite() {
                nonfinite += 1;
                continue;
            }
            max_abs = max_abs.max((g - w).abs());
        }
        (max_abs, scale, nonfinite, reference_nonfinite)
    });
    for (m, s, nf, rnf) in parts {
        max_abs = max_abs.max(m);
        scale = scale.max(s);
        nonfinite += nf;
        reference_nonfinite += rnf;
    }
    let max_rel = if scale > 0.0 {
        max_abs / scale
    } else {
        max_abs
    };
    let finite = || got.data.iter().filter(|v| v.is_finite());
    let norm = finite().map(|v| v * v).sum::<f64>().sqrt();
    let l1 = finite().map(|v| v.abs()).sum::<f64>();
    OutputMetrics {
        name: name.to_string(),
        max_abs_err: max_abs,
        max_rel_err: max_rel,
        err_units: max_rel / dtype.unit_roundoff(),
        tolerance: tol,
        scale,
        norm,
        l1,
        nonfinite,
        reference_nonfinite,
        elements: got.data.len(),
    }
}

/// Compare a backend's outputs with the reference's, output by output, and give the verdict.
///
/// Ops that compare two of the backend's own results (`init_noop`, `parity`) also get a gap
/// output ([`GAPS`]): the first against the second, judged with the same tolerance. It is the
/// number users ask about ("is the adapter a no-op at init?", "does merging change my
/// outputs?"): 0 where the two agree bit for bit.
pub fn judge(got: &Outputs, want: &Outputs, tol: Tolerance, dtype: DType) -> Outcome {
    let find = |name: &str| got.iter().find(|(n, _)| *n == name).map(|(_, t)| t);
    let mut outputs: Vec<OutputMetrics> = want
        .iter()
        .map(|(name, w)| match find(name) {
            Some(g) => measure(name, g, w, tol.rel, dtype),
            None => measure(name, &HostTensor::zeros(vec![0]), w, tol.rel, dtype),
        })
        .collect();
    for (a, b, gap) in GAPS {
        if let (Some(x), Some(y)) = (find(a), find(b)) {
            let mut m = measure(gap, x, y, tol.rel, dtype);
            // Non-finite values are the outputs' finding, already counted there.
            m.nonfinite = 0;
            m.reference_nonfinite = 0;
            outputs.push(m);
        }
    }
    let worst = outputs
        .iter()
        .max_by(|a, b| a.ratio().total_cmp(&b.ratio()))
        .expect("every op has at least one output")
        .clone();
    let metrics = Metrics {
        max_abs_err: worst.max_abs_err,
        max_rel_err: worst.max_rel_err,
        tolerance: worst.tolerance,
        worst_output: worst.name.clone(),
        outputs,
    };
    if metrics.outputs.iter().any(|o| o.nonfinite > 0) {
        Outcome::Nonfinite(metrics)
    } else if metrics
        .outputs
        .iter()
        .any(|o| o.max_rel_err.is_nan() || o.max_rel_err > o.tolerance)
    {
        Outcome::Mismatch(metrics)
    } else {
        Outcome::Pass(metrics)
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use crate::outcome::OutcomeKind;
    use crate::worker::io::names;

    fn out(v: &[f64]) -> Outputs {
        vec![(names::RESULT, HostTensor::new(vec![v.len()], v.to_vec()))]
    }

    fn tol(rel: f64) -> Tolerance {
        Tolerance {
            rel,
            factor: 1.0,
            overridden: true,
            kappa: 1.0,
        }
    }

    #[test]
    fn verdicts() {
        let want = out(&[1.0, -2.0, 4.0]);
        let t = tol(1e-3);
        assert_eq!(
            judge(&out(&[1.0, -2.0, 4.001]), &want, t, DType::F16).kind(),
            OutcomeKind::Pass
        );
        assert_eq!(
            judge(&out(&[1.0, -2.0, 4.1]), &want, t, DType::F16).kind(),
            OutcomeKind::Mismatch
        );
        assert_eq!(
            judge(&out(&[1.0, f64::NAN, 4.0]), &want, t, DType::F16).kind(),
            OutcomeKind::Nonfinite
        );
        let m = judge(&out(&[1.0, -2.0, 4.1]), &want, t, DType::F16);
        let m = m.metrics().unwrap();
        assert!((m.max_abs_err - 0.1).abs() < 1e-12);
        assert!((m.max_rel_err - 0.025).abs() < 1e-12);
    }

    #[test]
    fn reference_nan_must_be_matched_and_is_still_a_finding() {
        let want = out(&[f64::NAN, 1.0]);
        let o = judge(&out(&[f64::NAN, 1.0]), &want, tol(1e-3), DType::F32);
        assert_eq!(o.kind(), OutcomeKind::Nonfinite);
        assert_eq!(o.metrics().unwrap().outputs[0].reference_nonfinite, 1);
        assert_eq!(
            judge(&out(&[0.0, 1.0]), &want, tol(1e-3), DType::F32).kind(),
            OutcomeKind::Mismatch
        );
    }

    #[test]
    fn tolerance_grows_with_reduction_length_for_f32_only() {
        use crate::case::*;
        let mut case = Case {
            point: Point {
                backend: Backend::Tch,
                device: Device::Cpu,
                dtype: DType::F32,
                adapter: Adapter::Lora,
                op: Op::Forward,
                precision: Precision::Native,
                layer: Layer::Linear,
                profile: Profile::Normal,
            },
            shape: Shape {
                name: "s".into(),
                batch: 1,
                in_features: 16,
                out_features: 1,
                rank: 1,
                alpha: 1.0,
                bias: false,
                rslora: false,
                kernel: 3,
                image: 8,
            },
        };
        let small = Tolerance::for_case(&case, 1.0, 1.0, None).rel;
        case.shape.in_features = 4096;
        let big = Tolerance::for_case(&case, 1.0, 1.0, None).rel;
        assert!(big / small > 10.0, "{small} {big}");
        case.point.dtype = DType::F16;
        let h_big = Tolerance::for_case(&case, 1.0, 1.0, None).rel;
        case.shape.in_features = 16;
        let h_small = Tolerance::for_case(&case, 1.0, 1.0, None).rel;
        assert!(h_big / h_small < 1.1);
    }
}
