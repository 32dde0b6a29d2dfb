//! Embeds the libtorch location as an rpath (so the binary runs without LD_LIBRARY_PATH) and the
//! libtorch version (for reports). Shared by workers/tch (tch 0.24, whose torch-sys tells where
//! it found libtorch) and every other libtorch build (scripts/libtorch.sh: built with LIBTORCH
//! set). The glue is the same source for every tch from 0.14 to 0.24: no cfg is needed.

use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    let lib = std::env::var("DEP_TCH_LIBTORCH_LIB")
        .map(PathBuf::from)
        .or_else(|_| std::env::var("LIBTORCH").map(|l| PathBuf::from(l).join("lib")));
    let Ok(lib) = lib else {
        return;
    };
    let lib = lib.as_path();
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    // Rust links with --as-needed, which drops libtorch_cuda (nothing references it directly)
    // and with it CUDA support; keep it when this libtorch has it.
    if lib.join("libtorch_cuda.so").exists() {
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed,-ltorch_cuda,--as-needed");
    }
    let root = lib.parent().unwrap_or(lib);
    let mut version = None;
    let mut cuda = None;
    // The torch wheel: torch/version.py. A standalone libtorch: build-version.
    if let Ok(py) = std::fs::read_to_string(root.join("version.py")) {
        for line in py.lines() {
            let value = || {
                line.split('=')
                    .nth(1)
                    .map(|v| v.trim().trim_matches('\'').trim_matches('"').to_string())
            };
            if line.starts_with("__version__") {
                version = value();
            } else if line.starts_with("cuda") {
                cuda = value();
            }
        }
    } else if let Ok(v) = std::fs::read_to_string(root.join("build-version")) {
        version = Some(v.trim().to_string());
    }
    // tch has torch's fp8 kinds from 0.19 (libtorch 2.6) on.
    println!("cargo:rustc-check-cfg=cfg(tch_fp8)");
    if let Some(v) = version {
        let mut parts = v.split(['.', '+']).map(|p| p.parse::<u32>().unwrap_or(0));
        let (major, minor) = (parts.next().unwrap_or(0), parts.next().unwrap_or(0));
        if (major, minor) >= (2, 6) {
            println!("cargo:rustc-cfg=tch_fp8");
        }
        println!("cargo:rustc-env=PEFT_COMPAT_LIBTORCH_VERSION={v}");
    }
    println!(
        "cargo:rustc-env=PEFT_COMPAT_LIBTORCH_CUDA={}",
        cuda.unwrap_or_default()
    );
}
