//! `matrices/failures.yaml`: the failure space PEFT users hit, run on this machine's CPU and held
//! to its snapshot and expectations like the default matrix; and the findings the matrix exists
//! to show, checked case by case.

mod support;

use peft_compat::outcome::OutcomeKind;
use peft_compat::render as table;
use peft_compat::render::gate::text as gate_text;
use peft_compat::report::{CaseReport, Report};
use peft_compat::spec::Matrix;
use peft_compat::verdict;
use peft_compat::verdict::gate;
use peft_compat::verdict::snapshot;
use std::path::Path;
use std::sync::OnceLock;

const MATRIX: &str = "matrices/failures.yaml";

/// One run of the matrix (CUDA cases skip at once here), shared by the tests below.
fn report() -> &'static Report {
    static REPORT: OnceLock<Report> = OnceLock::new();
    REPORT.get_or_init(|| {
        let m = Matrix::load(Path::new(MATRIX), None).unwrap();
        let (results, env) = support::run_workers_env(&m, 2, &Default::default());
        verdict::assemble(
            MATRIX,
            &m,
            env,
            results.iter().map(CaseReport::from_result).collect(),
            0.0,
        )
    })
}

fn case(id: &str) -> &'static CaseReport {
    report()
        .cases
        .iter()
        .find(|c| c.id == id)
        .unwrap_or_else(|| panic!("no case {id}"))
}

fn figure(id: &str, output: &str) -> f64 {
    let c = case(id);
    c.metrics
        .as_ref()
        .and_then(|m| m.outputs.iter().find(|o| o.name == output))
        .unwrap_or_else(|| panic!("{id}: no {output} ({:?})", c.outcome))
        .max_rel_err
}

#[test]
fn the_failures_matrix_passes_its_own_gate() {
    let snap = snapshot::read(Path::new("snapshots/failures.snap")).unwrap();
    let v = gate::check(report(), &snap, false);
    assert!(v.passed(), "{}", gate_text(&v, MATRIX));
    assert!(v.checked > 2000, "{}", v.checked);
}

/// PiSSA and OLoRA natively in 16-bit meet libtorch's own refusal, verbatim; PEFT's fp32 path
/// (upcast) and its autocast default pass. f64 is PEFT's refusal, shown as such.
#[test]
fn pissa_and_olora_fail_natively_in_16_bit_and_pass_through_fp32() {
    for (dtype, name) in [("f16", "Half"), ("bf16", "BFloat16")] {
        for (adapter, kernel) in [
            ("pissa", "linalg_svd_cpu"),
            ("pissa_dora", "linalg_svd_cpu"),
            ("olora", "geqrf_cpu"),
        ] {
            let c = case(&format!("tch/cpu/{dtype}/{adapter}/init/native/small"));
            assert_eq!(c.outcome, OutcomeKind::Unsupported, "{}", c.id);
            assert_eq!(
                c.error.as_deref(),
                Some(format!("\"{kernel}\" not implemented for '{name}'").as_str())
            );
            for path in ["upcast", "autocast"] {
                let c = case(&format!("tch/cpu/{dtype}/{adapter}/init/{path}/small"));
                assert_eq!(c.outcome, OutcomeKind::Pass, "{}: {:?}", c.id, c.error);
            }
            let c = case(&format!("candle/cpu/{dtype}/{adapter}/init/upcast/small"));
            assert_eq!(c.outcome, OutcomeKind::Unsupported);
            assert!(c.error.as_deref().unwrap().contains("candle-core"));
        }
    }
    let c = case("tch/cpu/f64/pissa/init/native/small");
    assert_eq!(c.outcome, OutcomeKind::Skipped);
    assert!(c.error.as_deref().unwrap().contains("PEFT refuses float64"));
}

