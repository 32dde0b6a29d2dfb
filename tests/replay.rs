//! Dumps load into PEFT: `scripts/replay.py` rebuilds a PiSSA, an Embedding and a Conv2d case in
//! torch + PEFT 0.21.2 from the dumped tensors and their documented names, and PEFT's numbers
//! match peft-compat's. Needs `.venv` with torch and peft (scripts/test installs both); without
//! them the test says so and checks nothing.

use std::path::Path;
use std::process::Command;

fn python() -> Option<&'static str> {
    let py = ".venv/bin/python";
    let ok = Command::new(py)
        .args(["-c", "import torch, peft, safetensors"])
        .output()
        .is_ok_and(|o| o.status.success());
    ok.then_some(py)
}

/// `(what, difference)` for each "what: peft vs output: D" line of replay.py's output.
fn against_output(stdout: &str) -> Vec<(String, f64)> {
    stdout
        .lines()
        .filter_map(|l| {
            let (what, d) = l.split_once(": peft vs output: ")?;
            Some((what.to_string(), d.trim().parse().ok()?))
        })
        .collect()
}

#[test]
fn pissa_embedding_and_conv2d_dumps_replay_in_peft() {
    let Some(py) = python() else {
        eprintln!("SKIPPED: .venv has no torch + peft (scripts/test installs peft==0.21.2)");
        return;
    };
    let dir = tempfile::tempdir().unwrap();
    // (case id, the lines replay.py must print, largest allowed |peft - peft-compat|)
    let cases = [
        (
            "tch/cpu/f32/pissa/init/native/small",
            &["residual weight", "s * B @ A"][..],
            1e-5,
        ),
        (
            "tch/cpu/f16/dora/forward/native/small/embedding",
            &["forward"][..],
            0.0,
        ),
        (
            "tch/cpu/f32/dora/parity/native/conv/conv2d",
            &["forward", "merged forward"][..],
            1e-6,
        ),
    ];
    for (id, lines, allowed) in cases {
        let out = Command::new(env!("CARGO_BIN_EXE_peft-compat"))
            .args([
                "run",
                "matrices/failures.yaml",
                "-q",
                "--results",
                "/dev/null",
                "--filter",
                id,
                "--dump",
            ])
            .arg(dir.path())
            .output()
            .unwrap();
        assert!(
            out.status.success(),
            "{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let file = dir.path().join(peft_compat::exec::dump::file_name(id));
        assert!(Path::new(&file).exists(), "{}", file.display());
        let out = Command::new(py)
            .arg("scripts/replay.py")
            .arg(&file)
            .output()
            .unwrap();
        let stdout = String::from_utf8_lossy(&out.stdout);
        assert!(
            out.status.success(),
            "{id}: {stdout}{}",
            String::from_utf8_lossy(&out.stderr)
        );
        let got = against_output(&stdout);
        for what in lines {
            let d = got
                .iter()
                .find(|(w, _)| w == what)
                .unwrap_or_else(|| panic!("{id}: no `{what}` in {stdout}"))
                .1;
            assert!(d <= allowed, "{id}: {what}: {d} > {allowed}\n{stdout}");
        }
        if id.contains("embedding") {
            assert!(
                stdout.contains("lora_embedding_A.default, lora_embedding_B.default, lora_magnitude_vector.default.weight"),
                "{stdout}"
            );
        }
    }
}
