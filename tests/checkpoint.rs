//! Checkpoint layers (`weights:`): a small BERT-like model the tests save themselves
//! (tests/support/make_checkpoint.py: one file, two shards with an index, a LoRA and a DoRA
//! adapter saved by PEFT's own save_pretrained), run through the real binary and workers.
//! The traps users meet in their own weights are found on the tensor that has them, by name;
//! every bad input exits 2 naming the file and the fix. Needs `.venv` (torch, safetensors and
//! PEFT; scripts/test makes it) to write the fixtures.

mod support;

use serde_json::Value;
use std::path::{Path, PathBuf};
use std::process::{Command, Output};
use std::sync::OnceLock;
use support::{bin, json, replay, report_case as case, write};

/// The fixtures, made once per test binary.
fn fixtures() -> &'static Path {
    static DIR: OnceLock<PathBuf> = OnceLock::new();
    DIR.get_or_init(|| {
        let dir = std::env::temp_dir().join(format!("peft-compat-ckpt-{}", std::process::id()));
        let out = Command::new(".venv/bin/python")
            .arg("tests/support/make_checkpoint.py")
            .arg(&dir)
            .output()
            .expect(".venv/bin/python (scripts/test makes .venv with torch and PEFT)");
        assert!(
            out.status.success(),
            "make_checkpoint.py: {}",
            String::from_utf8_lossy(&out.stderr)
        );
        dir
    })
}

const AXES: &str = "axes: {backend: [tch], device: [cpu], dtype: [f32, f16], adapter: [lora, dora], op: [init_noop, forward], precision: [native]}";

/// Run `matrix` (written into a fresh folder beside the fixtures' paths) with `args`; the
/// process output and the JSON report (when one was written).
fn run(body: &str, args: &[&str]) -> (Output, Option<Value>, tempfile::TempDir) {
    let dir = tempfile::tempdir().unwrap();
    let m = write(dir.path(), "m.yaml", body);
    let report = dir.path().join("r.json");
    let out = bin()
        .args(["run", "--results", "/dev/null", "--json"])
        .arg(&report)
        .arg(&m)
        .args(args)
        .output()
        .unwrap();
    let r = report.exists().then(|| json(&report));
    (out, r, dir)
}

fn sha256(p: &Path) -> String {
    let out = Command::new("sha256sum").arg(p).output().unwrap();
    String::from_utf8_lossy(&out.stdout)
        .split_whitespace()
        .next()
        .unwrap()
        .to_string()
}

