//! Property tests of the matrix parser: whatever the text, `Matrix::parse` answers with a
//! matrix or a located error; it never panics. Inputs: arbitrary strings, and the default
//! matrix mutated line by line and character by character (5,000 cases each by default;
//! PROPTEST_CASES changes it).

use peft_compat::spec::Matrix;
use proptest::prelude::*;
use std::path::Path;

const DEFAULT: &str = include_str!("../matrices/default.yaml");

fn parse(src: &str) {
    // A small ceiling keeps absurd expansions cheap; the ceiling itself is an error path.
    if let Err(e) = Matrix::parse(src, Path::new("fuzz.yaml"), Some(2000)) {
        let text = e.to_string();
        assert!(text.starts_with("fuzz.yaml"), "unlocated error: {text}");
        assert!(text.contains("help:"), "error without a fix: {text}");
    }
}

/// Tokens that matrix files are made of, so that mutations reach deep into validation.
fn token() -> impl Strategy<Value = String> {
    prop_oneof![
        Just("\n".to_string()),
        Just(": ".to_string()),
        Just("- ".to_string()),
        Just("[".to_string()),
        Just("]".to_string()),
        Just("{".to_string()),
        Just("}".to_string()),
        Just(", ".to_string()),
        Just("  ".to_string()),
        Just("#".to_string()),
        Just("\"".to_string()),
        Just("&a ".to_string()),
        Just("*a".to_string()),
        Just("!!binary ".to_string()),
        Just("~".to_string()),
        Just("-1".to_string()),
        Just("0".to_string()),
        Just("1e400".to_string()),
        Just("18446744073709551616".to_string()),
        Just("NaN".to_string()),
        Just("cuda:99999999999999999999".to_string()),
        prop::sample::select(vec![
            "seed",
            "max_cases",
            "axes",
            "shapes",
            "exclude",
            "include",
            "tolerances",
            "expectations",
            "backend",
            "device",
            "dtype",
            "adapter",
            "op",
            "precision",
            "shape",
            "batch",
            "in_features",
            "out_features",
            "rank",
            "alpha",
            "bias",
            "rslora",
            "factor",
            "rel",
            "expect",
            "reason",
            "error",
            "when",
            "libtorch",
            "cpu_flag",
            "tch",
            "candle",
            "cpu",
            "cuda",
            "f16",
            "bf16",
            "f32",
            "f64",
            "lora",
            "dora",
            "init",
            "forward",
            "backward",
            "merge",
            "unmerge",
            "native",
            "upcast",
            "unsupported",
            "(",
        ])
        .prop_map(String::from),
        "[a-z0-9_:.<>=!]{1,8}",
    ]
}

proptest! {
    // 5,000 cases each unless PROPTEST_CASES says otherwise (a literal `cases` would override it).
    #![proptest_config(ProptestConfig {
        cases: std::env::var("PROPTEST_CASES").ok().and_then(|v| v.parse().ok()).unwrap_or(5000),
        failure_persistence: None,
        ..ProptestConfig::default()
    })]

    #[test]
    fn arbitrary_text_never_panics(s in "\\PC{0,300}") {
        parse(&s);
    }

    #[test]
    fn token_soup_never_panics(tokens in prop::collection::vec(token(), 0..60)) {
        parse(&tokens.concat());
    }

    #[test]
    fn mutated_default_matrix_never_panics(
        edits in prop::collection::vec((any::<prop::sample::Index>(), 0..4u8, token()), 1..6)
    ) {
        let mut lines: Vec<String> = DEFAULT.lines().map(String::from).collect();
        for (at, kind, tok) in edits {
            if lines.is_empty() {
                break;
            }
            let i = at.index(lines.len());
            match kind {
                0 => { lines.remove(i); }
                1 => lines.insert(i, tok),
                2 => {
                    let l = &mut lines[i];
                    let cut = at.index(l.len() + 1);
                    let cut = (0..=cut).rev().find(|&c| l.is_char_boundary(c)).unwrap_or(0);
                    l.insert_str(cut, &tok);
                }
                _ => {
                    let l = &mut lines[i];
                    let cut = at.index(l.len() + 1);
                    let cut = (0..=cut).rev().find(|&c| l.is_char_boundary(c)).unwrap_or(0);
                    l.truncate(cut);
                }
            }
        }
        parse(&lines.join("\n"));
    }
}
