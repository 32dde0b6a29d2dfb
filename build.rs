//! The integration tests link the tch worker's glue in process (a dev-dependency), so they need
//! libtorch at run time like the worker does: give test binaries the same rpath. The main binary
//! links no tensor library and gets nothing here.

use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    println!("cargo:rerun-if-env-changed=LIBTORCH_USE_PYTORCH");
    let lib = if let Ok(root) = std::env::var("LIBTORCH") {
        Some(PathBuf::from(root).join("lib"))
    } else if std::env::var_os("LIBTORCH_USE_PYTORCH").is_some() {
        // As torch-sys finds it: the torch package of the Python on PATH.
        std::process::Command::new("python3")
            .args([
                "-c",
                "import os, torch; print(os.path.join(os.path.dirname(torch.__file__), 'lib'))",
            ])
            .output()
            .ok()
            .filter(|o| o.status.success())
            .map(|o| PathBuf::from(String::from_utf8_lossy(&o.stdout).trim()))
    } else {
        None
    };
    if let Some(lib) = lib.filter(|l| l.is_dir()) {
        println!("cargo:rustc-link-arg-tests=-Wl,-rpath,{}", lib.display());
    }
}