/// Zero rows (#2049) and a dead embedding dimension give DoRA's 0/0 at init on exactly those
/// tensors; the padding row of a word embedding does not (PEFT normalises an embedding per
/// dimension); huge rows overflow fp16's sum of squares; an int8 tensor skips with its reason.
/// The report ties the run to the file (size, SHA-256) and says which dtypes rounded it.
#[test]
fn traps_in_real_weights_are_found_on_their_tensor() {
    let ck = fixtures().join("model.safetensors");
    let body = format!(
        "seed: 3\n{AXES}\nweights:\n  enc:\n    file: {f}\n    tensors: [\"encoder.layer.1.attention.output.dense.weight\", \"encoder.layer.1.intermediate.dense.weight\", \"encoder.layer.0.attention.self.query.weight\"]\n    batch: 4\n    rank: 4\n    alpha: 8\n  emb:\n    file: {f}\n    tensors: [\"embeddings.*.weight\"]\n    layer: embedding\n    batch: 6\n    rank: 4\n    alpha: 8\n  quant:\n    file: {f}\n    tensors: [\"quantized.**\"]\n    batch: 4\n    rank: 4\n    alpha: 8\n",
        f = ck.display()
    );
    let body = body.replace("backend: [tch]", "backend: [tch, candle]");
    let (out, r, _d) = run(&body, &[]);
    let r = r.unwrap_or_else(|| panic!("{}", String::from_utf8_lossy(&out.stderr)));
    let outcome = |id: &str| case(&r, id)["outcome"].as_str().unwrap().to_string();
    let o_proj = "tch/cpu/f32/dora/init_noop/native/enc:encoder.layer.1.attention.output.dense";
    assert_eq!(outcome(o_proj), "nonfinite");
    assert!(
        case(&r, o_proj)["error"].is_null()
            && case(&r, o_proj)["metrics"]["outputs"][0]["reference_nonfinite"]
                .as_u64()
                .unwrap()
                > 0,
        "the f64 reference divides by zero there too"
    );
    assert_eq!(
        outcome("tch/cpu/f32/dora/init_noop/native/enc:encoder.layer.0.attention.self.query"),
        "pass"
    );
    assert_eq!(
        outcome("tch/cpu/f32/dora/init_noop/native/emb:embeddings.position_embeddings/embedding"),
        "nonfinite"
    );
    assert_eq!(
        outcome("tch/cpu/f32/dora/init_noop/native/emb:embeddings.word_embeddings/embedding"),
        "pass"
    );
    let huge = "enc:encoder.layer.1.intermediate.dense";
    assert_eq!(
        outcome(&format!("tch/cpu/f32/dora/forward/native/{huge}")),
        "pass"
    );
    // candle sums the squares in fp16 and overflows; libtorch's CPU norm accumulates in fp32.
    let f16 = outcome(&format!("candle/cpu/f16/dora/forward/native/{huge}"));
    assert!(
        f16 == "nonfinite" || f16 == "mismatch",
        "fp16 sum of squares of rows of ~300 overflows: {f16}"
    );
    assert_eq!(
        outcome(&format!("tch/cpu/f16/dora/forward/native/{huge}")),
        "pass"
    );
    let q = case(&r, "tch/cpu/f32/lora/forward/native/quant:quantized.dense");
    assert_eq!(q["outcome"], "skipped");
    assert_eq!(q["skip"], "not_applicable");
    assert!(q["error"].as_str().unwrap().contains("stored as I8"), "{q}");
    // The files, tied to the run.
    let files = &r["weights"]["enc"]["files"];
    assert_eq!(files[0]["sha256"].as_str().unwrap(), sha256(&ck));
    assert_eq!(
        files[0]["size"].as_u64().unwrap(),
        std::fs::metadata(&ck).unwrap().len()
    );
    let shape = &r["shapes"]["enc:encoder.layer.0.attention.self.query"];
    assert_eq!(
        shape["tensor"],
        "encoder.layer.0.attention.self.query.weight"
    );
    assert_eq!(shape["stored_dtype"], "F32");
    assert_eq!(shape["bias"], true);
    assert_eq!(
        shape["in_features"].as_u64().unwrap() * shape["out_features"].as_u64().unwrap(),
        32 * 32
    );
    let q0 = "tch/cpu/{d}/lora/forward/native/enc:encoder.layer.0.attention.self.query";
    let rounded = |d: &str| case(&r, &q0.replace("{d}", d))["weight_rounded"].as_u64();
    assert_eq!(rounded("f32"), Some(0));
    assert!(rounded("f16").unwrap() > 900, "{:?}", rounded("f16"));
    // The tables: one per entry, a row per tensor; the findings name the tensor.
    let text = String::from_utf8_lossy(&out.stdout);
    assert!(text.contains("weights enc: "), "{text}");
    assert!(
        text.contains("encoder.layer.1.attention.output.dense"),
        "{text}"
    );
    assert!(text.contains(o_proj), "{text}");
}

/// A sharded checkpoint reads the shard its tensor lives in, hashes only that one, and gives
/// the very numbers the single file gives.
#[test]
fn a_sharded_checkpoint_reads_only_its_tensors_shards() {
    let entry = |file: &Path| {
        format!(
            "seed: 3\n{AXES}\nweights:\n  m:\n    file: {}\n    tensors: [\"stem.conv.weight\"]\n    layer: conv2d\n    image: 6\n    batch: 2\n    rank: 2\n    alpha: 4\n",
            file.display()
        )
    };
    let (out, single, _a) = run(&entry(&fixtures().join("model.safetensors")), &[]);
    let single = single.unwrap_or_else(|| panic!("{}", String::from_utf8_lossy(&out.stderr)));
    let (out, sharded, _b) = run(&entry(&fixtures().join("sharded")), &[]);
    let sharded = sharded.unwrap_or_else(|| panic!("{}", String::from_utf8_lossy(&out.stderr)));
    let files = sharded["weights"]["m"]["files"].as_array().unwrap();
    assert_eq!(files.len(), 2);
    let index: Value = json(&fixtures().join("sharded/model.safetensors.index.json"));
    let home = index["weight_map"]["stem.conv.weight"].as_str().unwrap();
    for f in files {
        let mine = f["path"].as_str().unwrap().ends_with(home);
        assert_eq!(f["read"], mine, "{f}");
        assert_eq!(f["sha256"].is_string(), mine, "{f}");
    }
    let cases = |r: &Value| -> Vec<(Value, Value)> {
        r["cases"]
            .as_array()
            .unwrap()
            .iter()
            .map(|c| (c["id"].clone(), c["metrics"].clone()))
            .collect()
    };
    assert!(!cases(&single).is_empty());
    assert_eq!(cases(&single), cases(&sharded));
    assert!(cases(&single)
        .iter()
        .any(|(id, _)| id.as_str().unwrap().ends_with("m:stem.conv/conv2d")));
}

