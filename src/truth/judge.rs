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
use crate::worker::protocol::TensorFile;
use crate::worker::tensor::HostTensor;

/// Roundings allowed per op chain, with margin. Init, forward, merge and unmerge chain 4-6
/// rounded steps (unmerge's amplification by cancellation is `kappa`'s business); backward
/// chains twice as many, and so does `step` (backward, then one rounding of p - lr * grad).
pub fn chain_constant(op: Op) -> f64 {
    match op {
        Op::Init
        | Op::Forward
        | Op::Merge
        | Op::Unmerge
        | Op::InitNoop
        | Op::Parity
        | Op::Roundtrip => 8.0,
        Op::Backward | Op::Step => 16.0,
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

/// The dtype whose roundoff a case's outputs are judged by (the tolerance's `u` and the
/// figures' `err_units`): its dtype, except an fp8 case's ops whose outputs do not pass through
/// the fp8 weight, judged by the bf16 they are computed and held in (merge, unmerge, roundtrip
/// and parity read or write the fp8 weight: fp8's).
pub fn judged_dtype(case: &Case) -> DType {
    let d = case.point.dtype;
    let through_weight = matches!(
        case.point.op,
        Op::Merge | Op::Unmerge | Op::Roundtrip | Op::Parity
    );
    if d.is_fp8() && !through_weight {
        case.compute_dtype()
    } else {
        d
    }
}

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
        let u = judged_dtype(case).unit_roundoff();
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
        let m = measure(name, Got::Tensor(g), t, 0.0, dtype);
        let units = if m.nonfinite != m.reference_nonfinite {
            f64::INFINITY
        } else {
            m.err_units
        };
        worst = Some(worst.map_or(units, |w: f64| w.max(units)));
    }
    worst
}

/// A backend's output as the judge reads it: decoded, or still in the worker's file (an
/// LLM-sized weight the runner has no other use for is read a chunk at a time, never held
/// whole beside its reference).
#[derive(Clone, Copy)]
pub enum Got<'a> {
    Tensor(&'a HostTensor),
    File(&'a TensorFile),
}

/// Values per chunk of a measurement.
const CHUNK: usize = 1 << 16;

impl Got<'_> {
    fn shape(&self) -> &[usize] {
        match self {
            Got::Tensor(t) => &t.shape,
            Got::File(f) => &f.header.shape,
        }
    }

    fn len(&self) -> usize {
        match self {
            Got::Tensor(t) => t.data.len(),
            Got::File(f) => f.len(),
        }
    }

    /// `f` of the values in `range`. A file that cannot be read (its worker is gone) reads
    /// as NaN: the case then fails as `nonfinite`, never passes.
    fn chunk<R>(&self, range: std::ops::Range<usize>, f: impl FnOnce(&[f64]) -> R) -> R {
        match self {
            Got::Tensor(t) => f(&t.data[range]),
            Got::File(file) => {
                let mut buf = vec![0.0; range.len()];
                if file.read(range.start, &mut buf).is_err() {
                    buf.fill(f64::NAN);
                }
                f(&buf)
            }
        }
    }

    /// The whole tensor (decoded from its file if it is one).
    fn tensor(&self) -> std::borrow::Cow<'_, HostTensor> {
        match self {
            Got::Tensor(t) => std::borrow::Cow::Borrowed(*t),
            Got::File(f) => std::borrow::Cow::Owned(f.decode().unwrap_or_else(|_| {
                HostTensor::new(f.header.shape.clone(), vec![f64::NAN; f.len()])
            })),
        }
    }
}

fn measure(name: &str, got: Got, want: &HostTensor, tol: f64, dtype: DType) -> OutputMetrics {
    let mut max_abs: f64 = 0.0;
    let mut scale: f64 = 0.0;
    let mut nonfinite = 0;
    let mut reference_nonfinite = 0;
    if got.shape() != want.shape.as_slice() {
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
            elements: got.len(),
        };
    }
    // Maxima and counts do not depend on the order they are taken in: split over the cores.
    // The sums do: taken in order, chunk after chunk, from -0.0 as `Iterator::sum` starts (the
    // same bits as one pass over the whole tensor), on a thread of their own beside the maxima.
    let n = want.data.len();
    let maxima = |threads: usize| {
        parallel::map_ranges(n, CHUNK, n, threads, |_, r| {
            let (mut max_abs, mut scale, mut nonfinite, mut reference_nonfinite) =
                (0.0f64, 0.0f64, 0, 0);
            got.chunk(r.clone(), |g| {
                for (&g, &w) in g.iter().zip(&want.data[r]) {
                    if !w.is_finite() {
                        // The reference itself is undefined here (e.g. a zero-norm DoRA row):
                        // a finite value there is an error of unbounded size; a non-finite one
                        // is still a finding (the user gets NaN), counted apart so the report
                        // can say whose fault it is.
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
            });
            (max_abs, scale, nonfinite, reference_nonfinite)
        })
    };
    let sums = || {
        let (mut squares, mut l1) = (-0.0f64, -0.0f64);
        for start in (0..got.len()).step_by(CHUNK) {
            got.chunk(start..(start + CHUNK).min(got.len()), |c| {
                for v in c.iter().filter(|v| v.is_finite()) {
                    squares += v * v;
                }
                for v in c.iter().filter(|v| v.is_finite()) {
                    l1 += v.abs();
                }
            });
        }
        (squares, l1)
    };
    let threads = parallel::threads();
    let ((squares, l1), parts) = if n >= parallel::MIN_PARALLEL && threads > 1 {
        std::thread::scope(|s| {
            let h = s.spawn(sums);
            let parts = maxima(threads - 1);
            let sums = h.join().unwrap_or_else(|p| std::panic::resume_unwind(p));
            (sums, parts)
        })
    } else {
        (sums(), maxima(1))
    };
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
    let norm = squares.sqrt();
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
        elements: got.len(),
    }
}