/// DoRA on all-zero weight rows is NaN at init, on every backend, dtype, path and layer.
#[test]
fn dora_on_zero_rows_is_nonfinite_at_init() {
    for backend in ["tch", "candle"] {
        for (shape, layer) in [("small", ""), ("small", "/embedding"), ("conv", "/conv2d")] {
            for (dtype, path) in [("f32", "native"), ("f16", "autocast"), ("bf16", "upcast")] {
                let id =
                    format!("{backend}/cpu/{dtype}/dora/init_noop/{path}/{shape}{layer}/zero_rows");
                let c = case(&id);
                if backend == "candle" && dtype == "bf16" && layer == "/conv2d" {
                    // candle's CPU conv2d has no bf16 kernel: it fails before the division.
                    assert_eq!(c.outcome, OutcomeKind::Unsupported, "{id}");
                    continue;
                }
                assert_eq!(c.outcome, OutcomeKind::Nonfinite, "{id}");
                assert!(c.failure_detail().contains("undefined there too"), "{id}");
                // LoRA on the same weights is a no-op.
                let lora = id.replace("/dora/", "/lora/");
                assert_eq!(case(&lora).outcome, OutcomeKind::Pass, "{lora}");
            }
        }
    }
}

/// Under autocast DoRA is not an exact no-op at init (its magnitude is rounded in the base
/// dtype, the forward's norm is fp32); LoRA is, and so is DoRA on the native and upcast paths.
#[test]
fn the_autocast_init_gap_is_a_number_beside_loras_zero() {
    for dtype in ["f16", "bf16"] {
        let gap = |a: &str, p: &str| {
            figure(
                &format!("tch/cpu/{dtype}/{a}/init_noop/{p}/small"),
                "noop_gap",
            )
        };
        let dora = gap("dora", "autocast");
        assert!(dora > 0.0, "{dtype}: {dora}");
        // about one rounding of the base dtype (bf16: ~3e-3, PEFT measured 7.8e-3 / 2.5)
        let u = if dtype == "f16" {
            2f64.powi(-11)
        } else {
            2f64.powi(-8)
        };
        assert!(dora < 4.0 * u, "{dtype}: {dora}");
        for (a, p) in [
            ("lora", "autocast"),
            ("lora", "native"),
            ("dora", "native"),
            ("dora", "upcast"),
        ] {
            assert_eq!(gap(a, p), 0.0, "{dtype} {a} {p}");
        }
    }
}

/// Merge parity and the 16-bit round trip are numbers per dtype: about one rounding of the
/// dtype, and exactly 0 for... nothing but f64's last bits.
#[test]
fn parity_and_round_trip_figures_per_dtype() {
    for (dtype, path, u) in [
        ("f32", "native", 2f64.powi(-24)),
        ("f16", "upcast", 2f64.powi(-11)),
        ("bf16", "autocast", 2f64.powi(-8)),
        ("f64", "native", 2f64.powi(-53)),
    ] {
        for a in ["lora", "dora"] {
            let p = figure(
                &format!("tch/cpu/{dtype}/{a}/parity/{path}/small"),
                "parity_gap",
            );
            let r = figure(
                &format!("tch/cpu/{dtype}/{a}/roundtrip/{path}/small"),
                "unmerged_weight",
            );
            for (what, v) in [("parity", p), ("roundtrip", r)] {
                assert!(v > 0.0 && v < 16.0 * u, "{dtype} {a} {what}: {v}");
            }
        }
    }
}

/// Embedding and Conv2d carry LoRA and DoRA through every op on both backends.
#[test]
fn embedding_and_conv2d_rows_for_lora_and_dora() {
    let ops = [
        "init",
        "forward",
        "backward",
        "merge",
        "unmerge",
        "init_noop",
        "parity",
        "roundtrip",
    ];
    for (shape, layer) in [("small", "embedding"), ("conv", "conv2d")] {
        for backend in ["tch", "candle"] {
            for a in ["lora", "dora"] {
                for op in ops {
                    let c = case(&format!(
                        "{backend}/cpu/f32/{a}/{op}/native/{shape}/{layer}"
                    ));
                    assert_eq!(c.outcome, OutcomeKind::Pass, "{}: {:?}", c.id, c.error);
                }
            }
        }
    }
}

