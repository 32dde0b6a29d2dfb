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