/// Read one tensor of a safetensors file as f64.
fn tensor(file: &Path, name: &str) -> Vec<f64> {
    let bytes = std::fs::read(file).unwrap();
    let st = safetensors::SafeTensors::deserialize(&bytes).unwrap();
    let t = st.tensor(name).unwrap();
    match t.dtype() {
        safetensors::Dtype::F32 => t
            .data()
            .chunks_exact(4)
            .map(|b| f32::from_le_bytes(b.try_into().unwrap()) as f64)
            .collect(),
        d => panic!("{name}: {d:?}"),
    }
}

/// A saved adapter gives A, B and the magnitude (its config r, alpha and use_dora): the cases
/// are its adapter's only, and the dumped inputs are the saved tensors. A dumped DoRA case
/// replays in PEFT with the same result.
#[test]
fn saved_adapters_give_a_b_and_magnitude_and_replay_in_peft() {
    for (name, dora) in [("lora", false), ("dora", true)] {
        let adapter = fixtures().join(name);
        let body = format!(
            "seed: 3\n{AXES}\nweights:\n  m:\n    file: {}\n    tensors: [\"encoder.layer.0.attention.self.value.weight\"]\n    batch: 4\n    adapter: {}\n",
            fixtures().join("model.safetensors").display(),
            adapter.display()
        );
        let dump = tempfile::tempdir().unwrap();
        let dump_arg = dump.path().to_str().unwrap();
        let (out, r, _d) = run(&body, &["--dump", dump_arg]);
        let r = r.unwrap_or_else(|| panic!("{}", String::from_utf8_lossy(&out.stderr)));
        let cases = r["cases"].as_array().unwrap();
        assert_eq!(cases.len(), 4, "one adapter, two dtypes, two ops");
        let kind = if dora { "dora" } else { "lora" };
        assert!(cases.iter().all(|c| c["adapter"] == kind));
        let shape = &r["shapes"]["m:encoder.layer.0.attention.self.value"];
        assert_eq!(shape["rank"], 4);
        assert_eq!(shape["alpha"], if dora { 16.0 } else { 8.0 });
        assert_eq!(shape["saved_adapter"], true);
        assert_eq!(r["weights"]["m"]["adapter"]["use_dora"], dora);
        let id =
            format!("tch/cpu/f32/{kind}/forward/native/m:encoder.layer.0.attention.self.value");
        assert_eq!(case(&r, &id)["outcome"], "pass", "{}", case(&r, &id));
        let file = dump.path().join(peft_compat::exec::dump::file_name(&id));
        let saved = adapter.join("adapter_model.safetensors");
        let prefix = "base_model.model.encoder.layer.0.attention.self.value.";
        assert_eq!(
            tensor(&file, "lora_A.weight"),
            tensor(&saved, &format!("{prefix}lora_A.weight"))
        );
        assert_eq!(
            tensor(&file, "lora_B.weight"),
            tensor(&saved, &format!("{prefix}lora_B.weight"))
        );
        if dora {
            assert_eq!(
                tensor(&file, "lora_magnitude_vector"),
                tensor(&saved, &format!("{prefix}lora_magnitude_vector"))
            );
            let bytes = std::fs::read(&file).unwrap();
            let (_, meta) = safetensors::SafeTensors::read_metadata(&bytes).unwrap();
            let meta = meta.metadata().clone().unwrap();
            assert_eq!(
                meta["tensor"],
                "encoder.layer.0.attention.self.value.weight"
            );
            // PEFT itself, from the dump: the same result.
            let (got, stdout) = replay(&file);
            let d = got
                .iter()
                .find(|(w, _)| w == "result")
                .unwrap_or_else(|| panic!("{stdout}"))
                .1;
            assert!(d <= 1e-6, "{stdout}");
        }
    }
}