/// The Markdown render has the three-path tables and the figures.
#[test]
fn the_tables_show_three_paths_and_the_figures() {
    let md = table::render_markdown(report(), None);
    assert!(md.contains("#### layer linear, profile normal"), "{md}");
    assert!(md.contains("#### figures, layer conv2d"), "{md}");
    assert!(md.contains("| pissa init "), "{md}");
    assert!(md.contains("U ✓ ✓") || md.contains("u ✓ ✓"), "{md}");
    let text = table::render_text(report(), false, 10);
    let widest = text.lines().map(|l| l.chars().count()).max().unwrap();
    let table_width = text
        .lines()
        .filter(|l| l.starts_with('│') || l.starts_with('┌'))
        .map(|l| l.chars().count())
        .max()
        .unwrap();
    assert!(table_width <= 80, "{table_width}");
    assert!(widest > 0);
}

/// fp8 bases on torch 2.11 CPU: natively every op meets libtorch's refusal, verbatim (fp8 has a
/// matmul but no add and no product by a scalar); upcast to bf16 for every op (merged back into
/// fp8) and autocast run them all and pass; candle skips fp8, saying why.
#[test]
fn fp8_bases_fail_natively_and_pass_upcast() {
    for (dtype, kind) in [("f8e4m3", "Float8_e4m3fn"), ("f8e5m2", "Float8_e5m2")] {
        for (adapter, op, kernel) in [
            ("dora", "init", "mul_cpu_reduced_float"),
            ("dora", "merge", "mul_cpu_reduced_float"),
            ("lora", "merge", "mul_cpu_reduced_float"),
            ("lora", "forward", "add_stub"),
        ] {
            let c = case(&format!("tch/cpu/{dtype}/{adapter}/{op}/native/fp8"));
            assert_eq!(c.outcome, OutcomeKind::Unsupported, "{}", c.id);
            assert_eq!(
                c.error.as_deref(),
                Some(format!("\"{kernel}\" not implemented for '{kind}'").as_str())
            );
            for path in ["upcast", "autocast"] {
                let c = case(&format!("tch/cpu/{dtype}/{adapter}/{op}/{path}/fp8"));
                assert_eq!(c.outcome, OutcomeKind::Pass, "{}: {:?}", c.id, c.error);
            }
        }
        let c = case(&format!("candle/cpu/{dtype}/dora/init/upcast/fp8"));
        assert_eq!(c.outcome, OutcomeKind::Skipped);
        assert!(c.error.as_deref().unwrap().contains("no fp8 path"));
    }
}

/// One SGD step at lr 1e-4: a bf16 DoRA magnitude does not move at all (a mismatch that says
/// so), on tch, candle and PEFT alike; the fp32 adapter of autocast takes the step; LoRA's A and
/// B move (partly rounded away) on every path.
#[test]
fn a_step_leaves_bf16_dora_magnitudes_where_they_were() {
    for backend in ["tch", "candle"] {
        for path in ["native", "upcast"] {
            let c = case(&format!("{backend}/cpu/bf16/dora/step/{path}/small"));
            assert_eq!(c.outcome, OutcomeKind::Mismatch, "{}", c.id);
            assert!(
                c.failure_detail()
                    .contains("lora_magnitude_vector did not move"),
                "{}: {}",
                c.id,
                c.failure_detail()
            );
        }
        for id in [
            format!("{backend}/cpu/bf16/dora/step/autocast/small"),
            format!("{backend}/cpu/bf16/lora/step/native/small"),
            format!("{backend}/cpu/f32/dora/step/native/small"),
            format!("{backend}/cpu/f16/dora/step/native/small"),
        ] {
            assert_eq!(case(&id).outcome, OutcomeKind::Pass, "{id}");
        }
    }
    let c = case("peft/cpu/bf16/dora/step/native/grouped/conv2d");
    assert!(c
        .failure_detail()
        .contains("lora_magnitude_vector did not move"));
}

