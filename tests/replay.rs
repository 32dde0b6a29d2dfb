//! Dumps load into PEFT: `scripts/replay.py` rebuilds cases (PiSSA init, an Embedding forward, a
//! Conv2d parity and backward, DoRA's init, an unmerge, DoRA's 0/0 on zero rows) in torch + PEFT
//! 0.21.2 from the dumped tensors and their documented names, runs each op through PEFT's own
//! code (the PEFT worker's `run_case`), and PEFT's numbers match peft-compat's; an output it
//! cannot replay is an error. Needs `.venv` with torch and peft (scripts/test installs both); without
//! them the test says so and checks nothing.

mod support;

use std::path::{Path, PathBuf};
use std::process::Command;
use support::{python, replay};

/// Run the failures matrix's case `id` with `--dump dir`; its dump file.
fn dumped(dir: &Path, id: &str) -> PathBuf {
    let out = Command::new(env!("CARGO_BIN_EXE_peft-compat"))
        .args([
            "run",
            "matrices/failures.yaml",
            "-q",
            "--results",
            "/dev/null",
        ])
        .args(["--filter", id, "--dump"])
        .arg(dir)
        .output()
        .unwrap();
    assert!(
        out.status.success(),
        "{}",
        String::from_utf8_lossy(&out.stderr)
    );
    let file = dir.join(peft_compat::exec::dump::file_name(id));
    assert!(file.exists(), "{}", file.display());
    file
}

#[test]
fn pissa_embedding_and_conv2d_dumps_replay_in_peft() {
    if python().is_none() {
        eprintln!("SKIPPED: .venv has no torch + peft (scripts/test installs peft==0.21.2)");
        return;
    }
    let dir = tempfile::tempdir().unwrap();
    // (case id, the lines replay.py must print, largest allowed |peft - peft-compat|)
    let cases = [
        (
            "tch/cpu/f32/pissa/init/native/small",
            &["base_layer.weight", "delta_weight"][..],
            1e-5,
        ),
        (
            "tch/cpu/f16/dora/forward/native/small/embedding",
            &["result"][..],
            0.0,
        ),
        (
            "tch/cpu/f32/dora/parity/native/conv/conv2d",
            &["result", "merged_result"][..],
            1e-6,
        ),
        // DoRA's init through PEFT's own DoRA variant, on the dumped A and B.
        (
            "tch/cpu/f32/dora/init/native/small",
            &["lora_magnitude_vector"][..],
            1e-5,
        ),
        // Autograd through PEFT's Conv2d (another convolution backward: ~1e-5 on grad A).
        (
            "tch/cpu/f32/lora/backward/native/conv/conv2d",
            &[
                "result",
                "grad.lora_A.weight",
                "grad.lora_B.weight",
                "grad.input",
            ][..],
            1e-4,
        ),
        (
            "tch/cpu/f32/dora/unmerge/native/small",
            &["unmerged_weight"][..],
            1e-5,
        ),
        // DoRA's 0/0 on zero rows: PEFT's NaNs fall in the same places as ours.
        (
            "tch/cpu/f32/dora/init_noop/native/small/zero_rows",
            &["result", "base_result"][..],
            0.0,
        ),
    ];
    for (id, lines, allowed) in cases {
        let file = dumped(dir.path(), id);
        let (got, stdout) = replay(&file);
        for what in lines {
            let d = got
                .iter()
                .find(|(w, _)| w == what)
                .unwrap_or_else(|| panic!("{id}: no `{what}` in {stdout}"))
                .1;
            assert!(d <= allowed, "{id}: {what}: {d} > {allowed}\n{stdout}");
        }
        if id.contains("zero_rows") {
            assert!(stdout.contains("non-finite at the same"), "{stdout}");
        }
    }
}

/// A dump holding an output the script cannot replay is named and exits 2: nothing passes as
/// "replayed" unchecked.
#[test]
fn an_output_replay_cannot_check_is_named_and_exits_2() {
    let Some(py) = python() else {
        eprintln!("SKIPPED: .venv has no torch + peft");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    let id = "tch/cpu/f32/lora/forward/native/small";
    let file = dumped(dir.path(), id);
    let odd = dir.path().join("odd.safetensors");
    let script = "import sys, torch\nfrom safetensors import safe_open\nfrom safetensors.torch import save_file\n\
        with safe_open(sys.argv[1], 'pt') as f:\n    m = f.metadata(); t = {k: f.get_tensor(k) for k in f.keys()}\n\
        t['output.mystery'] = torch.zeros(3)\nsave_file(t, sys.argv[2], metadata=m)\n";
    let made = Command::new(py)
        .args(["-c", script])
        .arg(&file)
        .arg(&odd)
        .output()
        .unwrap();
    assert!(
        made.status.success(),
        "{}",
        String::from_utf8_lossy(&made.stderr)
    );
    let out = Command::new(py)
        .arg("scripts/replay.py")
        .arg(&odd)
        .output()
        .unwrap();
    let stdout = String::from_utf8_lossy(&out.stdout);
    assert_eq!(out.status.code(), Some(2), "{stdout}");
    assert!(
        stdout.contains("cannot replay forward outputs: mystery"),
        "{stdout}"
    );
    assert!(
        stdout.contains("result: peft vs output: 0.000e+00"),
        "{stdout}"
    );
}