/// Compare a backend's outputs with the reference's, output by output, and give the verdict.
///
/// Ops that compare two of the backend's own results (`init_noop`, `parity`) also get a gap
/// output ([`GAPS`]): the first against the second, judged with the same tolerance. It is the
/// number users ask about ("is the adapter a no-op at init?", "does merging change my
/// outputs?"): 0 where the two agree bit for bit.
pub fn judge(got: &Outputs, want: &Outputs, tol: Tolerance, dtype: DType) -> Outcome {
    judge_files(got, &[], want, tol, dtype)
}

/// [`judge`] with some outputs still in their worker's files.
pub fn judge_files(
    got: &Outputs,
    files: &[(&str, TensorFile)],
    want: &Outputs,
    tol: Tolerance,
    dtype: DType,
) -> Outcome {
    let find = |name: &str| {
        got.iter()
            .find(|(n, _)| *n == name)
            .map(|(_, t)| Got::Tensor(t))
            .or_else(|| {
                files
                    .iter()
                    .find(|(n, _)| *n == name)
                    .map(|(_, f)| Got::File(f))
            })
    };
    let none = HostTensor::zeros(vec![0]);
    let mut outputs: Vec<OutputMetrics> = want
        .iter()
        .map(|(name, w)| {
            let g = find(name).unwrap_or(Got::Tensor(&none));
            measure(name, g, w, tol.rel, dtype)
        })
        .collect();
    for (a, b, gap) in GAPS {
        if let (Some(x), Some(y)) = (find(a), find(b)) {
            let mut m = measure(gap, x, &y.tensor(), tol.rel, dtype);
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

/// The `step` op's own finding: an adapter tensor the backend's step left exactly as it was,
/// where the reference's step moves it (a 16-bit parameter swallows an update below half its
/// ulp; torchtune #2250's magnitudes that stopped updating). Its parameters still sit within
/// rounding of the reference's, so the judge alone would pass them; this adds an output
/// `<name> did not move` (the whole update lost: relative error 1) and makes the case a
/// mismatch that says so. `before` gives each output's value before the step.
pub fn unmoved(
    outcome: Outcome,
    got: &Outputs,
    want: &Outputs,
    before: &[(&str, &HostTensor)],
    dtype: DType,
) -> Outcome {
    let (mut metrics, was_mismatch) = match outcome {
        Outcome::Pass(m) => (m, false),
        Outcome::Mismatch(m) => (m, true),
        other => return other,
    };
    let mut stuck = false;
    for (name, pre) in before {
        let (Some((_, g)), Some((_, w))) = (
            got.iter().find(|(n, _)| n == name),
            want.iter().find(|(n, _)| n == name),
        ) else {
            continue;
        };
        let moved = w
            .data
            .iter()
            .zip(&pre.data)
            .fold(0.0f64, |m, (w, p)| m.max((w - p).abs()));
        if moved > 0.0 && g.data == pre.data {
            stuck = true;
            metrics.outputs.push(OutputMetrics {
                name: format!("{name} did not move"),
                max_abs_err: moved,
                max_rel_err: 1.0,
                err_units: 1.0 / dtype.unit_roundoff(),
                tolerance: metrics.tolerance,
                scale: moved,
                norm: 0.0,
                l1: 0.0,
                nonfinite: 0,
                reference_nonfinite: 0,
                elements: pre.data.len(),
            });
        }
    }
    if !stuck {
        return if was_mismatch {
            Outcome::Mismatch(metrics)
        } else {
            Outcome::Pass(metrics)
        };
    }
    let worst = metrics.outputs.last().expect("just pushed").clone();
    metrics.max_abs_err = worst.max_abs_err;
    metrics.max_rel_err = worst.max_rel_err;
    metrics.worst_output = worst.name;
    Outcome::Mismatch(metrics)
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

    /// An output judged from its worker's file, a chunk at a time, gets the very figures it
    /// gets decoded (norm and L1 included, bit for bit), on a tensor of several chunks with
    /// non-finite values in it.
    #[cfg(target_os = "linux")]
    #[test]
    fn an_output_in_a_file_is_judged_as_if_decoded() {
        use crate::worker::protocol::{tensor_file, TensorFile, TensorHeader};
        let n = 5 * CHUNK + 17;
        let want = HostTensor::new(vec![n], (0..n).map(|i| (i as f64).sin()).collect());
        let mut got = want.rounded(DType::F16);
        got.data[5] = f64::NAN;
        got.data[2 * CHUNK + 3] = f64::INFINITY;
        let (_file, path) = tensor_file(&got, DType::F16).unwrap();
        let header = TensorHeader {
            name: names::RESULT.into(),
            dtype: DType::F16,
            shape: vec![n],
            bytes: n * 2,
            file: Some(path),
        };
        let file = TensorFile::open(&header).unwrap();
        let want = vec![(names::RESULT, want)];
        let decoded = judge(&vec![(names::RESULT, got)], &want, tol(1e-3), DType::F16);
        let files = judge_files(
            &vec![],
            &[(names::RESULT, file)],
            &want,
            tol(1e-3),
            DType::F16,
        );
        assert_eq!(decoded, files);
        assert_eq!(files.metrics().unwrap().outputs[0].nonfinite, 2);
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
                bias: false,
                ..Shape::new("s", 1, 16, 1, 1, 1.0)
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