/// lora_bias with alpha != r: PEFT 0.15 merges the bias unscaled (merged != unmerged, #2486),
/// 0.18 and 0.21 merge it right; into a layer without a bias 0.15 dies on `None.data` and 0.18
/// refuses in words (#2716). The f64 reference and tch agree with the fixed releases.
#[test]
fn lora_bias_merges_right_from_the_release_that_fixed_it() {
    for dtype in ["f32", "bf16"] {
        let old = case(&format!(
            "peft@0.15.2+torch2.11.0/cpu/{dtype}/lora/parity/native/lora_bias"
        ));
        assert_eq!(old.outcome, OutcomeKind::Mismatch, "{}", old.id);
        assert!(figure(&old.id, "parity_gap") > 0.1, "{}", old.id);
        for backend in ["peft@0.18.0+torch2.11.0", "peft", "tch", "candle"] {
            let id = format!("{backend}/cpu/{dtype}/lora/parity/native/lora_bias");
            assert_eq!(case(&id).outcome, OutcomeKind::Pass, "{id}");
            let id = format!("{backend}/cpu/{dtype}/lora/merge/native/lora_bias");
            assert_eq!(case(&id).outcome, OutcomeKind::Pass, "{id}");
        }
    }
    let old = case("peft@0.15.2+torch2.11.0/cpu/f32/lora/merge/native/lora_bias_nobias");
    assert_eq!(old.outcome, OutcomeKind::Unsupported);
    assert!(old
        .error
        .as_deref()
        .unwrap()
        .contains("'NoneType' object has no attribute 'data'"));
    let new = case("peft@0.18.0+torch2.11.0/cpu/f32/lora/merge/native/lora_bias_nobias");
    assert!(new
        .error
        .as_deref()
        .unwrap()
        .contains("Impossible to merge LoRA"));
}

/// DoRA on a grouped Conv2d: PEFT 0.15 fails at init (#2549); 0.18 and 0.21 initialise it (a
/// no-op at init, B = 0) but their norm of a trained adapter is not the norm of the layer's
/// W + dW rows, so the forward is ~25% off where tch's and candle's run of the f64 formula pass.
#[test]
fn grouped_conv2d_dora_fails_at_init_before_0_16_and_drifts_after() {
    let c = case("peft@0.15.2+torch2.11.0/cpu/f32/dora/init/native/grouped/conv2d");
    assert_eq!(c.outcome, OutcomeKind::Unsupported);
    assert!(c
        .error
        .as_deref()
        .unwrap()
        .contains("is invalid for input of size"));
    for backend in ["peft@0.18.0+torch2.11.0", "peft"] {
        let id = format!("{backend}/cpu/f32/dora/init_noop/native/grouped/conv2d");
        assert_eq!(case(&id).outcome, OutcomeKind::Pass, "{id}");
        let id = format!("{backend}/cpu/f32/dora/forward/native/grouped/conv2d");
        assert_eq!(case(&id).outcome, OutcomeKind::Mismatch, "{id}");
        assert!(figure(&id, "result") > 0.1, "{id}");
        let id = format!("{backend}/cpu/f32/lora/forward/native/grouped/conv2d");
        assert_eq!(case(&id).outcome, OutcomeKind::Pass, "{id}");
    }
    for backend in ["tch", "candle"] {
        let id = format!("{backend}/cpu/f32/dora/forward/native/grouped/conv2d");
        assert_eq!(case(&id).outcome, OutcomeKind::Pass, "{id}");
    }
}

/// The fused base layer (one addmm) and the split one (x @ W.T, then + b) on the very same
/// inputs: both within tolerance, with their own parity gaps per dtype.
#[test]
fn fused_and_split_base_layers_both_pass_with_their_gaps() {
    for dtype in ["f16", "bf16"] {
        for shape in ["small", "fused"] {
            for op in ["forward", "parity"] {
                let id = format!("tch/cpu/{dtype}/lora/{op}/native/{shape}");
                assert_eq!(case(&id).outcome, OutcomeKind::Pass, "{id}");
            }
        }
        let split = figure(
            &format!("tch/cpu/{dtype}/lora/parity/native/small"),
            "parity_gap",
        );
        let fused = figure(
            &format!("tch/cpu/{dtype}/lora/parity/native/fused"),
            "parity_gap",
        );
        assert!(split > 0.0 && fused > 0.0, "{dtype}: {split} {fused}");
    }
    // The fused shape's figures sit in a table of their own beside the split ones.
    let md = table::render_markdown(report(), None);
    assert!(
        md.contains("#### figures, layer linear, base fused"),
        "{md}"
    );
}