/// Write a safetensors file of f32 tensors.
fn save(path: &Path, tensors: &[(&str, Vec<usize>)]) {
    let data: Vec<(String, Vec<usize>, Vec<u8>)> = tensors
        .iter()
        .map(|(n, s)| {
            let count: usize = s.iter().product();
            let bytes = (0..count)
                .flat_map(|i| (i as f32 * 1e-3).to_le_bytes())
                .collect();
            (n.to_string(), s.clone(), bytes)
        })
        .collect();
    let views: Vec<(String, safetensors::tensor::TensorView)> = data
        .iter()
        .map(|(n, s, b)| {
            (
                n.clone(),
                safetensors::tensor::TensorView::new(safetensors::Dtype::F32, s.clone(), b)
                    .unwrap(),
            )
        })
        .collect();
    std::fs::write(path, safetensors::serialize(views, None).unwrap()).unwrap();
}

/// Every bad input exits 2 with the matrix file's line, the file at fault and the fix.
#[test]
fn bad_checkpoints_exit_2_naming_the_file_and_the_fix() {
    let ck = fixtures().join("model.safetensors");
    let dir = tempfile::tempdir().unwrap();
    let corrupt = dir.path().join("corrupt.safetensors");
    std::fs::write(
        &corrupt,
        b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all",
    )
    .unwrap();
    // A base whose query is 16 x 32: the saved adapter's B (32 x 4) does not fit it.
    let other = dir.path().join("other.safetensors");
    save(
        &other,
        &[("encoder.layer.0.attention.self.query.weight", vec![16, 32])],
    );
    let entry = |file: &Path, tensors: &str, extra: &str| {
        format!(
            "seed: 1\n{AXES}\nweights:\n  m:\n    file: {}\n    tensors: [\"{tensors}\"]\n    batch: 2\n{extra}",
            file.display()
        )
    };
    let ranked = "    rank: 2\n    alpha: 4\n";
    let adapter = format!("    adapter: {}\n", fixtures().join("lora").display());
    let missing = dir.path().join("nowhere/model.safetensors");
    // (matrix, its line at fault, what stderr says)
    let cases: Vec<(String, usize, Vec<String>)> = vec![
        (
            entry(&missing, "a.weight", ranked),
            5,
            vec![
                format!("cannot open {}", missing.display()),
                "help: give the path of a .safetensors file".into(),
            ],
        ),
        (
            entry(&ck, "encoder.layer.*.attention.query.weight", ranked),
            6,
            vec![
                "tensors pattern `encoder.layer.*.attention.query.weight` matches no tensor".into(),
                "the closest tensor names: encoder.layer.".into(),
                "encoder.layer.0.attention.self.query.weight".into(),
            ],
        ),
        (
            entry(&ck, "encoder.layer.0.attention.self.query.weight", &format!("{ranked}    layer: conv2d\n")),
            6,
            vec![
                format!("tensor `encoder.layer.0.attention.self.query.weight` of {} has shape [32, 32]", ck.display()),
                "conv2d 4-D".into(),
            ],
        ),
        (
            entry(&other, "encoder.layer.0.attention.self.query.weight", &adapter),
            8,
            vec![
                "adapter tensor `base_model.model.encoder.layer.0.attention.self.query.lora_B.weight`".into(),
                "has shape [32, 4] but the base layer `encoder.layer.0.attention.self.query.weight` (shape [16, 32]) needs [16, 4]".into(),
                "help: the adapter was trained on another model".into(),
            ],
        ),
        (
            entry(&corrupt, "a.weight", ranked),
            5,
            vec![
                format!("{} is not a readable safetensors file", corrupt.display()),
                "help: the header or index cannot be read".into(),
            ],
        ),
        (
            entry(&ck, "encoder.layer.0.attention.self.key.weight", &adapter),
            8,
            vec![
                "has no weights for `encoder.layer.0.attention.self.key`".into(),
                "target_modules".into(),
            ],
        ),
    ];
    for (body, line, wants) in cases {
        let (out, _, d) = run(&body, &[]);
        let err = String::from_utf8_lossy(&out.stderr);
        assert_eq!(out.status.code(), Some(2), "{body}\n{err}");
        let m = d.path().join("m.yaml");
        assert!(
            err.contains(&format!("{}:{line}:", m.display())),
            "the entry's line: {err}"
        );
        for w in wants {
            assert!(err.contains(&w), "{w:?} not in:\n{err}");
        }
    }
}
